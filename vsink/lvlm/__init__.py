"""LVLM visual sinks and hallucination mitigation at inference: VAR, PAI, FastV."""

from ..backbones.hf_lvlm import LVLM, load_lvlm
from .generate import GenerationResult, generate, make_settings
from .session import Session
from .settings import PROTOCOLS, FastVSettings, PAISettings, VARSettings

__all__ = ["PROTOCOLS", "FastVSettings", "GenerationResult", "LVLM", "PAISettings", "Session", "VARSettings",
           "generate", "load_lvlm", "make_settings"]
