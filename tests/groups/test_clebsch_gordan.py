"""Decompositions of irrep tensor products (``equiproj.groups._clebsch_gordan.irrep_product``) and the
SO(3) Clebsch-Gordan coefficients (``equiproj.groups.clebsch_gordan``).

Expectations are independent of the solver: the Kronecker product of the irreps' own matrices at
random elements, multiplicities from characters with the group's exact Haar quadrature
(``m_psi r_psi = ∫ chi_a chi_b chi_psi dg``, real characters), and e3nn's ``wigner_3j`` where installed.
"""

from __future__ import annotations

import pytest
import torch

import equiproj as ep
from equiproj.groups import Irrep, clebsch_gordan
from equiproj.groups._clebsch_gordan import irrep_product
from equiproj.testing import all_groups

F64 = torch.float64
R_OF = {"real": 1, "complex": 2, "quaternionic": 4}
BAND = 2  # continuous groups: irreps of frequency / degree <= BAND


def _irreps(G, band=BAND):
    return G.irreps() if G.is_finite else G.irreps(band)


def _kron(A, B):
    """Batched Kronecker product: coordinate (i, j) is i * B.dim + j."""
    return torch.stack([torch.kron(a, b) for a, b in zip(A, B)])


def _block_diag(slots, mats):
    """⊕_s psi_s(g) from the irreps' matrices ``mats[psi] [n, d, d]`` at the elements g."""
    n = len(next(iter(mats.values())))
    return torch.stack([torch.block_diag(*[mats[s][k] for s in slots]) for k in range(n)])


def _char(M):
    return M.diagonal(dim1=-2, dim2=-1).sum(-1)


class Characters:
    """Characters of a group's irreps at the points of an exact quadrature."""

    def __init__(self, G, band):
        """Multiplicities in products of irreps of band <= ``band``: candidates up to ``2 band``, and
        products of three characters of total band <= 4 band (the quadrature's exactness)."""
        self.G = G
        self.irreps = _irreps(G, 2 * band)
        self.g, self.w = G.haar_quadrature(4 * band)
        self.chi = {psi: _char(psi.matrix(self.g)) for psi in self.irreps}

    def multiplicities(self, a, b) -> dict:
        out = {}
        for psi in self.irreps:
            ip = float((self.w * self.chi[a] * self.chi[b] * self.chi[psi]).sum())
            m = ip / R_OF[psi.type]
            assert abs(m - round(m)) < 1e-9, f"{a} x {b} -> {psi}: non-integral multiplicity {m}"
            if round(m):
                out[psi] = round(m)
        return out


@pytest.mark.parametrize("G", all_groups(), ids=str)
def test_irrep_products_decompose(G, gen):
    chars = Characters(G, BAND)
    g = G.sample(5, generator=gen)
    irreps = _irreps(G)
    mats = {a: a.matrix(g) for a in _irreps(G, 2 * BAND)}
    for a in irreps:
        for b in irreps:
            slots, Q = irrep_product(a, b)
            n = a.dim * b.dim
            where = f"{G}: {a} x {b}"
            assert isinstance(slots, tuple) and all(isinstance(s, Irrep) and s.group == G for s in slots), where
            assert sum(s.dim for s in slots) == n, where
            assert Q.shape == (n, n) and Q.dtype == F64, where
            torch.testing.assert_close(Q.T @ Q, torch.eye(n, dtype=F64), atol=1e-10, rtol=0, msg=where)
            torch.testing.assert_close(Q @ _block_diag(slots, mats) @ Q.T, _kron(mats[a], mats[b]), atol=1e-10, rtol=0,
                                       msg=where)
            counts = {}
            for s in slots:
                counts[s] = counts.get(s, 0) + 1
            assert counts == chars.multiplicities(a, b), where


def test_kronecker_order_is_explicit():
    """The first factor is the slow index: (a ⊗ b)(g) differs from (b ⊗ a)(g) and Q follows the order."""
    G = ep.SO3()
    a, b = G.irrep(1), G.irrep(2)
    g = G.sample(3, generator=torch.Generator().manual_seed(3))
    slots, Q = irrep_product(a, b)
    M = torch.einsum("nij,nkl->nikjl", a.matrix(g), b.matrix(g)).reshape(3, 15, 15)
    torch.testing.assert_close(Q @ _block_diag(slots, {s: s.matrix(g) for s in slots}) @ Q.T, M, atol=1e-10, rtol=0)
    swapped = torch.einsum("nij,nkl->nikjl", b.matrix(g), a.matrix(g)).reshape(3, 15, 15)
    assert float((M - swapped).abs().max()) > 1e-3


def test_irrep_product_is_cached():
    for G in (ep.SO3(), ep.Dihedral(6), ep.FullOctahedral()):
        a, b = _irreps(G)[-1], _irreps(G)[1]
        first = irrep_product(a, b)
        assert irrep_product(a, b) is first
        # equal irreps made separately share the entry
        assert irrep_product(G.irrep(a.id), G.irrep(b.id)) is first
    assert ep.groups.irrep_product is irrep_product


def test_irrep_product_errors():
    G = ep.SO3()
    with pytest.raises(TypeError):
        irrep_product(2 * G.irrep(1), G.irrep(1))
    with pytest.raises(TypeError):
        irrep_product(G.irrep(1), G.irrep(0) + G.irrep(1))
    with pytest.raises(TypeError):
        irrep_product("1", G.irrep(1))
    with pytest.raises(ValueError, match="different groups"):
        irrep_product(G.irrep(1), ep.O3().irrep((1, -1)))


# ---- SO(3) Clebsch-Gordan coefficients -----------------------------------------------------------
TRIPLES = [(l1, l2, l3) for l1 in range(3) for l2 in range(3) for l3 in range(6)]


@pytest.mark.parametrize("l1,l2,l3", TRIPLES)
def test_so3_clebsch_gordan(l1, l2, l3, gen):
    G = ep.SO3()
    d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
    C = clebsch_gordan(l1, l2, l3)
    assert C.shape == (d1, d2, d3) and C.dtype == F64
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        assert float(C.abs().max()) == 0.0
        return
    assert abs(float(C.square().sum()) - d3) < 1e-10
    R = G.sample(4, generator=gen)
    D1, D2, D3 = (G.irrep(l).matrix(R) for l in (l1, l2, l3))
    # (D1 ⊗ D2) C = C D3: sum_ij D1[a,i] D2[b,j] C[i,j,k] = sum_c C[a,b,c] D3[c,k]
    lhs = torch.einsum("nai,nbj,ijk->nabk", D1, D2, C)
    rhs = torch.einsum("abc,nck->nabk", C, D3)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=0)
    # the columns are orthonormal up to the (2 l3 + 1) normalisation: C^T C = I
    Cm = C.reshape(d1 * d2, d3)
    torch.testing.assert_close(Cm.T @ Cm, torch.eye(d3, dtype=F64), atol=1e-10, rtol=0)


def test_so3_clebsch_gordan_projects_onto_degree_l3():
    """sum_ij C[i,j,k] x_i y_j is the degree-l3 part of x ⊗ y: it transforms with D_l3."""
    G = ep.SO3()
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(3, dtype=F64, generator=gen), torch.randn(5, dtype=F64, generator=gen)
    R = G.sample(2, generator=gen)
    for l3 in (1, 2, 3):
        C = clebsch_gordan(1, 2, l3)
        z = torch.einsum("ijk,i,j->k", C, x, y)
        zr = torch.einsum("ijk,ni,nj->nk", C, G.irrep(1).matrix(R) @ x, G.irrep(2).matrix(R) @ y)
        torch.testing.assert_close(zr, G.irrep(l3).matrix(R) @ z, atol=1e-10, rtol=0)


def test_so3_clebsch_gordan_matches_e3nn():
    o3 = pytest.importorskip("e3nn.o3")
    for l1 in range(3):
        for l2 in range(3):
            for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                C = clebsch_gordan(l1, l2, l3) / (2 * l3 + 1) ** 0.5  # e3nn: ||C|| = 1
                E = o3.wigner_3j(l1, l2, l3, dtype=F64)
                err = min(float((C - E).abs().max()), float((C + E).abs().max()))
                assert err < 1e-10, f"({l1}, {l2}, {l3}): differs from e3nn by {err:.1e} for either sign"


def test_so3_clebsch_gordan_errors():
    for bad in [(-1, 1, 1), (1.0, 1, 1), (True, 1, 1), (1, 1, "2")]:
        with pytest.raises(ValueError):
            clebsch_gordan(*bad)


# ---- selection rules ------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [ep.SO2(), ep.O2(), ep.SO3(), ep.O3(), ep.Cyclic(3), ep.Cyclic(12), ep.Dihedral(3),
                               ep.Dihedral(7)] + [G for G in all_groups() if G.is_finite], ids=str)
def test_selection_rules_never_exclude_an_occurring_irrep(G):
    band = 3
    chars = Characters(G, band)
    irreps = _irreps(G, band)
    excluded = 0
    for a in irreps:
        for b in irreps:
            occurring = chars.multiplicities(a, b)
            for psi in chars.irreps:
                if not G.product_may_contain(psi, a, b):
                    excluded += 1
                    assert psi not in occurring, f"{G}: {psi} occurs {occurring[psi]}x in {a} x {b} but is excluded"
            # nothing beyond the candidates irrep_product looks at
            assert sum(m * psi.dim for psi, m in occurring.items()) == a.dim * b.dim
    if not G.is_finite or G.ambient_dim == 2:
        assert excluded > 0  # the rules do exclude something (planar groups: frequencies add modulo N)


def test_products_above_the_decomposed_size_are_refused_clearly():
    """SO(3) 10 ⊗ 10 took 19 s, 12 ⊗ 12 made LAPACK's SVD fail to converge; the largest accepted works."""
    from equiproj.groups._clebsch_gordan import MAX_PRODUCT_DIM, irrep_product

    G = ep.SO3()
    with pytest.raises(ValueError, match="declare the irreps the product contains"):
        G.irrep(8) @ G.irrep(7)
    assert 15 * 15 == MAX_PRODUCT_DIM
    slots, Q = irrep_product(G.irrep(7), G.irrep(7))
    assert sorted(s.band for s in slots) == list(range(15))
    torch.testing.assert_close(Q.T @ Q, torch.eye(225, dtype=torch.float64), atol=1e-10, rtol=0)


def test_construction_numerics_restore_the_thread_count():
    """Decompositions run on one intra-op thread and give the caller's count back, also on an error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ep.SO3().irrep(3) @ ep.SO3().irrep(2)
        ep.Cyclic(7).regular()
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            ep.Rep.from_matrices(ep.SO2(), lambda g: 2 * g)  # not orthogonal
        assert torch.get_num_threads() == 2
        # from several Python threads at once (the count is global): the last one out restores it
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: ep.Cyclic(n).regular() @ ep.Cyclic(n).standard(), [9, 10, 11, 12, 13, 14]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
