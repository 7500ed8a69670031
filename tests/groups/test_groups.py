"""Groups and their irreps: membership, homomorphism, orthogonality, types, characters, bases."""

import math

import pytest
import torch

import equiproj as ep
from equiproj.reference import haar_quadrature
from equiproj.testing import all_groups, mixed_reps

FINITE = [ep.Cyclic(1), ep.Cyclic(2), ep.Cyclic(5), ep.Cyclic(8), ep.Dihedral(1), ep.Dihedral(2), ep.Dihedral(5),
          ep.Dihedral(6), ep.Octahedral(), ep.FullOctahedral()]
CONTINUOUS = [ep.SO2(), ep.O2(), ep.SO3(), ep.O3()]
ALL = FINITE + CONTINUOUS
BAND = 4  # band limit used for continuous groups' irreps in these tests


def irreps_of(G):
    return G.irreps() if G.is_finite else G.irreps(BAND)


@pytest.mark.parametrize("G", ALL, ids=str)
def test_elements_are_members_and_orthogonal(G, gen):
    g = G.sample(16, generator=gen)
    assert g.shape == (16, G.ambient_dim, G.ambient_dim) and g.dtype == torch.float64
    G.check_elements(g)
    assert torch.allclose(G.identity(), torch.eye(G.ambient_dim, dtype=torch.float64))
    if G.is_finite:
        els = G.elements()
        assert len(els) == G.order
        # closed under products, all distinct
        prods = (els[:, None] @ els[None]).reshape(-1, G.ambient_dim, G.ambient_dim)
        G.check_elements(prods)
        assert len(torch.unique(G.index(els))) == G.order


@pytest.mark.parametrize("G", ALL, ids=str)
def test_irreps_are_orthogonal_homomorphisms(G, gen):
    g1, g2 = G.sample(8, generator=gen), G.sample(8, generator=gen)
    for psi in irreps_of(G):
        A, B, AB = psi.matrix(g1), psi.matrix(g2), psi.matrix(g1 @ g2)
        eye = torch.eye(psi.dim, dtype=torch.float64)
        assert A.shape == (8, psi.dim, psi.dim)
        torch.testing.assert_close(A @ A.transpose(-1, -2), eye.expand_as(A), atol=1e-12, rtol=0)
        torch.testing.assert_close(AB, A @ B, atol=1e-12, rtol=0)
        torch.testing.assert_close(psi.matrix(G.identity()), eye, atol=1e-14, rtol=0)


@pytest.mark.parametrize("G", ALL, ids=str)
def test_schur_orthogonality_and_types(G):
    """∫ tr psi_a tr psi_b = delta_ab dim End(psi_a): irreducible, pairwise inequivalent, types right."""
    irreps = irreps_of(G)
    g, w = haar_quadrature(G, 2 * BAND)
    chars = torch.stack([psi.matrix(g, check=False).diagonal(dim1=-2, dim2=-1).sum(-1) for psi in irreps])
    gram = torch.einsum("p,ap,bp->ab", w, chars, chars)
    r = torch.tensor([{"real": 1.0, "complex": 2.0, "quaternionic": 4.0}[p.type] for p in irreps], dtype=torch.float64)
    torch.testing.assert_close(gram, torch.diag(r), atol=1e-10, rtol=0)
    if G.is_finite:  # sum of d^2 / r over irreps = |G| (real form of Burnside)
        assert sum(p.dim**2 / {"real": 1, "complex": 2, "quaternionic": 4}[p.type] for p in irreps) == G.order


@pytest.mark.parametrize("G", ALL, ids=str)
def test_endomorphism_basis_commutes_and_is_orthonormal(G, gen):
    g = G.sample(6, generator=gen)
    for psi in irreps_of(G):
        C = psi.endomorphism_basis
        P = psi.matrix(g)
        assert C.shape[0] == {"real": 1, "complex": 2, "quaternionic": 4}[psi.type]
        torch.testing.assert_close(torch.einsum("sab,tab->st", C, C), torch.eye(len(C), dtype=torch.float64),
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(P[:, None] @ C[None], C[None] @ P[:, None], atol=1e-11, rtol=0)


def test_so3_characters():
    """tr D_l(R(theta)) = sin((2l+1) theta / 2) / sin(theta / 2)."""
    G = ep.SO3()
    g = G.sample(32, generator=torch.Generator().manual_seed(3))
    cos_t = ((g.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    theta = torch.arccos(cos_t)
    for l in range(7):
        chi = G.irrep(l).matrix(g).diagonal(dim1=-2, dim2=-1).sum(-1)
        torch.testing.assert_close(chi, torch.sin((2 * l + 1) * theta / 2) / torch.sin(theta / 2), atol=1e-10, rtol=0)


def test_so3_basis_matches_e3nn():
    e3nn = pytest.importorskip("e3nn")
    from e3nn import o3

    g = ep.O3().sample(10, generator=torch.Generator().manual_seed(5))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn computes its Euler angles in the default dtype
    try:
        theirs = {(l, p): o3.Irrep(l, p).D_from_matrix(g) for l in range(6) for p in (1, -1)}
    finally:
        torch.set_default_dtype(old)
    for (l, p), D in theirs.items():
        torch.testing.assert_close(ep.O3().irrep((l, p)).matrix(g), D, atol=1e-10, rtol=0)
    x = torch.randn(7, 3, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    for l in range(6):
        torch.testing.assert_close(ep.groups.spherical_harmonics(l, x),
                                   o3.spherical_harmonics(l, x, normalize=True, normalization="component"),
                                   atol=1e-12, rtol=0)


def test_standard_reps_act_by_the_matrices_themselves():
    for G in ALL:
        g = G.sample(5)
        torch.testing.assert_close(G.standard().matrix(g), g, atol=1e-12, rtol=0)


def test_planar_irrep_formulas():
    R = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]], dtype=torch.float64)
    F = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    R3 = torch.tensor([[math.cos(2.1), -math.sin(2.1)], [math.sin(2.1), math.cos(2.1)]], dtype=torch.float64)
    torch.testing.assert_close(ep.SO2().irrep(3).matrix(R), R3)
    torch.testing.assert_close(ep.O2().irrep((1, 3)).matrix(R @ F), R3 @ F)
    assert float(ep.O2().irrep((1, 0)).matrix(R @ F)) == -1.0
    assert ep.SO2().irrep(3).type == "complex" and ep.O2().irrep((1, 3)).type == "real"
    assert ep.Cyclic(6).irrep(3).dim == 1 and ep.Cyclic(6).irrep(2).type == "complex"


def test_haar_sampling_is_uniform():
    """Nontrivial irreps average to zero over Haar samples (Monte Carlo, 6 sigma)."""
    gen = torch.Generator().manual_seed(11)
    n = 4000
    for G in [ep.SO2(), ep.O2(), ep.SO3(), ep.O3(), ep.Octahedral(), ep.Dihedral(5)]:
        g = G.sample(n, generator=gen)
        for psi in irreps_of(G)[1:4]:
            mean = psi.matrix(g).mean(0)
            assert mean.abs().max() < 6 / math.sqrt(n), (G, psi)


@pytest.mark.parametrize("G", CONTINUOUS, ids=str)
def test_quadrature_is_exact(G):
    """The quadrature of degree L integrates every matrix coefficient of band <= L exactly:
    the mean of psi(g) is 0 for nontrivial psi and the identity for the trivial one."""
    g, w = haar_quadrature(G, BAND)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    for psi in G.irreps(BAND):
        mean = torch.einsum("p,pij->ij", w, psi.matrix(g, check=False))
        expected = torch.ones(1, 1, dtype=torch.float64) if psi == G.trivial() else torch.zeros_like(mean)
        torch.testing.assert_close(mean, expected, atol=1e-13, rtol=0)


def test_bad_elements_and_ids():
    with pytest.raises(ValueError, match="not orthogonal"):
        ep.SO3().irrep(1).matrix(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        ep.SO3().irrep(1).matrix(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="not elements"):
        ep.SO3().irrep(1).matrix(-torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not elements"):
        ep.Cyclic(4).irrep(1).matrix(ep.SO2().sample(1, generator=torch.Generator().manual_seed(0)) @ ep.SO2().sample(1))
    with pytest.raises(ValueError, match="not elements"):
        ep.Octahedral().irrep("E").matrix(ep.SO3().sample(1))
    with pytest.raises(ValueError, match="unknown irrep"):
        ep.Cyclic(4).irrep(3)
    with pytest.raises(ValueError, match="unknown irrep"):
        ep.Dihedral(5).irrep((0, 1))
    with pytest.raises(ValueError, match="unknown irrep"):
        ep.Octahedral().irrep("T3")
    with pytest.raises(ValueError, match="unknown irrep"):
        ep.O3().irrep((1, 2))
    with pytest.raises(ValueError):
        ep.SO3().irrep(-1)
    with pytest.raises(TypeError):
        ep.SO2().irrep(1.5)
    with pytest.raises(ValueError, match="N >= 1"):
        ep.Cyclic(0)
    with pytest.raises(TypeError, match="not finite"):
        ep.SO3().elements()
    with pytest.raises(TypeError, match="continuous"):
        ep.SO2().regular()
    with pytest.raises(ValueError, match="band_limit"):
        ep.SO3().irreps()


def test_group_equality():
    assert ep.Cyclic(4) == ep.Cyclic(4) and ep.Cyclic(4) != ep.Cyclic(5) and ep.Cyclic(4) != ep.Dihedral(4)
    assert ep.SO3() == ep.SO3() and ep.SO3() != ep.O3()
    assert ep.Octahedral() != ep.FullOctahedral()
    assert len({ep.SO2(), ep.SO2(), ep.O2()}) == 2


@pytest.mark.parametrize("G", [ep.Cyclic(7), ep.Cyclic(512), ep.Dihedral(5), ep.Dihedral(256), ep.Octahedral(),
                               ep.FullOctahedral()], ids=str)
def test_regular_rep_in_closed_form(G, gen):
    """The regular rep's decomposition is the real Fourier transform on the group, written down (it was
    computed numerically: Cyclic(256) took 30 s and 1 GB); every irrep occurs dim / r times."""
    from equiproj.groups._rep import structured_check

    reg = G.regular()
    (c, field), = reg.segments
    Q = field.Q
    torch.testing.assert_close(Q.T @ Q, torch.eye(G.order, dtype=torch.float64), atol=1e-12, rtol=0)
    r = {"real": 1, "complex": 2, "quaternionic": 4}
    assert dict(reg.irreps) == {p: p.dim // r[p.type] for p in G.irreps()}
    g = G.sample(3, generator=gen)
    assert structured_check(reg, g) < 1e-12
    # e_h -> e_{gh}
    M = reg.matrix(g)
    assert torch.equal(M.argmax(-2), G.index(g[:, None] @ G.elements()[None]))
    assert G.regular() is reg  # one object per group


@pytest.mark.parametrize("G", ALL, ids=str)
def test_endomorphism_basis_by_type_equals_the_numerical_commutant(G):
    from equiproj.groups._commutant import numerical_endomorphism_basis

    for psi in irreps_of(G):
        C, N = psi.endomorphism_basis, numerical_endomorphism_basis(psi)
        assert C.shape == N.shape
        # the same subspace: each basis element is a combination of the other basis
        coeff = torch.einsum("sab,tab->st", C, N)
        torch.testing.assert_close(torch.einsum("st,tab->sab", coeff, N), C, atol=1e-10, rtol=0)
        if psi.type == "complex":
            torch.testing.assert_close(C[1], torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64) / 2**0.5)


def test_a_group_without_its_irrep_data_cannot_be_made():
    """The irrep-data hooks and the generators are abstract: a group that lacks one fails at construction."""

    class Incomplete(ep.Group):
        ambient_dim = 2

        def irrep_ids(self, band_limit):
            return [0]

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    from equiproj.groups._rep import GROUP_CLASSES

    GROUP_CLASSES.pop("Incomplete", None)


@pytest.mark.parametrize("G", all_groups(), ids=str)
def test_mixed_reps_of_every_group(G, gen):
    """``testing.mixed_reps`` asks the group's hooks, so it serves every group, each rep with several fields."""
    a, b = mixed_reps(G, gen)
    assert a.group == G and b.group == G
    assert len(a.irreps) >= 2 and len(b.irreps) >= 2
