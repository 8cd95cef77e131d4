"""Task runner choice: threads on this machine, or Dask to scale out.

``thread`` (default): a :class:`~prefect.task_runners.ThreadPoolTaskRunner` of ``workers``
threads; PyTorch and OpenCV release the GIL, so batches of images run in parallel.

``dask``: :class:`prefect_dask.DaskTaskRunner`. With no address it starts a local cluster
of ``workers`` processes (one thread each, no dashboard) for the flow run and tears it down
after; with ``address`` (``tcp://scheduler:8786``) it uses an existing Dask cluster, which
can span machines (each worker needs this package installed and the data paths reachable).

Flows take ``task_runner``/``dask_address``/``workers`` as parameters, so a deployment
scales out by configuration. Empty values fall back to the environment variables
``MLSEG_TASK_RUNNER`` and ``MLSEG_DASK_ADDRESS``, read when a runner is built.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from mlseg.errors import ConfigError

RUNNERS = ("thread", "dask")


def add_runner_arguments(parser) -> None:
    """The task-runner options shared by the flows' command lines (``argparse`` parser)."""
    parser.add_argument(
        "--task-runner",
        choices=("thread", "dask"),
        default=None,
        help="run batches on threads of this machine (default) or on Dask",
    )
    parser.add_argument(
        "--dask-address", default=None, help="an existing Dask scheduler (tcp://host:8786)"
    )
    parser.add_argument(
        "--workers",
        type=_at_least_one,
        default=None,
        help="threads, or processes of a local Dask cluster (default: CPU cores, at most 4)",
    )


def _at_least_one(text: str) -> int:
    """``--workers`` as argparse takes it: 0 or less is refused on the command line, before
    a Prefect server starts (as :func:`runner_settings` refuses it from a flow parameter)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value}; leave it out for the default"
        )
    return value


def runner_settings(
    kind: str | None = None, address: str | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Resolve the runner choice: arguments first, then the environment, then defaults."""
    address = address or os.environ.get("MLSEG_DASK_ADDRESS") or None
    kind = (kind or os.environ.get("MLSEG_TASK_RUNNER") or "").strip().lower()
    kind = kind or ("dask" if address else "thread")  # an address alone asks for Dask
    if kind not in RUNNERS:
        raise ConfigError(f"task runner {kind!r}: choose one of {', '.join(RUNNERS)}")
    if address and kind != "dask":
        raise ConfigError(f"dask address {address!r} given with task runner {kind!r}; use dask")
    if kind == "dask":  # before any work: the pipeline builds its runner only after training
        _dask_runner_class()
    from mlseg.inventory import usable_cpus  # a container's CPU quota, not the host's cores

    # 0 is no number of threads: it ran the CPU default unsaid (inventory's 0 means "one per
    # core", so a user may well try it here); only an empty value takes the default
    if workers is not None and int(workers) < 1:
        raise ConfigError(
            f"workers must be at least 1, got {workers}; leave it empty for the default "
            "(the usable CPU cores, at most 4)"
        )
    workers = min(4, usable_cpus()) if workers is None else int(workers)
    return {"kind": kind, "address": address, "workers": workers}


def _dask_runner_class():
    """:class:`prefect_dask.DaskTaskRunner`, or :class:`ConfigError` naming what to install
    where it (or Dask under it) cannot be imported (an install without its dependencies)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ConfigError(
            f"task runner 'dask' needs prefect-dask and dask.distributed ({err}); "
            "pip install prefect-dask, or use --task-runner thread"
        ) from None
    return DaskTaskRunner


def make_task_runner(
    kind: str | None = None, address: str | None = None, workers: int | None = None
):
    """A fresh task runner for one flow run (see the module docstring)."""
    settings = runner_settings(kind, address, workers)
    if settings["kind"] == "thread":
        return ThreadPoolTaskRunner(max_workers=settings["workers"])
    DaskTaskRunner = _dask_runner_class()
    if settings["address"]:
        return DaskTaskRunner(address=settings["address"])
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": settings["workers"],
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )
