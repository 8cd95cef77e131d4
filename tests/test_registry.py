"""Model registry: versions, production pointer, champion/challenger, remote (fsspec) storage."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

import mlseg
from mlseg import registry as reg
from mlseg.io import write_image, write_labels


def _checkpoint(folder: Path, weights: bytes = b"weights-1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.safetensors").write_bytes(weights)
    (folder / "last.safetensors").write_bytes(b"last")
    (folder / "last.state.pt").write_bytes(b"optimizer state: not served")
    (folder / "config.json").write_text(json.dumps({"train": {"encoder": "resnet18"}}))
    (folder / "meta.json").write_text(json.dumps({"step": 10}))
    return folder


def _register(tmp_path: Path, registry, dice: float, eval_set: str = "setA", tag: str = "a"):
    ckpt = _checkpoint(tmp_path / f"ckpt-{tag}", weights=f"w-{tag}".encode())
    return reg.register(
        ckpt,
        registry,
        metrics={"dice": dice, "aji": dice - 0.1},
        fingerprint_hash="fp123",
        config={"train": {"encoder": "resnet18"}},
        eval_set_id=eval_set,
    )


def test_register_keeps_files_metadata_and_numbers_versions(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    v1 = _register(tmp_path, registry, 0.80, tag="a")
    v2 = _register(tmp_path, registry, 0.82, tag="b")
    assert (v1.version, v2.version) == (1, 2)
    folder = Path(v2.uri)
    assert (folder / "best.safetensors").read_bytes() == b"w-b"
    card = json.loads((folder / "card.json").read_text())
    assert card["fingerprint_hash"] == "fp123"
    assert card["config"] == {"train": {"encoder": "resnet18"}}  # the run's, to reproduce it
    assert card["metrics"]["dice"] == pytest.approx(0.82)
    assert card["eval_set_id"] == "setA"
    assert card["code_version"].startswith("0.")
    assert card["created_at"].endswith("+00:00")
    assert set(card["files"]) == {"best.safetensors", "config.json", "meta.json"}  # no optimiser
    listed = reg.list_models(registry)
    assert [m.tag for m in listed] == ["nuclei@v1", "nuclei@v2"]
    assert reg.show(registry, "nuclei", "v2") == v2
    assert reg.show(registry, "nuclei", " V2 ") == v2  # as typed on a command line
    assert reg.show(registry, "nuclei", "latest").version == 2


def test_versions_past_nine_are_listed_and_resolved_by_number(tmp_path: Path) -> None:
    """As text, v10 sorts between v1 and v2: `latest` of a model with ten versions was v9."""
    registry = tmp_path / "registry"
    for i in range(10):
        _register(tmp_path, registry, 0.8, tag=str(i))
    assert [m.version for m in reg.list_models(registry, "nuclei")] == list(range(1, 11))
    assert reg.show(registry, "nuclei", "latest").version == 10


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_registry_one_cannot_write_is_named_not_a_staging_folder(tmp_path, monkeypatch):
    """Registering into a colleague's registry (umask 022) or a read-only one failed with
    Python's PermissionError on 'nuclei/.staging-<hex>', a folder nobody asked for."""
    from mlseg.errors import OutputError

    registry = tmp_path / "registry"
    _register(tmp_path, registry, 0.80, tag="a")
    mkdir = os.mkdir

    def denied(path, *args, **kwargs):  # as for a user without write access (tests run as root)
        if Path(path).parent == registry / "nuclei":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(OutputError, match="write elsewhere") as caught:
        _register(tmp_path, registry, 0.82, tag="b")
    assert str(caught.value).startswith(f"{registry / 'nuclei'}: cannot be written")
    assert ".staging" not in str(caught.value)


def test_code_version_names_no_commit_of_a_repository_mlseg_is_not_tracked_in(
    tmp_path: Path, monkeypatch
) -> None:
    # mlseg installed into a virtualenv inside the user's own (git) project
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "notes.txt").write_text("the user's project")
    git("add", "notes.txt")
    git("-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "project")
    package = tmp_path / ".venv" / "site-packages" / "mlseg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.1.0"\n')
    monkeypatch.setattr(mlseg, "__file__", str(package / "__init__.py"))
    assert reg.code_version() == mlseg.__version__


def test_register_a_weights_file_and_refuse_a_folder_without_weights(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    version = reg.register(
        ckpt / "last.safetensors",
        tmp_path / "r",
        metrics={"dice": 0.5},
        fingerprint_hash=None,
        config={},
        eval_set_id="s",
    )
    assert sorted(version.files) == ["config.json", "last.safetensors", "meta.json"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(reg.RegistryError, match="no best.safetensors or last.safetensors"):
        reg.register(
            tmp_path / "empty",
            tmp_path / "r",
            metrics={},
            fingerprint_hash=None,
            config={},
            eval_set_id="s",
        )


def test_same_weights_are_found_instead_of_registered_twice(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    version = _register(tmp_path, registry, 0.8, tag="a")
    assert reg.find_version(registry, tmp_path / "ckpt-a") == version
    other = _checkpoint(tmp_path / "other", weights=b"different")
    assert reg.find_version(registry, other) is None


def test_the_same_weights_with_other_preprocessing_are_not_the_registered_version(
    tmp_path: Path,
) -> None:
    """Weights registered as v1, their config.json then edited to equalise with CLAHE and
    scored on a new set: the scores were recorded on v1 (whose config does not equalise),
    so v1's card claimed metrics another model earned, and `mlseg models register` said
    'already registered as nuclei@v1'. Scores stay with the model that earned them."""
    registry = tmp_path / "registry"
    run = _checkpoint(tmp_path / "run")
    v1, new = reg.register_scores(
        run, registry, metrics={"aji": 0.5}, eval_set_id="setA", fingerprint_hash="fp"
    )
    assert (v1.version, new) == (1, True)
    edited = _checkpoint(tmp_path / "edited")
    (edited / "config.json").write_text(
        json.dumps({"train": {"encoder": "resnet18"}, "preprocess": {"equalize": "clahe"}})
    )
    found, new = reg.register_scores(
        edited, registry, metrics={"aji": 0.9}, eval_set_id="setB", fingerprint_hash="fp"
    )
    assert (found.version, new) == (2, True) and found.metrics == {"aji": 0.9}
    assert reg.show(registry, "nuclei", 1).metrics_on("setB") is None
    assert reg.find_version(registry, run) == reg.show(registry, "nuclei", 1)
    assert reg.find_version(registry, edited) == found
    # the registered weights and settings again: their own version, as before
    assert reg.register_scores(
        run, registry, metrics={"aji": 0.5}, eval_set_id="setA", fingerprint_hash="fp"
    ) == (reg.show(registry, "nuclei", 1), False)


def test_incomplete_version_without_card_is_ignored(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    _register(tmp_path, registry, 0.8)
    (registry / "nuclei" / "v2").mkdir()  # a crash mid-copy leaves no card.json
    assert [m.version for m in reg.list_models(registry)] == [1]
    assert _register(tmp_path, registry, 0.9, tag="c").version == 2


def test_a_registration_that_died_leaves_nothing_the_next_version_serves(tmp_path: Path) -> None:
    """A crash after the weights were copied, before the card: the folder is incomplete and
    ignored, and the next registration must not inherit its files (a loader prefers
    best.safetensors, so v1 would have served the dead registration's weights)."""
    from mlseg.model import checkpoint_path

    registry = tmp_path / "registry"
    dead = registry / "nuclei" / "v1"
    dead.mkdir(parents=True)
    (dead / "best.safetensors").write_bytes(b"weights of a registration that died")
    ckpt = tmp_path / "ckpt"
    _checkpoint(ckpt)
    (ckpt / "best.safetensors").unlink()  # a run that kept last.safetensors only
    version = reg.register(
        ckpt, registry, metrics={"dice": 0.5}, fingerprint_hash=None, config={}, eval_set_id="s"
    )
    served = checkpoint_path(reg.fetch(version))
    assert version.version == 1 and served.read_bytes() == b"last"


def test_only_weights_a_loader_reads_are_registered(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    (ckpt / "epoch10.safetensors").write_bytes(b"w")
    with pytest.raises(reg.RegistryError, match=r"epoch10\.safetensors: a registered model is "):
        reg.register(
            ckpt / "epoch10.safetensors",
            tmp_path / "r",
            metrics={},
            fingerprint_hash=None,
            config={},
            eval_set_id="s",
        )


def test_remote_versions_of_two_registries_are_cached_apart(tmp_path: Path) -> None:
    """v1 of registry A (best.safetensors) and v1 of registry B (last.safetensors only):
    fetched into one cache, B's folder must not hold A's best, which a loader prefers."""
    from mlseg.model import checkpoint_path

    a = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    b = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    va = _register(tmp_path, a, 0.9, tag="a")
    only_last = _checkpoint(tmp_path / "only-last")
    (only_last / "best.safetensors").unlink()
    vb = reg.register(
        only_last, b, metrics={"dice": 0.9}, fingerprint_hash=None, config={}, eval_set_id="s"
    )
    assert va.version == vb.version == 1
    cache = tmp_path / "cache"
    assert checkpoint_path(reg.fetch(va, cache_dir=cache)).read_bytes() == b"w-a"
    assert checkpoint_path(reg.fetch(vb, cache_dir=cache)).read_bytes() == b"last"


def test_a_model_registered_again_at_the_same_url_is_not_served_from_the_old_cache(
    tmp_path: Path,
) -> None:
    """The model's folder in the bucket removed and its training registered again as v1
    (last.safetensors only): the worker's cache of the first v1 kept its best.safetensors
    beside the new files, and the loader, preferring best, served the old weights as the
    new nuclei@v1."""
    from fsspec.implementations.memory import MemoryFileSystem

    from mlseg.model import checkpoint_path

    url = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    cache = tmp_path / "cache"
    first = _register(tmp_path, url, 0.9, tag="old")
    assert checkpoint_path(reg.fetch(first, cache_dir=cache)).read_bytes() == b"w-old"
    MemoryFileSystem().rm(f"{url.removeprefix('memory://')}/nuclei", recursive=True)
    only_last = _checkpoint(tmp_path / "only-last")
    (only_last / "best.safetensors").unlink()
    again = reg.register(
        only_last, url, metrics={"dice": 0.9}, fingerprint_hash=None, config={}, eval_set_id="s"
    )
    assert again.version == first.version == 1
    assert checkpoint_path(reg.fetch(again, cache_dir=cache)).read_bytes() == b"last"


def test_a_remote_version_is_cached_where_xdg_cache_home_says(tmp_path, monkeypatch) -> None:
    """The flows fetch a remote registry's version into ~/.cache whatever the environment
    said: on a worker whose home is read-only they failed with Python's PermissionError on
    ~/.cache, and no setting moved the cache."""
    home = tmp_path / "home"
    home.mkdir()
    mkdir = os.mkdir

    def denied(path, *args, **kwargs):  # a read-only home (tests run as root)
        if Path(path).is_relative_to(home):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    version = _register(tmp_path, f"memory://mlseg-test-{uuid.uuid4().hex}/models", 0.9)
    fetched = reg.fetch(version)
    assert fetched.is_relative_to(tmp_path / "cache" / "mlseg" / "models")
    assert (fetched / "best.safetensors").read_bytes() == b"w-a"
    monkeypatch.delenv("XDG_CACHE_HOME")
    from mlseg.errors import OutputError

    with pytest.raises(OutputError, match="set it to a writable folder") as caught:
        reg.fetch(version)
    assert str(caught.value).startswith(str(home / ".cache" / "mlseg" / "models"))


def test_a_full_disk_under_the_model_cache_names_it_and_xdg_cache_home(
    tmp_path, monkeypatch
) -> None:
    """A remote version fetched onto a full disk: the error named the weights file in the
    cache and said "write elsewhere", where only XDG_CACHE_HOME moves the cache; nothing
    half-downloaded is left for a later fetch to serve."""
    from mlseg.errors import OutputError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    version = _register(tmp_path, f"memory://mlseg-test-{uuid.uuid4().hex}/models", 0.9)
    fs = type(reg._fs(version.uri)[0])
    get_file = fs.get_file

    def full(self, rpath, lpath, **kwargs):
        with open(lpath, "wb") as fh:
            fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "get_file", full)
    with pytest.raises(OutputError) as caught:
        reg.fetch(version)
    target = tmp_path / "cache" / "mlseg" / "models" / "nuclei"
    (folder,) = target.iterdir()
    assert str(caught.value) == (
        f"{folder}: cannot be written (no space left on device); free disk space there, or set "
        "XDG_CACHE_HOME to a folder on a disk with room (the model cache goes under it), then "
        "run again"
    )
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(fs, "get_file", get_file)
    assert (reg.fetch(version) / "best.safetensors").read_bytes() == b"w-a"


def test_the_same_weights_scored_on_a_new_set_are_compared_there(tmp_path: Path) -> None:
    """The pipeline reruns with the same weights on a new test set: the challenger's score
    on that set, not its registration score on the old one, meets the champion's there."""
    from flows.pipeline import register_task

    registry = str(tmp_path / "registry")
    a = _checkpoint(tmp_path / "a", b"wa") / "best.safetensors"
    b = _checkpoint(tmp_path / "b", b"wb") / "best.safetensors"
    register_task.fn(str(a), registry, "nuclei", {"aji": 0.60}, "setA", None, "aji", 0.0)
    register_task.fn(str(b), registry, "nuclei", {"aji": 0.50}, "setA", None, "aji", 0.0)
    out = register_task.fn(
        str(b), registry, "nuclei", {"aji": 0.40}, "setB", None, "aji", 0.0, {"aji": 0.45}
    )
    decision = out["decision"]
    assert not decision["promoted"] and decision["eval_set_id"] == "setB"
    assert (decision["challenger_value"], decision["champion_value"]) == (0.40, 0.45)
    assert reg.show(registry, "nuclei", 2).metrics_on("setB") == {"aji": 0.40}
    assert reg.production(registry).version == 1


def test_champion_challenger_promotes_only_a_better_model_on_the_same_set(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    first = _register(tmp_path, registry, 0.80, tag="a")
    d1 = reg.champion_challenger(registry, first)
    assert d1.promoted and "first production model" in d1.reason
    assert reg.production(registry).version == 1

    worse = _register(tmp_path, registry, 0.78, tag="b")
    d2 = reg.champion_challenger(registry, worse)
    assert not d2.promoted
    assert "does not beat" in d2.reason and "0.7800" in d2.reason and "0.8000" in d2.reason
    assert reg.production(registry).version == 1

    tie = _register(tmp_path, registry, 0.80, tag="c")
    assert not reg.champion_challenger(registry, tie).promoted  # a tie keeps the champion

    better = _register(tmp_path, registry, 0.85, tag="d")
    d4 = reg.champion_challenger(registry, better, min_improvement=0.01)
    assert d4.promoted and d4.champion == 1
    record = reg.production_record(registry)
    assert record["version"] == 4 and record["previous"] == 1 and "beats" in record["reason"]
    log = reg.decisions(registry)
    compares = [d for d in log if d["action"] == "compare"]
    assert [d["promoted"] for d in compares] == [True, False, False, True]
    assert all(d["reason"] for d in log)


def test_the_champions_score_measured_by_the_caller_beats_the_one_recorded(tmp_path: Path):
    """The champion measured now (champion_metrics) decides, not its score on its card."""
    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.90, tag="a"))
    challenger = _register(tmp_path, registry, 0.85, tag="b")
    decision = reg.champion_challenger(registry, challenger, champion_metrics={"dice": 0.80})
    assert decision.promoted and decision.champion_value == pytest.approx(0.80)


def test_where_lower_is_better_only_a_lower_score_is_promoted(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.80, tag="a"))
    higher = _register(tmp_path, registry, 0.85, tag="b")
    assert not reg.champion_challenger(registry, higher, higher_is_better=False).promoted
    lower = _register(tmp_path, registry, 0.70, tag="c")
    decision = reg.champion_challenger(registry, lower, higher_is_better=False)
    assert decision.promoted and "lower is better" in decision.reason
    assert reg.production(registry).version == lower.version


def test_a_model_that_found_no_nucleus_on_the_evaluation_set_is_never_promoted(
    tmp_path: Path,
) -> None:
    """A training collapsed to all background scores 0 everywhere: the pipeline promoted it
    as the first production model, and segmented every image with it (0 nuclei)."""
    registry = tmp_path / "registry"
    blind = {"dice": 0.0, "aji": 0.0, "n_pred": 0.0, "n_true": 11.0}
    checkpoint = _checkpoint(tmp_path / "blind", weights=b"w-blind")
    version = reg.register(
        checkpoint, registry, metrics=blind, fingerprint_hash=None, config={}, eval_set_id="setA"
    )
    decision = reg.champion_challenger(registry, version, metric="aji")
    assert not decision.promoted and reg.production(registry) is None
    assert "found no nucleus in any image of eval set setA" in decision.reason
    # nor over a champion whose score is missing (NaN), which any other challenger beats
    champion = _register(tmp_path, registry, 0.8, tag="a")
    reg.promote(registry, "nuclei", champion.version, "first")
    decision = reg.champion_challenger(
        registry, version, metric="aji", champion_metrics={"aji": math.nan}
    )
    assert not decision.promoted and reg.production(registry).version == champion.version


def test_a_model_scored_on_a_set_without_annotated_nuclei_is_never_promoted(
    tmp_path: Path,
) -> None:
    """A test split whose masks are all empty (exported without their labels) scores a model
    that finds nothing 1.0 on every metric: it was promoted as the first production model,
    ``dice=1.0000``, on scores that say nothing of how it finds nuclei."""
    registry = tmp_path / "registry"
    empty_set = {"dice": 1.0, "aji": 1.0, "pq": 1.0, "n_pred": 0.0, "n_true": 0.0}
    checkpoint = _checkpoint(tmp_path / "empty", weights=b"w-empty")
    version = reg.register(
        checkpoint, registry, metrics=empty_set, fingerprint_hash=None, config={}, eval_set_id="e"
    )
    decision = reg.champion_challenger(registry, version, metric="aji")
    assert not decision.promoted and reg.production(registry) is None
    assert "no annotated nucleus" in decision.reason and "eval set e" in decision.reason


def test_a_rollback_by_hand_is_not_undone_by_the_next_comparison(tmp_path: Path) -> None:
    """An operator rolled production back from v2 to v1; the scheduled pipeline ran again,
    found the same weights (v2) still beating v1 and promoted it again, replacing the
    rollback and its reason without a word."""
    registry = tmp_path / "registry"
    first = _register(tmp_path, registry, 0.80, tag="a")
    reg.champion_challenger(registry, first)
    second = _register(tmp_path, registry, 0.85, tag="b")
    assert reg.champion_challenger(registry, second).promoted
    reg.promote(registry, "nuclei", 1, "rollback: v2 misses small nuclei on the new scanner")

    again = reg.champion_challenger(registry, second)
    assert not again.promoted and "by hand" in again.reason and "rollback" in again.reason
    record = reg.production_record(registry)
    assert record["version"] == 1 and record["reason"].startswith("rollback")
    # served again by hand, then replaced by a better model: compared as any other
    reg.promote(registry, "nuclei", 2, "fixed upstream: the scanner profile was wrong")
    third = _register(tmp_path, registry, 0.90, tag="c")
    assert reg.champion_challenger(registry, third).promoted
    assert "does not beat" in reg.champion_challenger(registry, second).reason


def test_a_comparison_logged_before_promotions_said_who_chose_them_is_no_rollback(
    tmp_path: Path,
) -> None:
    """A registry written before promotions recorded ``automatic``: v2 had replaced v1 by a
    comparison, yet v1, scored again on a new set and beating v2 there, was refused as
    'taken out of production by hand', quoting v2's 'beats production' reason."""
    import json

    registry = tmp_path / "registry"
    _register(tmp_path, registry, 0.80, tag="a")
    reg.promote(registry, "nuclei", 1, "first by hand")
    second = _register(tmp_path, registry, 0.85, tag="b")
    assert reg.champion_challenger(registry, second).promoted
    for path in (registry / "nuclei" / "decisions").glob("*.json"):  # as mlseg wrote them
        record = json.loads(path.read_text())
        record.pop("automatic", None)
        path.write_text(json.dumps(record))
    reg.record_evaluation(registry, "nuclei", 1, "new-set", {"dice": 0.9})
    reg.record_evaluation(registry, "nuclei", 2, "new-set", {"dice": 0.7})
    first = reg.show(registry, "nuclei", 1)  # with its score on the new set
    decision = reg.champion_challenger(registry, first, eval_set="new-set")
    assert decision.promoted and "by hand" not in decision.reason
    # an old rollback by hand (no compare before it) still holds
    reg.promote(registry, "nuclei", 2, "rollback: v1 misses small nuclei")
    for path in (registry / "nuclei" / "decisions").glob("*.json"):
        record = json.loads(path.read_text())
        record.pop("automatic", None)
        path.write_text(json.dumps(record))
    assert "by hand" in reg.champion_challenger(registry, first, eval_set="new-set").reason


def test_scores_on_different_eval_sets_are_never_compared(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    champion = _register(tmp_path, registry, 0.95, eval_set="old-set", tag="a")
    reg.champion_challenger(registry, champion)
    challenger = _register(tmp_path, registry, 0.80, eval_set="new-set", tag="b")
    with pytest.raises(reg.RegistryError, match="no dice on eval set new-set"):
        reg.champion_challenger(registry, challenger)
    assert reg.production(registry).version == 1
    # once the champion is evaluated on the new set, the comparison is fair
    reg.record_evaluation(registry, "nuclei", 1, "new-set", {"dice": 0.70})
    assert reg.show(registry, "nuclei", 1).metrics_on("new-set") == {"dice": 0.70}
    decision = reg.champion_challenger(registry, challenger)
    assert decision.promoted and decision.champion_value == pytest.approx(0.70)


def test_manual_promote_needs_a_reason_and_is_logged(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    _register(tmp_path, registry, 0.8, tag="a")
    _register(tmp_path, registry, 0.7, tag="b")
    with pytest.raises(reg.RegistryError, match="reason"):
        reg.promote(registry, "nuclei", 2, " ")
    reg.promote(registry, "nuclei", "v2", "rollback: v1 misses small nuclei on new scanner")
    assert reg.production(registry).version == 2
    assert reg.decisions(registry)[-1]["reason"].startswith("rollback")
    with pytest.raises(reg.RegistryError, match="no such model version"):
        reg.promote(registry, "nuclei", 9, "typo")
    with pytest.raises(reg.RegistryError, match="lower-case"):
        reg.production(registry, "Bad Name")


def test_two_promotions_at_once_take_turns(tmp_path: Path, monkeypatch) -> None:
    """A rollback by hand while a pipeline promoted: each read production.json before the
    other wrote it, both recorded v1 as the version they replaced, and the decisions' last
    promotion named v3 while production.json served v2 (3 of 20 runs of two processes)."""
    import threading

    registry = tmp_path / "registry"
    for tag in "abc":
        _register(tmp_path, registry, 0.8, tag=tag)
    reg.promote(registry, "nuclei", 1, "first")
    log = reg._log_decision
    other = threading.Thread(target=reg.promote, args=(registry, "nuclei", 3, "pipeline"))

    def logged_then_other_promotes(fs, root, name, record):
        log(fs, root, name, record)
        if record["version"] == 2:  # v2's promotion is between its log and its pointer
            other.start()
            other.join(0.5)

    monkeypatch.setattr(reg, "_log_decision", logged_then_other_promotes)
    reg.promote(registry, "nuclei", 2, "rollback")
    other.join(10)
    promotions = [(d["version"], d["previous"]) for d in reg.decisions(registry)]
    assert promotions == [(1, None), (2, 1), (3, 2)]
    assert reg.production_record(registry)["version"] == 3


def test_the_same_run_registered_twice_at_once_gets_one_version(tmp_path: Path, monkeypatch):
    """Three `mlseg models register` of one run started together gave nuclei@v1, v2 and v3,
    one set of weights under three versions: each looked for the weights before any had
    registered them. They take turns, and the later ones find the first's version."""
    import threading

    registry = tmp_path / "registry"
    run = _checkpoint(tmp_path / "run")
    scores = {"metrics": {"aji": 0.5}, "eval_set_id": "s", "fingerprint_hash": "fp"}
    other_got = []
    other = threading.Thread(
        target=lambda: other_got.append(reg.register_scores(run, registry, **scores))
    )
    look = reg.find_version

    def looked_then_other_registers(*args, **kwargs):
        found = look(*args, **kwargs)
        if not other.is_alive() and not other_got:  # between the look and the registration
            other.start()
            other.join(0.5)
        return found

    monkeypatch.setattr(reg, "find_version", looked_then_other_registers)
    first = reg.register_scores(run, registry, **scores)
    other.join(10)
    assert [v.tag for v in reg.list_models(registry)] == ["nuclei@v1"]
    assert first[0].version == other_got[0][0].version == 1
    assert [first[1], other_got[0][1]].count(True) == 1  # one registered, one found it


def test_a_registered_run_is_found_in_a_registry_one_may_only_read(
    tmp_path: Path, monkeypatch
) -> None:
    """`mlseg models register` of a run already registered with these scores, against a
    registry one may only read (a colleague's, mounted read-only), said 'already registered
    as nuclei@v1'; taking turns with other registrations, it failed instead ('cannot be
    written'), though it had nothing to write."""
    registry = tmp_path / "registry"
    run = _checkpoint(tmp_path / "run")
    scores = {"metrics": {"aji": 0.5}, "eval_set_id": "s", "fingerprint_hash": "fp"}
    v1, _ = reg.register_scores(run, registry, **scores)
    os_open = os.open

    def read_only(path, flags, *args, **kwargs):  # tests run as root: no mode stops them
        if Path(path).is_relative_to(registry) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert reg.register_scores(run, registry, **scores) == (v1, False)


def test_remote_registry_through_fsspec(tmp_path: Path) -> None:
    url = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    version = _register(tmp_path, url, 0.9)
    assert version.uri.startswith("memory://")
    reg.champion_challenger(url, version)
    assert reg.production(url).version == 1
    local = reg.fetch(reg.production(url), cache_dir=tmp_path / "cache")
    assert (local / "best.safetensors").read_bytes() == b"w-a"
    assert local.is_relative_to(tmp_path / "cache")


@pytest.mark.parametrize("edit", ["file-up", "file-absolute", "name-up"])
def test_a_card_edited_to_name_files_outside_its_version_writes_nothing_there(
    tmp_path: Path, edit: str
) -> None:
    """A shared bucket's card.json edited to name a file '../../x' (with that file and its
    sha256 beside it) or another model name: fetching it wrote outside the cache."""
    import hashlib

    import fsspec

    url = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    _register(tmp_path, url, 0.9)
    fs, root = fsspec.core.url_to_fs(url)
    base = f"{root}/nuclei/v1"
    card = json.loads(fs.cat_file(f"{base}/{reg.CARD}"))
    payload = b"echo pwned"
    outside = {"file-up": "../../../outside/evil.sh", "file-absolute": str(tmp_path / "evil.sh")}
    if edit in outside:
        fs.pipe_file(f"{base}/{outside[edit]}", payload)
        card["files"][outside[edit]] = hashlib.sha256(payload).hexdigest()
    else:
        card["name"] = "../../outside"
    fs.pipe_file(f"{base}/{reg.CARD}", json.dumps(card).encode())
    cache = tmp_path / "a" / "b" / "c" / "cache"
    with pytest.raises(reg.RegistryError, match="card.json: names .*not a file of nuclei/v1"):
        reg.fetch(reg.show(url, "nuclei", "latest"), cache_dir=cache)
    assert not (tmp_path / "a" / "outside").exists()
    assert not list(tmp_path.rglob("evil.sh"))


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe{}", b"[" * 100_000, b"[]", b'{"name": "nuclei", "version": 2}', b"SAME+"],
    ids=["not-utf8", "nested-too-deep", "a-list", "keys-missing", "unknown-key"],
)
def test_a_damaged_card_is_named_in_one_line_not_a_traceback(tmp_path: Path, content) -> None:
    """A registry shared by a team, or copied from another lab, with one card damaged or
    written by another tool: listing the models or showing that version names the card."""
    registry = tmp_path / "registry"
    _register(tmp_path, registry, 0.8, tag="a")
    v2 = _register(tmp_path, registry, 0.9, tag="b")
    card = Path(v2.uri) / reg.CARD
    if content == b"SAME+":
        content = json.dumps({**json.loads(card.read_text()), "signed_by": "x"}).encode()
    card.write_bytes(content)
    for call in (lambda: reg.list_models(registry), lambda: reg.show(registry, "nuclei", 2)):
        with pytest.raises(reg.RegistryError, match=r"nuclei/v2/card\.json: .*(JSON|card)"):
            call()
    assert reg.show(registry, "nuclei", 1).version == 1  # the other versions still serve


@pytest.mark.parametrize(
    "record",
    [
        {"metrics": {"aji": 0.7}},
        {"eval_set_id": "setB"},
        [1],
        {"eval_set_id": "setB", "metrics": 1},
    ],
    ids=["no-eval-set-id", "no-metrics", "a-list", "metrics-no-mapping"],
)
def test_a_damaged_evaluation_record_is_named_not_a_key_error(tmp_path: Path, record) -> None:
    """An evaluations/<set>.json without eval_set_id (cut short, edited by hand) ended
    list_models, and so `mlseg models list`, in a bare KeyError: 'eval_set_id'; it is a
    RegistryError naming the file, as for a damaged card."""
    registry = tmp_path / "registry"
    version = _register(tmp_path, registry, 0.8)
    reg.record_evaluation(registry, "nuclei", 1, "setB", {"aji": 0.7})
    path = Path(version.uri) / "evaluations" / "setB.json"
    path.write_text(json.dumps(record))
    for call in (lambda: reg.list_models(registry), lambda: reg.show(registry, "nuclei", 1)):
        with pytest.raises(
            reg.RegistryError, match=r"v1/evaluations/setB\.json: not an evaluation"
        ):
            call()


@pytest.mark.parametrize("pointer", [b'{"Version": 1}', b"[1]", b'{"version": "one"}'])
def test_a_production_pointer_naming_no_version_is_named_and_promote_repairs_it(
    tmp_path: Path, pointer: bytes
) -> None:
    """production.json edited by hand so that it names no version: serving the model,
    registering and even the promotion that repairs it ended in KeyError: 'version'."""
    registry = tmp_path / "registry"
    reg.promote(registry, "nuclei", _register(tmp_path, registry, 0.8, tag="a").version, "first")
    (registry / "nuclei" / reg.PRODUCTION).write_bytes(pointer)
    with pytest.raises(reg.RegistryError, match=r"production\.json: names no version.*promote"):
        reg.production(registry)
    with pytest.raises(reg.RegistryError, match=r"production\.json: names no version"):
        _register(tmp_path, registry, 0.9, tag="b")
    assert reg.promote(registry, "nuclei", 1, "repair").version == 1
    assert reg.production(registry).version == 1
    assert reg.production_record(registry)["previous"] is None


@pytest.mark.parametrize("named", ["absolute", "up"])
def test_a_stain_reference_named_outside_the_checkpoint_is_not_copied_into_the_registry(
    tmp_path: Path, named: str
) -> None:
    """A checkpoint folder someone sent, its meta.json naming a file elsewhere as the stain
    reference: registering it copied that file (a credentials file) into the registry."""
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("aws_secret_access_key=not-for-the-registry")
    ckpt = _checkpoint(tmp_path / "sent")
    reference = str(secret) if named == "absolute" else "../home/.aws/credentials"
    (ckpt / "meta.json").write_text(json.dumps({"stain_reference_file": reference}))
    with pytest.raises(reg.RegistryError, match="is not a file name beside best.safetensors"):
        reg.register(
            ckpt,
            tmp_path / "registry",
            metrics={},
            fingerprint_hash=None,
            config={},
            eval_set_id="s",
        )
    assert not list((tmp_path / "registry").rglob("credentials"))


def test_object_store_registry_has_no_folder_objects(tmp_path: Path, monkeypatch) -> None:
    """S3 (and DigitalOcean Spaces) holds no object for a folder, so s3fs cannot copy one:
    moving the staging folder recursively copied its files into v1 and then raised
    FileNotFoundError ('The specified key does not exist') for the folder itself, so every
    registration into s3://bucket/models failed. The card is copied last, once the files are
    there."""
    from fsspec.implementations.memory import MemoryFileSystem

    copied: list[str] = []
    memory_copy = MemoryFileSystem.cp_file

    def object_store_copy(self, path1, path2, **kwargs):
        if not self.isfile(path1):
            raise FileNotFoundError(f"{path1}: The specified key does not exist.")
        copied.append(self._strip_protocol(path2))
        return memory_copy(self, path1, path2, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cp_file", object_store_copy)
    url = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    version = _register(tmp_path, url, 0.9)
    assert version.version == 1 and reg.list_models(url)[0].version == 1
    assert copied[-1].endswith("/v1/card.json")
    assert sorted(p.rsplit("/", 1)[-1] for p in copied) == sorted([*version.files, "card.json"])


def test_a_listing_that_lags_behind_the_uploads_loses_no_weights(tmp_path, monkeypatch) -> None:
    """An object store's listing may lag behind its writes: the staging folder listed with
    its card but not the weights uploaded before it moved only the card and the JSON files
    into v1, the staging folder (weights in it) was removed, and register reported v1, a
    version every promotion then refused ('best.safetensors missing')."""
    from fsspec.implementations.memory import MemoryFileSystem

    memory_ls = MemoryFileSystem.ls

    def lagging_ls(self, path, detail=True, **kwargs):
        found = memory_ls(self, path, detail=detail, **kwargs)
        if ".staging-" not in path:
            return found
        return [
            e
            for e in found
            if not (e if isinstance(e, str) else e["name"]).endswith(".safetensors")
        ]

    monkeypatch.setattr(MemoryFileSystem, "ls", lagging_ls)
    url = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    version = _register(tmp_path, url, 0.9)
    monkeypatch.setattr(MemoryFileSystem, "ls", memory_ls)
    reg.promote(url, "nuclei", version.version, "first")  # checks every file of the card
    fetched = reg.fetch(reg.production(url), cache_dir=tmp_path / "cache")
    assert (fetched / "best.safetensors").read_bytes() == b"w-a"


def test_code_version_outside_a_checkout_is_the_commit_the_image_was_built_from(
    monkeypatch,
) -> None:
    """The worker image installs mlseg without .git (and without git): its model cards said
    "0.1.0", no commit, though the README says the card records the git commit."""
    import subprocess

    import mlseg

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("MLSEG_GIT_COMMIT", raising=False)
    assert reg.code_version() == mlseg.__version__
    monkeypatch.setenv("MLSEG_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert reg.code_version() == f"{mlseg.__version__}+g0123456789ab"


def test_the_card_names_the_code_that_trained_the_weights_not_the_one_registering(
    tmp_path: Path,
) -> None:
    """A model trained at one commit and registered with `mlseg models register` after an
    upgrade: its card, and `mlseg models which`, named the upgraded mlseg as its code, which
    never trained it. The card names the code of each stretch meta.json's trained_on lists."""
    here = reg.code_version()
    run = _checkpoint(tmp_path / "run")
    trained = [{"from_step": 0, "code": "0.0.9+g0123456789ab", "threads": 2}]
    (run / "meta.json").write_text(json.dumps({"trained_on": trained}))
    registry = tmp_path / "registry"
    card = json.loads(
        (Path(reg.register(run, registry, **_scores()).uri) / "card.json").read_text()
    )
    assert card["code_version"] == "0.0.9+g0123456789ab" != here
    # resumed on other code: both, in the order they trained
    resumed = [*trained, {"from_step": 5, "code": "0.1.0+gba9876543210"}]
    (run / "meta.json").write_text(json.dumps({"trained_on": resumed}))
    (run / "best.safetensors").write_bytes(b"weights-2")
    assert reg.register(run, registry, **_scores()).code_version == (
        "0.0.9+g0123456789ab, 0.1.0+gba9876543210"
    )
    # a checkpoint from before meta.json said: the code registering it, as before
    (run / "meta.json").write_text(json.dumps({"step": 10}))
    (run / "best.safetensors").write_bytes(b"weights-3")
    assert reg.register(run, registry, **_scores()).code_version == here


def _scores() -> dict:
    return {"metrics": {"aji": 0.5}, "fingerprint_hash": "fp", "config": {}, "eval_set_id": "s"}


def test_eval_set_id_follows_content_not_names(tmp_path: Path) -> None:
    def dataset(root: Path, stem: str, value: int) -> Path:
        image = np.full((16, 16, 3), value, np.uint8)
        labels = np.zeros((16, 16), np.int32)
        labels[4:8, 4:8] = 1
        write_image(root / "test" / "original" / f"{stem}.png", image)
        write_labels(root / "test" / "masks" / f"{stem}_mask.png", labels)
        return root

    a = reg.eval_set_id(dataset(tmp_path / "a", "x", 10))
    b = reg.eval_set_id(dataset(tmp_path / "b", "renamed", 10))
    c = reg.eval_set_id(dataset(tmp_path / "c", "x", 11))
    assert a == b != c
    # the pixel sizes evaluation resamples by are part of the set: the same tiles scored
    # at another size score otherwise
    (tmp_path / "b" / "manifest.csv").write_text("split,stem,pixel_size_um\ntest,renamed,0.5\n")
    sized = reg.eval_set_id(tmp_path / "b")
    (tmp_path / "b" / "manifest.csv").write_text("split,stem,pixel_size_um\ntest,renamed,0.25\n")
    assert len({a, sized, reg.eval_set_id(tmp_path / "b")}) == 3


def test_cli_lists_shows_and_promotes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlseg.cli import main

    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.8, tag="a"))
    _register(tmp_path, registry, 0.7, tag="b")
    assert main(["models", "list", "-r", str(registry)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("* nuclei@v1") and lines[2].startswith("  nuclei@v2")
    assert (
        main(["models", "promote", "nuclei", "2", "--reason", "rollback", "-r", str(registry)]) == 0
    )
    capsys.readouterr()
    assert main(["models", "show", "nuclei", "-r", str(registry)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["version"] == 2 and card["production"] and card["promotion_reason"] == "rollback"
    assert main(["models", "show", "nuclei@9", "-r", str(registry)]) != 0
    assert "no such model version" in capsys.readouterr().err


def test_a_score_that_is_not_a_number_is_never_promoted_nor_kept(tmp_path: Path) -> None:
    """NaN compares false: a NaN first model was promoted, and then no model could beat it."""
    registry = tmp_path / "registry"
    nan = _register(tmp_path, registry, float("nan"), tag="a")
    first = reg.champion_challenger(registry, nan)
    assert not first.promoted and "not promoted" in first.reason
    assert reg.production(registry) is None
    reg.promote(registry, "nuclei", nan.version, "by hand, before it was scored")
    scored = _register(tmp_path, registry, 0.8, tag="b")
    assert reg.champion_challenger(registry, scored).promoted


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_promote_refuses_a_version_whose_files_are_gone_or_changed(
    tmp_path: Path, damage: str
) -> None:
    """A rollback to a version whose weights were deleted or overwritten was recorded as in
    production: every scheduled run then failed, or served weights nobody evaluated."""
    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.8, tag="a"))
    v2 = _register(tmp_path, registry, 0.7, tag="b")
    weights = Path(v2.uri) / "best.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(b"other weights")
    with pytest.raises(reg.RegistryError, match=r"best\.safetensors (missing|changed)"):
        reg.promote(registry, "nuclei", 2, "rollback")
    assert reg.production(registry).version == 1
    assert [d["action"] for d in reg.decisions(registry)] == ["compare", "promote"]


def test_weights_changed_in_production_after_promotion_are_not_served(tmp_path: Path) -> None:
    """A local registry served its version folder as it was: weights overwritten there after
    promotion (a sync, a copy over the wrong folder) ran under the promoted version's tag."""
    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.8, tag="a"))
    (tmp_path / "registry" / "nuclei" / "v1" / "best.safetensors").write_bytes(b"w-other")
    with pytest.raises(reg.RegistryError, match=r"v1: best\.safetensors changed"):
        reg.fetch(reg.production(registry))


def test_a_deleted_versions_number_is_not_given_to_new_weights(tmp_path: Path) -> None:
    """With the production version's folder deleted, the next registration took its number,
    and the production pointer served the new, never compared weights."""
    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.8, tag="a"))
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.9, tag="b"))
    shutil.rmtree(registry / "nuclei" / "v2")
    assert _register(tmp_path, registry, 0.1, tag="c").version == 3
    with pytest.raises(reg.RegistryError):
        reg.production(registry)


def test_a_mistyped_name_or_a_deleted_production_version_is_named_with_the_fix(
    tmp_path: Path,
) -> None:
    """A mistyped model name was told to promote a version of it, and a production pointer
    to a deleted version said only 'v2: no such model version'."""
    registry = tmp_path / "registry"
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.8, tag="a"))
    reg.champion_challenger(registry, _register(tmp_path, registry, 0.9, tag="b"))
    with pytest.raises(reg.RegistryError, match=r"no model 'nucleus' there \(models: nuclei\)"):
        reg.show(registry, "nucleus")
    shutil.rmtree(registry / "nuclei" / "v2")
    with pytest.raises(reg.RegistryError, match=r"production is nuclei@v2, which is no longer"):
        reg.show(registry, "nuclei", "production")


def test_two_processes_registering_at_once_get_two_intact_versions(tmp_path: Path) -> None:
    """Two pipelines registering into one folder both took v1, copied their weights into it
    at once and left weights that were neither's under one card; each must get its own."""
    import subprocess
    import sys

    registry = tmp_path / "registry"
    weights = {tag: bytes([i]) * (8 << 20) for i, tag in enumerate("ab", start=1)}
    for tag, data in weights.items():
        _checkpoint(tmp_path / f"ckpt-{tag}", weights=data)
    script = (
        "import sys; from mlseg import registry as reg; "
        "reg.register(sys.argv[1], sys.argv[2], metrics={}, fingerprint_hash=None, "
        "config={}, eval_set_id='s')"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ckpt-{t}"), str(registry)])
        for t in weights
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    versions = reg.list_models(registry)
    assert sorted(v.version for v in versions) == [1, 2]
    served = sorted((Path(v.uri) / "best.safetensors").read_bytes() for v in versions)
    assert served == sorted(weights.values())
    for v in versions:
        assert reg._sha256(Path(v.uri) / "best.safetensors") == v.files["best.safetensors"]
    assert not list((registry / "nuclei").glob(".staging-*"))


def test_cli_list_shows_the_compared_metrics_and_a_readable_eval_set(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An evaluation's means start dice, iou, pixel_precision: the list showed those three,
    and 'pixel_precision=0.798' ran into the eval set id ('0.7985141f61c3c37337c')."""
    from mlseg.cli import main

    registry = tmp_path / "registry"
    means = {"dice": 0.8, "iou": 0.7, "pixel_precision": 0.798, "pixel_recall": 0.8, "aji": 0.6}
    reg.register(
        _checkpoint(tmp_path / "ckpt"),
        registry,
        metrics={**means, "pq": 0.5},
        fingerprint_hash=None,
        config={},
        eval_set_id="5141f61c3c37337c",
    )
    assert main(["models", "list", "-r", str(registry)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[-1] == "5141f61c3c37337c"
    assert "aji=0.600" in row and "pq=0.500" in row


class NoCredentialsError(Exception):
    """As botocore raises it through s3fs where no keys are set (botocore is not installed
    for the tests)."""

    __module__ = "botocore.exceptions"


@pytest.mark.parametrize(
    "fault",
    [
        NoCredentialsError("Unable to locate credentials"),
        PermissionError("The provided token has expired."),  # s3fs's ExpiredToken
    ],
)
def test_a_store_refusing_the_keys_is_named_with_what_to_check(
    tmp_path: Path, capsys, monkeypatch, fault
) -> None:
    """No keys, or keys that expired between two calls: `mlseg models list -r s3://...`
    ended in botocore's traceback, or in a PermissionError naming no file, and a worker
    fetching the production model in Python's, none naming the bucket or what to check."""
    from fsspec.implementations.memory import MemoryFileSystem

    from mlseg.cli import main

    url = f"memory://mlseg-test-{uuid.uuid4().hex}/models"
    version = _register(tmp_path, url, 0.9)
    reg.promote(url, "nuclei", 1, "first")

    def refuse(self, *args, **kwargs):
        raise fault

    # every call, as s3fs raises it (fsspec's isdir and isfile would say False)
    for method in ("ls", "info", "isdir", "isfile", "exists", "_open", "get_file", "put_file"):
        monkeypatch.setattr(MemoryFileSystem, method, refuse)
    assert main(["models", "list", "-r", url]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"error: {url}: ") and "AWS_ACCESS_KEY_ID" in said
    assert len(said.splitlines()) == 1
    with pytest.raises(reg.RegistryError, match="AWS_SECRET_ACCESS_KEY") as caught:
        reg.fetch(version, cache_dir=tmp_path / "cache")
    assert str(caught.value).startswith(version.uri)
    with pytest.raises(reg.RegistryError, match="have not expired"):
        _register(tmp_path, url, 0.95, tag="b")


def test_models_list_names_a_registry_folder_that_does_not_exist(tmp_path, capsys) -> None:
    """`models list -r registy` (a typo) said 'no models', as an empty registry would."""
    from mlseg.cli import main

    assert main(["models", "list", "-r", str(tmp_path / "registy")]) == 0
    assert "registy: no such folder" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["models", "list", "-r", str(tmp_path / "empty")]) == 0
    assert "no such folder" not in capsys.readouterr().out


def test_a_registry_path_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    """A mistyped registry (or one on another worker's volume) said 'model has no production
    version; promote one', sending the user to promote into an empty folder."""
    with pytest.raises(reg.RegistryError, match="no registry there"):
        reg.show(tmp_path / "regsitry", "nuclei", "production")
    registry = tmp_path / "registry"
    _register(tmp_path, registry, 0.8)
    with pytest.raises(reg.RegistryError, match="promote one"):
        reg.show(registry, "nuclei", "production")


def test_a_url_whose_filesystem_is_not_installed_is_a_registry_error(monkeypatch) -> None:
    """`-r s3://bucket/models` without s3fs ended in an ImportError traceback; every command
    prints one line naming the fix."""
    import fsspec

    def missing(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(reg.RegistryError, match=r"s3://bucket/models: Install s3fs"):
        reg.list_models("s3://bucket/models")


def test_a_registered_model_carries_its_stain_reference_and_profile(tmp_path, monkeypatch):
    """A run trained with a relative preprocess.stain_reference and profiles_file, registered,
    then used from another folder with both originals gone, segments and evaluates as its
    run folder did. The registry copied only the weights, config.json and meta.json: every
    image failed with 'refs/ref.png: preprocess.stain_reference image not found', and
    evaluate with 'lab.yaml: profiles file not found'."""
    import pandas as pd
    import torch

    from mlseg.config import get_profile, load_config
    from mlseg.evaluate import METRIC_COLUMNS, evaluate
    from mlseg.io import read_image
    from mlseg.model import load_model
    from mlseg.segment import model_identity, predict_labels, segment_folder
    from mlseg.synth import make_dataset
    from mlseg.train import fit

    torch.set_num_threads(2)
    lab = tmp_path / "lab"
    make_dataset(lab / "ds", n_train=4, n_test=2, size=96, kinds=("he",), seed=0)
    (lab / "refs").mkdir()
    shutil.copy(sorted((lab / "ds" / "train" / "original").iterdir())[0], lab / "refs/ref.png")
    (lab / "lab.yaml").write_text(
        "profiles:\n  lab:\n    stain: he\n    min_area_px: 4\n"
        "    preprocess: {stain_norm: macenko}\n"
    )
    monkeypatch.chdir(lab)
    tiny = {"encoder": "resnet18", "encoder_depth": 3, "patch_size": 64, "batch_size": 2}
    cfg = load_config(
        None,
        profile="lab",
        profiles_file="lab.yaml",
        preprocess={"stain_reference": "refs/ref.png"},
        train={**tiny, "warmup_steps": 1, "max_steps": 2, "val_every": 2},
    )
    fit(cfg, "ds", "run", progress=False)
    # its saved config still resumes it, as a run config: the paths in it are as given
    resumed = load_config("run/config.json", train={"max_steps": 3})
    assert fit(resumed, "ds", "run", progress=False).steps == 3
    version = reg.register(
        "run", tmp_path / "registry", metrics={}, fingerprint_hash=None, config=cfg, eval_set_id="s"
    )
    kept = {"best.safetensors", "config.json", "meta.json", "stain_reference.png"}
    assert set(version.files) == kept
    image = read_image(sorted((lab / "ds" / "test" / "original").iterdir())[0])
    he = get_profile("he")
    _, probs = predict_labels(load_model("run"), image, he)
    segment_folder("run", "ds/test/original", "seg", profile_name="he", progress=False)
    scores = evaluate("run", "ds", "eval", progress=False).per_image

    shutil.rmtree(lab / "refs")
    (lab / "lab.yaml").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = reg.fetch(version)
    loaded = load_model(model)
    assert (loaded.profile.name, loaded.profile.min_area_px) == ("lab", 4)
    _, moved = predict_labels(loaded, image, he)
    assert np.array_equal(moved, probs)
    # the copy is what the model normalises to: the published reference predicts otherwise
    plain = loaded.config.preprocess.model_copy(update={"stain_reference": None})
    config = loaded.config.model_copy(update={"preprocess": plain})
    default = type(loaded)(**{**loaded.__dict__, "config": config})
    assert not np.array_equal(predict_labels(default, image, he)[1], probs)
    result = segment_folder(
        model, lab / "ds/test/original", "seg", profile_name="he", progress=False
    )
    assert not result.failed and len(result.processed) == 2
    for labels in (lab / "seg").glob("*_labels.png"):
        assert (elsewhere / "seg" / labels.name).read_bytes() == labels.read_bytes()
    # and records the same model: its config names the reference where the folder now is
    models = [
        set(pd.read_csv(folder / "seg" / "summary.csv")["model"]) for folder in (lab, elsewhere)
    ]
    assert models[0] == models[1] and len(models[0]) == 1
    moved_scores = evaluate(model, lab / "ds", "eval", progress=False).per_image
    assert moved_scores["stem"].tolist() == scores["stem"].tolist()
    pd.testing.assert_frame_equal(moved_scores[list(METRIC_COLUMNS)], scores[list(METRIC_COLUMNS)])
    # an edited reference is another model: finished images are redone
    before = model_identity(loaded.path, loaded.config, loaded.meta)
    (model / "stain_reference.png").write_bytes(b"edited")
    assert model_identity(loaded.path, loaded.config, loaded.meta) != before


def test_a_registry_whose_disk_fills_is_named_not_a_staging_folder(tmp_path, monkeypatch):
    """A full disk while a version's files were copied raised Python's OSError naming
    'best.safetensors -> nuclei/.staging-<hex>/best.safetensors', a folder nobody asked for,
    with no word of what to do; the versions already there are kept, none half-made is."""
    from mlseg.errors import OutputError

    registry = tmp_path / "registry"
    v1 = _register(tmp_path, registry, 0.80, tag="a")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "sendfile", full)
    with pytest.raises(OutputError, match="free disk space or write elsewhere") as caught:
        _register(tmp_path, registry, 0.82, tag="b")
    said = str(caught.value)
    assert said.startswith(f"{registry / 'nuclei'}: cannot be written (no space left"), said
    assert ".staging" not in said
    assert sorted(p.name for p in (registry / "nuclei").iterdir()) == ["v1"]
    assert reg.show(registry, "nuclei", "latest") == v1
    monkeypatch.undo()
    assert _register(tmp_path, registry, 0.82, tag="b").version == 2


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A registry of two real checkpoints (v1 in production, v2 not) and the output folder
    of `mlseg segment` run with v2's weights from the training folder, not the registry."""
    from flow_helpers import disc_images, tiny_checkpoint

    from mlseg.cli import main

    root = tmp_path_factory.mktemp("which")
    registry = root / "registry"
    checkpoint = tiny_checkpoint(root / "runs" / "train")
    for weights, aji in ((tiny_checkpoint(root / "other", seed=1), 0.6), (checkpoint, 0.7)):
        metrics = {"aji": aji, "dice": 0.8, "pq": 0.5}
        reg.register(
            weights, registry, metrics=metrics, fingerprint_hash="fp-" + weights.name,
            config={}, eval_set_id="set-test",
        )  # fmt: skip
    reg.promote(registry, "nuclei", 1, "first")
    disc_images(root / "images", 1)
    argv = ["segment", str(checkpoint), str(root / "images"), str(root / "out"), "-p", "he"]
    assert main([*argv, "--no-progress"]) == 0
    return registry, root / "out", checkpoint


@pytest.mark.parametrize(
    "given",
    ["", "run.json", "img_000.json", "img_000_nuclei.parquet", "nuclei.parquet",
     "img_000_nuclei.geojson"],
)  # fmt: skip
def test_which_names_the_registered_version_that_made_an_output(segmented, given, capsys):
    """A table's record names the model by its weights' hash alone: which registered version
    (its training data, its test metrics) made it had to be found by comparing 16 hex digits
    with every card by hand. `mlseg models which` finds it from each kind of output."""
    from mlseg.cli import main

    registry, out, _ = segmented
    assert main(["models", "which", str(out / given), "-r", str(registry)]) == 0
    said = capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())["model"]
    assert said.splitlines()[0] == f"{out / given}: model {record}"
    assert "nuclei@v2 (registered, not in production)" in said and "nuclei@v1" not in said
    assert "fp-train" in said and "aji=0.700 dice=0.800 pq=0.500 on eval set set-test" in said
    assert "note:" not in said  # the registered config.json and meta.json made it
    # and `mlseg models list` shows the weights as the record names them
    assert main(["models", "list", "-r", str(registry)]) == 0
    listed = capsys.readouterr().out.splitlines()
    weights = record.split("+")[0].removeprefix("best.safetensors@")
    assert listed[2].startswith("  nuclei@v2") and listed[2].split()[2] == weights


def test_which_says_when_the_weights_ran_with_another_config(segmented, tmp_path, capsys):
    """The same weights run with their preprocessing edited are not the registered version."""
    from flow_helpers import disc_images

    from mlseg.cli import main

    registry, _, checkpoint = segmented
    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    config = json.loads((edited / "config.json").read_text())
    config["preprocess"]["equalize"] = "clahe"
    (edited / "config.json").write_text(json.dumps(config))
    disc_images(tmp_path / "images", 1)
    argv = ["segment", str(edited), str(tmp_path / "images"), str(tmp_path / "out"), "-p", "he"]
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["models", "which", str(tmp_path / "out"), "-r", str(registry)]) == 0
    said = capsys.readouterr().out
    assert "nuclei@v2" in said and "note: these weights, but not this version's config" in said


def test_which_says_when_no_registered_version_made_an_output(segmented, tmp_path, capsys):
    """A model used from its path and never registered, or a registry given wrongly."""
    from flow_helpers import disc_images, tiny_checkpoint

    from mlseg.cli import main

    registry, out, _ = segmented
    unregistered = tiny_checkpoint(tmp_path / "mine", seed=7)
    disc_images(tmp_path / "images", 1)
    argv = ["segment", str(unregistered), str(tmp_path / "images"), str(tmp_path / "o"), "-p", "he"]
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    table = tmp_path / "o" / "img_000_nuclei.parquet"
    assert main(["models", "which", str(table), "-r", str(registry)]) != 0
    err = capsys.readouterr().err
    weights = json.loads((tmp_path / "o" / "img_000.json").read_text())["model"].split("+")[0]
    assert err.startswith(f"error: {table}: no version in {registry} holds the weights {weights}")
    assert "never registered" in err and "-r (or MLSEG_REGISTRY)" in err
    assert main(["models", "which", str(out), "-r", str(tmp_path / "nowhere")]) != 0
    assert "no registry there" in capsys.readouterr().err


def test_which_names_a_file_that_holds_no_record(segmented, tmp_path, capsys):
    import pandas as pd

    from mlseg.cli import main

    registry, out, _ = segmented
    cut = tmp_path / "cut_nuclei.parquet"
    cut.write_bytes((out / "img_000_nuclei.parquet").read_bytes()[:200])
    (tmp_path / "cut.json").write_text('{"model": "best.safetensors@')
    pd.DataFrame({"area_px": [1]}).to_parquet(tmp_path / "foreign.parquet")
    for path, says in (
        (cut, "cannot be read"),
        (tmp_path / "cut.json", "cannot be read"),
        (tmp_path / "foreign.parquet", "holds no 'mlseg' record"),
        (out / "img_000_nuclei.csv", "holds no record of what made it"),
        (tmp_path, "no run.json"),
    ):
        assert main(["models", "which", str(path), "-r", str(registry)]) != 0
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and says in err and err.count("\n") == 1, err


def test_cli_registers_a_trained_run_with_the_scores_evaluate_gave_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """README's stages go train -> evaluate -> register, but only the pipeline flow could
    register: a user of the commands had a trained model and its scores and no way to put
    them in the registry that `mlseg models list|promote|which` read."""
    from mlseg.cli import main
    from mlseg.model import saved_config
    from mlseg.segment import model_identity

    run = _checkpoint(tmp_path / "runs" / "train")
    (run / "meta.json").write_text(json.dumps({"fingerprint_hash": "fp-of-train"}))
    ident = model_identity(run / "best.safetensors", saved_config(run), {"fingerprint_hash": "x"})

    def evaluation(folder: str, model_id: str = ident, split: str = "test") -> Path:
        out = tmp_path / folder
        out.mkdir()
        summary = {
            "model_id": model_id,
            "split": split,
            "eval_set_id": "set1",
            "means": {"dice": 0.81, "aji": 0.6, "pq": 0.55},
        }
        (out / "summary.json").write_text(json.dumps(summary))
        return out

    registry = str(tmp_path / "registry")
    assert main(["models", "register", str(run), str(evaluation("eval")), "-r", registry]) == 0
    assert "registered as nuclei@v1" in capsys.readouterr().out
    card = reg.show(registry, "nuclei", "1")
    assert card.metrics == {"dice": 0.81, "aji": 0.6, "pq": 0.55}
    assert (card.eval_set_id, card.fingerprint_hash) == ("set1", "fp-of-train")
    assert reg.production(registry, "nuclei") is None  # promoting is the user's call
    # again: the same version, not a copy
    assert main(["models", "register", str(run), str(tmp_path / "eval"), "-r", registry]) == 0
    assert "already registered as nuclei@v1" in capsys.readouterr().out
    assert [v.tag for v in reg.list_models(registry)] == ["nuclei@v1"]
    # scores of another model, or of the training split, are refused with the file named
    other = evaluation("other", model_id="best.safetensors@0123456789abcdef+config@0123456789ab")
    assert main(["models", "register", str(run), str(other), "-r", registry]) == 2
    assert f"{other / 'summary.json'}: scores the model" in capsys.readouterr().err
    trained_on = evaluation("train-split", split="train")
    assert main(["models", "register", str(run), str(trained_on), "-r", registry]) == 2
    assert "evaluate it on the test split" in capsys.readouterr().err
    assert main(["models", "register", str(run), str(tmp_path / "none"), "-r", registry]) == 2
    assert "give the --out folder of `mlseg evaluate`" in capsys.readouterr().err
    assert [v.tag for v in reg.list_models(registry)] == ["nuclei@v1"]
