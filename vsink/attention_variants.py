"""Sink-free attention variants for timm ViT blocks (``model.attention`` of the training recipes).

Each variant replaces how a row of attention logits ``s = (q·scale)·kᵀ`` becomes weights over the
keys (docs/finetune.md, *Attention variants*; formulas from the cards in REFERENCES):

``softmax``     ``softmax(s)`` (the model's own attention);
``gated``       softmax attention whose output (per head and channel, before ``proj``) is multiplied by
                ``sigmoid(x·W_g + b_g)`` of the block's normalised input (Qiu et al. 2025, element-wise);
``softpick``    ``relu(eˢ − 1) / (Σ|eˢ − 1| + ε)``, ε = 1e-8, max-shifted; masked entries add nothing
                (zaydzuhri/softpick-attention); rows sum to at most 1;
``clipped``     ``clip((ζ − γ)·softmax(s) + γ, 0, 1)`` with γ = −0.025, ζ = 1 (Bondarenko et al. 2023, BERT);
``sigmoid``     ``sigmoid(s + b)`` with b = −log n, n the number of keys (Ramapuram et al. 2024);
``sink_logit``  softmax over the row with one learnable logit per head appended, that column dropped
                (gpt-oss); rows sum to less than 1;
``kv_bias``     a learnable key k′ and value v′ per head at position 0 seen by every query (Sun et al.
                2024, init N(0, 0.02²)); the weights over the image tokens are the softmax over
                ``[q·k′·scale, s]`` without the first column, and ``p₀·v′`` is added to the output.

:func:`apply_attention` swaps every block's ``attn`` for a :class:`VariantAttention` that keeps the
original submodules (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``: same state-dict keys) and
adds the variant's parameters. Started from pretrained weights (``start="pretrained"``), the gate
opens (W_g = 0, b_g = 10: sigmoid 0.99995) and the sink logit starts at −30 (e^−30 ≈ 1e−13 of a row:
−∞ to float32, finite so the model can be saved); the other variants change every row and cannot
start from the pretrained model.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VsinkError

VARIANTS = ("softmax", "gated", "softpick", "clipped", "sigmoid", "sink_logit", "kv_bias")
#: the variants a pretrained model can start from unchanged (with their parameters at the start values)
FROM_PRETRAINED = ("softmax", "gated", "sink_logit")
#: the variants whose rows over the image tokens sum to 1
ROWS_SUM_TO_ONE = ("softmax", "gated")
SOFTPICK_EPS = 1e-8
CLIP_GAMMA, CLIP_ZETA = -0.025, 1.0
GATE_OPEN_BIAS = 10.0
SINK_CLOSED = -30.0
KV_BIAS_STD = 0.02

#: (logits [B, H, n, N], first query row of the block) → weights [B, H, n, N]
Normaliser = Callable[[torch.Tensor, int], torch.Tensor]


def softpick(s: torch.Tensor, eps: float = SOFTPICK_EPS) -> torch.Tensor:
    """``relu(eˢ − 1) / (Σ|eˢ − 1| + ε)`` over the last axis, max-shifted (numerator and sum times
    e^−max); entries at −∞ (masked) contribute 0."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = torch.exp(s - m) - torch.exp(-m)
    total = torch.where(torch.isfinite(s), shifted.abs(), torch.zeros_like(shifted)).sum(-1, keepdim=True)
    return F.relu(shifted) / (total + eps)


def clipped_softmax(s: torch.Tensor, gamma: float = CLIP_GAMMA, zeta: float = CLIP_ZETA) -> torch.Tensor:
    """``clip((ζ − γ)·softmax(s) + γ, 0, 1)``."""
    return ((zeta - gamma) * s.softmax(dim=-1) + gamma).clamp(0.0, 1.0)


def sigmoid_attention(s: torch.Tensor) -> torch.Tensor:
    """``sigmoid(s − log n)``, n the number of keys (the last axis)."""
    return torch.sigmoid(s - math.log(s.shape[-1]))


def with_extra_logit(s: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over ``[extra, s]`` per row (``extra`` [..., n] broadcast to the rows): the weights
    over ``s``'s columns and the extra column's weight [..., n]."""
    full = torch.cat([extra.unsqueeze(-1).to(s.dtype), s], dim=-1).softmax(dim=-1)
    return full[..., 1:], full[..., 0]


class VariantAttention(nn.Module):
    """timm's ``Attention`` with another normalisation (module docstring); routed through vsink's
    explicit attention while a site function is installed, with the same weights."""

    def __init__(self, attn: nn.Module, variant: str, *, start: str = "scratch"):
        super().__init__()
        if variant not in VARIANTS:
            raise VsinkError(f"model.attention {variant!r} is not one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.num_heads = int(attn.num_heads)
        self.head_dim = attn.qkv.out_features // (3 * self.num_heads)
        self.scale = float(attn.scale)
        self.fused_attn = False
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        dim, width = attn.qkv.in_features, self.num_heads * self.head_dim
        ref = attn.qkv.weight
        if variant == "gated":
            self.gate = nn.Linear(dim, width, device=ref.device, dtype=ref.dtype)
            if start == "pretrained":
                with torch.no_grad():
                    self.gate.weight.zero_()
                    self.gate.bias.fill_(GATE_OPEN_BIAS)
        elif variant == "sink_logit":
            value = SINK_CLOSED if start == "pretrained" else 0.0
            self.sink = nn.Parameter(torch.full((self.num_heads,), value, device=ref.device, dtype=ref.dtype))
        elif variant == "kv_bias":
            self.k_bias = nn.Parameter(torch.randn(self.num_heads, self.head_dim, device=ref.device, dtype=ref.dtype)
                                       * KV_BIAS_STD)
            self.v_bias = nn.Parameter(torch.randn(self.num_heads, self.head_dim, device=ref.device, dtype=ref.dtype)
                                       * KV_BIAS_STD)

    @property
    def rows_sum_to_one(self) -> bool:
        return self.variant in ROWS_SUM_TO_ONE

    def normaliser(self, q: torch.Tensor) -> tuple[Normaliser, Optional[torch.Tensor]]:
        """The row normalisation for queries ``q`` [B, H, N, d] and, for ``kv_bias``, the buffer
        [B, H, N] it fills with the bias key's weight per query."""
        v = self.variant
        if v == "softpick":
            return (lambda s, start: softpick(s)), None
        if v == "clipped":
            return (lambda s, start: clipped_softmax(s)), None
        if v == "sigmoid":
            return (lambda s, start: sigmoid_attention(s)), None
        if v == "sink_logit":
            sink = self.sink.view(1, -1, 1)
            return (lambda s, start: with_extra_logit(s, sink.expand(s.shape[:-1]))[0]), None
        if v == "kv_bias":
            extra = ((q * self.scale) * self.k_bias[None, :, None, :]).sum(-1)  # [B, H, N]
            kept = torch.empty_like(extra)

            def normalise(s: torch.Tensor, start: int) -> torch.Tensor:
                n = s.shape[-2]
                probs, first = with_extra_logit(s, extra[:, :, start:start + n])
                kept[:, :, start:start + n] = first.to(kept.dtype)
                return probs

            return normalise, kept
        return (lambda s, start: s.softmax(dim=-1)), None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                route: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
        """``route(q, k, v, scale=, mask=, normalise=)`` computes the attention through vsink's
        sites (the backbone passes it while a site function is installed)."""
        from .attention import additive_mask

        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = additive_mask(attn_mask, q.dtype, true_means_keep=True)
        if is_causal:
            causal = torch.full((N, N), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            mask = causal if mask is None else mask + causal
        normalise, first = self.normaliser(q)
        if route is not None:
            out = route(q, k, v, scale=self.scale, mask=mask, normalise=normalise)
        else:
            s = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                s = s + mask
            out = self.attn_drop(normalise(s, 0)) @ v
        if first is not None:
            out = out + first.unsqueeze(-1).to(out.dtype) * self.v_bias[None, :, None, :]
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        if self.variant == "gated":
            out = out * torch.sigmoid(self.gate(x))
        return self.proj_drop(self.proj(out))


def apply_attention(model: nn.Module, variant: str, *, start: str = "scratch") -> nn.Module:
    """Swap every block's timm ``Attention`` of ``model`` for :class:`VariantAttention` (in place;
    ``softmax`` leaves the model as it is). ``start="pretrained"`` refuses the variants that
    cannot start from the pretrained weights (:data:`FROM_PRETRAINED`)."""
    from timm.layers import Attention

    if variant not in VARIANTS:
        raise VsinkError(f"model.attention {variant!r} is not one of {', '.join(VARIANTS)}")
    if start == "pretrained" and variant not in FROM_PRETRAINED:
        raise VsinkError(f"model.attention {variant!r} changes every attention row, so it cannot start from pretrained "
                         f"weights (posthoc); use the scratch recipe, or one of {', '.join(FROM_PRETRAINED)}")
    if variant == "softmax":
        return model
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise VsinkError(f"model.attention {variant!r}: {type(model).__name__} has no timm blocks")
    for i, block in enumerate(blocks):
        if type(block.attn) is not Attention:
            raise VsinkError(f"model.attention {variant!r}: block {i} attention ({type(block.attn).__name__}) is not "
                             "timm's standard Attention")
        block.attn = VariantAttention(block.attn, variant, start=start)
    return model


def attention_variant(model: nn.Module) -> str:
    """The variant of a model's blocks (``softmax`` when none was swapped in)."""
    for block in getattr(model, "blocks", ()):
        if isinstance(getattr(block, "attn", None), VariantAttention):
            return block.attn.variant
    return "softmax"


def attention_report(model: nn.Module) -> dict[str, object]:
    """``{"variant": ..., "rows_sum_to_one": bool}`` for scan and maps settings: a variant whose
    rows over the tokens do not sum to 1 is reported so, its weights never renormalised."""
    variant = attention_variant(model)
    return {"variant": variant, "rows_sum_to_one": variant in ROWS_SUM_TO_ONE}


def variant_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the variants add (gate, sink logits, key/value biases), by name."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, VariantAttention):
            for pname in ("gate.weight", "gate.bias", "sink", "k_bias", "v_bias"):
                owner, _, leaf = pname.rpartition(".")
                holder = getattr(module, owner) if owner else module
                p = getattr(holder, leaf, None) if holder is not None else None
                if isinstance(p, nn.Parameter):
                    out.append((f"{name}.{pname}", p))
    return out
