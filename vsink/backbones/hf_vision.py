"""Adapter for Hugging Face vision encoders: ViT, DINOv2 (with registers), CLIP and SigLIP vision
here; DINOv3, SigLIP2, AIMv2 and InternViT in their own files (``hf_dinov3.py``, ``hf_siglip2.py``,
``hf_aimv2.py``, ``hf_internvl_vision.py``), subclasses registered with :func:`hf_adapter` under
the same ``hf`` family.

Attention is routed through :mod:`vsink.backbones.hf_router` (transformers' public
``AttentionInterface``) while any attention site is installed; layers without a site keep running
the model's original implementation (eager, sdpa, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..attention import additive_mask
from ..errors import VsinkError
from .base import Backbone, module_parameters, to_pair
from .block_parts import BlockParts, HiddenOf, layer_scale, repeat_kv
from .families import families, family
from .hf_router import Router
from .remote_code import is_remote_code_refusal, refused

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: model_type -> (model class name, default mean, default std, class tokens, takes interpolate flag)
SUPPORTED = {
    "vit": ("ViTModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1, True),
    "dinov2": ("Dinov2Model", IMAGENET_MEAN, IMAGENET_STD, 1, False),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", IMAGENET_MEAN, IMAGENET_STD, 1, False),
    "clip": ("CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1, True),
    "clip_vision_model": ("CLIPVisionModel", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1, True),
    "siglip": ("SiglipVisionModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0, True),
    "siglip_vision_model": ("SiglipVisionModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0, True),
}


#: model_type -> the adapter subclass for it (registered by :func:`hf_adapter`)
_ADAPTERS: dict[str, type["HFVisionBackbone"]] = {}


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def hf_adapter(*model_types: str, model_class: str, mean: Sequence[float], std: Sequence[float], num_cls: int,
               interpolate: bool = False) -> Callable[[type], type]:
    """Class decorator: ``cls`` (a :class:`HFVisionBackbone` subclass) adapts the Hugging Face
    vision models of ``model_types`` (a vision config's type, or a dual model's whose
    ``vision_config`` it is), loaded with ``transformers.<model_class>``; ``mean``/``std``: the
    default normalisation, ``num_cls``: class tokens, ``interpolate``: the model takes
    ``interpolate_pos_encoding``."""

    def register(cls: type) -> type:
        for model_type in model_types:
            SUPPORTED[model_type] = (model_class, tuple(mean), tuple(std), num_cls, interpolate)
            _ADAPTERS[model_type] = cls
        return cls

    return register


@family
class HFVisionBackbone(Backbone):
    """A Hugging Face vision encoder (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
    ``CLIPVisionModel``, ``SiglipVisionModel``; ``DINOv3ViTModel``, ``Siglip2VisionModel``,
    ``Aimv2VisionModel`` and ``InternVLVisionModel`` through their subclasses)."""

    family = "hf"
    spec_forms = ("hf:REPO_OR_LOCAL_DIR              a Hugging Face vision model: ViT, DINOv2, DINOv2-with-registers, "
                  "CLIP, SigLIP,\n"
                  "                                    DINOv3 (DINOv3ViTModel), SigLIP2 (Siglip2VisionModel, also from a "
                  "full SigLIP2),\n"
                  "                                    AIMv2 (Aimv2VisionModel), InternViT (InternVLVisionModel),\n"
                  "                                    e.g. hf:facebook/dinov2-with-registers-small\n"
                  "                                    (DINOv3, SigLIP2, AIMv2, InternViT: verified on tiny offline models only)\n"
                  "LOCAL_DIR                         a local Hugging Face model directory (same as hf:LOCAL_DIR)")
    saved_spec = r".*"  # rebuilt from the saved folder itself
    saved_spec_help = "any text (informational)"

    def __new__(cls, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any) -> "HFVisionBackbone":
        """``HFVisionBackbone(model)`` builds the adapter registered for the model's type (DINOv3,
        SigLIP2, AIMv2 have their own, see :func:`hf_adapter`)."""
        if cls is HFVisionBackbone and model is not None:
            families()  # the adapter files register on the family registry's first use
            model_type = getattr(_vision_config(getattr(model, "config", None)), "model_type", None)
            cls = _ADAPTERS.get(model_type, cls)
        return super().__new__(cls)

    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.")

    @classmethod
    def claims_directory(cls, path: Path) -> bool:
        return (path / "config.json").is_file()

    @classmethod
    def from_spec(cls, name: str, *, weights, img_size, pretrained, attn_implementation,
                  model_kwargs) -> "HFVisionBackbone":
        model, mean, std = load_hf(name, weights=weights, attn_implementation=attn_implementation,
                                   model_kwargs=model_kwargs)
        backbone = cls(model, f"hf:{name}", mean=mean, std=std)
        if img_size:  # position embeddings are interpolated at run time
            backbone.img_size = (img_size, img_size)
        return backbone

    @classmethod
    def from_saved(cls, directory: Path, cfg: dict[str, Any], *, attn_implementation: Optional[str]) -> "HFVisionBackbone":
        model, _, _ = load_hf(str(directory), weights=None, attn_implementation=attn_implementation, model_kwargs={})
        backbone = cls(model, str(directory))
        if cfg["img_size"]:
            backbone.img_size = (int(cfg["img_size"][0]), int(cfg["img_size"][0]))
        return backbone

    def __init__(self, model: nn.Module, spec: str = "hf:<module>",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        config = _vision_config(model.config)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise VsinkError(
                f"{spec}: Hugging Face model type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED))}"
            )
        _, d_mean, d_std, self._num_cls, self._interpolate_flag = SUPPORTED[model_type]
        self.config = config
        self._layers = self._find_layers(model, config, spec)
        super().__init__(model, spec, mean=mean or d_mean, std=std or d_std,
                         img_size=self._default_size(config), patch_size=to_pair(config.patch_size))
        self._router = Router(model, config, [self._attention_module(i) for i in range(self.num_layers)], label=spec)

    @staticmethod
    def _default_size(config: Any) -> tuple[int, int]:
        """The model's default input size ``(H, W)``."""
        return to_pair(config.image_size)

    @property
    def owner(self) -> nn.Module:
        """The module holding the embeddings, encoder and final norm (``vision_model`` where the
        model wraps one, else the model)."""
        return getattr(self.model, "vision_model", self.model)

    @staticmethod
    def _find_layers(model: nn.Module, config: Any, spec: str) -> list[nn.Module]:
        n = config.num_hidden_layers
        for _, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return list(module)
        raise VsinkError(f"{spec}: could not find the {n} encoder layers")

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._layers

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def dynamic_size(self) -> bool:
        return True

    def _token_counts(self) -> tuple[int, int]:
        return self._num_cls, int(getattr(self.config, "num_register_tokens", 0) or 0)

    def _run_model(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._call_module(self.model, pixel_values).last_hidden_state

    def _call_module(self, module: nn.Module, pixel_values: torch.Tensor) -> Any:
        kwargs: dict[str, Any] = {}
        if self._interpolate_flag and tuple(pixel_values.shape[-2:]) != self.img_size:
            kwargs["interpolate_pos_encoding"] = True
        return module(pixel_values=pixel_values, **kwargs)

    @property
    def final_norm(self) -> nn.Module:
        """``layernorm`` (ViT, DINOv2), ``post_layernorm`` (CLIP, SigLIP, SigLIP2; HF applies
        CLIP's to the pooled token only, vsink applies it to every token for dense features),
        ``norm`` (DINOv3) or ``rms_norm`` (AIMv2)."""
        for name in ("layernorm", "post_layernorm", "norm", "rms_norm"):
            if isinstance(getattr(self.owner, name, None), nn.Module):
                return getattr(self.owner, name)
        return nn.Identity()

    # --- the attention-pooling head (SigLIP, SigLIP2, AIMv2) ------------------------------
    @property
    def pool_head(self) -> Optional[nn.Module]:
        """The attention-pooling head whose probe (a learned query) attends over the encoder's
        output tokens after the final norm, or None (models without one, or loaded without it).
        Here: SigLIP's and SigLIP2's ``head`` (``probe`` + ``nn.MultiheadAttention``)."""
        head = getattr(self.owner, "head", None)
        if isinstance(getattr(head, "attention", None), nn.MultiheadAttention) and hasattr(head, "probe"):
            return head
        return None

    def _pool_probs(self, head: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The head's probabilities [B, H, 1, N] from the inputs of its ``forward``: SigLIP's
        ``nn.MultiheadAttention`` with the probe as query, ``in_proj`` weights, scale
        ``1/sqrt(head_dim)``, padded keys (a 0 in the mask) excluded."""
        x = args[0] if args else kwargs["hidden_state"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        mha: nn.MultiheadAttention = head.attention
        b, n, d = x.shape
        heads = mha.num_heads
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        q = nn.functional.linear(head.probe.to(x.dtype).expand(b, -1, -1), weight[:d],
                                 None if bias is None else bias[:d])
        k = nn.functional.linear(x, weight[d:2 * d], None if bias is None else bias[d:2 * d])
        q = q.reshape(b, 1, heads, d // heads).transpose(1, 2)
        k = k.reshape(b, n, heads, d // heads).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
        if mask is not None:
            logits = logits.masked_fill(~mask.bool().reshape(b, 1, 1, n), float("-inf"))
        return logits.softmax(dim=-1)

    def _parameter_roles(self) -> dict[str, list[Optional[nn.Parameter]]]:
        emb = self.owner.embeddings

        def first(*names: str):
            return next((getattr(emb, n) for n in names if getattr(emb, n, None) is not None), None)

        return {"registers": module_parameters(first("register_tokens")),
                "cls_token": module_parameters(first("cls_token", "class_embedding")),
                "pos_embed": module_parameters(first("position_embeddings", "position_embedding")),
                "patch_embed": module_parameters(first("patch_embeddings", "patch_embedding", "patch_embed"))}

    def _with_native_registers(self, tokens: torch.Tensor) -> Optional["HFVisionBackbone"]:
        """DINOv2 (with or without registers) → ``Dinov2WithRegistersModel`` with the weights
        carried over and ``tokens`` appended to its ``register_tokens``; other types: hooks."""
        import transformers

        if self.config.model_type not in ("dinov2", "dinov2_with_registers") or hasattr(self.model, "vision_model"):
            return None
        return self._with_more_registers(transformers.Dinov2WithRegistersConfig,
                                         transformers.Dinov2WithRegistersModel, tokens)

    def _with_more_registers(self, config_class: type, model_class: type, tokens: torch.Tensor) -> "HFVisionBackbone":
        """A ``model_class`` built from this config with ``tokens`` [1, n, D] appended to its
        ``embeddings.register_tokens`` (``num_register_tokens`` grown by n), the weights carried over."""
        old = int(getattr(self.config, "num_register_tokens", 0) or 0)
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in ("model_type", "architectures")}
        config = config_class(**{**cfg, "num_register_tokens": old + tokens.shape[1]})
        model = model_class(config).to(device=self.device, dtype=self.dtype)
        state = dict(self.model.state_dict())
        previous = state.pop("embeddings.register_tokens", tokens.new_zeros(1, 0, tokens.shape[-1]))
        state["embeddings.register_tokens"] = torch.cat([previous, tokens], dim=1)
        model.load_state_dict(state, strict=True)
        model.set_attn_implementation(self.model.config._attn_implementation)
        new = HFVisionBackbone(model.eval(), self.spec, mean=self.mean, std=self.std)
        new.img_size = self.img_size
        return new

    def _save_weights(self, directory, meta: dict[str, Any]) -> dict[str, Any]:
        """``save_pretrained`` (config + safetensors): a DINOv2 with registers loads with
        ``Dinov2WithRegistersModel.from_pretrained(directory)``; hooked registers are the extra
        ``vsink_registers`` tensor, which only :func:`vsink.load` reads."""
        import os
        import tempfile

        with tempfile.TemporaryDirectory(dir=directory, prefix=".save-") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), directory / name)
        return {"spec": "hf:."}

    def _register_points(self) -> tuple[nn.Module, str, nn.Module, str]:
        """Registers enter at the embeddings' output and leave at the encoder's output (or at the
        final norm's input where the layers are called inline, as in ``ViTModel``)."""
        owner = self.owner
        encoder = getattr(owner, "encoder", None)
        if encoder is not None:
            return owner.embeddings, "post", encoder, "post"
        return owner.embeddings, "post", self.final_norm, "pre"

    def _mlp_out_proj(self, layer: int) -> nn.Module:
        block = self.blocks[layer]
        mlp = getattr(block, "mlp", None) or getattr(block, "ffn", None)
        for name in ("fc2", "down_proj", "weights_out"):
            if mlp is not None and hasattr(mlp, name):
                return getattr(mlp, name)
        output = getattr(block, "output", None)
        if output is not None and hasattr(output, "dense"):
            return output.dense
        raise VsinkError(f"{self.spec}: cannot find the MLP output projection of layer {layer}")

    def block_parts(self, layer: int) -> BlockParts:
        """A pre-norm HF encoder layer: its first and second norm (``layernorm_before`` / ``norm1`` /
        ``layer_norm1`` / ``rms_norm1`` and their pairs), the attention's value and output projections
        (grouped key/value heads repeated per query head), ``layer_scale1`` / ``layer_scale2`` where
        present, the MLP up to its output projection."""
        block = self.blocks[layer]

        def first(owner: nn.Module, *names: str) -> Optional[nn.Module]:
            return next((getattr(owner, n) for n in names if getattr(owner, n, None) is not None), None)

        attn = self._attention_module(layer)
        norm1 = first(block, "layernorm_before", "norm1", "layer_norm1", "rms_norm1")
        norm2 = first(block, "layernorm_after", "norm2", "layer_norm2", "rms_norm2")
        value = first(attn, "v_proj", "value")
        proj = first(attn, "o_proj", "out_proj") or first(first(block, "attention") or block, "output")
        proj = getattr(proj, "dense", proj)
        if norm1 is None or norm2 is None or value is None or not isinstance(proj, nn.Linear):
            raise VsinkError(f"{self.spec}: layer {layer} ({type(block).__name__}) is not a pre-norm layer vsink can "
                             "read (norms, value and output projections); no weight-only defect direction")
        query = first(attn, "q_proj", "query")
        heads = self.num_heads
        kv_heads = heads * value.out_features // query.out_features
        out = self._mlp_out_proj(layer)
        intermediate = getattr(block, "intermediate", None)
        hidden = intermediate if intermediate is not None else HiddenOf(first(block, "mlp", "ffn"), out)
        return BlockParts(norm1=norm1, value=repeat_kv(value.weight, kv_heads, heads), proj=proj.weight,
                          ls1=layer_scale(getattr(block, "layer_scale1", None)), norm2=norm2, hidden=hidden,
                          out=out.weight, ls2=layer_scale(getattr(block, "layer_scale2", None)))

    def _attention_module(self, layer: int) -> nn.Module:
        for module in self.blocks[layer].modules():
            if any(hasattr(module, a) for a in ("q_proj", "query")) and module is not self.blocks[layer]:
                return module
        raise VsinkError(f"{self.spec}: cannot find the attention module of layer {layer}")

    def _install_attention(self, layer: int) -> Callable[[], None]:
        def routed(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                   **kwargs: Any):
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]
            mask = additive_mask(mask, query.dtype, true_means_keep=True)
            out = self._attention(layer, query, key, value, scale=scaling, mask=mask)
            return out.transpose(1, 2).contiguous(), None

        return self._router.route(layer, routed)


def load_hf(repo: str, *, weights: Optional[str], attn_implementation: Optional[str],
            model_kwargs: dict[str, Any]) -> tuple[nn.Module, Optional[Sequence[float]], Optional[Sequence[float]]]:
    """Load a supported HF vision encoder from a hub id or local directory; return (model, mean, std)."""
    import transformers
    from transformers import AutoConfig

    families()  # the adapter files add their model types on the registry's first use
    try:
        config = AutoConfig.from_pretrained(repo, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if is_remote_code_refusal(e):
            raise refused(f"hf:{repo}", None) from None
        raise VsinkError(f"cannot load a Hugging Face config from {repo!r}: {e}") from e
    model_type = config.model_type
    if model_type not in SUPPORTED:
        raise VsinkError(
            f"hf:{repo}: model type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}"
        )
    cls = getattr(transformers, SUPPORTED[model_type][0], None)
    if cls is None:
        raise VsinkError(f"hf:{repo}: model type {model_type!r} needs transformers.{SUPPORTED[model_type][0]}, "
                         f"which the installed transformers {transformers.__version__} does not have")
    kwargs = {**model_kwargs, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if weights is None:
        model = cls.from_pretrained(repo, **kwargs)
    else:
        model = cls(_vision_config(config))
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
    mean = std = None
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(repo, trust_remote_code=False)
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    except (OSError, ValueError, KeyError):
        pass
    return model, mean, std
