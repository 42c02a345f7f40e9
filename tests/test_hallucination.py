"""POPE and CHAIR scoring against hand-computed values, question building, and the runner with a
tiny LVLM, interrupted and resumed."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vsink.errors import VsinkError
from vsink.evaluate.chair import score_chair
from vsink.evaluate.chair_vsink import mentions, singular, words
from vsink.evaluate.pope import build_questions, parse_answer, question_text, score_answers

CASES = [("", "yes", None), ("Yes.", "yes", "yes"), ("No, there is not", "no", "no"),
         ("I don't know", "yes", None), ("snow", "yes", None), ("There is no cat. No.", "no", None),
         ("Not sure.", "yes", None), ("yes, a cat", "yes", "yes"), ("NO", "yes", "no")]


@pytest.mark.parametrize("text, official, strict", CASES)
def test_parsers(text, official, strict):
    assert parse_answer(text, "official") == official
    assert parse_answer(text, "strict") == strict


def test_pope_metrics_hand_computed():
    answers = [{"split": "random", "label": "yes", "answer": "Yes."},
               {"split": "random", "label": "yes", "answer": ""},
               {"split": "random", "label": "no", "answer": "No, there is not"},
               {"split": "random", "label": "no", "answer": "snow"},
               {"split": "popular", "label": "yes", "answer": "no"},
               {"split": "popular", "label": "no", "answer": "no."}]
    off = score_answers(answers, "official")
    r = off["splits"]["random"]  # preds yes, yes, no, yes: TP 2, FP 1, TN 1, FN 0
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"], r["n"]) == (0.75, 2 / 3, 1.0, 0.75, 4)
    assert r["f1"] == pytest.approx(0.8)
    p = off["splits"]["popular"]  # preds no, no: TP 0, FN 1, TN 1 — no "yes": precision and F1 are 0
    assert (p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)
    assert off["mean"]["accuracy"] == pytest.approx(0.625) and off["mean"]["n"] == 6
    strict = score_answers(answers, "strict")["splits"]["random"]  # preds yes, ?, no, ?
    assert (strict["accuracy"], strict["precision"], strict["recall"], strict["unparseable"]) == (0.5, 1.0, 0.5, 2)
    assert strict["yes_ratio"] == 0.25 and strict["f1"] == pytest.approx(2 / 3)
    with pytest.raises(VsinkError, match="label must be yes or no"):
        score_answers([{"split": "random", "label": "maybe", "answer": "yes"}])


CLASSES = ["apple", "bird", "car", "dog", "elephant", "fork", "horse", "orange", "person", "umbrella"]
OBJECTS = {1: ["person", "dog", "car"], 2: ["person", "dog", "horse", "umbrella"], 3: ["apple", "orange", "fork"],
           4: ["person", "car", "bird"], 5: ["dog", "horse"], 6: ["person", "umbrella", "car", "dog"],
           7: ["elephant", "bird", "person"]}


def _coco(tmp_path=None):
    data = {"categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
            "images": [{"id": i, "file_name": f"img{i}.jpg"} for i in OBJECTS],
            "annotations": [{"image_id": i, "category_id": CLASSES.index(c) + 1, "bbox": [0, 0, 1, 1]}
                            for i, objs in OBJECTS.items() for c in objs for _ in range(2)]}
    if tmp_path is None:
        return data
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_pope_questions_follow_the_split_definitions():
    qs = build_questions(_coco(), num_images=5, seed=1)
    assert qs == build_questions(_coco(), num_images=5, seed=1)  # deterministic
    assert qs != build_questions(_coco(), num_images=5, seed=2)
    images = {q["image"] for q in qs}
    chosen = [i for i in OBJECTS if f"img{i}.jpg" in images]
    assert len(chosen) == 5 and all(len(OBJECTS[i]) >= 3 for i in chosen)  # image 5 has only 2 classes
    freq = Counter(c for i in chosen for c in OBJECTS[i])
    co = Counter((a, b) for i in chosen for a in OBJECTS[i] for b in OBJECTS[i] if a != b)
    for split in ("random", "popular", "adversarial"):
        sq = [q for q in qs if q["split"] == split]
        assert Counter(q["label"] for q in sq) == {"yes": 15, "no": 15}  # balanced
        for i in chosen:
            mine = [q for q in sq if q["image"] == f"img{i}.jpg"]
            yes = [q["object"] for q in mine if q["label"] == "yes"]
            no = [q["object"] for q in mine if q["label"] == "no"]
            assert set(yes) <= set(OBJECTS[i]) and len(set(yes)) == 3
            absent = sorted(set(CLASSES) - set(OBJECTS[i]))
            assert set(no) <= set(absent) and len(set(no)) == 3
            if split == "popular":
                assert no == sorted(absent, key=lambda c: (-freq[c], c))[:3]
            if split == "adversarial":
                assert no == sorted(absent, key=lambda c: (-sum(co[(p, c)] for p in OBJECTS[i]), c))[:3]
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("dog") == "Is there a dog in the image?"
    with pytest.raises(VsinkError, match="unknown POPE split"):
        build_questions(_coco(), splits=["hard"])


def test_chair_golden_cases():
    assert [c for _, c in mentions("Two men and a woman with dogs near a hot dog stand")] == \
        ["person", "person", "dog", "hot dog"]
    assert [c for _, c in mentions("A teddy bear, a baby bird and a bear.")] == ["teddy bear", "bird", "bear"]
    assert [p for p, _ in mentions("A toilet seat, a toilet and a seat.")] == ["toilet seat", "toilet"]
    assert [p for p, _ in mentions("A seat by the window.")] == ["seat"]  # no toilet: the seat stays (chair)
    assert singular("knives") == "knife" and singular("buses") == "bus" and singular("snow") == "snow"
    generated = [{"image_id": 1, "caption": "A man walks his dog. There is no cat, no cat at all."},
                 {"image_id": 2, "caption": "An empty street."},
                 {"image_id": 4, "caption": "People, a car and a bird."}]
    result = score_chair(generated, _coco(), vocabulary="vsink")
    # mentions: man, dog, cat, cat | none | people, car, bird -> 7; hallucinated: cat, cat
    assert result["chair_i"] == pytest.approx(2 / 7) and result["chair_s"] == pytest.approx(1 / 3)
    # ground truth: {person, dog, car}, {person, dog, horse, umbrella}, {person, car, bird}: 2 + 0 + 3 of 10
    assert result["recall"] == pytest.approx(5 / 10)
    assert result["avg_len"] == pytest.approx((13 + 3 + 6) / 3)  # words per caption
    first = result["captions"][0]
    assert first["mentioned"] == ["person", "dog", "cat", "cat"] and first["hallucinated"] == ["cat", "cat"]
    nothing = score_chair([{"image_id": 2, "caption": "Nothing here."}], _coco(), vocabulary="vsink")
    assert (nothing["chair_i"], nothing["chair_s"], nothing["recall"]) == (0.0, 0.0, 0.0)


def test_chair_vsink_words_are_unicode_letter_runs():
    assert words("très propre café naïve") == ["très", "propre", "café", "naïve"]
    assert words("Nai\u0308ve CAFÉ's 2 dogs_x") == ["naïve", "café", "dogs", "x"]  # decomposed ï, composed to NFC
    generated = [{"image_id": 1, "caption": "Un café très propre near a dog."},
                 {"image_id": 2, "caption": "A naïve cat's nap."}]
    result = score_chair(generated, _coco(), vocabulary="vsink")
    # un café très propre near a dog -> 7 | a naïve cat nap -> 4 (ASCII letter runs gave 8 and 5)
    assert result["avg_len"] == pytest.approx((7 + 4) / 2)
    assert [c["mentioned"] for c in result["captions"]] == [["dog"], ["cat"]]


def test_chair_reference_captions_extend_ground_truth():
    refs = {"annotations": [{"image_id": 1, "caption": "A boy and his cat near a car."}]}
    result = score_chair([{"image_id": 1, "caption": "A cat."}], _coco(), refs, vocabulary="vsink")
    assert result["chair_i"] == 0.0
    with pytest.raises(VsinkError, match="image_id 99 is not in the annotations"):
        score_chair([{"image_id": 99, "caption": "x"}], _coco())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vsink.data.demo_lvlm import build_tiny_llava

    root = tmp_path_factory.mktemp("run")
    model, processor = build_tiny_llava()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in OBJECTS:
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "images" / f"img{i}.jpg")
    _coco(root)
    return root


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pope_runner_interrupted_and_resumed(tiny, tmp_path, monkeypatch, capsys):
    import vsink.lvlm as lvlm_mod
    from vsink.cli import main

    argv = ["eval", "pope", str(tiny / "images"), "--model", str(tiny / "model"),
            "--annotations", str(tiny / "instances.json"), "--num-images", "2", "--splits", "random,popular",
            "--mitigation", "none,pai", "--set", "pai.alpha=0.5", "--max-new-tokens", "2", "--batch-size", "4",
            "--no-progress", "--out", str(tmp_path)]
    real = lvlm_mod.generate
    calls = []

    def flaky(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lvlm_mod, "generate", flaky)
    assert main(argv) == 130
    first = _lines(tmp_path / "none" / "answers.jsonl")
    assert len(first) == 8  # two batches of 4 were written before the interruption
    calls.clear()
    monkeypatch.setattr(lvlm_mod, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(argv) == 0
    assert len(calls) == 4 + 6  # 'none': the 16 questions left (4 batches); 'pai': all 24 (6 batches)
    for name in ("none", "pai"):
        rows = _lines(tmp_path / name / "answers.jsonl")
        assert sorted(r["question_id"] for r in rows) == list(range(24))  # each question exactly once
    assert _lines(tmp_path / "none" / "answers.jsonl")[:8] == first  # nothing redone
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["baseline"] == "none" and set(results["results"]) == {"none", "pai"}
    proto = results["protocol"]
    assert proto["max_new_tokens"] == 2 and proto["parser"] == "official" and len(proto["images"]) == 2
    assert proto["settings"]["pai"] == {"alpha": 0.5}
    assert results["results"]["none"]["mean"]["n"] == 24
    assert "pai (Δ vs none)" in (tmp_path / "results.md").read_text()
    assert main(["eval", "pope", "--answers", str(tmp_path / "none" / "answers.jsonl"), "--parser", "strict",
                 "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert scored["results"]["answers"]["mean"]["n"] == 24


def test_chair_runner_and_scoring_only(tiny, tmp_path):
    from vsink.cli import main

    assert main(["eval", "chair", str(tiny / "images"), "--model", str(tiny / "model"),
                 "--annotations", str(tiny / "instances.json"), "--num-images", "3", "--mitigation", "none,fastv",
                 "--max-new-tokens", "4", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = _lines(tmp_path / "fastv" / "generated.jsonl")
    assert len(rows) == 3 and {"image_id", "image", "caption"} <= set(rows[0])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"none", "fastv"} and results["protocol"]["prompt"].startswith("Please")
    gen = tmp_path / "mine.jsonl"
    gen.write_text(json.dumps({"image_id": 1, "caption": "A dog and a cat."}) + "\n")
    assert main(["eval", "chair", "--generated", str(gen), "--annotations", str(tiny / "instances.json"),
                 "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())["results"]["generated"]
    assert scored["chair_i"] == 0.5 and scored["captions"][0]["hallucinated"] == ["cat"]


def test_chair_runner_samples_several_captions_per_image_and_resumes(tiny, tmp_path, capsys):
    from vsink.cli import main

    argv = ["eval", "chair", str(tiny / "images"), "--model", str(tiny / "model"),
            "--annotations", str(tiny / "instances.json"), "--num-images", "2", "--samples-per-image", "3",
            "--temperature", "5", "--max-new-tokens", "6", "--no-progress", "--resamples", "200", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "none" / "generated.jsonl").read_text().splitlines()]
    keys = [(r["image_id"], r["sample"]) for r in rows]
    assert len(keys) == 6 and len(set(keys)) == 6 and {s for _, s in keys} == {0, 1, 2}
    assert len({r["caption"] for r in rows}) > 2  # sampled at temperature 5, not one greedy caption repeated
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["results"]["none"]["n"], results["results"]["none"]["images"]) == (6, 2)
    assert results["protocol"]["greedy"] is False and results["protocol"]["samples_per_image"] == 3
    assert results["statistics"]["resamples"] == 200
    before = (tmp_path / "none" / "generated.jsonl").read_text()
    assert main(argv) == 0  # resumed: every (image, sample) is there, nothing is generated again
    assert (tmp_path / "none" / "generated.jsonl").read_text() == before
    one = [a for a in argv if a not in ("--samples-per-image", "3")]
    capsys.readouterr()
    assert main(one + ["--out", str(tmp_path / "greedy")]) == 2  # a temperature without sampling: refused
    assert "--temperature and --top-p apply to sampled captions" in capsys.readouterr().err
    assert not (tmp_path / "greedy").exists()


def test_runner_records_the_mitigation_protocol(tiny, tmp_path, capsys):
    from vsink.cli import main

    argv = ["eval", "chair", str(tiny / "images"), "--model", str(tiny / "model"),
            "--annotations", str(tiny / "instances.json"), "--num-images", "2", "--mitigation", "none,pai",
            "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(argv + ["--protocol", "official"]) == 0
    assert {row["protocol"] for row in _lines(tmp_path / "pai" / "generated.jsonl")} == {"official"}
    proto = json.loads((tmp_path / "results.json").read_text())["protocol"]
    assert proto["mitigation_protocol"] == "official" and proto["settings"]["pai"] == {}
    assert proto["resolved_settings"]["pai"]["gamma"] == 1.1 and proto["resolved_settings"]["none"] is None
    assert '"mitigation_protocol": "official"' in (tmp_path / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 2  # resuming these files under the paper protocol would mix the two
    err = capsys.readouterr().err
    assert "the answers in generated.jsonl were made with other settings (protocol: \"official\" → \"paper\"" in err


def test_a_run_refused_before_its_first_answer_leaves_no_record(tiny, tmp_path, capsys):
    """Too many new tokens for the model's context is refused at the first batch, after the folder
    was prepared: no run record (nor empty mitigation folder) of a run that never ran is left, and
    the corrected command then runs into the same folder."""
    from vsink.cli import main

    argv = ["eval", "pope", str(tiny / "images"), "--model", str(tiny / "model"), "--annotations",
            str(tiny / "instances.json"), "--num-images", "1", "--splits", "random", "--no-progress", "--out", str(tmp_path)]
    assert main(argv + ["--max-new-tokens", "1000000"]) == 2
    assert "goes beyond" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main(argv + ["--max-new-tokens", "2"]) == 0
    assert len(_lines(tmp_path / "none" / "answers.jsonl")) == 6
    assert (tmp_path / "none" / "vsink-run.json").exists()


def test_runner_errors(tiny, tmp_path, capsys):
    from vsink.cli import main

    base = ["eval", "pope", "--annotations", str(tiny / "instances.json"), "--out", str(tmp_path)]
    assert main(base + [str(tiny / "images")]) == 2  # no --model
    assert main(base + [str(tiny / "images"), "--model", str(tiny / "model"),
                        "--mitigation", "none,nonesuch"]) == 2
    assert main(base + [str(tiny / "images"), "--model", str(tiny / "model"),
                        "--set", "var.p=0.5"]) == 2
    err = capsys.readouterr().err
    assert "needs --model" in err
    assert ("(entry 'nonesuch' is not none or a '+'-joined combination of damro, dola, fastv, m3id, opera, pai, ttr, vaf, var, "
            "vcd)") in err
    assert "MITIGATION.KEY" in err
    assert "Traceback" not in err


def test_bad_files_are_named(tmp_path):
    from vsink.io import read_jsonl

    bad = tmp_path / "instances.json"
    bad.write_text("{")
    with pytest.raises(VsinkError, match=r"instances\.json:1: not valid JSON"):
        build_questions(bad)
    data = _coco()
    data["annotations"].append({"image_id": 99, "category_id": 1})
    with pytest.raises(VsinkError, match=r"annotations\[\d+\] refers to an unknown image"):
        build_questions(data)
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"split": "random", "label": "yes", "answer": "yes"}\nnot json\n{"split": "random"}\n')
    with pytest.raises(VsinkError, match=r"answers\.jsonl:2: not valid JSON"):
        read_jsonl(answers)
    answers.write_text('{"split": "random", "label": "yes"}\n')
    with pytest.raises(VsinkError, match=r"answers\.jsonl:1: missing field\(s\) answer"):
        read_jsonl(answers, ("split", "label", "answer"))
    answers.write_text('{"split": "random", "label": "yes", "answer": "yes"}\n{"split": "ran')
    assert len(read_jsonl(answers, cut_last_line=True)) == 1  # in vsink's own logs, a line cut by a kill is ignored
    with pytest.raises(VsinkError, match=r"answers\.jsonl:2: not valid JSON .*cut by an interrupted write"):
        read_jsonl(answers)  # elsewhere (a file to be scored) it is an error, not a silent miscount


def test_jsonl_lines_end_at_newline_only(tmp_path):
    from vsink.io import read_jsonl

    answers = tmp_path / "answers.jsonl"
    # valid JSON Lines written with ensure_ascii=False: U+2028, U+0085 and U+000C stay raw inside the strings,
    # and str.splitlines() would break the first line in four (the old reader said "not a JSON object")
    rows = [{"split": "random", "label": "yes", "answer": "Yes\u2028there is\x85one\x0c."},
            {"split": "random", "label": "no", "answer": "No."}]
    answers.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(answers, ("split", "label", "answer")) == rows
    answers.write_text('{"a": 1}\n[1, 2]\n')  # valid JSON, but not an object
    with pytest.raises(VsinkError, match=r"answers\.jsonl:2: not a JSON object"):
        read_jsonl(answers)
    answers.write_text('{"a": 1}\n{"a": \n')  # a malformed line that ends in a newline was not cut by a kill
    with pytest.raises(VsinkError, match=r"answers\.jsonl:2: not valid JSON"):
        read_jsonl(answers, cut_last_line=True)
    answers.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(VsinkError, match=r"answers\.jsonl:1: not UTF-8 text"):
        read_jsonl(answers)


def test_append_after_a_cut_line(tmp_path):
    from vsink.io import append_jsonl, read_jsonl

    log = tmp_path / "answers.jsonl"
    append_jsonl(log, [{"question_id": 0}])
    with open(log, "a") as f:
        f.write('{"question_id": 1, "ans')  # a write cut by a kill: no newline, not JSON
    assert read_jsonl(log, cut_last_line=True) == [{"question_id": 0}]
    # appending after it must not glue the new line onto the cut one (that made line 2 unreadable)
    append_jsonl(log, [{"question_id": 1}, {"question_id": 2}])
    assert read_jsonl(log, cut_last_line=True) == [{"question_id": 0}, {"question_id": 1}, {"question_id": 2}]
    log.write_text('{"question_id": 0}')  # a complete last line that only lacks its newline is kept
    append_jsonl(log, [{"question_id": 1}])
    assert log.read_text() == '{"question_id": 0}\n{"question_id": 1}\n'
