"""Dataset commands: ``init``, ``ingest``, ``synth``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlseg.cli import progress_outputs
from mlseg.config import DataConfig, load_config


def _data_cfg(config: Path | None, mask_suffix: str | None) -> DataConfig:
    cfg = load_config(config).data if config else DataConfig()
    return cfg.model_copy(update={"mask_suffix": mask_suffix}) if mask_suffix else cfg


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (data section used).")
]


def init(
    directory: Annotated[Path, typer.Argument(help="New dataset folder.")],
    config: ConfigOpt = None,
) -> None:
    """Scaffold an empty dataset with a README explaining the layout."""
    from mlseg.dataset import init_dataset

    root = init_dataset(directory, _data_cfg(config, None))
    typer.echo(f"created {root} (see {root / 'README.md'})")


def ingest(
    src: Annotated[
        Path,
        typer.Argument(
            help="Source: an mlseg dataset, flat original/+masks/ (masks as images, QuPath "
            "GeoJSON or ImageScope XML), nnU-Net raw, DSB 2018, or Cellpose folder."
        ),
    ],
    directory: Annotated[
        Path, typer.Argument(help="New dataset folder (must be empty or absent).")
    ],
    layout: Annotated[
        str,
        typer.Option(
            help="Source layout: auto (detected), contract (an mlseg dataset: train/, test/), "
            "flat, nnunet, dsb or cellpose."
        ),
    ] = "auto",
    test_fraction: Annotated[
        float,
        typer.Option(
            help="Share of images put in the test split (an mlseg dataset, or nnU-Net's with "
            "labelled imagesTs, keeps its own)."
        ),
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 0,
    link: Annotated[bool, typer.Option(help="Hard-link (or symlink) instead of copying.")] = False,
    pixel_sizes: Annotated[
        Path | None,
        typer.Option(
            help="CSV of image stem + pixel_size_um (or mpp) per image (before --pixel-size)."
        ),
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option(
            help="Microns per pixel of every image that --pixel-sizes (or the source's own "
            "table) does not list (before the image's metadata)."
        ),
    ] = None,
    mask_suffix: Annotated[
        str | None, typer.Option(help="Mask name suffix (default _mask).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Import a dataset into the mlseg layout with a seeded train/test split and a manifest."""
    from mlseg.ingest import describe_pixel_sizes
    from mlseg.ingest import ingest as run_ingest

    bar, log = progress_outputs()
    result = run_ingest(
        src,
        directory,
        layout=layout,
        test_fraction=test_fraction,
        seed=seed,
        link=link,
        cfg=_data_cfg(config, mask_suffix),
        pixel_sizes=pixel_sizes,
        pixel_size_um=pixel_size,
        progress=bar,
        log=log,
    )
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.counts.items()))
    typer.echo(
        f"ingested {len(result.manifest)} pairs ({result.layout} layout; {counts}) into {result.root}"
    )
    typer.echo(describe_pixel_sizes(result.manifest, result.root))


def synth(
    directory: Annotated[Path, typer.Argument(help="New dataset folder.")],
    n_train: Annotated[int, typer.Option(help="Training images.")] = 24,
    n_test: Annotated[int, typer.Option(help="Test images.")] = 8,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    kinds: Annotated[
        str, typer.Option(help="Comma-separated: he, ihc, fluorescence.")
    ] = "he,ihc,fluorescence",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
) -> None:
    """Generate a synthetic dataset with instance masks (H&E-, IHC- and fluorescence-like)."""
    from mlseg.synth import make_dataset

    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    root = make_dataset(
        directory, n_train=n_train, n_test=n_test, size=size, kinds=kind_list, seed=seed
    )
    typer.echo(f"wrote synthetic dataset to {root}")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("ingest")(ingest)
    app.command("synth")(synth)
