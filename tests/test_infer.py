"""Tiled inference: tiling, seamless blending, padding, TTA, banded labelling, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mlseg.config import InferenceConfig, WatershedConfig
from mlseg.infer import (
    StainTTA,
    adapted_batchnorm,
    blend_window,
    early_norm_layers,
    iter_prob_bands,
    predict_labels_banded,
    predict_probs,
    tile_grid,
)
from mlseg.instances import probs_to_labels
from mlseg.preprocess import MACENKO_REF_STAINS

torch.set_num_threads(1)
# float32 throughout: these tests check the tiling arithmetic to 1e-5 (bf16: see below)
CFG = InferenceConfig(tile_size=128, overlap=0.25, batch_size=4, amp=False)


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


@pytest.mark.parametrize("sigma_scale", [0.01, 0.02])
def test_a_narrow_blending_window_leaves_no_pixel_without_weight(sigma_scale):
    """Every pixel keeps some weight from every tile covering it: with a window of a few
    pixels, the Gaussian's tails underflow, and a point between tile centres summed 0 of
    0 (NaN probabilities, 83,016 of them at sigma_scale 0.01) without the floor."""
    cfg = CFG.model_copy(update={"sigma_scale": sigma_scale})
    probs = predict_probs(conv_model(5), smooth_image(300, 200), cfg)
    assert np.isfinite(probs).all()
    assert probs.min() >= 0.0 and probs.max() <= 1.0


def test_image_smaller_than_a_tile_and_odd_sizes():
    model = conv_model(1, out=1)
    for h, w in [(50, 70), (5, 3), (130, 33)]:
        image = smooth_image(h, w)
        probs = predict_probs(model, image, CFG, target="binary")
        assert probs.shape == (1, h, w)
        assert np.abs(probs - untiled(model, image, "binary")).max() < 1e-5


class NeedsSide(nn.Module):
    """A pointwise model that, as PAN's pyramid pooling, fails on inputs under 128 px."""

    def __init__(self):
        super().__init__()
        self.conv = conv_model(1, out=1)

    def forward(self, x):
        if min(x.shape[-2:]) < 128:
            raise RuntimeError("Output size is too small")
        return self.conv(x)


@pytest.mark.parametrize("tta", [False, True])
def test_a_model_with_a_minimum_input_gets_tiles_padded_up_to_it(tta):
    """A PAN model failed every image with a RuntimeError traceback at tile_size 64, and
    images under 97 px at the default tiles (padded to the next multiple of 32 only)."""
    from mlseg.errors import warn_once

    model = NeedsSide()
    small = CFG.model_copy(update={"tile_size": 64, "tta": tta})
    warn_once.cache_clear()
    with pytest.warns(UserWarning, match=r"inference.tile_size=64 is under the 128 px"):
        grid = tile_grid(20, 150, small, min_side=128)
    assert (grid.tile_h, grid.tile_w, grid.pad_h, grid.pad_w) == (128, 128, 128, 150)
    for h, w in [(1, 1), (20, 150), (96, 97), (300, 200)]:
        image = smooth_image(h, w)
        for cfg in (small, CFG.model_copy(update={"tta": tta})):
            probs = predict_probs(model, image, cfg, target="binary", min_side=128)
            assert probs.shape == (1, h, w)
            assert np.abs(probs - untiled(model.conv, image, "binary")).max() < 1e-5
    # the default minimum leaves every grid as it was
    assert tile_grid(20, 150, CFG, min_side=32) == tile_grid(20, 150, CFG)
    assert (tile_grid(20, 150, CFG).tile_h, tile_grid(20, 150, CFG).tile_w) == (32, 128)


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


class HaematoxylinThreshold(nn.Module):
    """Calls a pixel nucleus interior when its haematoxylin concentration (least squares on
    ``stains``, by default the Macenko reference) exceeds ``threshold``: a model that learnt
    one lab's nuclear density."""

    def __init__(self, threshold=0.5, steepness=40.0, stains=MACENKO_REF_STAINS):
        super().__init__()
        unmix = np.linalg.pinv(stains)[0]
        self.register_buffer("unmix", torch.tensor(unmix, dtype=torch.float32).view(1, 3, 1, 1))
        self.threshold, self.steepness = threshold, steepness

    def forward(self, x):
        od = -torch.log(x.clamp(min=1e-6))
        h = (od * self.unmix).sum(1, keepdim=True)
        interior = self.steepness * (h - self.threshold)
        return torch.cat([torch.zeros_like(h), interior, torch.full_like(h, -20.0)], dim=1)


def he_image(haematoxylin: np.ndarray, eosin=0.3, stains=MACENKO_REF_STAINS) -> np.ndarray:
    """RGB in [0, 1] mixed from ``stains`` (by default the Macenko reference):
    ``haematoxylin`` ``(H, W)`` concentrations over a uniform eosin background."""
    conc = np.stack([haematoxylin, np.full_like(haematoxylin, eosin)])
    od = np.einsum("ij,jhw->hwi", stains, conc)
    return np.exp(-od).astype(np.float32)


# a reference slide's own stains (columns H, E), as preprocess.stain_reference gives them
OTHER_STAINS = np.array([[0.70, 0.10], [0.65, 0.90], [0.30, 0.42]]) / np.linalg.norm(
    [[0.70, 0.10], [0.65, 0.90], [0.30, 0.42]], axis=0
)


@pytest.mark.parametrize("stains", [None, OTHER_STAINS], ids=["reference", "custom"])
def test_stain_tta_finds_pale_nuclei_and_leaves_the_rest(stains):
    """Two nuclei, one as dense as the model learnt and one at 40% of that: averaging with
    a copy 1.5x denser raises the pale one to an even call, keeps the dense one and leaves
    the unstained background background; in the stains the image was normalised to, the
    published reference or a reference slide's own."""
    frame = MACENKO_REF_STAINS if stains is None else stains
    h = np.zeros((96, 160), np.float32)
    yy, xx = np.mgrid[:96, :160]
    dense, pale = (yy - 48) ** 2 + (xx - 40) ** 2 < 15**2, (yy - 48) ** 2 + (xx - 120) ** 2 < 15**2
    h[dense], h[pale] = 1.0, 0.4
    image, model = he_image(h, stains=frame), HaematoxylinThreshold(stains=frame)
    plain = predict_probs(model, image, CFG)
    as_tuples = None if stains is None else tuple(map(tuple, stains.T))
    tta = predict_probs(model, image, CFG, stain_tta=StainTTA((1.0, 1.5), as_tuples))
    assert plain[1][pale].mean() < 0.05 and tta[1][pale].mean() > 0.45
    assert plain[1][dense].min() > 0.99 and tta[1][dense].min() > 0.99
    assert tta[1][~dense & ~pale].max() < 1e-3
    assert np.allclose(tta.sum(0), 1.0, atol=1e-5)


def test_stain_tta_changes_nothing_without_haematoxylin():
    """Unmixing and mixing again is exact: an image without haematoxylin (eosin plus a
    colour neither stain explains, e.g. a pen mark; or DAB) gives the same probabilities
    with any haematoxylin gain, whatever the model."""
    rng = np.random.default_rng(5)
    h, e = MACENKO_REF_STAINS.T
    other = np.cross(h, e)
    od = np.einsum("i,hw->hwi", e, rng.uniform(0.5, 1.0, (80, 120)))
    od += np.einsum("i,hw->hwi", other / np.linalg.norm(other), rng.uniform(0, 0.5, (80, 120)))
    image = np.exp(-od).astype(np.float32)
    model = conv_model(3, seed=5)
    plain = predict_probs(model, image, CFG)
    for gains in [(1.0, 1.5), (0.5, 2.0)]:
        assert (
            np.abs(predict_probs(model, image, CFG, stain_tta=StainTTA(gains)) - plain).max() < 1e-4
        )
    # IHC: DAB (the ihc profile's vector) has next to no haematoxylin in this frame, so a
    # brown nucleus or membrane is left as it is
    dab = np.array([0.268, 0.570, 0.776])
    image = np.exp(
        -np.einsum("i,hw->hwi", dab / np.linalg.norm(dab), rng.uniform(0, 1.5, (80, 120)))
    )
    plain = predict_probs(model, image.astype(np.float32), CFG)
    tta = predict_probs(model, image.astype(np.float32), CFG, stain_tta=StainTTA((1.0, 1.5)))
    assert np.abs(tta - plain).max() < 5e-3


def test_stain_tta_scales_the_haematoxylin_of_the_stains_it_is_given():
    """A slide normalised to a reference slide's own stains: its eosin is left alone in
    that frame; scaling the published reference's haematoxylin instead would change it."""
    eosin_only = he_image(np.zeros((64, 96), np.float32), eosin=0.8, stains=OTHER_STAINS)
    model = conv_model(3, seed=5)
    plain = predict_probs(model, eosin_only, CFG)
    own = StainTTA((1.0, 2.0), tuple(map(tuple, OTHER_STAINS.T)))
    assert np.abs(predict_probs(model, eosin_only, CFG, stain_tta=own) - plain).max() < 1e-4
    reference = StainTTA((1.0, 2.0))
    assert np.abs(predict_probs(model, eosin_only, CFG, stain_tta=reference) - plain).max() > 1e-3


def _unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, classes=3, decoder_channels=(32, 16, 8)
    ).eval()


@pytest.mark.parametrize("in_hardware", [True, False])
def test_bf16_only_where_the_cpu_has_it_and_close_to_float32(monkeypatch, in_hardware):
    """``inference.amp`` runs the network in bf16 on a CPU with bf16 in hardware (2-4x
    faster): probabilities stay float32, sum to 1 and lie close to float32's. Elsewhere it
    would be emulated and slower, so the CPU keeps float32 exactly."""
    import mlseg.model

    model, image = _unet(), np.repeat(blob_image(160, 200), 3, axis=2)
    fp32 = predict_probs(model, image, CFG)
    monkeypatch.setattr(mlseg.model, "cpu_bf16", lambda: in_hardware)
    amp = predict_probs(model, image, CFG.model_copy(update={"amp": True}))
    assert amp.dtype == np.float32 and np.allclose(amp.sum(axis=0), 1.0, atol=1e-5)
    if in_hardware:
        assert 0 < np.abs(amp - fp32).max() < 0.05 and np.abs(amp - fp32).mean() < 0.005
    else:
        assert np.array_equal(amp, fp32)


def test_adaptation_touches_the_encoders_stem_and_first_stage_only():
    model = _unet()
    layers = early_norm_layers(model)
    stage1 = [m for m in model.encoder.layer1.modules() if isinstance(m, nn.BatchNorm2d)]
    assert layers == [model.encoder.bn1, *stage1] and len(stage1) == 4
    assert early_norm_layers(conv_model(3)) == []  # no encoder: nothing to adapt


def test_adapted_batchnorm_cancels_exposure_and_restores_the_model():
    """A slide scanned darker (every value halved) gives the same probabilities once the
    early statistics come from the image; without adaptation it does not. Afterwards the
    model is exactly as before, so the next image does not depend on this one."""
    model = _unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # values up to 4, so that BatchNorm's eps (1e-5) is small against the variances
    image = np.random.default_rng(0).uniform(0, 4, (96, 80, 3)).astype(np.float32)
    cfg = InferenceConfig(tile_size=64, overlap=0.25, batch_size=4, amp=False)
    plain = [predict_probs(model, im, cfg) for im in (image, image * 0.5)]
    adapted = []
    for im in (image, image * 0.5):
        with adapted_batchnorm(model, im, cfg):
            adapted.append(predict_probs(model, im, cfg))
    assert np.abs(plain[0] - plain[1]).max() > 5e-2
    np.testing.assert_allclose(adapted[0], adapted[1], atol=5e-4)
    assert not np.allclose(adapted[0], plain[0], atol=1e-3)  # it did adapt
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training


def test_adaptation_gives_the_same_probabilities_on_a_models_first_image():
    """The same image, adapted and predicted twice with one model (a flow's cached model,
    a folder in which it comes first or later), gives the same probabilities both times."""
    model = _unet()
    cfg = InferenceConfig(tile_size=64, overlap=0.25, batch_size=4, amp=False)
    image = np.random.default_rng(0).uniform(0, 4, (96, 80, 3)).astype(np.float32)
    probs = []
    for _ in range(2):
        with adapted_batchnorm(model, image, cfg):
            probs.append(predict_probs(model, image, cfg))
    np.testing.assert_array_equal(probs[0], probs[1])


def test_a_shared_model_is_adapted_to_one_image_at_a_time():
    """A flow's thread runner gives its batches one cached model: while one image's
    statistics are in it, another thread's image must wait, not replace them mid-way
    (each image was segmented with a mix of its neighbours' statistics)."""
    import threading

    model = _unet()
    cfg = InferenceConfig(tile_size=64, overlap=0.25, batch_size=4, amp=False)
    image = np.random.default_rng(0).uniform(0, 4, (64, 64, 3)).astype(np.float32)
    inside = threading.Event()

    def other_image() -> None:
        with adapted_batchnorm(model, image * 0.5, cfg):
            inside.set()

    with adapted_batchnorm(model, image, cfg):
        mine = model.encoder.bn1.running_mean.clone()
        other = threading.Thread(target=other_image)
        other.start()
        assert not inside.wait(timeout=2)  # the other image waits for this one
        assert torch.equal(model.encoder.bn1.running_mean, mine)
    other.join()
    assert inside.is_set()


def test_adaptation_of_a_model_without_known_stages_warns_and_changes_nothing():
    model = conv_model(3)
    image = smooth_image(64, 64)
    with pytest.warns(UserWarning, match="adapt_bn"), adapted_batchnorm(model, image, CFG):
        probs = predict_probs(model, image, CFG)
    np.testing.assert_array_equal(probs, predict_probs(model, image, CFG))


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


@pytest.mark.parametrize("halo", [15, 40])
def test_nuclei_starting_on_a_band_boundary_are_labelled_once(halo):
    """Nuclei 15 rows tall whose top row is a band's last core row, the next band's first,
    or the one after, with halos from their height up: each is labelled once, by the band
    its top row lies in, with the ids 1..n of the whole-image labelling (kept by both bands,
    one on the boundary took an id the second could not write: ids up to 18 for 15)."""
    h, w, r = 260, 200, 7
    tops = [b + d for b in (64, 128, 192) for d in (-15, -8, -1, 0, 1)]
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros((h, w, 1), np.float32)
    for i, top in enumerate(tops):
        image[(yy - top - r) ** 2 + (xx - 12 - (i * 24) % (w - 24)) ** 2 <= r * r] = 1
    cfg = CFG.model_copy(update={"band_rows": 64, "halo_px": halo})
    args = {"pixel_size_um": None, "min_area_px": 10, "max_area_px": 10_000}
    ws = WatershedConfig()
    whole = probs_to_labels(predict_probs(BlobModel(), image, cfg), "three_class", ws, **args)
    banded = predict_labels_banded(
        BlobModel(), image, cfg, target="three_class", watershed=ws, **args
    )
    assert whole.max() == len(tops)
    np.testing.assert_array_equal(np.unique(banded), np.arange(len(tops) + 1))
    pairs = np.unique(np.stack([whole.ravel(), banded.ravel()]), axis=1)
    assert pairs.shape[1] == len(tops) + 1  # the same nuclei, each whole


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
    he = he_image(np.linspace(0, 1.2, 700 * 500, dtype=np.float32).reshape(700, 500))
    stain = [
        predict_probs(m, he, CFG, device=d, stain_tta=StainTTA((1.0, 1.5)))
        for m, d in ((model, "cpu"), (gpu_model, "cuda"))
    ]
    assert np.abs(stain[0] - stain[1]).max() < 5e-3
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
