"""Greedy generation with mitigations (none, VAR, PAI, FastV, test-time registers, or any
combination such as ``"ttr+var"``), batched, with the KV cache or without, and optional per-token
attention capture over the image grid."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..arguments import ArgumentError
from ..backbones.base import evaluating
from ..backbones.hf_decoder import decoder_of
from ..backbones.hooks import Hooks
from ..backbones.sites import owned_by
from ..backbones.hf_lvlm import LVLM, lvlm_arg
from ..errors import VsinkError, VsinkWarning
from ..options import Int, Option
from ..mitigate import REGISTRY, Mitigation, Run, check_composition, check_protocol, make_mitigations, mitigation_names
from .beam import placeholders_as_text
from .branches import OBSERVERS, BranchRunner, stacked_main
from .capture import AttentionCapture
from .context import DecodeContext


class MitigationWarning(VsinkWarning):
    """A mitigation changed nothing in a generation call."""


def make_settings(mitigation: str, values: Optional[dict[str, Any]] = None, protocol: str = "paper") -> Any:
    """The settings object of one mitigation with ``values`` (from ``--set key=value``) applied;
    ``None`` for ``"none"``. ``protocol="official"`` takes the released scripts' defaults (the
    settings class's ``OFFICIAL_DEFAULTS``) for every setting not in ``values``."""
    names = mitigation_names(mitigation)
    if len(names) > 1:
        raise VsinkError(f"make_settings takes one mitigation, got {mitigation!r}")
    mitigations = make_mitigations(mitigation, values, protocol)
    return mitigations[0].settings if mitigations else None


class TokenProgress:
    """A ``LogitsProcessor`` that changes nothing and shows on a progress bar the longest output
    reached: the token being chosen is number ``len(input_ids) - prompt_length + 1``. Counting
    calls instead would overrun the bar under a strategy that calls the processors several times
    per step (OPERA's candidates and rollbacks)."""

    def __init__(self, bar: tqdm, prompt_length: int):
        self.bar = bar
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        reached = min(input_ids.shape[-1] - self.prompt_length + 1, self.bar.total)
        if reached > self.bar.n:
            self.bar.update(reached - self.bar.n)
        return scores


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt + new]
    new_tokens: torch.Tensor  # [B, new]
    texts: list[str]
    mitigation: str  # "none", "var", "ttr+var", ...
    settings: Optional[dict[str, Any]]  # one mitigation: its settings; several: {name: settings}; none: None
    attention: Optional[torch.Tensor] = None  # [steps, B, layers, n_image] (NaN: pruned)
    image_spans: Any = None
    kept: Optional[torch.Tensor] = None  # FastV: prompt positions kept from block k on [B, n] (the last pass's)
    protocol: str = "paper"
    #: per mitigation, what it did per layer (rows edited, mass moved, tokens pruned, ...)
    report: list[dict[str, Any]] = field(default_factory=list)
    #: one line per mitigation that edited nothing
    warnings: list[str] = field(default_factory=list)


def generate(lvlm: LVLM, inputs: dict[str, Any], *, mitigation: Union[str, Sequence[Mitigation]] = "none",
             settings: Optional[dict[str, Any]] = None, protocol: str = "paper", max_new_tokens: int = 32,
             use_cache: bool = True, capture_attention: bool = False, progress: bool = False,
             sampling: Optional[dict[str, float]] = None, stack_main: bool = True) -> GenerationResult:
    """Greedy decoding of a batch (``inputs`` from :meth:`LVLM.prepare`, left-padded) with
    mitigations; with ``sampling`` (``{"temperature", "top_p"}``), sampling from torch's global
    generator instead (the caller seeds it).

    Args:
        mitigation: ``"none"``, a name (``"var"``, ``"pai"``, ``"fastv"``, ``"ttr"``), a
            ``+``-joined combination (``"ttr+var"``), or :class:`~vsink.mitigate.Mitigation` objects.
        settings: see :func:`vsink.mitigate.make_mitigations`.
        protocol: ``"paper"`` (default) runs the mitigations as their papers describe them;
            ``"official"`` as the authors' released scripts do, with their defaults for the
            settings not given. Recorded in the result.
        capture_attention: record, for every generated token, its query's attention on the image
            tokens per layer (head mean; routes every layer through explicit attention).
        progress: show a progress bar over the decoding steps (off by default: callers that
            generate batch after batch show their own).
        max_new_tokens: an integer >= 1; with the prompt, within the model's context
            (:meth:`LVLM.check_context`: refused in one line naming the limit).
        stack_main: run a mitigation's branches that share the main prompt's shapes and edits
            (VCD's noised image) in one forward with the main pass, batch stacked
            (:func:`~vsink.lvlm.branches.stacked_main`); ``False``: in a forward of their own, as
            the released implementations do (the same tokens; the report's ``branch_passes``
            counts the extra forwards, ``stacked_with_main`` names the branches that rode along).

    Every mitigation reports what it did per layer (``result.report``); one that edited nothing
    raises a :class:`MitigationWarning` (and is listed in ``result.warnings``).
    """
    lvlm = lvlm_arg(lvlm)
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise ArgumentError(f"inputs must be the dict LVLM.prepare(images, prompts) returns, got a "
                            f"{type(inputs).__name__}{'' if not isinstance(inputs, Mapping) else ' without input_ids'}")
    check_protocol(protocol)
    Option("max_new_tokens", Int(1)).check(max_new_tokens)
    if isinstance(mitigation, str):
        mitigations = make_mitigations(mitigation, settings, protocol)
        label = "+".join(m.name for m in mitigations) or "none"
    else:
        mitigations = list(mitigation)
        label = "+".join(m.name for m in mitigations) or "none"
        if settings:
            raise VsinkError("pass settings inside the Mitigation objects, not as settings=")
    for m in mitigations:
        reason = m.refusal(type(lvlm))
        if reason is not None:
            raise VsinkError(f"{m.name} does not apply to {lvlm.spec} ({lvlm.family} family): {reason}")
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    lvlm.check_context(int(input_ids.shape[1]), max_new_tokens)
    if not all(lvlm.image_spans(input_ids).counts()):
        raise VsinkError("every prompt needs an image (no image tokens found in a row)")
    check_composition(mitigations)
    decoder = decoder_of(lvlm)
    context = DecodeContext(lvlm, input_ids, mask, lvlm.attention_groups(inputs))
    run = Run(lvlm=lvlm, decoder=decoder, context=context, input_ids=input_ids, attention_mask=mask,
              inputs={**inputs, "attention_mask": mask}, use_cache=use_cache)  # branches build on the mask
    capture = AttentionCapture(decoder, context) if capture_attention else None
    strategy = next((m for m in mitigations if getattr(m, "decode", None) is not None), None)
    if strategy is not None:  # a decoding strategy (OPERA) runs its own search
        strategy.check_composition([m for m in mitigations if m is not strategy], run, use_cache, capture_attention)
        if sampling:
            raise VsinkError(f"{strategy.name} is a decoding strategy of its own; sampling (temperature, top_p) "
                             f"is refused with it")
    runners = {m.name: BranchRunner(run, m, mitigations) for m in mitigations if m.branches(run)}
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(evaluating(lvlm.model))
        stack.enter_context(decoder.bound(context))
        for m in mitigations:
            with owned_by(m.name):
                stack.enter_context(m.installed(run))
        if capture is not None:
            with owned_by(OBSERVERS):
                stack.enter_context(capture)
        for runner in runners.values():
            stack.enter_context(Hooks(runner.install))
        if not use_cache and strategy is None:  # a generated placeholder is text, as with the cache
            stack.enter_context(placeholders_as_text(lvlm.model, int(input_ids.shape[1])))
        if runners and stack_main and strategy is None:
            stack.enter_context(stacked_main(run, list(runners.values())))
        processors = [*runners.values(), *(p for m in mitigations for p in m.logits_processors(run))]
        bar = stack.enter_context(tqdm(total=max_new_tokens, desc="generate", unit="token", disable=not progress))
        if progress:
            processors.append(TokenProgress(bar, input_ids.shape[1]))
        if strategy is not None:
            out = strategy.decode(run, inputs, max_new_tokens, processors)
        else:
            decoding = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
            out = lvlm.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, **decoding,
                                      use_cache=use_cache, logits_processor=processors or None)
    new = out[:, input_ids.shape[1]:]
    tok = getattr(lvlm.processor, "tokenizer", None) if lvlm.processor is not None else None
    texts = tok.batch_decode(new, skip_special_tokens=True) if tok is not None else [""] * len(new)
    attention = torch.stack(capture.steps[-new.shape[1]:]) if capture is not None else None
    notes = []
    for m in mitigations:
        if not m.edited():
            notes.append(f"{m.name} edited nothing: {m.nothing_edited_hint()}")
            warnings.warn(notes[-1], MitigationWarning, stacklevel=2)
    if len(mitigations) == 1:
        recorded: Optional[dict[str, Any]] = mitigations[0].settings_dict()
    else:
        recorded = {m.name: m.settings_dict() for m in mitigations} or None
    reports = []
    for m in mitigations:
        report = m.report()
        if m.name in runners:
            report["branches"] = runners[m.name].record()
            report["branch_passes"] = runners[m.name].passes
            report["stacked_with_main"] = runners[m.name].stacked_with_main()
        reports.append(report)
    return GenerationResult(out, new, texts, label, recorded, attention, context.spans, context.kept, protocol,
                            reports, notes)


#: the mitigations generate() knows by name
MITIGATIONS = ("none", *sorted(REGISTRY))
