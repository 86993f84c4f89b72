"""Benchmark the adversarial attacks of minidiff.adversarial.

1. PGD-L-inf (10 steps, eps = 0.1 on [0, 1] pixels, random start) over a population of
   small MLPs trained here on scikit-learn digits (seeded). Compared in the same run with
   - the floor: 10 forward+backward passes of the input gradient plus one forward on the
     same batch (the least work any 10-step PGD must do),
   - torchattacks.PGD (the library a user would pick instead; optional:
     ``pip install --no-deps torchattacks``),
   - the same minidiff PGD one example at a time,
   - the whole ``run_adversarial`` (all models, transfer matrix, bootstrap CIs).
2. The word-substitution stage of ``run_adversarial`` on 48 chatterbot-corpus English
   sentences (the demo study's attack), the embedded all-MiniLM-L6-v2 with a topic head
   trained here on frozen features plus its 50%-pruned and int8 versions, with the words
   ranked by drop-one queries and by the input-embedding gradient. Every query each
   model receives is counted by a forward pre-hook (passes, examples, attended tokens;
   gradient passes apart), and the stage is compared with its floor: those tokens sent
   as bare forward (or forward+backward) passes on full batches of equal-length
   sentences, at each model's own measured tokens/s. A third run sends the queries in
   length-bucketed batches (``TextModel.max_padding = 0.25``).

Runs on CUDA when available. Prints medians (examples per second) and ratios.

    python benchmarks/bench_attack.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minidiff.adversarial import AdversarialConfig, run_adversarial  # noqa: E402
from minidiff.adversarial import continuous as C  # noqa: E402
from minidiff.adversarial.textmodel import TextModel  # noqa: E402
from minidiff.data import load_builtin  # noqa: E402
from minidiff.models import TextClassifier, make_mlp  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, repeats):
    times = []
    out = None
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def train_mlp(seed, x, y, hidden, dev):
    torch.manual_seed(seed)
    m = make_mlp(64, hidden, 10).to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def bench_pgd(dev, repeats, n_models):
    digits = load_builtin("digits")
    train, test = digits.split(0.25, seed=0)
    xtr, ytr = train.inputs.to(dev), train.labels.to(dev)
    x, y = test.inputs.to(dev), test.labels.to(dev)
    models = {f"mlp{i}": train_mlp(i, xtr, ytr, [64] if i % 2 == 0 else [32], dev) for i in range(n_models)}
    eps, steps = 0.1, 10
    alpha = 2.5 * eps / steps
    n = len(y)
    print(f"\n== PGD-Linf, {steps} steps, eps={eps}: digits test split, {n} examples x {n_models} MLPs on {dev}")
    m0 = models["mlp0"]

    def ours():
        return C.pgd(m0, x, y, epsilon=eps, norm="linf", steps=steps, alpha=alpha, random_init=True,
                     generator=torch.Generator().manual_seed(0), clip=(0.0, 1.0)).x_adv

    def floor():
        xr = x.clone().requires_grad_(True)
        for _ in range(steps):
            (g,) = torch.autograd.grad(F.cross_entropy(m0(xr), y, reduction="sum"), xr)
        with torch.no_grad():
            return m0(xr + 0 * g)

    t_ours, adv = timed(ours, dev, repeats)
    t_floor, _ = timed(floor, dev, repeats)
    with torch.no_grad():
        sr = float(((m0(adv).argmax(-1) != y) & (m0(x).argmax(-1) == y)).sum() / (m0(x).argmax(-1) == y).sum())
    rows = [("minidiff pgd (batched)", t_ours, n, sr), ("floor: 10 x fwd+bwd + fwd", t_floor, n, None)]
    try:
        import torchattacks

        atk = torchattacks.PGD(m0, eps=eps, alpha=alpha, steps=steps, random_start=True)
        t_ta, adv_ta = timed(lambda: atk(x, y), dev, repeats)
        with torch.no_grad():
            c = m0(x).argmax(-1) == y
            sr_ta = float(((m0(adv_ta).argmax(-1) != y) & c).sum() / c.sum())
        rows.append((f"torchattacks {torchattacks.__version__} PGD", t_ta, n, sr_ta))
    except ImportError:
        t_ta = None
        print("(torchattacks not installed: `pip install --no-deps torchattacks` to compare)")
    k = min(n, 60)

    def one_at_a_time():
        g = torch.Generator().manual_seed(0)
        for i in range(k):
            C.pgd(m0, x[i:i + 1], y[i:i + 1], epsilon=eps, norm="linf", steps=steps, alpha=alpha,
                  random_init=True, generator=g, clip=(0.0, 1.0))

    t_one, _ = timed(one_at_a_time, dev, max(1, repeats // 2))
    rows.append(("minidiff pgd, one example at a time", t_one, k, None))
    cfg = AdversarialConfig(attacks=["pgd-linf"], epsilon=[eps], steps=steps, clip_min=0.0, clip_max=1.0,
                            max_examples=None, batch_size=512, bootstrap=1000)
    t_full, res = timed(lambda: run_adversarial(models, test, cfg, base="mlp0", device=dev), dev,
                        max(1, repeats // 2))
    rows.append((f"run_adversarial: {n_models} models + {n_models}x{n_models} transfer + bootstrap",
                 t_full, n * n_models, None))
    print(f"{'what':58s} {'median s':>9s} {'examples/s':>11s} {'vs ours':>8s} {'success':>8s}")
    for name, t, cnt, s in rows:
        rate = cnt / t
        print(f"{name:58s} {t:9.4f} {rate:11.0f} {rate / (n / t_ours):8.2f} "
              f"{'' if s is None else f'{s:.3f}':>8s}")
    run = res["attacks"][f"pgd-linf eps={eps:g}"]
    print("success rates:", {k: round(v["success_rate"], 3) for k, v in run["per_model"].items()})
    print(f"ours / floor time: {t_ours / t_floor:.2f}" + (f"; torchattacks / ours: {t_ta / t_ours:.2f}" if t_ta else ""))


class QueryCounter:
    """Counts what a model is asked, from a forward pre-hook: forward passes, examples and
    attended tokens, split into plain queries and passes with autograd on (gradient word
    ranking, gradient probes)."""

    def __init__(self, model):
        self.passes = self.examples = self.tokens = self.padded = 0
        self.grad_passes = self.grad_examples = self.grad_tokens = 0
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, args, kwargs):
        mask = kwargs.get("attention_mask")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        b = int(ref.shape[0]) if ref is not None else int(args[0].shape[0])
        t = int(mask.sum()) if mask is not None else b * int(ref.shape[1])
        if torch.is_grad_enabled():
            self.grad_passes, self.grad_examples, self.grad_tokens = (self.grad_passes + 1, self.grad_examples + b,
                                                                      self.grad_tokens + t)
        else:
            self.passes, self.examples, self.tokens = self.passes + 1, self.examples + b, self.tokens + t
            self.padded += b * int(ref.shape[1]) if ref is not None else t

    def close(self):
        self._h.remove()


def train_text_head(model, train, dev):
    """Train the linear head on frozen, mean-pooled MiniLM features (seeded)."""
    with torch.no_grad():
        feats = []
        for s in range(0, len(train), 128):
            enc = {k: v.to(dev) for k, v in model.tokenize(train.inputs[s:s + 128], 128).items()}
            feats.append(model.pool(model.encoder(**enc).last_hidden_state, enc["attention_mask"]))
        feats = torch.cat(feats)
    ytr = train.labels.to(dev)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model.head(feats), ytr).backward()
        opt.step()
    return model


def token_rates(tm, texts, bs, repeats):
    """Seconds per attended token of a plain forward and of a forward+backward to the input
    embeddings, on full batches of equal-length sentences (10th/50th/90th length percentiles)."""
    ntok = [int(m.sum()) for m in tm.encode(texts)[1]]
    by_len = sorted(range(len(texts)), key=lambda i: ntok[i])
    picks = [by_len[int(q * (len(texts) - 1))] for q in (0.1, 0.5, 0.9)]
    blocks = [[texts[i]] * bs for i in picks]
    tokens = bs * sum(ntok[i] for i in picks)
    dev = tm.device
    t_fwd, _ = timed(lambda: [tm.logits(b, bs) for b in blocks], dev, repeats)

    def fwd_bwd():
        for b in blocks:
            ids, mask = tm.encode(b)
            emb = tm.embedding_module()(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(tm.logits_from_embeds(emb, mask).sum(), emb)

    try:
        t_bwd, _ = timed(fwd_bwd, dev, repeats)
    except RuntimeError:  # no backward through this model (e.g. an int8 kernel)
        t_bwd = float("nan")
    return t_fwd / tokens, t_bwd / tokens, [ntok[i] for i in picks]


def bench_words(dev, repeats, n_sentences, variants):
    from minidiff.compress import prune, quantize

    data = load_builtin("chatterbot-en")
    train, test = data.split(0.3, seed=0)
    test = test.subset(range(min(n_sentences, len(test))))
    model = TextClassifier.from_pretrained("minilm", num_classes=data.num_classes, seed=0).to(dev).eval()
    train_text_head(model, train, dev)
    models = {"minilm": model}
    if variants:
        models["pruned50"] = prune(model, sparsity=0.5).model.to(dev).eval()
        models["int8"] = quantize(model, "int8").model.to(dev).eval()
    cfg = AdversarialConfig(attacks=["word-substitution"], max_examples=None, bootstrap=0, batch_size=128)
    n = len(test)
    print(f"\n== word substitution (word budget {cfg.word_budget}, query budget {cfg.query_budget}, "
          f"{cfg.num_candidates} embedding-neighbour candidates): {n} chatterbot sentences, models "
          f"{list(models)} on {dev}")
    tms = {k: TextModel(m, model.tokenizer, cfg.max_length) for k, m in models.items()}
    rates = {k: token_rates(tm, test.inputs, cfg.batch_size, repeats) for k, tm in tms.items()}
    for k, (f, b, lens) in rates.items():
        print(f"  {k}: forward {1 / f:,.0f} tokens/s, forward+backward to the embeddings "
              f"{'n/a' if math.isnan(b) else f'{1 / b:,.0f} tokens/s'} (sentences of {lens} tokens)")

    rows = []
    outcome = {}
    for label, ranking, max_padding in (("drop-one", "drop-one", None), ("gradient", "gradient", None),
                                        ("drop-one, pad<=25%", "drop-one", 0.25)):
        counters = {k: QueryCounter(m) for k, m in models.items()}
        TextModel.max_padding = max_padding
        t0 = time.perf_counter()
        try:
            res = run_adversarial(models, test, cfg, base="minilm", word_ranking=ranking)
        finally:
            TextModel.max_padding = None
        t_stage = time.perf_counter() - t0
        for c in counters.values():
            c.close()
        run = res["attacks"]["word-substitution"]
        floor = 0.0
        for k, c in counters.items():
            f, b, _ = rates[k]
            floor += c.tokens * f + (c.grad_tokens * b if c.grad_tokens else 0.0)
        fwd = sum(c.examples for c in counters.values())
        grad = sum(c.grad_examples for c in counters.values())
        passes = sum(c.passes + c.grad_passes for c in counters.values())
        padding = sum(c.padded for c in counters.values()) / max(1, sum(c.tokens for c in counters.values()))
        rows.append((label, t_stage, floor, fwd, grad, passes, padding))
        outcome[label] = {k: (v["success_rate"], v["mean_queries"], v["gradient"])
                            for k, v in run["per_model"].items()}
    n_models = len(models)
    print(f"{'word ranking':20s} {'stage s':>8s} {'floor s':>8s} {'ratio':>6s} {'fwd examples':>13s} "
          f"{'grad examples':>14s} {'passes':>7s} {'padded/attended tokens':>23s}")
    for ranking, t, fl, fwd, grad, passes, padding in rows:
        print(f"{ranking:20s} {t:8.2f} {fl:8.2f} {t / fl:6.2f} {fwd:13d} {grad:14d} {passes:7d} {padding:23.2f}")
    print(f"(transfer before this change re-queried all {n_models * (n_models - 1) * n} adversarial texts of the "
          f"other models; now only the changed ones)")
    for ranking, per in outcome.items():
        print(f"  {ranking}: " + "; ".join(f"{k} success {sr:.3f}, {mq:.1f} queries/attacked sentence "
                                           f"({how})" for k, (sr, mq, how) in per.items()))
    d, g, _ = rows
    print(f"gradient ranking: {g[3] + g[4]} model examples vs {d[3] + d[4]} with drop-one "
          f"({(g[3] + g[4]) / (d[3] + d[4]):.2f}x), stage time {g[1] / d[1]:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--sentences", type=int, default=48, help="sentences attacked (the demo study's 48)")
    ap.add_argument("--no-variants", action="store_true",
                    help="attack MiniLM alone (default: also its 50%%-pruned and int8 versions, as in the study)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sentences (smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--part", choices=["all", "pgd", "words"], default="all")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads "
                         "contend and small ops run up to 100x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.sentences = 2, 16
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    import transformers

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
          + (f", GPU {torch.cuda.get_device_name()}" if dev.type == "cuda" else ""))
    if args.part in ("all", "pgd"):
        bench_pgd(dev, args.repeats, args.models)
    if args.part in ("all", "words"):
        bench_words(dev, args.repeats, args.sentences, not args.no_variants)


if __name__ == "__main__":
    main()
