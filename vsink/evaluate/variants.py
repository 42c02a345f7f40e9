"""Model variants compared by an evaluation: the baseline and its mitigations.

``--variant NAME=VALUE`` forms (``VALUE`` may carry an explicit prefix; otherwise it is inferred):

* ``baseline`` or ``NAME=baseline`` — the model as loaded;
* ``NAME=ttr:neurons.json`` (or any ``.json``) — test-time registers from a ``vsink registers find`` spec
  (with the :class:`~vsink.registers.TestTimeRegisters` options given to :func:`parse_variants`);
* ``NAME=weights:ft.safetensors`` (or ``.safetensors``/``.pt``/``.pth``/``.bin``) — a checkpoint
  loaded into a copy of the same architecture;
* ``NAME=model:SPEC`` (or anything else) — another model spec.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

from ..backbones.base import Backbone
from ..backbones.saved import SAVED_CONFIG
from ..backbones.weights import StateMismatchError
from ..errors import VsinkError

if TYPE_CHECKING:
    from ..registers import TestTimeRegisters

KINDS = ("baseline", "ttr", "weights", "model")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "baseline"
    value: Optional[str] = None
    ttr_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str, ttr_options: Optional[Mapping[str, Any]] = None) -> "Variant":
        """Parse ``baseline`` or ``NAME=VALUE`` (see the module docstring); ``ttr_options``
        (keyword options of :class:`~vsink.registers.TestTimeRegisters`) go to a ``ttr`` variant."""
        name, sep, value = text.partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            if name == "baseline":
                return cls("baseline")
            raise VsinkError(f"variant {text!r}: use baseline or NAME=VALUE (e.g. ttr=neurons.json)")
        if not name or not value:
            raise VsinkError(f"variant {text!r}: both NAME and VALUE are needed")
        if value == "baseline":
            return cls(name)
        kind, colon, rest = value.partition(":")
        if colon and kind in KINDS[1:]:
            value = rest
        else:
            suffix = Path(value).suffix.lower()
            kind = "ttr" if suffix == ".json" else "weights" if suffix in WEIGHT_SUFFIXES else "model"
        if kind in ("ttr", "weights") and not Path(value).is_file():
            raise VsinkError(f"variant {name!r}: {value}: file not found")
        if kind != "ttr":
            return cls(name, kind, value)
        variant = cls(name, kind, value, tuple(sorted((ttr_options or {}).items())))
        variant.test_time_registers()  # a bad spec file or option fails now, not after the baseline ran
        return variant

    def test_time_registers(self) -> TestTimeRegisters:
        """The :class:`~vsink.registers.TestTimeRegisters` of a ``ttr`` variant."""
        from ..registers import NeuronSpec, TestTimeRegisters

        return TestTimeRegisters(NeuronSpec.load(self.value), **dict(self.ttr_options))

    def describe(self) -> str:
        if self.kind == "baseline":
            return self.name
        options = "".join(f", {k}={v}" for k, v in self.ttr_options)
        return f"{self.name} ({self.kind}: {self.value}{options})"

    def check(self, base: Backbone) -> None:
        """What can be checked before any variant runs: a ``weights`` file is read and matched
        against ``base`` (keys and shapes), a ``model`` spec's form and name are checked
        (:func:`vsink.backbones.registry.spec_problem`). A bad variant then fails before the
        baseline has run, not after."""
        if self.kind == "weights":
            from ..backbones.weights import check_state_matches, read_state_dict

            try:
                check_state_matches(base.model, base._state_for_model(read_state_dict(self.value)),
                                    f"weights file {self.value}")
            except StateMismatchError as e:
                raise self._mismatch(e) from None
        elif self.kind == "model":
            from ..backbones.registry import spec_problem

            problem = spec_problem(self.value)
            if problem:
                raise VsinkError(f"variant {self.name!r}: cannot load model {self.value!r}: {problem}")

    def _mismatch(self, error: StateMismatchError) -> VsinkError:
        """A weights file that does not fit; beside a saved model's ``vsink.json``, say to pass the folder."""
        folder = Path(self.value).parent
        if not (folder / SAVED_CONFIG).is_file():
            return error
        return VsinkError(f"{error}; {folder} holds a saved model ({SAVED_CONFIG}): pass the directory instead "
                          f"(--variant {self.name}={folder})")

    def before_batch(self, split: str, ids: Sequence[str]) -> None:
        """Told by the dense evaluation, before each forward pass, which images it runs (their
        ``split`` and sample ids, in batch order). Nothing here; a variant whose edit depends on the
        image (:class:`vsink.ablate_dense.DenseAblationVariant`) keeps them."""
        return None

    @contextmanager
    def open(self, base: Backbone, **load_kwargs: Any) -> Iterator[Backbone]:
        """The backbone of this variant, derived from ``base`` (edits removed on exit)."""
        if self.kind == "baseline":
            yield base
        elif self.kind == "ttr":
            with self.test_time_registers().applied(base):
                yield base
        elif self.kind == "weights":
            if base.edits:
                raise VsinkError(f"variant {self.name!r}: the base model carries edits ({', '.join(base.edits)})")
            backbone = copy.deepcopy(base)
            try:
                backbone.load_weights(self.value)
            except StateMismatchError as e:
                raise self._mismatch(e) from None
            yield backbone
        else:
            from ..backbones.registry import load

            yield load(self.value, **load_kwargs)


def parse_variants(texts: Optional[list[str]], ttr_options: Optional[Mapping[str, Any]] = None) -> list[Variant]:
    """Variants in order, ``baseline`` first unless given; names must be unique. ``ttr_options``
    apply to every test-time-register variant."""
    variants = [Variant.parse(t, ttr_options) for t in texts or []]
    if not any(v.kind == "baseline" for v in variants):
        variants.insert(0, Variant("baseline"))
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VsinkError(f"variant names must be unique; repeated: {', '.join(dupes)}")
    return variants
