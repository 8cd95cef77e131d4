"""Train a segmentation model: :func:`fit` is a short loop of named steps.

``fit`` prepares the data (:func:`mlseg.data.prepare_data`), builds the model
(:func:`mlseg.model.build_model`), then repeats :func:`train_step` on augmented patches;
every ``train.val_every`` steps (one "epoch") it runs :func:`validate` on the held-back
images, appends a row to the history, saves ``best`` (when validation Dice improved) and
``last`` checkpoints with the optimiser state, and stops early after
``train.early_stop_patience`` epochs without improvement. Run again on the same output
folder, it resumes from ``last`` and continues the step count (``meta.json``'s
``trained_on`` records the machine of each stretch, see :func:`machine`; a resume on
another warns). With ``train.ema_decay`` > 0
an exponential moving average of the weights and BatchNorm statistics (timm's
``ModelEmaV3``, its decay warmed up from 0 so the random initial weights fade out fast) is
updated after every step; validation, ``best`` and ``last`` use the average, and the raw
weights travel in ``last.state.pt`` for resuming. With ``train.mixstyle_p`` > 0 the
encoder's early stages mix feature statistics across the batch while training
(:mod:`mlseg.mixstyle`); its draws are saved with ``last`` too.

Optimisation: AdamW, linear warm-up then cosine decay to 1 % of ``train.lr``; loss
``dice_weight * soft Dice + ce_weight * cross-entropy`` (binary: BCE on the foreground
logit; three-class: CE with the boundary class weighted by ``boundary_weight`` and Dice
over interior and boundary). Channels-last memory and optionally ``torch.compile``; bf16
autocast on GPUs and CPUs with bf16 arithmetic in hardware (Ampere or later, AMX or
AVX512-BF16, see :func:`mlseg.model.autocast_dtype`), float32 on others, where emulated bf16
is slower.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mlseg.config import AugmentConfig, Config, PreprocessConfig, Profile, get_profile
from mlseg.data import Batches, TrainData, ValTiles, effective_preprocess, prepare_data
from mlseg.dataset import (
    Pair,
    dataset_fingerprint,
    list_pairs,
    pixels_fingerprint,
    read_resaved_csv,
)
from mlseg.errors import (
    ConfigError,
    DatasetError,
    ResumeError,
    TrainingDiverged,
    some_of,
    writes_named,
)
from mlseg.io import read_image_for, write_table, write_text
from mlseg.model import (
    REFERENCE_KEY,
    autocast_dtype,
    build_model,
    check_names,
    check_trainable,
    load_train_state,
    nonfinite_tensors,
    read_checkpoint_json,
    resolve_device,
    save_checkpoint,
)
from mlseg.pixel_size import SAME_SCALE_RATIO
from mlseg.registry import code_version, package_versions
from mlseg.targets import num_classes

LOG_EVERY = 25  # steps between loss read-backs (each one waits for the GPU)
HISTORY_COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "val_dice",
    "lr",
    "images_per_s",
    "elapsed_s",
)


@dataclass
class TrainResult:
    """What :func:`fit` produced."""

    best_checkpoint: Path | None
    last_checkpoint: Path
    history: pd.DataFrame  # one row per epoch, columns HISTORY_COLUMNS
    best_val_dice: float | None
    steps: int
    images_per_s: float  # training throughput of this call (validation excluded)
    out_dir: Path
    train_images: int = 0  # images patches were drawn from
    val_images: int = 0  # images held back for validation (data.val_fraction)
    pixel_size_um: float | None = None  # the model's (meta.json); None = unknown
    # each training image's microns per pixel as read (the profile's where it declares none)
    image_pixel_sizes: dict[str, float | None] = field(default_factory=dict)


def describe(
    steps: int,
    images_per_s: float,
    best_val_dice: float | None,
    train_images: int | None = None,
    val_images: int | None = None,
) -> str:
    """One line on what a :func:`fit` call did, as the CLI and the flow report it: the
    steps, on how many training images with how many held back, and the best validation
    Dice. A resume of a finished run trains nothing and says so (not "nan img/s"); a run
    with no validation image says its best checkpoint is the one of lowest training loss."""
    if not math.isfinite(images_per_s):
        done = f"{steps} steps already trained, none this time"
    else:
        done = f"trained {steps} steps ({images_per_s:.1f} img/s)"
    if train_images is not None:
        held = f"{val_images} held back for validation" if val_images else "none held back"
        done += f" on {train_images} training image(s), {held}"
    if best_val_dice is None and not val_images and train_images is not None:
        return f"{done}; no validation Dice: best.safetensors has the lowest training loss"
    dice = "n/a" if best_val_dice is None else f"{best_val_dice:.4f}"
    return f"{done}; best validation Dice {dice}"


def describe_scale(pixel_size_um: float | None, image_pixel_sizes: dict[str, float | None]) -> str:
    """One line on the pixel size a model was trained at, and what that costs the images it
    segments: a run that picked 0.25 um, the median of CPM15's 20x and 40x tiles, said
    nothing of it, and 20x images are then enlarged 2x, at about 4x the inference time.
    ``image_pixel_sizes``: each training image's, as ``meta.json`` keeps them (``None`` =
    unknown)."""
    known = [um for um in image_pixel_sizes.values() if um is not None]
    if pixel_size_um is None:
        unknown = len(image_pixel_sizes) - len(known)
        why = (
            "no training image has one"
            if not known
            else f"{unknown} of {len(image_pixel_sizes)} training images have none"
        )
        return (
            f"pixel size: unknown ({why}); segment scales each image by the size of its "
            "nuclei (inference.auto_scale)"
        )
    mixed = bool(known) and max(known) / min(known) > SAME_SCALE_RATIO
    if mixed and pixel_size_um == statistics.median(known):
        why = f"the median of the training images' {min(known):g}-{max(known):g} um"
    elif not mixed and known and pixel_size_um == statistics.median(known):
        why = "the training images' own"
    else:
        why = "preprocess.target_pixel_size_um"
    # what the training images' own scales cost when segmented so: enlarging the coarsest
    # (a 20x image for a 40x model) takes the square of the factor in time
    costs = []
    coarse = max(known) if mixed else 2 * pixel_size_um
    if coarse > pixel_size_um:
        factor = coarse / pixel_size_um
        # a mixed set has such an image; a set of one scale only might meet one
        one = f"one at {coarse:g} um is" if mixed else f"an image at {coarse:g} um would be"
        costs.append(f"{one} enlarged {factor:.3g}x, taking about {factor**2:.3g}x the time")
    if mixed and min(known) < pixel_size_um:
        costs.append(f"one at {min(known):g} um shrunk {pixel_size_um / min(known):.3g}x")
    cost = ", ".join(costs)
    return (
        f"pixel size: trained at {pixel_size_um:g} um/px ({why}); segment resamples every "
        f"image of known size to it and measures it at its own: {cost}"
    )


# ----------------------------------------------------------------------------- pieces
def warmup_cosine(warmup: int, total: int, floor: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> ``floor``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class SegLoss(nn.Module):
    """``dice_weight * (1 - soft Dice) + ce_weight * cross-entropy`` over a batch.

    ``logits`` ``(N, classes, H, W)``, ``target`` ``(N, H, W)`` int64 class map. Dice is
    computed over the whole batch (as nnU-Net's batch Dice), on foreground classes only.
    """

    def __init__(self, target: str, dice_weight: float, ce_weight: float, boundary_weight: float):
        super().__init__()
        self.target = target
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.register_buffer("class_weight", torch.tensor([1.0, 1.0, boundary_weight]))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.target == "binary":
            z, t = logits[:, 0], target.float()
            ce = F.binary_cross_entropy_with_logits(z, t)
            p = torch.sigmoid(z)
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        else:
            ce = F.cross_entropy(logits, target, weight=self.class_weight)
            p = torch.softmax(logits, dim=1)
            scores = []
            for c in range(1, logits.shape[1]):
                t = (target == c).float()
                pc = p[:, c]
                scores.append((2 * (pc * t).sum() + 1) / (pc.sum() + t.sum() + 1))
            dice = 1 - torch.stack(scores).mean()
        return self.ce_weight * ce + self.dice_weight * dice


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 0.0,
) -> torch.Tensor:
    """One optimisation step on a batch; returns the loss (0-d tensor, not synchronised)."""
    with _autocast(x.device, amp_dtype):
        logits = model(x)
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def validate(
    model: nn.Module,
    tiles: ValTiles,
    loss_fn: nn.Module,
    *,
    target: str,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean loss over the validation tiles (padding included: it is recorded and checked for
    divergence) and foreground Dice over their real pixels (padding excluded: it picks best)."""
    was_training = model.training
    model.eval()
    dev = tiles.images.device
    counts = torch.zeros(3, device=dev)  # tp, fp, fn
    loss_sum = torch.zeros((), device=dev)
    n = tiles.images.shape[0]
    memory = torch.channels_last if channels_last else torch.contiguous_format
    for i in range(0, n, batch_size):
        x = tiles.images[i : i + batch_size].float().contiguous(memory_format=memory)
        y, valid = tiles.classes[i : i + batch_size].long(), tiles.valid[i : i + batch_size]
        with _autocast(dev, amp_dtype):
            logits = model(x)
        loss_sum += loss_fn(logits, y) * x.shape[0]
        pred = logits[:, 0] > 0 if target == "binary" else logits.argmax(dim=1) > 0
        truth = y > 0
        counts += torch.stack(
            [
                (pred & truth & valid).sum(),
                (pred & ~truth & valid).sum(),
                (~pred & truth & valid).sum(),
            ]
        ).float()
    model.train(was_training)
    tp, fp, fn = counts.tolist()
    dice = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) > 0 else 1.0
    return {"val_loss": float(loss_sum) / max(n, 1), "val_dice": dice}


def _check_finite(value: float, step: int, lr: float, what: str = "the loss") -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: {what} became {value} by step {step}; lower train.lr "
            f"(now {lr:g}), raise train.warmup_steps, or check the images for NaN/constant values"
        )


# Stain augmentations, each with the settings that shape it: they act on the haematoxylin
# of H&E/IHC RGB in [0, 1] (mlseg.augment.draw_params), so nowhere else.
STAIN_AUGMENTATIONS = {
    "nucleus_fade_p": ("nucleus_fade_p", "nucleus_fade_min"),
    "haematoxylin_gain_p": ("haematoxylin_gain_p", "haematoxylin_gain"),
    "hed_p": ("hed_p", "hed_jitter"),
}


def stain_jitter_applies(stain: str, pp: PreprocessConfig) -> bool:
    """Whether the stain augmentations act: on H&E/IHC images not intensity-normalised."""
    return stain in ("he", "ihc") and pp.intensity_norm == "none"


def check_stain_augment(augment: AugmentConfig, stain: str, pp: PreprocessConfig) -> None:
    """A ConfigError where the config sets a stain augmentation away from its default that
    this profile and preprocessing leave without effect (the defaults pass: they are the
    H&E recipe's, and do nothing on fluorescence)."""
    if not augment.enabled or stain_jitter_applies(stain, pp):
        return
    defaults = AugmentConfig()
    asked = [
        f"augment.{key} {getattr(augment, key)}"
        for p, keys in STAIN_AUGMENTATIONS.items()
        for key in keys
        if getattr(augment, p) > 0
        and (p != "hed_p" or augment.hed_jitter > 0)
        and getattr(augment, key) != getattr(defaults, key)
    ]
    if asked:
        why = (
            f"preprocess.intensity_norm is {pp.intensity_norm}"
            if pp.intensity_norm != "none"
            else f"the profile's stain is {stain}"
        )
        raise ConfigError(
            f"{', '.join(asked)}: the stain augmentations act on the haematoxylin of H&E/IHC "
            f"images in [0, 1], and {why}, so they would do nothing; leave them out, or set "
            "preprocess.intensity_norm: none on H&E/IHC images"
        )


# ----------------------------------------------------------------------------- state
# Train settings a resumed run may change: where and how fast it runs, and how long it
# lasts (a larger max_steps trains on, the learning rate following the longer schedule from
# the current step: a warm restart when a finished run is extended). Every other train,
# augment and preprocess setting, and the validation split, decides what is learnt: the
# config saved beside the weights must be the one that made them.
RESUME_FREE = frozenset(
    {
        "device",
        "num_threads",
        "amp",
        "channels_last",
        "compile",
        "num_workers",
        "max_steps",
        "val_every",
        "early_stop_patience",
        "target",  # compared as resolved, in meta.json
    }
)


def _changed(saved: dict[str, Any], now: dict[str, Any], section: str, keys) -> list[str]:
    # a key missing from an older checkpoint's config is not a change
    before = saved.get(section, {})
    return [
        f"{section}.{key}: {before[key]!r} -> {now[section][key]!r}"
        for key in keys
        if key in before and before[key] != now[section][key]
    ]


def _missing(saved: dict[str, Any], now: dict[str, Any], section: str, keys) -> list[str]:
    """``section.key: value`` of each key ``now`` has and the older ``saved`` config lacks."""
    before = saved.get(section, {})
    return [f"{section}.{key}: {now[section][key]!r}" for key in keys if key not in before]


def _same_pixels(saved: Any, pairs: Callable[[], list[Pair]]) -> bool:
    """Whether ``saved``, a fingerprint in the form the pipeline of mlseg before 2026-12-06
    recorded (32 hex digits, of the images' pixels), is that of the training images now."""
    return isinstance(saved, str) and len(saved) == 32 and saved == pixels_fingerprint(pairs())


def _same_files(saved: Any, pairs: Callable[[], list[Pair]]) -> bool:
    """Whether ``saved``, a fingerprint in the form mlseg before 2026-12-07 wrote (16 hex
    digits, of the files without their declared pixel sizes), is that of the training files
    now; the sizes are compared on their own (``meta.json``'s ``image_pixel_sizes``)."""
    return (
        isinstance(saved, str)
        and len(saved) == 16
        and saved == dataset_fingerprint(pairs(), pixel_sizes=False)
    )


def _compatible(
    folder: Path,
    cfg: Config,
    data: TrainData,
    classes: int,
    fingerprint: str,
    pairs: Callable[[], list[Pair]],
) -> None:
    """Refuse to resume the run in ``folder`` with another model, data or recipe.
    ``pairs`` lists the training pairs, read only for a fingerprint of an older mlseg."""
    # a damaged file (a folder copied in part) said only JSONDecodeError, in a traceback
    meta = read_checkpoint_json(folder / "meta.json")
    saved = read_checkpoint_json(folder / "config.json")
    now = cfg.model_dump(mode="json")
    compared = (
        ("train", [k for k in now["train"] if k not in RESUME_FREE]),
        ("augment", now["augment"]),
        ("preprocess", now["preprocess"]),
        ("data", ("val_fraction", "seed")),
    )
    problems = [p for section, keys in compared for p in _changed(saved, now, section, keys)]
    for key, value in (
        ("target", data.target),
        ("classes", classes),
        ("in_channels", data.in_channels),
    ):
        if meta.get(key) != value:
            problems.append(f"{key}: {meta.get(key)!r} -> {value!r}")
    saved_fingerprint = meta.get("fingerprint_hash")
    if saved_fingerprint not in (None, fingerprint) and not (
        _same_pixels(saved_fingerprint, pairs) or _same_files(saved_fingerprint, pairs)
    ):
        problems.append(f"data fingerprint: {saved_fingerprint} -> {fingerprint}")
    # the same path may hold another lab's slide now: every image is normalised to it
    copy, reference = meta.get(REFERENCE_KEY), cfg.preprocess.stain_reference
    both = copy and reference is not None and (folder / copy).is_file() and reference.is_file()
    # by pixels, as training reads them: the copy is the reference's pixels alone,
    # re-encoded (mlseg.model) without alpha
    if both and not np.array_equal(
        read_image_for(folder / copy, data.stain), read_image_for(reference, data.stain)
    ):
        problems.append(
            f"preprocess.stain_reference: {reference} differs from the image the run "
            f"trained with ({folder / copy})"
        )
    sizes, now_sizes = meta.get("image_pixel_sizes"), data.image_pixel_sizes
    if sizes is not None and sizes != now_sizes:  # absent from older checkpoints
        moved = [
            f"{stem} {sizes.get(stem)} -> {now_sizes.get(stem)}"
            for stem in sorted(set(sizes) | set(now_sizes))
            if sizes.get(stem) != now_sizes.get(stem)
        ]
        problems.append(f"pixel sizes (um) of {len(moved)} training image(s): {some_of(moved)}")
    if problems:
        raise ResumeError(
            f"{folder}: holds a run that cannot be resumed with this config/data ("
            + "; ".join(problems)
            + "); give the settings it was trained with (its config.json), choose another "
            "output folder, or pass --no-resume (the flows' parameter resume=false) to start over",
            problems,
        )
    missing = [m for section, keys in compared for m in _missing(saved, now, section, keys)]
    if missing:
        # not a change by the run's own record, but the steps so far never had these
        warnings.warn(
            f"{folder}: its config.json, written by an older mlseg, lacks {len(missing)} "
            f"setting(s) the remaining steps now train with ({'; '.join(missing)}), and "
            "config.json will name them for the whole run; set the values that reproduce "
            "the older mlseg in the config, or pass --no-resume (the flows' parameter "
            "resume=false) to train every step alike",
            stacklevel=4,  # fit's caller
        )


def machine(device: torch.device) -> dict[str, Any]:
    """What decides a training's arithmetic besides its config and data.

    Floating-point sums come out differently on another CPU instruction set, GPU, CUDA
    build, thread count or PyTorch release, so one seed gives one model only on one of these.
    """
    if device.type == "cuda":
        return {
            "device": "cuda",
            "hardware": torch.cuda.get_device_name(device),
            "kernels": f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
            "torch": torch.__version__,
        }
    return {
        "device": device.type,
        "hardware": _cpu_name(),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _software() -> dict[str, Any]:
    """The code and packages a stretch trains with: mlseg's commit and every release that
    decides the numbers (model building, augmentation, resampling), so a registered model
    names all a reader needs to train it again, not torch's release alone."""
    return {"code": code_version(), "packages": package_versions()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _trained_on(out: Path, step: int, here: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each stretch of the run in ``out`` trained, this call's from ``step`` on."""
    if step == 0:
        return [{"from_step": 0, **here}]
    stretches = read_checkpoint_json(out / "meta.json").get("trained_on", [])
    before = {k: v for k, v in stretches[-1].items() if k != "from_step"} if stretches else {}
    if before == here:
        return stretches
    if before:
        changed = ", ".join(_differences(before, here))
        warnings.warn(
            f"{out}: resuming at step {step} on another machine or setting ({changed}); "
            "the training goes on correctly, but the model will not equal the one an "
            "uninterrupted run of this seed gives: compare recipes on runs trained in one place",
            stacklevel=4,  # fit's caller
        )
    return [*stretches, {"from_step": step, **here}]


def _differences(before: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """``key old -> new`` of each setting of ``here`` that ``before`` had otherwise; of a
    mapping (``packages``) only the entries that differ: the one release of twelve that
    changed, not both lists in full."""
    said = []
    for key, now in here.items():
        was = before.get(key)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            said += [
                f"{key}.{k} {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v
            ]
        elif was is None and isinstance(now, dict):
            said.append(f"{key} (not recorded before)")
        else:
            said.append(f"{key} {was!r} -> {now!r}")
    return said


def _clear(folder: Path) -> None:
    for name in (
        "best.safetensors",
        "last.safetensors",
        "last.state.pt",
        "best.state.pt",
        "meta.json",
    ):
        (folder / name).unlink(missing_ok=True)
    for copy in folder.glob("stain_reference.*"):  # the earlier run's (mlseg.model)
        copy.unlink(missing_ok=True)


def _write_history(history: list[dict[str, Any]], folder: Path) -> pd.DataFrame:
    df = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))
    write_table(df, folder / "history.csv")
    write_text(folder / "history.json", df.to_json(orient="records", indent=2))
    if len(df):
        from mlseg.plots import plot_history

        plot_history(df, folder / "training_curves.png")
    return df


def _read_history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "history.csv"
    if not path.is_file():
        return []
    return read_resaved_csv(path).to_dict("records")  # looked at in Excel, and saved


# ----------------------------------------------------------------------------- fit
@dataclass
class _Run:
    """Everything one training run holds between steps."""

    cfg: Config
    profile: Profile  # saved with the run: its profiles_file may not travel with it
    data: TrainData
    out: Path
    device: torch.device
    fingerprint: str
    model: nn.Module
    net: nn.Module  # the model, compiled or not
    ema: nn.Module | None  # timm ModelEmaV3 of the model (train.ema_decay > 0)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    gen: torch.Generator  # CPU; draws the augmentation of every batch
    amp_dtype: torch.dtype | None
    channels_last: bool
    style_rng: np.random.Generator | None = None  # MixStyle's draws (train.mixstyle_p > 0)
    trained_on: list[dict[str, Any]] = field(default_factory=list)  # see _trained_on
    step: int = 0
    best: float = -math.inf
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def evaluated(self) -> nn.Module:
        """What is validated and saved: the moving average when there is one."""
        return self.model if self.ema is None else self.ema.module


@contextlib.contextmanager
def _torch_settings_kept() -> Iterator[None]:
    """Torch's process-wide settings (CPU threads, cuDNN autotuning, TF32) as they were on
    entry, whatever the block set for itself (:func:`_start`): a notebook or worker process
    that trains and then segments, or trains again with ``num_threads: 0``, must not go on
    at the last run's thread count or with TF32 matmuls it did not ask for."""
    kept = (
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        yield
    finally:
        torch.set_num_threads(kept[0])
        torch.backends.cudnn.benchmark = kept[1]
        torch.backends.cuda.matmul.allow_tf32 = kept[2]
        torch.backends.cudnn.allow_tf32 = kept[3]


def _start(
    cfg: Config,
    data_root: str | Path,
    out: Path,
    resume: bool,
    fingerprint_hash: str | None,
    held: contextlib.ExitStack,
) -> _Run:
    """Data, model, optimiser and schedule; restored from ``out/last`` when resuming.
    ``out`` is held (:func:`_training_in`) until ``held`` closes."""
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.num_threads and device.type == "cpu":
        torch.set_num_threads(tc.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(tc.seed)
    check_names(tc)  # before the data are read: a misspelt name is known now
    profile = get_profile(cfg.profile, cfg.profiles_file)
    check_stain_augment(cfg.augment, profile.stain, effective_preprocess(cfg, profile))
    data = prepare_data(cfg, data_root, profile, device)
    if fingerprint_hash is not None and fingerprint_hash != data.fingerprint:
        # the hash is the validation's: training must not run on data no one validated
        raise DatasetError(
            f"{data_root}: the training data (images, masks or their declared pixel sizes) "
            f"changed since it was validated (fingerprint "
            f"{fingerprint_hash} validated, {data.fingerprint} now); validate it again"
        )
    fingerprint = data.fingerprint
    classes = num_classes(data.target)
    # the config saved beside the weights says what was actually done
    cfg = cfg.model_copy(
        update={
            "preprocess": data.preprocess,
            "train": tc.model_copy(update={"target": data.target}),
        }
    )
    held.enter_context(_training_in(out))
    state = None
    if resume and (out / "last.safetensors").is_file() and (out / "meta.json").is_file():
        pairs = functools.partial(list_pairs, data_root, "train", cfg.data)
        _compatible(out, cfg, data, classes, fingerprint, pairs)
        state = load_train_state(out, "last")
    # built before --no-resume clears the earlier run: a model that cannot be built (a
    # depth its decoder lacks, weights this machine cannot fetch) must not cost that run
    model = build_model(tc, data.in_channels, classes)
    check_trainable(model, tc, data.in_channels)
    if not resume:
        _clear(out)
    ema = None
    if state is not None:
        from safetensors.torch import load_file

        saved = load_file(str(out / "last.safetensors"))
        model.load_state_dict(state.get("model", saved))  # "model": raw weights beside an EMA
    channels_last = tc.channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if tc.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True)
        if state is not None and "model" in state:  # last.safetensors holds the average
            ema.module.load_state_dict(saved)
    style_rng = None
    if tc.mixstyle_p > 0:
        from mlseg.mixstyle import attach

        style_rng = attach(model, tc.encoder, tc.mixstyle_p, tc.mixstyle_alpha, tc.seed)
        if style_rng is not None and state is not None and "mixstyle_rng" in state:
            style_rng.bit_generator.state = state["mixstyle_rng"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda"
    )
    run = _Run(
        cfg=cfg,
        profile=profile,
        data=data,
        out=out,
        device=device,
        fingerprint=fingerprint,
        model=model,
        net=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(tc.warmup_steps, tc.max_steps)
        ),
        loss_fn=SegLoss(data.target, tc.dice_weight, tc.ce_weight, tc.boundary_weight).to(device),
        gen=torch.Generator().manual_seed(tc.seed),
        amp_dtype=autocast_dtype(device, tc.amp),
        channels_last=channels_last,
        style_rng=style_rng,
    )
    if state is not None:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        # the optimiser kept the rate of the schedule it was saved under; an extended run
        # (larger max_steps) takes its next step at the longer schedule's rate, not that one
        sched = run.scheduler
        for group, base, factor in zip(
            run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(sched.last_epoch)
        run.gen.set_state(state["generator"])
        run.step, run.best = int(state["step"]), float(state["best"])
        # early stopping by this call's patience (a resume may change it): a run stopped
        # after 1 epoch without improvement trains on when given a patience of 5
        run.bad_epochs = int(state["bad_epochs"])
        run.stopped = run.bad_epochs >= tc.early_stop_patience
        # epochs recorded after the last checkpoint are trained again
        run.history = [row for row in _read_history(out) if row["step"] <= run.step]
    if run.step < tc.max_steps and not run.stopped:  # a finished run trains nowhere
        precision = {"precision": "bf16 autocast" if run.amp_dtype else "float32"}
        run.trained_on = _trained_on(out, run.step, machine(device) | precision | _software())
    if tc.compile:
        run.net = torch.compile(model)
        data.train.compile()
    model.train()
    return run


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`train_step` on ``run.net``; the eager model from then on where it is compiled
    and compiling fails (no Triton for the GPU, no C++ compiler), as the patch sampler does."""

    def step(net: nn.Module) -> torch.Tensor:
        return train_step(
            net,
            run.optimizer,
            run.scheduler,
            run.loss_fn,
            x,
            y,
            amp_dtype=run.amp_dtype,
            grad_clip=run.cfg.train.grad_clip,
        )

    try:
        return step(run.net)
    except Exception as err:  # compiling happens in the forward and backward, before the update
        if run.net is run.model or isinstance(err, torch.OutOfMemoryError):
            raise
        cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed's
        warnings.warn(
            f"torch.compile of the model failed ({type(cause).__name__}: {cause}); training "
            "it eagerly (set train.compile: false to skip compiling)",
            stacklevel=2,
        )
        run.net = run.model
        return step(run.model)


def _checkpoint(run: _Run, name: str, metrics: dict[str, float], generator_state=None) -> Path:
    """Save ``best`` or ``last`` (with what resuming needs) beside the config and meta."""
    train_state = None
    if name == "last":
        train_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "generator": generator_state if generator_state is not None else run.gen.get_state(),
            "step": run.step,
            "best": run.best,
            "bad_epochs": run.bad_epochs,
            "stopped": run.stopped,
        }
        if run.style_rng is not None:
            train_state["mixstyle_rng"] = run.style_rng.bit_generator.state
        if run.ema is not None:  # last.safetensors holds the average, so keep the raw weights
            train_state["model"] = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    return save_checkpoint(
        run.out,
        run.evaluated,
        run.cfg,
        target=run.data.target,
        classes=num_classes(run.data.target),
        in_channels=run.data.in_channels,
        fingerprint_hash=run.fingerprint,
        metrics=metrics,
        pixel_size_um=run.data.pixel_size_um,
        name=name,
        step=run.step,
        stain=run.data.stain,
        nucleus_diameter_px=run.data.nucleus_diameter_px,
        train_state=train_state,
        trained_on=run.trained_on,
        image_pixel_sizes=run.data.image_pixel_sizes,
        profile=run.profile,
        split={"train": run.data.train_stems, "validation": run.data.val_stems},
        image_hashes=run.data.image_hashes,
    )


def _end_epoch(run: _Run, row: dict[str, Any], generator_state: torch.Tensor) -> dict[str, Any]:
    """Validate, record the epoch, save best/last, decide on early stopping."""
    tc = run.cfg.train
    if run.data.val is not None:
        row.update(
            validate(
                run.evaluated,  # eager: no recompilation for eval mode and other batch sizes
                run.data.val,
                run.loss_fn,
                target=run.data.target,
                batch_size=tc.batch_size * 2,
                amp_dtype=run.amp_dtype,
                channels_last=run.channels_last,
            )
        )
        # the training loss of a diverging run may stay finite for epochs after its weights
        # overflowed: such a model outputs NaN, scores Dice 0 (better than none) and was
        # saved as best and last
        _check_finite(row["val_loss"], run.step, tc.lr, "the validation loss")
    if nonfinite_tensors(run.evaluated.state_dict()):
        _check_finite(math.nan, run.step, tc.lr, "the model's weights or BatchNorm statistics")
    run.history.append(row)
    # the history before the checkpoint, which is what a resume goes on from: a run stopped
    # between the two resumes without this epoch's row (_start drops it) and records it
    # again, where the other order lost it for good
    _write_history(run.history, run.out)
    score = row["val_dice"] if run.data.val is not None else -row["train_loss"]
    metrics = {k: row[k] for k in ("train_loss", "val_loss", "val_dice")}
    if score > run.best + 1e-4:
        run.best, run.bad_epochs = score, 0
        _checkpoint(run, "best", metrics)
    else:
        run.bad_epochs += 1
        run.stopped = run.bad_epochs >= tc.early_stop_patience
    _checkpoint(run, "last", metrics, generator_state)
    return row


@contextlib.contextmanager
def _training_in(out: Path) -> Iterator[None]:
    """Hold ``out`` (created) for this training alone, by the lock file of an output folder
    (:data:`mlseg.outputs.RUN_LOCK`), and refuse a second one at once. Two trainings into
    one folder both started afresh, each wrote its checkpoints over the other's, and both
    ended saying 'checkpoints in <out>': one with lr 0.003 reported best validation Dice
    0.5250, while the folder held the other's run (lr 1e-05, best Dice 0.4004)."""
    from filelock import FileLock, Timeout

    from mlseg.errors import OutputError
    from mlseg.outputs import RUN_LOCK

    lock = FileLock(out / RUN_LOCK)
    with writes_named(out):  # a link to a share not mounted said 'file exists' alone
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise OutputError(
                f"{out}: another mlseg training is writing to this folder; wait for it to end "
                "(run this again then to resume it), or train into another folder"
            ) from None
    try:
        yield
    finally:
        lock.release()


@_torch_settings_kept()
def fit(
    cfg: Config,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = True,
    fingerprint_hash: str | None = None,
    progress: bool = True,
    log: Callable[[str], object] | None = None,
) -> TrainResult:
    """Train ``cfg.train`` on the ``train`` split of ``data_root``; checkpoints in ``out_dir``.

    Each epoch's line (step, loss, validation Dice) is given to ``log`` (stderr, a Prefect
    run's logger), above the progress bar if there is one; without ``log`` it is written
    above the bar (on stdout, as ``tqdm.write``).

    ``fingerprint_hash`` is the fingerprint of the data as validated (the ``validate-dataset``
    flow returns it); the files' own is recorded either way, and training on files that no
    longer match it is refused. See the module docstring for the loop. Raises
    :class:`DatasetError` (empty or malformed data, or changed since validation),
    :class:`ConfigError` (config does not fit the data), :class:`ResumeError` (``out_dir``
    holds a run trained otherwise; see ``RESUME_FREE``), :class:`ModelError` (model
    cannot be built) and its :class:`TrainingDiverged` (the loss became NaN or infinite).
    Torch's thread count and cuDNN/TF32 flags, set for the run, are restored on return.
    A second training into ``out_dir`` while one runs there is refused (:class:`OutputError`).
    """
    with contextlib.ExitStack() as held:
        run = _start(cfg, data_root, Path(out_dir), resume, fingerprint_hash, held)
        return _fit(run, progress, log)


def _fit(run: _Run, progress: bool, log: Callable[[str], object] | None) -> TrainResult:
    tc, data = run.cfg.train, run.data
    stain_jitter = stain_jitter_applies(data.stain, data.preprocess)
    batches = Batches(
        lambda: data.train.sample(
            tc.batch_size,
            tc.patch_size,
            run.cfg.augment,
            run.gen,
            fg_fraction=tc.fg_oversample,
            faint_fraction=tc.faint_oversample,
            stain_jitter=stain_jitter,
            channels_last=run.channels_last,
        ),
        run.gen,
        run.device,
    )
    bar = None
    if progress and run.step < tc.max_steps and not run.stopped:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=tc.max_steps, initial=run.step, unit="step", desc="train", dynamic_ncols=True
        )
    running = torch.zeros((), device=run.device)
    epoch_loss, epoch_steps, images, train_seconds = 0.0, 0, 0, 0.0
    t_epoch = time.perf_counter()
    # elapsed_s counts the whole run: a resumed one goes on from its last recorded epoch
    t_start = t_epoch - (float(run.history[-1]["elapsed_s"]) if run.history else 0.0)
    while run.step < tc.max_steps and not run.stopped:
        x, y = next(batches)
        running += _step(run, x, y)
        run.step += 1
        if run.ema is not None:
            run.ema.update(run.model, step=run.step)
        epoch_steps += 1
        end_of_epoch = run.step % tc.val_every == 0 or run.step == tc.max_steps
        if run.step % LOG_EVERY == 0 or end_of_epoch:
            value = float(running)  # waits for the device
            _check_finite(value, run.step, tc.lr)
            epoch_loss += value
            running.zero_()
            if bar is not None:
                bar.update(run.step - bar.n)
                bar.set_postfix(
                    loss=f"{epoch_loss / epoch_steps:.4f}",
                    lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                )
        if not end_of_epoch:
            continue
        seconds = time.perf_counter() - t_epoch
        train_seconds += seconds
        images += epoch_steps * tc.batch_size
        row = {
            "epoch": len(run.history) + 1,
            "step": run.step,
            "train_loss": epoch_loss / epoch_steps,
            "val_loss": float("nan"),
            "val_dice": float("nan"),
            "lr": run.scheduler.get_last_lr()[0],
            "images_per_s": epoch_steps * tc.batch_size / max(seconds, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
        }
        row = _end_epoch(run, row, batches.generator_state())
        dice = "" if data.val is None else f" val_dice={row['val_dice']:.4f}"
        line = f"epoch {row['epoch']} step {run.step}: loss={row['train_loss']:.4f}{dice}"
        if log is not None:  # the bar, if any, cleared while it writes (Prefect's log too)
            with bar.external_write_mode() if bar is not None else contextlib.nullcontext():
                log(line)
        elif bar is not None:
            bar.write(line)
        epoch_loss, epoch_steps = 0.0, 0
        t_epoch = time.perf_counter()
    if bar is not None:
        bar.close()
    return _result(run, images / train_seconds if train_seconds > 0 else float("nan"))


def _result(run: _Run, images_per_s: float) -> TrainResult:
    df = pd.DataFrame(run.history, columns=list(HISTORY_COLUMNS))
    dice = df["val_dice"].max() if run.data.val is not None and len(df) else None
    best_path = run.out / "best.safetensors"
    return TrainResult(
        best_checkpoint=best_path if best_path.is_file() else None,
        last_checkpoint=run.out / "last.safetensors",
        history=df,
        best_val_dice=None if dice is None or np.isnan(dice) else float(dice),
        steps=run.step,
        images_per_s=images_per_s,
        out_dir=run.out,
        train_images=len(run.data.train_stems),
        val_images=len(run.data.val_stems),
        pixel_size_um=run.data.pixel_size_um,
        image_pixel_sizes=dict(run.data.image_pixel_sizes),
    )
