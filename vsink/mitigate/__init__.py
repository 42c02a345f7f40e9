"""Mitigations as composable edits on the shared sites: test-time registers (vision tower), VAR,
PAI (attention plus guidance), FastV, VAF (ClearSight); contrastive decoding on branches: VCD, M3ID,
DAMRO, DoLa. See :mod:`vsink.mitigate.base` for how to add one.

Mitigations outside vsink register through the ``vsink.mitigations`` entry point (a module whose
import runs :func:`register`), e.g. in their ``pyproject.toml``::

    [project.entry-points."vsink.mitigations"]
    mine = "my_package.vsink_mitigation"

They are imported when the registry is first consulted (:func:`mitigation_registry`,
:func:`mitigation_names`), so ``--mitigation mine`` and ``generate(..., mitigation="mine+var")``
know them; one that fails to import is one error naming it (:mod:`vsink.backbones.plugins`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from ..backbones.plugins import load_entry_points
from ..errors import VsinkError
from .base import REGISTRY, Mitigation, Run, register
from .settings import PROTOCOLS, check_protocol, declared_settings
from .damro import DAMRO, DAMROSettings
from .dola import DoLa, DoLaSettings
from .fastv import FastV, FastVSettings
from .m3id import M3ID, M3IDSettings
from .opera import OPERA, OPERASettings
from .pai import PAI, PAISettings
from .ttr import TTR, TTRSettings
from .vaf import VAF, VAFSettings
from .vcd import VCD, VCDSettings
from .var import VAR, VARSettings, redistribute, redistribution

ENTRY_POINT_GROUP = "vsink.mitigations"

__all__ = ["DAMRO", "DAMROSettings", "DoLa", "DoLaSettings", "M3ID", "M3IDSettings", "OPERA", "OPERASettings", "VCD", "VCDSettings", "ENTRY_POINT_GROUP", "FastV", "FastVSettings", "Mitigation", "PAI", "PAISettings", "PROTOCOLS", "REGISTRY",
           "Run", "TTR", "TTRSettings", "VAF", "VAFSettings", "VAR", "VARSettings", "calibrated_settings", "check_composition", "check_protocol", "declared_settings", "make_mitigations",
           "mitigation_names", "mitigation_registry",
           "redistribute", "redistribution", "register"]


def mitigation_names(spec: Union[str, Sequence[str]]) -> list[str]:
    """``"none"`` → ``[]``; ``"ttr+var"`` → ``["ttr", "var"]`` (known, distinct names)."""
    names = [n.strip() for n in spec.split("+")] if isinstance(spec, str) else [str(n) for n in spec]
    names = [n for n in names if n and n != "none"]
    mitigation_registry()
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise VsinkError(f"unknown mitigation {unknown[0]!r}; choose none or a '+'-joined combination of "
                         f"{', '.join(sorted(REGISTRY))}")
    if len(set(names)) != len(names):
        raise VsinkError(f"mitigation {spec!r} names one mitigation twice")
    return names


def make_mitigations(spec: Union[str, Sequence[str]], settings: Optional[dict[str, Any]] = None,
                     protocol: str = "paper") -> list[Mitigation]:
    """The mitigations of ``spec`` with their settings.

    ``settings``: for one mitigation its settings (``{"p": 0.5}``), or per mitigation
    (``{"var": {"p": 0.5}, "ttr": {"neurons": "n.json"}}``), or dotted keys (``{"var.p": 0.5}``).
    ``protocol``: ``"paper"`` or ``"official"`` (the released scripts' behaviour and defaults)."""
    check_protocol(protocol)
    names = mitigation_names(spec)
    per = _per_mitigation(names, dict(settings or {}))
    mitigations = [REGISTRY[name].from_values(per.get(name), protocol) for name in names]
    check_composition(mitigations)
    return mitigations


def check_composition(mitigations: Sequence[Mitigation]) -> None:
    """Refuse, in one line, a combination where two mitigations each set the next-token rule."""
    rules = [m.name for m in mitigations if m.decodes()]
    if len(rules) > 1:
        raise VsinkError(f"{' and '.join(rules)} each set the next-token rule (branches combined or guidance); "
                         "compose one of them with attention edits (var, pai without gamma, fastv, vaf, ttr)")


def calibrated_settings(names: Sequence[str], settings: dict[str, Any], calibration: Any) -> dict[str, Any]:
    """``settings`` (flat: keys of the one mitigation, or ``NAME.KEY``) with what each mitigation
    of ``names`` takes from a sink calibration (:meth:`Mitigation.calibration_settings`) added
    where not given."""
    out = dict(settings)
    for name in names:
        for key, value in REGISTRY[name].calibration_settings(calibration).items():
            out.setdefault(key if list(names) == [name] else f"{name}.{key}", value)
    return out


def _per_mitigation(names: list[str], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {}
    chosen = "+".join(names) or "none"
    for key, value in settings.items():
        owner = key.split(".", 1)[0] if "." in key else key if isinstance(value, dict) else None
        if owner in REGISTRY and owner not in names:
            raise VsinkError(f"setting {key!r}: {owner} is not among the chosen mitigations ({chosen}); add it "
                             f"(e.g. {'+'.join([*names, owner])}) or leave the setting out")
        if key in names and isinstance(value, dict):
            per.setdefault(key, {}).update(value)
        elif "." in key and key.split(".", 1)[0] in names:
            name, field = key.split(".", 1)
            per.setdefault(name, {})[field] = value
        elif len(names) == 1:
            per.setdefault(names[0], {})[key] = value
        elif not names:
            raise VsinkError(f"mitigation 'none' takes no settings, got {sorted(settings)}")
        else:
            raise VsinkError(f"setting {key!r}: with several mitigations ({chosen}) say whose it is, e.g. "
                             f"{names[0]}.{key}")
    return per


_loaded = False


def mitigation_registry() -> dict[str, type[Mitigation]]:
    """Every registered mitigation by name: vsink's own and the ``vsink.mitigations`` entry
    points' (imported on the first call; a broken one raises
    :class:`~vsink.backbones.plugins.PluginError` naming it)."""
    global _loaded
    if not _loaded:
        load_entry_points(ENTRY_POINT_GROUP)
        _loaded = True
    return dict(REGISTRY)
