"""Evaluate a trained model on a labelled split: per-image table, dataset means, worst cases.

Each image is segmented end to end as in production (:func:`mlseg.segment.predict_labels`:
rescaling, normalisation, tiled prediction, instance separation) and compared with its mask
by :mod:`mlseg.metrics`. Outputs in ``out_dir``:

- ``per_image.csv``: one row per image (pixel Dice/IoU/precision/recall, object
  precision/recall/F1 at IoU 0.5, mean matched IoU, AJI, PQ/SQ/RQ, the median predicted /
  true area of matched nuclei (``area_ratio``: the size bias), counts, why the
  unmatched objects are unmatched (:func:`mlseg.metrics.error_kinds`), and the scale
  the image was segmented at: ``scale_factor``, ``scale_source``, ``est_diameter_px``);
- ``summary.json``: the means over images, pooled object counts and error kinds, and what
  was evaluated;
- ``worst.png``: the images of lowest AJI as image | truth | prediction, each reduced to
  its panels' size once scored (:func:`mlseg.plots.worst_case`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlseg.config import DataConfig, InferenceConfig, Profile, get_profile
from mlseg.dataset import (
    Pair,
    _summarise,
    list_split,
    mask_stem,
    mask_to_labels,
    split_dir,
    warn_of_images_left_out,
    warn_of_unused_manifest_rows,
)
from mlseg.errors import DatasetError, size_mismatch, some_of, warn_once
from mlseg.inventory import exact_form, turn_free_hash
from mlseg.io import (
    MASK_EXTENSIONS,
    MemoryUse,
    image_size,
    not_lossless,
    read_image_for,
    read_mask,
    warn_if_short_of_memory,
    write_table,
    write_text,
    written_together,
)
from mlseg.metrics import (
    ERROR_KINDS,
    count_error_of,
    detection_scores,
    object_metrics,
    pixel_metrics,
)
from mlseg.model import LoadedModel, load_model, resolve_model_device
from mlseg.pixel_size import without_size_if_unknown
from mlseg.plots import WORST_SHOWN, WorstCase, worst_case
from mlseg.progress import shown
from mlseg.registry import code_version, eval_set_id

#: Peak memory of one test image in ``mlseg evaluate``, beyond its imports and model
#: (:class:`mlseg.io.MemoryUse`, checked by :func:`mlseg.io.warn_if_short_of_memory`): a
#: bound on the peaks ``bench/warning_memory.py`` measured at 512-8192 px a side (table in
#: bench/README.md; 2-core dev CPU, the default U-Net/resnet34 and a stand-in, H&E fields
#: with their instance masks). The peak is segmenting the image, as ``mlseg segment`` does, or scoring it, with
#: the image and its mask held. The worst cases are reduced to the size worst.png draws them
#: once scored (:func:`mlseg.plots.worst_case`): held and drawn at full size they had taken
#: 143-151 bytes a pixel, summed over the images shown (``bench/evaluate_memory.py``).
EVALUATE_MEMORY = MemoryUse(fixed=2**30, per_pixel=75, banded=55)
#: The metrics that are better higher: what champion/challenger may compare
SCORES = (
    "dice",
    "iou",
    "pixel_precision",
    "pixel_recall",
    "obj_precision",
    "obj_recall",
    "f1",
    "mean_matched_iou",
    "aji",
    "pq",
    "sq",
    "rq",
)
METRIC_COLUMNS = (
    *SCORES,
    "area_ratio",
    "tp",
    "fp",
    "fn",
    "n_true",
    "n_pred",
    "count_error",
    "count_error_rel",
    *ERROR_KINDS,
)


@dataclass
class EvalResult:
    """Scores of one evaluation and where they were written."""

    per_image: pd.DataFrame  # one row per image: stem, METRIC_COLUMNS, size, scale, predict_s
    means: dict[str, float]  # mean of each metric over images
    csv_path: Path
    json_path: Path
    worst_png: Path | None
    out_dir: Path
    eval_set_id: str  # content hash of the split's images, masks, pixel sizes (mlseg.registry)


def score_labels(pred_labels: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
    """Every metric of one image: ``(H, W)`` int label images -> METRIC_COLUMNS."""
    px = pixel_metrics(pred_labels > 0, true_labels > 0)
    obj = object_metrics(pred_labels, true_labels, iou_threshold=0.5)
    row = {
        "dice": px["dice"],
        "iou": px["iou"],
        "pixel_precision": px["precision"],
        "pixel_recall": px["recall"],
        "obj_precision": obj["precision"],
        "obj_recall": obj["recall"],
    }
    matched = ("f1", "mean_matched_iou", "aji", "pq", "sq", "rq", "area_ratio", "tp", "fp", "fn")
    row.update({k: obj[k] for k in matched})
    row.update(count_error_of(obj["tp"] + obj["fp"], obj["tp"] + obj["fn"]))
    row.update({k: obj[k] for k in ERROR_KINDS})
    return row


def describe_errors(per_image: pd.DataFrame) -> str:
    """One sentence on why objects went unmatched, pooled over a per-image table's rows
    (columns ``n_true``, ``n_pred``, ``fn``, ``fp`` and ERROR_KINDS)."""
    total = {k: int(per_image[k].sum()) for k in ("n_true", "n_pred", "fn", "fp", *ERROR_KINDS)}

    def kinds(prefix: str) -> str:
        return ", ".join(
            f"{total[k]} {k.removeprefix(prefix)}" for k in ERROR_KINDS if k.startswith(prefix)
        )

    return (
        f"unmatched at IoU 0.5: {total['fn']} of {total['n_true']} true objects "
        f"({kinds('fn_')}), {total['fp']} of {total['n_pred']} predicted "
        f"({kinds('fp_')})"
    )


def _json_safe(value: Any) -> Any:
    """NaN -> null, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def warn_unlabelled(unlabelled: list[Pair], total: int, data: DataConfig) -> None:
    """Name the images of the split that have no mask: they are not scored, and a misnamed
    mask (``a-mask.png`` for ``a_mask.png``) would otherwise shrink the set without a word."""
    if not unlabelled:
        return
    masks = unlabelled[0].image.parent.parent / data.mask_dir
    shown = some_of(f"{p.image.name} (expected {mask_stem(p.stem, data)}.png)" for p in unlabelled)
    warnings.warn(
        f"{len(unlabelled)} of {total} images have no mask in {masks} and are not scored: "
        f"{shown}; name each mask as expected, or move the image out of the split",
        stacklevel=3,
    )


def predict_image(
    loaded: LoadedModel,
    image: np.ndarray,
    profile: Profile,
    inference_cfg: InferenceConfig,
    pixel_size_um: float | None,
    path: Path | str = "image",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Instance labels ``(H, W) int32`` of one ``(H, W, C)`` uint image, at its own size,
    exactly as ``mlseg segment`` makes them (:func:`mlseg.segment.predict_labels_scaled`),
    and how its scale was chosen (:meth:`mlseg.scale.ScaleEstimate.as_row`):
    ``scale_factor`` (the image was resampled by it), ``scale_source`` (``pixel_size``,
    ``estimated``, ``rejected`` or ``native``) and ``est_diameter_px`` (nucleus diameter
    of the first pass when estimated). A scale at its limits is named by ``path``, as
    ``mlseg segment`` names it (:func:`mlseg.segment.warn_if_scale_at_limit`), and so are
    an image that stain normalisation leaves as it is
    (:func:`mlseg.segment.warn_if_not_stain_normalised`) and a pass that enlarges it beyond
    the memory left (:func:`mlseg.io.warn_if_short_of_memory`; the caller checks the image
    as read)."""
    from mlseg.segment import (
        predict_labels_scaled,
        warn_if_not_stain_normalised,
        warn_if_scale_at_limit,
    )

    stains = warn_if_not_stain_normalised(image, loaded.config.preprocess, profile, path)
    labels, _, scale = predict_labels_scaled(
        loaded,
        image,
        profile,
        inference_cfg,
        pixel_size_um=pixel_size_um,
        stains=stains,
        short_of_memory=partial(
            warn_if_short_of_memory,
            path,
            image.shape,
            EVALUATE_MEMORY,
            "evaluate",
            stream_min_pixels=(inference_cfg or loaded.config.inference).stream_min_pixels,
        ),
    )
    warn_if_scale_at_limit(scale, path)
    return np.asarray(labels, dtype=np.int32), scale.as_row()


def evaluate(
    model_path: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    profile: str | Profile | None = None,
    inference_cfg: InferenceConfig | None = None,
    pixel_size_um: float | None = None,
    progress: bool = True,
    log: Callable[[str], object] | None = None,
) -> EvalResult:
    """Segment every image of ``split`` with the model and score it against its mask.

    ``profile`` (name or object) defaults to the model's training profile, as saved with
    it (older runs: read again from the run config's ``profiles_file``); another name is
    read from that file. ``inference_cfg`` defaults to the model config's inference section.
    ``pixel_size_um``: microns per pixel of every image, in place of the dataset's manifest,
    the images' metadata and the profile; the evaluation set id records it, so scores at
    another scale are never compared. ``progress`` draws a bar; ``log`` (a job's stderr,
    where no bar is drawn) is given a line on how far it is once a minute
    (:class:`mlseg.progress.ProgressLog`).
    """
    from mlseg.quantify import microns_per_pixel
    from mlseg.segment import check_out_dir

    warn_once.cache_clear()  # once per run: a notebook's or worker's next run is told again
    out = Path(out_dir)
    pixel_size_um = microns_per_pixel(pixel_size_um)
    loaded, inference_cfg, device = _load_for_evaluation(model_path, inference_cfg)
    cfg = loaded.config
    profile = _evaluation_profile(loaded, profile)
    pairs, unlabelled = _pairs_by_mask(data_root, split, cfg.data)
    warn_unlabelled(unlabelled, len(pairs) + len(unlabelled), cfg.data)
    # worst.png there would be read as an image without a mask from then on
    check_out_dir(out, *{p.image.parent for p in pairs}, *{p.mask.parent for p in pairs})
    verb = f"evaluate {split}"
    iterator = shown(pairs, verb, "images", log, bar=verb if progress else None, bar_unit="img")
    scored = _score_pairs(iterator, loaded, profile, inference_cfg, pixel_size_um)
    # split: the split's name, whatever its folder
    if split != "train" and scored.seen and any(scored.seen.values()):
        warnings.warn(seen_in_training(data_root, split, len(pairs), scored.seen), stacklevel=2)
    df = pd.DataFrame(scored.rows)
    means = {k: float(df[k].astype(float).mean()) for k in METRIC_COLUMNS}  # NaN skipped
    # the set as this model's data config pairs it (mask suffix, folders): the id that makes
    # two scores comparable must change whenever one of the masks scored here changes
    set_id = eval_set_id(data_root, split, cfg.data, pixel_size_um)
    summary = _summary(
        loaded, profile, inference_cfg, device, data_root, split, set_id, df, means, scored.seen
    )
    worst_png = _write_outputs(out, df, summary, scored.worst)
    csv_path, json_path = out / "per_image.csv", out / "summary.json"
    return EvalResult(df, means, csv_path, json_path, worst_png, out, set_id)


@dataclass
class _Scored:
    """What :func:`_score_pairs` gathers: one row per image, the :data:`WORST_SHOWN` of
    lowest AJI as ``(aji, case)`` (held at its panels' size), and the stems of
    images the model trained (``train``) or chose its checkpoint (``validation``) on
    (``None``: a model saved before mlseg recorded its images' hashes, so nothing checked)."""

    rows: list[dict[str, Any]]
    worst: list[tuple[float, WorstCase]]
    seen: dict[str, list[str]] | None


def _load_for_evaluation(
    model_path: str | Path, inference_cfg: InferenceConfig | None
) -> tuple[LoadedModel, InferenceConfig, Any]:
    """The model, on the device its inference settings (``inference_cfg``, else its
    config's) choose; those settings; that device."""
    loaded = load_model(model_path, device="cpu")
    cfg = loaded.config
    inference_cfg = inference_cfg or cfg.inference
    device = resolve_model_device(inference_cfg.device, cfg, loaded.path.parent)
    loaded.model.to(device)
    return loaded, inference_cfg, device


def _evaluation_profile(loaded: LoadedModel, profile: str | Profile | None) -> Profile:
    """``profile`` as :func:`evaluate` takes it: an object as given, the model's own as
    saved with it, or one read by name from the run config's ``profiles_file``."""
    if profile is None or isinstance(profile, str):
        saved = loaded.meta.get("profile_settings") or {}
        if saved and profile in (None, saved.get("name")):
            profile = loaded.profile  # as saved with the run: its profiles_file may be elsewhere
        else:
            profile = get_profile(profile or loaded.config.profile, loaded.config.profiles_file)
    return profile


def _pairs_by_mask(
    data_root: str | Path, split: str, data: DataConfig
) -> tuple[list[Pair], list[Pair]]:
    """The split's images with a mask and those without, in listing order; DatasetError
    where none has one, or naming every JPEG mask and every mask whose header gives
    another size than its image's (before any image is segmented)."""
    listing = list_split(data_root, split, data, strict=False)
    listed = listing.pairs
    base = split_dir(Path(data_root), data, split)
    for folder in (base / data.image_dir, base / data.mask_dir):
        if folder.is_dir():  # a link to a share not mounted shrank the set unsaid
            warn_of_images_left_out(folder, stacklevel=3)
    masks = base / data.mask_dir
    if listing.orphan_masks:  # a misnamed image shrank the set unsaid, as a misnamed mask did
        orphans = [path.name for path in listing.orphan_masks]
        warnings.warn(
            f"{len(orphans)} mask(s) in {masks} have no image in {base / data.image_dir} and "
            f"are not scored: {some_of(orphans)}; name each image as its mask, or move the "
            "mask out of the split",
            stacklevel=3,
        )
    # a size written for a test image under another name went unused unsaid (validation fails it)
    warn_of_unused_manifest_rows(data_root, split, {p.stem for p in listed}, stacklevel=3)
    if listing.second_masks:  # the image was scored against one of its masks, unsaid which
        seconds = [
            f"{second.name} (its image is scored against {kept.name})"
            for second, kept in listing.second_masks.items()
        ]
        warnings.warn(
            f"{len(seconds)} mask(s) in {masks} are a second mask of an image and are not "
            f"scored: {some_of(seconds)}; keep one mask per image",
            stacklevel=3,
        )
    pairs = [p for p in listed if p.mask is not None]
    if not pairs:
        raise DatasetError(
            f"{data_root}: no labelled images in split {split!r}; nothing to evaluate"
        )
    lossy = [not_lossless(p.mask) for p in pairs if p.mask.suffix.lower() not in MASK_EXTENSIONS]
    if lossy:  # said of the first when read, once every image before it had been segmented
        raise DatasetError(_summarise(lossy))
    # the same, for a mask cropped a pixel in export: sizes from the headers, nothing decoded
    # (one whose header cannot be read is checked when read, as before)
    mismatched = [
        size_mismatch(p.mask, mask_hw, image_hw, p.image)
        for p in pairs
        if (image_hw := image_size(p.image)) is not None
        and (mask_hw := image_size(p.mask)) is not None
        and mask_hw != image_hw
    ]
    if mismatched:
        raise DatasetError(_summarise(mismatched))
    return pairs, [p for p in listed if p.mask is None]


def _score_pairs(
    pairs: Iterable[Pair],
    loaded: LoadedModel,
    profile: Profile,
    inference_cfg: InferenceConfig,
    pixel_size_um: float | None,
) -> _Scored:
    """Segment and score each pair in turn, and find the images the model trained on."""
    trained = trained_images(loaded.meta)
    seen: dict[str, list[str]] = {"train": [], "validation": []}
    scored = _Scored(rows=[], worst=[], seen=seen if trained else None)
    for pair in pairs:
        image = read_image_for(pair.image, profile.stain)  # the pixels segment reads
        warn_if_short_of_memory(
            pair.image,
            image.shape,
            EVALUATE_MEMORY,
            "evaluate",
            stream_min_pixels=inference_cfg.stream_min_pixels,
        )
        if trained and (role := _trained_role(trained, image)):
            seen[role].append(pair.stem)
        truth = _truth_labels(pair, image, loaded.config.data)
        pred, row = _score_image(loaded, pair, image, truth, profile, inference_cfg, pixel_size_um)
        scored.rows.append(row)
        caption = f"Dice {row['dice']:.2f}  AJI {row['aji']:.2f}  PQ {row['pq']:.2f}"
        case = partial(worst_case, pair.stem, image, truth, pred, caption)
        scored.worst = _kept_worst(scored.worst, row["aji"], case)
        del image, truth, pred, case  # not held while the next image is read and segmented
    return scored


def _kept_worst(
    worst: list[tuple[float, WorstCase]], aji: float, case: Callable[[], WorstCase]
) -> list[tuple[float, WorstCase]]:
    """The :data:`WORST_SHOWN` of lowest AJI among ``worst`` and a new image's, ties to the
    earlier; ``case`` reduces the new image to its panels, called only where it is kept.
    The full-size image, labels and float RGB panels of each worst case were held to the
    end and drawn together: over 100 bytes a pixel of a large field, for each of four."""
    new = (aji, None)
    kept = sorted([*worst, new], key=lambda item: item[0])[:WORST_SHOWN]
    return [(aji, case()) if item is new else item for item in kept]


def _truth_labels(pair: Pair, image: np.ndarray, data: DataConfig) -> np.ndarray:
    """The pair's mask as a label image, or DatasetError where it is not the image's size."""
    truth = mask_to_labels(read_mask(pair.mask), data.mask_kind)
    if truth.shape != image.shape[:2]:
        raise DatasetError(size_mismatch(pair.mask, truth.shape, image.shape, pair.image))
    return truth


def _score_image(
    loaded: LoadedModel,
    pair: Pair,
    image: np.ndarray,
    truth: np.ndarray,
    profile: Profile,
    inference_cfg: InferenceConfig,
    pixel_size_um: float | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The image's predicted labels and its row of the per-image table."""
    # the profile's size for an image without its own, none for one declaring pixels not
    # square, as training and segment take it
    um = pixel_size_um if pixel_size_um is not None else pair.size_or(profile.pixel_size_um)
    profile = without_size_if_unknown(profile, um)
    t0 = time.perf_counter()
    pred, scale = predict_image(loaded, image, profile, inference_cfg, um, pair.image)
    seconds = time.perf_counter() - t0
    row = {"stem": pair.stem, **score_labels(pred, truth)}
    row.update(
        height_px=image.shape[0],
        width_px=image.shape[1],
        pixel_size_um=um,
        **scale,
        predict_s=seconds,
    )
    return pred, row


def _pooled(df: pd.DataFrame) -> dict[str, float | int]:
    """Object precision, recall and F1 of the counts pooled over images, and those counts."""
    tp, fp, fn = (int(df[k].sum()) for k in ("tp", "fp", "fn"))
    scores = detection_scores(tp, fp, fn)  # the conventions of one image's scores
    return {
        "obj_precision": scores["precision"],
        "obj_recall": scores["recall"],
        "f1": scores["f1"],
        "tp": tp,
        "fp": fp,
        "fn": fn,
        **{k: int(df[k].sum()) for k in ERROR_KINDS},
    }


def _summary(
    loaded: LoadedModel,
    profile: Profile,
    inference_cfg: InferenceConfig,
    device: Any,
    data_root: str | Path,
    split: str,
    set_id: str,
    df: pd.DataFrame,
    means: dict[str, float],
    seen: dict[str, list[str]] | None,
) -> dict[str, Any]:
    """``summary.json``'s content: what was evaluated, the means and the pooled counts."""
    from mlseg.segment import model_identity

    return {
        "model": str(loaded.path),
        # what the scores belong to, where paths are only names: the model (weights, stain
        # reference, what of config.json and meta.json shapes predictions) by content, as
        # mlseg segment records it, and the scored set's content
        "model_id": model_identity(loaded.path, loaded.config, loaded.meta),
        "data": str(data_root),
        "split": split,
        "eval_set_id": set_id,
        "profile": profile.name,
        "profile_version": profile.version,
        "mlseg_version": code_version(),
        "device": str(device),
        "n_images": len(df),
        # null: a model saved before mlseg recorded its images' hashes, so nothing checked
        "seen_in_training": seen,
        "means": means,
        "pooled": _pooled(df),
        "inference": inference_cfg.model_dump(mode="json"),
    }


def _write_outputs(
    out: Path, df: pd.DataFrame, summary: dict[str, Any], worst: list[tuple[float, WorstCase]]
) -> Path | None:
    """Write ``per_image.csv``, ``summary.json`` and ``worst.png`` (where there are worst
    cases) into ``out``, all three or none; the path of ``worst.png``, if written."""
    from mlseg.plots import plot_worst

    # the three or none: a disk that filled at worst.png left this model's table and summary
    # beside the previous model's worst cases, as if they were this one's
    with written_together(out) as staging:
        write_table(df, staging / "per_image.csv")
        write_text(staging / "summary.json", json.dumps(_json_safe(summary), indent=2))
        if worst:
            plot_worst([item for _, item in worst], staging / "worst.png")
    return out / "worst.png" if worst else None


def trained_images(meta: dict[str, Any]) -> dict[str, str]:
    """``turn_free_hash -> "train" | "validation"`` of the images a model trained and chose
    its checkpoint on, as its ``meta.json`` records them; empty for a model saved before
    mlseg recorded them."""
    hashes = meta.get("image_hashes") or {}
    return {h: role for role in ("validation", "train") for h in hashes.get(role, [])}


def _trained_role(trained: dict[str, str], image: np.ndarray) -> str | None:
    """``"train"``, ``"validation"`` or ``None``: whether ``image`` (as read) is, by its
    pixels, one that :func:`trained_images` lists; a converted copy (grey or RGB, 8 or 16
    bits: :func:`mlseg.inventory.exact_form`) is found by its exact form, and an image that
    has one by its stored pixels too, as a model saved before mlseg hashed exact forms
    recorded it."""
    exact = exact_form(image)
    role = trained.get(turn_free_hash(exact))
    if role is None and (exact.shape != image.shape or exact.dtype != image.dtype):
        role = trained.get(turn_free_hash(image, exact=False))
    return role


def seen_in_training(data_root: str | Path, split: str, n: int, seen: dict[str, list[str]]) -> str:
    """The warning for scored images that the model trained on or validated on, found by
    their pixels (a copy renamed, converted, mirrored or turned too): an evaluation set
    ingested again with more images, or a test split holding a training image's copy."""
    parts = []
    if seen["train"]:
        parts.append(f"{len(seen['train'])} are images it trained on ({some_of(seen['train'], 3)})")
    if seen["validation"]:
        held = seen["validation"]
        parts.append(f"{len(held)} are images it chose its checkpoint on ({some_of(held, 3)})")
    return (
        f"{data_root}: of the {n} images of split {split!r}, {' and '.join(parts)}, as their "
        "pixels show; their scores are not held out and overstate how the model segments "
        "new images: score it on images it has not seen"
    )
