"""Spatial-domain reference (math.md §4): the projection as an exact average over the group.

    P(W) = ∫_G rho_out(g)^T W rho_in(g) dg

evaluated in float64 with an exact Haar quadrature: the element sum for finite groups, the
trapezoid rule in the angle for SO(2)/O(2), and a product rule in Euler angles (Gauss-Legendre
in cos(beta), uniform in alpha and gamma) for SO(3)/O(3). Nothing here uses the irrep
decomposition; only ``rep.matrix`` and the band limits of the reps (to size the quadrature).
It is slow (one pair of matrix products per quadrature point) and meant for verification.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .groups import O2, O3, SO2, SO3, Group, _rot2, _F

__all__ = ["haar_quadrature", "project", "noneq_energy", "eq_energy", "orbit_defect"]


def _euler_zyz(alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    def rz(t):
        c, s, o, z = torch.cos(t), torch.sin(t), torch.ones_like(t), torch.zeros_like(t)
        return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(t.shape + (3, 3))

    c, s, o, z = torch.cos(beta), torch.sin(beta), torch.ones_like(beta), torch.zeros_like(beta)
    ry = torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(beta.shape + (3, 3))
    return rz(alpha) @ ry @ rz(gamma)


def haar_quadrature(group: Group, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements ``[P, d, d]`` and weights ``[P]`` (summing to 1) such that
    ``sum_p w_p f(g_p) = ∫_G f(g) dg`` exactly for every matrix coefficient ``f`` of an irrep
    of frequency/degree ``<= degree`` (all functions, for finite groups)."""
    if group.is_finite:
        els = group.elements()
        return els, torch.full((len(els),), 1.0 / len(els), dtype=torch.float64)
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    if isinstance(group, (SO2, O2)):
        # trapezoid rule with M points integrates e^{ik theta} exactly for |k| < M
        M = degree + 1
        g = _rot2(2 * math.pi * torch.arange(M, dtype=torch.float64) / M)
        w = torch.full((M,), 1.0 / M, dtype=torch.float64)
        if isinstance(group, O2):
            g, w = torch.cat([g, g @ _F]), torch.cat([w, w]) / 2
        return g, w
    if isinstance(group, (SO3, O3)):
        # D^l_{mn} = e^{-i m alpha} d^l_{mn}(beta) e^{-i n gamma}: the alpha/gamma sums kill m, n != 0,
        # and d^l_{00}(beta) = P_l(cos beta) is integrated exactly by Gauss-Legendre.
        M = degree + 1
        x, wx = np.polynomial.legendre.leggauss(degree // 2 + 1)
        ang = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M
        beta = torch.arccos(torch.from_numpy(x))
        a, b, c = torch.meshgrid(ang, beta, ang, indexing="ij")
        g = _euler_zyz(a.reshape(-1), b.reshape(-1), c.reshape(-1))
        w = (torch.ones(M, 1, 1, dtype=torch.float64) * torch.from_numpy(wx / 2)[None, :, None] / M**2).expand(M, len(x), M).reshape(-1)
        if isinstance(group, O3):
            g, w = torch.cat([g, -g]), torch.cat([w, w]) / 2
        return g, w
    raise TypeError(f"no Haar quadrature for {group}")


def _check(W, rep_in, rep_out):
    if rep_in.group != rep_out.group:
        raise ValueError(f"rep_in acts by {rep_in.group} but rep_out by {rep_out.group}")
    if W.dim() < 2 or W.shape[-2:] != (rep_out.dim, rep_in.dim):
        raise ValueError(f"W must have shape [..., {rep_out.dim}, {rep_in.dim}], got {tuple(W.shape)}")
    return W.to(torch.float64)


def _points(rep_in, rep_out, degree):
    if degree is None:
        degree = rep_in.band_limit + rep_out.band_limit
    g, w = haar_quadrature(rep_in.group, degree)
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


def noneq_energy(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """||W - P W||^2 in float64, ``[...]``."""
    W = _check(W, rep_in, rep_out)
    return (W - project(W, rep_in, rep_out, degree)).square().sum((-2, -1))


def eq_energy(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """||P W||^2 in float64, ``[...]``."""
    return project(W, rep_in, rep_out, degree).square().sum((-2, -1))


def orbit_defect(W, rep_in, rep_out, degree=None) -> torch.Tensor:
    """∫_G ||rho_out(g) W - W rho_in(g)||^2 dg in float64 (equals 2 E_perp, math.md §2)."""
    W = _check(W, rep_in, rep_out)
    Ro, Ri, w = _points(rep_in, rep_out, degree)
    Ro, Ri, w = Ro.to(W.device), Ri.to(W.device), w.to(W.device)
    d = torch.einsum("pai,...ij->p...aj", Ro, W) - torch.einsum("...ai,pij->p...aj", W, Ri)
    return torch.einsum("p,p...->...", w, d.square().sum((-2, -1)))
