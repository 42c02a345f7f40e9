"""The ``sinder`` recipe: SINDER repair (Wang et al., ECCV 2024; haoqiwang/sinder ``main.py``,
``repair.py``, ``neighbor_loss.py``) as a fine-tuning task.

1. The weight-only defect direction after every block is computed from the pretrained weights
   (:func:`vsink.defect.defect_directions`, ``sinder.samples`` Gaussian samples per block, cached)
   and then held fixed.
2. Every linear layer of the blocks gets singular-value offsets (:mod:`.singular_offsets`); they
   are the only parameters trained.
3. Per training image, the blocks are checked in order; the first block with at least
   ``sinder.min_tokens`` anomalous patches (:func:`.neighbour_loss.anomalous`) gives the image's
   loss (:func:`.neighbour_loss.neighbour_loss`), and blocks more than ``sinder.limit_layers``
   below it get no gradient from it. An image with no such block is *anomaly-free* and adds no
   loss; a step whose images are all anomaly-free leaves the offsets as they are.
4. The run stops once ``sinder.stop_fraction`` of the last ``sinder.window`` training images
   were anomaly-free (the window starts full of images with anomalies), or after ``train.steps``.
"""

from __future__ import annotations

import copy
import sys
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from ..backbones.base import Backbone
from ..errors import VsinkError
from .config import Recipe
from .data import TrainImages, flips_for, to_input
from .loop import TrainTask
from .neighbour_loss import anomalous, neighbour_loss
from .singular_offsets import attach_offsets, bake_offsets


class BlockOutputs:
    """While in the block: every block's output tensor of the forward that runs, in
    :attr:`outputs`; when :attr:`keep` is set before the backward pass (per block, [B] of 0/1),
    the gradient reaching block ``j``'s output is multiplied by ``keep[j]`` per image."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.outputs: dict[int, torch.Tensor] = {}
        self.keep: dict[int, torch.Tensor] = {}

    def _capture(self, layer: int) -> Callable[[torch.Tensor], None]:
        def fn(t: torch.Tensor) -> None:
            self.outputs[layer] = t
            if t.requires_grad:
                t.register_hook(lambda g: g * self.keep[layer].to(g.dtype).view(-1, *[1] * (g.ndim - 1))
                                if layer in self.keep else g)
        return fn

    def __enter__(self) -> "BlockOutputs":
        self.handles = [self.backbone.hook("block_output", j, self._capture(j))
                        for j in range(self.backbone.num_layers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def anomaly_counts(backbone: Backbone, x: torch.Tensor, directions: torch.Tensor, sigmas: float) -> torch.Tensor:
    """Anomalous patches [images, blocks] of ``x`` (normalised pixels) against each block's
    defect direction (``directions`` [blocks, D]), without gradients."""
    with BlockOutputs(backbone) as seen:
        backbone.forward(x)
    layout = backbone.current_layout()
    counts = torch.zeros(len(x), backbone.num_layers, dtype=torch.long)
    for j in range(backbone.num_layers):
        grids = layout.patch_grid(seen.outputs[j])
        for b in range(len(x)):
            counts[b, j] = int(anomalous(grids[b], directions[j], sigmas).sum())
    return counts


class SinderTask(TrainTask):
    """The ``sinder`` recipe on ``base`` (module docstring); ``base`` itself is repaired."""

    def __init__(self, cfg: Recipe, base: Backbone, images: TrainImages, device: torch.device, *,
                 progress: bool = True):
        from ..defect import defect_directions

        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise VsinkError("the sinder recipe runs in one process (each image chooses its own block); start it "
                             "without torchrun")
        self.cfg, self.images, self.device, self.backbone = cfg, images, device, base
        s = cfg.sinder
        print(f"vsink: weight-only defect directions of {base.spec} ({s.samples} samples per block; cached)",
              file=sys.stderr)
        found = defect_directions(base, samples=s.samples, seed=cfg.seed, progress=progress)
        self.directions = torch.as_tensor(found.directions, dtype=torch.float32, device=device)
        self.original = copy.deepcopy(base)
        self._trainable = attach_offsets(base)
        base.model.eval()  # no dropout or stochastic depth: each image's anomalies are those of the model
        self.module, self.num_samples = base.model, len(images.pixels)
        self.eval_x = self._input(images.eval_pixels)
        self.window: deque[bool] = deque([False] * s.window, maxlen=s.window)

    def _input(self, pixels: torch.Tensor, flips: Optional[list[bool]] = None) -> torch.Tensor:
        b = self.backbone
        return to_input(pixels, b.mean, b.std, self.device, b.dtype, flips)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return self._trainable

    def loss(self, model: nn.Module, samples: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.cfg.sinder
        x = self._input(self.images.pixels[list(samples)], flips_for(positions, self.cfg.seed, self.cfg.data.flip))
        with BlockOutputs(self.backbone) as seen:
            self.backbone.train_forward(x, model)
        layout = self.backbone.current_layout()
        blocks = self.backbone.num_layers
        grids = [layout.patch_grid(seen.outputs[j]) for j in range(blocks)]
        keep = torch.ones(blocks, len(x), device=x.device)
        losses, counts, chosen = [], [], []
        for b in range(len(x)):
            for j in range(blocks):
                n = int(anomalous(grids[j][b], self.directions[j], s.sigmas).sum())
                if n >= s.min_tokens:
                    loss, _ = neighbour_loss(grids[j][b], self.directions[j], sigmas=s.sigmas, temperature=s.temperature)
                    losses.append(loss)
                    counts.append(n)
                    chosen.append(j)
                    if s.limit_layers and j - s.limit_layers >= 0:
                        keep[j - s.limit_layers, b] = 0.0  # blocks 0 .. j - limit get nothing from this image
                    break
        seen.keep = {j: keep[j] for j in range(blocks)}
        metrics = {"anomaly_free": 1.0 - len(losses) / len(x), "anomalous_tokens": sum(counts) / len(x)}
        if chosen:
            metrics["loss_block"] = sum(chosen) / len(chosen)
        if not losses:  # nothing to repair: no gradient, the optimizer leaves the offsets as they are
            return torch.zeros((), device=x.device, requires_grad=True), metrics
        return torch.stack(losses).mean(), metrics

    def stop_reason(self, record: dict[str, Any]) -> Optional[str]:
        free = record.get("anomaly_free")
        if free is None:
            return None
        n = self.cfg.train.batch_size * self.cfg.train.grad_accum
        k = round(free * n)
        self.window.extend([True] * k + [False] * (n - k))
        share = sum(self.window) / len(self.window)
        if share >= self.cfg.sinder.stop_fraction:
            return (f"{share:.0%} of the last {len(self.window)} training images were anomaly-free "
                    f"(sinder.stop_fraction {self.cfg.sinder.stop_fraction:g})")
        return None

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """On the held-out images: anomalous patches per image (summed over blocks), the share of
        anomaly-free images, and the high-norm detector's outlier fraction and norm ratio."""
        from ..detect.norms import detect_high_norm
        from ..probe import Probe

        s = self.cfg.sinder
        counts = anomaly_counts(self.backbone, self.eval_x, self.directions, s.sigmas)
        with Probe(self.backbone, attention=False) as probe:
            self.backbone.forward(self.eval_x)
        hn = detect_high_norm(probe.trace())
        return {"anomalous_tokens": float(counts.sum(1).float().mean()),
                "anomaly_free": float((counts < s.min_tokens).all(1).float().mean()),
                "outlier_fraction_max": max(h.outlier_fraction for h in hn.layers),
                "norm_ratio_max": max(h.ratio for h in hn.layers)}

    def compared_models(self) -> list[tuple[str, Backbone, Callable[[], ContextManager[Any]]]]:
        return [("original", self.original, nullcontext), ("repaired", self.backbone, nullcontext)]

    def held_out_images(self) -> list[Image.Image]:
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in self.images.eval_pixels]

    def finish(self, directory: Path) -> dict[str, Any]:
        trained = sum(p.numel() for _, p in self._trainable)
        layers = bake_offsets(self.backbone.model)
        self.backbone.save(directory)
        return {"model": str(directory), "trainable_parameters": trained, "offset_layers": layers}
