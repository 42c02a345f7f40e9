"""``KEY=VALUE`` command-line assignments (recipe overrides, mitigation settings), values read
as YAML scalars or lists with ``yaml.safe_load`` (through :mod:`vsink.readers`). The values are
checked against their declarations where they are used."""

from __future__ import annotations

from typing import Any

from .errors import VsinkError


def parse_assignment(item: str, option: str) -> tuple[str, Any]:
    """``"train.steps=100"`` → ``("train.steps", 100)``; ``option`` names the flag in errors."""
    from .readers import ReadError, parse_yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise VsinkError(f"{option} {item!r}: use KEY=VALUE")
    try:
        return key, parse_yaml(text, f"{option} {key}=...")
    except ReadError as e:
        raise VsinkError(f"{option} {item[:60]!r}: value is not valid YAML ({e})") from None
