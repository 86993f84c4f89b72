"""Triton kernels for the prediction agreement counts.

``pair_counts``: for predictions ``P (N, M)`` (int32/int64 class indices) and
optional labels ``y (M,)``, every program owns a ``BLOCK_I x BLOCK_J`` tile of
model pairs and a strided share of the examples, and counts

    disagree[i, j]   = #{x : p_i(x) != p_j(x)}
    both_right[i, j] = #{x : p_i(x) == y(x) and p_j(x) == y(x)}

by broadcasting a ``(BLOCK_I, 1, BLOCK_M)`` against a ``(1, BLOCK_J, BLOCK_M)``
tile and summing over examples. Each program writes its own int32 partial
(no atomics, so the result is deterministic); the caller sums the partials in
int64. The cost is N^2 M compares, independent of the number of classes.

``label_histogram``: ``H[x, c] = #{k : P[k, x] == c}`` for a population of K
models, one ``BLOCK_M x BLOCK_C`` tile per program.

Inputs are validated by ``minidiff.ops.agreement`` (contiguous, int32/int64,
values in range); these functions only launch. Under ``TRITON_INTERPRET=1``
they run on CPU tensors (tests), with tiles of 32.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from minidiff._env import triton_interpreting

_INTERPRET = triton_interpreting()


@triton.jit
def _pair_counts_kernel(P, L, D, R, N, M,
                        HAS_LABELS: tl.constexpr, BLOCK_I: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_m = tl.num_programs(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < N
    mask_j = offs_j < N
    row_i = offs_i.to(tl.int64) * M
    row_j = offs_j.to(tl.int64) * M
    acc_d = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.int32)
    acc_r = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.int32)
    for start in range(pid_m * BLOCK_M, M, n_m * BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # Padding examples load 0 for both models (equal: no disagreement) and
        # label -1 (never right), so they never count.
        a = tl.load(P + row_i[:, None] + offs_m[None, :],
                    mask=mask_i[:, None] & mask_m[None, :], other=0)
        b = tl.load(P + row_j[:, None] + offs_m[None, :],
                    mask=mask_j[:, None] & mask_m[None, :], other=0)
        acc_d += tl.sum((a[:, None, :] != b[None, :, :]).to(tl.int32), axis=2)
        if HAS_LABELS:
            y = tl.load(L + offs_m, mask=mask_m, other=-1)
            ra = (a == y[None, :]).to(tl.int32)
            rb = (b == y[None, :]).to(tl.int32)
            acc_r += tl.sum(ra[:, None, :] * rb[None, :, :], axis=2)
    out = pid_m.to(tl.int64) * N * N + offs_i[:, None] * N + offs_j[None, :]
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(D + out, acc_d, mask=mask)
    if HAS_LABELS:
        tl.store(R + out, acc_r, mask=mask)


@triton.jit
def _label_histogram_kernel(P, H, K, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    ptrs = P + offs_m  # advanced by M per row: pointer arithmetic is 64-bit, k * M may not fit int32
    for _ in range(K):
        p = tl.load(ptrs, mask=mask_m, other=-1)
        acc += (p[:, None] == offs_c[None, :]).to(tl.int32)
        ptrs += M
    out = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(H + out, acc, mask=mask_m[:, None] & mask_c[None, :])


def _config() -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_J, BLOCK_M, num_warps). The interpreter wants tiles >= 32;
    on a GPU a 32 x 32 x 16 tile keeps the broadcast at 16K elements per step."""
    if _INTERPRET:
        return 32, 32, 32, 4
    return 32, 32, 16, 4


def pair_counts(preds: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (N, N) ``disagree`` and ``both_right`` (zeros without labels) for a
    contiguous int32/int64 ``preds (N, M)`` with M < 2**31."""
    n, m = preds.shape
    bi, bj, bm, warps = _config()
    tiles = triton.cdiv(n, bi) * triton.cdiv(n, bj)
    if preds.is_cuda:
        sms = torch.cuda.get_device_properties(preds.device).multi_processor_count
        target = 4 * sms
    else:
        target = 2  # interpreter: programs run one after another
    n_m = max(1, min(triton.cdiv(m, bm), triton.cdiv(target, tiles)))
    d = torch.empty((n_m, n, n), dtype=torch.int32, device=preds.device)
    has_labels = labels is not None
    r = torch.empty((n_m, n, n), dtype=torch.int32, device=preds.device) if has_labels else d
    _pair_counts_kernel[(triton.cdiv(n, bi), triton.cdiv(n, bj), n_m)](
        preds, labels if has_labels else preds, d, r, n, m,
        HAS_LABELS=has_labels, BLOCK_I=bi, BLOCK_J=bj, BLOCK_M=bm, num_warps=warps)
    disagree = d.sum(0, dtype=torch.int64)
    both_right = r.sum(0, dtype=torch.int64) if has_labels else torch.zeros_like(disagree)
    return disagree, both_right


def label_histogram(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int32 ``(M, C)`` label counts over the K rows of a contiguous ``preds (K, M)``."""
    k, m = preds.shape
    block_m, block_c = 32, 32
    h = torch.empty((m, num_classes), dtype=torch.int32, device=preds.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(num_classes, block_c))
    _label_histogram_kernel[grid](preds, h, k, m, num_classes, BLOCK_M=block_m, BLOCK_C=block_c)
    return h
