"""Capture + streaming CKA: MiniLM base vs its 50%-pruned variant.

Measures, on real English sentences (chatterbot-corpus, repeated to the target
count) and the pretrained all-MiniLM-L6-v2:

1. time: the two bare forward passes (the floor: nothing can compare two models
   without running them) vs ``minidiff.models.capture_stream`` of all 7 hidden
   states of both models (mean-pooled over non-padding tokens) into one
   ``minidiff.CKAAccumulator`` (exact unbiased linear CKA, all 7x7 layer pairs).
   Target: within 1.3x of the floor. For reference, the tool a user would pick
   instead, pytorch-cka 1.1 (``cka.CKA``: minibatch CKA of flattened padded token
   maps; input_ids only, no attention mask; different numbers, same work shape).
2. peak memory (resident set, each size in a fresh subprocess) for 1x, 2x, 4x the
   sentences: streaming must stay flat; the "collect everything, then
   ``minidiff.cka_matrix``" approach is shown beside it.

Usage: ``python benchmarks/bench_capture.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sentences(n: int) -> list[str]:
    """``n`` English sentences from chatterbot-corpus (every yml file, in order, repeated)."""
    import chatterbot_corpus
    import yaml

    d = pathlib.Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out: list[str] = []
    for f in sorted(d.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations", []) or []:
            for line in conv:
                if isinstance(line, str) and line.strip():
                    out.append(line.strip())
    if not out:
        raise SystemExit("chatterbot-corpus has no English sentences")
    reps = -(-n // len(out))
    return (out * reps)[:n]


def setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from minidiff import compress as C
    from minidiff import models as M

    lm = M.load_model("minilm")
    base = lm.model
    variant = C.prune(base, sparsity=0.5).model  # unstructured, global per layer, dense storage
    return torch, M, lm.tokenizer, base, variant


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int):
    """Tokenize lazily, batch by batch (nothing O(dataset) is kept)."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run_bare(torch, base, variant, tokenizer, texts, bs, ml) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches(tokenizer, texts, bs, ml):
            base(**b)
            variant(**b)
    return time.perf_counter() - t


def run_stream(torch, M, base, variant, tokenizer, texts, bs, ml):
    import minidiff

    t = time.perf_counter()
    it = batches(tokenizer, texts, bs, ml)
    first = next(it)
    w = M.probe_widths({"base": base, "variant": variant}, first, layers="hidden_states")
    acc = minidiff.CKAAccumulator(w["base"], w["variant"])

    def all_batches():
        yield first
        yield from it

    M.capture_stream({"base": base, "variant": variant}, all_batches(), layers="hidden_states",
                     token_mode="mean", consumers=[acc])
    cka = acc.compute()
    return time.perf_counter() - t, cka


def run_pytorch_cka(torch, base, variant, tokenizer, texts, bs, ml):
    from cka import CKA

    layers = [f"encoder.layer.{i}" for i in range(6)]
    data = [b["input_ids"] for b in batches(tokenizer, texts, bs, ml)]  # its loader takes input_ids only
    t = time.perf_counter()
    with CKA(base, variant, layers=layers, device="cpu") as c:
        m = c._compare(data, progress=False)  # the loop its public entry points run
    return time.perf_counter() - t, m


class PeakRSS:
    """Highest resident set size seen while active (sampled every 2 ms from /proc/self/statm),
    relative to the RSS on entry. ru_maxrss would include setup peaks (loading, pruning)."""

    def __init__(self) -> None:
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = self.peak = self.rss()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def breakdown(torch, M, base, variant, tokenizer, texts, bs, ml, rounds: int = 3) -> dict[str, float]:
    """Per-batch medians (same process, interleaved): two bare forwards; two forwards with
    capture hooks + pooling; one CKAAccumulator.update on the captured features."""
    import minidiff

    data = list(batches(tokenizer, texts, bs, ml))
    models = {"base": base, "variant": variant}
    w = M.probe_widths(models, data[0], layers="hidden_states")
    acc = minidiff.CKAAccumulator(w["base"], w["variant"])
    t_bare, t_cap, t_upd = [], [], []
    for _ in range(rounds):
        for b in data:
            t = time.perf_counter()
            with torch.no_grad():
                base(**b)
                variant(**b)
            t_bare.append(time.perf_counter() - t)
            got = []
            t = time.perf_counter()
            M.capture_stream(models, [b], layers="hidden_states", consumers=[lambda fa, fb: got.append((fa, fb))])
            t_cap.append(time.perf_counter() - t)
            t = time.perf_counter()
            acc.update(list(got[0][0].values()), list(got[0][1].values()))
            t_upd.append(time.perf_counter() - t)
    return {"bare": statistics.median(t_bare), "capture": statistics.median(t_cap),
            "update": statistics.median(t_upd)}


def memory_child(mode: str, n: int, bs: int, ml: int, threads: int, unique: int) -> None:
    """Run in a fresh process; print JSON with the peak RSS above the post-setup baseline.

    The ``n`` sentences are the first ``unique`` ones repeated, so every run sees the same
    batch shapes (the transient activation memory of a batch depends on its longest
    sentence) and only the number of sentences changes.
    """
    torch, M, tok, base, variant = setup(threads)
    texts = (sentences(unique) * (-(-n // unique)))[:n]
    import minidiff

    warm = next(batches(tok, texts[:bs], bs, ml))
    with torch.no_grad():  # one warm-up batch so allocator pools and kernels are in the baseline
        base(**warm)
        variant(**warm)
    import gc

    gc.collect()
    with PeakRSS() as mem:
        if mode == "stream":
            _, cka = run_stream(torch, M, base, variant, tok, texts, bs, ml)
        else:  # collect every pooled feature, then one cka_matrix call
            feats: dict[str, list] = {"base": [], "variant": []}

            def keep(fa, fb):
                feats["base"].append(list(fa.values()))
                feats["variant"].append(list(fb.values()))

            M.capture_stream({"base": base, "variant": variant}, batches(tok, texts, bs, ml),
                             layers="hidden_states", consumers=[keep])
            fa = [torch.cat([b[i] for b in feats["base"]]) for i in range(7)]
            fb = [torch.cat([b[i] for b in feats["variant"]]) for i in range(7)]
            cka = minidiff.cka_matrix(fa, fb)
    print(json.dumps({"mode": mode, "n": n, "peak_rss_mib": mem.peak / 2**20, "baseline_rss_mib": mem.start / 2**20,
                      "delta_mib": (mem.peak - mem.start) / 2**20, "cka_diag": cka.diagonal().tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 sentences, 1 repeat, memory at 64/128/256")
    ap.add_argument("--sentences", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-base", type=int, default=512,
                    help="memory runs use these many sentences repeated 1x, 2x, 4x")
    ap.add_argument("--no-timing", action="store_true", help="only the memory runs")
    ap.add_argument("--no-pytorch-cka", action="store_true")
    ap.add_argument("--_child", nargs=3, metavar=("MODE", "N", "UNIQUE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sentences, args.repeats, args.mem_base = 128, 1, 64
    if args._child:
        memory_child(args._child[0], int(args._child[1]), args.batch_size, args.max_length, args.threads,
                     int(args._child[2]))
        return

    torch, M, tok, base, variant = setup(args.threads)
    import transformers

    import minidiff

    texts = sentences(args.sentences)
    if args.no_timing:
        texts = texts[:args.batch_size]
    ntok = sum(int(b["attention_mask"].sum()) for b in batches(tok, texts, args.batch_size, args.max_length))
    print(f"# bench_capture: {len(texts)} sentences ({ntok} tokens), batch {args.batch_size}, "
          f"{args.threads} thread(s); torch {torch.__version__}, transformers {transformers.__version__}, "
          f"minidiff {minidiff.__version__}, python {platform.python_version()}, {platform.machine()}")
    run_bare(torch, base, variant, tok, texts[:args.batch_size], args.batch_size, args.max_length)  # warm-up
    bare, stream, ref = [], [], []
    if args.no_timing:
        args.repeats = 0
    cka = None
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
        bare.append(run_bare(torch, base, variant, tok, texts, args.batch_size, args.max_length))
        t, cka = run_stream(torch, M, base, variant, tok, texts, args.batch_size, args.max_length)
        stream.append(t)
        if not args.no_pytorch_cka:
            try:
                ref.append(run_pytorch_cka(torch, base, variant, tok, texts, args.batch_size, args.max_length)[0])
            except Exception as exc:  # noqa: BLE001 - the comparison tool is optional
                print(f"# pytorch-cka failed: {exc!r}")
                args.no_pytorch_cka = True
    if bare:
        mb, ms = statistics.median(bare), statistics.median(stream)
        print(f"two bare forward passes        : {mb:8.2f} s (median of {len(bare)})")
        print(f"capture + streaming CKA (7x7)  : {ms:8.2f} s   ratio to bare {ms / mb:.3f}x  (target <= 1.3x)")
        if ref:
            mr = statistics.median(ref)
            print(f"pytorch-cka 1.1 (6x6, minibatch): {mr:8.2f} s   ratio to bare {mr / mb:.3f}x")
        print("CKA(base layer l, variant layer l), l = embeddings, block 1..6:",
              " ".join(f"{v:.4f}" for v in cka.diagonal().tolist()), flush=True)

    if not args.no_timing:
        n_bd = min(len(texts), 8 * args.batch_size)
        bd = breakdown(torch, M, base, variant, tok, texts[:n_bd], args.batch_size, args.max_length)
        print(f"per batch of {args.batch_size} (median, {n_bd} sentences x 3, interleaved): two bare forwards "
              f"{bd['bare'] * 1e3:.1f} ms; with hooks + mean pooling {bd['capture'] * 1e3:.1f} ms "
              f"({bd['capture'] / bd['bare']:.3f}x); CKAAccumulator.update (7x7 layers, 2688 x 2688) "
              f"{bd['update'] * 1e3:.1f} ms ({bd['update'] / bd['bare']:.3f} of the forwards); "
              f"capture + update = {(bd['capture'] + bd['update']) / bd['bare']:.3f}x", flush=True)

    print(f"# peak resident memory above the post-setup baseline (fresh process per run; the first "
          f"{args.mem_base} sentences repeated 1x, 2x, 4x)")
    here = str(pathlib.Path(__file__).resolve())
    for mode in ("stream", "collect"):
        for mult in (1, 2, 4):
            n = args.mem_base * mult
            cmd = [sys.executable, here, "--_child", mode, str(n), str(args.mem_base), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"{mode:8s} {mult}x = {n:5d} sentences: RSS at start {r['baseline_rss_mib']:7.1f} MiB, "
                  f"peak {r['peak_rss_mib']:7.1f} MiB, growth {r['delta_mib']:6.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
