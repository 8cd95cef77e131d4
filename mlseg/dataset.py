"""The dataset contract: layout, pairing of images with masks, the manifest.

::

    <root>/
      train/original/<stem>.<ext>        image (PNG, TIFF incl. 16-bit, JPEG; RGB or grey)
      train/masks/<stem>_mask.<ext>      mask: binary (0/1, 0/255) or instance labels (0 = bg)
      test/original/...  test/masks/...
      manifest.csv                        optional: split, stem, image, mask, pixel_size_um, ...

Folder names and the mask suffix are configurable (:class:`mlseg.config.DataConfig`);
the defaults are those of the source paper. ``.ome.tif``/``.ome.tiff`` is one extension
(:func:`mlseg.io.image_stem`): ``slide1.ome.tif`` pairs with ``slide1_mask.tif``.
``manifest.csv`` may give the pixel size of each image (``pixel_size_um``, microns per
pixel); where it is absent the image's JSON sidecar (``<stem>.json`` beside it) or a TIFF's
own metadata gives it (:func:`mlseg.pixel_size.declared_pixel_size_um`), and failing that
the profile's is used, except for an image declaring pixels that are not square, which has
none (:meth:`Pair.size_or`).
"""

from __future__ import annotations

import bz2
import codecs
import errno
import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mlseg.annotations import annotation_stem, is_annotation_file
from mlseg.config import DataConfig
from mlseg.errors import ConfigError, DatasetError, not_a_folder, some_of, writes_named
from mlseg.io import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    OTHER_IMAGE_EXTENSIONS,
    image_extension,
    image_stem,
    match_stem,
    not_lossless,
    read_image,
    write_text,
)
from mlseg.pixel_size import (
    PLAUSIBLE_PIXEL_SIZE_UM,
    SAME_SCALE_RATIO,
    implausible_message,
    plausible_pixel_size,
    usable_pixel_size_um,
)

MANIFEST = "manifest.csv"
#: The names a pixel-size column goes by, in any case, in the manifest and in a table given
#: to ``mlseg ingest --pixel-sizes``: the first of them a table has is read.
PIXEL_SIZE_COLUMNS = ("pixel_size_um", "mpp", "microns_per_pixel")
SPLITS = ("train", "test")
#: A mask with fewer foreground pixels (a speck or two) has no ``interior_fraction``: too few
#: to tell a filled nucleus from an outline.
MIN_FOREGROUND_FOR_SHAPE = 100
#: Below this ``interior_fraction`` a mask's nuclei are outlines, not filled
#: (``expectations/suites/dataset_errors.json``, rule ``mask_filled``, holds the same value).
MIN_INTERIOR_FRACTION = 0.2
#: Above this ``edge_to_edge_fraction`` a mask's background is labelled as a nucleus (rule
#: ``background_not_labelled``).
MAX_EDGE_TO_EDGE_FRACTION = 0.5
#: Above this ``split_label_fraction`` a mask's values are not one per nucleus (rule
#: ``one_label_per_nucleus``).
MAX_SPLIT_LABEL_FRACTION = 0.5

DATASET_README = """# mlseg dataset

Put each image in `{split}/{image_dir}/` and its mask in `{split}/{mask_dir}/`, named
`<image stem>{suffix}.<ext>` (e.g. `{split}/{image_dir}/slide1.png` ->
`{split}/{mask_dir}/slide1{suffix}.png`), for split in `{train}` and `{test}`.

- Images: PNG, TIFF (8/16-bit, compressed or not), JPEG; RGB or grey; one 2-D image per
  file (a z-stack or a multi-channel fluorescence file: save the plane or channel to use).
- Masks: PNG or TIFF (JPEG would change their values along every edge); same width and
  height as the image; binary (0/1 or 0/255) or instance-labelled (8/16-bit,
  0 = background, 1..N = one label per nucleus; an indexed PNG's indices are its labels,
  whatever its palette's colours). Nuclei drawn as polygons (QuPath GeoJSON, ImageScope
  XML) or as one file per nucleus (DSB 2018) become masks with `mlseg ingest SRC NEW_DIR`.
- Optional `manifest.csv` with columns `split,stem,pixel_size_um` gives microns per pixel
  ({low:g}-{high:g}); without it a JSON sidecar beside the image (`slide1.json`:
  `{{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}}`, as BIDS microscopy writes it) or a
  TIFF's metadata (OME, ImageJ, Aperio, resolution tags) does.

Check it with `mlseg validate {root}{config}`.
"""


@dataclass(frozen=True)
class Pair:
    """One image and its mask. ``pixel_size_um`` is microns per pixel, ``None`` if unknown;
    ``not_square``: the image declares pixels that are not square, so it has none, not even
    the profile's (:meth:`size_or`)."""

    split: str
    stem: str
    image: Path
    mask: Path | None
    pixel_size_um: float | None = None
    not_square: bool = False

    def size_or(self, default_um: float | None) -> float | None:
        """Microns per pixel of the image: its own, else ``default_um`` (the profile's), as
        :func:`mlseg.pixel_size.image_pixel_size` gives ``mlseg segment`` one: an image
        declaring pixels that are not square takes none, any one size being off along one
        axis, and is kept at its own scale as an image of unknown size."""
        if self.pixel_size_um is not None:
            return self.pixel_size_um
        return None if self.not_square else default_um


def split_dir(root: Path, cfg: DataConfig, split: str) -> Path:
    """The folder of ``split`` (``train`` or ``test``; anything else is a ConfigError: "val"
    read the test folder, and evaluate scored it under the name asked for)."""
    if split not in SPLITS:
        raise ConfigError(
            f"split must be train or test, got {split!r} (the validation images are part of "
            "train: a model's meta.json names them)"
        )
    return Path(root) / (cfg.train_dir if split == "train" else cfg.test_dir)


#: Files Windows Explorer writes into the folders it shows (thumbnail caches, folder
#: settings), hidden from its user as macOS's dot files (``.DS_Store``, ``._x.png``) are.
WINDOWS_HIDDEN_FILES = ("thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini")
#: The folder of those dot files that a zip made on a Mac unpacks to on Linux or Windows.
MAC_ZIP_FOLDER = "__MACOSX"


def is_hidden(name: str) -> bool:
    """Whether a file or folder named ``name`` is one a file browser hides or a Mac's zip
    leaves: no part of a dataset."""
    return name.startswith(".") or name.lower() in WINDOWS_HIDDEN_FILES or name == MAC_ZIP_FOLDER


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path.name)


#: The fix for an entry :func:`named_as_images_but_not_files` names.
RESTORE_OR_MOVE = (
    "restore what it stands for (mount the share a link points to, copy the image in) or move "
    "it out of the folder"
)
#: What becomes of the entries :func:`named_as_images_but_not_files` names, and the fix.
NOT_FILES_LEFT_OUT = (
    "named as images but no image files, so left out; restore what they stand for (mount the "
    "share a link points to, copy the image in) or move them out of the folder"
)


def named_as_images_but_not_files(folder: Path) -> list[str]:
    """``"<path>: <what it is>"`` for each entry of ``folder`` named as an image (not hidden)
    that :func:`is_image_file` leaves out as no file: a broken link (an image on a share that
    is not mounted), a link loop, a folder or a pipe named ``x.png``."""
    return [f"{path}: {what}" for path, what in _not_files(folder)]


def _not_files(folder: Path) -> list[tuple[Path, str]]:
    """``(path, what it is)`` of :func:`named_as_images_but_not_files`."""
    found = []
    for path in sorted(Path(folder).iterdir()):
        if is_hidden(path.name) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.is_file():
            continue
        try:
            os.stat(path)
        except OSError as err:
            loop = err.errno == errno.ELOOP or not path.is_symlink()
            what = "a link loop" if loop else f"a link to {os.readlink(path)}, which is missing"
        else:
            what = "a folder" if path.is_dir() else "not a regular file (a pipe or a device)"
        found.append((path, what))
    return found


#: What becomes of the files :func:`in_formats_not_read` names, and the fix.
OTHER_FORMATS_LEFT_OUT = (
    "images in a format mlseg does not read, so left out; save them as PNG or TIFF (a whole "
    "slide: export the regions to segment as tiles, QuPath: File > Export images)"
)


def in_formats_not_read(folder: Path) -> list[str]:
    """The files of ``folder`` (not hidden) with an :data:`OTHER_IMAGE_EXTENSIONS` name: a
    run over its images would leave them out unsaid (a BMP among PNGs never segmented)."""
    return [
        str(path)
        for path in sorted(Path(folder).iterdir())
        if path.suffix.lower() in OTHER_IMAGE_EXTENSIONS
        and not is_hidden(path.name)
        and path.is_file()
    ]


def warn_of_images_left_out(folder: Path, stacklevel: int = 2) -> None:
    """Warn, naming each, of the entries :func:`named_as_images_but_not_files` and
    :func:`in_formats_not_read` find in ``folder``: a run over its images leaves them out."""
    not_files = named_as_images_but_not_files(folder)
    if not_files:
        warnings.warn(f"{'; '.join(not_files)}: {NOT_FILES_LEFT_OUT}", stacklevel=stacklevel + 1)
    other = in_formats_not_read(folder)
    if other:
        warnings.warn(f"{'; '.join(other)}: {OTHER_FORMATS_LEFT_OUT}", stacklevel=stacklevel + 1)


def mask_stem(image_stem: str, cfg: DataConfig) -> str:
    return f"{image_stem}{cfg.mask_suffix}"


def image_stem_of_mask(name: str, suffix: str, image_stems: Container[str]) -> str | None:
    """The stem of the image a mask is for, from the mask's :func:`mlseg.io.image_stem`
    ``name`` (``x_mask`` for ``x``; ``x.ome_mask`` for ``x.ome.tif``'s ``x``, as
    :func:`mlseg.io.match_stem` reads it against the split's ``image_stems``); ``None``
    where ``name`` does not end with the mask ``suffix``, so names no image. The one
    matching of masks to images: pairing, evaluation's and validation's orphans use it."""
    if not name.endswith(suffix):
        return None
    return match_stem(name.removesuffix(suffix), image_stems)


def _layout(cfg: DataConfig) -> tuple[str, ...]:
    return (cfg.train_dir, cfg.test_dir, cfg.image_dir, cfg.mask_dir, cfg.mask_suffix)


def init_dataset(
    root: str | Path, cfg: DataConfig | None = None, *, final: str | Path | None = None
) -> Path:
    """Scaffold an empty dataset at ``root`` (which must not exist or be empty).

    ``final`` is the folder its README names (default ``root``): a dataset assembled in a
    staging folder and renamed into place names the place, not the staging folder."""
    cfg = cfg or DataConfig()
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"{root}: a file, not a folder; give a new folder for the dataset")
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root}: folder is not empty; choose a new folder or empty this one")
    with writes_named(root):  # 'file exists' alone of a link to a share not mounted
        for split in SPLITS:
            for sub in (cfg.image_dir, cfg.mask_dir):
                (split_dir(root, cfg, split) / sub).mkdir(parents=True, exist_ok=True)
    write_text(
        root / "README.md",
        DATASET_README.format(
            split=cfg.train_dir,
            train=cfg.train_dir,
            test=cfg.test_dir,
            image_dir=cfg.image_dir,
            mask_dir=cfg.mask_dir,
            suffix=cfg.mask_suffix,
            root=root if final is None else final,
            # a layout other than the default is only found with the config that sets it
            config="" if _layout(cfg) == _layout(DataConfig()) else " --config <your config>",
            low=PLAUSIBLE_PIXEL_SIZE_UM[0],
            high=PLAUSIBLE_PIXEL_SIZE_UM[1],
        ),
    )
    return root


def read_manifest(root: str | Path) -> pd.DataFrame | None:
    """The dataset's ``manifest.csv`` as text (``None`` if it has none); :class:`DatasetError`
    if it cannot be parsed. Column names match whatever their case, and spaces after the
    commas are left out (``split, stem, pixel_size_um``, as the contract is written). One
    that a spreadsheet saved with semicolons or tabs between columns is read too, its
    ``pixel_size_um`` decimal commas (``0,25``) as the numbers they are. A pixel-size column
    under another of :data:`PIXEL_SIZE_COLUMNS` (``mpp``) is read as ``pixel_size_um``, as
    ``mlseg ingest --pixel-sizes`` reads it."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    delimiter = csv_delimiter(path)
    try:
        table = read_csv_rows(
            path, as_written=("stem",), dtype=str, sep=delimiter, skipinitialspace=True
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DatasetError(f"{path}: cannot be read as CSV ({err}); fix or remove it") from err
    table.columns = [str(c).strip().lower() for c in table.columns]
    # an mpp column was read as no size at all, every image's size then unknown unsaid
    alias = next((c for c in PIXEL_SIZE_COLUMNS if c in table.columns), None)
    if alias is not None and alias != "pixel_size_um":
        table = table.rename(columns={alias: "pixel_size_um"})
    if delimiter != "," and "pixel_size_um" in table.columns:
        table["pixel_size_um"] = table["pixel_size_um"].str.replace(",", ".")  # decimal comma
    return table


#: What a damaged or cut-short compressed table raises when read (a gzip's BadGzipFile is an
#: OSError, a cut one's EOFError; a .zip without exactly one table: BadZipFile)
TABLE_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def table_bytes(path: Path, size: int = -1) -> bytes:
    """The first ``size`` bytes (all with -1) of the table at ``path`` as it is read:
    decompressed where the name ends in ``.gz``, ``.bz2``, ``.xz`` or ``.zip`` (its one
    file, a Mac's ``__MACOSX/`` left out). Read as stored, a compressed table's first line
    was the compressor's bytes, whose stray ``,`` or ``;`` chose the delimiter by chance."""
    suffix = path.suffix.lower()
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/") and "__MACOSX/" not in n]
            if len(names) != 1:
                raise zipfile.BadZipFile(
                    f"the zip holds {len(names)} files{': ' if names else ''}"
                    f"{some_of(names)}, not one table; zip the table alone"
                )
            with archive.open(names[0]) as fh:
                return fh.read(size)
    with _OPENERS.get(suffix, open)(path, "rb") as fh:
        return fh.read(size)


def _table_source(path: Path) -> Path | io.BytesIO:
    """What pandas reads of the table at ``path``: the file, or a compressed one's table
    (:func:`table_bytes`): pandas refused a Mac's zip, whose ``__MACOSX/._sizes.csv`` beside
    the table made two files, and a damaged .zip or .xz ended in its traceback (now one of
    :data:`TABLE_READ_ERRORS`, which the reader names the file by)."""
    if path.suffix.lower() not in (*_OPENERS, ".zip"):
        return path
    return io.BytesIO(table_bytes(path))  # a damaged one raises one of TABLE_READ_ERRORS


def csv_delimiter(path: Path) -> str:
    """``,``, or ``;`` or a tab where the header line has those and no comma (of the table
    decompressed, :func:`table_bytes`)."""
    try:
        head = table_bytes(path, 65536)
    except TABLE_READ_ERRORS:
        return ","  # read_csv names the problem
    header = head.decode("utf-8-sig", errors="replace").partition("\n")[0]
    if "," in header:
        return ","
    return next((d for d in (";", "\t") if d in header), ",")


def read_csv_rows(path: str | Path, as_written: Container[str] = (), **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` of a table a person wrote, refusing a row longer than its header.

    Left alone, pandas makes such a row's first values its index and shifts the others into
    the wrong columns without a word: ``img1,0,25`` (an unquoted decimal comma) would read
    as an image ``0`` of 25 um per pixel. A file not in UTF-8 is refused naming its first
    such line (:func:`not_utf8`). Other parse errors are pandas' own.

    The columns ``as_written`` names (lower case; a header in any case) keep their cells as
    written, an empty one as ``""``: an image named ``NA``, ``NaN`` or ``None`` is no missing
    value, which pandas reads those words as in the other columns (a pixel size left ``NA``,
    as R writes it).
    """
    table = _read_csv_rows(path, **kwargs)
    names = [c for c in table.columns if str(c).strip().lower() in as_written]
    if names:
        table[names] = _read_csv_rows(path, keep_default_na=False, **kwargs)[names]
    return table


def _read_csv_rows(path: str | Path, **kwargs) -> pd.DataFrame:
    where = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(_table_source(Path(path)), index_col=False, **kwargs)
    except pd.errors.ParserWarning:
        pass
    except UnicodeDecodeError as err:
        raise DatasetError(not_utf8(Path(path))) from err
    except pd.errors.ParserError as err:  # a later row longer than the first ones
        found = re.search(r"Expected \d+ fields in (line \d+)", str(err))
        if found is None:
            raise
        where = f" ({found.group(1)})"
    raise DatasetError(
        f"{path}: a row has more values than the header has columns{where}; write a decimal "
        "comma's number with a point (0.25), or separate the columns with semicolons"
    )


def read_resaved_csv(path: Path) -> pd.DataFrame:
    """A table that mlseg wrote as CSV, read back as written or as a spreadsheet saved it
    again: Excel in much of Europe writes semicolons or tabs between columns and decimal
    commas, which read as commas made each row one column. :class:`DatasetError` naming
    the file where it cannot be read."""
    delimiter = csv_delimiter(path)
    try:
        return pd.read_csv(path, sep=delimiter, decimal="." if delimiter == "," else ",")
    except UnicodeDecodeError as err:
        raise DatasetError(not_utf8(path)) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:  # EmptyData: no header
        raise DatasetError(f"{path}: cannot be read as CSV ({err}); fix or remove it") from err


def not_utf8(path: Path) -> str:
    """Why ``path`` cannot be read as UTF-8 text, with its first undecodable line and the fix.

    Excel's plain "CSV" (the default, not "CSV UTF-8") saves in the computer's legacy code
    page, Windows-1252 in Western Europe, so a ``µm`` or an accented file name is one byte
    that UTF-8 cannot read; pandas' error gives that byte's offset within a buffer. A
    compressed table's line is that of the table decompressed (:func:`table_bytes`)."""
    try:
        data = table_bytes(path)
    except TABLE_READ_ERRORS:
        data = path.read_bytes()
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        # Excel's "Unicode Text" (UTF-16, tab-separated): its first byte read as 0xff, 'ÿ'
        return (
            f"{path}: is UTF-16 text (Excel's 'Unicode Text'); save it as 'CSV UTF-8' "
            "(Excel) or with the UTF-8 character set (LibreOffice)"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = data[err.start : err.start + 1]
        line = data[: err.start].count(b"\n") + 1
        legacy = byte.decode("cp1252", errors="replace")
        return (
            f"{path}: line {line} is not UTF-8 text (byte 0x{byte.hex()}, {legacy!r} in "
            "Windows-1252); save it as 'CSV UTF-8' (Excel) or with the UTF-8 character set "
            "(LibreOffice)"
        )
    return f"{path}: is not UTF-8 text; save it as 'CSV UTF-8'"


def manifest_pixel_sizes(root: str | Path) -> dict[tuple[str, str], tuple[int, object]]:
    """``(split, stem) -> (CSV line, value as written)`` of every non-empty ``pixel_size_um``
    in the manifest; unchecked (see :func:`check_pixel_size`)."""
    manifest = read_manifest(root)
    if manifest is None:
        return {}
    if "pixel_size_um" not in manifest.columns:
        unread = [c for c in manifest.columns if _sounds_like_pixel_size(c)]
        if unread:
            warnings.warn(
                f"{Path(root) / MANIFEST}: column(s) {some_of(map(repr, unread))} are not read "
                f"as pixel sizes, so every image's size is taken from its sidecar, its metadata "
                f"or the profile; name the column pixel_size_um (microns per pixel; "
                f"{' or '.join(PIXEL_SIZE_COLUMNS[1:])} are read too)",
                stacklevel=2,
            )
        return {}
    missing = [c for c in ("split", "stem") if c not in manifest.columns]
    if missing:
        raise DatasetError(
            f"{Path(root) / MANIFEST}: has pixel_size_um but no {' or '.join(missing)} column; "
            "each pixel size needs the split and stem of its image"
        )
    values = zip(manifest["split"], manifest["stem"], manifest["pixel_size_um"], strict=True)
    sizes: dict[tuple[str, str], tuple[int, object]] = {}
    for line, (split, stem, value) in enumerate(values, start=2):
        if pd.isna(value) or not str(value).strip():
            continue
        key = (str(split).strip(), match_stem(str(stem).strip()))
        if key in sizes and not _same_size(sizes[key][1], value):
            first, before = sizes[key]
            raise DatasetError(
                f"{Path(root) / MANIFEST}: {'/'.join(key)} is listed twice, at {before} (line "
                f"{first}) and {value} (line {line}) um per pixel; keep one row per image"
            )
        sizes.setdefault(key, (line, value))
    return sizes


def _sounds_like_pixel_size(column: str) -> bool:
    """Whether a manifest column's name (lower case) speaks of pixels or microns, as a pixel
    size's under a name mlseg does not read does (``pixel_size``, ``pixel size (um)``);
    ingest's ``pixel_size_source`` is of its source, not a size."""
    return ("pixel" in column or "micron" in column) and column != "pixel_size_source"


def manifest_rows_naming_no_image(root: str | Path, split: str, stems: Container[str]) -> list[str]:
    """``line <n>: <split>/<stem>``, in line order, of each pixel-size row of the manifest
    written for ``split`` (in any case: ``Test`` too) that gives no image of ``stems`` its
    size: a stem written with its extension (``he_004.png``) or in another case, a typo, an
    image since removed, or a split not written ``train`` or ``test``, which names no split.
    Validation fails such rows (rule ``manifest_rows_name_images``, in these words); a run
    that reads a split without validating it names them with
    :func:`warn_of_unused_manifest_rows`."""
    rows = sorted(manifest_pixel_sizes(root).items(), key=lambda kv: kv[1][0])
    return [
        f"line {line}: {written}/{stem}"
        for (written, stem), (line, _) in rows
        if written.casefold() == split and (written != split or stem not in stems)
    ]


def warn_of_unused_manifest_rows(
    root: str | Path, split: str, stems: Container[str], stacklevel: int = 2
) -> None:
    """Warn, naming the manifest and each row by line, of the rows of ``split`` that give
    none of its images (``stems``) a size (:func:`manifest_rows_naming_no_image`): those
    images took the size of their sidecar, their metadata or the profile without a word."""
    rows = manifest_rows_naming_no_image(root, split, stems)
    if rows:
        warnings.warn(
            f"{Path(root) / MANIFEST}: {len(rows)} pixel-size row(s) of the {split} split name "
            f"no image of it ({some_of(rows, 3, '; ')}), so their sizes are not used: its "
            "images take theirs from their JSON sidecar, their TIFF metadata or the profile; "
            f"write the split as {split} and the stem as the image's file name without its "
            "extension (he_004 for he_004.png), or remove the row",
            stacklevel=stacklevel + 1,
        )


def _same_size(a: object, b: object) -> bool:
    """Whether two pixel sizes as written are one number (``0.5`` and ``0.50``)."""
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a).strip() == str(b).strip()


def warn_of_case_only_names(listed: Iterable[str], stems: Iterable[str], table: str) -> list[str]:
    """Warn, naming them, of the rows of ``table`` that name an image only in another case
    (``HE_000.png`` for ``he_000.png``): one file on macOS and Windows, where the table was
    likely typed, but no image here, so the row's value would go unused without a word.
    Returns the rows named."""
    stems = set(stems)
    by_case = {s.casefold(): s for s in stems}
    near = sorted(
        f"{name} for {by_case[name.casefold()]}"
        for name in set(listed) - stems
        if name.casefold() in by_case
    )
    if near:
        warnings.warn(
            f"{table} names {len(near)} image(s) in another case than their files "
            f"({some_of(near, 3)}), so their rows are not used; names match as written "
            "(macOS and Windows ignore case, mlseg does not): write each as its file is named",
            stacklevel=3,
        )
    return near


def warn_of_unused_rows(listed: Iterable[str], stems: Iterable[str], table: str) -> None:
    """Warn, naming them, of the rows of ``table`` (a pixel-size table, by stem) that name no
    image of ``stems`` while some of these images have no row: a misspelt stem, or a path in
    a stem's place, whose image would get no size from the table without a word. Rows for
    other images (a lab's master table) are no mistake where every image has its row. Rows
    naming an image in another case are said by :func:`warn_of_case_only_names`."""
    listed, stems = set(listed), set(stems)
    cased = warn_of_case_only_names(listed, stems, table)
    # by folded case: those rows and their images are said above, once
    folded_rows, folded_stems = {n.casefold() for n in listed}, {s.casefold() for s in stems}
    unused = sorted(n for n in listed - stems if n.casefold() not in folded_stems)
    without = sorted(s for s in stems - listed if s.casefold() not in folded_rows)
    if not unused or not without:
        return
    if not listed & stems and not cased:
        warnings.warn(
            f"{table} names none of these {len(stems)} images (it lists "
            f"{some_of(sorted(listed), 3)}; the images are {some_of(sorted(stems), 3)}), "
            f"so it gives no image its size; list each image by its file name or stem",
            stacklevel=3,
        )
        return
    warnings.warn(
        f"{table} has {len(unused)} row(s) naming no image here ({some_of(unused, 3)}) and "
        f"{len(without)} of these images have no row ({some_of(without, 3)}), so it gives "
        f"those no size; list each image by its file name or stem",
        stacklevel=3,
    )


def check_pixel_size(value: object, what: str) -> float:
    """``value`` as microns per pixel, or :class:`DatasetError` naming ``what`` and the fix."""
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    try:
        um = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        hint = " (a decimal comma? write 0.25 with a point)" if "," in str(value) else ""
        raise DatasetError(
            f"{what}: {value!r} is not a number of microns per pixel{hint}"
        ) from None
    if not plausible_pixel_size(um):
        hint = ""
        if high < um <= high * 1000:
            hint = f" (in nanometres? {um:g} nm is {um / 1000:g} um)"
        elif low / 1000 <= um < low:
            hint = f" (in millimetres? {um:g} mm is {um * 1000:g} um)"
        raise DatasetError(
            f"{what}: {um:g} um per pixel is outside {low:g}-{high:g}, the range of light "
            f"microscopy{hint}; give microns per pixel (0.25 at 40x, 0.5 at 20x)"
        )
    return um


def checked_pixel_sizes(root: str | Path) -> dict[tuple[str, str], float]:
    """The manifest's pixel sizes, checked: ``(split, stem) -> microns per pixel``."""
    return {
        key: check_pixel_size(value, f"{Path(root) / MANIFEST} line {line} ({'/'.join(key)})")
        for key, (line, value) in manifest_pixel_sizes(root).items()
    }


def split_pixel_sizes(root: str | Path, split: str) -> dict[str, float]:
    """The manifest's pixel sizes of ``split``, checked: image stem -> microns per pixel."""
    return {stem: um for (s, stem), um in checked_pixel_sizes(root).items() if s == split}


def _with_metadata_sizes(pairs: list[Pair], root: Path) -> list[Pair]:
    """Fill unknown pixel sizes from sidecars or TIFF metadata; warn once about implausible ones,
    and about files declaring another scale (:data:`SAME_SCALE_RATIO`) than ``root``'s
    manifest gives them."""
    filled, implausible, disagree = [], [], []
    for pair in pairs:
        if pair.pixel_size_um is None:
            not_square: list[Path] = []
            declared = usable_pixel_size_um(pair.image, implausible, not_square)
            if declared is not None or not_square:
                pair = Pair(
                    pair.split, pair.stem, pair.image, pair.mask, declared, bool(not_square)
                )
        else:  # the manifest decides; a file declaring another scale was overruled unsaid
            with warnings.catch_warnings():  # of a file whose size is not used
                warnings.simplefilter("ignore")
                declared = usable_pixel_size_um(pair.image, [])
            um = pair.pixel_size_um
            if declared is not None and max(um, declared) / min(um, declared) > SAME_SCALE_RATIO:
                disagree.append(
                    f"{pair.image}: {declared:g} um in its file, {um:g} in the manifest"
                )
        filled.append(pair)
    if implausible:
        warnings.warn(
            implausible_message(implausible, f"; give it in {MANIFEST} (pixel_size_um)"),
            stacklevel=3,
        )
    if disagree:
        warnings.warn(
            f"{len(disagree)} image(s) declare another pixel size than {root / MANIFEST} gives them "
            f"({some_of(disagree, 3, '; ')}); the manifest's is used: correct whichever is "
            "wrong (the manifest's row, or the JSON sidecar or TIFF metadata)",
            stacklevel=3,
        )
    return filled


@dataclass(frozen=True)
class SplitListing:
    """A split as :func:`list_split` found it: the ``pairs`` (:func:`list_pairs`'), and the
    mask files that no pair took, in file name order. ``orphan_masks``: masks named for an
    image that the split does not have; ``second_masks``: each other mask of an image that
    has one already -> the mask it is paired with (the last by file name)."""

    pairs: list[Pair]
    orphan_masks: list[Path]
    second_masks: dict[Path, Path]


def list_pairs(
    root: str | Path, split: str, cfg: DataConfig | None = None, strict: bool = True
) -> list[Pair]:
    """Pair every image of ``split`` with its mask, sorted by stem.

    With ``strict`` (the default for training), every problem found (missing folder, image
    without mask, mask without image, two files for one stem, a JPEG mask) is collected and
    raised as a single :class:`DatasetError` that names each file. Without it, images
    without a mask get ``mask=None`` (inference), a JPEG mask is paired (which
    :func:`mlseg.io.read_mask` refuses), and the masks no image takes are left out:
    :func:`list_split` names them.
    """
    return list_split(root, split, cfg, strict).pairs


def list_split(
    root: str | Path, split: str, cfg: DataConfig | None = None, strict: bool = True
) -> SplitListing:
    """:func:`list_pairs`, with the masks that no pair took (:class:`SplitListing`; none
    where ``strict``, which refuses them)."""
    cfg = cfg or DataConfig()
    root = Path(root)
    if not root.is_dir():  # not "<root>/train/original: folder not found"
        raise not_a_folder(root, "dataset")
    base = split_dir(root, cfg, split)
    img_dir, msk_dir = base / cfg.image_dir, base / cfg.mask_dir
    if not img_dir.is_dir():
        raise DatasetError(
            f"{img_dir}: folder not found; a dataset needs {split}/{cfg.image_dir}/ "
            f"(run `mlseg init` to scaffold one)"
        )
    problems: list[str] = []
    images: dict[str, Path] = {}
    for path in sorted(img_dir.iterdir()):
        if not is_image_file(path):
            continue
        stem = image_stem(path)
        if stem in images:
            problems.append(f"{path}: shares the stem {stem!r} with {images[stem].name}; keep one")
        images[stem] = path
    masks: dict[str, Path] = {}
    named: list[tuple[Path, str]] = []  # every mask file with the stem it names, in order
    drawn: dict[str, Path] = {}  # polygon annotations, which ingest draws as masks
    if msk_dir.is_dir():
        for path in sorted(msk_dir.iterdir()):
            if is_annotation_file(path):
                drawn[annotation_stem(path, cfg.mask_suffix)] = path
            if not is_image_file(path):
                continue
            name = image_stem(path)
            stem = image_stem_of_mask(name, cfg.mask_suffix, images)
            if stem is not None:
                if strict and stem in masks:
                    problems.append(
                        f"{path}: a second mask for {stem!r} (also {masks[stem].name}); keep one"
                    )
                masks[stem] = path
                named.append((path, stem))
                if strict and path.suffix.lower() not in MASK_EXTENSIONS:
                    # named here with every other, not by the first read of one, once the
                    # images before it were decoded
                    problems.append(not_lossless(path))
            elif strict:
                problems.append(
                    f"{path}: mask name must end with {cfg.mask_suffix!r} before the extension "
                    f"(e.g. {name}{cfg.mask_suffix}{image_extension(path)})"
                )
    elif strict:
        problems.append(f"{msk_dir}: mask folder not found; put the masks there")
    if strict:
        # a link to a share not mounted was left out unsaid: its mask was then said to have
        # no image, or its image no mask, while ls showed both. Links only, which validation
        # reports as unreadable too: a folder named x.png is left out by both, as before
        broken: set[str] = set()
        for folder, is_mask in ((img_dir, False), (msk_dir, True)):
            for path, what in _not_files(folder) if folder.is_dir() else []:
                if not path.is_symlink():
                    continue
                problems.append(f"{path}: {what}; {RESTORE_OR_MOVE}")
                name = image_stem(path)
                stem = image_stem_of_mask(name, cfg.mask_suffix, images) if is_mask else None
                broken.add(name if stem is None else stem)
        for stem, path in images.items():
            if stem in broken:
                continue
            if stem not in masks and stem in drawn:
                problems.append(
                    f"{path}: no mask; {drawn[stem].name} is a polygon annotation: draw it as "
                    f"a mask with `mlseg ingest <this dataset> <new folder>`"
                )
            elif stem not in masks and msk_dir.is_dir():
                problems.append(
                    f"{path}: no mask; expected {msk_dir / (mask_stem(stem, cfg) + '.png')}"
                )
        for stem, path in masks.items():
            if stem not in images and stem not in broken:
                problems.append(f"{path}: mask without image; expected {img_dir / stem}.<ext>")
    if problems:
        raise DatasetError(_summarise(problems))
    sizes = checked_pixel_sizes(root)
    pairs = _with_metadata_sizes(
        [
            Pair(split, stem, path, masks.get(stem), sizes.get((split, stem)))
            for stem, path in images.items()
        ],
        root,
    )
    return SplitListing(
        pairs,
        orphan_masks=[path for path, stem in named if stem not in images],
        second_masks={
            path: masks[stem] for path, stem in named if stem in images and masks[stem] != path
        },
    )


def dataset_fingerprint(pairs: list[Pair], *, pixel_sizes: bool = True) -> str:
    """SHA-256 over the names and bytes of every image and mask of ``pairs`` and the microns
    per pixel each image declares (hex, 16 chars): the training data's identity, which a
    corrected mask changes, and a corrected size too (training resamples by it).

    ``Pair.pixel_size_um`` is the size as read (``manifest.csv``, the JSON sidecar or TIFF
    metadata; not the profile's, which the run's ``meta.json`` keeps): the sorted
    ``<split>/<image name>`` and ``repr`` of each known size follow the files, so ``pairs``
    declaring none keep the fingerprint of mlseg before 2026-12-07. ``pixel_sizes=False``
    leaves the sizes out: that older form, which a run or card of then holds.
    """
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: (p.split, p.stem)):
        for path in (pair.image, pair.mask):
            if path is None:
                continue
            digest.update(f"{pair.split}/{path.name}\0".encode())
            digest.update(Path(path).read_bytes())
    declared = sorted(
        f"{p.split}/{p.image.name}\t{float(p.pixel_size_um)!r}"
        for p in pairs
        if p.pixel_size_um is not None
    )
    if pixel_sizes and declared:
        digest.update(("\0pixel_size_um\0" + "\n".join(declared)).encode())
    return digest.hexdigest()[:16]


def pixels_fingerprint(pairs: list[Pair]) -> str:
    """The training data's identity as the pipeline of mlseg before 2026-12-06 recorded it in
    a run's ``fingerprint_hash`` (validation's ``content_hash``; hex, 32 chars): SHA-256 of
    the sorted hashes of the images' pixels (alpha dropped, as it read them), names and
    masks left out."""
    from mlseg.inventory import content_hash

    hashes = sorted(content_hash(read_image(pair.image, alpha="drop")) for pair in pairs)
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:32]


def train_fingerprint(root: str | Path, cfg: DataConfig | None = None) -> str | None:
    """:func:`dataset_fingerprint` of ``root``'s training pairs, as training reads and
    fingerprints them; None where the layout is too broken to pair (validation reports it).
    Taken before validating, it is what the verdict is about: training refuses other data."""
    try:
        return dataset_fingerprint(list_pairs(root, "train", cfg, strict=False))
    except DatasetError:
        return None


def _summarise(problems: list[str], limit: int = 20) -> str:
    head = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} dataset problem(s):\n  " + "\n  ".join(head) + more


def mask_kind(mask: np.ndarray) -> str:
    """``"binary"`` if the mask holds at most one non-zero value, else ``"instance"``."""
    # compared with the first, not sorted (np.unique): two thirds of mask_to_labels' time
    mask = np.asarray(mask)
    values = mask[mask != 0]
    return "binary" if values.size == 0 or bool((values == values[0]).all()) else "instance"


def mask_to_labels(mask: np.ndarray, kind: str = "auto") -> np.ndarray:
    """Turn a binary or instance mask into ``(H, W) int32`` instance labels.

    Binary masks are split into connected components (8-connectivity), which is the best
    available guess; touching nuclei in a binary mask stay merged. A mask of one value in
    one piece keeps that value as its id unless it is a binary export's (255, 65535): one
    nucleus of an instance mask (a tile cut from a slide's label image) keeps its id, as
    it does beside another nucleus.
    """
    from skimage.measure import label

    from mlseg.inventory import BINARY_EXPORT_VALUES

    if kind == "auto":
        kind = mask_kind(mask)
    if kind == "binary":
        labels = label(mask > 0, connectivity=2).astype(np.int32)
        top = int(mask.max(initial=0))
        one_id = labels.max() == 1 and not ((mask != 0) & (mask != top)).any()
        if one_id and top not in BINARY_EXPORT_VALUES:
            return mask.astype(np.int32)
        return labels
    return mask.astype(np.int32)


def mask_shape(mask: np.ndarray, *, binary: bool) -> dict[str, float | None]:
    """Three signs that a mask does not mark nuclei as filled objects, one label each, on a
    zero background.

    ``interior_fraction``: of the foreground pixels, the share whose four neighbours carry the
    same label. A filled nucleus keeps its interior (0.64-0.86 per mask over the shared
    H&E and DSB 2018 masks; 0.36-0.43 for a disc 5-6 px across, 0.11 for one 3 px across,
    smaller than any profile's minimum nucleus); an outline, one or two pixels wide, has none
    (0.00-0.02 for four CPM15 masks reduced to their outlines). ``None`` under
    :data:`MIN_FOREGROUND_FOR_SHAPE` foreground pixels.

    ``edge_to_edge_fraction``: the share of the mask covered by its largest object (a label,
    or a connected component of a binary mask, 8-connected as training reads it) that touches
    all four edges; 0 if none does. Nuclei are islands: no annotated nucleus spans a tile, while
    the background does (0.83-0.86 for four inverted CPM15 masks).

    ``split_label_fraction``: the share of the foreground in labels made of two or more
    separate (8-connected) pieces; ``None`` for a binary mask, whose one value covers every
    nucleus. A nucleus is one piece: at most 0.01 per mask over the shared masks (a label cut
    by an overlapping contour). A class mask (1 = tumour nuclei, 2 = lymphocytes: one value
    for many nuclei) or a JPEG-compressed binary mask saved again as PNG (one value for every
    nucleus's inside, others in rings along the edges) is near 1.
    """
    fg = mask != 0
    n_fg = int(fg.sum())
    interior = None
    if n_fg >= MIN_FOREGROUND_FOR_SHAPE:
        padded = np.pad(mask, 1, mode="edge")
        same = fg.copy()
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            same &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
        interior = float(same.sum() / n_fg)
    spanning = 0.0
    edges = (mask[0], mask[-1], mask[:, 0], mask[:, -1])
    if n_fg and all(edge.any() for edge in edges):
        labels = mask
        if binary:
            _, labels = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
            edges = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
        common = functools.reduce(np.intersect1d, (np.unique(edge) for edge in edges))
        common = common[common != 0]
        if common.size:
            spanning = max(int((labels == value).sum()) for value in common) / mask.size
    return {
        "interior_fraction": interior,
        "edge_to_edge_fraction": spanning,
        "split_label_fraction": None if binary else _split_label_fraction(mask, n_fg),
    }


def _split_label_fraction(mask: np.ndarray, n_fg: int) -> float:
    """``split_label_fraction`` of :func:`mask_shape` (``n_fg``: its foreground pixels)."""
    from skimage.measure import label

    if not n_fg:
        return 0.0
    pieces = label(mask, background=0, connectivity=2)  # one id per piece of one value
    value = np.zeros(int(pieces.max()) + 1, mask.dtype)
    value[pieces.ravel()] = mask.ravel()
    _, of_value, n_pieces = np.unique(value[1:], return_inverse=True, return_counts=True)
    area = np.bincount(pieces.ravel())[1:]
    return float(area[n_pieces[of_value] >= 2].sum() / n_fg)


def check_mask_shape(labels: np.ndarray, path: Path | str) -> None:
    """Raise :class:`DatasetError` naming ``path`` where :func:`mask_shape` says the nuclei of
    ``labels`` (instance labels, as :func:`mask_to_labels` gives) are outlines or their
    background is labelled or its labels are not one per nucleus: their measurements would
    be wrong."""
    shape = mask_shape(labels, binary=False)  # a binary mask's components are labels already
    interior, spanning = shape["interior_fraction"], shape["edge_to_edge_fraction"]
    split = shape["split_label_fraction"]
    if interior is not None and interior < MIN_INTERIOR_FRACTION:
        raise DatasetError(
            f"{path}: the nuclei are drawn as outlines, not filled ({interior:.0%} of the "
            f"foreground lies inside an object); fill them (Fiji: Process > Binary > Fill "
            f"Holes) or export filled label masks"
        )
    if spanning > MAX_EDGE_TO_EDGE_FRACTION:
        raise DatasetError(
            f"{path}: one object touches all four edges and covers {spanning:.0%} of the "
            f"mask: the background is labelled as a nucleus (an inverted binary mask, or "
            f"background label 1); invert the mask (Fiji: Edit > Invert) or set the "
            f"background to 0"
        )
    if split > MAX_SPLIT_LABEL_FRACTION:
        raise DatasetError(
            f"{path}: {split:.0%} of the foreground lies in labels that each cover several "
            f"separate objects: its values are not one per nucleus (a class mask, such as "
            f"1 = tumour, 2 = lymphocyte, or a JPEG mask saved again as PNG, whose edges "
            f"became new values); export instance labels, one per nucleus, or a binary mask "
            f"(0 and 255 only) from the annotations"
        )
