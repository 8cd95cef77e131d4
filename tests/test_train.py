"""Training loop: runs, resumes, and fails clearly on bad input."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.draw import disk

from mlseg.config import load_config
from mlseg.errors import ConfigError, DatasetError, ModelError, ResumeError
from mlseg.io import read_image, read_mask, write_image, write_labels
from mlseg.registry import code_version, package_versions
from mlseg.train import SegLoss, fit, warmup_cosine

TINY = {
    "encoder": "resnet18",
    "encoder_depth": 3,
    "patch_size": 64,
    "batch_size": 2,
    "warmup_steps": 1,
}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def _cfg(**train):
    return load_config(None, train={**TINY, **train})


def _binary_dataset(root, n: int = 3, size: int = 64):
    rng = np.random.default_rng(0)
    for i in range(n):
        image = np.full((size, size, 3), 230, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for _ in range(4):
            rr, cc = disk(tuple(rng.integers(8, size - 8, 2)), 6, shape=mask.shape)
            image[rr, cc] = (80, 40, 140)
            mask[rr, cc] = 255
        write_image(root / "train" / "original" / f"img{i}.png", image)
        write_labels(root / "train" / "masks" / f"img{i}_mask.png", mask)
    (root / "test" / "original").mkdir(parents=True)
    return root


def test_fit_two_steps_then_resume_continues(synth_dataset, tmp_path) -> None:
    out = tmp_path / "run"
    first = fit(_cfg(max_steps=2, val_every=2), synth_dataset, out, progress=False)
    assert (
        first.steps == 2 and first.best_checkpoint is not None and first.last_checkpoint.is_file()
    )
    assert list(first.history["step"]) == [2] and 0 <= first.best_val_dice <= 1
    for name in (
        "config.json",
        "meta.json",
        "last.state.pt",
        "history.csv",
        "history.json",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name
    second = fit(_cfg(max_steps=3, val_every=2), synth_dataset, out, progress=False)
    assert second.steps == 3
    assert list(second.history["step"]) == [2, 3] and list(second.history["epoch"]) == [1, 2]
    # the time since the run began, not since the resume: it grows from row to row
    assert second.history["elapsed_s"].is_monotonic_increasing
    from mlseg.model import load_model

    loaded = load_model(out)
    assert loaded.target == "three_class" and loaded.classes == 3  # instance masks -> auto
    assert loaded.config.train.target == "three_class"
    assert loaded.meta["checkpoints"]["last"]["step"] == 3
    assert 6 < loaded.meta["nucleus_diameter_px"] < 20  # synthetic nuclei: ~12 px across
    assert loaded.meta["nucleus_diameter_stat"] == "trimmed"
    # a finished run is not trained again
    assert fit(_cfg(max_steps=3, val_every=2), synth_dataset, out, progress=False).steps == 3


def test_a_second_training_into_a_folder_in_use_is_refused(synth_dataset, tmp_path) -> None:
    """Two trainings into one --out at once both trained, over each other's checkpoints,
    and both said 'checkpoints in <out>': one with lr 0.003 reported best Dice 0.5250,
    while the folder held the other's run (lr 1e-05, best Dice 0.4004)."""
    from filelock import FileLock

    from mlseg.errors import OutputError

    out = tmp_path / "run"
    out.mkdir()
    with (
        FileLock(out / ".mlseg.lock"),  # the training running there
        pytest.raises(OutputError, match="another mlseg training is writing to this"),
    ):
        fit(_cfg(max_steps=1), synth_dataset, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".mlseg.lock"]
    assert fit(_cfg(max_steps=1), synth_dataset, out, progress=False).steps == 1


def test_a_history_saved_again_by_a_european_spreadsheet_resumes(synth_dataset, tmp_path):
    """history.csv looked at in Excel with a German locale, and saved on closing, has
    semicolons and decimal commas: the resume ended in a traceback (KeyError: 'step')."""
    out = tmp_path / "run"
    first = fit(_cfg(max_steps=2, val_every=1), synth_dataset, out, progress=False)
    first.history.to_csv(out / "history.csv", sep=";", decimal=",", index=False)
    second = fit(_cfg(max_steps=3, val_every=1), synth_dataset, out, progress=False)
    assert list(second.history["step"]) == [1, 2, 3]
    assert second.history["train_loss"][:2].tolist() == first.history["train_loss"].tolist()


def test_each_epoch_goes_to_log_with_a_progress_bar_too(synth_dataset, tmp_path, capsys) -> None:
    """With a bar, the epoch lines went to stdout and not to ``log``: a Prefect run started
    with a bar (python -m flows.pipeline) logged no epoch to its dashboard, and `mlseg train`
    in a terminal mixed them into its output (`> result.txt`) instead of stderr."""
    lines: list[str] = []
    fit(_cfg(max_steps=2, val_every=1), synth_dataset, tmp_path / "run", log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["epoch 1 step 1", "epoch 2 step 2"]
    assert "epoch" not in capsys.readouterr().out


def test_ema_checkpoints_hold_the_average_and_resume(synth_dataset, tmp_path) -> None:
    from safetensors.torch import load_file

    from mlseg.model import load_model, load_train_state

    out = tmp_path / "run"
    fit(_cfg(max_steps=2, val_every=1, ema_decay=0.5), synth_dataset, out, progress=False)
    state = load_train_state(out)
    saved = load_file(str(out / "last.safetensors"))
    assert saved.keys() == state["model"].keys()
    # the checkpoint is the average, not the last raw weights
    moved = [k for k in saved if saved[k].is_floating_point() and "running" not in k]
    assert any(not torch.allclose(saved[k], state["model"][k]) for k in moved)
    resumed = fit(_cfg(max_steps=3, val_every=1, ema_decay=0.5), synth_dataset, out, progress=False)
    assert resumed.steps == 3 and "model" in load_train_state(out)
    assert load_model(out).meta["checkpoints"]["last"]["step"] == 3


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"train": {"encoder": "resnet34"}}, "train.encoder: 'resnet18' -> 'resnet34'"),
        ({"train": {"lr": 1e-2}}, "train.lr: 0.001 -> 0.01"),
        ({"augment": {"flips": False}}, "augment.flips: True -> False"),
        ({"data": {"val_fraction": 0.5}}, "data.val_fraction: 0.15 -> 0.5"),
    ],
)
def test_resume_refuses_another_recipe(synth_dataset, tmp_path, changed, named) -> None:
    """The config beside the weights must be the one that trained them: a resume with
    another model, learning setting, augmentation or validation split is refused."""
    fit(_cfg(max_steps=1), synth_dataset, tmp_path, progress=False)
    cfg = load_config(
        None,
        train={**TINY, "max_steps": 2, **changed.get("train", {})},
        **{k: v for k, v in changed.items() if k != "train"},
    )
    with pytest.raises(ResumeError, match="--no-resume") as error:
        fit(cfg, synth_dataset, tmp_path, progress=False)
    assert named in str(error.value)
    assert json.loads((tmp_path / "meta.json").read_text())["checkpoints"]["last"]["step"] == 1


def test_fit_leaves_the_process_thread_count_as_it_found_it(synth_dataset, tmp_path) -> None:
    """A notebook or worker that trains with ``num_threads: 1`` and then segments, or trains
    again with ``num_threads: 0`` (torch's default), must not go on single-threaded."""
    fit(_cfg(max_steps=1, num_threads=1), synth_dataset, tmp_path / "one", progress=False)
    assert torch.get_num_threads() == 2  # as _few_threads set it
    fit(_cfg(max_steps=1), synth_dataset, tmp_path / "default", progress=False)
    stretches = json.loads((tmp_path / "default" / "meta.json").read_text())["trained_on"]
    assert stretches[0]["threads"] == 2


def test_resume_may_change_where_and_how_long(synth_dataset, tmp_path) -> None:
    """Allowed, but the stretches are recorded and the user is told: another thread count
    or machine sums differently, so the model is not the one an uninterrupted run gives."""
    fit(_cfg(max_steps=1, num_threads=2), synth_dataset, tmp_path, progress=False)
    more = _cfg(max_steps=2, num_threads=1, val_every=1, early_stop_patience=3, device="cpu")
    with pytest.warns(UserWarning, match=r"resuming at step 1 on another .*threads 2 -> 1"):
        assert fit(more, synth_dataset, tmp_path, progress=False).steps == 2
    stretches = json.loads((tmp_path / "meta.json").read_text())["trained_on"]
    assert [(s["from_step"], s["threads"]) for s in stretches] == [(0, 2), (1, 1)]
    assert {s["device"] for s in stretches} == {"cpu"}
    assert stretches[0]["torch"] == torch.__version__
    # on the same machine and settings a resume adds no stretch and says nothing (of it: the
    # set's fluorescence image is still one the he profile's Macenko step leaves as it is)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", r".*training images are learnt un-normalised")
        fit(_cfg(max_steps=3, num_threads=1, val_every=1), synth_dataset, tmp_path, progress=False)
    assert json.loads((tmp_path / "meta.json").read_text())["trained_on"] == stretches


def test_the_weights_name_the_code_and_packages_they_were_trained_with(
    synth_dataset, tmp_path
) -> None:
    """A registered model must say all a reader needs to train it again: mlseg's commit and
    the releases that decide the numbers (smp and timm build the model, numpy draws the
    split and patches), not torch's release alone."""
    fit(_cfg(max_steps=1), synth_dataset, tmp_path, progress=False)
    (stretch,) = json.loads((tmp_path / "meta.json").read_text())["trained_on"]
    assert stretch["code"] == code_version()
    assert stretch["packages"] == package_versions()
    assert stretch["packages"]["segmentation-models-pytorch"] and stretch["packages"]["numpy"]


def test_a_resume_of_a_config_saved_before_a_setting_existed_names_it(
    synth_dataset, tmp_path
) -> None:
    """A run saved by an mlseg without augment.haematoxylin_gain_p (and without trained_on)
    resumed silently with today's default (0.5), and config.json then said the whole run
    had it: the missing key was no change to the resume check."""
    fit(_cfg(max_steps=1), synth_dataset, tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["augment"]["haematoxylin_gain_p"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["trained_on"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"lacks 1 setting.*augment.haematoxylin_gain_p: 0.5"):
        assert fit(_cfg(max_steps=2), synth_dataset, tmp_path, progress=False).steps == 2


def test_a_resume_on_another_release_names_only_the_package_that_changed(tmp_path) -> None:
    """A resume after one package's upgrade warned with both lists of twelve releases in
    full (827 characters), to be compared by eye; it names the one that changed."""
    from mlseg.train import _trained_on

    here = {"device": "cpu", "threads": 2, "code": code_version(), "packages": package_versions()}
    older = {**here, "packages": {**here["packages"], "numpy": "1.0"}}
    (tmp_path / "meta.json").write_text(json.dumps({"trained_on": [{"from_step": 0, **older}]}))
    with pytest.warns(UserWarning, match="resuming at step 5") as said:
        _trained_on(tmp_path, 5, here)
    message = str(said[0].message)
    assert f"packages.numpy '1.0' -> {here['packages']['numpy']!r}" in message
    assert "timm" not in message and "python" not in message


def test_an_early_stopped_run_trains_on_when_resumed_with_more_patience(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    """early_stop_patience is a setting a resume may change: a run stopped after one epoch
    without improvement goes on, given a patience of 3, until three epochs pass without."""
    import mlseg.train

    monkeypatch.setattr(mlseg.train, "validate", lambda *a, **k: {"val_loss": 1.0, "val_dice": 0.5})
    first = fit(_cfg(max_steps=8, val_every=1, early_stop_patience=1), synth_dataset, tmp_path)
    assert first.steps == 2  # epoch 1 is the best, epoch 2 no better: stopped
    again = fit(_cfg(max_steps=8, val_every=1, early_stop_patience=3), synth_dataset, tmp_path)
    assert again.steps == 4 and list(again.history["step"]) == [1, 2, 3, 4]


def test_an_extended_run_takes_its_next_step_at_the_longer_schedules_rate(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    import mlseg.train

    fit(_cfg(max_steps=2, val_every=2), synth_dataset, tmp_path, progress=False)
    used, step = [], mlseg.train.train_step

    def recording(model, optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(mlseg.train, "train_step", recording)
    cfg = _cfg(max_steps=4, val_every=2)
    fit(cfg, synth_dataset, tmp_path, progress=False)
    schedule = warmup_cosine(cfg.train.warmup_steps, 4)
    assert used == pytest.approx([cfg.train.lr * schedule(2), cfg.train.lr * schedule(3)])


def test_cpu_trains_in_bf16_only_where_the_hardware_does(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    """bf16 autocast where the CPU has it in hardware (2-4x faster), float32 elsewhere
    (emulated bf16 is slower); the precision is recorded, a change of it on resume is
    named, and checkpoints stay float32 so they load on any machine."""
    import mlseg.model

    monkeypatch.setattr(mlseg.model, "cpu_bf16", lambda: False)
    fit(_cfg(max_steps=1), synth_dataset, tmp_path, progress=False)
    monkeypatch.setattr(mlseg.model, "cpu_bf16", lambda: True)
    with pytest.warns(UserWarning, match="precision 'float32' -> 'bf16 autocast'"):
        fit(
            _cfg(max_steps=2, val_every=1, early_stop_patience=3),
            synth_dataset,
            tmp_path,
            progress=False,
        )
    stretches = json.loads((tmp_path / "meta.json").read_text())["trained_on"]
    assert [s["precision"] for s in stretches] == ["float32", "bf16 autocast"]
    assert {w.dtype for w in _weights(tmp_path).values() if w.is_floating_point()} == {
        torch.float32
    }
    # train.amp: false keeps float32 on such a CPU too
    fit(_cfg(max_steps=1, amp=False), synth_dataset, tmp_path / "fp32", progress=False)
    meta = json.loads((tmp_path / "fp32" / "meta.json").read_text())
    assert meta["trained_on"][0]["precision"] == "float32"


def test_nan_loss_is_a_clear_error(synth_dataset, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(
        SegLoss, "forward", lambda self, logits, target: logits.mean() * float("nan")
    )
    with pytest.raises(ModelError, match="diverged.*lower train.lr"):
        fit(_cfg(max_steps=2), synth_dataset, tmp_path, progress=False)


def test_a_diverged_model_whose_training_loss_is_still_finite_is_never_saved(
    synth_dataset, tmp_path
) -> None:
    # lr 1e6: by the first epoch's end the weights have overflowed and the model outputs NaN
    # (Dice 0), while the training loss is still a finite 1e12
    with pytest.raises(ModelError, match="diverged: the validation loss became nan by step 2"):
        fit(_cfg(max_steps=4, val_every=2, lr=1e6), synth_dataset, tmp_path, progress=False)
    assert not (tmp_path / "best.safetensors").exists()
    assert not (tmp_path / "last.safetensors").exists()


def test_nan_weights_after_a_finite_loss_are_never_saved_without_validation(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    import mlseg.train

    def step_to_nan(model, *args, **kwargs):  # the last update overflows, its loss did not
        loss = train_step(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))
        return loss

    train_step = mlseg.train.train_step
    monkeypatch.setattr(mlseg.train, "train_step", step_to_nan)
    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0})
    with pytest.raises(ModelError, match="diverged: the model's weights .* became nan by step 1"):
        fit(cfg, synth_dataset, tmp_path, progress=False)
    assert not (tmp_path / "best.safetensors").exists()


def test_a_model_that_cannot_be_built_leaves_the_run_no_resume_would_replace(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    """--no-resume deleted the earlier run's checkpoints, then failed to build the model."""
    import segmentation_models_pytorch.encoders as encoders

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.safetensors", "last.safetensors", "last.state.pt", "meta.json"):
        (out / name).write_bytes(b"the earlier run")
    with pytest.raises(ModelError, match="offline"):
        fit(_cfg(encoder_weights="imagenet"), synth_dataset, out, resume=False, progress=False)
    assert (out / "best.safetensors").read_bytes() == b"the earlier run"
    assert (out / "meta.json").read_bytes() == b"the earlier run"


def test_a_misspelt_architecture_is_refused_before_the_data_are_read(
    synth_dataset, tmp_path, monkeypatch, capsys
) -> None:
    import yaml

    import mlseg.train
    from mlseg.cli import main

    def unread(*args, **kwargs):
        raise AssertionError("the data were read")

    monkeypatch.setattr(mlseg.train, "prepare_data", unread)
    with pytest.raises(ModelError, match="train.arch: unknown architecture 'Unett'"):
        fit(_cfg(arch="Unett"), synth_dataset, tmp_path / "run", progress=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": {**TINY, "encoder": "tu-resnet35"}}))
    out = tmp_path / "cli"
    assert main(["train", str(config), "--data", str(synth_dataset), "--out", str(out)]) == 2
    assert "train.encoder: timm has no model 'resnet35'" in capsys.readouterr().err
    assert not (out / "validation").exists()  # not after validating the dataset


def test_a_batch_the_model_cannot_train_on_is_refused_before_training(
    synth_dataset, tmp_path
) -> None:
    """DeepLabV3Plus with batch_size 1 failed at its first step with torch's ValueError."""
    with pytest.raises(ModelError, match="train.batch_size=1: DeepLabV3Plus"):
        fit(_cfg(arch="DeepLabV3Plus", batch_size=1), synth_dataset, tmp_path, progress=False)


def test_three_class_on_binary_masks_is_refused(tmp_path) -> None:
    root = _binary_dataset(tmp_path / "ds")
    with pytest.raises(ConfigError, match="three_class needs instance-labelled masks"):
        fit(_cfg(max_steps=1, target="three_class"), root, tmp_path / "run", progress=False)


def test_binary_masks_train_binary_target(tmp_path) -> None:
    root = _binary_dataset(tmp_path / "ds")
    result = fit(_cfg(max_steps=1), root, tmp_path / "run", progress=False)
    from mlseg.model import load_model

    assert load_model(result.out_dir).classes == 1


def test_faint_share_samples_the_faintest_training_nuclei(synth_dataset, tmp_path) -> None:
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    cfg = _cfg(faint_oversample=0.2, faint_quantile=0.25, max_steps=2)
    store = prepare_data(cfg, synth_dataset, get_profile(cfg.profile), torch.device("cpu")).train
    assert len(store.faint_pos) > 0
    # every faint centre lies on a nucleus of its own image
    assert (store.classes[store.offset[store.faint_img] + store.faint_pos] > 0).all()
    assert fit(cfg, synth_dataset, tmp_path / "run", progress=False).steps == 2


def _magnifications(root, sizes):
    """One image per entry of ``sizes`` (microns per pixel, None = unknown): the same four
    nuclei, 2.5 um in radius, on a 24 x 24 um field, drawn at that pixel size."""
    rows = []
    for i, um in enumerate(sizes):
        px = 0.5 if um is None else um
        side = round(24 / px)
        image = np.full((side, side, 3), 230, np.uint8)
        labels = np.zeros((side, side), np.uint16)
        for n, centre in enumerate([(6, 6), (6, 18), (18, 6), (18, 18)], start=1):
            rr, cc = disk((centre[0] / px, centre[1] / px), 2.5 / px, shape=labels.shape)
            image[rr, cc], labels[rr, cc] = (80, 40, 140), n
        write_image(root / "train" / "original" / f"img{i}.png", image)
        write_labels(root / "train" / "masks" / f"img{i}_mask.png", labels)
        rows.append(f"train,img{i},{'' if um is None else um}")
    (root / "test" / "original").mkdir(parents=True)
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\n" + "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(
    ("sizes", "trained_at", "resampled", "sides"),
    [
        ([0.5, 0.5, 0.25], 0.5, True, [48, 48, 48]),  # 20x + 40x: all brought to the median
        ([0.25, 0.25, 0.5], 0.25, True, [96, 96, 96]),
        ([0.5, 0.52, 0.5], 0.5, False, [48, 46, 48]),  # one scale: no resampling blur
        ([None, None, None], None, False, [48, 48, 48]),
    ],
)
def test_mixed_magnifications_train_at_their_median_pixel_size(
    tmp_path, sizes, trained_at, resampled, sides
) -> None:
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0.0})
    root = _magnifications(tmp_path / "ds", sizes)
    data = prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))
    assert data.pixel_size_um == trained_at
    assert data.preprocess.target_pixel_size_um == (trained_at if resampled else None)
    assert data.train.height_cpu.tolist() == sides
    # The model sees every nucleus at one size: 5 um across at the training pixel size.
    assert data.nucleus_diameter_px == pytest.approx(5 / (trained_at or 0.5), rel=0.15)


def test_a_training_split_larger_than_the_memory_left_is_named_before_it_is_decoded(
    tmp_path, monkeypatch
) -> None:
    """mlseg segment, quantify and evaluate warned before a field too large for the memory
    left; training, which holds its whole split decoded and packed at once, said nothing and
    was stopped by the system part-way, however small each image. The split's size is read
    from the image headers at the scale it trains at: three 48 x 48 fields once the 40x
    one (96 x 96) is brought to 20x, one pixel more than fits naming the folder and the fix,
    and nothing said where it fits or the memory left cannot be read."""
    import mlseg.data
    from mlseg.config import get_profile
    from mlseg.data import TRAIN_BYTES_PER_PIXEL, prepare_data

    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0.0})
    root = _magnifications(tmp_path / "ds", [0.5, 0.5, 0.25])
    fits = 3 * 48 * 48 * TRAIN_BYTES_PER_PIXEL

    def said(left: int | None) -> list[str]:
        monkeypatch.setattr(mlseg.data, "available_memory", lambda: left)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))
        assert data.train.n_images == 3  # warned, not refused
        return [str(w.message) for w in caught if "memory" in str(w.message)]

    assert said(fits) == [] and said(None) == []
    [line] = said(fits - 1)
    assert line.startswith(
        f"{root / 'train'}: the 3 training images, 6,912 px in all, need about 0.0 GiB of "
        "memory in mlseg train, which holds them all at once, more than the 0.0 GiB this "
        "process has left"
    )
    assert "train on fewer images or crops of them" in line


def test_training_names_the_images_stain_normalisation_leaves_as_they_are(
    nuclei_dataset,
) -> None:
    """mlseg segment names an image too faded for Macenko normalisation; training took such
    images un-normalised, an appearance the model sees nowhere else, with nothing said.
    The faded slide and the glass are named once, by their folder; the stained ones are not,
    and a set of stained images says nothing."""
    from mlseg.config import get_profile
    from mlseg.data import prepare_data
    from mlseg.io import read_image, write_image

    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0.0})
    root = nuclei_dataset(n_train=4, n_test=0, size=64)

    def said() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))
        assert data.train.n_images == 4  # warned, not refused
        return [str(w.message) for w in caught if "Macenko" in str(w.message)]

    assert said() == []
    images = root / "train" / "original"
    od = -np.log((read_image(images / "train1.png").astype(float) + 1) / 256)
    write_image(images / "train1.png", (256 * np.exp(-od * 0.1) - 1).round().astype(np.uint8))
    write_image(images / "train3.png", np.full((64, 64, 3), 245, np.uint8))
    [line] = said()
    assert line.startswith(
        f"{root / 'train'}: 2 of 4 training images are learnt un-normalised, Macenko "
        "normalisation finding no two stains in them; train1, train3 (fewer than 100 pixels "
        "stained in every channel): right for tiles of blank glass"
    )
    assert line.endswith("leave such slides out")


def test_train_says_which_pixel_size_the_model_was_trained_at(tmp_path, capsys) -> None:
    """Trained on CPM15's 20x and 40x tiles, mlseg train picked 0.25 um, the median of the
    training images, and its last lines did not say so: nothing told the user that every
    20x image would then be enlarged 2x, at about 4x the inference time. The summary names
    the size meta.json records, where it came from and what it costs."""
    import yaml

    from mlseg.cli import main
    from mlseg.train import describe_scale

    root = _magnifications(tmp_path / "ds", [0.5, 0.25, 0.25])
    config = tmp_path / "run.yaml"
    run = {"train": {**TINY, "max_steps": 1}, "data": {"val_fraction": 0.0}}
    config.write_text(yaml.safe_dump(run))
    out = tmp_path / "run"
    argv = ["train", str(config), "--data", str(root), "--out", str(out), "--no-validate"]
    assert main([*argv, "--quiet"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert json.loads((out / "meta.json").read_text())["pixel_size_um"] == 0.25
    assert last == (
        "pixel size: trained at 0.25 um/px (the median of the training images' 0.25-0.5 um); "
        "segment resamples every image of known size to it and measures it at its own: one at "
        "0.5 um is enlarged 2x, taking about 4x the time"
    )
    assert describe_scale(None, {"a": None, "b": None}) == (
        "pixel size: unknown (no training image has one); segment scales each image by the "
        "size of its nuclei (inference.auto_scale)"
    )
    one_scale = describe_scale(0.5, {"a": 0.5, "b": 0.5})
    assert (
        "0.5 um/px (the training images' own)" in one_scale
        and "an image at 1 um would be enlarged 2x" in one_scale
    )
    assert "(preprocess.target_pixel_size_um)" in describe_scale(0.3, {"a": 0.25, "b": 0.5})


def test_train_boundary_px_reaches_the_training_targets(tmp_path) -> None:
    """train.boundary_px is the width of the boundary class the model is trained on: a
    mutant that left it out of prepare_data (every run trained on 1-px boundaries, whatever
    the config said) passed every test."""
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    root = _magnifications(tmp_path / "ds", [0.5])
    counts = {}
    for width in (1, 2):
        train = {**TINY, "target": "three_class", "boundary_px": width, "max_steps": 1}
        cfg = load_config(None, train=train, data={"val_fraction": 0.0})
        classes = prepare_data(cfg, root, get_profile("he"), torch.device("cpu")).train.classes
        counts[width] = np.bincount(classes.cpu().numpy().astype(np.int64), minlength=3)
    assert counts[1][1:].sum() == counts[2][1:].sum()  # the same nuclei
    assert counts[2][2] > 1.6 * counts[1][2]  # a ring twice as wide


def test_training_images_without_a_pixel_size_among_others_are_named(tmp_path) -> None:
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0.0})
    root = _magnifications(tmp_path / "ds", [0.5, 0.25, None])
    with pytest.warns(UserWarning, match=r"1 of 3 training images have no pixel size \(img2"):
        data = prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))
    assert data.pixel_size_um == 0.375 and data.train.height_cpu.tolist() == [64, 64, 48]


def test_a_training_image_of_pixels_not_square_stays_at_its_own_scale(tmp_path) -> None:
    """A lab profile with pixel_size_um 0.25 and a training TIFF tagged 0.5 x 1 um pixels:
    mlseg segment gives such an image no size, but training gave it the profile's 0.25 um
    and halved it along both axes, squashing its nuclei to half their height. It is now
    an image of unknown size, as segment and evaluate take it: named, kept at its own
    scale, and recorded with no size in meta.json's image_pixel_sizes."""
    from flow_helpers import as_tiff_of_pixels

    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    cfg = load_config(
        None,
        train={**TINY, "max_steps": 1},
        data={"val_fraction": 0.0},
        preprocess={"target_pixel_size_um": 0.5},
    )
    root = _magnifications(tmp_path / "ds", [0.5, 0.5, None])
    as_tiff_of_pixels(root / "train" / "original" / "img2.png", 0.5, 1.0)
    profile = get_profile("he").model_copy(update={"pixel_size_um": 0.25})
    with pytest.warns(UserWarning, match=r"1 of 3 training images have no pixel size \(img2"):
        data = prepare_data(cfg, root, profile, torch.device("cpu"))
    assert data.train.height_cpu.tolist() == [48, 48, 48]
    assert data.image_pixel_sizes == {"img0": 0.5, "img1": 0.5, "img2": None}


def test_a_target_pixel_size_no_training_image_was_resampled_to_is_not_recorded(
    tmp_path,
) -> None:
    """preprocess.target_pixel_size_um with no image of known size: nothing is resampled,
    so the model's scale is unknown, not the target's (segment would resample every image
    of known size by its ratio to a scale the model never saw); with some sizes known, the
    images left at their own scale are named."""
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    cfg = load_config(
        None,
        train={**TINY, "max_steps": 1},
        data={"val_fraction": 0.0},
        preprocess={"target_pixel_size_um": 0.25},
    )
    root = _magnifications(tmp_path / "none", [None, None, None])
    with pytest.warns(UserWarning, match="none of the 3 training images has a pixel size"):
        data = prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))
    assert data.pixel_size_um is None and data.train.height_cpu.tolist() == [48, 48, 48]
    root = _magnifications(tmp_path / "some", [0.5, 0.5, None])
    with pytest.warns(UserWarning, match=r"1 of 3 training images .* resampled to 0.25 um"):
        data = prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))
    assert data.pixel_size_um == 0.25 and data.train.height_cpu.tolist() == [96, 96, 48]


def test_resume_refuses_training_images_whose_pixel_size_changed(tmp_path) -> None:
    """Two 20x and one 40x tile swapped in the manifest keep the median, the bytes and the
    config, but resample other images: the run resumed on data it had not trained on."""
    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0.0})
    root = _magnifications(tmp_path / "ds", [0.5, 0.5, 0.25])
    fit(cfg, root, tmp_path / "run", progress=False)
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("img1,0.5", "img1,0.25"))
    manifest.write_text(manifest.read_text().replace("img2,0.25", "img2,0.5"))
    more = load_config(None, train={**TINY, "max_steps": 2}, data={"val_fraction": 0.0})
    with pytest.raises(ResumeError, match=r"pixel sizes.*img1 0.5 -> 0.25, img2 0.25 -> 0.5"):
        fit(more, root, tmp_path / "run", progress=False)


def test_resume_refuses_a_stain_reference_replaced_under_its_name(tmp_path) -> None:
    """Every training image is normalised to the reference: the same path holding another
    lab's slide trained the later steps to other colours than the earlier ones."""
    from mlseg.synth import make_dataset

    root = make_dataset(tmp_path / "ds", n_train=3, n_test=1, size=64, kinds=["he"])
    reference = tmp_path / "reference.png"
    write_image(reference, read_image(root / "train" / "original" / "he_000.png"))

    def cfg(steps):
        stains = {"stain_norm": "macenko", "stain_reference": str(reference)}
        return load_config(None, train={**TINY, "max_steps": steps}, preprocess=stains)

    fit(cfg(1), root, tmp_path / "run", progress=False)
    assert fit(cfg(2), root, tmp_path / "run", progress=False).steps == 2  # the same image
    # another slide under the same name (its own channels reversed, the stand-in before,
    # hold no haematoxylin: refused as a reference, before any resume check)
    write_image(reference, read_image(root / "train" / "original" / "he_001.png"))
    with pytest.raises(ResumeError, match=r"stain_reference: .*reference.png differs"):
        fit(cfg(3), root, tmp_path / "run", progress=False)


def test_resume_takes_a_fluorescence_run_s_rgba_reference_as_it_trained_with(tmp_path) -> None:
    """The copy in the run is the reference as training read it (a fluorescence one's
    transparent outside black): compared with the reference read over white, the same
    unchanged file would be refused as another lab's slide."""
    import cv2

    from mlseg.synth import make_dataset

    root = make_dataset(tmp_path / "ds", n_train=3, n_test=1, size=64, kinds=["fluorescence"])
    rgb = read_image(root / "train" / "original" / "fluorescence_000.png")
    alpha = np.full((*rgb.shape[:2], 1), 255, np.uint8)
    alpha[:, 40:] = 0
    reference = tmp_path / "reference.png"
    cv2.imwrite(str(reference), cv2.cvtColor(np.dstack([rgb, alpha]), cv2.COLOR_RGBA2BGRA))

    def cfg(steps):
        return load_config(
            None,
            train={**TINY, "max_steps": steps},
            preprocess={"equalize": "match", "stain_reference": str(reference)},
            profile="fluorescence",
        )

    fit(cfg(1), root, tmp_path / "run", progress=False)
    assert (read_image(tmp_path / "run" / "stain_reference.png")[:, 40:] == 0).all()
    assert fit(cfg(2), root, tmp_path / "run", progress=False).steps == 2


def test_a_stain_augmentation_that_would_do_nothing_is_refused(synth_dataset, tmp_path) -> None:
    """Nucleus fade and HED jitter act on H&E haematoxylin in [0, 1]: with z-scored images
    they were skipped without a word, and the run trained as if they were off."""
    cfg = load_config(
        None,
        train={**TINY, "max_steps": 1},
        augment={"nucleus_fade_p": 1.0, "hed_p": 1.0},
        preprocess={"intensity_norm": "zscore"},
    )
    with pytest.raises(ConfigError, match=r"nucleus_fade_p 1.0, augment.hed_p 1.0.*zscore"):
        fit(cfg, synth_dataset, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    from mlseg.config import AugmentConfig, PreprocessConfig
    from mlseg.train import check_stain_augment

    # the H&E defaults pass where they do nothing, and so does switching one off
    zscore = PreprocessConfig(intensity_norm="zscore")
    check_stain_augment(AugmentConfig(), "he", zscore)
    check_stain_augment(AugmentConfig(hed_p=0.0, nucleus_fade_p=0.0), "fluorescence", zscore)
    with pytest.raises(ConfigError, match="stain is fluorescence"):
        check_stain_augment(AugmentConfig(hed_jitter=0.3), "fluorescence", PreprocessConfig())


def test_empty_training_set(tmp_path) -> None:
    for sub in ("train/original", "train/masks", "test/original", "test/masks"):
        (tmp_path / "ds" / sub).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        fit(_cfg(max_steps=1), tmp_path / "ds", tmp_path / "run", progress=False)


def test_training_masks_without_any_nucleus_are_refused(tmp_path) -> None:
    """Every mask empty (a mis-export) trained a model that finds nothing, silently."""
    root = _binary_dataset(tmp_path / "ds")
    for path in (root / "train" / "masks").iterdir():
        write_labels(path, np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match=r"masks: none of the 3 training masks marks a nucleus"):
        fit(_cfg(max_steps=1), root, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_a_validation_split_without_any_nucleus_is_refused(tmp_path) -> None:
    """Validation Dice was 0 for every checkpoint that predicted anything there, so
    best.safetensors, what evaluate and segment load, stayed the first epoch's."""
    from mlseg.data import split_validation

    root = _binary_dataset(tmp_path / "ds")
    (held,) = split_validation(3, 0.15, 0)
    write_labels(root / "train" / "masks" / f"img{held}_mask.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match=rf"validation images held back \(img{held}\) mark no"):
        fit(_cfg(max_steps=1), root, tmp_path / "run", progress=False)


def test_a_binary_export_among_instance_masks_is_refused(tmp_path) -> None:
    """mlseg validate fails such a set (mask_values_valid); training read each 0/255 mask as
    one nucleus made of all its nuclei."""
    root = _binary_dataset(tmp_path / "ds")
    labels = np.zeros((64, 64), np.uint16)
    labels[10:20, 10:20], labels[30:40, 30:40] = 1, 2
    write_labels(root / "train" / "masks" / "img0_mask.png", labels)
    with pytest.raises(DatasetError, match=r"2 mask\(s\) hold only 0 and 255.*img1_mask.png"):
        fit(_cfg(max_steps=1), root, tmp_path / "run", progress=False)
    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"mask_kind": "binary"})
    assert fit(cfg, root, tmp_path / "run", progress=False).steps == 1  # the way out it names


def test_data_changed_since_validation_is_refused(tmp_path) -> None:
    """train-model trusted the hash validate-dataset returned: an image copied in after a
    passing validation (a duplicate, which validation fails) trained, and meta.json recorded
    the validated fingerprint as the data it trained on."""
    import shutil

    from mlseg.dataset import dataset_fingerprint, list_pairs

    root = _binary_dataset(tmp_path / "ds")
    validated = dataset_fingerprint(list_pairs(root, "train"))
    for sub, name in (("original", "img{}.png"), ("masks", "img{}_mask.png")):
        shutil.copy(root / "train" / sub / name.format(0), root / "train" / sub / name.format(3))
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match="changed since it was validated.*validate it again"):
        fit(_cfg(max_steps=1), root, run, fingerprint_hash=validated, progress=False)
    assert not (run / "last.safetensors").exists()
    current = dataset_fingerprint(list_pairs(root, "train"))
    fit(_cfg(max_steps=1), root, run, fingerprint_hash=current, progress=False)
    assert json.loads((run / "meta.json").read_text())["fingerprint_hash"] == current


def test_pixel_sizes_changed_since_validation_are_refused(tmp_path) -> None:
    """The validated fingerprint left out the sizes the images declare: a manifest.csv
    corrected from 0.25 to 0.5 um after validation trained at the new scale (images not
    resampled, where 0.25 halved them) and meta.json recorded the validated fingerprint."""
    from mlseg.dataset import train_fingerprint

    root = _binary_dataset(tmp_path / "ds")
    manifest = root / "manifest.csv"
    rows = "".join(f"train,img{i},{{}}\n" for i in range(3))
    manifest.write_text("split,stem,pixel_size_um\n" + rows.format(*[0.25] * 3))
    validated = train_fingerprint(root)
    manifest.write_text("split,stem,pixel_size_um\n" + rows.format(*[0.5] * 3))
    cfg = load_config(
        None, train={**TINY, "max_steps": 1}, preprocess={"target_pixel_size_um": 0.5}
    )
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match="changed since it was validated"):
        fit(cfg, root, run, fingerprint_hash=validated, progress=False)
    assert not (run / "last.safetensors").exists()


def test_a_run_fingerprinted_without_its_pixel_sizes_resumes_on_its_own_data(
    tmp_path, capsys
) -> None:
    """A run of mlseg before 2026-12-07 on data declaring pixel sizes recorded the files'
    fingerprint without them (the README's command prints it); on the same files and sizes
    it resumes, with another size it is refused as before (meta.json's image_pixel_sizes)."""
    from pathlib import Path

    from mlseg.dataset import dataset_fingerprint, list_pairs

    root = _binary_dataset(tmp_path / "ds")
    manifest = root / "manifest.csv"
    rows = "".join(f"train,img{i},{{}}\n" for i in range(3))
    manifest.write_text("split,stem,pixel_size_um\n" + rows.format(*[0.25] * 3))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r'`python -c "(.*pixel_sizes=False.*)"`', readme)
    exec(code.replace("'dataset'", repr(str(root))), {})  # noqa: S102 - the README's own line
    old_form = capsys.readouterr().out.strip()
    assert len(old_form) == 16 and old_form != dataset_fingerprint(list_pairs(root, "train"))
    run = tmp_path / "run"
    fit(_cfg(max_steps=1), root, run, progress=False)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "fingerprint_hash": old_form}))
    assert fit(_cfg(max_steps=2), root, run, progress=False).steps == 2
    (run / "meta.json").write_text(json.dumps({**meta, "fingerprint_hash": old_form}))
    manifest.write_text("split,stem,pixel_size_um\n" + rows.format(0.5, 0.25, 0.25))
    with pytest.raises(ResumeError, match="pixel sizes"):
        fit(_cfg(max_steps=3), root, run, progress=False)


def test_a_run_of_the_pipeline_before_2026_12_06_resumes_on_its_own_data(tmp_path) -> None:
    """That pipeline recorded validation's hash of the images' pixels (32 hex digits) as
    the run's fingerprint_hash: after an upgrade every such run, on the very data it trained
    on, was refused as 'data fingerprint: <32 digits> -> <16 digits>'."""
    import hashlib

    from mlseg.inventory import content_hash

    root = _binary_dataset(tmp_path / "ds")
    images = sorted((root / "train" / "original").glob("*.png"))
    pixels = sorted(content_hash(read_image(p)) for p in images)
    old_form = hashlib.sha256("\n".join(pixels).encode()).hexdigest()[:32]
    run = tmp_path / "run"
    fit(_cfg(max_steps=1), root, run, progress=False)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "fingerprint_hash": old_form}))
    assert fit(_cfg(max_steps=2), root, run, progress=False).steps == 2
    (run / "meta.json").write_text(json.dumps({**meta, "fingerprint_hash": old_form}))
    image = read_image(images[0])
    image[0, 0] = 0  # the data did change: still refused
    write_image(images[0], image)
    with pytest.raises(ResumeError, match=f"data fingerprint: {old_form} -> "):
        fit(_cfg(max_steps=3), root, run, progress=False)


def test_the_readme_says_how_to_check_a_card_of_the_older_fingerprint_form(
    tmp_path, capsys
) -> None:
    """The README said a rerun's fingerprint_hash must equal the card's; a card registered
    by the pipeline before 2026-12-06 holds the pixels' hash (32 hex digits), which no rerun
    writes. The command the README gives for it prints that hash of the data."""
    import hashlib
    from pathlib import Path

    from mlseg.inventory import content_hash

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r'`python -c "(.*pixels_fingerprint.*)"`', readme)
    root = _binary_dataset(tmp_path / "ds")
    images = sorted((root / "train" / "original").glob("*.png"))
    pixels = sorted(content_hash(read_image(p)) for p in images)
    old_form = hashlib.sha256("\n".join(pixels).encode()).hexdigest()[:32]
    exec(code.replace("'dataset'", repr(str(root))), {})  # noqa: S102 - the README's own line
    assert capsys.readouterr().out.strip() == old_form


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(warmup=10, total=110, floor=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)


@pytest.mark.parametrize("target,classes", [("binary", 1), ("three_class", 3)])
def test_loss_is_low_for_right_and_high_for_wrong_logits(target, classes) -> None:
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12] = 1
    if classes == 3:
        y[:, 4, 4:12] = 2
    loss = SegLoss(target, dice_weight=1.0, ce_weight=1.0, boundary_weight=2.0)
    good = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 20 - 10
    if classes == 1:
        good = y[:, None].float() * 20 - 10
    bad = -good
    assert loss(good, y) < 0.01 < 1.0 < loss(bad, y)
    assert math.isfinite(float(loss(torch.zeros(2, classes, 16, 16), y)))


def test_validation_tiles_hold_a_byte_per_class_pixel_and_score_as_before() -> None:
    """A 6000 x 6000 validation image's class tiles took 302 MB of the training device as
    int64, 8 bytes where its three classes need one; the loss and Dice are unchanged."""
    from mlseg.data import ValTiles
    from mlseg.targets import make_target
    from mlseg.train import validate

    labels = np.zeros((300, 200), np.int32)
    for i, (y, x) in enumerate([(40, 40), (150, 100), (260, 170)], 1):
        labels[disk((y, x), 20, shape=labels.shape)] = i
    classes = make_target(labels, "three_class").astype(np.uint8)
    image = np.eye(3, dtype=np.float32)[classes] * 20 - 10  # logits of the truth as image
    tiles = ValTiles.from_arrays([image], [classes], 128, torch.device("cpu"))
    assert tiles.classes.element_size() == 1 and tiles.classes.shape == (6, 128, 128)
    loss = SegLoss("three_class", dice_weight=1.0, ce_weight=1.0, boundary_weight=1.0)
    scores = validate(torch.nn.Identity(), tiles, loss, target="three_class", batch_size=4)
    assert scores["val_dice"] == 1.0 and scores["val_loss"] < 0.01


def test_validation_tiles_of_many_small_images_are_held_once() -> None:
    """Tiles were gathered in a list and stacked: held twice while cut (300 held-back
    64 x 64 tiles of a 2,000-tile set, each padded to 256: 236 MB more). Each image is
    cut row by row into reflect-padded tiles, as before, and only its real pixels count."""
    import tracemalloc

    from mlseg.data import ValTiles

    rng = np.random.default_rng(0)
    sizes = [(64, 64)] * 40 + [(300, 140), (1, 90)]
    images = [rng.random((h, w, 3), np.float32) for h, w in sizes]
    targets = [rng.integers(0, 3, (h, w)).astype(np.uint8) for h, w in sizes]
    tracemalloc.start()
    tiles = ValTiles.from_arrays(images, targets, 128, torch.device("cpu"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tiles.images.shape == (40 + 6 + 1, 3, 128, 128)
    assert peak < 1.5 * tiles.images.numel() * 4, f"{peak / 2**20:.0f} MB"
    first = np.pad(images[0], ((0, 64), (0, 64), (0, 0)), mode="reflect")
    assert np.array_equal(tiles.images[0].numpy(), first.transpose(2, 0, 1))
    big = np.pad(targets[40], ((0, 84), (0, 116)), mode="reflect")
    assert np.array_equal(tiles.classes[40 + 2].numpy(), big[128:256, 0:128])  # row 1, col 0 of 2
    assert np.array_equal(
        tiles.classes[46].numpy(), np.pad(targets[41], ((0, 127), (0, 38)), "edge")
    )
    assert int(tiles.valid.sum()) == sum(h * w for h, w in sizes)


def test_cli_train_then_evaluate(synth_dataset, tmp_path, capsys) -> None:
    import yaml

    from mlseg.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": TINY}))
    out = tmp_path / "run"
    args = [
        "train",
        str(config),
        "--data",
        str(synth_dataset),
        "--out",
        str(out),
        "--max-steps",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "trained 1 steps" in printed.out
    # stderr is a job's log file here: a line per epoch, no bar redrawn with carriage returns
    assert "epoch 1 step 1: loss=" in printed.err and "\r" not in printed.err
    assert main(args) == 0  # a resume of the finished run trains nothing and says so
    assert "1 steps already trained, none this time" in capsys.readouterr().out
    assert main(["evaluate", str(out), str(synth_dataset), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "AJI" in printed and "unmatched at IoU 0.5" in printed  # and why
    assert re.search(
        r"count error [+-][\d.]+ nuclei per image \(median \|relative\| [\d.]+%\); "
        r"(matched nuclei [\d.]+x their annotated area|none matched)",
        printed,
    )
    assert (out / "eval_test" / "per_image.csv").is_file()
    # a profile from a lab's own file, which the run config does not name
    lab = tmp_path / "lab.yaml"
    lab.write_text("profiles:\n  mine:\n    stain: he\n    min_area_px: 4\n")
    mine = ["evaluate", str(out), str(synth_dataset), "--quiet", "--profile", "mine"]
    assert main(mine) == 2 and "mine" in capsys.readouterr().err
    assert main([*mine, "--profiles", str(lab), "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "per_image.csv").is_file()
    assert main(["train", str(config), "--out", str(out)]) == 2  # no dataset given
    assert "--data" in capsys.readouterr().err


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "last.safetensors"))


def test_one_seed_trains_one_model_on_the_cpu(synth_dataset, tmp_path) -> None:
    cfg = _cfg(max_steps=3, val_every=3)
    for name in ("one", "two"):
        fit(cfg, synth_dataset, tmp_path / name, progress=False)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # a different seed is a different model, so the comparison above can fail
    fit(_cfg(max_steps=3, val_every=3, seed=1), synth_dataset, tmp_path / "seed1", progress=False)
    other = _weights(tmp_path / "seed1")
    assert not all(torch.equal(one[k], other[k]) for k in one)


def test_fit_trains_eagerly_where_compiling_the_model_fails(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    # train.compile on a GPU Triton does not support (compute capability under 7.0) or a
    # machine without a C++ compiler: the patch sampler went on eagerly, but the model's
    # first step raised BackendCompilerFailed and the training ended there
    def no_compiler(graph, inputs):
        raise RuntimeError("Found Tesla P100-PCIE-16GB which is too old for Triton")

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=no_compiler))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="torch.compile of the model failed .*too old"):
        result = fit(
            _cfg(max_steps=2, val_every=2, compile=True), synth_dataset, tmp_path, progress=False
        )
    torch._dynamo.reset()
    assert result.steps == 2 and result.best_checkpoint.is_file()
    assert math.isfinite(result.history["train_loss"].iloc[-1])


@pytest.mark.gpu
def test_fit_on_cuda_with_bf16_and_resume(synth_dataset, tmp_path) -> None:
    cfg = _cfg(max_steps=2, val_every=1, device="cuda", amp=True, channels_last=True)
    first = fit(cfg, synth_dataset, tmp_path, progress=False)
    assert first.steps == 2 and math.isfinite(first.history["train_loss"].iloc[-1])
    again = fit(
        _cfg(max_steps=3, val_every=1, device="cuda"), synth_dataset, tmp_path, progress=False
    )
    assert list(again.history["step"]) == [1, 2, 3]
    (stretch,) = json.loads((tmp_path / "meta.json").read_text())["trained_on"]
    assert stretch["device"] == "cuda" and stretch["hardware"] == torch.cuda.get_device_name()


def test_a_resampled_16_bit_training_image_keeps_the_full_scale_it_is_stored_with(tmp_path):
    """Training tiles of a dim 12-bit camera (background 300, one pixel at 1100) resampled to
    the training pixel size: each is scaled by the bit depth of its stored values, as at
    inference, not by that of its resampled ones (the bright pixel averaged below 1024 made
    a 10-bit image, four times brighter than its twin at the training size)."""
    from mlseg.config import PreprocessConfig, get_profile
    from mlseg.data import decode_pairs
    from mlseg.dataset import Pair
    from mlseg.preprocess import normalize

    pairs = []
    for stem, um, side in (("native", 0.5, 32), ("fine", 0.25, 64)):
        image = np.full((side, side, 1), 300, np.uint16)
        image[3, 3, 0] = 1100
        write_image(tmp_path / f"{stem}.png", image)
        write_labels(tmp_path / f"{stem}_mask.png", np.zeros((side, side), np.int32))
        pairs.append(
            Pair("train", stem, tmp_path / f"{stem}.png", tmp_path / f"{stem}_mask.png", um)
        )
    pre = PreprocessConfig(target_pixel_size_um=0.5)
    images, _ = decode_pairs(pairs, pre, get_profile("fluorescence"), workers=1)
    assert [im.shape[:2] for im in images] == [(32, 32), (32, 32)]
    backgrounds = [normalize(im, pre, "fluorescence")[20, 20, 0] for im in images]
    assert backgrounds == pytest.approx([300 / 4095] * 2, rel=1e-3)


_STOPPED_RUN = {"max_steps": 6, "val_every": 2}


@pytest.fixture(scope="module")
def unbroken_run(synth_dataset, tmp_path_factory):
    """The run of ``_STOPPED_RUN`` never stopped, trained once for both places a run stops
    in (read only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as _few_threads gives the tests that compare with it
    out = tmp_path_factory.mktemp("unbroken")
    fit(_cfg(**_STOPPED_RUN), synth_dataset, out, progress=False)
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("stop_in", ["_write_history", "_checkpoint"])
def test_a_run_stopped_at_the_end_of_an_epoch_resumes_to_the_unbroken_run(
    synth_dataset, tmp_path, monkeypatch, stop_in, unbroken_run
) -> None:
    """Killed between its checkpoint and its history (either order), a run resumed to the
    end has every epoch's row once, and the weights of a run never stopped."""
    import mlseg.train

    cfg = _cfg(**_STOPPED_RUN)
    real = getattr(mlseg.train, stop_in)

    def stop_at_step_4(run_or_history, *args, **kwargs):
        step = run_or_history[-1]["step"] if stop_in == "_write_history" else run_or_history.step
        if step == 4:
            raise KeyboardInterrupt  # as kill -9 would, at this point
        return real(run_or_history, *args, **kwargs)

    monkeypatch.setattr(mlseg.train, stop_in, stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, synth_dataset, tmp_path / "stopped", progress=False)
    monkeypatch.setattr(mlseg.train, stop_in, real)
    resumed = fit(cfg, synth_dataset, tmp_path / "stopped", progress=False)
    unbroken = pd.read_csv(unbroken_run / "history.csv")
    timing = ["images_per_s", "elapsed_s"]
    assert list(resumed.history["step"]) == [2, 4, 6]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "stopped" / "history.csv").drop(columns=timing),
        unbroken.drop(columns=timing),
    )
    one, two = _weights(unbroken_run), _weights(tmp_path / "stopped")
    assert all(torch.equal(one[k], two[k]) for k in one)


def _cli_evaluate_output(pairs, tmp_path, monkeypatch, capsys) -> str:
    """What ``mlseg evaluate`` prints for an evaluation scoring ``pairs`` (each a stem and a
    truth and prediction label image), the evaluation itself stood in for."""
    import mlseg.evaluate
    from mlseg.cli import main
    from mlseg.evaluate import EvalResult, score_labels

    rows = pd.DataFrame([{"stem": stem, **score_labels(*labels)} for stem, *labels in pairs])
    means = rows.drop(columns="stem").mean().to_dict()

    def fake(model, data, out, **_):
        return EvalResult(rows, means, out / "p.csv", out / "s.json", None, out, "x")

    monkeypatch.setattr(mlseg.evaluate, "evaluate", fake)
    (tmp_path / "run").mkdir()
    assert main(["evaluate", str(tmp_path / "run"), str(tmp_path), "--quiet"]) == 0
    return capsys.readouterr().out


def _blank_and_spot() -> tuple[np.ndarray, np.ndarray]:
    blank = np.zeros((32, 32), np.int32)
    spot = blank.copy()
    spot[4:12, 4:12] = 1
    return blank, spot


def test_cli_evaluate_says_how_many_images_scored_1_for_having_no_nuclei(
    tmp_path, monkeypatch, capsys
) -> None:
    blank, one = _blank_and_spot()
    # a model that finds nothing: a blank tile scores 1.0, the other 0, so the mean is 0.5
    out = _cli_evaluate_output(
        [("a", blank, blank), ("b", blank, one)], tmp_path, monkeypatch, capsys
    )
    assert "2 images (1 with no nucleus on either side, each scored 1.0): Dice 0.5000" in out


def test_cli_evaluate_prints_no_nan_for_a_split_without_annotated_nuclei(
    tmp_path, monkeypatch, capsys
) -> None:
    """A test split of empty masks has no relative count error to take a median of: the
    line read 'median |relative| nan%'."""
    blank, spot = _blank_and_spot()
    out = _cli_evaluate_output(
        [("a", blank, blank), ("b", spot, blank)], tmp_path, monkeypatch, capsys
    )
    line = out.splitlines()[0]
    assert "nan" not in line.lower()
    assert "count error +0.5 nuclei per image (no annotated nucleus to compare with)" in line


def test_cli_train_refuses_data_that_fails_validation(leaked_dataset, tmp_path, capsys) -> None:
    """README: 'a failed check stops training'; mlseg train trained on anything."""
    import yaml

    from mlseg.cli import main

    data = leaked_dataset
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": TINY}))
    args = ["train", str(config), "--data", str(data), "--max-steps", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "no_train_test_leakage" in err and "--no-validate" in err  # the way out, too
    assert not (tmp_path / "run" / "last.safetensors").exists()
    assert (tmp_path / "run" / "validation" / "data_docs" / "index.html").is_file()
    assert main([*args, "--out", str(tmp_path / "anyway"), "--no-validate"]) == 0


def test_cli_train_names_a_broken_suite_file_before_reading_the_data(
    nuclei_dataset, tmp_path, capsys, monkeypatch
) -> None:
    """mlseg train hashed every training file before it read the suites."""
    import yaml
    from flow_helpers import broken_suites

    import mlseg.dataset
    from mlseg.cli import main

    path = broken_suites(tmp_path, monkeypatch)
    read = []
    monkeypatch.setattr(mlseg.dataset, "train_fingerprint", lambda *a: read.append(a))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": TINY}))
    args = ["train", str(config), "--data", str(nuclei_dataset()), "--out", str(tmp_path / "run")]
    assert main([*args, "--max-steps", "1", "--quiet"]) == 2
    assert f"{path}: not valid JSON" in capsys.readouterr().err and not read


def test_cli_tune_refuses_data_changed_after_validation(
    synth_dataset, tmp_path, monkeypatch, capsys
) -> None:
    """README: training refuses files changed after they passed; mlseg tune validated, then
    dropped the fingerprint, and its trials trained on whatever was there."""
    import shutil

    import yaml

    import expectations
    from mlseg.cli import main

    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    validate = expectations.validate_dataset

    def validate_then_change(root, out, cfg, **kwargs):
        report = validate(root, out, cfg, **kwargs)
        first, second = sorted((data / "train" / "masks").iterdir())[:2]
        shutil.copy(second, first)  # a mask replaced after it passed
        return report

    monkeypatch.setattr(expectations, "validate_dataset", validate_then_change)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": TINY}))
    args = ["tune", str(config), "--data", str(data), "--out", str(tmp_path / "tune")]
    assert main([*args, "--trials", "1", "--budget-steps", "1", "--param", "train.lr=1e-3"]) == 2
    assert "changed since it was validated" in capsys.readouterr().err
    assert not (tmp_path / "tune" / "trial_000" / "last.safetensors").exists()


def test_a_run_records_and_reports_which_images_it_trained_and_validated_on(tmp_path) -> None:
    """Three images with the default val_fraction hold one back (a third of the data, more
    than the 15 % asked): the summary line says how many, and meta.json which."""
    from mlseg.train import describe

    root = _binary_dataset(tmp_path / "ds", n=3)
    result = fit(_cfg(max_steps=1), root, tmp_path / "run", progress=False)
    assert (result.train_images, result.val_images) == (2, 1)
    split = json.loads((tmp_path / "run" / "meta.json").read_text())["split"]
    assert sorted(split["train"] + split["validation"]) == ["img0", "img1", "img2"]
    assert len(split["validation"]) == 1
    line = describe(result.steps, result.images_per_s, result.best_val_dice, 2, 1)
    assert "on 2 training image(s), 1 held back for validation; best validation Dice" in line


def test_one_training_image_warns_that_nothing_is_validated(tmp_path) -> None:
    """With one image no validation image can be held back: the best checkpoint is the one of
    lowest training loss, which the run says up front and in its summary, not 'Dice n/a'."""
    from mlseg.train import describe

    root = _binary_dataset(tmp_path / "ds", n=1)
    with pytest.warns(UserWarning, match=r"one training image, so none is held back"):
        result = fit(_cfg(max_steps=1), root, tmp_path / "run", progress=False)
    assert (result.train_images, result.val_images) == (1, 0)
    line = describe(result.steps, result.images_per_s, result.best_val_dice, 1, 0)
    assert line.endswith(
        "none held back; no validation Dice: best.safetensors has the lowest training loss"
    )
    # val_fraction 0 asks for no validation: no warning about it
    cfg = load_config(None, train={**TINY, "max_steps": 1}, data={"val_fraction": 0.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(cfg, root, tmp_path / "run0", progress=False)
    assert not [w for w in caught if "held back" in str(w.message)]


def test_training_images_that_mark_no_nucleus_are_refused_before_training(tmp_path) -> None:
    """Two images, the annotated one held back for validation: the one left to train on
    marks no nucleus, and a model trained on it learns to find none."""
    from mlseg.config import get_profile
    from mlseg.data import prepare_data, split_validation

    root = _binary_dataset(tmp_path / "ds", n=2)
    held = int(split_validation(2, 0.15, 0)[0])
    blank = root / "train" / "masks" / f"img{1 - held}_mask.png"
    write_labels(blank, np.zeros((64, 64), np.uint8))
    cfg = load_config(None, train={**TINY, "max_steps": 1})
    with pytest.raises(DatasetError, match=rf"\(img{1 - held}\) mark no nucleus once .*img{held}"):
        prepare_data(cfg, root, get_profile("he"), torch.device("cpu"))


def test_a_mirrored_or_turned_copy_stays_on_its_image_side_of_the_validation_split(
    tmp_path,
) -> None:
    """Tiles saved with their flipped and turned copies (offline augmentation) pass
    validation, which only fails such copies across train and test; the validation split
    then held back a tile whose mirror image was trained on, and the augmentation's own
    flips trained on the held-back tile itself: validation Dice, which picks
    best.safetensors, stops early and ranks mlseg tune, was inflated."""
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    root = _binary_dataset(tmp_path / "ds", n=6)
    images, masks = root / "train" / "original", root / "train" / "masks"
    for i in range(6):
        image, mask = read_image(images / f"img{i}.png"), read_mask(masks / f"img{i}_mask.png")
        write_image(images / f"img{i}_flip.png", image[:, ::-1])
        write_labels(masks / f"img{i}_flip_mask.png", mask[:, ::-1])
        write_image(images / f"img{i}_turn.png", np.rot90(image))
        write_labels(masks / f"img{i}_turn_mask.png", np.rot90(mask))
    cfg = load_config(None, train={**TINY, "max_steps": 1})
    for seed in range(4):
        data = prepare_data(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": seed})}),
            root,
            get_profile("he"),
            torch.device("cpu"),
        )
        held = {stem.split("_")[0] for stem in data.val_stems}
        trained = {stem.split("_")[0] for stem in data.train_stems}
        assert held and not held & trained, (seed, data.val_stems, data.train_stems)


def test_a_group_of_identical_tiles_does_not_overfill_the_validation_split() -> None:
    """Ten identical blank tiles beside ten distinct ones: held back whole, the blank group
    made the validation split 10 to 13 of 20 images for a quota of 4 (70 of 200 seeds), and
    where it alone was held back, training stopped: no nucleus to validate on."""
    from mlseg.data import split_validation

    groups = [f"tile{i}" for i in range(10)] + ["blank"] * 10
    for seed in range(50):
        held = split_validation(20, 0.2, seed, groups)
        assert len(held) == 4 and held.max() < 10, (seed, held)
        # images all distinct: the split without groups
        distinct = split_validation(20, 0.2, seed, [str(i) for i in range(20)])
        assert distinct.tolist() == split_validation(20, 0.2, seed).tolist()
    # every group larger than the quota: the smallest is held back, whole
    assert split_validation(9, 0.2, 0, ["a"] * 4 + ["b"] * 3 + ["c"] * 2).tolist() == [7, 8]


def _disc_images(root, sides, grey: bool = False) -> None:
    """H&E-like (or grey fluorescence-like) images of ``sides`` (h, w), disc nuclei of
    random paleness, 16-bit instance masks."""
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sides):
        labels = np.zeros((h, w), np.uint16)
        shade = np.zeros((h, w))
        for i in range(max(1, h * w // 600)):
            rr, cc = disk(tuple(rng.integers(0, (h, w))), int(rng.integers(3, 8)), shape=(h, w))
            labels[rr, cc], shade[rr, cc] = i + 1, rng.uniform(0.2, 1.0)
        noise = rng.normal(0, 6, (h, w, 1))
        if grey:
            image = 20 + shade * 200 + noise[..., 0]
        else:
            bg, nucleus = np.array([232, 190, 210]), np.array([80, 50, 140])
            image = bg + shade[..., None] * (nucleus - bg) + noise
        write_image(
            root / "train/original" / f"img{k}.png", np.clip(image, 0, 255).astype(np.uint8)
        )
        write_labels(root / "train/masks" / f"img{k}_mask.png", labels)


@pytest.mark.parametrize(
    ("profile", "sides", "train"),
    [
        ("he", [(200, 160), (40, 50), (96, 130), (64, 64), (30, 90)], {"faint_oversample": 0.2}),
        ("fluorescence", [(150, 120), (100, 100), (50, 140)], {}),
    ],
)
def test_training_data_prepared_one_image_at_a_time_is_what_training_took(
    tmp_path, profile, sides, train
) -> None:
    """Every array training receives (packed pixels and classes, foreground and faint
    positions, validation tiles) is, bit for bit, the one made from all images at once;
    images smaller than the patch and a validation split included."""
    from bench.prep_memory import before
    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    _disc_images(tmp_path, sides, grey=profile == "fluorescence")
    cfg = load_config(None, train={**TINY, **train}, data={"val_fraction": 0.34})
    cfg = cfg.model_copy(update={"profile": profile})
    data = prepare_data(cfg, tmp_path, get_profile(profile), torch.device("cpu"))
    store, tiles = before(cfg, tmp_path)  # every image prepared at once, as it was
    assert data.val is not None and data.val.n_images >= 1
    for name in ("pixels", "classes", "offset", "height", "width", "fg", "fg_count", "weights"):
        assert torch.equal(getattr(data.train, name), getattr(store, name)), name
    assert torch.equal(data.train.faint_pos, store.faint_pos)
    assert torch.equal(data.train.faint_img, store.faint_img)
    assert len(store.faint_pos) > 0 or not train
    for name in ("images", "classes", "valid"):
        assert torch.equal(getattr(data.val, name), getattr(tiles, name)), name


def test_preparing_training_data_holds_one_image_at_a_time(tmp_path) -> None:
    """Peak memory is the packed arrays (13 bytes a training pixel) and one image's work,
    not every image decoded, labelled and normalised at once (41 bytes a pixel of the
    images here, 47-55 on whole-slide regions: 5.1 GB for three of 6000 x 6000). With one
    worker thread, one image is in flight; each further worker adds one."""
    import tracemalloc

    from mlseg.config import get_profile
    from mlseg.data import prepare_data

    _disc_images(tmp_path, [(320, 320)] * 4)
    cfg = load_config(
        None,
        train={**TINY, "num_workers": 1},
        data={"val_fraction": 0.25},
        preprocess={"stain_norm": "none"},
    )
    tracemalloc.start()
    data = prepare_data(cfg, tmp_path, get_profile("he"), torch.device("cpu"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert data.train.n_images == 3 and data.val.n_images == 1
    assert peak / (4 * 320 * 320) < 32  # bytes a pixel: 26 here, 41 holding every image
