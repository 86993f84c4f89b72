"""White-box PGD on a text model's input embeddings (not a realizable text).

The perturbation ``delta`` lives on the word embeddings ``E(ids)`` of the non-special,
attended tokens; the model sees ``inputs_embeds = E(ids) + delta`` (position and segment
embeddings are added by the model as usual). Each token's perturbation is kept in an L2
ball of radius ``r = epsilon * mean_v ||E_v||_2`` (``E_v`` the rows of the base model's
embedding table), so ``epsilon`` is scale-free. Steps follow PGD-L2 per token
(Madry et al. 2018; applied to embeddings as in Zhu et al. 2020, "FreeLB"):
``delta_t <- Proj(delta_t + alpha * r * g_t / ||g_t||)``.

Results are reported separately from the discrete attack: an embedding perturbation
corresponds to no actual text, so it measures the geometry of the decision boundary, not a
realizable threat. Transfer applies the perturbation crafted on model i to model j's own
embeddings of the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .continuous import GradientUnavailable, graph_break_reason, graph_breaks, per_example_loss
from .textmodel import TextModel

EmbGradFn = Callable[[Tensor, Tensor], Tensor]  # (delta, y) -> grad wrt delta


@dataclass
class EmbeddingBatch:
    ids: Tensor
    mask: Tensor
    perturbable: Tensor  # (B, L, 1) float mask: attended and not a special token


def prepare(base: TextModel, texts: list[str]) -> EmbeddingBatch:
    ids, mask = base.encode(texts)
    special = torch.tensor(sorted(base.special_ids()) or [-1], device=ids.device)
    pert = (mask.bool() & ~torch.isin(ids, special)).unsqueeze(-1).float()
    return EmbeddingBatch(ids, mask, pert)


def embedding_radius(base: TextModel, epsilon: float) -> float:
    return float(epsilon * base.embedding_matrix().norm(dim=1).mean())


def embed_loss(model: TextModel, batch: EmbeddingBatch, y: Tensor, *, grad: bool) -> Callable:
    """``delta -> per-example loss`` of ``model`` at ``E_model(ids) + delta``."""
    emb = model.embed(batch.ids)

    def fn(delta: Tensor, yy: Tensor = y) -> Tensor:
        with torch.set_grad_enabled(grad):
            logits = model.logits_from_embeds(emb + delta.to(emb), batch.mask)
            return per_example_loss(logits, yy.to(logits.device))

    return fn


def autograd_embedding_gradient(model: TextModel, batch: EmbeddingBatch, y: Tensor) -> EmbGradFn:
    loss_fn = embed_loss(model, batch, y, grad=True)

    def g(delta: Tensor, yy: Tensor) -> Tensor:
        d = delta.detach().requires_grad_(True)
        loss = loss_fn(d, yy)
        if loss.grad_fn is None:
            raise GradientUnavailable("the model output does not depend differentiably on inputs_embeds")
        (gd,) = torch.autograd.grad(loss.sum(), d)
        return gd

    return g


def _token_norm(t: Tensor) -> Tensor:
    return t.norm(dim=-1, keepdim=True)


def embedding_pgd(model: TextModel, batch: EmbeddingBatch, y: Tensor, *, radius: float,
                  steps: int, alpha: float, random_init: bool,
                  generator: Optional[torch.Generator], grad_fn: Optional[EmbGradFn] = None) -> Tensor:
    """Per-token L2 PGD on the input embeddings; returns the perturbation ``delta``."""
    b, length = batch.ids.shape
    h = model.embed(batch.ids[:1, :1]).shape[-1]
    dev = batch.ids.device
    if radius == 0:
        return torch.zeros((b, length, h), device=dev)
    grad_fn = grad_fn or autograd_embedding_gradient(model, batch, y)
    if random_init:
        z = torch.randn((b, length, h), generator=generator, dtype=torch.float64)
        z = z / _token_norm(z).clamp_min(1e-300)
        r = torch.rand((b, length, 1), generator=generator, dtype=torch.float64) ** (1.0 / h)
        delta = (z * r * radius).float().to(dev)
    else:
        delta = torch.zeros((b, length, h), device=dev)
    delta = delta * batch.perturbable
    for _ in range(steps):
        g = grad_fn(delta, y).float() * batch.perturbable
        delta = delta + alpha * radius * g / _token_norm(g).clamp_min(1e-30)
        n = _token_norm(delta)
        delta = delta * torch.where(n > radius, radius / n.clamp_min(1e-30), torch.ones_like(n))
        delta = (delta * batch.perturbable).detach()
    return delta


@torch.no_grad()
def predict_with_delta(model: TextModel, batch: EmbeddingBatch, delta: Tensor) -> Tensor:
    emb = model.embed(batch.ids)
    return model.logits_from_embeds(emb + delta.to(emb), batch.mask).argmax(-1).cpu()


def probe_embedding_gradient(model: TextModel, batch: EmbeddingBatch, y: Tensor) -> Optional[str]:
    """``None`` when ``model`` has a usable gradient w.r.t. its input embeddings, else why not."""
    found: list[str] = []
    try:
        with graph_breaks(model.model, found):
            g = autograd_embedding_gradient(model, batch, y)(
                torch.zeros(batch.ids.shape + (model.embed(batch.ids[:1, :1]).shape[-1],),
                            device=batch.ids.device), y)
    except GradientUnavailable as exc:
        return str(exc)
    except (RuntimeError, NotImplementedError) as exc:
        return f"backward failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if not torch.isfinite(g).all():
        return "the embedding gradient has non-finite values"
    if not bool((g * batch.perturbable).ne(0).any()):
        return "the embedding gradient is identically zero on the probe batch"
    return graph_break_reason(found)
