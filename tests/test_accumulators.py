"""One harness for every :class:`~minidiff.accumulate.Accumulator` in the package.

Each accumulator is registered once in ``CASES`` (name -> :class:`Case`: how to build it,
its data, how to cut the data into batches, and the functional result on the whole data).
Every case runs through the same contract:

    streaming (uneven batches) == functional on the concatenated data
                               == merged shards
                               == two gloo processes synced by ``DistContext``
                               == ``state_dict`` round trip into a fresh accumulator

and ``test_every_accumulator_is_registered`` fails when a new subclass appears in
``minidiff`` without a line here. ``tests/dist_worker.py`` imports this module for the
two-process run.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import minidiff
from minidiff.accumulate import Accumulator, reduce_pair


@dataclass
class Case:
    make: Callable[[], Accumulator]
    data: Callable[[], Any]                       # the whole data set, seeded
    n: int                                        # examples in it
    batch: Callable[[Any, int, int], tuple]       # update() args for examples [s, e)
    functional: Callable[[Any], Any]              # the functional result on all examples
    result: Callable[[Accumulator], Any] = lambda acc: acc.compute()
    rtol: float = 1e-9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- data and functional results per accumulator ----------------------------------------------
def _layers(n=157, seed=1):
    g = _gen(seed)
    base = torch.randn(n, 5, generator=g, dtype=torch.float64)
    a = [base @ torch.randn(5, w, generator=g, dtype=torch.float64) + torch.randn(n, w, generator=g,
                                                                                   dtype=torch.float64) + 20
         for w in (4, 9, 3)]
    b = [torch.tanh(base) @ torch.randn(5, w, generator=g, dtype=torch.float64)
         + 0.1 * torch.randn(n, w, generator=g, dtype=torch.float64) - 5 for w in (6, 2)]
    return a, b


def _rows(layers, s, e):
    return [t[s:e] for t in layers]


def _classes(n=157, seed=2):
    g = _gen(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    preds = torch.where(torch.rand(3, n, generator=g) < 0.7, labels, torch.randint(0, 4, (3, n), generator=g))
    probs = torch.softmax(torch.randn(n, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    return preds, labels, probs


def _agreement(d):
    from minidiff.agreement import disagreement_matrix, error_jaccard, flip_matrix
    preds, labels, _ = d
    return {"disagreement": disagreement_matrix(preds, num_classes=4), "flips": flip_matrix(preds, labels, num_classes=4),
            "error_jaccard": error_jaccard(preds, labels, num_classes=4), "n": preds.shape[1]}


def _matched(n=157, seed=3):
    g = _gen(seed)
    a = [torch.randn(n, w, generator=g) * (1 + w) for w in (8, 3)]
    return a, [x + 0.05 * torch.randn(x.shape, generator=g) for x in a]


def _logits(n=96, seed=4):
    g = _gen(seed)
    z = torch.randn(n, 11, generator=g, dtype=torch.float64) * 2
    w = z + 0.3 * torch.randn(n, 11, generator=g, dtype=torch.float64)
    return z, w, torch.randint(0, 11, (n,), generator=g), torch.arange(n) // 16, torch.arange(n) % 16


def _token_divergence_case() -> Case | None:
    try:
        from minidiff.lm.accumulator import TokenDivergenceAccumulator
    except ImportError:  # the language-model package is optional in a partial checkout
        return None

    def whole(d):  # the functional form: one accumulator fed all tokens at once
        acc = TokenDivergenceAccumulator()
        acc.update(d[0], d[1], d[2], window_ids=d[3], positions=d[4])
        return acc.compute()

    return Case(make=TokenDivergenceAccumulator, data=_logits, n=96,
                batch=lambda d, s, e: ((d[0][s:e], d[1][s:e], d[2][s:e]), {"window_ids": d[3][s:e], "positions": d[4][s:e]}),
                functional=whole)


def _cases() -> dict[str, Case]:
    from minidiff.agreement import AgreementAccumulator
    from minidiff.metrics.calibration import CalibrationAccumulator, calibration
    from minidiff.metrics.distribution import ClassHistogramAccumulator
    from minidiff.similarity import (CKAAccumulator, LayerErrorAccumulator, cka_matrix, layer_error,
                                     similarity_matrix)
    measures = ("cca", "svcca", "procrustes", "regression")
    cases = {
        "CKAAccumulator": Case(
            make=lambda: CKAAccumulator([4, 9, 3], [6, 2]), data=_layers, n=157,
            batch=lambda d, s, e: (_rows(d[0], s, e), _rows(d[1], s, e)),
            functional=lambda d: cka_matrix(d[0], d[1])),
        "CKAAccumulator-measures": Case(
            make=lambda: CKAAccumulator([4, 9, 3], [6, 2], estimator="biased"), data=_layers, n=157,
            batch=lambda d, s, e: (_rows(d[0], s, e), _rows(d[1], s, e)),
            functional=lambda d: {m: similarity_matrix(d[0], d[1], measure=m) for m in measures},
            result=lambda acc: acc.compute_measures(measures)),
        "CKAAccumulator-self": Case(
            make=lambda: CKAAccumulator([4, 9, 3]), data=_layers, n=157,
            batch=lambda d, s, e: (_rows(d[0], s, e),),
            functional=lambda d: cka_matrix(d[0])),
        "AgreementAccumulator": Case(
            make=lambda: AgreementAccumulator(3, 4), data=_classes, n=157,
            batch=lambda d, s, e: (d[0][:, s:e], d[1][s:e]), functional=_agreement),
        "CalibrationAccumulator": Case(
            make=lambda: CalibrationAccumulator(10), data=_classes, n=157,
            batch=lambda d, s, e: (d[2][s:e], d[1][s:e]), functional=lambda d: calibration(d[2], d[1], 10)),
        "ClassHistogramAccumulator": Case(
            make=lambda: ClassHistogramAccumulator(4), data=_classes, n=157,
            batch=lambda d, s, e: (d[0][0, s:e],), functional=lambda d: torch.bincount(d[0][0], minlength=4)),
        "LayerErrorAccumulator": Case(
            make=lambda: LayerErrorAccumulator([8, 3]), data=_matched, n=157,
            batch=lambda d, s, e: (_rows(d[0], s, e), _rows(d[1], s, e)),
            functional=lambda d: layer_error(d[0], d[1])),
    }
    token = _token_divergence_case()
    if token is not None:
        cases["TokenDivergenceAccumulator"] = token
    return cases


CASES = _cases()
# accumulator classes the registry covers (a case name is the class name, optionally "-variant")
COVERED = {name.split("-")[0] for name in CASES}
#: Accumulators that measure nothing, so the equalities above do not apply to them.
NOT_METRICS = {"NotApplicable"}  # minidiff.study.characteristics: a stand-in with no state that says why


def test_stand_ins_hold_no_state_and_say_why():
    from minidiff.metrics._checks import MetricSkipped
    from minidiff.study.characteristics import NotApplicable
    a = NotApplicable("layer_error", "widths differ")
    a.update(torch.ones(2, 2), torch.ones(2, 2))
    assert a.state_dict() == {} and a.reductions == {}
    with pytest.raises(MetricSkipped, match="widths differ"):
        a.compute()


# -- driving a case ------------------------------------------------------------------------
def _call(acc: Accumulator, args) -> None:
    if len(args) == 2 and isinstance(args[1], dict) and isinstance(args[0], tuple):
        acc.update(*args[0], **args[1])
    else:
        acc.update(*args)


def stream(case: Case, data, start: int, stop: int, sizes=(7, 31, 1, 50)) -> Accumulator:
    """One accumulator fed examples [start, stop) in uneven batches."""
    acc, i, k = case.make(), start, 0
    while i < stop:
        j = min(stop, i + sizes[k % len(sizes)])
        _call(acc, case.batch(data, i, j))
        i, k = j, k + 1
    return acc


def assert_same(got, expected, rtol: float, path: str = "result") -> None:
    """Equal structure; tensors and floats to ``rtol`` (NaN equals NaN), the rest exactly."""
    if dataclasses.is_dataclass(expected):
        assert dataclasses.is_dataclass(got) and type(got) is type(expected), path
        for f in dataclasses.fields(expected):
            assert_same(getattr(got, f.name), getattr(expected, f.name), rtol, f"{path}.{f.name}")
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), (path, set(got) ^ set(expected))
        for k in expected:
            assert_same(got[k], expected[k], rtol, f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, rtol, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor):
        got = torch.as_tensor(got)
        assert got.shape == expected.shape, (path, got.shape, expected.shape)
        if expected.is_floating_point():
            torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=rtol, equal_nan=True,
                                       msg=path)
        else:
            assert torch.equal(got, expected), path
    elif isinstance(expected, float):
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=rtol, abs=rtol), \
            (path, got, expected)
    else:
        assert got == expected, (path, got, expected)


# -- the contract, for every registered accumulator --------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_merge_and_state_dict_equal_functional(name):
    case = CASES[name]
    data = case.data()
    expected = case.functional(data)
    streamed = stream(case, data, 0, case.n)
    assert_same(case.result(streamed), expected, case.rtol, f"{name} streamed")
    # three shards (one of a single example), merged in order
    cuts = [0, case.n // 3, case.n // 3 + 1, case.n]
    shards = [stream(case, data, s, e) for s, e in zip(cuts, cuts[1:])]
    merged = shards[0]
    for other in shards[1:]:
        merged.merge(other)
    assert_same(case.result(merged), expected, case.rtol, f"{name} merged")
    # state_dict round trip into a fresh accumulator
    fresh = case.make()
    fresh.load_state_dict({k: v.clone() for k, v in streamed.state_dict().items()})
    assert_same(case.result(fresh), expected, case.rtol, f"{name} state_dict")
    # reset gives a fresh accumulator; .to() keeps the result
    streamed.reset()
    _call(streamed, case.batch(data, 0, case.n))
    assert_same(case.result(streamed.to("cpu")), expected, case.rtol, f"{name} reset")


def test_two_gloo_processes_equal_functional(tmp_path):
    """Every registered accumulator, each rank streaming its shard, synced by ``DistContext.sync``
    (which knows no accumulator class), equals the functional result on all examples."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import _launch
    codes, outputs = _launch("harness", tmp_path, 2)
    assert codes == [0, 0], outputs
    got = torch.load(tmp_path / "harness.pt", weights_only=False)
    assert set(got) == set(CASES)
    for name, case in CASES.items():
        assert_same(got[name], case.functional(case.data()), case.rtol, f"{name} two processes")


def test_every_accumulator_is_registered():
    for mod in pkgutil.walk_packages(minidiff.__path__, "minidiff."):
        if mod.name.endswith("__main__") or mod.name.startswith(("minidiff.kernels", "minidiff.report",
                                                                  "minidiff.cli")):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError:  # optional dependencies of unrelated modules
            continue
    found, todo = set(), list(Accumulator.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("minidiff."):
            found.add(cls.__name__)
    missing = found - COVERED - NOT_METRICS
    assert not missing, f"add a Case for {sorted(missing)} to CASES in tests/test_accumulators.py"


def test_callable_reduction_and_hooks():
    """A declared callable reduction reduces stacked shard states, in merge as in sync."""

    class LogSumExp(Accumulator):
        def __init__(self):
            super().__init__()
            self.add_state("lse", torch.tensor(-math.inf, dtype=torch.float64), lambda s: s.logsumexp(0))

        def update(self, x):
            self.lse = torch.logaddexp(self.lse, torch.as_tensor(x, dtype=torch.float64).logsumexp(0))

        def compute(self):
            return self.lse

    x = torch.randn(40, dtype=torch.float64, generator=_gen(5))
    a, b = LogSumExp(), LogSumExp()
    a.update(x[:13])
    b.update(x[13:])
    torch.testing.assert_close(a.merge(b).compute(), x.logsumexp(0))
    assert reduce_pair(torch.zeros(2), torch.ones(2), lambda s: s.sum(0)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown reduction"):
        LogSumExp().add_state("bad", torch.zeros(()), "mean")
    with pytest.raises(ValueError, match="one shape"):
        reduce_pair(torch.zeros(2), torch.zeros(3), lambda s: s.sum(0))
