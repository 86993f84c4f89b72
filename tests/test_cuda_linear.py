"""GPU tests of the int8 / 2:4 Linear paths (skipped without CUDA).

Run them on a GPU machine with compiled Triton kernels (conftest only sets
TRITON_INTERPRET when it is unset) and the CUDA extension built:

    MINIDIFF_CUDA=ON pip install --no-build-isolation --no-deps -e .
    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/test_cuda_linear.py

Every backend (CUDA kernel, Triton, torch fallback) is forced in turn with
MINIDIFF_BACKEND and compared with the float64 / exact-integer references.
"""

import pytest
import torch

from minidiff import quant as Q
from minidiff._native import cuda_core
from minidiff.kernels.sparse24 import compress_24
from minidiff.nn.semistructured import SemiStructuredLinear, prune_24
from minidiff.ops import gpu_linear as G

pytestmark = pytest.mark.gpu

SHAPES = [(256, 384, 512), (130, 70, 48), (1, 64, 1024), (1024, 512, 4096)]


def _i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda")


def _close64(y, ref, rtol):
    err = (y.double() - ref).abs().max().item()
    assert err <= rtol * max(ref.abs().max().item(), 1.0), f"max error {err}"


def _need_cuda_module():
    mod = cuda_core()
    if mod is None or not hasattr(mod, "int8_gemm"):
        pytest.skip("minidiff._cuda not built (MINIDIFF_CUDA=ON)")
    if mod.int8_gemm_kernel_arch() < 80:
        pytest.skip("the CUDA build has no sm_80+ code for this GPU")
    return mod


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_gemm_raw_exact(monkeypatch, backend, m, n, k):
    if backend == "cuda":
        _need_cuda_module()
    monkeypatch.setenv("MINIDIFF_BACKEND", backend)
    a, w = _i8(m, k), _i8(n, k)
    out = G.int8_matmul_cuda(a, w)
    assert out.dtype == torch.int32 and out.is_cuda
    assert torch.equal(out.cpu(), a.cpu().int() @ w.cpu().int().T)


def test_cuda_int8_kernel_direct_and_worst_case():
    mod = _need_cuda_module()
    k = 4096
    a = torch.full((130, k), -128, dtype=torch.int8, device="cuda")
    w = torch.full((70, k), -128, dtype=torch.int8, device="cuda")
    out = torch.empty(130, 70, dtype=torch.int32, device="cuda")
    mod.int8_gemm(a.data_ptr(), w.data_ptr(), out.data_ptr(), 0, 0, 0, 130, 70, k, 0,
                  torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert bool((out == k * 128 * 128).all())


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("out_dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_int8_linear_vs_float64(monkeypatch, backend, out_dtype, rtol):
    if backend == "cuda":
        _need_cuda_module()
    monkeypatch.setenv("MINIDIFF_BACKEND", backend)
    m, n, k = 300, 200, 512
    x = torch.randn(m, k, device="cuda")
    x[7] = 0.0
    w, w_s, b = _i8(n, k), torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
    y = G.int8_linear_cuda(x, w, w_s, b, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    _close64(y.cpu(), Q.int8_linear_reference(x.cpu(), w.cpu(), w_s.cpu(), b.cpu()), rtol)


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_per_token_bit_identical(monkeypatch, backend, dtype):
    if backend == "cuda":
        _need_cuda_module()
    monkeypatch.setenv("MINIDIFF_BACKEND", backend)
    x = (torch.randn(64, 1000) * torch.logspace(-3, 3, 64)[:, None]).to(dtype)
    x[1] = 0.0
    x[2, 5] = float("nan")
    x[3, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -3.5]).to(dtype)
    x[3, 8:] = 0.0
    q, s = G.quantize_per_token_cuda(x.cuda())
    qr, sr = Q.quantize_per_token_reference(x)
    assert torch.equal(q.cpu(), qr)
    assert torch.equal(s.cpu().nan_to_num(-1.0), sr.nan_to_num(-1.0))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_weight_only_vs_float64(monkeypatch, backend, dtype, rtol):
    monkeypatch.setenv("MINIDIFF_BACKEND", backend)
    m, n, k = 96, 320, 400
    x = torch.randn(m, k, device="cuda").to(dtype)
    w, w_s, b = _i8(n, k), torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
    y = G.int8_weight_only_cuda(x, w, w_s, b)
    assert y.dtype == dtype
    _close64(y.cpu(), Q.int8_weight_only_linear_reference(x.cpu(), w.cpu(), w_s.cpu(), b.cpu()), rtol)


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("m,n,k", [(256, 384, 512), (130, 70, 48), (1, 64, 1024)])
def test_sparse24_vs_dense_float64(monkeypatch, backend, dtype, rtol, m, n, k):
    if backend == "cuda":
        _need_cuda_module()
    monkeypatch.setenv("MINIDIFF_BACKEND", backend)
    w = prune_24(torch.randn(n, k)).to(dtype)
    values, meta = compress_24(w)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    y = G.sparse24_linear_cuda(x.cuda(), values.cuda(), meta.cuda(), b.cuda())
    assert y.dtype == dtype
    _close64(y.cpu(), x.double() @ w.double().T + b.double(), rtol)


def test_sparse24_agrees_with_torch_semi_structured():
    from torch.sparse import to_sparse_semi_structured

    n, k, m = 512, 512, 256
    w = prune_24(torch.randn(n, k)).half().cuda()
    x = torch.randn(m, k).half().cuda()
    values, meta = compress_24(w)
    ours = G.sparse24_linear_cuda(x, values, meta)
    try:
        theirs = torch.nn.functional.linear(x, to_sparse_semi_structured(w))
    except Exception as exc:  # cuSPARSELt/CUTLASS path missing on this build
        pytest.skip(f"torch semi-structured sparse unavailable: {exc}")
    _close64(ours.double().cpu(), theirs.double().cpu(), 2e-3)


def test_semistructured_linear_on_cuda():
    lin = torch.nn.Linear(256, 128).half()
    layer = SemiStructuredLinear.from_linear(lin, prune_to_24=True).cuda()
    x = torch.randn(4, 33, 256).half()
    y = layer(x.cuda())
    ref = x.double() @ prune_24(lin.weight.detach()).double().T + lin.bias.detach().double()
    assert y.shape == (4, 33, 128) and y.dtype == torch.float16
    _close64(y.cpu(), ref, 2e-3)


def test_int8linear_module_on_cuda_uses_this_dispatch():
    nn_mod = pytest.importorskip("minidiff.nn")
    lin = torch.nn.Linear(512, 256)
    layer = nn_mod.Int8Linear.from_linear(lin).cuda()
    x = torch.randn(64, 512)
    y = layer(x.cuda())
    ref = Q.int8_linear_reference(x, layer.weight_int8.cpu(), layer.weight_scale.cpu(), layer.bias.cpu())
    _close64(y.cpu(), ref, 1e-5)
