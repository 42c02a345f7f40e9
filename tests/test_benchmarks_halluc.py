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


# ---------------------------------------------------------------- HallusionBench

from vsink.evaluate import hallusionbench as hb  # noqa: E402

HB_EXTRACTS = [
    ("Yes", "Yes"), ("YES", "Yes"),          # lower-cased, one word
    ("No.", "No"),                           # the "." is deleted (not followed by a digit)
    ("", "Unknown"),                         # no words
    ("Yes, the circle is larger.", "Yes"),   # ", " touches a space: commas deleted; words yes, the, ...
    ("No, it is not.", "No"),                # "not" is not "no"; only "no" counts
    ("Yes and no", "Unknown"),               # both words: neither answer
    ("yes/no", "Unknown"),                   # "/" touches no space: replaced by one, so "yes no": both
    ("Yes!", "Yes"),                         # "!" touches no space: a space, words ["yes"]
    ("Yes-sir", "Yes"),                      # "-" becomes a space: "yes sir"
    ("Yes-sir, 1,000 points", "Unknown"),    # a digit-comma-digit: every mark deleted, "yessir" is no word
    ("yes.no", "Unknown"),                   # the "." goes: "yesno"
    ("no.3", "Unknown"),                     # a "." before a digit stays: the word is "no.3"
    ("." * 32 + " Yes.", "Unknown"),         # only 32 periods go (re.UNICODE passed as count): "yes." stays
    ("." * 31 + " Yes.", "Yes"),             # 32 periods in all: every one goes
]


@pytest.mark.parametrize("text, expected", HB_EXTRACTS)
def test_hallusionbench_extraction_follows_vlmevalkit(text, expected):
    assert hb.extract(text) == expected


def _hb(cat, sub, s, f, q, gt, answer):
    return {"category": cat, "subcategory": sub, "set_id": s, "figure_id": f, "question_id": q, "gt_answer": gt,
            "answer": answer}


def test_hallusionbench_scores_by_hand():
    rows = [
        _hb("VD", "illusion", "0", "0", "0", "1", "Yes"),   # right
        _hb("VD", "illusion", "0", "0", "1", "0", "No"),    # right   -> figure VD/illusion/0/0 all right
        _hb("VD", "illusion", "0", "1", "0", "0", "Yes"),   # wrong
        _hb("VD", "illusion", "0", "1", "1", "1", "Yes"),   # right   -> figure 0/1 not all right
        _hb("VS", "chart", "0", "0", "0", "1", "Yes"),      # right; VS figure 0 (no figure): not a figure
        _hb("VS", "chart", "0", "1", "0", "1", "I think so"),  # Unknown: wrong
        _hb("VS", "chart", "0", "2", "0", "0", "No"),       # right
    ]
    s = hb.score_answers(rows)
    o = s["overall"]
    # aAcc: 5 of 7 questions
    assert o["aAcc"] == pytest.approx(5 / 7) and o["questions"] == 7
    # fAcc: figures VD 0/0 (all right), VD 0/1 (no), VS 0/1 (no), VS 0/2 (yes); VS 0/0 left out: 2 / 4
    assert (o["figures"], o["fAcc"]) == (4, 0.5)
    # qAcc: VD q0 over figures 0, 1 (right, wrong: no), VD q1 (right, right: yes), VS q0 over
    # figures 0, 1, 2 (right, wrong, right: no): 1 / 3
    assert (o["question_pairs"], o["qAcc"]) == (3, pytest.approx(1 / 3))
    vd, vs = s["categories"]["VD"], s["categories"]["VS"]
    assert (vd["aAcc"], vd["fAcc"], vd["qAcc"]) == (0.75, 0.5, 0.5)
    assert (vs["aAcc"], vs["fAcc"], vs["qAcc"]) == (pytest.approx(2 / 3), 0.5, 0.0)
    assert s["extracted"] == {"Yes": 4, "No": 2, "Unknown": 1}
    with pytest.raises(VsinkError, match="HallusionBench question VD_illusion_0_0_0 answered twice"):
        hb.score_answers(rows + rows[:1])


def test_hallusionbench_reader_and_errors(tmp_path):
    items = hb.read_items(DATA / "hallusionbench" / "HallusionBench.json")
    # the no-figure question (VS, visual_input 0) is not run: 6 of the 7 rows
    assert len(items) == 6 and items[0]["image"] == "hallusion_bench/VD/illusion/0_0.png"
    assert items[0]["index"] == "VD_illusion_0_0_0"
    rows = json.loads((DATA / "hallusionbench" / "HallusionBench.json").read_text())
    bad = tmp_path / "HallusionBench.json"
    for change, message in [({"gt_answer": "yes"}, r"\[0\]: field 'gt_answer' must be one of 0, 1"),
                            ({"category": "VX"}, r"\[0\]: field 'category' must be one of VD, VS"),
                            ({"filename": None}, r"\[0\]: field 'filename' must be a relative image path")]:
        bad.write_text(json.dumps([{**rows[0], **change}]))
        with pytest.raises(VsinkError, match=message):
            hb.read_items(bad)
    bad.write_text(json.dumps([{k: v for k, v in rows[0].items() if k != "set_id"}]))
    with pytest.raises(VsinkError, match=r"\[0\]: missing field 'set_id'"):
        hb.read_items(bad)
    bad.write_text(json.dumps({"rows": rows}))
    with pytest.raises(VsinkError, match="must be a JSON array"):
        hb.read_items(bad)


def test_hallusionbench_cli(tmp_path, monkeypatch):
    data = DATA / "hallusionbench" / "HallusionBench.json"
    out, results = _run_demo("hallusionbench", tmp_path, "--data", str(data))
    answers = _lines(out / "pai" / "answers.jsonl")
    assert len(answers) == 6 and {"index", "gt_answer", "answer", "image"} <= set(answers[0])
    none = results["results"]["none"]
    assert none["n"] == 6 and set(none["categories"]) == {"VD", "VS"} and 0 <= none["overall"]["aAcc"] <= 1
    _resumes_without_generating("hallusionbench", out, ["--data", str(data)], monkeypatch)
    rows = json.loads(data.read_text())
    mine = tmp_path / "mine.jsonl"
    # every official row answered with its label, the no-figure one included: all 100
    mine.write_text("".join(json.dumps({**r, "answer": "Yes" if r["gt_answer"] == "1" else "No"}) + "\n"
                            for r in rows))
    assert main(["eval", "hallusionbench", "--answers", str(mine), "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())["results"]["answers"]["overall"]
    assert (scored["aAcc"], scored["fAcc"], scored["qAcc"], scored["questions"]) == (1.0, 1.0, 1.0, 7)


# ---------------------------------------------------------------- Object HalBench

from vsink.evaluate import object_halbench as ohb  # noqa: E402
from vsink.evaluate import wordnet_lemmas as wl  # noqa: E402

OHB = DATA / "object_halbench"

OHB_MENTIONS = [
    # NLTK's lemmatiser gives "men" for "men": noun.exc lists men → man, both are WordNet nouns,
    # equally long, and the first wins; "men" is no entry, so no person. "vases" has the candidates
    # "vase" (-s) and "vas" (-ses → -s), both nouns: the shorter "vas" wins, no vase.
    ("Two men and a dog near vases.", [("dog", "dog")]),
    # "toilet seat" joins into toilet; any other "seat" goes when "toilet" is there
    ("A woman sits on a toilet seat next to the toilet.", [("woman", "person"), ("toilet", "toilet"),
                                                           ("toilet", "toilet")]),
    ("The seat of the toilet.", [("toilet", "toilet")]),
    # this table's pairs: "dining table" and "coffee table" (both the table class), "remote control"
    ("A dining table with a coffee table and a remote control.",
     [("dining table", "dining table"), ("coffee table", "dining table"), ("remote control", "remote")]),
    # "people" is its own WordNet lemma and an entry; "children" → child (noun.exc); "skis" → ski
    ("People, children and skis.", [("people", "person"), ("child", "person"), ("ski", "skis")]),
    # "baby cat" joins into cat; "train track" joins into a word the table lacks: no train
    ("A baby cat on a train track.", [("cat", "cat")]),
    # "tennis" stays (Pattern would make it "tenni"); "glasses" → glass, so "wine glasses" joins
    ("A tennis racket and glasses of wine in wine glasses",
     [("tennis racket", "tennis racket"), ("wine glass", "wine glass")]),
    # "buses" → bus, and "bus" stays a bus (Pattern's "bu" in the reference CHAIR)
    ("Buses and a bus.", [("bus", "bus"), ("bus", "bus")]),
    ("The knives and mice.", [("knife", "knife"), ("mouse", "mouse")]),  # noun.exc
]


@pytest.mark.parametrize("caption, expected", OHB_MENTIONS)
def test_object_halbench_mentions_follow_rlhf_v(caption, expected):
    assert ohb.mentions(caption) == expected


def test_wordnet_lemmatiser_on_a_hand_made_wordnet(tmp_path):
    # a WordNet of five nouns and one irregular form, and NLTK's rules worked by hand
    (tmp_path / "index.noun").write_text("  1 licence line\nglass n 1\nglasses n 1\nvas n 1\nvase n 1\nman n 1\n")
    (tmp_path / "noun.exc").write_text("men man\n")
    nouns = wl.read_wordnet(tmp_path)
    assert nouns.lemmas == {"glass", "glasses", "vas", "vase", "man"}  # the licence line is no noun
    assert wl.lemmatize("glasses", nouns) == "glass"  # glasses, glass (-ses → -s): the shorter
    assert wl.lemmatize("vases", nouns) == "vas"      # vase (-s), vas (-ses): the shorter
    assert wl.lemmatize("men", nouns) == "man"        # noun.exc; "men" is no noun in this WordNet
    # one rule gives "glasses", a noun: the search stops there although "glass" is shorter
    assert wl.lemmatize("glassess", nouns) == "glasses"
    # one rule gives "vases", no noun; the rules again: vase, vas; the shorter
    assert wl.lemmatize("vasess", nouns) == "vas"
    assert wl.lemmatize("dogs", nouns) == "dogs"      # no candidate: the word itself
    # the table keeps what matters to a vocabulary: for {glass, vase}, glasses → glass (it lemmatises
    # into a vocabulary word); not vases → vas (neither word is in the vocabulary: it changes nothing)
    table = wl.relevant_table({"glass", "vase"}, nouns)
    assert table["glasses"] == "glass" and "vases" not in table and "men" not in table
    # a vocabulary word whose lemma is another word is kept: "glasses" would never match itself
    assert wl.relevant_table({"glasses"}, nouns)["glasses"] == "glass"


def test_object_halbench_scores_by_hand():
    score = ohb.scorer({"annotations": OHB / "instances_val2014.json",
                        "captions": OHB / "captions_val2014.json"})
    # truth: 139 {person, dog}; 285 {toilet} ∪ the reference caption's {vase, sink}
    out = score([
        {"image_id": 139, "caption": "Assistant: A man and his dog on a chair."},  # person, dog, chair (hallucinated)
        {"image_id": 285, "caption": "A white toilet next to a sink."},             # toilet, sink: both right
    ])
    assert (out["mentions"], out["hallucinated_mentions"]) == (5, 1)
    assert out["chair_i"] == 0.2 and out["chair_s"] == 0.5 and out["chair_s_refine"] == 0.5
    # recall: distinct right classes (2 + 2) / truth classes (2 + 3)
    assert out["recall"] == pytest.approx(4 / 5)
    # "Assistant:" removed first: "A man and his dog on a chair." is 8 words, the other 7
    assert out["avg_len"] == 7.5
    # a caption with no object counts for CHAIR_s, not for the refined CHAIR_s
    out = score([{"image_id": 139, "caption": "A chair."}, {"image_id": 285, "caption": "Nothing here."}])
    assert (out["chair_s"], out["chair_s_refine"]) == (0.5, 1.0)


def test_object_halbench_reader_errors(tmp_path):
    settings = {"annotations": OHB / "instances_val2014.json"}
    items = ohb.read_items(OHB / "obj_halbench_300_with_image.jsonl", settings)
    assert [it["image"] for it in items] == ["COCO_val2014_000000000139.jpg", "COCO_val2014_000000000285.jpg"]
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"image_id": 7, "question": "Describe."}) + "\n")
    with pytest.raises(VsinkError, match=r"line 1: image_id 7 is not in"):
        ohb.read_items(bad, settings)
    bad.write_text(json.dumps({"image_id": 139}) + "\n")
    with pytest.raises(VsinkError, match=r"q.jsonl:1: missing field\(s\) question"):
        ohb.read_items(bad, settings)
    with pytest.raises(VsinkError, match="needs --annotations"):
        ohb.read_items(OHB / "obj_halbench_300_with_image.jsonl", {})


def test_object_halbench_cli(tmp_path, monkeypatch):
    args = ["--data", str(OHB / "obj_halbench_300_with_image.jsonl"), str(OHB / "val2014"),
            "--annotations", str(OHB / "instances_val2014.json"), "--captions", str(OHB / "captions_val2014.json")]
    out, results = _run_demo("object-halbench", tmp_path, *args)
    rows = _lines(out / "none" / "generated.jsonl")
    assert [r["image_id"] for r in rows] == [139, 285] and "caption" in rows[0]
    assert results["results"]["none"]["n"] == 2 and results["results"]["none"]["vocabulary"] == "object-halbench"
    _resumes_without_generating("object-halbench", out, args, monkeypatch)
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"image_id": 139, "caption": "A dog and a cat."}) + "\n")
    assert main(["eval", "object-halbench", "--answers", str(mine), "--annotations",
                 str(OHB / "instances_val2014.json"), "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())["results"]["answers"]
    assert scored["chair_i"] == 0.5 and scored["captions"][0]["hallucinated"] == ["cat"]


# ---------------------------------------------------------------- AMBER

from vsink.evaluate import amber  # noqa: E402

AMBER = DATA / "amber"


def test_amber_discriminative_by_hand():
    rows = [({"type": "discriminative-hallucination", "truth": "yes"}, "Yes"),   # right
            ({"type": "discriminative-hallucination", "truth": "yes"}, "Yes."),  # not exactly "Yes": wrong
            ({"type": "discriminative-hallucination", "truth": "no"}, "No"),     # right, a right "No"
            ({"type": "discriminative-hallucination", "truth": "no"}, "Yes"),    # wrong
            ({"type": "discriminative-attribute-state", "truth": "no"}, "No"),   # right
            ({"type": "relation", "truth": "no"}, "no")]                         # lower case: not "No", wrong
    d = amber.score_discriminative(rows)
    ex = d["types"]["existence"]
    # every denominator starts at 0.001: accuracy 2/4.001 → 50.0; recall 1/2.001 → 50.0; precision
    # 1/1.001 = 99.90 → 99.9 although every "No" is right; F1 from the rounded 0.999 and 0.5 with
    # + 0.001 (existence): 0.999 / 1.5 = 0.666 → 66.6
    assert (ex["accuracy"], ex["precision"], ex["recall"], ex["f1"], ex["questions"]) == (50.0, 99.9, 50.0, 66.6, 4)
    # state alone: 1/1.001 everywhere → 99.9; F1 2·0.999²/(1.998 + 0.0001) = 0.99895 → 99.9
    assert d["types"]["state"] == {"accuracy": 99.9, "precision": 99.9, "recall": 99.9, "f1": 99.9, "questions": 1}
    # attribute sums state, number and action, each starting at 0.001: 1/1.003 = 99.70 → 99.7;
    # F1 2·0.997²/(1.994 + 0.0001) = 0.99695 → 99.7
    assert d["types"]["attribute"]["accuracy"] == 99.7 and d["types"]["attribute"]["f1"] == 99.7
    rel = d["types"]["relation"]  # nothing right: 0/1.001, 0/0.001, 0/1.001; F1 0/(0 + 0 + 0.0001)
    assert (rel["accuracy"], rel["precision"], rel["recall"], rel["f1"]) == (0.0, 0.0, 0.0, 0.0)
    o = d["types"]["overall"]
    # 3 right of 6.001 → 50.0; recall 2/4.001 → 50.0; precision 2/2.001 = 99.950 → 100.0;
    # F1 2·1·0.5/(1.5 + 0.0001) = 0.66662 → 66.7
    assert (o["accuracy"], o["precision"], o["recall"], o["f1"]) == (50.0, 100.0, 50.0, 66.7)
    assert "number" not in d["types"] and d["neither_yes_nor_no"] == 2
    # vsink's first-word reading makes "Yes." and "no" answers: relation's "no" is right
    assert amber.score_discriminative(rows, "first-word")["types"]["relation"]["accuracy"] == 99.9


def _amber_generative(similar=lambda a, b: 0.0):
    annotations, relation, safe = amber.read_data(str(AMBER))
    rows = [(annotations[1], "A man walks his dog on the ground under the sky near an orange light and two cats."),
            (annotations[2], "A boat near a forest with sunglasses.")]
    return amber.score_generative(rows, relation, set(safe), similar, 0.8)


def test_amber_generative_by_hand():
    g = _amber_generative()
    # response 1 (truth sky, grass, person; hallu dog, bird): its words of relation.json, in order,
    # man dog ground sky orange light cat ("cats" → cat). man covers person (associated), ground
    # covers grass, sky itself; orange and light are global safe words (skipped, still counted);
    # dog is a hallu object (Cog) and hallucinated; cat is hallucinated.
    # response 2 (truth ship, ship, tree; hallu cat): boat covers the first ship only (the first
    # match wins: the repeated ship is never covered), forest covers tree; "sunglasses" lemmatises
    # to "sunglass", no word of relation.json, though "sunglasses" is one.
    # (the counts the intervals resample: 3 truth objects, all covered; 2 hallu objects, dog covered)
    assert g["per_response"][0] == {"id": 1, "objects": ["man", "dog", "ground", "sky", "orange", "light", "cat"],
                                    "hallucinated": ["dog", "cat"], "truth": 3, "covered": 3, "hallu": 2, "cog": 1}
    assert g["per_response"][1]["objects"] == ["boat", "forest"] and g["per_response"][1]["hallucinated"] == []
    # CHAIR 2/(9 + 0.001) → 22.2; Cover (3 + 2)/(6 + 0.001) → 83.3; Hal 100 − 1/2.001·100 = 50.02 → 50.0;
    # Cog 1/(3 + 0.001) → 33.3
    assert (g["CHAIR"], g["Cover"], g["Hal"], g["Cog"]) == (22.2, 83.3, 50.0, 33.3)
    # a word similar (> 0.8) to a truth word covers it and is not hallucinated: cat ~ person
    planted = _amber_generative(lambda a, b: 0.9 if {a, b} == {"cat", "person"} else 0.0)
    assert planted["per_response"][0]["hallucinated"] == ["dog"] and planted["CHAIR"] == 11.1  # 1/9.001


def test_amber_without_spacy_says_so_and_records_it():
    settings = {"data": AMBER, "similarity_model": "no_such_model", "similarity_score": 0.8, "yes_no": "exact"}
    with pytest.warns(Warning, match="word similarity is off"):
        score = amber.scorer(settings)
    out = score([{"id": 1, "response": "A dog."}, {"id": 3, "response": "Yes"}])
    assert out["settings"]["word_similarity"].startswith("off: exact matches only")
    assert out["generative"]["responses"] == 1 and out["discriminative"]["types"]["existence"]["questions"] == 1


def test_amber_reader_errors(tmp_path):
    items = amber.read_items(AMBER, {"queries": "all"})
    assert [it["id"] for it in items] == [1, 2, 3, 4, 5] and items[0]["question"] == "Describe this image."
    root = tmp_path / "amber"
    shutil.copytree(AMBER, root)
    (root / "safe_words.txt").unlink()
    with pytest.raises(VsinkError, match="no safe_words.txt"):
        amber.read_data(str(root))
    shutil.copy(AMBER / "safe_words.txt", root / "safe_words.txt")
    annotations = json.loads((AMBER / "annotations.json").read_text())
    annotations[0]["truth"].append("unicorn")
    (root / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(VsinkError, match=r"\[0\]: truth word 'unicorn' is not a key of relation.json"):
        amber.read_data(str(root))
    annotations[0]["truth"].pop()
    annotations[2]["truth"] = "maybe"
    (root / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(VsinkError, match=r"\[2\]: field 'truth' must be one of yes, no"):
        amber.read_data(str(root))


def test_amber_cli(tmp_path, monkeypatch, capsys):
    args = ["--data", str(AMBER), str(AMBER / "image")]
    out, results = _run_demo("amber", tmp_path, *args)
    assert "word similarity is off" in capsys.readouterr().err
    rows = _lines(out / "none" / "answers.jsonl")
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5] and "response" in rows[0]
    none = results["results"]["none"]
    assert none["generative"]["responses"] == 2 and none["settings"]["word_similarity"].startswith("off")
    assert results["protocol"]["similarity_model"] == "en_core_web_lg"
    assert "none: scored with nouns: every token" in (out / "results.md").read_text()
    assert "word_similarity</td><td>off: exact matches only" in (out / "results.html").read_text()
    _resumes_without_generating("amber", out, args, monkeypatch)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in [{"id": 3, "response": "Yes"}, {"id": 4, "response": "No"}]))
    assert main(["eval", "amber", "--answers", str(mine), "--data", str(AMBER), "--out", str(tmp_path / "s")]) == 0
    scored = json.loads((tmp_path / "s" / "results.json").read_text())["results"]["answers"]
    assert scored["discriminative"]["types"]["overall"]["accuracy"] == 100.0  # 2/2.001 = 99.95 → 100.0


# ---------------------------------------------------------------- lmms-eval samples

def _samples(path, samples):
    """Lines as lmms-eval's --log_samples writes them (doc without images, filtered_resps)."""
    path.write_text("".join(json.dumps({"doc_id": i, "doc": doc, "target": doc.get("answer"), "arguments": [],
                                        "resps": [[text]], "filtered_resps": [text]}) + "\n"
                            for i, (doc, text) in enumerate(samples)))
    return path


def test_mme_scores_lmms_eval_samples(tmp_path):
    # lmms-lab/MME documents: the two questions of an image share its question_id; other
    # categories (here OCR) are not part of the hallucination subset and are left out
    docs = [({"question_id": "existence/1.jpg", "question": "Is there a dog?", "answer": "Yes",
              "category": "existence"}, "Yes"),
            ({"question_id": "existence/1.jpg", "question": "Is there a cat?", "answer": "No",
              "category": "existence"}, "Yes"),
            ({"question_id": "OCR/2.jpg", "question": "Is the word 'hi'?", "answer": "Yes", "category": "OCR"}, "No"),
            ({"question_id": "OCR/2.jpg", "question": "Is the word 'ho'?", "answer": "No", "category": "OCR"}, "No")]
    path = _samples(tmp_path / "samples_mme.jsonl", docs)
    assert main(["eval", "mme", "--answers", str(path), "--out", str(tmp_path / "out")]) == 0
    scored = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["answers"]
    # one of two right, the pair not: 50 + 0
    assert list(scored["categories"]) == ["existence"] and scored["categories"]["existence"]["score"] == 50.0


def test_hallusionbench_scores_lmms_eval_samples(tmp_path, capsys):
    rows = json.loads((DATA / "hallusionbench" / "HallusionBench.json").read_text())
    path = _samples(tmp_path / "samples_hb.jsonl", [({k: v for k, v in r.items() if k != "filename"},
                                                     "Yes" if r["gt_answer"] == "1" else "No") for r in rows])
    assert main(["eval", "hallusionbench", "--answers", str(path), "--out", str(tmp_path / "out")]) == 0
    scored = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["answers"]["overall"]
    assert (scored["aAcc"], scored["questions"]) == (1.0, 7)
    broken = _samples(tmp_path / "broken.jsonl", [({"category": "VD"}, "Yes")])
    capsys.readouterr()
    assert main(["eval", "hallusionbench", "--answers", str(broken), "--out", str(tmp_path / "bad")]) == 2
    assert "broken.jsonl:1: doc: missing field 'subcategory'" in capsys.readouterr().err
    # Object HalBench has no lmms-eval task: said in one line
    assert main(["eval", "object-halbench", "--answers", str(path), "--annotations",
                 str(OHB / "instances_val2014.json"), "--out", str(tmp_path / "o")]) == 2
    assert "lmms-eval has no Object HalBench task that vsink reads" in capsys.readouterr().err


def test_amber_scores_lmms_eval_samples(tmp_path, capsys):
    # lmms-eval's amber_g documents (lmms_eval/tasks/amber_g/utils.py reads question_id, truth and
    # hallu from each): the two generative queries of tests/data/amber with the responses of
    # test_amber_generative_by_hand, so the scores are the ones worked out there
    annotations = {a["id"]: a for a in json.loads((AMBER / "annotations.json").read_text())}
    texts = {1: "A man walks his dog on the ground under the sky near an orange light and two cats.",
             2: "A boat near a forest with sunglasses."}
    docs = [({"question_id": i, "task_type": "generative", "truth": annotations[i]["truth"],
              "hallu": annotations[i]["hallu"]}, texts[i]) for i in (1, 2)]
    path = _samples(tmp_path / "samples_amber_g.jsonl", docs)
    assert main(["eval", "amber", "--answers", str(path), "--data", str(AMBER), "--out", str(tmp_path / "a")]) == 0
    scored = json.loads((tmp_path / "a" / "results.json").read_text())["results"]["answers"]["generative"]
    assert (scored["CHAIR"], scored["Cover"], scored["Hal"], scored["Cog"]) == (22.2, 83.3, 50.0, 33.3)
    # a document numbered otherwise (its objects are not annotations.json's for its id) is refused
    swapped = _samples(tmp_path / "swapped.jsonl", [({**docs[0][0], "question_id": 2}, texts[1])])
    capsys.readouterr()
    assert main(["eval", "amber", "--answers", str(swapped), "--data", str(AMBER), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # a warning line (no spaCy here), then the one-line refusal
    assert err.splitlines()[-1].startswith("vsink: error: AMBER answer id 2: its lmms-eval document's truth")


def test_example_scores_every_benchmark(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["hallucination_benchmarks.py", str(tmp_path)])
    with pytest.warns(Warning, match="word similarity is off"):
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "hallucination_benchmarks.py"), run_name="__main__")
    out = capsys.readouterr().out
    # the comments of the example, worked by hand: MME 50 + 0; HallusionBench one of two right, the
    # edited figure wrong, the question not right on both; Object HalBench puppy → dog, cats wrong;
    # AMBER cat hallucinated of dog, cat, ground: 1/3.001; both truth objects covered: 2/2.001 → 100.0
    for line in ("MME existence score: 50.0", "HallusionBench aAcc / fAcc / qAcc: 0.5 0.5 0.0",
                 "Object HalBench CHAIR_i: 0.5", "AMBER CHAIR / Cover: 33.3 100.0", "AMBER existence accuracy: 99.9"):
        assert line in out


def test_benchmark_pages_show_deltas_with_two_decimals_and_the_banner(tmp_path):
    from vsink.evaluate.hallucination import save_results

    def scores(existence_right):
        rows = [_mme_row("existence", "a", 0, "yes", "Yes"), _mme_row("existence", "a", 1, "no", "No"),
                _mme_row("existence", "b", 0, "yes", "Yes"),
                _mme_row("existence", "b", 1, "no", "No" if existence_right else "Yes")]
        return mme.score_answers(rows)

    paths = save_results(tmp_path, "mme", {"synthetic": True, "prompt": "<b>{question}</b>"},
                         {"none": scores(False), "var": scores(True)}, {})
    page, md = paths["html"].read_text(), paths["markdown"].read_text()
    # existence 125.00 → 200.00: +75.00. The bootstrap draws two images from {a, b}: aa, ab/ba, bb
    # with probabilities 1/4, 1/2, 1/4. none scores 200, 125, 50 on them; var 200 always; so the
    # 95 % interval of none is [50, 200] (a quarter of the mass at each end, far beyond 2.5 % of
    # 1000 resamples), var's [200, 200], and the paired difference 0, 75 or 150: [0, 150] contains 0,
    # so the +75.00 is not coloured as a win
    assert ("| existence score (0–200) | 125.00 [50.00, 200.00] | 200.00 [200.00, 200.00] "
            "(Δ +75.00 [+0.00, +150.00]) |") in md
    assert "<span class='muted'>+75.00 [+0.00, +150.00]</span>" in page and "Synthetic demo LVLM" in page
    # McNemar: of 4 paired questions only b's second changed (wrong → right): p = 2·P[X ≤ 0], X ~ B(1, 1/2) → 1
    assert "McNemar's exact test on 4 paired questions: 0 right only under none, 1 right only under var, p = 1" in md
    assert "0 / 1, p = 1" in page
    assert "&lt;b&gt;{question}&lt;/b&gt;" in page and "<b>{question}</b>" not in page


def test_a_changed_scoring_file_is_a_different_run(tmp_path, capsys):
    # the run record holds the bytes of AMBER's data files: a resume after relation.json changed is refused
    data = tmp_path / "amber"
    shutil.copytree(AMBER, data)
    argv = ["eval", "amber", "--data", str(data), str(data / "image"), "--model", "demo-llava", "--no-progress",
            "--max-new-tokens", "2", "--limit", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    relation = json.loads((data / "relation.json").read_text())
    relation["dog"] = ["puppy"]
    (data / "relation.json").write_text(json.dumps(relation))
    capsys.readouterr()
    assert main(argv) == 2
    assert "data_file:" in capsys.readouterr().err
