"""Triton kernel: per-sample norm and vector terms of streaming linear CKA.

One program handles ``BLOCK_B`` rows of the shifted, stacked layers
``X (b, Dx)`` and ``Y (b, Dy)``. It forms the per-sample per-layer squared
norms ``a_il = ||x_il||^2`` and ``b_im = ||y_im||^2`` in float64, keeps them as
``(BLOCK_B, LP)`` register tiles, and adds its rows' share of every vector term
into float64 outputs with atomics (same packed order as ``minidiff._C``):

``sx, sy`` column sums; ``na, nb`` sums of norms; ``ay = sum_i a_i y_i^T``;
``bx = sum_i b_i x_i^T``; ``ab = sum_i a_i b_i^T``; ``axd[j] = sum_i a_{i,l(j)} x_ij``;
``byd``; ``aa = sum_i a_il^2``; ``bb``.

The large cross-product ``X^T Y`` is not here: it is a cuBLAS GEMM in torch.
On CPU machines this runs under ``TRITON_INTERPRET=1`` (tests, small shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _side_norms(Z, offs, rows, rmask, D, L, SUMS, NSUM, DIAG, SQSQ,
                BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, LP: tl.constexpr):
    """Norms of one side's layers for this program's rows, as a (BLOCK_B, LP)
    float64 tile; also adds the column sums, sum of norms, diagonal-block
    vector term and sum of squared norms of those rows."""
    lidx = tl.arange(0, LP)
    A = tl.zeros((BLOCK_B, LP), dtype=tl.float64)
    for l in range(0, L):
        start = tl.load(offs + l)
        end = tl.load(offs + l + 1)
        acc = tl.zeros((BLOCK_B,), dtype=tl.float64)
        for c in range(start, end, BLOCK_D):
            cols = c + tl.arange(0, BLOCK_D)
            cmask = cols < end
            z = tl.load(Z + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            z = z.to(tl.float64)
            acc += tl.sum(z * z, axis=1)
        for c in range(start, end, BLOCK_D):
            cols = c + tl.arange(0, BLOCK_D)
            cmask = cols < end
            z = tl.load(Z + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            z = z.to(tl.float64)
            tl.atomic_add(SUMS + cols, tl.sum(z, axis=0), mask=cmask)
            tl.atomic_add(DIAG + cols, tl.sum(acc[:, None] * z, axis=0), mask=cmask)
        tl.atomic_add(NSUM + l, tl.sum(acc, axis=0))
        tl.atomic_add(SQSQ + l, tl.sum(acc * acc, axis=0))
        A += tl.where(lidx[None, :] == l, acc[:, None], 0.0)
    return A


@triton.jit
def _column(W, l, LP: tl.constexpr):
    """Column ``l`` of a (BLOCK_B, LP) register tile."""
    lidx = tl.arange(0, LP)
    return tl.sum(tl.where(lidx[None, :] == l, W, 0.0), axis=1)


@triton.jit
def _weighted_colsums(Z, rows, rmask, D, W, OUT, L, BLOCK_D: tl.constexpr, LP: tl.constexpr):
    """OUT[l, :] += sum_i W[i, l] * Z[i, :] for this program's rows (2-D tiles
    only, so register use stays BLOCK_B x BLOCK_D on a GPU)."""
    for c in range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        cmask = cols < D
        z = tl.load(Z + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        z = z.to(tl.float64)
        for l in range(0, L):
            w = _column(W, l, LP)
            tl.atomic_add(OUT + l * D + cols, tl.sum(w[:, None] * z, axis=0), mask=cmask)


@triton.jit
def _cka_terms_kernel(X, Y, OX, OY, B, DX, DY, LX, LY,
                      SX, SY, NA, NB, AY, BX, AB, AXD, BYD, AA, BB,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, LP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    A = _side_norms(X, OX, rows, rmask, DX, LX, SX, NA, AXD, AA, BLOCK_B, BLOCK_D, LP)
    Bn = _side_norms(Y, OY, rows, rmask, DY, LY, SY, NB, BYD, BB, BLOCK_B, BLOCK_D, LP)
    _weighted_colsums(Y, rows, rmask, DY, A, AY, LX, BLOCK_D, LP)
    _weighted_colsums(X, rows, rmask, DX, Bn, BX, LY, BLOCK_D, LP)
    lidx = tl.arange(0, LP)
    for l in range(0, LX):
        a = _column(A, l, LP)
        tl.atomic_add(AB + l * LY + lidx, tl.sum(a[:, None] * Bn, axis=0), mask=lidx < LY)


def cka_batch_terms(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int],
                    block_b: int = 32, block_d: int = 32) -> torch.Tensor:
    """Launch the kernel; inputs already validated (contiguous 2-D float32/float64,
    same rows, offsets from 0 to the widths). Returns one float64 buffer holding
    the terms in the packed order ``sx, sy, na, nb, ay, bx, ab, axd, byd, aa, bb``."""
    b, dx = x.shape
    dy = y.shape[1]
    lx, ly = len(offs_x) - 1, len(offs_y) - 1
    dev = x.device
    sizes = [dx, dy, lx, ly, lx * dy, ly * dx, lx * ly, dx, dy, lx, ly]
    packed = torch.zeros(sum(sizes), dtype=torch.float64, device=dev)
    if b == 0:
        return packed
    out = torch.split(packed, sizes)
    ox = torch.tensor(offs_x, dtype=torch.int64, device=dev)
    oy = torch.tensor(offs_y, dtype=torch.int64, device=dev)
    lp = max(2, triton.next_power_of_2(max(lx, ly)))
    grid = (triton.cdiv(b, block_b),)
    _cka_terms_kernel[grid](x, y, ox, oy, b, dx, dy, lx, ly, *out,
                            BLOCK_B=block_b, BLOCK_D=block_d, LP=lp)
    return packed
