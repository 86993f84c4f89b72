"""A whole language-model study against the bare forward passes of its models.

A Llama-architecture decoder (random weights; only the shapes matter for time) with a
realistic vocabulary, against its int8 (W8A8) and int4 weight-only versions, on
windows of ``n_ctx`` tokens of the held-out chatterbot text (tokens drawn from the
vocabulary: the text's own tokenizer has too small a vocabulary for the shape).

* study: ``LMStudy.run()`` (every model on the same batch, the scored half's logits,
  the fused token-divergence kernel, the accumulators, the where-it-hurts decoding),
  once without and once with token-level CKA of all hidden-state pairs;
* floor: the bare forward passes of the same models over the same windows and
  batches, ``model(input_ids=x, use_cache=False).logits`` under ``no_grad`` (what a
  user's own evaluation loop costs at the least).

Rounds alternate (floor, study, study+CKA); medians over rounds. Target: the study
within 1.2x of the floor.

    python benchmarks/bench_lm_study.py            # V = 32000, n_ctx = 256, 64 windows (16,384 tokens)
    python benchmarks/bench_lm_study.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.vocab, a.hidden, a.layers, a.n_ctx, a.windows, a.rounds = 4096, 64, 2, 64, 4, 1

    from minidiff.compress import quantize
    from minidiff.lm.study import LMStudy
    from minidiff.lm.tinylm import TinyLMConfig, build_model

    cfg = TinyLMConfig(hidden=a.hidden, layers=a.layers, heads=max(1, a.hidden // 64),
                       intermediate=int(a.hidden * 8 / 3) // 32 * 32, n_ctx=a.n_ctx)
    base = build_model(cfg, a.vocab, 0, 1).eval()
    models = {"base": base, "int8": quantize(base, "int8").model,
              "int4-g32": quantize(base, "int4-weight-only", group_size=32).model}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, a.vocab, (a.windows * a.n_ctx,), generator=g)
    variants = {k: v for k, v in models.items() if k != "base"}

    def floor() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, a.windows, a.batch):
                x = ids[lo * a.n_ctx:(lo + a.batch) * a.n_ctx].reshape(-1, a.n_ctx)
                for m in models.values():
                    m(input_ids=x, use_cache=False).logits
        return time.perf_counter() - t

    def study(cka: bool) -> tuple[float, dict]:
        t = time.perf_counter()
        res = LMStudy(base, variants, text=ids, n_ctx=a.n_ctx, batch_size=a.batch, cka=cka).run()
        return time.perf_counter() - t, res.timing

    times: dict[str, list[float]] = {"floor": [], "study": [], "study+cka": []}
    floor()  # warm-up (allocator, kernels)
    for r in range(a.rounds):
        times["floor"].append(floor())
        s, tim = study(False)
        times["study"].append(s)
        s2, _ = study(True)
        times["study+cka"].append(s2)
        f = times["floor"][-1]
        print(f"round {r + 1}: floor {f:.2f} s, study {s:.2f} s ({s / f:.2f}x; stream {tim['stream_s']:.2f}, "
              f"explain {tim['explain_s']:.2f}), study+CKA {s2:.2f} s ({s2 / f:.2f}x), "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nV={a.vocab} hidden={a.hidden} layers={a.layers} n_ctx={a.n_ctx} windows={a.windows} batch={a.batch} "
          f"models={len(models)} threads={torch.get_num_threads()}")
    print(f"median floor (bare forwards): {med['floor']:.3f} s")
    print(f"median study:                 {med['study']:.3f} s   ratio {med['study'] / med['floor']:.2f}x")
    print(f"median study + CKA:           {med['study+cka']:.3f} s   ratio {med['study+cka'] / med['floor']:.2f}x")
    per_round = [s / f for s, f in zip(times["study"], times["floor"])]
    print(f"median of the per-round ratios: study {statistics.median(per_round):.2f}x, study + CKA "
          f"{statistics.median(s / f for s, f in zip(times['study+cka'], times['floor'])):.2f}x")


if __name__ == "__main__":
    main()
