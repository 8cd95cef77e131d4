"""End to end on a real Prefect server: deploy prefect.yaml, run deployments through a worker.

Starts ``prefect server start`` on loopback (own PREFECT_HOME, free port), creates the
process work pool of prefect.yaml, runs ``prefect deploy --all`` from the repository root,
starts a worker, triggers the ``segment-and-quantify`` and ``validate-dataset`` deployments on
small data, waits for ``Completed`` and checks the outputs and the artifacts through the
Prefect client. Every process it started is stopped afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flow_helpers import disc_images, tiny_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "mlseg-pool"
RUN_TIMEOUT_S = 150


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]
    data_dir: Path
    logs: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited ({server.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left after 15 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _cli(args: list[str], stack_env: dict[str, str], log: Path, timeout: float = 120) -> None:
    with log.open("a") as out:
        out.write(f"\n$ prefect {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=REPO,
            env=stack_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("e2e")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    data_dir = base / "data"
    data_dir.mkdir()
    logs = base / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # no 2 a.m. runs in a test
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLSEG_DATA_DIR": str(data_dir),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PREFECT_API_KEY", None)
    procs: list[subprocess.Popen] = []
    try:
        server_log = logs / "server.log"
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=base,
            env=env,
            stdout=server_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(server)
        _wait_healthy(api_url, server, server_log)
        _cli(["work-pool", "create", POOL, "--type", "process"], env, logs / "cli.log")
        _cli(["--no-prompt", "deploy", "--all"], env, logs / "cli.log", timeout=180)
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "2"],
            cwd=base,
            env=env,
            stdout=(logs / "worker.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        yield Stack(api_url, env, data_dir, logs)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _wait_final(client, run_ids: dict[str, object], logs: Path) -> dict[str, object]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    runs = {}
    while time.monotonic() < deadline:
        runs = {name: client.read_flow_run(rid) for name, rid in run_ids.items()}
        if all(r.state is not None and r.state.is_final() for r in runs.values()):
            return runs
        time.sleep(1)
    states = {n: (r.state.name if r.state else None) for n, r in runs.items()}
    worker = (logs / "worker.log").read_text()[-4000:]
    raise TimeoutError(f"flow runs not finished after {RUN_TIMEOUT_S} s: {states}\n{worker}")


def _artifact_keys(client, flow_run_id) -> set[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {a.key for a in found if a.key}


def test_deployments_run_on_a_real_server(stack: Stack, synth_dataset: Path) -> None:
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    inbox = stack.data_dir / "inbox"
    disc_images(inbox, 5)
    model = tiny_checkpoint(stack.data_dir / "model")
    with (
        temporary_settings({PREFECT_API_URL: stack.api_url}),
        get_client(sync_client=True) as client,
    ):
        # the deployments carry the profiles file as a parameter, and their schedules
        nightly = client.read_deployment_by_name("segment-and-quantify/nightly-he")
        shipped = yaml.safe_load((REPO / "mlseg" / "profiles.yaml").read_text())
        assert json.loads(nightly.parameters["profiles"]) == shipped
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]

        segment = run_deployment(
            "segment-and-quantify/nightly-he",
            parameters={
                "input_dir": "inbox",  # relative: under MLSEG_DATA_DIR on the worker
                "out_dir": "results/he",
                "model": str(model),
                "registry": None,
                "batch_size": 2,
                "workers": 2,
            },
            timeout=0,
        )
        validate = run_deployment(
            "validate-dataset/validate",
            parameters={"data_root": str(synth_dataset), "out_dir": "validation"},
            timeout=0,
        )
        runs = _wait_final(client, {"segment": segment.id, "validate": validate.id}, stack.logs)
        for name, run in runs.items():
            assert run.state.is_completed(), f"{name}: {run.state.name} {run.state.message}"

        out = stack.data_dir / "results" / "he"
        summary = (out / "summary.csv").read_text().splitlines()
        assert len(summary) == 1 + 5
        assert sorted(p.name for p in out.glob("img_*.json")) == [
            f"img_{i:03d}.json" for i in range(5)
        ]
        run_info = json.loads((out / "run.json").read_text())
        assert run_info["profile"]["name"] == "he"
        assert run_info["profile"]["version"] == shipped["profiles"]["he"]["version"]
        assert (out / "runs" / "history.csv").is_file()
        keys = _artifact_keys(client, segment.id)
        assert {"segment-summary", "segment-outputs", "segment-run-metrics"} <= keys

        assert (stack.data_dir / "validation" / "fingerprint.json").is_file()
        assert _artifact_keys(client, validate.id), "validate-dataset published no artifact"
