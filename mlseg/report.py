"""Self-contained HTML report of a pipeline run, for people who do not open the dashboard.

One HTML file with inline CSS and every figure embedded as a base64 PNG: it can be mailed,
attached to a lab notebook or opened from a bucket without anything else. :class:`Report`
is a small builder (headings, text, status lines, tables, figures, files, links);
:func:`pipeline_report` lays out a whole run: validation summary, training curves,
evaluation table and worst cases, model decision, quantification histograms, drift, outputs.
"""

from __future__ import annotations

import base64
import html
import io as _io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlseg.plots import WORST_SHOWN

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1d1d1f;line-height:1.45;overflow-wrap:break-word}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{margin-top:1.2em}.sub{color:#666}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}
th{background:#f4f4f6}td.t,th.t{text-align:left}caption{text-align:left;color:#555;
padding:.3em 0}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}.badge{display:inline-block;padding:.1em .6em;
border-radius:.8em;font-weight:600;font-size:.85em;color:#fff}
.ok{background:#2e7d32}.warn{background:#ed6c02;color:#1d1d1f}.fail{background:#c62828}
.info{background:#546e7a}code{background:#f4f4f6;padding:0 .25em;border-radius:3px}
ul.paths{font-size:.9em}div.wide{overflow-x:auto}
@media print{body{margin:0;max-width:none}table{font-size:.65em}th,td{padding:.15em .3em}
div.wide{overflow:visible}h2,h3{break-after:avoid}figure{break-inside:avoid}}
"""
STATUS_CLASS = {"ok": "ok", "passed": "ok", "warn": "warn", "fail": "fail", "failed": "fail"}


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(value: Any, float_digits: int) -> tuple[str, bool]:
    """HTML text of a table cell and whether it is numeric (right-aligned)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", True
    if isinstance(value, bool | np.bool_):
        return ("yes" if value else "no"), False
    if isinstance(value, int | np.integer):
        return f"{int(value):,}", True
    if isinstance(value, float | np.floating):
        if abs(value) >= 10 ** (float_digits - 1):  # 12,346 nuclei/mm2 or s, not 1.235e+04
            return f"{float(value):,.0f}", True
        return f"{float(value):.{float_digits}g}", True
    return _esc(value), False


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib ``Figure``."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass
class Report:
    """An HTML document built block by block; :meth:`to_html` renders it."""

    title: str
    subtitle: str = ""
    blocks: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Report:
        self.blocks.append(f"<h{level}>{_esc(text)}</h{level}>")
        return self

    def text(self, text: str) -> Report:
        self.blocks.append(f"<p>{_esc(text)}</p>")
        return self

    def status(self, label: str, status: str, message: str = "") -> Report:
        css = STATUS_CLASS.get(status.lower(), "info")
        self.blocks.append(
            f'<p><span class="badge {css}">{_esc(status.upper())}</span> '
            f"<strong>{_esc(label)}</strong> {_esc(message)}</p>"
        )
        return self

    def table(
        self,
        data: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]],
        caption: str = "",
        max_rows: int = 40,
        float_digits: int = 4,
    ) -> Report:
        """A table; a mapping becomes a two-column key/value table. Long tables are cut."""
        if isinstance(data, Mapping):
            df = pd.DataFrame({"name": list(data.keys()), "value": list(data.values())})
        else:
            df = pd.DataFrame(data)
        shown = df.head(max_rows)
        # a long column name (density_per_mm2_tissue) may wrap at its underscores
        head = "".join(
            f'<th class="t">{_esc(c).replace("_", "_<wbr>")}</th>' for c in shown.columns
        )
        rows = []
        for record in shown.itertuples(index=False):
            cells = []
            for value in record:
                text, numeric = _cell(value, float_digits)
                cells.append(f"<td>{text}</td>" if numeric else f'<td class="t">{text}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        more = len(df) - len(shown)
        note = f" (first {len(shown)} of {len(df)} rows)" if more > 0 else ""
        name = _esc(f"{caption}{note}")
        cap = f"<caption>{name}</caption>" if name else ""
        # a table wider than the page scrolls in its box, not the whole page sideways; the
        # box takes the keyboard focus (arrow keys scroll it) and is named by the caption
        box = f' role="region" aria-label="{name}"' if name else ""
        self.blocks.append(
            f'<div class="wide" tabindex="0"{box}><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
        return self

    def png(self, data: bytes, caption: str = "", alt: str = "") -> Report:
        """Embed PNG bytes as a base64 data URI. ``alt`` says what the image shows to
        someone who cannot see it (the caption only names it); it defaults to the caption."""
        encoded = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        self.blocks.append(
            f'<figure><img alt="{_esc(alt or caption)}" src="data:image/png;base64,{encoded}">'
            f"{cap}</figure>"
        )
        return self

    def figure(self, fig, caption: str = "", alt: str = "") -> Report:
        """Embed a matplotlib ``Figure``."""
        return self.png(figure_png(fig), caption, alt)

    def image_file(self, path: str | os.PathLike, caption: str = "", alt: str = "") -> Report:
        """Embed a PNG file (e.g. a plot written by another stage); skipped if absent."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() == ".png":
            self.png(path.read_bytes(), caption, alt)
        return self

    def paths(self, paths: Mapping[str, Any], caption: str = "") -> Report:
        items = "".join(
            f"<li>{_esc(name)}: <code>{_esc(value)}</code></li>" for name, value in paths.items()
        )
        if caption:
            self.blocks.append(f"<p>{_esc(caption)}</p>")
        self.blocks.append(f'<ul class="paths">{items}</ul>')
        return self

    def link(self, text: str, href: str, note: str = "") -> Report:
        """A paragraph with a link to ``href`` (a relative path keeps the page portable)."""
        after = f" {_esc(note)}" if note else ""
        self.blocks.append(f'<p><a href="{_esc(href)}">{_esc(text)}</a>{after}</p>')
        return self

    def to_html(self) -> str:
        sub = f'<p class="sub">{_esc(self.subtitle)}</p>' if self.subtitle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_esc(self.title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_esc(self.title)}</h1>{sub}\n"
            + "\n".join(self.blocks)
            + "\n</main></body></html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the HTML atomically; returns the path."""
        from mlseg.io import write_text

        return write_text(path, self.to_html())


# ----------------------------------------------------------------------------- figures


def _steps(history: pd.DataFrame) -> pd.Series:
    return history["step"] if "step" in history else pd.Series(range(len(history)))


def _curve_columns(history: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The loss columns and the other ``val_``/``train_`` metric columns of ``history``."""
    numeric = [
        c for c in history.columns if c != "step" and pd.api.types.is_numeric_dtype(history[c])
    ]
    losses = [c for c in numeric if "loss" in c]
    others = [c for c in numeric if c.startswith(("val_", "train_")) and "loss" not in c]
    return losses, others


def _said(value: float) -> str:
    """``value`` to 3 significant digits as a screen reader reads it well: 1,340, not the
    1.34e+03 of ``:.3g`` (an area in pixels at 40x)."""
    return f"{float(f'{value:.3g}'):,g}"


def curves_alt(history: pd.DataFrame) -> str:
    """What the training curves show, in words (an image's alt text): each series' first,
    last and best value (lowest loss, highest metric) with its step."""
    x = _steps(history)
    losses, others = _curve_columns(history)
    parts = []
    for c in (*losses, *others):
        values = history[c][history[c].notna()]
        if values.empty:
            continue
        best = values.idxmin() if c in losses else values.idxmax()
        parts.append(
            f"{c} {_said(values.iloc[0])} at step {x[values.index[0]]}, "
            f"{_said(values.iloc[-1])} at step {x[values.index[-1]]}, "
            f"best {_said(values[best])} at step {x[best]}"
        )
    return "Training curves against step: " + ("; ".join(parts) or "no values") + "."


def curves_figure(history: pd.DataFrame):
    """Training curves against ``step``: loss columns (left), other ``val_``/``train_``
    metrics (right)."""
    x = _steps(history)
    losses, others = _curve_columns(history)
    fig = _figure(10, 3.6)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for c in losses:
        ok = history[c].notna()
        ax_loss.plot(x[ok], history.loc[ok, c], marker="o", ms=2, label=c)
    for c in others:
        ok = history[c].notna()
        ax_metric.plot(x[ok], history.loc[ok, c], marker="o", ms=3, label=c)
    ax_loss.set(xlabel="step", title="loss")
    ax_metric.set(xlabel="step", title="validation metrics")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    return fig


def _histogram_columns(nuclei: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        wanted = ("area_um2", "area_px", "circularity", "solidity", "eccentricity")
        columns = [c for c in wanted if c in nuclei.columns]
        columns += _stain_columns(nuclei.columns, "_od_mean")
    return [c for c in columns if c in nuclei.columns][:6]


def _stain_columns(columns: Sequence[str], suffix: str) -> list[str]:
    """The first stain's column ending in ``suffix`` (``_od_mean``: haematoxylin), and
    DAB's where it is measured: an IHC run is graded by its DAB, which the first stain
    alone left out of the report."""
    first = [c for c in columns if c.endswith(suffix)][:1]
    return list(dict.fromkeys(first + [c for c in columns if c == f"dab{suffix}"]))


def histograms_alt(nuclei: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """What :func:`histograms_figure` shows, in words (an image's alt text): the median and
    the 5th to 95th percentile of each measurement drawn."""
    parts = []
    for name in _histogram_columns(nuclei, columns):
        values = pd.to_numeric(nuclei[name], errors="coerce").dropna()
        if not values.empty:
            low, median, high = np.percentile(values, [5, 50, 95])
            parts.append(
                f"{name} median {_said(median)} "
                f"(5th to 95th percentile {_said(low)} to {_said(high)})"
            )
    return f"Histograms of {len(nuclei):,} nuclei: " + ("; ".join(parts) or "no values") + "."


def histograms_figure(nuclei: pd.DataFrame, columns: Sequence[str] | None = None, bins: int = 40):
    """Histograms of per-nucleus measurements (default: area, circularity, solidity,
    eccentricity, the first stain's optical density and DAB's, whichever exist)."""
    columns = _histogram_columns(nuclei, columns)
    n = max(1, len(columns))
    fig = _figure(3.2 * min(n, 3), 2.8 * math.ceil(n / 3))
    axes = np.atleast_1d(fig.subplots(math.ceil(n / 3), min(n, 3), squeeze=False)).ravel()
    for ax, name in zip(axes, columns, strict=False):
        values = pd.to_numeric(nuclei[name], errors="coerce").dropna()
        ax.hist(values, bins=bins, color="#4c72b0", alpha=0.85)
        ax.set(title=name, ylabel="nuclei")
        ax.grid(alpha=0.3)
    for ax in axes[len(columns) :]:
        ax.set_axis_off()
    return fig


# ----------------------------------------------------------------------------- the run report

#: Columns of the per-test-image evaluation shown in the report (every one is in its CSV)
EVALUATION_SHOWN = (
    "stem", "image", "dice", "aji", "pq", "f1", "obj_precision", "obj_recall",
    "n_true", "n_pred", "count_error",
)  # fmt: skip
#: Per-image measurements shown in the report: those drawn in :func:`histograms_figure`,
#: counts, densities and IHC scores (every one is in ``summary.csv``)
QUANTIFICATION_SHOWN = (
    "image", "count", "density_per_mm2", "density_per_mm2_tissue", "tissue_fraction",
    "area_um2_mean", "area_px_mean",
    "circularity_mean", "solidity_mean", "eccentricity_mean", "positive_pct", "h_score",
)  # fmt: skip


#: What the worst-cases figure of :func:`mlseg.plots.worst_figure` shows, in words
WORST_ALT = (
    "One row per worst test case: the image, its true nuclei and the predicted nuclei side by "
    "side, each row titled with the image name, the nucleus counts and its scores."
)


def _main_columns(table: pd.DataFrame, wanted: Sequence[str]) -> pd.DataFrame:
    """``table``'s columns among ``wanted`` (and the mean optical density of the first stain
    and of DAB), for a page a person reads and prints: the per-image summary has some 70
    columns, 12,500 px wide, and a printout kept only the first five (file, profile, model),
    not the count."""
    names = [c for c in dict.fromkeys(wanted) if c in table.columns]
    names += _stain_columns(table.columns, "_od_mean_mean")
    return table[names] if len(names) > 1 else table


def _as_frame(data: Any) -> pd.DataFrame | None:
    if data is None:
        return None
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, str | os.PathLike) and Path(data).is_file():
        path = Path(data)
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return pd.DataFrame(data)


def pipeline_report(
    *,
    title: str = "mlseg pipeline run",
    run: Mapping[str, Any] | None = None,
    validation_status: str | None = None,
    validation: pd.DataFrame | Mapping[str, Any] | None = None,
    history: pd.DataFrame | None = None,
    curves_png: str | os.PathLike | None = None,
    training: Mapping[str, Any] | None = None,
    evaluation: pd.DataFrame | None = None,
    evaluation_means: Mapping[str, float] | None = None,
    worst_metric: str | None = None,
    worst_png: str | os.PathLike | None = None,
    decision: Mapping[str, Any] | None = None,
    quantification: pd.DataFrame | None = None,
    nuclei: pd.DataFrame | None = None,
    drift_status: str | None = None,
    drift_message: str = "",
    drift: pd.DataFrame | None = None,
    run_metrics: Mapping[str, Any] | None = None,
    paths: Mapping[str, Any] | None = None,
    worst_n: int = WORST_SHOWN,
) -> Report:
    """Lay out the report of one pipeline run; every section is optional.

    ``validation`` is a summary table (or key/value mapping), ``history`` the training history
    (``step`` + loss/metric columns; drawn unless ``curves_png`` gives the figure), ``evaluation`` one row per test image, ``quantification``
    one row per segmented image (``count`` etc.), ``nuclei`` one row per nucleus, ``drift``
    the table of :func:`mlseg.monitor.drift_report`. Of ``evaluation`` and ``quantification``
    the page shows the main columns (:data:`EVALUATION_SHOWN`, :data:`QUANTIFICATION_SHOWN`);
    their CSVs hold them all.
    """
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rep = Report(title, subtitle=f"generated {stamp}")
    if run:
        rep.heading("Run").table(dict(run), caption="this run")
    if validation_status is not None or validation is not None:
        rep.heading("1. Data validation")
        if validation_status is not None:
            rep.status("dataset", validation_status)
        if validation is not None:
            rep.table(validation, caption="validation summary")
    if history is not None or training:
        rep.heading("2. Training")
        if training:
            rep.table(dict(training), caption="training result")
        alt = curves_alt(history) if history is not None and not history.empty else ""
        if curves_png is not None and Path(curves_png).is_file():
            rep.image_file(curves_png, caption="training curves", alt=alt)
        elif history is not None and not history.empty:
            rep.figure(curves_figure(history), caption="training curves", alt=alt)
    evaluation = _as_frame(evaluation)
    if evaluation is not None or evaluation_means:
        rep.heading("3. Evaluation on the test split")
        if evaluation_means:
            rep.table(dict(evaluation_means), caption="means over test images")
        if evaluation is not None and not evaluation.empty:
            shown = _main_columns(evaluation, EVALUATION_SHOWN)
            rep.table(shown, caption=f"per test image{_more(shown, evaluation)}", max_rows=60)
            metric = worst_metric if worst_metric in evaluation else None
            if metric:
                worst = evaluation.nsmallest(worst_n, metric)
                shown = _main_columns(worst, (*EVALUATION_SHOWN, metric))
                rep.heading(f"Worst {len(worst)} cases by {metric}", 3)
                rep.table(shown, caption=f"the test images of lowest {metric}, lowest first")
        if worst_png:
            rep.image_file(
                worst_png, caption="worst cases: image | truth | prediction", alt=WORST_ALT
            )
    if decision:
        rep.heading("4. Model registry")
        rep.status(
            "promotion",
            "ok" if decision.get("promoted") else "info",
            str(decision.get("reason", "")),
        )
        rep.table(dict(decision), caption="registry decision")
    quantification = _as_frame(quantification)
    nuclei = _as_frame(nuclei)
    if quantification is not None or nuclei is not None:
        rep.heading("5. Segmentation and quantification")
        if quantification is not None and not quantification.empty:
            shown = _main_columns(quantification, QUANTIFICATION_SHOWN)
            caption = f"per image{_more(shown, quantification)}"
            rep.table(shown, caption=caption, max_rows=60)
        if nuclei is not None and not nuclei.empty:
            rep.figure(
                histograms_figure(nuclei),
                caption=f"{len(nuclei):,} nuclei",
                alt=histograms_alt(nuclei),
            )
    if drift_status is not None or drift is not None or run_metrics:
        rep.heading("6. Monitoring")
        if drift_status is not None:
            rep.status("drift", drift_status, drift_message)
        if drift is not None and not drift.empty:
            rep.table(drift, caption="new images vs training fingerprint")
        if run_metrics:
            rep.table(dict(run_metrics), caption="run metrics")
    if paths:
        rep.heading("Outputs").paths(dict(paths))
    return rep


def _more(shown: pd.DataFrame, table: pd.DataFrame) -> str:
    left = len(table.columns) - len(shown.columns)
    return f", main columns ({left} more in the CSV)" if left else ""


def _rounded(value: float, digits: int) -> float:
    """``value`` to ``digits`` decimals, or to ``digits`` significant digits where that
    keeps more: a learning rate of 3e-05 or a fraction of 2.3e-05 is not 0.0."""
    if value == 0:
        return value
    return round(value, max(digits, digits - 1 - math.floor(math.log10(abs(value)))))


def frame_records(table: pd.DataFrame, digits: int = 4) -> list[dict[str, Any]]:
    """Rows of ``table`` as JSON-ready dicts with rounded floats (for dashboards)."""
    out = []
    for record in table.to_dict(orient="records"):
        clean = {}
        for key, value in record.items():
            if isinstance(value, float | np.floating):
                value = None if not np.isfinite(value) else _rounded(float(value), digits)
            elif isinstance(value, np.integer):
                value = int(value)
            elif isinstance(value, np.bool_):
                value = bool(value)
            clean[str(key)] = value
        out.append(clean)
    return out
