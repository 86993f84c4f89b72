"""int8 Linear ops: validation, dispatch and float64 / exact-integer references.

W8A8 (weights and activations int8), for ``minidiff.nn.Int8Linear``:

    s_w[n] = max_k |W[n, k]| / 127,   W_q = round(W / s_w)             (once, per channel)
    s_x[m] = max_k |X[m, k]| / 127,   X_q = round(X / s_x)             (per call, per token)
    Y[m, n] = (X_q W_q^T)[m, n] * s_x[m] * s_w[n] + b[n]               (int32 product, exact)

``round`` is round-half-to-even and results are clamped to [-127, 127] (symmetric
int8, as in LLM.int8() and SmoothQuant's per-token/per-channel W8A8: Dettmers et al.
2022, Xiao et al. 2023). A row of X holding NaN/Inf gets s_x = NaN (its outputs are
NaN, as the float layer's would be); an all-zero row gets s_x = 0.

Weight-only (W8A32 / W8A16): Y = X (W_q * s_w)^T + b with X kept in floating point.

The quantizers and the float64 references (``int8_linear_reference``,
``int8_weight_only_linear_reference``) are defined once in ``minidiff.quant`` and
re-exported here; this module holds the native ops.

CPU calls go to ``minidiff._C`` (AVX-512 VNNI / AVX2 / scalar, chosen at run time,
capped by ``MINIDIFF_SIMD``); CUDA calls go to ``minidiff.ops.gpu_linear``. The ops
(``torch.ops.minidiff.int8_linear_w8a8`` / ``int8_linear_weight_only``) are
registered by :mod:`minidiff.ops.dispatch` with fake implementations, so they trace
under ``torch.compile``; eager calls go through the same ops, which check shapes,
dtypes and devices (and the packed weight's layout) before native code runs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from minidiff._native import cpu_core
from minidiff.ops._validate import check_dtype, check_ndim, num_threads
from minidiff.ops.dispatch import define
# the arithmetic and its float64/exact references live in the one quantizer module
from minidiff.quant.int8 import (int8_linear_reference, int8_matmul_reference,  # noqa: F401 (re-exported)
                                 int8_weight_only_linear_reference, quantize_per_token_reference,
                                 quantize_weight_int8)

__all__ = [
    "quantize_weight",
    "pack_weight",
    "quantize_rows",
    "quantize_rows_reference",
    "int8_gemm_s32",
    "int8_gemm_s32_reference",
    "int8_linear",
    "int8_linear_reference",
    "int8_weight_only_linear",
    "int8_weight_only_linear_reference",
    "PANEL",
    "MAX_K",
    "WEIGHT_ONLY_NATIVE_MAX_M",
]

PANEL = 64
"""Output channels per packed weight panel (csrc/int8_gemm.cpp)."""

MAX_K = 66000
"""Largest reduction length: the kernel's unsigned-shifted sums stay below 2**31
(K * 254 * 127 < 2**31)."""

WEIGHT_ONLY_NATIVE_MAX_M = 96
"""Weight-only mode: up to this many rows use the native kernel (reads 1 byte per
weight and converts in registers); more rows dequantize the weight once per call and
call the float GEMM, whose higher FMA efficiency then pays for the dequantization.
Measured (1 thread, Zen4; benchmarks/RESULTS.md): native time grows ~0.018 ms/row on
384x1536 and ~0.07 ms/row on 768x3072; dequantize + sgemm costs ~0.4 / ~2.5 ms plus
~0.013 / ~0.05 ms/row, so the paths cross at M ~ 80-125."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_x(x: torch.Tensor, k: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
    check_ndim(x, 2, name, "(M, K)")
    check_dtype(x, _FLOAT_DTYPES, name)
    if x.shape[1] != k:
        raise ValueError(f"{name} has {x.shape[1]} features but the layer expects K={k}; "
                         "pass inputs whose last dimension is the layer's in_features")


# --------------------------------------------------------------------------- weights
def quantize_weight(weight: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deprecated alias of :func:`minidiff.quant.quantize_weight_int8` (the one weight quantizer)."""
    warnings.warn("minidiff.ops.int8.quantize_weight is deprecated; use minidiff.quant.quantize_weight_int8",
                  DeprecationWarning, stacklevel=2)
    return quantize_weight_int8(weight, name)


def pack_weight(w_int8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an (N, K) int8 weight for the CPU kernel; return ``(packed, colsum)``.

    ``packed[p, k4, j, t] = W[64 p + j, 4 k4 + t]`` (zero padded to N % 64 == 0 and
    K % 4 == 0): each k4 step of a 64-channel panel is 256 contiguous bytes, four
    vpdpbusd operands. ``colsum[n] = sum_k W[n, k]`` (int32) corrects for the +128
    shift that makes activations unsigned for vpdpbusd.
    """
    check_ndim(w_int8, 2, "w_int8", "(N, K)")
    check_dtype(w_int8, (torch.int8,), "w_int8")
    w = w_int8.detach().cpu().contiguous()
    n, k = w.shape
    np_, kp = -(-n // PANEL) * PANEL, -(-k // 4) * 4
    padded = torch.zeros(np_, kp, dtype=torch.int8)
    padded[:n, :k] = w
    packed = padded.view(np_ // PANEL, PANEL, kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    colsum = w.to(torch.int32).sum(dim=1, dtype=torch.int32).contiguous()
    return packed, colsum


def _check_packed(packed: torch.Tensor, colsum: torch.Tensor, n: int, k: int) -> None:
    if not isinstance(packed, torch.Tensor) or not isinstance(colsum, torch.Tensor):
        raise ValueError("pass packed and colsum together (both from pack_weight()), or neither")
    np_, kp = -(-n // PANEL) * PANEL, -(-k // 4) * 4
    if packed.dtype != torch.int8 or tuple(packed.shape) != (np_ // PANEL, kp // 4, PANEL, 4) \
            or not packed.is_contiguous() or packed.device.type != "cpu":
        raise ValueError(f"packed weight must be a contiguous CPU int8 tensor of shape "
                         f"{(np_ // PANEL, kp // 4, PANEL, 4)} from pack_weight(); got "
                         f"{packed.dtype} {tuple(packed.shape)} on {packed.device}")
    if colsum.dtype != torch.int32 or tuple(colsum.shape) != (n,) or not colsum.is_contiguous():
        raise ValueError(f"colsum must be a contiguous int32 tensor of shape ({n},) from pack_weight()")


# ----------------------------------------------------------------------- activations
def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deprecated alias of :func:`minidiff.quant.quantize_per_token_reference`."""
    warnings.warn("minidiff.ops.int8.quantize_rows_reference is deprecated; use "
                  "minidiff.quant.quantize_per_token_reference", DeprecationWarning, stacklevel=2)
    return quantize_per_token_reference(x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native per-row int8 quantization (the one fused into :func:`int8_linear`)."""
    check_ndim(x, 2, "x", "(M, K)")
    check_dtype(x, _FLOAT_DTYPES, "x")
    if x.device.type != "cpu":
        raise ValueError("quantize_rows runs on CPU tensors")
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    s = torch.empty(m, dtype=torch.float32)
    if m and k:
        cpu_core().int8_quantize_rows(x.data_ptr(), m, k, q.data_ptr(), s.data_ptr(), num_threads())
    elif m:
        s.zero_()
    return q, s


# ----------------------------------------------------------------------- int8 GEMM
def int8_gemm_s32_reference(a: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """Deprecated alias of :func:`minidiff.quant.int8_matmul_reference` (exact int32 ``a @ w^T``)."""
    warnings.warn("minidiff.ops.int8.int8_gemm_s32_reference is deprecated; use minidiff.quant.int8_matmul_reference",
                  DeprecationWarning, stacklevel=2)
    return int8_matmul_reference(a, w_int8)


def int8_gemm_s32(a: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, n: int) -> torch.Tensor:
    """Exact int8 x int8 -> int32 product ``a (M, K) @ W^T`` with W given packed."""
    check_ndim(a, 2, "a", "(M, K)")
    check_dtype(a, (torch.int8,), "a")
    if a.device.type != "cpu":
        raise ValueError("int8_gemm_s32 runs on CPU tensors")
    m, k = a.shape
    if k > MAX_K:
        raise ValueError(f"K={k} exceeds the int32-exact limit {MAX_K}")
    _check_packed(packed, colsum, n, k)
    a = a.contiguous()
    out = torch.empty(m, n, dtype=torch.int32)
    if m and n:
        cpu_core().int8_gemm_s32(a.data_ptr(), m, k, packed.data_ptr(), n, colsum.data_ptr(),
                                 out.data_ptr(), num_threads())
    return out


# ------------------------------------------------------------------ W8A8 Linear op
def _int8_linear_kernel(x, w_int8, w_scale, bias, packed, colsum, out_dtype):
    _check_linear_args(x, w_int8, w_scale, bias, out_dtype)
    if x.device.type == "cpu" and (packed is not None or colsum is not None):
        _check_packed(packed, colsum, w_int8.shape[0], w_int8.shape[1])
    m, k = x.shape
    n = w_int8.shape[0]
    if x.device.type == "cuda":
        from minidiff.ops import gpu_linear  # H4's module; imported only when a GPU is in use

        return gpu_linear.int8_linear_cuda(x, w_int8, w_scale, bias, out_dtype)
    if packed is None or colsum is None:
        packed, colsum = pack_weight(w_int8)
    xf = x.float().contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    if m and n:
        cpu_core().int8_linear_w8a8(xf.data_ptr(), m, k, packed.data_ptr(), n, colsum.data_ptr(),
                                    w_scale.float().contiguous().data_ptr(),
                                    0 if b is None else b.data_ptr(), out.data_ptr(), num_threads())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _check_linear_args(x, w_int8, w_scale, bias, out_dtype=torch.float32):
    """Shapes, dtypes and devices of an int8 Linear call (the ops' boundary check)."""
    for t, name in ((w_int8, "w_int8"), (w_scale, "w_scale")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    check_ndim(w_int8, 2, "w_int8", "(N, K)")
    check_dtype(w_int8, (torch.int8,), "w_int8")
    n, k = w_int8.shape
    _check_x(x, k)
    if k > MAX_K:
        raise ValueError(f"in_features={k} exceeds the int32-exact limit {MAX_K}")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"w_scale must be float32 of shape ({n},), got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or bias.shape != (n,)):
        raise ValueError(f"bias must be a floating tensor of shape ({n},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    check_dtype(torch.empty(0, dtype=out_dtype), _FLOAT_DTYPES, "out_dtype")
    devices = {t.device for t in (x, w_int8, w_scale) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"x, weights, scales and bias must be on one device, got {sorted(map(str, devices))}")


def _linear_fake(x, w_int8, w_scale, bias, *rest):
    _check_linear_args(x, w_int8, w_scale, bias, rest[-1])  # metadata only: no data read
    return x.new_empty((x.shape[0], w_int8.shape[0]), dtype=rest[-1])


_int8_linear_op = define(
    "int8_linear_w8a8",
    "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, Tensor? packed, Tensor? colsum, "
    "ScalarType out_dtype) -> Tensor", _int8_linear_kernel, _linear_fake)
_int8_linear_impl = _int8_linear_op  # eager and compiled calls share the registered op


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, packed: torch.Tensor | None = None,
                colsum: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 Linear ``Y = (Q(X) W_q^T) s_x s_w^T + b`` for a 2-D ``x`` (see module docstring).

    ``packed``/``colsum`` come from :func:`pack_weight` (computed here when omitted).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x).__name__}")
    return _int8_linear_op(x, w_int8, w_scale, bias, packed, colsum, out_dtype)


# ------------------------------------------------------------- weight-only Linear op
def _int8_weight_only_kernel(x, w_int8, w_scale, bias, out_dtype):
    _check_linear_args(x, w_int8, w_scale, bias, out_dtype)
    m, k = x.shape
    n = w_int8.shape[0]
    if x.device.type == "cuda":
        from minidiff.ops import gpu_linear

        return gpu_linear.int8_weight_only_cuda(x, w_int8, w_scale, bias, out_dtype)
    if m > WEIGHT_ONLY_NATIVE_MAX_M:
        # compute bound: dequantize once per call, then the float GEMM in the layer's dtype
        dt = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
        w = (w_int8.to(dt) * w_scale.to(dt)[:, None])
        out = F.linear(x.to(dt), w, None if bias is None else bias.to(dt))
        return out.to(out_dtype)
    xf = x.float().contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    if m and n:
        cpu_core().int8_linear_weight_only(xf.data_ptr(), m, k, w_int8.contiguous().data_ptr(), n,
                                           w_scale.float().contiguous().data_ptr(),
                                           0 if b is None else b.data_ptr(), out.data_ptr(), num_threads())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


_int8_weight_only_op = define(
    "int8_linear_weight_only",
    "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    _int8_weight_only_kernel, _linear_fake)
_int8_weight_only_impl = _int8_weight_only_op  # eager and compiled calls share the registered op


def int8_weight_only_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None,
                            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight-only int8 Linear ``Y = X (W_q s_w)^T + b`` for a 2-D ``x``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x).__name__}")
    return _int8_weight_only_op(x, w_int8, w_scale, bias, out_dtype)
