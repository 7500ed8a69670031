"""One coercion of "a representation" at every entry point (equiproj.groups.as_rep): e3nn Irreps and
strings in the energy functions, declare and check_equivariance; clear errors otherwise. The escnn
objects are covered in tests/nn/test_escnn_models.py (they need escnn)."""

import pytest
import torch

import equiproj
from equiproj.groups import as_rep, as_rep_pair

e3nn = pytest.importorskip("e3nn")
from e3nn import o3  # noqa: E402


def test_as_rep_reads_strings_and_irreps():
    G = equiproj.O3()
    r = equiproj.Rep.parse(G, "2x0e + 1o")
    assert as_rep(r) is r
    assert as_rep("2x0e + 1o", group=G) == r
    assert as_rep(o3.Irreps("2x0e + 1o")) == r
    assert as_rep(o3.Irreps("2x0e + 1e"), group=equiproj.SO3()) == equiproj.Rep.parse(equiproj.SO3(), "2x0 + 1")
    assert as_rep_pair("2x0e + 1o", r) == (r, r)
    assert as_rep_pair(o3.Irreps("2x0e + 1o"), "2x0e + 1o") == (r, r)


def test_as_rep_refuses_with_what_to_do():
    with pytest.raises(TypeError, match="no group is known"):
        as_rep("2x0 + 1")
    with pytest.raises(TypeError, match="rep_in must be an equiproj Rep, an e3nn Irreps, or an escnn"):
        as_rep([1, 2], "rep_in")


def test_energy_functions_take_e3nn_irreps(gen):
    irreps_in, irreps_out = o3.Irreps("3x0e + 2x1o"), o3.Irreps("2x0e + 1o + 2e")
    r_in, r_out = equiproj.Rep.from_e3nn(irreps_in), equiproj.Rep.from_e3nn(irreps_out)
    W = torch.randn(r_out.dim, r_in.dim, generator=gen, dtype=torch.float64)
    want = equiproj.energies(W, r_in, r_out)
    for got in (equiproj.energies(W, irreps_in, irreps_out), equiproj.energies(W, str(irreps_in), r_out)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(equiproj.project(W, irreps_in, irreps_out), equiproj.project(W, r_in, r_out))
    assert equiproj.energy_breakdown(W, irreps_in, irreps_out).keys() == equiproj.energy_breakdown(W, r_in, r_out).keys()
    e_perp, _, grad = equiproj.energies_and_grad(W, irreps_in, irreps_out, lambda_perp=1.0)
    torch.testing.assert_close(e_perp, want[0], rtol=1e-12, atol=0)
    got_many = equiproj.energies_many([W, W.T.contiguous()], [(irreps_in, irreps_out), (irreps_out, irreps_in)])
    torch.testing.assert_close(got_many[0][0], want[0], rtol=1e-12, atol=0)
    # e3nn's own matrices are equivariant: zero energy (float64 reference on the same weight)
    lin = o3.Linear(irreps_in, irreps_out).double()
    with torch.no_grad():
        M = lin(torch.eye(r_in.dim, dtype=torch.float64)).T
    e_perp, e_g = equiproj.energies(M, irreps_in, irreps_out)
    assert float(e_perp) < 1e-24 * float(e_g)
    ref = equiproj.reference.energies(W, r_in, r_out)
    torch.testing.assert_close(equiproj.energies(W, irreps_in, irreps_out), ref, rtol=1e-9, atol=1e-12)


def test_declare_takes_strings_and_refuses_e3nn_modules():
    G = equiproj.SO3()
    lin = equiproj.nn.declare(torch.nn.Linear(4, 5), 4 * G.trivial(), "2x0 + 1")
    assert equiproj.nn.declaration(lin).rep_out == equiproj.Rep.parse(G, "2x0 + 1")
    with pytest.raises(TypeError, match="equivariant by construction"):
        equiproj.nn.declare(o3.Linear("2x0e", "2x0e"), "2x0e", "2x0e")
