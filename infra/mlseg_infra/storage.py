"""Storage: the Spaces bucket for datasets, models and results, its worker key, data volumes."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as do

from mlseg_infra.settings import Settings

VOLUME_LABEL = "mlseg-data"  # the worker's cloud-config mounts LABEL=mlseg-data


@dataclass(frozen=True)
class Storage:
    bucket: do.SpacesBucket
    worker_key: do.SpacesKey


def build_bucket(settings: Settings) -> do.SpacesBucket:
    """A private, versioned bucket; `force_destroy` stays off so data outlives a `destroy`."""
    return do.SpacesBucket(
        "bucket",
        name=settings.bucket_name,
        region=settings.region,
        acl="private",
        versioning=do.SpacesBucketVersioningArgs(enabled=True),
        force_destroy=False,
    )


def build_worker_key(settings: Settings, bucket: do.SpacesBucket) -> do.SpacesKey:
    """A Spaces key limited to this bucket, so a worker holds no account-wide credential."""
    return do.SpacesKey(
        "worker-spaces-key",
        name=f"{settings.prefix}-workers",
        grants=[do.SpacesKeyGrantArgs(bucket=bucket.name, permission="readwrite")],
    )


def build_storage(settings: Settings) -> Storage:
    bucket = build_bucket(settings)
    return Storage(bucket=bucket, worker_key=build_worker_key(settings, bucket))


def build_data_volume(settings: Settings, index: int) -> do.Volume:
    """One block-storage volume per worker: a DigitalOcean volume attaches to one droplet.

    Protected: the worker keeps runs, the model registry, results and the inbox there, so a
    `pulumi destroy`, a lower `workerCount` or another region (which replaces it) stops with
    Pulumi's "protected" error until a person unprotects it.
    """
    return do.Volume(
        f"data-volume-{index}",
        name=f"{settings.prefix}-data-{index}",
        region=settings.region,
        size=settings.volume_size_gb,
        initial_filesystem_type="ext4",
        initial_filesystem_label=VOLUME_LABEL,
        description=f"mlseg {settings.stack} datasets and scratch for worker {index}",
        opts=pulumi.ResourceOptions(protect=True),
    )
