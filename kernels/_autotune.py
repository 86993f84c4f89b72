"""Autotune spaces shared by the Triton GEMM-shaped kernels."""

from __future__ import annotations

from typing import Sequence

import triton

from minidiff._env import triton_interpreting

#: True when kernels run under the Triton CPU interpreter (tests on machines without CUDA).
INTERPRET = triton_interpreting()


def tile_configs(tiles: Sequence[tuple[int, int, int, int, int]], group_m: int = 8) -> list[triton.Config]:
    """``triton.Config`` list from ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` rows.

    The interpreter gets one 32x32x32 config instead: it does not benchmark, and tiles
    below 32 are very slow there.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                          num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in tiles]
