"""Untrusted input, round two (issue 20): inputs that used to hang, run a model's own code, or
make ``vsink view`` embed files from elsewhere.

* hangs: a YAML alias bomb in a recipe, a 1 MB CHAIR caption (each run in a subprocess with a
  generous time limit, so a regression fails instead of hanging the suite);
* code shipped with a model: a folder whose ``config.json`` has an ``auto_map`` to a Python file
  that writes a marker; stdin answers ``y``; the marker must never appear;
* folders read back (``vsink view``, traces): object arrays, missing keys, wrong shapes, JSON and
  npz that disagree, names that lead outside the folder;
* the viewer's embedded JSON in every HTML tokenizer state, in a real headless Chromium;
* file names that matplotlib would parse as maths.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vsink
from vsink.cli import main
from vsink.errors import VsinkError

ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = "import sys; from vsink.cli import main; sys.exit(main(sys.argv[1:]))"
MATH_NAME = "a$\\frac{$b.png"
HOSTILE_NAME = "<!--<script>c.png"


def vsink_subprocess(*argv, stdin: str = "", timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """``vsink ARGV`` in a fresh Python (this worktree's vsink first), killed after ``timeout``
    seconds: a hang fails the test instead of the suite."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", RUN_CLI, *map(str, argv)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=environment)


def one_error_line(result: subprocess.CompletedProcess, match: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("vsink: error: ") and result.stderr.count("vsink: error:") == 1, result.stderr
    assert re.search(match, last), last
    return last


def refused(capsys, *argv, match: str) -> str:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("vsink: error: ") and err.count("vsink: error:") == 1, err
    assert re.search(match, last), last
    return last


def png(path: Path, seed: int = 0, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path, format="PNG")
    return path


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` levels of ``width`` aliases: a few hundred bytes that expand to width**levels values."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


# --- hangs ----------------------------------------------------------------------------------------

def test_alias_bomb_in_a_recipe_is_refused_quickly(tmp_path):
    """Nine levels of nine aliases in ``model.model_kwargs``: refused with one line, in seconds
    (the time limit is a hang detector, not a speed test)."""
    recipe = tmp_path / "bomb.yaml"
    bomb = "\n".join("    " + line for line in alias_bomb().splitlines())
    recipe.write_text(f"model:\n  spec: timm:vit_tiny_patch16_224\n  model_kwargs:\n{bomb}\n")
    result = vsink_subprocess("finetune", "--config", recipe, f"out={tmp_path / 'run'}", "--no-progress", timeout=120)
    one_error_line(result, r"bomb\.yaml: its aliases \(\*name\) expand it to more than")
    assert not (tmp_path / "run").exists()


def test_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    flow = "{" + alias_bomb(6, 9).replace("\n", ", ").rstrip(", ") + "}"
    refused(capsys, "finetune", f"model.model_kwargs={flow}", f"out={tmp_path / 'run'}", "--no-progress",
            match=r"model\.model_kwargs=\.\.\.: its aliases")


def test_walks_of_shared_values_are_linear():
    """The checks memoise by identity: a value that repeats one part 9**9 times is measured, shown
    and refused as a mapping without expanding it; a value that contains itself is refused."""
    import yaml

    from vsink.options import MAX_VALUES, Invalid, Mapping_, measure, nesting_depth, shown

    bomb = yaml.safe_load(alias_bomb())
    sizes = [10]  # l0: a list of 9 scalars; l(i): a list of 9 copies of l(i-1)
    for _ in range(8):
        sizes.append(1 + 9 * sizes[-1])
    assert measure(bomb, depth=100, nodes=10**12) == (10, 1 + sum(sizes))
    assert nesting_depth(bomb) == 10
    assert len(shown(bomb)) <= 300
    with pytest.raises(Invalid, match=f"more than {MAX_VALUES:,} values"):
        Mapping_().parse(bomb)
    loop: list = []
    loop.append(loop)
    assert nesting_depth({"a": loop}) > 32
    with pytest.raises(Invalid, match="nested deeper"):
        Mapping_().parse({"a": loop})
    shared = {"k": [1, 2]}
    assert measure([shared, shared]) == (3, 1 + 2 * (1 + 1 + 2))  # counted as often as reached
    assert measure({"a": {"b": 1}}) == (2, 3) and measure(5) == (0, 1)


def test_yaml_aliases_that_stay_small_are_kept():
    from vsink.readers import parse_yaml

    assert parse_yaml("base: &b {lr: 0.1}\nrun: *b\n", "x") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}


def coco_instances(path: Path, classes=(1,)) -> Path:
    """COCO instances of one image ``img1.png`` holding ``classes`` (1 dog, 2 cat, 3 car, ...)."""
    names = ("dog", "cat", "car", "person", "bus", "train", "boat")
    data = {"images": [{"id": 1, "file_name": "img1.png", "width": 40, "height": 40}],
            "annotations": [{"id": k, "image_id": 1, "category_id": c, "bbox": [2, 2, 20, 20], "iscrowd": 0,
                             "area": 400} for k, c in enumerate(classes, 1)],
            "categories": [{"id": i, "name": n} for i, n in enumerate(names, 1)]}
    path.write_text(json.dumps(data))
    return path


def test_a_1mb_caption_is_scored_and_written(tmp_path):
    """One 1 MB caption with ~100,000 object mentions: results.html is written, every mention
    marked (the marking used to be quadratic: hours)."""
    caption = "A dog sits near a cat and a car. " * 32_000
    assert len(caption) > 10**6
    generated = tmp_path / "generated.jsonl"
    generated.write_text(json.dumps({"image_id": 1, "caption": caption}) + "\n")
    result = vsink_subprocess("eval", "chair", "--generated", generated, "--annotations",
                              coco_instances(tmp_path / "instances.json"), "--out", tmp_path / "out", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "out" / "results.html").read_text()
    assert page.count("<mark class='ok'>dog</mark>") == 32_000
    assert page.count("<mark class='halluc'>cat</mark>") == 32_000
    assert page.count("<mark class='halluc'>car</mark>") == 32_000


def test_locate_marks_a_repeated_word_at_each_unused_occurrence():
    """Hand-checked: a repeated word moves on to its next occurrence; an occurrence inside an
    earlier mark ("hot dog") is not reused; a word with no free occurrence is listed as missing."""
    from vsink.export.hallucination_report import _locate

    text, missing = _locate("Two dogs, a dog and a hot dog.", ["hot dog", "dog", "dog", "dog"],
                            [False, True, False, True])
    assert text == ("Two <mark class='halluc'>dogs</mark>, a <mark class='ok'>dog</mark> and a "
                    "<mark class='ok'>hot dog</mark>.")
    assert missing == ["dog"]


# --- code shipped with a model --------------------------------------------------------------------

@pytest.fixture()
def remote_code_folder(tmp_path):
    """A Hugging Face folder whose config names its own Python (``auto_map``); importing that
    Python writes ``marker``."""
    folder = tmp_path / "custom-model"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_vit", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "custom_code.CustomConfig", "AutoModel": "custom_code.CustomModel",
                     "AutoImageProcessor": "custom_code.CustomProcessor"}}))
    (folder / "custom_code.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the folder ran its code')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom_vit'\n")
    return folder, marker


@pytest.mark.parametrize("argv, flag", [
    (["scan", "--model", "{folder}", "--out", "{out}"], None),
    (["scan", "--model", "hf:{folder}", "--out", "{out}"], None),
    (["generate", "{image}", "--model", "{folder}", "--prompt", "<image> hi"], "--trust-remote-code"),
    (["eval", "pope", "{images}", "--model", "{folder}", "--annotations", "{annotations}", "--out", "{out}"],
     "--trust-remote-code"),
], ids=["scan", "scan-hf-prefix", "generate", "eval-pope"])
def test_a_models_own_code_never_runs_from_the_cli(remote_code_folder, tmp_path, argv, flag):
    folder, marker = remote_code_folder
    image = png(tmp_path / "images" / "img1.png")
    annotations = coco_instances(tmp_path / "instances.json", classes=(1, 2, 3))
    args = [a.format(folder=folder, out=tmp_path / "out", image=image, images=image.parent, annotations=annotations)
            for a in argv]
    result = vsink_subprocess(*args, stdin="y\ny\ny\n", timeout=180)
    assert not marker.exists()
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    if argv[0] == "eval" and result.returncode == 2 and "remote code" not in result.stderr:
        pytest.fail(f"refused for another reason first: {result.stderr[-400:]}")
    last = one_error_line(result, r"ships its own Python code \(auto_map in config\.json\); remote code is refused")
    assert (f"pass {flag}" in last) if flag else ("--trust-remote-code applies to LVLMs" in last)


def test_a_models_own_code_never_runs_from_the_python_api(remote_code_folder, monkeypatch):
    """``vsink.load`` and ``load_lvlm`` with stdin answering yes, ``trust_remote_code`` left out
    or None: refused, never asked."""
    import io

    from vsink.backbones.hf_lvlm import load_lvlm

    folder, marker = remote_code_folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    with pytest.raises(VsinkError, match="remote code is refused: vsink never runs it for vision models"):
        vsink.load(str(folder))
    with pytest.raises(VsinkError, match="remote code is refused"):
        vsink.load(f"hf:{folder}", model_kwargs={"trust_remote_code": True})
    for trust in (False, None, "yes"):
        with pytest.raises(VsinkError, match=r"remote code is refused: pass --trust-remote-code \(trust_remote_code"):
            load_lvlm(str(folder), trust_remote_code=trust)
    assert not marker.exists()
    assert sys.stdin.read() == "y\n" * 10  # nothing asked, nothing read


def test_loaders_that_vsink_does_not_call_directly_cannot_ask(remote_code_folder, monkeypatch):
    """While a library builds a model (open_clip's Hugging Face text towers call AutoConfig
    themselves), a question on stdin becomes a refusal."""
    import io

    from transformers import AutoConfig

    from vsink.backbones.remote_code import no_remote_code_prompt

    folder, marker = remote_code_folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with no_remote_code_prompt(), pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(str(folder))
    assert not marker.exists()
