"""Reading checkpoints safely (safetensors, or ``torch.load(weights_only=True)``) and loading them
into a model with errors that name the missing and wrong-shaped keys."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import VsinkError


class StateMismatchError(VsinkError):
    """A checkpoint whose keys or shapes do not fit the model."""


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``."""
    p = Path(path)
    if not p.is_file():
        raise VsinkError(f"weights file not found: {p}")
    if p.stat().st_size == 0:
        raise VsinkError(f"cannot read weights file {p}: the file is empty")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VsinkError(f"cannot read weights file {p}: it holds Python objects besides tensors, and vsink "
                         "loads checkpoints with torch.load(weights_only=True); save a plain state dict or "
                         "convert it to .safetensors") from e
    except Exception as e:  # any parse failure of a user file becomes one clear message
        detail = " ".join(str(e).split())
        raise VsinkError(f"cannot read weights file {p}: {type(e).__name__}{': ' + detail if detail else ''} (expected "
                         ".safetensors or a torch.save state dict)") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VsinkError(f"weights file {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: Union[str, os.PathLike],
                 state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Load a checkpoint into ``model``; missing keys and tensors of the wrong shape are an error
    naming them (and the shapes), unexpected keys a warning.

    ``state`` is the already-read content of ``path``, when the caller has it.
    """
    state = read_state_dict(path) if state is None else state
    check_state_matches(model, state, f"weights file {path}")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        warnings.warn(f"weights file {path}: ignored {len(result.unexpected_keys)} keys not in the model "
                      f"(e.g. {result.unexpected_keys[0]})", stacklevel=2)


def check_state_matches(model: nn.Module, state: Mapping[str, Union[torch.Tensor, Sequence[int]]],
                        source: str) -> None:
    """Raise a :class:`StateMismatchError` naming the keys of ``model`` that ``state`` (tensors, or their
    shapes) lacks and those whose shapes differ (with both shapes), before ``load_state_dict``
    would fail on them."""
    expected = model.state_dict()
    shapes = {k: list(v.shape) if isinstance(v, torch.Tensor) else list(v) for k, v in state.items()}
    missing = [k for k in expected if k not in shapes]
    wrong = [f"{k} {shapes[k]} (the model's: {list(expected[k].shape)})"
             for k in expected if k in shapes and shapes[k] != list(expected[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("wrong shape", wrong)):
        if keys:
            more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
            problems.append(f"{label} {', '.join(keys[:8])}{more}")
    if problems:
        raise StateMismatchError(f"{source} does not match the model: {'; '.join(problems)}")
