"""Microns per pixel: what an image file declares, and which source wins.

Sources, first found wins: a size given for every image (``--pixel-size``), a per-image
table (``--pixel-sizes``, a dataset's ``manifest.csv``), the image's JSON sidecar
(``<stem>.json``, BIDS microscopy's ``PixelSize`` + ``PixelSizeUnits``, or
``pixel_size_um``), its TIFF metadata (OME-XML, ImageJ, Aperio, resolution tags), for
label images measured again the size their folder records (:func:`labels_pixel_size_um`:
``<stem>.json`` beside ``<stem>_labels.png``, as ``mlseg segment`` writes it) or, else, a
label TIFF's own metadata (a mask saved calibrated in Fiji), and last the profile's. What a
file declares is used only within :data:`PLAUSIBLE_PIXEL_SIZE_UM`; outside it, it is
ignored with one warning naming the files. Pixels a file declares not square
(:data:`SQUARE_TOLERANCE`) have no usable size: no later source stands in for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import warnings
from pathlib import Path

from mlseg.config import Profile
from mlseg.errors import some_of
from mlseg.io import TIFF_EXTENSIONS, image_extension

#: An image's JSON sidecar: same folder, same stem (``slide1.png`` -> ``slide1.json``), as BIDS
#: microscopy keeps one per image.
SIDECAR_SUFFIX = ".json"

#: Microns per pixel that light microscopy can produce, from super-resolution renders (10 nm)
#: to a 1x objective (10 um; nuclei span one or two pixels there). A size outside this range
#: is a unit error or an image program's print default (72 dpi = 353 um per pixel), never a
#: microscope's: metadata giving one is ignored, and a table giving one is refused.
PLAUSIBLE_PIXEL_SIZE_UM = (0.01, 10.0)

#: Relative difference of the x and y sizes a file may declare and still be read as square
#: pixels (a scanner's 0.2527 x 0.2528 um). Beyond it every area and length would be off by
#: the ratio, so the declaration is ignored with a warning.
SQUARE_TOLERANCE = 0.01

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


class ImplausiblePixelSizeWarning(UserWarning):
    """An image declares a pixel size outside :data:`PLAUSIBLE_PIXEL_SIZE_UM`; it is ignored."""


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


def image_pixel_size(
    path: Path,
    override: float | None,
    profile: Profile,
    listed: float | None = None,
    carried: float | None = None,
) -> tuple[float | None, str]:
    """``(microns per pixel or None, where it came from)`` for one image file; ``listed`` is
    its entry in a per-image table (``pixel_sizes``), ``carried`` the plausible size its label
    image's folder records (:func:`labels_pixel_size_um`) or its label TIFF declares, used
    where the image declares none. An image declaring pixels that are not square has none
    (``unknown``): any one size, the profile's too, would be off along one axis."""
    if override is not None:
        return float(override), "argument"
    if listed is not None:
        return float(listed), "table"
    implausible: list[tuple[Path, float]] = []
    not_square: list[Path] = []
    from_file = usable_pixel_size_um(path, implausible, not_square)
    if from_file is not None:
        return from_file, "image metadata"
    if not_square:  # warned of, naming the file and the fix
        return None, "unknown"
    if implausible:
        warnings.warn(implausible_message(implausible), ImplausiblePixelSizeWarning, stacklevel=2)
    if carried is not None:
        return float(carried), "labels metadata"
    if profile.pixel_size_um is not None:
        return profile.pixel_size_um, "profile"
    return None, "unknown"


def without_size_if_unknown(profile: Profile, um: float | None) -> Profile:
    """``profile`` without its pixel size for an image of no size ``um`` though the profile
    sets one (the image declares pixels that are not square: :func:`image_pixel_size`,
    :meth:`mlseg.dataset.Pair.size_or`), which ``pixel_size_um=None`` would otherwise take
    downstream; ``profile`` itself otherwise. Used by segment, quantify and evaluate."""
    if um is not None or profile.pixel_size_um is None:
        return profile
    return profile.model_copy(update={"pixel_size_um": None})


def declared_pixel_size_um(path: str | os.PathLike, *, plausible_only: bool = True) -> float | None:
    """Microns per pixel that an image file declares, else ``None``: its JSON sidecar
    (:func:`sidecar_pixel_size_um`) where it gives one, else its TIFF metadata
    (:func:`tiff_pixel_size_um`). The first declaration found decides, even one of pixels
    that are not square (``None``, with a warning naming the file: a square size in the
    TIFF beside such a sidecar is off along one axis); with ``plausible_only`` a size
    outside :data:`PLAUSIBLE_PIXEL_SIZE_UM` reads as ``None``.
    """
    um = _square_um(path, [])
    if um is None or (plausible_only and not plausible_pixel_size(um)):
        return None
    return um


def usable_pixel_size_um(
    path: str | os.PathLike,
    implausible: list[tuple[Path, float]],
    not_square: list[Path] | None = None,
) -> float | None:
    """The plausible size ``path`` declares (:func:`declared_pixel_size_um`), else ``None``;
    an implausible one is appended to ``implausible`` as ``(path, um)``, so that a caller
    warns once for all its images (:func:`implausible_message`), and ``path`` to
    ``not_square`` where it declares pixels that are not square (warned of here), so that
    a caller gives it no other size."""
    um = _square_um(path, [] if not_square is None else not_square)
    if plausible_pixel_size(um):
        return um
    if um is not None:
        implausible.append((Path(path), um))
    return None


def _square_um(path: str | os.PathLike, not_square: list[Path]) -> float | None:
    """The x size ``path`` declares (:func:`_declared_xy`), plausible or not; ``None`` where
    it declares none, or pixels that are not square: ``path`` is then appended to
    ``not_square``, with a warning naming the file that declares them."""
    declared = _declared_xy(path)
    if declared is None:
        return None
    um = _square_or_ignored(*declared)
    if um is None:
        not_square.append(Path(path))
    return um


def _square_or_ignored(
    source: Path, um: float, um_y: float | None, stacklevel: int = 4
) -> float | None:
    """``um`` where pixels ``um`` x ``um_y`` are square (:func:`_square`), else ``None`` with
    a warning naming ``source``, the sidecar or TIFF declaring them: the one decision of
    every reader of a declared size. ``stacklevel`` places the warning, counted from here."""
    if _square(um, um_y):
        return um
    why = _not_square(um, um_y)
    if source.suffix.lower() == SIDECAR_SUFFIX:
        return _ignored_sidecar(source, why, stacklevel)
    warnings.warn(f"{source}: pixel size ignored because {why}", stacklevel=stacklevel)
    return None


def not_square_declared(path: str | os.PathLike) -> str | None:
    """Which file declares the pixels of image ``path`` not square, and how (``slide.json
    declares pixels that are not square (0.25 um wide, 0.5 um high)``), else ``None``: why
    it has no size, for an error that would otherwise ask for one it already has."""
    declared = _declared_xy(path)
    if declared is None or _square(declared[1], declared[2]):
        return None
    source, um, um_y = declared
    return f"{source} declares pixels that are not square ({um:.4g} um wide, {um_y:.4g} um high)"


def _declared_xy(path: str | os.PathLike) -> tuple[Path, float, float | None] | None:
    """``(the file declaring it, x, y)`` microns per pixel: the sidecar's where it gives a
    size, else the TIFF's (``y`` None where only x is given)."""
    sidecar = sidecar_path(path)
    xy = _sidecar_xy(sidecar)
    if xy is not None:
        return sidecar, *xy
    xy = _tiff_xy(Path(path))
    return None if xy is None else (Path(path), *xy)


def sidecar_path(image: str | os.PathLike) -> Path:
    """The JSON sidecar of ``image``: beside it, same stem, :data:`SIDECAR_SUFFIX`
    (``slide1.png`` -> ``slide1.json``). BIDS names an OME-TIFF's without ``.ome``
    (``slide1.ome.tif`` -> ``slide1.json``), which is taken where ``slide1.ome.json`` is absent.
    """
    image = Path(image)
    own = image.with_suffix(SIDECAR_SUFFIX)
    as_written = image.name[: len(image.name) - len(image_extension(image))]
    bids = image.with_name(as_written + SIDECAR_SUFFIX)
    return bids if not own.is_file() and bids.is_file() else own


def sidecar_pixel_size_um(path: str | os.PathLike) -> float | None:
    """Microns per pixel that the JSON sidecar of image ``path`` declares, as declared (the
    plausibility check is :func:`declared_pixel_size_um`'s), else ``None``.

    Read, as BIDS microscopy writes it, ``PixelSize`` (a number or ``[x, y]``/``[x, y, z]``;
    x is used, y must match it) in ``PixelSizeUnits`` (``um``, ``nm``, ``mm``; microns where
    absent), or mlseg's own ``pixel_size_um``. A sidecar without either key means "unknown" (LabelMe
    saves its annotations under the same name). One that is not JSON, whose size is not a
    number, whose unit is unknown, or whose pixels are not square (x and y differ by more
    than :data:`SQUARE_TOLERANCE`), is ignored with a warning naming the file.
    """
    return _sidecar_um(sidecar_path(path))


def labels_sidecar(labels: str | os.PathLike, stem: str) -> Path:
    """The JSON named after the image beside its label file (``out/x_labels.png`` ->
    ``out/x.json``): in a ``mlseg segment`` or ``quantify`` output folder the image's record,
    which keeps the pixel size its labels were measured with (``pixel_size_um``)."""
    return Path(labels).with_name(stem + SIDECAR_SUFFIX)


def labels_pixel_size_um(labels: str | os.PathLike, stem: str) -> float | None:
    """Microns per pixel that :func:`labels_sidecar` declares, read as a sidecar
    (:func:`sidecar_pixel_size_um`: mlseg's ``pixel_size_um``, or BIDS ``PixelSize``), else
    ``None``; unchecked for plausibility, as :func:`sidecar_pixel_size_um`."""
    return _sidecar_um(labels_sidecar(labels, stem))


def _sidecar_um(sidecar: Path) -> float | None:
    xy = _sidecar_xy(sidecar)
    return None if xy is None else _square_or_ignored(sidecar, *xy)


def _sidecar_xy(sidecar: Path) -> tuple[float, float | None] | None:
    """``(x, y)`` microns per pixel the sidecar declares (``y`` None where it gives only x),
    square or not; ``None``, with a warning naming it where it is broken."""
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8-sig"))  # Notepad writes a BOM
    # ValueError: UnicodeDecodeError and JSONDecodeError; RecursionError: nested too deep
    except (OSError, ValueError, RecursionError) as err:
        return _ignored_sidecar(sidecar, f"it is not readable as JSON ({err})")
    if not isinstance(meta, dict):
        return None
    if "pixel_size_um" in meta:
        value, unit = meta["pixel_size_um"], "um"
    elif "PixelSize" in meta:
        value, unit = meta["PixelSize"], meta.get("PixelSizeUnits", "um")
    else:
        return None
    sizes = (value[:2] or [value]) if isinstance(value, list) else [value]
    if sizes[1:] == [None]:  # x given, y not: nothing to compare
        sizes = sizes[:1]
    if sizes[0] is None:  # declared unknown
        return None
    factor = _UNIT_UM.get(str(unit).strip().lower())
    if factor is None:
        return _ignored_sidecar(sidecar, f"its unit {unit!r} is not one of um, nm, mm")
    um = []
    for size in sizes:
        try:
            if isinstance(size, bool) or not math.isfinite(float(size)):
                raise TypeError  # JSON's NaN and Infinity, as a script writes an unknown size
            um.append(float(size) * factor)
        except (TypeError, ValueError):
            return _ignored_sidecar(sidecar, f"its pixel size {size!r} is not a number")
    return um[0], (um[1] if len(um) > 1 else None)


def _square(x: float, y: float | None = None) -> bool:
    """Whether pixels ``x`` by ``y`` microns are square within :data:`SQUARE_TOLERANCE`."""
    return y is None or abs(x - y) <= SQUARE_TOLERANCE * max(abs(x), abs(y))


def _not_square(x: float, y: float) -> str:
    return (
        f"its pixels are not square ({x:.4g} um wide, {y:.4g} um high): areas and lengths "
        "measured with one size would be off by their ratio; resample the image to square "
        "pixels (Fiji: Image > Scale) and declare that size"
    )


def _ignored_sidecar(sidecar: Path, why: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{sidecar}: pixel size ignored because {why}; write e.g. "
        f'{{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}}',
        stacklevel=stacklevel,
    )
    return None


def tiff_pixel_size_um(path: str | os.PathLike, *, plausible_only: bool = True) -> float | None:
    """Microns per pixel that a TIFF's metadata declares, else ``None``.

    Read in order: OME-XML (``PhysicalSizeX`` in its ``PhysicalSizeXUnit``, microns by
    default), ImageJ (``unit=`` of the description, including Fiji's escaped ``\\u00B5m``,
    with the resolution tags as pixels per unit), an Aperio description (``MPP = 0.499``),
    and last the TIFF resolution tags in centimetres or inches. With ``plausible_only`` a size
    outside :data:`PLAUSIBLE_PIXEL_SIZE_UM` (a 72-dpi default, a unit error) reads as
    ``None``; pass ``False`` to see it. Pixels declared not square (OME ``PhysicalSizeY``,
    ``YResolution``) read as ``None``, with a warning naming the file. Unreadable metadata
    means "unknown", never an error.
    """
    path = Path(path)
    declared = _tiff_xy(path)
    um = None if declared is None else _square_or_ignored(path, *declared, stacklevel=3)
    if um is None or (plausible_only and not plausible_pixel_size(um)):
        return None
    return um


def _tiff_xy(path: Path) -> tuple[float, float | None] | None:
    """``(x, y)`` microns per pixel the TIFF ``path`` declares (:func:`_declared_um`), else
    ``None`` (not a TIFF, or unreadable metadata: "unknown", never an error)."""
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _declared_um(tif)
    except Exception:  # metadata is optional: unreadable tags mean "unknown"
        return None


def _declared_um(tif) -> tuple[float, float | None] | None:
    """``(x, y)`` microns per pixel the TIFF declares (``y`` None where it gives only x)."""
    page = tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        um = _ome_um(tif.ome_metadata)
        if um is not None:
            return um
    if tif.imagej_metadata:
        factor = _UNIT_UM.get(str(tif.imagej_metadata.get("unit", "")).strip().lower())
        per_unit = _units_per_pixel(page)
        if factor is not None and per_unit is not None:
            return per_unit[0] * factor, _times(per_unit[1], factor)
    match = _APERIO_MPP.search(page.description or "")
    if match:
        with contextlib.suppress(ValueError):
            return float(match.group(1)), None
    per_unit, unit = _units_per_pixel(page), page.tags.get("ResolutionUnit")
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value)) if unit is not None else None
    if per_unit is None or um_per_unit is None:  # unit 1 (none): pixels per what is unknown
        return None
    return per_unit[0] * um_per_unit, _times(per_unit[1], um_per_unit)


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _units_per_pixel(page) -> tuple[float, float | None] | None:
    """``(x, y)`` units per pixel of the resolution tags (``y`` None without YResolution)."""

    def per_pixel(tag: str) -> float | None:
        res = page.tags.get(tag)
        if res is None:
            return None
        num, den = res.value
        return float(den) / float(num) if num else None

    x = per_pixel("XResolution")
    return None if x is None else (x, per_pixel("YResolution"))


def _ome_um(xml: str) -> tuple[float, float | None] | None:
    from defusedxml.ElementTree import fromstring  # the XML comes from the user's files

    for element in fromstring(xml).iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels" or "PhysicalSizeX" not in element.attrib:
            continue
        sizes = []
        for axis in ("X", "Y"):
            if f"PhysicalSize{axis}" not in element.attrib:
                sizes.append(None)
                continue
            unit = element.attrib.get(f"PhysicalSize{axis}Unit", "µm").strip().lower()
            factor = _UNIT_UM.get(unit)
            if factor is None:
                return None
            sizes.append(float(element.attrib[f"PhysicalSize{axis}"]) * factor)
        return sizes[0], sizes[1]
    return None


def size_counts(sizes):
    """How many images have each pixel size, of a pandas Series of microns per pixel:
    rounded to 4 decimals, smallest first, NaN left out (:func:`sizes_text`, and the counts
    of the fingerprint :func:`mlseg.inventory.fingerprint` writes)."""
    return sizes.round(4).value_counts().sort_index()


def sizes_text(sizes) -> str:
    """``8 at 0.25 um, 2 at 0.5 um`` of a pandas Series of microns per pixel
    (:func:`size_counts`): how ``mlseg ingest``, ``mlseg validate`` and ``mlseg monitor`` say
    which sizes a set of images has."""
    return ", ".join(f"{n} at {um:g} um" for um, n in size_counts(sizes).items())


# ----------------------------------------------------------------------------- training scale
#: Pixel sizes within this ratio of each other count as one scale: resampling by a few percent
#: would only blur the images (two scanners' "40x" differ by that much).
SAME_SCALE_RATIO = 1.1


def training_scale(sizes: list[float | None], target_um: float | None) -> tuple[float | None, bool]:
    """``(microns per pixel a model of images of these sizes trains at, whether they are
    resampled to it)`` (pure; ``None`` = unknown): the rule of
    :func:`mlseg.data.training_pixel_size`, apart from its warnings, so that ``mlseg
    validate`` can say what training will do. ``sizes``: each training image's, the
    profile's where it has none."""
    known = [s for s in sizes if s is not None]
    if not known:
        return None, False
    median = float(statistics.median(known))
    if target_um is None and max(known) / min(known) <= SAME_SCALE_RATIO:
        return (median if len(known) == len(sizes) else None), False
    return (median if target_um is None else target_um), True


def training_scale_note(
    image_sizes: list[float | None],
    profile: Profile,
    target_um: float | None = None,
    not_square: list[str] | tuple[str, ...] = (),
) -> str | None:
    """What training does with the training images that have no pixel size of their own
    (``None`` in ``image_sizes``), in one sentence for ``mlseg validate``; ``None`` where
    every image has one. With the profile's ``pixel_size_um`` they take it; without, a
    model whose pixel size is unknown scales every image it segments by its nuclei, and a
    set mixing scales keeps those images at theirs while the others are resampled.
    ``not_square`` names those of them declaring pixels that are not square: they take no
    size, not even the profile's (:func:`image_pixel_size`), and stay at their own scale."""
    unknown = sum(s is None for s in image_sizes)
    if not unknown:
        return None
    name = f"profile {profile.name}"
    some = f"{unknown} of {len(image_sizes)} images {'has' if unknown == 1 else 'have'} none"
    odd = ""
    if not_square:
        one = len(not_square) == 1
        it, its = ("it", "its") if one else ("them", "their")
        odd = (
            f"{len(not_square)} ({some_of(not_square, 3)}) {'declares' if one else 'declare'} "
            f"pixels that are not square, so no size applies, not even the profile's: "
            f"{'it trains' if one else 'they train'} at {its} own scale and "
            f"{'is' if one else 'are'} measured in pixels; resample {it} to square pixels (Fiji: Image > Scale) and "
            f"declare that size, or give {its} size in manifest.csv (pixel_size_um)"
        )
    if profile.pixel_size_um is not None:
        taken = unknown - len(not_square)
        train = "trains" if taken == 1 else "train"
        at = f"{name}'s {profile.pixel_size_um:g} um"
        if not odd:
            return f"{some} and {train} at {at}"
        return f"{some}: " + "; ".join([f"{taken} {train} at {at}"] * bool(taken) + [odd])
    um, _ = training_scale(list(image_sizes), target_um)
    advice = (
        "give each image its size (mlseg ingest --pixel-sizes, manifest.csv's pixel_size_um "
        "or a JSON sidecar) or set pixel_size_um in the profile"
    ) + (f"; of them, {odd}" if odd else "")
    if um is None:
        return (
            f"{some} and {name} sets none, so the model's pixel size will be unknown: mlseg "
            f"segment and evaluate then scale each image by the size of its nuclei; {advice}"
        )
    stay = "it stays at its" if unknown == 1 else "they stay at their"
    return (
        f"{some} and {name} sets none: {stay} own scale, 20x or 40x, while the others are "
        f"resampled to {um:g} um; {advice}"
    )
