"""Hyperparameter selection: a small grid or random search with short training budgets.

Each trial is a plain :func:`mlseg.train.fit` run of ``budget_steps`` steps in its own
folder (``trial_NNN``; a re-run resumes or skips finished trials, ranks every trial of the
search the folder holds, beyond ``trials`` too, and refuses a folder holding the trials of
another search), scored by its best validation Dice (a search whose trials hold back no
validation image is refused; a trial whose training diverged or ran out of memory scores
NaN, ranks last, is named in a warning and is tried again by a re-run; ``data.*`` settings
are not searched, as each trial would be scored on other validation images; nor are
``inference.*``, ``monitor.*`` and the keys the budget sets, which no trial would see).
The ranked table is returned and written as ``tune_results.csv``; the best trial's config,
with the original step budget, is written as ``best_config.yaml``.

A search space maps ``"section.field"`` to the values to try, e.g.
``{"train.lr": [3e-4, 1e-3], "train.encoder": ["resnet18", "resnet34"]}``.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mlseg.config import Config, DataConfig, get_profile
from mlseg.errors import ConfigError, ResumeError, TrainingDiverged, oom_said
from mlseg.io import write_table, write_text, written_together

DEFAULT_SPACE: dict[str, list[Any]] = {
    "train.lr": [3e-4, 1e-3, 3e-3],
    "train.encoder": ["resnet18", "resnet34"],
    "train.dice_weight": [0.5, 1.0, 2.0],
    "train.patch_size": [128, 256],
}
METHODS = ("random", "grid")
# keys each trial takes from the budget, and sections no trial trains or is scored with:
# searched, every value would give the same trial, and the first would be written as best
BUDGET_KEYS = ("train.max_steps", "train.val_every", "train.warmup_steps")
UNSCORED_SECTIONS = ("inference", "monitor")
#: Train settings a resume may change (:data:`mlseg.train.RESUME_FREE`) that decide when a
#: trial stops and which checkpoint it keeps: set otherwise in the config of a rerun, they
#: were checked only where searched, and the finished trials were ranked under them.
TRIAL_DECIDING = ("train.early_stop_patience", "train.val_every")
OUT_OF_MEMORY = "out of memory"
LESS_MEMORY = (
    "search a smaller train.patch_size or train.batch_size, or run on a device with more memory"
)


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with ``{"section.field": value}`` set, each section re-validated."""
    from mlseg.config import parse

    sections = [k for k, f in Config.model_fields.items() if hasattr(f.annotation, "model_fields")]
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, _, name = key.partition(".")
        if name and section not in Config.model_fields:  # trian.lr, as config files say it
            near = difflib.get_close_matches(section, sections, n=1)
            meant = f"; did you mean '{near[0]}.{name}'?" if near else ""
            raise ConfigError(
                f"search space: {key!r}: no section {section!r}{meant} "
                f"(sections: {', '.join(sections)})"
            )
        if not name or section not in sections:
            raise ConfigError(f"search space: {key!r} is not 'section.field' (e.g. train.lr)")
        fields = list(type(getattr(cfg, section)).model_fields)
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            meant = f"; did you mean '{section}.{near[0]}'?" if near else ""
            raise ConfigError(f"search space: {section} has no field {name!r}{meant}")
        by_section.setdefault(section, {})[name] = value
    update = {}
    for section, values in by_section.items():
        current = getattr(cfg, section)
        # only the fields the config set: a preprocess field it leaves to the profile
        # (stain_norm: macenko for H&E) stays the profile's (mlseg.data.effective_preprocess)
        update[section] = parse(
            type(current),
            {**current.model_dump(exclude_unset=True), **values},
            f"search space ({section})",
        )
    return cfg.model_copy(update=update)


def _as_read(cfg: Config, space: dict[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    """Each searched value as its config field reads it, repeats dropped: YAML, as the CLI's
    ``--param`` uses it, reads ``train.lr=1e-4,1e-3`` as two strings (its floats need a dot),
    which the table held as text, and ``0.001,1e-3`` trained one trial twice."""
    read = {}
    for key, values in space.items():
        if not isinstance(values, (list, tuple)):
            read[key] = values  # candidates names it
            continue
        section, _, name = key.partition(".")
        kept: list[Any] = []
        for value in values:
            with contextlib.suppress(ConfigError):  # valid only beside another searched value
                value = getattr(getattr(apply_params(cfg, {key: value}), section), name)
            if value not in kept:
                kept.append(value)
        read[key] = kept
    return read


def candidates(
    space: dict[str, Sequence[Any]], trials: int | None, method: str, seed: int
) -> list[dict[str, Any]]:
    """The parameter sets to try: the grid in order (first ``trials``) or a seeded random
    sample of it without repetition."""
    if method not in METHODS:
        raise ConfigError(f"tune method must be one of {', '.join(METHODS)}, got {method!r}")
    if trials is not None and trials < 0:  # [:-1] would run all of the grid but the last
        raise ConfigError(f"trials must be at least 0 (0: the whole grid), got {trials}")
    keys = list(space)
    for key in keys:
        if not isinstance(space[key], (list, tuple)) or not space[key]:
            raise ConfigError(f"search space: {key} needs a non-empty list of values")
    grid = [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(space[k] for k in keys))
    ]
    n = len(grid) if not trials else min(trials, len(grid))
    if method == "grid":
        return grid[:n]
    order = np.random.default_rng(seed).permutation(len(grid))[:n]
    return [grid[i] for i in order]


def _warn_untried(
    space: dict[str, Sequence[Any]], chosen: list[dict[str, Any]], method: str
) -> None:
    """Warn where a grid cut to its first trials leaves searched values untried: the grid
    varies its first key slowest, so ``--method grid`` with 8 of the default space's 36
    sets trained every trial at lr 0.0003, and best_config.yaml named that the best."""
    size = int(np.prod([len(values) for values in space.values()]))
    if method != "grid" or len(chosen) >= size:
        return
    untried = [
        f"{key} {', '.join(str(v) for v in values if all(c[key] != v for c in chosen))}"
        for key, values in space.items()
        if any(all(c[key] != v for c in chosen) for v in values)
    ]
    if untried:
        warnings.warn(
            f"the grid has {size} parameter sets and the first {len(chosen)} are run, which "
            f"leave untried {'; '.join(untried)}; give --trials 0 (the whole grid), or "
            "--method random for a sample across it",
            stacklevel=3,  # tune's caller
        )


def _earlier_runs(path: Path) -> dict[int, dict[str, float]]:
    """``{trial: {"images_per_s", "seconds"}}`` of the trials an earlier run of the search
    in this folder trained (its ``tune_results.csv``): a rerun finds them finished and
    trains nothing, and would record no throughput and the time of its check instead."""
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, usecols=["trial", "images_per_s", "seconds"])
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    return {
        int(row.trial): {"images_per_s": row.images_per_s, "seconds": row.seconds}
        for row in table.itertuples()
    }


def _recorded_timing(history: pd.DataFrame, timing: dict[str, float]) -> dict[str, float]:
    """``{"images_per_s", "seconds"}`` of a trial finished before, from its own history
    (``history.csv``): its training throughput and time, for a trial whose search was
    interrupted before writing ``tune_results.csv``. ``timing`` where none was recorded."""
    steps = history["step"].diff().fillna(history["step"]).to_numpy(float)
    per_s = history["images_per_s"].to_numpy(float)
    elapsed = history["elapsed_s"].to_numpy(float)
    if not len(history) or not np.isfinite(elapsed[-1]):
        return timing
    # images/s of the whole run: the images over the seconds of every epoch (batch size cancels)
    seconds = np.sum(steps / per_s)
    return {
        "images_per_s": float(steps.sum() / seconds) if seconds > 0 else np.nan,
        "seconds": float(elapsed[-1]),
    }


def _check_trials(out: Path, trial_cfgs: list[Config], keys: Sequence[str]) -> None:
    """Refuse a folder whose trials were trained with another step budget, other values of
    the searched ``keys`` or of :data:`TRIAL_DECIDING`: a rerun would rank them (finished,
    or extended by a warm restart) beside trials of this budget, or under this search's
    values where a resume may change them (``mlseg.train.RESUME_FREE``: early_stop_patience,
    amp ...; a change of any other setting fit refuses to resume with)."""
    from mlseg.model import read_checkpoint_json
    from mlseg.train import RESUME_FREE

    searched = [k for k in keys if k.startswith("train.") and k.partition(".")[2] in RESUME_FREE]
    keys = list(dict.fromkeys([*searched, *TRIAL_DECIDING]))
    for i, trial_cfg in enumerate(trial_cfgs):
        saved = out / f"trial_{i:03d}" / "config.json"
        if not saved.is_file():
            continue
        before, now = read_checkpoint_json(saved), trial_cfg.model_dump(mode="json")
        steps, budget = before.get("train", {}).get("max_steps"), now["train"]["max_steps"]
        if steps is not None and steps != budget:
            raise ConfigError(
                f"{out}: holds the trials of another search ({saved.parent.name} had a budget "
                f"of {steps} steps, this search {budget}); give another output folder, "
                f"or --budget-steps {steps} to resume it"
            )
        for key in keys:
            section, _, name = key.partition(".")
            was = before.get(section, {}).get(name, now[section][name])  # older: not saved
            if was != now[section][name]:
                raise ConfigError(
                    f"{out}: holds the trials of another search ({saved.parent.name} was "
                    f"trained with {key} {was!r}, this search gives it {now[section][name]!r}); "
                    "give another output folder, or the same config, space and seed to resume it"
                )


def _trials_in(out: Path) -> list[int]:
    """The numbers of the trials in ``out`` that trained to a checkpoint (their
    ``config.json``), in order."""
    if not out.is_dir():
        return []
    names = (path.parent.name for path in out.glob("trial_*/config.json"))
    return sorted(int(m[1]) for name in names if (m := re.fullmatch(r"trial_(\d{3,})", name)))


def _all_failed(out: Path, failed: dict[int, str]) -> str:
    """The error of a search whose every trial diverged or ran out of memory."""
    memory = sum(why == OUT_OF_MEMORY for why in failed.values())
    if not memory:
        return (
            f"{out}: every trial's training diverged (tune_results.csv); lower the "
            "learning rates searched (train.lr) or raise train.warmup_steps"
        )
    if memory == len(failed):
        return f"{out}: every trial ran out of memory (tune_results.csv); {LESS_MEMORY}"
    return (
        f"{out}: every trial failed, {len(failed) - memory} diverged and {memory} out of "
        "memory (tune_results.csv); lower the learning rates searched (train.lr) or raise "
        f"train.warmup_steps, and {LESS_MEMORY}"
    )


def _free_device_memory() -> None:
    """Give back the GPU memory a trial that ran out of it held: its tensors, freed with
    the exception, stay cached by torch and the next trial would find less."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_validation_split(data: DataConfig, data_root: str | Path) -> None:
    """Refuse a search whose trials would hold back no validation image: they would be
    ranked by training loss alone, which favours the trial that overfits most."""
    from mlseg.data import split_validation
    from mlseg.dataset import list_pairs

    n = len(list_pairs(data_root, "train", data, strict=True))
    if n and not len(split_validation(n, data.val_fraction, data.seed)):
        raise ConfigError(
            f"{data_root}: tune ranks trials by validation Dice, but data.val_fraction "
            f"{data.val_fraction:g} of {n} training image(s) holds none back; set "
            "data.val_fraction above 0 with at least 2 training images"
        )


def _prefixed(log: Callable[[str], object] | None, prefix: str) -> Callable[[str], object] | None:
    """``log`` with ``prefix: `` before each line (a trial's epochs, named by its folder)."""
    if log is None:
        return None
    return lambda line: log(f"{prefix}: {line}")


def tune(
    cfg: Config,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    trials: int | None = 8,
    budget_steps: int = 200,
    space: dict[str, Sequence[Any]] | None = None,
    method: str = "random",
    seed: int = 0,
    progress: bool = True,
    fingerprint_hash: str | None = None,
    log: Callable[[str], object] | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """Run the search; returns the trials ranked by best validation Dice (best first).

    ``progress`` draws a bar over the trials; ``log`` (a job's stderr, where no bar is
    drawn) is given each trial's line per epoch, after its folder's name
    (``trial_002: epoch 1 step 50: loss=...``), and a line on how far the search is once a
    minute (:class:`mlseg.progress.ProgressLog`): in a job's log a search of hours said
    nothing until its table, and a working one looked like a hung one.

    ``fingerprint_hash`` is the training data's as validated: every trial refuses files
    changed since (:func:`mlseg.train.fit`).

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is where every trial trains, in place
    of ``cfg.train.device``; ``best_config.yaml`` keeps the config's own, so that training it
    on another machine runs where that machine's config says (a search run with ``cpu``
    wrote ``device: cpu`` there, and the best config trained on the CPU of a GPU machine).

    ``trials`` counts the trials this run asks for; trials of the same search the folder
    already holds beyond them are ranked too (named in a warning), so that a rerun with
    fewer never writes the best of a subset over a better trial the folder holds.

    Columns: ``rank, trial``, one per searched parameter, ``best_val_dice,
    final_train_loss, steps, images_per_s, seconds, out_dir``. A trial a rerun finds finished
    keeps the timing of the earlier ``tune_results.csv``, or, where the earlier search was
    stopped before writing it, its training throughput and time from its ``history.csv``.
    """
    import torch

    from mlseg.data import effective_preprocess
    from mlseg.model import check_names
    from mlseg.progress import shown
    from mlseg.train import check_stain_augment, fit

    if budget_steps < 1:
        raise ConfigError(f"budget_steps must be at least 1, got {budget_steps}")
    space = dict(space or DEFAULT_SPACE)
    if searched_data := sorted(key for key in space if key.startswith("data.")):
        raise ConfigError(
            f"{', '.join(searched_data)}: a data setting searched scores each trial on other "
            "validation images (data.seed, data.val_fraction: another split), and the easiest "
            "would win; set data in the config and search train, augment or preprocess settings"
        )
    if unseen := sorted(key for key in space if key in BUDGET_KEYS):
        raise ConfigError(
            f"{', '.join(unseen)}: set for every trial by the step budget (budget_steps, "
            "--budget-steps; val_every and warmup_steps shortened to fit it), so each value "
            "searched would train the same trial; search other train settings"
        )
    if unseen := sorted(key for key in space if key.partition(".")[0] in UNSCORED_SECTIONS):
        raise ConfigError(
            f"{', '.join(unseen)}: trials are scored by the validation Dice of the network's "
            "output, which inference and monitor settings do not change, so each value searched "
            "would score the same; set them in the config and search train, augment or "
            "preprocess settings"
        )
    out = Path(out_dir)
    read = _as_read(cfg, space)
    chosen = candidates(read, trials, method, seed)
    asked = len(chosen)
    # a rerun with fewer trials ranked its own alone, and wrote the best of those over a
    # better trial of the earlier, longer run: the folder's trials of this search all count
    if beyond := [i for i in _trials_in(out) if i >= asked]:
        chosen = candidates(read, max(beyond) + 1, method, seed)
    _warn_untried(read, chosen, method)
    short = {
        "train.max_steps": budget_steps,
        "train.val_every": max(1, min(cfg.train.val_every, budget_steps // 4 or 1)),
        "train.warmup_steps": min(cfg.train.warmup_steps, budget_steps // 10),
    }
    where = {} if device is None else {"train.device": device}
    trial_cfgs = [apply_params(cfg, {**params, **short, **where}) for params in chosen]
    for data in {c.data for c in trial_cfgs}:  # before any trial trains
        _check_validation_split(data, data_root)
    for trial_cfg in trial_cfgs:  # a stain augmentation the trial's preprocessing voids
        check_names(trial_cfg.train)  # a misspelt encoder stopped the search at its trial
        profile = get_profile(trial_cfg.profile, trial_cfg.profiles_file)
        pp = effective_preprocess(trial_cfg, profile)
        check_stain_augment(trial_cfg.augment, profile.stain, pp)
    _check_trials(out, trial_cfgs, list(space))
    if len(chosen) > asked:
        names = ", ".join(f"trial_{i:03d}" for i in beyond if i < len(chosen))
        warnings.warn(
            f"{out}: holds {names} of this search beyond the {asked} trial(s) asked for; "
            "ranking them too, so tune_results.csv and best_config.yaml cover every trial in "
            "the folder (any of them left unfinished trains on); give another output folder "
            "to search fewer",
            stacklevel=2,
        )
    rows = []
    failed: dict[int, str] = {}  # trial: diverged or out of memory
    before = _earlier_runs(out / "tune_results.csv")
    bar = "tune" if progress else None
    for i, params in shown(
        list(enumerate(chosen)), "tune", "trials", log, bar=bar, bar_unit="trial"
    ):
        trial_cfg = trial_cfgs[i]
        t0 = time.perf_counter()
        folder = out / f"trial_{i:03d}"
        try:
            result = fit(
                trial_cfg,
                data_root,
                folder,
                resume=True,
                fingerprint_hash=fingerprint_hash,
                progress=False,
                log=_prefixed(log, folder.name),
            )
        except ResumeError as error:
            # a finished trial of another search would otherwise be reported under these params
            # its differences, not fit's remedy: tune has no --no-resume
            raise ConfigError(
                f"{out}: holds the trials of another search ({folder.name} was trained with "
                f"other settings: {'; '.join(error.problems) or error}); give another output "
                "folder, or the same config, space and seed to resume it"
            ) from None
        # a learning rate too high, a patch too large for the GPU: a result, not a stop
        except (TrainingDiverged, torch.OutOfMemoryError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                failed[i] = OUT_OF_MEMORY
                said = oom_said(error)
                why = (
                    f"{OUT_OF_MEMORY} ({said}); ranked last, a rerun tries it again: {LESS_MEMORY}"
                )
            else:
                failed[i], why = "diverged", str(error)
            warnings.warn(f"{folder.name} ({params}): {why}", stacklevel=2)
            scores = {"best_val_dice": np.nan, "final_train_loss": np.nan, "steps": 0}
            timing = {"images_per_s": np.nan, "seconds": time.perf_counter() - t0}
        else:
            if not result.val_images:  # every image a copy of one other: held back together
                raise ConfigError(
                    f"{data_root}: tune ranks trials by validation Dice, but {folder.name} held "
                    f"back no validation image: its {result.train_images} training images are "
                    "copies (mirrored or turned) of one image, which are held back together; "
                    "add annotated images of other fields"
                )
            history = result.history["train_loss"]
            scores = {
                "best_val_dice": result.best_val_dice,
                "final_train_loss": float(history.iloc[-1]) if len(history) else np.nan,
                "steps": result.steps,
            }
            timing = {"images_per_s": result.images_per_s, "seconds": time.perf_counter() - t0}
            if not np.isfinite(result.images_per_s):  # finished before: trained nothing now
                timing = before.get(i) or _recorded_timing(result.history, timing)
        if failed.get(i) == OUT_OF_MEMORY:  # the exception, and the trial's tensors, gone
            _free_device_memory()
        rows.append({"trial": i, **params, **scores, **timing, "out_dir": str(folder)})
    df = pd.DataFrame(rows)
    df["best_val_dice"] = df["best_val_dice"].astype(float)
    df = df.sort_values(
        ["best_val_dice", "final_train_loss"], ascending=[False, True], na_position="last"
    )
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    df = df.reset_index(drop=True)
    # the values as tried, not as the table holds them (None becomes NaN in a float column)
    if not np.isfinite(df.loc[0, "best_val_dice"]):
        write_table(df, out / "tune_results.csv")
        raise ConfigError(_all_failed(out, failed))
    best_params = chosen[int(df.loc[0, "trial"])]
    best_cfg = apply_params(cfg, best_params)
    text = "# best of mlseg tune (" + ", ".join(f"{k}={v}" for k, v in best_params.items()) + ")\n"
    text += yaml.safe_dump(best_cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    # both or neither: a disk that filled at best_config.yaml left a wider search's ranking
    # beside the narrower one's winner
    with written_together(out) as staging:
        write_table(df, staging / "tune_results.csv")
        write_text(staging / "best_config.yaml", text)
    return df
