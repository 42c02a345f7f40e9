"""Register fine-tuning: recipes (posthoc self-distillation, scratch), the training loop, checkpoints."""

from .config import ConfigError, load_config
from .recipes import run_finetune

__all__ = ["ConfigError", "load_config", "run_finetune"]
