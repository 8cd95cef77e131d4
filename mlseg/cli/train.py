"""Training commands: ``train``, ``evaluate``, ``tune``."""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from mlseg.cli import progress_outputs
from mlseg.cli.segment import BatchOpt, TileOpt
from mlseg.errors import ConfigError


def _load(config: Path, data: Path | None, max_steps: int | None, device: str | None):
    from mlseg.config import load_config

    train: dict[str, Any] = {}
    if max_steps is not None:
        train["max_steps"] = max_steps
    if device is not None:
        train["device"] = device
    cfg = load_config(config, train=train) if train else load_config(config)
    root = data or cfg.data.root
    if root is None:
        raise ConfigError(f"{config}: no dataset; pass --data DIR or set data.root in the config")
    return cfg, Path(root)


ValidateOpt = Annotated[
    bool,
    typer.Option(
        "--validate/--no-validate",
        help="Check the data contract first, as mlseg validate does (verdict in "
        "<out>/validation/validation.html); a failed check stops training.",
    ),
]


def _validated(config: Path, root: Path, out: Path, quiet: bool) -> str | None:
    """Validate ``root`` as ``mlseg validate`` would, into ``out``, or raise
    ``ValidationFailed``; returns the training data's fingerprint as validated (training
    refuses files changed since)."""
    from expectations import load_suites, validate_dataset
    from mlseg.dataset import train_fingerprint
    from mlseg.errors import ValidationFailed
    from mlseg.inventory import load_validate_config

    cfg = load_validate_config(config)
    load_suites()  # a slip in a suite file before the training files are read
    before = train_fingerprint(root, cfg.data)
    bar, log = progress_outputs(False if quiet else None)
    report = validate_dataset(root, out, cfg, progress=bar, log=log)
    try:
        report.check(root)
    except ValidationFailed as err:  # e.g. a set with no test images, on purpose
        raise ValidationFailed(f"{err}; --no-validate trains on it anyway") from None
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    typer.echo(f"{root}: validated{warned}; see {report.where()}")
    return before


def train(
    config: Annotated[Path, typer.Argument(help="YAML run config.")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder (default: data.root).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/<config name>).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from last checkpoint.")
    ] = True,
    quiet: Annotated[bool, typer.Option(help="No progress bar, no line per epoch.")] = False,
    validate: ValidateOpt = True,
) -> None:
    """Train a model; re-running on the same --out resumes from the last checkpoint."""
    from mlseg.model import check_names
    from mlseg.train import describe, describe_scale, fit

    cfg, root = _load(config, data, max_steps, device)
    check_names(cfg.train)  # not after the validation
    out = out or Path("runs") / config.stem
    fingerprint = _validated(config, root, out / "validation", quiet) if validate else None
    bar = not quiet and sys.stderr.isatty()  # in a job's log file, a line per epoch instead
    echo = None if quiet else partial(typer.echo, err=True)
    result = fit(
        cfg, root, out, resume=resume, fingerprint_hash=fingerprint, progress=bar, log=echo
    )
    done = describe(
        result.steps,
        result.images_per_s,
        result.best_val_dice,
        result.train_images,
        result.val_images,
    )
    typer.echo(f"{done}; checkpoints in {result.out_dir}")
    typer.echo(describe_scale(result.pixel_size_um, result.image_pixel_sizes))


def evaluate(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder or .safetensors file.")],
    data: Annotated[Path, typer.Argument(help="Dataset folder (contract layout).")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <model>/eval_<split>).")
    ] = None,
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    profile: Annotated[
        str | None, typer.Option(help="Profile name (default: the model's).")
    ] = None,
    profiles: Annotated[
        Path | None,
        typer.Option(help="profiles.yaml to read --profile from (default: the run config's)."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    tile: TileOpt = None,
    batch_size: BatchOpt = None,
    pixel_size: Annotated[
        float | None,
        typer.Option(
            "--pixel-size",
            help="Microns per pixel for every image (overrides the manifest, metadata, profile).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option(help="No progress bar, no line a minute in a job's log.")
    ] = False,
) -> None:
    """Score a model on a labelled split: per-image CSV, summary JSON, worst-cases PNG."""
    from mlseg.config import InferenceConfig, get_profile, parse
    from mlseg.evaluate import describe_errors
    from mlseg.evaluate import evaluate as run_evaluate
    from mlseg.model import load_model, saved_config

    if split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test, got {split!r}")
    overrides = {
        k: v
        for k, v in {"tile_size": tile, "batch_size": batch_size, "device": device}.items()
        if v is not None
    }
    inference = None
    if overrides:  # scored as `mlseg segment` with the same options segments
        base = load_model(model, device="cpu").config.inference
        inference = parse(InferenceConfig, {**base.model_dump(), **overrides}, "command line")
    folder = model if model.is_dir() else model.parent
    if profiles is not None:  # the run's profiles_file may not be where it was trained
        profile = get_profile(profile or saved_config(folder).profile, profiles)
    out = out or folder / f"eval_{split}"
    progress, log = progress_outputs(False if quiet else None)
    result = run_evaluate(
        model,
        data,
        out,
        split=split,
        profile=profile,
        inference_cfg=inference,
        pixel_size_um=pixel_size,
        progress=progress,
        log=log,
    )
    m = result.means
    relative = result.per_image["count_error_rel"].abs().median()  # NaN: no image has nuclei
    relative_said = (
        f"median |relative| {relative:.1%}"
        if math.isfinite(relative)
        else "no annotated nucleus to compare with"
    )
    area = m["area_ratio"]
    size = (
        f"matched nuclei {area:.2f}x their annotated area"
        if math.isfinite(area)
        else "none matched"
    )
    rows = result.per_image
    blank = int(((rows["n_true"] == 0) & (rows["n_pred"] == 0)).sum())
    # Such images score 1.0 on everything and lift the means: say how many there are.
    blanks = f" ({blank} with no nucleus on either side, each scored 1.0)" if blank else ""
    typer.echo(
        f"{len(result.per_image)} images{blanks}: Dice {m['dice']:.4f}  AJI {m['aji']:.4f}  "
        f"PQ {m['pq']:.4f}  "
        f"F1 {m['f1']:.4f}  count error {m['count_error']:+.1f} nuclei per image "
        f"({relative_said}); {size}; tables in {result.out_dir}"
    )
    typer.echo(describe_errors(result.per_image))


def _parse_space(params: list[str]) -> dict[str, list[Any]] | None:
    from mlseg.config import read_yaml_values

    space: dict[str, list[Any]] = {}
    for item in params:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(
                f"--param {item!r}: expected section.field=v1,v2 (e.g. train.lr=1e-4,1e-3)"
            )
        # one YAML flow list, so a value may be a list itself: stain_tta=[1.0,1.5],[1.0]
        parsed = read_yaml_values(f"[{values}]", f"--param {item!r}")
        if key.strip() in space:  # the first list would be dropped without a word
            raise ConfigError(
                f"--param {key.strip()} is given twice; list all its values in one: "
                f"{key.strip()}=v1,v2,v3"
            )
        space[key.strip()] = parsed
    return space or None


def tune(
    config: Annotated[Path, typer.Argument(help="YAML run config (the base of every trial).")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder (default: data.root).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/<config name>_tune).")
    ] = None,
    trials: Annotated[int, typer.Option(help="Trials to run (0 = the whole grid).")] = 8,
    budget_steps: Annotated[int, typer.Option(help="Training steps per trial.")] = 200,
    method: Annotated[str, typer.Option(help="random or grid.")] = "random",
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="Searched values, repeatable: section.field=v1,v2 (default: lr, encoder, dice weight, patch)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random search.")] = 0,
    validate: ValidateOpt = True,
) -> None:
    """Small hyperparameter search; prints the ranked table, writes best_config.yaml."""
    from mlseg.tune import tune as run_tune

    # --device for the trials alone: best_config.yaml keeps the config's own
    cfg, root = _load(config, data, None, None)
    out = out or Path("runs") / f"{config.stem}_tune"
    fingerprint = _validated(config, root, out / "validation", quiet=False) if validate else None
    bar, log = progress_outputs()  # in a job's log, each trial's epochs and a line a minute
    table = run_tune(
        cfg,
        root,
        out,
        trials=trials or None,
        budget_steps=budget_steps,
        space=_parse_space(param or []),
        method=method,
        seed=seed,
        fingerprint_hash=fingerprint,
        progress=bar,
        log=log,
        device=device,
    )
    typer.echo(table.drop(columns=["out_dir"]).to_string(index=False))
    typer.echo(f"best config: {out / 'best_config.yaml'}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to ``app``."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("tune")(tune)
