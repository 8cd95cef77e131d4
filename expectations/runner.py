"""Run the versioned expectation suites on a dataset inventory with Great Expectations.

Each ``suites/*.json`` file is one Great Expectations 1.x suite (``name``, ``expectations``)
whose ``meta`` says which inventory table it checks (``files`` or ``splits``, see
:mod:`mlseg.inventory`), its ``severity`` (``error`` stops training, ``warning`` is reported),
its ``version`` and the ``index_column`` that names a failing row. Every expectation carries
``meta.rule`` (the name users see) and ``notes`` (what to do when it fails). Suite parameters
(``{"$PARAMETER": ...}``) are filled from the validation config (``min_images_per_split``).

:func:`run_suites` validates each table once per suite in an ephemeral GX context (nothing is
written but the Data Docs site, if asked) and returns a :class:`ValidationReport`;
:func:`validate_dataset` is the whole gate: inventory, suites, Data Docs, output files
(``validation.html``, :mod:`expectations.page`, is the verdict readable offline).
Great Expectations is imported only inside :func:`run_suites` (the import takes seconds).
"""

from __future__ import annotations

import contextlib
import difflib
import html
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mlseg.errors import ConfigError, cannot_write
from mlseg.inventory import Inventory, ValidateConfig, build_inventory, write_inventory
from mlseg.io import write_table, write_text

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SEVERITIES = ("error", "warning")
TABLES = ("files", "splits")
#: How many failing file names a summary shows per expectation.
FIRST_NAMES = 5


@dataclass(frozen=True)
class Outcome:
    """The result of one expectation: which rule, how bad, how many rows failed and which."""

    rule: str
    severity: str
    success: bool
    n_failed: int
    n_checked: int
    failed: tuple[str, ...]
    suite: str
    suite_version: str
    expectation: str
    column: str | None
    fix: str
    error: str | None = None
    #: The rule's bound as its suite's arguments set it (``grey_std >= 0.002``; :func:`bound`),
    #: shown beside :attr:`fix`, whose words give no number: a lab that edits a threshold
    #: sees the value it set. Empty where the arguments say nothing a reader needs.
    bound: str = ""

    @property
    def first_failed(self) -> tuple[str, ...]:
        return self.failed[:FIRST_NAMES]


@dataclass(frozen=True)
class ValidationReport:
    """All outcomes of one validation run; ``success`` is False on any error-level failure."""

    root: str
    outcomes: tuple[Outcome, ...]
    suite_versions: dict[str, str]
    data_docs: Path | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.success and o.severity == "error")

    @property
    def warnings(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.success and o.severity == "warning")

    @property
    def success(self) -> bool:
        return not self.errors

    @property
    def page(self) -> Path | None:
        """``validation.html``, the verdict readable offline, once :func:`write_report` wrote it."""
        return Path(self.outputs["page"]) if "page" in self.outputs else None

    def where(self) -> str:
        """Where to read the verdict: ``validation.html`` first, then the Data Docs (their
        pages load their styles and scripts from CDNs and show nothing offline)."""
        docs = f"Data Docs (needs an internet connection): {self.data_docs}"
        if self.page is None:
            return docs if self.data_docs is not None else ""
        return f"{self.page}" + (f"; {docs}" if self.data_docs is not None else "")

    def with_outputs(self, outputs: dict[str, Any]) -> ValidationReport:
        """A copy with ``outputs`` (name -> path) added to the report's."""
        from dataclasses import replace

        return replace(self, outputs={**self.outputs, **{k: str(v) for k, v in outputs.items()}})

    def check(self, root: str | os.PathLike) -> None:
        """Raise :class:`~mlseg.errors.ValidationFailed` naming the failed error-level rules
        and where to read why (:meth:`where`), if there are any: the data must not be
        trained on."""
        from mlseg.errors import ValidationFailed

        if self.errors:
            where = self.where()
            raise ValidationFailed(
                f"{root}: {len(self.errors)} error-level expectation(s) failed "
                f"({', '.join(o.rule for o in self.errors)})" + (f"; see {where}" if where else "")
            )

    def failed_rules(self, severity: str | None = None) -> list[str]:
        """Names of the failed rules (of one severity, or all), in suite order."""
        return [
            o.rule
            for o in self.outcomes
            if not o.success and (severity is None or o.severity == severity)
        ]

    def outcome(self, rule: str) -> Outcome:
        """The outcome of the rule named ``rule`` (KeyError if no suite has it)."""
        for o in self.outcomes:
            if o.rule == rule:
                return o
        raise KeyError(rule)

    def to_frame(self) -> pd.DataFrame:
        """One row per expectation: rule, severity, success, n_failed, n_checked, first_failed."""
        rows = []
        for o in self.outcomes:
            row = {k: v for k, v in asdict(o).items() if k != "failed"}
            row["first_failed"] = "; ".join(o.first_failed)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: summary counts, suite versions and every outcome with all failing names."""
        return {
            "root": self.root,
            "success": self.success,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "suite_versions": self.suite_versions,
            "data_docs": str(self.data_docs) if self.data_docs else None,
            "outcomes": [{**asdict(o), "failed": list(o.failed)} for o in self.outcomes],
        }


def load_suites(suites_dir: str | os.PathLike = SUITES_DIR) -> list[dict[str, Any]]:
    """Read and check every ``*.json`` suite in ``suites_dir`` (sorted by file name)."""
    return [spec for _, spec in _suite_files(suites_dir)]


def _suite_files(suites_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Each suite file of ``suites_dir`` with its checked content, so that a later error can
    name the file to fix (a copied suite keeps its name, not its file's)."""
    suites_dir = Path(suites_dir)
    paths = sorted(suites_dir.glob("*.json"))
    if not paths:
        raise ConfigError(f"{suites_dir}: no expectation suites (*.json) found")
    suites: list[tuple[Path, dict[str, Any]]] = []
    for path in paths:
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: bad expectation suite: not a JSON object")
        meta = spec.get("meta") or {}
        expectations = spec.get("expectations") or []
        problems = []
        if not spec.get("name"):
            problems.append("missing 'name'")
        if not isinstance(meta, dict):
            problems.append("meta must be an object")
            meta = {}
        if not meta.get("version"):
            problems.append("missing meta.version")
        if meta.get("severity") not in SEVERITIES:
            problems.append(f"meta.severity must be one of {', '.join(SEVERITIES)}")
        if meta.get("table") not in TABLES:
            problems.append(f"meta.table must be one of {', '.join(TABLES)}")
        if not isinstance(expectations, list):
            problems.append("expectations must be a list")
            expectations = []
        for i, exp in enumerate(expectations):
            if not isinstance(exp, dict) or not (
                isinstance(exp.get("type"), str) and isinstance(exp.get("kwargs"), dict)
            ):
                problems.append(f"expectation {i} needs a 'type' and its 'kwargs' (an object)")
            elif not isinstance(exp.get("meta"), dict) or not exp["meta"].get("rule"):
                problems.append(f"expectation {i} has no meta.rule")
            else:
                problems += _severity_problems(i, exp, meta.get("severity"))
        if problems:
            raise ConfigError(f"{path}: bad expectation suite: {'; '.join(problems)}")
        suites.append((path, spec))
    files: dict[str, Path] = {}
    for path, spec in suites:
        if spec["name"] in files:  # Great Expectations refused the second with a traceback
            raise ConfigError(
                f"{path}: suite name {spec['name']!r} is also {files[spec['name']]}'s; "
                "give each suite file a name of its own"
            )
        files[spec["name"]] = path
    rules = [e["meta"]["rule"] for _, s in suites for e in s.get("expectations", [])]
    dupes = sorted({r for r in rules if rules.count(r) > 1})
    if dupes:
        raise ConfigError(f"{suites_dir}: rule names used twice: {', '.join(dupes)}")
    return suites


#: Great Expectations' own expectation severities, as the suites' ``meta.severity`` says them.
GX_SEVERITIES = {"critical": "error", "warning": "warning", "info": "info"}


def _severity_problems(i: int, exp: dict[str, Any], severity: str | None) -> list[str]:
    """A severity set on one expectation (Great Expectations' ``severity`` or ``meta.severity``)
    that is not its suite's: the suite's ``meta.severity`` decides for all its rules, and a
    rule marked ``warning`` in an error suite stopped training without a word."""
    problems = []
    for key, given in (
        ("severity", exp.get("severity")),
        ("meta.severity", exp["meta"].get("severity")),
    ):
        if given is None or severity not in SEVERITIES:
            continue
        said = GX_SEVERITIES.get(given, given) if key == "severity" else given
        if said != severity:
            problems.append(
                f"expectation {i} ({exp['meta']['rule']}) sets {key} {given!r}, but this "
                f"suite's meta.severity ({severity}) decides for every rule in it: move the "
                f"expectation into a suite whose meta.severity is the one it needs "
                f"({', '.join(SEVERITIES)}), or remove its {key}"
            )
    return problems


def _expectations(
    spec: dict[str, Any], path: Path, params: dict[str, Any], columns: Iterable[str]
) -> list[Any]:
    """The suite's expectations as Great Expectations objects, each checked: GX logs an
    expectation it cannot build and leaves it out of the suite, so a misspelt type or
    argument would drop its rule from the gate without failing it. ``columns`` are those of
    the suite's table: a misspelt column made its rule one that 'could not run', with the
    data's fix as what to do, and passed the gate in a warning suite."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    built = []
    _check_columns(
        f"{path}: suite {spec['name']}, meta.index_column",
        [spec["meta"].get("index_column", "path")],
        spec["meta"]["table"],
        columns,
    )
    for i, exp in enumerate(spec["expectations"]):
        where = f"{path}: suite {spec['name']}, expectation {i} ({exp['meta']['rule']})"
        _check_columns(where, _named_columns(exp), spec["meta"]["table"], columns)
        unknown = [
            value["$PARAMETER"]
            for value in exp["kwargs"].values()
            if isinstance(value, dict) and value.get("$PARAMETER") not in (None, *params)
        ]
        if unknown:
            raise ConfigError(
                f"{where}: unknown parameter {unknown[0]!r}; known: {', '.join(sorted(params))}"
            )
        try:
            built.append(ExpectationConfiguration(**exp).to_domain_obj())
        except Exception as err:  # unknown type, missing or misspelt argument, wrong value
            details = getattr(err, "errors", None)
            said = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in details())
                if callable(details)
                else " ".join(str(getattr(err, "message", err)).split())
            )
            raise ConfigError(
                f"{where}: not a valid Great Expectations expectation {exp.get('type')!r}: {said}"
            ) from err
    return built


#: The file of the validation output folder that holds each table (its header: the columns).
TABLE_FILES = {"files": "inventory.csv", "splits": "splits.csv"}


def _named_columns(exp: dict[str, Any]) -> list[str]:
    """The table columns expectation ``exp`` names: those it checks and the one of its own
    that names its failing rows (:func:`_index_columns`)."""
    kwargs = exp["kwargs"]
    named = [kwargs.get(k) for k in ("column", "column_A", "column_B")]
    for key in ("column_list", "column_set"):
        if isinstance(kwargs.get(key), list):
            named += kwargs[key]
    named.append(exp["meta"].get("index_column"))
    return [c for c in dict.fromkeys(named) if isinstance(c, str)]


def _check_columns(where: str, named: list[str], table: str, columns: Iterable[str]) -> None:
    """Raise :class:`ConfigError` at ``where`` for the first of ``named`` not in ``columns``
    (those of ``table``), with the nearest column's name."""
    columns = list(columns)
    missing = [c for c in named if c not in columns]
    if missing:
        close = difflib.get_close_matches(missing[0], columns, n=1)
        raise ConfigError(
            f"{where}: no column {missing[0]!r} in the {table} table"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; its columns are those of {TABLE_FILES[table]} in the output folder"
        )


def preload_great_expectations() -> threading.Thread:
    """Import Great Expectations in a daemon thread, so that the seconds it takes overlap
    other work (the inventory); :func:`run_suites` then finds it loaded (the import lock
    makes it wait for an import in progress). Import errors surface in :func:`run_suites`."""

    def load() -> None:
        with contextlib.suppress(Exception):
            import great_expectations  # noqa: F401

    thread = threading.Thread(target=load, name="gx-import", daemon=True)
    thread.start()
    return thread


def _context(data_docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if data_docs_dir is not None:
        sites["mlseg"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(data_docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _outcome(
    result: Any, spec: dict[str, Any], exp_spec: dict[str, Any], params: dict[str, Any]
) -> Outcome:
    meta = spec["meta"]
    res = result.result or {}
    index_column = meta.get("index_column", "path")
    # a rule may name its failures by a column of its own: manifest_rows_name_images by the
    # rows (``line 2: Train/a``), which "train" alone left to the inventory to find
    own_column = exp_spec.get("meta", {}).get("index_column")
    failed: dict[str, None] = {}  # ordered set: one entry per file, in inventory order
    for item in res.get("unexpected_index_list") or []:
        name = item.get(index_column) if isinstance(item, dict) else item
        if isinstance(item, dict) and item.get(own_column) is not None:
            name = item[own_column]
        if name is not None:
            failed[html.unescape(str(name))] = None  # as given to GX: see _frame_for_gx
    error = _exception_message(result.exception_info)
    n_checked = int(res.get("element_count", 0) or 0) - int(res.get("missing_count", 0) or 0)
    n_failed = res.get("unexpected_count")
    if n_failed is None:
        n_failed = 0 if result.success else 1
    return Outcome(
        rule=exp_spec["meta"]["rule"],
        severity=meta["severity"],
        success=bool(result.success) and error is None,
        n_failed=int(n_failed),
        n_checked=max(n_checked, 0),
        failed=tuple(failed),
        suite=spec["name"],
        suite_version=str(meta["version"]),
        expectation=exp_spec["type"],
        column=exp_spec.get("kwargs", {}).get("column"),
        fix=_notes(exp_spec.get("notes")),
        error=error,
        bound=bound(exp_spec, params),
    )


#: What a ``*_to_be_between`` expectation bounds, by its type: its column's values, or one
#: statistic of them.
_BETWEEN = {
    "expect_column_values_to_be_between": "{column}",
    "expect_column_value_lengths_to_be_between": "length of {column}",
    "expect_column_min_to_be_between": "min of {column}",
    "expect_column_max_to_be_between": "max of {column}",
    "expect_column_mean_to_be_between": "mean of {column}",
    "expect_column_median_to_be_between": "median of {column}",
    "expect_column_stdev_to_be_between": "stdev of {column}",
    "expect_column_sum_to_be_between": "sum of {column}",
    "expect_column_unique_value_count_to_be_between": "distinct values of {column}",
    "expect_column_proportion_of_unique_values_to_be_between": "unique share of {column}",
    "expect_table_row_count_to_be_between": "rows",
}


def bound(exp: dict[str, Any], params: dict[str, Any] | None = None) -> str:
    """The bound a range or threshold expectation ``exp`` (a suite's JSON entry) sets, in
    short: ``grey_std >= 0.002``, ``foreground_fraction > 0``, ``0.01 <= pixel_size_um <= 10``,
    with ``, in at least 95% of rows`` for a ``mostly`` below 1; ``$PARAMETER`` values are
    taken from ``params``. Empty for other expectations (a set membership on a flag column,
    ``in {True}``, says nothing the rule's name does not)."""
    kwargs = exp.get("kwargs") or {}
    subject = _BETWEEN.get(exp.get("type", ""))
    if subject is None:
        return ""

    def value(key: str) -> Any:
        given = kwargs.get(key)
        if isinstance(given, dict) and "$PARAMETER" in given:
            return (params or {}).get(given["$PARAMETER"])
        return given

    def number(v: Any) -> str:
        said = repr(v) if isinstance(v, float) else str(v)
        return said.removesuffix(".0")

    name = subject.format(column=kwargs.get("column"))
    low, high = value("min_value"), value("max_value")
    above = ">" if kwargs.get("strict_min") else ">="
    below = "<" if kwargs.get("strict_max") else "<="
    if low is not None and high is not None:
        said = f"{number(low)} {above.replace('>', '<')} {name} {below} {number(high)}"
    elif low is not None:
        said = f"{name} {above} {number(low)}"
    elif high is not None:
        said = f"{name} {below} {number(high)}"
    else:
        return ""
    mostly = kwargs.get("mostly")
    if isinstance(mostly, int | float) and not isinstance(mostly, bool) and mostly < 1:
        said += f", in at least {mostly * 100:.4g}% of rows"
    return said


def _exception_message(info: Any) -> str | None:
    """The message of an exception GX caught while running an expectation, if any.

    ``exception_info`` is either one record (``raised_exception``, ``exception_message``) or,
    when a metric failed, a mapping of metric ids to such records (without the flag).
    """
    if not isinstance(info, dict) or not info:
        return None
    records = [info] if "exception_message" in info else list(info.values())
    for record in records:
        if not isinstance(record, dict):
            continue
        message = record.get("exception_message")
        if record.get("raised_exception") or message:
            return str(message or "expectation raised an exception").strip().splitlines()[-1]
    return None


def _notes(notes: str | Iterable[str] | None) -> str:
    if notes is None:
        return ""
    return notes if isinstance(notes, str) else " ".join(notes)


def _index_columns(spec: dict[str, Any]) -> list[str]:
    """The columns that name a failure of ``spec``'s rules: the suite's ``index_column``
    (``path``), then those its rules set for themselves (:func:`_outcome`)."""
    own = [e.get("meta", {}).get("index_column") for e in spec.get("expectations", [])]
    return list(dict.fromkeys([spec["meta"].get("index_column", "path"), *filter(None, own)]))


def _frame_for_gx(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with plain dtypes: nullable extension types become object/float columns, and
    text HTML-escaped. Data Docs put the failing files' names into their pages as HTML: a
    file named ``"><svg onload=alert(1)>.png`` in a shared dataset ran its script when the
    page was opened. The rules check flags and numbers only; :func:`_outcome` unescapes."""
    out = df.copy()
    for column in out.columns:
        dtype = out[column].dtype
        if isinstance(dtype, pd.BooleanDtype) or str(dtype) in ("string", "str"):
            out[column] = out[column].astype(object).where(out[column].notna(), None)
        elif isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iuf":
            out[column] = out[column].astype("float64")
        if out[column].dtype == object:
            out[column] = out[column].map(lambda v: html.escape(v) if isinstance(v, str) else v)
    return out


def run_suites(
    inventory: Inventory,
    *,
    data_docs_dir: str | os.PathLike | None = None,
    suites_dir: str | os.PathLike = SUITES_DIR,
    parameters: dict[str, Any] | None = None,
) -> ValidationReport:
    """Validate the inventory's tables with every suite; build Data Docs if a folder is given.

    ``parameters`` fill the suites' ``$PARAMETER`` values (default: ``min_images_per_split``
    from the inventory's config). The Data Docs site is built in a temporary sibling folder
    and moved onto ``data_docs_dir`` at the end (any older site there is replaced).
    """
    files = _suite_files(suites_dir)
    suites = [spec for _, spec in files]
    params = {"min_images_per_split": inventory.config.min_images_per_split, **(parameters or {})}
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    docs_dir = Path(data_docs_dir) if data_docs_dir is not None else None
    staging = None
    if docs_dir is not None:
        docs_dir.parent.mkdir(parents=True, exist_ok=True)
        # mkdir (not mkdtemp) so the site gets the user's umask, not 0700.
        staging = docs_dir.parent / f".{docs_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
    try:
        context = _context(staging.resolve() if staging is not None else None)
        source = context.data_sources.add_pandas("mlseg_inventory")
        tables = {"files": inventory.files, "splits": inventory.splits}
        batches = {
            name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            for name in TABLES
        }
        frames = {name: _frame_for_gx(df) for name, df in tables.items()}
        # the dataset folder's name is a folder and page title of the Data Docs, as HTML
        name = re.sub(r"[^\w.-]+", "_", Path(inventory.root).name)
        run_id = RunIdentifier(run_name=f"mlseg-validate-{name}")
        outcomes: list[Outcome] = []
        for path, spec in files:
            table = spec["meta"]["table"]
            suite = context.suites.add(
                gx.ExpectationSuite(
                    name=spec["name"],
                    expectations=_expectations(spec, path, params, tables[table].columns),
                    meta=spec["meta"],
                )
            )
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(
                    name=f"{spec['name']}-on-{table}", data=batches[table], suite=suite
                )
            )
            result = definition.run(
                batch_parameters={"dataframe": frames[table]},
                expectation_parameters=params,
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": _index_columns(spec),
                },
                run_id=run_id,
            )
            by_rule = {e["meta"]["rule"]: e for e in spec.get("expectations", [])}
            for item in result.results:
                rule = (item.expectation_config.meta or {}).get("rule")
                outcomes.append(_outcome(item, spec, by_rule[rule], params))
        if staging is not None and docs_dir is not None:
            try:
                context.build_data_docs()
            except OSError as err:  # the site is many files, written by Great Expectations
                said = cannot_write(docs_dir, err)
                if said is None:
                    raise
                raise said from err
            if docs_dir.exists():
                shutil.rmtree(docs_dir)
            os.replace(staging, docs_dir)
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    order = {
        rule: i
        for i, rule in enumerate(e["meta"]["rule"] for s in suites for e in s["expectations"])
    }
    outcomes.sort(key=lambda o: order.get(o.rule, len(order)))
    return ValidationReport(
        root=str(inventory.root),
        outcomes=tuple(outcomes),
        suite_versions={s["name"]: str(s["meta"]["version"]) for s in suites},
        data_docs=(docs_dir / "index.html") if docs_dir is not None else None,
    )


def write_report(report: ValidationReport, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``validation.json`` (every outcome, all failing names), ``validation.csv`` and
    ``validation.html`` (the verdict as a self-contained page, readable offline)."""
    from expectations.page import validation_page

    out = Path(out)
    return {
        "report": write_text(
            out / "validation.json", json.dumps(report.to_dict(), indent=2) + "\n"
        ),
        "summary": write_table(report.to_frame(), out / "validation.csv"),
        "page": validation_page(report, out / "validation.html").write(out / "validation.html"),
    }


def drop_verdict(out: str | os.PathLike) -> None:
    """Remove an earlier run's verdict from ``out`` (``validation.json``/``.csv``/``.html``,
    Data Docs) before its inventory and fingerprint are replaced: a run stopped part-way must
    not leave the new data's fingerprint beside the old data's 'passed'."""
    out = Path(out)
    for name in ("validation.json", "validation.csv", "validation.html"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "data_docs", ignore_errors=True)


def validate_dataset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ValidateConfig | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], object] | None = None,
    suites_dir: str | os.PathLike = SUITES_DIR,
) -> ValidationReport:
    """The whole gate: inventory ``root``, run the suites, write everything into ``out``.

    ``out`` receives ``inventory.parquet``/``.csv``, ``splits.csv``, ``fingerprint.json``,
    ``validate_config.json``, ``validation.json``/``.csv``/``.html`` and
    ``data_docs/index.html``. It
    must lie outside the dataset, which is only read. Returns the report; raising on failure
    is left to the caller (the CLI and the flow raise :class:`~mlseg.errors.ValidationFailed`).
    ``progress`` draws a bar while the files are read, ``log`` is given a line on how far the
    reading is once a minute (:func:`mlseg.inventory.build_inventory`).
    """
    from mlseg.inventory import check_output_dir

    out = check_output_dir(root, out)
    load_suites(suites_dir)  # a slip in a suite file said so only after every file was read
    preload_great_expectations()  # its import (seconds) overlaps the I/O-bound inventory
    inventory = build_inventory(root, cfg, progress=progress, log=log)
    drop_verdict(out)
    outputs = write_inventory(inventory, out)
    report = run_suites(inventory, data_docs_dir=out / "data_docs", suites_dir=suites_dir)
    outputs.update(write_report(report, out))
    return report.with_outputs(outputs)
