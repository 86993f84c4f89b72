"""Symmetric int8: per-output-channel weights, per-token activations, exact references.

This module is the single definition of minidiff's int8 arithmetic. The native CPU
kernel (``csrc/int8_gemm.cpp``), the Triton kernel (``kernels/int8_matmul.py``) and
the CUDA kernel (``csrc/cuda/int8_gemm.cu``) implement :func:`quantize_per_token_reference`
bit for bit, and every int8 layer (``minidiff.nn.Int8Linear``,
``minidiff.nn.ReferenceInt8Linear``) gets its weights from :func:`quantize_weight_int8`.

Formulas (symmetric int8 with the range [-127, 127], as in LLM.int8() and SmoothQuant's
W8A8: Dettmers et al. 2022, Xiao et al. 2023; Jacob et al. 2018 for the affine scheme)::

    weights, per output channel n:  s_w[n] = fl32(max_k |W[n, k]| / 127)
                                    W_q[n, k] = clamp(rint(W[n, k] / s_w[n]), -127, 127)
    activations, per token m:       s_x[m] = fl32(max_k |X[m, k]| / 127)
                                    X_q[m, k] = clamp(rint(fl32(X[m, k] / s_x[m])), -127, 127)
    W8A8 Linear:                    Y[m, n] = s_x[m] s_w[n] sum_k X_q[m, k] W_q[n, k] + b[n]
    weight-only Linear:             Y = X (s_w * W_q)^T + b

``rint`` rounds half to even. The weight division is done in float64 against the
stored float32 scale (so ``s_w W_q`` is the best the stored scale can express); the
activation arithmetic is float32 throughout (IEEE division), which is what the kernels do.

Edge cases, the same everywhere in minidiff:

* **all-zero rows** (and rows whose ``absmax / 127`` underflows to 0 in float32) get
  scale 0 and codes 0; they dequantize to exactly 0 and nothing is divided by zero;
* **non-finite weights** (NaN or +-Inf) are refused with a ``ValueError`` naming the layer:
  a quantized model must not silently turn a broken weight into finite numbers;
* **non-finite activations**: a token (row) holding NaN or +-Inf gets scale NaN and codes 0,
  so every output of that token is NaN, as the float layer's would be. Other rows are
  unaffected.
"""

from __future__ import annotations

import torch

from minidiff.ops._validate import check_has_data

__all__ = [
    "INT8_QMAX",
    "check_finite_weight",
    "quantize_weight_int8",
    "dequantize_weight_int8",
    "quantize_per_token_reference",
    "int8_matmul_reference",
    "int8_linear_reference",
    "int8_weight_only_linear_reference",
]

INT8_QMAX = 127
"""Largest int8 code magnitude: the symmetric range is [-127, 127] (-128 is never used)."""


def check_finite_weight(weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Validate a 2-D floating weight for quantization and return it detached.

    Raises
    ------
    ValueError
        If ``weight`` is not a 2-D floating tensor, or holds NaN/Inf (the message names
        the layer when ``name`` is given).
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {type(weight).__name__}"
                         + (f" of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""))
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point to quantize, got {weight.dtype}")
    w = check_has_data(weight, f"the weight of layer {name!r}" if name else "weight").detach()
    bad = int((~torch.isfinite(w)).sum().item())
    if bad:
        where = f"layer {name!r}" if name else "this layer"
        raise ValueError(f"cannot quantize {where}: its weight holds {bad} non-finite value(s) (NaN or Inf); "
                         "fix or re-train the layer before quantizing")
    return w


def quantize_weight_int8(weight: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 quantization of a Linear weight ``(out, in)``.

    ``s[n] = fl32(max_k |W[n, k]| / 127)`` and ``W_q[n, k] = clamp(rint(W[n, k] / s[n]), -127, 127)``
    (division in float64 against the float32 scale; ``rint`` ties to even). All-zero rows
    get ``s = 0`` and ``W_q = 0``.

    Parameters
    ----------
    weight : Tensor (out_features, in_features), floating
        For ``transformers``' ``Conv1D`` (stored ``(in, out)``) pass ``weight.T``.
    name : str, optional
        The layer's name, used in error messages.

    Returns
    -------
    (W_q int8 (out, in), s float32 (out,)), both contiguous, on the weight's device.

    Raises
    ------
    ValueError
        Not a 2-D floating tensor, or NaN/Inf in the weight.
    """
    w = check_finite_weight(weight, name)
    scale = (w.float().abs().amax(dim=1) / INT8_QMAX).to(torch.float32) if w.shape[1] else \
        torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    ok = scale > 0
    safe = torch.where(ok, scale.double(), torch.ones_like(scale, dtype=torch.float64))
    q = torch.round(w.to(torch.float64) / safe[:, None]).clamp_(-INT8_QMAX, INT8_QMAX)
    q = torch.where(ok[:, None], q, torch.zeros_like(q)).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_weight_int8(w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``s_w[n] * W_q[n, k]`` as float32 ``(out, in)`` (zero rows give exactly 0)."""
    return w_int8.to(torch.float32) * w_scale.to(torch.float32)[:, None]


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric int8 quantization, the definition the kernels match bit for bit.

    With ``x`` cast to float32 (exact for float16/bfloat16)::

        s[m] = fl32(max_k |x[m, k]| / 127)
        q[m, k] = clamp(rint(fl32(x[m, k] / s[m])), -127, 127)

    Rows with NaN/Inf get ``s = NaN`` and ``q = 0`` (their outputs become NaN); all-zero
    rows get ``s = 0`` and ``q = 0``. Pure torch, runs on ``x``'s device.

    Parameters
    ----------
    x : Tensor (..., K), floating

    Returns
    -------
    (q int8 (..., K), s float32 (...))
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("quantize_per_token_reference needs a floating tensor of shape (..., K), got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.float32)
    if k:
        amax = x2.abs().amax(dim=1)
    else:
        amax = torch.zeros(x2.shape[0], dtype=torch.float32, device=x.device)
    finite = torch.isfinite(x2).all(dim=1)
    scale = torch.where(finite, amax / INT8_QMAX, torch.full_like(amax, float("nan")))
    ok = scale > 0  # False for 0 and NaN
    safe = torch.where(ok, scale, torch.ones_like(scale))
    q = torch.round(x2 / safe[:, None]).clamp_(-INT8_QMAX, INT8_QMAX)
    q = torch.where(ok[:, None], q, torch.zeros_like(q)).to(torch.int8)
    return q.reshape(*lead, k), scale.reshape(lead)


def int8_matmul_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a (M, K) int8 @ w (N, K) int8 ^T`` as int32 on any device.

    CPU uses torch's integer matmul; elsewhere float64 (products of int8 sums are exact
    below 2**53; torch has no integer matmul on CUDA).
    """
    if a.device.type == "cpu":
        return a.int() @ w.int().T
    return (a.double() @ w.double().T).to(torch.int32)


def int8_linear_reference(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference of the W8A8 Linear, on ``x``'s device.

    ``Y[m, n] = s_x[m] s_w[n] (X_q W_q^T)[m, n] + b[n]`` with ``(X_q, s_x)`` from
    :func:`quantize_per_token_reference`, the integer product exact and the epilogue in float64.
    ``x`` is ``(M, K)``; the result is float64 ``(M, N)``.
    """
    q, s = quantize_per_token_reference(x)
    acc = int8_matmul_reference(q, w_int8.to(x.device)).double()
    out = acc * s.double()[:, None] * w_scale.to(x.device).double()[None, :]
    if bias is not None:
        out = out + bias.to(x.device).double()[None, :]
    return out


def int8_weight_only_linear_reference(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference of the weight-only int8 Linear ``Y = X (s_w * W_q)^T + b`` on ``x``'s device."""
    w = w_int8.to(x.device).double() * w_scale.to(x.device).double()[:, None]
    out = x.double() @ w.T
    if bias is not None:
        out = out + bias.to(x.device).double()[None, :]
    return out
