"""Flow ``segment-and-quantify``: segment a folder of images and measure every nucleus.

Images are processed in batches (one task per batch, not per image): each batch task loads
the model once per worker process, and for each image calls the :mod:`mlseg.segment` steps
and writes the outputs of :mod:`mlseg.outputs` (``<stem>.json`` last). Batches run in
parallel on the task runner of :mod:`flows.runners` (threads, or Dask to scale out).

Rerun safety, at two levels:

- per image: an image is skipped when its ``<stem>.json`` records the same input content
  hash, model and profile (:func:`mlseg.outputs.image_done`), so a killed run resumes where
  it stopped and a changed image (same name, new content) is redone;
- per batch: the task result is cached by Prefect under a key made of the batch's input
  content hashes, model, profile, inference settings and output folder, for
  :data:`BATCH_CACHE_EXPIRATION`; a batch whose images are all complete shows as ``Cached``
  and does not run at all.

Transient I/O errors (network file systems, object stores) retry the batch task; images
that cannot be read are listed (the others go on) and end the flow ``Failed`` at the end.
Each run appends its throughput and nuclei statistics to ``<out_dir>/runs/history.csv``,
counting as its own the images a run killed before its row had finished (:func:`_forget_written`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.common import (
    batch_label,
    data_path,
    log_warnings,
    resolve_profile,
    retry_on_transient_io,
    temporary_server_apart,
    user_errors_exit,
)
from flows.runners import add_runner_arguments, make_task_runner, runner_settings
from mlseg.errors import MlsegError, writes_named

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pandas as pd

    from mlseg.config import Profile
    from mlseg.outputs import RunNuclei


class SegmentFailed(MlsegError):
    """Some images could not be segmented (each is named in the message); the others were.
    ``python -m flows.segment`` ends with its message and exit code 1, as ``mlseg segment``."""

    exit_code = 1


# ----------------------------------------------------------------------------- model


@functools.lru_cache(maxsize=4)
def _load(weights: str, device: str, stamps: tuple[int, ...]):
    from mlseg.model import load_model

    return load_model(weights, device=device)


def loaded_model(model: str, device: str = "auto"):
    """The model at ``model``, loaded once per process (and again if its weights, config.json
    or meta.json change: the two shape its predictions, :func:`model_id`)."""
    from mlseg.model import checkpoint_path, resolve_model_device

    weights = checkpoint_path(model)
    files = (weights, weights.parent / "config.json", weights.parent / "meta.json")
    stamps = tuple(path.stat().st_mtime_ns for path in files if path.is_file())  # else load says
    device = resolve_model_device(device, model_config(model), weights.parent)
    return _load(str(weights), str(device), stamps)


def model_config(model: str):
    """The run :class:`~mlseg.config.Config` saved beside a checkpoint (no weights loaded),
    as :func:`mlseg.model.saved_config` reads it."""
    from mlseg.model import checkpoint_path, saved_config

    return saved_config(checkpoint_path(model).parent)


def inference_settings(model: str, overrides: dict[str, Any] | None, config=None):
    """The model's saved inference settings with the keys of ``overrides`` (a deployment
    parameter) on top; ``config``: its :func:`model_config`, where the caller has read it."""
    from mlseg.config import parse

    saved = (config or model_config(model)).inference
    return parse(type(saved), {**saved.model_dump(), **(overrides or {})}, "parameter 'inference'")


def model_id(model: str, config=None) -> str:
    """What ``<stem>.json`` records as the model (:func:`mlseg.segment.model_identity`);
    ``config``: its :func:`model_config`, where the caller has read it already."""
    from mlseg.model import checkpoint_path, saved_meta
    from mlseg.segment import model_identity

    weights = checkpoint_path(model)
    if config is None:
        config = model_config(model)
    return model_identity(weights, config, saved_meta(weights.parent))


# ----------------------------------------------------------------------------- one batch


def segment_one(
    loaded,
    path: Path,
    out_dir: Path,
    profile,
    inference_cfg,
    expect: dict[str, Any],
    pixel_size_um: float | None = None,
    pixel_sizes: dict[str, float] | None = None,
    mlseg_version: str | None = None,
) -> dict[str, Any]:
    """Segment, measure and write one image; returns its summary as written and its
    per-nucleus table (the per-image step of :func:`mlseg.segment.segment_folder`);
    ``mlseg_version``: :func:`mlseg.registry.code_version`, asked once per batch."""
    from mlseg.io import image_stem
    from mlseg.outputs import first_finished_at, write_image_outputs
    from mlseg.segment import segment_image

    started = time.perf_counter()
    image, labels, table, summary = segment_image(
        loaded, path, profile, inference_cfg, pixel_size_um=pixel_size_um, pixel_sizes=pixel_sizes
    )
    summary = {
        "image": image_stem(path),
        "image_file": str(path),
        **expect,
        **summary,
        "mlseg_version": mlseg_version,
        "seconds": round(time.perf_counter() - started, 3),
        # when it was new (monitor's since_days): kept by every rerun that skips or redoes it
        "finished_at": first_finished_at(out_dir, image_stem(path), expect.get("input_digest")),
    }
    return write_image_outputs(out_dir, image_stem(path), image, labels, table, summary), table


#: How a batch's :func:`batch_cache_key` starts, the name of its result in Prefect's storage.
_BATCH_KEY_PREFIX = "mlseg-segment-"


def batch_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a batch: input content, model, profile, settings, output folder."""
    from mlseg.io import file_digest, input_digest
    from mlseg.pixel_size import sidecar_path

    digest = hashlib.sha256()
    for name in ("out_dir", "model_id", "profile", "inference", "pixel_size_um", "pixel_sizes"):
        digest.update(json.dumps(parameters.get(name), sort_keys=True, default=str).encode())
    for path in parameters["images"]:
        digest.update(f"{Path(path).name}:{input_digest(path)}".encode())
        sidecar = sidecar_path(path)
        if sidecar.is_file():  # the image's pixel size may live there
            digest.update(f"{sidecar.name}:{file_digest(sidecar)}".encode())
    return f"{_BATCH_KEY_PREFIX}{digest.hexdigest()[:32]}"


#: Hidden folder of an output folder where a flow run marks each image it sets out to write,
#: ``<WRITTEN_DIR>/<flow run id>/<stem>``, until the run completes (failed: until another run
#: takes the folder, :func:`_forget_written`): a retried attempt (of a task, or of the whole
#: flow run, in this process or another, on any Dask worker) finds those its failed attempt
#: finished done on disk; they are this run's work, not skipped.
WRITTEN_DIR = ".mlseg-written"

#: File a flow run touches among its marks once its run files and history row hold its
#: images (:func:`_recorded`); a mark touched after it is of an attempt that recorded
#: nothing. Hidden: no image stem is (hidden files are not listed).
RECORDED = ".recorded"

#: How long Prefect restores a batch from its cache. Long enough for a retry of a failed run
#: (after a weekend) and the next nights' reruns of an unchanged inbox; past it a batch runs
#: again, skipping its finished images on their ``<stem>.json`` at little cost. With none,
#: every batch result stayed in Prefect's result storage for good (some 3 kB an image): an
#: inbox whose names do not sort by date changes most batches with each new image, so a
#: long-lived worker's storage grew with the square of the images
#: (:func:`_forget_expired_batches` removes them once expired).
BATCH_CACHE_EXPIRATION = datetime.timedelta(days=4)


@task(
    name="segment-batch",
    task_run_name="segment {label}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on_transient_io,
    cache_key_fn=batch_cache_key,
    cache_expiration=BATCH_CACHE_EXPIRATION,
    persist_result=True,
)
def segment_batch(
    images: list[str],
    out_dir: str,
    model: str,
    model_id: str,
    profile: dict[str, Any],
    inference: dict[str, Any],
    pixel_size_um: float | None = None,
    torch_threads: int = 0,
    label: str = "",
    pixel_sizes: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Segment a batch; one record per image: ``status`` (processed/skipped/failed), ``image``,
    ``flow_run`` (the id of the flow run that made the record) and ``summary`` (as written in
    ``<stem>.json``) or ``error``. Its nuclei stay in its files (the flow reads every image's
    table once, at the end)."""
    from prefect.context import TaskRunContext

    from mlseg.config import InferenceConfig, Profile
    from mlseg.io import image_stem
    from mlseg.outputs import image_done
    from mlseg.registry import code_version

    log_warnings()  # on a Dask worker too
    context = TaskRunContext.get()
    flow_run = str(context.task_run.flow_run_id) if context is not None else None
    marks = Path(out_dir) / WRITTEN_DIR / flow_run if flow_run else None
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    prof = Profile.model_validate(profile)
    cfg = InferenceConfig.model_validate(inference)
    out = Path(out_dir)
    records = []
    loaded = None
    for name in images:
        path = Path(name)
        expect = _expected(path, model_id, profile, inference, pixel_size_um, pixel_sizes)
        done = image_done(out, image_stem(path), expect)
        if done is not None:
            mine = marks is not None and (marks / image_stem(path)).is_file()
            status = "processed" if mine else "skipped"
            records.append({"status": status, "image": name, "summary": done})
            continue
        if loaded is None:
            loaded = loaded_model(model, cfg.device)
            version = code_version()  # this worker's, on Dask too
        if marks is not None:  # before: an image done on disk after this is this run's
            # a full disk here raised Python's ENOSPC on .mlseg-written, retried twice in
            # vain and shown in a 200-line traceback: it is the output folder's error
            with writes_named(out):
                marks.mkdir(parents=True, exist_ok=True)
                (marks / image_stem(path)).touch()
        try:
            summary, _ = segment_one(
                loaded, path, out, prof, cfg, expect, pixel_size_um, pixel_sizes, version
            )
        except MlsegError as err:
            records.append({"status": "failed", "image": name, "error": str(err)})
            if context is not None:  # as mlseg segment prints it, whether the run goes on
                get_run_logger().error("failed: %s", _named(name, str(err)))
            continue
        records.append({"status": "processed", "image": name, "summary": summary})
    return [{**record, "flow_run": flow_run} for record in records]


def _expected(
    path: Path,
    model_id: str,
    profile: dict[str, Any],
    inference: dict[str, Any],
    pixel_size_um: float | None,
    pixel_sizes: dict[str, float] | None,
) -> dict[str, Any]:
    """What ``<stem>.json`` records of the run that made an image's outputs: the image's
    bytes, the model, the profile and what else changes its result (``image_done``), as
    :func:`mlseg.segment.segment_folder` expects it: an image ``mlseg segment`` finished with
    the same model and settings is done here too, and the other way round."""
    from mlseg.config import InferenceConfig, Profile
    from mlseg.io import image_stem
    from mlseg.segment import declared_sizes, expectations, segment_settings

    prof = Profile.model_validate(profile)
    stem = image_stem(path)
    sizes = {stem: pixel_sizes[stem]} if stem in (pixel_sizes or {}) else {}
    # a corrected sidecar redoes it
    declared = declared_sizes({stem: path}, sizes) if pixel_size_um is None else {}
    settings = segment_settings(prof, InferenceConfig.model_validate(inference), pixel_size_um)
    return expectations(prof, model_id, settings, sizes, declared, {stem: [path]})(stem)


# ----------------------------------------------------------------------------- the flow


def _batches(items: list[str], size: int) -> list[list[str]]:
    size = max(1, int(size))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _entries(pixel_sizes: dict[str, float] | None, batch: list[str]) -> dict[str, float] | None:
    """The batch's own pixel sizes: a change for one image refreshes only its batch's cache."""
    from mlseg.io import image_stem

    if not pixel_sizes:
        return None
    # looked up per image of the batch: a walk over the whole table for every batch cost
    # 9 s of a run of 20,000 images with their sizes listed
    stems = (image_stem(p) for p in batch)
    return {stem: pixel_sizes[stem] for stem in stems if stem in pixel_sizes} or None


def _complete(batch: list[str], out_dir: Path, *expected) -> bool:
    """Whether the outputs on disk of every image of ``batch`` are those this run would
    make (:func:`_expected` of ``expected``: same model, profile, settings, bytes), else the
    cache is refreshed: a cached batch's records must describe the files beside them (a run
    with model A after one with B would report A over B's labels)."""
    from mlseg.io import image_stem
    from mlseg.outputs import image_done

    return all(
        image_done(out_dir, image_stem(p), _expected(Path(p), *expected)) is not None for p in batch
    )


def submit_batches(
    runner,
    batches: list[list[str]],
    out_dir: str,
    model: str,
    model_id: str,
    profile: dict[str, Any],
    inference: dict[str, Any],
    pixel_size_um: float | None,
    torch_threads: int,
    pixel_sizes: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run every batch on ``runner`` (a started task runner); records in input order.

    A batch whose images all have their ``<stem>.json`` may come from Prefect's cache;
    otherwise the cache is refreshed (outputs deleted since the cached run are redone). A
    cached batch's images are skipped, unless an earlier attempt of this flow run (retried)
    processed them, or a run stopped before recording them that this one took over
    (:func:`_forget_written`): then they are this run's work.
    """
    from prefect.runtime import flow_run

    rid = flow_run.get_id()
    this_run = str(rid) if rid else None
    futures = []
    for batch in batches:
        expected = (model_id, profile, inference, pixel_size_um, _entries(pixel_sizes, batch))
        task_ = segment_batch.with_options(
            refresh_cache=not _complete(batch, Path(out_dir), *expected)
        )
        parameters = {
            "images": batch,
            "out_dir": out_dir,
            "model": model,
            "model_id": model_id,
            "profile": profile,
            "inference": inference,
            "pixel_size_um": pixel_size_um,
            "pixel_sizes": _entries(pixel_sizes, batch),
            "torch_threads": torch_threads,
            "label": batch_label(batch),
        }
        futures.append(runner.submit(task_, parameters))
    records = []
    mine = _marked(Path(out_dir), this_run)
    for future in futures:
        batch_records = future.result()
        cached = future.state.name == "Cached"  # the records of the run that computed it
        for record in batch_records:
            ours = this_run is not None and (
                record.get("flow_run") == this_run
                or ("summary" in record and record["summary"]["image"] in mine)
            )
            earlier = cached and not ours
            if earlier and record["status"] == "processed":
                record = {**record, "status": "skipped"}
            records.append({**record, "cached": earlier})
    return records


def resolve_model(
    model: str | None, registry: str | None, model_name: str, model_version: str | int
) -> tuple[str, str]:
    """``(local checkpoint path, description)`` from a path or a registry version."""
    from mlseg.errors import ConfigError

    if model:
        return str(data_path(model)), str(model)
    if not registry:
        raise ConfigError("segment-and-quantify: give `model` (checkpoint) or `registry`")
    from mlseg import registry as reg

    where = registry if "://" in registry else str(data_path(registry))
    version = reg.show(where, model_name, model_version)
    return str(reg.fetch(version)), version.tag


def per_image_sizes(
    pixel_sizes: dict[str, float] | str | None, pixel_size_um: float | None = None
) -> dict[str, float] | None:
    """``pixel_sizes`` as checked microns per pixel by image stem (a CSV path is read);
    ``pixel_size_um``, the size for every image, is checked too."""
    from mlseg.dataset import check_pixel_size
    from mlseg.ingest import read_pixel_sizes
    from mlseg.io import match_stem, without_image_extension

    if pixel_size_um is not None:
        check_pixel_size(pixel_size_um, "pixel_size_um")
    if pixel_sizes is None:
        return None
    if isinstance(pixel_sizes, str):
        return read_pixel_sizes(data_path(pixel_sizes))
    return {
        match_stem(without_image_extension(str(name))): check_pixel_size(
            um, f"pixel_sizes[{name!r}]"
        )
        for name, um in pixel_sizes.items()
    }


@flow(name="segment-and-quantify", flow_run_name="segment {input_dir}", log_prints=True)
def segment_and_quantify(
    input_dir: str,
    out_dir: str,
    model: str | None = None,
    registry: str | None = None,
    model_name: str = "nuclei",
    model_version: str | int = "production",  # `-p model_version=3` sends a number
    profile: str = "he",
    profiles: dict[str, Any] | str | None = None,
    profile_overrides: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    pixel_size_um: float | None = None,
    pixel_sizes: dict[str, float] | str | None = None,
    batch_size: int = 16,
    task_runner: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    history: str | None = None,
    fail_on_error: bool = True,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input_dir`` and measure its nuclei into ``out_dir``.

    Model: a checkpoint path (``model``) or a registry version (``registry`` folder/URL,
    ``model_name``, ``model_version``: ``production``, ``latest`` or a number). Profile:
    the name ``profile`` in ``profiles`` (the content of a profiles.yaml, as deployments pass
    it; default the packaged one), with ``profile_overrides``. ``inference`` overrides the
    model's inference settings. ``pixel_size_um`` gives every image's microns per pixel;
    ``pixel_sizes`` each image's (image stem -> microns per pixel, or a CSV of stem +
    ``pixel_size_um``), before the images' own metadata and the profile. Scale-out:
    ``task_runner`` (``thread``/``dask``), ``dask_address`` and ``workers``; each worker uses
    ``torch_threads`` CPU threads (default: the cores divided among the workers). Relative
    paths are under ``MLSEG_DATA_DIR`` if set.

    Args:
        input_dir: Folder of images to segment; an empty folder is nothing to do. Relative: under
            ``MLSEG_DATA_DIR`` if set.
        out_dir: Output folder: per-image labels, overlays, nuclei tables and GeoJSON, and
            ``summary.csv``, ``nuclei.parquet``, ``run.json``; a rerun skips the images already done
            with the same model and profile. Relative: under ``MLSEG_DATA_DIR`` if set.
        model: Checkpoint folder or ``.safetensors`` file; empty: use ``registry``. Relative: under
            ``MLSEG_DATA_DIR`` if set.
        registry: Model registry folder or URL (``s3://bucket/models``), used when ``model`` is
            empty. Relative: under ``MLSEG_DATA_DIR`` if set.
        model_name: Model name in the registry.
        model_version: Registry version: ``production``, ``latest`` or a number (``3``).
        profile: Image-type profile name (packaged: ``he``, ``ihc``, ``fluorescence``).
        profiles: Content of a profiles.yaml (a mapping, or its JSON text as deployments pass it)
            that defines ``profile``; empty: the packaged ``mlseg/profiles.yaml``.
        profile_overrides: Profile keys to change (nested sections merged), e.g.
            ``{"pixel_size_um": 0.25}``.
        inference: Keys of the model's saved inference settings to change, e.g.
            ``{"tile_size": 1024, "device": "cpu"}``; empty: the model's own.
        pixel_size_um: Microns per pixel of every image, used instead of ``pixel_sizes``, the
            images' own metadata and the profile's.
        pixel_sizes: Microns per pixel by image stem (``{"slide1": 0.25}``), or the path of a CSV
            with columns such as ``stem`` and ``pixel_size_um`` (relative: under ``MLSEG_DATA_DIR``
            if set); used before the images' own metadata and the profile's.
        batch_size: Images per task; a task loads the model once and is retried as a whole on
            transient I/O errors.
        task_runner: ``thread`` (this worker) or ``dask``; empty: ``MLSEG_TASK_RUNNER``, else
            ``dask`` if a Dask address is set, else ``thread``.
        dask_address: Existing Dask scheduler (``tcp://host:8786``); empty: ``MLSEG_DASK_ADDRESS``,
            else a local cluster when ``task_runner`` is ``dask``.
        workers: Threads, or processes of a local Dask cluster, 1 or more; empty: CPU cores, at
            most 4.
        history: Run history CSV this run appends its metrics to; empty:
            ``<out_dir>/runs/history.csv``. Relative: under ``MLSEG_DATA_DIR`` if set.
        fail_on_error: End the run ``Failed`` when any image could not be segmented (the other
            images' outputs are written either way); false: it completes and lists them.
        torch_threads: PyTorch CPU threads per worker; empty: the usable cores divided among the
            workers.
    """
    from mlseg.errors import warn_once
    from mlseg.inventory import usable_cpus
    from mlseg.outputs import update_run_outputs, writing_to
    from mlseg.registry import code_version, package_versions
    from mlseg.segment import (
        check_out_dir,
        check_units_possible,
        list_images,
        said_before,
        subfolders_with_images,
    )

    log_warnings()
    warn_once.cache_clear()  # once per run, not per worker process (thread runner)
    logger = get_run_logger()
    src, out = data_path(input_dir, "input_dir"), data_path(out_dir, "out_dir")
    check_out_dir(out, src)
    # images only in subfolders are refused by list_images, as mlseg segment refuses them:
    # a nightly run on an inbox reorganised into a folder per case completed, nothing done
    if (
        src.is_dir()
        and not any(_is_image(p) for p in src.iterdir())
        and not subfolders_with_images(src, out)
    ):
        logger.info("no images in %s: nothing to do", src)  # an empty inbox is not an error
        artifacts.markdown("segment-summary", f"No images in {artifacts.code(src)}: nothing to do.")
        return {"out_dir": str(out), "processed": [], "skipped": [], "failed": {}}
    table = per_image_sizes(pixel_sizes, pixel_size_um)
    files, sizes = _listed(src, out, table, pixel_size_um)
    checkpoint, model_desc = resolve_model(model, registry, model_name, model_version)
    prof = resolve_profile(profile, profiles, profile_overrides)
    # micron units no image can have fail the run once, before any work, as segment_folder does
    check_units_possible(prof, pixel_size_um, [Path(p) for p in files], sizes)
    saved = model_config(checkpoint)
    weights = model_id(checkpoint, saved)
    cfg = inference_settings(checkpoint, inference, saved)
    settings = runner_settings(task_runner, dask_address, workers)
    threads = torch_threads or max(1, usable_cpus() // settings["workers"])
    runner = make_task_runner(**settings)
    logger.info(
        "%d images from %s with %s, profile %s v%s, %s runner x%d, batches of %d",
        len(files),
        src,
        model_desc,
        prof.name,
        prof.version,
        settings["kind"],
        settings["workers"],
        batch_size,
    )
    with writing_to(out):  # one run at a time: its images' files are all its own
        # from here: a run that waited for another's folder (a nightly run still going when
        # the next is due) counted the wait in its throughput
        started, started_at = _run_start()  # a retried flow run's first attempt's
        taken = _forget_written(out, others=True)  # a failed run's: this one redoes or skips
        if taken:
            logger.info(
                "%d image(s) marked by a run stopped before it recorded them: counted as "
                "this run's where finished",
                taken,
            )
        # the inbox as it is now: a run that waited for the folder wrote summary.csv and
        # nuclei.parquet from the images it listed before, leaving out one that came in
        # meanwhile and that the run it waited for (or another) had segmented
        with said_before():
            if list_images(src, out) != [Path(p) for p in files]:
                files, sizes = _listed(src, out, table, pixel_size_um)
                check_units_possible(prof, pixel_size_um, [Path(p) for p in files], sizes)
                logger.info("%d images in %s once this run had %s", len(files), src, out)
        _forget_expired_batches()
        with runner:
            records = submit_batches(
                runner,
                _batches(files, batch_size),
                str(out),
                checkpoint,
                weights,
                prof.model_dump(mode="json"),
                cfg.model_dump(mode="json"),
                pixel_size_um,
                threads,
                sizes,
            )
        seconds = time.perf_counter() - started
        summaries = sorted(
            (r["summary"] for r in records if r["status"] != "failed"), key=lambda s: s["image"]
        )
        failed = {r["image"]: r["error"] for r in records if r["status"] == "failed"}
        processed = [r["summary"]["image"] for r in records if r["status"] == "processed"]
        skipped = [r["summary"]["image"] for r in records if r["status"] == "skipped"]
        from_cache = [r["summary"]["image"] for r in records if r.get("cached")]
        done = set(processed)
        tables, areas = run_nuclei(out, summaries, done)
        run_id = _run_id()
        # one time for run.json and the run's history row, which differed by the seconds it
        # took to write the run's tables and histograms
        finished = datetime.datetime.now().astimezone()
        paths = update_run_outputs(
            out,
            summaries,
            tables.tables,
            {
                "command": "segment-and-quantify",
                "flow_run": run_id,
                "mlseg_version": code_version(),
                "packages": package_versions(),
                "started_at": started_at,
                "finished_at": finished.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "input_dir": str(src),
                # as mlseg segment's run.json and every <stem>.json: the weights' content hash
                "model": weights,
                "model_source": model_desc,  # the registry version (nuclei@v3) or the path given
                "model_path": checkpoint,
                "preprocess": saved.preprocess.model_dump(mode="json"),
                "profile": prof.model_dump(mode="json"),
                "inference": cfg.model_dump(mode="json"),
                "pixel_size_um": pixel_size_um,
                "pixel_sizes": sizes,
                "processed": processed,
                "skipped": skipped,
                "failed": failed,
            },
            redone=bool(processed),
        )
        history_path = data_path(history) if history else out / "runs" / "history.csv"
        metrics, counts = _run_metrics(
            out,
            history_path,
            run_id,
            summaries,
            areas.tables(),
            done,
            len(skipped),
            failed,
            seconds,
            finished.astimezone(datetime.UTC).isoformat(timespec="seconds"),
        )
        # still holding the folder: a run waiting for it takes over the marks not recorded
        _recorded(out)
    in_px = [s["image"] for s in summaries if s["image"] in done and s.get("units") == "px"]
    _publish(out, paths, metrics, counts, model_desc, prof, processed, skipped, failed, in_px)
    result = {
        "out_dir": str(out),
        "summary_csv": str(paths["summary"]),
        "nuclei_parquet": str(paths["nuclei"]),
        "histograms_png": str(paths["histograms"]),
        "run_json": str(paths["run"]),
        "history_csv": str(history_path),
        "model": model_desc,
        "profile": prof.name,
        "processed": processed,
        "skipped": skipped,
        "from_cache": from_cache,
        "failed": failed,
        "seconds": seconds,
        "images_per_s": metrics["images_per_s"],
    }
    artifacts.outputs(
        "segment-outputs",
        {
            k: result[k]
            for k in (
                "out_dir",
                "summary_csv",
                "nuclei_parquet",
                "histograms_png",
                "run_json",
                "history_csv",
            )
        },
    )
    logger.info(
        "%d processed, %d skipped (%d in cached batches), %d failed in %.1f s; outputs in %s",
        len(processed),
        len(skipped),
        len(from_cache),
        len(failed),
        seconds,
        out,
    )
    if failed and fail_on_error:
        first = "; ".join(_named(k, v) for k, v in list(failed.items())[:3])
        raise SegmentFailed(f"{len(failed)} of {len(files)} image(s) failed: {first}")
    _forget_written(out)
    return result


def _listed(
    src: Path, out: Path, table: dict[str, float] | None, pixel_size_um: float | None
) -> tuple[list[str], dict[str, float]]:
    """The images of ``src`` to segment and the entries of the pixel-size ``table`` for them,
    as ``segment_folder`` lists them (:func:`mlseg.segment.images_to_segment`)."""
    from mlseg.segment import images_to_segment

    by_stem, sizes = images_to_segment(src, out, table, pixel_size_um)
    return [str(p) for p in by_stem.values()], sizes


def run_nuclei(
    out: Path, summaries: list[dict[str, Any]], done: set[str]
) -> tuple[RunNuclei, RunNuclei]:
    """The nuclei tables of a run over ``summaries``: all of them, for the run's
    ``nuclei.parquet`` and histograms, and the area column of the images processed in it
    (``done``), for its metrics (:func:`mlseg.monitor.run_areas`). Each processed image's
    table is read once; a skipped image's only if the run files are written again
    (:func:`mlseg.outputs.update_run_outputs`). Kept grouped, as ``mlseg segment`` keeps
    them (:class:`mlseg.outputs.RunNuclei`): the flow kept every image's whole DataFrame to
    the end of the run, for both, some 8 kB an image for a few nuclei
    (measured by bench/run_memory.py, in its flow mode)."""
    from mlseg.monitor import area_column
    from mlseg.outputs import RunNuclei, read_nuclei

    tables, areas = RunNuclei(out), RunNuclei(out)
    for summary in summaries:
        if summary["image"] in done:
            table = read_nuclei(out, summary)
            tables.add(table)
            column = area_column(table.columns)
            areas.add(table[[column]] if column else table)
        else:
            tables.add_done(summary)
    return tables, areas


def _run_metrics(
    out: Path,
    history_path: Path,
    run_id: str,
    summaries: list[dict[str, Any]],
    area_tables: Iterable[pd.DataFrame],
    done: set[str],
    n_skipped: int,
    failed: dict[str, str],
    seconds: float,
    finished_at: str,
) -> tuple[dict[str, Any], list[int]]:
    """The run's metrics over the images processed in it (skipped ones were measured before),
    with their shift from the previous run, appended to ``history_path`` when any image was
    processed; also each processed image's nucleus count. ``area_tables``: the areas of the
    images processed (:func:`run_nuclei`).
    ``finished_at``: the run's end as run.json gives it (UTC), for its history row."""
    from mlseg.io import write_table
    from mlseg.monitor import append_history, distributions, run_areas, run_metrics, run_shift

    # ``done`` is a set: a membership test per summary in a list cost 180 s at 20,000 images
    done_now = [s for s in summaries if s["image"] in done]
    counts = [s.get("count", 0) for s in done_now]
    unit, areas = run_areas(area_tables)
    metrics = run_metrics(
        counts,
        areas,
        seconds,
        area_unit=unit,
        run_id=run_id,
        n_failed=len(failed),
        finished_at=finished_at,
    )
    metrics["n_skipped"] = n_skipped
    if done_now:
        previous = _previous_distributions(history_path, run_id)
        metrics.update(run_shift(counts, areas, previous, unit))
        dist_path = out / "runs" / f"{run_id}_distributions.parquet"
        write_table(distributions(counts, areas, unit), dist_path)
        metrics["distributions"] = str(dist_path)
        append_history(history_path, metrics)
    return metrics, counts


def _publish(
    out: Path,
    paths: dict[str, Path],
    metrics: dict[str, Any],
    counts: list[int],
    model_desc: str,
    prof: Profile,
    processed: list[str],
    skipped: list[str],
    failed: dict[str, str],
    in_px: list[str],
) -> None:
    """The run's artifacts: the summary table (this run's images first), its metrics, the
    histograms, and a warning where no image had a nucleus, some image failed, or some image
    processed was measured in pixels (``in_px``) though the profile does not ask for them."""
    import pandas as pd

    from mlseg.errors import some_of
    from mlseg.io import read_written_csv
    from mlseg.outputs import TIMING_KEYS

    done = set(processed)
    summary_table = (
        read_written_csv(paths["summary"], "image")  # "01" is not 1, "NA" no NaN
        if Path(paths["summary"]).is_file()
        else None
    )
    if summary_table is not None and len(summary_table):
        keep = [c for c in summary_table.columns if c not in TIMING_KEYS]
        # this run's images first, each part by name: a long table is cut to its first rows,
        # and an inbox that keeps its images showed the same oldest ones every night
        earlier = ~summary_table["image"].isin(done)  # False, this run's, sorts first
        shown = summary_table.loc[earlier.sort_values(kind="stable").index, keep]
        artifacts.table(
            "segment-summary",
            shown,
            f"{len(summary_table)} images, {int(summary_table.get('count', pd.Series()).sum())} "
            f"nuclei; profile {prof.name} v{prof.version}; model {model_desc}; "
            f"the {len(done)} processed in this run first",
        )
    artifacts.table(
        "segment-run-metrics",
        # the deciles stay in the history: every key starting area_ went with them, and the
        # dashboard showed the count's shift from the previous run but not the areas' (the
        # deciles run from _q00 to _q100, the largest)
        {k: v for k, v in metrics.items() if not re.search(r"_q\d+$", k)},
        f"{len(processed)} processed, {len(skipped)} skipped, {len(failed)} failed",
    )
    artifacts.link("segment-histograms", paths["histograms"], "nucleus measurement histograms")
    if counts and not any(counts):  # a collapsed model, or the wrong one, finds nothing
        nothing = (
            f"{model_desc} found no nucleus in any of the {len(counts)} image(s) segmented "
            f"in this run; check the model (mlseg evaluate on labelled images: one trained "
            f"into predicting only background finds nothing anywhere), the profile "
            f"({prof.name}) and the images' pixel sizes"
        )
        get_run_logger().warning(nothing)
        artifacts.warning("segment-no-nuclei", "no nucleus found in any image", nothing)
    if in_px and prof.units != "px":
        # as mlseg segment says at its end: a nightly run on images without a size gave
        # area_px and no nuclei per mm2, with nothing said
        pixels = (
            f"{len(in_px)} of the {len(processed)} image(s) segmented in this run have no "
            f"pixel size ({some_of(in_px)}): measured in pixels (area_px, no nuclei per mm2); "
            "give the run pixel_sizes (image stem -> microns per pixel, or a CSV of "
            "stem,pixel_size_um) or pixel_size_um, or the profile a pixel_size_um, to measure "
            "in microns, or use a profile with units: px to say pixels are meant"
        )
        get_run_logger().warning(pixels)
        artifacts.warning(
            "segment-no-pixel-size", f"{len(in_px)} image(s) measured in pixels", pixels
        )
    if failed:
        artifacts.warning(
            "segment-failed-images",
            f"{len(failed)} image(s) could not be segmented",
            "\n".join(f"- {_named(k, v)}" for k, v in failed.items()),
        )


def _forget_written(out: Path, others: bool = False) -> int:
    """Remove the completed flow run's marks of :data:`WRITTEN_DIR` (and the folder, empty);
    ``others``: every other run's instead, as a run takes the folder. A run that failed and
    was not retried before another took its folder left its marks for good (one folder of
    them a night, where an image keeps failing), though no retry after that run, which
    redid or skipped its images, can count them as its own.

    With ``others``, the images another run marked and did not record (no history row, no
    run files: killed, out of memory, its machine gone) become this run's first
    (:func:`_unrecorded`); returns how many. The next run restored them from Prefect's cache,
    or found them done on disk, as another run's and skipped them, and deleted the marks:
    no history row ever counted them."""
    import shutil

    from prefect.runtime import flow_run

    run = str(flow_run.get_id() or "")
    marks = out / WRITTEN_DIR
    if others:
        gone = [d for d in marks.iterdir() if d.name != run] if marks.is_dir() else []
    else:
        gone = [marks / run] if run else []
    taken = sorted({stem for folder in gone for stem in _unrecorded(folder)}) if others else []
    if taken and run:
        with writes_named(out):
            (marks / run).mkdir(parents=True, exist_ok=True)
            for stem in taken:
                (marks / run / stem).touch()
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # a later run's marks stay
        marks.rmdir()
    return len(taken) if run else 0


def _unrecorded(folder: Path) -> list[str]:
    """The stems a run marked in ``folder`` that no history row of it counts: those marked
    after it last recorded its images (:data:`RECORDED`), all of them where it never did."""
    recorded = folder / RECORDED
    try:
        since = recorded.stat().st_mtime_ns if recorded.is_file() else None
        marked = [e for e in os.scandir(folder) if not e.name.startswith(".") and e.is_file()]
        return [e.name for e in marked if since is None or e.stat().st_mtime_ns > since]
    except OSError:  # not a folder of marks
        return []


def _marked(out: Path, run: str | None) -> set[str]:
    """The stems flow run ``run`` marked in ``out`` (:data:`WRITTEN_DIR`)."""
    if not run:
        return set()
    try:
        return {name for name in os.listdir(out / WRITTEN_DIR / run) if name[0] != "."}
    except OSError:  # none marked
        return set()


def _recorded(out: Path) -> None:
    """Say among this flow run's marks that its run files and history row hold the images it
    marked so far, so that another run taking the folder does not count them again (a
    retry's later marks it does count, if that retry stops before recording them)."""
    from prefect.runtime import flow_run

    run = flow_run.get_id()
    folder = out / WRITTEN_DIR / str(run) if run else None
    if folder is not None and folder.is_dir():
        with writes_named(out):
            (folder / RECORDED).touch()


def _forget_expired_batches() -> None:
    """Delete the batch results in Prefect's local result storage whose cache expired
    (:data:`BATCH_CACHE_EXPIRATION`): Prefect restores them no more, but deletes none (3.x),
    so every batch a worker ever ran stayed there. A storage block elsewhere (a bucket) is
    left to its own lifecycle rules."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import get_default_result_storage

    storage = segment_batch.result_storage or get_default_result_storage(_sync=True)
    if not isinstance(storage, LocalFileSystem) or not storage.basepath:
        return
    # a result is written as its expiration is set, and not when restored
    before = (datetime.datetime.now(datetime.UTC) - BATCH_CACHE_EXPIRATION).timestamp()
    try:
        entries = list(os.scandir(Path(storage.basepath).expanduser()))
    except OSError:  # no result stored yet
        return
    for entry in entries:
        if entry.name.startswith(_BATCH_KEY_PREFIX):
            with contextlib.suppress(OSError):  # gone meanwhile: another run removed it
                if entry.stat().st_mtime < before:
                    os.unlink(entry.path)


def _named(image: str, error: str) -> str:
    """``image: error``, or the error alone where it names the image already (mlseg's errors
    name their file), as ``mlseg segment`` prints it."""
    return error if image in error else f"{image}: {error}"


def _is_image(path: Path) -> bool:
    from mlseg.dataset import is_image_file

    return is_image_file(path)


def _previous_distributions(history_path: Path, run_id: str):
    """The distributions of the last run in the history before ``run_id`` (a retried flow
    run's first attempt may have written its row already)."""
    import pandas as pd

    from mlseg.monitor import read_history

    table = read_history(history_path)
    if table.empty or "distributions" not in table:
        return None
    if "run_id" in table:
        table = table[table["run_id"].astype(str) != run_id]
    last = table["distributions"].dropna()
    if last.empty or not Path(last.iloc[-1]).is_file():
        return None
    return pd.read_parquet(last.iloc[-1])


def _run_start() -> tuple[float, str]:
    """``(perf_counter, local time)`` of the flow run's start in its output folder (once it
    holds it, not while it waits for another run's): its first attempt's where Prefect
    retries it (in the same process), so that run.json and the throughput in its history row
    are the whole run's."""
    from prefect.runtime import flow_run

    rid = flow_run.get_id()
    return _first_start(str(rid)) if rid else (time.perf_counter(), _local_time())


@functools.lru_cache(maxsize=64)
def _first_start(flow_run_id: str) -> tuple[float, str]:
    return time.perf_counter(), _local_time()


def _local_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _run_id() -> str:
    """The run's id in its history row, run.json and distributions file: the same for every
    attempt of a flow run Prefect retries, in this process or another (a retry from the
    dashboard, a run rescheduled after its worker restarted), so that the row of a completed
    retry replaces one its failed attempt wrote."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None:
        return time.strftime("%Y%m%dT%H%M%S")
    # the first attempt's start, as Prefect records it
    started = run.start_time or datetime.datetime.now(datetime.UTC)
    return _flow_run_id(str(run.id), started)


def _flow_run_id(flow_run_id: str, started: datetime.datetime) -> str:
    # the id's last digits, random: its first may be a time (UUIDv7), alike for runs started
    # within a minute, whose rows would replace each other
    return f"{started.astimezone():%Y%m%dT%H%M%S}-{flow_run_id[-8:]}"


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """``python -m flows.segment INPUT OUT --model CKPT`` (or ``--registry R``)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flows.segment", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("input_dir", help="folder of images to segment")
    parser.add_argument("out_dir", help="output folder (created; reruns resume)")
    parser.add_argument("--model", help="checkpoint folder or .safetensors")
    parser.add_argument("--registry", help="registry folder or URL (uses --model-version)")
    parser.add_argument("--model-name", default="nuclei", help="model in the registry")
    parser.add_argument(
        "--model-version", default="production", help="production, latest or a number (3, v3)"
    )
    parser.add_argument("--profile", default="he", help="image-type profile: he, ihc, ...")
    parser.add_argument("--pixel-size", type=float, default=None, help="microns per pixel")
    parser.add_argument("--pixel-sizes", default=None, help="CSV of stem + pixel_size_um")
    parser.add_argument("--batch-size", type=int, default=16, help="images per task")
    add_runner_arguments(parser)
    args = parser.parse_args(argv)
    if not args.model and not args.registry:  # the flow would fail with a traceback
        parser.error("give --model (a checkpoint folder or .safetensors) or --registry")
    temporary_server_apart()
    result = segment_and_quantify(
        args.input_dir,
        args.out_dir,
        model=args.model,
        registry=args.registry,
        model_name=args.model_name,
        model_version=args.model_version,
        profile=args.profile,
        pixel_size_um=args.pixel_size,
        pixel_sizes=args.pixel_sizes,
        batch_size=args.batch_size,
        task_runner=args.task_runner,
        dask_address=args.dask_address,
        workers=args.workers,
    )
    print(f"per image: {result['summary_csv']}; per nucleus: {result['nuclei_parquet']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
