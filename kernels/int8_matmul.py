"""Triton int8 GEMM with a fused scale epilogue, per-token activation
quantization, and an int8 weight-only matmul.

W8A8 on GPU is two launches: :func:`quantize_per_token` (one row per program:
absmax, then round-half-to-even to int8) and :func:`int8_matmul` (int8 x int8
with int32 accumulation through ``tl.dot``, then the epilogue in float32)::

    scale[m] = max_k |x[m, k]| / 127     (0 for an all-zero row, NaN if the row has NaN/Inf)
    q[m, k]  = clamp(rint(x[m, k] / scale[m]), -127, 127)   (0 where scale is 0)
    acc[m, n] = sum_k q[m, k] * w[n, k]                  (int32, exact)
    out[m, n] = acc[m, n] * scale[m] * w_scale[n] (+ bias[n])   (float32, then out dtype)

This is the LLM.int8()/SmoothQuant "vector-wise" scheme (Dettmers et al. 2022;
Xiao et al. 2023) without outlier decomposition. The quantizer's definition is
``minidiff.quant.quantize_per_token_reference``; this kernel reproduces it bit for bit. Without scales
:func:`int8_matmul` returns the raw int32 accumulator, which equals
``a.int() @ w.int().T`` exactly (tests check it under the interpreter).

Every kernel masks its tails, so any M, N, K is correct; K a multiple of 16
only makes the loads vectorize. Under ``TRITON_INTERPRET=1`` (CPU tests) the
autotuner gets a single small config and bfloat16 is not available (callers
upcast). Kernels know nothing of modules: tensors in, tensors out.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

__all__ = [
    "int8_matmul",
    "quantize_per_token",
    "int8_weight_only_matmul",
    "INTERPRET",
]

from ._autotune import INTERPRET, tile_configs


def _gemm_configs() -> list[triton.Config]:
    """Autotune space: large square tiles for big M, narrow ones for skinny shapes (H100/H200)."""
    return tile_configs([(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
                         (128, 128, 64, 4, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4),
                         (64, 64, 128, 4, 5), (32, 64, 128, 4, 5), (16, 64, 256, 4, 4)])


def _wo_configs() -> list[triton.Config]:
    return tile_configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
                         (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (32, 64, 128, 4, 4),
                         (16, 64, 128, 4, 4)])


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") program order so consecutive programs share A rows in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "EPILOGUE", "HAS_BIAS"])
@triton.jit
def _int8_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    # W is N x K row-major; read it as the K x N operand W^T.
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE:
        a_s = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        w_s = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        res = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            res = res + b[None, :]
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _rint_half_even(y):
    """Round to nearest, ties to even, by exact arithmetic (y - floor(y) is exact
    in float32 for |y| < 2**23, and here |y| <= 127)."""
    f = tl.floor(y)
    d = y - f
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
    up = tl.where(d == 0.5, odd, 0.0)
    return tl.where(d > 0.5, f + 1.0, f + up)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_xk, stride_qm,
                          BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        bad = tl.maximum(bad, tl.where(ax < float("inf"), 0, 1))  # NaN and Inf fail `< inf`
        amax = tl.maximum(amax, tl.where(ax < float("inf"), ax, 0.0))
    absmax = tl.max(amax, axis=0)
    nonfinite = tl.max(bad, axis=0) > 0
    # IEEE division (not the approximate GPU divide) so GPU, interpreter and the
    # torch reference round identically.
    scale = tl.math.div_rn(absmax, 127.0)
    ok = (scale > 0.0) & (~nonfinite)
    safe = tl.where(ok, scale, 1.0)
    tl.store(scale_ptr + row, tl.where(nonfinite, float("nan"), scale))
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        x = tl.where(ok, x, 0.0)  # keep NaN/Inf out of the rounding arithmetic
        y = _rint_half_even(tl.math.div_rn(x, safe))
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        y = tl.where(ok, y, 0.0)
        tl.store(q_ptr + row * stride_qm + k, y.to(tl.int8), mask=k < K)


@triton.autotune(configs=_wo_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "IEEE"])
@triton.jit
def _weight_only_kernel(
    x_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
        # int8 -> activation dtype is exact (|w| <= 127 fits fp16/bf16); the
        # per-channel scale is applied once, after the reduction.
        w = w.to(x.dtype)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    w_s = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    res = acc * w_s[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        res = res + b[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def m_bucket(m: int) -> int:
    """Autotuning key for the row count: the next power of two, capped at 8192, so a
    study with varying batch sizes tunes once per bucket instead of once per M (the
    argument is otherwise unused by the kernels)."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _check_2d(t: torch.Tensor, name: str) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def int8_matmul(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``a (M, K) int8`` times ``w (N, K) int8`` transposed.

    Without scales: the int32 accumulator ``a.int() @ w.int().T`` (exact).
    With ``a_scale (M,)`` and ``w_scale (N,)`` (float32): the fused epilogue
    ``acc * a_scale[m] * w_scale[n] + bias[n]`` computed in float32 and stored
    as ``out_dtype``. Validation of devices and alignment is the caller's
    (``minidiff.ops.gpu_linear``); this checks shapes and dtypes only.
    """
    _check_2d(a, "a")
    _check_2d(w, "w")
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise ValueError(f"int8_matmul needs int8 operands, got a {a.dtype} and w {w.dtype}")
    M, K = a.shape
    N, K2 = w.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, w is {tuple(w.shape)}")
    epilogue = a_scale is not None or w_scale is not None
    if epilogue and (a_scale is None or w_scale is None):
        raise ValueError("pass both a_scale (M,) and w_scale (N,), or neither for the raw int32 result")
    if epilogue:
        if a_scale.shape != (M,) or w_scale.shape != (N,):
            raise ValueError(f"a_scale must be ({M},) and w_scale ({N},), got "
                             f"{tuple(a_scale.shape)} and {tuple(w_scale.shape)}")
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    else:
        if bias is not None:
            raise ValueError("bias needs the scaled epilogue (pass a_scale and w_scale)")
        out = torch.empty((M, N), dtype=torch.int32, device=a.device)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if not epilogue else (
            out.copy_(bias.to(out_dtype).expand(M, N)) if bias is not None else out.zero_())
    dummy = out  # placeholder pointer for absent optional operands (never read)
    _int8_gemm_kernel[_grid(M, N)](
        a, w, out,
        a_scale if epilogue else dummy, w_scale if epilogue else dummy,
        bias if bias is not None else dummy,
        M, N, K, m_bucket(M),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None,
    )
    return out


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization: returns ``(q (M, K) int8, scale (M,) float32)``
    with ``scale = absmax / 127`` and ``q = clamp(rint(x / scale), -127, 127)``
    (round half to even; an all-zero row gets scale 0 and q 0; a row holding NaN/Inf
    gets scale NaN and q 0, so its outputs are NaN). Arithmetic in float32."""
    _check_2d(x, "x")
    if not x.is_floating_point():
        raise ValueError(f"quantize_per_token needs a floating tensor, got {x.dtype}")
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    if K == 0:
        return q, scale.zero_()
    block_k = min(max(triton.next_power_of_2(K), 32), 1024 if INTERPRET else 4096)
    _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), x.stride(1), q.stride(0),
                                BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8)
    return q, scale


def int8_weight_only_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (M, K)`` float16/bfloat16/float32 times int8 ``w (N, K)`` dequantized in
    the kernel: ``out = (x @ w.T) * w_scale[n] + bias[n]``, float32 accumulation,
    output in x's dtype. float32 inputs use IEEE (not TF32) tensor-core math."""
    _check_2d(x, "x")
    _check_2d(w, "w")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if w.dtype != torch.int8:
        raise ValueError(f"w must be int8, got {w.dtype}")
    M, K = x.shape
    N, K2 = w.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)}, w is {tuple(w.shape)}")
    if w_scale.shape != (N,):
        raise ValueError(f"w_scale must have shape ({N},), got {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.to(x.dtype).expand(M, N)) if bias is not None else out.zero_()
    _weight_only_kernel[_grid(M, N)](
        x, w, out, w_scale, bias if bias is not None else w_scale,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
    )
    return out
