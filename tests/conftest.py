"""Shared fixtures. Prefect runs against a throwaway home; slow tests need --run-slow."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    # Before any test imports prefect: no analytics, no writes to the user's Prefect home,
    # ~/.prefect or the one PREFECT_HOME names (the demo's: task results, memo_store.toml).
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    home = tempfile.mkdtemp(prefix="mlseg-prefect-home-")
    os.environ["PREFECT_HOME"] = home
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Prefect's console handler writes to the sys.stderr of the moment its logging is set up
    # (at the first `import flows.*`): set up inside a test with capsys, it kept that test's
    # stream, closed once the test ended, and a later flow's log line failed the flow run
    # (RecursionError through log_prints). Set up here, it writes to the session's stream.
    from prefect.logging.configuration import setup_logging

    setup_logging()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (config.getoption("--run-slow") or os.environ.get("MLSEG_RUN_SLOW") == "1"):
        skip = pytest.mark.skip(reason="slow: run with --run-slow or MLSEG_RUN_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device here")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_warn_once() -> None:
    """Each test starts with ``mlseg.errors.warn_once`` forgetting what it said, so a test
    that expects a once-per-run warning sees it whatever ran before."""
    from mlseg.errors import warn_once

    warn_once.cache_clear()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Torch's CPU thread count as it was before each test, whatever the test or its
    fixtures set (``torch.set_num_threads`` is process-wide): a file's ``set_num_threads(1)``
    went on for every later file, so a test ran at 1, 2 or all the cores depending on which
    file ran before it. Only where torch is imported already (not imported for this)."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


#: Environment variables mlseg and the flows read: a worker's or a deploy job's settings
#: (MLSEG_GIT_COMMIT is set in the image) must not change what a test sees.
MLSEG_ENVIRONMENT = (
    "MLSEG_DASK_ADDRESS",
    "MLSEG_DATA_DIR",
    "MLSEG_GIT_COMMIT",
    "MLSEG_REGISTRY",
    "MLSEG_TASK_RUNNER",
)


@pytest.fixture(autouse=True)
def _no_mlseg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the caller's ``MLSEG_*`` settings; a test that needs one
    sets it with ``monkeypatch.setenv``."""
    for name in MLSEG_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def harness():
    """Flows run against one temporary Prefect server (``prefect_test_harness``) for the whole
    session: its start costs 18 s of CPU (50 s on a busy 2-core machine), paid once rather than
    in each module that runs flows. Tests read their own runs back by flow run id."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (contract layout), built once per session. Do not modify."""
    from mlseg.synth import make_dataset

    root = tmp_path_factory.mktemp("synth") / "ds"
    return make_dataset(root, n_train=6, n_test=3, size=96, seed=0)


@pytest.fixture
def leaked_dataset(synth_dataset: Path, tmp_path: Path) -> Path:
    """A copy of ``synth_dataset`` with a test image and its mask copied into train under
    another name: training alone takes it, validation fails it (no_train_test_leakage)."""
    import shutil

    data = tmp_path / "leaked"
    shutil.copytree(synth_dataset, data)
    image = sorted((data / "test" / "original").iterdir())[0]
    shutil.copy(image, data / "train" / "original" / f"again{image.suffix}")
    shutil.copy(
        data / "test" / "masks" / f"{image.stem}_mask.png",
        data / "train" / "masks" / "again_mask.png",
    )
    return data


# --------------------------------------------------------------------------------------------
# Data validation (inventory, expectation suites, validate flow): tiny nuclei datasets.


def _nuclei_pair(rng, size: int = 48):
    """``(size, size, 3) uint8`` pink noise with three dark-purple disks + ``uint16`` labels."""
    import numpy as np
    from skimage.draw import disk

    image = np.empty((size, size, 3), np.uint8)
    image[:] = (230, 180, 210)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint16)
    for i in range(1, 4):
        rr, cc = disk(tuple(rng.integers(8, size - 8, 2)), 5, shape=labels.shape)
        labels[rr, cc] = i
        image[rr, cc] = (90, 60, 140)
    return image, labels


@pytest.fixture
def ticking(monkeypatch: pytest.MonkeyPatch):
    """``ticking(step_s=25)``: the progress lines of the test's run (every ``ProgressLog``)
    read a clock that moves ``step_s`` seconds at each look, so that a test sees at once the
    line a minute of a long run in a job's log. The class itself is clocked, and restored
    after the test: a module's own name for it, replaced instead, stayed replaced where a
    module first imported during the test had bound the clocked one (a later test's quick
    quantify then said "2 min elapsed")."""
    from mlseg.progress import ProgressLog

    def tick(step_s: int = 25) -> None:
        ticks = iter(range(0, 10_000_000, step_s))
        init = ProgressLog.__init__

        def clocked(self, *args, **kwargs) -> None:
            init(self, *args, **{"clock": lambda: float(next(ticks)), **kwargs})

        monkeypatch.setattr(ProgressLog, "__init__", clocked)

    return tick


@pytest.fixture
def task_logs_at_info():
    """Prefect's task runs log at INFO, as a deployment logs them (the tests log at WARNING),
    set and restored with ``setLevel``, which clears the loggers' cached answers: the level
    set as an attribute left those of an earlier test, and a flow's first tasks' lines were
    dropped until some library's ``setLevel`` cleared them."""
    import logging

    logger = logging.getLogger("prefect.task_runs")
    before = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(before)


@pytest.fixture
def nuclei_pair():
    """``nuclei_pair(rng, size=48) -> (image, labels)``: one distinct image per call."""
    return _nuclei_pair


@pytest.fixture
def nuclei_dataset(tmp_path: Path):
    """Factory ``(name="ds", n_train=3, n_test=2, size=48, seed=0) -> root`` of a contract-layout
    dataset under ``tmp_path`` (images ``<split><i>.png``, masks ``<split><i>_mask.png``)."""
    import numpy as np

    from mlseg.io import write_image, write_labels

    def make(name: str = "ds", n_train: int = 3, n_test: int = 2, size: int = 48, seed: int = 0):
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for split, n in (("train", n_train), ("test", n_test)):
            (root / split / "original").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image, labels = _nuclei_pair(rng, size)
                write_image(root / split / "original" / f"{split}{i}.png", image)
                write_labels(root / split / "masks" / f"{split}{i}_mask.png", labels)
        return root

    return make
