"""``equiproj verify``: the spectral energies against the float64 spatial reference, group by group."""

from __future__ import annotations

import time

import torch

from .. import reference
from .._energy import energies
from ..testing import all_groups, mixed_reps, nearly_equivariant

__all__ = ["verify_groups", "format_table"]


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
        rp, rg = reference.energies(W, ri, ro)[0], reference.energies(W, ri, ro)[1]
        Wn = nearly_equivariant(W, ri, ro, 1e-12, gen)
        en = energies(Wn, ri, ro)[0]
        rn = reference.energies(Wn, ri, ro)[0]
        W32 = nearly_equivariant(W, ri, ro, 1e-7, gen).float()
        e32 = energies(W32, ri, ro)[0].double()
        r32 = reference.energies(W32.double(), ri, ro)[0]
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
