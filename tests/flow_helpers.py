"""Small builders shared by the flow tests (and others): a tiny real checkpoint, folders of
images, an image saved again as a TIFF of given pixel sizes, a broken suite file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlseg.io import write_image


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A real, loadable (untrained) checkpoint: U-Net on a 3-stage ResNet-18 (~3 MB).

    Its predictions are meaningless but deterministic, which is all the flow tests need.
    """
    import torch

    from mlseg.config import Config, InferenceConfig, TrainConfig
    from mlseg.model import build_model, save_checkpoint

    torch.manual_seed(seed)
    train = TrainConfig(encoder="resnet18", encoder_depth=3, patch_size=64, device="cpu")
    cfg = Config(
        train=train,
        inference=InferenceConfig(tile_size=64, batch_size=4, device="cpu", auto_scale=False),
    )
    model = build_model(train, 3, 3).eval()
    return save_checkpoint(
        folder,
        model,
        cfg,
        target="three_class",
        classes=3,
        in_channels=3,
        fingerprint_hash="test",
        metrics={"val_dice": 0.5},
        pixel_size_um=None,
        name="best",
    ).parent


def disc_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """``n`` RGB PNGs of dark discs on a light background (H&E-like colours)."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        image = np.full((size, size, 3), (235, 220, 230), np.uint8)
        for _ in range(max(2, size // 12)):
            r = int(rng.integers(4, 8))
            cy, cx = rng.integers(r, size - r, 2)
            rr, cc = disk((cy, cx), r, shape=image.shape[:2])
            image[rr, cc] = (90 + rng.integers(-10, 10), 50, 130)
        noise = rng.integers(-6, 7, image.shape)
        image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
        paths.append(write_image(folder / f"img_{i:03d}.png", image))
    return paths


def as_tiff_of_pixels(png: Path, um_wide: float, um_high: float) -> Path:
    """``png`` replaced by a TIFF of its pixels whose resolution tags declare ``um_wide`` x
    ``um_high`` microns per pixel (pixels per cm, as Fiji writes them)."""
    import tifffile

    from mlseg.io import read_image

    tiff = png.with_suffix(".tif")
    tifffile.imwrite(
        tiff,
        read_image(png),
        photometric="rgb",
        resolution=(1e4 / um_wide, 1e4 / um_high),
        resolutionunit="CENTIMETER",
    )
    png.unlink()
    return tiff


def flow_artifacts(flow_run_id) -> dict[str, object]:
    """The artifacts one flow run published, by key, read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


def artifact_rows(flow_run_id, key: str) -> list[dict]:
    """The rows of the table artifact ``key`` of one flow run."""
    import json

    data = flow_artifacts(flow_run_id)[key].data
    return json.loads(data) if isinstance(data, str) else data


def flow_logs(flow_run_id, level: int = 0) -> list[str]:
    """The messages one flow run (its tasks included) logged at ``level`` or above, as the
    dashboard shows them, read back from the Prefect server once every log is sent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        found = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                level=LogFilterLevel(ge_=level),
            )
        )
    return [log.message for log in found]


def task_run_names(flow_run_id) -> list[str]:
    """The names of one flow run's task runs, as the dashboard lists them, sorted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    return sorted(run.name for run in found)


def broken_suites(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the suites with a trailing comma in one file, made the suites every
    ``load_suites()`` reads; returns the broken file."""
    import shutil

    from expectations.runner import SUITES_DIR, load_suites

    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    path = suites / "dataset_errors.json"
    path.write_text(path.read_text().replace('"severity": "error",', '"severity": "error",,'))
    monkeypatch.setattr(load_suites, "__defaults__", (suites,))
    return path
