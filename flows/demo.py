"""``python -m flows.demo [DIR]``: the whole pipeline on a synthetic dataset, no account needed.

Generates ``DIR/dataset`` (reused when present; ``--n-train``, ``--n-test``, ``--size`` or
``--seed`` other than it was made with are then refused), then runs the ``pipeline`` flow with the
small CPU budget of ``flows/demo.yaml`` and prints where the report, the model and the
measurements are. Everything stays inside ``DIR`` (default ``demo-run``), Prefect's state
included: with no ``PREFECT_API_URL`` set, Prefect starts a temporary local server backed by
``DIR/.prefect/prefect.db`` and stops it at exit. To browse the runs afterwards::

    PREFECT_HOME=DIR/.prefect prefect server start      # then open http://127.0.0.1:4200

With ``PREFECT_API_URL`` (and ``PREFECT_API_KEY``) set, the demo reports to that server or
Prefect Cloud workspace instead. Prefect reads its settings once, at import, so this module
sets them before importing anything that imports Prefect.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.common import temporary_server_apart, user_errors_exit

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"


def _prefect_environment(demo_dir: Path) -> None:
    """Settings for Prefect's temporary server, unless the user chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(demo_dir / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")


SYNTH_DEFAULTS = {"n_train": 24, "n_test": 8, "size": 256, "seed": 0}


def _check_made_with(dataset: Path, given: dict[str, int]) -> None:
    """Refuse options of the synthetic dataset that the one already in ``dataset`` was not
    made with: it is reused as it is, and a rerun with ``--n-train 48`` trained on the 24
    images of the first run without a word."""
    import pandas as pd

    from mlseg.errors import ConfigError
    from mlseg.io import read_image

    made: dict[str, int] = {}
    manifest = dataset / "manifest.csv"
    if manifest.is_file():
        rows = pd.read_csv(manifest)
        made = {
            "n_train": int((rows["split"] == "train").sum()),
            "n_test": int((rows["split"] == "test").sum()),
            "size": read_image(dataset / rows["image"].iloc[0]).shape[0] if len(rows) else 0,
            "seed": int(rows["seed"].iloc[0]) if len(rows) else 0,
        }
    if all(made.get(k) == v for k, v in given.items()):
        return
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
    had = " ".join(f"--{k.replace('_', '-')} {made[k]}" for k in given if k in made)
    raise ConfigError(
        f"{dataset} holds a synthetic dataset{f' made with {had}' if had else ''}, which the "
        f"demo reuses as it is: {options} would be ignored; delete it or give another folder "
        "to generate one with them"
    )


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.demo", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "demo_dir", nargs="?", default="demo-run", type=Path, help="output folder (demo-run)"
    )
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config (YAML)")
    # None: not given; a dataset already in DIR is checked against the options given only
    parser.add_argument("--n-train", type=int, help="synthetic training images (24)")
    parser.add_argument("--n-test", type=int, help="synthetic test images (8)")
    parser.add_argument("--size", type=int, help="image side in pixels (256)")
    parser.add_argument("--seed", type=int, help="seed of the synthetic dataset (0)")
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="train afresh in DIR/pipeline (a resume refuses another recipe or dataset)",
    )
    args = parser.parse_args(argv)
    demo_dir = args.demo_dir.resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    _prefect_environment(demo_dir)

    from mlseg.synth import make_dataset

    dataset = demo_dir / "dataset"
    given = {k: getattr(args, k) for k in SYNTH_DEFAULTS if getattr(args, k) is not None}
    if not (dataset / "train").is_dir():
        print(f"generating the synthetic dataset in {dataset}", flush=True)
        make_dataset(dataset, **{**SYNTH_DEFAULTS, **given})
    elif given:
        _check_made_with(dataset, given)
    from flows.pipeline import pipeline

    temporary_server_apart()
    result = pipeline(
        str(dataset),
        str(demo_dir / "pipeline"),
        config=str(args.config),
        registry=str(demo_dir / "registry"),
        progress=sys.stderr.isatty(),  # in a job's log file, a line per epoch instead
        resume=args.resume,
    )
    means = result["means"]
    print(
        "\n".join(
            [
                "",
                "mlseg demo finished",
                f"  test Dice {means['dice']:.3f}  AJI {means['aji']:.3f}  PQ {means['pq']:.3f}",
                f"  model decision: {result['decision']['reason']}",
                f"  report:       {result['report']}",
                f"  model:        {result['model']}",
                f"  measurements: {result['measurements (per image)']} (one row per image)",
                f"                {result['measurements (per nucleus)']} (one row per nucleus)",
                f"  browse the runs: PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start",
            ]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
