"""File output: atomic writes (a temporary file beside the target, then rename), JSONL logs
appended as work completes, and reading them back."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .options import Kind


#: file names are at most 255 bytes on common file systems; a temporary name adds 14 ('.', '.', 8, '.tmp')
NAME_MAX = 255
TEMP_NAME_ROOM = NAME_MAX - 14


def fit_bytes(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes in the file system's encoding, never inside a
    character."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success (the
    temporary name carries the target's name, cut to fit the file system's limit on a name).

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{fit_bytes(path.name, TEMP_NAME_ROOM)}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Union[str, os.PathLike], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Union[str, os.PathLike], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_jsonl(path: Union[str, os.PathLike], required: Sequence[str] = (), *,
               fields: Optional[Mapping[str, Kind]] = None, unique: Union[None, str, tuple[str, ...]] = None,
               cut_last_line: bool = False) -> list[dict[str, Any]]:
    """Lines of a JSONL file, each a JSON object; every problem is a one-line error naming the
    file and line (and the field): bytes that are not UTF-8, a line that is not JSON or not an
    object, a missing ``required`` field, a field of the wrong kind (``fields``: key → kind, checked
    where present), a repeated value of the ``unique`` field, or of the ``unique`` fields together
    on the lines that have them all (the error names both lines; an integer and its decimal text,
    ``1`` and ``"1"``, are one value).

    ``cut_last_line``: for vsink's own logs, appended as work completes — a last line cut by an
    interrupted append (no final newline, not JSON) is skipped; elsewhere (files to be scored)
    it is an error. Lines end at ``\\n`` only: U+2028, U+0085 and the other characters
    ``str.splitlines`` breaks on are valid inside a JSON string written with ``ensure_ascii=False``."""
    from .readers import ReadError, checked_field, parse_json, read_text

    p = Path(path)
    lines = read_text(p).split("\n")
    rows = []
    seen: dict[Any, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, str(p), n)
        except ReadError as e:
            if n == len(lines):
                if cut_last_line:
                    continue
                raise ReadError(f"{e}; the last line has no newline: cut by an interrupted write?") from None
            raise
        if not isinstance(row, dict):
            raise ReadError(f"{p}:{n}: not a JSON object (got {type(row).__name__ if row is not None else 'null'})")
        missing = [k for k in required if k not in row]
        if missing:
            raise ReadError(f"{p}:{n}: missing field(s) {', '.join(missing)}")
        for key, kind in (fields or {}).items():
            if key in row:
                checked_field(row, key, kind, f"{p}:{n}")
        keys = (unique,) if isinstance(unique, str) else unique or ()
        if keys and all(k in row for k in keys):
            values = [row[k] for k in keys]
            ident = json.dumps([str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values],
                               sort_keys=True)
            if ident in seen:
                named = " ".join(f"{k} {json.dumps(v)}" for k, v in zip(keys, values))
                raise ReadError(f"{p}:{n}: {named} repeats line {seen[ident]}; each must appear once")
            seen[ident] = n
        rows.append(row)
    return rows


def write_jsonl(path: Union[str, os.PathLike], rows: Iterable[dict[str, Any]]) -> Path:
    """Write a whole JSONL file atomically."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _end_last_line(path: Union[str, os.PathLike]) -> None:
    """Make a JSONL file end with a newline before more lines are appended: a last line without one
    is completed when it is valid JSON, and dropped when it is not (a write cut by a kill, which
    :func:`read_jsonl` skips), so the next line cannot be glued onto it."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        start = size
        while start > 0:
            step = min(1 << 16, start)
            f.seek(start - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                start = start - step + newline + 1
                break
            start -= step
        if start == size:
            return
        f.seek(start)
        try:
            json.loads(f.read().decode("utf-8"))
        except ValueError:
            f.truncate(start)
        else:
            f.write(b"\n")


def append_jsonl(path: Union[str, os.PathLike], rows: Iterable[dict[str, Any]], *, fsync: bool = False) -> None:
    """Append lines to a JSONL file (the incremental logs: an interrupted run keeps what was
    appended; at worst the last line is cut, which :func:`read_jsonl` skips and the next append
    removes)."""
    _end_last_line(path)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())


class NpzWriter:
    """Writes an ``.npz`` one array at a time (nothing is held back), atomically: the file appears
    under its name only when the ``with`` block ends without an exception. ``np.load`` reads it."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._zip: Optional[zipfile.ZipFile] = None
        self.names: list[str] = []

    def __enter__(self) -> "NpzWriter":
        tmp = self._ctx.__enter__()
        self._zip = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        return self

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.names:
            raise ValueError(f"{self.path}: array {name!r} written twice")
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
        self.names.append(name)

    def __exit__(self, *exc: Any) -> None:
        self._zip.close()
        self._ctx.__exit__(*exc)
