"""Speed of ``mlseg validate`` against a loop that only decodes every file with OpenCV.

Generates N synthetic 512x512 image/mask pairs (H&E, IHC and fluorescence renders from
:mod:`mlseg.synth`, varied per pair by flips, shifts and noise so every image is distinct),
then measures in the same run:

- ``decode``: a plain single-process loop, ``cv2.imread(path, IMREAD_UNCHANGED)`` per file;
- ``validate``: ``mlseg validate DIR --out OUT`` as a user runs it (a fresh process: imports,
  parallel inventory, Great Expectations suites, Data Docs, Parquet/CSV/fingerprint output);
- the in-process breakdown: inventory only, and suites + Data Docs only.

Prints pairs/s for each and the ratio validate/decode (goal: >= 100 pairs/s, >= 0.7).

    python bench/validate_speed.py --n 1000 [--workers 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_pairs(root: Path, n: int, size: int = 512, seed: int = 0) -> Path:
    """Write ``n`` pairs in the contract layout (80 % train, 20 % test); return ``root``."""
    from mlseg.dataset import init_dataset
    from mlseg.io import write_image, write_labels
    from mlseg.synth import KINDS, synth_pair

    rng = np.random.default_rng(seed)
    templates = [synth_pair(KINDS[i % len(KINDS)], size, rng)[:2] for i in range(12)]
    init_dataset(root)
    n_test = n // 5
    for i in range(n):
        image, labels = templates[i % len(templates)]
        k, shift = int(rng.integers(4)), tuple(int(s) for s in rng.integers(0, size, 2))
        image = np.roll(np.rot90(image, k), shift, axis=(0, 1))
        labels = np.roll(np.rot90(labels, k), shift, axis=(0, 1))
        noise = rng.integers(-3, 4, image.shape, dtype=np.int16)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        split = "test" if i < n_test else "train"
        write_image(root / split / "original" / f"img{i:05d}.png", image)
        write_labels(root / split / "masks" / f"img{i:05d}_mask.png", labels)
    return root


def decode_loop(root: Path) -> tuple[float, float]:
    """Wall and CPU seconds to decode every image and mask once with OpenCV, one process."""
    import cv2

    cv2.setNumThreads(1)
    files = sorted(p for p in root.rglob("*.png"))
    start, cpu = time.perf_counter(), time.process_time()
    for path in files:
        if cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
            raise RuntimeError(f"{path}: not decoded")
    return time.perf_counter() - start, time.process_time() - cpu


def validate_cli(root: Path, out: Path, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``mlseg validate`` in a fresh process (what a user waits for)."""
    cmd = [sys.executable, "-m", "mlseg.cli", "validate", str(root), "--out", str(out)]
    cmd += ["--workers", str(workers), "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(
            f"mlseg validate failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return seconds, cpu


def breakdown(root: Path, out: Path, workers: int) -> tuple[float, float]:
    """In-process seconds of the inventory, then of the suites + Data Docs."""
    from expectations.runner import run_suites
    from mlseg.inventory import ValidateConfig, build_inventory

    start = time.perf_counter()
    inventory = build_inventory(root, ValidateConfig(workers=workers))
    t_inventory = time.perf_counter() - start
    start = time.perf_counter()
    report = run_suites(inventory, data_docs_dir=out / "data_docs")
    t_suites = time.perf_counter() - start
    if not report.success:
        raise RuntimeError(f"synthetic dataset failed validation: {report.failed_rules()}")
    return t_inventory, t_suites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="pairs to generate")
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core")
    parser.add_argument("--keep", type=Path, default=None, help="reuse/keep the dataset here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mlseg-bench-validate-"))
    root = args.keep or tmp / "ds"
    try:
        if not root.exists():
            start = time.perf_counter()
            make_pairs(root, args.n)
            print(f"generated {args.n} pairs of 512x512 in {time.perf_counter() - start:.1f} s")
        n = len(list((root / "train" / "original").iterdir())) + len(
            list((root / "test" / "original").iterdir())
        )
        decode_loop(root)  # warm the page cache so both timings read from memory
        t_decode, cpu_decode = decode_loop(root)
        t_validate, cpu_validate = validate_cli(root, tmp / "out_cli", args.workers)
        t_inventory, t_suites = breakdown(root, tmp / "out_lib", args.workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rate = "{:<42}{:8.1f} pairs/s  ({:.2f} s wall{})".format
        print(f"pairs: {n}, cores: {cores}, workers: {args.workers or cores}, load avg: {load:.1f}")
        print(
            rate(
                "decode-only loop (cv2.imread, 1 process):",
                n / t_decode,
                t_decode,
                f", {cpu_decode:.2f} s CPU",
            )
        )
        print(
            rate(
                "mlseg validate (CLI, fresh process):",
                n / t_validate,
                t_validate,
                f", {cpu_validate:.2f} s CPU",
            )
        )
        print(rate("  inventory only (in process):", n / t_inventory, t_inventory, ""))
        print(f"  suites + Data Docs (in process): {t_suites:.2f} s")
        print(f"ratio validate / decode (wall): {t_decode / t_validate:.2f}  (goal >= 0.7)")
        print(f"ratio inventory / decode (wall): {t_decode / t_inventory:.2f}")
        ms = 1000 / n
        print(f"CPU per pair: decode {cpu_decode * ms:.1f} ms, validate {cpu_validate * ms:.1f} ms")
        result = {
            "bench": "validate_speed",
            "pairs": n,
            "decode_pairs_per_s": round(n / t_decode, 1),
            "validate_pairs_per_s": round(n / t_validate, 1),
            "inventory_pairs_per_s": round(n / t_inventory, 1),
            "ratio": round(t_decode / t_validate, 3),
            "goal": 0.7,
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a --keep dataset lies outside tmp


if __name__ == "__main__":
    main()
