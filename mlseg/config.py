"""Typed, validated configuration: one frozen pydantic model per pipeline stage.

A run's configuration is loaded from YAML (:func:`load_config`) and per-image-type
profiles from ``profiles.yaml`` (:func:`load_profiles`; the packaged default ships
``he``, ``ihc`` and ``fluorescence``). Unknown keys and bad values raise
:class:`~mlseg.errors.ConfigError` naming the key and the file. Every artifact is written
with the config that made it (``model_dump_json``), so any output can be reproduced.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlseg.errors import ConfigError


class Strict(BaseModel):
    """Base: unknown keys are errors, instances are immutable (use ``model_copy(update=...)``),
    numbers are finite (the JSON saved beside the weights writes infinity as null)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_or_no(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes true as 1.0: `elastic_p: on` was an elastic warp of every patch
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError(
                f"got {str(value).lower()}, and this key takes no true/false; YAML reads an "
                "unquoted yes, no, on or off as true or false (quote a name)"
            )
        return value


class DataConfig(Strict):
    """Where a dataset lives and how it is laid out (see :mod:`mlseg.dataset`)."""

    root: Path | None = None
    train_dir: str = "train"
    test_dir: str = "test"
    image_dir: str = "original"
    mask_dir: str = "masks"
    mask_suffix: str = "_mask"
    mask_kind: Literal["auto", "binary", "instance"] = "auto"
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("train_dir", "test_dir", "image_dir", "mask_dir")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value:
            raise ValueError("must be a plain folder name")
        return value


def _microns_per_pixel(value: float | None) -> float | None:
    """A pixel size within :data:`mlseg.pixel_size.PLAUSIBLE_PIXEL_SIZE_UM`, else a ValueError that
    names the likely unit slip."""
    from mlseg.pixel_size import PLAUSIBLE_PIXEL_SIZE_UM, plausible_pixel_size

    if value is None or plausible_pixel_size(value):
        return value
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    raise ValueError(
        f"{value:g} um per pixel is outside {low:g}-{high:g}, the range of light microscopy; "
        "give microns per pixel (0.25 at 40x, 0.5 at 20x), not nanometres or millimetres"
    )


class PreprocessConfig(Strict):
    """Intensity and scale normalisation applied identically in training and inference."""

    target_pixel_size_um: float | None = Field(None, gt=0)
    _plausible_target = field_validator("target_pixel_size_um")(_microns_per_pixel)
    # match: to stain_reference. Off: on train gbm40_he -> test cpm15_he (bench/robustness.py,
    # CPU preset, 2,000 steps) CLAHE lowered Dice 0.763/0.782 -> 0.731/0.764 (2 seeds) and
    # global equalisation to 0.703 (1 seed), both by losing pale nuclei (bench/README.md).
    equalize: Literal["none", "hist", "clahe", "match"] = "none"
    clahe_clip_limit: float = Field(2.0, gt=0)
    # tiles per side; OpenCV keeps a 256-entry table per tile and pads the image to the grid:
    # 10,000 (a model's config.json from elsewhere) asked for 25.6 GB per image
    clahe_tile_grid: int = Field(8, ge=1, le=256)
    stain_norm: Literal["none", "reinhard", "macenko"] = "none"
    stain_reference: Path | None = None
    # What Macenko makes of an IHC slide's DAB (profiles with stain "ihc"). "nucleus": each
    # pixel's haematoxylin becomes the stronger of its haematoxylin and its DAB (each scaled
    # to the reference haematoxylin by its 99th percentile), as a nuclear marker (Ki-67, ER,
    # PR, p53) stains nuclei; "eosin": the DAB only takes eosin's place (as before the
    # twenty-eighth session), right for membrane and cytoplasm markers (HER2, CD3,
    # cytokeratin), whose DAB is no nucleus. On pseudo-IHC made from the 15 CPM15 H&E tiles
    # (half the nuclei given nuclear DAB; bench/ihc_positivity.py, one CPU-trained GBM40 H&E
    # model) "eosin" found 36% of the positive nuclei and 70% of the negative ones and
    # reported 34% positive for 49% true; "nucleus" found 83% and 62% and reported 48%.
    ihc_dab: Literal["nucleus", "eosin"] = "nucleus"
    intensity_norm: Literal["none", "percentile", "zscore"] = "none"
    percentiles: tuple[float, float] = (1.0, 99.0)

    @field_validator("percentiles")
    @classmethod
    def _low_below_high(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError("must be (low, high) percentiles with 0 <= low < high <= 100")
        return value


class AugmentConfig(Strict):
    """Training-time augmentation; every probability in [0, 1]."""

    enabled: bool = True
    flips: bool = True
    rot90: bool = True
    # Zoom drawn log-uniformly in scale_range. A wide range with blur (blur_p) stands in for
    # other scanners and magnifications: resampled 20x tiles are softer than native 40x ones.
    # On train gbm40_he -> test cpm15_he (bench/robustness.py, H200, 2,500 steps of 32) the
    # earlier (0.8, 1.25) p 0.3, blur_p 0.1 gave Dice 0.723 / 0.734 (2 seeds); this 0.776,
    # with the same validation Dice on gbm40 (0.90). Chosen among 4 candidates on that
    # test set, 1 seed each (bench/README.md).
    scale_range: tuple[float, float] = (0.5, 2.0)
    scale_p: float = Field(0.5, ge=0, le=1)
    rotate_p: float = Field(0.2, ge=0, le=1)  # free rotation (0-360 degrees), besides rot90
    elastic_p: float = Field(0.0, ge=0, le=1)
    elastic_px: float = Field(6.0, ge=0)  # displacement scale of the smooth random field
    brightness: float = Field(0.15, ge=0)
    contrast: float = Field(0.15, ge=0)
    gamma: float = Field(0.15, ge=0)
    color_p: float = Field(0.5, ge=0, le=1)
    # HED stain jitter: each stain's optical density scaled by 1 +- hed_jitter and shifted by
    # +- hed_jitter. 0.2 is the "HED-strong" setting of Tellez et al. (2019), which
    # generalised best across centres there. On train gbm40_he -> test cpm15_he
    # (bench/robustness.py, CPU) it beat 0.03 by +0.03 Dice and -6 points of median count
    # error at 300 steps (2 seeds); at 1,000 steps both gave Dice 0.75; 0.3 gave 0.738
    # against 0.763 at 2,000 steps, finding fewer pale nuclei (1 seed; bench/README.md).
    hed_jitter: float = Field(0.2, ge=0)
    hed_p: float = Field(0.5, ge=0, le=1)
    # Nucleus fade: haematoxylin inside the nuclei of a patch scaled by a smooth random
    # field in [nucleus_fade_min, 1] (H&E/IHC), so pale, vesicular nuclei are seen too.
    # Off by default: on train gbm40_he -> test cpm15_he (bench/robustness.py, CPU preset)
    # p 0.5 raised Dice from 0.79-0.80 to 0.82-0.83 at 300 steps (2 seeds) but lowered it
    # from 0.825 to 0.801 at 1,000 steps, where it found pale non-nuclei too (bench/README.md).
    nucleus_fade_p: float = Field(0.0, ge=0, le=1)
    nucleus_fade_min: float = Field(0.3, gt=0, le=1)
    # Haematoxylin gain: the haematoxylin optical density of a whole patch times a factor
    # drawn log-uniformly in haematoxylin_gain (H&E/IHC RGB), the training-time twin of
    # inference.stain_tta. Train gbm40_he -> test cpm15_he (bench/robustness.py, this
    # recipe, one H200; 14 models with it, 7 without, unpaired: GPU runs of one seed differ
    # like seeds): Dice 0.760 -> 0.803 without stain TTA (Welch p 0.006), 0.783 -> 0.798
    # with it (p 0.16, within the noise); validation Dice 0.898 either way; median count
    # error 22% -> 21%. A smaller recipe (resnet18, 128 px) lost 0.02-0.07 Dice on three
    # seeds of three. Range and p were set before any run, never tuned (bench/README.md).
    haematoxylin_gain: tuple[float, float] = (0.5, 2.0)
    haematoxylin_gain_p: float = Field(0.5, ge=0, le=1)
    blur_p: float = Field(0.3, ge=0, le=1)
    # Sharpening, the other half of scanner sharpness: an unsharp mask of sigma drawn in
    # blur_sigma and strength drawn in sharpen_amount (0: none, 1: the detail doubled); blur
    # alone only teaches softer scans. CPM15's 40x tiles carry 2.2x the fine detail of
    # GBM40's, and a GBM40 model scored them better blurred (bench/scanner_sweep.py --axis
    # blur). Off: p 0.3 on train gbm40_he -> test cpm15_he (bench/robustness.py, CPU preset,
    # 1,000 steps, 2 seeds) lowered AJI 0.576 -> 0.559 and 0.562 -> 0.553, validation Dice
    # unchanged (bench/README.md).
    sharpen_p: float = Field(0.0, ge=0, le=1)
    sharpen_amount: tuple[float, float] = (0.5, 2.0)
    noise_p: float = Field(0.1, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # pixels
    noise_std: float = Field(0.05, ge=0)  # at most, in normalised intensity units

    @field_validator("scale_range", "haematoxylin_gain")
    @classmethod
    def _log_uniform_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be (low, high) with 0 < low <= high (drawn log-uniformly)")
        return value

    @field_validator("sharpen_amount", "blur_sigma")
    @classmethod
    def _uniform_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("must be (low, high) with 0 <= low <= high (drawn uniformly)")
        return value


class TrainConfig(Strict):
    """Model and optimisation. The model is built by ``smp.create_model(arch, encoder, ...)``."""

    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_depth: int = Field(5, ge=3, le=5)
    encoder_weights: str | None = None
    target: Literal["auto", "binary", "three_class"] = "auto"
    patch_size: int = Field(256, ge=32)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    # AdamW's usual 0.01: against 1e-4 it raised gbm40 -> cpm15 Dice from 0.72-0.73 to 0.76
    # on the H200 run above (1 seed), and from 0.776 to 0.777 with the wider augmentation
    # but with median count error 24 % against 30 %; validation Dice unchanged.
    weight_decay: float = Field(0.01, ge=0)
    # Shorter training fits the training lab less and transfers better. Train gbm40_he ->
    # test cpm15_he (bench/robustness.py, this recipe, one H200, unpaired; the rule was set
    # before the runs): 1,000 steps against 2,000 gave Dice 0.801 vs 0.798 and AJI 0.578
    # vs 0.577 (7 and 14 trainings, within the noise) and median count error 16.9% vs 21.1%
    # (Welch p 0.016), in half the time; the synthetic demo set lost 0.005 Dice. 400 steps
    # transferred better still (Dice 0.818, count error 15.2%, 14 trainings) but lost 0.018
    # on the synthetic set. Raise it when you train and test on one lab's images.
    max_steps: int = Field(1000, ge=1)
    warmup_steps: int = Field(100, ge=0)
    val_every: int = Field(200, ge=1)  # steps per "epoch": validation + checkpoints
    early_stop_patience: int = Field(10, ge=1)
    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    boundary_weight: float = Field(1.0, ge=0)
    # Three-class boundary width inside each nucleus, in pixels of the training grid. 2
    # separated more touching nuclei (CPU preset, 1,000 steps, bench/README.md, seventeenth
    # session): GBM40 validation AJI +0.015/+0.017 (2 seeds), the synthetic set +0.067
    # (1 seed), a third lab (DSB 2018 H&E) 0.259 -> 0.374 (1 seed); but train gbm40_he ->
    # test cpm15_he AJI +0.014/-0.012 with more over-split nuclei; on the shipped recipe
    # (CPU, one seed pair, twentieth session) cpm15 Dice 0.829 -> 0.819, AJI 0.603 -> 0.600,
    # fewer merged but more split and missed nuclei. 1 stays; the GPU check decides.
    boundary_px: int = Field(1, ge=1, le=4)
    fg_oversample: float = Field(0.33, ge=0, le=1)  # share of patches centred on a nucleus
    # Share of patches centred on one of the faintest nuclei of the training set: the
    # faint_quantile of nuclei whose brightness differs least from the background ring
    # around them (mlseg.data.nucleus_contrast; binary masks: connected components).
    # 0 disables. Off: 0.2 on train gbm40_he -> test cpm15_he (bench/robustness.py, CPU
    # preset, 2,000 steps, stain TTA) moved Dice 0.809 -> 0.826 on one seed and
    # 0.794 -> 0.738, 0.834 -> 0.786 on two others, validation Dice unchanged; on the
    # shipped recipe (seven trainings each, one H200) 0.799 -> 0.779, no more of the
    # palest nuclei found (bench/README.md).
    faint_oversample: float = Field(0.0, ge=0, le=1)
    faint_quantile: float = Field(0.25, gt=0, le=1)
    grad_clip: float = Field(12.0, ge=0)  # max gradient norm; 0 disables
    # Exponential moving average of the weights (and BatchNorm statistics), updated every
    # step with a warmed-up decay; validation and checkpoints use the average. 0 disables.
    # Off: 0.999 gave +0.01 Dice across labs on one paired CPU run (bench/README.md).
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # MixStyle (mlseg.mixstyle): per batch, with this probability at each of three early
    # encoder stages, the patches' feature statistics are mixed (Beta(alpha, alpha)), so
    # nuclei are learnt under styles no slide showed. Training only; 0 disables. Off: with
    # the paper's p 0.5 on train gbm40_he -> test cpm15_he (bench/robustness.py, CPU preset)
    # Dice rose 0.763 -> 0.778 and 0.782 -> 0.821 at 2,000 steps (2 seeds) but fell
    # 0.768 -> 0.717 at 4,000 steps (1 seed); on gbm40+cpm15 -> dsb2018 0.742 -> 0.770
    # at 1,000 steps; at the GPU budget (resnet34, 2,500 steps of batch 32, one H100)
    # 0.762 -> 0.689, one seed (bench/README.md). Measure it at your budget.
    mixstyle_p: float = Field(0.0, ge=0, le=1)
    mixstyle_alpha: float = Field(0.1, gt=0)
    num_threads: int = Field(0, ge=0)  # CPU threads for torch; 0 leaves torch's default
    device: str = "auto"
    # bf16 autocast on GPUs and CPUs with bf16 in hardware (Ampere or later; AMX,
    # AVX512-BF16: 2-4x faster); others train in float32, where emulated bf16 would be slower
    amp: bool = True
    channels_last: bool = True  # memory layout of the model and batches (CPU too: 1.2-1.4x)
    compile: bool = False  # torch.compile the model and the patch sampler
    num_workers: int = Field(0, ge=0)  # threads decoding images at load; 0 = up to 8
    seed: int = 0

    @field_validator("encoder_weights")
    @classmethod
    def _null_not_none(cls, value: str | None) -> str | None:
        # YAML reads None as the text 'None', which smp refused only once the data was read
        if value is not None and value.lower() == "none":
            raise ValueError(f"got the text {value!r}; write null (or ~) for no pretrained weights")
        return value

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32 (the U-Net downsamples 5 times)")
        return value

    @model_validator(mode="after")
    def _shares_fit(self) -> TrainConfig:
        if self.fg_oversample + self.faint_oversample > 1:
            raise ValueError(
                f"fg_oversample ({self.fg_oversample}) + faint_oversample "
                f"({self.faint_oversample}) is over 1: they are shares of the same patches"
            )
        return self

    @model_validator(mode="after")
    def _mixstyle_needs_a_batch(self) -> TrainConfig:
        # MixStyle mixes one patch's feature statistics with another's of its batch
        if self.mixstyle_p > 0 and self.batch_size < 2:
            raise ValueError(
                f"mixstyle_p ({self.mixstyle_p}) mixes the styles of the patches of a batch, "
                "and a batch_size of 1 has no other patch: it would train without MixStyle; "
                "set batch_size to 2 or more, or mixstyle_p to 0"
            )
        return self


# inference.stain_tta's gains, the default (and what mlseg segment --stain-tta restores)
STAIN_TTA_GAINS: tuple[float, ...] = (1.0, 1.5)


class InferenceConfig(Strict):
    """Tiled sliding-window prediction (see :mod:`mlseg.infer`).

    Tiles of ``tile_size`` (a multiple of 32) overlap by ``overlap`` and are blended with a
    Gaussian window (``sigma_scale * tile_size``), so there are no seams (with ``overlap``
    0 there is nothing to blend: tile edges show in the probabilities). Images smaller than
    one tile are reflect-padded up to the next multiple of 32 and run as a single tile; a
    model that takes no smaller input (PAN: 128 px) gets tiles and padding of that size.
    Images with more than ``stream_min_pixels`` pixels are labelled in row bands of
    ``band_rows`` rows plus ``halo_px`` context rows above and below, so memory stays bounded
    (objects taller than ``halo_px`` may be cut at a band edge).
    """

    tile_size: int = Field(512, ge=64)
    overlap: float = Field(0.25, ge=0.0, lt=0.9)
    batch_size: int = Field(8, ge=1)
    tta: bool = False
    device: str = "auto"
    auto_scale: bool = True
    # Predict at this multiple of the model's scale (after the pixel size or the scale
    # estimate), e.g. 1.5 shows the model every nucleus 1.5x larger than in training, at
    # 2.25x the time. Off: on train gbm40_he -> test cpm15_he (bench/robustness.py, CPU
    # preset, 2,000 steps) 1.5 moved Dice 0.763 -> 0.790 on one checkpoint and
    # 0.782 -> 0.762 on another, with the validation split unchanged; on a GPU checkpoint
    # (resnet34, one H100) 0.762 -> 0.693 (bench/README.md).
    zoom: float = Field(1.0, ge=0.25, le=4.0)
    # Stain test-time augmentation (H&E/IHC RGB input after Macenko normalisation, as in the
    # he profile, without intensity normalisation; ignored otherwise): the probabilities of
    # the image as normalised and of copies with their haematoxylin denser by each gain are
    # averaged, so nuclei paler than any the model was trained on are found too; one more
    # forward pass per gain. (1.0,) turns it off.
    # Train gbm40_he -> test cpm15_he (bench/robustness.py; the same models scored with and
    # without it): without the haematoxylin gain in training it raised Dice 0.775 -> 0.805
    # (CPU preset, six seeds) and 0.760 -> 0.783 (this recipe, seven H200 trainings). With
    # the gain, the default, it lowered Dice by 0.003-0.004 and PQ by 0.004-0.008 on this
    # recipe (21 of 21 lower PQ, 2,000 and 1,000 steps, H200), but on the CPU preset at
    # 1,000 steps it raised AJI by 0.019 (13 of 15 tiles), and on a third lab (dsb2018
    # brightfield, model trained on gbm40 + cpm15) Dice by 0.014 and PQ by 0.033. Kept on
    # until the shipped recipe has been measured there too (bench/README.md).
    stain_tta: tuple[float, ...] = Field(STAIN_TTA_GAINS, min_length=1, max_length=8)
    # The encoder's stem and first stage normalise each image with its own BatchNorm
    # statistics (mlseg.infer.adapted_batchnorm; one more encoder pass). Off: train
    # gbm40_he -> test cpm15_he (CPU preset, three checkpoints, stain TTA on) it found about
    # twice the palest nuclei and raised Dice 0.792 -> 0.829 and 0.800 -> 0.834 on two
    # models trained without the haematoxylin gain, but lowered it 0.814 -> 0.762 on one
    # trained with it, the default (bench/README.md, fifteenth session).
    adapt_bn: bool = False
    # bf16 autocast for the network on GPUs and CPUs with bf16 in hardware (Ampere or
    # later; AMX, AVX512-BF16); float32 elsewhere. Probabilities, blending and watershed
    # stay float32.
    amp: bool = True
    channels_last: bool = True  # memory layout of the network and its input tiles
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = Field(0.125, gt=0, le=1)
    stream_min_pixels: int = Field(4096 * 4096, ge=1)
    band_rows: int = Field(1024, ge=64)
    halo_px: int = Field(128, ge=0)

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32 (the U-Net downsamples 5 times)")
        return value

    @field_validator("stain_tta")
    @classmethod
    def _gains_positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0.25 <= g <= 4.0 for g in value):
            raise ValueError("haematoxylin gains must lie in [0.25, 4] ([1.0]: off)")
        return value


class WatershedConfig(Strict):
    """Instance separation parameters (see :mod:`mlseg.instances`).

    Three-class output: seeds are connected components (4-connectivity) of
    ``interior > seed_threshold`` with at least ``seed_min_area_px`` pixels, flooded over
    ``1 - interior`` (``elevation: interior``) or the boundary probability
    (``elevation: boundary``) within ``interior + boundary > fg_threshold``; ``compactness``
    above 0 floods compactly (scikit-image's compact watershed: rounder, more even nuclei).
    Binary output: seeds are maxima of the (``smooth_sigma_px``-smoothed) distance transform
    at least ``min_distance_um`` apart (``min_distance_px`` when the pixel size is unknown).
    """

    fg_threshold: float = Field(0.5, gt=0, lt=1)
    seed_threshold: float = Field(0.5, gt=0, lt=1)
    seed_min_area_px: int = Field(3, ge=1)
    elevation: Literal["interior", "boundary"] = "interior"
    # a seed spacing is a nucleus' radius or so: 50000 um in a model's saved profile (from
    # elsewhere) asked OpenCV for a 40 GB dilation kernel per image in evaluate
    min_distance_um: float = Field(2.0, gt=0, le=50)
    min_distance_px: int = Field(4, ge=1, le=500)
    smooth_sigma_px: float = Field(1.0, ge=0)
    compactness: float = Field(0.0, ge=0)
    fill_holes: bool = True


DEFAULT_STAIN_VECTORS = (
    (0.650, 0.704, 0.286),  # haematoxylin (Ruifrok & Johnston 2001)
    (0.072, 0.990, 0.105),  # eosin
    (0.268, 0.570, 0.776),  # DAB
)
#: The stain names that take their own row of :data:`DEFAULT_STAIN_VECTORS`.
DEFAULT_STAIN_NAMES = ("hematoxylin", "eosin", "dab")


def default_stain_vectors(names: tuple[str, str, str]) -> list[tuple[float, float, float]]:
    """Rows of :data:`DEFAULT_STAIN_VECTORS` for ``names``, matched by name: ``hematoxylin``,
    ``eosin`` and ``dab`` take their own vector, any other name (``residual``) one of those
    no name takes, in order. Matched by position, ``[dab, hematoxylin, residual]`` measured
    haematoxylin as DAB and graded a negative nucleus 2+."""
    own = dict(zip(DEFAULT_STAIN_NAMES, DEFAULT_STAIN_VECTORS, strict=True))
    spare = [vector for name, vector in own.items() if name not in names]
    return [own[name] if name in own else spare.pop(0) for name in names]


class Profile(Strict):
    """Per-image-type parameters shipped apart from the code (``profiles.yaml``).

    ``pixel_size_um`` is microns per pixel (``None``: unknown). ``units`` picks the
    measurement units: ``um`` needs a pixel size (else :class:`ConfigError`), ``px`` ignores
    it, ``auto`` uses microns when a pixel size is known. ``stain_vectors`` are the RGB
    optical-density vectors of the three stains named by ``stain_names`` (rows, normalised
    to unit length when used; unset, Ruifrok & Johnston's matched by name, see
    :func:`default_stain_vectors`). ``dab_thresholds`` are the mean optical densities of the
    stain named ``dab`` (an ``ihc`` profile must name one so) of 1+, 2+ and 3+ nuclei. Size
    limits apply in square microns when the pixel size is known, else in pixels. Tissue is
    where the summed RGB optical density exceeds ``tissue_od_threshold`` (bright field; against
    the image's glass where it is darker than white, :func:`mlseg.quantify.tissue_fraction`) or
    the brightest channel exceeds ``tissue_intensity_threshold`` of full scale
    (fluorescence). Unset for fluorescence, tissue is not measured: a nuclear stain alone
    does not show where tissue is, and a fixed share of full scale lands inside a camera's
    dark offset (200 of 4095 counts).
    """

    name: str = ""
    version: str = "1"
    stain: Literal["he", "ihc", "fluorescence", "none"] = "he"

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `version: 2` in YAML is a number; the file says to bump it, so take it as written
        return (
            str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        )

    channels: int = Field(3, ge=1, le=4)
    pixel_size_um: float | None = Field(None, gt=0)
    _plausible_size = field_validator("pixel_size_um")(_microns_per_pixel)
    units: Literal["auto", "um", "px"] = "auto"
    stain_vectors: list[list[float]] | None = None
    stain_names: tuple[str, str, str] = ("hematoxylin", "eosin", "dab")
    dab_thresholds: tuple[float, float, float] = (0.15, 0.30, 0.60)
    min_area_um2: float = Field(10.0, ge=0)
    max_area_um2: float = Field(2000.0, gt=0)
    min_area_px: int = Field(10, ge=0)
    max_area_px: int = Field(100_000, gt=0)
    tissue_od_threshold: float = Field(0.15, gt=0)
    tissue_intensity_threshold: float | None = Field(None, gt=0, lt=1)
    watershed: WatershedConfig = WatershedConfig()
    preprocess: PreprocessConfig = PreprocessConfig()

    @field_validator("stain_vectors")
    @classmethod
    def _three_by_three(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is not None and (len(value) != 3 or any(len(v) != 3 for v in value)):
            raise ValueError("stain_vectors must be 3 rows of 3 numbers (RGB optical densities)")
        if value is not None:
            import numpy as np

            matrix = np.asarray(value, dtype=float)
            if (matrix < 0).any() or (np.linalg.norm(matrix, axis=1) == 0).any():
                raise ValueError("stain_vectors must be non-negative and non-zero rows")
            if abs(np.linalg.det(matrix / np.linalg.norm(matrix, axis=1, keepdims=True))) < 1e-3:
                raise ValueError(
                    "stain_vectors are (nearly) linearly dependent; use 3 distinct stains"
                )
        return value

    @field_validator("stain_names")
    @classmethod
    def _column_safe(
        cls, value: tuple[str, str, str], info: ValidationInfo
    ) -> tuple[str, str, str]:
        for name in value:
            if not name.isidentifier() or name != name.lower():
                raise ValueError(f"stain name {name!r} must be a lower-case identifier")
        if len(set(value)) != 3:
            raise ValueError("stain names must differ")
        if info.data.get("stain") == "ihc" and "dab" not in value:
            raise ValueError(
                "an ihc profile grades nuclei by the stain named 'dab'; name its DAB vector "
                f"'dab' (got {', '.join(value)})"
            )
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Profile:
        lo, mid, hi = self.dab_thresholds
        if not lo < mid < hi:
            raise ValueError("dab_thresholds must be increasing (1+, 2+, 3+)")
        if self.min_area_um2 >= self.max_area_um2:
            raise ValueError("min_area_um2 must be below max_area_um2")
        if self.min_area_px >= self.max_area_px:
            raise ValueError("min_area_px must be below max_area_px")
        return self

    @model_validator(mode="after")
    def _fits_modality(self) -> Profile:
        # stain is "he" when a profile leaves it out: a DAPI profile of channels: 1 was
        # measured as bright field, its dark background's optical density all "tissue"
        if self.brightfield and self.channels != 3:
            raise ValueError(
                f"stain {self.stain!r} (the default where a profile leaves out stain) is a "
                f"bright-field colour stain and needs channels: 3, got {self.channels}; set "
                "stain: fluorescence for fluorescence, stain: none for grey bright field"
            )
        if self.stain != "fluorescence" and self.tissue_intensity_threshold is not None:
            raise ValueError(
                f"tissue_intensity_threshold is for fluorescence and a {self.stain!r} profile "
                "measures tissue by optical density; set tissue_od_threshold instead"
            )
        return self

    @property
    def brightfield(self) -> bool:
        """True for transmitted-light stains measured as optical density (H&E, IHC)."""
        return self.stain in ("he", "ihc")

    def stain_matrix(self):
        """``(3, 3) float64``: rows are the unit-length RGB OD vectors of ``stain_names``."""
        import numpy as np

        rows = self.stain_vectors or default_stain_vectors(self.stain_names)
        matrix = np.asarray(rows, dtype=np.float64)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


class MonitorConfig(Strict):
    """Drift thresholds: population stability index (PSI) per image statistic.

    New images' statistics (:func:`mlseg.inventory.image_stats`) are binned on the training
    fingerprint's decile edges (outer bins open-ended). A statistic drifts when its PSI reaches
    ``psi_warn`` (warning) or ``psi_fail`` (the monitor fails) *and* a permutation test on the
    same bins says the difference is not chance: p below ``p_value`` after Bonferroni
    correction over the statistics compared (small batches give noisy PSI). Fewer than
    ``min_images`` new images are too few for that test. In a batch of any size a statistic
    also warns, naming the images, where a value lies beyond the training range widened by
    ``far_margin`` times its width on each side (log scale for ``laplacian_var``), and by at
    least 1% of the image for a ``*_fraction`` statistic (an image unlike any trained on:
    inverted, blank, blurred, another stain; one among many moves no batch statistic).
    ``statistics``
    limits the comparison (empty: every statistic of the fingerprint). Image size warns when
    more than ``size_warn_fraction`` of the new images lie outside the training width/height
    range, either way round (a tile turned a quarter is not another size).
    """

    psi_warn: float = Field(0.2, gt=0)
    psi_fail: float = Field(0.5, gt=0)
    p_value: float = Field(0.01, gt=0, lt=1)
    min_images: int = Field(5, ge=1)
    far_margin: float = Field(0.5, ge=0)
    permutations: int = Field(4999, ge=99)
    statistics: tuple[str, ...] = ()
    size_warn_fraction: float = Field(0.25, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _warn_below_fail(self) -> MonitorConfig:
        if self.psi_warn >= self.psi_fail:
            raise ValueError("psi_warn must be below psi_fail")
        return self


class Config(Strict):
    """A whole run: one section per stage plus the name of the image-type profile."""

    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    monitor: MonitorConfig = MonitorConfig()
    profile: str = "he"
    profiles_file: Path | None = None


def _keys_beside(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys ``model`` takes where ``loc`` (a key's path) ends; none past a free-form part
    (a profile's name, a list)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    return list(model.model_fields)


def _format_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(item["loc"][-1]), _keys_beside(model, item["loc"]))
            meant = (
                f"did you mean '{'.'.join([*map(str, item['loc'][:-1]), near[0]])}'? "
                if near
                else ""
            )
            lines.append(f"{source}: unknown key '{key}'; {meant}remove it or check its spelling")
        elif item["type"] == "finite_number":
            lines.append(
                f"{source}: bad value for '{key}': got {item['input']}; give a finite number "
                "(the config.json saved beside the weights holds no infinity or NaN)"
            )
        elif item["type"] == "int_parsing" and _whole_number(item["input"]) is not None:
            # YAML reads 1e3 (no dot, no exponent sign) as text, which no integer parses
            lines.append(
                f"{source}: bad value for '{key}': {item['input']} was read as text, not a "
                f"number; write {_whole_number(item['input'])}"
            )
        else:
            lines.append(f"{source}: bad value for '{key}': {item['msg']}")
    return "\n".join(lines)


def _whole_number(value: Any) -> int | None:
    """``value``'s whole number where it is text that reads as one (``"1e3"``: 1000)."""
    try:
        number = float(value) if isinstance(value, str) else float("nan")
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


class _Refused(yaml.YAMLError):
    """What YAML would read otherwise than it is written."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key written twice in one mapping: PyYAML keeps the last
    without a word, so a second ``train:`` section dropped every setting of the first. A
    profile's ``version`` written as a number is read as written (YAML makes 1.10 1.1), and
    a number with a leading zero is refused (YAML reads 0640 as the octal 416)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if (
                key_node.value == "version"
                and isinstance(value_node, yaml.ScalarNode)
                and value_node.tag in _NUMBER_TAGS
            ):
                value_node.tag = "tag:yaml.org,2002:str"
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # unhashable: construct_mapping says so
                continue
            if first is not None:
                raise _Refused(
                    f"'{key}' is written twice (lines {first} and {line}) and only the last "
                    "would count; merge them into one"
                )
            lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = node.value.replace("_", "").lstrip("+-")
        if len(text) > 1 and text[0] == "0" and text[1].isdigit():
            raise _Refused(
                f"line {node.start_mark.line + 1}: YAML reads {node.value} as the octal number "
                f"{super().construct_yaml_int(node)}; leave out the leading zero, or quote a name"
            )
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def read_yaml_values(text: str, source: str) -> Any:
    """``text`` (one line: ``--param``'s values) read as a config file's values are: a
    number with a leading zero is refused, as :class:`_Loader` does (plain YAML read
    ``train.seed=0123`` as 83). :class:`ConfigError` naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)  # nosec B506: _Loader is a SafeLoader
    except _Refused as err:
        raise ConfigError(f"{source}: {str(err).removeprefix('line 1: ')}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: values are not YAML ({err})") from None


def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file; give a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.load(text, Loader=_Loader) or {}  # nosec B506: _Loader is a SafeLoader
    except _Refused as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:  # a Windows editor's Latin-1 (ANSI): YAML, not UTF-8
        byte = err.object[err.start : err.start + 1]
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{byte.hex()}, "
            f"{byte.decode('cp1252', errors='replace')!r} in Windows-1252); save it as UTF-8 "
            "(the encoding in the editor's Save As)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); give a YAML config file") from err


def parse(model: type[Strict], data: Any, source: str) -> Any:
    """Validate ``data`` as ``model``; errors name each key and ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, model)) from None


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Load a :class:`Config` from YAML (defaults if ``path`` is None), then apply overrides.

    ``overrides`` are section dicts, e.g. ``train={"max_steps": 10}``; merged by copying.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
    # a section with its keys commented out reads as null: an empty section; a null
    # top-level value (profiles_file: null, as every saved config.json holds it) stays null
    sections = {k for k, f in Config.model_fields.items() if isinstance(f.default, BaseModel)}
    merged = {
        k: (dict(v) if isinstance(v, dict) else {} if v is None and k in sections else v)
        for k, v in data.items()
    }
    for section, values in overrides.items():
        current = merged.get(section, {})
        if isinstance(values, dict) and isinstance(current, dict):
            merged[section] = {**current, **values}
        elif not isinstance(values, dict):
            merged[section] = values
        # else the file's section is no mapping (train: 5): kept for the error below to name;
        # replacing it with the override trained on defaults without a word
    if overrides:  # a bad value or unknown key may be the override's (--max-steps 0)
        source += " with overrides"
    return parse(Config, merged, source)


def default_profiles_path() -> Path:
    return Path(str(resources.files("mlseg") / "profiles.yaml"))


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    """Load every profile of a ``profiles.yaml`` (the packaged one if ``path`` is None)."""
    path = Path(path) if path is not None else default_profiles_path()
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a profiles file; give a profiles.yaml")
    if not path.is_file():  # not "config file not found": it may come from a model's config.json
        raise ConfigError(
            f"{path}: profiles file not found; check --profiles or the run config's "
            f"profiles_file (a relative path is read from the current folder, {Path.cwd()})"
        )
    data = _read_yaml(path)
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{path}: expected a top-level 'profiles:' mapping of name -> settings")
    out = {}
    for name, values in profiles.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(
                f"{path}: profile '{name}' must be a mapping of settings, got {values!r}"
            )
        values = {**(values or {}), "name": name}
        out[name] = parse(Profile, values, f"{path} (profile '{name}')")
    return out


def get_profile(name: str, path: str | Path | None = None) -> Profile:
    """One profile by name; an unknown name lists the known ones."""
    profiles = load_profiles(path)
    if name not in profiles:
        where = path or default_profiles_path()
        raise ConfigError(
            f"{where}: unknown profile {name!r}; choose one of {', '.join(sorted(profiles))}"
        )
    return profiles[name]


def effective_preprocess(cfg: Config, profile: Profile) -> PreprocessConfig:
    """The profile's preprocessing with the keys the run config sets explicitly on top.

    Field by field: a run config that only sets ``preprocess.target_pixel_size_um`` keeps
    the profile's ``stain_norm``; one that sets ``stain_norm: none`` switches it off."""
    if "preprocess" not in cfg.model_fields_set:
        return profile.preprocess
    own = cfg.preprocess
    return profile.preprocess.model_copy(
        update={key: getattr(own, key) for key in own.model_fields_set}
    )
