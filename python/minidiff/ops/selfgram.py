"""Per-layer self Grams ``G_l = X_l^T X_l`` summed over batches, upper block triangle only.

The unbiased HSIC(K_l, K_l) of the streaming CKA accumulator needs every layer's
``G_l = sum_i x_il x_il^T`` (``minidiff.similarity``). ``G_l`` is symmetric, so a
plain GEMM spends half its flops on a mirror image. BLAS has the symmetric
rank-k update (``?syrk``) for this, but torch exposes none (CPU or CUDA), so the
same saving is had from ordinary batched GEMMs on column blocks: split the
``d`` columns of ``X_l`` into ``k`` blocks ``X_l = [B_1 .. B_k]`` and compute only
``B_i^T B_j`` for ``i <= j``: ``(k + 1) / (2k)`` of the full flops (3/4 at k = 2,
5/8 at k = 4). The lower blocks are mirrored in when the partial sums are folded
into the float64 state, which happens once per ``FLUSH_SAMPLES`` samples, not per
batch.

Block widths near 192 columns: on the development CPU (MKL, Zen4) blocks of
128-256 columns with K = 4096 rows ran at 86-92 % of the full GEMM's flop rate, so
13 layers x 768 took 0.73x the time of the full Grams with k = 4 (ideal 0.63x)
and 7 x 384 took 0.82x with k = 2 (ideal 0.75x); narrower blocks lose more to
per-call overhead than they save. Consecutive layers of equal width form one
run and every block pair is one ``baddbmm`` over the run's layers (strided views
of the stacked batch, no copy), so 13 layers x 768 cost 10 calls per batch.

The same class serves the cross-product ``Z^T Z`` of a model compared with itself:
the whole stacked width is one "layer" with up to ``STACKED_MAX_BLOCKS`` blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch

BLOCK = 192       # target block width (columns)
MAX_BLOCKS = 8    # cap on blocks per layer: k (k + 1) / 2 calls per run of layers
STACKED_MAX_BLOCKS = 16  # cap for a model's whole stacked width (Z^T Z of a model with itself)


def block_edges(d: int, max_blocks: int = MAX_BLOCKS) -> list[int]:
    """Column boundaries of the ``k`` blocks of a width-``d`` layer (``k = 1`` below ~290)."""
    k = min(max_blocks, max(1, round(d / BLOCK)))
    return [d * i // k for i in range(k + 1)]


def runs(dims: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first layer, layer count, width)`` for each run of consecutive equal widths."""
    out: list[tuple[int, int, int]] = []
    for l, d in enumerate(dims):
        if out and out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1] + 1, d)
        else:
            out.append((l, 1, int(d)))
    return out


def _pairs(edges: list[int]) -> list[tuple[int, int]]:
    k = len(edges) - 1
    return [(i, j) for i in range(k) for j in range(i, k)]


def pending_numel(dims: Sequence[int], max_blocks: int = MAX_BLOCKS) -> int:
    """Entries of the partial-sum buffer: ``sum_l sum_{i<=j} w_i w_j`` (about half of
    ``sum_l d_l^2``)."""
    total = 0
    for _, count, d in runs(dims):
        e = block_edges(d, max_blocks)
        total += count * sum((e[i + 1] - e[i]) * (e[j + 1] - e[j]) for i, j in _pairs(e))
    return total


class SelfGrams:
    """Partial sums of the upper Gram blocks of every layer, in one flat buffer.

    Parameters
    ----------
    dims : layer widths, in the order the layers are stacked in ``z``.
    dtype, device : of the partial sums (the GEMMs' input precision).
    max_blocks : cap on the blocks per layer (a model compared with itself passes its
        whole stacked width as one "layer" with a higher cap).
    """

    def __init__(self, dims: Sequence[int], dtype: torch.dtype, device: torch.device,
                 max_blocks: int = MAX_BLOCKS) -> None:
        self.dims = tuple(int(d) for d in dims)
        self.buffer = torch.zeros(pending_numel(self.dims, max_blocks), dtype=dtype, device=device)
        col = [0]
        for d in self.dims:
            col.append(col[-1] + d)
        gram = [0]
        for d in self.dims:
            gram.append(gram[-1] + d * d)
        # (z column offset, gram offset, count, width, [(edge_i, edge_j, view (count, w_i, w_j))])
        self._plan = []
        o = 0
        for first, count, d in runs(self.dims):
            e = block_edges(d, max_blocks)
            blocks = []
            for i, j in _pairs(e):
                wi, wj = e[i + 1] - e[i], e[j + 1] - e[j]
                blocks.append(((e[i], e[i + 1]), (e[j], e[j + 1]),
                               self.buffer[o:o + count * wi * wj].view(count, wi, wj)))
                o += count * wi * wj
            self._plan.append((col[first], gram[first], count, d, blocks))

    def add(self, z: torch.Tensor) -> None:
        """Add the upper blocks of ``X_l^T X_l`` for every layer of the stacked batch ``z``
        (``(b, sum d)``, row-major, any row stride)."""
        b = z.shape[0]
        for c0, _, count, d, blocks in self._plan:
            v = z[:, c0:c0 + count * d].view(b, count, d)
            for (i0, i1), (j0, j1), out in blocks:
                out.baddbmm_(v[:, :, i0:i1].permute(1, 2, 0), v[:, :, j0:j1].transpose(0, 1))

    def fold_into(self, flat: torch.Tensor) -> None:
        """``flat`` (the float64 state: each ``G_l`` as ``d_l^2`` row-major entries, layer
        after layer) += the partial sums, both triangles; then zero the partial sums."""
        for _, g0, count, d, blocks in self._plan:
            G = flat[g0:g0 + count * d * d].view(count, d, d)
            for (i0, i1), (j0, j1), part in blocks:
                G[:, i0:i1, j0:j1] += part
                if i0 != j0:
                    G[:, j0:j1, i0:i1] += part.transpose(1, 2)
        self.buffer.zero_()
