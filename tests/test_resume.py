"""Kill ``segment-and-quantify`` half-way, rerun it: same outputs as one clean run, and the
images finished before the kill are not computed again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from flow_helpers import disc_images, tiny_checkpoint

# A real Prefect server and a flow-run process that is killed: ~40 s on 2 shared cores.
pytestmark = pytest.mark.e2e

N_IMAGES = 10
KILL_AFTER = 3  # finished images


@pytest.fixture
def api_url(harness):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _outputs(out: Path) -> dict[str, bytes]:
    """Every per-image output, timing fields removed from the JSON summaries."""
    files = {}
    for path in sorted(out.glob("img_*")):
        if path.suffix == ".json":
            summary = json.loads(path.read_text())
            for key in ("seconds", "finished_at"):
                summary.pop(key)
            files[path.name] = json.dumps(summary, sort_keys=True).encode()
        else:
            files[path.name] = path.read_bytes()
    return files


def _summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.csv").drop(columns=["seconds", "finished_at"])


def test_killed_run_resumes_to_the_same_outputs(api_url, tmp_path) -> None:
    from flows.segment import segment_and_quantify

    inbox = tmp_path / "inbox"
    disc_images(inbox, N_IMAGES, size=128)
    model = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "flows.segment", str(inbox), str(out)]
    command += ["--model", str(model), "--batch-size", "2", "--workers", "1"]
    # stderr to a file: a pipe nobody reads stalls a chatty child once 64 KiB are waiting
    log = tmp_path / "flow.stderr"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("img_*.json"))) < KILL_AFTER:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the flow did not get going in 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up, as a crash or an OOM kill
        proc.wait(timeout=30)
    finished = sorted(p.stem for p in out.glob("img_*.json"))
    assert KILL_AFTER <= len(finished) < N_IMAGES, "killed too late to test a resume"
    assert not (out / "summary.csv").exists()
    written = [f"{stem}.json" for stem in finished]
    for stem in finished:
        written += json.loads((out / f"{stem}.json").read_text())["outputs"].values()
    mtimes = {name: (out / name).stat().st_mtime_ns for name in written}

    resumed = segment_and_quantify(str(inbox), str(out), model=str(model), batch_size=2, workers=1)
    # the killed run recorded none of its images, so this run counts them as its own (its
    # history row holds every image), but does not compute them again
    assert set(resumed["processed"]) == {f"img_{i:03d}" for i in range(N_IMAGES)}
    assert resumed["skipped"] == []
    after = {name: (out / name).stat().st_mtime_ns for name in mtimes}
    assert after == mtimes, "finished images were written again"

    clean = tmp_path / "clean"
    segment_and_quantify(str(inbox), str(clean), model=str(model), batch_size=2, workers=1)
    assert _outputs(out) == _outputs(clean)
    pd.testing.assert_frame_equal(_summary(out), _summary(clean))
