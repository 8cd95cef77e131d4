"""What a segmentation run leaves behind, per image and per run.

Per image ``<stem>``: ``<stem>_labels.png`` (16-bit; ``.tif`` above 65535 nuclei),
``<stem>_overlay.png`` (outlines; IHC classes in :data:`IHC_OVERLAY_COLOURS`),
``<stem>_nuclei.csv`` and ``<stem>_nuclei.parquet`` (one row per nucleus),
``<stem>_nuclei.geojson`` (QuPath detections), and last ``<stem>.json``: the summary, the
profile name and version and the list of outputs. Every file is written atomically, so the presence of ``<stem>.json`` means the
image is complete (:func:`image_done`). A redo sets the earlier ``<stem>.json`` aside, hidden
(:func:`earlier_record`), until its own is written, so a redo that failed keeps the time the
image was first segmented (:func:`first_finished_at`).

Per run: ``summary.csv`` (one row per image), ``nuclei.parquet`` (every nucleus of those
images, ``image`` first: :func:`nuclei_table`), ``histograms.png`` (main measurements over
all nuclei of the run) and ``run.json`` (versions, machine, model, preprocessing, profile,
inference settings). A rerun that redoes no image keeps the first three where they hold
exactly its images (:func:`run_outputs_current`) and writes ``run.json`` alone, with
``nuclei.parquet``'s footer where the run's record changed (:func:`update_run_outputs`).

Each Parquet file carries its record in its footer, under :data:`PROVENANCE_KEY`: an
image's table its ``<stem>.json``, ``nuclei.parquet`` the ``run.json``, without the times
(:data:`TIMING_KEYS`): the same numbers make the same bytes.

GeoJSON follows QuPath's own reader (``PathObjectTypeAdapters`` in qupath-core, 0.4+):
a ``FeatureCollection`` of ``Feature`` s whose ``properties`` hold ``objectType:
"detection"``, ``classification: {"name", "color": [r, g, b]}`` and ``measurements`` as a
name -> number object (the 0.4+ form; numbers only, so NaN/inf are left out). Coordinates are
pixels of the full-resolution image, origin at its top-left *corner*; each polygon follows
the pixel edges exactly (its area equals the pixel count), pieces of one nucleus form a
``MultiPolygon``, and holes are interior rings. Import with QuPath's *File > Import objects
from file* or by dragging the file onto the image.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mlseg.errors import DatasetError, writes_named
from mlseg.io import (
    atomic_path,
    labels_suffix,
    remove_leftovers,
    write_image,
    write_labels,
    write_table,
    write_text,
    written_together,
)
from mlseg.plots import display_limits

OUTPUT_SUFFIXES = ("_overlay.png", "_nuclei.csv", "_nuclei.parquet", "_nuclei.geojson")
#: The run's table of every nucleus; an image's own are ``<stem>_nuclei.*``, so none is named so.
NUCLEI_TABLE = "nuclei.parquet"
#: The files :func:`write_run_outputs` writes, by the key it returns each under.
RUN_FILES = {
    "summary": "summary.csv",
    "nuclei": NUCLEI_TABLE,
    "histograms": "histograms.png",
    "run": "run.json",
}
#: Keys of a run record naming what wrote the run files: a new mlseg or pandas may write a
#: table or draw the histograms another way (pyarrow and matplotlib, which the record does
#: not name, are read from the files: :func:`run_outputs_current`).
WRITER_KEYS = ("mlseg_version", "packages")
#: What an image's GeoJSON records of its making (beside its pixel size), where the summary
#: has it: a file moved into a QuPath project still names its image's bytes and the model.
GEOJSON_PROVENANCE = (
    "image",
    "image_file",
    "labels_file",
    "input_digest",
    "model",
    "profile",
    "profile_version",
    "settings",
    "mlseg_version",
)
#: Key of the Parquet footer entry that holds, as JSON, the ``<stem>.json`` of an image's table
#: and the ``run.json`` of the run's :data:`NUCLEI_TABLE`.
PROVENANCE_KEY = "mlseg"
#: Keys of a record that say when and how fast, not what: left out of the Parquet footers,
#: so a rerun that makes the same numbers writes the same bytes.
TIMING_KEYS = ("seconds", "started_at", "finished_at")
NUCLEUS_CLASS = ("Nucleus", (0, 200, 0))
#: Outlines on nuclei that are green themselves (SYTOX Green, GFP-H2B), where green vanishes.
OUTLINE_ON_GREEN = (255, 0, 255)
# QuPath's intensity classes and colours (Negative, 1+, 2+, 3+), as the GeoJSON names them
IHC_CLASSES = (
    ("Negative", (112, 112, 225)),
    ("1+", (255, 215, 0)),
    ("2+", (224, 142, 0)),
    ("3+", (200, 35, 35)),
)
#: Outline colours of the IHC classes in overlays (Negative, 1+, 2+, 3+): dark blue, yellow,
#: red-orange, pink. QuPath's colours were lost to colour-blind viewers (Machado 2009
#: simulation, CIEDE2000): 1+ and 2+ 14 apart with deuteranopia, a 3+ outline 10 from its
#: dark brown nucleus with protanopia, and a Negative one 7-9 from its blue nucleus for
#: everyone. These stay 24 or more apart, and 18 or more (10th percentile) from the nuclei
#: they outline, in normal vision and all three (synthetic DAB and re-stained GBM40 tiles).
IHC_OVERLAY_COLOURS = ((0, 0, 64), (255, 255, 0), (255, 64, 0), (255, 160, 224))
HISTOGRAM_COLUMNS = (
    "area",
    "perimeter",
    "equivalent_diameter",
    "feret_max",
    "circularity",
    "eccentricity",
    "solidity",
)
#: Stain optical densities left out of the histograms (what the profile's stains do not explain).
RESIDUAL_STAINS = ("residual",)


# ----------------------------------------------------------------------------- overlay
def display_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8/uint16 -> ``(H, W, 3) uint8`` for display (16-bit stretched
    between the 0.5th and 99.5th percentiles of its lit channels,
    :func:`mlseg.plots.display_limits`; grey repeated)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        lo, hi = display_limits(image[:: max(1, image.shape[0] // 512)])
        scaled = (image.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
        image = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def outline_mask(labels: np.ndarray) -> np.ndarray:
    """``(H, W) bool``: object pixels with a 4-neighbour of another label (or off image)."""
    labels = np.asarray(labels)
    padded = np.pad(labels, 1, mode="constant")
    centre = padded[1:-1, 1:-1]
    edge = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return edge & (labels > 0)


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    classes: pd.Series | None = None,
) -> np.ndarray:
    """Outlines of ``labels`` drawn on ``image``: ``(H, W, 3) uint8``.

    ``classes``: optional IHC class (0-3) per label, indexed by label value (a label it
    lacks counts as 0); outlines then take :data:`IHC_OVERLAY_COLOURS`, else green, or
    magenta where the outlined pixels are mostly green (a green nuclear stain).
    ``ValueError`` where the two differ in size.
    """
    rgb = display_rgb(image).copy()
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        # an IndexError about a boolean index otherwise, naming neither array
        raise ValueError(
            f"image ({rgb.shape[0]}, {rgb.shape[1]}) and labels {labels.shape} differ in size; "
            "draw the labels on the (H, W) image they were segmented from"
        )
    edge = outline_mask(labels)
    if classes is None:
        red, green, blue = rgb[edge].mean(axis=0) if edge.any() else (0, 0, 0)
        rgb[edge] = OUTLINE_ON_GREEN if green > red + blue else NUCLEUS_CLASS[1]
        return rgb
    palette = np.array(IHC_OVERLAY_COLOURS, dtype=np.uint8)
    of_edge = classes.reindex(labels[edge]).fillna(0).to_numpy(dtype=np.int64)
    rgb[edge] = palette[np.clip(of_edge, 0, 3)]
    return rgb


def class_lookup(table: pd.DataFrame) -> pd.Series | None:
    """``ihc_class`` indexed by label value, or None without IHC. Not an array indexed by
    label value: a tile of a slide's label image keeps ids up to 2**31 - 1."""
    if "ihc_class" not in table.columns:
        return None
    return pd.Series(table["ihc_class"].to_numpy(), index=table["label"].to_numpy())


# ----------------------------------------------------------------------------- polygons
def polygons(labels: np.ndarray) -> dict[int, list[list[np.ndarray]]]:
    """Exact pixel-edge outlines of every label.

    Returns ``{label: [polygon, ...]}``, each polygon ``[exterior, hole, ...]`` of
    ``(N, 2) int64`` closed rings of ``(x, y)`` pixel-corner coordinates (first vertex
    repeated last; only corners kept). Pixels of one label that touch only diagonally are
    separate polygons (4-connectivity), and background that touches the outside only
    diagonally is a hole meeting the exterior at that corner, so every ring is simple and
    every polygon valid as GEOS/JTS (shapely, QuPath) define it. Exteriors run clockwise on
    screen (y down), counter-clockwise in the x/y frame of the coordinates (RFC 7946's
    right-hand rule), holes the other way.

    All boundary edges are found with array operations; rings are then read off the
    successor permutation (one integer step per edge). Memory: about 13 bytes a pixel at the
    peak besides ``labels`` (tiled real H&E nuclei, 6000 x 6000), where an int64 copy of the
    image and the edge finding's temporaries, kept to the end, took 29.
    """
    labels = np.asarray(labels)
    height, width = labels.shape
    ids, compact = _compact_ids(labels)
    lab, sx, sy, dx, dy = _pixel_edges(compact)
    del compact  # the one whole-image array: the rings are traced from the edges alone
    if lab.size == 0:
        return {}
    stride_x = width + 1
    stride_y = (height + 1) * stride_x
    start_key = lab * stride_y + sy * stride_x + sx
    end_key = lab * stride_y + (sy + dy) * stride_x + (sx + dx)
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    succ = order[first]
    # A pinch vertex (two pixels of a label touching diagonally) has two outgoing edges:
    # take the right turn, which keeps hugging the current pixel.
    second = np.minimum(first + 1, order.size - 1)
    pinch = sorted_keys[second] == end_key
    pinch &= first + 1 < order.size
    if pinch.any():
        alt = order[second]
        turn_x, turn_y = -dy, dx  # right turn on screen (y down)
        use_alt = pinch & (dx[alt] == turn_x) & (dy[alt] == turn_y)
        succ = np.where(use_alt, alt, succ)
    pred = np.empty_like(succ)
    pred[succ] = np.arange(succ.size)
    turn = (dx != dx[pred]) | (dy != dy[pred])  # vertex where the direction changes
    out: dict[int, list[list[np.ndarray]]] = {}
    shells: dict[int, list[tuple[int, np.ndarray]]] = {}  # (twice the area, ring)
    holes: dict[int, list[np.ndarray]] = {}
    any_pinch = bool(pinch.any())
    for ring in _cycles(succ):
        corners = ring[turn[ring]]
        traced = np.empty((corners.size + 1, 2), dtype=np.int64)
        traced[:-1, 0] = sx[corners]
        traced[:-1, 1] = sy[corners]
        traced[-1] = traced[0]
        label = int(ids[lab[ring[0]]])
        # a ring through a pinch twice goes round a pocket of background open to the outside
        # only diagonally: two rings, one of them a hole (one ring touching itself is invalid)
        split = any_pinch and bool(pinch[ring].any())
        for closed in _split_at_pinches(traced) if split else (traced,):
            xs, ys = closed[:, 0], closed[:, 1]
            area2 = int(np.dot(xs[:-1], ys[1:]) - np.dot(xs[1:], ys[:-1]))
            if area2 > 0:
                shells.setdefault(label, []).append((area2, closed))
            else:
                holes.setdefault(label, []).append(closed)
    for label, rings_out in shells.items():
        polys = [[shell] for _, shell in rings_out]
        # a hole belongs to the innermost piece around it: a piece may lie in another's hole
        smallest_first = sorted(range(len(polys)), key=lambda i: rings_out[i][0])
        for hole in holes.get(label, []):
            if len(polys) == 1:
                polys[0].append(hole)
                continue
            for i in smallest_first:
                if _inside((hole[0] + hole[1]) / 2.0, polys[i][0]):  # an edge midpoint
                    polys[i].append(hole)
                    break
            else:
                polys[0].append(hole)
        out[label] = polys
    return dict(sorted(out.items()))


def _compact_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, compact)``: the label values present (0 first) and ``labels`` padded by one
    pixel of 0, each value replaced by its index in ``ids``, ``(H + 2, W + 2) int32``."""
    padded = np.pad(labels, 1, mode="constant")
    top = int(padded.max(initial=0))
    if top < (1 << 24):
        present = np.zeros(top + 1, dtype=bool)
        present[padded.ravel()] = True
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int32)
        lut[ids] = np.arange(ids.size)
        return ids, lut[padded]
    ids, compact = np.unique(padded, return_inverse=True)
    return ids, compact.reshape(padded.shape).astype(np.int32)


def _pixel_edges(compact: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every boundary edge of the objects of ``compact`` (:func:`_compact_ids`), as
    ``(lab, sx, sy, dx, dy)`` int64 arrays: compact label, start (x, y) in image pixel-corner
    coordinates, direction (dx, dy); the object on the right (y down). Its temporaries, of
    the size of the image, go when it returns."""
    parts = []
    # horizontal pixel edges at y = r between padded rows r and r + 1 (image row r-1 / r)
    up, down = compact[:-1, :], compact[1:, :]
    r, c = np.nonzero(up != down)
    y = r
    x = c - 1  # padded column c is image column c - 1
    a, b = up[r, c], down[r, c]
    m = b > 0  # top edge of the lower pixel: left -> right
    parts.append((b[m], x[m], y[m], np.ones(m.sum(), np.int64), np.zeros(m.sum(), np.int64)))
    m = a > 0  # bottom edge of the upper pixel: right -> left
    parts.append((a[m], x[m] + 1, y[m], -np.ones(m.sum(), np.int64), np.zeros(m.sum(), np.int64)))
    left, right = compact[:, :-1], compact[:, 1:]
    r, c = np.nonzero(left != right)
    x = c
    y = r - 1
    a, b = left[r, c], right[r, c]
    m = b > 0  # left edge of the right pixel: bottom -> top
    parts.append((b[m], x[m], y[m] + 1, np.zeros(m.sum(), np.int64), -np.ones(m.sum(), np.int64)))
    m = a > 0  # right edge of the left pixel: top -> bottom
    parts.append((a[m], x[m], y[m], np.zeros(m.sum(), np.int64), np.ones(m.sum(), np.int64)))
    lab, sx, sy, dx, dy = (np.concatenate(p) for p in zip(*parts, strict=True))
    # int64: the keys of the edges (label x image size) pass 2**31 on large images
    return lab.astype(np.int64), sx, sy, dx, dy


def _close(points: np.ndarray) -> np.ndarray:
    """``(N, 2)`` ring vertices -> ``(N + 1, 2)``, the first repeated last."""
    return np.concatenate([points, points[:1]])


def _split_at_pinches(closed: np.ndarray) -> list[np.ndarray]:
    """The closed ring ``closed`` (``(N + 1, 2)``) cut into closed rings wherever it passes a
    vertex a second time, so none touches itself."""
    points = closed[:-1]
    rings = []
    path: list[int] = []
    where: dict[tuple[int, int], int] = {}
    for i, vertex in enumerate(map(tuple, points.tolist())):
        if vertex not in where:
            where[vertex] = len(path)
            path.append(i)
            continue
        start = where[vertex]
        loop = path[start:]
        rings.append(_close(points[loop]))
        for j in loop[1:]:
            del where[tuple(points[j].tolist())]
        del path[start + 1 :]
    rings.append(_close(points[path]))
    return rings


def _cycles(succ: np.ndarray) -> list[np.ndarray]:
    """Cycles of a permutation (``succ[i]`` follows ``i``), each as an index array."""
    nxt = succ.tolist()
    seen = bytearray(len(nxt))
    cycles = []
    for start in range(len(nxt)):
        if seen[start]:
            continue
        cycle = []
        i = start
        while not seen[i]:
            seen[i] = 1
            cycle.append(i)
            i = nxt[i]
        cycles.append(np.asarray(cycle, dtype=np.int64))
    return cycles


def _inside(point: np.ndarray, ring: np.ndarray) -> bool:
    """Even-odd rule: is ``point`` (x, y) inside the closed ``ring``?"""
    x, y = float(point[0]), float(point[1])
    x0, y0 = ring[:-1, 0], ring[:-1, 1]
    x1, y1 = ring[1:, 0], ring[1:, 1]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (x < xi)) % 2)


# ----------------------------------------------------------------------------- GeoJSON
def _number(value) -> float | int | None:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def to_geojson(
    labels: np.ndarray,
    table: pd.DataFrame,
    *,
    pixel_size_um: float | None,
    properties: dict | None = None,
) -> dict:
    """A GeoJSON ``FeatureCollection`` of the nuclei in ``table`` (one row per label).

    Each feature: exact pixel-edge ``Polygon``/``MultiPolygon`` in full-resolution pixel
    coordinates; ``properties``: ``objectType: "detection"``, ``classification`` (IHC class
    if the table has ``ihc_class``, else "Nucleus") and ``measurements`` (every numeric
    column, numbers only). ``properties`` (e.g. profile name/version) and ``pixel_size_um``
    are recorded on the collection (QuPath ignores them).
    """
    collection = {"type": "FeatureCollection", "features": list(_features(labels, table))}
    collection["mlseg"] = _collection_meta(pixel_size_um, properties)
    return collection


def geojson_text(
    labels: np.ndarray,
    table: pd.DataFrame,
    *,
    pixel_size_um: float | None,
    properties: dict | None = None,
) -> str:
    """``json.dumps(to_geojson(...), separators=(",", ":"))``, the same text, written one
    feature at a time: held all at once, the features' hundreds of thousands of coordinate
    lists kept Python's garbage collector busy for a third of the time."""
    encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps's, made once
    features = ",".join(map(encode, _features(labels, table)))
    meta = encode(_collection_meta(pixel_size_um, properties))
    return f'{{"type":"FeatureCollection","features":[{features}],"mlseg":{meta}}}'


def _collection_meta(pixel_size_um: float | None, properties: dict | None) -> dict:
    meta = dict(properties or {})
    meta["pixel_size_um"] = pixel_size_um
    return meta  # a foreign member: readers that do not know it skip it


def _features(labels: np.ndarray, table: pd.DataFrame) -> Iterator[dict]:
    """The GeoJSON features of :func:`to_geojson`, in the rows' order."""
    outlines = polygons(labels)
    columns = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    numbers = [(c, _numbers(table[c])) for c in columns]
    classes = table["ihc_class"].tolist() if "ihc_class" in columns else None
    for row, value in enumerate(table["label"].tolist() if len(table) else []):
        label = int(value)
        polys = outlines.get(label)
        if not polys:
            continue
        coords = [[ring.tolist() for ring in poly] for poly in polys]
        geometry = (
            {"type": "Polygon", "coordinates": coords[0]}
            if len(coords) == 1
            else {"type": "MultiPolygon", "coordinates": coords}
        )
        if classes is not None:
            name, colour = IHC_CLASSES[int(np.clip(classes[row], 0, 3))]
        else:
            name, colour = NUCLEUS_CLASS
        measurements = {c: v[row] for c, v in numbers if v[row] is not None}
        yield {
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "objectType": "detection",
                "name": f"nucleus {label}",
                "classification": {"name": name, "color": list(colour)},
                "measurements": measurements,
            },
        }


def _numbers(column: pd.Series) -> list:
    """A numeric column as JSON numbers: booleans and integers as ints, finite floats as
    floats, anything else (NaN, inf, a missing value) as None."""
    values = column.to_numpy()
    if values.dtype.kind == "b":
        return values.astype(np.int64).tolist()
    if values.dtype.kind in "iu":
        return values.tolist()
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        out = values.tolist()
        if not finite.all():
            for i in np.flatnonzero(~finite).tolist():
                out[i] = None
        return out
    return [_number(v) for v in column.tolist()]  # nullable (pandas extension) columns


# ----------------------------------------------------------------------------- writers
def labels_name(stem: str, n_labels: int) -> str:
    return f"{stem}_labels{labels_suffix(n_labels)}"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data) -> str:
    """JSON with NaN/inf as null and numpy scalars as numbers."""
    return json.dumps(_clean(data), indent=2, default=_json_default, allow_nan=False)


def _clean(value):
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def tag_table(table: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """The per-nucleus table with ``image``, ``profile`` and ``profile_version`` in front."""
    tagged = table.copy()
    for position, key in enumerate(("image", "profile", "profile_version")):
        tagged.insert(position, key, pd.Series([summary.get(key)] * len(table), dtype="string"))
    return tagged


#: Held in an output folder by the run writing into it (:func:`writing_to`); hidden, so never
#: read as an image.
RUN_LOCK = ".mlseg.lock"


@contextlib.contextmanager
def writing_to(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``out_dir`` (created) for one run at a time, by a lock file in it (:data:`RUN_LOCK`).

    A second run into the folder waits, saying so, for the first to end, then skips or redoes
    each image as a rerun would. Two runs at once at different settings (another model,
    another pixel size) wrote one image's files in turn, and left ``<stem>.json`` naming one
    run's settings beside tables measured at the other's, which every rerun then skipped as
    done. The lock ends with its process, so a killed run holds nothing; the temporaries of
    the files it was writing (:func:`mlseg.io.remove_leftovers`), a table of a large image's
    nuclei among them, and the staging folder of the run's record (the all-nuclei table), are
    removed as a later run takes the folder, once :data:`mlseg.io.LEFTOVER_AGE_S` old."""
    from filelock import FileLock, Timeout

    out_dir = Path(out_dir)
    lock = FileLock(out_dir / RUN_LOCK)
    with writes_named(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            warnings.warn(
                f"{out_dir}: another mlseg run is writing to this folder; waiting for it to end",
                stacklevel=3,
            )
            lock.acquire()
    try:
        remove_leftovers(out_dir)
        yield out_dir
    finally:
        lock.release()


def write_image_outputs(
    out_dir: str | Path,
    stem: str,
    image: np.ndarray,
    labels: np.ndarray,
    table: pd.DataFrame,
    summary: dict,
) -> dict:
    """Write every per-image output, ``<stem>.json`` (the summary plus ``outputs``) last.

    ``summary`` should carry ``image``, ``profile`` and ``profile_version`` (recorded in the
    tables, the GeoJSON and the JSON). Returns the summary as written.
    """
    return write_image_outputs_tagged(out_dir, stem, image, labels, table, summary)[0]


def write_image_outputs_tagged(
    out_dir: str | Path,
    stem: str,
    image: np.ndarray,
    labels: np.ndarray,
    table: pd.DataFrame,
    summary: dict,
) -> tuple[dict, pd.DataFrame]:
    """:func:`write_image_outputs`, returning also ``table`` as ``<stem>_nuclei.parquet``
    holds it (:func:`tag_table`), for the run's :data:`NUCLEI_TABLE`: a folder run tagged
    each table a second time, a millisecond or more an image."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record, earlier = out_dir / f"{stem}.json", earlier_record(out_dir, stem)
    # the marker of an earlier run goes first: outputs replaced one by one under it would
    # pass for that run's if this one stopped half-way (image_done). It is set aside, not
    # deleted, until this one's is in place: a redo that failed (disk full) lost the time the
    # image was new (first_finished_at), and the next run dated it now
    if record.is_dir() and not record.is_symlink():
        # set aside, a folder of that name was hidden under a name the user never gave
        with writes_named(record):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(record))
    with contextlib.suppress(FileNotFoundError):
        record.replace(earlier)
    n = int(labels.max(initial=0))
    names = {
        "labels": labels_name(stem, n),
        "overlay": f"{stem}_overlay.png",
        "csv": f"{stem}_nuclei.csv",
        "parquet": f"{stem}_nuclei.parquet",
        "geojson": f"{stem}_nuclei.geojson",
    }
    write_labels(out_dir / names["labels"], labels)
    # an earlier run's labels in the other format (its count on the other side of 65535)
    # would lie beside this run's tables as this image's
    for stale in {labels_name(stem, 0), labels_name(stem, 1 << 16)} - {names["labels"]}:
        (out_dir / stale).unlink(missing_ok=True)
    write_image(out_dir / names["overlay"], overlay(image, labels, class_lookup(table)))
    written = {**summary, "outputs": names}
    tagged = tag_table(table, summary)
    write_table(tagged, out_dir / names["csv"])
    # its <stem>.json in the footer: copied out alone, the table still names its image's
    # bytes, the model, the settings and the mlseg that made it
    write_table(tagged, out_dir / names["parquet"], metadata=_footer(written))
    provenance = {k: summary[k] for k in GEOJSON_PROVENANCE if k in summary}
    geojson = geojson_text(
        labels, table, pixel_size_um=summary.get("pixel_size_um"), properties=provenance
    )
    write_text(out_dir / names["geojson"], geojson)
    write_text(record, dumps(written))
    earlier.unlink(missing_ok=True)
    return written, tagged


def earlier_record(out_dir: str | Path, stem: str) -> Path:
    """Where :func:`write_image_outputs` keeps an image's earlier ``<stem>.json`` until the new
    one is written: hidden, so no image's record (hidden images are not read) and no
    temporary (:func:`mlseg.io.atomic_leftovers`); only :func:`first_finished_at` reads it."""
    return Path(out_dir) / f".{stem}.earlier.json"


def image_done(out_dir: str | Path, stem: str, expect: dict | None = None) -> dict | None:
    """The summary of a completed image, or None if it must be (re)done.

    Complete: ``<stem>.json`` parses, every output it lists exists and, for each
    ``expect`` key (e.g. profile version, model), the recorded value is equal.
    """
    out_dir = Path(out_dir)
    path = out_dir / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    outputs = summary.get("outputs") if isinstance(summary, dict) else None
    if not isinstance(outputs, dict) or not outputs:
        return None
    if not all((out_dir / str(name)).is_file() for name in outputs.values()):
        return None
    for key, value in (expect or {}).items():
        if summary.get(key) != value:
            return None
    return summary


def first_finished_at(out_dir: str | Path, stem: str, input_digest: str | None) -> str:
    """The ``finished_at`` of an image about to be written: that of its earlier ``<stem>.json``
    in ``out_dir`` (or, where a redo of it failed, the one it set aside: :func:`earlier_record`)
    where it recorded the same input bytes (a rerun that redoes the image for a new model,
    profile or settings), else now. It says when the image was new, which the drift
    monitor's window reads (:func:`mlseg.monitor.recent_images`); a new model redid and
    re-dated the whole inbox, so the next weekly check measured every image again."""
    record = Path(out_dir) / f"{stem}.json"
    if not record.is_file():
        record = earlier_record(out_dir, stem)
    earlier = None
    with contextlib.suppress(OSError, ValueError):
        earlier = json.loads(record.read_text())
    if (
        isinstance(earlier, dict)
        and input_digest
        and earlier.get("input_digest") == input_digest
        and isinstance(earlier.get("finished_at"), str)
        and earlier["finished_at"]
    ):
        return earlier["finished_at"]
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_nuclei(out_dir: str | Path, summary: dict) -> pd.DataFrame:
    """The per-nucleus table that an image's ``summary`` (its ``<stem>.json``) lists. One that
    cannot be read is named in a warning and counts as no nuclei."""
    name = (summary.get("outputs") or {}).get("parquet")
    if not name:
        return pd.DataFrame()
    path = Path(out_dir) / name
    try:
        return pd.read_parquet(path)
    except Exception as err:  # one damaged file must not cost the run its tables
        warnings.warn(
            f"{path}: unreadable ({err}); its nuclei are left out of the run's {NUCLEI_TABLE} and "
            f"histograms; delete {summary.get('image')}.json there to measure the image again",
            stacklevel=2,
        )
        return pd.DataFrame()


def nuclei_table(tables: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Every nucleus of a run: the per-image ``tables`` (as :func:`tag_table` makes them,
    ``image`` first) one after the other. The columns are all of theirs: a run with and
    without pixel sizes keeps ``area_um2`` and ``area_px``, each empty in the others' rows.
    An image without nuclei adds its columns, no rows; no table at all gives ``image`` alone."""
    tables = [t for t in tables if len(t.columns)]  # not those that could not be read
    if not tables:
        return pd.DataFrame({"image": pd.Series(dtype="string")})
    return pd.concat(tables, ignore_index=True)


#: Tables :class:`RunNuclei` keeps as one DataFrame, at most.
COMPACT_EVERY = 100


class RunNuclei:
    """The per-nucleus tables of a folder run's images, in their order, for its
    :data:`NUCLEI_TABLE` (:meth:`tables`, for :func:`nuclei_table`).

    :meth:`add` takes a measured image's table (as :func:`tag_table` makes it),
    :meth:`add_done` a skipped image's ``<stem>.json``, whose table is read only when the run
    file is written. Tables of the same columns and dtypes, one after the other, are kept as
    one DataFrame, :data:`COMPACT_EVERY` at most: a run kept every image's DataFrame to its
    end, and their pandas bookkeeping (index, blocks, the references of every column read)
    outweighed their few nuclei many times over, some 30 kB an image: a run of 20,000 tiles
    held a gigabyte more than one of 500. :func:`nuclei_table` makes the same table of them
    as of the tables one by one: pandas gives each column the common dtype of those it
    meets, and a group meets no dtype its tables did not have."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._parts: list[pd.DataFrame | dict] = []  # a dict: a skipped image's summary
        self._group: list[pd.DataFrame] = []

    def add(self, table: pd.DataFrame) -> None:
        """Keep a measured image's table, after the tables and images added before it."""
        if self._group and not _joins(self._group, table):
            self._close_group()
        self._group.append(table)
        if len(self._group) >= COMPACT_EVERY:
            self._close_group()

    def add_done(self, summary: dict) -> None:
        """Count a skipped image's table in, by its ``<stem>.json`` (:func:`read_nuclei`)."""
        self._close_group()
        self._parts.append(summary)

    def tables(self) -> Iterator[pd.DataFrame]:
        """The tables in order, those of skipped images read, and grouped, as they come."""
        self._close_group()
        for read, parts in itertools.groupby(self._parts, key=lambda p: isinstance(p, dict)):
            if read:
                yield from _grouped(read_nuclei(self.out_dir, summary) for summary in parts)
            else:
                yield from parts

    def _close_group(self) -> None:
        if self._group:
            self._parts.append(_joined(self._group))
            self._group = []


def _joins(group: list[pd.DataFrame], table: pd.DataFrame) -> bool:
    """Whether ``table`` joins ``group``: room left, and the same columns of the same dtypes."""
    first = group[0]
    return (
        len(group) < COMPACT_EVERY
        and first.columns.equals(table.columns)
        and first.dtypes.equals(table.dtypes)
    )


def _joined(group: list[pd.DataFrame]) -> pd.DataFrame:
    return group[0] if len(group) == 1 else pd.concat(group, ignore_index=True)


def _grouped(tables: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``tables``, those that :func:`_joins` one after the other as one DataFrame."""
    group: list[pd.DataFrame] = []
    for table in tables:
        if group and not _joins(group, table):
            yield _joined(group)
            group = []
        group.append(table)
    if group:
        yield _joined(group)


def _footer(record: dict) -> dict[str, str]:
    """A Parquet table's footer: the record of what made it, its times left out."""
    return {PROVENANCE_KEY: dumps({k: v for k, v in record.items() if k not in TIMING_KEYS})}


def read_record(path: str | Path) -> dict:
    """The record of what made an output: ``path`` is an output folder (its ``run.json``), a
    ``run.json`` or ``<stem>.json``, a Parquet table (the record in its footer, under
    :data:`PROVENANCE_KEY`) or an image's GeoJSON (its ``mlseg`` member). A file that holds
    none, or cannot be read, raises :class:`DatasetError` naming it and what to give."""
    path = Path(path)
    if path.is_dir():
        if not (path / "run.json").is_file():
            raise DatasetError(
                f"{path}: no run.json, so no finished run of mlseg segment or quantify wrote "
                "there; give one of its <stem>.json or tables"
            )
        path = path / "run.json"
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".json", ".geojson"):
        raise DatasetError(
            f"{path}: holds no record of what made it (a CSV or image has no place for one); "
            "give the output folder, its run.json, a <stem>.json or a .parquet table"
        )
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            footer = pq.read_schema(path).metadata or {}
            if PROVENANCE_KEY.encode() not in footer:
                raise DatasetError(
                    f"{path}: its footer holds no '{PROVENANCE_KEY}' record (a table mlseg did "
                    "not write, or an older mlseg's); give the <stem>.json beside it"
                )
            record = json.loads(footer[PROVENANCE_KEY.encode()])
        else:
            record = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and record.get("type") == "FeatureCollection":
                record = record.get(PROVENANCE_KEY)
    # ValueError: not Parquet (pyarrow's ArrowInvalid), not JSON or not UTF-8
    except (OSError, ValueError, RecursionError) as err:
        raise DatasetError(
            f"{path}: cannot be read ({err}); the file is damaged or no output of mlseg"
        ) from None
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: not a record of mlseg (a JSON object)")
    return record


def write_run_outputs(
    out_dir: str | Path,
    summaries: Sequence[dict],
    tables: Iterable[pd.DataFrame],
    run_info: dict,
) -> dict[str, Path]:
    """``summary.csv`` (one row per image), ``nuclei.parquet`` (:func:`nuclei_table` of
    ``tables``, one per image of ``summaries``), ``histograms.png`` and ``run.json``."""
    out_dir = Path(out_dir)
    nuclei = nuclei_table(tables)
    # all four or none: a disk that filled at the second left this run's summary.csv beside
    # the previous run's nuclei.parquet and run.json
    with written_together(out_dir) as staging:
        written = {
            "summary": write_table(summary_table(summaries), staging / RUN_FILES["summary"]),
            "nuclei": write_table(
                nuclei, staging / RUN_FILES["nuclei"], metadata=_footer(run_info)
            ),
            "histograms": plot_histograms(nuclei, staging / RUN_FILES["histograms"]),
            "run": write_text(staging / RUN_FILES["run"], dumps(run_info)),
        }
    return {key: out_dir / path.name for key, path in written.items()}


def summary_table(summaries: Sequence[dict]) -> pd.DataFrame:
    """``summary.csv``: one row per image of ``summaries``, their values that are not lists
    or mappings. A run where every image failed still gets a table a reader can open."""
    rows = [{k: v for k, v in s.items() if not isinstance(v, (dict, list))} for s in summaries]
    return pd.DataFrame(rows or None, columns=None if rows else ["image"])


def update_run_outputs(
    out_dir: str | Path,
    summaries: Sequence[dict],
    tables: Callable[[], Iterable[pd.DataFrame]],
    run_info: dict,
    *,
    redone: bool,
) -> dict[str, Path]:
    """The run files of a run over ``summaries``, as :func:`write_run_outputs` writes them
    from ``tables()`` (called only then). Where no image was measured in the run (``redone``
    false) and the folder's files hold exactly these images (:func:`run_outputs_current`),
    only ``run.json`` is written, and ``nuclei.parquet`` again from its own rows where its
    footer (the record without its times) changed: a rerun on a folder of finished images
    read every image's table to write the same tables and histograms again (seconds for a
    few hundred images). The files kept keep their file times, those of the run that wrote
    them; ``run.json`` gives this run's times and lists, as a full rewrite does."""
    if not redone and run_outputs_current(out_dir, summaries, run_info):
        return _rewrite_run_record(Path(out_dir), run_info)
    return write_run_outputs(out_dir, summaries, tables(), run_info)


def run_outputs_current(out_dir: str | Path, summaries: Sequence[dict], run_info: dict) -> bool:
    """Whether ``summary.csv``, ``nuclei.parquet`` and ``histograms.png`` in ``out_dir`` are
    what :func:`write_run_outputs` would write from ``summaries`` (each image's
    ``<stem>.json``) and the nuclei tables they list as those are now, ``run_info`` aside.

    So they are where the four files are there, as one set: none of the other three is newer
    than ``run.json`` (a set whose writer was killed half moved into place: ``summary.csv``,
    moved last, is then the older set's) and ``nuclei.parquet``'s footer is ``run.json``'s
    record (the same, where file times are too coarse to tell); ``run.json`` names this
    mlseg and these packages (:data:`WRITER_KEYS`), the table and the histograms this
    pyarrow and this matplotlib; ``summary.csv`` holds, byte for byte, these summaries (the
    same images in the same order, with the same input digests, settings, model and counts:
    an image removed, failed, or redone since by a run stopped before its run files changes
    it); no image's nuclei table is newer than ``summary.csv`` (one redone or edited since);
    and ``nuclei.parquet`` has as many rows as the images have nuclei (a table unreadable
    when it was written, whose image :func:`read_nuclei` names again in a full rewrite)."""
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in RUN_FILES.items()}
    try:
        times = {key: path.stat() for key, path in paths.items()}
        written = times["run"].st_mtime_ns
        if any(times[key].st_mtime_ns > written for key in ("summary", "nuclei", "histograms")):
            return False
        record = json.loads(paths["run"].read_text())
        footer, rows, parquet_writer = _parquet_footer(paths["nuclei"])
        tables = [out_dir / s["outputs"]["parquet"] for s in summaries]
        return (
            footer == {k: v for k, v in record.items() if k not in TIMING_KEYS}
            and all(record.get(key) == run_info.get(key) for key in WRITER_KEYS)
            and parquet_writer == _PARQUET_WRITER.format(version=_version("pyarrow"))
            and _PNG_WRITER.format(version=_version("matplotlib")).encode()
            in _head(paths["histograms"])
            and rows == sum(int(s["count"]) for s in summaries)
            and paths["summary"].read_bytes() == _csv_bytes(summary_table(summaries))
            and all(p.stat().st_mtime_ns <= times["summary"].st_mtime_ns for p in tables)
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False  # a file missing or not as mlseg writes it: written again


#: What a Parquet file written by pyarrow, and a PNG drawn by matplotlib, say wrote them.
_PARQUET_WRITER = "parquet-cpp-arrow version {version}"
_PNG_WRITER = "Matplotlib version{version},"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of a file: a PNG's text chunks, before its pixels."""
    with path.open("rb") as fh:
        return fh.read(size)


def _parquet_footer(path: Path) -> tuple[object, int, str]:
    """The record in a Parquet file's footer (:data:`PROVENANCE_KEY`, parsed; None where it
    has none), its number of rows and what wrote it, the footer alone read."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except Exception as err:  # pyarrow's errors of a damaged file are no OSError
        raise ValueError(f"{path}: {err}") from err
    text = (meta.metadata or {}).get(PROVENANCE_KEY.encode())
    return (json.loads(text) if text is not None else None), meta.num_rows, meta.created_by


def _csv_bytes(table: pd.DataFrame) -> bytes:
    """The bytes :func:`mlseg.io.write_table` writes for ``table`` as CSV."""
    import io

    buffer = io.BytesIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()


def _rewrite_run_record(out_dir: Path, run_info: dict) -> dict[str, Path]:
    """``run.json`` of ``run_info`` and, where its footer says another record,
    ``nuclei.parquet`` with ``run_info``'s (its rows as they are), as one set; the paths of
    the four run files, as :func:`write_run_outputs` returns them."""
    import pyarrow.parquet as pq

    footer = _footer(run_info)
    nuclei = out_dir / RUN_FILES["nuclei"]
    with written_together(out_dir) as staging:
        if _parquet_footer(nuclei)[0] != json.loads(footer[PROVENANCE_KEY]):
            table = pq.read_table(nuclei)
            metadata = {
                **(table.schema.metadata or {}),
                **{k.encode(): v.encode() for k, v in footer.items()},
            }
            # as write_table writes a table with a footer: the same bytes as a full rewrite
            with atomic_path(staging / RUN_FILES["nuclei"]) as tmp:
                pq.write_table(table.replace_schema_metadata(metadata), tmp)
        write_text(staging / RUN_FILES["run"], dumps(run_info))
    return {key: out_dir / name for key, name in RUN_FILES.items()}


def histogram_columns(columns: list[str]) -> list[str]:
    """The measurements of a nucleus table that :func:`plot_histograms` draws: those of
    :data:`HISTOGRAM_COLUMNS` in their units (both, microns and pixels, in a run where only
    some images have a pixel size), then the mean optical density of each of the profile's
    stains in its order, the residual left out."""
    chosen = []
    for base in HISTOGRAM_COLUMNS:
        match = [c for c in columns if c == base or c.startswith(base + "_")]
        chosen.extend(c for c in match if c.split(base, 1)[1] in ("", "_um", "_um2", "_px"))
    return chosen + [
        c
        for c in columns
        if c.endswith("_od_mean") and c.removesuffix("_od_mean") not in RESIDUAL_STAINS
    ]


def plot_histograms(nuclei: pd.DataFrame, path: str | Path) -> Path:
    """Histograms of the main measurements over all ``nuclei`` of a run (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = nuclei if len(nuclei) else pd.DataFrame()  # no rows: "no nuclei"
    columns = histogram_columns(list(data.columns))
    n = max(1, len(columns))
    ncols = min(3, n)
    nrows = int(math.ceil(n / ncols))
    fig = Figure(figsize=(4 * ncols, 3 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    if not columns:
        axes[0].text(0.5, 0.5, "no nuclei", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, column in zip(axes, columns, strict=False):
        values = data[column].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        ax.hist(values, bins=50, color="#4c72b0")
        ax.set_title(f"{column} (n={values.size})", fontsize=9)
    for ax in axes[len(columns) :]:
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
