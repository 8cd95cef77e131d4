"""Small helpers shared by the flows: run config from parameters, JSON-safe results."""

from __future__ import annotations

import atexit
import errno
import functools
import os
import signal
import subprocess  # nosec B404: only to start Prefect's own server command apart (temporary_server_apart)
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlseg.config import Config, load_config
from mlseg.errors import MlsegError, missing_package, route_stop_signals


def run_config(config: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The run's :class:`~mlseg.config.Config`: YAML file (or defaults) plus section overrides.

    ``overrides`` is what a deployment parameter holds, e.g. ``{"train": {"max_steps": 300}}``.
    A relative ``config`` is under ``MLSEG_DATA_DIR``, as every path parameter (:func:`data_path`),
    and so, where that is set, are the relative paths it holds (``profiles_file``,
    ``preprocess.stain_reference``): a deployed worker runs each flow in a temporary folder.
    """
    cfg = load_config(data_path(config) if config else None, **(overrides or {}))
    if not os.environ.get("MLSEG_DATA_DIR"):  # a local run: the current folder, as mlseg train
        return cfg
    pre = cfg.preprocess
    return cfg.model_copy(
        update={
            "profiles_file": cfg.profiles_file and data_path(cfg.profiles_file),
            "preprocess": pre.model_copy(
                update={"stain_reference": pre.stain_reference and data_path(pre.stain_reference)}
            ),
        }
    )


def user_errors_exit(main: Callable[[list[str] | None], int]) -> Callable[..., int]:
    """Decorate the ``main`` of a ``python -m flows.X`` entry point: a user error
    (:class:`~mlseg.errors.MlsegError`) ends in one ``error:`` line and its exit code, as
    ``mlseg`` ends it, not in a traceback, and so does a dependency this Python cannot import
    and a Prefect API that does not answer (exit code 1); Ctrl-C in ``aborted`` and 130.
    SIGTERM (``timeout``, ``docker stop``, ``scancel``) ends it with 143, and SIGHUP (the
    terminal closed; ignored under ``nohup``) with 129, through Python's exit handlers, among
    them the one that stops the temporary server (the default ended the process past them,
    the server left running); ``main`` calls :func:`temporary_server_apart` before its flow.
    """

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        before = route_stop_signals(lambda signum, _: sys.exit(128 + signum))
        try:
            return main(argv)
        except MlsegError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except ModuleNotFoundError as err:
            said = missing_package(err)
            if said is None:
                raise
            print(f"error: {said}", file=sys.stderr)
            return said.exit_code
        except RuntimeError as err:
            said = unreachable_api(err)
            if said is None:
                raise
            print(f"error: {said}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # after Prefect's crash report, not a second traceback
            print("aborted", file=sys.stderr)
            return 130
        finally:
            for signum, handler in before.items():
                signal.signal(signum, handler)

    return run


#: Seconds the temporary server may take to start where no setting says otherwise: Prefect's
#: default 20 s was too short on a busy 2-core machine (21-31 s measured there), where
#: ``python -m flows.pipeline`` then failed with "Timed out while attempting to connect to
#: ephemeral Prefect API server". The Dockerfile sets the same.
EPHEMERAL_STARTUP_TIMEOUT_S = 180


def temporary_server_apart() -> None:
    """Have Prefect start its temporary API server (a run without ``PREFECT_API_URL``) in a
    session of its own, stopped at exit as Prefect stops it.

    Started as Prefect starts it, the server shared the terminal's process group: Ctrl-C in
    the terminal (or a signal to the group, as ``kill -- -PGID`` sends) stopped it with the
    flow, which then retried it for minutes and exited 1 with 111 lines of tracebacks,
    not ``aborted`` and 130. Apart, it outlives the signal long enough for the flow to
    report its end, and Python's exit handlers stop it. This patches a Prefect internal
    (``SubprocessASGIServer._run_uvicorn_command`` calling ``subprocess.Popen``) on the one
    server object; where a Prefect release has neither, nothing changes (the server shares
    the group, as before). Call it in ``main`` just before the flow: importing the server
    module takes seconds, which ``--help`` and a usage error need not wait for. With no
    ``PREFECT_API_URL``, a ``PREFECT_HOME`` that cannot be written is an error naming it
    (:func:`_writable_prefect_home`). Unless ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
    is set, the server may take :data:`EPHEMERAL_STARTUP_TIMEOUT_S` to start.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        get_current_settings,
    )

    if not PREFECT_API_URL.value():
        _writable_prefect_home()
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    try:
        from prefect.server.api import server as prefect_server

        temporary = prefect_server.SubprocessASGIServer()
        launch = temporary._run_uvicorn_command
        started = temporary.running
    except (ImportError, AttributeError):
        return
    if started or getattr(prefect_server, "subprocess", None) is not subprocess:
        return
    apart = types.SimpleNamespace(**vars(subprocess))
    apart.Popen = functools.partial(subprocess.Popen, start_new_session=True)

    def launch_apart():
        prefect_server.subprocess = apart
        try:
            return launch()
        finally:
            prefect_server.subprocess = subprocess

    temporary._run_uvicorn_command = launch_apart
    # Prefect reads the setting once, at import: set later, the variable changed nothing
    if "startup_timeout_seconds" not in get_current_settings().server.ephemeral.model_fields_set:
        temporary.start = functools.partial(temporary.start, timeout=EPHEMERAL_STARTUP_TIMEOUT_S)
    # Prefect registers its own stop just after starting it; a signal in between would
    # leave a server in its own session running (stop() does nothing when none runs)
    atexit.register(temporary.stop)


def _writable_prefect_home() -> None:
    """Raise :class:`~mlseg.errors.OutputError` naming ``PREFECT_HOME`` where it cannot be
    written: the temporary server keeps its database there. A read-only home (``~/.prefect``
    on a cluster node, a service account's) ended a flow after 40-70 s in 259 lines of
    tracebacks from the server's database, the last 'Timed out while attempting to connect to
    ephemeral Prefect API server', none naming the folder or the setting."""
    import tempfile

    from prefect.settings import PREFECT_HOME

    from mlseg.errors import writes_named

    home = Path(PREFECT_HOME.value())
    hint = (
        "Prefect keeps its temporary server's database there (no PREFECT_API_URL is set): "
        "set PREFECT_HOME to a folder you can write"
    )
    with writes_named(home, hint):
        home.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=home).close()


def unreachable_api(err: RuntimeError) -> str | None:
    """What to do where a flow could not start because the Prefect API that
    ``PREFECT_API_URL`` names did not answer (Prefect's "Failed to reach API at URL", the end
    of a 110-line traceback that never named the setting); None for any other error."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url or not isinstance(err.__cause__, httpx.TransportError):
        return None
    return (
        f"cannot reach the Prefect API at {url} (PREFECT_API_URL): {err.__cause__}; start "
        "the server it names (prefect server start) or correct it, or unset PREFECT_API_URL "
        "to run on a temporary local server"
    )


def batch_label(paths: list[str]) -> str:
    """What names a batch's task run in the dashboard: its first file, and how many more."""
    first = Path(paths[0]).name
    return first if len(paths) == 1 else f"{first} +{len(paths) - 1}"


#: Causes of an ``OSError`` that retrying in seconds cannot mend: a disk full, a quota spent,
#: a file size limit, a read-only file system.
_LASTING = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def is_transient(exc: BaseException | None) -> bool:
    """I/O errors worth retrying (network file systems, object stores, busy files).

    Errors a person must fix (:class:`~mlseg.errors.MlsegError`: unreadable image, bad
    config) and missing files are not retried: retrying cannot help.
    """
    from mlseg.errors import MlsegError

    if exc is None or isinstance(exc, MlsegError):
        return False
    if isinstance(
        exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError
    ):
        return False
    # a full disk, quota or read-only file system is there still seconds later
    if isinstance(exc, OSError) and exc.errno in _LASTING:
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only on :func:`is_transient` errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # the result itself may be unreadable
            exc = err
    return is_transient(exc if isinstance(exc, BaseException) else None)


def log_warnings() -> None:
    """Python warnings raised in a flow or task run go to its Prefect log too, at WARNING.

    mlseg says what a person should know (a pixel size ignored, a table that names none of
    the images) with :func:`warnings.warn`, which Prefect does not record: a deployed run's
    warnings reached only the worker's stderr, never the run's logs in the dashboard. Call it
    at the start of each flow and of each task that may run in another process (Dask);
    once per process is enough.
    """
    import warnings

    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    shown = warnings.showwarning
    if getattr(shown, "to_run_log", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        shown(message, category, filename, lineno, file, line)
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            get_run_logger().warning("%s: %s", category.__name__, message)

    showwarning.to_run_log = True
    warnings.showwarning = showwarning


def run_log() -> Callable[[str], object] | None:
    """The run logger's ``info``, for the ``log`` of a long mlseg call in a task: its line a
    minute on how far it is (:class:`mlseg.progress.ProgressLog`) in the run's log in the
    dashboard, where no bar is drawn; None outside a flow or task run (a task's ``.fn``
    called from a script or a test), where it says nothing."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    return get_run_logger().info


def data_path(path: str | Path, name: str | None = None) -> Path:
    """A path parameter as the flow sees it: absolute as given; relative ones under
    ``MLSEG_DATA_DIR`` when that is set (deployed workers: ``/data``), else the current folder.

    Only a registry is read from a URL (the flows check for one before calling this); any
    other URL is refused by name, not read as a folder ``s3:/...`` under ``MLSEG_DATA_DIR``.
    An empty one (a field cleared in the dashboard, ``-p out_dir=``) is refused, naming the
    parameter ``name``: it was the data folder itself, where a segment run wrote its outputs
    among the datasets, and an empty ``input_dir`` completed with nothing to do.
    """
    import os

    from mlseg.errors import ConfigError

    if not str(path).strip():
        said = f"parameter {name!r}" if name else "a path parameter"
        raise ConfigError(
            f"{said} is empty; give a path (relative paths are under MLSEG_DATA_DIR, "
            "'.' for that folder itself)"
        )
    if "://" in str(path):
        raise ConfigError(
            f"{path}: only a registry is read from a URL; give this as a path on the worker "
            "(relative paths are under MLSEG_DATA_DIR)"
        )
    path = Path(os.path.expanduser(str(path)))
    if path.is_absolute():
        return path
    base = os.environ.get("MLSEG_DATA_DIR")
    return (Path(base) / path) if base else path.resolve()


def resolve_profile(
    name: str,
    profiles: dict[str, Any] | str | None = None,
    overrides: dict[str, Any] | None = None,
    profiles_file: str | Path | None = None,
):
    """The :class:`~mlseg.config.Profile` a run uses.

    ``profiles`` is the content of a ``profiles.yaml`` as a deployment parameter (a mapping,
    or its JSON text as ``prefect.yaml``'s build step passes it); ``None`` reads
    ``profiles_file`` (default: the packaged ``mlseg/profiles.yaml``). ``overrides`` change
    single keys (nested sections merged), e.g. ``{"pixel_size_um": 0.25}``. Every value is
    validated as in a profiles file.
    """
    import json

    from mlseg.config import Profile, get_profile, parse
    from mlseg.errors import ConfigError

    source = "deployment parameter 'profiles'"
    if isinstance(profiles, str) and profiles.strip():
        try:
            profiles = json.loads(profiles)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: not valid JSON ({err})") from None
    if profiles:
        table = profiles.get("profiles", profiles) if isinstance(profiles, dict) else None
        if not isinstance(table, dict) or name not in table:
            known = ", ".join(sorted(table)) if isinstance(table, dict) else "none"
            raise ConfigError(f"{source}: unknown profile {name!r}; choose one of {known}")
        if table[name] is not None and not isinstance(table[name], dict):
            raise ConfigError(
                f"{source}: profile {name!r} must be a mapping of settings, got {table[name]!r}"
            )
        values = {**(table[name] or {}), "name": name}
    else:
        values = get_profile(name, profiles_file).model_dump(mode="json")
        source = str(profiles_file or "mlseg/profiles.yaml")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    if overrides:
        source += " with overrides"
    return parse(Profile, values, f"{source} (profile '{name}')")
