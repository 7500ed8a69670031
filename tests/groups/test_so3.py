"""SO(3)/O(3) at high degree: Wigner D and spherical harmonics up to L_MAX, the degree limit, e3nn's matrices."""

import math

import pytest
import torch

import equiproj as ep
from equiproj.groups import L_MAX, spherical_harmonics, wigner_D
from equiproj.groups._so3 import _quarter_turn, sphere_quadrature


FLIPS = torch.stack([torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)),
                     torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))])  # beta = 0 and pi (y-x-y angles)


def near_gimbal_lock(eps=1e-9):
    """Rotations within ``eps`` of beta = 0, pi, where alpha and gamma are individually ill-defined."""
    A = torch.tensor([[0.0, -1.0, 0.3], [1.0, 0.0, -0.2], [-0.3, 0.2, 0.0]], dtype=torch.float64)
    small = torch.linalg.matrix_exp(eps * A)
    return torch.cat([FLIPS @ small, small @ FLIPS])


def assert_orthogonal_homomorphism(l, gen, n=4, atol=1e-10):
    G = ep.SO3()
    g1, g2 = G.sample(n, generator=gen), G.sample(n, generator=gen)
    A, B, AB = wigner_D(l, g1), wigner_D(l, g2), wigner_D(l, g1 @ g2)
    eye = torch.eye(2 * l + 1, dtype=torch.float64)
    assert float((A @ A.transpose(-1, -2) - eye).abs().max()) < atol
    assert float((AB - A @ B).abs().max()) < atol
    assert float((wigner_D(l, g1.transpose(-1, -2)) - A.transpose(-1, -2)).abs().max()) < atol
    # the definition: Y(R x) = D(R) Y(x)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    Yr = spherical_harmonics(l, torch.einsum("nij,pj->npi", g1, x))
    assert float((Yr - torch.einsum("nab,pb->npa", A, spherical_harmonics(l, x))).abs().max()) < atol


@pytest.mark.parametrize("l", [17, 18, 19, 23, 30, 40])
def test_wigner_d_is_an_orthogonal_homomorphism_past_int64_factorials(l, gen):
    """(2m-1)!! overflowed int64 from m = 18: D_18(I) was off by 1, D was no homomorphism up to l = 40."""
    eye = torch.eye(2 * l + 1, dtype=torch.float64)
    torch.testing.assert_close(ep.SO3().irrep(l).matrix(torch.eye(3, dtype=torch.float64)), eye, atol=1e-14, rtol=0)
    assert_orthogonal_homomorphism(l, gen)


def test_wigner_d_at_the_largest_degree(gen):
    assert_orthogonal_homomorphism(L_MAX, gen, n=2)


def test_wigner_d_near_gimbal_lock(gen):
    """Next to beta = 0, pi the product of the angles' matrices is still R to rounding (e3nn's
    matrix_to_angles takes beta = acos(y) there and loses a rotation of 1e-9: its D_1 is off by 1e-9)."""
    R = near_gimbal_lock()
    torch.testing.assert_close(wigner_D(1, R), R, atol=1e-15, rtol=0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    for l in (2, 7, 18, 40):
        D = wigner_D(l, R)
        Yr = spherical_harmonics(l, torch.einsum("nij,pj->npi", R, x))
        torch.testing.assert_close(Yr, torch.einsum("nab,pb->npa", D, spherical_harmonics(l, x)), atol=1e-12, rtol=0)
        torch.testing.assert_close(D[:3] @ D[3:].transpose(-1, -2), wigner_D(l, R[:3] @ R[3:].transpose(-1, -2)),
                                   atol=1e-12, rtol=0)


def test_wigner_d_matches_e3nn(gen):
    pytest.importorskip("e3nn")
    from e3nn import o3

    R = torch.cat([FLIPS, ep.SO3().sample(6, generator=gen)])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn computes its angles and matrices in the default dtype
    try:
        alpha, beta, gamma = o3.matrix_to_angles(R)
        theirs = {l: o3.wigner_D(l, alpha, beta, gamma) for l in (0, 1, 2, 5, 17, 18, 24, 40)}
    finally:
        torch.set_default_dtype(old)
    for l, D in theirs.items():
        torch.testing.assert_close(wigner_D(l, R), D, atol=1e-10, rtol=0)


def test_quarter_turn_matches_the_quadrature_definition():
    """K = D_l(R_z(-pi/2)) from the generator's exponential equals sum_i w_i Y(K x_i) Y(x_i)^T (exact)."""
    Kz = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    for l in (1, 2, 3, 8, 15):
        pts, w = sphere_quadrature(2 * l)
        D = torch.einsum("pm,pn->mn", spherical_harmonics(l, pts @ Kz.T), spherical_harmonics(l, pts) * w[:, None])
        torch.testing.assert_close(_quarter_turn(l), D, atol=1e-13, rtol=0)


@pytest.mark.parametrize("l", [0, 1, 5, 18, 25, 60])
def test_spherical_harmonics_are_orthonormal_and_homogeneous(l, gen):
    pts, w = sphere_quadrature(2 * l)
    Y = spherical_harmonics(l, pts)
    torch.testing.assert_close(Y.T @ (Y * w[:, None]), torch.eye(2 * l + 1, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(spherical_harmonics(l, 1.5 * x), 1.5**l * spherical_harmonics(l, x),
                               atol=1e-12 * 1.5**l, rtol=1e-12)


def test_degree_limit_is_enforced_where_irreps_are_made():
    assert L_MAX == 512
    ep.SO3().irrep(L_MAX)
    ep.O3().irrep((L_MAX, -1))
    for make in (lambda: ep.SO3().irrep(L_MAX + 1), lambda: ep.O3().irrep((L_MAX + 1, 1)),
                 lambda: ep.Rep.parse(ep.SO3(), f"2x{L_MAX + 1}"), lambda: ep.Rep.parse(ep.O3(), f"{L_MAX + 1}o"),
                 lambda: spherical_harmonics(L_MAX + 1, torch.ones(3, dtype=torch.float64)),
                 lambda: wigner_D(L_MAX + 1, torch.eye(3, dtype=torch.float64))):
        with pytest.raises(ValueError, match=f"L_MAX = {L_MAX}"):
            make()


@pytest.mark.parametrize("G", [ep.SO3(), ep.O3()], ids=str)
def test_energies_and_gradient_at_high_degree(G, gen):
    """At l >= 23 the numerical commutant (a 2(2l+1)^2 x (2l+1)^2 SVD) found dimension 5 and raised."""
    for l in (23, 40, L_MAX):
        ir = G.irrep(l if G == ep.SO3() else (l, -1))
        d = ir.dim
        torch.testing.assert_close(ir.endomorphism_basis, torch.eye(d, dtype=torch.float64)[None] / math.sqrt(d))
        W = torch.randn(d, d, generator=gen, dtype=torch.float64)
        e_perp, e_g, grad = ep.energies_and_grad(W, ir, ir)
        # real type: the equivariant maps are the multiples of I
        PW = torch.trace(W) / d * torch.eye(d, dtype=torch.float64)
        torch.testing.assert_close(e_g, PW.square().sum(), rtol=1e-10, atol=0)
        torch.testing.assert_close(e_perp, (W - PW).square().sum(), rtol=1e-10, atol=0)
        torch.testing.assert_close(grad, 2 * (W - PW), rtol=0, atol=1e-12)


def test_grid_act_on_a_high_degree_field(gen):
    """grid.act rotates the channels by D_18(g): a field of harmonics evaluated at rotated points."""
    from equiproj.grid import act, grid_points

    rep = ep.SO3().irrep(18)
    g = ep.Octahedral().elements()[7]
    pts = grid_points((3, 3, 3))
    x = spherical_harmonics(18, pts).T.reshape(rep.dim, 3, 3, 3)  # x(p) = Y(p): (g.x)(p) = D(g) Y(g^-1 p) = Y(p)
    torch.testing.assert_close(act(x, g, rep), x, atol=1e-13 * float(x.abs().max()), rtol=0)
    D = rep.matrix(g)
    assert float((D @ D.T - torch.eye(rep.dim, dtype=torch.float64)).abs().max()) < 1e-12
