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


def test_a_corrupt_file_is_skipped_reported_and_not_retried(files, tmp_path, capsys):
    """Two photos and a truncated JPEG in a folder: two texts, the JPEG reported (stderr, the
    summary, the --out record) with exit code 0 as scan gives a partial run; the same command
    again generates nothing; only bad files: one line, exit code 2, no record."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in (0, 2):
        (folder / files[i].name).write_bytes(files[i].read_bytes())
    buffer = folder / "broken.jpg"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="JPEG")
    buffer.write_bytes(buffer.read_bytes()[:200])  # the header without the scan data: PIL cannot decode it
    out = tmp_path / "out"
    argv = ["generate", str(folder), "--model", "demo-llava", "--prompt", "What is it?", "--max-new-tokens", "3",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = _rows(out / "generated.jsonl")
    assert [r["image"] for r in rows] == [str(folder / "im0.png"), str(folder / "im2.png")]
    assert [r["item"] for r in rows] == [0, 1]
    assert f"vsink: skipped {buffer}: corrupt or truncated image" in captured.err
    assert "generated 2 images (1 skipped)" in captured.out
    skipped = json.loads((out / "vsink-run.json").read_text())["determining"]["skipped"]
    assert [s["image"] for s in skipped] == [str(buffer)] and skipped[0]["reason"].startswith(f"{buffer}: corrupt")
    texts = (out / "generated.jsonl").read_bytes()

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "2 items of 2 already in" in captured.err and "nothing generated" in captured.err
    assert f"vsink: skipped {buffer}" in captured.err
    assert (out / "generated.jsonl").read_bytes() == texts

    # one prompt per file: the broken file's prompt leaves with it
    listed = [folder / "im0.png", buffer, folder / "im2.png"]
    assert main(_argv(listed, tmp_path / "listed")) == 0
    capsys.readouterr()
    assert [r["prompt"] for r in _rows(tmp_path / "listed" / "generated.jsonl")] == [PROMPTS[0], PROMPTS[2]]

    only_bad = ["generate", str(buffer), "--model", "demo-llava", "--prompt", "x", "--no-progress",
                "--out", str(tmp_path / "none")]
    assert main(only_bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[-1].startswith("vsink: error: no image could be read (1 skipped: ") and str(buffer) in err[-1]
    assert not (tmp_path / "none").exists()
