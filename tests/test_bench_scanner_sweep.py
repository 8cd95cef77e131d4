"""bench/scanner_sweep.py's figure (the sweep itself needs the shared data and a model)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from colour_vision import VISIONS, distance
from matplotlib.colors import to_rgb

import mlseg.plots
from bench.scanner_sweep import MODES, plot


def test_the_modes_lines_stay_apart_for_colour_blind_readers(tmp_path, monkeypatch) -> None:
    """The modes were drawn in matplotlib's blue, orange and green with one marker: auto
    (orange) and native (green) were 1 apart (CIEDE2000) for a red-blind reader."""
    figures = []
    monkeypatch.setattr(mlseg.plots, "_save", lambda fig, path: figures.append(fig) or path)
    levels = (0.5, 1.0, 2.0)
    summary = pd.DataFrame(
        [
            {"level": lv, "mode": m, "dice": 0.8, "pq": 0.6}
            | {"median_count_error": 0.1, "area_ratio": 1.05}
            for m in MODES
            for lv in levels
        ]
    )
    plot(summary, "scale", tmp_path / "scale_sweep.png")
    for ax in figures[0].axes:
        lines = [line for line in ax.lines if line.get_label() in MODES]
        assert len(lines) == len(MODES)
        assert len({line.get_marker() for line in lines}) == len(MODES)
        for a, b in itertools.combinations(lines, 2):
            rgb = [np.round(255 * np.array(to_rgb(x.get_color()))) for x in (a, b)]
            for vision in VISIONS:
                assert distance(*rgb, vision) >= 20, (a.get_label(), b.get_label(), vision)
