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


def test_auto_mode_knows_no_pixel_size_even_where_the_profile_sets_one(
    tmp_path, monkeypatch
) -> None:
    """``predict_labels_scaled`` takes a profile's ``pixel_size_um`` for an array given none,
    so the sweep's auto mode, meant to estimate every tile's scale, would have segmented at
    a size a custom profile sets: it now drops the profile's size, and only for auto."""
    from types import SimpleNamespace

    import cv2

    import mlseg.config
    import mlseg.segment
    from bench.scanner_sweep import sweep
    from mlseg.config import InferenceConfig, Profile

    image, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    cv2.imwrite(str(image), np.full((16, 16, 3), 200, np.uint8))
    cv2.imwrite(str(mask), np.zeros((16, 16), np.uint8))
    monkeypatch.setattr(
        mlseg.config, "get_profile", lambda *a: Profile(name="sized", pixel_size_um=0.5)
    )
    seen = {}

    def predict(loaded, image, profile, cfg, *, pixel_size_um):
        seen[cfg.auto_scale, pixel_size_um] = profile.pixel_size_um
        scale = SimpleNamespace(as_row=lambda: {})
        return np.zeros(image.shape[:2], np.int32), None, scale

    monkeypatch.setattr(mlseg.segment, "predict_labels_scaled", predict)
    config = SimpleNamespace(profile="sized", profiles_file=None, inference=InferenceConfig())
    loaded = SimpleNamespace(config=config, pixel_size_um=0.25)
    pair = SimpleNamespace(image=image, mask=mask, pixel_size_um=0.25, stem="a")
    monkeypatch.setattr(mlseg.plots, "_save", lambda fig, path: path)
    sweep(loaded, [pair], "scale", (1.0,), MODES, {})
    assert seen == {(True, None): None, (True, 0.25): 0.5, (False, 0.25): 0.5}
