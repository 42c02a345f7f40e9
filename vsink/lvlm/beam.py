"""Beam search run by vsink inside transformers' own ``generate``, for decoding strategies that need
more than a logits edit (OPERA: candidate look-ahead, rollback to an earlier step).

``generate(custom_generate=loop)`` does the input preparation (beam expansion, cache, masks,
position ids, M-RoPE) and hands the loop the model kwargs; the loop here keeps transformers' beam
bookkeeping (:class:`Beams`: the top ``2·beams`` continuations, finished hypotheses scored with the
length penalty over the generated length, the early-stopping heuristic), and :class:`Stepper`
runs the forwards on the model's cache: one per step for the chosen continuations, a batched
look-ahead forward of several candidate tokens per beam whose rows then serve as the next step
(no second forward for the chosen ones), and a rebuild of the cache from the prompt's after a
rollback. The look-ahead runs a beam's candidates as sibling tokens of that beam's row (one
position, a 4D mask: each sees the cache and itself), so the cache is shared rather than copied
per candidate; a cache with sliding-window layers is repeated per candidate instead. Attention is read through vsink's ``attn_probs`` site (:class:`LastRowAttention`).

Without the KV cache (``use_cache=False``) :class:`UncachedStepper` runs the same steps as full
forwards of every row's sequence (prompt and generated tokens), with the per-row kwargs
transformers' ``generate`` keeps (position ids, M-RoPE's included; token types; the encoded
images) extended to that length: a look-ahead is one full forward per candidate rank (candidate
``c`` of every beam), a rollback one full forward of the kept sequences, as transformers' own beam
search without the cache recomputes each step.

The same loop runs under transformers 5 and 4.x. The 4.x generation loop keeps
``cache_position`` (the slots of a forward's new tokens in the cache) in the model kwargs, which
its inputs preparation slices by and its models read (LLaVA and Qwen-VL pass the images only when
it starts at 0; M-RoPE adds it to the ``rope_deltas`` the model keeps from the prompt pass): the
kwargs get it as 4.x's own beam search starts them (:func:`with_cache_position`), and every
forward sets it from the cache's length (without the cache: every position of the sequences);
a rebuild extends the kwargs one token per update, as 4.x's update adds one. Verified against
``generate(num_beams=N)`` of transformers 5 and 4.57, with and without the cache.
"""

from __future__ import annotations

import copy
import functools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch

from ..backbones.hooks import HookSet, forward_replaced
from ..errors import VsinkError
from .context import DecodeContext

#: model kwargs that hold one row per sequence and one column per token
ROW_KEYS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


class BeamContext(DecodeContext):
    """The context of one prompt (one row, no padding) whose forwards run on any number of beam or
    candidate rows: every per-row table is that prompt's row, broadcast.

    A :class:`Stepper` sets ``upcoming`` (the sequence length once its next forward has run; a
    rollback or a dropped candidate shortens the sequence, which counting tokens would miss) and,
    during a look-ahead, ``siblings``: the last ``siblings`` keys and queries are candidates at one
    position, each seeing the keys before them and itself only."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.upcoming: Optional[int] = None
        self.upcoming_fresh = 0
        self.siblings = 0

    def announce(self, length: int, new: int) -> None:
        """The next forward ends the sequence at ``length`` positions, of which its last ``new``
        are computed for the first time (a forward without the cache recomputes the others)."""
        self.upcoming, self.upcoming_fresh = length, length - new

    def begin_pass(self, queries: int) -> None:
        if self.upcoming is None:
            super().begin_pass(queries)
        else:
            self.seen, self.upcoming, self.fresh = self.upcoming, None, self.upcoming_fresh

    def lookup(self, table: torch.Tensor, pos: torch.Tensor, beyond: bool) -> torch.Tensor:
        if table.shape[0] == 1 and pos.shape[0] > 1:
            table = table.expand(pos.shape[0], -1)
        return super().lookup(table, pos, beyond)

    def key_positions(self, layer: int, kv: int, device: torch.device) -> torch.Tensor:
        C = self.siblings
        if C <= 1:
            return super().key_positions(layer, kv, device)
        head = super().key_positions(layer, kv - C + 1, device)
        return torch.cat([head, head[:, -1:].expand(-1, C - 1)], dim=1)

    def mask(self, layer: int, q: int, kv: int, device: torch.device, dtype: torch.dtype,
             window: Optional[int] = None) -> torch.Tensor:
        out = super().mask(layer, q, kv, device, dtype, window)
        C = self.siblings
        if C > 1:  # siblings share a position: each sees itself, not the others
            apart = ~torch.eye(C, dtype=torch.bool, device=device)
            out = out.clone()
            out[..., -C:, -C:] = out[..., -C:, -C:].masked_fill(apart, torch.finfo(dtype).min)
        return out


class LastRowAttention(HookSet):
    """The last query row's attention in one decoder layer, maximum over heads, of every forward
    (``rows``: [rows, keys]; in a sibling look-ahead each candidate's row over the keys before the
    candidates and its own, [rows·C, keys − C + 1]), read from the layer's ``attn_probs`` site; the
    other rows run on the model's own kernel."""

    def __init__(self, decoder: Any, layer: int):
        super().__init__()
        self.decoder, self.layer = decoder, layer
        self.rows: Optional[torch.Tensor] = None

    def _install(self) -> None:
        self._handles.append(self.decoder.hook("attn_probs", self.layer, self._observe,
                                               rows=lambda queries, keys: queries - max(1, self._siblings())))

    def _siblings(self) -> int:
        return getattr(self.decoder.context, "siblings", 0)

    def _observe(self, probs: torch.Tensor, q_start: int, logits: Optional[torch.Tensor]) -> None:
        queries, keys = self.decoder.context.shapes[self.layer]
        if q_start + probs.shape[2] != queries:
            return
        C = self._siblings()
        if C == 0:
            self.rows = self._over_positions(probs[:, :, -1, :].amax(1).float())
            return
        # siblings: each candidate's row over the keys before them and its own key [rows·C, keys − C + 1]
        rows = probs[:, :, -C:, :].amax(1).float()
        length = keys - C
        own = rows[:, :, length:].diagonal(dim1=1, dim2=2)
        self.rows = torch.cat([rows[:, :, :length], own[:, :, None]], dim=-1).reshape(-1, length + 1)

    def _over_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows over the layer's keys [rows, kv] as rows over every position of the sequence so
        far: a sliding-window layer's cache past its window holds the last keys only, and the
        positions it dropped get no attention (0), as a forward without the cache gives them."""
        context = self.decoder.context
        seen = getattr(context, "seen", None)
        kv = rows.shape[-1]
        if seen is None or kv >= seen:
            return rows
        positions = context.key_positions(self.layer, kv, rows.device)[0]
        return rows.new_zeros(rows.shape[0], seen).index_copy_(1, positions, rows)


def take_rows(kwargs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """``kwargs`` with the per-row tensors (mask, positions, token types) taken at ``index``;
    position ids of M-RoPE models are [k, rows, tokens]."""
    out = dict(kwargs)
    for key in ROW_KEYS:
        t = out.get(key)
        if isinstance(t, torch.Tensor):
            out[key] = t[:, index] if t.dim() == 3 else t[index]
    return out


def first_row(kwargs: dict[str, Any], rows: int) -> dict[str, Any]:
    """The model kwargs of the first of ``rows`` identical rows (the beams of one prompt): the
    per-row tensors at row 0, and every other tensor (pixel values, the image features transformers
    5 encodes before the first forward, flat per-patch tensors of Qwen2-VL, each DeepStack level's
    features of Qwen3-VL) cut to its first ``1 / rows``: transformers repeats each prompt's inputs as ``rows`` contiguous copies."""
    out = take_rows(kwargs, torch.zeros(1, dtype=torch.long))
    for key, value in kwargs.items():
        if key not in ROW_KEYS:
            out[key] = _first_copy(value, rows)
    return out


def _first_copy(value: Any, rows: int) -> Any:
    if isinstance(value, dict):  # plain dicts and transformers' ModelOutput
        items = {k: _first_copy(v, rows) for k, v in value.items()}
        return items if type(value) is dict else type(value)(**items)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return type(value)(_first_copy(v, rows) for v in value)  # per DeepStack level (Qwen3-VL), each per image
    if isinstance(value, (list, tuple)) and value and len(value) % rows == 0:  # one entry per image
        return type(value)(value[:len(value) // rows])
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] % rows == 0:
        return value[:value.shape[0] // rows]
    return value


@dataclass
class Beams:
    """transformers' beam bookkeeping for ``batch`` prompts of ``beams`` beams (vectorised beam
    search of transformers 5: running beams, finished hypotheses, early-stopping heuristic)."""

    running: torch.Tensor  # [B, N, max_length] tokens of the running beams
    running_scores: torch.Tensor  # [B, N] summed log-probabilities
    sequences: torch.Tensor  # [B, N, max_length] finished hypotheses
    scores: torch.Tensor  # [B, N] their length-penalised scores (-1e9: empty)
    lengths: torch.Tensor  # [B, N] their total lengths
    finished: torch.Tensor  # [B, N] bool
    improvable: torch.Tensor  # [B, 1] bool: the early-stopping heuristic is not yet satisfied
    prompt: int
    length_penalty: float
    early_stopping: Any
    max_length: int
    keep: int  # continuations kept per step: max(2, 1 + #eos) · N

    @classmethod
    def start(cls, input_ids: torch.Tensor, beams: int, config: Any) -> "Beams":
        rows, prompt = input_ids.shape
        batch = rows // beams
        eos = config._eos_token_tensor
        fill = config._pad_token_tensor
        fill = fill if fill is not None else (eos[0] if eos is not None else -1)
        running = torch.full((batch, beams, config.max_length), int(fill), dtype=torch.long, device=input_ids.device)
        running[:, :, :prompt] = input_ids.view(batch, beams, prompt)
        scores = torch.zeros(batch, beams, device=input_ids.device)
        scores[:, 1:] = -1e9
        n_eos = eos.shape[0] if eos is not None else 0
        return cls(running, scores, running.clone(), torch.full_like(scores, -1e9),
                   torch.full((batch, beams), prompt, dtype=torch.long, device=input_ids.device),
                   torch.zeros(batch, beams, dtype=torch.bool, device=input_ids.device),
                   torch.ones(batch, 1, dtype=torch.bool, device=input_ids.device),
                   prompt, float(config.length_penalty), config.early_stopping, int(config.max_length),
                   max(2, 1 + n_eos) * beams)

    def snapshot(self) -> "Beams":
        return Beams(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    @property
    def batch(self) -> int:
        return self.running.shape[0]

    @property
    def beams(self) -> int:
        return self.running.shape[1]

    def flat(self, cur_len: int) -> torch.Tensor:
        """The running beams' tokens [B·N, cur_len]."""
        return self.running[:, :, :cur_len].reshape(-1, cur_len)

    def advance(self, log_probs: torch.Tensor, cur_len: int, stopping: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One step from per-beam log-probabilities [B·N, V]: returns, for each new running beam,
        the flat index of the beam it continues and its new token ([B·N] each), and whether the
        search is over."""
        B, N = self.batch, self.beams
        vocab = log_probs.shape[-1]
        total = (log_probs.view(B, N, vocab) + self.running_scores[:, :, None]).view(B, N * vocab)
        top_lp, top_idx = torch.topk(total, k=self.keep)
        source = top_idx // vocab
        tokens = top_idx % vocab
        top_seqs = self.running.gather(1, source[:, :, None].expand(-1, -1, self.running.shape[-1])).clone()
        top_seqs[:, :, cur_len] = tokens
        hits = stopping(top_seqs[:, :, :cur_len + 1].reshape(B * self.keep, -1), None).view(B, self.keep)
        # the running beams: the best continuations that hit no stopping criterion
        running_lp = top_lp + hits.float() * -1e9
        chosen = torch.topk(running_lp, k=N).indices
        self.running = top_seqs.gather(1, chosen[:, :, None].expand(-1, -1, top_seqs.shape[-1]))
        self.running_scores = running_lp.gather(1, chosen)
        from_beam = source.gather(1, chosen)
        # the finished hypotheses: continuations among the top N that hit a stopping criterion
        top_n = torch.zeros(self.keep, dtype=torch.bool, device=hits.device)
        top_n[:N] = True
        just = hits & top_n[None]
        done_lp = top_lp / ((cur_len + 1 - self.prompt) ** self.length_penalty)
        full = self.finished.all(-1, keepdim=True) & (self.early_stopping is True)
        done_lp = done_lp + full.float() * -1e9 + (~self.improvable).float() * -1e9 + (~just).float() * -1e9
        merged = torch.cat([self.scores, done_lp], dim=1)
        best = torch.topk(merged, k=N).indices
        seqs = torch.cat([self.sequences, top_seqs], dim=1)
        self.sequences = seqs.gather(1, best[:, :, None].expand(-1, -1, seqs.shape[-1]))
        self.scores = merged.gather(1, best)
        ended = torch.full_like(done_lp, cur_len + 1, dtype=torch.long)
        self.lengths = torch.cat([self.lengths, ended], 1).gather(1, best)
        self.finished = torch.cat([self.finished, just], dim=1).gather(1, best)
        # early stopping: can a running beam still beat the worst finished hypothesis?
        new_len = cur_len + 1
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_len = self.max_length - self.prompt
        else:
            best_len = new_len - self.prompt
        best_possible = self.running_scores[:, :1] / (best_len ** self.length_penalty)
        worst = torch.where(self.finished, self.scores.min(dim=1, keepdim=True).values, -1.0e9)
        self.improvable = self.improvable & (best_possible > worst).any(-1, keepdim=True)
        open_beam = not (bool(self.finished.all()) and self.early_stopping is True)
        over = not (bool(self.improvable.any()) and open_beam and not bool(hits.all()))
        offset = torch.arange(B, device=from_beam.device)[:, None] * N
        return (from_beam + offset).view(-1), self.running[:, :, cur_len].reshape(-1), over

    def output(self, returned: int = 1) -> torch.Tensor:
        """The best ``returned`` hypotheses per prompt [B·returned, prompt + longest generated]."""
        length = int(self.lengths[:, :returned].max())
        return self.sequences[:, :returned, :length].reshape(-1, length)


@dataclass
class Lookahead:
    """The state of a look-ahead forward until :meth:`Stepper.keep` or :meth:`Stepper.keep_prefix`:
    the kwargs before and after it, the candidates per row and the cache's length before it;
    ``shared``: the candidates ran as siblings on the beams' own rows (else on repeated rows, and
    ``layers`` holds each cache layer's keys, values and length before it)."""

    before: dict
    after: dict
    candidates: int
    length: int
    shared: bool
    layers: Optional[list[tuple[Any, Any, Optional[int]]]] = None


class Stepper:
    """The forwards of a custom decoding loop on the model's own cache and kwargs (see the module
    docstring). ``context``: the :class:`BeamContext` bound to the decoder, told the sequence
    length of every forward and the candidates of a look-ahead."""

    def __init__(self, model: Any, kwargs: dict[str, Any], context: Optional["BeamContext"] = None):
        if not kwargs.get("use_cache", True):
            raise VsinkError("Stepper runs on the KV cache; use_cache=False runs on UncachedStepper (stepper_for)")
        self.model = model
        self.kwargs = kwargs
        self.context = context
        self.prompt_kwargs: Optional[dict[str, Any]] = None
        self.ahead: Optional[Lookahead] = None

    @property
    def cache(self) -> Any:
        return self.cache_of(self.kwargs)

    @staticmethod
    def cache_of(kwargs: dict[str, Any]) -> Any:
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                return kwargs[key]
        raise VsinkError("the model returned no KV cache")

    def _length(self, kwargs: dict[str, Any]) -> int:
        """Positions the cache of ``kwargs`` holds (0 before the prompt pass)."""
        try:
            return int(self.cache_of(kwargs).get_seq_length())
        except VsinkError:
            return 0

    def _announce(self, kwargs: dict[str, Any], positions: int) -> None:
        """Tell the context the sequence length once the next forward has added ``positions``."""
        if self.context is not None:
            self.context.announce(self._length(kwargs) + positions, positions)

    def _prepared(self, ids: torch.Tensor, new: int, kwargs: dict[str, Any], first: bool = False) -> dict[str, Any]:
        """The model inputs of a forward of the last ``new`` tokens of ``ids`` on the cache of
        ``kwargs``: transformers 5 slices by ``next_sequence_length``; the 4.x loop's kwargs carry
        ``cache_position`` (set here in ``kwargs``: the new tokens' slots, after the cache's)."""
        if "cache_position" in kwargs:
            length = self._length(kwargs)
            kwargs["cache_position"] = torch.arange(length, length + new, device=ids.device)
            return self.model.prepare_inputs_for_generation(ids, **kwargs)
        extra = {"is_first_iteration": True} if first else {}
        return self.model.prepare_inputs_for_generation(ids, next_sequence_length=None if first else new,
                                                        **kwargs, **extra)

    def _run(self, ids: torch.Tensor, new: int, kwargs: dict[str, Any],
             first: bool = False) -> tuple[torch.Tensor, dict]:
        kwargs = dict(kwargs)  # transformers updates the dict it is given
        inputs = self._prepared(ids, new, kwargs, first)
        self._announce(kwargs, new)
        out = self.model(**inputs, return_dict=True)
        kwargs = self.model._update_model_kwargs_for_generation(out, kwargs)
        return out.logits[:, -1, :].float(), kwargs

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt pass: logits of the first generated token [rows, V]; keeps a copy of the
        prompt's cache for :meth:`rebuild`. Rows that repeat one prompt (its beams) run once and
        their cache is repeated."""
        rows = input_ids.shape[0]
        self.kwargs = with_cache_position(self.model, input_ids, self.kwargs)
        if rows > 1 and bool((input_ids == input_ids[:1]).all()):
            logits, once = self._run(input_ids[:1], input_ids.shape[1], first_row(self.kwargs, rows), first=True)
            self.cache_of(once).batch_repeat_interleave(rows)
            self.kwargs = {**self.kwargs, **take_rows(once, torch.zeros(rows, dtype=torch.long))}
            for key in ("cache", "past_key_values"):
                if key in once:
                    self.kwargs[key] = once[key]
            logits = logits.expand(rows, -1)
        else:
            logits, self.kwargs = self._run(input_ids, input_ids.shape[1], self.kwargs, first=True)
        self.prompt_kwargs = {k: copy.deepcopy(v) for k, v in self.kwargs.items()}
        self.prompt_logits = logits
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One cached forward of the last token of each row of ``ids``."""
        logits, self.kwargs = self._run(ids, 1, self.kwargs)
        return logits

    def shares_cache(self) -> bool:
        """Whether candidates can run as siblings on the beams' cache: every layer of it keeps all
        keys (a sliding-window layer drops keys by count, so its candidates run on repeated rows)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def lookahead(self, ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """One forward of every candidate token [rows, C] after its row: logits [rows·C, V] (row
        ``r·C + c``: candidate c of row r). Then :meth:`keep` or :meth:`keep_prefix`.

        On a cache whose layers keep every key the candidates are C sibling tokens of their row at
        the same position, each seeing the cache and itself only (a 4D mask), so the cache is not
        repeated: it grows by C positions, of which :meth:`keep` keeps the chosen one. Otherwise,
        and where the model numbers a forward's tokens itself (transformers 4.x's Qwen3-VL gives
        no position ids for its forward to count from ``cache_position``, so siblings would get
        consecutive positions), the cache is repeated C times and each candidate runs on its own
        row."""
        rows, C = candidates.shape
        before = self.kwargs
        length = self._length(before)
        inputs = None
        if self.shares_cache():
            inputs = self._prepared(torch.cat([ids, candidates[:, :1]], dim=1), 1, dict(before))
        if inputs is None or (inputs.get("cache_position") is not None and inputs.get("position_ids") is None):
            # each layer's states before the look-ahead (the repeat makes new tensors): a sliding-
            # window layer past its window has dropped its oldest key once the candidate is added
            layers = [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in self.cache.layers]
            self.cache.batch_repeat_interleave(C)
            index = torch.arange(rows, device=ids.device).repeat_interleave(C)
            before = take_rows(before, index)
            logits, after = self._run(torch.cat([ids[index], candidates.reshape(-1, 1)], dim=1), 1, before)
            self.ahead = Lookahead(before, after, C, length, shared=False, layers=layers)
            return logits
        inputs = self._siblings(inputs, candidates, before.get("attention_mask"), length)
        self._announce(before, 1)
        if self.context is not None:
            self.context.siblings = C
        try:
            out = self.model(**inputs, return_dict=True)
        finally:
            if self.context is not None:
                self.context.siblings = 0
        after = self.model._update_model_kwargs_for_generation(out, dict(before))
        self.ahead = Lookahead(before, after, C, length, shared=True)
        return out.logits.float().reshape(rows * C, -1)

    def _siblings(self, inputs: dict[str, Any], candidates: torch.Tensor, mask: Optional[torch.Tensor],
                  length: int) -> dict[str, Any]:
        """The one-token inputs of a cached step turned into C sibling tokens per row: the
        candidates as tokens, the step's position ids and token types repeated, every logit kept,
        and the additive mask [rows, 1, C, length + C] (the cache's unpadded keys, and itself)."""
        rows, C = candidates.shape
        out = dict(inputs, input_ids=candidates, logits_to_keep=0)
        for key in ROW_KEYS[1:]:
            t = out.get(key)
            if isinstance(t, torch.Tensor) and t.shape[-1] == 1:
                out[key] = t.expand(*t.shape[:-1], C)
        if out.get("cache_position") is not None:  # the 4.x loop: the siblings' slots in the cache
            out["cache_position"] = torch.arange(length, length + C, device=candidates.device)
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        keep = torch.ones(rows, length, dtype=torch.bool, device=candidates.device)
        if mask is not None:
            keep = mask[:, :length].bool()
        allowed = torch.cat([keep[:, None, :].expand(-1, C, -1),
                             torch.eye(C, dtype=torch.bool, device=keep.device).expand(rows, -1, -1)], dim=-1)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=keep.device)
        out["attention_mask"] = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        return out

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the look-ahead rows ``rows`` [new rows] (indices into its rows·C) as the beams'
        state: the chosen candidate's keys follow its row's cache."""
        ahead = self._taken()
        if not ahead.shared:
            self.cache.batch_select_indices(rows)
            self.kwargs = take_rows(ahead.after, rows)
            return
        source, pick = rows // ahead.candidates, rows % ahead.candidates
        for layer in self.cache.layers:
            layer.keys = _kept(layer.keys, source, pick, ahead.length)
            layer.values = _kept(layer.values, source, pick, ahead.length)
        self.kwargs = take_rows(ahead.after, source)

    def keep_prefix(self, rows: torch.Tensor) -> None:
        """Keep the look-ahead rows ``rows`` without their candidate token (for a continuation that
        was not a candidate)."""
        ahead = self._taken()
        source = rows // ahead.candidates
        if ahead.shared:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[source, :, :ahead.length], layer.values[source, :, :ahead.length]
            self.kwargs = take_rows(ahead.before, source)
            return
        # each layer as it was before the look-ahead, at the rows' beams
        for layer, (keys, values, length) in zip(self.cache.layers, ahead.layers or []):
            layer.keys, layer.values = keys[source], values[source]
            if length is not None:
                layer.cumulative_length = length
        self.kwargs = take_rows(ahead.before, rows)

    def _taken(self) -> Lookahead:
        if self.ahead is None:
            raise VsinkError("keep before a look-ahead")
        ahead, self.ahead = self.ahead, None
        return ahead

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the beams' rows (after a step chosen without look-ahead)."""
        self.cache.reorder_cache(index)
        self.kwargs = take_rows(self.kwargs, index)

    def rebuild(self, ids: torch.Tensor, prompt: int) -> torch.Tensor:
        """The cache of ``ids`` [rows, prompt + t] rebuilt from the prompt's (one forward of the t
        generated tokens): logits of the next token."""
        if self.prompt_kwargs is None:
            raise VsinkError("rebuild before the prompt pass")
        self.kwargs = {k: copy.deepcopy(v) for k, v in self.prompt_kwargs.items()}
        t = ids.shape[1] - prompt
        if t == 0:
            return self.prompt_logits
        if t > 1 and "cache_position" in self.kwargs:  # the 4.x loop's update adds one token per call
            for _ in range(t - 1):
                self.kwargs = self.model._update_model_kwargs_for_generation({}, self.kwargs)
        elif t > 1:
            self.kwargs = self.model._update_model_kwargs_for_generation({}, self.kwargs, num_new_tokens=t - 1)
        logits, self.kwargs = self._run(ids, t, self.kwargs)
        return logits


class UncachedStepper:
    """The forwards of :class:`Stepper` without the KV cache (see the module docstring): every
    forward runs each row's whole sequence. The rows are the beams of one prompt without padding,
    all of one length, so their kwargs (mask, position ids, token types, encoded images) are the
    prompt's extended to that length, and keeping, dropping or reordering rows changes no state.
    ``attention``: the :class:`LastRowAttention` whose rows a look-ahead gathers from its forwards."""

    def __init__(self, model: Any, kwargs: dict[str, Any], context: Optional[BeamContext] = None,
                 attention: Optional[LastRowAttention] = None):
        self.model, self.context, self.attention = model, context, attention
        self.prompt_kwargs = dict(kwargs)  # every row's kwargs at the prompt's length
        self.by_length: dict[int, dict[str, Any]] = {}  # ... and at each length reached since
        self.prompt = 0
        self.prompt_logits: Optional[torch.Tensor] = None
        self.ahead: Optional[int] = None  # the candidates per row of the look-ahead not yet kept

    def _at(self, length: int) -> dict[str, Any]:
        """The rows' kwargs for sequences of ``length`` tokens: the prompt's, extended one token at
        a time as transformers' generation loop extends them (positions one past the last; token
        types: the last one's, a text token's)."""
        if not self.by_length:
            self.by_length[self.prompt] = self.prompt_kwargs
        known = max(n for n in self.by_length if n <= length)
        for n in range(known + 1, length + 1):
            self.by_length[n] = self.model._update_model_kwargs_for_generation({}, dict(self.by_length[n - 1]))
        return dict(self.by_length[length])

    def _run(self, ids: torch.Tensor, new: int, kwargs: dict[str, Any], first: bool = False) -> torch.Tensor:
        """One forward of the whole sequences ``ids`` whose last ``new`` tokens are new: the
        logits of the next token [rows, V]. A generated token that is an image or video
        placeholder (a candidate of a random model) runs as that token's embedding, as a cached
        step runs it: the model would take it for an image slot of the re-encoded sequence."""
        extra = {"is_first_iteration": True} if first else {}
        if "cache_position" in kwargs:  # the 4.x loop without the cache: every position of the sequences
            kwargs = {**kwargs, "cache_position": torch.arange(ids.shape[1], device=ids.device)}
            extra = {}
        shown, placed = placeholders_shown(self.model, ids, self.prompt)
        inputs = self.model.prepare_inputs_for_generation(shown, **dict(kwargs), **extra)
        if self.context is not None:
            self.context.announce(ids.shape[1], new)
        with ExitStack() as stack:
            if bool(placed.any()):
                stack.enter_context(_embedded_as(self.model.get_input_embeddings(), ids, placed))
            out = self.model(**inputs, return_dict=True)
        return out.logits[:, -1, :].float()

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt pass: logits of the first generated token [rows, V] (rows that repeat one
        prompt, its beams, run once)."""
        rows, self.prompt = input_ids.shape
        self.prompt_kwargs = with_cache_position(self.model, input_ids, self.prompt_kwargs)
        if rows > 1 and bool((input_ids == input_ids[:1]).all()):
            logits = self._run(input_ids[:1], self.prompt, first_row(self.prompt_kwargs, rows), first=True)
            logits = logits.expand(rows, -1)
        else:
            logits = self._run(input_ids, self.prompt, self.prompt_kwargs, first=True)
        self.prompt_logits = logits
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One forward of the whole sequences ``ids`` [rows, n]: logits of their next token."""
        return self._run(ids, 1, self._at(ids.shape[1]))

    def shares_cache(self) -> bool:
        """No cache to share: each candidate runs on its own row."""
        return False

    def lookahead(self, ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Every candidate token [rows, C] after its row: logits [rows·C, V] (row ``r·C + c``:
        candidate c of row r), from one forward per candidate rank on the rows' kwargs; the
        attention rows of those forwards are gathered into ``attention.rows`` in the same order."""
        rows, C = candidates.shape
        kwargs = self._at(ids.shape[1] + 1)
        logits, seen = [], []
        for c in range(C):
            logits.append(self._run(torch.cat([ids, candidates[:, c:c + 1]], dim=1), 1, kwargs))
            if self.attention is not None:
                seen.append(self.attention.rows)
        if self.attention is not None:
            self.attention.rows = torch.stack(seen, dim=1).reshape(rows * C, -1)
        self.ahead = C
        return torch.stack(logits, dim=1).reshape(rows * C, -1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep look-ahead rows as the beams' state (nothing to keep without a cache)."""
        self._taken()

    def keep_prefix(self, rows: torch.Tensor) -> None:
        """Keep look-ahead rows without their candidate (nothing to keep without a cache)."""
        self._taken()

    def _taken(self) -> None:
        if self.ahead is None:
            raise VsinkError("keep before a look-ahead")
        self.ahead = None

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the beams' rows (their kwargs are alike: nothing to reorder)."""

    def rebuild(self, ids: torch.Tensor, prompt: int) -> torch.Tensor:
        """The logits of the next token of ``ids`` [rows, prompt + t] after a rollback: one forward
        of the whole sequences (the prompt pass's logits when t is 0)."""
        if self.prompt_logits is None:
            raise VsinkError("rebuild before the prompt pass")
        t = ids.shape[1] - prompt
        if t == 0:
            return self.prompt_logits
        return self._run(ids, t, self._at(ids.shape[1]))


def with_cache_position(model: Any, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as the generation loop of the installed transformers starts from them: the 4.x
    loop adds ``cache_position`` (the prompt's positions, by the model's own
    ``_get_initial_cache_position``), which its forwards and kwargs updates read; transformers 5
    keeps none."""
    initial = getattr(model, "_get_initial_cache_position", None)
    if initial is None or "cache_position" in kwargs:
        return kwargs
    return initial(input_ids.shape[1], input_ids.device, dict(kwargs))


def placeholder_ids(model: Any, device: torch.device) -> torch.Tensor:
    """The ids a model's forward replaces by encoded images or videos (its config's image and video
    token ids), and the vision-start marker, whose next token transformers 4.x's M-RoPE index
    (Qwen-VL) reads as an image or video of the sequence."""
    config = model.config
    ids = {getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id",
                                                    "video_token_index", "vision_start_token_id")}
    return torch.tensor(sorted(i for i in ids if isinstance(i, int)), dtype=torch.long, device=device)


@contextmanager
def _embedded_as(embedding: torch.nn.Module, ids: torch.Tensor, placed: torch.Tensor) -> Iterator[None]:
    """While active, the embedding of sequences shaped as ``ids`` gives, where ``placed``, the
    embedding of ``ids`` there (the forward was shown a stand-in text token at those places)."""

    def restore(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].shape != ids.shape:
            return None
        return torch.where(placed[..., None], module.forward(ids.to(args[0].device)), out)

    handle = embedding.register_forward_hook(restore)
    try:
        yield
    finally:
        handle.remove()


def placeholders_shown(model: Any, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shown, placed)``: ``placed`` marks the generated tokens (past ``prompt``) that are an
    image or video placeholder or a vision start; ``shown`` is ``ids`` with each of them replaced by
    the prompt's last token (a token the model reads as text), ``ids`` itself when none is placed.
    The placed rows then take that token's own embedding (:func:`_embedded_as`)."""
    placed = torch.zeros_like(ids, dtype=torch.bool)
    placed[:, prompt:] = torch.isin(ids[:, prompt:], placeholder_ids(model, ids.device))
    if not bool(placed.any()):
        return ids, placed
    return ids.masked_fill(placed, 0) + placed * ids[:, prompt - 1:prompt], placed


@contextmanager
def placeholders_as_text(model: Any, prompt: int) -> Iterator[None]:
    """While active, a forward of ``model`` over whole sequences of more than ``prompt`` tokens
    (``generate`` without the KV cache re-runs every step's sequence, the images included) runs a generated image or video placeholder, or vision start, as that token's embedding, as a
    cached step runs it (:class:`UncachedStepper` does the same for beam search): the model would
    take it for an image slot of the sequence and refuse the image's features (a random or demo
    model can rank its placeholder first). The model's forward is put back on exit."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None or args or ids.shape[1] <= prompt:
            return original(*args, **kwargs)
        shown, placed = placeholders_shown(model, ids, prompt)
        if not bool(placed.any()):
            return original(*args, **kwargs)
        with _embedded_as(model.get_input_embeddings(), ids, placed):
            return original(*args, **{**kwargs, "input_ids": shown})

    with forward_replaced(model, forward):
        yield

def stepper_for(model: Any, kwargs: dict[str, Any], context: Optional[BeamContext] = None,
                attention: Optional[LastRowAttention] = None) -> Union[Stepper, UncachedStepper]:
    """The stepper of a custom decoding loop: on the KV cache (:class:`Stepper`) unless the
    generation call runs without it (``use_cache=False``: :class:`UncachedStepper`)."""
    if kwargs.get("use_cache", True):
        return Stepper(model, kwargs, context)
    return UncachedStepper(model, kwargs, context, attention)


def _kept(states: torch.Tensor, source: torch.Tensor, pick: torch.Tensor, length: int) -> torch.Tensor:
    """A cache layer's ``states`` [rows, heads, length + C, d] after a sibling look-ahead cut to
    row ``source`` with its first ``length`` positions and its sibling ``pick`` [new rows each]."""
    return torch.cat([states[source, :, :length], states[source, :, length + pick][:, :, None]], dim=2)
