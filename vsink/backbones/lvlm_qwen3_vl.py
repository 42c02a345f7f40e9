"""The Qwen3-VL LVLM family (``Qwen3VLForConditionalGeneration``): Qwen2-VL's image layout (patches
merged 2×2, ``image_grid_thw``), interleaved M-RoPE through the model's own ``get_rope_index``, and
DeepStack.

DeepStack, as transformers runs it: the tower's blocks ``vision_config.deepstack_visual_indexes``
each give a merged feature per image token; the ``i``-th is added to the hidden states at the image
positions right after decoder layer ``i``'s output (layers ``0 .. len(indexes) - 1``), before the
next layer reads them. So in vsink's sites the ``block_input`` of layer ``i + 1`` holds the
injection while the ``block_output`` of layer ``i`` does not. :meth:`observe_deepstack` reads what
is injected where (the language model's own arguments), for the LVLM scan's ``deepstack`` section.

The tower is not a vsink vision backbone (packed patches in merge-window order), so test-time
registers are refused; its attention sites alone are served by :meth:`tower_sites`. DAMRO's
outlier branch (Qwen's rule, :mod:`vsink.mitigate.damro_outliers`) carries its tokens' DeepStack
features, added by :meth:`inject_deepstack` as the model adds its own image's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .hf_lvlm import DeepStackObserver
from .lvlm_families import lvlm_family
from .lvlm_qwen2_vl import Qwen2VLLVLM
from .packed_tower import PackedTowerSites


@lvlm_family
class Qwen3VLLVLM(Qwen2VLLVLM):
    """Qwen3-VL: as Qwen2-VL, with DeepStack features added after the first decoder layers."""

    family = "qwen3-vl"
    title = "Qwen3-VL"
    example = "hf:Qwen/Qwen3-VL-2B-Instruct"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    verified = ("tiny offline models with DeepStack (tests/test_lvlm.py, tests/test_lvlm_families.py); "
                "real weights not verified here")

    def deepstack_layers(self) -> list[int]:
        """The decoder layers after whose output DeepStack adds tower features at the image positions."""
        return list(range(len(self.deepstack_tower_blocks())))

    def deepstack_tower_blocks(self) -> list[int]:
        """The tower blocks whose outputs feed DeepStack, in the order of :meth:`deepstack_layers`."""
        return [int(i) for i in getattr(self.model.config.vision_config, "deepstack_visual_indexes", ()) or ()]

    def language_model(self) -> nn.Module:
        """The text model whose forward takes ``visual_pos_masks`` and ``deepstack_visual_embeds``."""
        core = getattr(self.model, "model", self.model)
        return getattr(core, "language_model", core)

    def tower_sites(self) -> PackedTowerSites:
        """The vision tower's attention sites (capture and edits of each image's tower attention;
        :mod:`vsink.backbones.packed_tower`), one object per LVLM."""
        sites = self.__dict__.get("_vsink_tower_sites")
        if sites is None:
            core = getattr(self.model, "model", self.model)
            sites = self.__dict__["_vsink_tower_sites"] = PackedTowerSites(self.model, core.visual,
                                                                            f"{self.spec}#vision_tower")
        return sites

    def observe_deepstack(self, fn: DeepStackObserver) -> Any:
        """Call ``fn`` with what every forward of the language model injects (``(None, [])`` when the
        pass has no image: a cached decode step, a text-only branch); when ``fn`` returns True the
        model's call gets no DeepStack arguments (the caller injects). Returns the hook's handle."""

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            masks, features = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
            present = masks is not None and bool(features)
            taken = fn(masks, list(features)) if present else fn(None, [])
            if present and taken is True:
                return args, {**kwargs, "visual_pos_masks": None, "deepstack_visual_embeds": None}
            return None

        return self.language_model().register_forward_pre_hook(pre, with_kwargs=True)


    @contextmanager
    def inject_deepstack(self, masks: torch.Tensor, features: torch.Tensor) -> Iterator[None]:
        """The language model's ``visual_pos_masks`` and ``deepstack_visual_embeds`` (level ``i``:
        the rows' features in row-major order of ``masks``, as the model flattens its own) for every
        forward within the context that carries none (:meth:`LVLM.inject_deepstack`)."""
        levels = [features[:, i].reshape(-1, features.shape[-1]) for i in range(features.shape[1])]

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            if kwargs.get("deepstack_visual_embeds") is not None:
                return None
            return args, {**kwargs, "visual_pos_masks": masks, "deepstack_visual_embeds": levels}

        handle = self.language_model().register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
