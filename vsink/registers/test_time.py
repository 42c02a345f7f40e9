"""Test-time registers: move register neurons' activations onto appended tokens, no training.

Per Jiang et al. (2025): append ``registers`` zero tokens at the end of the sequence (no position
embedding). In each register neuron's activation, per sample and per neuron, the value of
largest magnitude over all tokens (``mode="max"``; or the mean over patch tokens,
``mode="mean"``) times ``scale`` is written to the appended tokens and the neuron is set to zero
on the patch tokens (class tokens and registers keep theirs). Batched; nothing indexes sample 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..backbones.base import Backbone, SiteHandle
from ..errors import VsinkError
from .neurons import NeuronSpec

MODES = ("max", "mean")


class TestTimeRegisters:
    """Apply a :class:`NeuronSpec` as test-time registers.

    Use as a context manager (``with TestTimeRegisters(spec).applied(backbone): ...``) or
    permanently (``handle = TestTimeRegisters(spec).apply(backbone)``; ``handle.remove()`` undoes
    it). While applied, the backbone's layout reports the appended tokens, so scan, maps and
    every other consumer exclude them from the patch grid; the model's token outputs carry them
    at the end of the sequence, and class-token / pooled outputs keep their shapes.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, spec: NeuronSpec, *, registers: int = 1, scale: float = 1.0, mode: str = "max"):
        if registers < 1:
            raise VsinkError(f"registers must be >= 1, got {registers}")
        if mode not in MODES:
            raise VsinkError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if not spec.neurons:
            raise VsinkError("the neuron spec lists no neurons")
        self.spec, self.registers, self.scale, self.mode = spec, registers, float(scale), mode

    def describe(self) -> str:
        return (f"test_time_registers(neurons={len(self.spec.neurons)}, registers={self.registers}, "
                f"scale={self.scale:g}, mode={self.mode})")

    def apply(self, backbone: Backbone) -> SiteHandle:
        """Install on ``backbone`` until the returned handle's ``remove()``."""
        self.spec.check(backbone)
        handles = [backbone.append_tokens(self.registers)]
        try:
            for layer, neurons in sorted(self.spec.by_layer().items()):
                handles.append(backbone.hook("mlp_hidden", layer, self._shift(backbone, neurons)))
        except BaseException:
            for h in reversed(handles):
                h.remove()
            raise
        backbone.edits.append(self.describe())

        def remove() -> None:
            for h in reversed(handles):
                h.remove()
            backbone.edits.remove(self.describe())

        return SiteHandle(remove)

    @contextmanager
    def applied(self, backbone: Backbone) -> Iterator[Backbone]:
        handle = self.apply(backbone)
        try:
            yield backbone
        finally:
            handle.remove()

    def _shift(self, backbone: Backbone, neurons: list[int]):
        index: Optional[torch.Tensor] = None

        def fn(h: torch.Tensor) -> torch.Tensor:
            nonlocal index
            layout = backbone.current_layout()
            if index is None or index.device != h.device:
                index = torch.as_tensor(neurons, dtype=torch.long, device=h.device)
            values = h.index_select(-1, index)  # [B, N, K]
            if self.mode == "max":
                pick = values.abs().argmax(dim=1, keepdim=True)  # [B, 1, K]
                moved = values.gather(1, pick)
            else:
                moved = layout.patches(values, dim=1).mean(dim=1, keepdim=True)
            out = h.clone()
            out[:, layout.patch_slice, index] = 0
            appended = torch.as_tensor(layout.appended_indices(), device=h.device)
            out[:, appended[:, None], index] = (moved * self.scale).to(out.dtype)  # [B, 1, K] → every register
            return out

        return fn

