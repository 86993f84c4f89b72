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

import numpy as np
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


def test_two_process_gloo_collectives_equal_single_process(tmp_path):
    """One 2-process launch checks every reduction kind (toy accumulator with
    101 examples: uneven shards; 2: one per rank), CKA statistics synced across
    different shifts, the layer-pair split and a gather with an empty rank."""
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import ToyAccumulator, cka_data, dataset, metric_data
    codes, outputs = _launch("collectives", tmp_path, 2)
    assert codes == [0, 0], outputs
    got = json.loads((tmp_path / "result.json").read_text())
    for n in (101, 2):
        ref = ToyAccumulator(5)
        ref.update(dataset(n, 5))
        expected, res = ref.compute(), got[f"toy_{n}"]
        assert res["count"] == expected["count"] == n
        assert res["rows"] == expected["rows"]  # per-example states come back in example order
        assert res["peak"] == expected["peak"] and res["low"] == expected["low"]
        for a, b in zip(res["total"], expected["total"]):
            assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    _check_cka(got["cka"], cka_data())
    _check_metrics(got["metrics"], metric_data())


def _check_metrics(got, data):
    """Agreement counts, calibration bins and class histograms: synced == one process, exactly
    for counts (float64 bin sums to 1e-12)."""
    from minidiff.agreement import AgreementAccumulator
    from minidiff.metrics.calibration import CalibrationAccumulator
    from minidiff.metrics.distribution import ClassHistogramAccumulator
    preds, labels, probs = data
    agree, cal, hist = AgreementAccumulator(3, 4), CalibrationAccumulator(10), ClassHistogramAccumulator(4)
    agree.update(preds, labels)
    cal.update(probs, labels)
    hist.update(preds[0])
    for k in agree.reductions:
        assert got["agreement_synced"][k] == getattr(agree, k).tolist(), k
    assert got["agreement"]["n"] < agree.n.item()  # rank 0 alone saw only its shard
    for k in cal.reductions:
        np.testing.assert_allclose(got["calibration"][k], getattr(cal, k).numpy(), rtol=1e-12, atol=1e-12)
    assert got["histogram"] == hist.compute().tolist()


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


# -- CKA statistics across ranks -------------------------------------------------------
def _rel_close(got, expected, rel=1e-9):
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=rel, atol=rel * np.abs(expected).max())


def _check_cka(got, data):
    """Two ranks accumulated CKA statistics at different shifts (their own first
    batches of features with means up to 100); the synced matrix equals one
    process over all data to 1e-9. The layer-pair split (rank r keeps a block of
    model b's layers) gives the unsplit matrix."""
    from minidiff.similarity import CKAAccumulator
    a, b = data
    for est in ("unbiased", "biased"):
        ref = CKAAccumulator([t.shape[1] for t in a], [t.shape[1] for t in b], estimator=est)
        ref.update(a, b)  # one batch: all data
        _rel_close(got[f"data_parallel_{est}"], ref.compute().numpy())
        if est == "unbiased":
            unsplit = ref.compute().numpy()
    _rel_close(got["layer_split"], unsplit)
    assert got["block"] == [0]  # rank 0 held model b's first layer, rank 1 the second
    assert got["gathered"] == [[0], [1], [2]]  # rank 1 contributed no rows (an empty 1-D tensor)
    # without re-alignment the states of different shifts are refused, never silently summed
    s0 = CKAAccumulator([4, 5, 3], [5, 9])
    s0.update([t[:100] for t in a], [t[:100] for t in b])
    s1 = CKAAccumulator([4, 5, 3], [5, 9])
    s1.update([t[100:] for t in a], [t[100:] for t in b])
    for name in s0.reductions:
        setattr(s0, name, getattr(s0, name) + getattr(s1, name))
    with pytest.raises(ValueError, match="different shifts"):
        s0.compute()


def test_layer_blocks_are_contiguous_balanced_and_cover_every_layer():
    from minidiff.distributed import layer_blocks
    assert layer_blocks([384] * 7, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert layer_blocks([768] * 13, 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert layer_blocks([100, 1, 1], 2) == [[0], [1, 2]]
    for dims in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 5, [10]):
        for parts in range(1, len(dims) + 1):
            blocks = layer_blocks(dims, parts)
            assert len(blocks) == parts and all(blocks)
            assert [i for blk in blocks for i in blk] == list(range(len(dims)))
    with pytest.raises(ValueError, match="at most one rank per layer"):
        layer_blocks([4, 4], 3)


def test_memory_formula_is_the_accumulator_state_layout():
    """``cka_state_bytes`` (the README's formula) counts every byte the CKA
    accumulator holds after an update, and it does not grow with the samples."""
    import torch
    from minidiff.similarity import CKAAccumulator, LayerSplitCKA, cka_state_bytes

    def held(acc):  # states, pending float32 sums of C, pending upper-block Gram sums
        owned = [*acc.state_dict().values(), *acc._pending.values(), *(g.buffer for g in acc._grams.values())]
        return sum(t.numel() * t.element_size() for t in owned)
    g = torch.Generator().manual_seed(0)
    for dims_a, dims_b in (([3, 5], [4, 2, 6]), ([7, 7, 7], None), ([400, 400, 64, 768], [384, 300]),
                           ([400, 400, 64], None)):
        for dtype in (torch.float32, torch.float64):
            acc = CKAAccumulator(dims_a, dims_b)
            for n in (9, 50):
                a = [torch.randn(n, d, generator=g, dtype=dtype) for d in dims_a]
                acc.update(a) if dims_b is None else acc.update(a, [torch.randn(n, d, generator=g, dtype=dtype)
                                                                    for d in dims_b])
                expect = cka_state_bytes(dims_a, dims_b, float32_inputs=dtype == torch.float32)
                assert held(acc) == acc.nbytes() == expect
    split = LayerSplitCKA([3, 5], [4, 2, 6])  # one process: one block holding every layer
    assert split.block == [0, 1, 2]


def test_aligned_shards_start_on_chunk_boundaries():
    for n in (0, 1, 31, 32, 101, 1000):
        for world in (1, 2, 3):
            ranges = [DistContext(rank=r, world_size=world).shard_range(n, align=32) for r in range(world)]
            assert [i for s, e in ranges for i in range(s, e)] == list(range(n))
            assert all(s % 32 == 0 or s == n for s, _ in ranges)
    with pytest.raises(ValueError):
        DistContext().shard_range(10, align=0)


# -- a small study end to end: torchrun CLI vs one process, a killed worker, resume -------
STUDY_TOML = """
[study]
name = "tiny distributed"
seed = 0
batch_size = 16
chunk_batches = 2          # chunks of 32 examples: 101 examples -> 4 chunks, shards of 64 and 37
progress = false

[data]
source = "builtin"
name = "digits"
eval_fraction = 0.5
limit = 101
train_limit = 300

[ood]
source = "builtin"
name = "mnist-sample"
resize = [8, 8]
limit = 40

[base]
kind = "mlp"
hidden = [24, 12]
seeds = [0, 1]
train = { epochs = 3, lr = 0.01, batch_size = 64 }

[[variants]]
name = "prune-50"
recipe = "prune"
sparsity = 0.5

[[variants]]
name = "int8"
recipe = "int8"

[metrics]
bootstrap = 100
knn_k = 5
ood_k = 5
"""


def _compare_results(got, expected, path="results", rel=1e-9):
    """Equal structure, identical ints/strings/bools, floats to ``rel``."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), (path, set(got) ^ set(expected))
        for k in expected:
            _compare_results(got[k], expected[k], f"{path}.{k}", rel)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            _compare_results(g, e, f"{path}[{i}]", rel)
    elif isinstance(expected, float) and isinstance(got, float):
        assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, rel=rel, abs=1e-300), path
    else:
        assert got == expected, (path, got, expected)


def _results(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    res.pop("timing", None)
    return res


@pytest.fixture(scope="module")
def study_single(tmp_path_factory):
    """The single-process reference: ``python -m minidiff run`` with one thread
    (the same per-process thread count as the ranks, so the models' float32
    forwards are the same computations)."""
    root = tmp_path_factory.mktemp("study")
    (root / "study.toml").write_text(STUDY_TOML)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "minidiff", "run", str(root / "study.toml"), "--out", str(root / "single"),
                    "--quiet", "--threads", "1"], env=env, check=True, timeout=300, capture_output=True)
    return root, _results(root / "single")


def test_torchrun_study_equals_single_process(study_single):
    """``torchrun --nproc-per-node 2 -m minidiff run``: uneven shards (64 + 37
    examples), two variants of a 2-seed population, an OOD pass; rank 0 writes
    what one process writes (per-example outputs, counts, CKA matrices, verdicts)."""
    root, expected = study_single
    out = root / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                           "-m", "minidiff", "run", str(root / "study.toml"), "--out", str(out), "--quiet",
                           "--threads", "1"], env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = _results(out)
    _compare_results(got, expected)
    assert got["representation"]["int8"]["cka"]  # the CKA matrices really were compared


def test_killed_worker_fails_within_timeout_then_rerun_resumes(study_single, tmp_path):
    root, expected = study_single
    env = {"STUDY_FILE": str(root / "study.toml"), "MINIDIFF_DIST_TIMEOUT": "20", "DIE_RANK": "1",
           "DIE_AFTER_CHUNK": "0"}
    codes, outputs = _launch("study", tmp_path, 2, env, timeout=150)
    assert codes[1] == 3, outputs[1][-2000:]
    assert codes[0] != 0, outputs[0][-2000:]
    assert "DistributedRunError" in outputs[0] and "per-shard cache" in outputs[0], outputs[0][-3000:]
    assert not (tmp_path / "out" / "results.json").exists()  # nothing half-written
    # the rerun computes only what the dead rank had not finished
    env.update(DIE_RANK="-1")
    codes, outputs = _launch("study", tmp_path, 2, env, timeout=150)
    assert codes == [0, 0], outputs
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert set(r0["forward_chunks"].values()) == {0}  # rank 0 had finished its 2 chunks
    assert set(r1["forward_chunks"].values()) == {1}  # rank 1 redoes its 2nd chunk only
    _compare_results(_results(tmp_path / "out"), expected)


_SELF_KILLING_RANK = """
import os, signal, sys
from minidiff.study import study as st
run = st.Study.run


def run_and_die(self, *args, **kwargs):
    def on_chunk(k):
        if os.environ["RANK"] == "1" and k == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would
    return run(self, *args, on_chunk=on_chunk, **kwargs)


st.Study.run = run_and_die
from minidiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_survivors_say_why_before_torchrun_does(tmp_path):
    """torchrun answers a SIGKILLed rank by sending SIGTERM to the others and then prints
    its own traceback; each surviving rank prints minidiff's one line first."""
    (tmp_path / "study.toml").write_text(STUDY_TOML)
    script = tmp_path / "self_killing.py"
    script.write_text(_SELF_KILLING_RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MINIDIFF_DIST_TIMEOUT="120")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
                           "run", str(tmp_path / "study.toml"), "--out", str(tmp_path / "out"), "--quiet",
                           "--threads", "1"], env=env, timeout=300, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    log = proc.stdout
    assert proc.returncode != 0, log[-3000:]
    # whichever comes first: torchrun's SIGTERM, or gloo noticing the dead peer's socket
    lines = [ln for ln in log.splitlines() if ln.startswith("minidiff: error:")]
    assert len(lines) == 1, log[-3000:]
    line = lines[0]
    assert ("rank 0 of 2 was stopped (SIGTERM)" in line and "run the same command again to resume" in line) or (
        "DistributedRunError: rank 0/2" in line and "rerun resumes" in line), line
    assert "ChildFailedError" in log, log[-3000:]
    assert log.index(line) < log.index("Traceback") < log.index("ChildFailedError"), log[-3000:]
    assert "exitcode  : -9" in log  # torchrun names the killed rank as the root cause
    assert not (tmp_path / "out" / "results.json").exists()
