"""Image, mask and table I/O. The only module that touches image files.

Images come back as ``(H, W, C)`` arrays in their stored dtype (``uint8`` or ``uint16``),
RGB channel order, ``C`` in {1, 3}. Masks come back as ``(H, W) int32`` label images.
Every writer is atomic: it writes a temporary file in the target folder and renames it,
so a crash never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from mlseg.errors import ImageReadError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff")
#: An image's JSON sidecar: same folder, same stem (``slide1.png`` -> ``slide1.json``), as BIDS
#: microscopy keeps one per image.
SIDECAR_SUFFIX = ".json"
#: The most a decoded image may take in memory. Images are read whole; a whole-slide image's
#: full-resolution level (tens of GiB) is refused with an error naming it, not read until the
#: system kills the process.
MAX_IMAGE_BYTES = 4 * 2**30


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix so format-sniffing writers (OpenCV, pandas) work.
    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give outputs the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def file_digest(path: str | os.PathLike, chars: int | None = 16) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: the first ``chars`` hex digits
    (``None``: all 64)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as ``(H, W, C)`` ``uint8``/``uint16`` RGB (C=3) or grey (C=1).

    Alpha channels are dropped. Raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageReadError(
            f"{path}: unsupported extension {suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    _check_complete(path)
    if suffix in TIFF_EXTENSIONS:
        arr = _read_tiff(path)
    else:
        if suffix == ".png":
            _check_png_fits(path)
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageReadError(f"{path}: cannot be decoded; the file is corrupt or not an image")
        if arr.ndim == 3:
            code = cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
            arr = cv2.cvtColor(arr, code)
    return _as_hwc(arr, path)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            _check_fits(path, tif.series[0])
            arr = tif.series[0].asarray()
    except ImageReadError:
        raise
    except Exception as err:  # tifffile raises many types for corrupt files
        raise ImageReadError(f"{path}: cannot be decoded as TIFF ({err})") from err
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return arr


def _check_png_fits(path: Path) -> None:
    """:func:`_check_fits` for a PNG, from its header (OpenCV would report a PNG over its own
    pixel limit as undecodable)."""
    with path.open("rb") as fh:
        header = fh.read(26)
    if len(header) < 26 or header[12:16] != b"IHDR":
        return  # the decoder names what is wrong
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(header[25], 4)
    nbytes = width * height * channels * max(1, header[24] // 8)
    if nbytes > MAX_IMAGE_BYTES:
        raise _too_large(path, width, height, nbytes, "")


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


def _as_hwc(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ImageReadError(f"{path}: expected a grey or RGB image, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(arr.dtype, np.floating):
            raise ImageReadError(
                f"{path}: floating-point images are not supported; save as 8/16-bit"
            )
        arr = arr.astype(np.uint16) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask as an ``(H, W) int32`` label image (0 = background).

    Binary masks stay 0/1/255-valued here; see :func:`mlseg.dataset.mask_to_labels`.
    A colour mask is accepted only if its three channels are equal.
    """
    arr = read_image(path)
    grey = arr.shape[2] == 1 or (
        np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    )
    if not grey:
        raise ImageReadError(
            f"{Path(path)}: colour mask; save masks as single-channel label or binary images"
        )
    return arr[..., 0].astype(np.int32)


def write_image(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` RGB uint8/uint16 atomically (PNG/TIFF/JPEG)."""
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    with atomic_path(path) as tmp:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile

            tifffile.imwrite(tmp, arr, compression="zlib")
        else:
            out = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
            if not cv2.imwrite(str(tmp), out):
                raise ImageReadError(f"{path}: OpenCV could not write this format/dtype")
    return path


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an instance label image losslessly: 16-bit PNG, or 32-bit TIFF if labels > 65535."""
    labels = np.asarray(labels)
    path = Path(path)
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        if path.suffix.lower() not in TIFF_EXTENSIONS:
            raise ValueError(f"{path}: more than 65535 labels need a .tif output")
        return write_image(path, labels.astype(np.uint32))
    return write_image(path, labels.astype(np.uint16))


def write_table(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame atomically as CSV or Parquet, chosen by the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


#: Microns per pixel that light microscopy can produce, from super-resolution renders (10 nm)
#: to a 1x objective (10 um; nuclei span one or two pixels there). A size outside this range
#: is a unit error or an image program's print default (72 dpi = 353 um per pixel), never a
#: microscope's: metadata giving one is ignored, and a table giving one is refused.
PLAUSIBLE_PIXEL_SIZE_UM = (0.01, 10.0)

#: Length units of OME-XML and ImageJ metadata, in microns (ImageJ escapes the micro sign).
_UNIT_UM = {
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "\\u00b5m": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "å": 1e-4,
    "angstrom": 1e-4,
}
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


def plausible_pixel_size(um: float | None) -> bool:
    """Whether ``um`` microns per pixel lies in :data:`PLAUSIBLE_PIXEL_SIZE_UM`."""
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    return um is not None and math.isfinite(um) and low <= um <= high


def implausible_message(found: list[tuple[Path, float]], fix: str = "") -> str:
    """One warning for the images whose metadata or sidecar declares an implausible size."""
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    listed = ", ".join(f"{path} ({um:.4g} um)" for path, um in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return (
        f"{len(found)} image(s) declare a pixel size outside {low:g}-{high:g} um per pixel "
        f"in their metadata or JSON sidecar: {listed}{more}. That is a unit error or an image "
        f"program's print resolution (72 dpi reads as 353 um), so it is ignored"
        f"{fix or '; give the pixel size yourself (--pixel-size, a manifest or the profile)'}."
    )


def declared_pixel_size_um(path: str | os.PathLike, *, plausible_only: bool = True) -> float | None:
    """Microns per pixel that an image file declares, else ``None``: its JSON sidecar
    (:func:`sidecar_pixel_size_um`) where it gives one, else its TIFF metadata
    (:func:`tiff_pixel_size_um`). The first declaration found decides; with ``plausible_only``
    a size outside :data:`PLAUSIBLE_PIXEL_SIZE_UM` reads as ``None``.
    """
    um = sidecar_pixel_size_um(path)
    if um is None:
        um = tiff_pixel_size_um(path, plausible_only=False)
    if um is None or (plausible_only and not plausible_pixel_size(um)):
        return None
    return um


def usable_pixel_size_um(
    path: str | os.PathLike, implausible: list[tuple[Path, float]]
) -> float | None:
    """The plausible size ``path`` declares (:func:`declared_pixel_size_um`), else ``None``;
    an implausible one is appended to ``implausible`` as ``(path, um)``, so that a caller
    warns once for all its images (:func:`implausible_message`)."""
    um = declared_pixel_size_um(path, plausible_only=False)
    if plausible_pixel_size(um):
        return um
    if um is not None:
        implausible.append((Path(path), um))
    return None


def sidecar_path(image: str | os.PathLike) -> Path:
    """The JSON sidecar of ``image``: beside it, same stem, :data:`SIDECAR_SUFFIX`
    (``slide1.png`` -> ``slide1.json``). BIDS names an OME-TIFF's without ``.ome``
    (``slide1.ome.tif`` -> ``slide1.json``), which is taken where ``slide1.ome.json`` is absent.
    """
    image = Path(image)
    own = image.with_suffix(SIDECAR_SUFFIX)
    if not own.is_file() and image.stem.lower().endswith(".ome"):
        bids = image.with_name(image.stem[:-4] + SIDECAR_SUFFIX)
        if bids.is_file():
            return bids
    return own


def sidecar_pixel_size_um(path: str | os.PathLike) -> float | None:
    """Microns per pixel that the JSON sidecar of image ``path`` declares, as declared (the
    plausibility check is :func:`declared_pixel_size_um`'s), else ``None``.

    Read, as BIDS microscopy writes it, ``PixelSize`` (a number or ``[x, y]``/``[x, y, z]``;
    x is used) in ``PixelSizeUnits`` (``um``, ``nm``, ``mm``; microns where absent), or
    mlseg's own ``pixel_size_um``. A sidecar without either key means "unknown" (LabelMe
    saves its annotations under the same name). One that is not JSON, or whose size is not a
    number or whose unit is unknown, is ignored with a warning naming the file.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError included
        return _ignored_sidecar(sidecar, f"it is not readable as JSON ({err})")
    if not isinstance(meta, dict):
        return None
    if "pixel_size_um" in meta:
        value, unit = meta["pixel_size_um"], "um"
    elif "PixelSize" in meta:
        value, unit = meta["PixelSize"], meta.get("PixelSizeUnits", "um")
    else:
        return None
    if isinstance(value, list) and value:
        value = value[0]
    if value is None:  # declared unknown
        return None
    factor = _UNIT_UM.get(str(unit).strip().lower())
    if factor is None:
        return _ignored_sidecar(sidecar, f"its unit {unit!r} is not one of um, nm, mm")
    try:
        if isinstance(value, bool):
            raise TypeError
        um = float(value) * factor
    except (TypeError, ValueError):
        return _ignored_sidecar(sidecar, f"its pixel size {value!r} is not a number")
    return um


def _ignored_sidecar(sidecar: Path, why: str) -> None:
    warnings.warn(
        f"{sidecar}: pixel size ignored because {why}; write e.g. "
        f'{{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}}',
        stacklevel=3,
    )
    return None


def tiff_pixel_size_um(path: str | os.PathLike, *, plausible_only: bool = True) -> float | None:
    """Microns per pixel that a TIFF's metadata declares, else ``None``.

    Read in order: OME-XML (``PhysicalSizeX`` in its ``PhysicalSizeXUnit``, microns by
    default), ImageJ (``unit=`` of the description, including Fiji's escaped ``\\u00B5m``,
    with the resolution tags as pixels per unit), an Aperio description (``MPP = 0.499``),
    and last the TIFF resolution tags in centimetres or inches. With ``plausible_only`` a size
    outside :data:`PLAUSIBLE_PIXEL_SIZE_UM` (a 72-dpi default, a unit error) reads as
    ``None``; pass ``False`` to see it. Unreadable metadata means "unknown", never an error.
    """
    path = Path(path)
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            um = _declared_um(tif)
    except Exception:  # metadata is optional: unreadable tags mean "unknown"
        return None
    if um is None or (plausible_only and not plausible_pixel_size(um)):
        return None
    return um


def _declared_um(tif) -> float | None:
    page = tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        um = _ome_um(tif.ome_metadata)
        if um is not None:
            return um
    if tif.imagej_metadata:
        factor = _UNIT_UM.get(str(tif.imagej_metadata.get("unit", "")).strip().lower())
        per_unit = _units_per_pixel(page)
        if factor is not None and per_unit is not None:
            return per_unit * factor
    match = _APERIO_MPP.search(page.description or "")
    if match:
        with contextlib.suppress(ValueError):
            return float(match.group(1))
    per_unit, unit = _units_per_pixel(page), page.tags.get("ResolutionUnit")
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value)) if unit is not None else None
    if per_unit is None or um_per_unit is None:  # unit 1 (none): pixels per what is unknown
        return None
    return per_unit * um_per_unit


def _units_per_pixel(page) -> float | None:
    res = page.tags.get("XResolution")
    if res is None:
        return None
    num, den = res.value
    return float(den) / float(num) if num else None


def _ome_um(xml: str) -> float | None:
    from defusedxml.ElementTree import fromstring  # the XML comes from the user's files

    for element in fromstring(xml).iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels" or "PhysicalSizeX" not in element.attrib:
            continue
        unit = element.attrib.get("PhysicalSizeXUnit", "µm").strip().lower()
        factor = _UNIT_UM.get(unit)
        return float(element.attrib["PhysicalSizeX"]) * factor if factor else None
    return None
