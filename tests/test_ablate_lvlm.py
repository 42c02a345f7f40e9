"""LVLM measures under ablation (vsink/ablate_lvlm.py, `vsink ablate --questions`): the planted
hallucination demo's answers moved by an ablation in its tower exactly as the construction says
(expected values worked out here from the demo's constants and each image's cells, never from
vsink's output), a non-planted neuron that changes no answer, a tower block the language model
does not read, the command, its report and its one-line refusals (LLaVA-NeXT's tiles:
tests/test_ablate_lvlm_tiles.py)."""

from __future__ import annotations

import json
import math
from typing import Callable

import pytest
from PIL import Image

from lvlm_models import random_image, tiny_lvlm
from vsink.ablate_lvlm import ablate_lvlm, image_tower_inputs
from vsink.backbones.hf_lvlm import load_lvlm
from vsink.cli import main
from vsink.data import demo_halluc as dh
from vsink.data import demo_llava as dl
from vsink.data.demo_halluc_data import write_dataset
from vsink.data.demo_images import demo_images
from vsink.evaluate.pope import build_questions
from vsink.errors import VsinkError
from vsink.io import write_jsonl


E = math.exp
IMAGES = 10  # image i has i % 5 sink cells: two images of each count 0-4
OWN, OTHER = 15 ** 0.5, -1 / 15 ** 0.5  # a one-hot of 16 channels after LayerNorm: its own channel, the others
RMS_EPS = 1e-6  # the language model's RMSNorm eps (Llama's default)
TEXT_TOKENS = (0, 40)  # the hand computation must give the same answer for any prompt length in between
M_ABSENT = 6 * E(-dh.MATCH_LOGIT) / 10  # at most 6 object cells at logit −7 against 10 or more tokens at 0


@pytest.fixture(scope="module")
def halluc(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("halluc"), num_images=IMAGES)
    questions = build_questions(root / "instances.json", splits=["random"])
    cells = json.loads((root / "cells.json").read_text())["images"]
    return load_lvlm("demo-halluc"), questions, root, cells


def reader_mass(normal: int, sink_logit_cells: int, replaced: int, scale: float, text_tokens: int) -> float:
    """The image reader's (language model layer 2, head 0) mass on image tokens, G: logit B_IMAGE on
    each of ``normal`` image tokens (value 1), SIGMA_VISUAL_SINK on each sink cell (value 0),
    B_IMAGE·scale on each of ``replaced`` image tokens shrunk by the final RMSNorm's eps (value
    ``scale``), SIGMA_TEXT_SINK on BOS, 0 on each text token."""
    image, shrunk = normal * E(dh.B_IMAGE), replaced * E(dh.B_IMAGE * scale)
    z = E(dh.SIGMA_TEXT_SINK) + sink_logit_cells * E(dh.SIGMA_VISUAL_SINK) + image + shrunk + text_tokens
    return (image + scale * shrunk) / z


def absent_is_denied(g_of_text: Callable[[int], float]) -> bool:
    """Whether an absent object is answered "no": the yes and no rows of lm_head differ by
    W_G·G* + W_M·M − W_G·G (W_M = 2 W_G), and an absent object's M (the matcher's mass on object
    cells, each at logit −MATCH_LOGIT against 0 for the 10 or more other tokens) is below
    :data:`M_ABSENT`: "no" if G > G* + 2·M_ABSENT, "yes" if G < G*. G falls with the prompt's
    length, so both ends of :data:`TEXT_TOKENS` must give the same answer, and neither may fall
    in between (a knife edge the construction does not decide)."""
    denied = [g_of_text(t) > dh.G_STAR + 2 * M_ABSENT for t in TEXT_TOKENS]
    kept = [g_of_text(t) < dh.G_STAR for t in TEXT_TOKENS]
    assert all(d or k for d, k in zip(denied, kept)) and len(set(denied)) == 1, "a knife edge"
    return denied[0]


def test_mean_kind_of_the_sink_cells_cures_the_hallucination_by_construction(halluc):
    """At the tower's block 0, whose output is what LLaVA reads (the second-to-last of 2 layers), the
    attention sinks are the sink cells (every query's key logit there is highest on the sink channel).
    mean-kind replaces them by the mean of every other patch token over the images: a LayerNorm
    one-hot averages to ``f·√15 − (1 − f)/√15`` on each type's channel (f: that type's share of
    the non-sink cells), which passes the projector's threshold (1.8) on the background channel
    only. So each sink cell becomes a (scaled) background image token: logit B_IMAGE to the image
    reader instead of SIGMA_VISUAL_SINK, and the reader's mass on the image rises over G* on every
    image. By hand, absent objects are denied on images with 0-1 sink cells before and on every
    image after; a present object stays "yes" (the matcher's logit on the replaced cells is 0, as
    it was on the sink cells, so M is unchanged)."""
    lvlm, questions, root, cells = halluc
    result = ablate_lvlm(lvlm, questions, root / "images", targets=["sinks", "neurons"], ablations=["mean-kind"],
                         layers=[0], neurons={0: [3, 7]}, batch_size=30, max_new_tokens=4, progress=False)
    names = result.images
    sinks = result.selections[0]
    for i, name in enumerate(names):  # the selection is the sink cells (token 0 is the class token)
        assert sinks.tokens[i].nonzero()[0].tolist() == [1 + j for j, c in enumerate(cells[name]) if c == dh.SINK]

    patches = [c for name in names for c in cells[name] if c != dh.SINK]
    mean = {kind: (patches.count(kind) * OWN + (len(patches) - patches.count(kind)) * OTHER) / len(patches)
            for kind in range(dh.SINK + 1)}
    assert mean[dh.BACKGROUND] > dh.TOWER_ON and all(mean[k] < dh.TOWER_ON for k in mean if k != dh.BACKGROUND)
    s = (mean[dh.BACKGROUND] - dh.TOWER_ON) / (OWN - dh.TOWER_ON)  # the projector's scale of the background token
    # four features of value s: after RMSNorm each is unit·(1 + HIDDEN·eps / (4 s²))^-1/2
    scale = (1 + dh.HIDDEN * RMS_EPS / (4 * s * s)) ** -0.5

    expected_clean, expected_ablated = [], []
    for q in questions:
        k = cells[q["image"]].count(dh.SINK)
        if q["label"] == "yes":  # present: the matcher's M >= 0.9 makes "yes", with or without the ablation
            expected_clean.append("yes")
            expected_ablated.append("yes")
            continue
        clean = absent_is_denied(lambda t: reader_mass(16 - k, k, 0, 1.0, t))
        ablated = absent_is_denied(lambda t: reader_mass(16 - k, 0, k, scale, t))
        expected_clean.append("no" if clean else "yes")
        expected_ablated.append("no" if ablated else "yes")
    flips = sum(a != b for a, b in zip(expected_clean, expected_ablated))
    # the numbers this gives: 6 of the 10 images have 2-4 sink cells, 3 absent questions each
    assert flips == 18 and expected_ablated == [q["label"] for q in questions]

    answers = result.answers
    row = {r.target: r for r in answers.rows}
    sink_row = row["sinks"]
    assert (sink_row.answers_changed, sink_row.yes_no_flips) == (flips, flips)
    assert {(c["clean"], c["ablated"]) for c in sink_row.changed} == {("yes", "no")}
    n = len(questions)
    accuracy = lambda answers_: sum(a == q["label"] for a, q in zip(answers_, questions)) / n  # noqa: E731
    yes_ratio = lambda answers_: sum(a == "yes" for a in answers_) / n  # noqa: E731
    assert answers.clean["mean"]["accuracy"] == pytest.approx(accuracy(expected_clean)) == pytest.approx(0.7)
    assert answers.clean["mean"]["yes_ratio"] == pytest.approx(yes_ratio(expected_clean)) == pytest.approx(0.8)
    assert sink_row.pope["mean"]["accuracy"] == pytest.approx(1.0)
    assert sink_row.pope["mean"]["yes_ratio"] == pytest.approx(0.5) and sink_row.pope["mean"]["f1"] == pytest.approx(1.0)
    test = sink_row.comparison["mcnemar"]["all"]
    assert (test["b"], test["c"]) == (0, flips) and test["p"] == pytest.approx(2 * 0.5 ** flips)
    assert sink_row.comparison["mean"]["accuracy"]["low"] > 0  # every resample of the images gains

    # a non-planted neuron: every MLP of the demo's tower writes nothing (fc2 is zero), so replacing
    # any of its hidden units changes neither the tower's output nor any answer (the bound is 0)
    neuron_row = row["neurons"]
    assert (neuron_row.answers_changed, neuron_row.yes_no_flips) == (0, 0)
    tower = {r.target: r for r in result.rows}["neurons"]
    assert tower.cos_patches == pytest.approx(1.0) and tower.cos_patches_min == pytest.approx(1.0)


def test_answer_measures_by_hand():
    """Four questions of one image (two present, two absent). Clean answers "yes", "no", "Yes.",
    "no"; ablated "yes", "yes", "yes", "No, not". The texts differ on questions 1, 2 and 3 (3
    answers changed); the official parser reads "Yes." and "yes" alike and "No, not" as "no", so
    only question 1 flips (no → yes). Clean: all right (accuracy 1, yes-ratio 0.5, F1 1); ablated:
    question 1 (label no) is now wrong — accuracy 3/4, yes-ratio 3/4, precision 2/3, recall 1,
    F1 0.8 — and McNemar has b = 1 (right only clean), c = 0, p = 1. One image: every bootstrap
    resample is that image, so each interval is its value."""
    from vsink.ablate import Selection
    from vsink.ablate_lvlm import measure_answers
    from vsink.evaluate.stats import Bootstrap

    items = [{"question_id": i, "image": "a.png", "object": o, "split": "random", "label": label, "text": "?"}
             for i, (o, label) in enumerate((("dog", "yes"), ("cat", "no"), ("car", "yes"), ("boat", "no")))]
    selection = Selection("sinks", 0, "block_output", None)
    got = measure_answers("m", items, ["yes", "no", "Yes.", "no"],
                          {"sinks@0:zero": (selection, "zero", ["yes", "yes", "yes", "No, not"])}, "official",
                          Bootstrap(0.95, 200, 0))
    row = got.rows[0]
    assert (row.answers_changed, row.yes_no_flips) == (3, 1)
    assert [c["question_id"] for c in row.changed] == [1, 2, 3]
    assert got.clean["mean"]["accuracy"] == 1.0 and got.clean["mean"]["yes_ratio"] == 0.5
    mean = row.pope["mean"]
    assert (mean["accuracy"], mean["yes_ratio"], mean["recall"]) == (0.75, 0.75, 1.0)
    assert mean["precision"] == pytest.approx(2 / 3) and mean["f1"] == pytest.approx(0.8)
    assert row.comparison["mcnemar"]["all"] == {"n": 4, "b": 1, "c": 0, "p": 1.0}
    assert row.comparison["mean"]["accuracy"] == {"value": -0.25, "low": -0.25, "high": -0.25}
    assert row.pope["intervals"]["mean"]["f1"] == pytest.approx({"value": 0.8, "low": 0.8, "high": 0.8})
    assert got.statistics["unit"] == "image"


def test_cli_on_demo_llava_writes_the_answers_and_a_block_the_lm_does_not_read_changes_none(tmp_path, capsys):
    """demo-llava's tower: the planted neurons (block 1, units 0-1) write the high-norm tokens of
    flat patches (the sky of china.jpg); zeroing them leaves none. LLaVA reads the tower's
    second-to-last block (2 of 4), so zeroing the high-norm tokens at block 3 changes the tower's
    last block but, by construction, no answer."""
    from vsink.registers import NeuronSpec, RegisterNeuron

    folder = tmp_path / "images"
    folder.mkdir()
    china = demo_images()[0].image
    china.resize((224, 224), Image.BICUBIC).save(folder / "china.png")
    questions = tmp_path / "q.jsonl"
    write_jsonl(questions, [{"question_id": i, "image": "china.png", "object": obj, "split": "random",
                             "label": label, "text": f"Is there a {obj} in the image?"}
                            for i, (obj, label) in enumerate((("person", "no"), ("car", "yes")))])
    spec = tmp_path / "neurons.json"
    NeuronSpec("demo-llava", [RegisterNeuron(dl.TOWER_PLANTED_BLOCK, n, 1.0) for n in dl.TOWER_NEURONS]).save(spec)
    out = tmp_path / "abl"
    assert main(["ablate", str(folder), "--model", "demo-llava", "--questions", str(questions), "--targets",
                 "neurons,high-norm", "--neurons", str(spec), "--layers", "1,3", "--ablations", "zero",
                 "--max-new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| clean |" in printed and "| high-norm | 3 | zero | 0/2 |" in printed
    data = json.loads((out / "results.json").read_text())
    rows = {(r["target"], r["layer"]): r for r in data["rows"]}
    assert rows[("neurons", 1)]["high_norm_before"] > 0 and rows[("neurons", 1)]["high_norm_after"] == 0
    assert rows[("high-norm", 3)]["cos_patches"] < 0.99  # the tower's last block did change
    answers = {r["name"]: r for r in data["answers"]["rows"]}
    assert list(answers) == ["neurons@1:zero", "high-norm@1:zero", "high-norm@3:zero"]
    assert answers["high-norm@3:zero"]["answers_changed"] == 0 and answers["high-norm@3:zero"]["changed"] == []
    assert data["answers"]["questions"] == 2 and data["settings"]["lvlm"]["max_new_tokens"] == 3
    assert set(data["answers"]["clean"]) >= {"mean", "splits", "intervals"}
    html = (out / "report.html").read_text()
    assert "LVLM answers under ablation" in html and "McNemar" in html and "Synthetic demo model" in html
    assert "## LVLM answers" in (out / "results.md").read_text()
    # the folder records which questions made it: the same count with one label changed is another run
    recorded = data["settings"]["lvlm"]
    assert recorded["questions"] == 2 and len(recorded["questions_sha256"]) == 64 and recorded["weights"]
    write_jsonl(questions, [{"question_id": i, "image": "china.png", "object": obj, "split": "random",
                             "label": label, "text": f"Is there a {obj} in the image?"}
                            for i, (obj, label) in enumerate((("person", "yes"), ("car", "yes")))])
    assert main(["ablate", str(folder), "--model", "demo-llava", "--questions", str(questions), "--layers", "3",
                 "--max-new-tokens", "1", "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "vsink-run.json").read_text())["determining"]["settings"]["lvlm"]
    assert again["questions"] == 2 and again["questions_sha256"] != recorded["questions_sha256"]
    assert again["weights"] == recorded["weights"]
    assert json.loads((out / "vsink-run.json").read_text())["command"] == "vsink ablate"


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "{question}"], "--prompt: LVLM ablations only"),
    (["--model", "demo-llava"], "--model demo-llava is an LVLM: give --questions"),
    (["--questions", "Q", "--model", "demo", "IMAGES"], "'demo' is a vision model; an LVLM is needed here"),
    (["--questions", "Q", "--model", "demo-halluc", "--dense"], "--dense: vision models only"),
    (["--questions", "Q", "--model", "demo-halluc", "IMAGES", "IMAGES"], "give the one folder"),
    (["--questions", "BAD", "--model", "demo-halluc", "IMAGES"], "label"),
    (["--questions", "Q", "--model", "demo-halluc", "IMAGES", "--layers", "5"], "layers [5] out of range"),
    (["--questions", "MISSING", "--model", "demo-halluc", "IMAGES"], "MISSING"),
], ids=["prompt-without-questions", "lvlm-without-questions", "vision-model", "dense", "two-folders",
        "bad-questions", "layer-out-of-range", "missing-questions"])
def test_cli_bad_lvlm_input_is_one_line(tmp_path, capsys, argv, message):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "0.png")
    good, bad = tmp_path / "q.jsonl", tmp_path / "bad.jsonl"
    row = {"question_id": 0, "image": "0.png", "object": "dog", "split": "random", "label": "no",
           "text": "Is there a dog in the image?"}
    write_jsonl(good, [row])
    write_jsonl(bad, [{k: v for k, v in row.items() if k != "label"}])
    paths = {"Q": str(good), "BAD": str(bad), "IMAGES": str(folder), "MISSING": str(tmp_path / "MISSING.jsonl")}
    argv = [paths.get(a, a) for a in argv]
    assert main(["ablate", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vsink: error: ") and message in err[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_packed_tower_is_refused_in_one_line(family):
    """The selections are the tower's tokens of [3, H, W] tower inputs (an image, or each of its
    tiles: tests/test_ablate_lvlm_tiles.py); a tower that reads every image's patches packed into
    one sequence (the Qwen-VL families: [patches, C·T·p·p], 48 patches of the tiny models, counted
    by image_grid_thw) is refused, naming the shape."""
    shape = "(48, 96) (patches packed by image_grid_thw)"
    lvlm = tiny_lvlm(family)
    with pytest.raises(VsinkError) as e:
        image_tower_inputs(lvlm, random_image(0), "x")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"tiny-{family}: ablating its vision tower needs")
    assert str(e.value).endswith(f"pixel_values of shape {shape}")
