"""Whether a path can be written: the checks behind ``--out`` and every output option (a name the
file system accepts, no dangling or looping symbolic link on the way, a writable folder). Plain
path logic with no vsink imports, so the options module can use it without a cycle."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


def _writable(directory: Path) -> bool:
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(directory, mode, effective_ids=True)
    return os.access(directory, mode)


def _exists(path: Path, follow: bool = True) -> bool:
    """Whether ``path`` exists; False for any name the file system refuses (too long, ...)."""
    try:
        os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):
        return False
    return True


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def _name_problem(path: Path) -> Optional[str]:
    """Why the file system would refuse ``path``'s name (a component or the whole path too long)."""
    base = _nearest_existing(path)
    try:
        name_max = os.pathconf(base if base.is_dir() else base.parent, "PC_NAME_MAX")
        path_max = os.pathconf(base if base.is_dir() else base.parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in Path(os.path.abspath(path)).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            return f"the name {part[:24]}... is too long for the file system ({size} bytes, at most {name_max})"
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= path_max:
        return f"the path is too long for the file system ({size} bytes, at most {path_max - 1})"
    return None


def _link_problem(path: Path) -> Optional[str]:
    """Why a symbolic link in ``path`` (itself or a folder above it) cannot be written through."""
    p = Path(os.path.abspath(path))
    for candidate in (p, *p.parents):
        if _exists(candidate, follow=False) and candidate.is_symlink() and not _exists(candidate):
            name = "it" if candidate == p else candidate
            try:
                os.stat(candidate)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return f"{name} is a symbolic link in a loop (to {os.readlink(candidate)}, which leads back)"
            return f"{name} is a symbolic link to {os.readlink(candidate)}, which does not exist"
    return None


def output_dir_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be an output directory, or None when it can (it is a writable directory,
    or the nearest existing folder above it is one, so it can be created; no dangling symbolic link
    on the way; a name the file system accepts)."""
    p = Path(path)
    problem = _name_problem(p) or _link_problem(p)
    if problem:
        return problem
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
    problem = _name_problem(p) or _link_problem(p)
    if problem:
        return problem
    if p.is_dir():
        return "it is a directory; give a file path"
    problem = output_dir_problem(p.parent if str(p.parent) else Path("."))
    return f"its folder cannot be written: {problem}" if problem else None
