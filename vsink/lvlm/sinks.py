"""Visual sink tokens: calibrating a model's sink dimensions and detecting sinks on a prompt.
φ itself is :func:`vsink.detect.visual_sinks.rms_phi`; known dimensions come from the adapter
(:meth:`~vsink.backbones.hf_lvlm.LVLM.sink_dimensions`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..backbones.hf_decoder import decoder_of
from ..backbones.hf_lvlm import LVLM
from ..backbones.hooks import Hooks
from ..detect.visual_sinks import rms_phi, sink_flags
from ..errors import VsinkError
from ..io import write_json
from ..options import Int, ListOf, Mapping_, Text
from ..readers import checked_field, read_json

__all__ = ["Calibration", "calibrate", "detect_sinks"]


@dataclass
class Calibration:
    """``vsink lvlm calibrate`` output: the sink dimensions and how they were found."""

    model: str
    sink_dims: list[int]
    layers: list[int]
    counts: dict[str, int]
    mean_phi: dict[str, float]

    def save(self, path: Union[str, os.PathLike]) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Calibration":
        """Read a calibration JSON; every problem is an error naming the file and the field."""
        where = str(path)
        data = read_json(path, "sink calibration file")
        return cls(checked_field(data, "model", Text(), where, ""),
                   checked_field(data, "sink_dims", ListOf(Int(min=0), nonempty=True), where),
                   checked_field(data, "layers", ListOf(Int(min=0)), where, []),
                   checked_field(data, "counts", Mapping_(), where, {}),
                   checked_field(data, "mean_phi", Mapping_(), where, {}))


@torch.no_grad()
def calibrate(lvlm: LVLM, batches: Sequence[dict[str, Any]], *, layers: Optional[Sequence[int]] = None,
              num_dims: int = 2, top: int = 4, progress: bool = True) -> Calibration:
    """Find sink dimensions: on the input of early decoder layers (default 1–3), take the first
    real token of every row (BOS, the text sink) and rank dimensions by how often they are among
    its ``top`` largest φ, then by mean φ; keep ``num_dims``. ``progress`` shows a progress bar
    over the batches."""
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or not 1 <= num_dims <= lvlm.hidden_size:
        raise VsinkError(f"num_dims must be an integer in [1, {lvlm.hidden_size}] (the hidden size of {lvlm.spec}), "
                         f"got {num_dims!r}")
    layers = list(layers) if layers is not None else [i for i in (1, 2, 3) if i < lvlm.num_layers]
    counts: dict[int, int] = {}
    phis: dict[int, list[float]] = {}
    seen: list[torch.Tensor] = []
    decoder = decoder_of(lvlm)
    for inputs in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
        with Hooks(lambda handles: handles.extend(decoder.hook("block_input", i, seen.append) for i in layers)):
            lvlm.model(**inputs)
        mask = inputs.get("attention_mask")
        first = (mask.long().argmax(dim=1) if mask is not None else torch.zeros(len(inputs["input_ids"]), dtype=torch.long))
        for h in seen:
            phi = rms_phi(h)[torch.arange(h.shape[0]), first.to(h.device)]  # [B, D]
            values, dims = phi.topk(top, dim=-1)
            for row_v, row_d in zip(values.tolist(), dims.tolist()):
                for v, d in zip(row_v, row_d):
                    counts[d] = counts.get(d, 0) + 1
                    phis.setdefault(d, []).append(v)
        seen.clear()
    if not counts:
        raise VsinkError("calibration saw no tokens")
    ranked = sorted(counts, key=lambda d: (-counts[d], -sum(phis[d]) / len(phis[d])))
    if len(ranked) < num_dims:
        raise VsinkError(f"num_dims {num_dims}: only {len(ranked)} dimensions were ever among the top {top} φ of the "
                         f"first token over these prompts; ask for at most {len(ranked)}")
    chosen = ranked[:num_dims]
    return Calibration(model=lvlm.spec, sink_dims=chosen, layers=layers,
                       counts={str(d): counts[d] for d in ranked[:16]},
                       mean_phi={str(d): sum(phis[d]) / len(phis[d]) for d in ranked[:16]})


def detect_sinks(lvlm: LVLM, inputs: dict[str, Any], dims: Sequence[int], tau: float = 20.0) -> torch.Tensor:
    """Sink flags [layers, B, N] of a prompt: max over ``dims`` of φ on each layer's input > tau."""
    flags: list[torch.Tensor] = []
    decoder = decoder_of(lvlm)

    def observe(h: torch.Tensor) -> None:
        flags.append(sink_flags(h, list(dims), tau).to(lvlm.device))  # layers may sit on several devices

    with Hooks(lambda handles: handles.extend(decoder.hook("block_input", i, observe)
                                              for i in range(decoder.num_layers))), torch.no_grad():
        lvlm.model(**inputs)
    return torch.stack(flags)
