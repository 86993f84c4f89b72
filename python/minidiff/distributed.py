"""Data-parallel execution with ``torch.distributed``.

A study launched with ``torchrun --nproc-per-node K -m minidiff run study.toml``
shards the examples into K contiguous blocks (rank r gets block r), runs every
model on its block, then synchronises every :class:`~minidiff.accumulate.Accumulator`
from the reductions its states declare: ``"sum"``/``"max"``/``"min"`` with
``all_reduce``, ``"cat"`` with an ``all_gather`` of variable-length blocks in
rank order, which is example order, and a callable reduction applied to every
rank's state stacked in rank order. Rank 0 then writes exactly what a single
process would. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the
context is a single process and every call is a no-op.

Accumulators that need more than a reduction (the CKA statistics are sums taken
relative to a per-rank translation) do it in their own ``_pre_sync`` /
``_post_sync`` hooks with the generic collectives here (:meth:`DistContext.broadcast_first`);
:meth:`DistContext.prepare` lets them agree on such a frame before accumulating.
This module knows no accumulator class.

Backends: gloo for CPU tensors, nccl for CUDA tensors (both at once with
``"cpu:gloo,cuda:nccl"`` when CUDA is available, so CPU states and GPU states can
be reduced in one run). A timeout is always set (``timeout_s``, else the
``MINIDIFF_DIST_TIMEOUT`` environment variable, else 300 s) so that a dead or
hung rank makes every other rank raise :class:`DistributedRunError` instead of
hanging.

:func:`layer_blocks` splits a list of layers into contiguous blocks of
near-equal width, one per rank (``minidiff.similarity.LayerSplitCKA`` uses it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from minidiff.accumulate import Accumulator

DEFAULT_TIMEOUT_S = 300.0
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
TIMEOUT_ENV = "MINIDIFF_DIST_TIMEOUT"


class DistributedRunError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the
    network between ranks broke. Every surviving rank raises this."""


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not t > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return t


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
    def from_env(cls, timeout_s: float | None = None, backend: str | None = None) -> "DistContext":
        """Join the process group torchrun describes in the environment, if any.

        Parameters
        ----------
        timeout_s : seconds any collective may wait for the other ranks before
            every rank fails (default: ``MINIDIFF_DIST_TIMEOUT`` or 300).
        backend : default ``"cpu:gloo,cuda:nccl"`` with CUDA (the rank's GPU is
            ``LOCAL_RANK``), ``"gloo"`` without.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        if timeout_s is None:
            timeout_s = _timeout_from_env()
        if backend is None:
            if torch.cuda.is_available():
                backend = "cpu:gloo,cuda:nccl"
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            else:
                backend = "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:  # rendezvous failed or timed out
            raise DistributedRunError(
                f"rank {os.environ.get('RANK', '?')}/{world}: joining the process group at "
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} failed "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), initialized_here=True)

    # -- sharding -----------------------------------------------------------------
    def shard_range(self, num_examples: int, align: int = 1) -> tuple[int, int]:
        """Contiguous block ``[start, stop)`` of examples for this rank.

        The examples are cut into units of ``align`` (the last may be short) and
        the first ``units % world_size`` ranks get one extra unit, so uneven
        datasets are covered exactly once. With ``align`` = a runner's chunk size,
        every shard boundary is a chunk boundary of the single-process run: each
        rank then processes exactly the batches a single process would.
        """
        if align < 1:
            raise ValueError(f"align must be a positive number of examples, got {align}")
        units = -(-num_examples // align)
        base, extra = divmod(units, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        return min(start * align, num_examples), min(stop * align, num_examples)

    # -- accumulators -------------------------------------------------------------
    def sync(self, acc: Accumulator) -> Accumulator:
        """Reduce ``acc``'s states across ranks in place (every rank gets the result).

        Generic over accumulators: ``acc._pre_sync(self)``, then every state by the
        reduction it declares (:attr:`Accumulator.reductions`), then ``acc._post_sync(self)``.
        """
        if not self.is_distributed:
            return acc
        acc._pre_sync(self)
        for name, red in acc.reductions.items():
            setattr(acc, name, self.reduce_tensor(getattr(acc, name), red,
                                                  what=f"synchronising {type(acc).__name__}.{name}"))
        acc._post_sync(self)
        return acc

    def prepare(self, acc: Accumulator, first_batch: Callable[[], Any]) -> None:
        """Let ``acc`` agree with the other ranks on anything its states are taken
        relative to, before it accumulates (``acc._agree_before_update``): e.g. the
        CKA statistics take one common shift, so every rank's float32 GEMMs see the
        numbers a single process would. ``first_batch()`` gives the data set's first
        batch; an accumulator calls it on one rank at most. No-op in one process."""
        if self.is_distributed:
            acc._agree_before_update(self, first_batch)

    agree_shift = prepare  # the name the study runner uses

    def broadcast_first(self, *tensors: torch.Tensor | None, device: torch.device | str | None = None
                        ) -> tuple[torch.Tensor | None, ...]:
        """The tensors of the lowest rank that passes any (as float64; ``None`` where
        that rank passed ``None``), broadcast to every rank; all ``None`` when no rank
        has any. In one process: the tensors as given."""
        if not self.is_distributed:
            return tensors
        has = torch.tensor([0 if all(t is None for t in tensors) else 1], dtype=torch.int64)
        flags = [torch.zeros_like(has) for _ in range(self.world_size)]
        what = "broadcasting the first rank's tensors"
        self._collective(what, lambda: dist.all_gather(flags, has))
        owners = [r for r, f in enumerate(flags) if int(f.item())]
        if not owners:
            return tuple(None for _ in tensors)
        src = owners[0]
        out = []
        for s in tensors:
            meta = torch.tensor([-1 if s is None else s.numel()], dtype=torch.int64)
            self._collective(what, lambda: dist.broadcast(meta, src))
            width = int(meta.item())
            if width < 0:
                out.append(None)
                continue
            buf = (s.detach().to("cpu", torch.float64).reshape(-1).clone() if self.rank == src
                   else torch.empty(width, dtype=torch.float64))
            self._collective(what, lambda: dist.broadcast(buf, src))
            out.append(buf if device is None else buf.to(device))
        return tuple(out)

    def reduce_tensor(self, t: torch.Tensor, reduce: str, what: str = "reducing a tensor") -> torch.Tensor:
        """Reduce one tensor across ranks by a declared reduction."""
        if not self.is_distributed:
            return t
        if callable(reduce):
            # every rank's state, stacked in rank order, reduced by the declared function
            return reduce(self.gather_in_order(t.unsqueeze(0), what=what))
        if reduce == "cat":
            return self.gather_in_order(t, what=what)
        op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[reduce]
        out = t.clone()
        self._collective(what, lambda: dist.all_reduce(out, op=op))
        return out

    def gather_in_order(self, t: torch.Tensor, what: str = "gathering per-example outputs") -> torch.Tensor:
        """Concatenate every rank's block along dim 0, in rank (= example) order.

        A rank with no rows may pass any empty tensor: the trailing shape and
        dtype are taken from the ranks that have rows.
        """
        if not self.is_distributed:
            return t
        # metadata as one int64 tensor per rank (no pickled objects: works on nccl too):
        # [rows, ndim-1, dtype code, trailing shape padded to _MAX_DIMS]
        mine = torch.full((3 + _MAX_DIMS,), -1, dtype=torch.int64, device=t.device)
        rows = int(t.shape[0]) if t.ndim else 0
        if rows and t.ndim - 1 > _MAX_DIMS:
            raise ValueError(f"{what}: blocks with more than {_MAX_DIMS + 1} dimensions are not supported")
        mine[0], mine[1] = rows, max(t.ndim - 1, 0)
        mine[2] = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -2
        for i, s in enumerate(t.shape[1:][:_MAX_DIMS]):
            mine[3 + i] = int(s)
        metas = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(metas, mine))
        meta = [tuple(int(v) for v in m.cpu()) for m in metas]
        full = [m for m in meta if m[0] > 0]
        if not full:
            return t
        if full[0][2] < 0:
            raise ValueError(f"{what}: dtype {t.dtype} cannot be gathered; use one of {_DTYPES}")
        if any(m[1:] != full[0][1:] for m in full):
            raise ValueError(f"{what}: ranks hold blocks of different trailing shapes or dtypes; "
                             "every rank must produce the same per-example layout")
        trail, dtype = full[0][3:3 + full[0][1]], _DTYPES[full[0][2]]
        sizes = [m[0] for m in meta]
        max_n = max(sizes)
        padded = torch.zeros((max_n, *trail), dtype=dtype, device=t.device)
        if sizes[self.rank]:
            padded[: sizes[self.rank]] = t
        bufs = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(bufs, padded))
        return torch.cat([b[:n] for b, n in zip(bufs, sizes)], dim=0)

    def gather_columns(self, block: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``(rows, w_r)`` column block along dim 1, in rank order."""
        if not self.is_distributed:
            return block
        return self.gather_in_order(block.T.contiguous(), what="gathering column blocks").T.contiguous()

    def barrier(self) -> None:
        if self.is_distributed:
            self._collective("barrier", dist.barrier)

    def close(self) -> None:
        """Leave the process group. A barrier first, so that rank 0 (which hosts the
        rendezvous store) cannot tear the group down while another rank is still using
        it; without it a late rank can abort with ``terminate called without an active
        exception``."""
        if self.initialized_here:
            shutdown()

    # -- failures -----------------------------------------------------------------
    def _collective(self, what: str, fn) -> Any:
        try:
            return fn()
        except DistributedRunError:
            raise
        except (RuntimeError, ConnectionError, OSError) as exc:  # gloo/nccl errors, timeouts, broken sockets
            raise self._failure(what, exc) from exc

    def _failure(self, what: str, exc: BaseException) -> DistributedRunError:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return DistributedRunError(
            f"rank {self.rank}/{self.world_size}: {what} failed: another rank died, hung past the "
            f"timeout, or the connection broke ({exc.__class__.__name__}: {first}). "
            "Check the other ranks' logs; a rerun resumes from the per-shard cache."
        )


def layer_blocks(dims: Sequence[int], parts: int) -> list[list[int]]:
    """Split layer indices ``0..L-1`` into ``parts`` contiguous, non-empty blocks of
    near-equal total width (block r ends where the running width first reaches
    ``(r + 1) / parts`` of the total)."""
    dims = [int(d) for d in dims]
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if parts > len(dims):
        raise ValueError(f"cannot split {len(dims)} layers into {parts} blocks; use at most one rank per layer")
    total, blocks, cur, run = sum(dims), [], [], 0
    for i, d in enumerate(dims):
        cur.append(i)
        run += d
        left_layers, left_blocks = len(dims) - i - 1, parts - len(blocks) - 1
        if left_blocks and (run * parts >= (len(blocks) + 1) * total or left_layers == left_blocks):
            blocks.append(cur)
            cur = []
    blocks.append(cur)
    return blocks


def shutdown() -> None:
    """Leave the default process group cleanly after a successful run (no-op when
    there is none): barrier, then destroy. See :meth:`DistContext.close`."""
    if not dist.is_initialized():
        return
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    if ctx.is_distributed:
        ctx.barrier()
    dist.destroy_process_group()


_MOVED = {"cka_state_bytes": "minidiff.similarity.memory", "LayerSplitCKA": "minidiff.similarity.split"}


def __getattr__(name: str) -> Any:
    # the CKA-specific helpers live in minidiff.similarity; old imports keep working
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'minidiff.distributed' has no attribute {name!r}")
