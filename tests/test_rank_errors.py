"""An error on one rank under ``torchrun`` stops every rank at once, with one line naming the rank.

Two gloo processes on CPU, one launch (``tests/torchrun_commands.py``), with a timeout so that a
rank left waiting for another fails the test quickly instead of hanging. The failure is a real
one on the batch dealt to rank 1 alone: a POPE question far longer than the demo LVLM's context
(2,048 positions), which one process refuses too (``LVLM.check_context``); an unreadable image
dealt to rank 1 stays a skipped and reported item, as for one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from test_torchrun import ROOT, _env, _torchrun


def _question(qid: int, image: str, text: str = "Is there a dog in the image?") -> dict:
    return {"question_id": qid, "image": image, "object": "dog", "split": "random", "label": "yes", "text": text}


def test_an_error_on_rank_1_stops_every_rank_with_one_line_naming_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "broken.png").write_bytes(b"not an image")
    # batches of 2: questions 0-1 on rank 0, 2-3 on rank 1, 4-5 on rank 0 (rank 1 has no third batch)
    long = "Is there a dog " + "and a dog " * 1500 + "in the image?"  # thousands of tokens: past 2,048
    bad = [_question(0, "a.png"), _question(1, "a.png"), _question(2, "a.png", long), _question(3, "a.png"),
           _question(4, "a.png"), _question(5, "a.png")]
    good = [_question(0, "a.png"), _question(1, "a.png"), _question(2, "broken.png"), _question(3, "a.png")]
    for name, questions in (("bad", bad), ("good", good)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    def pope(name: str) -> list[str]:
        return ["eval", "pope", str(images), "--model", "demo-llava", "--questions", str(tmp_path / f"{name}.jsonl"),
                "--max-new-tokens", "1", "--batch-size", "2", "--out", str(tmp_path / name), "--no-progress"]

    plan = {name: pope(name) for name in ("bad", "good")}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    launch = subprocess.Popen(_torchrun(str(ROOT / "tests" / "torchrun_commands.py"), str(tmp_path / "plan.json"),
                                        str(tmp_path)), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = launch.communicate(timeout=240)  # a rank left waiting would wait for hours
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # torchrun and both workers
        launch.communicate()
        raise
    assert launch.returncode == 0, stderr[-4000:]

    def ran(name: str) -> tuple[list[int], str, str]:
        codes = [int((tmp_path / f"{name}.rank{r}.rc").read_text()) for r in (0, 1)]
        return codes, (tmp_path / f"{name}.rank0.err").read_text(), (tmp_path / f"{name}.rank1.err").read_text()

    codes, err0, err1 = ran("bad")
    assert codes == [2, 2], err0[-2000:] + err1[-2000:]
    lines = [line for line in err0.splitlines() if "vsink: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("vsink: error: rank 1: the prompt is ")
    assert "beyond demo-llava's context of 2,048 tokens" in lines[0]
    assert "vsink: error:" not in err1 and "Traceback" not in err0 + err1
    # rank 0's answers (its first batch, written before rank 1 failed) stay for the next run to fold in
    kept = tmp_path / "bad" / "none" / "answers.rank0.jsonl"
    assert [json.loads(line)["question_id"] for line in kept.read_text().splitlines()][:2] == [0, 1]
    assert (tmp_path / "bad" / "none" / "vsink-run.json").exists()
    assert not (tmp_path / "bad" / "results.json").exists()

    # an unreadable image on rank 1's batch: skipped and reported, the others scored, as one process does
    codes, err0, err1 = ran("good")
    assert codes == [0, 0], err0[-2000:] + err1[-2000:]
    assert "vsink: skipped" in err1 and "broken.png" in err1
    results = json.loads((tmp_path / "good" / "results.json").read_text())
    assert [s["item"] for s in results["skipped"]["none"]] == ["2"]
    answered = (tmp_path / "good" / "none" / "answers.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in answered] == [0, 1, 3]
