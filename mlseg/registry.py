"""Model registry: versioned checkpoints in a folder or bucket, with a production pointer.

A registry is a local path or any fsspec URL (``s3://bucket/models``, ``memory://reg``; for
DigitalOcean Spaces an ``s3://`` URL with the Spaces endpoint in ``storage_options``)::

    <registry>/<name>/v<N>/                     one immutable version
        <checkpoint files>                      weights, config.json, meta.json (as saved),
                                                the stain reference copy (where the run has one)
        card.json                               ModelVersion: metrics, data fingerprint hash,
                                                evaluation set id, code version (that trained
                                                it), creation time
        evaluations/<eval_set_id>.json          metrics measured later on other sets
    <registry>/<name>/production.json           which version serves, since when, and why
    <registry>/<name>/decisions/<time>-v<N>.json  every promotion and champion/challenger
                                                decision, with its reason (never rewritten)

``card.json`` is written last: a version without it is incomplete and ignored. A version is
assembled in a ``.staging-*`` folder and renamed to the highest number used plus one, so
on a local disk or share two registering at once get two versions; on an object store (no
rename) a registry has one writer at a time.

A challenger is promoted only if it beats the production model on the *same* evaluation set
(:func:`champion_challenger`); the evaluation set is identified by the content hash of its
images, masks and pixel sizes (:func:`eval_set_id`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import re
import subprocess  # nosec B404: only runs `git` with fixed arguments, see code_version
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlseg.errors import (
    MlsegError,
    ModelError,
    OutputError,
    cannot_write,
    staged_write_error,
    writes_named,
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^v(\d+)$")
#: The weights file and content hash at the start of a model as outputs record it
#: (:func:`mlseg.segment.model_identity`): ``best.safetensors@<16 hex>+config@...``.
MODEL_ID_RE = re.compile(r"^([^@+/]+)@([0-9a-f]{16,64})(?:\+|$)")
CARD = "card.json"
PRODUCTION = "production.json"
DEFAULT_NAME = "nuclei"
_EDITED = "the card was edited by hand or by someone else: register the checkpoint again"


class RegistryError(ModelError):
    """A registry, model name or version is missing or malformed."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version (the content of its ``card.json``).

    ``metrics`` were measured on the evaluation set ``eval_set_id`` at registration;
    ``evaluations`` maps further evaluation set ids to metrics recorded later.
    ``uri`` is where the version's files live (local path or fsspec URL).
    """

    name: str
    version: int
    uri: str
    created_at: str
    code_version: str
    fingerprint_hash: str | None
    eval_set_id: str | None
    metrics: dict[str, float]
    config: dict[str, Any]
    files: dict[str, str]  # file name -> sha256
    source: str = ""
    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.name}@v{self.version}"

    def metrics_on(self, eval_set: str) -> dict[str, float] | None:
        """Metrics measured on ``eval_set``, or ``None`` if never evaluated there."""
        if eval_set == self.eval_set_id:
            return dict(self.metrics)
        found = self.evaluations.get(eval_set)
        return dict(found) if found is not None else None

    def card(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "evaluations"}
        return json.loads(json.dumps(data, default=str))


@dataclass(frozen=True)
class Decision:
    """Outcome of a champion/challenger comparison (also written to ``decisions/``)."""

    promoted: bool
    name: str
    challenger: int
    champion: int | None
    metric: str
    challenger_value: float
    champion_value: float | None
    eval_set_id: str
    reason: str
    decided_at: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ----------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fs(registry: str | Path, storage_options: dict[str, Any] | None = None):
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(registry), **(storage_options or {}))
    except ImportError as err:  # fsspec names the package its protocol needs
        raise RegistryError(f"{registry}: {err} (pip install it beside mlseg)") from None
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _uri(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


#: What a store that refuses or cannot find the keys is told to check (s3fs's variables).
_KEYS_HINT = (
    "check the keys (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or storage_options), that "
    "they may read and write the bucket and have not expired, and the endpoint "
    "(FSSPEC_S3_ENDPOINT_URL for DigitalOcean Spaces)"
)


def _refused(err: BaseException) -> bool:
    """Whether ``err`` is a store refusing the keys or finding none, not mlseg's own error:
    s3fs raises a PermissionError naming no file for a denied, expired or unknown key, and
    botocore's own errors (no keys found, endpoint unreachable) as they are."""
    if isinstance(err, PermissionError):
        return err.filename is None
    return not isinstance(err, MlsegError) and any(
        c.__module__.startswith("botocore.") for c in type(err).__mro__
    )


def _names_the_store(func):
    """Raise a store's refusal inside ``func`` as a :class:`RegistryError` naming the
    registry (its ``registry`` argument, or the ``version``'s URI) and what to check: with
    no keys or expired ones, `mlseg models list -r s3://...` ended in botocore's
    traceback ('Unable to locate credentials'), naming neither the bucket nor the fix."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            given = signature.bind_partial(*args, **kwargs).arguments
            where = given.get("registry") or getattr(given.get("version"), "uri", "registry")
            if "://" not in str(where) or not _refused(err):  # a folder's error is its own
                raise
            raise RegistryError(
                f"{where}: the store could not be reached or refused access "
                f"({type(err).__name__}: {err}); {_KEYS_HINT}"
            ) from err

    return run


def check_name(name: str) -> str:
    """``name`` if it may name a model in a registry, else :class:`RegistryError` saying why."""
    if not NAME_RE.match(name):
        raise RegistryError(
            f"model name {name!r}: use lower-case letters, digits, '-' and '_' (at most 64)"
        )
    return name


def parse_version(version: int | str) -> int:
    """``3``, ``"3"``, ``"v3"`` or ``"v0003"`` -> ``3``."""
    if isinstance(version, int):
        return version
    text = str(version).strip().lower()
    match = VERSION_RE.match(text) or re.match(r"^(\d+)$", text)
    if not match:
        raise RegistryError(f"model version {version!r}: expected a number such as 3 or v3")
    return int(match.group(1))


def _read_json(fs, path: str) -> Any:
    with fs.open(path, "rb") as fh:
        data = fh.read()
    try:
        return json.loads(data.decode("utf-8"))
    # ValueError: not JSON, or not UTF-8; RecursionError: nested too deep to be one of ours
    except (ValueError, RecursionError) as err:
        raise RegistryError(
            f"{_uri(fs, path)}: cannot be read as JSON ({err}); the file was damaged or edited "
            "by hand"
        ) from None


def _write_json(fs, path: str, data: Any) -> None:
    payload = (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")
    if _is_local(fs):
        from mlseg.io import write_bytes

        write_bytes(path, payload)  # atomic rename: readers never see half a file
    else:
        fs.pipe_file(path, payload)  # one PUT: atomic on object stores


def _sha256(path: Path) -> str:
    from mlseg.io import file_digest  # OpenCV is imported only when files are hashed

    return file_digest(path, chars=None)


def code_version() -> str:
    """``mlseg`` version plus the git commit of its source tree (``+dirty`` if modified).

    An installed copy outside a checkout (the worker image) has no tree to ask: there the
    commit is ``MLSEG_GIT_COMMIT``, which the image is built with.
    """
    import mlseg

    version = mlseg.__version__
    here = Path(mlseg.__file__).resolve().parent

    # Fixed argument lists, no shell; `git` from PATH is intended (a label, not a security
    # decision), and any failure only drops the commit from the label.
    def git(*args: str) -> str:
        return subprocess.run(  # nosec B603 B607
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        # the package's own files must be tracked: mlseg installed into a virtualenv inside
        # another project's repository would otherwise be labelled with that project's commit
        git("ls-files", "--error-unmatch", "--", "__init__.py")
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        built = os.environ.get("MLSEG_GIT_COMMIT", "").strip()
        return f"{version}+g{built[:12]}" if built else version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}" if commit else version


#: The distributions whose releases change a segmentation's numbers: the network's
#: arithmetic, resampling and stain separation, watershed and labelling, measurements, reading.
NUMERIC_PACKAGES = (
    "torch",
    "segmentation-models-pytorch",
    "timm",
    "numpy",
    "scipy",
    "scikit-image",
    "opencv-python-headless",
    "pandas",
    "tifffile",
    "imagecodecs",
    "pillow",
)


def package_versions() -> dict[str, str | None]:
    """Python's and each of :data:`NUMERIC_PACKAGES`' installed version (None: not
    installed), as a run records them beside :func:`code_version`."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{n: installed(n) for n in NUMERIC_PACKAGES}}


def eval_set_id(
    root: str | Path, split: str = "test", cfg=None, pixel_size_um: float | None = None
) -> str:
    """Content hash (16 hex) of a dataset split's images, masks and known pixel sizes,
    independent of file names; ``pixel_size_um``: every image's, in place of its own.

    Two evaluations are comparable only when this id is equal: same pixels, same masks, and
    each image segmented at the same scale (a corrected ``manifest.csv`` resamples the
    images differently, and the scores move with it).
    """
    from mlseg.dataset import list_pairs

    pairs = list_pairs(root, split, cfg, strict=False)
    if not pairs:
        raise RegistryError(f"{root}: split {split!r} has no images to evaluate on")
    # a size only when one is known, so a set without pixel sizes keeps its earlier id
    sizes = [p.pixel_size_um if pixel_size_um is None else pixel_size_um for p in pairs]
    items = sorted(
        f"{_sha256(p.image)}:{_sha256(p.mask) if p.mask is not None else '-'}"
        + (f":{float(um)!r}" if um is not None else "")
        for p, um in zip(pairs, sizes, strict=True)
    )
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- reading


def _versions(fs, root: str, name: str) -> list[int]:
    base = f"{root}/{name}"
    if not fs.isdir(base):
        return []
    found = []
    for entry in fs.ls(base, detail=False):
        match = VERSION_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match and fs.isfile(f"{base}/{match.group(0)}/{CARD}"):
            found.append(int(match.group(1)))
    return sorted(found)


def _load(fs, root: str, name: str, version: int) -> ModelVersion:
    base = f"{root}/{name}/v{version}"
    try:
        card = _read_json(fs, f"{base}/{CARD}")
    except FileNotFoundError:
        raise RegistryError(
            f"{_uri(fs, base)}: no such model version; see `mlseg models list`"
        ) from None
    evaluations = {}
    if fs.isdir(f"{base}/evaluations"):
        for entry in fs.ls(f"{base}/evaluations", detail=False):
            if entry.endswith(".json"):
                record = _read_json(fs, entry)
                # a record cut short or edited by hand ended `mlseg models list` in KeyError
                if not (
                    isinstance(record, dict)
                    and isinstance(record.get("eval_set_id"), str)
                    and isinstance(record.get("metrics"), dict)
                ):
                    raise RegistryError(
                        f"{_uri(fs, entry)}: not an evaluation record (a JSON object with "
                        "eval_set_id and metrics); the file was damaged or edited by hand: "
                        "remove it, and evaluate the model on that set again"
                    )
                evaluations[record["eval_set_id"]] = record["metrics"]
    _check_card(card, name, version, _uri(fs, base))
    card["uri"] = _uri(fs, base)
    try:
        return ModelVersion(**card, evaluations=evaluations)
    except TypeError as err:  # a key missing or unknown
        raise RegistryError(f"{card['uri']}/{CARD}: not a model card ({err}); {_EDITED}") from None


def _check_card(card: Any, name: str, version: int, uri: str) -> None:
    """Refuse a card that is no JSON object, names another model or version than the folder
    it lives in (``uri``), or a file that is not a plain name in that folder: :func:`fetch`
    copies each file to ``<cache>/<name>/v<N>-<key>/<file>``, so a card edited in a shared
    bucket (a file ``../../../.bashrc``, a name ``../x``) wrote wherever it said on every
    worker."""
    if not isinstance(card, dict) or not isinstance(card.get("files", {}), dict):
        raise RegistryError(f"{uri}/{CARD}: not a model card (a JSON object); {_EDITED}")
    files = card.get("files")
    odd = [f for f in files if Path(f).name != f or f in (".", "..")] if files else []
    if card.get("name") != name or card.get("version") != version or odd:
        what = ", ".join(map(repr, odd)) if odd else f"{card.get('name')!r} v{card.get('version')}"
        raise RegistryError(
            f"{uri}/{CARD}: names {what}, not a file of {name}/v{version}; {_EDITED}"
        )


@_names_the_store
def model_names(registry: str | Path, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the models in ``registry`` that have at least one complete version."""
    fs, root = _fs(registry, storage_options)
    if not fs.isdir(root):
        return []
    names = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if NAME_RE.match(name) and _versions(fs, root, name):
            names.append(name)
    return sorted(names)


@_names_the_store
def list_models(
    registry: str | Path,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[ModelVersion]:
    """Every complete version (of ``name``, or of all models), oldest first per name."""
    fs, root = _fs(registry, storage_options)
    names = [check_name(name)] if name else model_names(registry, storage_options)
    return [_load(fs, root, n, v) for n in names for v in _versions(fs, root, n)]


@_names_the_store
def show(
    registry: str | Path,
    name: str,
    version: int | str = "production",
    storage_options: dict[str, Any] | None = None,
) -> ModelVersion:
    """One version: a number (``3``/``v3``), ``"latest"`` or ``"production"``."""
    fs, root = _fs(registry, storage_options)
    check_name(name)
    if not fs.isdir(root):  # a wrong path, not a model waiting for its first promotion
        raise RegistryError(
            f"{_uri(fs, root)}: no registry there; check the path (-r, MLSEG_REGISTRY, or the "
            f"registry parameter: relative paths are under MLSEG_DATA_DIR on a worker)"
        )
    if not _versions(fs, root, name):  # a mistyped name, not a model waiting for a promotion
        known = ", ".join(model_names(registry, storage_options)) or "none"
        raise RegistryError(f"{_uri(fs, root)}: no model {name!r} there (models: {known})")
    if version == "production":
        current = production(registry, name, storage_options)
        if current is None:
            raise RegistryError(
                f"{_uri(fs, root)}: model {name!r} has no production version; "
                f"promote one with `mlseg models promote {name} VERSION --reason ...`"
            )
        return current
    if version == "latest":
        return _load(fs, root, name, _versions(fs, root, name)[-1])
    return _load(fs, root, name, parse_version(version))


@_names_the_store
def production(
    registry: str | Path, name: str = DEFAULT_NAME, storage_options: dict[str, Any] | None = None
) -> ModelVersion | None:
    """The version currently in production, or ``None`` if none was promoted yet."""
    fs, root = _fs(registry, storage_options)
    pointer = f"{root}/{check_name(name)}/{PRODUCTION}"
    if not fs.isfile(pointer):
        return None
    number = _pointed_version(fs, pointer, name)
    if not fs.isfile(f"{root}/{name}/v{number}/{CARD}"):
        raise RegistryError(
            f"{_uri(fs, pointer)}: production is {name}@v{number}, which is no longer in the "
            f"registry; promote another with `mlseg models promote {name} VERSION --reason ...`"
        )
    return _load(fs, root, name, number)


def _pointed_version(fs, pointer: str, name: str) -> int:
    """The version number the production pointer ``pointer`` names. One edited by hand that
    names none (no ``version``, or not a number) raises :class:`RegistryError` saying how
    to repair it: read as it was, every run that serves the model, and the promotion that
    would repair it, ended in Python's ``KeyError: 'version'``, naming no file."""
    record = _read_json(fs, pointer)
    number = record.get("version") if isinstance(record, dict) else None
    if isinstance(number, str) and number.strip().isdigit():
        number = int(number)
    if not isinstance(number, int) or isinstance(number, bool):
        raise RegistryError(
            f"{_uri(fs, pointer)}: names no version (its 'version' is {number!r}); the file "
            f"was damaged or edited by hand: promote the version to serve with `mlseg models "
            f"promote {name} VERSION --reason ...`"
        )
    return number


@_names_the_store
def production_record(
    registry: str | Path, name: str = DEFAULT_NAME, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The production pointer: ``version``, ``promoted_at``, ``reason``, ``previous``."""
    fs, root = _fs(registry, storage_options)
    pointer = f"{root}/{check_name(name)}/{PRODUCTION}"
    return _read_json(fs, pointer) if fs.isfile(pointer) else None


@_names_the_store
def decisions(
    registry: str | Path, name: str = DEFAULT_NAME, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every recorded decision about ``name``, oldest first."""
    fs, root = _fs(registry, storage_options)
    base = f"{root}/{check_name(name)}/decisions"
    if not fs.isdir(base):
        return []
    return [_read_json(fs, p) for p in sorted(fs.ls(base, detail=False)) if p.endswith(".json")]


#: What to do where the model cache under ``XDG_CACHE_HOME`` ran out of space.
_CACHE_FULL = (
    "free disk space there, or set XDG_CACHE_HOME to a folder on a disk with room (the model "
    "cache goes under it), then run again"
)


@_names_the_store
def fetch(
    version: ModelVersion,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """A local folder holding the version's checkpoint files (``mlseg.model.load_model`` reads it).

    Local registries return the version folder itself; remote ones are downloaded once into
    ``cache_dir/<name>/v<N>-<hash of the version's URI and files>`` (default
    ``$XDG_CACHE_HOME/mlseg/models``, ``~/.cache/mlseg/models`` where it is not set).
    Either way every file is checked against the sha256 its card recorded.
    """
    fs, path = _fs(version.uri, storage_options)
    if _is_local(fs):
        # weights overwritten in the version folder after promotion were served under its tag
        _check_files(fs, path, version)
        return Path(path)
    under_xdg = cache_dir is None
    if cache_dir is None:
        # where pip, torch hub and matplotlib cache too: a worker whose home is read-only
        # (a service account, a container) points them all elsewhere with one variable
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache_dir = cache_dir / "mlseg" / "models"
    cache = Path(cache_dir)
    # keyed by where the version lives (v1 of two registries are two models) and by the
    # files its card names: a model registered again from scratch at the same URL left the
    # first v1's best.safetensors beside the new v1's last.safetensors, and the loader,
    # preferring best, served the old weights under the new card
    files = json.dumps(sorted(version.files.items()))
    key = hashlib.sha256(f"{version.uri}\n{files}".encode()).hexdigest()[:12]
    target = cache / version.name / f"v{version.version}-{key}"
    complete = all(
        (target / f).is_file() and _sha256(target / f) == sha for f, sha in version.files.items()
    )
    if not complete:
        hint = "the model cache goes under XDG_CACHE_HOME: set it to a writable folder"
        with writes_named(target, hint if under_xdg else None):
            target.mkdir(parents=True, exist_ok=True)
        for fname, sha in version.files.items():
            from mlseg.io import atomic_path

            try:
                with atomic_path(target / fname) as tmp:
                    fs.get_file(f"{path}/{fname}", str(tmp))
                    if _sha256(tmp) != sha:
                        raise RegistryError(
                            f"{version.uri}/{fname}: checksum mismatch; re-register"
                        )
            except OutputError as err:
                # a full disk said "write elsewhere", and the cache is moved only by
                # XDG_CACHE_HOME, which no word named
                if not under_xdg or err.cause is None:
                    raise
                full = err.cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                said = cannot_write(target, err.cause, _CACHE_FULL if full else hint)
                raise said or err from err
    return target


# ----------------------------------------------------------------------------- writing


def checkpoint_files(checkpoint: str | Path) -> list[Path]:
    """The files of a checkpoint worth serving: weights (``best.safetensors``, else
    ``last.safetensors``: the names :func:`mlseg.model.load_model` reads), ``config.json``,
    ``meta.json``, and the run's copy of its stain reference image where it has one."""
    path = Path(checkpoint)
    if path.is_dir():
        for stem in ("best", "last"):
            if (path / f"{stem}.safetensors").is_file():
                path = path / f"{stem}.safetensors"
                break
        else:
            raise RegistryError(
                f"{checkpoint}: no best.safetensors or last.safetensors; train a model first"
            )
    if path.suffix != ".safetensors" or not path.is_file():
        raise RegistryError(f"{checkpoint}: not a checkpoint (.safetensors file or its folder)")
    if path.stem not in ("best", "last"):
        raise RegistryError(
            f"{path}: a registered model is loaded from best.safetensors or last.safetensors; "
            f"copy the weights to {path.parent / 'best.safetensors'} and register that"
        )
    missing = [n for n in ("config.json", "meta.json") if not (path.parent / n).is_file()]
    if missing:
        raise RegistryError(f"{path.parent}: {', '.join(missing)} missing beside {path.name}")
    files = [path, path.parent / "config.json", path.parent / "meta.json"]
    # the run's copy of its stain reference (mlseg.model.REFERENCE_KEY): every prediction
    # is normalised to it
    try:
        meta = json.loads(files[2].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"{files[2]}: cannot be read as JSON ({err})") from None
    reference = meta.get("stain_reference_file") if isinstance(meta, dict) else None
    if reference:
        # the run's own copy is a file beside the weights; a name reaching outside the folder
        # ('/home/me/.aws/credentials', '../x') copied that file into the registry
        if not isinstance(reference, str) or Path(reference).name != reference:
            raise RegistryError(
                f"{files[2]}: stain reference {reference!r} is not a file name beside "
                f"{path.name}; mlseg saves its copy as stain_reference.<ext> in the folder"
            )
        if not (path.parent / reference).is_file():
            raise RegistryError(
                f"{path.parent}: {reference} missing beside {path.name}; meta.json names it "
                "as the stain reference the model normalises to"
            )
        files.append(path.parent / reference)
    return files


@_names_the_store
def register(
    checkpoint: str | Path,
    registry: str | Path,
    *,
    metrics: dict[str, float],
    fingerprint_hash: str | None,
    config: dict[str, Any] | Any,
    eval_set_id: str | None,
    name: str = DEFAULT_NAME,
    storage_options: dict[str, Any] | None = None,
) -> ModelVersion:
    """Copy a checkpoint into the registry as the next version of ``name``.

    ``checkpoint`` is a ``.safetensors`` weights file or a checkpoint folder (its
    ``best.safetensors``, else ``last.safetensors``); the weights are copied with the
    ``config.json``, ``meta.json`` and stain reference copy beside them (not the optimiser
    state), each hashed on the card. ``metrics`` are
    the evaluation means on the set ``eval_set_id``; ``config`` is the run's config (a
    pydantic model or a dict); ``fingerprint_hash`` identifies the training data. The version
    is not promoted: see :func:`champion_challenger` and :func:`promote`.
    """
    check_name(name)
    files = checkpoint_files(checkpoint)
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    trained_with = _training_code(files[2])
    fs, root = _fs(registry, storage_options)
    # files go to a folder of this writer's own, then take the next free number whole: two
    # writers copying into one v<N> left weights that were neither's under one card
    staging = f"{root}/{name}/.staging-{uuid.uuid4().hex}"
    # named as the model's folder: a registry one may only read (a colleague's, under
    # umask 022) failed with '.staging-<hex>: permission denied', a name nobody gave
    with writes_named(f"{root}/{name}"):
        fs.makedirs(staging, exist_ok=True)
    try:
        hashes = {}
        for path in files:
            hashes[path.name] = _sha256(path)
            fs.put_file(str(path), f"{staging}/{path.name}")
        while True:
            number = _next_number(fs, root, name)
            base = f"{root}/{name}/v{number}"
            version = ModelVersion(
                name=name,
                version=number,
                uri=_uri(fs, base),
                created_at=_now(),
                code_version=trained_with or code_version(),
                fingerprint_hash=fingerprint_hash,
                eval_set_id=eval_set_id,
                metrics={k: float(v) for k, v in metrics.items() if _is_number(v)},
                config=json.loads(json.dumps(config, default=str)),
                files=hashes,
                source=str(files[0].resolve()),
            )
            _write_json(fs, f"{staging}/{CARD}", version.card())
            if _claim(fs, staging, base, [*hashes, CARD]):
                return version
    except (OSError, OutputError) as err:
        said = staged_write_error(err, staging, f"{root}/{name}")
        if said is None:
            raise
        raise said from err
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)


def register_evaluated(
    checkpoint: str | Path,
    evaluation: str | Path,
    registry: str | Path,
    name: str = DEFAULT_NAME,
    storage_options: dict[str, Any] | None = None,
) -> tuple[ModelVersion, bool]:
    """Register a training run with the scores ``mlseg evaluate`` gave it, as the pipeline
    registers its own (``mlseg models register``); not promoted.

    ``evaluation`` is the evaluation's folder or its ``summary.json``; its model must be
    ``checkpoint``'s (weights, and the config and meta that shape predictions) and its split
    ``test``. Weights already registered under ``name`` keep their version, with these
    scores recorded where their evaluation set is new. Returns ``(version, new)``.
    """
    from mlseg.model import saved_config, saved_meta
    from mlseg.segment import model_identity

    weights = checkpoint_files(checkpoint)[0]
    summary_path = Path(evaluation)
    if summary_path.is_dir():
        summary_path = summary_path / "summary.json"
    if not summary_path.is_file():
        raise RegistryError(
            f"{summary_path}: not found; give the --out folder of `mlseg evaluate` on this "
            "model (its summary.json)"
        )
    summary = _read_json_file(summary_path)
    keys = ("model_id", "split", "eval_set_id", "means")
    if not isinstance(summary, dict) or any(k not in summary for k in keys):
        raise RegistryError(
            f"{summary_path}: not an evaluation summary (needs {', '.join(keys)}); run "
            "`mlseg evaluate` on the model and give its --out folder"
        )
    meta = saved_meta(weights.parent)
    ours = model_identity(weights, saved_config(weights.parent), meta)
    if summary["model_id"] != ours:
        raise RegistryError(
            f"{summary_path}: scores the model {summary['model_id']}, not {weights} "
            f"({ours}); run `mlseg evaluate {weights.parent} DATASET --out NEW_FOLDER` and "
            "register with that folder"
        )
    if summary["split"] != "test":
        raise RegistryError(
            f"{summary_path}: scores the {summary['split']!r} split, which the model may have "
            "trained on; evaluate it on the test split (mlseg evaluate without --split)"
        )
    means = summary["means"] if isinstance(summary["means"], dict) else {}
    return register_scores(
        weights,
        registry,
        metrics=means,
        eval_set_id=str(summary["eval_set_id"]),
        fingerprint_hash=meta.get("fingerprint_hash"),
        name=name,
        storage_options=storage_options,
    )


def register_scores(
    checkpoint: str | Path,
    registry: str | Path,
    *,
    metrics: dict[str, float],
    eval_set_id: str,
    fingerprint_hash: str | None,
    name: str = DEFAULT_NAME,
    storage_options: dict[str, Any] | None = None,
) -> tuple[ModelVersion, bool]:
    """Register ``checkpoint``'s weights with their scores on ``eval_set_id`` once: weights
    already registered under ``name`` keep their version, with the scores recorded where
    the evaluation set is new to it. Returns ``(version, new)``."""
    found = find_version(registry, checkpoint, name, storage_options)
    if found is not None and found.metrics_on(eval_set_id) is not None:
        # nothing to write, so no lock to take: a registry one may only read (a colleague's,
        # mounted read-only) answers that the run is registered, as it did before the lock
        return found, False
    fs, root = _fs(registry, storage_options)
    # one at a time: two registering the same run at once (two pipeline runs, two shells)
    # each found it unregistered, and its weights got two versions
    with _one_at_a_time(fs, root, check_name(name), ".register.lock"):
        found = find_version(registry, checkpoint, name, storage_options)
        if found is not None:
            if found.metrics_on(eval_set_id) is None:
                found = record_evaluation(
                    registry, name, found.version, eval_set_id, metrics, storage_options
                )
            return found, False
        config = _read_json_file(checkpoint_files(checkpoint)[0].parent / "config.json")
        version = register(
            checkpoint,
            registry,
            metrics=metrics,
            fingerprint_hash=fingerprint_hash,
            config=config,
            eval_set_id=eval_set_id,
            name=name,
            storage_options=storage_options,
        )
    return version, True


def _training_code(meta_path: Path) -> str | None:
    """The mlseg code (:func:`code_version`) each stretch of training ran, as the checkpoint's
    ``meta.json`` lists them under ``trained_on``, in order (``None`` where it lists none).
    A model registered after an upgrade was carded with the upgraded code, which never
    trained it."""
    meta = _read_json_file(meta_path)
    stretches = meta.get("trained_on") if isinstance(meta, dict) else None
    codes = [s.get("code") for s in stretches or () if isinstance(s, dict)]
    codes = [c for c in dict.fromkeys(codes) if isinstance(c, str) and c]
    return ", ".join(codes) or None


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path}: cannot be read as JSON ({err})") from None


def _next_number(fs, root: str, name: str) -> int:
    """One above every number ``name`` has used: its complete versions, and the versions its
    production pointer and decisions name. A deleted version's number passed to the next
    registration, which the production pointer still naming it then served, unpromoted."""
    used = _versions(fs, root, name)
    pointer = f"{root}/{name}/{PRODUCTION}"
    if fs.isfile(pointer):
        used.append(_pointed_version(fs, pointer, name))
    if fs.isdir(f"{root}/{name}/decisions"):
        for path in fs.ls(f"{root}/{name}/decisions", detail=False):
            match = re.search(r"-v(\d+)\.json$", path)
            if match:
                used.append(int(match.group(1)))
    return max(used, default=0) + 1


def _claim(fs, staging: str, base: str, names: list[str]) -> bool:
    """Move the complete ``staging`` folder (its files ``names``, the card last) to ``base``;
    False if another writer holds that number. On a local disk or share the rename is atomic
    and fails on a folder with files, so two writers never share a version; an object store
    has no rename, and there the registry needs one writer at a time."""
    if not _is_local(fs):
        if fs.exists(f"{base}/{CARD}"):
            return False
        if fs.exists(base):  # left by a registration that died before its card
            fs.rm(base, recursive=True)
        # file by file, card last: a recursive move also copies the folder itself, which an
        # object store holds no object for (s3fs: "The specified key does not exist"). The
        # names written, not a listing of the folder: one that lagged behind the uploads
        # moved the card without the weights, which the staging folder's removal then lost
        for fname in sorted(names, key=lambda n: n == CARD):
            fs.mv(f"{staging}/{fname}", f"{base}/{fname}")
        return True
    try:
        os.rename(staging, base)
        return True
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if not fs.exists(f"{base}/{CARD}"):
        # left by a registration that died before its card: moved aside whole (atomic) and
        # removed, never removed in place, where another writer may just have claimed it
        stale = f"{staging}-stale"
        with contextlib.suppress(FileNotFoundError):
            os.rename(base, stale)
            fs.rm(stale, recursive=True)
    return False


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@_names_the_store
def find_version(
    registry: str | Path,
    checkpoint: str | Path,
    name: str = DEFAULT_NAME,
    storage_options: dict[str, Any] | None = None,
) -> ModelVersion | None:
    """The registered version of ``name`` holding these exact weights with the settings
    that shape their predictions (:func:`mlseg.segment.model_identity`), if any.

    Lets a rerun of a pipeline reuse its version instead of registering a duplicate. The
    same weights with their config.json edited (another preprocessing) are another model:
    found as the version registered without it, their scores went on that version's card.
    """
    from mlseg.model import saved_config, saved_meta
    from mlseg.segment import model_identity

    weights = checkpoint_files(checkpoint)[0]
    digest = _sha256(weights)
    ours = None
    for version in list_models(registry, name, storage_options):
        if version.files.get(weights.name) != digest:
            continue
        if ours is None:
            ours = model_identity(weights, saved_config(weights.parent), saved_meta(weights.parent))
        if _identity(version, weights.name, storage_options) == ours:
            return version
    return None


@_names_the_store
def made_by(
    registry: str | Path, model_id: str, storage_options: dict[str, Any] | None = None
) -> list[tuple[ModelVersion, bool]]:
    """The registered versions (of every model name) holding the weights that ``model_id``
    names, as an output's record gives it (:func:`mlseg.segment.model_identity`:
    ``best.safetensors@<16 hex>+config@<hash>...``), each with whether the version's
    identity is the record's whole: False where the same weights ran with another
    config.json, meta.json or stain reference than those registered (or were recorded by an
    mlseg that hashed them otherwise); whole matches first, ``[]`` where no version holds them."""
    fs, root = _fs(registry, storage_options)
    if not fs.isdir(root):  # a wrong path, which lists as a registry without the model
        raise RegistryError(
            f"{_uri(fs, root)}: no registry there; check the path (-r or MLSEG_REGISTRY; "
            "relative paths are read from here)"
        )
    named = MODEL_ID_RE.match(model_id)
    if not named:
        raise RegistryError(f"model {model_id!r}: names no weights file and content hash")
    weights, digest = named.groups()
    found = [
        v
        for v in list_models(registry, None, storage_options)
        if v.files.get(weights, "").startswith(digest)
    ]
    matches = [(v, _identity(v, weights, storage_options) == model_id) for v in found]
    return sorted(matches, key=lambda match: not match[1])  # whole matches first


def _identity(version: ModelVersion, weights: str, storage_options: dict[str, Any] | None) -> str:
    """:func:`mlseg.segment.model_identity` of a version's ``weights`` as a run serving it
    records it (its files checked against the card, and fetched where remote)."""
    from mlseg.model import saved_config, saved_meta
    from mlseg.segment import model_identity

    folder = fetch(version, storage_options=storage_options)
    return model_identity(folder / weights, saved_config(folder), saved_meta(folder))


@_names_the_store
def record_evaluation(
    registry: str | Path,
    name: str,
    version: int | str,
    eval_set: str,
    metrics: dict[str, float],
    storage_options: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record metrics of an existing version measured on another evaluation set."""
    fs, root = _fs(registry, storage_options)
    number = parse_version(version)
    _load(fs, root, check_name(name), number)  # must exist
    record = {
        "eval_set_id": eval_set,
        "metrics": {k: float(v) for k, v in metrics.items() if _is_number(v)},
        "recorded_at": _now(),
    }
    _write_json(fs, f"{root}/{name}/v{number}/evaluations/{eval_set}.json", record)
    return _load(fs, root, name, number)


def _log_decision(fs, root: str, name: str, record: dict[str, Any]) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    _write_json(fs, f"{root}/{name}/decisions/{stamp}-v{record['version']}.json", record)


def _check_files(fs, base: str, version: ModelVersion) -> None:
    """Refuse a version whose files are missing or differ from the sha256 its card recorded:
    served, it would fail every run, or run weights nobody evaluated."""
    problems = []
    for fname, sha in version.files.items():
        path = f"{base}/{fname}"
        if not fs.isfile(path):
            problems.append(f"{fname} missing")
            continue
        with fs.open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if digest != sha:
            problems.append(f"{fname} changed since registration (checksum mismatch)")
    if problems:
        raise RegistryError(
            f"{version.uri}: {'; '.join(problems)}; {version.tag} cannot be served: promote "
            f"another version, or register the checkpoint again"
        )


@_names_the_store
def promote(
    registry: str | Path,
    name: str,
    version: int | str,
    reason: str,
    storage_options: dict[str, Any] | None = None,
    *,
    automatic: bool = False,
) -> ModelVersion:
    """Make ``version`` the production model of ``name``; the reason is recorded, and whether
    a person chose it or :func:`champion_challenger` did (``automatic``). Its files are
    checked against the card's sha256 first (a rollback to deleted weights is refused)."""
    if not reason or not reason.strip():
        raise RegistryError("promote: give a reason (it is recorded in the registry)")
    fs, root = _fs(registry, storage_options)
    number = parse_version(version)
    target = _load(fs, root, check_name(name), number)
    _check_files(fs, f"{root}/{name}/v{number}", target)
    pointer = f"{root}/{name}/{PRODUCTION}"
    with _one_at_a_time(fs, root, name, ".production.lock"):
        previous = None
        if fs.isfile(pointer):
            # a pointer that names no version is what this promotion repairs
            with contextlib.suppress(RegistryError):
                previous = _pointed_version(fs, pointer, name)
        record = {
            "version": number,
            "promoted_at": _now(),
            "reason": reason.strip(),
            "previous": previous,
            "automatic": automatic,
        }
        _log_decision(fs, root, name, {"action": "promote", **record})
        _write_json(fs, pointer, record)
    return target


@contextlib.contextmanager
def _one_at_a_time(fs, root: str, name: str, lock_name: str):
    """Hold what ``lock_name`` guards of ``name`` (``.production.lock``: its promotions;
    ``.register.lock``: its registrations) to one at a time on a local disk or share; an
    object store has one writer at a time. Two promotions at once (a rollback by hand while
    a pipeline promoted) each read the pointer before the other wrote it: both recorded the
    same previous version, and the decisions' last promotion named another version than
    the one production.json served."""
    if not _is_local(fs):
        yield
        return
    from filelock import FileLock

    lock = FileLock(f"{root}/{name}/{lock_name}")
    with writes_named(f"{root}/{name}"):  # a read-only registry: the model's folder, named
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@_names_the_store
def champion_challenger(
    registry: str | Path,
    challenger: ModelVersion,
    *,
    metric: str = "dice",
    min_improvement: float = 0.0,
    higher_is_better: bool = True,
    champion_metrics: dict[str, float] | None = None,
    eval_set: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Decision:
    """Promote ``challenger`` only if it beats production on one evaluation set.

    The set is ``eval_set`` (default: the challenger's registration set); both scores are
    on it. The challenger's comes from its card or a recorded evaluation
    (:func:`record_evaluation`); the champion's from ``champion_metrics`` (measured by the
    caller on that set) or what the registry recorded for it there. A missing score raises
    :class:`RegistryError` asking for that evaluation (scores on different sets are never
    compared). A tie keeps the champion. A challenger that found no nucleus in any image of
    the set (``n_pred`` 0 where ``n_true`` is not) is not promoted, not even as the first
    production model, nor is one scored on a set without annotated nuclei (``n_true`` 0,
    where finding nothing scores 1.0). A version that a person took out of production
    (``mlseg models promote`` of another: a rollback) is not promoted again by a comparison,
    or a pipeline rerun that registers the same weights would undo the rollback. The
    decision and its reason are written to the registry either way.
    """
    eval_set = eval_set or challenger.eval_set_id
    if not eval_set:
        raise RegistryError(f"{challenger.tag}: registered without an evaluation set id")
    scores = challenger.metrics_on(eval_set)
    if scores is None:
        raise RegistryError(
            f"{challenger.tag} has no metrics on eval set {eval_set}; evaluate it there and "
            f"record_evaluation before comparing"
        )
    fs, root = _fs(registry, storage_options)
    value = _metric(scores, metric, challenger.tag)
    champion = production(registry, challenger.name, storage_options)
    unscored = not math.isfinite(value)  # a NaN beats nothing, and nothing would beat it
    better = "higher" if higher_is_better else "lower"
    # a model that finds nothing scores 0, which is a first production model's only bar
    blind = scores.get("n_pred") == 0 and scores.get("n_true", 0) > 0
    # a set of empty masks scores a model that finds nothing 1.0 on every metric
    unlabelled = scores.get("n_true") == 0
    if (unscored or blind or unlabelled) and (
        champion is None or champion.version != challenger.version
    ):
        promoted, champ_value = False, None
        reason = f"{challenger.tag} has no {metric} on eval set {eval_set} ({value}); not promoted"
        if unlabelled:
            reason = (
                f"eval set {eval_set} holds no annotated nucleus, so {challenger.tag}'s "
                f"{metric} ({value:g}) says nothing of how it finds nuclei; not promoted: "
                "evaluate it on a test split whose masks mark nuclei"
            )
        elif blind:
            reason = (
                f"{challenger.tag} found no nucleus in any image of eval set {eval_set}, which "
                f"holds {scores['n_true']:g} nuclei per image; not promoted"
            )
    elif champion is None:
        promoted, champ_value = True, None
        reason = (
            f"first production model: {challenger.tag} {metric}={value:.4f} on eval set {eval_set}"
        )
    elif champion.version == challenger.version:
        promoted, champ_value = False, value
        reason = f"{challenger.tag} is already in production"
    elif rollback := replaced_by_hand(
        registry, challenger.name, challenger.version, storage_options
    ):
        promoted, champ_value = False, None
        reason = (
            f"{challenger.tag} was taken out of production by hand on {rollback['promoted_at']} "
            f"(v{rollback['version']}: {rollback['reason']}); not promoted again by a "
            f"comparison: promote it by hand to serve it again"
        )
    else:
        measured = champion_metrics or champion.metrics_on(eval_set)
        if measured is None:
            raise RegistryError(
                f"production {champion.tag} has no {metric} on eval set {eval_set}; evaluate it "
                f"there and pass champion_metrics (or record_evaluation) before comparing"
            )
        champ_value = _metric(measured, metric, champion.tag)
        gain = (value - champ_value) if higher_is_better else (champ_value - value)
        promoted = gain > min_improvement or not math.isfinite(champ_value)
        verdict = "beats" if promoted else "does not beat"
        reason = (
            f"{challenger.tag} {metric}={value:.4f} {verdict} production {champion.tag} "
            f"{metric}={champ_value:.4f} on eval set {eval_set} ({better} is better, "
            f"required margin {min_improvement:g})"
        )
    decision = Decision(
        promoted=promoted,
        name=challenger.name,
        challenger=challenger.version,
        champion=champion.version if champion else None,
        metric=metric,
        challenger_value=value,
        champion_value=champ_value,
        eval_set_id=eval_set,
        reason=reason,
        decided_at=_now(),
    )
    _log_decision(
        fs,
        root,
        challenger.name,
        {"action": "compare", "version": challenger.version, **decision.as_dict()},
    )
    if promoted:
        promote(
            registry, challenger.name, challenger.version, reason, storage_options, automatic=True
        )
    return decision


@_names_the_store
def replaced_by_hand(
    registry: str | Path, name: str, version: int, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The promotion record by which a person last took ``version`` out of production (a
    rollback), or ``None``: never served, still served, served again since, or replaced by
    a comparison. A record from before promotions said who chose them is a comparison's
    where a comparison that promoted with its reason was logged before it, else a person's."""
    last, compared = None, set()
    for record in decisions(registry, name, storage_options):
        if record.get("action") == "compare" and record.get("promoted"):
            compared.add((record.get("version"), record.get("reason")))
        if record.get("action") != "promote":
            continue
        automatic = record.get(
            "automatic", (record.get("version"), record.get("reason")) in compared
        )
        if record.get("version") == version:
            last = None  # served again
        elif record.get("previous") == version:
            last = None if automatic else record
    return last


def _metric(metrics: dict[str, float], metric: str, tag: str) -> float:
    if metric not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise RegistryError(f"{tag}: no metric {metric!r} recorded (recorded: {known})")
    return float(metrics[metric])
