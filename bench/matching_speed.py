"""Object matching below IoU 0.5 (``mlseg.metrics.object_metrics(..., iou_threshold=0.3)``,
as when a lab scores at several thresholds) against the matching as it was before the
label audit: one Hungarian assignment over a dense table of every (true, predicted) pair.

The label images are ``--nuclei`` discs on a grid (radius 5 px, some touching), the
prediction the same discs shifted by up to 3 px and grown or shrunk by 1 px, so most pairs
overlap once and some several times. Both matchings are checked to give the same total IoU
and counts. Prints seconds (untraced) and peak memory (numpy allocations traced by ``tracemalloc``)
for both and the ratios before / ours, then one JSON line.

    python bench/matching_speed.py [--nuclei 5000] [--threshold 0.3]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np
from skimage.draw import disk


def discs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, prediction)`` int32 label images of ``n`` nuclei each."""
    rng = np.random.default_rng(seed)
    per_row = int(np.ceil(np.sqrt(n)))
    side = per_row * 11 + 8
    truth = np.zeros((side, side), np.int32)
    pred = np.zeros_like(truth)
    for i in range(n):
        cy, cx = 8 + (i // per_row) * 11, 8 + (i % per_row) * 11
        truth[disk((cy, cx), 5, shape=truth.shape)] = i + 1
        dy, dx = rng.integers(-3, 4, 2)
        pred[disk((cy + dy, cx + dx), 5 + rng.integers(-1, 2), shape=pred.shape)] = i + 1
    return truth, pred


def dense_match(ti, pi, iou, n_t, n_p, threshold):
    """The matching before the audit: one assignment over every (true, predicted) pair."""
    from scipy.optimize import linear_sum_assignment

    keep = iou > threshold
    dense = np.zeros((n_t, n_p))
    dense[ti[keep], pi[keep]] = iou[keep]
    rows, cols = linear_sum_assignment(-dense)
    chosen = np.zeros((n_t, n_p), bool)
    chosen[rows, cols] = dense[rows, cols] > threshold
    return chosen[ti, pi]


def timed(fn, *args):
    """``(result, seconds, peak MB)``: timed untraced (tracing slows Python's own loops),
    then run again under ``tracemalloc`` for the peak."""
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak / 1e6


def main() -> None:
    from mlseg.metrics import _match, contingency

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nuclei", type=int, default=5000)
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args()
    truth, pred = discs(args.nuclei, seed=0)
    ti, pi, inter, t_area, p_area = contingency(pred, truth)
    n_t, n_p = len(t_area), len(p_area)
    iou = inter / np.maximum(t_area[ti] + p_area[pi] - inter, 1)
    pairs = (ti, pi, iou, n_t, n_p, args.threshold)
    ours, s_ours, mb_ours = timed(_match, *pairs)
    before, s_before, mb_before = timed(dense_match, *pairs)
    same = bool(np.isclose(iou[ours].sum(), iou[before].sum()))
    print(f"{n_t} true, {n_p} predicted nuclei, {len(iou)} overlapping pairs")
    print(f"ours   {s_ours:8.3f} s  {mb_ours:9.1f} MB  matched {int(ours.sum())}")
    print(f"before {s_before:8.3f} s  {mb_before:9.1f} MB  matched {int(before.sum())}")
    print(
        f"same total IoU: {same}; time ratio {s_before / s_ours:.1f}, memory ratio "
        f"{mb_before / max(mb_ours, 1e-6):.1f}"
    )
    result = {
        "nuclei": n_t,
        "threshold": args.threshold,
        "seconds_ours": round(s_ours, 4),
        "seconds_before": round(s_before, 4),
        "peak_mb_ours": round(mb_ours, 1),
        "peak_mb_before": round(mb_before, 1),
        "time_ratio": round(s_before / s_ours, 2),
        "same_total_iou": same,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
