"""Other scans of the same tissue: does a model still find the nuclei?

Labs differ in magnification, focus and compression, and the shared H&E sets hold two
magnifications (20x, 40x) from two scanners. This script turns each labelled tile of known
pixel size into other scans of it along one ``--axis`` and segments every copy:

- ``scale``: resampled by factors 0.35-2.83 (image area-averaged when shrunk, cubic when
  enlarged; mask nearest-neighbour), as if scanned at another magnification;
- ``blur``: a Gaussian of sigma 0-1 um, as if out of focus;
- ``jpeg``: re-encoded at JPEG quality 100-30, as whole-slide scanners compress.

Each copy is segmented in up to three modes:

- ``given``: its pixel size given, so the model's own pixel size decides the resampling:
  the shipped path for images with a pixel size;
- ``auto``: no pixel size, automatic scale estimation from a first pass
  (:mod:`mlseg.scale`, the default for images without one);
- ``native`` (``scale`` only): no rescaling (``inference.auto_scale=false``), the pixel size
  kept only for the physical size limits: what a model without scale handling does.

It prints, per level and mode, the means of Dice, AJI and PQ, the median |count error|, the
median area ratio of matched nuclei (predicted / annotated: the size bias every area and
length in the measurements carries) and the median factor the estimation chose against the
one the pixel size gives; then ratios against a baseline of the same run: ``auto`` over
``given`` and over ``native`` for ``scale``, each mode over the untouched tile for ``blur``
and ``jpeg`` (Dice and PQ). It writes ``per_image.csv`` (with the error kinds),
``summary.csv`` and ``<axis>_sweep.png``, and ends with one JSON line.

    python bench/scanner_sweep.py --model DIR                  # scale, cpm15 40x tiles
    python bench/scanner_sweep.py --model DIR --axis blur
    python bench/scanner_sweep.py --model DIR --data ROOT --all-tiles --levels 0.5,1,2
    python bench/scanner_sweep.py --model DIR --data TRAINING_ROOT --held-out   # in-domain

``--data`` is a dataset in the mlseg layout whose manifest gives pixel sizes (``mlseg
ingest --pixel-sizes``); by default the ``cpm15_he`` tiles of ``../shared/data`` are
ingested with ``bench/data/cpm15_he_pixel_sizes.csv``. Only tiles already at the model's
pixel size are used unless ``--all-tiles``, so a scale factor reads as magnification
relative to training (0.5 = a 20x scan for a 40x model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.robustness import (  # noqa: E402
    DATA,
    PIXEL_SIZES,
    abs_count_error,
    flat_source,
    ingest_all,
)

MODES = ("given", "auto", "native")
#: Each mode's line in the figure: a colour and a marker of its own. Matplotlib's first three
#: colours (blue, orange, green) drew auto and native 1 apart (CIEDE2000) for a red-blind
#: reader and 15 for a green-blind one (Machado 2009 simulation); these are 38 or more apart.
MODE_STYLES = {
    "given": {"color": "#0072b2", "marker": "o"},
    "auto": {"color": "#d55e00", "marker": "s"},
    "native": {"color": "#000000", "marker": "^"},
}


@dataclass(frozen=True)
class Axis:
    """One way a scan can differ: its levels, the untouched level, the default modes."""

    levels: tuple[float, ...]
    untouched: float
    modes: tuple[str, ...]
    label: str


AXES = {
    # half-octave steps: ~14x to ~113x for 40x tiles
    "scale": Axis(
        (0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83),
        1.0,
        MODES,
        "magnification relative to the tiles' own",
    ),
    # Gaussian sigma in microns: 0.5 um is 2 px at 40x, about the blur of a slightly
    # defocused field; 0.25 um is within what the training's blur augmentation draws
    "blur": Axis((0.0, 0.25, 0.5, 0.75, 1.0), 0.0, ("given", "auto"), "Gaussian blur sigma (um)"),
    # baseline JPEG quality of whole-slide scanners is ~70-90; 100 = the tile as stored
    "jpeg": Axis((100, 90, 70, 50, 30), 100, ("given", "auto"), "JPEG quality"),
}


def degrade(image, truth, pixel_size_um: float, axis: str, level: float):
    """``(image, truth, pixel_size_um)`` as another scan would give them: ``scale``
    resamples by ``level`` (image area-averaged or cubic, labels nearest), ``blur``
    convolves with a Gaussian of ``level`` microns, ``jpeg`` re-encodes at quality
    ``level``. The untouched level returns the inputs."""
    import cv2

    from mlseg.preprocess import rescale, resize_labels

    if level == AXES[axis].untouched:
        return image, truth, pixel_size_um
    if axis == "scale":
        scaled = rescale(image, 1.0, 1.0 / level, order=3)
        return scaled, resize_labels(truth, scaled.shape[:2]), pixel_size_um / level
    if image.dtype != "uint8":
        raise SystemExit(f"--axis {axis} needs 8-bit tiles, got {image.dtype}")
    if axis == "blur":
        sigma = level / pixel_size_um
        out = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
        return out.reshape(image.shape), truth, pixel_size_um
    grey = image.shape[2] == 1
    bgr = image[..., 0] if grey else image[..., ::-1]
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(level)])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    out = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    return (out[..., None] if grey else out[..., ::-1].copy()), truth, pixel_size_um


def sweep(loaded, pairs, axis: str, levels, modes, overrides: dict) -> list[dict]:
    """One row per (tile, level, mode): scores, counts and the scale chosen."""
    import numpy as np
    from tqdm import tqdm

    from mlseg.config import get_profile
    from mlseg.dataset import mask_to_labels
    from mlseg.evaluate import score_labels
    from mlseg.io import read_image, read_mask
    from mlseg.segment import predict_labels_scaled

    profile = get_profile(loaded.config.profile, loaded.config.profiles_file)
    # auto: no size known, not even the profile's, which would stand in for the image's
    unknown = profile.model_copy(update={"pixel_size_um": None})
    base = loaded.config.inference.model_copy(update=overrides)
    configs = {
        "given": base,
        "auto": base,
        "native": base.model_copy(update={"auto_scale": False}),
    }
    rows = []
    progress = tqdm(total=len(pairs) * len(levels), desc=f"tiles x {axis} levels", unit="copy")
    for pair in pairs:  # each tile read once, degraded to every level
        image0 = read_image(pair.image)
        truth0 = mask_to_labels(read_mask(pair.mask), "instance")
        for level in levels:
            image, truth, px = degrade(image0, truth0, pair.pixel_size_um, axis, level)
            for mode in modes:
                t0 = time.perf_counter()
                pred, _, scale = predict_labels_scaled(
                    loaded,
                    image,
                    unknown if mode == "auto" else profile,
                    configs[mode],
                    pixel_size_um=None if mode == "auto" else px,
                )
                seconds = time.perf_counter() - t0
                row = score_labels(np.asarray(pred, np.int32), truth)
                row.update(
                    stem=pair.stem,
                    axis=axis,
                    level=level,
                    pixel_size_um=px,
                    mode=mode,
                    needed_factor=px / loaded.pixel_size_um,
                    **scale.as_row(),
                    predict_s=seconds,
                )
                rows.append(row)
            progress.update()
    progress.close()
    return rows


def summarise(df):
    """Means per (level, mode): Dice, AJI, PQ, median |count error|, median area ratio of
    matched nuclei (the size bias of the measurements), median chosen factor."""
    df = df.assign(count_error_abs_rel=abs_count_error(df))
    grouped = df.groupby(["level", "mode"], sort=True)
    out = grouped[["dice", "aji", "pq"]].mean()
    out["median_count_error"] = grouped["count_error_abs_rel"].median()
    out["area_ratio"] = grouped["area_ratio"].median()
    out["chosen_factor"] = grouped["scale_factor"].median()
    out["needed_factor"] = grouped["needed_factor"].median()
    out["images"] = grouped.size()
    return out.reset_index()


def plot(summary, axis: str, path: Path) -> Path:
    """Dice, PQ, median |count error| and area ratio against the level, one line per mode."""
    from mlseg.plots import _figure, _save

    spec = AXES[axis]
    levels = sorted(summary.level.unique())
    fig = _figure(20, 4)
    ax_dice, ax_pq, ax_count, ax_area = fig.subplots(1, 4)
    for mode, part in summary.groupby("mode", sort=False):
        style = MODE_STYLES[mode]
        ax_dice.plot(part.level, part.dice, label=mode, **style)
        ax_pq.plot(part.level, part.pq, label=mode, **style)
        ax_count.plot(part.level, 100 * part.median_count_error, label=mode, **style)
        ax_area.plot(part.level, part.area_ratio, label=mode, **style)
    ax_area.axhline(1.0, color="black", lw=1)
    panels = (
        (ax_dice, "Dice (mean)"),
        (ax_pq, "PQ (mean)"),
        (ax_count, "median |count error| (%)"),
        (ax_area, "matched area / annotated (median)"),
    )
    for ax, label in panels:
        if axis == "scale":
            ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{v:g}" for v in levels])
        if axis == "jpeg":
            ax.invert_xaxis()  # worse to the right, as for blur
        ax.axvline(spec.untouched, color="grey", ls="--", lw=1)
        ax.set(xlabel=spec.label, ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax_dice.set_ylim(0, 1)
    ax_pq.set_ylim(0, 1)
    fig.suptitle("Tiles as other scans: pixel size given, estimated (auto), or ignored (native)")
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="trained checkpoint folder")
    parser.add_argument("--data", type=Path, help="labelled dataset with pixel sizes")
    parser.add_argument("--split", default="train", help="split of --data to score")
    parser.add_argument("--axis", choices=sorted(AXES), default="scale")
    parser.add_argument("--levels", help="comma-separated (default: the axis's own)")
    parser.add_argument("--modes", help=f"comma-separated, from {', '.join(MODES)}")
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
    spec = AXES[args.axis]
    levels = spec.levels
    if args.levels:
        try:
            levels = tuple(sorted({float(v) for v in args.levels.split(",") if v.strip()}))
        except ValueError:
            raise SystemExit(f"--levels {args.levels!r}: comma-separated numbers") from None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else spec.modes
    bad_modes = sorted(set(modes) - set(spec.modes))
    if bad_modes or not modes:
        raise SystemExit(f"--modes for --axis {args.axis}: from {', '.join(spec.modes)}")
    valid = {"scale": lambda v: v > 0, "blur": lambda v: v >= 0, "jpeg": lambda v: 1 <= v <= 100}
    if not levels or not all(map(valid[args.axis], levels)):
        raise SystemExit(
            f"--levels {args.levels!r}: scale factors > 0, blur sigmas >= 0 um, "
            "JPEG qualities 1-100"
        )
    if spec.untouched not in levels:  # the baseline every ratio is taken against
        levels = tuple(sorted({*levels, spec.untouched}))

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
    out = args.out or Path(tempfile.mkdtemp(prefix=f"mlseg-{args.axis}-sweep-"))
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
    print(f"{len(pairs)} tiles x {args.axis} {levels} x modes {modes}; model {args.model}")
    df = pd.DataFrame(sweep(loaded, pairs, args.axis, levels, modes, overrides))
    write_table(df, out / "per_image.csv")
    summary = summarise(df)
    write_table(summary, out / "summary.csv")
    plot(summary, args.axis, out / f"{args.axis}_sweep.png")
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    result = {"model": str(args.model), "axis": args.axis, "tiles": len(pairs), "out": str(out)}
    for metric in ("dice", "pq"):
        table = summary.pivot(index="level", columns="mode", values=metric)
        for mode in modes:
            result[f"{metric}_{mode}"] = {f"{v:g}": round(x, 4) for v, x in table[mode].items()}
        if args.axis == "scale":
            bases = [base for base in ("given", "native") if {"auto", base} <= set(modes)]
            ratios = {f"auto_over_{base}": table["auto"] / table[base] for base in bases}
        else:  # each mode against the untouched tile, segmented the same way
            ratios = {f"{m}_over_untouched": table[m] / table.loc[spec.untouched, m] for m in modes}
        for name, ratio in ratios.items():
            ratio = ratio.replace([np.inf, -np.inf], np.nan)
            result[f"{metric}_{name}"] = {f"{v:g}": round(x, 3) for v, x in ratio.items()}
            cells = "  ".join(f"{v:g}: {x:.2f}" for v, x in ratio.items())
            print(f"{metric} {name.replace('_', ' ')}: {cells}")
    print(f"outputs in {out}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
