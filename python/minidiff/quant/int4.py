"""Group-wise int4 weight quantization (round-to-nearest), packed two codes per byte.

The weight-only int4 scheme of GPTQ/AWQ-style checkpoints and torchao's
``int4_weight_only`` (Frantar et al. 2023, Lin et al. 2024), with plain round-to-nearest
instead of a calibrated solver. Each output row of ``W (out, in)`` is cut into
``in / g`` groups of ``g`` consecutive input weights (``g`` = ``group_size``, 32 or 128
in the recipes); each group ``G`` gets its own float32 scale::

    symmetric:   s = fl32(max_{k in G} |W_k| / 7),                u_k = clamp(rint(W_k / s), -7, 7) + 8
                 W_hat_k = s (u_k - 8)
    asymmetric:  lo = min(0, min_G W), hi = max(0, max_G W)
                 s = fl32((hi - lo) / 15),  z = clamp(rint(-lo / s), 0, 15)  (uint8 zero point)
                 u_k = clamp(rint(W_k / s) + z, 0, 15),             W_hat_k = s (u_k - z)

``u`` is the stored unsigned 4-bit code. The symmetric range is [-7, 7] (like int8's
[-127, 127], the code 0 = -8 is unused, so ``W_hat = -W`` quantizes ``-W``); the
asymmetric range always contains 0, so a zero weight is exact and ``z`` is an integer.
Divisions are float64 against the stored float32 scale; ``rint`` ties to even.

Packing: byte ``j`` of a row holds code ``2j`` in its low nibble and code ``2j + 1`` in
its high nibble: ``packed = u[..., 0::2] | (u[..., 1::2] << 4)`` (uint8, ``(out, in / 2)``).

Edge cases (the same rules as :mod:`minidiff.quant.int8`): an all-zero group gets
``s = 0`` and the code of zero (8, or ``z = 0``), and dequantizes to exactly 0 without
dividing by zero; NaN/Inf in a weight raise ``ValueError`` naming the layer.
``in_features`` must be a multiple of ``group_size`` (a ``ValueError`` says which layer to
exclude otherwise): padding a partial group would store weights the layer does not have.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .int8 import check_finite_weight

__all__ = [
    "INT4_SYMMETRIC_QMAX",
    "INT4_LEVELS",
    "Int4Weight",
    "check_group_size",
    "pack_int4",
    "unpack_int4",
    "quantize_weight_int4",
    "dequantize_weight_int4",
    "int4_weight_only_linear_reference",
]

INT4_SYMMETRIC_QMAX = 7
"""Symmetric int4 codes lie in [-7, 7] (stored with an offset of 8)."""

INT4_LEVELS = 15
"""Asymmetric int4: ``hi - lo`` spans 15 steps, codes 0..15."""


class Int4Weight(NamedTuple):
    """A group-wise int4 weight.

    Attributes
    ----------
    packed : uint8 (out, in / 2)
        Two 4-bit codes per byte (low nibble = even input index).
    scale : float32 (out, in / group_size)
    zero : uint8 (out, in / group_size) or None
        Integer zero points (asymmetric); None for symmetric (zero point 8).
    group_size : int
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int


def check_group_size(in_features: int, group_size: int, name: str | None = None) -> int:
    """Validate ``group_size`` (a positive even integer dividing ``in_features``) and return it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be a positive even integer (32 or 128 are usual), got {group_size!r}")
    if in_features % group_size:
        where = f"layer {name!r}" if name else "this layer"
        raise ValueError(f"cannot quantize {where} to int4 with group_size={group_size}: in_features={in_features} "
                         f"is not a multiple of it; choose a group_size that divides {in_features} or exclude the "
                         "layer with layers=")
    return group_size


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes ``(..., K)`` (K even, values 0..15) into uint8 ``(..., K / 2)``."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of codes in the last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("pack_int4 codes must lie in [0, 15]")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., K / 2)`` -> uint8 codes ``(..., K)``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs a uint8 tensor, got {packed.dtype}")
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_weight_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                         name: str | None = None) -> Int4Weight:
    """Group-wise round-to-nearest int4 quantization of a Linear weight ``(out, in)`` (module docstring).

    Parameters
    ----------
    weight : Tensor (out_features, in_features), floating
        For ``transformers``' ``Conv1D`` pass ``weight.T``.
    group_size : int
        Consecutive input weights sharing one scale; must divide ``in_features``.
    symmetric : bool
        Codes in [-7, 7] with one scale per group, or 16 levels with a scale and an
        integer zero point per group.
    name : str, optional
        The layer's name for error messages.

    Raises
    ------
    ValueError
        Not a 2-D floating tensor, NaN/Inf in it, or ``group_size`` not dividing ``in_features``.
    """
    w = check_finite_weight(weight, name)
    out_f, in_f = w.shape
    g = check_group_size(in_f, group_size, name)
    wg = w.to(torch.float64).reshape(out_f, in_f // g, g)
    if symmetric:
        scale = (w.float().abs().reshape(out_f, in_f // g, g).amax(dim=-1) / INT4_SYMMETRIC_QMAX).to(torch.float32)
        ok = scale > 0
        safe = torch.where(ok, scale.double(), torch.ones_like(scale, dtype=torch.float64))
        q = torch.round(wg / safe[..., None]).clamp_(-INT4_SYMMETRIC_QMAX, INT4_SYMMETRIC_QMAX)
        q = torch.where(ok[..., None], q, torch.zeros_like(q)) + (INT4_SYMMETRIC_QMAX + 1)
        zero = None
    else:
        wf = w.float().reshape(out_f, in_f // g, g)
        lo = wf.amin(dim=-1).clamp(max=0.0).double()
        hi = wf.amax(dim=-1).clamp(min=0.0).double()
        scale = ((hi - lo) / INT4_LEVELS).to(torch.float32)
        ok = scale > 0
        safe = torch.where(ok, scale.double(), torch.ones_like(scale, dtype=torch.float64))
        z = torch.where(ok, torch.round(-lo / safe).clamp(0, INT4_LEVELS), torch.zeros_like(lo))
        q = (torch.round(wg / safe[..., None]) + z[..., None]).clamp_(0, INT4_LEVELS)
        q = torch.where(ok[..., None], q, torch.zeros_like(q))
        zero = z.to(torch.uint8).contiguous()
    packed = pack_int4(q.reshape(out_f, in_f).to(torch.uint8))
    return Int4Weight(packed, scale.contiguous(), zero, g)


def dequantize_weight_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                           group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat[n, k] = s[n, k // g] * (u[n, k] - z[n, k // g])`` (z = 8 when ``zero`` is None).

    ``u - z`` is an exact small integer; the product is rounded once to ``dtype``
    (float32 by default; float64 gives the exact value). Zero groups give exactly 0.
    """
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor from quantize_weight_int4, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    # written in place into one buffer (unpack, - z, * s): each step is exact but the last,
    # and this is ~2x faster than materialising the integer codes first
    w = torch.empty(out_f, in_f // 2, 2, dtype=dtype, device=packed.device)
    w[..., 0] = packed & 0xF
    w[..., 1] = packed >> 4
    w = w.view(out_f, in_f // group_size, group_size)
    if zero is None:
        w.sub_(INT4_SYMMETRIC_QMAX + 1)
    else:
        w.sub_(zero.to(dtype)[..., None])
    w.mul_(scale.to(dtype)[..., None])
    return w.view(out_f, in_f)


def int4_weight_only_linear_reference(x: torch.Tensor, weight: Int4Weight,
                                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference ``Y = X W_hat^T + b`` with ``W_hat`` dequantized exactly in float64."""
    w = dequantize_weight_int4(weight.packed, weight.scale, weight.zero, weight.group_size, torch.float64)
    out = x.double() @ w.to(x.device).T
    if bias is not None:
        out = out + bias.to(x.device).double()
    return out
