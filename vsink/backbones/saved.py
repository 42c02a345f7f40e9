"""``vsink.json``, the metadata of a model saved by :meth:`Backbone.save`: its declared fields
(:data:`SAVED_FIELDS`) and the reader that checks them, since a saved model's folder is as
untrusted as any input file. The spec must be one of the library forms, so a file pointing at
its own folder (or another saved folder) cannot make loading recurse."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

from ..errors import ModelSpecError
from ..options import Choice, Float, Int, ListOf, Mapping_, Option, Text, declare
from ..readers import ReadError, checked_field, read_json

SAVED_CONFIG = "vsink.json"
FAMILIES = ("timm", "open_clip", "hf")
#: the spec a saved model is rebuilt from, per family (``hf`` models are rebuilt from the folder itself)
SPEC_FORMS = {"timm": r"demo|timm:[^\s/\\].*", "open_clip": r"open_clip:[^\s/\\].*", "hf": r".*"}

SAVED_FIELDS: dict[str, Option] = declare(
    Option("format", Choice(("vsink-backbone",)), None, "marks the folder as a saved vsink model", required=True),
    Option("version", Int(1, 1), 1, "format version"),
    Option("family", Choice(FAMILIES), None, "the adapter family", required=True),
    Option("spec", Text(r"demo|(timm|open_clip|hf):\S.*", "demo, timm:NAME, open_clip:NAME[/TAG] or hf:..."), None,
           "the library spec the model is rebuilt from (timm: demo or timm:NAME; open_clip: open_clip:NAME; hf: "
           "informational)", required=True),
    Option("img_size", ListOf(Int(1, 16384), length=2), None, "default input size [H, W]", nullable=True),
    Option("model_kwargs", Mapping_(), {}, "keyword arguments of the library constructor"),
    Option("mean", ListOf(Float(), length=3), None, "per-channel normalisation mean", nullable=True,
           default_text="the adapter's"),
    Option("std", ListOf(Float(0, min_open=True), length=3), None, "per-channel normalisation std", nullable=True,
           default_text="the adapter's"),
    Option("hooked_registers", Int(0, 1024), 0, "registers attached by hooks (families without native registers)"),
    Option("architecture", Text(), None, "timm: the pretrained config's architecture", nullable=True),
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
    if not re.fullmatch(SPEC_FORMS[cfg["family"]], cfg["spec"]):
        raise ModelSpecError(f"{path}: field 'spec' {cfg['spec']!r} is not a {cfg['family']} spec (expected "
                             f"{'demo or timm:NAME' if cfg['family'] == 'timm' else 'open_clip:NAME[/TAG]'})")
    return cfg
