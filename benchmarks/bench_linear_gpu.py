"""Benchmark (GPU): minidiff's int8 and 2:4 GPU kernels against what a user would pick instead.

Shapes (W is out_features x in_features = N x K): 4096x4096 and the BERT-large FFN
pair 4096x1024 (up) and 1024x4096 (down); rows M = 2048, 4096, 8192 (the issue's
targets are at M >= 2048), plus M = 16 and 128 for the memory-bound 2:4 and
weight-only cases.

Per shape, medians of ``triton.testing.do_bench`` (CUDA-event timing, L2 flushed
between calls) for
  * int8 GEMM alone (activations already int8): ``torch._int_mm`` (cuBLASLt), the
    minidiff Triton kernel and the minidiff CUDA kernel, raw int32 output and with the
    fused bf16 epilogue;
  * W8A8 Linear end to end (per-token quantization + GEMM + epilogue): minidiff
    Triton, minidiff CUDA, ``torch._int_mm`` + torch epilogue, against bf16 cuBLAS
    ``F.linear``;
  * int8 weight-only Linear (Triton) against bf16 ``F.linear``;
  * 2:4: minidiff Triton, minidiff CUDA, torch ``to_sparse_semi_structured``
    (cuSPARSELt/CUTLASS) against dense bf16 ``F.linear``.
Each time is also given as throughput and as a fraction of the chip's dense peak
(H100 SXM / H200: int8 1979 TOPS, bf16 989 TFLOPS; 2:4 counts dense-equivalent
FLOPs against the dense bf16 peak). Ratios are speed-ups (baseline time / ours),
measured in the same run. Every kernel's output is checked against a reference
before it is timed.

    TRITON_INTERPRET=0 python benchmarks/bench_linear_gpu.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PEAK_INT8_TOPS = 1979.0   # H100 SXM / H200 dense int8 tensor-core peak
PEAK_BF16_TFLOPS = 989.0  # H100 SXM / H200 dense bf16 tensor-core peak

SHAPES = [(4096, 4096), (4096, 1024), (1024, 4096)]  # (N = out, K = in)
ROWS = [2048, 4096, 8192]
SMALL_ROWS = [16, 128]


def _die(msg: str) -> None:
    print(f"bench_linear_gpu: {msg}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M = 4096 only")
    ap.add_argument("--json", type=str, default=None, help="also write all medians here")
    args = ap.parse_args()

    if os.environ.get("TRITON_INTERPRET") == "1":
        _die("TRITON_INTERPRET=1 is set: unset it (the interpreter is for CPU tests, not timings)")
    import torch

    if not torch.cuda.is_available():
        _die("no CUDA device found. This benchmark needs an NVIDIA GPU (written for H100/H200); "
             "CPU figures are in benchmarks/bench_linear.py.")
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        _die("Triton is not installed (pip install triton)")
    import torch.nn.functional as F

    from minidiff._native import cuda_core
    from minidiff.kernels.int8_matmul import int8_matmul, int8_weight_only_matmul, quantize_per_token
    from minidiff.kernels.sparse24 import compress_24, sparse24_matmul
    from minidiff.nn.semistructured import prune_24
    from minidiff import quant as Q
    from minidiff.ops import gpu_linear as G

    cu = cuda_core()
    have_cuda_kernels = cu is not None and hasattr(cu, "int8_gemm") and cu.int8_gemm_kernel_arch() >= 80
    dev = torch.device("cuda")
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    props = torch.cuda.get_device_properties(dev)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA kernels: {'yes' if have_cuda_kernels else 'not built'}")
    print(f"peaks used: int8 {PEAK_INT8_TOPS:.0f} TOPS, bf16 {PEAK_BF16_TFLOPS:.0f} TFLOPS (dense)\n")

    def t_ms(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def check(name, got, ref, rtol):
        err = (got.double() - ref.double()).abs().max().item()
        scale = max(ref.double().abs().max().item(), 1.0)
        if not err <= rtol * scale:
            _die(f"{name}: wrong result (max error {err:.3g}, reference scale {scale:.3g}); not timing it")

    results: list[dict] = []

    def record(section, n, k, m, name, ms, flops, peak):
        tput = flops / (ms * 1e-3) / 1e12
        results.append({"section": section, "N": n, "K": k, "M": m, "method": name, "median_ms": ms,
                        "tops": tput, "frac_peak": tput / peak})
        return tput

    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = [4096] if args.quick else ROWS
    torch.manual_seed(0)
    for n, k in shapes:
        w_f = torch.randn(n, k, device=dev) / k ** 0.5
        w_bf = w_f.bfloat16()
        w_i8, w_s = G.quantize_per_token_reference(w_f)  # per-output-channel symmetric int8
        w_24 = prune_24(w_f).bfloat16()
        vals, meta = compress_24(w_24)
        try:
            from torch.sparse import to_sparse_semi_structured

            w_ts = to_sparse_semi_structured(w_24)
        except Exception as exc:  # pragma: no cover - depends on the torch build
            w_ts = None
            print(f"(torch semi-structured sparse unavailable: {exc})")
        for m in rows + ([] if args.quick else SMALL_ROWS):
            x = torch.randn(m, k, device=dev).bfloat16()
            flops = 2.0 * m * n * k
            print(f"== W {n}x{k}, M = {m} ==")
            times: dict[str, float] = {}
            times["bf16 F.linear (cuBLAS)"] = t_ms(lambda: F.linear(x, w_bf))

            if m >= 2048 or args.quick:
                # --- int8 GEMM alone -------------------------------------------------
                a_i8, a_s = quantize_per_token(x)
                ref_acc = G.int8_matmul_reference(a_i8[:64], w_i8)
                w_t = w_i8.T
                check("torch._int_mm", torch._int_mm(a_i8, w_t)[:64], ref_acc, 0)
                times["int8 GEMM torch._int_mm"] = t_ms(lambda: torch._int_mm(a_i8, w_t))
                check("triton int8", int8_matmul(a_i8, w_i8)[:64], ref_acc, 0)
                times["int8 GEMM triton (int32 out)"] = t_ms(lambda: int8_matmul(a_i8, w_i8))
                times["int8 GEMM triton (bf16 epilogue)"] = t_ms(
                    lambda: int8_matmul(a_i8, w_i8, a_s, w_s, None, torch.bfloat16))
                if have_cuda_kernels:
                    out32 = torch.empty(m, n, dtype=torch.int32, device=dev)
                    outbf = torch.empty(m, n, dtype=torch.bfloat16, device=dev)

                    def cuda_raw():
                        cu.int8_gemm(a_i8.data_ptr(), w_i8.data_ptr(), out32.data_ptr(), 0, 0, 0,
                                     m, n, k, 0, stream())

                    def cuda_epi():
                        cu.int8_gemm(a_i8.data_ptr(), w_i8.data_ptr(), outbf.data_ptr(), a_s.data_ptr(),
                                     w_s.data_ptr(), 0, m, n, k, 3, stream())

                    cuda_raw()
                    check("cuda int8", out32[:64], ref_acc, 0)
                    times["int8 GEMM cuda (int32 out)"] = t_ms(cuda_raw)
                    times["int8 GEMM cuda (bf16 epilogue)"] = t_ms(cuda_epi)

                # --- W8A8 Linear end to end -------------------------------------------
                ref_lin = G.int8_linear_reference(x[:64], w_i8, w_s)
                for backend in ("triton", "cuda", "torch"):
                    if backend == "cuda" and not have_cuda_kernels:
                        continue
                    os.environ["MINIDIFF_GPU_BACKEND"] = backend
                    f = lambda: G.int8_linear_cuda(x, w_i8, w_s, None, torch.bfloat16)  # noqa: E731
                    check(f"W8A8 {backend}", f()[:64], ref_lin, 1e-2)
                    times[f"W8A8 Linear {backend}"] = t_ms(f)
                os.environ.pop("MINIDIFF_GPU_BACKEND", None)

            # --- weight-only ------------------------------------------------------------
            f = lambda: int8_weight_only_matmul(x, w_i8, w_s)  # noqa: E731
            check("weight-only triton", f()[:64], Q.int8_weight_only_linear_reference(x[:64], w_i8, w_s), 1e-2)
            times["int8 weight-only triton"] = t_ms(f)

            # --- 2:4 ---------------------------------------------------------------------
            ref24 = x[:64].double() @ w_24.double().T
            times["2:4 dense bf16 F.linear (same weight)"] = t_ms(lambda: F.linear(x, w_24))
            check("2:4 triton", sparse24_matmul(x, vals, meta)[:64], ref24, 1e-2)
            times["2:4 triton"] = t_ms(lambda: sparse24_matmul(x, vals, meta))
            if have_cuda_kernels:
                out24 = torch.empty(m, n, dtype=torch.bfloat16, device=dev)

                def cuda24():
                    cu.sparse24_gemm(x.data_ptr(), vals.data_ptr(), meta.data_ptr(), out24.data_ptr(), 0,
                                     m, n, k, 3, stream())

                cuda24()
                check("2:4 cuda", out24[:64], ref24, 1e-2)
                times["2:4 cuda"] = t_ms(cuda24)
            if w_ts is not None:
                try:
                    check("2:4 torch semi-structured", F.linear(x, w_ts)[:64], ref24, 1e-2)
                    times["2:4 torch to_sparse_semi_structured"] = t_ms(lambda: F.linear(x, w_ts))
                except Exception as exc:  # pragma: no cover
                    print(f"   (torch semi-structured failed at this shape: {exc})")

            base_bf16 = times["bf16 F.linear (cuBLAS)"]
            for name, ms in times.items():
                is_int8 = "int8 GEMM" in name or "W8A8" in name
                peak = PEAK_INT8_TOPS if is_int8 else PEAK_BF16_TFLOPS
                tput = record("gpu", n, k, m, name, ms, flops, peak)
                line = (f"  {name:42s} {ms:8.4f} ms  {tput:7.1f} T{'OPS' if is_int8 else 'FLOPS'}  "
                        f"{100 * tput / peak:5.1f}% of peak  x{base_bf16 / ms:5.2f} vs bf16")
                if "int8 GEMM" in name and "int8 GEMM torch._int_mm" in times:
                    line += f"  x{times['int8 GEMM torch._int_mm'] / ms:5.2f} vs _int_mm"
                if name.startswith("2:4") and "dense" not in name:
                    line += f"  x{times['2:4 dense bf16 F.linear (same weight)'] / ms:5.2f} vs dense"
                print(line)
            print()

    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
                       "results": results}, fh, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
