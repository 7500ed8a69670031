"""The C++ kernel of closed-form orbit pairs (regular fields of C_N and D_N, csrc/orbit_closed.h).

Every segment length (the vector loops, their 4-wide step and scalar tails, the compile-time
lengths 4, 8, 16), both instruction sets, float32 (pass 2 in float32 with the orbit mean split
into hi + lo) and float64, fresh and accumulated gradients and the decoupled step into the weight
itself, against the float64 spatial reference.
"""

import pytest
import torch

from equiproj import Cyclic, Dihedral, Rep, reference
from equiproj._plan import OrbitForm, PlanColumn, plan_for
from equiproj.ops import cpp_available, fused_energies_and_grads
from equiproj.testing import nearly_equivariant, relative_error, rotated_points

pytestmark = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")

F64 = torch.float64
# C_N regular for N = 4 and N > 5 (C_5 and smaller fields keep the small-tile kernels), D_N regular for
# N >= 2: segment lengths 4, 6..24 and 64 (C_N), 2..17 (D_N); the one-pass float32 kernel takes the
# 4-, 8- and 16-column tiles (C_4, D_2, C_8, D_4, D_8, C_16), the doubled arrays the others
GROUPS = [Cyclic(N) for N in (4, 6, 7, 8, 9, 12, 16, 17, 20, 24, 64)] + [Dihedral(N) for N in (2, 3, 4, 5, 8, 12, 16, 17)]


@pytest.fixture(params=["best", "baseline"])
def isa(request):
    previous = torch.ops.equiproj_cpu.set_isa(request.param)
    yield request.param
    torch.ops.equiproj_cpu.set_isa(previous)


def _reps(G):
    """Three input copies after an irreps field (the orbit pairs start at a column offset), two output copies."""
    r = G.regular()
    return G.trivial() + 3 * r, 2 * r


def _closed_form_rows(rep_in, rep_out):
    P = plan_for(rep_in, rep_out, "cpu")
    forms = {int(row[PlanColumn.ORBIT_FORM]) for row in P.meta.tolist() if row[PlanColumn.ORBITS] > 0}
    return P, forms


def _expected_grad(W, rep_in, rep_out, cp, cg):
    PW = reference.project(W.double(), rep_in, rep_out)
    return 2 * cp * (W.double() - PW) + 2 * cg * PW


@pytest.mark.parametrize("G", GROUPS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_closed_forms_match_the_reference(G, dtype, isa, gen):
    rep_in, rep_out = _reps(G)
    P, forms = _closed_form_rows(rep_in, rep_out)
    # the regular fields' pairs: closed forms; the trivial field's with them: an orbit table (above 5 points)
    closed = OrbitForm.DIHEDRAL if isinstance(G, Dihedral) else OrbitForm.CYCLIC
    assert forms == ({closed, OrbitForm.TABLE} if G.order > 5 else {closed})
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen).to(dtype)
    cp, cg = 0.5 + float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen))
    tol = 1e-12 if dtype == F64 else 2e-6
    (ep,), (eg,), (grad,) = fused_energies_and_grads([W], [P], [cp], [cg])
    rp, rg = reference.energies(W.double(), rep_in, rep_out)
    assert relative_error(ep, rp) < tol and relative_error(eg, rg) < tol
    want = _expected_grad(W, rep_in, rep_out, cp, cg)
    assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())
    # added into an existing gradient
    base = torch.randn(W.shape, dtype=F64, generator=gen).to(dtype)
    out = base.clone()
    fused_energies_and_grads([W], [P], [cp], [cg], outs=[out])
    assert float((out.double() - base.double() - want).abs().max()) <= 2 * tol * float((base.double() + want).abs().max())
    # the decoupled step, added into the weight itself: W <- W - rate (W - P W) - rate_G P W
    rate, rate_G = 0.1, 0.02
    step = W.clone()
    fused_energies_and_grads([step], [P], [-rate / 2], [-rate_G / 2], outs=[step])
    want_step = W.double() + _expected_grad(W, rep_in, rep_out, -rate / 2, -rate_G / 2)
    assert float((step.double() - want_step).abs().max()) <= 2 * tol * float(want_step.abs().max())


@pytest.mark.parametrize("G", [Cyclic(4), Cyclic(8), Cyclic(16), Cyclic(17), Cyclic(64), Dihedral(2), Dihedral(4),
                               Dihedral(8), Dihedral(17)], ids=str)
def test_nearly_equivariant_float32_weights_keep_their_digits(G, isa, gen):
    """E_perp / ||W||^2 ~ 1e-10 in float32: the residual W - m of every entry is ~1e-5 of W, so
    a float32 difference with a rounded mean would lose about half its digits (~1e-3 relative);
    the split mean keeps R to its own float32 rounding."""
    rep_in, rep_out = _reps(G)
    P, _ = _closed_form_rows(rep_in, rep_out)
    W64 = 3 + torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)  # |W| ~ 3: means far from 0
    W = nearly_equivariant(W64, rep_in, rep_out, 1e-10, gen).float()
    rp, rg = reference.energies(W.double(), rep_in, rep_out)  # exact arithmetic on the rounded weight
    assert 1e-12 < float(rp / W.double().square().sum()) < 1e-8
    (ep,), (eg,), (grad,) = fused_energies_and_grads([W], [P], [1.0], [0.0])
    assert relative_error(ep, rp) < 1e-5 and relative_error(eg, rg) < 1e-6
    want = _expected_grad(W, rep_in, rep_out, 1.0, 0.0)
    assert float((grad.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_batched_strided_and_half_precision_weights(isa, gen):
    """Strided, batched and fp16/bf16 weights are staged through float64 rows (the same kernel)."""
    for G in (Cyclic(4), Cyclic(12), Dihedral(8)):
        rep_in, rep_out = _reps(G)
        P, _ = _closed_form_rows(rep_in, rep_out)
        base = torch.randn(2, 3, rep_in.dim, 2 * rep_out.dim, dtype=F64, generator=gen)
        W = base[..., ::2].transpose(-1, -2)
        assert not W.is_contiguous()
        for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            Wd = W.to(dtype)
            (ep,), (eg,), (grad,) = fused_energies_and_grads([Wd], [P], [1.0], [0.25])
            rp, rg = reference.energies(Wd.double(), rep_in, rep_out)
            e_tol = 1e-12 if dtype == F64 else 2e-6  # exact arithmetic on the rounded weight
            assert ep.shape == (2, 3) and relative_error(ep, rp) < e_tol and relative_error(eg, rg) < e_tol
            want = _expected_grad(Wd, rep_in, rep_out, 1.0, 0.25)
            assert grad.dtype == dtype and float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())


def _on_one_and_two_threads(W, P, cp, cg):
    """``fused_energies_and_grads([W], [P], [cp], [cg])`` on 1 and on 2 threads, asserting that both give
    the same bits; the result of 1 thread."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fused_energies_and_grads([W], [P], [cp], [cg]))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):  # E_perp, E_G, gradients
        assert all(torch.equal(a, b) for a, b in zip(one, two))
    return results[0]


def test_one_and_two_threads_agree_bitwise(gen):
    G = Cyclic(16)
    rep = 8 * G.regular()
    P = plan_for(rep, rep, "cpu")
    W = torch.randn(rep.dim, rep.dim, generator=gen)
    _on_one_and_two_threads(W, P, 0.5, 0.1)


def _orbit_mean(W, G):
    """P(W) of a regular ⊗ regular C_N / D_N layer from the closed form of the orbits (float64, torch ops)."""
    d = W.shape[-1]
    a, b = torch.arange(d)[:, None], torch.arange(d)[None, :]
    if isinstance(G, Cyclic):
        o = (b - a) % d
    else:
        N = d // 2
        ka, kb, t = a % N, b % N, b // N
        o = torch.where(a < N, (kb - ka) % N + N * t, (ka - kb) % N + N * (1 - t))
    o = o.flatten()
    flat = W.double().reshape(-1, d * d)
    sums = torch.zeros(flat.shape[0], d, dtype=F64).index_add_(1, o, flat)
    return (sums / d)[:, o].reshape(W.shape)


@pytest.mark.parametrize("G", [Cyclic(2048), Dihedral(1024)], ids=str)
def test_large_pairs_split_into_row_chunks(G, isa, gen):
    """A 2048-row block of one closed-form pair runs as row chunks in parallel (orbit sums added
    in chunk order): the reference result, the same bits on 1 and 2 threads, the decoupled step."""
    r = G.regular()
    P = plan_for(r, r, "cpu")
    for dtype, tol in ((torch.float32, 2e-6), (F64, 1e-12)):
        W = torch.randn(2, r.dim, r.dim, dtype=F64, generator=gen).to(dtype)
        PW = _orbit_mean(W, G)
        R = W.double() - PW
        (ep,), (eg,), (grad,) = _on_one_and_two_threads(W, P, 0.5, 0.1)
        assert relative_error(ep, R.square().sum((-2, -1))) < tol and relative_error(eg, PW.square().sum((-2, -1))) < tol
        want = R + 0.2 * PW
        assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())
        step = W.clone()
        fused_energies_and_grads([step], [P], [-0.05], [0.0], outs=[step])
        want_step = W.double() - 0.1 * R
        assert float((step.double() - want_step).abs().max()) <= tol * float(want_step.abs().max())


@pytest.mark.parametrize("N, M", [(16, 4), (8, 4), (8, 8), (24, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_points_in_cyclic_order_take_the_cyclic_closed_form(N, M, dtype, gen):
    """Permutation fields that are not regular but whose pairs have the orbits (b - a) mod M of C_M's regular
    fields (a quotient C_N / C_(N/M) given by its action, C_M's rotations of M points) run the closed form."""
    field = rotated_points(N, M)
    rep_in, rep_out = Cyclic(N).trivial() + 3 * field, 2 * field
    P, forms = _closed_form_rows(rep_in, rep_out)
    assert OrbitForm.CYCLIC in forms
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen).to(dtype)
    for W0 in (W, nearly_equivariant(W.double(), rep_in, rep_out, 1e-10, gen).to(dtype)):
        # float64: the reference's own rounding of R = W - P W is ~1e-11 of E_perp at E_perp / ||W||^2 = 1e-10
        tol = (1e-12 if W0 is W else 1e-7) if dtype == F64 else 2e-6
        cp, cg = 0.5 + float(torch.rand(1, generator=gen)), float(torch.rand(1, generator=gen))
        out = torch.randn(W.shape, dtype=F64, generator=gen).to(dtype)
        base = out.clone()
        (ep,), (eg,), _ = fused_energies_and_grads([W0], [P], [cp], [cg], outs=[out])
        rp, rg = reference.energies(W0.double(), rep_in, rep_out)
        assert relative_error(ep, rp) < tol and relative_error(eg, rg) < tol
        want = base.double() + _expected_grad(W0, rep_in, rep_out, cp, cg)
        grad_tol = 1e-12 if dtype == F64 else 2e-6
        assert float((out.double() - want).abs().max()) <= grad_tol * float(want.abs().max())


def test_points_in_another_order_keep_their_tiles():
    """Four points visited out of order by the rotations (0 -> 2 -> 1 -> 3), and D_4 on a square's vertices
    (three orbits of pairs), are not the cyclic closed form: their small pairs keep the basis tiles."""
    shuffled = rotated_points(16, 4, order=[0, 2, 1, 3])
    for field in (shuffled, Rep.permutation(Dihedral(4), points=_square_vertices())):
        _, forms = _closed_form_rows(2 * field, 2 * field)
        assert forms == set()


def _square_vertices():
    return torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=F64)


@pytest.mark.parametrize("G, copies", [(Dihedral(64), 66), (Cyclic(64), 257)], ids=str)
def test_row_blocks_over_4_mib_run_in_chunks_of_copies(G, copies, isa, gen):
    """A row block of more than 4 MiB of W whose tiles fit in 1 MiB runs its copies in chunks of about
    1 MiB, each chunk's two passes one after the other (csrc/orbit_closed.h): one output field
    against 66 D64 (257 C64) input copies, so that the last chunk is a remainder, in float32 and
    float64; fresh and added gradients, the decoupled step into the weight, 1 and 2 threads."""
    r = G.regular()
    rep_in = copies * r
    P = plan_for(rep_in, r, "cpu")
    d = r.dim
    for dtype, tol in ((torch.float32, 2e-6), (F64, 1e-12)):
        W = torch.randn(d, rep_in.dim, dtype=F64, generator=gen).to(dtype)
        assert W.numel() * W.element_size() > 4 << 20
        tiles = W.reshape(d, copies, d).transpose(0, 1)  # [copies, d, d]
        PW = _orbit_mean(tiles, G).transpose(0, 1).reshape(d, rep_in.dim)
        R = W.double() - PW
        (ep,), (eg,), (grad,) = _on_one_and_two_threads(W, P, 0.5, 0.1)
        assert relative_error(ep, R.square().sum()) < tol and relative_error(eg, PW.square().sum()) < tol
        want = R + 0.2 * PW
        assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())
        base = torch.randn(W.shape, dtype=F64, generator=gen).to(dtype)
        out = base.clone()
        fused_energies_and_grads([W], [P], [0.5], [0.1], outs=[out])
        assert float((out.double() - base.double() - want).abs().max()) <= 2 * tol * float((base.double() + want).abs().max())
        step = W.clone()
        fused_energies_and_grads([step], [P], [-0.05], [0.0], outs=[step])
        want_step = W.double() - 0.1 * R
        assert float((step.double() - want_step).abs().max()) <= tol * float(want_step.abs().max())
