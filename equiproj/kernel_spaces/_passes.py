"""The C++ passes of steerable conv layers bound once to their weights and tables.

:func:`kernel_pass_runners` makes, for each layer, the call its CPU route issues (the pixel-tile
kernel, the closed form of regular fields or the factorised blocks) with everything but the
coefficients and the output fixed. The penalty's program prepares them when it is built and calls
them every step: the checks, plan lookups and coefficient tensors of the general entry point cost
170-370 µs per call, more than a small layer's pass (docs/benchmarks.md)."""

from __future__ import annotations

import torch

from ._factorised import factorised_plan
from ._pixel_plan import tile_kernel_tables, tile_runner

__all__ = ["kernel_pass_runners"]


def kernel_pass_runners(weights, spaces, reps) -> list | None:
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
    :func:`~equiproj.kernel_spaces.kernel_energies_and_grads_many`."""
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
