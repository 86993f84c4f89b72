"""Streaming study-level statistics of token-level divergence (llama.cpp's KLD report).

:class:`TokenDivergenceAccumulator` folds batches of two models' logits into
sums, counts and fixed-bin histograms, so shards of a corpus merge exactly and
memory never grows with the number of tokens (the per-window sums grow with the
number of windows, the flipped-token list is capped). :meth:`compute` returns a
:class:`TokenDivergenceResult` whose statistics carry the names and definitions
of ``llama-perplexity --kl-divergence`` (llama.cpp, ``examples/perplexity/perplexity.cpp``,
functions ``kl_divergence`` and ``log_softmax``; N = scored tokens):

==============================  ===================================================================
llama.cpp line                  minidiff field and definition
==============================  ===================================================================
Mean PPL(Q), Mean PPL(base)     ``ppl_variant``, ``ppl_base`` = ``exp(mean NLL)``, err = PPL * err(mean NLL)
Cor(ln(PPL(Q)), ln(PPL(base)))  ``ln_ppl_correlation``: Pearson correlation of the per-token NLLs
Mean ln(PPL(Q)/PPL(base))       ``ln_ppl_ratio``, err = sqrt(e_Q^2 + e_b^2 - 2 cov(mean NLL_Q, mean NLL_b))
Mean PPL(Q)/PPL(base)           ``ppl_ratio`` = exp(ln_ppl_ratio), err = ratio * err(ln ratio)
Mean PPL(Q)-PPL(base)           ``ppl_diff``, err = sqrt(u_Q^2 + u_b^2 - 2 PPL_Q PPL_b cov)
Mean KLD, Maximum, 99.9% .. 1%  ``kld``, ``kld_err``, ``kld_max``, ``kld_percentiles``, ``kld_min``
Mean/Max/percentiles/Min Δp     ``delta_p`` (= p_Q(y) - p_base(y)), ``delta_p_percentiles``, ...
RMS Δp                          ``delta_p_rms`` = sqrt(mean Δp^2), err = err(mean Δp^2) / (2 rms)
Same top p                      ``same_top1``, err = sqrt(f (1 - f) / (N - 1))
==============================  ===================================================================

The uncertainty of a mean follows llama.cpp: ``err = sqrt((mean(x^2) - mean(x)^2) / (N - 1))``
(NaN for N < 2, where llama.cpp prints 0 for N <= 10), and
``cov = (mean(ab) - mean(a) mean(b)) / (N - 1)``. Beyond llama.cpp: the reverse
KLD(variant || base) with the same statistics (``kld_reverse*``), JS, top-5/10
overlap, the base entropy, the correlation of per-window ln PPL
(``window_ln_ppl_correlation``, with ``window_ids``). llama.cpp computes the
KLD from base log-probabilities stored as 16-bit integers and skips terms with
``log p < -16``; minidiff's are exact (see :func:`minidiff.lm.token_divergence`),
so the figures agree to that storage's precision, not to every digit.

Percentiles come from merged fixed-bin histograms, with numpy's default
("linear") rule: the ``f`` quantile is ``(1 - t) x_(i) + t x_(i+1)`` for
``f (N - 1) = i + t``, each order statistic replaced by the centre of its bin,
clamped to the exact minimum and maximum (ranks 0 and N-1 are exact):

* KLD (both directions): log-spaced bins, :data:`KLD_BINS_PER_DECADE` per decade
  on ``[1e-10, 1e5)``. A convex combination of estimates within a factor
  ``sqrt(r)`` (``r = 10^(1/200)``) of each order statistic is within that factor
  of the true percentile: relative error at most ``sqrt(r) - 1 = 0.58%``; values
  below 1e-10 carry an absolute error below 1e-10; above 1e5 (or ``inf``) they
  are reported as the maximum.
* Δp: :data:`DELTA_P_BINS` linear bins on ``[-1, 1]``: absolute error at most
  half a bin, ``5e-6`` (0.0005 percentage points).

"Where it hurts" (the language-model analogue of Hooker et al. 2019's Pruning
Identified Exemplars): mean KLD, flip rate (top-1 of base != top-1 of variant)
and mean Δp per bucket of (a) the correct token's frequency in the scored text
(caller-supplied counts, buckets ``[2^b, 2^(b+1))``), (b) position in the window,
(c) the base model's predictive entropy (0.25-nat buckets); the windows with the
largest mean KLD; the first flipped tokens (ordered by window id and position)
with both models' top-3 candidates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from minidiff.accumulate import Accumulator
from minidiff.lm.divergence import token_divergence
from minidiff.ops._validate import as_tensor

__all__ = ["TokenDivergenceAccumulator", "TokenDivergenceResult", "KLD_PERCENTILES",
           "DELTA_P_PERCENTILES"]

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)
KLD_BINS_PER_DECADE = 200
KLD_LOG10_LO, KLD_LOG10_HI = -10, 5
# bin 0: below 1e-10 (incl. 0 and rounding residue); last bin: 1e5 and above (incl. inf)
KLD_BINS = KLD_BINS_PER_DECADE * (KLD_LOG10_HI - KLD_LOG10_LO) + 2
DELTA_P_BINS = 200_000
KLD_RELATIVE_ERROR = 10 ** (0.5 / KLD_BINS_PER_DECADE) - 1
DELTA_P_ABSOLUTE_ERROR = 1.0 / DELTA_P_BINS
FREQ_BUCKETS = 48          # [2^b, 2^(b+1)), b = 0..47 (counts of 0 join bucket 0)
ENTROPY_BUCKET = 0.25      # nats
ENTROPY_BUCKETS = 64       # [0, 16) nats; larger entropies join the last bucket
_BUCKET_COLS = ("n", "kld", "flips", "delta_p")  # per-bucket sums
_WINDOW_COLS = ("window_id", "n", "nll_base", "nll_variant", "kld")
_FLIP_COLS = ("window_id", "position", "target", "top1_base", "top1_variant", "kld",
              "base_id1", "base_id2", "base_id3", "base_p1", "base_p2", "base_p3",
              "variant_id1", "variant_id2", "variant_id3", "variant_p1", "variant_p2", "variant_p3")
_SUMS = ("nll_base", "nll_base2", "nll_variant", "nll_variant2", "nll_nll",
         "kld", "kld2", "kld_reverse", "kld_reverse2", "js", "js2",
         "delta_p", "delta_p2", "delta_p4", "top5", "top10", "entropy_base")


@dataclasses.dataclass(frozen=True)
class TokenDivergenceResult:
    """Study-level token divergence statistics (see :mod:`minidiff.lm.accumulator`).

    Fields that need targets are NaN when no batch had them; ``window_*`` fields
    need ``window_ids``. Dict-style access ``res["kld"]`` reads a field.
    """

    n_tokens: int
    n_scored: int
    ppl_base: float
    ppl_base_err: float
    ppl_variant: float
    ppl_variant_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    ln_ppl_correlation: float
    window_ln_ppl_correlation: float
    kld: float
    kld_err: float
    kld_max: float
    kld_min: float
    kld_percentiles: dict[float, float]
    kld_inf_count: int
    kld_reverse: float
    kld_reverse_err: float
    kld_reverse_max: float
    kld_reverse_min: float
    kld_reverse_percentiles: dict[float, float]
    kld_reverse_inf_count: int
    js: float
    js_err: float
    delta_p: float
    delta_p_err: float
    delta_p_max: float
    delta_p_min: float
    delta_p_percentiles: dict[float, float]
    delta_p_rms: float
    delta_p_rms_err: float
    same_top1: float
    same_top1_err: float
    top5_overlap: float
    top10_overlap: float
    entropy_base: float
    by_frequency: list[dict[str, float]]
    by_position: list[dict[str, float]]
    by_entropy: list[dict[str, float]]
    top_windows: list[dict[str, float]]
    flips: list[dict[str, Any]]
    percentile_error: dict[str, float]

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-ready) dict of every field."""
        return dataclasses.asdict(self)


# ---- statistics helpers ----------------------------------------------------------------
def mean_and_err(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama.cpp's ``mean_and_uncertainty``: mean and ``sqrt((E[x^2] - E[x]^2) / (N - 1))``."""
    if n < 1:
        return math.nan, math.nan
    f = s / n
    if math.isinf(f):
        return f, math.inf
    if n < 2:
        return f, math.nan
    var = s2 / n - f * f
    return f, math.sqrt(var / (n - 1)) if var > 0 else 0.0


def covariance(sa: float, sb: float, sab: float, n: int) -> float:
    """llama.cpp's ``covariance`` of two means: ``(E[ab] - E[a] E[b]) / (N - 1)``."""
    if n < 2:
        return math.nan
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def _kld_bin(x: torch.Tensor) -> torch.Tensor:
    lg = torch.log10(x.clamp_min(10.0 ** KLD_LOG10_LO))
    idx = torch.floor((lg - KLD_LOG10_LO) * KLD_BINS_PER_DECADE).to(torch.int64) + 1
    idx = torch.where(x < 10.0 ** KLD_LOG10_LO, torch.zeros_like(idx), idx)
    return idx.clamp(0, KLD_BINS - 1)


def _kld_bin_centre(i: int) -> float:
    if i == 0:
        return 0.5 * 10.0 ** KLD_LOG10_LO
    if i == KLD_BINS - 1:
        return math.inf  # clamped to the exact maximum
    return 10.0 ** (KLD_LOG10_LO + (i - 0.5) / KLD_BINS_PER_DECADE)


def _dp_bin(x: torch.Tensor) -> torch.Tensor:
    return torch.floor((x + 1.0) * (DELTA_P_BINS / 2)).to(torch.int64).clamp(0, DELTA_P_BINS - 1)


def _dp_bin_centre(i: int) -> float:
    return -1.0 + (i + 0.5) * (2.0 / DELTA_P_BINS)


def histogram_percentiles(hist: torch.Tensor, centre, lo: float, hi: float,
                          percents: tuple[float, ...]) -> dict[float, float]:
    """Percentiles (numpy "linear" rule) from bin counts: each order statistic is
    its bin's ``centre(i)`` clamped to ``[lo, hi]`` (the exact min and max)."""
    n = int(hist.sum())
    if n == 0:
        return {p: math.nan for p in percents}
    cum = torch.cumsum(hist.to(torch.int64), 0)

    def order_stat(k: int) -> float:
        if k == 0:
            return lo
        if k == n - 1:
            return hi
        b = int(torch.searchsorted(cum, torch.tensor(k + 1, dtype=torch.int64)))
        return min(max(centre(b), lo), hi)

    out = {}
    for p in percents:
        pos = p / 100.0 * (n - 1)
        i = int(math.floor(pos))
        t = pos - i
        a = order_stat(i)
        out[p] = a if t == 0 else (1 - t) * a + t * order_stat(min(i + 1, n - 1))
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def _rows_like(x: Any, name: str, lead: tuple[int, ...], rows: int, device) -> torch.Tensor | None:
    """Per-row int64 tensor from ``x`` shaped like the logits' leading dims, or, for
    ``(batch, seq, V)`` logits, ``(batch,)`` (one value per sequence)."""
    if x is None:
        return None
    t = as_tensor(x, name).to(device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if tuple(t.shape) == lead:
        return t.reshape(-1).to(torch.int64)
    if len(lead) == 2 and tuple(t.shape) == lead[:1]:
        return t.to(torch.int64)[:, None].expand(lead).reshape(-1)
    raise ValueError(f"{name} must have shape {lead} (one value per row of logits)"
                     + (f" or {lead[:1]} (one per sequence)" if len(lead) == 2 else "")
                     + f", got {tuple(t.shape)}")


class TokenDivergenceAccumulator(Accumulator):
    """Streaming llama.cpp-style KL-divergence statistics of a variant against a base.

    Parameters
    ----------
    n_positions : int
        Position buckets (one per position in the window; larger positions join the last).
    max_flips : int
        How many flipped tokens to keep (those with the smallest (window id, position)).
    top_windows : int
        How many windows with the largest mean KLD :meth:`compute` lists.
    backend : str
        Backend of :func:`minidiff.lm.token_divergence` ("auto", "native", "triton", "reference").

    Notes
    -----
    States (all declared with a reduction, so ``merge`` and distributed sync are exact):
    float64 sums (``_SUMS``) and int64 counts (``"sum"``), extremes (``"max"``/``"min"``),
    histograms of KLD (both ways) and Δp (``"sum"``), per-bucket sums (``"sum"``),
    per-window sums ``windows (rows, 5)`` and flipped tokens ``flips (rows, 18)``
    (``"cat"``; compacted per window / trimmed to ``max_flips`` by :meth:`compute`).
    Without ``window_ids`` the flips are keyed by the order of rows seen by this
    accumulator (window id -1), which is not shard-invariant.
    """

    def __init__(self, *, n_positions: int = 4096, max_flips: int = 256, top_windows: int = 10,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, v in (("n_positions", n_positions), ("max_flips", max_flips), ("top_windows", top_windows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.n_positions, self.max_flips, self.n_top_windows = n_positions, max_flips, top_windows
        self.backend = backend
        f64, i64 = torch.float64, torch.int64
        self.add_state("sums", torch.zeros(len(_SUMS), dtype=f64), reduce="sum")
        for name in ("n", "n_scored", "n_same_top", "n_kld_inf", "n_kld_reverse_inf"):
            self.add_state(name, torch.zeros((), dtype=i64), reduce="sum")
        for name in ("kld_max", "kld_reverse_max", "delta_p_max"):
            self.add_state(name, torch.tensor(-math.inf, dtype=f64), reduce="max")
        for name in ("kld_min", "kld_reverse_min", "delta_p_min"):
            self.add_state(name, torch.tensor(math.inf, dtype=f64), reduce="min")
        self.add_state("kld_hist", torch.zeros(KLD_BINS, dtype=i64), reduce="sum")
        self.add_state("kld_reverse_hist", torch.zeros(KLD_BINS, dtype=i64), reduce="sum")
        self.add_state("delta_p_hist", torch.zeros(DELTA_P_BINS, dtype=i64), reduce="sum")
        self.add_state("by_frequency", torch.zeros((FREQ_BUCKETS, len(_BUCKET_COLS)), dtype=f64), reduce="sum")
        self.add_state("by_position", torch.zeros((n_positions, len(_BUCKET_COLS)), dtype=f64), reduce="sum")
        self.add_state("by_entropy", torch.zeros((ENTROPY_BUCKETS, len(_BUCKET_COLS)), dtype=f64), reduce="sum")
        self.add_state("windows", torch.zeros((0, len(_WINDOW_COLS)), dtype=f64), reduce="cat")
        self.add_state("flips", torch.zeros((0, len(_FLIP_COLS)), dtype=f64), reduce="cat")

    def config(self) -> dict[str, Any]:
        return {"n_positions": self.n_positions, "max_flips": self.max_flips}

    # -- update ----------------------------------------------------------------------
    def update(self, base_logits: Any, variant_logits: Any, targets: Any = None, *,
               window_ids: Any = None, positions: Any = None, token_frequency: Any = None) -> None:
        """Add a batch of scored tokens.

        Parameters
        ----------
        base_logits, variant_logits : ``(tokens, V)`` or ``(batch, seq, V)``
        targets : int ``(tokens,)`` / ``(batch, seq)``, optional
            Correct next tokens (needed for PPL, Δp, frequency buckets).
        window_ids : int, per row or (for 3-D logits) per sequence, optional
            Which window each token was scored in (per-window PPL, top windows, flips).
        positions : int, per row, optional
            Position of each token in its window (default for 3-D logits: ``0 .. seq-1``).
        token_frequency : int, per row, optional
            Count of the correct token in the scored text (frequency buckets; needs targets).
        """
        z = as_tensor(base_logits, "base_logits")
        w = as_tensor(variant_logits, "variant_logits")
        stats = token_divergence(z, w, targets, backend=self.backend)
        # this batch's per-token statistics, for a caller that also wants them per row (the LM
        # study's worst-window details) without a second pass over the logits
        self.last_batch_stats = stats
        lead = tuple(stats["kld"].shape)
        kld = stats["kld"].reshape(-1)
        rows = kld.numel()
        dev = kld.device
        self._to(dev)
        wid = _rows_like(window_ids, "window_ids", lead, rows, dev)
        pos = _rows_like(positions, "positions", lead, rows, dev)
        if pos is None and len(lead) == 2:
            pos = torch.arange(lead[1], device=dev).expand(lead).reshape(-1)
        freq = _rows_like(token_frequency, "token_frequency", lead, rows, dev)
        has_t = "logp_base" in stats
        if freq is not None and not has_t:
            raise ValueError("token_frequency is the count of the correct token: pass targets too")
        for name, t in (("positions", pos), ("token_frequency", freq)):
            if t is not None and rows and int(t.min()) < 0:
                raise ValueError(f"{name} must be >= 0")
        if rows == 0:
            return
        kr = stats["kld_reverse"].reshape(-1)
        js = stats["js"].reshape(-1)
        ent = stats["entropy_base"].reshape(-1)
        flip = (stats["top1_base"] != stats["top1_variant"]).reshape(-1)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        nan = torch.full((rows,), math.nan, dtype=torch.float64, device=dev)
        sums = dict.fromkeys(_SUMS, zero)
        sums.update(kld=kld.sum(), kld2=(kld * kld).sum(), kld_reverse=kr.sum(), kld_reverse2=(kr * kr).sum(),
                    js=js.sum(), js2=(js * js).sum(), entropy_base=ent.sum(),
                    top5=stats["top5_overlap"].sum(), top10=stats["top10_overlap"].sum())
        dp = nan
        if has_t:
            nb = -stats["logp_base"].reshape(-1)
            nv = -stats["logp_variant"].reshape(-1)
            dp = (stats["p_variant"] - stats["p_base"]).reshape(-1)
            dp2 = dp * dp
            sums.update(nll_base=nb.sum(), nll_base2=(nb * nb).sum(), nll_variant=nv.sum(),
                        nll_variant2=(nv * nv).sum(), nll_nll=(nb * nv).sum(), delta_p=dp.sum(),
                        delta_p2=dp2.sum(), delta_p4=(dp2 * dp2).sum())
            self.n_scored += rows
            self.delta_p_max = torch.maximum(self.delta_p_max, dp.max())
            self.delta_p_min = torch.minimum(self.delta_p_min, dp.min())
            self.delta_p_hist += torch.bincount(_dp_bin(dp), minlength=DELTA_P_BINS)
        self.sums += torch.stack([sums[k] for k in _SUMS])
        self.n += rows
        self.n_same_top += int((~flip).sum())
        self.n_kld_inf += int(torch.isinf(kld).sum())
        self.n_kld_reverse_inf += int(torch.isinf(kr).sum())
        self.kld_max = torch.maximum(self.kld_max, kld.max())
        self.kld_min = torch.minimum(self.kld_min, kld.min())
        self.kld_reverse_max = torch.maximum(self.kld_reverse_max, kr.max())
        self.kld_reverse_min = torch.minimum(self.kld_reverse_min, kr.min())
        self.kld_hist += torch.bincount(_kld_bin(kld), minlength=KLD_BINS)
        self.kld_reverse_hist += torch.bincount(_kld_bin(kr), minlength=KLD_BINS)

        cols = torch.stack([torch.ones_like(kld), kld, flip.to(torch.float64),
                            dp if has_t else torch.zeros_like(kld)], dim=1)
        if freq is not None:
            b = torch.floor(torch.log2(freq.clamp_min(1).to(torch.float64))).to(torch.int64)
            self.by_frequency.index_add_(0, b.clamp_max(FREQ_BUCKETS - 1), cols)
        if pos is not None:
            self.by_position.index_add_(0, pos.clamp_max(self.n_positions - 1), cols)
        eb = torch.floor(ent / ENTROPY_BUCKET).to(torch.int64).clamp(0, ENTROPY_BUCKETS - 1)
        self.by_entropy.index_add_(0, eb, cols)

        if wid is not None:
            ids, inv = torch.unique(wid, return_inverse=True)
            per = torch.zeros((ids.numel(), len(_WINDOW_COLS)), dtype=torch.float64, device=dev)
            per[:, 0] = ids.to(torch.float64)
            vals = torch.stack([torch.ones_like(kld),
                                -stats["logp_base"].reshape(-1) if has_t else nan,
                                -stats["logp_variant"].reshape(-1) if has_t else nan, kld], dim=1)
            per[:, 1:].index_add_(0, inv, vals)
            self.windows = torch.cat([self.windows, per])
        tflat = None if targets is None else as_tensor(targets, "targets").reshape(-1).to(dev)
        self._add_flips(z.reshape(-1, z.shape[-1]), w.reshape(-1, w.shape[-1]), stats, flip, kld,
                        wid, pos, tflat)
        self._rows_seen = getattr(self, "_rows_seen", 0) + rows

    def _add_flips(self, z, w, stats, flip, kld, wid, pos, targets) -> None:
        idx = flip.nonzero()[:, 0]
        if idx.numel() == 0:
            return
        offset = getattr(self, "_rows_seen", 0)
        win = wid[idx] if wid is not None else torch.full_like(idx, -1)
        where = pos[idx] if (pos is not None and wid is not None) else idx + offset
        order = _key_order(win, where)[: self.max_flips]
        idx, win, where = idx[order], win[order], where[order]
        if self.flips.shape[0] >= self.max_flips:
            # The list is full: a flip enters only with a key below the largest kept key
            # (on an equal key the kept row wins, as in the stable sort of _trim_flips),
            # so the others are dropped before their top-3 is computed.
            last = _key_order(self.flips[:, 0], self.flips[:, 1])[self.max_flips - 1]
            kw, kp = self.flips[last, 0], self.flips[last, 1]
            wf, pf = win.to(torch.float64), where.to(torch.float64)
            enters = (wf < kw) | ((wf == kw) & (pf < kp))
            if not bool(enters.any()):
                return
            idx, win, where = idx[enters], win[enters], where[enters]
        rec = torch.empty((idx.numel(), len(_FLIP_COLS)), dtype=torch.float64, device=z.device)
        rec[:, 0], rec[:, 1] = win.to(torch.float64), where.to(torch.float64)
        rec[:, 2] = -1.0 if targets is None else targets[idx].to(torch.float64)
        rec[:, 3] = stats["top1_base"].reshape(-1)[idx].to(torch.float64)
        rec[:, 4] = stats["top1_variant"].reshape(-1)[idx].to(torch.float64)
        rec[:, 5] = kld[idx]
        for start, logits in ((6, z), (12, w)):
            # the top 3 of the logits are those of the log-probabilities (one shift per row),
            # so only the row's float64 logsumexp is needed, not a float64 copy of its log_softmax
            rows_ = logits[idx]
            k = min(3, rows_.shape[-1])
            ids, vals = _top_k_smallest_id_first(rows_, k)
            lse = torch.logsumexp(rows_.to(torch.float64), dim=-1, keepdim=True)
            rec[:, start:start + 3] = -1.0
            rec[:, start + 3:start + 6] = 0.0
            rec[:, start:start + k] = ids.to(torch.float64)
            rec[:, start + 3:start + 3 + k] = torch.exp(vals.to(torch.float64) - lse)
        self.flips = self._trim_flips(torch.cat([self.flips, rec]))

    def _trim_flips(self, flips: torch.Tensor) -> torch.Tensor:
        if flips.shape[0] <= self.max_flips:
            return flips
        return flips[_key_order(flips[:, 0], flips[:, 1])[: self.max_flips]]

    def _to(self, device: torch.device) -> None:
        for name in self._reductions:
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, t.to(device))

    def merge(self, other: "TokenDivergenceAccumulator") -> "TokenDivergenceAccumulator":
        super().merge(other)
        self.flips = self._trim_flips(self.flips)
        return self

    def _post_sync(self, ctx: Any) -> None:
        self.flips = self._trim_flips(self.flips)

    # -- compute ---------------------------------------------------------------------
    def compute(self) -> TokenDivergenceResult:
        """Reduce the states to a :class:`TokenDivergenceResult` (formulas in the module doc)."""
        s = dict(zip(_SUMS, self.sums.double().cpu().tolist()))
        n, ns = int(self.n), int(self.n_scored)
        ln_b, e_b = mean_and_err(s["nll_base"], s["nll_base2"], ns)
        ln_v, e_v = mean_and_err(s["nll_variant"], s["nll_variant2"], ns)
        cov = covariance(s["nll_variant"], s["nll_base"], s["nll_nll"], ns)
        ppl_b, ppl_v = math.exp(ln_b) if ns else math.nan, math.exp(ln_v) if ns else math.nan
        ln_ratio = ln_v - ln_b
        ln_ratio_err = math.sqrt(max(e_v * e_v + e_b * e_b - 2 * cov, 0.0)) if ns >= 2 else math.nan
        ppl_ratio = math.exp(ln_ratio) if ns else math.nan
        u_b, u_v = ppl_b * e_b, ppl_v * e_v
        ppl_diff_err = (math.sqrt(max(u_v * u_v + u_b * u_b - 2 * ppl_v * ppl_b * cov, 0.0))
                        if ns >= 2 else math.nan)
        cor = cov / (e_v * e_b) if ns >= 2 and e_v > 0 and e_b > 0 else math.nan
        kld, kld_err = mean_and_err(s["kld"], s["kld2"], n)
        kr, kr_err = mean_and_err(s["kld_reverse"], s["kld_reverse2"], n)
        js, js_err = mean_and_err(s["js"], s["js2"], n)
        dp, dp_err = mean_and_err(s["delta_p"], s["delta_p2"], ns)
        mse, mse_err = mean_and_err(s["delta_p2"], s["delta_p4"], ns)
        rms = math.sqrt(mse) if ns else math.nan
        rms_err = 0.5 / rms * mse_err if ns and rms > 0 else (0.0 if ns >= 2 else math.nan)
        same = int(self.n_same_top) / n if n else math.nan
        same_err = math.sqrt(same * (1 - same) / (n - 1)) if n >= 2 else math.nan
        kmin, kmax = float(self.kld_min), float(self.kld_max)
        rmin, rmax = float(self.kld_reverse_min), float(self.kld_reverse_max)
        dmin, dmax = float(self.delta_p_min), float(self.delta_p_max)
        windows = self._window_table()
        return TokenDivergenceResult(
            n_tokens=n, n_scored=ns,
            ppl_base=ppl_b, ppl_base_err=u_b, ppl_variant=ppl_v, ppl_variant_err=u_v,
            ln_ppl_ratio=ln_ratio if ns else math.nan, ln_ppl_ratio_err=ln_ratio_err,
            ppl_ratio=ppl_ratio, ppl_ratio_err=ppl_ratio * ln_ratio_err,
            ppl_diff=ppl_v - ppl_b, ppl_diff_err=ppl_diff_err,
            ln_ppl_correlation=cor,
            window_ln_ppl_correlation=self._window_correlation(windows),
            kld=kld, kld_err=kld_err, kld_max=kmax if n else math.nan, kld_min=kmin if n else math.nan,
            kld_percentiles=histogram_percentiles(self.kld_hist.cpu(), _kld_bin_centre, kmin, kmax,
                                                  KLD_PERCENTILES),
            kld_inf_count=int(self.n_kld_inf),
            kld_reverse=kr, kld_reverse_err=kr_err, kld_reverse_max=rmax if n else math.nan,
            kld_reverse_min=rmin if n else math.nan,
            kld_reverse_percentiles=histogram_percentiles(self.kld_reverse_hist.cpu(), _kld_bin_centre,
                                                          rmin, rmax, KLD_PERCENTILES),
            kld_reverse_inf_count=int(self.n_kld_reverse_inf),
            js=js, js_err=js_err,
            delta_p=dp, delta_p_err=dp_err, delta_p_max=dmax if ns else math.nan,
            delta_p_min=dmin if ns else math.nan,
            delta_p_percentiles=histogram_percentiles(self.delta_p_hist.cpu(), _dp_bin_centre, dmin, dmax,
                                                      DELTA_P_PERCENTILES),
            delta_p_rms=rms, delta_p_rms_err=rms_err,
            same_top1=same, same_top1_err=same_err,
            top5_overlap=s["top5"] / n if n else math.nan, top10_overlap=s["top10"] / n if n else math.nan,
            entropy_base=s["entropy_base"] / n if n else math.nan,
            by_frequency=_bucket_rows(self.by_frequency, lambda b: (2.0 ** b, 2.0 ** (b + 1))),
            by_position=_bucket_rows(self.by_position, lambda b: (float(b), float(b + 1))),
            by_entropy=_bucket_rows(self.by_entropy,
                                    lambda b: (b * ENTROPY_BUCKET,
                                               math.inf if b == ENTROPY_BUCKETS - 1 else (b + 1) * ENTROPY_BUCKET)),
            top_windows=self._top_windows(windows),
            flips=self._flip_rows(),
            percentile_error={"kld_relative": KLD_RELATIVE_ERROR, "kld_absolute_below_1e-10": 1e-10,
                              "delta_p_absolute": DELTA_P_ABSOLUTE_ERROR},
        )

    def _window_table(self) -> torch.Tensor:
        """Per-window sums with windows split across batches/shards combined, by id."""
        w = self.windows.cpu()
        if w.shape[0] == 0:
            return w
        ids, inv = torch.unique(w[:, 0], return_inverse=True)
        out = torch.zeros((ids.numel(), w.shape[1]), dtype=torch.float64)
        out[:, 0] = ids
        out[:, 1:].index_add_(0, inv, w[:, 1:])
        return out

    @staticmethod
    def _window_correlation(t: torch.Tensor) -> float:
        if t.shape[0] < 2:
            return math.nan
        return _pearson(t[:, 2] / t[:, 1], t[:, 3] / t[:, 1])

    def _top_windows(self, t: torch.Tensor) -> list[dict[str, float]]:
        if t.shape[0] == 0:
            return []
        mean_kld = t[:, 4] / t[:, 1]
        order = torch.sort(mean_kld, descending=True, stable=True).indices[: self.n_top_windows]
        return [{"window_id": int(t[i, 0]), "n_tokens": int(t[i, 1]), "kld": float(mean_kld[i]),
                 "ppl_base": math.exp(float(t[i, 2] / t[i, 1])),
                 "ppl_variant": math.exp(float(t[i, 3] / t[i, 1]))} for i in order.tolist()]

    def _flip_rows(self) -> list[dict[str, Any]]:
        f = self._trim_flips(self.flips.cpu())
        f = f[_key_order(f[:, 0], f[:, 1])] if f.shape[0] else f
        rows = []
        for r in f.tolist():
            rows.append({
                "window_id": int(r[0]), "position": int(r[1]),
                "target": None if r[2] < 0 else int(r[2]),
                "top1_base": int(r[3]), "top1_variant": int(r[4]), "kld": r[5],
                "base_top3": [(int(i), p) for i, p in zip(r[6:9], r[9:12]) if i >= 0],
                "variant_top3": [(int(i), p) for i, p in zip(r[12:15], r[15:18]) if i >= 0],
            })
        return rows


def _top_k_smallest_id_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row, ordered by (value descending, index
    ascending): the first ``k`` of a stable descending sort, without sorting the row.

    ``torch.topk`` does not fix the order of tied values, so it is asked for the
    ``m`` largest, ``m`` = the most entries any row has at or above its ``k``-th
    largest value (``k`` unless there are ties at the cut); those ``m`` contain every
    candidate and are put in (value, index) order by two stable sorts.
    """
    top = torch.topk(x, k, dim=-1)
    m = int((x >= top.values[:, -1:]).sum(dim=-1).max())
    if m > k:  # ties at the cut: topk's choice among them is arbitrary, take them all
        top = torch.topk(x, m, dim=-1)
    by_id = torch.sort(top.indices, dim=-1, stable=True)
    vals = torch.gather(top.values, -1, by_id.indices)
    by_val = torch.sort(vals, dim=-1, descending=True, stable=True)
    ids = torch.gather(by_id.values, -1, by_val.indices)
    return ids[:, :k], by_val.values[:, :k]


def _key_order(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorting rows by (primary, secondary) ascending."""
    o = torch.sort(secondary, stable=True).indices
    return o[torch.sort(primary[o], stable=True).indices]


def _bucket_rows(t: torch.Tensor, edges) -> list[dict[str, float]]:
    t = t.cpu()
    out = []
    for b in (t[:, 0] > 0).nonzero()[:, 0].tolist():
        n, k, f, d = t[b].tolist()
        lo, hi = edges(b)
        out.append({"lo": lo, "hi": hi, "n": int(n), "kld": k / n, "flip_rate": f / n, "delta_p": d / n})
    return out
