"""Masks from other tools: does ``mlseg ingest`` draw them back exactly, and at what cost?

Every mask of the chosen shared sets is written in the formats other labs bring
(:mod:`mlseg.annotations`): QuPath GeoJSON (mlseg's own ``to_geojson``: exact pixel-edge
polygons, what QuPath imports and exports again), Aperio ImageScope XML (the same polygons as
``Region`` vertices, as MoNuSeg ships; holes as negative regions, which also erase a nucleus
drawn earlier inside the hole) and the DSB 2018 layout (one PNG per nucleus). Each
source is ingested; the script prints, per format, how many masks came back exactly (labels
renumbered 1..n in the mask's own order), how many with the same pixels in the same nuclei
(ImageScope has no multi-part region, so the pieces of a nucleus that touch only diagonally
come back as nuclei of their own: the objects column counts them), and the ingest time as a
ratio to ingesting the plain PNG masks in the same run.

    python bench/ingest_formats.py                        # all three shared sets
    python bench/ingest_formats.py --sets dsb2018_stage1_test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from xml.sax.saxutils import quoteattr

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from skimage.segmentation import relabel_sequential  # noqa: E402

from mlseg.dataset import mask_to_labels  # noqa: E402
from mlseg.ingest import ingest  # noqa: E402
from mlseg.io import read_mask, write_image  # noqa: E402
from mlseg.outputs import polygons, to_geojson  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SETS = ("gbm40_he", "cpm15_he", "dsb2018_stage1_test")


def imagescope_xml(labels: np.ndarray) -> str:
    """One ``Region`` per polygon of each label, its holes as negative regions after it."""
    regions = []
    for label, polys in polygons(labels).items():
        for poly in polys:
            for k, ring in enumerate(poly):
                vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in ring[:-1])
                regions.append(
                    f'<Region Id={quoteattr(str(label))} Type="0" NegativeROA="{int(k > 0)}">'
                    f"<Vertices>{vertices}</Vertices></Region>"
                )
    return (
        '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>'
        + "".join(regions)
        + "</Regions></Annotation></Annotations>"
    )


def build(sources: list[Path], out: Path) -> dict[str, np.ndarray]:
    """Write the flat, GeoJSON, XML and DSB sources under ``out``; return the truth."""
    truths = {}
    for src in sources:
        for mask_path in sorted((src / "masks").glob("*_mask.png")):
            stem = f"{src.name}-{mask_path.name[: -len('_mask.png')]}"
            image = next((src / "original").glob(mask_path.name[: -len("_mask.png")] + ".*"))
            truth, _, _ = relabel_sequential(mask_to_labels(read_mask(mask_path)))
            truths[stem] = truth
            for layout in ("flat", "geojson", "xml"):
                (out / layout / "original").mkdir(parents=True, exist_ok=True)
                (out / layout / "masks").mkdir(parents=True, exist_ok=True)
                (out / layout / "original" / f"{stem}{image.suffix}").symlink_to(image.resolve())
            (out / "flat" / "masks" / f"{stem}_mask.png").symlink_to(mask_path.resolve())
            table = pd.DataFrame({"label": np.arange(1, truth.max() + 1)})
            collection = to_geojson(truth, table, pixel_size_um=None)
            (out / "geojson" / "masks" / f"{stem}.geojson").write_text(json.dumps(collection))
            (out / "xml" / "masks" / f"{stem}.xml").write_text(imagescope_xml(truth))
            case = out / "dsb" / stem
            (case / "images").mkdir(parents=True)
            (case / "images" / f"{stem}{image.suffix}").symlink_to(image.resolve())
            (case / "masks").mkdir()
            for i in range(1, truth.max() + 1):
                write_image(case / "masks" / f"{i:05d}.png", (truth == i).astype(np.uint8) * 255)
    return truths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated shared sets")
    args = parser.parse_args()
    sources = [DATA / name for name in args.sets.split(",")]
    with tempfile.TemporaryDirectory(prefix="mlseg-ingest-bench-") as tmp:
        out = Path(tmp)
        truths = build(sources, out / "src")
        n_nuclei = sum(int(t.max()) for t in truths.values())
        print(f"{len(truths)} masks, {n_nuclei:,} nuclei from {args.sets}")
        baseline = None
        formats = {}
        for layout in ("flat", "geojson", "xml", "dsb"):
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = ingest(out / "src" / layout, out / layout, progress=False)
            seconds = time.perf_counter() - start
            baseline = baseline or seconds
            manifest = result.manifest.set_index("stem")
            exact = same_pixels = pieces = 0
            for stem, truth in truths.items():
                drawn = read_mask(out / layout / manifest.loc[stem, "mask"])
                exact += np.array_equal(drawn, truth)
                # each drawn object inside one true nucleus, covering the same pixels
                pairs = np.unique(np.stack([drawn.ravel(), truth.ravel()]), axis=1)
                one_each = np.unique(pairs[0]).size == pairs.shape[1]
                same_pixels += one_each and np.array_equal(drawn > 0, truth > 0)
                pieces += int(drawn.max()) - int(truth.max())
            notes = f"; {len(caught)} warning(s)" if caught else ""
            print(
                f"{layout:8s} exact {exact}/{len(truths)}, same pixels {same_pixels}/"
                f"{len(truths)}, {pieces:+d} objects  {seconds:6.2f} s  "
                f"x{seconds / baseline:5.1f} of flat PNG masks{notes}"
            )
            formats[layout] = {
                "exact": exact,
                "same_pixels": same_pixels,
                "objects_gained": pieces,
                "seconds": round(seconds, 2),
                "ratio_to_flat": round(seconds / baseline, 2),
            }
        result = {"bench": "ingest_formats", "sets": args.sets, "masks": len(truths)}
        print(json.dumps(result | {"nuclei": n_nuclei, "formats": formats}))


if __name__ == "__main__":
    main()
