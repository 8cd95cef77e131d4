"""Memory a folder run of small tiles holds per image until it writes its run files.

A folder run (``mlseg quantify``, :func:`mlseg.segment.quantify_folder`; ``mlseg segment``
shares its loop) keeps each image's per-nucleus table for the run's ``nuclei.parquet``.
Baseline: every image's DataFrame kept to the end, as before the per-image memory audit
(:class:`mlseg.outputs.RunNuclei` made to group no tables: ``COMPACT_EVERY`` of 1); ours:
tables of one column set grouped ``COMPACT_EVERY`` at a time. Measured: the Python
allocations (``tracemalloc``, the same figure on any machine; pyarrow's buffers are not
among them) alive when the run starts writing its run files, for ``--images`` and three
times as many synthetic H&E tiles, each run in a fresh interpreter; the growth per image is
their difference over the images added. Both runs' ``nuclei.parquet`` are checked byte for
byte.

With ``--flow``, the same for the end of the Prefect flow ``segment-and-quantify``, which
reads its images' tables once its batches are done (:func:`flows.segment.run_nuclei`):
baseline, a list of every image's DataFrame, as the flow kept them before; ours, what it
keeps now (all images' tables grouped, and those processed's areas, for the run metrics),
every image processed. The tables are those of a ``quantify_folder`` run of the same tiles (the
flow writes the same files); both make the same run table, checked frame for frame.

    .venv/bin/python bench/run_memory.py [--images 200] [--size 64] [--flow]

Prints the kB held per image for both and the ratio before / ours, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tracemalloc
import warnings
from pathlib import Path

from rerun_speed import make_pairs  # its sibling here: n synthetic H&E tiles and their masks


def held(images: Path, masks: Path, out: Path, every: int) -> tuple[int, bytes]:
    """Bytes traced as the run starts writing its run files, and its ``nuclei.parquet``."""
    import gc

    import mlseg.outputs
    import mlseg.segment

    mlseg.outputs.COMPACT_EVERY = every
    write, seen = mlseg.segment.update_run_outputs, {}

    def measured(*args, **kwargs):
        gc.collect()
        seen["bytes"] = tracemalloc.get_traced_memory()[0]
        return write(*args, **kwargs)

    mlseg.segment.update_run_outputs = measured
    try:
        gc.collect()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        mlseg.segment.quantify_folder(
            masks, images, out, profile_name="he", pixel_size_um=0.5, progress=False
        )
        tracemalloc.stop()
    finally:
        mlseg.segment.update_run_outputs = write
    return seen["bytes"] - start, (out / "nuclei.parquet").read_bytes()


def child(images: Path, masks: Path, out: Path, every: int) -> None:
    """One measurement, in a fresh interpreter: a process that ran other runs before held
    their caches (and freed some of their memory) in the traced run's count."""
    warnings.simplefilter("ignore")
    warm = out.parent / f"{out.name}-warm"  # imports and caches outside the count
    make_pairs(warm, 10, 64, seed=1)
    for warm_every in (1, 4):  # the grouping's concatenation among them
        held(warm / "images", warm / "masks", warm / f"out{warm_every}", warm_every)
    print(held(images, masks, out, every)[0])


def flow_held(out: Path, way: str) -> int:
    """Bytes traced holding the tables of the run in ``out`` as the flow's end does: ``before``
    (a list of them) or ``ours`` (:func:`flows.segment.run_nuclei`), in a fresh interpreter."""
    import gc

    from flows.segment import run_nuclei
    from mlseg.outputs import nuclei_table, read_nuclei

    warnings.simplefilter("ignore")
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("img_*.json"))]
    nuclei_table([read_nuclei(out, s) for s in summaries[:5]])  # imports and caches
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    if way == "before":
        kept = [read_nuclei(out, s) for s in summaries]
    else:
        kept = run_nuclei(out, summaries, {s["image"] for s in summaries})
    gc.collect()
    held_now = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    made = nuclei_table(kept if way == "before" else kept[0].tables())
    made.to_parquet(out.parent / f"{out.name}-{way}.parquet")
    return held_now


def measured(*args: Path | int | str) -> int:
    """The figure a child run prints, in a fresh interpreter."""
    import subprocess
    import sys

    command = [sys.executable, __file__, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--flow", action="store_true", help="the flow's end of run")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--flow-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        images, masks, out, every = args.child
        return child(Path(images), Path(masks), Path(out), int(every))
    if args.flow_child:
        return print(flow_held(Path(args.flow_child[0]), args.flow_child[1]))
    import pandas as pd

    import mlseg.outputs

    ours_every = mlseg.outputs.COMPACT_EVERY
    with tempfile.TemporaryDirectory(prefix="mlseg-run-memory-") as tmp:
        root = Path(tmp)
        sizes = (args.images, 3 * args.images)
        inputs = {n: make_pairs(root / f"in{n}", n, args.size) for n in sizes}
        kb: dict[str, float] = {}
        if args.flow:
            for n in sizes:  # the run's files, as the flow's batches leave them
                measured("--child", *inputs[n], root / f"run{n}", ours_every)
            for name in ("before", "ours"):
                got = {n: measured("--flow-child", root / f"run{n}", name) for n in sizes}
                kb[name] = (got[sizes[1]] - got[sizes[0]]) / (sizes[1] - sizes[0]) / 1e3
            for n in sizes:
                before, ours = (pd.read_parquet(root / f"run{n}-{w}.parquet") for w in kb)
                pd.testing.assert_frame_equal(before, ours)
        else:
            for name, every in (("before", 1), ("ours", ours_every)):
                got = {
                    n: measured("--child", *inputs[n], root / f"{name}{n}", every) for n in sizes
                }
                kb[name] = (got[sizes[1]] - got[sizes[0]]) / (sizes[1] - sizes[0]) / 1e3
            for n in sizes:
                before, ours = (root / f"{name}{n}" / "nuclei.parquet" for name in kb)
                assert before.read_bytes() == ours.read_bytes(), f"{n} images: parquet differs"
    ratio = kb["before"] / kb["ours"]
    print(f"kB held per image: before {kb['before']:.1f}, ours {kb['ours']:.1f}, ratio {ratio:.2f}")
    print(
        json.dumps(
            {
                "images": list(sizes),
                "flow": args.flow,
                "size": args.size,
                "kb_per_image_before": round(kb["before"], 2),
                "kb_per_image_ours": round(kb["ours"], 2),
                "ratio": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
