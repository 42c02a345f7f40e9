"""lmms-eval's ``lmms_eval.api`` (test stand-in; see the package docstring)."""
