"""The demos as model specs: ``demo`` (the synthetic ViT), ``demo-llava`` (the vision tower of
the synthetic LVLM, for ``vsink scan`` / ``registers find`` on it; ``--prompt`` scans the whole LVLM)
and ``demo-halluc`` (the planted-hallucination LVLM; as a vision spec, its texture-reading tower)."""

from __future__ import annotations

from typing import Any, Optional

from ..backbones.base import Backbone
from ..backbones.families import named_spec


@named_spec("demo", "the built-in synthetic ViT with planted high-norm tokens (offline)")
def demo(*, img_size: Optional[int] = None, model_kwargs: Optional[dict[str, Any]] = None, **ignored: Any) -> Backbone:
    from ..backbones.timm import TimmBackbone
    from .demo_model import build_demo_model

    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    backbone = TimmBackbone(build_demo_model(**kwargs), "demo")
    backbone.synthetic = ("a small ViT with high-norm tokens planted by construction (block 2, MLP neurons 0-3; "
                          "see docs/demo.md)")
    return backbone


@named_spec("demo-llava", "the synthetic demo LVLM (offline): scan, generate, lvlm calibrate and eval pope, "
                          "chair and the hallucination benchmarks run the whole LVLM; registers, maps and eval "
                          "dense its CLIP tower (planted register neurons)")
def demo_llava_tower(**ignored: Any) -> Backbone:
    from ..backbones.hf_lvlm import load_lvlm

    tower = load_lvlm("demo-llava").vision_backbone()
    tower.spec = "demo-llava"
    tower.synthetic = "the vision tower of the demo LVLM, register neurons planted by construction (see docs/lvlm.md)"
    return tower


@named_spec("demo-halluc", "the synthetic planted-hallucination LVLM (offline): generate and eval pope|chair run "
                           "it, its hallucination and the effect of VAR, PAI, VAF, VCD, M3ID and DAMRO known by construction "
                           "(docs/hallucination.md); as a vision model, its texture-reading CLIP tower")
def demo_halluc_tower(**ignored: Any) -> Backbone:
    from ..backbones.hf_lvlm import load_lvlm

    tower = load_lvlm("demo-halluc").vision_backbone()
    tower.spec = "demo-halluc"
    tower.synthetic = "the vision tower of the planted-hallucination demo LVLM (see docs/hallucination.md)"
    return tower
