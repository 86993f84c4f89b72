"""CPU sparse Linear: float64 references at every SIMD level, CSR handling, the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minidiff.nn import SparseLinear
from minidiff.nn.sparse_linear import DENSE_CROSSOVER_DENSITY
from minidiff.ops import sparse as S

LEVELS = ["avx512_vnni", "avx2", "scalar"]


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    monkeypatch.setenv("MINIDIFF_SIMD", request.param)
    return request.param


def _sparse(n, k, density):
    w = torch.randn(n, k)
    return w * (torch.rand(n, k) < density)


def _check(y, ref):
    # float32 fma chains over <= K terms against float64
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 33, 3), (3, 40, 100), (17, 1, 17), (33, 70, 385), (70, 130, 64)])
def test_matches_float64_reference(level, density, m, n, k):
    w = _sparse(n, k, density)
    x = torch.randn(m, k)
    b = torch.randn(n)
    rp, col, val = S.to_csr(w)
    assert col.numel() == int(w.count_nonzero())
    y = S.sparse_linear(x, rp, col, val, b)
    _check(y, S.sparse_linear_reference(x, rp, col, val, b))
    # and the dense float64 product of the original weight
    _check(y, x.double() @ w.double().T + b.double())


def test_empty_rows_give_bias(level):
    w = _sparse(40, 50, 0.2)
    w[::3] = 0
    x = torch.randn(21, 50)
    b = torch.randn(40)
    y = S.sparse_linear(x, *S.to_csr(w), b)
    assert torch.equal(y[:, ::3], b[::3].expand(21, -1))
    _check(y, x.double() @ w.double().T + b.double())


@pytest.mark.parametrize("m,k", [(2, 300), (45, 300), (40, 1000)])  # few-row path, both block widths
def test_levels_are_bitwise_identical(monkeypatch, m, k):
    w = _sparse(100, k, 0.15)
    x = torch.randn(m, k)
    csr = S.to_csr(w)
    outs = []
    for lv in LEVELS:
        monkeypatch.setenv("MINIDIFF_SIMD", lv)
        outs.append(S.sparse_linear(x, *csr))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_csr_round_trip_and_validation():
    w = _sparse(9, 13, 0.4)
    rp, col, val = S.to_csr(w)
    assert torch.equal(S.csr_to_dense(rp, col, val, 13), w)
    S.validate_csr(rp, col, val, 9, 13)
    bad = col.clone()
    if bad.numel():
        bad[0] = 13
        with pytest.raises(ValueError, match="column indices"):
            S.validate_csr(rp, bad, val, 9, 13)
    with pytest.raises(ValueError, match="row_ptr"):
        S.sparse_linear(torch.randn(2, 13), rp.long(), col, val)
    with pytest.raises(ValueError, match="one device"):
        S.sparse_linear(torch.randn(2, 13), rp, col, val.to("meta"))


def _pruned_linear(k, n, sparsity, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        thr = lin.weight.abs().flatten().kthvalue(max(1, int(sparsity * lin.weight.numel()))).values
        lin.weight[lin.weight.abs() <= thr] = 0
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_float_linear(bias):
    lin = _pruned_linear(64, 40, 0.9, bias)
    sp = SparseLinear.from_linear(lin)
    assert sp.format == "csr" and abs(sp.density - 0.1) < 0.01
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        ref = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    y = sp(x)
    assert y.shape == (2, 7, 40) and y.dtype == torch.float32
    _check(y, ref)


def test_module_non_contiguous_input():
    sp = SparseLinear.from_linear(_pruned_linear(24, 10, 0.7))
    x = torch.randn(24, 5).T
    _check(sp(x), x.double() @ sp.to_dense_weight().double().T + sp.bias.double())


def test_dense_fallback_above_crossover():
    lin = _pruned_linear(32, 16, 0.2)  # density 0.8
    sp = SparseLinear.from_linear(lin)
    assert sp.format == "dense" and DENSE_CROSSOVER_DENSITY < 0.8
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(sp(x), lin(x))
    assert SparseLinear.from_linear(lin, format="csr").format == "csr"


def test_state_dict_round_trip_resizes_buffers():
    sp = SparseLinear.from_linear(_pruned_linear(30, 20, 0.8))
    fresh = SparseLinear(30, 20)
    fresh.load_state_dict(sp.state_dict())
    x = torch.randn(4, 30)
    assert torch.equal(fresh(x), sp(x))
    dense = SparseLinear.from_linear(_pruned_linear(30, 20, 0.1))
    fresh.load_state_dict(dense.state_dict())
    assert fresh.format == "dense" and torch.equal(fresh(x), dense(x))


def test_corrupt_state_dict_is_refused():
    sp = SparseLinear.from_linear(_pruned_linear(30, 20, 0.8))
    sd = sp.state_dict()
    sd["col"] = sd["col"].clone()
    sd["col"][0] = 1000
    with pytest.raises(ValueError, match="column indices"):
        SparseLinear(30, 20).load_state_dict(sd)


def test_input_on_other_device_is_refused():
    sp = SparseLinear.from_linear(_pruned_linear(16, 8, 0.9))
    with pytest.raises(ValueError, match="on meta"):
        sp(torch.randn(3, 16, device="meta"))


def test_bf16_layer_keeps_dtype():
    lin = _pruned_linear(32, 16, 0.9).to(torch.bfloat16)
    sp = SparseLinear.from_linear(lin)
    y = sp(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    sp = SparseLinear.from_linear(_pruned_linear(16, 8, 0.9))
    x = torch.randn(3, 16)
    compiled = torch.compile(sp, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), sp(x))
