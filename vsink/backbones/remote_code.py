"""Code shipped with a model is never run unless the user asks (``--trust-remote-code``).

A Hugging Face folder or hub repository whose ``config.json`` has an ``auto_map`` names Python
files of its own; transformers runs them when ``trust_remote_code=True`` and, when the argument
is left out, *asks on stdin* (a ``y`` runs them). Every vsink loader passes the argument
explicitly, and :func:`no_remote_code_prompt` makes any loader that vsink does not call directly
(a library building a text tower, say) fail instead of asking. :func:`refused` turns
transformers' refusal into one line that names the flag, where one exists.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import ModelSpecError


class RemoteCodeRefused(ModelSpecError):
    """A model that ships its own code, loaded without the user's permission to run it."""


def is_remote_code_refusal(error: BaseException) -> bool:
    """Whether ``error`` is transformers refusing (or timing out on) code shipped with a model."""
    text = str(error)
    return "trust_remote_code" in text or "custom code" in text


def refused(source: str, flag: Optional[str]) -> RemoteCodeRefused:
    """The one-line error for ``source``; ``flag``: the option that allows it (None: nothing does)."""
    how = (f"pass {flag} to allow it" if flag else
           "vsink never runs it for vision models (--trust-remote-code applies to LVLMs)")
    return RemoteCodeRefused(f"{source}: the model ships its own Python code (auto_map in config.json); "
                             f"remote code is refused: {how}")


@contextmanager
def no_remote_code_prompt() -> Iterator[None]:
    """While loading: a transformers loader that would ask whether to run a model's code (its
    ``trust_remote_code`` left out) refuses at once instead of reading the answer from stdin."""
    try:
        from transformers import dynamic_module_utils as dmu
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    before = dmu.TIME_OUT_REMOTE_CODE
    dmu.TIME_OUT_REMOTE_CODE = 0
    try:
        yield
    finally:
        dmu.TIME_OUT_REMOTE_CODE = before
