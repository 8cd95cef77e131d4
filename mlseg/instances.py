"""Instance separation: model probabilities (or a binary mask) -> one label per nucleus.

Three-class output (0 background, 1 interior, 2 boundary; see :mod:`mlseg.targets`): the
interiors are the seeds, the boundary ring is where touching nuclei meet. Seeds are the
4-connected components of ``interior > seed_threshold``; they are flooded (watershed) over
``1 - interior`` (or the boundary probability) inside the foreground
``interior + boundary > fg_threshold``. Foreground pieces no seed reaches become objects of
their own.

Binary output (or a binary mask): seeds are maxima of the smoothed Euclidean distance
transform at least ``min_distance`` apart (in microns when the pixel size is known), flooded
over the negated distance inside the foreground.

Then, if configured, holes enclosed by a single object are filled and objects outside
``[min_area_px, max_area_px]`` are removed; labels come out consecutive (1..N).
"""

from __future__ import annotations

import numpy as np

from mlseg.config import Profile, WatershedConfig
from mlseg.errors import ConfigError

#: How far (px of distance to the background) a binary mask's seed must rise above the pass
#: to any higher peak; two touching nuclei dip far more at their neck.
SEED_DYNAMIC_PX = 0.3


def area_limits_px(profile: Profile, pixel_size_um: float | None) -> tuple[int, int]:
    """``(min, max)`` object area in pixels: the profile's um2 limits converted when the
    pixel size is known, else its ``min_area_px``/``max_area_px``."""
    if pixel_size_um is None:
        return int(profile.min_area_px), int(profile.max_area_px)
    pixel_area = float(pixel_size_um) ** 2
    return (
        int(np.ceil(profile.min_area_um2 / pixel_area)),
        int(np.floor(profile.max_area_um2 / pixel_area)),
    )


def min_distance_px(watershed: WatershedConfig, pixel_size_um: float | None) -> int:
    """Seed spacing of the binary watershed in pixels (at least 1)."""
    if pixel_size_um is None:
        return int(watershed.min_distance_px)
    return max(1, int(round(watershed.min_distance_um / pixel_size_um)))


def probs_to_labels(
    probs: np.ndarray,
    target: str,
    watershed: WatershedConfig,
    *,
    pixel_size_um: float | None,
    min_area_px: int,
    max_area_px: int,
) -> np.ndarray:
    """``(K, H, W)`` float probabilities -> ``(H, W) int32`` labels (0 = background, 1..N).

    ``target`` "three_class" needs K = 3 (background, interior, boundary); "binary" needs
    K = 1 (foreground). An image without foreground gives all zeros.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (K, H, W), got shape {probs.shape}")
    if target == "three_class":
        if probs.shape[0] != 3:
            raise ValueError(f"three_class probabilities need 3 channels, got {probs.shape[0]}")
        labels = _three_class(probs, watershed)
    elif target == "binary":
        if probs.shape[0] != 1:
            raise ValueError(f"binary probabilities need 1 channel, got {probs.shape[0]}")
        labels = mask_to_instances(
            probs[0] > watershed.fg_threshold,
            watershed,
            pixel_size_um=pixel_size_um,
            distance_weight=probs[0],
        )
    else:
        raise ConfigError(f"unknown target {target!r}; choose binary or three_class")
    return finish(labels, watershed, min_area_px=min_area_px, max_area_px=max_area_px)


def finish(
    labels: np.ndarray, watershed: WatershedConfig, *, min_area_px: int, max_area_px: int
) -> np.ndarray:
    """Hole filling (if configured), size filtering and consecutive relabelling."""
    if watershed.fill_holes:
        labels = fill_holes(labels)
    return filter_sizes(labels, min_area_px, max_area_px)


def _components(mask: np.ndarray, connectivity: int) -> tuple[int, np.ndarray]:
    import cv2

    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
    return n - 1, labels.astype(np.int32, copy=False)


def _three_class(probs: np.ndarray, watershed: WatershedConfig) -> np.ndarray:
    import cv2
    from skimage.segmentation import watershed as flood

    interior = np.asarray(probs[1], dtype=np.float32)
    boundary = np.asarray(probs[2], dtype=np.float32)
    foreground = (interior + boundary) > watershed.fg_threshold
    if not foreground.any():
        return np.zeros(foreground.shape, dtype=np.int32)
    seeds = (interior > watershed.seed_threshold) & foreground
    n, markers = _components(seeds, 4)
    if n and watershed.seed_min_area_px > 1:
        small = np.bincount(markers.ravel(), minlength=n + 1) < watershed.seed_min_area_px
        small[0] = False
        markers = _consecutive(np.where(small[markers], 0, markers))
    # 8-bit elevation (one pass, no float temporaries): flooding only needs the ranks
    if watershed.elevation == "boundary":
        elevation = cv2.convertScaleAbs(boundary, alpha=255.0, beta=0.5)
    else:
        elevation = cv2.convertScaleAbs(interior, alpha=-255.0, beta=255.5)
    labels = flood(elevation, markers, mask=foreground, compactness=watershed.compactness).astype(
        np.int32
    )
    return _add_unseeded(labels, foreground)


def mask_to_instances(
    foreground: np.ndarray,
    watershed: WatershedConfig,
    *,
    pixel_size_um: float | None,
    distance_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Split a binary ``(H, W)`` mask into ``(H, W) int32`` instances (distance watershed).

    Seeds are maxima of the Euclidean distance to the background (times
    ``distance_weight`` if given, e.g. the foreground probability, which breaks plateaus),
    smoothed by ``smooth_sigma_px``, that are the largest within ``min_distance`` px.
    """
    import cv2
    from skimage.segmentation import watershed as flood

    foreground = np.asarray(foreground, dtype=bool)
    if not foreground.any():
        return np.zeros(foreground.shape, dtype=np.int32)
    distance = cv2.distanceTransform(foreground.astype(np.uint8), cv2.DIST_L2, 5)
    if distance_weight is not None:
        distance = distance * np.asarray(distance_weight, dtype=np.float32)
    if watershed.smooth_sigma_px > 0:
        distance = cv2.GaussianBlur(distance, (0, 0), watershed.smooth_sigma_px)
    md = min_distance_px(watershed, pixel_size_um)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * md + 1, 2 * md + 1))
    peaks = (distance >= cv2.dilate(distance, kernel)) & foreground & (distance > 0)
    # Peaks joined by a pass less than SEED_DYNAMIC_PX below them are one seed: the flat
    # ridge of an elongated nucleus holds several maxima min_distance apart that pixel
    # rounding alone made. Such peaks share one plateau of the h-reconstruction.
    markers = _merged_seeds(distance, foreground, peaks)
    labels = flood(-distance, markers, mask=foreground).astype(np.int32)
    return _add_unseeded(labels, foreground)


def _merged_seeds(distance: np.ndarray, foreground: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Markers: the peaks, those joined by a pass under :data:`SEED_DYNAMIC_PX` below them
    made one (a plateau of the h-reconstruction of ``distance``). Only the foreground
    pieces holding two or more peaks are reconstructed, each in its own box."""
    from scipy import ndimage
    from skimage.morphology import local_maxima, reconstruction

    _, markers = _components(peaks, 8)
    _, pieces = _components(foreground, 8)
    pairs = np.unique(np.stack([pieces[peaks], markers[peaks]]), axis=1)
    several = np.flatnonzero(np.bincount(pairs[0], minlength=int(pieces.max()) + 1) >= 2)
    if several.size == 0:
        return markers
    top = int(markers.max())
    boxes = ndimage.find_objects(pieces)
    for piece in several:
        box = boxes[piece - 1]
        inside = pieces[box] == piece
        height = np.where(inside, distance[box], 0.0).astype(np.float64)
        floor = reconstruction(height - SEED_DYNAMIC_PX, height, method="dilation")
        n, plateaus = _components(local_maxima(floor, connectivity=2) & inside, 8)
        seeded = np.unique(plateaus[peaks[box] & inside])
        keep = np.isin(plateaus, seeded[seeded > 0])
        region = markers[box]
        region[inside] = 0
        region[keep] = plateaus[keep] + top
        top += n
    return _consecutive(markers)


def _add_unseeded(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Foreground pieces that no seed reached become objects of their own."""
    rest = foreground & (labels == 0)
    if not rest.any():
        return labels
    n, extra = _components(rest, 8)
    top = int(labels.max(initial=0))
    return np.where(extra > 0, extra + top, labels).astype(np.int32)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..N in order of first label value; 0 stays 0."""
    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    if top == 0:
        return labels.astype(np.int32, copy=False)
    present = np.zeros(top + 1, dtype=bool)
    present[labels.ravel()] = True
    present[0] = False
    lut = np.zeros(top + 1, dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels]


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background holes enclosed by one object (holes between objects stay empty).

    A hole is a 4-connected background region not reaching the image border; it is
    given to the object around it only if every foreground pixel touching it has that label.
    """
    import cv2
    from scipy import ndimage

    labels = np.asarray(labels).astype(np.int32, copy=True)
    foreground = labels > 0
    holes = ndimage.binary_fill_holes(foreground) & ~foreground
    if not holes.any():
        return labels
    _, hole_ids = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
    rows, cols = np.nonzero(holes)
    height, width = labels.shape
    ids, around = [], []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = rows + dr, cols + dc  # holes never touch the border: always inside
        neighbour = labels[r, c]
        ids.append(hole_ids[rows, cols][neighbour > 0])
        around.append(neighbour[neighbour > 0])
    ids = np.concatenate(ids)
    around = np.concatenate(around)
    n = int(hole_ids.max())
    lowest = np.full(n + 1, np.iinfo(np.int32).max, dtype=np.int64)
    highest = np.zeros(n + 1, dtype=np.int64)
    np.minimum.at(lowest, ids, around)
    np.maximum.at(highest, ids, around)
    single = (lowest == highest) & (highest > 0)
    owner = np.where(single, highest, 0)
    filled = owner[hole_ids[rows, cols]]
    labels[rows, cols] = filled
    return labels


def filter_sizes(labels: np.ndarray, min_area_px: int, max_area_px: int) -> np.ndarray:
    """Remove objects with fewer than ``min_area_px`` or more than ``max_area_px`` pixels;
    relabel 1..N."""
    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    if top == 0:
        return labels.astype(np.int32, copy=False)
    areas = np.bincount(labels.ravel(), minlength=top + 1)
    keep = (areas >= min_area_px) & (areas <= max_area_px)
    keep[0] = False
    lut = np.zeros(top + 1, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def border_labels(labels: np.ndarray) -> np.ndarray:
    """Sorted labels of the objects with a pixel on the first/last row or column."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=labels.dtype)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    values = np.unique(edge)
    return values[values != 0]
