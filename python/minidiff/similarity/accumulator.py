"""Representation similarity: centered kernel alignment (CKA).

``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` (Kornblith et al. 2019,
"Similarity of Neural Network Representations Revisited"), for the linear kernel
``K = X X^T`` and the RBF kernel.

Estimators
----------
``"biased"``:   HSIC_0 = tr(K H L H) / (n - 1)^2, ``H = I - 11^T / n`` (Gretton et al. 2005).
``"unbiased"``: HSIC_1 of Song et al. (2012) = U-centering (Szekely & Rizzo 2014)
                divided by n(n - 3); with zero-diagonal K~, L~:
                ``[tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))``.
                Needs n >= 4; it can be negative and is never clamped.
``"minibatch"``: (accumulator only) Nguyen et al. (2021): HSIC_1 averaged over
                batches, then the ratio. Depends on the batch size; offered to
                compare with published numbers.

Streaming (``CKAAccumulator``, linear kernel)
---------------------------------------------
With ``a_i = ||x_i||^2``, ``b_i = ||y_i||^2``, ``s_x = sum x_i``, ``s_y = sum y_i``,
``C = sum x_i y_i^T`` every term is a sum over samples::

    tr(K~L~)     = ||C||_F^2 - sum a_i b_i
    1^T K~ 1     = ||s_x||^2 - sum a_i
    1^T K~ L~ 1  = s_x^T C s_y - s_y . sum a_i y_i - s_x . sum b_i x_i + sum a_i b_i
    HSIC_0       = ||C - s_x s_y^T / n||_F^2 / (n - 1)^2

so one pass gives the exact full-sample estimator in memory independent of n,
and accumulators of disjoint shards add. A model's layers are stacked side by
side, ``Z_a = [X_1 .. X_La]``, so a single GEMM ``Z_a^T Z_b`` per batch holds
every ``C_lm`` as a block; the per-layer self terms need the diagonal blocks
``X_l^T X_l`` (taken from ``Z_a^T Z_a`` when a model is compared with itself).
The per-sample norm and vector terms come from one fused pass
(``minidiff.ops.cka.batch_terms``: ``minidiff._C`` on CPU, Triton on CUDA).

Numerics. Every estimator is invariant to translating the features, so each
accumulator subtracts a fixed shift (the first batch's column means, rounded to
float32 so that the subtraction of float32 data is exact or nearly so) before
accumulating. The GEMMs run in the input's precision (float32 for float32,
float16 and bfloat16 activations, float64 for float64) on the shifted data and
are added into float64 state; all vector terms and the final formulas are
float64. Measured (tests/test_cka.py, benchmarks/bench_engine.py): streaming
results agree with the float64 full-data reference to < 1e-6 including
features with mean 1e3, where an unshifted float32 Gram gives CKA(X, XQ) =
0.9999. A float64 GEMM would cost 2x the time for no visible gain.

Accumulators with different shifts merge exactly: ``merge`` first re-expresses
the other's sums at this shift (``align_shift``; the translation is polynomial
in the shift and every needed term is among the states). Before a plain
all-reduce of the states across ranks, broadcast one rank's ``shift_a`` /
``shift_b`` and call ``align_shift`` on every rank (``compute`` detects sums
over different shifts and refuses them).

Form by shape. ``cka``/``cka_matrix`` compute in float64 and pick the cheaper
of the feature form (cost ~ n d1 d2) and the Gram form (~ n^2 (d1 + d2)).

RBF kernel: ``k(x, x') = exp(-||x - x'||^2 / (2 sigma^2))``, ``sigma^2 = threshold^2 *``
median of the squared pairwise distances over the full n x n matrix, diagonal
included (Kornblith et al. 2019). Not streamable; ``cka``/``cka_matrix`` only.

A layer with zero variance makes its row/column NaN with a warning naming it.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from minidiff.accumulate import Accumulator
from minidiff.ops.cka import batch_terms, gram_rbf, layer_index
from minidiff.ops.selfgram import MAX_BLOCKS, STACKED_MAX_BLOCKS, SelfGrams

KERNELS = ("linear", "rbf")
ESTIMATORS = ("biased", "unbiased")
ACC_ESTIMATORS = ("biased", "unbiased", "minibatch")
_EPS = float(torch.finfo(torch.float64).eps)
_GRAM_MEMORY_LIMIT = 2 << 30  # bytes of float64 Grams before the feature form is forced


# -- validation ------------------------------------------------------------------
def _as_features(x, what: str, check_finite: bool = True) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:
            raise ValueError(f"{what} must be a torch tensor or a numpy array, got {type(x).__name__}") from exc
    if t.is_complex() or not t.is_floating_point():
        raise ValueError(f"{what} has dtype {str(t.dtype).replace('torch.', '')}; CKA needs floating-point "
                         "features (float16, bfloat16, float32 or float64): cast with .float()")
    if t.ndim < 2:
        raise ValueError(f"{what} must have shape (n_samples, features...), got shape {tuple(t.shape)}")
    if t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if check_finite:
        _check_finite(t, what)
    return t


def _check_finite(t: torch.Tensor, what: str) -> None:
    # The sum is non-finite whenever any element is (one cheap pass); only then
    # count them (a finite input whose sum overflows passes after the count).
    if not math.isfinite(float(t.sum())):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{what} contains {bad} non-finite value(s) (NaN or Inf) out of {t.numel()}; "
                             "check the model outputs feeding this layer")


def _layer_list(feats, side: str) -> list:
    if isinstance(feats, (torch.Tensor, np.ndarray)):
        raise ValueError(f"feats_{side} must be a list of per-layer (n, d_l) features, got a single array; "
                         "wrap it in a list")
    feats = list(feats)
    if not feats:
        raise ValueError(f"feats_{side} is empty: pass at least one layer")
    return feats


def _names(names, count: int, side: str) -> list[str]:
    if names is None:
        return [f"{side}[{i}]" for i in range(count)]
    names = [str(s) for s in names]
    if len(names) != count:
        raise ValueError(f"names_{side} has {len(names)} entries for {count} layers")
    return names


def _check_rows(layers: Sequence[torch.Tensor], names: Sequence[str], n: int | None) -> int:
    for t, name in zip(layers, names):
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise ValueError(f"layer {name} has {t.shape[0]} samples but the others have {n}: every layer "
                             "of both models must see the same examples in the same order")
    return n


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _offsets(dims: Sequence[int]) -> list[int]:
    return [0] + np.cumsum(dims).tolist()


# -- HSIC from sums --------------------------------------------------------------
def _indicator(idx: torch.Tensor, count: int, like: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(count, D)`` matrix with ``E[idx[j], j] = 1`` (or ``scale[j]``): block sums as GEMMs."""
    E = like.new_zeros(count, idx.numel())
    E[idx, torch.arange(idx.numel(), device=idx.device)] = 1.0 if scale is None else scale.to(like.dtype)
    return E


def _seg_cols(M: torch.Tensor, ib: torch.Tensor, lb: int, v: torch.Tensor | None = None) -> torch.Tensor:
    """Column-block sums of ``M_ij v_j`` -> ``(rows, lb)``; one pass over M, no M-sized temporary."""
    return M @ _indicator(ib, lb, M, v).T


def _seg2(M: torch.Tensor, ia: torch.Tensor, la: int, ib: torch.Tensor, lb: int,
          u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Block sums of ``u_i M_ij v_j`` (rows grouped by ia, columns by ib) -> (la, lb)."""
    return _indicator(ia, la, M, u) @ _seg_cols(M, ib, lb, v)


def _seg2_squares(M: torch.Tensor, ia: torch.Tensor, la: int, ib: torch.Tensor, lb: int,
                  rows: int = 1024) -> torch.Tensor:
    """Block sums of ``M_ij^2`` -> (la, lb), squaring ``rows`` rows at a time (M may be
    hundreds of MB; a full ``M * M`` temporary cost more than the arithmetic)."""
    Eb = _indicator(ib, lb, M).T
    out = M.new_zeros(la, lb)
    for r in range(0, M.shape[0], rows):
        chunk = M[r:r + rows]
        out.index_add_(0, ia[r:r + rows], (chunk * chunk) @ Eb)
    return out


def _finish(num: torch.Tensor, sk: torch.Tensor, sl: torch.Tensor, kl1: torch.Tensor, n: float,
            estimator: str) -> torch.Tensor:
    if estimator == "unbiased":
        return (num + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))
    raise AssertionError(estimator)


def _hsic_cross(st: dict, n: float, ia, la, ib, lb, estimator: str) -> torch.Tensor:
    """HSIC for every (l, m) block from the cross sums (see the module docstring)."""
    C, sx, sy = st["C"], st["sx"], st["sy"]
    normc2 = _seg2_squares(C, ia, la, ib, lb)
    scs = _seg2(C, ia, la, ib, lb, sx, sy)
    sx2 = torch.zeros(la, dtype=C.dtype, device=C.device).index_add_(0, ia, sx * sx)
    sy2 = torch.zeros(lb, dtype=C.dtype, device=C.device).index_add_(0, ib, sy * sy)
    if estimator == "biased":
        return (normc2 - 2.0 * scs / n + sx2[:, None] * sy2[None, :] / n ** 2) / (n - 1) ** 2
    ab = st["ab"]
    say = _seg_cols(st["ay"], ib, lb, sy)        # s_y . sum a_il y_i over block m
    sbx = _seg_cols(st["bx"], ia, la, sx).T      # s_x . sum b_im x_i over block l
    kl1 = scs - say - sbx + ab
    return _finish(normc2 - ab, (sx2 - st["na"])[:, None], (sy2 - st["nb"])[None, :], kl1, n, estimator)


def _hsic_self(grams: list[torch.Tensor], s: torch.Tensor, na: torch.Tensor, axd: torch.Tensor,
               aa: torch.Tensor, offs: list[int], n: float, estimator: str) -> torch.Tensor:
    """HSIC(K_l, K_l) per layer from the diagonal blocks G_l = X_l^T X_l and the sums."""
    out = []
    for l, G in enumerate(grams):
        sl = s[offs[l]:offs[l + 1]]
        g2, sgs, s2 = (G * G).sum(), sl @ G @ sl, sl @ sl
        if estimator == "biased":
            out.append((g2 - 2.0 * sgs / n + s2 * s2 / n ** 2) / (n - 1) ** 2)
        else:
            kk1 = sgs - 2.0 * (sl * axd[offs[l]:offs[l + 1]]).sum() + aa[l]
            out.append(_finish(g2 - aa[l], s2 - na[l], s2 - na[l], kk1, n, estimator))
    return torch.stack(out)


def _zero_variance(s: torch.Tensor, na: torch.Tensor, idx: torch.Tensor, layers: int, n: float) -> torch.Tensor:
    """Layers whose variance, n * tr Cov = sum_i a_i - ||s||^2 / n, is zero to float64 rounding."""
    s2 = torch.zeros(layers, dtype=torch.float64, device=s.device).index_add_(0, idx, s * s)
    var = na - s2 / n
    return var <= 64 * _EPS * na


def _ratio(hab: torch.Tensor, haa: torch.Tensor, hbb: torch.Tensor, zero_a: torch.Tensor, zero_b: torch.Tensor,
           names_a: Sequence[str], names_b: Sequence[str]) -> torch.Tensor:
    cka = hab / torch.sqrt(haa[:, None] * hbb[None, :])
    bad = [names_a[i] for i in torch.nonzero(zero_a).flatten().tolist()]
    bad += [names_b[i] for i in torch.nonzero(zero_b).flatten().tolist() if names_b[i] not in bad]
    if bad:
        warnings.warn(f"layer(s) {', '.join(bad)} have zero variance (constant features); their CKA "
                      "rows/columns are NaN", RuntimeWarning, stacklevel=3)
        cka = cka.clone()
        cka[zero_a, :] = float("nan")
        cka[:, zero_b] = float("nan")
    return cka


def _blocks(M: torch.Tensor, offs: list[int]) -> list[torch.Tensor]:
    return [M[offs[l]:offs[l + 1], offs[l]:offs[l + 1]] for l in range(len(offs) - 1)]


# -- the accumulator -----------------------------------------------------------------
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
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.names_a = _names(names_a, len(self.dims_a), "a")
        self.names_b = self.names_a if self.same else _names(names_b, len(self.dims_b), "b")
        self.offs_a, self.offs_b = _offsets(self.dims_a), _offsets(self.dims_b)
        self.la, self.lb = len(self.dims_a), len(self.dims_b)
        self.da, self.db = self.offs_a[-1], self.offs_b[-1]
        self._ia = layer_index(self.offs_a, self.device)
        self._ib = layer_index(self.offs_b, self.device)
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
            raise ValueError("the shifted features overflowed float32 in the squared norms; pass float64 features")
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
        formula is ``minidiff.distributed.cka_state_bytes``)."""
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
    def compute(self) -> torch.Tensor:
        """The ``(La, Lb)`` CKA matrix (float64) over every sample seen."""
        n = float(self.n)
        if self.estimator == "minibatch":
            if n == 0:
                raise ValueError("no samples seen: call update() before compute()")
            zero_a, zero_b = self.ss_a <= self.raw_a, self.ss_b <= self.raw_b
            return _ratio(self.hsic_ab, self.hsic_aa, self.hsic_bb, zero_a, zero_b, self.names_a, self.names_b)
        bad = [self.names_a[i] for i in torch.nonzero(self._nonfinite_a).flatten().tolist()]
        bad += [self.names_b[i] for i in torch.nonzero(self._nonfinite_b).flatten().tolist()]
        if bad:
            raise ValueError(f"layer(s) {', '.join(dict.fromkeys(bad))} received non-finite values (NaN or "
                             "Inf) in an update on the GPU; the sums are invalid: check the model outputs "
                             "and start a new accumulator")
        need = 4 if self.estimator == "unbiased" else 2
        if n < need:
            raise ValueError(f"the {self.estimator} estimator needs at least {need} samples, got {int(n)}")
        expect = float(self.parts) * float(self.shift_a.sum() + (0 if self.same else self.shift_b.sum()))
        if abs(float(self.shift_check) - expect) > 1e-9 * (abs(expect) + float(self.parts)):
            raise ValueError("these states were summed over accumulators with different shifts; call "
                             "align_shift() with one common shift on every shard before adding states "
                             "(merge() does this by itself)")
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
        return _ratio(hab, haa, hbb, zero_a, zero_b, self.names_a, self.names_b)


def _unflatten(flat: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    out, o = [], 0
    for d in dims:
        out.append(flat[o:o + d * d].view(d, d))
        o += d * d
    return out


# -- one batch in memory: feature form or Gram form ----------------------------------------
def _feature_cost(n: int, dims_a, dims_b, same: bool) -> float:
    da, db = sum(dims_a), sum(dims_b)
    return n * (da * da if same else da * db + sum(d * d for d in dims_a) + sum(d * d for d in dims_b))


def _gram_cost(n: int, dims_a, dims_b, same: bool) -> float:
    da, db = sum(dims_a), sum(dims_b)
    return n * n * (da + (0 if same else db) + len(dims_a) * len(dims_b))


def _grams_hsic(ka: torch.Tensor, kb: torch.Tensor | None, estimator: str):
    """HSIC between every pair of stacked Gram matrices ``ka (La, n, n)``, ``kb (Lb, n, n)``
    (``kb=None``: model a with itself). Works in the Grams' dtype and modifies
    them in place (centring or zeroing the diagonal); returns float64."""
    n = ka.shape[-1]
    grams = [ka] if kb is None else [ka, kb]
    if estimator == "biased":
        for k in grams:
            k.sub_(k.mean(1, keepdim=True))
            k.sub_(k.mean(2, keepdim=True))
        fa = ka.reshape(ka.shape[0], -1)
        fb = fa if kb is None else kb.reshape(kb.shape[0], -1)
        c = (n - 1) ** 2
        hab = (fa @ fb.T).double() / c
        haa = _sqnorms(fa) / c
        hbb = haa if kb is None else _sqnorms(fb) / c
        return hab, haa, hbb
    for k in grams:
        k.diagonal(dim1=1, dim2=2).zero_()
    fa = ka.reshape(ka.shape[0], -1)
    fb = fa if kb is None else kb.reshape(kb.shape[0], -1)
    # float32 Grams: torch's cascaded sums and float32 GEMMs, finished in float64
    ca = ka.sum(2)  # K~ is symmetric: row sums = column sums, and the contiguous reduction is faster
    cb = ca if kb is None else kb.sum(2)
    ta, tb = ca.sum(1).double(), cb.sum(1).double()

    def h(tr, sk, sl, kl1):
        return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))

    hab = h((fa @ fb.T).double(), ta[:, None], tb[None, :], (ca @ cb.T).double())
    haa = h(_sqnorms(fa), ta, ta, _sqnorms(ca))
    hbb = haa if kb is None else h(_sqnorms(fb), tb, tb, _sqnorms(cb))
    return hab, haa, hbb


def _sqnorms(rows: torch.Tensor) -> torch.Tensor:
    """Squared norm of every row, one pass, float64 result."""
    return torch.linalg.vector_norm(rows, dim=1).double() ** 2


def _linear_grams(layers: list[torch.Tensor]) -> torch.Tensor:
    """Stacked ``X_l X_l^T`` in the layers' dtype, written straight into one buffer."""
    n = layers[0].shape[0]
    out = torch.empty(len(layers), n, n, dtype=layers[0].dtype, device=layers[0].device)
    for l, x in enumerate(layers):
        torch.mm(x, x.T, out=out[l])
    return out


def _use_gram_form(n: int, dims_a, dims_b, same: bool, itemsize: int) -> bool:
    gram_bytes = itemsize * n * n * (len(dims_a) + (0 if same else len(dims_b)))
    return (_gram_cost(n, dims_a, dims_b, same) < _feature_cost(n, dims_a, dims_b, same)
            and gram_bytes <= _GRAM_MEMORY_LIMIT)


def _feature_hsic(za: torch.Tensor, zb: torch.Tensor, offs_a: list[int], offs_b: list[int], same: bool,
                  estimator: str):
    """HSIC of every layer pair for one batch in feature form (rows centred), plus each
    layer's sum of squares. GEMMs in the batch's dtype, everything after in float64."""
    n = za.shape[0]
    la, lb = len(offs_a) - 1, len(offs_b) - 1
    ia, ib = layer_index(offs_a, za.device), layer_index(offs_b, zb.device)
    t = dict(zip(("sx", "sy", "na", "nb", "ay", "bx", "ab", "axd", "byd", "aa", "bb"),
                 batch_terms(za, zb, offs_a, offs_b)))
    t["C"] = (za.T @ zb).double()
    hab = _hsic_cross(t, float(n), ia, la, ib, lb, estimator)
    if same:
        haa = hbb = torch.diagonal(hab).clone()
    else:
        ga = [(za[:, a:b].T @ za[:, a:b]).double() for a, b in zip(offs_a, offs_a[1:])]
        gb = [(zb[:, a:b].T @ zb[:, a:b]).double() for a, b in zip(offs_b, offs_b[1:])]
        haa = _hsic_self(ga, t["sx"], t["na"], t["axd"], t["aa"], offs_a, float(n), estimator)
        hbb = _hsic_self(gb, t["sy"], t["nb"], t["byd"], t["bb"], offs_b, float(n), estimator)
    return hab, haa, hbb, t["na"], t["nb"]


# -- public functions ----------------------------------------------------------------
def cka_matrix(feats_a, feats_b=None, *, kernel: str = "linear", estimator: str = "unbiased",
               threshold: float = 1.0, names_a: Sequence[str] | None = None,
               names_b: Sequence[str] | None = None) -> torch.Tensor:
    """CKA between every layer of model a and every layer of model b.

    Parameters
    ----------
    feats_a, feats_b : lists of ``(n, d_l)`` features (torch or numpy; trailing
        dimensions are flattened), rows aligned across all layers of both models.
        ``feats_b=None`` compares model a with itself. Widths and layer counts
        may differ between the models.
    kernel : ``"linear"`` or ``"rbf"`` (bandwidth ``sigma^2 = threshold^2 *`` median
        squared distance, Kornblith et al. 2019).
    estimator : ``"unbiased"`` (HSIC_1, Song et al. 2012; n >= 4) or ``"biased"``.

    Returns
    -------
    ``(La, Lb)`` float64 tensor. Computed in float64 by the cheaper of the feature
    form (linear kernel only) and the Gram form; never clamped.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} for in-memory CKA, got {estimator!r} "
                         "(the minibatch estimator is CKAAccumulator(estimator='minibatch'))")
    if kernel == "rbf" and not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    same = feats_b is None
    fa = _layer_list(feats_a, "a")
    na_ = _names(names_a, len(fa), "a")
    la = [_as_features(t, f"layer {name}") for t, name in zip(fa, na_)]
    if same:
        lb, nb_ = la, na_
    else:
        fb = _layer_list(feats_b, "b")
        nb_ = _names(names_b, len(fb), "b")
        lb = [_as_features(t, f"layer {name}") for t, name in zip(fb, nb_)]
    n = _check_rows(la + lb, na_ + nb_, None)
    need = 4 if estimator == "unbiased" else 2
    if n < need:
        raise ValueError(f"the {estimator} estimator needs at least {need} samples, got n={n}")
    device = la[0].device
    la = [t.to(device=device, dtype=torch.float64) for t in la]
    lb = la if same else [t.to(device=device, dtype=torch.float64) for t in lb]
    dims_a, dims_b = [t.shape[1] for t in la], [t.shape[1] for t in lb]
    gram_bytes = 8 * n * n * (len(la) + (0 if same else len(lb)))
    use_gram = kernel == "rbf" or (
        _gram_cost(n, dims_a, dims_b, same) < _feature_cost(n, dims_a, dims_b, same) and gram_bytes <= _GRAM_MEMORY_LIMIT)
    if not use_gram:
        acc = CKAAccumulator(dims_a, None if same else dims_b, estimator=estimator, device=device,
                             names_a=na_, names_b=None if same else nb_)
        acc.update(la, None if same else lb)
        return acc.compute()
    centred_a = [t - t.mean(0) for t in la]
    centred_b = centred_a if same else [t - t.mean(0) for t in lb]

    def zero(raw, centred):
        return torch.tensor([float((c * c).sum()) <= 64 * _EPS * float((r * r).sum()) for r, c in zip(raw, centred)],
                            device=device)

    zero_a = zero(la, centred_a)
    zero_b = zero_a if same else zero(lb, centred_b)
    if kernel == "linear":
        ka = torch.stack([c @ c.T for c in centred_a])
        kb = None if same else torch.stack([c @ c.T for c in centred_b])
    else:
        ka = torch.stack([gram_rbf(c, threshold) for c in centred_a])
        kb = None if same else torch.stack([gram_rbf(c, threshold) for c in centred_b])
    hab, haa, hbb = _grams_hsic(ka, kb, estimator)
    return _ratio(hab, haa, hbb, zero_a, zero_b, na_, nb_)


def cka(x, y, *, kernel: str = "linear", estimator: str = "biased", threshold: float = 1.0) -> float:
    """CKA between two representations of the same n examples.

    ``x: (n, d1)``, ``y: (n, d2)`` (torch tensors or numpy arrays). See
    :func:`cka_matrix` for kernels and estimators; the default here is the biased
    estimator of Kornblith et al. (2019). Returns a Python float (NaN, with a
    warning, when one representation has zero variance).
    """
    return float(cka_matrix([x], [y], kernel=kernel, estimator=estimator, threshold=threshold,
                            names_a=["x"], names_b=["y"])[0, 0])
