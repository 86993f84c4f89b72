"""Post-training quantization: int8 dynamic (W8A8), int8 weight-only, group-wise int4
weight-only, fp16/bf16.

The arithmetic is ``minidiff.quant`` (one quantizer for the whole package):

* int8, symmetric (Jacob et al. 2018; the LLM.int8()/SmoothQuant W8A8 layout):
  weights per output channel ``o``: ``s_o = max_i |W_oi| / 127``, ``Q_oi = rint(W_oi / s_o)``
  in [-127, 127]; activations (``w8a8`` only) per token ``t``: ``r_t = max_i |x_ti| / 127``,
  ``q_ti = rint(x_ti / r_t)``; ``y_to = r_t s_o sum_i q_ti Q_oi + b_o`` with the integer sum
  exact; ``weight_only``: ``y = x (s * Q)^T + b`` in the activation dtype;
* int4 weight-only, per group of ``group_size`` input weights, round-to-nearest, symmetric
  (codes [-7, 7]) or asymmetric (16 levels and an integer zero point), two codes per byte.

All-zero rows/groups dequantize to exactly 0; weights holding NaN/Inf are refused with a
``ValueError`` naming the layer; a token holding NaN/Inf gives NaN outputs (W8A8).

Which layers: every ``nn.Linear`` and every ``transformers`` ``Conv1D`` (GPT-2's
projections, weight stored ``(in, out)``: quantized as ``W^T`` and replaced by an
equivalent Linear-shaped module), except output heads (``head``, ``classifier``,
``lm_head``, ``score``) and layers whose weight is tied to an embedding (GPT-2's
``lm_head``). ``layers=`` overrides that: a tied head named there is quantized as a copy
and the input embedding stays in floating point (the two are no longer tied). Embeddings,
norms and convolutions stay in floating point.

The int8 layers are ``minidiff.nn.Int8Linear`` (the fast kernels) or
``minidiff.nn.ReferenceInt8Linear`` (pure torch, exact) with ``backend="reference"``;
int4 layers are ``minidiff.nn.Int4WeightOnlyLinear``. ``torch.ao.quantization`` is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from minidiff.models.saved import (Variant, _set_submodule, as_linear, attach_input_cast, clone_model,  # noqa: F401
                      default_layers, linear_types, make_manifest)
from minidiff.validation import check_module_has_data

INT8_METHODS = {"int8": "w8a8", "int8-dynamic": "w8a8", "w8a8": "w8a8",
                "int8-weight-only": "weight_only", "weight-only": "weight_only", "w8": "weight_only"}
INT4_METHODS = ("int4-weight-only", "int4")
FLOAT_METHODS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def __getattr__(name: str) -> Any:
    # ReferenceInt8Linear moved to minidiff.nn (it is a layer); old imports keep working
    if name == "ReferenceInt8Linear":
        from minidiff.nn import ReferenceInt8Linear

        return ReferenceInt8Linear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _select_linears(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    from minidiff.models.capture import resolve_layers

    kinds = linear_types()
    if layers is None:
        return default_layers(model, kinds)
    mods = dict(model.named_modules())
    names: list[str] = []
    for item in ([layers] if isinstance(layers, str) else list(layers)):
        got = resolve_layers(model, item)
        if isinstance(item, str) and any(c in item for c in "*?["):  # a pattern selects the Linears it matches
            got = [n for n in got if type(mods[n]) in kinds]
        names += [n for n in got if n not in names]
    bad = [n for n in names if type(mods[n]) not in kinds]
    if bad:
        raise ValueError(f"layers {bad[:5]} are not nn.Linear (or transformers Conv1D) modules; int8/int4 "
                         "quantization applies to Linear layers")
    return names


def quantize(model: nn.Module, method: str = "int8", *, layers: str | Sequence[str] | None = None,
             backend: str = "auto", group_size: int = 128, symmetric: bool = True, seed: int | None = None,
             source_id: str | None = None) -> Variant:
    """Quantize a copy of ``model``.

    Parameters
    ----------
    model : nn.Module
        Left untouched.
    method
        ``"int8"`` / ``"int8-dynamic"`` / ``"w8a8"`` (per-channel int8 weights, per-token int8
        activations), ``"int8-weight-only"``, ``"int4-weight-only"`` (group-wise int4 weights,
        activations in floating point), ``"fp16"`` or ``"bf16"``.
    layers
        Linear / ``Conv1D`` layers to quantize (names / glob patterns). Default: every one
        except output heads (head/classifier/lm_head/score) and layers tied to an embedding.
    backend
        int8 only: ``"auto"`` / ``"minidiff"`` (``minidiff.nn.Int8Linear``, the fast kernels) or
        ``"reference"`` (``minidiff.nn.ReferenceInt8Linear``).
    group_size : int
        int4 only: input weights per scale (32 or 128 are usual); must divide the
        ``in_features`` of every selected layer (else a ``ValueError`` names the layer).
    symmetric : bool
        int4 only: codes in [-7, 7] with one scale per group, or 16 levels with a scale
        and an integer zero point per group.
    seed
        Recorded only (post-training quantization is deterministic).

    Returns
    -------
    Variant
        ``manifest["parameters"]`` records the method, the layers and their scheme;
        ``manifest["parameters"]["quantized_weights"]`` the number of weights quantized.

    Raises
    ------
    ValueError
        Unknown method/backend, no layer to quantize, NaN/Inf in a weight (naming the
        layer), or an int4 ``group_size`` that does not divide a layer's ``in_features``.
    """
    check_module_has_data(model)
    if method in FLOAT_METHODS:
        dtype = FLOAT_METHODS[method]
        new = clone_model(model).to(dtype)
        attach_input_cast(new, dtype)
        new.eval()
        man = make_manifest(method, {"method": method, "dtype": str(dtype).replace("torch.", "")}, seed,
                            model, new, source_id=source_id)
        return Variant(new, man, tokenizer=getattr(model, "tokenizer", None))
    if method not in INT8_METHODS and method not in INT4_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of "
                         f"{sorted(INT8_METHODS) + list(INT4_METHODS) + sorted(FLOAT_METHODS)}")
    if backend not in ("auto", "minidiff", "reference"):
        raise ValueError(f"backend must be 'auto', 'minidiff' or 'reference', got {backend!r}")
    names = _select_linears(model, layers)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize "
                         "(conv layers and embeddings are not quantized); choose layers= explicitly or use fp16/bf16")
    from minidiff import nn as mnn  # lazily: it loads the kernels

    new = clone_model(model)
    mods = dict(new.named_modules())
    if method in INT4_METHODS:
        built = {n: mnn.Int4WeightOnlyLinear.from_linear(as_linear(mods[n]), group_size=group_size,
                                                         symmetric=symmetric, name=n) for n in names}
        params: dict[str, Any] = {
            "method": method, "mode": "weight_only", "layers": names, "group_size": group_size,
            "symmetric": bool(symmetric),
            "weights": f"int4 round-to-nearest per group of {group_size} input weights, "
                       + ("symmetric [-7, 7]" if symmetric else "asymmetric 0..15 with integer zero points"),
            "activations": "unquantized"}
    else:
        mode = INT8_METHODS[method]
        cls = mnn.ReferenceInt8Linear if backend == "reference" else mnn.Int8Linear
        built = {n: cls.from_linear(as_linear(mods[n]), mode=mode, name=n) for n in names}
        params = {"method": method, "mode": mode, "layers": names,
                  "backend": "reference" if backend == "reference" else "minidiff",
                  "weights": "int8 symmetric per output channel",
                  "activations": "int8 symmetric per token" if mode == "w8a8" else "unquantized"}
    for n, q in built.items():  # all layers quantized before any is replaced: an error leaves no half model
        _set_submodule(new, n, q)
    params["quantized_weights"] = int(sum(mods[n].weight.numel() for n in names))
    new.eval()
    man = make_manifest(method, params, seed, model, new, source_id=source_id)
    return Variant(new, man, tokenizer=getattr(model, "tokenizer", None))
