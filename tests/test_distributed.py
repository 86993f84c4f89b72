"""torch.distributed scale-out: 2-process gloo runs on loopback equal the
single-process run; uneven shards; a dead rank fails the others quickly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minidiff.distributed import DistContext

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, out: Path, world: int, extra_env: dict | None = None, timeout: float = 120,
            kill_rest_after_rank: int | None = None):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME="lo", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    finished: dict[int, float] = {}
    while len(finished) < world:
        for rank, p in enumerate(procs):
            if rank not in finished and p.poll() is not None:
                finished[rank] = time.monotonic() - start
                if rank == kill_rest_after_rank:  # the straggler has made its point
                    for q in procs:
                        if q.poll() is None:
                            q.kill()
        if time.monotonic() - start > timeout:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: a rank hung past {timeout}s")
        time.sleep(0.05)
    outputs = [p.stdout.read() for p in procs]
    codes = [p.returncode for p in procs]
    _launch.finished_after = [finished[r] for r in range(world)]
    return codes, outputs


def _single(scenario: str, out: Path, extra_env: dict | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(extra_env or {})
    subprocess.run([sys.executable, str(WORKER), scenario, str(out)], env=env, check=True, timeout=120)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("n", [101, 2])
def test_two_process_gloo_equals_single_process(tmp_path, n):
    single_dir, dist_dir = tmp_path / "single", tmp_path / "dist"
    single_dir.mkdir(), dist_dir.mkdir()
    env = {"TOY_N": str(n)}  # 101 is odd: uneven shards; 2: one example per rank
    expected = _single("toy", single_dir, env)
    codes, outputs = _launch("toy", dist_dir, 2, env)
    assert codes == [0, 0], outputs
    got = json.loads((dist_dir / "result.json").read_text())
    assert got["count"] == expected["count"] == n
    assert got["rows"] == expected["rows"]  # per-example states come back in example order
    assert got["peak"] == expected["peak"] and got["low"] == expected["low"]
    for a, b in zip(got["total"], expected["total"]):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)


def test_dead_rank_fails_the_others_within_timeout(tmp_path):
    codes, outputs = _launch("die", tmp_path, 2, {"MINIDIFF_DIST_TIMEOUT": "10"}, timeout=90)
    assert codes[1] == 3
    assert codes[0] != 0, outputs[0]  # the survivor errors out instead of writing results
    assert "DistributedRunError" in outputs[0], outputs[0][-2000:]
    assert not (tmp_path / "result.json").exists()


def test_hung_rank_fails_the_others_at_the_timeout(tmp_path):
    codes, outputs = _launch("hang", tmp_path, 2, {"MINIDIFF_DIST_TIMEOUT": "4", "HANG_S": "25"}, timeout=90,
                             kill_rest_after_rank=0)
    assert codes[0] != 0
    # start-up (imports, rendezvous) plus the 4 s timeout, well before the stalled rank wakes at 25 s
    assert _launch.finished_after[0] < 20, _launch.finished_after
    assert "DistributedRunError" in outputs[0], outputs[0][-2000:]
    assert not (tmp_path / "result.json").exists()


def test_shard_ranges_cover_every_example_once():
    for n in range(0, 23):
        for world in (1, 2, 3, 5):
            ranges = [DistContext(rank=r, world_size=world).shard_range(n) for r in range(world)]
            covered = [i for a, b in ranges for i in range(a, b)]
            assert covered == list(range(n))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
