"""Steps that ``prefect deploy`` runs from prefect.yaml's ``build`` section.

A step is called in the Python of the ``prefect`` command itself, so it works with
``.venv/bin/prefect`` from a venv that is not activated; a shell step's ``python`` is whatever
PATH finds, none where only ``python3`` is installed.
"""

from __future__ import annotations

import json
from pathlib import Path


def profiles_parameter(path: str = "mlseg/profiles.yaml") -> dict[str, str]:
    """The profiles file at ``path`` (relative: the folder ``prefect deploy`` runs in) as JSON
    text under ``json``, the segmentation deployments' ``profiles`` parameter; the flows
    validate it when they run."""
    import yaml

    return {"json": json.dumps(yaml.safe_load(Path(path).read_text(encoding="utf-8")))}
