"""Stack settings: the paper's minimum size, SSH exposure and bad values are refused up front."""

from __future__ import annotations

import pulumi
import pytest
from infra_harness import (
    INFRA,
    USER_CONFIG,
    make_settings,
    resolve,
    run_stack,
    set_config,
    stack_config,
)
from mlseg_infra.settings import (
    CONFIG_NAMESPACE,
    KEYS,
    SettingsError,
    read_secrets,
    read_settings,
)
from mlseg_infra.sizes import SizeError, lookup, require_minimum


@pytest.mark.parametrize(
    "slug", ["s-1vcpu-512mb-10gb", "s-1vcpu-1gb", "s-1vcpu-2gb", "s-2vcpu-2gb"]
)
def test_sizes_below_4gb_memory_are_refused(slug):
    with pytest.raises(SizeError, match="at least 4 GB"):
        require_minimum(slug)


@pytest.mark.parametrize("slug", ["s-2vcpu-4gb", "c-2", "s-4vcpu-8gb", "gpu-h100x1-80gb"])
def test_sizes_at_or_above_the_minimum_are_accepted(slug):
    size = require_minimum(slug)
    assert size.memory_gb >= 4 and size.disk_gb >= 25


def test_unlisted_slug_is_read_from_its_name():
    assert lookup("s-4vcpu-16gb-intel").memory_gb == 16
    assert lookup("s-1vcpu-512mb-10gb-amd").disk_gb == 10
    assert lookup("s-1vcpu-512mb-10gb-amd").memory_gb == 0.5  # megabytes, not gigabytes
    with pytest.raises(SizeError, match="at least 4 GB"):
        require_minimum("s-1vcpu-512mb-25gb-amd")  # as big a disk as allowed, too little memory
    with pytest.raises(SizeError, match="at least 4 GB"):
        require_minimum("s-1vcpu-2gb-amd")  # not in the table, refused from its name
    with pytest.raises(SizeError, match="25 GB"):
        require_minimum("s-2vcpu-4gb-10gb")


def test_unreadable_slug_is_refused_with_a_pointer_to_the_table():
    with pytest.raises(SizeError, match="sizes.py"):
        require_minimum("huge")


@pytest.mark.parametrize(
    "cidr", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/4", "2001:db8::/16", "not-a-network"]
)
def test_ssh_open_to_the_internet_or_garbage_is_refused(cidr):
    with pytest.raises(SettingsError, match="adminCidrs"):
        make_settings(admin_cidrs=("198.51.100.0/24", cidr))


def test_cidr_with_host_bits_is_refused_rather_than_widened():
    with pytest.raises(SettingsError, match="198.51.100.7/24"):
        make_settings(admin_cidrs=("198.51.100.7/24",))


def test_narrow_admin_networks_are_accepted():
    settings = make_settings(admin_cidrs=("198.51.100.7/32", "10.0.0.0/8", "2001:db8:1::/48"))
    assert len(settings.admin_cidrs) == 3


def test_gpu_flag_and_size_must_agree():
    with pytest.raises(SettingsError, match="not a GPU size"):
        make_settings(gpu=True)
    with pytest.raises(SettingsError, match="set gpu: true"):
        make_settings(droplet_size="gpu-h100x1-80gb")
    assert make_settings(gpu=True, droplet_size="gpu-h100x1-80gb").gpu


@pytest.mark.parametrize("prefix", ["..", "../..", "datasets/../../etc", "./datasets", "/data"])
def test_dataset_prefix_leaving_the_data_volume_is_refused(prefix):
    # rendered into `chown -R` and `rclone copy` targets under /mnt/mlseg-data, run as root
    with pytest.raises(SettingsError, match="datasetPrefix"):
        make_settings(dataset_prefix=prefix)


@pytest.mark.parametrize("prefix", ["datasets", "lab-a/datasets_v2", "v1.2/data"])
def test_dataset_prefixes_inside_the_volume_are_accepted(prefix):
    assert make_settings(dataset_prefix=prefix).dataset_prefix == prefix


@pytest.mark.parametrize("url", ["http://prefect.example/api", "", "api.prefect.cloud/api"])
def test_a_prefect_api_the_key_would_reach_unencrypted_is_refused(url):
    """The worker sends its Prefect API key with every request: over http:// in clear."""
    with pytest.raises(SettingsError, match="prefectApiUrl"):
        make_settings(prefect_api_url=url)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        make_settings(worker_count=0, droplet_size="s-1vcpu-1gb", bucket_name="Bad_Bucket")
    message = str(err.value)
    assert "workerCount" in message and "4 GB" in message and "bucketName" in message


def test_a_too_small_droplet_fails_the_preview():
    config = stack_config("dev", dropletSize="s-1vcpu-2gb")
    with pytest.raises(SettingsError, match="s-1vcpu-2gb"):
        run_stack("dev", config, preview=True)


def test_a_stack_without_an_admin_key_says_both_ways_to_give_one():
    config = stack_config("dev")
    del config["sshPublicKey"]
    with pytest.raises(SettingsError, match="sshPublicKey must be .*set sshKeyName"):
        run_stack("dev", config, preview=True)


def test_an_admin_key_given_twice_is_refused():
    with pytest.raises(SettingsError, match="sshPublicKey or sshKeyName, not both"):
        make_settings(ssh_key_name="lab-admin")
    assert make_settings(ssh_public_key="", ssh_key_name="lab-admin").ssh_key_name == "lab-admin"


@pytest.mark.parametrize("size", [0, 16385, 1_000_000])
def test_a_volume_digitalocean_cannot_make_fails_the_preview(size):
    """DigitalOcean volumes are 1 GiB to 16 TiB: a bigger one passed the preview and failed
    `pulumi up` halfway, after the VPC, firewall and bucket were made."""
    config = stack_config("dev", volumeSizeGb=size)
    with pytest.raises(SettingsError, match=f"volumeSizeGb is {size}; it must be 1 to 16384"):
        run_stack("dev", config, preview=True)


def test_the_largest_volume_digitalocean_makes_is_accepted():
    result = run_stack("dev", stack_config("dev", volumeSizeGb=16384), preview=True)
    assert [v.inputs["size"] for v in result.of("Volume")] == [16384]


@pytest.mark.parametrize("limit", [0, -1])
def test_a_flow_limit_below_one_fails_the_preview(limit):
    config = stack_config("dev", workerFlowLimit=limit)
    with pytest.raises(SettingsError, match=f"workerFlowLimit is {limit}; it must be at least 1"):
        run_stack("dev", config, preview=True)


@pytest.mark.parametrize("limit", ["two", "2.5", ""])
def test_a_flow_limit_that_is_not_an_integer_fails_the_preview(limit):
    config = stack_config("dev", workerFlowLimit=limit)
    with pytest.raises(pulumi.RunError, match="mlseg:workerFlowLimit.*not a valid 'int'"):
        run_stack("dev", config, preview=True)


def _read(stack: str, config: dict):
    set_config(config)
    try:
        return read_settings(pulumi.Config(CONFIG_NAMESPACE), stack)
    finally:
        set_config({})


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_stack_files_are_valid_and_read_as_written(stack):
    config = stack_config(stack)
    settings = _read(stack, config)
    assert settings.worker_count == config["workerCount"]
    assert settings.droplet_size == config["dropletSize"]
    assert settings.admin_cidrs == tuple(config["adminCidrs"])
    assert settings.work_pool == "mlseg-pool"
    assert settings.image_tag == stack


def test_defaults_fill_what_a_stack_file_leaves_out():
    settings = _read("staging", dict(USER_CONFIG, bucketName="mlseg-staging-data"))
    assert settings.work_pool == "mlseg-pool"
    assert settings.droplet_size == "s-2vcpu-4gb"
    assert settings.droplet_image.startswith("ubuntu-") and "-04-" in settings.droplet_image
    assert settings.image_tag == "staging"
    assert settings.admin_cidrs == ()
    assert settings.worker_flow_limit == 2


def test_prefect_key_comes_from_pulumi_secret_or_environment(monkeypatch):
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    set_config({})
    with pytest.raises(SettingsError, match="prefectApiKey"):
        read_secrets(pulumi.Config(CONFIG_NAMESPACE))

    monkeypatch.setenv("PREFECT_API_KEY", "key-from-the-environment")
    value, secret = resolve(lambda: read_secrets(pulumi.Config(CONFIG_NAMESPACE)).prefect_api_key)
    assert (value, secret) == ("key-from-the-environment", True)

    monkeypatch.delenv("PREFECT_API_KEY")
    fake = {"prefectApiKey": "key-from-config"}  # pragma: allowlist secret
    set_config(fake, secret_keys=("prefectApiKey",))
    try:
        value, secret = resolve(
            lambda: read_secrets(pulumi.Config(CONFIG_NAMESPACE)).prefect_api_key
        )
    finally:
        set_config({})
    assert (value, secret) == ("key-from-config", True)


@pytest.mark.parametrize(
    ("typo", "key"),
    [("workercount", "workerCount"), ("dropletsize", "dropletSize"), ("adminCidr", "adminCidrs")],
)
def test_a_misspelt_key_is_refused_not_ignored(typo, key):
    # `pulumi config set workercount 3` would otherwise leave one worker, silently
    config = stack_config("dev")
    config[typo] = config.pop(key)
    with pytest.raises(SettingsError, match=f"mlseg:{typo}.*did you mean {key}") as err:
        _read("dev", config)
    assert "Pulumi.dev.yaml" in str(err.value) and f"pulumi config rm {typo}" in str(err.value)


def test_keys_of_other_namespaces_are_left_to_their_owners():
    flat = {f"mlseg:{k}": v for k, v in USER_CONFIG.items()}
    flat |= {"mlseg:bucketName": "mlseg-dev-data", "digitalocean:token": "not-read-here"}
    pulumi.runtime.set_all_config(flat)
    try:
        assert read_settings(pulumi.Config(CONFIG_NAMESPACE), "dev").bucket_name == "mlseg-dev-data"
    finally:
        set_config({})


def test_the_readme_documents_every_setting_the_program_reads_and_no_other():
    """An operator learns the keys from the README: dropletImage, registryTier and imageName
    were read but written nowhere, and registryName's default was one DigitalOcean gives to a
    single account only (registry names are global)."""
    readme = (INFRA.parent / "README.md").read_text()
    table = readme[readme.index("| Key | Default | What it sets |") :].split("\n\n", 1)[0]
    documented = [line.split("`")[1] for line in table.splitlines()[2:]]
    assert sorted(documented) == sorted(KEYS)
    row = next(line for line in table.splitlines() if line.startswith("| `registryName`"))
    assert "global" in row and "REGISTRY" in row
