"""lmms-eval's model_args parsing (``lmms_eval/utils.py`` at 75571cf; test stand-in)."""

from __future__ import annotations

from typing import Any


def handle_arg_string(arg: str) -> Any:
    """``true``/``false`` (any case) as booleans, digits-only as int, then float, else the text."""
    if arg.lower() in ("true", "false"):
        return arg.lower() == "true"
    if arg.isnumeric():
        return int(arg)
    try:
        return float(arg)
    except ValueError:
        return arg


def _split(text: str) -> list[str]:
    """``text`` split on commas that are outside quotes and outside ``{}``/``[]``."""
    parts, current, depth, quote = [], "", 0, None
    for i, ch in enumerate(text):
        if ch in ("'", '"') and (i == 0 or text[i - 1] != "\\"):
            quote = ch if quote is None else (None if ch == quote else quote)
        elif quote is None and ch in "{[":
            depth += 1
        elif quote is None and ch in "}]":
            depth -= 1
        elif quote is None and depth == 0 and ch == ",":
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def simple_parse_args_string(args_string: str) -> dict[str, Any]:
    """``"a=1,b=x"`` as ``{"a": 1, "b": "x"}`` (each value through :func:`handle_arg_string`)."""
    args_string = args_string.strip()
    if not args_string:
        return {}
    return {k: handle_arg_string(v) for k, v in (arg.split("=", 1) for arg in _split(args_string))}
