"""Accumulators: streaming metric state that adds.

Every accumulator (CKA statistics, agreement counts, histograms, per-example
outputs) is a set of named tensor states, each declaring how it reduces across
shards. ``merge`` and distributed synchronisation (``minidiff.distributed``) are
written once, here and there, from those declarations; a new metric declares its
states and never writes communication code. Shape borrowed from torchmetrics.

Reductions
----------
``"sum"``: states add (sums of products, counts).
``"cat"``: per-example states concatenated along dim 0 in shard order; shards
are contiguous blocks of examples, so shard order is example order.
``"max"`` / ``"min"``: elementwise extremes.
a callable ``fn``: ``fn(stacked)`` reduces the states of k shards stacked along a new
dim 0, ``(k, *shape) -> shape`` (e.g. ``lambda s: s.logsumexp(0)``). It must give the
same result however the shards are grouped (merge applies it to pairs, distributed
sync to all ranks at once), and every shard's state must have the same shape.

Lifecycle (the contract :class:`~minidiff.distributed.DistContext` relies on, so it
never needs to know an accumulator's class)
------------------------------------------------------------------------------
``update`` / ``compute`` / ``reset``; ``merge`` (fold another shard in);
``state_dict`` / ``load_state_dict``; ``to(device)``;
``_pre_sync(ctx)`` runs on every rank before the declared reductions, ``_post_sync(ctx)``
after them (e.g. to bring states taken in different frames to a common one, using
``ctx``'s generic collectives); ``_agree_before_update(ctx, first_batch)`` lets an
accumulator agree on a frame with the other ranks before it sees data.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Union

import torch

from minidiff.validation import check_device

Reduction = Union[Literal["sum", "cat", "max", "min"], Callable[[torch.Tensor], torch.Tensor]]
_REDUCTIONS = ("sum", "cat", "max", "min")


class Accumulator:
    """Base class for mergeable streaming state.

    Subclasses call :meth:`add_state` in ``__init__``, update states in
    ``update`` and read them in ``compute``. ``config()`` returns the settings
    that two accumulators must share to be merged (e.g. layer widths).
    """

    def __init__(self) -> None:
        self._reductions: dict[str, Reduction] = {}
        self._defaults: dict[str, torch.Tensor | tuple] = {}

    # -- declaration ---------------------------------------------------------
    def add_state(self, name: str, default: torch.Tensor, reduce: Reduction) -> None:
        """Declare a state; it starts as a copy of ``default``, which ``reset`` restores."""
        if not callable(reduce) and reduce not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduce!r} for state {name!r}; use one of {_REDUCTIONS} "
                             "or a callable reducing stacked shard states (k, *shape) -> shape")
        if not isinstance(default, torch.Tensor):
            raise TypeError(f"state {name!r} needs a torch.Tensor default, got {type(default).__name__}")
        self._reductions[name] = reduce
        default = default.detach()
        flat = default.reshape(-1)
        if flat.numel() > 0 and bool((flat == flat[0]).all()):
            # a constant default (zeros, -inf) is kept as its fill value, not as a second
            # copy of a state that may be hundreds of MB (the CKA cross-product)
            self._defaults[name] = (tuple(default.shape), default.dtype, flat[0].item())
        else:
            self._defaults[name] = default.clone()
        setattr(self, name, default.clone())

    @property
    def reductions(self) -> dict[str, Reduction]:
        """State name -> reduction, the single source distributed sync reads."""
        return dict(self._reductions)

    def config(self) -> dict[str, Any]:
        """Settings that must be equal for two accumulators to merge."""
        return {}

    # -- lifecycle -----------------------------------------------------------
    def update(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def compute(self) -> Any:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Accumulator":
        """Move every state to ``device`` (in place) and return self. Subclasses holding
        other tensors (scratch buffers, shifts) extend this."""
        device = check_device(device, "device")
        for name in self._reductions:
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, t.to(device))
        return self

    # -- hooks around a distributed sync (no-ops by default) ------------------
    def _pre_sync(self, ctx: Any) -> None:
        """Called on every rank by ``DistContext.sync`` before the states are reduced."""

    def _post_sync(self, ctx: Any) -> None:
        """Called on every rank by ``DistContext.sync`` after the states are reduced."""

    def _agree_before_update(self, ctx: Any, first_batch: Callable[[], Any]) -> None:
        """Called on every rank by ``DistContext.prepare`` before any update: agree with
        the other ranks on anything the states are taken relative to. ``first_batch()``
        returns the data set's first batch (call it on one rank at most)."""

    def reset(self) -> None:
        for name, default in self._defaults.items():
            device = getattr(self, name).device
            if isinstance(default, tuple):
                shape, dtype, fill = default
                setattr(self, name, torch.full(shape, fill, dtype=dtype, device=device))
            else:
                setattr(self, name, default.clone().to(device))

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Fold ``other``'s states into this one (in place) and return self.

        Merging the accumulators of two disjoint streams equals one accumulator
        that saw both streams (this one's examples first for ``"cat"`` states).
        """
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.config() != self.config():
            raise ValueError(f"cannot merge accumulators with different settings: "
                             f"{self.config()} vs {other.config()}")
        for name, red in self._reductions.items():
            setattr(self, name, reduce_pair(getattr(self, name), getattr(other, name).to(getattr(self, name).device), red))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._reductions}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._reductions) - set(state)
        extra = set(state) - set(self._reductions)
        if missing or extra:
            raise ValueError(f"state dict does not match {type(self).__name__}: "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in self._reductions:
            current = getattr(self, name)
            value = state[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state {name!r} must be a torch.Tensor, got {type(value).__name__}")
            if self._reductions[name] != "cat" and value.shape != current.shape:
                raise ValueError(f"state {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(current.shape)} for this accumulator's settings")
            setattr(self, name, value.to(device=current.device, dtype=current.dtype).clone())


def reduce_pair(a: torch.Tensor, b: torch.Tensor, reduce: Reduction) -> torch.Tensor:
    """Combine two states of one reduction kind."""
    if callable(reduce):
        if a.shape != b.shape:
            raise ValueError(f"a callable reduction needs states of one shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        return reduce(torch.stack([a, b]))
    if reduce == "sum":
        return a + b
    if reduce == "cat":
        return torch.cat([a, b], dim=0)
    if reduce == "max":
        return torch.maximum(a, b)
    if reduce == "min":
        return torch.minimum(a, b)
    raise ValueError(f"unknown reduction {reduce!r}")
