"""Observe and edit a model through vsink's sites: any timm, open_clip or HF vision model.

Builds a small timm DINOv2-with-registers model with random weights (no download), then:
1. reads register and patch norms of a middle block through the TokenLayout;
2. captures the attention probabilities of the last block (exactly timm's own attention);
3. edits attention: blocks every query from attending to the registers in all blocks.
"""

import timm
import torch

import vsink

model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=98, num_classes=0)
backbone = vsink.wrap(model.eval())
layout = backbone.layout()
print(layout.describe())
x = torch.randn(2, 3, 98, 98)

norms = {}
handle = backbone.hook("block_output", 6, lambda h: norms.update(
    {k: v.norm(dim=-1).mean().item() for k, v in layout.split(h).items()}))
backbone.forward(x)
handle.remove()
print("mean norms at block 6:", norms)

blocks = []
handle = backbone.hook("attn_probs", -1, lambda p, start, logits: blocks.append(p))
backbone.forward(x)
handle.remove()
attention = torch.cat(blocks, dim=2)  # [batch, heads, queries, keys]
print("last block: attention received by the registers:",
      attention[..., layout.register_indices()].sum(-1).mean().item())

registers = layout.register_indices()


def no_registers(logits, start):
    logits[..., registers] = float("-inf")
    return logits


handles = [backbone.hook("attn_logits", i, no_registers) for i in range(backbone.num_layers)]
edited = backbone.forward(x)
for h in handles:
    h.remove()
print("output change without register attention:", (edited - backbone.forward(x)).abs().max().item())
