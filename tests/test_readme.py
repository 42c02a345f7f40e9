"""The README's Python snippet runs as written (offline), so it cannot rot."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "one Python snippet (the Python API section)"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "emergence layer 2," in out and "no high-norm tokens found" in out  # the demo, then fixed by TTR
    sinks = json.loads((tmp_path / "vsink-out" / "scan.json").read_text())["sinks"]
    assert [s["share"] for s in sinks] == sorted((s["share"] for s in sinks), reverse=True)
    assert (tmp_path / "maps" / "maps.json").exists() and (tmp_path / "with-registers" / "vsink.json").exists()
    assert set(json.loads((tmp_path / "eval" / "results.json").read_text())["variants"]) == {"baseline", "ttr"}
    assert out.rstrip().endswith("0.5")  # CHAIR_i of "A dog and a cat." for an image with a dog


def test_the_suite_runs_on_the_threads_conftest_sets():
    """conftest sets OMP_NUM_THREADS before torch loads (one thread unless the caller chose); the
    suite time the README states depends on it taking effect."""
    import torch

    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
