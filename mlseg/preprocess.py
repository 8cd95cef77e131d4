"""Scale and intensity normalisation: the same steps in training and inference.

:func:`normalize` is the one function both call on every image, after :func:`rescale` has
brought it to the model's pixel size. It chains, as :class:`~mlseg.config.PreprocessConfig`
asks: stain normalisation (Reinhard, Macenko; H&E/IHC RGB only), histogram alignment
(global equalisation, CLAHE, or matching to a reference image) and intensity normalisation
(percentiles or z-score, per channel). Every step is also a pure function of its own.

Conventions: images are ``(H, W, C)`` arrays. The steps take ``uint8``/``uint16`` or float
images in [0, 1] and return ``float32`` in [0, 1] (the intensity normalisations return
unbounded ``float32``). Colour steps work on the lightness channel of CIELAB so that hues
are kept.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import cv2
import numpy as np

from mlseg.config import PreprocessConfig
from mlseg.errors import ConfigError
from mlseg.io import full_scale, read_image_for

# Macenko et al. 2009 reference H&E optical-density vectors (columns: H, E) and the 99th
# percentile concentrations, as published with their reference implementation.
MACENKO_REF_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], np.float64)
MACENKO_REF_MAX_CONC = np.array([1.9705, 1.0308], np.float64)
OD_EPS = 1.0 / 255.0  # the smallest intensity optical density is taken of (one 8-bit step)
#: The optical density of a pixel at or below 8 of 255 in every channel: black, not stain
#: (H&E tissue is never that dark: in GBM40's and CPM15's 55 tiles, one dead pixel is). A
#: JPEG's black fill is not all 0s: its blocks beside tissue ring a few steps above.
BLACK_OD = float(-np.log(8.0 / 255.0))
#: Stain vectors closer than this (degrees) are one colour, not two stains: a field of one
#: colour (pink, black, a scanner's fill) gives two equal vectors. Real H&E and IHC tiles
#: give 14-36 degrees (GBM40, CPM15, scikit-image's IHC).
MIN_STAIN_ANGLE_DEG = 5.0
#: Pixels Macenko estimates stains from: a larger image is sampled on a regular grid, as
#: HistomicsTK samples them (a 2048 x 2048 mosaic: the same stains, 5.6x faster).
MACENKO_SAMPLE_PIXELS = 2**20
#: Pixels :func:`macenko` converts at a time (float64 temporaries of about 130 bytes each).
MACENKO_CHUNK_PIXELS = 2**18
#: Pixels :func:`reinhard` tests for stain at a time (float64 optical densities).
REINHARD_CHUNK_PIXELS = 2**16
#: :func:`macenko`'s ``stains`` when the caller has no estimate: the image's are estimated.
ESTIMATE = "estimate"
#: Fewer stained pixels than this (:func:`stained`) are too few to take stains or colour
#: statistics from.
MIN_STAINED_PIXELS = 100


# ----------------------------------------------------------------------------- helpers
def to_float(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8/uint16 (divided by :func:`mlseg.io.full_scale`) or float ->
    float32 [0, 1]."""
    image = np.asarray(image)
    if image.dtype.type in (np.uint8, np.uint16):  # big-endian (">u2") too, not taken as 0-65535
        return image.astype(np.float32) / np.float32(full_scale(image))
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    if np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        return image.astype(np.float32)
    raise TypeError(f"unsupported image dtype {image.dtype}")


def _hwc(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    return image


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grey -> RGB by repetition, RGB -> grey by the mean; ``(H, W, C)`` -> ``(H, W, channels)``."""
    image = _hwc(image)
    c = image.shape[2]
    if c == channels:
        return image
    if c == 1:
        return np.repeat(image, channels, axis=2)
    if channels == 1:
        return image.mean(axis=2, keepdims=True).astype(image.dtype)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def one_channel_as_grey(image: np.ndarray) -> np.ndarray:
    """An RGB fluorescence image of one channel shown in a colour (DAPI exported as blue
    RGB, or in cyan: the other channels empty or copies of it) -> ``(H, W, 1)``, that
    channel; any other image as it is. The model then sees it as the same picture saved
    grey, fluorescence's usual form (DSB 2018's fluorescence tiles are grey in RGB): fed
    as blue alone, six synthetic 12-bit DAPI fields lost Dice from 0.97-0.99 to 0.74-0.87
    with a small model trained on their grey files. A composite of different channels
    (DAPI and markers) is left alone."""
    image = _hwc(image)
    if image.shape[2] != 3:
        return image
    lit = [image[..., c] for c in range(3) if image[..., c].any()]
    if lit and all(_same(lit[0], other) for other in lit[1:]):
        return np.ascontiguousarray(lit[0][..., None])
    return image


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two channels are equal; a sample first, where colour images already differ
    (comparing all of a 16-megapixel image took 0.05 s)."""
    return np.array_equal(a[::16, ::16], b[::16, ::16]) and np.array_equal(a, b)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """float32 RGB [0, 1] -> CIELAB (L in [0, 100])."""
    return cv2.cvtColor(np.ascontiguousarray(np.clip(rgb, 0, 1), np.float32), cv2.COLOR_RGB2LAB)


def _rgb(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32, copy=False), cv2.COLOR_LAB2RGB)
    return np.clip(rgb, 0.0, 1.0, out=rgb)


def _on_lightness(image: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn`` ((H, W) float [0, 1] -> same) to grey images or to L of RGB images."""
    x = _hwc(to_float(image))
    if x.shape[2] == 3:
        lab = _lab(x)
        lab[..., 0] = np.clip(fn(lab[..., 0] / 100.0), 0, 1) * 100.0
        return _rgb(lab)
    return np.stack([np.clip(fn(x[..., i]), 0, 1) for i in range(x.shape[2])], axis=2).astype(
        np.float32
    )


# ----------------------------------------------------------------------------- scale
def _out_size(n: int, factor: float) -> int:
    return max(1, int(round(n * factor)))


def rescale(
    image: np.ndarray, from_um: float | None, to_um: float | None, order: int = 1
) -> np.ndarray:
    """Resample an image from ``from_um`` to ``to_um`` microns per pixel.

    ``(H, W, C)`` or ``(H, W)`` of any dtype OpenCV resizes (uint8, uint16, float32) ->
    same dtype and channels, size ``round(H * from_um / to_um)``. ``order``: 0 nearest,
    1 linear, 3 cubic; downsampling with order >= 1 averages (area) to avoid aliasing.
    Returns the input unchanged when either size is unknown or they are equal.
    """
    if from_um is None or to_um is None or np.isclose(from_um, to_um, rtol=1e-6):
        return image
    factor = float(from_um) / float(to_um)
    h, w = image.shape[:2]
    size = (_out_size(w, factor), _out_size(h, factor))
    if order == 0:
        flags = cv2.INTER_NEAREST
    elif factor < 1:
        flags = cv2.INTER_AREA
    else:
        flags = cv2.INTER_CUBIC if order >= 3 else cv2.INTER_LINEAR
    out = cv2.resize(image, size, interpolation=flags)
    if image.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def rescale_image(image: np.ndarray, from_um: float | None, to_um: float | None) -> np.ndarray:
    """:func:`rescale` for an image on its way to :func:`normalize`: a uint16 one is scaled to
    float32 [0, 1] of its stored full scale first, since its bit depth is judged on its
    values (:func:`mlseg.io.full_scale`) and resampling averages the brightest ones down."""
    if from_um is None or to_um is None or np.isclose(from_um, to_um, rtol=1e-6):
        return image
    return rescale(to_float(image) if image.dtype == np.uint16 else image, from_um, to_um)


def rescale_labels(labels: np.ndarray, from_um: float | None, to_um: float | None) -> np.ndarray:
    """Nearest-neighbour resampling of an ``(H, W)`` label image (any integer dtype, kept).

    Output size matches :func:`rescale` for the same arguments; labels are never blended.
    """
    if from_um is None or to_um is None or np.isclose(from_um, to_um, rtol=1e-6):
        return labels
    factor = float(from_um) / float(to_um)
    h, w = labels.shape[:2]
    return resize_labels(labels, (_out_size(h, factor), _out_size(w, factor)))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W)`` label image to exactly ``shape`` (rows, cols)."""
    h, w = labels.shape[:2]
    oh, ow = int(shape[0]), int(shape[1])
    if (oh, ow) == (h, w):
        return labels
    rows = np.minimum(((np.arange(oh) + 0.5) * (h / oh)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * (w / ow)).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------- histograms
def _equalize_channel(x: np.ndarray, nbins: int = 4096) -> np.ndarray:
    hist, edges = np.histogram(x, bins=nbins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    if cdf[-1] == 0:
        return x
    cdf /= cdf[-1]
    centers = (edges[:-1] + edges[1:]) / 2
    return np.interp(x, centers, cdf).astype(np.float32)


def equalize_hist(image: np.ndarray, nbins: int = 4096) -> np.ndarray:
    """Global histogram equalisation; ``(H, W, C)`` -> float32 [0, 1].

    Grey channels are equalised each; RGB images on their CIELAB lightness (hue kept).
    """
    return _on_lightness(image, functools.partial(_equalize_channel, nbins=nbins))


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV); -> float32 [0, 1].

    ``clip_limit`` is OpenCV's, relative to the mean count of 256 bins; ``tile_grid`` tiles
    per side. The lightness is equalised at 8 bits (a 16-bit image's stretched to its own
    range first): on 16 bits OpenCV spreads a tile over 65,536 bins, its clip limit rounds to
    one count per bin whatever ``clip_limit`` says, and the setting did nothing.
    """
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))

    stretch = np.asarray(image).dtype == np.uint16

    def fn(ch: np.ndarray) -> np.ndarray:
        ch = np.clip(ch, 0, 1)
        if stretch:  # a dim 16-bit image quantised as is would keep a few dozen levels
            lo, hi = float(ch.min()), float(ch.max())
            ch = (ch - lo) / max(hi - lo, 1e-12)
        u8 = np.round(ch * 255).astype(np.uint8)
        return op.apply(u8).astype(np.float32) / 255.0

    return _on_lightness(image, fn)


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map each channel's intensity distribution onto the reference's; -> float32 [0, 1].

    ``image`` and ``reference`` are ``(H, W, C)`` with equal ``C`` (sizes may differ).
    """
    x, ref = _hwc(to_float(image)), _hwc(to_float(reference))
    if x.shape[2] != ref.shape[2]:
        raise ValueError(f"image has {x.shape[2]} channels, reference {ref.shape[2]}")
    out = np.empty_like(x)
    for c in range(x.shape[2]):
        src_values, src_idx, src_counts = np.unique(
            x[..., c].ravel(), return_inverse=True, return_counts=True
        )
        ref_values, ref_counts = np.unique(ref[..., c].ravel(), return_counts=True)
        src_q = np.cumsum(src_counts) / x[..., c].size
        ref_q = np.cumsum(ref_counts) / ref[..., c].size
        out[..., c] = np.interp(src_q, ref_q, ref_values)[src_idx].reshape(x.shape[:2])
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- stains
def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel CIELAB mean and standard deviation of an RGB image's tissue (its
    :func:`stained` pixels, dense in one channel at least; all its pixels where fewer than
    :data:`MIN_STAINED_PIXELS` are): Reinhard's target."""
    x = _hwc(to_float(image))
    return _stained_lab_stats(x, _lab(x))


def _stained_lab_stats(x: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB mean and standard deviation (float64) of the tissue of ``x`` ``(H, W, 3)``
    float [0, 1], whose CIELAB is ``lab``. Over all its pixels, a tile that was 3% tissue
    (GBM40, CPM15) took the glass's statistics: the glass came out the reference's pink
    and the tissue 52-64 delta-E from the same tile alone. Tissue is :func:`stained` in
    one channel at least: pale eosin (red near 230) is dense in green alone, and with
    Macenko's every channel half of a CPM15 tile's tissue was left out of its statistics,
    its colours moved 5.9 delta-E on the tiles without glass, against 1.4."""
    pixels, flat = lab.reshape(-1, 3), x.reshape(-1, 3)
    mask = np.empty(len(flat), bool)
    # in runs: a float64 optical density of the whole image would be 24 bytes a pixel more
    for start in range(0, len(flat), REINHARD_CHUNK_PIXELS):
        run = slice(start, start + REINHARD_CHUNK_PIXELS)
        mask[run] = stained(optical_density(flat[run]), every_channel=False)
    # where= rather than a copy of the tissue's pixels: 12 bytes a pixel less
    where = mask[:, None] if np.count_nonzero(mask) >= MIN_STAINED_PIXELS else True
    mean = pixels.mean(axis=0, dtype=np.float64, where=where)
    return mean, pixels.std(axis=0, dtype=np.float64, where=where)


def reinhard(image: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray) -> np.ndarray:
    """Reinhard et al. 2001 colour transfer: match CIELAB mean/std to the target's.

    ``(H, W, 3)`` RGB -> float32 [0, 1] RGB. Targets come from :func:`lab_stats` of a
    reference image. The image's own mean and standard deviation are its tissue's
    (:func:`lab_stats`), as HistomicsTK's ``mask_out`` takes them, so the same tissue is
    normalised alike however much glass is around it; every pixel is then mapped with
    them, glass too, as the tissue's palest pixels are: left as it was, the glass would
    border tissue mapped by the same rule a shade away from it.
    """
    x = _hwc(to_float(image))
    if x.shape[2] != 3:
        raise ValueError("Reinhard normalisation needs an RGB image")
    lab = _lab(x)
    # statistics in float64, the transfer in place in float32: float64 copies of a large
    # image took 84 bytes a pixel
    mean, std = _stained_lab_stats(x, lab)
    gain = np.asarray(target_std) / np.maximum(std, 1e-6)
    lab *= gain.astype(np.float32)
    lab += (np.asarray(target_mean) - mean * gain).astype(np.float32)
    return _rgb(lab)


def optical_density(image: np.ndarray) -> np.ndarray:
    """RGB [0, 1] (or uint) -> optical density ``-log(I)``, ``(H, W, 3)`` float64 >= 0."""
    x = to_float(image).astype(np.float64)
    return -np.log(np.clip(x, OD_EPS, 1.0))


def stain_concentrations(stains: np.ndarray, od: np.ndarray) -> np.ndarray:
    """Least-squares concentrations ``(2, N)`` of ``stains`` ``(3, 2)`` (two independent
    columns) in optical densities ``od`` ``(N, 3)``: one product with their pseudo-inverse.
    ``np.linalg.lstsq`` gives the same image but took 0.13-0.45 s of CPU a megapixel, 20-30x
    longer (a 2048 x 2048 tile's Macenko 3.2 s against 1.3-1.7 s; a 64 x 64 tile's 17 ms
    against 4)."""
    return np.linalg.pinv(stains) @ od.T


def stained(od: np.ndarray, beta: float = 0.15, *, every_channel: bool = True) -> np.ndarray:
    """Which optical densities ``od`` ``(N, 3)`` are of stained tissue, ``(N,)`` bool:
    above ``beta`` in every channel (glass is not), or in one at least with
    ``every_channel=False``, and not black (below :data:`BLACK_OD` in some channel). Black
    in every channel (a scanner's fill, a tile padded with zeros at the slide's edge) is
    grey, no stain: a strip of 2% of a GBM40 tile, taken as stained, turned Macenko's eosin
    vector grey and its 99th percentile 7x, and the tissue lost its eosin."""
    dense = np.all(od > beta, axis=1) if every_channel else np.any(od > beta, axis=1)
    return dense & np.any(od < BLACK_OD, axis=1)


def macenko_stains(
    image: np.ndarray, beta: float = 0.15, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Estimate H&E stain vectors and 99th-percentile concentrations (Macenko et al. 2009):
    :func:`macenko_estimate`'s estimate, without the reason it made none."""
    return macenko_estimate(image, beta, alpha)[0]


#: Why :func:`macenko_estimate` made no estimate, by its ``reason``, as a warning says it.
NO_ESTIMATE = {
    "few": f"fewer than {MIN_STAINED_PIXELS} pixels stained in every channel",
    "one_colour": "its stained pixels hold one colour only (a single stain, or a field of one "
    "colour)",
    "no_haematoxylin": "no haematoxylin among its stains",
}


def macenko_estimate(
    image: np.ndarray, beta: float = 0.15, alpha: float = 1.0
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
    """Estimate H&E stain vectors and 99th-percentile concentrations (Macenko et al. 2009),
    with the reason there is none: ``(estimate, None)`` or ``(None, reason)``, ``reason`` a
    key of :data:`NO_ESTIMATE`. A haematoxylin-only smear of thousands of stained pixels
    (``one_colour``) was warned of as if it had too little stain, a faded slide's warning.

    The estimate is ``(stains (3, 2) float64 unit columns H then E, max_conc (2,))``; there
    is none (``few``) when fewer than :data:`MIN_STAINED_PIXELS` pixels (of at most
    :data:`MACENKO_SAMPLE_PIXELS`, sampled on a regular grid) are :func:`stained` (optical
    density above ``beta`` in every channel, and not black)
    or (``one_colour``) the stained pixels hold one colour only (the two vectors within
    :data:`MIN_STAIN_ANGLE_DEG`): mapped to the reference's two stains at their 99th
    percentiles, a uniform pink or black field came out the dark purple of a dense nucleus.
    None too (``no_haematoxylin``) where they hold no haematoxylin (the vector nearer the reference
    haematoxylin is nearer its eosin, and nearer it than the other vector is).
    Both come from the stained pixels alone, so the same tissue is normalised alike however
    much glass is around it (the reference implementation took the percentile over all
    pixels, glass included).
    """
    image = _hwc(image)
    step = math.ceil(math.sqrt(image.shape[0] * image.shape[1] / MACENKO_SAMPLE_PIXELS))
    if step > 1:
        image = image[::step, ::step]
    od = optical_density(image).reshape(-1, 3)
    tissue = od[stained(od, beta)]
    if len(tissue) < MIN_STAINED_PIXELS:
        return None, "few"
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]  # the two largest eigenvalues (eigh sorts ascending)
    proj = tissue @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = v1 * np.sign(v1.sum() or 1.0), v2 * np.sign(v2.sum() or 1.0)
    v1, v2 = v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2)
    if np.degrees(np.arccos(np.clip(v1 @ v2, -1.0, 1.0))) < MIN_STAIN_ANGLE_DEG:
        return None, "one_colour"
    # Haematoxylin is the vector closer to the reference haematoxylin. The usual rule (the
    # larger red component) fails on haematoxylin-only slides with a yellowish background:
    # the background's blue-absorbing vector wins and nuclei come out pink.
    ref_h, ref_e = (MACENKO_REF_STAINS / np.linalg.norm(MACENKO_REF_STAINS, axis=0)).T
    stains = np.stack([v1, v2], axis=1) if v1 @ ref_h >= v2 @ ref_h else np.stack([v2, v1], axis=1)
    # No haematoxylin (red cells, an eosinophilic field with hardly a nucleus): the vector
    # taken for it is nearer eosin than haematoxylin, and nearer eosin than the other one.
    # Rendered as haematoxylin, the tile's eosin came out the purple of nuclei: GBM40 and
    # CPM15 tiles with a tenth of their haematoxylin held as much of it in the stroma as in
    # the nuclei. Real haematoxylin lies 2-10 degrees from the reference's and 15 or more
    # from its eosin (GBM40, CPM15, scikit-image's IHC).
    h, e = stains.T
    if h @ ref_e > max(h @ ref_h, e @ ref_e):
        return None, "no_haematoxylin"
    # over the stained pixels only, as the vectors: on a tile that is mostly glass the 99th
    # percentile of all pixels is glass's (near 0), and the gain blackened the tissue
    conc = stain_concentrations(stains, tissue)
    return (stains, np.percentile(conc, 99, axis=1)), None


def macenko(
    image: np.ndarray,
    ref_stains: np.ndarray = MACENKO_REF_STAINS,
    ref_max_conc: np.ndarray = MACENKO_REF_MAX_CONC,
    *,
    nuclear_dab: bool = False,
    stains: tuple[np.ndarray, np.ndarray] | None | str = ESTIMATE,
) -> np.ndarray:
    """Macenko stain normalisation to reference stain vectors and concentrations.

    ``(H, W, 3)`` RGB -> float32 [0, 1] RGB. Images with too little stained tissue to
    estimate stains (see :func:`macenko_stains`) are returned unchanged (as float).

    On an IHC slide the second stain found is DAB, which takes eosin's place. With
    ``nuclear_dab`` (a nuclear marker) each pixel's haematoxylin also becomes the stronger of
    its haematoxylin and its DAB, both normalised alike (99th percentile to the reference
    haematoxylin's): a strongly positive nucleus, whose DAB hides its counterstain, stays as
    dark as a nucleus, where as eosin alone it would look like cytoplasm to a model that
    learnt nuclei from H&E.

    ``stains``: the image's own :func:`macenko_stains` of ``to_float(image)`` where the
    caller has made it already (segmentation makes it to warn about unstained images), so
    it is not made twice; :data:`ESTIMATE` (the default) makes it here.
    """
    x = _hwc(np.asarray(image))
    if x.shape[2] != 3:
        raise ValueError("Macenko normalisation needs an RGB image")
    if isinstance(stains, str):
        # a 16-bit image by its full scale, not by its sample's (as normalize sees it)
        est = macenko_stains(to_float(x) if x.dtype.type is np.uint16 else x)
    else:
        est = stains
    if est is None:
        out = to_float(x)
        return out.copy() if out is x else out
    stains, max_conc = est
    gain = np.asarray(ref_max_conc) / np.maximum(max_conc, 1e-6)
    # an integer image is scaled run by run, by the full scale of the whole: a float32 copy
    # of it beside the output held a 16,384 x 16,384 field twice (3.2 GB more at the peak)
    white = np.float32(full_scale(x)) if x.dtype.type in (np.uint8, np.uint16) else None
    pixels = x.reshape(-1, 3)
    out = np.empty(pixels.shape, np.float32)
    # in runs of pixels: the float64 temporaries of a whole 6000 x 6000 image took 4.4 GB
    for start in range(0, len(pixels), MACENKO_CHUNK_PIXELS):
        run = slice(start, start + MACENKO_CHUNK_PIXELS)
        chunk = pixels[run] if white is None else pixels[run].astype(np.float32) / white
        conc = stain_concentrations(stains, optical_density(chunk))
        out_conc = conc * gain[:, None]
        if nuclear_dab:
            dab = np.clip(conc[1], 0, None) * (ref_max_conc[0] / max(max_conc[1], 1e-6))
            out_conc[0] = np.maximum(out_conc[0], dab)
        out[run] = np.clip(np.exp(-(np.asarray(ref_stains) @ out_conc)).T, 0, 1)
    return out.reshape(x.shape)


def own_stains(
    image: np.ndarray, cfg: PreprocessConfig, stain: str
) -> tuple[tuple[np.ndarray, np.ndarray] | None | str, str | None]:
    """``(stains, reason)``: the ``stains`` argument of :func:`normalize` for ``image`` as
    read (uint8/uint16) and why there is none. ``stains`` is its :func:`macenko_estimate`,
    ``None`` where either method leaves it as it is (``reason`` a key of
    :data:`NO_ESTIMATE`), or :data:`ESTIMATE` where stain normalisation does not apply
    (none configured, not H&E/IHC, not RGB)."""
    image = np.asarray(image)
    rgb = image.ndim == 3 and image.shape[2] == 3
    if cfg.stain_norm == "none" or stain not in ("he", "ihc") or not rgb:
        return ESTIMATE, None
    # as normalize sees it: a 16-bit image by its full scale, not by its sample's
    return macenko_estimate(to_float(image) if image.dtype == np.uint16 else image)


# ----------------------------------------------------------------------------- intensity
def percentile_norm(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Per channel ``(x - p_low) / (p_high - p_low)``; ``(H, W, C)`` -> float32, not clipped."""
    x = _hwc(to_float(image))
    lo = np.percentile(x, low, axis=(0, 1), keepdims=True)
    hi = np.percentile(x, high, axis=(0, 1), keepdims=True)
    return ((x - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)


def zscore(image: np.ndarray) -> np.ndarray:
    """Per channel zero mean, unit variance; ``(H, W, C)`` -> float32."""
    x = _hwc(to_float(image))
    mean = x.mean(axis=(0, 1), keepdims=True)
    std = x.std(axis=(0, 1), keepdims=True)
    return ((x - mean) / np.maximum(std, 1e-6)).astype(np.float32)


# ----------------------------------------------------------------------------- pipeline
@functools.lru_cache(maxsize=8)
def _reference(path: str, mtime: float, stain: str | None = None) -> np.ndarray:
    return to_float(read_image_for(path, stain))


def reference_image(path: Path, stain: str | None = None) -> np.ndarray:
    """The reference image of ``preprocess.stain_reference`` as float32 [0, 1], cached; an
    RGBA one read as the images of ``stain`` are (:func:`mlseg.io.read_image_for`)."""
    path = Path(path)
    if not path.is_file():  # a config's relative path is not read from its own folder
        where = (
            ""
            if path.is_absolute()
            else f" (a relative path is read from the current folder, {Path.cwd()})"
        )
        raise ConfigError(f"{path}: preprocess.stain_reference image not found{where}")
    return _reference(str(path), path.stat().st_mtime, stain)


@functools.lru_cache(maxsize=8)
def _reference_stains(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray] | None:
    return macenko_stains(_reference(path, mtime))


def macenko_target(cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """What Macenko normalisation maps every image to: ``(stains (3, 2) float64, unit
    columns H then E; max_conc (2,))`` of ``preprocess.stain_reference`` (estimated once per
    file), or the published reference without one."""
    if cfg.stain_reference is None:
        return MACENKO_REF_STAINS, MACENKO_REF_MAX_CONC
    return _stained_reference(Path(cfg.stain_reference))


def _stained_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The stains of a stain reference image, or a ConfigError naming it where it has too
    little stain (blank glass, one colour) to normalise any image to."""
    reference_image(path)  # a missing file is a ConfigError naming it
    target = _reference_stains(str(path), path.stat().st_mtime)
    if target is None:
        raise ConfigError(
            f"{path}: preprocess.stain_reference has too little stained tissue to estimate "
            "its haematoxylin and eosin (fewer than 100 stained pixels, one colour only, or no "
            "haematoxylin); choose a reference image that is mostly tissue"
        )
    return target


def _needs_reference(cfg: PreprocessConfig, what: str, stain: str) -> np.ndarray:
    if cfg.stain_reference is None:
        raise ConfigError(
            f"preprocess: {what} needs a reference image; set preprocess.stain_reference "
            "to an image of the target appearance"
        )
    return reference_image(cfg.stain_reference, stain)


def normalize(
    image: np.ndarray,
    cfg: PreprocessConfig,
    stain: str = "he",
    *,
    channels: int | None = None,
    stains: tuple[np.ndarray, np.ndarray] | None | str = ESTIMATE,
) -> np.ndarray:
    """The model input for one (already rescaled) image.

    ``(H, W, C)`` uint8/uint16, or float already in [0, 1] -> ``(H, W, C')`` float32, where
    ``C' = channels`` if given (grey repeated to RGB or RGB averaged to grey first;
    fluorescence of one channel shown in colour taken as grey, :func:`one_channel_as_grey`)
    else ``C``. Steps, in order and each only if configured: stain normalisation (``stain``
    "he"/"ihc" RGB images only; an image with too little stain for :func:`macenko_stains`,
    such as blank glass, is left as it is by Reinhard's as by Macenko's), histogram
    alignment, intensity normalisation. With nothing configured the result is a uint8/uint16
    image scaled to [0, 1] (by :func:`mlseg.io.full_scale`) and a float image as it is: one
    of 0-255 is not scaled (:func:`mlseg.segment.image_array` refuses it before inference).
    Other integer types (int32, int64) raise ValueError: they passed through unscaled.
    ``stains``: see :func:`macenko`.
    """
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer) and image.dtype.type not in (np.uint8, np.uint16):
        raise ValueError(
            f"expected a uint8 or uint16 image (or float in [0, 1]), got {image.dtype}; convert "
            "it, e.g. image.astype(np.uint8) where it holds 0-255"
        )
    # converted to float32 [0, 1] where a step needs it: Macenko converts an integer image
    # run by run, and a float32 copy of it beside Macenko's output held a large one twice
    x = _hwc(image)
    if channels is not None and (stain == "fluorescence" or x.shape[2] != channels):
        x = to_float(x)
        if stain == "fluorescence":
            x = one_channel_as_grey(x)
        x = match_channels(x, channels)
    if cfg.stain_norm != "none":
        if x.shape[2] != 3 or stain not in ("he", "ihc"):
            raise ConfigError(
                f"preprocess.stain_norm={cfg.stain_norm!r} applies to RGB H&E/IHC images only "
                f"(got {x.shape[2]} channel(s), stain {stain!r}); set it to 'none'"
            )
        if cfg.stain_norm == "reinhard":
            x = to_float(x)
            # as Macenko, an image with too little stain is left as it is: matched to the
            # reference's spread, glass's noise came out as tissue and a blank field as the
            # dark purple of a nucleus
            target = lab_stats(_needs_reference(cfg, "reinhard", stain))
            # a reference of glass has glass's spread: every image came out one flat colour
            _stained_reference(Path(cfg.stain_reference))
            if (macenko_stains(x) if isinstance(stains, str) else stains) is not None:
                x = reinhard(x, *target)
        else:
            nuclear_dab = stain == "ihc" and cfg.ihc_dab == "nucleus"
            x = macenko(x, *macenko_target(cfg), nuclear_dab=nuclear_dab, stains=stains)
    x = to_float(x)
    if cfg.equalize == "hist":
        x = equalize_hist(x)
    elif cfg.equalize == "clahe":
        x = clahe(x, cfg.clahe_clip_limit, cfg.clahe_tile_grid)
    elif cfg.equalize == "match":
        reference = _needs_reference(cfg, "equalize=match", stain)
        x = match_histograms(x, match_channels(reference, x.shape[2]))
    if cfg.intensity_norm == "percentile":
        x = percentile_norm(x, *cfg.percentiles)
    elif cfg.intensity_norm == "zscore":
        x = zscore(x)
    return np.ascontiguousarray(x, dtype=np.float32)
