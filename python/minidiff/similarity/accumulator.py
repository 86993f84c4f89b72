"""The streaming all-layer-pairs CKA accumulator (:class:`CKAAccumulator`).

One pass over the data keeps, for every layer pair, the exact sums the HSIC
estimators need (:mod:`minidiff.similarity.hsic`) and the centred covariance
blocks the second-order measures need (:mod:`minidiff.similarity.measures`),
in memory independent of the number of samples
(:func:`minidiff.similarity.memory.cka_state_bytes`).

Numerics. Every statistic is invariant to translating the features, so the
accumulator subtracts a fixed shift (the first batch's column means, rounded
to float32 so that the subtraction of float32 data is exact or nearly so)
before accumulating. The GEMMs run in the input's precision on the shifted
data, their partial sums fold into float64 states every ``FLUSH_SAMPLES``
samples, and all vector terms and final formulas are float64.

Accumulators with different shifts merge exactly: the other's sums are first
re-expressed at this shift (:meth:`CKAAccumulator.align_shift`; the
translation is polynomial in the shift and every needed term is among the
states). Distributed sync does the same through the accumulator's own
``_pre_sync`` hook (one common shift broadcast from the lowest rank with data).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from minidiff.accumulate import Accumulator
from minidiff.ops.cka import batch_terms, layer_index
from minidiff.ops.selfgram import MAX_BLOCKS, STACKED_MAX_BLOCKS, SelfGrams
from minidiff.similarity.hsic import (_blocks, _feature_hsic, _grams_hsic, _hsic_cross, _hsic_self,
                                      _linear_grams, _ratio, _seg2, _seg_cols, _unflatten, _use_gram_form,
                                      _zero_variance)
from minidiff.similarity.measures import COVARIANCE_MEASURES, DEFAULT_RIDGE, check_measure, pair_measures
from minidiff.similarity.memory import available_bytes, check_state_fits
from minidiff.validation import check_device
from minidiff.similarity.inputs import (ACC_ESTIMATORS, _as_features, _check_finite, _check_rows,
                                        _compute_dtype, _layer_list, _names, _offsets)

FLUSH_SAMPLES = 16384  # float32 GEMM partial sums fold into float64 after this many samples


def _flushed_state(name: str) -> property:
    """A state whose float32 GEMM partial sums (``_pending``) are folded into the
    float64 value whenever it is read, so merge, state_dict and distributed sync
    (which read states by name) always see the complete sum."""

    def get(self):
        self._flush()
        return self.__dict__["_state_" + name]

    def set(self, value):
        self.__dict__["_state_" + name] = value

    return property(get, set)


class CKAAccumulator(Accumulator):
    """Streaming all-layer-pairs linear CKA between two models (or one model and itself).

    Parameters
    ----------
    dims_a : widths ``d_l`` of model a's layers (features are flattened per sample).
    dims_b : widths of model b's layers, or None to compare model a with itself
        (then ``update`` takes only ``batch_a`` and the upper block triangle of the
        symmetric ``Z_a^T Z_a`` per batch gives every term).
    estimator : ``"unbiased"`` (HSIC_1, exact over all samples seen), ``"biased"``
        (HSIC_0, exact over all samples) or ``"minibatch"`` (Nguyen et al. 2021:
        mean of per-batch HSIC_1, then the ratio; every batch needs >= 4 rows).
    device : where the states live (CUDA: GEMMs in cuBLAS, vector terms in Triton).
    names_a, names_b : layer names used in warnings and errors.
    shift_a, shift_b : fix the translation subtracted before accumulating (default:
        the first batch's column means). Equal shifts on every shard make the
        states plainly additive.

    States (all float64, all ``reduce="sum"``): ``n``; exact estimators: column
    sums, the cross-product ``C = sum z_a z_b^T``, the per-layer Gram blocks, and
    the norm terms of ``minidiff.ops.cka.TERMS``; minibatch: the per-batch HSIC
    sums and the batch count. Memory is O(D_a D_b), independent of n.

    ``compute()`` returns the ``(La, Lb)`` float64 CKA matrix; after any number of
    updates it equals ``cka_matrix`` on the concatenated data (exact estimators).

    Precision: with float32 inputs the GEMM partial sums stay in float32 for at
    most ``FLUSH_SAMPLES`` samples (the same as one GEMM over a batch that size)
    before they are added into the float64 states; reading a state flushes them.
    """

    C = _flushed_state("C")
    gram_a = _flushed_state("gram_a")
    gram_b = _flushed_state("gram_b")

    def __init__(self, dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *,
                 estimator: str = "unbiased", device=None, names_a: Sequence[str] | None = None,
                 names_b: Sequence[str] | None = None, shift_a=None, shift_b=None) -> None:
        super().__init__()
        self._pending: dict[str, torch.Tensor] = {}   # float32 partial sums of C
        self._grams: dict[str, SelfGrams] = {}         # partial sums of the self Grams
        self._pending_n = 0  # samples whose partial sums are not yet folded into the float64 states
        self._scratch: dict[str, torch.Tensor] = {}
        self._counted = False  # this accumulator's own part is in `parts` / `shift_check`
        if estimator not in ACC_ESTIMATORS:
            raise ValueError(f"estimator must be one of {ACC_ESTIMATORS}, got {estimator!r}")
        self.dims_a = self._check_dims(dims_a, "dims_a")
        self.same = dims_b is None
        self.dims_b = self.dims_a if self.same else self._check_dims(dims_b, "dims_b")
        self.estimator = estimator
        self.device = check_device(device, "device") if device is not None else torch.device("cpu")
        self.names_a = _names(names_a, len(self.dims_a), "a")
        self.names_b = self.names_a if self.same else _names(names_b, len(self.dims_b), "b")
        self.offs_a, self.offs_b = _offsets(self.dims_a), _offsets(self.dims_b)
        self.la, self.lb = len(self.dims_a), len(self.dims_b)
        self.da, self.db = self.offs_a[-1], self.offs_b[-1]
        self._ia = layer_index(self.offs_a, self.device)
        self._ib = layer_index(self.offs_b, self.device)
        if estimator != "minibatch":  # refuse before allocating, with the formula
            check_state_fits(self.dims_a, None if self.same else self.dims_b, available_bytes(self.device))
        self._nonfinite_a = torch.zeros(self.la, dtype=torch.int64, device=self.device)
        self._nonfinite_b = torch.zeros(self.lb, dtype=torch.int64, device=self.device)
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.add_state("n", z(), "sum")
        if estimator == "minibatch":
            self.add_state("batches", z(), "sum")
            self.add_state("hsic_ab", z(self.la, self.lb), "sum")
            self.add_state("hsic_aa", z(self.la), "sum")
            self.add_state("hsic_bb", z(self.lb), "sum")
            # per-batch centred sums of squares (zero for a layer constant in every batch)
            # and the rounding-level bound they are judged against
            self.add_state("ss_a", z(self.la), "sum")
            self.add_state("ss_b", z(self.lb), "sum")
            self.add_state("raw_a", z(self.la), "sum")
            self.add_state("raw_b", z(self.lb), "sum")
        else:
            self.add_state("sx", z(self.da), "sum")
            self.add_state("na", z(self.la), "sum")
            self.add_state("C", z(self.da, self.db), "sum")
            self.add_state("ay", z(self.la, self.db), "sum")
            self.add_state("ab", z(self.la, self.lb), "sum")
            if not self.same:
                self.add_state("sy", z(self.db), "sum")
                self.add_state("nb", z(self.lb), "sum")
                self.add_state("bx", z(self.lb, self.da), "sum")
                self.add_state("gram_a", z(sum(d * d for d in self.dims_a)), "sum")
                self.add_state("gram_b", z(sum(d * d for d in self.dims_b)), "sum")
                self.add_state("axd", z(self.da), "sum")
                self.add_state("byd", z(self.db), "sum")
                self.add_state("aa", z(self.la), "sum")
                self.add_state("bb", z(self.lb), "sum")
            # sum of the shift over merged parts and the number of parts: lets compute()
            # detect states summed over different shifts (see align_shift)
            self.add_state("shift_check", z(), "sum")
            self.add_state("parts", z(), "sum")
        self.shift_a = self._shift_arg(shift_a, self.da, "shift_a")
        self.shift_b = self.shift_a if self.same else self._shift_arg(shift_b, self.db, "shift_b")

    # -- settings -------------------------------------------------------------------
    @staticmethod
    def _check_dims(dims, name: str) -> tuple[int, ...]:
        try:
            dims = tuple(int(d) for d in dims)
        except TypeError as exc:
            raise ValueError(f"{name} must be a sequence of layer widths, got {dims!r}") from exc
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(f"{name} must be a non-empty sequence of positive layer widths, got {dims}")
        return dims

    def _shift_arg(self, shift, width: int, name: str) -> torch.Tensor | None:
        if shift is None:
            return None
        t = torch.as_tensor(shift, dtype=torch.float64).reshape(-1)
        if t.numel() != width:
            raise ValueError(f"{name} must have {width} entries (the stacked width), got {t.numel()}")
        return t.float().double().to(self.device)

    def config(self) -> dict:
        return {"dims_a": self.dims_a, "dims_b": None if self.same else self.dims_b, "estimator": self.estimator}

    # -- streaming ------------------------------------------------------------------
    def _layers(self, batch, dims, names, side: str, check_finite: bool) -> list[torch.Tensor]:
        """Validated per-layer features; a single 2-D tensor is taken as the layers
        already stacked side by side (width ``sum(dims)``)."""
        if batch is None:
            raise ValueError(f"batch_{side} is required for this accumulator")
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            t = batch.detach() if isinstance(batch, torch.Tensor) else torch.as_tensor(batch)
            if t.ndim != 2 or t.shape[1] != sum(dims):
                raise ValueError(f"stacked batch_{side} has shape {tuple(t.shape)}; expected (b, {sum(dims)}) = "
                                 f"(b, sum(dims_{side})), or pass a list of per-layer features")
            offs = _offsets(dims)
            for l, name in enumerate(names):  # validates dtype and names the layer holding a non-finite value
                _as_features(t[:, offs[l]:offs[l + 1]], f"layer {name}", check_finite)
            return [t]
        layers = _layer_list(batch, side)
        if len(layers) != len(dims):
            raise ValueError(f"batch_{side} has {len(layers)} layers; this accumulator was built for {len(dims)}")
        out = []
        for t, d, name in zip(layers, dims, names):
            t = _as_features(t, f"layer {name}", check_finite)
            if t.shape[1] != d:
                raise ValueError(f"layer {name} has width {t.shape[1]} but the accumulator expects {d}")
            out.append(t)
        return out

    def _buffer(self, side: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A reused scratch buffer per side: a fresh multi-MB allocation each batch
        costs page faults comparable to the copy itself."""
        buf = self._scratch.get(side)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._scratch[side] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _shifted(self, layers: list[torch.Tensor], shift: torch.Tensor, dtype: torch.dtype,
                 side: str) -> torch.Tensor:
        """Stack the layers and subtract the shift in one pass into a fresh buffer."""
        b = layers[0].shape[0]
        out = self._buffer(side, (b, sum(t.shape[1] for t in layers)), dtype)
        # one cat into the reused buffer, then one contiguous subtraction: few parallel regions
        # (each costs a thread hand-off right after the GEMMs)
        if len(layers) == 1:
            out.copy_(layers[0])
        else:
            torch.cat([t.to(device=self.device, dtype=dtype) for t in layers], dim=1, out=out)
        return out.sub_(shift)

    def update(self, batch_a, batch_b=None) -> None:
        """Add one batch: ``batch_a`` (and ``batch_b`` unless comparing a model with
        itself) are lists of ``(b, d_l)`` features, rows aligned across all layers,
        or single ``(b, sum d_l)`` tensors with the layers already stacked."""
        if self.same and batch_b is not None:
            raise ValueError("this accumulator compares model a with itself (dims_b=None): pass only batch_a")
        # exact estimators: non-finite values show up in the float64 norms of the fused
        # pass, checked before any state changes; only then are they located and counted
        check = self.estimator == "minibatch"
        la = self._layers(batch_a, self.dims_a, self.names_a, "a", check)
        lb = la if self.same else self._layers(batch_b, self.dims_b, self.names_b, "b", check)
        names = ["a"] if len(la) == 1 and len(self.dims_a) > 1 else self.names_a
        if not self.same:
            names = names + (["b"] if len(lb) == 1 and len(self.dims_b) > 1 else self.names_b)
        b = _check_rows(la + ([] if self.same else lb), names, None)
        if b == 0:
            return
        dtype = _compute_dtype(*(t.dtype for t in la + lb))
        if self.estimator == "minibatch":
            self._update_minibatch(la, lb, b, dtype)
            return
        shift_a, shift_b = self.shift_a, self.shift_b
        if shift_a is None:  # first batch: its column means, rounded to float32 (see module docstring)
            shift_a = torch.cat([t.to(self.device).mean(0, dtype=torch.float64) for t in la]).float().double()
            shift_b = shift_a if self.same else \
                torch.cat([t.to(self.device).mean(0, dtype=torch.float64) for t in lb]).float().double()
        za = self._shifted(la, shift_a.to(dtype), dtype, "a")
        zb = za if self.same else self._shifted(lb, shift_b.to(dtype), dtype, "b")
        t = dict(zip(("sx", "sy", "na", "nb", "ay", "bx", "ab", "axd", "byd", "aa", "bb"),
                     batch_terms(za, zb, self.offs_a, self.offs_b)))
        if za.device.type != "cpu":
            # no host round-trip per batch on a GPU: remember which layers saw a non-finite
            # norm and refuse in compute()
            self._nonfinite_a = self._nonfinite_a + ~torch.isfinite(t["na"])
            self._nonfinite_b = self._nonfinite_b + ~torch.isfinite(t["nb"])
        elif not bool(torch.isfinite(t["na"]).all() & torch.isfinite(t["nb"]).all()):
            for side, layers, names in (("a", la, self.names_a), ("b", lb, self.names_b)):
                dims = self.dims_a if side == "a" else self.dims_b
                offs = _offsets(dims) if len(layers) == 1 else None
                for l, name in enumerate(names):
                    x = layers[l] if offs is None else layers[0][:, offs[l]:offs[l + 1]]
                    _check_finite(x, f"layer {name}")
            raise ValueError(f"the shifted features overflow {str(za.dtype).replace('torch.', '')} in their squared "
                             "norms (|x| beyond ~1e19 in float32, ~1e154 in float64). CKA and the similarity "
                             "measures are invariant to scaling a layer: divide it by a power of two near its "
                             "max |x| (exact), or use cka_matrix/similarity_matrix, which do so")
        self.shift_a, self.shift_b = shift_a, shift_b
        if not self._counted:
            self._counted = True
            if float(self.parts) == 0:
                self.parts += 1
                self.shift_check += self.shift_a.sum() + (0 if self.same else self.shift_b.sum())
        self.n += b
        if self.same and za.dtype != torch.float64:
            # Z^T Z is symmetric: its upper block triangle, like the self Grams
            self._self_grams("C", za, (self.da,), STACKED_MAX_BLOCKS)
        else:
            self._gemm("C", za.T, zb)
        if not self.same:
            for name, z, dims in (("gram_a", za, self.dims_a), ("gram_b", zb, self.dims_b)):
                self._self_grams(name, z, dims)
        self._pending_n += b
        if self._pending_n >= FLUSH_SAMPLES:
            self._flush()
        names = ("sx", "na", "ay", "ab") if self.same else \
            ("sx", "na", "ay", "ab", "sy", "nb", "bx", "axd", "byd", "aa", "bb")
        for k in names:
            getattr(self, k).add_(t[k])

    def _self_grams(self, name: str, z: torch.Tensor, dims: tuple[int, ...], max_blocks: int = MAX_BLOCKS) -> None:
        """Add every X_l^T X_l: the upper block triangle only (``minidiff.ops.selfgram``),
        as partial sums in the input's precision, mirrored and folded in by ``_flush``."""
        grams = self._grams.get(name)
        if grams is None or grams.buffer.dtype != z.dtype:
            if grams is not None:
                self._flush()
            grams = self._grams[name] = SelfGrams(dims, z.dtype, self.device, max_blocks)
        grams.add(z)

    def _gemm(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """state[name] += x @ y; float32 (or half) products as pending partial sums."""
        state = self.__dict__["_state_" + name]
        if x.dtype == torch.float64:
            state.addmm_(x, y)
            return
        pending = self._pending.get(name)
        if pending is None or pending.dtype != x.dtype:
            if pending is not None:
                self._flush()
            pending = self._pending[name] = torch.zeros(state.shape, dtype=x.dtype, device=state.device)
        pending.addmm_(x, y)

    def _flush(self) -> None:
        if self._pending_n:
            for name, buf in self._pending.items():
                self.__dict__["_state_" + name].add_(buf)
                buf.zero_()
            for name, grams in self._grams.items():
                grams.fold_into(self.__dict__["_state_" + name].view(-1))
        self._pending_n = 0

    def nbytes(self) -> int:
        """Bytes held: the states plus the partial-sum buffers (independent of n; the
        formula is ``minidiff.similarity.cka_state_bytes``)."""
        held = [*self.state_dict().values(), *self._pending.values(), *(g.buffer for g in self._grams.values())]
        return sum(t.numel() * t.element_size() for t in held)

    def _update_minibatch(self, la: list[torch.Tensor], lb: list[torch.Tensor], b: int, dtype: torch.dtype) -> None:
        if b < 4:
            raise ValueError(f"the minibatch estimator needs batches of at least 4 samples, got {b}")
        # each batch is centred on its own means (HSIC_1 is translation invariant)
        la = [t.to(device=self.device, dtype=dtype) for t in la]
        lb = la if self.same else [t.to(device=self.device, dtype=dtype) for t in lb]
        if len(la) == 1 and self.la > 1:  # stacked input
            la = [la[0][:, a:c] for a, c in zip(self.offs_a, self.offs_a[1:])]
        if not self.same and len(lb) == 1 and self.lb > 1:
            lb = [lb[0][:, a:c] for a, c in zip(self.offs_b, self.offs_b[1:])]
        centres_a = [t.mean(0) for t in la]
        centres_b = centres_a if self.same else [t.mean(0) for t in lb]
        if _use_gram_form(b, self.dims_a, self.dims_b, self.same, torch.finfo(dtype).bits // 8):
            # per layer, no stacking: K_l = X_l X_l^T of the centred layer
            ka = _linear_grams([t - c for t, c in zip(la, centres_a)])
            kb = None if self.same else _linear_grams([t - c for t, c in zip(lb, centres_b)])
            ssa = torch.diagonal(ka, dim1=1, dim2=2).sum(1).double()
            ssb = ssa if self.same else torch.diagonal(kb, dim1=1, dim2=2).sum(1).double()
            hab, haa, hbb = _grams_hsic(ka, kb, "unbiased")
        else:
            za = torch.cat(la, 1).sub_(torch.cat(centres_a))
            zb = za if self.same else torch.cat(lb, 1).sub_(torch.cat(centres_b))
            hab, haa, hbb, ssa, ssb = _feature_hsic(za, zb, self.offs_a, self.offs_b, self.same, "unbiased")
        self.hsic_ab += hab
        self.hsic_aa += haa
        self.hsic_bb += hbb
        self.batches += 1
        self.n += b
        self.ss_a += ssa
        self.ss_b += ssb
        # a constant column centres to 0 up to a few ulps of its value: zero variance means
        # ss <= b * ||centre||^2 * (64 eps)^2 in the compute dtype
        tol = b * (64 * torch.finfo(dtype).eps) ** 2
        self.raw_a += tol * torch.stack([(c.double() ** 2).sum() for c in centres_a])
        self.raw_b += tol * torch.stack([(c.double() ** 2).sum() for c in centres_b])

    # -- shift handling -------------------------------------------------------------
    def align_shift(self, shift_a, shift_b=None) -> None:
        """Re-express the accumulated sums relative to a new shift (exact algebra in
        float64), e.g. rank 0's shift before an all-reduce across ranks."""
        if self.estimator == "minibatch":
            return
        new_a = self._shift_arg(shift_a, self.da, "shift_a")
        new_b = new_a if self.same else self._shift_arg(shift_b, self.db, "shift_b")
        if self.shift_a is None or float(self.n) == 0:
            self.shift_a, self.shift_b = new_a, new_b
            return
        d, e = new_a - self.shift_a, new_b - self.shift_b
        n = self.n
        ia, ib, la, lb = self._ia, self._ib, self.la, self.lb
        sx = self.sx
        sy = sx if self.same else self.sy
        na = self.na
        nb = na if self.same else self.nb
        C, ay, ab = self.C, self.ay, self.ab
        bx = ay if self.same else self.bx
        seg = lambda v, idx, L: torch.zeros(L, dtype=torch.float64, device=v.device).index_add_(0, idx, v)  # noqa: E731
        cl, cm = seg(d * d, ia, la), seg(e * e, ib, lb)
        ds, es = seg(d * sx, ia, la), seg(e * sy, ib, lb)
        P = torch.zeros(la, self.db, dtype=torch.float64, device=C.device).index_add_(0, ia, d[:, None] * C)
        Q = _seg_cols(C, ib, lb, e).T                                 # (lb, da)
        dCe = _seg2(C, ia, la, ib, lb, d, e)
        ay_e = _seg_cols(ay, ib, lb, e)                              # sum_i a_il (e_m . y_im)
        bx_d = _seg_cols(bx, ia, la, d).T                             # sum_i (d_l . x_il) b_im
        new_ab = (ab - 2 * ay_e + na[:, None] * cm[None, :] - 2 * bx_d + 4 * dCe - 2 * ds[:, None] * cm[None, :]
                  + cl[:, None] * nb[None, :] - 2 * cl[:, None] * es[None, :] + n * cl[:, None] * cm[None, :])
        new_ay = (ay - na[:, None] * e[None, :] - 2 * P + 2 * ds[:, None] * e[None, :]
                  + cl[:, None] * (sy - n * e)[None, :])
        if not self.same:
            new_bx = (bx - nb[:, None] * d[None, :] - 2 * Q + 2 * es[:, None] * d[None, :]
                      + cm[:, None] * (sx - n * d)[None, :])
            for side in ("a", "b"):
                dd, s_, n_, grams_attr, vec_attr, sq_attr, offs, dims = (
                    (d, sx, na, "gram_a", "axd", "aa", self.offs_a, self.dims_a) if side == "a" else
                    (e, sy, nb, "gram_b", "byd", "bb", self.offs_b, self.dims_b))
                flat, vec, sq = getattr(self, grams_attr), getattr(self, vec_attr), getattr(self, sq_attr)
                new_flat, new_vec, new_sq, o = flat.clone(), vec.clone(), sq.clone(), 0
                for l, w in enumerate(dims):
                    G = flat[o:o + w * w].view(w, w)
                    dl, sl, vl = dd[offs[l]:offs[l + 1]], s_[offs[l]:offs[l + 1]], vec[offs[l]:offs[l + 1]]
                    c, dsl = dl @ dl, dl @ sl
                    Gd = G @ dl
                    new_flat[o:o + w * w] = (G - dl[:, None] * sl[None, :] - sl[:, None] * dl[None, :]
                                             + n * dl[:, None] * dl[None, :]).reshape(-1)
                    new_vec[offs[l]:offs[l + 1]] = vl - n_[l] * dl - 2 * Gd + 2 * dsl * dl + c * (sl - n * dl)
                    new_sq[l] = sq[l] - 4 * (dl @ vl) + 4 * (dl @ Gd) + 2 * c * n_[l] - 4 * c * dsl + n * c * c
                    o += w * w
                setattr(self, grams_attr, new_flat)
                setattr(self, vec_attr, new_vec)
                setattr(self, sq_attr, new_sq)
            self.bx = new_bx
            self.sy = sy - n * e
            self.nb = nb - 2 * es + n * cm
        self.C = C - d[:, None] * sy[None, :] - sx[:, None] * e[None, :] + n * d[:, None] * e[None, :]
        self.ay, self.ab = new_ay, new_ab
        self.sx = sx - n * d
        self.na = na - 2 * ds + n * cl
        parts = float(self.parts)
        self.shift_a, self.shift_b = new_a, new_b
        self.shift_check = self.parts * (new_a.sum() + (0 if self.same else new_b.sum()))
        self.parts = torch.tensor(parts, dtype=torch.float64, device=self.device)

    # -- the accumulator contract: device, distributed hooks ------------------------
    def to(self, device) -> "CKAAccumulator":
        """Move the states, shifts and partial sums to ``device`` (in place)."""
        self._flush()
        device = check_device(device, "device")
        super().to(device)
        self.device = device
        self._ia, self._ib = self._ia.to(device), self._ib.to(device)
        self._nonfinite_a, self._nonfinite_b = self._nonfinite_a.to(device), self._nonfinite_b.to(device)
        if self.shift_a is not None:
            self.shift_a = self.shift_a.to(device)
            self.shift_b = self.shift_a if self.same else self.shift_b.to(device)
        self._pending, self._grams, self._scratch = {}, {}, {}
        return self

    def _pre_sync(self, ctx) -> None:
        """Before the states are all-reduced: re-express every rank's sums at the shift
        of the lowest rank that has seen data (exact, :meth:`align_shift`)."""
        if self.estimator == "minibatch":
            return
        seen = float(self.n) > 0
        sa, sb = ctx.broadcast_first(self.shift_a if seen else None, self.shift_b if seen else None,
                                     device=self.device)
        if sa is not None:
            self.align_shift(sa, sb)

    def _agree_before_update(self, ctx, first_batch) -> None:
        """One shift on every rank before accumulating: that of the lowest rank whose
        accumulator already has one (resumed from a cache); if none has, rank 0 calls
        ``first_batch()`` for ``(layers_a, layers_b)`` and takes their column means
        rounded to float32, the shift a single process takes from the same batch."""
        if self.estimator == "minibatch":
            return
        sa, sb = ctx.broadcast_first(self.shift_a, None if self.same else self.shift_b, device=self.device)
        if sa is None:
            mine_a = mine_b = None
            if ctx.is_main:
                la, lb = first_batch()
                mine_a = torch.cat([t.detach().double().mean(0) for t in la]).float().double()
                mine_b = None if lb is None else torch.cat([t.detach().double().mean(0) for t in lb]).float().double()
            sa, sb = ctx.broadcast_first(mine_a, mine_b, device=self.device)
        if self.shift_a is None or not torch.equal(self.shift_a, sa) or \
                (sb is not None and not torch.equal(self.shift_b, sb)):
            self.align_shift(sa, sb)

    def merge(self, other: "CKAAccumulator") -> "CKAAccumulator":
        """Fold ``other`` in; sums taken at another shift are re-expressed at this one first."""
        if type(other) is not type(self) or other.config() != self.config():
            return super().merge(other)  # raises the base class's error
        if self.estimator != "minibatch" and float(other.n) > 0:
            if self.shift_a is None or float(self.n) == 0:
                self.shift_a, self.shift_b = other.shift_a, other.shift_b
            elif not (torch.equal(other.shift_a, self.shift_a) and torch.equal(other.shift_b, self.shift_b)):
                copy = CKAAccumulator(self.dims_a, None if self.same else self.dims_b, estimator=self.estimator,
                                      device=self.device)
                copy.load_state_dict(other.state_dict())
                copy.align_shift(self.shift_a, self.shift_b)
                other = copy
        return super().merge(other)

    def reset(self) -> None:
        self._discard_pending()
        super().reset()
        self._counted = False
        self._nonfinite_a.zero_()
        self._nonfinite_b.zero_()

    def _discard_pending(self) -> None:
        for buf in [*self._pending.values(), *(g.buffer for g in self._grams.values())]:
            buf.zero_()
        self._pending_n = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.estimator != "minibatch":
            empty = torch.zeros(0, dtype=torch.float64)
            state["shift_a"] = empty if self.shift_a is None else self.shift_a
            state["shift_b"] = empty if self.shift_b is None else self.shift_b
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._discard_pending()
        state = dict(state)
        if self.estimator != "minibatch":
            sa, sb = state.pop("shift_a", None), state.pop("shift_b", None)
            if sa is None or sb is None:
                raise ValueError("state dict lacks shift_a/shift_b: it was not saved by a CKAAccumulator "
                                 "with an exact estimator")
            super().load_state_dict(state)
            self.shift_a = None if sa.numel() == 0 else self._shift_arg(sa, self.da, "shift_a")
            self.shift_b = None if sb.numel() == 0 else self._shift_arg(sb, self.db, "shift_b")
            return
        super().load_state_dict(state)

    # -- result ---------------------------------------------------------------------
    def compute(self, measure: str = "cka", *, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """The ``(La, Lb)`` float64 matrix of ``measure`` over every sample seen.

        ``measure``: ``"cka"`` (this accumulator's estimator) or a second-order
        measure of :mod:`minidiff.similarity.measures` (``"cca"``, ``"cca_mean"``,
        ``"svcca"``, ``"procrustes"``, ``"procrustes_distance"``, ``"regression"``,
        ``"regression_reverse"``, ``"rv"``), computed from the centred covariance
        blocks these statistics hold (exact estimators only). ``ridge``: relative
        ridge for rank-deficient covariances (see the measures module).
        """
        check_measure(measure)
        if measure == "cka":
            return self._cka()
        return self.compute_measures([measure], ridge=ridge)[measure]

    def compute_measures(self, measures: Sequence[str] = COVARIANCE_MEASURES, *,
                         ridge: float = DEFAULT_RIDGE) -> dict[str, torch.Tensor]:
        """Several measures at once (each layer's eigendecomposition and each pair's
        whitened cross-covariance are shared): ``{measure: (La, Lb) float64}``."""
        measures = [check_measure(m) for m in measures]
        out = {"cka": self._cka()} if "cka" in measures else {}
        rest = [m for m in measures if m != "cka"]
        if rest:
            cov_a, cov_b, cross = self.covariances()
            n = float(self.n)
            zero_a = _zero_variance(self.sx, self.na, self._ia, self.la, n).tolist()
            zero_b = zero_a if self.same else _zero_variance(self.sy, self.nb, self._ib, self.lb, n).tolist()
            out.update(pair_measures(cov_a, cov_b, cross, rest, self.names_a, self.names_b, ridge=ridge,
                                     same=self.same, zero_a=zero_a, zero_b=zero_b))
        return out

    def covariances(self) -> tuple[list[torch.Tensor], list[torch.Tensor], Callable[[int, int], torch.Tensor]]:
        """The centred covariance blocks ``(Sxx_l, Syy_m, cross)`` with ``cross(l, m) = Sxy_lm``.

        From the states at any shift: ``Xc^T Xc = G - s s^T / n`` with ``G`` the
        shifted Gram and ``s`` the shifted column sums (translation invariant).
        """
        if self.estimator == "minibatch":
            raise ValueError("the minibatch estimator keeps only per-batch HSIC values; second-order measures "
                             "need estimator='unbiased' or 'biased' (the covariance statistics)")
        self._check_exact_states(need=2)
        n = float(self.n)
        sx = self.sx
        sy = sx if self.same else self.sy
        C = self.C
        oa, ob = self.offs_a, self.offs_b

        def cov(G, s):
            return G - torch.outer(s, s) / n

        if self.same:
            cov_a = [cov(G, sx[oa[l]:oa[l + 1]]) for l, G in enumerate(_blocks(C, oa))]
            cov_b = cov_a
        else:
            cov_a = [cov(G, sx[oa[l]:oa[l + 1]]) for l, G in enumerate(_unflatten(self.gram_a, self.dims_a))]
            cov_b = [cov(G, sy[ob[m]:ob[m + 1]]) for m, G in enumerate(_unflatten(self.gram_b, self.dims_b))]

        def cross(l: int, m: int) -> torch.Tensor:
            return C[oa[l]:oa[l + 1], ob[m]:ob[m + 1]] - torch.outer(sx[oa[l]:oa[l + 1]], sy[ob[m]:ob[m + 1]]) / n

        return cov_a, cov_b, cross

    def _check_exact_states(self, need: int) -> None:
        n = float(self.n)
        bad = [self.names_a[i] for i in torch.nonzero(self._nonfinite_a).flatten().tolist()]
        bad += [self.names_b[i] for i in torch.nonzero(self._nonfinite_b).flatten().tolist()]
        if bad:
            raise ValueError(f"layer(s) {', '.join(dict.fromkeys(bad))} received non-finite values (NaN or "
                             "Inf) in an update on the GPU; the sums are invalid: check the model outputs "
                             "and start a new accumulator")
        if n < need:
            raise ValueError(f"need at least {need} samples, got {int(n)}")
        expect = float(self.parts) * float(self.shift_a.sum() + (0 if self.same else self.shift_b.sum()))
        if abs(float(self.shift_check) - expect) > 1e-9 * (abs(expect) + float(self.parts)):
            raise ValueError("these states were summed over accumulators with different shifts; call "
                             "align_shift() with one common shift on every shard before adding states "
                             "(merge() does this by itself)")

    @staticmethod
    def _check_range(h: torch.Tensor, zero: torch.Tensor, names) -> None:
        """HSIC(K_l, K_l) scales as |x|^4: features near 1e-80 underflow float64 to 0, near
        1e77 overflow; refuse instead of returning a wrong ratio."""
        bad = (~torch.isfinite(h) | (h == 0)) & ~zero
        if bool(bad.any()):
            which = [names[i] for i in torch.nonzero(bad).flatten().tolist()]
            raise ValueError(f"layer(s) {', '.join(which)}: HSIC of the layer with itself (fourth powers of the "
                             "features) under- or overflows float64; the features are at an extreme scale. CKA "
                             "is invariant to scaling a layer: multiply it by a power of two that brings its "
                             "values near 1 (exact), or use cka_matrix/similarity_matrix, which do so")

    def _cka(self) -> torch.Tensor:
        n = float(self.n)
        if self.estimator == "minibatch":
            if n == 0:
                raise ValueError("no samples seen: call update() before compute()")
            zero_a, zero_b = self.ss_a <= self.raw_a, self.ss_b <= self.raw_b
            return _ratio(self.hsic_ab, self.hsic_aa, self.hsic_bb, zero_a, zero_b, self.names_a, self.names_b)
        need = 4 if self.estimator == "unbiased" else 2
        if n < need:
            raise ValueError(f"the {self.estimator} estimator needs at least {need} samples, got {int(n)}")
        self._check_exact_states(need)
        st = {"C": self.C, "sx": self.sx, "na": self.na, "ay": self.ay, "ab": self.ab}
        if self.same:
            st.update(sy=self.sx, nb=self.na, bx=self.ay)
            grams = _blocks(self.C, self.offs_a)
            axd = torch.cat([self.ay[l, self.offs_a[l]:self.offs_a[l + 1]] for l in range(self.la)])
            haa = _hsic_self(grams, self.sx, self.na, axd, torch.diagonal(self.ab), self.offs_a, n, self.estimator)
            hbb = haa
        else:
            st.update(sy=self.sy, nb=self.nb, bx=self.bx)
            haa = _hsic_self(_unflatten(self.gram_a, self.dims_a), self.sx, self.na, self.axd, self.aa,
                             self.offs_a, n, self.estimator)
            hbb = _hsic_self(_unflatten(self.gram_b, self.dims_b), self.sy, self.nb, self.byd, self.bb,
                             self.offs_b, n, self.estimator)
        hab = _hsic_cross(st, n, self._ia, self.la, self._ib, self.lb, self.estimator)
        zero_a = _zero_variance(self.sx, self.na, self._ia, self.la, n)
        zero_b = zero_a if self.same else _zero_variance(self.sy, self.nb, self._ib, self.lb, n)
        self._check_range(haa, zero_a, self.names_a)
        if not self.same:
            self._check_range(hbb, zero_b, self.names_b)
        return _ratio(hab, haa, hbb, zero_a, zero_b, self.names_a, self.names_b)


