"""Every registered ``torch.ops.minidiff.*`` op, called with inconsistent arguments,
raises ValueError / RuntimeError instead of touching memory out of range.

The calls run in child processes (a batch of cases per process, to stay fast): a
case that corrupts memory would kill the child with a signal, which fails the test
with the case's name. Each op also gets a valid call, so a case table that only
ever errors out would be noticed.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap

import pytest
import torch

import minidiff.ops

# (op name, case name, expression evaluated in the child with O = torch.ops.minidiff)
_SETUP = """
import json, sys, torch
import importlib, pkgutil, minidiff.ops
for _m in pkgutil.iter_modules(minidiff.ops.__path__):
    importlib.import_module("minidiff.ops." + _m.name)
from minidiff.ops.int8 import pack_weight
O = torch.ops.minidiff
i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
i64 = lambda *v: torch.tensor(v, dtype=torch.int64)
x8 = torch.randn(4, 8)
w8 = torch.randint(-127, 128, (6, 8), dtype=torch.int8)
s6 = torch.rand(6)
packed, colsum = pack_weight(w8)
rp, col, val = i32(0, 2, 4), i32(0, 5, 1, 7), torch.ones(4)
P = torch.randint(0, 5, (3, 300), dtype=torch.int32)
x16 = torch.randn(4, 32)
from minidiff.kernels.sparse24 import compress_24
w24 = torch.randn(6, 32)
w24 = w24 * (torch.arange(32) % 4 < 2)
v24, m24 = compress_24(w24)
"""

CASES: dict[str, list[tuple[str, str]]] = {
    "sparse_linear": [
        ("valid", "O.sparse_linear(x8, rp, col, val, None, 8, torch.float32)"),
        ("column index out of range", "O.sparse_linear(x8, rp, i32(0, 10**6, 1, 2), val, None, 8, torch.float32)"),
        ("negative column index", "O.sparse_linear(x8, rp, i32(0, -5, 1, 2), val, None, 8, torch.float32)"),
        ("row_ptr past nnz", "O.sparse_linear(x8, i32(0, 2, 10**6), col, val, None, 8, torch.float32)"),
        ("row_ptr decreasing", "O.sparse_linear(x8, i32(0, 3, 1, 4), i32(0, 1, 2, 3), val, None, 8, torch.float32)"),
        ("row_ptr not from 0", "O.sparse_linear(x8, i32(1, 2, 4), col, val, None, 8, torch.float32)"),
        ("row_ptr int64", "O.sparse_linear(x8, rp.long(), col, val, None, 8, torch.float32)"),
        ("values float64", "O.sparse_linear(x8, rp, col, val.double(), None, 8, torch.float32)"),
        ("col/val lengths differ", "O.sparse_linear(x8, rp, col, torch.ones(3), None, 8, torch.float32)"),
        ("in_features mismatch", "O.sparse_linear(x8, rp, col, val, None, 9, torch.float32)"),
        ("bias length", "O.sparse_linear(x8, rp, col, val, torch.ones(5), 8, torch.float32)"),
        ("bias integer", "O.sparse_linear(x8, rp, col, val, torch.ones(2, dtype=torch.int64), 8, torch.float32)"),
        ("x integer", "O.sparse_linear(x8.long(), rp, col, val, None, 8, torch.float32)"),
        ("x 1-D", "O.sparse_linear(x8[0], rp, col, val, None, 8, torch.float32)"),
        ("empty row_ptr", "O.sparse_linear(x8, i32(), i32(), torch.ones(0), None, 8, torch.float32)"),
        ("out dtype int", "O.sparse_linear(x8, rp, col, val, None, 8, torch.int32)"),
    ],
    "cka_batch_terms": [
        ("valid", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [0, 3, 8], [0, 6])"),
        ("offsets decreasing", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [0, 6, 4, 8], [0, 6])"),
        ("offsets past width", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [0, 4, 100], [0, 6])"),
        ("offsets short of width", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [0, 4], [0, 6])"),
        ("offsets not from 0", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [2, 8], [0, 6])"),
        ("one offset", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [8], [0, 6])"),
        ("float32 with float64", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6).double(), [0, 8], [0, 6])"),
        ("rows differ", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(4, 6), [0, 8], [0, 6])"),
        ("integer input", "O.cka_batch_terms(torch.ones(5, 8, dtype=torch.int64), torch.ones(5, 6, dtype=torch.int64), [0, 8], [0, 6])"),
        ("1-D input", "O.cka_batch_terms(torch.randn(8), torch.randn(6), [0, 8], [0, 6])"),
        ("unknown backend", "O.cka_batch_terms(torch.randn(5, 8), torch.randn(5, 6), [0, 8], [0, 6], 'gpu')"),
    ],
    "agreement_pair_counts": [
        ("valid", "O.agreement_pair_counts(P, P[0].clone(), -1, 5)"),
        ("int32 preds, int64 labels", "O.agreement_pair_counts(P, P[0].long(), -1, 5)"),
        ("labels too short", "O.agreement_pair_counts(P, i32(1), -1, 0)"),
        ("labels 2-D", "O.agreement_pair_counts(P, P[:2].contiguous(), -1, 0)"),
        ("float preds", "O.agreement_pair_counts(P.float(), None, -1, 0)"),
        ("1-D preds", "O.agreement_pair_counts(P[0], None, -1, 0)"),
        ("empty preds", "O.agreement_pair_counts(P[:, :0], None, -1, 0)"),
        ("negative prediction", "O.agreement_pair_counts(P - 3, None, -1, 0)"),
        ("prediction >= num_classes", "O.agreement_pair_counts(P, None, -1, 3)"),
        ("nbits 64", "O.agreement_pair_counts(P, None, 64, 0)"),
        ("nbits 0 without labels", "O.agreement_pair_counts(P, None, 0, 0)"),
        ("negative num_classes", "O.agreement_pair_counts(P, None, -1, -4)"),
        ("torch backend, out of range", "O.agreement_pair_counts(P, None, -1, 3, 'torch')"),
    ],
    "agreement_modal_labels": [
        ("valid", "O.agreement_modal_labels(P, 5)"),
        ("num_classes below the labels", "O.agreement_modal_labels(torch.randint(0, 100, (5, 300), dtype=torch.int32), 3)"),
        ("negative labels", "O.agreement_modal_labels(P - 10, 5)"),
        ("int64 labels of 2**40", "O.agreement_modal_labels(P.long() + 2**40, 5)"),
        ("num_classes 2**40", "O.agreement_modal_labels(P, 2**40)"),
        ("num_classes 0", "O.agreement_modal_labels(P, 0)"),
        ("float preds", "O.agreement_modal_labels(P.double(), 5)"),
        ("1-D preds", "O.agreement_modal_labels(P[0], 5)"),
        ("torch backend, out of range", "O.agreement_modal_labels(P, 2, 'torch')"),
    ],
    "agreement_cie_scores": [
        ("valid", "O.agreement_cie_scores(P, P[:2].contiguous(), 5)"),
        ("populations of different lengths", "O.agreement_cie_scores(P, P[:, :10].contiguous(), 5)"),
        ("compressed labels out of range", "O.agreement_cie_scores(P, P * 100, 5)"),
        ("base labels negative", "O.agreement_cie_scores(-P - 1, P, 5)"),
        ("num_classes 0", "O.agreement_cie_scores(P, P, 0)"),
        ("float population", "O.agreement_cie_scores(P.float(), P, 5)"),
        ("empty population", "O.agreement_cie_scores(P[:0], P, 5)"),
    ],
    "int8_linear_w8a8": [
        ("valid", "O.int8_linear_w8a8(x8, w8, s6, None, packed, colsum, torch.float32)"),
        ("K mismatch", "O.int8_linear_w8a8(torch.randn(4, 1000), w8, s6, None, None, None, torch.float32)"),
        ("length-1 scale", "O.int8_linear_w8a8(x8, w8, torch.ones(1), None, None, None, torch.float32)"),
        ("float64 scale", "O.int8_linear_w8a8(x8, w8, s6.double(), None, None, None, torch.float32)"),
        ("float weight", "O.int8_linear_w8a8(x8, w8.float(), s6, None, None, None, torch.float32)"),
        ("bias length", "O.int8_linear_w8a8(x8, w8, s6, torch.ones(2), None, None, torch.float32)"),
        ("packed of another weight", "O.int8_linear_w8a8(x8, w8, s6, None, packed[:, :1].contiguous(), colsum, torch.float32)"),
        ("colsum too short", "O.int8_linear_w8a8(x8, w8, s6, None, packed, colsum[:2].contiguous(), torch.float32)"),
        ("packed without colsum", "O.int8_linear_w8a8(x8, w8, s6, None, packed, None, torch.float32)"),
        ("integer x", "O.int8_linear_w8a8(x8.to(torch.int8), w8, s6, None, None, None, torch.float32)"),
        ("integer out dtype", "O.int8_linear_w8a8(x8, w8, s6, None, None, None, torch.int32)"),
    ],
    "int8_linear_weight_only": [
        ("valid", "O.int8_linear_weight_only(x8, w8, s6, None, torch.float32)"),
        ("K mismatch", "O.int8_linear_weight_only(torch.randn(4, 8), torch.zeros(6, 1000, dtype=torch.int8), s6, None, torch.float32)"),
        ("length-1 scale", "O.int8_linear_weight_only(x8, w8, torch.ones(1), None, torch.float32)"),
        ("bias length", "O.int8_linear_weight_only(x8, w8, s6, torch.ones(60), torch.float32)"),
        ("weight 1-D", "O.int8_linear_weight_only(x8, w8.flatten(), s6, None, torch.float32)"),
        ("x 3-D", "O.int8_linear_weight_only(x8[None], w8, s6, None, torch.float32)"),
    ],
    "int8_linear_gpu": [
        ("valid", "O.int8_linear_gpu(x8, w8, s6, None, torch.float32)"),
        ("K mismatch", "O.int8_linear_gpu(torch.randn(4, 1000), w8, s6, None, torch.float32)"),
        ("length-1 scale", "O.int8_linear_gpu(x8, w8, torch.ones(1), None, torch.float32)"),
        ("integer scale", "O.int8_linear_gpu(x8, w8, torch.ones(6, dtype=torch.int32), None, torch.float32)"),
        ("integer out dtype", "O.int8_linear_gpu(x8, w8, s6, None, torch.int64)"),
    ],
    "int8_weight_only_gpu": [
        ("valid", "O.int8_weight_only_gpu(x8, w8, s6, None, torch.float32)"),
        ("K mismatch", "O.int8_weight_only_gpu(torch.randn(4, 1000), w8, s6, None, torch.float32)"),
        ("length-1 scale", "O.int8_weight_only_gpu(x8, w8, torch.ones(1), None, torch.float32)"),
        ("bias length", "O.int8_weight_only_gpu(x8, w8, s6, torch.ones(1), torch.float32)"),
    ],
    "token_divergence": [
        ("valid", "O.token_divergence(torch.randn(3, 7), torch.randn(3, 7), i64(0, 6, 2))"),
        ("vocabularies differ", "O.token_divergence(torch.randn(3, 7), torch.randn(3, 9), None)"),
        ("target out of range", "O.token_divergence(torch.randn(3, 7), torch.randn(3, 7), i64(0, 7, 2))"),
        ("negative target", "O.token_divergence(torch.randn(3, 7), torch.randn(3, 7), i64(0, -1, 2))"),
        ("targets too short", "O.token_divergence(torch.randn(3, 7), torch.randn(3, 7), i64(0))"),
        ("integer logits", "O.token_divergence(torch.ones(3, 7, dtype=torch.int64), torch.ones(3, 7, dtype=torch.int64), None)"),
        ("empty vocabulary", "O.token_divergence(torch.randn(3, 0), torch.randn(3, 0), None)"),
    ],
    "sparse24_linear_gpu": [
        ("valid", "O.sparse24_linear_gpu(x16, v24, m24, None)"),
        ("K mismatch", "O.sparse24_linear_gpu(torch.randn(4, 48), v24, m24, None)"),
        ("meta too short", "O.sparse24_linear_gpu(x16, v24, m24[:, :1].contiguous(), None)"),
        ("meta int32", "O.sparse24_linear_gpu(x16, v24, m24.int(), None)"),
        ("values float64", "O.sparse24_linear_gpu(x16, v24.double(), m24, None)"),
        ("bias length", "O.sparse24_linear_gpu(x16, v24, m24, torch.ones(2))"),
    ],
}

_CHILD = _SETUP + textwrap.dedent("""
    cases = json.loads(sys.argv[1])
    for op, name, expr in cases:
        try:
            eval(expr)
            outcome = "returned"
        except (ValueError, RuntimeError) as exc:
            outcome = "error: " + type(exc).__name__ + ": " + str(exc).splitlines()[0][:200]
        except Exception as exc:  # noqa: BLE001 - reported to the parent as a wrong error type
            outcome = "wrong error: " + type(exc).__name__ + ": " + str(exc)[:200]
        print(json.dumps([op, name, outcome]), flush=True)
""")


def _registered_ops() -> set[str]:
    for mod in pkgutil.iter_modules(minidiff.ops.__path__):
        importlib.import_module(f"minidiff.ops.{mod.name}")
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("minidiff::")}


def test_every_registered_op_has_cases():
    missing = _registered_ops() - set(CASES)
    assert not missing, f"registered ops without bad-argument cases in this file: {sorted(missing)}"


def _run(cases: list[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    seen = {}
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            op, name, outcome = json.loads(line)
            seen[(op, name)] = outcome
    if proc.returncode != 0:
        last = cases[len(seen)] if len(seen) < len(cases) else None
        pytest.fail(f"child died (return code {proc.returncode}) at case {last}: {proc.stderr[-2000:]}")
    return seen


@pytest.mark.parametrize("ops", [("sparse_linear", "cka_batch_terms", "int8_linear_w8a8", "int8_linear_weight_only"),
                                 ("agreement_pair_counts", "agreement_modal_labels", "agreement_cie_scores"),
                                 ("int8_linear_gpu", "int8_weight_only_gpu", "sparse24_linear_gpu",
                                  "token_divergence")])
def test_bad_arguments_raise_without_a_signal(ops):
    cases = [(op, name, expr) for op in ops for name, expr in CASES[op]]
    seen = _run(cases)
    for op, name, _ in cases:
        outcome = seen[(op, name)]
        if name == "valid":
            assert outcome == "returned", f"{op}: the valid call failed: {outcome}"
        else:
            assert outcome.startswith("error: "), f"{op} / {name}: {outcome}"
            assert len(outcome) > 30, f"{op} / {name}: the message says too little: {outcome}"


# ---- one dispatch ------------------------------------------------------------------------
def test_eager_calls_go_through_the_registered_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    import minidiff
    from minidiff.ops import cka, int8, sparse

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    p = torch.randint(0, 4, (3, 50))
    x = torch.randn(5, 8)
    from minidiff.quant import quantize_weight_int8

    w_q, w_s = quantize_weight_int8(torch.randn(6, 8))
    with Record():
        minidiff.disagreement_matrix(p)
        minidiff.modal_labels(p, num_classes=4)
        minidiff.cie_scores(p, p[:2], num_classes=4)
        cka.batch_terms(x, x, [0, 8], [0, 3, 8])
        int8.int8_linear(x, w_q, w_s)
        int8.int8_weight_only_linear(x, w_q, w_s)
        sparse.sparse_linear(x, *sparse.to_csr(torch.randn(6, 8)))
    for op in ("agreement_pair_counts", "agreement_modal_labels", "agreement_cie_scores", "cka_batch_terms",
               "int8_linear_w8a8", "int8_linear_weight_only", "sparse_linear"):
        assert f"minidiff.{op}.default" in seen, (op, seen)


def test_backend_environment(monkeypatch):
    from minidiff.ops import agreement, dispatch

    for var in ("MINIDIFF_BACKEND", "MINIDIFF_BACKEND_AGREEMENT", "MINIDIFF_AGREEMENT_BACKEND",
                "MINIDIFF_GPU_BACKEND", "MINIDIFF_BACKEND_INT8"):
        monkeypatch.delenv(var, raising=False)
    assert dispatch.requested("agreement") == "auto"
    monkeypatch.setenv("MINIDIFF_BACKEND", "reference")
    assert dispatch.requested("agreement") == "torch" == dispatch.requested("cka")
    monkeypatch.setenv("MINIDIFF_BACKEND_AGREEMENT", "native")  # the family variable wins
    assert dispatch.requested("agreement") == "native" and dispatch.requested("cka") == "torch"
    monkeypatch.delenv("MINIDIFF_BACKEND_AGREEMENT")
    monkeypatch.setenv("MINIDIFF_AGREEMENT_BACKEND", "triton")  # deprecated, still honoured
    with pytest.warns(DeprecationWarning, match="MINIDIFF_BACKEND_AGREEMENT"):
        assert dispatch.requested("agreement") == "triton"
    monkeypatch.setenv("MINIDIFF_GPU_BACKEND", "cuda")
    with pytest.warns(DeprecationWarning, match="MINIDIFF_BACKEND_INT8"):
        assert dispatch.requested("int8") == "cuda"
    monkeypatch.setenv("MINIDIFF_BACKEND_INT8", "fastest")
    with pytest.raises(ValueError, match="MINIDIFF_BACKEND_INT8='fastest'"):
        dispatch.requested("int8")
    # a preference that does not apply falls back to the default order; an explicit argument is strict
    monkeypatch.delenv("MINIDIFF_AGREEMENT_BACKEND")
    monkeypatch.setenv("MINIDIFF_BACKEND_AGREEMENT", "triton")
    assert dispatch.choose("agreement", ["native", "torch"]) == "native"  # "triton" is not a candidate
    monkeypatch.delenv("MINIDIFF_BACKEND_AGREEMENT")
    monkeypatch.setenv("MINIDIFF_BACKEND", "torch")
    p = torch.randint(0, 4, (3, 40), dtype=torch.int32)
    assert agreement._resolve("auto", p) == "torch"
    assert torch.equal(agreement.modal_labels(p, 4), agreement.modal_labels_reference(p, 4))
    with pytest.raises(ValueError, match="cannot run this call"):
        agreement.pair_counts(p, backend="cuda")


def test_results_do_not_depend_on_the_backend(monkeypatch):
    from minidiff.ops import agreement, cka

    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 5, (4, 500), generator=g)
    x, y = torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(64, 7, generator=g, dtype=torch.float64)
    outs = {}
    for backend in ("native", "torch"):
        monkeypatch.setenv("MINIDIFF_BACKEND", backend)
        outs[backend] = (agreement.pair_counts(p, p[0]), agreement.modal_labels(p, 5),
                         agreement.cie_scores(p, p[:2], 5), cka.batch_terms(x, y, [0, 5, 12], [0, 7]))
    for a, b in zip(outs["native"][:3], outs["torch"][:3]):
        assert all(torch.equal(u, v) for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)))
    for u, v in zip(outs["native"][3], outs["torch"][3]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_backward_through_an_op_raises_and_plain_calls_record_no_graph():
    from minidiff.ops import int8
    from minidiff.quant import quantize_weight_int8

    w_q, w_s = quantize_weight_int8(torch.randn(6, 8))
    x = torch.randn(3, 8, requires_grad=True)
    y = int8.int8_linear(x, w_q, w_s)
    assert torch.equal(y, int8.int8_linear(x.detach(), w_q, w_s))
    with pytest.raises(RuntimeError, match="minidiff::int8_linear_w8a8 has no backward"):
        (y.sum() + x.sum()).backward()  # a residual path alone would hide the missing gradient
    assert int8.int8_linear(x.detach(), w_q, w_s).grad_fn is None
    with torch.no_grad():
        assert int8.int8_linear(x, w_q, w_s).grad_fn is None
