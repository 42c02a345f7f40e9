"""Model specs (``demo``, ``timm:NAME``, ``open_clip:NAME[/TAG]``, ``hf:REPO_OR_DIR``) → :class:`Backbone`."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ModelSpecError, VsinkError
from .base import Backbone
from .saved import SAVED_CONFIG

SPEC_FORMS = """supported model specs:
  demo                              the built-in synthetic ViT with planted high-norm tokens (offline)
  DIR with vsink.json               a model saved by Backbone.save / vsink finetune (registers included)
  timm:NAME                         a timm ViT, e.g. timm:vit_small_patch14_reg4_dinov2.lvd142m
  open_clip:NAME[/PRETRAINED_TAG]   an open_clip vision tower, e.g. open_clip:ViT-B-16/laion2b_s34b_b88k
  hf:REPO_OR_LOCAL_DIR              a Hugging Face ViT / DINOv2 / DINOv2-with-registers / CLIP / SigLIP
                                    vision model, e.g. hf:facebook/dinov2-with-registers-small
  LOCAL_DIR                         a local Hugging Face model directory (same as hf:LOCAL_DIR)
options: weights=PATH (.safetensors, or a state dict read with torch.load(weights_only=True)),
         img_size, device, dtype"""

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _spec_error(spec: str, why: str) -> ModelSpecError:
    return ModelSpecError(f"cannot load model {spec!r}: {why}\n{SPEC_FORMS}")


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise VsinkError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise VsinkError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VsinkError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``."""
    p = Path(path)
    if not p.is_file():
        raise VsinkError(f"weights file not found: {p}")
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
        raise VsinkError(f"cannot read weights file {p}: {type(e).__name__}: {e}") from e
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
    """Raise a :class:`VsinkError` naming the keys of ``model`` that ``state`` (tensors, or their
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
        raise VsinkError(f"{source} does not match the model: {'; '.join(problems)}")


def wrap(model: nn.Module, spec: Optional[str] = None) -> Backbone:
    """Wrap an already-built timm, open_clip or Hugging Face model in the matching adapter."""
    from .hf_vision import HFVisionBackbone
    from .open_clip import OpenClipBackbone
    from .timm import TimmBackbone

    if isinstance(model, Backbone):
        return model
    module = type(model).__module__
    if module.startswith("timm."):
        return TimmBackbone(model, spec or f"timm:{type(model).__name__}")
    if module.startswith("open_clip.") or hasattr(model, "visual") and hasattr(getattr(model, "visual"), "conv1"):
        return OpenClipBackbone(model, spec or f"open_clip:{type(model).__name__}")
    if module.startswith("transformers."):
        return HFVisionBackbone(model, spec or f"hf:{type(model).__name__}")
    raise VsinkError(f"cannot wrap a {type(model).__module__}.{type(model).__name__}: "
                     "vsink supports timm VisionTransformer, open_clip and Hugging Face vision models")


def load(
    spec: str,
    *,
    weights: Optional[Union[str, os.PathLike]] = None,
    img_size: Optional[int] = None,
    device: Union[None, str, torch.device] = "cpu",
    dtype: Union[None, str, torch.dtype] = None,
    pretrained: bool = True,
    attn_implementation: Optional[str] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> Backbone:
    """Load a model from a spec string and wrap it.

    Args:
        spec: ``demo``, ``timm:NAME``, ``open_clip:NAME[/TAG]``, ``hf:REPO_OR_DIR`` or a local HF directory.
        weights: a checkpoint to load instead of the library's pretrained weights.
        img_size: input size (timm: ``img_size=``; open_clip: ``force_image_size``; HF: position
            embeddings are interpolated at run time).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or a torch dtype); default: as loaded.
        pretrained: fetch the library's pretrained weights (timm) when no ``weights`` are given.
        attn_implementation: Hugging Face attention implementation to load with (e.g. ``"eager"``).
        model_kwargs: extra keyword arguments for the library constructor (e.g. ``depth=2``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), "empty spec")
    spec = spec.strip()
    if (Path(spec) / SAVED_CONFIG).is_file():
        return _load_saved(Path(spec), weights=weights, device=device, dtype=dtype,
                           attn_implementation=attn_implementation)
    return _load_library(spec, weights=weights, img_size=img_size, device=device, dtype=dtype, pretrained=pretrained,
                         attn_implementation=attn_implementation, model_kwargs=model_kwargs)


def _load_library(spec: str, *, weights: Optional[Union[str, os.PathLike]], img_size: Optional[int], device: Any,
                  dtype: Any, pretrained: bool, attn_implementation: Optional[str],
                  model_kwargs: Optional[dict[str, Any]]) -> Backbone:
    """:func:`load` of a library spec (never a saved folder, so a saved model cannot recurse)."""
    from .hf_vision import HFVisionBackbone, load_hf
    from .open_clip import OpenClipBackbone, load_open_clip
    from .timm import TimmBackbone, load_timm

    kwargs = dict(model_kwargs or {})
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    family, _, name = spec.partition(":")
    if not name and spec != "demo" and Path(spec).is_dir():
        family, name = "hf", spec
    mean = std = None
    try:
        if spec == "demo":
            from ..data.demo_model import build_demo_model

            if img_size is not None:
                kwargs["img_size"] = img_size
            model = build_demo_model(**kwargs)
            backbone_cls: type = TimmBackbone
        elif family == "timm" and name:
            model = load_timm(name, weights=weights, img_size=img_size, pretrained=pretrained, model_kwargs=kwargs)
            backbone_cls = TimmBackbone
        elif family == "open_clip" and name:
            arch, _, tag = name.partition("/")
            model, mean, std = load_open_clip(arch, tag=tag or None, weights=weights, img_size=img_size,
                                              model_kwargs=kwargs)
            backbone_cls = OpenClipBackbone
        elif family == "hf" and name:
            model, mean, std = load_hf(name, weights=weights, attn_implementation=attn_implementation,
                                       model_kwargs=kwargs)
            backbone_cls = HFVisionBackbone
        else:
            raise _spec_error(spec, "unknown form")
    except ModelSpecError:
        raise
    except VsinkError as e:
        raise _spec_error(spec, str(e)) from e
    except Exception as e:  # library loaders fail in many ways (network, hub, config); report one clearly
        raise _spec_error(spec, f"{type(e).__name__}: {e}. Without network access, pass weights=PATH "
                                "or a local directory") from e
    if backbone_cls is TimmBackbone:
        backbone = TimmBackbone(model, spec)
    else:
        extra = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        backbone = backbone_cls(model, spec, **extra)
    if weights is not None:
        backbone.load_weights(weights)
    backbone.model.to(device=dev, dtype=torch_dtype)  # dtype None keeps the loaded one
    if hf_size := (img_size if backbone_cls is HFVisionBackbone else None):
        backbone.img_size = (hf_size, hf_size)
    backbone.source = {"spec": spec, "img_size": img_size, "model_kwargs": dict(model_kwargs or {})}
    return backbone


def _load_saved(directory: Path, *, weights: Optional[Union[str, os.PathLike]], device: Any, dtype: Any,
                attn_implementation: Optional[str]) -> Backbone:
    """A directory written by :meth:`Backbone.save`: rebuild, re-attach hooked registers, load weights."""
    from .hf_vision import HFVisionBackbone, load_hf
    from .saved import read_saved_config

    cfg = read_saved_config(directory)
    family, spec, n_hooked = cfg["family"], cfg["spec"], cfg["hooked_registers"]
    size = int(cfg["img_size"][0]) if cfg["img_size"] else None
    if family == "hf":
        model, _, _ = load_hf(str(directory), weights=None, attn_implementation=attn_implementation, model_kwargs={})
        backbone: Backbone = HFVisionBackbone(model, str(directory))
        if size:
            backbone.img_size = (size, size)
    else:
        backbone = _load_library(spec, weights=None, img_size=size, device="cpu", dtype=None, pretrained=False,
                                 attn_implementation=None, model_kwargs=cfg["model_kwargs"])
    if n_hooked:
        backbone.attach_hooked_registers(nn.Parameter(torch.zeros(1, n_hooked, backbone.embed_dim)))
    backbone.load_weights(weights or directory / "model.safetensors")
    backbone.mean = tuple(cfg["mean"]) if cfg["mean"] else backbone.mean
    backbone.std = tuple(cfg["std"]) if cfg["std"] else backbone.std
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    backbone.model.to(device=dev, dtype=torch_dtype)  # dtype None keeps the loaded one
    backbone.source = {"spec": spec if family != "hf" else "hf:.", "img_size": size,
                       "model_kwargs": cfg["model_kwargs"]}
    backbone.spec = str(directory)
    return backbone
