"""Output preflight: before any work starts, where a run writes is checked — the target is a
directory (or can be created), it is writable, a file target is not a directory, and names
derived from input file names stay inside the output directory without colliding. Nothing is
created by the checks. When a run starts writing, temporary files of vsink's own naming pattern
(:func:`vsink.io.atomic_path`) that a killed run left behind are removed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .errors import VsinkError

PathLike = Union[str, os.PathLike]

#: ``atomic_path``'s temporary files: ``.<target name>.<8 random characters>.tmp``
TEMP_FILE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
#: temporary directories vsink makes inside its outputs (checkpoints, ``save_pretrained``)
TEMP_DIR = re.compile(r"\.(step_\d+\.|save-)[a-z0-9_]{8}")


class OutputError(VsinkError):
    """An output location that cannot be written; the message names it and why."""


def _writable(directory: Path) -> bool:
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(directory, mode, effective_ids=True)
    return os.access(directory, mode)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be an output directory, or None when it can (it is a writable directory,
    or the nearest existing folder above it is one, so it can be created)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return "it exists and is not a directory"
    base = _nearest_existing(p)
    if not base.is_dir():
        return f"{base} is not a directory"
    if not _writable(base):
        return "the directory is not writable" if base == Path(os.path.abspath(p)) else f"{base} is not writable"
    return None


def output_file_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be written as a file, or None when it can."""
    p = Path(path)
    if p.is_dir():
        return "it is a directory; give a file path"
    problem = output_dir_problem(p.parent if str(p.parent) else Path("."))
    return f"its folder cannot be written: {problem}" if problem else None


def check_output_dir(path: PathLike, name: str = "--out") -> Path:
    """``path`` as a :class:`Path`, or an :class:`OutputError` naming it and the problem."""
    problem = output_dir_problem(path)
    if problem:
        raise OutputError(f"{name} {path}: {problem}")
    return Path(path)


def check_output_file(path: PathLike, name: str = "--out") -> Path:
    problem = output_file_problem(path)
    if problem:
        raise OutputError(f"{name} {path}: {problem}")
    return Path(path)


def safe_component(name: str, fallback: str = "image") -> str:
    """A file-name component derived from an input name: no path separators, no NUL, no leading
    dots (so never ``.``, ``..`` or hidden), not empty (``fallback``)."""
    cleaned = re.sub(r"[/\\\x00]", "_", name).strip().lstrip(".").strip()
    return cleaned or fallback


def derived_names(names: Sequence[str], out_dir: PathLike, entries: Sequence[str] = ("{}",),
                  reserved: Iterable[str] = ()) -> list[str]:
    """One distinct component per input ``names`` entry (see :func:`safe_component`), numbered
    ``-2``, ``-3``, ... on a clash, such that the directory entries each one makes
    (``entries``: patterns such as ``"{}"`` and ``"{}.npz"``) never coincide — case-insensitively,
    for case-insensitive file systems — with each other's or with ``reserved`` names, and
    resolve to direct children of ``out_dir``."""
    out = Path(os.path.abspath(out_dir))
    taken = {r.casefold() for r in reserved}
    result = []
    for name in names:
        base = safe_component(name)
        stem, n = base, 1
        while any(e.format(stem).casefold() in taken for e in entries):
            n += 1
            stem = f"{base}-{n}"
        for e in entries:
            target = out / e.format(stem)
            if target.parent != out or target.name != e.format(stem):
                raise OutputError(f"{name!r}: the derived name {e.format(stem)!r} would leave {out}")
            taken.add(e.format(stem).casefold())
        result.append(stem)
    return result


def clean_stale_temps(directory: PathLike, targets: Optional[Iterable[str]] = None) -> list[Path]:
    """Remove what killed runs left in ``directory``: temporary files of :func:`vsink.io.atomic_path`
    (only those for ``targets``, when given) and, without ``targets``, vsink's temporary
    directories (unfinished checkpoints, ``save_pretrained`` staging). Returns what was removed;
    a directory that does not exist is left alone. A second vsink process writing into the same
    directory at the same time is not supported."""
    d = Path(directory)
    if not d.is_dir():
        return []
    wanted = set(targets) if targets is not None else None
    removed = []
    for entry in d.iterdir():
        match = TEMP_FILE.fullmatch(entry.name)
        if match and entry.is_file() and not entry.is_symlink() and (wanted is None or match["target"] in wanted):
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif wanted is None and TEMP_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
