"""Import a dataset from a common layout into the mlseg contract (see :mod:`mlseg.dataset`).

Recognised sources (``layout="auto"`` detects them in this order):

- ``contract``: already ``{train,test}/{original,masks}`` - splits are kept, and the
  pixel sizes of its ``manifest.csv``.
- ``nnunet``: nnU-Net raw dataset, ``imagesTr/<case>_0000.<ext>`` + ``labelsTr/<case>.<ext>``
  (labelled ``imagesTs``/``labelsTs`` become the test split and ``imagesTr`` the training
  split, whatever the test fraction).
- ``flat``: ``original/<stem>.<ext>`` + ``masks/<stem>_mask.<ext>`` (as ``../shared/data/*``).
- ``cellpose``: one folder of ``<stem>.tif`` + ``<stem>_masks.tif``.
- ``dsb``: one folder per image, ``<stem>/images/<stem>.png`` + ``<stem>/masks/*.png`` with one
  mask per nucleus (Data Science Bowl 2018, BBBC038), drawn into one label mask.

In ``flat`` and ``contract`` sources a mask may also be a polygon annotation file, QuPath
GeoJSON or ImageScope XML (:mod:`mlseg.annotations`), named ``<stem>_mask.geojson`` or as
its image (``<stem>.geojson``, ``<stem>.xml``; ``<stem>.tif.geojson`` as QuPath scripts name
them; ``<stem>_nuclei.geojson`` as mlseg segment does): it is drawn at its image's size and
written as the dataset's ``<stem>_mask.png``.

Images in a folder inside a flat or contract source's image or mask folder (``original/
batch2/``) are refused by name: training reads only the files directly in its folders.

The source is only read. Every pair is decoded and checked (readable, same size) before
anything is written; all problems are reported together. Files are copied (or hard-linked
with ``link=True``) into a temporary sibling folder that is renamed onto the target at the
end, so a failure leaves nothing behind. A ``manifest.csv`` records where each file came
from and its pixel size when known, with where that came from (``pixel_size_source``:
``table``, ``argument``, ``image metadata``, ``annotation`` or ``unknown``).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mlseg.annotations import (
    Drawn,
    annotation_labels,
    annotation_stem,
    is_annotation_file,
    object_mask_labels,
)
from mlseg.config import DataConfig
from mlseg.dataset import (
    MANIFEST,
    PIXEL_SIZE_COLUMNS,
    TABLE_READ_ERRORS,
    _summarise,
    check_pixel_size,
    checked_pixel_sizes,
    csv_delimiter,
    in_formats_not_read,
    init_dataset,
    is_hidden,
    is_image_file,
    named_as_images_but_not_files,
    read_csv_rows,
    split_dir,
    warn_of_unused_rows,
)
from mlseg.errors import (
    DatasetError,
    ImageReadError,
    not_a_folder,
    size_mismatch,
    staged_write_error,
)
from mlseg.io import (
    image_extension,
    image_stem,
    labels_suffix,
    link_followed,
    match_stem,
    read_image,
    read_mask,
    staging_dir,
    without_image_extension,
    write_labels,
    write_table,
)
from mlseg.pixel_size import (
    implausible_message,
    plausible_pixel_size,
    sizes_text,
    usable_pixel_size_um,
)
from mlseg.progress import shown

#: What mlseg segment names an image's GeoJSON (``x_nuclei.geojson``): a mask for ``x``.
GEOJSON_SUFFIX = "_nuclei"
LAYOUTS = ("auto", "contract", "nnunet", "flat", "dsb", "cellpose")
STEM_COLUMNS = ("stem", "image_id", "id", "name", "image", "file", "filename")


@dataclass(frozen=True)
class SourceItem:
    stem: str
    image: Path
    mask: Path | None
    split: str | None = None


@dataclass
class IngestResult:
    root: Path
    layout: str
    manifest: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def detect_layout(src: Path, cfg: DataConfig) -> str:
    """Name the layout of ``src`` or raise :class:`DatasetError` describing what was expected."""
    if (src / cfg.train_dir / cfg.image_dir).is_dir():
        return "contract"
    if (src / "imagesTr").is_dir():
        return "nnunet"
    if (src / cfg.image_dir).is_dir():
        return "flat"
    if any((case / "images").is_dir() for case in src.iterdir() if case.is_dir()):
        return "dsb"
    if any(p.name.endswith(("_masks.tif", "_masks.tiff", "_masks.png")) for p in src.iterdir()):
        return "cellpose"
    raise DatasetError(
        f"{src}: unknown dataset layout; expected {cfg.image_dir}/ + {cfg.mask_dir}/ (flat), "
        f"imagesTr/ + labelsTr/ (nnU-Net), <name>/images/ + <name>/masks/ (DSB 2018), "
        f"<name>.tif + <name>_masks.tif (Cellpose), "
        f"or {cfg.train_dir}/{cfg.image_dir}/ (mlseg)"
    )


def _images_left_out(folder: Path) -> list[str]:
    """A problem for each entry of ``folder`` named as an image that is no file (a broken
    link, a link loop, a folder or a pipe) or is one in a format mlseg does not read (its
    mask was reported as a mask without image): ingesting without it would lose an image."""
    return [
        f"{entry}; restore it or remove it" for entry in named_as_images_but_not_files(folder)
    ] + [
        f"{path}: an image in a format mlseg does not read; save it as PNG or TIFF"
        for path in in_formats_not_read(folder)
    ]


def _nested_images(folder: Path, read: Iterable[str] = (), fix: str | None = None) -> list[str]:
    """A problem for each folder inside ``folder`` (not hidden, at any depth; not one of
    ``read``, the folders ingest reads) that holds image files: a lab's ``original/batch1/``
    was left out without a word, as training and evaluation read only the files directly in
    their folders, and the dataset came out smaller, which validation could then no longer
    tell. ``fix`` says where to move them (default: up into ``folder``)."""
    read = set(read)
    fix = fix or (
        f"it reads the files directly in {folder}; move them up into {folder}, or ingest "
        "that folder on its own"
    )
    problems = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if is_hidden(sub.name) or sub.name in read:
            continue
        found = [
            p
            for p in sorted(sub.rglob("*"))
            if is_image_file(p) and not any(is_hidden(part) for part in p.relative_to(sub).parts)
        ]
        if found:
            problems.append(
                f"{sub}: a folder of {len(found)} image file(s) (e.g. {found[0].name}), which "
                f"ingest would leave out ({fix})"
            )
    return problems


def _by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    """The image files of ``folder`` by stem; two files of one stem (``a.png``, ``a.tif``)
    are a problem, not one of them kept."""
    found: dict[str, Path] = {}
    if folder.is_dir():
        problems.extend(_images_left_out(folder))
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not is_image_file(p):
            continue
        stem = image_stem(p)
        if stem in found:
            problems.append(f"{p}: shares its stem with {found[stem].name}; keep one")
            continue
        found[stem] = p
    return found


def _masks_by_stem(folder: Path, suffix: str, problems: list[str]) -> dict[str, Path]:
    """The masks of ``folder`` by image stem: ``<stem><suffix>.<ext>`` images, and polygon
    annotation files (named as their mask or their image, :func:`annotation_stem`)."""
    masks: dict[str, Path] = {}
    if not folder.is_dir():
        return masks
    problems.extend(_images_left_out(folder))
    for p in sorted(folder.iterdir()):
        if is_annotation_file(p):
            stem = annotation_stem(p, suffix)
        elif not is_image_file(p):
            continue
        elif image_stem(p).endswith(suffix):
            stem = image_stem(p).removesuffix(suffix)
        else:
            problems.append(
                f"{p}: mask name must end with {suffix!r} "
                f"(e.g. {image_stem(p)}{suffix}{image_extension(p)})"
            )
            continue
        if stem in masks:
            problems.append(f"{p}: a second mask for {stem!r} (also {masks[stem].name}); keep one")
            continue
        masks[stem] = p
    return masks


def _pair(
    images: dict[str, Path],
    masks: dict[str, Path],
    split: str | None,
    problems: list[str],
    mask_hint: str,
) -> list[SourceItem]:
    masks_of: dict[str, Path] = {}
    for stem, path in masks.items():
        stem = match_stem(stem, images)  # x.ome_mask.tif: x.ome.tif's (:func:`match_stem`)
        own = stem.removesuffix(GEOJSON_SUFFIX)
        if stem not in images and own in images and path.name.endswith(".geojson"):
            stem = own  # mlseg segment's own x_nuclei.geojson, corrected in QuPath
        if stem in masks_of:
            problems.append(
                f"{path}: a second mask for {stem!r} (also {masks_of[stem].name}); keep one"
            )
            continue
        masks_of[stem] = path
    masks = masks_of
    items = []
    for stem, path in images.items():
        if stem not in masks:
            problems.append(f"{path}: image without mask; add {mask_hint.format(stem=stem)}")
            continue
        items.append(SourceItem(stem, path, masks[stem], split))
    for stem, path in masks.items():
        if stem not in images:
            problems.append(f"{path}: mask without image; add the image or remove the mask")
    return items


def scan_source(src: Path, layout: str, cfg: DataConfig) -> list[SourceItem]:
    """List image/mask pairs of ``src``; collect naming problems into one DatasetError."""
    problems: list[str] = []
    items: list[SourceItem] = []
    suffix = cfg.mask_suffix
    if layout == "contract":
        # a val/ (or any other) folder beside train/ and test/ was left out without a word
        splits = (cfg.train_dir, cfg.test_dir)
        problems.extend(
            _nested_images(
                src,
                read=splits,
                fix=f"it reads {splits[0]}/ and {splits[1]}/; move them into {splits[0]}/, "
                f"from which mlseg draws the validation images, or into {splits[1]}/",
            )
        )
        for split in ("train", "test"):
            base = split_dir(src, cfg, split)
            for folder in (base / cfg.image_dir, base / cfg.mask_dir):
                problems.extend(_nested_images(folder))
            images = _by_stem(base / cfg.image_dir, problems)
            masks = _masks_by_stem(base / cfg.mask_dir, suffix, problems)
            items += _pair(
                images, masks, split, problems, f"{base / cfg.mask_dir}/{{stem}}{suffix}.png"
            )
    elif layout == "flat":
        for folder in (src / cfg.image_dir, src / cfg.mask_dir):
            problems.extend(_nested_images(folder))
        images = _by_stem(src / cfg.image_dir, problems)
        masks = _masks_by_stem(src / cfg.mask_dir, suffix, problems)
        items += _pair(images, masks, None, problems, f"{src / cfg.mask_dir}/{{stem}}{suffix}.png")
    elif layout == "nnunet":
        for img_dir, lbl_dir, split in (
            ("imagesTr", "labelsTr", None),
            ("imagesTs", "labelsTs", "test"),
        ):
            raw = _by_stem(src / img_dir, problems)
            if not raw:
                continue
            if split == "test" and not (src / lbl_dir).is_dir():
                continue  # unlabelled test images cannot be evaluated: leave them out
            images = {}
            for s, p in raw.items():
                if s.endswith("_0000"):
                    images[s[:-5]] = p
                elif len(s) > 5 and s[-5] == "_" and s[-4:].isdigit():
                    problems.append(
                        f"{p}: multi-file channels (_0001, ...) are not supported; merge channels into one RGB image"
                    )
                else:
                    problems.append(
                        f"{p}: nnU-Net image names end with _0000 (channel index); rename it"
                    )
            items += _pair(
                images,
                _by_stem(src / lbl_dir, problems),
                split,
                problems,
                f"{src / lbl_dir}/{{stem}}.png",
            )
        if any(item.split == "test" for item in items):  # nnU-Net's own split, kept
            items = [replace(item, split=item.split or "train") for item in items]
    elif layout == "dsb":
        for case in sorted(p for p in src.iterdir() if p.is_dir() and not is_hidden(p.name)):
            images = [p for p in sorted((case / "images").glob("*")) if is_image_file(p)]
            for sub in (case / "images", case / "masks"):  # a nucleus' link lost: a nucleus less
                if sub.is_dir():
                    problems.extend(_images_left_out(sub))
            if len(images) != 1:
                problems.append(
                    f"{case / 'images'}: {len(images)} images; the DSB layout has one per folder"
                )
            elif not (case / "masks").is_dir():
                problems.append(
                    f"{images[0]}: image without mask; add {case / 'masks'}/ with one mask "
                    f"per nucleus (an empty folder for an image without nuclei)"
                )
            else:
                items.append(SourceItem(case.name, images[0], case / "masks", None))
    elif layout == "cellpose":
        files = _by_stem(src, problems)
        masks = {s[: -len("_masks")]: p for s, p in files.items() if s.endswith("_masks")}
        images = {
            s: p for s, p in files.items() if not s.endswith(("_masks", "_flows", "_cp_output"))
        }
        items += _pair(images, masks, None, problems, f"{src}/{{stem}}_masks.tif")
    else:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    for item in items:  # in the dataset it would pass for a mask (mlseg validate: mask_naming)
        if item.stem.endswith(suffix):
            problems.append(
                f"{item.image}: an image named <stem>{suffix} reads as a mask in an mlseg "
                f"dataset; rename it and its mask so that its name does not end with {suffix!r}"
            )
    if problems:
        raise DatasetError(_summarise(problems))
    if not items:
        raise DatasetError(f"{src}: no image/mask pairs found (layout {layout})")
    return items


def _drawn(item: SourceItem, shape: tuple[int, int]) -> Drawn | None:
    """The mask of ``item`` drawn for an image of ``shape``, where its mask is polygons or a
    folder of one-nucleus masks; ``None`` for a mask image."""
    if item.mask.is_dir():
        return object_mask_labels(item.mask, shape)
    if is_annotation_file(item.mask):
        return annotation_labels(item.mask, shape)
    return None


def check_pairs(
    items: list[SourceItem],
    progress: bool = True,
    log: Callable[[str], object] | None = None,
) -> dict[str, tuple[tuple[int, int], float | None]]:
    """Decode every image and mask; raise one DatasetError listing unreadable or mismatched
    files. Returns, for each mask to be drawn (polygons, one mask per nucleus), its image's
    ``(H, W)`` and the pixel size the annotation declares; what drawing left out is said in
    one warning. Drawn masks are not kept (a dataset's worth would not fit in memory).
    ``progress`` draws a bar, ``log`` is given a line on how far it is once a minute."""
    problems: list[str] = []
    drawn: dict[str, tuple[tuple[int, int], float | None]] = {}
    noted: list[str] = []
    for item in shown(
        items,
        "ingest, checking",
        "pairs",
        log,
        bar="checking" if progress else None,
        bar_unit="pair",
        leave=False,
    ):
        try:
            image = read_image(item.image)
        except ImageReadError as err:
            problems.append(str(err))
            continue
        shape = image.shape[:2]
        try:
            if (labels := _drawn(item, shape)) is not None:
                drawn[item.stem] = (shape, labels.pixel_size_um)
                if labels.notes:
                    noted.append(f"{item.mask.name}: {', '.join(labels.notes)}")
                continue
            mask = read_mask(item.mask)
        except ImageReadError as err:
            problems.append(str(err))
            continue
        if mask.shape != shape:
            problems.append(size_mismatch(item.mask, mask.shape, shape, item.image))
    if problems:
        raise DatasetError(_summarise(problems))
    if noted:
        warnings.warn(f"drawing annotations as masks: {'; '.join(noted)}", stacklevel=3)
    return drawn


def assign_splits(stems: list[str], test_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic seeded split: the same stems, fraction and seed give the same split.

    At least one test image is kept when there are two or more images and the fraction > 0.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test fraction must be in [0, 1), got {test_fraction}")
    ordered = sorted(stems)
    n_test = int(round(len(ordered) * test_fraction))
    if test_fraction > 0 and len(ordered) >= 2:
        n_test = min(max(n_test, 1), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    test = {ordered[i] for i in order[:n_test]}
    return {s: ("test" if s in test else "train") for s in ordered}


def read_pixel_sizes(path: Path) -> dict[str, float]:
    """Per-image pixel sizes from a CSV with a stem column and a pixel-size column.

    Column names match whatever their case (``Image``, ``MPP``); stems may carry their file
    extension (``slide1.ome.tif`` is ``slide1``'s, :func:`mlseg.io.image_stem`). A table that
    a spreadsheet saved with semicolons or tabs between columns is read too, with its decimal
    commas (``0,25``) as the numbers they are.
    """
    delimiter = csv_delimiter(path)
    try:
        table = read_csv_rows(
            path, as_written=STEM_COLUMNS, dtype=str, sep=delimiter, skipinitialspace=True
        )
    # EOFError, zlib.error: a .csv.gz or .csv.bz2 cut short or damaged; typer made the
    # EOFError an 'aborted', as after Ctrl-C; a zip of two files, a damaged .zip or .xz
    except (*TABLE_READ_ERRORS, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DatasetError(f"{path}: cannot read pixel-size table ({err})") from err
    named = {str(c).strip().lower(): c for c in table.columns}
    stem_col = next((named[c] for c in STEM_COLUMNS if c in named), None)
    size_col = next((named[c] for c in PIXEL_SIZE_COLUMNS if c in named), None)
    if stem_col is None or size_col is None:
        raise DatasetError(
            f"{path}: a pixel-size table needs a column among {STEM_COLUMNS} and one among "
            f"{PIXEL_SIZE_COLUMNS}; found {list(table.columns)}"
        )
    sizes: dict[str, float] = {}
    rows = zip(table[stem_col], table[size_col], strict=True)
    for line, (stem, value) in enumerate(rows, start=2):
        if pd.isna(value) or str(value).strip() == "":
            continue
        if str(stem).strip() == "":
            raise DatasetError(
                f"{path}: line {line} gives a pixel size ({str(value).strip()}) but no image in "
                f"its {stem_col!r} column; name the image or delete the line"
            )
        if delimiter != ",":
            value = str(value).strip().replace(",", ".")  # decimal comma
        um = check_pixel_size(value, f"{path}: pixel size of {stem!r}")
        name = match_stem(without_image_extension(str(stem).strip()))  # x.ome.tif, x.ome: x
        if sizes.get(name, um) != um:
            raise DatasetError(
                f"{path}: {name!r} is listed twice, at {sizes[name]:g} and {um:g} um per "
                f"pixel; keep one row per image"
            )
        sizes[name] = um
    return sizes


def _source_pixel_sizes(
    src: Path, pixel_sizes: Path | None, layout: str, items: list[SourceItem]
) -> dict[str, float]:
    """Image stem -> microns per pixel, from ``pixel_sizes``, else a ``contract`` source's
    manifest or an ``index.csv`` with a pixel-size column. A manifest row whose stem is an
    image of another split (``test,a`` or ``Train,a`` for ``train/a``) is keyed
    ``split/stem``: training gives it to no image, so neither does ingest, and
    :func:`warn_of_unused_rows` names it; merged by stem, it gave ``train/a`` its size."""
    if pixel_sizes is not None:
        return read_pixel_sizes(Path(pixel_sizes))
    if layout == "contract":  # an mlseg dataset's own sizes (manifest.csv), as training reads them
        held = {(i.split, i.stem) for i in items}
        stems = {i.stem for i in items}
        listed = {
            stem if (split, stem) in held or stem not in stems else f"{split}/{stem}": um
            for (split, stem), um in checked_pixel_sizes(src).items()
        }
        if listed:
            return listed
    index = src / "index.csv"
    if index.is_file():
        try:
            columns = pd.read_csv(index, nrows=0, sep=csv_delimiter(index)).columns
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            warnings.warn(f"{index}: not read for pixel sizes ({err})", stacklevel=3)
            return {}
        if any(str(c).strip().lower() in PIXEL_SIZE_COLUMNS for c in columns):
            return read_pixel_sizes(index)
    return {}


def _pixel_size(
    item: SourceItem,
    sizes: dict[str, float],
    pixel_size_um: float | None,
    declared: float | None,
    implausible: list[tuple[Path, float]],
) -> tuple[float | None, str]:
    """``(microns per pixel or None, where it came from)`` for one pair: its row of the
    table, ``--pixel-size``, the image's sidecar or TIFF metadata, then the size its drawn
    annotation ``declared`` (ImageScope's MicronsPerPixel, mlseg GeoJSON's pixel_size_um).
    Implausible sizes a file declares are appended to ``implausible`` as ``(path, um)``; an
    image declaring pixels that are not square has none (warned of, naming it)."""
    if (size := sizes.get(item.stem)) is not None:
        return size, "table"
    if pixel_size_um is not None:
        return pixel_size_um, "argument"
    not_square: list[Path] = []
    if (size := usable_pixel_size_um(item.image, implausible, not_square)) is not None:
        return size, "image metadata"
    if not_square:
        return None, "unknown"
    if declared is not None:
        if plausible_pixel_size(declared):
            return declared, "annotation"
        implausible.append((item.mask, declared))
    return None, "unknown"


def describe_pixel_sizes(manifest: pd.DataFrame, root: str | Path = ".") -> str:
    """One line on the pixel sizes ``manifest`` (of the dataset at ``root``) records (pure):
    how many images have one, which, and where from; where some have none, what training
    does with them and how to give them.

    E.g. ``pixel sizes: 2 of 4 images have one (2 at 0.5 um; from table: 2); 2 have none:
    ...``. Nothing else tells a 20x tile from a 40x one: a set ingested without sizes
    trained each image at its own scale, and ingest said nothing."""
    n = len(manifest)
    known = manifest[manifest["pixel_size_um"].notna()]
    advice = (
        "give each image its microns per pixel: ingest again into a new folder with "
        "--pixel-sizes sizes.csv (stem,pixel_size_um) or --pixel-size, or fill the "
        f"pixel_size_um column of {Path(root) / MANIFEST}"
    )
    if known.empty:
        return (
            f"pixel sizes: none of the {n} images has one (no --pixel-sizes table, "
            "--pixel-size, sidecar, TIFF metadata or annotation gave one), so training "
            "cannot tell 20x from 40x tiles: it keeps each at its own scale and the model's "
            f"pixel size is unknown, unless the run's profile sets pixel_size_um; {advice}"
        )
    sized = sizes_text(known["pixel_size_um"])
    sources = ", ".join(
        f"{source}: {count}"
        for source, count in known["pixel_size_source"].value_counts().sort_index().items()
    )
    has = "has" if len(known) == 1 else "have"
    line = f"pixel sizes: {len(known)} of {n} images {has} one ({sized}; from {sources})"
    if len(known) == n:
        return line
    missing = n - len(known)
    return (
        f"{line}; {missing} {'has' if missing == 1 else 'have'} none: training keeps those at their own scale, "
        f"unless the run's profile sets pixel_size_um; {advice}"
    )


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            dst.symlink_to(src.resolve())
            return
    shutil.copy2(src, dst)


def ingest(
    src: str | Path,
    dst: str | Path,
    *,
    layout: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
    link: bool = False,
    cfg: DataConfig | None = None,
    pixel_sizes: str | Path | None = None,
    pixel_size_um: float | None = None,
    progress: bool = True,
    log: Callable[[str], object] | None = None,
) -> IngestResult:
    """Import ``src`` into a new mlseg dataset at ``dst``; see the module docstring.

    ``pixel_sizes`` is an optional CSV (stem + ``pixel_size_um``/``mpp``) giving microns per
    pixel per image; ``pixel_size_um`` applies to every image without one. The image's JSON
    sidecar or TIFF metadata (:func:`mlseg.pixel_size.declared_pixel_size_um`) is used where neither
    gives a size, unless it is implausible (a warning names the files). Sizes outside
    :data:`mlseg.pixel_size.PLAUSIBLE_PIXEL_SIZE_UM` in the table or the argument are refused.
    ``progress`` draws a bar; ``log`` (a job's stderr, where no bar is drawn) is given a line
    on how far the checking and the writing are once a minute
    (:class:`mlseg.progress.ProgressLog`).
    """
    cfg = cfg or DataConfig()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise not_a_folder(src, "source")
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"{dst}: a file, not a folder; give a new folder as the target")
    if dst.exists() and any(dst.iterdir()):
        raise DatasetError(
            f"{dst}: target is not empty; choose a new folder (ingest never overwrites)"
        )
    if dst.resolve().is_relative_to(src.resolve()):
        raise DatasetError(
            f"{dst}: target lies inside the source {src}; choose a folder outside it"
        )
    final = link_followed(dst)
    if pixel_size_um is not None:
        check_pixel_size(pixel_size_um, "--pixel-size")
    layout = detect_layout(src, cfg) if layout == "auto" else layout
    items = scan_source(src, layout, cfg)
    stems = [i.stem for i in items]
    # counted once, not stems.count per stem: 20,000 pairs waited 28 s before any work
    dupes = sorted(s for s, n in Counter(stems).items() if n > 1)
    if dupes:
        raise DatasetError(
            f"{src}: stems used twice across splits: {', '.join(dupes[:10])}; rename them"
        )
    drawn = check_pairs(items, progress=progress, log=log)
    sizes = _source_pixel_sizes(src, pixel_sizes, layout, items)
    table = src / MANIFEST if pixel_sizes is None and layout == "contract" else None
    warn_of_unused_rows(sizes, stems, str(table) if table else "the pixel-size table")
    free = [i.stem for i in items if i.split is None]
    splits = assign_splits(free, test_fraction, seed) if free else {}

    staging = staging_dir(final)
    try:
        init_dataset(staging, cfg, final=dst)
        rows, implausible = [], []
        for item in shown(
            items,
            "ingest, writing",
            "pairs",
            log,
            bar="ingesting" if progress else None,
            bar_unit="pair",
            leave=False,
        ):
            split = item.split or splits[item.stem]
            base = split_dir(staging, cfg, split)
            image_dst = base / cfg.image_dir / f"{item.stem}{image_extension(item.image)}"
            mask_name = f"{item.stem}{cfg.mask_suffix}"
            _place(item.image, image_dst, link)
            declared = None
            if item.stem in drawn:
                shape, declared = drawn[item.stem]
                labels = _drawn(item, shape).labels
                suffix = labels_suffix(int(labels.max(initial=0)))
                mask_dst = base / cfg.mask_dir / f"{mask_name}{suffix}"
                write_labels(mask_dst, labels)
            else:
                mask_dst = base / cfg.mask_dir / f"{mask_name}{image_extension(item.mask)}"
                _place(item.mask, mask_dst, link)
            size, source = _pixel_size(item, sizes, pixel_size_um, declared, implausible)
            rows.append(
                {
                    "split": split,
                    "stem": item.stem,
                    "image": image_dst.relative_to(staging).as_posix(),
                    "mask": mask_dst.relative_to(staging).as_posix(),
                    "source_image": str(item.image),
                    "source_mask": str(item.mask),
                    "pixel_size_um": size,
                    "pixel_size_source": source,
                }
            )
        manifest = pd.DataFrame(rows).sort_values(["split", "stem"], ignore_index=True)
        write_table(manifest, staging / MANIFEST)
        if final.exists():
            final.rmdir()
        os.replace(staging, final)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        said = staged_write_error(err, staging, dst)
        if said is None:
            raise
        raise said from err
    if implausible:
        warnings.warn(
            implausible_message(implausible, "; give it with --pixel-sizes or --pixel-size"),
            stacklevel=2,
        )
    counts = manifest["split"].value_counts().to_dict()
    return IngestResult(dst, layout, manifest, {k: int(v) for k, v in counts.items()})
