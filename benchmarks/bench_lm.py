"""Fused token divergence vs the plain torch pipeline and two floors, in one run.

For float32 logits ``(rows, V)`` of a base and a variant model:

* ``fused``: ``minidiff.lm.token_divergence`` (native kernel on CPU, Triton on CUDA) on
  all rows at once: both KLDs, JS, entropy, top-1s, top-5/10 overlap, p and rank of the
  target;
* ``torch``: the plain pipeline ``log_softmax`` (both) + ``kl_div`` (both directions) +
  ``topk`` (both) + ``gather`` of the target's log-probabilities, on chunks of
  ``--torch-chunk`` rows (its float32 temporaries are four times a chunk's logits);
* ``read floor``: one read of both matrices (``z.sum() + w.sum()``);
* ``exp floor``: one vectorized float32 ``torch.exp`` per element of both matrices,
  written into a reused buffer of ``--exp-chunk`` rows (no allocation in the timing).

Each method runs ``--rounds`` times, methods taking turns; medians and the ratios of
the medians are printed. Targets: fused >= 3x faster than torch, and within 3x of the
binding floor (the slower of the two floors).

``--simd avx2`` (or ``scalar``) caps the CPU kernel's instruction set (``MINIDIFF_SIMD``),
to measure the path machines without AVX-512 run; run it as
``ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_lm.py --simd avx2`` so that torch's
pipeline and floors are capped the same way.

Before allocating, the benchmark checks the memory the system has available and
refuses (with the figure) rather than risk the out-of-memory killer.

    python benchmarks/bench_lm.py --rows 4096 --vocab 32000 128000 152064
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from minidiff._native import cpu_core
from minidiff.lm import token_divergence
from minidiff.similarity.memory import available_bytes


def torch_pipeline(z: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> None:
    for r0 in range(0, z.shape[0], chunk):
        a, b, tt = z[r0:r0 + chunk], w[r0:r0 + chunk], t[r0:r0 + chunk]
        lp = torch.log_softmax(a, dim=-1)
        lq = torch.log_softmax(b, dim=-1)
        torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
        torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
        torch.topk(a, 10, dim=-1)
        torch.topk(b, 10, dim=-1)
        lp.gather(1, tt[:, None])
        lq.gather(1, tt[:, None])


def exp_floor(z: torch.Tensor, w: torch.Tensor, buf: torch.Tensor) -> None:
    n = buf.shape[0]
    for m in (z, w):
        for r0 in range(0, m.shape[0], n):
            part = m[r0:r0 + n]
            torch.exp(part, out=buf[: part.shape[0]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(rows: int, vocab: int, rounds: int, device: torch.device, torch_chunk: int,
          exp_chunk: int) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(rows, vocab, device=device, generator=g).mul_(3.0)
    w = torch.randn(rows, vocab, device=device, generator=g).mul_(0.1).add_(z)
    t = torch.randint(0, vocab, (rows,), device=device, generator=g)
    buf = torch.empty(min(exp_chunk, rows), vocab, device=device)
    methods = {
        "fused": lambda: token_divergence(z, w, t),
        "torch": lambda: torch_pipeline(z, w, t, torch_chunk),
        "read floor": lambda: (z.sum() + w.sum()).item(),
        "exp floor": lambda: exp_floor(z, w, buf),
    }
    for fn in methods.values():  # warm-up (Triton compiles here)
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000, 152064])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-chunk", type=int, default=1024, help="rows per torch-pipeline call")
    ap.add_argument("--exp-chunk", type=int, default=256, help="rows of the exp floor's output buffer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--simd", choices=["auto", "avx512", "avx2", "scalar"], default="auto",
                    help="cap the CPU kernel's instruction set (sets MINIDIFF_SIMD)")
    args = ap.parse_args()
    if args.simd != "auto":
        os.environ["MINIDIFF_SIMD"] = args.simd
    device = torch.device(args.device)
    need = 4 * max(args.vocab) * (2 * args.rows + 4 * min(args.torch_chunk, args.rows)
                                  + min(args.exp_chunk, args.rows))
    avail = available_bytes(device) if device.type == "cpu" else None
    if avail is not None and need + (2 << 30) > avail:
        raise SystemExit(f"needs about {need / 2**30:.1f} GiB (+2 GiB margin) but {avail / 2**30:.1f} GiB are "
                         "available: lower --rows, --torch-chunk or --vocab")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}" if load else "", end="; ")
    simd = (f", kernel SIMD {cpu_core().simd_level()}, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}" if device.type == "cpu" else "")
    print(f"torch {torch.__version__}, device {device}{simd}, threads {torch.get_num_threads()}, rows {args.rows} "
          f"(torch pipeline in chunks of {args.torch_chunk}), median of {args.rounds} rounds, "
          f"{need / 2**30:.1f} GiB of {avail / 2**30 if avail else float('nan'):.1f} GiB available")
    print(f"{'V':>7} {'fused ms':>9} {'torch ms':>9} {'read ms':>8} {'exp ms':>8} "
          f"{'torch/fused':>11} {'fused/read':>10} {'fused/exp':>9} {'GB/s':>6}  binding floor")
    for vocab in args.vocab:
        m = bench(args.rows, vocab, args.rounds, device, args.torch_chunk, args.exp_chunk)
        floor = "exp" if m["exp floor"] >= m["read floor"] else "read"
        gbs = 2 * args.rows * vocab * 4 / m["fused"] / 1e9
        print(f"{vocab:>7} {1e3 * m['fused']:>9.1f} {1e3 * m['torch']:>9.1f} {1e3 * m['read floor']:>8.1f} "
              f"{1e3 * m['exp floor']:>8.1f} {m['torch'] / m['fused']:>11.2f} "
              f"{m['fused'] / m['read floor']:>10.2f} {m['fused'] / m['exp floor']:>9.2f} {gbs:>6.2f}  {floor}",
              flush=True)
    if load:
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
