"""Patch features of any block: output tokens (optionally through the final norm) or the
attention's queries, keys and values, laid out on the patch grid.

Class tokens, registers and appended test-time registers are removed through the
:class:`~vsink.layout.TokenLayout`; every requested feature of a batch comes from one forward pass.

Example::

    specs = [FeatureSpec(-1), FeatureSpec(-1, "k")]
    with FeatureCapture(backbone, specs) as capture:
        backbone.forward(pixel_values)
        feats = capture.pop()          # {spec: [B, h, w, C]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .backbones.base import Backbone
from .backbones.hooks import HookSet
from .errors import VsinkError

FEATURE_KINDS = ("tokens", "q", "k", "v")


@dataclass(frozen=True)
class FeatureSpec:
    """Which feature to take.

    Args:
        layer: block index (negative counts from the end).
        kind: ``tokens`` (block output), or ``q`` / ``k`` / ``v`` of the block's attention
            (heads concatenated).
        norm: ``tokens`` only: pass the block output through the model's final norm (as
            DINOv2's ``get_intermediate_layers(norm=True)`` and timm's
            ``forward_intermediates(norm=True)`` do).
    """

    layer: int = -1
    kind: str = "tokens"
    norm: bool = True

    def resolve(self, num_layers: int) -> "FeatureSpec":
        """The same spec with a non-negative layer; raises a clear error when out of range."""
        if self.kind not in FEATURE_KINDS:
            raise VsinkError(f"unknown feature kind {self.kind!r}; kinds are {', '.join(FEATURE_KINDS)}")
        if not -num_layers <= self.layer < num_layers:
            raise VsinkError(f"feature layer {self.layer} out of range for {num_layers} blocks")
        return FeatureSpec(self.layer % num_layers, self.kind, self.norm and self.kind == "tokens")

    def describe(self) -> str:
        suffix = "+norm" if self.norm and self.kind == "tokens" else ""
        return f"block {self.layer} {self.kind}{suffix}"


class FeatureCapture(HookSet):
    """Capture patch features of the requested specs during each forward pass.

    The hooks observe only (outputs are unchanged; ``q``/``k``/``v`` route that block's
    attention through vsink's explicit attention, equal to the library's to float tolerance).
    Always removes its hooks on exit.
    """

    def __init__(self, backbone: Backbone, specs: Sequence[FeatureSpec]):
        super().__init__()
        self.backbone = backbone
        self._resolved = {s: s.resolve(backbone.num_layers) for s in specs}
        self.specs = list(dict.fromkeys(self._resolved.values()))
        if not self.specs:
            raise VsinkError("request at least one feature")
        self._out: dict[FeatureSpec, torch.Tensor] = {}

    def _install(self) -> None:
        for spec in self.specs:
            if spec.kind == "tokens":
                self._handles.append(self.backbone.hook("block_output", spec.layer, self._tokens_fn(spec)))
            else:
                self._handles.append(self.backbone.hook("attn_qkv", spec.layer, self._qkv_fn(spec)))

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.current_layout().patch_grid(tokens.detach().float())

    def _tokens_fn(self, spec: FeatureSpec):
        def fn(x: torch.Tensor) -> None:
            if spec.norm:
                x = self.backbone.final_norm(x)
            self._out[spec] = self._grid(x)

        return fn

    def _qkv_fn(self, spec: FeatureSpec):
        index = "qkv".index(spec.kind)

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            t = (q, k, v)[index]
            B, H, N, d = t.shape
            self._out[spec] = self._grid(t.transpose(1, 2).reshape(B, N, H * d))

        return fn

    def pop(self) -> dict[FeatureSpec, torch.Tensor]:
        """The features of the last forward pass, ``{spec: [B, h, w, C]}`` (float32, keyed by the
        specs as requested); clears them."""
        missing = [s.describe() for s in self.specs if s not in self._out]
        if missing:
            raise VsinkError(f"no features captured for {', '.join(missing)}; run backbone.forward first")
        out = {spec: self._out[resolved] for spec, resolved in self._resolved.items()}
        self._out = {}
        return out


def extract_features(backbone: Backbone, pixel_values: torch.Tensor,
                     specs: Optional[Sequence[FeatureSpec]] = None) -> dict[FeatureSpec, torch.Tensor]:
    """One forward pass → ``{spec: [B, h, w, C]}`` (default: last block, after the final norm)."""
    with FeatureCapture(backbone, specs or [FeatureSpec()]) as capture:
        backbone.forward(pixel_values)
        return capture.pop()
