"""Worker script for tests/test_distributed.py (run as a subprocess per rank).

Usage: python dist_worker.py SCENARIO OUT_DIR   with RANK/WORLD_SIZE/MASTER_* set,
or WORLD_SIZE unset for the single-process reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from minidiff.accumulate import Accumulator
from minidiff.distributed import DistContext


class ToyAccumulator(Accumulator):
    """Exercises every reduction kind."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.add_state("total", torch.zeros(width, dtype=torch.float64), reduce="sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.add_state("peak", torch.full((width,), -float("inf"), dtype=torch.float64), reduce="max")
        self.add_state("low", torch.full((width,), float("inf"), dtype=torch.float64), reduce="min")
        self.add_state("rows", torch.zeros((0, width), dtype=torch.float64), reduce="cat")

    def config(self):
        return {"width": self.width}

    def update(self, x: torch.Tensor) -> None:
        self.total += x.sum(0)
        self.count += x.shape[0]
        self.peak = torch.maximum(self.peak, x.max(0).values)
        self.low = torch.minimum(self.low, x.min(0).values)
        self.rows = torch.cat([self.rows, x])

    def compute(self):
        return {k: getattr(self, k).tolist() for k in self.reductions}


def dataset(n: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, width, generator=g, dtype=torch.float64)


def toy_scenario(ctx: DistContext, n: int) -> dict:
    """101 examples: uneven shards; 2: one example per rank."""
    data = dataset(n, 5)
    start, stop = ctx.shard_range(n)
    acc = ToyAccumulator(5)
    for b in range(start, stop, 7):  # small uneven batches
        acc.update(data[b:min(b + 7, stop)])
    ctx.sync(acc)
    return acc.compute()


def metric_data(n: int = 157):
    """Predictions of 3 models, labels and probabilities over 4 classes."""
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 4, (n,), generator=g)
    preds = torch.where(torch.rand(3, n, generator=g) < 0.7, labels, torch.randint(0, 4, (3, n), generator=g))
    probs = torch.softmax(torch.randn(n, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    return preds, labels, probs


def metrics_scenario(ctx: DistContext) -> dict:
    """The library's count/histogram accumulators, each rank its shard, synced."""
    from minidiff.agreement import AgreementAccumulator
    from minidiff.metrics.calibration import CalibrationAccumulator
    from minidiff.metrics.distribution import ClassHistogramAccumulator
    preds, labels, probs = metric_data()
    start, stop = ctx.shard_range(preds.shape[1])
    agree, cal, hist = AgreementAccumulator(3, 4), CalibrationAccumulator(10), ClassHistogramAccumulator(4)
    for s in range(start, stop, 20):
        e = min(s + 20, stop)
        agree.update(preds[:, s:e], labels[s:e])
        cal.update(probs[s:e], labels[s:e])
        hist.update(preds[0, s:e])
    out = {"agreement": {k: getattr(agree, k).tolist() for k in agree.reductions}}
    ctx.sync(agree), ctx.sync(cal), ctx.sync(hist)
    out["agreement_synced"] = {k: getattr(agree, k).tolist() for k in agree.reductions}
    out["calibration"] = {k: getattr(cal, k).tolist() for k in cal.reductions}
    out["histogram"] = hist.compute().tolist()
    return out


def cka_data(n: int = 203):
    """Two 'models' (3 and 2 layers) with large, different feature means: sums taken
    at different shifts cannot be added without re-alignment."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    a = [x[:, :4] * 3 + 50, x[:, 4:9] - 20, x[:, 9:] + 0.5 * x[:, :3] + 7]
    b = [x[:, :6] @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 100,
         torch.tanh(x[:, 3:]) + 0.1 * torch.randn(n, 9, generator=g, dtype=torch.float64) - 30]
    return a, b


def cka_scenario(ctx: DistContext) -> dict:
    from minidiff.similarity import CKAAccumulator, LayerSplitCKA
    a, b = cka_data()
    n = a[0].shape[0]
    out = {}
    # data parallel: each rank its own shard, its own first-batch shift; sync aligns
    start, stop = ctx.shard_range(n)
    for est in ("unbiased", "biased"):
        acc = CKAAccumulator([t.shape[1] for t in a], [t.shape[1] for t in b], estimator=est)
        for s in range(start, stop, 16):
            e = min(s + 16, stop)
            acc.update([t[s:e] for t in a], [t[s:e] for t in b])
        ctx.sync(acc)
        out[f"data_parallel_{est}"] = acc.compute().tolist()
    # layer split: every rank sees every sample, for its block of model b's layers
    split = LayerSplitCKA([t.shape[1] for t in a], [t.shape[1] for t in b], ctx)
    for s in range(0, n, 16):
        split.update([t[s:s + 16] for t in a], [t[s:s + 16] for t in b])
    out["layer_split"] = split.compute().tolist()
    out["block"] = split.block
    # per-example gather with an empty rank and aligned shards
    rows = torch.arange(ctx.rank * 10, ctx.rank * 10 + 3, dtype=torch.int64).reshape(3, 1) if ctx.rank == 0 \
        else torch.empty(0)
    out["gathered"] = ctx.gather_in_order(rows).tolist()
    return out


def harness_scenario(ctx: DistContext, out_dir: str) -> None:
    """Every accumulator registered in tests/test_accumulators.py: each rank streams its
    shard, ``ctx.sync`` reduces it; rank 0 saves the results."""
    from test_accumulators import CASES, stream
    results = {}
    for name, case in CASES.items():
        start, stop = ctx.shard_range(case.n)
        acc = stream(case, case.data(), start, stop)
        ctx.sync(acc)
        results[name] = case.result(acc)
    if ctx.is_main:
        torch.save(results, os.path.join(out_dir, "harness.pt"))


def study_scenario(ctx: DistContext, out_dir: str) -> dict | None:
    """Run a study file through the library (what ``minidiff run`` does); rank
    ``DIE_RANK`` exits after its chunk ``DIE_AFTER_CHUNK`` of the evaluation pass."""
    from minidiff.study.study import build_study
    from minidiff.study.config import load_config
    torch.set_num_threads(1)
    die_rank, die_after = int(os.environ.get("DIE_RANK", "-1")), int(os.environ.get("DIE_AFTER_CHUNK", "-1"))

    def on_chunk(k: int) -> None:
        if ctx.rank == die_rank and k == die_after:
            os._exit(3)

    cfg = load_config(os.environ["STUDY_FILE"])
    study = build_study(cfg, cache_dir=os.path.join(out_dir, "cache"), progress=False)
    # the study's outputs in a folder of their own: out_dir also holds this harness's files
    res = study.run(out=os.path.join(out_dir, "out"), on_chunk=on_chunk)
    with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(study.last_run, f)
    return None if not res else {"done": True}


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    ctx = DistContext.from_env(timeout_s=float(os.environ.get("MINIDIFF_DIST_TIMEOUT", "60")))
    if scenario == "collectives":  # one launch for every reduction check (process start-up dominates)
        result = {f"toy_{n}": toy_scenario(ctx, n) for n in (101, 2)}
        result["cka"] = cka_scenario(ctx)
        result["metrics"] = metrics_scenario(ctx)
    elif scenario == "harness":
        harness_scenario(ctx, out_dir)
        ctx.close()
        return
    elif scenario == "study":
        result = study_scenario(ctx, out_dir)
        if result is None:  # Study.run wrote results.json itself on rank 0
            ctx.close()
            return
    elif scenario == "hang":
        # rank 1 stalls far past the timeout; rank 0 must give up at the timeout
        import time
        if ctx.rank == 1:
            time.sleep(float(os.environ.get("HANG_S", "60")))
            os._exit(4)
        acc = ToyAccumulator(2)
        acc.update(torch.ones(3, 2, dtype=torch.float64))
        ctx.sync(acc)
        result = acc.compute()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    if ctx.is_main:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    ctx.close()


if __name__ == "__main__":
    main()
