"""Branches in the substrate (vsink.lvlm.branches): each branch decodes as the model itself would on
its prompt (own cache, the model's own position ids, M-RoPE included), stacked branches equal
separate ones, readouts equal transformers' hidden states, edits apply where recorded."""

from dataclasses import dataclass

import pytest
import torch

from vsink.data.demo_lvlm import build_tiny_llava
from vsink.errors import VsinkError
from vsink.lvlm import LVLM, generate
from vsink.mitigate.branch import Branch, image_branch, readout_branch, text_branch, text_only
from vsink.mitigate import PAI, PAISettings, Mitigation

from lvlm_models import FIRST_FAMILIES, PROMPTS, random_image, tiny_lvlm

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
def test_an_identity_image_branch_decodes_as_the_main_pass(lvlm, use_cache):
    # the image "transformed" by the identity is the prompt itself: the branch's own cache and
    # position ids (LLaVA: from the padding mask; Qwen2-VL: the model's get_rope_index) must give
    # the main pass's logits at every step, left padding included
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    follow = Follow([image_branch("same", lambda x: x.clone())], follow="same")
    out = generate(lvlm, inputs, mitigation=[follow], max_new_tokens=4, use_cache=use_cache)
    plain = generate(lvlm, inputs, max_new_tokens=4)
    assert torch.equal(out.new_tokens, plain.new_tokens)
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
    out = generate(lvlm, inputs, mitigation=[two], max_new_tokens=3)
    assert out.report[0]["branch_passes"] == 3  # one stacked pass per step, not two
    one = Follow([image_branch("b", lambda x: x * 0.5)])
    generate(lvlm, inputs, mitigation=[one], max_new_tokens=3)
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
