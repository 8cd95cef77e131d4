"""Typed user-facing errors.

Every error a person can fix carries a one-line message that names the file (or key) and
what to do. The CLI prints ``str(err)`` and exits non-zero; nothing else is shown.
"""

from __future__ import annotations

import os
from pathlib import Path


class MlsegError(Exception):
    """Base class of errors caused by input a user can fix."""

    exit_code = 2


class ConfigError(MlsegError):
    """A configuration or profile file has an unknown key or a bad value."""


class ResumeError(ConfigError):
    """An output folder holds a run trained with another model, recipe or data."""


class DatasetError(MlsegError):
    """A dataset does not follow the layout contract (see ``mlseg.dataset``)."""


def not_a_folder(path: str | os.PathLike, what: str) -> DatasetError:
    """The error for a path given as a ``what`` folder ("dataset", "input") that is none:
    missing, or a file."""
    path = Path(path)
    if path.exists():
        return DatasetError(f"{path}: a file, not a {what} folder; give the folder it is in")
    return DatasetError(f"{path}: {what} folder not found; check the path")


class ImageReadError(MlsegError):
    """An image or mask cannot be decoded (missing, truncated, unsupported)."""


class ModelError(MlsegError):
    """A model or checkpoint cannot be built or loaded as asked."""


class ValidationFailed(MlsegError):
    """A dataset failed error-level data-validation expectations."""

    exit_code = 1
