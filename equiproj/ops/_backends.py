"""The backends: one registry of what can compute the energies, and the choice of one per weight.

=============  ==================================================================================
``"cpp"``      the fused op's C++ kernel (CPU; fp16/bf16/fp32/fp64)
``"triton"``   the fused op's Triton kernel (CUDA; fp16/bf16/fp32; float64 runs ``"torch"``)
``"torch"``    the kernels' pure-torch twin (any device and dtype; plain autograd, double backward)
``"reference"`` the float64 spatial-domain average over the group (:mod:`equiproj.reference`)
=============  ==================================================================================

``"auto"`` (the default of every energy function; ``$EQUIPROJ_BACKEND`` overrides it) takes the
fused kernel of the device and otherwise ``"torch"``, warning once when the fallback is due to a
missing build or package. Every backend takes lists of weights with their rep pairs, so that
many layers cost one call per backend and device (:func:`group_by_backend`).
"""

from __future__ import annotations

import os

import torch

from .. import reference
from .._plan import plan_for
from ._availability import cpp_available, cpp_missing, triton_available, triton_missing, warn_once
from ._op import accumulation_dtype, fused_energies, fused_energies_and_grad, fused_energies_and_grads, run_twin

__all__ = ["Backend", "BACKENDS", "BACKEND_NAMES", "ENV_VAR", "resolve_backend", "backend_for", "group_by_backend",
           "register_route", "route_for"]

ENV_VAR = "EQUIPROJ_BACKEND"


class Backend:
    """One way of computing energies. ``energies`` is differentiable; ``energies_and_grads`` returns
    the gradient of ``sum_i lambda_perp_i E_perp_i + lambda_G_i E_G_i`` without an autograd graph (the
    coefficients are tensors of the batch shape of their weight, from ``as_coefficient``), in fresh
    tensors or, with ``outs``, added in place to ``outs`` (which may be the weights themselves)."""

    name: str
    #: how this backend computes other kinds of terms, registered by the layers that define them
    #: (:func:`register_route`): ``{kind: implementation}``
    routes: dict

    def energies(self, weights, pairs):
        raise NotImplementedError

    def energies_and_grads(self, weights, pairs, lambda_perp, lambda_G, outs=None):
        raise NotImplementedError


class FusedBackend(Backend):
    """The fused op (``equiproj::fused_energies``): the device decides which kernel runs."""

    def __init__(self, name: str):
        self.name = name

    def energies(self, weights, pairs):
        dev = weights[0].device
        return fused_energies(weights, [plan_for(ri, ro, dev) for ri, ro in pairs])

    def energies_and_grads(self, weights, pairs, lambda_perp, lambda_G, outs=None):
        dev = weights[0].device
        if len(weights) == 1 and outs is None:  # a small layer's cost is mostly Python: skip the list plumbing
            ep, eg, gr = fused_energies_and_grad(weights[0], plan_for(*pairs[0], dev), lambda_perp[0], lambda_G[0])
            return [ep], [eg], [gr]
        return fused_energies_and_grads(weights, [plan_for(ri, ro, dev) for ri, ro in pairs], lambda_perp, lambda_G, outs)


class TorchBackend(Backend):
    """The pure-torch twin of the kernels, on a float64 copy of the plan (exact for float64 weights)."""

    name = "torch"

    @staticmethod
    def _plans(weights, pairs):
        dev = weights[0].device
        return [plan_for(ri, ro, dev, torch.float64) for ri, ro in pairs]

    def energies(self, weights, pairs):
        ep, eg, _ = run_twin(weights, self._plans(weights, pairs), [], [])
        return ep, eg

    def energies_and_grads(self, weights, pairs, lambda_perp, lambda_G, outs=None):
        with torch.no_grad():
            ep, eg, grads = run_twin(weights, self._plans(weights, pairs), lambda_perp, lambda_G)
            return ep, eg, _added(grads, outs)


class ReferenceBackend(Backend):
    """The float64 spatial-domain reference, computed in float64; energies returned in the dtype every
    backend returns (float64 for float64 weights, float32 otherwise)."""

    name = "reference"

    def energies(self, weights, pairs):
        out = [reference.energies(W.to(torch.float64), ri, ro) for W, (ri, ro) in zip(weights, pairs)]
        return ([e[0].to(accumulation_dtype(W.dtype)) for e, W in zip(out, weights)],
                [e[1].to(accumulation_dtype(W.dtype)) for e, W in zip(out, weights)])

    def energies_and_grads(self, weights, pairs, lambda_perp, lambda_G, outs=None):
        eps, egs, grads = [], [], []
        with torch.no_grad():
            for W, (ri, ro), cp, cg in zip(weights, pairs, lambda_perp, lambda_G):
                W64 = W.to(torch.float64)
                PW = reference.project(W64, ri, ro)
                R = W64 - PW
                eps.append(R.square().sum((-2, -1)).to(accumulation_dtype(W.dtype)))
                egs.append(PW.square().sum((-2, -1)).to(accumulation_dtype(W.dtype)))
                cp, cg = (c.to(torch.float64)[..., None, None] for c in (cp, cg))
                grads.append((2 * cp * R + 2 * cg * PW).to(W.dtype))
        return eps, egs, _added(grads, outs)


def _added(grads, outs):
    """``grads``, or ``outs`` after adding ``grads`` to them in place."""
    if outs is None:
        return grads
    for o, g in zip(outs, grads):
        o.add_(g.to(o.dtype))
    return list(outs)


BACKENDS: dict[str, Backend] = {b.name: b for b in (FusedBackend("cpp"), FusedBackend("triton"), TorchBackend(),
                                                    ReferenceBackend())}
#: what ``backend=`` accepts
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)
for _b in BACKENDS.values():
    _b.routes = {}


def register_route(kind: str, implementations: dict) -> None:
    """Register how each backend computes a kind of term defined in a higher layer (a kernel space,
    ...): ``implementations`` maps every backend name of :data:`BACKENDS` to an object of that kind's
    interface. Registering a kind again replaces it."""
    missing = set(BACKENDS) - set(implementations)
    if missing or set(implementations) - set(BACKENDS):
        raise ValueError(f"register_route({kind!r}) needs one implementation per backend {tuple(BACKENDS)}, "
                         f"got {tuple(implementations)}")
    for name, impl in implementations.items():
        BACKENDS[name].routes[kind] = impl


def route_for(kind: str, name: str):
    """The implementation of ``kind`` registered for the backend ``name`` (a resolved name, as
    :func:`group_by_backend` gives)."""
    try:
        return BACKENDS[name].routes[kind]
    except KeyError:
        raise LookupError(f"no route for {kind!r} terms is registered for the backend {name!r}") from None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for weights on ``device`` with ``dtype``: one of ``"cpp"``, ``"triton"``,
    ``"torch"``, ``"reference"``.

    ``"auto"`` is replaced by ``$EQUIPROJ_BACKEND`` when that is set, else by the fast kernel of the
    device (``"cpp"`` on CPU, ``"triton"`` on CUDA for fp16/bf16/fp32) or ``"torch"`` (warning once
    when the extension or triton is missing). ``"triton"`` with float64 weights runs ``"torch"``.
    Raises ``ValueError`` for an unknown name or a kernel asked for on the wrong device, and
    ``RuntimeError`` when an explicitly requested kernel is not available.
    """
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKEND_NAMES}")
    forced = False
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKEND_NAMES:
                raise ValueError(f"${ENV_VAR}={env!r} is not a backend: expected one of {BACKEND_NAMES}")
            backend, forced = env, True
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu":
            if cpp_available():
                return "cpp"
            warn_once("cpp", f"equiproj: using the pure-torch path on CPU because {cpp_missing()}")
            return "torch"
        if device.type == "cuda":
            if dtype == torch.float64:
                return "torch"
            if triton_available():
                return "triton"
            warn_once("triton", f"equiproj: using the pure-torch path on CUDA because {triton_missing()}")
        return "torch"
    where = f" (from ${ENV_VAR})" if forced else ""
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp'{where} runs on CPU tensors, got a tensor on {device}")
        if not cpp_available():
            raise RuntimeError(cpp_missing())
    elif backend == "triton":
        if device.type != "cuda":
            raise ValueError(f"backend='triton'{where} runs on CUDA tensors, got a tensor on {device}")
        if not triton_available():
            raise RuntimeError(triton_missing())
        if dtype == torch.float64:  # the kernels accumulate in float32: float64 keeps its precision
            return "torch"
    return backend


@torch.compiler.assume_constant_result
def _traced_backend(backend: str, device: str, dtype: str) -> str:
    return resolve_backend(backend, torch.device(device), getattr(torch, dtype.removeprefix("torch.")))


def backend_for(backend: str, W: torch.Tensor) -> Backend:
    """The :class:`Backend` that runs for ``W`` (:func:`resolve_backend`); inside ``torch.compile`` it
    is decided when the code is traced."""
    if torch.compiler.is_compiling():
        return BACKENDS[_traced_backend(backend, str(W.device), str(W.dtype))]
    return BACKENDS[resolve_backend(backend, W.device, W.dtype)]


def group_by_backend(weights, backend: str) -> dict[tuple[str, torch.device], list[int]]:
    """The weights' indices grouped by the backend that runs each and its device, in order: one call
    of each backend per device does all of its layers."""
    groups: dict = {}
    for i, W in enumerate(weights):
        groups.setdefault((backend_for(backend, W).name, W.device), []).append(i)
    return groups
