"""Peak memory of preparing training data (``mlseg.data.prepare_data``: decoding, masks ->
labels -> classes, stain normalisation, packing) against the way it was prepared before the
memory audit: every image decoded, labelled and normalised (threads) before any was packed,
then packed beside the list. Both run in this process on the same synthetic set, and every
array training receives is checked equal, bit for bit.

The set: ``--images`` H&E-like images of ``--side`` x ``--side`` pixels, disc nuclei of
radius 4-9 px (one per 1,700 px, of random paleness) on a pink background, 16-bit instance
masks; one image is held back for validation. Profile ``he`` (Macenko). Peaks are numpy
allocations traced by ``tracemalloc`` (the same figure on any machine for the same input),
in bytes per pixel of all images. Prints both, the ratio before / ours, then one JSON line.

    python bench/prep_memory.py [--side 2000] [--images 3] [--faint]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mlseg.config import Config, get_profile
from mlseg.data import (
    PatchStore,
    ValTiles,
    dataset_mask_kind,
    decode_pairs,
    effective_preprocess,
    faint_nuclei,
    prepare_data,
    resolve_target,
    split_validation,
)
from mlseg.dataset import list_pairs, mask_to_labels
from mlseg.io import write_image, write_labels
from mlseg.preprocess import normalize
from mlseg.targets import make_target


def write_set(root: Path, side: int, images: int, seed: int = 0) -> None:
    """``images`` pairs under ``root/train``: disc nuclei on an H&E-like background."""
    rng = np.random.default_rng(seed)
    for k in range(images):
        labels = np.zeros((side, side), np.uint16)
        paleness = np.zeros((side, side), np.float32)
        for i in range(side * side // 1700):
            y, x, r = *rng.integers(0, side, 2), int(rng.integers(4, 10))
            box = np.s_[max(0, y - r) : min(side, y + r + 1), max(0, x - r) : min(side, x + r + 1)]
            yy, xx = np.ogrid[box]
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
            labels[box][disc] = i % 60_000 + 1
            paleness[box][disc] = rng.uniform(0.2, 1.0)
        background, nucleus = np.array([232, 190, 210]), np.array([80, 50, 140])
        noise = rng.normal(0, 6, (side, side, 1))
        rgb = background + paleness[..., None] * (nucleus - background) + noise
        write_image(
            root / "train/original" / f"img{k:02d}.png", np.clip(rgb, 0, 255).astype(np.uint8)
        )
        write_labels(root / "train/masks" / f"img{k:02d}_mask.png", labels)


def before(cfg: Config, root: Path) -> tuple[PatchStore, ValTiles | None]:
    """``prepare_data``'s arrays as they were made before the memory audit (distinct
    images, no pixel sizes: the copies and scale steps change nothing here)."""
    profile = get_profile(cfg.profile)
    pairs = list_pairs(root, "train", cfg.data, strict=True)
    pp = effective_preprocess(cfg, profile)
    images, masks = decode_pairs(pairs, pp, profile, cfg.train.num_workers)
    kind = dataset_mask_kind(cfg.data.mask_kind, masks)
    target = resolve_target(cfg.train.target, kind, root)
    labels = [mask_to_labels(m, kind) for m in masks]
    val_idx = split_validation(len(pairs), cfg.data.val_fraction, cfg.data.seed)

    def prep(i: int) -> tuple[np.ndarray, np.ndarray]:
        x = normalize(images[i], pp, profile.stain, channels=profile.channels)
        return x, make_target(labels[i], target, cfg.train.boundary_px).astype(np.uint8)

    workers = cfg.train.num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        prepared = list(pool.map(prep, range(len(pairs))))
    train_idx = [i for i in range(len(pairs)) if i not in set(val_idx.tolist())]
    train = [prepared[i] for i in train_idx]
    val = [prepared[i] for i in val_idx]
    faint = None
    if cfg.train.faint_oversample > 0:
        xs, labs = [x for x, _ in train], [labels[i] for i in train_idx]
        faint = faint_nuclei(xs, labs, cfg.train.faint_quantile)
    cpu = torch.device("cpu")
    store = PatchStore([x for x, _ in train], [t for _, t in train], cpu, cfg.data.seed, faint)
    tiles = ValTiles.from_arrays(
        [x for x, _ in val], [t for _, t in val], cfg.train.patch_size, cpu
    )
    return store, tiles


def traced(fn, *args):
    tracemalloc.start()
    out = fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak


def same(a, b) -> bool:
    names = ["pixels", "classes", "offset", "height", "width", "fg", "fg_count", "faint_img"]
    names += ["faint_pos", "weights"]
    arrays = [(getattr(a[0], n), getattr(b[0], n)) for n in names]
    arrays += [(getattr(a[1], n), getattr(b[1], n)) for n in ("images", "classes", "valid")]
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--faint", action="store_true", help="train.faint_oversample 0.2")
    args = parser.parse_args()
    train = {"faint_oversample": 0.2} if args.faint else {}
    val_fraction = 1 / args.images  # one image held back
    cfg = Config(profile="he", train=train, data={"val_fraction": val_fraction})
    pixels = args.side * args.side * args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_set(root, args.side, args.images)
        old, old_peak = traced(before, cfg, root)
        data, new_peak = traced(prepare_data, cfg, root, get_profile("he"), torch.device("cpu"))
        identical = same(old, (data.train, data.val))
    row = {
        "images": args.images,
        "side": args.side,
        "faint": args.faint,
        "before_mb": round(old_peak / 1e6),
        "ours_mb": round(new_peak / 1e6),
        "before_bytes_per_px": round(old_peak / pixels, 1),
        "ours_bytes_per_px": round(new_peak / pixels, 1),
        "ratio": round(old_peak / new_peak, 2),
        "identical": identical,
    }
    print(
        f"{args.images} x {args.side}^2: before {row['before_mb']} MB "
        f"({row['before_bytes_per_px']} B/px), ours {row['ours_mb']} MB "
        f"({row['ours_bytes_per_px']} B/px), ratio {row['ratio']}; arrays identical: {identical}"
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
