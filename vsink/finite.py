"""NaN and infinity in weights and activations: found where they first appear and reported as
one line naming the block, instead of surfacing later as a failed statistic or figure.

* :func:`check_finite_weights`: after weights are loaded from a user's file, the first
  parameter or buffer (in model order) holding NaN or inf, and its block.
* :meth:`vsink.probe.Trace.check_finite`: after a probe, the first probed block whose output norms
  are not finite (a NaN or inf anywhere in a token's vector makes its norm so).
* :class:`FiniteGuard`: while installed, a forward pass stops at the first block whose output
  holds NaN or inf.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backbones.hooks import HookSet
from .backbones.sites import SiteModel
from .errors import VsinkError


class NonFiniteError(VsinkError):
    """NaN or infinite weights or activations; the message names the first block where they appear."""


def _block_of(backbone: SiteModel, name: str) -> Optional[int]:
    """The block holding the parameter or buffer ``name`` of ``backbone.model``, or None."""
    owner = name.rpartition(".")[0]
    module = backbone.model.get_submodule(owner) if owner else backbone.model
    for i, block in enumerate(backbone.blocks):
        if module is block or any(module is m for m in block.modules()):
            return i
    return None


def check_finite_weights(backbone: SiteModel, source: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor of ``backbone.model`` with NaN or inf
    values and its block (``source`` says where the weights came from)."""
    for name, tensor in backbone.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            block = _block_of(backbone, name)
            where = f"block {block}" if block is not None else "outside the blocks"
            raise NonFiniteError(f"{source}: '{name}' holds NaN or infinite values (first in {where})")


class FiniteGuard(HookSet):
    """``with FiniteGuard(backbone): ...``: a forward pass raises :class:`NonFiniteError` at the first
    block whose output holds NaN or inf."""

    def __init__(self, backbone: SiteModel):
        super().__init__()
        self.backbone = backbone

    def _install(self) -> None:
        for layer in range(self.backbone.num_layers):
            self._handles.append(self.backbone.hook("block_output", layer, self._check(layer)))

    def _check(self, layer: int):
        def fn(x: torch.Tensor) -> None:
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"{self.backbone.spec}: non-finite activations (NaN or inf) first appear in "
                                     f"the output of block {layer}; check the weights and any edits (test-time "
                                     "registers, their scale)")

        return fn
