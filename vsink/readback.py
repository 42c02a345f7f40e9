"""The reader boundary for folders vsink wrote and reads back (``vsink view``, resumes, saved
models, neuron files): such a folder may have been edited, mixed or made by someone else, so it is
untrusted input like any file (:mod:`vsink.readers`).

* :func:`member`: a file named in a JSON, kept inside its folder — no absolute path, no ``..``,
  no symbolic link that leads out;
* :func:`open_npz`: an ``.npz`` archive read with ``allow_pickle=False``, whose arrays are
  checked as they are taken (:meth:`Npz.array`): a missing key, an object array, an array of the
  wrong number of dimensions or of a shape that disagrees with its JSON is one
  :class:`~vsink.readers.ReadError` line naming the file and the key.
"""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .layout import TokenLayout
from .readers import ReadError

PathLike = Union[str, os.PathLike]


def member(directory: PathLike, name: Any, where: str, suffix: str = "") -> Path:
    """``directory / (name + suffix)``, refused unless ``name`` is a relative path that stays inside
    ``directory`` once symbolic links are followed."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ReadError(f"{where}: {name!r} is not a file name")
    d = Path(directory)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ReadError(f"{where}: {name!r} points outside {d}; only names inside the folder are read")
    path = d / (name + suffix)
    try:
        inside = path.resolve().is_relative_to(d.resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ReadError(f"{where}: {name!r} cannot be resolved ({e})") from None
    if not inside:
        raise ReadError(f"{where}: {name!r} is a link that points outside {d}; only files inside the folder are read")
    return path


def layout_of(value: Any, where: str) -> TokenLayout:
    """A :class:`~vsink.layout.TokenLayout` from its JSON form, any fault a named error."""
    try:
        layout = TokenLayout.from_dict(value)
        if len(layout.grid) != 2 or min(layout.grid) < 1 or min(layout.num_cls, layout.num_registers) < 0:
            raise ValueError(f"grid {list(layout.grid)}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ReadError(f"{where}: not a token layout ({type(e).__name__}: {e})") from None
    return layout


class Npz:
    """An open ``.npz`` archive whose arrays are checked as they are taken."""

    def __init__(self, data: Any, path: Path):
        self._data, self.path = data, path
        self.files: list[str] = list(data.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def array(self, key: str, shape: Optional[Sequence[Optional[int]]] = None, *, kind: str = "number",
              what: str = "") -> np.ndarray:
        """``data[key]``; ``shape``: the dimensions it must have (None: any size along that axis);
        ``kind``: ``"number"`` (bool, integer or float), ``"text"`` (a string) or ``"image"``
        (``uint8 [H, W, 3]``). ``what`` says what the expected shape follows from."""
        where = f"{self.path}: array '{key}'"
        if key not in self.files:
            raise ReadError(f"{self.path}: missing array '{key}'")
        try:
            value = self._data[key]
        except ValueError as e:  # object arrays: numpy refuses them without pickle
            raise ReadError(f"{where} cannot be read without running code ({e}); vsink never unpickles") from None
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ReadError(f"{where} is damaged ({type(e).__name__}: {e})") from None
        if kind == "text":
            if value.dtype.kind != "U" or value.ndim != 0:
                raise ReadError(f"{where} must be a text, got {value.dtype} of shape {list(value.shape)}")
            return value
        if kind == "image":
            shape, ok = (None, None, 3), value.dtype == np.uint8
        else:
            ok = value.dtype.kind in "biuf"
        if not ok:
            raise ReadError(f"{where} must hold {'uint8 RGB pixels' if kind == 'image' else 'numbers'}, "
                            f"got {value.dtype}")
        if shape is not None and (value.ndim != len(shape) or any(s is not None and s != v
                                                                  for s, v in zip(shape, value.shape))):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            because = f" ({what})" if what else ""
            raise ReadError(f"{where} has shape {list(value.shape)}; expected {want}{because}")
        return value


@contextmanager
def open_npz(path: PathLike) -> Iterator[Npz]:
    """An ``.npz`` archive (``allow_pickle=False``) as an :class:`Npz`; a file that is not one, or
    is damaged, is a named error."""
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise ReadError(f"{p} is missing") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ReadError(f"{p}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ReadError(f"{p}: not an .npz archive (a single array)")
    try:
        yield Npz(data, p)
    finally:
        data.close()
