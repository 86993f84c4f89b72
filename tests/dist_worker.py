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


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    ctx = DistContext.from_env(timeout_s=float(os.environ.get("MINIDIFF_DIST_TIMEOUT", "60")))
    if scenario == "toy":
        n = int(os.environ.get("TOY_N", "101"))
        data = dataset(n, 5)
        start, stop = ctx.shard_range(n)
        acc = ToyAccumulator(5)
        for b in range(start, stop, 7):  # small uneven batches
            acc.update(data[b:min(b + 7, stop)])
        ctx.sync(acc)
        result = acc.compute()
    elif scenario == "die":
        # rank 1 dies before the collective; the others must fail, not hang
        if ctx.rank == 1:
            os._exit(3)
        acc = ToyAccumulator(2)
        acc.update(torch.ones(3, 2, dtype=torch.float64))
        ctx.sync(acc)
        result = acc.compute()
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
