"""The Pulumi program per stack, run against mocks: resources, firewall policy, secrets, exports."""

from __future__ import annotations

import ipaddress

import pytest
from infra_harness import ACCOUNT_KEY_FINGERPRINT, SECRET_VALUES, run_stack, stack_config

STACKS = {"dev": ("s-2vcpu-4gb", 1, "Development"), "prod": ("s-4vcpu-8gb", 2, "Production")}


@pytest.fixture(params=sorted(STACKS))
def run(request, dev_run, prod_run):
    return request.param, {"dev": dev_run, "prod": prod_run}[request.param]


def test_each_stack_has_its_network_storage_and_workers(run):
    stack, result = run
    size, workers, _ = STACKS[stack]
    assert len(result.of("Vpc")) == len(result.of("SshKey")) == len(result.of("Firewall")) == 1
    assert len(result.of("SpacesBucket")) == len(result.of("Project")) == 1
    droplets = result.of("Droplet")
    assert len(droplets) == workers
    assert len(result.of("Volume")) == workers
    for droplet in droplets:
        assert droplet.inputs["size"] == size
        assert droplet.inputs["region"] == stack_config(stack)["region"]
        assert droplet.inputs["image"] == "ubuntu-24-04-x64"  # Ubuntu LTS
        assert droplet.inputs["vpcUuid"] == "vpc-id"
        assert droplet.inputs["sshKeys"] == ["aa:bb:cc:dd"]


def test_a_key_the_account_holds_already_is_named_not_registered_again():
    """DigitalOcean refuses to register a public key its account holds already ("SSH Key is
    already in use on your account"): the prod stack, set up as the README says with the key
    dev had registered, failed at `pulumi up`, as did any stack of a person whose key was
    already in the account."""
    config = stack_config("prod", sshKeyName="lab-admin")
    del config["sshPublicKey"]
    result = run_stack("prod", config)
    assert result.of("SshKey") == []
    droplets = result.of("Droplet")
    assert droplets and all(d.inputs["sshKeys"] == [ACCOUNT_KEY_FINGERPRINT] for d in droplets)


def test_only_one_stack_creates_the_account_wide_registry(dev_run, prod_run):
    assert len(dev_run.of("ContainerRegistry")) == 1
    assert prod_run.of("ContainerRegistry") == []  # looked up by name instead
    for result in (dev_run, prod_run):
        credentials = result.one("ContainerRegistryDockerCredentials")
        assert credentials.inputs["write"] is False  # workers pull, never push


def test_every_worker_gets_its_own_data_volume(run):
    _, result = run
    volumes = {f"{v.name}-id": v for v in result.of("Volume")}
    attached = [d.inputs["volumeIds"] for d in result.of("Droplet")]
    assert sorted(v for ids in attached for v in ids) == sorted(volumes)
    for volume in volumes.values():
        assert volume.inputs["initialFilesystemLabel"] == "mlseg-data"  # what cloud-init mounts


def test_workers_carry_the_tags_the_firewall_targets(run):
    stack, result = run
    firewall = result.one("Firewall")
    for droplet in result.of("Droplet"):
        tags = droplet.inputs["tags"]
        assert {"mlseg", f"env:{stack}"} <= set(tags)
        assert set(firewall.inputs["tags"]) <= set(tags)
    assert {t.inputs["name"] for t in result.of("Tag")} >= set(
        result.of("Droplet")[0].inputs["tags"]
    )


def test_a_stack_s_firewall_targets_no_other_stack_s_workers(dev_run, prod_run):
    """DigitalOcean applies every firewall whose tag a droplet carries: one targeting a tag
    that dev and prod workers share (``mlseg``) would let dev's admin networks SSH into
    prod's workers."""
    for result, other in ((dev_run, prod_run), (prod_run, dev_run)):
        targets = set(result.one("Firewall").inputs["tags"])
        for droplet in other.of("Droplet"):
            assert not targets & set(droplet.inputs["tags"]), droplet.inputs["tags"]


def test_firewall_admits_ssh_from_admin_networks_only(run):
    stack, result = run
    rules = result.one("Firewall").inputs["inboundRules"]
    assert len(rules) == 1
    (rule,) = rules
    assert (rule["protocol"], rule["portRange"]) == ("tcp", "22")
    assert rule["sourceAddresses"] == stack_config(stack)["adminCidrs"]
    for cidr in rule["sourceAddresses"]:
        assert ipaddress.ip_network(cidr).prefixlen > 0


def test_firewall_leaves_outbound_open(run):
    _, result = run
    outbound = {r["protocol"]: r for r in result.one("Firewall").inputs["outboundRules"]}
    assert set(outbound) == {"tcp", "udp", "icmp"}
    for rule in outbound.values():
        assert set(rule["destinationAddresses"]) == {"0.0.0.0/0", "::/0"}
    assert outbound["tcp"]["portRange"] == "1-65535"


def test_without_admin_networks_nothing_is_open_inbound():
    result = run_stack("dev", stack_config("dev", adminCidrs=[]))
    assert result.one("Firewall").inputs.get("inboundRules", []) == []


def test_worker_count_is_respected_end_to_end():
    result = run_stack("dev", stack_config("dev", workerCount=3))
    droplets = result.of("Droplet")
    assert sorted(d.inputs["name"] for d in droplets) == [f"mlseg-dev-worker-{i}" for i in range(3)]
    assert len(result.of("Volume")) == 3
    assert len(result.exports["droplet_ips"]) == 3
    urns = result.one("Project").inputs["resources"]
    assert len(urns) == 3 + 3 + 1  # droplets, volumes, bucket


def test_project_groups_the_stack_in_its_environment(run):
    stack, result = run
    project = result.one("Project")
    assert project.inputs["name"] == f"mlseg-{stack}"
    assert project.inputs["environment"] == STACKS[stack][2]


def test_bucket_is_private_and_survives_destroy(run):
    stack, result = run
    bucket = result.one("SpacesBucket")
    assert bucket.inputs["name"] == stack_config(stack)["bucketName"]
    assert bucket.inputs["acl"] == "private"
    assert bucket.inputs["forceDestroy"] is False


def test_worker_bucket_key_is_scoped_to_the_stack_bucket(run):
    stack, result = run
    (grant,) = result.one("SpacesKey").inputs["grants"]
    assert grant["bucket"] == stack_config(stack)["bucketName"]
    assert grant["permission"] != "fullaccess"


def test_user_data_is_a_secret_input(run):
    _, result = run
    for droplet in result.of("Droplet"):
        assert "userData" in droplet.secret_inputs


def _plain_strings(value, secret: bool):
    if isinstance(value, dict):
        for item in value.values():
            yield from _plain_strings(item, secret)
    elif isinstance(value, list):
        for item in value:
            yield from _plain_strings(item, secret)
    elif isinstance(value, str) and not secret:
        yield value


def test_no_secret_reaches_any_resource_in_plain_text(run):
    _, result = run
    for resource in result.resources:
        for key, value in resource.inputs.items():
            for text in _plain_strings(value, key in resource.secret_inputs):
                assert not any(s in text for s in SECRET_VALUES), (resource.name, key)


def test_exports_name_what_operators_need(run):
    stack, result = run
    exports = result.exports
    assert set(exports) == {
        "droplet_ips",
        "bucket_endpoint",
        "registry_endpoint",
        "work_pool",
        "image",
    }
    assert len(exports["droplet_ips"]) == STACKS[stack][1]
    assert (
        exports["bucket_endpoint"]
        == f"{stack_config(stack)['bucketName']}.ams3.digitaloceanspaces.com"
    )
    assert exports["registry_endpoint"] == "registry.digitalocean.com/mlseg"
    assert exports["work_pool"] == "mlseg-pool"
    assert exports["image"] == f"registry.digitalocean.com/mlseg/mlseg-worker:{stack}"
    assert not any(secret in str(exports) for secret in SECRET_VALUES)


def test_work_pool_is_configurable_and_exported():
    result = run_stack("dev", stack_config("dev", workPool="gpu-pool"))
    assert result.exports["work_pool"] == "gpu-pool"


def test_a_replaced_worker_releases_its_volume_first(run):
    """New user data (a rotated key), image or region replaces a droplet; DigitalOcean attaches
    a volume to one droplet at a time, so the replacement, which attaches the same volume,
    can only be created once the old droplet is gone (Pulumi's default creates it first)."""
    _, result = run
    for droplet in result.of("Droplet"):
        assert droplet.opts is not None and droplet.opts.delete_before_replace is True


def test_data_volumes_survive_destroy_scale_down_and_region_change(run):
    """The workers keep runs, the model registry, results and the inbox on their volumes: a
    `pulumi destroy`, a lower workerCount or another region must not delete them unasked."""
    _, result = run
    for volume in result.of("Volume"):
        assert volume.opts is not None and volume.opts.protect is True
