"""The synthetic generator: deterministic, correct instance masks, stains that deconvolve."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hed, rgb_from_hed
from skimage.measure import label as connected

import mlseg.synth as synth
from mlseg.config import DataConfig, get_profile
from mlseg.dataset import list_pairs
from mlseg.errors import ConfigError, DatasetError
from mlseg.io import read_image, read_mask
from mlseg.synth import KINDS, MIN_NUCLEUS_PX, make_dataset, synth_pair


def pair(kind: str, seed: int, size=96, **kw):
    return synth_pair(kind, size, np.random.default_rng(seed), **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes_other_seed_differs(kind):
    img_a, lab_a, info_a = pair(kind, 3)
    img_b, lab_b, info_b = pair(kind, 3)
    assert img_a.tobytes() == img_b.tobytes() and lab_a.tobytes() == lab_b.tobytes()
    assert info_a == info_b
    img_c, lab_c, _ = pair(kind, 4)
    assert img_a.tobytes() != img_c.tobytes() and lab_a.tobytes() != lab_c.tobytes()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [96, (80, 112), 24])
def test_every_label_is_one_connected_object(kind, size):
    for seed in range(3):
        img, labels, info = pair(kind, seed, size=size, nuclei_density=0.35)
        shape = (size, size) if isinstance(size, int) else size
        assert img.shape == (*shape, 3) and img.dtype == np.uint8
        assert labels.shape == shape and labels.dtype == np.int32
        n = info["n_nuclei"]
        assert np.array_equal(np.unique(labels), np.arange(n + 1)), "labels are not 0..N"
        # 4-connected components of equal values: exactly one per label
        assert connected(labels, connectivity=1, background=0).max() == n
        areas = np.bincount(labels.ravel())[1:]
        assert (areas >= MIN_NUCLEUS_PX).all()


def test_dense_images_have_touching_nuclei_of_varied_size():
    touching, diameters = 0, []
    for seed in range(3):
        _, labels, info = pair("he", seed, size=128, nuclei_density=0.3)
        a, b = labels[:, 1:], labels[:, :-1]
        touching += int(((a != b) & (a > 0) & (b > 0)).sum())
        areas = np.bincount(labels.ravel())[1:]
        diameters.extend(2 * np.sqrt(areas / np.pi))
        assert 8 < info["mean_diameter_px"] < 16
    assert touching > 0, "no two nuclei touch: instance separation would never be exercised"
    assert np.percentile(diameters, 90) > 1.4 * np.percentile(diameters, 10)


def test_mean_diameter_and_density_are_followed():
    _, small, info_s = pair("fluorescence", 0, size=160, mean_diameter_px=8)
    _, large, info_l = pair("fluorescence", 0, size=160, mean_diameter_px=20)
    assert info_s["mean_diameter_px"] < 10 < 16 < info_l["mean_diameter_px"]
    _, sparse, _ = pair("he", 1, size=160, nuclei_density=0.05)
    _, dense, _ = pair("he", 1, size=160, nuclei_density=0.4)
    assert (sparse > 0).mean() < 0.12 < 0.2 < (dense > 0).mean()


def test_he_nuclei_deconvolve_to_haematoxylin_and_stroma_to_eosin():
    for seed in range(3):
        img, labels, _ = pair("he", seed, size=128)
        hed = rgb2hed(img)
        nuc, bg = labels > 0, labels == 0
        assert hed[..., 0][nuc].mean() > 2 * hed[..., 0][bg].mean()
        assert hed[..., 1][bg].mean() > hed[..., 1][nuc].mean()


def _mean_dab_od(img: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean nuclear DAB optical density (log10) by colour deconvolution, per label 1..n."""
    od = -np.log10(np.maximum(img.astype(np.float64), 1.0) / 255.0)
    dab = (od.reshape(-1, 3) @ np.linalg.inv(rgb_from_hed))[:, 2]
    sums = np.bincount(labels.ravel(), dab, minlength=n + 1)[1:]
    return sums / np.bincount(labels.ravel(), minlength=n + 1)[1:]


def test_ihc_positives_have_more_dab_and_grades_match_profile_thresholds():
    thresholds = get_profile("ihc").dab_thresholds
    agree = total = 0
    for seed in range(4):
        img, labels, info = pair("ihc", seed, size=128)
        n = info["n_nuclei"]
        assert set(info["dab_class"]) == set(range(1, n + 1))
        positive = np.isin(labels, info["positive_labels"])
        negative = (labels > 0) & ~positive
        assert positive.any() and negative.any()
        dab = rgb2hed(img)[..., 2]
        assert dab[positive].mean() > 3 * dab[negative].mean()
        measured = np.searchsorted(thresholds, _mean_dab_od(img, labels, n), side="right")
        truth = np.array([info["dab_class"][lab] for lab in range(1, n + 1)])
        agree += int((measured == truth).sum())
        total += n
    assert agree / total > 0.9, f"only {agree}/{total} nuclei graded as generated"


def test_fluorescence_bright_nuclei_on_dark_grey_or_blue_background():
    for seed in range(4):
        img, labels, info = pair("fluorescence", seed, size=128)
        assert info["dab_class"] == {} and info["positive_labels"] == []
        value = img.max(axis=-1).astype(float)
        assert value[labels > 0].mean() > 2.5 * value[labels == 0].mean()
        r, g, b = (img[..., c].astype(int) for c in range(3))
        assert (r <= b + 2).all() and (g <= b + 2).all(), "fluorescence must be grey or blue"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        pair("pas", 0)
    with pytest.raises(ValueError, match="size"):
        synth_pair("he", 8, np.random.default_rng(0))


def test_make_dataset_writes_contract_layout_and_manifest(tmp_path):
    root = make_dataset(tmp_path / "ds", n_train=4, n_test=3, size=64, seed=7, pixel_size_um=0.5)
    manifest = pd.read_csv(root / "manifest.csv", dtype={"stem": str})
    assert list(manifest.columns) == list(synth.MANIFEST_COLUMNS)
    assert manifest["stem"].is_unique and len(manifest) == 7
    assert list(manifest["kind"][:3]) == list(KINDS)
    assert manifest["stem"].str.fullmatch(r"(he|ihc|fluorescence)_\d{3}").all()
    for split, n in (("train", 4), ("test", 3)):
        pairs = list_pairs(root, split)  # strict: every image has its mask
        assert len(pairs) == n and all(p.pixel_size_um == 0.5 for p in pairs)
        for p in pairs:
            row = manifest[(manifest.split == split) & (manifest.stem == p.stem)].iloc[0]
            assert p.mask.name == f"{p.stem}_mask.png" and p.image == root / row["image"]
            labels = read_mask(p.mask)
            assert read_image(p.image).shape == (64, 64, 3)
            assert labels.max() == row["n_nuclei"]
    assert not list(tmp_path.glob(".ds.*")), "temporary folder left behind"


def test_make_dataset_is_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=2, n_test=1, size=48, seed=1)
    b = make_dataset(tmp_path / "b", n_train=2, n_test=1, size=48, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    # the README names its own folder, not the temporary one it was written in
    assert f"mlseg validate {a}`" in (a / "README.md").read_text()
    assert (a / "README.md").read_text().replace(str(a), str(b)) == (b / "README.md").read_text()
    # more training images leave the test image's pixels as they were (its stem numbers on)
    c = make_dataset(tmp_path / "c", n_train=4, n_test=1, size=48, seed=1)
    assert (c / "test/original/he_002.png").read_bytes() == (
        a / "test/original/he_001.png"
    ).read_bytes()


def test_make_dataset_follows_a_custom_layout(tmp_path):
    cfg = DataConfig(train_dir="tr", image_dir="images", mask_dir="labels", mask_suffix="_lbl")
    root = make_dataset(tmp_path / "ds", n_train=2, n_test=1, size=32, cfg=cfg, pixel_size_um=None)
    pairs = list_pairs(root, "train", cfg)
    assert [p.mask.name for p in pairs] == ["he_000_lbl.png", "ihc_000_lbl.png"]
    assert all(p.pixel_size_um is None for p in pairs)
    assert (root / "test" / "images" / "he_001.png").is_file()


def test_make_dataset_refuses_non_empty_folder_but_takes_empty_one(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        make_dataset(tmp_path / "full", n_train=1, n_test=0, size=32)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    root = make_dataset(tmp_path / "empty", n_train=1, n_test=1, size=32)
    assert (root / "manifest.csv").is_file()
    with pytest.raises(ConfigError, match="kinds"):
        make_dataset(tmp_path / "x", n_train=1, kinds=("he", "pas"))


def test_make_dataset_leaves_nothing_behind_when_it_fails(tmp_path, monkeypatch):
    real, calls = synth.synth_pair, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "synth_pair", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_dataset(tmp_path / "ds", n_train=4, n_test=2, size=32)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []
