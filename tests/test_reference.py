"""The spatial-domain reference: exact against the spectral projection, and bounded in size."""

import pytest
import torch

import equiproj as ep
from equiproj import reference


@pytest.mark.parametrize("G, s_in, s_out", [(ep.SO2(), "0 + 2x1 + 3", "1 + 2"), (ep.O3(), "0e + 1o + 2e", "2x1o + 2o"),
                                            (ep.Dihedral(6), "regular", "2x(1,1) + (0,3)")], ids=str)
def test_reference_matches_the_spectral_projection(G, s_in, s_out, gen):
    rep_in, rep_out = ep.Rep.parse(G, s_in), ep.Rep.parse(G, s_out)
    W = torch.randn(3, rep_out.dim, rep_in.dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(reference.project(W, rep_in, rep_out), ep.project(W, rep_in, rep_out), atol=1e-12, rtol=0)
    e_perp = ep.energies(W, rep_in, rep_out, backend="torch")[0]
    torch.testing.assert_close(reference.orbit_defect(W, rep_in, rep_out), 2 * e_perp, atol=1e-11, rtol=1e-12)


def test_reference_refuses_a_huge_quadrature_clearly():
    """SO(2) at frequency 1e9 needs 2e9 + 1 quadrature points: the reference tried to allocate 16 GB."""
    r = ep.SO2().irrep(10**9)
    W = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="spectral backend"):
        ep.energies(W, r, r, backend="reference")
    with pytest.raises(ValueError, match=f"{reference.MAX_QUADRATURE_POINTS:,}"):
        reference.project(W, r, r)
    e_perp, e_g = ep.energies(W, r, r)  # the spectral backends are exact at any band limit
    torch.testing.assert_close(e_g, W.square().sum() - e_perp)
    big = ep.SO3().irrep(80)  # (2 * 80 + 1)^2 (80 + 1) > 1e6 points
    with pytest.raises(ValueError, match="spectral backend"):
        reference.energies(torch.zeros(big.dim, big.dim, dtype=torch.float64), big, big)


def test_reference_refuses_more_work_than_its_limit_clearly(gen):
    """C_512's regular rep: 512 elements of two dense 512 x 512 products took 15-20 s; a batch of weights
    multiplies the work. Within the limit the reference runs."""
    import time

    G = ep.Cyclic(512)
    r = G.regular()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="floating-point operations.*spectral backend"):
        reference.energies(torch.zeros(r.dim, r.dim, dtype=torch.float64), r, r)
    assert time.perf_counter() - t0 < 5  # refused before the work (a generous bound, not a benchmark)
    small = ep.Cyclic(8).regular()
    W = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(reference.energies(W, small, small)[0], ep.energies(W, small, small)[0], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="floating-point operations"):
        reference.project(torch.zeros(1, 8, 8, dtype=torch.float64).expand(4 * 10**6, 8, 8), small, small)
