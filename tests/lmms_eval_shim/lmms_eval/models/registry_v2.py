"""lmms-eval's model registry (``lmms_eval/models/registry_v2.py`` at 75571cf; test stand-in:
manifests, entry points, resolution and the class check)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Optional


@dataclass(frozen=True)
class ModelManifest:
    """A model's registration: its id and the class path of its simple and/or chat implementation."""

    model_id: str
    simple_class_path: Optional[str] = None
    chat_class_path: Optional[str] = None
    aliases: tuple = ()

    def __post_init__(self) -> None:
        if self.simple_class_path is None and self.chat_class_path is None:
            raise ValueError(f"ModelManifest('{self.model_id}') requires at least one class path")


class ModelRegistryV2:
    """Manifests by model id; a chat implementation wins over a simple one unless ``force_simple``."""

    def __init__(self) -> None:
        self._manifests: dict[str, ModelManifest] = {}

    def register_manifest(self, manifest: ModelManifest, *, overwrite: bool = False) -> None:
        if manifest.model_id in self._manifests and not overwrite and self._manifests[manifest.model_id] != manifest:
            raise ValueError(f"conflicting manifests for model '{manifest.model_id}'")
        self._manifests[manifest.model_id] = manifest

    def load_entrypoint_manifests(self, group: str = "lmms_eval.models", *, overwrite: bool = False) -> None:
        """Register the payload of each entry point of ``group``: a manifest, an iterable of them,
        or a callable returning either."""
        for ep in entry_points(group=group):
            payload = ep.load()
            payload = payload() if callable(payload) else payload
            for manifest in [payload] if isinstance(payload, ModelManifest) else list(payload):
                if not isinstance(manifest, ModelManifest):
                    raise TypeError("Entry point payload must be ModelManifest, iterable of ModelManifest, "
                                    "or callable returning one of those")
                self.register_manifest(manifest, overwrite=overwrite)

    def get_model_class(self, model_name: str, force_simple: bool = False) -> type:
        """Import the class of ``model_name``; refuse one that is not an ``lmms`` or whose
        ``is_simple`` contradicts the implementation chosen."""
        from lmms_eval.api.model import lmms

        if model_name not in self._manifests:
            raise ValueError(f"Model '{model_name}' not found in available models: {', '.join(sorted(self._manifests))}")
        manifest = self._manifests[model_name]
        simple = manifest.chat_class_path is None or (force_simple and manifest.simple_class_path is not None)
        path = manifest.simple_class_path if simple else manifest.chat_class_path
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, lmms)):
            raise TypeError(f"Model class '{path}' is not a subclass of lmms")
        if getattr(cls, "is_simple", True) != simple:
            raise TypeError(f"Model '{model_name}' resolved as {'simple' if simple else 'chat'} but "
                            f"{cls.__name__}.is_simple is {getattr(cls, 'is_simple', True)}")
        return cls
