"""Dense metrics under ablation (``vsink ablate --dense``): each (target, layer, ablation) of an
ablation run becomes a model variant of :func:`vsink.evaluate.dense.evaluate_dense`, which then
measures the clean model and every ablated one on the same dense dataset — linear-probe mIoU,
LOST CorLoc and the artifact metrics, with bootstrap intervals over the images and paired
intervals of each variant's difference from the clean model.

Each ablated model is evaluated as a model of its own: the linear head is trained and evaluated
with the ablation in place (a probe of what the ablated features still carry). The replacement
must not depend on the image, since the dense images are not the ones the ablation was chosen on:
the targets are those whose entries are fixed positions or channels (``neurons``: units at every
token; ``registers``: the register positions), and the ablations those whose values come from the
ablation run's clean pass as one value per position (``zero``, ``mean-images``, ``mean-kind``).
Per-image targets (sinks, high-norm tokens, massive activations) and ``resample`` are refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from .backbones.base import Backbone
from .errors import VsinkError
from .evaluate.variants import Variant

#: targets and ablations whose replacement is the same for every image
DENSE_TARGETS = ("neurons", "registers")
DENSE_ABLATIONS = ("zero", "mean-images", "mean-kind")


def check_dense(targets: list[str], ablations: list[str]) -> None:
    """Refuse, before any pass, what dense metrics under ablation cannot take (module docstring)."""
    bad_targets = [t for t in targets if t not in DENSE_TARGETS]
    if bad_targets:
        raise VsinkError(f"--dense: target(s) {', '.join(bad_targets)} select tokens per image, which the dense images "
                         f"do not share; dense metrics under ablation take the targets {', '.join(DENSE_TARGETS)}")
    bad = [a for a in ablations if a not in DENSE_ABLATIONS]
    if bad:
        raise VsinkError(f"--dense: ablation(s) {', '.join(bad)} need(s) a paired image; dense metrics under ablation "
                         f"take the ablations {', '.join(DENSE_ABLATIONS)}")


@dataclass(frozen=True)
class AblationVariant(Variant):
    """The model with one ablation installed: ``positions`` [N] bool (the tokens replaced),
    ``channels`` (None: all), ``values`` [N, C'] (the same for every image)."""

    site: str = "block_output"
    layer: int = 0
    positions: Optional[torch.Tensor] = field(default=None, compare=False)
    channels: Optional[tuple[int, ...]] = None
    values: Optional[torch.Tensor] = field(default=None, compare=False)

    def describe(self) -> str:
        what = "all channels" if self.channels is None else f"channel(s) {list(self.channels)}"
        return f"{self.name} (ablation: {int(self.positions.sum())} token position(s), {what}, {self.site} block {self.layer})"

    def check(self, base: Backbone) -> None:
        return None

    @contextmanager
    def open(self, base: Backbone, **load_kwargs: Any) -> Iterator[Backbone]:
        positions, values, channels = self.positions, self.values, list(self.channels) if self.channels else None

        def fn(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] != positions.shape[0]:
                raise VsinkError(f"ablation {self.name}: the dense images give {x.shape[1]} tokens, the ablation was "
                                 f"chosen on {positions.shape[0]}; use the same input size")
            mask = positions.to(x.device)[None, :, None]
            new = values.to(device=x.device, dtype=x.dtype)[None]
            if channels is None:
                return torch.where(mask, new, x)
            out = x.clone()
            out[:, :, channels] = torch.where(mask, new, x[:, :, channels])
            return out

        handle = base.hook(self.site, self.layer, fn)
        try:
            yield base
        finally:
            handle.remove()


def ablation_variant(name: str, selection: Any, values: torch.Tensor) -> AblationVariant:
    """The variant of ``selection`` (a :class:`vsink.ablate.Selection` of a dense target) replaced
    by ``values`` [I, N, C'] (:func:`vsink.ablate.replacement`), checked to be the same for
    every image."""
    tokens = torch.as_tensor(selection.tokens)
    if not bool((tokens == tokens[:1]).all()) or not bool((values == values[:1]).all()):
        raise VsinkError(f"ablation {name}: its replacement differs between images, so it cannot be applied to other "
                         "images")
    return AblationVariant(name, kind="ablation", site=selection.site, layer=selection.layer, positions=tokens[0],
                           channels=None if selection.channels is None else tuple(selection.channels),
                           values=values[0].float())
