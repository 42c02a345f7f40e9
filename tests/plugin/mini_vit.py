"""A model family from outside vsink: a minimal ViT and its adapter, registered with @family.

Loaded by tests/test_families.py through the ``vsink.backbones`` entry point of a distribution
made on the fly (tests/plugin is put on sys.path with its own ``*.dist-info``)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from vsink.plugin import Backbone, family


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MiniViT(nn.Module):
    """Patch embedding, a class token, position embedding, ``depth`` blocks, a final norm."""

    def __init__(self, size: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        self.size, self.patch = size, patch
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@family
class MiniBackbone(Backbone):
    """The adapter: everything vsink needs to know about MiniViT, in this one file."""

    family = "mini"
    spec_forms = "mini:DEPTH                        the test plugin's MiniViT with DEPTH blocks"
    saved_spec = r"mini:\d+"
    saved_spec_help = "mini:DEPTH"

    def __init__(self, model: MiniViT, spec: str = "mini:<module>"):
        super().__init__(model, spec, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), img_size=(model.size, model.size),
                         patch_size=(model.patch, model.patch))

    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        return isinstance(model, MiniViT)

    @classmethod
    def from_spec(cls, name: str, *, weights, img_size, pretrained, attn_implementation, model_kwargs) -> "MiniBackbone":
        torch.manual_seed(0)
        return cls(MiniViT(depth=int(name), **model_kwargs), f"mini:{name}")

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return self.model.blocks[0].attn.heads

    @property
    def dynamic_size(self) -> bool:
        return False

    def _token_counts(self) -> tuple[int, int]:
        return 1, 0

    def _run_model(self, pixel_values: torch.Tensor) -> Any:
        return self.model(pixel_values)

    def _mlp_out_proj(self, layer: int) -> nn.Module:
        return self.model.blocks[layer].fc2

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def _parameter_roles(self) -> dict[str, list[Optional[nn.Parameter]]]:
        return {"cls_token": [self.model.cls], "pos_embed": [self.model.pos],
                "patch_embed": list(self.model.embed.parameters())}

    def _install_attention(self, layer: int) -> Callable[[], None]:
        attn = self.model.blocks[layer].attn

        def forward(x: torch.Tensor) -> torch.Tensor:
            B, N, D = x.shape
            q, k, v = attn.qkv(x).reshape(B, N, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)
            out = self._attention(layer, q, k, v, scale=(D // attn.heads) ** -0.5)
            return attn.proj(out.transpose(1, 2).reshape(B, N, D))

        attn.forward = forward
        return lambda: attn.__dict__.pop("forward")
