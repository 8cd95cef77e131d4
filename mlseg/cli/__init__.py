"""The ``mlseg`` command line: parses arguments, builds a config, calls the library.

Each stage registers its commands from its own module (``register(app)``). A user error
(:class:`~mlseg.errors.MlsegError`) prints one line to stderr and exits non-zero.
"""

from __future__ import annotations

import sys

import typer

from mlseg.errors import MlsegError

app = typer.Typer(
    name="mlseg",
    help="Microscopy nuclei segmentation: validate, train, segment, quantify, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    from mlseg.cli import data, models, segment, train, validate

    for module in (data, validate, train, segment, models):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except MlsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except typer.Exit as err:
        return err.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
