"""The whole study vs the bare forward passes of its models, and its peak memory.

The MiniLM study of ``minidiff demo`` (all-MiniLM-L6-v2 + head on chatterbot-en vs its
50%-pruned, 2:4, int8 and 3-layer distilled versions; OOD set: chatterbot German):

1. time: ``Study.run()`` with every metric (one streaming pass per model over the
   evaluation and OOD sets with layer capture and streamed all-layer-pair CKA, then
   accuracy/flips/McNemar/KL/JS/calibration/per-class/PIE, kNN overlap, deep-kNN OOD,
   KS shifts), from an empty cache, against the floor: the bare forward passes of the
   same models over the same examples with the same batches (``model(**tokens)`` under
   ``no_grad``, tokenization included in both). The study runs twice per round, without
   and with its attack stage; the stages (passes, attacks, analysis) are reported
   separately. Target: the study without attacks <= 1.2x its forward passes. The HTML
   report rendering is timed separately (it depends on the number of figures, not on data).
2. memory: peak RSS during ``Study.run()`` (sampled every 20 ms) minus the RSS with the models loaded,
   for 1x and 4x the evaluation data, each in a fresh process. What must grow is only
   the cached per-example outputs (logits + final embeddings of each model).

Models are built once (trained heads, distillation) into ``--cache`` and reused.

    python benchmarks/bench_study.py                 # full demo size
    python benchmarks/bench_study.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Samples the current RSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        import threading
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def _cfg(quick: bool):
    from minidiff.study.demo import minilm_config
    return minilm_config(quick)


def _build(cache: str, quick: bool):
    from minidiff.study.study import build_study
    return build_study(_cfg(quick), cache_dir=cache, progress=False)


def _scaled(ds, k: int):
    from minidiff.data import ExampleSet
    if k == 1:
        return ds
    return ExampleSet(name=f"{ds.name}x{k}", kind=ds.kind, inputs=list(ds.inputs) * k,
                      labels=ds.labels.repeat(k), class_names=list(ds.class_names),
                      ids=[f"{i}#{r}" for r in range(k) for i in ds.ids])


def bare_forward(study) -> float:
    """Seconds for every model over eval + OOD data, same batches, tokenization included."""
    from minidiff.study.capture import text_prepare
    t = time.perf_counter()
    with torch.no_grad():
        for mods in [study.base] + list(study.variants.values()):
            for m in mods:
                m.eval()
                prep = text_prepare(m.tokenizer, study.max_length)
                for ds in (study.data, study.ood):
                    for s in range(0, len(ds), study.batch_size):
                        args, _ = prep(ds.inputs[s:s + study.batch_size])
                        m(**args)
    return time.perf_counter() - t


def whole_study(study) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as d:
        study.cache_dir = d
        study.progress = False
        t = time.perf_counter()
        res = study.run()
        return time.perf_counter() - t, res


def child(args) -> None:
    torch.set_num_threads(args.threads)
    study = _build(args.cache, args.quick)
    study.data = _scaled(study.data, args.scale)
    full_data, full_ood = study.data, study.ood
    study.data, study.ood = full_data.subset(range(study.batch_size)), full_ood.subset(range(8))
    bare_forward(study)  # warm up kernels and the allocator on one batch
    study.data, study.ood = full_data, full_ood
    import gc
    gc.collect()
    before = _rss_mb()
    with PeakRSS() as peak:
        t, res = whole_study(study)
    after = peak.peak
    n = len(study.data)
    models = 1 + sum(len(v) for v in study.variants.values())
    assert res["representation"]["int8"]["cka"]["matrix"]  # the study really ran every metric
    outputs_mb = models * n * (study.data.num_classes + 384) * 4 / 2 ** 20
    print(json.dumps({"scale": args.scale, "n_eval": n, "study_s": t, "rss_before_mb": before,
                      "rss_peak_mb": after, "growth_mb": after - before, "outputs_mb": outputs_mb}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "minidiff-bench-study"))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--scale", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    study = _build(args.cache, args.quick)
    print(f"models ready in {time.perf_counter() - t:.1f} s (cached in {args.cache}); "
          f"{1 + len(study.variants)} models, {len(study.data)} eval + {len(study.ood)} OOD texts, "
          f"batch {study.batch_size}, torch threads {args.threads}")
    bare, plain, full, stages = [], [], [], []
    res = None
    adversarial = study.adversarial
    for _ in range(args.reps):  # the three take turns, so machine noise hits each alike
        bare.append(bare_forward(study))
        study.adversarial = None
        s, _ = whole_study(study)
        plain.append(s)
        study.adversarial = adversarial
        s, res = whole_study(study)
        full.append(s)
        stages.append(dict(res["timing"]))
    mb, mp, mf = statistics.median(bare), statistics.median(plain), statistics.median(full)
    print(f"bare forward passes (floor):   median {mb:.2f} s  {['%.2f' % x for x in bare]}")
    print(f"study without attacks:         median {mp:.2f} s  {['%.2f' % x for x in plain]}")
    print(f"whole study, attacks included: median {mf:.2f} s  {['%.2f' % x for x in full]}")
    print(f"ratio study without attacks / forward: {mp / mb:.2f}x (target <= 1.2x)")
    print(f"ratio whole study / forward:           {mf / mb:.2f}x")
    keys = sorted({k for st in stages for k in st})
    med = {k: round(statistics.median(st.get(k, 0.0) for st in stages), 2) for k in keys}
    print(f"  study stages, median over reps (s): {json.dumps(med)}")
    print("  (the attack stage against the floor of the model queries it needs: benchmarks/bench_attack.py)")
    from minidiff.report.html import render
    t = time.perf_counter()
    render(res)
    print(f"report rendering: {time.perf_counter() - t:.2f} s")
    for k in (1, 4):
        out = subprocess.run([sys.executable, __file__, "--child", "--scale", str(k), "--cache", args.cache,
                              "--threads", str(args.threads)] + (["--quick"] if args.quick else []),
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"data x{k}: {r['n_eval']} eval texts, study {r['study_s']:.1f} s, peak RSS {r['rss_peak_mb']:.0f} MB, "
              f"growth during the study {r['growth_mb']:.1f} MB (per-example outputs kept: {r['outputs_mb']:.1f} MB)")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
