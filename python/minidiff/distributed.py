"""Data-parallel execution with ``torch.distributed``.

A study launched with ``torchrun --nproc-per-node K -m minidiff run study.toml``
shards the examples into K contiguous blocks (rank r gets block r), runs every
model on its block, then synchronises every :class:`~minidiff.accumulate.Accumulator`
from the reductions its states declare: ``"sum"``/``"max"``/``"min"`` with
``all_reduce``, ``"cat"`` with an ``all_gather`` of variable-length blocks in
rank order, which is example order. Rank 0 then writes exactly what a single
process would. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the
context is a single process and every call is a no-op.

Backends: gloo for CPU tensors, nccl for CUDA tensors. A timeout is always set so
that a dead rank makes every other rank fail instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minidiff.accumulate import Accumulator

DEFAULT_TIMEOUT_S = 300.0


class DistributedRunError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the
    network between ranks broke. Every surviving rank raises this."""


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> "DistContext":
        """Join the process group torchrun describes in the environment, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), initialized_here=True)

    def shard_range(self, num_examples: int) -> tuple[int, int]:
        """Contiguous block ``[start, stop)`` of examples for this rank.

        The first ``num_examples % world_size`` ranks get one extra example, so
        uneven datasets are covered exactly once.
        """
        base, extra = divmod(num_examples, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        return start, stop

    def sync(self, acc: Accumulator) -> Accumulator:
        """Reduce ``acc``'s states across ranks in place (every rank gets the result)."""
        if not self.is_distributed:
            return acc
        for name, red in acc.reductions.items():
            try:
                setattr(acc, name, self.reduce_tensor(getattr(acc, name), red))
            except DistributedRunError:
                raise
            except RuntimeError as exc:
                raise self._failure(f"synchronising {type(acc).__name__}.{name}", exc) from exc
        return acc

    def _failure(self, what: str, exc: BaseException) -> DistributedRunError:
        return DistributedRunError(
            f"rank {self.rank}/{self.world_size}: {what} failed: another rank died, hung past the "
            f"timeout, or the connection broke ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}). "
            "Check the other ranks' logs; a rerun resumes from the per-shard cache."
        )

    def reduce_tensor(self, t: torch.Tensor, reduce: str) -> torch.Tensor:
        """Reduce one tensor across ranks by a declared reduction."""
        if not self.is_distributed:
            return t
        if reduce == "cat":
            return self.gather_in_order(t)
        op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[reduce]
        out = t.clone()
        dist.all_reduce(out, op=op)
        return out

    def gather_in_order(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's block along dim 0, in rank (= example) order."""
        if not self.is_distributed:
            return t
        n_local = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n_local) for _ in range(self.world_size)]
        dist.all_gather(sizes, n_local)
        sizes_i = [int(s.item()) for s in sizes]
        max_n = max(sizes_i)
        padded = torch.zeros((max_n, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        bufs = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(bufs, padded)
        return torch.cat([b[:n] for b, n in zip(bufs, sizes_i)], dim=0)

    def barrier(self) -> None:
        if self.is_distributed:
            try:
                dist.barrier()
            except RuntimeError as exc:
                raise self._failure("barrier", exc) from exc

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
