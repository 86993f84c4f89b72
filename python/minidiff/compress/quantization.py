"""Post-training quantization: int8 dynamic (W8A8), int8 weight-only, fp16/bf16.

int8, symmetric (Jacob et al. 2018; the LLM.int8()/SmoothQuant W8A8 layout):

* weights, per output channel ``o``: ``s_o = max_i |W_oi| / 127``,
  ``Q_oi = round(W_oi / s_o)`` in [-127, 127];
* activations (``w8a8`` only), per token ``t``: ``r_t = max_i |x_ti| / 127``,
  ``q_ti = round(x_ti / r_t)``; ``y_to = r_t s_o sum_i q_ti Q_oi + b_o`` with
  the integer sum accumulated exactly (int32 on the kernels, float64 here);
* ``weight_only``: ``y = x (s * Q)^T + b`` in the activation dtype.

The layers are ``minidiff.nn.Int8Linear`` when that module is available (the
fast kernels) and :class:`ReferenceInt8Linear` (pure torch, exact reference)
otherwise or when ``backend="reference"``. ``torch.ao.quantization`` is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .variant import Variant, clone_model, make_manifest

INT8_METHODS = {"int8": "w8a8", "int8-dynamic": "w8a8", "w8a8": "w8a8",
                "int8-weight-only": "weight_only", "weight-only": "weight_only", "w8": "weight_only"}
FLOAT_METHODS = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_EXCLUDE = ("head", "classifier", "lm_head", "score")


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns ``(Q int8 (out, in), scale float32 (out,))``.

    An all-zero row gets scale 1 (its codes are all 0 either way).
    """
    w64 = w.detach().to(torch.float64)
    amax = w64.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w64 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``x (..., k)``: ``(q int8, scale float32 (..., 1))``."""
    x32 = x.to(torch.float32)
    amax = x32.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(x32 / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


class ReferenceInt8Linear(nn.Module):
    """Pure-torch int8 linear (exact reference of the W8A8 / weight-only maths above).

    Buffers: ``qweight`` int8 ``(out, in)``, ``weight_scale`` float32 ``(out,)``;
    parameter ``bias`` (float32) or None. ``mode`` is ``"w8a8"`` or ``"weight_only"``.
    """

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 mode: str = "w8a8") -> None:
        super().__init__()
        if mode not in ("w8a8", "weight_only"):
            raise ValueError(f"mode must be 'w8a8' or 'weight_only', got {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = int(qweight.shape[0]), int(qweight.shape[1])
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).contiguous())
        self.bias = nn.Parameter(bias.detach().clone().to(torch.float32), requires_grad=False) \
            if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8") -> "ReferenceInt8Linear":
        q, s = quantize_weight_per_channel(linear.weight)
        return cls(q, s, linear.bias, mode)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, mode: str) -> "ReferenceInt8Linear":
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features),
                   torch.zeros(out_features) if bias else None, mode)

    def spec(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.to(torch.float32) * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "weight_only":
            y = x @ self.dequantized_weight().to(x.dtype).T
        else:
            with torch.no_grad():
                q, r = quantize_per_token(x)
                acc = q.to(torch.float64) @ self.qweight.to(torch.float64).T  # exact integer sums
                y = (acc * r.to(torch.float64) * self.weight_scale.to(torch.float64)).to(x.dtype)
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


def _minidiff_int8() -> Any:
    try:
        from minidiff.nn import Int8Linear  # noqa: PLC0415
    except ImportError:
        return None
    return Int8Linear


def _cast_inputs_hook(dtype: torch.dtype):
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return v

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


def attach_input_cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating inputs to ``dtype`` on entry, so a half-precision model takes the
    same float32 batches as its base (integer inputs such as token ids pass as they are)."""
    model.register_forward_pre_hook(_cast_inputs_hook(dtype), with_kwargs=True)


def _select_linears(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    from minidiff.models.capture import resolve_layers

    if layers is None:
        names = [n for n, m in model.named_modules() if type(m) is nn.Linear
                 and n.rsplit(".", 1)[-1] not in DEFAULT_EXCLUDE and n not in DEFAULT_EXCLUDE]
    else:
        names = resolve_layers(model, layers)
        mods = dict(model.named_modules())
        bad = [n for n in names if type(mods[n]) is not nn.Linear]
        if bad:
            raise ValueError(f"layers {bad[:5]} are not nn.Linear modules; int8 quantization applies to Linear layers")
    return names


def quantize(model: nn.Module, method: str = "int8", *, layers: str | Sequence[str] | None = None,
             backend: str = "auto", seed: int | None = None, source_id: str | None = None) -> Variant:
    """Quantize a copy of ``model``.

    Parameters
    ----------
    model : nn.Module
        Left untouched.
    method
        ``"int8"`` / ``"int8-dynamic"`` / ``"w8a8"`` (per-channel int8 weights,
        per-token int8 activations), ``"int8-weight-only"``, ``"fp16"`` or ``"bf16"``.
    layers
        Linear layers to quantize (names / glob patterns). Default: every
        ``nn.Linear`` except a classification head named head/classifier/lm_head/score.
    backend
        ``"auto"`` (``minidiff.nn.Int8Linear`` if available, else the reference),
        ``"minidiff"`` or ``"reference"``.
    seed
        Recorded only (post-training quantization is deterministic).

    Returns
    -------
    Variant
    """
    if method in FLOAT_METHODS:
        dtype = FLOAT_METHODS[method]
        new = clone_model(model).to(dtype)
        attach_input_cast(new, dtype)
        new.eval()
        man = make_manifest(method, {"method": method, "dtype": str(dtype).replace("torch.", "")}, seed,
                            model, new, source_id=source_id)
        return Variant(new, man, tokenizer=getattr(model, "tokenizer", None))
    if method not in INT8_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of "
                         f"{sorted(INT8_METHODS) + sorted(FLOAT_METHODS)}")
    if backend not in ("auto", "minidiff", "reference"):
        raise ValueError(f"backend must be 'auto', 'minidiff' or 'reference', got {backend!r}")
    mode = INT8_METHODS[method]
    names = _select_linears(model, layers)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize to int8 "
                         "(conv layers and embeddings are not quantized); choose layers= explicitly or use fp16/bf16")
    fast = _minidiff_int8() if backend in ("auto", "minidiff") else None
    if backend == "minidiff" and fast is None:
        raise ValueError("backend='minidiff' needs minidiff.nn.Int8Linear, which is not available here")
    new = clone_model(model)
    from .variant import _set_submodule

    mods = dict(new.named_modules())
    for n in names:
        lin = mods[n]
        q = fast.from_linear(lin, mode=mode) if fast is not None else ReferenceInt8Linear.from_linear(lin, mode)
        _set_submodule(new, n, q)
    new.eval()
    params = {"method": method, "mode": mode, "layers": names,
              "backend": "minidiff" if fast is not None else "reference",
              "weights": "int8 symmetric per output channel",
              "activations": "int8 symmetric per token" if mode == "w8a8" else "unquantized"}
    man = make_manifest(method, params, seed, model, new, source_id=source_id)
    return Variant(new, man, tokenizer=getattr(model, "tokenizer", None))
