"""Image, mask and table I/O. The only module that reads or writes pixel data (what a file
declares about its pixel size is :mod:`mlseg.pixel_size`'s).

Images come back as ``(H, W, C)`` arrays in their stored dtype (``uint8`` or ``uint16``),
RGB channel order, ``C`` in {1, 3}; :func:`full_scale` says which stored value is full
intensity (a 12-bit camera's image is 0-4095 in a 16-bit file). Masks come back as
``(H, W) int32`` label images.
Every writer is atomic: it writes a temporary file in the target folder and renames it,
so a crash never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
import warnings
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from mlseg.errors import (
    ImageReadError,
    MlsegError,
    OutputError,
    cannot_write,
    dangling_link,
    staged_write_error,
    writes_named,
)

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff")
#: Extensions of the image files microscopes, slide scanners, cameras and image programs
#: write that mlseg does not read (:data:`IMAGE_EXTENSIONS` are those it does):
#: named where a run leaves them out (:func:`mlseg.dataset.in_formats_not_read`).
OTHER_IMAGE_EXTENSIONS = (
    *(".bmp", ".dib", ".gif", ".webp", ".jp2", ".j2k", ".jpf", ".jxl", ".jfif", ".jpe"),
    *(".heic", ".heif", ".avif", ".pgm", ".ppm", ".pnm", ".psd", ".dng", ".exr"),
    *(".svs", ".ndpi", ".scn", ".mrxs", ".vsi", ".czi", ".lif", ".nd2", ".oib", ".oir"),
    *(".ims", ".bif", ".qptiff", ".btf", ".lsm", ".zvi", ".dcm"),
)
#: One extension, not ``.tif`` after a stem ending in ``.ome`` (:func:`image_stem`).
OME_TIFF_EXTENSIONS = (".ome.tif", ".ome.tiff")
#: Masks are labels: only lossless formats keep them (JPEG changes values along every edge).
MASK_EXTENSIONS = (".png", ".tif", ".tiff")
#: The most a decoded image may take in memory. Images are read whole; a whole-slide image's
#: full-resolution level (tens of GiB) is refused with an error naming it, not read until the
#: system kills the process.
MAX_IMAGE_BYTES = 4 * 2**30
#: The most images (pages) a TIFF may hold to be read: tifffile sorts a file's images into
#: series in time growing with the square of their count (a 7 MB file of 30,000 tiny pages
#: took 7 minutes to read its first image). A slide holds a few, a plate's fields hundreds.
MAX_TIFF_PAGES = 1000
#: How much of an output's stem its temporary file's name keeps (:func:`atomic_path`).
TMP_STEM_CHARS = 64
PNG_PALETTE = 3  # IHDR colour type of an indexed PNG
PNG_GREY_ALPHA = 4  # IHDR colour type of a grey PNG with an alpha channel
#: Bit depths a 16-bit file holds: cameras save 10-, 12- and 14-bit data in 16-bit TIFF/PNG.
SIXTEEN_BIT_DEPTHS = (8, 10, 12, 14, 16)


@functools.cache
def _umask() -> int:
    """The process umask, read once (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(final: str | os.PathLike) -> Path:
    """A new empty folder beside ``final`` to build it in, then rename onto it: with the
    permissions ``mkdir`` gives. ``mkdtemp``'s are 0700, so a dataset built in one was closed
    to everyone but its maker, on a server the lab shares. The set-group-ID bit it took from
    a group-shared folder (``chmod g+s``) is kept, as ``mkdir`` keeps it: set to the umask's
    mode alone, it was cleared, and every file and folder made in it then had its maker's
    own group, not the lab's."""
    final = Path(final)
    # named as the folder asked for: the temporary's random name ('.ds.zfatxe87.tmp:
    # permission denied') was one the user never gave and never sees
    with writes_named(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, (0o777 & ~_umask()) | (tmp.stat().st_mode & stat.S_ISGID))
    return tmp


def link_followed(path: str | os.PathLike) -> Path:
    """The folder a new folder at ``path`` is renamed onto: ``path``, or the folder it links
    to (a dataset kept on a larger disk through a link). A folder cannot be renamed onto a
    link: ``mlseg synth``/``ingest`` to a link to an empty folder built the whole dataset,
    then failed with 'not a directory'. A link to nothing (a share not mounted) raises
    :class:`OutputError` naming it and its target, before any work."""
    path = Path(path)
    if not path.is_symlink():
        return path
    said = dangling_link(path)
    if said is not None:
        raise said
    return path.resolve()


#: What :func:`written_together` names its staging folder after: ``.outputs.<8>.tmp``.
WRITTEN_TOGETHER = "outputs"
#: Held in an output folder while a set of files is moved into it (:func:`written_together`;
#: released with its process, as :data:`mlseg.outputs.RUN_LOCK`): two writers' sets land in
#: turn, each whole.
WRITTEN_TOGETHER_LOCK = f".{WRITTEN_TOGETHER}.lock"


@contextlib.contextmanager
def written_together(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A new folder to write a set of outputs in (as ``out_dir`` would hold them), whose
    files are moved into ``out_dir`` when the block ends: all of them, or none where a write
    fails, the set written before left whole. A failure a person fixes (disk full) raises
    :class:`OutputError` naming ``out_dir``, not the hidden folder."""
    from filelock import FileLock

    out_dir = Path(out_dir)
    # a run killed here left its staging folder (copies of tables, images) in evaluate's,
    # tune's, validate's and monitor's folders for good: only segment's removed them
    remove_leftovers(out_dir)
    staging = staging_dir(out_dir / WRITTEN_TOGETHER)
    try:
        yield staging
        # one set moved at a time: two runs into one folder at once (two monitor runs'
        # drift.csv and drift.json, 3 in 200 rounds) left one's file beside the other's
        with FileLock(out_dir / WRITTEN_TOGETHER_LOCK):
            _move_together(sorted(staging.iterdir()), out_dir, staging / ".previous")
    except (OSError, OutputError) as err:
        said = staged_write_error(err, staging, out_dir)
        if said is None:
            raise
        raise said from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_together(paths: list[Path], out_dir: Path, previous: Path) -> None:
    """Move ``paths`` into ``out_dir``, each file they replace kept in ``previous`` (see
    :func:`_keep`) until all are in place; where one cannot be moved, those moved before it
    are put back, so a file held open on a share (EBUSY) leaves the previous set whole. A
    file that cannot be replaced (immutable, or another's in a sticky folder) is named: the
    error named ``out_dir``, a folder one may write to."""
    previous.mkdir()
    moved: list[tuple[Path, Path | None]] = []
    target = out_dir
    try:
        for path in paths:
            target = out_dir / path.name
            moved.append((target, _keep(target, previous / path.name)))
            path.replace(target)
    except BaseException as err:
        for done, kept in reversed(moved):
            with contextlib.suppress(OSError):
                if kept is None:
                    done.unlink()
                else:
                    kept.replace(done)
        said = cannot_write(target, err) if isinstance(err, OSError) else None
        if said is None:
            raise
        raise said from err


def _keep(target: Path, kept: Path) -> Path | None:
    """Keep the file at ``target`` as ``kept`` (``None`` where there is none): a hard link,
    else a copy, so that ``target`` is replaced in one step; where neither can be made (a
    file system without hard links that has no room for a copy), moved there."""
    if not os.path.lexists(target):
        return None
    try:
        os.link(target, kept, follow_symlinks=False)
    except OSError:  # a file system without hard links
        try:
            shutil.copy2(target, kept, follow_symlinks=False)
        except OSError:  # the disk had room for the new set, not for a copy of the old
            if target.is_dir() and not target.is_symlink():
                raise  # a folder of the name is no output: moved aside, it would be removed
            target.replace(kept)
    return kept


#: The name :func:`atomic_path` gives its temporary: ``.<stem>.<8 of mkstemp's>.tmp<suffix>``.
ATOMIC_TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?")
#: The name of :func:`written_together`'s staging folder (:func:`staging_dir`'s mkdtemp).
WRITTEN_TOGETHER_NAME = re.compile(rf"\.{WRITTEN_TOGETHER}\.[a-z0-9_]{{8}}\.tmp")


def atomic_leftovers(folder: str | os.PathLike) -> list[Path]:
    """The temporaries of :func:`atomic_path` in ``folder``, and the staging folders of
    :func:`written_together`: those a process killed while writing (SIGKILL, out of memory)
    left behind; removing them is for whoever holds the folder, as no other writer may be at
    work in it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [
        p
        for p in folder.glob(".*.tmp*")
        if (ATOMIC_TMP_NAME.fullmatch(p.name) and p.is_file())
        or (WRITTEN_TOGETHER_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    ]


#: Seconds after its last write that a temporary in an output folder counts as a killed run's.
LEFTOVER_AGE_S = 600


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Remove the :func:`atomic_leftovers` of ``folder`` untouched for :data:`LEFTOVER_AGE_S`:
    a killed run's, not those of a writer at work (even one outside the run's lock: a flow's
    history.csv given in the folder is written after the run lets it go)."""
    for leftover in atomic_leftovers(folder):
        with contextlib.suppress(OSError):  # gone, or another's to remove
            if time.time() - leftover.stat().st_mtime > LEFTOVER_AGE_S:
                if leftover.is_dir():  # a set of files written together
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix so format-sniffing writers (OpenCV, pandas) work.
    On any exception the temporary file is removed and ``path`` is left untouched; a write
    that fails for a reason a person fixes (disk full, file size limit, no permission, a
    folder in the way) raises :class:`OutputError` naming ``path`` and the cause.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the stem shortened: a name that fits the file system must not fail for its tmp's
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.stem[:TMP_STEM_CHARS]}.", suffix=f".tmp{path.suffix}", dir=path.parent
        )
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp creates 0600 files; give outputs the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as err:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        interrupt = _interrupt(err)
        if interrupt is not None and interrupt is not err:
            # torch.save's zip writer, interrupted, raises its own RuntimeError on the way out
            # ('unexpected pos'): Ctrl-C while a checkpoint was saved ended in its traceback
            raise interrupt from None
        cause = _os_error(err)
        said = cannot_write(path, cause) if cause is not None else None
        if said is None:
            raise
        raise said from err


def _interrupt(err: BaseException | None) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit behind ``err`` (itself or its context), if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or one that a writer turned into its own error
    (torch.save's RuntimeError about a zip position comes from a failed ``write``); never
    behind mlseg's own errors, which say what they mean."""
    if not isinstance(err, Exception) or isinstance(err, MlsegError):
        return None
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def file_digest(path: str | os.PathLike, chars: int | None = 16) -> str:
    """sha256 of a file's bytes: the first ``chars`` hex digits (``None``: all 64)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:chars]


#: :func:`input_digest` of an input file that may not be read: no output records it.
UNREADABLE = "unreadable"


def input_digest(path: str | os.PathLike) -> str:
    """:func:`file_digest` of an input image or label file, for the skip checks, or
    :data:`UNREADABLE` where its permissions forbid reading it: that image is then not done,
    and :func:`read_image` reports it by name while the others of its folder go on."""
    try:
        return file_digest(path)
    except PermissionError:
        return UNREADABLE


def _check_complete(path: Path) -> None:
    """Refuse files whose trailer is missing: OpenCV decodes truncated PNG/JPEG silently."""
    suffix = path.suffix.lower()
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        fh.seek(max(0, size - 16))
        tail = fh.read()
    if suffix == ".png":
        if head != b"\x89PNG\r\n\x1a\n":
            raise ImageReadError(f"{path}: not a PNG file (bad signature); re-export it as PNG")
        if b"IEND" not in tail:
            raise ImageReadError(f"{path}: truncated PNG (no IEND chunk); re-copy or re-export it")
    elif suffix in (".jpg", ".jpeg"):
        if head[:2] != b"\xff\xd8":
            raise ImageReadError(f"{path}: not a JPEG file (bad signature)")
        if b"\xff\xd9" not in tail:
            raise ImageReadError(f"{path}: truncated JPEG (no end marker); re-copy or re-export it")


def read_image(
    path: str | os.PathLike,
    *,
    alpha: Literal["white", "black", "drop"] = "white",
    labels: bool = False,
) -> np.ndarray:
    """Read an image as ``(H, W, C)`` ``uint8``/``uint16`` RGB (C=3) or grey (C=1).

    An RGBA image is laid over white (``alpha="white"``: its transparent parts are outside
    the scan, glass in bright field), over black (``"black"``: fluorescence, where no light
    is black) or loses its alpha (``"drop"``: a mask, whose fully transparent pixels become
    0, its background, whatever colour they hold); so is a grey PNG's alpha, and it stays
    grey (C=1); a grey TIFF's alpha is dropped. Integer values beyond 16 bits are refused,
    or with ``labels`` (a mask) kept as ``int32`` (a label image of over 65,535 nuclei, such
    as a tile cut from a whole slide's). Raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageReadError(
            f"{path}: unsupported extension {suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes); copy or export it again")
    try:
        _check_complete(path)  # the first read of the file
    except PermissionError:
        raise ImageReadError(
            f"{path}: cannot be read (permission denied); make it readable (chmod a+r) "
            "or move it out of the folder"
        ) from None
    if suffix in TIFF_EXTENSIONS:
        arr = _read_tiff(path, labels)
    else:
        if suffix == ".png":
            _check_png_fits(path)
        try:
            # decoded from bytes Python read: cv2.imread takes the name as UTF-8 and crashed
            # the process (segfault) on a name that is not (a Latin-1 name from an old zip)
            arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as err:  # OpenCV 5 raises where 4 returned None
            raise _opencv_error(path, err) from None
        if arr is None:
            raise ImageReadError(f"{path}: cannot be decoded; the file is corrupt or not an image")
        if arr.ndim == 3:  # OpenCV gives grey + alpha as BGRA too
            code = cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
            arr = cv2.cvtColor(arr, code)
    if arr.ndim == 3 and arr.shape[2] == 4:
        if alpha in ("white", "black") and not labels:
            arr = _laid_over(arr, white=alpha == "white")
        else:
            # a mask's transparent pixels are background whatever colour they hold: image
            # editors keep the white (or any) colour under a transparent background
            arr = np.where(arr[..., 3:] == 0, 0, arr[..., :3]).astype(arr.dtype)
        if suffix == ".png" and (_png_header(path) or (0, 0, 0, 0))[3] == PNG_GREY_ALPHA:
            arr = arr[..., :1]  # grey, as the same picture without alpha or as a TIFF
    return _as_hwc(arr, path, labels)


def read_image_for(path: str | os.PathLike, stain: str | None) -> np.ndarray:
    """:func:`read_image` of an image of ``stain`` (a profile's: ``he``, ``ihc``, ``none``,
    ``fluorescence``; ``None`` where none is known): an RGBA image's transparent outside is
    laid over white in bright field (glass) and over black in fluorescence (no light).

    Every reader that knows the profile reads with it (training, evaluate, segment,
    quantify, the stain reference), so one file gives the model the same pixels in all of
    them: read over white in training and over black in segment, a fluorescence model
    learnt a saturated outside it never saw again, and evaluate scored other pixels than
    segment measured."""
    return read_image(path, alpha="black" if stain == "fluorescence" else "white")


def _laid_over(rgba: np.ndarray, *, white: bool) -> np.ndarray:
    """RGB of an RGBA image laid over white (bright field), as slide viewers show it, or
    over black (fluorescence). OpenSlide and QuPath export the area outside a scan as
    transparent black, which read as black would be counted as densely stained tissue (and
    would skew stain normalisation); laid over white, a fluorescence image's outside read as
    saturated signal."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    opaque = np.iinfo(rgba.dtype).max
    if alpha.min(initial=opaque) == opaque:
        return np.ascontiguousarray(rgb)
    background = full_scale(rgb) if white else 0
    weight = alpha.astype(np.float32) / opaque
    out = rgb * weight + background * (1.0 - weight)
    return np.round(out).astype(rgba.dtype)


def _read_tiff(path: Path, labels: bool = False) -> np.ndarray:
    """The first image of a TIFF as stored; a palette image's colours (an ImageJ image's
    lookup table aside: :func:`_is_lookup_table`), or with ``labels`` (a mask) its indices,
    as an indexed PNG mask's."""
    import tifffile

    compression = None
    try:
        with tifffile.TiffFile(path) as tif:
            compression = tif.pages[0].compression
            if len(tif.pages) > MAX_TIFF_PAGES:
                raise ImageReadError(
                    f"{path}: holds {len(tif.pages):,} images (TIFF pages), more than the "
                    f"{MAX_TIFF_PAGES:,} mlseg looks through; mlseg segments one 2-D image per "
                    f"file: save the image to segment as a file of its own"
                )
            _check_fits(path, tif.series[0])
            _check_photometric(path, tif.series[0].keyframe)
            arr, series_axes = tif.series[0].asarray(), tif.series[0].axes
            photometric = tif.series[0].keyframe.photometric
            colormap = tif.series[0].keyframe.colormap
            extrasamples = tif.series[0].keyframe.extrasamples
            bilevel = tif.series[0].keyframe.bitspersample == 1
            imagej = tif.is_imagej
            more = [s for s in tif.series[1:] if not _AUXILIARY.search(s.name or "")]
    except ImageReadError:
        raise
    except Exception as err:  # tifffile raises many types for corrupt files
        # a codec missing from this install (ZSTD named Python's own 'compression' module)
        if isinstance(err, ImportError) or "imagecodecs" in str(err):
            name = getattr(compression, "name", compression)
            raise ImageReadError(
                f"{path}: its {name} compression needs the imagecodecs package, which this "
                f"Python cannot import ({err}); pip install imagecodecs"
            ) from err
        raise ImageReadError(f"{path}: cannot be decoded as TIFF ({err})") from err
    if more:  # e.g. the fields of a multi-position acquisition, saved as one OME-TIFF
        warnings.warn(
            f"{path}: holds {len(more) + 1} images; only the first is read: save each as a "
            f"file of its own to have them all segmented",
            stacklevel=3,
        )
    grey = photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
    if grey and len(extrasamples) > 1 and set(extrasamples) == {_UNSPECIFIED_SAMPLE}:
        # a grey image's samples, none of them alpha, are channels (tifffile writes a
        # 4-channel image so): read as RGB + padding, three were passed for a colour image
        series_axes = series_axes.replace("S", "C")
    arr = _tiff_as_hwc(np.asarray(arr), series_axes, path)
    if bilevel and photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        # a black-and-white picture, as ImageMagick's fax compressions (Group 4) write one:
        # its bits say black (1) or white (0), not values; read as stored, a mask's white
        # nuclei came back as 0 and its black background as the one object. Pillow,
        # OpenCV and viewers read it as shown. (An 8-bit one, as ImageJ saves an image with
        # an inverted LUT, keeps its values as stored, as Fiji reads them.)
        arr = np.logical_not(arr)
    if photometric == tifffile.PHOTOMETRIC.SEPARATED:
        arr = _cmyk_as_rgb(arr, path)
    elif photometric == tifffile.PHOTOMETRIC.PALETTE and colormap is not None and not labels:
        arr = arr if imagej and _is_lookup_table(colormap) else _palette_colours(arr, colormap)
    elif arr.ndim == 3 and arr.shape[2] == 4 and extrasamples[:1] == (_ASSOCIATED_ALPHA,):
        arr = _unpremultiplied(arr)
    elif arr.ndim == 3 and arr.shape[2] == 4 and extrasamples[:1] == (_UNSPECIFIED_SAMPLE,):
        arr = arr[..., :3]  # not alpha, by the TIFF spec: data of its own (padding, RGBX)
    return arr


#: TIFF ExtraSamples 1, associated alpha: the colours are premultiplied by it.
_ASSOCIATED_ALPHA = 1
#: TIFF ExtraSamples 0: a sample of unspecified meaning, not opacity.
_UNSPECIFIED_SAMPLE = 0


def _unpremultiplied(rgba: np.ndarray) -> np.ndarray:
    """Straight RGBA of an ``(H, W, 4)`` uint8/uint16 TIFF whose colours are premultiplied by
    alpha: taken as straight, its half-transparent edge was laid over white darkened by
    its alpha twice. A fully transparent pixel keeps colour 0."""
    if rgba.dtype not in (np.uint8, np.uint16):
        return rgba  # _as_hwc refuses it
    full = np.iinfo(rgba.dtype).max
    alpha = rgba[..., 3:].astype(np.float64)
    rgb = rgba[..., :3] * (full / np.maximum(alpha, 1)) * (alpha > 0)
    return np.concatenate([np.round(rgb).clip(0, full), alpha], axis=-1).astype(rgba.dtype)


#: The largest step (of 65535) between neighbouring entries of a TIFF colour map that is a
#: lookup table over intensities: ImageJ's Fire steps by 10 of 255, a palette by hundreds.
LOOKUP_TABLE_STEP = 32 * 257


def _is_lookup_table(colormap: np.ndarray) -> bool:
    """Whether an ImageJ TIFF's ``(3, N)`` colour map is a smooth ramp of colours (ImageJ's
    Fire, Green, an inverted grey): a lookup table that shows intensities, as ImageJ saves an
    8-bit image with a LUT. Its indices are the measured data, as Fiji reads them, and stay
    as stored; a palette of colours (ImageJ's 8-bit Color) jumps between them. Another
    program's palette may be as smooth: Pillow's of a grey fluorescence image, darkest last,
    whose indices read as the image inverted."""
    steps = np.abs(np.diff(colormap.astype(np.int64), axis=1))
    return colormap.shape[1] > 2 and int(steps.max(initial=0)) <= LOOKUP_TABLE_STEP


def _palette_colours(indices: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """The colours an indexed TIFF's ``(H, W)`` indices show through its ``(3, N)`` 16-bit
    colour map: 8-bit where the map holds 8-bit colours scaled up (by 256 or 257, as Pillow
    and ImageJ write them); grey (C=1) where the map is."""
    if (colormap % 256 == 0).all() or (colormap % 257 == 0).all():
        colormap = (colormap // 256).astype(np.uint8)
    if (colormap == colormap[:1]).all():
        colormap = colormap[:1]
    table = np.ascontiguousarray(colormap.T)
    return table[np.clip(indices.reshape(indices.shape[:2]), 0, len(table) - 1)]


#: TIFF colour spaces mlseg reads (CMYK and palette converted to RGB after reading). tifffile
#: gives CIELab, a raw Bayer mosaic (CFA) and the others as stored, which read as RGB or grey
#: show colours no viewer shows; YCbCr too, but where an image codec (JPEG, as slide
#: scanners write it) decodes it to RGB.
_TIFF_PHOTOMETRICS = ("MINISWHITE", "MINISBLACK", "RGB", "PALETTE", "SEPARATED")
#: Compressions of bytes, not of images: YCbCr under them reaches mlseg as stored.
_BYTE_CODECS = ("NONE", "LZW", "PACKBITS", "ADOBE_DEFLATE", "DEFLATE", "LZMA", "ZSTD")


def _check_photometric(path: Path, page) -> None:
    """Refuse a TIFF whose colour space tifffile returns undecoded, and a colour separation
    of other inks than CMYK (InkSet 2: spot colours), which no conversion of CMYK's fits."""
    photometric = getattr(page.photometric, "name", str(page.photometric))
    compression = getattr(page.compression, "name", str(page.compression))
    if photometric == "SEPARATED" and page.tags.valueof("InkSet", 1) != 1:
        raise ImageReadError(
            f"{path}: a colour separation of other inks than CMYK (TIFF InkSet "
            f"{page.tags.valueof('InkSet')}), which mlseg does not convert; save the image "
            f"as RGB (ImageMagick: `magick IN -colorspace sRGB OUT.tif`)"
        )
    if photometric in _TIFF_PHOTOMETRICS or (
        photometric == "YCBCR" and compression not in _BYTE_CODECS
    ):
        return
    raise ImageReadError(
        f"{path}: stored in the {photometric} colour space (TIFF photometric"
        f"{'' if compression == 'NONE' else ', ' + compression + ' compressed'}), which "
        f"mlseg does not convert; save the image as RGB (ImageMagick: `magick IN -colorspace "
        f"sRGB OUT.tif`)"
    )


def _cmyk_as_rgb(cmyk: np.ndarray, path: Path) -> np.ndarray:
    """RGB of a CMYK TIFF's ``(H, W, 4)`` inks, as Pillow and OpenCV (a CMYK JPEG's) convert
    them without a colour profile: each colour ``(1 - ink) * (1 - black)``. Its black read
    as alpha laid the image over white, the dark parts of a stain lightest."""
    if cmyk.ndim != 3 or cmyk.shape[2] != 4 or cmyk.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(
            f"{path}: a colour separation (TIFF photometric SEPARATED) other than 8- or 16-bit "
            f"CMYK ({cmyk.shape[2] if cmyk.ndim == 3 else 1} inks, {cmyk.dtype}); save the "
            f"image as RGB"
        )
    full = np.iinfo(cmyk.dtype).max
    clear = full - cmyk.astype(np.float64)  # how much of each colour the inks let through
    rgb = clear[..., :3] * clear[..., 3:] / full
    return np.round(rgb).astype(cmyk.dtype)


def _tiff_as_hwc(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """One 2-D image from a TIFF series with tifffile's axis letters (``YX``, ``YXS`` for
    RGB(A) samples, ``CYX`` for channels, ``ZYX`` for a z-stack, ``Q`` for unknown): RGBA
    stays RGBA, grey + alpha keeps the grey; a stack or a channel count other than 1 or
    3 is refused, as reading the first three planes of one would silently pass them off as
    RGB."""
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        return arr  # no usable axis letters: the shape check of _as_hwc decides
    other = [(axis, n) for axis, n in zip(axes, arr.shape, strict=True) if axis not in "YX"]
    if len(other) > 1 or (other and other[0][0] not in "SCQ"):
        planes = [(a, n) for a, n in other if a != "S"]  # S: the colour samples of a pixel
        raise ImageReadError(
            f"{path}: a stack of {np.prod([n for _, n in planes]):,} 2-D images (TIFF axes "
            f"{axes}, shape {arr.shape}: {', '.join(_AXIS_NAMES.get(a, a) for a, _ in planes)}); "
            f"mlseg segments one 2-D image per file: save the plane to segment, or a "
            f"projection (Fiji: Image > Stacks > Z Project), as a file of its own"
        )
    if not other:
        return arr
    axis, n = other[0]
    arr = np.moveaxis(arr, axes.index(axis), -1)
    if axis == "S" and n in (2, 4):
        return arr if n == 4 else arr[..., :1]  # RGBA (read_image applies it); grey + alpha
    if n not in (1, 3):
        what = "channels" if axis != "Q" else "planes (channels or a stack: the file does not say)"
        raise ImageReadError(
            f"{path}: {n} {what}, TIFF axes {axes}; mlseg reads one grey or RGB image per "
            f"file: save the nuclear channel (e.g. DAPI) alone for fluorescence (Fiji: Image > "
            f"Color > Split Channels), one plane or a projection of a stack, or the image as RGB"
        )
    return arr


#: Names of the extra images a slide scanner stores beside the slide (SVS, NDPI, Bio-Formats).
_AUXILIARY = re.compile(r"thumbnail|label|macro|overview|map", re.IGNORECASE)

#: tifffile's axis letters other than Y, X and S (samples), as words.
_AXIS_NAMES = {
    "C": "channels",
    "Z": "z planes",
    "T": "time points",
    "I": "images",
    "Q": "planes",
    "R": "tiles",
    "E": "wavelengths",
    "L": "lifetimes",
    "A": "angles",
    "P": "phases",
    "V": "views",
    "M": "mosaic tiles",
}


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """``(width, height, bit depth, colour type)`` from a PNG's IHDR chunk, or ``None``."""
    with path.open("rb") as fh:
        header = fh.read(26)
    if len(header) < 26 or header[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    return width, height, header[24], header[25]


def _check_png_fits(path: Path) -> None:
    """:func:`_check_fits` for a PNG, from its header (OpenCV would report a PNG over its own
    pixel limit as undecodable)."""
    header = _png_header(path)
    if header is None:
        return  # the decoder names what is wrong
    width, height, depth, colour = header
    channels = {0: 1, 2: 3, PNG_PALETTE: 3, 4: 2, 6: 4}.get(colour, 4)
    nbytes = width * height * channels * max(1, depth // 8)
    if nbytes > MAX_IMAGE_BYTES:
        raise _too_large(path, width, height, nbytes, "")
    if width * height > _opencv_max_pixels():
        raise _too_many_pixels(path, f"{width:,} x {height:,} px, ")


def _opencv_max_pixels() -> int:
    """The most pixels OpenCV decodes from one file: ``OPENCV_IO_MAX_IMAGE_PIXELS``, 2**30
    unless set."""
    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 2**30))
    except ValueError:
        return 2**30


def _opencv_error(path: Path, err: Exception) -> ImageReadError:
    """The error for an image OpenCV refused: over its pixel limit (a grey PNG or a JPEG of
    a whole slide, under :data:`MAX_IMAGE_BYTES`), out of memory, or a decoder failure."""
    text = str(err)
    if "CV_IO_MAX_IMAGE_PIXELS" in text:
        return _too_many_pixels(path, "")
    if "Insufficient memory" in text:
        return ImageReadError(
            f"{path}: not enough memory to decode it; close other programs, or export the "
            f"image as smaller tiles and segment those"
        )
    reason = text.strip().splitlines()[-1] if text.strip() else type(err).__name__
    return ImageReadError(f"{path}: cannot be decoded ({reason}); re-copy or re-export it")


def _too_many_pixels(path: Path, size: str) -> ImageReadError:
    return ImageReadError(
        f"{path}: {size}more than the {_opencv_max_pixels():,} pixels OpenCV decodes "
        f"from one file (OPENCV_IO_MAX_IMAGE_PIXELS), as a whole-slide image would be: export "
        f"the regions to segment as tiles with their pixel size (QuPath: File > Export images) "
        f"and segment those"
    )


def _check_fits(path: Path, series) -> None:
    """Refuse, before decoding, an image larger than :data:`MAX_IMAGE_BYTES` (a whole slide's
    full-resolution level), which would otherwise get the process killed mid-run."""
    if series.nbytes <= MAX_IMAGE_BYTES:
        return
    axes, shape = series.axes, series.shape
    height = shape[axes.index("Y")] if "Y" in axes else shape[0]
    width = shape[axes.index("X")] if "X" in axes else shape[1]
    levels = len(getattr(series, "levels", ()) or ())
    pyramid = f", level 0 of a {levels}-level pyramid" if levels > 1 else ""
    raise _too_large(path, width, height, series.nbytes, pyramid)


def _too_large(path: Path, width: int, height: int, nbytes: int, what: str) -> ImageReadError:
    return ImageReadError(
        f"{path}: {width:,} x {height:,} px{what} would take {nbytes / 2**30:.1f} GiB decoded, "
        f"more than the {MAX_IMAGE_BYTES / 2**30:g} GiB mlseg reads at once, as a whole-slide "
        f"image would: export the regions to segment as tiles with their pixel size (QuPath: "
        f"File > Export images, or a tile exporter script) and segment those"
    )


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(height, width)`` of the image at ``path`` from its header, without decoding its
    pixels (a PNG's IHDR, a TIFF's first series as :func:`read_image` reads it, PIL for a
    JPEG); ``None`` where the header cannot be read (reading the image names the problem)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            header = _png_header(path)
            return None if header is None else (header[1], header[0])
        if suffix in TIFF_EXTENSIONS:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes, series.shape
            return (
                shape[axes.index("Y")] if "Y" in axes else shape[0],
                shape[axes.index("X")] if "X" in axes else shape[1],
            )
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the decompression-bomb warning: nothing is decoded
            with Image.open(path) as image:
                width, height = image.size
        return height, width
    except Exception:  # a corrupt or truncated file, any library's error: read_image names it
        return None


@dataclass(frozen=True)
class MemoryUse:
    """Peak memory of one image in an mlseg command, beyond its imports and model, in bytes:
    ``fixed`` (mostly a batch of tiles through the network, in float32 on a CPU without
    bf16) plus
    ``per_pixel`` bytes a pixel, or ``banded`` a pixel of an image of more than
    ``stream_min_pixels`` (:class:`mlseg.config.InferenceConfig`: labelled in row bands, the
    whole-image temporaries bounded). A bound on the peaks ``bench/warning_memory.py``
    measured at every size (table in bench/README.md), not a fit: one constant a pixel,
    sized at 8192 x 8192 px where the bands bound it, had let fields of 512-4096 px through
    at 1.5-32 times less than they took, and the system stopped the process naming no file."""

    fixed: int
    per_pixel: float
    banded: float | None = None

    def need(self, pixels: int, stream_min_pixels: int | None = None) -> int:
        """Bytes for an image of ``pixels`` pixels (as segmented: resampled ones)."""
        banded = self.banded is not None and stream_min_pixels is not None
        rate = self.banded if banded and pixels > stream_min_pixels else self.per_pixel
        return int(self.fixed + pixels * rate)


def warn_if_short_of_memory(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    use: MemoryUse,
    command: str,
    *,
    factor: float = 1.0,
    why: str = "",
    stream_min_pixels: int | None = None,
) -> bool:
    """Warn where ``mlseg <command>`` on an image of ``shape`` (``(H, W, ...)``) would need
    more memory than this process has left (:func:`available_memory`); nothing where that
    cannot be read. A warning, not a refusal: ``use`` is an estimate and swap may cover the
    rest. A field far under :data:`MAX_IMAGE_BYTES` (20,000 x 20,000 px, about 17 GB in
    segment) on a 4-8 GB worker was killed by the system after minutes of work, its log
    naming neither the file nor the fix. ``factor``: the image is resampled by it before it
    is segmented (``why`` says what asked for it: the pixel size, the scale estimate), so
    the pixels counted are the resampled ones, ``factor**2`` as many: a 20x field for a 40x
    model takes 4x the memory of the field as read. ``stream_min_pixels``: the inference
    setting above which those pixels are labelled in row bands (``use.banded``); ``None``
    counts every image at ``use.per_pixel``. True where it warned."""
    height, width = shape[:2]
    size = f"{width:,} x {height:,} px"
    if factor != 1.0:  # the size mlseg.preprocess.rescale gives
        height, width = (max(1, int(round(n * factor))) for n in (height, width))
        size += f", resampled {factor:.3g}x to {width:,} x {height:,} px ({why}),"
    need = use.need(height * width, stream_min_pixels)
    left = available_memory()
    if left is None or need <= left:
        return False
    warnings.warn(
        f"{path}: {size} needs about {need / 2**30:.1f} GiB of memory in "
        f"mlseg {command}, more than the {left / 2**30:.1f} GiB this process has left, so "
        f"the system may stop it part-way: crop the field or export it as tiles (QuPath: "
        f"File > Export images) and {command} those, or run on a machine with more memory",
        stacklevel=2,
    )
    return True


def available_memory(
    meminfo: str | os.PathLike = "/proc/meminfo",
    own_cgroups: str | os.PathLike = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> int | None:
    """Bytes this process can still take before the system stops it (Linux): the least of
    ``MemAvailable`` and, for its memory cgroup and each above it (a container's, a batch
    job's, a systemd slice's), the limit less the memory in use there, reclaimable file cache
    not counted (as the kubelet counts it). ``None`` where none of them can be read (not Linux).
    """
    found = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    lines = []
    with contextlib.suppress(OSError):
        lines = Path(own_cgroups).read_text().splitlines()
    for line in lines:
        hierarchy, controllers, own = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base, files = Path(cgroup_root), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            base = Path(cgroup_root) / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        # a container may see its own cgroup at the root, under the host's name for it
        folder = base / own.strip().lstrip("/")
        for level in [folder, *folder.parents]:
            if level.is_relative_to(base):
                found.extend(_cgroup_left(level, *files))
    return min(found, default=None)


def _cgroup_left(folder: Path, limit_file: str, usage_file: str, cache_key: str) -> list[int]:
    """``[limit - usage]`` of one memory cgroup's folder, the usage less its inactive file
    cache; ``[]`` where it has no limit ("max") or none can be read."""
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max":
            return []
        usage = int((folder / usage_file).read_text())
        limit_bytes = int(limit)
    except (OSError, ValueError):
        return []
    with contextlib.suppress(OSError, ValueError):
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                usage -= min(int(value), usage)
    return [max(0, limit_bytes - usage)]


def _as_hwc(arr: np.ndarray, path: Path, labels: bool = False) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ImageReadError(
            f"{path}: expected a 2-D grey or RGB image, got an array of shape {arr.shape}; "
            f"save it as one grey or RGB image"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(arr.dtype, np.floating):
            raise ImageReadError(
                f"{path}: floating-point images are not supported; save as 8/16-bit"
            )
        low, high = int(arr.min(initial=0)), int(arr.max(initial=0))
        top = np.iinfo(np.int32).max if labels else np.iinfo(np.uint16).max
        if low < 0 or high > top:
            what = "labels" if labels else "values"
            raise ImageReadError(
                f"{path}: {arr.dtype} {what} {low}..{high} do not fit 0..{top}; save "
                + ("labels 0..N (0 = background)" if labels else "the image as 8/16-bit")
            )
        if labels and high > np.iinfo(np.uint16).max:
            arr = arr.astype(np.int32)  # kept: a cast to 16 bits would wrap labels around
        else:
            arr = arr.astype(np.uint16) if high > 255 else arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


#: EXIF orientations, as words: 1 is "as stored"; 5-8 turn the image by 90 degrees.
EXIF_ORIENTATIONS = {
    2: "mirrored",
    3: "turned 180 degrees",
    4: "flipped upside down",
    5: "mirrored and turned 90 degrees",
    6: "turned 90 degrees clockwise",
    7: "mirrored and turned 90 degrees",
    8: "turned 90 degrees counter-clockwise",
}


def exif_orientation(path: str | os.PathLike) -> int | None:
    """The EXIF orientation (2-8) a JPEG file declares, else ``None`` (none, 1 = as stored,
    unreadable metadata, or not a JPEG).

    mlseg reads pixels as stored, as Fiji and QuPath do; photo viewers, browsers and some
    annotation tools show the image turned or mirrored by this tag, so a mask drawn there
    does not line up with the stored pixels.
    """
    from PIL import Image

    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return None  # cameras write it in JPEGs; a PNG's eXIf may follow (and cost) the pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Corrupt EXIF data": reading the pixels says more
        try:
            with Image.open(path) as image:
                value = image.getexif().get(0x0112)
        except Exception:  # a corrupt file: reading its pixels names the problem
            return None
    return int(value) if value in EXIF_ORIENTATIONS else None


def full_scale(image: np.ndarray) -> int:
    """The stored value that stands for full intensity (white in bright field): 255 for
    ``uint8``; for ``uint16`` the full scale ``2**bits - 1`` of the smallest bit depth in
    :data:`SIXTEEN_BIT_DEPTHS` that holds the image's largest value.

    A 12-bit camera's image saved as a 16-bit file is 0-4095: taken against 65535 its glass
    would read as optical density 1.2 and every image as nearly black. The depth comes from
    the values because files rarely say it. Bright field has glass at nearly full scale in
    almost every field, so its depth is found reliably; a true 16-bit image with nothing above
    a quarter of full scale (optical density above 0.6 everywhere) would be taken for 14-bit.
    Ask it of the image as stored: resampling averages the brightest pixels down and can
    drop the image a bit depth (training and segmentation scale a 16-bit image to [0, 1]
    before resampling it).
    """
    kind = image.dtype.type  # of either byte order: a raw camera file read as ">u2" too
    if kind is np.uint8:
        return 255
    if kind is not np.uint16:
        raise ValueError(f"image must be uint8 or uint16, got {image.dtype}")
    top = int(image.max(initial=0))
    bits = next(b for b in SIXTEEN_BIT_DEPTHS if top < 2**b)
    return 2**bits - 1


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask as an ``(H, W) int32`` label image (0 = background).

    Binary masks stay 0/1/255-valued here; see :func:`mlseg.dataset.mask_to_labels`.
    An indexed (palette) PNG, as CVAT, LabelMe and other VOC-style tools save instance masks,
    gives its indices, whatever colours its palette shows them in. Another colour mask is
    accepted only if its three channels are equal. A JPEG mask is refused: its compression
    turns each edge into a ring of new values, read as extra nuclei.
    """
    path = Path(path)
    if path.suffix.lower() not in MASK_EXTENSIONS:
        raise ImageReadError(not_lossless(path))
    decoded = read_image(path, alpha="drop", labels=True)
    return mask_labels(path, decoded).astype(np.int32, copy=False)


def not_lossless(path: str | os.PathLike) -> str:
    """What :func:`read_mask` says of a mask file not in :data:`MASK_EXTENSIONS` (a JPEG)."""
    return (
        f"{path}: a mask must be lossless ({', '.join(MASK_EXTENSIONS)}); JPEG "
        f"compression changes label values along every edge. Export the mask again as PNG"
    )


def mask_labels(path: str | os.PathLike, decoded: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` integer labels of the mask file ``path`` from its pixels as
    :func:`read_image` decoded them: an indexed PNG's indices (read again, as OpenCV decodes
    only its colours), else the grey value as stored (no copy). A colour mask raises
    :class:`ImageReadError`."""
    path = Path(path)
    header = _png_header(path) if path.suffix.lower() == ".png" else None
    if header is not None and header[3] == PNG_PALETTE:
        from PIL import PngImagePlugin

        # Not Image.open: its decompression-bomb limit (179 million pixels, a warning from 89)
        # refused a 20,000 x 20,000 px mask that OpenCV had just decoded within MAX_IMAGE_BYTES.
        with PngImagePlugin.PngImageFile(path) as indexed:
            return np.asarray(indexed)
    grey = decoded.shape[2] == 1 or (
        np.array_equal(decoded[..., 0], decoded[..., 1])
        and np.array_equal(decoded[..., 0], decoded[..., 2])
    )
    if not grey:
        raise ImageReadError(
            f"{path}: colour mask; save masks as single-channel label or binary images"
        )
    return decoded[..., 0]


def write_image(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` RGB uint8/uint16 atomically (PNG/TIFF/JPEG).
    An array a PNG or JPEG would not hold as given (float, or integers outside 0-255 of
    another dtype; uint16 above 255 in a JPEG, which holds 8 bits) raises ``ValueError``,
    and so does an empty one (0 rows or columns)."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim >= 2 and 0 in arr.shape[:2]:
        # OpenCV's imencode raised a bare cv2.error (!_img.empty()), tifffile wrote a
        # nonconformant TIFF
        raise ValueError(
            f"{path}: the image is empty (shape {arr.shape}), nothing to write; check the "
            "crop or slice that made it"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    tiff = path.suffix.lower() in TIFF_EXTENSIONS
    if not tiff and arr.dtype.type not in (np.uint8, np.uint16, np.bool_):
        # OpenCV writes any other dtype as 8-bit, clipping without an error: 300 as 255
        low, high = (arr.min(), arr.max()) if arr.size else (0, 0)
        if not np.issubdtype(arr.dtype, np.integer) or low < 0 or high > 255:
            raise ValueError(
                f"{path}: {arr.dtype} values {low}..{high} do not fit the 8-bit file OpenCV "
                "writes of them; convert the array to uint8 (0-255) or uint16 (0-65535), or "
                "write labels with write_labels"
            )
    if path.suffix.lower() in (".jpg", ".jpeg") and arr.dtype.type is np.uint16:
        # OpenCV's JPEG holds 8 bits: it wrote a 12-bit camera's 4095 as 255, with no error
        high = int(arr.max(initial=0))
        if high > 255:
            raise ValueError(
                f"{path}: uint16 values up to {high} do not fit the 8-bit JPEG OpenCV writes "
                "(written as 255); write a PNG or TIFF, which hold 16 bits, or convert the "
                "array to uint8 (0-255)"
            )
    with atomic_path(path) as tmp:
        if tiff:
            import tifffile

            tifffile.imwrite(tmp, arr, compression="zlib")
        else:
            out = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
            # encoded in memory, written by Python: cv2.imwrite reports success for a file
            # cut short by a full disk (its last buffer fails on close, unchecked)
            ok, encoded = cv2.imencode(path.suffix.lower(), out)
            if not ok:
                raise ImageReadError(f"{path}: OpenCV could not write this format/dtype")
            tmp.write_bytes(encoded.tobytes())
    return path


def image_stem(path: str | os.PathLike) -> str:
    """The file name of ``path`` less its extension, :data:`OME_TIFF_EXTENSIONS` counting as
    one, as OME and BIDS name them and Bio-Formats, OMERO, QuPath and Fiji write them
    (``slide1.ome.tif`` -> ``slide1``, ``a.tif`` -> ``a``, ``a.ome.png`` -> ``a.ome``): the
    name an image's mask, outputs and pixel-size table row go by. Its accents are composed
    (Unicode NFC): macOS may write ``é`` as ``e`` and an accent, Windows and Linux as one
    letter, and the names are one on a Mac's disk; composed, they are one here too.
    A path that is not UTF-8 is refused (:func:`check_utf8_path`)."""
    check_utf8_path(path)
    return unicodedata.normalize("NFC", _stem_as_written(Path(path).name))


def check_utf8_path(path: str | os.PathLike) -> None:
    """Refuse a path whose bytes are not UTF-8 (a Latin-1 name from an old zip or a
    Windows share; any accent under a C locale with ``PYTHONUTF8=0``): Python holds its
    bytes as lone surrogates, which no table, JSON or GeoJSON can store, and OpenCV crashed
    the process (segfault) on such a name."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ImageReadError(
            f"{shown}: the name is not UTF-8; rename it (e.g. `convmv -f latin1 -t utf8 "
            f"--notest -r FOLDER`), or, if it shows accents in `ls`, run mlseg under a UTF-8 "
            f"locale (LANG=C.UTF-8)"
        ) from None


def _stem_as_written(name: str) -> str:
    for ext in OME_TIFF_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return Path(name).stem


def image_extension(path: str | os.PathLike) -> str:
    """What :func:`image_stem` leaves out of the file name, lower case (``.ome.tif``, ``.png``)."""
    name = Path(path).name
    return name[len(_stem_as_written(name)) :].lower()


def match_stem(stem: str, image_stems: Container[str] = ()) -> str:
    """The image stem that ``stem`` (of a mask less its suffix, or a table row) names: itself,
    but ``x.ome`` names the OME-TIFF ``x.ome.tif``'s stem ``x`` unless ``x.ome`` is one of
    ``image_stems`` (``x.ome.png``). Masks of ``x.ome.tif`` named ``x.ome_mask.tif``, and
    tables listing ``x.ome``, were matched this way before ``.ome.tif`` was one extension, and
    still are. Accents are composed, as :func:`image_stem` composes them."""
    stem = unicodedata.normalize("NFC", stem)
    if stem[-4:].lower() == ".ome" and len(stem) > 4 and stem not in image_stems:
        return stem[:-4]
    return stem


def without_image_extension(name: str) -> str:
    """``name`` less a trailing image extension (``a.tif`` -> ``a``, ``a.ome.tif`` -> ``a``),
    else as it is (``TCGA.01`` keeps its dot); of a path, POSIX or Windows
    (``C:\\scans\\a.tif``, as a table typed on Windows holds it), the file's."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    has_extension = Path(name).suffix.lower() in IMAGE_EXTENSIONS
    return image_stem(name) if has_extension else unicodedata.normalize("NFC", name)


def labels_suffix(n_labels: int) -> str:
    """``.png`` for a label image 16-bit PNG holds, ``.tif`` above 65535 labels."""
    return ".png" if n_labels <= np.iinfo(np.uint16).max else ".tif"


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an instance label image losslessly: 16-bit PNG, or 32-bit TIFF if labels > 65535.
    Labels outside 0..2**31 - 1, which :func:`read_mask` reads, raise ``ValueError``: cast to
    the file's dtype, -1 was written as 65535 and 2**32 + 5 as 5. So do labels that are not
    integers (1.7 was written as 1, NaN as 0) and a file :func:`read_mask` refuses (a JPEG
    turned 300 into 255 and every edge into new labels)."""
    labels = np.asarray(labels)
    path = Path(path)
    if path.suffix.lower() not in MASK_EXTENSIONS:
        raise ValueError(
            f"{path}: labels are written as {', '.join(MASK_EXTENSIONS)} only (lossless, read "
            f"back by read_mask); name the file {path.stem}.png"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(
            f"{path}: labels must be integers (0 = background), not {labels.dtype}; label a "
            "mask's objects first (e.g. scipy.ndimage.label)"
        )
    low, high = labels.min(initial=0), labels.max(initial=0)
    if low < 0 or high > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: labels {low}..{high} do not fit 0..{np.iinfo(np.int32).max}")
    if high > np.iinfo(np.uint16).max:
        if path.suffix.lower() not in TIFF_EXTENSIONS:
            raise ValueError(f"{path}: more than 65535 labels need a .tif output")
        return write_image(path, labels.astype(np.uint32))
    return write_image(path, labels.astype(np.uint16))


def read_written_csv(path: str | os.PathLike, column: str):
    """A CSV :func:`write_table` wrote, its ``column`` (of names) as text: an image named
    ``01``, ``NA`` or ``None`` keeps its name, which pandas reads as 1 or as a missing value.
    An empty cell, as a missing value is written, is one in every column."""
    import pandas as pd

    return pd.read_csv(path, dtype={column: str}, keep_default_na=False, na_values=[""])


def write_table(df, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a DataFrame atomically as CSV or Parquet, chosen by the suffix.

    ``metadata``: key-value pairs added to a Parquet file's footer (read back with
    ``pyarrow.parquet.read_schema(path).metadata``), so a table copied out of its folder
    still says what made it; a CSV has no place for them."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".parquet" and metadata:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            footer = {
                **(table.schema.metadata or {}),
                **{k.encode(): v.encode() for k, v in metadata.items()},
            }
            pq.write_table(table.replace_schema_metadata(footer), tmp)
        elif path.suffix.lower() == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path
