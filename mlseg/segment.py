"""Segment and quantify folders of images: the "quantitative characteristics" stage.

:func:`predict_labels` is the pure step (image in, labels out); :func:`segment_folder` and
:func:`quantify_folder` are the batch edges that read files, skip finished images, and
write the outputs of :mod:`mlseg.outputs`.

Resuming: an image is finished when ``<stem>.json`` exists (written last, atomically), the
outputs it lists exist and it records the same profile name and version, model (for
``segment``), input digest (the content of the image, and for ``quantify`` of its label
file: a file replaced under the same name is redone) and settings digest (profile content,
inference settings, pixel size). A rerun after a crash or with new images does only what is
missing; changed settings redo all.

Pixel size of an image (:func:`mlseg.pixel_size.image_pixel_size`), first found: the
``pixel_size_um`` argument (CLI ``--pixel-size``), the image's entry in ``pixel_sizes``
(stem -> microns per pixel; CLI ``--pixel-sizes sizes.csv``, the pipeline passes the dataset
manifest's), the image's JSON sidecar (``<stem>.json``) or TIFF metadata (OME-XML, ImageJ,
Aperio, resolution tags; values outside :data:`mlseg.pixel_size.PLAUSIBLE_PIXEL_SIZE_UM` are
ignored with a warning, e.g. the 72 dpi default of many writers), the profile's
``pixel_size_um``. The profile's ``units`` decides whether it is used (``auto``), required
(``um``) or ignored (``px``).

Scale (``inference.auto_scale``, on by default): with the pixel size of both the image and
the model known, the image is resampled by their ratio; with either unknown, the scale is
estimated from the nuclei of a first pass against the nucleus diameter the model recorded
at training time (:mod:`mlseg.scale`, Cellpose's size-model idea); the profile's size limits
in square microns then apply at the model's pixel size, as if the image had one.
``inference.zoom`` (1 by default) then multiplies the factor of every pass, so the model
sees nuclei larger than it was trained on. Labels always come back on the original grid;
measurements stay in pixels.

Stain test-time augmentation (``inference.stain_tta``, on by default for Macenko-normalised
H&E and IHC, the ``he`` profile's setting): the probabilities of the normalised image and of
a copy with its haematoxylin 1.5x denser are averaged (:mod:`mlseg.infer`), so nuclei paler
than the training lab's are found too; :func:`stain_tta_for` says when it applies.

Bad input is reported per image (the run goes on; :class:`SegmentResult.failed` names each
file and why): unreadable file, channel count other than the profile's, mask and image of
different sizes, micron units without a pixel size. An image without nuclei gives an empty
table and a zero count, not an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlseg.config import Config, InferenceConfig, PreprocessConfig, Profile, get_profile
from mlseg.dataset import (
    check_pixel_size,
    is_image_file,
    warn_of_images_left_out,
    warn_of_unused_rows,
)
from mlseg.errors import (
    ConfigError,
    DatasetError,
    MlsegError,
    ModelError,
    not_a_folder,
    oom_said,
    some_of,
    warn_once,
)
from mlseg.infer import NO_STAIN_TTA, StainTTA
from mlseg.io import (
    IMAGE_EXTENSIONS,
    TIFF_EXTENSIONS,
    MemoryUse,
    file_digest,
    full_scale,
    image_stem,
    input_digest,
    match_stem,
    read_image_for,
    read_mask,
    warn_if_short_of_memory,
    without_image_extension,
)
from mlseg.outputs import (
    OUTPUT_SUFFIXES,
    RUN_LOCK,
    RunNuclei,
    first_finished_at,
    image_done,
    update_run_outputs,
    write_image_outputs_tagged,
    writing_to,
)
from mlseg.pixel_size import (
    ImplausiblePixelSizeWarning,
    declared_pixel_size_um,
    image_pixel_size,
    implausible_message,
    labels_pixel_size_um,
    labels_sidecar,
    not_square_declared,
    plausible_pixel_size,
    sidecar_path,
    tiff_pixel_size_um,
    without_size_if_unknown,
)
from mlseg.preprocess import ESTIMATE
from mlseg.progress import ProgressLog
from mlseg.quantify import (
    effective_pixel_size,
    measure,
    microns_per_pixel,
    summarize,
    tissue_fraction,
)
from mlseg.registry import code_version, package_versions
from mlseg.scale import META_KEY, META_STAT_KEY, MIN_OBJECTS

LABEL_SUFFIXES = ("_cp_masks", "_masks", "_mask", "_labels", "_label")
#: Peak memory of one field in ``mlseg segment`` and ``mlseg quantify``, beyond their
#: imports and model (:class:`mlseg.io.MemoryUse`, checked by
#: :func:`mlseg.io.warn_if_short_of_memory`): bounds on the peaks ``bench/warning_memory.py``
#: measured at 512-8192 px a side (table in bench/README.md; 2-core dev CPU, CLI defaults,
#: the default U-Net/resnet34 and a stand-in, RGB H&E fields). Segment's pixels are those
#: segmented: an image resampled to the model's scale is counted again at ``factor**2`` its
#: pixels before that pass (:func:`predict_labels_scaled`'s ``short_of_memory``), and one of
#: more than ``inference.stream_min_pixels`` is labelled in row bands (``banded``).
SEGMENT_MEMORY = MemoryUse(fixed=2**30, per_pixel=75, banded=40)
QUANTIFY_MEMORY = MemoryUse(fixed=32 * 2**20, per_pixel=30)


@dataclass
class SegmentResult:
    """What a folder run did. ``failed`` maps a file to the reason it was not processed."""

    out_dir: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    summaries: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


# ----------------------------------------------------------------------------- the step
def check_channels(image: np.ndarray, profile: Profile, path: Path | str) -> None:
    """The image must have the channel count the profile was made for. A grey image also
    passes a fluorescence profile: a single-channel camera image is fluorescence's usual
    form, training takes it (repeated to the model's channels by
    :func:`mlseg.preprocess.match_channels`), and inference repeats it the same way."""
    channels = 1 if image.ndim == 2 else int(image.shape[2])
    grey_fluorescence = channels == 1 and profile.stain == "fluorescence"
    if channels != profile.channels and not grey_fluorescence:
        raise DatasetError(
            f"{path}: image has {channels} channel(s) but profile {profile.name!r} expects "
            f"{profile.channels}; convert the image or use a profile with channels: {channels}"
        )


def check_model_channels(image: np.ndarray, loaded, profile: Profile) -> None:
    """The model must take the image's channels: as they are, or by grey repeated to its
    channels or RGB averaged to its grey (:func:`mlseg.preprocess.match_channels`; a
    fluorescence image of one colour is grey, :func:`~mlseg.preprocess.one_channel_as_grey`).
    A model of two channels (DAPI and a membrane marker) given an RGB image ended the whole
    run with a ValueError traceback that named neither the model nor the image."""
    from mlseg.preprocess import one_channel_as_grey

    channels, wanted = 1 if image.ndim == 2 else int(image.shape[2]), loaded.in_channels
    if channels == wanted or 1 in (channels, wanted):
        return
    if profile.stain == "fluorescence" and one_channel_as_grey(image).shape[2] == 1:
        return
    if channels == 4 and wanted == 3:
        # an RGBA array (PIL, scikit-image and OpenSlide's read_region give one) was told to
        # find a 4-channel model, where its file is segmented laid over its background
        raise ModelError(
            f"the image has 4 channels (RGBA?) and the model {loaded.path} takes 3; read it "
            f"with mlseg.io.read_image_for(path, {profile.stain!r}), which lays it over its "
            "background as mlseg segment does, or drop an opaque alpha (image[..., :3])"
        )
    raise ModelError(
        f"the image has {channels} channels and the model {loaded.path} takes {wanted}; "
        f"segment {wanted}-channel images with it (a profile of channels: {wanted}), or "
        f"use a model trained on {channels}-channel images"
    )


def check_model_stain(loaded, profile: Profile) -> None:
    """A model that normalises H&E/IHC stains (its ``preprocess.stain_norm``) takes only
    images of a bright-field stain: an H&E model given fluorescence images failed each with
    "preprocess.stain_norm='macenko' applies to RGB H&E/IHC images only; set it to 'none'",
    a setting of the model's own config.json, where it would feed the network pictures it
    never learnt on."""
    method = loaded.config.preprocess.stain_norm
    if method != "none" and not profile.brightfield:
        images = "fluorescence" if profile.stain == "fluorescence" else "unstained"
        raise ModelError(
            f"the model {loaded.path} was trained on {method}-normalised H&E/IHC images "
            f"(its preprocess.stain_norm) and profile {profile.name!r} is for {images} "
            f"images (stain: {profile.stain}); segment H&E or IHC images with it (a profile "
            f"of stain he or ihc), or use a model trained on {images} images"
        )


def image_array(image: Any) -> np.ndarray:
    """``image`` as :func:`predict_labels` takes it, or :class:`ValueError` saying what it is
    and the fix: one ``(H, W)`` or ``(H, W, C)`` array, channels last, uint8/uint16 as stored
    or float in [0, 1]. A PIL image or a CPU tensor is taken as its array. A float image of
    0-255 or an int64 one reached the network far outside the [0, 1] it learnt on and gave
    one 'nucleus' where the same image in uint8 gave 17, with no error."""
    array = np.asarray(image)
    shape = tuple(array.shape)
    if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[2] > 4:
        raise ValueError(
            f"expected an (H, W) or (H, W, C) image, got shape {shape}: channels first? "
            "use np.moveaxis(image, 0, -1)"
        )
    if array.ndim not in (2, 3):
        raise ValueError(
            f"expected one (H, W) or (H, W, C) image, got shape {shape}; segment a stack "
            "plane by plane"
        )
    if array.dtype.type in (np.uint8, np.uint16):
        return array.astype(array.dtype.newbyteorder("="), copy=False)  # ">u2" of a raw file
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low >= 0.0 and high <= 1.0:  # NaN fails both
            return array
        raise ValueError(
            f"a float image must hold values in [0, 1], got {low:g} to {high:g}; divide an "
            "8-bit image's values by 255"
        )
    raise ValueError(
        f"expected a uint8 or uint16 image (or float in [0, 1]), got {array.dtype}; convert "
        "it, e.g. image.astype(np.uint8) where it holds 0-255"
    )


def warn_if_not_stain_normalised(
    image: np.ndarray, preprocess: PreprocessConfig, profile: Profile, path: Path | str
):
    """Stain normalisation (Macenko or Reinhard) leaves an image with too little stain as
    it is (:func:`mlseg.preprocess.macenko_estimate`: blank glass, a faded slide, one
    colour): say so, naming the file and which of these it is. The model then sees it unlike
    every slide it learnt from, and a count of 0 may be a pale slide rather than glass (H&E
    at a tenth of its optical density: 0 nuclei where a sixth gave 103).

    Returns the estimate made (``stains`` of :func:`mlseg.preprocess.normalize`, the one the
    native-scale pass normalises with, so it is not made twice), or
    :data:`mlseg.preprocess.ESTIMATE` where none applies."""
    from mlseg.preprocess import NO_ESTIMATE, own_stains

    stains, reason = own_stains(image, preprocess, profile.stain)
    if stains is None:
        method = preprocess.stain_norm.capitalize()
        # a haematoxylin-only smear, thousands of pixels stained, was called faded or pale
        meaning = {
            "few": "right for blank glass, but on a faded or very pale slide the count may "
            "be too low",
            "one_colour": "the model sees it unlike the two-stain slides it was trained on "
            "(a haematoxylin-only or other single-stain slide: train on such slides with "
            "preprocess.stain_norm none)",
            "no_haematoxylin": "few nuclei may be right (red cells, an eosin-only field)",
        }[reason]
        warnings.warn(
            f"{path}: {method} normalisation found no two stains to normalise ("
            f"{NO_ESTIMATE[reason]}), segmented un-normalised: {meaning}",
            stacklevel=2,
        )
    return stains


def predict_labels(
    loaded,
    image: np.ndarray,
    profile: Profile,
    inference_cfg: InferenceConfig | None = None,
    *,
    pixel_size_um: float | None = None,
    device=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment one image: ``(H, W, C)`` uint8/uint16 -> ``((H, W) int32 labels, probs)``.

    ``image`` as :func:`mlseg.io.read_image_for` gives it for the profile's stain
    (:func:`image_array` says what else is taken): channels last, in RGB order. OpenCV's
    ``cv2.imread`` gives BGR; convert it with ``cv2.cvtColor(image, cv2.COLOR_BGR2RGB)``,
    since nothing in the pixels tells the two apart and an H&E tile in BGR gave 9 nuclei,
    none of them on one of its 20.

    ``loaded``: a :class:`mlseg.model.LoadedModel`. With ``auto_scale`` (the default) the
    image is brought to the model's scale first: when both the image's and the model's
    pixel sizes are known, by their ratio; otherwise, when the model records the nucleus
    diameter of its training masks (``meta.json``: ``nucleus_diameter_px``), by the size of
    the nuclei found in a first pass (:mod:`mlseg.scale`). ``pixel_size_um`` ``None`` takes
    the profile's ``pixel_size_um``, as :func:`segment_image` does for a file that declares
    none. Probabilities are resampled back, so labels are on the original grid. ``probs``
    is ``(K, H, W) float32``, or ``None`` for images over ``stream_min_pixels`` (labelled
    band by band, see
    :func:`mlseg.infer.predict_labels_banded`).

    Warns, as ``mlseg segment`` does for a file, where the image, as given or as enlarged to
    the model's scale, would need more memory than the process has left
    (:func:`mlseg.io.warn_if_short_of_memory`, :data:`SEGMENT_MEMORY`).
    """
    image = image_array(image)
    stream = (inference_cfg or loaded.config.inference).stream_min_pixels
    short_of_memory = functools.partial(
        warn_if_short_of_memory,
        "the image (an array)",
        image.shape,
        SEGMENT_MEMORY,
        "segment",
        stream_min_pixels=stream,
    )
    told = short_of_memory()
    labels, probs, _ = predict_labels_scaled(
        loaded,
        image,
        profile,
        inference_cfg,
        pixel_size_um=pixel_size_um,
        device=device,
        short_of_memory=None if told else short_of_memory,
    )
    return labels, probs


def predict_labels_scaled(
    loaded,
    image: np.ndarray,
    profile: Profile,
    inference_cfg: InferenceConfig | None = None,
    *,
    pixel_size_um: float | None = None,
    device=None,
    stains: Any = ESTIMATE,
    short_of_memory: Callable[..., bool] | None = None,
):
    """:func:`predict_labels` plus how the scale was chosen: ``(labels, probs, scale)``,
    ``scale`` a :class:`mlseg.scale.ScaleEstimate` whose ``source`` says where the factor
    came from: ``pixel_size`` (image and model pixel sizes), ``estimated`` (the nuclei of a
    first pass), ``rejected`` (an estimate was implausible, native scale kept) or
    ``native`` (auto-scaling off, no reference diameter, or too few nuclei).
    ``stains``: the image's Macenko estimate where already made
    (:func:`warn_if_not_stain_normalised`), used by a pass at native scale. A GPU out of
    memory raises :class:`ConfigError` naming the settings to lower, its cache emptied.
    ``short_of_memory`` (:func:`mlseg.io.warn_if_short_of_memory` of the image, as read) is
    called before each pass that enlarges the image, with ``factor=`` (zoom included) and
    ``why=``, until it warns: a field checked as read is segmented at up to 16x its pixels
    (a 4x scale estimate), and a 1024 px field peaked 1.2 GB above the native pass's
    0.13 GB."""
    import torch

    from mlseg.instances import area_limits_px, filter_sizes
    from mlseg.scale import ScaleEstimate, auto_scale, statistic_of

    image = image_array(image)
    check_model_channels(image, loaded, profile)
    check_model_stain(loaded, profile)
    warn_if_preprocess_not_applied(loaded, profile)
    # an array declares no size: the profile's, as for a file that declares none
    # (:func:`mlseg.pixel_size.image_pixel_size`)
    pixel_size_um = microns_per_pixel(
        profile.pixel_size_um if pixel_size_um is None else pixel_size_um
    )
    cfg = inference_cfg or loaded.config.inference
    if device is None:
        device = _model_device(loaded.model)
    model_px = loaded.pixel_size_um

    told = False  # short_of_memory warned of this image

    def run(factor: float, why: str) -> tuple[np.ndarray, np.ndarray | None]:
        nonlocal told
        # zoom acts on every pass: nuclei keep their size on the original grid, so the
        # scale estimate and its plausibility check read the zoomed passes the same way
        if short_of_memory is not None and factor * cfg.zoom > 1 and not told:
            asked = [why] if factor != 1 and why else []
            if cfg.zoom != 1:
                asked.append(f"inference.zoom {cfg.zoom:g}")
            told = short_of_memory(factor=factor * cfg.zoom, why="; ".join(asked))
        try:
            return _predict_at(
                loaded, image, profile, cfg, pixel_size_um, factor * cfg.zoom, device, stains
            )
        except torch.OutOfMemoryError as err:
            said = oom_said(err)
        # out of the except block the failed pass's tensors are freed: the card's cache goes
        # back to the next image and to other processes on the card
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        smaller = [f"--batch-size {cfg.batch_size // 2}"] if cfg.batch_size > 1 else []
        if cfg.tile_size >= 128:
            smaller.append(f"--tile {cfg.tile_size // 64 * 32}")
        raise ConfigError(
            f"out of memory on {device} with tiles of {cfg.tile_size} px in batches of "
            f"{cfg.batch_size} ({said}); lower inference.batch_size or tile_size "
            f"({' '.join(smaller) or '--device cpu'} with mlseg segment or evaluate), or free "
            "the GPU of other processes"
        )

    def at(factor: float, source: str, why: str = ""):
        return (*run(factor, why), ScaleEstimate(factor, source))

    if not cfg.auto_scale:
        return at(1.0, "native")
    if pixel_size_um is not None and model_px is not None:
        return at(
            float(pixel_size_um) / float(model_px),
            "pixel_size",
            f"its pixel size, {pixel_size_um:g} um, against the model's {model_px:g} um",
        )
    meta = loaded.meta if isinstance(loaded.meta, dict) else {}
    reference = meta.get(META_KEY)
    usable = (
        isinstance(reference, numbers.Real)
        and not isinstance(reference, bool)
        and math.isfinite(reference)
        and reference > 0
    )
    if not usable:
        # NaN (json's NaN in an edited or damaged meta.json) failed every image with "cannot
        # convert float NaN to integer"; a negative one was "estimated" and never applied
        if META_KEY not in meta:
            why = "trained before mlseg learnt it"
        elif reference in (None, 0):  # recorded as unknown
            why = f"its training masks held fewer than {MIN_OBJECTS} nuclei to measure"
        else:
            why = f"its meta.json holds {reference!r}, not a diameter in pixels"
        warn_once(
            f"{loaded.path}: the model records no {META_KEY} ({why}), so the scale of an "
            "image without a pixel size cannot be estimated; predicting at native scale "
            "(retrain, or give the pixel size)"
        )
        return at(1.0, "native")
    probs_at: dict[float, np.ndarray | None] = {}

    estimated = (
        f"the scale estimate: the nuclei of a first pass against the model's {reference:.3g} px"
    )

    def predict(factor: float) -> np.ndarray:
        labels, probs = run(factor, estimated)
        for older in list(probs_at)[:-1]:  # the returned pass is this one or the one before
            del probs_at[older]
        probs_at[factor] = probs
        return labels

    labels, estimate = auto_scale(predict, float(reference), statistic=statistic_of(loaded.meta))
    if estimate.source == "estimated" and model_px is not None and profile.units != "px":
        # the estimate puts the image at the model's pixel size, so the profile's physical
        # size limits apply as they would with a known pixel size: pieces far smaller than
        # any nucleus go (bench/README.md: 555 objects for 97 nuclei on one tile without)
        lo, hi = area_limits_px(profile, float(model_px) * estimate.factor)
        labels = filter_sizes(labels, lo, hi)
    return labels, probs_at.get(estimate.factor), estimate


def _predict_at(
    loaded,
    image: np.ndarray,
    profile: Profile,
    cfg: InferenceConfig,
    pixel_size_um: float | None,
    factor: float,
    device,
    stains: Any = ESTIMATE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample ``image`` by ``factor``, predict and label there (where nuclei have the
    size the model knows), then map labels (nearest) and probabilities (linear) back to the
    original grid. Area limits apply there, after the mapping back, where the table measures
    (microns when the pixel size is known, else the profile's pixel limits): mapped back, a
    nucleus's area is not its work-grid area over factor**2, and limits applied on the work
    grid kept nuclei under ``min_area`` and dropped some within the limits. ``stains``
    (``image``'s Macenko estimate) serves at factor 1 only: a resampled image has its own."""
    import cv2

    from mlseg.infer import adapted_batchnorm, predict_labels_banded, predict_probs
    from mlseg.instances import area_limits_px, filter_sizes, probs_to_labels
    from mlseg.preprocess import normalize, rescale_image, resize_labels

    height, width = image.shape[:2]
    work = rescale_image(image, factor, 1.0) if factor != 1.0 else image
    own = stains if factor == 1.0 else ESTIMATE
    x = normalize(
        work, loaded.config.preprocess, profile.stain, channels=loaded.in_channels, stains=own
    )
    stain_tta = stain_tta_for(cfg, profile, loaded.config.preprocess, loaded.in_channels)
    px = effective_pixel_size(profile, pixel_size_um)
    work_px = px / factor if px is not None else None
    lo, hi = area_limits_px(profile, px)
    # resampled, every object is kept on the work grid and the limits apply once mapped back
    work_lo, work_hi = (lo, hi) if factor == 1.0 else (0, work.shape[0] * work.shape[1])
    side = loaded.min_side
    adapted = (
        adapted_batchnorm(loaded.model, x, cfg, side) if cfg.adapt_bn else contextlib.nullcontext()
    )
    with adapted:
        if work.shape[0] * work.shape[1] > cfg.stream_min_pixels:
            labels = predict_labels_banded(
                loaded.model,
                x,
                cfg,
                target=loaded.target,
                watershed=profile.watershed,
                pixel_size_um=work_px,
                min_area_px=work_lo,
                max_area_px=work_hi,
                device=device,
                stain_tta=stain_tta,
                min_side=side,
            )
            if factor != 1.0:
                labels = filter_sizes(resize_labels(labels, (height, width)), lo, hi)
            return labels, None
        probs = predict_probs(
            loaded.model,
            x,
            cfg,
            target=loaded.target,
            device=device,
            stain_tta=stain_tta,
            min_side=side,
        )
    labels = probs_to_labels(
        probs,
        loaded.target,
        profile.watershed,
        pixel_size_um=work_px,
        min_area_px=work_lo,
        max_area_px=work_hi,
    )
    if factor != 1.0:
        labels = filter_sizes(resize_labels(labels, (height, width)), lo, hi)
    if probs.shape[1:] != (height, width):
        probs = np.stack(
            [cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in probs]
        )
    return labels, probs


def stain_tta_for(
    cfg: InferenceConfig, profile: Profile, preprocess: PreprocessConfig, channels: int
) -> StainTTA:
    """The stain test-time augmentation that applies: ``cfg.stain_tta``'s gains, in the
    stains of ``preprocess``'s Macenko target (:func:`mlseg.preprocess.macenko_target`),
    when the model sees a Macenko-normalised RGB brightfield image in [0, 1] (profile stain
    he or ihc, three input channels, ``preprocess.stain_norm`` macenko, no intensity
    normalisation), else off. Normalised, every slide's haematoxylin has the target's
    direction, the one the augmentation scales. Without normalisation it was not measured
    on real slides, and on the synthetic demo set (a model trained on un-normalised H&E,
    IHC and fluorescence images) it cost 0.01-0.02 Dice on the H&E tiles."""
    from mlseg.preprocess import macenko_target

    tta = StainTTA(tuple(cfg.stain_tta))
    if _stain_tta_blockers(profile, preprocess, channels) or tta.off:
        return NO_STAIN_TTA
    stains = macenko_target(preprocess)[0]
    return StainTTA(tta.gains, tuple(tuple(float(v) for v in col) for col in stains.T))


def _stain_tta_blockers(profile: Profile, preprocess: PreprocessConfig, channels: int) -> list[str]:
    """Why stain test-time augmentation cannot act here (:func:`stain_tta_for`), one
    phrase each; empty where it acts."""
    why = []
    if not profile.brightfield:
        why.append(f"profile {profile.name!r} is for {profile.stain} images")
    if channels != 3:
        why.append(f"the model takes {channels} channels")
    if preprocess.stain_norm != "macenko":
        why.append(
            f"the model was trained without Macenko normalisation "
            f"(preprocess.stain_norm: {preprocess.stain_norm})"
        )
    if preprocess.intensity_norm != "none":
        why.append(
            f"the model normalises intensities (preprocess.intensity_norm: "
            f"{preprocess.intensity_norm})"
        )
    return why


def check_stain_tta(loaded, profile: Profile) -> None:
    """Stain test-time augmentation asked for (``mlseg segment --stain-tta``) where
    :func:`stain_tta_for` turns it off raises :class:`ConfigError` saying why: the flag
    changed nothing and ``run.json`` still recorded its gains as used."""
    why = _stain_tta_blockers(profile, loaded.config.preprocess, loaded.in_channels)
    if why:
        raise ConfigError(
            "--stain-tta acts on Macenko-normalised H&E/IHC images only and "
            f"{'; '.join(why)}, so it would change nothing; leave it out (model {loaded.path})"
        )


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return "cpu"


def check_micron_units(
    profile: Profile, px: float | None, path: Path, image: Path | None = None
) -> None:
    """:func:`mlseg.quantify.effective_pixel_size`'s refusal of micron units without a
    pixel size, as a :class:`ConfigError` naming ``path``. Where ``image`` (``path`` by
    default) declares pixels that are not square, that is the cause it names, with its
    fixes: setting pixel_size_um in the profile, which the profile may have, cannot help."""
    try:
        effective_pixel_size(profile, px)
    except ConfigError as err:
        cause = not_square_declared(image or path)
        if cause is None:
            raise ConfigError(f"{path}: {err}") from None
        raise ConfigError(
            f"{path}: profile {profile.name!r} asks for micron units but {cause}, so the "
            "image has no pixel size, not even the profile's: resample it to square pixels "
            "(Fiji: Image > Scale) and declare that size, give its size in a pixel-size "
            "table (--pixel-sizes) or pass --pixel-size, or use --units px"
        ) from None


def quantify_image(
    image: np.ndarray | None,
    labels: np.ndarray,
    profile: Profile,
    *,
    pixel_size_um: float | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Measurements and summary of one labelled image (pure; see :mod:`mlseg.quantify`).
    ``pixel_size_um`` ``None`` takes the profile's, as for a file that declares none."""
    if pixel_size_um is None:
        pixel_size_um = profile.pixel_size_um
    px = effective_pixel_size(profile, pixel_size_um)
    table = measure(labels, image, profile, pixel_size_um=px)
    tissue = (
        tissue_fraction(
            image,
            profile.stain,
            od_threshold=profile.tissue_od_threshold,
            intensity_threshold=profile.tissue_intensity_threshold,
        )
        if image is not None
        else None
    )
    summary = summarize(table, labels.shape, profile, px, tissue)
    # The stored value taken as white (255; 4095 for a 12-bit camera's 16-bit file).
    summary["full_scale"] = full_scale(image) if image is not None else None
    return table, summary


# ----------------------------------------------------------------------------- helpers
def check_out_dir(out_dir: str | Path, *inputs: str | Path | None) -> Path:
    """``out_dir``, refused where it is an input folder: its outputs would be read as input
    images next time, and each ``<stem>.json`` as the pixel-size sidecar of its image."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir}: a file, not an output folder; give a folder")
    for folder in inputs:
        if folder is not None and out_dir.resolve() == Path(folder).resolve():
            raise DatasetError(
                f"{out_dir}: the output folder is the input folder; write the outputs to "
                f"another folder (e.g. {out_dir / 'mlseg-out'}) so they are never read as inputs"
            )
    return out_dir


def list_images(folder: Path, out_dir: str | Path | None = None) -> list[Path]:
    """Image files of ``folder`` (not recursive, no hidden files), sorted by name.

    Subfolders holding images are named in a warning, except an output folder of mlseg
    (``run.json``) and ``out_dir``, this run's own, which a run killed before its first
    ``run.json`` leaves without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise not_a_folder(folder, "input")
    files = _images_in(folder)
    nested = subfolders_with_images(folder, out_dir)
    if nested:  # a lab's folder per case or per slide
        listed = some_of(nested, 3)
        if not files:
            raise DatasetError(
                f"{folder}: no images here, only in its subfolders ({listed}); subfolders are "
                f"not searched: run once per subfolder, each with its own output folder"
            )
        warnings.warn(
            f"{folder}: the images in its subfolders ({listed}) are not segmented; subfolders "
            f"are not searched: run once per subfolder",
            stacklevel=3,
        )
    warn_of_images_left_out(folder, stacklevel=3)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}); check the folder")
    first: dict[str, Path] = {}
    clashes = []
    for path in files:
        key = image_stem(path).casefold()  # outputs may land on a case-insensitive disk
        if key in first:
            clashes.append(f"{first[key].name} and {path.name}")
        first.setdefault(key, path)
    if clashes:
        raise DatasetError(
            f"{folder}: {some_of(clashes, sep='; ')} differ only "
            f"in extension or case, but each image's outputs are named after its stem "
            f"(<stem>_nuclei.csv), so one would be skipped as done; rename one of each"
        )
    for path in files:
        check_stem(image_stem(path), path)
    return files


def subfolders_with_images(folder: Path, out_dir: str | Path | None = None) -> list[str]:
    """Names of ``folder``'s subfolders that hold images, sorted, which :func:`list_images`
    does not search; an output folder of mlseg (:func:`is_output_folder`) and ``out_dir``
    are not among them."""
    own = Path(out_dir).resolve() if out_dir is not None else None
    return sorted(  # an output folder of mlseg inside the input one holds overlays, not input
        d.name
        for d in Path(folder).iterdir()
        if d.is_dir() and not is_output_folder(d) and d.resolve() != own and _images_in(d)
    )


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` is an output folder of ``mlseg segment`` or ``quantify``: it holds
    the ``run.json`` a run writes last, or the lock (:data:`mlseg.outputs.RUN_LOCK`) its first
    run took before any image's outputs, which a first run still writing (or killed) has
    alone: quantify reading such a folder took each overlay for a label file."""
    return (folder / "run.json").is_file() or (folder / RUN_LOCK).is_file()


#: Stems whose per-image record would be a run file: ``run.json`` is the run's.
RESERVED_STEMS = ("run",)
#: The longest name an output of an image gets after its stem (:func:`write_image_outputs`).
LONGEST_OUTPUT_SUFFIX = max(OUTPUT_SUFFIXES, key=len)
#: Bytes in a file name on ext4, XFS, APFS and NTFS alike.
NAME_MAX = 255


def check_stem(stem: str, path: Path) -> None:
    """Refuse an image whose outputs would overwrite the run's own (``run.json``)."""
    if stem.casefold() in RESERVED_STEMS:
        raise DatasetError(
            f"{path}: an image named {stem!r} would have its record <stem>.json overwritten by "
            f"the run's {stem}.json; rename the file"
        )


def check_output_names(stem: str, path: Path) -> None:
    """Refuse, before any work, an image whose outputs' names would be longer than a file
    name may be (its writes would fail halfway through the run)."""
    longest = len(f"{stem}{LONGEST_OUTPUT_SUFFIX}".encode())
    if longest > NAME_MAX:
        raise DatasetError(
            f"{path}: its outputs' names (<stem>{LONGEST_OUTPUT_SUFFIX}) would be {longest} "
            f"bytes, more than the {NAME_MAX} a file name may have; rename the image to a stem "
            f"of at most {NAME_MAX - len(LONGEST_OUTPUT_SUFFIX)} bytes"
        )


def images_by_stem(files: Sequence[Path]) -> dict[str, Path]:
    """``{stem: image}`` of the images to segment, each stem checked before any work
    (:func:`check_output_names`)."""
    by_stem = {image_stem(p): Path(p) for p in files}
    for stem, path in by_stem.items():
        check_output_names(stem, path)
    return by_stem


def images_to_segment(
    folder: Path,
    out_dir: str | Path,
    pixel_sizes: Mapping[str, float] | None,
    pixel_size_um: float | None,
) -> tuple[dict[str, Path], dict[str, float]]:
    """``{stem: image}`` of ``folder``'s images (:func:`list_images`, :func:`images_by_stem`)
    and the entries of the pixel-size table ``pixel_sizes`` for them (:func:`own_pixel_sizes`;
    ``pixel_size_um``: the one size given for every image)."""
    by_stem = images_by_stem(list_images(folder, out_dir))
    return by_stem, own_pixel_sizes(pixel_sizes, list(by_stem), pixel_size_um)


@contextlib.contextmanager
def said_before() -> Iterator[None]:
    """Keep quiet the warnings of a listing done again, as a run takes its output folder
    (:func:`mlseg.outputs.writing_to`), for an image that came in as it waited: the first
    listing said them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, hidden ones (``._x.png``, ``.ipynb_checkpoints``)
    left out, sorted by name."""
    if folder.name.startswith("."):
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _load_profile(
    profile_name: str, profiles_file: str | Path | None, units: str | None
) -> Profile:
    profile = get_profile(profile_name, profiles_file)
    if units is not None:
        if units not in ("auto", "um", "px"):
            raise ConfigError(f"--units must be auto, um or px, got {units!r}")
        profile = profile.model_copy(update={"units": units})
    return profile


def check_units_possible(
    profile: Profile,
    override: float | None,
    files: list[Path],
    table: Mapping[str, float] | None = None,
) -> None:
    """Fail before any work when a given pixel size is implausible (nanometres for microns)
    or micron units can never be satisfied."""
    if override is not None:
        check_pixel_size(override, "--pixel-size")
    unlisted = [p for p in files if image_stem(p) not in (table or {})]
    if table and not unlisted:
        return
    if profile.units != "um" or override is not None or profile.pixel_size_um is not None:
        return
    may_carry = (p.suffix.lower() in TIFF_EXTENSIONS or sidecar_path(p).is_file() for p in unlisted)
    if not any(may_carry):
        # with a table given, "pass --pixel-sizes" would not say which images it misses
        names = some_of((p.name for p in unlisted), 3)
        which = (
            f"{len(unlisted)} of the {len(files)} images ({names}) are not in the pixel-size "
            "table and carry none; list them in it, pass --pixel-size"
            if table
            else "the images carry none; pass --pixel-size or --pixel-sizes"
        )
        raise ConfigError(
            f"profile {profile.name!r} asks for micron units but has no pixel_size_um and "
            f"{which}, write a JSON sidecar beside each image, set pixel_size_um in the "
            "profile, or use --units px"
        )


def own_pixel_sizes(
    pixel_sizes: Mapping[str, float] | None, stems: list[str], override: float | None = None
) -> dict[str, float]:
    """The entries of ``pixel_sizes`` for these images (by stem; file names are accepted),
    each checked (:func:`mlseg.dataset.check_pixel_size`). With ``override`` (one size for
    every image, which beats the table) a table that names these images is said unused."""
    by_stem = {
        match_stem(without_image_extension(str(k)), stems): v
        for k, v in (pixel_sizes or {}).items()
    }
    warn_of_unused_rows(by_stem, stems, "the pixel-size table")
    sizes = {
        stem: check_pixel_size(by_stem[stem], f"pixel size of {stem!r}")
        for stem in stems
        if stem in by_stem
    }
    if sizes and override is not None:
        warnings.warn(
            f"the pixel size given for every image (--pixel-size, pixel_size_um: {override} um) "
            f"is used instead of the pixel-size table's sizes for {len(sizes)} of these images; "
            f"leave it out to use the table (ingest reads the two the other way round: the "
            f"table first, --pixel-size for the rest)",
            stacklevel=3,
        )
    return sizes


def declared_sizes(
    files: Mapping[str, Path], given: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Stem -> the size each image not in ``given`` declares (``files``: stem -> the file
    whose JSON sidecar or TIFF metadata counts), plausible or not, for skip checks: a
    corrected sidecar redoes its image. Warnings about these sizes are left to the run
    (:func:`_implausible_sizes_said_once`) and the image's own pass."""
    given = given or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = {s: declared_pixel_size_um(p, plausible_only=False) for s, p in files.items()}
    return {s: um for s, um in found.items() if um is not None and s not in given}


def carried_sizes(
    pairs: Sequence[tuple[str, Path, Path | None]], consulted: Mapping[str, Path]
) -> dict[str, tuple[float, Path]]:
    """Stem -> ``(size, the file declaring it)`` each label file carries: the record beside it
    (:func:`mlseg.pixel_size.labels_pixel_size_um`: ``<stem>.json`` in a segment output
    folder), plausible or not, else the label TIFF's own metadata, plausible only (a mask
    Fiji saved calibrated, ``unit=micron`` with the resolution tags; a 72-dpi default is no
    size). A record that is also the image's sidecar, or a label file that is the image
    (``consulted``: stem -> the file whose own size counts), is that image's, not read twice."""
    found = {}
    for stem, label, _ in pairs:
        record = labels_sidecar(label, stem)
        if record != sidecar_path(consulted[stem]):
            um = labels_pixel_size_um(label, stem)
            if um is not None:
                found[stem] = (um, record)
                continue
        if Path(label) != Path(consulted[stem]):
            um = tiff_pixel_size_um(label)
            if um is not None:
                found[stem] = (um, Path(label))
    return found


@contextlib.contextmanager
def _implausible_sizes_said_once(
    declared: Mapping[str, float], files: Mapping[str, Path]
) -> Iterator[None]:
    """One warning, up front, naming every file whose declared size (``declared``, from
    :func:`declared_sizes` of ``files``) is implausible; the same warning of each image's
    own pass is then kept quiet."""
    found = [(files[s], um) for s, um in declared.items() if not plausible_pixel_size(um)]
    if found:
        warnings.warn(implausible_message(found), ImplausiblePixelSizeWarning, stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImplausiblePixelSizeWarning)
        yield


def expectations(
    profile: Profile,
    model_id: str | None,
    settings: tuple,
    sizes: dict[str, float],
    declared: dict[str, float],
    inputs: Mapping[str, Sequence[Path]],
) -> Callable[[str], dict]:
    """What an image's finished outputs must record to be skipped: the content of its input
    files (``inputs``: stem -> image, or label file and image), so a file replaced under the
    same name is redone, and the settings. An image's table entry, or else the size its file
    declares, joins the settings digest only where there is one, so an image without either
    keeps the digest it had before tables and sidecars existed. ``settings``: what else
    changes results (:func:`segment_settings`; for ``quantify`` the profile and pixel size),
    so that an image that ``mlseg segment`` finished is done for the segment-and-quantify flow
    with the same settings, and the other way round."""

    @functools.cache
    def expect(stem: str) -> dict:
        listed = [sizes[stem]] if stem in sizes else []
        if stem in declared:
            listed = ["declared", declared[stem]]
        return {
            "profile": profile.name,
            "profile_version": profile.version,
            "model": model_id,
            "settings": _settings_hash(*settings, *listed),
            "input_digest": "+".join(input_digest(path) for path in inputs[stem]),
        }

    return expect


def segment_settings(
    profile: Profile, inference_cfg: InferenceConfig, pixel_size_um: float | None
) -> tuple:
    """The settings of a segment run that change its results, as :func:`expectations`
    digests them: the profile, the inference settings, the pixel size given for every image."""
    return (profile.model_dump(mode="json"), inference_cfg.model_dump(mode="json"), pixel_size_um)


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="image")


def _settings_hash(*parts) -> str:
    """Short digest of the settings that change results (profile content, inference...)."""
    import json

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: meta.json's keys that shape predictions (:func:`model_identity`); the rest (metrics, times,
#: the data fingerprint, the split, the training profile, which only names a mismatch) do not
SHAPING_META_KEYS = ("target", "classes", "in_channels", "pixel_size_um", META_KEY, META_STAT_KEY)


def model_identity(weights: Path, config: Config, meta: Mapping[str, Any]) -> str:
    """``<weights file name>@<content hash>+config@<hash>``: what ``<stem>.json`` records as
    the model (``config``, ``meta``: the checkpoint's config.json and meta.json).

    ``config@`` digests what of the two files shapes predictions as much as the weights do:
    the preprocessing, the architecture, and meta.json's :data:`SHAPING_META_KEYS`, so a
    checkpoint whose ``stain_norm`` or pixel size is edited redoes the images like a new
    model would, while its metrics and times, which training rewrites, leave it alone. The
    inference section is left to the run's settings: the run may not take the model's own.
    A model that normalises stains to its own reference image (``preprocess.stain_reference``)
    adds ``+<reference name>@<content hash>``, for the same reason.
    """
    shaping = (
        # the reference's path: wherever the folder now is; its content is named below
        config.preprocess.model_dump(mode="json", exclude={"stain_reference"}),
        config.train.model_dump(mode="json", include={"arch", "encoder", "encoder_depth"}),
        {key: meta.get(key) for key in SHAPING_META_KEYS},
    )
    ident = f"{Path(weights).name}@{file_digest(weights)}+config@{_settings_hash(*shaping)}"
    reference = config.preprocess.stain_reference
    if reference is not None and Path(reference).is_file():  # missing: segmenting says so
        ident += f"+{Path(reference).name}@{file_digest(reference)}"
    return ident


def _run_folder(
    items: list[tuple[str, Path]],
    out_dir: Path,
    expect: Callable[[str], dict],
    work: Callable[[str, Path], tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]],
    run_info: dict,
    progress: bool,
    desc: str,
    log: Callable[[str], object] | None,
) -> SegmentResult:
    result = SegmentResult(out_dir=out_dir)
    nuclei = RunNuclei(out_dir)  # each image's table, for the run's nuclei.parquet
    # counted from here, the caller holding the folder: the wait for another run's lock is
    # no image's time
    said = ProgressLog(desc, len(items), "images", log)
    for stem, path in _progress(items, progress, desc):
        done = image_done(out_dir, stem, expect(stem))
        if done is not None:
            result.skipped.append(stem)
            result.summaries.append(done)
            nuclei.add_done(done)  # its table read only if the run's is written
            said.step("skipped")
            continue
        started = time.perf_counter()
        try:
            image, labels, table, summary = work(stem, path)
        except MlsegError as err:
            result.failed[str(path)] = str(err)
            said.step("failed")
            continue
        summary = {
            "image": stem,
            "image_file": str(path),
            **expect(stem),
            **summary,
            # the image's own: a later run that skips it may be another mlseg's
            "mlseg_version": run_info["mlseg_version"],
            "seconds": round(time.perf_counter() - started, 3),
            # when it was new (drift window): kept by every rerun that skips or redoes it
            "finished_at": first_finished_at(out_dir, stem, expect(stem)["input_digest"]),
        }
        written, tagged = write_image_outputs_tagged(out_dir, stem, image, labels, table, summary)
        result.processed.append(stem)
        result.summaries.append(written)
        nuclei.add(tagged)  # as its <stem>_nuclei.parquet holds it
        said.step()
    said.close()
    run_info = {
        **run_info,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "processed": result.processed,
        "skipped": result.skipped,
        "failed": result.failed,
    }
    update_run_outputs(
        out_dir, result.summaries, nuclei.tables, run_info, redone=bool(result.processed)
    )
    return result


# ----------------------------------------------------------------------------- folders
def segment_image(
    loaded,
    path: Path,
    profile: Profile,
    inference_cfg: InferenceConfig,
    *,
    pixel_size_um: float | None = None,
    pixel_sizes: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """Read, segment and measure one image file (nothing is written).

    Returns the image, its ``(H, W) int32`` labels, the per-nucleus table and the image
    summary (with ``pixel_size_source`` and the scale it was segmented at:
    ``scale_factor``, ``scale_source``, ``est_diameter_px``). The per-image step of
    :func:`segment_folder` and of the ``segment-and-quantify`` flow.
    """
    image = read_image_for(path, profile.stain)
    stream = (inference_cfg or loaded.config.inference).stream_min_pixels
    warn_if_short_of_memory(path, image.shape, SEGMENT_MEMORY, "segment", stream_min_pixels=stream)
    check_channels(image, profile, path)
    warn_if_other_modality(loaded, profile)
    warn_if_unlit(image, profile, path)
    stains = warn_if_not_stain_normalised(image, loaded.config.preprocess, profile, path)
    listed = (pixel_sizes or {}).get(image_stem(path))
    px, source = image_pixel_size(path, pixel_size_um, profile, listed)
    profile = without_size_if_unknown(profile, px)
    check_micron_units(profile, px, path)
    labels, _, scale = predict_labels_scaled(
        loaded,
        image,
        profile,
        inference_cfg,
        pixel_size_um=px,
        stains=stains,
        short_of_memory=functools.partial(
            warn_if_short_of_memory,
            path,
            image.shape,
            SEGMENT_MEMORY,
            "segment",
            stream_min_pixels=stream,
        ),
    )
    warn_if_scale_at_limit(scale, path)
    table, summary = quantify_image(image, labels, profile, pixel_size_um=px)
    device = str(_model_device(loaded.model))  # where it ran: cpu or cuda:0
    return (
        image,
        labels,
        table,
        {"pixel_size_source": source, **scale.as_row(), **summary, "device": device},
    )


def warn_if_other_modality(loaded, profile: Profile) -> None:
    """Name a profile of the other modality than the model's training profile (once):
    bright field measured on a fluorescence model's images reads optical density off
    them (a DAPI field: haematoxylin OD 3.97 in every nucleus, all of it "tissue"), and
    fluorescence on bright-field images measures no stain. H&E and IHC go together: an
    H&E model grades IHC slides."""
    # its stain and name only, as saved: a saved profile that a later mlseg refuses (a
    # tissue_intensity_threshold in an he profile) failed every image of the run
    trained = loaded.meta.get("profile_settings") or {}
    if {trained.get("stain"), profile.stain} not in (
        {"fluorescence", "he"},
        {"fluorescence", "ihc"},
    ):
        return
    warn_once(
        f"{loaded.path}: trained with profile {trained.get('name')!r} ({trained['stain']}), "
        f"but the images are measured with profile {profile.name!r} ({profile.stain}); "
        f"segment with profile {trained.get('name')!r} unless they are {profile.stain}"
    )


def warn_if_preprocess_not_applied(loaded, profile: Profile) -> None:
    """Name (once) the ``preprocess`` keys of ``profile`` that differ from the profile the
    model was trained with and from what the model does (its config.json): images are
    normalised as the model was trained, whatever the profile given says, so a profile
    edited or overridden to ask for other normalisation (zscore, Reinhard to another
    reference) changed nothing, and nothing said so. A model saved before mlseg kept its
    training profile is not checked."""
    trained = loaded.meta.get("profile_settings") if isinstance(loaded.meta, dict) else None
    saved = trained.get("preprocess") if isinstance(trained, dict) else None
    if not isinstance(saved, dict):
        return
    asked = profile.preprocess.model_dump(mode="json")
    model = loaded.config.preprocess.model_dump(mode="json")
    # a key the saved profile lacks (an older mlseg's) is no change, as in a resume
    keys = [k for k, v in asked.items() if k in saved and v != saved[k] and v != model[k]]
    if not keys:
        return
    warn_once(
        f"{loaded.path}: profile {profile.name!r} asks for "
        + ", ".join(f"preprocess.{k} {asked[k]}" for k in keys)
        + ", but the model normalises images as it was trained ("
        + ", ".join(f"preprocess.{k} {model[k]}" for k in keys)
        + "; its config.json): a profile's preprocess acts in training only, so this changes "
        "nothing here; train a model with it to use it"
    )


#: Share of a bright-field image black in every channel (at most a tenth of full scale)
#: from which it is named: H&E and IHC tissue has almost none (at most 0.04% of the pixels of
#: 55 tiles of two labs), a tile off the slide or an unlit field is all of it. A tile with a
#: black edge is not named: its tissue is segmented as without it (a tenth black: 92 nuclei
#: against 97).
UNLIT_SHARE = 0.9


def warn_if_unlit(image: np.ndarray, profile: Profile, path: Path | str) -> None:
    """Name a bright-field image that is almost all black (no light reached it: a tile off
    the slide, a scanner's border, a shutter left closed; or fluorescence measured as bright
    field). Bright field reads black as the densest stain, and stain normalisation takes
    the noise for stains, so the model finds 'nuclei' in it: a black tile of sensor noise
    gave 400, and its tissue fraction was 1."""
    if profile.stain not in ("he", "ihc") or image.size == 0:
        return
    pixels = image if image.ndim == 3 else image[..., None]
    black = float((pixels <= 0.1 * full_scale(image)).all(axis=2).mean())
    if black >= UNLIT_SHARE:
        warnings.warn(
            f"{path}: {black:.0%} of it is black in every channel, as no bright-field "
            "image of tissue is (a tile off the slide, an unlit field, or fluorescence, which "
            "a fluorescence profile measures); nuclei found in the black are not the tissue's",
            stacklevel=2,
        )


def warn_if_scale_at_limit(scale, path: Path | str) -> None:
    """Name an image whose estimated scale stopped at :data:`mlseg.scale.SCALE_LIMITS`: a
    first pass cuts noise or an unknown stain into tiny 'nuclei' (noise: 4x, 2,491 of them).
    Also name one whose given pixel size puts it beyond those limits from the model's: a
    slip of a decimal point (2.5 um for 0.25) resampled a tile 10x and found no nucleus."""
    from mlseg.scale import SCALE_LIMITS

    low, high = SCALE_LIMITS
    if scale.source == "pixel_size" and not low <= scale.factor <= high:
        warnings.warn(
            f"{path}: its pixel size is {scale.factor:g}x the model's, so it was resampled by "
            f"{scale.factor:g}x, beyond the {low:g}-{high:g}x a scale estimate reaches; check "
            "its pixel size (a slip of a decimal point or of the unit)",
            stacklevel=2,
        )
        return
    if scale.source != "estimated" or not any(
        math.isclose(scale.factor, limit, rel_tol=1e-6) for limit in SCALE_LIMITS
    ):
        return
    warnings.warn(
        f"{path}: its scale estimate stopped at its limit, {scale.factor:g}x: a scan that far "
        "from the training magnification, or no nuclei the model knows (noise, another "
        "stain); give its pixel size to be sure",
        stacklevel=2,
    )


def segment_folder(
    model_path: str | Path,
    input_dir: str | Path,
    out_dir: str | Path,
    *,
    profile_name: str,
    profiles_file: str | Path | None = None,
    inference_cfg: InferenceConfig | None = None,
    progress: bool = True,
    pixel_size_um: float | None = None,
    pixel_sizes: Mapping[str, float] | None = None,
    units: str | None = None,
    log: Callable[[str], object] | None = None,
) -> SegmentResult:
    """Segment every image of ``input_dir`` with the model at ``model_path``; write the
    outputs of :mod:`mlseg.outputs` into ``out_dir``. Finished images are skipped.
    ``pixel_sizes`` maps image stems to microns per pixel (see the module docstring).
    ``progress`` draws a bar; ``log`` (a job's stderr, where no bar is drawn) is given a
    line on how far the run is once a minute (:class:`mlseg.progress.ProgressLog`)."""
    from mlseg.model import load_model, resolve_model_device
    from mlseg.train import machine

    warn_once.cache_clear()  # once per run: a notebook's or worker's next run is told again
    profile = _load_profile(profile_name, profiles_file, units)
    pixel_size_um = microns_per_pixel(pixel_size_um)  # "0.5" as a table gives it: 0.5
    folder = Path(input_dir)
    out_dir = check_out_dir(out_dir, input_dir)

    def listed() -> tuple[dict[str, Path], dict[str, float]]:
        by_stem, sizes = images_to_segment(folder, out_dir, pixel_sizes, pixel_size_um)
        check_units_possible(profile, pixel_size_um, list(by_stem.values()), sizes)
        return by_stem, sizes

    by_stem, sizes = listed()  # before the model and any wait: a mistake is said at once
    loaded = load_model(model_path)
    cfg = inference_cfg or loaded.config.inference
    # the model's own device, unless the caller's cfg
    loaded.model.to(resolve_model_device(cfg.device, loaded.config, loaded.path.parent))
    model_id = model_identity(loaded.path, loaded.config, loaded.meta)
    settings = segment_settings(profile, cfg, pixel_size_um)
    run_info = {
        "command": "segment",
        "mlseg_version": code_version(),
        "packages": package_versions(),
        "machine": machine(_model_device(loaded.model)),  # the device, its make and kernels
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input_dir": str(input_dir),
        "model_path": str(loaded.path),
        "model": model_id,
        # not the training images' hashes (mlseg.evaluate's, a line of 32 characters each)
        "model_meta": {
            k: v for k, v in loaded.meta.items() if k not in ("checkpoints", "image_hashes")
        },
        # the model's config.json, not its weights: stain normalisation and its reference
        "preprocess": loaded.config.preprocess.model_dump(mode="json"),
        "profile": profile.model_dump(mode="json"),
        "inference": cfg.model_dump(mode="json"),
        "pixel_size_um": pixel_size_um,
    }
    with writing_to(out_dir):  # one run at a time: its images' files are all its own
        # the folder as it is now: a run that waited wrote summary.csv and nuclei.parquet
        # without an image that came in meanwhile, which the run it waited for had segmented
        with said_before():
            if list_images(folder, out_dir) != list(by_stem.values()):
                by_stem, sizes = listed()
        declared = declared_sizes(by_stem, sizes) if pixel_size_um is None else {}
        expect = expectations(
            profile, model_id, settings, sizes, declared, {s: [p] for s, p in by_stem.items()}
        )

        def work(stem: str, path: Path):
            return segment_image(
                loaded, path, profile, cfg, pixel_size_um=pixel_size_um, pixel_sizes=sizes
            )

        items = list(by_stem.items())
        run_info["pixel_sizes"] = sizes
        with _implausible_sizes_said_once(declared, by_stem):
            return _run_folder(items, out_dir, expect, work, run_info, progress, "segment", log)


def label_stem(path: Path) -> str:
    """Image stem of a label file: ``x_mask.png``, ``x_masks.tif``, ``x_cp_masks.png``,
    ``x_mask.ome.tif`` -> ``x`` (:func:`mlseg.io.image_stem`)."""
    stem = image_stem(path)
    for suffix in LABEL_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_labels(
    labels_dir: Path, images_dir: Path | None, out_dir: str | Path | None = None
) -> list[tuple[str, Path, Path | None]]:
    """``(stem, label file, image file or None)`` for each label file of ``labels_dir``
    (``out_dir``: the run's output folder, which may lie in either, see :func:`list_images`).

    Where the labels lie beside their images (one folder, as Cellpose saves ``x_cp_masks.png``
    next to ``x.png``), only files named with a label suffix (:data:`LABEL_SUFFIXES`) are
    labels; in an output folder of mlseg (:func:`is_output_folder`), one a run is still writing
    included, only its ``<stem>_labels.*``."""
    label_files = list_images(labels_dir, out_dir)
    if is_output_folder(Path(labels_dir)):
        # mlseg segment's or quantify's output folder, measured again (another profile or
        # pixel size): its labels are <stem>_labels.*, its overlays and histograms.png are not
        label_files = [p for p in label_files if image_stem(p).endswith("_labels")]
    images: dict[str, Path] = {}
    if images_dir is not None:
        for path in list_images(images_dir, out_dir):
            images.setdefault(image_stem(path), path)
    if images_dir is not None and Path(images_dir).resolve() == Path(labels_dir).resolve():
        label_files = [p for p in label_files if label_stem(p) != image_stem(p)]
        images = {stem: p for stem, p in images.items() if label_stem(p) == stem}
        if not label_files:
            raise DatasetError(
                f"{labels_dir}: labels and images share this folder, but no file is named as "
                f"a label (<stem>{', <stem>'.join(LABEL_SUFFIXES)})"
            )
    out = []
    seen: dict[str, Path] = {}
    for path in label_files:
        stem = match_stem(label_stem(path), images)  # x.ome_mask.tif is x.ome.tif's
        check_stem(stem, path)
        check_output_names(stem, path)
        if stem in seen:
            raise DatasetError(
                f"{path}: same image stem {stem!r} as {seen[stem]}; keep one label file per image"
            )
        seen[stem] = path
        out.append((stem, path, images.get(stem) if images_dir is not None else None))
    return out


def quantify_folder(
    labels_dir: str | Path,
    images_dir: str | Path | None,
    out_dir: str | Path,
    *,
    profile_name: str,
    profiles_file: str | Path | None = None,
    pixel_size_um: float | None = None,
    pixel_sizes: Mapping[str, float] | None = None,
    units: str | None = None,
    progress: bool = True,
    log: Callable[[str], object] | None = None,
) -> SegmentResult:
    """Measure existing label images or binary masks (QuPath, Cellpose, ...) without a model.

    Label files are matched to images by stem, with or without a ``_mask``, ``_masks``,
    ``_cp_masks``, ``_labels`` or ``_label`` suffix. Binary masks are split into connected
    components (:func:`mlseg.dataset.mask_to_labels`). ``images_dir`` None measures shape
    only. An image that declares no pixel size, given none, is measured at the size the
    ``<stem>.json`` beside its labels records (an mlseg output folder's record), else at the
    one the label TIFF's own metadata declares (a mask saved calibrated in Fiji); source
    ``labels metadata``. ``progress`` and ``log``: as :func:`segment_folder`'s.
    """
    from mlseg.dataset import check_mask_shape, mask_to_labels

    profile = _load_profile(profile_name, profiles_file, units)
    pixel_size_um = microns_per_pixel(pixel_size_um)
    images_dir = Path(images_dir) if images_dir is not None else None
    out_dir = check_out_dir(out_dir, labels_dir, images_dir)

    def listed():
        """The label files with their images (:func:`pair_labels`), the table's sizes for
        them, stem -> the file whose size counts, and the sizes the labels carry."""
        pairs = pair_labels(Path(labels_dir), images_dir, out_dir)
        sizes = own_pixel_sizes(pixel_sizes, [stem for stem, _, _ in pairs], pixel_size_um)
        consulted = {stem: image or label for stem, label, image in pairs}
        carriers = {} if pixel_size_um is not None else carried_sizes(pairs, consulted)
        carried = {stem: um for stem, (um, _) in carriers.items()}
        uncarried = [p for s, p in consulted.items() if not plausible_pixel_size(carried.get(s))]
        if uncarried or not carried:
            check_units_possible(profile, pixel_size_um, uncarried, sizes)
        return pairs, sizes, consulted, carriers

    pairs, sizes, consulted, carriers = listed()  # before any wait: a mistake is said at once
    settings = (profile.model_dump(mode="json"), pixel_size_um)
    run_info = {
        "command": "quantify",
        "mlseg_version": code_version(),
        "packages": package_versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "labels_dir": str(labels_dir),
        "images_dir": str(images_dir) if images_dir is not None else None,
        "profile": profile.model_dump(mode="json"),
        "pixel_size_um": pixel_size_um,
    }

    # image_of, carried, carriers, sizes: as listed once the run has the folder (below)
    def work(stem: str, path: Path):
        image_path = image_of[stem]
        if images_dir is not None and image_path is None:
            raise DatasetError(
                f"{path}: no image named {stem}.<ext> in {images_dir}; name label files "
                "<image stem>[_mask|_masks|_cp_masks|_labels].<ext>"
            )
        labels = mask_to_labels(read_mask(path))
        # before the image is read: the labels give the field's size
        warn_if_short_of_memory(image_path or path, labels.shape, QUANTIFY_MEMORY, "quantify")
        check_mask_shape(labels, path)  # outlines or a labelled background measure nonsense
        image = None
        if image_path is not None:
            image = read_image_for(image_path, profile.stain)
            check_channels(image, profile, image_path)
            if image.shape[:2] != labels.shape:
                raise DatasetError(
                    f"{path}: mask is {labels.shape[1]}x{labels.shape[0]} but image "
                    f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must match"
                )
        um = carried.get(stem)
        usable = um if plausible_pixel_size(um) else None
        px, source = image_pixel_size(
            image_path or path, pixel_size_um, profile, sizes.get(stem), usable
        )
        measured_with = without_size_if_unknown(profile, px)
        if (
            source == "image metadata"
            and usable is not None
            and not math.isclose(px, um, rel_tol=0.01)
        ):
            warnings.warn(
                f"{image_path or path}: measured at the {px:.4g} um per pixel its metadata "
                f"declares, not the {um:.4g} um that {carriers[stem][1]} records for "
                f"its labels; pass --pixel-size or --pixel-sizes to measure at the other",
                stacklevel=2,
            )
        check_micron_units(measured_with, px, path, image_path or path)
        table, summary = quantify_image(image, labels, measured_with, pixel_size_um=px)
        display = image if image is not None else np.zeros((*labels.shape, 1), np.uint8)
        files = {"image_file": str(image_path) if image_path else None, "labels_file": str(path)}
        return display, labels, table, {**files, "pixel_size_source": source, **summary}

    with writing_to(out_dir):  # as segment_folder's: the folders listed again once its own
        with said_before():
            if pair_labels(Path(labels_dir), images_dir, out_dir) != pairs:
                pairs, sizes, consulted, carriers = listed()
        run_info["pixel_sizes"] = sizes
        image_of = {stem: img for stem, _, img in pairs}
        carried = {stem: um for stem, (um, _) in carriers.items()}
        declared = declared_sizes(consulted, sizes) if pixel_size_um is None else {}
        # a size the labels' record carries redoes its image when it changes, as a sidecar's
        by_labels = {s: um for s, um in carried.items() if s not in declared and s not in sizes}
        declared |= by_labels
        named = {**consulted, **{s: carriers[s][1] for s in by_labels}}
        inputs = {stem: [label, *([image] if image else [])] for stem, label, image in pairs}
        expect = expectations(profile, None, settings, sizes, declared, inputs)
        items = [(stem, path) for stem, path, _ in pairs]
        with _implausible_sizes_said_once(declared, named):
            return _run_folder(items, out_dir, expect, work, run_info, progress, "quantify", log)
