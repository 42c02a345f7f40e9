"""Singular-value offsets (the SINDER repair's parametrisation): a linear layer's weight written as
``W = U·diag(S + δ)·Vᵀ`` from its SVD, with only ``δ`` trained.

vsink keeps the frozen weight and adds the offset, ``W = W₀ + U·diag(δ)·Vᵀ`` — the same function
of ``δ`` (``W₀ = U·diag(S)·Vᵀ`` exactly), but with ``δ = 0`` the layer computes ``W₀`` itself, not
its float32 reconstruction from the SVD. It is a :mod:`torch.nn.utils.parametrize`
parametrisation, so the layer stays the same module (hooks and sites keep working) and
:func:`bake_offsets` turns it back into a plain weight.

Which layers (the reference's ``replace_linear_addition_noqk``): every ``nn.Linear`` in the
backbone's blocks; a fused query/key/value projection (``qkv``) gets offsets on its value rows
only, and separate query and key projections none (queries and keys stay frozen).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..backbones.base import Backbone
from ..errors import VsinkError

#: names of separate query and key projections, which get no offsets
QUERY_KEY = frozenset({"q", "k", "q_proj", "k_proj", "query", "key"})
#: names of fused query/key/value projections (three equal row blocks), offset on the value rows
FUSED_QKV = frozenset({"qkv"})


class SingularOffsets(nn.Module):
    """``weight ↦ weight + U·diag(δ)·Vᵀ`` on rows ``[start, stop)`` of the weight, where
    ``U·diag(S)·Vᵀ`` is the SVD of those rows (thin, computed once in float64); ``δ`` (the
    parameter ``delta``, one entry per singular value) starts at 0. ``U`` and ``Vᵀ`` are
    buffers recomputed from the frozen weight whenever the layer is built, so checkpoints hold
    the weight and ``δ`` only."""

    def __init__(self, weight: torch.Tensor, start: int = 0, stop: Optional[int] = None):
        super().__init__()
        stop = weight.shape[0] if stop is None else stop
        u, s, vh = torch.linalg.svd(weight.detach()[start:stop].to(torch.float64), full_matrices=False)
        self.start, self.stop = start, stop
        self.register_buffer("u", u.to(weight.dtype), persistent=False)
        self.register_buffer("vh", vh.to(weight.dtype), persistent=False)
        self.register_buffer("singular_values", s.to(weight.dtype), persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(s), dtype=weight.dtype, device=weight.device))

    def offset(self) -> torch.Tensor:
        """``U·diag(δ)·Vᵀ`` [stop − start, in]."""
        return (self.u * self.delta) @ self.vh

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.start == 0 and self.stop == weight.shape[0]:
            return weight + self.offset()
        return torch.cat([weight[:self.start], weight[self.start:self.stop] + self.offset(), weight[self.stop:]])


def _rows(name: str, linear: nn.Linear, where: str) -> Optional[tuple[int, int]]:
    """The rows of ``linear`` that get offsets (None: none)."""
    leaf = name.rpartition(".")[2]
    if leaf in QUERY_KEY:
        return None
    out = linear.out_features
    if leaf in FUSED_QKV:
        if out % 3:
            raise VsinkError(f"{where}: fused query/key/value projection with {out} rows, not three equal blocks")
        return 2 * out // 3, out
    return 0, out


def attach_offsets(backbone: Backbone) -> list[tuple[str, nn.Parameter]]:
    """Freeze every parameter of ``backbone.model`` and give the linear layers of its blocks
    singular-value offsets (module docstring); returns the (name, ``δ``) pairs, the only
    parameters left trainable."""
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for i, block in enumerate(backbone.blocks):
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or parametrize.is_parametrized(module, "weight"):
                continue
            found += 1
            rows = _rows(name, module, f"{backbone.spec} block {i} {name}")
            if rows is not None:
                parametrize.register_parametrization(module, "weight", SingularOffsets(module.weight, *rows))
    if not found:
        raise VsinkError(f"{backbone.spec}: its blocks hold no nn.Linear layers (the {backbone.family} family keeps "
                         "its projections elsewhere), so there are no singular values to offset")
    named = [(n, p) for n, p in model.named_parameters() if n.endswith(".delta")]
    for _, p in named:
        p.requires_grad_(True)
    return named


def bake_offsets(model: nn.Module) -> int:
    """Replace every offset parametrisation by its current weight (a plain ``nn.Linear`` weight
    again, loadable without vsink); returns how many layers were baked."""
    baked = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and \
                any(isinstance(p, SingularOffsets) for p in module.parametrizations["weight"]):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            baked += 1
    return baked
