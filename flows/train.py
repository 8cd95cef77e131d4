"""Flow ``train-model``: :func:`mlseg.train.fit` as a Prefect task, with dashboard artifacts.

Rerunning on the same ``out_dir`` resumes from the last checkpoint (``fit(resume=True)``),
so a crashed or cancelled training run continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.common import data_path, log_warnings, run_config


@task(name="fit", task_run_name="fit {out_dir}")
def fit_task(
    data_root: str,
    out_dir: str,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    fingerprint_hash: str | None = None,
    resume: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Train; returns paths and numbers (JSON-ready) of :class:`mlseg.train.TrainResult`."""
    from mlseg.train import describe_scale, fit

    cfg = run_config(config, overrides)
    result = fit(
        cfg,
        data_root,
        out_dir,
        resume=resume,
        fingerprint_hash=fingerprint_hash,
        progress=progress,
        log=get_run_logger().info,  # each epoch in the dashboard as it ends
    )
    best = result.best_checkpoint or result.last_checkpoint
    return {
        "checkpoint": str(best),
        "checkpoint_dir": str(Path(best).parent),
        "best_val_dice": result.best_val_dice,
        "steps": int(result.steps),
        "images_per_s": float(result.images_per_s),
        "train_images": result.train_images,
        "val_images": result.val_images,
        "pixel_size_um": result.pixel_size_um,
        "scale": describe_scale(result.pixel_size_um, result.image_pixel_sizes),
        "history_csv": str(Path(result.out_dir) / "history.csv"),
        "curves_png": str(Path(result.out_dir) / "training_curves.png"),
        "out_dir": str(result.out_dir),
    }


@flow(name="train-model", flow_run_name="train {data_root}", log_prints=True)
def train_model(
    data_root: str,
    out_dir: str,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    fingerprint_hash: str | None = None,
    resume: bool = True,
    progress: bool = False,
    validate_data: bool = True,
) -> dict[str, Any]:
    """Train a U-Net on ``data_root``'s train split into ``out_dir`` (resumable).

    ``config`` is a YAML run config (defaults if empty); ``overrides`` section dicts such as
    ``{"train": {"max_steps": 300}}``; ``fingerprint_hash`` the one ``validate-dataset``
    returned (data changed since is refused); without one, ``validate_data`` runs that flow
    first, whose failure stops training. ``progress`` shows a progress bar on stderr.
    Publishes the training history table, a link to the curves and the output paths.

    Args:
        data_root: Dataset folder; its ``train/`` split is trained on, part of it held out for
            validation. Relative: under ``MLSEG_DATA_DIR`` if set.
        out_dir: Run folder: checkpoints, ``history.csv``, training curves; a rerun resumes.
            Relative: under ``MLSEG_DATA_DIR`` if set.
        config: Run config YAML (model, training recipe, profile); empty: defaults. Relative: under
            ``MLSEG_DATA_DIR`` if set.
        overrides: Run config sections to change, e.g. ``{"train": {"max_steps": 300}}``.
        fingerprint_hash: ``fingerprint_hash`` returned by ``validate-dataset``; training data
            changed since is refused. Empty: see ``validate_data``.
        resume: Continue from the last checkpoint in ``out_dir``; false deletes its checkpoints and
            trains afresh (a resume refuses other data or another recipe).
        progress: Show a progress bar on the worker's stderr (epochs are logged either way).
        validate_data: Without ``fingerprint_hash``, run ``validate-dataset`` first (into
            ``<out_dir>/validation``); its failure stops training. False skips the check.
    """
    import pandas as pd

    from mlseg.train import describe

    log_warnings()
    # a deployed worker runs in a fresh temporary folder: relative paths are under /data
    data_root, out_dir = str(data_path(data_root, "data_root")), str(data_path(out_dir, "out_dir"))
    if fingerprint_hash is None and validate_data:
        from mlseg.model import check_names

        check_names(run_config(config, overrides).train)  # not after the validation
        from flows.validate import validate_dataset_flow

        checked = validate_dataset_flow(
            data_root, str(Path(out_dir) / "validation"), config, overrides=overrides
        )
        fingerprint_hash = checked["fingerprint_hash"]
    result = fit_task(data_root, out_dir, config, overrides, fingerprint_hash, resume, progress)
    dice = result["best_val_dice"]
    done = describe(
        result["steps"],
        result["images_per_s"],
        dice,
        result.get("train_images"),  # absent from a result cached by an older release
        result.get("val_images"),
    )
    get_run_logger().info("%s; checkpoint %s", done, result["checkpoint"])
    if result.get("scale"):  # absent from a result cached by an older release
        get_run_logger().info("%s", result["scale"])
    history = Path(result["history_csv"])
    if history.is_file():
        artifacts.table(
            "training-history",
            pd.read_csv(history),
            f"one row per validation epoch; {done}",
        )
    if Path(result["curves_png"]).is_file():
        artifacts.link("training-curves", result["curves_png"], "training curves (PNG)")
    artifacts.outputs(
        "training-outputs",
        {k: result[k] for k in ("checkpoint", "checkpoint_dir", "history_csv", "curves_png")},
    )
    return result
