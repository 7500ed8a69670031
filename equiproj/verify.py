"""Verification suite: the spectral energies against the float64 spatial reference, per group.

``equiproj verify`` prints its table; the test suite and ``equiproj bench`` run it too.
"""

from __future__ import annotations

import time

import torch

from . import reference
from .energy import energies
from .groups import SO2, SO3, O2, O3, Cyclic, Dihedral, FullOctahedral, Octahedral
from .rep import Rep

__all__ = ["mixed_reps", "verify_groups", "format_table", "random_orthogonal", "nearly_equivariant"]


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random ``[n, n]`` orthogonal matrix (float64)."""
    A = torch.randn(n, n, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))


def mixed_reps(group, generator: torch.Generator | None = None) -> tuple[Rep, Rep]:
    """A pair (rep_in, rep_out) mixing several irreps with multiplicities, a regular or tensor-product
    rep, and (on rep_in) a random orthogonal change of the user's basis."""
    p = lambda s: Rep.parse(group, s)  # noqa: E731
    if isinstance(group, SO3):
        a, b = p("3x0 + 2x1 + 2"), p("2x0 + 1 + 2x2") + group.irrep(1) @ group.irrep(2)
    elif isinstance(group, O3):
        a, b = p("3x0e + 2x1o + 2e") + p("1o") @ p("1o + 2e"), p("2x0e + 1o + 2x2e + 1e + 3o")
    elif isinstance(group, SO2):
        a, b = p("2x0 + 2x1 + 3"), p("0 + 2x2 + 3") + p("1 + 2") @ group.irrep(1)
    elif isinstance(group, O2):
        a, b = p("2x(0,0) + (1,0) + 2x(1,1)"), p("(1,0) + (1,2) + 2x(1,1)") + group.standard() @ group.standard()
    elif isinstance(group, (Cyclic, Dihedral, Octahedral)):
        a, b = group.regular() + group.standard(), 2 * group.trivial() + group.standard() @ group.standard()
    else:
        raise TypeError(f"no test reps for {group}")
    return a.change_basis(random_orthogonal(a.dim, generator)), b


def nearly_equivariant(W: torch.Tensor, rep_in: Rep, rep_out: Rep, ratio: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``P(W) + eps * N`` (float64) with ``E_perp / ||.||^2 ~ ratio``, built with the reference projection."""
    PW = reference.project(W, rep_in, rep_out)
    N = torch.randn(W.shape, dtype=torch.float64, generator=generator)
    N = N - reference.project(N, rep_in, rep_out)
    scale = (ratio * PW.square().sum((-2, -1), keepdim=True) / N.square().sum((-2, -1), keepdim=True)).sqrt()
    return PW + scale * N


def all_groups():
    return [Cyclic(5), Cyclic(8), Dihedral(4), Dihedral(6), SO2(), O2(), SO3(), O3(), Octahedral(), FullOctahedral()]


def verify_groups(groups=None, seed: int = 0) -> list[dict]:
    """For each group: max relative error of E_perp and E_G (float64) against the reference, on
    random weights and on nearly equivariant weights (E_perp/||W||^2 ~ 1e-12 in float64, 1e-7 in float32)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for G in groups or all_groups():
        t0 = time.perf_counter()
        ri, ro = mixed_reps(G, gen)
        W = torch.randn(3, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
        ep, eg = energies(W, ri, ro)
        rp, rg = reference.noneq_energy(W, ri, ro), reference.eq_energy(W, ri, ro)
        Wn = nearly_equivariant(W, ri, ro, 1e-12, gen)
        en = energies(Wn, ri, ro)[0]
        rn = reference.noneq_energy(Wn, ri, ro)
        W32 = nearly_equivariant(W, ri, ro, 1e-7, gen).float()
        e32 = energies(W32, ri, ro)[0].double()
        r32 = reference.noneq_energy(W32.double(), ri, ro)
        rel = lambda a, b: float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())  # noqa: E731
        rows.append({
            "group": str(G), "dim_in": ri.dim, "dim_out": ro.dim,
            "rel_err_perp": rel(ep, rp), "rel_err_G": rel(eg, rg),
            "rel_err_near_f64": rel(en, rn), "rel_err_near_f32": rel(e32, r32),
            "seconds": time.perf_counter() - t0,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| group | n | m | E_perp rel err | E_G rel err | near-eq f64 (1e-12) | near-eq f32 (1e-7) |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['group']} | {r['dim_in']} | {r['dim_out']} | {r['rel_err_perp']:.1e} | {r['rel_err_G']:.1e} "
                     f"| {r['rel_err_near_f64']:.1e} | {r['rel_err_near_f32']:.1e} |")
    return "\n".join(lines)
