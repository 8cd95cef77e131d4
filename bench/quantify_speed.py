"""Speed of ``mlseg.quantify.measure`` against plain scikit-image, on the same real images.

Baseline: ``skimage.color.rgb2hed`` + ``skimage.measure.regionprops_table`` with the same
measurements (label, centroid, bbox, area, Crofton perimeter, equivalent diameter, major and
minor axis, eccentricity, orientation, solidity, extent, max Feret, and mean/max of the three
stain densities and the three RGB channels; circularity and integrated densities derived
from those columns). Ours also gives the min Feret, which scikit-image has no property for.

Images and ground-truth instance masks come from ``../shared/data`` (``cpm15_he``: 15 H&E
tiles up to 1032 x 808; ``gbm40_he``: 40 H&E tiles of 512 x 512) and are read before timing.
Both methods run interleaved ``--repeats`` times; the best time of each is kept (the machine
is shared). Prints nuclei/s for both and the ratio (goal: >= 10), then one JSON line.

    python bench/quantify_speed.py [--sets cpm15_he gbm40_he] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASELINE_PROPERTIES = (
    "label",
    "centroid",
    "bbox",
    "area",
    "perimeter_crofton",
    "equivalent_diameter_area",
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "orientation",
    "solidity",
    "extent",
    "feret_diameter_max",
    "intensity_mean",
    "intensity_max",
)


def load(sets: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    from mlseg.io import read_image, read_mask

    pairs = []
    for name in sets:
        for mask in sorted((DATA / name / "masks").glob("*_mask.png")):
            image = DATA / name / "original" / mask.name.replace("_mask", "")
            pairs.append((read_mask(mask), read_image(image)))
    return pairs


def baseline(labels: np.ndarray, image: np.ndarray) -> int:
    import pandas as pd
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table

    hed = rgb2hed(image)
    intensity = np.concatenate([hed, image.astype(np.float64)], axis=-1)
    table = pd.DataFrame(
        regionprops_table(labels, intensity_image=intensity, properties=BASELINE_PROPERTIES)
    )
    table["circularity"] = np.minimum(
        4 * np.pi * table["area"] / table["perimeter_crofton"] ** 2, 1.0
    )
    for k in range(3):
        table[f"integrated-{k}"] = table[f"intensity_mean-{k}"] * table["area"]
    return len(table)


def ours(labels: np.ndarray, image: np.ndarray, profile) -> int:
    from mlseg.quantify import measure

    return len(measure(labels, image, profile, pixel_size_um=None))


def timed(fn, pairs) -> tuple[float, int]:
    start = time.perf_counter()
    nuclei = sum(fn(labels, image) for labels, image in pairs)
    return time.perf_counter() - start, nuclei


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["cpm15_he", "gbm40_he"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"real data not found at {DATA}; nothing to measure", file=sys.stderr)
        return 1
    from mlseg.config import get_profile

    profile = get_profile("he")
    pairs = load(args.sets)
    megapixels = sum(labels.size for labels, _ in pairs) / 1e6
    print(f"{len(pairs)} images ({megapixels:.1f} MP) from {', '.join(args.sets)}")
    ours(*pairs[0], profile)  # warm caches and imports
    baseline(*pairs[0])
    best_ours = best_base = float("inf")
    nuclei = 0
    for repeat in range(args.repeats):
        t_ours, nuclei = timed(lambda lab, img: ours(lab, img, profile), pairs)
        t_base, n_base = timed(baseline, pairs)
        assert n_base == nuclei, "both must measure every nucleus"
        best_ours, best_base = min(best_ours, t_ours), min(best_base, t_base)
        print(
            f"run {repeat + 1}: ours {nuclei / t_ours:,.0f} nuclei/s, "
            f"skimage {nuclei / t_base:,.0f} nuclei/s, ratio {t_base / t_ours:.1f}"
        )
    print(
        f"quantify: ours {nuclei / best_ours:,.0f} nuclei/s, skimage baseline "
        f"{nuclei / best_base:,.0f} nuclei/s ({nuclei} nuclei, best of {args.repeats}); "
        f"ratio {best_base / best_ours:.1f} (goal >= 10)"
    )
    result = {
        "bench": "quantify_speed",
        "images": len(pairs),
        "nuclei": nuclei,
        "ours_nuclei_per_s": round(nuclei / best_ours, 1),
        "baseline_nuclei_per_s": round(nuclei / best_base, 1),
        "ratio": round(best_base / best_ours, 2),
        "goal": 10,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
