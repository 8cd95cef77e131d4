"""Peak memory of the model input of one large field (``mlseg.preprocess.normalize`` with
Macenko stain normalisation, as ``mlseg segment`` makes it for an H&E model before tiled
inference) against the path as it was before the large-field audit: the whole uint8 image
converted to float32 first, then Macenko's float32 output made beside it.

The field is the H&E tiles of ``../shared/data`` (``--set``, default ``gbm40_he``) tiled
side by side to ``--side`` x ``--side`` pixels. Peaks are numpy allocations traced by
``tracemalloc`` beyond the field itself (the same figure on any machine for the same
input); both paths use the field's own stain estimate, made once. The outputs are checked
equal, bit for bit. Prints the peaks in MB and bytes per pixel and the ratio before /
ours, then one JSON line.

    python bench/field_memory.py [--side 4096] [--set gbm40_he]
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def field(name: str, side: int) -> np.ndarray:
    """``(side, side, 3) uint8``: the set's tiles repeated row by row, cropped to ``side``."""
    from mlseg.io import read_image

    tiles = [read_image(p)[..., :3] for p in sorted((DATA / name / "original").glob("*.png"))]
    if not tiles:
        sys.exit(f"no images in {DATA / name / 'original'}")
    t = min(min(tile.shape[:2]) for tile in tiles)
    n = -(-side // t)
    rows = [
        np.hstack([tiles[(i * n + j) % len(tiles)][:t, :t] for j in range(n)]) for i in range(n)
    ]
    return np.ascontiguousarray(np.vstack(rows)[:side, :side])


def before(image: np.ndarray, cfg, stains) -> np.ndarray:
    """The path as it was: a float32 copy of the whole field, then Macenko's output."""
    from mlseg.preprocess import macenko, macenko_target, to_float

    x = to_float(image)
    return macenko(x, *macenko_target(cfg), stains=stains)


def ours(image: np.ndarray, cfg, stains) -> np.ndarray:
    from mlseg.preprocess import normalize

    return normalize(image, cfg, "he", channels=3, stains=stains)


def peak(fn, *args) -> tuple[np.ndarray, int]:
    tracemalloc.start()
    out = fn(*args)
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, top


def main() -> None:
    from mlseg.config import PreprocessConfig
    from mlseg.preprocess import macenko_stains, to_float

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--set", default="gbm40_he")
    args = parser.parse_args()
    image = field(args.set, args.side)
    cfg = PreprocessConfig(stain_norm="macenko")
    stains = macenko_stains(to_float(image))
    old, old_peak = peak(before, image, cfg, stains)
    new, new_peak = peak(ours, image, cfg, stains)
    if not np.array_equal(old, new):
        sys.exit("the outputs differ")
    px = image.shape[0] * image.shape[1]
    for name, value in (("before", old_peak), ("ours", new_peak)):
        print(f"{name:>6}: {value / 1e6:8.0f} MB  {value / px:5.1f} bytes/pixel")
    ratio = old_peak / new_peak
    print(f"before / ours: {ratio:.2f}x (outputs identical)")
    print(json.dumps({"side": args.side, "set": args.set, "before_mb": round(old_peak / 1e6),
                      "ours_mb": round(new_peak / 1e6), "ratio": round(ratio, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
