"""Branches in the substrate (vsink.lvlm.branches): each branch decodes as the model itself would on
its prompt (own cache, the model's own position ids, M-RoPE included), stacked branches equal
separate ones, readouts equal transformers' hidden states, edits apply where recorded."""

from dataclasses import dataclass

import pytest
import torch

from vsink.backbones.hf_decoder import decoder_of
from vsink.data.demo_lvlm import build_tiny_llava
from vsink.errors import VsinkError
from vsink.lvlm import LVLM, generate
from vsink.mitigate.branch import Branch, image_branch, readout_branch, text_branch, text_only
from vsink.mitigate import PAI, PAISettings, VAR, VARSettings, VCD, VCDSettings, Mitigation

from lvlm_models import FIRST_FAMILIES, PROMPTS, marked, random_image, tiny_lvlm

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")

@pytest.fixture(scope="module", params=sorted(FIRST_FAMILIES))
def lvlm(request):
    return tiny_lvlm(request.param)


@dataclass
class _NoSettings:
    protocol: str = "paper"


class Follow(Mitigation):
    """A test mitigation: decodes from one of its branches (``follow``) and records every branch's logits."""

    name = "follow"
    settings_class = _NoSettings

    def __init__(self, branches, follow=None):
        super().__init__(_NoSettings())
        self._branches, self.follow = branches, follow
        self.seen: list[dict[str, torch.Tensor]] = []
        self.main: list[torch.Tensor] = []

    def _install(self, run, handles):
        pass

    def branches(self, run):
        return self._branches

    def decodes(self):
        return True

    def combine(self, step, logits, branches):
        self.seen.append({k: v.clone() for k, v in branches.items()})
        self.main.append(logits.clone())
        self.count_step(step, steps_seen=1)
        if self.follow is None:
            return logits
        # the model's own processors (the tiny Qwen models suppress EOS and vision tokens) stay on
        return branches[self.follow].masked_fill(torch.isinf(logits), float("-inf"))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("stack_main", [True, False])
def test_an_identity_image_branch_decodes_as_the_main_pass(lvlm, use_cache, stack_main):
    # the image "transformed" by the identity is the prompt itself: the branch's own cache and
    # position ids (LLaVA: from the padding mask; Qwen2-VL: the model's get_rope_index) must give
    # the main pass's logits at every step, left padding included; stacked with the main pass
    # (the main rows of one forward), the tokens must be transformers' own greedy ones
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    follow = Follow([image_branch("same", lambda x: x.clone())], follow="same")
    out = generate(lvlm, inputs, mitigation=[follow], max_new_tokens=4, use_cache=use_cache, stack_main=stack_main)
    plain = generate(lvlm, inputs, max_new_tokens=4)
    assert torch.equal(out.new_tokens, plain.new_tokens)
    assert out.report[0]["stacked_with_main"] == (["same"] if stack_main else [])
    for seen, main in zip(follow.seen, follow.main):
        finite = torch.isfinite(main)
        assert torch.allclose(seen["same"][finite], main[finite], atol=1e-4)


def test_a_text_branch_decodes_as_hf_generate_on_the_text_prompt(lvlm):
    # following the text-only branch must reproduce transformers' own greedy decoding of the
    # prompt without its image tokens (its positions, its cache)
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    follow = Follow([text_branch("text")], follow="text")
    out = generate(lvlm, inputs, mitigation=[follow], max_new_tokens=4)

    class _Run:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    _Run.lvlm = lvlm
    ids, mask = text_only(_Run)
    with torch.no_grad():
        ref = lvlm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.new_tokens, ref[:, ids.shape[1]:])


def test_branches_of_one_shape_run_stacked_in_one_pass(lvlm):
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    two = Follow([image_branch("a", lambda x: x.clone()), image_branch("b", lambda x: x * 0.5)])
    out = generate(lvlm, inputs, mitigation=[two], max_new_tokens=3, stack_main=False)
    assert out.report[0]["branch_passes"] == 3  # one stacked pass per step, not two
    with_main = generate(lvlm, inputs, mitigation=[Follow(two.branches(None))], max_new_tokens=3)
    assert with_main.report[0]["branch_passes"] == 0 and with_main.report[0]["stacked_with_main"] == ["a", "b"]
    one = Follow([image_branch("b", lambda x: x * 0.5)])
    generate(lvlm, inputs, mitigation=[one], max_new_tokens=3, stack_main=False)
    for stacked, alone in zip(two.seen, one.seen):
        assert torch.allclose(stacked["b"], alone["b"], atol=1e-4)
    assert not torch.allclose(two.seen[0]["a"], two.seen[0]["b"], atol=1e-3)  # the halved image is another image


def test_a_readout_equals_transformers_hidden_states_through_norm_and_head():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    follow = Follow([readout_branch("l1", 1), readout_branch("l2raw", 2, norm=False)])
    generate(lvlm, inputs, mitigation=[follow], max_new_tokens=1)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    head, norm = model.get_output_embeddings(), lvlm.final_norm()
    assert torch.allclose(follow.seen[0]["l1"], head(norm(hidden[1][:, -1])), atol=1e-5)
    assert torch.allclose(follow.seen[0]["l2raw"], head(hidden[2][:, -1]), atol=1e-5)


def test_edits_apply_in_a_branch_as_declared_and_are_recorded():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    pai = lambda: PAI(PAISettings(alpha=3.0, start_layer=0))  # noqa: E731
    plain = Follow([image_branch("same", lambda x: x.clone(), edits=())])
    out = generate(lvlm, inputs, mitigation=[pai(), plain], max_new_tokens=1)
    with_pai = Follow([image_branch("same", lambda x: x.clone())])  # default: every composed edit
    out2 = generate(lvlm, inputs, mitigation=[pai(), with_pai], max_new_tokens=1)
    alone = Follow([])
    with torch.no_grad():
        none_logits = model(**inputs).logits[:, -1]
    assert torch.allclose(plain.seen[0]["same"], none_logits, atol=1e-4)  # PAI off in that branch
    finite = torch.isfinite(with_pai.main[0])  # the model's own processors suppress some tokens in the main pass
    assert torch.allclose(with_pai.seen[0]["same"][finite], with_pai.main[0][finite], atol=1e-4)  # PAI on there too
    assert not torch.allclose(with_pai.main[0][finite], none_logits[finite], atol=1e-3)  # and PAI does change the logits
    assert out.report[1]["branches"] == [{"name": "same", "kind": "image", "edits": []}]
    assert out2.report[1]["branches"] == [{"name": "same", "kind": "image", "edits": ["pai"]}]
    assert alone.branches(None) == []


def test_steps_are_reported_and_two_decoding_rules_are_refused():
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([random_image()], PROMPTS[:1])
    follow = Follow([text_branch("text")])
    out = generate(lvlm, inputs, mitigation=[follow], max_new_tokens=3)
    assert [s["step"] for s in out.report[0]["steps"]] == [0, 1, 2] and not out.warnings
    with pytest.raises(VsinkError, match="each set the next-token rule"):
        generate(lvlm, inputs, mitigation=[Follow([text_branch("t")]), PAI(PAISettings(gamma=1.1))])
    with pytest.raises(VsinkError, match="kind must be one of"):
        Branch("x", "noise")
    with pytest.raises(VsinkError, match="edits .* of no composed mitigation"):
        generate(lvlm, inputs, mitigation=[Follow([image_branch("x", lambda x: x, edits=("var",))])])


class Recorded(VCD):
    """VCD that keeps the main and noised logits of every step."""

    def __init__(self, settings):
        super().__init__(settings)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def combine(self, step, logits, branches):
        self.seen.append((logits.clone(), branches["noised"].clone()))
        return super().combine(step, logits, branches)


def _same_logits(a: Recorded, b: Recorded) -> None:
    assert len(a.seen) == len(b.seen)
    for (main_a, noised_a), (main_b, noised_b) in zip(a.seen, b.seen):
        finite = torch.isfinite(main_b)  # the model's own processors suppress some tokens
        assert torch.equal(finite, torch.isfinite(main_a))
        assert torch.allclose(main_a[finite], main_b[finite], atol=1e-4)
        assert torch.allclose(noised_a, noised_b, atol=1e-4)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def small(request):
    return tiny_lvlm(request.param)


@pytest.mark.parametrize("use_cache", [True, False])
def test_vcd_stacked_with_the_main_pass_equals_separate_passes(small, use_cache):
    # the noised image has the prompt's shapes and VCD composes nothing: one forward of both per
    # step, whose rows are the main and noised logits the two separate forwards give (LLaVA's
    # positions from the padding mask, Qwen2-VL's M-RoPE from get_rope_index), left padding included
    inputs = small.prepare([random_image(), random_image(1)], PROMPTS)
    s = VCDSettings(alpha=3.0, beta=0.0, noise_step=900)
    stacked, separate = Recorded(s), Recorded(s)
    one = generate(small, inputs, mitigation=[stacked], max_new_tokens=4, use_cache=use_cache)
    two = generate(small, inputs, mitigation=[separate], max_new_tokens=4, use_cache=use_cache, stack_main=False)
    assert torch.equal(one.new_tokens, two.new_tokens)
    _same_logits(stacked, separate)
    assert one.report[0]["stacked_with_main"] == ["noised"] and one.report[0]["branch_passes"] == 0
    assert two.report[0]["stacked_with_main"] == [] and two.report[0]["branch_passes"] == 4
    assert one.report[0]["steps"] == two.report[0]["steps"]
    none = generate(small, inputs, max_new_tokens=4, use_cache=use_cache)
    assert not torch.equal(one.new_tokens, none.new_tokens)  # the contrast does decide here


@pytest.mark.parametrize("use_cache", [True, False])
def test_vcd_with_var_stacks_only_where_var_runs_in_the_noised_branch(small, use_cache):
    # branch_edits=all (the default): VAR in both, as in the main pass, so they stack, and VAR's
    # per-layer counts are those of the two separate passes; branch_edits=none: the noised branch
    # runs without VAR, unlike the main pass, so it keeps a forward of its own
    inputs = small.prepare([random_image(), random_image(1)], PROMPTS)
    var = lambda: VAR(VARSettings(sink_dims=[3, 7], tau=1.0, rho=1.0, min_image=0.0))  # noqa: E731 loose: VAR edits
    for edits, stacks in (("all", True), ("none", False)):
        s = VCDSettings(alpha=3.0, beta=0.0, noise_step=900, branch_edits=edits)
        stacked, separate = Recorded(s), Recorded(s)
        one = generate(small, inputs, mitigation=[var(), stacked], max_new_tokens=3, use_cache=use_cache)
        two = generate(small, inputs, mitigation=[var(), separate], max_new_tokens=3, use_cache=use_cache,
                       stack_main=False)
        assert torch.equal(one.new_tokens, two.new_tokens), edits
        _same_logits(stacked, separate)
        assert one.report[0]["edited"] and len(one.report[0]["layers"]) == len(two.report[0]["layers"])
        for a, b in zip(one.report[0]["layers"], two.report[0]["layers"]):  # the same rows, the same mass
            assert a["rows_edited"] == b["rows_edited"] and a["mass_moved"] == pytest.approx(b["mass_moved"], rel=1e-5)
        assert one.report[1]["stacked_with_main"] == (["noised"] if stacks else []), edits
        assert one.report[1]["branch_passes"] == (0 if stacks else 3), edits
        assert one.report[1]["branches"][0]["edits"] == (["var"] if stacks else []), edits



@pytest.mark.parametrize("stack_main", [True, False])
def test_branches_take_the_all_ones_mask_of_inputs_without_one(small, stack_main):
    # generate() takes inputs without attention_mask as unpadded (a mask of ones); the branches
    # (VCD's noised image, stacked with the main pass or not) built their prompts from the
    # inputs and failed with a KeyError on 'attention_mask'
    inputs = dict(small.prepare([random_image()], [PROMPTS[0]]))
    s = VCDSettings(alpha=3.0, beta=0.0, noise_step=900)
    masked = generate(small, inputs, mitigation=[VCD(s)], max_new_tokens=2, stack_main=stack_main)
    del inputs["attention_mask"]
    bare = generate(small, inputs, mitigation=[VCD(s)], max_new_tokens=2, stack_main=stack_main)
    assert torch.equal(bare.new_tokens, masked.new_tokens)
    assert bare.report[0]["stacked_with_main"] == (["noised"] if stack_main else [])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("mitigation", ["none", "damro", "vcd"])
def test_a_generated_image_placeholder_is_text_without_the_cache_too(family, mitigation):
    # the LM head's row of the image placeholder set to 1.5 × the row of the first token chosen,
    # so the model generates its placeholder first: with the cache a decode step embeds it as a
    # token; without it transformers re-ran the whole sequence and took it for one image slot too
    # many (a ValueError), in the main pass, alone or stacked with VCD's noised image
    lvlm = tiny_lvlm(family)
    lvlm.model.generation_config.suppress_tokens = None  # the tiny models' own config never emits it
    inputs = lvlm.prepare([random_image()], marked(lvlm, PROMPTS[:1]))
    first = int(generate(lvlm, inputs, max_new_tokens=1).new_tokens[0, 0])
    head = lvlm.model.get_output_embeddings().weight
    with torch.no_grad():
        head[lvlm.image_token_id] = 1.5 * head[first]
    cached = generate(lvlm, inputs, mitigation=mitigation, max_new_tokens=3)
    assert lvlm.image_token_id in cached.new_tokens[0].tolist()  # the case under test
    uncached = generate(lvlm, inputs, mitigation=mitigation, max_new_tokens=3, use_cache=False)
    assert torch.equal(uncached.new_tokens, cached.new_tokens)

def test_attention_capture_keeps_the_main_pass_alone(small):
    # the capture observes the main pass: a stacked forward would show it the noised rows too
    inputs = small.prepare([random_image(), random_image(1)], PROMPTS)
    s = VCDSettings(alpha=3.0, beta=0.0, noise_step=900)
    out = generate(small, inputs, mitigation=[VCD(s)], max_new_tokens=2, capture_attention=True)
    assert out.report[0]["stacked_with_main"] == [] and out.report[0]["branch_passes"] == 2
    assert out.attention.shape[:2] == (2, 2)
    assert torch.equal(out.new_tokens, generate(small, inputs, mitigation=[VCD(s)], max_new_tokens=2).new_tokens)


def test_an_owner_with_its_own_decoder_edit_keeps_a_branch_without_edits_apart():
    # nothing else composed, but the owner edits the decoder itself (block 0's output + 0.5): the
    # main pass runs that edit and a branch without edits the plain model, so the branch cannot
    # ride in the main pass's forward; its logits are the plain model's
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor, "tiny-llava")
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)

    class Shifted(Follow):
        def _install(self, run, handles):
            handles.append(run.decoder.hook("block_output", 0, lambda h: h + 0.5))

    shifted = Shifted([image_branch("same", lambda x: x.clone())])
    out = generate(lvlm, inputs, mitigation=[shifted], max_new_tokens=1)
    assert out.report[0]["stacked_with_main"] == [] and out.report[0]["branch_passes"] == 1
    assert not decoder_of(lvlm).owners()  # every function removed after the call
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
    assert torch.allclose(shifted.seen[0]["same"], plain, atol=1e-4)
    assert not torch.allclose(shifted.main[0], plain, atol=1e-3)  # the owner's edit is in the main pass
