"""Quality smoke bar: train with a config, evaluate on a test split, print the scores.

    python bench/quality.py                         # synthetic demo set, 3 minutes, auto device
    python bench/quality.py --budget 300steps --device cpu
    python bench/quality.py --data ../shared/data/gbm40_he --budget 10min --device cuda

``--data`` is a dataset in the mlseg layout, or any layout ``mlseg ingest`` reads (e.g. the
flat ``original/`` + ``masks/`` folders of ``../shared/data``), which is then imported into
a temporary folder with a seeded 80/20 train/test split. Without ``--data`` the synthetic
demo set (:func:`mlseg.synth.make_dataset`) is generated. ``--budget`` is ``<N>steps`` or
``<M>min``; a time budget is turned into steps by timing a few training steps first.
Prints the per-image table, the means of Dice, AJI, PQ, F1 and count error and the median
|relative| count error, writes the worst-cases PNG, and ends with one JSON line. Goal on
the synthetic set: Dice >= 0.90 within a few CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.robustness import abs_count_error, parse_sets  # noqa: E402

CPU_PRESET = {"encoder": "resnet18", "patch_size": 128}


def parse_budget(text: str) -> tuple[str, float]:
    """``"300steps"`` -> ("steps", 300); ``"3min"`` / ``"90s"`` -> ("seconds", ...)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(steps?|min|m|s|sec)\s*", text)
    if not m:
        raise SystemExit(f"--budget {text!r}: use e.g. 300steps, 3min or 90s")
    value, unit = float(m.group(1)), m.group(2)
    if unit.startswith("step"):
        return "steps", value
    return "seconds", value * 60 if unit in ("min", "m") else value


def with_budget(cfg, budget: str):
    """``cfg`` with ``max_steps`` (and validation, warm-up, patience) fitted to ``budget``."""
    kind, amount = parse_budget(budget)
    if kind == "steps":
        steps = max(1, int(amount))
    else:
        # validation, data preparation and checkpoints take their share of the budget
        per_step = seconds_per_step(cfg, 3, 3, n=4)
        steps = max(1, int(0.8 * amount / per_step))
        print(f"budget {amount:.0f} s at {per_step:.2f} s/step -> {steps} steps", flush=True)
    tc = cfg.train
    return cfg.model_copy(
        update={
            "train": tc.model_copy(
                update={
                    "max_steps": steps,
                    "val_every": max(1, min(tc.val_every, steps // 5 or 1)),
                    "warmup_steps": min(tc.warmup_steps, steps // 10),
                    "early_stop_patience": max(tc.early_stop_patience, 10),
                }
            )
        }
    )


def seconds_per_step(cfg, in_channels: int, classes: int, n: int = 3) -> float:
    """Time ``n`` training steps on random data (the first is a warm-up and not counted)."""
    import torch

    from mlseg.model import autocast_dtype, build_model, resolve_device
    from mlseg.train import SegLoss, train_step, warmup_cosine

    tc = cfg.train
    device = resolve_device(tc.device)
    model = build_model(tc, in_channels, classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(1, 10))
    target = "binary" if classes == 1 else "three_class"
    loss_fn = SegLoss(target, 1.0, 1.0, 1.0).to(device)
    amp = autocast_dtype(device, tc.amp)
    memory = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.to(memory_format=memory)
    x = torch.rand(tc.batch_size, in_channels, tc.patch_size, tc.patch_size, device=device)
    x = x.contiguous(memory_format=memory)
    y = torch.randint(
        0,
        classes if classes > 1 else 2,
        (tc.batch_size, tc.patch_size, tc.patch_size),
        device=device,
    )
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        float(train_step(model, opt, sched, loss_fn, x, y, amp_dtype=amp, grad_clip=tc.grad_clip))
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]  # median after the warm-up step


def dataset_root(data: Path | None, workdir: Path, n_train: int, n_test: int, size: int) -> Path:
    from mlseg.synth import make_dataset

    if data is None:
        return make_dataset(workdir / "synth", n_train=n_train, n_test=n_test, size=size, seed=0)
    if (data / "train").is_dir():
        return data
    from mlseg.ingest import ingest

    return ingest(data, workdir / "ingested", test_fraction=0.2, seed=0, link=True).root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="dataset (default: synthetic demo set)")
    parser.add_argument(
        "--test-data", type=Path, help="separate dataset whose test split is scored"
    )
    parser.add_argument("--budget", default="3min", help="<N>steps or <M>min (default 3min)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: the config's)")
    parser.add_argument("--config", type=Path, help="YAML run config (default: mlseg defaults)")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    parser.add_argument(
        "--preset",
        choices=("auto", "default", "cpu"),
        default="auto",
        help="without --config: 'default' trains mlseg's defaults; 'cpu' the same U-Net with "
        "a resnet18 encoder on 128-px patches (CPU-sized); 'auto' picks 'cpu' on a CPU",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="section.key=value, applied last (e.g. train.amp=false)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--n-train", type=int, default=24, help="synthetic training images")
    parser.add_argument("--n-test", type=int, default=8, help="synthetic test images")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side, px")
    args = parser.parse_args(argv)

    import torch

    from mlseg.config import load_config
    from mlseg.evaluate import evaluate
    from mlseg.train import fit
    from mlseg.tune import apply_params

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="mlseg-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    root = dataset_root(args.data, workdir, args.n_train, args.n_test, args.size)
    test_root = dataset_root(args.test_data, workdir / "test", 0, 0, 0) if args.test_data else root
    from mlseg.model import resolve_device

    overrides = {"device": args.device} if args.device else {}
    cfg = load_config(args.config, train=overrides) if overrides else load_config(args.config)
    on_cpu = resolve_device(cfg.train.device).type == "cpu"
    if args.config is None and (args.preset == "cpu" or (args.preset == "auto" and on_cpu)):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=CPU_PRESET)})
        print(f"CPU preset: {CPU_PRESET} (else mlseg defaults; --preset default to train those)")
    if args.data is None and args.config is None:
        # The synthetic set mixes H&E, IHC and fluorescence: no H&E stain normalisation.
        from mlseg.config import PreprocessConfig

        cfg = cfg.model_copy(update={"preprocess": PreprocessConfig()})
    sets = parse_sets(args.set)
    cfg = apply_params(
        cfg, {f"{s}.{k}": v for s, values in sets.items() for k, v in values.items()}
    )
    cfg = with_budget(cfg, args.budget)
    t0 = time.perf_counter()
    result = fit(cfg, root, workdir / "model", resume=False, progress=True)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = evaluate(result.out_dir, test_root, workdir / "eval", progress=False)
    eval_s = time.perf_counter() - t0
    import pandas as pd

    cols = ["stem", "dice", "aji", "pq", "f1", "n_true", "n_pred", "count_error"]
    with pd.option_context("display.width", 120, "display.max_rows", 200):
        print(scores.per_image[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    m = scores.means
    # Issue 8's bar: the median over images of |predicted - true| / true (a signed mean
    # lets over- and under-counting images cancel).
    median_count_error = float(abs_count_error(scores.per_image).median())
    device = str(
        torch.device(cfg.train.device)
        if cfg.train.device != "auto"
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    print(
        f"\nmeans over {len(scores.per_image)} test images: Dice {m['dice']:.4f}  AJI {m['aji']:.4f}  "
        f"PQ {m['pq']:.4f}  F1 {m['f1']:.4f}  count error {m['count_error']:+.2f} nuclei per image "
        f"(median |relative| {median_count_error:.1%})"
    )
    print(
        f"trained {result.steps} steps in {train_s:.0f} s ({result.images_per_s:.1f} img/s); evaluated in {eval_s:.0f} s"
    )
    print(f"worst cases: {scores.worst_png}")
    summary = {
        "bench": "quality",
        "data": str(args.data or "synthetic"),
        "device": device,
        "steps": result.steps,
        "train_s": round(train_s, 1),
        "images_per_s": round(result.images_per_s, 2),
        "best_val_dice": result.best_val_dice,
        **{k: round(m[k], 4) for k in ("dice", "aji", "pq", "f1", "count_error")},
        "median_count_error": round(median_count_error, 4),
        "goal_dice": 0.90,
        "out": str(workdir),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
