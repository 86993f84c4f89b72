"""Benchmark: the prediction agreement engine on CPU.

What it measures (medians of repeated runs; ratios from the same run):

* ``disagreement_matrix`` for N = 64 models x M = 1,000,000 examples (int32
  predictions, 10 and 1000 classes) against what a user would write instead:
  chunked numpy broadcasting, ``(P[:, None, c] != P[None, :, c]).sum(-1)`` over
  chunks ``c`` of 8192 examples (64 x 64 x 8192 bools = 32 MiB per chunk; the
  same loop in torch is ~10x slower still, so it is not run). The floor is one streaming read of the predictions
  (``np.max`` over the 256 MB array): any method must read them once.
* ``flip_matrix`` and ``error_jaccard`` (labels given) against numpy: the
  correctness matrix ``R = (P == y)`` and a float32 GEMM ``R @ R.T`` for the
  both-right counts (the fast formulation a careful user would find), from
  which flips and error sets follow.

The synthetic predictions look like a family of compressed models: each model
agrees with the label on ~90 % of examples and is uniform otherwise, so pairwise
disagreement is ~17 %. Every timed result is checked against the baseline's
counts (exact) before it is reported.

``run(quick)`` returns a list of rows (dicts); ``python benchmarks/engine_agreement.py``
prints the table. ``--quick`` uses M = 200,000 and fewer repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

import minidiff
from minidiff._native import cpu_core

N_MODELS = 64
CHUNK = 8192


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _synthetic(m: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=m, dtype=np.int32)
    preds = np.broadcast_to(labels, (N_MODELS, m)).copy()
    wrong = rng.random((N_MODELS, m)) < 0.10
    preds[wrong] = rng.integers(0, num_classes, size=int(wrong.sum()), dtype=np.int32)
    return np.ascontiguousarray(preds), labels


def numpy_disagreement(preds: np.ndarray) -> np.ndarray:
    n, m = preds.shape
    counts = np.zeros((n, n), dtype=np.int64)
    for s in range(0, m, CHUNK):
        c = preds[:, s:s + CHUNK]
        counts += (c[:, None, :] != c[None, :, :]).sum(-1)
    return counts


def numpy_both_right(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    right = (preds == labels[None, :]).astype(np.float32)
    return np.rint(right @ right.T).astype(np.int64)  # exact: counts < 2**24


def run(quick: bool = False) -> list[dict]:
    m = 200_000 if quick else 1_000_000
    reps_fast, reps_slow = (3, 1) if quick else (7, 3)
    threads = torch.get_num_threads()
    rows: list[dict] = []
    for num_classes in (10, 1000):
        preds, labels = _synthetic(m, num_classes)
        tp, tl = torch.from_numpy(preds), torch.from_numpy(labels)
        case = f"N={N_MODELS} M={m:,} C={num_classes} int32"

        t_floor, _ = _median_time(lambda: preds.max(), reps_fast)
        t_np, ref = _median_time(lambda: numpy_disagreement(preds), reps_slow, warmup=0)
        t_md, d = _median_time(lambda: minidiff.disagreement_matrix(tp), reps_fast)
        assert np.array_equal(np.rint(d.numpy() * m).astype(np.int64), ref), "disagreement mismatch"
        rows.append({"op": "disagreement_matrix", "case": case, "minidiff_s": t_md,
                     "numpy_chunked_s": t_np, "floor_s": t_floor, "speedup_vs_numpy": t_np / t_md,
                     "x_floor": t_md / t_floor, "threads": threads,
                     "kernel": cpu_core().agreement_path()})

        t_gemm, both = _median_time(lambda: numpy_both_right(preds, labels), reps_slow)
        right = np.diag(both)
        ref_flips = (right[:, None] - both) / m
        ref_union = m - both
        ref_inter = m - right[:, None] - right[None, :] + both
        t_fl, f = _median_time(lambda: minidiff.flip_matrix(tp, tl), reps_fast)
        assert np.array_equal(f[..., 0].numpy(), ref_flips), "flips mismatch"
        t_jac, j = _median_time(lambda: minidiff.error_jaccard(tp, tl), reps_fast)
        assert np.allclose(j.numpy(), ref_inter / np.maximum(ref_union, 1), rtol=0, atol=1e-15)
        for op, t in (("flip_matrix", t_fl), ("error_jaccard", t_jac)):
            rows.append({"op": op, "case": case, "minidiff_s": t, "numpy_gemm_s": t_gemm,
                         "floor_s": t_floor, "speedup_vs_numpy_gemm": t_gemm / t,
                         "x_floor": t / t_floor, "threads": threads,
                         "kernel": cpu_core().agreement_path()})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| op | case | minidiff (ms) | baseline (ms) | speed-up | x floor |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["op"] == "disagreement_matrix":
            base = f"numpy chunked {r['numpy_chunked_s'] * 1e3:.0f}"
            speed = f"{r['speedup_vs_numpy']:.0f}x"
        else:
            base = f"numpy R@R.T {r['numpy_gemm_s'] * 1e3:.0f}"
            speed = f"{r['speedup_vs_numpy_gemm']:.1f}x"
        lines.append(f"| {r['op']} | {r['case']} | {r['minidiff_s'] * 1e3:.1f} | {base} | {speed} | "
                     f"{r['x_floor']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 200k, fewer repeats")
    args = parser.parse_args()
    results = run(quick=args.quick)
    print(f"torch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}, "
          f"kernel {cpu_core().agreement_path()}, floor = np.max over the predictions (one read)")
    print(format_table(results))
