"""Added cost of per-layer error and of the second-order similarity measures.

1. Per-layer error statistics (``LayerErrorAccumulator``) fed from the capture pass of two
   models (a base and a copy with bfloat16-rounded weights), per token, against the same
   pass without them. MiniLM-shaped: the embedded all-MiniLM-L6-v2 (7 x 384) on chatterbot
   sentences; BERT-base-shaped: a randomly initialised BERT-base (13 x 768).
2. The measures (mean squared CCA, SVCCA, Procrustes, regression both ways, RV; ``compute()``-time
   work, O(d^3) per layer pair, independent of n) against the CKA pass that streams the
   statistics they read (``CKAAccumulator.update`` over n float32 samples), on 7 x 384 vs
   7 x 384 and 13 x 768 vs 13 x 768 layers: all six together and each alone (its own eigh
   included), with the leading flops per pair of each (float64) against the pass's (float32)
   and the n from which each adds at most 5% (the pass grows as n, the measures do not).

Each configuration runs ``--rounds`` times; medians and ratios are of the same run.

    python benchmarks/bench_similarity.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from minidiff.similarity import CKAAccumulator, LayerErrorAccumulator

MEASURES = ("cca", "svcca", "procrustes", "regression", "regression_reverse", "rv")  # the set
TARGET = 0.05  # the measures may add at most 5% to the CKA pass


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _models(kind: str):
    from transformers import AutoModel, BertConfig, BertModel

    from minidiff.models.loading import embedded_minilm_dir
    if kind == "minilm":
        base, variant = (AutoModel.from_pretrained(str(embedded_minilm_dir())).eval() for _ in range(2))
    else:
        torch.manual_seed(0)
        base = BertModel(BertConfig()).eval()  # BERT-base shape: 12 layers, 768 wide
        variant = BertModel(BertConfig()).eval()
        variant.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in variant.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return base, variant


def _batches(n_sentences: int, batch: int):
    from transformers import AutoTokenizer

    from minidiff.data import load_builtin
    from minidiff.models.loading import embedded_minilm_dir
    tok = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    texts = list(load_builtin("chatterbot-en").inputs)[:n_sentences]
    return [dict(tok(texts[i:i + batch], padding="max_length", truncation=True, max_length=32,
                     return_tensors="pt")) for i in range(0, len(texts), batch)]


def bench_layer_error(kind: str, n_sentences: int, batch: int, rounds: int) -> dict:
    """The capture pass with the accumulator as a consumer; the consumer's own time is
    measured inside the same pass (robust to load that changes between passes)."""
    from minidiff.models.capture import capture_stream
    base, variant = _models(kind)
    batches = _batches(n_sentences, batch)
    dims = {"minilm": [384] * 7, "bert-base": [768] * 13}[kind]
    models = {"base": base, "variant": variant}
    ratios, totals = [], []
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            acc = LayerErrorAccumulator(dims)
            spent = [0.0]

            def consumer(a, b):
                t = time.perf_counter()
                acc.update(list(a.values()), list(b.values()))
                spent[0] += time.perf_counter() - t

            t = time.perf_counter()
            capture_stream(models, batches, token_mode="tokens", consumers=[consumer])
            acc.compute()
            total = time.perf_counter() - t
            if r:
                ratios.append(spent[0] / (total - spent[0]))
                totals.append(total)
    return {"shape": f"{len(dims)}x{dims[0]}", "pass_s": statistics.median(totals), "added": statistics.median(ratios)}


def measure_flops(d: int, k: int, layers: int) -> dict[str, float]:
    """Leading float64 flops per layer pair of each measure alone (``d = dx = dy``, ``k`` the
    directions SVCCA keeps), the per-layer ``eigh`` (``~4 d^3``: tridiagonal reduction
    ``4/3 d^3``, back-transformation ``2 d^3``, divide and conquer) shared over the row/column."""
    eigh = 4 * d ** 3 / layers  # one side's eigh, each layer's shared by `layers` pairs
    return {"cca": 2 * eigh + 4 * d ** 3,                   # S' = (Ux^T Sxy) Uy
            "regression": eigh + 2 * d ** 3,                # P = Ux^T Sxy (a's side only)
            "regression_reverse": eigh + 2 * d ** 3,        # Sxy Uy (b's side only)
            "svcca": 2 * eigh + 2 * k * d * d + 2 * k * k * d + 7 / 3 * k ** 3,  # kept block, Gram, eigvalsh
            "procrustes": 8 / 3 * d ** 3,                   # svdvals: bidiagonalization 4 d^3 - 4/3 d^3
            "rv": 2 * d * d,
            "all": 2 * eigh + 4 * d ** 3 + 7 / 3 * k ** 3 + 8 / 3 * d ** 3}


def pass_flops(d: int, n: int, layers: int) -> float:
    """float32 flops per layer pair of the CKA pass: the cross block ``2 n d^2`` plus each
    side's Gram (upper triangle, ``~n d^2`` per layer) shared over the row/column."""
    return 2 * n * d * d + 2 * n * d * d / layers


def bench_measures(la: int, d: int, n: int, batch: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(batch, 64, generator=g)
    za = torch.cat([base @ torch.randn(64, d, generator=g) + torch.randn(batch, d, generator=g) for _ in range(la)], 1)
    zb = torch.cat([torch.tanh(base) @ torch.randn(64, d, generator=g) + torch.randn(batch, d, generator=g)
                    for _ in range(la)], 1)
    acc = CKAAccumulator([d] * la, [d] * la)

    def cka_pass():
        acc.reset()
        for _ in range(n // batch):
            acc.update(za, zb)
        acc.compute()

    def measures(which):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.compute_measures(which)

    def timed(fn) -> tuple[float, float]:
        """(wall, CPU) seconds: CPU seconds of this process (all its threads) are less moved by
        other processes on a shared machine."""
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c

    times: dict[str, list[tuple[float, float]]] = {"pass": [], "all": [], **{m: [] for m in MEASURES}}
    for _ in range(rounds):  # interleaved, so that load changes hit every timing alike
        times["pass"].append(timed(cka_pass))
        times["all"].append(timed(lambda: measures(MEASURES)))
        for m in MEASURES:
            times[m].append(timed(lambda: measures([m])))
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    cov_a, _, _ = acc.covariances()
    lam = torch.linalg.eigvalsh(cov_a[0]).flip(0)
    k = int((torch.cumsum(lam, 0) / lam.sum() < 0.99).sum()) + 1  # SVCCA's kept directions, layer 0
    flops = measure_flops(d, k, la)
    return {"shape": f"{la}x{d} vs {la}x{d}", "n": n, "k": k, "pass_s": med["pass"], "pass_cpu": cpu["pass"],
            "pass_flops": pass_flops(d, n, la),
            "rows": {m: {"s": med[m], "ratio": med[m] / med["pass"], "cpu_ratio": cpu[m] / cpu["pass"],
                         "flops": flops[m], "break_even_n": int(n * med[m] / med["pass"] / TARGET)}
                     for m in ("all", *MEASURES)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small n and few sentences (a smoke run)")
    ap.add_argument("--only", choices=("error", "measures"), default=None)
    args = ap.parse_args()
    sentences = 64 if args.quick else 256
    print("per-layer error on the capture pass (two models, per token, batch 32 x 32 tokens)")
    for kind in (() if args.only == "measures" else ("minilm", "bert-base")):
        r = bench_layer_error(kind, sentences if kind == "minilm" else sentences // 4, 32, args.rounds)
        print(f"  {r['shape']:>7}: pass with error stats {r['pass_s']:.2f} s, of which the statistics add "
              f"{100 * r['added']:.1f}% to the capture pass")
    print("similarity measures vs the CKA pass that streams their statistics (float32 features, batch 4096)")
    print("  the measures cost c * d^3 per pair whatever n, the pass ~2 n d^2 per pair, so the ratio is ~ (c/2) d / n:")
    print("  5% holds from n_5% = n * (t_measures / t_pass) / 0.05")
    sizes = ((7, 384, 8192 if args.quick else 32768), (13, 768, 4096 if args.quick else 16384))
    for la, d, n in () if args.only == "error" else sizes:
        r = bench_measures(la, d, n, 4096, args.rounds)
        print(f"  {r['shape']}, n = {r['n']}: CKA pass {r['pass_s']:.2f} s wall, {r['pass_cpu']:.2f} s CPU "
              f"({r['pass_flops'] / 1e9:.1f} GFLOP float32 per pair); SVCCA keeps k = {r['k']} of {d}")
        print(f"    {'measure':<20}{'GFLOP/pair':>11}{'flops/pass':>11}{'wall s':>8}{'/ pass':>8}"
              f"{'CPU / pass':>11}{'5% from n':>11}")
        for m, row in r["rows"].items():
            name = "all six together" if m == "all" else m
            print(f"    {name:<20}{row['flops'] / 1e9:>11.3f}{row['flops'] / r['pass_flops']:>10.1%}"
                  f"{row['s']:>8.2f}{row['ratio']:>8.1%}{row['cpu_ratio']:>11.1%}{row['break_even_n']:>11,}")

if __name__ == "__main__":
    main()
