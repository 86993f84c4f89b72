"""Added cost of per-layer error and of the second-order similarity measures.

1. Per-layer error statistics (``LayerErrorAccumulator``) fed from the capture pass of two
   models (a base and a copy with bfloat16-rounded weights), per token, against the same
   pass without them. MiniLM-shaped: the embedded all-MiniLM-L6-v2 (7 x 384) on chatterbot
   sentences; BERT-base-shaped: a randomly initialised BERT-base (13 x 768).
2. The measures (mean squared CCA, SVCCA, Procrustes, regression both ways, RV; ``compute()``-time
   work, O(d^3) per layer pair, independent of n) against the CKA pass that streams the
   statistics they read (``CKAAccumulator.update`` over n float32 samples), on 7 x 384 vs
   7 x 384 and 13 x 768 vs 13 x 768 layers.

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

    def measures():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.compute_measures(MEASURES)

    t_pass, t_meas = [], []
    for _ in range(rounds):
        t_pass.append(_median_time(cka_pass, 1))
        t_meas.append(_median_time(measures, 1))
    p, m = statistics.median(t_pass), statistics.median(t_meas)
    return {"shape": f"{la}x{d} vs {la}x{d}", "n": n, "cka_pass_s": p, "measures_s": m, "ratio": m / p,
            "break_even_n_5pct": int(n * m / p / 0.05)}


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
    print("similarity measures (cca, svcca, procrustes, regression both ways, rv) vs the CKA pass that streams their statistics")
    sizes = ((7, 384, 8192 if args.quick else 32768), (13, 768, 4096 if args.quick else 16384))
    for la, d, n in () if args.only == "error" else sizes:
        r = bench_measures(la, d, n, 4096, args.rounds)
        print(f"  {r['shape']}, n = {r['n']}: CKA pass {r['cka_pass_s']:.2f} s, measures {r['measures_s']:.2f} s, "
              f"ratio {100 * r['ratio']:.1f}% (5% from n = {r['break_even_n_5pct']})")


if __name__ == "__main__":
    main()
