"""Model registry and monitoring commands: ``mlseg models list|show|which|register|promote``,
``mlseg monitor``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlseg.cli import progress_outputs

RegistryOpt = Annotated[
    str,
    typer.Option(
        "--registry",
        "-r",
        envvar="MLSEG_REGISTRY",
        help="Registry folder or fsspec URL (s3://bucket/models); env MLSEG_REGISTRY.",
    ),
]
LISTED_METRICS = ("aji", "dice", "pq")
models_app = typer.Typer(
    help="Versioned models: list, show, which made an output, register, promote.",
    no_args_is_help=True,
)


def _metrics(metrics: dict[str, float]) -> str:
    """The metrics models are compared on (the means an evaluation writes start with dice,
    iou, pixel_precision), as ``aji=0.612 dice=0.801 pq=0.550``."""
    shown = [k for k in LISTED_METRICS if k in metrics] or list(metrics)[:3]
    return " ".join(f"{k}={metrics[k]:.3f}" for k in shown)


@models_app.command("list")
def list_cmd(
    registry: RegistryOpt = "registry",
    name: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
) -> None:
    """Every registered version, the production one marked with *."""
    from mlseg import registry as reg

    versions = reg.list_models(registry, name)
    if not versions:
        # a mistyped path lists as empty: say there is no such folder
        missing = "://" not in registry and not Path(registry).is_dir()
        typer.echo(
            f"no models in {registry}"
            + (": no such folder; check -r (relative paths are read from here)" if missing else "")
        )
        return
    live = {n: reg.production_record(registry, n) for n in {v.name for v in versions}}
    typer.echo(f"{'':2}{'model':<20}{'created (UTC)':<27}{'weights':<18}{'metrics':<36}eval set")
    for v in versions:
        mark = "*" if (live[v.name] or {}).get("version") == v.version else " "
        metrics = _metrics(v.metrics)  # a space kept before the eval set id
        # the weights' hash, as every output's record names the model (best.safetensors@<hash>)
        weights = next((h[:16] for f, h in v.files.items() if f.endswith(".safetensors")), "-")
        typer.echo(
            f"{mark:2}{v.tag:<20}{v.created_at:<27}{weights:<18}{metrics:<35} {v.eval_set_id or '-'}"
        )


@models_app.command("show")
def show_cmd(
    model: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (3, v3, latest, production).")],
    registry: RegistryOpt = "registry",
) -> None:
    """A version's card (metrics, data fingerprint, code version, files) as JSON."""
    from mlseg import registry as reg

    name, _, version = model.partition("@")
    found = reg.show(registry, name, version or "production")
    record = reg.production_record(registry, name) or {}
    card = {
        **found.card(),
        "evaluations": found.evaluations,
        "production": record.get("version") == found.version,
    }
    if card["production"]:
        card["promoted_at"], card["promotion_reason"] = record["promoted_at"], record["reason"]
    typer.echo(json.dumps(card, indent=2))


@models_app.command("which")
def which_cmd(
    output: Annotated[
        Path,
        typer.Argument(
            help="An output of mlseg segment or the flow: its folder (run.json), run.json, a "
            "<stem>.json, or a .parquet table (the record in its footer)."
        ),
    ],
    registry: RegistryOpt = "registry",
) -> None:
    """The registered version whose weights made an output: stage, data fingerprint, metrics."""
    from mlseg import registry as reg
    from mlseg.outputs import read_record

    record = read_record(output)
    model_id = record.get("model")
    if not model_id:
        raise reg.RegistryError(
            f"{output}: records no model (mlseg quantify measures the masks it is given)"
        )
    if not isinstance(model_id, str) or not reg.MODEL_ID_RE.match(model_id):
        raise reg.RegistryError(
            f"{output}: its model {model_id!r} names no weights file and content hash; the "
            "record was damaged or edited by hand"
        )
    found = reg.made_by(registry, model_id)
    if not found:
        source = record.get("model_source") or record.get("model_path")
        said = f" (the run names it {source})" if source else ""
        raise reg.RegistryError(
            f"{output}: no version in {registry} holds the weights {model_id.split('+')[0]}"
            f"{said}: the model was used from a path and never registered, or is in another "
            "registry: give that with -r (or MLSEG_REGISTRY)"
        )
    typer.echo(f"{output}: model {model_id}")
    for version, exact in found:
        live = (reg.production_record(registry, version.name) or {}).get("version")
        stage = "production" if live == version.version else "registered, not in production"
        metrics = _metrics(version.metrics)
        # the flow's run.json names the version it served: two holding the same weights
        if record.get("model_source") == version.tag:
            stage += ", the one the run served"
        typer.echo(f"{version.tag} ({stage}), created {version.created_at}")
        typer.echo(f"  training data fingerprint  {version.fingerprint_hash or '-'}")
        typer.echo(
            f"  test metrics               {metrics or '-'} on eval set {version.eval_set_id or '-'}"
        )
        typer.echo(f"  code                       {version.code_version}")
        if not exact:
            typer.echo(
                "  note: these weights, but not this version's config.json, meta.json or stain "
                "reference made the output (edited beside the weights, or recorded by another "
                "mlseg release)"
            )
        typer.echo(f"  the whole card: mlseg models show {version.tag} -r {registry}")


@models_app.command("register")
def register_cmd(
    model: Annotated[
        Path, typer.Argument(help="The training run's folder (mlseg train --out) or its weights.")
    ],
    evaluation: Annotated[
        Path,
        typer.Argument(help="mlseg evaluate's --out folder (or summary.json) for this model."),
    ],
    registry: RegistryOpt = "registry",
    name: Annotated[str, typer.Option(help="Model name in the registry.")] = "nuclei",
) -> None:
    """Add a trained model to the registry with its test scores (not promoted)."""
    from mlseg import registry as reg

    version, new = reg.register_evaluated(model, evaluation, registry, name)
    said = "registered as" if new else "already registered as"
    typer.echo(f"{model}: {said} {version.tag} in {registry} ({_metrics(version.metrics)})")
    live = reg.production_record(registry, version.name) or {}
    if live.get("version") != version.version:
        typer.echo(
            f"to serve it: mlseg models promote {version.name} {version.version} "
            f'--reason "..." -r {registry}'
        )


@models_app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to serve (3 or v3).")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the registry).")],
    registry: RegistryOpt = "registry",
) -> None:
    """Make a version the production model (e.g. a rollback); the reason is recorded."""
    from mlseg import registry as reg

    found = reg.promote(registry, name, version, reason)
    typer.echo(f"{found.tag} is now in production ({reason})")


def monitor_cmd(
    images: Annotated[Path, typer.Argument(help="Folder of new images (or one image).")],
    fingerprint: Annotated[
        Path, typer.Option(help="Training fingerprint.json written by `mlseg validate`.")
    ],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (monitor section used).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the drift table here (CSV); drift_history.csv beside it gains a row "
            "per run, by which a drift says since when it has lasted."
        ),
    ] = None,
    since_days: Annotated[
        float | None,
        typer.Option(
            help="Only the images new in the last N days: segmented within them by the "
            "records in --results (summary.csv's finished_at), or not segmented yet."
        ),
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(
            help="Output folder of `mlseg segment` on these images: its summary.csv says how "
            "segment scaled them (the segment_scale row), and when (for --since-days)."
        ),
    ] = None,
) -> None:
    """Compare new images with the training data; exit 1 on drift above monitor.psi_fail."""
    from mlseg.config import load_config
    from mlseg.errors import ConfigError
    from mlseg.io import write_table
    from mlseg.monitor import (
        DRIFT_HISTORY,
        DriftDetected,
        append_history,
        drift_history_row,
        drift_report,
        image_stats_table,
        list_new_images,
        load_fingerprint,
        recent_images,
        with_drift_history,
        with_segment_records,
    )

    if out is not None and out.is_dir():
        raise ConfigError(
            f"{out}: a folder; --out names the CSV file to write (e.g. {out / 'drift.csv'})"
        )
    history = out.with_name(DRIFT_HISTORY) if out is not None else None
    if out is not None and out.name == DRIFT_HISTORY:
        raise ConfigError(
            f"{out}: the history of drift runs kept beside the drift table; --out names "
            f"the drift table (e.g. {out.with_name('drift.csv')})"
        )
    if since_days is not None and results is None:
        raise ConfigError(
            "--since-days needs --results, the output folder of `mlseg segment` on these "
            "images, whose records say when each was segmented"
        )
    cfg = load_config(config).monitor
    reference = load_fingerprint(fingerprint)
    paths = list_new_images(images)
    if since_days is not None:
        paths = recent_images(paths, results, since_days)
        if not paths:
            if history is not None:
                append_history(
                    history, drift_history_row(None, images=images, since_days=since_days)
                )
            typer.echo(f"no images new in the last {since_days:g} day(s) in {images}")
            return
    bar, log = progress_outputs()
    new = image_stats_table(
        paths,
        params=reference.get("image_stats_params"),
        stain=reference.get("stain"),
        progress=bar,
        log=log,
    )
    if results is not None:  # how segment scaled them, and the pixel sizes it used
        new = with_segment_records(new, results)
    report = drift_report(new, reference, cfg)
    if out is not None:
        report = with_drift_history(report, history)  # since when each drift has lasted
        write_table(report.table, out)
        append_history(history, drift_history_row(report, images=images, since_days=since_days))
    shown = report.table[
        ["statistic", "status", "psi", "p_value", "new_median", "reference_median"]
    ]
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if report.status == "fail":
        raise DriftDetected(f"{images}: {report.message}")  # exit code 1
    typer.echo(f"{report.status.upper()}: {report.message}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to ``app``."""
    app.add_typer(models_app, name="models")
    app.command("monitor")(monitor_cmd)
