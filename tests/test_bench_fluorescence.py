"""bench/fluorescence.py's choice of tiles (its training and scoring need the shared data)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench.fluorescence import validation_dataset
from mlseg.config import DataConfig
from mlseg.dataset import init_dataset, list_pairs, split_dir
from mlseg.io import write_image


def test_validation_tiles_are_the_ones_the_model_held_back(tmp_path) -> None:
    """--split validation drew the validation tiles anew without the groups training holds
    copies back by, so on a set with copies it could score tiles the model trained on; it
    scores the tiles the model's meta.json names."""
    cfg = DataConfig()
    dataset = tmp_path / "ds"
    init_dataset(dataset, cfg)
    base = split_dir(dataset, cfg, "train")
    for i in range(6):
        write_image(base / cfg.image_dir / f"t{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
        write_image(base / cfg.mask_dir / f"t{i}_mask.png", np.zeros((8, 8), np.uint8))
    model = tmp_path / "model"
    loaded = SimpleNamespace(
        config=SimpleNamespace(data=cfg),
        meta={"split": {"train": ["t0", "t1", "t2", "t4"], "validation": ["t3", "t5"]}},
        path=model / "best.pt",
    )
    scored = validation_dataset(dataset, loaded, tmp_path / "out")
    assert [pair.stem for pair in list_pairs(scored, "test")] == ["t3", "t5"]
    loaded.meta = {}
    with pytest.raises(SystemExit, match="names no validation tiles"):
        validation_dataset(dataset, loaded, tmp_path / "out2")
