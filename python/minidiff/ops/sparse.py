"""Unstructured-sparse Linear op: validation, dispatch and a float64 reference.

``Y = X W^T + b`` with ``W (N, K)`` stored as CSR over output channels
(``row_ptr`` int32 ``(N+1,)``, ``col`` int32 ``(nnz,)``, ``val`` float32 ``(nnz,)``);
csrc/spmm.cpp explains why CSR with the token dimension vectorized beats blocked
formats for magnitude-pruned weights. CPU calls go to ``minidiff._C`` (AVX-512 /
AVX2 / scalar, run-time dispatch, capped by ``MINIDIFF_SIMD``); CUDA tensors use
``torch.sparse.mm`` (cuSPARSE). Registered as ``torch.ops.minidiff.sparse_linear``
(:mod:`minidiff.ops.dispatch`) with a fake implementation, so it traces under
``torch.compile``; eager calls go through the same op, which validates every
argument, the CSR structure included, before native code runs.
"""

from __future__ import annotations


import torch

from minidiff._native import cpu_core
from minidiff.ops._validate import check_dtype, check_ndim, num_threads
from minidiff.ops.dispatch import define

__all__ = ["to_csr", "csr_to_dense", "sparse_linear", "sparse_linear_reference"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress a dense (N, K) weight to ``(row_ptr, col, val)``, keeping exact nonzeros.

    Raises
    ------
    ValueError
        If ``weight`` is not a finite 2-D floating-point tensor.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point (out_features, in_features) tensor")
    w = weight.detach().float().cpu().contiguous()
    if w.numel() >= 2**31:
        raise ValueError(f"weight has {w.numel()} elements; int32 CSR indices support fewer than 2**31")
    mask = w != 0
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(mask.sum(dim=1), dim=0, out=row_ptr[1:])
    col = mask.nonzero()[:, 1]  # row-major order: rows ascending, columns ascending within a row
    return row_ptr.to(torch.int32), col.to(torch.int32).contiguous(), w[mask].contiguous()


def csr_to_dense(row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, k: int) -> torch.Tensor:
    """Dense float32 (N, K) matrix from CSR arrays."""
    n = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), (row_ptr[1:] - row_ptr[:-1]).long())
    dense = torch.zeros(n, k, dtype=val.dtype, device=val.device)
    dense[rows.to(val.device), col.long()] = val
    return dense


def _check_csr(row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int, k: int) -> None:
    if row_ptr.dtype != torch.int32 or row_ptr.shape != (n + 1,):
        raise ValueError(f"row_ptr must be int32 of shape ({n + 1},), got {row_ptr.dtype} {tuple(row_ptr.shape)}")
    if col.dtype != torch.int32 or val.dtype != torch.float32 or col.ndim != 1 or col.shape != val.shape:
        raise ValueError("col must be int32 and val float32, both 1-D of length nnz")
    if not (row_ptr.is_contiguous() and col.is_contiguous() and val.is_contiguous()):
        raise ValueError("CSR arrays must be contiguous (use to_csr())")


def validate_csr(row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int, k: int) -> None:
    """Full structural check (monotone row_ptr, column indices in [0, K)); O(nnz).

    Run once when a layer is built or loaded, so the kernel never reads out of bounds.
    """
    _check_csr(row_ptr, col, val, n, k)
    nnz = col.numel()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError(f"row_ptr must start at 0, be non-decreasing and end at nnz={nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= k):
        raise ValueError(f"column indices must lie in [0, {k})")


def _check_args(x, row_ptr, col, val, bias, in_features, out_dtype) -> None:
    """Shapes, dtypes and devices of a sparse_linear call (the op's boundary check)."""
    for t, name in ((x, "x"), (row_ptr, "row_ptr"), (col, "col"), (val, "val")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    check_ndim(x, 2, "x", "(M, K)")
    check_dtype(x, _FLOAT_DTYPES, "x")
    check_ndim(row_ptr, 1, "row_ptr", "(out_features + 1,)")
    if row_ptr.shape[0] < 1:
        raise ValueError("row_ptr must hold out_features + 1 >= 1 entries (use to_csr())")
    n = row_ptr.shape[0] - 1
    k = x.shape[1]
    if int(in_features) != k:
        raise ValueError(f"x has {k} features but in_features={in_features}")
    _check_csr(row_ptr, col, val, n, k)
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or bias.shape != (n,)):
        raise ValueError(f"bias must be a floating tensor of shape ({n},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    check_dtype(torch.empty(0, dtype=out_dtype), _FLOAT_DTYPES, "out_dtype")
    devices = {t.device for t in (x, row_ptr, col, val) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"x, the CSR arrays and bias must be on one device, got {sorted(map(str, devices))}")


def _sparse_linear_kernel(x, row_ptr, col, val, bias, in_features, out_dtype):
    _check_args(x, row_ptr, col, val, bias, in_features, out_dtype)
    m, k = x.shape
    n = row_ptr.shape[0] - 1
    if x.device.type == "cuda":
        validate_csr(row_ptr, col, val, n, k)  # torch.sparse does not check the structure
        w = torch.sparse_csr_tensor(row_ptr.long(), col.long(), val, size=(n, k))
        out = torch.sparse.mm(w, x.float().T).T
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    xf = x.float().contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    if m and n:
        # the native call checks the CSR structure (row_ptr monotone from 0 to nnz,
        # columns in [0, K)) before the kernel reads through it
        cpu_core().spmm_csr_linear(xf.data_ptr(), m, k, row_ptr.data_ptr(), col.data_ptr(), val.data_ptr(), n,
                                   col.numel(), 0 if b is None else b.data_ptr(), out.data_ptr(), num_threads())
    elif n:
        validate_csr(row_ptr, col, val, n, k)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _fake(x, row_ptr, col, val, bias, in_features, out_dtype):
    _check_args(x, row_ptr, col, val, bias, in_features, out_dtype)  # metadata only: no data read
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1), dtype=out_dtype)


_sparse_linear_op = define(
    "sparse_linear",
    "(Tensor x, Tensor row_ptr, Tensor col, Tensor val, Tensor? bias, int in_features, "
    "ScalarType out_dtype) -> Tensor",
    _sparse_linear_kernel, _fake)
_sparse_linear_impl = _sparse_linear_op  # eager and compiled calls share the registered op


def sparse_linear(x: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Y = X W^T + b`` for a 2-D ``x (M, K)`` and W in CSR (see :func:`to_csr`).

    Runs ``torch.ops.minidiff.sparse_linear``, which checks shapes, dtypes and
    devices, and the CSR structure (row pointers from 0 to nnz, non-decreasing;
    column indices in ``[0, K)``) before the kernel reads through it: bad arrays
    raise ``ValueError``.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch tensor, got {type(x).__name__}")
    check_ndim(x, 2, "x", "(M, K)")
    return _sparse_linear_op(x, row_ptr, col, val, bias, x.shape[1], out_dtype)


def sparse_linear_reference(x: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference: densify W and compute ``X W^T + b`` in float64."""
    w = csr_to_dense(row_ptr.cpu(), col.cpu(), val.cpu(), x.shape[1]).double()
    out = x.cpu().double() @ w.T
    if bias is not None:
        out = out + bias.cpu().double()[None, :]
    return out
