"""Real spherical harmonics and real Wigner D matrices of SO(3).

Basis convention (documented, and checked against e3nn >= 0.6 where it is installed):
the degree-``l`` irrep acts on real spherical harmonics ``Y_l^m``, ``m = -l..l`` in that
order, with the polar axis along **y** and no Condon-Shortley phase. For ``l = 1`` the
basis is exactly ``(x, y, z)``, so ``D_1(R) = R``. In terms of the textbook real harmonics
(polar axis z), ``Y_l^m(x, y, z) = Ytext_l^m(z, x, y)``; e.g. for ``l = 2`` the basis is
proportional to ``(xz, xy, 3y^2 - r^2, yz, z^2 - x^2)``.

``D_l(R)`` is defined by ``Y_l(R x) = D_l(R) Y_l(x)``. It is computed as
``D(R_y(alpha)) D(R_x(beta)) D(R_y(gamma))`` (e3nn's angles): a rotation about the polar axis y
turns each pair ``(Y_l^m, Y_l^-m)`` by the angle ``m t`` (closed form), and
``D(R_x(beta)) = K D(R_y(beta)) K^T`` with ``K = D_l(R_z(-pi/2))`` (the quarter turn taking y to
x), the matrix exponential of the closed-form generator of rotations about z. The angles are
found as in e3nn's ``matrix_to_angles`` (gamma from the rotation left after alpha and beta), so
the product reproduces ``R`` to rounding at every rotation, gimbal lock (beta = 0, pi) included.
The cost is one ``(2l+1)^3`` matrix product per rotation.

Degrees up to :data:`L_MAX` are supported: there ``D_l`` is orthogonal and a homomorphism to
about 1e-12 and satisfies ``Y_l(R x) = D_l(R) Y_l(x)`` to about 1e-12 (tests/groups/test_so3.py);
higher degrees raise ``ValueError``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["spherical_harmonics", "wigner_D", "sphere_quadrature", "L_MAX", "check_degree"]

#: The largest degree of the SO(3)/O(3) irreps, spherical harmonics and Wigner D matrices.
L_MAX = 512


def check_degree(l) -> int:
    """``l`` as an int, or ``ValueError`` unless ``0 <= l <= L_MAX``."""
    if isinstance(l, bool) or not isinstance(l, (int, np.integer)):
        raise ValueError(f"the degree l must be an int, got {l!r}")
    l = int(l)
    if l < 0:
        raise ValueError(f"the degree l must be >= 0, got {l}")
    if l > L_MAX:
        raise ValueError(f"degree l = {l} is above L_MAX = {L_MAX}, the largest degree equiproj supports for SO(3)/O(3) "
                         f"irreps, spherical harmonics and Wigner D matrices (equiproj.groups.L_MAX)")
    return l


# bounded by entries, not bytes: keyed by a degree, each value O(l^2) floats (l <= L_MAX)
@functools.lru_cache(maxsize=16)
def _legendre_coefficients(l: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalised recurrence ``q_n^m = a[n, m] z q_{n-1}^m - b[n, m] r^2 q_{n-2}^m`` (m < n) and
    ``q_n^n = diag[n] q_{n-1}^{n-1}``, ``a, b [l+1, l+1]`` (zero where m >= n), ``diag [l+1]``."""
    n = torch.arange(l + 1, dtype=torch.float64)[:, None]
    m = torch.arange(l + 1, dtype=torch.float64)[None, :]
    below = m < n
    a = torch.where(below, torch.sqrt((4 * n**2 - 1) / torch.where(below, n**2 - m**2, 1.0)), 0.0)
    num = (2 * n + 1) * (n - m - 1) * (n + m - 1)
    den = torch.where(below, (2 * n - 3) * (n - m) * (n + m), 1.0)
    b = torch.where(m < n - 1, torch.sqrt(torch.clamp(num / den, min=0.0)), 0.0)
    diag = torch.sqrt((2 * n[:, 0] + 1) / torch.clamp(2 * n[:, 0], min=1.0))
    return a, b, diag


def _normalised_legendre(l: int, z: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``q[..., m]``, m = 0..l: ``sqrt((2l+1) (l-m)!/(l+m)!) P_l^m(z) / (1 - z^2)^(m/2)`` without the
    phase, homogenised with ``r2 = |x|^2`` (a polynomial of degree l - m). The recurrence runs on the
    normalised values, which stay of moderate size (the unnormalised ones overflow)."""
    a, b, diag = (t.to(z.device) for t in _legendre_coefficients(l))
    q_prev = z.new_zeros(z.shape + (l + 1,))
    q = z.new_zeros(z.shape + (l + 1,))
    q[..., 0] = 1.0
    z, r2 = z[..., None], r2[..., None]
    for n in range(1, l + 1):
        nxt = a[n] * z * q - b[n] * r2 * q_prev
        nxt[..., n] = diag[n] * q[..., n - 1]
        q_prev, q = q, nxt
    return q


def spherical_harmonics(l: int, x: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of degree ``l`` at points ``x``.

    Args:
        l: degree, ``0 <= l <= L_MAX``.
        x: ``[..., 3]`` points; they are used as given (normalise them to the unit sphere
            for the usual harmonics; off the sphere this is the homogeneous harmonic polynomial,
            ``Y_l(c x) = c^l Y_l(x)``).
    Returns:
        ``[..., 2l + 1]``, orthonormal for the *normalised* measure on the sphere
        (the mean of ``Y_l^m Y_l^m'`` over the sphere is ``delta_mm'``).
    """
    l = check_degree(l)
    # textbook coordinates: polar axis z' = y, and (x', y') = (z, x)
    xp, yp, zp = x[..., 2], x[..., 0], x[..., 1]
    q = _normalised_legendre(l, zp, (x * x).sum(-1))
    # A_m + i B_m = (x' + i y')^m, a real-pair recurrence
    a, b = torch.ones_like(xp), torch.zeros_like(xp)
    cos_m, sin_m = [a], [b]
    for _ in range(l):
        a, b = a * xp - b * yp, a * yp + b * xp
        cos_m.append(a)
        sin_m.append(b)
    A, B = torch.stack(cos_m, -1)[..., 1:], torch.stack(sin_m, -1)[..., 1:]
    # Y[l + m] = sqrt(2) q_m A_m, Y[l - m] = sqrt(2) q_m B_m (m > 0), Y[l] = q_0
    s = math.sqrt(2.0)
    return torch.cat([(s * q[..., 1:] * B).flip(-1), q[..., :1], s * q[..., 1:] * A], dim=-1)


# bounded by entries, not bytes: keyed by a quadrature degree, each value O(degree^2) points
@functools.lru_cache(maxsize=64)
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


def _z_generator(l: int) -> torch.Tensor:
    """``d/dt D_l(R_z(t))`` at t = 0, ``[2l+1, 2l+1]`` skew-symmetric: the angular momentum ladder
    (``sqrt(l(l+1) - k(k -+ 1))``) written in the real basis (z is the textbook x' axis)."""
    L = torch.zeros(2 * l + 1, 2 * l + 1, dtype=torch.float64)
    k = torch.arange(1, l + 1)
    c = l * (l + 1)
    L[l - k, l + k - 1] = -0.5 * torch.sqrt((c - k * (k - 1)).double())
    L[l - 1, l] *= math.sqrt(2.0)
    k = k[:-1]
    L[l - k, l + k + 1] = -0.5 * torch.sqrt((c - k * (k + 1)).double())
    return L - L.T


# bounded by entries, not bytes: keyed by a degree, each value one (2l+1)^2 matrix (l <= L_MAX)
@functools.lru_cache(maxsize=16)
def _quarter_turn(l: int) -> torch.Tensor:
    """``K = D_l(R_z(-pi/2))``: ``K D_l(R_y(t)) K^T = D_l(R_x(t))``."""
    return torch.linalg.matrix_exp(-math.pi / 2 * _z_generator(l))


def _y_rotation(l: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``D_l(R_y(t)) = diag(c) + antidiag(s)`` (c, s ``[..., 2l+1]``): ``c_i = cos(m_i t)``,
    ``s_i = -sin(m_i t)``, ``m_i = i - l``."""
    mt = torch.arange(-l, l + 1, dtype=torch.float64, device=t.device) * t[..., None]
    return torch.cos(mt), -torch.sin(mt)


def _euler_yxy(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha, beta, gamma)`` with ``R = R_y(alpha) R_x(beta) R_y(gamma)``; gamma from the residual
    ``(R_y(alpha) R_x(beta))^T R`` (whose first row needs alpha only), so that the product is R to
    rounding even where alpha and gamma are individually ill-defined."""
    v = R[..., :, 1]  # R e_y = (sin a sin b, cos b, cos a sin b)
    alpha = torch.atan2(v[..., 0], v[..., 2])
    beta = torch.atan2(torch.hypot(v[..., 0], v[..., 2]), v[..., 1])
    ca, sa = torch.cos(alpha), torch.sin(alpha)
    gamma = torch.atan2(ca * R[..., 0, 2] - sa * R[..., 2, 2], ca * R[..., 0, 0] - sa * R[..., 2, 0])
    return alpha, beta, gamma


def wigner_D(l: int, R: torch.Tensor) -> torch.Tensor:
    """Real Wigner D matrix of degree ``l`` of rotations ``R`` (``[..., 3, 3]``) -> ``[..., 2l+1, 2l+1]``.

    Satisfies ``spherical_harmonics(l, R x) = wigner_D(l, R) @ spherical_harmonics(l, x)``,
    ``D(R1 R2) = D(R1) D(R2)`` and ``D(R)^T = D(R^T)``. Computed in float64; ``0 <= l <= L_MAX``.
    """
    l = check_degree(l)
    R = R.to(torch.float64)
    if l == 0:
        return torch.ones(R.shape[:-2] + (1, 1), dtype=torch.float64, device=R.device)
    if l == 1:  # the basis is (x, y, z)
        return R.clone()
    alpha, beta, gamma = _euler_yxy(R)
    K = _quarter_turn(l).to(R.device)
    # D(R_x(beta)) = I + K (D(R_y(beta)) - I) K^T; cos - 1 = -2 sin^2(./2) keeps small angles accurate
    m = torch.arange(-l, l + 1, dtype=torch.float64, device=R.device)
    half = torch.sin(m * beta[..., None] / 2)
    sb = -torch.sin(m * beta[..., None])
    Kt = K.T
    E = -2 * (half * half)[..., :, None] * Kt + sb[..., :, None] * Kt.flip(-2)
    X = K @ E
    X.diagonal(dim1=-2, dim2=-1).add_(1.0)
    ca, sa = _y_rotation(l, alpha)
    cg, sg = _y_rotation(l, gamma)
    X = ca[..., :, None] * X + sa[..., :, None] * X.flip(-2)  # D(R_y(alpha)) X
    return X * cg[..., None, :] + X.flip(-1) * sg.flip(-1)[..., None, :]  # X D(R_y(gamma))
