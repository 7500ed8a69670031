"""The C++ passes of steerable conv layers bound once to their weights and tables.

:func:`kernel_pass_runners` makes, for each layer, the call its CPU route issues (the pixel-tile
kernel, the closed form of regular fields or the factorised blocks) with everything but the
coefficients and the output fixed. The penalty's program prepares them when it is built and calls
them every step: the checks, plan lookups and coefficient tensors of the general entry point cost
170-370 µs per call, more than a small layer's pass (docs/benchmarks.md). :func:`pass_energies` makes
the differentiable energies of such layers from the same passes: the energies alone in the forward,
one gradient pass in the backward."""

from __future__ import annotations

import torch

from ._factorised import factorised_plan
from ._pixel_plan import tile_kernel_tables, tile_runner

__all__ = ["kernel_pass_runners", "pass_energies"]


def kernel_pass_runners(weights, spaces, reps, space_type=None) -> list | None:
    """The C++ pass of each layer with its tables bound, as
    :func:`~equiproj.kernel_spaces.kernel_energies_and_grads_many` takes it on the CPU (the pixel-tile
    kernel, the closed form of regular fields or the factorised blocks): ``run(lambda_perp, lambda_G,
    out, write) -> (E_perp [1], E_G [1])`` (float64), the lambdas float64 ``[1]``, ``write`` 0 (the
    energies alone, ``out`` ``None``), 1 (the gradient ``2 lambda_perp (K - P K) + 2 lambda_G P K``
    written into ``out``) or 2 (added into ``out``); ``out`` is contiguous with the weight's shape and
    dtype and may be the weight itself (the decoupled step). Made once, a call is the op's alone: no
    checks, plans or tables looked up again, which cost more than a small layer's pass (the penalty's
    prepared program calls them every step). ``None`` unless every weight is an unbatched, contiguous
    float32 or float64 CPU tensor whose layer has such a pass; the caller then takes
    :func:`~equiproj.kernel_spaces.kernel_energies_and_grads_many`. Also ``None`` for a ``space_type``
    that overrides the many-layer routes (``energies_many``, ``energies_and_grads_many``) of the class
    that gives it ``pass_runners``: its own routes are then what it computes."""
    if space_type is not None:
        owner = next(c for c in space_type.__mro__ if "pass_runners" in vars(c))
        if any(getattr(space_type, f) is not getattr(owner, f) for f in ("energies_many", "energies_and_grads_many")):
            return None
    runners = []
    for w, sp, (ri, ro) in zip(weights, spaces, reps, strict=True):
        sp._check(w, ri, ro)
        if (w.dim() != 2 + sp.spatial_dims or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64)
                or not w.is_contiguous()):
            return None
        plan = sp.plan(ri, ro)
        tables = tile_kernel_tables(w, plan, None)
        if tables is not None:
            runners.append(tile_runner(w, tables, sp.spatial_dims))
            continue
        if plan.layout == "fields" and plan.packed.identity_perm:  # the fused op on the pixel plan
            return None
        K = sp._pixels(w, ri, ro).unsqueeze(0)
        run = factorised_plan(sp, ri, ro).runner(K)
        if run is None:
            return None
        runners.append(_viewing(run, K.shape))
    return runners


def _viewing(run, shape):
    """``run`` with its ``out`` viewed as ``shape`` (the pass's ``[1, m, n, P]``)."""
    def call(lambda_perp, lambda_G, out, write):
        return run(lambda_perp, lambda_G, None if out is None else out.view(shape), write)
    return call


class _PassEnergies(torch.autograd.Function):
    """``(E_perp, E_G)`` of each weight from its pass (the energies alone: one read), differentiable: the
    backward runs each pass again with the incoming gradients as its coefficients (``dE_perp / dW =
    2 (W - P W)``, ``dE_G / dW = 2 P W``), writing the gradient into a fresh tensor (one read, one
    write). Not differentiable twice, as the fused op."""

    @staticmethod
    def forward(ctx, runners, *weights):
        ctx.runners = runners
        ctx.save_for_backward(*weights)  # an in-place change before the backward is refused
        zero = torch.zeros(1, dtype=torch.float64)
        out = []
        for run, w in zip(runners, weights):
            ep, eg = run(zero, zero, None, 0)
            out += [ep.reshape(()).to(w.dtype), eg.reshape(()).to(w.dtype)]
        return tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        weights = ctx.saved_tensors
        out = [None]
        for k, (run, w) in enumerate(zip(ctx.runners, weights)):
            g_perp, g_G = grads[2 * k], grads[2 * k + 1]
            if not ctx.needs_input_grad[1 + k] or (g_perp is None and g_G is None):
                out.append(None)
                continue
            lp, lg = (torch.zeros(1, dtype=torch.float64) if g is None else g.detach().reshape(1).to(torch.float64)
                      for g in (g_perp, g_G))
            grad = torch.empty(w.shape, dtype=w.dtype)
            run(lp, lg, grad, 1)
            out.append(grad)
        return tuple(out)


def pass_energies(weights, spaces, reps):
    """``(E_perp, E_G)`` (lists, one 0-dim tensor per layer in its weight's dtype) of steerable conv layers
    through their C++ passes, differentiable (:class:`_PassEnergies`: one read of each weight, and one
    pass in the backward), or ``None`` where :func:`kernel_pass_runners` has no pass for a layer."""
    runners = kernel_pass_runners([w.detach() for w in weights], spaces, reps)
    if runners is None:
        return None
    flat = _PassEnergies.apply(runners, *weights)
    return list(flat[0::2]), list(flat[1::2])
