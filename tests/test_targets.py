"""Training targets from instance labels."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk
from skimage.segmentation import find_boundaries

from mlseg.errors import ConfigError
from mlseg.targets import boundaries, make_target, num_classes


def _touching() -> np.ndarray:
    labels = np.zeros((12, 20), np.int32)
    labels[2:10, 2:10] = 1
    labels[2:10, 10:18] = 2  # touches label 1 along column 9|10
    return labels


def test_binary_target_is_foreground() -> None:
    labels = _touching()
    t = make_target(labels, "binary")
    assert t.dtype == np.int64 and np.array_equal(t, (labels > 0).astype(np.int64))


def test_three_class_separates_touching_nuclei() -> None:
    labels = _touching()
    t = make_target(labels, "three_class")
    assert set(np.unique(t)) == {0, 1, 2}
    # both columns on the contact line are boundary: interiors no longer touch
    assert np.all(t[2:10, 9] == 2) and np.all(t[2:10, 10] == 2)
    interior = t == 1
    from scipy import ndimage

    assert ndimage.label(interior)[1] == 2
    # outer ring of each square is boundary, inside it interior; background stays 0
    assert np.all(t[2, 2:18] == 2) and np.all(t[3:9, 3:9] == 1) and np.all(t[labels == 0] == 0)


def test_boundary_width_one_equals_skimage_inner() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (30, 30)).astype(np.int32)
    expected = find_boundaries(labels, mode="inner", connectivity=1) & (labels > 0)
    assert np.array_equal(boundaries(labels, 1), expected)


def test_wider_boundary() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[disk((20, 20), 10)] = 1
    t1 = make_target(labels, "three_class", boundary_px=1)
    t2 = make_target(labels, "three_class", boundary_px=2)
    assert (t2 == 2).sum() > 1.7 * (t1 == 2).sum()
    assert np.array_equal(t1 > 0, labels > 0) and np.array_equal(t2 > 0, labels > 0)


def test_unknown_target() -> None:
    assert num_classes("binary") == 1 and num_classes("three_class") == 3
    with pytest.raises(ConfigError):
        make_target(_touching(), "four_class")
    with pytest.raises(ConfigError):
        num_classes("auto")
