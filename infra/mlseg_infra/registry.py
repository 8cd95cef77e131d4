"""The container registry holding the worker image, and the workers' read-only login."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as do

from mlseg_infra.settings import Settings


@dataclass(frozen=True)
class Registry:
    endpoint: pulumi.Output[str]
    docker_credentials: pulumi.Output[str]


def build_registry(settings: Settings) -> Registry:
    """Create the account's registry, or look it up by name.

    DigitalOcean allows one registry per account, so only one stack creates it
    (`registryCreate: true`, the dev stack by default) and keeps it on `destroy`
    (`retain_on_delete`); the other stacks read it.
    """
    if settings.registry_create:
        registry = do.ContainerRegistry(
            "registry",
            name=settings.registry_name,
            subscription_tier_slug=settings.registry_tier,
            region=settings.region,
            opts=pulumi.ResourceOptions(retain_on_delete=True),
        )
        endpoint, name = registry.endpoint, registry.name
    else:
        found = do.get_container_registry_output(name=settings.registry_name)
        endpoint, name = found.endpoint, found.name
    credentials = do.ContainerRegistryDockerCredentials(
        "worker-registry-credentials", registry_name=name, write=False
    )
    return Registry(
        endpoint=endpoint, docker_credentials=pulumi.Output.secret(credentials.docker_credentials)
    )
