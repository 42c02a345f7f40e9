"""The fine-tuning recipes behind ``vsink finetune``.

``posthoc`` — registers added to a pretrained model by self-distillation: the student is the
same model with ``registers.n`` new registers; it learns to reproduce the teacher's patch
features (and optionally class token) with loss ``cosine·(1 − cos) + mse·MSE (+ cls·(1 − cos_cls))``
while only the registers and the unlocked parameters train. Teachers: ``original`` (the frozen
model), ``ttr`` (the frozen model with test-time registers, so its patch features are
artifact-free), ``denoised`` (the frozen model's features averaged over flips and whole-patch
shifts, each warped back — the PH-Reg idea).

``scratch`` — a timm ViT (``VisionTransformer`` or ``Eva``) with ``registers.n`` registers (0
allowed, to compare) trained from random weights on a classification set (synthetic shapes or a
folder of class subfolders).

``sinder`` — a pretrained model repaired along its weight-only defect directions, only
singular-value offsets trained (:mod:`vsink.train.sinder`).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from ..attention_variants import apply_attention, variant_parameters
from ..backbones.base import Backbone
from ..backbones.hooks import Hooks
from ..errors import VsinkError
from ..io import write_json, write_text
from .checkpoint import check_checkpoint_fits, checkpoint_step, list_checkpoints
from .config import RECIPE, Recipe
from .data import TrainImages, flips_for, load_training_images, to_input
from .distributed import barrier, init_distributed, shutdown
from .loop import TrainTask, check_task, no_decay_parameters, train
from .memory import check_memory
from .report import finetune_report



def _last_tokens(backbone: Backbone, x: torch.Tensor, module: Optional[nn.Module] = None, *,
                 grad: bool = False) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(class token [B, D] or None, patch grid [B, h, w, D]) of the last block, after the final norm."""
    seen: dict[str, torch.Tensor] = {}
    with Hooks(lambda handles: handles.append(backbone.hook("block_output", -1, lambda t: seen.__setitem__("x", t)))):
        if grad:
            backbone.train_forward(x, module)
        else:
            backbone.forward(x)
    with nullcontext() if grad else torch.no_grad():
        tokens = backbone.final_norm(seen["x"])
    layout = backbone.current_layout()
    cls = tokens[:, layout.cls_token] if layout.cls_token is not None else None
    return cls, layout.patch_grid(tokens)


def unlocked_parameters(backbone: Backbone, unlock: Sequence[str], blocks: Sequence[int]) -> list[tuple[str, nn.Parameter]]:
    """Registers plus the named groups (``pos_embed``, ``patch_embed``, ``cls_token`` from the
    adapter's parameter roles, ``norm`` = the final norm) and the given blocks."""
    n = backbone.num_layers
    roles = backbone.parameter_roles()
    chosen = {id(p) for p in roles["registers"]}
    chosen |= {id(p) for role in ("pos_embed", "patch_embed", "cls_token") if role in unlock for p in roles[role]}
    if "norm" in unlock:
        chosen |= {id(p) for p in backbone.final_norm.parameters()}
    for b in blocks:
        if not -n <= b < n:
            raise VsinkError(f"student block {b} out of range for {n} blocks")
        chosen |= {id(p) for p in backbone.blocks[b].parameters()}
    return [(name, p) for name, p in backbone.model.named_parameters() if id(p) in chosen]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


class PosthocTask(TrainTask):
    """The ``posthoc`` recipe: ``base`` + ``registers.n`` registers (the student) distilled from
    the teacher ``teacher.kind`` made of ``base``."""

    def __init__(self, cfg: Recipe, base: Backbone, images: TrainImages, device: torch.device):
        from ..detect.norms import detect_high_norm
        from ..probe import Probe

        self.cfg, self.images, self.device = cfg, images, device
        reg = cfg.registers
        self.student = base.with_registers(reg.n, init_std=reg.init_std, seed=cfg.seed)
        apply_attention(self.student.model, cfg.model.attention, start="pretrained")
        for p in self.student.model.parameters():
            p.requires_grad_(False)
        st = cfg.student
        blocks = list(st.blocks) + list(range(base.num_layers - st.last_blocks, base.num_layers))
        self._trainable = unlocked_parameters(self.student, st.unlock, sorted(set(blocks)))
        known = {id(p) for _, p in self._trainable}
        self._trainable += [(n, p) for n, p in variant_parameters(self.student.model) if id(p) not in known]
        for _, p in self._trainable:
            p.requires_grad_(True)
        self.module, self.num_samples = self.student.model, len(images.pixels)
        self.eval_x = self._input(images.eval_pixels)
        with Probe(base, attention=False) as probe:  # the original's outliers, for the clean-patch cosine
            base.forward(self.eval_x)
        original = detect_high_norm(probe.trace())
        self.original_outliers = max(s.outlier_fraction for s in original.layers)
        layout = base.layout(tuple(self.eval_x.shape[-2:]))
        self.outlier_patch = torch.zeros(len(self.eval_x), layout.num_patches, dtype=torch.bool)
        for t in original.tokens:
            self.outlier_patch[t.image, t.token - layout.num_prefix] = True
        self._teacher_edits = None
        self.teacher = self._make_teacher(base)

    def _input(self, pixels: torch.Tensor, flips: Optional[list[bool]] = None) -> torch.Tensor:
        b = self.student
        return to_input(pixels, b.mean, b.std, self.device, b.dtype, flips)

    def _make_teacher(self, base: Backbone) -> Backbone:
        t = self.cfg.teacher
        for p in base.model.parameters():
            p.requires_grad_(False)
        if t.kind == "ttr":
            from ..registers import NeuronSpec, TestTimeRegisters, find_register_neurons

            if t.neurons:
                spec = NeuronSpec.load(t.neurons)
            else:
                from PIL import Image

                pils = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in self.images.pixels]
                spec = find_register_neurons(base, pils, progress=False)
                print(f"vsink: teacher register neurons {[(n.layer, n.neuron) for n in spec.neurons]}", file=sys.stderr)
            self._teacher_edits = TestTimeRegisters(spec, registers=t.ttr_registers)
        return base

    def _teaching(self):
        """The teacher's edits (test-time registers for ``teacher.kind: ttr``) while in the block;
        outside it the teacher's backbone is the original model."""
        return self._teacher_edits.applied(self.teacher) if self._teacher_edits else nullcontext()

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Teacher class token and patch features for a batch."""
        if self.cfg.teacher.kind != "denoised":
            with self._teaching():
                return _last_tokens(self.teacher, x)
        return self._denoised(x)

    def _denoised(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        t = self.cfg.teacher
        ph, pw = self.teacher.patch_size
        s = t.shifts
        shifts = [(0, 0)] + [(dy, dx) for d in range(1, s + 1) for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d))]
        total, count, cls_total = None, None, None
        for flip in ([False, True] if t.flips else [False]):
            xf = x.flip(-1) if flip else x
            for dy, dx in shifts:
                # shift the image by whole patches (edges replicated); warp the features back
                pad = (max(dx, 0) * pw, max(-dx, 0) * pw, max(dy, 0) * ph, max(-dy, 0) * ph)
                xs = F.pad(xf, pad, mode="replicate")
                H, W = x.shape[-2:]
                top, left = max(-dy, 0) * ph, max(-dx, 0) * pw
                xs = xs[..., top:top + H, left:left + W]
                cls, grid = _last_tokens(self.teacher, xs)
                h, w = grid.shape[1:3]
                back = torch.zeros_like(grid)
                valid = torch.zeros(1, h, w, 1, device=grid.device)
                rows, cols = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
                src_r, src_c = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
                back[:, src_r, src_c] = grid[:, rows, cols]
                valid[:, src_r, src_c] = 1.0
                if flip:
                    back, valid = back.flip(2), valid.flip(2)
                total = back if total is None else total + back
                count = valid if count is None else count + valid
                if cls is not None:
                    cls_total = cls if cls_total is None else cls_total + cls
        n = len(shifts) * (2 if t.flips else 1)
        return (cls_total / n if cls_total is not None else None), total / count.clamp(min=1)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return self._trainable

    def no_decay(self) -> list[nn.Parameter]:
        return no_decay_parameters(self.student)

    def loss(self, model: nn.Module, samples: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._input(self.images.pixels[list(samples)],
                        flips_for(positions, self.cfg.seed, self.cfg.data.flip))
        t_cls, t_patch = self.targets(x)
        s_cls, s_patch = _last_tokens(self.student, x, model, grad=True)
        w = self.cfg.loss
        cos = _cosine(s_patch, t_patch).mean()
        mse = F.mse_loss(s_patch.float(), t_patch.float())
        loss = w.cosine * (1 - cos) + w.mse * mse
        metrics = {"patch_cosine": float(cos.detach()), "mse": float(mse.detach())}
        if w.cls and s_cls is not None and t_cls is not None:
            cls_cos = _cosine(s_cls, t_cls).mean()
            loss = loss + w.cls * (1 - cls_cos)
            metrics["cls_cosine"] = float(cls_cos.detach())
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Agreement with the teacher on the held-out images and the student's outliers."""
        from ..detect.norms import detect_high_norm
        from ..probe import Probe

        t_cls, t_patch = self.targets(self.eval_x)
        with Probe(self.student, attention=False) as probe:
            s_cls, s_patch = _last_tokens(self.student, self.eval_x)
        hn = detect_high_norm(probe.trace())
        cos = _cosine(s_patch, t_patch).flatten(1).cpu()
        clean = ~self.outlier_patch
        out = {"patch_cosine": float(cos.mean()),
               "patch_cosine_clean": float(cos[clean].mean()) if clean.any() else None,
               "student_outlier_fraction_max": max(s.outlier_fraction for s in hn.layers),
               "student_norm_ratio_max": max(s.ratio for s in hn.layers),
               "original_outlier_fraction_max": self.original_outliers}
        if s_cls is not None and t_cls is not None:
            out["cls_cosine"] = float(_cosine(s_cls, t_cls).mean())
        return out

    def compared_models(self) -> list[tuple[str, Backbone, Callable[[], ContextManager[Any]]]]:
        models = [("original", self.teacher, nullcontext)]
        if self._teacher_edits:
            models.append(("teacher (test-time registers)", self.teacher, self._teaching))
        return models + [("fine-tuned", self.student, nullcontext)]

    def held_out_images(self) -> list[Image.Image]:
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in self.images.eval_pixels]

    def finish(self, directory: Path) -> dict[str, Any]:
        self.student.save(directory)
        return {"model": str(directory), "registers": self.student.layout().num_registers,
                "trainable_parameters": sum(p.numel() for _, p in self._trainable)}


class ScratchTask(TrainTask):
    """The ``scratch`` recipe: ``backbone`` (built with ``registers.n`` registers and random
    weights) trained for classification on the images' labels."""

    def __init__(self, cfg: Recipe, backbone: Backbone, images: TrainImages, device: torch.device):
        self.cfg, self.backbone, self.images, self.device = cfg, backbone, images, device
        self.module, self.num_samples = backbone.model, len(images.pixels)
        backbone.model.train()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.backbone.model.named_parameters() if p.requires_grad]

    def no_decay(self) -> list[nn.Parameter]:
        return no_decay_parameters(self.backbone)

    def _input(self, pixels: torch.Tensor, flips: Optional[list[bool]] = None) -> torch.Tensor:
        b = self.backbone
        return to_input(pixels, b.mean, b.std, self.device, b.dtype, flips)

    def loss(self, model: nn.Module, samples: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._input(self.images.pixels[list(samples)],
                        flips_for(positions, self.cfg.seed, self.cfg.data.flip))
        y = self.images.labels[list(samples)].to(self.device)
        logits = self.backbone.train_forward(x, model)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"accuracy": float((logits.argmax(-1) == y).float().mean())}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        from ..detect.norms import detect_high_norm
        from ..probe import Probe

        self.backbone.model.eval()
        try:
            with Probe(self.backbone, attention=False) as probe:
                logits = self.backbone.train_forward(self._input(self.images.eval_pixels))
            hn = detect_high_norm(probe.trace())
        finally:
            self.backbone.model.train()
        y = self.images.eval_labels.to(self.device)
        return {"accuracy": float((logits.argmax(-1) == y).float().mean()),
                "outlier_fraction_max": max(s.outlier_fraction for s in hn.layers),
                "norm_ratio_max": max(s.ratio for s in hn.layers)}

    def finish(self, directory: Path) -> dict[str, Any]:
        self.backbone.model.eval()
        self.backbone.save(directory)
        return {"model": str(directory), "registers": self.backbone.layout().num_registers,
                "classes": self.images.class_names}


def _build(cfg: Recipe, device: torch.device, progress: bool = True) -> TrainTask:
    """The recipe's task: the model (its memory needs checked), then the training images."""
    from ..backbones.registry import load

    m = cfg.model
    kwargs = dict(m.model_kwargs)
    if cfg.recipe in ("posthoc", "sinder"):
        base = load(m.spec, img_size=m.img_size, weights=m.weights, model_kwargs=kwargs,
                    pretrained=m.pretrained, device=device)
        check_memory(cfg, base, base.img_size, device)
        images = load_training_images(cfg.data, base.img_size, cfg.seed, False)
        if cfg.recipe == "sinder":
            from .sinder import SinderTask

            return SinderTask(cfg, base, images, device, progress=progress)
        return PosthocTask(cfg, base, images, device)
    shape = load(m.spec, img_size=m.img_size, model_kwargs=kwargs, pretrained=False)
    if not type(shape).scratch_registers:
        raise VsinkError(f"the scratch recipe builds ViTs with their library's own registers (timm); model.spec "
                         f"{m.spec!r} is a {shape.family} model")
    kwargs[type(shape).register_kwarg] = cfg.registers.n
    size = shape.img_size
    check_memory(cfg, shape, size, device)
    images = load_training_images(cfg.data, size, cfg.seed, classification=True)
    kwargs["num_classes"] = images.num_classes
    torch.manual_seed(cfg.seed)
    backbone = load(m.spec, img_size=m.img_size, model_kwargs=kwargs, pretrained=False, device=device)
    apply_attention(backbone.model, m.attention, start="scratch")
    return ScratchTask(cfg, backbone, images, device)


#: the recipe keys a resumed run may change: where it writes, how far it trains, where it runs and
#: how often it logs, evaluates and checkpoints. Every other key is what the run trains with
#: (model, registers, teacher, student, loss, data, seed, optimizer and schedule) and must stay.
RESUME_MAY_CHANGE = ("out", "train.steps", "train.device", "train.log_every", "train.eval_every",
                     "train.checkpoint_every", "train.keep_checkpoints")


def _preflight(cfg: Recipe, out: Path, resume: bool) -> None:
    """Everything about the output folder that can refuse the run, checked before anything is
    written: it can be written, it holds no earlier run unless resuming, and a resumed run trains
    further (``train.steps`` beyond its newest checkpoint) with the earlier run's recipe (from its
    config.yaml; only :data:`RESUME_MAY_CHANGE` may differ)."""
    from ..outputs import check_output_dir
    from ..readers import ReadError, read_yaml

    check_output_dir(out, "out")
    checkpoints = list_checkpoints(out / "checkpoints")
    if not checkpoints:
        return
    if not resume:
        raise VsinkError(f"{out / 'checkpoints'} holds checkpoints of an earlier run; pass --resume to continue it "
                         "or choose another output directory")
    try:
        earlier = read_yaml(out / "config.yaml")
    except ReadError:
        earlier = None  # no record of the earlier recipe: the checkpoint's shapes are checked when it is loaded
    if isinstance(earlier, dict):
        _check_same_recipe(cfg, earlier, out)
    done = checkpoint_step(checkpoints[-1])
    if cfg.train.steps <= done:
        state = "is complete" if cfg.train.steps == done else "went further"
        raise VsinkError(f"--resume: the run in {out} {state} at step {done} (its newest checkpoint) and "
                         f"train.steps={cfg.train.steps} trains nothing more; pass train.steps > {done} to continue "
                         "it (nothing was changed)")


def _check_same_recipe(cfg: Recipe, earlier: dict, out: Path) -> None:
    """A resumed run's recipe against the earlier run's config.yaml (see :data:`RESUME_MAY_CHANGE`)."""
    changed = []
    for key in RECIPE:
        section, _, leaf = key.rpartition(".")
        holder = earlier.get(section) if section else earlier
        if key in RESUME_MAY_CHANGE or not isinstance(holder, dict) or leaf not in holder:
            continue
        before, now = holder[leaf], cfg.value(key)
        if before != now:
            changed.append(f"{key}={before!r}, this recipe has {now!r}")
    if changed:
        raise VsinkError(f"--resume: the run in {out} was made with {'; '.join(changed)}; a resumed run keeps its "
                         f"recipe, only {', '.join(RESUME_MAY_CHANGE)} may change: repeat the earlier values "
                         f"(see {out / 'config.yaml'}) or choose another output directory")


def run_finetune(cfg: Union[Recipe, Mapping[str, Any]], *, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Run a recipe (see :func:`vsink.train.config.load_config`); returns the summary, also
    written to ``<out>/summary.json`` with the resolved recipe in ``<out>/config.yaml``.

    ``cfg`` is a :class:`~vsink.train.config.Recipe` or a nested mapping of recipe keys (as in a
    recipe YAML, missing keys taking their defaults); either is validated first
    (:meth:`Recipe.from_mapping <vsink.train.config.Recipe.from_mapping>`; a ``Recipe`` through
    its :meth:`~vsink.train.config.Recipe.to_dict`, so one built or changed by hand is checked
    too), raising :class:`~vsink.train.config.ConfigError`. Nothing is written before every check
    has passed (the recipe, the output folder, an earlier run, the model, the memory the recipe
    needs)."""
    from ..outputs import RunLock, clean_stale_temps

    cfg = Recipe.from_mapping(cfg.to_dict() if isinstance(cfg, Recipe) else cfg, where="recipe")
    info, device = init_distributed(cfg.train.device)
    try:
        torch.manual_seed(cfg.seed)
        out = Path(cfg.out)
        _preflight(cfg, out, resume)
        task = _build(cfg, device, progress)
        check_task(task, cfg.train, device)
        if resume:
            check_checkpoint_fits(out / "checkpoints", task.module)
        with RunLock(out, "vsink finetune") if info.main else nullcontext():  # one run writes a folder at a time
            if info.main:
                for folder in (out, out / "checkpoints", out / "final"):
                    clean_stale_temps(folder)
                write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            summary = train(task, cfg.train, out, seed=cfg.seed, device=device, info=info, resume=resume,
                            progress=progress)
            summary["recipe"] = cfg.recipe
            if info.main:
                write_json(out / "summary.json", summary)
                write_text(out / "report.html", finetune_report(out, summary, task))
        barrier(info)  # the other ranks tear the process group down only once the main rank has written
        return summary
    finally:
        shutdown(info)
