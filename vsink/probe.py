"""Probes observe a backbone's sites and reduce on the fly into a :class:`Trace`.

A probe never holds all layers' full attention (L*H*N^2 floats): attention arrives in query
blocks from :mod:`vsink.attention` and is reduced per block into per-key and per-head
statistics; block outputs are reduced to per-token L2 norms.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .arguments import index_list_arg
from .backbones.base import Backbone, backbone_arg
from .backbones.hooks import HookSet
from .backbones.sites import SiteModel
from .errors import VsinkError
from .io import atomic_path
from .layout import TokenLayout


#: values per image the massive-activation median is computed from (a strided sample beyond)
MEDIAN_SAMPLES = 2**18


@dataclass
class Trace:
    """Reduced tensors a probe collected, indexed by layer position in :attr:`layers`.

    Arrays (``I`` images, ``N`` tokens in model order, ``H`` heads):

    * ``norms`` [L, I, N]: L2 norm of each token of each block's output;
    * ``input_norms`` [I, N]: L2 norm of each token entering the first block (the embedding
      output), for the high-norm detector's growth check;
    * ``attn_received`` [L, I, H, N]: attention each key token receives, averaged over queries;
    * ``attn_cls`` [L, I, H, N]: attention from the (first) class token to every token;
    * ``attn_entropy`` [L, I, H]: attention entropy (nats) averaged over queries;
    * ``massive_values`` / ``massive_tokens`` / ``massive_dims`` [L, I, k]: the k largest
      |activations| of each block output (signed value, token, residual dimension);
    * ``massive_median`` [L, I]: median |activation| of each block output, estimated on an evenly
      strided sample of at most :data:`MEDIAN_SAMPLES` values (exact for smaller outputs).
    """

    layout: TokenLayout
    layers: list[int]
    norms: Optional[np.ndarray] = None
    input_norms: Optional[np.ndarray] = None
    attn_received: Optional[np.ndarray] = None
    attn_cls: Optional[np.ndarray] = None
    attn_entropy: Optional[np.ndarray] = None
    massive_values: Optional[np.ndarray] = None
    massive_tokens: Optional[np.ndarray] = None
    massive_dims: Optional[np.ndarray] = None
    massive_median: Optional[np.ndarray] = None
    meta: dict[str, Any] = field(default_factory=dict)

    ARRAYS = ("norms", "attn_received", "attn_cls", "attn_entropy",
              "massive_values", "massive_tokens", "massive_dims", "massive_median")

    @property
    def num_images(self) -> int:
        for name in self.ARRAYS:
            arr = getattr(self, name)
            if arr is not None:
                return int(arr.shape[1])
        return 0

    def save(self, path: Union[str, os.PathLike], extra: Optional[dict[str, np.ndarray]] = None) -> Path:
        """Write an ``.npz`` (atomically) that :meth:`load` reads back without the model; ``extra``
        arrays (e.g. a scan's full outlier-token table) are stored beside the trace's own."""
        path = Path(path)
        arrays = {name: getattr(self, name) for name in (*self.ARRAYS, "input_norms") if getattr(self, name) is not None}
        arrays.update(extra or {})
        header = {"layout": self.layout.to_dict(), "layers": self.layers, "meta": self.meta}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, header=np.array(json.dumps(header)), **arrays)
        return path

    def image_rows(self, start: int, stop: int) -> "Trace":
        """The images ``start`` .. ``stop - 1`` of this trace (views of its arrays)."""
        arrays = {name: getattr(self, name)[:, start:stop] for name in self.ARRAYS if getattr(self, name) is not None}
        if self.input_norms is not None:
            arrays["input_norms"] = self.input_norms[start:stop]
        return Trace(layout=self.layout, layers=list(self.layers), meta=dict(self.meta), **arrays)

    @classmethod
    def join(cls, parts: Sequence["Trace"], meta: Optional[dict[str, Any]] = None) -> "Trace":
        """One trace of the images of ``parts``, in their order (the traces of one probe's
        batches, made by several processes); they must share their layout, blocks and arrays."""
        if not parts:
            raise VsinkError("no trace to join")
        first = parts[0]
        for part in parts[1:]:
            if part.layout != first.layout or part.layers != first.layers:
                raise VsinkError(f"traces to join differ: layout {part.layout.describe()} blocks {part.layers} vs "
                                 f"{first.layout.describe()} blocks {first.layers}")
        arrays = {}
        for name in (*cls.ARRAYS, "input_norms"):
            present = [getattr(p, name) is not None for p in parts]
            if any(present) and not all(present):
                raise VsinkError(f"traces to join differ: only some hold {name}")
            if all(present):
                arrays[name] = np.concatenate([getattr(p, name) for p in parts], axis=0 if name == "input_norms" else 1)
        return cls(layout=first.layout, layers=list(first.layers), meta=dict(meta or first.meta), **arrays)

    def check_finite(self, spec: str) -> None:
        """Raise :class:`~vsink.finite.NonFiniteError` naming the first probed block whose output
        norms are not finite (NaN or inf anywhere in a token's vector)."""
        from .finite import NonFiniteError

        if self.norms is None:
            return
        bad = ~np.isfinite(self.norms).reshape(len(self.layers), -1).all(axis=1)
        if bad.any():
            layer = self.layers[int(np.argmax(bad))]
            raise NonFiniteError(f"{spec}: non-finite activations (NaN or inf) first appear in the output of block "
                                 f"{layer}; check the weights and any edits (test-time registers, their scale)")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Trace":
        """Read a trace written by :meth:`save`; any array missing from what the header describes,
        of the wrong shape or not numeric is a one-line :class:`~vsink.readers.ReadError`."""
        from .readback import layout_of, open_npz
        from .readers import ReadError, parse_json

        with open_npz(path) as data:
            header = parse_json(str(data.array("header", kind="text")), f"{path}: array 'header'")
            if not isinstance(header, dict):
                raise ReadError(f"{path}: array 'header' must be a JSON object")
            layout = layout_of(header.get("layout"), f"{path}: header field 'layout'")
            layers = header.get("layers")
            if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
                raise ReadError(f"{path}: header field 'layers' must be a list of block indices, got {layers!r:.80}")
            meta = header.get("meta", {})
            if not isinstance(meta, dict):
                raise ReadError(f"{path}: header field 'meta' must be a JSON object")
            L, N, because = len(layers), layout.num_tokens, "its header's layers and layout"
            shapes = {"norms": (L, None, N), "input_norms": (None, N), "attn_received": (L, None, None, N),
                      "attn_cls": (L, None, None, N), "attn_entropy": (L, None, None), "massive_values": (L, None, None),
                      "massive_tokens": (L, None, None), "massive_dims": (L, None, None), "massive_median": (L, None)}
            arrays = {name: data.array(name, shape, what=because) for name, shape in shapes.items() if name in data}
        counts = {name: a.shape[1] if name != "input_norms" else a.shape[0] for name, a in arrays.items()}
        if len(set(counts.values())) > 1:
            raise ReadError(f"{path}: its arrays disagree on the number of images ({counts})")
        return cls(layout=layout, layers=list(layers), meta=meta, **arrays)


class Rows:
    """Per-image results of successive batches, stacked along the first axis in one growing
    buffer (capacity doubles). Results are copied out of the tensors they come from: keeping
    numpy views of small tensors pins their allocations, and small pinned blocks among the
    activations of later batches kept the heap from shrinking (a scan of the demo model grew by
    ~0.75 MB per image; with one contiguous buffer it grows by what it stores)."""

    def __init__(self, dtype: type = np.float32):
        self.dtype = dtype
        self._buf: Optional[np.ndarray] = None
        self.rows = 0
        self.batches = 0

    def append(self, t: torch.Tensor) -> None:
        values = t.detach().cpu().numpy()
        n = values.shape[0]
        if self._buf is None or self.rows + n > self._buf.shape[0]:
            grown = np.empty((max(2 * (self.rows + n), 8), *values.shape[1:]), self.dtype)
            if self._buf is not None:
                grown[:self.rows] = self._buf[:self.rows]
            self._buf = grown
        self._buf[self.rows:self.rows + n] = values
        self.rows += n
        self.batches += 1

    def clear(self) -> None:
        """Forget every row (keeping the buffer)."""
        self.rows = 0
        self.batches = 0

    def array(self) -> np.ndarray:
        """The rows so far (a view; empty with no batch)."""
        return self._buf[:self.rows] if self._buf is not None else np.empty((0,), self.dtype)


def row_entropy(p: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropy (nats) of each row of ``p`` [..., N].

    With ``p = softmax(z)``: ``log p_k = z_k - max(z) - log(sum)`` and the largest ``p`` is
    ``1 / sum``, so ``H = max(z) - log(max(p)) - sum_k p_k z_k``: no logarithm per element.
    Masked keys (``z = -inf``, ``p = 0``) contribute nothing. Without logits: ``-sum p log p``.
    """
    if logits is None:
        return torch.special.entr(p).sum(dim=-1)
    z = logits.detach().float()
    # vecdot is ~3.5x faster here than batched 1xN @ Nx1 matmuls (measured on [2, 6, 127, 1370])
    dot = torch.linalg.vecdot(p, z)
    if torch.isnan(dot).any():  # masked keys: 0 * -inf
        dot = torch.linalg.vecdot(p, z.nan_to_num(neginf=0.0))
    return z.amax(dim=-1) - torch.log(p.amax(dim=-1)) - dot


class _AttentionReducer:
    """Streams query blocks of one layer's probabilities into per-image statistics."""

    def __init__(self, probe: "Probe"):
        self.probe = probe
        self.batches: dict[str, Rows] = {"received": Rows(), "cls": Rows(), "entropy": Rows()}
        self._reset()

    def _reset(self) -> None:
        self.received: Optional[torch.Tensor] = None
        self.entropy: Optional[torch.Tensor] = None
        self.cls: Optional[torch.Tensor] = None
        self.seen = 0

    def __call__(self, probs: torch.Tensor, q_start: int, logits: Optional[torch.Tensor]) -> None:
        p = probs.detach().float()
        B, H, q, N = p.shape
        if self.received is None:
            self.probe._sync_layout()
            self.received = p.new_zeros(B, H, N)
            self.entropy = p.new_zeros(B, H)
        self.received += p.sum(dim=2)
        self.entropy += row_entropy(p, logits).sum(dim=2)
        cls = self.probe.layout.cls_token
        if cls is not None and q_start <= cls < q_start + q:
            self.cls = p[:, :, cls - q_start].clone()
        self.seen += q
        if self.seen == N:
            self.batches["received"].append(self.received / N)
            self.batches["entropy"].append(self.entropy / N)
            if self.cls is not None:
                self.batches["cls"].append(self.cls)
            self._reset()


class Probe(HookSet):
    """Install observers on a backbone; always removes them on exit, also on exceptions.

    Example::

        with Probe(backbone) as probe:
            probe.run(backbone.preprocess(images))
        trace = probe.trace()

    Args:
        backbone: the model to observe.
        layers: block indices to observe (default: all).
        norms: collect per-token norms of block outputs.
        attention: collect attention statistics (routes attention through vsink's explicit,
            query-chunked computation while installed).
        massive: keep this many largest |activations| of each block output (and its median
            |activation|) for the massive-activation detector; 0 to skip.
    """

    def __init__(self, backbone: Backbone, *, layers: Optional[Sequence[int]] = None,
                 norms: bool = True, attention: bool = True, massive: int = 0):
        super().__init__()
        self.backbone = backbone = backbone if isinstance(backbone, SiteModel) else backbone_arg(backbone)
        n = backbone.num_layers
        layers = None if layers is None else index_list_arg(layers, "layers")
        self.layers = sorted({i % n for i in layers}) if layers is not None else list(range(n))
        if layers is not None and any(not -n <= i < n for i in layers):
            raise VsinkError(f"layers {list(layers)} out of range for {n} blocks")
        self.want_norms = norms
        self.want_attention = attention
        self.massive = int(massive)
        self.layout: TokenLayout = backbone.layout()
        self._norms: dict[int, Rows] = {}
        self._input_norms = Rows()
        self._attn: dict[int, _AttentionReducer] = {}
        self._massive: dict[int, tuple[Rows, Rows, Rows, Rows]] = {}

    def _install(self) -> None:
        if self.want_norms:
            self._handles.append(self.backbone.hook("block_input", 0, self._norm_fn(self._input_norms)))
        for layer in self.layers:
            if self.want_norms:
                store = self._norms.setdefault(layer, Rows())
                self._handles.append(self.backbone.hook("block_output", layer, self._norm_fn(store)))
            if self.massive:
                stores = self._massive.setdefault(layer, (Rows(), Rows(np.int64), Rows(np.int64), Rows()))
                self._handles.append(self.backbone.hook("block_output", layer, self._massive_fn(stores)))
            if self.want_attention:
                reducer = self._attn.setdefault(layer, _AttentionReducer(self))
                self._handles.append(self.backbone.hook("attn_probs", layer, reducer))

    def _norm_fn(self, store: Rows):
        def fn(x: torch.Tensor) -> None:
            self._sync_layout()
            store.append(x.detach().float().norm(dim=-1))

        return fn

    def _massive_fn(self, stores: tuple[Rows, Rows, Rows, Rows]):
        k = self.massive

        def fn(x: torch.Tensor) -> None:
            self._sync_layout()
            flat = x.detach().float().flatten(1)  # [B, N*D]
            top = flat.abs().topk(min(k, flat.shape[1]), dim=1).indices
            dim = x.shape[-1]
            stride = -(-flat.shape[1] // MEDIAN_SAMPLES)  # a strided sample keeps the median cheap
            median = flat[:, ::stride].abs().median(dim=1).values
            for store, values in zip(stores, (flat.gather(1, top), top // dim, top % dim, median)):
                store.append(values)

        return fn

    def run(self, pixel_values: torch.Tensor) -> Any:
        """Forward one batch through the backbone (``backbone.forward`` works as well: every
        observer reads the layout of the input being processed)."""
        return self.backbone.forward(pixel_values)

    def _sync_layout(self) -> None:
        layout = self.backbone.current_layout()
        if layout == self.layout:
            return
        if self.num_batches():
            raise VsinkError(f"all batches of a probe must share one layout: {layout.describe()} "
                             f"vs {self.layout.describe()}")
        self.layout = layout

    def num_batches(self) -> int:
        if self._norms:
            return next(iter(self._norms.values())).batches
        if self._attn:
            return next(iter(self._attn.values())).batches["received"].batches
        return 0

    def take(self) -> Trace:
        """The trace of what was collected since the last :meth:`take` (or the start), then start
        afresh: a sharded run sends each batch's rows to the process that joins them
        (:meth:`Trace.join`)."""
        trace = self.trace()
        stores = [*self._norms.values(), self._input_norms, *(s for r in self._attn.values() for s in r.batches.values()),
                  *(s for group in self._massive.values() for s in group)]
        for store in stores:  # in place: the installed observers hold these
            store.clear()
        return trace

    def trace(self, meta: Optional[dict[str, Any]] = None) -> Trace:
        """Concatenate everything collected so far over images."""

        def stack(per_layer: list[Rows]) -> Optional[np.ndarray]:
            if not per_layer or not all(rows.batches for rows in per_layer):
                return None
            return np.stack([rows.array() for rows in per_layer])

        norms = stack([self._norms[l] for l in self.layers]) if self.want_norms else None
        input_norms = self._input_norms.array().copy() if self.want_norms and self._input_norms.batches else None
        received = cls = entropy = None
        if self.want_attention:
            reducers = [self._attn[l] for l in self.layers]
            received = stack([r.batches["received"] for r in reducers])
            cls = stack([r.batches["cls"] for r in reducers])
            entropy = stack([r.batches["entropy"] for r in reducers])
        massive: dict[str, Optional[np.ndarray]] = {}
        if self.massive:
            for i, name in enumerate(("massive_values", "massive_tokens", "massive_dims", "massive_median")):
                massive[name] = stack([self._massive[l][i] for l in self.layers])
        for arr in (norms, input_norms, received):
            if arr is not None and arr.shape[-1] != self.layout.num_tokens:
                raise VsinkError(f"observed {arr.shape[-1]} tokens but the layout has {self.layout.num_tokens}")
        return Trace(layout=self.layout, layers=list(self.layers), norms=norms, input_norms=input_norms,
                     attn_received=received,
                     attn_cls=cls, attn_entropy=entropy, meta=dict(meta or {}), **massive)
