"""Knowledge distillation into a smaller student (Hinton et al. 2015; DistilBERT,
Sanh et al. 2019, for the every-other-layer initialisation).

Loss per batch, with teacher logits ``t``, student logits ``z``, labels ``y``,
temperature ``T`` and weight ``alpha``::

    L = alpha * T^2 * KL( softmax(t / T) || softmax(z / T) ) + (1 - alpha) * CE(z, y)

The ``T^2`` factor keeps the soft-target gradients on the scale of the hard-label
ones as ``T`` changes (Hinton et al. 2015, section 2).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .training import Data, call, check_data, reinitialize, seeded, train
from minidiff.models.saved import Variant, clone_model, make_manifest
from minidiff.validation import check_module_has_data


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Soft-target KD loss plus hard-label cross-entropy (formula in the module docstring)."""
    t = float(temperature)
    z = student_logits.float()
    soft = F.kl_div(F.log_softmax(z / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(z, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer block list (``encoder.layer`` in BERT-family models)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (name.endswith("encoder.layer") or name.endswith(".layers")
                                               or name == "layers"):
            return name, mod
    return None


def _hidden_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def depth(model: nn.Module) -> int:
    """Transformer blocks for transformers, else the number of Linear layers."""
    found = _layer_list(model)
    return len(found[1]) if found else len(_hidden_linears(model))


def make_student(teacher: nn.Module, *, keep_layers: Sequence[int] | None = None, num_layers: int | None = None,
                 hidden: Sequence[int] | int | None = None, init: str = "teacher", seed: int = 0) -> nn.Module:
    """A smaller copy of ``teacher``.

    Transformers: keep the blocks ``keep_layers`` (default every other block,
    ``0, 2, 4, ...``; or ``num_layers`` evenly spaced), initialised from the
    teacher (``init="teacher"``) or re-drawn at random (``init="random"``).
    minidiff MLPs: ``make_mlp`` with the given ``hidden`` widths (default:
    half the teacher's), randomly initialised.
    """
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    found = _layer_list(teacher)
    if found is not None:
        name, blocks = found
        n_teacher = len(blocks)
        if keep_layers is None:
            if num_layers is None:
                keep_layers = list(range(0, n_teacher, 2))
            else:
                if num_layers > n_teacher:
                    raise ValueError(f"student with {num_layers} layers would be deeper than its teacher "
                                     f"({n_teacher} layers); choose num_layers <= {n_teacher}")
                if num_layers < 1:
                    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
                keep_layers = sorted({round(i * (n_teacher - 1) / max(num_layers - 1, 1)) for i in range(num_layers)})
        keep = [int(i) for i in keep_layers]
        if len(keep) > n_teacher:
            raise ValueError(f"student with {len(keep)} layers would be deeper than its teacher ({n_teacher})")
        if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n_teacher for i in keep):
            raise ValueError(f"keep_layers must be distinct indices in [0, {n_teacher}), got {list(keep_layers)}")
        student = clone_model(teacher)
        parent_name, _, child = name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        old = getattr(parent, child)
        setattr(parent, child, nn.ModuleList([old[i] for i in keep]))
        for m in student.modules():  # configs are shared objects inside a model: update each once
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "num_hidden_layers"):
                cfg.num_hidden_layers = len(keep)
        for j, blk in enumerate(getattr(parent, child)):
            for sub in blk.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = j
        if init == "random":
            reinitialize(student, seed)
        return student
    from minidiff.models.classifier import MLP, make_mlp

    if isinstance(teacher, MLP):
        arch = teacher.architecture()
        widths = hidden if hidden is not None else [max(1, h // 2) for h in arch["hidden"]]
        widths = [int(widths)] if isinstance(widths, int) else [int(h) for h in widths]
        if len(widths) > len(arch["hidden"]):
            raise ValueError(f"student with {len(widths)} hidden layers would be deeper than its teacher "
                             f"({len(arch['hidden'])})")
        with seeded(seed):
            return make_mlp(arch["in_features"], widths, arch["num_classes"])
    raise ValueError(f"cannot build a student for {type(teacher).__name__}: pass student= explicitly")


def distill(teacher: nn.Module, data: Data, *, student: nn.Module | None = None,
            keep_layers: Sequence[int] | None = None, num_layers: int | None = None,
            hidden: Sequence[int] | int | None = None, temperature: float = 2.0, alpha: float = 0.5,
            epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, seed: int = 0, init: str = "teacher",
            source_id: str | None = None, **train_kwargs: Any) -> Variant:
    """Distil ``teacher`` into a smaller student trained on ``data`` (``(inputs, labels)``).

    Parameters
    ----------
    teacher : nn.Module
        Left untouched (kept in eval mode for its soft targets).
    student : nn.Module, optional
        Your own student (copied, not modified); must not be deeper than the teacher.
    keep_layers, num_layers, hidden, init
        How to build the student when none is given (see :func:`make_student`).
    temperature, alpha
        ``T`` and the soft-target weight in the KD loss.
    epochs, lr, batch_size, seed, **train_kwargs
        Passed to :func:`minidiff.compress.training.train`.

    Returns
    -------
    Variant
        ``manifest["student_layers"]`` lists the teacher blocks kept.
    """
    check_module_has_data(teacher, "teacher")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and alpha in [0, 1]; got {temperature}, {alpha}")
    check_data(data)
    if student is not None:
        if depth(student) > depth(teacher):
            raise ValueError(f"student is deeper than its teacher ({depth(student)} > {depth(teacher)} layers)")
        new = clone_model(student)
    else:
        new = make_student(teacher, keep_layers=keep_layers, num_layers=num_layers, hidden=hidden, init=init,
                           seed=seed)
    teacher_flags = [(m, m.training) for m in teacher.modules()]
    teacher.eval()

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            t_logits = call(teacher, inputs)
        if logits.ndim != 2 or t_logits.shape != logits.shape:
            raise ValueError(f"distillation needs classifier logits (batch, classes) from teacher and student; "
                             f"got teacher {tuple(t_logits.shape)}, student {tuple(logits.shape)} (wrap an encoder "
                             "in minidiff.models.TextClassifier)")
        return kd_loss(logits, t_logits, labels, temperature, alpha)

    try:
        res = train(new, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, loss_fn=loss_fn,
                    **train_kwargs)
    finally:
        for m, flag in teacher_flags:
            m.training = flag
    new.eval()
    found = _layer_list(teacher)
    if student is None and found is not None:
        n_t = len(found[1])
        kept = list(keep_layers) if keep_layers is not None else (
            list(range(0, n_t, 2)) if num_layers is None else
            sorted({round(i * (n_t - 1) / max(num_layers - 1, 1)) for i in range(num_layers)}))
    else:
        kept = None
    params = {"temperature": temperature, "alpha": alpha, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "init": init if student is None else "user", "hidden": hidden, **train_kwargs}
    man = make_manifest("distill", params, seed, teacher, new, source_id=source_id,
                        extra={"student_layers": kept, "teacher_depth": depth(teacher), "student_depth": depth(new),
                               "train_steps": res.steps, "final_loss": res.losses[-1] if res.losses else None})
    return Variant(new, man, tokenizer=getattr(teacher, "tokenizer", None))
