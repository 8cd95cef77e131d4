"""Typed user-facing errors, and warnings said once.

Every error a person can fix carries a one-line message that names the file (or key) and
what to do. The CLI prints ``str(err)`` and exits non-zero; nothing else is shown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class MlsegError(Exception):
    """Base class of errors caused by input a user can fix."""

    exit_code = 2


class ConfigError(MlsegError):
    """A configuration or profile file has an unknown key or a bad value."""


class ResumeError(ConfigError):
    """An output folder holds a run trained with another model, recipe or data; ``problems``
    names each difference (``"train.lr: 0.001 -> 0.003"``)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class DatasetError(MlsegError):
    """A dataset does not follow the layout contract (see ``mlseg.dataset``)."""


def not_a_folder(path: str | os.PathLike, what: str) -> DatasetError:
    """The error for a path given as a ``what`` folder ("dataset", "input") that is none:
    missing, or a file."""
    path = Path(path)
    if path.exists():
        article = "an" if what[:1] in "aeiou" else "a"
        return DatasetError(
            f"{path}: a file, not {article} {what} folder; give the folder it is in"
        )
    return DatasetError(f"{path}: {what} folder not found; check the path")


def size_mismatch(
    mask: str | os.PathLike,
    mask_shape: tuple,
    image_shape: tuple,
    image: str | os.PathLike | None = None,
) -> str:
    """The message for a mask whose ``(H, W, ...)`` differs from its image's; where the mask
    is the image turned by 90 degrees and ``image`` declares an EXIF orientation that turns it
    so when shown, it says that the mask was drawn on the turned view."""
    message = (
        f"{mask}: mask is {mask_shape[1]}x{mask_shape[0]} px but its image is "
        f"{image_shape[1]}x{image_shape[0]}; masks must match their image size"
    )
    if image is not None and tuple(mask_shape[:2]) == (image_shape[1], image_shape[0]):
        from mlseg.io import EXIF_ORIENTATIONS, exif_orientation

        turn = exif_orientation(image)
        if turn is not None and turn >= 5:
            message += (
                f". {Path(image).name} is stored on its side with an EXIF orientation that "
                f"shows it {EXIF_ORIENTATIONS[turn]}, and the mask was drawn on that view: "
                f"save the image turned (e.g. `exiftran -ai`, or Pillow's "
                f"ImageOps.exif_transpose) so its pixels are as shown"
            )
    return message


class ImageReadError(MlsegError):
    """An image or mask cannot be decoded (missing, truncated, unsupported)."""


class ModelError(MlsegError):
    """A model or checkpoint cannot be built or loaded as asked."""


class TrainingDiverged(ModelError):
    """Training's loss became NaN or infinite (a learning rate too high for the data)."""


class OutputError(MlsegError):
    """An output cannot be written: disk full, file size limit, read-only or missing
    permission, a folder in the way. ``path``: the output named, and ``cause`` the
    ``OSError``, where :func:`cannot_write` made it."""

    path: str | None = None
    cause: OSError | None = None


#: What to do about the usual reasons a write fails, by errno.
_WRITE_HINTS = {
    errno.ENOSPC: "free disk space or write elsewhere, then run again",
    errno.EDQUOT: "free space within your quota or write elsewhere, then run again",
    errno.EFBIG: "raise the file size limit (ulimit -f) or write elsewhere, then run again",
    errno.EACCES: "make the folder writable or write elsewhere",
    errno.EPERM: "make the folder writable or write elsewhere",
    errno.EROFS: "write to a writable file system",
    errno.EISDIR: "a folder of that name is in the way: move it",
    errno.ENOTDIR: "a file is in the way where a folder is needed: move it",
    errno.EEXIST: "a file is in the way where a folder is needed: move it",  # from mkdir
}


def cannot_write(
    path: str | os.PathLike, err: OSError, hint: str | None = None
) -> OutputError | None:
    """The error for ``path`` (the output's final name, not its temporary file) that could
    not be written because of ``err``; None where the cause is not one a person fixes (an
    I/O error or time-out of a network file system, which the flows retry as it is).
    ``hint``: what to do, where the caller knows better than the cause's usual advice."""
    if err.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
        said = dangling_link(path)
        if said is not None:
            said.cause = err
            return said
    usual = _WRITE_HINTS.get(err.errno)
    if usual is None:
        return None
    said = OutputError(
        f"{path}: cannot be written ({(err.strerror or str(err)).lower()}); {hint or usual}"
    )
    said.path, said.cause = os.fspath(path), err
    return said


def os_error_line(err: OSError) -> str:
    """``err`` (an ``OSError`` naming a file) in one line: the file or files, the cause and,
    for a folder where a file must be (read or written), the fix; a bare 'is a directory'
    said nothing of what to do."""
    where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    said = f"{where}: {(err.strerror or str(err)).lower()}"
    return f"{said}; {_WRITE_HINTS[errno.EISDIR]}" if err.errno == errno.EISDIR else said


def dangling_link(path: str | os.PathLike) -> OutputError | None:
    """The error for ``path`` where it, or a folder above it, is a link to nothing (an output
    folder on a network share not mounted): naming the link, its target and the fix; None
    where there is no such link. Without it, ``mkdir`` on the link said 'file exists' and
    the output 'a file is in the way where a folder is needed: move it', of a path the user
    never gave ('out/validation/outputs')."""
    path = Path(path)
    for link in (path, *path.parents):
        if os.path.islink(link) and not os.path.exists(link):
            said = OutputError(
                f"{link}: a link to {os.readlink(link)}, which does not exist; create that "
                "folder (or mount its share) or give another folder"
            )
            said.path = os.fspath(link)
            return said
    return None


@contextlib.contextmanager
def writes_named(path: str | os.PathLike, hint: str | None = None):
    """Raise an ``OSError`` from the block as :func:`cannot_write`'s error for ``path`` (the
    folder the user asked for, not a temporary or lock file inside it) where a person can fix
    its cause; any other ``OSError`` goes on as it is."""
    try:
        yield
    except OSError as err:
        said = cannot_write(path, err, hint)
        if said is None:
            raise
        raise said from err


def staged_write_error(
    err: BaseException, staging: str | os.PathLike, final: str | os.PathLike
) -> OutputError | None:
    """:func:`cannot_write`'s error for ``final`` where ``err`` is a write into ``staging``
    (the temporary folder ``final`` is built in, then renamed onto it) that failed for a
    reason a person fixes; None for any other error (a source one cannot read). A full disk
    while a dataset or a registered version was built named the staging folder's file
    ('.ds.7mm580ac.tmp/train/...', '.staging-<hex>/best.safetensors'), a name the user
    never gave, and, raised by a copy, said nothing of what to do."""
    if isinstance(err, OutputError):
        named, cause = [err.path], err.cause
    elif isinstance(err, OSError):
        named, cause = [err.filename, err.filename2], err
    else:
        return None
    if cause is None:
        return None
    inside = os.fspath(staging).rstrip("/") + "/"
    ours = any(isinstance(n, str | os.PathLike) and os.fspath(n).startswith(inside) for n in named)
    # a write's ENOSPC may name no file; reading never runs out of space
    spent = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return cannot_write(final, cause) if ours or spent else None


#: The modules mlseg imports from its dependencies (pyproject.toml), by the distribution that
#: installs each: ``pip install`` takes the distribution's name, not the module's.
DISTRIBUTIONS = {
    "numpy": "numpy",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "typer": "typer",
    "rich": "rich",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
    "scipy": "scipy",
    "PIL": "pillow",
    "tifffile": "tifffile",
    "imagecodecs": "imagecodecs",
    "defusedxml": "defusedxml",
    "torch": "torch",
    "torchvision": "torchvision",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "timm": "timm",
    "safetensors": "safetensors",
    "filelock": "filelock",
    "fsspec": "fsspec",
    "great_expectations": "great-expectations",
    "prefect": "prefect",
    "prefect_dask": "prefect-dask",
    "s3fs": "s3fs",
}


def route_stop_signals(handler: Callable[[int, Any], Any]) -> dict[int, Any]:
    """Route SIGTERM (``docker stop``, ``scancel``) and SIGHUP (the terminal or SSH session
    closed) to ``handler``, so that a command ends through its own cleanup and exit handlers;
    returns the handlers they had, to restore. A SIGHUP that is ignored (``nohup``) stays
    ignored; outside the main thread, where Python cannot set handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    signums = [signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # none on Windows
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signums.append(hangup)
    return {signum: signal.signal(signum, handler) for signum in signums}


def missing_package(err: ModuleNotFoundError) -> MlsegError | None:
    """The error for ``err`` where it says that one of mlseg's dependencies is not installed
    (an install broken or made without them): the module and the distribution to install.
    None for any other module, mlseg's own among them (a bug, to be shown whole), and for a
    submodule missing from a package that is there (a version mismatch, not a missing one)."""
    module = (err.name or "").partition(".")[0]
    distribution = DISTRIBUTIONS.get(module)
    if distribution is None or importlib.util.find_spec(module) is not None:
        return None
    return MlsegError(
        f"this Python ({sys.executable}) cannot import {module}, which mlseg needs: "
        f"pip install {distribution} (or reinstall mlseg with its dependencies)"
    )


class ValidationFailed(MlsegError):
    """A dataset failed error-level data-validation expectations."""

    exit_code = 1


def some_of(names, limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` of ``names`` joined by ``sep``, with ``sep + "..."`` when there
    are more: how a message names the files it is about without listing a thousand."""
    names = [str(n) for n in names]
    return sep.join(names[:limit]) + (f"{sep}..." if len(names) > limit else "")


def oom_said(error: BaseException) -> str:
    """The first two sentences of torch's out-of-memory message (what was asked, what was
    free), without the allocator's advice that follows, which names none of mlseg's settings."""
    return ". ".join(str(error).split(". ")[:2])


@functools.cache
def warn_once(message: str) -> None:
    """Warn with ``message`` the first time only (per process; ``warn_once.cache_clear()``,
    called at the start of each segment or evaluate run, resets): for what holds for a whole
    run, such as a model's missing record, but is found image by image. Python's own
    once-per-line rule does not hold it: every change of the warning filters (pandas makes
    some building each table) shows the warning again."""
    warnings.warn(message, stacklevel=2)
