"""A rerun that redoes nothing: every image of the folder already done, same inputs, model
and settings (a nightly run on an inbox with no new image, a run resumed after it ended).

Baseline: the run files written whole, as every rerun wrote them before (every image's
``<stem>_nuclei.parquet`` read, ``summary.csv``, ``nuclei.parquet`` and ``histograms.png``
written again; :func:`mlseg.outputs.run_outputs_current` made to answer no). Measured:
:func:`mlseg.outputs.update_run_outputs` as ``mlseg quantify`` runs it
(:func:`mlseg.segment.quantify_folder`): the three files kept where they hold exactly the
run's images, ``run.json`` written (and ``nuclei.parquet``'s footer where the run's record
changed). Same folder, interleaved, best of ``--repeats``; after each pair the files a user
reads are checked to be the same. ``--flow`` also times the ``segment-and-quantify`` flow's
rerun (a tiny untrained model whose first run is given each image's synthetic labels; the
rerun's batches come from Prefect's cache, and its nuclei.parquet footer names each flow
run, so that table is written again from its own rows).

    .venv/bin/python bench/rerun_speed.py [--images 400] [--size 256] [--repeats 3] [--flow]

Prints the seconds of each rerun, the ratio before / now, and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_pairs(folder: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` synthetic H&E images and their label masks."""
    import numpy as np

    from mlseg.io import write_image, write_labels
    from mlseg.synth import synth_pair

    rng = np.random.default_rng(seed)
    images, masks = folder / "images", folder / "masks"
    for i in range(n):
        image, labels, _ = synth_pair("he", size, rng)
        write_image(images / f"img_{i:04d}.png", image)
        write_labels(masks / f"img_{i:04d}_mask.png", labels)
    return images, masks


def truth_of(masks: Path):
    """A stand-in for :func:`mlseg.segment.predict_labels_scaled` giving each image of
    :func:`make_pairs` its own labels (found by its pixels), at the scale the model gave."""
    import hashlib

    import mlseg.segment
    from mlseg.dataset import mask_to_labels
    from mlseg.io import read_image, read_mask

    predict = mlseg.segment.predict_labels_scaled
    images = masks.parent / "images"
    by_pixels = {
        hashlib.sha256(read_image(p).tobytes()).hexdigest(): masks / f"{p.stem}_mask.png"
        for p in images.iterdir()
    }

    def truth(loaded, image, *args, **kwargs):
        _, probs, scale = predict(loaded, image, *args, **kwargs)
        mask = by_pixels[hashlib.sha256(image.tobytes()).hexdigest()]
        return mask_to_labels(read_mask(mask)), probs, scale

    return truth


def read_back(out: Path) -> dict:
    """What a user reads in the run files, run.json's times aside."""
    import pandas as pd
    import pyarrow.parquet as pq

    record = json.loads((out / "run.json").read_text())
    return {
        "summary": (out / "summary.csv").read_bytes(),
        "nuclei": pd.read_parquet(out / "nuclei.parquet"),
        "footer": pq.read_schema(out / "nuclei.parquet").metadata[b"mlseg"],
        "histograms": (out / "histograms.png").read_bytes(),
        "run": {k: v for k, v in record.items() if k not in ("started_at", "finished_at")},
    }


def same(a: dict, b: dict, flow: bool) -> bool:
    keys = [k for k in a if k != "nuclei"]
    if flow:  # each flow run names itself in run.json and the footer
        keys = [k for k in keys if k not in ("footer", "run")]
    return all(a[k] == b[k] for k in keys) and a["nuclei"].equals(b["nuclei"])


def timed(run, whole: bool) -> float:
    """Seconds of one rerun; ``whole``: the run files written whole, as before."""
    import mlseg.outputs

    patch = (
        mock.patch.object(mlseg.outputs, "run_outputs_current", lambda *a, **k: False)
        if whole
        else contextlib.nullcontext()
    )
    with patch:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start


def measure(name: str, run, out: Path, repeats: int, flow: bool = False) -> dict:
    times: dict[str, list[float]] = {"before": [], "now": []}
    identical = True
    for _ in range(repeats):
        times["before"].append(timed(run, whole=True))
        whole = read_back(out)
        times["now"].append(timed(run, whole=False))
        identical &= same(read_back(out), whole, flow)
    before, now = min(times["before"]), min(times["now"])
    print(
        f"  {name:9s} before {before:6.2f} s  now {now:6.2f} s  ratio {before / now:5.1f}  "
        f"files a user reads {'identical' if identical else 'DIFFERENT'}"
    )
    return {
        "before_s": round(before, 3),
        "now_s": round(now, 3),
        "ratio": round(before / now, 2),
        "identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flow", action="store_true", help="also the segment-and-quantify flow")
    args = parser.parse_args()

    import pandas as pd

    from mlseg.segment import quantify_folder

    work = Path(tempfile.mkdtemp(prefix="mlseg-bench-rerun-"))
    results = {}
    try:
        images, masks = make_pairs(work, args.images, args.size)
        out = work / "quantified"

        def quantify() -> None:
            result = quantify_folder(masks, images, out, profile_name="he", progress=False)
            assert not result.processed and not result.failed

        quantify_folder(masks, images, out, profile_name="he", progress=False)  # the first run
        nuclei = len(pd.read_parquet(out / "nuclei.parquet"))
        print(
            f"{args.images} images of {args.size}x{args.size} px, {nuclei} nuclei, every one "
            f"done; best of {args.repeats}, interleaved"
        )
        results["quantify"] = measure("quantify", quantify, out, args.repeats)
        if args.flow:
            import torch
            from flow_overhead import make_checkpoint  # bench/ is the script's folder

            from flows.segment import segment_and_quantify

            torch.set_num_threads(1)
            model = make_checkpoint(work / "model")
            flow_out = work / "segmented"

            def run_flow():
                return segment_and_quantify(
                    str(images),
                    str(flow_out),
                    model=str(model),
                    batch_size=50,
                    workers=1,
                    torch_threads=1,
                    return_state=True,
                )

            def flow() -> None:
                state = run_flow()
                assert state.is_completed() and not state.result()["processed"], state.message

            # the first run's labels: the synthetic truth (the untrained model finds no
            # nucleus), so that the rerun has as many nuclei to keep as quantify's
            with mock.patch("mlseg.segment.predict_labels_scaled", truth_of(masks)):
                assert run_flow().is_completed()
            results["flow"] = measure("flow", flow, flow_out, args.repeats, flow=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"images": args.images, "size": args.size, **results}))


if __name__ == "__main__":
    main()
