"""What a mitigation is: an edit on the shared sites of an LVLM's decoder (and its vision tower),
installed for one generation call and removed after it, that reports what it did per layer.

A mitigation is one class in one file of this package, registered with :func:`register`::

    @register
    class MyMitigation(Mitigation):
        name = "mine"
        settings_class = MySettings          # a dataclass of setting(...) fields (mitigate/settings.py)

        def _install(self, run, handles):    # add site handles (decoder.hook(...)) to ``handles``
            ...
            self.count(layer, rows_edited=n)  # what it did, per layer

Mitigations compose: ``generate(..., mitigation="ttr+var")`` installs each in turn on the same
sites; attention edits stack in installation order (logit edits before the softmax, probability
edits after it), as on the vision side.

A mitigation that decodes from several views of the prompt (contrastive decoding) declares
branches (:class:`~vsink.mitigate.branch.Branch`, :meth:`Mitigation.branches`) and a per-step rule that
combines their logits (:meth:`Mitigation.combine`); the generation runs the branches and records
which edits applied in each (see docs/architecture.md, "Branches").
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch

from ..backbones.hooks import HookSet, Hooks
from ..errors import VsinkError
from .settings import check_protocol

if TYPE_CHECKING:
    from ..backbones.hf_decoder import DecoderModel
    from ..backbones.hf_lvlm import LVLM
    from ..lvlm.context import DecodeContext

REGISTRY: dict[str, type["Mitigation"]] = {}


def register(cls: type["Mitigation"]) -> type["Mitigation"]:
    """Class decorator: make a mitigation available by its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise VsinkError(f"a mitigation named {cls.name!r} is registered already")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Run:
    """What a mitigation sees of one generation call."""

    lvlm: "LVLM"
    decoder: "DecoderModel"
    context: "DecodeContext"
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: every model input of the prompt batch (``pixel_values``, ``image_grid_thw``, ...), so that a
    #: branch can transform the image (transformers 5 encodes images inside ``generate``)
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    use_cache: bool = True


class Mitigation(ABC):
    """A mitigation with its settings (see the module docstring)."""

    name: ClassVar[str]
    settings_class: ClassVar[type]
    #: where it edits: ``"decoder"`` or ``"vision"``
    target: ClassVar[str] = "decoder"
    #: whether its edits can run in another mitigation's branch (their state is kept per
    #: generation context, :attr:`Run.context`); False keeps them to the main branch
    in_branches: ClassVar[bool] = True

    def __init__(self, settings: Any):
        self.settings = settings
        self.stats: dict[int, dict[str, float]] = {}
        self.step_stats: dict[int, dict[str, float]] = {}

    @classmethod
    def from_values(cls, values: Optional[dict[str, Any]] = None, protocol: str = "paper") -> "Mitigation":
        """The mitigation with ``values`` (e.g. from ``--set``) over its defaults; under the
        ``official`` protocol the released scripts' defaults (``OFFICIAL_DEFAULTS``) come first."""
        check_protocol(protocol)
        values = dict(values or {})
        if "protocol" in values:
            raise VsinkError(f"{cls.name}: the protocol is not a setting; pass protocol= (CLI: --protocol)")
        names = {f.name for f in dataclasses.fields(cls.settings_class)} - {"protocol"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise VsinkError(f"{cls.name}: unknown setting(s) {unknown}; settings are {sorted(names)}")
        has_protocol = "protocol" in {f.name for f in dataclasses.fields(cls.settings_class)}
        defaults = getattr(cls.settings_class, "OFFICIAL_DEFAULTS", {}) if protocol == "official" else {}
        extra = {"protocol": protocol} if has_protocol else {}
        return cls(cls.settings_class(**{**defaults, **values, **extra}))

    @classmethod
    def refusal(cls, family: type["LVLM"]) -> Optional[str]:
        """Why this mitigation does not apply to the LVLM ``family`` (one line), or None when it
        runs there. The family's own word comes first (:attr:`LVLM.refuses`); a mitigation that
        needs something of a model overrides this."""
        return family.refuses.get(cls.name)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this mitigation cannot run with the installed libraries (one line; e.g. a
        transformers release without what it builds on), or None. Independent of the family, so the
        coverage table (:mod:`vsink.lvlm.coverage`) documents the supported libraries."""
        return None

    @classmethod
    def calibration_settings(cls, calibration: Any) -> dict[str, Any]:
        """The settings this mitigation takes from a sink calibration (``vsink lvlm calibrate``,
        ``--sinks``; a :class:`~vsink.lvlm.sinks.Calibration`): default none."""
        return {}

    def settings_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)

    # --- installation ---------------------------------------------------------------------
    def installed(self, run: Run) -> HookSet:
        """A context manager that installs the mitigation for ``run`` and removes it on exit."""
        self.stats, self.step_stats = {}, {}
        return Hooks(lambda handles: self._install(run, handles))

    @abstractmethod
    def _install(self, run: Run, handles: list) -> None:
        """Install site functions and hooks for ``run``; append every handle to ``handles``."""

    def logits_processors(self, run: Run) -> list:
        """``LogitsProcessor``\\ s the mitigation adds to ``generate`` (default none)."""
        return []

    # --- branches -----------------------------------------------------------------------------
    def branches(self, run: Run) -> list:
        """The extra :class:`~vsink.mitigate.branch.Branch`\\ es of the prompt this mitigation decodes
        from (default none). With branches, :meth:`combine` makes each step's logits."""
        return []

    def combine(self, step: int, logits: torch.Tensor, branches: dict[str, torch.Tensor]) -> torch.Tensor:
        """The next-token scores [B, V] of decoding step ``step`` (0 = the token after the prompt)
        from the main branch's ``logits`` [B, V] and each branch's last-row logits by name."""
        raise NotImplementedError(f"{self.name} declares branches but no rule to combine them")

    def decodes(self) -> bool:
        """Whether this mitigation sets the next-token rule (branches combined, guidance); two
        such mitigations in one run are refused."""
        return False

    # --- what it did ------------------------------------------------------------------------
    def count(self, layer: int, **amounts: float) -> None:
        """Add to this call's per-layer record (e.g. ``rows_edited=12, mass_moved=0.8``)."""
        row = self.stats.setdefault(int(layer), {})
        for key, value in amounts.items():
            row[key] = row.get(key, 0.0) + float(value)

    def count_step(self, step: int, **amounts: float) -> None:
        """Add to this call's per-step record (decoding step ``step``; e.g. ``tokens_changed=1``)."""
        row = self.step_stats.setdefault(int(step), {})
        for key, value in amounts.items():
            row[key] = row.get(key, 0.0) + float(value)

    def edited(self) -> bool:
        """Whether the mitigation changed anything in this call (in a layer or at a step)."""
        return any(v > 0 for table in (self.stats, self.step_stats) for row in table.values() for v in row.values())

    def report(self) -> dict[str, Any]:
        """``{"mitigation", "settings", "edited", "layers": [{"layer", ...amounts}],
        "steps": [{"step", ...amounts}]}``."""
        def clean(row: dict[str, float]) -> dict[str, Any]:
            return {k: (int(v) if float(v).is_integer() else v) for k, v in row.items()}

        return {"mitigation": self.name, "settings": self.settings_dict(), "edited": self.edited(),
                "layers": [{"layer": layer, **clean(row)} for layer, row in sorted(self.stats.items())],
                "steps": [{"step": step, **clean(row)} for step, row in sorted(self.step_stats.items())]}

    def nothing_edited_hint(self) -> str:
        """Why a mitigation may have edited nothing (for the warning)."""
        return "check its settings"


def below_depth(run: Run, name: str, key: str, value: int) -> None:
    """Refuse a layer setting at or beyond the decoder's depth (the model decides that limit)."""
    n = run.decoder.num_layers
    if value >= n:
        raise VsinkError(f"{name} setting '{key}' must be below the {n} decoder layers of "
                         f"{run.lvlm.spec}, got {value}")


def rows_from(run: Run, layer: int, start: Callable[["DecodeContext"], Optional[int | torch.Tensor]]) -> Callable[[int, int], int]:
    """A hook's ``rows`` for edits of the queries at original positions ``>= start(context)`` (an
    int, or one per batch row [B]; ``None``: no row): the rows before the first such query (in any
    batch row) run the model's own attention. Queries are found by position, so a pass without the
    KV cache, which recomputes the earlier tokens, edits the rows a cached pass edited."""

    def rows(queries: int, keys: int) -> int:
        ctx = run.context
        first = start(ctx)
        if first is None:
            return queries
        if not isinstance(first, torch.Tensor):
            first = torch.tensor([first], device=ctx.image_end.device)
        at = (ctx.query_positions(layer, first.device) >= first.view(-1, 1)).any(0)
        hits = at.nonzero()
        return int(hits[0]) if len(hits) else queries

    return rows


def rows_after_image(run: Run, layer: int) -> Callable[[int, int], int]:
    """A hook's ``rows`` for edits of queries after the image only (see :func:`rows_from`)."""
    return rows_from(run, layer, lambda ctx: ctx.image_end)


def fresh_rows(run: Run, layer: int, q_start: int, q: int, device: torch.device) -> torch.Tensor:
    """Which of the query rows ``[q_start, q_start + q)`` of a layer's call the pass computes for the
    first time [B, q] (a pass without the KV cache recomputes the earlier ones): a mitigation
    counts those only, so its report is the same with the cache and without."""
    ctx = run.context
    return ctx.query_positions(layer, device)[:, q_start:q_start + q] >= ctx.fresh
