"""The reader boundary for untrusted files: JSON, JSON Lines (:func:`vsink.io.read_jsonl`), YAML,
XML and line lists (split lists, image lists).

Whatever is wrong with a file — bytes that are not UTF-8, syntax errors, a top-level value of the
wrong type, a field of the wrong type, pathological nesting (a 100,000-deep JSON array exhausts
the parser's recursion; free-form mappings are limited to :data:`vsink.options.MAX_DEPTH`
levels) — becomes one :class:`ReadError` line naming the file, the line where known, and the
field. Field checks use the kinds of :mod:`vsink.options`.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from .errors import VsinkError
from .options import MAX_VALUES, Invalid, Kind, measure, shown

PathLike = Union[str, os.PathLike]

_MISSING = object()


class ReadError(VsinkError):
    """A file that cannot be used as what it should be; the message names the file, line and field."""


def read_text(path: PathLike) -> str:
    """The file as UTF-8 text; unreadable files and bytes that are not UTF-8 are named errors."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ReadError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ReadError(f"{p}:{line}: not UTF-8 text ({e.reason}: byte 0x{data[e.start]:02x})") from None


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, where: str, line: Optional[int] = None) -> Any:
    """``json.loads`` with named errors: ``where:line: not valid JSON (why)``, excessive nesting;
    ``NaN`` and ``Infinity`` (which Python's parser accepts, JSON does not) are refused."""
    try:
        value = json.loads(text, parse_constant=_not_a_number)
    except RecursionError:
        raise ReadError(f"{where}{f':{line}' if line else ''}: nested too deeply to be read") from None
    except ValueError as e:
        at = line if line is not None else getattr(e, "lineno", None)
        raise ReadError(f"{where}{f':{at}' if at else ''}: not valid JSON ({getattr(e, 'msg', e)})") from None
    return value


def read_json(path: PathLike, what: str = "file", top: type = dict) -> Any:
    """A JSON file whose top-level value is a ``top`` (an object by default)."""
    p = Path(path)
    value = parse_json(read_text(p), str(p))
    if not isinstance(value, top):
        raise ReadError(f"{p}: a {what} must be a JSON {_json_type(top)}, got {_json_name(value)}")
    return value


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` (no tags, no code) with named errors and a nesting limit. Aliases
    (``*name``) may repeat what an anchor names, but the document may not expand to more values
    than its text has characters (or :data:`vsink.options.MAX_VALUES`, whichever is more), nor
    contain itself: nine levels of nine aliases would otherwise make every later walk over the
    value (checks, ``repr``, JSON) run for hours."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ReadError(f"{where}: nested too deeply to be read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ReadError(f"{where}{at}: not valid YAML ({problem})") from None
    bound = max(MAX_VALUES, len(text))
    if measure(value, depth=10 ** 9, nodes=bound)[1] > bound:
        raise ReadError(f"{where}: its aliases (*name) expand it to more than {bound:,} values, or make it "
                        "contain itself; write the values out") from None
    return value


def read_yaml(path: PathLike) -> Any:
    p = Path(path)
    return parse_yaml(read_text(p), str(p))


def read_lines(path: PathLike) -> list[tuple[int, str]]:
    """(line number, stripped text) of every non-blank line of a text list; lines end at ``\\n``."""
    return [(n, line.strip()) for n, line in enumerate(read_text(path).split("\n"), 1) if line.strip()]


def read_xml(path: PathLike) -> ET.Element:
    """The root element of an XML file (expat: no external entities, entity expansion bounded)."""
    p = Path(path)
    try:
        return ET.parse(p).getroot()
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else None
        raise ReadError(f"{p}{f':{line}' if line else ''}: not valid XML ({e})") from None
    except RecursionError:
        raise ReadError(f"{p}: nested too deeply") from None
    except OSError as e:
        raise ReadError(f"{p}: cannot read ({e.strerror or e})") from None


def checked_field(record: Mapping[str, Any], key: str, kind: Kind, where: str, default: Any = _MISSING) -> Any:
    """``record[key]`` checked against ``kind``: missing (without a ``default``) or of the wrong
    kind is ``where: field 'key' must be ...`` ; ``default`` is returned for a missing key."""
    if key not in record:
        if default is not _MISSING:
            return default
        raise ReadError(f"{where}: missing field '{key}'")
    value = record[key]
    try:
        return kind.parse(value)
    except Invalid as e:
        why = f" ({e})" if str(e) else ""
        raise ReadError(f"{where}: field '{key}' must be {kind.describe()}, got {shown(value)}{why}") from None


def records(data: Mapping[str, Any], key: str, where: str, required: bool = True) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(where: key[i], item)`` for each item of the list ``data[key]``, every item an object."""
    if key not in data:
        if required:
            raise ReadError(f"{where}: missing field '{key}'")
        return
    items = data[key]
    if not isinstance(items, list):
        raise ReadError(f"{where}: field '{key}' must be a list, got {_json_name(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ReadError(f"{where}: {key}[{i}] must be an object, got {shown(item)}")
        yield f"{where}: {key}[{i}]", item


def _json_type(t: type) -> str:
    return {dict: "object", list: "array"}.get(t, t.__name__)


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {shown(value)}"
    if isinstance(value, str):
        return f"the string {shown(value)}"
    return {dict: "an object", list: "an array"}.get(type(value), type(value).__name__)
