"""The stack's settings: one typed, validated object read from `pulumi.Config`.

Every builder takes a `Settings`; nothing else reads configuration. Validation runs when the
program starts, so `pulumi preview` refuses a bad stack before anything is created.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass

import pulumi
import pulumi.runtime.config

from mlseg_infra.sizes import SizeError, require_minimum

CONFIG_NAMESPACE = "mlseg"
DEFAULT_WORK_POOL = "mlseg-pool"
DEFAULT_IMAGE = "ubuntu-24-04-x64"  # Ubuntu 24.04 LTS
DEFAULT_GPU_IMAGE = "gpu-h100x1-base"  # DigitalOcean's AI/ML-ready image, NVIDIA drivers installed
MAX_WORKERS = 20
# DigitalOcean block storage volumes are 1 GiB to 16 TiB.
MAX_VOLUME_GB = 16384
# Flow runs one worker runs at once. After an outage the server hands a worker every missed
# scheduled run at once (three nights: three `Late` runs); each is a process of about 1 GB with
# torch loaded, and runs on one output folder only take turns on its lock. Two fit the
# smallest droplet allowed (4 GB) and still let a training run beside a nightly one.
DEFAULT_WORKER_FLOW_LIMIT = 2
# Every key this program reads (read_settings, read_secrets): any other `mlseg:` key is a typo.
KEYS = (
    "region",
    "workerCount",
    "workerFlowLimit",
    "dropletSize",
    "dropletImage",
    "gpu",
    "adminCidrs",
    "sshPublicKey",
    "sshKeyName",
    "bucketName",
    "datasetPrefix",
    "volumeSizeGb",
    "registryName",
    "registryCreate",
    "registryTier",
    "imageName",
    "imageTag",
    "workPool",
    "prefectApiUrl",
    "prefectApiKey",
)
# Narrowest networks still accepted for SSH: wider ones are the internet in all but name.
_MIN_PREFIX = {4: 8, 6: 32}

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_REGION = re.compile(r"^[a-z]{3}[0-9]$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_POOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SSH_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh\.com) \S+")


class SettingsError(ValueError):
    """A stack setting a person has to change; the message says which and how."""


@dataclass(frozen=True)
class Settings:
    """Non-secret settings of one stack (`dev`, `prod`, ...)."""

    stack: str
    region: str
    worker_count: int
    worker_flow_limit: int
    droplet_size: str
    droplet_image: str
    gpu: bool
    admin_cidrs: tuple[str, ...]
    ssh_public_key: str
    bucket_name: str
    dataset_prefix: str
    volume_size_gb: int
    registry_name: str
    registry_create: bool
    registry_tier: str
    image_name: str
    image_tag: str
    work_pool: str
    prefect_api_url: str
    # a key already in the DigitalOcean account, used instead of registering ssh_public_key
    ssh_key_name: str = ""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise SettingsError(
                f"stack {self.stack!r} has invalid settings:\n  - " + "\n  - ".join(problems)
            )

    @property
    def prefix(self) -> str:
        """Prefix of every resource name, so dev and prod can share one account."""
        return f"mlseg-{self.stack}"

    @property
    def image(self) -> str:
        """Full reference of the worker image in the DigitalOcean registry."""
        return f"registry.digitalocean.com/{self.registry_name}/{self.image_name}:{self.image_tag}"

    @property
    def spaces_endpoint(self) -> str:
        return f"https://{self.region}.digitaloceanspaces.com"

    @property
    def project_environment(self) -> str:
        return {"prod": "Production", "staging": "Staging"}.get(self.stack, "Development")


@dataclass(frozen=True)
class Secrets:
    """Secret inputs; each is a secret `pulumi.Output` and never leaves Pulumi in plain text."""

    prefect_api_key: pulumi.Output[str]


def _problems(s: Settings) -> list[str]:
    problems: list[str] = []
    if not _NAME.match(s.stack):
        problems.append(f"stack name {s.stack!r} must be lowercase letters, digits and dashes")
    if not _REGION.match(s.region):
        problems.append(f"region {s.region!r} is not a DigitalOcean region slug such as 'ams3'")
    if not 1 <= s.worker_count <= MAX_WORKERS:
        problems.append(f"workerCount is {s.worker_count}; it must be 1 to {MAX_WORKERS}")
    if s.worker_flow_limit < 1:
        problems.append(
            f"workerFlowLimit is {s.worker_flow_limit}; it must be at least 1 (the flow runs "
            "one worker runs at once)"
        )
    try:
        size = require_minimum(s.droplet_size)
    except SizeError as err:
        problems.append(str(err))
    else:
        if s.gpu and not size.is_gpu:
            problems.append(f"gpu is true but dropletSize {s.droplet_size!r} is not a GPU size")
        if not s.gpu and size.is_gpu:
            problems.append(f"dropletSize {s.droplet_size!r} is a GPU size; set gpu: true")
    problems.extend(_cidr_problems(s.admin_cidrs))
    # DigitalOcean refuses a public key its account already holds ("SSH Key is already in
    # use on your account"), so a key registered by the other stack, or by hand, is named
    if s.ssh_key_name and s.ssh_public_key:
        problems.append(
            "set sshPublicKey or sshKeyName, not both (`pulumi config rm sshPublicKey` uses the "
            f"account's key {s.ssh_key_name!r})"
        )
    elif not s.ssh_key_name and not _SSH_KEY.match(s.ssh_public_key):
        problems.append(
            "sshPublicKey must be an OpenSSH public key ('ssh-ed25519 AAAA...'); if that key is "
            "already in the DigitalOcean account, set sshKeyName to its name there instead"
        )
    if not _BUCKET.match(s.bucket_name):
        problems.append(f"bucketName {s.bucket_name!r} must be 3-63 lowercase letters, digits, '-'")
    # the droplet copies the datasets to, and chowns as root, /mnt/mlseg-data/<prefix>: a '..'
    # there reaches outside the volume ('../..' is the whole disk)
    if not _PREFIX.match(s.dataset_prefix) or {".", ".."} & set(s.dataset_prefix.split("/")):
        problems.append(
            f"datasetPrefix {s.dataset_prefix!r} must be a relative object path without "
            "'.' or '..' parts"
        )
    if not 1 <= s.volume_size_gb <= MAX_VOLUME_GB:
        problems.append(
            f"volumeSizeGb is {s.volume_size_gb}; it must be 1 to {MAX_VOLUME_GB} "
            "(a DigitalOcean volume holds at most 16 TiB)"
        )
    if not _NAME.match(s.registry_name):
        problems.append(f"registryName {s.registry_name!r} must be lowercase letters, digits, '-'")
    if not _NAME.match(s.image_name):
        problems.append(f"imageName {s.image_name!r} must be lowercase letters, digits, '-'")
    if not _TAG.match(s.image_tag):
        problems.append(f"imageTag {s.image_tag!r} is not a valid Docker tag")
    if not _POOL.match(s.work_pool):
        problems.append(f"workPool {s.work_pool!r} must be letters, digits, '-' and '_'")
    if not s.prefect_api_url.startswith("https://"):
        problems.append("prefectApiUrl (or PREFECT_API_URL) must be an https:// Prefect API URL")
    return problems


def _cidr_problems(cidrs: tuple[str, ...]) -> list[str]:
    problems = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as err:
            problems.append(f"adminCidrs entry {cidr!r} is not a network: {err}")
            continue
        if network.prefixlen < _MIN_PREFIX[network.version]:
            problems.append(
                f"adminCidrs entry {cidr!r} opens SSH to too much of the internet; list the "
                f"networks admins connect from (IPv{network.version} /"
                f"{_MIN_PREFIX[network.version]} or narrower)"
            )
    return problems


def _unknown_keys(stack: str) -> list[str]:
    """A line per `mlseg:` key set in the stack that this program does not read.

    Pulumi passes a stack's whole config to the program and never says a key is unused, so
    without this a misspelt `workercount: 3` would leave its default of one worker.
    """
    prefix = f"{CONFIG_NAMESPACE}:"
    names = set(pulumi.runtime.config.CONFIG.get()) | set(pulumi.runtime.config.get_config_env())
    by_lower = {key.lower(): key for key in KEYS}
    lines = []
    for name in sorted(n.removeprefix(prefix) for n in names if n.startswith(prefix)):
        if name in KEYS:
            continue
        close = difflib.get_close_matches(name.lower(), by_lower, n=1)
        hint = f"did you mean {by_lower[close[0]]}? " if close else ""
        lines.append(
            f"Pulumi.{stack}.yaml sets {prefix}{name}, which this program does not read; "
            f"{hint}(`pulumi config rm {name}` removes it)"
        )
    return lines


def read_settings(config: pulumi.Config, stack: str) -> Settings:
    """Settings of `stack` from its `Pulumi.<stack>.yaml` (keys in the `mlseg:` namespace)."""
    unknown = _unknown_keys(stack)
    if unknown:
        raise SettingsError(f"stack {stack!r} has unknown settings:\n  - " + "\n  - ".join(unknown))
    gpu = config.get_bool("gpu", False)
    default_tag = stack  # CI pushes a moving tag per stack (":dev", ":prod") besides the SHA
    return Settings(
        stack=stack,
        region=config.get("region", "ams3"),
        worker_count=config.get_int("workerCount", 1),
        worker_flow_limit=config.get_int("workerFlowLimit", DEFAULT_WORKER_FLOW_LIMIT),
        droplet_size=config.get("dropletSize", "gpu-h100x1-80gb" if gpu else "s-2vcpu-4gb"),
        droplet_image=config.get("dropletImage", DEFAULT_GPU_IMAGE if gpu else DEFAULT_IMAGE),
        gpu=gpu,
        admin_cidrs=tuple(config.get_object("adminCidrs", [])),
        ssh_public_key=config.get("sshPublicKey", ""),
        ssh_key_name=config.get("sshKeyName", ""),
        bucket_name=config.require("bucketName"),
        dataset_prefix=config.get("datasetPrefix", "datasets"),
        volume_size_gb=config.get_int("volumeSizeGb", 50),
        registry_name=config.get("registryName", "mlseg"),
        registry_create=config.get_bool("registryCreate", False),
        registry_tier=config.get("registryTier", "basic"),
        image_name=config.get("imageName", "mlseg-worker"),
        image_tag=config.get("imageTag", default_tag),
        work_pool=config.get("workPool", DEFAULT_WORK_POOL),
        prefect_api_url=config.get("prefectApiUrl") or os.environ.get("PREFECT_API_URL", ""),
    )


def read_secrets(config: pulumi.Config) -> Secrets:
    """The Prefect API key, from `pulumi config set --secret prefectApiKey` or PREFECT_API_KEY.

    The DigitalOcean token and Spaces keys are the provider's own settings
    (`digitalocean:token`, or DIGITALOCEAN_TOKEN / SPACES_ACCESS_KEY_ID /
    SPACES_SECRET_ACCESS_KEY in the environment) and never pass through this program.
    """
    key = config.get_secret("prefectApiKey")
    if key is None:
        from_env = os.environ.get("PREFECT_API_KEY")
        if not from_env:
            raise SettingsError(
                "no Prefect API key: run `pulumi config set --secret prefectApiKey ...` "
                "or export PREFECT_API_KEY"
            )
        key = pulumi.Output.secret(from_env)
    return Secrets(prefect_api_key=key)
