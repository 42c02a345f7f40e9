"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
