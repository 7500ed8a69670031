"""The exact non-equivariant / equivariant energies and the projection (math.md §2-3).

Public functions take a weight ``W`` of shape ``[..., rep_out.dim, rep_in.dim]`` (leading
dims are a batch: one energy per matrix) and the two representations:

* ``noneq_energy(W, rep_in, rep_out)`` -> ``E_perp = ||W - P W||^2``, shape ``[...]``
* ``eq_energy(W, rep_in, rep_out)``    -> ``E_G = ||P W||^2``
* ``energies(W, rep_in, rep_out)``     -> ``(E_perp, E_G)`` from one pass
* ``project(W, rep_in, rep_out)``      -> ``P(W)`` (``complement=True``: ``W - P(W)``)
* ``energies_and_grad(W, rep_in, rep_out, lambda_perp=, lambda_G=)`` -> ``(E_perp, E_G, grad)``,
  the penalty's gradient computed in the same pass (no autograd graph)

All are differentiable (``dE_perp/dW = 2 (W - P W)``). Energies are computed in residual
form in the irrep basis (never as ``||W||^2 - ||P W||^2``), in float32 for half-precision
inputs and float64 for float64 inputs, and returned in that accumulation dtype.

``backend=`` (see :mod:`equiproj.ops`): ``"auto"`` (default; ``$EQUIPROJ_BACKEND`` overrides it)
runs the fused op ``equiproj::fused_energies`` where its kernel exists (C++ on CPU, Triton on CUDA)
and the pure-torch spectral path below otherwise; ``"cpp"``, ``"triton"``, ``"torch"`` and
``"reference"`` (the float64 spatial reference) force one. ``breakdown=True`` and ``project``
always use the pure-torch path.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .plan import BlockPlan, plan_for
from .rep import Irrep, Rep

__all__ = ["noneq_energy", "eq_energy", "energies", "energies_many", "energies_and_grad", "energies_and_grads_many",
           "project", "validate"]


def validate(W, rep_in: Rep, rep_out: Rep) -> BlockPlan:
    """Check the arguments and return the plan (with its tensors for W's device and compute dtype
    ready; also under ``torch.compile``); raises ``TypeError``/``ValueError`` naming the problem."""
    check_arguments(W, rep_in, rep_out)
    return plan_for(rep_in, rep_out, W.device, compute_dtype(W.dtype))


def check_arguments(W, rep_in: Rep, rep_out: Rep) -> None:
    """The checks of :func:`validate`, without building the plan (traceable by dynamo)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a floating-point tensor, got {W.dtype}")
    for name, r in (("rep_in", rep_in), ("rep_out", rep_out)):
        if not isinstance(r, Rep):
            raise TypeError(f"{name} must be an equiproj Rep, got {type(r).__name__}")
    if rep_in.group != rep_out.group:
        raise ValueError(f"rep_in acts by {rep_in.group} but rep_out by {rep_out.group}: they must be the same group")
    if W.dim() < 2 or tuple(W.shape[-2:]) != (rep_out.dim, rep_in.dim):
        raise ValueError(f"W must have shape [..., rep_out.dim, rep_in.dim] = [..., {rep_out.dim}, {rep_in.dim}], "
                         f"got {tuple(W.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply_side(X: torch.Tensor, Qs, fields, dim: int, transpose: bool) -> torch.Tensor:
    """Multiply each field block of the last axis of X by its Q (``x @ Q``, or ``x @ Q^T``)."""
    if all(Q is None for Q in Qs):
        return X
    parts = []
    for f, Q in zip(fields, Qs):
        blk = X[..., f.offset : f.offset + f.copies * f.dim]
        if Q is not None:
            shp = blk.shape
            blk = (blk.reshape(shp[:-1] + (f.copies, f.dim)) @ (Q.T if transpose else Q)).reshape(shp)
        parts.append(blk)
    return torch.cat(parts, dim=-1)


def to_spectral(W: torch.Tensor, plan: BlockPlan, t: dict) -> torch.Tensor:
    """``W_hat = Q_out^T W Q_in`` (structured, block-wise)."""
    if t["perm_out"] is not None:
        W = W.index_select(-2, t["perm_out"])
    if t["perm_in"] is not None:
        W = W.index_select(-1, t["perm_in"])
    W = _apply_side(W, t["Q_in"], plan.inp.fields, plan.inp.dim, transpose=False)
    W = _apply_side(W.transpose(-1, -2), t["Q_out"], plan.out.fields, plan.out.dim, transpose=False)
    return W.transpose(-1, -2)


def from_spectral(X: torch.Tensor, plan: BlockPlan, t: dict) -> torch.Tensor:
    """Inverse of :func:`to_spectral`: ``Q_out X Q_in^T`` back in user coordinates."""
    X = _apply_side(X, t["Q_in"], plan.inp.fields, plan.inp.dim, transpose=True)
    X = _apply_side(X.transpose(-1, -2), t["Q_out"], plan.out.fields, plan.out.dim, transpose=True).transpose(-1, -2)
    if t["perm_out"] is not None:
        X = X.index_select(-2, torch.argsort(t["perm_out"]))
    if t["perm_in"] is not None:
        X = X.index_select(-1, torch.argsort(t["perm_in"]))
    return X


def spectral_projection(Wh: torch.Tensor, plan: BlockPlan, t: dict) -> torch.Tensor:
    """``P(W_hat)`` in the irrep basis: the commutant projection of each same-type block, 0 elsewhere."""
    PWh = torch.zeros_like(Wh)
    for ro, ri, C in t["shared"]:
        d = C.shape[-1]
        io, ii = ro.reshape(-1), ri.reshape(-1)
        B = Wh[..., io[:, None], ii]  # [..., M d, N d]
        B = B.reshape(B.shape[:-2] + (ro.shape[0], d, ri.shape[0], d))
        coef = torch.einsum("...iajb,sab->...ijs", B, C)
        PB = torch.einsum("...ijs,sab->...iajb", coef, C).reshape(B.shape[:-4] + (io.numel(), ii.numel()))
        # index_put indexes leading dims: move the matrix dims first
        PWh = PWh.movedim((-2, -1), (0, 1)).index_put((io[:, None], ii), PB.movedim((-2, -1), (0, 1)))
        PWh = PWh.movedim((0, 1), (-2, -1))
    return PWh


def _spectral_parts(W, rep_in, rep_out):
    plan = validate(W, rep_in, rep_out)
    t = plan.tensors(W.device, compute_dtype(W.dtype))
    Wh = to_spectral(W.to(compute_dtype(W.dtype)), plan, t)
    return plan, t, Wh, spectral_projection(Wh, plan, t)


def _check_finite(*xs):
    """Raise for NaN/Inf energies on the CPU (on CUDA this would cost a synchronisation)."""
    if torch.compiler.is_compiling() or xs[0].device.type != "cpu":
        return
    # energies are >= 0, so their sum is finite iff every one is
    if not all(math.isfinite(float(x.detach() if x.dim() == 0 else x.detach().sum())) for x in xs):
        raise ValueError("the energy is not finite: W contains NaN or Inf")


def _breakdown(R: torch.Tensor, plan: BlockPlan, t: dict, same_type_only: bool) -> dict:
    """Energy per (irrep_out, irrep_in) block type of ``R`` (a spectral-basis tensor)."""
    oh_o = torch.nn.functional.one_hot(t["type_out"], len(plan.out.types)).to(R.dtype)
    oh_i = torch.nn.functional.one_hot(t["type_in"], len(plan.inp.types)).to(R.dtype)
    E = oh_o.T @ R.square() @ oh_i  # [..., K_out, K_in]
    out = {}
    for a, so in enumerate(plan.out.types):
        for b, si in enumerate(plan.inp.types):
            if not same_type_only or so == si:
                out[(so, si)] = E[..., a, b]
    return out


def energies(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G)`` of ``W`` ``[..., m, n]``, each ``[...]``, from one pass.

    Example::

        >>> G = equiproj.SO3()
        >>> r = equiproj.Rep.parse(G, "4x0 + 2x1")
        >>> e_perp, e_g = equiproj.energies(torch.randn(10, 10), r, r)
    """
    check_arguments(W, rep_in, rep_out)
    backend = ops.backend_for(backend, W)
    if backend == "reference":
        return _reference_energies(W, rep_in, rep_out)
    if backend in ("cpp", "triton"):
        (e_perp,), (e_g,) = ops.fused_energies([W], [ops.plan_for(rep_in, rep_out, W.device)])
    else:
        e_perp, e_g = _torch_energies(W, rep_in, rep_out)
    _check_finite(e_perp, e_g)
    return e_perp, e_g


def _reference_energies(W, rep_in, rep_out):
    from . import reference

    W64 = W.to(torch.float64)
    PW = reference.project(W64, rep_in, rep_out)
    return (W64 - PW).square().sum((-2, -1)), PW.square().sum((-2, -1))


def _torch_energies(W, rep_in, rep_out):
    """The pure-torch spectral path (``backend="torch"``)."""
    plan, t, Wh, PWh = _spectral_parts(W, rep_in, rep_out)
    return (Wh - PWh).square().sum((-2, -1)), PWh.square().sum((-2, -1))


def _check_backend(backend):
    """Breakdowns come from the pure-torch path whatever the backend; the reference has none."""
    if not isinstance(backend, str) or backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {ops.BACKENDS}")
    if backend == "reference":
        raise ValueError("breakdown=True is computed by the spectral path; backend='reference' has no breakdown")


def noneq_energy(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, breakdown: bool = False, backend: str = "auto"):
    """``E_perp = ||W - P(W)||^2``: ``[..., m, n] -> [...]``.

    With ``breakdown=True`` returns ``{(irrep_out, irrep_in): [...]}``, the energy of each block
    type in the irrep basis (where the layer breaks the symmetry); the values sum to E_perp.
    """
    if not breakdown:
        return energies(W, rep_in, rep_out, backend=backend)[0]
    _check_backend(backend)
    plan, t, Wh, PWh = _spectral_parts(W, rep_in, rep_out)
    return _breakdown(Wh - PWh, plan, t, same_type_only=False)


def eq_energy(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, breakdown: bool = False, backend: str = "auto"):
    """``E_G = ||P(W)||^2``: ``[..., m, n] -> [...]``; ``breakdown=True``: per (irrep, irrep) block type."""
    if not breakdown:
        return energies(W, rep_in, rep_out, backend=backend)[1]
    _check_backend(backend)
    plan, t, Wh, PWh = _spectral_parts(W, rep_in, rep_out)
    return _breakdown(PWh, plan, t, same_type_only=True)


def project(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, complement: bool = False) -> torch.Tensor:
    """``P(W)``, the nearest equivariant map (Frobenius), ``[..., m, n] -> [..., m, n]`` in W's dtype.

    ``complement=True`` returns ``W - P(W)``, computed in residual form (accurate when W is
    nearly equivariant).
    """
    plan, t, Wh, PWh = _spectral_parts(W, rep_in, rep_out)
    X = Wh - PWh if complement else PWh
    return from_spectral(X, plan, t).to(W.dtype)


def energies_and_grad(W: torch.Tensor, rep_in: Rep, rep_out: Rep, *, lambda_perp=1.0, lambda_G=0.0,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G, grad)`` in one pass over ``W`` ``[..., m, n]``, without an autograd graph.

    ``grad`` ``[..., m, n]`` (W's dtype) is the gradient of ``lambda_perp * E_perp + lambda_G * E_G``:
    ``2 lambda_perp (W - P W) + 2 lambda_G P W``. The lambdas are numbers or tensors broadcastable
    to ``W.shape[:-2]``. With the fused op (``"cpp"``, ``"triton"``) this reads W once and writes
    ``grad`` once; ``energies(W, ...)`` followed by ``backward()`` reads W twice, because its forward
    cannot know the incoming gradient. Use it to add a penalty's gradient by hand
    (:meth:`equiproj.nn.ProjectionPenalty.backward` does this for a model).

    Example::

        >>> G = equiproj.SO3(); r = equiproj.Rep.parse(G, "4x0 + 2x1")
        >>> W = torch.randn(10, 10)
        >>> e_perp, e_g, grad = equiproj.energies_and_grad(W, r, r, lambda_perp=1e-2)
    """
    check_arguments(W, rep_in, rep_out)
    backend = ops.backend_for(backend, W)
    cp, cg = ops.as_coefficient(lambda_perp, W, "lambda_perp"), ops.as_coefficient(lambda_G, W, "lambda_G")
    if backend in ("cpp", "triton"):
        e_perp, e_g, grad = ops.fused_energies_and_grad(W, ops.plan_for(rep_in, rep_out, W.device), cp, cg)
    else:
        e_perp, e_g, grad = _unfused_energies_and_grad(W, rep_in, rep_out, cp, cg, reference=backend == "reference")
    _check_finite(e_perp, e_g)
    return e_perp, e_g, grad


def energies_and_grads_many(weights, reps, *, lambda_perp, lambda_G, backend: str = "auto"):
    """:func:`energies_and_grad` of many layers, the fused ones in one kernel call per device.

    Args:
        weights: L weights ``[..., m_i, n_i]`` (as in :func:`energies_many`).
        reps: L pairs ``(rep_in_i, rep_out_i)``.
        lambda_perp, lambda_G: L coefficients each (numbers, or tensors broadcastable to the
            batch shape of their weight).
    Returns:
        ``(E_perp, E_G, grads)``: ``[L]`` each (float32; float64 if every weight is float64) and L
        gradients shaped like the weights.
    """
    weights, reps = list(weights), list(reps)
    lambda_perp, lambda_G = list(lambda_perp), list(lambda_G)
    if not (len(weights) == len(reps) == len(lambda_perp) == len(lambda_G)):
        raise ValueError(f"got {len(weights)} weights, {len(reps)} rep pairs, {len(lambda_perp)} lambda_perp "
                         f"and {len(lambda_G)} lambda_G: need one of each per layer")
    if not weights:
        raise ValueError("energies_and_grads_many needs at least one layer")
    chosen = _check_many(weights, reps, backend)
    parts: list = [None] * len(weights)
    fused: dict = {}
    cps = [ops.as_coefficient(c, w, f"lambda_perp[{i}]") for i, (c, w) in enumerate(zip(lambda_perp, weights))]
    cgs = [ops.as_coefficient(c, w, f"lambda_G[{i}]") for i, (c, w) in enumerate(zip(lambda_G, weights))]
    for i, b in enumerate(chosen):
        if b in ("cpp", "triton"):
            fused.setdefault(weights[i].device, []).append(i)
        else:
            parts[i] = _unfused_energies_and_grad(weights[i], *reps[i], cps[i], cgs[i], reference=b == "reference")
    for dev, idx in fused.items():
        eps, egs, grads = ops.fused_energies_and_grads(
            [weights[i] for i in idx], [ops.plan_for(*reps[i], dev) for i in idx],
            [cps[i] for i in idx], [cgs[i] for i in idx])
        for i, e_p, e_g, g in zip(idx, eps, egs, grads):
            parts[i] = (e_p, e_g, g)
    dt = torch.float64 if all(w.dtype == torch.float64 for w in weights) else torch.float32
    e_perp = torch.stack([p[0].to(dt) for p in parts])
    e_g = torch.stack([p[1].to(dt) for p in parts])
    _check_finite(e_perp, e_g)
    return e_perp, e_g, [p[2] for p in parts]


def _check_many(weights, reps, backend) -> list[str]:
    """Check each (weight, rep pair) and return the backend each one takes."""
    chosen = []
    for i, (w, pair) in enumerate(zip(weights, reps)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"reps[{i}] must be a pair (rep_in, rep_out), got {type(pair).__name__}")
        check_arguments(w, pair[0], pair[1])
        chosen.append(ops.backend_for(backend, w))
    return chosen


def _unfused_energies_and_grad(W, rep_in, rep_out, c_perp, c_g, reference: bool):
    """The ``"torch"`` / ``"reference"`` backends of :func:`energies_and_grads_many`."""
    with torch.no_grad():
        if reference:
            from . import reference as ref

            W64 = W.to(torch.float64)
            PW = ref.project(W64, rep_in, rep_out)
            R = W64 - PW
        else:
            plan, t, Wh, PWh = _spectral_parts(W, rep_in, rep_out)
            R, PW = from_spectral(Wh - PWh, plan, t), from_spectral(PWh, plan, t)
        e_perp, e_g = R.square().sum((-2, -1)), PW.square().sum((-2, -1))
        c_perp, c_g = (c.to(R.dtype)[..., None, None] for c in (c_perp, c_g))
        grad = (2 * c_perp * R + 2 * c_g * PW).to(W.dtype)
    return e_perp, e_g, grad


def energies_many(weights, reps, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of many layers at once (all declared layers of a model).

    Args:
        weights: sequence of L weights, the i-th of shape ``[rep_out_i.dim, rep_in_i.dim]``
            (leading batch dims are allowed if every weight has the same ones).
        reps: sequence of L pairs ``(rep_in_i, rep_out_i)``.
    Returns:
        ``(E_perp, E_G)``, each ``[L]`` float32 (float64 if every weight is float64), differentiable.

    The layers that the fused op takes (see ``backend``) go through one call of
    ``equiproj::fused_energies`` per device: a constant number of kernel launches for any L; its
    backward is one more call. The others run the pure-torch path layer by layer.
    """
    weights, reps = list(weights), list(reps)
    if len(weights) != len(reps):
        raise ValueError(f"got {len(weights)} weights but {len(reps)} rep pairs")
    if not weights:
        raise ValueError("energies_many needs at least one layer")
    chosen = _check_many(weights, reps, backend)
    parts: list = [None] * len(weights)
    fused: dict = {}  # device -> layer indices
    for i, b in enumerate(chosen):
        if b in ("cpp", "triton"):
            fused.setdefault(weights[i].device, []).append(i)
        elif b == "reference":
            parts[i] = _reference_energies(weights[i], *reps[i])
        else:
            parts[i] = _torch_energies(weights[i], *reps[i])
    for dev, idx in fused.items():
        eps, egs = ops.fused_energies([weights[i] for i in idx], [ops.plan_for(*reps[i], dev) for i in idx])
        for i, e_p, e_g in zip(idx, eps, egs):
            parts[i] = (e_p, e_g)
    dt = torch.float64 if all(w.dtype == torch.float64 for w in weights) else torch.float32
    e_perp = torch.stack([p[0].to(dt) for p in parts])
    e_g = torch.stack([p[1].to(dt) for p in parts])
    _check_finite(e_perp, e_g)
    return e_perp, e_g
