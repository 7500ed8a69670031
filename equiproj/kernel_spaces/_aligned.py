"""Orthonormal coordinates of the band in which G acts orthogonally and V is the equivariant part.

In the coordinates ``a = K B`` of an orthonormal basis ``B`` of the band ``S``, the coefficient maps
``h`` equivariant for ``rho_out ⊗ (rho_in ⊗ sigma)`` form a subspace ``E`` of each tile, while the
sampled equivariant kernels ``h Phi^T = h L^T B^T`` (``L = B^T Phi``) form ``F = E L^T``. The two
agree only when ``Phi^T Phi`` commutes with ``sigma`` (the grid's own symmetries). The *direct
rotation* ``R`` from ``E`` to ``F`` (the rotation in the planes of their principal vectors, the
identity on ``(E + F)^perp``) is orthogonal and maps ``E`` onto ``F`` and ``E^perp`` onto ``F^perp``,
so in the coordinates ``b = R^T a``

* ``||b|| = ||K B B^T||`` (an isometry of the band),
* ``G`` acts orthogonally by ``rho_out(g) b (rho_in(g) ⊗ sigma(g))^T`` with fixed points exactly V,

which is what an orbit estimator needs: the Haar average of ``||g·b - b||^2`` is
``2 ||b - P_E b||^2 = 2 ||K_S - P K||^2`` (docs/math.md §2, §6). Per principal pair
(``e_i in E``, ``f_i = c_i e_i + u_i``, ``u_i ⊥ E``, ``|u_i| = sin theta_i``):
``R = I + sum_i (c_i - 1) e_i e_i^T - u_i u_i^T / (1 + c_i) + u_i e_i^T - e_i u_i^T`` (no division by a
small sine), applied per tile at ``4 r`` flops per entry.
"""

from __future__ import annotations


import torch

from .._caches import bytes_cached
from ._pixel_plan import _orthonormal_rows, hom_basis

__all__ = ["direct_rotation", "rotate_tiles"]


@bytes_cached("equiproj.kernel_spaces._aligned.direct_rotation")
def direct_rotation(space, field_in, field_out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e [r, t], u [r, t], c [r])`` float64 of one field pair's tile (``t = d_out d_in D``, band
    coordinates ``a = K B``): principal vectors of ``E``, the parts of ``F``'s principal vectors
    orthogonal to ``E``, and the cosines of the principal angles."""
    H = hom_basis(space, field_in, field_out)
    r = len(H)
    if r == 0:
        z = torch.zeros(0, field_out.dim * field_in.dim * space.dim, dtype=torch.float64)
        return z, z.clone(), torch.zeros(0, dtype=torch.float64)
    L = space.basis.T @ space.sampled  # [D, D]
    QE = H.reshape(r, -1)
    QF = _orthonormal_rows((H @ L.T).reshape(r, -1), f"{space.group}, {field_out.name} <- {field_in.name}")
    Y, c, Zh = torch.linalg.svd(QE @ QF.T)
    e, f = Y.T @ QE, Zh @ QF
    c = c.clamp(0.0, 1.0)
    return e, f - c[:, None] * e, c


def rotate_tiles(space, a: torch.Tensor, rep_in, rep_out, inverse: bool) -> torch.Tensor:
    """``a [..., m, n, D]`` (band coordinates, user channel order) -> ``R^T a`` tile by tile
    (``inverse=False``: band -> aligned coordinates) or ``R a`` (``inverse=True``); differentiable."""
    X = a
    if rep_out.perm is not None:
        X = X.index_select(-3, rep_out.perm.to(X.device))
    if rep_in.perm is not None:
        X = X.index_select(-2, rep_in.perm.to(X.device))
    out = X.clone()
    batch, D = X.shape[:-3], X.shape[-1]
    oo = 0
    for co, fo in rep_out.segments:
        oi = 0
        for ci, fi in rep_in.segments:
            e, u, c = (t.to(device=X.device, dtype=X.dtype) for t in direct_rotation(space, fi, fo))
            if len(c):
                rows, cols = slice(oo, oo + co * fo.dim), slice(oi, oi + ci * fi.dim)
                T = X[..., rows, cols, :].reshape(batch + (co, fo.dim, ci, fi.dim, D))
                T = T.movedim(-3, -4).reshape(batch + (co, ci, -1))  # [..., co, ci, t]
                pe, pu = T @ e.T, T @ u.T  # [..., co, ci, r]
                if inverse:  # R b = b + E^T((c - 1) Eb - Ub) + U^T(Eb - Ub / (1 + c))
                    Y = T + ((c - 1) * pe - pu) @ e + (pe - pu / (1 + c)) @ u
                else:  # R^T a = a + E^T((c - 1) Ea + Ua) - U^T(Ua / (1 + c) + Ea)
                    Y = T + ((c - 1) * pe + pu) @ e - (pu / (1 + c) + pe) @ u
                Y = Y.reshape(batch + (co, ci, fo.dim, fi.dim, D)).movedim(-4, -3)
                out[..., rows, cols, :] = Y.reshape(batch + (co * fo.dim, ci * fi.dim, D))
            oi += ci * fi.dim
        oo += co * fo.dim
    if rep_in.perm is not None:
        out = out.index_select(-2, torch.argsort(rep_in.perm).to(X.device))
    if rep_out.perm is not None:
        out = out.index_select(-3, torch.argsort(rep_out.perm).to(X.device))
    return out
