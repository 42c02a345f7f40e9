"""The language model of a Hugging Face LVLM as a :class:`~vsink.backbones.sites.SiteModel`:
the same sites as a vision backbone (``block_input``, ``block_output``, ``mlp_hidden``,
``attn_logits``, ``attn_probs``, ``attn_qkv``) on the decoder layers, so :class:`~vsink.probe.Probe`,
:class:`~vsink.probe.Trace`, the detectors and the mitigations work on it unchanged.

Attention of a layer with an attention site runs through vsink's explicit attention (routed by
:mod:`vsink.backbones.hf_router`). In a scan every row is computed explicitly, with the model's own
masks. During generation a :class:`~vsink.lvlm.context.DecodeContext` is bound: it gives every
layer's mask from token positions (FastV prunes keys), and the site functions say which query rows
they need (``rows=`` of :meth:`~vsink.backbones.sites.SiteModel.hook`) — the other rows run the
model's own attention implementation (eager or SDPA) and the two parts are stitched back, so a
mitigation pays for the rows it edits only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..attention import additive_mask
from ..errors import VsinkError
from ..layout import ImageSpans, PromptLayout
from .hf_router import Router
from .sites import SiteModel

if TYPE_CHECKING:
    from ..lvlm.context import DecodeContext
    from .hf_lvlm import LVLM


#: original implementations that take an additive [B, 1, q, kv] mask for any subset of query rows,
#: so a routed layer can leave the rows no site function needs to them
SPLITTABLE = ("eager", "sdpa")


def decoder_of(lvlm: "LVLM") -> "DecoderModel":
    """The language model of ``lvlm`` as a :class:`DecoderModel` — one object per LVLM, so its sites
    and routes are shared by everything that uses the decoder."""
    decoder = lvlm.__dict__.get("_vsink_decoder")
    if decoder is None:
        decoder = lvlm.__dict__["_vsink_decoder"] = DecoderModel(lvlm)
    return decoder


class DecoderModel(SiteModel):
    """The decoder of ``lvlm`` with named sites.

    :meth:`forward` takes the model inputs of :meth:`LVLM.prepare` (one image per row) and sets the
    :class:`~vsink.layout.PromptLayout` of that batch; every row must have the same layout (the
    same prompt and image size, no padding), as a probe's batches share one layout.
    """

    family = "hf-lvlm"

    def __init__(self, lvlm: "LVLM"):
        super().__init__(lvlm.model, f"{lvlm.spec}#decoder")
        self.lvlm = lvlm
        self._router = Router(lvlm.model, lvlm.text_config, lvlm.attention_modules(), sub_config="text_config",
                              label=self.spec)
        self._layout: Optional[PromptLayout] = None
        #: the generation context bound by :mod:`vsink.lvlm` (masks from positions), if any
        self.context: Optional["DecodeContext"] = None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.lvlm.layers

    @property
    def num_heads(self) -> int:
        return int(self.lvlm.text_config.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return self.lvlm.hidden_size

    def _mlp_out_proj(self, layer: int) -> nn.Module:
        mlp = getattr(self.blocks[layer], "mlp", None)
        for name in ("down_proj", "fc2", "c_proj"):
            if mlp is not None and isinstance(getattr(mlp, name, None), nn.Linear):
                return getattr(mlp, name)
        raise VsinkError(f"{self.spec}: cannot find the MLP output projection of layer {layer}")

    # --- layout and forward -----------------------------------------------------------------
    def prompt_layout(self, inputs: dict[str, Any]) -> PromptLayout:
        """The layout shared by every row of ``inputs`` (an error if rows differ)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise VsinkError(f"{self.spec}: rows are padded; a scan needs the same prompt and image size in every row")
        spans = ImageSpans.from_ids(ids, self.lvlm.image_token_id)
        if len(set(spans.spans)) != 1:
            raise VsinkError(f"{self.spec}: the image sits at different positions in different rows "
                             f"({sorted(set(spans.spans))[:2]}); use one prompt and one image size per batch")
        bos_id = getattr(self.lvlm.text_config, "bos_token_id", None)
        bos = bos_id is not None and bool((ids[:, 0] == bos_id).all())
        if len(spans.spans[0]) != 1:
            raise VsinkError(f"{self.spec}: a prompt row holds {len(spans.spans[0])} runs of image tokens; a scan's "
                             "layout needs one image span per row (one image, not split into separate runs)")
        layout = PromptLayout.of_row(spans, 0, bos=bos)
        return layout.with_grid(self.lvlm.image_grid(inputs, 0, layout.num_patches))

    def layout(self) -> PromptLayout:
        """The layout of the last prompt batch (before any: a one-token placeholder, which a probe
        replaces with the first batch's)."""
        return self._layout if self._layout is not None else PromptLayout(0, 0, (1, 1), 0, bos=False)

    def current_layout(self) -> PromptLayout:
        return self.layout()

    def set_layout(self, inputs: dict[str, Any]) -> PromptLayout:
        """Take the layout of ``inputs`` as the current one (before a probe is created)."""
        self._layout = self.prompt_layout(inputs)
        return self._layout

    @torch.inference_mode()
    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's logits [B, N, vocab] for prepared ``inputs`` (with any installed sites)."""
        self.set_layout(inputs)
        return self.lvlm.model(**inputs, use_cache=False).logits

    # --- attention ----------------------------------------------------------------------
    def _install_attention(self, layer: int) -> Callable[[], None]:
        def routed(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                   **kwargs: Any):
            original = module.__dict__["_vsink_router"].original
            if self.suspended:
                return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            q, kv = query.shape[2], key.shape[2]
            softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
            if self.context is None:  # a scan: every row explicitly, with the model's own mask
                out = self._attention(layer, query, key, value, scale=scaling, softcap=softcap,
                                      mask=self._mask(layer, query, key, attention_mask))
                return out.transpose(1, 2).contiguous(), None
            self.context.shapes[layer] = (q, kv)
            first = self.first_row(layer, q, kv) if self._router.original_implementation in SPLITTABLE else 0
            if first >= q:  # no site function needs a row of this call: the model's own kernel and mask
                return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                **kwargs)
            mask = self.context.mask(layer, q, kv, query.device, query.dtype, window=window)
            tail = self._attention(layer, query[:, :, first:], key, value, scale=scaling, mask=mask[:, :, first:],
                                   q_offset=first, softcap=softcap).transpose(1, 2)
            if first == 0:
                return tail.contiguous(), None
            # the rows before: the model's kernel with the model's own mask, cut to those rows (SDPA's
            # causal case has none: rows from 0 against keys from 0, upper-left causal, as in the full call)
            head_mask = attention_mask[:, :, :first] if attention_mask is not None else None
            head, _ = original(module, query[:, :, :first], key, value, head_mask, scaling=scaling,
                               dropout=dropout, **kwargs)
            return torch.cat([head, tail], dim=1).contiguous(), None

        return self._router.route(layer, routed)

    def _mask(self, layer: int, query: torch.Tensor, key: torch.Tensor,
              attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Additive [B, 1, q, kv] mask: the bound context's, else the model's (``None`` from an
        SDPA mask builder means causal without padding)."""
        q, kv = query.shape[2], key.shape[2]
        if self.context is not None:
            return self.context.mask(layer, q, kv, query.device, query.dtype)
        if attention_mask is not None:
            return additive_mask(attention_mask[..., :kv], query.dtype, true_means_keep=True)
        if q == 1:
            return None
        allowed = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(kv - q)
        return additive_mask(allowed, query.dtype, true_means_keep=True)[None, None]

    @contextmanager
    def bound(self, context: "DecodeContext") -> Iterator["DecodeContext"]:
        """Take every routed layer's mask and positions from ``context`` (one generation call)."""
        if self.context is not None:
            raise VsinkError(f"{self.spec}: a generation context is bound already")
        self.context = context

        def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.suspended and self.context is not None:  # a branch's pass: its own context
                hidden = args[0] if args else kwargs["hidden_states"]
                self.context.begin_pass(int(hidden.shape[1]))

        handle = self.blocks[0].register_forward_pre_hook(begin, with_kwargs=True)
        try:
            yield context
        finally:
            handle.remove()
            self.context = None

    def describe(self) -> str:
        layout = self._layout.describe() if self._layout is not None else "no prompt yet"
        return f"{self.spec} [{self.family}] {self.num_layers} decoder layers, {self.num_heads} heads, {layout}"
