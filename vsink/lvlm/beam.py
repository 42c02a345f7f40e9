"""Beam search run by vsink inside transformers' own ``generate``, for decoding strategies that need
more than a logits edit (OPERA: candidate look-ahead, rollback to an earlier step).

``generate(custom_generate=loop)`` does the input preparation (beam expansion, cache, masks,
position ids, M-RoPE) and hands the loop the model kwargs; the loop here keeps transformers' beam
bookkeeping (:class:`Beams`: the top ``2·beams`` continuations, finished hypotheses scored with the
length penalty over the generated length, the early-stopping heuristic), and :class:`Stepper`
runs the forwards on the model's cache: one per step for the chosen continuations, a batched
look-ahead forward of several candidate tokens per beam whose rows then serve as the next step
(no second forward for the chosen ones), and a rebuild of the cache from the prompt's after a
rollback. Attention is read through vsink's ``attn_probs`` site (:class:`LastRowAttention`).

Verified against ``generate(num_beams=N)`` of the installed transformers (5.x); the 4.x
generation loop (``cache_position`` in the kwargs) is not supported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..backbones.hooks import HookSet
from ..errors import VsinkError
from .context import DecodeContext

#: model kwargs that hold one row per sequence and one column per token
ROW_KEYS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


def supports_custom_loops() -> bool:
    """Whether the installed transformers hands ``generate`` a custom decoding loop the way
    :class:`Stepper` expects (transformers 5)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


class BeamContext(DecodeContext):
    """The context of one prompt (one row, no padding) whose forwards run on any number of beam or
    candidate rows: every per-row table is that prompt's row, broadcast."""

    def lookup(self, table: torch.Tensor, pos: torch.Tensor, beyond: bool) -> torch.Tensor:
        if table.shape[0] == 1 and pos.shape[0] > 1:
            table = table.expand(pos.shape[0], -1)
        return super().lookup(table, pos, beyond)


class LastRowAttention(HookSet):
    """The last query row's attention in one decoder layer, maximum over heads, of every forward
    (``rows``: [rows, keys]), read from the layer's ``attn_probs`` site; the other rows run on the
    model's own kernel."""

    def __init__(self, decoder: Any, layer: int):
        super().__init__()
        self.decoder, self.layer = decoder, layer
        self.rows: Optional[torch.Tensor] = None

    def _install(self) -> None:
        self._handles.append(self.decoder.hook("attn_probs", self.layer, self._observe,
                                               rows=lambda queries, keys: queries - 1))

    def _observe(self, probs: torch.Tensor, q_start: int, logits: Optional[torch.Tensor]) -> None:
        queries, _ = self.decoder.context.shapes[self.layer]
        if q_start + probs.shape[2] == queries:
            self.rows = probs[:, :, -1, :].amax(1).float()


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


class Stepper:
    """The forwards of a custom decoding loop on the model's own cache and kwargs (see the module
    docstring)."""

    def __init__(self, model: Any, kwargs: dict[str, Any]):
        if not kwargs.get("use_cache", True):
            raise VsinkError("this decoding strategy runs on the KV cache; use_cache=False is not supported")
        self.model = model
        self.kwargs = kwargs
        self.prompt_kwargs: Optional[dict[str, Any]] = None

    @property
    def cache(self) -> Any:
        return self.cache_of(self.kwargs)

    @staticmethod
    def cache_of(kwargs: dict[str, Any]) -> Any:
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                return kwargs[key]
        raise VsinkError("the model returned no KV cache")

    def _run(self, ids: torch.Tensor, new: int, kwargs: dict[str, Any],
             first: bool = False) -> tuple[torch.Tensor, dict]:
        kwargs = dict(kwargs)  # transformers updates the dict it is given
        extra = {"is_first_iteration": True} if first else {}
        inputs = self.model.prepare_inputs_for_generation(ids, next_sequence_length=None if first else new,
                                                          **kwargs, **extra)
        out = self.model(**inputs, return_dict=True)
        kwargs = self.model._update_model_kwargs_for_generation(out, kwargs)
        return out.logits[:, -1, :].float(), kwargs

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt pass: logits of the first generated token [rows, V]; keeps a copy of the
        prompt's cache for :meth:`rebuild`. Rows that repeat one prompt (its beams) run once and
        their cache is repeated."""
        rows = input_ids.shape[0]
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

    def lookahead(self, ids: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """One forward of every candidate token [rows, C] after its row: logits [rows·C, V]; the
        cache then holds rows·C rows. Returns the kwargs before and after that forward (rows·C)."""
        rows, C = candidates.shape
        self.cache.batch_repeat_interleave(C)
        index = torch.arange(rows, device=ids.device).repeat_interleave(C)
        before = take_rows(self.kwargs, index)
        expanded = torch.cat([ids[index], candidates.reshape(-1, 1)], dim=1)
        logits, after = self._run(expanded, 1, before)
        return logits, before, after

    def keep(self, rows: torch.Tensor, after: dict) -> None:
        """Keep the look-ahead rows ``rows`` (one per beam) as the beams' state."""
        self.cache.batch_select_indices(rows)
        self.kwargs = take_rows(after, rows)

    def keep_prefix(self, rows: torch.Tensor, before: dict) -> None:
        """Keep the look-ahead rows ``rows`` without their candidate token (for a continuation that
        was not a candidate)."""
        self.cache.batch_select_indices(rows)
        self.cache.crop(-1)
        self.kwargs = take_rows(before, rows)

    def reorder(self, index: torch.Tensor) -> None:
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
        if t > 1:
            self.kwargs = self.model._update_model_kwargs_for_generation({}, self.kwargs, num_new_tokens=t - 1)
        logits, self.kwargs = self._run(ids, t, self.kwargs)
        return logits
