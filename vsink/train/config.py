"""Fine-tuning recipes as YAML: every key declared (:data:`RECIPE`: type, range, default,
meaning), ``key=value`` overrides, validation with errors naming the file, the key, the value and
what is allowed. Read with ``yaml.safe_load`` only, through :mod:`vsink.readers`.

A validated recipe is a :class:`Recipe`: one frozen dataclass per section (:class:`ModelConfig`,
:class:`RegistersConfig`, :class:`TeacherConfig`, :class:`StudentConfig`, :class:`LossConfig`,
:class:`SinderConfig`, :class:`DataConfig`, :class:`TrainConfig`) whose fields are the section's keys, with
:data:`RECIPE`'s defaults."""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping, Optional, Sequence, Union

from ..assignments import parse_assignment
from ..attention_variants import VARIANTS
from ..errors import VsinkError
from ..options import (DEVICE, MAX_REGISTERS, SEED, Bool, Choice, Float, InputPath, Int, ListOf, Mapping_, Option, OptionError,
                       OutputDir, Text, declare)

RECIPES = ("posthoc", "scratch", "sinder")
UNLOCKABLE = ("pos_embed", "patch_embed", "norm", "cls_token")

#: every key a recipe may set (``section.key``), with its kind, default and meaning
RECIPE: dict[str, Option] = declare(
    Option("recipe", Choice(RECIPES), "posthoc", "posthoc: registers added to a pretrained model by "
           "self-distillation; scratch: a timm ViT with registers trained from random weights; sinder: a pretrained "
           "model repaired along its weight-only defect directions by training singular-value offsets only"),
    Option("seed", SEED, 0, "seed of the register initialisation, data order, flips and synthetic data"),
    Option("out", OutputDir(), "vsink-finetune", "output directory (config.yaml, metrics.jsonl, checkpoints/, "
           "final/, summary.json)"),
    Option("model.spec", Text(r"\S.*", "a model spec"), "demo", "the model (see 'vsink models')"),
    Option("model.img_size", Int(1, 16384), None, "square input size (null: the model's)", nullable=True),
    Option("model.weights", InputPath(), None, "checkpoint to start from (null: the library's weights)",
           nullable=True),
    Option("model.model_kwargs", Mapping_(), {}, "keyword arguments of the library constructor, e.g. {depth: 4}"),
    Option("model.pretrained", Bool(), True, "load the library's pretrained weights (timm) when no weights are given"),
    Option("model.attention", Choice(VARIANTS), "softmax", "attention of every block (timm ViTs; docs/finetune.md, "
           "Attention variants): posthoc only softmax, gated (gate opened) or sink_logit (at -30)"),
    Option("registers.n", Int(0, MAX_REGISTERS), 4, "registers added (posthoc: at least 1; scratch: 0 to compare)"),
    Option("registers.init_std", Float(0), 1e-6, "std of the new registers' normal initialisation"),
    Option("teacher.kind", Choice(("original", "ttr", "denoised")), "original",
           "posthoc teacher: the frozen model, with test-time registers, or averaged over flips and shifts"),
    Option("teacher.neurons", InputPath(), None, "teacher.kind ttr: a neurons.json (null: found on the "
           "training images)", nullable=True),
    Option("teacher.ttr_registers", Int(1, MAX_REGISTERS), 1, "teacher.kind ttr: appended registers"),
    Option("teacher.shifts", Int(0, 64), 1, "teacher.kind denoised: whole-patch shifts in each direction"),
    Option("teacher.flips", Bool(), True, "teacher.kind denoised: also average over the horizontal flip"),
    Option("student.unlock", ListOf(Choice(UNLOCKABLE)), ["norm"], "parameter groups trained besides the registers"),
    Option("student.last_blocks", Int(0), 0, "also train the last k blocks"),
    Option("student.blocks", ListOf(Int()), [], "and/or these blocks (negative from the end)"),
    Option("loss.cosine", Float(0), 1.0, "weight of (1 - cos) on the patch features (posthoc)"),
    Option("loss.mse", Float(0), 1.0, "weight of the MSE on the patch features (posthoc)"),
    Option("loss.cls", Float(0), 0.0, "weight of (1 - cos) on the class token (posthoc)"),
    Option("sinder.samples", Int(16, 10_000_000), 100_000, "sinder: Gaussian samples per block for the weight-only "
           "defect directions (vsink defect --samples; cached)"),
    Option("sinder.sigmas", Float(0, min_open=True), 4.0, "sinder: a patch is anomalous when its |cos| to the "
           "defect direction exceeds the image's mean by this many standard deviations"),
    Option("sinder.min_tokens", Int(1), 3, "sinder: anomalous patches a block needs before its neighbour loss is "
           "used (fewer: the next block is checked; none anywhere: the image is anomaly-free)"),
    Option("sinder.temperature", Float(0, min_open=True), 0.1, "sinder: neighbour weights exp(-|cos| / temperature) "
           "times a 3x3 Gaussian"),
    Option("sinder.limit_layers", Int(0), 10, "sinder: blocks more than this far below the loss's block get no "
           "gradient (0: no limit)"),
    Option("sinder.stop_fraction", Float(0, 1, min_open=True), 0.75, "sinder: stop once this share of the last "
           "sinder.window training images was anomaly-free"),
    Option("sinder.window", Int(1), 1000, "sinder: training images the stopping share is taken over (the window "
           "starts full of images with anomalies)"),
    Option("data.source", Choice(("synthetic", "folder", "demo")), "synthetic",
           "training images: synthetic shapes, a folder (scratch: one subfolder per class) or the demo images"),
    Option("data.path", InputPath("directory"), None, "data.source folder: the image folder", nullable=True),
    Option("data.num_images", Int(1), 64, "training images (at most)"),
    Option("data.eval_images", Int(1), 16, "held-out evaluation images"),
    Option("data.flip", Bool(), True, "random horizontal flips (a function of the seed and the sample's position)"),
    Option("train.steps", Int(1), 200, "optimizer steps"),
    Option("train.batch_size", Int(1), 8, "images per micro-batch and process"),
    Option("train.grad_accum", Int(1), 1, "micro-batches per step"),
    Option("train.optimizer", Choice(("adamw", "sgd")), "adamw", "adamw (betas 0.9, 0.999) or sgd (momentum 0.9, "
           "the SINDER reference's)"),
    Option("train.lr", Float(0, min_open=True), 1e-3, "peak learning rate"),
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


class ConfigError(VsinkError):
    """A recipe that cannot be used; the message names the file and the key."""


def _unknown(key: str, known: Sequence[str], where: str) -> ConfigError:
    """``key`` is not a recipe key: the message names the closest known key as written where the
    key came from (a dotted override: the dotted key; inside a YAML section: the leaf)."""
    if "." in key and where == "override":
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see the recipe keys in docs/options.md"
        return ConfigError(f"{where}: unknown key '{key}'{hint}")
    leaf = key.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in known], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(k.rpartition('.')[2] for k in known)}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _check(key: str, value: Any, where: str) -> Any:
    try:
        return RECIPE[key].check(value, where=where)
    except OptionError as e:
        raise ConfigError(str(e)) from None


def _default(key: str) -> Any:
    """A dataclass field whose default is :data:`RECIPE`'s for ``key`` (a fresh copy for each
    instance, so no two recipes share a list or mapping)."""
    default = RECIPE[key].default
    return field(default_factory=lambda: copy.deepcopy(default))


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: which model is loaded or built, and from what."""

    spec: str = _default("model.spec")
    img_size: Optional[int] = _default("model.img_size")
    weights: Optional[str] = _default("model.weights")
    model_kwargs: dict[str, Any] = _default("model.model_kwargs")
    pretrained: bool = _default("model.pretrained")
    attention: str = _default("model.attention")


@dataclass(frozen=True)
class RegistersConfig:
    """The ``registers`` section: how many registers the model gets and their initialisation."""

    n: int = _default("registers.n")
    init_std: float = _default("registers.init_std")


@dataclass(frozen=True)
class TeacherConfig:
    """The ``teacher`` section: what the posthoc student learns to reproduce."""

    kind: str = _default("teacher.kind")
    neurons: Optional[str] = _default("teacher.neurons")
    ttr_registers: int = _default("teacher.ttr_registers")
    shifts: int = _default("teacher.shifts")
    flips: bool = _default("teacher.flips")


@dataclass(frozen=True)
class StudentConfig:
    """The ``student`` section: the parameters trained besides the registers (posthoc)."""

    unlock: list[str] = _default("student.unlock")
    last_blocks: int = _default("student.last_blocks")
    blocks: list[int] = _default("student.blocks")


@dataclass(frozen=True)
class LossConfig:
    """The ``loss`` section: weights of the posthoc distillation terms."""

    cosine: float = _default("loss.cosine")
    mse: float = _default("loss.mse")
    cls: float = _default("loss.cls")


@dataclass(frozen=True)
class SinderConfig:
    """The ``sinder`` section: the SINDER repair's anomaly rule, neighbour loss and stopping rule."""

    samples: int = _default("sinder.samples")
    sigmas: float = _default("sinder.sigmas")
    min_tokens: int = _default("sinder.min_tokens")
    temperature: float = _default("sinder.temperature")
    limit_layers: int = _default("sinder.limit_layers")
    stop_fraction: float = _default("sinder.stop_fraction")
    window: int = _default("sinder.window")


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: where the training and held-out images come from."""

    source: str = _default("data.source")
    path: Optional[str] = _default("data.path")
    num_images: int = _default("data.num_images")
    eval_images: int = _default("data.eval_images")
    flip: bool = _default("data.flip")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section: the settings of :func:`vsink.train.loop.train`."""

    steps: int = _default("train.steps")
    batch_size: int = _default("train.batch_size")
    grad_accum: int = _default("train.grad_accum")
    optimizer: str = _default("train.optimizer")
    lr: float = _default("train.lr")
    weight_decay: float = _default("train.weight_decay")
    warmup_steps: int = _default("train.warmup_steps")
    min_lr_ratio: float = _default("train.min_lr_ratio")
    amp: str = _default("train.amp")
    device: str = _default("train.device")
    log_every: int = _default("train.log_every")
    eval_every: int = _default("train.eval_every")
    checkpoint_every: int = _default("train.checkpoint_every")
    keep_checkpoints: int = _default("train.keep_checkpoints")


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning recipe: one field per top-level key of :data:`RECIPE` and one section
    dataclass per ``section.key`` group, every default taken from :data:`RECIPE` (``Recipe()`` is
    the default recipe).

    :meth:`from_mapping` (and :func:`load_config`) validate; building or changing one directly
    (``dataclasses.replace``) checks nothing, and :func:`vsink.train.run_finetune` validates what
    it is given. :meth:`to_dict` is the nested mapping written to ``config.yaml``."""

    recipe: str = _default("recipe")
    seed: int = _default("seed")
    out: str = _default("out")
    model: ModelConfig = field(default_factory=ModelConfig)
    registers: RegistersConfig = field(default_factory=RegistersConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sinder: SinderConfig = field(default_factory=SinderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "config") -> Recipe:
        """``raw`` (a nested mapping, as read from YAML; None: empty) over the defaults, every key
        checked against :data:`RECIPE` (unknown keys with a suggestion) and the rules between
        keys; errors are :class:`ConfigError` naming ``where`` and the key."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: a recipe must be a YAML mapping, got {type(raw).__name__}")
        defaults = cls()
        names = [f.name for f in fields(cls)]
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for name, value in raw.items():
            if not isinstance(name, str) or name not in names:
                raise _unknown(str(name), names, where)
            if not is_dataclass(getattr(defaults, name)):
                top[name] = _check(name, value, where)
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: '{name}' must be a mapping, got {value!r}")
            leaves = sections.setdefault(name, {})
            for leaf, v in value.items():
                key = f"{name}.{leaf}"
                if key not in RECIPE:
                    raise _unknown(key, [k for k in RECIPE if k.startswith(name + ".")], where)
                leaves[leaf] = _check(key, v, where)
        recipe = replace(defaults, **top, **{name: replace(getattr(defaults, name), **leaves)
                                              for name, leaves in sections.items()})
        recipe._check_rules(where)
        return recipe

    def _check_rules(self, where: str) -> None:
        if self.data.source == "folder" and not self.data.path:
            raise ConfigError(f"{where}: 'data.path' is required when 'data.source' is folder")
        if self.recipe == "posthoc":
            if self.registers.n < 1:
                raise ConfigError(f"{where}: 'registers.n' must be at least 1 for the posthoc recipe, got "
                                  f"{self.registers.n}")
            if not any((self.loss.cosine, self.loss.mse, self.loss.cls)):
                raise ConfigError(f"{where}: the loss weights 'loss.cosine', 'loss.mse' and 'loss.cls' are all 0: "
                                  "nothing would be learned")
        if self.recipe == "sinder" and self.model.attention != "softmax":
            raise ConfigError(f"{where}: the sinder recipe repairs the model's own attention; 'model.attention' must be "
                              f"softmax, got {self.model.attention}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a nested plain mapping (sections as mappings, keys in :data:`RECIPE`'s
        order): what ``config.yaml`` holds, and what :meth:`from_mapping` reads back."""
        return asdict(self)

    def value(self, key: str) -> Any:
        """The value of a declared key, ``"seed"`` or ``"section.key"`` (e.g. ``"train.lr"``)."""
        if key not in RECIPE:
            raise KeyError(key)
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.steps=100", "teacher.kind=ttr"]`` → a copy of ``raw`` with those values (parsed
    as YAML scalars/lists)."""
    out = copy.deepcopy(raw)
    sections = {k.partition(".")[0] for k in RECIPE if "." in k}
    for item in overrides:  # in order: a key given twice takes its last value
        try:
            key, value = parse_assignment(item, "override")
        except VsinkError as e:
            raise ConfigError(str(e)) from None
        if key not in RECIPE and key not in sections and ".".join(key.split(".")[:2]) not in RECIPE:
            raise _unknown(key, list(RECIPE), "override")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a mapping")
        node[parts[-1]] = value
    return out


def load_config(path: Optional[Union[str, os.PathLike]], overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML (``safe_load``; None: no file, the defaults), apply overrides and
    validate (:meth:`Recipe.from_mapping`); errors name the file, or ``override`` when the file
    alone is a valid recipe and an override made it invalid."""
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
    merged = apply_overrides(raw or {}, overrides)
    try:
        return Recipe.from_mapping(merged, where)
    except ConfigError as merged_error:
        if path is None or not overrides or not _valid(raw, where):
            raise merged_error from None
    return Recipe.from_mapping(merged, "override")


def _valid(raw: Any, where: str) -> bool:
    """Whether ``raw`` alone (a recipe file without overrides) is a valid recipe."""
    try:
        Recipe.from_mapping(raw, where)
    except ConfigError:
        return False
    return True
