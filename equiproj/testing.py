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

__all__ = ["random_orthogonal", "mixed_reps", "nearly_equivariant", "all_groups", "relative_error",
           "rotated_points", "check_batched_strided_half"]


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


def rotated_points(N: int, M: int, order=None, speed: int = 1, name: str | None = None) -> Rep:
    """C_N acting on M points in a cycle, given by its action (``Rep.permutation(action=...)``): the rotation
    by ``2 pi k / N`` moves the point at position ``i`` of the cycle ``order`` (default ``0, 1, .., M - 1``)
    to position ``(i + speed k) mod M``. With ``speed = 1`` and ``M`` dividing ``N`` this is C_N on the
    cosets of C_(N/M); a cycle out of index order gives the same field with its points renumbered.

    >>> rotated_points(16, 4).dim
    4
    """
    order = torch.arange(M) if order is None else torch.as_tensor(order)
    position = torch.argsort(order)

    def action(g):
        k = torch.round(torch.atan2(g[..., 1, 0], g[..., 0, 0]) * (N / (2 * torch.pi))).long()
        return order[(position + speed * k[..., None]) % M]

    return Rep.permutation(Cyclic(N), action=action, size=M, name=name)


def check_batched_strided_half(rep_in: Rep, rep_out: Rep, backend: str, generator: torch.Generator | None = None,
                               reference_rep_in: Rep | None = None) -> None:
    """Assert that ``backend`` gives the float64 reference's energies on a batched weight ``[2, 3, m, n]``
    strided both ways (float64, to 1e-12), and energies (float32, to 1e-5 of the reference on the
    rounded weight) and gradients (in the weight's dtype) on its float16 and bfloat16 roundings.
    ``reference_rep_in``: the same representation as ``rep_in`` in the form the reference takes (a grid
    convolution's input through the grid's orbits), default ``rep_in``.

    >>> from equiproj import Cyclic
    >>> G = Cyclic(4)
    >>> check_batched_strided_half(2 * G.regular(), G.regular() + G.trivial(), "torch", torch.Generator().manual_seed(0))
    """
    from ._energy import energies, energies_and_grad  # noqa: PLC0415 - loaded when a check runs, not on import

    ref_in = rep_in if reference_rep_in is None else reference_rep_in
    base = torch.randn(2, 3, rep_in.dim, 2 * rep_out.dim, dtype=torch.float64, generator=generator)
    W = base[..., ::2].transpose(-1, -2)  # [2, 3, m, n], strided both ways
    assert not W.is_contiguous()
    ep, eg = energies(W, rep_in, rep_out, backend=backend)
    rp, rg = reference.energies(W, ref_in, rep_out)
    assert ep.shape == (2, 3) and relative_error(ep, rp) < 1e-12 and relative_error(eg, rg) < 1e-12
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        Wh = W.to(dtype)
        ep, eg = energies(Wh, rep_in, rep_out, backend=backend)
        rp, rg = reference.energies(Wh.double(), ref_in, rep_out)
        assert ep.dtype == torch.float32
        assert relative_error(ep, rp) < 1e-5 and relative_error(eg, rg) < 1e-5  # exact arithmetic on the rounded W
        _, _, grad = energies_and_grad(Wh, rep_in, rep_out, backend=backend)
        want = 2 * (Wh.double() - reference.project(Wh.double(), ref_in, rep_out))
        assert grad.dtype == dtype and float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())
