"""Flow ``evaluate-model``: :func:`mlseg.evaluate.evaluate` with an evaluation table artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.common import data_path, log_warnings, run_log


@task(name="evaluate", task_run_name="evaluate {model} on {split}")
def evaluate_task(
    model: str,
    data_root: str,
    out_dir: str,
    split: Literal["train", "test"] = "test",
    profile: str | None = None,
    inference: dict[str, Any] | None = None,
    pixel_size_um: float | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``split``; returns means, eval set id and output paths.
    ``inference`` overrides keys of the model's own inference settings; ``pixel_size_um``
    the dataset's pixel sizes (:func:`mlseg.evaluate.evaluate`)."""
    from flows.segment import inference_settings
    from mlseg.evaluate import evaluate

    settings = inference_settings(model, inference) if inference else None
    result = evaluate(
        model,
        data_root,
        out_dir,
        split=split,
        profile=profile,
        inference_cfg=settings,
        pixel_size_um=pixel_size_um,
        progress=False,
        log=run_log(),  # a line a minute in the run log: a large test set said nothing for hours
    )
    return {
        "means": {k: float(v) for k, v in result.means.items()},
        "eval_set_id": result.eval_set_id,
        "n_images": len(result.per_image),
        "per_image_csv": str(result.csv_path),
        "summary_json": str(result.json_path),
        "worst_png": None if result.worst_png is None else str(result.worst_png),
        "out_dir": str(result.out_dir),
    }


@flow(
    name="evaluate-model", flow_run_name="evaluate {model} on {data_root} {split}", log_prints=True
)
def evaluate_model(
    model: str,
    data_root: str,
    out_dir: str,
    split: Literal["train", "test"] = "test",
    profile: str | None = None,
    inference: dict[str, Any] | None = None,
    pixel_size_um: float | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (folder or ``.safetensors``) on a labelled split.

    Publishes the means, the per-image table (worst first) and the worst-cases figure link.

    Args:
        model: Checkpoint folder (as ``train-model`` writes it) or its ``.safetensors`` file.
            Relative: under ``MLSEG_DATA_DIR`` if set.
        data_root: Dataset folder holding the labelled split. Relative: under ``MLSEG_DATA_DIR`` if
            set.
        out_dir: Output folder: per-image CSV, summary JSON, worst-cases PNG. Relative: under
            ``MLSEG_DATA_DIR`` if set.
        split: Which split to score: ``test`` or ``train``.
        profile: Image-type profile by name, from the model config's profiles file (packaged:
            ``he``, ``ihc``, ``fluorescence``); empty: the one the model was trained with.
        inference: Keys of the model's saved inference settings to change, e.g.
            ``{"tta": true, "device": "cpu"}``; empty: the model's own.
        pixel_size_um: Microns per pixel of every image of the split; empty: each image's from
            the dataset's manifest, else its own metadata, else the profile's.
    """
    from mlseg.io import read_written_csv

    log_warnings()
    # a deployed worker runs in a fresh temporary folder: relative paths are under /data
    model, data_root, out_dir = (
        str(data_path(p, n))
        for p, n in ((model, "model"), (data_root, "data_root"), (out_dir, "out_dir"))
    )
    result = evaluate_task(model, data_root, out_dir, split, profile, inference, pixel_size_um)
    means = result["means"]
    get_run_logger().info(
        "%d images: Dice %.4f AJI %.4f PQ %.4f (eval set %s)",
        result["n_images"],
        means.get("dice", float("nan")),
        means.get("aji", float("nan")),
        means.get("pq", float("nan")),
        result["eval_set_id"],
    )
    artifacts.table(
        "evaluation-means",
        means,
        f"means over {result['n_images']} {split} images (eval set {result['eval_set_id']})",
    )
    per_image = read_written_csv(result["per_image_csv"], "stem")  # "01" is not 1
    if "aji" in per_image:
        per_image = per_image.sort_values("aji")
    artifacts.table("evaluation-per-image", per_image, "one row per image, lowest AJI first")
    if result["worst_png"] and Path(result["worst_png"]).is_file():
        artifacts.link("evaluation-worst-cases", result["worst_png"], "worst cases (PNG)")
    artifacts.outputs(
        "evaluation-outputs",
        {k: result[k] for k in ("per_image_csv", "summary_json", "worst_png", "out_dir")},
    )
    return result
