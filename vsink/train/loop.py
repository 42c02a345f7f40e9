"""The training loop shared by the recipes: AdamW with decoupled weight decay (or SGD with
momentum 0.9, ``train.optimizer``; none on registers, embeddings, biases and norms), linear
warm-up then cosine decay, gradient accumulation, mixed precision where the device supports it,
DDP under ``torchrun``, JSONL metrics, atomic checkpoints, ``resume`` and a task's own stopping
rule (:meth:`TrainTask.stop_reason`).

Data order is a pure function of (seed, position in the sample stream): position p of the run
is sample ``perm_e[p mod N]`` of epoch ``e = p // N``, and a global micro-batch holds the
``batch_size × world`` consecutive positions, rank r taking its r-th slice. So a resumed run
sees exactly the samples it would have seen, and 2 processes with batch B see the same samples
as 1 process with batch 2B.
"""

from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..errors import VsinkError
from ..io import append_jsonl, read_jsonl, write_jsonl, write_text
from ..shard import Shard
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import barrier, mean_across



class TrainTask(ABC):
    """What a recipe provides to :func:`train`."""

    #: the module whose weights are trained and checkpointed
    module: nn.Module
    #: samples in one epoch
    num_samples: int

    @abstractmethod
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs to optimise."""

    def no_decay(self) -> list[nn.Parameter]:
        """Matrices among :meth:`trainable` that get no weight decay."""
        return []

    @abstractmethod
    def loss(self, model: nn.Module, samples: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (``model`` is :attr:`module` or its DDP wrapper); ``positions``
        are the samples' places in the stream (for deterministic augmentation)."""

    def evaluate(self) -> dict[str, Any]:
        """Metrics on held-out data, on the main process."""
        return {}

    @abstractmethod
    def finish(self, directory: Path) -> dict[str, Any]:
        """Save the trained model in its library's format; return a summary."""

    def compared_models(self) -> list[tuple[str, Backbone, Callable[[], ContextManager[Any]]]]:
        """Models the run's report scans side by side on :meth:`held_out_images`, as (label,
        backbone, the edits it runs under — a context manager factory); none by default."""
        return []

    def held_out_images(self) -> list[Image.Image]:
        """The evaluation images, as the report scans them."""
        return []

    def stop_reason(self, record: dict[str, Any]) -> Optional[str]:
        """Called with every step's metrics record (in step order; on ``--resume`` first with the
        kept records of the earlier run): a reason to stop before ``train.steps``, or None (the
        default: never)."""
        return None


def sample_order(num_samples: int, seed: int, positions: Sequence[int]) -> list[int]:
    """Sample index at each stream position (a fresh seeded permutation per epoch)."""
    cache: dict[int, list[int]] = {}
    out = []
    for p in positions:
        epoch = p // num_samples
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(num_samples, generator=g).tolist()
        out.append(cache[epoch][p % num_samples])
    return out


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def no_decay_parameters(backbone: Backbone) -> list[nn.Parameter]:
    """Registers, class tokens and position embeddings (from the adapter's parameter roles)."""
    roles = backbone.parameter_roles()
    return roles["registers"] + roles["cls_token"] + roles["pos_embed"]


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay: Sequence[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """Weight decay on matrices only: none on ``no_decay`` (see :func:`no_decay_parameters`),
    biases and norms (parameters of at most one dimension)."""
    skip = {id(p) for p in no_decay}
    decay = [p for _, p in named if p.ndim > 1 and id(p) not in skip]
    rest = [p for _, p in named if p.ndim <= 1 or id(p) in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (betas 0.9, 0.999) or SGD with momentum 0.9; weight decay per group."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for the ``train.amp`` setting on this device (None: full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if amp == "fp16" and device.type != "cuda":
        raise VsinkError("train.amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def check_task(task: TrainTask, settings: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """What :func:`train` refuses before it starts (nothing unlocked, an AMP setting the device
    cannot run), so callers can check before writing anything; returns the autocast dtype."""
    if not task.trainable():
        raise VsinkError("nothing to train: no parameter is unlocked")
    return resolve_amp(settings.amp, device)


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keep only the metric lines of steps <= ``upto`` (after a resume)."""
    if path.is_file():
        write_jsonl(path, [r for r in read_jsonl(path, cut_last_line=True) if r.get("step", 0) <= upto])


def train(task: TrainTask, settings: TrainConfig, out: Path, *, seed: int, device: torch.device,
          info: Shard = Shard(), resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the loop with the ``train`` section of a recipe; returns the summary (also written to
    ``out/summary.json`` by the caller)."""
    from torch.nn.parallel import DistributedDataParallel

    s = settings
    steps, accum, batch = s.steps, s.grad_accum, s.batch_size
    ckpt_dir, metrics_path = out / "checkpoints", out / "metrics.jsonl"
    amp = check_task(task, s, device)
    named = task.trainable()
    optimizer = make_optimizer(s.optimizer, param_groups(named, s.weight_decay, task.no_decay()), s.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, steps, s.warmup_steps, s.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    start = 0
    existing = list_checkpoints(ckpt_dir)
    if resume and existing:
        start = load_checkpoint(existing[-1], task.module, optimizer, scheduler, scaler)
        if info.main:
            print(f"vsink: resumed from {existing[-1]} (step {start})", file=sys.stderr)
            _rewrite_metrics(metrics_path, start)
    elif existing and not resume:
        raise VsinkError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                         "or choose another output directory")
    elif info.main:
        if resume:
            print(f"vsink: no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)
        write_text(metrics_path, "")
    barrier(info)
    stopped: Optional[str] = None
    if start and metrics_path.is_file():  # the earlier run's records, for a task's stopping rule
        for r in read_jsonl(metrics_path, cut_last_line=True):
            if r.get("step", 0) >= 1:
                stopped = task.stop_reason(r) or stopped
    model: nn.Module = task.module
    if info.world > 1:
        model = DistributedDataParallel(task.module, device_ids=[device.index] if device.type == "cuda" else None)
    global_batch = batch * info.world
    bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", disable=not (progress and info.main))
    last_eval: dict[str, Any] = {}
    if start == 0 and info.main:  # the starting point, for comparison
        append_jsonl(metrics_path, [{"step": 0, **{f"eval/{k}": v for k, v in task.evaluate().items()}}])
    t0, images, done = time.perf_counter(), 0, start
    for step in range(start, steps if stopped is None else start):
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(accum):
            first = (step * accum + micro) * global_batch + info.rank * batch
            positions = list(range(first, first + batch))
            samples = sample_order(task.num_samples, seed, positions)
            sync = nullcontext() if info.world == 1 or micro == accum - 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    loss, metrics = task.loss(model, samples, positions)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        images += global_batch * accum
        record = {"step": step + 1, "lr": lr, **mean_across(totals, info)}
        done = step + 1
        stopped = task.stop_reason(record)
        if done % s.eval_every == 0 or done == steps or stopped:
            if info.main:
                last_eval = task.evaluate()
                record.update({f"eval/{k}": v for k, v in last_eval.items()})
            barrier(info)
        if info.main:
            append_jsonl(metrics_path, [record])
            bar.update(1)
            if done % s.log_every == 0:
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.2e}")
        if done % s.checkpoint_every == 0 or done == steps or stopped:
            if info.main:
                save_checkpoint(ckpt_dir, done, task.module, optimizer, scheduler, scaler, s.keep_checkpoints)
            barrier(info)
        if stopped:
            break
    bar.close()
    if stopped and done == start and info.main:  # stopped by the earlier run's records: nothing trained
        last_eval = task.evaluate()
    elapsed = time.perf_counter() - t0
    summary: dict[str, Any] = {"steps": steps, "steps_done": done, "stopped_early": stopped,
                               "resumed_from": start, "world_size": info.world,
                               "images_per_s": images / elapsed if elapsed > 0 and images else None,
                               "amp": str(amp).removeprefix("torch.") if amp else None, "final_eval": last_eval}
    if info.main:
        summary.update(task.finish(out / "final"))
    barrier(info)
    return summary
