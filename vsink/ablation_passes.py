"""The passes of a causal ablation (:mod:`vsink.ablate`): what a target selects
(:class:`Selection`, :func:`select`), what replaces it (:func:`replacement`), the hook that puts it
in place (:func:`install_ablation`) and one observed pass over the images (:func:`run_pass`).
Shared by the vision workflow (:mod:`vsink.ablate`), its dense measures (:mod:`vsink.ablate_dense`)
and the LVLM measures (:mod:`vsink.ablate_lvlm`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from .backbones.base import Backbone
from .backbones.hooks import Hooks
from .detect.attention import detect_sinks
from .detect.massive import detect_massive
from .detect.norms import HighNormResult
from .errors import VsinkError
from .layout import TokenLayout
from .probe import Probe, Trace
from .scan import MASSIVE_TOP_K

TARGETS = ("sinks", "registers", "high-norm", "massive", "neurons")
ABLATIONS = ("zero", "mean-images", "mean-kind", "resample")


@dataclass
class Selection:
    """The entries one target selects at one site of one block: ``tokens`` bool [images, tokens]
    and ``channels`` (None: every channel)."""

    target: str
    layer: int
    site: str
    tokens: np.ndarray
    channels: Optional[list[int]] = None

    @property
    def count(self) -> int:
        """Selected tokens over all images."""
        return int(self.tokens.sum())

    def describe(self) -> str:
        what = f"{self.count} token(s) over {self.tokens.shape[0]} image(s)"
        if self.channels is not None:
            what += f", channel(s) {self.channels}"
        return f"{self.target} at block {self.layer} ({self.site}): {what}"


@dataclass
class Pass:
    """What one pass over the images observed."""

    trace: Trace
    features: torch.Tensor          # [I, N, D] final features (last block output through the final norm)
    outputs: Optional[torch.Tensor]  # [I, D] the model's output, when it is one tensor per image
    sites: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # clean site values [I, N, C]


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (``n >= 2``)."""
    if n < 2:
        raise VsinkError("resample needs at least 2 images (each takes another image's values)")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def replacement(selection: Selection, ablation: str, clean: Optional[torch.Tensor], layout: TokenLayout,
                seed: int = 0) -> torch.Tensor:
    """The values that replace the selected entries, [I, N, C'] over the selected channels (C' = all
    channels when ``selection.channels`` is None); only the selected entries of it are used.
    ``clean`` holds the site's clean values [I, N, C] (not needed for ``zero``)."""
    if ablation not in ABLATIONS:
        raise VsinkError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
    if clean is None:
        raise VsinkError(f"ablation {ablation!r} needs the clean values of the site")
    values = clean if selection.channels is None else clean[:, :, selection.channels]
    images = values.shape[0]
    if ablation == "zero":
        return torch.zeros_like(values)
    if ablation == "mean-images":
        return values.mean(dim=0, keepdim=True).expand_as(values)
    if ablation == "resample":
        return values[torch.as_tensor(derangement(images, seed))]
    mask = torch.as_tensor(selection.tokens)
    out = torch.empty_like(values)
    kinds = np.array(layout.kinds())
    for kind in sorted(set(kinds.tolist())):
        of_kind = torch.as_tensor(kinds == kind)[None, :].expand(images, -1)
        pool = of_kind & ~mask if bool((of_kind & ~mask).any()) else of_kind
        mean = values[pool].mean(dim=0)
        out[:, torch.as_tensor(kinds == kind)] = mean
    return out


def install_ablation(backbone: Backbone, selection: Selection, values: torch.Tensor, batch: list[int]) -> Hooks:
    """The ablation of ``selection`` with ``values`` [I, N, C'] (from :func:`replacement`), a hook set
    to enter (``with install_ablation(...):``). ``batch`` is read at every call: the image indices of
    the batch being run (fill it before each forward)."""
    mask_all = torch.as_tensor(selection.tokens)
    channels = selection.channels

    def fn(x: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(batch)
        if x.shape[:2] != (len(batch), mask_all.shape[1]):
            raise VsinkError(f"ablation of {selection.target}: the site holds {tuple(x.shape[:2])} (images, tokens), "
                             f"the selection {(len(batch), mask_all.shape[1])}")
        mask = mask_all[idx].to(x.device)[..., None]
        new = values[idx].to(device=x.device, dtype=x.dtype)
        if channels is None:
            return torch.where(mask, new, x)
        out = x.clone()
        out[:, :, channels] = torch.where(mask, new, x[:, :, channels])
        return out

    return Hooks(lambda handles: handles.append(backbone.hook(selection.site, selection.layer, fn)))


def _final_features(backbone: Backbone, store: list[torch.Tensor]):
    norm = backbone.final_norm

    def fn(x: torch.Tensor) -> None:
        with torch.no_grad():
            store.append(norm(x).detach().float().cpu())

    return fn


@torch.no_grad()
def run_pass(backbone: Backbone, batches: Iterable[torch.Tensor], *, capture: Sequence[tuple[str, int]] = (),
             ablation: Optional[tuple[Selection, torch.Tensor]] = None) -> Pass:
    """One pass over ``batches`` (preprocessed pixel values, any iterable), optionally with an ablation installed:
    the probe's trace (norms, attention, massive activations), the final features, the model output
    and the values of the ``capture`` sites (after the ablation, which is installed first)."""
    batch: list[int] = []
    features: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    captured: dict[tuple[str, int], list[torch.Tensor]] = {key: [] for key in capture}

    def install(handles: list[Any]) -> None:
        if ablation is not None:  # first: every observer below sees the ablated values
            handles.append(install_ablation(backbone, ablation[0], ablation[1], batch).__enter__())
        for key, store in captured.items():
            handles.append(backbone.hook(key[0], key[1], lambda x, s=store: s.append(x.detach().float().cpu())))
        handles.append(backbone.hook("block_output", backbone.num_layers - 1, _final_features(backbone, features)))

    with Hooks(install), Probe(backbone, massive=MASSIVE_TOP_K) as probe:
        start, count = 0, 0
        for count, pixel_values in enumerate(batches, 1):
            batch[:] = range(start, start + pixel_values.shape[0])
            out = probe.run(pixel_values)
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                outputs.append(out.detach().float().cpu())
            start += pixel_values.shape[0]
    trace = probe.trace(meta={"model": backbone.spec})
    trace.check_finite(backbone.spec)
    return Pass(trace=trace, features=torch.cat(features),
                outputs=torch.cat(outputs) if outputs and len(outputs) == count else None,
                sites={key: torch.cat(v) for key, v in captured.items()})


def select(target: str, layer: int, trace: Trace, *, high_norm: HighNormResult, sink_ratio: float,
           massive_ratio: float, neurons: Optional[list[int]] = None) -> Selection:
    """The entries ``target`` selects at block ``layer``, from the clean pass's ``trace``."""
    layout, images = trace.layout, trace.num_images
    tokens = np.zeros((images, layout.num_tokens), dtype=bool)
    if target == "registers":
        regs = layout.register_indices()  # trained, then appended (test-time) registers
        if not regs:
            raise VsinkError(f"target registers: the model has no registers ({layout.describe()}); add test-time "
                             "registers with --test-time-registers or use a model trained with registers")
        tokens[:, regs] = True
        return Selection(target, layer, "block_output", tokens)
    if target == "high-norm":
        tokens[:, layout.patch_slice] = high_norm.mask(layer)
        return Selection(target, layer, "block_output", tokens)
    if target == "sinks":
        for s in detect_sinks(trace, ratio=sink_ratio):
            if s.layer == layer:
                tokens[s.image, s.token] = True
        return Selection(target, layer, "block_output", tokens)
    if target == "massive":
        dims = set()
        for m in detect_massive(trace, min_ratio=massive_ratio):
            if m.layer == layer:
                tokens[m.image, m.token] = True
                dims.add(m.dim)
        return Selection(target, layer, "block_output", tokens, sorted(dims))
    if target == "neurons":
        tokens[:] = True
        return Selection(target, layer, "mlp_hidden", tokens, list(neurons or []))
    raise VsinkError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")


__all__ = ["ABLATIONS", "Pass", "Selection", "TARGETS", "derangement", "install_ablation", "replacement",
           "run_pass", "select"]
