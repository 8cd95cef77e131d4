"""Peak memory of ``mlseg segment``, ``mlseg evaluate`` and ``mlseg quantify`` on one field
of each size, against what their memory warnings assume (``SEGMENT_MEMORY``, ``EVALUATE_MEMORY``,
``QUANTIFY_MEMORY``, through ``mlseg.io.warn_if_short_of_memory``): a warning that assumes too little fires too late,
and the system stops the process naming no file.

Each field is ``--side`` x ``--side`` px of the H&E tiles of ``../shared/data`` (``--set``,
default ``gbm40_he``) and their masks tiled side by side (as ``evaluate_memory.py`` makes
them). The model is that bench's stand-in: a small checkpoint whose network gives logits of
the image's darkness (real nuclei for the instance separation at no network cost), or with
``--network unet`` the default U-Net/resnet34, untrained, run on every tile for its cost
(activations) and its output replaced by those logits; ``--fp32`` turns ``inference.amp``
off (float32 on a CPU with bf16 in hardware, as on one without). With
``--mode size`` (the default) the model and the images are given one pixel size, so each is
segmented once at its own scale; ``--mode estimate`` gives none, so ``segment`` and
``evaluate`` estimate the scale from the nuclei of a first pass (more passes, each at the
factor it chose). Every run (command, size) is its own process: the command first runs on
one 256 px tile (imports, model, lazy imports), then its peak resident memory is reset
(``/proc/self/clear_refs``) and the command runs on the field through the library call the
CLI makes (``segment_folder``, ``evaluate``, ``quantify_folder``). The figure is the peak
(VmHWM) above the resident memory at that point, in MB and bytes a pixel of the field as
read; ``bound`` is what the command's warning assumes for that field
(:class:`mlseg.io.MemoryUse`) and ``ok`` whether it covers the peak. Linux only. Ends with
one JSON line.

    python bench/warning_memory.py [--sides 512,1024,2048,4096] [--commands segment,evaluate,quantify]
        [--network none|unet] [--fp32] [--mode size|estimate] [--set gbm40_he] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_memory import _status, fields, stand_in_checkpoint  # noqa: E402

UM = 0.25  # the pixel size of model and images with --mode size


def write_field(root: Path, image, labels) -> Path:
    """``root/test/{original,masks}`` with one field."""
    from mlseg.io import write_image, write_labels

    for folder in ("original", "masks"):
        (root / "test" / folder).mkdir(parents=True, exist_ok=True)
    write_image(root / "test" / "original" / "field.png", image)
    write_labels(root / "test" / "masks" / "field_mask.png", labels)
    return root


def child(
    command: str,
    model: Path,
    warm: Path,
    data: Path,
    out: Path,
    um: str,
    network: str = "none",
    amp: str = "on",
) -> None:
    import torch
    from torch import nn

    import mlseg.evaluate as ev
    import mlseg.segment as sg

    class Darkness(nn.Module):
        """Three-class logits of the image's darkness: dark = nucleus interior."""

        def __init__(self, inner=None):
            super().__init__()
            self.inner = inner  # run for its cost (activations), its output unused
            self.anchor = nn.Parameter(torch.zeros(1))  # where it runs, for run.json

        def forward(self, x):
            if self.inner is not None:
                self.inner(x)
            v = x.mean(1, keepdim=True)
            interior = 12.0 * (0.45 - v)
            return torch.cat([-interior, interior, torch.full_like(v, -6.0)], dim=1)

    import mlseg.model

    load = mlseg.model.load_model

    def stand_in(path, *args, **kwargs):
        loaded = load(path, *args, **kwargs)
        loaded.model = Darkness(loaded.model if network == "unet" else None).eval()
        return loaded

    mlseg.model.load_model = ev.load_model = stand_in
    torch.set_num_threads(2)
    px = float(um) if um != "none" else None

    from mlseg.config import InferenceConfig

    cfg = InferenceConfig(amp=amp == "on")

    def once(root: Path, to: Path) -> None:
        if command == "segment":
            sg.segment_folder(
                model, root / "test" / "original", to, profile_name="he",
                progress=False, pixel_size_um=px, inference_cfg=cfg,
            )  # fmt: skip
        elif command == "evaluate":
            ev.evaluate(model, root, to, progress=False, pixel_size_um=px, inference_cfg=cfg)
        else:
            sg.quantify_folder(
                root / "test" / "masks", root / "test" / "original", to, profile_name="he",
                progress=False, pixel_size_um=px if px is not None else UM,
            )  # fmt: skip

    once(warm, out / "warm")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    base = _status("VmRSS")
    once(data, out / "field")
    peak = _status("VmHWM")
    summary = out / "field" / ("summary.csv" if command != "evaluate" else "per_image.csv")
    factor = None
    if summary.exists() and command != "quantify":
        import pandas as pd

        row = pd.read_csv(summary).iloc[0]
        factor = float(row["scale_factor"]) if "scale_factor" in row else None
    print(json.dumps({"base": base, "peak": peak, "factor": factor}))


def run(
    command: str, side: int, model: Path, warm: Path, data: Path, out: Path, um, network, amp
) -> dict:
    argv = [sys.executable, __file__, "--child", command, str(model), str(warm), str(data)]
    done = subprocess.run(
        [*argv, str(out), str(um if um is not None else "none"), network, amp],
        capture_output=True, text=True, check=False, env=os.environ,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"{command} {side}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *(Path(a) for a in sys.argv[3:7]), *sys.argv[7:10])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="512,1024,2048,4096")
    parser.add_argument("--commands", default="segment,evaluate,quantify")
    parser.add_argument("--mode", choices=("size", "estimate"), default="size")
    parser.add_argument("--network", choices=("none", "unet"), default="none")
    parser.add_argument("--fp32", action="store_true", help="inference.amp off (float32)")
    parser.add_argument("--set", default="gbm40_he")
    parser.add_argument("--work", type=Path, help="folder for the data and outputs (kept)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="warning_memory_"))
    from mlseg.config import InferenceConfig
    from mlseg.evaluate import EVALUATE_MEMORY
    from mlseg.segment import QUANTIFY_MEMORY, SEGMENT_MEMORY

    uses = {"segment": SEGMENT_MEMORY, "evaluate": EVALUATE_MEMORY, "quantify": QUANTIFY_MEMORY}
    um = UM if args.mode == "size" else None
    warm = write_field(work / "warm", *fields(args.set, 256, 1)[0])
    from mlseg.config import TrainConfig

    net = TrainConfig() if args.network == "unet" else None  # the default U-Net/resnet34
    model = stand_in_checkpoint(work / "model", pixel_size_um=um, small=net)
    stream = InferenceConfig().stream_min_pixels
    rows = []
    for side in (int(s) for s in args.sides.split(",")):
        data = write_field(work / f"data{side}", *fields(args.set, side, 1)[0])
        for command in args.commands.split(","):
            out = work / f"out{side}_{command}"
            amp = "off" if args.fp32 else "on"
            got = run(command, side, model, warm, data, out, um, args.network, amp)
            above, px = got["peak"] - got["base"], side * side
            bound = uses[command].need(px, None if command == "quantify" else stream)
            row = {
                "command": command, "side": side, "mode": args.mode, "network": args.network, "amp": amp,
                "factor": got["factor"],
                "base_mb": round(got["base"] / 1e6), "peak_mb": round(above / 1e6),
                "bytes_per_px": round(above / px, 1), "bound_mb": round(bound / 1e6),
                "ok": bool(bound >= above),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{command:>8} {side:>5} px: {above / 1e6:7.0f} MB above {got['base'] / 1e6:.0f}"
                f" MB, {above / px:6.1f} B/px (scale {got['factor']}); warning assumes "
                f"{bound / 1e6:.0f} MB {'ok' if row['ok'] else 'TOO LOW'}",
                flush=True,
            )
    print(json.dumps(rows))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
