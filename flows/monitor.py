"""Flow ``monitor``: drift of new images vs the training fingerprint, and the run history.

Statistics of the new images are computed in batches (parallel tasks, retried on transient
I/O errors), compared with the fingerprint by :func:`mlseg.monitor.drift_report`, and
published as a table artifact. A drifted batch adds a warning artifact; drift above
``monitor.psi_fail`` ends the flow ``Failed`` (:class:`mlseg.monitor.DriftDetected`), so a
scheduled monitor alerts through Prefect's usual failure notifications. Each run adds a row
to ``drift_history.csv`` in its output folder, by which a drift says since when it has lasted
(:func:`mlseg.monitor.with_drift_history`): a daily run's seventh alert of one drift says so.
An existing folder without images (a week without new slides) is nothing to compare, not a
failure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.common import (
    batch_label,
    data_path,
    log_warnings,
    retry_on_transient_io,
    run_config,
)


def batches(items: list[Any], size: int) -> list[list[Any]]:
    size = max(1, int(size))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _stats_run_name() -> str:
    """``stats img_000.png +31``: which images a batch holds, as segment's batches are named
    (the default, ``image-stats-3f1``, told a failed or slow batch from no other)."""
    from prefect.runtime import task_run

    return f"stats {batch_label(task_run.parameters['paths'])}"


@task(
    name="image-stats",
    task_run_name=_stats_run_name,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_on_transient_io,
)
def image_stats_task(
    paths: list[str], params: dict[str, Any] | None = None, stain: str | None = None
) -> list[dict[str, Any]]:
    """Statistics of a batch of images (one dict per image), computed with ``params`` (the
    fingerprint's ``image_stats_params``) on the images as read with its ``stain``."""
    from mlseg.monitor import image_stats_table

    log_warnings()  # on a Dask worker too
    return image_stats_table(paths, params=params, stain=stain).to_dict(orient="records")


@flow(name="monitor", flow_run_name="monitor {images}", log_prints=True)
def monitor(
    images: str,
    fingerprint: str,
    out_dir: str,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    history: str | None = None,
    batch_size: int = 32,
    results: str | None = None,
    since_days: float | None = None,
) -> dict[str, Any]:
    """Compare the images in ``images`` with the training ``fingerprint`` (``fingerprint.json``).

    Writes ``drift.csv`` and ``drift.json`` to ``out_dir`` and appends a row to its
    ``drift_history.csv`` (a run with no image to compare too), by which a drift says since
    when it has lasted; publishes the drift table, a warning on drift, and the run history
    (``history``, as appended by ``segment-and-quantify``) if given. Fails on drift above
    ``monitor.psi_fail``.

    Args:
        images: Folder of new images (or its ``original/`` subfolder), or one image file. Relative:
            under ``MLSEG_DATA_DIR`` if set.
        fingerprint: ``fingerprint.json`` that ``validate-dataset`` wrote for the training data.
            Relative: under ``MLSEG_DATA_DIR`` if set.
        out_dir: Output folder for ``drift.csv``, ``drift.json`` and ``drift_history.csv``
            (one row per run, kept). Relative: under ``MLSEG_DATA_DIR`` if set.
        config: Run config YAML whose ``monitor`` section sets the drift thresholds; empty:
            defaults. Relative: under ``MLSEG_DATA_DIR`` if set.
        overrides: Run config sections to change, e.g. ``{"monitor": {"psi_fail": 0.8}}``.
        history: Run history CSV that ``segment-and-quantify`` appends to (by default
            ``runs/history.csv`` in its ``out_dir``), published as a table; empty: none. Relative:
            under ``MLSEG_DATA_DIR`` if set.
        batch_size: Images per statistics task (tasks run in parallel).
        results: Output folder of ``segment-and-quantify`` on ``images`` (its ``out_dir``), whose
            ``summary.csv`` records when each image was segmented, read with ``since_days``,
            and how segment scaled it and at which pixel size (the ``segment_scale`` and
            ``pixel_size_um`` rows of the drift table); without ``since_days`` every image
            in ``images`` is compared, with those records.
            Relative: under ``MLSEG_DATA_DIR`` if set.
        since_days: Compare only the images new in the last ``since_days`` days: segmented
            within them by the records in ``results`` (an image keeps the time of its first
            segmentation), or not segmented there yet (:func:`mlseg.monitor.recent_images`). An
            inbox keeps its images, and without it each run measures all of them; none new is
            not an alert. Empty: every image in ``images``.
    """
    import pandas as pd

    from mlseg.errors import ConfigError, DatasetError
    from mlseg.io import write_table, write_text, written_together
    from mlseg.monitor import (
        DRIFT_HISTORY,
        DriftDetected,
        SubfoldersOnly,
        append_history,
        drift_history_row,
        drift_report,
        list_new_images,
        load_fingerprint,
        recent_images,
        with_drift_history,
        with_segment_records,
    )

    log_warnings()
    logger = get_run_logger()
    if since_days is not None and not results:
        raise ConfigError(
            "monitor: since_days needs results, the out_dir of segment-and-quantify on these "
            "images (e.g. results/he), whose records say when each was segmented"
        )
    cfg = run_config(config, overrides).monitor
    # a deployed worker runs in a fresh temporary folder: relative paths are under /data
    images, fingerprint, out_dir = (
        str(data_path(p, n))
        for p, n in ((images, "images"), (fingerprint, "fingerprint"), (out_dir, "out_dir"))
    )
    history = str(data_path(history)) if history else None
    out = Path(out_dir)
    drift_history = out / DRIFT_HISTORY
    # a retried run's row replaces its failed attempt's
    ran = {"images": images, "since_days": since_days, "run_id": _flow_run_id()}
    reference = load_fingerprint(fingerprint)
    try:
        paths = [str(p) for p in list_new_images(images)]
    except DatasetError as err:
        if not Path(images).is_dir() or isinstance(err, SubfoldersOnly):
            raise  # a wrong path is an error; a week without new slides is not
        paths = []
    new_in = ""
    if paths and since_days is not None:
        listed = len(paths)
        paths = [str(p) for p in recent_images(paths, data_path(results), since_days, now=_due())]
        new_in = f" new in the last {since_days:g} day(s)"
        logger.info("%d of %d image(s) in %s%s", len(paths), listed, images, new_in)
    if not paths:
        logger.info("no images%s in %s: nothing to compare", new_in, images)
        artifacts.markdown(
            "drift-report", f"No images{new_in} in {artifacts.code(images)}: nothing to compare."
        )
        append_history(drift_history, drift_history_row(None, **ran))
        result = {
            "status": "skipped",
            "message": f"no images{new_in}",
            "n_images": 0,
            "drift_history_csv": str(drift_history),
        }
        _publish_history(history, result, logger)
        return result
    params, stain = reference.get("image_stats_params"), reference.get("stain")
    futures = [
        image_stats_task.submit(batch, params, stain) for batch in batches(paths, batch_size)
    ]
    rows = [row for future in futures for row in future.result()]
    new = pd.DataFrame(rows)
    if results:  # how segment scaled them, and the pixel sizes it used
        new = with_segment_records(new, data_path(results))
    # since when each drift has lasted, by the runs before this one
    report = with_drift_history(drift_report(new, reference, cfg), drift_history, ran["run_id"])
    # both or neither: a disk that filled at drift.json left this run's table beside the
    # previous run's status, which the pipeline's report reads
    with written_together(out) as staging:
        write_table(report.table, staging / "drift.csv")
        write_text(staging / "drift.json", json.dumps(report.as_dict(), indent=2, default=str))
    # after them: a run whose drift.json could not be written is no run to count
    append_history(drift_history, drift_history_row(report, **ran))
    drift_csv, drift_json = out / "drift.csv", out / "drift.json"
    artifacts.table(
        "drift-report",
        report.table,
        f"{report.status.upper()}: {report.message} (PSI warn {cfg.psi_warn}, fail {cfg.psi_fail})",
    )
    if report.status in ("warn", "fail"):
        artifacts.warning("drift-warning", f"Image drift: {report.status}", report.message)
    result: dict[str, Any] = {
        "status": report.status,
        "message": report.message,
        "n_images": report.n_images,
        "drift_csv": str(drift_csv),
        "drift_json": str(drift_json),
        "drift_history_csv": str(drift_history),
    }
    _publish_history(history, result, logger)
    artifacts.outputs(
        "monitor-outputs", {k: v for k, v in result.items() if k.endswith(("csv", "json"))}
    )
    alarm = report.status in ("warn", "fail")  # seen by whoever filters the logs by level
    logger.log(
        logging.WARNING if alarm else logging.INFO, "drift %s: %s", report.status, report.message
    )
    if report.status == "fail":
        raise DriftDetected(f"{images}: {report.message}")
    return result


def _flow_run_id() -> str:
    """This flow run's id (empty outside one)."""
    from prefect.runtime import flow_run

    return flow_run.id or ""


def _due():
    """When the flow run was due: its scheduled time, where that is past, else now. A late
    weekly run (its worker down over a weekend, a Late run started on Tuesday) counted its
    days back from its start: the images segmented between the previous run and that start
    less ``since_days`` were compared by no run."""
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    now = datetime.now(UTC)
    return min(flow_run.scheduled_start_time or now, now)


def _publish_history(history: str | None, result: dict[str, Any], logger) -> None:
    """The run history as a table artifact (and its path in ``result``), if there is one."""
    from mlseg.monitor import read_history

    if history and Path(history).is_file():
        artifacts.table(
            "run-history", read_history(history).tail(50), "segmentation runs, latest last"
        )
        result["history"] = history
    elif history:
        logger.warning("no run history at %s yet: nothing segmented there", history)
