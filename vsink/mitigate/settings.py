"""How mitigation settings are declared, and the two protocols mitigations run under.

Every setting is declared with its type and range (:func:`setting`, the
:class:`~vsink.options.Option` in the field's metadata): constructing a settings object checks
each value, so ``--set p=1.5``, ``--set k=2.5`` and ``VARSettings(p=float("nan"))`` are refused
alike with the key, the value and what is allowed. Limits that depend on the model (a layer
beyond the decoder's depth) are checked when the mitigation is installed. The same declarations
make the mitigation tables of docs/options.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar

from ..errors import VsinkError
from ..options import Kind, Option

#: ``paper``: the methods as the papers describe them (vsink's default); ``official``: as the
#: authors' released scripts run them (see docs/lvlm.md, "Protocols")
PROTOCOLS = ("paper", "official")


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a one-line :class:`VsinkError`."""
    if protocol not in PROTOCOLS:
        raise VsinkError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


def setting(default: Any, kind: Kind, help: str, nullable: bool = False) -> Any:
    """A dataclass field declared as an :class:`Option` (type, range, meaning)."""
    return field(default=default, metadata={"option": (kind, help, nullable)})


def declared_settings(cls: type) -> dict[str, Option]:
    """The declared settings of a settings class, by name."""
    return {f.name: Option(f.name, f.metadata["option"][0], f.default, f.metadata["option"][1],
                           nullable=f.metadata["option"][2])
            for f in dataclasses.fields(cls) if "option" in f.metadata}


class CheckedSettings:
    """Checks every declared setting on construction (``NAME`` names the mitigation in errors)."""

    NAME: ClassVar[str] = ""
    protocol: str

    def __post_init__(self) -> None:
        if hasattr(self, "protocol"):
            check_protocol(self.protocol)
        for key, option in declared_settings(type(self)).items():
            setattr(self, key, option.check(getattr(self, key), name=f"{self.NAME} setting '{key}'"))
