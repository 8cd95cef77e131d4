"""Droplet size slugs and the minimum a worker needs.

The source paper runs the pipeline on a droplet with at least 4 GB of memory and a 25 GB disk;
smaller sizes run out of memory while training. The numbers below are DigitalOcean's published
memory (GiB) and disk (GB) for each slug.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_MEMORY_GB = 4.0
MIN_DISK_GB = 25


class SizeError(ValueError):
    """A droplet size that is unknown or below the minimum."""


@dataclass(frozen=True)
class DropletSize:
    slug: str
    memory_gb: float
    disk_gb: int | None  # None: the slug does not spell the disk out and is not in SIZES

    @property
    def is_gpu(self) -> bool:
        return self.slug.startswith("gpu-")


SIZES: dict[str, DropletSize] = {
    s.slug: s
    for s in (
        DropletSize("s-1vcpu-512mb-10gb", 0.5, 10),
        DropletSize("s-1vcpu-1gb", 1, 25),
        DropletSize("s-1vcpu-2gb", 2, 50),
        DropletSize("s-2vcpu-2gb", 2, 60),
        DropletSize("s-2vcpu-4gb", 4, 80),
        DropletSize("s-4vcpu-8gb", 8, 160),
        DropletSize("s-8vcpu-16gb", 16, 320),
        DropletSize("c-2", 4, 25),
        DropletSize("c-4", 8, 50),
        DropletSize("c-8", 16, 100),
        DropletSize("g-2vcpu-8gb", 8, 25),
        DropletSize("g-4vcpu-16gb", 16, 50),
        DropletSize("m-2vcpu-16gb", 16, 50),
        DropletSize("gpu-h100x1-80gb", 240, 720),
        DropletSize("gpu-h100x8-640gb", 1920, 2046),
    )
}

# "s-2vcpu-4gb", "s-2vcpu-4gb-amd", "s-1vcpu-512mb-10gb", "so1_5-2vcpu-16gb": family, vCPUs,
# memory, then an optional disk and an optional CPU variant.
_SLUG = re.compile(
    r"^(?P<family>[a-z0-9_]+)-(?P<vcpu>\d+)vcpu-(?P<memory>\d+)(?P<unit>gb|mb)"
    r"(?:-(?P<disk>\d+)gb)?(?:-(?P<variant>[a-z]+))?$"
)


def lookup(slug: str) -> DropletSize:
    """The memory and disk of `slug`, from SIZES or from the slug's own name.

    Raises SizeError for a slug that is neither listed nor of the `s-2vcpu-4gb` form.
    """
    if slug in SIZES:
        return SIZES[slug]
    match = _SLUG.match(slug)
    if match is None:
        raise SizeError(
            f"droplet size {slug!r} is not a known DigitalOcean slug and does not read as "
            f"'<family>-<N>vcpu-<M>gb'; use one of {', '.join(sorted(SIZES))} "
            "or add it to infra/mlseg_infra/sizes.py"
        )
    memory = int(match["memory"]) / (1024 if match["unit"] == "mb" else 1)
    disk = int(match["disk"]) if match["disk"] else None
    return DropletSize(slug, memory, disk)


def require_minimum(slug: str) -> DropletSize:
    """Refuse sizes below the paper's minimum of 4 GB memory and 25 GB disk.

    A slug that names its memory but not its disk (an unlisted `s-4vcpu-16gb-intel`, say) is
    judged on memory alone: every DigitalOcean size with 4 GB or more ships a disk of at least
    25 GB (the smallest is c-2 with 25 GB).
    """
    size = lookup(slug)
    if size.memory_gb < MIN_MEMORY_GB:
        raise SizeError(
            f"droplet size {slug!r} has {size.memory_gb:g} GB of memory; a worker needs at least "
            f"{MIN_MEMORY_GB:g} GB (try s-2vcpu-4gb)"
        )
    if size.disk_gb is not None and size.disk_gb < MIN_DISK_GB:
        raise SizeError(
            f"droplet size {slug!r} has a {size.disk_gb} GB disk; a worker needs at least "
            f"{MIN_DISK_GB} GB (try s-2vcpu-4gb)"
        )
    return size
