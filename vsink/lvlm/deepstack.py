"""DeepStack in an LVLM scan: what the model adds to the image positions after its first decoder
layers (Qwen3-VL; :meth:`vsink.backbones.hf_lvlm.LVLM.deepstack_layers`).

The model adds tower block ``deepstack_tower_blocks()[i]``'s merged feature to every image token's
hidden state right after decoder layer ``deepstack_layers()[i]``. :class:`DeepStackProbe` reads the
injected features from the language model's own arguments and the residual stream they are added
to (that layer's ``block_output``, which is before the injection), per image token, so a scan
reports how large the injection is against the stream at each such layer (``scan.json``
``lvlm.deepstack``; the per-token arrays in ``trace.npz``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..backbones.hf_decoder import DecoderModel
from ..backbones.hf_lvlm import LVLM
from ..backbones.hooks import HookSet
from ..errors import VsinkError
from ..probe import Rows


class DeepStackProbe(HookSet):
    """Per DeepStack layer and image token: the L2 norm of the injected feature and of the residual
    stream it is added to. Rows of a batch share one layout (a scan's), so each row holds as many
    image tokens."""

    def __init__(self, lvlm: LVLM, decoder: DecoderModel):
        super().__init__()
        self.lvlm, self.decoder = lvlm, decoder
        self.layers = lvlm.deepstack_layers()
        self.tower_blocks = lvlm.deepstack_tower_blocks()
        self.injected = [Rows() for _ in self.layers]
        self.residual = [Rows() for _ in self.layers]
        self._pass: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None

    def _install(self) -> None:
        if not self.layers:
            return
        handle = self.lvlm.observe_deepstack(self._observe)
        if handle is None:
            raise VsinkError(f"{self.lvlm.spec}: its family names DeepStack layers {self.layers} but cannot observe them")
        self._handles.append(handle)
        for i, layer in enumerate(self.layers):
            self._handles.append(self.decoder.hook("block_output", layer, self._residual_fn(i)))

    def _observe(self, masks: Optional[torch.Tensor], features: list[torch.Tensor]) -> None:
        self._pass = (masks, features) if masks is not None else None

    def _residual_fn(self, i: int):
        def fn(h: torch.Tensor) -> None:
            if self._pass is None:
                return
            masks, features = self._pass
            rows = h.shape[0]
            self.residual[i].append(h[masks.to(h.device)].float().norm(dim=-1).reshape(rows, -1))
            self.injected[i].append(features[i].float().norm(dim=-1).reshape(rows, -1))

        return fn

    def arrays(self) -> dict[str, np.ndarray]:
        """``deepstack_injected`` and ``deepstack_residual`` [DeepStack layers, images, image tokens]
        (empty without DeepStack)."""
        if not self.layers:
            return {}
        return {"deepstack_injected": np.stack([r.array() for r in self.injected]),
                "deepstack_residual": np.stack([r.array() for r in self.residual])}


def deepstack_summary(layers: list[int], tower_blocks: list[int], arrays: dict[str, np.ndarray]) -> Optional[dict[str, Any]]:
    """``scan.json``'s ``lvlm.deepstack``: per DeepStack layer the tower block it comes from and the
    injected and residual norms over every image token of every image (mean, max), and their
    ratio; None for a model without DeepStack."""
    if not layers:
        return None
    injected, residual = arrays["deepstack_injected"], arrays["deepstack_residual"]
    rows = []
    for i, (layer, block) in enumerate(zip(layers, tower_blocks)):
        mean_in, mean_res = float(injected[i].mean()), float(residual[i].mean())
        rows.append({"layer": int(layer), "tower_block": int(block), "injected_norm_mean": mean_in,
                     "injected_norm_max": float(injected[i].max()), "residual_norm_mean": mean_res,
                     "injected_to_residual": mean_in / mean_res if mean_res > 0 else None})
    return {"where": "added to every image token's hidden state after the decoder layer's output",
            "layers": rows}
