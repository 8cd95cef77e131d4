import warnings

import numpy as np
import pytest

from mlseg.dataset import (
    dataset_fingerprint,
    init_dataset,
    list_pairs,
    list_split,
    mask_kind,
    mask_to_labels,
    pixels_fingerprint,
    split_pixel_sizes,
)
from mlseg.errors import ConfigError, DatasetError
from mlseg.io import read_mask, write_image


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


def test_init_readme_names_the_config_a_custom_layout_needs(tmp_path):
    """`mlseg validate DIR` alone looks for train/original/ and *_mask: on a layout from the
    config it failed image_folder_exists and mask_naming on a correctly filled dataset."""
    from mlseg.config import DataConfig

    assert "validate" in (init_dataset(tmp_path / "a") / "README.md").read_text()
    assert "--config" not in (tmp_path / "a" / "README.md").read_text()
    root = init_dataset(tmp_path / "b", DataConfig(image_dir="img", mask_suffix="_seg"))
    assert f"mlseg validate {root} --config <your config>" in (root / "README.md").read_text()


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


@pytest.mark.parametrize(
    "header",
    ["split, stem, pixel_size_um", "Split,Stem,Pixel_Size_um", "\ufeffsplit,stem,pixel_size_um"],
)
def test_a_manifest_written_with_spaces_or_capitals_keeps_its_pixel_sizes(tmp_path, header):
    """The README writes the manifest's columns as ``split, stem, pixel_size_um``: a lab that
    wrote the header so (or with capitals, as a spreadsheet does) had every size ignored."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "007")
    sep = ", " if ", " in header else ","
    rows = [header, sep.join(["train", "007", "0.25"]), sep.join(["train ", " 008 ", " 0.5 "])]
    (root / "manifest.csv").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    assert list_pairs(root, "train")[0].pixel_size_um == 0.25
    assert split_pixel_sizes(root, "train") == {"007": 0.25, "008": 0.5}


def test_a_manifest_keeps_the_sizes_of_images_named_as_pandas_missing_values(tmp_path):
    """A manifest row for an image named NA or None named no image (pandas read the stem as
    a missing value): the image had no pixel size and validation stopped training."""
    root = init_dataset(tmp_path / "ds")
    for stem in ("NA", "None"):
        make_pair(root, "train", stem)
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\ntrain,NA,0.25\ntrain,None,NA\n")
    assert split_pixel_sizes(root, "train") == {"NA": 0.25}
    assert [(p.stem, p.pixel_size_um) for p in list_pairs(root, "train")] == [
        ("NA", 0.25),
        ("None", None),
    ]


@pytest.mark.parametrize("size", ["0.25", "0,25"])
def test_a_manifest_saved_by_a_spreadsheet_with_semicolons_keeps_its_pixel_sizes(tmp_path, size):
    """European Excel saves CSV with semicolons and decimal commas: the sizes were all ignored
    (validate passed, every image 'unknown'), or with ``0,25`` refused with the advice to
    separate the columns with semicolons, which they were."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    rows = ["\ufeffsplit;stem;pixel_size_um", f"train;a;{size}", "test;b;0,5"]
    (root / "manifest.csv").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    assert list_pairs(root, "train")[0].pixel_size_um == 0.25
    assert split_pixel_sizes(root, "test") == {"b": 0.5}


@pytest.mark.parametrize("column", ["mpp", "MPP", "microns_per_pixel"])
def test_a_manifest_with_a_pixel_size_column_ingest_reads_keeps_its_pixel_sizes(tmp_path, column):
    """``mlseg ingest --pixel-sizes`` reads an ``mpp`` column: the same column in the
    manifest was ignored without a word, every image's size unknown (decimal commas too)."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    (root / "manifest.csv").write_text(f"split;stem;{column}\ntrain;a;0,25\ntest;b;0.5\n")
    assert list_pairs(root, "train")[0].pixel_size_um == 0.25
    assert split_pixel_sizes(root, "test") == {"b": 0.5}


@pytest.mark.parametrize("column", ["pixel_size", "pixel size (um)", "Microns"])
def test_a_manifest_pixel_size_column_under_a_name_not_read_is_named(tmp_path, column):
    """A pixel-size column under a name mlseg does not read left every size unknown unsaid."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    (root / "manifest.csv").write_text(f'split,stem,"{column}"\ntrain,a,0.25\n')
    with pytest.warns(UserWarning) as caught:
        (pair,) = list_pairs(root, "train")
    said = str(caught[0].message)
    assert pair.pixel_size_um is None
    assert f"{root / 'manifest.csv'}: column(s) {column.lower()!r} are not read" in said
    assert "name the column pixel_size_um" in said


def test_a_manifest_without_a_pixel_size_column_says_nothing(tmp_path):
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    (root / "manifest.csv").write_text("split,stem,image,pixel_size_source\ntrain,a,x.png,\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_pairs(root, "train")[0].pixel_size_um is None


def test_a_manifest_size_another_scale_than_the_images_own_is_named(tmp_path):
    """The manifest's 0.25 um overruled a sidecar's 0.5 um (another magnification) without a
    word; a size within SAME_SCALE_RATIO of the file's (two scanners' 40x) is no mistake."""
    import json

    root = init_dataset(tmp_path / "ds")
    for stem, declared in (("a", 0.5), ("b", 0.26)):
        make_pair(root, "train", stem)
        sidecar = root / "train" / "original" / f"{stem}.json"
        sidecar.write_text(json.dumps({"PixelSize": [declared, declared], "PixelSizeUnits": "um"}))
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\ntrain,a,0.25\ntrain,b,0.25\n")
    with pytest.warns(UserWarning) as caught:
        pairs = list_pairs(root, "train")
    assert [p.pixel_size_um for p in pairs] == [0.25, 0.25]
    said = " | ".join(str(w.message) for w in caught)
    assert f"1 image(s) declare another pixel size than {root / 'manifest.csv'}" in said
    assert f"{root / 'train' / 'original' / 'a.png'}: 0.5 um in its file, 0.25 in the" in said
    assert "the manifest's is used" in said and "b.png" not in said


@pytest.mark.parametrize("image_form, mask_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_names_with_accents_composed_or_not_are_one_name(tmp_path, image_form, mask_form):
    """macOS may write an accent apart from its letter (NFD), Windows and Linux as one (NFC):
    on a Mac's disk the two are one name, but here the mask and the manifest row of an image
    so named on another machine matched nothing ('no mask', 'mask without image'). Either
    may be the image's: its stem is the composed name."""
    import unicodedata

    image, mask = (unicodedata.normalize(f, "Zürich_é") for f in (image_form, mask_form))
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", image, mask_name=f"{mask}_mask.png")
    (root / "manifest.csv").write_text(f"split,stem,pixel_size_um\ntrain,{mask},0.25\n")
    (pair,) = list_pairs(root, "train")
    nfc = unicodedata.normalize("NFC", image)
    assert (pair.stem, pair.image.name, pair.mask.name) == (nfc, f"{image}.png", f"{mask}_mask.png")
    assert pair.pixel_size_um == 0.25


def test_a_manifest_giving_one_image_two_pixel_sizes_is_refused_naming_both_lines(tmp_path):
    """The later row won without a word (and mlseg validate passed); the ingest tables refuse
    the same. One size written twice is one size."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    rows = "split,stem,pixel_size_um\ntrain,a,0.5\ntest,a,0.25\ntrain,a,0.50\n"
    (root / "manifest.csv").write_text(rows)
    assert list_pairs(root, "train")[0].pixel_size_um == 0.5
    (root / "manifest.csv").write_text(rows + "train,a,0.25\n")
    with pytest.raises(
        DatasetError, match=r"train/a is listed twice, at 0.5 \(line 2\) and 0.25 \(line 5\)"
    ):
        list_pairs(root, "train")


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


def test_a_link_to_a_share_not_mounted_is_named_as_such_not_as_a_missing_file(tmp_path):
    """Training skipped an image or mask that is a broken link and then said its partner had
    no image ('mask without image; expected .../b.<ext>') or no mask, while ls showed both."""
    root = init_dataset(tmp_path / "ds")
    for stem in ("a", "b", "c"):
        make_pair(root, "train", stem)
    image = root / "train" / "original" / "b.png"
    mask = root / "train" / "masks" / "c_mask.png"
    for path in (image, mask):
        path.unlink()
        path.symlink_to(tmp_path / "share" / path.name)
    with pytest.raises(DatasetError) as err:
        list_pairs(root, "train")
    msg = str(err.value)
    assert msg.startswith("2 dataset problem")
    assert f"{image}: a link to {tmp_path / 'share' / 'b.png'}, which is missing" in msg
    assert f"{mask}: a link to {tmp_path / 'share' / 'c_mask.png'}, which is missing" in msg
    assert "mount the share" in msg
    assert "mask without image" not in msg and "no mask" not in msg
    # a folder named as an image is no link: left out, as validation leaves it out
    image.unlink()
    mask.unlink()
    make_pair(root, "train", "c")
    (root / "train" / "masks" / "b_mask.png").unlink()
    image.mkdir()
    assert [p.image.name for p in list_pairs(root, "train")] == ["a.png", "c.png"]


def test_files_a_mac_or_windows_hides_are_no_part_of_the_dataset(tmp_path):
    """A zip made on a Mac leaves ``._a.png`` (AppleDouble metadata, no image) beside each
    file: hidden files are neither images nor masks to pair."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    for sub, name in (("original", "._a.png"), ("masks", "._a_mask.png"), ("masks", ".b.png")):
        (root / "train" / sub / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (pair,) = list_pairs(root, "train")
    assert (pair.image.name, pair.mask.name) == ("a.png", "a_mask.png")


def test_non_strict_allows_unlabelled_images(tmp_path):
    root = init_dataset(tmp_path / "ds")
    write_image(root / "test" / "original" / "new.png", np.zeros((4, 4, 3), np.uint8))
    (pair,) = list_pairs(root, "test", strict=False)
    assert pair.mask is None


def test_every_jpeg_mask_is_named_before_any_image_is_decoded(tmp_path):
    """A mask saved as JPEG was paired, and training decoded the images until the first
    such mask's read refused it: one file named per run, after minutes of decoding on a
    large set. The listing names each, with the other problems; evaluation's listing still
    pairs it (and refuses it, see test_evaluate)."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    for stem, ext in (("b", ".jpg"), ("c", ".JPEG")):
        make_pair(root, "train", stem, mask_name=f"{stem}_mask.png")
        png = root / "train" / "masks" / f"{stem}_mask.png"
        png.rename(png.with_suffix(ext))
    with pytest.raises(DatasetError) as err:
        list_pairs(root, "train")
    assert "2 dataset problem(s)" in str(err.value)
    for name in ("b_mask.jpg", "c_mask.JPEG"):
        assert f"{root / 'train' / 'masks' / name}: a mask must be lossless" in str(err.value)
    listed = {p.stem: p.mask.name for p in list_pairs(root, "train", strict=False)}
    assert listed == {"a": "a_mask.png", "b": "b_mask.jpg", "c": "c_mask.JPEG"}


def test_non_strict_listing_names_the_masks_no_pair_took(tmp_path):
    """Without ``strict`` an orphan mask, or an image's second mask, was dropped without a
    word; the listing names each, pairing exactly as ``strict`` does (``x.ome_mask`` is
    ``x.ome.tif``'s, ``.TIFF`` and ``.tiff`` are TIFFs, hidden files and names without the
    exact suffix are no masks)."""
    root = init_dataset(tmp_path / "ds")
    img, msk = root / "test" / "original", root / "test" / "masks"
    for name in ("a.png", "b.ome.tif", "c.TIF", "d.png"):
        write_image(img / name, np.zeros((4, 4, 3), np.uint8))
    masks = [
        "a_mask.png",
        "a_mask.tif",  # a's second mask: sorts last, so a is paired with it
        "b.ome_mask.tif",
        "c_mask.TIFF",
        "e_mask.png",  # orphans, both: no second mask of an image
        "e_mask.tif",
        "f.ome_mask.png",  # orphan, f.ome.tif's name
        "d_MASK.png",  # no mask: the suffix is _mask
        "d-mask.png",
        "._a_mask.png",  # hidden
    ]
    for name in masks:
        write_image(msk / name, np.zeros((4, 4), np.uint8))
    listing = list_split(root, "test", strict=False)
    assert listing.pairs == list_pairs(root, "test", strict=False)
    assert {p.stem: p.mask and p.mask.name for p in listing.pairs} == {
        "a": "a_mask.tif",
        "b": "b.ome_mask.tif",
        "c": "c_mask.TIFF",
        "d": None,
    }
    assert [p.name for p in listing.orphan_masks] == ["e_mask.png", "e_mask.tif", "f.ome_mask.png"]
    assert listing.second_masks == {msk / "a_mask.png": msk / "a_mask.tif"}
    # strict names the same files as problems: one matching serves both
    with pytest.raises(DatasetError) as err:
        list_pairs(root, "test")
    said = str(err.value)
    assert "a_mask.tif: a second mask for 'a' (also a_mask.png)" in said
    for name in ("e_mask.tif", "f.ome_mask.png"):
        assert f"{name}: mask without image" in said
    clean = list_split(init_dataset(tmp_path / "clean"), "test", strict=False)
    assert (clean.pairs, clean.orphan_masks, clean.second_masks) == ([], [], {})


def test_missing_split_folder_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="mlseg init"):
        list_pairs(tmp_path, "train")


@pytest.mark.parametrize("split", ["val", "Train"])
def test_a_split_other_than_train_or_test_is_refused_not_read_as_test(tmp_path, split):
    """ "val" read the test folder's pairs, named as the split asked for."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "test", "a")
    with pytest.raises(ConfigError, match=rf"split must be train or test, got '{split}'"):
        list_pairs(root, split)


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


def test_mask_kind_counts_distinct_non_zero_values_as_a_sort_would(shared_data):
    """A mask is binary where it holds at most one non-zero value, whatever the value, the
    dtype or where the values lie: the same answer as counting ``np.unique``'s values, on
    small cases and on every real mask, as it is and made binary."""

    def by_sorting(mask):
        values = np.unique(mask)
        return "binary" if values[values != 0].size <= 1 else "instance"

    cases = [np.zeros((4, 4), np.uint8), np.zeros((0, 3), np.int32), np.full((3, 3), 7, np.int32)]
    cases += [np.array([[0, -1], [-1, 0]], np.int8), np.array([[0, -1], [2, 0]], np.int8)]
    cases += [np.array([[255, 0], [0, 254]], np.uint8), np.array([[0, 0], [0, 65535]], np.uint16)]
    masks = sorted(shared_data.glob("*/masks/*_mask.png"))[::4]
    for path in masks:
        mask = read_mask(path)
        cases += [mask, np.where(mask > 0, 255, 0).astype(np.uint8)]
    assert len(masks) >= 20
    for mask in cases:
        assert mask_kind(mask) == by_sorting(mask), (mask.dtype, mask.shape)


def test_a_binary_nucleus_whose_pixels_touch_at_corners_is_one_nucleus():
    """Binary masks are split into 8-connected components, as the contract says: a nucleus
    outlined in steps (pixels joined at their corners) is one nucleus, not one per step."""
    binary = np.zeros((8, 8), np.uint8)
    binary[1:3, 1:3] = binary[3:5, 3:5] = binary[5:7, 5:7] = 255
    assert set(np.unique(mask_to_labels(binary))) == {0, 1}


def test_the_dataset_fingerprint_follows_names_and_masks_not_listing_order(tmp_path):
    """The training data's identity: a corrected mask or a renamed image changes it, the
    order the pairs are listed in does not."""
    root = init_dataset(tmp_path / "ds")
    for stem in ("a", "b"):
        make_pair(root, "train", stem)
    write_image(root / "train" / "original" / "b.png", np.full((16, 20, 3), 9, np.uint8))
    pairs = list_pairs(root, "train")
    before = dataset_fingerprint(pairs)
    assert dataset_fingerprint(pairs[::-1]) == before
    assert pixels_fingerprint(pairs[::-1]) == pixels_fingerprint(pairs)
    mask = root / "train" / "masks" / "b_mask.png"
    write_image(mask, (read_mask(mask) == 0).astype(np.uint16))  # corrected
    assert dataset_fingerprint(list_pairs(root, "train")) != before
    for sub, name in (("original", "{}.png"), ("masks", "{}_mask.png")):
        (root / "train" / sub / name.format("a")).rename(root / "train" / sub / name.format("a1"))
    renamed = list_pairs(root, "train")
    write_image(mask, (read_mask(mask) == 0).astype(np.uint16))  # as it was
    assert [p.stem for p in renamed] == ["a1", "b"] and dataset_fingerprint(renamed) != before


def test_the_dataset_fingerprint_follows_declared_pixel_sizes(tmp_path):
    """Training resamples by the pixel sizes the images declare, yet two trainings on the
    same files with other sizes (a corrected manifest.csv, a sidecar added) got one
    fingerprint, so the registry said they trained on the same data. A set declaring no size
    keeps the fingerprint it had (names and bytes alone), and a size is its value, whatever
    file declares it."""
    import hashlib
    import json

    root = init_dataset(tmp_path / "ds")
    for stem in ("a", "b"):
        make_pair(root, "train", stem)
    pairs = list_pairs(root, "train")
    files = hashlib.sha256()
    for pair in pairs:
        for path in (pair.image, pair.mask):
            files.update(f"train/{path.name}\0".encode() + path.read_bytes())
    plain = dataset_fingerprint(pairs)
    assert plain == files.hexdigest()[:16]  # as registries before sizes counted hold it
    manifest = root / "manifest.csv"
    seen = {plain}
    for sizes in ("0.25,0.25", "0.5,0.5", "0.25,"):
        a, b = sizes.split(",")
        manifest.write_text(f"split,stem,pixel_size_um\ntrain,a,{a}\ntrain,b,{b}\n")
        pairs = list_pairs(root, "train")
        fingerprint = dataset_fingerprint(pairs)
        assert fingerprint not in seen, sizes
        seen.add(fingerprint)
        assert dataset_fingerprint(pairs, pixel_sizes=False) == plain
    manifest.unlink()
    (root / "train" / "original" / "a.json").write_text(
        json.dumps({"PixelSize": [250, 250], "PixelSizeUnits": "nm"})
    )
    assert dataset_fingerprint(list_pairs(root, "train")) == fingerprint  # 0.25 um, for a only


def test_one_nucleus_keeps_its_id():
    """A tile of a slide's label image (global ids) holding one nucleus is measured under
    that nucleus's id, as a tile holding two is; a binary export's one blob is nucleus 1."""
    one = np.zeros((10, 10), np.uint32)
    one[2:6, 2:6] = 123458
    assert set(np.unique(mask_to_labels(one))) == {0, 123458}
    for export in (255, 65535):
        assert set(np.unique(mask_to_labels(np.where(one > 0, export, 0)))) == {0, 1}
    two_pieces = one.copy()
    two_pieces[8:, 8:] = 123458  # one value in two pieces: a binary mask's two nuclei
    assert set(np.unique(mask_to_labels(two_pieces))) == {0, 1, 2}


@pytest.mark.parametrize(
    "mask_name", ["x_mask.tif", "x_mask.ome.tif", "x.ome_mask.tif", "x_mask.OME.TIFF"]
)
def test_ome_tiff_pairs_as_one_extension(tmp_path, mask_name):
    """``x.ome.tif`` (as Bio-Formats, QuPath and Fiji write it) is image ``x``: it pairs with
    ``x_mask.tif``, an OME-TIFF mask, and the ``x.ome_mask.tif`` that paired before."""
    root = init_dataset(tmp_path / "ds")
    write_image(root / "train" / "original" / "x.ome.tif", np.zeros((8, 8, 3), np.uint8))
    write_image(root / "train" / "masks" / mask_name, np.ones((8, 8), np.uint8))
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\ntrain,x,0.25\n")
    (pair,) = list_pairs(root, "train")
    assert (pair.stem, pair.image.name, pair.mask.name) == ("x", "x.ome.tif", mask_name)
    assert pair.pixel_size_um == 0.25


def test_image_and_ome_tiff_of_one_stem_refused_naming_both(tmp_path):
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    write_image(root / "train" / "original" / "a.ome.tif", np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        list_pairs(root, "train")
    assert "a.ome.tif" in str(err.value) and "a.png" in str(err.value)


def test_second_mask_for_an_ome_tiff_refused_naming_both(tmp_path):
    root = init_dataset(tmp_path / "ds")
    write_image(root / "train" / "original" / "x.ome.tif", np.zeros((8, 8, 3), np.uint8))
    write_image(root / "train" / "masks" / "x_mask.tif", np.ones((8, 8), np.uint8))
    write_image(root / "train" / "masks" / "x.ome_mask.tif", np.ones((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="second mask") as err:
        list_pairs(root, "train")
    assert "x_mask.tif" in str(err.value) and "x.ome_mask.tif" in str(err.value)


def test_a_manifest_saved_in_a_legacy_code_page_names_its_line_and_the_fix(tmp_path):
    """A ``µm`` note in a manifest that Excel saved as plain "CSV" (Windows-1252) was refused
    with pandas' byte offset ("position 0"), not the line or how to save it."""
    root = init_dataset(tmp_path / "ds")
    make_pair(root, "train", "a")
    rows = ["split,stem,pixel_size_um,note", "train,a,0.25,1 px = 0.25 µm"]
    (root / "manifest.csv").write_bytes("\r\n".join(rows).encode("cp1252"))
    with pytest.raises(
        DatasetError,
        match=r"manifest\.csv: line 2 is not UTF-8 text \(byte 0xb5, 'µ' in Windows-1252\); "
        r"save it as 'CSV UTF-8'",
    ):
        list_pairs(root, "train")
