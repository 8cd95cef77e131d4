"""Prefect flow ``validate-dataset``: the data gate before any training run.

Thin: each task calls one function of :mod:`mlseg.inventory` or :mod:`expectations.runner`.
The flow publishes the result as a table artifact (one row per expectation) and a markdown
artifact (verdict, failures with their first files, where ``validation.html`` and the Data
Docs are), then raises :class:`~mlseg.errors.ValidationFailed` on any error-level failure so
that nothing downstream (training) starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from expectations.runner import (
    ValidationReport,
    drop_verdict,
    load_suites,
    preload_great_expectations,
    run_suites,
    write_report,
)
from flows import artifacts
from flows.common import (
    data_path,
    log_warnings,
    run_config,
    run_log,
    temporary_server_apart,
    user_errors_exit,
)
from mlseg.dataset import train_fingerprint
from mlseg.errors import ValidationFailed
from mlseg.inventory import (
    Inventory,
    ValidateConfig,
    build_inventory,
    check_output_dir,
    pixel_size_summary,
    read_errors,
    run_profile,
    validate_config,
    write_inventory,
)

if TYPE_CHECKING:
    import pandas as pd


@task(name="build-inventory", cache_policy=NO_CACHE)
def inventory_task(root: str, cfg: ValidateConfig) -> Inventory:
    # a line a minute in the run log while the files are read: a large dataset said nothing
    # for hours
    return build_inventory(root, cfg, log=run_log())


@task(name="write-inventory", cache_policy=NO_CACHE)
def write_inventory_task(inventory: Inventory, out: str) -> dict[str, str]:
    drop_verdict(out)  # an earlier run's verdict is not about this inventory
    return {k: str(v) for k, v in write_inventory(inventory, out).items()}


@task(name="run-expectation-suites", cache_policy=NO_CACHE)
def suites_task(inventory: Inventory, out: str) -> ValidationReport:
    report = run_suites(inventory, data_docs_dir=Path(out) / "data_docs")
    return report.with_outputs(write_report(report, out))


def artifact_key(root: str) -> str:
    """``dataset-validation-<dataset name>`` in the lowercase-and-dashes form Prefect requires."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(root).resolve().name.lower()).strip("-")
    return f"dataset-validation-{slug or 'dataset'}"


def summary_markdown(
    report: ValidationReport,
    inventory: pd.DataFrame | None = None,
    pixel_sizes: list[str] | None = None,
) -> str:
    """Verdict, then each failed expectation with its fix and first files, then why each
    unreadable file of ``inventory`` (its files table) is unreadable, then ``pixel_sizes``
    (:func:`mlseg.inventory.pixel_size_summary`'s lines, as ``mlseg validate`` prints them)."""
    verdict = "passed" if report.success else "**FAILED**"
    lines = [
        f"# Dataset validation: {verdict}",
        "",
        f"Dataset {artifacts.code(report.root)}: {len(report.errors)} error(s), "
        f"{len(report.warnings)} warning(s).",
        *([f"Report (readable offline): {artifacts.code(report.page)}"] if report.page else []),
        f"Data Docs (needs an internet connection): {artifacts.code(report.data_docs)}",
        "",
    ]
    for o in (*report.errors, *report.warnings):
        files = ", ".join(artifacts.code(f) for f in o.first_failed)
        lines.append(
            f"- **{o.severity}** {artifacts.code(o.rule)}"
            + (f" (needs {artifacts.code(o.bound)})" if o.bound else "")
            + f": {o.n_failed} of {o.n_checked} ({files}). "
            f"{artifacts.plain(o.fix)}"
        )
    unreadable = read_errors(inventory) if inventory is not None else []
    if unreadable:
        lines += ["", "Unreadable files:", *(f"- {artifacts.plain(line)}" for line in unreadable)]
    if pixel_sizes:
        lines += ["", "Pixel sizes:", *(f"- {artifacts.plain(line)}" for line in pixel_sizes)]
    versions = ", ".join(f"{k} v{v}" for k, v in sorted(report.suite_versions.items()))
    lines += ["", f"Suites: {versions}."]
    return "\n".join(lines)


@task(name="publish-validation", cache_policy=NO_CACHE)
def publish_task(
    report: ValidationReport,
    inventory: pd.DataFrame | None = None,
    pixel_sizes: list[str] | None = None,
) -> None:
    key = artifact_key(report.root)
    rows = report.to_frame()[
        ["severity", "rule", "success", "n_failed", "n_checked", "first_failed"]
    ]
    artifacts.table(key, rows, f"one row per expectation over the inventory of {report.root}")
    artifacts.markdown(
        f"{key}-summary", summary_markdown(report, inventory, pixel_sizes), "validation verdict"
    )


@flow(name="validate-dataset", flow_run_name="validate {data_root}", log_prints=True)
def validate_dataset_flow(
    data_root: str,
    out_dir: str | None = None,
    config: str | None = None,
    mask_kind: str | None = None,
    min_images: int | None = None,
    workers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate the dataset at ``data_root``; outputs go to ``out_dir`` (default
    ``./validation/<dataset name>``): ``validation.html`` (the verdict, readable offline),
    Data Docs, inventory, fingerprint, ``validation.json``/``.csv``.

    Returns the report as a dict with ``fingerprint_hash`` (pass it to ``train-model``, which
    then refuses training data changed since) and the output paths; raises
    :class:`ValidationFailed` on any error-level failure, or when the training images or masks
    changed while they were checked.

    Args:
        data_root: Dataset folder: ``train/`` and ``test/`` splits, each of ``original/`` images and
            ``masks/``. Relative: under ``MLSEG_DATA_DIR`` if set.
        out_dir: Output folder; empty: ``validation/<dataset folder name>``. Relative: under
            ``MLSEG_DATA_DIR`` if set.
        config: Run config YAML whose ``data`` section describes the layout; empty: defaults.
            Relative: under ``MLSEG_DATA_DIR`` if set.
        mask_kind: ``auto``, ``binary`` (foreground/background) or ``instance`` (one id per
            nucleus); empty: the config's (default ``auto``).
        min_images: Fewest images each split must hold; empty: 1 (the run config has no such
            key: ``monitor.min_images`` is drift's).
        workers: Parallel file readers, ``0`` = one per CPU core; empty: ``0``.
        overrides: Run config sections to change, e.g. ``{"data": {"mask_suffix": "_seg"}}``.
    """
    log_warnings()
    # run_config: its relative profiles_file is under MLSEG_DATA_DIR, not the worker's folder
    run = run_config(config, overrides)
    cfg = validate_config(
        run, mask_kind=mask_kind, min_images_per_split=min_images, workers=workers
    )
    profile = run_profile(run)  # a bad profile before the reading
    root = data_path(data_root, "data_root")
    out = str(data_path(out_dir or Path("validation") / root.name))
    check_output_dir(root, out)
    load_suites()  # a slip in a suite file said so only after every file was read
    # the training data as training reads it, images, masks and declared pixel sizes (a
    # corrected mask or size is new data; the inventory's image fingerprint is for drift and
    # covers the images only)
    before = train_fingerprint(root, cfg.data)  # what the inventory is about to read
    preload_great_expectations()  # the GX import (seconds) overlaps the inventory
    inventory = inventory_task(str(root), cfg)
    outputs = write_inventory_task(inventory, out)
    report = suites_task(inventory, out)
    # which size each split's images train or are scored at, and for those without one what
    # the run's profile gives and what training makes of it, as mlseg validate prints it
    pixel_sizes = pixel_size_summary(inventory.files, *profile)
    publish_task(report, inventory.files, pixel_sizes)
    logger = get_run_logger()
    for line in pixel_sizes:
        logger.info("pixel sizes, %s", line)
    logger.info(
        "validated %s: %d error(s), %d warning(s); see %s",
        root,
        len(report.errors),
        len(report.warnings),
        report.where(),
    )
    report.check(root)
    fingerprint_hash = train_fingerprint(root, cfg.data)
    if fingerprint_hash != before:  # the verdict is on files some of which are gone now
        raise ValidationFailed(
            f"{root}: training images, masks or their pixel sizes changed while they were "
            "validated; validate again once they are in place"
        )
    return {
        **report.to_dict(),
        "fingerprint_hash": fingerprint_hash,
        "outputs": {**outputs, **report.outputs},
    }


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """``python -m flows.validate DATA [OUT]``: exit 0 when the dataset passes, 1 when it fails."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flows.validate", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("data_root", help="dataset folder (train/ and test/)")
    parser.add_argument("out_dir", nargs="?", help="output folder (default validation/<name>)")
    parser.add_argument("--config", help="run config YAML (its data section)")
    args = parser.parse_args(argv)
    temporary_server_apart()
    result = validate_dataset_flow(args.data_root, args.out_dir, config=args.config)
    print(
        f"passed, {result['n_warnings']} warning(s); see {result['outputs']['page']}; "
        f"Data Docs (needs an internet connection): {result['data_docs']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
