"""LVLMs: scans of the language model's sinks, and generation with mitigations (VAR, PAI, FastV,
test-time registers in the vision tower, alone or combined)."""

from ..backbones.hf_lvlm import LVLM, load_lvlm
from ..mitigate import PROTOCOLS, FastVSettings, PAISettings, TTRSettings, VARSettings
from .generate import GenerationResult, MitigationWarning, generate, make_settings

__all__ = ["PROTOCOLS", "FastVSettings", "GenerationResult", "LVLM", "MitigationWarning", "PAISettings", "TTRSettings",
           "VARSettings", "generate", "load_lvlm", "make_settings"]
