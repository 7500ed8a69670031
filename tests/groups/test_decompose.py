"""Numerical decomposition into the group's own irreps (``equiproj.groups._decompose``).

``decompose(group, fn, dim, band_limit)`` must return irreps that are the group's own objects and an
orthogonal ``Q`` with ``fn(g) = Q (⊕ psi(g)) Q^T``; this is checked at random elements other than
the ones the library verifies itself at, and the multiplicities against characters computed
independently with the group's exact Haar quadrature.
"""

from __future__ import annotations

import math

import pytest
import torch

import equiproj as ep
from equiproj.groups import Irrep
from equiproj.groups._decompose import block_diag_irreps, check_representation, decompose, isometric_intertwiners
from equiproj.testing import random_orthogonal

F64 = torch.float64
R_OF = {"real": 1, "complex": 2, "quaternionic": 4}


def _block_diag(slots, g):
    """⊕_s psi_s(g) for a batch ``g [n, dG, dG]``, element by element with torch.block_diag."""
    return torch.stack([torch.block_diag(*[s.matrix(gi[None])[0] for s in slots]) for gi in g])


def _char(M):
    return M.diagonal(dim1=-2, dim2=-1).sum(-1)


def _multiplicities_by_characters(group, fn, band_limit):
    """{psi: m_psi} from <chi_rho, chi_psi> = m_psi r_psi (real characters), exact quadrature."""
    out = {}
    for psi in group.irreps(None if group.is_finite else band_limit):
        g, w = group.haar_quadrature(2 * (band_limit or 0))
        ip = float((w * _char(fn(g)) * _char(psi.matrix(g))).sum())
        m = ip / R_OF[psi.type]
        assert abs(m - round(m)) < 1e-9, f"{psi}: non-integral multiplicity {m}"
        if round(m):
            out[psi] = round(m)
    return out


# ---- user-supplied representations -------------------------------------------------------------
def _changed_sum(group_name, spec, band):
    def make(gen):
        G = {"SO3": ep.SO3(), "O3": ep.O3(), "D6": ep.Dihedral(6), "SO2": ep.SO2(), "C8": ep.Cyclic(8)}[group_name]
        rep = ep.Rep.parse(G, spec)
        Q = random_orthogonal(rep.dim, gen)
        return G, (lambda g: Q @ rep.matrix(g, check=False) @ Q.T), rep.dim, band, None
    return make


def _permutation_d4_grid(gen):
    """D_4 permuting the 9 points of the 3 x 3 grid (a kernel's pixels)."""
    G = ep.Dihedral(4)
    pts = torch.tensor([[x, y] for x in (-1.0, 0.0, 1.0) for y in (-1.0, 0.0, 1.0)], dtype=F64)

    def fn(g):
        moved = torch.einsum("...ij,nj->...ni", g, pts)  # g x_i
        sigma = (moved[..., :, None, :] - pts).abs().amax(-1).argmin(-1)  # x_sigma(i) = g x_i
        return torch.nn.functional.one_hot(sigma, 9).transpose(-1, -2).to(F64)

    # orbits: centre (1), edges (4), corners (4): 3 x trivial + 2 x ... computed by characters
    return G, fn, 9, None, None


def _regular_c5(gen):
    G = ep.Cyclic(5)
    els = G.elements()

    def fn(g):
        idx = G.index(g[..., None, :, :] @ els)  # e_h -> e_{g h}
        return torch.nn.functional.one_hot(idx, 5).transpose(-1, -2).to(F64)

    return G, fn, 5, None, {G.irrep(0): 1, G.irrep(1): 1, G.irrep(2): 1}


def _octahedral_restriction(l, p, full):
    def make(gen):
        G = ep.FullOctahedral() if full else ep.Octahedral()
        O3 = ep.O3()
        fn = lambda g: O3.irrep_matrix((l, p), g)  # noqa: E731
        known = {  # branching rules SO(3)/O(3) -> O / O_h
            (2, 1, False): {"E": 1, "T2": 1}, (3, -1, False): {"A2": 1, "T1": 1, "T2": 1},
            (2, 1, True): {"Eg": 1, "T2g": 1}, (3, -1, True): {"A2u": 1, "T1u": 1, "T2u": 1},
        }[(l, p, full)]
        return G, fn, 2 * l + 1, None, {G.irrep(k): m for k, m in known.items()}
    return make


def _so2_cubed(gen):
    """SO(2) acting on R^2 ⊗ R^2 ⊗ R^2 by g ⊗ g ⊗ g: frequencies 3 (once) and 1 (three times)."""
    G = ep.SO2()

    def fn(g):
        gg = torch.einsum("...ij,...kl->...ikjl", g, g).reshape(g.shape[:-2] + (4, 4))
        return torch.einsum("...ij,...kl->...ikjl", gg, g).reshape(g.shape[:-2] + (8, 8))

    return G, fn, 8, 3, {G.irrep(1): 3, G.irrep(3): 1}


def _so2_matrices_changed(gen):
    """SO(2) by explicit rotation blocks of frequencies 0, 2, 3, 3 in a random basis, band limit 3."""
    G = ep.SO2()
    Q = random_orthogonal(7, gen)

    def fn(g):
        theta = torch.atan2(g[..., 1, 0], g[..., 0, 0])
        blocks = [torch.ones_like(theta)[..., None, None]]
        for k in (2, 3, 3):
            c, s = torch.cos(k * theta), torch.sin(k * theta)
            blocks.append(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2))
        M = torch.zeros(g.shape[:-2] + (7, 7), dtype=F64)
        o = 0
        for B in blocks:
            d = B.shape[-1]
            M[..., o : o + d, o : o + d] = B
            o += d
        return Q @ M @ Q.T

    return G, fn, 7, 3, {G.irrep(0): 1, G.irrep(2): 1, G.irrep(3): 2}


CASES = {
    "so3_changed_sum": _changed_sum("SO3", "0 + 2x1 + 2", 2),
    "o3_changed_sum": _changed_sum("O3", "0o + 1o + 1e + 2x2e", 2),
    "d6_changed_sum": _changed_sum("D6", "2x(0,0) + (1,1) + 2x(1,2) + (0,3) + (1,3)", None),
    "c8_changed_sum": _changed_sum("C8", "0 + 2x1 + 3 + 2x4", None),
    "so2_changed_sum": _changed_sum("SO2", "2x0 + 1 + 2x3", 3),
    "d4_grid_permutation": _permutation_d4_grid,
    "c5_regular": _regular_c5,
    "o3_l2_to_octahedral": _octahedral_restriction(2, 1, False),
    "o3_l3_to_octahedral": _octahedral_restriction(3, -1, False),
    "o3_l2_to_full_octahedral": _octahedral_restriction(2, 1, True),
    "o3_l3_to_full_octahedral": _octahedral_restriction(3, -1, True),
    "so2_cubed": _so2_cubed,
    "so2_matrices": _so2_matrices_changed,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decompose_user_reps(name, gen):
    G, fn, dim, band, known = CASES[name](gen)
    check_representation(G, fn, dim)  # the input is a representation
    slots, Q = decompose(G, fn, dim, band)
    own = G.irreps(None if G.is_finite else band)
    assert all(isinstance(s, Irrep) and s.group == G and s in own for s in slots), slots
    assert sum(s.dim for s in slots) == dim
    assert Q.shape == (dim, dim) and Q.dtype == F64
    torch.testing.assert_close(Q.T @ Q, torch.eye(dim, dtype=F64), atol=1e-10, rtol=0)
    g = G.sample(6, generator=gen)
    torch.testing.assert_close(Q @ _block_diag(slots, g) @ Q.T, fn(g).to(F64), atol=1e-10, rtol=0)
    counts = {}
    for s in slots:
        counts[s] = counts.get(s, 0) + 1
    assert counts == _multiplicities_by_characters(G, fn, band)
    if known is not None:
        assert counts == known


def test_decompose_with_another_seed_is_also_valid(gen):
    G, fn, dim, band, _ = _so2_cubed(gen)
    slots0, Q0 = decompose(G, fn, dim, band, seed=0)
    slots1, Q1 = decompose(G, fn, dim, band, seed=12345)
    assert slots0 == slots1  # the order of irreps is the group's, whatever the seed
    g = G.sample(4, generator=gen)
    for Q in (Q0, Q1):
        torch.testing.assert_close(Q @ _block_diag(slots0, g) @ Q.T, fn(g), atol=1e-10, rtol=0)


# ---- errors ------------------------------------------------------------------------------------
_F = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64)


def _times_reflection(g):
    """Orthogonal but no homomorphism of rotation groups: f(g h) = R(a + b) F, f(g) f(h) = R(a - b)."""
    return g @ _F


def test_check_representation_errors():
    G = ep.SO3()
    check_representation(G, lambda g: g, 3)  # the defining rep passes
    with pytest.raises(ValueError, match="homomorphism"):
        check_representation(G, lambda g: g.transpose(-1, -2), 3)  # an anti-homomorphism
    with pytest.raises(ValueError, match="homomorphism"):
        check_representation(ep.SO2(), _times_reflection, 2)
    D = ep.Dihedral(5)  # reflections act as themselves, rotations by twice their angle
    with pytest.raises(ValueError, match="homomorphism"):
        check_representation(D, lambda g: torch.where((torch.linalg.det(g) < 0)[..., None, None], g, g @ g), 2)
    with pytest.raises(ValueError, match="orthogonal"):
        check_representation(G, lambda g: 2 * g, 3)
    with pytest.raises(ValueError, match="shape"):
        check_representation(G, lambda g: g, 4)
    with pytest.raises(ValueError, match="NaN"):
        check_representation(G, lambda g: g * float("inf"), 3)


def test_decompose_non_representation_fails():
    with pytest.raises(ValueError):
        decompose(ep.Cyclic(5), _times_reflection, 2)
    with pytest.raises(ValueError):
        decompose(ep.SO2(), _times_reflection, 2, 3)


def test_decompose_band_limit_errors(gen):
    G, fn, dim, _, _ = _so2_cubed(gen)
    with pytest.raises(ValueError):
        decompose(G, fn, dim, None)  # a continuous group needs a band limit
    for too_small in (0, 1, 2):
        with pytest.raises(ValueError):
            decompose(G, fn, dim, too_small)  # frequency 3 is beyond the band limit
    S = ep.SO3()
    with pytest.raises(ValueError):
        decompose(S, lambda g: S.irrep(2).matrix(g, check=False), 5, 1)
    # the right band limit works, a larger one too
    decompose(G, fn, dim, 4)


# ---- isometric intertwiners --------------------------------------------------------------------
IRREPS = [
    ("SO2", 0), ("SO2", 1), ("SO2", 3),  # real 1-dim, complex 2-dim
    ("C8", 2), ("C8", 4),  # complex, real 1-dim (k = N/2)
    ("O2", (1, 1)), ("O2", (1, 3)), ("D6", (1, 2)),  # 2-dim real type
    ("SO3", 2), ("Octahedral", "E"), ("Octahedral", "T1"),
]


def _group(name):
    return {"SO2": ep.SO2(), "C8": ep.Cyclic(8), "O2": ep.O2(), "D6": ep.Dihedral(6), "SO3": ep.SO3(),
            "Octahedral": ep.Octahedral()}[name]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("group_name,irrep_id", IRREPS, ids=lambda x: str(x))
def test_isometric_intertwiners(group_name, irrep_id, m, gen):
    G = _group(group_name)
    psi = G.irrep(irrep_id)
    d = psi.dim
    C = psi.endomorphism_basis  # [r, d, d]
    r = C.shape[0]
    assert r == R_OF[psi.type]
    k = m * d
    V = random_orthogonal(k, gen)  # rho_V(g) = V (I_m ⊗ psi(g)) V^T
    # a basis of Hom(psi, rho_V): V_j C_s, mixed by a random invertible matrix and rescaled
    elementary = torch.stack([V[:, j * d : (j + 1) * d] @ C[s] for j in range(m) for s in range(r)])  # [m r, k, d]
    mix = torch.randn(m * r, m * r, dtype=F64, generator=gen) + 3 * torch.eye(m * r, dtype=F64)
    basis = torch.einsum("ab,bkd->akd", mix, elementary)
    T = isometric_intertwiners(basis, m, d)
    assert T.shape == (k, m * d)
    blocks = T.reshape(k, m, d).transpose(0, 1)  # T_i [k, d]
    for i in range(m):
        for j in range(m):
            expect = torch.eye(d, dtype=F64) if i == j else torch.zeros(d, d, dtype=F64)
            torch.testing.assert_close(blocks[i].T @ blocks[j], expect, atol=1e-10, rtol=0)
    g = G.sample(4, generator=gen)
    P = psi.matrix(g)
    rho = V @ torch.stack([torch.block_diag(*[P[n]] * m) for n in range(4)]) @ V.T
    for Ti in blocks:
        torch.testing.assert_close(rho @ Ti, Ti @ P, atol=1e-10, rtol=0)


def test_isometric_intertwiners_degenerate():
    with pytest.raises(ValueError, match="degenerate"):
        isometric_intertwiners(torch.zeros(2, 4, 2, dtype=F64), 1, 2)
    # one intertwiner asked for twice: the second round finds nothing left
    single = torch.eye(3, dtype=F64)[None]
    with pytest.raises(ValueError, match="degenerate"):
        isometric_intertwiners(torch.cat([single, 2 * single]), 2, 3)


# ---- block_diag_irreps -------------------------------------------------------------------------
def test_block_diag_irreps(gen):
    G = ep.O3()
    slots = [G.irrep((0, 1)), G.irrep((1, -1)), G.irrep((2, 1)), G.irrep((1, -1))]
    g = G.sample(5, generator=gen)
    M = block_diag_irreps(slots, g)
    assert M.shape == (5, 12, 12) and M.dtype == F64
    torch.testing.assert_close(M, _block_diag(slots, g), atol=1e-14, rtol=0)
    # batch dims are kept; off-diagonal blocks are exactly zero
    gb = G.sample(6, generator=gen).reshape(2, 3, 3, 3)
    Mb = block_diag_irreps(slots, gb)
    assert Mb.shape == (2, 3, 12, 12)
    torch.testing.assert_close(Mb.reshape(6, 12, 12), _block_diag(slots, gb.reshape(6, 3, 3)), atol=1e-14, rtol=0)
    mask = torch.block_diag(*[torch.ones(s.dim, s.dim) for s in slots]).bool()
    assert float(Mb[..., ~mask].abs().max()) == 0.0
    assert block_diag_irreps([], g).shape == (5, 0, 0)
    # the single-slot case is the irrep itself
    torch.testing.assert_close(block_diag_irreps([G.irrep((3, -1))], g), G.irrep((3, -1)).matrix(g), atol=1e-14, rtol=0)
    assert math.isclose(float(_char(M[0])), float(sum(_char(s.matrix(g[:1]))[0] for s in slots)), abs_tol=1e-12)
