"""Spatial-domain reference: the projection as an exact average over the group (docs/math.md §5).

    P(W) = ∫_G rho_out(g)^T W rho_in(g) dg

evaluated in float64 with the group's exact Haar quadrature (``group.haar_quadrature``): the
element sum for finite groups, the trapezoid rule in the angle for SO(2)/O(2), and a product rule
in Euler angles (Gauss-Legendre in cos(beta), uniform in alpha and gamma) for SO(3)/O(3).
Nothing here uses the irrep decomposition; only ``rep.matrix`` and the band limits of the reps
(to size the quadrature). It is slow (one pair of matrix products per quadrature point) and meant
for verification; it is also the ``"reference"`` backend of the energy functions. The quadrature
grows with the band limits (SO(3): ``(D+1)^2 (D/2+1)`` points for ``D = l_in + l_out``); above
:data:`MAX_QUADRATURE_POINTS` points, or above :data:`MAX_FLOPS` floating-point operations (a few
seconds), it refuses (the spectral backends have no such limit).
"""

from __future__ import annotations

import torch

from .groups import check_rep_pair

__all__ = ["haar_quadrature", "project", "energies", "orbit_defect", "MAX_QUADRATURE_POINTS",
           "MAX_FLOPS"]

#: the largest Haar quadrature the reference averages over
MAX_QUADRATURE_POINTS = 10**6
#: the most floating-point operations of one call (two dense products per quadrature point and matrix)
MAX_FLOPS = 5 * 10**10
#: quadrature points per chunk: the rep matrices of one chunk are in memory at a time
_CHUNK = 256


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


def _quadrature_size(group, degree: int) -> int:
    size = group.haar_quadrature_size(degree)
    if size > MAX_QUADRATURE_POINTS:
        raise ValueError(f"the reference averages over an exact quadrature of {group} for band limit {degree}: {size:,} "
                         f"group elements, more than its limit of {MAX_QUADRATURE_POINTS:,}; use a spectral backend "
                         "(backend='auto', 'cpp', 'triton' or 'torch'), which is exact at any band limit")
    return size


def _chunks(rep_in, rep_out, degree, W):
    """``(rho_out(g), rho_in(g), w)`` over the quadrature, ``_CHUNK`` points at a time, on ``W``'s
    device; refused above :data:`MAX_QUADRATURE_POINTS` points or :data:`MAX_FLOPS` for the batch ``W``."""
    if degree is None:
        degree = rep_in.band_limit + rep_out.band_limit
    m, n = rep_out.dim, rep_in.dim
    size = _quadrature_size(rep_in.group, degree)
    flops = 2 * size * W[..., 0, 0].numel() * m * n * (m + n)
    if flops > MAX_FLOPS:
        raise ValueError(f"the reference would average {m} x {n} matrices over {size:,} "
                         f"group elements: {flops:.1e} floating-point operations, more than its limit of {MAX_FLOPS:.0e} "
                         "(a few seconds); use a spectral backend (backend='auto', 'cpp', 'triton' or 'torch'), "
                         "which is exact, or check smaller reps")
    g, w = rep_in.group.haar_quadrature(degree)
    for k in range(0, len(w), _CHUNK):
        s = slice(k, k + _CHUNK)
        yield rep_out.matrix(g[s]).to(W.device), rep_in.matrix(g[s]).to(W.device), w[s].to(W.device)


def project(W: torch.Tensor, rep_in, rep_out, degree: int | None = None) -> torch.Tensor:
    """P(W) in float64, ``[..., m, n] -> [..., m, n]``, by exact quadrature over the group."""
    W = _check(W, rep_in, rep_out)
    out = torch.zeros_like(W)
    for Ro, Ri, w in _chunks(rep_in, rep_out, degree, W):  # chunks bound the memory to 256 copies of W
        out = out + torch.einsum("p,pai,...ab,pbj->...ij", w, Ro, W, Ri)
    return out


def energies(W, rep_in, rep_out, degree=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||W - P W||^2, ||P W||^2)`` in float64, each ``[...]``."""
    W = _check(W, rep_in, rep_out)
    PW = project(W, rep_in, rep_out, degree)
    return (W - PW).square().sum((-2, -1)), PW.square().sum((-2, -1))


def orbit_defect(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """∫_G ||rho_out(g) W - W rho_in(g)||^2 dg in float64 (equals 2 E_perp: the orbit identity of docs/math.md §2)."""
    W = _check(W, rep_in, rep_out)
    out = W.new_zeros(W.shape[:-2])
    for Ro, Ri, w in _chunks(rep_in, rep_out, degree, W):
        d = torch.einsum("pai,...ij->p...aj", Ro, W) - torch.einsum("...ai,pij->p...aj", W, Ri)
        out = out + torch.einsum("p,p...->...", w, d.square().sum((-2, -1)))
    return out
