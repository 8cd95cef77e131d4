"""Folder runs: segment with a model, quantify existing masks, resume, bad input, CLI."""

from __future__ import annotations

import json
import os
import re
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from mlseg.config import Config, InferenceConfig, PreprocessConfig, get_profile
from mlseg.errors import ConfigError, DatasetError
from mlseg.io import read_mask, write_image, write_labels
from mlseg.model import LoadedModel
from mlseg.segment import (
    list_images,
    own_pixel_sizes,
    predict_labels,
    quantify_folder,
    segment_folder,
    stain_tta_for,
    warn_if_unlit,
)

torch.set_num_threads(1)
HE = get_profile("he")


class DarkIsNucleus(nn.Module):
    """Three-class logits from darkness: a perfect model for dark discs on a light slide."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(12.0), requires_grad=False)

    def forward(self, x):
        v = x.mean(1, keepdim=True)
        interior = self.scale * (0.6 - v)
        return torch.cat([-interior, interior, torch.full_like(v, -6.0)], dim=1)


def disc_image(h: int, w: int, spacing: int = 20, radius: int = 6, seed: int = 0):
    """Dark purple discs on a light background; returns (uint8 RGB image, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((h, w), np.int32)
    n = 0
    for cy in range(spacing // 2, h - radius, spacing):
        for cx in range(spacing // 2, w - radius, spacing):
            n += 1
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = n
    image = np.full((h, w, 3), (235, 225, 235), np.uint8)
    image[labels > 0] = (90, 50, 130)
    noise = rng.integers(-5, 6, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), labels


@pytest.fixture(autouse=True)
def _histograms_drawn_where_looked_at(request, monkeypatch) -> None:
    """Every folder run draws histograms.png (matplotlib: about a CPU second, a third of
    this file's time); no test here looks at the drawing but the one asking for
    ``real_histograms`` (test_outputs.py tests the plot). Elsewhere a 1x1 PNG stands in,
    written as the real one is (atomically, in the staging folder of the run's record)."""
    if "real_histograms" in request.fixturenames:
        return
    from PIL.PngImagePlugin import PngInfo

    import mlseg.outputs
    from mlseg.io import atomic_path

    drawn_by = PngInfo()  # as matplotlib names itself: a rerun keeps what this one drew
    drawn_by.add_text("Software", f"Matplotlib version{version('matplotlib')}, stand-in")

    def stand_in(nuclei: pd.DataFrame, path: Path) -> Path:
        with atomic_path(path) as tmp:
            Image.new("L", (1, 1)).save(tmp, format="PNG", pnginfo=drawn_by)
        return Path(path)

    monkeypatch.setattr(mlseg.outputs, "plot_histograms", stand_in)


@pytest.fixture
def real_histograms() -> None:
    """Asked for by a test whose runs draw the real histograms.png."""


@pytest.fixture
def oracle(tmp_path) -> LoadedModel:
    weights = tmp_path / "oracle.safetensors"
    weights.write_bytes(b"not used")
    cfg = Config(inference=InferenceConfig(tile_size=64, batch_size=4))
    return LoadedModel(
        model=DarkIsNucleus().eval(),
        config=cfg,
        target="three_class",
        classes=3,
        in_channels=3,
        pixel_size_um=None,
        path=weights,
    )


@pytest.fixture
def use_oracle(monkeypatch, oracle):
    import mlseg.model

    monkeypatch.setattr(mlseg.model, "load_model", lambda path, device="cpu": oracle)
    return oracle


def test_predict_labels_counts_every_disc(oracle):
    image, truth = disc_image(130, 170)
    labels, probs = predict_labels(oracle, image, HE, oracle.config.inference)
    assert labels.shape == truth.shape and probs.shape == (3, 130, 170)
    assert labels.max() == truth.max()


def test_an_array_in_another_convention_is_refused_not_segmented_to_nothing(oracle):
    """A notebook's arrays: float 0-255, int64, channels first or a stack are refused with
    the fix named; float in [0, 1], a PIL image and a tensor give the uint8 image's labels."""
    from PIL import Image

    image, truth = disc_image(64, 64)
    cfg = oracle.config.inference
    refused = {
        "divide": image.astype(np.float32),
        "astype": image.astype(np.int64),
        "moveaxis": np.moveaxis(image, -1, 0),
        "plane by plane": np.stack([image, image]),
    }
    for fix, array in refused.items():
        with pytest.raises(ValueError, match=fix):
            predict_labels(oracle, array, HE, cfg)
    expected = predict_labels(oracle, image, HE, cfg)[0]
    assert expected.max() == truth.max()
    for taken in (image / 255.0, Image.fromarray(image), torch.from_numpy(image)):
        assert np.array_equal(predict_labels(oracle, taken, HE, cfg)[0], expected)


def test_a_big_endian_sixteen_bit_image_is_segmented_as_its_native_copy(oracle):
    """A raw camera file read with ``np.fromfile(path, ">u2")`` holds the same image as its
    native copy: it was refused as not 'uint8 or uint16'."""
    image, truth = disc_image(64, 64)
    image16 = image.astype(np.uint16) * 257
    cfg = oracle.config.inference
    expected = predict_labels(oracle, image16, HE, cfg)[0]
    assert expected.max() == truth.max()
    assert np.array_equal(predict_labels(oracle, image16.astype(">u2"), HE, cfg)[0], expected)


def test_a_pixel_size_that_is_no_number_is_refused_by_name(oracle):
    """NaN, a tuple or a word failed deep inside (cannot convert float NaN to integer, '>'
    not supported between str and int); a number written as text is taken."""
    from mlseg.segment import quantify_image

    image, truth = disc_image(64, 64)
    cfg = oracle.config.inference
    for bad in (float("nan"), (0.5, 0.5), "half", 0):
        with pytest.raises(ConfigError, match="positive number of microns"):
            predict_labels(oracle, image, HE, cfg, pixel_size_um=bad)
        with pytest.raises(ConfigError, match="positive number of microns"):
            quantify_image(image, truth, HE, pixel_size_um=bad)
    as_text = quantify_image(image, truth, HE, pixel_size_um="0.5")[1]
    assert as_text == quantify_image(image, truth, HE, pixel_size_um=0.5)[1]


def test_a_folder_run_records_a_pixel_size_given_as_text_as_a_number(tmp_path):
    """run.json kept "0.5" as text, and a rerun given 0.5 redid every image."""
    from mlseg.io import write_image, write_labels

    image, truth = disc_image(64, 64)
    write_image(tmp_path / "images" / "a.png", image)
    write_labels(tmp_path / "labels" / "a_mask.png", truth)
    args = (tmp_path / "labels", tmp_path / "images", tmp_path / "out")
    quantify_folder(*args, profile_name="he", pixel_size_um="0.5", progress=False)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["pixel_size_um"] == 0.5
    again = quantify_folder(*args, profile_name="he", pixel_size_um=0.5, progress=False)
    assert again.skipped == ["a"]


def test_stain_tta_applies_to_brightfield_rgb_input_only(oracle, tmp_path):
    """On by default for Macenko-normalised H&E and IHC, in the stains they were normalised
    to; off for fluorescence, without stain normalisation (the haematoxylin direction is
    the slide's, not the reference's), for a model fed intensity-normalised input and when
    the config says [1.0]."""
    from mlseg.io import write_image
    from mlseg.preprocess import macenko_target

    cfg, pre = InferenceConfig(), PreprocessConfig(stain_norm="macenko")
    on = stain_tta_for(cfg, HE, pre, 3)
    assert on == stain_tta_for(cfg, get_profile("ihc"), pre, 3)
    assert len(on.gains) > 1 and not on.off
    assert np.allclose(np.array(on.stains).T, macenko_target(pre)[0])
    assert stain_tta_for(cfg, get_profile("fluorescence"), pre, 1).off
    assert stain_tta_for(cfg, HE, PreprocessConfig(), 3).off
    assert stain_tta_for(cfg, HE, pre.model_copy(update={"intensity_norm": "zscore"}), 3).off
    assert stain_tta_for(cfg.model_copy(update={"stain_tta": (1.0,)}), HE, pre, 3).off
    # a reference slide: its own stains, as Macenko normalisation maps every image to them
    image, _ = disc_image(130, 170)
    custom = pre.model_copy(update={"stain_reference": write_image(tmp_path / "ref.png", image)})
    got = stain_tta_for(cfg, HE, custom, 3)
    assert np.allclose(np.array(got.stains).T, macenko_target(custom)[0])
    assert not np.allclose(np.array(got.stains).T, macenko_target(pre)[0], atol=0.02)
    # and predict_labels uses it: denser haematoxylin darkens the oracle's discs
    image, truth = disc_image(130, 170)
    config = oracle.config.model_copy(update={"preprocess": pre})
    macenko = LoadedModel(**{**oracle.__dict__, "config": config})
    off = oracle.config.inference.model_copy(update={"stain_tta": (1.0,)})
    on = oracle.config.inference.model_copy(update={"stain_tta": (1.0, 2.0)})
    (_, plain), (labels, tta) = (predict_labels(macenko, image, HE, c) for c in (off, on))
    assert tta[1][truth > 0].mean() > plain[1][truth > 0].mean() + 1e-3
    assert labels.max() == truth.max()


def test_adapt_bn_reaches_the_model_through_predict_labels(oracle):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    unet = smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, classes=3, decoder_channels=(32, 16, 8)
    ).eval()
    loaded = LoadedModel(**{**oracle.__dict__, "model": unet})
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    image, _ = disc_image(64, 64)
    cfg = oracle.config.inference
    _, plain = predict_labels(loaded, image, HE, cfg)
    _, adapted = predict_labels(loaded, image, HE, cfg.model_copy(update={"adapt_bn": True}))
    assert np.abs(plain - adapted).max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    # a model without a known encoder is predicted as it is, with a warning
    with pytest.warns(UserWarning, match="adapt_bn"):
        _, same = predict_labels(oracle, image, HE, cfg.model_copy(update={"adapt_bn": True}))
    np.testing.assert_array_equal(same, predict_labels(oracle, image, HE, cfg)[1])


def test_predict_labels_rescales_to_the_model_pixel_size(oracle):
    image, truth = disc_image(100, 120)
    half = LoadedModel(**{**oracle.__dict__, "pixel_size_um": 0.25})
    labels, probs = predict_labels(half, image, HE, oracle.config.inference, pixel_size_um=0.5)
    assert labels.shape == truth.shape and probs.shape[1:] == truth.shape
    assert labels.max() == truth.max()


def test_zoom_predicts_on_a_finer_grid_and_maps_back(oracle):
    """``inference.zoom``: the model sees the image enlarged (on top of the pixel-size
    factor), labels and probabilities come back on the original grid, every disc found."""
    seen = []

    class Spy(DarkIsNucleus):
        def forward(self, x):
            seen.append(x.shape[0] * x.shape[2] * x.shape[3])
            return super().forward(x)

    image, truth = disc_image(100, 120)
    spy = LoadedModel(**{**oracle.__dict__, "model": Spy().eval(), "pixel_size_um": 0.25})
    pixels = {}
    for zoom in (1.0, 2.0):
        seen.clear()
        cfg = spy.config.inference.model_copy(update={"zoom": zoom})
        labels, probs = predict_labels(spy, image, HE, cfg, pixel_size_um=0.5)
        assert labels.shape == truth.shape and probs.shape[1:] == truth.shape
        assert labels.max() == truth.max()
        pixels[zoom] = sum(seen)
    assert pixels[2.0] > 3 * pixels[1.0]  # 4x the area (less tile-overlap slack)


@pytest.mark.parametrize("stream", [False, True])
def test_size_limits_hold_for_the_areas_measured_after_zoom(oracle, stream):
    """The profile's area limits apply to the nuclei as the table measures them, on the
    original grid: filtered on the zoomed grid and mapped back, discs of 29 px with limits
    of 29-34 px all went at zoom 1.5 and came back as 25 px, under the minimum, at 0.75."""
    image, truth = disc_image(120, 120, radius=3)
    area = int(np.bincount(truth.ravel())[1])
    profile = HE.model_copy(update={"units": "px", "min_area_px": area, "max_area_px": area + 5})
    for zoom in (0.75, 1.5):
        update = {"zoom": zoom, **({"stream_min_pixels": 1000} if stream else {})}
        cfg = oracle.config.inference.model_copy(update=update)
        labels, _ = predict_labels(oracle, image, profile, cfg)
        areas = np.bincount(labels.ravel())[1:]
        assert ((areas >= area) & (areas <= area + 5)).all(), (zoom, sorted(set(areas)))
        if zoom == 1.5:  # mapped back, each disc has its own area again
            assert labels.max() == truth.max()


def test_predict_labels_banded_path(oracle):
    image, truth = disc_image(160, 120)
    cfg = oracle.config.inference.model_copy(
        update={"stream_min_pixels": 1000, "band_rows": 64, "halo_px": 16}
    )
    labels, probs = predict_labels(oracle, image, HE, cfg)
    assert probs is None and labels.max() == truth.max()


def _folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "in"
    for i in range(n):
        image, _ = disc_image(90 + 10 * i, 110, seed=i)
        write_image(folder / f"img{i}.png", image)
    return folder


def test_each_image_records_the_mlseg_and_device_that_made_it_through_reruns(
    tmp_path, use_oracle, monkeypatch
):
    """Six months on, an image's record says which mlseg (with its commit: the version alone
    is 0.1.0 in every build) and which device made its outputs. A rerun by another mlseg skips
    the finished images; its run.json is its own, and the images' records stay theirs."""
    import mlseg.segment
    from mlseg.registry import code_version

    folder = _folder(tmp_path, 2)
    out = tmp_path / "out"
    segment_folder("model", folder, out, profile_name="he", progress=False)
    made_by = code_version()
    assert json.loads((out / "run.json").read_text())["mlseg_version"] == made_by
    (out / "img1.json").unlink()  # its outputs are made again by the new version
    monkeypatch.setattr(mlseg.segment, "code_version", lambda: "9.9.9+gfeedbeef")
    rerun = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert rerun.skipped == ["img0"] and rerun.processed == ["img1"]
    assert json.loads((out / "run.json").read_text())["mlseg_version"] == "9.9.9+gfeedbeef"
    table = pd.read_csv(out / "summary.csv").set_index("image")
    assert table["mlseg_version"].to_dict() == {"img0": made_by, "img1": "9.9.9+gfeedbeef"}
    assert set(table["device"]) == {"cpu"}


def test_a_long_segment_run_gives_its_log_a_line_on_how_far_it_is(
    tmp_path, use_oracle, monkeypatch, ticking
):
    """Where no bar is drawn (a job's log) a run of a whole study said nothing for hours.
    ``log`` gets a line now and then; a resumed run counts its finished images as done but
    not in the time left."""

    ticking(40)  # each image 40 s on the clock the lines read
    folder = _folder(tmp_path, 3)
    out = tmp_path / "out"
    lines: list[str] = []
    segment_folder("model", folder, out, profile_name="he", progress=False, log=lines.append)
    assert lines == [
        "segment: 2/3 images (66%), 1 min elapsed, under a minute left",
        "segment: 3/3 images (100%), 3 min elapsed",
    ]
    for stem in ("img1", "img2"):
        (out / f"{stem}.json").unlink()
    lines.clear()
    segment_folder("model", folder, out, profile_name="he", progress=False, log=lines.append)
    assert lines == [
        "segment: 2/3 images (66%, 1 already done), 1 min elapsed, under a minute left",
        "segment: 3/3 images (100%, 1 already done), 3 min elapsed",
    ]


def test_the_time_left_leaves_out_the_wait_for_another_run_into_the_folder(tmp_path, monkeypatch):
    """A run waiting for another run's lock on its output folder counted the wait as its
    first image's time: after half an hour's wait and one 20-s image the log promised
    "about 1 h 31 min left" for three more."""
    from contextlib import contextmanager
    from functools import partial

    import mlseg.segment
    from mlseg.progress import ProgressLog

    now = [0.0]

    def clock() -> float:
        now[0] += 20  # each image 20 s on the clock the lines read
        return now[0]

    monkeypatch.setattr(mlseg.segment, "ProgressLog", partial(ProgressLog, clock=clock))
    held = mlseg.segment.writing_to

    @contextmanager
    def after_a_wait(out_dir):
        now[0] += 1800  # another run held the folder half an hour
        with held(out_dir) as out:
            yield out

    monkeypatch.setattr(mlseg.segment, "writing_to", after_a_wait)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1
    for i in range(4):
        write_image(tmp_path / "images" / f"i{i}.png", np.full((32, 32, 3), 200, np.uint8))
        write_image(tmp_path / "labels" / f"i{i}_mask.png", mask)
    lines: list[str] = []
    quantify_folder(
        tmp_path / "labels",
        tmp_path / "images",
        tmp_path / "out",
        profile_name="he",
        progress=False,
        log=lines.append,
    )
    assert lines[0] == "quantify: 3/4 images (75%), 1 min elapsed, under a minute left"


def test_a_run_that_waited_for_its_folder_keeps_the_images_the_other_run_did(
    tmp_path, use_oracle, monkeypatch
):
    """A run lists its images, then waits for the output folder while another run (a
    colleague's, a nightly job's) segments an image that came in meanwhile: the waiting run
    wrote summary.csv and nuclei.parquet from its own list, without that image, though its
    files were there. It now lists the folder again once it has it, saying nothing twice."""
    from contextlib import contextmanager

    import mlseg.segment

    folder, out = _folder(tmp_path, 2), tmp_path / "out"
    write_image(folder / "case" / "other.png", disc_image(40, 40)[0])  # warned of, once
    sizes = {"img0": 0.5, "img1": 0.5, "img_late": 0.5}
    held = mlseg.segment.writing_to

    @contextmanager
    def after_another_run(out_dir):
        monkeypatch.setattr(mlseg.segment, "writing_to", held)  # the other run's, at once
        write_image(folder / "img_late.png", disc_image(90, 110, seed=5)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segment_folder(
                "model", folder, out, profile_name="he", progress=False, pixel_sizes=sizes
            )
        with held(out_dir) as taken:
            yield taken

    monkeypatch.setattr(mlseg.segment, "writing_to", after_another_run)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = segment_folder(
            "model", folder, out, profile_name="he", progress=False, pixel_sizes=sizes
        )
    assert pd.read_csv(out / "summary.csv")["image"].tolist() == ["img0", "img1", "img_late"]
    assert "img_late" in set(pd.read_parquet(out / "nuclei.parquet")["image"])
    # its table's size looked up: the other run's outputs of it are this run's, not redone
    assert result.skipped == ["img0", "img1", "img_late"]
    assert sum("subfolders" in str(w.message) for w in said) == 1


def test_a_quantify_run_that_waited_for_its_folder_keeps_the_masks_the_other_run_did(
    tmp_path, monkeypatch
):
    """As a segment run: a mask exported (with its image) while the run waited for its output
    folder, and measured by the run it waited for, was left out of its summary.csv."""
    from contextlib import contextmanager

    import mlseg.segment

    images, labels, out = tmp_path / "images", tmp_path / "labels", tmp_path / "out"
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1

    def exported(stem: str) -> None:
        write_image(images / f"{stem}.png", np.full((32, 32, 3), 200, np.uint8))
        write_image(labels / f"{stem}_mask.png", mask)

    def quantify() -> object:
        return quantify_folder(labels, images, out, profile_name="he", progress=False)

    for stem in ("i0", "i1"):
        exported(stem)
    held = mlseg.segment.writing_to

    @contextmanager
    def after_another_run(out_dir):
        monkeypatch.setattr(mlseg.segment, "writing_to", held)  # the other run's, at once
        exported("i_late")
        quantify()
        with held(out_dir) as taken:
            yield taken

    monkeypatch.setattr(mlseg.segment, "writing_to", after_another_run)
    result = quantify()
    assert pd.read_csv(out / "summary.csv")["image"].tolist() == ["i0", "i1", "i_late"]
    assert result.skipped == ["i0", "i1", "i_late"]


def test_run_json_names_the_library_releases_and_hardware_that_made_the_numbers(
    tmp_path, use_oracle
):
    """run.json named mlseg's version only: another torch, OpenCV or scikit-image release,
    or a GPU in place of a CPU, changes the labels and the measurements."""
    from importlib.metadata import version

    import torch

    folder = _folder(tmp_path, 1)
    segment_folder("model", folder, tmp_path / "out", profile_name="he", progress=False)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["packages"]["torch"] == version("torch")
    assert run["packages"]["scikit-image"] == version("scikit-image")
    assert run["machine"]["device"] == "cpu" and run["machine"]["torch"] == torch.__version__
    # and how the model's inputs were prepared (its config.json, which the weights' hash
    # does not cover): whether stains were normalised, to what
    assert run["preprocess"] == use_oracle.config.preprocess.model_dump(mode="json")
    labels = tmp_path / "labels"
    write_labels(labels / "img0_mask.png", disc_image(90, 110)[1])
    quantify_folder(labels, folder, tmp_path / "q", profile_name="he", progress=False)
    measured = json.loads((tmp_path / "q" / "run.json").read_text())
    assert measured["packages"]["numpy"] == version("numpy")


def test_segment_folder_writes_outputs_and_resumes(tmp_path, use_oracle, real_histograms):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    result = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert result.ok and result.processed == ["img0", "img1", "img2"]
    for stem in result.processed:
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["profile"] == "he" and summary["profile_version"] == HE.version
        assert summary["count"] == read_mask(out / f"{stem}_labels.png").max() > 10
        for name in summary["outputs"].values():
            assert (out / name).is_file()
    table = pd.read_csv(out / "summary.csv")
    assert table["image"].tolist() == ["img0", "img1", "img2"]
    # how each image's scale was chosen is recorded (this stand-in knows no nucleus size)
    assert set(table["scale_source"]) == {"native"} and (table["scale_factor"] == 1.0).all()
    with Image.open(out / "histograms.png") as drawn:  # drawn, not the tests' 1x1 stand-in
        assert min(drawn.size) > 100
    run = json.loads((out / "run.json").read_text())
    assert run["profile"]["version"] == HE.version and run["processed"] == result.processed
    # rerun: nothing to do; after a "crash" (one summary missing) only that image is redone
    again = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert again.processed == [] and len(again.skipped) == 3
    (out / "img1.json").unlink()
    resumed = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert resumed.processed == ["img1"]
    assert len(pd.read_csv(out / "summary.csv")) == 3
    # a rescan saved over img2 under the same name is redone, not skipped with stale numbers
    write_image(folder / "img2.png", disc_image(96, 96, spacing=32, radius=8)[0])
    rescanned = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert rescanned.processed == ["img2"] and len(rescanned.skipped) == 2


def test_quantify_measures_segment_outputs_as_segment_did(tmp_path, use_oracle):
    """mlseg quantify on mlseg segment's output folder (to measure again with another
    profile) takes its labels only: its overlays and histograms.png are no label files, and
    each image's table is the one segment wrote."""
    folder = _folder(tmp_path, 2)
    segmented = segment_folder("model", folder, tmp_path / "out", profile_name="he", progress=False)
    result = quantify_folder(
        tmp_path / "out", folder, tmp_path / "q", profile_name="he", progress=False
    )
    assert result.ok and result.processed == segmented.processed == ["img0", "img1"]
    for stem in result.processed:
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "q" / f"{stem}_nuclei.parquet"),
            pd.read_parquet(tmp_path / "out" / f"{stem}_nuclei.parquet"),
        )


def test_an_image_of_pixels_not_square_is_not_measured_at_the_profiles_size(tmp_path):
    """A lab profile with pixel_size_um 0.25 and an image whose tags declare 0.25 x 0.5 um
    pixels: it was warned of as 'ignored' and then measured at the profile's 0.25 um, its
    areas half the truth in um2. It is measured in pixels now; the square image beside it
    keeps the profile's size."""
    import tifffile

    images, masks = tmp_path / "images", tmp_path / "masks"
    image, truth = disc_image(80, 100)
    tags = {"photometric": "rgb", "resolutionunit": "CENTIMETER"}
    images.mkdir()
    tifffile.imwrite(images / "wide.tif", image, resolution=(40000, 20000), **tags)
    write_image(images / "plain.png", image)  # declares none: the profile's
    for stem in ("wide", "plain"):
        write_labels(masks / f"{stem}_mask.png", truth)
    profiles = tmp_path / "profiles.yaml"
    lab = {**HE.model_dump(mode="json", exclude={"name"}), "pixel_size_um": 0.25}
    profiles.write_text(json.dumps({"profiles": {"lab": lab}}))
    with pytest.warns(UserWarning, match=r"wide\.tif: pixel size ignored.*not square"):
        result = quantify_folder(
            masks, images, tmp_path / "q", profile_name="lab", profiles_file=profiles,
            progress=False,
        )  # fmt: skip
    assert result.ok, result.failed
    wide = json.loads((tmp_path / "q" / "wide.json").read_text())
    assert (wide["pixel_size_um"], wide["pixel_size_source"]) == (None, "unknown")
    table = pd.read_parquet(tmp_path / "q" / "wide_nuclei.parquet")
    assert "area_px" in table.columns and "area_um2" not in table.columns
    plain = pd.read_parquet(tmp_path / "q" / "plain_nuclei.parquet")
    assert plain["area_um2"].to_numpy() == pytest.approx(table["area_px"].to_numpy() * 0.0625)


def test_micron_units_refused_for_pixels_not_square_name_the_cause_not_the_profile(
    tmp_path, use_oracle
):
    """A lab profile asking for microns with pixel_size_um 0.25 and an image declaring
    0.25 x 0.5 um pixels: segment and quantify failed it with 'set pixel_size_um in the
    profile', which it has. The error names the file declaring the pixels not square and
    the fixes that give the image a size."""
    import tifffile

    images, masks = tmp_path / "images", tmp_path / "masks"
    image, truth = disc_image(80, 100)
    images.mkdir()
    tifffile.imwrite(
        images / "wide.tif", image, photometric="rgb", resolution=(40000, 20000),
        resolutionunit="CENTIMETER",
    )  # fmt: skip
    write_image(images / "tall.png", image)
    (images / "tall.json").write_text(json.dumps({"PixelSize": [0.5, 0.25]}))
    for stem in ("wide", "tall"):
        write_labels(masks / f"{stem}_mask.png", truth)
    profiles = tmp_path / "profiles.yaml"
    lab = {**HE.model_dump(mode="json", exclude={"name"}), "pixel_size_um": 0.25, "units": "um"}
    profiles.write_text(json.dumps({"profiles": {"lab": lab}}))
    kw = {"profile_name": "lab", "profiles_file": profiles, "progress": False}
    with pytest.warns(UserWarning, match="not square"):
        quantified = quantify_folder(masks, images, tmp_path / "q", **kw)
        segmented = segment_folder("model", images, tmp_path / "s", **kw)
    declared_by = {"wide": images / "wide.tif", "tall": images / "tall.json"}
    failed = {
        "quantify": {masks / f"{stem}_mask.png": stem for stem in declared_by},
        "segment": {images / "wide.tif": "wide", images / "tall.png": "tall"},
    }
    for result, which in ((quantified, "quantify"), (segmented, "segment")):
        assert len(result.failed) == 2
        for path, stem in failed[which].items():
            error = result.failed[str(path)]
            assert f"{declared_by[stem]} declares pixels that are not square" in error
            assert "resample it to square pixels" in error and "--pixel-size" in error
            assert "set pixel_size_um in the profile" not in error


def test_quantify_of_an_output_folder_measures_at_the_size_its_records_carry(tmp_path):
    """Labels measured again from an mlseg output folder keep the pixel size their image's
    record (<stem>.json) gives, after the image's own metadata and a size given to the run;
    a record that gained a size since redoes its image in microns."""
    import tifffile

    images, masks, first, again = (tmp_path / n for n in ("images", "masks", "first", "again"))
    image, truth = disc_image(80, 100)
    write_image(images / "a.png", image)  # a PNG declares no size
    tifffile.imwrite(
        images / "b.tif",
        image,
        photometric="rgb",
        resolution=(40000, 40000),
        resolutionunit="CENTIMETER",
    )  # 0.25 um per pixel
    for stem in "ab":
        write_labels(masks / f"{stem}_mask.png", truth)
    run = dict(profile_name="he", progress=False)
    quantify_folder(masks, images, first, **run)  # a: px, b: its metadata's 0.25 um
    quantify_folder(first, images, again, **run)
    assert json.loads((again / "a.json").read_text())["pixel_size_source"] == "unknown"
    quantify_folder(masks, images, first, pixel_size_um=0.5, **run)  # the size is given now
    result = quantify_folder(first, images, again, **run)
    assert result.processed == ["a"] and result.skipped == ["b"]  # b: measured as before
    with pytest.warns(UserWarning, match=r"b\.tif: measured at the 0\.25 um.*not the 0\.5 um"):
        quantify_folder(first, images, tmp_path / "fresh", **run)
    a, b = (json.loads((again / f"{stem}.json").read_text()) for stem in "ab")
    assert (a["pixel_size_um"], a["pixel_size_source"]) == (0.5, "labels metadata")
    assert b["pixel_size_um"] == pytest.approx(0.25) and b["pixel_size_source"] == "image metadata"
    table = pd.read_parquet(again / "a_nuclei.parquet")
    assert table["area_um2"].tolist() == pytest.approx(
        (pd.read_parquet(first / "a_nuclei.parquet")["area_um2"]).tolist()
    )
    given = quantify_folder(first, images, tmp_path / "given", pixel_sizes={"a": 0.4}, **run)
    assert {s["image"]: s["pixel_size_source"] for s in given.summaries} == {
        "a": "table",
        "b": "image metadata",
    }


def test_quantify_redoes_labels_whose_table_size_changed_though_their_record_has_one(tmp_path):
    """Labels of an output folder (their <stem>.json records 0.5 um) measured at a table's
    0.4 and then 0.3 um: the second run skipped the image as done, its areas left at 0.4."""
    images, masks, first, out = (tmp_path / n for n in ("images", "masks", "first", "out"))
    image, truth = disc_image(60, 60)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    run = dict(profile_name="he", progress=False)
    quantify_folder(masks, images, first, pixel_size_um=0.5, **run)
    quantify_folder(first, images, out, pixel_sizes={"a": 0.4}, **run)
    assert quantify_folder(first, images, out, pixel_sizes={"a": 0.3}, **run).processed == ["a"]
    assert json.loads((out / "a.json").read_text())["pixel_size_um"] == 0.3


def test_quantify_in_microns_takes_the_size_an_output_folder_carries(tmp_path):
    """units: um is satisfied by labels whose record gives the size, image PNGs without any."""
    images, masks, first = tmp_path / "images", tmp_path / "masks", tmp_path / "first"
    image, truth = disc_image(60, 60)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    quantify_folder(masks, images, first, profile_name="he", pixel_size_um=0.5, progress=False)
    result = quantify_folder(
        first, images, tmp_path / "um", profile_name="he", units="um", progress=False
    )
    assert result.processed == ["a"] and result.summaries[0]["pixel_size_um"] == 0.5


def test_quantify_takes_the_size_a_calibrated_label_tiff_declares(tmp_path):
    """A mask saved calibrated in Fiji (ImageJ unit=micron, 4 px per micron) beside PNG
    images, which declare no size, was measured in pixels (in microns refused: 'the images
    carry none'); it is measured at its own 0.25 um, and a 72-dpi TIFF gives no size."""
    import tifffile

    images, masks = tmp_path / "images", tmp_path / "masks"
    image, truth = disc_image(60, 60)
    for stem in "ab":
        write_image(images / f"{stem}.png", image)
    masks.mkdir()
    tifffile.imwrite(
        masks / "a_mask.tif",
        truth.astype(np.uint16),
        imagej=True,
        resolution=(4, 4),
        metadata={"unit": "micron"},
    )
    tifffile.imwrite(masks / "b_mask.tif", truth, resolution=(72, 72), resolutionunit="INCH")
    result = quantify_folder(masks, images, tmp_path / "out", profile_name="he", progress=False)
    a, b = result.summaries
    assert (a["pixel_size_um"], a["pixel_size_source"]) == (0.25, "labels metadata")
    assert (b["pixel_size_um"], b["pixel_size_source"]) == (None, "unknown")
    table = pd.read_parquet(tmp_path / "out" / "a_nuclei.parquet")
    assert table["area_um2"].tolist() == pytest.approx(
        (np.bincount(truth.ravel())[1:] * 0.0625).tolist()
    )


def test_segment_folder_runs_the_model_on_the_device_its_config_names(
    tmp_path, monkeypatch, use_oracle
):
    # a model saved with inference.device: cpu (the GPU kept for training) ran on "auto"
    # unless an option (--tile) was given, and then on its own device
    import mlseg.model

    use_oracle.config = Config(inference=InferenceConfig(tile_size=64, device="cpu"))
    asked = []
    resolve = mlseg.model.resolve_device
    monkeypatch.setattr(
        mlseg.model,
        "resolve_device",
        lambda name="auto", saved_in=None: asked.append(name) or resolve(name),
    )
    folder = _folder(tmp_path, 1)
    segment_folder("model", folder, tmp_path / "out", profile_name="he", progress=False)
    assert asked == ["cpu"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["inference"]["device"] == "cpu"


def test_an_image_the_gpu_runs_out_of_memory_on_fails_alone_naming_the_fix(
    tmp_path, use_oracle, monkeypatch
):
    # one image the card had too little free memory for ended the whole run with torch's
    # OutOfMemoryError: the images after it were not segmented and no run.json was written
    forward, calls = use_oracle.model.forward, []

    def out_of_memory_once(x):
        calls.append(x.shape)
        if len(calls) == 1:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                "of 7.79 GiB of which 1.12 GiB is free."
            )
        return forward(x)

    monkeypatch.setattr(use_oracle.model, "forward", out_of_memory_once)
    folder = _folder(tmp_path, 2)
    result = segment_folder("model", folder, tmp_path / "out", profile_name="he", progress=False)
    assert result.processed == ["img1"] and list(result.failed) == [str(folder / "img0.png")]
    error = result.failed[str(folder / "img0.png")]
    assert "out of memory" in error and "Tried to allocate 2.00 GiB" in error
    assert "--batch-size 2" in error  # half the model's 4 tiles per pass
    assert json.loads((tmp_path / "out" / "run.json").read_text())["failed"] == result.failed


def test_a_model_saved_with_a_gpu_on_a_machine_without_one_names_its_config_and_the_fix(
    tmp_path, monkeypatch
):
    # a model trained with inference.device: cuda, moved to a CPU machine, said only "device
    # 'cuda' asked for but CUDA is not available here": nobody there had asked for it
    from mlseg.config import TrainConfig

    ckpt = _untrained_checkpoint(
        tmp_path / "gpu_model",
        Config(train=TrainConfig(encoder="resnet18", encoder_depth=3),
               inference=InferenceConfig(tile_size=64, device="cuda")),
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = _folder(tmp_path, 1)
    with pytest.raises(ConfigError) as err:
        segment_folder(ckpt, folder, tmp_path / "out", profile_name="he", progress=False)
    assert str(ckpt / "config.json") in str(err.value) and "--device auto" in str(err.value)
    cpu = InferenceConfig(tile_size=64, device="cpu")  # the caller's device: as asked, no file
    result = segment_folder(
        ckpt, folder, tmp_path / "out", profile_name="he", progress=False, inference_cfg=cpu
    )
    assert result.processed == ["img0"]


def test_a_model_of_other_channels_than_the_images_fails_each_naming_the_model(tmp_path):
    # a two-channel model (DAPI and a membrane marker) given RGB images ended the run with
    # "ValueError: cannot convert a 3-channel image to 2 channels", no model or image named
    from mlseg.config import TrainConfig
    from mlseg.model import build_model, save_checkpoint

    cfg = Config(train=TrainConfig(encoder="resnet18", encoder_depth=3))
    save_checkpoint(
        tmp_path / "two", build_model(cfg.train, 2, 3), cfg, target="three_class", classes=3,
        in_channels=2, fingerprint_hash=None, metrics={}, pixel_size_um=None, name="best",
    )  # fmt: skip
    folder = _folder(tmp_path, 2)
    result = segment_folder(
        tmp_path / "two", folder, tmp_path / "out", profile_name="he", progress=False
    )
    assert result.processed == [] and len(result.failed) == 2
    reason = result.failed[str(folder / "img0.png")]
    assert str(tmp_path / "two" / "best.safetensors") in reason and "takes 2" in reason
    assert "trained on 3-channel images" in reason


def test_a_stain_normalising_model_on_fluorescence_names_the_model_and_profile(tmp_path):
    # each image failed with "preprocess.stain_norm='macenko' applies to RGB H&E/IHC images
    # only ...; set it to 'none'": a setting of the model's config.json, not the fix
    from mlseg.config import TrainConfig

    cfg = Config(
        train=TrainConfig(encoder="resnet18", encoder_depth=3),
        preprocess=PreprocessConfig(stain_norm="macenko"),
    )
    ckpt = _untrained_checkpoint(tmp_path / "he_model", cfg)
    folder = _folder(tmp_path, 1)
    result = segment_folder(
        ckpt, folder, tmp_path / "out", profile_name="fluorescence", progress=False
    )
    reason = result.failed[str(folder / "img0.png")]
    assert str(ckpt / "best.safetensors") in reason and "'fluorescence'" in reason
    assert "set it to 'none'" not in reason


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_an_image_stain_normalisation_leaves_alone_is_named_in_a_warning(
    tmp_path, monkeypatch, oracle, method
):
    """Blank glass and a slide faded to a tenth of its stain fall back to no normalisation;
    the faded one then gave 0 nuclei with nothing said."""
    image, _ = disc_image(64, 64)
    reference = write_image(tmp_path / "ref.png", image) if method == "reinhard" else None
    preprocess = PreprocessConfig(stain_norm=method, stain_reference=reference)
    folder = tmp_path / "in"
    folder.mkdir()
    od = -np.log((image.astype(float) + 1) / 256)
    write_image(folder / "tissue.png", image)
    write_image(folder / "faded.png", (256 * np.exp(-od * 0.1) - 1).round().astype(np.uint8))
    write_image(folder / "glass.png", np.full((64, 64, 3), 245, np.uint8))
    said = _segmented_saying(folder, tmp_path, monkeypatch, oracle, preprocess)
    named = [name for name, message in said.items() if method.capitalize() in message]
    assert sorted(named) == ["faded.png", "glass.png"]


def _segmented_saying(folder, tmp_path, monkeypatch, oracle, preprocess) -> dict[str, str]:
    """What ``mlseg segment`` of ``folder`` with the oracle model, preprocessing as
    ``preprocess`` says, by the file name each warning starts with (the last one's)."""
    import mlseg.model

    config = oracle.config.model_copy(update={"preprocess": preprocess})
    normalising = LoadedModel(**{**oracle.__dict__, "config": config})
    monkeypatch.setattr(mlseg.model, "load_model", lambda path, device="cpu": normalising)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segment_folder(
            "model", folder, tmp_path / "out", profile_name="he", progress=False
        )
    assert result.ok
    return {Path(str(w.message).split(":")[0]).name: str(w.message) for w in caught}


def test_a_haematoxylin_only_smear_is_not_warned_of_as_faded(tmp_path, monkeypatch, oracle):
    """A haematoxylin-only smear (thousands of pixels stained, one colour) was warned of as
    too little stain, 'on a faded or very pale slide the count may be too low'; the
    warning now says it holds one colour, and blank glass is still warned of as before."""
    _, labels = disc_image(64, 64)
    density = np.random.default_rng(0).uniform(0.6, 1.4, labels.max() + 1)
    density[0] = 0.02  # glass
    haematoxylin = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
    smear = (255 * np.exp(-density[labels][..., None] * haematoxylin)).astype(np.uint8)
    folder = tmp_path / "in"
    write_image(folder / "smear.png", smear)
    write_image(folder / "glass.png", np.full((64, 64, 3), 245, np.uint8))
    preprocess = PreprocessConfig(stain_norm="macenko")
    said = _segmented_saying(folder, tmp_path, monkeypatch, oracle, preprocess)
    assert "one colour" in said["smear.png"] and "faded" not in said["smear.png"]
    assert "fewer than 100 pixels" in said["glass.png"] and "faded" in said["glass.png"]


def test_a_black_tile_is_named_not_counted_silently(tmp_path, use_oracle):
    """A scanner's border tile of sensor noise gave 400 'nuclei' and tissue fraction 1 with
    nothing said; a tile with a thin black edge is tissue and is not named."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    black = np.clip(rng.normal(8, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    write_image(folder / "border.png", black)
    edged, _ = disc_image(64, 64)
    edged[:, :6] = black[:, :6]  # a tenth of it
    write_image(folder / "edged.png", edged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segment_folder(
            "model", folder, tmp_path / "out", profile_name="he", progress=False
        )
    assert result.ok
    named = [str(w.message) for w in caught if "black in every channel" in str(w.message)]
    assert len(named) == 1 and named[0].startswith(f"{folder / 'border.png'}: 100% of it")


def test_a_field_too_large_for_the_memory_left_is_named_before_it_is_worked_on(
    tmp_path, use_oracle, monkeypatch
):
    """A 20,000 x 20,000 px field on a 4-8 GB worker was killed by the system after minutes
    of work, its log naming neither the file nor the fix: segment and quantify name each
    such image once, before the work; an ordinary tile, with the memory there is, is not."""
    import mlseg.io

    folder = _folder(tmp_path, n=2)  # 110 x 90 and 110 x 100 px
    for i in range(2):
        write_labels(tmp_path / "masks" / f"img{i}_mask.png", disc_image(90 + 10 * i, 110)[1])

    def said(run: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seg = segment_folder("model", folder, tmp_path / run, profile_name="he", progress=False)
            quant = quantify_folder(
                tmp_path / "masks", folder, tmp_path / f"{run}q", profile_name="he", progress=False
            )
        assert seg.ok and quant.ok  # warned, not refused
        return [str(w.message) for w in caught if "memory" in str(w.message)]

    assert said("ordinary") == []
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: 100_000)
    lines = said("short")
    named = [re.match(r"(.*): (.*) px needs .* in mlseg (\w+),", line) for line in lines]
    assert [m.groups() if m else line for m, line in zip(named, lines, strict=True)] == [
        (str(folder / "img0.png"), "110 x 90", "segment"),
        (str(folder / "img1.png"), "110 x 100", "segment"),
        (str(folder / "img0.png"), "110 x 90", "quantify"),
        (str(folder / "img1.png"), "110 x 100", "quantify"),
    ]
    assert all("export it as tiles" in line for line in lines)


def test_a_field_enlarged_to_the_models_scale_beyond_the_memory_left_is_named_before(
    tmp_path, use_oracle, monkeypatch
):
    """The memory check sized a field as read, but segment first resamples it to the model's
    scale: a 20x field for a 40x model at 4x its pixels, a 4x scale estimate at 16x (a
    1024 px H&E field peaked 1.2 GB above the imports at 4x, 0.13 GB as read). With room
    for the field as read and not for it resampled, the file is named with the factor and
    what asked for it, once, and segmented as with memory to spare; a field kept at its
    own scale says nothing."""
    import mlseg.io
    from mlseg.segment import SEGMENT_MEMORY

    folder = _folder(tmp_path, n=1)  # 110 x 90 px
    image = folder / "img0.png"

    def run(name: str, pixel_size_um: float | None) -> tuple[dict, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = segment_folder(
                "model",
                folder,
                tmp_path / name,
                profile_name="he",
                progress=False,
                pixel_size_um=pixel_size_um,
            )
        assert result.ok  # warned, not refused
        summary = json.loads((tmp_path / name / "img0.json").read_text())
        kept = {k: summary[k] for k in ("count", "scale_factor", "scale_source")}
        return kept, [str(w.message) for w in caught if "memory" in str(w.message)]

    def said(factor: str, size: str, why: str) -> str:
        return (
            f"{image}: 110 x 90 px, resampled {factor}x to {size} px ({why}), needs about "
            "1.0 GiB of memory in mlseg segment, more than the 1.0 GiB this process has left, "
            "so the system may stop it part-way: crop the field or export it as tiles (QuPath: "
            "File > Export images) and segment those, or run on a machine with more memory"
        )

    use_oracle.pixel_size_um = 0.25  # a 40x model, a 20x field
    ample = run("ample", 0.5)
    assert ample[0]["scale_factor"] == 2.0 and ample[1] == []
    # room for the field as read, not for it resampled
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: SEGMENT_MEMORY.need(110 * 90))
    assert run("short", 0.5) == (
        ample[0],
        [said("2", "220 x 180", "its pixel size, 0.5 um, against the model's 0.25 um")],
    )
    assert run("own_scale", 0.25)[1] == []
    # no pixel size: the nuclei of the first pass (12 px) against the model's (48 px)
    use_oracle.pixel_size_um = None
    use_oracle.meta = {"nucleus_diameter_px": 48.0}
    estimated = run("estimated", None)
    assert estimated[0]["scale_source"] == "estimated" and estimated[0]["scale_factor"] == 4.0
    why = "the scale estimate: the nuclei of a first pass against the model's 48 px"
    assert estimated[1] == [said("4", "440 x 360", why)]


def test_no_real_tissue_tile_is_taken_for_black(shared_data):
    from mlseg.io import read_image

    for lab in ("gbm40_he", "cpm15_he"):
        for path in sorted((shared_data / lab / "original").iterdir()):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                warn_if_unlit(read_image(path), HE, path)


def test_bad_images_are_reported_and_the_run_goes_on(tmp_path, use_oracle):
    folder = _folder(tmp_path, 1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_image(folder / "grey.png", np.full((64, 64), 200, np.uint8))
    write_image(folder / "blank.png", np.full((70, 80, 3), 240, np.uint8))  # no nuclei
    write_image(folder / "tiny.png", disc_image(20, 25, spacing=20, radius=5)[0])  # < a tile
    out = tmp_path / "out"
    result = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert sorted(result.processed) == ["blank", "img0", "tiny"]
    assert json.loads((out / "tiny.json").read_text())["count"] == 1
    assert set(result.failed) == {str(folder / "broken.png"), str(folder / "grey.png")}
    assert "truncated" in result.failed[str(folder / "broken.png")]
    assert "1 channel" in result.failed[str(folder / "grey.png")]
    blank = json.loads((out / "blank.json").read_text())
    assert blank["count"] == 0
    assert len(pd.read_parquet(out / "blank_nuclei.parquet")) == 0


def test_an_image_that_may_not_be_read_is_reported_and_the_run_goes_on(
    tmp_path, monkeypatch, use_oracle
):
    """A file copied in with the wrong owner or mode (chmod 000) stopped the whole run at the
    skip check's hash of it: no later image was segmented and no summary.csv was written."""
    folder = _folder(tmp_path)
    locked = folder / "img1.png"
    real_open = Path.open

    def denied(self, *args, **kwargs):  # what a user without read permission sees (not root)
        if self.name == locked.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    out = tmp_path / "out"
    result = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert result.processed == ["img0", "img2"]
    assert "permission denied" in result.failed[str(locked)]
    assert pd.read_csv(out / "summary.csv")["image"].tolist() == ["img0", "img2"]
    monkeypatch.setattr(Path, "open", real_open)  # made readable: done on the next run
    again = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert again.processed == ["img1"] and again.skipped == ["img0", "img2"]


def test_units_and_profiles_are_checked_before_work(tmp_path, use_oracle):
    folder = _folder(tmp_path, 1)
    with pytest.raises(ConfigError, match="micron units"):
        segment_folder("m", folder, tmp_path / "o", profile_name="he", units="um", progress=False)
    # a table that misses images names them, not "pass --pixel-sizes" to a run that did
    with pytest.raises(ConfigError, match=r"1 of the 2 images \(img1\.png\) are not in the"):
        segment_folder(
            "m",
            _folder(tmp_path / "two", 2),
            tmp_path / "o",
            profile_name="he",
            units="um",
            pixel_sizes={"img0": 0.5},
            progress=False,
        )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        segment_folder("m", folder, tmp_path / "o", profile_name="nope", progress=False)
    result = segment_folder(
        "m",
        folder,
        tmp_path / "o",
        profile_name="he",
        units="um",
        pixel_size_um=0.5,
        progress=False,
    )
    table = pd.read_csv(tmp_path / "o" / "img0_nuclei.csv")
    assert "area_um2" in table.columns and "area_px" not in table.columns
    summary = json.loads((tmp_path / "o" / "img0.json").read_text())
    assert summary["pixel_size_source"] == "argument" and summary["density_per_mm2"] > 0
    assert result.ok


def test_a_per_image_table_gives_each_image_its_own_pixel_size(tmp_path, use_oracle):
    # The same discs, 3 um in radius, scanned at 20x (0.5 um) and at 40x (0.25 um), as PNGs
    # that carry no metadata: only the table says which is which.
    folder = tmp_path / "in"
    write_image(folder / "x20.png", disc_image(120, 120, spacing=20, radius=6)[0])
    write_image(folder / "x40.png", disc_image(240, 240, spacing=40, radius=12)[0])
    sizes = {"x20": 0.5, "x40.png": 0.25}  # file names work too
    run = dict(profile_name="he", units="um", pixel_sizes=sizes, progress=False)
    assert segment_folder("model", folder, tmp_path / "o", **run).processed == ["x20", "x40"]
    areas = {}
    for stem, um in (("x20", 0.5), ("x40", 0.25)):
        summary = json.loads((tmp_path / "o" / f"{stem}.json").read_text())
        assert summary["pixel_size_source"] == "table" and summary["pixel_size_um"] == um
        areas[stem] = pd.read_csv(tmp_path / "o" / f"{stem}_nuclei.csv")["area_um2"].median()
    assert areas["x20"] == pytest.approx(np.pi * 3**2, rel=0.15)
    assert areas["x40"] == pytest.approx(areas["x20"], rel=0.1)
    # Same table: nothing to redo. Another size for one image: its numbers change, so only
    # it is redone.
    assert segment_folder("model", folder, tmp_path / "o", **run).skipped == ["x20", "x40"]
    run["pixel_sizes"] = {"x20": 0.5, "x40": 0.3}
    again = segment_folder("model", folder, tmp_path / "o", **run)
    assert again.processed == ["x40"] and again.skipped == ["x20"]
    # A table for other images (a typo, another folder's) is said to be, not silently unused.
    run.update(pixel_sizes={"x_20": 0.5}, units="auto")
    with pytest.warns(UserWarning, match=r"names none of these 2 images \(it lists x_20;"):
        segment_folder("model", folder, tmp_path / "p", **run)
    # One size for every image beats the table (ingest reads them the other way round): the
    # table's sizes are said unused, not dropped without a word.
    run.update(pixel_sizes={"x20": 0.5, "x40": 0.25}, pixel_size_um=0.4)
    with pytest.warns(UserWarning, match=r"instead of the pixel-size table's sizes for 2 of"):
        segment_folder("model", folder, tmp_path / "q", **run)
    summary = json.loads((tmp_path / "q" / "x40.json").read_text())
    assert summary["pixel_size_source"] == "argument" and summary["pixel_size_um"] == 0.4


def test_a_rerun_with_another_pixel_size_for_every_image_redoes_them(tmp_path, use_oracle):
    """--pixel-size 0.25 after a run at 0.5: the images were skipped as done, their areas
    left at four times what the new size measures."""
    write_image(tmp_path / "in" / "a.png", disc_image(64, 64, spacing=20, radius=6)[0])
    run = dict(profile_name="he", units="um", progress=False)
    segment_folder("model", tmp_path / "in", tmp_path / "o", pixel_size_um=0.5, **run)
    assert segment_folder(
        "model", tmp_path / "in", tmp_path / "o", pixel_size_um=0.5, **run
    ).skipped == ["a"]
    again = segment_folder("model", tmp_path / "in", tmp_path / "o", pixel_size_um=0.25, **run)
    assert again.processed == ["a"]
    assert json.loads((tmp_path / "o" / "a.json").read_text())["pixel_size_um"] == 0.25


def test_a_pixel_size_row_naming_an_image_in_another_case_is_named_not_dropped() -> None:
    """HE_000.png for he_000.png is one file on macOS and Windows, where a table is typed; it
    is no image here, and the row was dropped without a word unless no row matched."""
    with pytest.warns(UserWarning) as said:
        assert own_pixel_sizes({"X20.png": 0.5, "x40": 0.25}, ["x20", "x40"]) == {"x40": 0.25}
    # said once, as a name in another case, not again as a row naming no image
    assert [str(w.message) for w in said] == [
        str(said[0].message)
    ] and "in another case than their files (X20 for x20)" in str(said[0].message)


def test_a_pixel_size_row_naming_no_image_is_named_where_an_image_has_none() -> None:
    """A misspelt row (x_40 for x40) left its image at the profile's size without a word
    unless no row matched; rows for images of other folders, beside these, are no mistake."""
    with pytest.warns(UserWarning, match=r"has 1 row\(s\) naming no image here \(x_40\).*\(x40\)"):
        assert own_pixel_sizes({"x20": 0.5, "x_40": 0.25}, ["x20", "x40"]) == {"x20": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        own_pixel_sizes({"x20": 0.5, "x40": 0.25, "y1": 0.3}, ["x20", "x40"])


def test_json_sidecars_give_each_image_its_pixel_size(tmp_path, use_oracle):
    # The same discs at 20x and 40x as PNGs, each with the sidecar BIDS microscopy writes.
    folder = tmp_path / "in"
    write_image(folder / "x20.png", disc_image(120, 120, spacing=20, radius=6)[0])
    write_image(folder / "x40.png", disc_image(240, 240, spacing=40, radius=12)[0])
    bids = '{{"PixelSize": [{0}, {0}], "PixelSizeUnits": "nm"}}'
    (folder / "x20.json").write_text(bids.format(500))
    (folder / "x40.json").write_text(bids.format(250))
    run = dict(profile_name="he", units="um", progress=False)
    assert segment_folder("model", folder, tmp_path / "o", **run).processed == ["x20", "x40"]
    areas = {}
    for stem, um in (("x20", 0.5), ("x40", 0.25)):
        summary = json.loads((tmp_path / "o" / f"{stem}.json").read_text())
        assert summary["pixel_size_source"] == "image metadata"
        assert summary["pixel_size_um"] == pytest.approx(um)
        areas[stem] = pd.read_csv(tmp_path / "o" / f"{stem}_nuclei.csv")["area_um2"].median()
    assert areas["x20"] == pytest.approx(np.pi * 3**2, rel=0.15)
    assert areas["x40"] == pytest.approx(areas["x20"], rel=0.1)
    # A corrected sidecar redoes its image only; the table, where given, overrides it.
    assert segment_folder("model", folder, tmp_path / "o", **run).skipped == ["x20", "x40"]
    (folder / "x40.json").write_text(bids.format(300))
    again = segment_folder("model", folder, tmp_path / "o", **run)
    assert again.processed == ["x40"] and again.skipped == ["x20"]
    summary = json.loads((tmp_path / "o" / "x40.json").read_text())
    assert summary["pixel_size_um"] == pytest.approx(0.3)
    table = segment_folder("model", folder, tmp_path / "t", pixel_sizes={"x40": 0.25}, **run)
    assert table.processed == ["x20", "x40"]
    summary = json.loads((tmp_path / "t" / "x40.json").read_text())
    assert summary["pixel_size_source"] == "table" and summary["pixel_size_um"] == 0.25


def test_outputs_are_never_written_among_the_inputs(tmp_path, use_oracle):
    # There, every <stem>.json would be read as the image's sidecar and the overlays as images.
    folder = tmp_path / "in"
    write_image(folder / "a.png", disc_image(64, 64)[0])
    with pytest.raises(DatasetError, match=r"output folder is the input folder"):
        segment_folder("model", folder, folder, profile_name="he", progress=False)
    with pytest.raises(DatasetError, match=r"output folder is the input folder"):
        quantify_folder(folder, None, folder / ".." / "in", profile_name="he", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


def test_quantify_folder_on_user_masks(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    image, truth = disc_image(80, 100)
    write_image(images / "a.png", image)
    write_image(images / "b.png", image)
    write_image(images / "c.png", image)
    write_image(images / "d.png", image[:50])
    write_labels(masks / "a_mask.png", truth)  # instance labels
    write_image(masks / "b_cp_masks.png", ((truth > 0) * 255).astype(np.uint8))  # binary
    write_labels(masks / "c.tif", truth)  # same stem, no suffix
    write_labels(masks / "d_labels.png", truth)  # wrong size
    write_labels(masks / "e_mask.png", truth)  # no image
    # a QuPath ROI export traced as outlines, and an ImageJ mask with black nuclei on white
    from skimage.segmentation import find_boundaries

    write_image(images / "f.png", image)
    write_labels(masks / "f_mask.png", np.where(find_boundaries(truth, mode="inner"), truth, 0))
    write_image(images / "g.png", image)
    write_image(masks / "g_mask.png", ((truth == 0) * 255).astype(np.uint8))
    # a class mask: every nucleus labelled 1 or 2 (its class), many nuclei per value
    write_image(images / "h.png", image)
    write_image(masks / "h_mask.png", np.where(truth > 0, truth % 2 + 1, 0).astype(np.uint8))
    out = tmp_path / "out"
    result = quantify_folder(masks, images, out, profile_name="he", progress=False)
    assert sorted(result.processed) == ["a", "b", "c"]
    assert "must match" in result.failed[str(masks / "d_labels.png")]
    assert "no image named e" in result.failed[str(masks / "e_mask.png")]
    assert "drawn as outlines, not filled" in result.failed[str(masks / "f_mask.png")]
    assert "background is labelled" in result.failed[str(masks / "g_mask.png")]
    assert "not one per nucleus" in result.failed[str(masks / "h_mask.png")]
    for stem in ("a", "b", "c"):
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["count"] == truth.max()
        assert summary["image_file"] == str(images / f"{stem}.png")  # the image, not its mask
    assert summary["labels_file"] == str(masks / "c.tif")
    # a corrected mask is measured again; the others are done
    write_labels(masks / "a_mask.png", np.where(truth == 1, 0, truth))
    again = quantify_folder(masks, images, out, profile_name="he", progress=False)
    assert again.processed == ["a"] and sorted(again.skipped) == ["b", "c"]
    assert json.loads((out / "a.json").read_text())["count"] == truth.max() - 1


def test_two_runs_into_one_folder_leave_each_image_measured_at_one_setting(tmp_path, monkeypatch):
    """A run that starts while another writes into the same folder (a person and a cron
    job, at two pixel sizes) waits for it: each image's ``<stem>.json``, which a rerun trusts
    as done, names the pixel size its tables were measured at."""
    import threading

    import mlseg.outputs

    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(64, 64)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    second_done = threading.Event()
    geojson_text = mlseg.outputs.geojson_text

    def slow_first(*args, **kwargs):  # the first run stops between its tables and its JSON
        if threading.current_thread().name == "first":
            # a second run that does not wait rewrites the image meanwhile
            second_done.wait(timeout=3)
        return geojson_text(*args, **kwargs)

    monkeypatch.setattr(mlseg.outputs, "geojson_text", slow_first)

    def run(px: float) -> None:
        quantify_folder(masks, images, out, profile_name="he", pixel_size_um=px, progress=False)

    first = threading.Thread(target=run, args=(0.25,), name="first")
    first.start()
    while first.is_alive() and not (out / "a_nuclei.csv").is_file():
        first.join(0.01)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run(0.5)
        second_done.set()
    first.join()
    summary = json.loads((out / "a.json").read_text())
    table = pd.read_csv(out / "a_nuclei.csv")
    assert summary["pixel_size_um"] == 0.5  # the later run's, whole
    assert table["area_um2"].sum() == pytest.approx((truth > 0).sum() * 0.5**2)
    assert any("another mlseg run is writing" in str(w.message) for w in said)


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(tmp_path):
    """A run killed while writing (SIGKILL, out of memory) leaves its atomic writes'
    temporaries, a large image's nuclei table among them; nightly runs into one folder piled
    them up. The next run removes those of its own naming, not a person's files, and not one
    written in the last minutes (a history.csv given in the folder is written outside the
    run's lock)."""
    import os
    import time

    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(64, 64)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    out.mkdir()
    killed = [out / ".nuclei.k3x_9a0q.tmp.parquet", out / ".a_overlay.abcd1234.tmp.png"]
    kept = [out / ".notes.tmp", out / "a.tmp.png", out / ".history.q1w2e3r4.tmp.csv"]
    for path in killed + kept:
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for path in (*killed, kept[0], kept[1]):
        os.utime(path, (hour_ago, hour_ago))
    quantify_folder(masks, images, out, profile_name="he", pixel_size_um=0.5, progress=False)
    assert not any(p.exists() for p in killed)
    assert all(p.exists() for p in kept)


def test_a_run_killed_writing_its_record_leaves_nothing_after_the_next_run(tmp_path):
    """A run killed while its record was written together (summary.csv, nuclei.parquet,
    histograms.png, run.json in a staging folder: mlseg.io.written_together) left that folder,
    the all-nuclei table in it, which no later run removed; a person's hidden folder stays."""
    import os
    import time

    from mlseg.io import staging_dir

    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(64, 64)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    killed = staging_dir(out / "outputs")  # as written_together makes it
    (killed / "nuclei.parquet").write_bytes(b"partial")
    kept = out / ".outputs.notes.tmp"
    kept.mkdir()
    hour_ago = time.time() - 3600
    for path in (killed / "nuclei.parquet", killed, kept):
        os.utime(path, (hour_ago, hour_ago))
    quantify_folder(masks, images, out, profile_name="he", pixel_size_um=0.5, progress=False)
    assert not killed.exists()
    assert kept.is_dir()
    assert (out / "nuclei.parquet").is_file()


def test_an_image_redone_for_new_settings_keeps_the_time_it_was_new(tmp_path):
    """finished_at says when an image was new (the weekly drift check's window): a rerun that
    redoes it for a new model or settings kept its bytes and keeps that time (a new model
    re-dated the whole inbox, and the next check measured every image again); an image
    replaced under its name is new."""
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    for name, seed in (("a", 0), ("b", 1)):
        image, truth = disc_image(64, 64, seed=seed)
        write_image(images / f"{name}.png", image)
        write_labels(masks / f"{name}_mask.png", truth)
    quantify_folder(masks, images, out, profile_name="he", pixel_size_um=0.5, progress=False)
    for stem in ("a", "b"):  # as segmented in an earlier week
        record = json.loads((out / f"{stem}.json").read_text())
        record["finished_at"] = "2026-11-02T02:00:07+0000"
        (out / f"{stem}.json").write_text(json.dumps(record))
    write_image(images / "b.png", disc_image(64, 64, seed=2)[0])  # a new scan under its name
    redone = quantify_folder(
        masks, images, out, profile_name="he", pixel_size_um=0.25, progress=False
    )
    assert sorted(redone.processed) == ["a", "b"]
    finished = pd.read_csv(out / "summary.csv", index_col="image")["finished_at"]
    assert finished["a"] == "2026-11-02T02:00:07+0000"
    assert finished["b"] != "2026-11-02T02:00:07+0000"


def test_a_redo_that_failed_keeps_the_time_the_image_was_new(tmp_path, monkeypatch):
    """A redo whose writing failed (disk full, killed) lost the image's record, and with it
    its first time: the next run dated it now, so a disk that filled while a new model redid
    the inbox put every image into the next weekly drift window. The time survives the failed
    redo, which still leaves the image to be redone, and nothing is left beside its outputs."""
    import errno

    import mlseg.outputs
    from mlseg.errors import OutputError
    from mlseg.io import atomic_path
    from mlseg.outputs import image_done

    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(64, 64)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    run = dict(profile_name="he", progress=False)
    quantify_folder(masks, images, out, pixel_size_um=0.5, **run)
    record = json.loads((out / "a.json").read_text())
    record["finished_at"] = "2026-11-01T02:00:07+0000"  # as segmented in an earlier week
    (out / "a.json").write_text(json.dumps(record))
    before = sorted(p.name for p in out.iterdir())

    def full_disk(path, labels):  # the redo's first file
        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(mlseg.outputs, "write_labels", full_disk)
        with pytest.raises(OutputError, match="no space left on device"):
            quantify_folder(masks, images, out, pixel_size_um=0.25, **run)
    assert image_done(out, "a") is None  # redone next run, never taken as done
    redone = quantify_folder(masks, images, out, pixel_size_um=0.25, **run)
    assert redone.processed == ["a"]
    assert json.loads((out / "a.json").read_text())["finished_at"] == record["finished_at"]
    finished = pd.read_csv(out / "summary.csv", index_col="image")["finished_at"]
    assert finished["a"] == record["finished_at"]
    assert sorted(p.name for p in out.iterdir()) == before


def test_quantify_without_images_redoes_a_mask_whose_sidecar_was_corrected(tmp_path):
    """Masks measured alone take their pixel size from the mask's own sidecar; a rerun after
    it was corrected measures them again, in the new microns."""
    masks, out = tmp_path / "masks", tmp_path / "out"
    write_labels(masks / "a_mask.png", disc_image(80, 100)[1])
    write_labels(masks / "b_mask.png", disc_image(80, 100)[1])
    (masks / "a_mask.json").write_text(json.dumps({"pixel_size_um": 0.5}))
    run = dict(profile_name="he", progress=False)
    assert sorted(quantify_folder(masks, None, out, **run).processed) == ["a", "b"]
    (masks / "a_mask.json").write_text(json.dumps({"pixel_size_um": 0.25}))
    again = quantify_folder(masks, None, out, **run)
    assert again.processed == ["a"] and again.skipped == ["b"]
    summary = json.loads((out / "a.json").read_text())
    assert summary["pixel_size_um"] == 0.25 and summary["pixel_size_source"] == "image metadata"


def _per_image_tables(out: Path) -> pd.DataFrame:
    """The per-image tables of the images in ``summary.csv``, one after the other."""
    stems = pd.read_csv(out / "summary.csv", dtype={"image": str})["image"]
    tables = [pd.read_parquet(out / f"{stem}_nuclei.parquet") for stem in stems]
    return pd.concat(tables, ignore_index=True)


def test_one_table_holds_every_nucleus_of_the_folder(tmp_path):
    """nuclei.parquet: the per-image tables of summary.csv's images, those skipped as done
    included; microns and pixels both kept; an image without nuclei adds columns, no rows."""
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(80, 100)
    for stem, labels in (("01", truth), ("b", truth), ("empty", np.zeros_like(truth))):
        write_image(images / f"{stem}.png", image)
        write_labels(masks / f"{stem}_mask.png", labels)
    run = dict(profile_name="he", pixel_sizes={"01": 0.5}, progress=False)
    assert len(quantify_folder(masks, images, out, **run).processed) == 3
    write_labels(masks / "b_mask.png", np.where(truth == 1, 0, truth))  # a corrected mask
    again = quantify_folder(masks, images, out, **run)
    assert again.processed == ["b"] and again.skipped == ["01", "empty"]
    nuclei = pd.read_parquet(out / "nuclei.parquet")
    pd.testing.assert_frame_equal(nuclei, _per_image_tables(out))
    assert nuclei.columns[0] == "image" and set(nuclei["image"]) == {"01", "b"}  # "01" as text
    assert (nuclei["image"] == "b").sum() == truth.max() - 1
    in_microns = nuclei["image"] == "01"
    assert nuclei["area_um2"].notna().eq(in_microns).all()
    assert nuclei["area_px"].notna().eq(~in_microns).all()
    # a rerun writes the same table; an image removed from the folder leaves it
    quantify_folder(masks, images, out, **run)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "nuclei.parquet"), nuclei)
    (images / "01.png").unlink()
    (masks / "01_mask.png").unlink()
    (images / "b.png").unlink()
    (masks / "b_mask.png").unlink()
    assert quantify_folder(masks, images, out, **{**run, "pixel_sizes": None}).skipped == ["empty"]
    alone = pd.read_parquet(out / "nuclei.parquet")
    assert alone.empty and {"image", "label", "area_px", "circularity"} <= set(alone.columns)


def test_quantify_a_twelve_bit_camera_file_as_its_eight_bit_picture(tmp_path):
    """A 12-bit camera's 16-bit file: OD against 4095, recorded as the summary's full_scale."""
    image, truth = disc_image(60, 60)
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "eight.png", image)
    write_image(images / "twelve.tif", np.round(image * (4095 / 255)).astype(np.uint16))
    write_labels(masks / "eight_mask.png", truth)
    write_labels(masks / "twelve_mask.png", truth)
    out = tmp_path / "out"
    assert quantify_folder(masks, images, out, profile_name="he", progress=False).ok
    eight, twelve = (pd.read_csv(out / f"{stem}_nuclei.csv") for stem in ("eight", "twelve"))
    assert np.allclose(twelve["hematoxylin_od_mean"], eight["hematoxylin_od_mean"], atol=0.01)
    assert json.loads((out / "eight.json").read_text())["full_scale"] == 255
    assert json.loads((out / "twelve.json").read_text())["full_scale"] == 4095


def test_a_grey_fluorescence_image_is_measured_and_segmented_with_the_shipped_profile(
    tmp_path, use_oracle
):
    """A single-channel camera TIFF (DAPI, Hoechst) is fluorescence's usual form: training
    takes it with the ``fluorescence`` profile, so quantify and segment take it too, and
    the intensity columns are the nucleus's mean raw counts."""
    _, truth = disc_image(60, 80)
    rng = np.random.default_rng(1)
    image = rng.normal(200, 30, truth.shape)
    image[truth > 0] = 2500 + rng.normal(0, 100, int((truth > 0).sum()))
    image = np.clip(image, 0, 4095).astype(np.uint16)
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "dapi.tif", image)
    write_labels(masks / "dapi_mask.tif", truth)
    out = tmp_path / "q"
    result = quantify_folder(masks, images, out, profile_name="fluorescence", progress=False)
    assert result.ok, result.failed
    table = pd.read_csv(out / "dapi_nuclei.csv").set_index("label")
    for label in (1, 5):
        assert table.loc[label, "intensity_mean_grey"] == pytest.approx(
            image[truth == label].mean()
        )
    seg = segment_folder(
        "model", images, tmp_path / "s", profile_name="fluorescence", progress=False
    )
    assert seg.ok, seg.failed
    assert read_mask(tmp_path / "s" / "dapi_labels.png").shape == truth.shape


def test_a_fluorescence_image_s_transparent_outside_measures_as_no_light(tmp_path):
    """An RGBA fluorescence export whose outside is transparent black: laid over white as a
    bright-field scan is, its nuclei there measured 255 (full scale) and tissue covered the
    field; laid over black they measure 0, as the no light they are, and tissue stops
    where the field does. The opaque nuclei measure as stored either way."""
    import cv2

    _, truth = disc_image(60, 80)
    grey = np.where(truth > 0, 120, 10).astype(np.uint8)  # bright nuclei, camera offset 10
    outside = np.zeros(truth.shape, bool)
    outside[:, 50:] = True  # transparent black beyond column 50
    rgba = np.dstack([np.where(outside, 0, grey)] * 3 + [np.where(outside, 0, 255)])
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    cv2.imwrite(str(images / "f.png"), cv2.cvtColor(rgba.astype(np.uint8), cv2.COLOR_RGBA2BGRA))
    write_labels(masks / "f_mask.png", truth)
    profiles = tmp_path / "profiles.yaml"  # the shipped fluorescence profile, tissue measured
    profiles.write_text(
        "profiles:\n  fl:\n    stain: fluorescence\n    tissue_intensity_threshold: 0.2\n"
    )
    out = tmp_path / "out"
    result = quantify_folder(
        masks, images, out, profile_name="fl", profiles_file=profiles, progress=False
    )
    assert result.ok, result.failed
    table = pd.read_csv(out / "f_nuclei.csv").set_index("label")
    inside = [k for k in np.unique(truth)[1:] if not outside[truth == k].any()]
    beyond = [k for k in np.unique(truth)[1:] if outside[truth == k].all()]
    assert inside and beyond
    assert (table.loc[inside, "intensity_mean_r"] == 120).all()
    assert (table.loc[beyond, "intensity_max_r"] == 0).all()
    in_field = (truth[:, :50] > 0).mean() * 50 / 80  # the bright nuclei of the field
    assert json.loads((out / "f.json").read_text())["tissue_fraction"] == pytest.approx(in_field)


def test_a_fluorescence_model_measured_as_bright_field_is_named(tmp_path, use_oracle):
    """A DAPI field segmented by a fluorescence model with the he profile (the README's
    example line) got haematoxylin optical densities and all of it as tissue, silently."""
    use_oracle.meta = {"profile_settings": get_profile("fluorescence").model_dump(mode="json")}
    image, _ = disc_image(60, 60)
    images = tmp_path / "images"
    write_image(images / "dapi.png", 255 - image)  # bright nuclei on a dark field
    for name, named in (("fluorescence", False), ("ihc", True), ("he", True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = segment_folder(
                "model", images, tmp_path / name, profile_name=name, progress=False
            )
        assert result.ok, result.failed
        said = [str(w.message) for w in caught if "trained with profile" in str(w.message)]
        assert len(said) == named and all("'fluorescence'" in text for text in said)


def test_a_profile_preprocess_the_model_was_not_trained_with_is_named(tmp_path, use_oracle):
    """A profile given at segment time whose preprocess (intensity normalisation, stain
    normalisation, its reference) differs from the training profile's and from what the
    model does changed nothing, and nothing said so: the model normalises as it was trained.
    The training profile itself (he: Macenko, under a run config that turned it off) and a
    profile asking for what the model does anyway are not named."""
    use_oracle.meta = {"profile_settings": HE.model_dump(mode="json")}  # model: stain_norm none
    profiles = tmp_path / "profiles.yaml"
    he = HE.model_dump(mode="json", exclude={"name", "preprocess"})
    profiles.write_text(
        json.dumps(
            {
                "profiles": {
                    "he": {**he, "preprocess": HE.preprocess.model_dump(mode="json")},
                    "same": {**he, "preprocess": {"stain_norm": "none"}},
                    "other": {**he, "preprocess": {"intensity_norm": "zscore"}},
                }
            }
        )
    )
    images = _folder(tmp_path, 2)
    labels = {}
    for name in ("he", "same", "other"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = segment_folder(
                "model", images, tmp_path / name, profile_name=name, profiles_file=profiles,
                progress=False,
            )  # fmt: skip
        assert result.ok, result.failed
        said = [str(w.message) for w in caught if "as it was trained" in str(w.message)]
        labels[name] = read_mask(tmp_path / name / "img0_labels.png")
        if name == "other":
            assert len(said) == 1, said  # once per run, not per image
            assert "preprocess.intensity_norm zscore" in said[0] and "none" in said[0]
        else:
            assert not said, said
    assert np.array_equal(labels["other"], labels["he"])  # not applied, as the warning says


def test_quantify_cpm15_ground_truth_counts(tmp_path, shared_data):
    """Counts per image equal the number of labels of the real annotations."""
    root = shared_data / "cpm15_he"
    result = quantify_folder(
        root / "masks", root / "original", tmp_path, profile_name="he", progress=False
    )
    assert result.ok and len(result.processed) == 15
    for summary in result.summaries:
        labels = read_mask(root / "masks" / f"{summary['image']}_mask.png")
        assert summary["count"] == len(np.unique(labels)) - 1


def _untrained_checkpoint(folder: Path, cfg: Config | None = None) -> Path:
    """A small untrained three-class model (``cfg.train``'s; by default a U-Net) saved as
    training saves one, without a pixel size or a nucleus diameter."""
    from mlseg.config import TrainConfig
    from mlseg.model import build_model, save_checkpoint

    cfg = cfg or Config(train=TrainConfig(encoder="resnet18", encoder_depth=3))
    save_checkpoint(
        folder, build_model(cfg.train, 3, 3), cfg, target="three_class", classes=3,
        in_channels=3, fingerprint_hash=None, metrics={}, pixel_size_um=None, name="best",
    )  # fmt: skip
    return folder


def test_a_model_without_a_diameter_record_is_warned_about_once_per_run(tmp_path):
    """The warning is about the model, not about each image (pandas' table building resets
    Python's once-per-line memory, so it used to repeat for every image); and it is said in
    every run, not only in a notebook's or a worker's first."""
    ckpt = _untrained_checkpoint(tmp_path / "old_model")
    images = _folder(tmp_path, 3)
    for run in ("first", "second"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            result = segment_folder(ckpt, images, tmp_path / run, profile_name="he", progress=False)
        assert len(result.processed) == 3
        said = [w for w in caught if "records no nucleus_diameter_px" in str(w.message)]
        assert len(said) == 1, run


def test_a_model_without_a_diameter_says_why(tmp_path):
    """A model whose training masks held too few nuclei records its diameter as unknown; the
    warning said it was 'trained before mlseg learnt it', sending a lab to retrain with a
    newer mlseg instead of giving masks with more nuclei or the pixel size."""
    ckpt = _untrained_checkpoint(tmp_path / "model")  # its diameter recorded as unknown
    images = _folder(tmp_path, 1)

    def said(run: str) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segment_folder(ckpt, images, tmp_path / run, profile_name="he", progress=False)
        return next(str(w.message) for w in caught if "nucleus_diameter_px" in str(w.message))

    assert "fewer than 5 nuclei" in said("unknown")
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["nucleus_diameter_px"]  # as a model saved before mlseg recorded it
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert "trained before mlseg learnt it" in said("old")


def test_a_model_whose_saved_profile_a_later_mlseg_refuses_still_segments(tmp_path):
    """A model trained before tissue_intensity_threshold in an he profile was refused keeps
    that profile in meta.json: segment, given a valid profile, failed every image with
    'meta.json (profile_settings): bad value', from the check that only compares stains."""
    import json

    from mlseg.config import TrainConfig, get_profile
    from mlseg.model import build_model, save_checkpoint

    train = TrainConfig(encoder="resnet18", encoder_depth=3)
    ckpt = tmp_path / "model"
    save_checkpoint(
        ckpt, build_model(train, 3, 3), Config(train=train), target="three_class", classes=3,
        in_channels=3, fingerprint_hash=None, metrics={}, pixel_size_um=None, name="best",
        profile=get_profile("he"),
    )  # fmt: skip
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["profile_settings"] |= {"name": "he_lab", "tissue_intensity_threshold": 0.1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    result = segment_folder(
        ckpt, _folder(tmp_path, 2), tmp_path / "out", profile_name="he", progress=False
    )
    assert len(result.processed) == 2 and not result.failed


def test_print_resolutions_are_named_in_one_warning_per_run(tmp_path):
    """A folder whose TIFFs all say 72 dpi (an image program's default): one warning naming
    every file, not one per image; a size from the table silences its image's."""
    import tifffile

    from mlseg.pixel_size import ImplausiblePixelSizeWarning

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    image, truth = disc_image(60, 60)
    for stem in ("a", "b", "c"):
        tifffile.imwrite(
            images / f"{stem}.tif", image, photometric="rgb", resolution=(72, 72),
            resolutionunit="INCH",
        )  # fmt: skip
        write_labels(masks / f"{stem}_mask.png", truth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quantify_folder(
            masks, images, tmp_path / "out", profile_name="he", progress=False,
            pixel_sizes={"c": 0.5},
        )  # fmt: skip
    assert result.ok
    said = [w for w in caught if issubclass(w.category, ImplausiblePixelSizeWarning)]
    assert len(said) == 1
    assert "2 image(s)" in str(said[0].message) and "c.tif" not in str(said[0].message)
    assert {s["image"]: s["pixel_size_source"] for s in result.summaries} == {
        "a": "unknown",
        "b": "unknown",
        "c": "table",
    }


def test_cli_segment_redoes_images_when_the_model_config_or_meta_is_edited(tmp_path, capsys):
    """The skip check knew a model by its weights: after its config.json's stain_norm was
    edited, or its meta.json's nucleus diameter (bench/robustness.py sets it), a rerun
    printed 'segmented 0, skipped 3' and kept the outputs of the model as it was. What
    shapes predictions redoes the images; what training rewrites (metrics, times, its
    learning rate) still skips them."""
    from mlseg.cli import main
    from mlseg.config import TrainConfig
    from mlseg.model import build_model, save_checkpoint

    train = TrainConfig(encoder="resnet18", encoder_depth=3)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt, build_model(train, 3, 3), Config(train=train), target="three_class", classes=3,
        in_channels=3, fingerprint_hash=None, metrics={}, pixel_size_um=None, name="best",
        nucleus_diameter_px=12.0,
    )  # fmt: skip
    folder = _folder(tmp_path, 2)
    args = ["segment", str(ckpt), str(folder), str(tmp_path / "seg"), "--profile", "he"]

    def rerun() -> str:
        assert main([*args, "--tile", "64", "--no-progress"]) == 0
        return capsys.readouterr().out

    def edit(name: str, change) -> None:
        data = json.loads((ckpt / name).read_text())
        change(data)
        (ckpt / name).write_text(json.dumps(data))

    assert "segmented 2, skipped 0" in rerun()
    edit("meta.json", lambda m: m["checkpoints"]["best"].update(metrics={"val_dice": 0.9}))
    edit("config.json", lambda c: c["train"].update(lr=0.5))
    assert "segmented 0, skipped 2" in rerun()
    edit("config.json", lambda c: c["preprocess"].update(stain_norm="macenko"))
    assert "segmented 2, skipped 0" in rerun()
    edit("meta.json", lambda m: m.update(nucleus_diameter_px=16.0))
    assert "segmented 2, skipped 0" in rerun()
    assert "segmented 0, skipped 2" in rerun()


def test_a_model_retrained_or_resized_under_the_same_names_is_another_model(tmp_path):
    """What <stem>.json records as the model, which decides whether a rerun redoes its images:
    new weights saved as the same best.safetensors (a retrained model), another model pixel
    size in meta.json, or another encoder is another model; its metrics are not."""
    from mlseg.config import TrainConfig
    from mlseg.segment import model_identity

    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"epoch 10")
    cfg, meta = Config(), {"pixel_size_um": 0.5, "metrics": {"val_dice": 0.8}}
    before = model_identity(weights, cfg, meta)
    assert model_identity(weights, cfg, {**meta, "metrics": {"val_dice": 0.9}}) == before
    assert model_identity(weights, cfg, {**meta, "pixel_size_um": 0.25}) != before
    other = Config(train=TrainConfig(encoder="resnet18"))
    assert cfg.train.encoder != "resnet18" and model_identity(weights, other, meta) != before
    weights.write_bytes(b"epoch 20")
    assert model_identity(weights, cfg, meta) != before


def test_cli_segment_with_a_real_checkpoint_and_quantify(tmp_path):
    from mlseg.cli import main
    from mlseg.config import TrainConfig
    from mlseg.model import build_model, save_checkpoint

    train = TrainConfig(encoder="resnet18", encoder_depth=3)
    model = build_model(train, 3, 3)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt,
        model,
        Config(train=train),
        target="three_class",
        classes=3,
        in_channels=3,
        fingerprint_hash=None,
        metrics={},
        pixel_size_um=None,
        name="best",
    )
    folder = _folder(tmp_path, 2)
    out = tmp_path / "seg"
    args = ["segment", str(ckpt), str(folder), str(out), "--profile", "he", "--tile", "64"]
    assert main([*args, "--no-progress"]) == 0
    assert (out / "img0.json").is_file() and (out / "summary.csv").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["inference"]["tile_size"] == 64
    before = json.loads((out / "img0.json").read_text())["settings"]
    assert main([*args, "--no-progress", "--tta"]) == 0  # other settings: redone
    assert json.loads((out / "img0.json").read_text())["settings"] != before
    assert main([*args, "--no-progress", "--adapt-bn"]) == 0
    assert json.loads((out / "run.json").read_text())["inference"]["adapt_bn"] is True
    masks = tmp_path / "masks"
    image, truth = disc_image(60, 60)
    write_image(tmp_path / "imgs" / "x.png", image)
    write_labels(masks / "x_mask.png", truth)
    assert (
        main(
            [
                "quantify",
                str(masks),
                str(tmp_path / "imgs"),
                str(tmp_path / "q"),
                "--profile",
                "ihc",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "ihc_class" in pd.read_csv(tmp_path / "q" / "x_nuclei.csv").columns
    assert (
        main(
            [
                "quantify",
                str(masks),
                str(tmp_path / "imgs"),
                str(tmp_path / "q2"),
                "--profile",
                "nope",
                "--no-progress",
            ]
        )
        == 2
    )


def test_a_pan_model_segments_small_images_and_small_tiles(tmp_path):
    """PAN (trainable on 128 px patches) failed every image with a RuntimeError traceback
    ('Output size is too small') at inference.tile_size 64, and images under 97 px at the
    default 512: its pyramid pooling needs 128 px, small images were padded to 32's."""
    from mlseg.config import TrainConfig
    from mlseg.model import load_model

    def saved(arch: str) -> Path:
        train = TrainConfig(arch=arch, encoder="resnet18", patch_size=128)
        infer = InferenceConfig(tile_size=64, batch_size=4, device="cpu", auto_scale=False)
        return _untrained_checkpoint(tmp_path / arch, Config(train=train, inference=infer))

    loaded = load_model(saved("PAN"))
    for tile, tta in [(64, False), (512, True)]:
        cfg = loaded.config.inference.model_copy(update={"tile_size": tile, "tta": tta})
        for h, w in [(20, 150), (80, 80)]:
            image, _ = disc_image(h, w)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                labels, probs = predict_labels(loaded, image, HE, cfg)
            assert labels.shape == (h, w) and probs.shape == (3, h, w)
    assert loaded.min_side == 128
    assert load_model(saved("Unet")).min_side == 32  # its tiles as before


def test_print_resolution_metadata_is_not_taken_for_a_pixel_size(tmp_path, use_oracle):
    import tifffile

    image, truth = disc_image(120, 100)
    folder = tmp_path / "in"
    folder.mkdir()
    # What an image editor writes by default: 72 dots per inch, which would read as 353 um.
    tifffile.imwrite(folder / "edited.tif", image, photometric="rgb", resolution=(72, 72))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"edited.tif \(352.8 um\).*ignored"):
        result = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert result.processed == ["edited"], result.failed
    summary = json.loads((out / "edited.json").read_text())
    assert summary["pixel_size_source"] == "unknown" and summary["pixel_size_um"] is None
    assert summary["count"] == truth.max()


def test_a_pixel_size_in_nanometres_is_refused_before_any_work(tmp_path, use_oracle):
    image, _ = disc_image(64, 64)
    folder = tmp_path / "in"
    write_image(folder / "a.png", image)
    with pytest.raises(DatasetError, match=r"--pixel-size: 250 um per pixel.*in nanometres"):
        segment_folder("model", folder, tmp_path / "out", profile_name="he", pixel_size_um=250)
    assert not (tmp_path / "out").exists()


def test_tiled_16bit_tiff_with_pixel_size_metadata(tmp_path, use_oracle):
    import tifffile

    image, truth = disc_image(150, 130)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(
        folder / "big.tif",
        image.astype(np.uint16) * 257,
        tile=(64, 64),
        photometric="rgb",
        resolution=(20000, 20000),  # pixels per centimetre: 0.5 um per pixel
        resolutionunit="CENTIMETER",
    )
    out = tmp_path / "out"
    result = segment_folder("model", folder, out, profile_name="he", progress=False)
    assert result.processed == ["big"], result.failed
    summary = json.loads((out / "big.json").read_text())
    assert summary["pixel_size_source"] == "image metadata"
    assert summary["pixel_size_um"] == pytest.approx(0.5)
    assert summary["count"] == truth.max()
    table = pd.read_parquet(out / "big_nuclei.parquet")
    assert "area_um2" in table.columns and table["intensity_mean_r"].max() > 255


def test_two_images_with_one_stem_are_refused_not_one_skipped_as_done(tmp_path):
    import tifffile

    image, truth = disc_image(60, 60)
    write_image(tmp_path / "img" / "a.png", image)
    tifffile.imwrite(tmp_path / "img" / "A.tif", image, photometric="rgb")  # another scan
    write_labels(tmp_path / "lab" / "a_mask.png", truth)
    with pytest.raises(DatasetError, match=r"img: A\.tif and a\.png differ only in extension"):
        quantify_folder(tmp_path / "lab", tmp_path / "img", tmp_path / "o", profile_name="he")
    assert not (tmp_path / "o").exists()


def test_an_ome_tiff_is_named_by_its_name_less_ome_tif(tmp_path, use_oracle):
    """Bio-Formats, OMERO, QuPath and Fiji write ``x.ome.tif``: its mask is ``x_mask.tif``,
    its outputs ``x_...`` and its pixel-size table row ``x``."""
    import tifffile

    image, truth = disc_image(60, 80)
    (tmp_path / "img").mkdir()
    tifffile.imwrite(tmp_path / "img" / "x.ome.tif", image, photometric="rgb")
    tifffile.imwrite(tmp_path / "img" / "y.OME.TIFF", image, photometric="rgb")
    write_labels(tmp_path / "lab" / "x_mask.tif", truth)
    write_labels(tmp_path / "lab" / "y.ome_mask.png", truth)  # as it was named before
    run = dict(profile_name="he", units="um", pixel_sizes={"x": 0.5, "y": 0.25}, progress=False)
    for result, out in (
        (quantify_folder(tmp_path / "lab", tmp_path / "img", tmp_path / "q", **run), "q"),
        (segment_folder("model", tmp_path / "img", tmp_path / "s", **run), "s"),
    ):
        assert result.ok and sorted(result.processed) == ["x", "y"]
        assert (tmp_path / out / "x_labels.png").is_file()
        for stem, um in (("x", 0.5), ("y", 0.25)):
            summary = json.loads((tmp_path / out / f"{stem}.json").read_text())
            assert summary["pixel_size_source"] == "table" and summary["pixel_size_um"] == um


def test_an_image_and_an_ome_tiff_of_one_stem_are_refused_naming_both(tmp_path):
    import tifffile

    image, _ = disc_image(60, 60)
    write_image(tmp_path / "img" / "a.tif", image)
    tifffile.imwrite(tmp_path / "img" / "a.ome.tif", image, photometric="rgb")
    with pytest.raises(DatasetError, match=r"a\.ome\.tif and a\.tif differ only in extension"):
        segment_folder("model", tmp_path / "img", tmp_path / "o", profile_name="he")


def test_images_in_subfolders_are_named_not_silently_left_out(tmp_path):
    image, truth = disc_image(40, 40)
    for case in ("case1", "case2"):
        write_image(tmp_path / "img" / case / "a.png", image)
    write_labels(tmp_path / "lab" / "a_mask.png", truth)
    run = dict(profile_name="he", progress=False)
    with pytest.raises(DatasetError, match=r"img: no images here, only in its subfolders \(case1"):
        quantify_folder(tmp_path / "lab", tmp_path / "img", tmp_path / "o", **run)
    write_image(tmp_path / "img" / "a.png", image)
    with pytest.warns(UserWarning, match=r"subfolders \(case1, case2\) are not segmented"):
        assert quantify_folder(tmp_path / "lab", tmp_path / "img", tmp_path / "o", **run).ok
    # its own output folder inside the input folder is not one of them
    assert quantify_folder(tmp_path / "lab", None, tmp_path / "lab" / "out", **run).ok
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantify_folder(tmp_path / "lab", None, tmp_path / "lab" / "out", **run).skipped
    # nor is it after a first run into it was killed before writing its run.json
    (tmp_path / "lab" / "out" / "run.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantify_folder(tmp_path / "lab", None, tmp_path / "lab" / "out", **run).skipped


class BrightIsNucleus(nn.Module):
    """Three-class logits from brightness above 0.15 of full scale (grey fluorescence)."""

    def forward(self, x):
        interior = 60.0 * (x.mean(1, keepdim=True) - 0.15)
        return torch.cat([-interior, interior, torch.full_like(interior, -6.0)], dim=1)


def test_a_16_bit_image_keeps_its_full_scale_when_resampled(tmp_path):
    """A dim 12-bit camera image (nuclei at 900 of 4095, one brighter pixel at 1100): the
    bit depth is judged on the stored values. Judged after resampling to the model's pixel
    size, the brightest pixel averaged below 1024 made it a 10-bit image, 4x brighter, and
    its background a nucleus."""
    rng = np.random.default_rng(0)
    image = np.full((128, 128, 1), 300, np.uint16)
    truth = np.zeros((128, 128), np.int32)
    yy, xx = np.mgrid[:128, :128]
    for n, (cy, cx) in enumerate(((32, 32), (32, 96), (96, 32), (96, 96)), start=1):
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] = n
    image[truth > 0, 0] = 900
    image[33, 33, 0] = 1100
    image += rng.integers(0, 20, image.shape, dtype=np.uint16)
    fluo = get_profile("fluorescence")
    cfg = InferenceConfig(tile_size=64, batch_size=4)
    counts = {}
    for model_um in (0.25, 0.5):  # the image is 0.25 um per pixel: as is, then halved
        loaded = LoadedModel(
            model=BrightIsNucleus().eval(),
            config=Config(),
            target="three_class",
            classes=3,
            in_channels=1,
            pixel_size_um=model_um,
            path=tmp_path / "stand-in.safetensors",
        )
        labels, _ = predict_labels(loaded, image, fluo, cfg, pixel_size_um=0.25)
        counts[model_um] = int(labels.max())
        assert labels[0, 0] == 0, f"background taken for a nucleus at model {model_um} um"
    assert counts == {0.25: 4, 0.5: 4}


def test_a_redo_that_stops_half_way_is_redone_not_skipped(tmp_path, monkeypatch):
    """Run 1 in pixels, run 2 in microns stopped after some outputs were replaced, run 3 in
    pixels again: run 1's <stem>.json must not pass the mixed outputs off as its own."""
    import mlseg.outputs

    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(80, 100)
    write_image(images / "a.png", image)
    write_labels(masks / "a_mask.png", truth)
    assert quantify_folder(masks, images, out, profile_name="he", progress=False).processed
    real = mlseg.outputs.write_text

    def stop_at_geojson(path, text):
        if str(path).endswith(".geojson"):
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(mlseg.outputs, "write_text", stop_at_geojson)
    with pytest.raises(KeyboardInterrupt):
        quantify_folder(masks, images, out, profile_name="he", pixel_size_um=0.25, progress=False)
    monkeypatch.setattr(mlseg.outputs, "write_text", real)
    again = quantify_folder(masks, images, out, profile_name="he", progress=False)
    assert again.processed == ["a"] and not again.skipped
    assert "area_px" in pd.read_csv(out / "a_nuclei.csv").columns


def test_run_outputs_and_user_mistakes_get_one_line_errors(tmp_path):
    """An image named run.* would lose its record to the run's run.json; an output "folder"
    that is a file, or a config that is not text, is named before any work is done."""
    from mlseg.cli import main

    images, masks = tmp_path / "images", tmp_path / "masks"
    image, truth = disc_image(40, 40)
    write_image(images / "run.png", image)
    write_labels(masks / "run_mask.png", truth)
    with pytest.raises(DatasetError, match=r"run\.png: an image named 'run' would have its record"):
        quantify_folder(masks, images, tmp_path / "out", profile_name="he", progress=False)
    (images / "run.png").rename(images / "a.png")
    (masks / "run_mask.png").rename(masks / "a_mask.png")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(DatasetError, match=r"afile: a file, not an output folder"):
        quantify_folder(masks, images, afile, profile_name="he", progress=False)
    assert main(["train", str(images / "a.png"), "--data", str(tmp_path)]) == 2


def test_a_long_image_name_is_measured_while_its_outputs_fit_and_refused_by_name_beyond(tmp_path):
    """A 240-character stem gives 255-byte outputs (<stem>_nuclei.geojson), as long as a file
    name may be: they are written (their temporary files' names too); a longer stem is refused
    before any output is written, not halfway through the run."""
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    image, truth = disc_image(40, 40)
    stem = "s" * 240
    write_image(images / f"{stem}.png", image)
    write_labels(masks / f"{stem}_mask.png", truth)
    result = quantify_folder(masks, images, out, profile_name="he", progress=False)
    assert result.processed == [stem] and (out / f"{stem}_nuclei.geojson").is_file()
    write_image(images / f"{stem}xx.png", image)
    write_labels(masks / f"{stem}xx_mask.png", truth)
    with pytest.raises(DatasetError, match=r"would be 257 bytes, more than the 255"):
        quantify_folder(masks, images, tmp_path / "out2", profile_name="he", progress=False)
    assert not (tmp_path / "out2").exists()


def test_an_image_named_entry_that_is_no_file_is_named_in_a_warning(tmp_path):
    """A link to an image on a share that is not mounted was left out without a word: the
    run said 'segmented 1' as if the folder held one image."""
    import os

    images = tmp_path / "images"
    image, _ = disc_image(40, 40)
    write_image(images / "a.png", image)
    (images / "b.png").symlink_to(tmp_path / "unmounted" / "b.png")
    (images / "c.png").symlink_to("c.png")
    os.mkfifo(images / "d.png")
    with pytest.warns(UserWarning) as caught:
        assert [p.name for p in list_images(images)] == ["a.png"]
    said = " ".join(str(w.message) for w in caught)
    assert "b.png: a link to" in said and "which is missing" in said
    assert "c.png: a link loop" in said and "d.png: not a regular file" in said


def test_an_image_in_a_format_mlseg_does_not_read_is_named_in_a_warning(tmp_path):
    """A BMP or a WebP among the PNGs of an inbox was left out without a word, run after
    run: the summary said 'segmented 1' as if the folder held one image."""
    import cv2

    images = tmp_path / "images"
    image, _ = disc_image(40, 40)
    write_image(images / "a.png", image)
    for name in ("b.bmp", "c.webp"):
        cv2.imwrite(str(images / name), image)
    with pytest.warns(UserWarning, match=r"b\.bmp.*c\.webp: images in a format .*PNG or TIFF"):
        assert [p.name for p in list_images(images)] == ["a.png"]


def test_quantify_masks_saved_beside_their_images(tmp_path):
    """Cellpose saves x_cp_masks.png next to x.png: one folder for both."""
    both = tmp_path / "both"
    image, truth = disc_image(80, 100)
    write_image(both / "x.png", image)
    write_labels(both / "x_cp_masks.png", truth)
    result = quantify_folder(both, both, tmp_path / "out", profile_name="he", progress=False)
    assert result.processed == ["x"] and not result.failed
    assert len(pd.read_csv(tmp_path / "out" / "x_nuclei.csv")) == truth.max()


def test_a_scale_estimate_stopped_at_its_limit_is_named():
    """On noise or a stain the model never saw, its first pass cuts texture into small
    pieces and the estimate asks for the largest enlargement (4x, 2,491 'nuclei' on noise):
    the image is named, as a scan that far from the training magnification would be."""
    from mlseg.scale import ScaleEstimate
    from mlseg.segment import warn_if_scale_at_limit

    with pytest.warns(UserWarning, match=r"noise\.png: its scale estimate stopped at its limit"):
        warn_if_scale_at_limit(ScaleEstimate(4.0, "estimated", 4.9, 26.0, 3), "noise.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_scale_at_limit(ScaleEstimate(2.0, "estimated", 13.0, 26.0, 2), "x.png")
        warn_if_scale_at_limit(ScaleEstimate(4.0, "pixel_size"), "y.png")  # declared: trusted


def test_a_given_pixel_size_beyond_the_scale_limits_is_named():
    """2.5 um given for a 0.25 um tile (a decimal point slipped) resampled it 10x, where a
    40x model found no nucleus, without a word: the image is named, with the factor."""
    from mlseg.scale import ScaleEstimate
    from mlseg.segment import warn_if_scale_at_limit

    for factor in (10.0, 0.1):
        with pytest.warns(UserWarning, match=rf"y\.png: its pixel size is {factor:g}x the model"):
            warn_if_scale_at_limit(ScaleEstimate(factor, "pixel_size"), "y.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_scale_at_limit(ScaleEstimate(0.25, "pixel_size"), "z.png")  # a 10x scan


def test_cli_stain_tta_is_refused_where_it_would_change_nothing(tmp_path, capsys):
    """``--stain-tta`` acts on Macenko-normalised H&E/IHC input only: given a fluorescence
    profile, or a model trained without Macenko, it ran as if left out, said nothing and
    ``run.json`` recorded its gains as used. It is refused up front, saying why; with a
    Macenko model on H&E it runs."""
    from mlseg.cli import main
    from mlseg.config import PreprocessConfig, TrainConfig
    from mlseg.model import build_model, save_checkpoint

    train = TrainConfig(encoder="resnet18", encoder_depth=3)
    for name, stain_norm in (("plain", "none"), ("macenko", "macenko")):
        save_checkpoint(
            tmp_path / name, build_model(train, 3, 3),
            Config(train=train, preprocess=PreprocessConfig(stain_norm=stain_norm)),
            target="three_class", classes=3, in_channels=3, fingerprint_hash=None, metrics={},
            pixel_size_um=None, name="best", nucleus_diameter_px=12.0,
        )  # fmt: skip
    folder = _folder(tmp_path, 1)

    def segment(model: str, profile: str) -> int:
        out = tmp_path / f"seg-{model}-{profile}"
        args = [str(tmp_path / model), str(folder), str(out), "--profile", profile]
        return main(["segment", *args, "--tile", "64", "--stain-tta", "--no-progress"])

    assert segment("plain", "he") != 0
    err = capsys.readouterr().err
    assert "--stain-tta" in err and "preprocess.stain_norm: none" in err
    assert segment("plain", "fluorescence") != 0
    assert "profile 'fluorescence' is for fluorescence images" in capsys.readouterr().err
    assert not (tmp_path / "seg-plain-he").exists()
    assert segment("macenko", "he") == 0


def test_a_resampled_image_is_streamed_by_its_size_on_the_grid_the_model_sees(oracle):
    """Memory follows the resampled image: a 100x120 tile at twice the model's pixel size is
    enlarged to 200x240, over ``stream_min_pixels`` though the tile is under it, so it is
    labelled band by band, and its labels come back on the tile's own (non-square) grid with
    every disc; a tile of exactly ``stream_min_pixels`` is not "over" it and keeps its
    probabilities."""
    image, truth = disc_image(100, 120)
    half = LoadedModel(**{**oracle.__dict__, "pixel_size_um": 0.25})
    cfg = oracle.config.inference.model_copy(
        update={"stream_min_pixels": 20000, "band_rows": 64, "halo_px": 16}
    )
    labels, probs = predict_labels(half, image, HE, cfg, pixel_size_um=0.5)
    assert probs is None
    assert labels.shape == truth.shape and labels.max() == truth.max()
    at_limit = cfg.model_copy(update={"stream_min_pixels": 100 * 120})
    labels, probs = predict_labels(oracle, image, HE, at_limit)
    assert probs is not None and labels.max() == truth.max()


def test_a_binary_model_splits_touching_nuclei_alike_at_every_scale(oracle):
    """A binary model's nuclei are split where their centres lie ``min_distance_um`` apart,
    measured at the pixel size of the grid the model sees: two touching nuclei of a
    0.25 um tile segmented by a 0.5 um model (resampled by 0.5) are two, as at the tile's
    own scale; with the tile's pixel size taken for the halved grid's they merged into one."""

    class DarkIsForeground(nn.Module):
        def forward(self, x):
            return 12.0 * (0.6 - x.mean(1, keepdim=True))

    yy, xx = np.mgrid[:80, :100]
    image = np.full((80, 100, 3), (235, 225, 235), np.uint8)
    for cx in (30, 48):
        image[(yy - 40) ** 2 + (xx - cx) ** 2 <= 12**2] = (90, 50, 130)
    fields = {**oracle.__dict__, "model": DarkIsForeground().eval(), "target": "binary"}
    for model_px in (0.25, 0.5):
        binary = LoadedModel(**{**fields, "classes": 1, "pixel_size_um": model_px})
        labels, _ = predict_labels(binary, image, HE, oracle.config.inference, pixel_size_um=0.25)
        assert labels.max() == 2, model_px


def test_a_black_sixteen_bit_tile_is_named_against_its_own_full_scale():
    """Black is a tenth of the image's full scale: a 16-bit scanner border tile of noise
    around 2,000 (of 65,535; one hot pixel saturated) is named like its 8-bit copy, where
    against 8-bit's 255 nothing of it was black."""
    rng = np.random.default_rng(0)
    black = np.clip(rng.normal(2000, 500, (32, 32, 3)), 0, 65535).astype(np.uint16)
    black[0, 0] = 65535
    with pytest.warns(UserWarning, match=r"border\.tif: 100% of it is black"):
        warn_if_unlit(black, HE, "border.tif")


def test_quantify_reads_the_labels_of_a_first_run_still_writing_its_folder(tmp_path, monkeypatch):
    """Quantify given the output folder of a first run still writing it (no run.json yet)
    took each overlay for a label file and failed it ('no image named a_overlay'); it
    measures the labels written so far and takes nothing else for labels."""
    import mlseg.segment as module

    images, masks, first = tmp_path / "images", tmp_path / "masks", tmp_path / "first"
    image, truth = disc_image(60, 60)
    for stem in "ab":
        write_image(images / f"{stem}.png", image)
        write_labels(masks / f"{stem}_mask.png", truth)
    write_outputs, seen = module.write_image_outputs_tagged, {}

    def then_quantify(out_dir, stem, *args):
        written = write_outputs(out_dir, stem, *args)
        if Path(out_dir) == first and stem == "a":  # b not yet measured, no run.json yet
            seen["during"] = quantify_folder(
                first, images, tmp_path / "during", profile_name="he", progress=False
            )
        return written

    monkeypatch.setattr(module, "write_image_outputs_tagged", then_quantify)
    quantify_folder(masks, images, first, profile_name="he", progress=False)
    during = seen["during"]
    assert during.failed == {} and during.processed == ["a"]
    assert during.summaries[0]["count"] == truth.max()


# ----------------------------------------------------------------------------- reruns
RUN_FILES = ("summary.csv", "nuclei.parquet", "histograms.png", "run.json")


def _quantify_inputs(tmp_path: Path, stems: str = "abc") -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i, stem in enumerate(stems):
        image, truth = disc_image(48, 64, seed=i)
        write_image(images / f"{stem}.png", image)
        write_labels(masks / f"{stem}_mask.png", truth)
    return masks, images


def test_a_folder_run_holds_a_few_tables_not_one_an_image(tmp_path, monkeypatch):
    """A folder run kept each image's per-nucleus DataFrame to its end, for nuclei.parquet:
    pandas' bookkeeping around a tile's few nuclei, some 30 kB an image, and a run of 20,000
    tiles held a gigabyte more than one of 500. Tables of the same columns are kept together
    (four at most here); nuclei.parquet is every image's table, in order, as before."""
    import gc

    import mlseg.outputs
    import mlseg.segment as module

    def tables_alive() -> int:
        gc.collect()
        return sum(type(o) is pd.DataFrame for o in gc.get_objects())

    monkeypatch.setattr(mlseg.outputs, "COMPACT_EVERY", 4, raising=False)
    stems = "abcdefghijklmnop"
    masks, images = _quantify_inputs(tmp_path, stems)
    write, alive = module.update_run_outputs, {}

    def counted(*args, **kwargs):
        alive["at the end"] = tables_alive()
        return write(*args, **kwargs)

    monkeypatch.setattr(module, "update_run_outputs", counted)
    before = tables_alive()
    quantify_folder(masks, images, tmp_path / "out", profile_name="he", progress=False)
    assert alive["at the end"] - before <= len(stems) // 2  # 17 before: one an image
    own = [pd.read_parquet(tmp_path / "out" / f"{stem}_nuclei.parquet") for stem in stems]
    nuclei = pd.read_parquet(tmp_path / "out" / "nuclei.parquet")
    pd.testing.assert_frame_equal(nuclei, pd.concat(own, ignore_index=True))


def test_a_folder_run_tags_each_table_once(tmp_path, monkeypatch):
    """Each image's table was given its image and profile columns twice, once for its own
    files and again for the run's nuclei.parquet (a millisecond or more an image): the run's
    takes the table its files were written from."""
    import mlseg.outputs
    import mlseg.segment

    tag, tagged = mlseg.outputs.tag_table, []

    def counted(table: pd.DataFrame, summary: dict) -> pd.DataFrame:
        tagged.append(summary["image"])
        return tag(table, summary)

    for module in (mlseg.outputs, mlseg.segment):
        monkeypatch.setattr(module, "tag_table", counted, raising=False)
    masks, images = _quantify_inputs(tmp_path)
    quantify_folder(masks, images, tmp_path / "out", profile_name="he", progress=False)
    assert tagged == ["a", "b", "c"]
    nuclei = pd.read_parquet(tmp_path / "out" / "nuclei.parquet")
    assert nuclei["image"].unique().tolist() == ["a", "b", "c"]


def _files(out: Path) -> dict[str, tuple[int, int] | None]:
    """Each run file's (inode, mtime_ns), None where there is none: changed where the file
    was written again."""
    found = {}
    for name in RUN_FILES:
        path = out / name
        found[name] = (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None
    return found


def _as_written_whole(out: Path, rerun) -> tuple[dict, dict]:
    """What a user reads in the run files of ``out``, and in those that a rerun (``rerun``)
    writes whole into a copy of ``out`` without them (the per-image files and their times
    kept); run.json's times aside."""
    import shutil

    import pyarrow.parquet as pq

    def read(folder: Path) -> dict[str, object]:
        record = json.loads((folder / "run.json").read_text())
        return {
            "summary.csv": (folder / "summary.csv").read_bytes(),
            "nuclei.parquet": pq.read_table(folder / "nuclei.parquet"),
            "footer": json.loads(pq.read_schema(folder / "nuclei.parquet").metadata[b"mlseg"]),
            "histograms.png": (folder / "histograms.png").read_bytes(),
            "run.json": {k: v for k, v in record.items() if k not in ("started_at", "finished_at")},
        }

    whole = out.with_name(out.name + "_whole")
    shutil.copytree(out, whole, ignore=shutil.ignore_patterns(*RUN_FILES, ".*"))
    assert not rerun(whole).processed  # the same images' files: none measured again
    return read(out), read(whole)


def test_a_rerun_that_redoes_nothing_leaves_the_run_files_that_hold_its_images(
    tmp_path, monkeypatch, real_histograms
):
    """A rerun on a folder where every image was done read every image's nuclei table and
    wrote summary.csv, nuclei.parquet and histograms.png again, the same (seconds for a few
    hundred images). Now it writes run.json (its lists and times), and nuclei.parquet only where its
    footer, the run's record, changed; every file reads as a whole rewrite's."""
    import pyarrow.parquet as pq

    import mlseg.outputs

    masks, images = _quantify_inputs(tmp_path)
    out = tmp_path / "out"

    def rerun(folder: Path = out):
        return quantify_folder(masks, images, folder, profile_name="he", progress=False)

    assert rerun().processed == ["a", "b", "c"]
    first = _files(out)

    def unread(out_dir, summary):
        raise AssertionError(f"{summary['image']}'s nuclei table read again")

    monkeypatch.setattr(mlseg.outputs, "read_nuclei", unread)
    assert rerun().skipped == ["a", "b", "c"]
    second = _files(out)
    # processed became skipped: the footer changed, its rows were kept
    assert {n: second[n] == first[n] for n in RUN_FILES} == {
        "summary.csv": True,
        "nuclei.parquet": False,
        "histograms.png": True,
        "run.json": False,
    }
    record = json.loads((out / "run.json").read_text())
    assert (record["processed"], record["skipped"]) == ([], ["a", "b", "c"])
    footer = json.loads(pq.read_schema(out / "nuclei.parquet").metadata[b"mlseg"])
    assert footer == {k: v for k, v in record.items() if k not in ("started_at", "finished_at")}
    assert rerun().skipped == ["a", "b", "c"]
    third = _files(out)
    assert {n: third[n] == second[n] for n in RUN_FILES} == {
        "summary.csv": True,
        "nuclei.parquet": True,  # the same record: the same file
        "histograms.png": True,
        "run.json": False,  # its times
    }
    monkeypatch.undo()
    kept, whole = _as_written_whole(out, rerun)
    assert kept.keys() == whole.keys()
    for name, value in kept.items():
        assert value == whole[name], name


def test_a_footer_rewritten_on_its_rows_is_the_bytes_of_a_whole_rewrite(tmp_path):
    """nuclei.parquet given a new record by a rerun that redid nothing holds the bytes a
    full rewrite with that record writes, as do the files it keeps."""
    from mlseg.outputs import read_nuclei, update_run_outputs, write_run_outputs

    masks, images = _quantify_inputs(tmp_path)
    out = tmp_path / "out"
    summaries = quantify_folder(masks, images, out, profile_name="he", progress=False).summaries
    record = json.loads((out / "run.json").read_text())
    again = {**record, "processed": [], "skipped": ["a", "b", "c"], "finished_at": "later"}
    tables = [read_nuclei(out, s) for s in summaries]
    before = _files(out)
    update_run_outputs(out, summaries, lambda: pytest.fail("tables read"), again, redone=False)
    assert _files(out)["nuclei.parquet"] != before["nuclei.parquet"]
    kept = {name: (out / name).read_bytes() for name in RUN_FILES}
    write_run_outputs(out, summaries, tables, again)
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == kept


def test_a_rerun_that_redoes_nothing_lists_its_failed_images_in_run_json(tmp_path) -> None:
    """An image that fails again: the run files keep holding the others, run.json names it."""
    masks, images = _quantify_inputs(tmp_path)
    out = tmp_path / "out"
    quantify_folder(masks, images, out, profile_name="he", progress=False)
    (images / "c.png").write_bytes(b"not a PNG")
    for run in range(2):
        before = _files(out)
        result = quantify_folder(masks, images, out, profile_name="he", progress=False)
        assert list(result.failed) == [str(masks / "c_mask.png")]
        record = json.loads((out / "run.json").read_text())
        assert (record["processed"], record["skipped"]) == ([], ["a", "b"])
        assert record["failed"] == result.failed
        assert pd.read_csv(out / "summary.csv")["image"].tolist() == ["a", "b"]
        # the second time, the run files hold these two images already
        assert (_files(out)["summary.csv"] == before["summary.csv"]) == (run == 1)


def _interrupted(out: Path, masks: Path, images: Path, monkeypatch) -> None:
    """A run that measured an image again (its labels changed) and was stopped before it
    wrote its run files."""
    import mlseg.outputs
    import mlseg.segment

    write_labels(masks / "b_mask.png", disc_image(48, 64, spacing=16, seed=5)[1])

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        for module in (mlseg.outputs, mlseg.segment):
            patched.setattr(module, "write_run_outputs", stopped, raising=False)
        with pytest.raises(KeyboardInterrupt):
            quantify_folder(masks, images, out, profile_name="he", progress=False)


def _table_edited(out: Path, *_) -> None:
    """An image's table changed by hand (its rows kept), its <stem>.json not."""
    table = pd.read_parquet(out / "b_nuclei.parquet")
    table["solidity"] = 0.5
    table.to_parquet(out / "b_nuclei.parquet", index=False)


def _table_unreadable(out: Path, masks: Path, images: Path, monkeypatch) -> None:
    """An image's table unreadable when the run files were last written (its nuclei left out
    of them): a full rewrite names it again, as every rerun named it."""
    (out / "b_nuclei.parquet").write_bytes(b"PAR1 cut short")
    with pytest.warns(UserWarning, match="b_nuclei.parquet: unreadable"):
        quantify_folder(masks, images, out, profile_name="he", progress=False)


def _summary_edited(out: Path, *_) -> None:
    """summary.csv changed (a cell), its file time put back (a coarse clock, a copy kept)."""
    path = out / "summary.csv"
    kept = path.stat()
    path.write_bytes(path.read_bytes().replace(b"\na,", b"\na ,", 1))
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))


def _other_record(out: Path, *_) -> None:
    """nuclei.parquet of another run (its rows and footer) beside run.json, no newer than it:
    a set half moved into place where the file times are too coarse to tell."""
    import pyarrow.parquet as pq

    path = out / "nuclei.parquet"
    table = pq.read_table(path)
    record = {**json.loads(table.schema.metadata[b"mlseg"]), "skipped": ["a", "b"]}
    other = table.set_column(
        table.column_names.index("solidity"), "solidity", [[0.5] * table.num_rows]
    )
    metadata = {**table.schema.metadata, b"mlseg": json.dumps(record).encode()}
    pq.write_table(other.replace_schema_metadata(metadata), path)
    run = (out / "run.json").stat()
    os.utime(path, ns=(run.st_atime_ns, run.st_mtime_ns))


def _half_moved(out: Path, *_) -> None:
    """histograms.png of a later set moved into place, the rest of it not (that run killed)."""
    later = (out / "run.json").stat().st_mtime_ns + 10**9
    os.utime(out / "histograms.png", ns=(later, later))


EDITS = {
    "an image removed from the input": lambda out, masks, *_: (masks / "c_mask.png").unlink(),
    "an image that fails": lambda out, masks, images, _: (images / "c.png").write_bytes(b"x"),
    "a run stopped before its run files": _interrupted,
    "summary.csv deleted": lambda out, *_: (out / "summary.csv").unlink(),
    "nuclei.parquet deleted": lambda out, *_: (out / "nuclei.parquet").unlink(),
    "histograms.png deleted": lambda out, *_: (out / "histograms.png").unlink(),
    "run.json deleted": lambda out, *_: (out / "run.json").unlink(),
    "another mlseg": lambda out, masks, images, patch: patch.setattr(
        "mlseg.segment.code_version", lambda: "0.0.1+gother"
    ),
    "another pyarrow": lambda out, masks, images, patch: patch.setattr(
        "mlseg.outputs._version",
        lambda package: "0.0.1" if package == "pyarrow" else version(package),
    ),
    "another matplotlib": lambda out, masks, images, patch: patch.setattr(
        "mlseg.outputs._version", lambda p: "0.0.1" if p == "matplotlib" else version(p)
    ),
    "summary.csv edited, its time kept": _summary_edited,
    "nuclei.parquet of another record, as old as run.json": _other_record,
    "an image's table edited": _table_edited,
    "an image's table unreadable": _table_unreadable,
    "a set half moved into place": _half_moved,
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_rerun_writes_the_run_files_again_where_they_no_longer_hold_its_images(
    tmp_path, monkeypatch, edit
):
    """Where the run files are not what a full rewrite would write (an image gone, failed,
    or measured again by a run stopped before its run files; a run file deleted; another
    mlseg; an image's table changed or unreadable; a set half in place), a rerun that
    redoes nothing writes them all again, as a full rewrite would."""
    masks, images = _quantify_inputs(tmp_path)
    out = tmp_path / "out"
    said: list[str] = []

    def rerun(folder: Path = out):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = quantify_folder(masks, images, folder, profile_name="he", progress=False)
        said.extend(str(w.message) for w in caught)
        return result

    rerun()
    rerun()  # the run files as a rerun that redid nothing keeps them
    EDITS[edit](out, masks, images, monkeypatch)
    before, said[:] = _files(out), []
    assert not rerun().processed
    assert all(new != before[name] for name, new in _files(out).items()), before
    if edit == "an image's table unreadable":
        assert any("b_nuclei.parquet: unreadable" in m for m in said)  # named again
    kept, whole = _as_written_whole(out, rerun)
    for name, value in kept.items():
        assert value == whole[name], name


def test_an_array_takes_the_profiles_pixel_size_as_its_file_does(oracle, tmp_path):
    """A profile's ``pixel_size_um`` is the size of an image that declares none, by path
    (:func:`segment_image`) and as a notebook's array alike: :func:`predict_labels`
    segmented the array at its own scale (a 0.5 um image for a 0.25 um model: 1x, where its
    file was enlarged 2x, so their outlines differed) and :func:`quantify_image` measured it
    in pixels, or, with ``units: um``, refused it asking for the pixel size in the profile
    that held it."""
    from mlseg.segment import quantify_image, segment_image

    image, truth = disc_image(100, 120, spacing=16, radius=4)
    path = tmp_path / "tile.png"
    write_image(path, image)
    half = LoadedModel(**{**oracle.__dict__, "pixel_size_um": 0.25})
    cfg = oracle.config.inference
    for units in ("auto", "um"):
        sized = HE.model_copy(update={"pixel_size_um": 0.5, "units": units})
        _, by_path, table, summary = segment_image(half, path, sized, cfg)
        assert summary["pixel_size_source"] == "profile" and summary["scale_factor"] == 2.0
        labels, _ = predict_labels(half, image, sized, cfg)
        np.testing.assert_array_equal(labels, by_path)
        measured, _ = quantify_image(image, labels, sized)
        pd.testing.assert_frame_equal(measured, table)
        assert "area_um2" in measured.columns


def test_an_rgba_array_is_refused_with_the_fix_not_sent_for_another_model(oracle, tmp_path):
    """An RGBA array (``np.asarray(Image.open(png))``, OpenSlide's ``read_region``) was
    refused with "use a model trained on 4-channel images", where its file is segmented laid
    over white: the error names the alpha and the fix, and the fix gives the file's labels."""
    from PIL import Image

    from mlseg.errors import ModelError
    from mlseg.io import read_image_for

    image, truth = disc_image(64, 64)
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # a transparent corner, outside the scan
    path = tmp_path / "tile.png"
    Image.fromarray(rgba).save(path)
    cfg = oracle.config.inference
    with pytest.raises(ModelError, match=r"RGBA\?.*read_image_for\(path, 'he'\).*\[\.\.\., :3\]"):
        predict_labels(oracle, rgba, HE, cfg)
    labels = predict_labels(oracle, read_image_for(path, HE.stain), HE, cfg)[0]
    assert labels.max() == truth.max()


def test_an_array_beyond_the_memory_left_is_named_as_a_file_is(oracle, monkeypatch):
    """A notebook's array had no memory check: a field that ``mlseg segment`` warns of
    was segmented until the system stopped the kernel. Short of memory for the array as
    given, or for it enlarged to the model's scale, :func:`predict_labels` warns once with
    the size and the fix, and segments it as with memory to spare."""
    import mlseg.io
    from mlseg.segment import SEGMENT_MEMORY

    image, truth = disc_image(64, 80)
    cfg = oracle.config.inference
    half = LoadedModel(**{**oracle.__dict__, "pixel_size_um": 0.25})

    def run(loaded, pixel_size_um=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            labels = predict_labels(loaded, image, HE, cfg, pixel_size_um=pixel_size_um)[0]
        return labels, [str(w.message) for w in caught if "memory" in str(w.message)]

    ample = run(oracle)[0]
    assert ample.max() == truth.max()
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: SEGMENT_MEMORY.need(64 * 80) - 1)
    labels, said = run(oracle)
    np.testing.assert_array_equal(labels, ample)
    assert len(said) == 1 and said[0].startswith("the image (an array): 80 x 64 px needs")
    assert "export it as tiles" in said[0]
    # room for the array as given, not for it enlarged 2x to the model's pixel size
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: SEGMENT_MEMORY.need(64 * 80))
    assert run(oracle)[1] == []
    _, said = run(half, pixel_size_um=0.5)
    assert len(said) == 1 and "resampled 2x to 160 x 128 px (its pixel size" in said[0]
