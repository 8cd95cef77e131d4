"""``mlseg validate DIR``: the data-validation gate (inventory + Great Expectations suites)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mlseg.cli import progress_outputs

LOG_WIDTH = 100_000  # Rich's width where stdout is no terminal: tables as wide as they need


def print_report(report: Any, console: Any = None) -> None:
    """Rich table, one row per expectation (failed errors, failed warnings, then passes),
    then what to do for each failure, after the bound its suite sets (``not_blank (needs
    grey_std >= 0.002): ...``: the notes give no number, a lab may edit it). File names and
    messages are printed as they are, as Text: Rich took ``[b]`` in ``slide[b].png`` for markup and showed ``slide.png``, and
    ``:b:`` in ``well:b:03.png`` for an emoji code and showed ``well🅱03.png``."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal:
            # a job's log: one line per row and per fix; at Rich's 80 columns a file name
            # was split mid-word ("patient_0001_sl" / "ide_03.png") and grep found nothing
            console = Console(width=LOG_WIDTH)
    table = Table(title=Text(f"Data validation of {report.root}"))
    table.add_column("rule", style="bold", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("failed", justify="right", no_wrap=True)  # failed/checked rows
    table.add_column("first files", overflow="fold")
    order = sorted(report.outcomes, key=lambda o: (o.success, o.severity != "error"))
    for o in order:
        if o.success:
            result = "[green]pass[/green]"
        elif o.severity == "error":
            result = "[red]FAIL[/red]"
        else:
            result = "[yellow]warn[/yellow]"
        first = ", ".join(o.first_failed)
        if o.n_failed > len(o.first_failed) and first:
            first += f", ... (+{o.n_failed - len(o.first_failed)})"
        if o.error:
            first = f"could not run: {o.error}"
        table.add_row(Text(o.rule), o.severity, result, f"{o.n_failed}/{o.n_checked}", Text(first))
    console.print(table)
    for o in order:
        if not o.success:
            colour = "red" if o.severity == "error" else "yellow"
            bound = f" (needs {o.bound})" if o.bound else ""
            console.print(Text.assemble((o.rule, colour), bound, ": ", o.fix))


def _print_inventory(inventory: str | None, profile: tuple[Any, float | None]) -> None:
    """Why each unreadable file is unreadable, and which pixel size each split's images will
    train or be scored at, and from where: for those without one, what the run's profile
    and target size (``profile``, :func:`mlseg.inventory.run_profile`) give and what
    training makes of it."""
    import pandas as pd

    from mlseg.inventory import pixel_size_summary, read_errors

    if inventory and Path(inventory).is_file():
        files = pd.read_parquet(inventory)
        for line in read_errors(files):
            typer.echo(f"unreadable: {line}")
        for line in pixel_size_summary(files, *profile):
            typer.echo(f"pixel sizes, {line}")


def validate(
    directory: Annotated[
        Path, typer.Argument(help="Dataset folder ({train,test}/{original,masks}).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default ./validation/<dataset name>)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (data section used).")
    ] = None,
    mask_kind: Annotated[
        str | None, typer.Option(help="Declared mask kind: auto, binary or instance.")
    ] = None,
    min_images: Annotated[
        int | None, typer.Option(min=0, help="Minimum image/mask pairs per split (default 1).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Parallel readers (0 = one per CPU core).")
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Print only the verdict: no progress bar, no line a minute."
        ),
    ] = False,
) -> None:
    """Check a dataset against the data contract: verdict, Data Docs, inventory, fingerprint.

    The verdict, validation.html, reads offline; the Data Docs need an internet connection.

    Exits 1 if any error-level expectation fails (training must not start), 0 otherwise;
    warnings are reported. The dataset is only read.
    """
    from expectations import validate_dataset
    from mlseg.config import load_config
    from mlseg.inventory import load_validate_config, run_profile

    cfg = load_validate_config(
        config, mask_kind=mask_kind, min_images_per_split=min_images, workers=workers
    )
    profile = run_profile(load_config(config))  # training's; a bad one before the reading
    out = out if out is not None else Path("validation") / directory.resolve().name
    bar, log = progress_outputs(False if quiet else None)
    report = validate_dataset(directory, out, cfg, progress=bar, log=log)
    if not quiet:
        print_report(report)
        _print_inventory(report.outputs.get("inventory"), profile)
        typer.echo(f"report: {report.page}")
        typer.echo(f"Data Docs (needs an internet connection): {report.data_docs}")
        typer.echo(
            f"inventory: {report.outputs.get('inventory')}  "
            f"fingerprint: {report.outputs.get('fingerprint')}"
        )
    report.check(directory)
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    typer.echo(f"{directory}: passed{warned}; see {report.page}")


def register(app: typer.Typer) -> None:
    """Add ``validate`` to ``app``."""
    app.command()(validate)
