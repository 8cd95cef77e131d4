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


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    """Instance labels -> RGB with a pseudo-random colour per label, black background.

    Colours go by rank among the labels present, not by label value: a tile of a slide's
    label image keeps ids up to 2**31 - 1, and a palette indexed by value took 45 GiB."""
    ids, rank = np.unique(labels, return_inverse=True)
    rng = np.random.default_rng(12345)
    palette = rng.uniform(0.25, 1.0, size=(ids.size, 3))
    palette[ids == 0] = 0
    return palette[rank.reshape(labels.shape)]


def _count(labels: np.ndarray) -> str:
    n = len(np.unique(labels)) - int((labels == 0).any())
    return f"{n} nucleus" if n == 1 else f"{n} nuclei"


def worst_figure(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]]):
    """One row per case: image | truth | prediction, titled with its name, the counts and
    the score text (a ``Figure``).

    Each row is ``(name, image (H, W, C), true_labels (H, W), pred_labels (H, W), caption)``.
    """
    n = max(len(rows), 1)
    fig = _figure(9, 3 * n)
    axes = np.atleast_2d(fig.subplots(n, 3, squeeze=False))
    for i, (name, image, truth, pred, caption) in enumerate(rows):
        cmap = "gray" if image.ndim == 2 or image.shape[-1] == 1 else None
        axes[i, 0].imshow(_display(image), cmap=cmap)
        axes[i, 0].set_title(f"{name}", fontsize=9)
        axes[i, 1].imshow(_label_rgb(truth), interpolation="nearest")
        axes[i, 1].set_title(f"truth ({_count(truth)})", fontsize=9)
        axes[i, 2].imshow(_label_rgb(pred), interpolation="nearest")
        axes[i, 2].set_title(f"prediction ({_count(pred)})\n{caption}", fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig


def plot_worst(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]], path: str | Path
) -> Path:
    """:func:`worst_figure` as a PNG."""
    return _save(worst_figure(rows), path)
