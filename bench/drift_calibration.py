"""How often `mlseg monitor`'s drift check alarms, on real images, with and without drift.

A fingerprint is made (as `mlseg validate` makes it) from a random half of one lab's
images; batches of new images are then drawn, without replacement, from:

- ``same``: the other half of that lab's images (no drift: every alarm is a false one);
- ``other_lab``: another lab's images of the same stain (``--other``, e.g. CPM15 vs GBM40);
- ``fluorescence``: the fluorescence tiles of DSB 2018 (``--fluorescence``);
- ``blur`` / ``jpeg`` / ``dark`` / ``cast``: the held-out half degraded (Gaussian blur
  sigma 2, JPEG quality 30, intensities x0.6, a yellow cast: RGB gains 1.05, 1.0, 0.85).

Each image's statistics are computed once and the draws resample that table, so a run
costs a minute or two. Printed per condition and batch size: the share of draws whose
status is ``warn`` or worse and ``fail``, and the same without the image-size row (another
lab's tiles differ in size, which alone warns). The default :class:`MonitorConfig` is used.

Run: ``python bench/drift_calibration.py [--data ../shared/data] [--draws 40] [--train N]
[--sizes 1,3,5,10,20,50] [--train-set gbm40_he] [--other cpm15_he]
[--fluorescence dsb2018_stage1_test]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlseg.config import MonitorConfig  # noqa: E402
from mlseg.inventory import content_hash, fingerprint, image_stats  # noqa: E402
from mlseg.io import read_image  # noqa: E402
from mlseg.monitor import STATUS_ORDER, drift_report  # noqa: E402


def _blur(im: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(im, (0, 0), 2.0)


def _jpeg(im: np.ndarray) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _dark(im: np.ndarray) -> np.ndarray:
    return (im.astype(np.float32) * 0.6).round().astype(np.uint8)


def _cast(im: np.ndarray) -> np.ndarray:
    gains = np.array([1.05, 1.0, 0.85], np.float32)
    return np.clip(im.astype(np.float32) * gains, 0, 255).round().astype(np.uint8)


DEGRADATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "blur": _blur,
    "jpeg": _jpeg,
    "dark": _dark,
    "cast": _cast,
}


def _row(name: str, im: np.ndarray) -> dict:
    im = im if im.ndim == 3 else im[..., None]
    return {
        "image": name,
        "width_px": int(im.shape[1]),
        "height_px": int(im.shape[0]),
        "channels": int(im.shape[2]),
        "dtype": str(im.dtype),
        "content_hash": content_hash(im),
        **image_stats(im),
    }


def stats_tables(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """Per-image statistics of every set and degradation (one row per image)."""
    root = Path(args.data)
    train = sorted((root / args.train_set / "original").glob("*.png"))
    tables: dict[str, list[dict]] = {"same": [], **{k: [] for k in DEGRADATIONS}}
    for path in train:
        im = read_image(path)
        tables["same"].append(_row(path.name, im))
        for kind, degrade in DEGRADATIONS.items():
            tables[kind].append(_row(path.name, degrade(im)))
    out = {k: pd.DataFrame(v) for k, v in tables.items()}
    if args.other:
        paths = sorted((root / args.other / "original").glob("*.png"))
        out["other_lab"] = pd.DataFrame([_row(p.name, read_image(p)) for p in paths])
    if args.fluorescence:
        folder = root / args.fluorescence
        # modality_guess holds an unquoted comma ("fluorescence(gray,dark bg)"): read lines
        lines = (folder / "index.csv").read_text().splitlines()[1:]
        ids = [line.split(",")[0] for line in lines if ",fluorescence" in line]
        paths = [folder / "original" / f"{i}.png" for i in ids]
        out["fluorescence"] = pd.DataFrame([_row(p.name, read_image(p)) for p in paths])
    return out


def _fingerprint(rows: pd.DataFrame) -> dict:
    files = rows.assign(role="image", readable=True, split="train")
    return fingerprint(files)


def _worst(table: pd.DataFrame, without: tuple[str, ...] = ()) -> str:
    statuses = table.loc[~table["statistic"].isin(without), "status"]
    worst = max(statuses, key=lambda s: STATUS_ORDER[s], default="ok")
    return "ok" if worst == "skipped" else worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--train-set", default="gbm40_he")
    parser.add_argument("--other", default="cpm15_he")
    parser.add_argument("--fluorescence", default="dsb2018_stage1_test")
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--sizes", default="1,3,5,10,20,50")
    parser.add_argument("--train", type=int, help="training images per draw (default: half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="pickle of the statistics tables (made if absent)")
    args = parser.parse_args()
    if not (Path(args.data) / args.train_set / "original").is_dir():
        sys.exit(f"{args.data}/{args.train_set}/original: not found; give --data")
    if args.cache and Path(args.cache).is_file():
        tables = pd.read_pickle(args.cache)
    else:
        tables = stats_tables(args)
        if args.cache:
            pd.to_pickle(tables, args.cache)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    cfg = MonitorConfig()
    n = len(tables["same"])
    n_train = args.train or n // 2
    records = []
    alarms: dict[tuple[str, str], int] = {}
    for _draw in range(args.draws):
        order = rng.permutation(n)
        train, held = order[:n_train], order[n_train:]
        fp = _fingerprint(tables["same"].iloc[train])
        for condition, table in tables.items():
            pool = np.arange(len(table)) if condition in ("other_lab", "fluorescence") else held
            for size in sizes:
                if size > len(pool):
                    continue
                batch = table.iloc[rng.choice(pool, size, replace=False)]
                report = drift_report(batch, fp, cfg)
                tested = report.table["p_value"].notna()
                alpha = cfg.p_value / max(1, int(tested.sum()))  # Bonferroni, as drift_report
                for r in report.table.itertuples():
                    if r.status in ("warn", "fail"):
                        # the batch test, or (alone) an image far outside the training range
                        test = np.isfinite(r.p_value) and r.p_value < alpha
                        cause = "test" if test or r.statistic == "image_size_px" else "image"
                        key = (condition, f"{r.statistic} ({cause})")
                        alarms[key] = alarms.get(key, 0) + 1
                records.append(
                    {
                        "condition": condition,
                        "size": size,
                        "status": report.status,
                        "status_no_size": _worst(report.table, ("image_size_px",)),
                    }
                )
    frame = pd.DataFrame(records)
    rank = frame["status"].map(STATUS_ORDER)
    rank_ns = frame["status_no_size"].map(STATUS_ORDER)
    summary = (
        frame.assign(
            alarm=rank >= 1, fail=rank >= 2, alarm_no_size=rank_ns >= 1, fail_no_size=rank_ns >= 2
        )
        .groupby(["condition", "size"], sort=False)
        .agg(
            draws=("alarm", "size"),
            alarm=("alarm", "mean"),
            fail=("fail", "mean"),
            alarm_no_size=("alarm_no_size", "mean"),
            fail_no_size=("fail_no_size", "mean"),
        )
    )
    print(f"fingerprint: {n_train} of {n} {args.train_set} images per draw; default MonitorConfig")
    print(summary.to_string(float_format=lambda v: f"{v:.2f}"))
    print("\nwhich statistics alarmed (batches, all sizes; 'image': only an image far outside")
    print("the training range, not the batch test):")
    for (condition, statistic), count in sorted(alarms.items()):
        print(f"  {condition:13s} {statistic:30s} {count}")
    rates = {
        f"{condition}/{size}": {"warn_or_fail": round(r.alarm, 3), "fail": round(r.fail, 3)}
        for (condition, size), r in summary.iterrows()
    }
    print(json.dumps({"train_images": n_train, "draws": args.draws, "rates": rates}))


if __name__ == "__main__":
    main()
