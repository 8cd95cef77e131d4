"""Training throughput of mlseg against a plain smp + PyTorch loop, measured in the same run.

    python bench/train_speed.py --device cpu --steps 6 --batch 4 --size 128      # CPU
    python bench/train_speed.py --device cpu --steps 4 --fp32-baseline           # CPU precision
    python bench/train_speed.py --device cuda --batch 64 --steps 60               # GPU, random data
    python bench/train_speed.py --device cuda --batch 64 --data DATASET --compile # GPU, full loop

Mode "random" (default): ``mlseg.train.train_step`` (its loss, AdamW, warm-up/cosine
schedule, gradient clipping, and MixStyle in the encoder when ``train.mixstyle_p`` > 0, as
``fit`` attaches it) against a plain loop (``smp.create_model``, smp's DiceLoss +
cross-entropy, AdamW), on the same model configuration, batch and random tensors already
on the device. Both use the same amp / channels-last / compile settings (amp: bf16
autocast on CUDA and on a CPU with bf16 in hardware, as ``fit`` decides). Rounds alternate
the loops so that load on a shared machine hits all alike; medians are reported. With
``--fp32-baseline`` a third loop, mlseg in float32 without channels-last (how the CPU
trained before the twenty-third session), gives ``ratio_vs_fp32``.

Mode "data" (``--data DIR``): the full ``mlseg.train.fit`` loop reading a real dataset from
disk, decoding it once to the device, cutting and augmenting every batch there, with
validation and checkpoints; throughput is that of its second epoch (the first holds the
warm-up and compilation). The plain loop on random data runs in the same process as the
baseline. Goal on an H100/H200: >= 1,800 img/s for U-Net resnet34 at 256x256.

Warm-up steps are excluded from every timing; CUDA is synchronised before each clock read.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_cfg(args):
    from mlseg.config import TrainConfig

    return TrainConfig(
        arch=args.arch,
        encoder=args.encoder,
        patch_size=args.size,
        batch_size=args.batch,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        max_steps=10_000,
    )


def mlseg_loop(args, device, classes: int, **settings):
    """A callable running ``n`` mlseg training steps on fixed random data (``settings``:
    train config values to override, e.g. ``amp=False``)."""
    import torch

    from mlseg.model import autocast_dtype, build_model
    from mlseg.train import SegLoss, train_step, warmup_cosine

    tc = _train_cfg(args).model_copy(update=settings)
    model = build_model(tc, 3, classes).to(device)
    if tc.mixstyle_p > 0:  # as fit() does
        from mlseg.mixstyle import attach

        attach(model, tc.encoder, tc.mixstyle_p, tc.mixstyle_alpha, tc.seed)
    cl = tc.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if tc.compile else model
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc.warmup_steps, tc.max_steps))
    target = "binary" if classes == 1 else "three_class"
    loss_fn = SegLoss(target, tc.dice_weight, tc.ce_weight, tc.boundary_weight).to(device)
    amp = autocast_dtype(device, tc.amp)
    x, y = _random_batch(args, device, classes, cl)

    def run(n: int) -> float:
        running = torch.zeros((), device=device)
        for _ in range(n):
            running += train_step(
                net, opt, sched, loss_fn, x, y, amp_dtype=amp, grad_clip=tc.grad_clip
            )
        return float(running)

    return run


def plain_loop(args, device, classes: int):
    """The same with nothing but smp and PyTorch."""
    import segmentation_models_pytorch as smp
    import torch

    from mlseg.model import autocast_dtype

    model = smp.create_model(
        args.arch, encoder_name=args.encoder, encoder_weights=None, in_channels=3, classes=classes
    )
    model = model.to(device)
    cl = args.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-3, weight_decay=1e-4, fused=device.type == "cuda"
    )
    mode = smp.losses.BINARY_MODE if classes == 1 else smp.losses.MULTICLASS_MODE
    dice = smp.losses.DiceLoss(mode, from_logits=True)
    ce = torch.nn.BCEWithLogitsLoss() if classes == 1 else torch.nn.CrossEntropyLoss()
    use_amp = autocast_dtype(device, args.amp) is not None
    x, y = _random_batch(args, device, classes, cl)
    y_ce = y[:, None].float() if classes == 1 else y

    def run(n: int) -> float:
        running = torch.zeros((), device=device)
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(x)
            loss = dice(logits.float(), y) + ce(logits.float(), y_ce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
        return float(running)

    return run


def _random_batch(args, device, classes: int, channels_last: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, max(classes, 2), (args.batch, args.size, args.size), generator=g).to(
        device
    )
    return x, y


def timed(run, n: int, device, batch: int) -> float:
    """Images per second of ``run(n)`` (the device is drained before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    run(n)
    _sync(device)
    return n * batch / (time.perf_counter() - t0)


def random_mode(args, device) -> dict:
    loops = {
        "mlseg": mlseg_loop(args, device, args.classes),
        "plain": plain_loop(args, device, args.classes),
    }
    if args.fp32_baseline:
        loops["mlseg_fp32"] = mlseg_loop(args, device, args.classes, amp=False, channels_last=False)
    for name, run in loops.items():
        t0 = time.perf_counter()
        run(args.warmup)
        print(
            f"{name}: warm-up {args.warmup} steps in {time.perf_counter() - t0:.1f} s", flush=True
        )
    seen: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name, run in loops.items():
            seen[name].append(timed(run, args.steps, device, args.batch))
            print(f"round {r + 1} {name}: {seen[name][-1]:.2f} img/s", flush=True)
    mid = {name: statistics.median(v) for name, v in seen.items()}
    pair = [m / p for m, p in zip(seen["mlseg"], seen["plain"], strict=True)]
    figures = {
        "mlseg_img_s": mid["mlseg"],
        "plain_img_s": mid["plain"],
        "ratio": mid["mlseg"] / mid["plain"],
        "ratio_per_round": [round(r, 3) for r in pair],
    }
    if args.fp32_baseline:
        figures["mlseg_fp32_img_s"] = mid["mlseg_fp32"]
        figures["ratio_vs_fp32"] = mid["mlseg"] / mid["mlseg_fp32"]
    return figures


def data_mode(args, device) -> dict:
    from mlseg.config import Config, load_config
    from mlseg.train import fit

    base = load_config(args.config) if args.config else Config()
    tc = base.train.model_copy(
        update={
            **_train_cfg(args).model_dump(
                include={
                    "arch",
                    "encoder",
                    "patch_size",
                    "batch_size",
                    "device",
                    "amp",
                    "channels_last",
                    "compile",
                }
            ),
            "max_steps": 2 * args.steps,
            "val_every": args.steps,
            "warmup_steps": min(base.train.warmup_steps, args.steps),
            "num_workers": base.train.num_workers,
        }
    )
    cfg = base.model_copy(update={"train": tc})
    out = Path(tempfile.mkdtemp(prefix="mlseg-speed-"))
    t0 = time.perf_counter()
    result = fit(cfg, args.data, out, resume=False, progress=False)
    total = time.perf_counter() - t0
    hist = result.history
    print(hist.to_string(index=False), flush=True)
    full = float(hist["images_per_s"].iloc[-1])
    classes = json.loads((out / "meta.json").read_text())["classes"]
    plain = plain_loop(args, device, classes)
    plain(args.warmup)
    plain_ips = statistics.median(
        timed(plain, args.steps, device, args.batch) for _ in range(args.rounds)
    )
    return {
        "mlseg_full_img_s": full,
        "plain_img_s": plain_ips,
        "ratio": full / plain_ips,
        "fit_seconds": total,
        "first_epoch_img_s": float(hist["images_per_s"].iloc[0]),
        "goal_img_s": 1800,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps per round (data mode: per epoch)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best counts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument(
        "--classes", type=int, default=3, choices=(1, 3), help="1 binary, 3 three-class"
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on CUDA or a CPU with bf16 in hardware",
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--fp32-baseline",
        action="store_true",
        help="random mode: also time mlseg in float32 without channels-last (ratio_vs_fp32)",
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--data", type=Path, help="dataset: time the full fit loop on it")
    parser.add_argument(
        "--config", type=Path, help="base run config for --data (augmentation etc.)"
    )
    args = parser.parse_args(argv)

    import torch

    from mlseg.model import autocast_dtype, resolve_device
    from mlseg.train import machine

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    figures = data_mode(args, device) if args.data else random_mode(args, device)
    where = machine(device)
    name = (
        where["hardware"]
        if device.type == "cuda"
        else f"{where['hardware']} ({where['kernels']}), {where['threads']} threads"
    )
    summary = {
        "bench": "train_speed",
        "mode": "data" if args.data else "random",
        "device": name,
        "arch": args.arch,
        "encoder": args.encoder,
        "batch": args.batch,
        "size": args.size,
        "amp": autocast_dtype(device, args.amp) is not None,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "torch": torch.__version__,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
