"""``torchrun`` / ``torch.distributed`` setup: one process per device, gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import VsinkError
from ..shard import Shard, from_env


def init_distributed(device: str) -> tuple[Shard, torch.device]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), or run alone.

    Returns the rank info and this process's device (``cuda:LOCAL_RANK`` under CUDA).
    """
    info = from_env()
    if info.alone:
        return info, torch.device(device)
    local = info.local_rank
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise VsinkError("train.device is cuda but no CUDA device is available")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info, torch.device(f"cuda:{local}" if cuda else device)


def mean_across(values: dict[str, float], info: Shard) -> dict[str, float]:
    """Average scalar metrics over processes (identity when alone)."""
    if info.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist())}


def barrier(info: Shard) -> None:
    if info.world > 1:
        dist.barrier()


def shutdown(info: Shard) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
