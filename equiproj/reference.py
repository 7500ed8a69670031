"""Spatial-domain reference: the projection as an exact average over the group (docs/math.md §5).

    P(W) = ∫_G rho_out(g)^T W rho_in(g) dg

evaluated in float64 with the group's exact Haar quadrature (``group.haar_quadrature``): the
element sum for finite groups, the trapezoid rule in the angle for SO(2)/O(2), and a product rule
in Euler angles (Gauss-Legendre in cos(beta), uniform in alpha and gamma) for SO(3)/O(3).
Nothing here uses the irrep decomposition; only ``rep.matrix`` and the band limits of the reps
(to size the quadrature). It is slow (one pair of matrix products per quadrature point) and meant
for verification; it is also the ``"reference"`` backend of the energy functions.
"""

from __future__ import annotations

import torch

from .groups import check_rep_pair

__all__ = ["haar_quadrature", "project", "energies", "noneq_energy", "eq_energy", "orbit_defect"]


def haar_quadrature(group, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements ``[P, d, d]`` and weights ``[P]`` (summing to 1) such that
    ``sum_p w_p f(g_p) = ∫_G f(g) dg`` exactly for every matrix coefficient ``f`` of an irrep
    of frequency/degree ``<= degree`` (all functions, for finite groups)."""
    return group.haar_quadrature(degree)


def _check(W, rep_in, rep_out):
    check_rep_pair(rep_in, rep_out)
    if W.dim() < 2 or W.shape[-2:] != (rep_out.dim, rep_in.dim):
        raise ValueError(f"W must have shape [..., {rep_out.dim}, {rep_in.dim}], got {tuple(W.shape)}")
    return W.to(torch.float64)


def _points(rep_in, rep_out, degree):
    if degree is None:
        degree = rep_in.band_limit + rep_out.band_limit
    g, w = rep_in.group.haar_quadrature(degree)
    return rep_out.matrix(g), rep_in.matrix(g), w


def project(W: torch.Tensor, rep_in, rep_out, degree: int | None = None) -> torch.Tensor:
    """P(W) in float64, ``[..., m, n] -> [..., m, n]``, by exact quadrature over the group."""
    W = _check(W, rep_in, rep_out)
    Ro, Ri, w = _points(rep_in, rep_out, degree)
    Ro, Ri, w = Ro.to(W.device), Ri.to(W.device), w.to(W.device)
    out = torch.zeros_like(W)
    for k in range(0, len(w), 256):  # chunks bound the memory to 256 copies of W
        s = slice(k, k + 256)
        out = out + torch.einsum("p,pai,...ab,pbj->...ij", w[s], Ro[s], W, Ri[s])
    return out


def energies(W, rep_in, rep_out, degree=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||W - P W||^2, ||P W||^2)`` in float64, each ``[...]``."""
    W = _check(W, rep_in, rep_out)
    PW = project(W, rep_in, rep_out, degree)
    return (W - PW).square().sum((-2, -1)), PW.square().sum((-2, -1))


def noneq_energy(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """||W - P W||^2 in float64, ``[...]``."""
    W = _check(W, rep_in, rep_out)
    return (W - project(W, rep_in, rep_out, degree)).square().sum((-2, -1))


def eq_energy(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """||P W||^2 in float64, ``[...]``."""
    return project(W, rep_in, rep_out, degree).square().sum((-2, -1))


def orbit_defect(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """∫_G ||rho_out(g) W - W rho_in(g)||^2 dg in float64 (equals 2 E_perp: the orbit identity of docs/math.md §2)."""
    W = _check(W, rep_in, rep_out)
    Ro, Ri, w = _points(rep_in, rep_out, degree)
    Ro, Ri, w = Ro.to(W.device), Ri.to(W.device), w.to(W.device)
    d = torch.einsum("pai,...ij->p...aj", Ro, W) - torch.einsum("...ai,pij->p...aj", W, Ri)
    return torch.einsum("p,p...->...", w, d.square().sum((-2, -1)))
