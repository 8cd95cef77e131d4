"""What the deploy workflow runs for a change (infra/mlseg_infra/deploy_plan.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlseg_infra.deploy_plan import IMAGE_INPUTS, _matches, plan

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "mlseg_infra" / "deploy_plan.py"


def test_profile_change_alone_redeploys_flows_without_rebuilding_the_image():
    assert plan(["mlseg/profiles.yaml"]) == {"image": False, "infra": False, "flows": True}
    assert plan(["prefect.yaml", "mlseg/profiles.yaml"])["image"] is False


def test_code_change_rebuilds_the_image_and_redeploys_flows():
    assert plan(["mlseg/profiles.yaml", "mlseg/quantify.py"]) == {
        "image": True,
        "infra": False,
        "flows": True,
    }
    assert plan(["flows/segment.py"])["image"] is True
    assert plan(["Dockerfile"])["image"] is True


def test_infra_change_updates_the_stack_only():
    assert plan(["infra/Pulumi.prod.yaml"]) == {"image": False, "infra": True, "flows": False}
    assert plan(["infra/docker-entrypoint.sh"]) == {"image": True, "infra": False, "flows": True}


@pytest.mark.parametrize("path", ["docs/deploy.md", "tests/test_io.py", "bench/speed.py"])
def test_changes_outside_image_infra_and_flows_deploy_nothing(path):
    assert plan([path]) == {"image": False, "infra": False, "flows": False}


def test_script_prints_github_outputs():
    run = subprocess.run(
        [sys.executable, str(SCRIPT)],
        input="mlseg/profiles.yaml\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert run.stdout.splitlines() == ["image=false", "infra=false", "flows=true"]
    everything = subprocess.run(
        [sys.executable, str(SCRIPT), "--all"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert everything.stdout.splitlines() == ["image=true", "infra=true", "flows=true"]


def test_every_file_the_dockerfile_copies_triggers_a_rebuild():
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert sources, "no COPY in Dockerfile"
    for source in sources:
        path = source.rstrip("/")
        sample = path if "." in Path(path).name else f"{path}/module.py"  # a file or a folder
        assert _matches(sample, IMAGE_INPUTS), (
            f"{source} is copied into the image but not in IMAGE_INPUTS"
        )
