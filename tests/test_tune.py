"""Hyperparameter search: candidates, config overrides, ranked table, best config."""

from __future__ import annotations

import pytest
import torch

from mlseg.config import load_config
from mlseg.errors import ConfigError
from mlseg.tune import apply_params, candidates, tune

TINY = {
    "encoder": "resnet18",
    "encoder_depth": 3,
    "patch_size": 64,
    "batch_size": 2,
    "max_steps": 500,
}


@pytest.fixture(autouse=True)
def _no_training_curves_drawn(monkeypatch) -> None:
    """Every validation of a trial redrew its training_curves.png (matplotlib: about a CPU
    second each, no test here looks at it; test_train.py and test_plots.py do): a search's
    ranking, table and best_config.yaml do not depend on the drawing."""
    import mlseg.plots

    monkeypatch.setattr(mlseg.plots, "plot_history", lambda history, path: path)


def test_candidates_grid_and_random() -> None:
    space = {"train.lr": [1e-4, 1e-3], "train.encoder": ["resnet18", "resnet34"]}
    grid = candidates(space, None, "grid", 0)
    assert len(grid) == 4 and grid[0] == {"train.lr": 1e-4, "train.encoder": "resnet18"}
    rand = candidates(space, 3, "random", 0)
    assert len(rand) == 3 and all(c in grid for c in rand) and len({str(c) for c in rand}) == 3
    assert rand == candidates(space, 3, "random", 0)
    # the seed picks the sample: --seed 1 ran the same trials as --seed 0
    assert len({str(candidates(space, 2, "random", seed)) for seed in range(5)}) > 1
    with pytest.raises(ConfigError):
        candidates(space, 2, "bayes", 0)
    with pytest.raises(ConfigError):
        candidates({"train.lr": []}, 2, "grid", 0)
    # mlseg tune --trials -1 ran every trial of the grid but one
    with pytest.raises(ConfigError, match="trials must be at least 0"):
        candidates(space, -1, "random", 0)


def test_apply_params_validates() -> None:
    cfg = load_config(None)
    out = apply_params(cfg, {"train.lr": 0.01, "augment.elastic_p": 0.5})
    assert out.train.lr == 0.01 and out.augment.elastic_p == 0.5 and cfg.train.lr == 1e-3
    with pytest.raises(ConfigError, match="no field"):
        apply_params(cfg, {"train.learning_rate": 0.1})
    with pytest.raises(ConfigError, match="section.field"):
        apply_params(cfg, {"lr": 0.1})


def test_a_misspelt_searched_key_is_named_with_the_one_meant() -> None:
    """``--param train.lrr=...`` said only "train has no field 'lrr'", and ``trian.lr=...``
    that it "is not 'section.field'" (it is); a config file's misspelt key is named with the
    key meant, and so is a searched one now."""
    cfg = load_config(None)
    with pytest.raises(ConfigError, match=r"no field 'lrr'; did you mean 'train.lr'\?"):
        apply_params(cfg, {"train.lrr": 0.1})
    with pytest.raises(ConfigError, match=r"no section 'trian'; did you mean 'train.lr'\?"):
        apply_params(cfg, {"trian.lr": 0.1})
    with pytest.raises(ConfigError, match="sections: data, preprocess, augment, train"):
        apply_params(cfg, {"model.lr": 0.1})
    with pytest.raises(ConfigError, match="multiple of 32"):
        apply_params(cfg, {"train.patch_size": 100})


def test_a_searched_preprocess_key_keeps_the_profiles_other_settings() -> None:
    """Searching one preprocess field must not write every other field as if the config set
    it: H&E trials trained without the profile's Macenko normalisation."""
    from mlseg.config import get_profile
    from mlseg.data import effective_preprocess

    cfg = load_config(None)
    he = get_profile("he")
    assert effective_preprocess(cfg, he).stain_norm == "macenko"
    trial = apply_params(cfg, {"preprocess.intensity_norm": "zscore"})
    pre = effective_preprocess(trial, he)
    assert (pre.stain_norm, pre.intensity_norm) == ("macenko", "zscore")
    dumped = trial.model_dump(mode="json", exclude_unset=True)["preprocess"]
    assert dumped == {"intensity_norm": "zscore"}  # what best_config.yaml writes


def test_tune_ranks_trials_and_writes_best_config(synth_dataset, tmp_path) -> None:
    torch.set_num_threads(2)
    cfg = load_config(None, train=TINY)
    space = {"train.lr": [1e-3, 1e-12]}  # ranked by validation Dice
    search = {"trials": 2, "budget_steps": 1, "space": space, "method": "grid", "progress": False}
    table = tune(cfg, synth_dataset, tmp_path, **search)
    assert list(table["rank"]) == [1, 2] and set(table["train.lr"]) == {1e-3, 1e-12}
    assert table["best_val_dice"].is_monotonic_decreasing
    assert (tmp_path / "tune_results.csv").is_file()
    best = load_config(tmp_path / "best_config.yaml")
    assert best.train.lr == table.loc[0, "train.lr"]
    assert best.train.max_steps == 500 and best.train.encoder == "resnet18"  # budget not kept
    assert "preprocess" not in best.model_fields_set  # the profile's preprocessing still applies
    # run again, the finished trials keep their throughput and time (were NaN and the check's)
    again = tune(cfg, synth_dataset, tmp_path, **search)
    for column in ("images_per_s", "seconds"):
        assert again.set_index("trial")[column].to_dict() == pytest.approx(
            table.set_index("trial")[column].to_dict()
        )
    # the same folder with another search is refused, not reported as these trials
    with pytest.raises(ConfigError, match="another search") as error:
        tune(
            cfg,
            synth_dataset,
            tmp_path,
            trials=1,
            budget_steps=1,
            space={"train.lr": [3e-3]},
            progress=False,
        )
    assert "train.lr: 0.001 -> 0.003" in str(error.value)
    assert "--no-resume" not in str(error.value)  # fit's remedy: mlseg tune has no such option


def test_a_search_stopped_during_a_trial_reports_the_finished_trials_training_time(
    synth_dataset, tmp_path, monkeypatch
) -> None:
    """A search stopped (Ctrl-C) while trial_001 trained wrote no tune_results.csv; its rerun
    skipped the finished trial_000 and gave it no throughput (NaN) and, as its time, the
    second or two of the check, not the time it trained."""
    import pandas as pd

    import mlseg.train

    torch.set_num_threads(2)
    cfg = load_config(None, train=TINY)
    search = {"trials": 2, "budget_steps": 1, "method": "grid", "progress": False}
    space = {"train.lr": [1e-3, 3e-4]}
    real_fit, stopped = mlseg.train.fit, []

    def fit(trial_cfg, data, out_dir, **kw):
        if out_dir.name == "trial_001" and not stopped:
            stopped.append(out_dir)
            raise KeyboardInterrupt
        if out_dir.name == "trial_001":  # trained on the rerun (its timing is not the point)
            return mlseg.train.TrainResult(
                None, out_dir, pd.DataFrame({"train_loss": [1.0]}), 0.5, 1, 1.0, out_dir, 5, 1
            )
        return real_fit(trial_cfg, data, out_dir, **kw)

    monkeypatch.setattr(mlseg.train, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, synth_dataset, tmp_path, space=space, **search)
    assert not (tmp_path / "tune_results.csv").exists()
    history = pd.read_csv(tmp_path / "trial_000" / "history.csv")
    row = tune(cfg, synth_dataset, tmp_path, space=space, **search).set_index("trial").loc[0]
    assert row["seconds"] == pytest.approx(history["elapsed_s"].iloc[-1])
    trained = history["step"].diff().fillna(history["step"])
    assert row["images_per_s"] == pytest.approx(
        trained.sum() / (trained / history["images_per_s"]).sum()
    )


def test_param_values_may_be_lists_and_a_null_winner_is_written_as_null() -> None:
    from mlseg.cli.train import _parse_space

    space = _parse_space(
        ["inference.stain_tta=[1.0,1.5],[1.0]", "preprocess.target_pixel_size_um=null,0.5"]
    )
    assert space == {
        "inference.stain_tta": [[1.0, 1.5], [1.0]],
        "preprocess.target_pixel_size_um": [None, 0.5],
    }
    with pytest.raises(ConfigError, match=r"--param 'train.lr=\[1,': values are not YAML"):
        _parse_space(["train.lr=[1,"])


def test_param_values_with_a_leading_zero_are_refused_as_in_a_config_file() -> None:
    """--param train.seed=0123 was read by plain YAML as the octal 83 and searched so,
    where a config file's train.seed: 0123 is refused; both are refused alike now."""
    from mlseg.cli.train import _parse_space

    with pytest.raises(
        ConfigError,
        match=r"--param 'train.seed=0123,7': YAML reads 0123 as the octal number 83; leave out",
    ):
        _parse_space(["train.seed=0123,7"])
    assert _parse_space(["train.seed=123,0"]) == {"train.seed": [123, 0]}


def test_values_typed_on_the_command_line_are_searched_as_the_config_reads_them(
    synth_dataset, tmp_path, monkeypatch
):
    """--param train.lr=1e-3,0.001,3e-4 (the CLI's help shows the form): YAML read 1e-3 as
    the string '1e-3', which the table held as text, and 1e-3 and 0.001 trained one trial
    twice. Each value is now the float the config reads, and a repeat is one trial."""
    import mlseg.train
    from mlseg.cli.train import _parse_space

    trained = []

    class Result:
        def __init__(self, cfg, out_dir):
            import pandas as pd

            trained.append(cfg.train.lr)
            self.best_val_dice, self.steps, self.images_per_s = 0.5, 1, 1.0
            self.train_images, self.val_images = 5, 1
            self.history, self.out_dir = pd.DataFrame({"train_loss": [1.0]}), out_dir

    monkeypatch.setattr(mlseg.train, "fit", lambda cfg, data, out_dir, **kw: Result(cfg, out_dir))
    space = _parse_space(["train.lr=1e-3,0.001,3e-4"])
    table = tune(
        load_config(None), synth_dataset, tmp_path, space=space, trials=None, progress=False
    )
    assert sorted(trained) == [3e-4, 1e-3]
    assert sorted(table["train.lr"]) == [3e-4, 1e-3]
    assert all(isinstance(v, float) for v in table["train.lr"])


def test_the_best_trial_is_written_with_the_values_it_ran(synth_dataset, tmp_path, monkeypatch):
    """A winning value of None (no resampling) sat in a float column as NaN, and writing
    best_config.yaml failed after every trial had run."""
    import mlseg.train

    dice = iter([0.9, 0.5])

    class Result:
        def __init__(self, out_dir):
            import pandas as pd

            self.best_val_dice, self.steps, self.images_per_s = next(dice), 1, 1.0
            self.train_images, self.val_images = 5, 1
            self.history, self.out_dir = pd.DataFrame({"train_loss": [1.0]}), out_dir

    monkeypatch.setattr(mlseg.train, "fit", lambda cfg, data, out_dir, **kw: Result(out_dir))
    space = {"preprocess.target_pixel_size_um": [None, 0.5]}
    table = tune(
        load_config(None),
        synth_dataset,
        tmp_path,
        space=space,
        trials=None,
        method="grid",
        progress=False,
    )
    assert table.loc[0, "trial"] == 0
    best = (tmp_path / "best_config.yaml").read_text()
    assert "target_pixel_size_um: null" in best


def test_a_disk_that_fills_at_best_config_leaves_the_previous_search_whole(
    synth_dataset, tmp_path, monkeypatch
):
    """A wider search rerun in the folder of a narrower one, on a disk that filled at
    best_config.yaml: its ranking (a new winner first) was left beside the old winner's
    config, which training then took as the best."""
    import errno

    import mlseg.io
    import mlseg.train
    from mlseg.errors import OutputError

    dice = {None: 0.5, 0.5: 0.6, 0.25: 0.9}

    class Result:
        def __init__(self, cfg, out_dir):
            import pandas as pd

            self.best_val_dice = dice[cfg.preprocess.target_pixel_size_um]
            self.steps, self.images_per_s = 1, 1.0
            self.train_images, self.val_images = 5, 1
            self.history, self.out_dir = pd.DataFrame({"train_loss": [1.0]}), out_dir

    monkeypatch.setattr(mlseg.train, "fit", lambda cfg, data, out_dir, **kw: Result(cfg, out_dir))
    key = "preprocess.target_pixel_size_um"
    search = {"trials": None, "method": "grid", "progress": False}
    tune(load_config(None), synth_dataset, tmp_path, space={key: [None, 0.5]}, **search)
    before = {n: (tmp_path / n).read_bytes() for n in ("tune_results.csv", "best_config.yaml")}
    write_text = mlseg.io.write_text

    def full(path, text):
        with mlseg.io.atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlseg.tune.write_text", full)
    with pytest.raises(OutputError, match="no space left on device"):
        tune(load_config(None), synth_dataset, tmp_path, space={key: [None, 0.5, 0.25]}, **search)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == [mlseg.io.WRITTEN_TOGETHER_LOCK]  # no staging folder left, only the lock
    monkeypatch.setattr("mlseg.tune.write_text", write_text)
    tune(load_config(None), synth_dataset, tmp_path, space={key: [None, 0.5, 0.25]}, **search)
    assert "target_pixel_size_um: 0.25" in (tmp_path / "best_config.yaml").read_text()


def test_a_search_without_validation_images_is_refused_before_training(
    synth_dataset, tmp_path, monkeypatch
):
    """With no image held back every trial's validation Dice is missing, and the trials were
    ranked by training loss: best_config.yaml was the trial that overfitted most."""
    import mlseg.train

    def fit(*args, **kwargs):
        raise AssertionError("no trial may train")

    monkeypatch.setattr(mlseg.train, "fit", fit)
    cfg = load_config(None, train=TINY, data={"val_fraction": 0.0})
    with pytest.raises(ConfigError, match=r"val_fraction 0 of 6 training image"):
        tune(cfg, synth_dataset, tmp_path, space={"train.lr": [1e-4, 1e-3]}, progress=False)
    assert not (tmp_path / "best_config.yaml").exists()


def test_a_trial_whose_stain_augmentation_would_do_nothing_is_refused_before_training(
    synth_dataset, tmp_path, monkeypatch
):
    """hed_p searched beside intensity_norm: the z-scored trials would train without HED
    jitter, scored as if they had it; refused before the first trial trains."""
    import mlseg.train

    def fit(*args, **kwargs):
        raise AssertionError("no trial may train")

    monkeypatch.setattr(mlseg.train, "fit", fit)
    space = {"preprocess.intensity_norm": ["none", "zscore"], "augment.hed_p": [1.0]}
    cfg = load_config(None, train=TINY)
    with pytest.raises(ConfigError, match=r"augment.hed_p 1.0.*intensity_norm is zscore"):
        tune(cfg, synth_dataset, tmp_path, space=space, method="grid", progress=False)


def test_a_diverged_trial_ranks_last_and_the_search_goes_on(synth_dataset, tmp_path, monkeypatch):
    """One learning rate too high stopped the whole search: no table, no best_config.yaml,
    the later trials never ran, and a rerun stopped at the same trial again."""
    import pandas as pd

    import mlseg.train
    from mlseg.errors import TrainingDiverged

    class Result:
        def __init__(self, out_dir):
            self.best_val_dice, self.steps, self.images_per_s = 0.5, 1, 1.0
            self.train_images, self.val_images = 5, 1
            self.history, self.out_dir = pd.DataFrame({"train_loss": [1.0]}), out_dir

    def fit(cfg, data, out_dir, **kw):
        if cfg.train.lr > 1:
            raise TrainingDiverged("training diverged: the loss became nan by step 1")
        return Result(out_dir)

    monkeypatch.setattr(mlseg.train, "fit", fit)
    search = {"trials": None, "method": "grid", "progress": False}
    with pytest.warns(UserWarning, match="trial_000.*diverged"):
        table = tune(
            load_config(None), synth_dataset, tmp_path, space={"train.lr": [1e3, 1e-3]}, **search
        )
    assert list(table["train.lr"]) == [1e-3, 1e3]  # the diverged trial last, not first
    assert table["best_val_dice"].isna().tolist() == [False, True]
    assert load_config(tmp_path / "best_config.yaml").train.lr == 1e-3
    with (
        pytest.warns(UserWarning),
        pytest.raises(ConfigError, match="every trial's training diverged"),
    ):
        tune(
            load_config(None), synth_dataset, tmp_path / "all", space={"train.lr": [1e3]}, **search
        )
    assert not (tmp_path / "all" / "best_config.yaml").exists()


def test_a_rerun_with_another_budget_is_refused(synth_dataset, tmp_path) -> None:
    """A rerun with a smaller --budget-steps ranked the finished 3-step trial beside new
    1-step trials, and a larger one warm-restarted it: one table of unlike trials."""
    torch.set_num_threads(2)
    cfg = load_config(None, train=TINY)
    search = {"space": {"train.lr": [1e-3, 3e-4]}, "method": "grid", "progress": False}
    with pytest.warns(UserWarning, match="leave untried train.lr 0.0003"):
        tune(cfg, synth_dataset, tmp_path, trials=1, budget_steps=2, **search)
    for budget in (1, 3):
        with pytest.raises(ConfigError, match="trial_000 had a budget of 2 steps, this search"):
            tune(cfg, synth_dataset, tmp_path, trials=2, budget_steps=budget, **search)
    assert not (tmp_path / "trial_001").exists()  # refused before any trial trained
    assert len(tune(cfg, synth_dataset, tmp_path, trials=2, budget_steps=2, **search)) == 2


def test_a_param_given_twice_is_refused() -> None:
    """--param train.lr=1e-3,3e-4 --param train.lr=0.01 searched 0.01 alone."""
    from mlseg.cli.train import _parse_space

    with pytest.raises(ConfigError, match="--param train.lr is given twice"):
        _parse_space(["train.lr=1e-3,3e-4", "train.lr=0.01"])


def test_a_searched_data_setting_is_refused_before_training(synth_dataset, tmp_path):
    """data.seed searched scored each trial on another validation split: the ranking chose
    the easiest split, not the best settings."""
    cfg = load_config(None, train=TINY)
    for key, values in (("data.seed", [0, 1]), ("data.val_fraction", [0.2, 0.5])):
        with pytest.raises(ConfigError, match=rf"^{key}: a data setting searched"):
            tune(cfg, synth_dataset, tmp_path, space={key: values}, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_searched_key_no_trial_sees_is_refused_before_training(
    synth_dataset, tmp_path, monkeypatch
):
    """train.max_steps and warmup_steps searched were overwritten by the budget, and
    inference.tta never reaches the validation Dice: four identical trials tied, and the
    first was written as best (max_steps 50 in best_config.yaml, for a config of 500)."""
    import mlseg.train

    def fit(*args, **kwargs):
        raise AssertionError("no trial may train")

    monkeypatch.setattr(mlseg.train, "fit", fit)
    cfg = load_config(None, train=TINY)
    for key, values in (
        ("train.max_steps", [50, 2000]),
        ("train.warmup_steps", [0, 40]),
        ("train.val_every", [1, 5]),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}: set for every trial by the step budget"):
            tune(cfg, synth_dataset, tmp_path, space={key: values}, progress=False)
    for key, values in (("inference.tta", [False, True]), ("monitor.psi_warn", [0.1, 0.2])):
        space = {"train.lr": [1e-3], key: values}
        with pytest.raises(ConfigError, match=rf"^{key}: trials are scored by the validation"):
            tune(cfg, synth_dataset, tmp_path, space=space, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_rerun_with_other_values_of_a_resumable_setting_is_refused(synth_dataset, tmp_path):
    """A setting a resume may change (early_stop_patience) searched with other values in
    the same folder: the trial trained with patience 10 was reported, and written to
    best_config.yaml, as patience 1, without a step trained."""
    torch.set_num_threads(2)
    cfg = load_config(None, train=TINY)
    search = {"trials": None, "budget_steps": 1, "method": "grid", "progress": False}
    tune(cfg, synth_dataset, tmp_path, space={"train.early_stop_patience": [10]}, **search)
    with pytest.raises(
        ConfigError, match=r"trial_000 was trained with train.early_stop_patience 10, this "
    ):
        tune(cfg, synth_dataset, tmp_path, space={"train.early_stop_patience": [1]}, **search)
    best = load_config(tmp_path / "best_config.yaml")
    assert best.train.early_stop_patience == 10
    again = tune(cfg, synth_dataset, tmp_path, space={"train.early_stop_patience": [10]}, **search)
    assert list(again["train.early_stop_patience"]) == [10]


def test_a_misspelt_encoder_is_refused_before_any_trial_trains(
    synth_dataset, tmp_path, monkeypatch
):
    """train.encoder=resnet18,resnet3: the resnet18 trials trained their whole budget, then
    the search stopped at the misspelt one, with no table written."""
    import mlseg.train
    from mlseg.errors import ModelError

    def fit(*args, **kwargs):
        raise AssertionError("no trial may train")

    monkeypatch.setattr(mlseg.train, "fit", fit)
    space = {"train.encoder": ["resnet18", "resnet3"]}
    with pytest.raises(ModelError, match="unknown encoder 'resnet3'"):
        tune(
            load_config(None, train=TINY),
            synth_dataset,
            tmp_path,
            space=space,
            method="grid",
            progress=False,
        )
    assert not any(tmp_path.iterdir())


def test_a_training_set_of_one_image_and_its_copies_is_not_called_diverged(tmp_path) -> None:
    """One tile and its mirror image: the copies are held back together, so no trial had a
    validation image; every trial trained its budget, scored NaN, and the search ended
    with 'every trial's training diverged'. It now stops at the first, saying why."""
    from mlseg.io import read_image, read_mask, write_image, write_labels
    from mlseg.synth import make_dataset

    torch.set_num_threads(2)
    root = make_dataset(tmp_path / "ds", n_train=1, n_test=1, size=96, seed=0)
    images, masks = root / "train" / "original", root / "train" / "masks"
    image = next(images.iterdir())
    mask = masks / f"{image.stem}_mask.png"
    write_image(images / f"flip{image.suffix}", read_image(image)[:, ::-1].copy())
    write_labels(masks / "flip_mask.png", read_mask(mask)[:, ::-1].copy())
    cfg = load_config(None, train=TINY)
    space = {"train.lr": [1e-3, 3e-4]}
    with (
        pytest.warns(UserWarning, match="none is held back"),
        pytest.raises(ConfigError, match="trial_000 held back no validation image"),
    ):
        tune(cfg, root, tmp_path / "out", budget_steps=1, space=space, progress=False)
    assert not (tmp_path / "out" / "trial_001").exists()


def test_a_rerun_whose_config_changes_early_stopping_is_refused(synth_dataset, tmp_path):
    """early_stop_patience changed in the config, not searched: the trial trained with
    patience 10 was ranked again without a step trained, and best_config.yaml said 1."""
    torch.set_num_threads(2)
    search = {"trials": None, "budget_steps": 1, "method": "grid", "progress": False}
    space = {"train.lr": [1e-3]}
    patient = load_config(None, train={**TINY, "early_stop_patience": 10})
    tune(patient, synth_dataset, tmp_path, space=space, **search)
    impatient = load_config(None, train={**TINY, "early_stop_patience": 1})
    with pytest.raises(
        ConfigError, match=r"trial_000 was trained with train.early_stop_patience 10, this "
    ):
        tune(impatient, synth_dataset, tmp_path, space=space, **search)
    assert load_config(tmp_path / "best_config.yaml").train.early_stop_patience == 10


def test_trials_tied_on_validation_dice_rank_by_the_lower_training_loss(
    synth_dataset, tmp_path, monkeypatch
):
    """Short budgets leave trials tied on validation Dice (no nucleus found by any, or the
    same few): the tie goes to the lower final training loss, ranked first and written as
    best, not to the trial that happened to run first."""
    import pandas as pd

    import mlseg.train

    loss = {3e-4: 0.8, 1e-3: 0.2}

    class Result:
        def __init__(self, cfg, out_dir):
            self.best_val_dice, self.steps, self.images_per_s = 0.5, 1, 1.0
            self.train_images, self.val_images = 5, 1
            self.history = pd.DataFrame({"train_loss": [1.0, loss[cfg.train.lr]]})
            self.out_dir = out_dir

    monkeypatch.setattr(mlseg.train, "fit", lambda cfg, data, out_dir, **kw: Result(cfg, out_dir))
    search = {"trials": None, "method": "grid", "progress": False}
    table = tune(
        load_config(None), synth_dataset, tmp_path, space={"train.lr": [3e-4, 1e-3]}, **search
    )
    assert list(table["train.lr"]) == [1e-3, 3e-4]
    assert list(table["final_train_loss"]) == [0.2, 0.8]
    assert load_config(tmp_path / "best_config.yaml").train.lr == 1e-3


def test_each_trial_warms_up_and_validates_within_its_step_budget(
    synth_dataset, tmp_path, monkeypatch
):
    """The config's warmup (100 steps) and validation interval (200) are for a full run:
    a 40-step trial that kept them would train at a fraction of the learning rate searched
    and be validated once, at its end; each trial warms up over a tenth of its budget at
    most and is validated at least four times."""
    import pandas as pd

    import mlseg.train

    trained = []

    class Result:
        def __init__(self, cfg, out_dir):
            trained.append(cfg.train)
            self.best_val_dice, self.steps, self.images_per_s = 0.5, 1, 1.0
            self.train_images, self.val_images = 5, 1
            self.history, self.out_dir = pd.DataFrame({"train_loss": [1.0]}), out_dir

    monkeypatch.setattr(mlseg.train, "fit", lambda cfg, data, out_dir, **kw: Result(cfg, out_dir))
    cfg = load_config(None, train={"warmup_steps": 100, "val_every": 200})
    space = {"train.lr": [3e-4, 1e-3]}
    tune(cfg, synth_dataset, tmp_path, budget_steps=40, space=space, trials=None, progress=False)
    assert len(trained) == 2
    for train in trained:
        assert train.max_steps == 40
        assert train.warmup_steps <= 40 // 10
        assert 40 // train.val_every >= 4
    assert load_config(tmp_path / "best_config.yaml").train.warmup_steps == 100  # as configured


def test_a_grid_cut_short_names_the_values_it_leaves_untried(synth_dataset, tmp_path, monkeypatch):
    """--method grid with the default 8 trials ran the first 8 of the default space's 36
    sets, all at lr 0.0003 (the grid varies its first key slowest), without a word, and
    best_config.yaml named lr 0.0003 the best of a search that never tried another."""
    import warnings

    import mlseg.train

    trained = []

    def fit(cfg, data, out_dir, **kw):
        trained.append(cfg.train.lr)
        return _Trained(cfg, out_dir)

    monkeypatch.setattr(mlseg.train, "fit", fit)
    cfg = load_config(None)
    with pytest.warns(UserWarning, match=r"the grid has 36 .* first 8 .* train.lr 0.001, 0.003"):
        tune(cfg, synth_dataset, tmp_path / "cut", trials=8, method="grid", progress=False)
    assert set(trained) == {3e-4}
    # a whole grid, or a random sample, is not cut along one key: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        space = {"train.lr": [3e-4, 1e-3]}
        tune(cfg, synth_dataset, tmp_path / "whole", space=space, method="grid", progress=False)
        tune(cfg, synth_dataset, tmp_path / "sample", trials=8, method="random", progress=False)


@pytest.mark.parametrize("name", ["config.json", "meta.json"])
def test_a_damaged_trial_file_is_named_on_the_rerun(synth_dataset, tmp_path, name) -> None:
    """A trial folder copied in part (an rsync stopped, a synced share): the rerun of the
    search ended in a JSONDecodeError traceback, naming no file."""
    from mlseg.errors import ModelError

    torch.set_num_threads(2)
    cfg = load_config(None, train=TINY)
    search = {"trials": None, "budget_steps": 1, "method": "grid", "progress": False}
    space = {"train.lr": [1e-3]}
    tune(cfg, synth_dataset, tmp_path, space=space, **search)
    (tmp_path / "trial_000" / name).write_text('{"train": {"lr"')
    with pytest.raises(ModelError, match=rf"trial_000/{name}: cannot be read as JSON"):
        tune(cfg, synth_dataset, tmp_path, space=space, **search)


class _Trained:
    """What :func:`mlseg.train.fit` returns for a trial of validation Dice ``dice``, with
    the ``config.json`` a real trial leaves in its folder."""

    def __init__(self, cfg, out_dir, dice: float = 0.5):
        import json

        import pandas as pd

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        self.best_val_dice, self.steps, self.images_per_s = dice, 1, 1.0
        self.train_images, self.val_images = 5, 1
        self.history, self.out_dir = pd.DataFrame({"train_loss": [1.0]}), out_dir


def test_a_rerun_with_fewer_trials_ranks_every_trial_in_the_folder(
    synth_dataset, tmp_path, monkeypatch
):
    """--trials 4, then --trials 2 in the same folder: the rerun ranked its two trials alone
    and wrote the better of those (Dice 0.2) as best_config.yaml and tune_results.csv over
    the first run's winner (trial_002, Dice 0.9), without a word."""
    import pandas as pd

    import mlseg.train

    dice = {1e-4: 0.1, 3e-4: 0.2, 1e-3: 0.9, 3e-3: 0.3}
    monkeypatch.setattr(
        mlseg.train,
        "fit",
        lambda cfg, data, out_dir, **kw: _Trained(cfg, out_dir, dice[cfg.train.lr]),
    )
    search = {"space": {"train.lr": list(dice)}, "method": "grid", "progress": False}
    tune(load_config(None), synth_dataset, tmp_path, trials=4, **search)
    with pytest.warns(UserWarning, match=r"trial_002, trial_003 of this search beyond the 2"):
        table = tune(load_config(None), synth_dataset, tmp_path, trials=2, **search)
    assert list(table["trial"]) == [2, 3, 1, 0]
    assert len(pd.read_csv(tmp_path / "tune_results.csv")) == 4
    assert load_config(tmp_path / "best_config.yaml").train.lr == 1e-3


def test_a_trial_out_of_memory_ranks_last_and_the_search_goes_on(
    synth_dataset, tmp_path, monkeypatch
):
    """A patch size too large for the GPU stopped the whole search (CUDA out of memory): no
    table, no best_config.yaml, and a rerun stopped at the same trial again. It is ranked
    last, as a diverged trial is, and a rerun (on a GPU with more memory) tries it again."""
    import mlseg.train

    def fit(cfg, data, out_dir, **kw):
        if cfg.train.patch_size == 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _Trained(cfg, out_dir)

    monkeypatch.setattr(mlseg.train, "fit", fit)
    search = {"trials": None, "method": "grid", "progress": False}
    space = {"train.patch_size": [256, 128]}
    with pytest.warns(UserWarning, match=r"trial_000 \({'train.patch_size': 256}\): out of memory"):
        table = tune(load_config(None), synth_dataset, tmp_path, space=space, **search)
    assert list(table["train.patch_size"]) == [128, 256]
    assert table["best_val_dice"].isna().tolist() == [False, True]
    assert load_config(tmp_path / "best_config.yaml").train.patch_size == 128
    with (
        pytest.warns(UserWarning),
        pytest.raises(ConfigError, match=r"every trial ran out of memory.*train.patch_size"),
    ):
        tune(
            load_config(None),
            synth_dataset,
            tmp_path / "all",
            space={"train.patch_size": [256]},
            **search,
        )
    assert not (tmp_path / "all" / "best_config.yaml").exists()
    dice = {256: 0.8, 128: 0.5}  # the rerun's GPU fits the larger patch
    monkeypatch.setattr(
        mlseg.train,
        "fit",
        lambda cfg, data, out_dir, **kw: _Trained(cfg, out_dir, dice[cfg.train.patch_size]),
    )
    again = tune(load_config(None), synth_dataset, tmp_path, space=space, **search)
    assert list(again["best_val_dice"]) == [0.8, 0.5]  # tried again, not read back as failed
    assert load_config(tmp_path / "best_config.yaml").train.patch_size == 256


def test_best_config_keeps_the_configs_device_not_the_searchs(synth_dataset, tmp_path, monkeypatch):
    """mlseg tune --device cpu wrote train.device: cpu into best_config.yaml, and the best
    config trained on the CPU of a GPU machine; the trials run on the device given, the
    config written keeps its own (here the default, auto)."""
    import mlseg.train
    from mlseg.cli import main

    devices = []

    def fit(cfg, data, out_dir, **kw):
        devices.append(cfg.train.device)
        return _Trained(cfg, out_dir)

    monkeypatch.setattr(mlseg.train, "fit", fit)
    config = tmp_path / "run.yaml"
    config.write_text("train: {encoder: resnet18}\n")
    argv = ["tune", str(config), "--data", str(synth_dataset), "--out", str(tmp_path / "out")]
    argv += ["--param", "train.lr=1e-3,1e-4", "--no-validate", "--device", "cpu"]
    assert main(argv) == 0
    assert devices == ["cpu", "cpu"]
    best = tmp_path / "out" / "best_config.yaml"
    assert "device" not in best.read_text() and load_config(best).train.device == "auto"
