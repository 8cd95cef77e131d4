"""Tiled inference throughput against the raw model forward over the same tiles.

``tiled``: :func:`mlseg.infer.predict_probs` (tile cutting, batching, Gaussian blending,
stitching) plus :func:`mlseg.instances.probs_to_labels` (watershed, hole filling, size
filter), i.e. everything between a normalised image and its label image.
``raw``: only ``model(batch)`` on exactly the tiles ``tiled`` runs (same grid, batch size,
threads), cut beforehand. Both report megapixels of image per second; the ratio
tiled / raw is the share of time spent in the model (goal on CPU: >= 0.8). As the raw and
tiled runs are apart in time, load on a shared machine moves that ratio; the time the tiled
run itself spends in the forward (timed inside it) is printed too. Ends with one JSON line.

The model is a trained checkpoint (``--model PATH``) or, by default, an untrained
segmentation-models-pytorch U-Net (``--encoder``) whose output is replaced, after its full
forward pass, by three-class logits drawn from the image's darkness: the forward costs what
a real network costs and instance separation gets a realistic load (hundreds of nuclei per
image) instead of the empty output of random weights. Images are real H&E tiles from
``../shared/data/cpm15_he`` (normalised as at inference). Runs interleave; best of
``--repeats`` is kept (the machine may be shared).

    python bench/segment_speed.py [--images 3] [--tile 256] [--encoder resnet18] [--model PATH]
                                  [--fp32-baseline]

The network runs as ``predict_probs`` runs it: bf16 autocast on a CPU with bf16 in hardware
(``inference.amp``) and channels-last memory; ``--fp32-baseline`` also times the tiled run in
float32 without channels-last and prints the ratio (``ratio_vs_fp32``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class DarknessHead:
    """Run ``net`` fully, then answer with logits of dark = nucleus (a stand-in for a
    trained network's output, at the network's cost)."""

    def __new__(cls, net):
        import torch
        from torch import nn

        class _Head(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                self.inner(x)
                v = x.mean(1, keepdim=True)
                interior = 12.0 * (0.45 - v)
                return torch.cat([-interior, interior, torch.full_like(v, -6.0)], dim=1)

        return _Head(net).eval()


class ForwardTimer:
    """Calls ``model`` and adds the seconds spent in it (the tiled run's own forward time,
    immune to the load drifting between the raw and the tiled runs)."""

    def __init__(self, model):
        self.model = model
        self.seconds = 0.0

    def __call__(self, x):
        start = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - start
        return out

    def eval(self):
        self.model.eval()
        return self

    def parameters(self):
        return self.model.parameters()


def raw_forward(model, image: np.ndarray, cfg, target: str) -> float:
    """Seconds for the forward passes alone over the tiles ``predict_probs`` would run, in
    its arithmetic (bf16 autocast where ``cfg.amp`` applies, ``cfg.channels_last``)."""
    import contextlib

    import torch

    from mlseg.infer import _Source, tile_grid
    from mlseg.model import autocast_dtype

    cpu = torch.device("cpu")
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory)
    dtype = autocast_dtype(cpu, cfg.amp)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()

    grid = tile_grid(image.shape[0], image.shape[1], cfg)
    source = _Source(image, grid)
    positions = [(y, x) for y in grid.ys for x in grid.xs]
    batches = [
        torch.from_numpy(source.batch(positions[i : i + cfg.batch_size])).contiguous(
            memory_format=memory
        )
        for i in range(0, len(positions), cfg.batch_size)
    ]
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch in batches:
            model(batch)
    return time.perf_counter() - start


def tiled(model, image: np.ndarray, cfg, target: str, profile, gains=(1.0,)) -> tuple[float, int]:
    from mlseg.infer import StainTTA, predict_probs
    from mlseg.instances import area_limits_px, probs_to_labels

    start = time.perf_counter()
    probs = predict_probs(model, image, cfg, target=target, stain_tta=StainTTA(gains))
    lo, hi = area_limits_px(profile, None)
    labels = probs_to_labels(
        probs, target, profile.watershed, pixel_size_um=None, min_area_px=lo, max_area_px=hi
    )
    return time.perf_counter() - start, int(labels.max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--model", type=Path, default=None, help="trained checkpoint instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--stain-tta",
        action="store_true",
        help="also time the tiled run with the default stain test-time augmentation",
    )
    parser.add_argument(
        "--fp32-baseline",
        action="store_true",
        help="also time the tiled run in float32 without channels-last (ratio_vs_fp32)",
    )
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"real data not found at {DATA}; nothing to measure", file=sys.stderr)
        return 1
    import torch

    from mlseg.config import Config, InferenceConfig, TrainConfig, get_profile
    from mlseg.io import read_image
    from mlseg.model import build_model, load_model
    from mlseg.preprocess import normalize

    torch.set_num_threads(args.threads)
    profile = get_profile("he")
    if args.model is not None:
        loaded = load_model(args.model, device="cpu")
        model, target, pre = loaded.model, loaded.target, loaded.config.preprocess
        name = str(args.model)
    else:
        train = TrainConfig(encoder=args.encoder)
        model, target, pre = (
            DarknessHead(build_model(train, 3, 3)),
            "three_class",
            Config().preprocess,
        )
        name = f"Unet/{args.encoder} (untrained; darkness logits)"
    cfg = InferenceConfig(tile_size=args.tile, overlap=args.overlap, batch_size=args.batch_size)
    paths = sorted((DATA / "cpm15_he" / "original").glob("*.png"))[: args.images]
    images = [normalize(read_image(p), pre, "he", channels=3) for p in paths]
    megapixels = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    print(
        f"{name}, tile {args.tile}, overlap {args.overlap}, batch {args.batch_size}, "
        f"{args.threads} threads; {len(images)} images, {megapixels:.2f} MP"
    )
    raw_forward(model, images[0][:256, :256], cfg, target)  # warm up (and imports)
    tiled(model, images[0][:256, :256], cfg, target, profile)
    timer = ForwardTimer(model)
    best_raw = best_tiled = best_stain = best_fp32 = float("inf")
    fp32 = cfg.model_copy(update={"amp": False, "channels_last": False})
    gains = cfg.stain_tta
    shares = []
    for repeat in range(args.repeats):
        t_raw = sum(raw_forward(model, im, cfg, target) for im in images)
        timer.seconds = 0.0
        results = [tiled(timer, im, cfg, target, profile) for im in images]
        t_tiled = sum(t for t, _ in results)
        nuclei = sum(n for _, n in results)
        shares.append(timer.seconds / t_tiled)
        best_raw, best_tiled = min(best_raw, t_raw), min(best_tiled, t_tiled)
        print(
            f"run {repeat + 1}: raw {megapixels / t_raw:.3f} MP/s, tiled "
            f"{megapixels / t_tiled:.3f} MP/s ({nuclei} nuclei), ratio {t_raw / t_tiled:.2f}; "
            f"model forward {100 * shares[-1]:.0f}% of the tiled run's time"
        )
        if args.stain_tta:
            t_stain = sum(tiled(model, im, cfg, target, profile, gains)[0] for im in images)
            best_stain = min(best_stain, t_stain)
            print(f"  with stain TTA {gains}: {t_stain / t_tiled:.2f}x the tiled run's time")
        if args.fp32_baseline:
            t_fp32 = sum(tiled(model, im, fp32, target, profile)[0] for im in images)
            best_fp32 = min(best_fp32, t_fp32)
            print(f"  in float32, contiguous: {t_fp32 / t_tiled:.2f}x the tiled run's time")
    print(
        f"segment: tiled inference {megapixels / best_tiled:.3f} MP/s (blending, stitching and "
        f"instance separation included), raw forward {megapixels / best_raw:.3f} MP/s over the "
        f"same tiles; ratio {best_raw / best_tiled:.2f} (goal >= 0.8); within the tiled runs "
        f"the forward took {100 * max(shares):.0f}% of the time (best run)"
    )
    if args.stain_tta:
        print(
            f"stain TTA {gains}: {best_stain / best_tiled:.2f}x the time of the tiled run "
            f"(best of {args.repeats}; {len(gains)} forward passes per tile instead of 1)"
        )
    result = {
        "bench": "segment_speed",
        "model": name,
        "megapixels": round(megapixels, 3),
        "tiled_mp_per_s": round(megapixels / best_tiled, 4),
        "raw_mp_per_s": round(megapixels / best_raw, 4),
        "ratio": round(best_raw / best_tiled, 3),
        "forward_share_in_tiled": round(max(shares), 3),
        "goal": 0.8,
    }
    if args.stain_tta:
        result["stain_tta_time_ratio"] = round(best_stain / best_tiled, 3)
    if args.fp32_baseline:
        result["fp32_tiled_mp_per_s"] = round(megapixels / best_fp32, 4)
        result["ratio_vs_fp32"] = round(best_fp32 / best_tiled, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
