import numpy as np
import pytest

from mlseg.dataset import init_dataset, list_pairs, mask_kind, mask_to_labels
from mlseg.errors import DatasetError
from mlseg.io import write_image


def make_pair(root, split, stem, size=(16, 20), mask_name=None):
    img = np.zeros((*size, 3), np.uint8)
    mask = np.zeros(size, np.uint16)
    mask[2:6, 2:6] = 1
    write_image(root / split / "original" / f"{stem}.png", img)
    write_image(root / split / "masks" / (mask_name or f"{stem}_mask.png"), mask)


def test_init_scaffolds_layout_and_readme(tmp_path):
    root = init_dataset(tmp_path / "ds")
    for split in ("train", "test"):
        assert (root / split / "original").is_dir() and (root / split / "masks").is_dir()
    assert "_mask" in (root / "README.md").read_text()


def test_init_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        init_dataset(tmp_path)
    assert (tmp_path / "x.txt").read_text() == "keep me"


def test_pairs_sorted_with_pixel_size_from_manifest(tmp_path):
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "b")
    make_pair(root, "train", "a")
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\ntrain,a,0.25\ntrain,b,\n")
    pairs = list_pairs(root, "train")
    assert [p.stem for p in pairs] == ["a", "b"]
    assert pairs[0].pixel_size_um == 0.25 and pairs[1].pixel_size_um is None


def test_every_problem_reported_with_file_names(tmp_path):
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "ok")
    write_image(root / "train" / "original" / "lonely.png", np.zeros((4, 4, 3), np.uint8))
    write_image(root / "train" / "masks" / "orphan_mask.png", np.zeros((4, 4), np.uint8))
    write_image(root / "train" / "masks" / "bad-mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError) as err:
        list_pairs(root, "train")
    msg = str(err.value)
    assert "3 dataset problem" in msg
    assert "lonely.png: no mask" in msg and "orphan_mask.png: mask without image" in msg
    assert "bad-mask.png" in msg


def test_non_strict_allows_unlabelled_images(tmp_path):
    root = init_dataset(tmp_path / "ds")
    write_image(root / "test" / "original" / "new.png", np.zeros((4, 4, 3), np.uint8))
    (pair,) = list_pairs(root, "test", strict=False)
    assert pair.mask is None


def test_missing_split_folder_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="mlseg init"):
        list_pairs(tmp_path, "train")


def test_mask_kinds_and_labels():
    binary = np.zeros((10, 10), np.int32)
    binary[1:3, 1:3] = 255
    binary[6:9, 6:9] = 255
    assert mask_kind(binary) == "binary"
    labels = mask_to_labels(binary)
    assert labels.max() == 2 and labels.dtype == np.int32
    inst = binary.copy()
    inst[6:9, 6:9] = 7
    assert mask_kind(inst) == "instance"
    assert set(np.unique(mask_to_labels(inst))) == {0, 7, 255}
