"""Benchmark: the CKA engine (streaming all-layer-pairs linear CKA) on CPU, then
the agreement engine (``benchmarks/engine_agreement.py``) when it is present.

Per configuration (layers x width of model a vs model b, n samples, batch size):

* ``floor``: the float32 GEMM ``Z_a^T Z_b`` of the stacked (concatenated) layers
  of every batch, nothing else. Any exact streaming method must do at least this.
* ``exact``: ``CKAAccumulator(estimator="unbiased")`` fed per-layer lists (what
  a capture hook hands over) and ``exact (stacked)`` fed the already stacked
  ``(b, sum d)`` batch; both include ``compute()``. Beyond the floor it also does
  the per-layer self GEMMs ``X_l^T X_l`` (needed for HSIC(K, K); +29 % of the
  floor's flops at 7x384 vs 7x384, +32 % at 13x768 vs 7x384), the shift and the
  fused per-sample terms.
* ``minibatch``: ``CKAAccumulator(estimator="minibatch")`` (Nguyen et al. 2021).
* ``pytorch-cka``: PyPI ``pytorch-cka`` 1.1.3's own accumulation code
  (``cka.CKA._accumulate_hsic`` + ``_compute_cka_matrix``, i.e. per-layer Grams
  ``X X^T`` and ``cka.hsic``) run on the same batches; it computes the minibatch
  estimator (average per-batch HSIC_1), so ``minibatch`` is compared with it and
  the two results are checked to agree.

Batches: the same activations for every method, two distinct random batches
(features with a shared low-rank signal plus noise, mean 2) used alternately so
that large n does not need n x D of memory. Each method streams the whole n three
times (``--rounds``), the methods taking turns within a round; the median stream time
is reported, and the per-batch median is printed as well.
Ratios are from the same run. Peak memory: the exact accumulator is run in a fresh
subprocess for each n and its peak RSS increase is printed (it must not grow
with n).

``python benchmarks/bench_engine.py`` (full: n = 16k and 65k, batches 1024 and
4096), ``--quick`` (smoke run, small n), ``--skip-agreement``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from minidiff.similarity import CKAAccumulator

CONFIGS = {
    "7x384 vs 7x384": ([384] * 7, [384] * 7),
    "13x768 vs 7x384": ([768] * 13, [384] * 7),
}


def make_batches(dims_a, dims_b, b: int, count: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        base = torch.randn(b, 32, generator=g)
        la = [base @ torch.randn(32, d, generator=g) / 6 + torch.randn(b, d, generator=g) + 2 for d in dims_a]
        lb = [base @ torch.randn(32, d, generator=g) / 6 + torch.randn(b, d, generator=g) + 2 for d in dims_b]
        out.append((la, lb, torch.cat(la, 1), torch.cat(lb, 1)))
    return out


class _PytorchCKAState:
    """The attributes pytorch-cka's CKA._accumulate_hsic reads, filled per batch."""

    def __init__(self, la: int, lb: int):
        self._is_same_model = False
        self.model1_layer_to_module = {f"a{i}": None for i in range(la)}
        self.model2_layer_to_module = {f"b{i}": None for i in range(lb)}
        self._model1_layer_to_feature = {}
        self._model2_layer_to_feature = {}


def stream(method: str, batches, n: int, b: int, dims_a, dims_b):
    """Run one method over n samples; returns (total seconds, per-batch seconds, result,
    process CPU seconds). With one thread the CPU time is the work done, insensitive
    to other jobs on a shared machine."""
    c0 = time.process_time()
    total, per, res = _stream(method, batches, n, b, dims_a, dims_b)
    return total, per, res, time.process_time() - c0


def _stream(method: str, batches, n: int, b: int, dims_a, dims_b):
    steps = n // b
    per = []
    if method == "floor":
        acc = torch.zeros(sum(dims_a), sum(dims_b))
        for i in range(steps):
            za, zb = batches[i % len(batches)][2:]
            t = time.perf_counter()
            acc.addmm_(za.T, zb)
            per.append(time.perf_counter() - t)
        return sum(per), per, None
    if method in ("exact", "exact (stacked)", "minibatch"):
        acc = CKAAccumulator(dims_a, dims_b, estimator="minibatch" if method == "minibatch" else "unbiased")
        for i in range(steps):
            la, lb, za, zb = batches[i % len(batches)]
            t = time.perf_counter()
            if method == "exact (stacked)":
                acc.update(za, zb)
            else:
                acc.update(la, lb)
            per.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = acc.compute()
        return sum(per) + time.perf_counter() - t, per, res
    if method == "pytorch-cka":
        from cka.cka import CKA

        state = _PytorchCKAState(len(dims_a), len(dims_b))
        hxy = torch.zeros(len(dims_a), len(dims_b))
        hxx, hyy = torch.zeros(len(dims_a)), torch.zeros(len(dims_b))
        for i in range(steps):
            la, lb = batches[i % len(batches)][:2]
            t = time.perf_counter()
            state._model1_layer_to_feature = {f"a{j}": x for j, x in enumerate(la)}
            state._model2_layer_to_feature = {f"b{j}": y for j, y in enumerate(lb)}
            with torch.inference_mode():
                CKA._accumulate_hsic(state, hxy, hxx, hyy)
            per.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = CKA._compute_cka_matrix(state, hxy, hxx, hyy)
        return sum(per) + time.perf_counter() - t, per, res
    raise ValueError(method)


_MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from bench_engine import make_batches
from minidiff.similarity import CKAAccumulator

def peak_kib():
    # VmHWM belongs to this process image; ru_maxrss survives exec() and would report
    # the (much larger) benchmark parent's peak at fork time
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

dims_a, dims_b, n, b = json.loads(sys.argv[1])
batches = make_batches(dims_a, dims_b, b)
acc = CKAAccumulator(dims_a, dims_b)
acc.update(*batches[0][:2])
base = peak_kib()
for i in range(1, n // b):
    acc.update(*batches[i % 2][:2])
acc.compute()
peak = peak_kib()
print(json.dumps({{"after_first_batch_mib": base / 1024, "peak_mib": peak / 1024, "state_mib": acc.nbytes() / 2**20}}))
"""


def peak_memory(dims_a, dims_b, n: int, b: int) -> dict:
    code = _MEMORY_CHILD.format(root=str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", code, json.dumps([dims_a, dims_b, n, b])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool, ns, sizes, methods_large_n, rounds: int = 3) -> list[dict]:
    """Every method streams the same n samples ``rounds`` times, the methods taking turns
    within each round (so slow drift of the machine hits them alike); the median stream
    time per method is reported."""
    rows = []
    for name, (dims_a, dims_b) in CONFIGS.items():
        for b in sizes:
            batches = make_batches(dims_a, dims_b, b)
            for n in ns:
                methods = ["floor", "exact", "exact (stacked)", "minibatch", "pytorch-cka"]
                if n > min(ns):
                    methods = [m for m in methods if m in methods_large_n]
                for m in methods:
                    stream(m, batches, b, b, dims_a, dims_b)  # untimed warm-up: imports, op registration, MKL JIT
                runs: dict[str, list] = {m: [] for m in methods}
                for _ in range(rounds):
                    for m in methods:
                        runs[m].append(stream(m, batches, n, b, dims_a, dims_b))
                res = {}
                for m in methods:
                    total = statistics.median(r[0] for r in runs[m])
                    per = [t for r in runs[m] for t in r[1]]
                    cpu = statistics.median(r[3] for r in runs[m])
                    res[m] = (total, statistics.median(per), runs[m][-1][2], cpu)
                    print(f"  {name:17s} n={n:6d} b={b:5d} {m:16s} {total:8.2f} s  "
                          f"(median of {rounds}; median batch {1e3 * statistics.median(per):7.1f} ms, "
                          f"process CPU {cpu:8.2f} s)", flush=True)
                row = {"config": name, "n": n, "batch": b, **{m: res[m][0] for m in methods},
                       "cpu": {m: res[m][3] for m in methods}}
                if "minibatch" in res and "pytorch-cka" in res:
                    # pytorch-cka clamps to [0, 1]; on this data every value is inside, so they must agree
                    row["mb_vs_pcka_maxdiff"] = float((res["minibatch"][2] - res["pytorch-cka"][2].double()).abs().max())
                rows.append(row)
    return rows


def print_table(rows: list[dict], key: str = "wall") -> None:
    if key == "cpu":
        rows = [{**r, **r["cpu"]} for r in rows]
    print(f"\nStreaming all-pairs linear CKA, CPU, {key} seconds for the whole stream (incl. compute())")
    head = (f"{'config':17s} {'n':>6s} {'batch':>5s} {'floor':>7s} {'exact':>7s} {'stacked':>7s} {'minib.':>7s} "
            f"{'pt-cka':>7s} | {'exact/floor':>11s} {'stack/floor':>11s} {'pt-cka/exact':>12s} "
            f"{'pt-cka/minib':>12s}")
    print(head)
    print("-" * len(head))
    f = lambda r, k: f"{r[k]:7.2f}" if k in r else f"{'-':>7s}"  # noqa: E731
    q = lambda r, a, c: f"{r[a] / r[c]:.2f}" if a in r and c in r else "-"  # noqa: E731
    for r in rows:
        print(f"{r['config']:17s} {r['n']:6d} {r['batch']:5d} {f(r, 'floor')} {f(r, 'exact')} "
              f"{f(r, 'exact (stacked)')} {f(r, 'minibatch')} {f(r, 'pytorch-cka')} | "
              f"{q(r, 'exact', 'floor'):>11s} {q(r, 'exact (stacked)', 'floor'):>11s} "
              f"{q(r, 'pytorch-cka', 'exact'):>12s} {q(r, 'pytorch-cka', 'minibatch'):>12s}")
    diffs = [r["mb_vs_pcka_maxdiff"] for r in rows if "mb_vs_pcka_maxdiff" in r]
    if diffs:
        print(f"minibatch vs pytorch-cka results: max |difference| {max(diffs):.1e} (same estimator)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: n=2048, batches 512 and 1024")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of the configurations")
    ap.add_argument("--n", default=None, help="comma-separated sample counts (default 16384,65536)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="timed streams per method (median reported)")
    ap.add_argument("--large-n-methods", default="floor,exact,exact (stacked)",
                    help="methods also run at the larger n (per-batch cost does not depend on n)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in list(CONFIGS):
        if name not in args.configs.split(","):
            del CONFIGS[name]
    print(f"minidiff bench_engine | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | python {platform.python_version()}")
    if args.quick:
        ns, sizes = [2048], [512, 1024]
    else:
        ns, sizes = [16384, 65536], [1024, 4096]
    if args.n:
        ns = [int(v) for v in args.n.split(",")]
    rows = run(args.quick, ns, sizes, args.large_n_methods.split(","), 1 if args.quick else args.rounds)
    print_table(rows)
    print_table(rows, "cpu")
    if not args.skip_memory:
        print("\nPeak memory of the exact accumulator (fresh process per n, 7x384 vs 7x384, batch 1024):")
        for n in ([2048, 8192] if args.quick else [16384, 65536]):
            m = peak_memory([384] * 7, [384] * 7, n, 1024)
            print(f"  n={n:6d}: peak RSS {m['peak_mib']:7.1f} MiB (after the first batch {m['after_first_batch_mib']:7.1f} MiB),"
                  f" accumulator state {m['state_mib']:.1f} MiB")
    if not args.skip_agreement:
        path = Path(__file__).resolve().parent / "engine_agreement.py"
        if path.exists():
            sys.path.insert(0, str(path.parent))
            import engine_agreement

            print("\nPrediction agreement engine (benchmarks/engine_agreement.py):")
            rows = engine_agreement.run(quick=args.quick)
            if hasattr(engine_agreement, "format_table"):
                print(engine_agreement.format_table(rows))
            else:
                for r in rows:
                    print(r)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
