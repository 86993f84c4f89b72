"""Benchmark the adversarial attacks of minidiff.adversarial.

1. PGD-L-inf (10 steps, eps = 0.1 on [0, 1] pixels, random start) over a population of
   small MLPs trained here on scikit-learn digits (seeded). Compared in the same run with
   - the floor: 10 forward+backward passes of the input gradient plus one forward on the
     same batch (the least work any 10-step PGD must do),
   - torchattacks.PGD (the library a user would pick instead; optional:
     ``pip install --no-deps torchattacks``),
   - the same minidiff PGD one example at a time,
   - the whole ``run_adversarial`` (all models, transfer matrix, bootstrap CIs).
2. The word-substitution attack over 256 chatterbot-corpus English sentences on the
   embedded all-MiniLM-L6-v2 with a topic head trained here on frozen features. Compared
   with the floor: the same number of queries sent as plain MiniLM forward passes in
   batches, and with the attack run one sentence at a time (on 16 sentences).

Runs on CUDA when available. Prints medians (examples per second) and ratios.

    python benchmarks/bench_attack.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
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
from minidiff.adversarial import text as T  # noqa: E402
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


def bench_words(dev, repeats, n_sentences):
    data = load_builtin("chatterbot-en")
    train, test = data.split(0.3, seed=0)
    test = test.subset(range(min(n_sentences, len(test))))
    model = TextClassifier.from_pretrained("minilm", num_classes=data.num_classes, seed=0).to(dev).eval()
    # train the head on frozen, pooled MiniLM features
    with torch.no_grad():
        feats = []
        for s in range(0, len(train), 128):
            enc = {k: v.to(dev) for k, v in model.tokenize(train.inputs[s:s + 128], 128).items()}
            feats.append(model.pool(model.encoder(**enc).last_hidden_state, enc["attention_mask"]))
        feats = torch.cat(feats)
    ytr = train.labels.to(dev)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model.head(feats), ytr).backward()
        opt.step()
    cfg = AdversarialConfig(attacks=["word-substitution"], max_examples=None, bootstrap=0, batch_size=128)
    n = len(test)
    print(f"\n== word substitution (word budget {cfg.word_budget}, query budget {cfg.query_budget}, "
          f"{cfg.num_candidates} embedding-neighbour candidates): {n} chatterbot sentences, MiniLM + head on {dev}")
    tm = TextModel(model, None, cfg.max_length)
    splits = [T.SplitText.of(t) for t in test.inputs]
    t_cand, cands = timed(lambda: T.embedding_neighbour_candidates(
        splits, tm, cfg.num_candidates, T.stopword_set(True)), dev, repeats)
    labels = test.labels.tolist()

    def attack(bs, k=n):
        return T.word_substitution(tm, test.inputs[:k], labels[:k], cands[:k], word_budget=cfg.word_budget,
                                   query_budget=cfg.query_budget, batch_size=bs, splits=splits[:k])

    # the attack itself runs once: its query count, not its repetition, sets the cost here
    t_attack, res = timed(lambda: attack(cfg.batch_size), dev, 1)
    queries = sum(res.queries)
    # floor: the attack's queries as plain forward passes, without padding. Cost ~ tokens:
    # measure MiniLM's tokens/s on full batches of equal-length sentences (the 10th, 50th and
    # 90th length percentiles, 128 copies each) and charge every query the token count of its
    # clean sentence.
    ntok = [int(m.sum()) for m in tm.encode(test.inputs)[1]]
    by_len = sorted(range(n), key=lambda i: ntok[i])
    picks = [by_len[int(q * (n - 1))] for q in (0.1, 0.5, 0.9)]
    blocks = [[test.inputs[i]] * cfg.batch_size for i in picks]
    t_blocks, _ = timed(lambda: [tm.logits(b, cfg.batch_size) for b in blocks], dev, repeats)
    tok_per_s = cfg.batch_size * sum(ntok[i] for i in picks) / t_blocks
    t_floor = sum(q * t for q, t in zip(res.queries, ntok)) / tok_per_s
    k = 16
    t_batched_k, _ = timed(lambda: attack(cfg.batch_size, k), dev, 1)
    t_one, _ = timed(lambda: attack(1, k), dev, 1)
    sub = test.subset(range(k))
    t_full, _ = timed(lambda: run_adversarial({"minilm": model}, sub, cfg, base="minilm"), dev, 1)
    correct = sum(res.correct)
    print(f"clean accuracy {correct / n:.3f}; success rate {sum(res.success) / max(correct, 1):.3f}; "
          f"{queries} queries ({statistics.mean([q for q, c in zip(res.queries, res.correct) if c] or [0]):.1f} per "
          f"attacked sentence); mean fraction of words changed (successes) "
          f"{statistics.mean([f for f, s in zip(res.fraction_changed(), res.success) if s] or [0]):.3f}")
    print(f"{'what':58s} {'median s':>9s} {'examples/s':>11s} {'vs ours':>8s}")
    for name, t, cnt in [("candidates (once, shared by all models)", t_cand, n),
                         (f"minidiff word substitution (batched queries), {n} sentences", t_attack, n),
                         (f"floor: {queries} queries as MiniLM forwards (token-weighted)", t_floor, n),
                         (f"minidiff word substitution (batched), first {k} sentences", t_batched_k, k),
                         (f"minidiff word substitution, one at a time, first {k}", t_one, k),
                         (f"run_adversarial (candidates + attack + results), first {k}", t_full, k)]:
        print(f"{name:58s} {t:9.3f} {cnt / t:11.1f} {(cnt / t) / (n / t_attack):8.2f}")
    print(f"queries/s during the attack: {queries / t_attack:.1f}; plain MiniLM forward: {tok_per_s:.0f} tokens/s "
          f"(sentences of {[ntok[i] for i in picks]} tokens); "
          f"ours / floor time: {t_attack / t_floor:.2f}; batched / one-at-a-time speed-up on the same "
          f"{k} sentences: {t_one / t_batched_k:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sentences (smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--part", choices=["all", "pgd", "words"], default="all")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads "
                         "contend and small ops run up to 100x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.sentences = 2, 32
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    import transformers

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
          + (f", GPU {torch.cuda.get_device_name()}" if dev.type == "cuda" else ""))
    if args.part in ("all", "pgd"):
        bench_pgd(dev, args.repeats, args.models)
    if args.part in ("all", "words"):
        bench_words(dev, args.repeats, args.sentences)


if __name__ == "__main__":
    main()
