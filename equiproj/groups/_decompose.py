"""Numerical decomposition of a real orthogonal representation into the group's own irreps.

Given ``rho`` (as a function of group elements), find an orthogonal ``Q`` with
``rho(g) = Q (⊕_s psi_s(g)) Q^T`` where each ``psi_s`` is *exactly* one of ``G.irreps()``
(the same matrices, not merely an equivalent irrep). Steps, per irrep ``psi`` (dim d,
commutant dimension r):

1. the isotypic projector ``(d / r) ∫ tr psi(g) rho(g) dg`` (exact quadrature) gives the
   subspace V carrying all copies of psi;
2. twirling random matrices ``∫ rho_V(g) X psi(g)^T dg`` spans ``Hom_G(psi, rho_V)``
   (dimension m r for m copies);
3. a Gram-Schmidt over the commutant (``T_j -= T_i (T_i^T T_j)``, valid for real, complex and
   quaternionic type alike because ``T_i^T T_j`` lies in End(psi)) extracts m isometric
   intertwiners, whose columns become columns of Q.

The result is verified against ``rho`` at random elements before it is returned.

:func:`decompose_by_projection` is the faster route for a representation already known to be one
(an irrep of a larger group restricted to a subgroup): multiplicities from characters, and each copy
from the projection operators ``P_j1 = (d/|G|) sum_g psi(g)_j1 rho(g)`` (docs/math.md §10).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ._commutant import _COMMUTANT_DIM
from ._threads import one_thread

__all__ = ["decompose", "decompose_by_projection", "check_representation", "isometric_intertwiners", "block_diag_irreps",
           "verify_decomposition"]


def check_representation(group, fn: Callable, dim: int, what: str = "fn", tol: float = 1e-6) -> None:
    """Raise ``ValueError`` unless ``fn`` is an orthogonal homomorphism on random elements (to ``tol``)."""
    gen = torch.Generator().manual_seed(1234)
    g1 = group.sample(6, generator=gen)
    g2 = group.sample(6, generator=gen)
    R1, R2, R12 = fn(g1), fn(g2), fn(g1 @ g2)
    eye = torch.eye(dim, dtype=torch.float64)
    for R in (R1, R2, R12):
        if R.shape != (len(g1), dim, dim):
            raise ValueError(f"{what} must map elements [n, dG, dG] to [n, {dim}, {dim}]; got shape {tuple(R.shape)} for n = {len(g1)}")
        if not torch.isfinite(R).all():
            raise ValueError(f"{what} returned NaN or Inf")
    orth = (R1.transpose(-1, -2) @ R1 - eye).abs().amax()
    if not orth < tol:
        raise ValueError(f"{what} is not orthogonal: max |rho(g)^T rho(g) - I| = {float(orth):.2e}")
    hom = (R12 - R1 @ R2).abs().amax()
    if not hom < tol:
        raise ValueError(f"{what} is not a homomorphism: max |rho(g h) - rho(g) rho(h)| = {float(hom):.2e}")


def isometric_intertwiners(basis: torch.Tensor, m: int, d: int) -> torch.Tensor:
    """From a basis ``[m r, k, d]`` of Hom(psi, rho_V) pick m intertwiners with ``T_i^T T_j = delta_ij I``
    (``[k, m d]``). ``T_i^T T_j`` commutes with psi, so subtracting ``S (S^T T)`` keeps T an
    intertwiner for all three irrep types; the largest remaining candidate is normalised each round."""
    cands = list(basis)
    isos: list[torch.Tensor] = []
    while len(isos) < m:
        best, best_a, best_i = None, 0.0, -1
        for i, T in enumerate(cands):
            for S in isos:
                T = T - S @ (S.T @ T)
            cands[i] = T
            a = float(torch.trace(T.T @ T)) / d
            if a > best_a:
                best, best_a, best_i = T, a, i
        if best is None or best_a < 1e-10:
            raise ValueError("numerical decomposition failed: intertwiner space is degenerate")
        isos.append(best / best_a**0.5)
        cands.pop(best_i)
    return torch.cat(isos, dim=-1)


@one_thread
def decompose(group, fn: Callable, dim: int, band_limit: int | None = None, seed: int = 0, tol: float = 1e-8):
    """Decompose ``fn`` (``[..., dG, dG] -> [..., dim, dim]``) into irreps.

    Returns ``(slots, Q)``: the irreps in the order of Q's column blocks, and ``Q`` ``[dim, dim]``
    float64. ``band_limit`` bounds the frequencies of a continuous group's irreps that may occur
    (required for continuous groups). ``tol``: how closely ``Q (⊕ slots) Q^T`` must reproduce
    ``fn`` (1e-8; float32 matrices need about 1e-6). Raises ``ValueError`` if ``fn`` does not decompose.
    """
    finite = group.is_finite
    if not finite and band_limit is None:
        raise ValueError(f"decomposing a representation of {group} needs a band_limit")
    g, w = group.haar_quadrature(2 * (band_limit or 0))
    R = fn(g).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    cols, slots, total = [], [], 0
    for psi in group.irreps(None if finite else band_limit):
        d, r = psi.dim, psi.endomorphism_basis.shape[0]
        Psi = psi.matrix(g, check=False)
        chi = Psi.diagonal(dim1=-2, dim2=-1).sum(-1)
        P = (d / r) * torch.einsum("p,p,pij->ij", w, chi, R)
        k_float = float(torch.trace(P))
        k = round(k_float)
        if k == 0:
            continue
        if abs(k - k_float) > max(1e-6, 100 * tol) or k % d:
            raise ValueError(f"not a representation of {group} within band limit {band_limit} "
                             f"(isotypic dimension of {psi} is {k_float:.4f})")
        evals, evecs = torch.linalg.eigh((P + P.T) / 2)
        V = evecs[:, -k:]
        RV = V.T @ R @ V
        m = k // d
        X = torch.randn(m * r + 4, k, d, generator=gen, dtype=torch.float64)
        T = torch.einsum("p,pab,nbc,pdc->nad", w, RV, X, Psi)
        _, _, Vh = torch.linalg.svd(T.reshape(len(X), k * d), full_matrices=False)
        basis = Vh[: m * r].reshape(m * r, k, d)
        cols.append(V @ isometric_intertwiners(basis, m, d))
        slots += [psi] * m
        total += k
    if total != dim:
        raise ValueError(f"representation of dimension {dim} does not decompose into irreps of {group}"
                         + (f" up to band limit {band_limit}" if not finite else "") + f" (found {total} dims)")
    Q = torch.cat(cols, dim=-1)
    # snap to the nearest orthogonal matrix (removes rounding from the Gram-Schmidt)
    U, _, Vh = torch.linalg.svd(Q)
    Q = U @ Vh
    verify_decomposition(group, fn, slots, Q, tol, band_limit)
    return slots, Q


@one_thread
def decompose_by_projection(group, fn: Callable, dim: int, band_limit: int | None = None, tol: float = 1e-8):
    """:func:`decompose` for an orthogonal representation ``fn`` computed in float64, by projection
    operators instead of eigen- and singular value decompositions: the same ``(slots, Q)`` contract.

    For an irrep ``psi`` of dimension ``d`` and commutant dimension ``r``, the character inner product
    gives ``m r`` (``m`` copies), and ``P_j1 = (d / |G|) sum_g psi(g)_j1 rho(g)`` (a Haar quadrature for
    a continuous group) maps a unit vector ``v`` of the range of ``P_11`` to ``T e_j`` for an isometric
    intertwiner ``T`` from ``psi`` into ``rho``: for every type, since ``(1/|G|) sum_g psi_ij psi_kl =
    (1/d) sum_E E_ik E_jl`` over an orthonormal basis ``E`` of the commutant. A copy's columns are
    ``P_j1 v``; the next ``v`` is the column of ``P_11`` farthest from the copies taken (their span is
    invariant, so what remains is in the range of ``P_11`` and orthogonal to them). The result is
    checked on the generators of a finite group (both sides are homomorphisms: that is every element)
    and at random elements of a continuous one."""
    finite = group.is_finite
    if not finite and band_limit is None:
        raise ValueError(f"decomposing a representation of {group} needs a band_limit")
    g, w, irreps = _quadrature_irreps(group, band_limit)
    check = group.generators() if finite else group.sample(8, generator=torch.Generator().manual_seed(99))
    R_all = fn(torch.cat([g, check])).to(torch.float64)  # one call: the quadrature, then the elements to check
    R, R_check = R_all[: len(g)], R_all[len(g):]
    Rw = (R * w[:, None, None]).reshape(len(g), dim * dim)  # the weights folded in once
    chi = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    cols, slots, total = [], [], 0
    for psi, Psi, psi_chi in irreps:
        d, r = psi.dim, _COMMUTANT_DIM[psi.type]
        mr = float((w * chi * psi_chi).sum())
        m = round(mr / r)
        if abs(m * r - mr) > 1e-6:
            raise ValueError(f"not a representation of {group} within band limit {band_limit} "
                             f"(the character inner product with {psi} is {mr:.4f})")
        if m == 0:
            continue
        P = (d * Psi[:, :, 0].T @ Rw).reshape(d, dim, dim)  # P[j] = P_j1
        C = P[0].clone()  # the range of P_11: what is left of it after each copy
        for _ in range(m):
            norms = C.square().sum(0)
            j = int(norms.argmax())
            if not float(norms[j]) > 1e-6:
                raise ValueError(f"numerical decomposition failed: {psi} occurs {m} times but its projector "
                                 "has a smaller range")
            v = C[:, j] / norms[j].sqrt()
            T = (P @ v).T  # [dim, d]: the copy's columns T e_j = P_j1 v
            cols.append(T)
            C = C - T @ (T.T @ C)
        slots += [psi] * m
        total += m * d
    if total != dim:
        raise ValueError(f"representation of dimension {dim} does not decompose into irreps of {group}"
                         + (f" up to band limit {band_limit}" if not finite else "") + f" (found {total} dims)")
    Q = torch.cat(cols, dim=-1)
    U, _, Vh = torch.linalg.svd(Q)  # the nearest orthogonal matrix: removes rounding
    Q = U @ Vh
    err = float((R_check - Q @ block_diag_irreps(slots, check) @ Q.T).abs().amax())
    if not err < tol:
        band = (f": irreps of frequency above the band limit {band_limit} occur (pass a larger band_limit)"
                if not finite else ": it is not an orthogonal representation computed in float64")
        raise ValueError(f"the decomposition into irreps of {group} reproduces the representation only to "
                         f"{err:.1e} (needed: {tol:.0e}){band}")
    return slots, Q


@functools.lru_cache(maxsize=256)  # small tables: |G| (or a quadrature of the band limit) irrep matrices
def _quadrature_irreps(group, band_limit):
    """The Haar quadrature ``(g, w)`` of ``group`` for the band limit and, per irrep, its matrices and
    character there: computed once per group for all the representations restricted to it."""
    g, w = group.haar_quadrature(2 * (band_limit or 0))
    irreps = []
    for psi in group.irreps(None if group.is_finite else band_limit):
        Psi = psi.matrix(g, check=False).to(torch.float64)
        irreps.append((psi, Psi, Psi.diagonal(dim1=-2, dim2=-1).sum(-1)))
    return g, w, tuple(irreps)


def block_diag_irreps(slots, g: torch.Tensor) -> torch.Tensor:
    """``⊕_s psi_s(g)``: ``[..., D, D]`` for the irreps ``slots`` at elements ``g``."""
    D = sum(s.dim for s in slots)
    out = torch.zeros(g.shape[:-2] + (D, D), dtype=torch.float64, device=g.device)
    o = 0
    for s in slots:
        out[..., o : o + s.dim, o : o + s.dim] = s.matrix(g, check=False)
        o += s.dim
    return out


@one_thread
def verify_decomposition(group, fn, slots, Q, tol: float = 1e-8, band_limit: int | None = None) -> None:
    """Raise ``ValueError`` unless ``fn(g) = Q (⊕ slots(g)) Q^T`` to ``tol`` at random elements."""
    g = group.sample(8, generator=torch.Generator().manual_seed(99))
    err = float((fn(g).to(torch.float64) - Q @ block_diag_irreps(slots, g) @ Q.T).abs().amax())
    if not err < tol:
        band = (f"; or irreps of frequency above the band limit {band_limit} occur (pass a larger band_limit)"
                if band_limit is not None and not group.is_finite else "")
        raise ValueError(f"the decomposition into irreps of {group} reproduces fn only to {err:.1e} (needed: {tol:.0e}): "
                         f"fn's matrices are not that accurate (matrices computed in float32 are accurate to about 1e-7: "
                         f"return them as float32, which is decomposed at float32 precision, or compute them in float64)"
                         f"{band}")
