"""Flow ``validate-dataset``: publishes its verdict as artifacts and fails on error-level rules.

Tasks are tested through ``.fn``; the flow runs against ``prefect_test_harness`` (the
session's one temporary server, conftest ``harness``).
``PREFECT_HOME`` and analytics are set in ``conftest.pytest_configure`` before prefect loads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flow_helpers import broken_suites, flow_artifacts, flow_logs

from mlseg.errors import ValidationFailed


def test_tasks_run_without_a_server(nuclei_dataset, tmp_path):
    from flows.validate import inventory_task, suites_task, summary_markdown
    from mlseg.inventory import ValidateConfig

    root = nuclei_dataset()
    (root / "train/masks/train1_mask.png").unlink()
    inventory = inventory_task.fn(str(root), ValidateConfig())
    report = suites_task.fn(inventory, str(tmp_path / "out"))
    assert report.failed_rules("error") == ["image_has_mask"]
    text = summary_markdown(report)
    assert "FAILED" in text and "`image_has_mask`" in text and "train/original/train1.png" in text
    # the page that reads offline, before the Data Docs (which load their scripts from CDNs)
    page = tmp_path / "out" / "validation.html"
    assert page.is_file() and "train/original/train1.png" in page.read_text()
    assert report.page == page and text.index(str(page)) < text.index("Data Docs")
    # the fix names <stem>_mask.png: as raw HTML the dashboard's markdown renderer drops it
    outside_code = re.sub(r"`[^`]*`", "", text)
    assert "&lt;stem&gt;\\_mask.png" in outside_code and not re.search(r"<\w", outside_code)


def test_summary_names_why_each_unreadable_file_is_unreadable(nuclei_dataset, tmp_path):
    """As mlseg validate prints it: a float TIFF's fix is 16 bits, not "re-copy it"."""
    import tifffile

    from flows.validate import inventory_task, suites_task, summary_markdown
    from mlseg.inventory import ValidateConfig

    root = nuclei_dataset()
    (root / "train/original/train1.png").unlink()
    tifffile.imwrite(root / "train/original/train1.tif", np.zeros((48, 48), np.float32))
    inventory = inventory_task.fn(str(root), ValidateConfig())
    report = suites_task.fn(inventory, str(tmp_path / "out"))
    text = summary_markdown(report, inventory.files)
    assert any("train1.tif" in line and "8/16-bit" in line for line in text.splitlines())


def test_artifact_key_is_prefect_safe():
    from flows.validate import artifact_key

    assert artifact_key("/data/My Set_v2") == "dataset-validation-my-set-v2"


def test_flow_passes_publishes_and_returns_the_fingerprint_hash(harness, nuclei_dataset, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.validate import validate_dataset_flow
    from mlseg.dataset import dataset_fingerprint, list_pairs
    from mlseg.io import read_mask, write_labels

    root = nuclei_dataset("good")
    state = validate_dataset_flow(str(root), str(tmp_path / "out"), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["success"] is True
    # the training data as training fingerprints it: images and masks
    assert result["fingerprint_hash"] == dataset_fingerprint(list_pairs(root, "train"))
    assert Path(result["outputs"]["fingerprint"]).is_file()
    assert (tmp_path / "out" / "data_docs" / "index.html").is_file()
    assert Path(result["outputs"]["page"]) == tmp_path / "out" / "validation.html"
    assert "PASSED" in Path(result["outputs"]["page"]).read_text()
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    assert {"dataset-validation-good", "dataset-validation-good-summary"} <= set(artifacts)
    with get_client(sync_client=True) as client:  # the dashboard names the run by its data
        assert client.read_flow_run(state.state_details.flow_run_id).name == f"validate {root}"
    assert "passed" in artifacts["dataset-validation-good-summary"].data
    # as mlseg validate prints it: what the images without a pixel size train at
    summary = artifacts["dataset-validation-good-summary"].data
    assert "unknown (profile he sets none)" in summary
    assert "the model's pixel size will be unknown" in summary
    # a corrected mask is new training data: the registered fingerprint and the resume check
    # must see it (the inventory's drift fingerprint covers the images only)
    mask = next((root / "train" / "masks").iterdir())
    labels = read_mask(mask)
    labels[labels == labels.max()] = 0
    write_labels(mask, labels)
    again = validate_dataset_flow(str(root), str(tmp_path / "out2"))
    assert again["fingerprint_hash"] != result["fingerprint_hash"]


def test_the_flow_says_how_far_the_reading_is_in_its_run_log(
    harness, nuclei_dataset, tmp_path, ticking, task_logs_at_info
):
    """A deployed validation of a large dataset read its files for hours without a line in
    the run's log, as a hung run; a line a minute goes there now, as mlseg validate writes
    it to a job's log."""
    from flows.validate import validate_dataset_flow

    root = nuclei_dataset()

    def said(out: str) -> list[str]:
        state = validate_dataset_flow(str(root), str(tmp_path / out), return_state=True)
        assert state.is_completed(), state.message
        logs = flow_logs(state.state_details.flow_run_id, logging.INFO)
        return [line for line in logs if line.startswith("validate: ")]

    ticking(25)  # each file 25 s on the clock the lines read
    lines = said("long")
    assert len(lines) >= 2 and "elapsed" in lines[0] and "left" in lines[0], lines
    total = lines[-1].split("/")[1].split()[0]
    assert lines[-1].startswith(f"validate: {total}/{total} files (100%), "), lines


def test_a_mask_changed_while_validating_fails_the_flow(
    harness, nuclei_dataset, tmp_path, monkeypatch
):
    """The fingerprint was taken after the suites: a mask replaced while they ran (here by a
    0/255 export, which mask_values_valid fails) was in the hash that train-model trusts,
    beside the verdict on the mask it replaced."""
    import flows.validate as module
    from flows.validate import validate_dataset_flow
    from mlseg.io import read_mask, write_labels

    root = nuclei_dataset()
    mask = root / "train" / "masks" / "train0_mask.png"
    real = module.run_suites

    def suites_then_a_new_mask(*args, **kwargs):
        report = real(*args, **kwargs)
        write_labels(mask, ((read_mask(mask) > 0) * 255).astype(np.uint8))
        return report

    monkeypatch.setattr(module, "run_suites", suites_then_a_new_mask)
    with pytest.raises(ValidationFailed, match="changed while they were validated"):
        validate_dataset_flow(str(root), str(tmp_path / "out"))


def test_a_broken_suite_file_fails_the_flow_before_the_files_are_read(
    harness, nuclei_dataset, tmp_path, monkeypatch
):
    """A slip in a suite file was found after the flow had read every file of the dataset
    (hours for a large one)."""
    import flows.validate as module
    from flows.validate import validate_dataset_flow
    from mlseg.errors import ConfigError

    path = broken_suites(tmp_path, monkeypatch)
    read = []
    monkeypatch.setattr(module, "train_fingerprint", lambda *a: read.append(a))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not valid JSON"):
        validate_dataset_flow(str(nuclei_dataset()), str(tmp_path / "out"))
    assert not read and not (tmp_path / "out" / "inventory.parquet").exists()


def test_flow_fails_on_an_error_and_still_publishes(harness, nuclei_dataset, tmp_path):
    from flows.validate import validate_dataset_flow

    root = nuclei_dataset("leaky")
    (root / "test/original/test0.png").write_bytes(
        (root / "train/original/train0.png").read_bytes()
    )
    state = validate_dataset_flow(str(root), str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationFailed, match="no_train_test_leakage.*validation.html"):
        state.result()
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    summary = artifacts["dataset-validation-leaky-summary"].data
    assert "FAILED" in summary and "test/original/test0.png" in summary
    assert "no_train_test_leakage" in str(artifacts["dataset-validation-leaky"].data)


def test_python_m_flows_validate_help_prints_usage_and_runs_nothing(capsys) -> None:
    """`python -m flows.validate --help` started a Prefect server and validated a dataset
    named --help, ending in a traceback; it prints the usage now, as the other flows do."""
    from flows.validate import main

    with pytest.raises(SystemExit) as ended:
        main(["--help"])
    assert ended.value.code == 0
    assert "usage: python -m flows.validate" in capsys.readouterr().out


def test_prefect_s_console_outlives_the_capsys_of_the_test_that_first_imports_flows(capsys):
    """Prefect's console handler writes to sys.stderr as it is when Prefect's logging is set
    up: set up at the first ``import flows.*``, here under capsys, it kept this test's stream,
    closed once the test ended, and the file's next flow run that logged a line failed with a
    RecursionError (test_the_flow_says_how_far_the_reading_is_in_its_run_log, run after the
    ``--help`` test). conftest sets Prefect's logging up before any test."""
    import sys

    import flows.validate  # noqa: F401

    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    consoles = {
        handler.console
        for logger in loggers
        for handler in getattr(logger, "handlers", ())  # placeholders have none
        if type(handler).__name__ == "PrefectConsoleHandler"
    }
    assert consoles and all(console.file is not sys.stderr for console in consoles)
