"""Counts in messages: ``count(1, "image")`` is "1 image", ``count(2, "image")`` "2 images"."""

from __future__ import annotations

from typing import Optional


def count(n: int, noun: str, plural: Optional[str] = None) -> str:
    """``n`` and ``noun``, the noun in the plural (``plural``, or ``noun + "s"``) unless ``n`` is 1."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
