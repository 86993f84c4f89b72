"""Data-parallel execution with ``torch.distributed``.

A study launched with ``torchrun --nproc-per-node K -m minidiff run study.toml``
shards the examples into K contiguous blocks (rank r gets block r), runs every
model on its block, then synchronises every :class:`~minidiff.accumulate.Accumulator`
from the reductions its states declare: ``"sum"``/``"max"``/``"min"`` with
``all_reduce``, ``"cat"`` with an ``all_gather`` of variable-length blocks in
rank order, which is example order. Rank 0 then writes exactly what a single
process would. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the
context is a single process and every call is a no-op.

Shifted accumulators. Statistics taken relative to a translation (the CKA
accumulator subtracts a fixed ``shift_a``/``shift_b`` before accumulating, see
:mod:`minidiff.similarity`) only add when every shard used the same shift.
:meth:`DistContext.sync` first re-expresses each rank's sums at the shift of the
lowest rank that has seen data (``align_shift``: exact algebra in float64), then
all-reduces; :meth:`DistContext.common_shift` lets a runner agree on that shift
*before* accumulating, so every rank's float32 GEMMs see the same numbers as a
single process would.

Backends: gloo for CPU tensors, nccl for CUDA tensors (both at once with
``"cpu:gloo,cuda:nccl"`` when CUDA is available, so CPU states and GPU states can
be reduced in one run). A timeout is always set (``timeout_s``, else the
``MINIDIFF_DIST_TIMEOUT`` environment variable, else 300 s) so that a dead or
hung rank makes every other rank raise :class:`DistributedRunError` instead of
hanging.

Layer-pair split. When the cross-model statistics of all layer pairs do not fit
one device, :class:`LayerSplitCKA` gives each rank a contiguous block of model
b's layers; every rank streams *all* samples for its block, and the full CKA
matrix is the concatenation of the ranks' column blocks (the self terms of a
layer need only that layer, so nothing else is exchanged).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from minidiff.accumulate import Accumulator
from minidiff.ops.selfgram import STACKED_MAX_BLOCKS, pending_numel

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

        Accumulators with a translation shift (``shift_a``/``shift_b`` and
        ``align_shift``) are first brought to one common shift on every rank.
        """
        if not self.is_distributed:
            return acc
        if _is_shifted(acc):
            self._align_shifts(acc)
        for name, red in acc.reductions.items():
            setattr(acc, name, self.reduce_tensor(getattr(acc, name), red,
                                                  what=f"synchronising {type(acc).__name__}.{name}"))
        return acc

    def _align_shifts(self, acc: Any) -> None:
        sa, sb = self.common_shift(acc.shift_a if float(acc.n) > 0 else None,
                                   acc.shift_b if float(acc.n) > 0 else None, device=acc.n.device)
        if sa is not None:
            acc.align_shift(sa, sb)

    def common_shift(self, shift_a: torch.Tensor | None, shift_b: torch.Tensor | None = None, *,
                     device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The shifts of the lowest rank that has one (``None`` where it has none),
        broadcast to every rank; ``(None, None)`` when no rank has a shift."""
        if not self.is_distributed:
            return shift_a, shift_b
        has = torch.tensor([0 if shift_a is None else 1], dtype=torch.int64)
        flags = [torch.zeros_like(has) for _ in range(self.world_size)]
        self._collective("agreeing on a common shift", lambda: dist.all_gather(flags, has))
        owners = [r for r, f in enumerate(flags) if int(f.item())]
        if not owners:
            return None, None
        src = owners[0]
        out = []
        for s in (shift_a, shift_b):
            meta = torch.tensor([-1 if s is None else s.numel()], dtype=torch.int64)
            self._collective("agreeing on a common shift", lambda: dist.broadcast(meta, src))
            width = int(meta.item())
            if width < 0:
                out.append(None)
                continue
            buf = (s.detach().to("cpu", torch.float64).clone() if self.rank == src
                   else torch.empty(width, dtype=torch.float64))
            self._collective("agreeing on a common shift", lambda: dist.broadcast(buf, src))
            out.append(buf if device is None else buf.to(device))
        return out[0], out[1]

    def agree_shift(self, acc: Any, first_batch: Callable[[], tuple[Sequence[torch.Tensor],
                                                                   Sequence[torch.Tensor] | None]]) -> None:
        """Give a shifted accumulator one shift on every rank before it accumulates.

        The shift is that of the lowest rank whose accumulator already has one
        (resumed from a cache); if none has, rank 0 calls ``first_batch()`` for the
        layers ``(layers_a, layers_b)`` of the data set's first batch and takes their
        column means rounded to float32, the shift a single process takes from the
        same batch. Every rank's float32 GEMMs then see the numbers a single
        process would, and :meth:`sync` needs no re-alignment.
        """
        if not self.is_distributed or not _is_shifted(acc) or getattr(acc, "estimator", "") == "minibatch":
            return
        sa, sb = self.common_shift(acc.shift_a, acc.shift_b, device=acc.n.device)
        if sa is None:
            mine_a = mine_b = None
            if self.is_main:
                la, lb = first_batch()
                mine_a = torch.cat([t.detach().double().mean(0) for t in la]).float().double()
                mine_b = None if lb is None else torch.cat([t.detach().double().mean(0) for t in lb]).float().double()
            sa, sb = self.common_shift(mine_a, mine_b, device=acc.n.device)
        if acc.shift_a is None or not torch.equal(acc.shift_a, sa) or \
                (sb is not None and not torch.equal(acc.shift_b, sb)):
            acc.align_shift(sa, sb)

    def reduce_tensor(self, t: torch.Tensor, reduce: str, what: str = "reducing a tensor") -> torch.Tensor:
        """Reduce one tensor across ranks by a declared reduction."""
        if not self.is_distributed:
            return t
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


def _is_shifted(acc: Any) -> bool:
    return (callable(getattr(acc, "align_shift", None)) and hasattr(acc, "shift_a")
            and hasattr(acc, "shift_b") and "n" in acc.reductions)


# -- memory of the CKA statistics and splitting the layer-pair matrix across ranks ------
def cka_state_bytes(dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *,
                    float32_inputs: bool = True) -> int:
    """Bytes a :class:`~minidiff.similarity.CKAAccumulator` (exact estimators) holds,
    independent of the number of samples (``CKAAccumulator.nbytes()`` after an update).

    Two models, ``D = sum(d)`` the stacked width and ``L`` the layer count::

        8 * (D_a D_b + sum_a d^2 + sum_b d^2                       # C and the per-layer Grams
             + L_a D_b + L_b D_a + L_a L_b + 3 D_a + 3 D_b + 2 L_a + 2 L_b + 3)
        + 4 * D_a D_b                              # pending float32 sums of C (float32 features)
        + s * (T_a + T_b)                          # pending upper-block Gram sums

    with ``s`` the input's item size (4 for float32, 8 for float64) and ``T`` about
    ``sum d^2 / 2`` (exactly ``minidiff.ops.selfgram.pending_numel``).
    One model with itself (``dims_b=None``): ``8 (D^2 + L D + L^2 + 3 D + L + 3) + 4 T``
    with float32 features, ``T ~ D^2 / 2`` the upper block triangle of ``Z^T Z``
    (``pending_numel([D], STACKED_MAX_BLOCKS)``); float64 features add into ``C`` directly.
    Per update add the shifted stacked batch, ``b (D_a + D_b)`` values of the input dtype.
    """
    da, la = sum(int(d) for d in dims_a), len(dims_a)
    if dims_b is None:
        pending = 4 * pending_numel([da], STACKED_MAX_BLOCKS) if float32_inputs else 0
        return 8 * (da * da + la * da + la * la + 3 * da + la + 3) + pending
    db, lb = sum(int(d) for d in dims_b), len(dims_b)
    big = da * db + sum(int(d) ** 2 for d in dims_a) + sum(int(d) ** 2 for d in dims_b)
    small = la * db + lb * da + la * lb + 3 * da + 3 * db + 2 * la + 2 * lb + 3
    grams = (4 if float32_inputs else 8) * (pending_numel(dims_a) + pending_numel(dims_b))
    return 8 * (big + small) + (4 * da * db if float32_inputs else 0) + grams


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


class LayerSplitCKA:
    """Exact all-layer-pairs linear CKA with model b's layers split across ranks.

    For comparisons whose cross statistics (``sum(d_a) x sum(d_b)`` float64
    values, see the README's memory formula) do not fit one device. Rank r
    keeps the statistics for every layer of model a against its block
    ``layer_blocks(dims_b, world_size)[r]`` of model b's layers and must see
    *every* sample (feed all ranks the same stream); ``compute`` gathers the
    ``(La, |block|)`` column blocks into the full ``(La, Lb)`` matrix on every
    rank. CKA of a layer pair needs only that pair's cross terms and the two
    layers' self terms, so the columns are exactly those of the unsplit matrix.

    Per-rank state: ``8 (D_a D_r + sum_a d^2 + sum_{m in block} d_m^2)`` bytes
    plus small vectors (and 4 bytes per entry of the three matrices for pending
    float32 GEMM sums with float32 features), ``D_r`` the block's total width.
    """

    def __init__(self, dims_a: Sequence[int], dims_b: Sequence[int], ctx: DistContext | None = None, *,
                 estimator: str = "unbiased", device: Any = None, names_a: Sequence[str] | None = None,
                 names_b: Sequence[str] | None = None) -> None:
        from minidiff.similarity import CKAAccumulator  # the accumulator level, imported on use
        self.ctx = ctx or DistContext()
        self.dims_b = [int(d) for d in dims_b]
        self.block = layer_blocks(self.dims_b, self.ctx.world_size)[self.ctx.rank]
        nb = None if names_b is None else [names_b[i] for i in self.block]
        self.acc = CKAAccumulator(dims_a, [self.dims_b[i] for i in self.block], estimator=estimator,
                                  device=device, names_a=names_a, names_b=nb)

    def update(self, batch_a, batch_b) -> None:
        """``batch_b``: the list of all of model b's layers (only this rank's block is
        used) or just this rank's block, in order."""
        if isinstance(batch_b, (list, tuple)) and len(batch_b) == len(self.dims_b) != len(self.block):
            batch_b = [batch_b[i] for i in self.block]
        self.acc.update(batch_a, batch_b)

    def compute(self) -> torch.Tensor:
        """The full ``(La, Lb)`` float64 CKA matrix (on every rank)."""
        return self.ctx.gather_columns(self.acc.compute())


def shutdown() -> None:
    """Leave the default process group cleanly after a successful run (no-op when
    there is none): barrier, then destroy. See :meth:`DistContext.close`."""
    if not dist.is_initialized():
        return
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    if ctx.is_distributed:
        ctx.barrier()
    dist.destroy_process_group()
