"""Real spherical harmonics and real Wigner D matrices of SO(3).

Basis convention (documented, and checked against e3nn >= 0.6 where it is installed):
the degree-``l`` irrep acts on real spherical harmonics ``Y_l^m``, ``m = -l..l`` in that
order, with the polar axis along **y** and no Condon-Shortley phase. For ``l = 1`` the
basis is exactly ``(x, y, z)``, so ``D_1(R) = R``. In terms of the textbook real harmonics
(polar axis z), ``Y_l^m(x, y, z) = Ytext_l^m(z, x, y)``; e.g. for ``l = 2`` the basis is
proportional to ``(xz, xy, 3y^2 - r^2, yz, z^2 - x^2)``.

``D_l(R)`` is defined by ``Y_l(R x) = D_l(R) Y_l(x)`` and computed by an exact quadrature
over the sphere, so it is a polynomial in the entries of ``R``: no Euler angles, no
gimbal-lock special cases.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["spherical_harmonics", "wigner_D", "sphere_quadrature"]


def _legendre_like(l: int, z: torch.Tensor) -> list[torch.Tensor]:
    """``Pi[m](z)`` for m = 0..l: P_l^m(z) / (1 - z^2)^(m/2) without the phase (a polynomial)."""
    out = []
    for m in range(l + 1):
        # start of the recurrence in l for fixed m: Pi_m^m = (2m-1)!!, Pi_{m+1}^m = (2m+1) z Pi_m^m
        p_prev = torch.full_like(z, float(np.prod(np.arange(1, 2 * m, 2)) if m > 0 else 1.0))
        if l == m:
            out.append(p_prev)
            continue
        p = (2 * m + 1) * z * p_prev
        for ll in range(m + 2, l + 1):
            p, p_prev = ((2 * ll - 1) * z * p - (ll + m - 1) * p_prev) / (ll - m), p
        out.append(p)
    return out


def spherical_harmonics(l: int, x: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of degree ``l`` at points ``x``.

    Args:
        l: degree, ``l >= 0``.
        x: ``[..., 3]`` points; they are used as given (normalise them to the unit sphere
            for the usual harmonics; off the sphere this is the harmonic polynomial).
    Returns:
        ``[..., 2l + 1]``, orthonormal for the *normalised* measure on the sphere
        (the mean of ``Y_l^m Y_l^m'`` over the sphere is ``delta_mm'``).
    """
    if l < 0:
        raise ValueError(f"degree l must be >= 0, got {l}")
    # textbook coordinates: polar axis z' = y, and (x', y') = (z, x)
    xp, yp, zp = x[..., 2], x[..., 0], x[..., 1]
    pis = _legendre_like(l, zp)
    # A_m + i B_m = (x' + i y')^m, a real-pair recurrence
    a, b = torch.ones_like(xp), torch.zeros_like(xp)
    cos_m, sin_m = [a], [b]
    for _ in range(l):
        a, b = a * xp - b * yp, a * yp + b * xp
        cos_m.append(a)
        sin_m.append(b)
    out = [None] * (2 * l + 1)
    for m in range(l + 1):
        # normalisation for the normalised sphere measure: (2l+1) (l-m)!/(l+m)! (x2 if m != 0)
        lognorm = 0.5 * (math.log(2 * l + 1) + math.lgamma(l - m + 1) - math.lgamma(l + m + 1))
        norm = math.exp(lognorm) * (math.sqrt(2.0) if m else 1.0)
        out[l + m] = norm * pis[m] * cos_m[m]
        if m:
            out[l - m] = norm * pis[m] * sin_m[m]
    return torch.stack(out, dim=-1)


@functools.lru_cache(maxsize=None)
def _sphere_quadrature_np(degree: int) -> tuple[np.ndarray, np.ndarray]:
    n_theta = degree // 2 + 1  # Gauss-Legendre: exact to degree 2 n - 1 in cos(theta)
    n_phi = degree + 1  # trapezoid: exact for |frequency| <= degree
    z, wz = np.polynomial.legendre.leggauss(n_theta)
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    s = np.sqrt(1 - z**2)
    pts = np.stack(
        [np.outer(s, np.cos(phi)), np.outer(s, np.sin(phi)), np.outer(z, np.ones_like(phi))], -1
    ).reshape(-1, 3)
    w = np.outer(wz / 2, np.full(n_phi, 1.0 / n_phi)).reshape(-1)
    return pts, w


def sphere_quadrature(degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``[P, 3]`` and weights ``[P]`` (summing to 1) integrating every polynomial of
    degree ``<= degree`` on the unit sphere exactly (normalised measure), float64."""
    pts, w = _sphere_quadrature_np(int(degree))
    return torch.from_numpy(pts), torch.from_numpy(w)


@functools.lru_cache(maxsize=None)
def _wigner_quadrature(l: int) -> tuple[torch.Tensor, torch.Tensor]:
    pts, w = sphere_quadrature(2 * l)
    # weighted harmonics at the nodes: D(R) = sum_i w_i Y(R x_i) Y(x_i)^T
    return pts, spherical_harmonics(l, pts) * w[:, None]


def wigner_D(l: int, R: torch.Tensor) -> torch.Tensor:
    """Real Wigner D matrix of degree ``l`` of rotations ``R`` (``[..., 3, 3]``) -> ``[..., 2l+1, 2l+1]``.

    Satisfies ``spherical_harmonics(l, R x) = wigner_D(l, R) @ spherical_harmonics(l, x)``,
    ``D(R1 R2) = D(R1) D(R2)`` and ``D(R)^T = D(R^T)``. Computed in float64.
    """
    if l == 0:
        return torch.ones(R.shape[:-2] + (1, 1), dtype=torch.float64, device=R.device)
    R = R.to(torch.float64)
    pts, wy = _wigner_quadrature(l)
    pts, wy = pts.to(R.device), wy.to(R.device)
    rotated = torch.einsum("...ij,pj->...pi", R, pts)
    return torch.einsum("...pm,pn->...mn", spherical_harmonics(l, rotated), wy)
