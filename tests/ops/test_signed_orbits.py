"""Signed orbit tables (``OrbitForm.SIGNED``, docs/math.md §9): pairs of monomial fields, whose
matrices are signed permutations (the irreps of C_4 and D_4, the three-dimensional irreps of the
octahedral groups, their products with the points of a kernel grid). Grid convolutions on irreps
fields take them on the weight in place. The plan against the group's matrices, and the C++ kernel
(both instruction sets, 1 and 2 threads), the Triton kernel under the interpreter and the pure-torch
twin against the float64 spatial reference."""

import pytest
import torch
from torch import nn

import equiproj
from equiproj import SO2, Cyclic, Dihedral, FullOctahedral, Octahedral, Rep, reference
from equiproj._plan import OrbitForm, plan_for
from equiproj.grid import kernel_rep
from equiproj.groups._field import monomial_action
from equiproj.ops import cpp_available
from equiproj.testing import check_batched_strided_half, nearly_equivariant, relative_error

F64 = torch.float64
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")


def _irreps(G, copies):
    """``copies`` copies of every irrep of G (odd counts: groups of four, two and one tiles)."""
    parts = [copies * psi for psi in G.irreps()]
    return sum(parts[1:], parts[0])


def _cases():
    """(rep_in, rep_out, kernel shape, group): irreps fields times the whole kernel grid, as declare()
    builds a grid convolution on irreps fields."""
    C4, D4, O, Oh = Cyclic(4), Dihedral(4), Octahedral(), FullOctahedral()
    return {
        "C4-k3": (_irreps(C4, 3), _irreps(C4, 2), (3, 3), C4),
        "C4-k5": (_irreps(C4, 5), _irreps(C4, 1), (5, 5), C4),
        "D4-k3": (_irreps(D4, 7), _irreps(D4, 1), (3, 3), D4),
        "D4-k5-to-4": (_irreps(D4, 2), 2 * D4.irrep((1, 1)) + D4.irrep((0, 0)), (4, 4), D4),  # no centre pixel
        "O-k3": (_irreps(O, 2), _irreps(O, 1), (3, 3, 3), O),  # E: basis pairs beside the signed ones
        "Oh-k3": (_irreps(Oh, 1), _irreps(Oh, 1), (3, 3, 3), Oh),
    }


CASES = _cases()


@pytest.fixture(params=sorted(CASES))
def case(request):
    rep_in, rep_out, k, G = CASES[request.param]
    return rep_in @ kernel_rep(G, k, orbits=False), rep_out, rep_in @ kernel_rep(G, k)


def _signed_rows(rep_in, rep_out):
    return [r for r in plan_for(rep_in, rep_out, "cpu").rows() if r.orbits and r.orbit_form == OrbitForm.SIGNED]


def _field_at(rep, offset):
    at = 0
    for c, f in rep.segments:
        if offset < at + c * f.dim:
            return f
        at += c * f.dim
    raise IndexError(offset)


# ---- the fields and the plan ----------------------------------------------------------------------------
def test_monomial_actions_are_the_fields_matrices():
    C4, D4, O = Cyclic(4), Dihedral(4), Octahedral()
    fields = [C4.irrep(1), D4.irrep((1, 1)), D4.irrep((1, 2)), O.irrep("T1"), O.irrep("T2")]
    fields = [f.segments[0][1] for f in fields]
    fields.append((D4.irrep((1, 1)) @ kernel_rep(D4, (3, 3), orbits=False)).segments[0][1])  # irrep ⊗ pixels
    fields.append(C4.regular().segments[0][1])  # a permutation field: every sign +1
    for f in fields:
        sigma, sign = monomial_action(f)
        G = f.group
        M = torch.zeros(G.order, f.dim, f.dim, dtype=F64)
        M.scatter_(1, sigma[:, None, :], sign[:, None, :])  # column i: sign_g(i) e_{sigma_g(i)}
        torch.testing.assert_close(M, f.matrix(G.elements()), atol=1e-12, rtol=0)
    assert monomial_action(O.irrep("E").segments[0][1]) is None  # entries -1/2, sqrt(3)/2
    assert monomial_action(SO2().irrep(1).segments[0][1]) is None  # not a finite group


def test_signed_orbits_are_an_orthonormal_basis_of_the_equivariant_maps(case):
    """For every signed pair: the vectors ``c(e) / sqrt(n_k)`` on the orbits are orthonormal, each is
    fixed by every element (``rho_out(g) B rho_in(g)^T = B``), and there are dim Hom_G of them."""
    rep_in, rep_out, _ = case
    P = plan_for(rep_in, rep_out, "cpu")
    rows = _signed_rows(rep_in, rep_out)
    assert rows and P.identity_perm
    for row in rows:
        fo, fi = _field_at(rep_out, row.out_offset), _field_at(rep_in, row.in_offset)
        o, inv, sign = P.orbit_index(row, "cpu")
        K = row.orbits
        B = torch.zeros(K + 1, row.d_out * row.d_in, dtype=F64)
        B[o, torch.arange(o.numel())] = sign * inv[o].sqrt()
        B = B[:K].reshape(K, row.d_out, row.d_in)
        torch.testing.assert_close(torch.einsum("kab,lab->kl", B, B), torch.eye(K, dtype=F64), atol=1e-12, rtol=0)
        g = fo.group.elements()
        moved = torch.einsum("gab,kbc,gdc->gkad", fo.matrix(g), B, fi.matrix(g))
        torch.testing.assert_close(moved, B.expand_as(moved), atol=1e-12, rtol=0)
        chi = lambda f: f.matrix(g).diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
        assert K == round(float((chi(fo) * chi(fi)).mean()))


def test_declared_grid_convolutions_on_irreps_fields_read_the_weight_in_place():
    for G, k, conv in ((Cyclic(4), 5, nn.Conv2d), (Dihedral(4), 3, nn.Conv2d), (FullOctahedral(), 3, nn.Conv3d)):
        rep = _irreps(G, 2)
        decl = equiproj.nn.declaration(equiproj.nn.declare(conv(rep.dim, rep.dim, k, bias=False), rep, rep))
        P = plan_for(decl.weight_rep_in, decl.rep_out, "cpu")
        assert P.identity_perm and _signed_rows(decl.weight_rep_in, decl.rep_out)


# ---- energies, gradients, projection against the reference ----------------------------------------------
def _check(W, rep_in, rep_out, ref_in, backend, tol):
    e_perp, e_g, grad = equiproj.energies_and_grad(W, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25, backend=backend)
    ref_p, ref_g = reference.energies(W.double(), ref_in, rep_out)
    PW = reference.project(W.double(), ref_in, rep_out)
    assert relative_error(e_perp, ref_p) < tol and relative_error(e_g, ref_g) < tol
    want = 2 * (W.double() - PW) + 0.5 * PW
    assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_energies_and_gradients_match_the_reference(case, backend, gen):
    rep_in, rep_out, ref_in = case
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    _check(W, rep_in, rep_out, ref_in, backend, 1e-12)
    _check(W.float(), rep_in, rep_out, ref_in, backend, 1e-5)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_nearly_equivariant_weights_keep_their_digits(case, backend, gen):
    rep_in, rep_out, ref_in = case
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    Wn = nearly_equivariant(W, ref_in, rep_out, 1e-10, gen)
    # the C++ kernel keeps float32 residuals exact (split means, float64 tiles); the twin computes in
    # W's dtype, and the basis pairs of E fields lose a digit there
    for X, tol in ((Wn, 1e-6), (Wn.float(), 1e-4 if backend == "cpp" else 1e-3)):
        ep, eg = equiproj.energies(X, rep_in, rep_out, backend=backend)
        rp, rg = reference.energies(X.double(), ref_in, rep_out)
        assert 1e-12 < float(rp / X.double().square().sum()) < 1e-7
        assert relative_error(ep, rp) < tol and relative_error(eg, rg) < 1e-6


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_batched_non_contiguous_and_half_precision(backend, gen):
    rep_in, rep_out, k, G = CASES["D4-k3"]
    check_batched_strided_half(rep_in @ kernel_rep(G, k, orbits=False), rep_out, backend, gen,
                               reference_rep_in=rep_in @ kernel_rep(G, k))


def _check_dtypes_and_threads(W, rep_in, ref_in, rep_out):
    """W (float32 numbers in float64, one reference for both dtypes) in float32 and float64 through the
    C++ kernel on one and two threads: against the reference, and the same bits on both."""
    rp, rg = reference.energies(W, ref_in, rep_out)
    PW = reference.project(W, ref_in, rep_out)
    want = 2 * (W - PW) + 0.5 * PW
    for dtype, tol in ((torch.float32, 1e-5), (F64, 1e-10)):
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            ep, eg, grad = equiproj.energies_and_grad(W.to(dtype), rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25,
                                                     backend="cpp")
            results.append((ep, eg, grad))
            assert relative_error(ep, rp) < tol and relative_error(eg, rg) < tol, (n, dtype)
            assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))


@needs_cpp
@pytest.mark.parametrize("isa", ["best", "baseline"])
def test_cpp_kernel_on_both_isas_and_thread_counts(isa, check_penalty_step, gen):
    """Declared grid convolutions on irreps fields in float32 and float64: energies, the gradient added
    into ``.grad`` (``penalty.backward()``) and into the weight itself (``decay_``), nearly equivariant
    weights, the same bits on one and on two threads."""
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        for G, k, conv, c_in, c_out in ((Cyclic(4), (5, 5), nn.Conv2d, 9, 2), (Dihedral(4), (3, 3), nn.Conv2d, 6, 1),
                                        (Octahedral(), (3, 3, 3), nn.Conv3d, 3, 1)):
            rep_in, rep_out = _irreps(G, c_in), _irreps(G, c_out)
            m = equiproj.nn.declare(conv(rep_in.dim, rep_out.dim, k, bias=False), rep_in, rep_out)
            decl = equiproj.nn.declaration(m)
            assert _signed_rows(decl.weight_rep_in, decl.rep_out)
            ref_in = rep_in @ kernel_rep(G, k)
            W = torch.randn(rep_out.dim, ref_in.dim, dtype=F64, generator=gen)
            for Wd in (W, nearly_equivariant(W, ref_in, rep_out, 1e-10, gen)):
                _check_dtypes_and_threads(Wd.float().double(), decl.weight_rep_in, ref_in, rep_out)
            check_penalty_step(m, W, ref_in, rep_out)
    finally:
        torch.set_num_threads(threads)
        torch.ops.equiproj_cpu.set_isa(previous)


def test_triton_interpreter_matches_the_reference(check_triton):
    """The Triton kernel (under the interpreter on the CPU) on signed pairs, in float32, bfloat16 and
    float16, the gradient written and added in place."""
    C4, D4 = Cyclic(4), Dihedral(4)
    cases = [(_irreps(C4, 1), _irreps(C4, 1), (3, 3), C4), (_irreps(D4, 1), D4.irrep((1, 1)) + D4.irrep((0, 2)), (3, 3), D4)]
    for (rep_in, rep_out, k, G), dtype in zip(cases * 2, [torch.float32, torch.bfloat16, torch.float16, torch.float32]):
        whole = rep_in @ kernel_rep(G, k, orbits=False)
        assert _signed_rows(whole, rep_out)
        check_triton(whole, rep_out, dtype, reference_rep_in=rep_in @ kernel_rep(G, k))
