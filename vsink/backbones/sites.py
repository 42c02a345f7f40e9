"""Named sites over a stack of transformer blocks: the substrate every model behind vsink shares.

A :class:`SiteModel` is a model whose blocks vsink can observe and edit at the same named sites,
whatever the library or the modality: vision backbones (:class:`~vsink.backbones.base.Backbone`)
and the language model of an LVLM (:class:`~vsink.backbones.hf_decoder.DecoderModel`). Probes,
traces, detectors and mitigations talk to this interface only.

Sites (per layer, 0-based block index):

``block_input``
    the residual stream entering the block, [B, N, D] (for block 0: the embedding output);
``block_output``
    the residual stream after the block, [B, N, D];
``mlp_hidden``
    the MLP hidden activation (input of the MLP's output projection), [B, N, hidden];
``attn_logits``
    pre-softmax attention logits, in query blocks [B, H, q, N];
``attn_probs``
    post-softmax attention probabilities, in query blocks [B, H, q, N] (the function also
    receives the logits they came from, see :data:`vsink.attention.ProbFn`);
``attn_qkv``
    the queries, keys and values the attention is computed from, each [B, H, N, head_dim]
    (after any q/k normalisation and rotary positions, as the attention uses them; observation only).

A site function receives the tensor and may return a replacement (an edit) or ``None``
(an observation). Attention sites route that layer's attention through vsink's explicit
attention (:mod:`vsink.attention`) for as long as a function is installed there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..attention import LogitFn, ProbFn, explicit_attention
from ..errors import VsinkError
from ..layout import TokenLayout

SITES = ("block_input", "block_output", "mlp_hidden", "attn_logits", "attn_probs", "attn_qkv")
ATTENTION_SITES = ("attn_logits", "attn_probs", "attn_qkv")

SiteFn = Callable[..., Optional[torch.Tensor]]
#: ``rows(queries, keys) -> first query row a site function needs``
RowsFn = Callable[[int, int], int]


#: the owner (a mitigation's name) that site functions installed now belong to; see :func:`owned_by`
_OWNER: ContextVar[Optional[str]] = ContextVar("vsink_site_owner", default=None)
#: owners whose site functions are off in the forward pass in progress; see :func:`muted`
_MUTED: ContextVar[frozenset] = ContextVar("vsink_muted_owners", default=frozenset())


@contextmanager
def owned_by(owner: str) -> Iterator[None]:
    """Tag every site function installed inside the block as ``owner``'s (one mitigation's
    edits), so that a forward pass can leave them out with :func:`muted`."""
    token = _OWNER.set(owner)
    try:
        yield
    finally:
        _OWNER.reset(token)


@contextmanager
def muted(owners: Sequence[str]) -> Iterator[None]:
    """Inside the block, the site functions of ``owners`` are not called (a branch of a
    generation that runs without those mitigations' edits)."""
    token = _MUTED.set(frozenset(_MUTED.get()) | frozenset(owners))
    try:
        yield
    finally:
        _MUTED.reset(token)


def is_muted(owner: Optional[str]) -> bool:
    """Whether ``owner``'s edits are off in the forward pass in progress."""
    return owner is not None and owner in _MUTED.get()


def _gated(fn: "SiteFn", owner: str) -> "SiteFn":
    def gated(*args: Any) -> Optional[torch.Tensor]:
        return None if owner in _MUTED.get() else fn(*args)

    return gated



def recorders_last(module: nn.Module) -> None:
    """Move transformers' own forward hooks on ``module`` after every other. transformers 5 records
    a layer's hidden state (what LLaVA reads from its tower's second-to-last layer, what
    ``output_hidden_states`` returns) with a forward hook of its own, installed on the first call
    that asks for hidden states; a ``block_output`` edit installed after it would change what the
    next block reads but not the recorded state the model reads on. Moved last, the recorder sees
    the edited output, whichever was installed first."""
    hooks = module._forward_hooks
    for key in [k for k, fn in hooks.items() if str(getattr(fn, "__module__", "")).startswith("transformers.")]:
        hooks.move_to_end(key)

class SiteHandle:
    """Returned by :meth:`SiteModel.hook`; ``remove()`` uninstalls the function."""

    def __init__(self, remove: Callable[[], None]):
        self._remove: Optional[Callable[[], None]] = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


class SiteModel(ABC):
    """Blocks with named sites (see the module docstring).

    Attributes:
        model: the wrapped library module (``eval()`` mode).
        spec: the model spec string it was loaded from (or a description).
        attention_chunk_size: queries per block in explicit attention (None: automatic).
        edits: descriptions of the forward edits currently applied (e.g. test-time registers).
    """

    #: True when blocks take and return [N, B, D] (old open_clip); sites always see [B, N, D].
    seq_first: bool = False

    def __init__(self, model: nn.Module, spec: str):
        self.model = model.eval()
        self.spec = spec
        #: for a synthetic demo model, what was planted in it (None: a real model); outputs say so
        self.synthetic: Optional[str] = None
        self.attention_chunk_size: Optional[int] = None
        self.edits: list[str] = []
        #: while True, site functions are not called and routed layers run their original attention
        self.suspended = False
        self._attn_fns: dict[int, dict[str, list[Any]]] = {}
        self._attn_undo: dict[int, Callable[[], None]] = {}
        self._rows: dict[int, RowsFn] = {}  # id(site function) -> the rows it needs
        self._owners: Counter = Counter()  # owner (None: untagged) -> site functions installed now

    # --- what each model provides -------------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @property
    @abstractmethod
    def num_heads(self) -> int:
        """Attention heads per block (query heads)."""

    @abstractmethod
    def _mlp_out_proj(self, layer: int) -> nn.Module:
        """The MLP's output projection of a block (its input is the ``mlp_hidden`` site)."""

    @abstractmethod
    def _install_attention(self, layer: int) -> Callable[[], None]:
        """Route a block's attention through :meth:`_attention`; return the undo function."""

    @abstractmethod
    def layout(self) -> TokenLayout:
        """The token layout of the model's default input."""

    @abstractmethod
    def current_layout(self) -> TokenLayout:
        """Layout of the input being processed by :meth:`forward` (for site functions)."""

    @abstractmethod
    def forward(self, inputs: Any) -> Any:
        """The library model's own output for ``inputs`` (with any installed sites)."""

    # --- derived ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextmanager
    def suspend(self) -> Iterator[None]:
        """Run the model without any site function or routed attention (the original model), e.g.
        for PAI's text-only branch inside a mitigated generation."""
        previous, self.suspended = self.suspended, True
        try:
            yield
        finally:
            self.suspended = previous

    def mlp_width(self, layer: int) -> int:
        """Number of MLP hidden units (``mlp_hidden`` channels) of a block."""
        return int(self._mlp_out_proj(layer).in_features)

    # --- sites --------------------------------------------------------------------------
    def hook(self, site: str, layer: int, fn: SiteFn, *, rows: Optional[RowsFn] = None) -> SiteHandle:
        """Install ``fn`` at ``site`` of block ``layer``.

        ``block_input`` / ``block_output`` / ``mlp_hidden``: ``fn(tensor [B, N, C]) -> replacement or None``.
        ``attn_logits``: ``fn(logits [B, H, q, N], q_start) -> replacement or None``.
        ``attn_probs``: ``fn(probs [B, H, q, N], q_start, logits) -> replacement or None``, where
        ``logits`` is ``None`` once an earlier function replaced the probabilities.
        ``attn_qkv``: ``fn(q, k, v)`` with each [B, H, N, head_dim]; its return value is ignored.

        ``rows`` (attention sites): ``rows(queries, keys) -> first`` says that ``fn`` needs only the
        query rows from ``first`` on (it sees ``q_start >= first``). Models that can (an LVLM
        decoder during generation) compute the rows before the smallest ``first`` of a layer's
        functions with their own attention implementation (SDPA, flash) and only the rest
        explicitly; ``first == queries`` leaves the whole call to the model. Default: every row.

        A function installed inside :func:`owned_by` belongs to that owner and is skipped while
        the owner is :func:`muted`.
        """
        if site not in SITES:
            raise VsinkError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
        if not -self.num_layers <= layer < self.num_layers:
            raise VsinkError(f"layer {layer} out of range for {self.num_layers} blocks of {self.spec}")
        layer %= self.num_layers
        owner = _OWNER.get()
        if owner is not None:
            fn = _gated(fn, owner)
        handle = self._install_site(site, layer, fn, rows)
        self._owners[owner] += 1

        def remove() -> None:
            handle.remove()
            self._owners[owner] -= 1

        return SiteHandle(remove)

    def owners(self) -> frozenset[Optional[str]]:
        """The owners (:func:`owned_by`; ``None``: installed outside it) of the site functions
        installed now."""
        return frozenset(owner for owner, n in self._owners.items() if n > 0)

    def _install_site(self, site: str, layer: int, fn: SiteFn, rows: Optional[RowsFn]) -> SiteHandle:
        if site == "block_input":
            return SiteHandle(self.blocks[layer].register_forward_pre_hook(self._input_hook(fn), with_kwargs=True).remove)
        if site == "block_output":
            handle = SiteHandle(self.blocks[layer].register_forward_hook(self._block_hook(fn)).remove)
            recorders_last(self.blocks[layer])
            return handle
        if site == "mlp_hidden":
            return SiteHandle(self._mlp_out_proj(layer).register_forward_pre_hook(self._mlp_hook(fn)).remove)
        if rows is not None:
            self._rows[id(fn)] = rows
        return self._hook_attention(site, layer, fn)

    def first_row(self, layer: int, queries: int, keys: int) -> int:
        """The first query row any attention function of ``layer`` needs (see :meth:`hook`)."""
        fns = self._attn_fns.get(layer, {})
        needed = [self._rows[id(fn)](queries, keys) if id(fn) in self._rows else 0
                  for site in ("attn_logits", "attn_probs", "attn_qkv") for fn in fns.get(site, ())]
        return max(0, min(needed, default=queries))

    def _to_bnc(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if self.seq_first else x

    def _block_hook(self, fn: SiteFn):
        def hook(module, args, output):
            if self.suspended:
                return None
            tensor = output[0] if isinstance(output, tuple) else output
            new = fn(self._to_bnc(tensor))
            if new is None:
                return None
            new = self._to_bnc(new)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _input_hook(self, fn: SiteFn):
        def hook(module, args, kwargs):
            if self.suspended:
                return None
            tensor = args[0] if args else kwargs["hidden_states"]
            new = fn(self._to_bnc(tensor))
            if new is None:
                return None
            new = self._to_bnc(new)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return hook

    def _mlp_hook(self, fn: SiteFn):
        def hook(module, args):
            if self.suspended:
                return None
            new = fn(self._to_bnc(args[0]))
            if new is None:
                return None
            return (self._to_bnc(new), *args[1:])

        return hook

    def _hook_attention(self, site: str, layer: int, fn: LogitFn | ProbFn) -> SiteHandle:
        if layer not in self._attn_undo:
            self._attn_undo[layer] = self._install_attention(layer)
        fns = self._attn_fns.setdefault(layer, {s: [] for s in ATTENTION_SITES})
        fns[site].append(fn)

        def remove() -> None:
            fns[site].remove(fn)
            self._rows.pop(id(fn), None)
            if not any(fns.values()):
                del self._attn_fns[layer]
                self._attn_undo.pop(layer)()

        return SiteHandle(remove)

    def attention_routed(self, layer: int) -> bool:
        """Whether block ``layer`` currently computes attention through vsink."""
        return layer in self._attn_fns

    def _attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        q_offset: int = 0,
        normalise: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
        softcap: Optional[float] = None,
    ) -> torch.Tensor:
        """Explicit attention for block ``layer`` with its installed site functions; ``q`` holds
        the layer's query rows from ``q_offset`` on (the site functions see absolute indices);
        ``normalise``: an attention variant's row normalisation instead of the softmax;
        ``softcap``: the model's attention-logit cap (Gemma 2), if any."""
        self._check_heads(layer, q, k, v)
        fns = self._attn_fns.get(layer, {})
        for fn in fns.get("attn_qkv", ()):
            fn(q, k, v)
        return explicit_attention(
            q, k, v,
            scale=scale,
            mask=mask,
            logit_fns=tuple(fns.get("attn_logits", ())),
            prob_fns=tuple(fns.get("attn_probs", ())),
            q_offset=q_offset,
            chunk_size=self.attention_chunk_size,
            normalise=normalise,
            softcap=softcap,
        )

    def _check_heads(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The tensors an adapter hands to explicit attention against the heads the model declares
        (``num_heads``): [B, num_heads, q, d] queries, keys and values of one shape [B, G, kv, d]
        with G dividing the query heads (grouped-query attention)."""
        heads = self.num_heads
        if q.dim() != 4 or q.shape[1] != heads:
            raise VsinkError(f"{self.spec}: block {layer} handed vsink's attention queries of shape "
                             f"{tuple(q.shape)}; the model declares {heads} heads ([batch, {heads}, queries, "
                             f"head_dim] expected: check the adapter's num_heads and its reshape)")
        if k.dim() != 4 or k.shape != v.shape or k.shape[1] < 1 or heads % k.shape[1] or k.shape[-1] != q.shape[-1]:
            raise VsinkError(f"{self.spec}: block {layer} handed vsink's attention keys {tuple(k.shape)} and values "
                             f"{tuple(v.shape)} for queries {tuple(q.shape)}; keys and values must share one shape "
                             f"[batch, G, keys, head_dim] with G dividing the {heads} query heads")
