"""Register fine-tuning: recipes (posthoc self-distillation, scratch), the training loop, checkpoints."""

from .config import ConfigError, Recipe, load_config
from .recipes import run_finetune

__all__ = ["ConfigError", "Recipe", "load_config", "run_finetune"]
