"""Prefect flows under a test harness: outputs, artifacts, reruns, failures, drift gating.

Task logic is tested through ``task.fn``; flows run against ``prefect_test_harness`` (the
session's temporary server, conftest ``harness``). The model is a tiny real (untrained)
checkpoint: its predictions are meaningless, but deterministic, which is what reruns are
compared on.
"""

from __future__ import annotations

import datetime
import errno
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flow_helpers import (
    artifact_rows,
    disc_images,
    flow_artifacts,
    flow_logs,
    task_run_names,
    tiny_checkpoint,
)

from flows.common import is_transient, resolve_profile
from flows.runners import make_task_runner, runner_settings
from flows.segment import model_config
from mlseg.errors import ConfigError, ImageReadError, ValidationFailed
from mlseg.registry import code_version, package_versions

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Iterator[Path]:
    import torch

    before = torch.get_num_threads()  # the module's count, given back after it
    torch.set_num_threads(1)
    yield tiny_checkpoint(tmp_path_factory.mktemp("model"))
    torch.set_num_threads(before)


def _segment(inbox: Path, out: Path, checkpoint: Path, **kwargs):
    from flows.segment import segment_and_quantify

    params = {"batch_size": 2, "workers": 2, **kwargs}
    model = None if checkpoint is None else str(checkpoint)
    return segment_and_quantify(str(inbox), str(out), model=model, return_state=True, **params)


def _retry(failed, parameters: dict):
    """Run the failed flow run ``failed`` (its final state) again under its flow run id, as
    the dashboard's Retry does; returns the retry's final state."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry

    from flows.segment import segment_and_quantify

    with get_client(sync_client=True) as client:
        run_id = failed.state_details.flow_run_id
        client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
        flow_run = client.read_flow_run(run_id)
    return run_flow(
        segment_and_quantify, flow_run=flow_run, parameters=parameters, return_type="state"
    )


# ----------------------------------------------------------------------------- pure helpers


def test_profile_parameter_from_deployment_json_with_overrides() -> None:
    he = {"stain": "he", "version": "7", "pixel_size_um": 0.5, "watershed": {"fg_threshold": 0.4}}
    shipped = {"profiles": {"he": he}}
    profile = resolve_profile(
        "he", json.dumps(shipped), {"pixel_size_um": 0.25, "watershed": {"seed_threshold": 0.6}}
    )
    assert (profile.version, profile.pixel_size_um) == ("7", 0.25)
    assert profile.watershed.seed_threshold == 0.6
    # nested sections are merged, not replaced: the profile's own 0.4, not the default 0.5
    assert profile.watershed.fg_threshold == 0.4
    assert resolve_profile("ihc").stain == "ihc"  # no parameter: the packaged profiles
    with pytest.raises(ConfigError, match="unknown profile 'ihc'; choose one of he"):
        resolve_profile("ihc", shipped)
    with pytest.raises(ConfigError, match="min_area_um2"):
        resolve_profile("he", shipped, {"min_area_um2": 5000})


@pytest.mark.parametrize("settings", ["he", [0.25]])
def test_a_profile_parameter_that_is_not_a_mapping_is_named(settings) -> None:
    """A deployment's profiles parameter holding `he_40x: he` failed the flow run with
    Python's "TypeError: 'str' object is not a mapping", naming neither profile nor key."""
    with pytest.raises(ConfigError, match=r"'profiles'.*profile 'he_40x' must be a mapping"):
        resolve_profile("he_40x", {"profiles": {"he_40x": settings}})


def test_runner_choice_from_parameters_and_environment(monkeypatch) -> None:
    monkeypatch.delenv("MLSEG_TASK_RUNNER", raising=False)
    monkeypatch.delenv("MLSEG_DASK_ADDRESS", raising=False)
    assert runner_settings(workers=3) == {"kind": "thread", "address": None, "workers": 3}
    # by default the CPUs the job may use, at most 4: each thread holds a batch of images
    monkeypatch.setattr("mlseg.inventory.usable_cpus", lambda: 64)
    assert runner_settings()["workers"] == 4
    monkeypatch.setattr("mlseg.inventory.usable_cpus", lambda: 2)
    assert runner_settings()["workers"] == 2
    monkeypatch.setenv("MLSEG_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    assert runner_settings()["kind"] == "dask"  # an address alone means Dask
    runner = make_task_runner()
    assert type(runner).__name__ == "DaskTaskRunner"
    assert runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ConfigError, match="choose one of thread, dask"):
        runner_settings("ray")
    with pytest.raises(ConfigError, match="use dask"):
        runner_settings("thread", "tcp://x:1")
    # a flow's parameters come before the worker's environment
    assert runner_settings(address="tcp://10.0.0.6:8786")["address"] == "tcp://10.0.0.6:8786"
    monkeypatch.delenv("MLSEG_DASK_ADDRESS")
    monkeypatch.setenv("MLSEG_TASK_RUNNER", "dask")
    assert runner_settings("thread")["kind"] == "thread"
    # a local cluster: a process per worker, one thread each (PyTorch threads its own)
    local = make_task_runner("dask", workers=3).cluster_kwargs
    assert (local["n_workers"], local["threads_per_worker"], local["processes"]) == (3, 1, True)


def test_zero_workers_is_refused_not_taken_for_the_default(monkeypatch) -> None:
    """workers=0 (a deployment's parameter, a flow call) ran the default of up to 4 threads
    without a word, where a user meant none or "one per core" (validate's workers=0): it is
    refused with the fix; only an empty value takes the default. A worker's MLSEG_TASK_RUNNER
    changes nothing of that."""
    monkeypatch.setattr("mlseg.inventory.usable_cpus", lambda: 8)
    for runner in (None, "dask"):
        monkeypatch.setenv("MLSEG_TASK_RUNNER", runner or "thread")
        with pytest.raises(ConfigError, match=r"workers must be at least 1, got 0; leave it empty"):
            runner_settings(workers=0)
        assert runner_settings(workers=None)["workers"] == 4
        assert runner_settings(workers=1)["workers"] == 1


@pytest.mark.parametrize("module", ["flows.segment", "flows.pipeline"])
def test_zero_workers_on_a_flow_command_line_is_a_usage_error(module, tmp_path, capsys):
    """python -m flows.segment ... --workers 0 ran on the default threads unsaid; it is a
    usage error now, named before any Prefect server starts or any work is done."""
    import importlib

    argv = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--workers", "0"]
    argv = argv if module == "flows.segment" else [*argv[:2], "--workers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    assert exit_info.value.code == 2
    assert "argument --workers: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dask_runner_without_dask_installed_names_the_package(monkeypatch) -> None:
    """`--task-runner dask` where prefect-dask or dask.distributed cannot be imported (an
    install without its dependencies) ended the flow in a ModuleNotFoundError traceback, and
    the pipeline's check of its parameters passed it, failing only after training."""
    monkeypatch.delenv("MLSEG_TASK_RUNNER", raising=False)
    monkeypatch.delenv("MLSEG_DASK_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(ConfigError, match="pip install prefect-dask.*--task-runner thread"):
        runner_settings("dask")
    with pytest.raises(ConfigError, match="pip install prefect-dask"):
        make_task_runner("dask", "tcp://10.0.0.5:8786")
    assert runner_settings("thread", workers=2)["kind"] == "thread"  # threads need no Dask


def test_only_transient_io_errors_are_retried() -> None:
    assert is_transient(TimeoutError("read timed out"))
    assert is_transient(ConnectionResetError())
    assert is_transient(OSError(5, "Input/output error"))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(ImageReadError("x.png: truncated PNG"))
    assert not is_transient(ValueError("bug"))
    # a full disk or spent quota is not mended by a retry seconds later
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_transient(OSError(errno.EROFS, "Read-only file system"))
    assert not is_transient(OSError(errno.EFBIG, "File too large"))
    assert not is_transient(PermissionError(errno.EACCES, "Permission denied"))


def test_a_task_is_retried_on_a_transient_io_error_only() -> None:
    """The condition the image tasks retry on: an unreadable image or a full disk retried
    twice more, seconds apart, redid the whole batch before failing the same way."""
    from prefect.states import Failed

    from flows.common import retry_on_transient_io

    def retried(error: BaseException) -> bool:
        return retry_on_transient_io(None, None, Failed(data=error))

    assert retried(OSError(errno.EIO, "Input/output error")) and retried(TimeoutError("slow"))
    assert not retried(ImageReadError("x.png: truncated PNG"))
    assert not retried(OSError(errno.ENOSPC, "No space left on device"))


def test_every_flow_parameter_has_a_description_in_the_run_form() -> None:
    """The dashboard's run form (and `prefect deployment inspect`) showed every parameter as a
    bare name, `min_improvement`, `task_runner`, `profile_overrides`, with no word of what it
    takes: Prefect reads a parameter's description only from the `Args:` section of the flow
    function's docstring, both when it loads the flow and from the entrypoint's source."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import (
        parameter_docstrings,
        parameter_schema,
        parameter_schema_from_entrypoint,
    )

    root = Path(__file__).resolve().parents[1]
    deployed = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    entrypoints = {d["entrypoint"] for d in deployed} | {
        "flows.validate.validate_dataset_flow",
        "flows.train.train_model",
        "flows.evaluate.evaluate_model",
        "flows.segment.segment_and_quantify",
        "flows.monitor.monitor",
        "flows.pipeline.pipeline",
    }
    undescribed, stale = {}, {}
    for entrypoint in sorted(entrypoints):
        flow = load_flow_from_entrypoint(entrypoint)
        for schema in (parameter_schema(flow), parameter_schema_from_entrypoint(entrypoint)):
            properties = schema.model_dump_for_openapi()["properties"]
            missing = [k for k, v in properties.items() if not v.get("description", "").strip()]
            if missing:
                undescribed[entrypoint] = missing
        # an Args entry left behind by a renamed parameter describes nothing in the form
        documented = set(parameter_docstrings(inspect.getdoc(flow.fn)))
        if documented - set(properties):
            stale[entrypoint] = sorted(documented - set(properties))
    assert not undescribed, f"parameters without a description: {undescribed}"
    assert not stale, f"Args entries naming no parameter: {stale}"


def _batch_args(out, checkpoint) -> tuple:
    """segment_batch's positional arguments after the images: the he profile and the model's
    own inference settings."""
    from flows.segment import model_config, model_id
    from mlseg.config import get_profile

    return (
        str(out),
        str(checkpoint),
        model_id(str(checkpoint)),
        get_profile("he").model_dump(mode="json"),
        model_config(str(checkpoint)).inference.model_dump(mode="json"),
    )


def test_batch_task_and_segment_command_skip_each_others_finished_images(
    tmp_path, checkpoint
) -> None:
    """A person's mlseg segment and the nightly flow into one folder, with the same model,
    profile and settings: each skips the images the other finished, rather than redoing all."""
    from flows.segment import segment_batch
    from mlseg.segment import segment_folder

    images = [str(p) for p in disc_images(tmp_path / "in", 2)]
    sizes = {"img_001": 0.3}
    by_hand = tmp_path / "by-hand"
    run = {"profile_name": "he", "pixel_sizes": sizes, "progress": False}
    assert len(segment_folder(checkpoint, tmp_path / "in", by_hand, **run).processed) == 2
    records = segment_batch.fn(images, *_batch_args(by_hand, checkpoint), pixel_sizes=sizes)
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    nightly = tmp_path / "nightly"
    segment_batch.fn(images, *_batch_args(nightly, checkpoint), pixel_sizes=sizes)
    assert segment_folder(checkpoint, tmp_path / "in", nightly, **run).processed == []


def test_batch_task_skips_finished_images_and_redoes_changed_ones(tmp_path, checkpoint) -> None:
    from flows.segment import batch_cache_key, segment_batch

    images = [str(p) for p in disc_images(tmp_path / "in", 2)]
    args = _batch_args(tmp_path / "out", checkpoint)
    first = segment_batch.fn(images, *args)
    assert [r["status"] for r in first] == ["processed", "processed"]
    assert first[0]["summary"]["input_digest"]
    again = segment_batch.fn(images, *args)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    disc_images(tmp_path / "in", 1, seed=99)  # img_000.png: same name, new content
    changed = segment_batch.fn(images, *args)
    assert [r["status"] for r in changed] == ["processed", "skipped"]
    # A pixel size for one image, or other inference settings: its numbers change, so redone.
    sized = segment_batch.fn(images, *args, pixel_sizes={"img_001": 0.3})
    assert [r["status"] for r in sized] == ["skipped", "processed"]
    assert sized[1]["summary"]["pixel_size_source"] == "table"
    other = {**args[4], "overlap": 0.5}
    tiles = segment_batch.fn(images, *args[:4], other, pixel_sizes={"img_001": 0.3})
    assert [r["status"] for r in tiles] == ["processed", "processed"]
    # A sidecar written or corrected beside an image redoes it, as a new table entry would.
    sidecar = tmp_path / "in" / "img_000.json"
    sidecar.write_text('{"PixelSize": [0.5, 0.5], "PixelSizeUnits": "um"}')
    redone = segment_batch.fn(images, *args[:4], other, pixel_sizes={"img_001": 0.3})
    assert [r["status"] for r in redone] == ["processed", "skipped"]
    assert redone[0]["summary"]["pixel_size_source"] == "image metadata"
    params = {"images": images, "out_dir": args[0], "model_id": args[2], "inference": other}
    before = batch_cache_key(None, params)
    sidecar.write_text('{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}')
    assert batch_cache_key(None, params) != before, "a cached batch would hide the new size"
    fixed = segment_batch.fn(images, *args[:4], other, pixel_sizes={"img_001": 0.3})
    assert [r["status"] for r in fixed] == ["processed", "skipped"]
    assert fixed[0]["summary"]["pixel_size_um"] == 0.25


def test_batch_task_reports_an_image_that_may_not_be_read_and_does_the_others(
    tmp_path, monkeypatch, checkpoint
) -> None:
    """A chmod 000 image failed its whole batch (and the flow with it) at the skip check's
    hash of its bytes, where a corrupt one is reported alone."""
    from flows.segment import batch_cache_key, segment_batch

    images = [str(p) for p in disc_images(tmp_path / "in", 3)]
    real_open = Path.open

    def denied(self, *args, **kwargs):  # what a user without read permission sees (not root)
        if self.name == "img_001.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    assert batch_cache_key(None, {"images": images})  # Prefect computes it before the batch
    records = segment_batch.fn(images, *_batch_args(tmp_path / "out", checkpoint))
    assert [r["status"] for r in records] == ["processed", "failed", "processed"]
    assert "img_001.png" in records[1]["error"] and "permission denied" in records[1]["error"]


def test_batch_task_names_an_ome_tiff_by_its_name_less_ome_tif(tmp_path, checkpoint) -> None:
    """``x.ome.tif`` (Bio-Formats, QuPath, Fiji) is image ``x``: outputs ``x_...``, table row
    ``x`` (its file name works too)."""
    import tifffile

    from flows.segment import _entries, per_image_sizes, segment_batch
    from mlseg.io import read_image

    (png,) = disc_images(tmp_path / "in", 1)
    ome = tmp_path / "in" / "x.ome.tif"
    tifffile.imwrite(ome, read_image(png), photometric="rgb")
    png.unlink()
    sizes = per_image_sizes({"x.ome.tif": 0.3}, None)
    assert sizes == {"x": 0.3} and _entries(sizes, [str(ome)]) == sizes
    args = _batch_args(tmp_path / "out", checkpoint)
    (first,) = segment_batch.fn([str(ome)], *args, pixel_sizes=sizes)
    assert first["status"] == "processed" and first["summary"]["image"] == "x"
    assert first["summary"]["pixel_size_source"] == "table"
    assert (tmp_path / "out" / "x_labels.png").is_file()
    (again,) = segment_batch.fn([str(ome)], *args, pixel_sizes=sizes)
    assert again["status"] == "skipped"


class _CountedName(str):
    """An image name that counts how often it is hashed (set and dict work)."""

    hashed = 0

    def __hash__(self) -> int:
        type(self).hashed += 1
        return str.__hash__(self)


def test_a_batch_takes_its_pixel_sizes_without_walking_the_whole_table() -> None:
    """A batch's entries of a pixel-size table that lists thousands of images cost in
    proportion to the batch: every batch walked the whole table (20,000 images: 9 s)."""
    from flows.segment import _entries

    names = [_CountedName(f"img{i:04d}") for i in range(1000)]
    table = {name: 0.25 + i / 10_000 for i, name in enumerate(names)}
    batch = ["/in/img0003.png", "/in/img0998.tif", "/in/other.png"]
    _CountedName.hashed = 0
    assert _entries(table, batch) == {"img0003": 0.2503, "img0998": 0.3498}
    assert _CountedName.hashed <= len(batch)


def test_model_id_sees_an_edited_stain_reference(tmp_path) -> None:
    """A model normalising to its own reference image: editing the image in place changes
    the model's identity, so finished images are redone and the batch cache misses."""
    from flows.segment import model_config, model_id

    model = tiny_checkpoint(tmp_path / "model")
    plain = model_id(str(model))
    assert model_id(str(model), model_config(str(model))) == plain  # the flow's one read
    reference = tmp_path / "reference.png"
    reference.write_bytes(b"first stain batch")
    config = model / "config.json"
    saved = json.loads(config.read_text())
    saved["preprocess"]["stain_reference"] = str(reference)
    config.write_text(json.dumps(saved))
    first = model_id(str(model))
    assert first.startswith(plain) and "reference.png@" in first
    reference.write_bytes(b"another stain batch")
    assert model_id(str(model)) not in (plain, first)


def test_an_edited_model_config_redoes_a_batch_with_the_config_as_edited(tmp_path) -> None:
    """The model's identity was its weights (and stain reference): after its config.json's
    stain_norm was edited, a batch skipped its finished images under the same cache key,
    and a worker that had loaded the model kept the old config.json (it loaded again only
    for new weights). What training rewrites (metrics, times) changes neither."""
    from flows.segment import batch_cache_key, loaded_model, segment_batch

    model = tiny_checkpoint(tmp_path / "model")
    images = [str(p) for p in disc_images(tmp_path / "in", 2)]

    def batch() -> tuple[list[str], str]:
        args = _batch_args(tmp_path / "out", model)
        records = segment_batch.fn(images, *args)
        key = batch_cache_key(None, {"images": images, "out_dir": args[0], "model_id": args[2]})
        return [r["status"] for r in records], key

    def edit(name: str, change) -> None:
        data = json.loads((model / name).read_text())
        change(data)
        (model / name).write_text(json.dumps(data))

    status, key = batch()
    assert status == ["processed", "processed"]
    edit("meta.json", lambda m: m["checkpoints"]["best"].update(metrics={"val_dice": 0.9}))
    assert batch() == (["skipped", "skipped"], key)
    assert loaded_model(str(model), "cpu").config.preprocess.stain_norm == "none"
    edit("config.json", lambda c: c["preprocess"].update(stain_norm="macenko"))
    status, edited = batch()
    assert status == ["processed", "processed"] and edited != key
    assert loaded_model(str(model), "cpu").config.preprocess.stain_norm == "macenko"


# ----------------------------------------------------------------------------- flows


def test_segment_flow_outputs_artifacts_history_and_cached_rerun(
    harness, tmp_path, checkpoint
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 5)
    state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    result = state.result()
    assert sorted(result["processed"]) == [f"img_{i:03d}" for i in range(5)]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["image"]) == [f"img_{i:03d}" for i in range(5)]
    assert {"count", "profile", "model", "input_digest"} <= set(summary.columns)
    # when each image was segmented, which the weekly monitor's since_days reads
    assert summary["finished_at"].map(lambda t: datetime.datetime.fromisoformat(t).tzinfo).all()
    for stem in summary["image"]:
        assert (out / f"{stem}_nuclei.csv").is_file() and (out / f"{stem}_overlay.png").is_file()
    history = pd.read_csv(out / "runs" / "history.csv")
    assert history["n_images"].tolist() == [5] and history["images_per_s"].iloc[0] > 0
    keys = set(flow_artifacts(state.state_details.flow_run_id))
    assert {"segment-summary", "segment-run-metrics", "segment-outputs"} <= keys
    assert "segment-no-nuclei" not in keys  # it found some
    # no pixel size given or declared: measured in pixels, said as mlseg segment says it
    (said,) = [line for line in flow_logs(state.state_details.flow_run_id) if "no pixel" in line]
    assert "5 of the 5 image(s)" in said and "pixel_sizes" in said
    assert "segment-no-pixel-size" in keys
    nuclei = pd.read_parquet(result["nuclei_parquet"])
    assert nuclei["image"].value_counts().reindex(summary["image"], fill_value=0).tolist() == (
        summary["count"].tolist()
    )
    # run.json says, as mlseg segment's does, which weights, mlseg and pixel size, and when:
    # it named the model only by the path given and left out the rest
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["model"] == summary["model"].iloc[0] and "@" in run_info["model"]
    assert run_info["mlseg_version"] == code_version()  # with the commit: 0.1.0 is every build
    assert (summary["mlseg_version"] == code_version()).all() and set(summary["device"]) == {"cpu"}
    assert run_info["started_at"] <= run_info["finished_at"]
    assert run_info["model_source"] == str(checkpoint) and run_info["pixel_size_um"] is None
    assert run_info["packages"]["torch"] == package_versions()["torch"]
    assert (
        run_info["preprocess"]["stain_norm"] == model_config(str(checkpoint)).preprocess.stain_norm
    )

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("img_*")}
    rerun = _segment(inbox, out, checkpoint)
    assert rerun.is_completed()
    again = rerun.result()
    assert again["processed"] == [] and sorted(again["skipped"]) == sorted(result["processed"])
    assert sorted(again["from_cache"]) == sorted(result["processed"])  # Prefect cache hits
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("img_*")} == mtimes
    assert len(pd.read_csv(out / "runs" / "history.csv")) == 1  # nothing new to record
    pd.testing.assert_frame_equal(pd.read_parquet(again["nuclei_parquet"]), nuclei)


def test_the_run_metrics_artifact_shows_the_area_shift_the_history_records(
    harness, tmp_path, checkpoint
) -> None:
    """A run whose nuclei came out a quarter of the previous run's size recorded area_psi
    0.99 and a median change of -77% in runs/history.csv, while the dashboard's
    segment-run-metrics showed the count's shift alone: every area_ key was left out with
    the area deciles. The shift and its unit are now shown; the deciles stay in the history."""
    import re

    everything, inbox, out = tmp_path / "all", tmp_path / "inbox", tmp_path / "out"
    disc_images(everything, 4)
    inbox.mkdir()
    for batch in (("img_000", "img_001"), ("img_002", "img_003")):
        for stem in batch:
            shutil.copy(everything / f"{stem}.png", inbox)
        state = _segment(inbox, out, checkpoint)
        assert state.is_completed(), state.message
    row = pd.read_csv(out / "runs" / "history.csv").iloc[-1]
    assert np.isfinite(row["area_psi"])  # both runs measured areas, in the same unit
    shown = {
        r["name"]: r["value"]
        for r in artifact_rows(state.state_details.flow_run_id, "segment-run-metrics")
    }
    assert shown["area_unit"] == row["area_unit"] == "px"
    for key in ("area_psi", "area_ks_p", "area_median_change_pct", "count_psi"):
        assert shown[key] == pytest.approx(row[key], rel=1e-3), key
    assert not [k for k in shown if re.search(r"_q\d+$", k)]  # deciles: the history's


def test_a_flow_rerun_that_redoes_nothing_keeps_the_run_files_that_hold_its_images(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A rerun where every image was done read every image's nuclei table and wrote the
    same summary.csv, nuclei.parquet and histograms.png again. Now it writes run.json and
    nuclei.parquet's footer (this flow run, its lists), the rows and the other two kept;
    with an image gone from the inbox, all four are written again."""
    import pyarrow.parquet as pq

    import mlseg.outputs

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 3)
    assert _segment(inbox, out, checkpoint).is_completed()
    names = ("summary.csv", "nuclei.parquet", "histograms.png", "run.json")

    def files() -> dict[str, tuple[int, int]]:
        return {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in names}

    before, nuclei = files(), pd.read_parquet(out / "nuclei.parquet")
    first_run = json.loads((out / "run.json").read_text())["flow_run"]

    def unread(out_dir, summary):
        raise AssertionError(f"{summary['image']}'s nuclei table read again")

    with monkeypatch.context() as patched:
        patched.setattr(mlseg.outputs, "read_nuclei", unread)
        state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    after = files()
    assert {n: after[n] == before[n] for n in names} == {
        "summary.csv": True,
        "nuclei.parquet": False,  # its footer: this run's record
        "histograms.png": True,
        "run.json": False,
    }
    record = json.loads((out / "run.json").read_text())
    assert record["flow_run"] != first_run
    assert (record["processed"], record["skipped"]) == ([], ["img_000", "img_001", "img_002"])
    footer = json.loads(pq.read_schema(out / "nuclei.parquet").metadata[b"mlseg"])
    assert footer == {k: v for k, v in record.items() if k not in ("started_at", "finished_at")}
    assert state.result()["run_json"] == str(out / "run.json")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "nuclei.parquet"), nuclei)
    (inbox / "img_001.png").unlink()
    assert _segment(inbox, out, checkpoint).is_completed()
    assert all(new != after[n] for n, new in files().items())
    assert pd.read_csv(out / "summary.csv")["image"].tolist() == ["img_000", "img_002"]
    assert set(pd.read_parquet(out / "nuclei.parquet")["image"]) == {"img_000", "img_002"}


def test_the_flow_keeps_its_tables_grouped_and_reads_a_skipped_images_only_to_write(
    tmp_path, monkeypatch
) -> None:
    """The flow's end of run kept every image's whole nuclei DataFrame in a list, for the
    run's table and its metrics' areas, where mlseg segment groups them (RunNuclei).
    run_nuclei groups them too (half the memory, bench/run_memory.py --flow), and keeps
    only the areas for the metrics: the run's table and the metrics' areas are the same,
    each processed image's table is read once, and a skipped image's only when the run
    files are written again."""
    import mlseg.outputs
    from flows.segment import run_nuclei
    from mlseg.io import write_image, write_labels
    from mlseg.monitor import run_areas
    from mlseg.outputs import nuclei_table, read_nuclei
    from mlseg.segment import quantify_folder
    from mlseg.synth import synth_pair

    rng = np.random.default_rng(0)
    for i in range(7):
        image, labels, _ = synth_pair("he", 48, rng)
        write_image(tmp_path / "images" / f"t{i}.png", image)
        write_labels(tmp_path / "masks" / f"t{i}_mask.png", labels)
    out = tmp_path / "out"
    quantify_folder(
        tmp_path / "masks",
        tmp_path / "images",
        out,
        profile_name="he",
        pixel_size_um=0.5,
        progress=False,
    )
    summaries = [json.loads((out / f"t{i}.json").read_text()) for i in range(7)]
    assert all(s["count"] for s in summaries)  # one column set: tables group
    one_by_one = [read_nuclei(out, s) for s in summaries]
    done = {"t0", "t1", "t2", "t5", "t6"}
    monkeypatch.setattr(mlseg.outputs, "COMPACT_EVERY", 3)
    reads: list[str] = []

    def counted(out_dir, summary):
        reads.append(summary["image"])
        return read_nuclei(out_dir, summary)

    monkeypatch.setattr(mlseg.outputs, "read_nuclei", counted)
    tables, areas = run_nuclei(out, summaries, done)
    assert reads == ["t0", "t1", "t2", "t5", "t6"]
    together = list(tables.tables())
    assert reads[5:] == ["t3", "t4"]
    assert len(together) == 3  # t0-t2; t3-t4 read; t5-t6
    pd.testing.assert_frame_equal(nuclei_table(together), nuclei_table(one_by_one))
    processed = [t for s, t in zip(summaries, one_by_one, strict=True) if s["image"] in done]
    assert run_areas(areas.tables()) == run_areas(processed)
    assert run_areas(processed)[0] == "um2" and len(run_areas(processed)[1]) > 5


def test_run_json_and_the_history_row_of_a_run_give_one_finished_at(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """run.json and the history row of the same run (its flow_run is the row's run_id) gave
    two end times, apart by the time the run's tables and histograms took to write."""
    import mlseg.outputs

    write = mlseg.outputs.write_run_outputs

    def slow_write(*args, **kwargs):
        paths = write(*args, **kwargs)
        time.sleep(1.1)  # the histograms of a large run
        return paths

    monkeypatch.setattr(mlseg.outputs, "write_run_outputs", slow_write)
    disc_images(tmp_path / "inbox", 1)
    state = _segment(tmp_path / "inbox", tmp_path / "out", checkpoint)
    assert state.is_completed(), state.message
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    row = pd.read_csv(tmp_path / "out" / "runs" / "history.csv").iloc[-1]
    assert row["run_id"] == run_info["flow_run"]
    assert datetime.datetime.fromisoformat(row["finished_at"]) == (
        datetime.datetime.strptime(run_info["finished_at"], "%Y-%m-%dT%H:%M:%S%z")
    )


def test_a_model_that_finds_no_nucleus_in_any_image_is_warned_of(harness, tmp_path) -> None:
    """A training collapsed to all background (or a model for other images) found 0 nuclei
    in every image of a nightly run, and the run ended Completed with nothing said."""
    import logging

    from safetensors.torch import load_file, save_file

    blind = tiny_checkpoint(tmp_path / "blind")
    weights = load_file(blind / "best.safetensors")
    weights["segmentation_head.0.bias"][0] = 1000.0  # background, whatever the image
    save_file(weights, blind / "best.safetensors")
    disc_images(tmp_path / "inbox", 3)
    state = _segment(tmp_path / "inbox", tmp_path / "out", blind)
    assert state.is_completed(), state.message
    run = state.state_details.flow_run_id
    said = [m for m in flow_logs(run, logging.WARNING) if "found no nucleus in any" in m]
    assert said and "of the 3 image(s)" in said[0] and str(blind) in said[0]
    assert "segment-no-nuclei" in flow_artifacts(run)


def test_segment_flow_torch_threads_count_the_cpus_the_job_may_use(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A job allowed 2 of a node's 64 cores (taskset, a SLURM allocation) runs its 2 workers
    on 1 torch thread each, not 32 each on those 2 cores."""
    import os

    import torch

    threads = []
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    disc_images(tmp_path / "inbox", 2)
    state = _segment(tmp_path / "inbox", tmp_path / "out", checkpoint, batch_size=1)
    assert state.is_completed(), state.message
    assert threads == [1, 1]


def test_each_batch_task_run_is_named_after_its_images(harness, tmp_path, checkpoint) -> None:
    """A batch of one image was listed as 'segment img_004.png +0' in the dashboard."""
    disc_images(tmp_path / "inbox", 5)
    state = _segment(tmp_path / "inbox", tmp_path / "out", checkpoint, batch_size=2)
    assert state.is_completed(), state.message
    assert task_run_names(state.state_details.flow_run_id) == [
        "segment img_000.png +1",
        "segment img_002.png +1",
        "segment img_004.png",
    ]


def test_segment_summary_artifact_keeps_image_names_that_read_as_numbers(
    harness, tmp_path, checkpoint
) -> None:
    """GBM40's tiles are 01.png, 02.png ...: summary.csv read back without a type named
    them 1, 2 in the artifact (and in the pipeline's report); an image named NA was a blank."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    for path, name in zip(disc_images(inbox, 2), ("01", "NA"), strict=True):
        path.rename(inbox / f"{name}.png")
    state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    rows = artifact_rows(state.state_details.flow_run_id, "segment-summary")
    assert [row["image"] for row in rows] == ["01", "NA"]
    assert set(pd.read_parquet(out / "nuclei.parquet")["image"]) <= {"01", "NA"}


def test_segment_summary_artifact_lists_the_images_of_its_own_run_first(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """An inbox that keeps its images (the weekly monitor reads them there) holds more
    than an artifact's 200 rows within months: the table, cut to its first rows by name,
    showed the same oldest images every night and never the night's own."""
    import flows.artifacts

    monkeypatch.setattr(flows.artifacts, "MAX_TABLE_ROWS", 2)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    new = disc_images(inbox, 3)[-1]
    new.rename(tmp_path / new.name)  # tonight's image, not there last night
    assert _segment(inbox, out, checkpoint).is_completed()
    (tmp_path / new.name).rename(new)
    state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    assert state.result()["processed"] == ["img_002"]
    rows = artifact_rows(state.state_details.flow_run_id, "segment-summary")
    assert [row["image"] for row in rows] == ["img_002", "img_000"]


def test_evaluation_artifact_keeps_image_names_that_read_as_numbers(
    harness, tmp_path, checkpoint, nuclei_dataset
) -> None:
    from flows.evaluate import evaluate_model

    root = nuclei_dataset(n_train=1, n_test=2)
    for i, name in enumerate(("00", "None")):
        (root / "test" / "original" / f"test{i}.png").rename(
            root / "test" / "original" / f"{name}.png"
        )
        masks = root / "test" / "masks"
        (masks / f"test{i}_mask.png").rename(masks / f"{name}_mask.png")
    state = evaluate_model(str(checkpoint), str(root), str(tmp_path / "eval"), return_state=True)
    assert state.is_completed(), state.message
    rows = artifact_rows(state.state_details.flow_run_id, "evaluation-per-image")
    assert sorted(row["stem"] for row in rows) == ["00", "None"]


def test_deleted_outputs_are_recomputed_despite_the_cache(harness, tmp_path, checkpoint) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 2)
    assert _segment(inbox, out, checkpoint).is_completed()
    (out / "img_001.json").unlink()
    result = _segment(inbox, out, checkpoint).result()
    assert result["processed"] == ["img_001"] and result["skipped"] == ["img_000"]
    # one table of both images' nuclei, the one skipped as done and the one redone
    tables = [pd.read_parquet(out / f"img_00{i}_nuclei.parquet") for i in range(2)]
    nuclei = pd.read_parquet(result["nuclei_parquet"])
    pd.testing.assert_frame_equal(nuclei, pd.concat(tables, ignore_index=True))
    assert nuclei.columns[0] == "image"


def test_a_cached_batch_is_not_reused_over_another_models_outputs(
    harness, tmp_path, checkpoint
) -> None:
    """Model A, then B, then A again (a rollback): A's cached batch records would describe
    B's labels on disk, so the batch is run again and the files are A's."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 2)
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    first = _segment(inbox, out, checkpoint).result()
    assert _segment(inbox, out, other).result()["processed"] == first["processed"]
    back = _segment(inbox, out, checkpoint).result()
    assert sorted(back["processed"]) == sorted(first["processed"]) and back["from_cache"] == []
    models = {json.loads((out / f"{stem}.json").read_text())["model"] for stem in back["processed"]}
    assert models == set(pd.read_csv(out / "summary.csv")["model"])


def test_a_retried_batch_counts_the_images_its_failed_attempt_finished(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A transient I/O error on a batch's second image retries the batch: the first image,
    written by the failed attempt, is this run's work as in a run without the error. It was
    reported skipped, and the run's metrics and history row left it out (in no run's)."""
    import flows.segment as segment_flow

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 4)
    segment_one, failures = segment_flow.segment_one, []

    def flaky(loaded, path, *args, **kwargs):
        if path.stem == "img_001" and not failures:
            failures.append(path.stem)
            raise OSError(5, "Input/output error")  # an NFS hiccup: the batch is retried
        return segment_one(loaded, path, *args, **kwargs)

    monkeypatch.setattr(segment_flow, "segment_one", flaky)
    fast = segment_flow.segment_batch.with_options(retry_delay_seconds=0)
    monkeypatch.setattr(segment_flow, "segment_batch", fast)
    result = _segment(inbox, out, checkpoint).result()
    assert failures == ["img_001"]  # the batch was retried, not failed
    assert sorted(result["processed"]) == [f"img_{i:03d}" for i in range(4)]
    assert result["skipped"] == []
    history = pd.read_csv(out / "runs" / "history.csv")
    assert history["n_images"].tolist() == [4] and history["n_skipped"].tolist() == [0]
    assert sorted(json.loads((out / "run.json").read_text())["processed"]) == sorted(
        result["processed"]
    )


@pytest.mark.parametrize(
    "fails", ["in a batch", "an image", "writing the run outputs", "publishing"]
)
def test_a_retried_flow_run_writes_its_history_row_once_with_all_its_images(
    harness, tmp_path, checkpoint, monkeypatch, fails
) -> None:
    """A flow run retried (``retries`` on the flow, PREFECT_FLOWS_DEFAULT_RETRIES) after its
    first attempt failed part way is one run: the images that attempt wrote are its work. The
    retry took the finished batches from Prefect's cache as another run's and called them
    skipped: its history row counted only the rest, or was not written at all where every
    batch had finished; and an attempt that failed after writing its row must not leave a
    second one."""
    import flows.artifacts
    import flows.segment as segment_flow
    import mlseg.outputs

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 4)
    failures: list[str] = []

    def once(function, when=lambda *args, **kwargs: True, error=None):
        def flaky(*args, **kwargs):
            if not failures and when(*args, **kwargs):
                failures.append(fails)
                # no task retry: the flow fails
                raise error or RuntimeError("CUDA out of memory")
            return function(*args, **kwargs)

        return flaky

    if fails == "in a batch":  # the second batch, after its first image
        last = lambda loaded, path, *args, **kwargs: path.stem == "img_003"  # noqa: E731
        monkeypatch.setattr(segment_flow, "segment_one", once(segment_flow.segment_one, last))
    elif fails == "an image":  # the first batch's second: the batch ends, the flow fails
        unread = ImageReadError("img_001.png: truncated PNG; re-copy it")
        second = lambda loaded, path, *args, **kwargs: path.stem == "img_001"  # noqa: E731
        monkeypatch.setattr(
            segment_flow, "segment_one", once(segment_flow.segment_one, second, unread)
        )
    elif fails == "writing the run outputs":  # every batch finished
        monkeypatch.setattr(
            mlseg.outputs, "write_run_outputs", once(mlseg.outputs.write_run_outputs)
        )
    else:  # after the history row
        metrics = lambda key, *args, **kwargs: key == "segment-run-metrics"  # noqa: E731
        monkeypatch.setattr(flows.artifacts, "table", once(flows.artifacts.table, metrics))
    retried = segment_flow.segment_and_quantify.with_options(retries=1, retry_delay_seconds=0)
    state = retried(str(inbox), str(out), model=str(checkpoint), batch_size=2, return_state=True)
    assert state.is_completed(), state.message
    assert failures == [fails]  # the first attempt failed, the retry completed
    result = state.result()
    assert sorted(result["processed"]) == [f"img_{i:03d}" for i in range(4)]
    assert result["skipped"] == []
    history = pd.read_csv(out / "runs" / "history.csv")
    assert history["n_images"].tolist() == [4] and history["n_skipped"].tolist() == [0]
    assert history["count_psi"].isna().all()  # not compared with its own first attempt
    assert sorted(json.loads((out / "run.json").read_text())["processed"]) == sorted(
        result["processed"]
    )


def test_a_run_whose_artifacts_the_api_refuses_completes_with_its_outputs(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """The Prefect API down past its client's retries (a server restarted for over a
    minute) as a segment run publishes: the run had written every image, run.json and its
    history row, then failed on its first artifact, leaving its marks for a retry that had
    nothing to do. Artifacts are the dashboard's copy: the run completes and says so."""
    import httpx

    import flows.artifacts

    def refused(*args, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    for create in ("create_table_artifact", "create_markdown_artifact", "create_link_artifact"):
        monkeypatch.setattr(flows.artifacts, create, refused)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 3)
    state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    result = state.result()
    assert sorted(result["processed"]) == [f"img_{i:03d}" for i in range(3)]
    assert sorted(json.loads((out / "run.json").read_text())["processed"]) == sorted(
        result["processed"]
    )
    assert pd.read_csv(out / "runs" / "history.csv")["n_images"].tolist() == [3]
    assert not (out / ".mlseg-written").exists()  # a completed run's marks are gone
    logged = "\n".join(flow_logs(state.state_details.flow_run_id, logging.WARNING))
    assert "artifact segment-summary not published" in logged
    assert "PREFECT_API_URL" in logged and "ConnectError" in logged


def test_a_flow_run_retried_in_another_process_keeps_one_history_row(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A failed deployment run retried from the dashboard (or rescheduled after its worker
    restarted) runs again in a new worker process under the same flow run id. Its run id
    was remembered only by the process of its first attempt: the retry wrote a second row,
    and measured its shift against its own first attempt's row."""
    import time

    import flows.segment as segment_flow

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 4)
    segment_one = segment_flow.segment_one

    def unreadable(loaded, path, *args, **kwargs):
        if path.stem == "img_003":
            raise ImageReadError(f"{path}: truncated PNG")
        return segment_one(loaded, path, *args, **kwargs)

    monkeypatch.setattr(segment_flow, "segment_one", unreadable)
    parameters = {"input_dir": str(inbox), "out_dir": str(out), "model": str(checkpoint)}
    first = segment_flow.segment_and_quantify(**parameters, batch_size=2, return_state=True)
    assert first.is_failed()  # after its history row
    monkeypatch.setattr(segment_flow, "segment_one", segment_one)  # the image is fixed
    segment_flow._first_start.cache_clear()  # a new process
    time.sleep(1.1)  # a retry starts later
    retried = _retry(first, {**parameters, "batch_size": 2})
    assert retried.is_completed(), retried.message
    history = pd.read_csv(out / "runs" / "history.csv")
    assert len(history) == 1, history[["run_id", "n_images"]]
    assert history["count_psi"].isna().all()  # not compared with its own first attempt


def test_two_flow_runs_started_together_keep_history_rows_of_their_own() -> None:
    """A run's history row replaces one of its own run id (a retried run's). The id took the
    flow run id's first 8 digits, a time in a UUIDv7 (this server draws UUIDv4 for flow
    runs, prefect._internal.uuid7 the others): two such runs started in one second would
    share a run id, and the second's row would replace the first's."""
    from prefect._internal.uuid7 import uuid7

    import flows.segment as segment_flow

    started = datetime.datetime.now(datetime.UTC)
    first, second = str(uuid7()), str(uuid7())
    assert segment_flow._flow_run_id(first, started) != segment_flow._flow_run_id(second, started)


def test_unreadable_image_fails_the_flow_after_the_others(harness, tmp_path, checkpoint) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 3)
    broken = inbox / "img_001.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated, as a copy in progress
    state = _segment(inbox, out, checkpoint)
    assert state.is_failed()
    assert "1 of 3" in state.message
    assert state.message.count("img_001.png") == 1, state.message  # named once, not twice
    assert (out / "img_000.json").is_file() and (out / "img_002.json").is_file()
    assert "segment-failed-images" in set(flow_artifacts(state.state_details.flow_run_id))


def test_an_image_that_failed_is_logged_as_an_error_where_the_run_goes_on(
    harness, tmp_path, checkpoint
) -> None:
    """With fail_on_error false the run ends Completed and its failed images were named in
    an artifact only: its logs, filtered for errors (or read by an alert), held no word of
    them, where mlseg segment prints each."""
    inbox = tmp_path / "inbox"
    disc_images(inbox, 3)
    broken = inbox / "img_001.png"
    broken.write_bytes(broken.read_bytes()[:200])
    state = _segment(inbox, tmp_path / "out", checkpoint, fail_on_error=False)
    assert state.is_completed(), state.message
    errors = flow_logs(state.state_details.flow_run_id, logging.ERROR)
    assert [m for m in errors if "img_001.png" in m] == [
        f"failed: {broken}: truncated PNG (no IEND chunk); re-copy or re-export it"
    ], errors


def test_a_failed_run_not_retried_leaves_no_marks_once_another_run_takes_its_folder(
    harness, tmp_path, checkpoint
) -> None:
    """A nightly run failed by one image marks each image it sets out to write, for a retry
    of it to count them; the next night's run, with the image fixed, completed, and the
    failed run's marks stayed in the output folder for good: one folder of them a night."""
    from flows.segment import WRITTEN_DIR

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    broken = disc_images(inbox, 3)[2]
    good = broken.read_bytes()
    broken.write_bytes(good[:200])
    assert _segment(inbox, out, checkpoint).is_failed()
    assert (out / WRITTEN_DIR).is_dir()  # kept for a retry of that run
    broken.write_bytes(good)  # fixed; not retried, the next night's run picks it up
    state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    assert (state.result()["processed"], state.result()["skipped"]) == (
        ["img_002"],
        ["img_000", "img_001"],
    )
    assert not (out / WRITTEN_DIR).exists()


def _result_storage() -> Path:
    """Prefect's local result storage (under the session's PREFECT_HOME)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


def _stored_batches() -> set[str]:
    """The names of the batch results in Prefect's result storage."""
    return {p.name for p in _result_storage().glob("mlseg-segment-*")}


@pytest.mark.parametrize("stopped", ["after its batches", "in a batch", "its cache gone"])
def test_the_images_a_killed_run_finished_are_in_the_next_run_s_history(
    harness, tmp_path, checkpoint, monkeypatch, stopped
) -> None:
    """A run killed (kill -9, out of memory) after its batches finished but before its run
    files: the next run restored every batch from Prefect's cache (or found its images done
    on disk) as another run's, said 0 processed and 4 skipped, wrote no history row and
    deleted the killed run's marks, so no history row or shift ever counted those images.
    The killed run is a flow stopped where a kill stops it: its marks and its cached batch
    results stay, and it writes nothing more."""
    import flows.segment as segment_flow
    import mlseg.outputs

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 4)

    def killed(*args, **kwargs):
        raise RuntimeError("SIGKILL")  # no further line of the flow runs

    if stopped == "in a batch":  # the second batch, after its first image
        segment_one = segment_flow.segment_one

        def last(loaded, path, *args, **kwargs):
            if path.stem == "img_003":
                killed()
            return segment_one(loaded, path, *args, **kwargs)

        monkeypatch.setattr(segment_flow, "segment_one", last)
    else:
        monkeypatch.setattr(mlseg.outputs, "update_run_outputs", killed)
    before = _stored_batches()
    assert _segment(inbox, out, checkpoint).is_failed()
    assert not (out / "runs" / "history.csv").exists() and (out / ".mlseg-written").is_dir()
    if stopped == "its cache gone":  # expired, or another PREFECT_HOME
        for name in _stored_batches() - before:
            (_result_storage() / name).unlink()
    monkeypatch.undo()
    result = _segment(inbox, out, checkpoint).result()
    assert sorted(result["processed"]) == [f"img_{i:03d}" for i in range(4)]
    assert result["skipped"] == []
    history = pd.read_csv(out / "runs" / "history.csv")
    assert history["n_images"].tolist() == [4] and history["n_skipped"].tolist() == [0]
    assert not (out / ".mlseg-written").exists()
    # counted once: the run after has nothing new to record
    again = _segment(inbox, out, checkpoint).result()
    assert again["processed"] == [] and len(pd.read_csv(out / "runs" / "history.csv")) == 1


def test_a_run_after_a_failed_retry_counts_only_what_the_retry_did_not_record(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A run failed by an image records the others (history row, run files) and keeps its
    marks for a retry; its retry, killed before recording, leaves marks of the images it
    did. The next run counts those, not the ones the failed run recorded already."""
    import flows.segment as segment_flow
    import mlseg.outputs

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    broken = disc_images(inbox, 3)[2]
    good = broken.read_bytes()
    broken.write_bytes(good[:200])
    parameters = {"input_dir": str(inbox), "out_dir": str(out), "model": str(checkpoint)}
    first = segment_flow.segment_and_quantify(**parameters, batch_size=2, return_state=True)
    assert first.is_failed()
    broken.write_bytes(good)  # fixed, and retried: killed before its run files

    def killed(*args, **kwargs):
        raise RuntimeError("SIGKILL")

    monkeypatch.setattr(mlseg.outputs, "update_run_outputs", killed)
    assert _retry(first, {**parameters, "batch_size": 2}).is_failed()
    monkeypatch.undo()
    result = _segment(inbox, out, checkpoint).result()
    assert (result["processed"], sorted(result["skipped"])) == (["img_002"], ["img_000", "img_001"])
    history = pd.read_csv(out / "runs" / "history.csv")
    assert history["n_images"].tolist() == [2, 1]


def test_a_batch_result_past_its_cache_expiration_is_run_again(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """Batch results had no expiration: every batch a worker ran was restored, and kept in
    Prefect's result storage, for good. Five days later the batch runs again (skipping its
    finished images on their <stem>.json), not restored from the cache."""
    import prefect.types._datetime as prefect_time

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 2)
    first = _segment(inbox, out, checkpoint).result()
    now = prefect_time.now
    monkeypatch.setattr(prefect_time, "now", lambda tz="UTC": now(tz) + datetime.timedelta(days=5))
    later = _segment(inbox, out, checkpoint).result()
    assert later["from_cache"] == [] and sorted(later["skipped"]) == sorted(first["processed"])


def test_prefect_s_result_storage_keeps_no_expired_batch(harness, tmp_path, checkpoint) -> None:
    """Prefect deletes no expired result: each image added to an inbox whose names do not
    sort by date changed most batches, and every batch composition ever run stayed in
    PREFECT_HOME/storage (some 3 kB an image), growing with the square of the images on a
    long-lived worker. A run removes the batch results whose cache expired."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 2)
    before = _stored_batches()
    assert _segment(inbox, out, checkpoint).is_completed()
    old = _stored_batches() - before
    assert old
    storage = _result_storage()
    days_ago = time.time() - 5 * 86400
    for name in old:
        os.utime(storage / name, (days_ago, days_ago))
    shutil.copy(inbox / "img_000.png", inbox / "a_new.png")  # sorts first: new batches
    assert _segment(inbox, out, checkpoint).is_completed()
    assert not old & _stored_batches()


def test_a_full_disk_where_an_image_is_marked_fails_once_naming_the_output_folder(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """The disk full when a batch marked an image in .mlseg-written: Python's ENOSPC on
    that hidden folder, taken for a passing I/O error and retried twice in vain, ended the
    run in a 200-line traceback; it is the output folder's error, said once."""
    from flows.segment import WRITTEN_DIR
    from mlseg.errors import OutputError

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 2)
    mkdir, tries = Path.mkdir, []

    def full(self, *args, **kwargs):
        if WRITTEN_DIR in self.parts:
            tries.append(self)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    state = _segment(inbox, out, checkpoint, batch_size=2)
    assert state.is_failed()
    with pytest.raises(OutputError) as caught:
        state.result()
    assert str(caught.value) == (
        f"{out}: cannot be written (no space left on device); free disk space or write "
        "elsewhere, then run again"
    )
    assert len(tries) == 1  # not retried


def test_a_run_that_waited_for_another_in_its_folder_leaves_the_wait_out_of_its_throughput(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A nightly run still writing when the next is due: the next waits for the folder
    (writing_to), and its history row counted the wait as its processing time, so its
    images_per_s fell by the length of the wait (20 s held, 4 images: 26.3 s recorded where
    the images took 5.8 s), a throughput drop the run history showed that no image had."""
    import threading
    import time
    import types
    import warnings

    import flows.segment
    from mlseg.outputs import writing_to

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 4)
    waiting, held = threading.Event(), threading.Event()
    hour = {"passed": 0.0}  # the flow's clock: an hour passes while it waits
    clock = types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + hour["passed"], strftime=time.strftime
    )
    monkeypatch.setattr(flows.segment, "time", clock)
    warn = warnings.warn

    def noted(message, *args, **kwargs):
        if "another mlseg run is writing" in str(message):
            waiting.set()
        return warn(message, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", noted)

    def other_run() -> None:
        with writing_to(out):
            held.set()
            waiting.wait(120)
            hour["passed"] = 3600.0

    holder = threading.Thread(target=other_run)
    holder.start()
    held.wait(60)
    state = _segment(inbox, out, checkpoint)
    holder.join()
    assert state.is_completed(), state.message
    assert waiting.is_set()  # it did wait for the other run
    (seconds,) = pd.read_csv(out / "runs" / "history.csv")["seconds"]
    assert seconds < 3600  # from when it had the folder


def test_a_run_that_waited_for_its_folder_keeps_the_images_the_other_run_did(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A nightly run waits for the folder while another run (a person's mlseg segment, a
    later night's run) segments an image that came in after the waiting run listed the
    inbox: the waiting run then wrote summary.csv and nuclei.parquet from its own list,
    without that image, whose files were there, until the next night. Listing the inbox
    again says nothing twice."""
    import warnings
    from contextlib import contextmanager

    import mlseg.outputs
    from mlseg.segment import segment_folder

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    disc_images(inbox, 2)
    disc_images(inbox / "case", 1)  # warned of, once
    late = disc_images(tmp_path / "later", 3, seed=5)[2]
    held = mlseg.outputs.writing_to

    @contextmanager
    def after_another_run(out_dir):
        late.rename(inbox / "img_late.png")  # came in as the run waited
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segment_folder(checkpoint, inbox, out, profile_name="he", progress=False)
        with held(out_dir) as folder:
            yield folder

    monkeypatch.setattr(mlseg.outputs, "writing_to", after_another_run)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        state = _segment(inbox, out, checkpoint)
    assert state.is_completed(), state.message
    assert pd.read_csv(out / "summary.csv")["image"].tolist() == ["img_000", "img_001", "img_late"]
    assert "img_late" in set(pd.read_parquet(out / "nuclei.parquet")["image"])
    assert state.result()["skipped"] == ["img_000", "img_001", "img_late"]
    assert sum("subfolders" in str(w.message) for w in said) == 1


def _fingerprint(tmp_path: Path, images: list[Path], params: dict | None = None) -> Path:
    from mlseg.inventory import fingerprint
    from mlseg.monitor import image_stats_table

    stats = image_stats_table(images, params=params)
    files = stats.assign(
        role="image",
        readable=True,
        split="train",
        channels=3,
        dtype="uint8",
        content_hash=[f"h{i}" for i in range(len(stats))],
    )
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(fingerprint(files, image_stats_params=params)))
    return path


def test_monitor_flow_measures_images_as_the_fingerprint_s_were(harness, tmp_path) -> None:
    """The training images failed against their own fingerprint when it recorded other
    stain vectors than the default: the flow measured them with the default ones."""
    from flows.monitor import monitor

    vectors = [[0.49, 0.80, 0.33], [0.30, 0.90, 0.31], [0.27, 0.57, 0.78]]
    train = disc_images(tmp_path / "train", 12, seed=1)
    reference = _fingerprint(tmp_path, train, {"stain_vectors": vectors})
    state = monitor(str(tmp_path / "train"), str(reference), str(tmp_path / "m"), return_state=True)
    assert state.is_completed() and state.result()["status"] == "ok"


def test_monitor_flow_reads_dapi_saved_blue_as_a_fluorescence_set_s_grey(harness, tmp_path) -> None:
    """The grey training fields of a fluorescence fingerprint, saved again in blue alone
    (training reads them as their grey files), are the training images: the flow's
    statistics task measured the files' channels, an empty red against grey."""
    from flows.monitor import monitor
    from mlseg.inventory import fingerprint
    from mlseg.io import read_image, write_image
    from mlseg.monitor import image_stats_table

    grey, blue = [], []
    for path in disc_images(tmp_path / "discs", 12, seed=1):
        field = 255 - read_image(path)[..., 1:2]  # bright nuclei on a dark ground
        saved_blue = np.zeros(field.shape[:2] + (3,), field.dtype)
        saved_blue[..., 2] = field[..., 0]
        grey.append(write_image(tmp_path / "grey" / path.name, field))
        blue.append(write_image(tmp_path / "blue" / path.name, saved_blue))
    stats = image_stats_table(grey)
    files = stats.assign(role="image", readable=True, split="train", dtype="uint8")
    reference = tmp_path / "fingerprint.json"
    reference.write_text(json.dumps(fingerprint(files, stain="fluorescence")))
    state = monitor(str(tmp_path / "blue"), str(reference), str(tmp_path / "m"), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["status"] == "ok"


def test_monitor_flow_passes_similar_images_and_fails_on_drift(harness, tmp_path) -> None:
    from flows.monitor import monitor
    from mlseg.io import read_image, write_image

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 30, seed=1))
    similar = tmp_path / "similar"
    disc_images(similar, 8, seed=2)
    ok = monitor(str(similar), str(reference), str(tmp_path / "m1"), return_state=True)
    assert ok.is_completed() and ok.result()["status"] == "ok"

    dark = tmp_path / "dark"
    for path in disc_images(tmp_path / "src", 12, seed=3):
        write_image(dark / path.name, (read_image(path) * 0.4).astype(np.uint8))
    state = monitor(str(dark), str(reference), str(tmp_path / "m2"), return_state=True)
    assert state.is_failed() and "mean_c0" in state.message
    assert (tmp_path / "m2" / "drift.csv").is_file()
    keys = set(flow_artifacts(state.state_details.flow_run_id))
    assert {"drift-report", "drift-warning"} <= keys


def test_monitor_flow_runs_over_one_drift_say_since_when_it_has_lasted(harness, tmp_path) -> None:
    """The flow overwrote drift.csv and drift.json each run: a weekly monitor failed on one
    drift each week, nothing saying it was the same. Each run now adds a row to
    drift_history.csv in its folder, a week without new images too, which neither ends
    the drift nor continues it; the second drifted run says since the first."""
    from flows.monitor import monitor
    from mlseg.io import read_image, write_image
    from mlseg.monitor import read_history

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 30, seed=1))
    dark = tmp_path / "dark"
    for path in disc_images(tmp_path / "src", 12, seed=3):
        write_image(dark / path.name, (read_image(path) * 0.4).astype(np.uint8))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "m"
    first = monitor(str(dark), str(reference), str(out), return_state=True)
    assert first.is_failed() and "Fail, new (drift_history.csv)" in first.message
    assert monitor(str(tmp_path / "empty"), str(reference), str(out)).get("status") == "skipped"
    state = monitor(str(dark), str(reference), str(out), return_state=True)
    history = read_history(out / "drift_history.csv")
    day = history["run_at"].iloc[0][:10]
    assert state.is_failed() and f"Fail since {day}, 2 runs (drift_history.csv)" in state.message
    assert history["status"].tolist() == ["fail", "skipped", "fail"]
    assert history["n_images"].tolist() == [12, 0, 12]
    assert "mean_c0" in history["fail"].iloc[2].split()
    said = json.loads((out / "drift.json").read_text())["message"]  # the report's, as well
    assert said.startswith(f"Fail since {day}, 2 runs (drift_history.csv): drift in 12 image(s)")


def test_a_retried_monitor_run_is_one_run_of_its_drift(harness, tmp_path) -> None:
    """A monitor run retried (PREFECT_FLOWS_DEFAULT_RETRIES, the dashboard's Retry) is one
    run: its retry's row replaces the failed attempt's, but the retry read that row as a
    run before it and said a new drift had lasted 2 runs, then 3."""
    from flows.monitor import monitor
    from mlseg.io import read_image, write_image
    from mlseg.monitor import read_history

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 30, seed=1))
    dark = tmp_path / "dark"
    for path in disc_images(tmp_path / "src", 12, seed=3):
        write_image(dark / path.name, (read_image(path) * 0.4).astype(np.uint8))
    out = tmp_path / "m"
    retried = monitor.with_options(retries=2, retry_delay_seconds=0)
    state = retried(str(dark), str(reference), str(out), return_state=True)
    assert state.is_failed() and "Fail, new (drift_history.csv)" in state.message
    assert len(read_history(out / "drift_history.csv")) == 1
    said = json.loads((out / "drift.json").read_text())["message"]
    assert said.startswith("Fail, new (drift_history.csv): ")


def test_a_disk_that_fills_at_drift_json_leaves_the_previous_drift_whole(
    harness, tmp_path, monkeypatch
) -> None:
    """A monitor run whose disk filled at drift.json left its drift.csv beside the previous
    run's drift.json: this run's statistics under last week's status."""
    import mlseg.io
    from flows.monitor import monitor
    from mlseg.errors import OutputError
    from mlseg.io import WRITTEN_TOGETHER_LOCK

    def files() -> dict[str, bytes]:  # all but the locks the files are written under
        locks = (WRITTEN_TOGETHER_LOCK, ".drift_history.csv.lock")
        return {p.name: p.read_bytes() for p in out.iterdir() if p.name not in locks}

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 12, seed=1))
    out = tmp_path / "m"
    disc_images(tmp_path / "week1", 6, seed=2)
    assert monitor(
        str(tmp_path / "week1"), str(reference), str(out), return_state=True
    ).is_completed()
    before = files()
    assert set(before) == {"drift.csv", "drift.json", "drift_history.csv"}
    write_text = mlseg.io.write_text

    def full(path, text):
        if Path(path).name != "drift.json":
            return write_text(path, text)
        with mlseg.io.atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlseg.io, "write_text", full)
    disc_images(tmp_path / "week2", 4, seed=5)
    state = monitor(str(tmp_path / "week2"), str(reference), str(out), return_state=True)
    assert state.is_failed()
    assert files() == before  # nothing else there, no run counted in the history
    with pytest.raises(OutputError, match="no space left on device") as caught:
        state.result()
    assert str(caught.value).startswith(f"{out}: ")


def test_each_image_statistics_task_run_is_named_after_its_images(harness, tmp_path) -> None:
    """The monitor's batches were all listed as image-stats-<3 random characters>."""
    from flows.monitor import monitor

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 6, seed=1))
    disc_images(tmp_path / "new", 5, seed=2)
    state = monitor(
        str(tmp_path / "new"), str(reference), str(tmp_path / "m"), batch_size=2, return_state=True
    )
    assert state.is_completed(), state.message
    assert task_run_names(state.state_details.flow_run_id) == [
        "stats img_000.png +1",
        "stats img_002.png +1",
        "stats img_004.png",
    ]


def test_a_drift_warning_is_logged_at_warning_level(harness, tmp_path) -> None:
    """A drifted batch below psi_fail ends Completed; its 'drift warn' line was logged at
    INFO, under a dashboard or alert that filters the logs for warnings."""

    from flows.monitor import monitor
    from mlseg.io import read_image, write_image

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 30, seed=1))
    dark = tmp_path / "dark"
    for path in disc_images(tmp_path / "src", 12, seed=3):
        write_image(dark / path.name, (read_image(path) * 0.4).astype(np.uint8))
    state = monitor(
        str(dark),
        str(reference),
        str(tmp_path / "m"),
        overrides={"monitor": {"psi_fail": 1000}},
        return_state=True,
    )
    assert state.is_completed() and state.result()["status"] == "warn"
    warned = flow_logs(state.state_details.flow_run_id, logging.WARNING)
    assert any(m.startswith("drift warn: ") and "mean_c0" in m for m in warned), warned
    # and the dashboard's warning, as a failed run has, not a table to open to find it
    assert "drift-warning" in flow_artifacts(state.state_details.flow_run_id)


def test_monitor_flow_on_an_empty_inbox_is_nothing_to_compare(harness, tmp_path) -> None:
    """The weekly monitor ended Failed (an alert) on a week without new slides, where
    segment-and-quantify finds nothing to do; a folder that does not exist, or one whose
    images are only in subfolders, still fails."""
    from flows.monitor import monitor

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 6, seed=1))
    (tmp_path / "inbox").mkdir()
    state = monitor(str(tmp_path / "inbox"), str(reference), str(tmp_path / "m"), return_state=True)
    assert state.is_completed() and state.result()["status"] == "skipped"
    # since_days without results has no records to tell the week's images by
    half = monitor(
        str(tmp_path / "inbox"), str(reference), str(tmp_path / "m"), since_days=7,
        return_state=True,
    )  # fmt: skip
    assert half.is_failed() and "since_days needs results" in half.message
    missing = monitor(
        str(tmp_path / "nowhere"), str(reference), str(tmp_path / "m"), return_state=True
    )
    assert missing.is_failed() and "not found" in missing.message
    # an inbox reorganised into a folder per case is no week without slides: it was
    # compared with nothing and passed, every week
    disc_images(tmp_path / "cases" / "case1", 1)
    nested = monitor(
        str(tmp_path / "cases"), str(reference), str(tmp_path / "m"), return_state=True
    )
    assert nested.is_failed() and "only in its subfolders (case1)" in nested.message


def test_the_monitor_publishes_the_latest_50_runs_of_the_history(harness, tmp_path) -> None:
    """The run-history artifact is the table a dashboard shows each week: the latest 50
    runs of segment-and-quantify, the latest last, not the first 50 nor every run since
    the start."""
    from flows.monitor import monitor

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 6, seed=1))
    (tmp_path / "inbox").mkdir()
    history = tmp_path / "runs" / "history.csv"
    history.parent.mkdir()
    runs = [f"run{i:02d}" for i in range(60)]
    pd.DataFrame({"run_id": runs, "n_images": 1}).to_csv(history, index=False)
    state = monitor(
        str(tmp_path / "inbox"),
        str(reference),
        str(tmp_path / "m"),
        history=str(history),
        return_state=True,
    )
    assert state.is_completed() and state.result()["history"] == str(history)
    rows = artifact_rows(state.state_details.flow_run_id, "run-history")
    assert [row["run_id"] for row in rows] == runs[-50:]


def test_an_empty_path_parameter_is_refused_by_name(
    harness, tmp_path, checkpoint, monkeypatch
) -> None:
    """A path field cleared in the dashboard (``-p out_dir=``) was the data folder itself:
    a deployed segment run wrote its 6 files per image, summary.csv and run.json among the
    datasets of /data and completed, and an empty input_dir completed with 'no images in
    /data: nothing to do'. Either now fails before any work, naming the parameter."""
    from flows.common import data_path

    data = tmp_path / "data"
    disc_images(data / "inbox", 1)
    monkeypatch.setenv("MLSEG_DATA_DIR", str(data))
    state = _segment("inbox", "", checkpoint)
    assert state.is_failed() and "parameter 'out_dir' is empty" in state.message, state.message
    assert sorted(p.name for p in data.iterdir()) == ["inbox"]
    state = _segment(" ", "results", checkpoint)
    assert state.is_failed() and "parameter 'input_dir' is empty" in state.message, state.message
    assert not (data / "results").exists()
    assert data_path(".") == data  # the data folder itself, said so


def test_flows_take_relative_paths_under_the_data_folder(
    harness, tmp_path, checkpoint, synth_dataset, monkeypatch
) -> None:
    """A deployed worker runs each flow in a fresh temporary folder with MLSEG_DATA_DIR=/data:
    relative path parameters (prefect.yaml's defaults) mean paths under the data folder."""
    import shutil

    from flows.evaluate import evaluate_model
    from flows.monitor import monitor

    data = tmp_path / "data"
    (data / "validation").mkdir(parents=True)
    _fingerprint(data / "validation", disc_images(data / "train", 10, seed=1))
    disc_images(data / "inbox", 6, seed=2)
    shutil.copytree(checkpoint, data / "model")
    shutil.copytree(synth_dataset, data / "dataset")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLSEG_DATA_DIR", str(data))
    state = monitor(
        "inbox",
        "validation/fingerprint.json",
        "monitoring",
        history="runs/none.csv",
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert (data / "monitoring" / "drift.csv").is_file()
    state = evaluate_model("model", "dataset", "runs/evaluate", return_state=True)
    assert state.is_completed(), state.message
    assert (data / "runs" / "evaluate").is_dir() and not any(elsewhere.iterdir())


def test_a_relative_config_parameter_is_under_the_data_folder(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """`-p config=configs/run.yaml` was read from the worker's temporary folder ('config file
    not found') while every other relative path parameter is under MLSEG_DATA_DIR; so was
    validate-dataset's default output folder."""
    from flows.monitor import monitor
    from flows.validate import validate_dataset_flow

    data = tmp_path / "data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "run.yaml").write_text("monitor: {min_images: 50}\n")
    _fingerprint(data, disc_images(data / "train", 6, seed=1))
    disc_images(data / "inbox", 6, seed=2)
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLSEG_DATA_DIR", str(data))
    state = monitor(
        "inbox", "fingerprint.json", "monitoring", config="configs/run.yaml", return_state=True
    )
    assert state.is_completed(), state.message
    notes = pd.read_csv(state.result()["drift_csv"])["note"].astype(str)
    assert notes.str.contains("min_images=50").any()  # the config was read
    state = validate_dataset_flow(str(synth_dataset), config="configs/run.yaml", return_state=True)
    assert state.is_completed(), state.message
    assert (data / "validation" / synth_dataset.name / "fingerprint.json").is_file()
    assert not any(elsewhere.iterdir())


def test_paths_inside_a_run_config_are_under_the_data_folder(tmp_path, monkeypatch) -> None:
    """A deployed run config (`-p config=configs/run.yaml`, read under MLSEG_DATA_DIR) naming
    `profiles_file: lab.yaml` or a `preprocess.stain_reference` had them read from the
    worker's temporary folder: 'not found', or another file of that name there. They are
    under MLSEG_DATA_DIR, as every relative path parameter and the config itself."""
    from flows.common import run_config
    from mlseg.config import get_profile

    data, elsewhere = tmp_path / "data", tmp_path / "worker-cwd"
    for folder, size in ((data, 0.25), (elsewhere, 0.5)):
        (folder / "configs").mkdir(parents=True)
        profiles = {"profiles": {"lab": {"stain": "he", "pixel_size_um": size}}}
        (folder / "lab.yaml").write_text(yaml.safe_dump(profiles))
    (data / "configs" / "run.yaml").write_text(
        "profile: lab\nprofiles_file: lab.yaml\n"
        "preprocess: {stain_norm: macenko, stain_reference: refs/ref.png}\n"
    )
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLSEG_DATA_DIR", str(data))
    cfg = run_config("configs/run.yaml")
    assert cfg.profiles_file == data / "lab.yaml"
    assert get_profile(cfg.profile, cfg.profiles_file).pixel_size_um == 0.25  # not the cwd's
    assert cfg.preprocess.stain_reference == data / "refs" / "ref.png"
    given = run_config(None, {"preprocess": {"stain_reference": "/abs/ref.png"}})
    assert given.preprocess.stain_reference == Path("/abs/ref.png")  # absolute: as given
    monkeypatch.delenv("MLSEG_DATA_DIR")  # a local run: the current folder, as mlseg train
    assert run_config(str(data / "configs" / "run.yaml")).profiles_file == Path("lab.yaml")


def test_validation_reads_a_run_config_s_profiles_file_under_the_data_folder(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """validate-dataset (and train-model, which runs it first) with `-p config=configs/run.yaml`
    naming `profiles_file: lab.yaml` failed on a worker with 'lab.yaml: profiles file not
    found ... read from the current folder, /tmp/tmp...prefect': the validation config read
    the profiles file from the worker's temporary folder, where run_config reads it under
    MLSEG_DATA_DIR, as the README says. The stain validation uses is the data folder's."""
    from flows.validate import validate_dataset_flow

    data, elsewhere = tmp_path / "data", tmp_path / "worker-cwd"
    (data / "configs").mkdir(parents=True)
    elsewhere.mkdir()
    profiles = {"profiles": {"lab": {"stain": "ihc", "pixel_size_um": 0.5}}}
    (data / "lab.yaml").write_text(yaml.safe_dump(profiles))
    (data / "configs" / "run.yaml").write_text("profile: lab\nprofiles_file: lab.yaml\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLSEG_DATA_DIR", str(data))
    state = validate_dataset_flow(
        str(synth_dataset), "validation", config="configs/run.yaml", return_state=True
    )
    assert state.is_completed(), state.message
    saved = json.loads((data / "validation" / "validate_config.json").read_text())
    assert saved["stain"] == "ihc"  # the data folder's profile, not the default he
    assert not any(elsewhere.iterdir())


def test_a_url_where_a_file_is_read_is_named_as_a_url(harness, tmp_path, monkeypatch) -> None:
    """Only a registry is read from a URL. `-p fingerprint=s3://bucket/fingerprint.json` failed
    with '<MLSEG_DATA_DIR>/s3:/bucket/fingerprint.json: fingerprint not found', a path no one
    gave, and the README said URLs in parameters are used as given."""
    from flows.common import data_path
    from flows.monitor import monitor

    monkeypatch.setenv("MLSEG_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="^s3://bucket/inbox: only a registry is read from a URL"):
        data_path("s3://bucket/inbox")
    state = monitor("inbox", "s3://bucket/fingerprint.json", "monitoring", return_state=True)
    assert state.is_failed()
    assert "s3://bucket/fingerprint.json: only a registry is read from a URL" in state.message


def test_pipeline_can_train_afresh_where_a_resume_is_refused(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """New data in the same work_dir (pipeline/full's default) is refused by a resume, and
    the pipeline always resumed: no run could retrain after the dataset changed, while the
    error said 'pass --no-resume'. ``resume=False`` reaches training."""
    import flows.pipeline as module

    seen = {}

    def train_model(data_root, out_dir, config, overrides, fingerprint_hash, resume, progress):
        seen["resume"] = resume
        raise RuntimeError("stop after recording the call")

    monkeypatch.setattr(module, "train_model", train_model)
    state = module.pipeline(
        str(synth_dataset), str(tmp_path / "work"), overrides=TINY, resume=False, return_state=True
    )
    assert state.is_failed() and "stop after recording" in state.message
    assert seen == {"resume": False}


def test_the_pipeline_measures_with_the_version_its_decision_left_in_production(
    harness, tmp_path, synth_dataset, checkpoint, monkeypatch
) -> None:
    """A version promoted by hand while the pipeline ran, after its champion/challenger
    decision: the pipeline looked production up again to segment the test images, so they
    were measured with that version while the report named the one the decision left."""
    import flows.pipeline as module
    from mlseg import registry as reg

    registry, means = str(tmp_path / "registry"), {"dice": 0.5, "aji": 0.5, "pq": 0.5}
    config = json.loads((checkpoint / "config.json").read_text())
    for weights in (checkpoint, tiny_checkpoint(tmp_path / "other", seed=1)):
        reg.register(
            weights, registry, metrics=means, fingerprint_hash="test", config=config,
            eval_set_id="tests", name="nuclei",
        )  # fmt: skip
    reg.promote(registry, "nuclei", 1, "the model this pipeline trained again")
    decided, seen = module._check_production, {}

    def promoted_by_hand(*args, **kwargs):
        decided(*args, **kwargs)
        reg.promote(registry, "nuclei", 2, "a colleague, meanwhile")

    def segment_and_quantify(*args, **kwargs):
        seen["version"] = reg.show(registry, "nuclei", kwargs["model_version"]).version
        raise RuntimeError("stop after recording the call")

    validated = {"outputs": {"fingerprint": ""}, "fingerprint_hash": "test"}
    monkeypatch.setattr(module, "validate_dataset_flow", lambda *a, **k: validated)
    monkeypatch.setattr(module, "train_model", lambda *a, **k: {"checkpoint": str(checkpoint)})
    evaluated = {"means": means, "eval_set_id": "tests"}
    monkeypatch.setattr(module, "evaluate_model", lambda *a, **k: evaluated)
    monkeypatch.setattr(module, "_check_production", promoted_by_hand)
    monkeypatch.setattr(module, "segment_and_quantify", segment_and_quantify)
    state = module.pipeline(
        str(synth_dataset), str(tmp_path / "work"), registry=registry, return_state=True
    )
    assert state.is_failed() and "stop after recording" in state.message
    assert seen == {"version": 1}


def test_failed_validation_stops_the_pipeline_before_training(harness, tmp_path) -> None:
    from flows.pipeline import pipeline

    data = tmp_path / "broken"
    disc_images(data / "train" / "original", 2)
    disc_images(data / "test" / "original", 1)  # no masks at all
    (data / "train" / "masks").mkdir()
    (data / "test" / "masks").mkdir()
    state = pipeline(str(data), str(tmp_path / "work"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationFailed):
        state.result()
    assert not (tmp_path / "work" / "train").exists()


def test_the_train_flow_alone_validates_before_training(harness, tmp_path, leaked_dataset) -> None:
    """The train deployment (no fingerprint from a validate run) trained on anything; now it
    validates first, and a failed check stops it before any step."""
    from flows.train import train_model

    state = train_model(
        str(leaked_dataset), str(tmp_path / "run"), overrides=TINY, return_state=True
    )
    assert state.is_failed() and "no_train_test_leakage" in state.message
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_the_train_flow_logs_each_epoch_to_the_dashboard(
    harness, tmp_path, synth_dataset, task_logs_at_info
) -> None:
    """A long training run logged nothing between its start and its end."""
    from flows.train import train_model

    state = train_model(
        str(synth_dataset), str(tmp_path / "run"), overrides=TINY, return_state=True
    )
    assert state.is_completed()
    logs = flow_logs(state.state_details.flow_run_id, logging.INFO)
    assert any(line.startswith("epoch 2 step 4: loss=") for line in logs), logs
    # and, as mlseg train prints it, the pixel size the model was trained at
    assert state.result()["scale"].startswith("pixel size: ")


def test_the_evaluate_flow_says_how_far_it_is_in_its_run_log(
    harness, tmp_path, checkpoint, synth_dataset, ticking, task_logs_at_info
) -> None:
    """A deployed evaluation of a large test set (in the pipeline too) logged nothing for
    hours, as a hung run; a line a minute goes to the run's log now, as mlseg evaluate writes
    it to a job's log."""
    from flows.evaluate import evaluate_model

    def said(out: str) -> list[str]:
        state = evaluate_model(
            str(checkpoint), str(synth_dataset), str(tmp_path / out), return_state=True
        )
        assert state.is_completed(), state.message
        logs = flow_logs(state.state_details.flow_run_id, logging.INFO)
        return [line for line in logs if line.startswith("evaluate test:")]

    ticking(50)  # each image 50 s on the clock the lines read
    assert said("long") == [
        "evaluate test: 2/3 images (66%), 2 min elapsed, under a minute left",
        "evaluate test: 3/3 images (100%), 3 min elapsed",
    ]


def test_a_promote_metric_that_is_no_score_stops_the_pipeline_before_any_work(
    harness, tmp_path, synth_dataset
) -> None:
    """promote_metric 'AJI' validated, trained, evaluated and registered, then failed on
    'no metric recorded'; count_error would promote the model that counts most."""
    from flows.pipeline import pipeline

    for metric in ("AJI", "count_error"):
        work = tmp_path / metric
        state = pipeline(
            str(synth_dataset), str(work), overrides=TINY, promote_metric=metric, return_state=True
        )
        assert state.is_failed() and f"promote_metric {metric!r}: choose a" in state.message
        assert not work.exists()


@pytest.mark.parametrize(
    ("parameters", "said"),
    [
        ({"task_runner": "threads"}, "task runner 'threads': choose one of thread, dask"),
        ({"workers": -2}, "workers must be at least 1"),
        ({"workers": 0}, "workers must be at least 1, got 0"),
        ({"pixel_size_um": 250}, "pixel_size_um: 250 um per pixel is outside"),
        ({"model_name": "Nuclei"}, "model name 'Nuclei': use lower-case"),
        (
            {"overrides": {"train": {"arch": "Unett"}}},
            "train.arch: unknown architecture 'Unett'",
        ),
    ],
)
def test_a_later_stage_s_bad_parameter_stops_the_pipeline_before_any_work(
    harness, tmp_path, synth_dataset, monkeypatch, parameters, said
) -> None:
    """A typo in a parameter of segmentation or registration (task_runner 'threads', a pixel
    size in nanometres) validated, trained, evaluated, registered and promoted the model,
    then failed the run at the segment stage."""
    import flows.pipeline as module

    def validate_dataset_flow(*args, **kwargs):
        raise RuntimeError("the pipeline started its work")

    monkeypatch.setattr(module, "validate_dataset_flow", validate_dataset_flow)
    work = tmp_path / "work"
    parameters = {"overrides": TINY, **parameters}
    state = module.pipeline(str(synth_dataset), str(work), return_state=True, **parameters)
    assert state.is_failed() and said in state.message, state.message
    assert not work.exists()


def test_a_registry_version_given_as_a_number_on_the_command_line_is_taken(
    harness, tmp_path, checkpoint
) -> None:
    """`prefect deployment run segment-and-quantify/nightly-he -p model_version=3` (a roll
    back to version 3) sends the number 3, which the parameter schema (a string) refused:
    'Validation failed for field 'model_version'. Failure reason: 3 is not of type 'string''."""
    import json as _json

    from prefect.cli._utilities import load_json_key_values
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from flows.segment import segment_and_quantify
    from mlseg import registry as reg

    registry = tmp_path / "registry"
    config = _json.loads((checkpoint / "config.json").read_text())
    for _ in range(2):  # v1 and v2 hold the same weights; v2 is in production
        version = reg.register(
            checkpoint,
            registry,
            metrics={"aji": 0.5},
            fingerprint_hash=None,
            config=config,
            eval_set_id="set",
        )
    reg.promote(registry, version.name, version.version, "test")
    given = load_json_key_values(["model_version=1"], "parameter")
    assert given == {"model_version": 1}
    schema = parameter_schema(segment_and_quantify.fn).model_dump_for_openapi()
    # as the server checks a deployment's run: its parameters with those given on top
    validate({"input_dir": "in", "out_dir": "out", **given}, schema, raise_on_error=True)
    disc_images(tmp_path / "inbox", 1)
    state = _segment(tmp_path / "inbox", tmp_path / "out", None, registry=str(registry), **given)
    assert state.is_completed(), state.message
    assert state.result()["model"] == "nuclei@v1"


def test_models_which_names_the_version_the_flow_served(
    harness, tmp_path, checkpoint, capsys
) -> None:
    """The flow's run.json names the registry version it served (model_source) beside the
    weights' hash; `mlseg models which` on its output finds both versions holding those
    weights and says which one the run served."""
    import json as _json

    from mlseg import registry as reg
    from mlseg.cli import main

    registry = tmp_path / "registry"
    config = _json.loads((checkpoint / "config.json").read_text())
    for _ in range(2):  # v1 and v2 hold the same weights
        reg.register(
            checkpoint,
            registry,
            metrics={"aji": 0.5},
            fingerprint_hash="fp",
            config=config,
            eval_set_id="set",
        )
    reg.promote(registry, "nuclei", 2, "test")
    disc_images(tmp_path / "inbox", 1)
    state = _segment(tmp_path / "inbox", tmp_path / "out", None, registry=str(registry))
    assert state.is_completed(), state.message
    capsys.readouterr()
    assert main(["models", "which", str(tmp_path / "out"), "-r", str(registry)]) == 0
    said = capsys.readouterr().out
    assert "nuclei@v2 (production, the one the run served)" in said
    assert "nuclei@v1 (registered, not in production)," in said


def test_the_evaluate_flow_names_a_split_that_is_neither_train_nor_test(
    harness, tmp_path, checkpoint, synth_dataset
) -> None:
    """split 'val' (or 'Train') scored the test images and published 'means over 3 val
    images'; the dashboard's form now offers train and test, and another value fails the
    run naming the parameter, before any work."""
    from prefect.utilities.callables import parameter_schema

    from flows.evaluate import evaluate_model

    schema = parameter_schema(evaluate_model.fn).model_dump_for_openapi()
    assert schema["properties"]["split"]["enum"] == ["train", "test"]
    for split in ("val", "Train"):
        out = tmp_path / split
        state = evaluate_model(
            str(checkpoint), str(synth_dataset), str(out), split=split, return_state=True
        )
        assert state.is_failed() and "split" in state.message, state.message
        assert not out.exists()


def test_empty_inbox_is_nothing_to_do(harness, tmp_path, checkpoint) -> None:
    (tmp_path / "inbox").mkdir()
    state = _segment(tmp_path / "inbox", tmp_path / "out", checkpoint)
    assert state.is_completed() and state.result()["processed"] == []
    missing = _segment(tmp_path / "nowhere", tmp_path / "out", checkpoint)
    assert missing.is_failed() and "input folder not found" in missing.message


def test_an_inbox_of_subfolders_is_refused_as_segment_refuses_it(
    harness, tmp_path, checkpoint
) -> None:
    """An inbox reorganised into a folder per case (images only in subfolders): the
    deployed nightly run logged 'no images in .../cases: nothing to do' and completed, every
    night, where mlseg segment refuses it, naming the subfolders; the flow now fails as it
    does. An inbox whose only subfolder is the run's output folder is still empty."""
    inbox = tmp_path / "cases"
    disc_images(inbox / "case1", 1)
    disc_images(inbox / "case2", 1)
    state = _segment(inbox, tmp_path / "out", checkpoint)
    assert state.is_failed(), state.message
    assert "only in its subfolders (case1, case2)" in state.message
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    disc_images(empty / "out", 1)  # earlier outputs' overlays, inside the inbox
    state = _segment(empty, empty / "out", checkpoint)
    assert state.is_completed() and state.result()["processed"] == []


def test_one_pixel_size_beside_a_table_warns_as_segment_does(harness, tmp_path, checkpoint) -> None:
    """pixel_size_um beats the table for every image, as in mlseg segment, which says so."""
    disc_images(tmp_path / "inbox", 1)
    with pytest.warns(UserWarning, match="used instead of the pixel-size table's sizes for 1"):
        state = _segment(
            tmp_path / "inbox",
            tmp_path / "out",
            checkpoint,
            pixel_size_um=0.5,
            pixel_sizes={"img_000.png": 0.25},
        )
    assert state.is_completed(), state.message
    assert "segment-no-pixel-size" not in flow_artifacts(state.state_details.flow_run_id)


def test_mlseg_warnings_are_in_the_run_log(harness, tmp_path, checkpoint) -> None:
    """What mlseg warns of reaches the run's logs, which the dashboard shows, from the flow
    (a pixel-size table naming none of the images) and from a batch task (a sidecar's
    implausible size, ignored); a deployed run's warnings went to the worker's stderr only."""

    disc_images(tmp_path / "inbox", 1)
    (tmp_path / "inbox" / "img_000.json").write_text(json.dumps({"pixel_size_um": 50}))
    with pytest.warns(UserWarning):
        state = _segment(
            tmp_path / "inbox", tmp_path / "out", checkpoint, pixel_sizes={"other": 0.5}
        )
    assert state.is_completed(), state.message
    warned = flow_logs(state.state_details.flow_run_id, logging.WARNING)
    assert any("names none of these 1 images" in m for m in warned), warned
    assert any("img_000.png (50 um)" in m for m in warned), warned


def test_name_value_artifacts_show_numbers_rounded_and_a_missing_one_blank(harness) -> None:
    """The run metrics, evaluation means and model decision read 1.5079083829987212 and
    'nan' in the dashboard, where every other table rounds and leaves a missing number blank."""
    from prefect import flow

    from flows import artifacts

    @flow
    def publish() -> None:
        values = {"seconds": 1.5079083829987212, "psi": float("nan"), "lr": 3e-05}
        artifacts.table("numbers", {**values, "images": 3, "champion": None})

    state = publish(return_state=True)
    rows = artifact_rows(state.state_details.flow_run_id, "numbers")
    shown = {row["name"]: row["value"] for row in rows}
    assert shown == {"seconds": 1.5079, "psi": None, "lr": 3e-05, "images": "3", "champion": "None"}


def test_training_history_artifact_gives_the_best_dice_rounded(
    harness, tmp_path, monkeypatch
) -> None:
    import flows.train as module

    history = tmp_path / "history.csv"
    pd.DataFrame({"step": [2], "val_dice": [0.3533]}).to_csv(history, index=False)
    result = {
        "checkpoint": str(tmp_path / "best.safetensors"),
        "checkpoint_dir": str(tmp_path),
        "best_val_dice": 0.3533359652585867,
        "steps": 2,
        "images_per_s": 8.7,
        "history_csv": str(history),
        "curves_png": str(tmp_path / "training_curves.png"),
        "out_dir": str(tmp_path),
    }
    monkeypatch.setattr(module, "fit_task", lambda *args: result)
    state = module.train_model(
        str(tmp_path), str(tmp_path / "run"), fingerprint_hash="x", return_state=True
    )
    found = flow_artifacts(state.state_details.flow_run_id)
    assert found["training-history"].description.endswith("best validation Dice 0.3533")


def test_micron_units_no_image_can_have_fail_the_flow_before_any_work(
    harness, tmp_path, checkpoint
) -> None:
    """As mlseg segment: one error up front, not the same failure for every image."""
    disc_images(tmp_path / "inbox", 3)
    state = _segment(
        tmp_path / "inbox", tmp_path / "out", checkpoint, profile_overrides={"units": "um"}
    )
    assert state.is_failed() and "micron units" in str(state.message)
    assert not (tmp_path / "out").exists()


def test_zero_workers_fails_the_segment_flow_before_any_work(harness, tmp_path, checkpoint):
    """A deployment's `workers: 0` segmented the inbox on the default threads unsaid."""
    disc_images(tmp_path / "inbox", 2)
    state = _segment(tmp_path / "inbox", tmp_path / "out", checkpoint, workers=0)
    assert state.is_failed() and "workers must be at least 1, got 0" in str(state.message)
    assert not (tmp_path / "out").exists()


TINY = {
    "train": {
        "encoder": "resnet18",
        "encoder_depth": 3,
        "patch_size": 64,
        "batch_size": 2,
        "max_steps": 4,
        "val_every": 2,
        "warmup_steps": 1,
        "device": "cpu",
    },
    "inference": {"tile_size": 64, "batch_size": 4, "device": "cpu"},
}


@pytest.mark.slow
def test_pipeline_end_to_end_then_a_challenger(harness, tmp_path, synth_dataset) -> None:
    from flows.pipeline import pipeline
    from mlseg import registry as reg

    registry = tmp_path / "registry"
    # a first model that finds no nucleus is never promoted: 12 steps at a higher rate find
    # some (4 at the default rate find none)
    seeing = {**TINY, "train": {**TINY["train"], "max_steps": 12, "lr": 3e-3}}
    first = pipeline(
        str(synth_dataset), str(tmp_path / "w1"), overrides=seeing, registry=str(registry)
    )
    report = Path(first["report"]).read_text()
    assert "Worst" in report and report.count("data:image/png;base64,") >= 2
    assert pd.read_csv(first["measurements (per image)"])["count"].notna().all()
    assert reg.production(registry).version == 1
    assert first["decision"]["promoted"]

    again = pipeline(
        str(synth_dataset), str(tmp_path / "w1"), overrides=seeing, registry=str(registry)
    )
    assert len(reg.list_models(registry)) == 1  # same weights: no second version

    other = {**seeing, "train": {**seeing["train"], "seed": 1}}
    second = pipeline(
        str(synth_dataset), str(tmp_path / "w2"), overrides=other, registry=str(registry)
    )
    versions = reg.list_models(registry)
    assert len(versions) == 2
    best = max(versions, key=lambda v: (v.metrics["aji"], -v.version))
    assert reg.production(registry).version == best.version
    assert second["decision"]["reason"] and again["decision"]["reason"]


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_outputs_as_threads(
    harness, tmp_path, checkpoint
) -> None:
    inbox = tmp_path / "inbox"
    disc_images(inbox, 4)
    threads = _segment(inbox, tmp_path / "threads", checkpoint, task_runner="thread")
    dask = _segment(inbox, tmp_path / "dask", checkpoint, task_runner="dask", workers=2)
    assert threads.is_completed() and dask.is_completed(), dask.message
    for name in ("img_000_labels.png", "img_003_nuclei.csv"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()


def test_a_pipeline_left_without_a_production_model_says_why(tmp_path) -> None:
    """A first model that found no nucleus in any test image is not promoted, and the
    pipeline's segment step then failed with "no production version; promote one", not
    saying why; it now stops after the decision, naming it."""
    from flows.pipeline import _check_production
    from mlseg.registry import RegistryError

    blind = {"promoted": False, "reason": "nuclei@v1 found no nucleus in any image of eval set x"}
    with pytest.raises(RegistryError, match=r"no production model 'nuclei'.*found no nucleus"):
        _check_production(str(tmp_path / "registry"), "nuclei", blind)
    _check_production(str(tmp_path / "registry"), "nuclei", {**blind, "promoted": True})


def test_the_pipeline_s_promotion_follows_its_metric_margin_and_champion_score(
    tmp_path, checkpoint
) -> None:
    """register-and-promote decides on the promote_metric, min_improvement and champion
    score it is given: every pipeline test ran with the defaults (aji, 0, the champion's
    recorded score), so any of them dropped on the way would still pass them."""
    from flows.pipeline import register_task

    registry = str(tmp_path / "registry")

    def register(weights, means, metric, margin, champion=None):  # weights: a folder
        return register_task.fn(
            str(weights / "best.safetensors"), registry, "nuclei", means, "set", "h", metric,
            margin, champion,
        )["decision"]["promoted"]  # fmt: skip

    assert register(checkpoint, {"aji": 0.5, "dice": 0.5}, "aji", 0.0)  # first model
    # better Dice, worse AJI: promoted where Dice decides
    assert register(tiny_checkpoint(tmp_path / "m2", seed=1), {"aji": 0.4, "dice": 0.9}, "dice", 0)
    # better by 0.02 where 0.05 is asked: the champion stays
    assert not register(
        tiny_checkpoint(tmp_path / "m3", seed=2), {"aji": 0.9, "dice": 0.92}, "dice", 0.05
    )
    # better than the champion's recorded Dice (0.9), not than its score measured now
    assert not register(
        tiny_checkpoint(tmp_path / "m4", seed=3), {"aji": 0.9, "dice": 0.93}, "dice", 0.0,
        {"aji": 0.9, "dice": 0.95},
    )  # fmt: skip


def test_the_report_shows_no_earlier_run_s_drift_as_this_one_s(tmp_path) -> None:
    """A pipeline rerun whose monitor failed on a full disk before drift.json: its report
    read the drift.json of the run before and said 'Monitoring OK'."""
    from prefect.states import Completed, Failed

    from flows.pipeline import _drift
    from mlseg.errors import OutputError
    from mlseg.monitor import DriftDetected

    path = tmp_path / "drift.json"
    path.write_text(json.dumps({"status": "ok", "message": "last week's"}))
    full = OutputError(f"{path}: cannot be written (no space left on device)")
    assert _drift(path, Failed(data=full)) == {}
    assert _drift(path, Completed(data={"status": "skipped", "n_images": 0})) == {}
    # written by this run: its drift, passed or failed
    assert _drift(path, Completed(data={"status": "ok", "drift_json": str(path)}))["status"] == "ok"
    assert _drift(path, Failed(data=DriftDetected("x: drift")))["message"] == "last week's"


def test_pipeline_helpers_carry_the_run_settings_to_every_stage(tmp_path, checkpoint) -> None:
    """The pipeline's profile reaches training and evaluation (they read the run config),
    the run's data overrides reach validation and its inference settings reach evaluation."""
    from flows.common import run_config
    from flows.pipeline import _inference, _with_profile
    from flows.segment import inference_settings
    from mlseg.config import default_profiles_path, get_profile
    from mlseg.inventory import load_validate_config

    packaged = yaml.safe_load(default_profiles_path().read_text())
    overrides = _with_profile(None, {"train": {"max_steps": 3}}, "fluorescence", packaged)
    cfg = run_config(None, overrides)
    assert cfg.profile == "fluorescence" and cfg.train.max_steps == 3
    assert get_profile(cfg.profile, cfg.profiles_file).stain == "fluorescence"
    changed = json.dumps({"profiles": {"fluorescence": {"stain": "fluorescence", "channels": 3}}})
    with pytest.raises(ConfigError, match="profile 'fluorescence' differs from the one in"):
        _with_profile(None, None, "fluorescence", changed)
    with pytest.raises(ConfigError, match="not valid JSON"):
        _with_profile(None, None, "he", "{not json")
    suffix = load_validate_config(None, overrides={"data": {"mask_suffix": "_lbl"}})
    assert suffix.data.mask_suffix == "_lbl"
    run = run_config(None, {"inference": {"tile_size": 96}})
    assert _inference(run) == {"tile_size": 96} and _inference(run_config(None)) is None
    merged = inference_settings(str(checkpoint), {"tile_size": 96})
    assert merged.tile_size == 96 and merged.auto_scale is False  # the model's own, kept


def test_pipeline_measures_with_the_run_config_s_profiles_file(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """A run config's profiles_file, which mlseg train reads, was not the pipeline's: a
    profile of its own stopped the run before any work ('unknown profile'), and one named
    as a packaged profile was measured and preprocessed as the packaged one."""
    import flows.pipeline as module
    from flows.common import resolve_profile
    from mlseg.config import default_profiles_path

    lab = yaml.safe_load(default_profiles_path().read_text())["profiles"]["he"]
    lab["preprocess"] = {"stain_norm": "none"}  # the packaged he: macenko
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump({"profiles": {"lab": lab}}))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"profile": "lab", "profiles_file": str(tmp_path / "lab.yaml")})
    )
    seen = {}

    def segment_and_quantify(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after recording the call")

    validated = {"outputs": {"fingerprint": "f"}, "fingerprint_hash": "h"}
    stages = {
        "validate_dataset_flow": lambda *args, **kwargs: validated,
        "train_model": lambda *args: {"checkpoint": "c"},
        "evaluate_model": lambda *args, **kwargs: {"eval_set_id": "e", "means": {}},
        "_champion_needs_eval": lambda *args: None,
        "register_task": lambda *args: {
            "decision": {"reason": "r", "promoted": True},
            "production_version": 1,
        },
        "segment_and_quantify": segment_and_quantify,
    }
    for name, stub in stages.items():
        monkeypatch.setattr(module, name, stub)
    work = tmp_path / "work"
    state = module.pipeline(str(synth_dataset), str(work), config=str(config), return_state=True)
    assert state.is_failed() and "stop after recording" in state.message, state.message
    measured = resolve_profile(seen["profile"], seen["profiles"])
    assert measured.name == "lab" and measured.preprocess.stain_norm == "none"
    assert json.loads((work / "preprocess.json").read_text())["stain_norm"] == "none"


def test_the_pipeline_hands_its_metric_margin_and_the_champion_s_score_to_the_decision(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """The pipeline flow's promote_metric and min_improvement, and the champion's score
    measured on this run's evaluation set, reach register-and-promote: the task decides on
    what it is given, and every pipeline test ran on the defaults (aji, 0, no champion), so
    a flow that dropped or swapped any of them still passed them."""
    import flows.pipeline as module

    champion, measured, seen = object(), {"aji": 0.7, "dice": 0.8}, {}
    signature = inspect.signature(module.register_task.fn)

    def register_task(*args, **kwargs):
        seen.update(signature.bind(*args, **kwargs).arguments)
        return {"decision": {"reason": "r", "promoted": True}, "production_version": 1}

    def segment_and_quantify(*args, **kwargs):
        raise RuntimeError("stop after recording the call")

    validated = {"outputs": {"fingerprint": "f"}, "fingerprint_hash": "h"}
    evaluated = {"eval_set_id": "e", "means": {"aji": 0.6, "dice": 0.9}}
    stages = {
        "validate_dataset_flow": lambda *args, **kwargs: validated,
        "train_model": lambda *args: {"checkpoint": "c"},
        "evaluate_model": lambda *args, **kwargs: evaluated,
        "_champion_needs_eval": lambda *args: champion,
        "_score_champion": lambda registry, found, *args: measured if found is champion else {},
        "register_task": register_task,
        "segment_and_quantify": segment_and_quantify,
    }
    for name, stub in stages.items():
        monkeypatch.setattr(module, name, stub)
    state = module.pipeline(
        str(synth_dataset), str(tmp_path / "work"), overrides=TINY, promote_metric="dice",
        min_improvement=0.05, return_state=True,
    )  # fmt: skip
    assert state.is_failed() and "stop after recording" in state.message, state.message
    assert seen["metric"] == "dice" and seen["min_improvement"] == 0.05
    assert seen["champion_metrics"] == measured
    assert seen["metrics"] == evaluated["means"] and seen["eval_set_id"] == "e"
    assert seen["checkpoint"] == "c" and seen["fingerprint_hash"] == "h"


def test_drift_above_psi_fail_fails_the_pipeline_after_its_report(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """Drift above monitor.psi_fail must fail a pipeline run, as it fails a monitor run, so a
    scheduled pipeline alerts; no test ran a pipeline into drift, and one that ended Completed
    on drift passed them all. The report is written first, and shows the drift."""
    from prefect.states import Failed

    import flows.pipeline as module
    from mlseg.monitor import DriftDetected

    validated = {"outputs": {"fingerprint": "f"}, "fingerprint_hash": "h"}
    evaluated = {"eval_set_id": "e", "means": {}, "per_image_csv": "x"}
    registered = {
        "decision": {"reason": "r", "promoted": True}, "production_version": 1,
        "production_uri": "m",
    }  # fmt: skip
    reported = []

    class Report:
        def write(self, path):
            reported.append(path)
            Path(path).write_text("report")

    stages = {
        "validate_dataset_flow": lambda *args, **kwargs: validated,
        "train_model": lambda *args: {"checkpoint": "c"},
        "evaluate_model": lambda *args, **kwargs: evaluated,
        "_champion_needs_eval": lambda *args: None,
        "register_task": lambda *args: registered,
        "segment_and_quantify": lambda *args, **kwargs: dict.fromkeys(
            ("history_csv", "summary_csv", "nuclei_parquet", "histograms_png"), "x"
        ),
        "monitor": lambda *args, **kwargs: Failed(data=DriftDetected("test: drift (mean_c0)")),
        "_report": lambda *args: Report(),
    }
    for name, stub in stages.items():
        monkeypatch.setattr(module, name, stub)
    work = tmp_path / "work"
    state = module.pipeline(str(synth_dataset), str(work), overrides=TINY, return_state=True)
    assert state.is_failed() and "drift (mean_c0)" in state.message, state.message
    with pytest.raises(DriftDetected):
        state.result()
    assert reported == [str(work / "report.html")] and (work / "report.html").is_file()


def test_the_pipeline_s_drift_report_says_how_segment_scaled_the_test_images(
    harness, tmp_path, synth_dataset, monkeypatch
) -> None:
    """The pipeline segments the test images and then monitors them, but did not hand the
    monitor segment's records: its drift report had no segment_scale row, and the
    pixel_size_um row counted the test images as declaring no size, where segment used the
    manifest's. The monitor now reads the records of the images it compares."""
    import flows.pipeline as module

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 8, seed=1))
    validated = {"outputs": {"fingerprint": str(reference)}, "fingerprint_hash": "h"}
    evaluated = {"eval_set_id": "e", "means": {}, "per_image_csv": "x"}
    registered = {
        "decision": {"reason": "r", "promoted": True}, "production_version": 1,
        "production_uri": "m",
    }  # fmt: skip
    tests = sorted((synth_dataset / "test" / "original").glob("*.png"))
    reported = {}

    def segment_and_quantify(images, out_dir, **kwargs):
        assert Path(images).resolve() == tests[0].parent.resolve()  # the images monitored
        summary = Path(out_dir) / "summary.csv"
        summary.parent.mkdir(parents=True)
        pd.DataFrame(
            {"image": [p.stem for p in tests], "scale_factor": 2.0, "scale_source": "pixel_size"}
        ).assign(pixel_size_um=0.5).to_csv(summary, index=False)
        outputs = dict.fromkeys(("history_csv", "nuclei_parquet", "histograms_png"), "x")
        return {**outputs, "summary_csv": str(summary)}

    class Report:
        def write(self, path):
            Path(path).write_text("report")

    def report(*args):
        reported["drift"] = args[9]
        return Report()

    stages = {
        "validate_dataset_flow": lambda *args, **kwargs: validated,
        "train_model": lambda *args: {"checkpoint": "c"},
        "evaluate_model": lambda *args, **kwargs: evaluated,
        "_champion_needs_eval": lambda *args: None,
        "register_task": lambda *args: registered,
        "segment_and_quantify": segment_and_quantify,
        "_report": report,
    }
    for name, stub in stages.items():
        monkeypatch.setattr(module, name, stub)
    work = tmp_path / "work"
    module.pipeline(str(synth_dataset), str(work), overrides=TINY, return_state=True)
    rows = {row["statistic"]: row for row in reported["drift"]["statistics"]}
    scaled = rows["segment_scale"]
    assert scaled["n_new"] == len(tests), scaled
    assert f"segment resampled {len(tests)} of {len(tests)} image(s) by 2x" in scaled["note"]
    assert f"new: {len(tests)} at 0.5 um" in rows["pixel_size_um"]["note"]


@pytest.mark.parametrize("module", ["flows.segment", "flows.pipeline", "flows.demo"])
def test_flow_command_lines_explain_every_argument(module, monkeypatch):
    """The README's `python -m flows.segment ... --task-runner dask --workers 4` showed
    options whose --help said nothing (--workers: threads or Dask processes?)."""
    import argparse
    import importlib

    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([])
    unexplained = [a.dest for a in parsers[0]._actions if not a.help]
    assert not unexplained, f"python -m {module}: no help for {unexplained}"


def test_demo_command_line_trains_afresh_with_no_resume(tmp_path, monkeypatch, capsys):
    """A demo folder of an older mlseg, whose flows/demo.yaml differed, is refused with
    'pass --no-resume (the flows' parameter resume=false)', which python -m flows.demo
    did not take."""
    import flows.demo
    import flows.pipeline
    from mlseg.errors import ResumeError

    (tmp_path / "dataset" / "train").mkdir(parents=True)
    seen = []

    def pipeline(*args, **kwargs):
        seen.append(kwargs.get("resume", True))
        raise ResumeError("refused")

    monkeypatch.setattr(flows.pipeline, "pipeline", pipeline)
    monkeypatch.setattr(flows.demo, "_prefect_environment", lambda demo_dir: None)
    assert flows.demo.main([str(tmp_path)]) == flows.demo.main([str(tmp_path), "--no-resume"])
    assert seen == [True, False]


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.demo"])
def test_flow_command_lines_show_no_bar_in_a_log_file(tmp_path, monkeypatch, module):
    """`nohup python -m flows.pipeline ... > log 2>&1` (or make demo in CI) wrote the training
    bar, redrawn with carriage returns, into the log: a bar only where stderr is a terminal,
    as mlseg train shows it (the epoch lines are logged either way)."""
    import importlib
    import sys

    import flows.demo
    import flows.pipeline

    (tmp_path / "dataset" / "train").mkdir(parents=True)
    shown = []

    def pipeline(*args, **kwargs):
        shown.append(kwargs["progress"])
        raise ValidationFailed("stop here")

    monkeypatch.setattr(flows.pipeline, "pipeline", pipeline)
    monkeypatch.setattr(flows.demo, "_prefect_environment", lambda demo_dir: None)
    command = importlib.import_module(module)
    argv = [str(tmp_path / "dataset"), str(tmp_path / "work")]
    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty, raising=False)
        assert command.main(argv if module == "flows.pipeline" else [str(tmp_path)]) == 1
    assert shown == [False, True]


def test_demo_options_a_dataset_already_made_ignores_are_refused(tmp_path, monkeypatch, capsys):
    """A rerun asking for more images (--n-train 4) trained on the dataset of the first run
    without a word: it is reused as it is. Options it was made with are taken."""
    import flows.demo
    import flows.pipeline

    runs = []

    def pipeline(data_root, *args, **kwargs):
        runs.append(pd.read_csv(Path(data_root) / "manifest.csv")["split"].tolist())
        raise ValidationFailed("stop here")

    monkeypatch.setattr(flows.pipeline, "pipeline", pipeline)
    monkeypatch.setattr(flows.demo, "_prefect_environment", lambda demo_dir: None)
    first = ["--n-train", "2", "--n-test", "1", "--size", "32"]
    assert flows.demo.main([str(tmp_path), *first]) == 1
    assert flows.demo.main([str(tmp_path), "--n-train", "2", "--size", "32"]) == 1
    assert runs == [["train", "train", "test"]] * 2
    capsys.readouterr()
    assert flows.demo.main([str(tmp_path), "--n-train", "4"]) == 2
    assert runs == [["train", "train", "test"]] * 2
    error = capsys.readouterr().err
    assert "made with --n-train 2" in error and "--n-train 4 would be ignored" in error


def test_segment_command_line_ends_a_failed_image_in_one_line_and_exit_1(
    tmp_path, monkeypatch, capsys
):
    """python -m flows.segment on a folder with one broken image ended, after Prefect's own
    report, in a second full traceback of SegmentFailed; mlseg segment says 'failed: ...'
    and exits 1, which cron and CI see."""
    import flows.segment

    def failing(*args, **kwargs):
        raise flows.segment.SegmentFailed("1 of 3 image(s) failed: x.png: not a PNG file")

    monkeypatch.setattr(flows.segment, "segment_and_quantify", failing)
    assert flows.segment.main([str(tmp_path), str(tmp_path / "out"), "--model", "m"]) == 1
    assert capsys.readouterr().err == "error: 1 of 3 image(s) failed: x.png: not a PNG file\n"


def test_segment_command_line_without_a_model_is_a_usage_error(tmp_path, capsys):
    """Neither --model nor --registry: one usage line, not the flow's traceback."""
    from flows.segment import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "give --model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_flow_run_is_named_after_the_data_it_works_on():
    """Runs in the dashboard read 'segment inbox/he', not Prefect's 'fragrant-jaguar'; a
    name naming no parameter of its flow would fail each run as it starts."""
    import string

    from flows.evaluate import evaluate_model, evaluate_task
    from flows.monitor import monitor
    from flows.pipeline import pipeline
    from flows.segment import segment_and_quantify
    from flows.train import train_model
    from flows.validate import validate_dataset_flow

    flows = (evaluate_model, monitor, pipeline, segment_and_quantify, train_model)
    named = [(f, f.flow_run_name) for f in (*flows, validate_dataset_flow)]
    named.append((evaluate_task, evaluate_task.task_run_name))
    for runnable, template in named:
        fields = {field for _, field, _, _ in string.Formatter().parse(template or "") if field}
        assert fields, runnable.name
        assert fields <= set(inspect.signature(runnable.fn).parameters), runnable.name


@pytest.mark.parametrize(
    ("module", "flow", "args"),
    [
        ("flows.pipeline", "pipeline", []),
        ("flows.segment", "segment_and_quantify", ["--model", "m"]),
    ],
)
def test_flow_command_lines_say_a_user_error_in_one_line(
    tmp_path, monkeypatch, capsys, module, flow, args
):
    """python -m flows.pipeline with a mistyped dataset path ended in Python's traceback
    and exit 1 (flows.demo and mlseg print 'error: ...' and exit 2)."""
    import importlib

    from mlseg.errors import DatasetError

    def failing(*args, **kwargs):
        raise DatasetError("nope: dataset folder not found; check the path")

    command = importlib.import_module(module)
    monkeypatch.setattr(command, flow, failing)
    assert command.main([str(tmp_path / "nope"), str(tmp_path / "out"), *args]) == 2
    assert capsys.readouterr().err == "error: nope: dataset folder not found; check the path\n"


def _signalled_job(tmp_path: Path, signame: str, prefix: tuple[str, ...] = ()):
    """A ``python -m flows.*``-like command that sends itself ``signame`` and would then go
    on for 30 s, run to its end; its stdout says whether the exit handlers ran. Without a
    ``prefix`` it starts with SIGHUP's default action, as from a terminal, whatever this
    pytest inherited: run under ``nohup`` (SIGHUP ignored, which a child keeps), the job
    carried on after its hangup and the SIGHUP test failed with exit code 0."""
    import subprocess
    import textwrap

    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import atexit, os, signal, sys, time
            from flows.common import user_errors_exit

            if {not prefix} and hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
            atexit.register(lambda: print("exit handlers ran", flush=True))

            @user_errors_exit
            def main(argv=None):
                os.kill(os.getpid(), signal.{signame})
                time.sleep(0.5 if {bool(prefix)} else 30)
                return 0

            sys.exit(main())
            """
        )
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [*prefix, sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_flow_command_stopped_with_sigterm_runs_its_exit_handlers(tmp_path, signame, code):
    """`timeout 1h python -m flows.segment ...` in cron, docker stop or scancel: SIGTERM
    ended python -m flows.validate, flows.segment and flows.pipeline at once, past Python's
    exit handlers, among them Prefect's that stops the temporary server it started, which
    then ran on, orphaned, after every stopped job; they end with exit code 143 as mlseg
    does, the handlers run. So does SIGHUP (the terminal closed), with 129: the temporary
    server, in a session of its own, no longer dies of the terminal's hangup with the flow."""
    done = _signalled_job(tmp_path, signame)
    assert done.returncode == code, done.stderr
    assert "exit handlers ran" in done.stdout


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.skipif(shutil.which("nohup") is None, reason="no nohup here")
def test_a_flow_command_under_nohup_carries_on_after_a_hangup(tmp_path) -> None:
    """A flow command ends after SIGHUP as after SIGTERM (the test above), but one started
    under nohup, where SIGHUP is ignored, carries on to its end."""
    done = _signalled_job(tmp_path, "SIGHUP", prefix=("nohup",))
    assert done.returncode == 0, done.stderr
    assert "exit handlers ran" in done.stdout


def test_a_flow_command_stopped_with_ctrl_c_exits_130(capsys) -> None:
    """Ctrl-C in python -m flows.validate during its inventory printed a 60-line traceback
    after Prefect's crash report and exited 1, the code of a failed validation, where the
    README (and mlseg) say 130."""
    from flows.common import user_errors_exit

    @user_errors_exit
    def main(argv=None) -> int:
        raise KeyboardInterrupt

    assert main([]) == 130
    assert capsys.readouterr().err.strip() == "aborted"


@pytest.mark.parametrize("name", ["validate", "segment", "demo"])
def test_flow_commands_run_without_docstrings(monkeypatch, capsys, name) -> None:
    """Under python -OO (PYTHONOPTIMIZE=2, as some images set it) a module has no docstring:
    python -m flows.validate, flows.segment and flows.demo failed on any arguments with
    AttributeError: 'NoneType' object has no attribute 'split', as mlseg itself did not."""
    import importlib

    module = importlib.import_module(f"flows.{name}")
    monkeypatch.setattr(module, "__doc__", None)
    with pytest.raises(SystemExit) as ended:
        module.main(["--help"])
    assert ended.value.code == 0
    assert f"usage: python -m flows.{name}" in capsys.readouterr().out


def test_a_flow_command_without_a_dependency_names_what_to_install(monkeypatch, capsys) -> None:
    """A flow command in an install without one of mlseg's dependencies ended in a
    ModuleNotFoundError traceback; it says, as mlseg does, what to pip install, and exits 2."""
    from flows.common import user_errors_exit

    monkeypatch.setitem(sys.modules, "skimage", None)

    @user_errors_exit
    def main(argv=None) -> int:
        import skimage  # noqa: F401

        return 0

    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot import skimage," in err and "pip install scikit-image " in err


def test_a_flow_command_with_no_prefect_api_at_its_url_names_the_setting(
    tmp_path, checkpoint, capsys
) -> None:
    """PREFECT_API_URL naming a server that is not running (not started yet, restarting,
    a port mistyped): python -m flows.segment ended in a 110-line traceback whose last line
    said "Failed to reach API at ..." and never which setting to fix, or how; it says so in
    one line and exits 1, before touching the output folder."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.segment

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/api"
    disc_images(tmp_path / "inbox", 1)
    argv = [str(tmp_path / "inbox"), str(tmp_path / "out"), "--model", str(checkpoint)]
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert flows.segment.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot reach the Prefect API at {url} (PREFECT_API_URL)")
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


def test_a_flow_command_whose_prefect_home_cannot_be_written_names_the_setting(
    tmp_path, checkpoint, capsys
) -> None:
    """A read-only home (~/.prefect on a cluster node, a service account's) and no
    PREFECT_API_URL: python -m flows.segment waited 40-70 s for the temporary server, which
    could not open its database there, and ended (exit 1) in 259 lines of tracebacks whose last
    said 'Timed out while attempting to connect to ephemeral Prefect API server', naming
    neither the folder nor the setting; it says both in one line and exits 2, at once."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    import flows.segment

    (tmp_path / "home").write_text("")  # a file where the folder must go: unwritable as root too
    home = tmp_path / "home" / ".prefect"
    disc_images(tmp_path / "inbox", 1)
    argv = [str(tmp_path / "inbox"), str(tmp_path / "out"), "--model", str(checkpoint)]
    with temporary_settings(updates={PREFECT_HOME: home}, restore_defaults={PREFECT_API_URL}):
        assert flows.segment.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {home}: cannot be written (")
    assert "set PREFECT_HOME to a folder you can write" in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_flow_run_retried_on_dask_counts_the_images_its_failed_attempt_wrote(
    harness, tmp_path, checkpoint
) -> None:
    """A flow run on Dask failed by an unreadable image and retried once it is fixed (from
    the dashboard, or a flow's retries): the images its first attempt wrote are its work. Its
    batches kept what they wrote in the memory of a worker process, gone with the attempt's
    local cluster (or on another worker of a shared one): the retry called the failed batch's
    finished image skipped, and its history row counted 3 of the run's 4 images."""
    import flows.segment as segment_flow

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    images = disc_images(inbox, 4)
    good = images[3].read_bytes()
    images[3].write_bytes(good[: len(good) // 2])  # a copy cut short
    parameters = {
        "input_dir": str(inbox),
        "out_dir": str(out),
        "model": str(checkpoint),
        "batch_size": 2,
        "task_runner": "dask",
        "workers": 2,
    }
    first = segment_flow.segment_and_quantify(**parameters, return_state=True)
    assert first.is_failed() and "img_003" in str(first.message), first.message
    images[3].write_bytes(good)  # copied again
    retried = _retry(first, parameters)
    assert retried.is_completed(), retried.message
    result = retried.result()
    assert sorted(result["processed"]) == [f"img_{i:03d}" for i in range(4)]
    assert result["skipped"] == []
    history = pd.read_csv(out / "runs" / "history.csv")
    assert history["n_images"].tolist() == [4] and history["n_skipped"].tolist() == [0]
    assert not [p for p in out.rglob("*") if "written" in p.name]  # nothing left behind


def test_monitor_window_measures_the_week_s_images_of_an_inbox_that_keeps_them(
    harness, tmp_path
) -> None:
    """The weekly monitor measured every image the inbox ever received: 12 darker slides this
    week among 60 normal ones from earlier weeks drifted by a PSI of 0.3-0.8 at p 0.2-0.7,
    `warn`, and the run ended Completed. With since_days it measures the images segmented in
    the last week (summary.csv's finished_at) and those not segmented yet, and fails."""
    from datetime import UTC, datetime, timedelta

    from flows.monitor import monitor
    from mlseg.io import read_image, write_image

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 30, seed=1))
    inbox = tmp_path / "inbox"
    normal = disc_images(inbox, 60, seed=2)
    dark = []
    for path in disc_images(tmp_path / "src", 12, seed=3):
        dark.append(
            write_image(inbox / f"dark_{path.name}", (read_image(path) * 0.4).astype(np.uint8))
        )
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=30), now - timedelta(days=1)
    results = tmp_path / "results"
    results.mkdir()
    rows = [(p.stem, old) for p in normal] + [(p.stem, recent) for p in dark[:10]]  # 2 not yet
    pd.DataFrame(
        {
            "image": [s for s, _ in rows],
            "finished_at": [t.strftime("%Y-%m-%dT%H:%M:%S%z") for _, t in rows],
            # how segment scaled them, which the drift table reports too
            "scale_factor": [1.0 if t == old else 2.0 for _, t in rows],
            "scale_source": "estimated",
        }
    ).to_csv(results / "summary.csv", index=False)

    whole = monitor(
        str(inbox), str(reference), str(tmp_path / "m1"), batch_size=100, return_state=True
    )
    assert whole.is_completed() and whole.result()["status"] != "fail"
    assert whole.result()["n_images"] == 72
    week = monitor(
        str(inbox),
        str(reference),
        str(tmp_path / "m2"),
        batch_size=100,
        results=str(results),
        since_days=7,
        return_state=True,
    )
    assert week.is_failed() and "mean_c0 (fail" in week.message
    drift = json.loads((tmp_path / "m2" / "drift.json").read_text())
    assert drift["n_images"] == 12
    scaled = {r["statistic"]: r for r in drift["statistics"]}["segment_scale"]
    assert scaled["status"] == "warn" and scaled["note"].startswith("segment resampled 10 of 10")

    # a week later, every image is old: nothing to compare, not an alert
    later = pd.read_csv(results / "summary.csv").assign(
        finished_at=old.strftime("%Y-%m-%dT%H:%M:%S%z")
    )
    later.to_csv(results / "summary.csv", index=False)
    for path in dark[10:]:
        path.unlink()
    quiet = monitor(
        str(inbox),
        str(reference),
        str(tmp_path / "m3"),
        results=str(results),
        since_days=7,
        return_state=True,
    )
    assert quiet.is_completed() and quiet.result()["status"] == "skipped"
    assert quiet.result()["message"] == "no images new in the last 7 day(s)"
    # the window is given whole or not at all
    half = monitor(
        str(inbox), str(reference), str(tmp_path / "m4"), since_days=7, return_state=True
    )
    assert half.is_failed() and "results" in half.message


def test_a_late_weekly_monitor_run_still_compares_the_images_of_its_whole_week(
    harness, tmp_path
) -> None:
    """A scheduled monitor run that starts late (its worker down over a weekend, a Late run
    picked up on Tuesday) counted its week back from when it started, not from when it was
    due: the images segmented between the previous run and the late one's start less 7 days
    were compared by no run at all. The window now reaches back from the scheduled time."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    from flows.monitor import monitor

    reference = _fingerprint(tmp_path, disc_images(tmp_path / "train", 8, seed=1))
    inbox = tmp_path / "inbox"
    images = disc_images(inbox, 3, seed=2)
    now = datetime.now(UTC)
    due = now - timedelta(days=2)  # Monday's run, started on Wednesday
    # segmented before the previous run; after it (due - 6 d), which only this run compares;
    # and yesterday
    finished = [now - timedelta(days=20), due - timedelta(days=6), now - timedelta(days=1)]
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame(
        {
            "image": [p.stem for p in images],
            "finished_at": [t.strftime("%Y-%m-%dT%H:%M:%S%z") for t in finished],
        }
    ).to_csv(results / "summary.csv", index=False)
    parameters = {
        "images": str(inbox),
        "fingerprint": str(reference),
        "out_dir": str(tmp_path / "m"),
        "results": str(results),
        "since_days": 7,
    }
    with get_client(sync_client=True) as client:
        late = client.create_flow_run(
            monitor, parameters=parameters, state=Scheduled(scheduled_time=due)
        )
    state = run_flow(monitor, flow_run=late, parameters=parameters, return_type="state")
    assert state.is_completed(), state.message
    drift = json.loads((tmp_path / "m" / "drift.json").read_text())
    assert drift["n_images"] == 2  # not the one of three weeks ago


def test_monitor_window_takes_each_image_s_first_segmentation_time(tmp_path, checkpoint) -> None:
    """The monitor's since_days reads when each image was segmented from summary.csv: the
    segment command and the nightly flow's batches both record it per image, and a rerun that
    skips an image keeps its first time, so an image that stays in the inbox ages out."""
    from datetime import UTC, datetime

    from flows.segment import segment_batch
    from mlseg.monitor import recent_images
    from mlseg.segment import segment_folder

    images = disc_images(tmp_path / "in", 2)
    by_hand = tmp_path / "by-hand"
    segment_folder(checkpoint, tmp_path / "in", by_hand, profile_name="he", progress=False)
    nightly = tmp_path / "nightly"
    first = segment_batch.fn([str(p) for p in images], *_batch_args(nightly, checkpoint))
    assert all(datetime.fromisoformat(r["summary"]["finished_at"]).tzinfo for r in first)
    for out in (by_hand, nightly):
        record = json.loads((out / "img_000.json").read_text())
        assert datetime.fromisoformat(record["finished_at"]).tzinfo is not None
        # as if segmented in January: a rerun skips it and keeps that time
        record["finished_at"] = "2026-01-05T02:10:00+0000"
        (out / "img_000.json").write_text(json.dumps(record))
    rerun = segment_folder(checkpoint, tmp_path / "in", by_hand, profile_name="he", progress=False)
    assert rerun.skipped == ["img_000", "img_001"]
    table = pd.read_csv(by_hand / "summary.csv").set_index("image")
    assert table.loc["img_000", "finished_at"] == "2026-01-05T02:10:00+0000"
    assert recent_images(images, by_hand, 7) == images[1:]
    again = segment_batch.fn([str(p) for p in images], *_batch_args(nightly, checkpoint))
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert again[0]["summary"]["finished_at"] == "2026-01-05T02:10:00+0000"
    assert recent_images(images, by_hand, 7, now=datetime(2026, 1, 9, tzinfo=UTC)) == images


_WAITING_FLOW = """
import sys, time
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
from flows.common import temporary_server_apart, user_errors_exit

@flow
def wait():
    print("server", SubprocessASGIServer().server_process.pid, flush=True)
    time.sleep(120)

@user_errors_exit
def main(argv=None):
    temporary_server_apart()
    wait()
    return 0

sys.exit(main())
"""


@pytest.mark.slow  # the temporary server takes 10 s to start on a quiet machine, a minute busy
def test_ctrl_c_on_temporary_server_ends_aborted_and_stops_it(tmp_path):
    """Ctrl-C in the terminal reaches the whole process group: a ``python -m flows.*`` run on
    Prefect's temporary server ends in seconds with ``aborted`` and 130, without tracebacks,
    and leaves no server running (it used to die with the flow, which retried it for 157 s)."""
    import signal
    import subprocess

    script = tmp_path / "waiting_flow.py"
    script.write_text(_WAITING_FLOW)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="150",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    run = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    try:
        started = run.stdout.readline()
        assert started.startswith("server "), run.communicate(timeout=30)
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, err
    assert err.rstrip().splitlines().count("aborted") == 1, err
    assert "Traceback" not in err, err
    server = Path("/proc") / started.split()[1]
    assert not server.exists() or b"uvicorn" not in (server / "cmdline").read_bytes()


@pytest.mark.parametrize("given", [None, "45"])
def test_the_temporary_server_may_take_three_minutes_to_start_unless_set(tmp_path, given):
    """`python -m flows.pipeline` on a busy 2-core machine failed with 'Timed out while
    attempting to connect to ephemeral Prefect API server': Prefect's default 20 s start, where
    only flows.demo and the image gave it more. Every entry point's temporary server now gets
    EPHEMERAL_STARTUP_TIMEOUT_S, and a user's own setting is kept."""
    import subprocess

    from flows.common import EPHEMERAL_STARTUP_TIMEOUT_S

    probe = (
        "from flows.common import temporary_server_apart\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "temporary_server_apart()\n"
        "start = SubprocessASGIServer().start\n"
        "print(getattr(start, 'keywords', {}).get('timeout'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    if given is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = given
    said = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert said.returncode == 0, said.stderr
    expected = str(EPHEMERAL_STARTUP_TIMEOUT_S) if given is None else "None"
    assert said.stdout.strip() == expected
