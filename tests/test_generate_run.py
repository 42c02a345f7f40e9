"""``vsink generate`` in batches (``--batch-size``) with its texts in ``--out``: the batches are
those the option describes (each batch's texts equal ``generate`` called on that batch alone),
a rerun generates only the batches with a text missing and ends with the bytes of an uninterrupted
run, and a rerun with other settings or a run refused before its first text is handled in one line.
The same runs under ``torchrun``: tests/test_torchrun.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsink.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")

#: prompts of different lengths: a batch of the first two is left-padded
PROMPTS = ["Is there a dog?", "Describe the picture in a few words.", "What is it?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("gen-images")
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h) in enumerate([(40, 40), (56, 40), (40, 48)]):
        paths.append(folder / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _argv(files: list[Path], out: Path, *extra: str) -> list[str]:
    return ["generate", *map(str, files), "--model", "demo-llava", *(a for p in PROMPTS for a in ("--prompt", p)),
            "--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--out", str(out), *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batches_are_generate_calls_on_consecutive_items(files, tmp_path, capsys):
    from vsink.backbones.hf_lvlm import load_lvlm
    from vsink.images import load_image
    from vsink.lvlm import generate

    assert main(_argv(files, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "out" / "generated.jsonl")
    lvlm = load_lvlm("demo-llava")
    images = [load_image(p) for p in files]
    texts = [*generate(lvlm, lvlm.prepare(images[:2], PROMPTS[:2]), max_new_tokens=3).texts,
             *generate(lvlm, lvlm.prepare(images[2:], PROMPTS[2:]), max_new_tokens=3).texts]
    assert rows == [{"item": i, "image": str(files[i]), "prompt": PROMPTS[i], "text": texts[i], "protocol": "paper"}
                    for i in range(3)]
    assert [line for line in out.splitlines() if line.startswith("[")] == [f"[{files[i]}] {texts[i]}" for i in range(3)]
    record = json.loads((tmp_path / "out" / "vsink-run.json").read_text())
    assert record["command"] == "vsink generate" and record["determining"]["batch_size"] == 2


def test_a_cut_run_resumes_to_the_bytes_of_an_uninterrupted_one(files, tmp_path, monkeypatch, capsys):
    import sys

    gen = sys.modules["vsink.lvlm.generate"]  # the module (vsink.lvlm.generate is also the function's name)
    assert main(_argv(files, tmp_path / "out")) == 0
    texts = tmp_path / "out" / "generated.jsonl"
    whole = texts.read_bytes()
    lines = whole.split(b"\n")
    texts.write_bytes(lines[0] + b"\n" + lines[1][:10])  # item 0 kept, item 1 cut mid-line by a kill, item 2 lost
    real, calls = gen.generate, []
    monkeypatch.setattr(gen, "generate", lambda lvlm, inputs, **kw: (calls.append(len(inputs["input_ids"])),
                                                                      real(lvlm, inputs, **kw))[1])
    capsys.readouterr()
    assert main(_argv(files, tmp_path / "out")) == 0
    assert calls == [2, 1]  # batch 1 again (item 1 missing), then batch 2
    assert texts.read_bytes() == whole
    assert "1 item of 3 already in" in capsys.readouterr().err
    calls.clear()
    assert main(_argv(files, tmp_path / "out")) == 0  # complete: nothing generated
    assert calls == [] and texts.read_bytes() == whole
    assert "3 items of 3 already in" in capsys.readouterr().err


def test_other_settings_and_refused_runs(files, tmp_path, capsys):
    assert main(_argv(files, tmp_path / "out")) == 0
    capsys.readouterr()
    assert main(_argv(files, tmp_path / "out", "--mitigation", "pai")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"vsink: error: {tmp_path / 'out'}: the texts in generated.jsonl were made with other "
                          "settings (mitigation: \"none\" → \"pai\"")
    assert err.endswith("resume only with the same ones, or use another --out")
    # too many new tokens for the context: refused at the first batch, no record of a run that never ran
    assert main(_argv(files, tmp_path / "big", "--max-new-tokens", "1000000")) == 2
    assert "goes beyond demo-llava's context" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()  # nor the folder it made for them
    (tmp_path / "kept").mkdir()  # a folder that was there stays, empty as it was
    assert main(_argv(files, tmp_path / "kept", "--max-new-tokens", "1000000")) == 2
    assert "goes beyond demo-llava's context" in capsys.readouterr().err
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    assert main(_argv(files, tmp_path / "same", "--export-attention", str(tmp_path / "same"))) == 2
    assert "--out and --export-attention name one folder" in capsys.readouterr().err
    # a folder another command wrote is not taken over (its record stays that command's)
    assert main(["scan", str(files[0]), "--model", "demo", "--out", str(tmp_path / "scan"), "--no-progress"]) == 0
    before = (tmp_path / "scan" / "vsink-run.json").read_bytes()
    capsys.readouterr()
    assert main(_argv(files, tmp_path / "scan")) == 2
    assert f"--out {tmp_path / 'scan'} holds the outputs of vsink scan; give a folder of its own" in \
        capsys.readouterr().err
    assert (tmp_path / "scan" / "vsink-run.json").read_bytes() == before
    assert not (tmp_path / "scan" / "generated.jsonl").exists()
