"""Dataset inventory: one row per file, with every fact the data-validation gate checks.

:func:`build_inventory` walks a dataset in the contract layout (:mod:`mlseg.dataset`), decodes
every image and mask once (in parallel worker processes, streaming: only one decoded file per
worker is in memory at a time) and returns an :class:`Inventory` of two tidy tables:

``files`` - one row per file found under the dataset root (root-level files such as
``manifest.csv`` and hidden files excepted):

- identity: ``split`` (``train``/``test``, null outside both), ``role`` (``image``, ``mask``,
  ``sidecar`` = an image's ``<stem>.json`` beside it, or ``stray`` = not in an image or mask
  folder), ``path`` (POSIX, relative to the root), ``stem``
  (for a well-named mask: the stem of the image it belongs to), ``extension`` (lower case),
  ``size_bytes``;
- decoding: ``readable``, ``read_error``, ``width_px``, ``height_px``, ``channels``,
  ``one_channel_rgb`` (RGB images: whether the file holds one channel shown in a colour,
  the others empty or copies of it, as DAPI saved blue or a grey picture saved RGB:
  :func:`mlseg.preprocess.one_channel_as_grey`; null for grey images), ``dtype``,
  ``content_hash`` (SHA-256, 128 bits, of the decoded pixels, shape and dtype; images only),
  ``turn_free_hash`` (the same of whichever of its 8 mirrored/turned views
  :func:`turn_free_hash` picks, in its :func:`exact_form`: equal for a flipped or rotated
  copy, and for one saved grey or RGB, or 8-bit values saved 16-bit),
  ``exif_orientation`` (2-8 where an image file declares that viewers show it turned or
  mirrored, :func:`mlseg.io.exif_orientation`; null where it is shown as stored);
- masks: ``mask_kind`` (inferred: ``binary`` = at most one non-zero value, else ``instance``),
  ``mask_labels`` (distinct non-zero values), ``mask_max_value``, ``foreground_fraction``,
  ``interior_fraction``, ``edge_to_edge_fraction`` and ``split_label_fraction``
  (:func:`mlseg.dataset.mask_shape`: low = outlines drawn instead of filled nuclei; high =
  the background labelled as a nucleus, as an inverted binary mask has it; high = values
  that each cover many nuclei, as a class mask's do);
- image quality (:func:`image_stats`, images only): ``mean_c{0,1,2}`` and ``std_c{0,1,2}``
  (per channel, fraction of the dtype's full scale), ``grey_std`` (same scale),
  ``laplacian_var`` (variance of the Laplacian of the grey image, 8-bit grey levels squared:
  low = blurred; grey is luminance, or the one channel of an image that shows one channel
  in a colour, as DAPI saved blue), ``nucleus_size_px`` (the size nuclei appear, in pixels,
  without a model, one blob at a time: :func:`mlseg.scale.blob_diameter_px`; halves on a 20x
  scan of a 40x set, not moved by how many nuclei an image has), ``saturated_fraction``,
  ``dark_fraction``, ``od_hematoxylin_mean``, ``od_eosin_mean``, ``od_dab_mean`` (mean
  optical density per stain by colour deconvolution; RGB images only); with a fluorescence
  profile, those of a ``one_channel_rgb`` image's grey file, as training reads it
  (:func:`as_trained`);
- pixel size (images only): ``metadata_pixel_size_um`` (what the image's JSON sidecar or TIFF
  metadata declares, :func:`mlseg.pixel_size.declared_pixel_size_um`), ``metadata_not_square``
  (it declares pixels that are not square: no size, not even the profile's, applies to the
  image, :func:`mlseg.pixel_size.image_pixel_size`), ``pixel_size_um`` and
  ``pixel_size_source`` (``manifest`` or ``metadata``: the size training will use, as
  :func:`mlseg.dataset.list_pairs` picks it; null = none declared: the run's profile's
  ``pixel_size_um`` where it sets one, else unknown);
- contract checks, one column per rule, ``True`` = the rule holds, null = does not apply to
  this row (see ``expectations/README.md``): ``location_ok``, ``extension_ok``, ``name_ok``,
  ``image_has_mask``, ``mask_has_image``, ``partner_unique``, ``size_matches``,
  ``mask_values_ok``, ``unique_in_split``, ``only_in_one_split``, ``channels_consistent``
  (with a fluorescence profile, ``ValidateConfig.stain``, a ``one_channel_rgb`` image counts
  as grey or as RGB, whichever the others are, as training reads it),
  ``dtype_consistent``, ``pixel_size_ok`` (the manifest's size is a plausible number),
  ``metadata_pixel_size_ok`` (the metadata's, where the manifest gives none),
  ``metadata_square_ok`` (the metadata declares no pixels that are not square, where the
  manifest gives no size); plus
  ``n_partners`` (files of the other role with the same stem).

``splits`` - one row per split: ``split``, ``folder``, ``image_dir_exists``,
``mask_dir_exists``, ``n_images``, ``n_masks``, ``n_pairs`` (images with exactly one mask),
``manifest_unmatched`` and ``manifest_unmatched_rows`` (pixel-size rows of ``manifest.csv``
naming no image of the split).

:func:`fingerprint` summarises the training images' statistics (deciles, histograms) and
content hashes; drift monitoring compares new images (via :func:`image_stats`) against it.
Nothing here knows of Great Expectations; ``expectations/`` runs the rules on these tables.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from mlseg.config import Config, DataConfig, Profile, Strict
from mlseg.dataset import (
    SPLITS,
    image_stem_of_mask,
    is_hidden,
    manifest_pixel_sizes,
    mask_shape,
    split_dir,
)
from mlseg.errors import DatasetError, ImageReadError, not_a_folder
from mlseg.io import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    check_utf8_path,
    exif_orientation,
    full_scale,
    image_extension,
    image_stem,
    mask_labels,
    read_image,
    write_table,
    write_text,
    written_together,
)
from mlseg.pixel_size import (
    SIDECAR_SUFFIX,
    declared_pixel_size_um,
    not_square_declared,
    plausible_pixel_size,
    size_counts,
)
from mlseg.progress import ProgressLog
from mlseg.scale import blob_diameter_px

#: "2": a 16-bit image's intensities are fractions of its camera's full scale
#: (:func:`mlseg.io.full_scale`), not of 65535; "1" may hold either.
FINGERPRINT_VERSION = "2"

#: Ruifrok & Johnston optical-density vectors (rows: haematoxylin, eosin, DAB), as skimage.
RUIFROK_HED = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))

#: Columns written by :func:`image_stats`, in order.
STAT_COLUMNS = (
    "mean_c0",
    "mean_c1",
    "mean_c2",
    "std_c0",
    "std_c1",
    "std_c2",
    "grey_std",
    "laplacian_var",
    "nucleus_size_px",
    "saturated_fraction",
    "dark_fraction",
    "od_hematoxylin_mean",
    "od_eosin_mean",
    "od_dab_mean",
)
MASK_COLUMNS = (
    "mask_kind",
    "mask_labels",
    "mask_max_value",
    "foreground_fraction",
    "interior_fraction",
    "edge_to_edge_fraction",
    "split_label_fraction",
)
CHECK_COLUMNS = (
    "location_ok",
    "extension_ok",
    "name_ok",
    "image_has_mask",
    "mask_has_image",
    "partner_unique",
    "size_matches",
    "mask_values_ok",
    "unique_in_split",
    "only_in_one_split",
    "channels_consistent",
    "dtype_consistent",
    "pixel_size_ok",
    "metadata_pixel_size_ok",
    "metadata_square_ok",
)
#: Microns per pixel: as the file's metadata declares it (or that its pixels are not square),
#: as training will use it, and whence.
PIXEL_SIZE_COLUMNS = (
    "metadata_pixel_size_um",
    "metadata_not_square",
    "pixel_size_um",
    "pixel_size_source",
)
FILE_COLUMNS = (
    "split",
    "role",
    "path",
    "stem",
    "extension",
    "size_bytes",
    "readable",
    "read_error",
    "width_px",
    "height_px",
    "channels",
    "one_channel_rgb",
    "dtype",
    "content_hash",
    "turn_free_hash",
    "exif_orientation",
    *MASK_COLUMNS,
    *STAT_COLUMNS,
    *PIXEL_SIZE_COLUMNS,
    "n_partners",
    *CHECK_COLUMNS,
)
#: Columns of the facts read from each file, before :func:`add_checks`.
READ_COLUMNS = (
    "split",
    "role",
    "path",
    "size_bytes",
    "readable",
    "read_error",
    "width_px",
    "height_px",
    "channels",
    "one_channel_rgb",
    "dtype",
    "content_hash",
    "turn_free_hash",
    "exif_orientation",
    *MASK_COLUMNS,
    "mask_values_ok",
    *STAT_COLUMNS,
    "metadata_pixel_size_um",
    "metadata_not_square",
)
SPLIT_COLUMNS = (
    "split",
    "folder",
    "image_dir_exists",
    "mask_dir_exists",
    "n_images",
    "n_masks",
    "n_pairs",
    "manifest_unmatched",
    "manifest_unmatched_rows",
)
#: A pixel darker than this fraction of full scale (grey) counts as dark.
DARK_LEVEL = 0.02
#: Files below this count are read in-process: starting workers costs more than it saves.
MIN_FILES_FOR_WORKERS = 48


class ValidateConfig(Strict):
    """Settings of the data-validation stage (inventory + expectation suites).

    ``workers`` readers run in parallel (``0`` = one per CPU core): threads by default, since
    decoding, hashing and the OpenCV statistics release the GIL; ``parallel="process"`` uses
    a process pool instead (forkserver; a calling script needs a ``__main__`` guard). Stain
    densities are computed on a copy subsampled to at most ``stats_max_side`` pixels per side.
    ``stain_vectors`` are the optical-density rows (haematoxylin, eosin, DAB) used for colour
    deconvolution; ``None`` = Ruifrok & Johnston. ``stain`` is the run's profile's
    (:func:`load_validate_config` takes it from the run config): with ``fluorescence`` an RGB
    image holding one channel in a colour (DAPI saved blue) has the channel count of a grey
    one or of an RGB one for ``consistent_channels``, as training reads it
    (:func:`mlseg.preprocess.one_channel_as_grey`), and its statistics are those of that
    grey file (:func:`as_trained`); the fingerprint records it for ``mlseg monitor``.
    """

    data: DataConfig = DataConfig()
    min_images_per_split: int = Field(1, ge=0)
    workers: int = Field(0, ge=0)
    parallel: Literal["thread", "process"] = "thread"
    stats_max_side: int = Field(128, ge=16)
    stain_vectors: list[list[float]] | None = None
    stain: Literal["he", "ihc", "fluorescence", "none"] = "he"


def load_validate_config(
    path: str | os.PathLike | None = None,
    *,
    mask_kind: str | None = None,
    min_images_per_split: int | None = None,
    workers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> ValidateConfig:
    """The validation config of a run-config YAML (its ``data`` section and its profile's
    ``stain``), with the run's section ``overrides`` (as the pipeline passes them: the data
    training reads is the data validated) and command-line options applied."""
    from mlseg.config import load_config

    return validate_config(
        load_config(path, **(overrides or {})),
        mask_kind=mask_kind,
        min_images_per_split=min_images_per_split,
        workers=workers,
    )


def validate_config(
    run: Config,
    *,
    mask_kind: str | None = None,
    min_images_per_split: int | None = None,
    workers: int | None = None,
) -> ValidateConfig:
    """The validation config of a loaded run config (as :func:`load_validate_config`), for a
    caller that resolved the paths it holds (a flow: ``profiles_file`` under the data folder)."""
    from mlseg.config import get_profile, parse

    # the profile decides how training reads an RGB image of one colour
    stain = get_profile(run.profile, run.profiles_file).stain
    data = ValidateConfig(data=run.data, stain=stain).model_dump()
    if mask_kind is not None:
        data["data"] = {**data["data"], "mask_kind": mask_kind}
    if min_images_per_split is not None:
        data["min_images_per_split"] = min_images_per_split
    if workers is not None:
        data["workers"] = workers
    return parse(ValidateConfig, data, "command-line options")


@dataclass(frozen=True)
class Inventory:
    """The two tables of a dataset inventory (see the module docstring for columns)."""

    root: Path
    files: pd.DataFrame
    splits: pd.DataFrame
    config: ValidateConfig


# --------------------------------------------------------------------------- pure statistics


def _stain_inverse(stain_vectors: Iterable[Iterable[float]] | None) -> np.ndarray:
    key = tuple(tuple(float(v) for v in row) for row in (stain_vectors or RUIFROK_HED))
    return _inverse_of(key)


@functools.lru_cache(maxsize=8)
def _inverse_of(rows: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """``(3, 3) float32``: optical densities (row vectors) times this = stain concentrations."""
    matrix = np.asarray(rows, np.float64)
    matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.linalg.inv(matrix).astype(np.float32)


def image_stats(
    image: np.ndarray,
    *,
    max_side: int = 128,
    stain_vectors: Iterable[Iterable[float]] | None = None,
) -> dict[str, float]:
    """Quality statistics of one image; the same numbers the inventory and fingerprint hold.

    ``image`` is ``(H, W, C)`` (or ``(H, W)``) ``uint8``/``uint16``, ``C`` in {1, 3}, RGB order.
    Intensities are fractions of the image's full scale (:func:`mlseg.io.full_scale`: 255,
    or 4095 for a 12-bit camera's 16-bit file). Every statistic uses every pixel except the
    stain densities, computed on a copy subsampled to at most ``max_side`` pixels per side
    (colour deconvolution is the costly step). Returns a dict with the keys
    :data:`STAT_COLUMNS` (channels that do not exist and, for grey images, stain densities
    are NaN). Pure: no I/O, the input is not modified.
    """
    import cv2

    from mlseg.preprocess import one_channel_as_grey

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected (H, W, 1|3) uint8/uint16, got {arr.shape} {arr.dtype}")
    scale = float(full_scale(arr))
    n_channels = arr.shape[2]
    mean, std = cv2.meanStdDev(arr)
    mean, std = mean.ravel() / scale, std.ravel() / scale
    # one channel shown in a colour (DAPI saved blue) is that channel: as luminance, 0.114
    # of it, 42 of DSB 2018's 53 sharp fluorescence tiles read as blurred
    one = one_channel_as_grey(arr)
    grey = one[..., 0] if one.shape[2] == 1 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    _, grey_std = cv2.meanStdDev(grey)
    depth = cv2.CV_16S if arr.dtype == np.uint8 else cv2.CV_32F  # 16S holds 8-bit exactly
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, depth))
    lap_var = float(lap_std.ravel()[0]) ** 2 * (255.0 / scale) ** 2

    # Saturated: any channel at full scale; dark: grey at most DARK_LEVEL of full scale.
    top = scale - 1
    not_saturated = cv2.inRange(arr, (0,) * n_channels, (top,) * n_channels)
    n_pixels = grey.size
    saturated = 1.0 - cv2.countNonZero(not_saturated) / n_pixels
    dark = float(np.count_nonzero(grey <= DARK_LEVEL * scale)) / n_pixels

    stats: dict[str, float] = dict.fromkeys(STAT_COLUMNS, float("nan"))
    for c in range(n_channels):
        stats[f"mean_c{c}"] = float(mean[c])
        stats[f"std_c{c}"] = float(std[c])
    # dark nuclei on a light ground (bright field) or bright ones on a dark ground
    light_ground = cv2.mean(grey)[0] > 0.5 * scale
    stats.update(
        grey_std=float(grey_std.ravel()[0]) / scale,
        laplacian_var=lap_var,
        nucleus_size_px=blob_diameter_px(grey, dark_blobs=light_ground),
        saturated_fraction=saturated,
        dark_fraction=dark,
    )
    if n_channels == 3:
        step = max(1, math.ceil(max(arr.shape[:2]) / max_side))
        rgb = arr[::step, ::step].reshape(-1, 3).astype(np.float32)
        od = -np.log10((rgb + 1.0) / (scale + 1.0))
        conc = np.clip(od @ _stain_inverse(stain_vectors), 0.0, None)
        h, e, d = conc.mean(axis=0)
        stats.update(od_hematoxylin_mean=float(h), od_eosin_mean=float(e), od_dab_mean=float(d))
    return stats


def as_trained(image: np.ndarray, stain: str | None) -> np.ndarray:
    """``image`` as training gives it to the model with a profile of ``stain``, before any
    scaling: with ``fluorescence``, an RGB image of one channel shown in a colour (DAPI
    saved blue) is that channel, ``(H, W, 1)``
    (:func:`mlseg.preprocess.one_channel_as_grey`); any other image as it is. Validation
    measures its statistics on this, and ``mlseg monitor`` a new image's for a fingerprint
    of that stain, so a fluorescence set is compared as training sees it."""
    from mlseg.preprocess import one_channel_as_grey

    return one_channel_as_grey(image) if stain == "fluorescence" else image


#: A binary mask exported as 0/255 (8-bit) or 0/65535 (16-bit): read as instance labels, one
#: nucleus of all its nuclei.
BINARY_EXPORT_VALUES = (255, 65535)


def mask_values_valid(values: np.ndarray, declared: str) -> bool:
    """Whether a mask's distinct values (``values``, sorted, from ``np.unique``) fit ``declared``.

    ``binary``: values within {0, 1} or within {0, 255}. ``instance``: any non-negative labels
    except the 0/255 (or 0/65535) pattern of a binary export (which would make one nucleus of
    everything).
    ``auto``: any non-negative integer mask.
    """
    values = np.asarray(values)
    if values.size and values.min() < 0:
        return False
    nonzero = set(values[values != 0].tolist())
    if declared == "binary":
        return nonzero <= {1} or nonzero <= {255}
    if declared == "instance":
        return not (len(nonzero) == 1 and nonzero <= set(BINARY_EXPORT_VALUES))
    return True


def mask_stats(mask: np.ndarray, declared: str = "auto") -> dict[str, Any]:
    """Facts about one ``(H, W)`` integer mask: kind, label count, foreground, shape, validity.

    Returns ``mask_kind`` (``binary`` if at most one non-zero value, else ``instance``, as
    :func:`mlseg.dataset.mask_kind`), ``mask_labels``, ``mask_max_value``,
    ``foreground_fraction``, ``interior_fraction``, ``edge_to_edge_fraction``,
    ``split_label_fraction`` (see :func:`mlseg.dataset.mask_shape`) and ``mask_values_ok``
    (see :func:`mask_values_valid`).
    """
    mask = np.asarray(mask)
    flat = mask.ravel()
    if flat.dtype.kind in "iu" and flat.size and flat.min() >= 0 and flat.max() < 1 << 20:
        foreground = flat[flat != 0]  # nuclei cover a fraction of the image: count only those
        values = np.flatnonzero(np.bincount(foreground)) if foreground.size else foreground[:0]
        background = flat.size - foreground.size
    else:
        values = np.unique(flat)
        background = int((flat == 0).sum())
    n_labels = int((values != 0).sum())
    return {
        "mask_kind": "binary" if n_labels <= 1 else "instance",
        "mask_labels": n_labels,
        "mask_max_value": int(values.max()) if values.size else 0,
        "foreground_fraction": 1.0 - background / flat.size if flat.size else 0.0,
        **mask_shape(mask, binary=n_labels <= 1),
        "mask_values_ok": mask_values_valid(values, declared),
    }


def content_hash(array: np.ndarray) -> str:
    """SHA-256 (first 128 bits, hex) of an array's pixels, shape and dtype: equal for the same
    pixels saved as PNG or TIFF. SHA-256 because CPUs hash it in hardware (SHA-NI, ARMv8)."""
    arr = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{arr.shape}{arr.dtype.str}".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()[:32]


def _turns(arr: np.ndarray) -> list[np.ndarray]:
    """The 8 views of ``arr`` flipped and turned by quarters (the dihedral group D4)."""
    return [np.rot90(a, r) for a in (arr, arr[:, ::-1]) for r in range(4)]


#: Factors by which an 8-bit image's values are saved in a 16-bit file: 257 to full scale
#: (255 -> 65535, as scikit-image's ``img_as_uint`` converts), 256 a byte up; 1 (0-255 as
#: they are, as ImageJ converts) is told by the largest value.
EIGHT_BITS_IN_SIXTEEN = (257, 256)


def exact_form(array: np.ndarray) -> np.ndarray:
    """``array`` ``(H, W, C)`` in the fewest channels and bits that hold its pixels exactly,
    to tell a converted copy of an image by its pixels: an RGB image of one channel (the
    others empty or copies of it: a grey field saved RGB, DAPI saved blue;
    :func:`mlseg.preprocess.one_channel_as_grey`) as that channel, and a 16-bit image of
    8-bit values (0-255, or those scaled by :data:`EIGHT_BITS_IN_SIXTEEN`) as those values
    in 8 bits; any other image as it is. Training and segment give the model the same
    pixels from either file (a grey field repeated to RGB, or an RGB one as grey, and 16-bit
    values over their full scale), and only identical pixels hashed alike: a 16-bit copy of
    a training tile in the test split passed ``no_train_test_leakage`` and evaluate's
    check of the images the model trained on."""
    from mlseg.preprocess import one_channel_as_grey

    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = one_channel_as_grey(arr)
    if arr.dtype.type is np.uint16:
        if int(arr.max(initial=0)) <= 255:
            return arr.astype(np.uint8)
        for factor in EIGHT_BITS_IN_SIXTEEN:
            if _all_multiples(arr, factor):
                return (arr // factor).astype(np.uint8)
    return arr


def _all_multiples(arr: np.ndarray, factor: int, band: int = 512) -> bool:
    """Whether every value of ``arr`` is a multiple of ``factor``: a sample first (a true
    16-bit image fails at once), then by bands of rows, not a second image's worth."""
    if (arr[::16, ::16] % factor).any():
        return False
    return not any((arr[i : i + band] % factor).any() for i in range(0, len(arr), band))


def turn_free_hash(array: np.ndarray, *, exact: bool = True) -> str:
    """:func:`content_hash` of ``array`` as it is, mirrored or turned by quarters, the same
    for all 8: a tile and its flipped or rotated copy (an augmented copy saved beside it,
    then split into test) hash alike. With ``exact`` (the default) the pixels are hashed in
    their :func:`exact_form`, so a copy saved grey or RGB, or 8-bit values saved 16-bit,
    hashes alike too; without it, as stored (as mlseg hashed before it took the exact form,
    in the ``image_hashes`` of the models it saved then).

    The turn hashed is the one that puts the brightest of the four corner blocks top left
    and the brighter of its neighbours top right (their sums move with the turn as the
    corners of a 2 x 2 array do, so every copy picks the same view); only a tie, as in a
    blank or symmetric image, hashes each tied view and keeps the least. One extra hash
    for most images, where trying all eight took eight.
    """
    arr = exact_form(array) if exact else np.asarray(array)
    k = max(1, min(arr.shape[:2]) // 4)
    corners = np.array(
        [
            [arr[:k, :k].sum(dtype=np.int64), arr[:k, -k:].sum(dtype=np.int64)],
            [arr[-k:, :k].sum(dtype=np.int64), arr[-k:, -k:].sum(dtype=np.int64)],
        ]
    )
    keys = [tuple(view.ravel().tolist()) for view in _turns(corners)]
    best = max(keys)
    views = _turns(arr)
    return min(content_hash(views[i]) for i, key in enumerate(keys) if key == best)


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class _Entry:
    split: str | None
    role: str
    rel: str
    path: Path


def _visible_files(folder: Path) -> Iterator[Path]:
    """Files below ``folder`` not hidden (:func:`mlseg.dataset.is_hidden`), sorted; symlinked
    folders followed once (no loops)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not is_hidden(name):
                yield Path(dirpath) / name


def scan_dataset(root: Path, cfg: DataConfig) -> tuple[list[_Entry], dict[str, dict[str, Any]]]:
    """List every non-hidden file below ``root`` (root-level files excepted) with its role."""
    entries: list[_Entry] = []
    folders: dict[str, dict[str, Any]] = {}
    split_names = {split_dir(root, cfg, s).name: s for s in SPLITS}
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        split = split_names.get(child.name)
        image_dir = child / cfg.image_dir
        sidecars = (  # the names sidecar_path looks for (an OME-TIFF's with .ome or without)
            {
                stem + SIDECAR_SUFFIX
                for p in image_dir.iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS
                for stem in (p.stem, p.name[: len(p.name) - len(image_extension(p))])
            }
            if split is not None and image_dir.is_dir()
            else set()
        )
        for path in _visible_files(child):
            check_utf8_path(path)  # its name goes into the inventory table
            role = "stray"
            if split is not None and path.parent == image_dir:
                sidecar = path.suffix == SIDECAR_SUFFIX and path.name in sidecars
                role = "sidecar" if sidecar else "image"
            elif split is not None and path.parent == child / cfg.mask_dir:
                role = "mask"
            entries.append(_Entry(split, role, path.relative_to(root).as_posix(), path))
    for split in SPLITS:
        base = split_dir(root, cfg, split)
        folders[split] = {
            "folder": base.relative_to(root).as_posix(),
            "image_dir_exists": (base / cfg.image_dir).is_dir(),
            "mask_dir_exists": (base / cfg.mask_dir).is_dir(),
        }
    return entries, folders


# --------------------------------------------------------------------------- reading (workers)


def inspect_file(
    item: tuple[str, str],
    *,
    declared_kind: str = "auto",
    max_side: int = 128,
    stain_vectors: list[list[float]] | None = None,
    stain: str | None = None,
) -> dict[str, Any]:
    """Decode one file (``(path, role)``) and return its row of facts; never raises on bad data.
    An image's statistics are those of the image as training reads it with a profile of
    ``stain`` (:func:`as_trained`)."""
    path_str, role = item
    path = Path(path_str)
    row: dict[str, Any] = {"readable": None, "read_error": None}
    try:
        row["size_bytes"] = path.stat().st_size
    except OSError as err:
        row.update(readable=False, read_error=f"{path}: cannot stat ({err.strerror})")
        return row
    if role == "stray" or path.suffix.lower() not in IMAGE_EXTENSIONS:
        return row
    try:
        mask = role == "mask"
        arr = read_image(path, alpha="drop" if mask else "white", labels=mask)
        labels = mask_labels(path, arr) if role == "mask" else None
    except ImageReadError as err:
        row.update(readable=False, read_error=str(err))
        return row
    except Exception as err:  # a decoder crash on a corrupt file must not stop the inventory
        row.update(
            readable=False, read_error=f"{path}: cannot be decoded ({type(err).__name__}: {err})"
        )
        return row
    row.update(
        readable=True,
        height_px=int(arr.shape[0]),
        width_px=int(arr.shape[1]),
        channels=int(arr.shape[2]),
        dtype=str(arr.dtype),
    )
    if labels is not None:
        row.update(mask_stats(labels, declared_kind))
    else:
        from mlseg.preprocess import one_channel_as_grey

        if arr.shape[2] == 3:
            row["one_channel_rgb"] = one_channel_as_grey(arr).shape[2] == 1
        row["content_hash"] = content_hash(arr)
        row["turn_free_hash"] = turn_free_hash(arr)
        row["exif_orientation"] = exif_orientation(path)
        row["metadata_pixel_size_um"] = declared_pixel_size_um(path, plausible_only=False)
        row["metadata_not_square"] = not_square_declared(path) is not None
        seen = as_trained(arr, stain)
        row.update(image_stats(seen, max_side=max_side, stain_vectors=stain_vectors))
    return row


def _pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (``spawn`` where it does not exist), never ``fork``: a forked child
    inherits OpenCV's thread pool (and any caller's threads) half-initialised and can hang.
    Like every non-fork pool, it needs the caller's script guarded by ``__name__ == '__main__'``.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe


#: cgroup v2's CPU limit (``docker run --cpus``, a Kubernetes CPU limit): "<quota> <period>"
#: in microseconds, or "max <period>" for none.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _cgroup_cpu_limit() -> int | None:
    """Whole cores the cgroup quota allows (rounded up), ``None`` where there is none."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        cores = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2, "max", unreadable
        return None
    return max(1, math.ceil(cores)) if cores > 0 else None


def usable_cpus() -> int:
    """Cores this process may use (the affinity mask of a container, ``taskset`` or a SLURM
    job's allocation, and a container's CPU quota, not the node's count), at least 1.

    A quota (``--cpus 2`` on a 64-core host) leaves the affinity mask whole: sized by the
    mask alone, 64 threads shared two cores' time and were throttled."""
    if hasattr(os, "sched_getaffinity"):
        cores = max(1, len(os.sched_getaffinity(0)))
    else:
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return min(cores, quota) if quota else cores


def bounded_map(
    pool: Executor, fn: Callable[[Any], Any], items: list[Any], ahead: int
) -> Iterator[Any]:
    """``pool.map`` that keeps at most ``ahead`` results pending (bounded memory, in order)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _read_all(
    items: list[tuple[str, str]],
    worker: Callable[[tuple[str, str]], dict[str, Any]],
    workers: int,
    progress: bool,
    parallel: str = "thread",
    log: Callable[[str], object] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of ``worker(item)`` in the order of ``items``, computed by a process pool.

    Items go to the workers in chunks; each worker holds one decoded file at a time and
    sends back only its small row, so memory does not grow with the dataset. ``progress``
    draws a bar; ``log`` is told how far the reading is now and then (a job's log).
    """
    n_workers = min(workers or usable_cpus(), max(1, len(items)))
    pool: Executor | None = None
    if n_workers == 1 or len(items) < MIN_FILES_FOR_WORKERS:
        results: Iterable[dict[str, Any]] = map(worker, items)
    elif parallel == "thread":
        pool = ThreadPoolExecutor(n_workers, thread_name_prefix="mlseg-inventory")
        results = bounded_map(pool, worker, items, 4 * n_workers)
    else:
        chunk = max(1, min(32, len(items) // (n_workers * 8)))
        pool = ProcessPoolExecutor(n_workers, mp_context=_pool_context(), initializer=_worker_init)
        results = pool.map(worker, items, chunksize=chunk)
    try:
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(items), desc="reading", unit="file", leave=False)
        # counted here, in this process, as the rows come back (in order; a worker's count
        # would be one process's share)
        said = ProgressLog("validate", len(items), "files", log)
        for row in results:
            said.step()
            yield row
        said.close()
    except BrokenProcessPool as err:
        raise RuntimeError(
            "inventory worker processes died; when calling build_inventory from a script, put "
            "the call under `if __name__ == '__main__':`, or set workers=1"
        ) from err
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- tables


def build_inventory(
    root: str | os.PathLike,
    cfg: ValidateConfig | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], object] | None = None,
) -> Inventory:
    """Inventory every file of the dataset at ``root``; the dataset is only read.

    ``progress`` draws a bar while the files are read; ``log`` (a job's stderr, where no bar
    is drawn) is given a line on how far the reading is once a minute
    (:class:`mlseg.progress.ProgressLog`).

    Raises :class:`DatasetError` only if ``root`` is not a folder or its ``manifest.csv``
    cannot be parsed: every problem inside the dataset becomes a fact in the tables, for the
    expectation suites to judge.
    """
    cfg = cfg or ValidateConfig()
    root = Path(root)
    if not root.is_dir():
        raise not_a_folder(root, "dataset")
    entries, folders = scan_dataset(root, cfg.data)
    worker = partial(
        inspect_file,
        declared_kind=cfg.data.mask_kind,
        max_side=cfg.stats_max_side,
        stain_vectors=cfg.stain_vectors,
        stain=cfg.stain,
    )
    rows = []
    items = [(str(e.path), e.role) for e in entries]
    facts_iter = _read_all(items, worker, cfg.workers, progress, cfg.parallel, log)
    for entry, facts in zip(entries, facts_iter, strict=True):
        rows.append({"split": entry.split, "role": entry.role, "path": entry.rel, **facts})
    sizes = manifest_pixel_sizes(root)
    files = add_checks(
        pd.DataFrame(rows, columns=list(READ_COLUMNS)), cfg.data, sizes, stain=cfg.stain
    )
    return Inventory(root, files, split_summary(files, folders, sizes), cfg)


def _channels_as_trained(files: pd.DataFrame, stain: str | None) -> pd.Series:
    """``files``' ``channels``, a ``one_channel_rgb`` image's 1 with a fluorescence
    ``stain`` (:func:`as_trained`)."""
    channels = files["channels"]
    if stain == "fluorescence" and "one_channel_rgb" in files:
        channels = channels.where(~files["one_channel_rgb"].eq(True), 1)
    return channels


def _rule(ok: Iterable[Any], applies: Iterable[bool]) -> pd.Series:
    """A check column: ``True``/``False`` where the rule applies, null elsewhere (object dtype)."""
    return pd.Series(
        [bool(o) if a else None for o, a in zip(ok, applies, strict=True)], dtype=object
    )


def _channels_ok(df: pd.DataFrame, images: pd.Series, stain: str) -> pd.Series:
    """Whether each row has the channel count that most of the ``images`` rows train as.

    Bright field: the file's count (a grey tile among H&E is not one kind of image). With a
    fluorescence profile, an RGB file of one channel in a colour (``one_channel_rgb``: DAPI
    saved blue, or grey saved as three equal channels) is given to the model as its grey
    file (:func:`mlseg.preprocess.one_channel_as_grey`) repeated to the model's channels,
    so it counts as grey and as RGB alike: one kind with grey files (DAPI saved blue among
    grey) and with colour ones (DSB 2018's grey tiles saved RGB among its bright-field
    ones). Ties go to the count most files have, then to the fewer channels."""
    channels = pd.to_numeric(df["channels"], errors="coerce")
    either = pd.Series(False, index=df.index)
    if stain == "fluorescence" and "one_channel_rgb" in df:
        either = df["one_channel_rgb"].eq(True) & images
    files = channels[images].value_counts()
    taking = {v: int(n) for v, n in files.items()}
    if either.any():  # their file's count (3) is among ``files`` already
        taking[1] = taking.get(1, 0) + int(either.sum())
    if not taking:
        return pd.Series(False, index=df.index)
    common = min(taking, key=lambda v: (-taking[v], -int(files.get(v, 0)), v))
    return channels.eq(common) | (either & (common == 1))


def _file_name_parts(path: str) -> tuple[str, str]:
    """``(stem, extension)``: the stem less ``.ome.tif`` whole (:func:`mlseg.io.image_stem`),
    the extension the last one (``.tif``), which the extension rules check."""
    name = path.rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return (image_stem(name), "." + ext.lower()) if dot and stem else (name, "")


def add_checks(
    files: pd.DataFrame,
    cfg: DataConfig,
    manifest_sizes: dict[tuple[str, str], tuple[int, Any]] | None = None,
    *,
    stain: str = "he",
) -> pd.DataFrame:
    """Add ``stem``, ``extension``, ``n_partners``, the pixel sizes and one column per
    contract rule (pure).

    ``files`` holds the facts read from each file (``split``, ``role``, ``path``,
    ``readable``, sizes, hashes, ...); ``manifest_sizes`` the manifest's pixel sizes as
    written (:func:`mlseg.dataset.manifest_pixel_sizes`); ``stain`` the run's profile's
    (``fluorescence``: a ``one_channel_rgb`` image counts as grey or RGB for
    ``channels_consistent``). See the module docstring for the columns added.
    """
    df = files.reset_index(drop=True).copy()
    parts = [_file_name_parts(p) for p in df["path"]]
    raw_stem = pd.Series([p[0] for p in parts], dtype=object)
    df["extension"] = [p[1] for p in parts]
    role = df["role"].to_numpy()
    is_image, is_mask, is_stray = role == "image", role == "mask", role == "stray"
    in_folder = ~is_stray
    placed = is_image | is_mask  # sidecars are in place and follow their image's name
    suffix = cfg.mask_suffix
    ends = np.array([s.endswith(suffix) for s in raw_stem], dtype=bool)
    split_key = df["split"].astype(str).to_numpy()
    image_stems: dict[str, set[str]] = {}
    for sp, s, i in zip(split_key, raw_stem, is_image, strict=True):
        if i:
            image_stems.setdefault(sp, set()).add(s)

    def pairing_stem(split: str, stem: str, mask: bool) -> str:
        """The image stem a mask names (as list_pairs pairs it), else the file's own stem."""
        of = image_stem_of_mask(stem, suffix, image_stems.get(split, set())) if mask else None
        return stem if of is None else of

    df["stem"] = [
        pairing_stem(sp, s, m) for sp, s, m in zip(split_key, raw_stem, is_mask, strict=True)
    ]

    ext_ok = np.where(
        is_mask,
        df["extension"].isin(MASK_EXTENSIONS).to_numpy(),
        df["extension"].isin(IMAGE_EXTENSIONS).to_numpy(),
    )
    df["location_ok"] = _rule(in_folder, [True] * len(df))
    df["extension_ok"] = _rule(ext_ok, placed)
    # an empty suffix (masks named as their images, in their own folder) ends every name
    image_named = ~ends if suffix else np.ones(len(df), dtype=bool)
    df["name_ok"] = _rule((is_image & image_named) | (is_mask & ends), placed)

    # Pairing counts the files mlseg.dataset.list_split pairs: right folder, an image's
    # extension, and for masks the right suffix. A JPEG mask pairs, as there (training and
    # evaluation refuse it by name): its image was said to have no mask, beside the JPEG's
    # own extension error. Unreadable files still pair (the read error is reported).
    is_image_named = df["extension"].isin(IMAGE_EXTENSIONS).to_numpy()
    pair_image = is_image & ext_ok
    pair_mask = is_mask & is_image_named & ends
    key = (df["split"].astype(str) + "/" + df["stem"].astype(str)).to_numpy()
    n_images = pd.Series(key[pair_image]).value_counts().to_dict()
    n_masks = pd.Series(key[pair_mask]).value_counts().to_dict()
    partners = [
        n_masks.get(k, 0) if pi else n_images.get(k, 0) if pm else None
        for k, pi, pm in zip(key, pair_image, pair_mask, strict=True)
    ]
    df["n_partners"] = pd.array(partners, dtype="Int64")
    has = np.array([bool(p) for p in partners], dtype=bool)
    df["image_has_mask"] = _rule(has, pair_image)
    df["mask_has_image"] = _rule(has, pair_mask)
    # the files to act on are those sharing a stem with another of their role
    same_role = [
        n_images.get(k, 0) if pi else n_masks.get(k, 0) if pm else None
        for k, pi, pm in zip(key, pair_image, pair_mask, strict=True)
    ]
    df["partner_unique"] = _rule(
        [c is not None and c <= 1 for c in same_role], pair_image | pair_mask
    )

    readable = df["readable"].eq(True).to_numpy()
    width, height = df["width_px"].to_numpy(), df["height_px"].to_numpy()
    image_size = {
        k: (w, h)
        for k, w, h, ok in zip(key, width, height, pair_image & readable, strict=True)
        if ok
    }
    one_image = pair_mask & readable & np.array([p == 1 for p in partners], dtype=bool)
    applies = one_image & np.array([k in image_size for k in key], dtype=bool)
    df["size_matches"] = _rule(
        [image_size.get(k) == (w, h) for k, w, h in zip(key, width, height, strict=True)], applies
    )
    values_ok = df["mask_values_ok"].to_numpy() if "mask_values_ok" in df else [None] * len(df)
    values_ok = np.array([v is True for v in values_ok], dtype=bool)
    # of lossless masks only: a JPEG mask's edges hold new values, which made it an instance
    # mask and every binary mask of the dataset fail here (training refuses the JPEG)
    lossless = is_mask & ext_ok
    if cfg.mask_kind == "auto" and df["mask_kind"][lossless].eq("instance").any():
        # the dataset trains as instance labels (mlseg.data.dataset_mask_kind): a binary
        # export among them (0/255, 0/65535) would be one nucleus of all its nuclei
        top = pd.to_numeric(df["mask_max_value"], errors="coerce")
        one_value = pd.to_numeric(df["mask_labels"], errors="coerce").eq(1)
        values_ok &= ~(is_mask & one_value.to_numpy() & top.isin(BINARY_EXPORT_VALUES).to_numpy())
    df["mask_values_ok"] = _rule(values_ok, is_mask & readable)

    # Duplicates within a split, by decoded-pixel hash; leakage across splits also of a
    # mirrored or turned copy (an augmented copy saved as a tile of its own)
    hashed = is_image & readable & df["content_hash"].notna().to_numpy()
    sub = df.loc[hashed, ["split", "content_hash", "turn_free_hash"]].astype(str)
    per_split = sub.groupby(["split", "content_hash"])["split"].transform("size")
    n_splits = sub.groupby("turn_free_hash")["split"].transform("nunique")
    df["unique_in_split"] = _rule((per_split == 1).reindex(df.index, fill_value=True), hashed)
    df["only_in_one_split"] = _rule((n_splits == 1).reindex(df.index, fill_value=True), hashed)

    # Consistency across the dataset's images: each is compared with the most common value.
    decoded_image = is_image & readable
    df["channels_consistent"] = _rule(_channels_ok(df, decoded_image, stain), decoded_image)
    values = df["dtype"].astype(str)
    counts = values[decoded_image].value_counts()
    common = min(counts.index, key=lambda v: (-counts[v], v)) if len(counts) else None
    df["dtype_consistent"] = _rule(values.eq(common), decoded_image)

    _add_pixel_sizes(df, key, is_image, manifest_sizes or {})
    return df.reindex(columns=list(FILE_COLUMNS))


def _add_pixel_sizes(
    df: pd.DataFrame,
    key: np.ndarray,
    is_image: np.ndarray,
    manifest_sizes: dict[tuple[str, str], tuple[int, Any]],
) -> None:
    """The pixel size training will use per image (the manifest's, else the plausible one of
    the file's metadata, as :func:`mlseg.dataset.list_pairs`; none where the file declares
    pixels that are not square) and the three rules on it."""
    written = {f"{split}/{stem}": value for (split, stem), (_, value) in manifest_sizes.items()}
    declared = pd.to_numeric(
        df.get("metadata_pixel_size_um", pd.Series(np.nan, index=df.index)), errors="coerce"
    )
    odd = df.get("metadata_not_square", pd.Series(None, index=df.index, dtype=object))
    rows = []  # (size used, its source, manifest rule, metadata rule, square rule)
    for k, image, meta, not_square in zip(key, is_image, declared, odd, strict=True):
        given = written.get(k) if image else None
        if given is not None:  # the manifest decides, even where the file declares another
            um = pd.to_numeric(given, errors="coerce")
            ok = plausible_pixel_size(um)
            rows.append((float(um) if ok else None, "manifest" if ok else None, ok, None, None))
            continue
        square = not not_square if image and pd.notna(not_square) else None
        if image and pd.notna(meta):
            ok = plausible_pixel_size(meta)
            rows.append((float(meta) if ok else None, "metadata" if ok else None, None, ok, square))
        else:
            rows.append((None, None, None, None, square))
    used, source, manifest_ok, metadata_ok, square_ok = (
        zip(*rows, strict=True) if rows else ([],) * 5
    )
    df["pixel_size_um"] = pd.array(list(used), dtype="Float64")
    df["pixel_size_source"] = pd.Series(list(source), dtype=object)
    df["pixel_size_ok"] = pd.Series(list(manifest_ok), dtype=object)
    df["metadata_pixel_size_ok"] = pd.Series(list(metadata_ok), dtype=object)
    df["metadata_square_ok"] = pd.Series(list(square_ok), dtype=object)


def split_summary(
    files: pd.DataFrame,
    folders: dict[str, dict[str, Any]],
    manifest_sizes: dict[tuple[str, str], tuple[int, Any]] | None = None,
) -> pd.DataFrame:
    """One row per split: folders present, image/mask counts, pairs (image with one mask),
    and the manifest's pixel-size rows that name no image of the split (a row naming no
    split of the dataset counts under ``train``)."""
    image_rows = files[files["role"].eq("image")]
    images = set(zip(image_rows["split"], image_rows["stem"], strict=True))
    unmatched: dict[str, list[str]] = {split: [] for split in SPLITS}
    for (split, stem), (line, _) in sorted((manifest_sizes or {}).items(), key=lambda kv: kv[1][0]):
        if (split, stem) not in images:
            unmatched[split if split in SPLITS else SPLITS[0]].append(
                f"line {line}: {split}/{stem}"
            )
    rows = []
    for split in SPLITS:
        part = files[files["split"].eq(split)]
        usable = part["extension_ok"].eq(True)
        pairs = part["image_has_mask"].eq(True) & part["n_partners"].eq(1)
        pairs &= part["partner_unique"].eq(True)
        rows.append(
            {
                "split": split,
                **folders.get(
                    split, {"folder": split, "image_dir_exists": False, "mask_dir_exists": False}
                ),
                "n_images": int((part["role"].eq("image") & usable).sum()),
                "n_masks": int((part["role"].eq("mask") & usable).sum()),
                "n_pairs": int(pairs.sum()),
                "manifest_unmatched": len(unmatched[split]),
                "manifest_unmatched_rows": "; ".join(unmatched[split][:10]) or None,
            }
        )
    return pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))


def run_profile(run: Config) -> tuple[Profile, float | None]:
    """The profile a training of run config ``run`` uses, and the pixel size it resamples
    to (``preprocess.target_pixel_size_um``, ``None`` = chosen from the images), for
    :func:`pixel_size_summary`."""
    from mlseg.config import effective_preprocess, get_profile

    profile = get_profile(run.profile, run.profiles_file)
    return profile, effective_preprocess(run, profile).target_pixel_size_um


def pixel_size_summary(
    files: pd.DataFrame, profile: Profile | None = None, target_um: float | None = None
) -> list[str]:
    """One line per split: how many images have which pixel size, and from where, then
    what training does with the training images that have none (pure).

    E.g. ``train: 7 at 0.25 um, 5 at 0.5 um (manifest); 2 unknown (profile he sets none)``,
    then ``training: 2 of 14 training images have no pixel size and profile he sets none:
    ...`` (:func:`mlseg.pixel_size.training_scale_note`). ``profile`` is the run's (its
    ``pixel_size_um`` is taken by images without one, except those declaring pixels that
    are not square, counted apart: ``1 not square``), ``target_um`` its
    ``preprocess.target_pixel_size_um``; without a profile the unknown are only counted.
    """
    from mlseg.pixel_size import sizes_text, training_scale_note

    lines, note = [], None
    usable = files["role"].eq("image") & files["split"].notna() & files["extension_ok"].eq(True)
    for split, part in files[usable].groupby("split", sort=True):
        known = part[part["pixel_size_um"].notna()]
        sources = "/".join(sorted(known["pixel_size_source"].dropna().unique()))
        sized = sizes_text(known["pixel_size_um"])
        not_square = part.loc[part["metadata_square_ok"].eq(False), "path"].tolist()
        unknown = int(part["pixel_size_um"].isna().sum()) - len(not_square)
        parts = [f"{sized} ({sources})"] if sized else []
        if unknown and profile is None:
            parts.append(f"{unknown} unknown")
        elif unknown and profile.pixel_size_um is None:
            parts.append(f"{unknown} unknown (profile {profile.name} sets none)")
        elif unknown:
            parts.append(
                f"{unknown} unknown, at profile {profile.name}'s {profile.pixel_size_um:g} um"
            )
        if not_square:
            parts.append(f"{len(not_square)} not square (no size, not even the profile's)")
        lines.append(f"{split}: " + "; ".join(parts))
        if split == "train" and profile is not None:
            sizes = [None if pd.isna(um) else float(um) for um in part["pixel_size_um"]]
            note = training_scale_note(sizes, profile, target_um, not_square)
    return lines + ([f"training: {note}"] if note else [])


def read_errors(files: pd.DataFrame, limit: int = 10) -> list[str]:
    """Why each unreadable file could not be read (pure): the readable rule's fix, "re-copy
    or re-export it", is right for a truncated file but not for a z-stack, a 2-channel or a
    float image, whose own fix (a projection, the nuclear channel alone, 16 bits) is in the
    file's ``read_error``."""
    errors = files.loc[files["readable"].eq(False), "read_error"].dropna().tolist()
    more = [f"... and {len(errors) - limit} more (read_error in the inventory)"]
    return errors[:limit] + (more if len(errors) > limit else [])


# --------------------------------------------------------------------------- fingerprint


def fingerprint(
    files: pd.DataFrame,
    split: str = "train",
    bins: int = 10,
    image_stats_params: dict[str, Any] | None = None,
    stain: str | None = None,
) -> dict[str, Any]:
    """Summary of the readable images of ``split``, for later drift checks (JSON-ready, pure).

    Per statistic of :data:`STAT_COLUMNS`: count, mean, std, min, max, quantiles and a
    ``bins``-bin histogram on quantile edges (equal-frequency bins; repeated edges merged),
    so a monitor can compute a population stability index for new images binned on the same
    edges. ``pixel_size_um``: how many images have which pixel size, and how many none
    (:func:`_declared_sizes`). ``content_hash`` is a SHA-256 digest (128 bits) of the sorted image hashes: equal
    for the same set of images whatever their names or order. ``image_stats_params`` (the keyword arguments
    the statistics were computed with, e.g. ``max_side``) are stored so a monitor can compute
    new images' statistics the same way. ``stain``, the run's profile's that the set was
    validated with (:class:`ValidateConfig`), is stored where given: a monitor does not compare
    the optical densities of H&E and DAB of a ``fluorescence`` set, and reads new images as
    training does (:func:`as_trained`), as the inventory's statistics were; with it
    ``channels`` counts a ``one_channel_rgb`` image as grey.
    """
    images = files[
        files["role"].eq("image") & files["readable"].eq(True) & files["split"].eq(split)
    ]
    hashes = sorted(images["content_hash"].dropna().astype(str))
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:32]
    quantiles = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    stats: dict[str, Any] = {}
    for column in STAT_COLUMNS:
        values = pd.to_numeric(images[column], errors="coerce").dropna().to_numpy(np.float64)
        if values.size == 0:
            continue
        edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
        if edges.size == 1:
            edges = np.array([edges[0], edges[0]])
        counts, _ = np.histogram(values, bins=edges)
        stats[column] = {
            "n": int(values.size),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "quantiles": {str(q): float(np.quantile(values, q)) for q in quantiles},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        }
    sizes = images[["width_px", "height_px"]].astype("Int64")
    return {
        "version": FINGERPRINT_VERSION,
        "split": split,
        "n_images": int(len(images)),
        "content_hash": digest,
        "channels": {
            str(k): int(v) for k, v in _channels_as_trained(images, stain).value_counts().items()
        },
        "dtype": {str(k): int(v) for k, v in images["dtype"].value_counts().items()},
        "size_px": {
            "width_min": _int_or_none(sizes["width_px"].min()),
            "width_max": _int_or_none(sizes["width_px"].max()),
            "height_min": _int_or_none(sizes["height_px"].min()),
            "height_max": _int_or_none(sizes["height_px"].max()),
        },
        "pixel_size_um": _declared_sizes(images),
        "stat_columns": list(STAT_COLUMNS),
        "image_stats_params": dict(image_stats_params or {}),
        **({"stain": stain} if stain is not None else {}),
        "stats": stats,
    }


def _declared_sizes(images: pd.DataFrame) -> dict[str, Any]:
    """The pixel sizes training uses (``pixel_size_um``: the manifest's or the metadata's),
    as ``{"counts": {"0.25": 38, ...}, "unknown": 2}``: microns per pixel rounded to 4
    decimals (as :func:`pixel_size_summary` shows them, :func:`mlseg.pixel_size.size_counts`)
    -> images; ``unknown``: images that declare none (the profile's ``pixel_size_um``
    applies where it sets one)."""
    sizes = pd.to_numeric(
        images.get("pixel_size_um", pd.Series(np.nan, index=images.index)), errors="coerce"
    ).astype("float64")
    return {
        "counts": {f"{um:g}": int(n) for um, n in size_counts(sizes).items()},
        "unknown": int(sizes.isna().sum()),
    }


def _fingerprint_of(inventory: Inventory) -> dict[str, Any]:
    cfg = inventory.config
    params = {"max_side": cfg.stats_max_side, "stain_vectors": cfg.stain_vectors}
    return fingerprint(inventory.files, image_stats_params=params, stain=cfg.stain)


def _int_or_none(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


# --------------------------------------------------------------------------- outputs


def check_output_dir(root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Refuse an output folder inside the dataset (validation never writes into a dataset)."""
    root_r, out_r = Path(root).resolve(), Path(out).resolve()
    if out_r == root_r or out_r.is_relative_to(root_r):
        raise DatasetError(
            f"{out}: output folder lies inside the dataset {root}; choose one outside it (--out)"
        )
    return Path(out)


def write_inventory(inventory: Inventory, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``inventory.parquet``, ``inventory.csv``, ``splits.csv``, ``fingerprint.json`` and
    ``validate_config.json`` into ``out``, all or none (a disk that filled at the fingerprint
    left the new inventory beside the old one's); return their paths by name."""
    out = check_output_dir(inventory.root, out)
    with written_together(out) as staging:
        written = {
            "inventory": write_table(inventory.files, staging / "inventory.parquet"),
            "inventory_csv": write_table(inventory.files, staging / "inventory.csv"),
            "splits": write_table(inventory.splits, staging / "splits.csv"),
            "fingerprint": write_text(
                staging / "fingerprint.json",
                json.dumps(_fingerprint_of(inventory), indent=2) + "\n",
            ),
            "config": write_text(
                staging / "validate_config.json",
                inventory.config.model_dump_json(indent=2) + "\n",
            ),
        }
    return {key: out / path.name for key, path in written.items()}
