"""GPU dispatch for the compressed Linear layers: W8A8 int8, int8 weight-only, 2:4 sparse.

One function per op validates its inputs (ValueError before any kernel sees a
pointer), then picks a backend per call:

``"triton"``
    ``minidiff.kernels.int8_matmul`` / ``minidiff.kernels.sparse24``: autotuned
    per shape (on sm_90 Triton emits wgmma). Any M, N, K (tails are masked).
``"cuda"``
    ``minidiff._cuda`` (csrc/cuda/int8_gemm.cu, sparse24.cu): mma.sync kernels
    with a fixed 128 x 128 tile. Needs K % 16 == 0, 16-byte aligned operands,
    code for sm_80+, and (2:4) float16/bfloat16.
``"torch"``
    ``torch._int_mm`` + a torch epilogue (W8A8; needs M > 16, K and N multiples
    of 8), dequantize + ``F.linear`` (weight-only, 2:4), or the exact float64
    product when nothing else applies (int8 with K too large for int32).

Rule (:mod:`minidiff.ops.dispatch`, families ``int8`` and ``sparse``; no preference
set): Triton when it imports, else
the CUDA kernel when it applies, else torch. Triton leads because it is tuned per
shape and uses Hopper's wgmma, while the CUDA kernels are single-config mma.sync
kernels; ``benchmarks/bench_linear_gpu.py`` measures both and this rule is to be
revisited with its figures (none yet: no GPU was available when this was
written). ``MINIDIFF_BACKEND_INT8`` / ``MINIDIFF_BACKEND_SPARSE`` (or
``MINIDIFF_BACKEND``) ``=triton|cuda|torch`` prefers a backend where it applies and
falls through the same order where it does not (``MINIDIFF_GPU_BACKEND`` still
works, deprecated).

CPU tensors are accepted too (tests, references): under ``TRITON_INTERPRET=1``
they run the Triton kernels in the interpreter (bfloat16 upcast to float32,
which the interpreter lacks), otherwise the torch path.

W8A8 arithmetic is the one of ``minidiff.quant`` (shared with the CPU kernels):
``s_x = absmax / 127`` (float32, IEEE division), ``q = clamp(rint(x / s_x), -127, 127)``
with ties to even, an all-zero row gives ``s_x = 0``, a row with NaN/Inf gives
``s_x = NaN`` (its outputs NaN, as the float layer's would be);
``y = acc * s_x[m] * s_w[n] + b[n]`` in float32, then ``out_dtype``.

Every op is registered by :mod:`minidiff.ops.dispatch` (``minidiff::int8_linear_gpu``,
``minidiff::int8_weight_only_gpu``, ``minidiff::sparse24_linear_gpu``) with a
fake implementation, so it traces under ``torch.compile``; eager calls go through
the same op, which validates its operands before any kernel sees a pointer.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from minidiff._native import cuda_core, triton_available
from minidiff.ops._validate import check_dtype, check_ndim
from minidiff.ops.dispatch import choose, define, interpreting, requested
# the per-token quantizer and the int8 references are defined once, in minidiff.quant
from minidiff.quant.int8 import (int8_linear_reference, int8_matmul_reference,  # noqa: F401 (re-exported)
                                 int8_weight_only_linear_reference, quantize_per_token_reference)

__all__ = [
    "int8_linear_cuda",
    "int8_weight_only_cuda",
    "sparse24_linear_cuda",
    "quantize_per_token_cuda",
    "int8_matmul_cuda",
    "quantize_per_token_reference",
    "int8_matmul_reference",
    "int8_linear_reference",
    "int8_weight_only_reference",
    "sparse24_linear_reference",
    "select_backend",
    "CUDA_K_MULTIPLE",
    "INT32_EXACT_MAX_K",
]

CUDA_K_MULTIPLE = 16
"""The CUDA kernels load 16-byte chunks of K (int8: 16 elements; 2:4 meta: 16 columns)."""

INT32_EXACT_MAX_K = 131071
"""Largest K whose int8 dot products cannot overflow int32 (K * 128 * 128 < 2**31)."""

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_KIND = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}  # out_kind / dtype_kind codes of the .cu files


# ------------------------------------------------------------------ backend choice
@functools.lru_cache(maxsize=None)
def _cuda_arch(which: str, device_index: int) -> int:
    """SM version of the CUDA kernel code the driver selected for this device (0: none)."""
    mod = cuda_core()
    if mod is None:
        return 0
    with torch.cuda.device(device_index):
        try:
            return int(getattr(mod, f"{which}_kernel_arch")())
        except Exception:  # an old build without the query: treat as unavailable
            return 0


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _triton_ok(device: torch.device) -> bool:
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _cuda_ok(which: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_arch(which, idx) >= 80


def select_backend(op: str, x: torch.Tensor, k: int, *tensors: torch.Tensor) -> str:
    """The backend :func:`int8_linear_cuda` (``op="int8"``), :func:`int8_weight_only_cuda`
    (``"weight_only"``) or :func:`sparse24_linear_cuda` (``"sparse24"``) will use for
    these operands: ``"triton"``, ``"cuda"`` or ``"torch"`` (see the module docstring)."""
    family = "sparse" if op == "sparse24" else "int8"
    if op == "int8" and k > INT32_EXACT_MAX_K:
        requested(family)  # a bad environment value is still an error
        return "torch"
    cuda_fits = (op != "weight_only" and _cuda_ok("int8_gemm" if op == "int8" else "sparse24", x.device)
                 and k % CUDA_K_MULTIPLE == 0 and _aligned(x, *tensors)
                 and (op != "sparse24" or x.dtype in (torch.float16, torch.bfloat16)))
    candidates = (["triton"] if _triton_ok(x.device) else []) + (["cuda"] if cuda_fits else []) + ["torch"]
    return choose(family, candidates)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# -------------------------------------------------------------------- references
def int8_weight_only_reference(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Deprecated alias of :func:`minidiff.quant.int8_weight_only_linear_reference`."""
    warnings.warn("minidiff.ops.gpu_linear.int8_weight_only_reference is deprecated; use "
                  "minidiff.quant.int8_weight_only_linear_reference", DeprecationWarning, stacklevel=2)
    return int8_weight_only_linear_reference(x, w_int8, w_scale, bias)


def sparse24_linear_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference ``x W^T + b`` with W decompressed from ``(values, meta)``."""
    from minidiff.kernels.sparse24 import decompress_24

    out = x.double() @ decompress_24(values.double(), meta).T
    if bias is not None:
        out = out + bias.double()[None, :]
    return out


# ----------------------------------------------------------------- validation
def _same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    devs = {str(t.device) for _, t in named if t is not None}
    if len(devs) > 1:
        raise ValueError("all operands must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named if t is not None))


def _check_weight(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_ndim(x, 2, "x", "(M, in_features)")
    check_dtype(x, _FLOATS, "x")
    check_ndim(w, 2, "w_int8", "(out_features, in_features)")
    check_dtype(w, (torch.int8,), "w_int8")
    n, k = w.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects {k}")
    if not w_scale.is_floating_point() or w_scale.shape != (n,):
        raise ValueError(f"w_scale must be a floating tensor of shape ({n},), got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (not bias.is_floating_point() or bias.shape != (n,)):
        raise ValueError(f"bias must be a floating tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    _same_device(("x", x), ("w_int8", w), ("w_scale", w_scale), ("bias", bias))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _fresh_if_misaligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


# ---------------------------------------------------------------- building blocks
def quantize_per_token_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization on x's device: ``(q (M, K) int8, scale (M,) float32)``."""
    check_ndim(x, 2, "x", "(M, K)")
    check_dtype(x, _FLOATS, "x")
    x = x.contiguous()
    m, k = x.shape
    if m == 0 or k == 0:
        return quantize_per_token_reference(x)
    candidates = ((["triton"] if _triton_ok(x.device) else []) + (["cuda"] if _cuda_ok("int8_gemm", x.device) else [])
                  + ["torch"])
    want = choose("int8", candidates)
    if want == "cuda":
        q = torch.empty((m, k), dtype=torch.int8, device=x.device)
        s = torch.empty((m,), dtype=torch.float32, device=x.device)
        cuda_core().quantize_per_token(x.data_ptr(), q.data_ptr(), s.data_ptr(), m, k, _KIND[x.dtype],
                                       _stream(x.device))
        return q, s
    if want == "triton":
        from minidiff.kernels.int8_matmul import quantize_per_token

        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            x = x.float()  # the interpreter has no bfloat16; exact upcast
        return quantize_per_token(x)
    return quantize_per_token_reference(x)


def int8_matmul_cuda(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor | None = None,
                     w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 GEMM ``a (M, K) @ w (N, K)^T``: raw int32 without scales (exact), else the
    fused epilogue ``acc * a_scale[m] * w_scale[n] + bias[n]`` as ``out_dtype``."""
    check_ndim(a, 2, "a", "(M, K)")
    check_ndim(w, 2, "w", "(N, K)")
    check_dtype(a, (torch.int8,), "a")
    check_dtype(w, (torch.int8,), "w")
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, w is {tuple(w.shape)}")
    scaled = a_scale is not None or w_scale is not None
    if scaled and (a_scale is None or w_scale is None or a_scale.shape != (m,) or w_scale.shape != (n,)):
        raise ValueError(f"pass a_scale ({m},) and w_scale ({n},) together, or neither for int32 output")
    if not scaled and bias is not None:
        raise ValueError("bias needs the scaled epilogue (pass a_scale and w_scale)")
    if scaled:
        check_dtype(torch.empty(0, dtype=out_dtype), _FLOATS, "out_dtype")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    _same_device(("a", a), ("w", w), ("a_scale", a_scale), ("w_scale", w_scale), ("bias", bias))
    a = _fresh_if_misaligned(a)
    w = _fresh_if_misaligned(w)
    a_scale, w_scale, bias = _f32(a_scale), _f32(w_scale), _f32(bias)
    if m == 0 or n == 0 or k == 0:
        acc = torch.zeros((m, n), dtype=torch.int32, device=a.device)
        return _epilogue(acc, a_scale, w_scale, bias, out_dtype) if scaled else acc
    backend = select_backend("int8", a, k, w)
    if backend == "cuda":
        out = torch.empty((m, n), dtype=out_dtype if scaled else torch.int32, device=a.device)
        cuda_core().int8_gemm(a.data_ptr(), w.data_ptr(), out.data_ptr(),
                              a_scale.data_ptr() if scaled else 0, w_scale.data_ptr() if scaled else 0,
                              0 if bias is None else bias.data_ptr(), m, n, k,
                              _KIND[out_dtype] if scaled else 0, _stream(a.device))
        return out
    if backend == "triton":
        from minidiff.kernels.int8_matmul import int8_matmul

        if not scaled:
            return int8_matmul(a, w)
        cpu_bf16 = a.device.type == "cpu" and out_dtype == torch.bfloat16
        out = int8_matmul(a, w, a_scale, w_scale, bias, torch.float32 if cpu_bf16 else out_dtype)
        return out.to(out_dtype)
    acc = _int_mm_or_exact(a, w)
    return _epilogue(acc, a_scale, w_scale, bias, out_dtype) if scaled else acc


def _int_mm_or_exact(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = w.shape[0]
    if (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0 and k >= 16
            and k <= INT32_EXACT_MAX_K):
        return torch._int_mm(a, w.T)  # cuBLASLt int8; needs these shape multiples
    return int8_matmul_reference(a, w)


def _epilogue(acc, a_scale, w_scale, bias, out_dtype):
    y = acc.to(torch.float32) * a_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias[None, :]
    return y.to(out_dtype)


# ------------------------------------------------------------------------ the ops
def _check_linear(x, w_int8, w_scale, bias, out_dtype) -> None:
    """Boundary check of the int8 GPU ops: operands (see ``_check_weight``) and out dtype."""
    for t, name in ((x, "x"), (w_int8, "w_int8"), (w_scale, "w_scale")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    _check_weight(x, w_int8, w_scale, bias)
    check_dtype(torch.empty(0, dtype=out_dtype), _FLOATS, "out_dtype")


def _linear_fake(x, w_int8, w_scale, bias, out_dtype):
    _check_linear(x, w_int8, w_scale, bias, out_dtype)  # metadata only: no data read
    return x.new_empty((x.shape[0], w_int8.shape[0]), dtype=out_dtype)


def _int8_linear_kernel(x, w_int8, w_scale, bias, out_dtype):
    _check_linear(x, w_int8, w_scale, bias, out_dtype)
    q, s = quantize_per_token_cuda(x)
    return int8_matmul_cuda(q, w_int8, s, w_scale, bias, out_dtype)


_int8_linear_op = define(
    "int8_linear_gpu", "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    _int8_linear_kernel, _linear_fake)
_int8_linear_impl = _int8_linear_op


def int8_linear_cuda(x2d: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W8A8 Linear on x's device: per-token quantization, int8 GEMM, fused epilogue.

    ``y = (Q(x) W_q^T)[m, n] * s_x[m] * s_w[n] + b[n]`` (see the module docstring),
    ``out_dtype`` defaulting to x's dtype. Runs ``torch.ops.minidiff.int8_linear_gpu``.
    """
    if not isinstance(x2d, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x2d).__name__}")
    return _int8_linear_op(x2d, w_int8, w_scale, bias, x2d.dtype if out_dtype is None else out_dtype)


def _int8_weight_only_kernel(x, w_int8, w_scale, bias, out_dtype):
    _check_linear(x, w_int8, w_scale, bias, out_dtype)
    m, k = x.shape
    n = w_int8.shape[0]
    x = x.contiguous()
    w_int8 = w_int8.contiguous()
    if m and n and k and select_backend("weight_only", x, k) == "triton":
        from minidiff.kernels.int8_matmul import int8_weight_only_matmul

        xt = x.float() if (x.dtype == torch.bfloat16 and x.device.type == "cpu") else x
        y = int8_weight_only_matmul(xt, w_int8, _f32(w_scale), _f32(bias))
        return y.to(out_dtype)
    # torch: dequantize the weight once in the activation dtype, then the dense GEMM
    dt = x.dtype
    w = (w_int8.to(torch.float32) * w_scale.to(torch.float32)[:, None]).to(dt)
    return F.linear(x, w, None if bias is None else bias.to(dt)).to(out_dtype)


_int8_weight_only_op = define(
    "int8_weight_only_gpu",
    "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    _int8_weight_only_kernel, _linear_fake)
_int8_weight_only_impl = _int8_weight_only_op


def int8_weight_only_cuda(x2d: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weight-only int8 Linear ``y = x (W_q s_w)^T + b``: the int8 weight is read and
    dequantized inside the kernel (float32 accumulation); output in ``out_dtype``
    (default x's dtype). Runs ``torch.ops.minidiff.int8_weight_only_gpu``."""
    if not isinstance(x2d, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x2d).__name__}")
    return _int8_weight_only_op(x2d, w_int8, w_scale, bias, x2d.dtype if out_dtype is None else out_dtype)


def _check_sparse24(x2d, values, meta, bias) -> None:
    """Boundary check of the 2:4 op: shapes, dtypes and devices of x and the compressed weight."""
    for t, name in ((x2d, "x"), (values, "values"), (meta, "meta")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    check_ndim(x2d, 2, "x", "(M, in_features)")
    check_dtype(x2d, _FLOATS, "x")
    check_ndim(values, 2, "values", "(out_features, in_features / 2)")
    check_ndim(meta, 2, "meta", "(out_features, in_features / 16)")
    check_dtype(meta, (torch.int16,), "meta")
    m, k = x2d.shape
    n = values.shape[0]
    if values.dtype != x2d.dtype:
        raise ValueError(f"x is {x2d.dtype} but the 2:4 values are {values.dtype}; cast one to the other")
    if k % 16 or values.shape != (n, k // 2) or meta.shape != (n, k // 16):
        raise ValueError(f"x has {k} features; 2:4 needs a multiple of 16 and values ({n}, {k // 2}), "
                         f"meta ({n}, {k // 16}); got values {tuple(values.shape)}, meta {tuple(meta.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or bias.shape != (n,)):
        raise ValueError(f"bias must be a floating tensor of shape ({n},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    _same_device(("x", x2d), ("values", values), ("meta", meta), ("bias", bias))


def _sparse24_fake(x, values, meta, bias):
    _check_sparse24(x, values, meta, bias)
    return x.new_empty((x.shape[0], values.shape[0]), dtype=x.dtype)


def _sparse24_kernel(x, values, meta, bias):
    _check_sparse24(x, values, meta, bias)
    m, k = x.shape
    n = values.shape[0]
    x = _fresh_if_misaligned(x)
    values = _fresh_if_misaligned(values)
    meta = meta.contiguous()
    if m == 0 or n == 0:
        return x.new_zeros((m, n))
    backend = select_backend("sparse24", x, k, values)
    if backend == "cuda":
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        b = _f32(bias)
        cuda_core().sparse24_gemm(x.data_ptr(), values.data_ptr(), meta.data_ptr(), out.data_ptr(),
                                  0 if b is None else b.data_ptr(), m, n, k, _KIND[x.dtype],
                                  _stream(x.device))
        return out
    if backend == "triton":
        from minidiff.kernels.sparse24 import sparse24_matmul

        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return sparse24_matmul(x.float(), values.float(), meta, _f32(bias)).to(x.dtype)
        return sparse24_matmul(x, values, meta, None if bias is None else bias.to(x.dtype))
    from minidiff.kernels.sparse24 import decompress_24

    return F.linear(x, decompress_24(values, meta), None if bias is None else bias.to(x.dtype))


_sparse24_op = define("sparse24_linear_gpu", "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor",
                      _sparse24_kernel, _sparse24_fake)
_sparse24_impl = _sparse24_op


def sparse24_linear_cuda(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """2:4 sparse Linear ``y = x W^T + b`` with W compressed by
    ``minidiff.kernels.sparse24.compress_24`` (values (N, K/2), meta (N, K/16) int16).
    Output in x's dtype; float32 accumulation. Runs ``torch.ops.minidiff.sparse24_linear_gpu``."""
    return _sparse24_op(x2d, values, meta, bias)
