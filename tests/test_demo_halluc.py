"""The planted-hallucination demo (``demo-halluc``): the README's offline sequence runs as written,
and its POPE and CHAIR numbers — baseline, VAR and PAI — are the ones computed by hand from the
construction (the planted attention logits, each image's cell counts, VAR's and PAI's published
rules), never from the model's own output."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from vsink.data import demo_halluc as dh

README = Path(__file__).resolve().parent.parent / "README.md"
MITIGATIONS = ("none", "var", "pai")
VAR_P, VAR_RHO, VAR_MIN_IMAGE = 0.6, 0.5, 0.2  # VAR's defaults (Kang et al.: p, rho, the image share floor)
PAI_ALPHA = 0.2  # PAI's default α: an image key's logit z becomes z + α|z| in the last row


def readme_sequence() -> list[list[str]]:
    """The commands of the README's demo-halluc block, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### A planted hallucination and its cure", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the README's sequence in a fresh folder; the folder."""
    from vsink.cli import main
    from vsink.data.demo_halluc_data import main as write_data

    folder = tmp_path_factory.mktemp("readme-halluc")
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        for argv in readme_sequence():
            if argv[:3] == ["python", "-m", "vsink.data.demo_halluc_data"]:
                assert write_data(argv[3:]) == 0
            else:
                assert argv[0] == "vsink", f"the README's demo sequence runs vsink commands only, not {argv[0]}"
                assert main(argv[1:]) == 0
    finally:
        os.chdir(cwd)
    return folder


def reader(cells: list[int], text_tokens: int, mitigation: str) -> tuple[float, float]:
    """By hand, the image reader's (layer 2, head 0) last-row attention: (G, mass per object cell).
    Logits: B_IMAGE on each of the 16 − k non-sink cells, SIGMA_VISUAL_SINK on each of the k sink
    cells, SIGMA_TEXT_SINK on BOS, 0 on each text token. PAI scales the image keys' positive logits
    by 1 + α; VAR, where the row is image-centric (image share >= 0.2, visual-sink share of it
    <= 0.5), moves 1 − p of the sinks' (BOS and sink cells') mass onto the non-sink cells."""
    k = cells.count(dh.SINK)
    n = len(cells) - k
    alpha = PAI_ALPHA if mitigation == "pai" else 0.0
    w_text_sink = math.exp(dh.SIGMA_TEXT_SINK)
    w_visual = k * math.exp(dh.SIGMA_VISUAL_SINK * (1 + alpha))
    w_image = n * math.exp(dh.B_IMAGE * (1 + alpha))
    z = w_text_sink + w_visual + w_image + text_tokens
    g = w_image / z
    if mitigation == "var" and (w_visual + w_image) / z >= VAR_MIN_IMAGE and w_visual / (w_visual + w_image) <= VAR_RHO:
        g += (1 - VAR_P) * (w_text_sink + w_visual) / z
    return g, g / n


def robust(fn, *args):
    """``fn(*args, text_tokens)`` for 0 and 40 text tokens, which must agree: the hand computation
    does not hinge on how the prompt tokenises."""
    low, high = fn(*args, 0), fn(*args, 40)
    assert low == high, f"the construction leaves {args} on a knife edge"
    return low


def pope_answer(cells: list[int], obj: str, mitigation: str, text_tokens: int) -> str:
    """The planted answer: a present object is "yes" (the matcher gives its cells >= 0.9 of its
    attention, and W_M · 0.9 > W_G · (1 − G_STAR)); an absent one is "no" iff G > G_STAR."""
    if dh.CLASSES.index(obj) in cells:
        return "yes"
    return "no" if reader(cells, text_tokens, mitigation)[0] > dh.G_STAR else "yes"


def caption(cells: list[int], mitigation: str, text_tokens: int) -> tuple[str, ...]:
    """The planted caption's two objects: each word scores PRIOR + TIE_BREAK · (8 − c) + W_E · mass
    on its cells; the second also COOCCUR_PRIOR for the first's partner and −SAID_PENALTY for the
    first itself. The rows are "a" after the 7-token prompt, then "a" three tokens later."""
    said: list[str] = []
    for step in range(2):
        per_cell = reader(cells, text_tokens + 3 * step, mitigation)[1]

        def score(c: int) -> float:
            name = dh.CLASSES[c]
            s = dh.PRIOR.get(name, 0.0) + dh.TIE_BREAK * (len(dh.CLASSES) - c) + dh.W_E * per_cell * cells.count(c)
            if said:
                s += dh.COOCCUR_PRIOR * (dh.COOCCUR[said[0]] == name) - dh.SAID_PENALTY * (name in said)
            return s

        said.append(dh.CLASSES[max(range(len(dh.CLASSES)), key=score)])
    return tuple(said)


def test_readme_sequence_pope_matches_the_construction(run):
    cells = json.loads((run / "halluc-data" / "cells.json").read_text())["images"]
    questions = [json.loads(line) for line in (run / "halluc-pope" / "questions.jsonl").read_text().splitlines()]
    results = json.loads((run / "halluc-pope" / "results.json").read_text())["results"]
    measured = {}
    for mitigation in MITIGATIONS:
        answers = [robust(pope_answer, cells[q["image"]], q["object"], mitigation) for q in questions]
        expected_accuracy = sum(a == q["label"] for a, q in zip(answers, questions)) / len(questions)
        expected_yes = sum(a == "yes" for a in answers) / len(questions)
        got = results[mitigation]["mean"]
        assert got["accuracy"] == pytest.approx(expected_accuracy) and got["yes_ratio"] == pytest.approx(expected_yes)
        measured[mitigation] = got
    # the range the construction gives: the baseline denies an absent object only on images with
    # 0 or 1 sink cells (k = i mod 5), so 3/5 of the absent questions are hallucinated: accuracy
    # 1 − 0.5 · 3/5 = 0.7, yes-ratio 0.5 + 0.5 · 3/5 = 0.8; VAR lifts every image over G_STAR,
    # PAI all but those with 4 sink cells
    assert measured["none"]["accuracy"] == pytest.approx(0.7) and measured["none"]["yes_ratio"] == pytest.approx(0.8)
    assert measured["var"]["accuracy"] == pytest.approx(1.0) and measured["var"]["yes_ratio"] == pytest.approx(0.5)
    assert measured["pai"]["accuracy"] == pytest.approx(0.9) and measured["pai"]["yes_ratio"] == pytest.approx(0.6)
    assert measured["none"]["recall"] == measured["var"]["recall"] == measured["pai"]["recall"] == 1.0
    # McNemar against the baseline: a mitigation fixes exactly the absent questions of the images
    # it lifts over G_STAR and breaks none (36 = 12 images with 2-4 sink cells × 3 for VAR, 24 for PAI)
    comparisons = json.loads((run / "halluc-pope" / "results.json").read_text())["comparisons"]
    baseline = [robust(pope_answer, cells[q["image"]], q["object"], "none") == q["label"] for q in questions]
    for mitigation, fixed in (("var", 36), ("pai", 24)):
        right = [robust(pope_answer, cells[q["image"]], q["object"], mitigation) == q["label"] for q in questions]
        test = comparisons[mitigation]["mcnemar"]["all"]
        assert (test["b"], test["c"]) == (sum(b and not r for b, r in zip(baseline, right)),
                                          sum(r and not b for b, r in zip(baseline, right))) == (0, fixed)
        assert test["p"] == pytest.approx(2 * 0.5 ** fixed)  # exact two-sided binomial with b = 0
        assert comparisons[mitigation]["mean"]["accuracy"]["low"] > 0  # the paired interval excludes 0


def test_readme_sequence_chair_matches_the_construction(run):
    cells = json.loads((run / "halluc-data" / "cells.json").read_text())["images"]
    results = json.loads((run / "halluc-chair" / "results.json").read_text())["results"]
    measured = {}
    for mitigation in MITIGATIONS:
        rows = [json.loads(line) for line in
                (run / "halluc-chair" / mitigation / "generated.jsonl").read_text().splitlines()]
        expected = {r["image"]: robust(caption, cells[r["image"]], mitigation) for r in rows}
        assert {r["image"]: tuple(r["caption"].split()[1::3]) for r in rows} == expected
        assert all(r["caption"] == "a {} and a {}".format(*expected[r["image"]]) for r in rows)
        hallucinated = [[o for o in expected[r["image"]] if dh.CLASSES.index(o) not in cells[r["image"]]] for r in rows]
        chair_s = sum(bool(h) for h in hallucinated) / len(rows)
        chair_i = sum(len(h) for h in hallucinated) / (2 * len(rows))
        got = results[mitigation]
        assert got["chair_s"] == pytest.approx(chair_s) and got["chair_i"] == pytest.approx(chair_i)
        measured[mitigation] = got
    # direction and range: the baseline names a one-cell object only against no prior, so about
    # half its captions hold a prior's object that is absent; VAR and PAI raise the per-cell mass
    # over the priors (VAR on every image, PAI on those with few sink cells)
    assert 0.4 <= measured["none"]["chair_s"] <= 0.6
    assert measured["var"]["chair_s"] < measured["pai"]["chair_s"] < measured["none"]["chair_s"]
    assert measured["var"]["chair_i"] < measured["pai"]["chair_i"] < measured["none"]["chair_i"]
    assert measured["var"]["recall"] > measured["none"]["recall"]


def test_the_readme_table_is_what_the_sequence_prints(run):
    """The README's table quotes the sequence's results (in %, 2 decimals)."""
    text = README.read_text(encoding="utf-8").split("### A planted hallucination and its cure", 1)[1]
    pope = json.loads((run / "halluc-pope" / "results.json").read_text())["results"]
    chair = json.loads((run / "halluc-chair" / "results.json").read_text())["results"]
    rows = {"POPE accuracy (%)": [pope[m]["intervals"]["mean"]["accuracy"] for m in MITIGATIONS],
            "POPE yes-ratio (%)": [pope[m]["intervals"]["mean"]["yes_ratio"] for m in MITIGATIONS],
            "CHAIR_s (%)": [chair[m]["intervals"]["chair_s"] for m in MITIGATIONS],
            "CHAIR_i (%)": [chair[m]["intervals"]["chair_i"] for m in MITIGATIONS]}
    for label, values in rows.items():
        cells = [f"{100 * v['value']:.2f} [{100 * v['low']:.2f}, {100 * v['high']:.2f}]" for v in values]
        assert f"| {label} | " + " | ".join(cells) + " |" in text


def test_the_results_pages_say_the_demo_is_synthetic_and_what_it_shows(run):
    for folder in ("halluc-pope", "halluc-chair"):
        page = (run / folder / "results.html").read_text()
        assert "Synthetic demo LVLM (demo-halluc)" in page and "say nothing" in page
        assert "register neurons" not in page  # demo-llava's banner is not this demo's


def test_each_image_token_carries_its_cell():
    """The tower reads each cell's texture: the projected image token of a cell is exactly the
    planted feature vector of its type (an object's evidence on its class's dimension)."""
    from vsink.data.demo_halluc_data import grids, render

    model, processor = dh.build_demo_halluc()
    layout = grids(5)
    pixels = processor.image_processor([render(c) for c in layout], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                         vision_feature_select_strategy="default")
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    feats = feats.reshape(len(layout), dh.GRID * dh.GRID, -1)
    for img, cells in zip(feats, layout):
        for token, kind in zip(img, cells):
            want = torch.zeros(dh.HIDDEN)
            for d, v in dh.image_token_features(kind).items():
                want[d] = v
            torch.testing.assert_close(token, want, atol=1e-4, rtol=1e-5)


def test_the_data_reads_as_coco_with_each_images_objects(tmp_path):
    from vsink.data.demo_halluc_data import grids, write_dataset
    from vsink.evaluate.coco import read_coco_objects
    from vsink.evaluate.pope import build_questions

    root = write_dataset(tmp_path, num_images=5)
    coco = read_coco_objects(root / "instances.json")
    layout = grids(5)
    assert {coco.files[i]: coco.objects[i] for i in coco.files} == {
        f"{i:04d}.png": {dh.CLASSES[c] for c in cells if c < len(dh.CLASSES)} for i, cells in enumerate(layout)}
    assert [cells.count(dh.SINK) for cells in layout] == [0, 1, 2, 3, 4]
    questions = build_questions(root / "instances.json", splits=["random"])
    assert len(questions) == 5 * 6 and sum(q["label"] == "yes" for q in questions) == 15


def test_the_data_writer_refuses_an_unwritable_folder_in_one_line(tmp_path, capsys):
    from vsink.data.demo_halluc_data import main as write_data

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert write_data([str(blocker / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vsink: cannot write the demo data to {blocker / 'data'}") and err.count("\n") == 1


def test_the_docs_single_image_example():
    """docs/hallucination.md's one image: image 3 has 3 sink cells (G = 0.313 < G_STAR at baseline,
    0.584 with VAR) and no person; its captions follow from :func:`caption`."""
    from vsink.backbones.hf_lvlm import load_lvlm
    from vsink.data.demo_halluc_data import grids, render
    from vsink.lvlm import generate

    cells = grids()[3]
    assert cells.count(dh.SINK) == 3 and dh.CLASSES.index("person") not in cells
    lvlm = load_lvlm("demo-halluc")
    image = render(cells)
    inputs = lvlm.prepare([image, image], ["Is there a person in the image?", "What is in the image?"])
    texts = {m: generate(lvlm, inputs, mitigation=m, max_new_tokens=8).texts for m in ("none", "var")}
    assert texts == {"none": ["yes", "a car and a person"], "var": ["no", "a car and a bicycle"]}
    assert caption(cells, "none", 6) == ("car", "person") and caption(cells, "var", 6) == ("car", "bicycle")


def test_the_comparison_set_on_the_demo():
    """VAF, aimed at the reader's layer (2; its default window scaled to 3 layers is layer 1),
    multiplies the reader's image logits by 1.15 and BOS's by 0.95: G = 0.67, 0.58, 0.50, 0.43 for
    0-3 sink cells, over G_STAR, so it denies every absent object there (4 sink cells: G ≈ 0.37,
    on the threshold, not asserted). VCD and M3ID at their defaults change no answer: the demo is
    sure of every token, so VCD's plausibility cutoff (p >= 0.1·max p) leaves only the greedy token
    and M3ID, which acts only below a top probability of 0.95, edits nothing (and says so)."""
    from vsink.backbones.hf_lvlm import load_lvlm
    from vsink.data.demo_halluc_data import grids, render
    from vsink.lvlm import generate
    from vsink.lvlm.generate import MitigationWarning

    lvlm = load_lvlm("demo-halluc")
    layout = grids(5)
    for k, cells in enumerate(layout):
        present = [dh.CLASSES[c] for c in sorted(set(cells)) if c < len(dh.CLASSES)]
        absent = next(c for c in dh.CLASSES if dh.CLASSES.index(c) not in cells)
        image = render(cells)
        prompts = [f"Is there a {o} in the image?\nAnswer the question using a single word or phrase."
                   for o in (present[0], absent)]
        inputs = lvlm.prepare([image, image], prompts)
        answers = {m: generate(lvlm, inputs, mitigation=m, max_new_tokens=4, **kw).texts for m, kw in (
            ("none", {}), ("vaf", {"settings": {"start_layer": 2, "end_layer": 3}}), ("vcd", {}))}
        with pytest.warns(MitigationWarning, match="m3id edited nothing"):
            answers["m3id"] = generate(lvlm, inputs, mitigation="m3id", max_new_tokens=4).texts
        assert answers["none"] == ["yes", "no" if k <= 1 else "yes"]
        assert answers["vcd"] == answers["m3id"] == answers["none"]
        if k <= 3:
            assert answers["vaf"] == ["yes", "no"]
