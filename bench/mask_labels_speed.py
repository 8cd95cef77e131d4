"""Reading a mask's nuclei (``mlseg.dataset.mask_to_labels``, as ``mlseg quantify``,
``mlseg evaluate`` and training read every mask) against the function as it was before the
CPU profile of the forty-first session, whose binary-or-instance test (``mask_kind``) sorted
every pixel (``np.unique``) to count the distinct non-zero values.

Masks: every mask of the shared sets (``../shared/data``; cpm15_he, gbm40_he,
dsb2018_stage1_test: 120 instance masks), as they are and made binary (0/255, split into
components), read before timing. Every label image is checked equal, bit for bit and dtype.
Both run interleaved ``--repeats`` times; the best CPU time of each is kept (the machine may be
shared). Prints masks/s for both and the ratio, then one JSON line.

    python bench/mask_labels_speed.py [--sets cpm15_he gbm40_he dsb2018_stage1_test] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(sets: list[str]) -> list[np.ndarray]:
    """Every mask of ``sets`` as ``read_mask`` gives it, and its binary (0/255) version."""
    from mlseg.io import read_mask

    masks = []
    for name in sets:
        for path in sorted((DATA / name / "masks").glob("*_mask.png")):
            mask = read_mask(path)
            masks += [mask, np.where(mask > 0, 255, 0).astype(np.int32)]
    return masks


def mask_kind_before(mask: np.ndarray) -> str:
    """``mlseg.dataset.mask_kind`` before the profile: the distinct values sorted."""
    values = np.unique(mask)
    return "binary" if values[values != 0].size <= 1 else "instance"


def before(mask: np.ndarray) -> np.ndarray:
    """``mask_to_labels`` with the earlier ``mask_kind``."""
    from mlseg.dataset import mask_to_labels

    return mask_to_labels(mask, mask_kind_before(mask))


def run(fn, masks) -> tuple[list[np.ndarray], float]:
    start = time.process_time()
    out = [fn(mask) for mask in masks]
    return out, time.process_time() - start


def main() -> None:
    from mlseg.dataset import mask_to_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sets", nargs="+", default=["cpm15_he", "gbm40_he", "dsb2018_stage1_test"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    masks = load(args.sets)
    best_ours = best_before = math.inf
    identical = True
    for _ in range(args.repeats):
        ours, s_ours = run(mask_to_labels, masks)
        earlier, s_before = run(before, masks)
        identical &= all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(ours, earlier, strict=True)
        )
        best_ours, best_before = min(best_ours, s_ours), min(best_before, s_before)
    n = len(masks)
    print(f"{n} masks ({n // 2} instance, {n // 2} binary)")
    print(f"ours   {best_ours:7.3f} s CPU  {n / best_ours:7.1f} masks/s")
    print(f"before {best_before:7.3f} s CPU  {n / best_before:7.1f} masks/s")
    print(f"identical labels: {identical}; ratio {best_before / best_ours:.2f}")
    result = {
        "masks": n,
        "cpu_s_ours": round(best_ours, 3),
        "cpu_s_before": round(best_before, 3),
        "ratio": round(best_before / best_ours, 2),
        "identical": identical,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
