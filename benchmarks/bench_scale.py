"""Scale-out of a token-level CKA study with torch.distributed.

The study: every hidden state of a 13-layer x 768 model (BERT-base shaped) against
every hidden state of a 7-layer x 384 model (MiniLM-L6 shaped), token level, with
the exact streaming unbiased estimator (``minidiff.similarity.CKAAccumulator``),
over ``--samples`` synthetic token vectors (default 1M). A pool of random batches
is generated once per process and cycled through, so data generation is not timed.

Runs, each launched with ``python -m torch.distributed.run`` (= torchrun):

* 1 process (all cores) at ``samples / 4`` and at ``samples``: peak memory per
  process (``ru_maxrss``) must not grow with the number of samples;
* K processes (``--procs``, default 2, cores split evenly) at ``samples``:
  samples per second and speedup over 1 process; every rank's sums are
  all-reduced and rank 0 checks that its CKA matrix equals the 1-process one.

The floor is the float32 GEMM time of the same batches (``Z_a^T Z_b`` plus the
per-layer Grams ``X_l^T X_l``, which is all the arithmetic the exact estimator
needs), measured in the same run with the same thread count.

With CUDA, also the BERT-large shaped case on one GPU: 25 x 1024 against
13 x 768 and 7 x 384 (two accumulators) over ``samples``, as a fraction of the
measured float32 GEMM peak (and of the GEMM time of the same batches).

    python benchmarks/bench_scale.py                   # 1M samples
    python benchmarks/bench_scale.py --samples 131072  # smaller
    python benchmarks/bench_scale.py --quick           # seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DIMS_A = [768] * 13
DIMS_B = [384] * 7
GPU_CASES = {"25x1024 vs 13x768": ([1024] * 25, [768] * 13), "25x1024 vs 7x384": ([1024] * 25, [384] * 7)}


def make_pool(dims_a, dims_b, batches: int, rows: int, seed: int, device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Correlated synthetic token features: every layer is a random linear map of a
    shared 128-d latent plus noise and a large offset (so centring matters)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pool = []
    wa = [torch.randn(128, d, generator=g) / 8 for d in dims_a]
    wb = [torch.randn(96, d, generator=g) / 8 for d in dims_b]
    for _ in range(batches):
        z = torch.randn(rows, 128, generator=g)
        a = torch.cat([z @ w + 0.5 * torch.randn(rows, w.shape[1], generator=g) + 3.0 for w in wa], dim=1)
        b = torch.cat([torch.tanh(z[:, :96] @ w) + 0.5 * torch.randn(rows, w.shape[1], generator=g) - 1.0
                       for w in wb], dim=1)
        pool.append((a.to(device), b.to(device)))
    return pool


def formula_bytes(dims_a, dims_b, float32_inputs: bool = True) -> int:
    """The README's formula (``minidiff.similarity.cka_state_bytes``)."""
    from minidiff.similarity import cka_state_bytes
    return cka_state_bytes(dims_a, dims_b, float32_inputs=float32_inputs)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args) -> None:
    """One rank: accumulate its shard of the samples, all-reduce, compute."""
    from minidiff.distributed import DistContext
    from minidiff.similarity import CKAAccumulator
    ctx = DistContext.from_env(timeout_s=600)
    torch.set_num_threads(args.threads)
    rss0 = _maxrss_mb()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")  # under torchrun with CUDA: this rank's GPU (LOCAL_RANK)
    pool = make_pool(DIMS_A, DIMS_B, args.pool, args.batch, seed=1, device=device)  # same pool on every rank
    pool_mb = sum(a.numel() * 4 + b.numel() * 4 for a, b in pool) / 2 ** 20
    rss_pool = _maxrss_mb()
    start, stop = ctx.shard_range(args.samples, align=args.batch)
    acc = CKAAccumulator(DIMS_A, DIMS_B, estimator="unbiased", device=device)
    ctx.barrier()
    t0 = time.perf_counter()
    for s in range(start, stop, args.batch):  # global batch s // batch: the samples a single process sees
        a, b = pool[(s // args.batch) % len(pool)]
        n = min(args.batch, stop - s)
        acc.update(a[:n], b[:n])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_local = time.perf_counter() - t0
    rss_acc = _maxrss_mb()  # peak while streaming: must not depend on the number of samples
    t1 = time.perf_counter()
    ctx.sync(acc)
    t_sync = time.perf_counter() - t1
    m = acc.compute()
    t_total = time.perf_counter() - t0
    out = {"rank": ctx.rank, "world": ctx.world_size, "samples": args.samples, "local_samples": stop - start,
           "threads": args.threads, "t_local_s": t_local, "t_sync_s": t_sync, "t_total_s": t_total,
           "maxrss_mb": _maxrss_mb(), "rss_stream_mb": rss_acc, "rss_before_pool_mb": rss0, "rss_after_pool_mb": rss_pool,
           "pool_mb": pool_mb, "state_mb": acc.nbytes() / 2 ** 20, "cka": m.tolist()}
    Path(args.out, f"rank{ctx.rank}.json").write_text(json.dumps(out))
    ctx.close()


def launch(nproc: int, samples: int, threads: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--out", tmp, "--samples", str(samples), "--threads", str(threads),
               "--batch", str(args.batch), "--pool", str(args.pool), "--device", args.device]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t0
        res = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]
        for r in res:
            r["launch_wall_s"] = wall
        return res


def gemm_floor(threads: int, args, reps: int) -> float:
    """Median seconds of the float32 GEMMs one batch needs: Z_a^T Z_b and the Grams."""
    torch.set_num_threads(threads)
    pool = make_pool(DIMS_A, DIMS_B, 1, args.batch, seed=1)
    a, b = pool[0]
    C = torch.zeros(a.shape[1], b.shape[1])
    ga = [torch.zeros(d, d) for d in DIMS_A]
    gb = [torch.zeros(d, d) for d in DIMS_B]
    oa = [0] + torch.tensor(DIMS_A).cumsum(0).tolist()
    ob = [0] + torch.tensor(DIMS_B).cumsum(0).tolist()
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        C.addmm_(a.T, b)
        for l, g in enumerate(ga):
            x = a[:, oa[l]:oa[l + 1]]
            g.addmm_(x.T, x)
        for l, g in enumerate(gb):
            x = b[:, ob[l]:ob[l + 1]]
            g.addmm_(x.T, x)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def gpu_case(samples: int, batch: int) -> None:
    from minidiff.similarity import CKAAccumulator
    dev = torch.device("cuda")
    n = 8192
    x = torch.randn(n, n, device=dev)
    for _ in range(3):
        x @ x
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ x
    torch.cuda.synchronize()
    peak = 10 * 2 * n ** 3 / (time.perf_counter() - t)
    del x
    print(f"\nGPU: {torch.cuda.get_device_name()}, measured float32 GEMM peak {peak / 1e12:.1f} TFLOP/s "
          f"(TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})")
    dims_a = GPU_CASES["25x1024 vs 13x768"][0]
    others = {k: v[1] for k, v in GPU_CASES.items()}
    widths = [dims_a] + list(others.values())
    pool = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(4):
        pool.append([torch.randn(batch, sum(d), generator=g).add_(2.0).to(dev) for d in widths])
    accs = {k: CKAAccumulator(dims_a, d, device=dev) for k, d in others.items()}
    flops_per_sample = sum(2 * (sum(dims_a) * sum(d) + sum(w * w for w in dims_a) + sum(w * w for w in d))
                           for d in others.values())
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    done, i = 0, 0
    while done < samples:
        b = min(batch, samples - done)
        p = pool[i % len(pool)]
        for j, (k, acc) in enumerate(accs.items()):
            acc.update(p[0][:b], p[j + 1][:b])
        done += b
        i += 1
    mats = {k: acc.compute() for k, acc in accs.items()}
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    achieved = flops_per_sample * samples / dt
    print(f"BERT-large shaped ({', '.join(others)}), {samples:,} samples, batch {batch}: {dt:.1f} s, "
          f"{samples / dt:,.0f} samples/s, {achieved / 1e12:.1f} TFLOP/s = {achieved / peak:.0%} of the GEMM peak; "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB "
          f"(states by formula: {sum(formula_bytes(dims_a, d) for d in others.values()) / 2 ** 30:.2f} GiB); "
          f"CKA diagonal-ish sample {float(next(iter(mats.values()))[0, 0]):.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="16k samples, small pool (seconds; CI smoke test)")
    p.add_argument("--procs", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    p.add_argument("--batch", type=int, default=2048, help="token vectors per update")
    p.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores shared by the processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where the multi-process runs keep features and accumulators (auto: cuda if present)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.samples, args.batch, args.pool = 16384, 1024, 2
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"bench_scale: {len(DIMS_A)}x{DIMS_A[0]} vs {len(DIMS_B)}x{DIMS_B[0]} token-level exact CKA, "
          f"{args.samples:,} samples, batch {args.batch}, pool {args.pool}; torch {torch.__version__}, "
          f"{args.cores} cores, load average {' '.join(load)}")
    print(f"accumulator state by formula: {formula_bytes(DIMS_A, DIMS_B) / 2 ** 20:.0f} MiB "
          f"(8 B x (Da Db + sum da^2 + sum db^2 + small) + 4 B pending float32 sums)")
    floor = {}
    for k in sorted({1, *args.procs}):
        threads = max(1, args.cores // k)
        floor[k] = gemm_floor(threads, args, reps=3 if args.quick else 5)
    flop_batch = 2 * args.batch * (sum(DIMS_A) * sum(DIMS_B) + sum(d * d for d in DIMS_A) + sum(d * d for d in DIMS_B))
    runs = {}
    small = max(args.batch, args.samples // 4)
    runs[(1, small)] = launch(1, small, args.cores, args)
    runs[(1, args.samples)] = launch(1, args.samples, args.cores, args)
    for k in args.procs:
        if k > 1:
            runs[(k, args.samples)] = launch(k, args.samples, max(1, args.cores // k), args)
    ref = torch.tensor(runs[(1, args.samples)][0]["cka"], dtype=torch.float64)
    base_rate = None
    print(f"\n{'procs':>5} {'threads':>7} {'samples':>10} {'time s':>8} {'samples/s':>10} {'speedup':>7} "
          f"{'GEMM floor/s':>12} {'of floor':>8} {'sync s':>6} {'maxrss MiB/proc':>16} {'state MiB':>9} "
          f"{'pool MiB':>8}")
    for (k, n), res in runs.items():
        t = max(r["t_total_s"] for r in res)
        rate = n / t
        if k == 1 and n == args.samples:
            base_rate = rate
        floor_rate = args.batch / floor[k] * k
        rss = "/".join(f"{r['maxrss_mb']:.0f}" for r in res)
        print(f"{k:>5} {res[0]['threads']:>7} {n:>10,} {t:>8.1f} {rate:>10,.0f} "
              f"{(rate / base_rate if base_rate and n == args.samples else float('nan')):>7.2f} "
              f"{floor_rate:>12,.0f} {rate / floor_rate:>8.0%} {max(r['t_sync_s'] for r in res):>6.2f} "
              f"{rss:>16} {res[0]['state_mb']:>9.0f} {res[0]['pool_mb']:>8.0f}")
        if n == args.samples:
            diff = float((torch.tensor(res[0]["cka"], dtype=torch.float64) - ref).abs().max())
            if k > 1:
                print(f"      {k} processes vs 1: max |CKA difference| = {diff:.2e}")
    for k in sorted(floor):
        print(f"GEMM floor with {max(1, args.cores // k)} thread(s): {floor[k] * 1e3:.1f} ms per batch of "
              f"{args.batch} = {flop_batch / floor[k] / 1e9:.0f} GFLOP/s")
    for key in ("rss_stream_mb", "maxrss_mb"):
        rs, rl = runs[(1, small)][0][key], runs[(1, args.samples)][0][key]
        what = "while streaming" if key == "rss_stream_mb" else "incl. sync + compute"
        print(f"peak memory {what}, 1 process: {rs:.0f} MiB at {small:,} samples vs {rl:.0f} MiB at "
              f"{args.samples:,} ({rl / rs - 1:+.1%})")
    r = runs[(1, args.samples)][0]
    print(f"  (1 process: {r['rss_before_pool_mb']:.0f} MiB after imports, {r['rss_after_pool_mb']:.0f} MiB "
          f"after the {r['pool_mb']:.0f} MiB pool; compute() holds a few (Da x Db) float64 temporaries)")
    if torch.cuda.is_available():
        gpu_case(args.samples, batch=8192)
    else:
        print("\nGPU case (25x1024 vs 13x768 and 7x384 on one GPU): skipped, no CUDA device here")


if __name__ == "__main__":
    main()
