"""Attacks on continuous inputs (images, tabular rows): FGSM and PGD.

FGSM (Goodfellow et al. 2015, "Explaining and harnessing adversarial examples"):
``x' = clip(x + eps * sign(grad_x L(f(x), y)))``.

PGD (Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks"):
start from ``x + u`` with ``u`` uniform in the eps-ball (random start), then ``steps`` times

- L-infinity: ``x' <- Proj_inf(x' + alpha * sign(g))``, ``Proj_inf`` clamps ``x' - x`` to
  ``[-eps, eps]`` element-wise;
- L2: ``x' <- Proj_2(x' + alpha * g / ||g||_2)``, ``Proj_2`` rescales ``x' - x`` to norm
  ``<= eps``;

and finally clips into the valid input range. ``L`` is the per-example cross-entropy and
``g = grad_x L``. All examples of a batch move together (one forward + backward per step).

Where a model has no input gradient the gradient ``g`` comes from elsewhere (see
:func:`gradient_source`): the base model's gradient (a *surrogate*, transfer-style attack)
or an SPSA estimate (Uesato et al. 2018, "Adversarial risk and the dangers of evaluating
against weak attacks"): ``g ~= mean_k [L(x + c u_k) - L(x - c u_k)] / (2c) * u_k`` over
random +-1 directions ``u_k``, from queries alone. A zero gradient is never used silently.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GradFn = Callable[[Tensor, Tensor], Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def per_example_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example, in float32 or wider."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="none")


def autograd_gradient(model: nn.Module) -> GradFn:
    """``g(x, y) = grad_x sum_i L(f(x_i), y_i)`` through ``model`` by autograd."""
    dev = model_device(model)

    def grad(x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            xr = x.detach().to(dev).requires_grad_(True)
            logits = model(xr)
            if not isinstance(logits, Tensor) or logits.grad_fn is None:
                raise GradientUnavailable("the model output does not depend differentiably on its input")
            loss = per_example_loss(logits, y.to(dev)).sum()
            (g,) = torch.autograd.grad(loss, xr)
        return g.to(x.device)

    return grad


class GradientUnavailable(RuntimeError):
    """Raised when a model has no usable input gradient (no backward, or identically zero)."""


@contextmanager
def graph_breaks(model: nn.Module, found: list[str]) -> Iterator[None]:
    """Record submodules that cut the autograd graph during a forward pass.

    A module whose input requires grad but whose floating-point outputs do not
    (an int8 kernel without backward, a ``.detach()``) removes its path from the
    input gradient. Behind a residual connection the gradient is then not zero but
    incomplete, which no check on the gradient itself can see; the names of such
    modules are appended to ``found``.
    """
    def hook(name: str) -> Callable:
        def record(mod: nn.Module, inputs: tuple, output) -> None:
            if not torch.is_grad_enabled():
                return
            if not any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
                return
            outs = output if isinstance(output, (tuple, list)) else (output,)
            floats = [t for t in outs if isinstance(t, Tensor) and t.is_floating_point()]
            if floats and not any(t.requires_grad for t in floats):
                found.append(f"{name} ({type(mod).__name__})")
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def graph_break_reason(found: list[str]) -> Optional[str]:
    """The probe's message for modules found by :func:`graph_breaks`, or None."""
    if not found:
        return None
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return (f"module {found[0]}{more} has no backward (its output does not depend differentiably on its "
            "input), so autograd would return an incomplete input gradient")


def probe_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Optional[str]:
    """Check that ``model`` has a usable input gradient on a probe batch.

    Returns ``None`` when it does, else a short reason: the output has no ``grad_fn``
    (e.g. computed under ``no_grad`` or by an int8 kernel without backward), backward
    raises, or the gradient is identically zero or not finite on every probe example
    (e.g. a rounding step with zero derivative), which would make a gradient attack
    silently do nothing; or a submodule cuts the graph (see :func:`graph_breaks`),
    which would make it silently weaker.
    """
    found: list[str] = []
    try:
        with graph_breaks(model, found):
            g = autograd_gradient(model)(x, y)
    except GradientUnavailable as exc:
        return str(exc)
    except (RuntimeError, NotImplementedError) as exc:  # backward not implemented
        return f"backward failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if not torch.isfinite(g).all():
        return "the input gradient has non-finite values"
    if not bool(g.ne(0).any()):
        return "the input gradient is identically zero on the probe batch"
    return graph_break_reason(found)


def loss_of(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, y) -> per-example loss`` of ``model`` (no gradient), on the input's device."""
    dev = model_device(model)

    @torch.no_grad()
    def fn(x: Tensor, y: Tensor) -> Tensor:
        return per_example_loss(model(x.to(dev)), y.to(dev)).to(x.device)

    return fn


def spsa_gradient(loss_fn: Callable[[Tensor, Tensor], Tensor], *, samples: int, delta: float,
                  generator: torch.Generator, batch_size: int) -> tuple[GradFn, list]:
    """SPSA estimate of ``grad_x L`` from ``2 * samples`` queries per example.

    ``loss_fn(x, y)`` returns the per-example loss without gradient. Returns the gradient
    function and a one-element list counting the queries spent.
    """
    counter = [0]

    @torch.no_grad()
    def grad(x: Tensor, y: Tensor) -> Tensor:
        b = x.shape[0]
        u = torch.randint(0, 2, (samples,) + tuple(x.shape), generator=generator).to(x) * 2 - 1
        probes = torch.cat([(x.unsqueeze(0) + delta * u), (x.unsqueeze(0) - delta * u)])
        probes = probes.reshape((2 * samples * b,) + tuple(x.shape[1:]))
        yy = y.repeat(2 * samples)
        loss = torch.cat([loss_fn(probes[s:s + batch_size], yy[s:s + batch_size])
                          for s in range(0, probes.shape[0], batch_size)]).reshape(2, samples, b)
        diff = (loss[0] - loss[1]) / (2 * delta)  # (samples, b)
        counter[0] += 2 * samples * b
        shape = (samples, b) + (1,) * (x.dim() - 1)
        return (diff.reshape(shape) * u).mean(0)

    return grad, counter


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def random_start(x: Tensor, epsilon: float, norm: str, generator: torch.Generator) -> Tensor:
    """A uniformly random point of the ``norm`` ball of radius ``epsilon`` (drawn on CPU)."""
    shape = tuple(x.shape)
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
        return (u * epsilon).to(x)
    d = x[0].numel()
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    z = z / _flat_norm(z).clamp_min(1e-300)
    r = torch.rand((shape[0],), generator=generator, dtype=torch.float64) ** (1.0 / d)
    return (z * (r * epsilon).reshape((-1,) + (1,) * (len(shape) - 1))).to(x)


def project(delta: Tensor, epsilon: float, norm: str) -> Tensor:
    """Project a perturbation onto the ``norm`` ball of radius ``epsilon``."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    n = _flat_norm(delta)
    scale = torch.where(n > epsilon, epsilon / n.clamp_min(1e-30), torch.ones_like(n))
    return delta * scale


@dataclass
class PGDResult:
    x_adv: Tensor
    #: per-example loss of the attacked model before each step and after the last (steps + 1)
    trace: list = field(default_factory=list)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, epsilon: float, norm: str, steps: int,
        alpha: float, random_init: bool, generator: Optional[torch.Generator],
        clip: Optional[tuple[float, float]] = None, grad_fn: Optional[GradFn] = None,
        return_trace: bool = False) -> PGDResult:
    """Projected gradient descent (ascent on the loss) in the L-inf or L2 ball.

    Parameters
    ----------
    model : nn.Module
        Maps a float batch to logits. Evaluated for the trace only; the gradient comes from
        ``grad_fn`` (default: autograd through ``model``).
    x, y : Tensor
        Clean inputs (B, ...) and integer labels (B,).
    epsilon : float
        Ball radius (absolute, input units). ``0`` returns ``x`` unchanged.
    norm : {"linf", "l2"}
    steps : int
        Number of gradient steps; FGSM is ``steps=1, alpha=epsilon, random_init=False``.
    alpha : float
        Absolute step size.
    random_init : bool
        Start from a random point of the ball (drawn from ``generator``).
    clip : (float, float), optional
        Valid input range.
    grad_fn : callable, optional
        ``(x, y) -> grad_x L``; the surrogate or SPSA gradient for models without one.
    return_trace : bool
        Record the attacked model's per-example loss at every iterate (``steps + 1`` entries).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    grad_fn = grad_fn or autograd_gradient(model)
    x = x.detach()
    trace = []
    if epsilon == 0:
        if return_trace:
            trace = [_loss(model, x, y)] * (steps + 1)
        return PGDResult(x.clone(), trace)
    delta = random_start(x, epsilon, norm, generator) if random_init else torch.zeros_like(x)
    x_adv = _clip(x + delta, clip)
    for _ in range(steps):
        if return_trace:
            trace.append(_loss(model, x_adv, y))
        g = grad_fn(x_adv, y)
        if norm == "linf":
            step = alpha * g.sign()
        else:
            step = alpha * g / _flat_norm(g).clamp_min(1e-30)
        delta = project(x_adv + step - x, epsilon, norm)
        x_adv = _clip(x + delta, clip).detach()
    if return_trace:
        trace.append(_loss(model, x_adv, y))
    return PGDResult(x_adv, trace)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, epsilon: float,
         clip: Optional[tuple[float, float]] = None, grad_fn: Optional[GradFn] = None) -> Tensor:
    """Fast gradient sign method: one L-inf step of size ``epsilon`` from ``x``."""
    return pgd(model, x, y, epsilon=epsilon, norm="linf", steps=1, alpha=epsilon,
               random_init=False, generator=None, clip=clip, grad_fn=grad_fn).x_adv


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return loss_of(model)(x, y)


def _clip(x: Tensor, clip: Optional[tuple[float, float]]) -> Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


def perturbation_norm(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """Per-example size of ``x_adv - x`` in the attack's norm (float64)."""
    d = (x_adv.double() - x.double()).flatten(1)
    return d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)
