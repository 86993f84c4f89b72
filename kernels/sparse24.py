"""2:4 semi-structured sparse matmul ``Y = X W^T`` in Triton, and the compressed
format it reads.

A weight ``W (N, K)`` (out_features x in_features) is 2:4 sparse when every
group of 4 consecutive elements along K holds at most 2 nonzeros (the pattern
sparse tensor cores accelerate; Mishra et al. 2021, "Accelerating Sparse Deep
Neural Networks"). Compressed format (documented here, used by the Triton and
CUDA kernels alike):

``values (N, K/2)``, W's dtype
    the two kept elements of each group, in increasing position order:
    ``values[n, 2g]`` and ``values[n, 2g + 1]`` belong to group ``g``
    (``W[n, 4g:4g+4]``).
``meta (N, K/16)``, int16
    2-bit positions (0..3 inside the group) of the kept elements. Compressed
    column ``c`` = ``values[n, c]`` has its position in bits ``[2 (c % 8),
    2 (c % 8) + 2)`` of ``meta[n, c // 8]``; so one int16 covers 16 dense
    columns (4 groups), low bits first. Position pairs are always strictly
    increasing (``p0 < p1``); a group with fewer than 2 nonzeros keeps explicit
    zeros at the lowest free positions.

K must be a multiple of 16. The kernel expands a compressed tile to dense in
registers and runs a dense ``tl.dot``: Triton exposes no sparse tensor-core
instruction, so the gain is halved weight traffic (memory-bound, small M), not
halved math.
"""

from __future__ import annotations

import torch

from minidiff._env import triton_interpreting

try:  # the 2:4 format helpers below are pure torch and work without Triton
    import triton
    import triton.language as tl

    from ._autotune import tile_configs
except ImportError:  # pragma: no cover - Triton is an optional dependency
    triton = None

__all__ = ["compress_24", "decompress_24", "count_24_violations", "sparse24_matmul", "INTERPRET"]

INTERPRET = triton_interpreting()


def count_24_violations(w: torch.Tensor) -> int:
    """Number of 4-element groups along the last dimension with more than 2 nonzeros."""
    if w.ndim != 2 or w.shape[1] % 4:
        raise ValueError(f"2:4 needs a 2-D weight with in_features a multiple of 4, got {tuple(w.shape)}")
    nnz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    return int((nnz > 2).sum().item())


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 sparse ``w (N, K)`` to ``(values (N, K/2), meta (N, K/16) int16)``.

    Raises ValueError when K is not a multiple of 16 or when some group of 4
    holds more than 2 nonzeros (the message gives how many groups violate it).
    """
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    N, K = w.shape
    if K % 16:
        raise ValueError(f"2:4 compression needs in_features to be a multiple of 16, got {K}; "
                         "pad the layer's input dimension or keep it dense")
    bad = count_24_violations(w)
    if bad:
        raise ValueError(f"weight is not 2:4 sparse: {bad} of {N * K // 4} groups of 4 consecutive "
                         "input elements hold more than 2 nonzeros; prune it to 2:4 first "
                         "(e.g. SemiStructuredLinear.from_linear(linear, prune_to_24=True))")
    groups = w.reshape(N, K // 4, 4)
    nz = groups != 0
    # Choose 2 positions per group: the nonzeros first, then the lowest zero
    # positions; sort so p0 < p1. A stable sort on (is_zero, position) does it.
    key = (~nz).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # (N, K/4, 2)
    values = torch.gather(groups, -1, pos).reshape(N, K // 2).contiguous()
    codes = pos.reshape(N, K // 16, 8).to(torch.int32)
    shifts = 2 * torch.arange(8, device=w.device, dtype=torch.int32)
    packed = (codes << shifts).sum(-1)  # < 2**16, no overlap between fields
    meta = torch.where(packed >= 2**15, packed - 2**16, packed).to(torch.int16).contiguous()
    return values, meta


def _positions(meta: torch.Tensor) -> torch.Tensor:
    """(N, K/16) int16 -> (N, K/2) int64 positions 0..3."""
    m = meta.to(torch.int32) & 0xFFFF
    shifts = 2 * torch.arange(8, device=meta.device, dtype=torch.int32)
    return ((m[..., None] >> shifts) & 3).reshape(meta.shape[0], -1).to(torch.int64)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compress_24`: the dense ``(N, K)`` weight (reference path)."""
    if values.ndim != 2 or meta.ndim != 2 or values.shape[0] != meta.shape[0] \
            or values.shape[1] != 8 * meta.shape[1]:
        raise ValueError(f"values (N, K/2) and meta (N, K/16) do not match: "
                         f"{tuple(values.shape)} and {tuple(meta.shape)}")
    if meta.dtype != torch.int16:
        raise ValueError(f"meta must be int16, got {meta.dtype}")
    N, half = values.shape
    pos = _positions(meta)
    group = torch.arange(half, device=values.device) // 2
    dense = torch.zeros((N, 2 * half), dtype=values.dtype, device=values.device)
    dense.scatter_(1, (4 * group)[None, :] + pos, values)
    return dense


if triton is not None:

    def _configs() -> list[triton.Config]:
        return tile_configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
                             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4),
                             (16, 64, 128, 4, 4)])

    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "IEEE"])
    @triton.jit
    def _sparse24_kernel(
        x_ptr, v_ptr, meta_ptr, out_ptr, bias_ptr,
        M, N, K, M_BUCKET,
        stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % in_group) % size_m)
        pid_n = (pid % in_group) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)  # dense K positions inside the tile
        mask_m = offs_m < M
        mask_n = offs_n < N
        # For dense column k: group g = k // 4, its two compressed columns 2g, 2g+1,
        # whose 2-bit codes sit at bits 2*((2g) % 8) and 2*((2g+1) % 8) of meta[(2g) // 8].
        c0 = (offs_k // 4) * 2
        p = offs_k % 4
        sh0 = 2 * (c0 % 8)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            kd = k0 * BLOCK_K + offs_k
            kmask = kd < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kd[None, :] * stride_xk,
                        mask=mask_m[:, None] & kmask[None, :], other=0.0)
            cc = k0 * (BLOCK_K // 2) + c0  # compressed column of the group's first value
            wmask = kmask[:, None] & mask_n[None, :]
            v0 = tl.load(v_ptr + offs_n[None, :] * stride_vn + cc[:, None], mask=wmask, other=0.0)
            v1 = tl.load(v_ptr + offs_n[None, :] * stride_vn + cc[:, None] + 1, mask=wmask, other=0.0)
            m = tl.load(meta_ptr + offs_n[None, :] * stride_mn + (cc // 8)[:, None], mask=wmask, other=0)
            m = m.to(tl.int32) & 0xFFFF
            i0 = (m >> sh0[:, None]) & 3
            i1 = (m >> (sh0[:, None] + 2)) & 3
            # Dense (BLOCK_K, BLOCK_N) tile of W^T; codes are strictly increasing, so
            # at most one of the two matches a position.
            w = tl.where(i0 == p[:, None], v0, tl.where(i1 == p[:, None], v1, tl.zeros_like(v0)))
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        res = acc
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            res = res + b[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Y = X W^T (+ bias)`` with W given compressed by :func:`compress_24`.

    ``x (M, K)`` and ``values (N, K/2)`` share a float dtype (float16, bfloat16
    or float32); float32 accumulation; output in x's dtype. The weight rows
    must be contiguous (``values.stride(1) == meta.stride(1) == 1``).
    """
    if triton is None:
        raise ImportError("sparse24_matmul needs Triton (pip install triton); "
                          "decompress_24 + F.linear is the fallback")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or values.dtype != x.dtype:
        raise ValueError(f"x and values must share a float16/bfloat16/float32 dtype, "
                         f"got {x.dtype} and {values.dtype}")
    if meta.dtype != torch.int16:
        raise ValueError(f"meta must be int16, got {meta.dtype}")
    M, K = x.shape
    N = values.shape[0]
    if values.shape != (N, K // 2) or meta.shape != (N, K // 16) or K % 16:
        raise ValueError(f"shapes do not match 2:4 compression of a (N, {K}) weight: "
                         f"values {tuple(values.shape)}, meta {tuple(meta.shape)} (K must be a multiple of 16)")
    if values.stride(1) != 1 or meta.stride(1) != 1:
        raise ValueError("values and meta need contiguous rows; call .contiguous()")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.to(x.dtype).expand(M, N)) if bias is not None else out.zero_()
    grid = lambda meta_: (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),)
    _sparse24_kernel[grid](
        x, values, meta, out, bias if bias is not None else values,
        M, N, K, min(triton.next_power_of_2(M), 8192),
        x.stride(0), x.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
    )
    return out
