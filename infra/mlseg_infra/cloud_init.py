"""cloud-init user data for a worker droplet.

DigitalOcean has no instance identity or secret store a droplet could use at boot, so whatever
the worker needs to authenticate (Prefect API key, bucket key, registry login) has to reach it
through user data or over SSH. We keep the two apart:

- the *public part* is rendered from `infra/templates/cloud-config.yaml` with the settings
  only; it never sees a secret, so it can be read, diffed and schema-checked freely;
- the *secret part* is a second cloud-config that only writes two root-only (0600) files,
  merged by cloud-init into the first (list append);
- the two travel as one MIME multipart document that the program wraps in
  `pulumi.Output.secret`, so it is encrypted in the state and masked in previews and CI logs.

Both parts are deterministic (fixed MIME boundary, sorted keys) so an unchanged stack does not
replace its droplets.
"""

from __future__ import annotations

import json
import string
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pulumi
import yaml

from mlseg_infra.settings import Settings

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "cloud-config.yaml"
SECRETS_ENV = "/etc/mlseg/secrets.env"
#: The worker image's user (the Dockerfile's ``USER``): it must own the data volume it writes.
IMAGE_UID = 10001
DOCKER_CONFIG = "/root/.docker/config.json"
_BOUNDARY = "==mlseg-user-data=="
# cloud-init's default merge replaces lists; append keeps the public part's write_files.
_APPEND = [
    {"name": "list", "settings": ["append"]},
    {"name": "dict", "settings": ["no_replace", "recurse_list"]},
]


class _Template(string.Template):
    # `$` belongs to the shell scripts and systemd units inside the template.
    delimiter = "@"


def render_public_config(settings: Settings) -> str:
    """The public cloud-config of a worker, as text starting with `#cloud-config`."""
    values = {
        "stack": settings.stack,
        "work_pool": settings.work_pool,
        "worker_flow_limit": str(settings.worker_flow_limit),
        "prefect_api_url": settings.prefect_api_url,
        "spaces_endpoint": settings.spaces_endpoint,
        "region": settings.region,
        "bucket_name": settings.bucket_name,
        "dataset_prefix": settings.dataset_prefix,
        "image": settings.image,
        "docker_gpu_flags": "--gpus all " if settings.gpu else "",
        "image_uid": str(IMAGE_UID),
    }
    text = _Template(TEMPLATE.read_text()).substitute(values)
    yaml.safe_load(text)  # a template edit that breaks YAML fails here, not on the droplet
    return text


def render_secret_config(
    prefect_api_key: str, spaces_key_id: str, spaces_secret_key: str, docker_config: str
) -> str:
    """The secret cloud-config part: root-only files, nothing else."""
    env = (
        f"PREFECT_API_KEY={prefect_api_key}\n"
        f"AWS_ACCESS_KEY_ID={spaces_key_id}\n"
        f"AWS_SECRET_ACCESS_KEY={spaces_secret_key}\n"
    )
    document = {
        "merge_how": _APPEND,
        "write_files": [
            {"path": SECRETS_ENV, "owner": "root:root", "permissions": "0600", "content": env},
            {
                "path": DOCKER_CONFIG,
                "owner": "root:root",
                "permissions": "0600",
                "content": json.dumps(json.loads(docker_config), sort_keys=True),
            },
        ],
    }
    return "#cloud-config\n" + yaml.safe_dump(document, sort_keys=True)


def combine(public: str, secret: str) -> str:
    """One MIME multipart user data document; the public part first."""
    message = MIMEMultipart(boundary=_BOUNDARY)
    for name, text in (("mlseg-worker.cfg", public), ("mlseg-secrets.cfg", secret)):
        part = MIMEText(text, "cloud-config", "us-ascii")
        part.add_header("Content-Disposition", "attachment", filename=name)
        message.attach(part)
    return message.as_string()


def worker_user_data(
    settings: Settings,
    prefect_api_key: pulumi.Input[str],
    spaces_key_id: pulumi.Input[str],
    spaces_secret_key: pulumi.Input[str],
    docker_config: pulumi.Input[str],
) -> pulumi.Output[str]:
    """The droplet's user data, as a secret Output."""
    public = render_public_config(settings)
    combined = pulumi.Output.all(
        prefect_api_key, spaces_key_id, spaces_secret_key, docker_config
    ).apply(lambda values: combine(public, render_secret_config(*values)))
    return pulumi.Output.secret(combined)
