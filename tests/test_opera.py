"""OPERA (vsink/mitigate/opera.py on vsink/lvlm/beam.py) on tiny LLaVA, LLaVA-NeXT, Qwen2-VL and
Qwen2.5-VL models built offline; golden cases derived by hand from the released code
(shikiw/OPERA @ 61426ef, transformers-4.29.2/src/transformers/generation/utils.py,
``opera_beam_search``)."""

import math
import re
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vsink.backbones.hf_decoder import decoder_of
from vsink.data.demo_lvlm import build_tiny_gemma3, build_tiny_llava, build_tiny_qwen2_vl
from vsink.errors import VsinkError
from vsink.lvlm import LVLM, generate, load_lvlm
from vsink.lvlm.beam import BeamContext, Beams, LastRowAttention, placeholder_ids
from vsink.mitigate import make_mitigations
from vsink.mitigate.base import Run
from vsink.mitigate.opera import (FLOOR, Retrospection, candidate_scores, column_scores, extend_products, over_trust,
                                  stored)

from lvlm_models import FIRST_FAMILIES, PROMPTS, marked, random_image, tiny_lvlm

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")

#: penalty 0, every token a candidate, no rollback: plain beam search
PLAIN = {"beams": 3, "candidates": None, "penalty": 0, "threshold": 10_000}
@pytest.fixture(scope="module", params=[*sorted(FIRST_FAMILIES), "gemma3"])  # Gemma 3: sliding-window layers
def lvlm(request):
    return tiny_lvlm(request.param)


def _hf_beams(lvlm, image, prompt, n, tokens, use_cache=True):
    inputs = lvlm.prepare([image], [prompt])
    with torch.no_grad():
        out = lvlm.model.generate(**inputs, max_new_tokens=tokens, num_beams=n, do_sample=False, use_cache=use_cache)
    return out[0, inputs["input_ids"].shape[1]:]


def _finishing_eos(lvlm, images, prompts, use_cache=True):
    """An EOS on which transformers' own beam search (3 beams, 9 tokens) ends a row before the
    length limit, so that hypotheses finish and the finished-beam bookkeeping (scores over the
    generated length, early stopping) is exercised: the first such among the tokens of its final
    hypotheses (the last row's third first; the models' weights differ between transformers 4.57
    and 5, so which token does it differs)."""
    config = lvlm.model.generation_config
    saved = config.eos_token_id
    emitted = []  # per row, its 3 final hypotheses' tokens, the best first
    for image, prompt in zip(images, prompts):
        inputs = lvlm.prepare([image], [prompt])
        with torch.no_grad():
            out = lvlm.model.generate(**inputs, max_new_tokens=9, num_beams=3, num_return_sequences=3, do_sample=False,
                                      use_cache=use_cache)
        emitted.append(out[:, inputs["input_ids"].shape[1]:].flatten().tolist())
    order = emitted[-1][2:] + emitted[-1][:2] + [t for row in emitted[:-1] for t in row]
    try:
        for token in dict.fromkeys(order):
            config.eos_token_id = token
            if any(len(_hf_beams(lvlm, image, prompt, 3, 9, use_cache)) < 9 for image, prompt in zip(images, prompts)):
                return token
    finally:
        config.eos_token_id = saved
    raise AssertionError("no token transformers' beam search emits ends a row early")


@pytest.mark.parametrize("length_penalty", [1.0, -0.5])
def test_penalty_zero_with_every_token_a_candidate_is_hf_beam_search(lvlm, length_penalty):
    images = [random_image(), random_image(1)]
    prompts = marked(lvlm, PROMPTS)
    config = lvlm.model.generation_config
    saved = (config.eos_token_id, config.length_penalty)
    config.length_penalty = length_penalty
    config.eos_token_id = _finishing_eos(lvlm, images, prompts)
    try:
        ours = generate(lvlm, lvlm.prepare(images, prompts), mitigation="opera", settings=PLAIN, max_new_tokens=9)
        fill = ours.new_tokens.new_tensor(config.pad_token_id)
        finished = 0
        for b in range(2):  # the batch is left-padded; each row equals HF beam search on it alone
            ref = _hf_beams(lvlm, images[b], prompts[b], 3, 9)
            assert torch.equal(ours.new_tokens[b, :len(ref)], ref), b
            assert bool((ours.new_tokens[b, len(ref):] == fill).all())
            finished += len(ref) < 9
    finally:
        config.eos_token_id, config.length_penalty = saved
    assert finished  # at least one row ended on EOS before the length limit


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_penalty_zero_without_the_cache_is_hf_beam_search_without_it(family):
    # transformers' own beam search runs without the cache too (every step re-runs the whole
    # sequences); OPERA's look-ahead of every token then runs one full forward per candidate rank.
    # EOS: one on which HF's beam search without the cache ends before the length limit
    lvlm = tiny_lvlm(family)
    image, prompt = random_image(1), marked(lvlm, PROMPTS)[0]
    lvlm.model.generation_config.eos_token_id = _finishing_eos(lvlm, [image], [prompt], use_cache=False)
    ref = _hf_beams(lvlm, image, prompt, 3, 9, use_cache=False)
    assert len(ref) < 9
    ours = generate(lvlm, lvlm.prepare([image], [prompt]), mitigation="opera", settings=PLAIN, max_new_tokens=9,
                    use_cache=False)
    assert torch.equal(ours.new_tokens[0], ref)


def test_default_candidates_renormalise_unlike_beam_search():
    # Released code: the step's logits are set to -999 except the top `num_attn_candidates`, which
    # keep their (penalised) logits; log_softmax then runs over that vector, so the candidates'
    # probabilities are renormalised among themselves. Two beams, two candidates, vocabulary 4:
    # beam 0 has probabilities .30 .28 .22 .20, beam 1 .55 .35 .05 .05.
    # Beam search (full softmax): (1,0) log .55 = -.598, (1,1) log .35 = -1.050, (0,0) log .30 = -1.204
    #   -> the two running beams continue beam 1 with tokens 0 and 1.
    # Renormalised over 2: beam 0: .30/.58 -> -.659, .28/.58 -> -.728; beam 1: .55/.90 -> -.492,
    #   .35/.90 -> -.944 -> ranking (1,0) -.492, (0,0) -.659, (0,1) -.728: beams continue (1,0), (0,0).
    probs = torch.tensor([[.30, .28, .22, .20], [.55, .35, .05, .05]])
    logits = probs.log() + 3.0  # any offset per row: the released code works on raw logits
    cand_logits, cand = logits.topk(2, dim=-1)
    scores = candidate_scores(logits, cand, cand_logits, torch.zeros(2, 2), 1.0)
    assert scores[0, 2] == FLOOR and scores[1, 3] == FLOOR
    lp = torch.log_softmax(scores, -1)
    assert lp[0, 0].item() == pytest.approx(math.log(.30 / .58), abs=1e-5)
    assert lp[1, 1].item() == pytest.approx(math.log(.35 / .90), abs=1e-5)

    def chosen(log_probs):
        beams = _beams(2, vocab=4)
        source, tokens, _ = beams.advance(log_probs, 1, lambda ids, scores: torch.zeros(len(ids), dtype=torch.bool))
        return list(zip(source.tolist(), tokens.tolist()))

    assert chosen(torch.log_softmax(logits, -1)) == [(1, 0), (1, 1)]
    assert chosen(lp) == [(1, 0), (0, 0)]


def _beams(n, vocab, prompt=1):
    config = SimpleNamespace(_eos_token_tensor=torch.tensor([vocab + 5]), _pad_token_tensor=None, max_length=8,
                             length_penalty=1.0, early_stopping=False)
    beams = Beams.start(torch.zeros(n, prompt, dtype=torch.long), n, config)
    beams.running_scores[:] = 0.0  # both beams live, equal scores
    return beams


def test_default_candidates_differ_from_beam_search_on_a_model():
    model, processor = build_tiny_qwen2_vl()
    lvlm = LVLM(model, processor, "tiny-qwen2_vl")
    image, prompt = random_image(1), marked(lvlm, PROMPTS)[1]  # an image and prompt where both transformers differ
    inputs = lvlm.prepare([image], [prompt])
    ref = _hf_beams(lvlm, image, prompt, 5, 12)
    zero = generate(lvlm, inputs, mitigation="opera", settings={"penalty": 0, "threshold": 10_000},
                    max_new_tokens=12).new_tokens[0]
    assert not torch.equal(zero[:len(ref)], ref)


def test_over_trust_penalty_by_hand():
    # 11 response rows so far (positions 0..10), every attention 0.02 (x scale 50 = 1) except
    # column 3, 0.04 (x 50 = 2) in rows 3..10: column products 1, except column 3: 2^8 = 256.
    rows = torch.full((11, 11), 0.02).tril()
    rows[3:, 3] = 0.04
    products = torch.ones(1, 0)
    for i in range(11):
        products = extend_products(products, rows[None, i, :i + 1], 50.0)
    assert torch.allclose(products[0], torch.tensor([1.0] * 3 + [256.0] + [1.0] * 7))
    # candidate A attends column 3 with 0.04, candidate B with 0.02, each 0.02 elsewhere (12 columns):
    # φ_3(A) = 1e-7 · 256 · 2 = 5.12e-5, φ_3(B) = 1e-7 · 256 = 2.56e-5, every other φ_j = 1e-7.
    cand = torch.full((1, 2, 12), 0.02)
    cand[0, 0, 3] = 0.04
    phi = column_scores(products, cand, 50.0)
    assert phi[0, 0, 3].item() == pytest.approx(5.12e-5) and phi[0, 1, 3].item() == pytest.approx(2.56e-5)
    penalty, column = over_trust(phi, torch.zeros(1, 2), 12)
    assert column.tolist() == [[3, 3]]
    # logits: A 1 + 2e-5, B 1 -> A - 5.12e-5 = 1 - 3.12e-5 < B - 2.56e-5: B is chosen
    logits = torch.tensor([[1 + 2e-5, 1.0, -5.0]])
    scores = candidate_scores(logits, torch.tensor([[0, 1]]), logits[:, :2], penalty, 1.0)
    assert int(scores.argmax()) == 1
    assert int(candidate_scores(logits, torch.tensor([[0, 1]]), logits[:, :2], penalty, 0.0).argmax()) == 0
    # up to the 10th response token the penalty is minus the attention on the image (a bonus)
    early, _ = over_trust(phi[..., :10], torch.tensor([[0.3, 0.5]]), 10)
    assert torch.allclose(early, torch.tensor([[-0.3, -0.5]]))


def test_official_protocol_stores_phi_in_float16():
    # the released code writes φ into a float16 tensor: 1e-7 · 50^12 = 2.44e13 > 65504 -> inf, and
    # 1e-7 · 50 · 0.06 = 3e-7 becomes the nearest float16 (a subnormal there: steps of 6e-8)
    products = torch.tensor([[50.0 ** 11, 1.0]])  # column 0 after 11 rows of a = 1, column 1 after one of 0.02
    phi = column_scores(products, torch.tensor([[[1.0, 0.06, 1.0]]]), 50.0)
    assert phi[0, 0, 0].item() == pytest.approx(1e-7 * 50.0 ** 12, rel=1e-6)
    official = stored(phi, "official")
    assert math.isinf(official[0, 0, 0].item())
    assert official[0, 0, 1].item() == float(torch.tensor(3e-7).half()) != pytest.approx(3e-7, rel=1e-6)
    assert torch.equal(stored(phi, "paper"), phi)


def test_retrospection_rule_by_hand():
    retro = Retrospection(threshold=15, window=512, candidates=5)
    planted = torch.full((3, 5), 12)  # 3 beams, 5 candidates, all on column 12
    for step in range(15):
        assert retro.record(planted) == 12
        assert retro.target(12, step) is None  # won 1..15 times: not more than 15
    retro.record(planted)
    assert retro.target(12, 15) == 13  # the 16th win rolls back to the position after the column
    for _ in range(4):
        assert retro.target(12, 15) == 13
    assert retro.target(12, 15) == 12  # 5 (= candidates) rollbacks at 13: one position earlier
    low = Retrospection(threshold=0, window=512, candidates=5)
    low.record(torch.full((3, 5), 9))
    assert low.target(9, 0) is None  # columns below 10 never roll back
    mixed = Retrospection(threshold=0, window=512, candidates=5)
    mixed.record(torch.tensor([[12] * 5, [12] * 5, [11] * 5]))
    assert mixed.target(12, 0) is None  # one beam's column differs: no rollback


def _plant_column(monkeypatch):
    """Every captured last-layer row gets +100 on response column 11."""
    original = LastRowAttention._observe

    def planted(self, probs, q_start, logits):
        original(self, probs, q_start, logits)
        column = self.decoder.context.length + 11
        if self.rows is not None and self.rows.shape[1] > column:
            self.rows[:, column] += 100.0

    monkeypatch.setattr(LastRowAttention, "_observe", planted)


def _last_row(result, lvlm):
    return [row for row in result.report[0]["layers"] if row["layer"] == lvlm.num_layers - 1][0]


def test_planted_attention_column_triggers_rollbacks(monkeypatch):
    # Every captured last-layer row gets +100 on response column 11: from step 11 on every
    # candidate's argmax column is 11, so with threshold 3 the 4th win (step 14) rolls back to
    # position 12; the retained history (steps 0..12) holds 2 wins, so the rule fires again two steps
    # later, 5 (= candidates) times at position 12, then 5 times at position 11, then never: 10.
    _plant_column(monkeypatch)
    model, processor = build_tiny_llava()
    model.generation_config.eos_token_id = None  # no hypothesis ends before the length limit
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    result = generate(lvlm, inputs, mitigation="opera", settings={"threshold": 3}, max_new_tokens=20)
    assert _last_row(result, lvlm)["rollbacks"] == 10
    assert result.new_tokens.shape[1] == 20



def test_report_counts_zero_rollbacks():
    # 2 tokens cannot reach a rollback (none before response position 10): the last-layer row
    # still says so (rollbacks 0, as docs/lvlm.md promises the row counts them), and every beam's
    # 5 candidates were scored at each of the 2 steps (3 beams · 5 · 2 = 30)
    lvlm = tiny_lvlm("llava")
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    result = generate(lvlm, inputs, mitigation="opera", settings={"beams": 3}, max_new_tokens=2)
    assert _last_row(result, lvlm) == {"layer": lvlm.num_layers - 1, "candidates_scored": 30, "rollbacks": 0}

@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_without_the_cache_equals_the_cached_search(monkeypatch, family):
    # Default settings (5 beams, 5 candidates) with the planted column of the test above: 10
    # rollbacks. Without the cache every step re-runs the whole sequences (look-ahead: one forward
    # per candidate rank; rollback: the kept sequences) on the kwargs transformers' generate keeps
    # (M-RoPE positions on Qwen2-VL; Gemma 3's sliding-window layers take their window from the
    # model's own mask over the full sequence): the same tokens, rollbacks and candidates scored.
    # The random models' top candidates include their image placeholder or vision start, which a
    # full forward runs as its token embedding as a cached step does (counted here: the path runs
    # on all three under transformers 5's weights, on Qwen2-VL's vision start under 4.57's).
    import vsink.lvlm.beam as beam

    _plant_column(monkeypatch)
    placed = []
    embedded_as = beam._embedded_as
    monkeypatch.setattr(beam, "_embedded_as", lambda *args: placed.append(1) or embedded_as(*args))
    lvlm = tiny_lvlm(family)
    lvlm.model.generation_config.eos_token_id = None
    inputs = lvlm.prepare([random_image()], [marked(lvlm, PROMPTS)[0]])
    runs = {use_cache: generate(lvlm, inputs, mitigation="opera", settings={"threshold": 3}, max_new_tokens=20,
                                use_cache=use_cache) for use_cache in (True, False)}
    assert torch.equal(runs[True].new_tokens, runs[False].new_tokens)
    assert _last_row(runs[True], lvlm) == _last_row(runs[False], lvlm)
    assert _last_row(runs[False], lvlm)["rollbacks"] == 10
    assert placed or (hasattr(lvlm.model, "_get_initial_cache_position") and family != "qwen2_vl")


def test_without_the_cache_a_padded_batch_equals_its_rows_alone():
    # Qwen2-VL (M-RoPE): each prompt of a left-padded batch runs on its own beams without its
    # padding, cached or not; default settings past the 10th token (the φ penalty acts)
    lvlm = tiny_lvlm("qwen2_vl")
    images, prompts = [random_image(), random_image(1)], marked(lvlm, PROMPTS)
    batch = generate(lvlm, lvlm.prepare(images, prompts), mitigation="opera", max_new_tokens=12, use_cache=False)
    cached = generate(lvlm, lvlm.prepare(images, prompts), mitigation="opera", max_new_tokens=12)
    assert torch.equal(batch.new_tokens, cached.new_tokens)
    for b in range(2):
        alone = generate(lvlm, lvlm.prepare([images[b]], [prompts[b]]), mitigation="opera", max_new_tokens=12,
                         use_cache=False)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :alone.new_tokens.shape[1]])


def test_opera_composes_with_pai_and_refuses_the_rest():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    image = random_image()
    inputs = lvlm.prepare([image], [PROMPTS[1]])
    ours = generate(lvlm, inputs, mitigation="opera+pai", settings={"opera": PLAIN, "pai": {"alpha": 3.0}},
                    max_new_tokens=8)
    assert ours.report[1]["edited"]  # PAI edited the look-ahead forwards
    # HF's own beam search with vsink's PAI installed on the same prompt: the same tokens
    decoder = decoder_of(lvlm)
    context = BeamContext(lvlm, inputs["input_ids"])
    run = Run(lvlm=lvlm, decoder=decoder, context=context, input_ids=inputs["input_ids"],
              attention_mask=inputs["attention_mask"])
    (pai,) = make_mitigations("pai", {"alpha": 3.0})
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(decoder.bound(context))
        stack.enter_context(pai.installed(run))
        ref = lvlm.model.generate(**inputs, max_new_tokens=8, num_beams=3, do_sample=False,
                                  return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        plain = lvlm.model.generate(**inputs, max_new_tokens=8, num_beams=3, do_sample=False,
                                    return_dict_in_generate=True, output_scores=True)
    assert torch.equal(ours.new_tokens[0], ref.sequences[0, inputs["input_ids"].shape[1]:])
    # α = 3 changes the beam scores: the edit is not a no-op here (float noise is ~1e-6)
    assert abs(float(ref.sequences_scores[0]) - float(plain.sequences_scores[0])) > 1e-4
    # without the cache PAI edits every recomputed row again, as in the cached rows' keys, and
    # counts each row once (the rows a pass computes for the first time): same tokens, same report
    composed = {"opera": {"beams": 3}, "pai": {"alpha": 3.0}}
    runs = [generate(lvlm, inputs, mitigation="opera+pai", settings=composed, max_new_tokens=8, use_cache=use_cache)
            for use_cache in (True, False)]
    assert torch.equal(runs[0].new_tokens, runs[1].new_tokens) and runs[0].report == runs[1].report
    for spec, settings, words in [("opera+var", {"var.sink_dims": [3]}, "composes with pai only; var is refused"),
                                  ("opera+fastv", {}, "fastv is refused"),
                                  ("opera+pai", {"pai.gamma": 1.1}, "opera and pai each set the next-token rule"),
                                  ("opera+vcd", {}, "opera and vcd each set the next-token rule")]:
        with pytest.raises(VsinkError, match=words):
            generate(lvlm, inputs, mitigation=spec, settings=settings, max_new_tokens=2)
    with pytest.raises(VsinkError, match="sampling \\(temperature, top_p\\) is refused"):
        generate(lvlm, inputs, mitigation="opera", max_new_tokens=2, sampling={"temperature": 0.7, "top_p": 0.9})
    with pytest.raises(VsinkError, match="drop capture_attention"):
        generate(lvlm, inputs, mitigation="opera", max_new_tokens=2, capture_attention=True)
    with pytest.raises(VsinkError, match="opera setting 'beams'"):
        generate(lvlm, inputs, mitigation="opera", settings={"beams": 0}, max_new_tokens=2)


CLASSES = ["bird", "car", "cat", "cup", "dog", "horse", "person", "tree"]
OBJECTS = {1: ["person", "dog"], 2: ["cat", "car"], 3: ["dog", "car", "person"]}


def test_opera_through_vsink_generate_and_eval(tmp_path, capsys):
    import json

    from vsink.cli import main

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    (tmp_path / "images").mkdir()
    for i in OBJECTS:
        random_image(i).save(tmp_path / "images" / f"img{i}.jpg")
    coco = {"categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
            "images": [{"id": i, "file_name": f"img{i}.jpg"} for i in OBJECTS],
            "annotations": [{"image_id": i, "category_id": CLASSES.index(c) + 1, "bbox": [0, 0, 1, 1]}
                            for i, objs in OBJECTS.items() for c in objs]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    image = tmp_path / "images" / "img1.jpg"
    assert main(["generate", str(image), "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0],
                 "--mitigation", "opera", "--set", "beams=2", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    lvlm = load_lvlm(str(tmp_path / "m"))  # as the command loads it (its saved tokenizer decodes)
    expected = generate(lvlm, lvlm.prepare([Image.open(image).convert("RGB")], [PROMPTS[0]]), mitigation="opera",
                        settings={"beams": 2}, max_new_tokens=4).texts[0]
    assert expected in out and "mitigation opera" in err
    assert main(["generate", str(image), "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0],
                 "--mitigation", "opera", "--set", "beams=2", "--max-new-tokens", "4", "--no-cache"]) == 0
    assert expected.strip() and expected in capsys.readouterr().out  # the same text without the KV cache
    assert main(["generate", str(image), "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0],
                 "--mitigation", "opera", "--export-attention", str(tmp_path / "attention")]) == 2
    assert "drop capture_attention (vsink generate: --export-attention)" in capsys.readouterr().err  # the flag named
    assert main(["eval", "pope", str(tmp_path / "images"), "--model", str(tmp_path / "m"),
                 "--annotations", str(tmp_path / "instances.json"), "--num-images", "2", "--splits", "random",
                 "--mitigation", "none,opera", "--set", "opera.beams=2", "--max-new-tokens", "2", "--no-progress",
                 "--out", str(tmp_path / "pope")]) == 0
    results = json.loads((tmp_path / "pope" / "results.json").read_text())
    assert set(results["results"]) == {"none", "opera"} and results["protocol"]["settings"]["opera"] == {"beams": 2}
    answers = [json.loads(line) for line in (tmp_path / "pope" / "opera" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == results["results"]["opera"]["mean"]["n"] > 0
    assert main(["eval", "chair", str(tmp_path / "images"), "--model", str(tmp_path / "m"),
                 "--annotations", str(tmp_path / "instances.json"), "--num-images", "2", "--mitigation", "opera",
                 "--set", "opera.candidates=3", "--max-new-tokens", "3", "--no-progress",
                 "--out", str(tmp_path / "chair")]) == 0
    chair = json.loads((tmp_path / "chair" / "results.json").read_text())
    assert chair["protocol"]["resolved_settings"]["opera"]["candidates"] == 3
    capsys.readouterr()
    assert main(["generate", str(image), "--model", str(tmp_path / "m"), "--prompt", "x",
                 "--mitigation", "opera+fastv"]) == 2
    err = capsys.readouterr().err
    assert "opera composes with pai only; fastv is refused" in err and "Traceback" not in err


@pytest.mark.parametrize("family, shared", [("qwen2_vl", True), ("gemma3", False)])
def test_stepper_paths_keep_the_cache_right(family, shared):
    # the look-ahead rows kept as the next step, and the prefix kept with its candidate dropped then
    # run again (OPERA's path when a new beam's token was no candidate), give the next logits of
    # one full forward of the same sequences without a cache; Qwen2-VL's cache keeps every key, so
    # its candidates run as siblings on the shared cache, Gemma 3's has sliding-window layers, so
    # its candidates run on repeated rows
    import copy

    from vsink.lvlm.beam import Stepper

    lvlm = tiny_lvlm(family)
    inputs = lvlm.prepare([random_image()], [marked(lvlm, PROMPTS)[1]])
    seen = {}

    def loop(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, **kwargs):
        stepper = Stepper(model, kwargs)
        logits = stepper.prefill(input_ids)
        # 3 beams x 2 candidates, text tokens: the reference's full forward would take an image
        # placeholder for an image slot, and 4.x's M-RoPE index a vision start for an image's
        text = logits.index_fill(-1, placeholder_ids(model, logits.device), float("-inf"))
        cand = text.topk(2, dim=-1).indices
        seen["shared"] = stepper.shares_cache()
        ahead = stepper.lookahead(input_ids, cand)
        rows = torch.tensor([1, 4, 4])  # beam 0's 2nd candidate, beam 2's 1st, twice
        ids = torch.cat([input_ids[rows // 2], cand.view(-1)[rows, None]], dim=1)
        saved = copy.deepcopy({"kwargs": stepper.kwargs, "ahead": stepper.ahead})
        stepper.keep(rows)
        seen["kept"] = stepper.step(torch.cat([ids, ids[:, -1:]], dim=1))
        stepper.kwargs, stepper.ahead = saved["kwargs"], saved["ahead"]
        stepper.keep_prefix(rows)
        seen["again"] = stepper.step(ids)
        seen["ahead"] = ahead[rows]
        seen["then"] = stepper.step(torch.cat([ids, ids[:, -1:]], dim=1))
        seen["ids"] = torch.cat([ids, ids[:, -1:]], dim=1)
        return input_ids

    with torch.no_grad():
        lvlm.model.generate(**inputs, num_beams=3, max_new_tokens=4, do_sample=False, custom_generate=loop)
        full = {key: value.repeat(3, *[1] * (value.dim() - 1)) for key, value in inputs.items()}
        for key in ("mm_token_type_ids", "token_type_ids"):  # generated tokens are text
            if key in full:
                full[key] = torch.nn.functional.pad(full[key], (0, 2))
        full.update(input_ids=seen["ids"], attention_mask=torch.ones_like(seen["ids"]))
        full = lvlm.model(**full).logits[:, -1]
    assert seen["shared"] == shared
    assert torch.allclose(seen["again"], seen["ahead"], atol=1e-5)
    assert torch.allclose(seen["kept"], full, atol=1e-4) and torch.allclose(seen["then"], full, atol=1e-4)


def _windowed_gemma3():
    """Gemma 3 with an 8-token window and 3 layers, the last a sliding-window one (as in the
    released 4B and 27B models): the 12-token prompt is past the window already."""
    model, processor = build_tiny_gemma3(layers=3, sliding_window=8)
    assert model.config.text_config.layer_types[-1] == "sliding_attention"
    model.generation_config.eos_token_id = None
    return LVLM(model, processor, "tiny-gemma3")


def test_sliding_window_last_layer_gives_the_models_attention_past_its_window():
    # The last layer's cache keeps its last 7 keys; each candidate's row (candidates on repeated
    # cache rows) covers every position, the dropped ones 0: eager attention of the full sequence,
    # maximum over heads, whose window gives keys 8 or more positions back nothing
    from vsink.lvlm.beam import Stepper

    lvlm = _windowed_gemma3()
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    decoder = decoder_of(lvlm)
    context = BeamContext(lvlm, inputs["input_ids"])
    seen = {}

    def loop(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus=False, **kwargs):
        stepper = Stepper(model, kwargs, context)
        cand = stepper.prefill(input_ids).topk(2, dim=-1).indices  # 3 beams x 2 candidates
        assert not stepper.shares_cache()
        stepper.lookahead(input_ids, cand)
        seen.update(rows=attention.rows.clone(), ids=torch.cat([input_ids.repeat_interleave(2, 0),
                                                                 cand.reshape(-1, 1)], dim=1))
        return input_ids

    with torch.no_grad(), decoder.bound(context), LastRowAttention(decoder, 2) as attention:
        lvlm.model.generate(**inputs, num_beams=3, max_new_tokens=2, do_sample=False, custom_generate=loop)
    lvlm.model.set_attn_implementation("eager")
    full = {key: value.repeat(6, *[1] * (value.dim() - 1)) for key, value in inputs.items()}
    full.update(input_ids=seen["ids"], attention_mask=torch.ones_like(seen["ids"]),
                token_type_ids=torch.nn.functional.pad(full["token_type_ids"], (0, 1)))
    with torch.no_grad():
        ref = lvlm.model(**full, output_attentions=True).attentions[-1][:, :, -1, :].amax(1)
    assert seen["rows"].shape == ref.shape == (6, 13)
    assert torch.allclose(seen["rows"], ref, atol=1e-5)
    assert bool((ref[:, :-8] == 0).all()) and bool((ref[:, -8:] > 0).all())


@pytest.mark.parametrize("candidates", [5, 1])
def test_sliding_window_last_layer_with_and_without_the_cache(monkeypatch, candidates):
    # OPERA past the window of its sliding-window last layer, with the planted column: the cached
    # search (rows over every position; with 1 candidate, four of five new beams drop theirs and
    # restore each layer's states from before the look-ahead, which a sliding layer past its
    # window cannot crop back to) gives the tokens and report of full forwards without the cache
    _plant_column(monkeypatch)
    lvlm = _windowed_gemma3()
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    runs = [generate(lvlm, inputs, mitigation="opera", settings={"threshold": 3, "candidates": candidates},
                     max_new_tokens=17, use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0].new_tokens, runs[1].new_tokens)
    assert _last_row(runs[0], lvlm) == _last_row(runs[1], lvlm) and _last_row(runs[0], lvlm)["rollbacks"] > 0


def test_fewer_candidates_than_beams_runs_the_prefix_path():
    # the README's fast setting (1 candidate, 5 beams): at the first step only beam 0 is live, so
    # four of the five new beams continue with tokens that were no candidate
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    batch = generate(lvlm, inputs, mitigation="opera", settings={"candidates": 1, "threshold": 25}, max_new_tokens=6)
    for b in range(2):
        alone = generate(lvlm, lvlm.prepare([[random_image(), random_image(1)][b]], [PROMPTS[b]]), mitigation="opera",
                         settings={"candidates": 1, "threshold": 25}, max_new_tokens=6)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :alone.new_tokens.shape[1]])


def test_sibling_lookahead_scores_as_repeated_rows(monkeypatch):
    # the candidates run as siblings on the shared cache (each seeing the cache and itself) or each
    # on its own repeated row of the cache: the same attention rows, so the same φ and image
    # attention at every step (past the 10th token the φ penalty acts) and the same tokens
    import vsink.mitigate.opera as opera
    from vsink.lvlm.beam import Stepper

    scored = []

    def recorded(phi, image, length):
        scored.append((phi.clone(), image.clone()))
        return over_trust(phi, image, length)

    monkeypatch.setattr(opera, "over_trust", recorded)
    lvlm = tiny_lvlm("llava")
    lvlm.model.generation_config.eos_token_id = None
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    runs = {}
    for shared in (True, False):
        monkeypatch.setattr(Stepper, "shares_cache", lambda self, shared=shared: shared)
        scored.clear()
        tokens = generate(lvlm, inputs, mitigation="opera", settings={"threshold": 10_000}, max_new_tokens=13).new_tokens
        runs[shared] = (tokens, list(scored))
    assert torch.equal(runs[True][0], runs[False][0])
    assert len(runs[True][1]) == len(runs[False][1]) == 13
    for (phi, image), (phi_rep, image_rep) in zip(runs[True][1], runs[False][1]):
        assert torch.allclose(phi, phi_rep, rtol=1e-4, atol=0) and torch.allclose(image, image_rep, atol=1e-6)


def test_unmarked_qwen_images_are_refused_in_one_line_under_transformers_4():
    # transformers 4.x's beam search splits a row's images by counting the vision-start token
    # before each (Qwen-VL's _expand_inputs_for_generation): on a prompt without it its own
    # generate(num_beams=3) fails deep in torch.split, and OPERA, which runs inside that generate,
    # refuses before any forward; transformers 5 counts images otherwise and runs it
    lvlm = tiny_lvlm("qwen2_vl")
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)  # the image token in front, unmarked
    if not hasattr(lvlm.model, "_get_initial_cache_position"):  # transformers 5
        assert generate(lvlm, inputs, mitigation="opera", max_new_tokens=2).new_tokens.shape == (2, 2)
        return
    one = lvlm.prepare([random_image()], [PROMPTS[0]])
    with pytest.raises(RuntimeError, match="split_with_sizes"), torch.no_grad():
        lvlm.model.generate(**one, max_new_tokens=2, num_beams=3, do_sample=False)
    forwards = []
    lvlm.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    why = ("opera under transformers 4.x needs <|vision_start|> before each image of a Qwen-VL prompt (its beam "
           "search counts a row's images by it, as the model's chat template writes them): prompt 0 has 1 image(s), "
           "0 marked")
    with pytest.raises(VsinkError, match=f"^{re.escape(why)}$"):
        generate(lvlm, inputs, mitigation="opera", max_new_tokens=2)
    assert not forwards


def test_progress_bar_counts_tokens_not_processor_calls():
    # OPERA calls the logits processors for every beam step and again after each rollback, so a
    # bar advanced once per call could run past its total; the bar shows the longest output
    # reached (prompt of 5 tokens here; choosing token k means k - 1 tokens are already there)
    import io

    from tqdm.auto import tqdm

    from vsink.lvlm.generate import TokenProgress

    scores = torch.zeros(2, 3)
    with tqdm(total=4, file=io.StringIO()) as bar:  # a disabled bar would not count
        progress = TokenProgress(bar, prompt_length=5)
        lengths = (5, 5, 6, 6, 7, 6, 6, 7, 8, 9, 10)  # repeated calls, a rollback from 7 to 6, overrun
        shown = (1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4)  # by hand: longest reached, at most the total 4
        for length, expected in zip(lengths, shown):
            assert progress(torch.zeros(2, length, dtype=torch.long), scores) is scores
            assert bar.n == expected, (length, bar.n)
