"""Scale estimation: bring an image of unknown pixel size to the model's training scale.

A U-Net learns nuclei of the size it was trained on; nuclei twice as large (a 40x slide
for a 20x model) are split or missed. When the pixel size of both the image and the model
is known, :func:`mlseg.segment.predict_labels` simply resamples by their ratio. When it is
not, the size of the nuclei themselves tells the scale, the idea of Cellpose's size model
(Stringer et al. 2021, ``diam_mean`` / ``SizeModel``), here without a second network:

1. predict at the native scale (first pass) -> instance labels;
2. ``estimated`` = median equivalent diameter of those objects, fragments left out
   (:func:`nucleus_diameter_px`); none where most objects are cut by the image's edge
   (:func:`image_diameter_px`);
3. ``reference`` = the same statistic over the model's training masks at training scale
   (stored at training time in the checkpoint's ``meta.json`` as ``nucleus_diameter_px``,
   with ``nucleus_diameter_stat``);
4. factor = ``reference / estimated`` (:func:`scale_factor`: clipped, 1.0 within a
   tolerance); when it is not 1, resample the image by it, predict again and map the
   result back to the original grid (probabilities linearly, labels nearest).

The first pass is biased towards the training size (the model tends to split large nuclei
and miss small ones), so the estimate is refined by repeating steps 2-4 on the rescaled
result up to ``passes`` times. Images with fewer than ``min_objects`` nuclei in the first
pass, or with most of them cut by the image's edge, keep the native scale.

Fragments left out: a first pass on an image the model half understands finds the real
nuclei plus a swarm of small pieces (chromatin, debris, vacuole rims). Counted per object,
the swarm decides the median and asks for a 3-4x enlargement, which then multiplies the
pieces. Weighted by area instead, the pieces weigh what they cover, but merged clumps of
nuclei weigh a lot and ask for shrinking, which merges more. So the median is taken per
object over the objects at least ``FRAGMENT_RATIO`` (0.5) of the area-weighted median
diameter: any number of pieces narrower than half a typical nucleus is ignored, and
clumps change the result only when they cover more nucleus area than the single nuclei.
On the first passes of ``bench/robustness.py`` (cpm15 and dsb2018 tiles), the per-object
median asked for 3.1-3.6x on two 40x tiles whose annotated nuclei need 0.9-1.0x, and the
area-weighted median asked for 1.05-1.08x on two tiles of merged nuclei that need about
1.45x; this statistic gave 0.92-0.98x and 1.27-1.38x (chosen among these three after
seeing those tiles; the 0.5 was set beforehand, not tuned). Models saved before it (no
``nucleus_diameter_stat``) keep the per-object median, so reference and estimate agree.

Plausibility check: nuclei have one physical size, so resampling the image must not change
their size on the original grid. On an image the model does not understand (another
stain, tissue it was not trained on) it cuts texture or chromatin into pieces of roughly
the size it prefers in its own pixels, whatever the input scale: enlarging such an image
makes the pieces smaller on the original grid and only multiplies them (counts grew 5-10x
on such tiles in ``bench/robustness.py``). A rescaled pass whose median diameter, mapped
back to the original grid, is below ``min_size_ratio`` (default 0.75) of the native
pass's is therefore rejected. The last plausible pass is returned. If there is none, the
native scale is kept and marked ``source="rejected"``. Where the scale was right, the ratio
stayed at 0.95-1.1 on those tiles; where enlarging fragmented nuclei, it fell to 0.3-0.65.
A rescaled pass with most of its objects on the edge gives no estimate to refine from,
yet is judged by all of them and kept if plausible: shrinking joins the pieces a native
pass cut large nuclei into, so fewer objects remain and those on the edge become most.
Rejected, the halves were kept at native scale on 9 of 40 GBM40 tiles and 7-10 of 34-44
DSB2018 tiles enlarged 2-3x and cropped to their size (annotated nuclei, halved natively).

All functions here are pure (arrays in, numbers/arrays out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

MIN_OBJECTS = 5  # fewer detected nuclei give no trustworthy size estimate
META_KEY = "nucleus_diameter_px"
META_STAT_KEY = "nucleus_diameter_stat"  # which statistic META_KEY holds
STATISTIC = "trimmed"  # what new checkpoints record
STATISTICS = (STATISTIC, "median")  # "median": checkpoints saved before the statistic
FRAGMENT_RATIO = 0.5  # objects narrower than this x the area-weighted median: fragments
#: Share of an image's objects cut by its edge above which its nuclei give no scale estimate
#: (:func:`image_diameter_px`): 0.09-0.22 of the nuclei of the GBM40 and CPM15 tiles.
EDGE_SHARE = 0.5


#: The factors an estimated scale is clipped to: from a quarter to four times the image's
#: own size (10x to 160x for a model trained at 40x).
SCALE_LIMITS = (0.25, 4.0)
#: Relative difference of two scales that counts as the same scale: a scale estimate within
#: it of the model's is not resampled (:func:`scale_factor`: nuclei measured 15% off are
#: noise, not another magnification, whose steps are 1.5x or more), and ``mlseg monitor``
#: neither calls a declared pixel size within it of the training sizes another
#: magnification (a second scanner's 0.2527 um against 0.25 um) nor counts a resampling
#: within it as a batch at another scale.
SCALE_TOLERANCE = 0.15


def statistic_of(meta: dict) -> str:
    """The statistic a checkpoint's reference diameter was computed with: ``trimmed``, or
    ``median`` for models saved before ``nucleus_diameter_stat`` was recorded."""
    stat = meta.get(META_STAT_KEY)
    return stat if stat in STATISTICS else "median"


def _diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameters ``sqrt(4 area / pi)`` of the objects of 3 or more pixels."""
    flat = np.asarray(labels).ravel()
    nuclei = flat[flat > 0]
    # counted by id, a table as long as the largest: a tile of a slide's label image keeps
    # ids up to 2**31 - 1 (17 GB for one 256 x 256 mask); there only the ids present count
    if nuclei.size and nuclei.max() > flat.size:
        areas = np.unique(nuclei, return_counts=True)[1]
    else:
        areas = np.bincount(nuclei)
    return np.sqrt(4.0 * areas[areas >= 3] / math.pi)


def _typical(diameters: np.ndarray, statistic: str) -> float:
    """``median``: over objects. ``trimmed``: over the objects at least ``FRAGMENT_RATIO``
    of the area-weighted median diameter (see the module docstring)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if statistic == "trimmed":
        order = np.sort(diameters)
        cumulative = np.cumsum(order**2)  # area, up to a constant
        area_median = order[np.searchsorted(cumulative, cumulative[-1] / 2.0)]
        diameters = order[order >= FRAGMENT_RATIO * area_median]
    return float(np.median(diameters))


def nucleus_diameter_px(
    labels: np.ndarray, min_objects: int = MIN_OBJECTS, statistic: str = STATISTIC
) -> float | None:
    """Typical equivalent diameter ``sqrt(4 area / pi)`` in pixels of the objects of an
    ``(H, W)`` integer label image (0 = background): the median over objects, without the
    fragments (``trimmed``, see the module docstring) or with them (``median``); ``None``
    with fewer than ``min_objects`` objects. Objects of 1-2 pixels (noise) are ignored."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected an (H, W) label image, got shape {labels.shape}")
    diameters = _diameters(labels)
    if diameters.size < max(1, min_objects):
        return None
    return _typical(diameters, statistic)


def image_diameter_px(
    labels: np.ndarray, min_objects: int = MIN_OBJECTS, statistic: str = STATISTIC
) -> float | None:
    """:func:`nucleus_diameter_px` of one image's prediction, the scale estimate's; ``None``
    where more than :data:`EDGE_SHARE` of its objects are cut by the image's edge (a crop a
    few nuclei wide, a thin strip). A nucleus cut by the edge measures smaller than it is: on
    32 px strips of the GBM40 tiles, their ground-truth masks asked for 1.2x (1.6x at most)
    where the whole tiles need 1.0x. Nor do the whole objects tell: in a strip narrower than
    a nucleus only pieces of debris are whole. Ordinary tiles, with a fifth or less of their
    nuclei on the edge, are measured as by :func:`nucleus_diameter_px`, like the training
    masks the reference comes from."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected an (H, W) label image, got shape {labels.shape}")
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    diameters = _diameters(labels)  # counted once: a slide's field holds millions of pixels
    objects = diameters.size
    if edge.size and objects and edge.size > EDGE_SHARE * objects:
        whole = _diameters(np.where(np.isin(labels, edge), 0, labels)).size
        if objects - whole > EDGE_SHARE * objects:
            return None
    if objects < max(1, min_objects):
        return None
    return _typical(diameters, statistic)


def dataset_diameter_px(
    label_images: list[np.ndarray], min_objects: int = MIN_OBJECTS, statistic: str = STATISTIC
) -> float | None:
    """:func:`nucleus_diameter_px` over all objects of several label images (pooled), the
    reference diameter of a training set; ``None`` with fewer than ``min_objects`` objects."""
    parts = [_diameters(labels) for labels in label_images]
    diameters = np.concatenate(parts) if parts else np.empty(0)
    if diameters.size < max(1, min_objects):
        return None
    return _typical(diameters, statistic)


def scale_factor(
    estimated_px: float | None,
    reference_px: float | None,
    *,
    clip: tuple[float, float] = SCALE_LIMITS,
    tolerance: float = SCALE_TOLERANCE,
) -> float:
    """Resampling factor ``reference / estimated`` that brings nuclei of ``estimated_px``
    to ``reference_px`` (``< 1``: shrink the image). 1.0 when either is unknown or not
    positive, or when the factor is within ``tolerance`` of 1 (relative), so that an image
    already at the right scale is not resampled for noise; clipped to ``clip``."""
    lo, hi = clip
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"clip must satisfy 0 < low <= 1 <= high, got {clip}")
    if not estimated_px or not reference_px or estimated_px <= 0 or reference_px <= 0:
        return 1.0
    factor = float(reference_px) / float(estimated_px)
    if abs(factor - 1.0) <= tolerance:
        return 1.0
    return float(min(max(factor, lo), hi))


@dataclass(frozen=True)
class ScaleEstimate:
    """How the scale of one image was chosen."""

    factor: float  # the image was resampled by this (1.0: native scale kept)
    source: str  # "pixel_size" | "estimated" | "rejected" (estimate implausible) | "native"
    estimated_px: float | None = None  # nucleus diameter seen at native scale, px
    reference_px: float | None = None  # the model's training nucleus diameter, px
    passes: int = 1  # predictions made (1: native only)

    def as_row(self) -> dict[str, float | str | None]:
        """Columns for per-image tables: ``scale_factor``, ``scale_source``,
        ``est_diameter_px``."""
        return {
            "scale_factor": self.factor,
            "scale_source": self.source,
            "est_diameter_px": self.estimated_px,
        }


def plausible(diameter_px: float | None, native_px: float, min_size_ratio: float) -> bool:
    """Whether a rescaled pass whose nuclei measure ``diameter_px`` on the original grid
    still finds the nuclei of the native pass (``native_px``) rather than pieces of them:
    its diameter is at least ``min_size_ratio`` of the native one (see the module
    docstring)."""
    if diameter_px is None or diameter_px <= 0:
        return False
    return diameter_px >= min_size_ratio * native_px


def auto_scale(
    predict: Callable[[float], np.ndarray],
    reference_px: float,
    *,
    passes: int = 2,
    min_objects: int = MIN_OBJECTS,
    clip: tuple[float, float] = SCALE_LIMITS,
    tolerance: float = SCALE_TOLERANCE,
    min_size_ratio: float = 0.75,
    statistic: str = STATISTIC,
) -> tuple[np.ndarray, ScaleEstimate]:
    """Find the scale at which ``predict`` sees nuclei of ``reference_px`` and return its
    labels.

    ``predict(factor)`` resamples the image by ``factor``, predicts, and returns ``(H, W)``
    int32 labels on the ORIGINAL grid (the caller maps back; see
    :func:`mlseg.segment.predict_labels`). A nucleus of ``d`` px on the original grid is
    ``d * factor`` px as the model saw it, so each pass moves the factor to
    ``reference / d``. Stops when a pass would change the factor by no more than
    ``tolerance`` (relative), when too few nuclei are found, after ``passes`` rescaled
    passes, or when a rescaled pass is implausible (:func:`plausible`; see the module
    docstring) or has most of its objects on the image's edge (:func:`image_diameter_px`:
    kept if plausible by all its objects, but not refined from). The returned estimate's
    ``factor`` is that of the returned labels.
    ``statistic`` must be the one ``reference_px`` was computed with.
    """
    if not 0 < min_size_ratio <= 1:
        raise ValueError(f"min_size_ratio must be in (0, 1], got {min_size_ratio}")
    labels = predict(1.0)
    first = image_diameter_px(labels, min_objects, statistic)
    factor, estimated, done, source = 1.0, first, 1, "estimated"
    for _ in range(max(0, passes)):
        if estimated is None:
            break
        step = scale_factor(estimated * factor, reference_px, clip=(1e-3, 1e3), tolerance=tolerance)
        new = float(min(max(factor * step, clip[0]), clip[1]))
        if step == 1.0 or math.isclose(new, factor, rel_tol=1e-6):
            break
        candidate = predict(new)
        done += 1
        diameter = image_diameter_px(candidate, min_objects, statistic)
        # most of its objects on the edge: no estimate to refine from, but its nuclei are
        # judged all the same (shrinking joins the pieces the native pass cut large nuclei
        # into, so fewer objects remain and those on the edge become most)
        measured = diameter is not None
        if not measured:
            diameter = nucleus_diameter_px(candidate, min_objects, statistic)
        if not plausible(diameter, first, min_size_ratio):
            if factor == 1.0:
                source = "rejected"  # no plausible rescaled pass: native scale kept
            break
        factor, labels, source = new, candidate, "estimated"
        estimated = diameter if measured else None
    if first is None:
        source = "native"  # too few nuclei to tell their size
    return labels, ScaleEstimate(factor, source, first, float(reference_px), done)


#: Scale-space sigmas (pixels, on the grid :func:`blob_diameter_px` works on) searched for
#: blobs: 1 to 128 in steps of 2 ** (1/4), diameters of about 3-360 px, the largest only in
#: an image four times as wide. Bounded at 32 (90 px), the blobs an enlarged scan's tiles
#: hold beyond it were cut, not those of the training tiles: GBM40's test tiles at 1.5x and
#: 2x the training scale read 1.24x and 1.42x (no drift); 1.40x and 1.79x now.
BLOB_SIGMAS = tuple(float(s) for s in 2.0 ** (np.arange(0, 29) / 4.0))
#: Longest side :func:`blob_diameter_px` works on; a larger image is first shrunk by a whole
#: factor (and the diameter scaled back), so a 4096 px field costs as much as a 1024 px tile.
BLOB_MAX_SIDE = 1024
#: The share of a strong blob's response (the :data:`BLOB_RANK`-th strongest) a blob must
#: reach to count in :func:`blob_diameter_px`: a disk's response is 0.74 of its contrast
#: whatever its size, the side of an edge (a large nucleus's rim) 0.24 of it.
BLOB_SHARE = 0.5
#: The rank of the response :data:`BLOB_SHARE` is a share of: not the first, which one speck
#: of dust may hold.
BLOB_RANK = 3


def _blob_levels(signal: np.ndarray, sigmas: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per sigma of ``sigmas``, the scale-normalised LoG of ``signal`` (``-sigma**2 * LoG``,
    float32) and its 3x3 maximum. Sigma on a grid shrunk by r is sigma / r there, and
    sigma**2 * LoG is the same on both grids: each octave is blurred on a grid halved."""
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    grid, r, blurred = signal, 1, 0.0  # blurred: variance already applied, in pixels**2
    for sigma in sigmas:
        while sigma / r >= 8.0 and min(grid.shape) >= 64:
            # blurred by 1 px before every other pixel is kept, and that blur counted: an
            # area average blurred each octave's first sigma more than its others, and
            # blobs at the boundary read a sigma smaller
            grid = cv2.GaussianBlur(grid, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT)[::2, ::2]
            blurred, r = blurred + (2.0 * r) ** 2, r * 2
        s = math.sqrt(sigma**2 - blurred) / r
        grid = np.ascontiguousarray(grid)
        smooth = cv2.GaussianBlur(grid, (0, 0), s, borderType=cv2.BORDER_REFLECT)
        response = cv2.Laplacian(smooth, cv2.CV_32F, scale=-(s**2))
        yield response, cv2.dilate(response, kernel)


def _on_grid(level: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``level`` resampled to ``shape`` (the next level's grid may be half as fine)."""
    import cv2

    if level.shape == shape:
        return level
    fine = level.shape[0] > shape[0]
    interpolation = cv2.INTER_AREA if fine else cv2.INTER_LINEAR
    return cv2.resize(level, (shape[1], shape[0]), interpolation=interpolation)


def blob_diameter_px(grey: np.ndarray, *, dark_blobs: bool = True) -> float:
    """Typical diameter in pixels of the blobs (nuclei) of an ``(H, W)`` grey image, without
    a model, one blob at a time: every maximum of the scale-normalised Laplacian of
    Gaussian (``-sigma**2 * LoG``, Lindeberg 1998) over space and scale is a blob, of the
    diameter of the disk that peaks there (``2 * sqrt(2) * sigma``, refined between
    sigmas); of the blobs within :data:`BLOB_SHARE` of a strong one, the median diameter,
    each weighted by its response times its area (the size of the blob a nucleus pixel lies
    in: the dots of chromatin inside a large nucleus count little). Bright field: dark
    nuclei on a light ground, taken as optical density (``dark_blobs``); fluorescence:
    bright nuclei (``dark_blobs=False``).

    Each blob's size moves with the image's scale, so the value halves when the image is
    shrunk to half, and blur does not move it much (its width adds in quadrature); it does
    not depend on how many nuclei there are (a mean response over the image did: the same
    20 px disks read 51 px with 5 in a 512 px image, 16 px with 300). It reads disks at
    0.93 of their diameter, GBM40's H&E nuclei at 0.85 of their equivalent diameter. It
    measures the size nuclei appear in pixels, for drift monitoring (another
    magnification); it is no measurement of the nuclei. NaN for an image without contrast
    or smaller than 32 px."""
    import cv2

    arr = np.asarray(grey, np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) grey image, got shape {arr.shape}")
    if min(arr.shape) < 32 or not np.ptp(arr) > 0:
        return float("nan")
    step = max(1, math.ceil(max(arr.shape) / BLOB_MAX_SIDE))
    if step > 1:
        size = (max(1, arr.shape[1] // step), max(1, arr.shape[0] // step))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    top = float(arr.max())
    signal = -np.log10((arr + 1.0) / (top + 1.0)) if dark_blobs else arr / top
    # blobs wider than a quarter of the image are its ground (uneven light, tissue and
    # gaps), not nuclei
    sigmas = np.asarray([s for s in BLOB_SIGMAS if s <= min(arr.shape) / 4 / (2 * math.sqrt(2))])
    if sigmas.size < 3:
        return float("nan")
    responses, log_sigmas = [], []
    window: list[tuple[np.ndarray, np.ndarray]] = []
    for k, level in enumerate(_blob_levels(signal, sigmas)):
        window = [*window[-2:], level]
        if len(window) < 3:
            continue
        (below, below_max), (here, here_max), (above, above_max) = window
        shape = here.shape
        # a maximum over its 3x3x3 neighbours in space and scale
        peak = cv2.compare(here, here_max, cv2.CMP_GE)
        peak &= cv2.compare(here, _on_grid(below_max, shape), cv2.CMP_GT)
        peak &= cv2.compare(here, _on_grid(above_max, shape), cv2.CMP_GE)
        peak &= cv2.compare(here, 0.0, cv2.CMP_GT)
        points = cv2.findNonZero(peak)
        if points is None:
            continue
        x, y = points.reshape(-1, 2).T
        a, b, c = _on_grid(below, shape)[y, x], here[y, x], _on_grid(above, shape)[y, x]
        # the top of the parabola through the three sigmas, in steps of log2(sigma)
        shift = np.clip(0.5 * (a - c) / np.minimum(a - 2.0 * b + c, -1e-12), -0.5, 0.5)
        responses.append(b)
        log_sigmas.append(np.log2(sigmas[k - 1]) + shift * np.log2(sigmas[1] / sigmas[0]))
    if not responses:
        return float("nan")
    response, log_sigma = np.concatenate(responses), np.concatenate(log_sigmas)
    strong = np.sort(response)[-min(BLOB_RANK, response.size)]
    keep = response >= BLOB_SHARE * strong
    log_sigma = log_sigma[keep]
    order = np.argsort(log_sigma)
    weight = np.cumsum((response[keep] * 4.0**log_sigma)[order])
    median = float(log_sigma[order][np.searchsorted(weight, 0.5 * weight[-1])])
    return float(2.0 * math.sqrt(2.0) * 2.0**median * step)
