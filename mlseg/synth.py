"""Synthetic nuclei images with instance labels: H&E-, IHC- and fluorescence-like.

The embedded default dataset for the demo and for fast tests. Each image is built the way a
slide is: nuclei (irregular, clustered, touching, sometimes overlapping) are laid out as an
instance label image first, then rendered as stain concentrations and "acquired" through an
optical blur, illumination, noise and sometimes JPEG compression.

- Brightfield (``he``, ``ihc``) is composed in optical-density space with the Ruifrok &
  Johnston stain vectors of ``skimage.color.rgb_from_hed`` (Beer-Lambert:
  ``I = I0 * 10**(-c @ rgb_from_hed)``), so colour deconvolution (``skimage.color.rgb2hed``)
  recovers the haematoxylin, eosin and DAB that were put in.
- ``ihc`` nuclei carry a DAB grade 0/1+/2+/3+ whose mean nuclear DAB optical density
  (log10 units, as QuPath reports it) lies inside the bands of the packaged ``ihc`` profile's
  ``dab_thresholds`` (0.15, 0.30, 0.60): see :data:`DAB_OD_BANDS`.
- ``fluorescence`` is a DAPI/Hoechst-like channel (bright nuclei, dark background, vignetting,
  Poisson + read noise), stored as RGB that is grey or blue.

Everything is drawn from the ``numpy.random.Generator`` passed in, so one seed gives the same
bytes on every run. Labels obey the contract of :mod:`mlseg.dataset`: ``(H, W) int32``,
0 = background, 1..N consecutive, each label one 4-connected object of at least
:data:`MIN_NUCLEUS_PX` pixels (where nuclei overlap the later one wins; fragments cut off an
earlier nucleus are merged into the nucleus that covers them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mlseg.config import DataConfig
from mlseg.errors import ConfigError, DatasetError, staged_write_error

KINDS = ("he", "ihc", "fluorescence")

DEFAULT_NUCLEI_DENSITY = 0.22
"""Expected fraction of the image covered by nuclei (each image varies around it)."""
DEFAULT_DIAMETER_PX = 12.0
"""Mean nucleus diameter in pixels: 6 um at 0.5 um/px (20x); single nuclei span ~0.5-1.7x."""
MIN_NUCLEUS_PX = 12
"""Smallest label kept (pixels); equals the packaged profiles' ``min_area_px``."""

DAB_OD_BANDS: dict[int, tuple[float, float]] = {
    0: (0.0, 0.0),
    1: (0.19, 0.26),
    2: (0.4, 0.54),
    3: (0.85, 1.15),
}
"""Mean nuclear DAB optical density (log10) drawn for each IHC grade, inside the 0.15/0.30/0.60
thresholds of the ``ihc`` profile with a margin for blur and noise."""

MANIFEST_COLUMNS = ("split", "stem", "image", "mask", "kind", "n_nuclei", "pixel_size_um", "seed")


def _rgb_from_hed() -> np.ndarray:
    from skimage.color import rgb_from_hed

    return np.asarray(rgb_from_hed, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# random fields


def _unit(field: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (float32)."""
    field = field - field.mean()
    return (field / (field.std() + 1e-6)).astype(np.float32)


def _fine_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise at scale ``sigma`` px, unit variance."""
    white = rng.standard_normal(shape, dtype=np.float32)
    return _unit(cv2.GaussianBlur(white, (0, 0), sigma, borderType=cv2.BORDER_REFLECT))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Low-frequency noise with features of about ``scale`` px, unit variance.

    Drawn on a coarse grid and upsampled: a large Gaussian kernel at full size costs ~50x more.
    """
    h, w = shape
    gh, gw = max(3, round(h / scale) + 2), max(3, round(w / scale) + 2)
    coarse = cv2.GaussianBlur(rng.standard_normal((gh, gw), dtype=np.float32), (0, 0), 0.8)
    return _unit(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC))


def _fibres(rng: np.random.Generator, shape: tuple[int, int], length: float) -> np.ndarray:
    """Wavy fibre texture (collagen/stroma): streaks along one direction, bent by a smooth warp."""
    h, w = shape
    pad = int(3 * length)
    angle = rng.uniform(0, np.pi)
    half = int(np.ceil(1.5 * length))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    kernel = np.exp(-0.5 * ((u / (0.5 * length)) ** 2 + (v / 0.7) ** 2))
    white = rng.standard_normal((h + 2 * pad, w + 2 * pad), dtype=np.float32)
    streaks = cv2.filter2D(white, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)
    bend = 1.2 * length
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x = gx + pad + bend * _smooth_noise(rng, shape, 80.0)
    map_y = gy + pad + bend * _smooth_noise(rng, shape, 80.0)
    return _unit(cv2.remap(streaks, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))


def _stroma(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Extracellular texture: wavy fibres in places, granular mottle elsewhere, unit variance."""
    fibrous = 0.5 + 0.5 * np.tanh(2.0 * _smooth_noise(rng, shape, 40.0) + rng.uniform(-1.0, 1.0))
    fibres = _fibres(rng, shape, rng.uniform(5.0, 12.0))
    mottle = _unit(_fine_noise(rng, shape, 1.2) + _fine_noise(rng, shape, 3.0))
    broken = np.clip(1.0 + 0.6 * _fine_noise(rng, shape, 4.0), 0.0, None)  # fibres fade in and out
    return _unit(fibrous * 0.7 * fibres * broken + (1.0 - fibrous) * mottle)


# --------------------------------------------------------------------------------------------
# geometry: where the nuclei are and what shape they have


def _place_nuclei(
    rng: np.random.Generator, shape: tuple[int, int], n: int, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered centres (Thomas process + uniform) with a soft exclusion distance.

    Two accepted nuclei i, j keep ``dist >= k_i * (r_i + r_j)``; ``k`` near 1 gives touching
    nuclei, ``k`` ~0.6 (a minority) overlapping ones. Returns ``(centres (M, 2) xy, radii (M,))``.
    """
    h, w = shape
    margin = float(radii.max())
    n_cand = 6 * n + 20
    n_parents = max(1, int(round(n / rng.uniform(5.0, 14.0))))
    parents = rng.uniform((-margin, -margin), (w + margin, h + margin), size=(n_parents, 2))
    spread = rng.uniform(1.5, 4.0) * 2.0 * radii.mean()
    clustered = rng.random(n_cand) < rng.uniform(0.45, 0.85)
    cand = rng.uniform((-margin, -margin), (w + margin, h + margin), size=(n_cand, 2))
    which = rng.integers(0, n_parents, n_cand)
    cand[clustered] = parents[which[clustered]] + rng.normal(0, spread, (int(clustered.sum()), 2))
    cand_r = rng.choice(radii, n_cand)
    overlap = rng.random(n_cand) < rng.uniform(0.05, 0.2)
    k = np.where(overlap, rng.uniform(0.55, 0.75, n_cand), rng.uniform(0.88, 1.1, n_cand))

    cell = 2.2 * margin
    grid: dict[tuple[int, int], list[int]] = {}
    xs: list[float] = []
    ys: list[float] = []
    rs: list[float] = []
    for (x, y), r, ki in zip(cand.tolist(), cand_r.tolist(), k.tolist(), strict=True):
        if not (-r < x < w + r and -r < y < h + r):
            continue
        gx, gy = int(x // cell), int(y // cell)
        ok = True
        for cx in (gx - 1, gx, gx + 1):
            for cy in (gy - 1, gy, gy + 1):
                for j in grid.get((cx, cy), ()):
                    limit = ki * (r + rs[j])
                    if (x - xs[j]) ** 2 + (y - ys[j]) ** 2 < limit * limit:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((gx, gy), []).append(len(xs))
            xs.append(x)
            ys.append(y)
            rs.append(r)
            if len(xs) == n:
                break
    centres = np.stack([np.asarray(xs, np.float32), np.asarray(ys, np.float32)], axis=1)
    return centres.reshape(-1, 2), np.asarray(rs, np.float32)


def _outlines(rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Perturbed-ellipse outlines: random radial harmonics 2..6, elongation, rotation.

    Returns ``(N, V, 2)`` float32 xy vertices. Area is roughly ``pi * r**2``.
    """
    n, v = len(centres), 40
    theta = np.linspace(0, 2 * np.pi, v, endpoint=False, dtype=np.float32)
    ks = np.arange(2, 7, dtype=np.float32)
    irregular = np.where(rng.random(n) < 0.2, rng.uniform(1.5, 2.5, n), 1.0)  # pleomorphic few
    amp = rng.normal(0, 1, (n, len(ks))) * (0.07 / ks**1.1) * irregular[:, None]
    phase = rng.uniform(0, 2 * np.pi, (n, len(ks)))
    wobble = (amp[:, :, None] * np.cos(ks[None, :, None] * theta + phase[:, :, None])).sum(1)
    rho = radii[:, None] * np.clip(1.0 + wobble, 0.55, 1.6)
    aspect = 1.0 + rng.gamma(2.0, 0.15, n)  # mostly 1.1-1.5, a tail of spindle shapes
    aspect = np.minimum(aspect, 2.6)
    ax, ay = np.sqrt(aspect)[:, None], 1.0 / np.sqrt(aspect)[:, None]
    px, py = rho * np.cos(theta) * ax, rho * np.sin(theta) * ay
    rot = rng.uniform(0, np.pi, n)[:, None]
    x = centres[:, :1] + px * np.cos(rot) - py * np.sin(rot)
    y = centres[:, 1:] + px * np.sin(rot) + py * np.cos(rot)
    return np.stack([x, y], axis=-1).astype(np.float32)


def _rasterise(
    outlines: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw outlines in order (later wins) into labels; accumulate ``weights`` where they overlap.

    Returns ``labels (H, W) int32`` (1-based index into ``outlines``) and ``stain (H, W)
    float32``, the sum of the weights of every nucleus covering a pixel (overlaps are darker
    in brightfield and brighter in fluorescence, as through a real section).
    """
    h, w = shape
    labels = np.zeros(shape, np.int32)
    stain = np.zeros(shape, np.float32)
    lo = np.floor(outlines.min(axis=1)).astype(int)
    hi = np.ceil(outlines.max(axis=1)).astype(int) + 1
    for i in range(len(outlines)):
        x0, y0 = max(lo[i, 0], 0), max(lo[i, 1], 0)
        x1, y1 = min(hi[i, 0], w), min(hi[i, 1], h)
        if x1 <= x0 or y1 <= y0:
            continue
        local = np.zeros((y1 - y0, x1 - x0), np.uint8)
        pts = np.round((outlines[i] - (x0, y0)) * 16).astype(np.int32)
        cv2.fillPoly(local, [pts], 1, lineType=cv2.LINE_8, shift=4)
        inside = local.astype(bool)
        labels[y0:y1, x0:x1][inside] = i + 1
        stain[y0:y1, x0:x1] += local * weights[i]
    return labels, stain


def _clean_labels(labels: np.ndarray, min_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make every label one 4-connected object of at least ``min_px`` pixels, numbered 1..N.

    An earlier nucleus cut in pieces by later ones keeps its largest piece; the other pieces,
    and nuclei left smaller than ``min_px``, join the neighbouring label they touch most, or
    become background when they touch none. Returns ``(labels, origin, erased)``: ``origin[l]``
    is the index (1-based) of the outline that label ``l`` came from, ``erased`` the pixels
    turned to background.
    """
    from skimage.measure import label as connected
    from skimage.segmentation import relabel_sequential

    comp = connected(labels, connectivity=1, background=0)  # equal values only connect
    n_comp = int(comp.max())
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)
    owner = np.zeros(n_comp + 1, np.int64)
    owner[comp.ravel()] = labels.ravel()
    order = np.lexsort((-sizes[1:], owner[1:])) + 1  # by owner, largest component first
    first = np.ones(len(order), bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    keep = np.zeros(n_comp + 1, bool)
    keep[order[first]] = True
    keep &= sizes >= min_px
    keep[0] = True
    out = labels.copy()
    for _ in range(3):  # a piece may first need a neighbouring piece resolved
        loose = ~keep[comp]
        if not loose.any():
            break
        pairs = []
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            nb = np.roll(out, (dy, dx), axis=(0, 1))
            nb_keep = np.roll(keep[comp] & (comp > 0), (dy, dx), axis=(0, 1))
            valid = np.ones_like(loose)
            if dy:
                valid[0 if dy > 0 else -1, :] = False
            if dx:
                valid[:, 0 if dx > 0 else -1] = False
            m = loose & nb_keep & valid & (nb != out)
            pairs.append(np.stack([comp[m], nb[m]], axis=1))
        pairs = np.concatenate(pairs)
        if len(pairs) == 0:
            break
        uniq, counts = np.unique(pairs, axis=0, return_counts=True)
        best = uniq[np.lexsort((-counts, uniq[:, 0]))]
        best = best[np.r_[True, best[1:, 0] != best[:-1, 0]]]
        target = np.zeros(n_comp + 1, np.int64)
        target[best[:, 0]] = best[:, 1]
        merged = np.zeros(n_comp + 1, bool)
        merged[best[:, 0]] = True
        moving = merged[comp] & loose
        out[moving] = target[comp[moving]]
        keep |= merged
    erased = ~keep[comp]
    out[erased] = 0
    out, forward, _ = relabel_sequential(out)
    origin = np.zeros(int(out.max()) + 1, np.int64)
    origin[forward.out_values] = forward.in_values
    return out.astype(np.int32), origin, erased


def _interior_distance(labels: np.ndarray) -> np.ndarray:
    """Distance (px) of each nuclear pixel to the edge of its own label; 0 outside."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    inner = ((labels > 0) & ~edge).astype(np.uint8)
    return cv2.distanceTransform(inner, cv2.DIST_L2, 3) + (labels > 0) * 0.5


class _Nuclei:
    """Laid-out nuclei: labels plus per-label parameter arrays (index 0 = background)."""

    def __init__(
        self, rng: np.random.Generator, shape: tuple[int, int], density: float, diameter: float
    ):
        diameter *= rng.uniform(0.88, 1.12)
        density *= rng.uniform(0.6, 1.4)
        sizes = diameter * np.clip(rng.lognormal(0.0, 0.22, 4096), 0.5, 1.7)
        mean_area = float(np.mean(np.pi * (sizes / 2) ** 2))
        expected = density * shape[0] * shape[1] / mean_area
        n = int(rng.poisson(max(expected, 1.0)))
        centres, radii = _place_nuclei(rng, shape, max(n, 1), (sizes / 2).astype(np.float32))
        order = rng.permutation(len(centres))  # draw order decides who wins an overlap
        centres, radii = centres[order], radii[order]
        weight = rng.lognormal(0.0, 0.22, len(centres)).astype(np.float32)
        outlines = _outlines(rng, centres, radii)
        raw, stain = _rasterise(outlines, weight, shape)
        self.labels, origin, erased = _clean_labels(raw, MIN_NUCLEUS_PX)
        stain[erased] = 0.0
        self.stain = stain
        self.n = int(self.labels.max())
        self.fg = self.labels > 0
        radius = np.r_[1.0, radii][origin]
        self.radius = radius.astype(np.float32)
        self.centres = np.r_[np.zeros((1, 2), np.float32), centres][origin]
        self.dist = _interior_distance(self.labels)
        # relative depth inside the nucleus: 0 at the edge, 1 from ~half a radius inwards
        self.depth = np.clip(self.dist / (0.5 * self.radius[self.labels]), 0.0, 1.0)

    def per_label(self, values: np.ndarray) -> np.ndarray:
        """Spread per-label values ``(N + 1,)`` onto the image; 0 on background."""
        values = np.asarray(values, np.float32).copy()
        values[0] = 0.0
        return values[self.labels]

    def nucleoli(self, rng: np.random.Generator, fraction: float, strength: float) -> np.ndarray:
        """Small dots near the centres of a ``fraction`` of nuclei (0 elsewhere)."""
        dots = np.zeros(self.labels.shape, np.float32)
        chosen = np.flatnonzero(rng.random(self.n) < fraction) + 1
        for lab in chosen.tolist():
            cx, cy = self.centres[lab] + rng.normal(0, 0.25 * self.radius[lab], 2)
            rad = max(0.8, 0.16 * float(self.radius[lab]))
            cv2.circle(
                dots,
                (int(round(cx * 4)), int(round(cy * 4))),
                int(round(rad * 4)),
                strength,
                -1,
                cv2.LINE_AA,
                2,
            )
        return dots * self.fg


# --------------------------------------------------------------------------------------------
# rendering: stain concentrations, then acquisition


def _chromatin(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Granular chromatin texture: fine speckle plus coarser clumps, unit variance."""
    return _unit(
        _fine_noise(rng, shape, 0.7) + rng.uniform(0.4, 1.0) * _fine_noise(rng, shape, 1.8)
    )


def _nuclear_concentration(rng: np.random.Generator, nuc: _Nuclei, texture: float) -> np.ndarray:
    """Relative stain in nuclei (~1 on average, 0 outside): overlap, chromatin, rims, vesicles."""
    n1 = nuc.n + 1
    chrom = nuc.per_label(rng.uniform(0.5, 1.0, n1) * texture)
    vesicular = np.where(rng.random(n1) < rng.uniform(0.1, 0.4), rng.uniform(0.25, 0.55, n1), 0.0)
    rim = nuc.per_label(0.15 + vesicular * 1.2)
    core = 1.0 - nuc.per_label(vesicular) * nuc.depth
    conc = nuc.stain * core * (1.0 + chrom * _chromatin(rng, nuc.labels.shape))
    conc *= 1.0 + rim * np.exp(-nuc.dist / 1.2)
    conc += nuc.nucleoli(rng, 0.25, 0.8) * nuc.stain
    return np.clip(conc, 0.0, None) * nuc.fg


def _vacuoles(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Clear spaces (fat, oedema, lumens): 1 where tissue is absent, soft-edged."""
    if fraction <= 0:
        return np.zeros(shape, np.float32)
    field = _smooth_noise(rng, shape, rng.uniform(6.0, 14.0)) + 0.15 * _fine_noise(rng, shape, 2.0)
    cut = np.quantile(field, 1.0 - fraction)
    holes = np.clip((field - cut) * 4.0, 0.0, 1.0).astype(np.float32)
    return cv2.GaussianBlur(holes, (0, 0), 1.0)


def _red_cells(rng: np.random.Generator, nuc: _Nuclei, radius: float) -> np.ndarray:
    """Erythrocytes (eosin-only discs with a paler centre) in a vessel-like streak."""
    h, w = nuc.labels.shape
    cells = np.zeros((h, w), np.float32)
    start = rng.uniform((0, 0), (w, h))
    direction = rng.normal(0, 1, 2)
    direction /= np.linalg.norm(direction) + 1e-6
    for t in rng.uniform(-0.4, 0.4, rng.integers(4, 16)) * max(h, w):
        x, y = start + direction * t + rng.normal(0, radius * 1.5, 2)
        r = radius * rng.uniform(0.85, 1.1)
        cv2.circle(cells, (int(x * 4), int(y * 4)), int(r * 4), 1.0, -1, cv2.LINE_AA, 2)
        cv2.circle(cells, (int(x * 4), int(y * 4)), int(r * 1.8), 0.55, -1, cv2.LINE_AA, 2)
    return np.clip(cells, 0.0, 1.0) * ~nuc.fg


def _beer_lambert(rng: np.random.Generator, conc: np.ndarray) -> np.ndarray:
    """Stain concentrations ``(H, W, 3)`` (H, E, DAB; log10 OD) -> transmitted RGB in [0, 255]."""
    od = conc.reshape(-1, 3) @ _rgb_from_hed()
    white = 255.0 * rng.uniform(0.93, 1.0) * rng.uniform(0.985, 1.0, 3)  # lamp and white balance
    return (white * np.exp(od * np.float32(-np.log(10.0)))).reshape(conc.shape).astype(np.float32)


def _render_he(rng: np.random.Generator, nuc: _Nuclei) -> np.ndarray:
    shape = nuc.labels.shape
    d = float(np.mean(nuc.radius[1:])) * 2 if nuc.n else DEFAULT_DIAMETER_PX
    tissue = 1.0 - _vacuoles(rng, shape, rng.choice([0.0, rng.uniform(0.03, 0.2)], p=[0.4, 0.6]))
    texture = _stroma(rng, shape)
    patchy = _smooth_noise(rng, shape, rng.uniform(20.0, 60.0))
    cytoplasm = cv2.GaussianBlur(nuc.fg.astype(np.float32), (0, 0), 0.8 * d)
    eosin = rng.uniform(0.13, 0.3) * (1.0 + 0.15 * patchy + rng.uniform(0.15, 0.3) * texture)
    eosin += rng.uniform(0.0, 0.2) * cytoplasm
    haem_bg = rng.uniform(0.06, 0.16) * (1.0 + 0.25 * patchy + 0.25 * texture)
    if rng.random() < 0.5:
        eosin += rng.uniform(0.4, 0.7) * _red_cells(rng, nuc, 0.5 * d)
    haem = rng.uniform(0.65, 1.1) * _nuclear_concentration(rng, nuc, rng.uniform(0.2, 0.45))
    eosin = np.where(nuc.fg, eosin * 0.6, eosin * tissue)
    conc = np.stack(
        [
            np.clip(haem_bg * tissue, 0, None) + haem,
            np.clip(eosin, 0, None),
            np.zeros(shape, np.float32),
        ],
        -1,
    )
    return _beer_lambert(rng, conc)


def _dab_grades(rng: np.random.Generator, n: int) -> np.ndarray:
    """Grade 0..3 per nucleus: a random positive fraction, then graded 1+/2+/3+."""
    positive = rng.random(n) < rng.uniform(0.15, 0.6)
    grades = rng.choice([1, 2, 3], n, p=rng.dirichlet([3.0, 3.0, 2.5]))
    return np.where(positive, grades, 0).astype(np.int64)


def _render_ihc(rng: np.random.Generator, nuc: _Nuclei) -> tuple[np.ndarray, np.ndarray]:
    shape = nuc.labels.shape
    grades = np.r_[0, _dab_grades(rng, nuc.n)]
    lo = np.array([DAB_OD_BANDS[g][0] for g in range(4)])[grades]
    hi = np.array([DAB_OD_BANDS[g][1] for g in range(4)])[grades]
    dab_level = rng.uniform(lo, hi)
    texture = _stroma(rng, shape)
    patchy = _smooth_noise(rng, shape, rng.uniform(20.0, 60.0))
    tissue = 1.0 - _vacuoles(rng, shape, rng.choice([0.0, rng.uniform(0.03, 0.15)], p=[0.5, 0.5]))
    haem_bg = rng.uniform(0.03, 0.08) * (1.0 + 0.35 * patchy + 0.3 * texture) * tissue
    dab_bg = rng.uniform(0.0, 0.03) * (1.0 + 0.5 * texture) * tissue
    conc = _nuclear_concentration(rng, nuc, rng.uniform(0.15, 0.35))
    haem_scale = nuc.per_label(np.where(grades > 0, 0.45, 1.0)) * rng.uniform(0.35, 0.7)
    granular = 1.0 + 0.15 * _fine_noise(rng, shape, 0.8)
    dab = nuc.per_label(dab_level) * granular * (0.92 + 0.16 * nuc.depth) * nuc.fg
    stains = np.stack(
        [
            np.clip(haem_bg, 0, None) + haem_scale * conc,
            np.zeros(shape, np.float32),
            np.clip(dab_bg, 0, None) * ~nuc.fg + dab,
        ],
        -1,
    )
    return _beer_lambert(rng, stains), grades


def _render_fluorescence(rng: np.random.Generator, nuc: _Nuclei) -> np.ndarray:
    """Emission in [0, 255]-ish grey: bright textured nuclei, dark uneven background."""
    shape = nuc.labels.shape
    h, w = shape
    n1 = nuc.n + 1
    bright = rng.lognormal(0.0, 0.4, n1) * np.where(rng.random(n1) < 0.05, 1.8, 1.0)  # mitoses
    dome = 0.55 + 0.45 * np.sqrt(nuc.depth)  # thicker centre
    texture = 1.0 + rng.uniform(0.1, 0.3) * _chromatin(rng, shape) - nuc.nucleoli(rng, 0.35, 0.45)
    signal = nuc.stain * nuc.per_label(bright) * dome * np.clip(texture, 0.2, None)
    haze = cv2.GaussianBlur(signal, (0, 0), rng.uniform(3.0, 8.0)) * rng.uniform(0.05, 0.2)
    level = rng.uniform(0.03, 0.12)
    background = level * (1.0 + 0.3 * _smooth_noise(rng, shape, rng.uniform(30.0, 80.0)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * (h * h + w * w))
    illumination = 1.0 - rng.uniform(0.1, 0.5) * r2
    emission = (np.clip(background, 0, None) + signal + haze) * illumination
    return emission * 255.0 * rng.uniform(0.35, 0.75)


def _acquire(rng: np.random.Generator, img: np.ndarray, brightfield: bool) -> np.ndarray:
    """Optics and sensor on ``(H, W)`` or ``(H, W, 3)`` float: Gaussian PSF (softer in part of
    the field half the time), shot + read noise, 8-bit quantisation, sometimes JPEG."""
    sharp = rng.uniform(0.5, 1.2) if brightfield else rng.uniform(0.6, 1.4)
    img_sharp = cv2.GaussianBlur(img, (0, 0), sharp, borderType=cv2.BORDER_REFLECT)
    if rng.random() < 0.5:  # the focal plane drifts across the field: part of it is softer
        soft = sharp + rng.uniform(0.4, 1.2)
        img_soft = cv2.GaussianBlur(img, (0, 0), soft, borderType=cv2.BORDER_REFLECT)
        where = 0.5 + 0.5 * np.tanh(
            2.0 * _smooth_noise(rng, img.shape[:2], 80.0) + rng.uniform(-1, 1)
        )
        if img.ndim == 3:
            where = where[..., None]
        img = img_sharp * (1.0 - where) + img_soft * where
    else:
        img = img_sharp
    gain = rng.uniform(0.2, 1.0) if brightfield else rng.uniform(0.3, 2.0)  # grey levels/photon
    img = np.clip(img, 0, None)
    if brightfield:  # hundreds of photons: the Gaussian limit of shot noise, 5x cheaper
        img += np.sqrt(img * gain) * rng.standard_normal(img.shape, dtype=np.float32)
    else:
        img = rng.poisson(img / gain).astype(np.float32) * gain
    read = rng.uniform(0.5, 2.5)
    if img.ndim == 3:  # demosaicing correlates a colour camera's channel noise
        img += rng.normal(0.0, read, img.shape[:2]).astype(np.float32)[..., None]
        read *= 0.5
    img += rng.normal(0.0, read, img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if rng.random() < (0.5 if brightfield else 0.2):
        quality = int(rng.integers(70, 96))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(out.shape)
    return out


def _grey_to_rgb(rng: np.random.Generator, grey: np.ndarray) -> np.ndarray:
    """``(H, W) uint8`` -> RGB: grey (R=G=B), or blue (DAPI pseudo-colour, a little cross-talk)."""
    if rng.random() < 0.6:
        return np.repeat(grey[..., None], 3, axis=-1)
    tint = np.array([rng.uniform(0, 0.15), rng.uniform(0.05, 0.3), 1.0], np.float32)
    return np.rint(grey[..., None] * tint).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# public API


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        shape = (int(size), int(size))
    else:
        shape = tuple(int(s) for s in size)
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"size must be an int or (height, width) of at least 16 px, got {size!r}")
    return shape  # type: ignore[return-value]


def synth_pair(
    kind: str,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    nuclei_density: float = DEFAULT_NUCLEI_DENSITY,
    mean_diameter_px: float = DEFAULT_DIAMETER_PX,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One synthetic image with its instance labels.

    ``size`` is ``H = W`` or ``(H, W)`` in pixels; ``nuclei_density`` the expected fraction of
    the image covered by nuclei and ``mean_diameter_px`` the mean nucleus diameter (each image
    varies around both). Returns

    - ``image``: ``(H, W, 3) uint8`` RGB (fluorescence: grey or blue content);
    - ``labels``: ``(H, W) int32``, 0 = background, 1..N, each label one 4-connected object of
      at least :data:`MIN_NUCLEUS_PX` pixels;
    - ``info``: ``kind``, ``n_nuclei`` (= N), ``mean_diameter_px`` (mean equivalent-circle
      diameter of the labels), ``foreground_fraction``, and for IHC ``dab_class``
      (``{label: 0|1|2|3}`` for every label) and ``positive_labels`` (grades 1..3); both are
      empty for other kinds.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0.0 < nuclei_density <= 0.8:
        raise ValueError(f"nuclei_density must be in (0, 0.8], got {nuclei_density}")
    if not 4.0 <= mean_diameter_px <= 200.0:
        raise ValueError(f"mean_diameter_px must be in [4, 200], got {mean_diameter_px}")
    shape = _shape(size)
    nuc = _Nuclei(rng, shape, nuclei_density, mean_diameter_px)
    dab_class: dict[int, int] = {}
    if kind == "he":
        image = _acquire(rng, _render_he(rng, nuc), brightfield=True)
    elif kind == "ihc":
        rgb, grades = _render_ihc(rng, nuc)
        image = _acquire(rng, rgb, brightfield=True)
        dab_class = {lab: int(grades[lab]) for lab in range(1, nuc.n + 1)}
    else:
        grey = _render_fluorescence(rng, nuc)
        image = _grey_to_rgb(rng, _acquire(rng, grey, brightfield=False))
    areas = np.bincount(nuc.labels.ravel(), minlength=nuc.n + 1)[1:]
    info: dict[str, Any] = {
        "kind": kind,
        "n_nuclei": nuc.n,
        "mean_diameter_px": float(np.mean(2.0 * np.sqrt(areas / np.pi))) if nuc.n else 0.0,
        "foreground_fraction": float(nuc.fg.mean()),
        "dab_class": dab_class,
        "positive_labels": [lab for lab, g in dab_class.items() if g > 0],
    }
    return np.ascontiguousarray(image), nuc.labels, info


def _image_seed(seed: int, split: str, kind: str, rank: int) -> list[int]:
    """Per-image seed from the image's rank among its split's images of its kind: adding
    images to one split or kind leaves the pixels of the others as they were."""
    return [int(seed), ("train", "test").index(split), KINDS.index(kind), int(rank)]


def make_dataset(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 24,
    n_test: int = 8,
    size: int = 256,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    cfg: DataConfig | None = None,
    pixel_size_um: float | None = 0.5,
) -> Path:
    """Write a synthetic dataset in the contract layout of :mod:`mlseg.dataset`; return its root.

    ``n_train``/``n_test`` images in all, kinds taken in turn; stems are ``<kind>_<NNN>``,
    numbered on across splits so no stem repeats. Masks are 16-bit PNG instance labels
    ``<stem><mask_suffix>.png``; ``manifest.csv`` has the columns :data:`MANIFEST_COLUMNS`.
    ``out_dir`` must not exist or be empty (else :class:`DatasetError`); bad counts, kinds or
    size raise :class:`ConfigError`. Each image is seeded from ``(seed, split, kind, rank)``, so
    the same arguments give the same bytes. ``pixel_size_um`` is recorded in the manifest
    (the default generator draws nuclei of ~6 um at 0.5 um/px). Everything is written
    into a hidden sibling folder that is renamed into place at the end, so a failure leaves
    nothing behind.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from mlseg.dataset import init_dataset, split_dir
    from mlseg.io import link_followed, staging_dir, write_image, write_labels, write_table

    cfg = cfg or DataConfig()
    out = Path(out_dir)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(
            f"synthetic kinds must be among {', '.join(KINDS)}; got {', '.join(kinds) or 'none'}"
        )
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ConfigError(
            f"need n_train, n_test >= 0 and at least one image; got {n_train}, {n_test}"
        )
    if not 16 <= size <= 8192:
        raise ConfigError(f"synthetic image size must be 16-8192 px; got {size}")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {seed}")
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise ConfigError(
            f"pixel_size_um must be positive (microns per pixel); got {pixel_size_um}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: folder is not empty; choose a new folder or empty this one")
    final = link_followed(out)
    tmp = staging_dir(final)
    try:
        init_dataset(tmp, cfg, final=out)
        numbers = dict.fromkeys(kinds, 0)  # stems number on across splits: no stem repeats
        rows = []
        plan = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
        # disable=None: a bar on a terminal, none in a log file
        for split, i in tqdm(plan, desc=f"synth {out.name}", unit="img", disable=None):
            kind = kinds[i % len(kinds)]
            stem = f"{kind}_{numbers[kind]:03d}"
            numbers[kind] += 1
            rng = np.random.default_rng(_image_seed(seed, split, kind, i // len(kinds)))
            image, labels, info = synth_pair(kind, size, rng)
            base = split_dir(tmp, cfg, split)
            img_path = write_image(base / cfg.image_dir / f"{stem}.png", image)
            mask_path = write_labels(base / cfg.mask_dir / f"{stem}{cfg.mask_suffix}.png", labels)
            rows.append(
                {
                    "split": split,
                    "stem": stem,
                    "image": img_path.relative_to(tmp).as_posix(),
                    "mask": mask_path.relative_to(tmp).as_posix(),
                    "kind": kind,
                    "n_nuclei": info["n_nuclei"],
                    "pixel_size_um": pixel_size_um,
                    "seed": seed,
                }
            )
        write_table(pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)), tmp / "manifest.csv")
        if final.exists():
            final.rmdir()  # empty (checked above); a directory cannot be renamed over another
        tmp.rename(final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        said = staged_write_error(err, tmp, out)
        if said is None:
            raise
        raise said from err
    return out
