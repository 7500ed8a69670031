"""Pure-torch twin of the fused Triton kernel: the same contract on any device.

It executes a :class:`~equiproj.plan.PackedPlan` tile by tile with batched einsums (one group
of torch ops per field pair), so it is a readable statement of what the kernel computes, the
kernel tests' second oracle, and a fallback where Triton is absent.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from equiproj.plan import PackedPlan

from .inputs import check_inputs

__all__ = ["torch_fused_energies"]

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 256


def _plan_parts(P: PackedPlan, device, dtype):
    """(meta rows, perm_out, perm_in, inverse perms, bases per pair) on ``device``, cached per plan."""
    key = (id(P), torch.device(device), dtype)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is P:
        _CACHE.move_to_end(key)
        return hit[1]
    meta = P.meta.cpu().tolist()
    basis = P.basis.to(device=device, dtype=dtype)
    bases = [basis[bo : bo + r * do * di].reshape(r, do, di) for (_, _, _, _, do, di, r, bo) in meta]
    perms = None
    if not P.identity_perm:
        po, pi = P.perm_out.to(device), P.perm_in.to(device)
        perms = (po, pi, torch.argsort(po), torch.argsort(pi))
    parts = (meta, perms, bases)
    _CACHE[key] = (P, parts)  # holding P keeps id(P) from being reused while cached
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return parts


def torch_fused_energies(weights, plans, c_perp=None, c_g=None):
    """Energies (and optionally gradients) of many layers from their packed plans, in pure torch.

    Args:
        weights: L tensors, the i-th ``[..., m_i, n_i]`` (any strides; leading dims are a batch),
            float16 / bfloat16 / float32 (energies in float32) or float64 (energies in float64).
        plans: L :class:`~equiproj.plan.PackedPlan` (basis float32 or float64), the i-th for
            ``W_i``'s (rep_in, rep_out).
        c_perp, c_g: ``[L]`` coefficients of the penalty ``sum_i c_perp_i E_perp_i + c_g_i E_G_i``,
            or both ``None`` for no gradients.
    Returns:
        ``(e_perp, e_g, grads)``: lists of L tensors ``[...]`` (energy per matrix), and
        ``grads[i] = 2 c_perp_i (W_i - P W_i) + 2 c_g_i P W_i`` ``[..., m_i, n_i]`` in W_i's dtype
        (``None`` without coefficients). Results are detached from autograd.

    Example::

        >>> G = equiproj.SO3(); r = equiproj.Rep.parse(G, "2x0 + 1")
        >>> P = block_plan(r, r).packed("cpu", torch.float32)
        >>> (ep,), (eg,), (g,) = torch_fused_energies([torch.randn(5, 5)], [P], torch.ones(1), torch.zeros(1))
    """
    weights, plans, c_perp, c_g = check_inputs(weights, plans, c_perp, c_g, allow_float64=True)
    want_grad = c_perp is not None
    e_perp, e_g, grads = [], [], []
    for i, (W, P) in enumerate(zip(weights, plans)):
        cd = torch.float64 if W.dtype == torch.float64 else torch.float32
        meta, perms, bases = _plan_parts(P, W.device, cd)
        X = W.detach().to(cd)
        if perms is not None:  # structured coordinates
            X = X.index_select(-2, perms[0]).index_select(-1, perms[1])
        batch = X.shape[:-2]
        ep = torch.zeros(batch, dtype=cd, device=W.device)
        eg = torch.zeros(batch, dtype=cd, device=W.device)
        if want_grad:
            cp2 = 2 * c_perp[i].to(device=W.device, dtype=cd)
            cg2 = 2 * c_g[i].to(device=W.device, dtype=cd)
            Gs = torch.empty_like(X)
        for (oo, io, co, ci, do, di, r, _), A in zip(meta, bases):
            rows, cols = slice(oo, oo + co * do), slice(io, io + ci * di)
            T = X[..., rows, cols].reshape(batch + (co, do, ci, di))
            if r:
                coef = torch.einsum("...uavb,kab->...uvk", T, A)
                PT = torch.einsum("...uvk,kab->...uavb", coef, A)
                R = T - PT
                eg = eg + coef.square().sum((-3, -2, -1))
            else:
                PT, R = None, T
            ep = ep + R.square().sum((-4, -3, -2, -1))
            if want_grad:
                g = cp2 * R if PT is None else cp2 * R + cg2 * PT
                Gs[..., rows, cols] = g.reshape(batch + (co * do, ci * di))
        e_perp.append(ep)
        e_g.append(eg)
        if want_grad:
            if perms is not None:  # back to user coordinates
                Gs = Gs.index_select(-2, perms[2]).index_select(-1, perms[3])
            grads.append(Gs.to(W.dtype))
    return e_perp, e_g, (grads if want_grad else None)
