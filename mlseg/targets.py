"""Training targets derived from instance labels.

``binary``: 0 background, 1 nucleus. ``three_class``: 0 background, 1 nucleus interior,
2 boundary, where the boundary is the ring of each nucleus's own pixels within
``boundary_px`` of its border (with the background or with another nucleus). Two touching
nuclei are thus separated by a boundary at least two pixels wide, which lets the instance
step cut them apart again.
"""

from __future__ import annotations

import numpy as np

from mlseg.errors import ConfigError

TARGETS = ("binary", "three_class")
CLASSES = {"binary": 1, "three_class": 3}  # model output channels per target


def num_classes(target: str) -> int:
    """Model output channels: 1 for ``binary`` (sigmoid), 3 for ``three_class`` (softmax)."""
    if target not in CLASSES:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return CLASSES[target]


def boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """``(H, W)`` bool: nucleus pixels with a different label (or background) within
    ``width`` px (city-block distance). ``width=1`` equals skimage's
    ``find_boundaries(mode="inner", connectivity=1)``; the image edge is no border.
    """
    from scipy import ndimage

    r = int(width)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    footprint = (np.abs(yy) + np.abs(xx)) <= r
    hi = ndimage.maximum_filter(labels, footprint=footprint, mode="nearest")
    lo = ndimage.minimum_filter(labels, footprint=footprint, mode="nearest")
    return ((hi != labels) | (lo != labels)) & (labels > 0)


def make_target(labels: np.ndarray, target: str, boundary_px: int = 1) -> np.ndarray:
    """``(H, W)`` int instance labels (0 = background) -> ``(H, W)`` int64 class map."""
    if target == "binary":
        return (labels > 0).astype(np.int64)
    if target == "three_class":
        out = (labels > 0).astype(np.int64)
        out[boundaries(labels, boundary_px)] = 2
        return out
    raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
