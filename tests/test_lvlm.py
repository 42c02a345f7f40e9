"""LVLM adapter and mitigations on tiny LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
PaliGemma (2), Gemma 3, InternVL, Idefics3 and SmolVLM (image splitting on) models built offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.data.demo_lvlm import build_tiny_llava, build_tiny_qwen2_vl
from vsink.errors import VsinkError
from contextlib import ExitStack, contextmanager

from vsink.backbones.hf_decoder import decoder_of
from vsink.backbones.hf_lvlm import UnavailableFamily
from vsink.lvlm import LVLM, PAISettings, VARSettings, generate
from vsink.lvlm.context import DecodeContext
from vsink.lvlm.sinks import calibrate, detect_sinks
from vsink.mitigate import PAI, VAR, Mitigation, Run, make_mitigations, redistribute

from lvlm_models import BUILDERS, PROMPTS, random_image, tiny_lvlm

# mitigations that change nothing on these tiny random models warn; the warning has its own test
pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")

SETTINGS = {"none": {}, "var": {"sink_dims": [3, 7], "tau": 2.5}, "pai": {"alpha": 0.5},
            "pai_cfg": {"alpha": 0.5, "gamma": 1.1}, "fastv": {"k": 2, "ratio": 0.5}}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def lvlm(request):
    try:
        return tiny_lvlm(request.param)
    except UnavailableFamily as e:  # a family this transformers lacks or that needs a newer one: reported
        pytest.skip(str(e))


@contextmanager
def _eager(lvlm):
    """The model on eager attention, then back on the implementations it had (SDPA; eager for
    models that have no SDPA, such as Gemma 2)."""
    before = {"text_config": lvlm.text_config._attn_implementation,
              "vision_config": lvlm.model.config.vision_config._attn_implementation}
    lvlm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lvlm.model.set_attn_implementation(before)


def _mit(name):
    return ("pai" if name == "pai_cfg" else name), SETTINGS[name]


def test_decoder_layers_and_spans(lvlm):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    spans = lvlm.image_spans(inputs["input_ids"])
    pad = (inputs["attention_mask"] == 0).sum(1).tolist()
    assert pad[0] > 0 and pad[1] == 0  # the shorter prompt is left-padded
    ids = inputs["input_ids"]
    for b in range(2):
        positions = spans.positions(b)
        assert positions and all(int(ids[b, p]) == lvlm.image_token_id for p in positions)
        assert int((ids[b] == lvlm.image_token_id).sum()) == len(positions)
    assert spans.positions(0)[0] - spans.positions(1)[0] == pad[0]
    assert len(lvlm.layers) == lvlm.text_config.num_hidden_layers


def test_none_reproduces_hf_greedy_generate(lvlm):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    with torch.no_grad():
        ref = lvlm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(generate(lvlm, inputs, max_new_tokens=6).sequences, ref)


def test_captured_attention_equals_hf_eager(lvlm):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    with _eager(lvlm):
        with torch.no_grad():
            ref = lvlm.model(**inputs, output_attentions=True)
    with _Bound(lvlm, inputs) as bound:  # vsink's capture on the decoder's sites, no mitigation
        attentions, ours = bound.forward(**inputs)
    real = inputs["attention_mask"].bool()
    for a, b in zip(attentions, ref.attentions):
        keep = real[:, None, :, None] & real[:, None, None, :]  # padded rows and columns are not compared
        assert torch.allclose(torch.where(keep, a, 0), torch.where(keep, b, 0), atol=1e-5)
    last = real.long().cumsum(1).argmax(1)
    rows = torch.arange(2)
    assert torch.allclose(ours.logits[rows, last], ref.logits[rows, last], atol=1e-5)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_batch_equals_single_and_cache_is_transparent(lvlm, name):
    mitigation, settings = _mit(name)
    images = [random_image(), random_image(1)]
    inputs = lvlm.prepare(images, PROMPTS)
    cached, uncached = _Scores(), _Scores()
    batch = generate(lvlm, inputs, mitigation=[*make_mitigations(mitigation, settings), cached], max_new_tokens=5)
    no_cache = generate(lvlm, inputs, mitigation=[*make_mitigations(mitigation, settings), uncached], max_new_tokens=5,
                        use_cache=False)
    # without the cache every pass recomputes the earlier tokens: each must get the edits it got when
    # the cache computed it (PAI: the prompt's last row and every generated row, not only the pass's
    # last), and the report counts each row once
    assert torch.equal(batch.new_tokens, no_cache.new_tokens), name
    for a, b in zip(cached.steps, uncached.steps, strict=True):  # scores too, not only their argmax
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (name, float((a - b).nan_to_num().abs().max()))
    _same_report(batch.report, no_cache.report)
    for b in range(2):
        alone = generate(lvlm, lvlm.prepare([images[b]], [PROMPTS[b]]), mitigation=mitigation, settings=settings,
                         max_new_tokens=5)
        n = alone.new_tokens.shape[1]  # shorter when the row alone stops at EOS (the batch then pads it)
        assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :n]), (name, b)


class _Scores(Mitigation):
    """Records each step's next-token scores (after every other mitigation's rule); edits nothing."""

    name = "scores"
    settings_class = dict

    def __init__(self):
        super().__init__({})
        self.steps = []

    def _install(self, run, handles):
        pass

    def settings_dict(self):
        return {}

    def logits_processors(self, run):
        def record(input_ids, scores):
            self.steps.append(scores.clone())
            return scores

        return [record]


def _same_report(a, b):
    """Reports equal: counts exactly, attention mass (a float sum in another order) to 1e-4."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same_report(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_report(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    else:
        assert a == b


#: the branch, readout and column-scaling mitigations, composed with the row edits (PAI in VCD's noised
#: branch, VAR beside M3ID's text branch, FastV under VAF), strong enough to move the scores (M3ID: a λ
#: whose weight e^{λt} − 1 stays small, as a large one magnifies float rounding of the logits)
CACHE_ONLY = {"vcd+pai": {"vcd.alpha": 3.0, "vcd.beta": 0.0, "vcd.noise_step": 900, "pai.alpha": 0.5},
              "m3id+var": {"m3id.lam": 0.3, "m3id.threshold": 1.0, "var.sink_dims": [3, 7], "var.tau": 2.5},
              "damro": {"alpha": 3.0, "beta": 0.0, "k": 2}, "dola": {},
              "vaf+fastv": {"vaf.enhance": 3.0, "vaf.suppress": 0.5, "fastv.k": 2, "fastv.ratio": 0.5}}


@pytest.mark.parametrize("name", sorted(CACHE_ONLY))
def test_cache_is_transparent_for_branches_readouts_and_compositions(lvlm, name):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    # every built-in family runs these (DAMRO included: an outlier rule for each)
    assert [m.name for m in make_mitigations(name, CACHE_ONLY[name]) if m.refusal(type(lvlm)) is not None] == []
    runs = []
    for use_cache in (True, False):
        scores = _Scores()
        result = generate(lvlm, inputs, mitigation=[*make_mitigations(name, CACHE_ONLY[name]), scores],
                          max_new_tokens=4, use_cache=use_cache)
        runs.append((result, scores.steps))
    (cached, a_steps), (uncached, b_steps) = runs
    assert torch.equal(cached.new_tokens, uncached.new_tokens), name
    for a, b in zip(a_steps, b_steps, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (name, float((a - b).nan_to_num().abs().max()))
    _same_report(cached.report, uncached.report)


def test_fastv_keeps_the_most_attended_image_tokens(lvlm):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    with _eager(lvlm):
        with torch.no_grad():
            att = lvlm.model(**inputs, output_attentions=True).attentions
    result = generate(lvlm, inputs, mitigation="fastv", settings={"k": 2, "ratio": 0.5}, max_new_tokens=3)
    spans = result.image_spans
    n_img = spans.counts()[0]
    n_keep = n_img - round(0.5 * n_img)
    assert result.kept.shape == (2, inputs["input_ids"].shape[1] - (n_img - n_keep))
    for b in range(2):
        img = spans.positions(b)
        score = att[1][b, :, -1].mean(0)[img]  # block k - 1 = 1, last prompt token, head mean
        expected = {img[i] for i in torch.argsort(score, descending=True, stable=True)[:n_keep].tolist()}
        kept = set(result.kept[b].tolist())
        assert kept & set(img) == expected
        assert set(range(inputs["input_ids"].shape[1])) - set(img) <= kept  # every text and pad token stays
    same = generate(lvlm, inputs, mitigation="fastv", settings={"ratio": 0.0}, max_new_tokens=5)
    assert torch.equal(same.new_tokens, generate(lvlm, inputs, max_new_tokens=5).new_tokens)


def _reference_var(p, image, sinks, rows, s):
    """Row-by-row VAR, written from the definition; with ``s.protocol == "official"`` also from the
    released code's behaviour: no edit in a row whose keys hold no visual sink, and 1e-6 added per
    image token to the share's denominator."""
    out = p.clone()
    B, H, Q, K = p.shape
    official = s.protocol == "official"
    for b in range(B):
        if official and not bool((image[b] & sinks[b]).any()):
            continue
        for h in range(H):
            for q in range(Q):
                if not rows[b, q]:
                    continue
                row = p[b, h, q]
                a_img = float(row[image[b]].sum())
                a_vs = float(row[image[b] & sinks[b]].sum())
                target = image[b] & ~sinks[b]
                mass = float(row[sinks[b]].sum())
                denominator = a_img + (1e-6 * int(image[b].sum()) if official else 0.0)
                if a_img < s.min_image or a_vs > s.rho * denominator or mass == 0 or float(row[target].sum()) == 0:
                    continue
                new = row.clone()
                new[sinks[b]] = row[sinks[b]] * s.p
                new[target] = row[target] + row[target] / row[target].sum() * (1 - s.p) * mass
                out[b, h, q] = new
    return out


def test_var_redistribution_definition():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 12, generator=g) * 2, dim=-1)
    image = torch.zeros(2, 12, dtype=torch.bool)
    image[:, 3:9] = True
    sinks = torch.zeros(2, 12, dtype=torch.bool)
    sinks[:, 0] = True  # a text sink (BOS)
    sinks[0, 4] = True  # a visual sink
    rows = torch.ones(2, 5, dtype=torch.bool)
    rows[1, :2] = False
    s = VARSettings(min_image=0.3)
    got = redistribute(p, image, sinks, rows, s)
    ref = _reference_var(p, image, sinks, rows, s)
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=0)
    changed = (got != p).any(-1)
    assert changed.any() and (~changed).any()
    assert torch.equal(got[~changed], p[~changed])  # unselected rows bit-identical
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 5))
    other = ~image & ~sinks
    assert torch.equal(got[..., other[0]][0], p[..., other[0]][0])  # non-image, non-sink keys untouched
    for b in range(2):  # the sinks lose exactly (1 - p) of their mass, the non-sink image tokens gain it
        sel = changed[b]
        before, after = p[b][sel], got[b][sel]
        lost = (before[:, sinks[b]] - after[:, sinks[b]]).sum(-1)
        target = image[b] & ~sinks[b]
        torch.testing.assert_close(lost, (1 - s.p) * before[:, sinks[b]].sum(-1))
        torch.testing.assert_close((after[:, target] - before[:, target]).sum(-1), lost)


class _Bound:
    """A forward (or several, sharing one generation context) with mitigations installed on the
    decoder's sites, every layer's attention probabilities captured after the edits."""

    def __init__(self, lvlm, inputs, *mitigations):
        self.lvlm, self.inputs, self.mitigations = lvlm, inputs, mitigations
        self.decoder = decoder_of(lvlm)
        self.context = DecodeContext(lvlm, inputs["input_ids"], inputs["attention_mask"], lvlm.attention_groups(inputs))
        self.run = Run(lvlm, self.decoder, self.context, inputs["input_ids"], inputs["attention_mask"])
        self.probs: dict[int, list[torch.Tensor]] = {}

    def __enter__(self):
        self.stack = ExitStack()
        self.stack.enter_context(self.decoder.bound(self.context))
        for m in self.mitigations:
            self.stack.enter_context(m.installed(self.run))
        for layer in range(self.decoder.num_layers):
            handle = self.decoder.hook("attn_probs", layer,
                                       lambda p, start, z, layer=layer: self.probs.setdefault(layer, []).append(p.clone()))
            self.stack.callback(handle.remove)
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def forward(self, **kwargs):
        self.probs.clear()
        with torch.no_grad():
            out = self.lvlm.model(**kwargs)
        return [torch.cat(self.probs[layer], dim=2) for layer in range(self.decoder.num_layers)], out


def _planted_llava(dim=11, value=60.0, image_tokens=(2, 5), words=()):
    """Tiny LLaVA with a massive value in hidden dimension ``dim`` on BOS, on the image tokens at
    ``image_tokens`` and on the embeddings of ``words``: those are the sinks (tau 8)."""
    model, processor = build_tiny_llava(hidden=256)
    lm = model.model.language_model
    tok = processor.tokenizer
    with torch.no_grad():
        for token_id in [tok.bos_token_id] + [tok.convert_tokens_to_ids(w) for w in words]:
            lm.embed_tokens.weight[token_id, dim] = value

    def plant(module, args, out):
        out = out.clone()
        out[:, list(image_tokens), dim] += value
        return out

    if image_tokens:
        model.model.multi_modal_projector.register_forward_hook(plant)
    return LVLM(model, processor, "planted"), dim, image_tokens


def test_planted_sinks_are_detected_and_calibrated():
    lvlm, dim, planted = _planted_llava()
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    flags = detect_sinks(lvlm, inputs, [dim], tau=8.0)
    spans = lvlm.image_spans(inputs["input_ids"])
    first = inputs["attention_mask"].long().argmax(1)
    for b in range(2):
        expected = {int(first[b])} | {spans.positions(b)[i] for i in planted}
        for layer in range(lvlm.num_layers):
            assert set(flags[layer, b].nonzero().flatten().tolist()) == expected
    cal = calibrate(lvlm, [inputs], num_dims=1)
    assert cal.sink_dims == [dim]


def test_var_in_the_model_follows_the_definition():
    """At the first VAR layer the inputs equal the unedited run's, so its attention must be exactly
    the reference redistribution of the plain attention."""
    lvlm, dim, _ = _planted_llava()
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    s = VARSettings(sink_dims=[dim], tau=8.0, min_image=0.05)
    runs = {}
    for name, mitigations in (("none", ()), ("var", (VAR(s),))):
        with _Bound(lvlm, inputs, *mitigations) as bound:
            runs[name] = bound.forward(**inputs)[0]
    layer = s.start_layer
    spans = lvlm.image_spans(inputs["input_ids"])
    image = spans.mask()
    sinks = detect_sinks(lvlm, inputs, [dim], tau=8.0)[layer]
    end = torch.tensor([spans.end(b) for b in range(2)])
    rows = torch.arange(image.shape[1])[None, :] >= end[:, None]
    expected = _reference_var(runs["none"][layer].float(), image, sinks, rows, s)
    torch.testing.assert_close(runs["var"][layer].float(), expected, atol=1e-6, rtol=0)
    assert not torch.equal(runs["var"][layer], runs["none"][layer])
    for earlier in range(layer):
        assert torch.equal(runs["var"][earlier], runs["none"][earlier])


# --- protocols: "paper" (vsink's default) and "official" (the authors' released scripts) -------------


def test_var_official_rows_by_hand():
    """Two batch rows, one head, one query after the image; keys: BOS (a text sink), four image
    tokens, one text token; p = 0.6, rho = 0.5, min_image = 0.2. Every expected value below is
    worked out by hand from the released code's rules."""
    probs = torch.tensor([[[[0.5, 0.200001, 0.1, 0.099999, 0.0, 0.1]]],
                          [[[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]]], dtype=torch.float64)
    image = torch.tensor([[False, True, True, True, True, False]] * 2)
    sinks = torch.tensor([[True, True, False, False, False, False],  # row 0: BOS and a visual sink
                          [True, False, False, False, False, False]])  # row 1: no visual sink
    rows = torch.ones(2, 1, dtype=torch.bool)
    paper = redistribute(probs, image, sinks, rows, VARSettings())
    official = redistribute(probs, image, sinks, rows, VARSettings(protocol="official"))
    # Row 0: the visual-sink share is 0.200001 / 0.4 > rho, so the paper's rule leaves the row alone;
    # the released code divides by 0.4 + 4 × 1e-6 (ε per image token), the share drops to <= rho
    # and the row is edited: the sinks keep 0.6, budget 0.4 × (0.5 + 0.200001) goes to the other
    # image tokens in proportion to their attention (0.1 and 0.099999 of 0.199999; 0 stays 0).
    assert torch.equal(paper[0], probs[0])
    budget = 0.4 * (0.5 + 0.200001)
    expected = [0.3, 0.6 * 0.200001, 0.1 + budget * 0.1 / 0.199999, 0.099999 + budget * 0.099999 / 0.199999,
                0.0, 0.1]
    torch.testing.assert_close(official[0, 0, 0], torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    # Row 1: no visual sink. The paper's rule still moves 0.4 × 0.5 of BOS's attention to the four
    # image tokens (0.05 each); the released code skips a layer without a visual sink.
    expected = [0.3, 0.15, 0.15, 0.15, 0.15, 0.1]
    torch.testing.assert_close(paper[1, 0, 0], torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(official[1], probs[1])


def _attentions(lvlm, inputs, var):
    with _Bound(lvlm, inputs, *([VAR(var)] if var is not None else [])) as bound:
        attentions, out = bound.forward(**inputs)
    return attentions, out.logits


def test_var_official_leaves_layers_without_a_visual_sink_unedited():
    """Only BOS is a sink (no image token planted): every layer has text sinks but no visual sink.
    The released code edits nothing then, so every attention row and the logits equal the
    unedited run's bit for bit; the paper protocol moves BOS's attention to the image."""
    lvlm, dim, _ = _planted_llava(image_tokens=())
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    plain, plain_logits = _attentions(lvlm, inputs, None)
    settings = {"sink_dims": [dim], "tau": 8.0}
    official, official_logits = _attentions(lvlm, inputs, VARSettings(**settings, protocol="official"))
    paper, _ = _attentions(lvlm, inputs, VARSettings(**settings))
    assert all(torch.equal(a, b) for a, b in zip(official, plain)) and torch.equal(official_logits, plain_logits)
    assert not torch.equal(paper[2], plain[2])


def test_var_official_fixes_the_sinks_at_the_prompt_pass():
    """A decode step feeds "dog", whose embedding carries the planted sink value, so φ > τ on it.
    Layer 2 is the first VAR layer: its plain attention at that step is the unedited run's. The
    released code's sinks are the prompt's (the generated token is not one); vsink's paper
    protocol flags the new token too."""
    lvlm, dim, _ = _planted_llava(words=("dog",))
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    dog = torch.tensor([[lvlm.processor.tokenizer.convert_tokens_to_ids("dog")]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(dog)], dim=1)
    settings = {"sink_dims": [dim], "tau": 8.0, "min_image": 0.05}
    steps, prompt_sinks = {}, None
    for name, var in (("plain", None), ("paper", VARSettings(**settings)),
                      ("official", VARSettings(**settings, protocol="official"))):
        mitigation = VAR(var) if var is not None else None
        with _Bound(lvlm, inputs, *([mitigation] if mitigation else [])) as bound:
            _, out = bound.forward(**inputs, use_cache=True)
            if name == "paper":
                prompt_sinks = mitigation.sinks[2][0]
            cache = getattr(out, "cache", None) or out.past_key_values
            steps[name] = bound.forward(input_ids=dog, attention_mask=mask, use_cache=True,
                                        **{lvlm.cache_argument: cache})[0][2]
    image = torch.cat([lvlm.image_spans(inputs["input_ids"]).mask(), torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    rows = torch.ones(1, 1, dtype=torch.bool)
    for name, dog_is_sink in (("paper", True), ("official", False)):
        sinks = torch.cat([prompt_sinks, torch.tensor([[dog_is_sink]])], dim=1)
        expected = _reference_var(steps["plain"].float(), image, sinks, rows, VARSettings(**settings, protocol=name))
        torch.testing.assert_close(steps[name].float(), expected, atol=1e-6, rtol=0)
    assert prompt_sinks.sum() == 3 and not torch.equal(steps["paper"], steps["official"])  # BOS + 2 image tokens


def test_pai_official_has_no_alpha_in_the_prompt_pass_under_guidance(lvlm):
    """With guidance on, the released scripts start with α off and switch it on once the text-only
    branch has run (after the prompt pass); with γ = 1 their guidance returns before that, so α
    never applies. The captured attention of the first generated token (the prompt pass) is then
    the unedited one; with γ = 1 (official) every step's is, the tokens being the unguided ones."""
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    run = {}
    for name, protocol, gamma in (("none", "paper", None), ("paper", "paper", 1.1), ("official", "official", 1.1),
                                  ("official_g1", "official", 1)):
        settings = {} if name == "none" else {"alpha": 0.5, "gamma": gamma}
        run[name] = generate(lvlm, inputs, mitigation="none" if name == "none" else "pai", settings=settings,
                             protocol=protocol, max_new_tokens=3, capture_attention=True)
    assert torch.equal(run["official"].attention[0], run["none"].attention[0])
    assert not torch.equal(run["paper"].attention[0][:, :, 2:], run["none"].attention[0][:, :, 2:])
    assert torch.equal(run["official_g1"].attention, run["none"].attention)
    assert torch.equal(run["official_g1"].new_tokens, run["none"].new_tokens)
    # where the guided first token is the plain one (on the first four families' tiny models; not on
    # every newer one's random weights), step 1 has the same input as the unguided run's, and α is on there
    same_first = torch.equal(run["official"].new_tokens[:, :1], run["none"].new_tokens[:, :1])
    assert same_first or lvlm.family not in ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")
    if same_first:
        assert not torch.equal(run["official"].attention[1][:, :, 2:], run["none"].attention[1][:, :, 2:])


def test_fastv_official_without_cache_reprunes_by_the_newest_token():
    """Without the KV cache the released fastv_forward prunes at every forward, by the attention of
    the newest token (the last input position) in block k − 1, keeping round(n(1 − R)) image
    tokens; the final pass sees the prompt and all but the last generated token. Blocks < k are
    never pruned, so that attention is the plain model's."""
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    inputs = lvlm.prepare([random_image(1)], [PROMPTS[1]])
    settings = {"k": 2, "ratio": 0.5}
    result = generate(lvlm, inputs, mitigation="fastv", settings=settings, protocol="official", max_new_tokens=4,
                      use_cache=False)
    img = result.image_spans.positions(0)

    def top_image_tokens(sequence):
        lvlm.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                att = lvlm.model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                                 pixel_values=inputs["pixel_values"], output_attentions=True).attentions[1]
        finally:
            lvlm.model.set_attn_implementation("sdpa")
        score = att[0, :, -1].mean(0)[img]
        return {img[i] for i in torch.topk(score, round(len(img) * 0.5)).indices.tolist()}

    final = top_image_tokens(result.sequences[:, :-1])
    assert set(result.kept[0].tolist()) & set(img) == final
    assert final != top_image_tokens(inputs["input_ids"])  # the prompt's choice, kept by the paper protocol
    once = generate(lvlm, inputs, mitigation="fastv", settings=settings, max_new_tokens=4, use_cache=False)
    assert set(once.kept[0].tolist()) & set(img) == top_image_tokens(inputs["input_ids"])
    cached = generate(lvlm, inputs, mitigation="fastv", settings=settings, protocol="official", max_new_tokens=4)
    assert torch.equal(cached.kept, once.kept)  # with the cache, the released code prunes once, at the prompt


def test_fastv_keep_count_per_protocol():
    """9 image tokens (3 × 3), R = 0.5: the released code keeps round(9 × 0.5) = round(4.5) = 4
    (Python rounds halves to even); vsink's paper protocol keeps 9 − round(4.5) = 5."""
    model, processor = build_tiny_llava(image_size=24)
    lvlm = LVLM(model, processor)
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    n = inputs["input_ids"].shape[1]
    assert lvlm.image_spans(inputs["input_ids"]).counts() == [9]
    for protocol, keep in (("paper", 5), ("official", 4)):
        result = generate(lvlm, inputs, mitigation="fastv", settings={"ratio": 0.5}, protocol=protocol,
                          max_new_tokens=1)
        assert result.kept.shape == (1, n - 9 + keep), protocol


def test_protocol_defaults_recording_and_errors(tmp_path):
    from vsink.lvlm import make_settings
    from vsink.lvlm.export import export_attention

    pai = make_settings("pai", {}, "official")
    assert (pai.gamma, pai.start_layer, pai.end_layer, pai.alpha) == (1.1, 2, 32, 0.2)  # PAI README's commands
    assert (make_settings("fastv", {}, "official").k, make_settings("fastv", {}, "official").ratio) == (3, 0.5)
    assert make_settings("pai", {"gamma": 2.0}, "official").gamma == 2.0  # a given value wins
    assert make_settings("var", {}, "official") == VARSettings(protocol="official")
    assert make_settings("pai", {}).gamma is None and make_settings("fastv", {}).k == 2  # paper: unchanged
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    result = generate(lvlm, inputs, mitigation="fastv", protocol="official", max_new_tokens=2,
                      capture_attention=True)
    assert result.protocol == "official" and result.settings == {"k": 3, "ratio": 0.5, "protocol": "official"}
    assert generate(lvlm, inputs, max_new_tokens=1).protocol == "paper"
    export_attention(lvlm, result, inputs, tmp_path, png=False)
    data = np.load(tmp_path / "row0.npz")
    assert str(data["protocol"]) == "official" and str(data["mitigation"]) == "fastv"
    assert json.loads(str(data["settings"]))["k"] == 3
    with pytest.raises(VsinkError, match="protocol must be one of paper, official, got 'offical'"):
        generate(lvlm, inputs, protocol="offical")
    with pytest.raises(VsinkError, match="the protocol is not a setting"):
        make_settings("var", {"protocol": "official"})
    with pytest.raises(VsinkError, match="protocol must be one of"):
        PAISettings(protocol="reference")


def test_pai_changes_only_last_row_image_logits():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    ids = inputs["input_ids"]
    N = ids.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, N, 16, generator=g) for _ in range(3))

    def attention(layer, *mitigations):
        """The probabilities of ``layer``'s routed attention on q, k, v with ``mitigations``."""
        with _Bound(lvlm, inputs, *mitigations) as bound:
            bound.context.shapes[layer] = (N, N)
            mask = bound.context.mask(layer, N, N, q.device, q.dtype)
            bound.decoder._attention(layer, q, k, v, scale=0.25, mask=mask)
            return torch.cat(bound.probs[layer], dim=2)

    p_none = attention(2)
    p_pai = attention(2, PAI(PAISettings(alpha=0.2)))
    assert torch.equal(p_pai[:, :, :-1], p_none[:, :, :-1])
    z = (q @ k.transpose(2, 3) * 0.25)[:, :, -1]  # the last row is causal over every key
    img = lvlm.image_spans(ids).mask()[0]
    expected = torch.softmax(torch.where(img, z + 0.2 * z.abs(), z), dim=-1)
    torch.testing.assert_close(p_pai[:, :, -1], expected, atol=1e-6, rtol=0)
    p_early = attention(1, PAI(PAISettings(alpha=0.2)))
    assert torch.equal(p_early, attention(1))  # layers before start_layer are untouched


def test_attention_export_shapes(lvlm, tmp_path, monkeypatch):
    from vsink.export import figures
    from vsink.lvlm.export import export_attention

    drawn = []
    overlay = figures.overlay_png
    monkeypatch.setattr(figures, "overlay_png",
                        lambda image, grid, *a, **k: drawn.append(grid) or overlay(image, grid, *a, **k))
    images = [random_image(), random_image(1)]
    inputs = lvlm.prepare(images, PROMPTS)
    result = generate(lvlm, inputs, mitigation="fastv", max_new_tokens=3, capture_attention=True)
    paths = export_attention(lvlm, result, inputs, tmp_path, images=images)
    data = np.load(tmp_path / "row1.npz")
    grid = tuple(data["grid"])
    assert data["attention"].shape == (3, lvlm.num_layers, *grid)
    assert grid[0] * grid[1] == result.image_spans.counts()[1]
    # each image span's own grid (LLaVA-OneVision: base view, tiled view), in the row's token order
    spans = data["spans"].tolist()
    runs = result.image_spans.spans[1]
    assert [count for _, count, _, _ in spans] == [e - s for s, e in runs]
    assert [offset for offset, _, _, _ in spans] == [sum(e - s for s, e in runs[:i]) for i in range(len(runs))]
    assert all(rows * cols == count for _, count, rows, cols in spans)
    # the overlays (row 1's are drawn last): the row's layer mean; LLaVA-OneVision's: its base view's part
    layer_mean = np.nan_to_num(data["layer_mean"])
    if lvlm.model_type == "llava_onevision":
        assert [(rows, cols) for _, _, rows, cols in spans] == lvlm.view_grids(inputs, 1)
        layer_mean = layer_mean.reshape(3, -1)[:, :spans[0][1]].reshape(3, spans[0][2], spans[0][3])
    assert len(drawn) == 2 * 3
    for t in range(3):
        np.testing.assert_array_equal(drawn[3 + t], layer_mean[t])
    assert np.isnan(data["attention"][:, 2:]).any() and not np.isnan(data["attention"][:, :2]).any()  # pruned
    assert data["tokens"].tolist() == result.new_tokens[1].tolist()
    assert (tmp_path / "row0" / "step002.png").exists() and len(paths) == 2 + 2 * 3
    if lvlm.model_type in ("qwen2_vl", "qwen2_5_vl"):
        t, h, w = inputs["image_grid_thw"][1].tolist()
        assert grid == (h // 2, w // 2)


def test_settings_and_errors():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    inputs = lvlm.prepare([random_image()], [PROMPTS[0]])
    with pytest.raises(VsinkError, match="unknown mitigation 'nonesuch'"):
        generate(lvlm, inputs, mitigation="nonesuch")
    with pytest.raises(VsinkError, match=r"var: unknown setting\(s\) \['beta'\]"):
        generate(lvlm, inputs, mitigation="var", settings={"beta": 1})
    with pytest.raises(VsinkError, match="no sink dimensions known"):
        generate(lvlm, inputs, mitigation="var")
    with pytest.raises(VsinkError, match=r"fastv setting 'ratio' must be a finite number in \[0, 1\), got 1\.0"):
        generate(lvlm, inputs, mitigation="fastv", settings={"ratio": 1.0})
    text_only = dict(processor.tokenizer(["is there a cat ?"], return_tensors="pt"))
    with pytest.raises(VsinkError, match="every prompt needs an image"):
        generate(lvlm, text_only)
    with pytest.raises(VsinkError, match="not a supported LVLM"):
        LVLM(build_tiny_llava()[0].model.language_model)


def test_vision_tower_is_a_vision_backbone():
    import vsink

    model, processor = build_tiny_llava()
    backbone = LVLM(model, processor, "tiny").vision_backbone()
    result = vsink.scan(backbone, [random_image(), random_image(1)], progress=False)
    assert result.layout.num_cls == 1 and result.layout.grid == (4, 4)


def test_cli_generate_and_calibrate(tmp_path, capsys):
    from vsink.cli import main

    model, processor = build_tiny_qwen2_vl()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    random_image().save(tmp_path / "a.png")
    random_image(1).save(tmp_path / "b.png")
    assert main(["lvlm", "calibrate", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "sinks.json")]) == 0
    dims = json.loads((tmp_path / "sinks.json").read_text())["sink_dims"]
    assert len(dims) == 2
    code = main(["generate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", f"hf:{tmp_path / 'm'}",
                 "--prompt", "is there a cat ?", "--mitigation", "var",
                 "--sinks", str(tmp_path / "sinks.json"), "--set", "tau=2", "--max-new-tokens", "3",
                 "--export-attention", str(tmp_path / "att")])
    assert code == 0
    captured = capsys.readouterr()
    assert f"[{tmp_path / 'a.png'}]" in captured.out and (tmp_path / "att" / "row1.npz").exists()
    assert "mitigation var, protocol paper" in captured.err
    assert main(["generate", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"), "--prompt", "x",
                 "--mitigation", "fastv", "--protocol", "official", "--max-new-tokens", "2", "--no-cache"]) == 0
    assert 'protocol official, settings {"k": 3, "ratio": 0.5, "protocol": "official"}' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "one of paper, official; default: paper" in " ".join(capsys.readouterr().out.split())
    assert main(["generate", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"),
                 "--prompt", "x", "--protocol", "authors"]) == 2
    assert "--protocol: must be one of paper, official, got 'authors'" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"),
                 "--prompt", "x", "--mitigation", "nonesuch"]) == 2
    assert main(["generate", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"),
                 "--prompt", "x", "--prompt", "y", "--prompt", "z"]) == 2
    assert main(["generate", str(tmp_path / "a.png"), "--model", str(tmp_path / "missing"),
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--mitigation: must be none or a '+'-joined combination of damro, dola, fastv, m3id, opera, pai, ttr, vaf, var, vcd, got 'nonesuch'" in err
    assert "one --prompt per image (or one for all): 1 image, 3 prompts" in err
    assert "Traceback" not in err
    assert main(["generate", str(tmp_path / "a.png"), "--model", str(tmp_path / "m"),
                 "--prompt", "x", "--mitigation", "vcd+ vcd"]) == 2
    assert "got 'vcd+ vcd' (it names one mitigation twice)" in capsys.readouterr().err
