"""The Prefect worker droplets."""

from __future__ import annotations

import pulumi
import pulumi_digitalocean as do

from mlseg_infra.cloud_init import worker_user_data
from mlseg_infra.network import Network
from mlseg_infra.registry import Registry
from mlseg_infra.settings import Secrets, Settings
from mlseg_infra.storage import Storage, build_data_volume


def build_workers(
    settings: Settings, network: Network, storage: Storage, registry: Registry, secrets: Secrets
) -> list[tuple[do.Droplet, do.Volume]]:
    """`settings.worker_count` droplets, each with its own data volume attached at create."""
    user_data = worker_user_data(
        settings,
        prefect_api_key=secrets.prefect_api_key,
        spaces_key_id=storage.worker_key.access_key,
        spaces_secret_key=pulumi.Output.secret(storage.worker_key.secret_key),
        docker_config=registry.docker_credentials,
    )
    workers = []
    for index in range(settings.worker_count):
        volume = build_data_volume(settings, index)
        droplet = do.Droplet(
            f"worker-{index}",
            name=f"{settings.prefix}-worker-{index}",
            image=settings.droplet_image,
            size=settings.droplet_size,
            region=settings.region,
            vpc_uuid=network.vpc.id,
            ssh_keys=[network.ssh_key_fingerprint],
            tags=network.worker_tags,
            volume_ids=[volume.id],
            user_data=user_data,
            monitoring=True,
            ipv6=True,
            opts=pulumi.ResourceOptions(
                # A droplet without a firewall is open on every port: never boot one before it.
                depends_on=[network.firewall],
                # New user data (a rotated key), image or region replaces the droplet, and its
                # replacement attaches the same volume, which DigitalOcean attaches to one
                # droplet at a time: the old one has to go first (Pulumi creates the new first).
                delete_before_replace=True,
            ),
        )
        workers.append((droplet, volume))
    return workers
