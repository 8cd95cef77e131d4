"""Typed user-facing errors.

Every error a person can fix carries a one-line message that names the file (or key) and
what to do. The CLI prints ``str(err)`` and exits non-zero; nothing else is shown.
"""

from __future__ import annotations


class MlsegError(Exception):
    """Base class of errors caused by input a user can fix."""

    exit_code = 2


class ConfigError(MlsegError):
    """A configuration or profile file has an unknown key or a bad value."""


class ResumeError(ConfigError):
    """An output folder holds a run trained with another model, recipe or data."""


class DatasetError(MlsegError):
    """A dataset does not follow the layout contract (see ``mlseg.dataset``)."""


class ImageReadError(MlsegError):
    """An image or mask cannot be decoded (missing, truncated, unsupported)."""


class ModelError(MlsegError):
    """A model or checkpoint cannot be built or loaded as asked."""


class ValidationFailed(MlsegError):
    """A dataset failed error-level data-validation expectations."""

    exit_code = 1
