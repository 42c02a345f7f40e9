"""Intervals and paired tests of POPE and CHAIR results: against scipy's bootstrap over the same
units and hand computation; the report colours a delta only when its interval excludes 0; CHAIR
with several captions per image (the runner's test is in test_hallucination.py)."""

import json
import re

import numpy as np
import pytest
import scipy.stats

from vsink.evaluate.chair import score_chair
from vsink.evaluate.hallucination import save_results
from vsink.evaluate.pope import score_answers
from vsink.evaluate.stats import Bootstrap

COCO = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(1, 9)],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "car"}],
        "annotations": [{"image_id": i, "category_id": 1} for i in range(1, 9)]}


def pope_rows(answers):
    # 4 images, one split, 2 questions each (a yes and a no); answers[k] answers question k
    rows = []
    for k, text in enumerate(answers):
        rows.append({"question_id": k, "image": f"{k // 2}.jpg", "split": "random",
                     "label": "yes" if k % 2 == 0 else "no", "answer": text})
    return rows


def test_pope_intervals_resample_images_and_mcnemar_counts_by_hand(tmp_path):
    # labels alternate yes, no; right under none: questions 0, 2, 3, 6, 7; under var: all but 6
    base = pope_rows(["Yes", "Yes", "Yes", "No", "No", "Yes", "Yes", "No"])
    mit = pope_rows(["Yes", "No", "Yes", "No", "Yes", "No", "No", "No"])
    scores = {"none": score_answers(base), "var": score_answers(mit)}
    settings = Bootstrap(0.9, 300, 3)
    summary = json.loads(save_results(tmp_path, "pope", {}, scores, {}, settings)["json"].read_text())
    assert summary["statistics"] == {"method": "percentile bootstrap", "level": 0.9, "resamples": 300, "seed": 3,
                                     "unit": "image"}
    # McNemar: right only under none: question 6; right only under var: 1, 4, 5 → b = 1, c = 3,
    # p = 2 · (C(4,0) + C(4,1)) / 2^4 = 10/16
    assert summary["comparisons"]["var"]["mcnemar"]["all"] == {"n": 8, "b": 1, "c": 3, "p": 0.625}
    # right answers per image (of 2 questions): none 1, 2, 0, 2; var 2, 2, 2, 1; the interval is the
    # percentile bootstrap of Σ right / Σ questions over the 4 images, as scipy computes it
    right_none, right_var = np.array([1, 2, 0, 2]), np.array([2, 2, 2, 1])
    ref = scipy.stats.bootstrap((np.arange(4),), lambda i, axis=-1: right_none[i].sum(axis) / (2 * i.shape[axis]),
                                n_resamples=300, confidence_level=0.9, method="percentile",
                                rng=np.random.default_rng(3), vectorized=True)
    acc = summary["results"]["none"]["intervals"]["mean"]["accuracy"]
    assert acc["value"] == 5 / 8
    assert (acc["low"], acc["high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    paired = scipy.stats.bootstrap((np.arange(4),), lambda i, axis=-1: (right_var[i] - right_none[i]).sum(axis)
                                   / (2 * i.shape[axis]), n_resamples=300, confidence_level=0.9,
                                   method="percentile", rng=np.random.default_rng(3), vectorized=True)
    delta = summary["comparisons"]["var"]["mean"]["accuracy"]
    assert delta["value"] == pytest.approx(7 / 8 - 5 / 8)
    assert (delta["low"], delta["high"]) == pytest.approx((paired.confidence_interval.low,
                                                           paired.confidence_interval.high))
    assert "items" not in summary["results"]["none"]  # resampled, not stored
    md = (tmp_path / "results.md").read_text()
    assert "McNemar's exact test on 8 paired questions: 1 right only under none, 3 right only under var, p = 0.625" in md
    assert "90 % percentile bootstrap over images, 300 resamples, seed 3" in md


def test_pope_without_images_resamples_questions(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "image"} for r in pope_rows(["Yes", "No"] * 4)]
    summary = json.loads(save_results(tmp_path, "pope", {}, {"a": score_answers(rows)}, {})["json"].read_text())
    assert summary["statistics"]["unit"] == "question" and summary["statistics"]["resamples"] == 1000
    iv = summary["results"]["a"]["intervals"]["mean"]["accuracy"]
    assert (iv["value"], iv["low"], iv["high"]) == (1.0, 1.0, 1.0)  # every answer right: no spread


def chair_scores(n_images, base_caption, other_caption):
    gen = [{"image_id": i, "caption": base_caption(i)} for i in range(1, n_images + 1)]
    other = [{"image_id": i, "caption": other_caption(i)} for i in range(1, n_images + 1)]
    return {"none": score_chair(gen, COCO, vocabulary="vsink"), "var": score_chair(other, COCO, vocabulary="vsink")}


def delta_cells(html):
    return {m.group(2): m.group(1) for m in re.finditer(r"<span class='(pos|neg|muted)'>([^<]*)</span>", html)}


def test_a_delta_is_coloured_only_when_its_interval_excludes_zero(tmp_path):
    # every baseline caption hallucinates a cat, no mitigated one does: every resample's CHAIR_s
    # difference is −100 points, so the interval [−100, −100] excludes 0: a win (green)
    scores = chair_scores(8, lambda i: "A dog and a cat.", lambda i: "A dog.")
    html = save_results(tmp_path / "win", "chair", {}, scores, {})["html"].read_text()
    cells = delta_cells(html)
    assert cells["−100.00 [−100.00, −100.00]"] == "pos"
    # one image in eight changes (image 1 loses its cat): Δ CHAIR_s −12.5 points, but a resample
    # without image 1 (probability (7/8)^8 ≈ 0.34) has a difference of 0, so the 95 % interval
    # reaches 0: neutral
    scores = chair_scores(8, lambda i: "A dog and a cat." if i == 1 else "A dog.", lambda i: "A dog.")
    summary_path = save_results(tmp_path / "tie", "chair", {}, scores, {})
    cmp = json.loads(summary_path["json"].read_text())["comparisons"]["var"]["chair_s"]
    assert cmp["value"] == -0.125 and cmp["high"] == 0.0
    cells = delta_cells(summary_path["html"].read_text())
    shown = [text for text in cells if text.startswith("−12.50")]
    assert len(shown) == 1 and cells[shown[0]] == "muted"


def test_chair_several_captions_per_image_resample_images(tmp_path):
    # images 1-4 have two captions each; image 1's captions hallucinate a cat once, image 3's twice
    captions = {1: ["A dog and a cat.", "A dog."], 2: ["A dog.", "A dog on a car."], 3: ["A cat.", "A cat."],
                4: ["A dog.", "A dog."]}
    rows = [{"image_id": i, "caption": c} for i, caps in captions.items() for c in caps]
    scores = {"generated": score_chair(rows, COCO, vocabulary="vsink")}
    assert (scores["generated"]["n"], scores["generated"]["images"]) == (8, 4)
    # CHAIR_s = captions with a hallucination / captions = (1 + 1 + 2 + 0) / 8; per image
    # (bad captions, captions): (1,2) (1,2) (2,2) (0,2); resampling images keeps each pair together
    assert scores["generated"]["chair_s"] == 0.5
    summary = json.loads(save_results(tmp_path, "chair", {}, scores, {}, Bootstrap(0.95, 400, 9))["json"].read_text())
    bad = np.array([1, 1, 2, 0])
    ref = scipy.stats.bootstrap((np.arange(4),), lambda i, axis=-1: bad[i].sum(axis) / (2 * i.shape[axis]),
                                n_resamples=400, method="percentile", rng=np.random.default_rng(9), vectorized=True)
    iv = summary["results"]["generated"]["intervals"]["chair_s"]
    assert (iv["low"], iv["high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert summary["statistics"]["unit"] == "image"
