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


def _subparsers(parser):
    """``{name: subparser}`` of an argparse parser's sub-commands (empty without any)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_the_phases_page_names_only_commands_options_and_files_that_exist():
    """docs/phases.md maps each phase to commands: every `vsink CMD [SUB] --option` it names must
    parse with the real CLI, every configs/ file and linked page must exist, so the page cannot
    point a reader at something that was renamed."""
    from vsink.cli import build_parser

    root = README.parent
    text = (root / "docs" / "phases.md").read_text(encoding="utf-8")
    commands = re.findall(r"`(vsink [^`]+)`", text)
    assert len(commands) >= 12
    top = _subparsers(build_parser())
    for command in commands:
        words = command.split()
        assert words[1] in top, command
        parser = top[words[1]]
        subs = _subparsers(parser)
        if subs:  # `pope\|chair\|…`: each named alternative must be a sub-command
            named = [w for w in words[2].split("\\|") if w != "…"]
            assert named and all(w in subs for w in named), command
            parser = subs[named[0]]
        known = {s for a in parser._actions for s in a.option_strings}
        for option in re.findall(r"--[a-z][a-z-]*", command):
            assert option in known, (command, option)
    for config in re.findall(r"configs/[a-z_]+\.yaml", text):
        assert (root / config).is_file(), config
    for link in re.findall(r"\]\(([^)#]+)", text):
        assert (root / "docs" / link).is_file(), link
    for phase in ("## 1. Using sinks", "## 2. Explaining sinks", "## 3. Removing sinks at the root"):
        assert phase in text
