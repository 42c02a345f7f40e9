"""Training checkpoints: ``step_NNNNNNN/model.safetensors`` (every weight of the trained module)
and ``state.pt`` (optimizer, scheduler, scaler, step, RNG states; read with
``torch.load(weights_only=True)``). A checkpoint directory appears only once complete (written
under a temporary name, then renamed)."""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..backbones.weights import check_state_matches
from ..errors import VsinkError
from ..readback import member

PREFIX = "step_"


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Optional[torch.amp.GradScaler], keep: int) -> Path:
    """Write ``directory/step_<step>`` atomically and keep only the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state()},
                   tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [member(directory, p.name, f"{directory}: checkpoint") for p in directory.iterdir()
             if re.fullmatch(re.escape(PREFIX) + r"\d+", p.name)]
    found = [p for p in found if p.is_dir() and (p / "model.safetensors").is_file() and (p / "state.pt").is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory (``step_NNNNNNN``) was taken after."""
    return int(path.name[len(PREFIX):])


def check_checkpoint_fits(directory: Path, module: nn.Module) -> None:
    """Raise unless the newest checkpoint in ``directory`` holds every weight of ``module`` with
    its shape (read from the safetensors header only), so ``--resume`` is refused before a run writes."""
    from safetensors import safe_open

    found = list_checkpoints(directory)
    if not found:
        return
    path = found[-1] / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # a corrupt header surfaces as several exception types
        raise VsinkError(f"{path}: unreadable checkpoint ({e})") from None
    check_state_matches(module, shapes, f"checkpoint {found[-1]}")


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Optional[torch.amp.GradScaler]) -> int:
    """Restore everything from a checkpoint directory; return the step it was taken after."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files surface from several libraries
        raise VsinkError(f"{path}: unreadable checkpoint ({e})") from None
    check_state_matches(module, weights, f"checkpoint {path}")
    module.load_state_dict(weights, strict=False)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        return int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise VsinkError(f"{path}: the optimizer state does not fit this recipe's trained parameters ({e})") from None
