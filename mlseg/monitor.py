"""Monitoring: drift of new images against the training fingerprint, and run metrics history.

Drift (:func:`drift_report`): each image statistic of :func:`mlseg.inventory.image_stats`
(channel means and spreads = colour/stain and brightness, Laplacian variance = blur, stain
optical densities) of the new images is binned on the decile edges of the training
fingerprint (:func:`mlseg.inventory.fingerprint`), outer bins open-ended, and compared with
the training counts by the population stability index::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)     a, e: new and training bin proportions

(0.5 pseudo-count per bin). PSI alone is noisy on small batches (with 10 bins and 8 new
images it averages ~1 even without drift), so a statistic only counts as drifted when a
permutation test on the same bins (Kolmogorov-Smirnov distance; new and training images
exchanged at random, ``MonitorConfig.permutations`` draws) also gives p < ``p_value`` /
number of statistics (Bonferroni). A ``*_fraction`` statistic (the share of saturated or
dark pixels) is judged to :data:`FRACTION_MARGIN` of the image (:func:`fraction_bins`).
A fingerprint of a set validated with a fluorescence profile skips the optical densities
(:data:`OPTICAL_DENSITY_STATISTICS`), which measure no stain there, and has a new image of
one channel shown in a colour (DAPI saved blue) measured as its grey file, as training reads
it (:func:`mlseg.inventory.as_trained`).
Image size is checked against the training width/height range, in either orientation; the
pixel sizes new images declare against the training images' (:func:`_pixel_size_row`); with
a segmentation run's records, how segment scaled them (:func:`with_segment_records`).
Which images are new (:func:`recent_images`): those a segmentation run's ``summary.csv``
says it segmented in the last days, and those it has not segmented yet; an inbox keeps
every image it received.

Each run's verdict is kept (:func:`drift_history_row`, appended to :data:`DRIFT_HISTORY`
beside ``drift.csv``), and a drift says since when it has lasted by the runs before
(:func:`with_drift_history`).

Run metrics (:func:`run_metrics`): throughput, nuclei per image and nucleus-area deciles of
one segmentation run, appended to a history table (:func:`append_history`). Each run also
keeps its raw distributions (:func:`distributions`), so the next run's shift
(:func:`run_shift`) is an exact two-sample comparison: PSI and Kolmogorov-Smirnov.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import takewhile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlseg.config import MonitorConfig
from mlseg.errors import ConfigError, DatasetError, ImageReadError, MlsegError, some_of
from mlseg.pixel_size import sizes_text
from mlseg.scale import SCALE_TOLERANCE, scale_factor

STATUS_ORDER = {"ok": 0, "skipped": 0, "warn": 1, "fail": 2}
PSEUDO_COUNT = 0.5
# statistics whose "far outside the training range" is judged on log(1 + x): they span
# decades (a blurred scan's Laplacian variance is a fraction of a sharp one's)
LOG_SCALE_STATISTICS = ("laplacian_var", "nucleus_size_px")
#: The statistic that tells the scale the images were scanned at (the size nuclei appear in
#: pixels), added to fingerprints after the others: an older fingerprint has no training
#: values for it, and the report says how to refresh it. Named anew when its estimator
#: changed (``nucleus_scale_px``, a mean response over the image, read sparse nuclei up to
#: 2.6x dense ones of one size), so an older fingerprint's is never compared with it.
SCALE_STATISTIC = "nucleus_size_px"
#: The statistic that tells how sharp the images are (blur lowers it); :func:`_focus_advice`
#: says so in words where it drifted down.
FOCUS_STATISTIC = "laplacian_var"
#: The row comparing the pixel sizes new images declare with the training images' (from the
#: fingerprint's ``pixel_size_um``, recorded after the statistics: an older fingerprint has
#: none, and the report says how to refresh it).
PIXEL_SIZE_ROW = "pixel_size_um"
#: The row saying how ``mlseg segment`` scaled the new images (``--results``'s summary.csv).
SEGMENT_SCALE_ROW = "segment_scale"
#: Optical densities along the H&E and DAB stain vectors: of a fluorescence image they
#: measure nothing (its dark ground reads as dense stain: a synthetic DAPI field read 3.67
#: as an 8-bit file, 8.00 as a 16-bit one), so a fingerprint of a set validated with a
#: fluorescence profile (its ``stain``) skips them.
OPTICAL_DENSITY_STATISTICS = ("od_hematoxylin_mean", "od_eosin_mean", "od_dab_mean")
QUANTILES = tuple(round(q, 1) for q in np.linspace(0.0, 1.0, 11))
#: The least margin, in share of the image, that makes a ``*_fraction`` statistic "far
#: outside" its training range: training images with 0-1 dark pixels in 20,000 would
#: otherwise call a new one with 2 an image unlike any trained on.
FRACTION_MARGIN = 0.01
DRIFT_COLUMNS = (
    "statistic",
    "status",
    "psi",
    "p_value",
    "n_reference",
    "n_new",
    "reference_median",
    "new_median",
    "out_of_range_fraction",
    "note",
)


# what a lab does about drift, said after the statistics that drifted
DRIFT_ADVICE = (
    ". Check how these images were made (scanner, magnification, stain batch, focus) before "
    "trusting their nuclei; if they are the new normal, annotate a few and retrain"
)


class DriftDetected(MlsegError):
    """New images drifted beyond ``monitor.psi_fail``: results on them may not be trusted."""

    exit_code = 1


@dataclass(frozen=True)
class DriftReport:
    """Per-statistic drift table (columns :data:`DRIFT_COLUMNS`) and the batch verdict.

    ``status`` is ``ok``, ``warn`` or ``fail`` (the worst statistic); ``message`` is one line
    naming the drifted statistics.
    """

    table: pd.DataFrame
    status: str
    n_images: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "n_images": self.n_images,
            "message": self.message,
            "statistics": json.loads(self.table.to_json(orient="records")),
        }


# ----------------------------------------------------------------------------- PSI


def psi(expected: np.ndarray, actual: np.ndarray, pseudo_count: float = PSEUDO_COUNT) -> float:
    """Population stability index of two count vectors over the same bins (>= 0)."""
    e = np.asarray(expected, np.float64) + pseudo_count
    a = np.asarray(actual, np.float64) + pseudo_count
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def open_bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in the bins of ``edges`` with the outer bins open-ended.

    ``len(edges) - 1`` bins (at least one); a value below ``edges[0]`` counts in the first bin,
    one above ``edges[-1]`` in the last, as the fingerprint's own values do.
    """
    edges = np.asarray(edges, np.float64)
    n_bins = max(1, edges.size - 1)
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if n_bins == 1:
        return np.array([values.size])
    index = np.searchsorted(edges[1:-1], values, side="right")
    return np.bincount(index, minlength=n_bins)


def fraction_bins(
    edges: Sequence[float], counts: Sequence[int], margin: float = FRACTION_MARGIN
) -> tuple[np.ndarray, np.ndarray]:
    """A ``*_fraction`` statistic's fingerprint bins as the batch test takes them: bins
    narrower than ``margin`` (a share of the image) merged, and an empty bin ``margin``
    beyond each end of the training range. A share smaller than the margin is no drift
    (training images without a white pixel made bins millionths wide, so a scale bar's few
    white pixels in every new image failed the batch); a share beyond it is."""
    edges = np.asarray(edges, np.float64)
    kept, merged = [], [0]
    for i, count in enumerate(np.asarray(counts, np.int64)):
        merged[-1] += int(count)
        inner = edges[i + 1] if i + 2 < edges.size else None
        if inner is not None and inner - (kept[-1] if kept else edges[0]) >= margin:
            kept.append(inner)
            merged.append(0)
    low, high = edges[0] - margin, edges[-1] + margin
    splits = np.array([low, *kept, high])
    # the outer edges only bound open-ended bins: any value beyond the splits will do
    return np.concatenate([[low - margin], splits, [high + margin]]), np.array([0, *merged, 0])


def _ks_rows(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Kolmogorov-Smirnov distance of each row pair of ``(B, K)`` counts over ordered bins."""
    e = np.cumsum(expected, axis=1, dtype=np.float64)
    a = np.cumsum(actual, axis=1, dtype=np.float64)
    e /= e[:, -1:]
    a /= a[:, -1:]
    return np.abs(a - e).max(axis=1)


def permutation_p_value(
    reference: np.ndarray, new: np.ndarray, permutations: int, rng: np.random.Generator
) -> float:
    """p-value that ``new`` and ``reference`` counts (same ordered bins) share a distribution.

    Test statistic: the Kolmogorov-Smirnov distance between the binned distributions (bins
    are ordered values, so a shift to one side is what it detects best). Null distribution:
    the pooled images split at random into groups of the same sizes, ``permutations`` times
    (multivariate hypergeometric draws); exact for any sample size.
    """
    reference = np.asarray(reference, np.int64)
    new = np.asarray(new, np.int64)
    pooled = reference + new
    n_new = int(new.sum())
    if n_new == 0 or reference.sum() == 0 or np.count_nonzero(pooled) < 2:
        return 1.0
    observed = _ks_rows(reference[None, :], new[None, :])[0]
    draws = rng.multivariate_hypergeometric(pooled, n_new, size=permutations)
    null = _ks_rows(pooled[None, :] - draws, draws)
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + permutations))


# ----------------------------------------------------------------------------- drift


def load_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training fingerprint (``fingerprint.json`` written by ``mlseg validate``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{path}: a folder, not a fingerprint; give the fingerprint.json that "
            f"`mlseg validate` wrote (e.g. {path / 'fingerprint.json'})"
        )
    if not path.is_file():
        raise ConfigError(f"{path}: fingerprint not found; run `mlseg validate` on the dataset")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "stats" not in data:
        raise ConfigError(f"{path}: not an mlseg fingerprint (no 'stats'); run `mlseg validate`")
    if data.get("version") == "1" and (data.get("dtype") or {}).get("uint16"):
        # before version 2, mlseg took a 12-bit camera's 16-bit image as a 16-bit one: the
        # same images then read 16x brighter than the fingerprint and drift everywhere
        raise ConfigError(
            f"{path}: a fingerprint of 16-bit images written by an older mlseg (version 1), "
            "which may have measured their intensities against 65535 rather than their "
            "camera's full scale; run `mlseg validate` on the training data again to rewrite it"
        )
    return data


class SubfoldersOnly(DatasetError):
    """A folder of new images that holds none itself, only subfolders that do."""


def list_new_images(folder: str | os.PathLike) -> list[Path]:
    """The images to compare: ``folder`` itself if it is an image file, else the images
    directly in it, or in its ``original/`` subfolder (a dataset split), sorted by name;
    :class:`SubfoldersOnly` where only its subfolders hold images."""
    from mlseg.dataset import is_image_file, warn_of_images_left_out
    from mlseg.io import check_utf8_path

    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found; check the path")
    found = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not found and (folder / "original").is_dir():
        folder = folder / "original"
        found = sorted(p for p in folder.iterdir() if is_image_file(p))
    warn_of_images_left_out(folder)
    if not found:
        from mlseg.segment import subfolders_with_images

        # the monitor flow takes a folder without images for a week without slides: an inbox
        # reorganised into a folder per case was compared with nothing, and passed, each week
        nested = subfolders_with_images(folder)
        if nested:
            raise SubfoldersOnly(
                f"{folder}: no images here, only in its subfolders ({some_of(nested, 3)}); "
                "subfolders are not searched: check each subfolder, or give the folder its "
                "images are in"
            )
        raise DatasetError(f"{folder}: no images (png, tif, jpg) found")
    for path in found:
        check_utf8_path(path)  # its name goes into the table of statistics
    return found


def _image_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``paths`` as a list, or ValueError where it is one path: a string was read letter by
    letter ('d: file not found; s: file not found; ...')."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise ValueError(
            f"expected a list of image files, got one path {os.fsdecode(paths)!r}; list a "
            "folder's images with list_new_images(folder)"
        )
    return [Path(p) for p in paths]


def _segment_records(results: str | os.PathLike) -> tuple[Path, pd.DataFrame | None]:
    """``(path, table)`` of the ``summary.csv`` of a segmentation run's output folder
    ``results`` (or that file itself), as written; the table ``None`` where there is no such
    file. :class:`DatasetError` naming it where it is no readable segmentation summary."""
    from mlseg.io import read_written_csv

    results = Path(results)
    table_path = results if results.is_file() else results / "summary.csv"
    if not table_path.is_file():
        return table_path, None
    try:
        table = read_written_csv(table_path, "image")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{table_path}: not a readable summary table ({err})") from None
    if "image" not in table:
        raise DatasetError(f"{table_path}: no 'image' column; not a segmentation summary.csv")
    return table_path, table


def recent_images(
    paths: Iterable[str | os.PathLike],
    results: str | os.PathLike,
    since_days: float,
    *,
    now: datetime | None = None,
) -> list[Path]:
    """The images of ``paths`` that are new in the last ``since_days`` days, by the records of
    their segmentation: ``results`` is the output folder of ``mlseg segment`` (or the
    ``segment-and-quantify`` flow) on them, whose ``summary.csv`` has, per image (by
    :func:`mlseg.io.image_stem`), ``finished_at``: when it was first segmented, kept by every
    rerun that skips it or redoes its same bytes (a new model or settings). An image whose
    ``finished_at`` lies within ``since_days`` days of ``now`` (default: the present), and
    one with no row (not segmented there yet), are new; the others are not. File times
    cannot tell this: rsync and rclone keep the source's mtime, and a ``chown -R`` sets every
    ctime.

    An empty ``finished_at`` (images segmented by an mlseg that wrote none) counts as old,
    and so, named in one warning, does a value that is no ISO 8601 time with a time zone:
    mlseg writes the offset (``%z``), and a time without one is a time nobody can place.
    No ``summary.csv`` there (nothing segmented yet) makes every image new, with a warning.
    """
    from mlseg.io import image_stem

    if not since_days > 0:
        raise ConfigError(f"since_days: {since_days}; give a number of days above 0")
    paths = _image_paths(paths)
    table_path, table = _segment_records(results)
    if table is None:
        warnings.warn(
            f"{table_path}: no segmentation records, so every image counts as new; give the "
            "output folder of `mlseg segment` / segment-and-quantify on these images",
            stacklevel=2,
        )
        return paths
    since = (now or datetime.now(UTC)) - timedelta(days=since_days)
    values = table["finished_at"] if "finished_at" in table else pd.Series(None, table.index)
    finished: dict[str, datetime | None] = {}
    unplaced = []
    for image, value in zip(table["image"].astype(str), values, strict=True):
        when = _aware_time(value)
        if when is None and not pd.isna(value) and str(value).strip():
            unplaced.append(f"{image} ({value})")
        # one row per image; were there two, the latest record decides
        times = [t for t in (finished.get(image), when) if t is not None]
        finished[image] = max(times, default=None)
    if unplaced:
        warnings.warn(
            f"{table_path}: {len(unplaced)} finished_at without a time zone or not a time, "
            f"counted as old (not new in the last {since_days:g} days): {some_of(unplaced)}",
            stacklevel=2,
        )
    recent = []
    for path in paths:
        stem = image_stem(path)
        if stem not in finished or (finished[stem] is not None and finished[stem] >= since):
            recent.append(path)
    return recent


def _aware_time(value: Any) -> datetime | None:
    """``value`` as a time with a time zone, or None (empty, no zone, or no ISO 8601 time)."""
    try:
        when = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def image_stats_table(
    paths: Iterable[str | os.PathLike],
    *,
    params: dict[str, Any] | None = None,
    stain: str | None = None,
    progress: bool = False,
    log: Callable[[str], object] | None = None,
) -> pd.DataFrame:
    """One row per image: ``image`` (path), ``width_px``, ``height_px``, ``channels``,
    ``pixel_size_um`` (what its JSON sidecar or TIFF metadata declares, else None:
    :func:`mlseg.pixel_size.declared_pixel_size_um`), ``content_hash``
    (:func:`mlseg.inventory.content_hash`) and its statistics
    (:func:`mlseg.inventory.image_stats`, with the keyword arguments ``params``: give a
    fingerprint's ``image_stats_params``, so new images are measured as the training images
    were), of the image as training reads it with a profile of ``stain`` (give a
    fingerprint's: with ``fluorescence`` an RGB image of one colour is grey,
    :func:`mlseg.inventory.as_trained`). An unreadable image is left out with one warning
    naming it: it has no statistics to drift, and the others still do. ``progress`` shows a
    bar (a folder of large images takes minutes); ``log`` (a job's stderr, where no bar is
    drawn) is given a line on how far the reading is once a minute
    (:class:`mlseg.progress.ProgressLog`).
    """
    from mlseg.inventory import as_trained, content_hash, image_stats
    from mlseg.io import read_image
    from mlseg.pixel_size import declared_pixel_size_um
    from mlseg.progress import shown

    paths = _image_paths(paths)
    rows, unreadable = [], []
    bar = "reading" if progress else None
    for path in shown(paths, "monitor", "images", log, bar=bar, bar_unit="image", leave=False):
        try:
            image = read_image(path)
        except ImageReadError as err:
            unreadable.append(str(err))
            continue
        seen = as_trained(image, stain)
        rows.append(
            {
                "image": str(path),
                "width_px": int(image.shape[1]),
                "height_px": int(image.shape[0]),
                "channels": int(seen.shape[2]) if seen.ndim == 3 else 1,
                # as segment reads it; an implausible one is none, as segment ignores it
                "pixel_size_um": declared_pixel_size_um(path),
                "content_hash": content_hash(image),
                **image_stats(seen, **(params or {})),
            }
        )
    if unreadable:
        warnings.warn(
            f"{len(unreadable)} image(s) left out of the drift check, unreadable: "
            + some_of(unreadable, sep="; "),
            stacklevel=2,
        )
    return pd.DataFrame(rows)


def _status(value: float, p: float, alpha: float, cfg: MonitorConfig) -> str:
    if p >= alpha:
        return "ok"
    if value >= cfg.psi_fail:
        return "fail"
    return "warn" if value >= cfg.psi_warn else "ok"


def drift_report(
    new: pd.DataFrame, fingerprint: dict[str, Any], cfg: MonitorConfig | None = None
) -> DriftReport:
    """Compare the new images' statistics (:func:`image_stats_table`) with the fingerprint.

    Copies of one image (same ``content_hash``: a slide resubmitted under another name)
    count once: as many rows of it would be taken for that many images agreeing."""
    cfg = cfg or MonitorConfig()
    if new.empty:
        raise DatasetError("no readable image to compare with the training data")
    copies = new.duplicated("content_hash") if "content_hash" in new else np.zeros(len(new), bool)
    new = new[~np.asarray(copies)]
    n_images = len(new)
    images = f"{n_images} image(s)" + (
        f" ({int(copies.sum())} copies of them counted once)" if copies.any() else ""
    )
    stats = fingerprint.get("stats", {})
    names = list(cfg.statistics) or [s for s in stats if s in new.columns]
    unknown = [s for s in names if s not in stats]
    if unknown:
        raise ConfigError(
            f"monitor.statistics: {', '.join(unknown)} not in the fingerprint "
            f"(it has {', '.join(stats)})"
        )
    rng = np.random.default_rng(cfg.seed)
    usable = []
    rows = []
    far_out: dict[str, str] = {}  # statistic -> which images lie far outside its range
    low_out: set[str] = set()  # statistics with an image far below the training range
    for name in names:
        ref = stats[name]
        column = pd.to_numeric(new.get(name), errors="coerce")
        column = column.dropna() if isinstance(column, pd.Series) else pd.Series(dtype=float)
        values = column.to_numpy(np.float64)
        if name in OPTICAL_DENSITY_STATISTICS and fingerprint.get("stain") == "fluorescence":
            rows.append(_not_applicable_row(name, values.size, fingerprint))
            continue
        edges = ref["histogram"]["edges"]
        ref_counts = np.asarray(ref["histogram"]["counts"], np.int64)
        row = {
            "statistic": name,
            "n_reference": int(ref["n"]),
            "n_new": int(values.size),
            "reference_median": float(ref["quantiles"].get("0.5", np.nan)),
            "new_median": float(np.median(values)) if values.size else np.nan,
            "out_of_range_fraction": float(
                np.mean((values < ref["min"]) | (values > ref["max"])) if values.size else np.nan
            ),
            "psi": np.nan,
            "p_value": np.nan,
            "status": "skipped",
            "note": "",
        }
        if values.size < cfg.min_images:
            row["note"] = f"{values.size} new values < min_images={cfg.min_images}"
        else:
            if name.endswith("_fraction"):
                edges, ref_counts = fraction_bins(edges, ref_counts)
            counts = open_bin_counts(values, edges)
            row["psi"] = psi(ref_counts, counts)
            row["p_value"] = permutation_p_value(ref_counts, counts, cfg.permutations, rng)
            usable.append(len(rows))
        far = _far_outside(name, ref, values, cfg)
        if far.any():
            # in a batch of any size: one black or blank image among many like the
            # training set's moves no batch statistic, yet is unlike any image trained on
            named = new.loc[column.index[far], "image"] if "image" in new else pd.Series()
            files = [Path(str(n)).name for n in named]
            far_out[name] = (
                f"{int(far.sum())} far outside the training range "
                f"{ref['min']:.3g}-{ref['max']:.3g}" + (f": {some_of(files)}" if files else "")
            )
            row["note"] += f"{'; ' if row['note'] else ''}{far_out[name]}"
            if (values[far] < ref["min"]).any():
                low_out.add(name)
        rows.append(row)
    alpha = cfg.p_value / max(1, len(usable))
    for i in usable:
        rows[i]["status"] = _status(rows[i]["psi"], rows[i]["p_value"], alpha, cfg)
    for row in rows:
        if row["statistic"] in far_out and STATUS_ORDER[row["status"]] < STATUS_ORDER["warn"]:
            row["status"] = "warn"
    if not cfg.statistics and SCALE_STATISTIC not in stats:
        rows.append(_scale_skipped_row(new, fingerprint))
    blurrier = False  # the images drifted less sharp than the training images
    for row in rows:
        if row["statistic"] == FOCUS_STATISTIC and row["status"] in ("warn", "fail"):
            blurrier = row["new_median"] < row["reference_median"] or FOCUS_STATISTIC in low_out
            if blurrier:
                advice = _focus_advice()
                far_out[FOCUS_STATISTIC] = "; ".join(
                    [far_out[FOCUS_STATISTIC], advice] if FOCUS_STATISTIC in far_out else [advice]
                )
                row["note"] += f"{'; ' if row['note'] else ''}{advice}"
    for row in rows:
        if row["statistic"] == SCALE_STATISTIC and row["status"] in ("warn", "fail"):
            declared = PIXEL_SIZE_ROW in new and bool(new[PIXEL_SIZE_ROW].notna().all())
            far_out[SCALE_STATISTIC] = _scale_advice(
                row["new_median"], row["reference_median"], declared, blurrier
            )
            row["note"] += f"{'; ' if row['note'] else ''}{far_out[SCALE_STATISTIC]}"
    rows.append(_size_row(new, fingerprint, cfg))
    rows.append(_channels_row(new, fingerprint))
    rows.append(_pixel_size_row(new, fingerprint, cfg.min_images))
    if "scale_source" in new:  # segment's records were given (with_segment_records)
        rows.append(_segment_scale_row(new, fingerprint))
    table = pd.DataFrame(rows, columns=list(DRIFT_COLUMNS))
    worst = max(table["status"], key=lambda s: STATUS_ORDER[s], default="ok")
    status = "ok" if worst == "skipped" else worst
    drifted = table[table["status"].isin(["warn", "fail"])]
    if drifted.empty and not usable:
        message = (
            f"{images}: too few to test for drift (min_images={cfg.min_images}); "
            f"none far outside the training range"
        )
    elif drifted.empty:
        message = f"no drift in {images} across {len(usable)} statistic(s)"
    else:
        parts = [
            (
                f"{r.statistic} ({r.status}: {r.note}"
                if r.statistic in (PIXEL_SIZE_ROW, SEGMENT_SCALE_ROW)
                else f"{r.statistic} ({r.status}, PSI {r.psi:.2f}, p {r.p_value:.4f}"
                if np.isfinite(r.psi)
                else f"{r.statistic} ({r.status}, {r.out_of_range_fraction:.0%} out of range"
            )
            + (f"; {far_out[r.statistic]})" if r.statistic in far_out else ")")
            for r in drifted.itertuples()
        ]
        message = f"drift in {images}: " + "; ".join(parts) + DRIFT_ADVICE
    return DriftReport(table, status, n_images, message)


def _far_outside(
    name: str, ref: dict[str, Any], values: np.ndarray, cfg: MonitorConfig
) -> np.ndarray:
    """Which of ``values`` lie beyond the training range widened by ``cfg.far_margin`` of
    its width on each side (and by :data:`FRACTION_MARGIN` for a ``*_fraction``): images
    unlike any trained on. All False where the range has no width, no scale to judge on,
    except a ``*_fraction``'s: no dark pixel in any training image is the usual H&E set."""
    # a variance spans decades and stops at 0: judged on a linear scale, a blurred
    # image at a fifth of every training image's could never lie "far" below them
    scale = np.log1p if name in LOG_SCALE_STATISTICS else np.asarray
    low, high, seen = (scale(np.asarray(v, np.float64)) for v in (ref["min"], ref["max"], values))
    width = high - low
    margin = cfg.far_margin * width
    if name.endswith("_fraction"):
        margin = max(margin, FRACTION_MARGIN)
    elif not width > 0:
        return np.zeros(values.shape, bool)
    return (seen < low - margin) | (seen > high + margin)


def _focus_advice() -> str:
    """What :data:`FOCUS_STATISTIC` drifted down means, in words: the statistic's name alone
    ("laplacian_var (fail, ...)") left a lab to know that it measures focus."""
    return (
        "less sharp than the training images: out of focus (or a higher magnification than "
        "trained on)? check the scan's focus and re-scan blurred fields before trusting "
        "their nuclei"
    )


def _scale_advice(
    new_median: float, reference_median: float, declared: bool = False, blurrier: bool = False
) -> str:
    """What a drifted :data:`SCALE_STATISTIC` means: nuclei appear at another size in pixels
    than in training, as on a slide scanned at another magnification. ``declared``: every
    new image declares its pixel size, so there is none to give. ``blurrier``: the images
    also drifted less sharp (:data:`FOCUS_STATISTIC`): blur spreads nuclei as a higher
    magnification enlarges them (GBM40 tiles blurred by a sigma of 2-4 px read 1.5x), so
    the advice names focus first; a pixel size given to blurred images at the training
    scale would have segment resample them wrongly. A median within
    :data:`mlseg.scale.SCALE_TOLERANCE` of the training one (as :func:`mlseg.scale.scale_factor`
    judges it) is the training scale: no change of magnification to advise."""
    ratio = new_median / reference_median if reference_median > 0 else np.nan
    size = f"{ratio:.2g}x the training size" if np.isfinite(ratio) else "another size"
    if np.isfinite(ratio) and scale_factor(new_median, reference_median) == 1.0:
        # a batch at 0.98x was told of another magnification and to give a pixel size, by
        # which segment would resample it for a difference its scale estimate ignores
        return (
            f"nuclei appear {size} in pixels, within the {SCALE_TOLERANCE:.0%} that segment "
            "takes as the model's scale: not another magnification, no pixel size to give; "
            "the mix of nucleus sizes moved (another tissue, grade or cell population?)"
        )
    if blurrier and not ratio < 1:
        return (
            f"nuclei appear {size} in pixels, and the images are less sharp than the "
            "training images (see laplacian_var): out of focus, which spreads nuclei, or "
            "another magnification? check the focus first; only if the images are sharp, "
            "give them their pixel size (a sidecar or --pixel-size) so segment resamples "
            "them, or train on images at their scale"
        )
    fix = (
        "they declare their pixel size (see pixel_size_um), by which segment resamples "
        "them: check it is their scan's"
        if declared
        else "give these images their pixel size (a sidecar or --pixel-size) so segment "
        "resamples them"
    )
    return (
        f"nuclei appear {size} in pixels: another magnification or scanner (20x for 40x "
        f"halves them)? {fix}, or train on images at their scale"
    )


#: What an older fingerprint's skipped row says to do (validate writes every field anew).
REFRESH_FINGERPRINT = (
    "run `mlseg validate` on the training data again to refresh fingerprint.json (its "
    "content_hash stays the same)"
)


def _skipped_row(statistic: str, fingerprint: dict[str, Any]) -> dict:
    """A drift-table row of ``statistic``, ``skipped`` until its check says otherwise, the
    fingerprint's image count as its reference and every measure NaN."""
    row = dict.fromkeys(DRIFT_COLUMNS, np.nan)
    row.update(
        statistic=statistic, n_reference=int(fingerprint.get("n_images", 0)), status="skipped"
    )
    return row


def _scale_skipped_row(new: pd.DataFrame, fingerprint: dict[str, Any]) -> dict:
    """The scale check of a fingerprint written before mlseg recorded
    :data:`SCALE_STATISTIC`: skipped, saying how to refresh the fingerprint."""
    row = _skipped_row(SCALE_STATISTIC, fingerprint)
    row.update(
        n_new=len(new),
        note="scale not checked: the fingerprint was written before mlseg measured the size "
        f"nuclei appear in pixels as it does now (one nucleus at a time); {REFRESH_FINGERPRINT}",
    )
    return row


def _not_applicable_row(name: str, n_new: int, fingerprint: dict[str, Any]) -> dict:
    """An :data:`OPTICAL_DENSITY_STATISTICS` row of a fluorescence fingerprint, of
    ``n_new`` new values: skipped, saying why (a fingerprint without ``stain``, written
    before mlseg recorded it, compares them as before)."""
    row = _skipped_row(name, fingerprint)
    row.update(
        n_reference=int(fingerprint["stats"][name]["n"]),
        n_new=n_new,
        note="not applicable: the training set was validated with a fluorescence profile, "
        "and the optical densities of H&E and DAB stains measure nothing in a fluorescence "
        "image (its dark ground reads as dense stain)",
    )
    return row


def _size_row(new: pd.DataFrame, fingerprint: dict[str, Any], cfg: MonitorConfig) -> dict:
    size = fingerprint.get("size_px") or {}
    row = {
        "statistic": "image_size_px",
        "n_reference": int(fingerprint.get("n_images", 0)),
        "n_new": len(new),
        "reference_median": np.nan,
        "new_median": np.nan,
        "out_of_range_fraction": np.nan,
        "psi": np.nan,
        "p_value": np.nan,
        "status": "skipped",
        "note": "",
    }
    if not size or size.get("width_min") is None or "width_px" not in new or new.empty:
        row["note"] = "no size range in the fingerprint"
        return row
    w = new["width_px"].to_numpy()
    h = new["height_px"].to_numpy()

    def fits(across: np.ndarray, down: np.ndarray) -> np.ndarray:
        return (
            (across >= size["width_min"])
            & (across <= size["width_max"])
            & (down >= size["height_min"])
            & (down <= size["height_max"])
        )

    # a tile turned a quarter (a camera mounted the other way) is the same size of image
    outside = ~(fits(w, h) | fits(h, w))
    fraction = float(outside.mean())
    row["out_of_range_fraction"] = fraction
    row["status"] = "warn" if fraction > cfg.size_warn_fraction else "ok"
    row["note"] = (
        f"training {size['width_min']}-{size['width_max']} x "
        f"{size['height_min']}-{size['height_max']} px, either way round"
    )
    return row


def _channels_row(new: pd.DataFrame, fingerprint: dict[str, Any]) -> dict:
    """Images whose channel count no training image had (grey fluorescence sent to an H&E
    model) warn: their colour and stain statistics are missing, not far off, so no other
    row can flag them."""
    trained = sorted(int(c) for c in (fingerprint.get("channels") or {}))
    row = _skipped_row("channels", fingerprint)
    row.update(n_new=len(new), note="no channel counts to compare")
    if not trained or "channels" not in new or new.empty:
        return row
    channels = pd.to_numeric(new["channels"], errors="coerce").to_numpy()
    unseen = ~np.isin(channels, trained)
    row["out_of_range_fraction"] = float(unseen.mean())
    row["status"] = "warn" if unseen.any() else "ok"
    row["note"] = f"training {', '.join(map(str, trained))} channel(s)"
    if unseen.any():
        found = ", ".join(str(int(c)) for c in np.unique(channels[unseen]))
        row["note"] += f"; {int(unseen.sum())} image(s) with {found}"
    return row


def _pixel_size_row(new: pd.DataFrame, fingerprint: dict[str, Any], min_images: int) -> dict:
    """The pixel sizes the new images declare against the training images' (the
    fingerprint's ``pixel_size_um``). Segment resamples a declared size to the model's, so
    this is no fault; it warns where an image declares a size outside the training range
    by more than :data:`mlseg.scale.SCALE_TOLERANCE` (another magnification than any
    trained on: a model trained at 0.25 um sees a 0.5 um image enlarged, its detail lost;
    a second scanner's 0.2527 um is the same), or, by segment's records
    (:func:`with_segment_records`: a size given to segment is in them alone), was segmented
    without one where every
    training image had one (its scale then estimated from its nuclei). The note says where
    the sizes declared and the size nuclei appear in pixels disagree
    (:func:`_declared_scale_mismatch`)."""
    row = _skipped_row(PIXEL_SIZE_ROW, fingerprint)
    row["n_new"] = len(new)
    trained = fingerprint.get(PIXEL_SIZE_ROW)
    if not isinstance(trained, dict):
        row["note"] = (
            "pixel sizes not compared: the fingerprint was written before mlseg recorded the "
            f"training images' pixel sizes; {REFRESH_FINGERPRINT}"
        )
        return row
    if PIXEL_SIZE_ROW not in new or new.empty:
        row["note"] = "no pixel sizes of the new images to compare"
        return row
    counts = {float(um): int(n) for um, n in (trained.get("counts") or {}).items()}
    unknown = int(trained.get("unknown") or 0)
    declared = pd.to_numeric(new[PIXEL_SIZE_ROW], errors="coerce").astype("float64")
    sizes = declared.dropna()
    names = new["image"].map(lambda p: Path(str(p)).name) if "image" in new else None
    trained_sizes = pd.Series(np.repeat(list(counts), list(counts.values())), dtype="float64")
    said = [
        f"{name}: {sizes_text(part) or 'none declared'}"
        + (f", {none} none" if part.size and none else "")
        for name, part, none in (
            ("training", trained_sizes, unknown),
            ("new", sizes, len(new) - sizes.size),
        )
    ]
    row["new_median"] = float(sizes.median()) if sizes.size else np.nan
    row["status"] = "ok"
    if not counts:
        row["note"] = "; ".join(said) + (
            " (training used its profile's pixel_size_um where that sets one, else none)"
        )
        return row
    row["reference_median"] = float(trained_sizes.median())
    low, high = min(counts), max(counts)
    trained_range = f"{low:g} um" if low == high else f"{low:g}-{high:g} um"
    # within SCALE_TOLERANCE of the training sizes is their magnification (a second
    # scanner's 0.2527 um for 0.25 um, which segment resamples by 1.01x), not another
    outside = declared.lt(low * (1 - SCALE_TOLERANCE)) | declared.gt(high * (1 + SCALE_TOLERANCE))
    # a size given to segment (--pixel-size, a table, the profile) is in its records alone
    segmented = new.get("segmented", pd.Series(False, index=new.index)).astype(bool)
    missing = declared.isna() & segmented & (unknown == 0)
    row["out_of_range_fraction"] = float(outside.mean())

    def files(which: pd.Series) -> str:
        return f": {some_of(names[which])}" if names is not None else ""

    warned = []
    if outside.any():
        warned.append(
            f"{int(outside.sum())} declare a pixel size outside the training images' "
            f"({trained_range}, give or take {SCALE_TOLERANCE:.0%}){files(outside)} (another "
            "magnification: segment resamples them to the model's pixel size, but check their "
            "nuclei, or train on images at their size)"
        )
    if missing.any():
        warned.append(
            f"{int(missing.sum())} segmented without a pixel size, where every training "
            f"image had one{files(missing)} (segment then estimates their scale from their "
            "nuclei; give each a JSON sidecar or --pixel-size)"
        )
    unsure = declared.isna() & ~segmented
    if not unknown and unsure.any():
        said.append(
            f"{int(unsure.sum())} without one may be given theirs by segment (--pixel-size, "
            "a table, the profile): --results reads what it used"
        )
    if warned:
        row["status"] = "warn"
    mismatch = _declared_scale_mismatch(new, fingerprint, declared, min_images)
    row["note"] = "; ".join(said + warned + ([mismatch] if mismatch else []))
    return row


def _declared_scale_mismatch(
    new: pd.DataFrame, fingerprint: dict[str, Any], declared: pd.Series, min_images: int
) -> str:
    """What to say where the declared pixel sizes and the size nuclei appear in pixels
    (:data:`SCALE_STATISTIC`) disagree: nuclei measured in microns (the one times the
    other, median over the new images that have both) differ from the training images' as
    segment's scale estimate judges a difference (:func:`mlseg.scale.scale_factor`, within
    :data:`mlseg.scale.SCALE_TOLERANCE`: the same scale), as where a sidecar declares 0.5 um on
    pixels still at the training 0.25 um. Empty where they agree, or where there is no
    one training size to compare with (none, several, or some images without one), or
    fewer than ``min_images`` new images with both."""
    trained = fingerprint.get(PIXEL_SIZE_ROW) or {}
    counts = trained.get("counts") or {}
    reference = (fingerprint.get("stats") or {}).get(SCALE_STATISTIC) or {}
    reference_px = float((reference.get("quantiles") or {}).get("0.5", np.nan))
    if len(counts) != 1 or trained.get("unknown") or not reference_px > 0:
        return ""
    if SCALE_STATISTIC not in new:
        return ""
    apparent = pd.to_numeric(new[SCALE_STATISTIC], errors="coerce").astype("float64")
    microns = (apparent * declared).dropna()
    if microns.size < max(1, min_images):
        return ""
    reference_um = reference_px * float(next(iter(counts)))
    if scale_factor(float(microns.median()), reference_um) == 1.0:
        return ""
    ratio = float(microns.median()) / reference_um
    return (
        f"nuclei measure {ratio:.2g}x the training images' in microns by these declared sizes "
        f"(their size in pixels, {SCALE_STATISTIC}, times the pixel size): the declarations "
        "are likely wrong (a sidecar or metadata from another scan?): check them, as "
        "segment resamples by them"
    )


def with_segment_records(new: pd.DataFrame, results: str | os.PathLike) -> pd.DataFrame:
    """``new`` (:func:`image_stats_table`'s table) with what ``mlseg segment`` recorded of
    each image in ``results`` (its output folder, or the ``summary.csv`` in it), for
    :func:`drift_report`: ``segmented`` (a record was found), ``scale_factor`` and
    ``scale_source`` (how segment scaled the image, :class:`mlseg.scale.ScaleEstimate`), and
    ``pixel_size_um`` as segment used it (given to it, ``--pixel-size``, a table or the
    profile's, or the file's). Images without a record keep what their files declare, with
    no scale; so do all where there is no ``summary.csv`` (its absence is
    :func:`recent_images`' to name)."""
    from mlseg.io import image_stem

    out = new.assign(segmented=False, scale_factor=np.nan, scale_source=None)
    if new.empty:
        return out
    _, table = _segment_records(results)
    if table is None:
        return out
    # one row per image; were there two, the last written decides
    records = table.assign(image=table["image"].astype(str)).drop_duplicates("image", keep="last")
    records = records.set_index("image")
    stems = out["image"].map(image_stem)
    found = stems.isin(records.index)
    out["segmented"] = found
    # an mlseg that recorded no scale or pixel size leaves them as they are
    for column in ("scale_factor", "scale_source", "pixel_size_um"):
        if column in records:
            told = found
            if column == "pixel_size_um" and "units" in records:
                # measured in pixels as asked (--units px, a profile's units: px), its record
                # holds no size whatever size segment scaled it by: the files' is kept
                told = found & stems.map(records["units"]).ne("px")
            if told.any():  # an empty map is of the stems' dtype, refused in a float column
                out.loc[told, column] = stems[told].map(records[column])
    return out


def _segment_scale_row(new: pd.DataFrame, fingerprint: dict[str, Any]) -> dict:
    """How segment scaled the new images (``scale_factor``/``scale_source`` of its
    summary.csv, from :func:`with_segment_records`): warns where it resampled most of
    them by more than :data:`mlseg.scale.SCALE_TOLERANCE` (more than half: a batch at
    another scale than the model's, whose results hang on the pixel sizes or on the scale
    estimate) or rejected the scale estimate of most
    (rescaled passes cut nuclei into pieces: images the model does not understand)."""
    row = _skipped_row(SEGMENT_SCALE_ROW, fingerprint)
    source = new["scale_source"]
    factor = pd.to_numeric(new.get("scale_factor"), errors="coerce")
    recorded = source.notna() & factor.notna()
    n = int(recorded.sum())
    row["n_new"] = n
    if not n:
        row["note"] = (
            "no scale recorded for these images in the segmentation records (not segmented "
            "there yet, or by an mlseg that recorded none)"
        )
        return row
    factor, source = factor[recorded], source[recorded].astype(str)
    resampled = ~np.isclose(factor, 1.0)
    rejected = source.eq("rejected")
    row["new_median"] = float(factor.median())
    row["out_of_range_fraction"] = float(resampled.mean())
    said = [f"segment resampled {int(resampled.sum())} of {n} image(s)"]
    if resampled.any():
        low, high = factor[resampled].min(), factor[resampled].max()
        by = f"{low:.3g}x" if np.isclose(low, high) else f"{low:.3g}-{high:.3g}x"
        whence = source[resampled].value_counts().sort_index().items()
        said[0] += f" by {by} (" + ", ".join(f"{k} {v}" for k, v in whence) + ")"
    if rejected.any():
        said.append(f"rejected the scale estimate of {int(rejected.sum())}")
    # resampled within SCALE_TOLERANCE (a second scanner's 0.2527 um for a 0.25 um model:
    # 1.01x) is the model's scale, not another
    other_scale = (factor - 1.0).abs() > SCALE_TOLERANCE
    warned = []
    if other_scale.sum() * 2 > n:
        warned.append(
            "most of the batch was at another scale than the model's: its nuclei are as "
            "right as the pixel sizes (pixel_size) or scale estimates (estimated) that "
            "resampled them"
        )
    if rejected.sum() * 2 > n:
        warned.append(
            "for most of the batch a rescaled pass cut nuclei into pieces, as on images "
            "the model does not understand (another stain or tissue): check their nuclei"
        )
    row["status"] = "warn" if warned else "ok"
    row["note"] = "; ".join(said + warned)
    return row


# ----------------------------------------------------------------------------- run metrics


def area_column(columns: Iterable[str]) -> str | None:
    """The nucleus area column of a measurement table: ``area_um2`` or ``area_px``."""
    columns = list(columns)
    for name in ("area_um2", "area_px2", "area_px"):
        if name in columns:
            return name
    return None


def run_areas(tables: Iterable[pd.DataFrame]) -> tuple[str, list[float] | None]:
    """``(area_unit, areas)`` of a run's nucleus tables, for :func:`run_metrics`: the unit
    (``um2`` or ``px``) most of the run's nuclei were measured in, ``um2`` on a tie, and
    every area in it. Areas in the other unit, of images without a pixel size in a run
    where others have one, share no distribution with these and are left out. ``None``
    areas: no table has an area column."""
    tables = list(tables)
    columns = [area_column(t.columns) for t in tables]
    units = [None if c is None else "um2" if c == "area_um2" else "px" for c in columns]
    if not any(units):
        return "px", None
    nuclei = {"um2": 0, "px": 0}
    for table, u in zip(tables, units, strict=True):
        if u:
            nuclei[u] += len(table)
    # not the first table's unit: an image without nuclei or pixel size, sorted first,
    # made a run's areas pixels, of which it had none, and left out every nucleus in um2
    chosen = max(nuclei, key=nuclei.get)  # um2 on a tie
    areas = [
        v
        for table, column, u in zip(tables, columns, units, strict=True)
        if u == chosen
        for v in table[column].tolist()
    ]
    return chosen, areas


def _deciles(values: np.ndarray) -> list[float]:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [np.nan] * len(QUANTILES)
    return np.quantile(values, QUANTILES).tolist()


def run_metrics(
    counts: Sequence[float] | np.ndarray,
    areas: Sequence[float] | np.ndarray | None,
    seconds: float,
    *,
    area_unit: str = "um2",
    run_id: str = "",
    n_failed: int = 0,
    finished_at: str | None = None,
) -> dict[str, Any]:
    """One history row: throughput, nuclei per image, and count/area deciles of a run.

    ``counts`` is the nucleus count of each image processed; ``areas`` every nucleus's area
    (``area_unit``: ``um2`` or ``px``); ``seconds`` the wall time of the run.
    """
    counts = np.asarray(counts, np.float64)
    n = int(counts.size)
    row: dict[str, Any] = {
        "run_id": run_id,
        "finished_at": finished_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "n_images": n,
        "n_failed": int(n_failed),
        "seconds": float(seconds),
        "images_per_s": n / seconds if seconds > 0 else np.nan,
        "seconds_per_image": seconds / n if n else np.nan,
        "nuclei_total": int(counts.sum()),
        "nuclei_per_image_mean": float(counts.mean()) if n else np.nan,
        "nuclei_per_image_median": float(np.median(counts)) if n else np.nan,
        "area_unit": area_unit,
    }
    for q, v in zip(QUANTILES, _deciles(counts), strict=True):
        row[f"count_q{int(q * 100):02d}"] = v
    area_values = np.asarray(areas if areas is not None else [], np.float64)
    for q, v in zip(QUANTILES, _deciles(area_values), strict=True):
        row[f"area_{area_unit}_q{int(q * 100):02d}"] = v
    return row


def sample_psi(reference: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    """PSI of two samples on the reference's quantile bins (outer bins open-ended)."""
    reference = np.asarray(reference, np.float64)
    reference = reference[np.isfinite(reference)]
    new = np.asarray(new, np.float64)
    new = new[np.isfinite(new)]
    if reference.size == 0 or new.size == 0:
        return np.nan
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 3:
        # one open-ended bin held every value (a previous run of one image, or of blank
        # ones): any run scored 0, its nuclei three times larger too. Bins below, at and
        # above each of the reference's values instead
        values = np.unique(reference)
        inner = np.sort(np.concatenate([values, np.nextafter(values, np.inf)]))
        edges = np.concatenate([inner[:1], inner, inner[-1:]])
    return psi(open_bin_counts(reference, edges), open_bin_counts(new, edges))


def run_shift(
    counts: Sequence[float] | np.ndarray,
    areas: Sequence[float] | np.ndarray | None,
    previous: pd.DataFrame | None,
    area_unit: str = "um2",
) -> dict[str, float]:
    """Distribution shift of this run's nuclei counts and areas vs the previous run.

    ``previous`` is the previous run's distributions table (:func:`distributions`);
    ``areas`` are in ``area_unit`` (``um2`` or ``px``) and compared only with the previous
    run's areas in that unit. Returns ``count_psi``/``area_psi`` (:func:`sample_psi`,
    previous run as reference), ``count_ks_p``/``area_ks_p`` (two-sample
    Kolmogorov-Smirnov p-values) and the relative change of the medians in %; NaN where
    there is nothing to compare (no previous run, or one measured in the other unit).
    """
    from scipy.stats import ks_2samp

    out: dict[str, float] = {}
    current = {"count": counts, "area": areas}
    for key, values in current.items():
        for name in ("psi", "ks_p", "median_change_pct"):
            out[f"{key}_{name}"] = np.nan
        if previous is None or previous.empty or values is None:
            continue
        quantity = "nuclei_per_image" if key == "count" else f"area_{area_unit}"
        before = previous.loc[previous["quantity"] == quantity, "value"].to_numpy(np.float64)
        now = np.asarray(values, np.float64)
        if before.size == 0 or now.size == 0:
            continue
        out[f"{key}_psi"] = sample_psi(before, now)
        out[f"{key}_ks_p"] = float(ks_2samp(before, now).pvalue)
        out[f"{key}_median_change_pct"] = _change(float(np.median(now)), np.median(before))
    return out


def distributions(
    counts: Sequence[float] | np.ndarray,
    areas: Sequence[float] | np.ndarray | None,
    area_unit: str = "um2",
) -> pd.DataFrame:
    """Long table of a run's distributions: ``quantity`` (``nuclei_per_image`` or
    ``area_<unit>``), ``value``; kept per run so the next run can measure its shift."""
    parts = [pd.DataFrame({"quantity": "nuclei_per_image", "value": np.asarray(counts, float)})]
    if areas is not None:
        parts.append(
            pd.DataFrame({"quantity": f"area_{area_unit}", "value": np.asarray(areas, float)})
        )
    return pd.concat(parts, ignore_index=True)


def _change(now: float, before: Any) -> float:
    try:
        before = float(before)
    except (TypeError, ValueError):
        return np.nan
    if not np.isfinite(now) or not np.isfinite(before) or before == 0:
        return np.nan
    return 100.0 * (now - before) / before


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """The run history table (CSV or Parquet by suffix); empty if it does not exist yet.

    A CSV that a spreadsheet saved again is read as such (:func:`mlseg.dataset.read_resaved_csv`):
    read as commas, its rows became one column, and the next run's append rewrote the
    history garbled. A file that cannot be read as its suffix says raises
    :class:`DatasetError` naming it."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    if path.suffix == ".parquet":
        from pyarrow import ArrowException

        try:
            return pd.read_parquet(path)
        except PermissionError:
            raise
        except (ArrowException, OSError) as err:  # damaged: ArrowInvalid, or OSError (thrift)
            # pyarrow's words after "Could not open Parquet input source '<path>': "
            said = str(err).split("': ", 1)[-1].strip()
            raise DatasetError(
                f"{path}: cannot be read as Parquet ({said}); fix or remove it"
            ) from err
    from mlseg.dataset import read_resaved_csv

    return read_resaved_csv(path)


def append_history(path: str | os.PathLike, row: dict[str, Any]) -> pd.DataFrame:
    """Append one row to the history table at ``path`` (atomic rewrite); return the table.
    A row with the ``run_id`` of one in the table replaces it: a retried run's, whose failed
    attempt wrote it, is still one run.

    The read and the rewrite hold a lock (``.<name>.lock`` beside it): two runs into one
    folder that end together each read the table before the other's row, and one row was
    lost."""
    from filelock import FileLock

    from mlseg.errors import writes_named
    from mlseg.io import write_table

    path = Path(path)
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    # the lock file is the first made: a full disk raised Python's ENOSPC naming it
    with writes_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        history = read_history(path)
        if row.get("run_id") and "run_id" in history:
            history = history[history["run_id"].astype(str) != str(row["run_id"])]
        new = pd.DataFrame([row])
        table = new if history.empty else pd.concat([history, new], ignore_index=True)
        write_table(table, path)
    finally:
        lock.release()
    return table


# ----------------------------------------------------------------------------- drift history

#: Beside ``drift.csv``: one row per monitor run (:func:`drift_history_row`, appended by
#: :func:`append_history`), by which a drift says since when it has lasted
#: (:func:`with_drift_history`); drift.csv and drift.json hold the latest run alone.
DRIFT_HISTORY = "drift_history.csv"
DRIFT_HISTORY_COLUMNS = (
    "run_id",
    "run_at",
    "images",
    "since_days",
    "n_images",
    "status",
    "warn",
    "fail",
)


def drift_history_row(
    report: DriftReport | None,
    *,
    images: str | os.PathLike,
    since_days: float | None = None,
    run_id: str = "",
    run_at: datetime | None = None,
) -> dict[str, Any]:
    """One :data:`DRIFT_HISTORY` row (columns :data:`DRIFT_HISTORY_COLUMNS`): when the run
    was (``run_at``, default now, ISO 8601 in UTC), what it compared (``images``, the window
    ``since_days``, empty for every image), its verdict and the statistics at ``warn`` and at
    ``fail`` (names separated by spaces). ``report`` None: a run with no image to compare
    (``skipped``)."""
    when = (run_at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    row: dict[str, Any] = {
        "run_id": run_id,
        "run_at": when,
        "images": os.fspath(images),
        "since_days": np.nan if since_days is None else float(since_days),
        "n_images": 0,
        "status": "skipped",
        "warn": "",
        "fail": "",
    }
    if report is not None:
        table = report.table
        row.update(n_images=report.n_images, status=report.status)
        for status in ("warn", "fail"):
            row[status] = " ".join(table.loc[table["status"] == status, "statistic"].astype(str))
    return row


def _drifted_runs(history: pd.DataFrame) -> list[tuple[str, dict[str, str]]]:
    """``(run_at, {statistic: status})`` of each run of ``history`` (a :data:`DRIFT_HISTORY`
    table) that compared images, latest first."""
    runs = []
    for row in reversed(history.to_dict(orient="records")):
        if str(row.get("status")) not in ("ok", "warn", "fail"):
            continue  # no image new in the window: neither ends a drift nor continues it
        drifted = {}
        for status in ("warn", "fail"):
            value = row.get(status)
            names = str(value).split() if isinstance(value, str) else []
            drifted.update(dict.fromkeys(names, status))
        runs.append((str(row.get("run_at", "")), drifted))
    return runs


def drift_lasting(history: pd.DataFrame, report: DriftReport) -> dict[str, tuple[str, int]]:
    """Since when each statistic drifted in ``report`` has drifted, by the runs before it in
    ``history`` (a :data:`DRIFT_HISTORY` table): ``{statistic: (words, runs)}``, the words
    ``fail since 2026-11-02, 3 runs`` where it drifted in each run back to that day's (this
    one counted in ``runs``), ``fail, drifted since ...`` where those runs had it at the
    other status, ``fail, new`` (1 run) where the run before did not have it drifted."""
    table = report.table
    now = table.loc[table["status"].isin(["warn", "fail"]), ["statistic", "status"]]
    runs = _drifted_runs(history) if not history.empty and not now.empty else []
    lasting = {}
    for statistic, status in now.itertuples(index=False):
        lasted = list(takewhile(lambda run, s=statistic: s in run[1], runs))
        if not lasted:
            lasting[statistic] = (f"{status}, new", 1)
            continue
        began = lasted[-1][0]
        first = _aware_time(began)
        day = first.astimezone(UTC).date().isoformat() if first else began
        same = all(drifted[statistic] == status for _, drifted in lasted)
        words = f"{status}{'' if same else ', drifted'} since {day}, {len(lasted) + 1} runs"
        lasting[statistic] = (words, len(lasted) + 1)
    return lasting


def with_drift_history(
    report: DriftReport, history: str | os.PathLike, run_id: str = ""
) -> DriftReport:
    """``report`` whose message says since when its drift has lasted by the runs in
    ``history`` (a :data:`DRIFT_HISTORY` file; none yet: every drift is new,
    :func:`drift_lasting`): first that of the longest-lasting statistic at the batch's status
    (``Fail since 2026-11-02, 3 runs (drift_history.csv): drift in ...``), and at the end each
    statistic's, where they differ. A run that drifted daily for a week raised the same alert
    seven times, nothing saying it was one drift. ``run_id``: this run's, whose failed
    attempt's row is no run before it (a retry said a new drift had lasted 2 runs)."""
    earlier = read_history(history)
    if run_id and "run_id" in earlier:
        earlier = earlier[earlier["run_id"].astype(str) != str(run_id)]
    lasting = drift_lasting(earlier, report)
    if not lasting:
        return report
    table = report.table.set_index("statistic")
    worst = [s for s in lasting if table.loc[s, "status"] == report.status]
    lead = lasting[max(worst, key=lambda s: lasting[s][1])][0]
    message = f"{lead[0].upper()}{lead[1:]} ({Path(history).name}): {report.message}"
    named: dict[str, list[str]] = {}
    for statistic, (words, _) in lasting.items():
        named.setdefault(words, []).append(statistic)
    if len(named) > 1:
        message += ". By statistic: " + "; ".join(
            f"{', '.join(names)} {words}" for words, names in named.items()
        )
    return DriftReport(report.table, report.status, report.n_images, message)
