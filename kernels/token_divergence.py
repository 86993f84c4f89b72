"""Triton kernel for the fused token divergence of two logit matrices.

One program per row (scored token); the row is read in ``BLOCK`` tiles twice
(the second read hits L2 on a GPU):

1. online logsumexp of both rows (running maximum, rescaled running sum), the
   first argmax of each, and, with a target ``y``, the ranks ``#{v : z_v > z_y}``;
2. with ``lp = z - lse(z)``, ``lq = w - lse(w)``, ``d = lp - lq``:
   ``kld = sum p d``, ``kld_reverse = -sum q d``, ``entropy = -sum p lp`` and
   ``js = 0.5 sum (-p g(-d) - q g(d))`` with ``g(x) = log((1 + e^x) / 2)``, from
   ``L = log((1 + n/m) / 2) = 2 atanh((n - m) / (3m + n))`` (``m = max(p, q)``,
   ``n = min(p, q)``; the atanh series is exact 0 when p = q), ``g(-|d|) = L``,
   ``g(|d|) = |d| + L``.

Arithmetic in float64 (inputs are upcast per tile), so results agree with the
CPU kernel and the float64 reference to rounding; identical rows give exactly
0. ``-inf`` entries are exact zeros of p or q. NaN/``+inf`` logits and rows
without a finite entry are rejected by the caller (``minidiff.ops.token_divergence``)
before launch, as are shapes, dtypes and target ranges.

The top-5/top-10 overlaps are computed with torch on the device: the k-th
largest value from ``torch.topk``, then the set ``{v : z_v > kth}`` plus the
first ``k - #{z_v > kth}`` indices with ``z_v == kth`` (ties to the smaller
token id, as in the CPU kernel), whatever order ``topk`` returns ties in.
Under ``TRITON_INTERPRET=1`` these run on CPU tensors (tests), with BLOCK 32+.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from minidiff._env import triton_interpreting


@triton.jit
def _two_atanh(s):
    s2 = s * s
    acc = s2 * 0.0 + 1.0 / 35.0
    acc = acc * s2 + 1.0 / 33.0
    acc = acc * s2 + 1.0 / 31.0
    acc = acc * s2 + 1.0 / 29.0
    acc = acc * s2 + 1.0 / 27.0
    acc = acc * s2 + 1.0 / 25.0
    acc = acc * s2 + 1.0 / 23.0
    acc = acc * s2 + 1.0 / 21.0
    acc = acc * s2 + 1.0 / 19.0
    acc = acc * s2 + 1.0 / 17.0
    acc = acc * s2 + 1.0 / 15.0
    acc = acc * s2 + 1.0 / 13.0
    acc = acc * s2 + 1.0 / 11.0
    acc = acc * s2 + 1.0 / 9.0
    acc = acc * s2 + 1.0 / 7.0
    acc = acc * s2 + 1.0 / 5.0
    acc = acc * s2 + 1.0 / 3.0
    acc = acc * s2 + 1.0
    return 2.0 * s * acc


@triton.jit
def _row_kernel(z_ptr, w_ptr, t_ptr, of_ptr, oi_ptr, V, HAS_T: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zr = z_ptr + row * V
    wr = w_ptr + row * V
    offs = tl.arange(0, BLOCK)
    ninf = float("-inf")
    zy = 0.0
    wy = 0.0
    if HAS_T:
        y = tl.load(t_ptr + row)
        zy = tl.load(zr + y).to(tl.float64)
        wy = tl.load(wr + y).to(tl.float64)
    mz = tl.full((), ninf, tl.float64)
    mw = tl.full((), ninf, tl.float64)
    sz = tl.zeros((), tl.float64)
    sw = tl.zeros((), tl.float64)
    iz = tl.zeros((), tl.int64)
    iw = tl.zeros((), tl.int64)
    rz = tl.zeros((), tl.int64)
    rw = tl.zeros((), tl.int64)
    for b0 in range(0, V, BLOCK):
        idx = b0 + offs
        ok = idx < V
        x = tl.load(zr + idx, mask=ok, other=ninf).to(tl.float64)
        u = tl.load(wr + idx, mask=ok, other=ninf).to(tl.float64)
        bz = tl.max(x, 0)
        bw = tl.max(u, 0)
        az = tl.min(tl.where(x == bz, idx, V), 0).to(tl.int64)
        aw = tl.min(tl.where(u == bw, idx, V), 0).to(tl.int64)
        iz = tl.where(bz > mz, az, iz)
        iw = tl.where(bw > mw, aw, iw)
        nz = tl.maximum(mz, bz)
        nw = tl.maximum(mw, bw)
        sz = tl.where(sz > 0, sz * tl.exp(mz - nz), sz)
        sw = tl.where(sw > 0, sw * tl.exp(mw - nw), sw)
        ez = tl.where(x > ninf, tl.exp(x - nz), 0.0)
        ew = tl.where(u > ninf, tl.exp(u - nw), 0.0)
        sz += tl.sum(ez, 0)
        sw += tl.sum(ew, 0)
        mz = nz
        mw = nw
        if HAS_T:
            rz += tl.sum((ok & (x > zy)).to(tl.int64), 0)
            rw += tl.sum((ok & (u > wy)).to(tl.int64), 0)
    lse_z = mz + tl.log(sz)
    lse_w = mw + tl.log(sw)
    kl = tl.zeros((), tl.float64)
    klr = tl.zeros((), tl.float64)
    js = tl.zeros((), tl.float64)
    ent = tl.zeros((), tl.float64)
    for b0 in range(0, V, BLOCK):
        idx = b0 + offs
        ok = idx < V
        lp = tl.load(zr + idx, mask=ok, other=ninf).to(tl.float64) - lse_z
        lq = tl.load(wr + idx, mask=ok, other=ninf).to(tl.float64) - lse_w
        pp = tl.exp(lp)
        qq = tl.exp(lq)
        pos_p = pp > 0
        pos_q = qq > 0
        d = tl.where(pos_p | pos_q, lp - lq, 0.0)
        m = tl.maximum(pp, qq)
        n = tl.minimum(pp, qq)
        den = tl.where(m > 0, 3.0 * m + n, 1.0)
        big = _two_atanh(tl.where(m > 0, (n - m) / den, 0.0))
        ad = tl.abs(d)
        gp = tl.where(pp >= qq, big, ad + big)
        gq = tl.where(pp >= qq, ad + big, big)
        kl += tl.sum(tl.where(pos_p, pp * d, 0.0), 0)
        klr += tl.sum(tl.where(pos_q, -qq * d, 0.0), 0)
        ent += tl.sum(tl.where(pos_p, -pp * lp, 0.0), 0)
        js += tl.sum(tl.where(pos_p, -pp * gp, 0.0) + tl.where(pos_q, -qq * gq, 0.0), 0)
    o = of_ptr + row * 8
    tl.store(o + 0, kl)
    tl.store(o + 1, klr)
    tl.store(o + 2, 0.5 * js)
    tl.store(o + 3, ent)
    if HAS_T:
        tl.store(o + 6, zy - lse_z)
        tl.store(o + 7, wy - lse_w)
    else:
        tl.store(o + 6, 0.0)
        tl.store(o + 7, 0.0)
    oi = oi_ptr + row * 4
    tl.store(oi + 0, iz)
    tl.store(oi + 1, iw)
    tl.store(oi + 2, rz)
    tl.store(oi + 3, rw)


def _topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (R, V) membership of the top-k set, ties to the smaller index."""
    kk = min(k, x.shape[1])
    kth = torch.topk(x, kk, dim=1).values[:, kk - 1:kk]
    gt = x > kth
    eq = x == kth
    need = kk - gt.sum(1, keepdim=True)
    return gt | (eq & (torch.cumsum(eq.to(torch.int32), 1) <= need))


def topk_overlap(z: torch.Tensor, w: torch.Tensor, k: int, rows_per_chunk: int = 256) -> torch.Tensor:
    """float64 ``|top_k(z) ∩ top_k(w)| / min(k, V)`` per row, in chunks of rows."""
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    kk = min(k, z.shape[1])
    for s in range(0, z.shape[0], rows_per_chunk):
        e = s + rows_per_chunk
        inter = (_topk_mask(z[s:e], k) & _topk_mask(w[s:e], k)).sum(1)
        out[s:e] = inter.to(torch.float64) / kk
    return out


def token_divergence(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats_f (R, 8) float64, stats_i (R, 4) int64)``, columns as in
    ``minidiff.ops.token_divergence``; inputs already validated, contiguous."""
    base = base.contiguous()
    variant = variant.contiguous()
    rows, vocab = base.shape
    out_f = torch.empty((rows, 8), dtype=torch.float64, device=base.device)
    out_i = torch.empty((rows, 4), dtype=torch.int64, device=base.device)
    if rows == 0:
        return out_f, out_i
    interp = triton_interpreting()
    block = 256 if interp else min(4096, max(32, triton.next_power_of_2(vocab)))
    t = targets.to(torch.int64).contiguous() if targets is not None else out_i  # dummy pointer
    _row_kernel[(rows,)](base, variant, t, out_f, out_i, vocab, HAS_T=targets is not None, BLOCK=block,
                         num_warps=8 if block >= 2048 else 4)
    out_f[:, 4] = topk_overlap(base, variant, 5)
    out_f[:, 5] = topk_overlap(base, variant, 10)
    return out_f, out_i
