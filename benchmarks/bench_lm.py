"""Fused token divergence vs the plain torch pipeline and two floors, in one run.

For float32 logits ``(rows, V)`` of a base and a variant model:

* ``fused``: ``minidiff.lm.token_divergence`` (native kernel on CPU, Triton on CUDA):
  both KLDs, JS, entropy, top-1s, top-5/10 overlap, p and rank of the target;
* ``torch``: the plain pipeline ``log_softmax`` (both) + ``kl_div`` (both directions) +
  ``topk`` (both) + ``gather`` of the target's log-probabilities;
* ``read floor``: one read of both matrices (``z.sum() + w.sum()``);
* ``exp floor``: ``torch.exp`` over both matrices (one transcendental per element).

Each method runs ``--rounds`` times, methods taking turns; medians and the ratios
of the medians are printed. Targets: fused >= 3x faster than torch, and within
3x of the binding floor (the larger of the two).

    python benchmarks/bench_lm.py --rows 512 --vocab 32000 128000 152064
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minidiff.lm import token_divergence


def torch_pipeline(z: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    lp = torch.log_softmax(z, dim=-1)
    lq = torch.log_softmax(w, dim=-1)
    kld = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    kld_rev = torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    top_b = torch.topk(z, 10, dim=-1).indices
    top_v = torch.topk(w, 10, dim=-1).indices
    gb = lp.gather(1, t[:, None])
    gv = lq.gather(1, t[:, None])
    return kld, kld_rev, top_b, top_v, gb, gv


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(rows: int, vocab: int, rounds: int, device: torch.device) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(rows, vocab, device=device, generator=g) * 3
    w = z + 0.1 * torch.randn(rows, vocab, device=device, generator=g)
    t = torch.randint(0, vocab, (rows,), device=device, generator=g)
    methods = {
        "fused": lambda: token_divergence(z, w, t),
        "torch": lambda: torch_pipeline(z, w, t),
        "read floor": lambda: (z.sum() + w.sum()).item(),
        "exp floor": lambda: (torch.exp(z), torch.exp(w)),
    }
    for fn in methods.values():  # warm-up (Triton compiles here)
        fn()
    times = {name: [] for name in methods}
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
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000, 152064])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"rows {args.rows}, median of {args.rounds} rounds")
    print(f"{'V':>7} {'fused ms':>9} {'torch ms':>9} {'read ms':>8} {'exp ms':>8} "
          f"{'torch/fused':>11} {'fused/read':>10} {'fused/exp':>9} {'GB/s':>6}  binding floor")
    for vocab in args.vocab:
        m = bench(args.rows, vocab, args.rounds, device)
        floor = "exp" if m["exp floor"] >= m["read floor"] else "read"
        gbs = 2 * args.rows * vocab * 4 / m["fused"] / 1e9
        print(f"{vocab:>7} {1e3 * m['fused']:>9.1f} {1e3 * m['torch']:>9.1f} {1e3 * m['read floor']:>8.1f} "
              f"{1e3 * m['exp floor']:>8.1f} {m['torch'] / m['fused']:>11.2f} "
              f"{m['fused'] / m['read floor']:>10.2f} {m['fused'] / m['exp floor']:>9.2f} {gbs:>6.2f}  {floor}")


if __name__ == "__main__":
    main()
