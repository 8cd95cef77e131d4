"""Does the model find DAB-positive nuclei as often as negative ones on an IHC slide?

An IHC readout (the Ki-67 index, ``positive_pct`` and the H-score of ``mlseg segment
--profile ihc``) is only as good as the nuclei it is counted over: a model that misses the
positive nuclei reports too low an index. No shared set is IHC, so this script makes
pseudo-IHC from labelled H&E: each tile is unmixed into haematoxylin and eosin (the ``ihc``
profile's stain vectors), the eosin is dropped, and a random ``--positive`` share of the
annotated nuclei gets nuclear DAB (a level drawn uniformly in 0.25-0.8 optical density,
blurred by 1 px, with texture) while their haematoxylin is weakened by 30%, as DAB hides the
counterstain. The truth is known per nucleus.

Each tile is segmented as H&E (the untouched tile: the baseline) and as pseudo-IHC with the
``ihc`` profile under each ``preprocess.ihc_dab`` mode (``eosin``: Macenko puts DAB in eosin's
place; ``nucleus``: DAB also counts as haematoxylin). Prints per tile and on average the
object recall (IoU >= 0.5) of the positive and the negative nuclei, and the positive share
mlseg measures over its own nuclei against the true share; ends with one JSON line.

    python bench/ihc_positivity.py --model DIR [--data ../shared/data/cpm15_he]
        [--pixel-sizes bench/data/cpm15_he_pixel_sizes.csv] [--positive 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mlseg.io import read_image, read_mask  # noqa: E402
from mlseg.metrics import contingency  # noqa: E402
from mlseg.model import load_model  # noqa: E402
from mlseg.segment import _load_profile, predict_labels_scaled, quantify_image  # noqa: E402

MODES = ("eosin", "nucleus")


def pseudo_ihc(rgb: np.ndarray, truth: np.ndarray, positive: np.ndarray, vectors, rng):
    """The tile re-stained as haematoxylin + DAB, DAB in the ``positive`` labels."""
    import cv2

    v = np.asarray(vectors, float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    od = -np.log10((rgb.astype(float) + 1) / 256)
    haem = np.clip(od @ np.linalg.inv(v), 0, None)[..., 0]
    dab = np.zeros(truth.shape)
    for label in positive:
        dab[truth == label] = rng.uniform(0.25, 0.8)
    dab = cv2.GaussianBlur(dab, (0, 0), 1.0) * (0.8 + 0.4 * rng.random(dab.shape))
    haem = haem * np.where(dab > 0.05, 0.7, 1.0)
    out = haem[..., None] * v[0] + dab[..., None] * v[2]
    return np.clip(np.round(255 * 10.0**-out), 0, 255).astype(np.uint8)


def found(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Whether each annotated nucleus (in label order) has a prediction at IoU >= 0.5."""
    ti, pi, inter, true_area, pred_area = contingency(pred, truth)
    iou = inter / (true_area[ti] + pred_area[pi] - inter)
    hit = np.zeros(true_area.size, bool)
    hit[ti[iou >= 0.5]] = True
    return hit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/cpm15_he"))
    parser.add_argument("--pixel-sizes", default=str(REPO / "bench/data/cpm15_he_pixel_sizes.csv"))
    parser.add_argument("--positive", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device="cpu")
    he, ihc = _load_profile("he", None, None), _load_profile("ihc", None, None)
    sizes = pd.read_csv(args.pixel_sizes).set_index("stem")["pixel_size_um"].to_dict()
    models = {
        mode: dataclasses.replace(
            loaded,
            config=loaded.config.model_copy(
                update={"preprocess": loaded.config.preprocess.model_copy(update={"ihc_dab": mode})}
            ),
        )
        for mode in MODES
    }
    rng = np.random.default_rng(args.seed)
    rows = []
    for path in sorted(Path(args.data, "original").iterdir()):
        truth = read_mask(Path(args.data, "masks", f"{path.stem}_mask.png"))
        rgb = read_image(path)
        labels = np.unique(truth)[1:]
        positive = labels[rng.random(labels.size) < args.positive]
        is_pos = np.isin(labels, positive)
        stained = pseudo_ihc(rgb, truth, positive, ihc.stain_vectors, rng)
        px = sizes.get(path.stem)
        runs = [("H&E", loaded, rgb, he)] + [(f"IHC {m}", models[m], stained, ihc) for m in MODES]
        for name, model, image, profile in runs:
            pred, _, _ = predict_labels_scaled(model, image, profile, pixel_size_um=px)
            hit = found(truth, pred)
            _, summary = quantify_image(stained, pred, ihc, pixel_size_um=px)
            row = {
                "image": path.stem,
                "run": name,
                "nuclei": labels.size,
                "recall_positive": hit[is_pos].mean(),
                "recall_negative": hit[~is_pos].mean(),
                "true_positive_pct": 100 * is_pos.mean(),
                "measured_positive_pct": summary.get("positive_pct") if name != "H&E" else None,
            }
            rows.append(row)
            print(
                " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )
    table = pd.DataFrame(rows)
    means = table.groupby("run", sort=False)[
        ["recall_positive", "recall_negative", "true_positive_pct", "measured_positive_pct"]
    ].mean()
    print(means.round(3).to_string())
    result = {"bench": "ihc_positivity", "model": args.model, "tiles": int(table.image.nunique())}
    for run, mean in means.iterrows():
        key = run.replace(" ", "_").replace("&", "").lower()
        result.update({f"{key}_{k}": round(float(v), 3) for k, v in mean.items() if pd.notna(v)})
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
