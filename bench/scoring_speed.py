"""Scoring one image as ``mlseg evaluate`` does (``mlseg.evaluate.score_labels``: Dice, object
matching, AJI, PQ, error kinds, count error) against the scoring as it was before the CPU
profile of the forty-first session: the contingency table's label values and pixel indices
found by ``np.unique(..., return_inverse=True)`` (a sort of every pixel, twice an image), and
the count error counted again by two more ``np.unique`` over the pixels.

Truth: every mask of the shared sets (``../shared/data``; cpm15_he, gbm40_he,
dsb2018_stage1_test: 120 masks); prediction: the same labels shifted by (2, 3) px, so every
nucleus overlaps its own and some their neighbours. Every row is checked equal (NaN equal to
NaN). Both run interleaved ``--repeats`` times; the best CPU time of each is kept (the machine
may be shared). Prints pairs/s for both and the ratio, then one JSON line.

    python bench/scoring_speed.py [--sets cpm15_he gbm40_he dsb2018_stage1_test] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(sets: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, truth)`` label images of every mask of ``sets``."""
    from mlseg.dataset import mask_to_labels
    from mlseg.io import read_mask

    pairs = []
    for name in sets:
        for mask in sorted((DATA / name / "masks").glob("*_mask.png")):
            truth = mask_to_labels(read_mask(mask))
            pairs.append((np.roll(truth, (2, 3), axis=(0, 1)), truth))
    return pairs


def contingency_before(pred_labels: np.ndarray, true_labels: np.ndarray):
    """``mlseg.metrics.contingency`` before the profile: label values by ``np.unique``."""
    p, t = np.asarray(pred_labels), np.asarray(true_labels)
    p_vals, p_idx = np.unique(p.ravel(), return_inverse=True)
    t_vals, t_idx = np.unique(t.ravel(), return_inverse=True)
    p_idx = p_idx.ravel().astype(np.int64) + (0 if p_vals[:1].tolist() == [0] else 1)
    t_idx = t_idx.ravel().astype(np.int64) + (0 if t_vals[:1].tolist() == [0] else 1)
    n_p = int(np.count_nonzero(p_vals)) + 1
    n_t = int(np.count_nonzero(t_vals)) + 1
    key = t_idx * n_p + p_idx
    if n_t * n_p <= 1 << 24:
        counts = np.bincount(key, minlength=n_t * n_p)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    ti, pi = keys // n_p, keys % n_p
    true_area = np.bincount(ti, weights=counts, minlength=n_t)[1:].astype(np.int64)
    pred_area = np.bincount(pi, weights=counts, minlength=n_p)[1:].astype(np.int64)
    both = (ti > 0) & (pi > 0)
    return ti[both] - 1, pi[both] - 1, counts[both].astype(np.int64), true_area, pred_area


def score_before(pred: np.ndarray, truth: np.ndarray) -> dict:
    """``score_labels`` before the profile: the old contingency, and ``count_error`` counting
    the objects again from the pixels."""
    import mlseg.metrics
    from mlseg.evaluate import score_labels
    from mlseg.metrics import count_error

    ours = mlseg.metrics.contingency
    mlseg.metrics.contingency = contingency_before
    try:
        row = score_labels(pred, truth)
    finally:
        mlseg.metrics.contingency = ours
    return {**row, **count_error(pred, truth)}


def same(a: dict, b: dict) -> bool:
    def eq(x, y) -> bool:
        both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        return both_nan or (x == y and type(x) is type(y))

    return list(a) == list(b) and all(eq(a[k], b[k]) for k in a)


def run(fn, pairs) -> tuple[list[dict], float]:
    start = time.process_time()
    rows = [fn(pred, truth) for pred, truth in pairs]
    return rows, time.process_time() - start


def main() -> None:
    from mlseg.evaluate import score_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sets", nargs="+", default=["cpm15_he", "gbm40_he", "dsb2018_stage1_test"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pairs = load(args.sets)
    best_ours = best_before = math.inf
    identical = True
    for _ in range(args.repeats):
        rows_ours, s_ours = run(score_labels, pairs)
        rows_before, s_before = run(score_before, pairs)
        identical &= all(same(a, b) for a, b in zip(rows_ours, rows_before, strict=True))
        best_ours, best_before = min(best_ours, s_ours), min(best_before, s_before)
    n = len(pairs)
    print(f"{n} pairs, {sum(int(t.max()) for _, t in pairs)} true nuclei")
    print(f"ours   {best_ours:7.3f} s CPU  {n / best_ours:7.1f} pairs/s")
    print(f"before {best_before:7.3f} s CPU  {n / best_before:7.1f} pairs/s")
    print(f"identical rows: {identical}; ratio {best_before / best_ours:.2f}")
    result = {
        "pairs": n,
        "cpu_s_ours": round(best_ours, 3),
        "cpu_s_before": round(best_before, 3),
        "ratio": round(best_before / best_ours, 2),
        "identical": identical,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
