"""Which deploy jobs a change needs; used by .github/workflows/deploy.yml.

Reads changed paths (one per line) on stdin and prints `image=`, `infra=` and `flows=` lines
for $GITHUB_OUTPUT. A change to the quantification profiles or prefect.yaml alone redeploys
the flows (`prefect deploy --all` passes the profiles as parameters) without rebuilding the
image. Standard library only: it runs before any dependency is installed.

    git diff --name-only BASE HEAD | python infra/mlseg_infra/deploy_plan.py
    python infra/mlseg_infra/deploy_plan.py --all     # unknown base: do everything
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from fnmatch import fnmatch

# Everything the Dockerfile copies into the image (kept in step by a test).
IMAGE_INPUTS = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "mlseg/*",
    "flows/*",
    "expectations/*",
    "infra/docker-entrypoint.sh",
)
# Read at deploy time, not baked into anything the worker runs from the image.
FLOW_INPUTS = ("mlseg/profiles.yaml", "prefect.yaml")
INFRA_INPUTS = ("infra/*", ".github/workflows/deploy.yml")


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(path, pattern) for pattern in patterns)


def plan(changed: Iterable[str]) -> dict[str, bool]:
    paths = [p.strip() for p in changed if p.strip()]
    image = any(_matches(p, IMAGE_INPUTS) and not _matches(p, FLOW_INPUTS) for p in paths)
    infra = any(_matches(p, INFRA_INPUTS) and p != "infra/docker-entrypoint.sh" for p in paths)
    flows = image or any(_matches(p, FLOW_INPUTS) for p in paths)
    return {"image": image, "infra": infra, "flows": flows}


def main(argv: list[str]) -> int:
    result = (
        dict.fromkeys(("image", "infra", "flows"), True) if "--all" in argv else plan(sys.stdin)
    )
    for key, value in result.items():
        print(f"{key}={'true' if value else 'false'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
