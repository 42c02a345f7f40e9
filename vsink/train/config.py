"""Fine-tuning recipes as YAML: defaults, validation with errors naming the key, ``key=value``
overrides. Read with ``yaml.safe_load`` only."""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ..assignments import parse_assignment
from ..errors import VsinkError

RECIPES = ("posthoc", "scratch")

#: every key a recipe may set, with its default; ``None`` defaults accept any value of the
#: types listed in :data:`TYPES`
DEFAULTS: dict[str, Any] = {
    "recipe": "posthoc",
    "seed": 0,
    "out": "vsink-finetune",
    "model": {"spec": "demo", "img_size": None, "weights": None, "model_kwargs": {}, "pretrained": True},
    "registers": {"n": 4, "init_std": 1e-6},
    "teacher": {"kind": "original", "neurons": None, "ttr_registers": 1, "shifts": 1, "flips": True},
    "student": {"unlock": ["norm"], "last_blocks": 0, "blocks": []},
    "loss": {"cosine": 1.0, "mse": 1.0, "cls": 0.0},
    "data": {"source": "synthetic", "path": None, "num_images": 64, "eval_images": 16, "flip": True},
    "train": {"steps": 200, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "weight_decay": 0.05,
              "warmup_steps": 10, "min_lr_ratio": 0.0, "amp": "auto", "device": "cpu", "log_every": 10,
              "eval_every": 50, "checkpoint_every": 50, "keep_checkpoints": 2},
}

TYPES: dict[str, tuple[type, ...]] = {
    "model.img_size": (int, type(None)), "model.weights": (str, type(None)), "teacher.neurons": (str, type(None)),
    "data.path": (str, type(None)), "model.model_kwargs": (dict,),
}

CHOICES = {
    "recipe": RECIPES,
    "teacher.kind": ("original", "ttr", "denoised"),
    "data.source": ("synthetic", "folder", "demo"),
    "train.amp": ("auto", "off", "bf16", "fp16"),
}
UNLOCKABLE = ("pos_embed", "patch_embed", "norm", "cls_token")
POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum", "train.log_every", "train.eval_every",
            "train.checkpoint_every", "train.keep_checkpoints", "data.num_images")


class ConfigError(VsinkError):
    """A recipe that cannot be used; the message names the file and the key."""


def _check(value: Any, default: Any, key: str, where: str) -> Any:
    if isinstance(default, dict) and key not in TYPES:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        out = copy.deepcopy(default)
        for k, v in value.items():
            if k not in default:
                close = difflib.get_close_matches(str(k), list(default), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(default)}"
                raise ConfigError(f"{where}: unknown key '{key}.{k}'{hint}")
            out[k] = _check(v, default[k], f"{key}.{k}", where)
        return out
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    allowed = TYPES.get(key)
    if allowed is None:
        allowed = (int, float) if isinstance(default, float) else (type(default),)
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{where}: '{key}' must be {allowed[0].__name__}, got {value!r}")
    if not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{where}: '{key}' must be {names}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value < 1:
        raise ConfigError(f"{where}: '{key}' must be at least 1, got {value!r}")
    return float(value) if isinstance(default, float) else value


def validate(raw: Any, where: str = "config") -> dict[str, Any]:
    """Merge ``raw`` over :data:`DEFAULTS`, checking every key, type and choice."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    cfg = {}
    for key, default in DEFAULTS.items():
        cfg[key] = _check(raw[key], default, key, where) if key in raw else copy.deepcopy(default)
    for key in raw:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    bad = [u for u in cfg["student"]["unlock"] if u not in UNLOCKABLE]
    if bad:
        raise ConfigError(f"{where}: 'student.unlock' entries must be among {', '.join(UNLOCKABLE)}, got {bad}")
    if cfg["data"]["source"] == "folder" and not cfg["data"]["path"]:
        raise ConfigError(f"{where}: 'data.path' is required when 'data.source' is folder")
    if cfg["registers"]["n"] < 0:
        raise ConfigError(f"{where}: 'registers.n' must be >= 0, got {cfg['registers']['n']}")
    if cfg["train"]["warmup_steps"] < 0 or not 0 <= cfg["train"]["min_lr_ratio"] <= 1:
        raise ConfigError(f"{where}: 'train.warmup_steps' must be >= 0 and 'train.min_lr_ratio' in [0, 1]")
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=100", "teacher.kind=ttr"]`` → a copy of ``raw`` with those values (parsed
    as YAML scalars/lists)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        try:
            key, value = parse_assignment(item, "override")
        except VsinkError as e:
            raise ConfigError(str(e)) from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a mapping")
        node[parts[-1]] = value
    return out


def load_config(path: Optional[Union[str, os.PathLike]], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe YAML (``safe_load``), apply overrides, validate; errors name the file."""
    raw: Any = {}
    where = "overrides"
    if path is not None:
        p = Path(path)
        where = str(p)
        try:
            raw = yaml.safe_load(p.read_text())
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    return validate(apply_overrides(raw or {}, overrides), where)
