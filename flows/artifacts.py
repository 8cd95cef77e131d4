"""Prefect artifacts a person reads in the dashboard: tables, outputs, links, warnings.

Artifact keys are stable per flow (``segment-summary``, ``drift-report``...), so the
dashboard's Artifacts page shows each one's history across runs. Outside a flow or task run
these functions do nothing, so flow code can be unit-tested with ``.fn``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from mlseg.report import frame_records

MAX_TABLE_ROWS = 200


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _key(key: str) -> str:
    """Prefect keys: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")


def table(key: str, data: pd.DataFrame | Mapping[str, Any], description: str = "") -> None:
    """A table artifact (a mapping becomes name/value rows); long tables are cut."""
    if not _in_run():
        return
    if isinstance(data, Mapping):
        # a number stays one, rounded and blank where missing as in every other table (as
        # text it read 1.5079083829987212 s and 'nan'); other values as text
        values = [v if isinstance(v, float) else str(v) for v in data.values()]
        frame = pd.DataFrame({"name": list(data.keys()), "value": values}, dtype=object)
    else:
        frame = data
    if len(frame) > MAX_TABLE_ROWS:
        description += f" (first {MAX_TABLE_ROWS} of {len(frame)} rows)"
        frame = frame.head(MAX_TABLE_ROWS)
    create_table_artifact(frame_records(frame), key=_key(key), description=description or None)


def plain(text: str) -> str:
    """``text`` (a message, a fix) for markdown outside code spans: the dashboard's renderer
    takes ``<stem>`` for an HTML tag and drops it ("Add _mask.png")."""
    return html.escape(text, quote=False)


def markdown(key: str, text: str, description: str = "") -> None:
    if _in_run():
        create_markdown_artifact(text, key=_key(key), description=description or None)


def outputs(key: str, paths: Mapping[str, Any], description: str = "Outputs of this run") -> None:
    """A markdown list of every output path of a run."""
    if not _in_run():
        return
    lines = [f"- **{name}**: `{value}`" for name, value in paths.items() if value is not None]
    create_markdown_artifact(
        "\n".join(lines) or "_no outputs_", key=_key(key), description=description
    )


def link(key: str, path: str | Path, text: str, description: str = "") -> None:
    """A link artifact to a file (``file://`` for local paths) or a URL."""
    if not _in_run():
        return
    target = str(path)
    if "://" not in target:
        target = Path(target).resolve().as_uri()
    create_link_artifact(target, link_text=text, key=_key(key), description=description or None)


def warning(key: str, title: str, message: str) -> None:
    """A markdown artifact that stands out in the dashboard."""
    markdown(key, f"## :warning: {plain(title)}\n\n{plain(message)}\n", description=title)
