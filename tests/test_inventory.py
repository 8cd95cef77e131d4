"""The inventory: facts per file, the pure statistics, parallel reading, the fingerprint."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from mlseg.config import DataConfig
from mlseg.dataset import list_pairs, list_split
from mlseg.errors import DatasetError
from mlseg.inventory import (
    FILE_COLUMNS,
    STAT_COLUMNS,
    ValidateConfig,
    build_inventory,
    check_output_dir,
    content_hash,
    fingerprint,
    image_stats,
    mask_shape,
    mask_stats,
    mask_values_valid,
)
from mlseg.io import write_image, write_labels

# ------------------------------------------------------------------ pure statistics


def test_image_stats_constant_image_has_no_texture():
    stats = image_stats(np.zeros((40, 50, 3), np.uint8))
    assert set(stats) == set(STAT_COLUMNS)
    assert stats["grey_std"] == 0 and stats["laplacian_var"] == 0
    assert stats["dark_fraction"] == 1.0 and stats["saturated_fraction"] == 0.0


def test_image_stats_saturation_and_grey_channels():
    image = np.zeros((32, 32, 1), np.uint8)
    image[:16] = 255
    stats = image_stats(image)
    assert stats["saturated_fraction"] == pytest.approx(0.5)
    assert stats["mean_c0"] == pytest.approx(0.5)
    assert np.isnan(stats["mean_c1"]) and np.isnan(stats["od_hematoxylin_mean"])


@pytest.mark.parametrize("colour", [(0, 0, 1), (0, 1, 1), (1, 1, 1)], ids=["blue", "cyan", "grey"])
def test_a_dapi_image_shown_in_a_colour_has_the_sharpness_of_its_grey_file(colour):
    """DAPI saved as blue RGB was judged by its luminance, 0.114 of its signal: 42 of DSB
    2018's 53 sharp fluorescence tiles, saved so, failed `not_blurred` (variance >= 4)."""
    rng = np.random.default_rng(4)
    grey = rng.normal(10, 2, (64, 64))
    for y, x in rng.integers(8, 56, (12, 2)):
        cv2.circle(grey, (int(x), int(y)), 5, 120, -1)
    grey = cv2.GaussianBlur(np.clip(grey, 0, 255).astype(np.uint8), (0, 0), 1.5)[..., None]
    shown = grey * np.array(colour, np.uint8)
    want, got = image_stats(grey), image_stats(shown)
    for key in ("grey_std", "laplacian_var", "dark_fraction"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["laplacian_var"] >= 4


@pytest.mark.parametrize("bits", [16, 14, 12, 10])
def test_image_stats_are_bit_depth_independent(nuclei_pair, bits):
    """The same picture from a 10-16-bit camera, saved as a 16-bit file, has 8-bit statistics."""
    rng = np.random.default_rng(1)
    image8, _ = nuclei_pair(rng, 64)
    image8[0, :5] = 255  # a few saturated pixels
    image16 = np.round(image8 * ((2**bits - 1) / 255)).astype(np.uint16)
    s8, s16 = image_stats(image8), image_stats(image16)
    for key in ("mean_c0", "std_c2", "grey_std", "laplacian_var", "od_hematoxylin_mean"):
        assert s16[key] == pytest.approx(s8[key], rel=0.02, abs=1e-3), key
    assert s16["saturated_fraction"] == s8["saturated_fraction"] > 0


def test_colour_deconvolution_separates_haematoxylin_from_eosin():
    from skimage.color import hed2rgb

    hed = np.zeros((16, 16, 3))
    hed[:8, :, 0] = 0.05  # top: haematoxylin only (skimage units; 0.05 stays unclipped)
    hed[8:, :, 1] = 0.05  # bottom: eosin only
    rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8)
    top, bottom = image_stats(rgb[:8]), image_stats(rgb[8:])
    assert top["od_hematoxylin_mean"] > 5 * top["od_eosin_mean"]
    assert bottom["od_eosin_mean"] > 5 * bottom["od_hematoxylin_mean"]
    assert max(top["od_dab_mean"], bottom["od_dab_mean"]) < 0.1


def test_blur_lowers_laplacian_variance(nuclei_pair):
    import cv2

    image, _ = nuclei_pair(np.random.default_rng(2), 96)
    blurred = cv2.GaussianBlur(image, (0, 0), 3)
    assert image_stats(blurred)["laplacian_var"] < 0.2 * image_stats(image)["laplacian_var"]


@pytest.mark.parametrize(
    ("values", "declared", "ok"),
    [
        ([0, 1], "binary", True),
        ([0, 255], "binary", True),
        ([0], "binary", True),
        ([0, 3, 7], "binary", False),
        ([0, 1, 255], "binary", False),
        ([0, 3, 7], "instance", True),
        ([0, 255], "instance", False),
        ([0, 3, 7], "auto", True),
    ],
)
def test_mask_values_for_declared_kind(values, declared, ok):
    assert mask_values_valid(np.array(values), declared) is ok


def test_mask_stats_counts_labels_and_foreground():
    mask = np.zeros((10, 10), np.uint16)
    mask[:5, :2] = 3
    mask[5:, 8:] = 700
    stats = mask_stats(mask, "binary")
    assert stats["mask_kind"] == "instance" and stats["mask_labels"] == 2
    assert stats["mask_max_value"] == 700
    assert stats["foreground_fraction"] == pytest.approx(0.2)
    assert stats["mask_values_ok"] is False
    assert mask_stats(np.zeros((4, 4), np.uint8))["mask_kind"] == "binary"


def test_mask_shape_tells_filled_nuclei_from_outlines_and_a_labelled_background():
    from skimage.draw import disk

    filled = np.zeros((64, 64), np.uint8)
    for i, centre in enumerate([(16, 16), (16, 46), (46, 30)], start=1):
        filled[disk(centre, 7, shape=filled.shape)] = i
    outline = filled * (filled != cv2.erode(filled, np.ones((3, 3), np.uint8)))
    tiny = np.zeros((64, 64), np.uint8)
    tiny[disk((30, 30), 3)] = 1  # 29 px: too few to tell
    shape = {
        name: mask_shape(m, binary=m.max() <= 1)
        for name, m in [("filled", filled), ("outline", outline), ("tiny", tiny)]
    }
    assert shape["filled"]["interior_fraction"] > 0.7
    assert shape["outline"]["interior_fraction"] < 0.05
    assert shape["tiny"]["interior_fraction"] is None
    assert all(s["edge_to_edge_fraction"] == 0 for s in shape.values())
    inverted = (filled == 0).astype(np.uint8)
    assert mask_shape(inverted, binary=True)["edge_to_edge_fraction"] == pytest.approx(
        inverted.mean()
    )
    # a nucleus cut by one edge, or a band of nuclei across the tile, touches fewer than four
    band = np.zeros((64, 64), np.uint8)
    band[20:40] = 1
    assert mask_shape(band, binary=True)["edge_to_edge_fraction"] == 0
    # one label per nucleus; a class mask's values each cover several nuclei
    assert shape["filled"]["split_label_fraction"] == 0
    assert shape["tiny"]["split_label_fraction"] is None  # binary: one value for all nuclei
    classes = np.where(filled == 3, 2, filled > 0).astype(np.uint8)  # 1, 2: class 1
    two_of_three = (filled == 1).sum() + (filled == 2).sum()
    assert mask_shape(classes, binary=False)["split_label_fraction"] == pytest.approx(
        two_of_three / (filled > 0).sum()
    )


def test_content_hash_depends_on_pixels_not_file_format(tmp_path, nuclei_pair):
    from mlseg.io import read_image

    image, _ = nuclei_pair(np.random.default_rng(3))
    png = write_image(tmp_path / "a.png", image)
    tif = write_image(tmp_path / "a.tif", image)
    assert content_hash(read_image(png)) == content_hash(read_image(tif))
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert content_hash(changed) != content_hash(image)
    assert content_hash(image.astype(np.uint16)) != content_hash(image)


# ------------------------------------------------------------------ inventory


def test_a_disk_that_fills_while_an_inventory_is_written_keeps_the_previous_one(
    tmp_path, nuclei_dataset, monkeypatch
):
    """inventory, splits, fingerprint and config are one record: a disk that filled at
    fingerprint.json left the new inventory beside the previous dataset's fingerprint, which
    drift monitoring reads. The previous five stay as they were, and the error names the
    folder."""
    import errno

    import mlseg.inventory
    from mlseg.errors import OutputError
    from mlseg.inventory import write_inventory

    out = tmp_path / "validation"
    first = write_inventory(build_inventory(nuclei_dataset("a")), out)
    before = {key: path.read_bytes() for key, path in first.items()}
    real_write_text = mlseg.inventory.write_text

    def full_disk(path, text, *args, **kwargs):
        if path.name == "fingerprint.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(mlseg.inventory, "write_text", full_disk)
    root = nuclei_dataset("b")
    (root / "train" / "original" / "extra.png").write_bytes(
        (root / "train" / "original" / "train0.png").read_bytes()
    )
    with pytest.raises(OutputError, match="no space left on device") as caught:
        write_inventory(build_inventory(root), out)
    assert str(caught.value).startswith(f"{out}: cannot be written")
    assert {key: path.read_bytes() for key, path in first.items()} == before
    outputs = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # no lock
    assert outputs == sorted(p.name for p in first.values())


def test_inventory_rows_columns_and_not_applicable_nulls(tmp_path, nuclei_dataset):
    root = nuclei_dataset("ds")
    (root / "train" / "notes").mkdir()
    (root / "train" / "notes" / "readme.txt").write_text("hello")
    (root / "README.md").write_text("root-level files are not inventoried")
    inv = build_inventory(root)
    files = inv.files
    assert list(files.columns) == list(FILE_COLUMNS)
    assert len(files) == 11 and files["path"].is_unique
    by_path = files.set_index("path")
    image = by_path.loc["train/original/train0.png"]
    mask = by_path.loc["train/masks/train0_mask.png"]
    stray = by_path.loc["train/notes/readme.txt"]
    assert (image["role"], image["stem"], image["width_px"], image["channels"]) == (
        "image",
        "train0",
        48,
        3,
    )
    assert mask["stem"] == "train0" and mask["mask_labels"] == 3 and mask["dtype"] == "uint16"
    assert image["image_has_mask"] is True and image["mask_has_image"] is None
    assert mask["mask_has_image"] is True and mask["size_matches"] is True
    assert stray["role"] == "stray" and stray["location_ok"] is False and stray["readable"] is None
    assert pd.isna(mask["grey_std"]) and image["grey_std"] > 0
    assert inv.splits.set_index("split")["n_pairs"].to_dict() == {"train": 3, "test": 2}


def test_inventory_reads_an_indexed_mask_by_its_indices(tmp_path, nuclei_dataset):
    """A palette PNG mask (CVAT, LabelMe) counts its nuclei by index, even where the palette
    draws them all white; a true colour mask is refused with its name."""
    from PIL import Image

    from mlseg.io import read_mask

    root = nuclei_dataset("ds")
    masks = root / "train" / "masks"
    indexed = Image.fromarray(read_mask(masks / "train0_mask.png").astype(np.uint8))
    indexed.putpalette([0, 0, 0] + [255, 255, 255] * 255)
    indexed.save(masks / "train0_mask.png")
    colour = np.zeros((48, 48, 3), np.uint8)
    colour[5:10, 5:10] = (255, 0, 0)
    write_image(masks / "train1_mask.png", colour)
    by_path = build_inventory(root).files.set_index("path")
    assert by_path.loc["train/masks/train0_mask.png", "mask_labels"] == 3
    unreadable = by_path.loc["train/masks/train1_mask.png"]
    assert not unreadable["readable"] and "colour mask" in unreadable["read_error"]


@pytest.mark.parametrize("suffix", ["-label", ""])
def test_inventory_with_other_folder_names_and_suffix(tmp_path, nuclei_pair, suffix):
    """Other folder names and mask suffixes; an empty suffix is masks named as their images
    in their own folder, whose images all failed mask_naming (every name ends with '')."""
    rng = np.random.default_rng(4)
    root = tmp_path / "ds"
    for split in ("Training", "Testing"):
        image, labels = nuclei_pair(rng)
        write_image(root / split / "img" / "a.png", image)
        write_labels(root / split / "lab" / f"a{suffix}.png", labels)
    data = DataConfig(
        train_dir="Training",
        test_dir="Testing",
        image_dir="img",
        mask_dir="lab",
        mask_suffix=suffix,
    )
    inv = build_inventory(root, ValidateConfig(data=data))
    assert inv.files["image_has_mask"].dropna().all() and inv.files["location_ok"].all()
    assert inv.files["name_ok"].dropna().all()
    assert inv.splits["n_pairs"].tolist() == [1, 1]
    pairs = list_pairs(root, "train", data)
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a.png", f"a{suffix}.png")]


def test_validation_calls_orphan_the_masks_the_listing_calls_orphan(tmp_path):
    """Validation's mask_has_image and the listing that training and evaluation read pair
    masks by one matching: an OME-TIFF's ``x.ome_mask``, extensions in any case, a second
    mask, names without the exact suffix, a JPEG mask (which validation called no mask of
    its image, where training and evaluation paired it to refuse it)."""
    root = tmp_path / "ds"
    img, msk = root / "test" / "original", root / "test" / "masks"
    for name in ("a.png", "b.ome.tif", "c.TIF", "d.png", "g.ome.png", "h.png", "k.png"):
        write_image(img / name, np.zeros((8, 8, 3), np.uint8))
    for name in (
        *("a_mask.png", "a_mask.tif", "b.ome_mask.tif", "c_mask.TIFF", "g.ome_mask.png"),
        *("e_mask.png", "e_mask.tif", "f.ome_mask.png", "d_MASK.png", "d-mask.png"),
        *("h_mask.jpg", "k_mask.png", "k_mask.jpeg", "m_mask.jpg"),  # JPEG masks
    ):
        write_image(msk / name, np.ones((8, 8), np.uint8))
    files = build_inventory(root, ValidateConfig(workers=1)).files
    orphans = files.loc[files["mask_has_image"].eq(False), "path"].tolist()
    listing = list_split(root, "test", strict=False)
    assert [f"test/masks/{p.name}" for p in listing.orphan_masks] == sorted(orphans)
    assert sorted(orphans) == [
        f"test/masks/{n}" for n in ("e_mask.png", "e_mask.tif", "f.ome_mask.png", "m_mask.jpg")
    ]
    images = files[files["role"].eq("image")]
    with_mask = images.loc[images["image_has_mask"].eq(True), "stem"]
    assert sorted(with_mask) == sorted(p.stem for p in listing.pairs if p.mask)
    second = files["partner_unique"].eq(False) & files["mask_has_image"].eq(True)
    seconds = files.loc[second, "path"].map(lambda p: p[11:])
    kept = {mask.name for mask in listing.second_masks.values()}
    assert set(seconds) == kept | {second.name for second in listing.second_masks}
    paired = files.loc[files["mask_has_image"].eq(True), "path"].map(lambda p: p.rsplit("/")[-1])
    taken = {p.mask.name for p in listing.pairs if p.mask} | {m.name for m in listing.second_masks}
    assert set(paired) == taken


def test_a_jpeg_mask_is_its_own_error_not_one_of_its_image_and_every_binary_mask(
    tmp_path, nuclei_pair
):
    """One binary mask saved as JPEG (its edges hold new values: an instance mask) made
    validation call every other, correct, binary mask a binary export among instance masks
    (mask_values_valid), and its image one without a mask, where training refuses the JPEG
    alone."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for split, stems in (("train", "ab"), ("test", "c")):
        for stem in stems:
            image, labels = nuclei_pair(rng)
            write_image(root / split / "original" / f"{stem}.png", image)
            binary = (labels > 0).astype(np.uint8) * 255
            ext = ".jpg" if stem == "b" else ".png"
            write_image(root / split / "masks" / f"{stem}_mask{ext}", binary)
    inv = build_inventory(root, ValidateConfig(workers=1))
    files = inv.files.set_index("path")
    assert files.loc["train/masks/b_mask.jpg", "mask_kind"] == "instance"  # the edges
    rules = ["extension_ok", "name_ok", "image_has_mask", "mask_has_image", "partner_unique"]
    failed = {(p, r) for r in [*rules, "mask_values_ok"] for p in files.index[files[r].eq(False)]}
    assert failed == {("train/masks/b_mask.jpg", "extension_ok")}


@pytest.mark.parametrize("parallel", ["thread", "process"])
def test_parallel_reading_gives_the_serial_table(tmp_path, parallel, nuclei_dataset, ticking):
    """... and a job's log is told how far the reading is, counted as the workers' rows come
    back: every file once, up to the last."""

    ticking()
    root = nuclei_dataset("ds", n_train=20, n_test=6, size=32)  # 52 files >= 48
    serial = build_inventory(root, ValidateConfig(workers=1)).files
    lines: list[str] = []
    cfg = ValidateConfig(workers=2, parallel=parallel)
    parallel_files = build_inventory(root, cfg, log=lines.append).files
    pd.testing.assert_frame_equal(serial, parallel_files)
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == list(range(3, 52, 3)) + [52]
    assert lines[-1].startswith("validate: 52/52 files (100%), ")


def test_missing_root_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        build_inventory(tmp_path / "nope")


def test_output_folder_inside_the_dataset_is_refused(tmp_path, nuclei_dataset):
    root = nuclei_dataset("ds", 1, 1)
    with pytest.raises(DatasetError, match="inside the dataset"):
        check_output_dir(root, root / "validation")
    assert check_output_dir(root, tmp_path / "out") == tmp_path / "out"


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_histograms_and_order_free_hash(tmp_path, nuclei_dataset):
    root = nuclei_dataset("ds", n_train=6, n_test=1)
    files = build_inventory(root).files
    fp = fingerprint(files)
    json.dumps(fp)  # JSON-ready
    assert fp["n_images"] == 6 and fp["channels"] == {"3": 6}
    for column in ("grey_std", "laplacian_var", "od_hematoxylin_mean"):
        hist = fp["stats"][column]["histogram"]
        assert sum(hist["counts"]) == 6
        assert len(hist["edges"]) == len(hist["counts"]) + 1
        assert hist["edges"] == sorted(hist["edges"])
    shuffled = files.sample(frac=1.0, random_state=0)
    shuffled["path"] = "renamed/" + shuffled["path"]
    assert fingerprint(shuffled)["content_hash"] == fp["content_hash"]
    fewer = files.drop(index=files.index[files["role"].eq("image") & files["split"].eq("train")][0])
    assert fingerprint(fewer)["content_hash"] != fp["content_hash"]


def test_image_stats_reproduce_the_inventory_for_monitoring(tmp_path, nuclei_dataset):
    from mlseg.io import read_image

    root = nuclei_dataset("ds", 2, 1)
    row = build_inventory(root).files.set_index("path").loc["train/original/train1.png"]
    again = image_stats(read_image(root / "train" / "original" / "train1.png"))
    for column in STAT_COLUMNS:
        assert again[column] == pytest.approx(row[column], nan_ok=True), column


def test_symlinked_folder_loops_are_walked_once(nuclei_dataset):
    root = nuclei_dataset("ds", 1, 1)
    (root / "train" / "again").symlink_to(root / "train", target_is_directory=True)
    paths = build_inventory(root).files["path"].tolist()  # terminates
    assert len(paths) == 4 and not any("again" in p for p in paths)  # already walked: skipped


def test_reading_streams_with_a_bounded_number_of_files_in_flight():
    from concurrent.futures import ThreadPoolExecutor

    from mlseg.inventory import bounded_map

    submitted = []
    with ThreadPoolExecutor(2) as pool:
        original = pool.submit

        def submit(fn, item):
            submitted.append(item)
            return original(fn, item)

        pool.submit = submit
        in_flight = []
        for i, value in enumerate(bounded_map(pool, lambda x: x * 2, list(range(100)), ahead=8)):
            assert value == 2 * i  # in order
            in_flight.append(len(submitted) - i)
    assert max(in_flight) <= 8 and len(submitted) == 100


def test_turn_free_hash_is_the_same_for_every_flip_and_quarter_turn(nuclei_pair) -> None:
    from mlseg.inventory import _turns, turn_free_hash

    rng = np.random.default_rng(0)
    image, _ = nuclei_pair(rng, size=48)
    wide = image[:, :40]  # not square: a turned copy changes shape
    blank = np.full((32, 32, 3), 200, np.uint8)  # every corner ties: all views are hashed
    ring = np.pad(np.zeros((8, 8, 1), np.uint16), 4, constant_values=9)[..., 4:5]  # symmetric
    for arr in (image, wide, blank, ring):
        hashes = {turn_free_hash(np.ascontiguousarray(view)) for view in _turns(arr)}
        assert len(hashes) == 1
    assert turn_free_hash(wide) != turn_free_hash(image)
    changed = image.copy()
    changed[20, 20, 0] ^= 1
    assert turn_free_hash(changed) != turn_free_hash(image)


def test_usable_cpus_follows_a_container_cpu_quota(tmp_path, monkeypatch) -> None:
    """In a container limited by a CPU quota (`docker run --cpus 0.5`, a Kubernetes CPU
    limit: cgroup v2's cpu.max "50000 100000"), the affinity mask still lists every core of
    the host, and readers and torch threads were sized by the host's count."""
    import os

    import mlseg.inventory as inventory
    from flows.runners import runner_settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(inventory, "CGROUP_CPU_MAX", cpu_max)
    assert inventory.usable_cpus() == 16  # no cgroup v2 file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert inventory.usable_cpus() == 16
    cpu_max.write_text("50000 100000\n")
    assert inventory.usable_cpus() == 1
    assert runner_settings("thread")["workers"] == 1
    cpu_max.write_text("250000 100000\n")  # 2.5 cores: three threads may share them
    assert inventory.usable_cpus() == 3
    cpu_max.write_text("6400000 100000\n")  # a quota above the mask: the mask
    assert inventory.usable_cpus() == 16


def test_turn_free_hash_tells_a_converted_copy_and_keeps_other_images_hashes(nuclei_pair) -> None:
    """A copy saved grey or RGB, or its 8-bit values saved 16-bit, hashes as the image; a
    colour or true 16-bit image hashes as it did (the models saved before recorded those),
    and a 16-bit image is not taken for its top byte."""
    from mlseg.inventory import exact_form, turn_free_hash

    rng = np.random.default_rng(0)
    image, _ = nuclei_pair(rng, size=48)
    grey = image.mean(axis=2).astype(np.uint8)[..., None]
    blue = np.concatenate([np.zeros_like(grey), np.zeros_like(grey), grey], axis=2)
    copies = [np.repeat(grey, 3, axis=2), blue, grey.astype(np.uint16) * 257]
    copies += [np.repeat(grey, 3, axis=2).astype(np.uint16) << 8, grey.astype(np.uint16)]
    assert {turn_free_hash(np.ascontiguousarray(np.rot90(c))) for c in copies} == {
        turn_free_hash(grey)
    }
    assert exact_form(image) is image
    assert turn_free_hash(image) == turn_free_hash(image, exact=False)
    deep = image.astype(np.uint16) * 257 + rng.integers(0, 2, image.shape, dtype=np.uint16)
    assert exact_form(deep) is deep
    assert turn_free_hash(deep) != turn_free_hash(image)
