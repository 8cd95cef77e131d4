"""Magnification sweep: does a model find nuclei at scales no dataset here was scanned at?

The shared H&E sets hold two magnifications (20x and 40x), so scenario b of
``robustness.py`` tests automatic scale estimation (:mod:`mlseg.scale`) on two scales only.
This script resamples each labelled tile of known pixel size by a range of factors (image
area-averaged when shrunk and cubic when enlarged, mask nearest-neighbour), as if it had
been scanned at other magnifications, and segments every copy three ways:

- ``given``: its pixel size given (``pixel_size / factor``), so the model's own pixel size
  decides the resampling: the best scale handling can do;
- ``auto``: no pixel size, automatic scale estimation from a first pass (the default for
  images without one);
- ``native``: no rescaling (``inference.auto_scale=false``), the pixel size given only for
  the physical size limits: the baseline, what a model without scale handling does (with
  neither, the profile's pixel size limits would differ from the other modes' too).

It prints, per factor and mode, the means of Dice, AJI, PQ and the median |count error|,
the median factor automatic estimation chose against the one the pixel size gives, and
``auto`` over ``given`` and over ``native`` (Dice and PQ ratios); writes ``per_image.csv``,
``summary.csv`` and ``scale_sweep.png`` (Dice, PQ and count error against magnification);
and ends with one JSON line.

    python bench/scale_sweep.py --model DIR                    # cpm15 tiles at the model's scale
    python bench/scale_sweep.py --model DIR --data ROOT --all-tiles --factors 0.5,1,2
    python bench/scale_sweep.py --model DIR --data TRAINING_ROOT --held-out   # in-domain

``--data`` is a dataset in the mlseg layout whose manifest gives pixel sizes (``mlseg
ingest --pixel-sizes``); by default the ``cpm15_he`` tiles of ``../shared/data`` are
ingested with ``bench/data/cpm15_he_pixel_sizes.csv``. Only tiles already at the model's
pixel size are swept unless ``--all-tiles``, so a factor reads as magnification relative to
training (0.5 = a 20x scan for a 40x model).
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

from bench.robustness import DATA, PIXEL_SIZES, flat_source, ingest_all  # noqa: E402

FACTORS = (0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83)  # half-octave steps, ~14x to ~113x for 40x
MODES = ("given", "auto", "native")


def resample_pair(image, truth, factor: float):
    """``image`` and its label image as if scanned at ``factor`` times the magnification."""
    from mlseg.preprocess import rescale, resize_labels

    if factor == 1.0:
        return image, truth
    scaled = rescale(image, 1.0, 1.0 / factor, order=3)
    return scaled, resize_labels(truth, scaled.shape[:2])


def sweep(loaded, pairs, factors, modes, overrides: dict) -> list[dict]:
    """One row per (tile, factor, mode): scores, counts and the scale chosen."""
    import numpy as np
    from tqdm import tqdm

    from mlseg.config import get_profile
    from mlseg.dataset import mask_to_labels
    from mlseg.evaluate import score_labels
    from mlseg.io import read_image, read_mask
    from mlseg.segment import predict_labels_scaled

    profile = get_profile(loaded.config.profile, loaded.config.profiles_file)
    base = loaded.config.inference.model_copy(update=overrides)
    configs = {
        "given": base,
        "auto": base,
        "native": base.model_copy(update={"auto_scale": False}),
    }
    rows = []
    jobs = [(pair, f) for pair in pairs for f in factors]
    for pair, factor in tqdm(jobs, desc="tiles x factors", unit="copy"):
        image0 = read_image(pair.image)
        truth0 = mask_to_labels(read_mask(pair.mask), "instance")
        image, truth = resample_pair(image0, truth0, factor)
        px = pair.pixel_size_um / factor
        for mode in modes:
            t0 = time.perf_counter()
            pred, _, scale = predict_labels_scaled(
                loaded,
                image,
                profile,
                configs[mode],
                pixel_size_um=None if mode == "auto" else px,
            )
            seconds = time.perf_counter() - t0
            row = score_labels(np.asarray(pred, np.int32), truth)
            row.update(
                stem=pair.stem,
                factor=factor,
                pixel_size_um=px,
                mode=mode,
                needed_factor=px / loaded.pixel_size_um,
                **scale.as_row(),
                predict_s=seconds,
            )
            rows.append(row)
    return rows


def summarise(df):
    """Means per (factor, mode): Dice, AJI, PQ, median |count error|, median chosen factor."""
    df = df.assign(count_error_abs_rel=(df.n_pred - df.n_true).abs() / df.n_true.clip(lower=1))
    grouped = df.groupby(["factor", "mode"], sort=True)
    out = grouped[["dice", "aji", "pq"]].mean()
    out["median_count_error"] = grouped["count_error_abs_rel"].median()
    out["chosen_factor"] = grouped["scale_factor"].median()
    out["needed_factor"] = grouped["needed_factor"].median()
    out["images"] = grouped.size()
    return out.reset_index()


def plot(summary, path: Path) -> Path:
    """Dice, PQ and median |count error| against magnification relative to the tiles'."""
    from mlseg.plots import _figure, _save

    fig = _figure(15, 4)
    ax_dice, ax_pq, ax_count = fig.subplots(1, 3)
    for mode, part in summary.groupby("mode", sort=False):
        ax_dice.plot(part.factor, part.dice, marker="o", label=mode)
        ax_pq.plot(part.factor, part.pq, marker="o", label=mode)
        ax_count.plot(part.factor, 100 * part.median_count_error, marker="o", label=mode)
    panels = (
        (ax_dice, "Dice (mean)"),
        (ax_pq, "PQ (mean)"),
        (ax_count, "median |count error| (%)"),
    )
    for ax, label in panels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(summary.factor.unique()))
        ax.set_xticklabels([f"{f:g}" for f in sorted(summary.factor.unique())])
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set(xlabel="magnification relative to the tiles' own", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax_dice.set_ylim(0, 1)
    ax_pq.set_ylim(0, 1)
    fig.suptitle("Resampled tiles: pixel size given, estimated (auto), or ignored (native)")
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="trained checkpoint folder")
    parser.add_argument("--data", type=Path, help="labelled dataset with pixel sizes")
    parser.add_argument("--split", default="train", help="split of --data to score")
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--all-tiles", action="store_true", help="not only the model's scale")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="--data is the model's training set: score only the images its training held out",
    )
    parser.add_argument("--limit", type=int, default=0, help="at most this many tiles")
    parser.add_argument("--set", action="append", default=[], help="inference.key=value")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    factors = sorted({float(f) for f in args.factors.split(",") if f.strip()})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not factors or min(factors) <= 0:
        raise SystemExit(f"--modes from {MODES}, --factors positive; got {args.modes}, {factors}")

    import numpy as np
    import pandas as pd
    import torch
    import yaml

    from mlseg.data import split_validation
    from mlseg.dataset import list_pairs
    from mlseg.io import write_table
    from mlseg.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="mlseg-scale-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    root = args.data
    if root is None:
        if not (DATA / "cpm15_he").is_dir():
            print(f"skipped: {DATA} has no cpm15_he (the shared data is absent); give --data")
            return 0
        sizes = [PIXEL_SIZES / "cpm15_he_pixel_sizes.csv"]
        root = ingest_all(flat_source(out / "src_cpm", [DATA / "cpm15_he"]), out / "cpm15", sizes)
    loaded = load_model(args.model, device=args.device)
    if loaded.pixel_size_um is None:
        raise SystemExit(
            f"{args.model}: the model records no pixel size, so no magnification is relative "
            "to it; train with preprocess.target_pixel_size_um set"
        )
    overrides = {"device": args.device}
    for item in args.set:
        key, _, value = item.partition("=")
        if not key.startswith("inference.") or not value:
            raise SystemExit(f"--set {item!r}: use inference.key=value")
        overrides[key.removeprefix("inference.")] = yaml.safe_load(value)
    pairs = list_pairs(root, args.split, loaded.config.data, strict=False)
    if args.held_out:  # the split mlseg.data.prepare_data made when training
        data = loaded.config.data
        pairs = [pairs[i] for i in split_validation(len(pairs), data.val_fraction, data.seed)]
    missing = [p.stem for p in pairs if p.pixel_size_um is None]
    if missing:
        raise SystemExit(
            f"{root}: no pixel size for {', '.join(missing[:5])}; ingest with --pixel-sizes"
        )
    if not args.all_tiles:
        pairs = [p for p in pairs if np.isclose(p.pixel_size_um, loaded.pixel_size_um, rtol=0.02)]
    pairs = pairs[: args.limit or None]
    if not pairs:
        raise SystemExit(
            f"{root}: no labelled tile at the model's {loaded.pixel_size_um} um/px "
            "(--all-tiles sweeps every tile relative to its own pixel size)"
        )
    print(f"{len(pairs)} tiles x {len(factors)} factors x modes {modes}; model {args.model}")
    df = pd.DataFrame(sweep(loaded, pairs, factors, modes, overrides))
    write_table(df, out / "per_image.csv")
    summary = summarise(df)
    write_table(summary, out / "summary.csv")
    plot(summary, out / "scale_sweep.png")
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    result = {"model": str(args.model), "tiles": len(pairs), "out": str(out)}
    for metric in ("dice", "pq"):
        table = summary.pivot(index="factor", columns="mode", values=metric)
        for mode in modes:
            result[f"{metric}_{mode}"] = {f"{f:g}": round(v, 4) for f, v in table[mode].items()}
        for base in ("given", "native"):
            if "auto" in table and base in table:
                ratio = table["auto"] / table[base].clip(lower=1e-6)
                result[f"{metric}_auto_over_{base}"] = {
                    f"{f:g}": round(v, 3) for f, v in ratio.items()
                }
                cells = "  ".join(f"x{f:g} {v:.2f}" for f, v in ratio.items())
                print(f"auto / {base} {metric}: {cells}")
    print(f"outputs in {out}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
