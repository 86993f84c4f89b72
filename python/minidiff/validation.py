"""Validation rules shared by the study, the command line and the models.

Engine-level argument checks live beside the engines (``minidiff.metrics._checks``,
``minidiff.ops._validate``); this module holds the rules about the environment
that several entry points share, so that each exists once.
"""

from __future__ import annotations

import torch


def check_device(device: str | torch.device, where: str = "") -> torch.device:
    """Parse ``device`` and check that this machine has it (``where`` prefixes the message).

    Raises
    ------
    ValueError
        For a string torch cannot parse, a CUDA device on a machine without CUDA
        (or with fewer devices than the index asks for), or an MPS device where
        MPS is unavailable. The message says what to use instead.
    """
    pre = f"{where}: " if where else ""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{pre}{device!r} is not a device name ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{pre}{device!r} asked for CUDA, but this machine has no usable CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{pre}{device!r} does not exist; this machine has {n} CUDA device(s) "
                             f"(cuda:0 .. cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{pre}{device!r} is not available on this machine; use 'cpu'")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{pre}device type {dev.type!r} is not supported by minidiff; use 'cpu' or 'cuda'")
    if dev.type == "meta":
        raise ValueError(f"{pre}the 'meta' device holds no data, so nothing can be measured on it; use 'cpu'")
    return dev
