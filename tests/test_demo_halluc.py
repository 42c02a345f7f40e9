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
MITIGATIONS = ("none", "var", "pai", "vaf", "vcd", "m3id", "damro")
E = math.exp
VAR_P, VAR_RHO, VAR_MIN_IMAGE = 0.6, 0.5, 0.2  # VAR's defaults (Kang et al.: p, rho, the image share floor)
PAI_ALPHA = 0.2  # PAI's default α: an image key's logit z becomes z + α|z| in the last row
VAF_ENHANCE, VAF_SUPPRESS = 1.15, 0.95  # VAF's defaults: image keys' and system keys' (BOS) pre-softmax factors
BETA = 0.1  # VCD's and DAMRO's plausibility cutoff: tokens with l < log β + max l are dropped
#: the contrastive decoders: their weakened branch and α (VCD's official POPE script: α = 1;
#: DAMRO's released POPE script: α = 0.5, k = 4 outlier patches)
CONTRAST = {"vcd": ("noised", 1.0), "damro": ("outliers", 0.5)}
DAMRO_K = 4
#: M3ID: the README sets λ = 0.4 (at vsink's default 0.02 the first token's weight (1 − γ)/γ is
#: 0.02, and a POPE answer is the first token); the rule applies below a top probability of 0.95
M3ID_LAM, M3ID_DEFAULT_LAM, M3ID_THRESHOLD = 0.4, 0.02, 0.95
WEAK = {"vcd": "noised", "damro": "outliers", "m3id": "text"}


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
    """By hand, the image reader's (layer 2, head 0) last-row attention: (G, mass per non-sink
    cell). Logits: B_IMAGE on each of the 16 − k non-sink cells, SIGMA_VISUAL_SINK on each of the
    k sink cells, SIGMA_TEXT_SINK on BOS, 0 on each text token. PAI scales the image keys' positive
    logits by 1 + α; VAF (its default window, 9-14 of 32 layers, is layer 2 of 6) multiplies the
    image keys' logits by 1.15 and BOS's (the system prompt) by 0.95; VAR, where the row is
    image-centric (image share >= 0.2, visual-sink share of it <= 0.5), moves 1 − p of the sinks'
    (BOS and sink cells') mass onto the non-sink cells. The other methods leave the main pass alone."""
    k = cells.count(dh.SINK)
    n = len(cells) - k
    bos, sink, image = dh.SIGMA_TEXT_SINK, dh.SIGMA_VISUAL_SINK, dh.B_IMAGE
    if mitigation == "pai":
        sink, image = sink * (1 + PAI_ALPHA), image * (1 + PAI_ALPHA)
    if mitigation == "vaf":
        bos, sink, image = bos * VAF_SUPPRESS, sink * VAF_ENHANCE, image * VAF_ENHANCE
    w_text_sink, w_visual, w_image = E(bos), k * E(sink), n * E(image)
    z = w_text_sink + w_visual + w_image + text_tokens
    g = w_image / z
    if mitigation == "var" and (w_visual + w_image) / z >= VAR_MIN_IMAGE and w_visual / (w_visual + w_image) <= VAR_RHO:
        g += (1 - VAR_P) * (w_text_sink + w_visual) / z
    return g, g / n


def weak_reader(cells: list[int], text_tokens: int, branch: str) -> float:
    """By hand, G in a contrastive method's weakened branch. ``text`` (M3ID: no image tokens) and
    ``noised`` (VCD: the tower's noise detectors silence every cell, so every image token is zero):
    nothing reaches an image feature, G = 0. ``outliers`` (DAMRO): the image reduced to the top-4
    patches of the tower's class-token attention, the sink cells first, then background cells (no
    object): 4 − k background tokens at logit B_IMAGE, k sink cells at SIGMA_VISUAL_SINK."""
    if branch in ("text", "noised"):
        return 0.0
    sinks = min(cells.count(dh.SINK), DAMRO_K)
    background = DAMRO_K - sinks
    assert cells.count(dh.BACKGROUND) >= background
    z = E(dh.SIGMA_TEXT_SINK) + sinks * E(dh.SIGMA_VISUAL_SINK) + background * E(dh.B_IMAGE) + text_tokens
    return background * E(dh.B_IMAGE) / z


def matcher(cells: list[int], text_tokens: int, asked, said: float, and_said: float) -> float:
    """By hand, M (layer 2, head 1): its query is R of the asked object (normalised in a residual
    of four unit features plus R and D), logit 2·MATCH_LOGIT·R·sqrt(5 / (4 + R² + D²)) − MATCH_LOGIT
    on the asked object's cells, −MATCH_LOGIT on other objects' cells, 0 elsewhere."""
    objects = [c for c in cells if c < len(dh.CLASSES)]
    rest = 1 + text_tokens + len(cells) - len(objects)
    on = 2 * dh.MATCH_LOGIT * said * (5 / (4 + said ** 2 + and_said ** 2)) ** 0.5 - dh.MATCH_LOGIT
    asked_cells = cells.count(asked) if asked is not None else 0
    w = asked_cells * E(on) + (len(objects) - asked_cells) * E(-dh.MATCH_LOGIT)
    return w / (w + rest)


def norm(square: float) -> float:
    """The final RMSNorm's factor on a residual with this squared length (eps 1e-6)."""
    return 1 / (square / dh.HIDDEN + 1e-6) ** 0.5


def pick(main: dict, weak: dict, mitigation: str, t: int, lam: float = M3ID_LAM) -> str:
    """The token a decoding rule picks from the planted tokens' final logits in the main and the
    weakened branch (every other token's logit is 0 in both and far below the planted ones).
    VCD/DAMRO: ``(1 + α)·l − α·l_weak`` over the tokens with ``l >= log β + max l``. M3ID (the
    t-th token): while the top probability is below 0.95, ``l_c + w(l_c − l_u)`` on
    log-probabilities with w = (1 − γ_t)/γ_t = e^{λt} − 1 — on logits, ``(1 + w)·l − w·l_u`` up
    to a constant shared by every token, so a token outside the planted ones scores 0."""
    top = max(main.values())
    if mitigation in CONTRAST:
        alpha = CONTRAST[mitigation][1]
        plausible = [w for w in main if main[w] >= math.log(BETA) + top]
        return max(plausible, key=lambda w: (1 + alpha) * main[w] - alpha * weak[w])
    if mitigation == "m3id" and 1 / sum(E(v - top) for v in main.values()) < M3ID_THRESHOLD:
        weight = E(lam * t) - 1
        scores = {w: (1 + weight) * main[w] - weight * weak[w] for w in main}
        best = max(scores, key=scores.get)
        assert scores[best] > 0, "a token outside the planted ones would win: the construction does not say"
        return best
    return max(main, key=main.get)


def robust(fn, *args):
    """``fn(*args, text_tokens)`` for 0 and 40 text tokens, which must agree: the hand computation
    does not hinge on how the prompt tokenises."""
    low, high = fn(*args, 0), fn(*args, 40)
    assert low == high, f"the construction leaves {args} on a knife edge"
    return low


def _edit(mitigation: str) -> str:
    return mitigation if mitigation in ("var", "pai", "vaf") else "none"


def pope_answer(cells: list[int], obj: str, mitigation: str, text_tokens: int, lam: float = M3ID_LAM) -> str:
    """The planted answer: the yes and no rows of lm_head share their large offset and differ by
    ``W_G·G* + W_M·M − W_G·G`` (after the final norm's factor); a present object's M >= 0.9 makes
    "yes" (W_M · 0.9 > W_G · (1 − G*)); an absent one is "no" iff G > G* — unless a contrastive
    rule (:func:`pick`) weighs the weakened branch in, whose G and M are those of
    :func:`weak_reader` and 0."""
    asked = dh.CLASSES.index(obj)
    g, per_cell = reader(cells, text_tokens, _edit(mitigation))
    evidence = [cells.count(c) * per_cell for c in range(len(dh.CLASSES))]
    m = matcher(cells, text_tokens, asked, 1.0, 0.0)

    def rows(g_: float, m_: float) -> dict:
        return {"yes": dh.W_G * dh.G_STAR + dh.W_M * m_, "no": dh.W_G * g_}

    # the residual: four unit features of "." or "?", R = 1 (the object asked), G, EV_c, M
    main = {w: norm(5 + g * g + sum(e * e for e in evidence) + m * m) * v for w, v in rows(g, m).items()}
    if mitigation not in WEAK:
        return max(main, key=main.get)
    g_weak = weak_reader(cells, text_tokens, WEAK[mitigation])
    weak = {w: norm(5 + g_weak * g_weak) * v for w, v in rows(g_weak, 0.0).items()}
    return pick(main, weak, mitigation, 1, lam)


def caption(cells: list[int], mitigation: str, text_tokens: int) -> tuple[str, ...]:
    """The planted caption's two objects: each word scores 50 (after "a") + PRIOR + TIE_BREAK·(8 − c)
    + W_E · mass on its cells; the second also COOCCUR_PRIOR for the first's partner and
    −SAID_PENALTY for the first itself; the final norm's factor from the residual ("a"'s four unit
    features, R and D of the second row, G, EV_c, M). The rows are "a" after the 7-token prompt
    (the 2nd generated token), then "a" three tokens later (the 5th). Contrastive rules: :func:`pick`
    with the weakened branch's rows (no evidence, its own norm)."""
    said: list[str] = []
    for step in range(2):
        tokens = text_tokens + 3 * step
        g, per_cell = reader(cells, tokens, _edit(mitigation))
        evidence = [cells.count(c) * per_cell for c in range(len(dh.CLASSES))]
        r = 1.0 if said else 0.0
        m = matcher(cells, tokens, dh.CLASSES.index(said[0]) if said else None, r, r)

        def score(c: int, ev: float) -> float:
            name = dh.CLASSES[c]
            s = 50 + dh.PRIOR.get(name, 0.0) + dh.TIE_BREAK * (len(dh.CLASSES) - c) + dh.W_E * ev
            if said:
                s += dh.COOCCUR_PRIOR * (dh.COOCCUR[said[0]] == name) - dh.SAID_PENALTY * (name in said)
            return s

        factor = norm(4 + 2 * r * r + g * g + sum(e * e for e in evidence) + m * m)
        main = {name: factor * score(c, evidence[c]) for c, name in enumerate(dh.CLASSES)}
        if mitigation in WEAK:
            g_weak = weak_reader(cells, tokens, WEAK[mitigation])
            weak = {name: norm(4 + 2 * r * r + g_weak * g_weak) * score(c, 0.0) for c, name in enumerate(dh.CLASSES)}
            said.append(pick(main, weak, mitigation, 2 + 3 * step))
        else:
            said.append(max(main, key=main.get))
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
    # 0 or 1 sink cells (k = i mod 5; G = 0.439, 0.393 > G* = 0.37 > 0.351, 0.313, 0.277), so 3/5
    # of the absent questions are hallucinated: accuracy 1 − 0.5 · 3/5 = 0.7, yes-ratio
    # 0.5 + 0.5 · 3/5 = 0.8. VAR lifts every image over G*; PAI and VAF all but those with 4 sink
    # cells (G = 0.348 and 0.367). The contrastive rules: a hallucinated "yes" leads "no" by
    # W_G·(G* − G) <= 0.095 before the final norm's factor (~14), 1.3 < log 10, so "no" stays
    # plausible, and with the weak branch's G' the rule says "no" iff (1 + α)(G − G*) > α(G' − G*):
    # VCD (α = 1, G' = 0) iff G > G*/2, M3ID (w = e^0.4 − 1 = 0.49, G' = 0) iff G > G*/1.49, DAMRO
    # (α = 0.5, G' <= 0.072 from the background among the 4 outliers) iff G > 0.25 at most: every image
    expected = {"none": (0.7, 0.8), "var": (1.0, 0.5), "pai": (0.9, 0.6), "vaf": (0.9, 0.6), "vcd": (1.0, 0.5),
                "m3id": (1.0, 0.5), "damro": (1.0, 0.5)}
    for mitigation, (accuracy, yes_ratio) in expected.items():
        got = measured[mitigation]
        assert (got["accuracy"], got["yes_ratio"]) == (pytest.approx(accuracy), pytest.approx(yes_ratio)), mitigation
        assert got["recall"] == 1.0, mitigation
    # McNemar against the baseline: a mitigation fixes exactly the absent questions of the images
    # it lifts over its threshold and breaks none (36 = 12 images with 2-4 sink cells × 3; 24 without
    # the 4 with 4 sink cells)
    comparisons = json.loads((run / "halluc-pope" / "results.json").read_text())["comparisons"]
    baseline = [robust(pope_answer, cells[q["image"]], q["object"], "none") == q["label"] for q in questions]
    for mitigation, fixed in (("var", 36), ("pai", 24), ("vaf", 24), ("vcd", 36), ("m3id", 36), ("damro", 36)):
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
    # half its captions hold a prior's object that is absent. VAR, PAI and VAF raise the per-cell
    # mass over the priors (VAR on every image, PAI and VAF on those with few sink cells); the
    # contrastive rules subtract a branch in which the priors are the same and the evidence is
    # gone, so a one-cell object's evidence counts (1 + α) times (M3ID: 1 + w, w = e^{0.4·t} − 1)
    # against the priors: at most one caption keeps a hallucinated object
    assert 0.4 <= measured["none"]["chair_s"] <= 0.6
    assert measured["var"]["chair_s"] < measured["pai"]["chair_s"] < measured["none"]["chair_s"]
    assert measured["var"]["chair_i"] < measured["pai"]["chair_i"] < measured["none"]["chair_i"]
    for mitigation in ("vaf", "vcd", "m3id", "damro"):
        assert measured[mitigation]["chair_s"] <= 0.2 and measured[mitigation]["chair_i"] <= 0.1, mitigation
    for mitigation in MITIGATIONS[1:]:
        assert measured[mitigation]["recall"] > measured["none"]["recall"], mitigation


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


def test_vcds_noise_silences_every_image_token():
    """The tower's noise detectors (free channels reading Walsh patterns no cell carries, gain
    1000): on VCD's noised image (diffusion step 500 of its defaults, noise std 0.505 per
    preprocessed pixel) each responds ~N(0, (1000 · 0.505 · √768)²) ≈ ±14,000, against a cell's own
    filter's ~475, so after the tower's LayerNorm no cell type's channel reaches the projector's
    threshold (1.8) and every image token is zero; on the clean image they respond 0."""
    from vsink.data.demo_halluc_data import grids, render
    from vsink.mitigate.vcd import add_diffusion_noise

    model, processor = dh.build_demo_halluc()
    layout = grids(5)
    pixels = processor.image_processor([render(c) for c in layout], return_tensors="pt")["pixel_values"]
    noised = torch.cat([add_diffusion_noise(p[None], 500, torch.Generator().manual_seed(42)) for p in pixels])

    def tokens(values):
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=values, vision_feature_layer=dh.FEATURE_LAYER,
                                             vision_feature_select_strategy="default")
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(len(layout), dh.GRID * dh.GRID, -1)

    assert torch.count_nonzero(tokens(noised)) == 0
    assert torch.count_nonzero(tokens(pixels).abs().sum(-1)) == len(layout) * dh.GRID * dh.GRID


def test_m3id_at_its_default_lambda_changes_no_answer():
    """At vsink's default λ = 0.02 the first token's weight is e^0.02 − 1 = 0.02: M3ID leaves
    every POPE answer as the baseline gives it (one image per number of sink cells), as
    :func:`pope_answer` computes with that λ; the README sets λ = 0.4."""
    import warnings

    from vsink.backbones.hf_lvlm import load_lvlm
    from vsink.data.demo_halluc_data import grids, render
    from vsink.lvlm import generate

    lvlm = load_lvlm("demo-halluc")
    for k, cells in enumerate(grids(5)):
        present = next(dh.CLASSES[c] for c in cells if c < len(dh.CLASSES))
        absent = next(c for c in dh.CLASSES if dh.CLASSES.index(c) not in cells)
        image = render(cells)
        prompts = [f"Is there a {o} in the image?\nAnswer the question using a single word or phrase."
                   for o in (present, absent)]
        inputs = lvlm.prepare([image, image], prompts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = generate(lvlm, inputs, mitigation="m3id", max_new_tokens=4).texts
        expected = [robust(lambda *a: pope_answer(*a, lam=M3ID_DEFAULT_LAM), cells, o, "m3id") for o in (present, absent)]
        assert got == expected == [robust(pope_answer, cells, o, "none") for o in (present, absent)]
        assert expected[1] == ("no" if k <= 1 else "yes")


def test_damros_outliers_are_the_sink_cells_then_background():
    """The class token's query (CLS_QUERY·√16 on one dimension) meets keys 2 on the sink channel
    and 1 on the background channel of each cell's LayerNorm one-hot (own value √15, others
    −1/√15): keys 2√15 − 1/√15 = 7.49 on a sink cell, √15 − 2/√15 = 3.36 on background, −3/√15 =
    −0.77 on an object, and DAMRO's logits q·k/√16 are CLS_QUERY (4) times those; the class
    token's own key is 0. So its top-4 patches are an image's k sink cells, then 4 − k background
    cells."""
    from vsink.backbones.hf_lvlm import load_lvlm
    from vsink.data.demo_halluc_data import grids, render
    from vsink.mitigate.damro import outlier_patches

    lvlm = load_lvlm("demo-halluc")
    layout = grids(5)

    class R:  # what outlier_patches reads of a run
        pass
    R.lvlm, R.inputs = lvlm, lvlm.prepare([render(c) for c in layout], ["x"] * len(layout))
    attention, top = outlier_patches(R, DAMRO_K)
    root = 15 ** 0.5
    key = {dh.SINK: 2 * root - 1 / root, dh.BACKGROUND: root - 2 / root}
    for cells, weights, picked in zip(layout, attention, top):
        logits = 4 * torch.tensor([key.get(kind, -3 / root) for kind in cells], dtype=torch.float64)
        want = torch.softmax(torch.cat([torch.zeros(1, dtype=torch.float64), logits]), 0)[1:]
        torch.testing.assert_close(weights.double(), want, atol=1e-5, rtol=1e-4)
        k = cells.count(dh.SINK)
        assert [cells[i] for i in picked.tolist()] == [dh.SINK] * k + [dh.BACKGROUND] * (DAMRO_K - k)
