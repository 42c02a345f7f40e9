"""Model variants compared by an evaluation: the baseline and its mitigations.

``--variant NAME=VALUE`` forms (``VALUE`` may carry an explicit prefix; otherwise it is inferred):

* ``baseline`` or ``NAME=baseline`` — the model as loaded;
* ``NAME=ttr:neurons.json`` (or any ``.json``) — test-time registers from a ``vsink registers find`` spec;
* ``NAME=weights:ft.safetensors`` (or ``.safetensors``/``.pt``/``.pth``/``.bin``) — a checkpoint
  loaded into a copy of the same architecture;
* ``NAME=model:SPEC`` (or anything else) — another model spec.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..backbones.base import Backbone
from ..errors import VsinkError

KINDS = ("baseline", "ttr", "weights", "model")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "baseline"
    value: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """Parse ``baseline`` or ``NAME=VALUE`` (see the module docstring)."""
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
        return cls(name, kind, value)

    def describe(self) -> str:
        return self.name if self.kind == "baseline" else f"{self.name} ({self.kind}: {self.value})"

    @contextmanager
    def open(self, base: Backbone, **load_kwargs: Any) -> Iterator[Backbone]:
        """The backbone of this variant, derived from ``base`` (edits removed on exit)."""
        if self.kind == "baseline":
            yield base
        elif self.kind == "ttr":
            from ..registers import NeuronSpec, TestTimeRegisters

            with TestTimeRegisters(NeuronSpec.load(self.value)).applied(base) as backbone:
                yield backbone
        elif self.kind == "weights":
            if base.edits:
                raise VsinkError(f"variant {self.name!r}: the base model carries edits ({', '.join(base.edits)})")
            backbone = copy.deepcopy(base)
            backbone.load_weights(self.value)
            yield backbone
        else:
            from ..backbones.registry import load

            yield load(self.value, **load_kwargs)


def parse_variants(texts: Optional[list[str]]) -> list[Variant]:
    """Variants in order, ``baseline`` first unless given; names must be unique."""
    variants = [Variant.parse(t) for t in texts or []]
    if not any(v.kind == "baseline" for v in variants):
        variants.insert(0, Variant("baseline"))
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VsinkError(f"variant names must be unique; repeated: {', '.join(dupes)}")
    return variants
