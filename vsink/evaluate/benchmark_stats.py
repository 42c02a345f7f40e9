"""Intervals and paired tests of the benchmarks of :mod:`vsink.evaluate.benchmarks` (MME,
HallusionBench, Object HalBench, AMBER), with :mod:`vsink.evaluate.stats`.

Each benchmark says what one resampled unit is and which counts it carries
(:class:`~vsink.evaluate.benchmarks.Units`, the same columns and rows for every mitigation); every
report row is a function of the sums of those counts, and the rows a mitigation's report shows get
intervals. Each mitigation's rows get percentile-bootstrap intervals; each later mitigation's
differences from the first get paired-bootstrap intervals over the units scored under both
(matched on the unit's key), and, for the yes/no benchmarks, McNemar's exact test of the
right/wrong outcomes of the questions answered under both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .benchmarks import get
from .stats import Bootstrap, bootstrap, interval_dict, mcnemar, paired_bootstrap


def benchmark_statistics(kind: str, scores: dict[str, dict[str, Any]], settings: Bootstrap) -> dict[str, Any]:
    """Adds ``intervals`` (``{report row: {"value", "low", "high"}}``) to each mitigation's scores;
    returns ``{"statistics": settings and unit, "comparisons": {mitigation: {report row: ...,
    "n": paired units[, "mcnemar": {"n", "b", "c", "p"}]}}}`` against the first mitigation."""
    bench = get(kind)
    units = {name: bench.units(sc) for name, sc in scores.items()}
    shown = {name: {m.label for m in bench.metrics(sc)} for name, sc in scores.items()}
    for name, u in units.items():
        every = interval_dict(bootstrap(u.rows, u.statistic, settings), u.labels)
        scores[name]["intervals"] = {label: iv for label, iv in every.items() if label in shown[name]}
    names = list(scores)
    base = units[names[0]]
    base_rows = dict(zip(base.keys, base.rows))
    comparisons: dict[str, Any] = {}
    for name in names[1:]:
        u = units[name]
        common = [(k, row) for k, row in zip(u.keys, u.rows) if k in base_rows]
        if not common:
            comparisons[name] = {"n": 0}
            continue
        delta = paired_bootstrap(np.array([base_rows[k] for k, _ in common]), np.array([row for _, row in common]),
                                 u.statistic, settings)
        comparisons[name] = {**{label: iv for label, iv in interval_dict(delta, u.labels).items()
                                if label in shown[name] and label in shown[names[0]]}, "n": len(common)}
        if u.correct is not None and base.correct is not None:
            both = [q for q in u.correct if q in base.correct]
            comparisons[name]["mcnemar"] = mcnemar([base.correct[q] for q in both], [u.correct[q] for q in both])
    return {"statistics": settings.to_dict(base.unit), "comparisons": comparisons}


def mcnemar_line(name: str, baseline: str, test: dict[str, Any]) -> str:
    """One sentence reporting McNemar's exact test of ``name`` against ``baseline``."""
    return (f"{name} vs {baseline}: McNemar's exact test on {test['n']} paired questions: {test['b']} right only "
            f"under {baseline}, {test['c']} right only under {name}, p = {test['p']:.4g}")
