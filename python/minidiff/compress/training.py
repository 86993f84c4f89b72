"""A small, seeded, CPU-friendly trainer for classifiers.

Used to fine-tune heads, train lottery tickets and distilled students, and by the
study demo to train populations. Determinism: the data order comes from a
``torch.Generator`` seeded with ``seed`` and the model's own randomness (dropout)
from a forked global RNG seeded with ``seed``; the same seed on the same machine
gives bit-identical weights.

Data is ``(inputs, labels)``: ``inputs`` a tensor ``(N, ...)`` (``model(x)``) or a
dict of tensors with first dimension N (``model(**inputs)``), ``labels`` a long
tensor ``(N,)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from tqdm.auto import tqdm
from torch import nn

from minidiff.models.saved import Variant, clone_model, make_manifest

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
Data = tuple[Inputs, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, Inputs], torch.Tensor]


def check_data(data: Any, name: str = "data") -> tuple[Inputs, torch.Tensor, int]:
    """Validate ``(inputs, labels)``; returns them and N."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{name} must be a tuple (inputs, labels), got {type(data).__name__}")
    inputs, labels = data
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    if isinstance(inputs, Mapping):
        for k, v in inputs.items():
            if not isinstance(v, torch.Tensor) or v.shape[0] != n:
                raise ValueError(f"{name} input {k!r} must be a tensor with first dimension {n}")
    elif not isinstance(inputs, torch.Tensor) or inputs.shape[0] != n:
        raise ValueError(f"{name} inputs must be a tensor (or dict of tensors) with first dimension {n}")
    if n == 0:
        raise ValueError(f"{name} is empty")
    return inputs, labels.long(), n


def take(inputs: Inputs, idx: torch.Tensor) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, ``.logits``, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    lg = getattr(output, "logits", None)
    if isinstance(lg, torch.Tensor):
        return lg
    from minidiff.models.capture import first_tensor

    return first_tensor(output)


def call(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return logits_of(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


def iterate(data: Data, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
            ) -> Iterator[tuple[Inputs, torch.Tensor]]:
    inputs, labels, n = check_data(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield take(inputs, idx), labels[idx]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    steps: int = 0


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
    """Zero the pruned weights: ``p <- p * mask`` for every masked parameter."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            if name not in params:
                raise ValueError(f"mask for unknown parameter {name!r}")
            params[name].mul_(m.to(params[name].dtype))


def train(model: nn.Module, data: Data, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 32,
          seed: int = 0, masks: Mapping[str, torch.Tensor] | None = None, loss_fn: LossFn | None = None,
          weight_decay: float = 0.0, optimizer: str = "adam", max_steps: int | None = None,
          trainable: Callable[[str], bool] | None = None,
          callback: Callable[[int, nn.Module], None] | None = None, progress: bool = False) -> TrainResult:
    """Train ``model`` in place with cross-entropy (or ``loss_fn(logits, labels, inputs)``).

    ``masks`` (parameter name -> 0/1 tensor) are enforced after every step, so
    pruned weights stay exactly zero. ``trainable(name) -> bool`` freezes the
    others (e.g. train only the head). ``callback(step, model)`` runs after
    each step (used for early rewinding). The model's train/eval flags are
    restored afterwards. ``progress`` shows a bar over the epochs.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    check_data(data)
    params = [p for n, p in model.named_parameters() if p.requires_grad and (trainable is None or trainable(n))]
    if not params:
        raise ValueError("no trainable parameters")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    named = dict(model.named_parameters())
    masks = {k: v.to(named[k].device) for k, v in (masks or {}).items()}
    apply_masks(model, masks)
    gen = torch.Generator().manual_seed(int(seed))
    result = TrainResult()
    flags = [(m, m.training) for m in model.modules()]
    frozen = [(p, p.requires_grad) for n, p in model.named_parameters() if trainable is not None and not trainable(n)]
    for p, _ in frozen:
        p.requires_grad_(False)
    device = next(iter(params)).device
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model.train()
            for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False):
                for xb, yb in iterate(data, batch_size, shuffle=True, generator=gen):
                    xb = {k: v.to(device) for k, v in xb.items()} if isinstance(xb, Mapping) else xb.to(device)
                    yb = yb.to(device)
                    opt.zero_grad(set_to_none=True)
                    logits = call(model, xb)
                    loss = loss_fn(logits, yb, xb) if loss_fn is not None else nn.functional.cross_entropy(
                        logits.float(), yb)
                    if not torch.isfinite(loss):
                        raise ValueError(f"training loss became {loss.item()} at step {result.steps}; "
                                         "lower the learning rate")
                    loss.backward()
                    for name, m in masks.items():
                        g = named[name].grad
                        if g is not None:
                            g.mul_(m.to(g.dtype))
                    opt.step()
                    apply_masks(model, masks)
                    result.losses.append(float(loss.item()))
                    result.steps += 1
                    if callback is not None:
                        callback(result.steps, model)
                    if max_steps is not None and result.steps >= max_steps:
                        _check_diverged(result, params, lr)
                        return result
    finally:
        for m, flag in flags:
            m.training = flag
        for p, flag in frozen:
            p.requires_grad_(flag)
    _check_diverged(result, params, lr)
    return result


#: A loss spike this many times the starting loss, after which training ends no better than it
#: started, means the run diverged (typically every ReLU died: constant, all-zero features).
DIVERGENCE_SPIKE = 10.0


def _check_diverged(result: TrainResult, params: list[torch.Tensor], lr: float) -> None:
    """Refuse a model that training broke (non-finite weights, or a loss that exploded and
    never came back below where it started), before anything downstream fails on its
    dead or exploding features."""
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in params)
    if bad:
        raise ValueError(f"training diverged: {bad} weight(s) became NaN/Inf (learning rate {lr}); "
                         "lower the learning rate")
    n = len(result.losses)
    if n >= 10:
        k = max(1, n // 10)
        first, last, peak = result.losses[0], sum(result.losses[-k:]) / k, max(result.losses)
        if peak > DIVERGENCE_SPIKE * first and last >= first:
            raise ValueError(f"training diverged: the loss jumped from {first:.3g} to {peak:.3g} and ended at "
                             f"{last:.3g} (mean of the last {k} steps), no better than it started, with learning "
                             f"rate {lr}; lower the learning rate")


@torch.no_grad()
def predict(model: nn.Module, inputs: Inputs, *, batch_size: int = 256) -> torch.Tensor:
    """Logits for all inputs, in order, in eval mode (flags restored)."""
    from minidiff.models.capture import eval_mode

    n = next(iter(inputs.values())).shape[0] if isinstance(inputs, Mapping) else inputs.shape[0]
    outs = []
    with eval_mode(model):
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            outs.append(call(model, take(inputs, idx)).detach())
    return torch.cat(outs)


def accuracy(model: nn.Module, data: Data, *, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``(inputs, labels)``."""
    inputs, labels, _ = check_data(data)
    return float((predict(model, inputs, batch_size=batch_size).argmax(-1).cpu() == labels).double().mean())


def finetune(model: nn.Module, data: Data, *, seed: int = 0, masks: Mapping[str, torch.Tensor] | None = None,
             reinit: bool = False, source_id: str | None = None, **train_kwargs: Any) -> Variant:
    """A fine-tuned copy of ``model`` (seeded data order and dropout) as a Variant.

    The building block of base-model populations (Hooker et al. 2019 train each
    population member from a different seed): ``reinit=True`` also re-draws the
    initial weights from ``seed`` (training from scratch), e.g.
    ``population("finetune", make_mlp(), seeds, data, reinit=True, epochs=20)``.
    """
    new = clone_model(model)
    if reinit:
        reinitialize(new, seed)
    res = train(new, data, seed=seed, masks=masks, **train_kwargs)
    new.eval()
    man = make_manifest("finetune", {**train_kwargs, "reinit": reinit}, seed, model, new, masks=masks,
                        source_id=source_id,
                        extra={"train_steps": res.steps, "final_loss": res.losses[-1] if res.losses else None})
    return Variant(new, man, masks=dict(masks) if masks else None, tokenizer=getattr(model, "tokenizer", None))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Fork the global RNG and seed it (for seeded initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw ``model``'s weights in place (seeded) with each module's
    ``reset_parameters`` (PyTorch default initialisers): a random model of the
    same shape, e.g. the baseline a distilled student must beat."""
    with seeded(seed):
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model
