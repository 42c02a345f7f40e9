"""Work split over the processes ``torchrun`` starts (one per device), with results identical to
one process.

``torchrun --nproc-per-node N -m vsink scan ...`` starts N processes with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; :func:`join` reads them and joins the process group (gloo on CPU; gloo for
objects and NCCL for CUDA tensors when CUDA is present). The items of a run are cut into batches
exactly as one process cuts them (``batch_size`` consecutive items), and batch ``b`` goes to the
process of global rank ``b % N``: every batch a model sees holds the same items as in a
one-process run, so its numbers are the same, and rank 0 puts the batches back in their order
before anything pools over items (thresholds, gap tests, probes, scores). Rank 0 alone writes the
outputs; with ``WORLD_SIZE`` unset or 1 nothing here does anything.

A rank's work between two collectives goes through :meth:`Shard.settle`: an error on any rank
(say on the batches dealt to rank 1 alone) reaches every rank at the next collective, so every
rank stops there (rank 0 with one line naming the rank and the cause) instead of waiting for a
rank that left. What a rank wrote before it stopped (its rows of a resumable run) stays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from .errors import VsinkError

T = TypeVar("T")

#: how long a process waits for the others at a collective (rank 0 may score or write meanwhile)
TIMEOUT = timedelta(hours=2)


class OtherRankFailed(VsinkError):
    """Raised on every rank when the work rank 0 did for all of them failed, and on every rank but
    rank 0 when a rank's own work failed (:meth:`Shard.settle`); rank 0 has printed why (the
    command line prints nothing more for it)."""


class RankFailed(VsinkError):
    """Raised on rank 0 when the work of a rank failed (:meth:`Shard.settle`): ``rank`` and the
    cause (``reason``, one line), the message ``rank R: reason``."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"rank {rank}: {reason}")
        self.rank, self.reason = rank, reason


def _reason(error: Exception) -> tuple[str, bool]:
    """One line saying why ``error`` stopped a rank, and whether that line says all of it (a
    :class:`VsinkError`, a full disk) or the error is a fault whose traceback its rank prints."""
    if isinstance(error, VsinkError):
        return str(error), True
    if isinstance(error, OSError):
        from .outputs import space_error

        full = space_error(error)
        if full is not None:
            return full, True
    return " ".join(f"{type(error).__name__}: {error}".split()), False


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes (``rank`` 0 .. world-1, ``local_rank`` on
    its node). ``Shard()`` is one process alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that gathers, pools and writes."""
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.world == 1

    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` (0, 1, ... in the run's order) is this process's."""
        return batch % self.world == self.rank

    def batches(self, total: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
        """``(batch number, start, stop)`` of this process's batches of ``total`` items cut into
        ``batch_size`` consecutive items, in order."""
        for b, start in enumerate(range(0, total, batch_size)):
            if self.owns(b):
                yield b, start, min(start + batch_size, total)

    def rounds(self, total: int, batch_size: int) -> Iterator[tuple[int, Optional[tuple[int, int]]]]:
        """One step per round of ``world`` batches: ``(batch number, (start, stop))`` of this
        process's batch in the round, ``(batch number, None)`` in the last round when it has none.
        Every process takes the same number of steps (for a collective per round)."""
        count = -(-total // batch_size) if total else 0
        for first in range(0, count, self.world):
            b = first + self.rank
            yield b, ((b * batch_size, min((b + 1) * batch_size, total)) if b < count else None)

    def gather(self, obj: T) -> Optional[list[T]]:
        """Every rank's ``obj`` on rank 0, in rank order (``None`` on the other ranks); ``[obj]``
        alone. Objects are pickled (``torch.distributed.gather_object``)."""
        if self.alone:
            return [obj]
        import torch.distributed as dist

        out: Optional[list[Any]] = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.alone:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if not self.alone:
            import torch.distributed as dist

            dist.barrier()

    def settle(self, work: Callable[[], T]) -> Optional[list[T]]:
        """Run ``work`` on every rank, then gather its result on rank 0 (:meth:`gather`); if it
        raised on any rank, every rank stops here: rank 0 raises :class:`RankFailed` naming the
        first rank that failed (in rank order) and why, the others :class:`OtherRankFailed`, but
        a rank whose error is a fault (not a :class:`VsinkError` nor a full disk) raises it as it
        is, for its traceback. Alone: ``[work()]``, its errors as they are."""
        if self.alone:
            return [work()]
        import torch.distributed as dist

        result: Optional[T] = None
        failure: Optional[str] = None
        error: Optional[Exception] = None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - every rank must reach the collective below
            error = e
            failure, said = _reason(e)
            if said:
                error = None
        failures: list[Optional[str]] = [None] * self.world
        dist.all_gather_object(failures, failure)
        failed = [(rank, why) for rank, why in enumerate(failures) if why is not None]
        if failed:
            if error is not None:
                raise error
            if self.main:
                raise RankFailed(*failed[0]) from None
            raise OtherRankFailed(f"rank {failed[0][0]}: {failed[0][1]}")
        return self.gather(result)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only, the others waiting, and return its result on every rank
        (pickled to the others); its :class:`VsinkError` stops every rank (:class:`OtherRankFailed`
        on the others)."""
        if self.alone:
            return fn()
        error: Optional[str] = None
        result: Optional[T] = None
        if self.main:
            try:
                result = fn()
            except VsinkError as e:
                self.broadcast((str(e), None))
                raise
            except BaseException:
                self.broadcast(("rank 0 failed", None))
                raise
        error, result = self.broadcast((error, result))
        if error is not None:
            raise OtherRankFailed(f"rank 0: {error}")
        return result

    def device(self, device: Union[None, str]) -> Union[None, str]:
        """The device this process uses for ``--device`` ``device``: under torchrun, ``auto`` and
        ``cuda`` (without an index) mean ``cuda:LOCAL_RANK`` when CUDA is present."""
        if self.alone or device not in (None, "auto", "cuda"):
            return device
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def rank_file(self, path: Union[str, os.PathLike], rank: Optional[int] = None) -> Path:
        """This rank's (or ``rank``'s) own file beside ``path``: ``answers.jsonl`` → ``answers.rank1.jsonl``."""
        path = Path(path)
        return path.with_name(f"{path.stem}.rank{self.rank if rank is None else rank}{path.suffix}")


def from_env() -> Shard:
    """The shard ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process
    when ``WORLD_SIZE`` is unset); values that are not integers in range are a one-line error."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise VsinkError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise VsinkError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
    return Shard(rank, world, local)


def join() -> Shard:
    """:func:`from_env`, joining the process group when there is more than one process (once;
    gloo, plus NCCL for CUDA tensors when CUDA is present)."""
    shard = from_env()
    if shard.alone:
        return shard
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return shard


def leave() -> None:
    """Leave the process group (if one was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["OtherRankFailed", "RankFailed", "Shard", "TIMEOUT", "from_env", "join", "leave"]
