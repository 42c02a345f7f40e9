"""The built-in demo: a small timm ViT whose weights carry the high-norm mechanism by construction.

SYNTHETIC. No pretrained weights are reachable offline, and tiny ViTs trained for minutes on a
CPU do not develop high-norm tokens. So the demo plants the circuit Jiang et al. (2025) found in
CLIP and DINOv2: a few MLP "register neurons" that fire on low-information patches and write a
large vector into the residual stream, which later heads then attend to.

Construction (all deterministic from ``seed``; every other weight is timm's random init):

* **Patch embedding** — zero-mean (per channel) random 16x16 filters: a flat patch embeds to
  about zero whatever its colour; a textured patch gets a large response ("texture energy").
* **Constant feature** — the position embedding writes ``CONST_VALUE`` into residual dimension
  ``CONST_DIM`` of every patch token (not the class token). After a block's LayerNorm that
  dimension is large exactly when nothing else is in the token, i.e. on flat patches.
* **Register neurons** — block ``PLANTED_BLOCK`` (0-based), MLP hidden units ``PLANTED_NEURONS``:
  ``fc1`` reads the normalised constant dimension with threshold ``NEURON_THRESHOLD``; ``fc2``
  writes ``WRITE_NORM`` (in total, at activation ``NEURON_GAIN * (LN - threshold)``) along a
  fixed unit direction ``u``. Flat patches therefore become high-norm tokens from the output of
  block ``PLANTED_BLOCK`` on (about 10x the median patch norm).
* **Sinks** — in blocks ``SINK_BLOCKS``, heads ``SINK_HEADS`` get keys that read ``u`` and a
  constant query bias, so every query attends strongly to the high-norm tokens.

:func:`planted_direction` returns ``u``; :func:`expected_outliers` is not provided on purpose —
tests recover the answer from the model (neuron activations) independently of vsink's detector.
"""

from __future__ import annotations

from typing import Any

import torch

DEMO_CONFIG: dict[str, Any] = dict(
    img_size=224, patch_size=16, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0,
    num_classes=0, global_pool="token",
)
PLANTED_BLOCK = 2
PLANTED_NEURONS = (0, 1, 2, 3)
SINK_BLOCKS = (3, 4, 5)
SINK_HEADS = (0, 1)
CONST_DIM = 0
CONST_VALUE = 3.0
FILTER_STD = 0.1
RESIDUAL_SCALE = 0.25
NEURON_THRESHOLD = 12.8
NEURON_GAIN = 10.0
NEURON_STEP = 3.0
WRITE_NORM = 100.0
SINK_KEY_GAIN = 2.5
SINK_QUERY_BIAS = 2.0
SEED = 0


def planted_direction(embed_dim: int = DEMO_CONFIG["embed_dim"], seed: int = SEED) -> torch.Tensor:
    """The unit residual direction the planted neurons write along (zero on ``CONST_DIM``)."""
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(embed_dim, generator=g)
    u[CONST_DIM] = 0.0
    return u / u.norm()


@torch.no_grad()
def build_demo_model(seed: int = SEED, **overrides: Any) -> torch.nn.Module:
    """Build the demo ViT (a timm ``VisionTransformer``) with the planted circuit."""
    import timm

    cfg = {**DEMO_CONFIG, **overrides}
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)
    model.eval()
    dim = cfg["embed_dim"]
    g = torch.Generator().manual_seed(seed)

    proj = model.patch_embed.proj
    w = torch.randn(proj.weight.shape, generator=g)
    w = w - w.mean(dim=(2, 3), keepdim=True)
    w = w / w.std() * FILTER_STD
    w[CONST_DIM] = 0.0
    proj.weight.copy_(w)
    proj.bias.zero_()

    prefix = model.num_prefix_tokens
    model.pos_embed[:, prefix:, CONST_DIM] = CONST_VALUE
    model.pos_embed[:, :prefix, CONST_DIM] = 0.0
    model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=g) * 0.02)
    model.cls_token[..., CONST_DIM] = -CONST_VALUE

    for blk in model.blocks:
        blk.attn.proj.weight.mul_(RESIDUAL_SCALE)
        blk.mlp.fc2.weight.mul_(RESIDUAL_SCALE)

    u = planted_direction(dim, seed)
    mlp = model.blocks[PLANTED_BLOCK].mlp
    on, off = PLANTED_NEURONS[: len(PLANTED_NEURONS) // 2], PLANTED_NEURONS[len(PLANTED_NEURONS) // 2:]
    for n in PLANTED_NEURONS:
        mlp.fc1.weight[n].zero_()
        mlp.fc1.weight[n, CONST_DIM] = NEURON_GAIN
        mlp.fc1.bias[n] = -NEURON_GAIN * NEURON_THRESHOLD - (NEURON_STEP if n in off else 0.0)
        sign = 1.0 if n in on else -1.0
        mlp.fc2.weight[:, n] = sign * u * WRITE_NORM / (len(on) * NEURON_STEP)

    for b in SINK_BLOCKS:
        attn = model.blocks[b].attn
        head_dim = dim // attn.num_heads
        for h in SINK_HEADS:
            q_row, k_row = h * head_dim, dim + h * head_dim
            attn.qkv.weight[q_row].zero_()
            attn.qkv.bias[q_row] = SINK_QUERY_BIAS
            attn.qkv.weight[k_row] = u * SINK_KEY_GAIN
            attn.qkv.bias[k_row] = 0.0
    return model
