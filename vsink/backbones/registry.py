"""Model specs → :class:`Backbone`: named specs (``demo``), ``FAMILY:NAME`` (``timm:``, ``open_clip:``,
``hf:``, or a registered family), local model directories and saved models; the families
themselves are found in :mod:`vsink.backbones.families`, never named here."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..arguments import ArgumentError, int_arg
from ..errors import ModelSpecError, VsinkError
from ..options import Mapping_, Option
from .base import Backbone
from .families import families, family_of_directory, family_of_model, named_specs, spec_forms, spec_patterns
from .remote_code import is_remote_code_refusal, no_remote_code_prompt, refused
from .saved import SAVED_CONFIG
from .weights import check_state_matches, load_weights, read_state_dict

__all__ = ["DTYPES", "check_state_matches", "load", "load_library", "load_weights", "read_state_dict",
           "resolve_device", "resolve_dtype", "wrap"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


#: ``model_kwargs`` of :func:`load`: bounded in depth and expanded size (a structure sharing parts,
#: like a YAML alias bomb, is measured in time linear in its distinct parts: :func:`vsink.options.measure`)
MODEL_KWARGS = Option("model_kwargs", Mapping_(), None, nullable=True)


def _spec_error(spec: str, why: str, forms: bool = True) -> ModelSpecError:
    """The error for a spec that cannot be loaded; ``forms``: list the spec forms (the spec's form
    is unknown), else point to ``vsink models`` (the form is known, loading it failed)."""
    if forms:
        return ModelSpecError(f"cannot load model {spec!r}: {why}\n{spec_forms()}")
    return ModelSpecError(f"cannot load model {spec!r}: {why}")


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


def wrap(model: nn.Module, spec: Optional[str] = None) -> Backbone:
    """Wrap an already-built model in the adapter of the first family that can wrap it (timm,
    open_clip, Hugging Face vision, or a family registered through the ``vsink.backbones`` entry point)."""
    if isinstance(model, Backbone):
        return model
    if not isinstance(model, nn.Module):
        hint = f": for a model spec, vsink.load({model!r})" if isinstance(model, str) else ""
        raise ArgumentError(f"model must be a torch.nn.Module, got a {type(model).__name__}{hint}")
    cls = family_of_model(model)
    if cls is None:
        raise VsinkError(f"cannot wrap a {type(model).__module__}.{type(model).__name__}: no model family wraps it "
                         f"(families: {', '.join(families())})")
    return cls(model, spec or f"{cls.family}:{type(model).__name__}")


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
    if isinstance(spec, Backbone):
        raise ArgumentError(f"spec must be a model spec string; {spec.spec!r} is already a loaded Backbone: use it as it is")
    if not isinstance(spec, (str, os.PathLike)):
        raise ArgumentError(f"spec must be a model spec string (see vsink.spec_forms()), got a {type(spec).__name__}"
                            + (": for a built model, vsink.wrap(model)" if isinstance(spec, nn.Module) else ""))
    spec = str(spec)
    if not spec.strip():
        raise _spec_error(spec, "empty spec")
    spec = spec.strip()
    img_size = int_arg(img_size, "img_size", 1, nullable=True)
    if model_kwargs is not None:
        model_kwargs = MODEL_KWARGS.check(model_kwargs, name="model_kwargs")
    if (Path(spec) / SAVED_CONFIG).is_file():
        return _load_saved(Path(spec), weights=weights, device=device, dtype=dtype,
                           attn_implementation=attn_implementation)
    return load_library(spec, weights=weights, img_size=img_size, device=device, dtype=dtype, pretrained=pretrained,
                        attn_implementation=attn_implementation, model_kwargs=model_kwargs)


def spec_problem(spec: str) -> Optional[str]:
    """Why ``spec`` cannot be loaded, as far as can be told without building anything (its form;
    a family's own name check, ``name_problem``, such as timm's list of models), or None. For
    checks up front, e.g. the ``model:`` variants of ``vsink eval dense`` before the baseline runs."""
    spec = spec.strip()
    if not spec:
        return "empty spec"
    if (Path(spec) / SAVED_CONFIG).is_file() or spec in named_specs() or any(
            re.fullmatch(pattern, spec) for pattern in spec_patterns()):
        return None
    prefix, _, name = spec.partition(":")
    if prefix in families() and name:
        check = getattr(families()[prefix], "name_problem", None)
        return check(name) if check is not None else None
    if Path(spec).is_dir() and family_of_directory(Path(spec)) is not None:
        return None
    return "unknown form (see 'vsink models')"


def _build(spec: str, named: dict, options: dict[str, Any]) -> Backbone:
    """The backbone of a named spec, ``FAMILY:NAME`` or a local model directory."""
    prefix, _, name = spec.partition(":")
    if spec in named:
        return named[spec][0](**options)
    for pattern, (builder, _) in spec_patterns().items():
        if (match := re.fullmatch(pattern, spec)) is not None:
            return builder(match, **options)
    if prefix in families() and name:
        return families()[prefix].from_spec(name, **options)
    if Path(spec).is_dir() and (owner := family_of_directory(Path(spec))) is not None:
        return owner.from_spec(spec, **options)
    raise _spec_error(spec, "unknown form")


def load_library(spec: str, *, weights: Optional[Union[str, os.PathLike]], img_size: Optional[int], device: Any,
                 dtype: Any, pretrained: bool, attn_implementation: Optional[str],
                 model_kwargs: Optional[dict[str, Any]]) -> Backbone:
    """:func:`load` of a library spec — a named spec (``demo``), ``FAMILY:NAME`` or a local model
    directory — never a saved folder, so a saved model cannot make loading recurse."""
    kwargs = dict(model_kwargs or {})
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    named = named_specs()
    options = dict(weights=weights, img_size=img_size, pretrained=pretrained, attn_implementation=attn_implementation,
                   model_kwargs=kwargs)
    try:
        with no_remote_code_prompt():
            backbone = _build(spec, named, options)
    except ModelSpecError:
        raise
    except VsinkError as e:
        raise _spec_error(spec, str(e)) from e
    except Exception as e:  # library loaders fail in many ways (network, hub, config); report one clearly
        if is_remote_code_refusal(e):
            raise refused(spec, None) from None
        why = " ".join(f"{type(e).__name__}: {e}".split()).rstrip(".")
        raise _spec_error(spec, f"{why}. Without network access: --weights PATH (weights=PATH) a local checkpoint, "
                                "--no-pretrained (pretrained=False) random timm weights, or a local model "
                                "directory", forms=False) from e
    backbone.spec = spec
    if weights is not None:
        backbone.load_weights(weights)
    backbone.model.to(device=dev, dtype=torch_dtype)  # dtype None keeps the loaded one
    backbone.source = {"spec": spec, "img_size": img_size, "model_kwargs": dict(model_kwargs or {})}
    return backbone


def _load_saved(directory: Path, *, weights: Optional[Union[str, os.PathLike]], device: Any, dtype: Any,
                attn_implementation: Optional[str]) -> Backbone:
    """A directory written by :meth:`Backbone.save`: rebuild (by its family), re-attach hooked
    registers, load the weights."""
    from .saved import read_saved_config

    cfg = read_saved_config(directory)
    cls = families()[cfg["family"]]
    size = int(cfg["img_size"][0]) if cfg["img_size"] else None
    backbone = cls.from_saved(directory, cfg, attn_implementation=attn_implementation) or load_library(
        cfg["spec"], weights=None, img_size=size, device="cpu", dtype=None, pretrained=False, attn_implementation=None,
        model_kwargs=cfg["model_kwargs"])
    if cfg["attention"] != "softmax":
        from ..attention_variants import apply_attention

        apply_attention(backbone.model, cfg["attention"])
    n_hooked = cfg["hooked_registers"]
    if n_hooked:
        backbone.attach_hooked_registers(nn.Parameter(torch.zeros(1, n_hooked, backbone.embed_dim)))
    backbone.load_weights(weights or directory / "model.safetensors")
    backbone.mean = tuple(cfg["mean"]) if cfg["mean"] else backbone.mean
    backbone.std = tuple(cfg["std"]) if cfg["std"] else backbone.std
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    backbone.model.to(device=dev, dtype=torch_dtype)  # dtype None keeps the loaded one
    backbone.source = {"spec": cfg["spec"] if cls.saved_spec != ".*" else "hf:.", "img_size": size,
                       "model_kwargs": cfg["model_kwargs"]}
    backbone.spec = str(directory)
    return backbone
