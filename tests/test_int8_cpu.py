"""CPU int8 Linear: exact integers at every SIMD level, against the one quantizer (minidiff.quant)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import minidiff._C as C
from minidiff.nn import Int8Linear
from minidiff import quant as Q
from minidiff.ops import int8 as I

LEVELS = ["avx512_vnni", "avx2", "scalar"]
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 17), (7, 65, 3), (13, 130, 17), (33, 64, 385), (6, 129, 64), (97, 200, 100)]


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    # simd_level() reads MINIDIFF_SIMD at every call, so the cap applies in-process
    monkeypatch.setenv("MINIDIFF_SIMD", request.param)
    assert C.simd_level() in (request.param, "avx2", "scalar")
    return request.param


def test_hardware_level_is_reported():
    assert C.simd_level() in ("avx512_vnni", "avx512", "avx2", "scalar")


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_s32_exact(level, m, n, k):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a[0, 0], w[0, 0] = -128, -128  # the extreme product 16384 must survive the +128 shift
    packed, colsum = I.pack_weight(w)
    out = I.int8_gemm_s32(a, packed, colsum, n)
    assert out.dtype == torch.int32
    assert torch.equal(out, Q.int8_matmul_reference(a, w))


def test_gemm_s32_extreme_sums(level):
    # all-(-127) x all-(127) and all-127 x all-127 at K=385: largest |sum| the layer meets
    k = 385
    a = torch.full((3, k), 127, dtype=torch.int8)
    a[1] = -127
    w = torch.full((2, k), 127, dtype=torch.int8)
    w[1] = -128
    packed, colsum = I.pack_weight(w)
    out = I.int8_gemm_s32(a, packed, colsum, 2)
    assert torch.equal(out, Q.int8_matmul_reference(a, w))
    assert out[0, 0].item() == 127 * 127 * k


def test_gemm_non_contiguous_activation(level):
    a = torch.randint(-128, 128, (40, 24), dtype=torch.int8).T  # (24, 40) view, not contiguous
    w = torch.randint(-128, 128, (9, 40), dtype=torch.int8)
    packed, colsum = I.pack_weight(w)
    assert torch.equal(I.int8_gemm_s32(a, packed, colsum, 9), Q.int8_matmul_reference(a, w))


@pytest.mark.parametrize("m,k", [(1, 1), (3, 17), (20, 385), (4, 64)])
def test_activation_quantization_matches_reference_bitwise(level, m, k):
    x = torch.randn(m, k) * 5
    x[0, 0] = 0.5 * (x[0].abs().max() / 127) * 3  # lands near a rounding tie
    q, s = I.quantize_rows(x)
    qr, sr = Q.quantize_per_token_reference(x)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


def test_activation_quantization_special_rows(level):
    x = torch.randn(4, 20)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 5] = float("inf")
    q, s = I.quantize_rows(x)
    assert s[1].item() == 0 and torch.all(q[1] == 0)
    assert torch.isnan(s[2]) and torch.isnan(s[3])
    assert torch.equal(q, Q.quantize_per_token_reference(x)[0])
    # ties round half to even: x = 2.5 * s -> 2, 3.5 * s -> 4
    s0 = torch.tensor(127.0) / 127
    row = torch.tensor([[127.0, 2.5 * s0, 3.5 * s0, -2.5 * s0]])
    assert I.quantize_rows(row)[0].tolist() == [[127, 2, 4, -2]]


def test_levels_give_bitwise_identical_linear(monkeypatch):
    x = torch.randn(37, 77)
    w, s = Q.quantize_weight_int8(torch.randn(70, 77))
    b = torch.randn(70)
    outs = []
    for lv in LEVELS:
        monkeypatch.setenv("MINIDIFF_SIMD", lv)
        outs.append(I.int8_linear(x, w, s, b))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_linear_matches_float64_reference(level, m, n, k, with_bias):
    x = torch.randn(m, k)
    w, s = Q.quantize_weight_int8(torch.randn(n, k))
    b = torch.randn(n) if with_bias else None
    y = I.int8_linear(x, w, s, b)
    ref = Q.int8_linear_reference(x, w, s, b)
    # the int32 product is exact; only the float32 epilogue rounds (|err| <= ~2 ulp)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_w8a8_nan_row_gives_nan_output():
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    w, s = Q.quantize_weight_int8(torch.randn(5, 16))
    y = I.int8_linear(x, w, s)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_weight_quantization_hand_case():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])
    q, s = Q.quantize_weight_int8(w)
    assert s.tolist() == pytest.approx([1 / 127, 0.0, 2.0])
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]  # 63.5 -> 64, 0.5 -> 0 (half-even)


@pytest.mark.parametrize("m", [1, 5, 9, 40])
def test_weight_only_matches_float64_reference(level, m):
    x = torch.randn(m, 45)
    w, s = Q.quantize_weight_int8(torch.randn(33, 45))
    b = torch.randn(33)
    y = I.int8_weight_only_linear(x, w, s, b)
    ref = Q.int8_weight_only_linear_reference(x, w, s, b)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
@pytest.mark.parametrize("bias", [True, False])
def test_module_close_to_float_linear(mode, bias):
    lin = nn.Linear(96, 48, bias=bias)
    q = Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(4, 10, 96)
    with torch.no_grad():
        ref = lin(x)
        y = q(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # int8 rounding of weights (and activations in w8a8): relative error ~0.5-1%
    rel = (y - ref).norm() / ref.norm()
    assert rel < (0.02 if mode == "w8a8" else 0.01), rel
    # and the module equals its own float64 reference exactly up to float32 rounding
    x2 = x.reshape(-1, 96)
    if mode == "w8a8":
        exp = Q.int8_linear_reference(x2, q.weight_int8, q.weight_scale, q.bias)
    else:
        exp = Q.int8_weight_only_linear_reference(x2, q.weight_int8, q.weight_scale, q.bias)
    torch.testing.assert_close(y.reshape(-1, 48).double(), exp, rtol=1e-5, atol=1e-5)


def test_module_non_contiguous_input_and_bf16():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(32, 6, dtype=torch.bfloat16).T  # (6, 32) non-contiguous
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (6, 16)
    ref = Q.int8_linear_reference(x.float(), q.weight_int8, q.weight_scale, q.bias.float())
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


def test_nan_weight_refused_with_layer_name():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.0.attention"):
        Int8Linear.from_linear(lin, name="encoder.layer.0.attention")
    with torch.no_grad():
        lin.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        Int8Linear.from_linear(lin)


def test_bad_inputs_are_value_errors():
    q = Int8Linear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="expects 8"):
        q(torch.randn(2, 9))
    with pytest.raises(ValueError, match="mode"):
        Int8Linear.from_linear(nn.Linear(8, 4), mode="int4")
    with pytest.raises(ValueError, match="nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="dtype"):
        I.int8_linear(torch.randn(2, 8).double(), q.weight_int8, q.weight_scale)
    with pytest.raises(ValueError, match="on meta"):
        q(torch.randn(2, 8, device="meta"))


def test_state_dict_round_trip():
    lin = nn.Linear(20, 70)
    q = Int8Linear.from_linear(lin)
    sd = q.state_dict()
    assert set(sd) == {"weight_int8", "weight_scale", "bias"}
    fresh = Int8Linear(20, 70)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 20)
    assert torch.equal(fresh(x), q(x))


def test_torch_compile_fullgraph():
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(3, 16)
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), q(x))


def test_ops_names_are_the_one_quantizer():
    """ops re-exports the references of minidiff.quant (one definition); the old names warn."""
    from minidiff.ops import gpu_linear as G

    assert I.int8_linear_reference is G.int8_linear_reference is Q.int8_linear_reference
    assert I.int8_weight_only_linear_reference is Q.int8_weight_only_linear_reference
    assert G.quantize_per_token_reference is Q.quantize_per_token_reference
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.warns(DeprecationWarning, match="quantize_weight_int8"):
        old = I.quantize_weight(w)
    assert all(torch.equal(a, b) for a, b in zip(old, Q.quantize_weight_int8(w)))
    with pytest.warns(DeprecationWarning, match="quantize_per_token_reference"):
        I.quantize_rows_reference(x)
    with pytest.warns(DeprecationWarning, match="int8_matmul_reference"):
        I.int8_gemm_s32_reference(torch.ones(2, 3, dtype=torch.int8), torch.ones(1, 3, dtype=torch.int8))
    with pytest.warns(DeprecationWarning, match="int8_weight_only_linear_reference"):
        G.int8_weight_only_reference(x, *Q.quantize_weight_int8(w))
