"""Fluorescence nuclei on real tiles: the shipped recipe against the classical pipeline.

Trains mlseg's default recipe with the ``fluorescence`` profile on a seeded split (70/30) of
the fluorescence tiles of ``../shared/data/dsb2018_stage1_test`` (chosen by the
``modality_guess`` column of its ``index.csv``: many labs, microscopes and magnifications,
no pixel sizes known), then scores its test split against the pipeline most fluorescence
labs run, on the same tiles, in the same run: CellProfiler's IdentifyPrimaryObjects with
its default threshold (minimum cross-entropy, i.e. Li's, global) on the grey image, holes
filled, touching nuclei declumped by shape (watershed of the distance transform from its
local maxima), objects smaller than the profile's ``min_area_px`` dropped, as mlseg drops
them.

Prints a per-image table of both, their means (Dice, AJI, PQ, F1@0.5, median |count
error|), the ratios model / classical, writes ``per_image.csv`` and ends with one JSON line.

    python bench/fluorescence.py --budget 1000steps --device cpu --threads 2 --out DIR
    python bench/fluorescence.py --model DIR/model --out DIR2 --set inference.auto_scale=false
    python bench/fluorescence.py --model DIR/model --out DIR3 --split validation \
        --watershed seed_threshold=0.7 --watershed elevation=boundary

``--set section.key=value`` overrides the run config; ``inference.*`` keys also apply when
scoring, so ``--model`` with them rescores a trained model another way. ``--watershed``
changes the profile's instance separation for scoring; choose it on ``--split validation``
(the training run's own validation tiles), never on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from quality import with_budget  # noqa: E402
from robustness import dsb_brightfield_stems, flat_source, parse_sets  # noqa: E402

DSB = REPO.parent / "shared" / "data" / "dsb2018_stage1_test"
DECLUMP_MIN_DISTANCE_PX = 7  # CellProfiler's automatic choice for its default 10-40 px diameter


def classical_labels(image, min_area_px: int):
    """Li threshold, holes filled, shape declumping, small objects dropped: ``(H, W)`` labels."""
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_li
    from skimage.segmentation import watershed

    grey = image.astype(np.float32).mean(axis=2)
    foreground = ndi.binary_fill_holes(grey > threshold_li(grey))
    components, _ = ndi.label(foreground)
    small = np.bincount(components.ravel()) < min_area_px
    small[0] = False
    foreground &= ~small[components]
    components, _ = ndi.label(foreground)
    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(
        distance, min_distance=DECLUMP_MIN_DISTANCE_PX, labels=components, exclude_border=False
    )
    markers = np.zeros(grey.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=foreground)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_area_px] = 0
    return labels.astype(np.int32)


def fluorescence_dataset(out: Path) -> Path:
    """The fluorescence tiles of DSB2018 stage 1, ingested with a seeded 70/30 split."""
    from mlseg.ingest import ingest

    dataset = out / "dataset"
    if (dataset / "manifest.csv").is_file():  # a rerun into the same --out
        return dataset
    stems = {p.stem for p in (DSB / "original").glob("*.png")} - dsb_brightfield_stems(DSB)
    source = flat_source(out / "src", [DSB], {DSB: stems})
    return ingest(source, dataset, test_fraction=0.3, seed=0, link=True, progress=False).root


def validation_dataset(dataset: Path, loaded, out: Path) -> Path:
    """A dataset whose test split links the training run's own validation tiles, as its
    meta.json names them (drawn anew, the split would miss the copies training holds back
    together, :func:`mlseg.data.split_validation`'s groups, and score tiles it trained on)."""
    from mlseg.dataset import init_dataset, list_pairs, split_dir

    cfg = loaded.config
    held = (loaded.meta.get("split") or {}).get("validation")
    if not held:
        raise SystemExit(f"{loaded.path.parent}: meta.json names no validation tiles to score")
    chosen = [pair for pair in list_pairs(dataset, "train", cfg.data) if pair.stem in set(held)]
    root = out / "validation"
    if not root.exists():
        init_dataset(root, cfg.data)
        base = split_dir(root, cfg.data, "test")
        for pair in chosen:
            (base / cfg.data.image_dir / pair.image.name).symlink_to(pair.image.resolve())
            (base / cfg.data.mask_dir / pair.mask.name).symlink_to(pair.mask.resolve())
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", default="1000steps", help="<N>steps or <M>min")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: the config's)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    parser.add_argument("--model", type=Path, help="score this trained model instead of training")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument(
        "--watershed",
        action="append",
        default=[],
        help="key=value of the profile's watershed for scoring, e.g. seed_threshold=0.7",
    )
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="score the test split, or the training run's own validation tiles (for choosing)",
    )
    args = parser.parse_args(argv)
    if not DSB.is_dir():
        print(f"skipped: {DSB} not found (the shared real data)")
        return 0

    import pandas as pd
    import torch
    import yaml

    from mlseg.config import get_profile, load_config
    from mlseg.dataset import list_pairs, mask_to_labels
    from mlseg.evaluate import evaluate, score_labels
    from mlseg.io import read_image, read_mask
    from mlseg.model import load_model
    from mlseg.train import fit
    from mlseg.tune import apply_params

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="mlseg-fluorescence-"))
    out.mkdir(parents=True, exist_ok=True)
    dataset = fluorescence_dataset(out)
    model, train_s = args.model, None
    sets = parse_sets(args.set)
    if model is None:
        overrides = {"train": {"device": args.device}} if args.device else {}
        cfg = load_config(None, profile="fluorescence", **overrides)
        cfg = apply_params(cfg, {f"{s}.{k}": v for s, kv in sets.items() for k, v in kv.items()})
        cfg = with_budget(cfg, args.budget)
        started = time.perf_counter()
        model = fit(cfg, dataset, out / "model", resume=False, progress=True).out_dir
        train_s = time.perf_counter() - started
    loaded = load_model(model, device="cpu")
    saved = loaded.config
    inference = saved.inference.model_copy(update=sets.get("inference", {}))  # also scoring
    profile = get_profile("fluorescence")
    changed = {k: v for k, _, v in (w.partition("=") for w in args.watershed)}
    changed = {k: yaml.safe_load(v) for k, v in changed.items()}
    profile = profile.model_copy(update={"watershed": profile.watershed.model_copy(update=changed)})
    scored = dataset if args.split == "test" else validation_dataset(dataset, loaded, out)
    scores = evaluate(
        model, scored, out / "eval", profile=profile, inference_cfg=inference, progress=False
    )

    rows = []
    for pair in list_pairs(scored, "test"):
        truth = mask_to_labels(read_mask(pair.mask))
        row = score_labels(classical_labels(read_image(pair.image), profile.min_area_px), truth)
        rows.append({"stem": pair.stem, **row})
    classical = pd.DataFrame(rows)
    cols = ["dice", "aji", "pq", "f1", "n_pred"]
    table = scores.per_image[["stem", "n_true", *cols, "count_error_rel"]].merge(
        classical[["stem", *cols, "count_error_rel"]], on="stem", suffixes=("", "_classical")
    )
    table.to_csv(out / "per_image.csv", index=False)
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    def means(suffix: str) -> dict[str, float]:
        m = {k: float(table[f"{k}{suffix}"].mean()) for k in ("dice", "aji", "pq", "f1")}
        # Series.median skips the NaN of a tile without true nuclei (np.median returned NaN).
        m["median_abs_count_error"] = float(table[f"count_error_rel{suffix}"].abs().median())
        return m

    mlseg_m, classical_m = means(""), means("_classical")
    print(f"\n{len(table)} {args.split} tiles ({int(table['n_true'].sum())} nuclei)")
    for name, m in (("mlseg", mlseg_m), ("classical", classical_m)):
        print(
            f"{name:>10}: Dice {m['dice']:.3f}  AJI {m['aji']:.3f}  PQ {m['pq']:.3f}  "
            f"F1 {m['f1']:.3f}  median |count error| {m['median_abs_count_error']:.1%}"
        )
    ratio = {k: mlseg_m[k] / classical_m[k] for k in ("dice", "aji", "pq") if classical_m[k]}
    print("ratio mlseg / classical: " + "  ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    print(
        json.dumps(
            {
                "bench": "fluorescence",
                "split": args.split,
                "tiles": len(table),
                "watershed": changed,
                "train_s": round(train_s, 1) if train_s is not None else None,
                "mlseg": mlseg_m,
                "classical": classical_m,
                "ratio": ratio,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
