"""``validation.html``: the verdict of one validation run as a page a person reads offline.

Great Expectations' Data Docs load Bootstrap, jQuery, bootstrap-table, Font Awesome and Vega
from CDNs: opened without a network (an air-gapped workstation, a report mailed or opened
from a share) the index lists no validation result and a failed row shows no mark. This page
is one file built with :class:`mlseg.report.Report` (inline CSS, no script, nothing fetched):
the verdict in words, every failed or warned rule with its first files and fix, the passing
checks, and a relative link to the Data Docs as the full view.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mlseg.report import Report

if TYPE_CHECKING:
    from expectations.runner import Outcome, ValidationReport


def _files(o: Outcome) -> str:
    if o.error:
        return f"Could not run: {o.error}"
    if not o.first_failed:
        return ""
    more = o.n_failed - len(o.first_failed)
    tail = f", and {more:,} more (all in validation.json)" if more > 0 else ""
    label = f"First {len(o.first_failed)} failed" if more > 0 else "Failed"
    return f"{label}: {', '.join(o.first_failed)}{tail}."


def validation_page(report: ValidationReport, path: str | os.PathLike) -> Report:
    """The page of ``report`` to be written at ``path`` (the Data Docs link is relative to it)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = Path(report.root).name or str(report.root)
    page = Report(f"Data validation of {name}", subtitle=f"{report.root}, checked {stamp}")
    problems = (*report.errors, *report.warnings)
    counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    if report.success:
        message = f"{counts} in {len(report.outcomes)} checks: the data may be trained on."
    else:
        message = f"{counts} in {len(report.outcomes)} checks: training must not start."
    page.status("verdict", "passed" if report.success else "failed", message)
    if problems:
        page.heading("Failed checks")
        for o in problems:
            page.status(
                o.rule,
                "fail" if o.severity == "error" else "warn",
                f"{o.n_failed:,} of {o.n_checked:,} failed ("
                + (f"needs {o.bound}; " if o.bound else "")
                + f"{o.severity}; suite {o.suite} "
                f"v{o.suite_version}, {o.expectation}" + (f" on {o.column})" if o.column else ")"),
            )
            files = _files(o)
            if files:
                page.text(files)
            if o.fix:
                page.text(f"What to do: {o.fix}")
    passed = [o for o in report.outcomes if o.success]
    if passed:
        page.heading("Passed checks")
        page.table(
            [
                {"rule": o.rule, "suite": o.suite, "severity": o.severity, "checked": o.n_checked}
                for o in passed
            ],
            caption="passed checks",
            max_rows=len(passed),
        )
    page.heading("Dataset")
    versions = ", ".join(f"{k} v{v}" for k, v in sorted(report.suite_versions.items()))
    page.table({"dataset": report.root, "checked": stamp, "suites": versions}, caption="dataset")
    if report.data_docs is not None:
        href = Path(os.path.relpath(report.data_docs, Path(path).parent)).as_posix()
        page.heading("Great Expectations Data Docs")
        page.link(
            href,
            href,
            "(needs an internet connection): the full Great Expectations view, every "
            "expectation with its arguments and observed values.",
        )
    return page
