"""The whole stack, from settings to exports."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as do

from mlseg_infra.network import build_network
from mlseg_infra.registry import build_registry
from mlseg_infra.settings import Secrets, Settings
from mlseg_infra.storage import build_storage
from mlseg_infra.workers import build_workers

PURPOSE = "Machine learning / AI / Data processing"


@dataclass(frozen=True)
class Exports:
    """What `pulumi stack output` shows, and the deploy workflow reads."""

    droplet_ips: pulumi.Output[list[str]]
    bucket_endpoint: pulumi.Output[str]
    registry_endpoint: pulumi.Output[str]
    work_pool: str
    image: str

    def as_dict(self) -> dict[str, object]:
        return {
            "droplet_ips": self.droplet_ips,
            "bucket_endpoint": self.bucket_endpoint,
            "registry_endpoint": self.registry_endpoint,
            "work_pool": self.work_pool,
            "image": self.image,
        }


def build_project(settings: Settings, urns: list[pulumi.Input[str]]) -> do.Project:
    """Groups the stack's droplets, volumes and bucket in the DigitalOcean console."""
    return do.Project(
        "project",
        name=settings.prefix,
        description=f"mlseg nuclei segmentation, {settings.stack} stack (managed by Pulumi)",
        purpose=PURPOSE,
        environment=settings.project_environment,
        resources=urns,
    )


def build_stack(settings: Settings, secrets: Secrets) -> Exports:
    network = build_network(settings)
    storage = build_storage(settings)
    registry = build_registry(settings)
    workers = build_workers(settings, network, storage, registry, secrets)
    urns: list[pulumi.Input[str]] = [storage.bucket.bucket_urn]
    for droplet, volume in workers:
        urns += [droplet.droplet_urn, volume.volume_urn]
    build_project(settings, urns)
    return Exports(
        droplet_ips=pulumi.Output.all(*(droplet.ipv4_address for droplet, _ in workers)),
        bucket_endpoint=storage.bucket.bucket_domain_name,
        registry_endpoint=registry.endpoint,
        work_pool=settings.work_pool,
        image=settings.image,
    )
