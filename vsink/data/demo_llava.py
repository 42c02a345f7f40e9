"""The built-in demo LVLM (``--model demo-llava``): a small LLaVA whose mechanisms are planted.

SYNTHETIC. No pretrained LVLM can be downloaded offline and a tiny one trained on a CPU has no
visual sinks, so the demo plants the mechanisms the papers describe, end to end:

* **Vision tower** (a CLIP ViT, 224 px, 16 px patches, 4 layers): the demo's register-neuron
  circuit (see :mod:`vsink.data.demo_model`), rebuilt for CLIP — zero-mean patch filters, a
  constant on residual dimension ``TOWER_CONST_DIM`` of every patch position, and in block
  ``TOWER_PLANTED_BLOCK`` MLP neurons ``TOWER_NEURONS`` that fire on flat patches and write
  ``TOWER_WRITE`` along a unit direction :func:`tower_direction`: flat patches become high-norm
  tokens from that block on. LLaVA reads the tower's second-to-last layer, so they reach the LLM.
* **Projector**: one hidden unit reads the tower direction (firing above half the write) and
  writes onto the LLM's **sink dimensions** ``SINK_DIMS``: the tower's high-norm tokens become
  the LLM's visual sink tokens (φ on the sink dimensions far above VAR's τ = 20).
* **Language model** (Llama, hidden 1024, 4 layers): the BOS embedding carries the same sink
  dimensions (the text sink, as in Llama-2's BOS), and heads ``SINK_HEADS`` of every layer have a
  key reading them on the slowest rotary pair and a constant query bias, so sinks soak up
  attention. Every other weight is random; the layers' residual writes are scaled down so the
  planted values persist through the stack.

The text it generates is meaningless. :func:`build_demo_llava` is deterministic from ``seed``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..backbones.lvlm_families import known_sink_dims, named_lvlm

TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
             image_size=224, patch_size=16, hidden_act="relu")
TOWER_PLANTED_BLOCK = 1
TOWER_NEURONS = (0, 1)
TOWER_CONST_DIM = 0
TOWER_CONST = 3.0
TOWER_THRESHOLD = 12.8  # the layer-normalised constant above which a patch counts as flat
TOWER_GAIN = 10.0
TOWER_STEP = 3.0
TOWER_WRITE = 100.0
TEXT = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=2048, attention_bias=True)
SINK_DIMS = (37, 611)
SINK_VALUES = (100.0, 50.0)  # on SINK_DIMS, at BOS and at fully written image tokens
SINK_HEADS = (0, 1)
SINK_KEY_GAIN = 1.0
SINK_QUERY_BIAS = 4.0
PROJECTOR_UNIT = 0
RESIDUAL_SCALE = 0.1
SEED = 0
#: the spec and the model name (``config.name_or_path``) of the demo
SPEC = "demo-llava"
NAME = "vsink/demo-llava"
NOTE = "a small LLaVA with planted register neurons, visual sinks and sink dimensions (see docs/lvlm.md)"

known_sink_dims(NAME, SINK_DIMS)


def tower_direction(seed: int = SEED) -> torch.Tensor:
    """The unit direction the tower's planted neurons write along (zero on the constant dim)."""
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(TOWER["hidden_size"], generator=g)
    u[TOWER_CONST_DIM] = 0.0
    return u / u.norm()


@torch.no_grad()
def _plant_tower(tower: torch.nn.Module, g: torch.Generator, u: torch.Tensor) -> None:
    owner = getattr(tower, "vision_model", tower)
    emb = owner.embeddings
    w = torch.randn(emb.patch_embedding.weight.shape, generator=g)
    w = w - w.mean(dim=(2, 3), keepdim=True)  # zero-mean filters: a flat patch embeds to ~0
    w = w / w.std() * 0.1
    w[TOWER_CONST_DIM] = 0.0
    emb.patch_embedding.weight.copy_(w)
    emb.position_embedding.weight[1:, TOWER_CONST_DIM] = TOWER_CONST  # patch positions (0 is the class token)
    emb.position_embedding.weight[0, TOWER_CONST_DIM] = -TOWER_CONST
    for layer in owner.encoder.layers:
        layer.self_attn.out_proj.weight.mul_(RESIDUAL_SCALE)
        layer.mlp.fc2.weight.mul_(RESIDUAL_SCALE)
    mlp = owner.encoder.layers[TOWER_PLANTED_BLOCK].mlp
    on, off = TOWER_NEURONS
    for n in TOWER_NEURONS:
        mlp.fc1.weight[n].zero_()
        mlp.fc1.weight[n, TOWER_CONST_DIM] = TOWER_GAIN
        mlp.fc1.bias[n] = -TOWER_GAIN * TOWER_THRESHOLD - (TOWER_STEP if n == off else 0.0)
    mlp.fc2.weight[:, on] = u * TOWER_WRITE / TOWER_STEP
    mlp.fc2.weight[:, off] = -u * TOWER_WRITE / TOWER_STEP


@torch.no_grad()
def _plant_language_model(model: torch.nn.Module, bos_id: int, text: dict[str, Any]) -> None:
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.language_model.model
    emb = lm.embed_tokens.weight
    for d, value in zip(SINK_DIMS, SINK_VALUES):
        emb[bos_id, d] = value
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    groups = text["num_attention_heads"] // text["num_key_value_heads"]
    slow = head_dim // 2 - 1  # the slowest rotary pair: (slow, slow + head_dim / 2)
    for layer in lm.layers:
        attn = layer.self_attn
        attn.o_proj.weight.mul_(RESIDUAL_SCALE)
        layer.mlp.down_proj.weight.mul_(RESIDUAL_SCALE)
        for h in SINK_HEADS:
            q_row, k_row = h * head_dim + slow, (h // groups) * head_dim + slow
            attn.q_proj.weight[q_row].zero_()
            attn.q_proj.bias[q_row] = SINK_QUERY_BIAS
            attn.k_proj.weight[k_row].zero_()
            for d in SINK_DIMS:
                attn.k_proj.weight[k_row, d] = SINK_KEY_GAIN
            attn.k_proj.bias[k_row] = 0.0


@torch.no_grad()
def _plant_projector(model: torch.nn.Module, u: torch.Tensor) -> None:
    proj = model.model.multi_modal_projector if hasattr(model.model, "multi_modal_projector") else model.multi_modal_projector
    half = TOWER_WRITE / 2
    proj.linear_1.weight[PROJECTOR_UNIT] = u
    proj.linear_1.bias[PROJECTOR_UNIT] = -half  # fires above half the write: (u·x − 50)+ ∈ [0, 50]
    proj.linear_2.weight[:, PROJECTOR_UNIT] = 0.0
    for d, value in zip(SINK_DIMS, SINK_VALUES):
        proj.linear_2.weight[d, PROJECTOR_UNIT] = value / half


def build_demo_llava(seed: int = SEED, *, layers: int = TEXT["num_hidden_layers"],
                     image_size: int = TOWER["image_size"], patch_size: int = TOWER["patch_size"]) -> tuple[Any, Any]:
    """(``LlavaForConditionalGeneration``, ``LlavaProcessor``) with the planted mechanisms; ``layers``,
    ``image_size`` and ``patch_size`` resize it (``layers=12, image_size=336, patch_size=14``: a
    LLaVA-1.5-shaped prompt of 576 image tokens, for benchmarks)."""
    import transformers as tr

    from .demo_lvlm import llava_processor, word_tokenizer

    tok = word_tokenizer(("<image>",))
    torch.manual_seed(seed)
    text_sizes = {**TEXT, "num_hidden_layers": layers}
    text = tr.LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **text_sizes)
    vision = tr.CLIPVisionConfig(**{**TOWER, "image_size": image_size, "patch_size": patch_size})
    config = tr.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=-2, vision_feature_select_strategy="default",
                            projector_hidden_act="relu")
    config.name_or_path = NAME
    model = tr.LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    u = tower_direction(seed)
    tower = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.vision_tower
    _plant_tower(tower, g, u)
    _plant_projector(model, u)
    _plant_language_model(model, tok.bos_token_id, text_sizes)
    return model, llava_processor(tok, image_size, patch_size)


@named_lvlm(SPEC, "the built-in synthetic LLaVA with planted register neurons, visual sinks and sink dimensions "
                  "(offline; docs/lvlm.md)", scan_prompt="describe the image")
def demo_llava(*, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Any:
    """The demo as an :class:`~vsink.backbones.hf_lvlm.LVLM` (``load_lvlm("demo-llava")``)."""
    from ..backbones.hf_lvlm import LVLM

    model, processor = build_demo_llava()
    return LVLM(model.to(device=device, dtype=dtype), processor, SPEC, synthetic=NOTE)
