"""Prefect artifacts a person reads in the dashboard: tables, outputs, links, warnings.

Artifact keys are stable per flow (``segment-summary``, ``drift-report``...), so the
dashboard's Artifacts page shows each one's history across runs. Outside a flow or task run
these functions do nothing, so flow code can be unit-tested with ``.fn``. One the Prefect API
does not take (down past its client's retries, refusing it) is a warning in the run's log, not
a failed run: a run publishes them once its outputs are on disk.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger

from mlseg.report import frame_records

MAX_TABLE_ROWS = 200


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _key(key: str) -> str:
    """Prefect keys: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")


def _publish(create: Callable[..., Any], key: str, *args: Any, **kwargs: Any) -> None:
    """``create(*args, key=key, **kwargs)``; an API error is logged, not raised. A server
    restarted for over a minute as a segment run published its summary failed that run,
    its images, run.json and history row all written, and its marks left behind."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    try:
        create(*args, key=_key(key), **kwargs)
    except httpx.HTTPError as err:
        get_run_logger().warning(
            "artifact %s not published (the run goes on; its outputs are on disk): the "
            "Prefect API at %s (PREFECT_API_URL) answered %s: %s",
            _key(key),
            PREFECT_API_URL.value() or "(a temporary local server)",
            type(err).__name__,
            err,
        )


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
    _publish(create_table_artifact, key, frame_records(frame), description=description or None)


def plain(text: str) -> str:
    """``text`` (a message, a fix) for markdown outside code spans: the dashboard's renderer
    takes ``<stem>`` for an HTML tag and drops it ("Add _mask.png"), and a failed image
    ``slide*1*.png`` for emphasis ("slide1.png") or ``[x](url)`` in a name for a link.
    Lines stay lines (a caller's list stays a list)."""
    return re.sub(r"([\\`*_\[\]|~])", r"\\\1", html.escape(text, quote=False))


def code(text: object) -> str:
    """``text`` (a path, a file name) as one markdown code span: a backtick in it ended the
    span early and let the rest render as markdown; a line break in it split the line."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown(key: str, text: str, description: str = "") -> None:
    if _in_run():
        _publish(create_markdown_artifact, key, text, description=description or None)


def outputs(key: str, paths: Mapping[str, Any], description: str = "Outputs of this run") -> None:
    """A markdown list of every output path of a run."""
    if not _in_run():
        return
    lines = [
        f"- **{plain(name)}**: {code(value)}" for name, value in paths.items() if value is not None
    ]
    _publish(
        create_markdown_artifact, key, "\n".join(lines) or "_no outputs_", description=description
    )


def link(key: str, path: str | Path, text: str, description: str = "") -> None:
    """A link artifact to a file (``file://`` for local paths) or a URL."""
    if not _in_run():
        return
    target = str(path)
    if "://" not in target:
        target = Path(target).resolve().as_uri()
    _publish(create_link_artifact, key, target, link_text=text, description=description or None)


def warning(key: str, title: str, message: str) -> None:
    """A markdown artifact that stands out in the dashboard."""
    markdown(key, f"## :warning: {plain(title)}\n\n{plain(message)}\n", description=title)
