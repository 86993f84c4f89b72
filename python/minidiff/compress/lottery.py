"""Lottery tickets by iterative magnitude pruning (IMP) with rewinding.

Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis"), with rewinding to the
pre-trained weights as Chen et al. 2020 do for BERT ("The Lottery Ticket
Hypothesis for Pre-trained BERT Networks"), or to the weights after a few
training steps (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery
Ticket Hypothesis").

For ``R`` rounds and final sparsity ``s`` the cumulative target after round ``r``
is ``s_r = 1 - (1 - s)^(r / R)`` (the same fraction of the survivors pruned each
round). Round ``r``: train the masked network, prune the smallest-magnitude
survivors to reach ``s_r`` (masks are nested: a pruned weight stays pruned),
rewind every weight to the rewind point and re-apply the mask. After the last
round the ticket is trained once more (``train_final=True``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .pruning import PRUNABLE, check_sparsity, magnitude_masks, select_layers
from .training import Data, apply_masks, train
from minidiff.models.saved import Variant, clone_model, make_manifest, sparsity_report
from minidiff.validation import check_module_has_data

FinetuneFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], None]


def mask_sha256(masks: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the masks' bits in name order: equal hashes mean identical masks."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to(torch.bool).reshape(-1).cpu().numpy().tobytes())
    return h.hexdigest()


def schedule(sparsity: float, rounds: int) -> list[float]:
    """Cumulative sparsity after each round: ``s_r = 1 - (1 - s)^(r / R)``."""
    s = check_sparsity(sparsity)
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [1.0 - (1.0 - s) ** (r / rounds) for r in range(1, int(rounds) + 1)]


def lottery_ticket(model: nn.Module, *, data: Data | None = None, finetune: FinetuneFn | None = None,
                   sparsity: float = 0.5, rounds: int = 3, scope: str = "global",
                   layers: str | Sequence[str] | None = None, rewind: str | int | Mapping[str, torch.Tensor] = "pretrained",
                   train_final: bool = True, seed: int = 0, source_id: str | None = None,
                   **train_kwargs: Any) -> Variant:
    """Find a winning ticket of ``model`` (left untouched) by IMP with rewinding.

    Parameters
    ----------
    model : nn.Module
        The pre-trained (or initial) network.
    data : (inputs, labels), optional
        Training data for the built-in trainer (``epochs``, ``lr``, ``batch_size``
        ... go in ``train_kwargs``).
    finetune : callable(model, masks), optional
        Your own training loop instead of the built-in one; it must keep masked
        weights at zero (they are re-zeroed after it returns either way).
    sparsity, rounds, scope, layers
        Final sparsity, number of IMP rounds, ``"global"``/``"layer"`` ranking, which layers.
    rewind
        ``"pretrained"``: the weights of ``model`` (Chen et al. 2020);
        an int ``k``: the weights after ``k`` steps of the first training run
        (built-in trainer only); or a state dict.
    train_final : bool
        Train the final ticket (from the rewound weights, with its mask).
    seed : int
        Seeds every training run (round ``r`` uses ``seed + r``).

    Returns
    -------
    Variant
        ``manifest["schedule"]``: per round the target and achieved sparsity and
        the mask's sha256; ``variant.masks``: the final keep-masks.
    """
    check_module_has_data(model)
    if (data is None) == (finetune is None):
        raise ValueError("pass exactly one of data=(inputs, labels) for the built-in trainer or finetune=callable")
    targets = schedule(sparsity, rounds)
    net = clone_model(model)
    names = select_layers(net, layers, PRUNABLE)
    mods = dict(net.named_modules())
    pnames = [f"{n}.weight" for n in names]
    masks = {p: torch.ones_like(mods[n].weight, dtype=torch.bool) for p, n in zip(pnames, names)}

    rewind_state: dict[str, torch.Tensor] | None
    early_steps = None
    if isinstance(rewind, str):
        if rewind != "pretrained":
            raise ValueError(f"rewind must be 'pretrained', an int number of steps, or a state dict; got {rewind!r}")
        rewind_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    elif isinstance(rewind, int) and not isinstance(rewind, bool):
        if finetune is not None:
            raise ValueError("early rewinding (rewind=int) needs the built-in trainer (data=...)")
        if rewind < 0:
            raise ValueError(f"rewind steps must be >= 0, got {rewind}")
        early_steps = int(rewind)
        rewind_state = {k: v.detach().clone() for k, v in net.state_dict().items()} if early_steps == 0 else None
    elif isinstance(rewind, Mapping):
        own = net.state_dict()
        if set(rewind) != set(own) or any(tuple(rewind[k].shape) != tuple(own[k].shape) for k in own):
            raise ValueError("rewind state dict does not match the model's parameters (names or shapes)")
        rewind_state = {k: v.detach().clone() for k, v in rewind.items()}
    else:
        raise ValueError(f"rewind must be 'pretrained', an int number of steps, or a state dict; got {type(rewind)}")

    def run_training(r: int) -> None:
        nonlocal rewind_state
        if finetune is not None:
            finetune(net, masks)
            apply_masks(net, masks)
            return
        cb = None
        if rewind_state is None:
            def cb(step: int, m: nn.Module) -> None:
                nonlocal rewind_state
                if step == early_steps and rewind_state is None:
                    rewind_state = {k: v.detach().clone() for k, v in m.state_dict().items()}
        train(net, data, seed=seed + r, masks=masks, callback=cb, **train_kwargs)
        if rewind_state is None:
            raise ValueError(f"rewind={early_steps} steps but the first training run made fewer steps")

    record: list[dict[str, Any]] = []
    for r, target in enumerate(targets, start=1):
        run_training(r)
        weights = {p: mods[n].weight for p, n in zip(pnames, names)}
        masks = magnitude_masks(weights, target, scope, protected=masks)
        net.load_state_dict(rewind_state)
        apply_masks(net, masks)
        rep = sparsity_report(net, masks)
        record.append({"round": r, "target_sparsity": target, "achieved_sparsity": rep["overall"],
                       "per_layer": rep["per_layer"], "mask_sha256": mask_sha256(masks)})
    if train_final:
        run_training(len(targets) + 1)
    net.eval()
    params = {"sparsity": sparsity, "rounds": rounds, "scope": scope, "layers": names,
              "rewind": rewind if not isinstance(rewind, Mapping) else "state_dict",
              "trainer": "built-in" if finetune is None else getattr(finetune, "__qualname__", "user"),
              "train_final": train_final, **train_kwargs}
    man = make_manifest("lottery_ticket", params, seed, model, net, masks=masks, source_id=source_id,
                        extra={"schedule": record})
    return Variant(net, man, masks=masks, tokenizer=getattr(model, "tokenizer", None))
