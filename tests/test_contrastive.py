"""Contrastive decoding on branches: VCD, M3ID, DAMRO. Strength zero equals none token for token;
batches with left padding equal single rows, with and without the cache; each rule and its
composition with attention edits checked against a hand-built rule on the same logits."""

import math

import pytest
import torch

from vsink.data.demo_lvlm import build_tiny_llava
from vsink.errors import VsinkError
from vsink.lvlm import LVLM, generate
from vsink.mitigate import DAMRO, DAMROSettings, PAI, PAISettings, VAR, VARSettings, VCD, VCDSettings
from vsink.mitigate.branch import image_branch, text_branch
from vsink.mitigate.contrastive import contrast
from vsink.mitigate.damro import outlier_prompt, outliers
from vsink.mitigate.damro_outliers import rule_for
from vsink.mitigate.m3id import m3id_scores
from vsink.mitigate.vcd import add_diffusion_noise, diffusion_schedule

from lvlm_models import BUILDERS, PROMPTS, random_image, tiny_lvlm
from test_branches import Follow

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")
#: every family but the first PaliGemma (PaliGemma 2 stands for it)
FAMILIES = sorted(set(BUILDERS) - {"paligemma"})


@pytest.fixture(scope="module", params=FAMILIES)
def lvlm(request):
    from vsink.backbones.hf_lvlm import UnavailableFamily

    try:
        return tiny_lvlm(request.param)
    except UnavailableFamily as e:  # PaliGemma under transformers 4.x: refused in one line, reported
        assert "\n" not in str(e)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def llava():
    model, processor = build_tiny_llava()
    return LVLM(model, processor, "tiny-llava")


# --- the rules on small tensors ---------------------------------------------------------------
def test_diffusion_schedule_by_hand():
    # vcd_add_noise.py: betas = sigmoid(linspace(-6, 6, 1000))·(0.5e-2 − 1e-5) + 1e-5, ᾱ_t = Π_{s<=t}(1 − β_s);
    # recomputed here with math, one step at a time
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (0.5e-2 - 1e-5) + 1e-5 for i in range(1000)]
    prod = 1.0
    for i in range(501):
        prod *= 1 - betas[i]
    keep, noise = diffusion_schedule()[:, 500]
    assert keep == pytest.approx(math.sqrt(prod), rel=1e-5) and noise == pytest.approx(math.sqrt(1 - prod), rel=1e-5)
    assert diffusion_schedule()[0, 0] == pytest.approx(math.sqrt(1 - betas[0]), rel=1e-6)
    x = torch.ones(2, 3, 4, 4)
    a = add_diffusion_noise(x, 500, torch.Generator().manual_seed(42))
    b = add_diffusion_noise(x, 500, torch.Generator().manual_seed(42))
    assert torch.equal(a, b) and not torch.equal(a, x)  # seeded: the same noised image at every call


def test_contrast_and_cutoff_by_hand():
    # logits l = log([0.6, 0.3, 0.05, 0.05]); β = 0.1 keeps p >= 0.06: tokens 0 and 1
    l = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()
    weak = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).log()
    out = contrast(l, weak, alpha=1.0, beta=0.1)
    assert torch.isinf(out[0, 2:]).all()
    # 2·log 0.6 − log 0.7 = −0.665; 2·log 0.3 − log 0.1 = −0.105: the contrast flips the choice
    assert out[0, 0].item() == pytest.approx(2 * math.log(0.6) - math.log(0.7), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(2 * math.log(0.3) - math.log(0.1), abs=1e-6)
    assert out.argmax().item() == 1


def test_m3id_rule_by_hand():
    lc = torch.tensor([[0.5, 0.3, 0.2]]).log()
    lu = torch.tensor([[0.7, 0.2, 0.1]]).log()
    t, lam = 5, 0.2
    w = (1 - math.exp(-lam * t)) / math.exp(-lam * t)  # (1 − γ)/γ = e^{λt} − 1 = e − 1
    out = m3id_scores(lc, lu, t, lam, threshold=0.9)  # max p = 0.5 < 0.9: applied
    assert out[0, 1].item() == pytest.approx(math.log(0.3) + w * (math.log(0.3) - math.log(0.2)), abs=1e-5)
    # token 2 gains most from the image (p_c / p_u = 2): log 0.2 + (e − 1)·log 2 = −0.418 beats token 1's
    # log 0.3 + (e − 1)·log 1.5 = −0.507 and token 0's log 0.5 + (e − 1)·log(5/7) = −1.271
    assert out[0, 2].item() == pytest.approx(math.log(0.2) + w * math.log(2), abs=1e-5)
    assert out.argmax().item() == 2
    sure = m3id_scores(lc, lu, t, lam, threshold=0.4)  # max p = 0.5 >= 0.4: plain log-probabilities
    assert torch.allclose(sure, lc.log_softmax(-1))


# --- in the model ---------------------------------------------------------------------------
ZERO = {"vcd": {"alpha": 0.0}, "m3id": {"lam": 0.0}, "damro": {"alpha": 0.0}}
STRONG = {"vcd": {"alpha": 3.0, "beta": 0.0, "noise_step": 900}, "m3id": {"lam": 2.0, "threshold": 1.0},
          "damro": {"alpha": 3.0, "beta": 0.0, "k": 2}}


@pytest.mark.parametrize("name", sorted(ZERO))
@pytest.mark.parametrize("use_cache", [True, False])
def test_strength_zero_equals_none_and_batches_equal_single_rows(lvlm, name, use_cache):
    assert rule_for(type(lvlm)) is not None  # DAMRO has an outlier rule for every built-in family
    images = [random_image(), random_image(1)]
    inputs = lvlm.prepare(images, PROMPTS)
    none = generate(lvlm, inputs, max_new_tokens=3, use_cache=use_cache)
    zero = generate(lvlm, inputs, mitigation=name, settings=ZERO[name], max_new_tokens=3, use_cache=use_cache)
    assert torch.equal(zero.new_tokens, none.new_tokens)
    strong = generate(lvlm, inputs, mitigation=name, settings=STRONG[name], max_new_tokens=3, use_cache=use_cache)
    # VCD's noised image has the prompt's shapes and edits: it runs in the main pass's forward;
    # M3ID's text-only and DAMRO's outlier prompts (other shapes) run one pass of their own per step
    assert strong.report[0]["steps"] and strong.report[0]["branch_passes"] == (0 if name == "vcd" else 3)
    assert strong.report[0]["stacked_with_main"] == (["noised"] if name == "vcd" else [])
    for b in range(2):
        alone = generate(lvlm, lvlm.prepare([images[b]], [PROMPTS[b]]), mitigation=name, settings=STRONG[name],
                         max_new_tokens=3, use_cache=use_cache)
        assert torch.equal(alone.new_tokens[0], strong.new_tokens[b, :alone.new_tokens.shape[1]]), (name, b)


def _noised(settings):  # LLaVA: one [3, H, W] image per row, each noised from the seed
    return lambda x: torch.cat([add_diffusion_noise(p, settings.noise_step, torch.Generator().manual_seed(settings.seed))
                                for p in x.split(1)])


def test_vcd_plus_var_equals_the_contrast_of_two_var_runs(llava):
    # by hand: VAR in both branches (the default), the rule applied to the image branch and the
    # noised branch as a test mitigation sees them
    inputs = llava.prepare([random_image(), random_image(1)], PROMPTS)
    var = {"sink_dims": [3, 7], "tau": 1.0, "rho": 1.0, "min_image": 0.0}  # loose: VAR edits the tiny model
    s = VCDSettings(alpha=2.0, beta=0.05)

    class ByHand(Follow):
        def combine(self, step, logits, branches):
            return contrast(branches["v"].masked_fill(torch.isinf(logits), float("-inf")), branches["noised"],
                            s.alpha, s.beta)

    hand = ByHand([image_branch("v", lambda x: x.clone()), image_branch("noised", _noised(s))])
    expected = generate(llava, inputs, mitigation=[VAR(VARSettings(**var)), hand], max_new_tokens=4)
    out = generate(llava, inputs, mitigation=[VAR(VARSettings(**var)), VCD(s)], max_new_tokens=4)
    assert torch.equal(out.new_tokens, expected.new_tokens)
    assert out.report[0]["layers"] and out.report[0]["edited"]  # VAR did edit
    assert out.report[1]["branches"] == [{"name": "noised", "kind": "image", "edits": ["var"]}]
    plain = generate(llava, inputs, mitigation=[VAR(VARSettings(**var)), VCD(VCDSettings(alpha=2.0, beta=0.05,
                                                                                      branch_edits="none"))],
                     max_new_tokens=1)
    assert plain.report[1]["branches"][0]["edits"] == []


def test_m3id_equals_the_rule_on_the_text_branch(lvlm):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)

    class ByHand(Follow):
        def combine(self, step, logits, branches):
            return m3id_scores(logits, branches["u"], step + 1, 2.0, 1.0)

    expected = generate(lvlm, inputs, mitigation=[ByHand([text_branch("u")])], max_new_tokens=4)
    out = generate(lvlm, inputs, mitigation="m3id", settings={"lam": 2.0, "threshold": 1.0}, max_new_tokens=4)
    assert torch.equal(out.new_tokens, expected.new_tokens)
    assert out.report[0]["branches"] == [{"name": "unconditioned", "kind": "text", "edits": []}]


@pytest.mark.parametrize("feature_layer, producer", [
    (-1, 1),  # the tiny model's own setting: hidden_states[-1] is the last (2nd) block's output
    (1, 0),  # a positive layer: hidden_states[1] is block 0's output (hidden_states[0]: the embeddings)
])
def test_damro_outliers_are_the_class_tokens_top_patches_by_hand(llava, feature_layer, producer):
    """The class token's attention in the block whose output LLaVA reads (``vision_feature_layer``),
    recomputed from that block's own projections; the branch's features are that output's."""
    inputs = llava.prepare([random_image(), random_image(1)], PROMPTS)
    tower = llava.model.model.vision_tower
    default = llava.model.config.vision_feature_layer
    llava.model.config.vision_feature_layer = feature_layer
    try:
        with torch.no_grad():
            hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
            block = llava.vision_backbone().blocks[producer]  # the CLIP encoder layer itself
            x = block.layer_norm1(hidden[producer])  # the block's input (hidden_states[i] enters block i), normed
            q, k = block.self_attn.q_proj(x), block.self_attn.k_proj(x)
            cls = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)[:, 0, 1:]
            features = llava.model.model.multi_modal_projector(hidden[feature_layer][:, 1:])

        class R:  # what outliers reads of a run
            pass
        R.lvlm, R.inputs = llava, inputs
        found = outliers(R, 3)
    finally:
        llava.model.config.vision_feature_layer = default
    top = cls.argsort(dim=1, descending=True)[:, :3]
    assert torch.allclose(found.scores, cls, atol=1e-5)
    assert torch.equal(found.top, top)
    torch.testing.assert_close(found.features, torch.stack([f[t] for f, t in zip(features, top)]), atol=1e-5, rtol=0)


def test_damro_refuses_the_embedding_output_as_feature_layer(llava):
    default = llava.model.config.vision_feature_layer
    llava.model.config.vision_feature_layer = 0  # hidden_states[0]: no block, no attention

    class R:
        pass
    R.lvlm, R.inputs = llava, llava.prepare([random_image()], PROMPTS[:1])
    try:
        with pytest.raises(VsinkError, match="vision_feature_layer 0 is the tower's embedding output"):
            outliers(R, 3)
    finally:
        llava.model.config.vision_feature_layer = default


#: LLaVA (the paper's rule) and a family of each other kind of branch: bidirectional image group
#: (Gemma 3), DeepStack (Qwen3-VL), the unsplit layout (Idefics3)
PAI_FAMILIES = ["llava", "gemma3", "qwen3_vl", "idefics3"]


@pytest.mark.parametrize("name", PAI_FAMILIES)
def test_damro_plus_pai_equals_the_contrast_with_pai_in_both_branches(name):
    lvlm = tiny_lvlm(name)
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    s = DAMROSettings(alpha=2.0, beta=0.05, k=3)
    damro = DAMRO(s)

    class ByHand(Follow):
        def combine(self, step, logits, branches):
            super().combine(step, logits, branches)  # records the branch logits
            return contrast(logits, branches["outliers"], s.alpha, s.beta)

    hand = ByHand(damro.branches(None))  # the same outlier prompt, the rule written out here
    pai = lambda: PAI(PAISettings(alpha=2.0, start_layer=0))  # noqa: E731
    expected = generate(lvlm, inputs, mitigation=[pai(), hand], max_new_tokens=4)
    out = generate(lvlm, inputs, mitigation=[pai(), damro], max_new_tokens=4)
    assert torch.equal(out.new_tokens, expected.new_tokens)
    assert out.report[1]["branches"] == [{"name": "outliers", "kind": "tokens", "edits": ["pai"]}]
    assert out.report[0]["layers"][0]["rows_amplified"] > 0
    class R:  # the outlier prompt: each row's image reduced to k = 3 tokens, left-padded
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    R.lvlm, R.inputs = lvlm, inputs
    prompt = outlier_prompt(R, 3)
    assert ((prompt["input_ids"] == lvlm.image_token_id).sum(1) == 3).all()
    assert prompt["inputs_embeds"].shape[:2] == prompt["input_ids"].shape
    with_pai = hand.seen[0]["outliers"]
    no_pai = ByHand(DAMRO(DAMROSettings(alpha=2.0, beta=0.05, k=3, branch_edits="none")).branches(None))
    generate(lvlm, inputs, mitigation=[pai(), no_pai], max_new_tokens=1)
    assert not torch.allclose(with_pai, no_pai.seen[0]["outliers"], atol=1e-4)  # PAI did act in the branch


def test_two_contrastive_rules_are_refused_in_one_line(llava):
    inputs = llava.prepare([random_image()], PROMPTS[:1])
    with pytest.raises(VsinkError, match="vcd and m3id each set the next-token rule"):
        generate(llava, inputs, mitigation="vcd+m3id", max_new_tokens=1)


def test_attention_capture_sees_the_main_pass_only(llava):
    # the noised branch's passes are not captured: with alpha 0 the captured attention is none's
    inputs = llava.prepare([random_image(), random_image(1)], PROMPTS)
    none = generate(llava, inputs, max_new_tokens=3, capture_attention=True)
    vcd = generate(llava, inputs, mitigation="vcd", settings={"alpha": 0.0}, max_new_tokens=3, capture_attention=True)
    assert vcd.attention.shape == none.attention.shape
    torch.testing.assert_close(vcd.attention, none.attention, atol=1e-5, rtol=0, equal_nan=True)
