"""Training-time augmentation of whole batches, in torch, on the training device.

Geometry and photometry are applied to a batch of patches at once, so augmentation runs on
the GPU when training does (no worker processes to keep busy) and on the CPU otherwise, by
the same code. Randomness is drawn up front from a seeded CPU ``torch.Generator`` by
:func:`draw_params` (small per-sample values, copied to the device without waiting for it);
everything after it is a pure function of the parameters, which keeps it reproducible and
``torch.compile``-friendly. Photometric steps run only on the samples drawn for them.

- Geometry (:func:`source_coords`): each output pixel maps to a source position through
  ``centre + A @ (offset + elastic(offset))`` with ``A = scale * rotation * flip``
  (rotations by multiples of 90 degrees, optional free rotation) and an optional smooth
  random displacement field (elastic / grid distortion). The patch sampler in
  :mod:`mlseg.data` reads images bilinearly and targets by nearest neighbour at those
  positions, so image and target stay aligned.
- Photometry (:func:`photometric`): nucleus fade (haematoxylin inside the nuclei of the
  target's class map scaled by a smooth random field, so pale nuclei appear beside dark
  ones; H&E/IHC RGB only), haematoxylin gain (the whole patch's haematoxylin scaled, so
  paler and darker staining labs are seen), HED stain jitter (Tellez et al. 2018), brightness
  (multiplicative), contrast, gamma (on the patch rescaled to [0, 1]), Gaussian blur,
  sharpening (unsharp mask: scanners differ in sharpness both ways) and Gaussian noise,
  each applied to a random subset of the batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mlseg.config import AugmentConfig

if TYPE_CHECKING:
    import numpy as np

# Ruifrok & Johnston optical-density vectors (rows H, E, DAB), as skimage's rgb_from_hed.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_ELASTIC_GRID = 5  # control points per side of the random displacement field
_FADE_GRID = 3  # control points per side of the nucleus fade field


@dataclass
class Group:
    """Per-sample values of one photometric step for the samples it applies to.

    ``index`` ``(k,)`` int64 selects the samples (``None``: every sample, with identity
    values for those not drawn - the fixed-shape form ``torch.compile`` prefers).
    """

    index: torch.Tensor | None
    values: dict[str, torch.Tensor]


@dataclass
class AugParams:
    """Random parameters of one batch (``B`` patches); ``None`` = step not applied."""

    matrix: torch.Tensor  # (B, 2, 2) output offset (x, y) -> source offset, pixels
    elastic: torch.Tensor | None  # (B, 2, G, G) coarse displacement in pixels (x, y)
    fade: Group | None  # field: (k, 1, G, G) haematoxylin factor inside nuclei, in (0, 1]
    gain: Group | None  # scale, shift: (k, 3) haematoxylin gain as an H, E, DAB jitter
    hed: Group | None  # scale, shift: (k, 3) jitter of H, E, DAB optical density
    color: Group | None  # brightness, contrast, gamma: (k, 1, 1, 1) factors / exponent
    blur: Group | None  # sigma: (k,) pixels
    noise: Group | None  # noise: (k, C, P, P), already scaled
    sharpen: Group | None = None  # sigma: (k,) pixels, amount: (k, 1, 1, 1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor -> ``device`` without waiting for the GPU (pinned, non-blocking copy)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _uniform(shape, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _group(
    chosen: torch.Tensor,
    values: dict[str, torch.Tensor],
    identity: dict[str, float],
    subset: bool,
    device,
) -> Group | None:
    """Keep the chosen samples' values (subset) or all, identity where not chosen."""
    if not bool(chosen.any()):
        return None
    if subset:
        idx = torch.nonzero(chosen).flatten()
        return Group(
            to_device(idx, device), {k: to_device(v[idx], device) for k, v in values.items()}
        )
    out = {}
    for k, v in values.items():
        mask = chosen.view(-1, *([1] * (v.dim() - 1)))
        out[k] = to_device(torch.where(mask, v, torch.full_like(v, identity[k])), device)
    return Group(None, out)


def draw_params(
    batch: int,
    patch: int,
    channels: int,
    cfg: AugmentConfig,
    gen: torch.Generator,
    device: torch.device | str,
    *,
    stain_jitter: bool = True,
    subset: bool = True,
) -> AugParams:
    """Draw every random parameter of a batch from the CPU generator ``gen``.

    Small per-sample values are drawn on the CPU and moved to ``device``; the noise field
    is drawn on ``device`` from a generator seeded by ``gen``, so ``gen`` alone makes a run
    reproducible. ``subset``: photometric steps keep only the samples they apply to
    (cheapest); else every sample with identity values (fixed shapes, for compiling).
    ``stain_jitter``: whether HED jitter may apply (RGB H&E/IHC images in [0, 1]).
    With ``cfg.enabled`` false the result is the identity.
    """
    device = torch.device(device)
    on = cfg.enabled

    def chosen(p: float) -> torch.Tensor:
        return torch.rand(batch, generator=gen) < p

    angle = torch.zeros(batch)
    if on and cfg.rot90:
        angle = torch.randint(0, 4, (batch,), generator=gen).float() * (math.pi / 2)
    if on and cfg.rotate_p > 0:
        free = _uniform(batch, 0.0, 2 * math.pi, gen)
        angle = torch.where(chosen(cfg.rotate_p), angle + free, angle)
    flip = torch.ones(batch)
    if on and cfg.flips:
        flip = torch.where(chosen(0.5), -1.0, 1.0)
    scale = torch.ones(batch)
    if on and cfg.scale_p > 0:
        lo, hi = (math.log(v) for v in cfg.scale_range)
        scale = torch.where(chosen(cfg.scale_p), torch.exp(_uniform(batch, lo, hi, gen)), scale)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # exact zeros/ones for multiples of 90 degrees keep un-scaled crops pixel-exact
    cos = torch.where(cos.abs() < 1e-6, 0.0, cos)
    sin = torch.where(sin.abs() < 1e-6, 0.0, sin)
    matrix = (
        torch.stack([torch.stack([cos * flip, -sin], -1), torch.stack([sin * flip, cos], -1)], -2)
        * scale[:, None, None]
    )

    elastic = None
    if on and cfg.elastic_p > 0 and cfg.elastic_px > 0:
        sel = chosen(cfg.elastic_p)
        field = (
            torch.randn((batch, 2, _ELASTIC_GRID, _ELASTIC_GRID), generator=gen) * cfg.elastic_px
        )
        if bool(sel.any()):
            elastic = to_device(field * sel[:, None, None, None], device)

    fade = None
    if on and stain_jitter and channels == 3 and cfg.nucleus_fade_p > 0:
        # log-uniform factor at each control point: pale and dark nuclei in one patch
        low = math.log(cfg.nucleus_fade_min)
        values = {"field": torch.exp(_uniform((batch, 1, _FADE_GRID, _FADE_GRID), low, 0.0, gen))}
        fade = _group(chosen(cfg.nucleus_fade_p), values, {"field": 1.0}, subset, device)
    gain = None
    if on and stain_jitter and channels == 3 and cfg.haematoxylin_gain_p > 0:
        lo, hi = (math.log(v) for v in cfg.haematoxylin_gain)
        factor = torch.exp(_uniform((batch, 1), lo, hi, gen))
        values = {
            "scale": torch.cat([factor, torch.ones(batch, 2)], dim=1),
            "shift": torch.zeros(batch, 3),
        }
        identity = {"scale": 1.0, "shift": 0.0}
        gain = _group(chosen(cfg.haematoxylin_gain_p), values, identity, subset, device)
    hed = None
    if on and stain_jitter and channels == 3 and cfg.hed_p > 0 and cfg.hed_jitter > 0:
        sigma = cfg.hed_jitter
        values = {
            "scale": 1 + _uniform((batch, 3), -sigma, sigma, gen),
            "shift": _uniform((batch, 3), -sigma, sigma, gen),
        }
        hed = _group(chosen(cfg.hed_p), values, {"scale": 1.0, "shift": 0.0}, subset, device)
    color = None
    if on and cfg.color_p > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or cfg.gamma > 0):
        values = {
            "brightness": 1 + _uniform((batch, 1, 1, 1), -cfg.brightness, cfg.brightness, gen),
            "contrast": 1 + _uniform((batch, 1, 1, 1), -cfg.contrast, cfg.contrast, gen),
            "gamma": torch.exp(_uniform((batch, 1, 1, 1), -cfg.gamma, cfg.gamma, gen)),
        }
        identity = {"brightness": 1.0, "contrast": 1.0, "gamma": 1.0}
        color = _group(chosen(cfg.color_p), values, identity, subset, device)
    blur = None
    if on and cfg.blur_p > 0:
        values = {"sigma": _uniform(batch, *cfg.blur_sigma, gen)}
        blur = _group(chosen(cfg.blur_p), values, {"sigma": 0.0}, subset, device)
    sharpen = None
    if on and cfg.sharpen_p > 0:  # drawn only when used: other configs keep their stream
        values = {
            "sigma": _uniform(batch, *cfg.blur_sigma, gen),
            "amount": _uniform((batch, 1, 1, 1), *cfg.sharpen_amount, gen),
        }
        identity = {"sigma": 0.0, "amount": 0.0}
        sharpen = _group(chosen(cfg.sharpen_p), values, identity, subset, device)
    noise = None
    if on and cfg.noise_p > 0 and cfg.noise_std > 0:
        std = _uniform(batch, 0.0, cfg.noise_std, gen)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        noise = _group(chosen(cfg.noise_p), {"std": std}, {"std": 0.0}, subset, device)
        if noise is not None:
            k = batch if noise.index is None else len(noise.index)
            device_gen = torch.Generator(device=device).manual_seed(seed)
            field = torch.randn((k, channels, patch, patch), generator=device_gen, device=device)
            noise.values = {"noise": field * noise.values["std"][:, None, None, None]}
    matrix = to_device(matrix, device)
    return AugParams(matrix, elastic, fade, gain, hed, color, blur, noise, sharpen)


def source_coords(
    params: AugParams, centres: torch.Tensor, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source positions of every output pixel: ``(x, y)``, each ``(B, P, P)`` float32.

    ``centres`` is ``(B, 2)`` (x, y) in source pixels; without augmentation output pixel
    ``(i, j)`` reads source ``(centre_x - (P-1)/2 + j, centre_y - (P-1)/2 + i)``.
    """
    device = centres.device
    r = torch.arange(patch, device=device, dtype=torch.float32) - (patch - 1) / 2
    ox = r[None, None, :].expand(1, patch, patch)
    oy = r[None, :, None].expand(1, patch, patch)
    if params.elastic is not None:
        disp = F.interpolate(
            params.elastic, size=(patch, patch), mode="bicubic", align_corners=True
        )
        ox = ox + disp[:, 0]
        oy = oy + disp[:, 1]
    m = params.matrix
    sx = centres[:, 0, None, None] + m[:, 0, 0, None, None] * ox + m[:, 0, 1, None, None] * oy
    sy = centres[:, 1, None, None] + m[:, 1, 0, None, None] * ox + m[:, 1, 1, None, None] * oy
    return sx, sy


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable per-sample Gaussian blur, reflect padding; sigma 0 leaves a sample as is.

    The kernel reaches 3 sigma, at most to the patch's far edge: reflect padding cannot
    reach further, and a 32 px patch with ``blur_sigma`` up to 11 stopped training with
    torch's "Padding size should be less than the corresponding input dimension"."""
    b, c, h, w = x.shape
    radius = min(max(1, math.ceil(3 * max_sigma)), max(1, min(h, w) - 1))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma -> 0 gives a delta
    k = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(
        F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c
    )
    return y.reshape(b, c, h, w)


def _sharpen(x: torch.Tensor, v: dict[str, torch.Tensor], max_sigma: float) -> torch.Tensor:
    """Unsharp mask: ``x + amount * (x - blur(x))``, kept within the patch's own range
    (amount 0 leaves a sample as is)."""
    detail = x - _gaussian_blur(x, v["sigma"], max_sigma)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.minimum(torch.maximum(x + v["amount"] * detail, lo), hi)


def _apply(x: torch.Tensor, group: Group | None, fn) -> torch.Tensor:
    """``fn(samples, values)`` on the group's samples of ``x``, the others unchanged."""
    if group is None:
        return x
    if group.index is None:
        return fn(x, group.values)
    return x.index_copy(0, group.index, fn(x.index_select(0, group.index), group.values))


# Colour deconvolution and back as 1x1 convolutions (row-vector convention: od = hed @ M).
@functools.lru_cache(maxsize=8)
def _hed_weights(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1x1-convolution weights RGB OD -> HED and back, copied to ``device`` once."""
    to_hed = HED_FROM_RGB.T.to(device, torch.float32)[:, :, None, None]
    to_rgb = RGB_FROM_HED.T.to(device, torch.float32)[:, :, None, None]
    return to_hed, to_rgb


def _to_hed(x: torch.Tensor) -> torch.Tensor:
    """``(k, 3, P, P)`` RGB in [0, 1] -> H, E, DAB optical densities."""
    return F.conv2d(-torch.log(x.clamp(1.0 / 255.0, 1.0)), _hed_weights(x.device)[0])


def _from_hed(hed: torch.Tensor) -> torch.Tensor:
    """H, E, DAB optical densities -> RGB in [0, 1]."""
    return torch.exp(-F.conv2d(hed, _hed_weights(hed.device)[1])).clamp(0.0, 1.0)


def _hed(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    hed = _to_hed(x) * v["scale"][:, :, None, None] + v["shift"][:, :, None, None]
    return _from_hed(hed)


def _fade(x: torch.Tensor, v: dict[str, torch.Tensor], nuclei: torch.Tensor) -> torch.Tensor:
    """Haematoxylin optical density times a smooth random field inside nuclei (``nuclei``
    ``(k, 1, P, P)`` float, 1 inside), so some nuclei of a patch turn pale: the open,
    vesicular chromatin (pale centre, darker rim) that a model trained on dark nuclei
    misses or finds only as a ring."""
    field = F.interpolate(v["field"], size=x.shape[-2:], mode="bilinear", align_corners=True)
    soft = F.avg_pool2d(nuclei, 3, stride=1, padding=1, count_include_pad=False)
    factor = 1.0 - soft * (1.0 - field)
    hed = _to_hed(x)
    return _from_hed(torch.cat([hed[:, :1] * factor, hed[:, 1:]], dim=1))


def _color(x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    x = x * v["brightness"]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * v["contrast"] + mean
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - lo + 1e-6
    return ((x - lo) / span).clamp(0.0, 1.0) ** v["gamma"] * span + lo


def photometric(
    x: torch.Tensor,
    params: AugParams,
    cfg: AugmentConfig,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the photometric part of ``params`` to ``(B, C, P, P)`` float32 patches:
    nucleus fade (needs the ``(B, P, P)`` class maps ``classes``), haematoxylin gain, HED jitter,
    brightness/contrast/gamma, blur, sharpening, noise (each on its drawn samples)."""
    if params.fade is not None and classes is not None:
        # class 1: the foreground (binary) or the interior (three-class: the rim stays dark)
        nuclei = (classes == 1).to(x.dtype)[:, None]
        if params.fade.index is not None:
            nuclei = nuclei.index_select(0, params.fade.index)
        x = _apply(x, params.fade, lambda s, v: _fade(s, v, nuclei))
    x = _apply(x, params.gain, _hed)
    x = _apply(x, params.hed, _hed)
    x = _apply(x, params.color, _color)
    x = _apply(x, params.blur, lambda s, v: _gaussian_blur(s, v["sigma"], cfg.blur_sigma[1]))
    x = _apply(x, params.sharpen, lambda s, v: _sharpen(s, v, cfg.blur_sigma[1]))
    return _apply(x, params.noise, lambda s, v: s + v["noise"])


# ----------------------------------------------------------------------------- sampling
def reflect_coords(v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mirror positions into ``[0, size - 1]`` (edge pixel not repeated, as OpenCV's
    BORDER_REFLECT_101); ``size`` broadcasts against ``v``."""
    last = (size - 1).to(v.dtype)
    period = (2 * last).clamp(min=1.0)
    v = torch.remainder(v, period)
    v = torch.where(v > last, period - v, v)
    return torch.minimum(v, last)


def gather_bilinear(
    pixels: torch.Tensor,
    offset: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
) -> torch.Tensor:
    """Read images packed in one buffer bilinearly at reflected positions.

    ``pixels``: ``(M, C)`` rows of all images, row-major one after another; ``offset``,
    ``height``, ``width``: ``(B, 1, 1)`` int64 of each patch's image; ``sx``, ``sy``:
    ``(B, P, P)`` float32. Returns ``(B, P, P, C)`` float32.
    """
    sx = reflect_coords(sx, width)
    sy = reflect_coords(sy, height)
    x0 = torch.minimum(sx.floor(), (width - 2).clamp(min=0).to(sx.dtype))
    y0 = torch.minimum(sy.floor(), (height - 2).clamp(min=0).to(sy.dtype))
    fx = (sx - x0).unsqueeze(-1)
    fy = (sy - y0).unsqueeze(-1)
    x0, y0 = x0.long(), y0.long()
    dx = (x0 + 1 < width).long()
    dy = (y0 + 1 < height).long() * width
    base = offset + y0 * width + x0

    def at(idx: torch.Tensor) -> torch.Tensor:
        return pixels[idx].float()

    top = at(base) * (1 - fx) + at(base + dx) * fx
    bottom = at(base + dy) * (1 - fx) + at(base + dy + dx) * fx
    return top * (1 - fy) + bottom * fy


def gather_nearest(
    values: torch.Tensor,
    offset: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
) -> torch.Tensor:
    """Nearest-neighbour read of ``(M,)`` packed values (e.g. class maps) -> ``(B, P, P)``."""
    sx = reflect_coords(sx, width).round().long()
    sy = reflect_coords(sy, height).round().long()
    return values[offset + sy * width + sx]


def augment_pair(
    image: np.ndarray,
    target: np.ndarray,
    cfg: AugmentConfig,
    *,
    seed: int = 0,
    patch: int | None = None,
    stain_jitter: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one image and its class map (numpy, for inspection and tests).

    ``image`` ``(H, W, C)`` float32, ``target`` ``(H, W)`` int -> a ``(P, P, C)`` float32 patch
    centred on the image and its ``(P, P)`` int64 target (``P`` defaults to ``min(H, W)``).
    """
    import numpy as np

    h, w, c = image.shape
    patch = patch or min(h, w)
    gen = torch.Generator().manual_seed(seed)
    params = draw_params(1, patch, c, cfg, gen, "cpu", stain_jitter=stain_jitter)
    half = (patch - 1) / 2
    centre = torch.tensor([[(w - patch) // 2 + half, (h - patch) // 2 + half]], dtype=torch.float32)
    sx, sy = source_coords(params, centre, patch)
    meta = [torch.tensor([[[v]]]) for v in (0, h, w)]
    x = gather_bilinear(
        torch.from_numpy(np.ascontiguousarray(image, np.float32)).reshape(-1, c), *meta, sx, sy
    )
    y = gather_nearest(
        torch.from_numpy(np.ascontiguousarray(target, np.int64)).reshape(-1), *meta, sx, sy
    )
    x = photometric(x.permute(0, 3, 1, 2), params, cfg, y)
    return x[0].permute(1, 2, 0).numpy(), y[0].numpy()
