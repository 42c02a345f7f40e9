"""Test-time registers in an LVLM's vision tower (Jiang et al. 2025), as a composable mitigation.

The tower gets :class:`~vsink.registers.TestTimeRegisters` on its sites (register neurons zeroed on
the patches, their value moved to appended tokens), and the appended tokens are dropped from the
tower's outputs before the projector reads them, so the language model receives as many image
tokens as without the edit. Settings: ``neurons`` (a ``neurons.json`` path, from
``vsink registers find`` run on the tower), ``registers``, ``scale``, ``shift`` (see
:mod:`vsink.registers.test_time`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import nn

from ..errors import VsinkError
from ..options import Choice, Float, Int, Text
from ..registers.test_time import SHIFTS
from ..backbones.hooks import Closer
from .base import Mitigation, Run, register
from .settings import CheckedSettings, setting


@dataclass
class TTRSettings(CheckedSettings):
    """Test-time register settings (see the module docstring)."""

    neurons: Optional[str] = setting(None, Text(what="a path"), "neurons.json of the vision tower ('vsink registers find' on "
                                     "it); required", nullable=True)
    registers: int = setting(1, Int(min=1, max=64), "appended register tokens")
    scale: float = setting(1.0, Float(), "factor on the moved value")
    shift: str = setting("per-neuron", Choice(SHIFTS), "per-neuron: each neuron's own value; reference: the "
                         "released code's one scalar per layer")

    NAME: ClassVar[str] = "ttr"
    #: the released code's rule
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"shift": "reference"}


@register
class TTR(Mitigation):
    """Test-time registers on the vision tower (see the module docstring)."""

    name = "ttr"
    settings_class = TTRSettings
    target = "vision"

    @classmethod
    def refusal(cls, family: Any) -> Optional[str]:
        """Test-time registers need the family's vision tower as a vsink vision backbone."""
        if not family.tower_is_backbone:
            return ("its vision tower is not a vsink vision backbone, so there are no tower sites to put "
                    "registers on")
        return super().refusal(family)

    def _install(self, run: Run, handles: list) -> None:
        from ..registers import NeuronSpec, TestTimeRegisters

        s: TTRSettings = self.settings
        if not s.neurons:
            raise VsinkError("ttr: set neurons=PATH (a neurons.json found on this model's vision tower with "
                             "'vsink registers find --model TOWER': demo-llava for the demo; for LLaVA-1.5 its "
                             "frozen CLIP tower, hf:openai/clip-vit-large-patch14-336)")
        spec = NeuronSpec.load(s.neurons)
        tower = run.lvlm.vision_backbone()
        spec.check(tower)
        ttr = TestTimeRegisters(spec, registers=s.registers, scale=s.scale, shift=s.shift)
        stack = ExitStack()
        stack.enter_context(ttr.applied(tower))
        handles.append(Closer(stack.close))
        handles.append(tower.model.register_forward_hook(self._strip(tower)))
        for layer, neurons in spec.by_layer().items():
            self.count(layer, neurons_moved=len(neurons))

    def _strip(self, tower):
        """Drop the appended registers from every token output of the tower."""

        def hook(module: nn.Module, args, output):
            layout = tower.current_layout()
            n, total = layout.num_appended, layout.num_tokens
            if not n:
                return None
            for name in ("last_hidden_state", "hidden_states"):
                value = getattr(output, name, None)
                if value is None:
                    continue
                if isinstance(value, tuple):
                    setattr(output, name, tuple(h[:, :-n] if h is not None and h.shape[1] == total else h for h in value))
                elif value.shape[1] == total:
                    setattr(output, name, value[:, :-n])
            return output

        return hook
