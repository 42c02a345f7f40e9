"""``KEY=VALUE`` command-line assignments (recipe overrides, mitigation settings), values read
as YAML scalars or lists with ``yaml.safe_load``."""

from __future__ import annotations

from typing import Any

from .errors import VsinkError


def parse_assignment(item: str, option: str) -> tuple[str, Any]:
    """``"train.steps=100"`` → ``("train.steps", 100)``; ``option`` names the flag in errors."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise VsinkError(f"{option} {item!r}: use KEY=VALUE")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        raise VsinkError(f"{option} {item!r}: value is not valid YAML") from None
