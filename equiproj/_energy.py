"""The energy functions: the exact non-equivariant / equivariant energies and the projection.

Every function takes a weight ``W`` of shape ``[..., rep_out.dim, rep_in.dim]`` (leading dims
are a batch: one energy per matrix) and the two representations:

* ``energies(W, rep_in, rep_out)`` -> ``(E_perp, E_G)``, ``E_perp = ||W - P W||^2`` and
  ``E_G = ||P W||^2``, each of shape ``[...]``, from one pass (``energies(...)[0]`` alone costs the same)
* ``energies_and_grad(W, rep_in, rep_out, lambda_perp=, lambda_G=)`` -> ``(E_perp, E_G, grad)``,
  the penalty's gradient from the same pass (no autograd graph)
* ``energies_many`` / ``energies_and_grads_many``: many layers, one call per backend and device
* ``project(W, rep_in, rep_out, which=)`` -> ``P(W)`` or ``W - P(W)``
* ``energy_breakdown(W, rep_in, rep_out, which=)`` -> the energy per (irrep_out, irrep_in) block type

The energies are differentiable (``dE_perp/dW = 2 (W - P W)``), computed in residual form (never
as ``||W||^2 - ||P W||^2``), in float32 for half-precision and float32 inputs and in float64 for
float64 inputs, and returned in that accumulation dtype. ``backend=`` chooses who computes them
(:mod:`equiproj.ops`: ``"auto"``, ``"cpp"``, ``"triton"``, ``"torch"``, ``"reference"``).
Inside a ``torch.autocast`` region every function computes what it computes outside it (autocast is
switched off for its arithmetic); with ``backend="torch"``, ``project`` and ``energy_breakdown``,
call ``backward()`` outside the region (see :mod:`equiproj.kernels.torch_twin`). Weights are
float16, bfloat16, float32 or float64; other dtypes (float8) are refused.
The mathematics is in docs/math.md §2-3.
"""

from __future__ import annotations

import math

import torch

from . import ops
from ._plan import BlockPlan, block_plan, plan_for
from .groups import Rep, as_rep_pair, check_rep_pair
from .kernels import torch_project
from .kernels.inputs import autocast_off

__all__ = ["energies", "energies_many", "energies_and_grad", "energies_and_grads_many",
           "project", "energy_breakdown", "check_arguments", "check_not_meta"]

_WHICH = ("equivariant", "non_equivariant")

#: the weight dtypes every backend computes with (energies in float32, float64 for float64 weights);
#: float8 and other floating dtypes are refused rather than converted, so that no backend decides alone
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_arguments(W, rep_in: Rep, rep_out: Rep) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the problem unless ``W`` ``[..., m, n]`` is a
    floating-point tensor of the shape of a map from ``rep_in`` to ``rep_out``."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a floating-point tensor, got {W.dtype}")
    if W.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"W has dtype {W.dtype}; the energies take float16, bfloat16, float32 or float64 weights "
                        f"(every backend alike): convert it, e.g. W.float()")
    check_not_meta(W, "W")
    check_rep_pair(rep_in, rep_out)
    if W.dim() < 2 or tuple(W.shape[-2:]) != (rep_out.dim, rep_in.dim):
        raise ValueError(f"W must have shape [..., rep_out.dim, rep_in.dim] = [..., {rep_out.dim}, {rep_in.dim}], "
                         f"got {tuple(W.shape)}")


def check_not_meta(W: torch.Tensor, name: str) -> None:
    """``ValueError`` for a weight on the meta device (a shape without values, as in a model built
    under ``torch.device("meta")`` and not yet materialised)."""
    if W.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has a shape but no values, so it has no energy or "
                         "projection; materialise the model first (model.to_empty(device=...) and initialise it, "
                         "or load its state dict with assign=True)")


def _check_which(which: str) -> None:
    if which not in _WHICH:
        raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")


def _check_finite(weights, *xs):
    """Raise for NaN/Inf energies on the CPU (on CUDA this would cost a synchronisation), saying
    whether the weights hold NaN/Inf or the energy overflowed its dtype from finite weights."""
    if torch.compiler.is_compiling() or xs[0].device.type != "cpu":
        return
    # energies are >= 0, so their sum is finite iff every one is (NaN or +Inf otherwise)
    if all(math.isfinite(float(x.detach() if x.dim() == 0 else x.detach().sum())) for x in xs):
        return
    for i, W in enumerate(weights):
        if not bool(torch.isfinite(W.detach()).all()):
            which = "W" if len(weights) == 1 else f"weights[{i}]"
            raise ValueError(f"the energy is not finite: {which} contains NaN or Inf")
    dtype = next(x.dtype for x in xs if not bool(torch.isfinite(x.detach()).all()))
    largest = max(float(W.detach().abs().max()) for W in weights if W.numel())
    raise ValueError(f"the energy overflowed {str(dtype).replace('torch.', '')}: W is finite (largest |entry| "
                     f"{largest:.3g}) but the sum of squares exceeds {torch.finfo(dtype).max:.3g}; pass W in "
                     f"float64 (W.double(), energies in float64) or scale W down")


def energies(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G)`` of ``W`` ``[..., m, n]``, each ``[...]``, from one pass.

    Example::

        >>> import torch, equiproj
        >>> G = equiproj.SO3()
        >>> r = equiproj.Rep.parse(G, "4x0 + 2x1")
        >>> e_perp, e_g = equiproj.energies(torch.randn(10, 10), r, r)
        >>> e_perp.shape, bool(e_perp >= 0), bool(e_g >= 0)
        (torch.Size([]), True, True)
    """
    rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    check_arguments(W, rep_in, rep_out)
    (e_perp,), (e_g,) = ops.backend_for(backend, W).energies([W], [(rep_in, rep_out)])
    _check_finite([W], e_perp, e_g)
    return e_perp, e_g


def project(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, which: str = "equivariant") -> torch.Tensor:
    """``P(W)``, the nearest equivariant map (Frobenius), ``[..., m, n] -> [..., m, n]`` in W's dtype;
    ``which="non_equivariant"`` returns ``W - P(W)``, computed in residual form (accurate when W is
    nearly equivariant). Differentiable. A weight holding NaN or Inf is refused (on the CPU; on CUDA
    the check would cost a synchronisation), as by the energies."""
    rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    _check_which(which)
    check_arguments(W, rep_in, rep_out)
    if W.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(W.detach()).all()):
        raise ValueError("the projection is not finite: W contains NaN or Inf")  # as the energies refuse it
    return torch_project(W, plan_for(rep_in, rep_out, W.device, torch.float64), which).to(W.dtype)


def energy_breakdown(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, which: str = "non_equivariant"
                     ) -> dict[tuple, torch.Tensor]:
    """Where a layer breaks the symmetry: ``{(irrep_out, irrep_in): energy [...]}``, the energy of
    ``W - P(W)`` (``which="non_equivariant"``, every pair of irrep types) or of ``P(W)``
    (``"equivariant"``, pairs of the same type) in each block type of the irrep basis. The values
    sum to ``E_perp`` (or ``E_G``).

    Example::

        >>> import torch, equiproj
        >>> G = equiproj.O3(); r = equiproj.Rep.parse(G, "2x0e + 1o")
        >>> parts = equiproj.energy_breakdown(torch.randn(5, 5), r, r)
        >>> sorted(f"{a}<-{b}" for a, b in parts)[:2]
        ['0e<-0e', '0e<-1o']
    """
    rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    _check_which(which)
    X = project(W, rep_in, rep_out, which=which)
    X = X.to(ops.accumulation_dtype(W.dtype))
    plan = block_plan(rep_in, rep_out)
    with autocast_off(W.device):  # the change to the irrep basis in the accumulation dtype under autocast too
        E = _energy_by_type(_to_irrep_basis(X, plan), plan)
    return {(so, si): E[..., a, b] for a, so in enumerate(plan.out.types) for b, si in enumerate(plan.inp.types)
            if which == "non_equivariant" or so == si}


def _apply_fields(X: torch.Tensor, side) -> torch.Tensor:
    """``X`` (last axis in structured coordinates of ``side``) times each field's Q, block by block."""
    if all(f.Q is None for f in side.fields):
        return X
    parts = []
    for f in side.fields:
        blk = X[..., f.offset : f.offset + f.copies * f.dim]
        if f.Q is not None:
            shp = blk.shape
            blk = (blk.reshape(shp[:-1] + (f.copies, f.dim)) @ f.Q.to(X)).reshape(shp)
        parts.append(blk)
    return torch.cat(parts, dim=-1)


def _to_irrep_basis(X: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``Q_out^T X Q_in`` (structured, block by block): the weight in the irrep basis of both sides."""
    if plan.out.perm is not None:
        X = X.index_select(-2, plan.out.perm.to(X.device))
    if plan.inp.perm is not None:
        X = X.index_select(-1, plan.inp.perm.to(X.device))
    X = _apply_fields(X, plan.inp)
    return _apply_fields(X.transpose(-1, -2), plan.out).transpose(-1, -2)


def _energy_by_type(Xh: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``[..., K_out, K_in]``: the energy of ``Xh`` in each (irrep_out, irrep_in) block type."""
    oh_o = torch.nn.functional.one_hot(plan.out.coord_type.to(Xh.device), len(plan.out.types)).to(Xh.dtype)
    oh_i = torch.nn.functional.one_hot(plan.inp.coord_type.to(Xh.device), len(plan.inp.types)).to(Xh.dtype)
    return oh_o.T @ Xh.square() @ oh_i


def energies_and_grad(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, lambda_perp=1.0, lambda_G=0.0,
                      backend: str = "auto", out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G, grad)`` in one pass over ``W`` ``[..., m, n]``, without an autograd graph.

    ``grad`` ``[..., m, n]`` (W's dtype) is the gradient of ``lambda_perp * E_perp + lambda_G * E_G``:
    ``2 lambda_perp (W - P W) + 2 lambda_G P W``. The lambdas are numbers or tensors broadcastable
    to ``W.shape[:-2]``. With the fused op (``"cpp"``, ``"triton"``) this reads W once and writes
    ``grad`` once; ``energies(W, ...)`` followed by ``backward()`` reads W twice, because its forward
    cannot know the incoming gradient. Use it to add a penalty's gradient by hand
    (:meth:`equiproj.nn.ProjectionPenalty.backward` does this for a model).

    ``out``: a tensor of ``W``'s shape and dtype to which ``grad`` is added in place, with no fresh
    buffer (an existing ``W.grad``, or ``W`` itself: ``lambda_perp = -rate / 2`` then takes the
    decoupled step ``W <- W - rate (W - P W)``); ``out`` is then returned as ``grad``.

    Example::

        >>> import torch, equiproj
        >>> G = equiproj.SO3(); r = equiproj.Rep.parse(G, "4x0 + 2x1")
        >>> W = torch.randn(10, 10)
        >>> e_perp, e_g, grad = equiproj.energies_and_grad(W, r, r, lambda_perp=1e-2)
        >>> P_W = equiproj.project(W, r, r)
        >>> torch.allclose(grad, 2e-2 * (W - P_W), atol=1e-6)
        True
    """
    rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    check_arguments(W, rep_in, rep_out)
    b = ops.backend_for(backend, W)
    cp, cg = ops.as_coefficient(lambda_perp, W, "lambda_perp"), ops.as_coefficient(lambda_G, W, "lambda_G")
    if out is not None:
        _check_out(out, W, "out")
    (e_perp,), (e_g,), (grad,) = b.energies_and_grads([W], [(rep_in, rep_out)], [cp], [cg],
                                                      None if out is None else [out])
    _check_finite([W], e_perp, e_g)
    return e_perp, e_g, grad


def _check_out(out, W, name: str) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != W.shape or out.dtype != W.dtype or out.device != W.device:
        raise ValueError(f"{name} must be a tensor of W's shape {tuple(W.shape)}, dtype {W.dtype} and device {W.device}")


def _check_many(weights, reps) -> None:
    for i, (w, pair) in enumerate(zip(weights, reps)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"reps[{i}] must be a pair (rep_in, rep_out), got {type(pair).__name__}")
        check_arguments(w, pair[0], pair[1])
    # the energies are stacked to [L, *batch]: checked before any work is done
    batch = tuple(weights[0].shape[:-2])
    for i, w in enumerate(weights):
        if tuple(w.shape[:-2]) != batch:
            raise ValueError(f"every weight needs the same batch shape (the leading dims before [m, n]), because "
                             f"the energies are stacked per layer: weights[0] has batch shape {batch}, weights[{i}] "
                             f"has {tuple(w.shape[:-2])}; call once per batch shape, or per layer")


def _run_grouped(weights, reps, backend: str, call) -> list[tuple]:
    """``call(backend_object, indices)`` once per (backend, device) group; the results per layer, in order."""
    parts: list = [None] * len(weights)
    for (name, _), idx in ops.group_by_backend(weights, backend).items():
        out = call(ops.BACKENDS[name], idx)
        for j, i in enumerate(idx):
            parts[i] = tuple(o[j] for o in out)
    return parts


def _stack_energies(weights, parts):
    dt = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    e_perp = torch.stack([p[0].to(dt) for p in parts])
    e_g = torch.stack([p[1].to(dt) for p in parts])
    _check_finite(weights, e_perp, e_g)
    return e_perp, e_g


def energies_many(weights, reps, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of many layers at once (all declared layers of a model).

    Args:
        weights: sequence of L weights, the i-th of shape ``[rep_out_i.dim, rep_in_i.dim]``
            (leading batch dims are allowed if every weight has the same ones).
        reps: sequence of L pairs ``(rep_in_i, rep_out_i)``.
    Returns:
        ``(E_perp, E_G)``, each ``[L]`` float32 (float64 if any weight is float64: a float64 layer's
        energy is not rounded to float32), differentiable.

    The layers of one backend and device go through one call: for the fused op one call of
    ``equiproj::fused_energies`` (a constant number of kernel launches for any L); its backward
    is one more call.
    """
    reps = [as_rep_pair(*p) if isinstance(p, (tuple, list)) and len(p) == 2 else p for p in reps]
    weights, reps = list(weights), list(reps)
    if len(weights) != len(reps):
        raise ValueError(f"got {len(weights)} weights but {len(reps)} rep pairs")
    if not weights:
        raise ValueError("energies_many needs at least one layer")
    _check_many(weights, reps)
    parts = _run_grouped(weights, reps, backend,
                         lambda b, idx: b.energies([weights[i] for i in idx], [reps[i] for i in idx]))
    return _stack_energies(weights, parts)


def energies_and_grads_many(weights, reps, *, lambda_perp, lambda_G, backend: str = "auto", outs=None):
    """:func:`energies_and_grad` of many layers, one call per backend and device.

    Args:
        weights: L weights ``[..., m_i, n_i]`` (as in :func:`energies_many`).
        reps: L pairs ``(rep_in_i, rep_out_i)``.
        lambda_perp, lambda_G: L coefficients each (numbers, or tensors broadcastable to the
            batch shape of their weight).
        outs: ``None``, or L tensors (the weights' shapes and dtypes) to which the gradients are
            added in place (see :func:`energies_and_grad`'s ``out``).
    Returns:
        ``(E_perp, E_G, grads)``: ``[L]`` each (float32; float64 if any weight is float64) and L
        gradients shaped like the weights.
    """
    reps = [as_rep_pair(*p) if isinstance(p, (tuple, list)) and len(p) == 2 else p for p in reps]
    weights, reps = list(weights), list(reps)
    lambda_perp, lambda_G = list(lambda_perp), list(lambda_G)
    if not (len(weights) == len(reps) == len(lambda_perp) == len(lambda_G)):
        raise ValueError(f"got {len(weights)} weights, {len(reps)} rep pairs, {len(lambda_perp)} lambda_perp "
                         f"and {len(lambda_G)} lambda_G: need one of each per layer")
    if not weights:
        raise ValueError("energies_and_grads_many needs at least one layer")
    _check_many(weights, reps)
    cps = [ops.as_coefficient(c, w, f"lambda_perp[{i}]") for i, (c, w) in enumerate(zip(lambda_perp, weights))]
    cgs = [ops.as_coefficient(c, w, f"lambda_G[{i}]") for i, (c, w) in enumerate(zip(lambda_G, weights))]
    if outs is not None:
        outs = list(outs)
        if len(outs) != len(weights):
            raise ValueError(f"got {len(weights)} weights but {len(outs)} outs")
        for i, (o, w) in enumerate(zip(outs, weights)):
            _check_out(o, w, f"outs[{i}]")
    parts = _run_grouped(weights, reps, backend, lambda b, idx: b.energies_and_grads(
        [weights[i] for i in idx], [reps[i] for i in idx], [cps[i] for i in idx], [cgs[i] for i in idx],
        None if outs is None else [outs[i] for i in idx]))
    e_perp, e_g = _stack_energies(weights, parts)
    return e_perp, e_g, [p[2] for p in parts]
