"""Runs the branches a mitigation declares (:mod:`vsink.mitigate.branch`) beside one generation call.

Every branch that runs a pass keeps its own KV cache and the model's own position ids (computed
for the branch's inputs by :meth:`~vsink.backbones.hf_lvlm.LVLM.prompt_positions`, M-RoPE
included). Branches whose inputs have the same shapes and the same edits run stacked along the
batch in one forward; one whose inputs have the main prompt's shapes and whose edits are the main
pass's (every composed mitigation's) runs stacked with the main pass itself, in place of the
forward ``generate`` would run (:func:`stacked_main`). Which of the composed mitigations' edits
apply in a branch is explicit (``Branch.edits``; by default every composed mitigation that can
run in a branch for ``image`` and ``tokens`` branches, none for ``text``) and recorded in the
owner's report; a vision-tower edit (``ttr``) is part of how every image is encoded and applies
wherever an image is. A ``tokens`` branch of a DeepStack model (Qwen3-VL) may carry its image
tokens' DeepStack features (:data:`DEEPSTACK`): the family adds them after its first decoder
layers, as the model does for its own image, in each pass over the prompt (the first step; every
step without the cache).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from ..backbones.hooks import forward_replaced
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
#: set while a branch group's own forward runs: the model's forward, never the stacked one
_BRANCH_PASS: ContextVar[bool] = ContextVar("vsink_branch_pass", default=False)


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
    main: bool = False  # the main pass's rows come first (the pass generate's forward is replaced by)

    @property
    def parts(self) -> int:
        """Prompts stacked along the batch (the main prompt included)."""
        return len(self.names) + self.main


def _stack_key(inputs: dict[str, Any], edits: Sequence[str]) -> tuple:
    """What decides whether two passes run stacked: their inputs' keys, shapes beyond the batch
    and dtypes, and the set of edits that apply in them."""
    shapes = tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in inputs.items()
                          if isinstance(v, torch.Tensor)))
    return shapes, tuple(sorted(edits))


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
        self.groups: Optional[list[_Group]] = None  # built at the first forward (every edit installed by then)
        #: the group the main pass runs in (:func:`stacked_main`), and its branches' logits of this step
        self.main_group: Optional[_Group] = None
        self.stashed: dict[str, torch.Tensor] = {}
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

    def stacked_with_main(self) -> list[str]:
        """The branches that ran in the main pass's forward."""
        return list(self.main_group.names) if self.main_group is not None else []

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
        logits: dict[str, torch.Tensor] = dict(self.stashed)
        self.stashed = {}
        self.build(with_main=False)
        for group in self.groups:
            if not group.main:
                logits.update(self._split(group, self._forward(group, input_ids))[1])
        for b in self.branches:
            if b.kind == "readout":
                logits[b.name] = self.run.lvlm.read_out(self.readouts[b.layer], norm=b.norm).float()
        result = self.owner.combine(self.step, scores, logits)
        self.step += 1
        return result

    def _split(self, group: _Group, out: torch.Tensor) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """A group's last-row logits as the main pass's (``None`` outside the main group) and each branch's."""
        per = out.shape[0] // group.parts
        rows = [out[i * per:(i + 1) * per] for i in range(group.parts)]
        main = rows.pop(0) if group.main else None
        return main, {name: r.float() for name, r in zip(group.names, rows)}

    def build(self, with_main: bool) -> bool:
        """Group the branches (once; see :func:`_stack_key`), the main prompt among them when
        ``with_main``: it runs with every composed mitigation's edits, so it groups with the branches
        whose edits are all of them (with none composed, only where no site function is installed
        on the decoder: a branch without edits runs the model itself). True when the main pass has
        a group of its own branches."""
        if self.groups is not None:
            return self.main_group is not None
        run, lvlm = self.run, self.run.lvlm
        pending: dict[tuple, list[tuple[Optional[str], dict[str, Any]]]] = {}
        if with_main and (self.others or not run.decoder.owners()):
            pending[_stack_key(run.inputs, self.others)] = [(None, dict(run.inputs))]
        with muted([OBSERVERS]):
            for b in self.branches:
                if b.kind == "readout":
                    continue
                inputs = b.prompt(run)
                pending.setdefault(_stack_key(inputs, self.edits[b.name]), []).append((b.name, inputs))
        self.groups = []
        for (_, edits), members in pending.items():
            main = members[0][0] is None
            if main and len(members) == 1:
                continue  # no branch shares the main pass's shapes and edits: generate's own forward runs it
            stacked = {k: _cat([m[1][k] for m in members]) for k in members[0][1]}
            ids, mask = stacked["input_ids"], stacked["attention_mask"]
            positions, offset = lvlm.prompt_positions(stacked)
            context = DecodeContext(lvlm, ids, mask, lvlm.attention_groups(stacked)) if edits or main else None
            group = _Group([m[0] for m in members if m[0] is not None], edits, stacked, ids, mask, positions,
                           offset, context, main=main)
            self.groups.append(group)
            if main:
                self.main_group = group
        return self.main_group is not None

    def main_forward(self, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The main pass's last-row logits [B, V] of this step, from one forward of the main
        group (its branches' logits are kept for this step's :meth:`__call__`)."""
        if self.step and input_ids is None:
            raise VsinkError(f"{self.owner.name}: the main pass stacked with branches needs the new token ids")
        main, self.stashed = self._split(self.main_group, self._forward(self.main_group, input_ids))
        return main

    def _forward(self, group: _Group, input_ids: torch.Tensor) -> torch.Tensor:
        """The last-row logits of one group's pass at this step."""
        from transformers import DynamicCache

        lvlm, n = self.run.lvlm, group.parts
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
        if "logits_to_keep" in lvlm._forward_parameters():  # the last row's logits only, as generate asks
            kwargs["logits_to_keep"] = 1
        token = _BRANCH_PASS.set(True)
        try:
            with ExitStack() as stack:
                stack.enter_context(self._edits_of(group))
                if prefill is not None and DEEPSTACK in group.inputs:
                    stack.enter_context(lvlm.inject_deepstack(prefill == lvlm.image_token_id, group.inputs[DEEPSTACK]))
                out = lvlm.model(**kwargs, use_cache=self.run.use_cache)
        finally:
            _BRANCH_PASS.reset(token)
        if not group.main:
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
        if not group.edits and not group.main:
            stack.enter_context(decoder.suspend())
            return stack
        stack.enter_context(muted([m for m in self.others if m not in group.edits]))
        main, bound = run.context, decoder.context

        def swap_back() -> None:
            run.context, decoder.context = main, bound

        run.context = decoder.context = group.context
        stack.callback(swap_back)
        return stack


@contextmanager
def stacked_main(run: "Run", runners: Sequence[BranchRunner]) -> Iterator[None]:
    """While ``generate`` runs: its forward of the main pass is replaced by one forward of the main
    prompt stacked with the branches that share its shapes and edits (the first runner whose
    branches do; :meth:`BranchRunner.build`), or left as it is. Decided at the first forward, when
    every edit is installed: never while an observer (attention capture, a readout) is installed
    on the decoder, since it would see the branches' rows too. The main pass's logits are then those
    rows of the stacked forward, with the group's cache and position ids
    (:meth:`~vsink.backbones.hf_lvlm.LVLM.prompt_positions`, which equal the model's own); the
    group's cache is what the forward returns to ``generate`` as the main pass's (``generate``
    and the models' ``prepare_inputs_for_generation`` read its length only)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = run.lvlm.model
    original = model.forward
    chosen: list[Optional[BranchRunner]] = []

    @functools.wraps(original)  # generate and LVLM read the forward's signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not chosen:
            chosen.append(None)  # a forward while deciding (a branch's prompt encoding) is the model's
            if OBSERVERS not in run.decoder.owners():
                chosen[0] = next((r for r in runners if r.build(with_main=True)), None)
        runner = chosen[0]
        if runner is None or _BRANCH_PASS.get():
            return original(*args, **kwargs)
        out = {"logits": runner.main_forward(kwargs.get("input_ids"))[:, None]}
        if runner.main_group.cache is not None:  # generate reads the cache's length (Qwen2-VL's prefill test)
            out[run.lvlm.cache_argument] = runner.main_group.cache
        return CausalLMOutputWithPast(**out)

    with forward_replaced(model, forward):
        yield
