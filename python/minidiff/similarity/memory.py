"""Memory of the streaming CKA statistics: a formula, and a check before allocating."""

from __future__ import annotations

from typing import Sequence

from minidiff._units import human_bytes
from minidiff.ops.selfgram import STACKED_MAX_BLOCKS, pending_numel


def cka_state_bytes(dims_a: Sequence[int], dims_b: Sequence[int] | None = None, *,
                    float32_inputs: bool = True) -> int:
    """Bytes a :class:`~minidiff.similarity.CKAAccumulator` (exact estimators) holds,
    independent of the number of samples (``CKAAccumulator.nbytes()`` after an update).

    Two models, ``D = sum(d)`` the stacked width and ``L`` the layer count::

        8 * (D_a D_b + sum_a d^2 + sum_b d^2                       # C and the per-layer Grams
             + L_a D_b + L_b D_a + L_a L_b + 3 D_a + 3 D_b + 2 L_a + 2 L_b + 3)
        + 4 * D_a D_b                              # pending float32 sums of C (float32 features)
        + s * (T_a + T_b)                          # pending upper-block Gram sums

    with ``s`` the input's item size (4 for float32, 8 for float64) and ``T`` about
    ``sum d^2 / 2`` (exactly ``minidiff.ops.selfgram.pending_numel``).
    One model with itself (``dims_b=None``): ``8 (D^2 + L D + L^2 + 3 D + L + 3) + 4 T``
    with float32 features, ``T ~ D^2 / 2`` the upper block triangle of ``Z^T Z``
    (``pending_numel([D], STACKED_MAX_BLOCKS)``); float64 features add into ``C`` directly.
    Per update add the shifted stacked batch, ``b (D_a + D_b)`` values of the input dtype.
    """
    da, la = sum(int(d) for d in dims_a), len(dims_a)
    if dims_b is None:
        pending = 4 * pending_numel([da], STACKED_MAX_BLOCKS) if float32_inputs else 0
        return 8 * (da * da + la * da + la * la + 3 * da + la + 3) + pending
    db, lb = sum(int(d) for d in dims_b), len(dims_b)
    big = da * db + sum(int(d) ** 2 for d in dims_a) + sum(int(d) ** 2 for d in dims_b)
    small = la * db + lb * da + la * lb + 3 * da + 3 * db + 2 * la + 2 * lb + 3
    grams = (4 if float32_inputs else 8) * (pending_numel(dims_a) + pending_numel(dims_b))
    return 8 * (big + small) + (4 * da * db if float32_inputs else 0) + grams


def check_state_fits(dims_a: Sequence[int], dims_b: Sequence[int] | None, available: int | None) -> None:
    """Refuse, with the memory formula, statistics that cannot be allocated.

    ``available``: bytes the device can give (None: unknown, no check). The float64
    states alone need ``8 (D_a D_b + sum d_a^2 + sum d_b^2)`` bytes (``8 D^2`` for a
    model with itself), before any partial-sum buffer.
    """
    if available is None:
        return
    need = cka_state_bytes(dims_a, dims_b, float32_inputs=False)
    if need <= available:
        return
    da = sum(int(d) for d in dims_a)
    if dims_b is None:
        formula = f"8 * D^2 = 8 * {da}^2"
    else:
        db = sum(int(d) for d in dims_b)
        formula = f"8 * (D_a * D_b + sum d_a^2 + sum d_b^2) = 8 * ({da} * {db} + ...)"
    raise ValueError(
        f"the CKA statistics for these layer widths need {human_bytes(need)} ({formula} bytes plus small "
        f"vectors; see minidiff.similarity.cka_state_bytes), more than the {human_bytes(available)} available. "
        "Capture fewer or narrower layers (e.g. pool token or spatial dimensions), or split model b's "
        "layers across ranks with minidiff.similarity.LayerSplitCKA")


def available_bytes(device) -> int | None:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` on CUDA, physical memory
    (``MemAvailable`` when Linux reports it) on the CPU; None when unknown."""
    import os

    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
