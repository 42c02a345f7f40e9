"""OPERA — over-trust penalty and retrospection-allocation (Huang et al., CVPR 2024), a decoding
strategy on vsink's beam search (:mod:`vsink.lvlm.beam`), not a logits edit.

Each step of a beam search over ``beams`` beams, every beam's top ``candidates`` tokens (by raw
logit) each get a look-ahead forward; the last decoder layer's attention row of each candidate,
maximum over heads, renormalised to sum 1, gives its attention ``a_ij`` over the response so far
(rows and columns from the first generated token). Column ``j``'s score is
``φ_j = 1e-7 · Π_{i ≥ j} scale · a_ij`` and a candidate's penalty is ``max_j φ_j``; in the first
10 response tokens the penalty is instead minus the candidate's attention on the image tokens (a
bonus). The candidate's logit becomes ``logit − penalty_weight · penalty``, the other tokens get
``−999``, and the beam search proceeds on the log-softmax of that vector — so even at penalty 0
the candidates' log-probabilities are renormalised among themselves (with every token a
candidate and penalty 0 it is plain beam search).

Retrospection: each step records, per beam, the most frequent argmax column among its
candidates; when the prompt's most frequent one (``loc``, over beams) is the recorded column of
every beam more than ``threshold`` times and ``loc ≥ 10``, the search rolls back to the state
before response position ``loc + 1`` (at most ``candidates`` times per position, then one
position earlier; never further back than ``window`` steps) and redoes that step on the full
vocabulary, with the continuations chosen there before excluded (set to the minimum logit).

With or without the KV cache: without it every forward re-runs the whole sequences
(:class:`~vsink.lvlm.beam.UncachedStepper`), with the same tokens.

The defaults are the released ``chair_eval.py`` / README settings (shikiw/OPERA): 5 beams, 5
candidates, scale 50, threshold 15, window 512, penalty 1. ``protocol="official"`` additionally
rounds φ to float16 as the released code stores it (values above 65504 become infinite). See
docs/fidelity.md for every difference from the released code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from ..errors import VsinkError
from ..options import Float, Int
from .base import Mitigation, Run, register
from .settings import CheckedSettings, setting

#: logit given to every token that is not a candidate (and to rejected continuations)
FLOOR = -999.0
#: response positions whose penalty is the image-attention bonus, and below which no rollback goes
EARLY = 10


@dataclass
class OPERASettings(CheckedSettings):
    """OPERA's settings (see the module docstring)."""

    beams: int = setting(5, Int(min=1), "number of beams of the beam search")
    candidates: Optional[int] = setting(5, Int(min=1), "tokens per beam scored by look-ahead attention (null: "
                                        "every token of the vocabulary)", nullable=True)
    scale: float = setting(50.0, Float(0, min_open=True), "factor on the attention before the column-wise products")
    threshold: int = setting(15, Int(min=0), "rollback when one column wins in every beam more than this many steps")
    window: int = setting(512, Int(min=1), "steps kept for retrospection (no rollback further back, none to "
                          "response positions at or beyond it)")
    penalty: float = setting(1.0, Float(0), "weight of the over-trust penalty on the candidates' logits")
    protocol: str = "paper"

    NAME: ClassVar[str] = "opera"
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


def column_scores(products: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """φ of each candidate over the response columns.

    ``products`` [R, s]: per beam and column, ``Π scale · a_ij`` over the response rows so far;
    ``rows`` [R, C, s + 1]: each candidate's renormalised attention on the response columns (the
    last is the candidate itself). Returns [R, C, s + 1] = ``1e-7 · Π_{i ≥ j} scale · a_ij``."""
    return 1e-7 * _with_one(products)[:, None, :] * (scale * rows)


def stored(phi: torch.Tensor, protocol: str) -> torch.Tensor:
    """φ as the protocol keeps it: float32 (``paper``), or rounded to float16 as the released
    code's score tensor holds it (``official``: above 65504 infinite)."""
    return phi.half().float() if protocol == "official" else phi


def extend_products(products: torch.Tensor, row: torch.Tensor, scale: float) -> torch.Tensor:
    """The column products [R, s + 1] once the response row ``row`` [R, s + 1] is appended."""
    return _with_one(products) * (scale * row)


def _with_one(products: torch.Tensor) -> torch.Tensor:
    """``products`` [R, s] with a column of ones appended (the newest column has no earlier rows)."""
    return torch.cat([products, products.new_ones(products.shape[0], 1)], dim=-1)


def candidate_scores(logits: torch.Tensor, candidates: torch.Tensor, candidate_logits: torch.Tensor,
                     penalty: torch.Tensor, weight: float) -> torch.Tensor:
    """The step's logit vector [R, V]: :data:`FLOOR` everywhere but the candidates [R, C], which
    keep their logits minus ``weight · penalty``."""
    return torch.full_like(logits, FLOOR).scatter(1, candidates, candidate_logits - weight * penalty)


def over_trust(phi: torch.Tensor, image: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty [R, C], argmax column [R, C]) of candidates with scores ``phi`` [R, C, length] and
    attention ``image`` [R, C] on the image: ``max φ`` past the first 10 response tokens, ``−image``
    up to them."""
    best, column = phi.max(dim=-1)
    return (-image if length <= EARLY else best), column


@dataclass
class Retrospection:
    """The rollback rule's state for one prompt (see the module docstring)."""

    threshold: int
    window: int
    candidates: int

    def __post_init__(self) -> None:
        self.history: list[torch.Tensor] = []  # per step: [R] each beam's most frequent argmax column
        self.times = [0] * self.window  # rollbacks per response position
        self.rejected: dict[int, torch.Tensor] = {}  # response position → flat (beam · V + token) indices

    def record(self, columns: torch.Tensor) -> int:
        """Record a step's argmax columns [R, C]; returns the prompt's column (mode over beams of
        the per-beam modes)."""
        per_beam = columns.mode(dim=-1).values
        self.history.append(per_beam)
        return int(per_beam.mode().values)

    def target(self, column: int, step: int) -> Optional[int]:
        """The response position to roll back to at ``step``, or None."""
        wins = (torch.stack(self.history, dim=-1) == column).sum(-1)
        if not bool((wins > self.threshold).all()) or column < EARLY:
            return None
        position = column + 1
        if position >= self.window:
            return None
        if self.times[position] >= self.candidates:
            position -= 1
            if self.times[position] >= self.candidates:
                return None
        self.times[position] += 1
        if step + 1 - position > self.window + 1:
            position = max(1, step - self.window)
        return position


class OperaLoop:
    """OPERA's decoding loop for ``generate(custom_generate=...)`` on one prompt (see the module
    docstring); counts what it did on the mitigation, in the last decoder layer's row."""

    def __init__(self, opera: "OPERA", run: Run, attention: Any):
        self.opera, self.run, self.attention = opera, run, attention
        self.settings: OPERASettings = opera.settings

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured rows renormalised: (response part [rows, t], image mass [rows])."""
        a = self.attention.rows
        a = a / a.sum(-1, keepdim=True)
        image = self.run.context.image0[0].to(a.device)
        return a[:, self.prompt:], (a[:, :self.prompt] * image[None, :self.prompt]).sum(-1)

    def _count(self, **amounts: float) -> None:
        self.opera.count(self.run.decoder.num_layers - 1, **amounts)

    def __call__(self, model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, synced_gpus: bool = False, **model_kwargs: Any) -> torch.Tensor:
        from ..lvlm.beam import Beams, stepper_for

        s = self.settings
        self.processors, self.stopping = logits_processor, stopping_criteria
        self.beams = Beams.start(input_ids, generation_config.num_beams, generation_config)
        self.prompt = input_ids.shape[1]
        self.stepper = stepper_for(model, model_kwargs, self.run.context, self.attention)
        self.logits = self.stepper.prefill(input_ids)
        self.vocab = self.logits.shape[-1]
        self.C = self.vocab if s.candidates is None else min(s.candidates, self.vocab)
        self.retro = Retrospection(s.threshold, s.window, self.C)
        self._count(candidates_scored=0, rollbacks=0)  # the row reports both, a search without rollbacks too
        self.products = torch.ones(input_ids.shape[0], 0, device=self.logits.device)
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.cur_len, self.step, self.last = self.prompt, 0, None
        while True:
            self.snapshots[self.step] = {"beams": self.beams.snapshot(), "products": self.products, "last": self.last}
            self.snapshots.pop(self.step - s.window, None)
            if self._candidate_step():
                break
        return self.beams.output(generation_config.num_return_sequences or 1)

    def _candidate_step(self) -> bool:
        """One step: look-ahead, penalty, then the beam step, or a rollback; whether the search is over."""
        s, C, step = self.settings, self.C, self.step
        ids = self.beams.flat(self.cur_len)
        R = ids.shape[0]
        cand_logits, cand = self.logits.topk(C, dim=-1)
        ahead = self.stepper.lookahead(ids, cand)
        window, image = self._rows()
        window = window.view(R, C, step + 1)
        phi = stored(column_scores(self.products, window, s.scale), s.protocol)
        penalty, columns = over_trust(phi, image.view(R, C), step + 1)
        self._count(candidates_scored=R * C)
        position = self.retro.target(self.retro.record(columns), step)
        back = min(position, step - 1) if position is not None else None
        if back is not None and back in self.snapshots:
            return self._roll_back(back, position)
        scores = candidate_scores(self.logits, cand, cand_logits, penalty, s.penalty)
        source, tokens, over = self._advance(scores, ids)
        match = cand[source] == tokens[:, None]
        if bool(match.any(-1).all()):  # every new beam continues with one of its candidates
            rows = source * C + match.float().argmax(-1)
            self.stepper.keep(rows)
            self.logits = ahead[rows]
            row = window.view(R * C, -1)[rows]
        else:
            self.stepper.keep_prefix(source * C)
            self.logits = self.stepper.step(self.beams.flat(self.cur_len + 1))
            row = self._rows()[0]
        self._advanced(source, tokens, row)
        return over

    def _roll_back(self, back: int, position: int) -> bool:
        """Restore the state before step ``back`` and redo it on the whole vocabulary without the
        continuations chosen there before (recorded under response position ``position``)."""
        self._count(rollbacks=1)
        chosen = self.snapshots[back + 1]["last"] if back + 1 in self.snapshots else self.last
        snap = self.snapshots[back]
        self.beams, self.products, self.last = snap["beams"].snapshot(), snap["products"], snap["last"]
        for k in [k for k in self.snapshots if k > back]:
            del self.snapshots[k]
        del self.retro.history[back + 1:]
        self.cur_len, self.step = self.prompt + back, back
        rejected = self.retro.rejected
        flat = (chosen[0] % self.beams.beams) * self.vocab + chosen[1]
        rejected[position] = flat if position not in rejected else torch.cat([rejected[position], flat])
        rejected.pop(position + 1, None)
        logits = self.stepper.rebuild(self.beams.flat(self.cur_len), self.prompt)
        shifted = (logits - (999.0 + logits.min(-1, keepdim=True).values)).view(self.beams.batch, -1)
        shifted[:, rejected[position]] = FLOOR
        source, tokens, over = self._advance(shifted.view(-1, self.vocab), self.beams.flat(self.cur_len))
        self.stepper.reorder(source)
        self.logits = self.stepper.step(self.beams.flat(self.cur_len + 1))
        self._advanced(source, tokens, self._rows()[0])
        return over

    def _advanced(self, source: torch.Tensor, tokens: torch.Tensor, row: torch.Tensor) -> None:
        """Book a beam step: the new beams' column products with their newest row ``row``."""
        self.products = extend_products(self.products[source], row, self.settings.scale)
        self.last, self.step, self.cur_len = (source, tokens), self.step + 1, self.cur_len + 1

    def _advance(self, scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        log_probs = torch.log_softmax(scores, dim=-1)
        if self.processors is not None:
            log_probs = self.processors(ids, log_probs)
        return self.beams.advance(log_probs, self.cur_len, self.stopping)


#: mitigations OPERA composes with: attention edits that read the generation context per call
COMPOSES_WITH = ("pai",)


@register
class OPERA(Mitigation):
    """OPERA as a decoding strategy (see the module docstring)."""

    name = "opera"

    settings_class = OPERASettings

    def _install(self, run: Run, handles: list) -> None:
        """OPERA installs its attention capture per prompt, in :meth:`decode`."""

    def decodes(self) -> bool:
        return True

    def check_composition(self, others: list[Mitigation], run: Run, use_cache: bool, capture: bool) -> None:
        """Refuse, in one line, what OPERA cannot run with: another decoding strategy or rule
        (guidance), mitigations not verified under its look-ahead rows, per-token capture."""
        for m in others:
            if getattr(m, "decode", None) is not None:
                raise VsinkError(f"opera is a decoding strategy and cannot be combined with {m.name}, another one")
            if m.name not in COMPOSES_WITH:
                raise VsinkError(f"opera composes with {', '.join(COMPOSES_WITH)} only; {m.name} is refused "
                                 f"(its edits are not verified under beam search with look-ahead rows)")
            if m.decodes() or m.branches(run) or m.logits_processors(run):
                raise VsinkError(f"opera cannot be combined with {m.name}'s next-token rule (guidance or branches); "
                                 f"compose it with {m.name}'s attention edit only")
        if capture:
            raise VsinkError("opera does not capture per-token attention (its steps can be rolled back); "
                             "drop capture_attention (vsink generate: --export-attention)")

    def decode(self, run: Run, inputs: dict[str, Any], max_new_tokens: int, processors: list) -> torch.Tensor:
        """Generate for every prompt of ``inputs`` (each on its own beams: a rollback restores one
        prompt's state) and return the left-padded batch of sequences [B, prompt + new]."""
        from ..lvlm.beam import BeamContext, LastRowAttention

        lvlm, decoder = run.lvlm, run.decoder
        ids, mask = run.input_ids, run.attention_mask
        news = []
        saved = (run.context, decoder.context)
        try:
            for b in range(ids.shape[0]):
                row = row_inputs(inputs, b, mask, lvlm.pixel_counts(inputs))
                unmarked = unmarked_images(lvlm.model, row)
                if unmarked is not None:
                    raise VsinkError(f"opera under transformers 4.x needs <|vision_start|> before each image of a "
                                     f"Qwen-VL prompt (its beam search counts a row's images by it, as the model's "
                                     f"chat template writes them): prompt {b} {unmarked}")
                context = BeamContext(lvlm, row["input_ids"])
                run.context = decoder.context = context
                loop = OperaLoop(self, run, None)
                with LastRowAttention(decoder, decoder.num_layers - 1) as attention:
                    loop.attention = attention
                    out = lvlm.model.generate(**row, max_new_tokens=max_new_tokens, num_beams=self.settings.beams,
                                              do_sample=False, use_cache=run.use_cache, logits_processor=processors or None,
                                              custom_generate=functools.partial(_call, loop))
                news.append(out[0, row["input_ids"].shape[1]:])
        finally:
            run.context, decoder.context = saved
        fill = _fill_token(lvlm)
        width = max(len(n) for n in news)
        new = torch.full((len(news), width), fill, dtype=ids.dtype, device=ids.device)
        for b, n in enumerate(news):
            new[b, :len(n)] = n
        return torch.cat([ids, new], dim=1)

    def nothing_edited_hint(self) -> str:
        return "no step was scored"


def _call(loop: OperaLoop, model: Any, input_ids: torch.Tensor, logits_processor: Any = None,
          stopping_criteria: Any = None, generation_config: Any = None, synced_gpus: bool = False,
          **model_kwargs: Any) -> torch.Tensor:
    return loop(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, **model_kwargs)


def unmarked_images(model: Any, row: dict[str, Any]) -> Optional[str]:
    """Where transformers 4.x's beam search cannot expand the images of one prompt ``row``: its
    Qwen-VL models split a row's images (``image_grid_thw``, ``video_grid_thw``) by counting the
    vision-start tokens before them (``_get_image_nums_and_video_nums``), so images without one
    fail there. ``"has N images, M marked"``, or None (marked, or a loop that counts otherwise:
    transformers 5, other families)."""
    count = getattr(model, "_get_image_nums_and_video_nums", None)
    if count is None or not hasattr(model, "_get_initial_cache_position"):
        return None
    images, videos = count(row["input_ids"])
    marked = int(images.sum() + videos.sum())
    expected = sum(len(row[key]) for key in ("image_grid_thw", "video_grid_thw") if row.get(key) is not None)
    return None if marked == expected else f"has {expected} image(s), {marked} marked"


def _fill_token(lvlm: Any) -> int:
    """The token that pads a finished sequence (the model's pad token, else its EOS)."""
    config = lvlm.model.generation_config
    for value in (config.pad_token_id, getattr(lvlm.text_config, "pad_token_id", None), config.eos_token_id):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def row_inputs(inputs: dict[str, Any], b: int, mask: torch.Tensor,
               counts: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Row ``b`` of a left-padded batch of model inputs, without its padding: per-token tensors
    lose the padded positions, ``pixel_values`` is cut by ``counts`` where given (entries per row,
    :meth:`LVLM.pixel_counts <vsink.backbones.hf_lvlm.LVLM.pixel_counts>`: Qwen2-VL's flat
    patches, InternVL's tiles), other per-row tensors are sliced."""
    B = mask.shape[0]
    keep = mask[b].bool()
    out: dict[str, Any] = {"input_ids": inputs["input_ids"][b][keep][None],
                           "attention_mask": torch.ones_like(inputs["input_ids"][b][keep][None])}
    for key, value in inputs.items():
        if key in out:
            continue
        if isinstance(value, torch.Tensor) and value.shape[:2] == mask.shape:  # per token (token types)
            out[key] = value[b][keep][None]
        elif key == "pixel_values" and counts is not None:
            start = int(sum(counts[:b]))
            out[key] = value[start:start + int(counts[b])]
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == B:
            out[key] = value[b:b + 1]
        else:
            out[key] = value
    return out
