"""Exact all-layer-pairs CKA with model b's layers split across ranks."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from minidiff.distributed import DistContext, layer_blocks
from minidiff.similarity.accumulator import CKAAccumulator


class LayerSplitCKA:
    """Exact all-layer-pairs linear CKA with model b's layers split across ranks.

    For comparisons whose cross statistics (``sum(d_a) x sum(d_b)`` float64
    values, see :func:`~minidiff.similarity.cka_state_bytes`) do not fit one
    device. Rank r keeps the statistics for every layer of model a against its
    block ``layer_blocks(dims_b, world_size)[r]`` of model b's layers and must see
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

    def compute(self, measure: str = "cka") -> torch.Tensor:
        """The full ``(La, Lb)`` float64 matrix of ``measure`` (on every rank)."""
        return self.ctx.gather_columns(self.acc.compute(measure=measure))
