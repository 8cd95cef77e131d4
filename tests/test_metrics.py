"""Metrics against values computed by hand on tiny label images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlseg.metrics import (
    ERROR_KINDS,
    contingency,
    count_error,
    error_kinds,
    object_metrics,
    pixel_metrics,
)


def _squares() -> tuple[np.ndarray, np.ndarray]:
    """Truth: A, B (4x4 each). Prediction: A shifted by one column (IoU 12/20 = 0.6),
    half of B (IoU 8/16 = 0.5, not a match at > 0.5) and a false 2x2 object."""
    truth = np.zeros((12, 16), np.int32)
    truth[1:5, 1:5] = 1
    truth[1:5, 8:12] = 2
    pred = np.zeros_like(truth)
    pred[1:5, 2:6] = 7
    pred[1:5, 8:10] = 3
    pred[8:10, 1:3] = 9
    return pred, truth


def test_pixel_metrics_hand_computed() -> None:
    pred = np.zeros((4, 4), bool)
    true = np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 px
    true[0, 1:4] = True
    true[1, :3] = True  # 6 px, 3 shared
    m = pixel_metrics(pred, true)
    assert m["dice"] == pytest.approx(6 / 10)
    assert m["iou"] == pytest.approx(3 / 7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 6)


def test_pixel_metrics_empty_is_perfect_and_shape_checked() -> None:
    z = np.zeros((3, 3))
    assert pixel_metrics(z, z) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    one = z.copy()
    one[1, 1] = 1
    # nothing found on a nucleus is no perfect precision, as object precision says
    assert pixel_metrics(z, one) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}
    assert pixel_metrics(one, z) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}
    assert object_metrics(z.astype(int), one.astype(int))["precision"] == 0.0
    with pytest.raises(ValueError):
        pixel_metrics(np.zeros((3, 3)), np.zeros((3, 4)))


def test_object_metrics_hand_computed() -> None:
    pred, truth = _squares()
    m = object_metrics(pred, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert m["mean_matched_iou"] == pytest.approx(0.6)
    assert m["pq"] == pytest.approx(0.6 / (1 + 1 + 0.5))
    assert m["sq"] * m["rq"] == pytest.approx(m["pq"])
    # AJI: A->pred 7 (12/20), B->pred 3 (8/16), unused pred 9 adds 4: (12+8)/(20+16+4)
    assert m["aji"] == pytest.approx(20 / 40)


def test_lower_threshold_matches_half_overlap() -> None:
    pred, truth = _squares()
    m = object_metrics(pred, truth, iou_threshold=0.3)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 0)


def _best_total_iou(pred: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[int, float]:
    """Matches and their total IoU by one Hungarian assignment over every object pair of
    IoU above ``threshold``."""
    from scipy.optimize import linear_sum_assignment

    t_ids, p_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    iou = np.zeros((t_ids.size, p_ids.size))
    for i, t in enumerate(t_ids):
        for j, p in enumerate(p_ids):
            g, s = truth == t, pred == p
            iou[i, j] = (g & s).sum() / (g | s).sum()
    iou[iou <= threshold] = 0
    rows, cols = linear_sum_assignment(-iou)
    won = iou[rows, cols][iou[rows, cols] > 0]
    return won.size, float(won.sum())


def test_lower_threshold_matching_is_the_best_total_iou() -> None:
    """Below IoU 0.5 a nucleus may pass the threshold with several partners: the matching
    is the one of highest total IoU over the whole image."""
    rng = np.random.default_rng(1)
    for threshold in (0.1, 0.3):
        for _ in range(4):
            truth = rng.integers(0, 8, (16, 16)).astype(np.int32)
            pred = np.roll(truth, 1, axis=0) + 10 * (rng.random((16, 16)) < 0.3)
            m = object_metrics(pred, truth, iou_threshold=threshold)
            tp, total = _best_total_iou(pred, truth, threshold)
            assert m["tp"] == tp
            assert (m["mean_matched_iou"] * tp if tp else 0.0) == pytest.approx(total)


def test_lower_threshold_on_many_nuclei_needs_no_table_of_all_pairs() -> None:
    """160,000 one-pixel nuclei a side, scored at IoU 0.3: a table of every (true,
    predicted) pair would take 205 GB; the matching only needs the pairs that overlap."""
    truth = np.arange(1, 160_001, dtype=np.int32).reshape(400, 400)
    m = object_metrics(truth[::-1] * 2, truth[::-1], iou_threshold=0.3)
    assert (m["tp"], m["fp"], m["fn"]) == (160_000, 0, 0)


def test_identical_and_relabelled_is_perfect() -> None:
    _, truth = _squares()
    relabelled = np.where(truth == 1, 40, np.where(truth == 2, 5, 0))
    m = object_metrics(relabelled, truth)
    assert m["f1"] == m["aji"] == m["pq"] == pytest.approx(1.0)


def test_empty_images() -> None:
    z = np.zeros((5, 5), np.int32)
    m = object_metrics(z, z)
    assert m["precision"] == m["recall"] == m["f1"] == m["aji"] == m["pq"] == 1.0
    assert math.isnan(m["mean_matched_iou"])
    _, truth = _squares()
    m = object_metrics(np.zeros_like(truth), truth)
    assert (m["tp"], m["fn"]) == (0, 2) and m["f1"] == m["aji"] == m["pq"] == 0.0


def test_a_crop_without_pixels_scores_as_an_empty_image() -> None:
    """A crop past an image's edge (``labels[500:600]`` of a 400-row image) holds no pixel:
    object_metrics and error_kinds raised IndexError where pixel_metrics and count_error
    score it as two empty images agreeing."""
    none = np.zeros((0, 5), np.int32)
    m = object_metrics(none, none)
    assert m["tp"] == m["fp"] == m["fn"] == 0
    assert m["precision"] == m["recall"] == m["f1"] == m["aji"] == m["pq"] == 1.0
    assert error_kinds(none, none) == dict.fromkeys(ERROR_KINDS, 0)
    assert [len(a) for a in contingency(none, none)] == [0] * 5


def test_an_iou_threshold_no_match_can_pass_is_refused() -> None:
    """A threshold given in percent (50), 1.0 or NaN matched nothing: F1 0 for a perfect
    prediction, with no error."""
    _, truth = _squares()
    for threshold in (50, 1.0, float("nan"), -0.1):
        with pytest.raises(ValueError, match="iou_threshold must be a fraction"):
            object_metrics(truth, truth, iou_threshold=threshold)
        with pytest.raises(ValueError, match="iou_threshold must be a fraction"):
            error_kinds(truth, truth, iou_threshold=threshold)
    assert object_metrics(truth, truth, iou_threshold=0.0)["f1"] == 1.0


def test_one_object_on_one_side_only_scores_zero() -> None:
    """One nucleus missed on an otherwise empty image, or one predicted where there is none:
    nothing is right, AJI included."""
    one = np.zeros((10, 10), np.int32)
    one[2:5, 2:5] = 1
    for pred, truth in ((np.zeros_like(one), one), (one, np.zeros_like(one))):
        m = object_metrics(pred, truth)
        assert m["tp"] == 0 and m["fp"] + m["fn"] == 1
        assert m["precision"] == m["recall"] == m["f1"] == m["aji"] == m["pq"] == 0.0


def test_an_image_covered_by_nuclei_is_scored_without_a_background() -> None:
    """A tile cut inside tissue where every pixel is some nucleus's: two halves of 16 px,
    predicted with their border one column to the right (IoU 16/20 and 12/16)."""
    truth = np.zeros((4, 8), np.int32)
    truth[:, :4], truth[:, 4:] = 1, 2
    assert object_metrics(truth, truth)["aji"] == 1.0
    pred = np.zeros_like(truth)
    pred[:, :5], pred[:, 5:] = 3, 4
    m = object_metrics(pred, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["mean_matched_iou"] == pytest.approx((16 / 20 + 12 / 16) / 2)
    assert m["aji"] == pytest.approx((16 + 12) / (20 + 16))


def test_many_objects_score_as_few() -> None:
    """10,000 nuclei on each side (a table too large for one bincount): 2 x 2 squares, found
    exactly, then drawn one column to the right (IoU 2/6 each, no match, AJI 1/3)."""
    truth = np.zeros((300, 300), np.int32)
    truth.reshape(100, 3, 100, 3)[:, :2, :, :2] = np.arange(1, 10_001).reshape(100, 1, 100, 1)
    m = object_metrics(truth * 3, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (10_000, 0, 0) and m["aji"] == 1.0
    m = object_metrics(np.roll(truth, 1, axis=1), truth)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 10_000, 10_000)
    assert m["aji"] == pytest.approx(1 / 3)


def test_negative_labels_are_refused_not_scored() -> None:
    """0 is the background slot: a negative label sorted before it and made an image
    compared with itself score 2 misses (PQ 0.67)."""
    labels = np.zeros((6, 6), np.int32)
    labels[1:3, 1:3], labels[3:5, 3:5] = -1, 2
    with pytest.raises(ValueError, match="truth labels must be non-negative"):
        object_metrics(np.abs(labels), labels)
    with pytest.raises(ValueError, match="prediction labels must be non-negative"):
        object_metrics(labels, np.abs(labels))


def test_split_label_counts_as_one_object() -> None:
    truth = np.zeros((6, 10), np.int32)
    truth[0:2, 0:2] = 1
    truth[4:6, 8:10] = 1  # same label, two pieces (as in cpm15)
    pred = truth.copy()
    pred[4:6, 8:10] = 2
    m = object_metrics(pred, truth)
    assert m["tp"] == 0 and m["fp"] == 2 and m["fn"] == 1  # each half has IoU 0.5
    assert m["aji"] == pytest.approx(4 / (8 + 4))


def _aji_reference(pred: np.ndarray, truth: np.ndarray) -> float:
    """Kumar et al. 2017, Algorithm 1, written plainly with boolean masks."""
    t_ids = [i for i in np.unique(truth) if i]
    p_ids = [i for i in np.unique(pred) if i]
    c = u = 0
    used = set()
    for t in t_ids:
        g = truth == t
        best, best_iou = None, -1.0
        for p in p_ids:
            s = pred == p
            iou = (g & s).sum() / (g | s).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        if best is not None and best_iou > 0:
            s = pred == best
            c += (g & s).sum()
            u += (g | s).sum()
            used.add(best)
        else:
            u += g.sum()
    for p in p_ids:
        if p not in used:
            u += (pred == p).sum()
    return c / u


def test_aji_matches_plain_reference_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = rng.integers(0, 6, (20, 20)).astype(np.int32)
        truth[rng.random((20, 20)) < 0.3] = 0
        pred = np.roll(truth, 1, axis=1)
        pred[rng.random((20, 20)) < 0.2] = 9
        assert object_metrics(pred, truth)["aji"] == pytest.approx(_aji_reference(pred, truth))


def test_contingency_areas() -> None:
    pred, truth = _squares()
    ti, pi, inter, t_area, p_area = contingency(pred, truth)
    assert t_area.tolist() == [16, 16] and p_area.tolist() == [8, 16, 4]  # labels 3, 7, 9
    assert sorted(zip(ti.tolist(), pi.tolist(), inter.tolist(), strict=True)) == [
        (0, 1, 12),
        (1, 0, 8),
    ]


def _contingency_by_sorting(pred: np.ndarray, truth: np.ndarray) -> list[list]:
    """The contingency of two label images the plain way: ``np.unique`` of the pairs."""
    p_vals = np.unique(pred[pred != 0])
    t_vals = np.unique(truth[truth != 0])
    both = (pred != 0) & (truth != 0)
    pairs, inter = np.unique(np.stack([truth[both], pred[both]]), axis=1, return_counts=True)
    ti, pi = np.searchsorted(t_vals, pairs[0]), np.searchsorted(p_vals, pairs[1])
    t_area = [int(np.count_nonzero(truth == v)) for v in t_vals]
    p_area = [int(np.count_nonzero(pred == v)) for v in p_vals]
    return [ti.tolist(), pi.tolist(), inter.tolist(), t_area, p_area]


@pytest.mark.parametrize(
    "dtype, top",
    [
        (np.uint8, 200),  # few values with gaps, background absent in places
        (np.uint16, 65535),
        (np.int32, 60),
        (np.int32, 2**31 - 1),  # a slide tile's global ids: beyond the look-up table
        (np.int64, 2**40),
    ],
)
def test_contingency_agrees_with_sorting_whatever_the_label_values(dtype, top) -> None:
    """The contingency finds label values by a look-up table where they are small and by a
    sort where not: the same table either way, for any label values and dtype."""
    rng = np.random.default_rng(int(np.log2(top)))
    values = np.concatenate([[0, top], rng.integers(1, top, 40, endpoint=True)]).astype(dtype)
    truth = rng.choice(values, (30, 40)).astype(dtype)
    pred = np.roll(truth, 3, axis=1)
    pred[rng.random(pred.shape) < 0.1] = values[5]
    pred[:, :4] = top  # a prediction without background on every row
    ours = [a.tolist() for a in contingency(pred, truth)]
    order = np.lexsort((ours[1], ours[0]))
    ours[:3] = [np.asarray(a)[order].tolist() for a in ours[:3]]
    assert ours == _contingency_by_sorting(pred, truth)
    empty = np.zeros((0, 5), dtype)
    assert [len(a) for a in contingency(empty, empty)] == [0] * 5


def test_evaluate_counts_the_nuclei_count_error_counts() -> None:
    """``mlseg evaluate`` takes its counts from the object matching: the same as counting the
    label images' objects (``count_error``), empty images included."""
    from mlseg.evaluate import score_labels

    pred, truth = _squares()
    empty = np.zeros_like(truth)
    keys = ("n_true", "n_pred", "count_error", "count_error_rel")
    for p, t in ((pred, truth), (truth, pred), (empty, truth), (pred, empty), (empty, empty)):
        row = score_labels(p, t)
        counted = count_error(p, t)
        assert [row[k] for k in keys[:3]] == [counted[k] for k in keys[:3]]
        assert row["count_error_rel"] == pytest.approx(counted["count_error_rel"], nan_ok=True)


def test_area_ratio_is_the_size_bias_of_matched_nuclei() -> None:
    """Nuclei drawn a pixel wider all round: area ratio (r + 1)^2 / r^2, whatever else is
    unmatched; identical outlines give 1, no match NaN."""
    from skimage.draw import disk

    truth, wider = np.zeros((60, 100), np.int32), np.zeros((60, 100), np.int32)
    for label, (cy, cx) in enumerate([(15, 15), (15, 50), (40, 30), (40, 75)], start=1):
        truth[disk((cy, cx), 8, shape=truth.shape)] = label
        wider[disk((cy, cx), 9, shape=truth.shape)] = label
    wider[55:58, 2:5] = 9  # a spurious object does not count
    m = object_metrics(wider, truth)
    ratio = np.count_nonzero(wider[:50] == 1) / np.count_nonzero(truth == 1)
    assert m["tp"] == 4 and m["area_ratio"] == pytest.approx(ratio) and 1.2 < ratio < 1.35
    assert object_metrics(truth, truth)["area_ratio"] == 1.0
    assert math.isnan(object_metrics(np.zeros_like(truth), truth)["area_ratio"])


def test_count_error() -> None:
    pred, truth = _squares()
    c = count_error(pred, truth)
    assert c == {"n_true": 2, "n_pred": 3, "count_error": 1, "count_error_rel": 0.5}


def test_error_kinds_name_the_cause_of_each_unmatched_object() -> None:
    from skimage.draw import disk

    truth = np.zeros((100, 200), np.int32)
    pred = np.zeros_like(truth)
    truth[disk((20, 20), 8)] = 1  # found exactly
    pred[disk((20, 20), 8)] = 1
    truth[disk((20, 60), 8)] = 2  # two touching nuclei drawn as one
    truth[disk((20, 76), 8)] = 3
    pred[15:26, 52:85] = 2
    truth[disk((60, 20), 8)] = 4  # not found at all
    truth[disk((60, 60), 10)] = 5  # cut in two halves
    pred[50:71, 50:60] = 3
    pred[50:71, 60:71] = 4
    truth[disk((60, 110), 10)] = 6  # found, but drawn shifted (IoU < 0.5, most covered)
    pred[disk((60, 117), 10)] = 5
    pred[disk((85, 170), 6)] = 6  # nothing there
    kinds = error_kinds(pred, truth)
    assert kinds == {
        "fn_missed": 1,
        "fn_merged": 2,
        "fn_split": 1,
        "fn_outline": 1,
        "fp_spurious": 1,
        "fp_merged": 1,
        "fp_split": 2,
        "fp_outline": 1,
    }


def test_error_kinds_of_a_barely_touched_nucleus_and_of_the_first_prediction() -> None:
    """The rules hold for the lowest-labelled prediction as for any other, and a nucleus of
    which a prediction covers a few pixels is missed, not found with a bad outline."""
    from skimage.draw import disk

    truth = np.zeros((80, 80), np.int32)
    pred = np.zeros_like(truth)
    truth[disk((20, 20), 8)] = 1  # two touching nuclei drawn as one, by prediction 1
    truth[disk((20, 37), 8)] = 2
    pred[11:30, 11:47] = 1
    truth[disk((60, 60), 8)] = 3  # 9 of its 197 px found
    pred[58:61, 58:61] = 2
    kinds = error_kinds(pred, truth)
    assert kinds == {k: 0 for k in ERROR_KINDS} | {
        "fn_missed": 1,
        "fn_merged": 2,
        "fp_merged": 1,
        "fp_outline": 1,
    }
    truth = np.zeros((80, 80), np.int32)
    pred = np.zeros_like(truth)
    truth[disk((20, 20), 8)] = 1  # drawn shifted by prediction 1
    pred[disk((20, 25), 8)] = 1
    truth[disk((60, 60), 8)] = 2  # not found
    assert error_kinds(pred, truth) == {k: 0 for k in ERROR_KINDS} | {
        "fn_missed": 1,
        "fn_outline": 1,
        "fp_outline": 1,
    }


def test_error_kinds_add_up_to_the_unmatched_objects() -> None:
    rng = np.random.default_rng(1)
    for _ in range(10):
        truth = rng.integers(0, 8, (24, 24)).astype(np.int32)
        truth[rng.random((24, 24)) < 0.3] = 0
        pred = np.roll(truth, rng.integers(0, 3), axis=0)
        pred[rng.random((24, 24)) < 0.2] = 11
        kinds, obj = error_kinds(pred, truth), object_metrics(pred, truth)
        assert set(kinds) == set(ERROR_KINDS)
        assert sum(v for k, v in kinds.items() if k.startswith("fn_")) == obj["fn"]
        assert sum(v for k, v in kinds.items() if k.startswith("fp_")) == obj["fp"]
    empty = np.zeros_like(truth)
    assert error_kinds(empty, truth)["fn_missed"] == object_metrics(empty, truth)["fn"]
    assert error_kinds(truth, empty)["fp_spurious"] == object_metrics(truth, empty)["fp"]


def test_masks_that_are_not_labels_are_refused_not_scored() -> None:
    """A boolean mask of two nuclei scored as one object: F1 0.67 and AJI 0.5 against its
    own labels, with pixel Dice 1.0; a float one could hold NaN."""
    _, truth = _squares()
    for mask in (truth > 0, truth.astype(float)):
        with pytest.raises(ValueError, match="prediction labels must be integers"):
            object_metrics(mask, truth)
        with pytest.raises(ValueError, match="truth labels must be integers"):
            count_error(truth, mask)
    assert object_metrics(truth.astype(np.uint8), truth)["f1"] == 1.0
