"""Worker user data: valid cloud-config (checked by cloud-init itself), secrets kept apart."""

from __future__ import annotations

import email
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from infra_harness import FAKE_PREFECT_KEY, SECRET_VALUES, make_settings, run_stack, stack_config
from mlseg_infra.cloud_init import combine, render_public_config, render_secret_config

CLOUD_INIT = shutil.which("cloud-init")
needs_cloud_init = pytest.mark.skipif(
    CLOUD_INIT is None,
    reason="`cloud-init` is not installed: `apt-get install -y cloud-init` (Debian package)",
)
# cloud-init's own merge code, run by the interpreter it is installed for.
_MERGE = """
import json, sys
from cloudinit import mergers, util
from cloudinit.handlers.cloud_config import DEF_MERGERS
merged = {}
for payload in json.load(sys.stdin):
    part = util.load_yaml(payload)
    merged = mergers.construct(mergers.dict_extract_mergers(part) or DEF_MERGERS).merge(merged, part)
print(json.dumps(merged))
"""


def _parts(user_data: str) -> list[str]:
    message = email.message_from_string(user_data)
    assert message.get_content_type() == "multipart/mixed"
    parts = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config"] * 2
    return [p.get_payload() for p in parts]


@pytest.fixture(scope="module")
def user_data(dev_run) -> str:
    (droplet,) = dev_run.of("Droplet")
    return droplet.inputs["userData"]


def _schema_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "user-data.yaml"
    path.write_text(text)
    return subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_cloud_init
@pytest.mark.parametrize("gpu", [False, True])
def test_public_part_passes_cloud_init_schema(tmp_path, gpu):
    size = "gpu-h100x1-80gb" if gpu else "s-2vcpu-4gb"
    text = render_public_config(make_settings(gpu=gpu, droplet_size=size))
    checked = _schema_check(tmp_path, text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_cloud_init
def test_secret_part_passes_cloud_init_schema(tmp_path, user_data):
    checked = _schema_check(tmp_path, _parts(user_data)[1])
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_cloud_init
def test_schema_check_catches_a_broken_config(tmp_path):
    broken = render_public_config(make_settings()).replace("permissions:", "mode:", 1)
    assert _schema_check(tmp_path, broken).returncode != 0


def test_user_data_sent_to_the_droplet_is_the_rendered_template(user_data):
    public, _ = _parts(user_data)
    settings_run = stack_config("dev")
    assert public == render_public_config(
        make_settings(
            admin_cidrs=tuple(settings_run["adminCidrs"]),
            bucket_name=settings_run["bucketName"],
        )
    )


def test_public_part_contains_no_secret(user_data):
    public, secret = _parts(user_data)
    assert not any(value in public for value in SECRET_VALUES)
    assert all(value in secret for value in SECRET_VALUES)  # they reach the droplet here


def test_secret_part_only_writes_root_only_files(user_data):
    secret = yaml.safe_load(_parts(user_data)[1])
    assert set(secret) == {"merge_how", "write_files"}
    for entry in secret["write_files"]:
        assert entry["permissions"] == "0600" and entry["owner"] == "root:root"
    env = next(e for e in secret["write_files"] if e["path"] == "/etc/mlseg/secrets.env")
    assert f"PREFECT_API_KEY={FAKE_PREFECT_KEY}\n" in env["content"]


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
@needs_cloud_init
def test_cloud_init_merges_both_parts_without_losing_files(tmp_path, user_data):
    merged = subprocess.run(
        ["/usr/bin/python3", "-c", _MERGE],
        input=json.dumps(_parts(user_data)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    config = json.loads(merged.stdout)
    paths = [f["path"] for f in config["write_files"]]
    assert {"/etc/mlseg/secrets.env", "/root/.docker/config.json"} <= set(paths)
    # every file of both parts, once: a list merge that replaced by index ("replace") kept
    # the secret part's files in place of the public part's first ones
    parts = [yaml.safe_load(payload) for payload in _parts(user_data)]
    assert sorted(paths) == sorted(f["path"] for part in parts for f in part["write_files"])
    assert "/etc/systemd/system/mlseg-worker.service" in paths
    assert config["runcmd"] and config["mounts"]
    checked = _schema_check(tmp_path, "#cloud-config\n" + yaml.safe_dump(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_worker_service_runs_the_stack_image_for_the_work_pool():
    text = render_public_config(make_settings(work_pool="gpu-pool", image_tag="abc123"))
    config = yaml.safe_load(text)
    files = {f["path"]: f["content"] for f in config["write_files"]}
    unit = files["/etc/systemd/system/mlseg-worker.service"]
    assert "registry.digitalocean.com/mlseg/mlseg-worker:abc123 worker" in unit
    assert "--env-file /etc/mlseg/secrets.env" in unit
    assert "MLSEG_WORK_POOL=gpu-pool" in files["/etc/mlseg/worker.env"]
    # fsspec (an s3:// registry) reads the Spaces endpoint from its own variable
    assert "FSSPEC_S3_ENDPOINT_URL=https://" in files["/etc/mlseg/worker.env"]
    assert "--gpus" not in unit
    assert "[systemctl, enable, --now, --no-block, mlseg-worker.service]" in text


def test_gpu_worker_gets_the_gpus():
    text = render_public_config(make_settings(gpu=True, droplet_size="gpu-h100x1-80gb"))
    assert "--gpus all --env-file" in text


def test_volume_is_mounted_and_dataset_synced_from_the_bucket():
    config = yaml.safe_load(render_public_config(make_settings(bucket_name="my-bucket")))
    assert config["mounts"][0][:2] == ["LABEL=mlseg-data", "/mnt/mlseg-data"]
    files = {f["path"]: f["content"] for f in config["write_files"]}
    sync = files["/etc/systemd/system/mlseg-dataset-sync.service"]
    assert "rclone copy --fast-list spaces:my-bucket/datasets /mnt/mlseg-data/datasets" in sync
    assert "rclone" in config["packages"]


def test_the_data_volume_belongs_to_the_images_user():
    """The image runs as the Dockerfile's USER; the volume mounted over /data (and what rclone
    copies onto it) must be that user's, or every flow fails writing under /data."""
    import re

    from mlseg_infra.cloud_init import IMAGE_UID

    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+)", dockerfile, flags=re.MULTILINE)
    assert users and int(users[-1]) == IMAGE_UID
    config = yaml.safe_load(render_public_config(make_settings(bucket_name="my-bucket")))
    owner = f"{IMAGE_UID}:{IMAGE_UID}"
    assert ["chown", owner, "/mnt/mlseg-data"] in config["runcmd"]
    chown = config["runcmd"].index(["chown", owner, "/mnt/mlseg-data"])
    start = config["runcmd"].index(
        ["systemctl", "enable", "--now", "--no-block", "mlseg-worker.service"]
    )
    assert chown < start
    sync = _service_settings(config, "mlseg-dataset-sync.service")
    assert (sync["User"], sync["Group"]) == ([str(IMAGE_UID)], [str(IMAGE_UID)])


def test_the_sync_units_user_and_group_exist_on_the_droplet_before_it_starts():
    """systemd starts a unit with User=/Group= only where the user and group database has
    that uid and gid (a numeric User= without an entry fails the unit, 217/USER); the image's
    user exists in the image only, so the droplet makes it, before the sync unit is enabled."""
    import shlex

    from mlseg_infra.cloud_init import IMAGE_UID

    config = yaml.safe_load(render_public_config(make_settings(bucket_name="my-bucket")))
    runcmd = config["runcmd"]
    words = [shlex.split(c[2]) if c[:2] == ["sh", "-c"] else c for c in runcmd]

    def made(tool: str, flag: str) -> int:
        at = [i for i, w in enumerate(words) if tool in w and str(IMAGE_UID) in w]
        assert at, f"no {tool} of {IMAGE_UID} in runcmd"
        w = words[at[0]]
        assert w[w.index(flag) + 1] == str(IMAGE_UID), w
        return at[0]

    sync = runcmd.index(
        ["systemctl", "enable", "--now", "--no-block", "mlseg-dataset-sync.service"]
    )
    group, user = made("groupadd", "--gid"), made("useradd", "--uid")
    assert group < user < sync
    assert words[user][words[user].index("--gid") + 1] == str(IMAGE_UID)


def _service_settings(config: dict, unit: str) -> dict[str, list[str]]:
    """The [Service] settings of a unit the cloud-config writes, each key's values in order."""
    text = {f["path"]: f["content"] for f in config["write_files"]}[f"/etc/systemd/system/{unit}"]
    settings: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_dataset_sync_never_writes_the_volume_as_root():
    """The container's user owns /data and can put a symlink where the dataset folder was; a
    root rclone followed it at the next boot and wrote the bucket's objects (which the same
    container can upload with its bucket key) into /root/.ssh or /etc: a way out to root."""
    from mlseg_infra.cloud_init import IMAGE_UID

    config = yaml.safe_load(render_public_config(make_settings(bucket_name="my-bucket")))
    sync = _service_settings(config, "mlseg-dataset-sync.service")
    assert sync.get("User") == [str(IMAGE_UID)]
    assert sync.get("Group") == [str(IMAGE_UID)]
    commands = [v for k, vs in sync.items() if k.startswith("Exec") for v in vs]
    # '+' and '!' run a command with full privileges despite User=; chown needs root
    assert commands and not [c for c in commands if c[:1] in "+!" or "chown" in c]


def test_every_placeholder_is_filled():
    text = render_public_config(make_settings())
    assert "@{" not in text
    assert "stack dev)" in text


def test_user_data_is_stable_so_unchanged_stacks_keep_their_droplets():
    first = run_stack("dev").of("Droplet")[0].inputs["userData"]
    second = run_stack("dev").of("Droplet")[0].inputs["userData"]
    assert first == second
    assert combine("#cloud-config\n", "#cloud-config\n") == combine(
        "#cloud-config\n", "#cloud-config\n"
    )


def test_registry_login_is_written_as_docker_config():
    docker = json.dumps({"auths": {"registry.digitalocean.com": {"auth": "eA=="}}})
    secret = yaml.safe_load(render_secret_config("k", "id", "s", docker))
    config = next(e for e in secret["write_files"] if e["path"] == "/root/.docker/config.json")
    assert json.loads(config["content"])["auths"]["registry.digitalocean.com"]["auth"] == "eA=="


def _worker_env(user_data: str) -> dict[str, str]:
    public, _ = _parts(user_data)
    files = {f["path"]: f["content"] for f in yaml.safe_load(public)["write_files"]}
    return dict(line.split("=", 1) for line in files["/etc/mlseg/worker.env"].splitlines())


def test_workers_run_two_flow_runs_at_once_unless_the_stack_says_otherwise(user_data):
    """After an outage the server hands a worker every missed nightly run at once; each is a
    process of about 1 GB, so without a cap ten missed nights exhaust a 4 GB droplet."""
    assert "workerFlowLimit" not in stack_config("dev")  # the default applies
    assert _worker_env(user_data)["MLSEG_WORKER_LIMIT"] == "2"
    result = run_stack("prod", stack_config("prod", workerFlowLimit=3))
    for droplet in result.of("Droplet"):
        assert _worker_env(droplet.inputs["userData"])["MLSEG_WORKER_LIMIT"] == "3"


@needs_cloud_init
def test_public_part_with_a_flow_limit_passes_cloud_init_schema(tmp_path):
    text = render_public_config(make_settings(worker_flow_limit=1))
    assert "MLSEG_WORKER_LIMIT=1\n" in text
    checked = _schema_check(tmp_path, text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


DOCKER = shutil.which("docker")


@pytest.mark.skipif(DOCKER is None, reason="the docker CLI is not installed")
def test_every_docker_flag_the_droplet_runs_is_one_the_docker_cli_lists():
    """Each flag of each docker command in the units and scripts the droplet runs is listed
    by that command's `--help`: a removed or deprecated one (`docker stop --time`, which
    Docker 28 hides and answers with "Flag --time has been deprecated") is not."""
    import re

    text = render_public_config(make_settings(gpu=True, droplet_size="gpu-h100x1-80gb"))
    calls = re.findall(r"(?:/usr/bin/)?\bdocker\s+((?:image\s+)?[a-z]+)\s+([^\n|)]*)", text)
    assert {command for command, _ in calls} >= {"rm", "pull", "run", "stop", "image inspect"}
    for command, rest in calls:
        shown = subprocess.run(
            [DOCKER, *command.split(), "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", shown))
        used = set(re.findall(r"(?<!\S)(--?[A-Za-z][\w-]*)", rest))
        assert used <= listed, f"docker {command}: {sorted(used - listed)} not in its --help"
