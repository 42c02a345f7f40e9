"""Fine-tuning recipes as YAML: every key declared (:data:`RECIPE`: type, range, default,
meaning), ``key=value`` overrides, validation with errors naming the file, the key, the value and
what is allowed. Read with ``yaml.safe_load`` only, through :mod:`vsink.readers`."""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Optional, Sequence, Union

from ..assignments import parse_assignment
from ..errors import VsinkError
from ..options import (DEVICE, SEED, Bool, Choice, Float, InputPath, Int, ListOf, Mapping_, Option, OptionError,
                       OutputDir, Text, declare)

RECIPES = ("posthoc", "scratch")
UNLOCKABLE = ("pos_embed", "patch_embed", "norm", "cls_token")

#: every key a recipe may set (``section.key``), with its kind, default and meaning
RECIPE: dict[str, Option] = declare(
    Option("recipe", Choice(RECIPES), "posthoc", "posthoc: registers added to a pretrained model by "
           "self-distillation; scratch: a timm ViT with registers trained from random weights"),
    Option("seed", SEED, 0, "seed of the register initialisation, data order, flips and synthetic data"),
    Option("out", OutputDir(), "vsink-finetune", "output directory (config.yaml, metrics.jsonl, checkpoints/, "
           "final/, summary.json)"),
    Option("model.spec", Text(r"\S.*", "a model spec"), "demo", "the model (see 'vsink models')"),
    Option("model.img_size", Int(1, 16384), None, "square input size (null: the model's)", nullable=True),
    Option("model.weights", InputPath(), None, "checkpoint to start from (null: the library's weights)",
           nullable=True),
    Option("model.model_kwargs", Mapping_(), {}, "keyword arguments of the library constructor, e.g. {depth: 4}"),
    Option("model.pretrained", Bool(), True, "load the library's pretrained weights (timm) when no weights are given"),
    Option("registers.n", Int(0, 1024), 4, "registers added (posthoc: at least 1; scratch: 0 to compare)"),
    Option("registers.init_std", Float(0), 1e-6, "std of the new registers' normal initialisation"),
    Option("teacher.kind", Choice(("original", "ttr", "denoised")), "original",
           "posthoc teacher: the frozen model, with test-time registers, or averaged over flips and shifts"),
    Option("teacher.neurons", InputPath(), None, "teacher.kind ttr: a neurons.json (null: found on the "
           "training images)", nullable=True),
    Option("teacher.ttr_registers", Int(1, 1024), 1, "teacher.kind ttr: appended registers"),
    Option("teacher.shifts", Int(0, 64), 1, "teacher.kind denoised: whole-patch shifts in each direction"),
    Option("teacher.flips", Bool(), True, "teacher.kind denoised: also average over the horizontal flip"),
    Option("student.unlock", ListOf(Choice(UNLOCKABLE)), ["norm"], "parameter groups trained besides the registers"),
    Option("student.last_blocks", Int(0), 0, "also train the last k blocks"),
    Option("student.blocks", ListOf(Int()), [], "and/or these blocks (negative from the end)"),
    Option("loss.cosine", Float(0), 1.0, "weight of (1 - cos) on the patch features (posthoc)"),
    Option("loss.mse", Float(0), 1.0, "weight of the MSE on the patch features (posthoc)"),
    Option("loss.cls", Float(0), 0.0, "weight of (1 - cos) on the class token (posthoc)"),
    Option("data.source", Choice(("synthetic", "folder", "demo")), "synthetic",
           "training images: synthetic shapes, a folder (scratch: one subfolder per class) or the demo images"),
    Option("data.path", InputPath("directory"), None, "data.source folder: the image folder", nullable=True),
    Option("data.num_images", Int(1), 64, "training images (at most)"),
    Option("data.eval_images", Int(1), 16, "held-out evaluation images"),
    Option("data.flip", Bool(), True, "random horizontal flips (a function of the seed and the sample's position)"),
    Option("train.steps", Int(1), 200, "optimizer steps"),
    Option("train.batch_size", Int(1), 8, "images per micro-batch and process"),
    Option("train.grad_accum", Int(1), 1, "micro-batches per step"),
    Option("train.lr", Float(0, min_open=True), 1e-3, "peak learning rate (AdamW)"),
    Option("train.weight_decay", Float(0), 0.05, "decoupled weight decay (none on registers, embeddings, biases, norms)"),
    Option("train.warmup_steps", Int(0), 10, "linear warm-up steps"),
    Option("train.min_lr_ratio", Float(0, 1), 0.0, "final learning rate / peak (cosine decay)"),
    Option("train.amp", Choice(("auto", "off", "bf16", "fp16")), "auto", "mixed precision (auto: bf16 or fp16 on "
           "CUDA, off on CPU)"),
    Option("train.device", DEVICE, "cpu", "device (under torchrun: each process's own GPU)"),
    Option("train.log_every", Int(1), 10, "progress-bar update interval (steps)"),
    Option("train.eval_every", Int(1), 50, "evaluation interval (steps)"),
    Option("train.checkpoint_every", Int(1), 50, "checkpoint interval (steps)"),
    Option("train.keep_checkpoints", Int(1), 2, "newest checkpoints kept"),
)


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, option in RECIPE.items():
        section, _, leaf = key.rpartition(".")
        (out.setdefault(section, {}) if section else out)[leaf] = copy.deepcopy(option.default)
    return out


#: the recipe with every default, as a nested mapping
DEFAULTS: dict[str, Any] = _defaults()


class ConfigError(VsinkError):
    """A recipe that cannot be used; the message names the file and the key."""


def _unknown(key: str, known: Sequence[str], where: str) -> ConfigError:
    leaf = key.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in known], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(k.rpartition('.')[2] for k in known)}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def validate(raw: Any, where: str = "config") -> dict[str, Any]:
    """Merge ``raw`` over :data:`DEFAULTS`, checking every key against :data:`RECIPE` and the rules
    between keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    cfg = copy.deepcopy(DEFAULTS)
    for top, value in raw.items():
        if not isinstance(top, str) or top not in DEFAULTS:
            raise _unknown(str(top), [k for k in DEFAULTS], where)
        if not isinstance(DEFAULTS[top], dict):
            cfg[top] = _check(top, value, where)
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{top}' must be a mapping, got {value!r}")
        for leaf, v in value.items():
            key = f"{top}.{leaf}"
            if key not in RECIPE:
                raise _unknown(key, [k for k in RECIPE if k.startswith(top + ".")], where)
            cfg[top][leaf] = _check(key, v, where)
    _check_rules(cfg, where)
    return cfg


def _check(key: str, value: Any, where: str) -> Any:
    try:
        return RECIPE[key].check(value, where=where)
    except OptionError as e:
        raise ConfigError(str(e)) from None


def _check_rules(cfg: dict[str, Any], where: str) -> None:
    if cfg["data"]["source"] == "folder" and not cfg["data"]["path"]:
        raise ConfigError(f"{where}: 'data.path' is required when 'data.source' is folder")
    if cfg["recipe"] == "posthoc":
        if cfg["registers"]["n"] < 1:
            raise ConfigError(f"{where}: 'registers.n' must be at least 1 for the posthoc recipe, got "
                              f"{cfg['registers']['n']}")
        if not any(cfg["loss"].values()):
            raise ConfigError(f"{where}: the loss weights 'loss.cosine', 'loss.mse' and 'loss.cls' are all 0: "
                              "nothing would be learned")


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
    from ..readers import ReadError, read_yaml

    raw: Any = {}
    where = "overrides"
    if path is not None:
        where = str(path)
        try:
            raw = read_yaml(path)
        except ReadError as e:
            raise ConfigError(str(e)) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    return validate(apply_overrides(raw or {}, overrides), where)
