"""bench/robustness.py's data steps (the scoring needs the shared data and a trained model)."""

from __future__ import annotations

import pandas as pd
from flow_helpers import disc_images

from bench.robustness import ingest_all
from mlseg.io import read_image, write_labels


def test_a_rerun_after_a_corrected_size_table_ingests_with_its_sizes(tmp_path) -> None:
    """A rerun into the same --out kept the dataset ingested first, so a corrected
    bench/data/*_pixel_sizes.csv was scored with the sizes it corrected."""
    src = tmp_path / "src"
    for path in disc_images(src / "original", 2):
        discs = (read_image(path)[..., 0] < 150).astype("uint8")
        write_labels(src / "masks" / f"{path.stem}_mask.png", discs)
    table = tmp_path / "sizes.csv"
    table.write_text("stem,pixel_size_um\nimg_000,0.5\nimg_001,0.5\n")
    ingest_all(src, tmp_path / "ds", [table])
    table.write_text("stem,pixel_size_um\nimg_000,0.25\nimg_001,0.5\n")
    manifest = pd.read_csv(ingest_all(src, tmp_path / "ds", [table]) / "manifest.csv")
    assert dict(zip(manifest["stem"], manifest["pixel_size_um"], strict=True)) == {
        "img_000": 0.25,
        "img_001": 0.5,
    }
