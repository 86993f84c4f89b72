"""Per-layer error between matched layers of a model and its compressed version.

For a layer's activations ``a`` (the base model) and ``b`` (the variant), same
shape ``(n, d)`` with rows the samples (tokens, for a language model in token
mode), in the manner of torch.ao's numeric suite and coremltools' activation
comparison:

- relative error ``||a - b||_F / ||a||_F``;
- SQNR in dB, ``10 log10(||a||_F^2 / ||a - b||_F^2)`` (``+inf`` when b equals a);
- mean per-sample cosine ``mean_i a_i . b_i / (||a_i|| ||b_i||)``; a sample where
  both rows are zero counts 1 (identical), one where only one is zero counts 0;
- max absolute error ``max |a - b|``.

Every statistic is a sum (or a max) over samples, so :class:`LayerErrorAccumulator`
streams them in memory independent of n and shards merge exactly. Sums are float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from minidiff.accumulate import Accumulator
from minidiff.similarity.inputs import _as_features, _layer_list, _names
from minidiff.validation import check_device

ERROR_KEYS = ("rel_error", "sqnr_db", "cosine", "max_abs")


def _layer_names(names, count: int) -> list[str]:
    return [str(i) for i in range(count)] if names is None else _names(names, count, "")


def _pairs(batch_a, batch_b, dims: Sequence[int] | None, names: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    la, lb = _layer_list(batch_a, "a"), _layer_list(batch_b, "b")
    if len(la) != len(lb):
        raise ValueError(f"layers_a has {len(la)} layers but layers_b has {len(lb)}: per-layer error needs "
                         "matched layers (the same architecture, or layers matched by name)")
    if dims is not None and len(la) != len(dims):
        raise ValueError(f"got {len(la)} layers; this accumulator was built for {len(dims)}")
    out = []
    for l, (x, y) in enumerate(zip(la, lb)):
        name = names[l]
        x = _as_features(x, f"layer {name} of model a")
        y = _as_features(y, f"layer {name} of model b")
        if x.shape != y.shape:
            raise ValueError(f"layer {name}: model a gives shape {tuple(x.shape)} but model b "
                             f"{tuple(y.shape)}; matched layers must have the same shape")
        if dims is not None and x.shape[1] != dims[l]:
            raise ValueError(f"layer {name} has width {x.shape[1]} but the accumulator expects {dims[l]}")
        out.append((x, y))
    return out


def _batch_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Float64 sums of one layer's batch: ||a||^2, ||a - b||^2, cosine sum, rows, max |a - b|."""
    x, y = x.double(), y.to(device=x.device, dtype=torch.float64)
    diff = x - y
    na = (x * x).sum(1)
    nb = (y * y).sum(1)
    dot = (x * y).sum(1)
    denom = torch.sqrt(na * nb)
    cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0),
                      ((na == 0) & (nb == 0)).double())
    rows = x.shape[0]
    peak = diff.abs().max() if diff.numel() else x.new_zeros(())
    return na.sum(), (diff * diff).sum(), cos.sum(), torch.tensor(float(rows), dtype=torch.float64), peak


def _finish(sig: torch.Tensor, err: torch.Tensor, cos: torch.Tensor, count: torch.Tensor,
            peak: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    if bool((count == 0).any()):
        raise ValueError("no samples seen: call update() before compute()")
    zero = [names[i] for i in torch.nonzero(sig == 0).flatten().tolist()]
    if zero:
        # relative error and SQNR divide by ||a||^2; say so instead of a bare NaN/inf
        import warnings
        warnings.warn(f"layer(s) {', '.join(zero)} of model a are all zero: relative error and SQNR are "
                      "undefined there (NaN)", RuntimeWarning, stacklevel=3)
    rel = torch.sqrt(err / sig)
    sqnr = 10.0 * (torch.log10(sig) - torch.log10(err))
    rel[sig == 0] = float("nan")
    sqnr[sig == 0] = float("nan")
    return {"rel_error": rel, "sqnr_db": sqnr, "cosine": cos / count, "max_abs": peak.clone()}


def layer_error(layers_a, layers_b, *, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-layer error between matched layers (see the module docstring for the formulas).

    Parameters
    ----------
    layers_a, layers_b : matched lists of ``(n, d_l)`` features of the base model (a)
        and the variant (b), same shapes (trailing dimensions are flattened per sample;
        pass ``(tokens, d)`` for per-token cosines).
    names : layer names used in warnings and errors.

    Returns
    -------
    dict with keys ``rel_error``, ``sqnr_db``, ``cosine``, ``max_abs``, each a ``(L,)``
    float64 tensor.
    """
    la = _layer_list(layers_a, "a")
    names = _layer_names(names, len(la))
    pairs = _pairs(la, layers_b, None, names)
    sums = [_batch_sums(x, y) for x, y in pairs]
    stacked = [torch.stack([s[k].cpu() for s in sums]) for k in range(5)]
    if any(x.shape[0] == 0 for x, _ in pairs):
        raise ValueError("per-layer error of zero samples is undefined")
    return _finish(*stacked, names)


class LayerErrorAccumulator(Accumulator):
    """Streaming per-layer error (:func:`layer_error` over everything seen).

    States (float64): ``sig`` ``sum ||a||^2``, ``err`` ``sum ||a - b||^2``, ``cos``
    sum of per-sample cosines and ``count`` samples (``reduce="sum"``), ``peak``
    ``max |a - b|`` (``reduce="max"``); each ``(L,)``.

    Parameters
    ----------
    dims : widths of the matched layers.
    names : layer names used in warnings and errors.
    device : where the states live.
    """

    def __init__(self, dims: Sequence[int], *, names: Sequence[str] | None = None, device=None) -> None:
        super().__init__()
        try:
            self.dims = tuple(int(d) for d in dims)
        except TypeError as exc:
            raise ValueError(f"dims must be a sequence of layer widths, got {dims!r}") from exc
        if not self.dims or any(d <= 0 for d in self.dims):
            raise ValueError(f"dims must be a non-empty sequence of positive layer widths, got {self.dims}")
        self.names = _layer_names(names, len(self.dims))
        device = torch.device("cpu") if device is None else check_device(device, "device")
        z = torch.zeros(len(self.dims), dtype=torch.float64, device=device)
        for name in ("sig", "err", "cos", "count"):
            self.add_state(name, z, "sum")
        self.add_state("peak", z, "max")  # |a - b| >= 0, so 0 is the neutral start

    def config(self) -> dict:
        return {"dims": self.dims}

    def update(self, batch_a, batch_b) -> None:  # type: ignore[override]
        """Add one batch: matched lists of ``(b, d_l)`` features of model a and model b."""
        pairs = _pairs(batch_a, batch_b, self.dims, self.names)
        if pairs[0][0].shape[0] == 0:
            return
        rows = {x.shape[0] for x, _ in pairs}
        if len(rows) > 1:
            raise ValueError(f"layers of one batch have different numbers of samples {sorted(rows)}")
        sums = [_batch_sums(x.to(self.sig.device), y) for x, y in pairs]
        sig, err, cos, count, peak = (torch.stack([s[k].to(self.sig.device) for s in sums]) for k in range(5))
        self.sig += sig
        self.err += err
        self.cos += cos
        self.count += count
        self.peak = torch.maximum(self.peak, peak)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"rel_error", "sqnr_db", "cosine", "max_abs"}``, each ``(L,)`` float64."""
        return _finish(self.sig, self.err, self.cos, self.count, self.peak, self.names)


def first_below(sqnr_db: torch.Tensor, threshold_db: float, names: Sequence[str] | None = None):
    """The first layer (in depth order) whose SQNR falls below ``threshold_db``, or None.

    Returns the layer's name (or index when ``names`` is None). ``threshold_db``: e.g.
    20 dB (error power 1% of the signal) or 30 dB (0.1%)."""
    if not isinstance(threshold_db, (int, float)) or isinstance(threshold_db, bool) or math.isnan(threshold_db):
        raise ValueError(f"threshold_db must be a number of decibels, got {threshold_db!r}")
    below = torch.nonzero(sqnr_db < threshold_db).flatten().tolist()
    if not below:
        return None
    return below[0] if names is None else list(names)[below[0]]
