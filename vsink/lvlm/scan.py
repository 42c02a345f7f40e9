"""``vsink scan`` on an LVLM: the language model's sinks and the vision tower in one run.

One forward pass per batch of (image, prompt) rows observes two site models at once — the vision
tower (a :class:`~vsink.backbones.base.Backbone`) and the decoder
(:class:`~vsink.backbones.hf_decoder.DecoderModel`) — with the same :class:`~vsink.probe.Probe`
and detectors as a vision scan, plus φ on the decoder layers' inputs (VAR's visual-sink score,
:func:`vsink.detect.visual_sinks.rms_phi`). The result has the tower's scan in the vision schema and an
``lvlm`` section per decoder layer:

* ``bos_share``: attention received by the first token (BOS), mean over heads, queries and rows;
* ``image_attention_share``: attention received by the image tokens together;
* ``visual_sink_tokens``: per image, the image-token indices with φ above τ on the sink dims;
* ``massive``: massive activations of that layer's output (Sun et al. 2024), strongest first;

``deepstack`` (Qwen3-VL; None for other families): per decoder layer after which the model adds
tower features to the image tokens, the tower block they come from and the norms of the injected
features and of the residual stream they are added to (:mod:`vsink.lvlm.deepstack`; that layer's
``massive`` is of its output before the injection, the next layer's φ after it);

and ``tower_to_llm``: which of the tower's high-norm tokens (at its emergence layer) arrive as
visual sink tokens in the language model, where the model maps tower patches to image tokens one
to one (LLaVA-1.5 and the demo).
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..arguments import ArgumentError, images_arg, int_arg
from ..backbones.base import evaluating
from ..backbones.hf_lvlm import lvlm_arg
from ..version import __version__
from ..backbones.hf_decoder import DecoderModel, decoder_of
from ..backbones.hf_lvlm import LVLM
from ..backbones.hooks import HookSet
from ..detect import MassiveActivation, detect_massive
from ..errors import VsinkError
from ..images import ImageSource, NamedImage, load_batch
from ..io import write_json, write_text
from ..layout import PromptLayout
from ..manifest import weights_fingerprint
from ..probe import Probe, Rows, Trace
from ..scan import MASSIVE_TOP_K, NothingScanned, ScanResult, result_of_trace
from ..detect.visual_sinks import rms_phi
from .deepstack import DeepStackProbe, deepstack_summary
from ..viewbox import DISPLAY_SIDE, ViewBox

#: visual sink tokens listed per image and layer in scan.json (the full φ array is in trace.npz)
MAX_SINK_TOKENS = 256
MAX_MASSIVE_PER_LAYER = 16
REPORT_IMAGES = 12
#: largest |activations| kept per decoder layer output: many sink tokens share one dimension, so a
#: handful (the vision scan's MASSIVE_TOP_K) would show only the largest dimension
DECODER_MASSIVE_TOP_K = 64


class PhiProbe(HookSet):
    """Max over the sink dimensions of φ on every decoder layer's input, per token [B, N]."""

    def __init__(self, decoder: DecoderModel, dims: Sequence[int]):
        super().__init__()
        self.decoder, self.dims = decoder, list(dims)
        self.rows = [Rows() for _ in range(decoder.num_layers)]

    def _install(self) -> None:
        for layer, store in enumerate(self.rows):
            self._handles.append(self.decoder.hook("block_input", layer,
                                                   lambda h, store=store: store.append(rms_phi(h, self.dims).amax(-1))))

    def array(self) -> np.ndarray:
        """φ [layers, images, tokens]."""
        return np.stack([store.array() for store in self.rows])


@dataclass
class LVLMScanResult:
    """What :func:`scan_lvlm` found (``to_json()`` is ``scan.json``; see docs/lvlm.md)."""

    model: str
    synthetic: bool
    prompt: str
    images: list[str]
    skipped: list[dict[str, str]]
    layout: PromptLayout
    trace: Trace
    phi: np.ndarray  # [layers, images, tokens]
    sink_dims: list[int]
    sink_dims_source: str
    tau: float
    massive: list[MassiveActivation]
    vision: Optional[ScanResult]
    tower_patches_are_image_tokens: bool
    settings: dict[str, Any] = field(default_factory=dict)
    #: :func:`vsink.manifest.weights_fingerprint` of the LVLM (recorded in ``vsink-run.json``)
    weights: Optional[str] = None
    #: per image: its (width, height), the region the processor fed to the model, and that region
    #: as drawn in the report (the first :data:`REPORT_IMAGES`)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    view_boxes: list[ViewBox] = field(default_factory=list)
    thumbnails: list[Image.Image] = field(default_factory=list, repr=False)
    #: DeepStack (Qwen3-VL): the decoder layers, their tower blocks and the per-token norms
    #: [layers, images, image tokens] of :class:`~vsink.lvlm.deepstack.DeepStackProbe`
    deepstack_layers: list[int] = field(default_factory=list)
    deepstack_tower_blocks: list[int] = field(default_factory=list)
    deepstack: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # --- per-layer summaries ---------------------------------------------------------------
    def visual_sinks(self, layer: int) -> np.ndarray:
        """Boolean [images, image tokens]: φ > τ on the image tokens at the input of ``layer``."""
        return self.layout.patches(self.phi[layer], dim=1) > self.tau

    def layer_summaries(self) -> list[dict[str, Any]]:
        shares = self.trace.attn_received.mean(axis=2)  # [L, I, N]
        image = self.layout.patch_slice
        out = []
        for layer in range(len(self.trace.layers)):
            sinks = self.visual_sinks(layer)
            strongest = _strongest_per_dim([m for m in self.massive if m.layer == layer])
            out.append({
                "index": int(self.trace.layers[layer]),
                "bos_share": float(shares[layer, :, 0].mean()),
                "image_attention_share": float(shares[layer][:, image].sum(axis=1).mean()),
                "visual_sink_tokens": [np.flatnonzero(row)[:MAX_SINK_TOKENS].tolist() for row in sinks],
                "visual_sink_count": int(sinks.sum()),
                "massive": strongest[:MAX_MASSIVE_PER_LAYER],
            })
        return out

    def per_image(self) -> list[dict[str, Any]]:
        """Per image: its size and view box, its visual sink tokens (distinct image tokens with φ
        above τ at any decoder layer) and how many (layer, token) entries."""
        sinks = np.stack([self.visual_sinks(layer) for layer in range(self.phi.shape[0])])  # [L, I, P]
        out = []
        for i, name in enumerate(self.images):
            entry: dict[str, Any] = {"image": name}
            if i < len(self.image_sizes):
                entry["size"] = [int(v) for v in self.image_sizes[i]]
            if i < len(self.view_boxes):
                entry["view_box"] = self.view_boxes[i].to_list()
            entry.update({"visual_sink_tokens": int(sinks[:, i].any(axis=0).sum()),
                          "visual_sink_entries": int(sinks[:, i].sum()),
                          "bos_share": float(self.trace.attn_received[:, i, :, 0].mean()),
                          "image_attention_share": float(
                              self.trace.attn_received[:, i][..., self.layout.patch_slice].sum(-1).mean())})
            if self.deepstack:
                entry["deepstack_injected_norm"] = [float(v) for v in self.deepstack["deepstack_injected"][:, i].mean(-1)]
            out.append(entry)
        return out

    def head_shares(self) -> dict[str, np.ndarray]:
        """[decoder layers, heads] shares of attention (mean over queries and images): on BOS, on
        the image tokens, and on the visual sink tokens of that layer (φ > τ)."""
        received = self.trace.attn_received  # [L, I, H, N]
        image = self.layout.patch_slice
        on_sinks = np.zeros(received.shape[0:1] + received.shape[2:3])
        for layer in range(received.shape[0]):
            mask = np.zeros(received.shape[1:2] + received.shape[3:], dtype=bool)  # [I, N]
            mask[:, image] = self.visual_sinks(layer)
            on_sinks[layer] = (received[layer] * mask[:, None, :]).sum(-1).mean(0)
        return {"bos": received[..., 0].mean(axis=1), "image": received[..., image].sum(-1).mean(axis=1),
                "visual_sinks": on_sinks}

    def tower_to_llm(self) -> Optional[dict[str, Any]]:
        """The tower's high-norm tokens (at its emergence layer) against the LLM's visual sink
        tokens (any decoder layer), image by image; None where the patch → token map is unknown."""
        if self.vision is None or not self.tower_patches_are_image_tokens:
            return None
        hn = self.vision.high_norm
        if hn.emergence_layer is None:
            return {"tower_layer": None, "tower_high_norm": 0, "visual_sinks": int(self.visual_sinks(0).sum()),
                    "both": 0, "images": []}
        tower = hn.mask(hn.emergence_layer)
        llm = np.any([self.visual_sinks(layer) for layer in range(self.phi.shape[0])], axis=0)
        both = tower & llm
        return {"tower_layer": hn.emergence_layer, "tower_high_norm": int(tower.sum()), "visual_sinks": int(llm.sum()),
                "both": int(both.sum()),
                "images": [{"image": i, "high_norm": np.flatnonzero(tower[i]).tolist(),
                            "visual_sinks": np.flatnonzero(llm[i]).tolist()} for i in range(len(self.images))]}

    def deepstack_summary(self) -> Optional[dict[str, Any]]:
        """``lvlm.deepstack`` of scan.json (:func:`vsink.lvlm.deepstack.deepstack_summary`)."""
        return deepstack_summary(self.deepstack_layers, self.deepstack_tower_blocks, self.deepstack)

    def to_json(self) -> dict[str, Any]:
        return {
            "vsink_version": __version__,
            "model": self.model,
            "synthetic": self.synthetic,
            "prompt": self.prompt,
            "images": self.images,
            "skipped": self.skipped,
            "per_image": self.per_image(),
            "lvlm": {
                "layout": self.layout.to_dict(),
                "sink_dims": self.sink_dims,
                "sink_dims_source": self.sink_dims_source,
                "tau": self.tau,
                "layers": self.layer_summaries(),
                "tower_to_llm": self.tower_to_llm(),
                "deepstack": self.deepstack_summary(),
            },
            "vision": self.vision.to_json() if self.vision is not None else None,
            "settings": self.settings,
        }

    def save(self, out_dir: Union[str, os.PathLike]) -> dict[str, Path]:
        """``scan.json``, ``report.html``, the decoder's ``trace.npz`` (with φ) and the tower's
        ``vision/`` scan, written as one set with its ``vsink-run.json``
        (:class:`vsink.outputs.OutputSet`): a failure leaves the earlier set as it was."""
        from ..export.lvlm_report import render_lvlm_report
        from ..outputs import OutputSet

        report = render_lvlm_report(self)
        determining = {"model": self.model, "weights": self.weights, "prompt": self.prompt, "images": self.images,
                       "settings": self.settings, "vsink_version": __version__}
        out = Path(out_dir)
        with OutputSet(out, "vsink scan --prompt", {"determining": determining}) as stage:
            self.trace.save(stage / "trace.npz", extra={"phi": self.phi, **self.deepstack})
            if self.vision is not None:
                self.vision.save(stage / "vision")
            write_text(stage / "report.html", report)
            write_json(stage / "scan.json", self.to_json())
        paths = {"trace": out / "trace.npz", "report": out / "report.html", "json": out / "scan.json",
                 "record": out / "vsink-run.json"}
        if self.vision is not None:
            paths["vision"] = out / "vision"
        return paths


def scan_lvlm(
    lvlm: LVLM,
    images: Sequence[Union[ImageSource, NamedImage]],
    prompt: str,
    *,
    batch_size: int = 4,
    sink_dims: Optional[Sequence[int]] = None,
    tau: float = 20.0,
    sink_ratio: float = 5.0,
    massive_ratio: float = 100.0,
    progress: bool = True,
) -> LVLMScanResult:
    """Scan an LVLM's language model (sinks, φ, massive activations) and its vision tower on
    ``images``, each with the same ``prompt``.

    Args:
        sink_dims: the LLM's sink dimensions (default: the model's known ones, else calibrated on
            these rows' BOS tokens with :func:`vsink.lvlm.sinks.calibrate`).
        tau: φ threshold of a visual sink token (VAR's τ).
    """
    lvlm = lvlm_arg(lvlm)
    images = images_arg(images)
    int_arg(batch_size, "batch_size", 1)
    if not isinstance(prompt, str):
        raise ArgumentError(f"prompt must be text, got a {type(prompt).__name__}")
    if not prompt.strip():
        raise VsinkError("--prompt is empty; an LVLM scan needs the prompt the images are asked with")
    decoder = decoder_of(lvlm)
    try:
        tower = lvlm.vision_backbone()
    except VsinkError:
        tower = None
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    batches: list[list[Image.Image]] = []
    for start in range(0, len(images), batch_size):
        loaded, batch_names, failed = load_batch(images[start:start + batch_size], start)
        for entry in failed:
            print(f"vsink: skipped {entry['reason']}", file=sys.stderr)
        skipped += failed
        if loaded:
            batches.append(loaded)
            names += batch_names
    if not batches:
        raise NothingScanned(skipped)
    first = lvlm.prepare(batches[0], [prompt] * len(batches[0]), options=lvlm.scan_options())
    decoder.set_layout(first)
    dims, source = _sink_dims(lvlm, first, sink_dims)
    bar = tqdm(total=len(names), desc="scan", unit="img", disable=not progress)
    deepstack = DeepStackProbe(lvlm, decoder)
    probes = [Probe(decoder, massive=DECODER_MASSIVE_TOP_K), PhiProbe(decoder, dims), deepstack]
    if tower is not None:
        probes.append(Probe(tower, massive=MASSIVE_TOP_K))
    with torch.inference_mode(), ExitStack() as stack:
        stack.enter_context(evaluating(lvlm.model))
        for probe in probes:
            stack.enter_context(probe)
        for batch in batches:
            inputs = first if batch is batches[0] else lvlm.prepare(batch, [prompt] * len(batch),
                                                                     options=lvlm.scan_options())
            decoder.set_layout(inputs)
            lvlm.model(**inputs, use_cache=False)
            bar.update(len(batch))
    bar.close()
    trace = probes[0].trace(meta={"model": lvlm.spec, "images": names, "prompt": prompt})
    vision = None
    originals = [img for batch in batches for img in batch]
    boxes = [lvlm.view_box(img.size) for img in originals]
    thumbnails = [box.crop(img, lvlm.view_fill(), DISPLAY_SIDE)
                  for box, img in zip(boxes[:REPORT_IMAGES], originals[:REPORT_IMAGES])]
    if tower is not None:
        vision = result_of_trace(tower, probes[3].trace(meta={"model": tower.spec, "images": names}),
                                 size=tower.img_size, names=names, skipped=skipped, sink_ratio=sink_ratio,
                                 massive_ratio=massive_ratio, batch_size=batch_size, thumbnails=thumbnails,
                                 synthetic=lvlm.synthetic, image_sizes=[img.size for img in originals],
                                 view_boxes=boxes)
    layout = decoder.layout()
    return LVLMScanResult(
        model=lvlm.spec, synthetic=lvlm.synthetic, prompt=prompt, images=names, skipped=skipped, layout=layout,
        trace=trace, phi=probes[1].array(), sink_dims=dims, sink_dims_source=source, tau=tau,
        massive=detect_massive(trace, min_ratio=massive_ratio), vision=vision,
        tower_patches_are_image_tokens=tower is not None and lvlm.tower_patches_are_image_tokens(layout),
        image_sizes=[img.size for img in originals], view_boxes=boxes, thumbnails=thumbnails,
        settings={"batch_size": batch_size, "tau": tau, "sink_ratio": sink_ratio, "massive_ratio": massive_ratio,
                  "dtype": str(decoder.dtype).removeprefix("torch."), "device": str(decoder.device)},
        weights=weights_fingerprint(lvlm.model),
        deepstack_layers=deepstack.layers, deepstack_tower_blocks=deepstack.tower_blocks, deepstack=deepstack.arrays(),
    )


def _strongest_per_dim(found: list[MassiveActivation]) -> list[dict[str, Any]]:
    """One entry per residual dimension — its strongest massive activation, with how many (image,
    token) pairs and which token kinds carry it — largest ratio first."""
    by_dim: dict[int, list[MassiveActivation]] = {}
    for m in found:
        by_dim.setdefault(m.dim, []).append(m)
    rows = []
    for dim, entries in by_dim.items():
        top = max(entries, key=lambda m: m.ratio)
        rows.append({"dim": dim, "image": top.image, "token": top.token, "kind": top.kind, "value": top.value,
                     "ratio": top.ratio, "tokens": len(entries), "kinds": sorted({m.kind for m in entries})})
    return sorted(rows, key=lambda r: -r["ratio"])


def _sink_dims(lvlm: LVLM, inputs: dict[str, Any], given: Optional[Sequence[int]]) -> tuple[list[int], str]:
    from .sinks import calibrate

    if given:
        return lvlm.sink_dimensions(given), "given"
    if lvlm.known_sink_dims():
        return lvlm.sink_dimensions(), "known"
    return calibrate(lvlm, [inputs], progress=False).sink_dims, "calibrated"
