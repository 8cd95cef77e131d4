"""Tiled sliding-window inference for images of any size, with bounded memory.

Tiles of ``tile_size`` x ``tile_size`` (a multiple of 32) step by
``tile_size * (1 - overlap)``; the last tile of each row and column is aligned to the image
edge, so no tile hangs over it. Each tile's probabilities are weighted by a separable
Gaussian window (sigma = ``sigma_scale * tile_size``, each axis floored at 1e-3 of its peak
so edges still count; kept at 1 towards sides on the image border, where no other tile
takes over) and
accumulated with the weights; the sum of weights divides them out. A point seen by several
tiles thus gets a smooth average dominated by the tile whose centre is nearest: no seams.

An image smaller than one tile (in either direction) is not an error: that direction is
reflect-padded up to the next multiple of 32 and run as one tile, then cropped back. A model
that takes no input under ``min_side`` px (PAN: 128, :func:`mlseg.model.min_input_side`)
gets tiles of at least that size, padded the same way.

Tiles are streamed: batches of ``batch_size`` are cut from the input as needed (any array
supporting ``image[y0:y1, x0:x1]``, e.g. a ``numpy.memmap``, converted to float32 per tile)
and accumulated, on the model's device, into a buffer of one tile row (``K x tile x W``
probabilities plus ``tile x W`` weights, float32 torch tensors). Rows above the next tile
row are final and are handed out as a numpy band (:func:`iter_prob_bands`). :func:`predict_probs` collects the bands into a full
``(K, H, W)`` array; :func:`predict_labels_banded` turns them into labels band by band,
holding only ``band_rows + 2 * halo_px`` rows of probabilities. Measured bound (numpy
allocations, ``tests/test_infer.py``): besides the input and the ``int32`` label output,
about 50 bytes per window pixel (``(band_rows + 2 halo_px) x W``: probabilities and the
watershed's temporaries) plus 12 bytes per tile-row pixel (``tile x W``: one band), and the
torch blending buffers (16 bytes per tile-row pixel): under 350 MB in all for 8192 x 8192
with 512-row bands, where the whole-image path needs about 40 bytes per image pixel
(2.7 GB).

Flip test-time augmentation averages the probabilities of the tile, its horizontal, its
vertical and its double flip (4x the forward passes). Stain test-time augmentation
(:class:`StainTTA`, for RGB brightfield input in [0, 1] only: the caller decides, see
:func:`mlseg.segment.stain_tta_for`) averages over copies of the tile whose haematoxylin
concentration is multiplied by each gain: the tile is unmixed into the stains it was
Macenko-normalised to (haematoxylin, eosin and their cross product, so a gain of 1 gives the
tile back), the haematoxylin concentration scaled, and the tile mixed again (one more pass
per gain; with flips, 4 per gain). A model trained on one lab's slides sees another lab's
paler nuclei also as dense as it learnt them. The split is exact for images normalised to
those stains; for other input their haematoxylin direction stands in for the slide's. DAB
has next to no haematoxylin component in Macenko's reference frame, so IHC's brown is left
as it is.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mlseg.config import InferenceConfig, WatershedConfig
from mlseg.errors import warn_once

_FLIPS = ((), (3,), (2,), (2, 3))


@dataclass(frozen=True)
class StainTTA:
    """Stain test-time augmentation (module docstring). ``gains``: haematoxylin
    concentration multipliers, one forward pass each (``(1.0,)``: off). ``stains``: the
    haematoxylin and eosin optical-density vectors the input was normalised to, as the
    rows ``(h, e)`` of 3 floats (hashable); ``None``: Macenko's published reference."""

    gains: tuple[float, ...] = (1.0,)
    stains: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

    @property
    def off(self) -> bool:
        return all(g == 1.0 for g in self.gains)


NO_STAIN_TTA = StainTTA()


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles go. ``tile_h``/``tile_w``: tile size actually used (a multiple of 32,
    at most ``tile_size`` unless the model's ``min_side`` is more); ``pad_h``/``pad_w``:
    padded image size (>= the image)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    pad_h: int
    pad_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def chunks(self, size: int) -> Iterator[list[tuple[int, int]]]:
        """Tile corners ``(y, x)``, row by row, in lists of up to ``size``."""
        positions = [(y, x) for y in self.ys for x in self.xs]
        for start in range(0, len(positions), size):
            yield positions[start : start + size]


def _ceil32(n: int) -> int:
    return max(32, int(math.ceil(n / 32.0)) * 32)


def _starts(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    step = max(1, int(round(tile * (1.0 - overlap))))
    count = int(math.ceil((length - tile) / step)) + 1
    starts = [min(i * step, length - tile) for i in range(count)]
    return tuple(sorted(set(starts)))


def tile_grid(height: int, width: int, cfg: InferenceConfig, min_side: int = 32) -> TileGrid:
    """The tiling of an ``height`` x ``width`` image under ``cfg``, for a model taking inputs
    of ``min_side`` px or more (a multiple of 32): tiles and padding are at least that."""
    if height < 1 or width < 1:
        raise ValueError(f"image must have at least one pixel, got {height} x {width}")
    if cfg.tile_size < min_side:
        warn_once(
            f"inference.tile_size={cfg.tile_size} is under the {min_side} px this model "
            f"takes: tiles of {min_side} px are used (set inference.tile_size: {min_side} "
            "or more)"
        )
    tile_h = max(min_side, min(cfg.tile_size, _ceil32(height)))
    tile_w = max(min_side, min(cfg.tile_size, _ceil32(width)))
    pad_h, pad_w = max(height, tile_h), max(width, tile_w)
    return TileGrid(
        height,
        width,
        tile_h,
        tile_w,
        pad_h,
        pad_w,
        _starts(pad_h, tile_h, cfg.overlap),
        _starts(pad_w, tile_w, cfg.overlap),
    )


def _axis_weights(n: int, cfg: InferenceConfig, first: bool, last: bool) -> np.ndarray:
    if cfg.blend == "constant":
        return np.ones(n)
    # floored per axis, not after the product: near an image edge (where every tile's row
    # weight is small) the column weights must still favour the tile centred there
    centre = (n - 1) / 2.0
    g = np.exp(-0.5 * ((np.arange(n) - centre) / (cfg.sigma_scale * n)) ** 2)
    g = np.maximum(g / g.max(), 1e-3)
    half = n // 2
    if first:  # no tile before this one: keep full weight up to the image edge
        g[:half] = 1.0
    if last:
        g[half:] = 1.0
    return g


def blend_window(
    tile_h: int,
    tile_w: int,
    cfg: InferenceConfig,
    edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
) -> np.ndarray:
    """``(tile_h, tile_w) float32`` blending weights: separable Gaussian (peak 1, each axis
    floored at 1e-3) or ones. ``edges`` = (top, bottom, left, right) sides that lie on the
    image border: no other tile covers beyond them, so the weight stays 1 out to that side
    (tile-edge artefacts of the model are then never the majority vote near the border).
    """
    top, bottom, left, right = edges
    rows = _axis_weights(tile_h, cfg, top, bottom)
    cols = _axis_weights(tile_w, cfg, left, right)
    return np.outer(rows, cols).astype(np.float32)


class _Source:
    """Cuts float32 ``(C, h, w)`` tiles from an ``(H, W, C)`` array, reflect-padding images
    smaller than a tile (only those are copied whole)."""

    def __init__(self, image, grid: TileGrid):
        if image.ndim == 2:
            image = image[..., None]
        if (grid.pad_h, grid.pad_w) != (grid.height, grid.width):
            pad = ((0, grid.pad_h - grid.height), (0, grid.pad_w - grid.width), (0, 0))
            image = np.pad(np.asarray(image, dtype=np.float32), pad, mode="reflect")
        self.image = image
        self.grid = grid

    def batch(self, positions: list[tuple[int, int]]) -> np.ndarray:
        g = self.grid
        out = np.empty((len(positions), self.image.shape[2], g.tile_h, g.tile_w), np.float32)
        for i, (y, x) in enumerate(positions):
            tile = np.asarray(self.image[y : y + g.tile_h, x : x + g.tile_w], dtype=np.float32)
            out[i] = tile.transpose(2, 0, 1)
        return out


@functools.cache
def _stain_frame(stains: tuple | None) -> tuple[np.ndarray, np.ndarray]:
    """``(mixing, unmixing)``, ``(3, 3)`` float32: mixing's columns are the haematoxylin and
    eosin optical-density vectors of ``stains`` (:attr:`StainTTA.stains`) and their unit
    cross product (the residual); unmixing is its inverse, so unmixing and mixing again is
    exact."""
    from mlseg.preprocess import MACENKO_REF_STAINS

    h, e = MACENKO_REF_STAINS.T if stains is None else np.asarray(stains, np.float64)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    residual = np.cross(h, e)
    mixing = np.stack([h, e, residual / np.linalg.norm(residual)], axis=1)
    return mixing.astype(np.float32), np.linalg.inv(mixing).astype(np.float32)


def _stain_variants(x, tta: StainTTA):
    """Yield ``x`` (``(B, 3, h, w)`` RGB in [0, 1]) with its haematoxylin concentration
    multiplied by each gain of ``tta`` (a gain of 1: ``x`` itself)."""
    import torch

    from mlseg.preprocess import OD_EPS

    if tta.off:
        yield from (x for _ in tta.gains)
        return
    mixing, unmixing = (torch.from_numpy(m).to(x.device) for m in _stain_frame(tta.stains))
    od = -torch.log(x.clamp(min=OD_EPS, max=1.0))
    conc = torch.einsum("ij,bjhw->bihw", unmixing, od)
    for gain in tta.gains:
        if gain == 1.0:
            yield x
            continue
        scaled = conc.clone()
        scaled[:, 0] *= gain
        yield torch.exp(-torch.einsum("ij,bjhw->bihw", mixing, scaled)).clamp(0.0, 1.0)


def _forward(
    model, x, target: str, tta: bool, stain_tta: StainTTA = NO_STAIN_TTA, amp: bool = False
):
    """``(B, C, h, w)`` float32 tensor -> ``(B, K, h, w)`` float32 probabilities, same device:
    the mean over the stain variants (``stain_tta``) and, with ``tta``, the flips. ``amp``:
    the model runs under bf16 autocast (the probabilities are still float32)."""
    import torch

    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else None
    total, n = None, 0
    for xs in _stain_variants(x, stain_tta):
        for dims in _FLIPS if tta else ((),):
            xi = torch.flip(xs, dims) if dims else xs
            with autocast or contextlib.nullcontext():
                logits = model(xi)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits.float()
            probs = torch.sigmoid(logits) if target == "binary" else torch.softmax(logits, dim=1)
            if dims:
                probs = torch.flip(probs, dims)
            total = probs if total is None else total + probs
            n += 1
    return total / n if n > 1 else total


def _channels(target: str) -> int:
    if target == "binary":
        return 1
    if target == "three_class":
        return 3
    raise ValueError(f"unknown target {target!r}; choose binary or three_class")


def iter_prob_bands(
    model,
    image,
    cfg: InferenceConfig,
    *,
    target: str = "three_class",
    device="cpu",
    stain_tta: StainTTA = NO_STAIN_TTA,
    min_side: int = 32,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, probs)`` bands covering the image top to bottom in order.

    ``probs``: ``(K, rows, W) float32``, final (every tile covering them has been added).
    ``image``: ``(H, W, C)`` array-like, already normalised (cast to float32 per tile).
    ``model``: ``nn.Module`` returning logits ``(N, K, h, w)``; evaluated under
    ``torch.inference_mode`` on ``device`` ("auto"/None: where its parameters are), in
    bf16 autocast with ``cfg.amp`` on a GPU or CPU with bf16 in hardware
    (:func:`mlseg.model.autocast_dtype`), with its memory layout switched to channels-last or
    back as ``cfg.channels_last`` says (its values unchanged).
    ``stain_tta``: stain test-time augmentation (:class:`StainTTA`; off by default).
    ``min_side``: the model's smallest input (:attr:`mlseg.model.LoadedModel.min_side`).
    """
    import torch

    from mlseg.model import autocast_dtype

    if device in (None, "auto"):
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        device = params[0].device if params else "cpu"
    image_h, image_w = int(image.shape[0]), int(image.shape[1])
    grid = tile_grid(image_h, image_w, cfg, min_side)
    k = _channels(target)
    source = _Source(image, grid)
    th, tw = grid.tile_h, grid.tile_w
    device = torch.device(device)
    cuda = device.type == "cuda"
    amp = autocast_dtype(device, cfg.amp) is not None
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if isinstance(model, torch.nn.Module):
        model.to(memory_format=memory)
    windows: dict[tuple[bool, bool, bool, bool], torch.Tensor] = {}

    def window_at(y: int, x: int) -> torch.Tensor:
        edges = (y == grid.ys[0], y == grid.ys[-1], x == grid.xs[0], x == grid.xs[-1])
        if edges not in windows:
            windows[edges] = torch.from_numpy(blend_window(th, tw, cfg, edges)).to(device)
        return windows[edges]

    # blending buffers of one tile row live on the model's device (no per-tile copies back)
    acc = torch.zeros((k, th, grid.pad_w), dtype=torch.float32, device=device)
    weight = torch.zeros((th, grid.pad_w), dtype=torch.float32, device=device)
    base = grid.ys[0]  # image row of acc[:, 0]

    def emit(upto: int) -> Iterator[tuple[int, np.ndarray]]:
        """Hand out rows [base, upto) and shift the buffers up."""
        nonlocal base
        rows = upto - base
        if rows <= 0:
            return
        stop = min(upto, image_h)
        if stop > base:
            n = stop - base
            band = acc[:, :n, :image_w] / weight[None, :n, :image_w]
            yield base, band.cpu().numpy()
        acc[:, : th - rows] = acc[:, rows:].clone()
        acc[:, th - rows :] = 0.0
        weight[: th - rows] = weight[rows:].clone()
        weight[th - rows :] = 0.0
        base = upto

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for chunk in grid.chunks(cfg.batch_size):
                batch = torch.from_numpy(source.batch(chunk))
                if cuda:
                    batch = batch.pin_memory().to(device, non_blocking=True)
                batch = batch.to(device).contiguous(memory_format=memory)
                probs = _forward(model, batch, target, cfg.tta, stain_tta, amp)
                for (y, x), p in zip(chunk, probs, strict=True):
                    if y > base:
                        yield from emit(y)
                    r0 = y - base
                    window = window_at(y, x)
                    acc[:, r0 : r0 + th, x : x + tw].addcmul_(p, window)
                    weight[r0 : r0 + th, x : x + tw] += window
            yield from emit(base + th)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def early_norm_layers(model) -> list:
    """The BatchNorm layers of ``model.encoder`` up to the end of its first stage (ResNet:
    ``bn1`` and ``layer1``; the stages :func:`mlseg.mixstyle.stages` knows), in order; empty
    for a model without such an encoder."""
    from torch import nn

    from mlseg.mixstyle import stages

    encoder = getattr(model, "encoder", None)
    found = stages(encoder) if isinstance(encoder, nn.Module) else []
    if not found:
        return []
    first = {id(m) for m in found[0].modules()}
    layers, inside = [], False
    for module in encoder.modules():
        if id(module) in first:
            inside = True
        elif inside:
            break
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            layers.append(module)
    return layers


# held while a model is adapted and predicts: the batches of a flow's thread runner share
# one cached model, and another image's statistics must not replace this one's mid-way
_ADAPTING = threading.Lock()


@contextlib.contextmanager
def adapted_batchnorm(model, image, cfg: InferenceConfig, min_side: int = 32):
    """Within the block, the encoder's early BatchNorm layers (:func:`early_norm_layers`)
    normalise with the statistics of ``image`` itself, not of the training set (AdaBN, Li
    et al. 2016, restricted to the layers where feature statistics carry an image's stain
    and brightness rather than its content); restored on leaving.

    ``image``: ``(H, W, C)``, normalised as for :func:`predict_probs`; the statistics are
    averaged over its tiles as inference cuts them (``cfg``, ``min_side`` as for
    :func:`iter_prob_bands`), one encoder pass each. A model whose encoder has no known
    stages is left as it is, with a warning. Threads that share a model (a flow's batches)
    take turns inside the block, each with its image's own.
    """
    import torch

    layers = early_norm_layers(model)
    if not layers:
        warn_once(
            "inference.adapt_bn: the model's encoder has no stages mlseg knows (ResNet-style "
            "layer1-layer3, timm 'tu-' encoders); predicting without adaptation"
        )
        yield
        return
    with _ADAPTING:
        saved = [
            (
                m.running_mean.clone(),
                m.running_var.clone(),
                m.num_batches_tracked.clone(),
                m.momentum,
            )
            for m in layers
        ]
        device = next(model.parameters()).device
        grid = tile_grid(int(image.shape[0]), int(image.shape[1]), cfg, min_side)
        source = _Source(image, grid)
        was_training = model.training
        # in the layout predict_probs will use: the model's first prediction turns it to
        # channels_last, and statistics gathered before that differed from all later ones
        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model.to(memory_format=memory)
        try:
            model.eval()
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches
                m.train()
            with torch.no_grad():
                for chunk in grid.chunks(cfg.batch_size):
                    batch = torch.from_numpy(source.batch(chunk)).to(device)
                    model.encoder(batch.contiguous(memory_format=memory))
            for m in layers:
                m.eval()
            yield
        finally:
            for m, (mean, var, count, momentum) in zip(layers, saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
                m.momentum = momentum
            model.train(was_training)


def predict_probs(
    model,
    image: np.ndarray,
    cfg: InferenceConfig,
    *,
    target: str = "three_class",
    device="cpu",
    stain_tta: StainTTA = NO_STAIN_TTA,
    min_side: int = 32,
) -> np.ndarray:
    """Tiled prediction of a whole image: ``(H, W, C)`` float32 -> ``(K, H, W) float32``.

    K = 1 (sigmoid foreground) for ``binary``, 3 (softmax: background, interior,
    boundary) for ``three_class``. See the module docstring for tiling, blending, padding,
    memory and ``stain_tta``; ``min_side`` as for :func:`iter_prob_bands`.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    out = np.empty((_channels(target), height, width), dtype=np.float32)
    for y0, band in iter_prob_bands(
        model, image, cfg, target=target, device=device, stain_tta=stain_tta, min_side=min_side
    ):
        out[:, y0 : y0 + band.shape[1]] = band
    return out


def predict_labels_banded(
    model,
    image,
    cfg: InferenceConfig,
    *,
    target: str,
    watershed: WatershedConfig,
    pixel_size_um: float | None,
    min_area_px: int,
    max_area_px: int,
    device="cpu",
    out: np.ndarray | None = None,
    stain_tta: StainTTA = NO_STAIN_TTA,
    min_side: int = 32,
) -> np.ndarray:
    """Labels of a large image without holding its full probability map.

    Probabilities arrive in bands (:func:`iter_prob_bands`); every ``band_rows`` rows, the
    window ``[core - halo_px, core + band_rows + halo_px)`` is separated into instances
    (:func:`mlseg.instances.probs_to_labels`) and the objects whose top row lies in the core
    are written to ``out`` where it is still 0 (an object seen by two windows is written
    once). Objects taller than ``halo_px`` may be cut at the bottom of a window.
    ``out``: optional ``(H, W) int32`` array (e.g. a ``numpy.memmap``) to fill; returned.
    ``stain_tta``, ``min_side``: as in :func:`iter_prob_bands`.
    """
    from mlseg.instances import probs_to_labels

    height, width = int(image.shape[0]), int(image.shape[1])
    if out is None:
        out = np.zeros((height, width), dtype=np.int32)
    else:
        out[...] = 0
    k = _channels(target)
    halo, core = cfg.halo_px, cfg.band_rows
    # rolling window of probability rows [win0, win0 + filled)
    buf = np.zeros((k, core + 2 * halo, width), dtype=np.float32)
    win0, filled = -halo, halo  # a virtual halo above row 0 (never labelled: all zero)
    next_label = 1
    core0 = 0

    def process(core_start: int, core_stop: int) -> None:
        nonlocal next_label
        top = max(0, core_start - halo)
        bottom = min(height, core_stop + halo)
        window = buf[:, top - win0 : bottom - win0]
        labels = probs_to_labels(
            window,
            target,
            watershed,
            pixel_size_um=pixel_size_um,
            min_area_px=min_area_px,
            max_area_px=max_area_px,
        )
        n = int(labels.max(initial=0))
        if n == 0:
            return
        from scipy import ndimage

        boxes = ndimage.find_objects(labels)
        keep = np.zeros(n + 1, dtype=bool)
        for i, box in enumerate(boxes, start=1):
            if box is not None and core_start <= top + box[0].start < core_stop:
                keep[i] = True
        new_ids = np.zeros(n + 1, dtype=np.int32)
        new_ids[keep] = np.arange(next_label, next_label + int(keep.sum()), dtype=np.int32)
        next_label += int(keep.sum())
        mapped = new_ids[labels]
        target_rows = out[top:bottom]
        free = (target_rows == 0) & (mapped > 0)
        target_rows[free] = mapped[free]

    for _, band in iter_prob_bands(
        model, image, cfg, target=target, device=device, stain_tta=stain_tta, min_side=min_side
    ):
        rows = band.shape[1]
        offset = 0
        while offset < rows:
            take = min(rows - offset, buf.shape[1] - filled)
            buf[:, filled : filled + take] = band[:, offset : offset + take]
            filled += take
            offset += take
            if filled == buf.shape[1]:  # core + both halos present
                process(core0, core0 + core)
                # keep the last 2 * halo rows: halo above the next core, and its first rows
                keep_rows = 2 * halo
                buf[:, :keep_rows] = buf[:, filled - keep_rows : filled].copy()
                win0 += filled - keep_rows
                filled = keep_rows
                core0 += core
    if core0 < height:
        process(core0, height)
    return out
