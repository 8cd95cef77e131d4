"""Figures: training curves and worst-case panels. Matplotlib (Agg canvas) imported lazily.

Figures are drawn on an explicit ``Figure`` + Agg canvas, so no global backend is set and
nothing needs a display; files are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def display_limits(image: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of ``image`` ``(H, W[, C])``, the range a display
    stretches to black and white, over the channels that hold any signal. A fluorescence
    image of one channel saved as RGB (DAPI in blue, red and green empty) took them over
    its empty channels too: two thirds zeros put the top near the background's level, and
    the background showed as bright as the nuclei (87% of white against 5% for its grey
    file)."""
    x = np.asarray(image)
    if x.ndim == 3 and x.shape[2] > 1:
        lit = [c for c in range(x.shape[2]) if np.any(x[..., c])]
        if 0 < len(lit) < x.shape[2]:
            x = x[..., lit]
    lo, hi = np.nanpercentile(x, (0.5, 99.5))
    return float(lo), float(hi)


def _display(image: np.ndarray) -> np.ndarray:
    """Any ``(H, W, C)`` image -> something imshow shows faithfully (per-image min-max,
    :func:`display_limits`)."""
    x = np.asarray(image, dtype=np.float32)
    lo, hi = display_limits(x)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
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


def _touching(labels: np.ndarray) -> np.ndarray:
    """``(P, 2)`` pairs of label values that are 4-neighbours somewhere, the lower first,
    each pair once (0 is the background)."""
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        apart = a != b
        apart &= a != 0
        apart &= b != 0
        pairs.append(np.stack([a[apart], b[apart]], 1))
    pairs = np.concatenate(pairs)
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _colour_index(labels: np.ndarray, step: int = 1) -> np.ndarray:
    """Instance labels ``(H, W)`` -> ``(H // step, W // step) int8``: the index in
    :data:`LABEL_COLOURS` of the nucleus at the middle of each ``step`` x ``step`` block
    (nearest neighbour, no label mixed with another), -1 for the background; the last
    ``H % step`` rows and ``W % step`` columns are left out. Each nucleus gets a colour none
    of its touching neighbours has (first fit, in the order of label values), chosen on the
    whole image, so the colours are those drawn at full size: a nucleus thinner than a
    block, never sampled, still gives its neighbours other colours than its own.

    Colours went at random: touching nuclei in near-equal colours read as one, a split
    nucleus as merged, for 6% of touching pairs in normal vision and 10-15% for colour-blind
    viewers (CIEDE2000 under 10). Colours go by rank among the nuclei that touch another,
    not by label value: a tile of a slide's label image keeps ids up to 2**31 - 1, and a
    palette indexed by value took 45 GiB. A nucleus that touches none takes the first."""
    pairs = _touching(labels)
    ids = np.unique(pairs)  # the nuclei touching another, ascending
    rank = np.searchsorted(ids, pairs)
    rank = np.concatenate([rank, rank[:, ::-1]])
    rank = rank[np.argsort(rank[:, 0], kind="stable")]
    starts = np.searchsorted(rank[:, 0], np.arange(ids.size + 1))
    colour = np.full(ids.size, -1, np.int8)
    for r in range(ids.size):
        used = np.bincount(
            colour[rank[starts[r] : starts[r + 1], 1]] + 1, minlength=len(LABEL_COLOURS) + 1
        )[1:]
        colour[r] = int(np.argmin(used))  # the first unused, else the least used (rare)
    height, width = (n // step * step for n in labels.shape)
    shown = labels[step // 2 : height : step, step // 2 : width : step]
    index = np.where(shown == 0, -1, 0).astype(np.int8)
    if ids.size:
        at = np.minimum(np.searchsorted(ids, shown), ids.size - 1)
        touching = ids[at] == shown
        index[touching] = colour[at[touching]]
    return index


#: :data:`LABEL_COLOURS` in [0, 1], then black: the colour of index -1, the background
_PALETTE = np.vstack([np.array(LABEL_COLOURS) / 255.0, np.zeros((1, 3))])


def _count(labels: np.ndarray) -> str:
    n = len(np.unique(labels)) - int((labels == 0).any())
    return f"{n} nucleus" if n == 1 else f"{n} nuclei"


#: Worst cases ``mlseg evaluate`` draws in ``worst.png`` (lowest AJI), and the run report lists.
WORST_SHOWN = 4
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


def _shrunk_display(image: np.ndarray, step: int) -> np.ndarray:
    """:func:`_display` of ``image`` (its limits from every pixel), averaged over
    ``step`` x ``step`` blocks as :func:`_colour_index` samples them: ``(H // step,
    W // step[, C]) float32``, made a band of rows at a time, so no float copy of the whole
    image is made."""
    x = image if image.ndim == 3 else image[..., None]
    lo, hi = display_limits(x)
    height, width = x.shape[0] // step, x.shape[1] // step
    out = np.empty((height, width, x.shape[2]), np.float32)
    rows = max(1, 256 // step)  # blocks a band
    for top in range(0, height, rows):
        n = min(rows, height - top)
        band = x[top * step : (top + n) * step, : width * step].astype(np.float32)
        band = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
        out[top : top + n] = band.reshape(n, step, width, step, -1).mean(axis=(1, 3))
    return out[..., 0] if out.shape[2] == 1 else out


@dataclass(frozen=True)
class WorstCase:
    """One worst case as :func:`worst_figure` draws it, held at under twice its panels'
    size however large the image (:func:`worst_case`)."""

    name: str
    caption: str
    shape: tuple[int, int]  # (H, W) of the image: the size its panels are drawn at
    image: np.ndarray  # (h, w) or (h, w, 3) float32 in [0, 1]: what the image panel shows
    truth: np.ndarray  # (h, w) int8: each pixel's index in LABEL_COLOURS, -1 the background
    pred: np.ndarray  # (h, w) int8, the same for the prediction
    truth_count: str  # "12 nuclei": counted on the whole image
    pred_count: str


def worst_case(
    name: str, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, caption: str
) -> WorstCase:
    """One case of :func:`worst_figure` (image ``(H, W[, C])``, true and predicted instance
    labels ``(H, W)``), reduced by the largest whole factor that leaves its longest side at
    least :data:`PANEL_MAX_PX`: the image by the mean of each block, the labels by the
    block's middle pixel, coloured as on the whole image; matplotlib draws what is left of
    the reduction, as it drew all of it before. An image under twice that size is kept
    whole, and drawn exactly as before. A 4,096-pixel field is held at 512 pixels a side,
    about 4 MB: :func:`mlseg.evaluate.evaluate` held each of its worst cases whole (11
    bytes a pixel) and drew them together from full-size float RGB panels."""
    step = max(1, min(max(np.shape(truth)[:2]) // PANEL_MAX_PX, *np.shape(truth)[:2]))
    image = np.asarray(image)
    shown = _display(image) if step == 1 else _shrunk_display(image, step)
    return WorstCase(
        name=name,
        caption=caption,
        shape=np.shape(truth)[:2],
        image=shown,
        truth=_colour_index(truth, step),
        pred=_colour_index(pred, step),
        truth_count=_count(truth),
        pred_count=_count(pred),
    )


def worst_figure(
    rows: Sequence[WorstCase | tuple[str, np.ndarray, np.ndarray, np.ndarray, str]],
):
    """One row per case: image | truth | prediction, titled with its name, the counts and
    the score text (a ``Figure``). Each panel is :func:`_panel_px` figure pixels (100 dpi).

    Each row is a :class:`WorstCase` or ``(name, image (H, W, C), true_labels (H, W),
    pred_labels (H, W), caption)``, reduced here by :func:`worst_case`.
    """
    cases = [row if isinstance(row, WorstCase) else worst_case(*row) for row in rows]
    dpi, gap, title = 100.0, 12.0, 48.0  # pixels: between panels, above each row (2 lines)
    sizes = [_panel_px(case.shape) for case in cases] or [(256.0, 256.0)]
    # a column as wide as the narrowest panel holds its titles: a tall, narrow tile's
    # (512 x 96) ran into each other and off the figure
    column = max(PANEL_MIN_PX, *(w for w, _ in sizes))
    width = 3 * column + 4 * gap
    height = sum(h + title for _, h in sizes) + gap
    fig = _figure(width / dpi, height / dpi)
    top = height
    for case, (w, h) in zip(cases, sizes, strict=False):
        top -= title + h
        cmap = "gray" if case.image.ndim == 2 else None
        panels = (
            (case.image, cmap, "antialiased", case.name),
            (_PALETTE[case.truth], None, "nearest", f"truth ({case.truth_count})"),
            (
                _PALETTE[case.pred],
                None,
                "nearest",
                f"prediction ({case.pred_count})\n{case.caption}",
            ),
        )
        for j, (shown, colours, interpolation, text) in enumerate(panels):
            left = gap + j * (column + gap) + (column - w) / 2
            ax = fig.add_axes((left / width, top / height, w / width, h / height))
            ax.imshow(shown, cmap=colours, interpolation=interpolation)
            ax.set_title(text, fontsize=9)
            ax.set_axis_off()
    return fig


def plot_worst(
    rows: Sequence[WorstCase | tuple[str, np.ndarray, np.ndarray, np.ndarray, str]],
    path: str | Path,
) -> Path:
    """:func:`worst_figure` as a PNG."""
    return _save(worst_figure(rows), path)
