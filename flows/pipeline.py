"""Flow ``pipeline``: validate -> preprocess -> train -> evaluate -> register/promote ->
segment and quantify the test images -> monitor -> HTML report.

Each stage is one of the stage flows (a subflow in the dashboard) or a task calling one
``mlseg`` function. A failed validation raises before training starts. The new model is
registered and promoted only if it beats the production model on the same evaluation set
(the champion is evaluated on this set first when the registry has no score for it); the
test images are then segmented with whichever model is in production. Drift above
``monitor.psi_fail`` fails the pipeline, after the report is written.

Everything lands under ``work_dir``; a rerun resumes training, skips segmented images, and
reuses the registry version of unchanged weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import artifacts
from flows.common import (
    data_path,
    log_warnings,
    resolve_profile,
    run_config,
    temporary_server_apart,
    user_errors_exit,
)
from flows.evaluate import evaluate_model, evaluate_task
from flows.monitor import monitor
from flows.runners import add_runner_arguments, runner_settings
from flows.segment import segment_and_quantify
from flows.train import train_model
from flows.validate import validate_dataset_flow


@task(name="preprocess-plan", cache_policy=NO_CACHE)
def preprocess_task(
    config: str | None, overrides: dict[str, Any] | None, profile: dict[str, Any], out: str
) -> dict[str, Any]:
    """Resolve and record the preprocessing both training and inference apply.

    Decoding, rescaling and normalisation happen inside training (on the training device)
    and inference, identically; this step fixes and records *which* settings they use, and
    checks that a stain reference image, when one is needed, exists.
    """
    from mlseg.config import Profile
    from mlseg.data import effective_preprocess
    from mlseg.errors import ConfigError
    from mlseg.io import write_text

    cfg = run_config(config, overrides)
    pre = effective_preprocess(cfg, Profile.model_validate(profile))
    needs_reference = pre.stain_norm != "none" or pre.equalize == "match"
    if needs_reference and pre.stain_reference is not None and not pre.stain_reference.is_file():
        raise ConfigError(f"preprocess.stain_reference: {pre.stain_reference} not found")
    path = write_text(Path(out) / "preprocess.json", pre.model_dump_json(indent=2) + "\n")
    settings = pre.model_dump(mode="json")
    artifacts.table("preprocess-settings", settings, "preprocessing used in training and inference")
    return {"settings": settings, "path": str(path)}


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_task(
    checkpoint: str,
    registry: str,
    model_name: str,
    metrics: dict[str, float],
    eval_set_id: str,
    fingerprint_hash: str | None,
    metric: str,
    min_improvement: float,
    champion_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Register the new weights (once) and run the champion/challenger comparison."""
    from mlseg import registry as reg

    version, _ = reg.register_scores(
        checkpoint,
        registry,
        metrics=metrics,
        eval_set_id=eval_set_id,
        fingerprint_hash=fingerprint_hash,
        name=model_name,
    )
    decision = reg.champion_challenger(
        registry,
        version,
        metric=metric,
        min_improvement=min_improvement,
        champion_metrics=champion_metrics,
        eval_set=eval_set_id,
    )
    production = reg.production(registry, model_name)
    return {
        "version": version.tag,
        "version_uri": version.uri,
        "production": production.tag if production else None,
        "production_uri": production.uri if production else None,
        "production_version": production.version if production else None,
        "decision": decision.as_dict(),
    }


def _champion_needs_eval(registry: str, model_name: str, checkpoint: str, eval_set: str):
    """The production version if it differs from ``checkpoint`` and lacks a score on
    ``eval_set`` (so it must be evaluated there before the comparison), else None."""
    from mlseg import registry as reg

    champion = reg.production(registry, model_name)
    if champion is None or champion.metrics_on(eval_set) is not None:
        return None
    same = reg.find_version(registry, checkpoint, model_name)
    return None if same is not None and same.version == champion.version else champion


def _check_production(registry: str, model_name: str, decision: dict[str, Any]) -> None:
    """Stop where no production model is left to segment the test images with: the first
    model was not promoted (it found no nucleus in any test image, or has no score), and
    the segment step failed with "no production version; promote one", not saying why."""
    from mlseg import registry as reg
    from mlseg.registry import RegistryError

    if decision.get("promoted") or reg.production(registry, model_name) is not None:
        return
    raise RegistryError(
        f"no production model {model_name!r} to segment the test images with: "
        f"{decision['reason']}; train longer or check the data and rerun, or promote a "
        f"version by hand (mlseg models promote {model_name} VERSION --reason ...)"
    )


def _validation_table(validation: dict[str, Any]):
    import pandas as pd

    rows = [
        {k: o.get(k) for k in ("severity", "rule", "success", "n_failed", "n_checked")}
        for o in validation.get("outcomes", [])
    ]
    return pd.DataFrame(rows)


def _with_profile(
    config: str | None,
    overrides: dict[str, Any] | None,
    profile: str | None,
    profiles: dict[str, Any] | str | None,
) -> dict[str, Any]:
    """``overrides`` with the pipeline's profile as the run config's, so training and
    evaluation (which read the run config) use the profile segmentation uses. A ``profiles``
    mapping that defines that profile otherwise than the run config's profiles file is
    refused: a model keeps its config, and a path to a temporary copy would not travel."""
    out = dict(overrides or {})
    if profile:
        out["profile"] = profile
    if profiles:
        from mlseg.config import get_profile
        from mlseg.errors import ConfigError

        cfg = run_config(config, out)
        given = resolve_profile(cfg.profile, profiles)
        trained = get_profile(cfg.profile, cfg.profiles_file)
        if given.model_dump(exclude={"name"}) != trained.model_dump(exclude={"name"}):
            raise ConfigError(
                f"profiles parameter: profile {cfg.profile!r} differs from the one in "
                f"{cfg.profiles_file or 'mlseg/profiles.yaml'}, which training and evaluation "
                f"read; put it in a profiles file and set profiles_file in the run config"
            )
    return out


def _inference(cfg) -> dict[str, Any] | None:
    """The run config's inference section where the run sets it, else None (each model's
    own, as saved with it)."""
    if "inference" not in cfg.model_fields_set:
        return None
    return cfg.inference.model_dump(mode="json", exclude_unset=True) or None


@flow(name="pipeline", flow_run_name="pipeline {data_root}", log_prints=True)
def pipeline(
    data_root: str,
    work_dir: str,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    registry: str | None = None,
    model_name: str = "nuclei",
    promote_metric: str = "aji",
    min_improvement: float = 0.0,
    profile: str | None = None,
    profiles: dict[str, Any] | str | None = None,
    pixel_size_um: float | None = None,
    batch_size: int = 8,
    task_runner: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    resume: bool = True,
) -> dict[str, Any]:
    """Run every stage on ``data_root`` (contract layout); outputs under ``work_dir``.

    ``config``/``overrides``: the run config (YAML path, section overrides). ``registry``:
    folder or fsspec URL (default ``<work_dir>/registry``). ``promote_metric``: the
    evaluation mean that decides champion/challenger (higher is better). ``profile``
    (default: the config's) is every stage's, training's included; ``profiles`` must define
    it as the config's profiles file does. ``pixel_size_um`` overrides every test image's
    pixel size, where the new and the production model are scored and where the test images
    are segmented; without it each has the manifest's, else its own metadata's or the
    profile's.
    ``resume=False`` trains afresh in ``work_dir``, as a new dataset or recipe needs (a
    resume refuses them; the models already registered stay). Returns the paths of every
    output.

    Args:
        data_root: Dataset folder: ``train/`` and ``test/`` splits, each of ``original/`` images and
            ``masks/``. Relative: under ``MLSEG_DATA_DIR`` if set.
        work_dir: Output folder of every stage and of ``report.html``; a rerun resumes. Relative:
            under ``MLSEG_DATA_DIR`` if set.
        config: Run config YAML (data layout, model, training, inference, monitor); empty: defaults.
            Relative: under ``MLSEG_DATA_DIR`` if set.
        overrides: Run config sections to change, e.g. ``{"train": {"max_steps": 300}}``.
        registry: Model registry folder or URL (``s3://bucket/models``); empty:
            ``<work_dir>/registry``. Relative: under ``MLSEG_DATA_DIR`` if set.
        model_name: Model name in the registry: lower-case letters, digits, ``-`` and ``_``.
        promote_metric: Evaluation mean that decides promotion, one that is better higher: ``aji``,
            ``dice``, ``pq``, ``f1``, ``iou``...
        min_improvement: Promote the new model only where its ``promote_metric`` exceeds the
            production model's by more than this (``0``: any gain; the scores are 0-1).
        profile: Image-type profile of every stage, training's included; empty: the config's.
        profiles: Content of a profiles.yaml (a mapping or its JSON text); it must define the
            profile as the config's profiles file does. Empty: that file.
        pixel_size_um: Microns per pixel of every test image; empty: each image's from the dataset's
            manifest, else its own metadata, else the profile's.
        batch_size: Images per segmentation task.
        task_runner: Segmentation task runner: ``thread`` or ``dask``; empty: ``MLSEG_TASK_RUNNER``,
            else ``dask`` if a Dask address is set, else ``thread``.
        dask_address: Existing Dask scheduler (``tcp://host:8786``); empty: ``MLSEG_DASK_ADDRESS``,
            else a local cluster when ``task_runner`` is ``dask``.
        workers: Segmentation threads, or processes of a local Dask cluster, 1 or more; empty:
            CPU cores, at most 4.
        progress: Show a training progress bar on the worker's stderr (epochs are logged either
            way).
        resume: Resume training from the last checkpoint in ``<work_dir>/train``; false deletes its
            checkpoints and trains afresh (registered models stay).
    """
    from mlseg.dataset import split_pixel_sizes

    log_warnings()
    logger = get_run_logger()
    root, work = data_path(data_root, "data_root"), data_path(work_dir, "work_dir")
    registry = registry or str(work / "registry")
    if "://" not in registry:
        registry = str(data_path(registry))
    # the profile parameters reach every stage: training and evaluation read the run config
    overrides = _with_profile(config, overrides, profile, profiles)
    cfg = run_config(config, overrides)
    prof = resolve_profile(cfg.profile, profiles, profiles_file=cfg.profiles_file)
    _check_later_stages(cfg, promote_metric, model_name, pixel_size_um)
    runner_settings(task_runner, dask_address, workers)
    test_images = root / cfg.data.test_dir / cfg.data.image_dir

    # 1. validate: raises ValidationFailed (and the pipeline stops) on error-level failures
    validation = validate_dataset_flow(
        str(root), str(work / "validation"), config, overrides=overrides
    )
    fingerprint_path = validation["outputs"]["fingerprint"]

    # 2. preprocess: fix and record the settings training and inference share
    preprocess = preprocess_task(config, overrides, prof.model_dump(mode="json"), str(work))

    # 3. train (resumes from the last checkpoint on a rerun)
    trained = train_model(
        str(root),
        str(work / "train"),
        config,
        overrides,
        validation["fingerprint_hash"],
        resume,
        progress,
    )

    # 4. evaluate the new model on the test split, with this run's inference settings
    evaluated = evaluate_model(
        trained["checkpoint"],
        str(root),
        str(work / "evaluate"),
        inference=_inference(cfg),
        pixel_size_um=pixel_size_um,
    )

    # 5. register; champion/challenger on the same evaluation set
    champion = _champion_needs_eval(
        registry, model_name, trained["checkpoint"], evaluated["eval_set_id"]
    )
    champion_metrics = None
    if champion is not None:
        champion_metrics = _score_champion(registry, champion, root, work, pixel_size_um)
    registered = register_task(
        trained["checkpoint"],
        registry,
        model_name,
        evaluated["means"],
        evaluated["eval_set_id"],
        validation["fingerprint_hash"],
        promote_metric,
        min_improvement,
        champion_metrics,
    )
    decision = registered["decision"]
    artifacts.table("model-decision", decision, decision["reason"])
    logger.info("registry: %s", decision["reason"])
    _check_production(registry, model_name, decision)

    # 6. segment and quantify the test images with the production model found at step 5, by
    # number: looked up again, a version promoted by hand in between measured the images
    # while the report named the other
    quantified = segment_and_quantify(
        str(test_images),
        str(work / "quantify"),
        registry=registry,
        model_name=model_name,
        model_version=registered["production_version"] or "production",
        profile=prof.name,
        profiles=profiles or {prof.name: prof.model_dump(mode="json")},  # profiles_file's
        inference=_inference(cfg),
        pixel_size_um=pixel_size_um,
        pixel_sizes=split_pixel_sizes(root, "test") or None,
        batch_size=batch_size,
        task_runner=task_runner,
        dask_address=dask_address,
        workers=workers,
    )

    # 7. monitor: drift of these images vs the training fingerprint, with how step 6 scaled
    # them and the pixel sizes it used (the manifest's, which the images' files lack)
    monitor_state = monitor(
        str(test_images),
        fingerprint_path,
        str(work / "monitor"),
        config,
        overrides,
        quantified["history_csv"],
        results=str(Path(quantified["summary_csv"]).parent),
        return_state=True,
    )
    drift = _drift(work / "monitor" / "drift.json", monitor_state)

    # 8. the report for people who do not open the dashboard
    outputs = {
        "report": str(work / "report.html"),
        "model": registered["production_uri"],
        "measurements (per image)": quantified["summary_csv"],
        "measurements (per nucleus)": quantified["nuclei_parquet"],
        "histograms": quantified["histograms_png"],
        "evaluation": evaluated["per_image_csv"],
        "training checkpoint": trained["checkpoint"],
        "validation": str(work / "validation"),
        "drift": str(work / "monitor" / "drift.csv"),
        "run history": quantified["history_csv"],
        "registry": registry,
    }
    report = _report(
        root,
        work,
        prof,
        validation,
        preprocess,
        trained,
        evaluated,
        registered,
        quantified,
        drift,
        str(monitor_state.message),
        outputs,
    )
    report.write(outputs["report"])
    artifacts.link("pipeline-report", outputs["report"], "HTML report of this run")
    artifacts.outputs("pipeline-outputs", outputs)
    if monitor_state.is_failed():
        monitor_state.result()  # re-raises DriftDetected: the pipeline ends Failed
    return {**outputs, "decision": decision, "means": evaluated["means"]}


def _check_later_stages(
    cfg, promote_metric: str, model_name: str, pixel_size_um: float | None
) -> None:
    """The parameters of the stages after training, checked before it: a typo there failed
    the run only after training, with the new model registered and promoted."""
    from mlseg.dataset import check_pixel_size
    from mlseg.errors import ConfigError
    from mlseg.evaluate import SCORES
    from mlseg.model import check_names
    from mlseg.registry import check_name

    if promote_metric not in SCORES:
        raise ConfigError(
            f"promote_metric {promote_metric!r}: choose a score that is better higher, one of "
            + ", ".join(SCORES)
        )
    check_name(model_name)
    check_names(cfg.train)
    if pixel_size_um is not None:
        check_pixel_size(pixel_size_um, "pixel_size_um")


def _score_champion(
    registry: str, champion, root: Path, work: Path, pixel_size_um: float | None
) -> dict[str, float]:
    """The production model's means on this run's evaluation set, recorded on its card."""
    from mlseg import registry as reg

    scored = evaluate_task(
        str(reg.fetch(champion)),
        str(root),
        str(work / f"evaluate-{champion.name}-v{champion.version}"),
        pixel_size_um=pixel_size_um,
    )
    reg.record_evaluation(
        registry, champion.name, champion.version, scored["eval_set_id"], scored["means"]
    )
    return scored["means"]


def _report(
    root: Path,
    work: Path,
    prof,
    validation: dict[str, Any],
    preprocess: dict[str, Any],
    trained: dict[str, Any],
    evaluated: dict[str, Any],
    registered: dict[str, Any],
    quantified: dict[str, Any],
    drift: dict[str, Any],
    monitor_message: str,
    outputs: dict[str, str],
):
    """The run's HTML report (:func:`mlseg.report.pipeline_report`), for people who do not
    open the dashboard."""
    import pandas as pd

    from mlseg.io import read_written_csv
    from mlseg.report import pipeline_report

    history = (
        pd.read_csv(trained["history_csv"]) if Path(trained["history_csv"]).is_file() else None
    )
    return pipeline_report(
        title=f"mlseg pipeline: {root.name}",
        run={
            "dataset": str(root),
            "work folder": str(work),
            "profile": f"{prof.name} v{prof.version}",
            "model in production": registered["production"],
            "new model": registered["version"],
        },
        validation_status="passed" if validation.get("success") else "failed",
        validation=_validation_table(validation),
        history=history,
        curves_png=trained["curves_png"],
        training={
            "steps": trained["steps"],
            "best validation Dice": trained["best_val_dice"],
            "training images/s": trained["images_per_s"],
            "preprocess": json.dumps(preprocess["settings"]),
        },
        evaluation=read_written_csv(evaluated["per_image_csv"], "stem"),
        evaluation_means=evaluated["means"],
        worst_metric="aji",
        worst_png=evaluated["worst_png"],
        decision=registered["decision"],
        quantification=read_written_csv(quantified["summary_csv"], "image"),
        nuclei=pd.read_parquet(quantified["nuclei_parquet"]),  # this run's images only
        drift_status=drift.get("status", "failed"),
        drift_message=drift.get("message", monitor_message),
        drift=pd.DataFrame(drift.get("statistics", [])),
        run_metrics={"seconds": quantified["seconds"], "images/s": quantified["images_per_s"]},
        paths=outputs,
    )


def _drift(path: Path, state) -> dict[str, Any]:
    """The drift report (``drift.json`` at ``path``) of the monitor run that ended in
    ``state``; empty where that run wrote none: failed before it (disk full) or finding no
    images. The one there then is an earlier run's, which the report showed as this run's
    (a monitor failed on a full disk: 'Monitoring OK')."""
    from mlseg.monitor import DriftDetected

    outcome = state.result(raise_on_failure=False)
    if state.is_failed():
        written = isinstance(outcome, DriftDetected)  # raised after drift.json was written
    else:
        written = isinstance(outcome, dict) and "drift_json" in outcome
    return json.loads(path.read_text()) if written and path.is_file() else {}


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """``python -m flows.pipeline DATA WORK [--config C] [--registry R]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("data_root", help="dataset folder (train/ and test/)")
    parser.add_argument("work_dir", help="output folder of every stage; a rerun resumes")
    parser.add_argument("--config", default=None, help="run config (YAML)")
    parser.add_argument(
        "--registry", default=None, help="registry folder or URL (default: work_dir/registry)"
    )
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false", help="train afresh in work_dir"
    )
    add_runner_arguments(parser)
    args = parser.parse_args(argv)
    temporary_server_apart()
    result = pipeline(
        args.data_root,
        args.work_dir,
        config=args.config,
        registry=args.registry,
        task_runner=args.task_runner,
        dask_address=args.dask_address,
        workers=args.workers,
        progress=sys.stderr.isatty(),  # in a job's log file, a line per epoch instead
        resume=args.resume,
    )
    print(f"report: {result['report']}\nmodel: {result['model']}")
    print(f"measurements: {result['measurements (per image)']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
