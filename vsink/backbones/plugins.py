"""One discovery policy for every registry (vision families, LVLM families, mitigations).

vsink's own modules of a registry are imported first, then every entry point of its group (a
module whose import runs the registry's decorator). A plugin that fails to import is one
:class:`PluginError` naming the group, the entry point and the cause, raised when the registry is
first consulted — never a traceback from deep inside the plugin, and never a plugin silently left
out (a run would then use another adapter or mitigation than the one installed for it).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, MutableMapping, MutableSet, Sequence

from ..errors import VsinkError


class PluginError(VsinkError):
    """An installed vsink plugin (an entry point) failed to load."""


def load_entry_points(group: str, builtin: Sequence[str] = ()) -> None:
    """Import ``builtin`` (vsink's own modules of the registry), then every entry point of
    ``group`` that is not one of them; a broken entry point raises :class:`PluginError`."""
    for module in builtin:
        importlib.import_module(module)
    for entry in entry_points(group=group):
        if entry.value.split(":")[0] in builtin:
            continue
        try:
            entry.load()
        except Exception as e:  # any failure inside a plugin: one line naming it
            raise PluginError(f"the {group} entry point {entry.name!r} ({entry.value}) failed to load: "
                              f"{type(e).__name__}: {' '.join(str(e).split())}") from e


def enrol(cls: Any, registry: MutableMapping[str, Any], plugins: MutableSet[str], *, title: str,
          plural: str, reserved: Sequence[str] = ()) -> None:
    """Register the family class ``cls`` under its ``family`` name in ``registry`` (one name per
    class; ``plugins`` gains the names of classes defined outside vsink). ``title`` and ``plural``
    word the errors: e.g. "an LVLM family" / "LVLM families"."""
    name = getattr(cls, "family", None)
    if not isinstance(name, str) or not name or name in reserved or ":" in name:
        raise VsinkError(f"{cls.__name__}: {title} needs a name without ':' in its 'family' attribute")
    if name in registry and registry[name] is not cls:
        raise VsinkError(f"two {plural} are named {name!r}: {registry[name].__name__} and {cls.__name__}")
    registry[name] = cls
    if not cls.__module__.startswith("vsink."):
        plugins.add(name)
