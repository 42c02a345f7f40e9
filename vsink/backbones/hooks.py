"""Hook helpers shared by the adapters and the observers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn


@contextmanager
def forward_replaced(model: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``model.forward`` is ``forward`` (an instance attribute) while active; on exit an instance's
    own earlier forward (accelerate's dispatch sets one) is put back, else the class's is used again."""
    had = "forward" in vars(model)
    previous = vars(model).get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward


def hook_tensor(module: nn.Module, when: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply ``fn`` to a module's first input (``pre``) or its output (``post``; tensors, tuples
    and Hugging Face model outputs with ``last_hidden_state``), permanently."""
    if when == "pre":
        def pre(mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: fn(kwargs[key])}

        module.register_forward_pre_hook(pre, with_kwargs=True)
        return

    def post(mod, args, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        output.last_hidden_state = fn(output.last_hidden_state)
        return output

    module.register_forward_hook(post)


def hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a layer's forward pre-hook receives (first positional argument, or the
    ``hidden_states`` keyword)."""
    return args[0] if args else kwargs["hidden_states"]


class HookSet:
    """A context manager owning site handles (``backbone.hook(...)`` results): subclasses add
    them in ``_install()``; they are always removed on exit, also when installing fails part-way."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def _install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Uninstall every handle (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


class Hooks(HookSet):
    """A :class:`HookSet` whose handles come from ``install(handles)``: it appends each handle as it
    makes it, so a failure part-way still removes the ones already made."""

    def __init__(self, install: Callable[[list[Any]], None]):
        super().__init__()
        self._install_fn = install

    def _install(self) -> None:
        self._install_fn(self._handles)


class Closer:
    """A handle that runs ``close`` on ``remove()`` (an undo step in a handle list)."""

    def __init__(self, close: Callable[[], Any]):
        self._close: Optional[Callable[[], Any]] = close

    def remove(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            close()
