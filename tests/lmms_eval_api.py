"""lmms-eval for the plugin's tests: the installed package where there is one, otherwise the
stand-in under ``tests/lmms_eval_shim`` (the parts of lmms-eval 0.7.2's API the plugin uses,
read from EvolvingLMMs-Lab/lmms-eval at 75571cf; see its docstring), so the plugin's code path —
entry point, ``get_model``, ``create_from_arg_string``, ``Instance``, ``generate_until`` — runs
in CI either way."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "lmms_eval_shim"


def load_lmms_eval() -> bool:
    """Import ``lmms_eval`` (the real package if installed, else the stand-in); True for the stand-in."""
    if "lmms_eval" not in sys.modules and importlib.util.find_spec("lmms_eval") is None:
        sys.path.insert(0, str(SHIM))
        try:
            import lmms_eval  # noqa: F401 - cached in sys.modules; its submodules resolve through its __path__
        finally:
            sys.path.remove(str(SHIM))
    import lmms_eval

    return bool(getattr(lmms_eval, "SHIM", False))
