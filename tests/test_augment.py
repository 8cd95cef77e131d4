"""Batch augmentation: reproducible, aligned image/target, identity when disabled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlseg.augment import augment_pair, draw_params, photometric, reflect_coords
from mlseg.config import AugmentConfig
from mlseg.data import Batches, PatchStore, faint_nuclei, nucleus_contrast

# every photometric transform off (the haematoxylin gain is on by default)
NO_PHOTOMETRY = dict(color_p=0.0, hed_p=0.0, haematoxylin_gain_p=0.0, blur_p=0.0, noise_p=0.0)
GEOMETRY_ONLY = AugmentConfig(**NO_PHOTOMETRY)


def _blocks(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Image whose channel 0 equals its class map (large blocks), channels 1-2 a gradient."""
    target = np.zeros((size, size), np.int64)
    target[8:30, 10:40] = 1
    target[36:60, 4:28] = 2
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([target / 2.0, yy, xx], axis=2).astype(np.float32)
    return image, target


def test_disabled_is_an_exact_crop() -> None:
    image, target = _blocks()
    x, y = augment_pair(image, target, AugmentConfig(enabled=False), patch=32)
    assert np.array_equal(x, image[16:48, 16:48]) and np.array_equal(y, target[16:48, 16:48])


def test_seeded_and_reproducible() -> None:
    image, target = _blocks()
    a = augment_pair(image, target, AugmentConfig(elastic_p=1.0), seed=5)
    b = augment_pair(image, target, AugmentConfig(elastic_p=1.0), seed=5)
    c = augment_pair(image, target, AugmentConfig(elastic_p=1.0), seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_flips_and_rot90_are_exact_dihedral_transforms() -> None:
    image, target = _blocks()
    cfg = GEOMETRY_ONLY.model_copy(update={"scale_p": 0.0, "rotate_p": 0.0})
    variants = [np.rot90(np.flip(target, 1) if f else target, k) for f in (0, 1) for k in range(4)]
    seen = set()
    for seed in range(24):
        x, y = augment_pair(image, target, cfg, seed=seed)
        match = [i for i, v in enumerate(variants) if np.array_equal(y, v)]
        assert match, f"seed {seed}: not a flip/rotation of the target"
        assert np.allclose(x[..., 0], y / 2.0)  # image moved with its target
        seen.add(match[0])
    assert len(seen) >= 6  # all eight occur; 24 draws see most of them


@pytest.mark.parametrize(
    "update", [{"scale_p": 1.0}, {"rotate_p": 1.0}, {"elastic_p": 1.0, "elastic_px": 4.0}]
)
def test_image_and_target_stay_aligned(update) -> None:
    image, target = _blocks()
    cfg = GEOMETRY_ONLY.model_copy(update=update)
    for seed in range(4):
        x, y = augment_pair(image, target, cfg, seed=seed)
        # bilinear image vs nearest target differ only along block edges
        agree = np.abs(x[..., 0] - y / 2.0) < 0.26
        assert agree.mean() > 0.93


def test_photometric_identity_and_ranges() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 0.8 + 0.1
    p = draw_params(4, 16, 3, GEOMETRY_ONLY, gen, "cpu")
    assert torch.equal(photometric(x, p, GEOMETRY_ONLY), x)
    zero_jitter = AugmentConfig(**{**NO_PHOTOMETRY, "hed_p": 1.0}, hed_jitter=1e-12)
    p = draw_params(4, 16, 3, zero_jitter, gen, "cpu")
    assert torch.allclose(photometric(x, p, zero_jitter), x, atol=1e-4)
    strong = AugmentConfig(color_p=1.0, hed_p=1.0, hed_jitter=0.1, blur_p=1.0, noise_p=1.0)
    p = draw_params(4, 16, 3, strong, gen, "cpu")
    y = photometric(x, p, strong)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(y, x)


def test_blur_smooths_and_keeps_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(**{**NO_PHOTOMETRY, "blur_p": 1.0}, blur_sigma=(1.5, 1.5))
    x = torch.rand(2, 1, 32, 32)
    y = photometric(x, draw_params(2, 32, 1, cfg, gen, "cpu"), cfg)
    assert y.std() < 0.5 * x.std() and abs(float(y.mean() - x.mean())) < 0.02


@pytest.mark.parametrize("step", ["blur_p", "sharpen_p"])
def test_a_blur_wider_than_a_third_of_the_patch_still_trains(step: str) -> None:
    """blur_sigma up to 12 px on the smallest patch (32 px): the kernel is cut at the patch
    instead of training stopping at the first blurred batch (reflect padding of 36 px)."""
    cfg = AugmentConfig(**{**NO_PHOTOMETRY, step: 1.0}, blur_sigma=(12.0, 12.0))
    x = torch.rand(2, 3, 32, 32)
    y = photometric(x, draw_params(2, 32, 3, cfg, torch.Generator().manual_seed(0), "cpu"), cfg)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert float(y.amin()) >= float(x.amin()) - 1e-6 and float(y.amax()) <= float(x.amax()) + 1e-6
    if step == "blur_p":  # smoother, about the same brightness
        assert y.std() < 0.5 * x.std() and abs(float(y.mean() - x.mean())) < 0.02


def test_reflect_coords() -> None:
    v = torch.tensor([-2.0, -1.0, 0.0, 3.0, 4.0, 5.0, 9.0])
    assert reflect_coords(v, torch.tensor(5)).tolist() == [2.0, 1.0, 0.0, 3.0, 4.0, 3.0, 1.0]
    assert reflect_coords(torch.tensor([-3.0, 2.0]), torch.tensor(1)).tolist() == [0.0, 0.0]


def test_patch_store_batches_and_foreground_oversampling() -> None:
    images, targets = [], []
    for size in (40, 70):  # images smaller and larger than the patch
        img, t = _blocks(size)
        images.append(img)
        targets.append((t > 0).astype(np.uint8))
    store = PatchStore(images, targets, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x, y = store.sample(6, 64, AugmentConfig(), gen, fg_fraction=0.5)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (6, 64, 64) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1}
    x, y = store.sample(16, 32, AugmentConfig(enabled=False), gen, fg_fraction=1.0)
    assert (y[:, 16, 16] == 1).all()  # every patch centred on a nucleus pixel


def _three_nuclei(background: float) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei 1 and 3 far from ``background`` in brightness, nucleus 2 near it."""
    labels = np.zeros((96, 96), np.int64)
    labels[10:22, 10:22], labels[40:52, 40:52], labels[70:82, 70:82] = 1, 2, 3
    image = np.full((96, 96, 3), background, np.float32)
    far = 1.0 - background
    image[labels == 1], image[labels == 2], image[labels == 3] = far, background - 0.05, far
    return image, labels


@pytest.mark.parametrize("background", [0.9, 0.1])  # bright field (H&E), dark field (fluorescence)
def test_the_nucleus_nearest_its_background_is_the_faint_one(background: float) -> None:
    image, labels = _three_nuclei(background)
    contrast = nucleus_contrast(image, labels)
    assert contrast.shape == (3,) and contrast.argmin() == 1
    (faint,) = faint_nuclei([image], [labels], quantile=0.3)
    assert np.array_equal(np.divmod(faint, 96), ([[46], [46]]))  # nucleus 2's centre


def test_faint_nuclei_of_a_tile_with_a_slides_ids_need_no_table_of_every_id() -> None:
    """A training mask cut from a slide's label image keeps its global ids (up to
    2**31 - 1): the contrast table ran to the largest id, 22 s and 2.9 GB for 100 nuclei with
    ids near 5e7, 16 GiB and more near 2**31."""
    import tracemalloc

    image, labels = _three_nuclei(0.9)
    tracemalloc.start()
    try:
        (faint,) = faint_nuclei([image], [np.where(labels > 0, labels + 10_000_000, 0)], 0.3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.divmod(faint, 96), ([[46], [46]]))  # nucleus 2's centre
    assert peak < 20e6


def test_faint_oversampling_centres_patches_on_faint_nuclei() -> None:
    image, labels = _three_nuclei(0.9)
    store = PatchStore(
        [image],
        [(labels > 0).astype(np.uint8)],
        torch.device("cpu"),
        faint=faint_nuclei([image], [labels], quantile=0.3),
    )
    gen = torch.Generator().manual_seed(0)
    x, y = store.sample(
        16, 32, AugmentConfig(enabled=False), gen, fg_fraction=0.0, faint_fraction=1.0
    )
    assert torch.allclose(x[:, 0, 16, 16], torch.tensor(0.85)) and (y[:, 16, 16] == 1).all()


def test_without_faint_nuclei_the_faint_share_centres_on_nuclei() -> None:
    image, labels = _three_nuclei(0.9)
    store = PatchStore([image], [(labels > 0).astype(np.uint8)], torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    _, y = store.sample(
        16, 32, AugmentConfig(enabled=False), gen, fg_fraction=0.0, faint_fraction=1.0
    )
    assert (y[:, 16, 16] == 1).all()  # on a nucleus, not on background


def test_no_faint_share_draws_the_same_patches_as_before() -> None:
    image, labels = _three_nuclei(0.9)
    target = [(labels > 0).astype(np.uint8)]
    plain = PatchStore([image], target, torch.device("cpu"))
    faint = PatchStore(
        [image], target, torch.device("cpu"), faint=faint_nuclei([image], [labels], 0.3)
    )
    a = plain.sample(8, 32, AugmentConfig(), torch.Generator().manual_seed(3), fg_fraction=0.33)
    b = faint.sample(8, 32, AugmentConfig(), torch.Generator().manual_seed(3), fg_fraction=0.33)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_subset_and_full_batch_forms_agree() -> None:
    cfg = AugmentConfig(color_p=0.5, hed_p=0.5, blur_p=0.5, noise_p=0.0)
    x = torch.rand(8, 3, 16, 16) * 0.8 + 0.1
    out = []
    for subset in (True, False):
        p = draw_params(8, 16, 3, cfg, torch.Generator().manual_seed(3), "cpu", subset=subset)
        out.append(photometric(x, p, cfg))
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], x)


def test_noise_only_on_drawn_samples() -> None:
    cfg = AugmentConfig(**{**NO_PHOTOMETRY, "noise_p": 0.5}, noise_std=0.1)
    x = torch.rand(16, 1, 8, 8)
    p = draw_params(16, 8, 1, cfg, torch.Generator().manual_seed(0), "cpu")
    changed = (photometric(x, p, cfg) != x).flatten(1).any(dim=1)
    assert changed.tolist() == [i in set(p.noise.index.tolist()) for i in range(16)]
    assert 0 < changed.sum() < 16


def _he_patch(batch: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Pink background, one dark purple nucleus per patch: interior (class 1) with a
    two-pixel rim (class 2)."""
    classes = torch.zeros(batch, size, size, dtype=torch.int64)
    classes[:, 8:24, 8:24] = 2
    classes[:, 10:22, 10:22] = 1
    pink = torch.tensor([0.9, 0.6, 0.8])[:, None, None]
    purple = torch.tensor([0.3, 0.2, 0.5])[:, None, None]
    x = torch.where(classes[:, None] > 0, purple, pink).float()
    return x, classes


def _haematoxylin(x: torch.Tensor) -> torch.Tensor:
    from mlseg.augment import HED_FROM_RGB

    od = -torch.log(x.clamp(1 / 255, 1)).permute(0, 2, 3, 1).double()
    return (od @ HED_FROM_RGB)[..., 0]


def test_nucleus_fade_pales_nucleus_interiors_only() -> None:
    cfg = AugmentConfig(**NO_PHOTOMETRY, nucleus_fade_p=1.0, nucleus_fade_min=0.2)
    x, classes = _he_patch()
    p = draw_params(4, 32, 3, cfg, torch.Generator().manual_seed(0), "cpu")
    y = photometric(x, p, cfg, classes)
    before, after = _haematoxylin(x), _haematoxylin(y)
    inner = torch.zeros_like(classes, dtype=torch.bool)
    inner[:, 11:21, 11:21] = True
    ratio = after[inner].view(4, -1).mean(1) / before[inner].view(4, -1).mean(1)
    assert (ratio < 0.95).all() and (ratio >= 0.2 - 1e-6).all()  # paler, within the range
    far = torch.ones_like(inner)
    far[:, 9:23, 9:23] = False  # more than one pixel from the interior: rim and background
    assert torch.allclose(y.permute(0, 2, 3, 1)[far], x.permute(0, 2, 3, 1)[far], atol=1e-5)
    # without class maps (or without a stain to fade) nothing changes
    assert torch.equal(photometric(x, p, cfg), x)
    mono = draw_params(4, 32, 3, cfg, torch.Generator(), "cpu", stain_jitter=False)
    assert mono.fade is None


def test_nucleus_fade_subset_and_full_batch_forms_agree() -> None:
    cfg = AugmentConfig(color_p=0.0, hed_p=0.5, blur_p=0.0, noise_p=0.0, nucleus_fade_p=0.5)
    x, classes = _he_patch(batch=8)
    out = []
    for subset in (True, False):
        p = draw_params(8, 32, 3, cfg, torch.Generator().manual_seed(3), "cpu", subset=subset)
        out.append(photometric(x, p, cfg, classes))
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], x)


def test_haematoxylin_gain_scales_the_whole_patch_and_nothing_else() -> None:
    cfg = AugmentConfig(
        **{**NO_PHOTOMETRY, "haematoxylin_gain_p": 1.0}, haematoxylin_gain=(0.5, 0.8)
    )
    x, _ = _he_patch(batch=6)
    p = draw_params(6, 32, 3, cfg, torch.Generator().manual_seed(0), "cpu")
    y = photometric(x, p, cfg)
    ratio = (_haematoxylin(y) / _haematoxylin(x)).flatten(1)
    # one factor per patch, the same over nucleus and background, within the range
    assert torch.allclose(ratio.amin(1), ratio.amax(1), atol=1e-4)
    assert ((ratio[:, 0] >= 0.5 - 1e-4) & (ratio[:, 0] <= 0.8 + 1e-4)).all()
    assert ratio[:, 0].std() > 0  # drawn per patch
    from mlseg.augment import HED_FROM_RGB

    def eosin_dab(t: torch.Tensor) -> torch.Tensor:
        return (-torch.log(t.clamp(1 / 255, 1)).permute(0, 2, 3, 1).double() @ HED_FROM_RGB)[
            ..., 1:
        ]

    assert torch.allclose(eosin_dab(y), eosin_dab(x), atol=1e-4)
    # on by default; off at p 0, and never for grey or fluorescence input
    assert draw_params(6, 32, 3, AugmentConfig(), torch.Generator(), "cpu").gain is not None
    off = AugmentConfig(haematoxylin_gain_p=0.0)
    assert draw_params(6, 32, 3, off, torch.Generator(), "cpu").gain is None
    assert draw_params(6, 32, 3, cfg, torch.Generator(), "cpu", stain_jitter=False).gain is None


def test_haematoxylin_gain_off_leaves_the_random_stream_alone() -> None:
    """Configs that do not use the gain draw the same batches as before it existed."""
    x = torch.rand(8, 3, 16, 16) * 0.8 + 0.1
    base = AugmentConfig(haematoxylin_gain_p=0.0, haematoxylin_gain=(0.25, 4.0))
    off = AugmentConfig(haematoxylin_gain_p=0.0)
    a = photometric(x, draw_params(8, 16, 3, base, torch.Generator().manual_seed(1), "cpu"), base)
    b = photometric(x, draw_params(8, 16, 3, off, torch.Generator().manual_seed(1), "cpu"), base)
    assert torch.equal(a, b)


def test_log_uniform_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="0 < low <= high"):
        AugmentConfig(haematoxylin_gain=(0.0, 2.0))
    with pytest.raises(ValueError, match="0 < low <= high"):
        AugmentConfig(scale_range=(2.0, 0.5))


def test_sharpen_adds_detail_within_the_patch_range() -> None:
    cfg = AugmentConfig(**{**NO_PHOTOMETRY, "sharpen_p": 1.0}, sharpen_amount=(1.0, 1.0))
    # a soft image (smooth random field), as from a blurrier scanner
    coarse = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear") * 0.5 + 0.25
    y = photometric(x, draw_params(4, 32, 3, cfg, torch.Generator().manual_seed(0), "cpu"), cfg)

    def detail(t: torch.Tensor) -> torch.Tensor:  # high-pass share: what a sharper scan has more of
        return (t[..., 1:, :] - t[..., :-1, :]).std() / t.std()

    assert detail(y) > 1.1 * detail(x)
    assert (y.amin(dim=(1, 2, 3)) >= x.amin(dim=(1, 2, 3)) - 1e-6).all()
    assert (y.amax(dim=(1, 2, 3)) <= x.amax(dim=(1, 2, 3)) + 1e-6).all()
    assert abs(float(y.mean() - x.mean())) < 0.02
    # amount 0 is the identity; off by default, and then the random stream is untouched
    none = AugmentConfig(**{**NO_PHOTOMETRY, "sharpen_p": 1.0}, sharpen_amount=(0.0, 0.0))
    p0 = draw_params(4, 32, 3, none, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(photometric(x, p0, none), x, atol=1e-6)
    assert draw_params(4, 32, 3, AugmentConfig(), torch.Generator(), "cpu").sharpen is None
    base = AugmentConfig(noise_p=1.0)
    a = draw_params(4, 32, 3, base, torch.Generator().manual_seed(2), "cpu")
    b = draw_params(4, 32, 3, base, torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(photometric(x, a, base), photometric(x, b, base))
    with pytest.raises(ValueError, match="0 <= low <= high"):
        AugmentConfig(sharpen_amount=(1.0, 0.5))


def test_sharpen_subset_and_full_batch_forms_agree() -> None:
    cfg = AugmentConfig(**{**NO_PHOTOMETRY, "sharpen_p": 0.5})
    x = torch.rand(8, 3, 16, 16)
    a = photometric(x, draw_params(8, 16, 3, cfg, torch.Generator().manual_seed(3), "cpu"), cfg)
    full = draw_params(8, 16, 3, cfg, torch.Generator().manual_seed(3), "cpu", subset=False)
    assert torch.allclose(a, photometric(x, full, cfg), atol=1e-6)
    assert not torch.equal(a, x)


@pytest.mark.gpu
def test_prefetching_on_cuda_hands_out_the_batches_drawn_in_turn() -> None:
    """The side stream changes when a batch is cut, never what it holds (the first included)."""
    rng = np.random.default_rng(0)
    images = [rng.random((1024, 1024, 3), dtype=np.float32) for _ in range(4)]
    targets = [(rng.random((1024, 1024)) > 0.7).astype(np.uint8) for _ in range(4)]
    cuda = torch.device("cuda")

    def three(prefetch: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        store = PatchStore(images, targets, cuda)  # a fresh upload, as training starts
        gen = torch.Generator().manual_seed(0)
        batches = Batches(
            lambda: store.sample(8, 64, AugmentConfig(), gen, fg_fraction=0.33),
            gen,
            cuda if prefetch else torch.device("cpu"),  # no side stream: drawn when asked
        )
        return [tuple(t.cpu() for t in next(batches)) for _ in range(3)]

    for (xa, ya), (xb, yb) in zip(three(prefetch=True), three(prefetch=False), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    "update", [{"scale_p": 1.0}, {"rotate_p": 1.0}, {"elastic_p": 1.0, "elastic_px": 4.0}]
)
def test_the_target_is_the_source_pixel_nearest_where_the_image_is_read(update) -> None:
    """Channels 0-1 of the image are each pixel's column and row, so the (bilinear) image
    says where each output pixel was read; the target, one id per source pixel, must hold
    the id of the source pixel nearest there: no half-pixel shift against the image, and
    no id that is a blend of neighbours."""
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    ids = (yy * size + xx).astype(np.int64)
    image = np.stack([xx, yy, np.zeros_like(xx)], axis=2).astype(np.float32)
    cfg = GEOMETRY_ONLY.model_copy(update=update)
    for seed in range(3):
        x, y = augment_pair(image, ids, cfg, seed=seed, patch=32)
        sx, sy = x[..., 0].astype(np.float64), x[..., 1].astype(np.float64)
        clear = (np.abs(sx % 1 - 0.5) > 0.01) & (np.abs(sy % 1 - 0.5) > 0.01)  # no rounding tie
        nearest = np.rint(sy).astype(np.int64) * size + np.rint(sx).astype(np.int64)
        assert clear.mean() > 0.8
        assert np.array_equal(y[clear], nearest[clear]), f"seed {seed}"


def test_each_geometric_step_applies_to_its_share_and_zooms_alike_in_both_axes() -> None:
    """rotate_p, scale_p and elastic_p each pick about that share of the patches, and a
    zoom scales both axes alike (nuclei keep their shape)."""
    batch, p = 400, 0.3
    off = GEOMETRY_ONLY.model_copy(
        update={"flips": False, "rot90": False, "scale_p": 0.0, "rotate_p": 0.0}
    )

    def draw(**update):
        cfg = off.model_copy(update=update)
        return draw_params(batch, 16, 3, cfg, torch.Generator().manual_seed(0), "cpu")

    m = draw(rotate_p=p).matrix.double()
    rotated = (m[:, 0, 1].abs() > 1e-6).double().mean()  # -sin of the free angle
    m = draw(scale_p=p).matrix.double()
    scaled = ((m[:, 0, 0] - 1).abs() > 1e-6).double().mean()
    elastic = draw(elastic_p=p, elastic_px=4.0).elastic
    warped = (elastic.flatten(1).abs().amax(1) > 0).double().mean()
    for share in (rotated, scaled, warped):
        assert abs(float(share) - p) < 0.08
    assert draw().elastic is None and torch.equal(draw().matrix, torch.eye(2).expand(batch, 2, 2))
    m = draw(rotate_p=1.0, scale_p=1.0, flips=True).matrix.double()
    gram = m.transpose(1, 2) @ m  # a rotation/flip times one scale: s**2 * I
    s2 = gram[:, 0, 0]
    assert torch.allclose(gram, s2[:, None, None] * torch.eye(2, dtype=torch.float64), atol=1e-5)
    assert s2.sqrt().min() < 0.6 and s2.sqrt().max() > 1.8  # scale_range (0.5, 2.0)


def test_photometric_jitter_goes_both_ways_within_its_range() -> None:
    """Brighter and darker, more and less contrast, gamma, stain stronger and weaker: each
    drawn across its whole configured range, on both sides of the identity."""
    cfg = AugmentConfig(
        color_p=1.0, hed_p=1.0, blur_p=1.0, noise_p=1.0, brightness=0.2, contrast=0.3, gamma=0.4
    )
    p = draw_params(400, 16, 3, cfg, torch.Generator().manual_seed(0), "cpu")

    def spans(values: torch.Tensor, lo: float, hi: float) -> None:
        v = values.flatten().double()
        quarter = (hi - lo) / 4
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
        assert v.min() < lo + quarter and v.max() > hi - quarter

    spans(p.color.values["brightness"], 0.8, 1.2)
    spans(p.color.values["contrast"], 0.7, 1.3)
    spans(p.color.values["gamma"].log(), -0.4, 0.4)
    spans(p.hed.values["scale"], 1 - cfg.hed_jitter, 1 + cfg.hed_jitter)
    spans(p.hed.values["shift"], -cfg.hed_jitter, cfg.hed_jitter)
    spans(p.blur.values["sigma"], *cfg.blur_sigma)
    noise_std = p.noise.values["noise"].flatten(1).std(1) / cfg.noise_std  # of 768 values
    assert noise_std.min() < 0.25 and 0.75 < noise_std.max() < 1.1


def test_contrast_keeps_each_patch_s_mean() -> None:
    cfg = AugmentConfig(
        **{**NO_PHOTOMETRY, "color_p": 1.0}, brightness=0.0, contrast=0.5, gamma=0.0
    )
    x = torch.rand(8, 3, 16, 16) * 0.5 + 0.25
    p = draw_params(8, 16, 3, cfg, torch.Generator().manual_seed(0), "cpu")
    y = photometric(x, p, cfg)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    factor = p.color.values["contrast"].flatten()
    assert torch.allclose(y.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)) * factor, rtol=1e-4)


def test_each_photometric_step_applies_to_about_its_share_of_the_patches() -> None:
    p = 0.3
    cfg = AugmentConfig(
        color_p=p,
        hed_p=p,
        haematoxylin_gain_p=p,
        nucleus_fade_p=p,
        blur_p=p,
        sharpen_p=p,
        noise_p=p,
    )
    params = draw_params(400, 8, 3, cfg, torch.Generator().manual_seed(0), "cpu")
    for step in ("fade", "gain", "hed", "color", "blur", "sharpen", "noise"):
        share = len(getattr(params, step).index) / 400
        assert abs(share - p) < 0.08, step
