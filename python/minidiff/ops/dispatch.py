"""One backend selector for every op family, and the registration of the ops.

Op families and their backends
------------------------------
=============  ==========================================================  =================
family         ops (``torch.ops.minidiff.*``)                              backends
=============  ==========================================================  =================
``cka``        ``cka_batch_terms``                                         native, triton, torch
``agreement``  ``agreement_pair_counts``, ``agreement_modal_labels``,      native, cuda, triton, torch
               ``agreement_cie_scores``
``int8``       ``int8_linear_w8a8``, ``int8_linear_weight_only``,          native, cuda, triton, torch
               ``int8_linear_gpu``, ``int8_weight_only_gpu``
``sparse``     ``sparse_linear``, ``sparse24_linear_gpu``                  native, cuda, triton, torch
=============  ==========================================================  =================

``native`` is ``minidiff._C`` (CPU), ``cuda`` is ``minidiff._cuda``, ``triton`` the
kernels in ``minidiff.kernels`` (on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``), ``torch`` plain torch (``reference`` is accepted as a
synonym). Each family module lists, per call, the backends that apply to the
operands in its default order (for example ``agreement`` on CUDA puts the measured
faster kernel first); :func:`choose` takes the first one unless a preference is set.

Environment
-----------
``MINIDIFF_BACKEND=native|cuda|triton|torch|reference|auto``
    A preference for every family.
``MINIDIFF_BACKEND_<FAMILY>`` (e.g. ``MINIDIFF_BACKEND_AGREEMENT=triton``)
    A preference for one family; wins over ``MINIDIFF_BACKEND``.

A preference is used where it applies to the operands and ignored where it does
not (``cuda`` on CPU tensors falls back to the family's default order), so one
global setting never breaks the families without that backend. An explicit
``backend=`` argument of a Python entry point, by contrast, is strict: it raises
``ValueError`` when that backend cannot run the call. The older variables
``MINIDIFF_AGREEMENT_BACKEND`` (agreement) and ``MINIDIFF_GPU_BACKEND`` (int8 and
sparse) still work, below the per-family variable, with a ``DeprecationWarning``.

``TRITON_INTERPRET`` is read here only (:func:`interpreting`).

Registration
------------
:func:`define` registers an op with ``torch.library.Library`` (schema, one
``CompositeExplicitAutograd`` implementation and a fake implementation for
``torch.compile`` / export). Unlike ``torch.library.custom_op`` this adds no
``torch._dynamo`` import to the first eager call (about 2 s), so eager calls and
compiled graphs use the same registered op at a few microseconds per call. Every
implementation validates its arguments before any native code sees a pointer.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import torch

from minidiff._env import triton_interpreting

__all__ = ["BACKENDS", "FAMILIES", "interpreting", "requested", "choose", "check_backend", "define"]

BACKENDS = ("auto", "native", "cuda", "triton", "torch", "reference")
FAMILIES = ("cka", "agreement", "int8", "sparse", "token_divergence")
_LEGACY = {"agreement": "MINIDIFF_AGREEMENT_BACKEND", "int8": "MINIDIFF_GPU_BACKEND",
           "sparse": "MINIDIFF_GPU_BACKEND"}

_LIB = torch.library.Library("minidiff", "FRAGMENT")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), so
    they accept CPU tensors and are never the fast choice."""
    return triton_interpreting()


def _canonical(value: str, source: str) -> str:
    v = value.strip().lower()
    if v not in BACKENDS:
        raise ValueError(f"{source}={value!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return "torch" if v == "reference" else v


def requested(family: str) -> str:
    """The backend preferred for ``family`` by the environment ("auto" when none).

    Order: ``MINIDIFF_BACKEND_<FAMILY>``, the family's deprecated variable, then
    ``MINIDIFF_BACKEND``. A value that is not a backend raises ``ValueError``
    naming the variable.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; one of {FAMILIES}")
    var = f"MINIDIFF_BACKEND_{family.upper()}"
    value = os.environ.get(var, "").strip()
    if value:
        return _canonical(value, var)
    legacy = _LEGACY.get(family)
    if legacy and os.environ.get(legacy, "").strip():
        warnings.warn(f"{legacy} is deprecated; set {var} (or MINIDIFF_BACKEND for every op family) "
                      "instead", DeprecationWarning, stacklevel=3)
        return _canonical(os.environ[legacy], legacy)
    value = os.environ.get("MINIDIFF_BACKEND", "").strip()
    return _canonical(value, "MINIDIFF_BACKEND") if value else "auto"


def choose(family: str, candidates: Sequence[str]) -> str:
    """The backend to run: the environment's preference when it is among
    ``candidates`` (the backends that apply to this call, in the family's default
    order), else ``candidates[0]``."""
    if not candidates:
        raise RuntimeError(f"no backend of op family {family!r} can run this call")
    want = requested(family)
    return want if want != "auto" and want in candidates else candidates[0]


def check_backend(backend: str, family: str, candidates: Sequence[str]) -> str:
    """Resolve an explicit ``backend=`` argument: "auto" -> :func:`choose`; a named
    backend must be among ``candidates`` or ``ValueError`` says which ones apply."""
    if not isinstance(backend, str) or backend.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    b = "torch" if backend == "reference" else backend
    if b == "auto":
        return choose(family, candidates)
    if b not in candidates:
        raise ValueError(f"backend={backend!r} cannot run this call of the {family} ops "
                         f"(available here: {', '.join(candidates)}); native needs CPU tensors, "
                         "cuda CUDA tensors and minidiff._cuda, triton CUDA tensors or TRITON_INTERPRET=1")
    return b


def define(name: str, schema: str, impl: Callable, fake: Callable):
    """Register ``minidiff::<name>`` with ``schema`` (arguments and returns, as in
    ``torch.library``), its implementation, its fake and an autograd kernel whose
    backward raises (:func:`_autograd_kernel`); return the op overload
    ``torch.ops.minidiff.<name>.default``."""
    _LIB.define(f"{name}{schema}")
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"minidiff::{name}", fake, lib=_LIB)
    op = getattr(torch.ops.minidiff, name).default
    _LIB.impl(name, _autograd_kernel(name, op), "Autograd")
    return op


def _no_backward_message(name: str) -> str:
    return (f"minidiff::{name} has no backward: its integer/sparse arithmetic is not "
            "differentiable. Differentiate the float model instead (the adversarial "
            "characteristic does so with no_gradient='surrogate')")


class _NoBackward(torch.autograd.Function):
    """The op's floating outputs (copies), attached to the inputs that require grad by
    a backward that raises, naming the op. Used only when a graph is being recorded."""

    @staticmethod
    def forward(ctx, name: str, n_out: int, *tensors: torch.Tensor):
        ctx.name = name
        return tuple(t.clone() for t in tensors[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_no_backward_message(ctx.name))


def _autograd_kernel(name: str, op) -> Callable:
    """The op's kernel at the Autograd key. Without one, autograd's fallback warns and
    returns no gradient for the op's inputs, which reads as a silently incomplete
    gradient (e.g. an int8 layer behind a residual connection); with one from
    ``torch.library.register_autograd`` every call pays for an ``autograd.Function``
    (~50-100 us). Here a call that records no graph (no input requires grad, or grad
    mode is off) goes straight below autograd; otherwise the floating outputs get a
    backward that raises RuntimeError naming the op."""
    def kernel(*args, **kwargs):
        needs_graph = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args, **kwargs)
        if not needs_graph:
            return out
        outs = out if isinstance(out, tuple) else (out,)
        floating = [i for i, t in enumerate(outs) if t.is_floating_point()]
        if not floating:
            return out
        grad_inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
        marked = _NoBackward.apply(name, len(floating), *(outs[i] for i in floating), *grad_inputs)
        result = list(outs)
        for i, t in zip(floating, marked):
            result[i] = t
        return tuple(result) if isinstance(out, tuple) else result[0]
    return kernel
