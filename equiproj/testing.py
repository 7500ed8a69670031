"""Helpers for testing code built on equiproj (as ``torch.testing`` is for torch): random orthogonal
bases, representative rep pairs of every group, nearly equivariant weights.

The library's own tests and ``equiproj verify`` use them.

Example::

    >>> import torch, equiproj
    >>> from equiproj.testing import mixed_reps, nearly_equivariant
    >>> gen = torch.Generator().manual_seed(0)
    >>> rep_in, rep_out = mixed_reps(equiproj.SO3(), gen)
    >>> W = torch.randn(rep_out.dim, rep_in.dim, dtype=torch.float64, generator=gen)
    >>> W_near = nearly_equivariant(W, rep_in, rep_out, 1e-10, gen)   # E_perp / ||W||^2 ~ 1e-10
"""

from __future__ import annotations

import functools
import operator

import torch

from . import reference
from .groups import SO2, SO3, O2, O3, Cyclic, Dihedral, FullOctahedral, Group, Octahedral, Rep

__all__ = ["random_orthogonal", "mixed_reps", "nearly_equivariant", "all_groups", "relative_error"]


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random ``[n, n]`` orthogonal matrix (float64)."""
    A = torch.randn(n, n, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))


def mixed_reps(group: Group, generator: torch.Generator | None = None) -> tuple[Rep, Rep]:
    """A pair (rep_in, rep_out) mixing several irreps with multiplicities, a regular or tensor-product
    rep, and (on rep_in) a random orthogonal change of the user's basis; for any group, from its
    hooks: a finite group gives ``regular + standard`` and ``2 trivial + standard ⊗ standard``, a
    continuous one every irrep of degree/frequency ``<= 2`` with multiplicities ``3, 2, 1, ...`` and
    ``2, 1, 2, ...``, the latter plus ``standard ⊗ (the last irrep)``."""
    if group.is_finite:
        a, b = group.regular() + group.standard(), 2 * group.trivial() + group.standard() @ group.standard()
    else:
        irreps = group.irreps(band_limit=2)
        a = functools.reduce(operator.add, ((3 - i % 3) * psi for i, psi in enumerate(irreps)))
        b = functools.reduce(operator.add, ((2 - i % 2) * psi for i, psi in enumerate(irreps)))
        b = b + group.standard() @ irreps[-1]
    return a.change_basis(random_orthogonal(a.dim, generator)), b


def nearly_equivariant(W: torch.Tensor, rep_in: Rep, rep_out: Rep, ratio: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``P(W) + eps * N`` (float64) with ``E_perp / ||.||^2 ~ ratio``, built with the reference projection."""
    PW = reference.project(W, rep_in, rep_out)
    N = torch.randn(W.shape, dtype=torch.float64, generator=generator)
    N = N - reference.project(N, rep_in, rep_out)
    scale = (ratio * PW.square().sum((-2, -1), keepdim=True) / N.square().sum((-2, -1), keepdim=True)).sqrt()
    return PW + scale * N


def all_groups() -> list:
    """One or two groups of every kind: C_5, C_8, D_4, D_6, SO(2), O(2), SO(3), O(3), O, O_h."""
    return [Cyclic(5), Cyclic(8), Dihedral(4), Dihedral(6), SO2(), O2(), SO3(), O3(), Octahedral(), FullOctahedral()]


def relative_error(actual, expected) -> float:
    """``max |actual - expected| / |expected|`` elementwise, in float64 (numbers or tensors of any dtype)."""
    a, b = (x.detach().double().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
            for x in (actual, expected))
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
