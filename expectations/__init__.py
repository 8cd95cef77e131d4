"""Great Expectations suites over the dataset inventory, and the small code that runs them.

``suites/*.json`` are versioned GX 1.x suites; :mod:`expectations.runner` runs them on an
inventory (:mod:`mlseg.inventory`) and returns a typed :class:`ValidationReport`. See
``README.md`` here for each rule, its severity and what to do when it fails.
"""

from expectations.runner import (
    SUITES_DIR,
    Outcome,
    ValidationReport,
    load_suites,
    run_suites,
    validate_dataset,
    write_report,
)

__all__ = [
    "SUITES_DIR",
    "Outcome",
    "ValidationReport",
    "load_suites",
    "run_suites",
    "validate_dataset",
    "write_report",
]
