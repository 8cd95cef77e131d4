"""Evaluation: per-image scores, means, files; the real inference path end to end."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import mlseg.evaluate as ev
from mlseg.config import Config, TrainConfig
from mlseg.dataset import list_pairs
from mlseg.errors import DatasetError
from mlseg.io import read_mask, write_labels
from mlseg.model import build_model, save_checkpoint
from mlseg.registry import code_version

SMALL = TrainConfig(encoder="resnet18", encoder_depth=3, patch_size=64)


def _small_checkpoint(folder, pixel_size_um: float | None = None, **saved):
    save_checkpoint(
        folder,
        build_model(SMALL, 3, 3),
        Config(train=SMALL),
        target="three_class",
        classes=3,
        in_channels=3,
        fingerprint_hash=None,
        metrics={},
        pixel_size_um=pixel_size_um,
        name="best",
        nucleus_diameter_px=12.0,
        **saved,
    )
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One untrained checkpoint for the module, built and saved once: tests only read it (a
    test that edits its config copies the folder first)."""
    torch.manual_seed(0)
    before = torch.get_num_threads()  # the module's count, given back after it
    torch.set_num_threads(2)
    yield _small_checkpoint(tmp_path_factory.mktemp("evaluate") / "model")
    torch.set_num_threads(before)


@pytest.fixture
def finds_nothing(monkeypatch):
    """evaluate's model a stand-in that finds no nucleus, for tests of what is scored."""
    monkeypatch.setattr(
        ev,
        "predict_image",
        lambda loaded, image, *a, **k: (np.zeros(image.shape[:2], np.int32), {}),
    )


def _evaluated_saying(checkpoint, root, out) -> tuple[ev.EvalResult, str]:
    """The evaluation of ``root``'s test split into ``out``, and every warning it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ev.evaluate(checkpoint, root, out, progress=False)
    return result, " | ".join(str(w.message) for w in caught)


def test_score_labels_columns_and_values() -> None:
    truth = np.zeros((8, 8), np.int32)
    truth[1:4, 1:4] = 1
    truth[5:8, 5:8] = 2
    pred = truth.copy()
    pred[pred == 2] = 0  # one nucleus missed
    row = ev.score_labels(pred, truth)
    assert set(row) == set(ev.METRIC_COLUMNS)
    assert row["dice"] == pytest.approx(2 * 9 / (9 + 18))
    assert row["pixel_precision"] == row["obj_precision"] == 1.0  # nothing found wrongly
    assert row["pixel_recall"] == row["obj_recall"] == 0.5  # half of it found
    assert (row["tp"], row["fp"], row["fn"]) == (1, 0, 1)
    assert row["f1"] == pytest.approx(2 / 3) and row["aji"] == pytest.approx(9 / 18)
    assert row["count_error"] == -1
    off = np.zeros_like(truth)
    off[1:4, 2:5] = 1  # drawn one column off: IoU 6 / 12, no match at IoU 0.5
    row = ev.score_labels(off, truth)
    assert (row["tp"], row["fp"], row["fn"]) == (0, 1, 2)


def test_evaluate_in_a_job_log_says_how_far_it_is_now_and_then(
    checkpoint, synth_dataset, tmp_path, monkeypatch, capsys, ticking
) -> None:
    """In a job's log no bar is drawn, and a test set of large images evaluated for hours
    without a word. A line a minute goes to stderr; stdout keeps the scores; --quiet none."""
    from mlseg.cli import main

    ticking(50)  # each image 50 s on the clock the lines read

    def fake_predict(loaded, image, profile, inference_cfg, pixel_size_um, path):
        return np.zeros(image.shape[:2], np.int32), {"scale_factor": 1.0}

    monkeypatch.setattr(ev, "predict_image", fake_predict)
    argv = ["evaluate", str(checkpoint), str(synth_dataset), "--out"]
    assert main([*argv, str(tmp_path / "log")]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("evaluate test:")]
    assert lines == [
        "evaluate test: 2/3 images (66%), 2 min elapsed, under a minute left",
        "evaluate test: 3/3 images (100%), 3 min elapsed",
    ]
    assert "evaluate test:" not in captured.out
    assert main([*argv, str(tmp_path / "quiet"), "--quiet"]) == 0
    assert "evaluate test:" not in capsys.readouterr().err


def test_a_test_image_larger_than_the_memory_left_is_named_before_it_is_evaluated(
    checkpoint, synth_dataset, tmp_path, monkeypatch
) -> None:
    """mlseg segment and quantify warned before a field too large for the memory left;
    evaluate, which segments each whole test image, said nothing and was stopped by the
    system part-way. A container's cgroup (v2) of 2 GiB, read from its files as on Linux,
    leaves 1 MiB less than each 96 x 96 px test image needs in evaluate (about 1 GiB, most
    of it a batch of tiles through the network; far more than the 50 bytes a pixel assumed
    before came to): each is named with the fix; 16 MiB more, nothing is said."""
    from functools import partial

    import mlseg.io
    from mlseg.evaluate import EVALUATE_MEMORY

    cgroup = tmp_path / "sys" / "fs" / "cgroup" / "docker" / "c0"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(str(2 * 2**30))
    (cgroup / "memory.stat").write_text("anon 1\ninactive_file 0\n")
    (tmp_path / "meminfo").write_text("MemAvailable:   16777216 kB\n")
    (tmp_path / "cgroup").write_text("0::/docker/c0\n")
    files = {
        "meminfo": tmp_path / "meminfo",
        "own_cgroups": tmp_path / "cgroup",
        "cgroup_root": tmp_path / "sys" / "fs" / "cgroup",
    }
    monkeypatch.setattr(mlseg.io, "available_memory", partial(mlseg.io.available_memory, **files))

    def said(left: int, run: str) -> list[str]:
        (cgroup / "memory.current").write_text(str(2 * 2**30 - left))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ev.evaluate(checkpoint, synth_dataset, tmp_path / run, progress=False)
        assert len(result.per_image) == 3  # warned, not refused
        return [str(w.message) for w in caught if "memory" in str(w.message)]

    need = EVALUATE_MEMORY.need(96 * 96)
    assert said(need + 16 * 2**20, "enough") == []
    lines = said(need - 2**20, "short")
    images = sorted((synth_dataset / "test" / "original").iterdir())
    assert len(lines) == len(images) == 3
    for line, image in zip(lines, images, strict=True):
        assert line.startswith(
            f"{image}: 96 x 96 px needs about 1.0 GiB of memory in mlseg "
            "evaluate, more than the 1.0 GiB this process has left"
        )
        assert "export it as tiles" in line and "and evaluate those" in line


def test_a_test_image_enlarged_to_the_models_scale_beyond_the_memory_left_is_named(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    """evaluate checked each test image's memory as read, then segmented it resampled to the
    model's scale (here 2x: a 0.5 um image for a 0.25 um model, 4x the pixels): with room
    for the images as read (96 x 96 px) but not resampled (192 x 192 px), each is named with
    the factor and its cause, as mlseg segment names it."""
    import mlseg.io
    from mlseg.evaluate import EVALUATE_MEMORY

    folder = _small_checkpoint(tmp_path / "model", pixel_size_um=0.25)
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: EVALUATE_MEMORY.need(96 * 96))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ev.evaluate(
            folder, synth_dataset, tmp_path / "out", pixel_size_um=0.5, progress=False
        )
    assert len(result.per_image) == 3  # warned, not refused
    images = sorted((synth_dataset / "test" / "original").iterdir())
    assert [str(w.message) for w in caught if "memory" in str(w.message)] == [
        f"{image}: 96 x 96 px, resampled 2x to 192 x 192 px (its pixel size, 0.5 um, against "
        "the model's 0.25 um), needs about 1.0 GiB of memory in mlseg evaluate, more than the "
        "1.0 GiB this process has left, so the system may stop it part-way: crop the field "
        "or export it as tiles (QuPath: File > Export images) and evaluate those, or run on "
        "a machine with more memory"
        for image in images
    ]


def test_the_worst_cases_of_large_test_images_are_held_at_the_size_they_are_drawn(
    checkpoint, tmp_path, monkeypatch
) -> None:
    """evaluate held each of the four worst cases whole (image, mask, prediction: 11 bytes a
    pixel) until the end, then drew worst.png from full-size float RGB panels of all four at
    once: with several large test images its peak was the sum over them, over 100 bytes a
    pixel of each. Each case is now reduced to its panels' size once scored. Numpy memory
    traced over four 2,048-pixel test images: what is held from one image to the next, and
    what drawing worst.png takes."""
    import tracemalloc

    from PIL import Image

    import mlseg.plots
    from mlseg.io import read_image, write_image, write_labels

    side, n = 2048, 4
    nuclei = np.zeros((side, side), np.int32)
    grid = np.arange(1, (side // 32) ** 2 + 1, dtype=np.int32).reshape(side // 32, side // 32)
    nuclei[:] = np.kron(grid, np.ones((32, 32), np.int32))
    nuclei[(np.arange(side) % 32 >= 24)[:, None] | (np.arange(side) % 32 >= 24)[None, :]] = 0
    root = tmp_path / "large"
    for folder in ("original", "masks"):
        (root / "test" / folder).mkdir(parents=True)
    for i in range(n):
        image = np.full((side, side, 3), 225, np.uint8)
        image[nuclei > 0] = (90 + 20 * i, 60, 140)
        write_image(root / "test" / "original" / f"field{i}.png", image)
        write_labels(root / "test" / "masks" / f"field{i}_mask.png", nuclei)
    del image

    def fake_predict(loaded, image, profile, inference_cfg, pixel_size_um, path):
        return np.roll(nuclei, (2, 3), axis=(0, 1)), {"scale_factor": 1.0}

    held, drawing = [], []
    read, plot = ev.read_image_for, mlseg.plots.plot_worst

    def reading(path, *args, **kwargs):
        held.append(tracemalloc.get_traced_memory()[0])
        return read(path, *args, **kwargs)

    def plotting(rows, path):
        held.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.reset_peak()
        done = plot(rows, path)
        drawing.append(tracemalloc.get_traced_memory()[1] - held[-1])
        return done

    monkeypatch.setattr(ev, "predict_image", fake_predict)
    monkeypatch.setattr(ev, "read_image_for", reading)
    monkeypatch.setattr(mlseg.plots, "plot_worst", plotting)
    tracemalloc.start()
    try:
        result = ev.evaluate(checkpoint, root, tmp_path / "eval", progress=False)
    finally:
        tracemalloc.stop()
    assert len(result.per_image) == n and len(held) == n + 1
    px = side * side
    kept = [(after - held[0]) / px for after in held[1:]]  # bytes a pixel of one image
    assert max(kept) < n * 1.5, kept  # each case at 512 x 512: 0.9 bytes a pixel of 2,048^2
    assert drawing[0] / px < 40, drawing[0] / px  # before: over 200
    # the four rows, each panel drawn at 512 pixels a side as before
    with Image.open(result.worst_png) as png:
        width, height = png.size
    assert 3 * 512 < width < 3 * 512 + 100 and 4 * 512 < height < 4 * (512 + 60)
    shown = read_image(result.worst_png)
    assert shown.std() > 0


def test_evaluate_takes_the_tile_and_batch_options_its_out_of_memory_advice_names(
    checkpoint, synth_dataset, tmp_path, monkeypatch, capsys
) -> None:
    """A GPU out of memory in evaluate advised 'mlseg segment --batch-size 2 --tile 128', options
    evaluate did not have: the user could not follow it there. evaluate takes them now, scores
    with them and records them, and refuses a tile segment refuses."""
    import json

    from mlseg.cli import main

    used = []

    def fake_predict(loaded, image, profile, inference_cfg, pixel_size_um, path):
        used.append((inference_cfg.tile_size, inference_cfg.batch_size))
        return np.zeros(image.shape[:2], np.int32), {"scale_factor": 1.0}

    monkeypatch.setattr(ev, "predict_image", fake_predict)
    argv = ["evaluate", str(checkpoint), str(synth_dataset), "--quiet", "--out"]
    assert main([*argv, str(tmp_path / "e"), "--tile", "96", "--batch-size", "1"]) == 0
    assert set(used) == {(96, 1)}
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert (summary["inference"]["tile_size"], summary["inference"]["batch_size"]) == (96, 1)
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "bad"), "--tile", "50"]) == 2
    assert "tile_size" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_evaluate_table_means_and_files(checkpoint, synth_dataset, tmp_path, monkeypatch) -> None:
    pairs = list_pairs(synth_dataset, "test")
    truths = {p.stem: read_mask(p.mask) for p in pairs}
    perfect = pairs[0].stem

    order = [p.stem for p in pairs]

    def fake_predict(loaded, image, profile, inference_cfg, pixel_size_um, path):
        stem = order.pop(0)  # images come in pair order
        labels = truths[stem] if stem == perfect else np.zeros(image.shape[:2], np.int32)
        return labels, {"scale_factor": 2.0, "scale_source": "estimated", "est_diameter_px": 9.0}

    monkeypatch.setattr(ev, "predict_image", fake_predict)
    result = ev.evaluate(checkpoint, synth_dataset, tmp_path / "eval", progress=False)
    df = result.per_image
    assert list(df["stem"]) == [p.stem for p in pairs]
    row = df.set_index("stem").loc[perfect]
    assert row["dice"] == row["aji"] == row["pq"] == row["f1"] == 1.0
    others = df[df["stem"] != perfect]
    assert (others["dice"] == 0).all() and (others["n_pred"] == 0).all()
    assert result.means["dice"] == pytest.approx(1 / len(pairs))
    written = pd.read_csv(result.csv_path)
    assert written.shape[0] == len(pairs)
    assert (written["scale_factor"] == 2.0).all() and (written["scale_source"] == "estimated").all()
    summary = json.loads(result.json_path.read_text())  # strict JSON: NaN written as null
    assert summary["n_images"] == len(pairs) and summary["means"]["dice"] == pytest.approx(
        1 / len(pairs)
    )
    # the report alone says which weights scored which set, as the registry compares them:
    # it named only the model's path and the data's folder
    assert summary["eval_set_id"] == result.eval_set_id
    assert summary["model_id"].startswith("best.safetensors@")
    assert summary["mlseg_version"] == code_version() and summary["device"] == "cpu"
    # a model that records no image hashes: nothing was checked, not "none seen"
    assert summary["seen_in_training"] is None
    # pooled over images: every true nucleus of the perfect image found, all others missed
    found, missed = int(row["n_true"]), int(others["n_true"].sum())
    pooled = summary["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (found, 0, missed)
    assert pooled["obj_precision"] == 1.0
    assert pooled["obj_recall"] == pytest.approx(found / (found + missed))
    assert pooled["f1"] == pytest.approx(2 * found / (2 * found + missed))
    assert pooled["fn_missed"] == missed
    assert result.worst_png is not None and result.worst_png.stat().st_size > 1000


def test_a_model_that_finds_nothing_has_a_pooled_precision_of_zero(
    checkpoint, synth_dataset, tmp_path, monkeypatch
) -> None:
    # as each image's precision is scored: a missing (null) one read as "not measured"
    def find_nothing(loaded, image, profile, inference_cfg, pixel_size_um, path):
        return np.zeros(image.shape[:2], np.int32), {"scale_factor": 1.0}

    monkeypatch.setattr(ev, "predict_image", find_nothing)
    result = ev.evaluate(checkpoint, synth_dataset, tmp_path / "eval", progress=False)
    pooled = json.loads(result.json_path.read_text())["pooled"]
    assert pooled["fn"] > 0 and pooled["tp"] == pooled["fp"] == 0
    assert (pooled["obj_precision"], pooled["obj_recall"], pooled["f1"]) == (0.0, 0.0, 0.0)
    assert (result.per_image["obj_precision"] == 0.0).all()


def test_a_disk_that_fills_at_the_worst_cases_leaves_the_previous_evaluation_whole(
    checkpoint, synth_dataset, tmp_path, monkeypatch
) -> None:
    """A second model scored into the same folder on a disk that filled at worst.png: its
    per_image.csv and summary.json (naming it) were left beside the first model's worst
    cases, one evaluation that was two."""
    import errno

    import mlseg.plots
    from mlseg.errors import OutputError
    from mlseg.io import WRITTEN_TOGETHER_LOCK, atomic_path

    def files() -> dict[str, bytes]:  # all but the lock each set is moved in under
        return {p.name: p.read_bytes() for p in out.iterdir() if p.name != WRITTEN_TOGETHER_LOCK}

    out = tmp_path / "eval"
    ev.evaluate(checkpoint, synth_dataset, out, progress=False)
    before = files()
    assert set(before) == {"per_image.csv", "summary.json", "worst.png"}

    def full(items, path):
        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlseg.plots, "plot_worst", full)
    other = _small_checkpoint(tmp_path / "other")
    with pytest.raises(OutputError) as caught:
        ev.evaluate(other, synth_dataset, out, progress=False)
    assert files() == before  # nothing else there
    assert str(caught.value) == (
        f"{out}: cannot be written (no space left on device); free disk space or write "
        "elsewhere, then run again"
    )


def test_evaluate_end_to_end_with_real_inference(checkpoint, synth_dataset, tmp_path) -> None:
    result = ev.evaluate(checkpoint, synth_dataset, tmp_path / "eval", progress=False)
    df = result.per_image
    assert len(df) == len(list_pairs(synth_dataset, "test"))
    for col in ("dice", "aji", "pq", "f1"):
        assert df[col].between(0, 1).all(), col
    assert (df["n_true"] > 0).all()


def test_evaluate_refuses_to_write_into_the_images_it_scores(checkpoint, synth_dataset) -> None:
    """worst.png in test/original would be read as an image without a mask from then on."""
    from mlseg.errors import DatasetError

    images = synth_dataset / "test" / "original"
    before = sorted(p.name for p in images.iterdir())
    with pytest.raises(DatasetError, match="the output folder is the input folder"):
        ev.evaluate(checkpoint, synth_dataset, images, progress=False)
    assert sorted(p.name for p in images.iterdir()) == before


def test_the_eval_set_id_covers_the_masks_the_model_scored(
    checkpoint, tmp_path, synth_dataset, finds_nothing
):
    """A model whose data config names masks <stem>_label: the id of the set it was scored
    on must change when one of those masks does (with the default config it saw no masks,
    so a champion's score on the old masks passed for one on the new)."""
    import shutil

    root = tmp_path / "labelled"
    shutil.copytree(synth_dataset, root)
    for mask in (root / "test" / "masks").iterdir():
        mask.rename(mask.with_name(mask.name.replace("_mask", "_label")))
    folder = shutil.copytree(checkpoint, tmp_path / "label-suffix-model")
    config = json.loads((folder / "config.json").read_text())
    config["data"] = {**config.get("data", {}), "mask_suffix": "_label"}
    (folder / "config.json").write_text(json.dumps(config))
    before = ev.evaluate(folder, root, tmp_path / "e1", progress=False)
    assert len(before.per_image) == len(list_pairs(synth_dataset, "test"))
    mask = sorted((root / "test" / "masks").iterdir())[0]
    labels = read_mask(mask)
    labels[labels == labels.max()] = 0
    write_labels(mask, labels)
    after = ev.evaluate(folder, root, tmp_path / "e2", progress=False)
    assert after.eval_set_id != before.eval_set_id


def test_evaluate_names_the_images_it_cannot_score(
    checkpoint, synth_dataset, tmp_path, finds_nothing
):
    """A test image whose mask is misnamed (a-mask.png for a_mask.png) is not scored: the
    evaluation says so, naming the image, instead of reporting a smaller set without a word."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    mask = sorted((root / "test" / "masks").iterdir())[0]
    mask.rename(mask.with_name(mask.name.replace("_mask", "-mask")))
    stem = mask.name.replace("_mask.png", "")
    with pytest.warns(UserWarning, match=f"1 of 3 images have no mask.*{stem}"):
        result = ev.evaluate(checkpoint, root, tmp_path / "eval", progress=False)
    assert stem not in set(result.per_image["stem"]) and len(result.per_image) == 2


def test_evaluate_names_the_masks_it_cannot_score_and_the_links_it_cannot_read(
    checkpoint, synth_dataset, tmp_path, finds_nothing
):
    """A test image that is a link to a share not mounted, or misnamed, left its mask out of
    the evaluation without a word, and the scores were of a smaller set."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    first, second = sorted((root / "test" / "original").iterdir())[:2]
    first.unlink()
    first.symlink_to(tmp_path / "share" / first.name)
    second.rename(second.with_name("renamed.png"))
    result, said = _evaluated_saying(checkpoint, root, tmp_path / "eval")
    assert f"{first}: a link to {tmp_path / 'share' / first.name}, which is missing" in said
    assert "2 mask(s)" in said and f"{first.stem}_mask.png" in said
    assert f"{second.stem}_mask.png" in said
    assert len(result.per_image) == 1


def test_evaluate_names_the_manifest_rows_that_size_no_test_image(
    checkpoint, synth_dataset, tmp_path, finds_nothing
):
    """A test image's pixel size written under its file name (he_004.png) or split (Test)
    sized no image: evaluate scored it at the profile's scale without a word, where
    validation fails the row. It names the manifest, each row by line, and the fix."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    first, second, third = sorted(p.stem for p in (root / "test" / "original").iterdir())
    (root / "manifest.csv").write_text(
        f"split,stem,pixel_size_um\ntest,{first}.png,0.5\nTest,{second},0.5\n"
        f"test,{third},0.5\ntrain,elsewhere,0.5\n"
    )
    result, said = _evaluated_saying(checkpoint, root, tmp_path / "eval")
    assert f"{root / 'manifest.csv'}: 2 pixel-size row(s) of the test split" in said
    assert f"line 2: test/{first}.png; line 3: Test/{second})" in said
    assert "write the split as test and the stem as the image's file name without" in said
    assert len(result.per_image) == 3


def test_evaluate_names_a_second_mask_it_does_not_score(
    checkpoint, synth_dataset, tmp_path, finds_nothing
):
    """An image with two masks (a_mask.png and a corrected a_mask.tif) was scored against
    the one sorted last, without a word of the other: the evaluation names the mask left out
    and the one scored."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    mask = sorted((root / "test" / "masks").iterdir())[0]
    second = mask.with_suffix(".tif")
    write_labels(second, read_mask(mask))
    result, said = _evaluated_saying(checkpoint, root, tmp_path / "eval")
    assert f"1 mask(s) in {root / 'test' / 'masks'} are a second mask of an image" in said
    assert f"{mask.name} (its image is scored against {second.name})" in said
    assert "have no image" not in said  # neither mask is an orphan
    assert len(result.per_image) == len(list_pairs(synth_dataset, "test"))


def test_evaluate_refuses_jpeg_masks_by_name_before_segmenting(
    checkpoint, synth_dataset, tmp_path, monkeypatch
):
    """A test mask saved as JPEG was read only when its image's turn came: every image
    before it was segmented, then the evaluation stopped naming that one mask. It names
    every JPEG mask before any image is segmented."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    masks = sorted((root / "test" / "masks").iterdir())
    lossy = [m.rename(m.with_suffix(".jpg")) for m in masks[1:]]
    refused = _refused_before_segmenting(checkpoint, root, tmp_path, monkeypatch)
    assert all(f"{m}: a mask must be lossless" in refused for m in lossy)


def _refused_before_segmenting(checkpoint, root, tmp_path, monkeypatch) -> str:
    """The error of evaluating ``root``'s test split, checked to come before any image was
    segmented and any output written."""
    segmented = []

    def find_nothing(loaded, image, *args, **kwargs):
        segmented.append(image)
        return np.zeros(image.shape[:2], np.int32), {}

    monkeypatch.setattr(ev, "predict_image", find_nothing)
    with pytest.raises(DatasetError) as err:
        ev.evaluate(checkpoint, root, tmp_path / "eval", progress=False)
    assert not segmented and not (tmp_path / "eval").exists()
    return str(err.value)


def test_evaluate_takes_the_profile_pixel_size_as_segment_does(nuclei_dataset, tmp_path) -> None:
    """Images without a size of their own are at the profile's, as training resampled them
    and ``mlseg segment`` takes them: scored at the model's scale by that ratio, not at a
    scale estimated from the nuclei."""
    from mlseg.config import get_profile

    folder = _small_checkpoint(tmp_path / "model", pixel_size_um=0.5)
    profile = get_profile("he").model_copy(update={"pixel_size_um": 0.25})
    data = nuclei_dataset(n_train=0, n_test=2, size=64)
    result = ev.evaluate(folder, data, tmp_path / "eval", profile=profile, progress=False)
    df = result.per_image
    assert (df["scale_source"] == "pixel_size").all()
    assert df["scale_factor"].tolist() == [0.5, 0.5]
    assert df["pixel_size_um"].tolist() == [0.25, 0.25]


def test_evaluate_gives_an_image_of_pixels_not_square_no_size_as_segment_does(
    nuclei_dataset, tmp_path
) -> None:
    """A test TIFF tagged 0.25 x 0.5 um pixels has no size in mlseg segment, not even the
    profile's; evaluate scored it at the profile's 0.25 um, resampled by one factor that is
    wrong along one axis. It is scored as an image of unknown size now (scaled by its
    nuclei), the square image beside it still at the profile's."""
    from flow_helpers import as_tiff_of_pixels

    from mlseg.config import get_profile

    folder = _small_checkpoint(tmp_path / "model", pixel_size_um=0.5)
    profile = get_profile("he").model_copy(update={"pixel_size_um": 0.25})
    data = nuclei_dataset(n_train=0, n_test=2, size=64)
    as_tiff_of_pixels(data / "test" / "original" / "test0.png", 0.25, 0.5)
    with pytest.warns(UserWarning, match=r"test0\.tif: pixel size ignored.*not square"):
        result = ev.evaluate(folder, data, tmp_path / "eval", profile=profile, progress=False)
    wide, square = result.per_image.set_index("stem").loc[["test0", "test1"]].itertuples()
    assert pd.isna(wide.pixel_size_um) and wide.scale_source != "pixel_size"
    assert (square.pixel_size_um, square.scale_source) == (0.25, "pixel_size")


def test_a_pixel_size_given_for_every_image_is_the_one_scored_and_in_the_set_id(
    nuclei_dataset, tmp_path
) -> None:
    """The pipeline's ``pixel_size_um`` (every test image's) was given to its segment step
    only: its evaluation scored the same test images at the dataset's sizes, so the report
    held two segmentations of them. Given to evaluate, it is each image's size, and the
    evaluation set id records it, so a score at another scale is never compared."""
    from mlseg.registry import eval_set_id

    folder = _small_checkpoint(tmp_path / "model", pixel_size_um=0.5)
    data = nuclei_dataset(n_train=0, n_test=2, size=64)
    own = ev.evaluate(folder, data, tmp_path / "own", progress=False)
    given = ev.evaluate(folder, data, tmp_path / "given", pixel_size_um=0.25, progress=False)
    assert given.per_image["pixel_size_um"].tolist() == [0.25, 0.25]
    assert given.per_image["scale_factor"].tolist() == [0.5, 0.5]
    assert own.eval_set_id == eval_set_id(data)
    assert given.eval_set_id == eval_set_id(data, pixel_size_um=0.25) != own.eval_set_id
    # a slip of the decimal point is named, as mlseg segment names it
    with pytest.warns(UserWarning, match=r"its pixel size is 10x the model's"):
        ev.evaluate(folder, data, tmp_path / "slip", pixel_size_um=5.0, progress=False)


def test_evaluate_says_a_mask_of_another_size_as_training_does(
    checkpoint, synth_dataset, tmp_path
) -> None:
    """Width by height and what to do, as train, ingest and validate say it: evaluate gave
    numpy's (height, width) and no fix."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    mask = sorted((root / "test" / "masks").iterdir())[0]
    labels = read_mask(mask)
    write_labels(mask, labels[:-1])
    height, width = labels.shape
    with pytest.raises(DatasetError, match=f"{width}x{height - 1} px but its image is {width}x"):
        ev.evaluate(checkpoint, root, tmp_path / "eval", progress=False)


def test_evaluate_names_every_mask_of_another_size_before_segmenting(
    checkpoint, synth_dataset, tmp_path, monkeypatch
):
    """A test mask a pixel short of its image (a 1-px crop in export) was found only when
    its image's turn came: every image before it was segmented, then the evaluation stopped
    naming that one mask and wrote nothing. It names every such mask before any image is
    segmented, as it names JPEG masks."""
    import shutil

    root = shutil.copytree(synth_dataset, tmp_path / "data")
    masks = sorted((root / "test" / "masks").iterdir())
    for mask in masks[1:]:
        write_labels(mask, read_mask(mask)[:, :-1])
    refused = _refused_before_segmenting(checkpoint, root, tmp_path, monkeypatch)
    assert all(f"{m}: mask is 95x96 px but its image is 96x96" in refused for m in masks[1:])


def test_evaluate_warns_of_images_the_model_trained_on_whatever_their_name(
    synth_dataset, tmp_path
) -> None:
    """An evaluation set ingested again with more images, or a test split holding a renamed
    copy of a training image, scored the model on images it had learnt without a word, and
    a champion then looked better than it is on new slides."""
    from mlseg.config import load_config
    from mlseg.io import read_image, write_image
    from mlseg.train import fit

    torch.set_num_threads(2)
    cfg = load_config(None, train={**SMALL.model_dump(), "max_steps": 1, "batch_size": 2})
    model = fit(cfg, synth_dataset, tmp_path / "model", progress=False).last_checkpoint
    meta = json.loads((model.parent / "meta.json").read_text())
    trained = meta["split"]["train"][0]
    held = meta["split"]["validation"][0]
    new_set = tmp_path / "again" / "test"
    for folder in ("original", "masks"):
        (new_set / folder).mkdir(parents=True)
    train_dir = synth_dataset / "train"
    for stem, name, turn in ((trained, "slide7_a", True), (held, "slide7_b", False)):
        image = read_image(next((train_dir / "original").glob(f"{stem}.*")))
        mask = read_mask(train_dir / "masks" / f"{stem}_mask.png")
        if turn:  # a mirrored copy, as an augmented copy saved beside its tile
            image, mask = image[:, ::-1], mask[:, ::-1]
        write_image(new_set / "original" / f"{name}.png", image)
        write_labels(new_set / "masks" / f"{name}_mask.png", mask)
    unseen = next((synth_dataset / "test" / "original").iterdir())
    write_image(new_set / "original" / unseen.name, read_image(unseen))
    write_labels(
        new_set / "masks" / f"{unseen.stem}_mask.png",
        read_mask(synth_dataset / "test" / "masks" / f"{unseen.stem}_mask.png"),
    )

    with pytest.warns(UserWarning, match="trained on .slide7_a.*checkpoint on .slide7_b"):
        result = ev.evaluate(model, tmp_path / "again", tmp_path / "eval", progress=False)
    summary = json.loads(result.json_path.read_text())
    assert summary["seen_in_training"] == {"train": ["slide7_a"], "validation": ["slide7_b"]}
    # a segment run's record names the model, not every training image's hash
    from mlseg.segment import segment_folder

    segment_folder(model, new_set / "original", tmp_path / "seg", profile_name="he", progress=False)
    run = json.loads((tmp_path / "seg" / "run.json").read_text())
    assert "image_hashes" not in run["model_meta"] and run["model_meta"]["split"]


def test_evaluate_names_a_training_image_saved_again_in_16_bits(
    nuclei_dataset, tmp_path, monkeypatch
) -> None:
    """A training tile saved into the test split as a 16-bit file (8-bit values scaled by
    257, as scikit-image converts) gives the model the same pixels, yet evaluate scored it
    as held out and said nothing: only identical pixels were looked up. A model saved
    before mlseg hashed exact forms (its image_hashes as stored) still names a grey field
    saved RGB that it trained on."""
    from mlseg.config import get_profile, load_config
    from mlseg.data import prepare_data
    from mlseg.inventory import turn_free_hash
    from mlseg.io import read_image, write_image

    root = nuclei_dataset(n_train=2, n_test=1, size=48)
    train0 = read_image(root / "train" / "original" / "train0.png")
    write_image(root / "test" / "original" / "copy.png", train0.astype(np.uint16) * 257)
    write_labels(
        root / "test" / "masks" / "copy_mask.png",
        read_mask(root / "train" / "masks" / "train0_mask.png"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny images: no pixel size, few nuclei
        data = prepare_data(load_config(None), root, get_profile("he"), torch.device("cpu"))
    folder = _small_checkpoint(tmp_path / "model", image_hashes=data.image_hashes)
    monkeypatch.setattr(
        ev,
        "predict_image",
        lambda loaded, image, *a, **k: (np.zeros(image.shape[:2], np.int32), {}),
    )

    with pytest.warns(UserWarning, match=r"\(copy\)"):
        result = ev.evaluate(folder, root, tmp_path / "eval", progress=False)
    seen = json.loads(result.json_path.read_text())["seen_in_training"]
    assert sorted(seen["train"] + seen["validation"]) == ["copy"]

    # an older model's record: the pixels as stored, of a grey field saved RGB
    grey = np.repeat(train0.mean(axis=2).astype(np.uint8)[..., None], 3, axis=2)
    write_image(root / "test" / "original" / "copy.png", grey)
    stored = {"train": [turn_free_hash(grey, exact=False)], "validation": []}
    older = _small_checkpoint(tmp_path / "older", image_hashes=stored)
    with pytest.warns(UserWarning, match=r"trained on \(copy\)"):
        result = ev.evaluate(older, root, tmp_path / "eval2", progress=False)
    assert json.loads(result.json_path.read_text())["seen_in_training"]["train"] == ["copy"]


def _with_transparent_outside(path) -> None:
    """Save the image at ``path`` again as an RGBA PNG whose right third is transparent
    black, as QuPath and OpenSlide export the outside of a field."""
    import cv2

    from mlseg.io import read_image

    image = read_image(path)
    alpha = np.full(image.shape[:2], 255, np.uint8)
    alpha[:, -image.shape[1] // 3 :] = 0
    rgba = np.dstack([np.where(alpha[..., None] > 0, image, 0), alpha])
    cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))


@pytest.mark.parametrize("stain", ["fluorescence", "he"])
def test_training_evaluate_and_segment_see_one_rgba_file_as_the_same_pixels(
    stain, nuclei_dataset, tmp_path, monkeypatch
) -> None:
    """segment laid a fluorescence image's transparent outside over black (no light) while
    training and evaluate laid it over white, as bright field's glass: the model learnt a
    saturated outside that segment never showed it, and evaluate scored other pixels than
    segment measured. One rule now, and the model's record of the images it trained on
    still finds a copy of one in the test split; bright field reads as it always did."""
    import shutil

    from mlseg.config import get_profile, load_config
    from mlseg.data import decode_pairs, prepare_data
    from mlseg.io import read_image
    from mlseg.model import load_model
    from mlseg.segment import segment_image

    profile = get_profile(stain)
    root = nuclei_dataset(n_train=2, n_test=1, size=48)
    trained = root / "train" / "original" / "train0.png"
    _with_transparent_outside(trained)
    shutil.copy(trained, root / "test" / "original" / "test0.png")
    shutil.copy(
        root / "train" / "masks" / "train0_mask.png", root / "test" / "masks" / "test0_mask.png"
    )
    cfg = load_config(None)
    pairs = list_pairs(root, "train", cfg.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny images: no pixel size, few nuclei
        training = decode_pairs(pairs, cfg.preprocess, profile)[0][0]
        data = prepare_data(cfg, root, profile, torch.device("cpu"))
    folder = _small_checkpoint(
        tmp_path / "model", profile=profile, stain=stain, image_hashes=data.image_hashes
    )
    scored = {}

    def spy(loaded, image, *args, **kwargs):
        scored["image"] = image
        return np.zeros(image.shape[:2], np.int32), {}

    monkeypatch.setattr(ev, "predict_image", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ev.evaluate(folder, root, tmp_path / "eval", progress=False)
    loaded = load_model(folder / "best.safetensors")
    test0 = root / "test" / "original" / "test0.png"
    segmented = segment_image(loaded, test0, profile, loaded.config.inference)[0]

    outside = 0 if stain == "fluorescence" else 255  # no light; glass
    assert (segmented[:, -16:] == outside).all()
    assert np.array_equal(training, segmented)
    assert np.array_equal(scored["image"], segmented)
    if stain == "he":  # bright field: as read_image always read it
        assert segmented.tobytes() == read_image(test0).tobytes()
    summary = json.loads(result.json_path.read_text())
    assert ["test0"] in (summary["seen_in_training"] or {}).values()
    assert any("trained on" in str(w.message) or "checkpoint on" in str(w.message) for w in caught)


def test_scoring_the_training_split_under_another_folder_name_is_no_leak(
    synth_dataset, tmp_path
) -> None:
    """A dataset whose training split lives in ``training/`` (data.train_dir): evaluating
    its train split on purpose warned that every image was one the model trained on, and
    listed them under seen_in_training, as if they had leaked into a held-out set."""
    import shutil
    import warnings

    from mlseg.config import load_config
    from mlseg.train import fit

    root = tmp_path / "data"
    shutil.copytree(synth_dataset / "train", root / "training")
    shutil.copytree(synth_dataset / "test", root / "test")
    torch.set_num_threads(2)
    cfg = load_config(
        None,
        data={"train_dir": "training"},
        train={**SMALL.model_dump(), "max_steps": 1, "batch_size": 2},
    )
    model = fit(cfg, root, tmp_path / "model", progress=False).last_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the set's fluorescence images, which the he profile's Macenko step leaves as they are
        warnings.filterwarnings(
            "ignore", r".*/fluorescence_\d+\.png: Macenko normalisation found no", UserWarning
        )
        result = ev.evaluate(model, root, tmp_path / "eval", split="train", progress=False)
    summary = json.loads(result.json_path.read_text())
    assert summary["n_images"] == 6


@pytest.mark.parametrize("split", ["val", "Train"])
def test_a_split_other_than_train_or_test_is_refused_not_scored_as_test(
    checkpoint, synth_dataset, tmp_path, split
) -> None:
    """``evaluate(..., split="val")`` (or ``"Train"``) scored the test images and wrote them
    into summary.json as that split: a notebook's validation or training scores were the
    test set's, under the name asked for."""
    from mlseg.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"split must be train or test, got '{split}'"):
        ev.evaluate(checkpoint, synth_dataset, tmp_path / "eval", split=split, progress=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_names_a_test_image_stain_normalisation_leaves_as_it_is(
    nuclei_dataset, tmp_path
) -> None:
    """mlseg segment names an image too faded for Macenko normalisation, which it then
    segments un-normalised and may undercount; evaluate scored such a test image, low,
    with nothing said. The faded slide is named now, the stained one beside it is not."""
    from mlseg.config import PreprocessConfig
    from mlseg.io import read_image, write_image

    folder = _small_checkpoint(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["preprocess"] = PreprocessConfig(stain_norm="macenko").model_dump()
    (folder / "config.json").write_text(json.dumps(config))
    data = nuclei_dataset(n_train=0, n_test=2, size=64)
    faded = data / "test" / "original" / "test0.png"
    od = -np.log((read_image(faded).astype(float) + 1) / 256)
    write_image(faded, (256 * np.exp(-od * 0.1) - 1).round().astype(np.uint8))
    _, said = _evaluated_saying(folder, data, tmp_path / "eval")
    named = [line.split(":")[0] for line in said.split(" | ") if "Macenko" in line]
    assert named == [str(faded)]
