"""Orbit pairs stored by the group's permutations (``OrbitForm.POINTS``, docs/math.md §9): large point
sets without an orbit table. The C++ kernel (both instruction sets, 1 and 2 threads), the Triton kernel
under the interpreter and the pure-torch twin against the float64 spatial reference."""

import itertools

import pytest
import torch

import equiproj
from equiproj import Dihedral, FullOctahedral, Rep, reference
from equiproj import _plan
from equiproj._plan import OrbitForm, orbit_pair, plan_for
from equiproj.grid import grid_points
from equiproj.ops import cpp_available
from equiproj.testing import check_batched_strided_half, nearly_equivariant, relative_error

F64 = torch.float64
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")


def _points(G, shape, shift=0.0):
    return Rep.permutation(G, points=grid_points(shape) + shift)


def _cases():
    """(name, rep_in, rep_out): single large point-set fields (the odd grids have a centre fixed by the
    whole group and axes and diagonals with stabilisers of order 2), a field pair of different point
    sets, copies, and a point set mixed with irreps fields."""
    D4, Oh = Dihedral(4), FullOctahedral()
    g13, g12, g6 = _points(D4, (13, 13)), _points(D4, (12, 12)), _points(Oh, (6, 6, 6))
    g5 = _points(Oh, (5, 5, 5))
    return {
        "D4-13x13": (g13, g13),
        "D4-12x12-to-13x13": (g12, g13),
        "D4-2x13x13-to-12x12": (2 * g13, g12),
        "Oh-6x6x6": (g6, g6),
        "Oh-5x5x5-to-6x6x6": (g5, g6),
        "D4-mixed": (g13 + D4.standard(), 2 * D4.trivial() + g12),
    }


CASES = _cases()


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


@pytest.fixture
def small_pairs_too(monkeypatch):
    """Every pair whose permutations take less room than its orbit table takes the points form (the
    plan keeps tables for pairs up to 128 x 128 otherwise): small tiles for the Triton interpreter."""
    equiproj.clear_caches()
    monkeypatch.setattr(_plan, "_TABLE_ENTRIES", 0)
    yield
    monkeypatch.undo()
    equiproj.clear_caches()


def _point_rows(rep_in, rep_out):
    return [r for r in plan_for(rep_in, rep_out, "cpu").rows() if r.orbits and r.orbit_form == OrbitForm.POINTS]


def _check(W, rep_in, rep_out, backend, tol):
    e_perp, e_g, grad = equiproj.energies_and_grad(W, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25, backend=backend)
    ref_p, ref_g = reference.energies(W.double(), rep_in, rep_out)
    PW = reference.project(W.double(), rep_in, rep_out)
    assert relative_error(e_perp, ref_p) < tol and relative_error(e_g, ref_g) < tol
    want = 2 * (W.double() - PW) + 0.5 * PW
    assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())


# ---- the plan ----------------------------------------------------------------------------------------
def test_large_point_sets_store_the_permutations_not_an_orbit_table():
    rep = _points(Dihedral(4), (64, 64))
    fo = rep.segments[0][1]
    K, form, data = orbit_pair(fo, fo)
    assert form == OrbitForm.POINTS
    assert data.numel() == 1 + 8 * (4096 + 4096)  # |G| (d_out + d_in) + 1
    assert data.numel() * data.element_size() <= 0.01 * 4096 * 4096 * 4  # the float64 plan: <= 1 % of a float32 weight
    assert 4096 * 4096 / 8 <= K < 4096 * 4096  # orbits of at most |G| pairs (counted in the next test)
    small = _points(Dihedral(4), (5, 5)).segments[0][1]
    assert orbit_pair(small, small)[1] == OrbitForm.TABLE  # small pairs keep the table (faster kernels)


def test_orbit_count_is_the_number_of_pair_orbits():
    for rep_in, rep_out in (CASES["D4-12x12-to-13x13"], CASES["Oh-5x5x5-to-6x6x6"]):
        (row,) = _point_rows(rep_in, rep_out)
        so, si = plan_for(rep_in, rep_out, "cpu").point_tables(row, "cpu")
        pairs = so[:, :, None] * row.d_in + si[:, None, :]  # [|G|, d_out, d_in]: the image of every entry
        orbit_min = pairs.min(0).values  # the smallest image names the orbit
        assert row.orbits == row.rank == orbit_min.unique().numel()


# ---- energies, gradients, projection against the reference -------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_energies_and_gradients_match_the_reference(case, backend, gen):
    rep_in, rep_out = case
    assert _point_rows(rep_in, rep_out)
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    _check(W, rep_in, rep_out, backend, 1e-12)
    _check(W.float(), rep_in, rep_out, backend, 1e-5)


def test_projection_is_the_orbit_mean(gen):
    rep_in, rep_out = CASES["D4-12x12-to-13x13"]
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    PW = equiproj.project(W, rep_in, rep_out)
    torch.testing.assert_close(PW, reference.project(W, rep_in, rep_out), atol=1e-12, rtol=0)
    R = equiproj.project(W, rep_in, rep_out, which="non_equivariant")
    torch.testing.assert_close(R, W - PW, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_nearly_equivariant_weights_keep_their_digits(backend, gen):
    for name in ("D4-13x13", "Oh-5x5x5-to-6x6x6"):
        rep_in, rep_out = CASES[name]
        W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
        Wn = nearly_equivariant(W, rep_in, rep_out, 1e-10, gen)
        for X, tol in ((Wn, 1e-6), (Wn.float(), 1e-4)):
            ep, eg = equiproj.energies(X, rep_in, rep_out, backend=backend)
            rp, rg = reference.energies(X.double(), rep_in, rep_out)
            assert 1e-12 < float(rp / X.double().square().sum()) < 1e-7
            assert relative_error(ep, rp) < tol and relative_error(eg, rg) < 1e-6


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_batched_non_contiguous_and_half_precision(backend, gen):
    check_batched_strided_half(*CASES["D4-12x12-to-13x13"], backend, gen)


@needs_cpp
@pytest.mark.parametrize("isa", ["best", "baseline"])
def test_cpp_kernel_on_both_isas_and_thread_counts(isa, gen):
    """Energies, the gradient written, added into a tensor and into the weight itself (the decoupled
    step), on 1 and 2 threads: the large row blocks run their orbits in parallel chunks, and the result
    is the same bit for bit."""
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    threads = torch.get_num_threads()
    rep = _points(Dihedral(4), (27, 27))  # 729 rows: a row block split into chunks of orbits
    try:
        for rep_in, rep_out in (CASES["D4-2x13x13-to-12x12"], (rep, rep)):
            assert _point_rows(rep_in, rep_out)
            P = plan_for(rep_in, rep_out, "cpu")
            W = torch.randn(rep_out.dim, rep_in.dim, generator=gen)
            PW = reference.project(W.double(), rep_in, rep_out)
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append(equiproj.energies(W, rep_in, rep_out, backend="cpp"))
                grad = torch.randn(W.shape, generator=gen)
                want = grad.double() + 2 * 0.5 * (W.double() - PW) + 2 * 0.125 * PW
                equiproj.ops.fused_energies_and_grads([W], [P], [0.5], [0.125], outs=[grad])
                torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-5)
                Wc = W.clone()
                equiproj.ops.fused_energies_and_grads([Wc], [P], [-0.05], [0.0], outs=[Wc])
                torch.testing.assert_close(Wc.double(), W.double() - 0.1 * (W.double() - PW), atol=1e-5, rtol=1e-5)
            assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
            rp, rg = reference.energies(W.double(), rep_in, rep_out)
            assert relative_error(results[0][0], rp) < 1e-5 and relative_error(results[0][1], rg) < 1e-5
    finally:
        torch.set_num_threads(threads)
        torch.ops.equiproj_cpu.set_isa(previous)


@needs_cpp
def test_cpp_twin_and_triton_interpreter_agree(small_pairs_too, check_triton, gen):
    """Small point sets in the points form: the Triton kernel (under the interpreter on the CPU), the
    C++ kernel and the twin against the reference, in float32, bfloat16 and float16."""
    D4, Oh = Dihedral(4), FullOctahedral()
    g5 = _points(D4, (5, 5)).segments[0][1]
    permuted = Rep(D4, [(2, g5)], perm=torch.randperm(50, generator=gen))  # rows and columns gathered
    cases = [(_points(D4, (5, 5)), _points(D4, (5, 5))), (_points(D4, (4, 4)), _points(D4, (5, 5))),
             (_points(Oh, (5, 5, 5)), _points(Oh, (5, 5, 5))), (permuted, permuted)]
    for (rep_in, rep_out), dtype in zip(cases, itertools.cycle([torch.float32, torch.bfloat16, torch.float16])):
        assert _point_rows(rep_in, rep_out)
        check_triton(rep_in, rep_out, dtype)
        W = torch.randn(rep_out.dim, rep_in.dim, generator=gen).to(dtype)
        ref_p, ref_g = reference.energies(W.double(), rep_in, rep_out)
        for backend in ("cpp", "torch"):
            e1, e2 = equiproj.energies(W, rep_in, rep_out, backend=backend)
            assert relative_error(e1, ref_p) < 1e-5 and relative_error(e2, ref_g) < 1e-5


@needs_cpp
def test_penalty_backward_and_decay_on_a_declared_point_set_layer(seed):
    rep = _points(Dihedral(4), (13, 13))
    lin = equiproj.nn.declare(torch.nn.Linear(rep.dim, rep.dim, bias=False), rep, rep)
    penalty = equiproj.nn.ProjectionPenalty(torch.nn.Sequential(lin), lambda_perp=0.5)
    W = lin.weight.detach().double().clone()
    PW = reference.project(W, rep, rep)
    lin.weight.grad = torch.ones_like(lin.weight)
    penalty.backward()
    torch.testing.assert_close(lin.weight.grad.double(), 1 + (W - PW), atol=1e-5, rtol=1e-5)
    penalty.decay_(0.1)
    torch.testing.assert_close(lin.weight.detach().double(), W - 0.1 * (W - PW), atol=1e-5, rtol=1e-5)
