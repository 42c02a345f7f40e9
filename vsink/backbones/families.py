"""Model families: each is one adapter file that registers itself; nothing else names a family.

A family is a :class:`~vsink.backbones.base.Backbone` subclass decorated with :func:`family`. It
says which built models it wraps (``can_wrap``), how a spec ``PREFIX:NAME`` loads (``from_spec``),
which spec a saved model of it is rebuilt from (``saved_spec``, a regular expression) and how
(``from_saved``), and the lines ``vsink models`` prints (``spec_forms``)::

    @family
    class MyBackbone(Backbone):
        family = "mine"                           # the spec prefix: "mine:NAME"
        spec_forms = "mine:NAME    my ViTs"

        @classmethod
        def can_wrap(cls, model): return isinstance(model, MyViT)

        @classmethod
        def from_spec(cls, name, **options): return cls(build_my_vit(name), f"mine:{name}")

Families outside vsink register through the ``vsink.backbones`` entry point (a module whose import
runs the decorator), e.g. in their ``pyproject.toml``::

    [project.entry-points."vsink.backbones"]
    mine = "my_package.vsink_family"

:func:`named_spec` registers a builder for one exact spec (``demo``, ``demo-llava``);
:func:`spec_pattern` one for every spec matching a regular expression (``SPEC#vision_tower``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .plugins import enrol, load_entry_points

if TYPE_CHECKING:
    from .base import Backbone

ENTRY_POINT_GROUP = "vsink.backbones"
#: vsink's own families and the files adding model types to them (the hf family's DINOv3, SigLIP2,
#: AIMv2, InternViT and Idefics3-tower adapters), imported before the entry points, so a source checkout needs no install
BUILTIN = ("vsink.backbones.timm", "vsink.backbones.timm_eva", "vsink.backbones.open_clip", "vsink.backbones.hf_vision",
           "vsink.backbones.hf_dinov3", "vsink.backbones.hf_siglip2", "vsink.backbones.hf_aimv2",
           "vsink.backbones.hf_internvl_vision", "vsink.backbones.hf_idefics3_vision", "vsink.data.demos",
           "vsink.backbones.lvlm_tower")

_FAMILIES: dict[str, type["Backbone"]] = {}
_PLUGINS: set[str] = set()
_NAMED: dict[str, tuple[Callable[..., "Backbone"], str]] = {}
_PATTERNS: dict[str, tuple[Callable[..., "Backbone"], str]] = {}
_loaded = False


def family(cls: type["Backbone"]) -> type["Backbone"]:
    """Class decorator: register a backbone family under ``cls.family``."""
    enrol(cls, _FAMILIES, _PLUGINS, title="a family", plural="backbone families", reserved=("?",))
    return cls


def named_spec(spec: str, help: str) -> Callable[[Callable[..., "Backbone"]], Callable[..., "Backbone"]]:
    """Decorator: ``builder(**options)`` loads the model of the exact spec ``spec``."""

    def register(builder: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
        _NAMED[spec] = (builder, help)
        return builder

    return register


def spec_pattern(pattern: str, form: str) -> Callable[[Callable[..., "Backbone"]], Callable[..., "Backbone"]]:
    """Decorator: ``builder(match, **options)`` loads every spec that fully matches the regular
    expression ``pattern`` (``match``: the :class:`re.Match`); ``form`` is its ``vsink models`` line.
    Patterns are tried before family prefixes."""

    def register(builder: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
        _PATTERNS[pattern] = (builder, form)
        return builder

    return register


def spec_patterns() -> dict[str, tuple[Callable[..., "Backbone"], str]]:
    """Every registered spec pattern: (builder, its ``vsink models`` line)."""
    _load()
    return dict(_PATTERNS)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    load_entry_points(ENTRY_POINT_GROUP, BUILTIN)
    _loaded = True


def families() -> dict[str, type["Backbone"]]:
    """Every registered family by name: the plugins' (entry points, or any family defined outside
    vsink) first, then vsink's own, so a plugin is asked before a built-in family that would also
    accept its model."""
    _load()
    return {name: cls for plugin in (True, False) for name, cls in _FAMILIES.items() if (name in _PLUGINS) == plugin}


def named_specs() -> dict[str, tuple[Callable[..., "Backbone"], str]]:
    """Every registered exact spec: (builder, help)."""
    _load()
    return dict(_NAMED)


def family_of_model(model: Any) -> Optional[type["Backbone"]]:
    """The first family that can wrap an already-built ``model`` (plugins before vsink's own)."""
    return next((cls for cls in families().values() if cls.can_wrap(model)), None)


def family_of_directory(path: Path) -> Optional[type["Backbone"]]:
    """The family that loads a local model directory (a Hugging Face one: ``config.json``)."""
    return next((cls for cls in families().values() if cls.claims_directory(path)), None)


def spec_forms() -> str:
    """The text ``vsink models`` prints: every named spec and family form."""
    lines = ["supported model specs:"]
    lines += [f"  {spec:<34}{help}" for spec, (_, help) in named_specs().items()]
    lines += ["  DIR with vsink.json               a model saved by Backbone.save / vsink finetune (registers "
              "included)"]
    lines += [f"  {form}" for _, form in spec_patterns().values()]
    for cls in families().values():
        lines += [f"  {line}" for line in cls.spec_forms.splitlines()]
    lines += ["options: weights=PATH (.safetensors, or a state dict read with torch.load(weights_only=True)),",
              "         img_size, device, dtype"]
    return "\n".join(lines)
