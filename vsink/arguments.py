"""Argument checks at the Python API's boundary, shared by the public entry points.

``vsink.scan``, ``vsink.export_maps``, ``vsink.registers.find_register_neurons``, ``vsink.load``,
``vsink.wrap``, ``vsink.Probe``, ``vsink.lvlm.scan_lvlm`` and ``vsink.lvlm.generate`` check what
they are given with these helpers before any work (a backbone with
:func:`vsink.backbones.base.backbone_arg`, an LVLM with :func:`vsink.backbones.hf_lvlm.lvlm_arg`,
both built on :func:`instance_arg`; this module imports neither, so any module may use it): a wrong type
is one :class:`ArgumentError` naming the argument, what it must be and what was given (a model
spec string where a backbone is expected, one path where a list of images is expected, ``'224'``
for a size, ``0.5`` for a block index), instead of an ``AttributeError`` deep inside, or a string
iterated character by character, or a float silently truncated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from numbers import Integral
from typing import Any, Optional

from .errors import VsinkError
from .options import Int, Option, shown


class ArgumentError(VsinkError, TypeError):
    """A Python API argument of the wrong type or an empty one; the message names the argument.
    Also a :class:`TypeError`, so code catching that keeps working."""


def _given(value: Any) -> str:
    return f"the {type(value).__name__} {shown(value, 80)}"


def _integer(value: Any) -> bool:
    """An integer, NumPy's included; not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def instance_arg(value: Any, kind: type, name: str, what: str, fix: str = "") -> Any:
    """``value`` if it is a ``kind``, else an :class:`ArgumentError` "``NAME must be WHAT, got the
    TYPE VALUE[: FIX]``" (the entry points' own ``backbone_arg`` and ``lvlm_arg`` add the fix)."""
    if isinstance(value, kind):
        return value
    raise ArgumentError(f"{name} must be {what}, got {_given(value)}{': ' + fix if fix else ''}")


def images_arg(value: Any, name: str = "images") -> list:
    """A non-empty list of images (paths, PIL images, :class:`~vsink.images.NamedImage`) from any
    iterable of them; one path or one image is refused with how to pass it (a string would
    otherwise be read character by character)."""
    from PIL import Image

    from .images import NamedImage

    what = f"{name} must be a list of images (paths, PIL images or NamedImage)"
    if isinstance(value, (str, os.PathLike)):
        fix = (f"vsink.images.expand_paths([{str(value)!r}]) (its images)" if os.path.isdir(value)
               else f"[{str(value)!r}]")
        raise ArgumentError(f"{what}, got one path {str(value)!r}: pass {fix}")
    if isinstance(value, (Image.Image, NamedImage)):
        raise ArgumentError(f"{what}, got one {type(value).__name__}: pass [image]")
    if hasattr(value, "__array__"):  # a NumPy array or a tensor would be iterated row by row
        raise ArgumentError(f"{what}, got one {type(value).__name__}: pass [PIL.Image.fromarray(array)]")
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise ArgumentError(f"{what}, got {_given(value)}")
    items = list(value)
    if not items:
        raise ArgumentError(f"{name} is empty: no images given")
    for i, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike, Image.Image, NamedImage)):
            given, fix = _given(item), ""
            if hasattr(item, "__array__"):
                given = f"the {type(item).__name__} of shape {tuple(getattr(item, 'shape', ()))}"
                fix = ": pass PIL.Image.fromarray(array)"
            raise ArgumentError(f"{name}[{i}] must be an image path, a PIL image or a NamedImage, got {given}{fix}")
    return items


def names_arg(value: Any, name: str) -> list:
    """A list of names from any iterable of them; one string is refused with how to pass it (it
    would otherwise be read character by character)."""
    if isinstance(value, (str, bytes)):
        raise ArgumentError(f"{name} must be a list of names, got {_given(value)}: pass [{value!r}]")
    if not isinstance(value, Iterable):
        raise ArgumentError(f"{name} must be a list of names, got {_given(value)}")
    return list(value)


def int_arg(value: Any, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
            nullable: bool = False) -> Optional[int]:
    """An integer (NumPy's too; not a bool, a float or a string) in ``[minimum, maximum]``; ``None``
    when ``nullable``. Out of range: an :class:`~vsink.options.OptionError`, also naming ``name``."""
    if value is None and nullable:
        return None
    if not _integer(value):
        raise ArgumentError(f"{name} must be an integer{'' if not nullable else ' or None'}, got {_given(value)}")
    return Option(name, Int(minimum, maximum)).check(int(value), name=name)


def index_list_arg(value: Any, name: str) -> list[int]:
    """A list of integer indices (negative allowed: counted from the end; NumPy integers too); one
    integer, floats, bools and strings are refused."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ArgumentError(f"{name} must be a list of integers, got {_given(value)}")
    items = list(value)
    bad = [v for v in items if not _integer(v)]
    if bad:
        raise ArgumentError(f"{name} must be a list of integers, got {_given(bad[0])} in {shown(items, 80)}")
    return [int(v) for v in items]
