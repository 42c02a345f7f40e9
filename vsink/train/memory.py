"""A recipe's memory needs, estimated before any image is made or step taken, so absurd sizes
(``train.batch_size=100000000``, ``data.num_images=10**9``) are refused with the estimate instead
of failing with a MemoryError half-way. The estimate is a lower bound: float32 activations a
training step keeps for the backward pass, and the uint8 training images held in memory."""

from __future__ import annotations

import os

import torch

from ..backbones.base import Backbone
from ..errors import VsinkError
from .config import Recipe


def _gib(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (a CUDA device's, or the machine's RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def step_bytes(backbone: Backbone, batch: int, size: tuple[int, int], extra_tokens: int = 0) -> int:
    """Activations one training step keeps for ``batch`` images of ``size``: per block, the token
    vectors at each stage (about 8 per token), the MLP hidden units (2 per token) and the
    attention matrices (2 per head), in float32."""
    n = backbone.layout(size).num_tokens + extra_tokens
    d, heads, hidden = backbone.embed_dim, backbone.num_heads, backbone.mlp_width(0)
    per_image = backbone.num_layers * (8 * n * d + 2 * n * hidden + 2 * heads * n * n) + 3 * size[0] * size[1]
    return 4 * batch * per_image


def check_memory(cfg: Recipe, backbone: Backbone, size: tuple[int, int], device: torch.device) -> None:
    """Raise a :class:`VsinkError` with the estimate when the recipe's images or one step's
    activations (``train.batch_size`` images per process) exceed the device's memory."""
    total = device_memory(device)
    data = cfg.data
    images = (data.num_images + data.eval_images) * 3 * size[0] * size[1]
    if images > total:
        raise VsinkError(f"data.num_images={data.num_images} and data.eval_images={data.eval_images} need about "
                         f"{_gib(images)} to hold the images at {size[0]}x{size[1]}, more than the {_gib(total)} of "
                         "this machine; lower data.num_images")
    batch = cfg.train.batch_size
    extra = 0 if cfg.recipe == "sinder" else cfg.registers.n  # sinder adds no registers
    step = step_bytes(backbone, batch, size, extra)  # checked before the registers are added
    if step > total:
        raise VsinkError(f"train.batch_size={batch} needs about {_gib(step)} of activations for one step "
                         f"({backbone.num_layers} blocks at {size[0]}x{size[1]}), more than the {_gib(total)} of "
                         f"{device}; lower train.batch_size (train.grad_accum keeps the effective batch)")
