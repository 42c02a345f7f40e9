"""LVLM families: each is one adapter file that registers itself; nothing else names one.

The same shape as the vision registry (:mod:`vsink.backbones.families`). An LVLM family is an
:class:`~vsink.backbones.hf_lvlm.LVLM` subclass decorated with :func:`lvlm_family`: it says which
model types it adapts (``model_types``), which transformers class loads them (``model_class``),
what ``vsink models`` prints (``spec_forms``) and what was verified (``verified``), and overrides
the interface methods where its model differs (image grid, view box, positions, vision tower)::

    @lvlm_family
    class MyLVLM(LVLM):
        family = "my-vlm"
        model_types = ("my_vlm",)
        model_class = "MyVlmForConditionalGeneration"

Families outside vsink register through the ``vsink.lvlms`` entry point (a module whose import runs
the decorator) and are asked before vsink's own, so a plugin can take over a model type::

    [project.entry-points."vsink.lvlms"]
    mine = "my_package.vsink_lvlm"

:func:`named_lvlm` registers a builder for one exact spec (``demo-llava``, from :mod:`vsink.data`);
:func:`known_sink_dims` records the sink dimensions of a model known by name.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import VsinkError
from .plugins import enrol, load_entry_points

#: an LVLM family: a subclass of :class:`vsink.backbones.hf_lvlm.LVLM` (named, not imported: that
#: module asks this registry)
LVLMClass = type

ENTRY_POINT_GROUP = "vsink.lvlms"
#: vsink's own LVLM families and the named demo, imported before the entry points
BUILTIN = ("vsink.backbones.lvlm_llava", "vsink.backbones.lvlm_llava_next", "vsink.backbones.lvlm_qwen2_vl",
           "vsink.backbones.lvlm_qwen2_5_vl", "vsink.backbones.lvlm_llava_onevision", "vsink.backbones.lvlm_paligemma",
           "vsink.backbones.lvlm_gemma3", "vsink.backbones.lvlm_internvl", "vsink.backbones.lvlm_qwen3_vl",
           "vsink.backbones.lvlm_idefics3", "vsink.backbones.lvlm_smolvlm", "vsink.data.demo_llava",
           "vsink.data.demo_halluc")

_FAMILIES: dict[str, LVLMClass] = {}
_PLUGINS: set[str] = set()
_NAMED: dict[str, "NamedLVLM"] = {}
_SINK_DIMS: dict[str, list[int]] = {}
_loaded = False


@dataclass(frozen=True)
class NamedLVLM:
    """A builder for one exact spec: ``builder(device=..., dtype=...)`` returns the LVLM."""

    builder: Callable[..., Any]
    help: str
    #: ``vsink scan --model SPEC`` without ``--prompt`` scans the whole LVLM with this prompt
    #: (None: the spec's vision form, if any, is scanned)
    scan_prompt: Optional[str] = None


def lvlm_family(cls: LVLMClass) -> LVLMClass:
    """Class decorator: register an LVLM family under ``cls.family`` for ``cls.model_types``."""
    types = getattr(cls, "model_types", ())
    if not isinstance(types, tuple) or not all(isinstance(t, str) and t for t in types):
        raise VsinkError(f"{cls.__name__}: 'model_types' must be a tuple of model type names")
    enrol(cls, _FAMILIES, _PLUGINS, title="an LVLM family", plural="LVLM families")
    return cls


def named_lvlm(spec: str, help: str, *, scan_prompt: Optional[str] = None) -> Callable[[Callable[..., Any]],
                                                                                        Callable[..., Any]]:
    """Decorator: ``builder(device=..., dtype=...)`` builds the LVLM of the exact spec ``spec``."""

    def register(builder: Callable[..., Any]) -> Callable[..., Any]:
        _NAMED[spec] = NamedLVLM(builder, help, scan_prompt)
        return builder

    return register


def known_sink_dims(name_fragment: str, dims: Sequence[int]) -> None:
    """Record the sink dimensions of the models whose ``name_or_path`` contains ``name_fragment``."""
    _SINK_DIMS[name_fragment.lower()] = [int(d) for d in dims]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    load_entry_points(ENTRY_POINT_GROUP, BUILTIN)
    _loaded = True


def lvlm_families() -> dict[str, LVLMClass]:
    """Every registered LVLM family by name: plugins first, then vsink's own."""
    _load()
    return {name: cls for plugin in (True, False) for name, cls in _FAMILIES.items() if (name in _PLUGINS) == plugin}


def named_lvlms() -> dict[str, NamedLVLM]:
    """Every registered exact LVLM spec: vsink's own in :data:`BUILTIN` order, then the plugins'."""
    _load()

    def rank(item: tuple[str, NamedLVLM]) -> int:
        module = item[1].builder.__module__
        return BUILTIN.index(module) if module in BUILTIN else len(BUILTIN)

    return dict(sorted(_NAMED.items(), key=rank))


def sink_dims_by_name() -> dict[str, list[int]]:
    """Known sink dimensions by name fragment (lower case)."""
    _load()
    return {k: list(v) for k, v in _SINK_DIMS.items()}


def family_of_model(model: Any) -> Optional[LVLMClass]:
    """The first LVLM family (plugins first) that adapts the built ``model``."""
    return next((cls for cls in lvlm_families().values() if cls.can_wrap(model)), None)


def family_of_type(model_type: Optional[str]) -> Optional[LVLMClass]:
    """The first LVLM family (plugins first) that loads configs of ``model_type``."""
    return next((cls for cls in lvlm_families().values() if model_type in cls.model_types), None)


def supported_types() -> list[str]:
    """Every model type some family adapts, in registry order."""
    return [t for cls in lvlm_families().values() for t in cls.model_types]


def scan_prompt(spec: str) -> Optional[str]:
    """The prompt ``vsink scan --model SPEC`` uses without ``--prompt`` (None: a vision scan)."""
    named = named_lvlms().get(spec)
    return named.scan_prompt if named is not None else None


def lvlm_spec_forms(uses: str = "vsink generate, lvlm calibrate, eval pope|chair, scan --prompt and ablate --questions") -> str:
    """The LVLM part of ``vsink models``: named specs, every family with what was verified here;
    ``uses``: the commands that take an LVLM."""
    lines = [f"LVLMs, for {uses}:"]
    for spec, named in named_lvlms().items():
        lines += _entry(spec, named.help)
    lines += ["  hf:REPO                           a Hugging Face LVLM of a family below (the hf: prefix is optional)",
              "  LOCAL_DIR                         a local directory of one (save_pretrained)",
              "families (model types; verified here on tiny offline models, not on real weights unless said):"]
    for name, cls in lvlm_families().items():
        origin = "plugin" if name in _PLUGINS else "built-in"
        example = f", e.g. {cls.example}" if cls.example else ""
        lines += _entry(name, f"{cls.title or name}: {', '.join(cls.model_types)} ({cls.model_class}, {origin}"
                              f"{example}); verified: {cls.verified}")
    lines.append("options: device (auto: cuda if available), dtype (default: the checkpoint's), trust_remote_code, device_map (accelerate; docs/scale.md)")
    return "\n".join(lines)


def _entry(name: str, text: str) -> list[str]:
    """``name`` and ``text`` wrapped in the two columns of ``vsink models``."""
    body = textwrap.wrap(text, 80, break_on_hyphens=False, break_long_words=False) or [""]
    return [f"  {name:<34}{body[0]}", *(f"  {'':<34}{line}" for line in body[1:])]
