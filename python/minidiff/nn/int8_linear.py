"""``Int8Linear``: int8 replacement for ``torch.nn.Linear`` (W8A8 or weight-only).

W8A8 computes ``Y = (Q(X) W_q^T) s_x s_w^T + b`` with per-token activation scales
``s_x`` (computed on the fly, fused into the native call) and per-output-channel
weight scales ``s_w``; the int8 product accumulates exactly in int32 (see
``minidiff.ops.int8``). Weight-only computes ``Y = X (W_q s_w)^T + b``.

The quantization arithmetic (and its edge cases: zero rows, NaN/Inf) is the one of
``minidiff.quant``. ``ReferenceInt8Linear`` is the same layer in plain torch with an exact
float64 integer product: the reference the fast module is checked against, and the
fallback ``minidiff.compress.quantize(..., backend="reference")`` builds.
"""

from __future__ import annotations

import torch
from torch import nn

from typing import Any

from minidiff.ops import int8 as int8_ops
from minidiff.quant import dequantize_weight_int8, quantize_per_token_reference, quantize_weight_int8

__all__ = ["Int8Linear", "ReferenceInt8Linear"]

_MODES = ("w8a8", "weight_only")


class Int8Linear(nn.Module):
    """Linear layer with int8 weights (per-output-channel symmetric scales).

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``.
    bias : bool
        Whether the layer has a bias (kept in the float layer's dtype).
    mode : {"w8a8", "weight_only"}
        ``"w8a8"`` quantizes activations per token at run time (int8 x int8 -> int32);
        ``"weight_only"`` keeps activations in floating point.
    dtype : torch.dtype
        Output dtype (the float layer's dtype).

    Buffers (the state dict): ``weight_int8`` (N, K) int8, ``weight_scale`` (N,) float32,
    ``bias`` (N,) when present. The CPU kernel's packed weight is derived from
    ``weight_int8`` (non-persistent) and rebuilt on ``load_state_dict`` and device moves.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if in_features > int8_ops.MAX_K:
            raise ValueError(f"in_features={in_features} exceeds the int32-exact limit {int8_ops.MAX_K}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.out_dtype = dtype
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.register_buffer("_w_packed", torch.empty(0, dtype=torch.int8, device=device), persistent=False)
        self.register_buffer("_w_colsum", torch.empty(0, dtype=torch.int32, device=device), persistent=False)
        self._repack()
        self.register_load_state_dict_post_hook(lambda module, keys: module._repack())

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8", name: str | None = None) -> "Int8Linear":
        """Quantize a float ``nn.Linear``.

        Raises
        ------
        ValueError
            If ``linear`` is not an ``nn.Linear``, ``mode`` is unknown, or the weight holds
            NaN/Inf (the message names the layer when ``name`` is given).
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects a torch.nn.Linear, got {type(linear).__name__}")
        w_int8, scale = quantize_weight_int8(linear.weight, name=name)
        dtype = linear.weight.dtype if linear.weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode, dtype=dtype,
                device=linear.weight.device)
        with torch.no_grad():
            m.weight_int8.copy_(w_int8)
            m.weight_scale.copy_(scale)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        m._repack()
        return m

    def _repack(self) -> None:
        """Rebuild the CPU kernel's packed weight from ``weight_int8`` (CPU only)."""
        if self.weight_int8.device.type == "cpu" and self.mode == "w8a8":
            packed, colsum = int8_ops.pack_weight(self.weight_int8)
        else:
            packed = torch.empty(0, dtype=torch.int8, device=self.weight_int8.device)
            colsum = torch.empty(0, dtype=torch.int32, device=self.weight_int8.device)
        self._w_packed = packed
        self._w_colsum = colsum

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        super()._apply(fn, recurse)
        # scales stay float32 and the weight int8 whatever .half()/.to(dtype) did
        self.weight_scale = self.weight_scale.float()
        if probe.dtype in (torch.float32, torch.bfloat16, torch.float16):
            self.out_dtype = probe.dtype
        self._repack()
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """``W_q * s_w`` as float32 (N, K)."""
        return dequantize_weight_int8(self.weight_int8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; "
                             f"this Int8Linear expects {self.in_features}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"input dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bufs = self._buffers  # one dict lookup instead of nn.Module.__getattr__ per buffer
        if x2.device != bufs["weight_int8"].device:
            raise ValueError(f"input is on {x2.device} but this Int8Linear is on {bufs['weight_int8'].device}; "
                             "move one of them (module.to(device) or x.to(device))")
        args = (x2, bufs["weight_int8"], bufs["weight_scale"], bufs.get("bias"))
        # eager and compiled calls go through the same registered (validating) op
        if self.mode == "w8a8":
            cpu = x2.device.type == "cpu"
            packed = (bufs["_w_packed"], bufs["_w_colsum"]) if cpu else (None, None)
            y = int8_ops._int8_linear_op(*args, *packed, self.out_dtype)
        else:
            y = int8_ops._int8_weight_only_op(*args, self.out_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}, out_dtype={self.out_dtype}")


class ReferenceInt8Linear(nn.Module):
    """Pure-torch int8 Linear: the exact reference of :class:`Int8Linear`'s arithmetic.

    W8A8: ``Y[m, n] = s_x[m] s_w[n] sum_k X_q[m, k] W_q[n, k] + b[n]`` with ``(X_q, s_x)`` from
    :func:`minidiff.quant.quantize_per_token_reference`, the integer sum accumulated exactly
    (float64 holds every int8 dot product of ``K < 2**38`` exactly) and the epilogue in float64,
    rounded once to the input dtype. Weight-only: ``Y = X (s_w W_q)^T + b`` in the input dtype.

    Buffers: ``qweight`` int8 ``(out, in)``, ``weight_scale`` float32 ``(out,)``; parameter
    ``bias`` (float32, frozen) or None. ``mode`` is ``"w8a8"`` or ``"weight_only"``.
    """

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 mode: str = "w8a8") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = int(qweight.shape[0]), int(qweight.shape[1])
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).contiguous())
        self.bias = nn.Parameter(bias.detach().clone().to(torch.float32), requires_grad=False) \
            if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8", name: str | None = None) -> "ReferenceInt8Linear":
        """Quantize a float ``nn.Linear`` with :func:`minidiff.quant.quantize_weight_int8`
        (``ValueError`` naming ``name`` if its weight holds NaN/Inf)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects a torch.nn.Linear, got {type(linear).__name__}")
        q, s = quantize_weight_int8(linear.weight, name=name)
        return cls(q, s, linear.bias, mode)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, mode: str) -> "ReferenceInt8Linear":
        """A skeleton with zero weights (to load a state dict into)."""
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.zeros(out_features),
                   torch.zeros(out_features) if bias else None, mode)

    def spec(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def dequantized_weight(self) -> torch.Tensor:
        """``W_q * s_w`` as float32 (N, K)."""
        return dequantize_weight_int8(self.qweight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "weight_only":
            y = x @ self.dequantized_weight().to(x.dtype).T
        else:
            with torch.no_grad():
                q, r = quantize_per_token_reference(x)
                acc = q.to(torch.float64) @ self.qweight.to(torch.float64).T  # exact integer sums
                y = (acc * r.to(torch.float64)[..., None] * self.weight_scale.to(torch.float64)).to(x.dtype)
            if torch.is_grad_enabled() and x.requires_grad:
                # straight-through estimator (Bengio et al. 2013) for the activation rounding: the value
                # stays the exact W8A8 result, the gradient is that of x (s Q)^T, so gradient attacks
                # (PGD in embedding space) work on quantized models
                lin = x @ self.dequantized_weight().to(x.dtype).T
                y = y + (lin - lin.detach())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"
