"""Speed of writing the per-image GeoJSON (``mlseg.outputs.geojson_text``) against the way
mlseg wrote it before the thirty-third session, on the same real images.

Baseline: the collection built whole (every feature, its measurements read row by row
through ``DataFrame.to_dict(orient="records")`` and cleaned value by value), then
``json.dumps(collection, separators=(",", ":"))``. Ours: the measurements cleaned column by
column and each feature encoded as it is made (``geojson_text``). Both give the same text,
checked on every image. The nuclei are the ground-truth masks of ``../shared/data``
(``cpm15_he``, ``gbm40_he``), measured with the ``he`` profile before timing. Both methods
run interleaved ``--repeats`` times; the best time of each is kept (the machine may be
shared), wall-clock and CPU time of this process alike (CPU time moves less with other
jobs on the machine). Prints nuclei/s for both and the ratios, then one JSON line.

    python bench/geojson_speed.py [--sets cpm15_he gbm40_he] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(sets: list[str]) -> list[tuple[np.ndarray, object]]:
    from mlseg.config import get_profile
    from mlseg.io import read_image, read_mask
    from mlseg.quantify import measure

    profile = get_profile("he")
    items = []
    for name in sets:
        for mask in sorted((DATA / name / "masks").glob("*_mask.png")):
            labels = read_mask(mask).astype(np.int32)
            image = read_image(DATA / name / "original" / mask.name.replace("_mask", ""))
            items.append((labels, measure(labels, image, profile, pixel_size_um=0.25)))
    return items


def baseline(labels, table, pixel_size_um, properties) -> str:
    """mlseg's GeoJSON as ``to_geojson`` built it and ``write_image_outputs`` wrote it."""
    import pandas as pd

    from mlseg.outputs import IHC_CLASSES, NUCLEUS_CLASS, _number, polygons

    outlines = polygons(labels)
    columns = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    records = table[columns].to_dict(orient="records")
    features = []
    for record in records:
        label = int(record["label"])
        polys = outlines.get(label)
        if not polys:
            continue
        coords = [[ring.tolist() for ring in poly] for poly in polys]
        geometry = (
            {"type": "Polygon", "coordinates": coords[0]}
            if len(coords) == 1
            else {"type": "MultiPolygon", "coordinates": coords}
        )
        if "ihc_class" in record:
            name, colour = IHC_CLASSES[int(np.clip(record["ihc_class"], 0, 3))]
        else:
            name, colour = NUCLEUS_CLASS
        measurements = {}
        for key, value in record.items():
            number = _number(value)
            if number is not None:
                measurements[key] = number
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "name": f"nucleus {label}",
                    "classification": {"name": name, "color": list(colour)},
                    "measurements": measurements,
                },
            }
        )
    collection = {"type": "FeatureCollection", "features": features}
    meta = dict(properties or {})
    meta["pixel_size_um"] = pixel_size_um
    collection["mlseg"] = meta
    return json.dumps(collection, separators=(",", ":"))


def ours(labels, table, pixel_size_um, properties) -> str:
    from mlseg.outputs import geojson_text

    return geojson_text(labels, table, pixel_size_um=pixel_size_um, properties=properties)


def timed(fn, items) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn`` over ``items``."""
    start, cpu = time.perf_counter(), time.process_time()
    for labels, table in items:
        fn(labels, table, 0.25, {"image": "x", "profile": "he"})
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["cpm15_he", "gbm40_he"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"real data not found at {DATA}; nothing to measure", file=sys.stderr)
        return 1
    items = load(args.sets)
    nuclei = sum(len(table) for _, table in items)
    print(f"{len(items)} images, {nuclei} nuclei from {', '.join(args.sets)}")
    for labels, table in items:  # the same text, byte for byte
        meta = {"image": "x", "profile": "he"}
        assert ours(labels, table, 0.25, meta) == baseline(labels, table, 0.25, meta)
    best_ours = best_base = best_ours_cpu = best_base_cpu = float("inf")
    for repeat in range(args.repeats):
        (t_ours, c_ours), (t_base, c_base) = timed(ours, items), timed(baseline, items)
        best_ours, best_base = min(best_ours, t_ours), min(best_base, t_base)
        best_ours_cpu, best_base_cpu = min(best_ours_cpu, c_ours), min(best_base_cpu, c_base)
        print(
            f"run {repeat + 1}: ours {nuclei / t_ours:,.0f} nuclei/s, "
            f"before {nuclei / t_base:,.0f} nuclei/s, ratio {t_base / t_ours:.2f} "
            f"(CPU time {c_base / c_ours:.2f})"
        )
    print(
        f"geojson: ours {nuclei / best_ours:,.0f} nuclei/s ({best_ours:.2f} s), before "
        f"{nuclei / best_base:,.0f} nuclei/s ({best_base:.2f} s), best of {args.repeats}; "
        f"ratio {best_base / best_ours:.2f}; CPU time {best_ours_cpu:.2f} s against "
        f"{best_base_cpu:.2f} s, ratio {best_base_cpu / best_ours_cpu:.2f}"
    )
    result = {
        "bench": "geojson_speed",
        "images": len(items),
        "nuclei": nuclei,
        "ours_nuclei_per_s": round(nuclei / best_ours, 1),
        "baseline_nuclei_per_s": round(nuclei / best_base, 1),
        "ratio": round(best_base / best_ours, 2),
        "cpu_ratio": round(best_base_cpu / best_ours_cpu, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
