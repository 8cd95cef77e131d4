"""Instance separation from three-class probabilities and from binary masks."""

from __future__ import annotations

import numpy as np
import pytest

from mlseg.config import WatershedConfig, get_profile
from mlseg.instances import (
    area_limits_px,
    border_labels,
    fill_holes,
    filter_sizes,
    mask_to_instances,
    min_distance_px,
    probs_to_labels,
)
from mlseg.targets import make_target

WS = WatershedConfig()


def discs(shape, centres, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        labels[inside & (labels == 0)] = i
    return labels


def one_hot(classes: np.ndarray, k: int) -> np.ndarray:
    probs = np.stack([(classes == c).astype(np.float32) for c in range(k)])
    return 0.9 * probs + 0.1 / k  # soft, as a network would give


def test_three_class_separates_touching_nuclei():
    truth = discs((64, 96), [(32, 30), (32, 52), (10, 80)], 11)  # first two touch
    probs = one_hot(make_target(truth, "three_class", boundary_px=1), 3)
    labels = probs_to_labels(
        probs, "three_class", WS, pixel_size_um=None, min_area_px=5, max_area_px=10_000
    )
    assert labels.dtype == np.int32
    assert labels.max() == 3
    # each predicted object matches one true nucleus almost exactly
    for i in range(1, 4):
        overlap = np.bincount(truth[labels == i], minlength=4)
        best = overlap.argmax()
        iou = overlap[best] / np.count_nonzero((labels == i) | (truth == best))
        assert best > 0 and iou > 0.9


def test_binary_distance_watershed_splits_two_overlapping_discs():
    truth = discs((60, 80), [(30, 28), (30, 50)], 12)
    probs = (truth > 0).astype(np.float32)[None] * 0.9 + 0.05
    labels = probs_to_labels(
        probs, "binary", WS, pixel_size_um=None, min_area_px=5, max_area_px=10_000
    )
    assert labels.max() == 2
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() > 0.8 * sizes.max()


def test_min_distance_in_microns_merges_close_peaks():
    truth = discs((60, 80), [(30, 28), (30, 50)], 12)
    # seeds 22 px apart: separated at 4 px spacing, merged when min distance is 15 um at 0.5 um/px
    far = WatershedConfig(min_distance_um=15.0)
    assert min_distance_px(far, 0.5) == 30
    assert mask_to_instances(truth > 0, WS, pixel_size_um=None).max() == 2
    assert mask_to_instances(truth > 0, far, pixel_size_um=0.5).max() == 1


def test_empty_prediction_gives_no_labels():
    probs = np.zeros((3, 40, 50), np.float32)
    probs[0] = 1.0
    labels = probs_to_labels(
        probs, "three_class", WS, pixel_size_um=None, min_area_px=5, max_area_px=100
    )
    assert labels.shape == (40, 50) and labels.max() == 0
    binary = probs_to_labels(
        np.zeros((1, 40, 50), np.float32),
        "binary",
        WS,
        pixel_size_um=None,
        min_area_px=5,
        max_area_px=100,
    )
    assert binary.max() == 0


def test_fill_holes_only_inside_one_object():
    labels = np.zeros((30, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[8:11, 8:11] = 0  # a hole in object 1
    labels[5:15, 20:25] = 2
    labels[5:15, 26:31] = 3
    labels[5, 25] = 2
    labels[14, 25] = 3  # background column 25 between 2 and 3 is not enclosed by one object
    filled = fill_holes(labels)
    assert (filled[8:11, 8:11] == 1).all()
    assert (filled[6:14, 25] == 0).all()


def test_size_filter_and_profile_area_limits():
    labels = np.zeros((50, 50), np.int32)
    labels[1:3, 1:3] = 4  # 4 px
    labels[10:20, 10:20] = 7  # 100 px
    labels[25:50, 25:50] = 9  # 625 px
    out = filter_sizes(labels, 10, 500)
    assert out.max() == 1 and np.count_nonzero(out) == 100
    he = get_profile("he")
    assert area_limits_px(he, None) == (he.min_area_px, he.max_area_px)
    lo, hi = area_limits_px(he, 0.5)
    assert lo == int(np.ceil(he.min_area_um2 / 0.25)) and hi == int(he.max_area_um2 / 0.25)


def test_size_limits_apply_in_probs_to_labels():
    truth = discs((60, 80), [(20, 20), (40, 60)], 3)
    truth[discs((60, 80), [(40, 60)], 12) > 0] = 2
    probs = one_hot(make_target(truth, "three_class"), 3)
    labels = probs_to_labels(
        probs, "three_class", WS, pixel_size_um=None, min_area_px=50, max_area_px=10_000
    )
    assert labels.max() == 1  # the 29-px nucleus is gone


def test_border_labels():
    labels = np.zeros((20, 20), np.int32)
    labels[0, 5] = 3
    labels[10, 10] = 4
    labels[19, 19] = 8
    labels[5, 0] = 2
    assert border_labels(labels).tolist() == [2, 3, 8]


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="3 channels"):
        probs_to_labels(
            np.zeros((1, 8, 8)), "three_class", WS, pixel_size_um=None, min_area_px=1, max_area_px=9
        )


def test_an_elongated_nucleus_is_one_seed_at_any_angle() -> None:
    """The distance ridge of an ellipse is flat; pixel rounding left maxima min_distance apart
    along it that split one nucleus in two or three at some angles (20 of 114 here), while two
    touching discs stay two."""
    from skimage.draw import disk, ellipse

    cfg = WatershedConfig()
    for a, b in ((20, 8), (24, 5), (30, 6), (40, 10)):
        for rotation in np.linspace(0, np.pi / 2, 19):
            mask = np.zeros((120, 120), bool)
            mask[ellipse(60, 60, a, b, rotation=rotation)] = True
            assert mask_to_instances(mask, cfg, pixel_size_um=None).max() == 1, (a, b, rotation)
    for radius in (4, 6, 10):
        for overlap in (0.0, 0.1, 0.2, 0.3):
            mask = np.zeros((120, 160), bool)
            mask[disk((60, 40), radius)] = True
            mask[disk((60, 40 + round(2 * radius * (1 - overlap))), radius)] = True
            assert mask_to_instances(mask, cfg, pixel_size_um=None).max() == 2, (radius, overlap)


def test_clumps_of_two_and_three_nuclei_give_one_label_each() -> None:
    """Each clump's seeds are merged on their own and numbered after all others: the five
    nuclei of a clump of two above a clump of three are five labels, none shared."""
    from skimage.draw import disk

    mask = np.zeros((100, 140), bool)
    for cy, cx in ((25, 40), (25, 58), (70, 30), (70, 48), (70, 66)):
        mask[disk((cy, cx), 10)] = True
    labels = mask_to_instances(mask, WatershedConfig(), pixel_size_um=None)
    assert labels.max() == 5 and len(np.unique(labels[labels > 0])) == 5
    for cy, cx in ((25, 40), (25, 58), (70, 30), (70, 48), (70, 66)):
        assert np.count_nonzero(labels == labels[cy, cx]) < 400  # one nucleus, not two


def test_a_hole_closed_by_a_second_object_stays_empty_from_every_side() -> None:
    """A nucleus cupped around a gap that a neighbour closes: the gap is no hole of either,
    whichever side the neighbour closes it from."""
    labels = np.zeros((20, 20), np.int32)
    labels[8:14, 5:14] = 1
    labels[8:11, 8:11] = 0  # open at the top ...
    labels[7, 5:14] = 2  # ... where nucleus 2 closes it
    for k in range(4):
        turned = np.rot90(labels, k)
        assert np.array_equal(fill_holes(turned), turned), k


def test_a_foreground_piece_without_a_seed_is_an_object_of_its_own() -> None:
    """Three-class output: a nucleus with a clear interior, and one seen as boundary only
    but for a 2-px interior speck (under seed_min_area_px, so no seed): two objects."""
    yy, xx = np.mgrid[:40, :60]
    probs = np.zeros((3, 40, 60), np.float32)
    probs[0] = 1.0
    for cx, interior in ((15, 0.9), (45, 0.0)):
        disc = (yy - 20) ** 2 + (xx - cx) ** 2 <= 36
        probs[:, disc] = np.array([0.05, interior, 0.95 - interior])[:, None]
    probs[:, 20, 45:47] = np.array([0.05, 0.9, 0.05])[:, None]
    labels = probs_to_labels(
        probs, "three_class", WS, pixel_size_um=None, min_area_px=5, max_area_px=10_000
    )
    assert labels.max() == 2
    assert len(np.unique(labels[:, :30])) == len(np.unique(labels[:, 30:])) == 2
