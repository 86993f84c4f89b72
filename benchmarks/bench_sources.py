"""Forward throughput of every model source, and a study's overhead over each.

all-MiniLM-L6-v2 with a classification head (19 chatterbot topics, untrained head: speed
does not depend on it) over 512 sentences of exactly 64 tokens (chatterbot-en lines joined
until they fill 64 tokens), batch 64, CPU. Sources:

* ``fp32 torch``: the float module;
* ``minidiff Int8Linear``: :func:`minidiff.compress.quantize` (int8 weights, per-token int8
  activations, minidiff's own kernels);
* ``torch.ao dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm);
* ``torchao int8 weight-only`` / ``torchao int8 dynamic``: ``torchao.quantization.quantize_``
  with ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig``;
* ``onnxruntime fp32`` / ``onnxruntime int8``: the ``torch.onnx`` export, and its
  ``onnxruntime.quantization.quantize_dynamic`` int8 version, run through
  :func:`minidiff.models.load_model` (``kind="onnx"``), i.e. the deployed session.

1. throughput: sentences/s of ``model(**tokens)`` under ``no_grad`` (tokens prepared once),
   median over rounds;
2. study overhead: ``Study(base=fp32, variants={source}).run()`` from an empty cache over the
   same 512 sentences (tokenization, probing, layer capture of the 6 blocks, streamed CKA,
   every output metric, no report; not for torchao int8 dynamic), divided by the sum of the two models' bare forward
   passes over the same batches, measured just before it (wall clock and process CPU time,
   which on a shared machine does not count waiting for a core). Target: <= 1.3x.

Medians over ``--rounds`` rounds; every ratio comes from times measured in the same run.

    python benchmarks/bench_sources.py              # 512 x 64, 3 rounds
    python benchmarks/bench_sources.py --quick      # 128 x 64, 1 round (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

BATCH = 64
TOKENS = 64


def sentences(tokenizer, n: int) -> list[str]:
    """``n`` texts of at least ``TOKENS`` tokens each (truncated to exactly ``TOKENS``)."""
    from minidiff.data import load_builtin
    lines = list(load_builtin("chatterbot-en").inputs)
    out, cur, i = [], [], 0
    while len(out) < n:
        cur.append(lines[i % len(lines)])
        i += 1
        text = " ".join(cur)
        if len(tokenizer(text)["input_ids"]) > TOKENS:
            out.append(text)
            cur = []
    return out


def export_onnx(clf: nn.Module, batch: dict[str, torch.Tensor], folder: Path) -> tuple[Path, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    f32, q8 = folder / "minilm.onnx", folder / "minilm-int8.onnx"
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(clf, (), str(f32), kwargs={k: batch[k][:2] for k in names}, input_names=names,
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names})
    quantize_dynamic(str(f32), str(q8), weight_type=QuantType.QInt8)
    return f32, q8


def build_sources(clf: nn.Module, batch: dict[str, torch.Tensor], folder: Path) -> dict[str, nn.Module]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    from minidiff.compress import quantize
    from minidiff.models import load_model
    tok = clf.tokenizer
    clf.tokenizer = None
    src: dict[str, nn.Module] = {"fp32 torch": clf,
                                 "minidiff Int8Linear": quantize(clf, "int8").model,
                                 "torch.ao dynamic int8": torch.ao.quantization.quantize_dynamic(
                                     copy.deepcopy(clf), {nn.Linear}, dtype=torch.qint8)}
    for name, cfg in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                      ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
        m = copy.deepcopy(clf)
        quantize_(m, cfg)
        src[name] = m
    f32, q8 = export_onnx(clf, batch, folder)
    src["onnxruntime fp32"] = load_model(f32, kind="onnx", providers=["CPUExecutionProvider"]).model
    # the head's input tensor is found on the float graph (its name survives quantization), as the
    # study's ort-int8 recipe does: on the quantized graph the search lands on a quantizer scale
    head = src["onnxruntime fp32"].head_tensor
    src["onnxruntime int8"] = load_model(q8, kind="onnx", providers=["CPUExecutionProvider"], head_input=head).model
    for m in src.values():
        m.tokenizer = tok
        m.eval()
    return src


class Clock:
    """Wall and process CPU seconds (all threads of this process, ONNX Runtime's included).
    On a shared machine the CPU time is the steadier figure: waiting for a core is not counted."""

    def __enter__(self) -> "Clock":
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


@torch.no_grad()
def bare_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Clock:
    """One pass over the batches (tokens ready)."""
    n = batch["input_ids"].shape[0]
    with Clock() as c:
        for s in range(0, n, BATCH):
            model(input_ids=batch["input_ids"][s:s + BATCH], attention_mask=batch["attention_mask"][s:s + BATCH])
    return c


def study_seconds(base: nn.Module, variant: nn.Module, data, tokenizer) -> tuple[Clock, dict[str, float]]:
    """``Study.run()`` from an empty cache (wall and CPU), and the study's own stage timings."""
    from minidiff.study import Study
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as d:
        st = Study(base, {"v": variant}, data, batch_size=BATCH, chunk_batches=4, max_length=TOKENS,
                   token_mode="mean", tokenizer=tokenizer, cache_dir=d, progress=False)
        with Clock() as c:
            res = st.run()
        return c, dict(res["timing"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="sentences (default 512)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 sentences, 1 round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 128, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from minidiff.data import ExampleSet
    from minidiff.models import TextClassifier
    clf = TextClassifier.from_pretrained("minilm", num_classes=19, pooling="mean").eval()
    tok = clf.tokenizer
    texts = sentences(tok, args.n)
    enc = tok(texts, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert int(batch["attention_mask"].sum(1).min()) == TOKENS, "every sentence fills the 64 tokens"
    labels = torch.arange(args.n) % 19
    data = ExampleSet(name="bench", kind="text", inputs=texts, labels=labels,
                      class_names=[f"c{i}" for i in range(19)], ids=[f"s{i}" for i in range(args.n)], meta={})
    with tempfile.TemporaryDirectory(prefix="bench-sources-onnx-") as d:
        src = build_sources(clf, batch, Path(d))
        base = src["fp32 torch"]
        fwd: dict[str, list[float]] = {k: [] for k in src}
        # torchao's int8 dynamic has no fast CPU path (several times slower than fp32): throughput only
        with_study = [k for k in src if k not in ("fp32 torch", "torchao int8 dynamic")]
        ratio: dict[str, list[float]] = {k: [] for k in with_study}
        ratio_cpu: dict[str, list[float]] = {k: [] for k in with_study}
        study_s: dict[str, list[float]] = {k: [] for k in with_study}
        stages: dict[str, list[dict[str, float]]] = {k: [] for k in with_study}
        for name, m in src.items():  # warm up (lazy kernels, ORT arenas, capture session)
            bare_forward(m, {k: v[:BATCH] for k, v in batch.items()})
        for r in range(args.rounds):
            fwd["torchao int8 dynamic"].append(bare_forward(src["torchao int8 dynamic"], batch).wall)
            # each study right after the two bare passes it is compared with (the load drifts)
            for name in with_study:
                fb, fv = bare_forward(base, batch), bare_forward(src[name], batch)
                fwd["fp32 torch"].append(fb.wall)
                fwd[name].append(fv.wall)
                c, timing = study_seconds(base, src[name], data, tok)
                study_s[name].append(c.wall)
                stages[name].append(timing)
                ratio[name].append(c.wall / (fb.wall + fv.wall))
                ratio_cpu[name].append(c.cpu / (fb.cpu + fv.cpu))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in fwd.items()}
    print(f"\nMiniLM classifier, {args.n} sentences x {TOKENS} tokens, batch {BATCH}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} round(s), medians")
    print(f"{'source':28s} {'forward s':>10s} {'sent/s':>8s} {'vs fp32':>8s} {'study s':>8s} {'study/bare':>10s} "
          f"{'(CPU time)':>10s}")
    out = {"n": args.n, "tokens": TOKENS, "batch": BATCH, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "sources": {}}
    for name in src:
        st = statistics.median(study_s[name]) if name in study_s else float("nan")
        rt = statistics.median(ratio[name]) if name in ratio else float("nan")
        rc = statistics.median(ratio_cpu[name]) if name in ratio_cpu else float("nan")
        print(f"{name:28s} {med[name]:10.2f} {args.n / med[name]:8.1f} {med['fp32 torch'] / med[name]:7.2f}x "
              f"{st:8.2f} {rt:9.2f}x {rc:9.2f}x")
        out["sources"][name] = {"forward_s": med[name], "sentences_per_s": args.n / med[name],
                                "speed_vs_fp32": med["fp32 torch"] / med[name], "study_s": st,
                                "study_over_bare": rt, "study_over_bare_cpu": rc, "forward_rounds": fwd[name],
                                "ratio_rounds": ratio.get(name, []), "ratio_cpu_rounds": ratio_cpu.get(name, [])}
    print("\nstudy stages (medians, s): prepare = members + exact fingerprints, eval pass = forwards with "
          "layer capture and streamed CKA, analysis = metrics and bootstrap intervals")
    for name, rows in stages.items():
        keys = ("prepare_s", "eval_pass_s", "analysis_s")
        med_st = {k: statistics.median(r.get(k, float("nan")) for r in rows) for k in keys}
        print(f"{name:28s} " + "  ".join(f"{k[:-2]} {v:6.2f}" for k, v in med_st.items()))
        out["sources"][name]["study_stages"] = med_st
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
