"""Fused energy kernels (``equiproj.kernels``): E_perp, E_G and the penalty gradient of many layers.

* :func:`fused_energies` — the Triton kernel (CUDA tensors; CPU tensors under
  ``TRITON_INTERPRET=1``). ``None`` when triton cannot be imported (``HAS_TRITON`` says so).
* :func:`torch_fused_energies` — its pure-torch twin with the same signature, any device, also
  float64 weights. Always importable.

Both take ``(weights, plans, c_perp, c_g)``: weights ``[..., m_i, n_i]``, plans
``block_plan(rep_in_i, rep_out_i).packed(device, torch.float32)``, coefficients ``[L]`` or ``None``,
and return ``(e_perp, e_g, grads)`` (lists; ``grads`` is ``None`` without coefficients).
"""

from .schedule import MAX_TILE_ELEMENTS
from .torch_twin import torch_fused_energies

try:
    from .triton_energies import fused_energies
except ImportError:  # triton absent (or too old to import): the twin still works
    fused_energies = None
    HAS_TRITON = False
else:
    HAS_TRITON = True


def supports(plan) -> bool:
    """Whether :func:`fused_energies` takes this plan: every field pair's padded tile
    ``pow2(d_out) * pow2(d_in)`` is at most ``MAX_TILE_ELEMENTS`` (fields of dimension <= 128)."""
    meta = plan.meta.cpu()
    if meta.numel() == 0:
        return True

    def pow2(x):
        return 1 << (int(x) - 1).bit_length()

    return max(pow2(do) * pow2(di) for do, di in meta[:, 4:6].tolist()) <= MAX_TILE_ELEMENTS


__all__ = ["fused_energies", "torch_fused_energies", "supports", "HAS_TRITON", "MAX_TILE_ELEMENTS"]
