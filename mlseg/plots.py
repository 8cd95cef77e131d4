"""Figures: training curves and worst-case panels. Matplotlib (Agg canvas) imported lazily.

Figures are drawn on an explicit ``Figure`` + Agg canvas, so no global backend is set and
nothing needs a display; files are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mlseg.io import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def history_figure(history: pd.DataFrame):
    """Loss (train, validation) and validation Dice against training step (a ``Figure``).

    ``history`` has a ``step`` column and any of ``train_loss``, ``val_loss``, ``val_dice``.
    """
    fig = _figure(10, 4)
    ax_loss, ax_dice = fig.subplots(1, 2)
    for col, label in (("train_loss", "train"), ("val_loss", "validation")):
        if col in history and history[col].notna().any():
            ax_loss.plot(history["step"], history[col], marker="o", ms=3, label=label)
    ax_loss.set(xlabel="step", ylabel="loss (Dice + cross-entropy)", title="Loss")
    ax_loss.legend(loc="best")
    if "val_dice" in history and history["val_dice"].notna().any():
        ax_dice.plot(history["step"], history["val_dice"], marker="o", ms=3, color="tab:green")
        best = history["val_dice"].idxmax()
        ax_dice.axvline(history.loc[best, "step"], color="grey", ls="--", lw=1, label="best")
        ax_dice.legend(loc="lower right")
    else:  # data.val_fraction 0: the checkpoint kept is the lowest training loss
        ax_dice.text(0.5, 0.5, "no validation images", ha="center", va="center", color="grey")
    ax_dice.set(xlabel="step", ylabel="Dice", title="Validation Dice (foreground)", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    return fig


def plot_history(history: pd.DataFrame, path: str | Path) -> Path:
    """:func:`history_figure` as a PNG."""
    return _save(history_figure(history), path)


def _display(image: np.ndarray) -> np.ndarray:
    """Any ``(H, W, C)`` image -> something imshow shows faithfully (per-image min-max)."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    lo, hi = np.nanpercentile(x, 0.5), np.nanpercentile(x, 99.5)
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)


#: Colours of the nuclei in the worst cases' truth and prediction panels, on black: green,
#: magenta, white, brown, dark blue, grey. Any two, and each and black, are 25 or more apart
#: (CIEDE2000) in normal vision and, by Machado et al.'s 2009 simulation, with protanopia,
#: deuteranopia and tritanopia.
LABEL_COLOURS = (
    (64, 192, 64),
    (255, 64, 255),
    (255, 255, 255),
    (128, 64, 0),
    (0, 64, 128),
    (128, 128, 128),
)


def _touching(rank: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    """``(P, 2)`` pairs of ranks of labels that are 4-neighbours somewhere, each once;
    ``nucleus`` says which ranks are nuclei (not the background)."""
    pairs = []
    for a, b in ((rank[:, :-1], rank[:, 1:]), (rank[:-1], rank[1:])):
        apart = (a != b) & nucleus[a] & nucleus[b]
        pairs.append(np.stack([a[apart], b[apart]], 1))
    pairs = np.concatenate(pairs)
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    """Instance labels -> ``(H, W, 3) float`` RGB in [0, 1], black background, each nucleus
    in one of :data:`LABEL_COLOURS` and none in its touching neighbours' (first fit).

    Colours went at random: touching nuclei in near-equal colours read as one, a split
    nucleus as merged, for 6% of touching pairs in normal vision and 10-15% for colour-blind
    viewers (CIEDE2000 under 10). Colours go by rank among the labels present, not by label
    value: a tile of a slide's label image keeps ids up to 2**31 - 1, and a palette indexed
    by value took 45 GiB."""
    ids, rank = np.unique(labels, return_inverse=True)
    rank = rank.reshape(labels.shape)
    pairs = _touching(rank, ids != 0)
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    starts = np.searchsorted(pairs[:, 0], np.arange(ids.size + 1))
    colour = np.full(ids.size, -1)
    for r in np.flatnonzero(ids != 0):
        used = np.bincount(
            colour[pairs[starts[r] : starts[r + 1], 1]] + 1, minlength=len(LABEL_COLOURS) + 1
        )[1:]
        colour[r] = int(np.argmin(used))  # the first unused, else the least used (rare)
    palette = np.vstack([np.array(LABEL_COLOURS) / 255.0, np.zeros((1, 3))])
    return palette[colour][rank]  # colour -1 (the background) is the last row, black


def _count(labels: np.ndarray) -> str:
    n = len(np.unique(labels)) - int((labels == 0).any())
    return f"{n} nucleus" if n == 1 else f"{n} nuclei"


#: Longest side, in pixels, of a worst case's panels: a tile up to this size is drawn pixel
#: for pixel, a larger one shrunk to it (a 1,000-pixel tile to half), a smaller one enlarged
#: to :data:`PANEL_MIN_PX`. Three panels to a fixed 9-inch figure drew a 512-pixel tile at
#: about 200 pixels, where touching nuclei merged.
PANEL_MAX_PX = 512
PANEL_MIN_PX = 256


def _panel_px(shape: tuple[int, ...]) -> tuple[float, float]:
    """``(width, height)`` in pixels of the panels of an image of ``shape`` (H, W, ...)."""
    height, width = shape[:2]
    longest = max(height, width, 1)
    zoom = min(max(longest, PANEL_MIN_PX), PANEL_MAX_PX) / longest
    return width * zoom, height * zoom


def worst_figure(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]]):
    """One row per case: image | truth | prediction, titled with its name, the counts and
    the score text (a ``Figure``). Each panel is :func:`_panel_px` figure pixels (100 dpi).

    Each row is ``(name, image (H, W, C), true_labels (H, W), pred_labels (H, W), caption)``.
    """
    dpi, gap, title = 100.0, 12.0, 48.0  # pixels: between panels, above each row (2 lines)
    sizes = [_panel_px(np.shape(truth)) for _, _, truth, _, _ in rows] or [(256.0, 256.0)]
    # a column as wide as the narrowest panel holds its titles: a tall, narrow tile's
    # (512 x 96) ran into each other and off the figure
    column = max(PANEL_MIN_PX, *(w for w, _ in sizes))
    width = 3 * column + 4 * gap
    height = sum(h + title for _, h in sizes) + gap
    fig = _figure(width / dpi, height / dpi)
    top = height
    for (name, image, truth, pred, caption), (w, h) in zip(rows, sizes, strict=False):
        top -= title + h
        cmap = "gray" if image.ndim == 2 or image.shape[-1] == 1 else None
        panels = (
            (_display(image), cmap, "antialiased", name),
            (_label_rgb(truth), None, "nearest", f"truth ({_count(truth)})"),
            (_label_rgb(pred), None, "nearest", f"prediction ({_count(pred)})\n{caption}"),
        )
        for j, (shown, colours, interpolation, text) in enumerate(panels):
            left = gap + j * (column + gap) + (column - w) / 2
            ax = fig.add_axes((left / width, top / height, w / width, h / height))
            ax.imshow(shown, cmap=colours, interpolation=interpolation)
            ax.set_title(text, fontsize=9)
            ax.set_axis_off()
    return fig


def plot_worst(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]], path: str | Path
) -> Path:
    """:func:`worst_figure` as a PNG."""
    return _save(worst_figure(rows), path)
