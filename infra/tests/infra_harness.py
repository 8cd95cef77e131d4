"""Runs the Pulumi program against `pulumi.runtime.Mocks`: no CLI, no cloud, no network.

`run_stack` installs fresh mocks for every call (the Pulumi runtime is process-global), runs
`infra/__main__.py` for a stack, and returns every resource the program registered with its
inputs, which inputs were secret, and the resolved stack exports.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import rpc

INFRA = Path(__file__).resolve().parents[1]

# Recognisable stand-ins for the secrets; tests look for them where they must not be.
# Fake values, hence the detect-secrets allowlist pragma.
FAKE_PREFECT_KEY = "pnu_FAKEprefectKEYforTESTS0000000000"
FAKE_SPACES_SECRET = "FAKEspacesSECRETforTESTS0000000000000000"  # pragma: allowlist secret
FAKE_REGISTRY_AUTH = "RkFLRS1yZWdpc3RyeS1hdXRoLWZvci10ZXN0cw=="
SECRET_VALUES = (FAKE_PREFECT_KEY, FAKE_SPACES_SECRET, FAKE_REGISTRY_AUTH)

# The fingerprint of every key the mocked account holds already (`sshKeyName`).
ACCOUNT_KEY_FINGERPRINT = "11:22:33:44"

# What a person sets with `pulumi config set` before the first `up` (not in the stack files).
USER_CONFIG = {
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests admin@example",
    "prefectApiUrl": "https://api.prefect.cloud/api/accounts/acc/workspaces/ws",
}


@dataclass
class Resource:
    typ: str
    name: str
    inputs: dict[str, Any]  # secrets unwrapped
    secret_inputs: set[str] = field(default_factory=set)
    opts: pulumi.ResourceOptions | None = None  # as the program passed them

    @property
    def kind(self) -> str:
        """'Droplet' for 'digitalocean:index/droplet:Droplet'."""
        return self.typ.rsplit(":", 1)[-1]


@dataclass
class StackRun:
    resources: list[Resource]
    exports: dict[str, Any]

    def of(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r.kind == kind]

    def one(self, kind: str) -> Resource:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]


def _unwrap(value: Any) -> Any:
    if rpc.is_rpc_secret(value):
        return _unwrap(rpc.unwrap_rpc_secret(value))
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


class _Recorder(pulumi.runtime.Mocks):
    """Echoes inputs back as state, plus the outputs DigitalOcean computes."""

    def __init__(self) -> None:
        self.resources: list[Resource] = []
        self.opts: dict[str, pulumi.ResourceOptions] = {}

    def record_opts(self, args: pulumi.ResourceTransformationArgs) -> None:
        """A stack transformation: the mocks see inputs only, not the resource options."""
        self.opts[args.name] = args.opts

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        inputs = dict(args.inputs)
        self.resources.append(
            Resource(
                typ=args.typ,
                name=args.name,
                inputs=_unwrap(inputs),
                secret_inputs={k for k, v in inputs.items() if rpc.is_rpc_secret(v)},
                opts=self.opts.get(args.name),
            )
        )
        state = _unwrap(inputs)
        index = len(self.resources)
        kind = args.typ.rsplit(":", 1)[-1]
        if kind == "Droplet":
            state |= {"ipv4Address": f"192.0.2.{index}", "dropletUrn": f"do:droplet:{index}"}
        elif kind == "Volume":
            state |= {"volumeUrn": f"do:volume:{index}"}
        elif kind == "SshKey":
            state |= {"fingerprint": "aa:bb:cc:dd"}
        elif kind == "SpacesBucket":
            state |= {
                "bucketUrn": f"do:space:{state['name']}",
                "bucketDomainName": f"{state['name']}.{state['region']}.digitaloceanspaces.com",
            }
        elif kind == "SpacesKey":
            state |= {"accessKey": "DO00FAKEACCESSKEYID", "secretKey": FAKE_SPACES_SECRET}
        elif kind == "ContainerRegistry":
            state |= {"endpoint": f"registry.digitalocean.com/{state['name']}"}
        elif kind == "ContainerRegistryDockerCredentials":
            auths = {"registry.digitalocean.com": {"auth": FAKE_REGISTRY_AUTH}}
            state |= {"dockerCredentials": json.dumps({"auths": auths})}
        return [f"{args.name}-id", state]

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "digitalocean:index/getContainerRegistry:getContainerRegistry":
            name = args.args["name"]
            return {"name": name, "endpoint": f"registry.digitalocean.com/{name}", "id": name}
        if args.token == "digitalocean:index/getSshKey:getSshKey":
            name = args.args["name"]
            return {"name": name, "fingerprint": ACCOUNT_KEY_FINGERPRINT}
        raise AssertionError(f"unexpected invoke {args.token}")


def stack_config(stack: str, **overrides: Any) -> dict[str, Any]:
    """`infra/Pulumi.<stack>.yaml` plus what a person sets once, plus `overrides`."""
    document = yaml.safe_load((INFRA / f"Pulumi.{stack}.yaml").read_text())
    config = {k.removeprefix("mlseg:"): v for k, v in document["config"].items()}
    return config | USER_CONFIG | overrides


def set_config(config: dict[str, Any], secret_keys: tuple[str, ...] = ()) -> None:
    """Replace the runtime's `mlseg:` config (values as `pulumi config set` stores them)."""
    flat = {f"mlseg:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    pulumi.runtime.set_all_config(flat, [f"mlseg:{k}" for k in secret_keys])


def run_stack(
    stack: str = "dev",
    config: dict[str, Any] | None = None,
    prefect_api_key: str | None = FAKE_PREFECT_KEY,
    preview: bool = False,
) -> StackRun:
    """Run `infra/__main__.py` for `stack` with `config` (default: the stack file's)."""
    config = dict(stack_config(stack) if config is None else config)
    secret_keys: tuple[str, ...] = ()
    if prefect_api_key is not None:
        config["prefectApiKey"] = prefect_api_key
        secret_keys = ("prefectApiKey",)
    recorder = _Recorder()
    pulumi.runtime.set_mocks(recorder, project="mlseg", stack=stack, preview=preview)
    set_config(config, secret_keys)
    exported: dict[str, Any] = {}
    resolved: dict[str, Any] = {}

    def export(name: str, value: Any) -> None:
        exported[name] = value

    @pulumi.runtime.test
    def program():
        pulumi.runtime.register_stack_transformation(recorder.record_opts)
        original, pulumi.export = pulumi.export, export
        try:
            runpy.run_path(str(INFRA / "__main__.py"), run_name="__main__")
        finally:
            pulumi.export = original
        names = sorted(exported)
        return pulumi.Output.all(*(exported[n] for n in names)).apply(
            lambda values: resolved.update(zip(names, values, strict=True))
        )

    try:
        program()
    finally:
        set_config({}, ())
    return StackRun(resources=recorder.resources, exports=resolved)


def resolve(make_output: Callable[[], pulumi.Output[Any]]) -> tuple[Any, bool]:
    """The value of the Output that `make_output` builds, and whether it is secret."""
    pulumi.runtime.set_mocks(_Recorder(), project="mlseg", stack="dev")
    result: dict[str, Any] = {}

    @pulumi.runtime.test
    def check():
        output = make_output()

        async def inspect() -> None:
            result["secret"] = await output.is_secret()
            result["value"] = await output.future()

        return inspect()

    check()
    return result["value"], result["secret"]


def make_settings(**overrides: Any):
    """A valid dev `Settings`, with `overrides` (field names as in the dataclass)."""
    from mlseg_infra.settings import Settings

    values: dict[str, Any] = {
        "stack": "dev",
        "region": "ams3",
        "worker_count": 1,
        "worker_flow_limit": 2,
        "droplet_size": "s-2vcpu-4gb",
        "droplet_image": "ubuntu-24-04-x64",
        "gpu": False,
        "admin_cidrs": ("198.51.100.0/24",),
        "ssh_public_key": USER_CONFIG["sshPublicKey"],
        "bucket_name": "mlseg-dev-data",
        "dataset_prefix": "datasets",
        "volume_size_gb": 25,
        "registry_name": "mlseg",
        "registry_create": True,
        "registry_tier": "basic",
        "image_name": "mlseg-worker",
        "image_tag": "dev",
        "work_pool": "mlseg-pool",
        "prefect_api_url": USER_CONFIG["prefectApiUrl"],
    }
    return Settings(**(values | overrides))
