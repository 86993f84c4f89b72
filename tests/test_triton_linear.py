"""Triton int8 / 2:4 kernels and the GPU dispatch layer, run on CPU tensors under
TRITON_INTERPRET=1 (set by conftest.py). Integer paths are checked exactly, float
paths against float64 references; shapes are small (the interpreter is slow)."""

import os

import pytest
import torch

pytest.importorskip("triton")

from minidiff.kernels.int8_matmul import int8_matmul, int8_weight_only_matmul, quantize_per_token  # noqa: E402
from minidiff.kernels.sparse24 import compress_24, count_24_violations, decompress_24, sparse24_matmul  # noqa: E402
from minidiff.nn.semistructured import SemiStructuredLinear, prune_24  # noqa: E402
from minidiff import quant as Q  # noqa: E402
from minidiff.ops import gpu_linear as G  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tests of Triton kernels need TRITON_INTERPRET=1")


def _i8(*shape):
    t = torch.randint(-128, 128, shape, dtype=torch.int8)
    t.view(-1)[0] = -128  # the extremes are where int8 products overflow narrower accumulators
    t.view(-1)[-1] = 127
    return t


def _close64(y, ref, rtol):
    """|y - ref| <= rtol * max|ref| elementwise (float64 reference)."""
    err = (y.double() - ref).abs().max().item()
    assert err <= rtol * max(ref.abs().max().item(), 1.0), f"max error {err}"


# ----------------------------------------------------------------- int8 GEMM
@pytest.mark.parametrize("m,n,k", [(64, 48, 96), (33, 70, 50), (1, 32, 32)])
def test_int8_gemm_raw_int32_exact(m, n, k):
    a, w = _i8(m, k), _i8(n, k)
    out = int8_matmul(a, w)
    assert out.dtype == torch.int32
    assert torch.equal(out, a.int() @ w.int().T)


def test_int8_gemm_worst_case_and_strided():
    k = 64
    a = torch.full((32, k), -128, dtype=torch.int8)
    w = torch.full((32, k), -128, dtype=torch.int8)
    assert int8_matmul(a, w)[0, 0].item() == k * 128 * 128
    big = _i8(48, 2 * k)
    view = big[:, ::2]  # non-unit stride along K
    w2 = _i8(40, k)
    assert torch.equal(int8_matmul(view, w2), view.int() @ w2.int().T)


@pytest.mark.parametrize("out_dtype,rtol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_gemm_epilogue_vs_float64(out_dtype, rtol, with_bias):
    m, n, k = 40, 36, 80
    a, w = _i8(m, k), _i8(n, k)
    a_s, w_s = torch.rand(m) / 50, torch.rand(n) / 50
    b = torch.randn(n) if with_bias else None
    out = int8_matmul(a, w, a_s, w_s, b, out_dtype)
    assert out.dtype == out_dtype
    ref = (a.double() @ w.double().T) * a_s.double()[:, None] * w_s.double()[None, :]
    if b is not None:
        ref = ref + b.double()
    _close64(out, ref, rtol)


# ---------------------------------------------------------- per-token quantization
def test_quantize_per_token_ties_zero_and_nonfinite_rows():
    k = 40
    x = torch.randn(6, k)
    ties = torch.zeros(k)
    ties[:8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -3.5])  # absmax 127 -> scale 1
    x[0] = ties
    x[1] = 0.0
    x[2, 3] = float("nan")
    x[3, 7] = float("inf")
    q, s = quantize_per_token(x)
    assert s[0].item() == 1.0
    assert q[0, :8].tolist() == [127, 0, 2, 2, -2, 0, 126, -4]  # half to even
    assert s[1].item() == 0.0 and not q[1].any()
    assert torch.isnan(s[2]) and torch.isnan(s[3]) and not q[2].any() and not q[3].any()
    qr, sr = Q.quantize_per_token_reference(x)
    assert torch.equal(q, qr)
    assert torch.equal(s.nan_to_num(-1.0), sr.nan_to_num(-1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_per_token_matches_reference(dtype):
    x = (torch.randn(37, 300) * torch.logspace(-3, 3, 37)[:, None]).to(dtype)
    q, s = quantize_per_token(x)
    qr, sr = Q.quantize_per_token_reference(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    from minidiff.ops.int8 import quantize_rows  # the native CPU kernel: the same numbers

    q3, s3 = quantize_rows(x)
    assert torch.equal(q, q3) and torch.equal(s, s3)


# --------------------------------------------------------------- weight-only
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_weight_only_vs_float64(dtype, rtol):
    m, n, k = 20, 40, 50  # K not a multiple of the 32 tile: masked tail
    x = torch.randn(m, k).to(dtype)
    w = _i8(n, k)
    w_s, b = torch.rand(n) / 100, torch.randn(n)
    y = int8_weight_only_matmul(x, w, w_s, b)
    assert y.dtype == dtype
    _close64(y, Q.int8_weight_only_linear_reference(x, w, w_s, b), rtol)


# -------------------------------------------------------------------- 2:4
def _rand_24(n, k, dtype=torch.float32):
    return prune_24(torch.randn(n, k)).to(dtype)


def test_compress_24_hand_computed_row():
    row = torch.zeros(1, 16)
    row[0, 1], row[0, 3] = 1.0, -2.0  # group 0: positions (1, 3)
    row[0, 4] = 3.0                   # group 1: one nonzero -> (0, 1)
    row[0, 12], row[0, 13] = 4.0, 5.0  # group 3: (0, 1); group 2 empty -> (0, 1)
    values, meta = compress_24(row)
    assert values.tolist() == [[1.0, -2.0, 3.0, 0.0, 0.0, 0.0, 4.0, 5.0]]
    assert meta.dtype == torch.int16 and meta.shape == (1, 1)
    assert meta.item() & 0xFFFF == 0x444D
    assert torch.equal(decompress_24(values, meta), row)


def test_compress_24_round_trip_and_high_meta_bits():
    w = _rand_24(24, 64)
    w[:, 3::4] = 7.0   # position 3 everywhere: codes with the int16 sign bit set
    w[:, 2::4] = 0.0
    w[:, 0::4] = 0.0
    values, meta = compress_24(w)
    assert values.shape == (24, 32) and meta.shape == (24, 4)
    assert torch.equal(decompress_24(values, meta), w)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("k", [64, 48])  # 48: not a multiple of the 32 tile
def test_sparse24_matmul_vs_dense_float64(dtype, rtol, k):
    n, m = 40, 33
    w = _rand_24(n, k, dtype)
    values, meta = compress_24(w)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    y = sparse24_matmul(x, values, meta, b)
    assert y.dtype == dtype
    _close64(y, x.double() @ w.double().T + b.double(), rtol)


def test_non_24_weight_is_rejected_with_count():
    w = _rand_24(8, 32)
    w[0, :4] = 1.0
    w[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert count_24_violations(w) == 2
    with pytest.raises(ValueError, match="2 of 64 groups"):
        compress_24(w)
    with pytest.raises(ValueError, match="multiple of 16"):
        compress_24(_rand_24(4, 40))


# -------------------------------------------------------------- dispatch layer
def test_dispatch_int8_linear_matches_reference_and_torch_path(monkeypatch):
    m, n, k = 40, 48, 40  # K % 16 != 0: CUDA kernel would not apply; Triton/torch handle it
    x = torch.randn(m, k)
    x[4] = 0.0
    w, w_s, b = _i8(n, k), torch.rand(n) / 100, torch.randn(n)
    assert G.select_backend("int8", x, k, w) == "triton"
    y = G.int8_linear_cuda(x, w, w_s, b)
    ref = Q.int8_linear_reference(x, w, w_s, b)
    _close64(y, ref, 1e-6)
    from minidiff.ops.int8 import int8_linear  # the native CPU kernel, same arithmetic

    _close64(y, int8_linear(x, w, w_s, b).double(), 1e-6)
    monkeypatch.setenv("MINIDIFF_GPU_BACKEND", "torch")
    assert G.select_backend("int8", x, k, w) == "torch"
    assert torch.equal(G.int8_linear_cuda(x, w, w_s, b), y)
    monkeypatch.setenv("MINIDIFF_GPU_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MINIDIFF_GPU_BACKEND"):
        G.int8_linear_cuda(x, w, w_s, b)


def test_dispatch_bf16_and_out_dtype():
    x = torch.randn(32, 64).bfloat16()
    w, w_s = _i8(32, 64), torch.rand(32) / 100
    y = G.int8_linear_cuda(x, w, w_s, None)
    assert y.dtype == torch.bfloat16
    _close64(y, Q.int8_linear_reference(x, w, w_s), 1e-2)
    y32 = G.int8_linear_cuda(x, w, w_s, None, out_dtype=torch.float32)
    _close64(y32, Q.int8_linear_reference(x, w, w_s), 1e-6)
    yw = G.int8_weight_only_cuda(x, w, w_s, None)
    assert yw.dtype == torch.bfloat16
    _close64(yw, Q.int8_weight_only_linear_reference(x, w, w_s), 1e-2)


def test_dispatch_int8_matmul_raw_exact_and_k_fallback():
    a, w = _i8(20, 24), _i8(12, 24)
    assert torch.equal(G.int8_matmul_cuda(a, w), a.int() @ w.int().T)
    assert G.select_backend("int8", a, G.INT32_EXACT_MAX_K + 1, w) == "torch"


def test_dispatch_sparse24():
    w = _rand_24(40, 64)
    values, meta = compress_24(w)
    x, b = torch.randn(30, 64), torch.randn(40)
    y = G.sparse24_linear_cuda(x, values, meta, b)
    _close64(y, G.sparse24_linear_reference(x, values, meta, b), 1e-5)
    yb = G.sparse24_linear_cuda(x.bfloat16(), values.bfloat16(), meta, b)
    assert yb.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="values are"):
        G.sparse24_linear_cuda(x.half(), values, meta, b)


def test_dispatch_rejects_bad_input():
    x, w, w_s = torch.randn(8, 32), _i8(16, 32), torch.rand(16)
    with pytest.raises(ValueError, match="dtype"):
        G.int8_linear_cuda(x.int(), w, w_s)
    with pytest.raises(ValueError, match="dtype"):
        G.int8_linear_cuda(x, w.float(), w_s)
    with pytest.raises(ValueError, match="features"):
        G.int8_linear_cuda(torch.randn(8, 48), w, w_s)
    with pytest.raises(ValueError, match="w_scale"):
        G.int8_linear_cuda(x, w, torch.rand(15))
    with pytest.raises(ValueError, match="bias"):
        G.int8_weight_only_cuda(x, w, w_s, torch.rand(3))
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(x, w)
    values, meta = compress_24(_rand_24(16, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        G.sparse24_linear_cuda(torch.randn(4, 40), values, meta)
    with pytest.raises(ValueError, match="meta"):
        G.sparse24_linear_cuda(torch.randn(4, 32), values, meta.int())


def test_custom_ops_registered_with_fake_impls():
    x, w, w_s = torch.randn(32, 32), _i8(32, 32), torch.rand(32) / 100
    torch.library.opcheck(torch.ops.minidiff.int8_linear_gpu.default, (x, w, w_s, None, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    values, meta = compress_24(_rand_24(32, 32))
    torch.library.opcheck(torch.ops.minidiff.sparse24_linear_gpu.default, (x, values, meta, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.minidiff.int8_weight_only_gpu.default, (x, w, w_s, None, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))



def test_ops_trace_under_torch_compile_fullgraph():
    w, w_s, b = _i8(32, 64), torch.rand(32) / 100, torch.randn(32)
    values, meta = compress_24(_rand_24(32, 64))

    def f(x):
        return (G.int8_linear_cuda(x, w, w_s, b) + G.sparse24_linear_cuda(x, values, meta, None)
                + G.int8_weight_only_cuda(x, w, w_s, None))

    x = torch.randn(8, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))

# ------------------------------------------------------------ SemiStructuredLinear
def test_semistructured_linear_cpu_reference_path(monkeypatch):
    import minidiff.nn.semistructured as ss

    lin = torch.nn.Linear(64, 24)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: \d+ of 384 groups"):
        SemiStructuredLinear.from_linear(lin)
    layer = SemiStructuredLinear.from_linear(lin, prune_to_24=True)
    pruned = prune_24(lin.weight.detach())
    assert count_24_violations(pruned) == 0
    assert torch.equal(layer.dense_weight(), pruned)
    x = torch.randn(3, 5, 64)
    monkeypatch.setattr(ss, "_cpu_warned", False)
    with pytest.warns(RuntimeWarning, match="GPU-only"):
        y = layer(x)
    ref = x.double() @ pruned.double().T + lin.bias.detach().double()
    assert y.shape == (3, 5, 24)
    _close64(y, ref, 1e-5)
    again = SemiStructuredLinear(64, 24)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), y)
    # the kept weights are the two largest magnitudes of each group
    g = lin.weight.detach().abs().reshape(24, 16, 4)
    kept = (pruned.reshape(24, 16, 4) != 0)
    assert torch.all(g[kept].reshape(24, 16, 2).min(-1).values >= g.masked_fill(kept, -1).max(-1).values)
    with pytest.raises(ValueError, match="multiple of 16"):
        SemiStructuredLinear.from_linear(torch.nn.Linear(40, 8), prune_to_24=True)
    bad = torch.nn.Linear(32, 8)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        SemiStructuredLinear.from_linear(bad, prune_to_24=True, name="enc.0")


# ------------------------------------------------- ahead-of-time GPU compilation
_AOT_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import minidiff.kernels.int8_matmul as K
import minidiff.kernels.sparse24 as S

def build(jit, ptrs, consts, warps, stages):
    fn = jit.fn if isinstance(jit, triton.runtime.autotuner.Autotuner) else jit
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return k.asm["ptx"]

tile = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8)
ptx = build(K._int8_gemm_kernel, dict(a_ptr="*i8", w_ptr="*i8", out_ptr="*bf16", a_scale_ptr="*fp32",
            w_scale_ptr="*fp32", bias_ptr="*fp32"), dict(tile, BLOCK_K=128, EPILOGUE=True, HAS_BIAS=True), 8, 3)
assert "wgmma" in ptx and ".s8" in ptx, "int8 GEMM should use Hopper int8 wgmma"
build(K._quantize_rows_kernel, dict(x_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32"), dict(BLOCK_K=4096), 8, 1)
ptx = build(K._weight_only_kernel, dict(x_ptr="*bf16", w_ptr="*i8", out_ptr="*bf16", w_scale_ptr="*fp32",
            bias_ptr="*fp32"), dict(tile, BLOCK_K=64, HAS_BIAS=True, IEEE=False), 8, 4)
assert "wgmma" in ptx
ptx = build(S._sparse24_kernel, dict(x_ptr="*bf16", v_ptr="*bf16", meta_ptr="*i16", out_ptr="*bf16",
            bias_ptr="*bf16"), dict(tile, BLOCK_K=64, HAS_BIAS=True, IEEE=False), 8, 4)
assert "wgmma" in ptx
print("AOT-OK")
'''


def test_triton_kernels_compile_for_sm90(tmp_path):
    """The kernels lower to sm_90 machine code (no GPU needed): Triton's real compiler
    runs in a subprocess without TRITON_INTERPRET; the int8 GEMM must use int8 wgmma."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stderr[-3000:]
