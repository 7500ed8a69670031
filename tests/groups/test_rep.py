"""Representations: constructors, structure, change of basis, errors."""

import pytest
import torch

import equiproj as ep
from equiproj.groups._rep import structured_check
from equiproj.testing import mixed_reps, random_orthogonal

GROUPS = [ep.Cyclic(5), ep.Cyclic(8), ep.Dihedral(4), ep.Dihedral(6), ep.SO2(), ep.O2(), ep.SO3(), ep.O3(),
          ep.Octahedral(), ep.FullOctahedral()]


def assert_is_rep(rep, gen, n=6):
    """rep.matrix is an orthogonal homomorphism and equals Q blockdiag(irreps) Q^T."""
    G = rep.group
    g1, g2 = G.sample(n, generator=gen), G.sample(n, generator=gen)
    A, B, AB = rep.matrix(g1), rep.matrix(g2), rep.matrix(g1 @ g2)
    assert A.shape == (n, rep.dim, rep.dim)
    eye = torch.eye(rep.dim, dtype=torch.float64)
    torch.testing.assert_close(A.transpose(-1, -2) @ A, eye.expand_as(A), atol=1e-11, rtol=0)
    torch.testing.assert_close(AB, A @ B, atol=1e-11, rtol=0)
    Q = rep.change_of_basis
    torch.testing.assert_close(Q.T @ Q, eye, atol=1e-12, rtol=0)
    blocks = [psi.matrix(g1) for psi, mult in rep.irreps for _ in range(mult)]
    D = torch.zeros(n, rep.dim, rep.dim, dtype=torch.float64)
    o = 0
    for b in blocks:
        D[:, o : o + b.shape[-1], o : o + b.shape[-1]] = b
        o += b.shape[-1]
    assert o == rep.dim
    torch.testing.assert_close(A, Q @ D @ Q.T, atol=1e-10, rtol=0)
    assert structured_check(rep, g1) < 1e-10


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_mixed_reps_are_reps(G, gen):
    a, b = mixed_reps(G, gen)
    for r in (a, b, a + b, 2 * b, b @ G.standard()):
        assert_is_rep(r, gen)


def test_direct_sum_and_multiplicity_layout():
    G = ep.SO3()
    a = ep.Rep.parse(G, "2x0 + 1")
    assert a.dim == 5 and a.irreps == [(G.irrep(0), 2), (G.irrep(1), 1)]
    b = 3 * a
    assert b.dim == 15 and dict(b.irreps) == {G.irrep(0): 6, G.irrep(1): 3}
    g = G.sample(2)
    # 3 * a is a + a + a: block diagonal with three copies of a's matrix
    Ma, Mb = a.matrix(g), b.matrix(g)
    for i in range(3):
        torch.testing.assert_close(Mb[:, 5 * i : 5 * i + 5, 5 * i : 5 * i + 5], Ma)
    assert sum([a, a]) == a + a
    assert ep.Rep.parse(G, "16x1") == 16 * G.irrep(1)


def test_tensor_product_is_kronecker_and_decomposes():
    G = ep.O3()
    gen = torch.Generator().manual_seed(0)
    a = ep.Rep.parse(G, "0e + 2x1o")
    b = ep.Rep.parse(G, "1o + 2e") + G.irrep((1, 1))
    t = a @ b
    g = G.sample(4, generator=gen)
    torch.testing.assert_close(t.matrix(g), torch.einsum("nij,nkl->nikjl", a.matrix(g), b.matrix(g)).reshape(4, t.dim, t.dim),
                               atol=1e-12, rtol=0)
    assert_is_rep(t, gen)
    # 1o x 1o = 0e + 1e + 2e
    assert {str(i): m for i, m in (G.irrep((1, -1)) @ G.irrep((1, -1))).irreps} == {"0e": 1, "1e": 1, "2e": 1}


def test_so3_clebsch_gordan_multiplicities():
    G = ep.SO3()
    for l1 in range(4):
        for l2 in range(4):
            got = {i.id: m for i, m in (G.irrep(l1) @ G.irrep(l2)).irreps}
            assert got == {l: 1 for l in range(abs(l1 - l2), l1 + l2 + 1)}


def test_regular_rep_contains_each_irrep_dim_over_type_times():
    for G in [ep.Cyclic(6), ep.Dihedral(5), ep.Octahedral(), ep.FullOctahedral()]:
        reg = G.regular()
        r = {"real": 1, "complex": 2, "quaternionic": 4}
        assert {i: m for i, m in reg.irreps} == {p: p.dim // r[p.type] for p in G.irreps()}
        g = G.elements()[:5]
        M = reg.matrix(g)
        # a permutation matrix: e_h -> e_{g h}
        idx = G.index(g[:, None] @ G.elements()[None])
        assert torch.equal(M.argmax(-2), idx)


def test_permutation_rep_from_points():
    G = ep.Dihedral(4)
    pts = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [1, 1], [-1, 1], [-1, -1], [1, -1], [0, 0]])
    rep = ep.Rep.permutation(G, points=pts)
    gen = torch.Generator().manual_seed(2)
    assert_is_rep(rep, gen)
    g = G.elements()
    M = rep.matrix(g)
    # rho(g) e_i = e_j with x_j = g x_i
    moved = torch.einsum("nij,pj->npi", g, pts.double())
    torch.testing.assert_close(torch.einsum("nji,jk->nik", M, pts.double()), moved)
    with pytest.raises(ValueError, match="onto themselves"):
        ep.Rep.permutation(G, points=torch.tensor([[1.0, 0.3], [0.0, 0.0]]))


def test_from_matrices():
    G, G3 = ep.SO2(), ep.SO3()
    rho = lambda g: torch.einsum("...ij,...kl->...ikjl", g, g).reshape(g.shape[:-2] + (4, 4))  # noqa: E731
    rep = ep.Rep.from_matrices(G, rho)
    assert {i.id: m for i, m in rep.irreps} == {0: 2, 2: 1}
    assert_is_rep(rep, torch.Generator().manual_seed(1))
    Q = random_orthogonal(5, torch.Generator().manual_seed(4))
    rep3 = ep.Rep.from_matrices(G3, lambda g: Q @ G3.irrep(2).matrix(g, check=False) @ Q.T)
    assert rep3.irreps == [(G3.irrep(2), 1)]
    with pytest.raises(ValueError, match="not orthogonal"):
        ep.Rep.from_matrices(G, lambda g: 2 * g)
    with pytest.raises(ValueError, match="not a homomorphism"):
        ep.Rep.from_matrices(G3, lambda g: g.transpose(-1, -2) @ g.transpose(-1, -2))  # (gh)^T != g^T h^T
    with pytest.raises(ValueError, match="shape"):
        ep.Rep.from_matrices(G, lambda g: g[..., 0])
    with pytest.raises(ValueError, match="shape"):
        ep.Rep.from_matrices(G, lambda g: torch.kron(g, g))  # batch dims mixed up
    with pytest.raises(ValueError, match="NaN"):
        ep.Rep.from_matrices(G, lambda g: g * float("nan"))


def test_change_basis():
    G = ep.Octahedral()
    gen = torch.Generator().manual_seed(7)
    a = ep.Rep.parse(G, "A1 + E + 2xT2")
    Q = random_orthogonal(a.dim, gen)
    b = a.change_basis(Q)
    g = G.sample(5, generator=gen)
    torch.testing.assert_close(b.matrix(g), Q @ a.matrix(g) @ Q.T, atol=1e-12, rtol=0)
    assert_is_rep(b, gen)
    with pytest.raises(ValueError, match="not orthogonal"):
        a.change_basis(torch.ones(a.dim, a.dim))
    with pytest.raises(ValueError, match="shape"):
        a.change_basis(torch.eye(3))


def test_parse_forms_and_errors():
    assert ep.Rep.parse(ep.O3(), "16x0e + 8x1o").dim == 16 + 24
    assert ep.Rep.parse(ep.SO3(), "2x0e + 1").dim == 5
    assert ep.Rep.parse(ep.Cyclic(8), "2xregular + 3x0").dim == 19
    assert ep.Rep.parse(ep.Dihedral(4), "2x(0,0) + (1,1) + (0,2)").dim == 5
    assert ep.Rep.parse(ep.FullOctahedral(), "A1g + 3xT1u").dim == 10
    assert ep.Rep.parse(ep.O2(), "standard + trivial").dim == 3
    for G, s in [(ep.O3(), "16x0x + 1o"), (ep.O3(), "1"), (ep.SO3(), "1o"), (ep.SO3(), ""), (ep.SO3(), "1 + "),
                 (ep.Dihedral(4), "(1,)"), (ep.Octahedral(), "T9"), (ep.SO3(), "0x1")]:
        with pytest.raises(ValueError):
            ep.Rep.parse(G, s)
    with pytest.raises(TypeError):
        ep.Rep.parse(ep.SO3(), 3)


def test_algebra_errors():
    with pytest.raises(ValueError, match="different groups"):
        ep.SO3().irrep(1) + ep.O3().irrep((1, 1))
    with pytest.raises(ValueError, match="different groups"):
        ep.SO3().irrep(1) @ ep.SO2().irrep(1)
    with pytest.raises(ValueError, match="multiplicity"):
        0 * ep.SO3().irrep(1)
    with pytest.raises(TypeError):
        ep.SO3().irrep(1) + 3
