"""Adapter for Hugging Face vision-language models: LLaVA-1.5 (``LlavaForConditionalGeneration``),
LLaVA-NeXT (``LlavaNextForConditionalGeneration``), Qwen2-VL and Qwen2.5-VL.

Everything that depends on the model class lives here: finding the decoder layers (by structure,
since their attribute path moved between transformers releases), the image token id, the
vision tower, and turning images + prompts into model inputs with the model's own processor.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from ..errors import ModelSpecError, VsinkError
from ..layout import ImageSpans

SUPPORTED_LVLM = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl")  # 3-row M-RoPE positions, image grid from image_grid_thw


class LVLM:
    """A Hugging Face LVLM behind vsink's interface (see the module docstring).

    Attributes:
        model: the ``...ForConditionalGeneration`` module (eval mode).
        processor: its processor (or None when only token ids are passed in).
        layers: the decoder layers, in order.
    """

    def __init__(self, model: nn.Module, processor: Any = None, spec: str = "hf:<module>"):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_LVLM:
            raise VsinkError(f"{spec}: model type {model_type!r} is not a supported LVLM; supported: "
                             f"{', '.join(SUPPORTED_LVLM)}")
        self.model, self.processor, self.spec = model.eval(), processor, spec
        self.model_type = model_type
        self.text_config = model.config.get_text_config()
        self.layers = self._find_layers()

    # --- structure ----------------------------------------------------------------------
    def _find_layers(self) -> list[nn.Module]:
        n = self.text_config.num_hidden_layers
        for _, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n and all(
                    hasattr(layer, "self_attn") for layer in module):
                return list(module)
        raise VsinkError(f"{self.spec}: could not find {n} decoder layers with a self_attn module")

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            if getattr(cfg, name, None) is not None:
                return int(getattr(cfg, name))
        raise VsinkError(f"{self.spec}: the config names no image token id")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_spans(self, input_ids: torch.Tensor) -> ImageSpans:
        """Image-token runs per batch row (``input_ids == image_token_id``)."""
        return ImageSpans.from_ids(input_ids, self.image_token_id)

    def text_position_ids(self, attention_mask: torch.Tensor, last: int) -> torch.Tensor:
        """Position ids of the last ``last`` tokens of a text-only, left-padded sequence (Qwen2-VL:
        the same positions on its three M-RoPE rows)."""
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -last:]
        return pos[None].expand(3, -1, -1) if self.model_type in MROPE_TYPES else pos

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        """(rows, cols) of a row's image tokens as a picture: Qwen2-VL from ``image_grid_thw`` and
        the merge size, LLaVA-NeXT's base grid when the count is a square, else 1 × count."""
        if self.model_type in MROPE_TYPES and inputs.get("image_grid_thw") is not None:
            t, h, w = (int(v) for v in inputs["image_grid_thw"][min(row, len(inputs["image_grid_thw"]) - 1)])
            merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 1))
            if t * (h // merge) * (w // merge) == count:
                return (t * h // merge, w // merge)
        side = int(round(count ** 0.5))
        return (side, side) if side * side == count else (1, count)

    def vision_backbone(self):
        """The vision tower as a vsink vision :class:`~vsink.backbones.base.Backbone` (CLIP /
        SigLIP towers of LLaVA models), so ``vsink scan`` and ``maps`` work on it."""
        from .hf_vision import HFVisionBackbone

        tower = getattr(getattr(self.model, "model", self.model), "vision_tower", None)
        if tower is None:
            raise VsinkError(f"{self.spec}: its vision tower ({self.model_type}) is not a supported vision backbone")
        return HFVisionBackbone(tower, f"{self.spec}#vision_tower")

    # --- inputs -------------------------------------------------------------------------
    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Any]:
        """Images + prompts → model inputs with the model's processor (left padding for batches).
        A prompt without the image placeholder gets the model's chat template if it has one,
        else the image token in front."""
        if self.processor is None:
            raise VsinkError(f"{self.spec}: no processor was loaded; pass input_ids and pixel_values yourself")
        if len(images) != len(prompts):
            raise VsinkError(f"got {len(images)} images for {len(prompts)} prompts")
        placeholder = getattr(self.processor, "image_token", "<image>")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise VsinkError(f"prompt {i}: must be text, got {prompt!r}")
            if prompt.count(placeholder) > 1:
                raise VsinkError(f"prompt {i} has {prompt.count(placeholder)} {placeholder!r} placeholders for its one "
                                 f"image; write one, or none (vsink then adds it)")
        texts = [self._format(p) for p in prompts]
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def _format(self, prompt: str) -> str:
        placeholder = getattr(self.processor, "image_token", "<image>")
        if placeholder in prompt:
            return prompt
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        return f"{placeholder}\n{prompt}"


def load_lvlm(repo: str, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
              trust_remote_code: bool = False) -> LVLM:
    """Load an LVLM and its processor from a hub id or local directory (``from_pretrained``).
    ``trust_remote_code`` is passed through only when the caller asks for it."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"hf:{repo}: cannot load a config ({e})") from None
    classes = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    if config.model_type not in classes:
        raise ModelSpecError(f"hf:{repo}: model type {config.model_type!r} is not a supported LVLM "
                             f"({', '.join(SUPPORTED_LVLM)})")
    cls = getattr(transformers, classes[config.model_type])
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = cls.from_pretrained(repo, **kwargs).to(device)
    except OSError as e:
        raise ModelSpecError(f"hf:{repo}: cannot load the model ({e})") from None
    try:
        processor = transformers.AutoProcessor.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        processor = None
    return LVLM(model, processor, f"hf:{repo}")
