"""Fused energy kernels (``equiproj.kernels``): E_perp, E_G and the penalty gradient of many layers.

* :func:`fused_energies`: the Triton kernel (CUDA tensors; CPU tensors under
  ``TRITON_INTERPRET=1``). Importing it imports triton; ``None`` when triton cannot be imported
  (:data:`HAS_TRITON` says so). Both are resolved on first access, so the pure-torch twin never
  pays for the triton import.
* :func:`torch_fused_energies` / :func:`torch_project`: the annotated pure-torch twin, any device,
  also float64 weights; the library's ``"torch"`` backend.

Both fused functions take ``(weights, plans, lambda_perp, lambda_G)``: weights ``[..., m_i, n_i]``, packed
plans (:func:`equiproj._plan.plan_for`), coefficients ``[L]`` or ``None``, and return
``(e_perp, e_g, grads)`` (lists; ``grads`` is ``None`` without coefficients).
"""

from .schedule import MAX_TILE_ELEMENTS
from .torch_twin import torch_fused_energies, torch_project

__all__ = ["fused_energies", "torch_fused_energies", "torch_project", "supports", "HAS_TRITON", "MAX_TILE_ELEMENTS"]


def __getattr__(name):
    if name in ("fused_energies", "HAS_TRITON"):
        try:
            from .triton_energies import fused_energies
        except ImportError:  # triton absent (or too old to import): the twin still works
            fused_energies = None
        globals().update(fused_energies=fused_energies, HAS_TRITON=fused_energies is not None)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supports(plan) -> bool:
    """Whether :func:`fused_energies` takes this plan: every field pair's padded tile
    ``pow2(d_out) * pow2(d_in)`` is at most ``MAX_TILE_ELEMENTS`` (fields of dimension <= 128)."""

    def pow2(x):
        return 1 << (int(x) - 1).bit_length()

    return all(pow2(r.d_out) * pow2(r.d_in) <= MAX_TILE_ELEMENTS for r in plan.rows())
