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


# ---- reps are values: structural equality and hashing ----------------------------------------
def test_fresh_reps_of_the_same_construction_are_equal_and_hash_equal(gen):
    """Caches keyed by reps (the block plans) must find fresh but equal reps."""
    for G in [ep.FullOctahedral(), ep.Cyclic(6), ep.Dihedral(5)]:
        assert G.regular() == G.regular() and hash(G.regular()) == hash(G.regular())
        Q = random_orthogonal(2 * G.order, gen)
        a, b = (2 * G.regular()).change_basis(Q), (2 * G.regular()).change_basis(Q.clone())
        assert a == b and hash(a) == hash(b)
        assert a != (2 * G.regular()).change_basis(random_orthogonal(2 * G.order, gen))
    assert ep.Cyclic(2).standard() == ep.Cyclic(2).standard()
    assert ep.Dihedral(2).standard() == ep.Dihedral(2).standard()
    G3 = ep.SO3()
    Q5 = random_orthogonal(5, gen)

    def fn(g):
        return Q5 @ G3.irrep(2).matrix(g, check=False) @ Q5.T

    a, b = ep.Rep.from_matrices(G3, fn), ep.Rep.from_matrices(G3, fn)
    assert a == b and hash(a) == hash(b) and a.segments[0][1] == b.segments[0][1]
    pts = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    assert ep.Rep.permutation(ep.Cyclic(4), points=pts) == ep.Rep.permutation(ep.Cyclic(4), points=pts.clone())
    # a different representation is a different rep
    assert ep.Rep.from_matrices(G3, lambda g: G3.irrep(2).matrix(g, check=False)) != a


def test_reps_pickle_by_structure(gen):
    """A pickled rep (inside a pickled model) comes back equal, hash equal and with the same matrices,
    whatever built it: irreps, regular and permutation reps, tensor products, a changed basis, and a
    user's function (a lambda, which pickle cannot carry: the field's decomposition stands in)."""
    import pickle

    G3 = ep.SO3()
    Q5 = random_orthogonal(5, gen)
    D4 = ep.Dihedral(4)
    pts = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    reps = [ep.Rep.parse(ep.O3(), "2x0e + 1o + 2e"), ep.SO2().irrep(3), ep.Cyclic(5).regular(),
            (D4.standard() + D4.trivial()) @ D4.regular(), (2 * D4.regular()).change_basis(random_orthogonal(16, gen)),
            ep.Rep.from_matrices(G3, lambda g: Q5 @ G3.irrep(2).matrix(g, check=False) @ Q5.T),
            ep.Rep.permutation(ep.Cyclic(4), points=pts), ep.FullOctahedral().regular()]
    for rep in reps:
        back = pickle.loads(pickle.dumps(rep))
        assert back == rep and hash(back) == hash(rep) and back is not rep
        g = rep.group.sample(6, generator=gen)
        torch.testing.assert_close(back.matrix(g), rep.matrix(g), atol=1e-12, rtol=0)


def test_equal_reps_share_one_cached_plan():
    from equiproj._plan import block_plan

    G = ep.Octahedral()
    Q = random_orthogonal(2 * G.order, torch.Generator().manual_seed(3))
    P = block_plan((2 * G.regular()).change_basis(Q), G.regular())
    assert block_plan((2 * G.regular()).change_basis(Q.clone()), G.regular()) is P


def test_rep_equality_is_structural():
    G = ep.O3()
    a = ep.Rep.parse(G, "2x0e + 1o")
    assert a == ep.Rep.parse(G, "0e + 0e + 1o") and a != ep.Rep.parse(G, "0e + 1o + 0e")
    assert len({a, ep.Rep.parse(G, "2x0e + 1o"), a @ a, ep.Rep.parse(G, "2x0e + 1o") @ a}) == 2


# ---- multiplicities are counts ---------------------------------------------------------------
def test_huge_multiplicities_are_counts():
    """'100000000x0e' added the rep to itself 1e8 times (did not return in 90 s)."""
    G = ep.O3()
    big = ep.Rep.parse(G, "100000000x0e")
    assert big.dim == 10**8 and big.segments[0][0] == 10**8 and big.perm is None
    assert big.irreps == [(G.irrep((0, 1)), 10**8)]
    assert repr(big) == "Rep(O3(), '100000000x0e')"
    assert big == 10**8 * G.trivial() and hash(big) == hash(10**8 * G.trivial())
    s = big + ep.Rep.parse(G, "3x1o") + big
    assert s.dim == 2 * 10**8 + 9 and dict(s.irreps) == {G.irrep((0, 1)): 2 * 10**8, G.irrep((1, -1)): 3}
    assert (10**6 * ep.Rep.parse(G, "16x1o")).dim == 48 * 10**6
    with pytest.raises(ValueError, match="dense"):
        big.matrix(G.identity())
    with pytest.raises(ValueError, match="dense"):
        big.change_of_basis  # noqa: B018
    with pytest.raises(ValueError, match="permutation"):
        10**8 * ep.Rep.parse(G, "0e + 1o")  # several segments: the copy-major layout is a permutation of 4e8


def test_multiplicity_of_several_segments_and_of_permuted_reps(gen):
    """n * rep is rep + ... + rep (copy-major coordinates), also when stored as counts and a permutation."""
    G = ep.Dihedral(4)
    a = ep.Rep.parse(G, "(0,0) + (1,1) + (1,2)")
    t = G.standard() @ G.standard()  # permuted
    g = G.sample(3, generator=gen)
    for r in (a, t, a + t):
        for n in (2, 3, 40):
            m = n * r
            assert m.dim == n * r.dim and dict(m.irreps) == {ir: n * c for ir, c in r.irreps}
            M, R = m.matrix(g), r.matrix(g)
            expected = torch.zeros_like(M)
            for i in range(n):
                expected[:, i * r.dim : (i + 1) * r.dim, i * r.dim : (i + 1) * r.dim] = R
            torch.testing.assert_close(M, expected, atol=0, rtol=0)
            assert structured_check(m, g) < 1e-12
            assert len(m.segments) <= 64
    assert 3 * a == a + a + a  # few segments: repeated, exactly the direct sum


def test_plan_of_a_huge_multiplicity_is_built_by_counts():
    """SidePlan.build looped over every copy in Python."""
    from equiproj._plan import SidePlan

    G = ep.O3()
    side = SidePlan.build(ep.Rep.parse(G, "2000000x0e + 3x1o + 2x0e"))
    assert side.coord_type.shape == (2000011,)
    assert side.rows[G.irrep((0, 1))].shape == (2000002, 1) and side.rows[G.irrep((1, -1))].shape == (3, 3)
    assert int(side.rows[G.irrep((0, 1))][-1, 0]) == 2000010
    torch.testing.assert_close(side.rows[G.irrep((1, -1))][1], torch.arange(2000003, 2000006))


# ---- unclear errors -----------------------------------------------------------------------------
def test_empty_rep_is_refused():
    """Rep(G, []) had dimension 0: the cpp backend said 'plan covers 0 rows' while torch returned 0."""
    G = ep.SO3()
    with pytest.raises(ValueError, match="at least one field"):
        ep.Rep(G, [])
    with pytest.raises(ValueError, match="count >= 1"):
        ep.Rep(G, [(0, G.irrep(1).segments[0][1])])
    with pytest.raises(ValueError, match="dimension >= 1"):
        ep.Rep.from_matrices(G, lambda g: torch.zeros(g.shape[:-2] + (0, 0), dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one point"):
        ep.Rep.permutation(ep.Cyclic(3), action=lambda g: torch.zeros(g.shape[:-2] + (0,), dtype=torch.long), size=0)


def test_parse_needs_a_group_object():
    with pytest.raises(TypeError, match=r"equiproj.O3\(\)"):
        ep.Rep.parse("O3", "1o")
    with pytest.raises(TypeError, match="Group"):
        ep.Rep.parse(None, "1o")


def test_from_matrices_accepts_float32_matrices(gen):
    """float32 matrices failed the 1e-8 check with 'is the band_limit too small?'."""
    G = ep.SO3()
    Q = random_orthogonal(5, gen)

    def fn32(g):
        return (Q @ G.irrep(2).matrix(g, check=False) @ Q.T).float()

    rep = ep.Rep.from_matrices(G, fn32)
    assert rep.irreps == [(G.irrep(2), 1)]
    assert_is_rep(rep, gen)  # the exact representation nearest to the float32 matrices
    g = G.sample(4, generator=gen)
    torch.testing.assert_close(rep.matrix(g), fn32(g).double(), atol=1e-6, rtol=0)
    C8 = ep.Cyclic(8)
    reg32 = ep.Rep.from_matrices(C8, lambda g: C8.regular().matrix(g, check=False).float())
    assert dict(reg32.irreps) == dict(C8.regular().irreps)
    # float64 matrices computed in float32 are accurate to 1e-7 only: the error says so and what to do
    with pytest.raises(ValueError, match="float32"):
        ep.Rep.from_matrices(G, lambda g: fn32(g).double(), band_limit=2)
    with pytest.raises(TypeError, match="float16"):
        ep.Rep.from_matrices(G, lambda g: fn32(g).half())


# ---- e3nn interoperability ------------------------------------------------------------------------
def test_e3nn_irreps_are_accepted(gen):
    e3nn = pytest.importorskip("e3nn")
    from e3nn import o3

    irreps = o3.Irreps("8x0e + 4x1o + 2e + 3o")
    G = ep.O3()
    rep = ep.Rep.parse(G, irreps)
    assert rep == ep.Rep.parse(G, "8x0e + 4x1o + 2e + 3o") == ep.Rep.from_e3nn(irreps)
    assert ep.Rep.parse(G, o3.Irrep("1o")) == G.irrep((1, -1))
    assert ep.Rep.from_e3nn("2x1e + 0e", group=ep.SO3()) == ep.Rep.parse(ep.SO3(), "2x1 + 0")
    with pytest.raises(ValueError, match="SO\\(3\\) does not contain"):
        ep.Rep.from_e3nn(irreps, group=ep.SO3())
    with pytest.raises(ValueError, match="not of Cyclic"):
        ep.Rep.from_e3nn(irreps, group=ep.Cyclic(4))
    g = torch.cat([G.sample(6, generator=gen), -torch.eye(3, dtype=torch.float64)[None],
                   torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))[None]])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn computes its angles in the default dtype
    try:
        theirs = irreps.D_from_matrix(g)
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(rep.matrix(g), theirs, atol=1e-10, rtol=0)
    assert e3nn.__name__ == "e3nn"


def test_import_does_not_load_e3nn():
    import subprocess
    import sys

    code = "import sys, equiproj as ep; ep.Rep.parse(ep.O3(), '2x1o'); print('e3nn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
