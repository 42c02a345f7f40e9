"""Runs the branches a mitigation declares (:mod:`vsink.mitigate.branch`) beside one generation call.

Every branch that runs a pass keeps its own KV cache and the model's own position ids (computed
for the branch's inputs by :meth:`~vsink.backbones.hf_lvlm.LVLM.prompt_positions`, M-RoPE
included). Branches whose inputs have the same shapes and the same edits run stacked along the
batch in one forward. Which of the composed mitigations' edits apply in a branch is explicit
(``Branch.edits``; by default every composed mitigation that can run in a branch for ``image`` and
``tokens`` branches, none for ``text``) and recorded in the owner's report; a vision-tower edit
(``ttr``) is part of how every image is encoded and applies wherever an image is. A ``tokens``
branch of a DeepStack model (Qwen3-VL) may carry its image tokens' DeepStack features
(:data:`DEEPSTACK`): the family adds them after its first decoder layers, as the model does for
its own image, in each pass over the prompt (the first step; every step without the cache).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ..backbones.sites import muted, owned_by
from ..errors import VsinkError
from ..mitigate.branch import Branch
from .context import DecodeContext

if TYPE_CHECKING:
    from ..mitigate.base import Mitigation, Run

#: a ``tokens`` branch's DeepStack features of its image tokens [B, levels, n, D] (Qwen3-VL), injected by
#: :meth:`~vsink.backbones.hf_lvlm.LVLM.inject_deepstack` in every pass that holds the prompt
DEEPSTACK = "deepstack_embeds"
#: the owner name of vsink's own observers (attention capture, readouts): never run in a branch
OBSERVERS = "vsink-observers"


@dataclass
class _Group:
    """Branches run stacked in one forward: their prompts concatenated along the batch."""

    names: list[str]
    edits: tuple[str, ...]
    inputs: dict[str, Any]  # the stacked prompt
    ids: torch.Tensor  # [G·B, N] prompt ids (positions, context)
    mask: torch.Tensor
    positions: torch.Tensor  # the prompt's position ids
    offset: torch.Tensor  # [G·B, 1] position offset of later tokens
    context: Optional[DecodeContext] = None
    cache: Any = None
    generated_positions: Optional[torch.Tensor] = None  # without the cache: the generated tokens' positions


def _stack_key(inputs: dict[str, Any], edits: tuple[str, ...]) -> tuple:
    shapes = tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in inputs.items()
                          if isinstance(v, torch.Tensor)))
    return shapes, edits


def _cat(values: list[Any]) -> Any:
    return torch.cat(values, dim=0) if isinstance(values[0], torch.Tensor) else values[0]


class BranchRunner:
    """Runs one mitigation's branches beside ``generate`` (a ``LogitsProcessor``): at each step it
    runs every branch's pass (stacked where shapes and edits agree), reads the readouts of the main
    pass, and returns the owner's combination of the logits.

    Args:
        run: the generation call.
        owner: the mitigation whose branches these are.
        composed: every mitigation of the call (for the edits of each branch).
    """

    def __init__(self, run: "Run", owner: "Mitigation", composed: Sequence["Mitigation"]):
        self.run, self.owner = run, owner
        self.branches: list[Branch] = list(owner.branches(run))
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names):
            raise VsinkError(f"{owner.name}: two branches are named alike ({names})")
        self.others = [m.name for m in composed if m is not owner]
        self.edits = {b.name: self._edits(b, composed) for b in self.branches}
        self.step = 0
        self.groups: list[_Group] = []
        self.readouts: dict[int, torch.Tensor] = {}
        self.in_branch = False
        self.passes = 0

    def _edits(self, branch: Branch, composed: Sequence["Mitigation"]) -> tuple[str, ...]:
        if branch.kind == "readout":  # read from the main pass: every edit of the layers before it applies
            return tuple(self.others)
        if branch.edits is None:
            default = [] if branch.kind == "text" else [m.name for m in composed
                                                        if m is not self.owner and m.in_branches]
            return tuple(default)
        unknown = [e for e in branch.edits if e not in self.others]
        if unknown:
            raise VsinkError(f"{self.owner.name}: branch {branch.name!r} names edits {unknown} of no composed "
                             f"mitigation ({', '.join(self.others) or 'none composed'})")
        refused = [m.name for m in composed if m.name in branch.edits and not m.in_branches]
        if refused:
            raise VsinkError(f"{self.owner.name}: {refused[0]}'s edits cannot run in a branch "
                             f"({branch.name!r}): its state belongs to the main pass")
        return tuple(branch.edits)

    def install(self, handles: list) -> None:
        """The readout observers on the main pass (append their handles to ``handles``)."""
        decoder = self.run.decoder
        with owned_by(OBSERVERS):
            n = decoder.num_layers
            for layer in sorted({b.layer for b in self.branches if b.kind == "readout"}):
                if not 0 <= layer <= n:
                    raise VsinkError(f"{self.owner.name}: readout layer {layer} outside 0..{n} (the inputs of the "
                                     f"decoder's {n} layers, and {n}: the last layer's output)")
                site, block = ("block_input", layer) if layer < n else ("block_output", n - 1)
                handles.append(decoder.hook(site, block, self._reader(layer)))

    def _reader(self, layer: int):
        def fn(h: torch.Tensor) -> None:
            self.readouts[layer] = h[:, -1]

        return fn

    def record(self) -> list[dict[str, Any]]:
        """Per branch: name, kind, the edits that applied in it, and (readouts) the layer."""
        out = []
        for b in self.branches:
            row: dict[str, Any] = {"name": b.name, "kind": b.kind, "edits": list(self.edits[b.name])}
            if b.kind == "readout":
                row["layer"] = b.layer
            out.append(row)
        return out

    # --- the processor ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits: dict[str, torch.Tensor] = {}
        if self.step == 0:
            self._build_groups()
        for group in self.groups:
            out = self._forward(group, input_ids)
            per = out.shape[0] // len(group.names)
            for i, name in enumerate(group.names):
                logits[name] = out[i * per:(i + 1) * per].float()
        for b in self.branches:
            if b.kind == "readout":
                logits[b.name] = self.run.lvlm.read_out(self.readouts[b.layer], norm=b.norm).float()
        result = self.owner.combine(self.step, scores, logits)
        self.step += 1
        return result

    def _build_groups(self) -> None:
        lvlm = self.run.lvlm
        pending: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
        with muted([OBSERVERS]):
            for b in self.branches:
                if b.kind == "readout":
                    continue
                inputs = b.prompt(self.run)
                pending.setdefault(_stack_key(inputs, self.edits[b.name]), []).append((b.name, inputs))
        for (_, edits), members in pending.items():
            stacked = {k: _cat([m[1][k] for m in members]) for k in members[0][1]}
            ids, mask = stacked["input_ids"], stacked["attention_mask"]
            positions, offset = lvlm.prompt_positions(stacked)
            context = DecodeContext(lvlm, ids, mask, lvlm.attention_groups(stacked)) if edits else None
            self.groups.append(_Group([m[0] for m in members], edits, stacked, ids, mask, positions, offset, context))

    def _forward(self, group: _Group, input_ids: torch.Tensor) -> torch.Tensor:
        """The last-row logits of one group's pass at this step."""
        from transformers import DynamicCache

        lvlm, n = self.run.lvlm, len(group.names)
        prefill = group.inputs["input_ids"]  # the ids of a pass that holds the prompt (DeepStack's positions)
        if self.step == 0:
            kwargs = {k: v for k, v in group.inputs.items()
                      if not (k == "input_ids" and "inputs_embeds" in group.inputs) and k != DEEPSTACK}
            kwargs["position_ids"] = group.positions
            if self.run.use_cache:
                group.cache = DynamicCache()
        else:
            new = input_ids[:, -1:].repeat(n, 1)
            group.mask = torch.cat([group.mask, torch.ones_like(new)], dim=1)
            group.ids = torch.cat([group.ids, new], dim=1)
            step_pos = lvlm.step_positions(group.mask, group.offset)
            if self.run.use_cache:  # a decode step: DeepStack enters with the prompt only
                kwargs, prefill = {"input_ids": new, "attention_mask": group.mask, "position_ids": step_pos}, None
            else:  # the whole sequence again, as the main branch does without the cache
                kwargs, prefill = self._full_inputs(group, step_pos), group.ids
        if group.cache is not None:
            kwargs[lvlm.cache_argument] = group.cache
        with ExitStack() as stack:
            stack.enter_context(self._edits_of(group))
            if prefill is not None and DEEPSTACK in group.inputs:
                stack.enter_context(lvlm.inject_deepstack(prefill == lvlm.image_token_id, group.inputs[DEEPSTACK]))
            out = lvlm.model(**kwargs, use_cache=self.run.use_cache)
        self.passes += 1
        return out.logits[:, -1]

    def _full_inputs(self, group: _Group, step_pos: torch.Tensor) -> dict[str, Any]:
        """Prompt and generated tokens in one uncached pass (positions: the prompt's, then one per token)."""
        steps = group.ids.shape[1] - group.inputs["input_ids"].shape[1]
        generated = group.ids[:, -steps:]
        prev = group.generated_positions
        group.generated_positions = step_pos if prev is None else torch.cat([prev, step_pos], dim=-1)
        kwargs = {k: v for k, v in group.inputs.items()
                  if k not in ("input_ids", "attention_mask", "inputs_embeds", DEEPSTACK)}
        if "inputs_embeds" in group.inputs:
            embed = self.run.lvlm.model.get_input_embeddings()
            kwargs["inputs_embeds"] = torch.cat([group.inputs["inputs_embeds"],
                                                 embed(generated).to(group.inputs["inputs_embeds"].dtype)], dim=1)
        else:
            kwargs["input_ids"] = group.ids
        # one type per token where the family says what a generated token is (LVLM.generated_token_type);
        # mm_token_type_ids: 0 (text), as transformers' generate extends them
        kind = self.run.lvlm.generated_token_type
        if kind is not None and kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types, types.new_full((types.shape[0], steps), kind)], dim=1)
        if kwargs.get("mm_token_type_ids") is not None:
            types = kwargs["mm_token_type_ids"]
            kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], steps)], dim=1)
        kwargs["attention_mask"] = group.mask
        kwargs["position_ids"] = torch.cat([group.positions, group.generated_positions], dim=-1)
        return kwargs

    def _edits_of(self, group: _Group):
        """The context a group's pass runs in: no edit (the model itself), or the chosen edits with
        the group's own generation context (masks, image positions, per-context state)."""
        stack = ExitStack()
        decoder, run = self.run.decoder, self.run
        stack.enter_context(muted([OBSERVERS]))
        if not group.edits:
            stack.enter_context(decoder.suspend())
            return stack
        stack.enter_context(muted([m for m in self.others if m not in group.edits]))
        main, bound = run.context, decoder.context

        def swap_back() -> None:
            run.context, decoder.context = main, bound

        run.context = decoder.context = group.context
        stack.callback(swap_back)
        return stack
