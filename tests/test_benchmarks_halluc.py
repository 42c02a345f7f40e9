"""The offline hallucination benchmarks (MME's hallucination subset, HallusionBench, Object
HalBench, AMBER): each scorer against golden cases worked out by hand from its official scorer
(the reason for each case in a comment), the readers' one-line errors, and one CLI run per
benchmark with the demo LVLM on the fixtures under tests/data/."""

import json
import shutil
from pathlib import Path

import pytest

from vsink.cli import main
from vsink.errors import VsinkError

DATA = Path(__file__).parent / "data"


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _run_demo(name, tmp_path, *extra):
    """One run of the demo LVLM with two mitigations; the results and the baseline's answers."""
    out = tmp_path / "run"
    argv = ["eval", name, "--model", "demo-llava", "--mitigation", "none,pai", "--no-progress",
            "--max-new-tokens", "3", "--out", str(out), *extra]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == name and set(results["results"]) == {"none", "pai"}
    assert results["protocol"]["synthetic"] is True and results["protocol"]["comparable"]
    page = (out / "results.html").read_text()
    assert "Synthetic demo LVLM" in page and "Δ vs none" in page
    record = json.loads((out / "none" / "vsink-run.json").read_text())
    assert record["command"] == f"vsink eval {name}" and record["determining"]["mitigation"] == "none"
    return out, results


def _resumes_without_generating(name, out, argv_extra, monkeypatch):
    """A rerun into the same folder generates nothing: every item is answered already."""
    import vsink.lvlm as lvlm_mod

    calls = []
    real = lvlm_mod.generate
    monkeypatch.setattr(lvlm_mod, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(["eval", name, "--model", "demo-llava", "--mitigation", "none,pai", "--no-progress",
                 "--max-new-tokens", "3", "--out", str(out), *argv_extra]) == 0
    assert calls == []


# ---------------------------------------------------------------- MME

from vsink.evaluate import mme  # noqa: E402

MME_PARSES = [
    ("Yes", "yes"),                    # exact "yes" after lower-casing
    ("No.", "no"),                     # every "." is removed first
    ("  YES.  ", "yes"),               # lower, strip, then the "." goes: exactly "yes"
    ("y", "yes"), ("n", "no"),         # a single character: y / n
    ("y.", "yes"),                     # "y." loses its "." and is the single character y
    ("x", "other"),                    # any other single character is other
    ("", "other"),                     # empty: not yes/no, not one character, nothing in the first 4
    ("...", "other"),                  # only dots: empty once they are removed
    ("Yes, there is a dog", "yes"),    # "yes," — "yes" within the first 4 characters
    ("There is no dog", "other"),      # "ther": the rule looks at the first 4 characters only
    ("Not sure", "no"),                # "not " contains "no"
    ("None", "no"),                    # "none" contains "no"
    ("eyes", "yes"),                   # "eyes" contains "yes" in its first 4 characters
    ("No, yes", "no"),                 # "no, " has no "yes", has "no"
    ("I think yes", "other"),          # "i th": neither
]


@pytest.mark.parametrize("text, expected", MME_PARSES)
def test_mme_parser_follows_lmms_eval(text, expected):
    assert mme.parse_answer(text) == expected


def _mme_row(category, image, n, label, answer):
    return {"question_id": f"{category}/{image}#{n}", "image_id": f"{category}/{image}", "category": category,
            "label": label, "answer": answer}


def test_mme_scores_by_hand():
    rows = [
        # existence: image a both right (acc 100 + acc+ 100 = 200), image b one right (50 + 0 = 50);
        # lmms-eval averages the per-image sums: (200 + 50) / 2 = 125 = (3/4 + 1/2) × 100
        _mme_row("existence", "a", 0, "yes", "Yes"), _mme_row("existence", "a", 1, "no", "No"),
        _mme_row("existence", "b", 0, "yes", "Yes"), _mme_row("existence", "b", 1, "no", "Yes"),
        # count: both wrong: 0
        _mme_row("count", "c", 0, "yes", "No"), _mme_row("count", "c", 1, "no", "yes"),
        # color: an answer parsed as other is wrong for either label: 50 + 0 = 50
        _mme_row("color", "d", 0, "yes", "There is a red one"), _mme_row("color", "d", 1, "no", "no"),
    ]
    scores = mme.score_answers(rows)
    ex = scores["categories"]["existence"]
    assert (ex["accuracy"], ex["accuracy_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert scores["categories"]["count"]["score"] == 0.0
    color = scores["categories"]["color"]
    assert (color["score"], color["other"]) == (50.0, 1)
    assert scores["total"] == 175.0 and "position" not in scores["categories"]


def test_mme_refuses_an_image_without_two_answers():
    # lmms-eval asserts "MME only supports pairwise evaluation"
    with pytest.raises(VsinkError, match="MME image existence/a: 1 answered question"):
        mme.score_answers([_mme_row("existence", "a", 0, "yes", "Yes")])


def test_mme_reader(tmp_path):
    items = mme.read_items(DATA / "mme")
    assert len(items) == 8 and {it["category"] for it in items} == set(mme.CATEGORIES)
    first = items[0]
    # the question as lmms-eval's default prompt uses it: " Please answer yes or no." removed
    assert first["question"] == "Is there a dog in this image?" and first["label"] == "yes"
    assert first["image"] == "existence/0001.png" and first["image_id"] == "existence/0001.png"
    # --limit keeps whole images: 3 questions become the first two images' 4
    assert len(mme.limit(items, 3)) == 4


def test_mme_reader_errors(tmp_path):
    root = tmp_path / "mme"
    shutil.copytree(DATA / "mme", root)
    shutil.rmtree(root / "color")
    with pytest.raises(VsinkError, match=r"no folder color/"):
        mme.read_items(root)
    shutil.copytree(DATA / "mme" / "color", root / "color")
    (root / "count" / "0001.txt").write_text("Are there two dogs?\tYes\n")
    with pytest.raises(VsinkError, match=r"0001.txt: MME has two questions per image, found 1"):
        mme.read_items(root)
    (root / "count" / "0001.txt").write_text("Are there two dogs? Yes\nAre there three?\tNo\n")
    with pytest.raises(VsinkError, match=r"0001.txt:1: expected 'question<TAB>Yes\|No'"):
        mme.read_items(root)
    (root / "count" / "0001.txt").unlink()
    with pytest.raises(VsinkError, match=r"0001.png: no question file 0001.txt"):
        mme.read_items(root)
    with pytest.raises(VsinkError, match="needs the release folder"):
        mme.read_items(root / "count" / "0001.png")


def test_mme_cli_runs_resumes_and_scores_a_file(tmp_path, monkeypatch, capsys):
    out, results = _run_demo("mme", tmp_path, "--data", str(DATA / "mme"))
    answers = _lines(out / "none" / "answers.jsonl")
    assert len(answers) == 8 and {"question_id", "image_id", "category", "label", "answer"} <= set(answers[0])
    assert results["results"]["none"]["n"] == 8 and len(results["results"]["none"]["categories"]) == 4
    # a key answered twice (an edited file) is scored once, and the repeat is reported
    with open(out / "none" / "answers.jsonl", "a") as f:
        f.write(json.dumps({**answers[0], "answer": "No"}) + "\n")
    _resumes_without_generating("mme", out, ["--data", str(DATA / "mme")], monkeypatch)
    assert "1 repeated question_id line(s) ignored" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["results"]["none"] == results["results"]["none"]
    # scoring a file: every answer right except existence's second → existence 50 + 0, the rest 200
    rows = [{**a, "answer": a["label"]} for a in answers]
    rows[1]["answer"] = "yes"
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "mme", "--answers", str(mine), "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())["results"]["answers"]
    assert scored["categories"]["existence"]["score"] == 50.0 and scored["total"] == 650.0
    capsys.readouterr()
    mine.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "label"}) + "\n")
    assert main(["eval", "mme", "--answers", str(mine), "--out", str(tmp_path / "bad")]) == 2
    assert "mine.jsonl:1: missing field(s) label" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
