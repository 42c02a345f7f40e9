"""One attention router for every Hugging Face model vsink works on, vision encoders and LVLM
decoders alike, through transformers' public extension points only.

vsink registers one attention function in ``transformers.AttentionInterface`` under
``"vsink_<implementation>"`` for the implementation a model had (``vsink_eager``, ``vsink_sdpa``,
``vsink_flash_attention_2``, ...), with that implementation's mask builder in
``AttentionMaskInterface``, and switches the model (or one of its sub-configs, e.g. an LVLM's
``text_config``) to it: the masks the model builds stay those its own implementation expects.
Each attention module then carries its own state in its instance ``__dict__``: the function of the
implementation the model had before (eager, sdpa, flash, ...) and, while vsink routes it, a
*route*. The registered function calls the module's route if it has one, and its original
function otherwise — so modules without a route keep running the model's own implementation,
and no class, global table or ``forward`` is patched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..errors import VsinkError

PREFIX = "vsink_"

AttentionFn = Callable[..., Any]


@dataclass
class _ModuleState:
    original: AttentionFn
    route: Optional[AttentionFn] = None


def dispatch(module: nn.Module, query, key, value, attention_mask, scaling: Optional[float] = None,
             dropout: float = 0.0, **kwargs: Any):
    """The registered function: the module's route, else its original function."""
    state: Optional[_ModuleState] = module.__dict__.get("_vsink_router")
    if state is None:
        raise VsinkError(f"{type(module).__name__} called vsink attention but is not switched to it")
    fn = state.route or state.original
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register(implementation: str) -> str:
    """Register :func:`dispatch` as ``vsink_<implementation>``, with the mask builder of
    ``implementation`` (eager's when it has none); return the name (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    name = PREFIX + implementation
    masks = AttentionMaskInterface()
    AttentionInterface.register(name, dispatch)
    AttentionMaskInterface.register(name, masks[implementation] if implementation in masks else eager_mask)
    return name


def eager_attention_of(module: nn.Module) -> AttentionFn:
    """The ``eager_attention_forward`` of the modelling file that defines ``module``."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise VsinkError(f"cannot find the eager attention of {type(module).__name__}")
    return eager


def implementation_function(module: nn.Module, implementation: Optional[str]) -> AttentionFn:
    """The attention function transformers would call for ``module`` under ``implementation``."""
    from transformers import AttentionInterface

    name = implementation or "eager"
    if name == "eager":
        return eager_attention_of(module)
    functions = AttentionInterface()
    if name not in functions:
        raise VsinkError(f"{type(module).__name__}: unknown attention implementation {name!r}")
    return functions[name]


class Router:
    """The routing of one model's attention modules (an HF model, or the part of it governed by
    one sub-config such as an LVLM's ``text_config``).

    Args:
        model: the ``PreTrainedModel`` whose ``set_attn_implementation`` switches ``config``.
        config: the config object whose ``_attn_implementation`` the modules follow.
        modules: the attention modules, in layer order.
        sub_config: the key to pass to ``set_attn_implementation`` (e.g. ``"text_config"``), or
            None to switch the whole model.
        label: how errors name the model.
    """

    def __init__(self, model: nn.Module, config: Any, modules: Sequence[nn.Module], *,
                 sub_config: Optional[str] = None, label: str = "model"):
        self.model, self.config, self.modules = model, config, list(modules)
        self.sub_config, self.label = sub_config, label
        self._original: Optional[str] = None
        self._routes = 0

    @property
    def active(self) -> bool:
        """Whether the model currently runs the vsink attention function."""
        return self._original is not None

    @property
    def original_implementation(self) -> str:
        """The implementation the model had before vsink switched it (or has now)."""
        return self._original if self._original is not None else (self.config._attn_implementation or "eager")

    def route(self, index: int, fn: AttentionFn) -> Callable[[], None]:
        """Send module ``index`` through ``fn`` (same signature as an HF attention function);
        return the undo function. The first route switches the model, the last undo switches it back."""
        if not self.active:
            self._switch()
        state: _ModuleState = self.modules[index].__dict__["_vsink_router"]
        if state.route is not None:
            raise VsinkError(f"{self.label}: attention of layer {index} is routed already")
        state.route = fn
        self._routes += 1

        def undo() -> None:
            if state.route is fn:
                state.route = None
                self._routes -= 1
                if not self._routes:
                    self._switch_back()

        return undo

    def _set(self, name: str) -> None:
        self.model.set_attn_implementation({self.sub_config: name} if self.sub_config else name)

    def _switch(self) -> None:
        original = self.config._attn_implementation or "eager"
        target = register(original)
        for module in self.modules:
            module.__dict__["_vsink_router"] = _ModuleState(implementation_function(module, original))
        self._original = original
        self._set(target)
        if self.config._attn_implementation != target:
            self._switch_back()
            raise VsinkError(f"{self.label}: the model refused attn_implementation={target!r}")

    def _switch_back(self) -> None:
        original, self._original = self._original, None
        for module in self.modules:
            module.__dict__.pop("_vsink_router", None)
        self._set(original)
