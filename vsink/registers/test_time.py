"""Test-time registers: move register neurons' activations onto appended tokens, no training.

Per Jiang et al. (2025): append ``registers`` zero tokens at the end of the sequence (no position
embedding); in each layer with register neurons, write a value times ``scale`` to those neurons
on the appended tokens and set the neurons to zero on the patch tokens (class tokens keep
theirs; trained registers keep theirs unless ``zero_trained_registers``). Two rules for the value:

* ``shift="per-neuron"`` (default): each neuron gets its own value, per sample: the signed value
  of largest magnitude over all tokens (``mode="max"``; on equal magnitudes the earlier token
  wins) or the mean over patch tokens (``mode="mean"``).
* ``shift="reference"``: the rule of the authors' released code. One scalar per layer and
  sample, the signed value of largest magnitude over all tokens *and* all of that layer's
  register neurons (on a tie between ``+m`` and ``-m``, ``-m``), written into every one of
  them. The released code edits batch row 0 only; here it applies to every sample.

With one neuron per layer the two ``max`` rules agree (up to that ``±m`` tie). Batched; nothing
indexes sample 0. See docs/registers.md and docs/fidelity.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backbones.base import Backbone
from ..backbones.hooks import Closer, HookSet, Hooks
from ..errors import VsinkError
from ..options import MAX_REGISTERS, Bool, Choice, Float, Int, Option, declare
from .neurons import NeuronSpec

MODES = ("max", "mean")
SHIFTS = ("per-neuron", "reference")

#: the settings of :class:`TestTimeRegisters` (``vsink scan``/``eval dense`` take them as ``--ttr-*``)
TTR = declare(
    Option("ttr_registers", Int(1, MAX_REGISTERS), 1, "appended register tokens"),
    Option("ttr_scale", Float(), 1.0, "scale of the moved activation"),
    Option("ttr_mode", Choice(MODES), "max", "the value a register neuron moves to the register: max (its signed "
           "value of largest magnitude over the patches) or mean (its mean over the patches; per-neuron shift only)"),
    Option("ttr_shift", Choice(SHIFTS), "per-neuron", "per-neuron (each register neuron moves its own value) or "
           "reference (one scalar per layer, the signed max over tokens and that layer's neurons, as the released "
           "code)"),
    Option("ttr_zero_trained_registers", Bool(), False, "also zero the register neurons on trained registers, as "
           "the released code", default_text="off: trained registers keep their activations"),
)


def signed_max(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The value of largest magnitude over ``dims`` (kept as size-1 dims), sign included; when
    the largest and the smallest value have equal magnitude, the smallest (negative) one."""
    hi = values.amax(dim=dims, keepdim=True)
    lo = values.amin(dim=dims, keepdim=True)
    return torch.where(hi.abs() > lo.abs(), hi, lo)


class TestTimeRegisters:
    """Apply a :class:`NeuronSpec` as test-time registers.

    Use as a context manager (``with TestTimeRegisters(spec).applied(backbone): ...``) or
    permanently (``handle = TestTimeRegisters(spec).apply(backbone)``; ``handle.remove()`` undoes
    it). While applied, the backbone's layout reports the appended tokens, so scan, maps and
    every other consumer exclude them from the patch grid; the model's token outputs carry them
    at the end of the sequence, and class-token / pooled outputs keep their shapes.

    Args:
        spec: the register neurons (``vsink registers find``).
        registers: appended tokens (default 1); every one gets the same value.
        scale: factor on the moved value (default 1).
        mode: ``"max"`` (default) or ``"mean"`` (``shift="per-neuron"`` only).
        shift: ``"per-neuron"`` (default) or ``"reference"`` (one scalar per layer, as the
            released code; see the module docstring).
        zero_trained_registers: also zero the neurons on trained registers (default False:
            they keep theirs). The released code zeroes every token between the class token and
            the appended registers, trained registers included: True reproduces it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, spec: NeuronSpec, *, registers: int = 1, scale: float = 1.0, mode: str = "max",
                 shift: str = "per-neuron", zero_trained_registers: bool = False):
        registers = TTR["ttr_registers"].check(registers, name="registers")
        scale = TTR["ttr_scale"].check(scale, name="scale")
        if mode not in MODES:
            raise VsinkError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if shift not in SHIFTS:
            raise VsinkError(f"unknown shift {shift!r}; use one of {', '.join(SHIFTS)}")
        if shift == "reference" and mode != "max":
            raise VsinkError(f"mode {mode!r} needs shift='per-neuron'; shift='reference' moves the signed max")
        if not spec.neurons:
            raise VsinkError("the neuron spec lists no neurons")
        self.spec, self.registers, self.scale, self.mode = spec, registers, float(scale), mode
        self.shift, self.zero_trained_registers = shift, bool(zero_trained_registers)

    def describe(self) -> str:
        return (f"test_time_registers(neurons={len(self.spec.neurons)}, registers={self.registers}, "
                f"scale={self.scale:g}, mode={self.mode}, shift={self.shift}, "
                f"zero_trained_registers={self.zero_trained_registers})")

    def applied(self, backbone: Backbone) -> HookSet:
        """The test-time registers on ``backbone`` as a :class:`HookSet`: ``with ttr.applied(backbone):``
        installs them for the block, ``remove()`` undoes :meth:`apply`."""

        def install(handles: list) -> None:
            self.spec.check(backbone)
            handles.append(backbone.append_tokens(self.registers))
            for layer, neurons in sorted(self.spec.by_layer().items()):
                handles.append(backbone.hook("mlp_hidden", layer, self._shift(backbone, neurons)))
            backbone.edits.append(self.describe())
            handles.append(Closer(lambda: backbone.edits.remove(self.describe())))

        return Hooks(install)

    def apply(self, backbone: Backbone) -> HookSet:
        """Install on ``backbone`` until the returned handle's ``remove()``."""
        return self.applied(backbone).__enter__()

    def _moved(self, values: torch.Tensor, layout) -> torch.Tensor:
        """The value written to the appended tokens, [B, 1, K] or [B, 1, 1], from [B, N, K]."""
        if self.shift == "reference":
            return signed_max(values, (1, 2))
        if self.mode == "max":
            return values.gather(1, values.abs().argmax(dim=1, keepdim=True))
        return layout.patches(values, dim=1).mean(dim=1, keepdim=True)

    def _shift(self, backbone: Backbone, neurons: list[int]):
        index: Optional[torch.Tensor] = None

        def fn(h: torch.Tensor) -> torch.Tensor:
            nonlocal index
            layout = backbone.current_layout()
            if index is None or index.device != h.device:
                index = torch.as_tensor(neurons, dtype=torch.long, device=h.device)
            moved = self._moved(h.index_select(-1, index), layout)
            out = h.clone()
            out[:, layout.patch_slice, index] = 0
            if self.zero_trained_registers and layout.num_registers:
                trained = torch.as_tensor(layout.register_indices()[:layout.num_registers], device=h.device)
                out[:, trained[:, None], index] = 0
            appended = torch.as_tensor(layout.appended_indices(), device=h.device)
            out[:, appended[:, None], index] = (moved * self.scale).to(out.dtype)  # broadcast to every register
            return out

        return fn
