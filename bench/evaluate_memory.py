"""Peak memory of ``mlseg evaluate`` on large test images: the worst cases reduced to their
panels' size once scored (``mlseg.plots.worst_case``, ours) against the way they were held
before (each of the WORST_SHOWN whole, image and both label images, and drawn together at
the end from full-size float RGB panels).

The test split is ``--images`` fields of ``--side`` x ``--side`` px, the H&E tiles of
``../shared/data`` (``--set``, default ``gbm40_he``) and their masks tiled side by side,
each field starting at another tile. The model is a stand-in: a small untrained U-Net
checkpoint whose network is replaced by logits of the image's darkness (real nuclei for the
instance separation and scoring at no network cost); everything else is ``mlseg.evaluate``
as the CLI runs it. Each way runs in its own process, after a warm-up evaluation of one
small tile (imports, model, lazy imports), whose peak resident memory is then reset
(``/proc/self/clear_refs``). The figure is the peak (VmHWM) above the resident memory at
that point, in MB and in bytes a pixel of one field (the unit of
``mlseg.evaluate.EVALUATE_MEMORY``), with the peak of each stage (reading,
segmenting, scoring, reducing a worst case, drawing worst.png, the rest) in bytes a pixel.
Linux only. The per-image tables are checked equal (but for the seconds), and worst.png
compared pixel by pixel. Ends with one JSON line.

    python bench/evaluate_memory.py [--side 4096] [--images 1] [--set gbm40_he] [--work DIR]
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def fields(name: str, side: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` pairs of ``(side, side, 3) uint8`` image and ``int32`` labels: the set's tiles
    and masks side by side, field ``i`` starting at tile ``i``."""
    from mlseg.dataset import mask_to_labels
    from mlseg.io import read_image, read_mask

    tiles = []
    for path in sorted((DATA / name / "original").glob("*.png")):
        mask = next((DATA / name / "masks").glob(f"{path.stem}_mask.*"))
        labels = mask_to_labels(read_mask(mask), "instance").astype(np.int32)
        tiles.append((read_image(path)[..., :3], labels))
    if not tiles:
        sys.exit(f"no images in {DATA / name / 'original'}")
    t = min(min(image.shape[:2]) for image, _ in tiles)
    k = -(-side // t)
    out = []
    for i in range(n):
        image = np.zeros((k * t, k * t, 3), np.uint8)
        labels = np.zeros((k * t, k * t), np.int32)
        offset = 0
        for j in range(k * k):
            tile, ids = tiles[(i + j) % len(tiles)]
            y, x = divmod(j, k)
            image[y * t : (y + 1) * t, x * t : (x + 1) * t] = tile[:t, :t]
            ids = ids[:t, :t]
            labels[y * t : (y + 1) * t, x * t : (x + 1) * t] = np.where(ids > 0, ids + offset, 0)
            offset += int(ids.max())
        out.append((image[:side, :side].copy(), labels[:side, :side].copy()))
    return out


def write_split(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    from mlseg.io import write_image, write_labels

    for folder in ("original", "masks"):
        (root / "test" / folder).mkdir(parents=True, exist_ok=True)
    for i, (image, labels) in enumerate(pairs):
        write_image(root / "test" / "original" / f"field{i}.png", image)
        write_labels(root / "test" / "masks" / f"field{i}_mask.png", labels)
    return root


def stand_in_checkpoint(folder: Path, pixel_size_um: float | None = None, small=None) -> Path:
    """A checkpoint of ``small`` (default: a 3-stage resnet18 U-Net), untrained."""
    from mlseg.config import Config, TrainConfig
    from mlseg.model import build_model, save_checkpoint

    small = small or TrainConfig(encoder="resnet18", encoder_depth=3, patch_size=64)
    save_checkpoint(
        folder,
        build_model(small, 3, 3),
        Config(train=small),
        target="three_class",
        classes=3,
        in_channels=3,
        fingerprint_hash=None,
        metrics={},
        pixel_size_um=pixel_size_um,
        name="best",
        nucleus_diameter_px=12.0,
    )
    return folder


# --- the worst cases as they were drawn before: full-size arrays, float RGB panels --------


def _display_before(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    lo, hi = np.nanpercentile(x, 0.5), np.nanpercentile(x, 99.5)
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)


def _label_rgb_before(labels: np.ndarray) -> np.ndarray:
    from mlseg.plots import LABEL_COLOURS

    ids, rank = np.unique(labels, return_inverse=True)
    rank = rank.reshape(labels.shape)
    nucleus = ids != 0
    pairs = []
    for a, b in ((rank[:, :-1], rank[:, 1:]), (rank[:-1], rank[1:])):
        apart = (a != b) & nucleus[a] & nucleus[b]
        pairs.append(np.stack([a[apart], b[apart]], 1))
    pairs = np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0)
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    starts = np.searchsorted(pairs[:, 0], np.arange(ids.size + 1))
    colour = np.full(ids.size, -1)
    for r in np.flatnonzero(nucleus):
        used = np.bincount(
            colour[pairs[starts[r] : starts[r + 1], 1]] + 1, minlength=len(LABEL_COLOURS) + 1
        )[1:]
        colour[r] = int(np.argmin(used))
    palette = np.vstack([np.array(LABEL_COLOURS) / 255.0, np.zeros((1, 3))])
    return palette[colour][rank]


def _worst_figure_before(rows):
    from mlseg.plots import PANEL_MIN_PX, _count, _figure, _panel_px

    dpi, gap, title = 100.0, 12.0, 48.0
    sizes = [_panel_px(np.shape(truth)) for _, _, truth, _, _ in rows] or [(256.0, 256.0)]
    column = max(PANEL_MIN_PX, *(w for w, _ in sizes))
    width = 3 * column + 4 * gap
    height = sum(h + title for _, h in sizes) + gap
    fig = _figure(width / dpi, height / dpi)
    top = height
    for (name, image, truth, pred, caption), (w, h) in zip(rows, sizes, strict=False):
        top -= title + h
        cmap = "gray" if image.ndim == 2 or image.shape[-1] == 1 else None
        panels = (
            (_display_before(image), cmap, "antialiased", name),
            (_label_rgb_before(truth), None, "nearest", f"truth ({_count(truth)})"),
            (_label_rgb_before(pred), None, "nearest", f"prediction ({_count(pred)})\n{caption}"),
        )
        for j, (shown, colours, interpolation, text) in enumerate(panels):
            left = gap + j * (column + gap) + (column - w) / 2
            ax = fig.add_axes((left / width, top / height, w / width, h / height))
            ax.imshow(shown, cmap=colours, interpolation=interpolation)
            ax.set_title(text, fontsize=9)
            ax.set_axis_off()
    return fig


def plot_worst_before(rows, path):
    from mlseg.plots import _save

    # as before, the panels made for imshow (which copies them) are freed before saving
    return _save(_worst_figure_before(rows), path)


# --- one way, in its own process ----------------------------------------------------------


def _status(key: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(way: str, model: Path, warm: Path, data: Path, out: Path) -> None:
    import torch
    from torch import nn

    import mlseg.evaluate as ev
    import mlseg.plots

    class Darkness(nn.Module):
        """Three-class logits of the image's darkness: dark = nucleus interior."""

        def forward(self, x):
            v = x.mean(1, keepdim=True)
            interior = 12.0 * (0.45 - v)
            return torch.cat([-interior, interior, torch.full_like(v, -6.0)], dim=1)

    load = ev.load_model

    def stand_in(path, device="cpu"):
        loaded = load(path, device=device)
        loaded.model = Darkness().eval()
        return loaded

    ev.load_model = stand_in
    torch.set_num_threads(2)
    ev.evaluate(model, warm, out / "warm", progress=False)
    if way == "before":
        ev.worst_case = lambda *row: row  # held whole, drawn whole at the end
        mlseg.plots.plot_worst = plot_worst_before
    stages: dict[str, int] = {}

    def mark(stage: str) -> None:
        """The peak since the last mark is ``stage``'s; VmHWM from here."""
        stages[stage] = max(stages.get(stage, 0), _status("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")

    def staged(module, name: str, stage: str) -> None:
        inner = getattr(module, name)

        def call(*args, **kwargs):
            mark("other")
            result = inner(*args, **kwargs)
            mark(stage)
            return result

        setattr(module, name, call)

    staged(ev, "read_image", "read")
    staged(ev, "predict_image", "segment")
    staged(ev, "score_labels", "score")
    staged(ev, "worst_case", "worst case")
    staged(mlseg.plots, "plot_worst", "draw")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    base = _status("VmRSS")
    ev.evaluate(model, data, out / way, progress=False)
    mark("other")
    print(json.dumps({"base": base, "stages": stages}))


def run(way: str, model: Path, warm: Path, data: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", way, str(model), str(warm), str(data)]
    done = subprocess.run(
        [*command, str(out)], capture_output=True, text=True, check=False, env=os.environ
    )
    if done.returncode:
        sys.exit(f"{way}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *(Path(a) for a in sys.argv[3:7]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--set", default="gbm40_he")
    parser.add_argument("--work", type=Path, help="folder for the data and outputs (kept)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="evaluate_memory_"))
    import pandas as pd

    from mlseg.io import read_image

    data = write_split(work / "data", fields(args.set, args.side, args.images))
    warm = write_split(work / "warm", fields(args.set, 256, 1))
    model = stand_in_checkpoint(work / "model")
    px = args.side * args.side
    peaks = {way: run(way, model, warm, data, work / "out") for way in ("before", "ours")}
    tables = [pd.read_csv(work / "out" / way / "per_image.csv") for way in peaks]
    if not tables[0].drop(columns="predict_s").equals(tables[1].drop(columns="predict_s")):
        sys.exit("the per-image tables differ")
    old, new = (read_image(work / "out" / way / "worst.png").astype(int) for way in peaks)
    diff = np.abs(old - new) if old.shape == new.shape else None
    above = {way: max(p["stages"].values()) - p["base"] for way, p in peaks.items()}
    for way, value in above.items():
        print(f"{way:>6}: {value / 1e6:8.0f} MB  {value / px:6.1f} bytes/pixel of one field")
        stages = peaks[way]["stages"].items()
        print("        " + ", ".join(f"{k} {(v - peaks[way]['base']) / px:.1f}" for k, v in stages))
    ratio = above["before"] / above["ours"]
    shown = (
        f"worst.png max |diff| {diff.max()}, mean {diff.mean():.2f}"
        if diff is not None
        else f"worst.png sizes differ: {old.shape} {new.shape}"
    )
    print(f"before / ours: {ratio:.2f}x (tables identical; {shown})")
    print(json.dumps({
        "side": args.side, "images": args.images, "set": args.set,
        "before_mb": round(above["before"] / 1e6), "ours_mb": round(above["ours"] / 1e6),
        "before_bytes_per_px": round(above["before"] / px, 1),
        "ours_bytes_per_px": round(above["ours"] / px, 1), "ratio": round(ratio, 2),
        "worst_png_max_diff": None if diff is None else int(diff.max()),
        "worst_png_mean_diff": None if diff is None else round(float(diff.mean()), 3),
    }))  # fmt: skip
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
