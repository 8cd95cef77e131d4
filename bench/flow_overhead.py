"""What does Prefect add to ``segment-and-quantify``? Same images, same model, same machine.

Baseline: :func:`mlseg.segment.segment_folder`, a plain Python loop over the same mlseg calls
(read, predict, quantify, write the per-image outputs, then the run's summary). Measured:
the ``segment-and-quantify`` flow (batches as tasks, input hashing, cache, retries, run
history, artifacts) on one worker thread, so both do the work sequentially; and with two
workers for information. Prefect's server is started before timing (a warm-up flow run),
as it is when a deployment runs. Each measurement writes into a fresh folder.

    .venv/bin/python bench/flow_overhead.py [--images 200] [--size 96] [--repeats 2]

Prints the wall times and the ratio flow / loop (goal: at most 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    import numpy as np

    from mlseg.io import write_image
    from mlseg.synth import synth_pair

    rng = np.random.default_rng(seed)
    return [
        write_image(folder / f"img_{i:04d}.png", synth_pair("he", size, rng)[0]) for i in range(n)
    ]


def make_checkpoint(folder: Path) -> Path:
    """An untrained U-Net (ResNet-18, 3 stages): realistic compute, no training needed."""
    import torch

    from mlseg.config import Config, InferenceConfig, TrainConfig
    from mlseg.model import build_model, save_checkpoint

    torch.manual_seed(0)
    train = TrainConfig(encoder="resnet18", encoder_depth=3, patch_size=96, device="cpu")
    # auto_scale off: an untrained model cannot estimate the nucleus scale of an image
    inference = InferenceConfig(tile_size=128, batch_size=4, device="cpu", auto_scale=False)
    cfg = Config(train=train, inference=inference)
    save_checkpoint(
        folder,
        build_model(train, 3, 3).eval(),
        cfg,
        target="three_class",
        classes=3,
        in_channels=3,
        fingerprint_hash=None,
        metrics={},
        pixel_size_um=None,
        name="best",
    )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from flows.segment import segment_and_quantify
    from mlseg.segment import segment_folder

    # One intra-op thread everywhere, so the loop (main thread) and the tasks (worker
    # threads) run the same kernels: OpenMP's multi-threaded kernels behave differently in
    # the main thread and in others, and on a shared machine their spinning dominates.
    threads = 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="mlseg-bench-flow-"))
    try:
        images = work / "images"
        make_images(images, args.images, args.size)
        model = make_checkpoint(work / "model")
        warm = work / "warm"
        make_images(warm, 4, args.size, seed=1)

        def loop(out: Path) -> None:
            segment_folder(model, images, out, profile_name="he", progress=False)

        def flow(out: Path, workers: int) -> None:
            segment_and_quantify(
                str(images),
                str(out),
                model=str(model),
                profile="he",
                batch_size=args.batch_size,
                workers=workers,
                torch_threads=threads,
            )

        # warm-up: starts Prefect's server and loads torch kernels, not timed
        segment_and_quantify(
            str(warm), str(work / "warm-out"), model=str(model), workers=1, torch_threads=threads
        )
        segment_folder(model, warm, work / "warm-loop", profile_name="he", progress=False)

        times: dict[str, list[float]] = {"loop": [], "flow x1": [], "flow x2": []}
        for r in range(args.repeats):
            for name, run in (
                ("loop", lambda out: loop(out)),
                ("flow x1", lambda out: flow(out, 1)),
                ("flow x2", lambda out: flow(out, 2)),
            ):
                out = work / f"{name.replace(' ', '-')}-{r}"
                start = time.perf_counter()
                run(out)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
        loop_s = statistics.median(times["loop"])
        print(
            f"{args.images} images of {args.size}x{args.size} px, {threads} torch thread(s), "
            f"batches of {args.batch_size}, median of {args.repeats}"
        )
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"  {name:8s} {median:7.2f} s  ({args.images / median:5.1f} images/s)  "
                f"ratio to loop {median / loop_s:.3f}"
            )
        ratio = statistics.median(times["flow x1"]) / loop_s
        verdict = "within" if ratio <= 1.15 else "ABOVE"
        print(f"Prefect overhead (flow x1 / loop): {ratio:.3f} -> {verdict} the 1.15 goal")
        medians = {name.replace(" ", "_"): statistics.median(v) for name, v in times.items()}
        result = {"bench": "flow_overhead", "images": args.images, "repeats": args.repeats}
        result |= {f"{name}_s": round(seconds, 3) for name, seconds in medians.items()}
        print(json.dumps(result | {"ratio": round(ratio, 3), "goal": 1.15}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
