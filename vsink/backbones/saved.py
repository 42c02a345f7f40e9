"""``vsink.json``, the metadata of a model saved by :meth:`Backbone.save`: its declared fields
(:data:`SAVED_FIELDS`) and the reader that checks them, since a saved model's folder is as
untrusted as any input file. The spec must be one of the library forms, so a file pointing at
its own folder (or another saved folder) cannot make loading recurse."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

from ..attention_variants import VARIANTS
from ..errors import ModelSpecError
from ..options import Choice, Float, Int, ListOf, Mapping_, Option, Text, declare
from ..readers import ReadError, checked_field, read_json

SAVED_CONFIG = "vsink.json"

SAVED_FIELDS: dict[str, Option] = declare(
    Option("format", Choice(("vsink-backbone",)), None, "marks the folder as a saved vsink model", required=True),
    Option("version", Int(1, 1), 1, "format version"),
    Option("family", Text(r"[\w.-]+", "a family name"), None, "the adapter family (a registered one: timm, "
           "timm-eva, open_clip, hf, or a plugin's)", required=True),
    Option("spec", Text(r"\S+", "a spec without spaces"), None, "the library spec the model is rebuilt from (the "
           "family decides which: timm: demo or timm:NAME; timm-eva: timm:NAME; open_clip: open_clip:NAME; hf: "
           "informational)", required=True),
    Option("img_size", ListOf(Int(1, 16384), length=2), None, "default input size [H, W]", nullable=True),
    Option("model_kwargs", Mapping_(), {}, "keyword arguments of the library constructor"),
    Option("mean", ListOf(Float(), length=3), None, "per-channel normalisation mean", nullable=True,
           default_text="the adapter's"),
    Option("std", ListOf(Float(0, min_open=True), length=3), None, "per-channel normalisation std", nullable=True,
           default_text="the adapter's"),
    Option("hooked_registers", Int(0, 1024), 0, "registers attached by hooks (families without native registers)"),
    Option("architecture", Text(), None, "timm: the pretrained config's architecture", nullable=True),
    Option("attention", Choice(VARIANTS), "softmax", "the blocks' attention variant (vsink.attention_variants; "
           "timm ViTs), swapped in before the weights are loaded"),
)


def read_saved_config(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """The declared fields of ``directory/vsink.json``, checked (defaults filled in; other keys
    ignored); a :class:`ModelSpecError` names the file and the field."""
    path = Path(directory) / SAVED_CONFIG
    cfg: dict[str, Any] = {}
    try:
        data = read_json(path, "vsink model config")
        for key, option in SAVED_FIELDS.items():
            if option.nullable and data.get(key) is None:
                cfg[key] = option.default
            elif option.required:
                cfg[key] = checked_field(data, key, option.kind, str(path))
            else:
                cfg[key] = checked_field(data, key, option.kind, str(path), option.default)
    except ReadError as e:
        raise ModelSpecError(f"{e} (vsink.json of a saved model)") from None
    from .families import families

    known = families()
    if cfg["family"] not in known:
        raise ModelSpecError(f"{path}: field 'family' {cfg['family']!r} is not a registered model family "
                             f"({', '.join(known)})")
    cls = known[cfg["family"]]
    if not re.fullmatch(cls.saved_spec, cfg["spec"]):
        raise ModelSpecError(f"{path}: field 'spec' must be {cls.saved_spec_help} (the specs the {cfg['family']} "
                             f"family rebuilds a saved model from), got {cfg['spec']!r}")
    return cfg
