"""Network resources: tags, VPC, SSH key and the workers' firewall."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as do

from mlseg_infra.settings import Settings

ANYWHERE = ["0.0.0.0/0", "::/0"]


@dataclass(frozen=True)
class Network:
    vpc: do.Vpc
    ssh_key_fingerprint: pulumi.Output[str]
    worker_tags: list[pulumi.Output[str]]
    firewall: do.Firewall


def worker_tag_names(settings: Settings) -> list[str]:
    """Tags on every worker: the project, its stack, and (last) the firewall's target."""
    return ["mlseg", f"env:{settings.stack}", f"{settings.prefix}-worker"]


def build_tags(settings: Settings) -> list[pulumi.Output[str]]:
    return [
        do.Tag(f"tag-{name.replace(':', '-')}", name=name).name
        for name in worker_tag_names(settings)
    ]


def build_firewall(settings: Settings, target_tag: pulumi.Input[str]) -> do.Firewall:
    """SSH from the admin networks only, nothing else inbound; all outbound traffic allowed.

    The firewall targets the worker tag rather than droplet ids, so a worker added later is
    covered from its first boot.
    """
    inbound = (
        [
            do.FirewallInboundRuleArgs(
                protocol="tcp", port_range="22", source_addresses=list(settings.admin_cidrs)
            )
        ]
        if settings.admin_cidrs
        else []
    )
    outbound = [
        do.FirewallOutboundRuleArgs(
            protocol="tcp", port_range="1-65535", destination_addresses=ANYWHERE
        ),
        do.FirewallOutboundRuleArgs(
            protocol="udp", port_range="1-65535", destination_addresses=ANYWHERE
        ),
        do.FirewallOutboundRuleArgs(protocol="icmp", destination_addresses=ANYWHERE),
    ]
    return do.Firewall(
        "workers-firewall",
        name=f"{settings.prefix}-workers",
        tags=[target_tag],
        inbound_rules=inbound,
        outbound_rules=outbound,
    )


def admin_ssh_key_fingerprint(settings: Settings) -> pulumi.Output[str]:
    """The admins' key: registered by this stack, or one the account holds (`sshKeyName`).

    DigitalOcean refuses to register a public key twice in one account, so the second stack
    (or a person whose key is already there) names the existing key instead.
    """
    if settings.ssh_key_name:
        return do.get_ssh_key_output(name=settings.ssh_key_name).fingerprint
    return do.SshKey(
        "admin-ssh-key", name=f"{settings.prefix}-admin", public_key=settings.ssh_public_key
    ).fingerprint


def build_network(settings: Settings) -> Network:
    vpc = do.Vpc(
        "vpc",
        name=f"{settings.prefix}-vpc",
        region=settings.region,
        description=f"mlseg {settings.stack} workers",
    )
    fingerprint = admin_ssh_key_fingerprint(settings)
    tags = build_tags(settings)
    firewall = build_firewall(settings, target_tag=tags[-1])
    return Network(vpc=vpc, ssh_key_fingerprint=fingerprint, worker_tags=tags, firewall=firewall)
