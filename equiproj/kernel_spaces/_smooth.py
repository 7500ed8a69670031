"""How equivariant a conv kernel is at angles the grid does not have: the error on smooth inputs."""

from __future__ import annotations

import math

import torch

from ..grid import grid_points
from ..groups import Rep
from ._steerable import SteerableKernelSpace

__all__ = ["smooth_equivariance_error"]


def smooth_equivariance_error(space: SteerableKernelSpace, weight: torch.Tensor, rep_in: Rep, rep_out: Rep,
                               elements: torch.Tensor, width: float = 2.0, num_fields: int = 8,
                               generator: torch.Generator | None = None) -> float:
    """RMS relative equivariance error of a conv kernel on smooth inputs, for arbitrary group elements.

    For fields ``f`` made of 5 random Gaussian bumps of the given ``width`` (pixels, centres
    spread over the kernel), compares the output at the kernel centre for the transformed input
    ``(g·f)(x) = rho_in(g) f(g^-1 x)`` (evaluated exactly at the pixels) with ``rho_out(g)`` times
    the output for ``f``: ``sqrt(sum ||out(g·f) - rho_out(g) out(f)||^2 / sum ||out(f)||^2)`` over
    ``elements`` ``[G, s, s]`` and ``num_fields`` fields each. By translation equivariance of the
    convolution this is the error at every output pixel. ``weight``: ``[c_out, c_in, k, ..., k]``.
    """
    space._check(weight, rep_in, rep_out)
    s, k = space.spatial_dims, space.kernel_size
    x = grid_points((k,) * s)
    Kf = weight.detach().to(torch.float64).reshape(rep_out.dim, rep_in.dim, -1)
    elements = space.group.check_elements(elements).reshape(-1, s, s)

    def bumps(points, centres, coefs):
        d2 = (points[:, None, :] - centres[None]).square().sum(-1)
        return torch.exp(-d2 / (2 * width**2)) @ coefs

    num = den = 0.0
    for g in elements:
        Ri, Ro = rep_in.matrix(g), rep_out.matrix(g)
        for _ in range(num_fields):
            c = torch.randn(5, s, dtype=torch.float64, generator=generator) * k / 3
            a = torch.randn(5, rep_in.dim, dtype=torch.float64, generator=generator)
            out = torch.einsum("oip,pi->o", Kf, bumps(x, c, a))
            out_g = torch.einsum("oip,pi->o", Kf, bumps(x @ g, c, a) @ Ri.T)  # row x @ g = g^-1 x
            num += float((out_g - Ro @ out).square().sum())
            den += float(out.square().sum())
    return math.sqrt(num / den) if den > 0 else 0.0
