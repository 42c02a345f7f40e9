"""The benchmark scripts keep up with the library: each imports, and the fast one runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.stem)
def test_benchmark_imports_and_has_a_main(path):
    module = _load(path)
    assert callable(module.main) and module.__doc__


def test_lvlm_protocols_benchmark_runs(capsys):
    """Seconds on CPU: the figures of docs/fidelity.md's protocol sections. Under ``official`` VAR
    edits no row when the prompt has no visual sink, and PAI leaves the prompt pass alone."""
    _load(BENCHMARKS / "lvlm_protocols.py").main()
    out = capsys.readouterr().out
    paper = re.search(r"paper: prompt pass\s+(\d+) rows edited", out)
    official = re.search(r"official: prompt pass\s+(\d+) rows edited, max \|Δ logit\| ([0-9.e+-]+)", out)
    assert int(paper.group(1)) > 0 and int(official.group(1)) == 0
    assert float(official.group(2)) < 1e-5
    assert "paper flags it (1), official not" in out
    assert "keep count, n = 9: round(n(1 − R)) ≠ n − round(nR) for 1 of" in out
