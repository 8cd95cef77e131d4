"""Tiled inference: tiling, seamless blending, padding, TTA, banded labelling, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mlseg.config import InferenceConfig, WatershedConfig
from mlseg.infer import (
    blend_window,
    iter_prob_bands,
    predict_labels_banded,
    predict_probs,
    tile_grid,
)
from mlseg.instances import probs_to_labels

torch.set_num_threads(1)
CFG = InferenceConfig(tile_size=128, overlap=0.25, batch_size=4)


class Constant(nn.Module):
    """Logits that ignore the input: softmax is the same everywhere."""

    def __init__(self, values=(1.0, 2.0, 0.5)):
        super().__init__()
        self.register_buffer("values", torch.tensor(values).view(1, -1, 1, 1))

    def forward(self, x):
        return self.values.expand(x.shape[0], -1, x.shape[2], x.shape[3])


def conv_model(kernel: int, seed: int = 0, out: int = 3, channels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(channels, out, kernel, padding=kernel // 2, padding_mode="reflect").eval()


def untiled(model: nn.Module, image: np.ndarray, target: str = "three_class") -> np.ndarray:
    with torch.inference_mode():
        logits = model(torch.from_numpy(image.transpose(2, 0, 1)[None].copy()))
        probs = torch.sigmoid(logits) if target == "binary" else torch.softmax(logits, 1)
    return probs[0].numpy()


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (h, w, 3)).astype(np.float32)


def test_grid_covers_image_and_aligns_last_tile():
    grid = tile_grid(1000, 700, CFG)
    assert grid.tile_h == grid.tile_w == 128
    assert grid.ys[0] == 0 and grid.ys[-1] == 1000 - 128
    assert grid.xs[-1] == 700 - 128
    assert all(b - a <= 96 for a, b in zip(grid.ys, grid.ys[1:], strict=False))
    small = tile_grid(50, 70, CFG)  # smaller than one tile: one padded tile, multiple of 32
    assert (small.tile_h, small.tile_w, small.n_tiles) == (64, 96, 1)
    assert (small.pad_h, small.pad_w) == (64, 96)
    window = blend_window(128, 128, CFG)
    assert window.max() == pytest.approx(1.0) and window.min() > 0


def test_constant_model_gives_constant_output():
    image = smooth_image(1000, 700)
    probs = predict_probs(Constant(), image, CFG, target="three_class")
    expected = torch.softmax(torch.tensor([1.0, 2.0, 0.5]), 0).numpy()
    assert probs.shape == (3, 1000, 700) and probs.dtype == np.float32
    assert np.abs(probs - expected[:, None, None]).max() < 1e-6


def test_pointwise_model_tiled_equals_untiled():
    image = smooth_image(1000, 700, seed=1)
    model = conv_model(1)
    tiled = predict_probs(model, image, CFG, target="three_class")
    assert np.abs(tiled - untiled(model, image)).max() < 1e-5


def test_blending_leaves_no_seams():
    """A 5x5 convolution sees tile edges differently; Gaussian blending keeps the error
    small everywhere and no larger on tile boundaries than inside."""
    image = smooth_image(1000, 700, seed=2)
    model = conv_model(5, seed=2)
    ref = untiled(model, image)
    gaussian = np.abs(predict_probs(model, image, CFG) - ref)
    flat = np.abs(predict_probs(model, image, CFG.model_copy(update={"blend": "constant"})) - ref)
    assert gaussian.max() < 0.02
    assert gaussian.mean() < 0.25 * flat.mean()


def test_image_smaller_than_a_tile_and_odd_sizes():
    model = conv_model(1, out=1)
    for h, w in [(50, 70), (5, 3), (130, 33)]:
        image = smooth_image(h, w)
        probs = predict_probs(model, image, CFG, target="binary")
        assert probs.shape == (1, h, w)
        assert np.abs(probs - untiled(model, image, "binary")).max() < 1e-5


def test_flip_tta_averages_flips():
    image = smooth_image(200, 150, seed=4)
    model = conv_model(3, seed=4)
    tta = predict_probs(model, image, CFG.model_copy(update={"tta": True}))
    assert tta.shape == (3, 200, 150)
    assert np.allclose(tta.sum(0), 1.0, atol=1e-5)
    # a flip-symmetric model is unchanged by TTA
    sym = conv_model(1)
    plain = predict_probs(sym, image, CFG)
    assert (
        np.abs(predict_probs(sym, image, CFG.model_copy(update={"tta": True})) - plain).max() < 1e-5
    )


def test_bands_are_in_order_and_cover_every_row():
    image = smooth_image(500, 300)
    rows = 0
    for y0, band in iter_prob_bands(conv_model(1), image, CFG):
        assert y0 == rows and band.shape[0] == 3 and band.shape[2] == 300
        rows += band.shape[1]
    assert rows == 500


class BlobModel(nn.Module):
    """Three-class logits from a grey image: bright = interior, dark = background."""

    def forward(self, x):
        v = x[:, :1]
        return torch.cat([8 * (0.3 - v), 8 * (v - 0.3), torch.full_like(v, -4.0)], dim=1)


def blob_image(h: int, w: int, spacing: int = 24, radius: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cy = (yy % spacing) - spacing / 2
    cx = (xx % spacing) - spacing / 2
    return ((cy**2 + cx**2) <= radius**2).astype(np.float32)[..., None]


def test_banded_labels_match_whole_image_labels():
    image = blob_image(300, 260)
    cfg = CFG.model_copy(update={"band_rows": 64, "halo_px": 24})
    ws = WatershedConfig()
    whole = probs_to_labels(
        predict_probs(BlobModel(), image, cfg),
        "three_class",
        ws,
        pixel_size_um=None,
        min_area_px=10,
        max_area_px=10_000,
    )
    banded = predict_labels_banded(
        BlobModel(),
        image,
        cfg,
        target="three_class",
        watershed=ws,
        pixel_size_um=None,
        min_area_px=10,
        max_area_px=10_000,
    )
    assert banded.max() == whole.max() > 100
    # the same partition up to renumbering
    pairs = np.unique(np.stack([whole.ravel(), banded.ravel()]), axis=1)
    assert pairs.shape[1] == whole.max() + 1


@pytest.mark.slow
def test_8192_image_with_bounded_memory():
    """8192 x 8192 (uint8 input, cast per tile): labels without the 805 MB probability map.

    Peak traced numpy memory beyond the input and the caller's int32 output: about
    50 bytes per pixel of one window ((band_rows + 2 halo) x W = 576 x 8192 here) plus
    28 bytes per pixel of one tile row (tile x W: the blending buffers and one band), 344 MB
    measured, against ~40 bytes per pixel of the whole image (~2.7 GB) for predict_probs +
    probs_to_labels. 25-55 s on 2 shared CPU cores.
    """
    import tracemalloc

    side = 8192
    image = (blob_image(side, side) * 255).astype(np.uint8)  # 64 MB

    class Scaled(BlobModel):
        def forward(self, x):
            return super().forward(x / 255.0)

    out = np.zeros((side, side), np.int32)  # 256 MB, the caller's
    cfg = InferenceConfig(tile_size=512, overlap=0.125, batch_size=4, band_rows=512, halo_px=32)
    tracemalloc.start()
    predict_labels_banded(
        Scaled(),
        image,
        cfg,
        target="three_class",
        watershed=WatershedConfig(),
        pixel_size_um=None,
        min_area_px=10,
        max_area_px=10_000,
        out=out,
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    window_px = (cfg.band_rows + 2 * cfg.halo_px) * side
    tile_row_px = cfg.tile_size * side
    assert peak < 60 * window_px + 32 * tile_row_px, f"peak {peak / 1e6:.0f} MB"
    expected = (side // 24) ** 2 + 0  # one blob per 24 x 24 cell (partial cells at the edge)
    assert abs(int(out.max()) - expected) <= 2 * side // 24 + 1


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """The same tiles on the GPU (cuDNN may use TF32: small differences) and banded labels."""
    image = smooth_image(700, 500, seed=5)
    model = conv_model(3, seed=5)
    cpu = predict_probs(model, image, CFG)
    gpu_model = conv_model(3, seed=5).to("cuda")
    gpu = predict_probs(gpu_model, image, CFG, device="cuda")
    assert np.abs(cpu - gpu).max() < 5e-3
    tta = predict_probs(gpu_model, image, CFG.model_copy(update={"tta": True}), device="auto")
    assert np.allclose(tta.sum(0), 1.0, atol=1e-4)
    blobs = blob_image(300, 260)
    cfg = CFG.model_copy(update={"band_rows": 64, "halo_px": 24})
    args = dict(
        target="three_class",
        watershed=WatershedConfig(),
        pixel_size_um=None,
        min_area_px=10,
        max_area_px=10_000,
    )
    on_gpu = predict_labels_banded(BlobModel().to("cuda"), blobs, cfg, device="cuda", **args)
    assert on_gpu.max() == predict_labels_banded(BlobModel(), blobs, cfg, **args).max() > 100
