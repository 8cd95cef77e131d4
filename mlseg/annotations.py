"""Nuclei annotated as polygons (QuPath GeoJSON, Aperio ImageScope XML) or as one mask file
per nucleus (the Data Science Bowl 2018 layout), read as label masks.

Pathologists annotate in QuPath or ImageScope, and the public H&E nuclei sets (MoNuSeg,
Kumar) come as ImageScope XML: polygons, not masks. :func:`annotation_labels` draws such a
file as an ``(H, W) int32`` label image (0 = background, nuclei 1..n in file order), which
:func:`mlseg.ingest.ingest` writes as the dataset's mask.

- **GeoJSON** (``.geojson``/``.json``), as QuPath's *Export objects as GeoJSON* writes it
  (``PathObjectTypeAdapters`` in qupath-core): a ``FeatureCollection``, a list of features
  (QuPath 0.2-0.3 scripts) or one feature. A cell's nucleus is its ``nucleusGeometry``; a
  detection's is its geometry; annotations are nuclei too (a nucleus a pathologist drew or
  redrew among mlseg's detections in QuPath). Beside cells or detections, an annotation that
  holds the centres of two or more other, smaller objects (an object's centre: its own pixel
  nearest its centroid), or is more than :data:`REGION_AREA_FACTOR` times the median object
  (or 4 times that the median cell or detection), is the region analysed; any other is a
  nucleus, and replaces the cells and detections whose centre it holds or that share half the
  smaller one's pixels with it (the outline it corrects, a small nucleus the model found under
  it), and keeps its pixels where it overlaps one of the others. One that holds the centres of
  two or more detections (no annotations), each with half its pixels inside it, that together
  cover :data:`MERGE_MIN_COVER` of it, is a nucleus too: one the model split, drawn over its
  pieces, which it replaces (a region drawn around nuclei is mostly background between
  them; one drawn within a pixel or two of touching nuclei reads as their merge). A type QuPath does not know is an annotation, as QuPath
  reads it. Tiles, TMA cores, points, lines and empty geometries are left out.
  The ``mlseg.pixel_size_um`` of a file mlseg wrote (:func:`mlseg.outputs.to_geojson`) is
  the image's pixel size.
- **ImageScope XML** (``.xml``): every ``Region`` with three or more vertices is a polygon,
  an ellipse (``Type="2"``) is drawn in the box of its two vertices, a negative region
  (``NegativeROA="1"``) is cut out of what is drawn before it, and ``MicronsPerPixel`` on
  ``Annotations`` is the image's pixel size.

One mask file per nucleus (:func:`object_mask_labels`): every non-zero pixel of
``masks/<n>.png`` is nucleus ``n``'s; files are taken in name order, and where two overlap the
later wins.

Coordinates are full-resolution pixels, origin at the image's top-left *corner* (QuPath's
convention, and that of :func:`mlseg.outputs.to_geojson`): a pixel belongs to a polygon when
its centre lies inside it (even-odd rule, so holes are holes), so a mask exported as exact
pixel-edge polygons comes back pixel for pixel. Where polygons overlap, a shared pixel goes to
the one listed later. A polygon that encloses the centres of two or more smaller others is a region
drawn around nuclei, not a nucleus, and is left out (but for a merge among detections, above). An annotation drawn again (a later one
over :data:`DUPLICATE_IOU` intersection over union with it) is left out, its later copy kept.
What is left out is counted in
:attr:`Drawn.notes`; a file whose nuclei all lie outside the image (coordinates of the whole
slide for a tile cut from it) raises :class:`ImageReadError` naming it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlseg.errors import ImageReadError, size_mismatch

ANNOTATION_EXTENSIONS = (".geojson", ".json", ".xml")
#: A polygon enclosing the centres of this many other polygons is a region, not a nucleus.
REGION_MIN_ENCLOSED = 2
#: Beside cells or detections, an annotation this many times the median area of the file's
#: objects (five times a typical nucleus's diameter) is a region analysed (one holding no
#: nucleus), not a nucleus drawn by hand.
REGION_AREA_FACTOR = 25
#: An annotation among detections holding the centres of two or more, each half inside it, is
#: one nucleus drawn over the pieces the model split it into (a merge) where they cover this
#: much of it: a split nucleus's pieces fill its outline (gbm40 and CPM-15 nuclei split in two:
#: all reach 0.8 of it redrawn exactly, 89% of it redrawn 1 px wide), a region drawn around
#: nuclei is mostly background between them (93-98% of touching pairs and triples are under
#: 0.7 of their hull drawn 3 px wide; their hull drawn tight is read as their merge).
MERGE_MIN_COVER = 0.7
#: An annotation over this intersection over union of one drawn later is its duplicate.
DUPLICATE_IOU = 0.8

#: ``[exterior, hole, ...]``: closed or open rings of ``(x, y)`` float coordinates.
Polygon = list[np.ndarray]


@dataclass
class Shape:
    """One nucleus as drawn: polygons (unioned) and ellipses ``(cx, cy, rx, ry)``."""

    polygons: list[Polygon] = field(default_factory=list)
    ellipses: list[tuple[float, float, float, float]] = field(default_factory=list)
    negative: bool = False  # ImageScope negative region: erases what is drawn before it
    among_detections: bool = False  # a GeoJSON annotation beside cells or detections
    detection: bool = False  # a GeoJSON cell's nucleus or detection


@dataclass
class Annotations:
    path: Path
    shapes: list[Shape]
    pixel_size_um: float | None = None
    skipped: Counter = field(default_factory=Counter)  # why -> how many objects


@dataclass
class Drawn:
    labels: np.ndarray  # (H, W) int32
    pixel_size_um: float | None
    notes: list[str]  # what was left out or changed, one phrase each


def is_annotation_file(path: Path) -> bool:
    """A ``.geojson`` or ``.xml`` file, or a ``.json`` one that holds GeoJSON features (a
    mask folder may hold other JSON: a class map, a sidecar)."""
    suffix = path.suffix.lower()
    if suffix not in ANNOTATION_EXTENSIONS or path.name.startswith(".") or not path.is_file():
        return False
    if suffix != ".json":
        return True
    with path.open("rb") as fh:
        head = fh.read(4096)
    return b'"Feature' in head or b'"geometry"' in head


def annotation_stem(path: Path, mask_suffix: str) -> str:
    """The stem of the image an annotation file is for: ``a.geojson``, ``a_mask.geojson``
    and ``a.tif.geojson`` (as QuPath scripts name it after the image) are all ``a``'s."""
    from mlseg.io import without_image_extension

    stem = without_image_extension(path.stem)
    return stem[: -len(mask_suffix)] if mask_suffix and stem.endswith(mask_suffix) else stem


# ----------------------------------------------------------------------------- reading
def read_annotations(path: str | os.PathLike) -> Annotations:
    """Parse a GeoJSON or ImageScope XML annotation file; :class:`ImageReadError` names the
    file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.suffix.lower() == ".xml":
        return _read_imagescope(path)
    if path.suffix.lower() in (".geojson", ".json"):
        return _read_geojson(path)
    raise ImageReadError(
        f"{path}: not an annotation file; use one of {', '.join(ANNOTATION_EXTENSIONS)}"
    )


def _read_geojson(path: Path) -> Annotations:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ImageReadError(f"{path}: not valid JSON ({err}); export it again") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        found = "LabelMe shapes" if isinstance(data, dict) and "shapes" in data else "other JSON"
        raise ImageReadError(
            f"{path}: not GeoJSON features ({found}); give a GeoJSON FeatureCollection as "
            f"QuPath's File > Export objects as GeoJSON writes it, or the masks as PNG"
        )
    for number, feature in enumerate(features, 1):
        props = feature.get("properties")
        if props is not None and not isinstance(props, dict):  # GeoJSON: an object or null
            raise ImageReadError(
                f"{path}: feature {number} has properties that are no JSON object (a "
                f"{type(props).__name__}); export it again"
            )
    kinds = [_object_type(f) for f in features]
    among_detections = bool({"cell", "detection"} & set(kinds))
    result = Annotations(path, [], pixel_size_um=_mlseg_pixel_size(data))
    for feature, kind in zip(features, kinds, strict=True):
        if kind == "cell":
            geometry = feature.get("nucleusGeometry")
            if geometry is None:
                result.skipped["cells without a nucleus"] += 1
                continue
        elif kind in ("detection", "annotation"):
            geometry = feature.get("geometry")
        else:
            result.skipped[f"{kind} objects"] += 1
            continue
        try:
            polygons = _geojson_polygons(geometry)
        except (TypeError, ValueError, IndexError) as err:
            raise ImageReadError(
                f"{path}: feature {len(result.shapes) + sum(result.skipped.values()) + 1} has "
                f"a malformed geometry ({err}); export it again"
            ) from err
        if polygons:
            result.shapes.append(
                Shape(
                    polygons,
                    among_detections=among_detections and kind == "annotation",
                    detection=kind != "annotation",
                )
            )
        else:
            result.skipped["points, lines and empty geometries"] += 1
    return result


def _object_type(feature: dict) -> str:
    """QuPath's object type of a feature: ``properties.objectType`` (0.3+), ``object_type``
    or ``type`` (older), the v0.2 class name in ``id``; annotation where none is given."""
    props = feature.get("properties") or {}
    kind = props.get("objectType") or props.get("object_type") or props.get("type")
    if kind is None and str(feature.get("id", "")).startswith("Path"):
        kind = str(feature["id"])
    kind = str(kind or "annotation")
    legacy = {
        "PathCellObject": "cell",
        "PathDetectionObject": "detection",
        "PathAnnotationObject": "annotation",
        "PathTileObject": "tile",
        "TMACoreObject": "tmaCore",
        "tma_core": "tmaCore",
        "PathRootObject": "root",
    }
    kind = legacy.get(kind, kind)
    # QuPath reads a type it does not know as an annotation; converters that put a class in
    # properties.type ("Neoplastic", 1) mean nuclei
    return kind if kind in ("cell", "detection", "tile", "tmaCore", "root") else "annotation"


def _geojson_polygons(geometry: dict | None) -> list[Polygon]:
    """The polygons of a GeoJSON geometry; points and lines give none."""
    if not geometry:
        return []
    if not isinstance(geometry, dict):  # bare coordinates where a geometry object belongs
        raise TypeError(f"a geometry is a JSON object with a type, got {type(geometry).__name__}")
    kind = geometry.get("type")
    if kind in ("Polygon", "MultiPolygon") and not geometry.get("coordinates"):
        return []  # an empty geometry (as JTS and shapely write one): RFC 7946 reads it as null
    if kind == "Polygon":
        return [_rings(geometry["coordinates"])]
    if kind == "MultiPolygon":
        return [_rings(rings) for rings in geometry["coordinates"] if rings]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in _geojson_polygons(g)]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []
    raise ValueError(f"unknown geometry type {kind!r}")


def _rings(rings: list) -> Polygon:
    out = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in rings]
    if not out or any(r.ndim != 2 or len(r) < 3 for r in out):
        raise ValueError("a polygon ring needs three or more [x, y] points")
    if not all(np.isfinite(r).all() for r in out):
        raise ValueError("a coordinate is not a finite number")
    return out


def _read_imagescope(path: Path) -> Annotations:
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, DefusedXmlException) as err:
        raise ImageReadError(f"{path}: not valid XML ({err}); export it again") from err
    if root.tag != "Annotations":
        raise ImageReadError(
            f"{path}: not an Aperio ImageScope annotation file (root element <{root.tag}>, "
            f"expected <Annotations>)"
        )
    result = Annotations(path, [], pixel_size_um=_positive(root.get("MicronsPerPixel")))
    for region in root.iter("Region"):
        try:
            xy = np.array(
                [[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")],
                dtype=np.float64,
            ).reshape(-1, 2)
        except (TypeError, ValueError) as err:
            raise ImageReadError(
                f"{path}: region {region.get('Id')!r} has a vertex without a numeric X or Y"
            ) from err
        if not np.isfinite(xy).all():
            raise ImageReadError(
                f"{path}: region {region.get('Id')!r} has a vertex at a non-finite X or Y"
            )
        negative = region.get("NegativeROA", "0").strip() == "1"
        if region.get("Type", "0").strip() == "2" and len(xy) == 2:
            (x0, y0), (x1, y1) = xy
            ellipse = ((x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2)
            result.shapes.append(Shape(ellipses=[ellipse], negative=negative))
        elif len(xy) >= 3:
            result.shapes.append(Shape(polygons=[[xy]], negative=negative))
        else:
            result.skipped["rulers, arrows and points"] += 1
    return result


def _mlseg_pixel_size(data: object) -> float | None:
    """The ``mlseg.pixel_size_um`` of a FeatureCollection mlseg wrote
    (:func:`mlseg.outputs.to_geojson`), its labels' microns per pixel, else ``None``."""
    meta = data.get("mlseg") if isinstance(data, dict) else None
    um = meta.get("pixel_size_um") if isinstance(meta, dict) else None
    return None if isinstance(um, bool) else _positive(um)


def _positive(value: str | float | None) -> float | None:
    try:
        number = float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


# ----------------------------------------------------------------------------- drawing
def _shape_mask(shape: Shape, height: int, width: int) -> tuple[int, int, np.ndarray] | None:
    """``(row0, col0, mask)`` of the pixels whose centres lie inside ``shape``, cropped to
    its box within the image, or ``None`` where it covers no pixel centre of the image."""
    from skimage.draw import ellipse as draw_ellipse
    from skimage.draw import polygon as draw_polygon

    points = [ring for poly in shape.polygons for ring in poly]
    boxes = [(r.min(axis=0), r.max(axis=0)) for r in points]
    boxes += [
        (np.array([cx - rx, cy - ry]), np.array([cx + rx, cy + ry]))
        for cx, cy, rx, ry in shape.ellipses
    ]
    low = np.min([b[0] for b in boxes], axis=0)
    high = np.max([b[1] for b in boxes], axis=0)
    c0, r0 = max(0, math.floor(low[0] - 0.5)), max(0, math.floor(low[1] - 0.5))
    c1, r1 = min(width, math.ceil(high[0] + 0.5)), min(height, math.ceil(high[1] + 0.5))
    if c1 <= c0 or r1 <= r0:
        return None
    box = (r1 - r0, c1 - c0)
    mask = np.zeros(box, dtype=bool)
    for poly in shape.polygons:
        part = np.zeros(box, dtype=bool)
        for ring in poly:  # even-odd: a hole flips what its exterior filled
            # pixel (r, c) has its centre at (c + 0.5, r + 0.5)
            rr, cc = draw_polygon(ring[:, 1] - 0.5 - r0, ring[:, 0] - 0.5 - c0, shape=box)
            part[rr, cc] ^= True
        mask |= part
    for cx, cy, rx, ry in shape.ellipses:
        if rx > 0 and ry > 0:
            rr, cc = draw_ellipse(cy - 0.5 - r0, cx - 0.5 - c0, ry, rx, shape=box)
            mask[rr, cc] = True
    return (r0, c0, mask) if mask.any() else None


def draw(annotations: Annotations, shape: tuple[int, int]) -> Drawn:
    """The label image of ``annotations`` for an image of ``shape`` ``(H, W)``; see the
    module docstring for the rules."""
    height, width = shape
    skipped = Counter(annotations.skipped)
    masks = [(item, _shape_mask(item, height, width)) for item in annotations.shapes]
    if outside := sum(m is None for _, m in masks):
        skipped["outside the image or smaller than a pixel"] += outside
    drawn = [(item, m) for item, m in masks if m is not None]
    if not any(not item.negative for item, _ in drawn):
        raise ImageReadError(_nothing_inside(annotations, shape))
    left_out = _left_out([(item, m) for item, m in drawn if not item.negative], shape, skipped)
    labels = np.zeros(shape, dtype=np.int32)
    by_hand = np.zeros(shape, dtype=bool)  # a nucleus drawn among detections keeps its pixels
    overlapping = label = 0
    for item, (r0, c0, mask) in drawn:
        view = labels[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        hand = by_hand[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        if item.negative:
            view[mask] = 0
        elif id(mask) not in left_out:
            label += 1
            overlapping += bool(view[mask].any())
            paint = mask & ~hand if item.detection else mask
            view[paint] = label
            if item.among_detections:
                hand |= mask
    notes = [f"{n} {why} left out" for why, n in sorted(skipped.items())]
    if overlapping:
        notes.append(
            f"{overlapping} nuclei overlap one drawn before (shared pixels go to the later)"
        )
    return Drawn(_relabel(labels), annotations.pixel_size_um, notes)


def _left_out(items: list[tuple[Shape, tuple]], shape: tuple[int, int], skipped: Counter) -> set:
    """``id`` of the masks not drawn, counted in ``skipped``: duplicate annotations, regions,
    and the detections a nucleus drawn among them replaces (see the module docstring)."""
    areas = [int(m.sum()) for _, (_, _, m) in items]
    duplicates = _duplicates(items, areas, shape)
    too_large = _too_large(items, areas) - duplicates
    kept = [i for i in range(len(items)) if i not in duplicates | too_large]
    inside = _held([items[i][1] for i in kept], shape)  # by position in kept
    held = {i: [kept[k] for k in found] for i, found in zip(kept, inside, strict=True)}
    # what an object is drawn around is smaller than it: a small region's centre that fell in
    # a nucleus redrawn within it made the redrawing, and the detection under both, regions
    smaller = {i: [j for j in found if areas[j] < areas[i]] for i, found in held.items()}
    around = {i for i, found in smaller.items() if len(found) >= REGION_MIN_ENCLOSED}
    around -= _merges(items, areas, around, smaller)
    analysed = too_large | {i for i in around if items[i][0].among_detections}
    nuclei = [i for i in kept if items[i][0].among_detections and i not in around]
    detections = {i for i in kept if items[i][0].detection and i not in around}
    replaced = _replaced(items, areas, nuclei, detections, held, shape)
    for why, found in (
        ("duplicate annotations", duplicates),
        ("region annotations", analysed),
        ("regions around nuclei", around - analysed),
        ("detections drawn again by hand", replaced),
    ):
        if found:
            skipped[why] += len(found)
    return {id(items[i][1][2]) for i in duplicates | analysed | around | replaced}


def _duplicates(
    items: list[tuple[Shape, tuple]], areas: list[int], shape: tuple[int, int]
) -> set[int]:
    """Indices of annotations drawn again later (the later one over :data:`DUPLICATE_IOU` of
    it): the earlier copy of the same nucleus, found under the later on a map of the
    annotations drawn in file order."""
    index = np.zeros(shape, dtype=np.int32)  # annotation index + 1
    out = set()
    for later, (item, (r0, c0, mask)) in enumerate(items):
        if item.detection:
            continue
        view = index[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        under = np.unique(view[mask])
        for earlier in under[under > 0] - 1:
            small, large = sorted((areas[earlier], areas[later]))
            if small <= DUPLICATE_IOU * large:
                continue  # the intersection over union is at most small / large
            shared = _shared(items[earlier][1], items[later][1])
            if shared > DUPLICATE_IOU * (small + large - shared):
                out.add(int(earlier))
        view[mask] = later + 1
    return out


def _overlap(
    a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The windows of two cropped masks ``(row0, col0, mask)`` over the pixels both crops
    span, ``a``'s then ``b``'s (views), or ``None`` where the crops do not meet."""
    (ar, ac, am), (br, bc, bm) = a, b
    r0, c0 = max(ar, br), max(ac, bc)
    r1 = min(ar + am.shape[0], br + bm.shape[0])
    c1 = min(ac + am.shape[1], bc + bm.shape[1])
    if r1 <= r0 or c1 <= c0:
        return None
    return am[r0 - ar : r1 - ar, c0 - ac : c1 - ac], bm[r0 - br : r1 - br, c0 - bc : c1 - bc]


def _shared(a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]) -> int:
    """How many pixels two cropped masks ``(row0, col0, mask)`` share."""
    windows = _overlap(a, b)
    return 0 if windows is None else int((windows[0] & windows[1]).sum())


def _too_large(items: list[tuple[Shape, tuple]], areas: list[int]) -> set[int]:
    """Indices of the annotations beside cells or detections more than
    :data:`REGION_AREA_FACTOR` times the median area of the file's objects (cells, detections
    and annotations: nuclei, but for a few regions), or than 4 times that factor the median
    cell or detection: regions analysed. The largest detection was the measure first, and a
    model that found only the small nuclei (lymphocytes) had the tumour nuclei a pathologist
    drew beside them read as regions (55 of 191 on a CPM-15 tile)."""
    found = [a for (item, _), a in zip(items, areas, strict=True) if not item.among_detections]
    # beside a few detections a few empty regions are half the objects, and their median
    # a region's: the detections' median, by a wider margin, still tells a region
    limit = min(
        float(np.median(areas)) * REGION_AREA_FACTOR if areas else np.inf,
        float(np.median(found)) * REGION_AREA_FACTOR * 4 if found else np.inf,
    )
    return {
        i
        for i, ((item, _), area) in enumerate(zip(items, areas, strict=True))
        if item.among_detections and 0 < limit < area
    }


def _merges(
    items: list[tuple[Shape, tuple]],
    areas: list[int],
    around: set[int],
    held: dict[int, list[int]],
) -> set[int]:
    """Indices of the annotations among detections, of those holding two or more centres,
    drawn over the pieces of one nucleus the model split: all they hold are detections, each
    with half its pixels or more inside, together covering :data:`MERGE_MIN_COVER` of it."""
    out = set()
    for i in sorted(around):
        pieces = held[i]
        if not items[i][0].among_detections or not all(items[j][0].detection for j in pieces):
            continue
        if any(2 * _shared(items[i][1], items[j][1]) < areas[j] for j in pieces):
            continue
        if _covered(items[i][1], [items[j][1] for j in pieces]) >= MERGE_MIN_COVER * areas[i]:
            out.add(i)
    return out


def _covered(a: tuple[int, int, np.ndarray], others: list[tuple[int, int, np.ndarray]]) -> int:
    """How many pixels of the cropped mask ``a`` the cropped masks ``others`` cover."""
    cover = np.zeros_like(a[2])
    for other in others:
        if (windows := _overlap((a[0], a[1], cover), other)) is not None:
            covered, drawn = windows
            covered |= drawn
    return int((cover & a[2]).sum())


def _replaced(
    items: list[tuple[Shape, tuple]],
    areas: list[int],
    nuclei: list[int],
    detections: set[int],
    held: dict[int, list[int]],
    shape: tuple[int, int],
) -> set[int]:
    """Indices of the detections a nucleus drawn among them replaces: those whose centre it
    holds, or that share half the smaller one's pixels with it (a detection map, as mlseg's
    detections do not overlap, finds them)."""
    if not nuclei:
        return set()
    index = np.zeros(shape, dtype=np.int32)  # detection index + 1
    for i in sorted(detections):
        r0, c0, mask = items[i][1]
        index[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]][mask] = i + 1
    out = set()
    for n in nuclei:
        r0, c0, mask = items[n][1]
        under = np.unique(index[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]][mask])
        for i in under[under > 0] - 1:
            if 2 * _shared(items[n][1], items[i][1]) >= min(areas[n], areas[i]):
                out.add(int(i))
        out |= detections.intersection(held[n])
    return out


def _held(masks: list[tuple[int, int, np.ndarray]], shape: tuple[int, int]) -> list[list[int]]:
    """For each mask, the indices of the other masks whose centre pixel (:func:`_centre`) it
    holds (found on a map of centres: linear in the pixels drawn)."""
    if len(masks) < 2:
        return [[] for _ in masks]
    centres = np.array([_centre(*m) for m in masks], dtype=np.int64)
    flat = centres[:, 0] * shape[1] + centres[:, 1]
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    at = np.zeros(shape, dtype=bool)  # pixels holding a centre
    at[centres[:, 0], centres[:, 1]] = True
    out = []
    for k, (r0, c0, mask) in enumerate(masks):
        rows, cols = np.nonzero(at[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]] & mask)
        pixels = (rows + r0) * shape[1] + cols + c0
        low = np.searchsorted(ordered, pixels, side="left")
        high = np.searchsorted(ordered, pixels, side="right")
        inside = [int(j) for a, b in zip(low, high, strict=True) for j in order[a:b]]
        out.append(sorted(j for j in inside if j != k))
    return out


def _centre(r0: int, c0: int, mask: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` in the image of the cropped mask's pixel at its centroid, or, where that
    pixel is not its own (a crescent, a nucleus in two pieces), of its own pixel nearest the
    centroid: a C-shaped detection's centroid lies in its hollow, where a pathologist draws
    the nucleus the model missed, which then replaced (deleted) the detection it held."""
    pixels = np.argwhere(mask)
    centroid = pixels.mean(axis=0)
    row, col = np.round(centroid).astype(np.int64)
    if not mask[row, col]:
        row, col = pixels[np.argmin(((pixels - centroid) ** 2).sum(axis=1))]
    return int(row) + r0, int(col) + c0


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels 1..n in file order, none missing (a nucleus wholly covered by later ones or
    cut out by a negative region leaves a gap)."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


def _nothing_inside(annotations: Annotations, shape: tuple[int, int]) -> str:
    path, (height, width) = annotations.path, shape
    if not annotations.shapes:
        left = ", ".join(f"{n} {why}" for why, n in sorted(annotations.skipped.items()))
        return f"{path}: no nucleus polygons found ({left or 'the file is empty'})"
    points = np.concatenate(
        [ring for s in annotations.shapes for poly in s.polygons for ring in poly]
        + [np.array([[cx, cy]]) for s in annotations.shapes for cx, cy, _, _ in s.ellipses]
    )
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return (
        f"{path}: none of its {len(annotations.shapes)} polygons covers a pixel of the "
        f"{width}x{height} image (they span x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f}); give "
        f"coordinates in pixels of this image, origin at its top-left corner (for a tile cut "
        f"from a slide, export the objects relative to the tile)"
    )


def annotation_labels(path: str | os.PathLike, shape: tuple[int, int]) -> Drawn:
    """Read ``path`` and draw it for an image of ``shape`` ``(H, W)``."""
    return draw(read_annotations(path), shape)


def object_mask_labels(folder: str | os.PathLike, shape: tuple[int, int]) -> Drawn:
    """The label image of a folder of one-nucleus masks (non-zero = the nucleus), for an
    image of ``shape`` ``(H, W)``: labels 1..n in file-name order; a pixel two masks share
    goes to the later. A mask of another size raises :class:`ImageReadError` naming it."""
    from mlseg.dataset import is_image_file
    from mlseg.io import read_mask

    folder = Path(folder)
    labels = np.zeros(shape, dtype=np.int32)
    empty = overlapping = label = 0
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        mask = read_mask(path) != 0
        if mask.shape != tuple(shape):
            raise ImageReadError(size_mismatch(path, mask.shape, shape))
        if not mask.any():
            empty += 1
            continue
        label += 1
        overlapping += bool(labels[mask].any())
        labels[mask] = label
    notes = [f"{empty} empty masks left out"] if empty else []
    if overlapping:
        notes.append(
            f"{overlapping} nuclei overlap one read before (shared pixels go to the later)"
        )
    return Drawn(_relabel(labels), None, notes)
