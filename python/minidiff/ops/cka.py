"""Dispatch and float64 references for the CKA statistics.

The op
------
``cka_batch_terms(x, y, offs_x, offs_y)`` takes one batch of two models'
stacked, shifted layers ``x = [X_1 .. X_Lx] (b, Dx)``, ``y = [Y_1 .. Y_Ly] (b, Dy)``
(``offs_*`` are the layer boundaries, ``[0, d_1, d_1 + d_2, ..., D]``) and returns
the per-sample norm and vector terms of the streaming linear-kernel HSIC
estimators (docs/architecture.md, "Mathematics"), all float64, in this order (``TERMS``):

=====  =============  ==========================================
name   shape          value
=====  =============  ==========================================
sx     (Dx,)          sum_i x_i
sy     (Dy,)          sum_i y_i
na     (Lx,)          sum_i a_il,      a_il = ||x_il||^2
nb     (Ly,)          sum_i b_im,      b_im = ||y_im||^2
ay     (Lx, Dy)       sum_i a_il y_i
bx     (Ly, Dx)       sum_i b_im x_i
ab     (Lx, Ly)       sum_i a_il b_im
axd    (Dx,)          sum_i a_{i,l(j)} x_ij  (layer l(j) holds column j)
byd    (Dy,)          sum_i b_{i,m(j)} y_ij
aa     (Lx,)          sum_i a_il^2
bb     (Ly,)          sum_i b_im^2
=====  =============  ==========================================

Backends (chosen by :mod:`minidiff.ops.dispatch`, family ``cka``): CPU tensors ->
``minidiff._C.cka_batch_terms`` (fused, threaded, AVX2/AVX-512); CUDA tensors ->
the Triton kernel ``minidiff.kernels.cka`` (torch reference on the device when
Triton is missing). The cross-product ``x^T y`` is a plain GEMM and stays in
torch. The op is registered as ``torch.ops.minidiff.cka_batch_terms`` with a
fake implementation, so it traces under ``torch.compile``; eager calls use the
same op, which validates shapes, dtypes, devices and layer offsets first.

References
----------
``batch_terms_reference`` computes the same terms in float64 torch.
``gram_linear``, ``gram_rbf``, ``hsic_reference`` and ``cka_reference`` compute
CKA straight from the definitions (Gram matrices, centering matrix ``H``,
U-centering) in float64; the tests hold every fast path against them.
"""

from __future__ import annotations

import math

import torch

from minidiff._native import cpu_core, triton_available
from minidiff.ops._validate import num_threads
from minidiff.ops.dispatch import check_backend, define, interpreting

TERMS = ("sx", "sy", "na", "nb", "ay", "bx", "ab", "axd", "byd", "aa", "bb")
FLOAT_DTYPES = (torch.float32, torch.float64)


def _term_shapes(dx: int, dy: int, lx: int, ly: int) -> list[tuple[int, ...]]:
    return [(dx,), (dy,), (lx,), (ly,), (lx, dy), (ly, dx), (lx, ly), (dx,), (dy,), (lx,), (ly,)]


def check_offsets(offs: list[int], width: int, name: str) -> list[int]:
    offs = [int(o) for o in offs]
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != width or any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"{name} must be layer boundaries 0 < ... < {width} (strictly increasing, "
                         f"ending at the stacked width {width}), got {offs}")
    return offs


def _check_batch(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int]) -> None:
    for t, name in ((x, "x"), (y, "y")):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor (batch, stacked width)")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; cka_batch_terms takes float32 or float64")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError("x and y must share dtype and device")
    check_offsets(offs_x, x.shape[1], "offs_x")
    check_offsets(offs_y, y.shape[1], "offs_y")


# -- references ----------------------------------------------------------------
def layer_index(offs: list[int], device=None) -> torch.Tensor:
    """Column -> layer index for stacked layers with boundaries ``offs``."""
    widths = torch.tensor([b - a for a, b in zip(offs, offs[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(offs) - 1, device=device), widths)


def batch_terms_reference(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int]) -> list[torch.Tensor]:
    """Float64 torch reference of ``cka_batch_terms`` (same order as ``TERMS``)."""
    x, y = x.double(), y.double()
    ix, iy = layer_index(offs_x, x.device), layer_index(offs_y, y.device)
    lx, ly = len(offs_x) - 1, len(offs_y) - 1
    a = torch.zeros(x.shape[0], lx, dtype=torch.float64, device=x.device).index_add_(1, ix, x * x)
    b = torch.zeros(y.shape[0], ly, dtype=torch.float64, device=y.device).index_add_(1, iy, y * y)
    return [x.sum(0), y.sum(0), a.sum(0), b.sum(0), a.T @ y, b.T @ x, a.T @ b,
            (a[:, ix] * x).sum(0), (b[:, iy] * y).sum(0), (a * a).sum(0), (b * b).sum(0)]


def _batch_terms_native(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int]) -> list[torch.Tensor]:
    C = cpu_core()
    x, y = x.contiguous(), y.contiguous()
    b, dx = x.shape
    dy = y.shape[1]
    lx, ly = len(offs_x) - 1, len(offs_y) - 1
    out = torch.empty(C.cka_packed_size(dx, dy, lx, ly), dtype=torch.float64)  # zeroed by _C
    if b == 0:
        return out.zero_()
    C.cka_batch_terms(x.data_ptr(), y.data_ptr(), b, dx, dy, offs_x, offs_y, out.data_ptr(),
                      str(x.dtype).replace("torch.", ""), num_threads())
    return out


def unpack(packed: torch.Tensor, dx: int, dy: int, lx: int, ly: int) -> list[torch.Tensor]:
    """Split a packed float64 buffer into the terms (views, in ``TERMS`` order)."""
    shapes = _term_shapes(dx, dy, lx, ly)
    parts = torch.split(packed, [math.prod(s) for s in shapes])
    return [p.view(s) for p, s in zip(parts, shapes)]


def pack(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in terms])


def _batch_terms_triton(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int]) -> torch.Tensor:
    from minidiff.kernels.cka import cka_batch_terms as kernel

    return kernel(x.contiguous(), y.contiguous(), offs_x, offs_y)


def _candidates(device: torch.device) -> list[str]:
    """Backends that can run ``cka_batch_terms`` on ``device``, default first."""
    if device.type == "cpu":
        return ["native"] + (["triton"] if interpreting() and triton_available() else []) + ["torch"]
    return (["triton"] if triton_available() else []) + ["torch"]


def _cka_batch_terms_kernel(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int],
                            backend: str = "auto") -> torch.Tensor:
    """Packed float64 terms (one buffer, see ``unpack``); arguments validated first."""
    _check_batch(x, y, offs_x, offs_y)
    name = check_backend(backend, "cka", _candidates(x.device))
    if name == "native":
        return _batch_terms_native(x, y, offs_x, offs_y)
    if name == "triton":
        return _batch_terms_triton(x, y, offs_x, offs_y)
    return pack(batch_terms_reference(x, y, offs_x, offs_y))


def _fake(x, y, offs_x, offs_y, backend="auto"):
    _check_batch(x, y, offs_x, offs_y)
    shapes = _term_shapes(x.shape[1], y.shape[1], len(offs_x) - 1, len(offs_y) - 1)
    return x.new_empty(sum(math.prod(s) for s in shapes), dtype=torch.float64)


_cka_batch_terms_op = define("cka_batch_terms",
                             '(Tensor x, Tensor y, int[] offs_x, int[] offs_y, str backend="auto") -> Tensor',
                             _cka_batch_terms_kernel, _fake)


def batch_terms(x: torch.Tensor, y: torch.Tensor, offs_x: list[int], offs_y: list[int],
                backend: str = "auto") -> list[torch.Tensor]:
    """The terms of ``torch.ops.minidiff.cka_batch_terms`` (see the module docstring),
    unpacked into views in ``TERMS`` order.

    ``backend``: ``"auto"`` (``minidiff.ops.dispatch``: ``_C`` on CPU, Triton on
    CUDA, unless ``MINIDIFF_BACKEND[_CKA]`` prefers another that applies),
    ``"native"``, ``"triton"`` or ``"reference"`` (float64 torch). Every choice
    runs through the registered op, which validates its arguments.
    """
    _check_batch(x, y, offs_x, offs_y)
    offs_x, offs_y = [int(o) for o in offs_x], [int(o) for o in offs_y]
    dims = (x.shape[1], y.shape[1], len(offs_x) - 1, len(offs_y) - 1)
    return unpack(_cka_batch_terms_op(x, y, offs_x, offs_y, backend), *dims)


# -- CKA from the definitions (float64, Gram form) --------------------------------
def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """``K = X X^T`` in float64."""
    x = x.double()
    return x @ x.T


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram ``exp(-||x_i - x_j||^2 / (2 sigma^2))`` with
    ``sigma^2 = threshold^2 * median`` of the squared distances over the full
    n x n matrix, diagonal included (Kornblith et al. 2019)."""
    x = x.double()
    dots = x @ x.T
    sq = torch.diagonal(dots)
    d2 = sq[:, None] + sq[None, :] - 2 * dots
    # numpy's median of an even count averages the two middle values; torch's does not.
    flat = d2.flatten().sort().values
    m = flat.numel()
    med = flat[m // 2] if m % 2 else (flat[m // 2 - 1] + flat[m // 2]) / 2
    return torch.exp(-d2 / (2 * threshold ** 2 * med))


def hsic_reference(K: torch.Tensor, L: torch.Tensor, estimator: str = "biased") -> torch.Tensor:
    """HSIC from Gram matrices, float64.

    biased:   ``tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n`` (Gretton et al. 2005).
    unbiased: ``[tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))``
    with zero-diagonal ``K~, L~`` (Song et al. 2012), n >= 4.
    """
    K, L = K.double(), L.double()
    n = K.shape[0]
    if estimator == "biased":
        H = torch.eye(n, dtype=torch.float64, device=K.device) - 1.0 / n
        return ((H @ K @ H) * L.T).sum() / (n - 1) ** 2                  # tr(K H L H) = tr((HKH) L)
    if estimator == "unbiased":
        Kt = K - torch.diag(torch.diagonal(K))
        Lt = L - torch.diag(torch.diagonal(L))
        one = torch.ones(n, dtype=torch.float64, device=K.device)
        return ((Kt * Lt.T).sum() + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * ((one @ Kt) @ (Lt @ one))) / (n * (n - 3))
    raise ValueError(f"unknown estimator {estimator!r}")


def cka_reference(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", estimator: str = "biased",
                  threshold: float = 1.0) -> float:
    """``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` from the definitions, float64."""
    gram = gram_linear if kernel == "linear" else (lambda z: gram_rbf(z, threshold))
    K, L = gram(torch.as_tensor(x)), gram(torch.as_tensor(y))
    kl = hsic_reference(K, L, estimator)
    return float(kl / torch.sqrt(hsic_reference(K, K, estimator) * hsic_reference(L, L, estimator)))
