"""Intervals and paired tests of the offline benchmarks (vsink.evaluate.benchmark_stats): each
benchmark's resampling unit and counts worked out by hand, the intervals against
scipy.stats.bootstrap(method="percentile") on the same units and seed (the draw tests/test_stats.py
shows equal), hand-enumerable intervals of two units, McNemar's exact test on hand cases, and the
report's colours."""

import json

import numpy as np
import pytest
import scipy.stats

from vsink.cli import main
from vsink.evaluate import amber, mme
from vsink.evaluate import hallusionbench as hb
from vsink.evaluate import object_halbench as ohb
from vsink.evaluate.benchmark_stats import benchmark_statistics
from vsink.evaluate.hallucination import save_results
from vsink.evaluate.stats import Bootstrap

from test_benchmarks_halluc import AMBER, OHB, _amber_generative, _hb, _mme_row

SETTINGS = Bootstrap(0.95, 500, 3)


def _scipy(per_unit_stat, n, settings=SETTINGS):
    """scipy's percentile bootstrap of a statistic of resampled unit indices."""
    ref = scipy.stats.bootstrap((np.arange(n),), per_unit_stat, n_resamples=settings.resamples,
                                confidence_level=settings.level, method="percentile",
                                rng=np.random.default_rng(settings.seed), vectorized=True)
    return ref.confidence_interval.low, ref.confidence_interval.high


# ---------------------------------------------------------------- MME: the image

def test_mme_resamples_images_as_scipy_does():
    # three existence images: a both right, b one right, c none right
    rows = [_mme_row("existence", "a", 0, "yes", "Yes"), _mme_row("existence", "a", 1, "no", "No"),
            _mme_row("existence", "b", 0, "yes", "Yes"), _mme_row("existence", "b", 1, "no", "Yes"),
            _mme_row("existence", "c", 0, "yes", "No"), _mme_row("existence", "c", 1, "no", "Yes")]
    scores = mme.score_answers(rows)
    stats = benchmark_statistics("mme", {"none": scores}, SETTINGS)
    assert stats["statistics"]["unit"] == "image"
    iv = scores["intervals"]
    right, both = np.array([2, 1, 0]), np.array([1, 0, 0])
    # accuracy Σ right / Σ 2 questions, accuracy+ Σ both / images, score (acc + acc+) × 100
    assert iv["existence accuracy (%)"]["value"] == pytest.approx(3 / 6)
    assert iv["existence accuracy+ (%)"]["value"] == pytest.approx(1 / 3)
    assert iv["existence score (0–200)"]["value"] == pytest.approx(100 * (0.5 + 1 / 3))
    low, high = _scipy(lambda i, axis=-1: right[i].sum(axis) / (2 * i.shape[axis]), 3)
    assert (iv["existence accuracy (%)"]["low"], iv["existence accuracy (%)"]["high"]) == pytest.approx((low, high))
    low, high = _scipy(lambda i, axis=-1: 100 * (right[i].sum(axis) / (2 * i.shape[axis]) + both[i].mean(axis)), 3)
    score = iv["existence score (0–200)"]
    assert (score["low"], score["high"]) == pytest.approx((low, high))
    # the only category: the total's interval is its score's; the absent categories show no row
    assert iv["total score (sum of categories)"] == iv["existence score (0–200)"]
    assert not any(label.startswith("count") for label in iv)


def _two_images(fixed):
    """Existence images a and b, each with its second question wrong unless ``fixed``."""
    return mme.score_answers([_mme_row("existence", i, n, label, label.capitalize() if fixed or n == 0 else "Yes")
                              for i in "ab" for n, label in enumerate(("yes", "no"))])


def test_a_paired_interval_away_from_zero_is_coloured(tmp_path):
    # none: each image one right of two: score 50 on every resample; var: 200 on every resample.
    # The paired difference is 150 on every resample: [150, 150] excludes 0, a win.
    paths = save_results(tmp_path, "mme", {}, {"none": _two_images(False), "var": _two_images(True)}, {}, SETTINGS)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert ("| existence score (0–200) | 50.00 [50.00, 50.00] | 200.00 [200.00, 200.00] "
            "(Δ +150.00 [+150.00, +150.00]) |") in md
    assert "<span class='pos'>+150.00 [+150.00, +150.00]</span>" in page
    # McNemar: two questions wrong → right, none the other way: p = 2 · P[X ≤ 0], X ~ B(2, 1/2) = 2/4
    summary = json.loads(paths["json"].read_text())
    assert summary["comparisons"]["var"]["mcnemar"] == {"n": 4, "b": 0, "c": 2, "p": 0.5}
    assert summary["comparisons"]["var"]["n"] == 2  # paired images
    assert "items" not in summary["results"]["none"]  # resampled, then dropped


def test_cli_records_the_bootstrap_settings(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in [
        _mme_row("existence", "a", 0, "yes", "Yes"), _mme_row("existence", "a", 1, "no", "No")]))
    out = tmp_path / "out"
    assert main(["eval", "mme", "--answers", str(answers), "--ci-level", "0.9", "--resamples", "200",
                 "--bootstrap-seed", "5", "--out", str(out)]) == 0
    expected = {"method": "percentile bootstrap", "level": 0.9, "resamples": 200, "seed": 5, "unit": "image"}
    assert json.loads((out / "results.json").read_text())["statistics"] == expected
    assert json.loads((out / "vsink-run.json").read_text())["determining"]["statistics"] == expected
    assert "90 % percentile bootstrap over images, 200 resamples, seed 5" in (out / "results.md").read_text()
    assert main(["eval", "mme", "--answers", str(answers), "--resamples", "5", "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------- HallusionBench: the set

HB_ROWS = [  # the rows of test_hallusionbench_scores_by_hand: sets VD/illusion/0 and VS/chart/0
    _hb("VD", "illusion", "0", "0", "0", "1", "Yes"),      # right
    _hb("VD", "illusion", "0", "0", "1", "0", "No"),       # right
    _hb("VD", "illusion", "0", "1", "0", "0", "Yes"),      # wrong
    _hb("VD", "illusion", "0", "1", "1", "1", "Yes"),      # right
    _hb("VS", "chart", "0", "0", "0", "1", "Yes"),         # right; figure 0 of VS: no figure
    _hb("VS", "chart", "0", "1", "0", "1", "I think so"),  # Unknown: wrong
    _hb("VS", "chart", "0", "2", "0", "0", "No"),          # right
]


def test_hallusionbench_resamples_sets_with_their_figures_and_question_groups():
    units = hb.units(hb.score_answers(HB_ROWS))
    assert units.unit == "set" and units.keys == ["VD_illusion_0", "VS_chart_0"]
    # per split (overall, VD, VS): questions, right, figures, figures all right, question groups,
    # groups all right; then Unknown answers and questions.
    # VD set: 4 questions, 3 right; figures 0 (right, right) and 1 (wrong, right): 1 of 2;
    # question groups 0 (right, wrong) and 1 (right, right): 1 of 2.
    # VS set: 3 questions, 2 right; figures 1 and 2 (0 has none): 1 of 2; question 0 over three
    # figures (right, wrong, right): 0 of 1; one Unknown.
    vd, vs = [4, 3, 2, 1, 2, 1], [3, 2, 2, 1, 1, 0]
    assert units.rows.tolist() == [vd + vd + [0] * 6 + [0, 4], vs + [0] * 6 + vs + [1, 3]]
    # two sets: draws VD VD, VD VS (either order), VS VS with probabilities 1/4, 1/2, 1/4 give overall
    # qAcc 2/4, 1/3, 0/2: the 95 % interval is [0, 0.5]; aAcc 6/8, 5/7, 4/6: [2/3, 3/4]
    scores = hb.score_answers(HB_ROWS)
    benchmark_statistics("hallusionbench", {"none": scores}, Bootstrap(0.95, 1000, 0))
    q, a = scores["intervals"]["overall qAcc (%)"], scores["intervals"]["overall aAcc (%)"]
    assert (q["value"], q["low"], q["high"]) == pytest.approx((1 / 3, 0, 0.5))
    assert (a["value"], a["low"], a["high"]) == pytest.approx((5 / 7, 2 / 3, 3 / 4))
    assert scores["intervals"]["answers neither yes nor no (%)"]["value"] == pytest.approx(1 / 7)


def test_hallusionbench_mcnemar_by_hand():
    # the mitigation turns questions 0, 1 and 4 wrong and question 2 right: b = 3, c = 1;
    # p = 2 · P[X ≤ 1], X ~ B(4, 1/2) = 2 · (1 + 4) / 16 = 0.625
    flipped = [dict(r) for r in HB_ROWS]
    flipped[0]["answer"], flipped[1]["answer"], flipped[2]["answer"], flipped[4]["answer"] = "No", "Yes", "No", "No"
    scores = {"none": hb.score_answers(HB_ROWS), "var": hb.score_answers(flipped)}
    stats = benchmark_statistics("hallusionbench", scores, SETTINGS)
    assert stats["comparisons"]["var"]["mcnemar"] == {"n": 7, "b": 3, "c": 1, "p": 0.625}
    # aAcc 5/7 → 3/7 on the same questions
    assert stats["comparisons"]["var"]["overall aAcc (%)"]["value"] == pytest.approx(-2 / 7)


# ---------------------------------------------------------------- Object HalBench: the image

def test_object_halbench_intervals_of_image_sums():
    score = ohb.scorer({"annotations": OHB / "instances_val2014.json", "captions": OHB / "captions_val2014.json"})
    scores = score([{"image_id": 139, "caption": "Assistant: A man and his dog on a chair."},  # 3 mentions, 1 bad
                    {"image_id": 285, "caption": "A white toilet next to a sink."}])          # 2 mentions, 0 bad
    stats = benchmark_statistics("object-halbench", {"none": scores}, SETTINGS)
    assert stats["statistics"]["unit"] == "image" and "comparisons" in stats
    iv = scores["intervals"]
    # the point values are the scorer's (test_object_halbench_scores_by_hand)
    assert [iv[k]["value"] for k in ("CHAIR_s (%)", "CHAIR_s over captions with an object (%)", "CHAIR_i (%)",
                                     "object recall (%)", "average length (words)")] == pytest.approx(
        [0.5, 0.5, 0.2, 0.8, 7.5])
    bad, mentions = np.array([1, 0]), np.array([3, 2])
    low, high = _scipy(lambda i, axis=-1: bad[i].sum(axis) / mentions[i].sum(axis), 2)
    assert (iv["CHAIR_i (%)"]["low"], iv["CHAIR_i (%)"]["high"]) == pytest.approx((low, high))
    # two images: CHAIR_i is 2/6, 1/5 or 0/4: the 95 % interval is [0, 1/3]
    assert (low, high) == pytest.approx((0, 1 / 3))
    assert stats["comparisons"] == {}


# ---------------------------------------------------------------- AMBER: the query

def test_amber_intervals_use_the_reference_formulae_unrounded():
    rows = [({"id": 1, "type": "discriminative-hallucination", "truth": "yes"}, "Yes"),  # right
            ({"id": 2, "type": "discriminative-hallucination", "truth": "yes"}, "Yes."),  # wrong
            ({"id": 3, "type": "discriminative-hallucination", "truth": "no"}, "No"),    # right "No"
            ({"id": 4, "type": "discriminative-hallucination", "truth": "no"}, "Yes"),   # wrong
            ({"id": 5, "type": "discriminative-attribute-state", "truth": "no"}, "No"),  # right "No"
            ({"id": 6, "type": "relation", "truth": "no"}, "no")]                        # wrong
    d = amber.score_discriminative(rows)
    scores = {"discriminative": d, "items": d.pop("items"), "settings": {}, "n": 6}
    benchmark_statistics("amber", {"none": scores}, SETTINGS)
    iv = scores["intervals"]
    # existence (test_amber_discriminative_by_hand) without the rounding: accuracy 2/4.001,
    # precision 1/1.001, recall 1/2.001, F1 with + 0.001 in its denominator
    p, r = 1 / 1.001, 1 / 2.001
    assert [iv[f"existence {k}"]["value"] for k in ("accuracy", "precision", "recall", "f1")] == pytest.approx(
        [100 * 2 / 4.001, 100 * p, 100 * r, 100 * 2 * p * r / (p + r + 0.001)])
    # attribute: the three groups' starts, 1/1.003; overall: 3 right of 6.001
    assert iv["attribute accuracy"]["value"] == pytest.approx(100 / 1.003)
    assert iv["overall accuracy"]["value"] == pytest.approx(100 * 3 / 6.001)
    assert "number accuracy" not in iv  # no such question: no report row


def test_amber_generative_interval_by_hand():
    g = _amber_generative()  # response 1: 7 objects, 2 hallucinated; response 2: 2 objects, none
    scores = {"generative": g, "settings": {}, "n": 2}
    stats = benchmark_statistics("amber", {"none": scores}, Bootstrap(0.95, 1000, 0))
    assert stats["statistics"]["unit"] == "query"
    chair = scores["intervals"]["generative CHAIR"]
    # CHAIR 2/(9 + 0.001); resamples of the two responses: 4/(14.001), 2/(9.001), 0/(4.001), so the
    # 95 % interval is [0, 400/14.001]
    assert (chair["value"], chair["low"], chair["high"]) == pytest.approx((200 / 9.001, 0, 400 / 14.001))
    assert scores["intervals"]["generative Cover"]["value"] == pytest.approx(500 / 6.001)
    assert scores["intervals"]["generative Hal"]["value"] == pytest.approx(100 - 100 / 2.001)
    assert scores["intervals"]["generative Cog"]["value"] == pytest.approx(100 / 3.001)


def test_amber_cli_reports_intervals_and_mcnemar(tmp_path):
    answers = tmp_path / "answers.jsonl"
    annotations = json.loads((AMBER / "annotations.json").read_text())
    answers.write_text("".join(json.dumps({"id": a["id"], "response": "Yes"}) + "\n" for a in annotations))
    out = tmp_path / "out"
    assert main(["eval", "amber", "--answers", str(answers), "--data", str(AMBER), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["statistics"]["unit"] == "query" and "items" not in summary["results"]["answers"]
    assert "[" in (out / "results.md").read_text().split("| generative CHAIR |")[1].split("\n")[0]
