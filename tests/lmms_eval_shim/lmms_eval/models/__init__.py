"""lmms-eval's ``get_model`` (``lmms_eval/models/__init__.py`` at 75571cf; test stand-in: no
built-in models, only the ``lmms_eval.models`` entry points)."""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

MODEL_REGISTRY_V2 = ModelRegistryV2()
MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)

__all__ = ["ModelManifest", "MODEL_REGISTRY_V2", "get_model"]


def get_model(model_name: str, force_simple: bool = False) -> type:
    """The model class registered as ``model_name``."""
    return MODEL_REGISTRY_V2.get_model_class(model_name, force_simple=force_simple)
