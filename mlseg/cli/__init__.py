"""The ``mlseg`` command line: parses arguments, builds a config, calls the library.

Each stage registers its commands from its own module (``register(app)``). A user error
(:class:`~mlseg.errors.MlsegError`), and a dependency that this Python cannot import, print
one line to stderr and exit non-zero; mlseg's own warnings print as ``warning: ...`` lines,
without Python's file and source line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import typer

from mlseg.errors import MlsegError, missing_package, os_error_line, route_stop_signals

app = typer.Typer(
    name="mlseg",
    help="Microscopy nuclei segmentation: validate, train, segment, quantify, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from mlseg.registry import code_version

        typer.echo(f"mlseg {code_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print mlseg's version (and its git commit) and exit.",
    ),
) -> None:
    pass


def progress_outputs(show: bool | None = None) -> tuple[bool, Callable[[str], object] | None]:
    """``(bar, log)`` of a long command. By default the bar where stderr is a terminal; in a
    job's log file, where a bar would be a line per item, a plain line now and then on
    stderr instead (:class:`mlseg.progress.ProgressLog`), so a working run is told from a
    hung one. ``show`` True: the bar alone (``--progress``); False: neither
    (``--no-progress``, ``--quiet``)."""
    if show is not None:
        return show, None
    if sys.stderr.isatty():
        return True, None
    return False, partial(typer.echo, err=True)


def _register_all() -> None:
    from mlseg.cli import data, models, segment, train, validate

    for module in (data, validate, train, segment, models):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    before = route_stop_signals(_terminate)
    try:
        # Outside standalone mode Click returns the code of a ``typer.Exit`` instead of
        # raising it (``mlseg segment`` ends with 1 when an image failed).
        code = app(args=argv, prog_name="mlseg", standalone_mode=False)
    except MlsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except typer.Exit as err:
        return err.exit_code
    except (typer.Abort, KeyboardInterrupt) as err:
        # typer turns an EOFError (a truncated .gz or .bz2 file read) into Abort too: no Ctrl-C
        if isinstance(err.__cause__, EOFError):
            raise err.__cause__ from None
        _say("aborted")
        return 130
    except _Terminated as err:
        _say("terminated")
        return err.code
    except ModuleNotFoundError as err:
        said = missing_package(err)
        if said is None:  # mlseg's own module, or another's: a bug to show whole
            raise
        print(f"error: {said}", file=sys.stderr)
        return said.exit_code
    except OSError as err:
        if err.filename is None:  # not about a file: a bug to show whole
            raise
        # a file mlseg writes outside the atomic writers (which say OutputError): the disk
        # filled, the folder turned read-only: one line, as for any other error
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if not isinstance(err, _usage_errors()):
            raise
        show = getattr(err, "show", None)  # usage line + what is wrong, or the help if no args
        if show is None:
            print(f"error: {err}", file=sys.stderr)
        else:
            show()
        return err.exit_code
    finally:
        warnings.formatwarning = formatwarning
        for signum, handler in before.items():
            signal.signal(signum, handler)
    if code == 130:  # Ctrl-C, which typer 0.2x turns into this code without a word
        _say("aborted")
    return code if isinstance(code, int) else 0


class _Terminated(SystemExit):
    """SIGTERM (scancel, a SLURM job's time limit, docker stop) or SIGHUP (the SSH session
    or terminal closed) raised in the main thread, so that the file being written is removed
    as on Ctrl-C; Python's default ended the process at once and left its temporary (57 MB
    of a checkpoint's) in the output folder."""


def _terminate(signum, frame) -> None:
    raise _Terminated(128 + signum)


def _say(line: str) -> None:
    """``line`` on stderr, unless stderr is gone (the terminal that hung up)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


_PACKAGE = Path(__file__).resolve().parent.parent
_PYTHON_FORMAT = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """mlseg's warnings as one ``warning: ...`` line each; others as Python formats them.
    (Only the display changes: recorded warnings, as in tests, are untouched.)"""
    if not Path(filename).resolve().is_relative_to(_PACKAGE):
        return _PYTHON_FORMAT(message, category, filename, lineno, line)
    return f"warning: {message}\n"


def _usage_errors() -> tuple[type[Exception], ...]:
    """The exception types of a command-line usage error (unknown option, missing argument).

    Typer 0.2x raises them from its own copy of Click (``typer.TyperException``); earlier
    releases from Click itself. Usage errors have ``show()`` and ``exit_code`` 2.
    """
    kinds: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        kinds.append(typer.TyperException)
    try:
        import click
    except ImportError:  # typer 0.2x does not need it
        pass
    else:
        kinds.append(click.ClickException)
    return tuple(kinds)


if __name__ == "__main__":
    sys.exit(main())
