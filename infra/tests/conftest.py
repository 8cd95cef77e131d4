"""Makes `mlseg_infra` (infra/) and the test harness importable under any pytest import mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

for path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from infra_harness import StackRun, run_stack  # noqa: E402


@pytest.fixture(scope="module")
def dev_run() -> StackRun:
    return run_stack("dev")


@pytest.fixture(scope="module")
def prod_run() -> StackRun:
    return run_stack("prod")
