"""VCD — visual contrastive decoding (Leng et al., CVPR 2024) on vsink's branches.

A second branch sees the image with forward-diffusion noise (step ``noise_step`` of a 1000-step
sigmoid schedule, ``betas = sigmoid(linspace(−6, 6, 1000))·(5e-3 − 1e-5) + 1e-5``) added to the
preprocessed pixels, ``v′ = sqrt(ᾱ_T)·v + sqrt(1 − ᾱ_T)·ε``; each step decodes from
``(1 + α)·l(v) − α·l(v′)`` over the tokens with ``l(v) >= log β + max l(v)``. The noised branch
has the same shapes as the prompt, with its own KV cache; which composed edits apply in it is
``branch_edits``. Each image gets its own noise from the seed (so a batch equals its rows run
alone). Defaults: the official POPE script (``eval/object_hallucination_vqa_llava.py``):
α = 1, β = 0.1, T = 500, seed 42. vsink decodes greedily; the script samples (temperature 1,
top-p 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from .branch import image_branch
from ..options import Choice, Float, Int
from .base import Run, register
from .contrastive import BRANCH_EDITS, ContrastiveDecoder, branch_edits
from .settings import CheckedSettings, setting

#: the diffusion schedule's length and its sigmoid betas' ends (vcd_utils/vcd_add_noise.py)
DIFFUSION_STEPS = 1000
BETA_RANGE = (1e-5, 5e-3)


def diffusion_schedule() -> torch.Tensor:
    """``sqrt(ᾱ_t)`` and ``sqrt(1 − ᾱ_t)`` for t = 0 … 999, stacked [2, 1000] (float32)."""
    lo, hi = BETA_RANGE
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS)) * (hi - lo) + lo
    alphas_bar = torch.cumprod(1 - betas, dim=0)
    return torch.stack([alphas_bar.sqrt(), (1 - alphas_bar).sqrt()])


def add_diffusion_noise(pixels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """``pixels`` after ``step`` steps of forward diffusion (Gaussian noise from ``generator``).

    In a 5-D tensor [1, images, C, H, W] the images that are zero everywhere are batch padding —
    Idefics3 and SmolVLM drop them from the tower by that test, so a row with fewer sub-images than
    another keeps its padding — and stay zero; the real images come first and draw the same noise
    as the row alone."""
    keep, noise_scale = diffusion_schedule()[:, step].tolist()
    real = pixels
    if pixels.dim() == 5:
        padding = (pixels == 0).flatten(2).all(-1).flatten()
        real = pixels[:, : int((~padding).sum())]
    noise = torch.randn(real.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    noised = (keep * real.float() + noise_scale * noise).to(pixels.dtype)
    return torch.cat([noised, pixels[:, noised.shape[1]:]], dim=1) if pixels.dim() == 5 else noised


def per_image(pixels: torch.Tensor, counts: Optional[Sequence[int]]) -> list[torch.Tensor]:
    """The processor's pixel tensor split into its images' parts along the first dimension: one
    entry per batch row, or ``counts`` entries per row (:meth:`LVLM.pixel_counts
    <vsink.backbones.hf_lvlm.LVLM.pixel_counts>`: Qwen2-VL's flattened patches, InternVL's tiles)."""
    if counts is not None:
        return list(pixels.split([int(n) for n in counts]))
    return list(pixels.split(1))


@dataclass
class VCDSettings(CheckedSettings):
    """VCD's settings (see the module docstring)."""

    alpha: float = setting(1.0, Float(0), "contrast strength α: (1+α)·l(v) − α·l(v′) (0: plain decoding)")
    beta: float = setting(0.1, Float(0, 1), "plausibility cutoff β: tokens with p < β·max p are dropped")
    noise_step: int = setting(500, Int(min=0, max=DIFFUSION_STEPS - 1), "diffusion step T of the noised image")
    seed: int = setting(42, Int(min=0), "seed of the diffusion noise")
    branch_edits: str = setting("all", Choice(BRANCH_EDITS), "edits of the composed mitigations in the noised "
                                "branch: all, or none (the plain model)")
    protocol: str = "paper"

    NAME: ClassVar[str] = "vcd"
    #: the official POPE script's values are the defaults above
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


@register
class VCD(ContrastiveDecoder):
    """VCD as a mitigation with a noised-image branch (see the module docstring)."""

    name = "vcd"
    settings_class = VCDSettings
    weak = "noised"

    def _install(self, run: Run, handles: list) -> None:
        pass

    def branches(self, run: Run) -> list:
        s: VCDSettings = self.settings

        def noised(pixels: torch.Tensor) -> torch.Tensor:  # each image its own noise, as at batch size 1
            return torch.cat([add_diffusion_noise(p, s.noise_step, torch.Generator().manual_seed(s.seed))
                              for p in per_image(pixels, run.lvlm.pixel_counts(run.inputs))])

        return [image_branch("noised", noised, edits=branch_edits(s.branch_edits))]
