"""A small ViT with a planted *linear-path* defect, the case SINDER's weight-only direction is
built for (docs/finetune.md, SINDER repair; the demo model's mechanism is nonlinear and invisible
to it, docs/defect.md).

Construction (:func:`build_planted_defect_model`, a timm ``VisionTransformer`` of width 64, 3
blocks, 8-pixel patches, 80×80 input; deterministic from ``seed``):

* every matrix ~N(0, 0.002²), so attention and the other MLP units are nearly off;
* the patch embedding maps a patch's channel-0 sum to ``10/64·b`` per pixel: a patch whose
  normalised channel 0 is 1 gets ``10·b``; the position embeddings (std 1) have no ``b`` and no
  ``u`` component;
* MLP unit 0 of block 0 reads ``b`` (fc1 row ``b``, bias 0) and writes ``40·u`` (fc2 column).

After norm2 a lit patch has ``b·x ≈ 6`` and a dark one ``≈ 0``, so lit patches get ``≈ 240·u``
(norm ~250 against ~8 for the others): their |cos| with ``u`` is ≈ 1, the others' ≈ 0. Linearised
on N(0, I) inputs, GELU's least-squares slope is 1/2, so block 0 is ``I + 20·u·(centred b)ᵀ`` plus
small terms, whose top left singular vector is ``u``: the weight-only defect direction.
:func:`planted_defect_images` makes images with 3 lit interior patches each.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

WIDTH, DEPTH, PATCH, SIZE = 64, 3, 8, 80
#: the timm constructor arguments of the planted model
MODEL_KWARGS = {"patch_size": PATCH, "depth": DEPTH, "embed_dim": WIDTH, "num_heads": 4, "num_classes": 0}
TIMM_NAME = "deit_tiny_patch16_224"


def planted_vectors(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, b): unit vectors, ``b`` zero-mean (a LayerNorm's centring keeps it), ``u ⟂ b``."""
    g = torch.Generator().manual_seed(seed)
    u, b = torch.randn(2, WIDTH, generator=g)
    b = b - b.mean()
    b = b / b.norm()
    u = u - (u @ b) * b
    return u / u.norm(), b


def build_planted_defect_model(seed: int = 5) -> torch.nn.Module:
    """The planted model (module docstring), in eval mode."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=SIZE, **MODEL_KWARGS)
    u, b = planted_vectors(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
        pos = torch.randn(model.pos_embed.shape, generator=g)
        pos = pos - (pos @ b)[..., None] * b
        model.pos_embed.copy_(pos - (pos @ u)[..., None] * u)
        model.patch_embed.proj.weight[:, 0] += 10.0 * b[:, None, None] / PATCH ** 2
        mlp = model.blocks[0].mlp
        mlp.fc1.weight[0] = b
        mlp.fc2.weight[:, 0] = 40.0 * u
    return model.eval()


def planted_defect_images(n: int, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> list[Image.Image]:
    """``n`` RGB images whose pixels, normalised with ``mean`` / ``std``, are 0 except channel 0 = 1
    on 3 interior patches each (chosen at random from the 8×8 interior of the 10×10 grid)."""
    g = torch.Generator().manual_seed(seed)
    grid = SIZE // PATCH
    x = torch.zeros(n, 3, SIZE, SIZE)
    for i in range(n):
        for c in torch.randperm((grid - 2) ** 2, generator=g)[:3].tolist():
            r, col = 1 + c // (grid - 2), 1 + c % (grid - 2)
            x[i, 0, r * PATCH:(r + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = 1.0
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    pixels = ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
