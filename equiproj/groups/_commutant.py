"""The commutant of an irrep (the matrices that commute with it): an orthonormal basis of 1, 2 or 4
matrices for a real, complex or quaternionic irrep (docs/math.md §3), known by the irrep's type where
possible, else computed by twirling."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._rep import Irrep

__all__ = ["endomorphism_basis_of", "numerical_endomorphism_basis"]

_COMMUTANT_DIM = {"real": 1, "complex": 2, "quaternionic": 4}


# bounded by entries, not bytes: each value is at most four d x d matrices of one irrep (tiny)
@functools.lru_cache(maxsize=1024)
def endomorphism_basis_of(irrep: Irrep) -> torch.Tensor:
    """Known by the irrep's type: real ``I/sqrt(d)``; complex of dimension 2 (the rotations of C_N,
    SO(2)) ``{I, J}/sqrt(2)`` with ``J`` the quarter turn, checked to commute; anything else numerically."""
    d = irrep.dim
    eye = torch.eye(d, dtype=torch.float64)
    if irrep.type == "real":
        return eye[None] / math.sqrt(d)
    if irrep.type == "complex" and d == 2:
        J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        P = irrep.matrix(irrep.group.generators(), check=False)
        err = float((P @ J - J @ P).abs().amax())
        if err < 1e-9:
            return torch.stack([eye, J]) / math.sqrt(2.0)
    return numerical_endomorphism_basis(irrep)


def numerical_endomorphism_basis(irrep: Irrep) -> torch.Tensor:
    """The commutant by twirling: ``X -> ∫ psi(g) X psi(g)^T dg`` (exact Haar quadrature) projects
    onto it; ``r + 2`` random X span it; Gram-Schmidt from the identity. Cost ``P d^3`` (P quadrature
    points), no ``d^2 x d^2`` problem."""
    d, r = irrep.dim, _COMMUTANT_DIM[irrep.type]
    g, w = irrep.group.haar_quadrature(2 * irrep.band)
    eye = torch.eye(d, dtype=torch.float64)
    X = torch.randn(r + 2, d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = torch.zeros_like(X)
    for k in range(0, len(w), 1024):  # chunks bound the memory to 1024 matrices psi(g)
        P = irrep.matrix(g[k : k + 1024], check=False)
        T += torch.einsum("p,pab,nbc,pdc->nad", w[k : k + 1024], P, X, P)
    _, S, Vh = torch.linalg.svd(T.reshape(len(X), d * d), full_matrices=False)
    found = int((S > 1e-9 * max(1.0, float(S[0]))).sum())
    if found != r:
        raise RuntimeError(f"{irrep}: commutant has dimension {found}, expected {r} for {irrep.type} type")
    basis = [eye.reshape(-1) / math.sqrt(d)]  # Gram-Schmidt from the identity: a canonical first element
    for v in Vh[:r]:
        for b in basis:
            v = v - (b @ v) * b
        if v.norm() > 1e-6:
            basis.append(v / v.norm())
    return torch.stack(basis[:r]).reshape(r, d, d)
