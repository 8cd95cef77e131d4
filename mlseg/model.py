"""Build models through segmentation-models-pytorch; save and load checkpoints without pickle.

A checkpoint folder holds::

    best.safetensors     weights of the best validation epoch
    last.safetensors     weights at the end of the latest epoch (resume point)
    last.state.pt        optimiser, scheduler, step and sampler state (tensors and numbers
                         only; read with ``torch.load(weights_only=True)``)
    config.json          the whole run :class:`~mlseg.config.Config`, paths as given
    meta.json            target, classes, input channels, pixel size, median nucleus
                         diameter of the training masks (px), data fingerprint, the
                         training profile's settings, and per checkpoint its step and metrics
    stain_reference.png  the pixels of ``preprocess.stain_reference``, where the run has one:
                         :func:`load_model` normalises to it, so the folder (or a registry
                         version of it) predicts alike wherever it is moved

Model output convention: logits ``(N, classes, H, W)``; ``binary`` -> 1 channel (sigmoid
= foreground probability); ``three_class`` -> 3 channels (softmax: 0 background,
1 nucleus interior, 2 boundary).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlseg.config import Config, Profile, TrainConfig, parse
from mlseg.errors import ConfigError, ModelError, some_of, warn_once
from mlseg.io import atomic_path, read_image_for, write_image
from mlseg.scale import STATISTIC

CHECKPOINT_NAMES = ("best", "last")
#: meta.json's key naming the run's copy of its stain reference image (see the module docstring)
REFERENCE_KEY = "stain_reference_file"
#: the name of that copy in runs saved since it holds the reference's pixels only
REFERENCE_COPY = "stain_reference.png"
_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def resolve_device(name: str = "auto", saved_in: Path | None = None) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; other names as torch spells them.
    ``saved_in``: the model's config.json where ``name`` is its own ``inference.device``,
    which an error names: a model trained and saved with ``cuda`` is moved to machines
    without one, where nobody asked for that device."""
    try:
        return _device(name)
    except ConfigError as err:
        if saved_in is None:
            raise
        raise ConfigError(
            f"{saved_in}: the model's inference.device, {name!r}, cannot run here "
            f"({str(err).split(';')[0]}); give the device to run on: --device auto (a GPU "
            "where there is one, else the CPU), or a flow's inference parameter "
            '{"device": "auto"}'
        ) from None


def resolve_model_device(name: str, config: Config, folder: Path) -> torch.device:
    """:func:`resolve_device` of ``name`` for the model saved in ``folder`` with ``config``:
    where ``name`` is the model's own ``inference.device``, not the caller's, an error names
    its config.json and the fix."""
    own = name == config.inference.device
    return resolve_device(name, folder / "config.json" if own else None)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available here; use cpu")
    # a GPU beyond the count failed at the first upload with torch's "invalid device ordinal"
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.type == "cuda" and device.index >= count:
        gpus = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ConfigError(
            f"device {name!r} asked for but this machine shows {count} GPU{'s' * (count > 1)} "
            f"(CUDA_VISIBLE_DEVICES counts too); use {gpus}, or auto"
        )
    # torch names more device types than this build or machine may have: a name it knows
    # but cannot use (mps off a Mac, xpu, meta) failed mid-run with a traceback
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for but MPS is not available here; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def cpu_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AMX tiles or AVX512-BF16).

    There bf16 autocast trains and predicts 2-4 times faster than float32; elsewhere it is
    emulated and slower (bench/README.md, "CPU figures, twenty-third session").
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cuda_bf16(device: torch.device) -> bool:
    """Whether this GPU does bf16 arithmetic in hardware: compute capability 8.0 (Ampere) or
    later, or ROCm. Before (T4, V100) torch emulates it, slower than float32, and cuDNN has
    no bf16 convolutions; ``torch.cuda.is_bf16_supported()`` says True there by default."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where autocast pays (``amp`` on, and a GPU or a CPU with bf16 in hardware), else
    ``None``: float32, with a warning on a GPU without it."""
    if not amp:
        return None
    if device.type != "cuda":
        return torch.bfloat16 if cpu_bf16() else None
    if cuda_bf16(device):
        return torch.bfloat16
    major, minor = torch.cuda.get_device_capability(device)
    warn_once(
        f"{device} has no bf16 arithmetic (compute capability {major}.{minor}, before 8.0): "
        "the network runs in float32, as with amp: false"
    )
    return None


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_names(cfg: TrainConfig) -> None:
    """Raise :class:`ModelError` where ``cfg.arch`` or ``cfg.encoder`` names nothing smp (or,
    for ``tu-<name>``, timm's registry) can build; nothing is built or downloaded. A timm
    name with a source (``tu-local-dir:/folder``, ``tu-hf-hub:org/model``) is not checked."""
    import segmentation_models_pytorch as smp

    archs = smp.MODEL_ARCHITECTURES_MAPPING
    if cfg.arch.lower() not in archs:
        raise ModelError(
            f"train.arch: unknown architecture {cfg.arch!r}; choose one of "
            + ", ".join(a.__name__ for a in archs.values())
        )
    if cfg.encoder.startswith("tu-"):
        import timm

        # timm's own error came mid-run as a RuntimeError traceback: 'Unknown model (...)'.
        # A name with a source (local-dir:/folder, hf-hub:org/model) is timm's to resolve
        name = cfg.encoder.removeprefix("tu-")
        if ":" not in name and not timm.is_model(name):
            hint = _did_you_mean(name, timm.list_models())
            raise ModelError(
                f"train.encoder: timm has no model {name!r}{hint}; "
                "see timm.list_models() for the names 'tu-<name>' takes"
            )
    elif cfg.encoder not in (names := smp.encoders.get_encoder_names()):
        raise ModelError(
            f"train.encoder: unknown encoder {cfg.encoder!r}{_did_you_mean(cfg.encoder, names)}; "
            "see segmentation_models_pytorch.encoders.get_encoder_names() (e.g. resnet34, "
            "efficientnet-b0) or a timm name as 'tu-<name>'"
        )


def build_model(cfg: TrainConfig, in_channels: int, classes: int) -> nn.Module:
    """``smp.create_model(cfg.arch, cfg.encoder, ...)`` with ``cfg.encoder_depth``.

    U-Net-like decoders get the last ``encoder_depth`` of smp's default decoder channels.
    Unknown names and encoder weights that cannot be fetched raise :class:`ModelError`.
    """
    import segmentation_models_pytorch as smp

    check_names(cfg)
    model_class = smp.MODEL_ARCHITECTURES_MAPPING[cfg.arch.lower()]
    params = inspect.signature(model_class).parameters
    kwargs: dict[str, Any] = {}
    if "encoder_depth" in params:
        kwargs["encoder_depth"] = cfg.encoder_depth
        default = params.get("decoder_channels")
        if default is not None and isinstance(default.default, (tuple, list)):
            kwargs["decoder_channels"] = _DECODER_CHANNELS[5 - cfg.encoder_depth :]
        # FPN's and PSPNet's decoders end at a stride set by the encoder depth and upsample
        # by a factor made for their default depth: scale it with the depth
        if model_class.__name__ in ("FPN", "PSPNet"):
            depth, factor = params["encoder_depth"].default, params["upsampling"].default
            kwargs["upsampling"] = max(1, int(factor * 2.0 ** (cfg.encoder_depth - depth)))
    try:
        model = smp.create_model(
            cfg.arch,
            encoder_name=cfg.encoder,
            encoder_weights=cfg.encoder_weights,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
    except KeyError as err:  # smp: weights name not offered for this encoder
        raise ModelError(f"train.encoder_weights: {err.args[0] if err.args else err}") from None
    except (ValueError, TypeError, AssertionError) as err:
        raise ModelError(f"train: smp cannot build {cfg.arch}/{cfg.encoder}: {err}") from None
    except Exception as err:  # network errors of the weights download come in many types
        if cfg.encoder_weights is None:
            raise
        raise ModelError(
            f"train.encoder_weights={cfg.encoder_weights!r}: could not fetch pretrained "
            f"weights for {cfg.encoder} ({type(err).__name__}); this machine may be offline. "
            "Set train.encoder_weights: null, or pre-download the weights into the "
            "Hugging Face cache (HF_HOME) on a connected machine"
        ) from None
    _check_output_size(model, cfg, in_channels)
    return model


def _check_output_size(model: nn.Module, cfg: TrainConfig, in_channels: int) -> None:
    """Refuse a model whose output is not its input's size (a decoder that upsamples by a
    factor made for another encoder depth): the loss would fail at the first step, or, in
    inference, the labels would not cover the image."""
    side = 128  # a multiple of every depth's stride, and enough for PAN's pyramid pooling
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, side, side))
    except Exception as err:  # an architecture that cannot run at this depth
        raise ModelError(
            f"train: {cfg.arch} with encoder_depth={cfg.encoder_depth} cannot run ({err}); "
            f"choose another depth or architecture"
        ) from None
    finally:
        model.train(was_training)
    if tuple(out.shape[-2:]) != (side, side):
        raise ModelError(
            f"train: {cfg.arch} with encoder_depth={cfg.encoder_depth} gives a "
            f"{out.shape[-1]}x{out.shape[-2]} output for a {side}x{side} input; choose an "
            f"encoder_depth its decoder supports (its default) or another architecture"
        )


def min_input_side(model: nn.Module, in_channels: int) -> int:
    """The smallest side, a multiple of 32 up to 128, of a square input ``model`` maps to an
    output of its size: 32 for most decoders, 128 for PAN (its pyramid pooling at stride 32;
    64 at encoder_depth 3). Inference pads smaller tiles up to it (:func:`mlseg.infer.tile_grid`).
    One forward pass of zeros per side tried, in eval mode, on the model's device."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        for side in (32, 64, 96):
            try:
                with torch.no_grad():
                    out = model(torch.zeros(1, in_channels, side, side, device=device))
            except (RuntimeError, ValueError):
                continue
            if tuple(out.shape[-2:]) == (side, side):
                return side
    finally:
        model.train(was_training)
    return 128  # _check_output_size ran every model mlseg builds at 128


def check_trainable(model: nn.Module, cfg: TrainConfig, in_channels: int) -> None:
    """Refuse ``train.patch_size`` or ``train.batch_size`` where ``model`` cannot take a
    training step on them: PAN's pyramid pooling needs 128 px patches
    (:func:`min_input_side`), and the BatchNorm after a global pooling (DeepLabV3, PAN,
    UPerNet) or a 1x1 bottleneck needs two patches a batch. Both failed at the first step,
    after the data were loaded, with torch's words. Patches of 128 px or more in batches of
    two or more are not tried; a batch of one is tried on a copy, as a training-mode pass
    moves its statistics."""
    side = cfg.patch_size
    named = f"{cfg.arch}/{cfg.encoder} with encoder_depth={cfg.encoder_depth}"
    if side < 128 and side < (smallest := min_input_side(model, in_channels)):
        raise ModelError(
            f"train.patch_size={side}: {named} cannot train on patches of {side}x{side} px "
            f"(it takes {smallest} px or more); set a larger train.patch_size (128 runs every "
            "architecture)"
        )
    if cfg.batch_size > 1:
        return
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(torch.zeros(1, in_channels, side, side))
    except (RuntimeError, ValueError) as err:
        raise ModelError(
            f"train.batch_size=1: {named} cannot train on 1 patch of {side}x{side} px "
            f"({str(err).splitlines()[0]}); set train.batch_size: 2 or more"
        ) from None


# ----------------------------------------------------------------------------- saving
def _clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, without torch.compile's ``_orig_mod.`` prefix."""
    model = getattr(model, "_orig_mod", model)
    return {
        k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
    }


def _unreadable(path: Path) -> ModelError:
    """The error for a checkpoint file one may not read (a colleague's run, saved under
    umask 077): it said 'the checkpoint is damaged', and the weights 'No such file or
    directory' (safetensors' word for any file it cannot open), of a file ``ls`` shows."""
    return ModelError(f"{path}: cannot be read (permission denied); make it readable (chmod a+r)")


def read_checkpoint_json(path: Path) -> dict[str, Any]:
    """The JSON object of a checkpoint folder's ``config.json`` or ``meta.json``;
    :class:`ModelError` naming the file where it is damaged (not JSON, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise _unreadable(path) from None
    # ValueError: not JSON, or not UTF-8; RecursionError: nested too deep to be one of ours
    except (OSError, ValueError, RecursionError) as err:
        raise ModelError(
            f"{path}: cannot be read as JSON ({err}); the checkpoint is damaged"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(
            f"{path}: holds a JSON {type(data).__name__}, not an object; the checkpoint is damaged"
        )
    return data


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    config: Config,
    *,
    target: str,
    classes: int,
    in_channels: int,
    fingerprint_hash: str | None,
    metrics: dict[str, float],
    pixel_size_um: float | None,
    name: str = "last",
    step: int = 0,
    stain: str | None = None,
    nucleus_diameter_px: float | None = None,
    train_state: dict[str, Any] | None = None,
    trained_on: list[dict[str, Any]] | None = None,
    image_pixel_sizes: dict[str, float | None] | None = None,
    profile: Profile | None = None,
    split: dict[str, list[str]] | None = None,
    image_hashes: dict[str, list[str]] | None = None,
) -> Path:
    """Write ``<name>.safetensors``, ``config.json`` and ``meta.json`` (updating ``name``'s
    entry); with ``train_state`` (optimiser/scheduler/step, tensors and numbers only) also
    ``<name>.state.pt``. ``trained_on`` lists the machines the run trained on, each with the
    step it started from (:func:`mlseg.train.machine`); ``image_pixel_sizes`` each training
    image's microns per pixel (``None``: unknown); ``profile`` the training profile, kept in
    meta.json whole; ``split`` the stems of the images trained on (``train``) and held back
    (``validation``), and ``image_hashes`` their pixels' hashes by the same roles
    (:func:`mlseg.inventory.turn_free_hash`). ``config.preprocess.stain_reference``, where
    it names a file the preprocessing reads (stain normalisation, ``equalize: match``), is
    copied in as ``stain_reference.png`` (its pixels, not the file's metadata): a path given
    relative to where training ran, or to a file edited later, would not travel with the
    weights. The files are written under temporary names, then renamed together. Returns the
    weights' path.
    """
    from safetensors.torch import save

    if name not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint name must be one of {CHECKPOINT_NAMES}, got {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    meta_path = directory / "meta.json"
    meta = read_checkpoint_json(meta_path) if meta_path.is_file() else {}
    import mlseg

    meta.update(
        {
            "mlseg_version": mlseg.__version__,
            "arch": config.train.arch,
            "encoder": config.train.encoder,
            "target": target,
            "classes": int(classes),
            "in_channels": int(in_channels),
            "pixel_size_um": pixel_size_um,
            "profile": config.profile,
            "stain": stain,
            "fingerprint_hash": fingerprint_hash,
            # nucleus diameter of the training masks at training scale (mlseg.scale)
            "nucleus_diameter_px": nucleus_diameter_px,
            "nucleus_diameter_stat": STATISTIC,
        }
    )
    if trained_on is not None:
        meta["trained_on"] = trained_on
    if image_pixel_sizes is not None:
        meta["image_pixel_sizes"] = image_pixel_sizes
    if profile is not None:
        meta["profile_settings"] = profile.model_dump(mode="json")
    if split is not None:
        meta["split"] = split
    if image_hashes is not None:
        meta["image_hashes"] = image_hashes
    from mlseg.data import effective_preprocess

    pre = effective_preprocess(config, profile) if profile is not None else config.preprocess
    reference = config.preprocess.stain_reference
    # absent or unused: a missing reference that normalisation needs failed training already;
    # one no step reads was copied all the same, so a config naming /proc/self/environ (or a
    # key file) beside stain_norm: none put the worker's keys in the checkpoint and registry
    used = pre.stain_norm != "none" or pre.equalize == "match"
    reference = Path(reference) if used and reference and Path(reference).is_file() else None
    meta.pop(REFERENCE_KEY, None)
    if reference is not None:
        # its pixels alone, as PNG: a byte copy carried the file's own metadata (a slide's
        # TIFF description, a camera's EXIF: patient, user, scanner) into every shared model;
        # read as training read it, as segment normalises to the copy
        pixels = read_image_for(reference, stain or (profile.stain if profile else None))
        meta[REFERENCE_KEY] = REFERENCE_COPY
    meta.setdefault("checkpoints", {})[name] = {
        "file": weights.name,
        "step": int(step),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Every file is written under a temporary name first and all are renamed together at
    # the end: a disk that fills on the optimiser state (twice the weights) leaves the last
    # pair as it was, not new weights beside the old step, which a resume would train on.
    # Written by Python, so a full disk says so (OSError) rather than in the writer's words.
    with contextlib.ExitStack() as files:
        tmp = files.enter_context(atomic_path(weights))
        tmp.write_bytes(save(_clean_state_dict(model), metadata={"format": "pt"}))
        if train_state is not None:
            tmp = files.enter_context(atomic_path(directory / f"{name}.state.pt"))
            with tmp.open("wb") as fh:
                torch.save(train_state, fh)
        if reference is not None:
            tmp = files.enter_context(atomic_path(directory / REFERENCE_COPY))
            write_image(tmp, pixels)  # tmp ends in .png: the format
        tmp = files.enter_context(atomic_path(directory / "config.json"))
        tmp.write_bytes(config.model_dump_json(indent=2).encode("utf-8"))
        tmp = files.enter_context(atomic_path(meta_path))
        tmp.write_bytes(json.dumps(meta, indent=2).encode("utf-8"))
    return weights


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model ready for inference and what it was trained for."""

    model: nn.Module  # eval mode, on the requested device
    config: Config
    target: str  # "binary" | "three_class"
    classes: int
    in_channels: int
    pixel_size_um: float | None  # microns per pixel of the training images, None if unknown
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the .safetensors file loaded
    min_side: int = 32  # smallest tile side the model takes (:func:`min_input_side`)

    @property
    def profile(self) -> Profile | None:
        """The profile the model was trained with, as saved with it; ``None`` for a run
        saved before profiles were kept (read its ``config.profile`` again instead)."""
        saved = self.meta.get("profile_settings")
        meta = self.path.parent / "meta.json" if self.path is not None else "meta.json"
        return None if saved is None else parse(Profile, saved, f"{meta} (profile_settings)")


def checkpoint_path(path: str | Path) -> Path:
    """A ``.safetensors`` file, or the best (else last) one of a checkpoint folder."""
    path = Path(path)
    if not path.exists():  # a mistyped run folder: say so, not what the path should have been
        raise ModelError(
            f"{path}: not found; give the training run's folder (with best.safetensors) or a "
            ".safetensors file"
        )
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / f"{name}.safetensors").is_file():
                return path / f"{name}.safetensors"
        raise ModelError(f"{path}: no best.safetensors or last.safetensors; train a model first")
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: expected a checkpoint folder or a .safetensors file")
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file not found")
    return path


def _own_files(config: Config, meta: dict[str, Any], folder: Path) -> Config:
    """``config`` with its stain reference the folder's own copy, where the run saved one."""
    name = meta.get(REFERENCE_KEY)
    if not name:  # saved before runs kept a copy: the path as given
        return config
    own = config.preprocess.model_copy(update={"stain_reference": (folder / name).absolute()})
    return config.model_copy(update={"preprocess": own})


def _as_trained(config: dict[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a config.json as read) with the value an older mlseg trained with where
    it saved none: a Macenko run on IHC (meta.json's ``stain``) saved before
    ``preprocess.ihc_dab`` existed put DAB in eosin's place alone, not today's default."""
    pre = config.get("preprocess")
    if (
        isinstance(pre, dict)
        and "ihc_dab" not in pre
        and pre.get("stain_norm") == "macenko"
        and meta.get("stain") == "ihc"
    ):
        return {**config, "preprocess": {**pre, "ihc_dab": "eosin"}}
    return config


def saved_config(folder: str | Path) -> Config:
    """The run :class:`~mlseg.config.Config` of a checkpoint folder as :func:`load_model`
    sees it (no weights read): ``preprocess.stain_reference`` is the folder's own copy where
    it holds one, wherever the folder now is; a setting an older mlseg did not save takes
    the value it trained with (:func:`_as_trained`)."""
    folder = Path(folder)
    meta = saved_meta(folder)
    raw = _as_trained(read_checkpoint_json(folder / "config.json"), meta)
    return _own_files(parse(Config, raw, str(folder / "config.json")), meta, folder)


def saved_meta(folder: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint folder; ``{}`` where it has none."""
    meta_path = Path(folder) / "meta.json"
    return read_checkpoint_json(meta_path) if meta_path.is_file() else {}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint (folder or ``.safetensors``); no pickle is involved.

    The architecture is rebuilt from ``config.json`` (without downloading encoder weights)
    and the weights must fit it exactly, else :class:`ModelError` names the file. The
    config's stain reference is the folder's own copy where it holds one (:func:`saved_config`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = checkpoint_path(path)
    folder = weights.parent
    for needed in ("config.json", "meta.json"):
        if not (folder / needed).is_file():
            raise ModelError(
                f"{folder / needed}: missing beside {weights.name}; not an mlseg checkpoint"
            )
    config = saved_config(folder)
    meta = read_checkpoint_json(folder / "meta.json")
    try:
        target, classes, in_channels = (
            meta["target"],
            int(meta["classes"]),
            int(meta["in_channels"]),
        )
    except KeyError as err:
        raise ModelError(f"{folder / 'meta.json'}: lacks {err}; not an mlseg checkpoint") from None
    except (TypeError, ValueError):
        raise ModelError(
            f"{folder / 'meta.json'}: classes {meta['classes']!r} and in_channels "
            f"{meta['in_channels']!r} must be whole numbers; the checkpoint was damaged or "
            "edited by hand"
        ) from None
    if not 1 <= in_channels <= 4:  # a profile's channels: 1 to 4
        # a model file from elsewhere with in_channels 100000000 had 1.2 TB allocated for its
        # first layer, -3 ended in a torch RuntimeError, 0 blamed the encoder depth
        raise ModelError(
            f"{folder / 'meta.json'}: in_channels {in_channels} is not a model mlseg trains "
            "(1 to 4 channels); the checkpoint was damaged or edited by hand"
        )
    from mlseg.targets import TARGETS, num_classes

    if target not in TARGETS or num_classes(target) != classes:
        raise ModelError(
            f"{folder / 'meta.json'}: target {target!r} with {classes} classes is not a "
            f"model mlseg trains ({', '.join(f'{t}: {num_classes(t)}' for t in TARGETS)})"
        )
    train_cfg = config.train.model_copy(update={"encoder_weights": None})
    model = build_model(train_cfg, in_channels, classes)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        try:
            weights.open("rb").close()
        except PermissionError:
            raise _unreadable(weights) from None
        raise ModelError(f"{weights}: not a readable safetensors file ({err})") from None
    broken = nonfinite_tensors(state)
    if broken:  # such a model finds no nucleus anywhere, and says nothing
        raise ModelError(
            f"{weights}: {len(broken)} of its {len(state)} tensors hold NaN or infinite values "
            f"({some_of(broken)}), as a diverged training leaves them; train it again with a "
            "lower train.lr, or use another checkpoint"
        )
    # a torch.compile'd model's own state_dict, saved by hand, names each key under its
    # _orig_mod: the same weights, which save_checkpoint writes without it
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ModelError(
            f"{weights}: weights do not fit {config.train.arch}/{config.train.encoder} with "
            f"{in_channels} input channel(s) and {classes} class(es) ({_misfit(model, state)}); "
            "the file comes from another architecture or was edited"
        ) from None
    min_side = min_input_side(model, in_channels)  # on the CPU, before the move
    model.to(resolve_device(str(device)) if isinstance(device, str) else device).eval()
    return LoadedModel(
        model=model,
        config=config,
        target=target,
        classes=classes,
        in_channels=in_channels,
        pixel_size_um=meta.get("pixel_size_um"),
        meta=meta,
        path=weights,
        min_side=min_side,
    )


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold NaN or an infinity,
    read off their extremes (NaN is both): ``isfinite().all()``, a pass and a mask more,
    took 8x as long (4.7 s for a resnet34 U-Net's 24 M weights on a busy CPU, which loads
    them in 0.03 s)."""
    return [
        k
        for k, t in state.items()
        if t.is_floating_point()
        and t.numel()
        and not torch.stack(torch.aminmax(t)).isfinite().all()
    ]


def _misfit(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """How ``state`` (as the model's ``load_state_dict`` left it: smp renames old keys in
    place) misses ``model``, a few names of each kind: torch's message lists every key
    (a resnet18 file under a resnet34 config: 2,900 characters of them)."""
    own = model.state_dict()
    kinds = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "of another shape": [
            f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],
    }
    return "; ".join(
        f"{len(keys)} key(s) {kind}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for kind, keys in kinds.items()
        if keys
    )


def load_train_state(folder: str | Path, name: str = "last") -> dict[str, Any] | None:
    """The optimiser/scheduler/step state saved beside ``name``, or None if absent."""
    path = Path(folder) / f"{name}.state.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        raise ModelError(
            f"{path}: cannot be loaded safely ({err}); delete it to start over"
        ) from None
