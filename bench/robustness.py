"""Scale and stain robustness on real H&E from another lab (issue 8).

Scenarios (``--scenarios``, comma-separated):

- ``a``: train on ``gbm40_he`` (pixel sizes from ``bench/data/gbm40_he_pixel_sizes.csv``),
  test on all of ``cpm15_he`` with its pixel sizes (``bench/data/cpm15_he_pixel_sizes.csv``);
- ``b``: the same model, test on ``cpm15_he`` WITHOUT pixel sizes (automatic scale
  estimation from the nuclei, :mod:`mlseg.scale`);
- ``c``: train on ``gbm40_he`` + ``cpm15_he``, test on the brightfield tiles of
  ``dsb2018_stage1_test`` (chosen by the ``modality_guess`` column of its ``index.csv``;
  no pixel size known, so automatic scale estimation).

Pixel sizes are data (CSV files handed to :func:`mlseg.ingest.ingest`), never code. Each
scenario prints a per-image table (with the scale factor used), the means of Dice, AJI,
PQ, F1@0.5 and the median relative count error, writes ``worst_<scenario>.png``
(image | truth | prediction) and ends with one JSON line per scenario. For a and b it also
prints the recall of the annotated nuclei by how pale they are (mean haematoxylin optical
density after Macenko normalisation) against GBM40's annotated nuclei, and writes
``per_nucleus_<scenario>.csv``.

    python bench/robustness.py --budget 8min --device cpu --threads 2      # CPU, reduced
    python bench/robustness.py --budget 2500steps --device cuda --preset default   # GPU bar

``--set section.key=value`` overrides the run config (e.g. ``augment.hed_p=0`` to switch
HED augmentation off, ``preprocess.stain_norm=none``); ``inference.*`` keys also apply when
scoring (e.g. ``inference.tta=true``). ``--model DIR`` evaluates an existing checkpoint for
scenarios a/b instead of training.
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

DATA = REPO.parent / "shared" / "data"
PIXEL_SIZES = REPO / "bench" / "data"
CANONICAL_UM = 0.25  # training pixel size: GBM40's own (40x), so nothing is downsampled
CPU_PRESET = {"encoder": "resnet18", "patch_size": 128}
BARS = {"a": {"dice": 0.78, "aji": 0.55, "median_count_error": 0.15}, "b": {"dice": 0.72}}


# ----------------------------------------------------------------------------- data
def flat_source(out: Path, sources: list[Path], stems: dict[Path, set[str]] | None = None) -> Path:
    """A flat ``original/`` + ``masks/`` folder of links to the chosen images of ``sources``."""
    (out / "original").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for src in sources:
        keep = None if stems is None else stems.get(src)
        for image in sorted((src / "original").iterdir()):
            if image.suffix.lower() != ".png" or (keep is not None and image.stem not in keep):
                continue
            mask = src / "masks" / f"{image.stem}_mask.png"
            for target, link in (
                (image, out / "original" / image.name),
                (mask, out / "masks" / mask.name),
            ):
                if not link.is_symlink():  # a rerun into the same --out keeps its links
                    link.symlink_to(target.resolve())
    return out


def ingest_all(src: Path, dst: Path, pixel_sizes: list[Path] | None) -> Path:
    """Ingest every pair of ``src`` into the ``train`` split of a new dataset at ``dst``
    (``test_fraction=0``), with per-image pixel sizes from the CSV files given; one there
    already (a rerun into the same --out) is kept where it holds these sizes."""
    import shutil

    import pandas as pd

    from mlseg.ingest import ingest, read_pixel_sizes

    table = None
    if pixel_sizes:
        table = dst.parent / f"{dst.name}_pixel_sizes.csv"
        pd.concat([pd.read_csv(p, dtype={"stem": str}) for p in pixel_sizes]).to_csv(
            table, index=False
        )
    if (dst / "manifest.csv").is_file():  # a rerun into the same --out: ingested already
        manifest = pd.read_csv(dst / "manifest.csv", dtype={"stem": str})
        held = dict(zip(manifest["stem"], manifest["pixel_size_um"], strict=True))
        given = read_pixel_sizes(table) if table is not None else {}
        if all(held.get(stem) == um for stem, um in given.items()):
            return dst
        shutil.rmtree(dst)  # a corrected size table: ingested again with its sizes
    return ingest(
        src, dst, test_fraction=0.0, seed=0, link=True, pixel_sizes=table, progress=False
    ).root


def dsb_brightfield_stems(root: Path) -> set[str]:
    """Stems of the dsb2018 tiles whose ``modality_guess`` is not fluorescence.

    The index's ``modality_guess`` values hold unquoted commas (``fluorescence(gray,dark
    bg)``), so rows are split by hand: the id is the first field, the modality the fields
    between the 7th and the last (``usage``)."""
    import csv

    with (root / "index.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, rows = rows[0], rows[1:]
    first = header.index("modality_guess")
    modality = {r[0]: ",".join(r[first:-1]) for r in rows if len(r) > first}
    return {stem for stem, m in modality.items() if "fluorescence" not in m.lower()}


# ----------------------------------------------------------------------------- train / score
def train(cfg, root: Path, out: Path, budget: str, resume: bool = False):
    """Train ``cfg`` for ``budget`` into ``out``; with ``resume``, continue the run an
    interrupted call left there (mlseg.train.fit checks it was trained the same way)."""
    from bench.quality import with_budget
    from mlseg.errors import ResumeError
    from mlseg.train import fit

    cfg = with_budget(cfg, budget)
    if resume:
        check_resumable(out, cfg)
    t0 = time.perf_counter()
    try:
        result = fit(cfg, root, out, resume=resume, progress=False)
    except ResumeError as error:
        raise SystemExit(f"{error} (here: the same --set, or another --out)") from None
    seconds = time.perf_counter() - t0
    ensure_reference_diameter(out, cfg, root)
    done = "trained" if not resume else "trained up to"
    print(
        f"{done} {result.steps} steps, {seconds:.0f} s this call ({result.images_per_s:.1f} img/s)"
    )
    return result, seconds


def check_resumable(out: Path, cfg) -> None:
    """Refuse to resume a run in ``out`` trained for another budget. ``fit`` refuses other
    model, data and recipe settings itself, but lets a run grow longer; a benchmark's
    figures are for one budget."""
    from mlseg.train import _changed

    path = out / "config.json"
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), cfg.model_dump(mode="json")
    changed = _changed(saved, now, "train", ("max_steps", "val_every", "early_stop_patience"))
    if changed:
        raise SystemExit(
            f"{out}: cannot resume, its run was trained for another budget "
            f"({'; '.join(changed)}); give the same --budget, or another --out"
        )


def ensure_reference_diameter(model_dir: Path, cfg, root: Path) -> float | None:
    """The checkpoint's ``nucleus_diameter_px``; computed from the training masks (at the
    training pixel size) and added to ``meta.json`` when the trainer did not record it, or
    recorded it with an older statistic (bench-trained checkpoints only)."""
    from mlseg.config import get_profile
    from mlseg.data import decode_pairs, effective_preprocess
    from mlseg.dataset import list_pairs, mask_to_labels
    from mlseg.scale import META_KEY, META_STAT_KEY, STATISTIC, dataset_diameter_px

    meta_path = model_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta.get(META_KEY) and meta.get(META_STAT_KEY) == STATISTIC:
        return float(meta[META_KEY])
    profile = get_profile(cfg.profile, cfg.profiles_file)
    pairs = list_pairs(root, "train", cfg.data, strict=True)
    _, masks = decode_pairs(pairs, effective_preprocess(cfg, profile), profile)
    diameter = dataset_diameter_px([mask_to_labels(m, "instance") for m in masks])
    meta[META_KEY], meta[META_STAT_KEY] = diameter, STATISTIC
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"reference nucleus diameter (bench-computed): {diameter:.1f} px")
    return diameter


def trained_on(model_dir: Path) -> list[str] | None:
    """Where each stretch of the model's training ran (``meta.json``; None for models saved
    before it was recorded): the same seed trains another model on another machine."""
    stretches = json.loads((Path(model_dir) / "meta.json").read_text()).get("trained_on")
    if not stretches:
        return None
    return [
        f"from step {s['from_step']}: {s['device']}, {s['hardware']}, {s['kernels']}"
        + (f", {s['threads']} threads" if "threads" in s else "")
        + f", torch {s['torch']}"
        + (f", {s['precision']}" if "precision" in s else "")
        for s in stretches
    ]


def paleness(image, labels, profile):
    """Mean haematoxylin optical density of each nucleus of ``labels`` (ascending label
    order) after Macenko normalisation: a lab-independent measure of how pale it is.
    ``profile``: an H&E profile (its stain vectors unmix the normalised image)."""
    import numpy as np

    from mlseg.preprocess import macenko
    from mlseg.quantify import measure

    normalised = (macenko(image) * 255).round().astype(np.uint8)
    table = measure(labels, normalised, profile, pixel_size_um=None)
    return table["hematoxylin_od_mean"].to_numpy()


def training_paleness(root: Path) -> tuple[float, float]:
    """5th and 25th percentiles of :func:`paleness` over the annotated nuclei of a
    ``original/`` + ``masks/*_mask.png`` folder (the training lab)."""
    import numpy as np

    from mlseg.config import get_profile
    from mlseg.dataset import mask_to_labels
    from mlseg.io import read_image, read_mask

    profile = get_profile("he")
    values = [
        paleness(read_image(path), mask_to_labels(read_mask(mask), "instance"), profile)
        for path in sorted((root / "original").glob("*.png"))
        if (mask := root / "masks" / f"{path.stem}_mask.png").is_file()
    ]
    p5, p25 = np.percentile(np.concatenate(values), [5, 25])
    return float(p5), float(p25)


def best_iou(pred, truth):
    """Each true object's best IoU with any predicted object (ascending label order)."""
    import numpy as np

    from mlseg.metrics import contingency

    ti, pi, inter, true_area, pred_area = contingency(pred, truth)
    best = np.zeros(true_area.size)
    np.maximum.at(best, ti, inter / (true_area[ti] + pred_area[pi] - inter))
    return best


def recall_by_paleness(nuclei, reference: tuple[float, float]) -> dict:
    """Object recall (IoU > 0.5) of the test nuclei in three bands of the training lab's
    paleness: paler than its 5th percentile, 5th-25th, the rest (None: no nucleus there)."""
    p5, p25 = reference
    od = nuclei["hematoxylin_od_mean"]
    bands = {"pale": od <= p5, "light": (od > p5) & (od <= p25), "typical": od > p25}
    out = {}
    for band, mask in bands.items():
        found = nuclei.loc[mask, "best_iou"] > 0.5
        out[f"share_{band}"] = round(float(mask.mean()), 3)
        out[f"recall_{band}"] = round(float(found.mean()), 3) if found.size else None
    return out


def abs_count_error(df):
    """|predicted - true| / true object count per row of a per-image table (an image
    without true objects counts its predictions)."""
    return (df["n_pred"] - df["n_true"]).abs() / df["n_true"].clip(lower=1)


def probability_mean(models):
    """One three-class model whose softmax is the mean of the ``models``' softmaxes (an
    ensemble, nnU-Net's way with its folds): it returns the log of the mean probabilities."""
    import torch
    from torch import nn

    class ProbabilityMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(models)

        def forward(self, x):
            probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
            return probs.clamp_min(1e-12).log()

    return ProbabilityMean().eval()


def score(
    model_dir: Path,
    root: Path,
    use_pixel_sizes: bool,
    out_png: Path,
    name: str,
    inference: dict | None = None,
    nuclei: list | None = None,
    ensemble: list[Path] | None = None,
):
    """Per-image scores of every labelled image of ``root``'s train split (as a test set);
    ``inference`` overrides keys of the checkpoint's inference config (e.g. ``tta``).
    ``nuclei``, if given, receives one table per image: each annotated nucleus's paleness
    and best IoU with the prediction. ``ensemble``: checkpoints of the same recipe (training
    pixel size, target, preprocessing) whose probabilities are averaged with the model's."""
    import numpy as np
    import pandas as pd

    from mlseg.config import get_profile
    from mlseg.dataset import list_pairs, mask_to_labels
    from mlseg.evaluate import WORST_SHOWN, score_labels
    from mlseg.io import read_image, read_mask
    from mlseg.model import autocast_dtype, load_model, resolve_device
    from mlseg.plots import plot_worst
    from mlseg.scale import META_KEY, nucleus_diameter_px, statistic_of
    from mlseg.segment import predict_labels_scaled

    loaded = load_model(model_dir, device="cpu")
    if ensemble:
        members = [load_model(d, device="cpu") for d in ensemble]
        for d, other in zip(ensemble, members, strict=True):
            same = (other.target, other.pixel_size_um, other.config.preprocess) == (
                loaded.target,
                loaded.pixel_size_um,
                loaded.config.preprocess,
            )
            if not same:
                sys.exit(f"{d}: not the recipe of {model_dir}; an ensemble needs one recipe")
        if loaded.target != "three_class":
            sys.exit(f"{model_dir}: a {loaded.target} model; --ensemble averages three-class ones")
        loaded.model = probability_mean([loaded.model, *(m.model for m in members)])
    reference, statistic = loaded.meta.get(META_KEY), statistic_of(loaded.meta)
    cfg = loaded.config.inference.model_copy(update=inference or {})
    device = resolve_device(cfg.device)
    loaded.model.to(device)
    bf16 = autocast_dtype(device, cfg.amp) is not None
    profile = get_profile(loaded.config.profile, loaded.config.profiles_file)
    if not use_pixel_sizes:  # unknown: a profile's own size would stand in for it
        profile = profile.model_copy(update={"pixel_size_um": None})
    rows, worst = [], []
    for pair in list_pairs(root, "train", loaded.config.data, strict=False):
        image = read_image(pair.image)
        truth = mask_to_labels(read_mask(pair.mask), "instance")
        px = pair.pixel_size_um if use_pixel_sizes else None
        t0 = time.perf_counter()
        pred, _, scale = predict_labels_scaled(loaded, image, profile, cfg, pixel_size_um=px)
        seconds = time.perf_counter() - t0
        pred = np.asarray(pred, np.int32)
        row = {"stem": pair.stem[:16], **score_labels(pred, truth)}
        if nuclei is not None:
            od = paleness(image, truth, profile)
            table = pd.DataFrame({"stem": pair.stem, "hematoxylin_od_mean": od})
            nuclei.append(table.assign(best_iou=best_iou(pred, truth)))
        row.update(pixel_size_um=px, **scale.as_row(), predict_s=seconds, network_bf16=bf16)
        # the factor the annotated nuclei ask for (training diameter / theirs): where it
        # and scale_factor agree, a poor score is the model's, not the scale's
        truth_px = nucleus_diameter_px(truth, statistic=statistic)
        row["truth_factor"] = reference / truth_px if reference and truth_px else None
        rows.append(row)
        caption = f"{name} Dice {row['dice']:.2f} AJI {row['aji']:.2f} x{scale.factor:.2f}"
        worst.append((row["dice"], (pair.stem[:16], image, truth, pred, caption)))
    worst = sorted(worst, key=lambda item: item[0])[:WORST_SHOWN]
    plot_worst([item for _, item in worst], out_png)
    df = pd.DataFrame(rows)
    df["count_error_abs_rel"] = abs_count_error(df)
    means = {k: float(df[k].mean()) for k in ("dice", "aji", "pq", "f1")}
    means["median_count_error"] = float(df["count_error_abs_rel"].median())
    return df, means


def bands_line(name: str, bands: dict, n: int) -> str:
    parts = []
    for band, label in (
        ("pale", "paler than its 5th percentile"),
        ("light", "5th-25th"),
        ("typical", "above its 25th"),
    ):
        found = bands[f"recall_{band}"]
        found_text = "none" if found is None else f"{found:.0%} found"
        parts.append(f"{label} {bands[f'share_{band}']:.0%} of nuclei, {found_text}")
    return (
        f"scenario {name}: recall (IoU > 0.5) of the {n} annotated nuclei by paleness "
        "(haematoxylin OD after Macenko) against the training lab's annotated nuclei: "
        + "; ".join(parts)
    )


def report(name: str, df, means: dict, extra: dict, note: str = "") -> dict:
    import pandas as pd

    from mlseg.evaluate import describe_errors

    cols = ["stem", "pixel_size_um", "scale_factor", "scale_source", "est_diameter_px"]
    cols += ["truth_factor"]
    cols += ["dice", "aji", "pq", "f1"]
    cols += ["obj_precision", "obj_recall", "n_true", "n_pred", "count_error_abs_rel"]
    print(f"\n== scenario {name} ==")
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    bars = BARS.get(name, {})
    verdict = {
        k: (means[k] <= v if k == "median_count_error" else means[k] >= v) for k, v in bars.items()
    }
    print(
        f"means over {len(df)} images: Dice {means['dice']:.4f}  AJI {means['aji']:.4f}  "
        f"PQ {means['pq']:.4f}  F1 {means['f1']:.4f}  "
        f"median |count error| {means['median_count_error']:.1%}"
        + (f"  bars {bars} met: {verdict}" if bars else "")
    )
    print(describe_errors(df))
    if note:
        print(note)
    summary = {"scenario": name, **{k: round(v, 4) for k, v in means.items()}, **extra}
    print(json.dumps(summary), flush=True)
    return summary


def parse_sets(items: list[str]) -> dict[str, dict]:
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if not field:
            raise SystemExit(f"--set {item!r}: use section.key=value")
        out.setdefault(section, {})[field] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="a,b,c")
    parser.add_argument("--budget", default="8min", help="<N>steps or <M>min per training")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", type=Path, help="YAML run config (default: mlseg defaults)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument("--preset", choices=("auto", "default", "cpu"), default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model", type=Path, help="existing checkpoint for scenarios a/b")
    parser.add_argument("--model-c", type=Path, help="existing checkpoint for scenario c")
    parser.add_argument(
        "--ensemble",
        type=Path,
        action="append",
        default=[],
        help="checkpoint of the same recipe averaged with --model for scenarios a/b (repeatable)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the trainings an interrupted run left in --out (same --set and --budget)",
    )
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not (args.data / "gbm40_he").is_dir():
        print(f"skipped: {args.data} has no gbm40_he (the shared data is absent)")
        return 0

    import pandas as pd
    import torch

    from mlseg.config import load_config
    from mlseg.model import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="mlseg-robust-"))
    out.mkdir(parents=True, exist_ok=True)
    sets = parse_sets(args.set)
    sets.setdefault("preprocess", {}).setdefault("target_pixel_size_um", CANONICAL_UM)
    sets.setdefault("train", {})["device"] = args.device
    sets.setdefault("inference", {})["device"] = args.device
    cfg = load_config(args.config, **sets)
    on_cpu = resolve_device(cfg.train.device).type == "cpu"
    if args.config is None and (args.preset == "cpu" or (args.preset == "auto" and on_cpu)):
        update = {k: v for k, v in CPU_PRESET.items() if k not in sets.get("train", {})}
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
        print(f"CPU preset: {update}")
    device = str(resolve_device(cfg.train.device))
    common = {"device": device, "sets": args.set}  # the budget only where this run trained
    gbm, cpm, dsb = (args.data / n for n in ("gbm40_he", "cpm15_he", "dsb2018_stage1_test"))
    sizes = {"gbm40": PIXEL_SIZES / "gbm40_he_pixel_sizes.csv"}
    sizes["cpm15"] = PIXEL_SIZES / "cpm15_he_pixel_sizes.csv"
    summaries = []
    if {"a", "b"} & set(scenarios):
        cpm_root = ingest_all(flat_source(out / "src_cpm", [cpm]), out / "cpm15", [sizes["cpm15"]])
        model_dir, extra = args.model, dict(common)
        if model_dir is None:
            gbm_root = ingest_all(
                flat_source(out / "src_gbm", [gbm]), out / "gbm40", [sizes["gbm40"]]
            )
            result, seconds = train(cfg, gbm_root, out / "model_gbm40", args.budget, args.resume)
            model_dir = result.out_dir
            extra.update(budget=args.budget, steps=result.steps, train_s=round(seconds, 1))
        reference = training_paleness(gbm)
        for name, given in (("a", True), ("b", False)):
            if name in scenarios:
                png = out / f"worst_{name}.png"
                nuclei: list = []
                df, means = score(
                    model_dir, cpm_root, given, png, name, sets["inference"], nuclei, args.ensemble
                )
                df.to_csv(out / f"per_image_{name}.csv", index=False)
                table = pd.concat(nuclei, ignore_index=True)
                table.to_csv(out / f"per_nucleus_{name}.csv", index=False)
                bands = recall_by_paleness(table, reference)
                extra_ab = {**extra, **bands, "model": str(model_dir)}
                extra_ab["trained_on"] = trained_on(model_dir)
                extra_ab["inference_bf16"] = bool(df["network_bf16"].all())
                if args.ensemble:
                    extra_ab["ensemble"] = [str(d) for d in args.ensemble]
                note = bands_line(name, bands, len(table))
                summaries.append(report(name, df, means, extra_ab, note))
    if "c" in scenarios:
        both = ingest_all(
            flat_source(out / "src_both", [gbm, cpm]),
            out / "gbm40_cpm15",
            [sizes["gbm40"], sizes["cpm15"]],
        )
        model_c, extra = args.model_c, dict(common)
        if model_c is None:
            result, seconds = train(cfg, both, out / "model_both", args.budget, args.resume)
            model_c = result.out_dir
            extra.update(budget=args.budget, steps=result.steps, train_s=round(seconds, 1))
        bright = flat_source(out / "src_dsb", [dsb], {dsb: dsb_brightfield_stems(dsb)})
        dsb_root = ingest_all(bright, out / "dsb_bright", None)
        df, means = score(model_c, dsb_root, False, out / "worst_c.png", "c", sets["inference"])
        df.to_csv(out / "per_image_c.csv", index=False)
        extra.update(model=str(model_c), trained_on=trained_on(model_c))
        extra["inference_bf16"] = bool(df["network_bf16"].all())
        summaries.append(report("c", df, means, extra))
    print(f"\noutputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
