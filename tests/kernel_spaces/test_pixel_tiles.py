"""The pixel-tile kernel of steerable convolutions (``equiproj_cpu::pixel_tile_pass``, csrc/pixel_tiles.cpp):
the CPU route of ``energies_and_grad``, ``ProjectionPenalty.backward()`` and ``decay_`` for layers in the
fields layout (fields without a change of basis, in their own order), against the float64 group
quadrature on the band coefficients (``backend="reference"``) on fresh seeded weights.

Tolerances (the kernel computes every tile in float64; the reference sees the same weight in float64):
  float64 energies and gradient:                           1e-9 relative (observed ~1e-14)
  float32 weights: energies 1e-6 relative (returned in float32), gradient one float32 rounding
  (2^-23 of max |g|, times 4)
  nearly equivariant (E_perp / ||K||^2 = 1e-10): E_perp 1e-6 relative in float64, 1e-5 in float32
  (the residual is formed in float64, never as a difference of norms)
  AVX-512 against the plain loop: 1e-12 relative (the same sums, fused or unfused multiply-adds)
"""

from __future__ import annotations

import pytest
import torch

import equiproj as ep
from equiproj.kernel_spaces import default_kernel_space, kernel_energies_and_grads_many
from equiproj.kernel_spaces._pixel_plan import tile_kernel_available, tile_kernel_tables, tile_tables
from equiproj.nn import ProjectionPenalty, declare
from equiproj.testing import relative_error as rel

pytestmark = pytest.mark.skipif(not tile_kernel_available(), reason="the C++ extension equiproj._C is not built")

# group, rep_in, rep_out, kernel size: odd copy counts (remainders of the tile blocks), r = 0 pairs,
# ranks above the unrolled 16 (SO(2) at k = 9: 18), 2-D and 3-D
CASES = [
    (ep.SO2, "3x0 + 2x1 + 1x2 + 3", "2x0 + 3x1 + 5x2 + 1x3", 5),
    (ep.SO2, "2x0 + 1 + 3x3", "1 + 7x2", 7),
    (ep.SO2, "0 + 1 + 2 + 3 + 4", "0 + 2x4", 9),
    (ep.O2, "2x0,0 + 1,1 + 3x1,2 + 1,0", "3x1,1 + 1,3 + 2x1,0", 5),
    (ep.SO3, "3x0 + 2x1 + 2", "2x0 + 1 + 3x2", 5),
    (ep.O3, "2x0e + 3x1o + 2e", "0e + 2x1o + 2x2e + 0o", 5),
    (ep.SO3, "0 + 1 + 2", "1 + 2", 3),
]
IDS = [f"{G.__name__}-k{k}-{i}" for i, (G, _, _, k) in enumerate(CASES)]


def _layer(case):
    G, rin, rout, k = case
    g = G()
    ri, ro = ep.Rep.parse(g, rin), ep.Rep.parse(g, rout)
    return default_kernel_space(g, k), ri, ro


def _shape(sp, ri, ro):
    return (ro.dim, ri.dim) + (sp.kernel_size,) * sp.spatial_dims


def _reference(W, sp, ri, ro, lp, lg):
    """(E_perp, E_G, gradient) in float64 by the group quadrature on the band coefficients."""
    return sp.energies_and_grad(W.double(), ri, ro, lambda_perp=lp, lambda_G=lg, backend="reference")


def _nearly_equivariant(sp, ri, ro, gen, batch=()):
    shape = batch + _shape(sp, ri, ro)
    K = sp.project(torch.randn(shape, dtype=torch.float64, generator=gen), ri, ro)
    N = sp.project(torch.randn(shape, dtype=torch.float64, generator=gen), ri, ro, which="non_equivariant")
    return K + N * (1e-10 * K.square().sum() / N.square().sum()).sqrt()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_energies_and_gradient_against_the_reference(case, gen):
    sp, ri, ro = _layer(case)
    assert tile_kernel_tables(torch.zeros(_shape(sp, ri, ro)), sp.plan(ri, ro), None) is not None
    W64 = torch.randn(_shape(sp, ri, ro), dtype=torch.float64, generator=gen)
    lp, lg = 0.7, 0.2
    rp, rg, rgrad = _reference(W64, sp, ri, ro, lp, lg)
    for dt in (torch.float64, torch.float32):
        W = W64.to(dt)
        want = _reference(W, sp, ri, ro, lp, lg) if dt != torch.float64 else (rp, rg, rgrad)
        e_perp, e_g, grad = sp.energies_and_grad(W, ri, ro, lambda_perp=lp, lambda_G=lg)
        assert grad.dtype == dt and grad.shape == W.shape and e_perp.dtype == (dt if dt == torch.float64 else torch.float32)
        tol = 1e-9 if dt == torch.float64 else 1e-6
        assert rel(e_perp.double(), want[0]) < tol and rel(e_g.double(), want[1]) < tol
        gtol = 1e-9 if dt == torch.float64 else 4 * 2**-23
        assert float((grad.double() - want[2]).abs().max()) <= gtol * float(want[2].abs().max())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nearly_equivariant_weights_keep_their_small_energy(case, gen):
    sp, ri, ro = _layer(case)
    K = _nearly_equivariant(sp, ri, ro, gen)
    for dt, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        W = K.to(dt)
        rp, _, rgrad = _reference(W, sp, ri, ro, 1.0, 0.0)  # exact arithmetic on the rounded weight
        assert 1e-13 < float(rp / W.double().square().sum()) < 1e-8
        e_perp, _, grad = sp.energies_and_grad(W, ri, ro)
        assert rel(e_perp.double(), rp) < tol
        # 2 (W - P W) is ~1e-5 of W: its own rounding in the weight dtype, not W's
        assert float((grad.double() - rgrad).abs().max()) <= 4 * tol * float(rgrad.abs().max())


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_vector_kernel_matches_the_plain_loop(case, gen):
    sp, ri, ro = _layer(case)
    t = tile_tables(sp.plan(ri, ro))
    for dt in (torch.float64, torch.float32):
        W = torch.randn(2, t.m, t.n, dtype=dt, generator=gen)
        lp, lg = torch.tensor([0.5, 1.5], dtype=torch.float64), torch.tensor([0.25, 0.0], dtype=torch.float64)
        outs = []
        for plain in (False, True):
            out = torch.full_like(W, float("nan"))
            ep_, eg_ = torch.ops.equiproj_cpu.pixel_tile_pass(W, t.pairs, t.basis, lp, lg, out, 1, plain, [2])
            outs.append((ep_, eg_, out))
        (a, b, ga), (c, d, gc) = outs
        assert not ga.isnan().any()
        tol = 1e-12 if dt == torch.float64 else 2**-23
        assert a.dtype == dt and float(((a - c).abs() / c).max()) <= tol and float(((b - d).abs() / d).max()) <= tol
        assert float((ga.double() - gc.double()).abs().max()) <= (1e-12 if dt == torch.float64 else 2**-22) * float(
            gc.abs().max())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_result_does_not_depend_on_the_thread_count(case, gen):
    # the items are cut by cost, one range per thread: fields of different dimensions and ranks, 1-3
    # threads (3 on fewer items than threads for the smallest case), every partial sum in item order
    sp, ri, ro = _layer(case)
    t = tile_tables(sp.plan(ri, ro))
    W = torch.randn(3, t.m, t.n, generator=gen)
    lp = lg = torch.full((3,), 0.5, dtype=torch.float64)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.empty_like(W)
            runs.append((*torch.ops.equiproj_cpu.pixel_tile_pass(W, t.pairs, t.basis, lp, lg, out, 1, False, [3]), out))
    finally:
        torch.set_num_threads(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_cuts_by_cost_balance_the_threads():
    cuts = torch.ops.equiproj_cpu.cost_cuts
    # a 1-row field's items, then 3-row and 5-row ones: by count, 40 of the 144 rows against 104
    cost = [1.0] * 16 + [3.0] * 16 + [5.0] * 16
    starts = cuts(cost, 2)
    assert starts[0] == 0 and starts[-1] == len(cost)
    halves = [sum(cost[a:b]) for a, b in zip(starts, starts[1:])]
    assert abs(halves[0] - halves[1]) <= max(cost)
    # more parts than items: empty ranges, still ordered and covering
    starts = cuts([2.0, 7.0], 5)
    assert starts[0] == 0 and starts[-1] == 2 and all(a <= b for a, b in zip(starts, starts[1:]))
    assert cuts([], 3) == [0, 0, 0, 0]
    assert cuts([0.0, 0.0, 0.0], 2)[-1] == 3
    # a least cost per part: a small call runs on fewer parts (one below twice the least cost)
    assert cuts(cost, 2, 150.0) == [0, len(cost)]
    assert len(cuts(cost, 4, 50.0)) - 1 == 2 and cuts(cost, 4, 50.0)[-1] == len(cost)
    assert cuts(cost, 2, 0.0) == cuts(cost, 2)


def test_batched_weights_with_per_kernel_lambdas(gen):
    sp, ri, ro = _layer(CASES[0])
    W = torch.randn((2, 3) + _shape(sp, ri, ro), dtype=torch.float64, generator=gen)
    lp = torch.rand(2, 3, dtype=torch.float64, generator=gen)
    lg = torch.rand(3, dtype=torch.float64, generator=gen)
    rp, rg, rgrad = _reference(W, sp, ri, ro, lp, lg)
    for dt, tol in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
        e_perp, e_g, grad = sp.energies_and_grad(W.to(dt), ri, ro, lambda_perp=lp, lambda_G=lg)
        assert e_perp.shape == e_g.shape == (2, 3)
        assert float(((e_perp.double() - rp).abs() / rp).max()) < tol
        assert float(((e_g.double() - rg).abs() / rg).max()) < tol
        assert float((grad.double() - rgrad).abs().max()) <= 4 * max(tol, 2**-23) * float(rgrad.abs().max())
    with pytest.raises(ValueError, match="broadcastable"):
        sp.energies_and_grad(W, ri, ro, lambda_perp=torch.ones(4))


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=[IDS[1], IDS[5]])
def test_added_into_grad_and_decay_in_place(case, gen):
    """Gradients added into an existing tensor, and the decoupled step with the weight as its own
    output (the kernel reads every element before it writes it): W - rate (W - P W) in float64."""
    sp, ri, ro = _layer(case)
    for dt in (torch.float64, torch.float32):
        W = torch.randn(_shape(sp, ri, ro), dtype=dt, generator=gen)
        G0 = torch.randn(W.shape, dtype=dt, generator=gen)
        _, _, rgrad = _reference(W, sp, ri, ro, 0.3, 0.1)
        G = G0.clone()
        kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[0.3], lambda_G=[0.1], outs=[G])
        want = G0.double() + rgrad
        ulp = 1e-12 if dt == torch.float64 else 2**-22
        assert float((G.double() - want).abs().max()) <= ulp * float(want.abs().max())
        rate = 0.25
        PW = sp.project(W.double(), ri, ro)
        want = W.double() - rate * (W.double() - PW)
        step = W.clone()
        _, _, (out,) = kernel_energies_and_grads_many([step], [sp], [(ri, ro)], lambda_perp=[-rate / 2],
                                                      lambda_G=[0.0], outs=[step], energies=False)
        assert out is step
        assert float((step.double() - want).abs().max()) <= ulp * float(want.abs().max())


def test_penalty_backward_and_decay_on_a_declared_conv(gen):
    """ProjectionPenalty on an SO(2) irreps Conv2d: backward() adds into an existing .grad, decay_ steps
    in place, both as the float64 reference says."""
    g = ep.SO2()
    r = ep.Rep.parse(g, "3x0 + 3x1 + 2x2 + 3")
    conv = declare(torch.nn.Conv2d(r.dim, r.dim, 5, bias=False), r, r)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    sp = default_kernel_space(g, 5)
    pen = ProjectionPenalty(conv, lambda_perp=0.05)
    G0 = torch.randn(conv.weight.shape, generator=gen)
    conv.weight.grad = G0.clone()
    W = conv.weight.detach().clone()
    rp, _, rgrad = _reference(W, sp, r, r, 0.05, 0.0)
    value = pen.backward()
    assert rel(value.double(), 0.05 * rp) < 1e-6
    assert float((conv.weight.grad.double() - G0.double() - rgrad).abs().max()) <= 2**-21 * float(G0.abs().max())
    pen.decay_(0.1)
    want = W.double() - 0.1 * (W.double() - sp.project(W.double(), r, r))
    assert float((conv.weight.detach().double() - want).abs().max()) <= 2**-21 * float(want.abs().max())


def test_other_weights_take_the_fused_op(gen):
    """Non-contiguous, half-precision and permuted layouts are not the kernel's: the fused op runs them
    (the same energies)."""
    sp, ri, ro = _layer(CASES[0])
    shape = _shape(sp, ri, ro)
    W = torch.randn((shape[0], 2 * shape[1]) + shape[2:], dtype=torch.float64, generator=gen)[:, ::2]
    assert not W.is_contiguous() and tile_kernel_tables(W, sp.plan(ri, ro), None) is None
    rp, rg, rgrad = _reference(W, sp, ri, ro, 1.0, 0.0)
    e_perp, _, grad = sp.energies_and_grad(W, ri, ro)
    assert rel(e_perp, rp) < 1e-9 and float((grad - rgrad).abs().max()) <= 1e-9 * float(rgrad.abs().max())
    Wb = W.contiguous().to(torch.bfloat16)
    assert tile_kernel_tables(Wb, sp.plan(ri, ro), None) is None
    e_perp, _, grad = sp.energies_and_grad(Wb, ri, ro)
    assert grad.dtype == torch.bfloat16 and rel(e_perp.double(), _reference(Wb, sp, ri, ro, 1.0, 0.0)[0]) < 1e-5


def test_malformed_tables_are_refused():
    sp, ri, ro = _layer(CASES[0])
    t = tile_tables(sp.plan(ri, ro))
    W = torch.zeros(1, t.m, t.n)
    one = torch.ones(1, dtype=torch.float64)
    bad = t.pairs.clone()
    bad[-1, 3] += 1  # one more input copy in the last output field: its pairs overrun the columns
    with pytest.raises(RuntimeError, match="cover all"):
        torch.ops.equiproj_cpu.pixel_tile_pass(W, bad, t.basis, one, one, None, 0, False, [1])
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.equiproj_cpu.pixel_tile_pass(W, t.pairs, t.basis[:-8], one, one, None, 0, False, [1])
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.equiproj_cpu.pixel_tile_pass(W.transpose(1, 2), t.pairs, t.basis, one, one, None, 0, False, [1])
    with pytest.raises(RuntimeError, match="elements"):
        torch.ops.equiproj_cpu.pixel_tile_pass(W, t.pairs, t.basis, one.expand(2), one.expand(2), None, 0, False, [2])
