"""DoLa for LVLMs against transformers 4.46.3's built-in ``_dola_decoding`` (the reference; later
releases fetch DoLa from the Hub). The tiny LLaVA's language model is saved as a
LlamaForCausalLM, fed the LLaVA prompt's input embeddings (image features merged) and decoded by
4.46.3's ``generate(dola_layers=...)`` in a subprocess with that release on its path; vsink's
DoLa on the LLaVA must give the same tokens. The 4.46.3 tokens are stored in
tests/data/dola_golden.json (regenerated and compared when the release is installed: set
VSINK_TRANSFORMERS_446 to its folder, default /tmp/tf446)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.data.demo_lvlm import build_tiny_llava, build_tiny_qwen2_vl
from vsink.lvlm import LVLM, generate
from conftest import sharpen
from vsink.mitigate.dola import candidate_layers, divergences, dola_scores, relative_top_filter

pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")
PROMPTS = ["is there a cat ?", "describe this image please , what color is the sky ?"]
GOLDEN = Path(__file__).parent / "data" / "dola_golden.json"
OVERLAY = Path(os.environ.get("VSINK_TRANSFORMERS_446", "/tmp/tf446"))
TOKENS = 6
#: name -> (batch rows, dola_layers as transformers takes them, vsink settings)
CASES = {
    # three candidates over a left-padded batch: transformers picks one layer by the batch mean (official)
    "even_batch": ([0, 1], [0, 2, 4], {"candidate_layers": [0, 2, 4]}),
    # transformers' "low" bucket on 6 untied layers: range(0, 3, 2) = [0, 2]; one row, per-row = batch mean
    "low_row0": ([0], "low", {"candidates": "low"}),
    "high_row1": ([1], "high", {"candidates": "high"}),  # range(3, 6, 2) = [3, 5]
    "single_row1": ([1], [2], {"candidate_layers": [2]}),  # one candidate: no divergence, the contrast only
}


def _image(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _redraw(model, seed=0):
    """Every weight from one seeded generator (matrices by ``sharpen``; norms 1; other vectors —
    biases, CLIP's class embedding — small draws), so the model, and the golden tokens, do not
    depend on how a transformers release initialises it."""
    sharpen(model, std=0.15, seed=seed)  # larger weights: the layers disagree, so DoLa picks other tokens than greedy
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2:
                p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.fixture(scope="module")
def llava():
    model, processor = build_tiny_llava(layers=6)
    return LVLM(_redraw(model), processor, "tiny-llava-6")


def _inputs(llava):
    return llava.prepare([_image(), _image(1)], PROMPTS)


def _vsink_tokens(llava, inputs, rows, settings):
    sub = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if len(rows) == 1:  # the row alone, its padding removed as the processor would
        keep = sub["attention_mask"][0].bool()
        sub["input_ids"], sub["attention_mask"] = sub["input_ids"][:, keep], sub["attention_mask"][:, keep]
    # official: transformers' batch-mean choice of the premature layer (equal to per row for one row)
    return generate(llava, sub, mitigation="dola", settings=settings, protocol="official",
                    max_new_tokens=TOKENS).new_tokens.tolist()


def test_candidate_buckets_follow_transformers_4463():
    # _dola_decoding: untied → start 0; tied → 2 (1 for two layers); low = range(start, n//2, 2), high = range(n//2, n, 2)
    assert candidate_layers(32, "low", tied=False) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert candidate_layers(32, "low", tied=True) == [2, 4, 6, 8, 10, 12, 14]
    assert candidate_layers(32, "high", tied=False) == list(range(16, 32, 2))
    assert candidate_layers(48, "low", tied=False) == list(range(0, 20, 2))  # over 40 layers: below 20
    assert candidate_layers(48, "high", tied=False) == list(range(28, 48, 2))
    assert candidate_layers(4, "low", tied=True) == [2]  # start == n // 2: that one layer
    assert candidate_layers(32, "even", tied=False) == list(range(0, 32, 2))  # HALC: 0, 2, ..., 30


def test_the_rule_by_hand():
    # final p = [0.7, 0.2, 0.1], relative_top 0.25 keeps p >= 0.175: tokens 0 and 1
    final = torch.tensor([[0.7, 0.2, 0.1]]).log()
    early = torch.tensor([[0.8, 0.1, 0.1]]).log()
    f, b = relative_top_filter(final, early, 0.25)
    assert torch.isinf(f[0, 2]) and b[0, 2].item() == pytest.approx(-1e-3)
    out, chosen = dola_scores(final, early[None], 0.25, batch_mean=False)
    assert out[0, 0].item() == pytest.approx(math.log(0.7 / 0.8)) and out[0, 1].item() == pytest.approx(math.log(2))
    assert out.argmax().item() == 1 and chosen.tolist() == [0]
    # the divergence: m = mean of the two; 0.5·(Σ m log(m/p_f) + Σ m log(m/p_e)) / V
    far = torch.tensor([[0.1, 0.1, 0.8]]).log()
    m = [(0.7 + 0.1) / 2, (0.2 + 0.1) / 2, (0.1 + 0.8) / 2]
    pf, pe = [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]
    want = 0.5 * (sum(mi * math.log(mi / a) for mi, a in zip(m, pf)) + sum(mi * math.log(mi / a) for mi, a in zip(m, pe))) / 3
    js = divergences(final, torch.stack([early, far]))
    assert js[1, 0].item() == pytest.approx(want, rel=1e-5) and js[1, 0] > js[0, 0]
    _, chosen = dola_scores(final, torch.stack([early, far]), 0.25, batch_mean=False)
    assert chosen.tolist() == [1]  # the furthest candidate is the premature layer


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_per_row_choice_makes_a_batch_equal_its_rows(family):
    from vsink.data.demo_lvlm import build_tiny_llava_next

    builders = {"llava_next": build_tiny_llava_next, "qwen2_vl": build_tiny_qwen2_vl,
                "qwen2_5_vl": lambda: build_tiny_qwen2_vl(version="2.5")}
    model, processor = builders[family]()
    lvlm = LVLM(model, processor, f"tiny-{family}")
    images = [_image(), _image(1)]
    inputs = lvlm.prepare(images, PROMPTS)
    for use_cache in (True, False):
        batch = generate(lvlm, inputs, mitigation="dola", max_new_tokens=4, use_cache=use_cache)
        for b in range(2):
            alone = generate(lvlm, lvlm.prepare([images[b]], [PROMPTS[b]]), mitigation="dola", max_new_tokens=4,
                             use_cache=use_cache)
            assert torch.equal(alone.new_tokens[0], batch.new_tokens[b, :alone.new_tokens.shape[1]])
    steps = batch.report[0]["steps"]
    assert len(steps) == 4 and all(sum(v for k, v in s.items() if k.startswith("premature_layer_")) == 2 for s in steps)


def _reference_tokens(llava, tmp_path):
    """Run transformers 4.46.3's DoLa on the LLaVA's language model (see the module docstring)."""
    from safetensors.torch import save_file

    model = llava.model
    inputs = _inputs(llava)
    grabbed = {}
    language = model.model.language_model
    hook = language.register_forward_pre_hook(lambda m, a, kw: grabbed.update(embeds=kw["inputs_embeds"].clone()),
                                              with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    folder = tmp_path / "llama"
    folder.mkdir()
    weights = {("model." + k): v.contiguous() for k, v in language.state_dict().items()}
    weights["lm_head.weight"] = model.lm_head.weight.detach().contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    c = llava.text_config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": c.hidden_act,
              "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
              "rope_theta": getattr(c, "rope_parameters", None) and c.rope_parameters["rope_theta"] or c.rope_theta,
              "tie_word_embeddings": False,
              "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    spec = {"embeds": grabbed["embeds"], "mask": inputs["attention_mask"], "max_new_tokens": TOKENS,
            "cases": {name: {"rows": rows, "layers": layers} for name, (rows, layers, _) in CASES.items()}}
    torch.save(spec, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": str(OVERLAY)}
    subprocess.run([sys.executable, str(Path(__file__).parent / "dola_reference.py"), str(folder),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.json")], check=True, env=env, timeout=300)
    return json.loads((tmp_path / "out.json").read_text())


def test_vsink_dola_equals_transformers_4463_token_for_token(llava):
    golden = json.loads(GOLDEN.read_text())
    inputs = _inputs(llava)
    greedy = generate(llava, inputs, max_new_tokens=TOKENS).new_tokens.tolist()
    assert golden["even_batch"] != greedy  # DoLa changes the tokens on this model
    for name, (rows, _, settings) in CASES.items():
        assert _vsink_tokens(llava, inputs, rows, settings) == golden[name], name


@pytest.mark.skipif(not (OVERLAY / "transformers" / "__init__.py").exists(),
                    reason="transformers 4.46.3 not installed at VSINK_TRANSFORMERS_446; the stored golden tokens "
                           "are compared by the test above")
def test_the_stored_golden_tokens_are_transformers_4463s(llava, tmp_path):
    assert _reference_tokens(llava, tmp_path) == json.loads(GOLDEN.read_text())


def test_dola_plus_var_reads_every_layer_out_of_the_var_edited_pass(llava):
    from test_branches import Follow
    from vsink.mitigate import VAR, VARSettings
    from vsink.mitigate.branch import readout_branch

    inputs = _inputs(llava)
    var = {"sink_dims": [3, 7], "tau": 1.0, "rho": 1.0, "min_image": 0.0}  # loose: VAR edits the tiny model
    n = llava.num_layers

    class ByHand(Follow):  # the rule written out on readouts of the same pass
        def combine(self, step, logits, branches):
            super().combine(step, logits, branches)
            premature = torch.stack([branches[f"l{j}"] for j in (0, 2, 4)])
            return dola_scores(branches["final"], premature, 0.1, batch_mean=False)[0]

    def hand():
        return ByHand([readout_branch("final", n), *(readout_branch(f"l{j}", j, norm=False) for j in (0, 2, 4))])

    with_var = hand()
    expected = generate(llava, inputs, mitigation=[VAR(VARSettings(**var)), with_var], max_new_tokens=4)
    out = generate(llava, inputs, mitigation="var+dola", settings={"var": var, "dola": {"candidate_layers": [0, 2, 4]}},
                   max_new_tokens=4)
    assert torch.equal(out.new_tokens, expected.new_tokens)
    assert out.report[0]["edited"] and out.report[1]["branches"][1] == {"name": "layer0", "kind": "readout",
                                                                       "edits": ["var"], "layer": 0}
    plain = hand()
    generate(llava, inputs, mitigation=[plain], max_new_tokens=1)
    assert torch.equal(with_var.seen[0]["l0"], plain.seen[0]["l0"])  # the embeddings: before any edit
    assert not torch.allclose(with_var.seen[0]["l4"], plain.seen[0]["l4"], atol=1e-4)  # VAR edited layers 2, 3
    with torch.no_grad():  # and the final readout is the model's own logits
        final = llava.model(**inputs).logits[:, -1]
    assert torch.allclose(plain.seen[0]["final"], final, atol=1e-5)
