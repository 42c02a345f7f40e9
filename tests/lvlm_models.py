"""The tiny LVLMs (built offline, random weights), prompts and images that the LVLM tests share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from vsink.backbones.hf_decoder import DecoderModel

from vsink.data.demo_lvlm import (build_tiny_gemma3, build_tiny_idefics3, build_tiny_internvl, build_tiny_llava,
                                  build_tiny_llava_next, build_tiny_llava_onevision, build_tiny_paligemma, build_tiny_qwen2_vl,
                                  build_tiny_qwen3_vl)
from vsink.lvlm import LVLM
from vsink.probe import Probe

#: every family's tiny model by the name its tests carry (``paligemma2``: PaliGemma 2, ``paligemma``: the first)
BUILDERS = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next, "qwen2_vl": build_tiny_qwen2_vl,
            "qwen2_5_vl": lambda: build_tiny_qwen2_vl(version="2.5"), "llava_onevision": build_tiny_llava_onevision,
            "paligemma2": build_tiny_paligemma, "paligemma": lambda: build_tiny_paligemma(version=1),
            "gemma3": build_tiny_gemma3, "internvl": build_tiny_internvl, "qwen3_vl": build_tiny_qwen3_vl,
            "idefics3": build_tiny_idefics3, "smolvlm": lambda: build_tiny_idefics3(smolvlm=True)}
#: LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL: image tokens spread over tiles and M-RoPE positions
FIRST_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
#: two prompts of different lengths, so that a batch of both is left-padded
PROMPTS = ["is there a cat ?", "describe this image please , what color is the sky ?"]
#: Qwen-VL's image as its chat template writes it (the tiny models have no chat template):
#: transformers 4.x's beam search counts a row's images by the vision-start token before each
MARKED = "<|vision_start|><|image_pad|><|vision_end|>"


def marked(lvlm: LVLM, prompts: list[str]) -> list[str]:
    """``prompts`` with a Qwen-VL model's image marked as its chat template marks it (unchanged
    for a model without a vision-start token)."""
    if getattr(lvlm.model.config, "vision_start_token_id", None) is None:
        return list(prompts)
    return [MARKED + prompt for prompt in prompts]


def random_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A ``size`` (width, height) RGB image of uniform random pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def tiny_lvlm(name: str) -> LVLM:
    """The tiny model of family ``name`` (a key of :data:`BUILDERS`) as an LVLM named ``tiny-<name>``."""
    model, processor = BUILDERS[name]()
    return LVLM(model, processor, f"tiny-{name}")


def decoder_attention_checked(model: Any, processor: Any, images: list[Image.Image]) -> tuple[LVLM, dict, Any, Probe]:
    """On eager attention, check that the attention vsink's decoder captures in every layer, and its
    logits, equal transformers' own output on ``images`` (prompt "describe the image", prepared as
    a scan prepares it: :meth:`LVLM.scan_options`); returns the
    LVLM, the inputs, transformers' output and a probe run on the inputs."""
    model.set_attn_implementation("eager")
    lvlm = LVLM(model, processor, "tiny")
    inputs = lvlm.prepare(images, ["describe the image"] * len(images), options=lvlm.scan_options())  # as a scan
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True, use_cache=False)
    decoder = DecoderModel(lvlm)
    got: dict[int, list[torch.Tensor]] = {}
    handles = [decoder.hook("attn_probs", layer, lambda p, s, z, layer=layer: got.setdefault(layer, []).append(p.clone()))
               for layer in range(decoder.num_layers)]
    logits = decoder.forward(inputs)
    for h in handles:
        h.remove()
    for layer in range(decoder.num_layers):
        torch.testing.assert_close(torch.cat(got[layer], dim=2), reference.attentions[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=1e-5)
    with Probe(decoder) as probe:
        probe.run(inputs)
    return lvlm, inputs, reference, probe
