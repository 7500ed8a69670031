"""Adversarial checks of the float32 trace-form kernel, the row blocks cut by work for the thread pool
and the cyclic closed form of permutation fields in cyclic order, against the float64 reference:
spans around the kernel's vector groups and chunks, several irrep types per row, column slices,
batches, nearly equivariant weights with gradients that cancel, extreme magnitudes, non-finite
entries, both instruction sets, and bitwise equality across thread counts."""

from __future__ import annotations

import math

import pytest
import torch

from equiproj import O3, SO3, Cyclic, Dihedral, Octahedral, Rep, reference
from equiproj._plan import OrbitForm, PlanColumn, orbit_pair, plan_for
from equiproj.ops import cpp_available, fused_energies_and_grads
from equiproj.testing import nearly_equivariant, rotated_points

pytestmark = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")

F64 = torch.float64


@pytest.fixture(params=["best", "baseline"])
def isa(request):
    previous = torch.ops.equiproj_cpu.set_isa(request.param)
    yield request.param
    torch.ops.equiproj_cpu.set_isa(previous)


def _project(Wd, ri, ro):
    """The float64 reference projection; for ``ri`` made of copies of a single irrep, one block of at
    most 16 input copies at a time (P acts on each d x d tile on its own, and the reference's cost
    grows quadratically with the copies)."""
    segs = ri.segments
    if len(segs) != 1 or segs[0][0] <= 16:
        return reference.project(Wd, ri, ro)
    copies, field = segs[0][0], segs[0][1]
    d = field.dim
    out = torch.empty_like(Wd)
    for c0 in range(0, copies, 16):
        c1 = min(copies, c0 + 16)
        sub = Rep.parse(ri.group, f"{c1 - c0}x{field.name}")
        out[..., c0 * d: c1 * d] = reference.project(Wd[..., c0 * d: c1 * d], sub, ro)
    return out


def _want(W, ri, ro, cp, cg):
    """float64 energies and gradient 2 cp (W - P W) + 2 cg P W of the weight as the kernel sees it."""
    Wd = W.double()
    PW = _project(Wd, ri, ro)
    R = Wd - PW
    return R.square().sum((-2, -1)), PW.square().sum((-2, -1)), 2 * cp * R + 2 * cg * PW


def _grad_bound(W, ri, ro, cp, cg, dtype):
    """elementwise bound on a gradient computed from float32 terms: the float64 gradient rounded once
    plus two roundings of each of its terms (see tests/ops/test_cpp.py)."""
    Wd = W.double()
    PW = _project(Wd, ri, ro)
    ulp = 2.0**-52 if dtype == F64 else 2.0**-23
    terms = (2 * cp * (Wd - PW)).abs() + (2 * cg * PW).abs()
    g = (2 * cp * (Wd - PW) + 2 * cg * PW).abs()
    return ulp * g + 2 * ulp * terms + 1e-12 * (abs(cp) + abs(cg)) * float(Wd.abs().max()) + ulp * 1.2e-38


def _check(W, P, ri, ro, cp, cg, e_tol, dtype):
    (ep,), (eg,), (g,) = fused_energies_and_grads([W], [P], [cp], [cg])
    wp, wg, wgrad = _want(W, ri, ro, cp, cg)
    assert torch.allclose(ep.double(), wp, rtol=e_tol, atol=0), (ep, wp)
    assert torch.allclose(eg.double(), wg, rtol=e_tol, atol=0), (eg, wg)
    err = (g.double() - wgrad).abs()
    assert bool((err <= _grad_bound(W, ri, ro, cp, cg, dtype)).all()), float(err.max())


# the trace form of d = 2 (O's E), d = 3 and d = 5 (SO(3)'s l = 1, 2),
# with copy counts around the float32 kernel's groups of 8 d columns, its chunks of 960 and 320 columns
def _spans(d):
    eight = [7, 8, 9, 10, 16, 17]  # 8 d: just below, on, above the first whole group
    chunk = [960 // d - 1, 960 // d, 960 // d + 1, 960 // d + 8, 320 // d, 320 // d + 1, 2 * 960 // d + 3]
    return sorted(set(eight + [c for c in chunk if c > 0]))


def _irrep(d):
    if d == 2:
        return Octahedral(), "E"
    return SO3(), {3: "1", 5: "2"}[d]


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_trace_form_spans_around_groups_and_chunks(d, dtype, isa, gen):
    G, name = _irrep(d)
    for copies in _spans(d):
        ri = Rep.parse(G, f"{copies}x{name}")
        ro = Rep.parse(G, f"{1 + copies % 3}x{name}")
        P = plan_for(ri, ro, "cpu")
        W = torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen).to(dtype)
        _check(W, P, ri, ro, 0.7, 0.2, 1e-10 if dtype == F64 else 1e-6, dtype)


def _mixed(copies):
    """rows of several irrep types (0e, 1o, 2e): the trace form of d = 3 and 5 next to r = 0 pairs."""
    G = O3()
    return Rep.parse(G, f"3x0e + {copies}x1o + 2x2e"), Rep.parse(G, "0e + 2x1o + 2e")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_column_slices_batches_and_steps_in_place(dtype, isa, gen):
    ri, ro = _mixed(43)  # 129 columns of 1o: one whole group of 24 columns after 5 more, then the tail
    P = plan_for(ri, ro, "cpu")
    tol = 1e-10 if dtype == F64 else 1e-6
    big = torch.randn(2, ro.dim, ri.dim + 7, dtype=F64, generator=gen).to(dtype)
    W = big[..., 3: 3 + ri.dim]  # a column slice of a bigger tensor, batched
    assert not W.is_contiguous()
    (ep,), (eg,), (g,) = fused_energies_and_grads([W], [P], [0.3], [0.9])
    wp, wg, wgrad = _want(W, ri, ro, 0.3, 0.9)
    assert torch.allclose(ep.double(), wp, rtol=tol, atol=0) and torch.allclose(eg.double(), wg, rtol=tol, atol=0)
    assert bool(((g.double() - wgrad).abs() <= _grad_bound(W, ri, ro, 0.3, 0.9, dtype)).all())
    # a contiguous batch, the gradient added into an existing buffer, then the decoupled step into W itself
    Wc = W.contiguous()
    out = torch.randn(Wc.shape, dtype=F64, generator=gen).to(dtype)
    base = out.clone()
    fused_energies_and_grads([Wc], [P], [0.3], [0.9], outs=[out])
    want = base.double() + wgrad
    assert float((out.double() - want).abs().max()) <= (2e-6 if dtype != F64 else 1e-12) * float(want.abs().max())
    step = Wc.clone()
    fused_energies_and_grads([step], [P], [-0.1], [-0.05], outs=[step])
    want = Wc.double() + _want(Wc, ri, ro, -0.1, -0.05)[2]
    assert float((step.double() - want).abs().max()) <= (2e-6 if dtype != F64 else 1e-12) * float(want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("lambdas", [(0.8, 0.0), (0.6, 0.6), (-0.05, 0.0)], ids=["lambda_G=0", "equal", "step"])
def test_nearly_equivariant_weights_with_cancelling_gradients(dtype, lambdas, isa, gen):
    """E_perp / ||W||^2 ~ 1e-10: with lambda_G = 0 the gradient is the tiny residual alone (it must keep its
    digits), with lambda_perp = lambda_G it is 2 lambda W (nothing of the split may show)."""
    cp, cg = lambdas
    for ri, ro in (_mixed(30), (Rep.parse(SO3(), "197x2"), Rep.parse(SO3(), "2x2"))):
        P = plan_for(ri, ro, "cpu")
        W0 = torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen)
        if len(ri.segments) == 1:  # P W0 plus a residual of 1e-10 of its energy (the blockwise reference)
            PW0 = _project(W0, ri, ro)
            R0 = W0 - PW0
            W = (PW0 + R0 * math.sqrt(1e-10 * float(PW0.square().sum() / R0.square().sum()))).to(dtype)
        else:
            W = nearly_equivariant(W0, ri, ro, 1e-10, gen).to(dtype)
        Wd = W.double()
        R = Wd - _project(Wd, ri, ro)
        (ep,), _, (g,) = fused_energies_and_grads([W], [P], [cp], [cg])
        assert abs(float(ep) / float(R.square().sum()) - 1) < (1e-7 if dtype == F64 else 1e-5)
        want = 2 * cp * R + 2 * cg * (Wd - R)
        if cg == 0:  # the residual relative to itself: R keeps the precision of W's entries
            assert float((g.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
        else:
            assert float((g.double() - want).abs().max()) <= 4 * 2.0**-23 * float(want.abs().max())
        if cp < 0:  # the decoupled step added into the weight itself
            step = W.clone()
            fused_energies_and_grads([step], [P], [cp], [cg], outs=[step])
            assert float((step.double() - (Wd + want)).abs().max()) <= 2 * (2.0**-52 if dtype == F64 else 2.0**-23) * float(Wd.abs().max())


@pytest.mark.parametrize("scale", [1e15, 1e-15, 1e-17])
def test_large_and_small_float32_magnitudes(scale, isa, gen):
    """entries whose squares stay in float32's normal range once summed: energies and gradients to float32 precision."""
    ri, ro = Rep.parse(SO3(), "130x1"), Rep.parse(SO3(), "2x1")
    P = plan_for(ri, ro, "cpu")
    W = (torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen) * scale).float()
    _check(W, P, ri, ro, 0.7, 0.2, 1e-6, torch.float32)


@pytest.mark.parametrize("scale", [1e150, 1e30, 1e-30, 1e-150])
def test_extreme_float64_magnitudes(scale, isa, gen):
    ri, ro = Rep.parse(SO3(), "130x1"), Rep.parse(SO3(), "2x1")
    P = plan_for(ri, ro, "cpu")
    W = torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen) * scale
    _check(W, P, ri, ro, 0.7, 0.2, 1e-10, F64)


def test_float32_energies_out_of_range_are_inf_and_zero(isa, gen):
    """float32 weights return float32 energies: 1e30 entries give inf (the float64 energy is ~1e63), 1e-30 give 0;
    the gradients stay exact."""
    ri, ro = Rep.parse(SO3(), "130x1"), Rep.parse(SO3(), "2x1")
    P = plan_for(ri, ro, "cpu")
    for scale, energy in ((1e30, math.inf), (1e-30, 0.0)):
        W = (torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen) * scale).float()
        (ep,), (eg,), (g,) = fused_energies_and_grads([W], [P], [0.7], [0.2])
        assert float(ep) == energy and float(eg) == energy
        wgrad = _want(W, ri, ro, 0.7, 0.2)[2]
        assert bool(((g.double() - wgrad).abs() <= _grad_bound(W, ri, ro, 0.7, 0.2, torch.float32)).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("entry", [(0, 0, math.inf), (1, 100, -math.inf), (0, 1, math.nan), (4, 200, -math.inf)])
def test_non_finite_entries_stay_in_their_tile(dtype, entry, isa, gen):
    """An inf or nan entry neither crashes nor spreads: the float64 reference (a dense projection) turns every
    entry into nan, the kernel only the entries of its own 3 x 3 tile (the diagonal for a diagonal entry,
    itself for an off-diagonal one); everything else matches the reference of the weight without that tile."""
    ri, ro = Rep.parse(SO3(), "130x1"), Rep.parse(SO3(), "2x1")
    P = plan_for(ri, ro, "cpu")
    row, col, value = entry
    W = torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen).to(dtype)
    W[row, col] = value
    (ep,), (eg,), (g,) = fused_energies_and_grads([W], [P], [0.7], [0.2])
    diagonal = row % 3 == col % 3
    tile = (slice(row - row % 3, row - row % 3 + 3), slice(col - col % 3, col - col % 3 + 3))
    bad = torch.zeros(W.shape, dtype=torch.bool)
    if diagonal:
        bad[tile] = torch.eye(3, dtype=torch.bool)
    else:
        bad[row, col] = True
    assert torch.equal(~torch.isfinite(g), bad)
    assert not math.isfinite(float(ep)) and math.isfinite(float(eg)) == (not diagonal or math.isnan(value))
    clean = W.clone()
    clean[tile] = 0
    wgrad = _want(clean, ri, ro, 0.7, 0.2)[2]
    keep = torch.ones(W.shape, dtype=torch.bool)
    keep[tile] = False
    bound = _grad_bound(clean, ri, ro, 0.7, 0.2, dtype)
    assert bool(((g.double() - wgrad).abs() <= bound)[keep].all())


def _thread_layers(gen):
    """layers of different row-block heights in one call: 0e rows (height 1), 2e rows (height 5), a
    batch of 1o rows long enough for the float32 kernel, an empty batch, a cyclic closed form, mixed rows."""
    G = O3()
    specs = [("700x0e", "40x0e"), ("400x2e", "6x2e"), ("4x1o + 1x0e", "2x0e + 1o"), ("400x1o", "3x1o"),
             ("7x0e + 3x2e", "9x0e + 2e")]
    batches = [(), (), (0,), (6,), ()]
    out = []
    for (si, so), batch in zip(specs, batches):
        ri, ro = Rep.parse(G, si), Rep.parse(G, so)
        out.append((ri, ro, (*batch, ro.dim, ri.dim)))
    C = Cyclic(8)
    return out[:4] + [(C.trivial() + 3 * C.regular(), 2 * C.regular(), (2, 16, 25))] + out[4:]


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype, isa, gen):
    layers = _thread_layers(gen)
    plans = [plan_for(ri, ro, "cpu") for ri, ro, _ in layers]
    Ws = [torch.randn(shape, dtype=F64, generator=gen).to(dtype) for _, _, shape in layers]
    cps = [0.3, 0.7, 0.1, 0.9, 0.4, 0.25]
    cgs = [0.2, 0.0, 0.5, 0.9, 0.1, 0.6]
    # more than two pieces of about 2^15 entries, so that two threads split them
    assert sum(W.numel() for W in Ws) > 4 * 2**15
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            ep, eg, g = fused_energies_and_grads(Ws, plans, cps, cgs)
            outs = [torch.full_like(W, 0.5) for W in Ws]
            fused_energies_and_grads(Ws, plans, cps, cgs, outs=outs)
            results.append((ep, eg, g, outs))
    finally:
        torch.set_num_threads(previous)
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            for x, y in zip(a, b):
                assert torch.equal(x, y) and x.dtype == y.dtype
    # and the numbers are right
    for (ri, ro, _), W, e, cp, cg in zip(layers, Ws, first[0], cps, cgs):
        wp = _want(W, ri, ro, cp, cg)[0]
        assert torch.allclose(e.double(), wp, rtol=1e-10 if dtype == F64 else 1e-6, atol=1e-30)


# ---- permutation fields whose pair orbits are (b - a) mod N: the cyclic closed form -------------------


def _polygon(N, order=None):
    angles = 2 * math.pi * torch.arange(N, dtype=F64) / N
    points = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return points if order is None else points[list(order)]


def _form(rep_out, rep_in):
    found = orbit_pair(rep_out.segments[0][1], rep_in.segments[0][1])
    return None if found is None else found[1]


@pytest.mark.parametrize("N", [4, 6, 7, 8, 12])
def test_polygon_vertices_in_cyclic_order_and_only_then(N):
    in_order = Rep.permutation(Cyclic(N), points=_polygon(N))
    reversed_order = Rep.permutation(Cyclic(N), points=_polygon(N, range(N - 1, -1, -1)))  # (a - b) mod N: same orbits
    shuffled = Rep.permutation(Cyclic(N), points=_polygon(N, [0, 2, 1, *range(3, N)]))
    dihedral = Rep.permutation(Dihedral(N), points=_polygon(N))  # floor(N / 2) + 1 orbits of pairs
    assert _form(in_order, in_order) == OrbitForm.CYCLIC
    assert _form(reversed_order, reversed_order) == OrbitForm.CYCLIC
    assert _form(shuffled, shuffled) != OrbitForm.CYCLIC
    assert _form(dihedral, dihedral) != OrbitForm.CYCLIC
    centred = Rep.permutation(Cyclic(N), points=torch.cat([_polygon(N), torch.zeros(1, 2, dtype=F64)]))
    assert _form(centred, centred) != OrbitForm.CYCLIC  # a fixed point: N + 2 orbits of N + 1 points


@pytest.mark.parametrize("N, M, speed", [(16, 4, 1), (16, 4, 3), (12, 6, 5), (30, 10, 3), (9, 9, 2), (24, 8, 1)])
def test_quotients_of_cyclic_groups(N, M, speed):
    field = rotated_points(N, M, speed=speed)
    assert _form(field, field) == OrbitForm.CYCLIC
    shifted = rotated_points(N, M, order=[*range(2, M), 0, 1], speed=speed)  # the same cycle from another point
    assert _form(field, shifted) == OrbitForm.CYCLIC and _form(shifted, field) == OrbitForm.CYCLIC
    if M > 4:
        other_speed = rotated_points(N, M, speed=-speed)  # orbits (a + b) mod M
        assert _form(field, other_speed) != OrbitForm.CYCLIC
    smaller = rotated_points(N, M // 2, speed=speed) if M % 2 == 0 and M // 2 > 1 else None
    if smaller is not None:  # d_out != d_in
        assert _form(field, smaller) != OrbitForm.CYCLIC and _form(smaller, field) != OrbitForm.CYCLIC


def _cyclic_pairs():
    C12 = Cyclic(12)
    f6, f4 = rotated_points(12, 6), rotated_points(12, 4)
    f6s = rotated_points(12, 6, order=[3, 4, 5, 0, 1, 2])
    f12 = Rep.permutation(C12, points=_polygon(12))
    centred = Rep.permutation(C12, points=torch.cat([_polygon(12), torch.zeros(1, 2, dtype=F64)]))
    return [
        (C12.trivial() + 2 * f6 + f4 + f12, f6s + 2 * f4 + f12),  # d_out != d_in pairs next to cyclic ones
        (3 * f12 + centred, 2 * f12 + centred),  # a fixed point: an orbit table next to the closed form
        (2 * rotated_points(16, 4) + rotated_points(16, 8), rotated_points(16, 4, speed=3) + 2 * rotated_points(16, 8)),
    ]


def _energies_against_the_reference(W, P, ri, ro, cp, cg, near):
    """The op's energies of ``W`` checked against the reference (relative 1e-10 in float64, 1e-7 when
    nearly equivariant, 2e-6 in float32; E_G 1e-6); its gradient and the reference's, to be checked."""
    (ep,), (eg,), (g,) = fused_energies_and_grads([W], [P], [cp], [cg])
    wp, wg, wgrad = _want(W, ri, ro, cp, cg)
    tol = (1e-7 if near else 1e-10) if W.dtype == F64 else 2e-6
    assert torch.allclose(ep.double(), wp, rtol=tol, atol=0) and torch.allclose(eg.double(), wg, rtol=1e-6, atol=0)
    return g, wgrad


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("pair", range(3))
def test_cyclic_fields_against_the_reference(pair, dtype, isa, gen):
    ri, ro = _cyclic_pairs()[pair]
    P = plan_for(ri, ro, "cpu")
    forms = {int(row[PlanColumn.ORBIT_FORM]) for row in P.meta.tolist() if row[PlanColumn.ORBITS] > 0}
    assert int(OrbitForm.CYCLIC) in forms  # the route under test is taken
    W = torch.randn(2, ro.dim, ri.dim, dtype=F64, generator=gen).to(dtype)
    for W0 in (W, nearly_equivariant(W.double(), ri, ro, 1e-10, gen).to(dtype)):
        g, wgrad = _energies_against_the_reference(W0, P, ri, ro, 0.6, 0.0, near=W0 is not W)
        gtol = 1e-12 if dtype == F64 else 2e-6
        # lambda_G = 0: the gradient is the residual alone; the reference rounds R = W - P W to ulp |W|
        assert float((g.double() - wgrad).abs().max()) <= gtol * float(W0.double().abs().max())
        step = W0.clone()
        fused_energies_and_grads([step], [P], [-0.2], [-0.1], outs=[step])
        want = W0.double() + _want(W0, ri, ro, -0.2, -0.1)[2]
        assert float((step.double() - want).abs().max()) <= gtol * float(want.abs().max())


@pytest.mark.parametrize("pair", range(3))
def test_cyclic_fields_in_the_triton_kernel(pair, check_triton):
    ri, ro = _cyclic_pairs()[pair]
    check_triton(ri, ro, torch.float32)


def test_cyclic_fields_in_the_torch_twin(gen):
    import equiproj  # noqa: PLC0415

    ri, ro = _cyclic_pairs()[0]
    W = torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen)
    wp, wg, wgrad = _want(W, ri, ro, 1.0, 0.25)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        ep, eg, g = equiproj.energies_and_grad(W.to(dtype), ri, ro, lambda_perp=1.0, lambda_G=0.25, backend="torch")
        assert abs(float(ep) / float(wp) - 1) < tol and abs(float(eg) / float(wg) - 1) < tol
        assert float((g.double() - wgrad).abs().max()) <= tol * float(wgrad.abs().max())


def test_declared_linear_layers_with_cyclic_fields(gen):
    from equiproj.nn import ProjectionPenalty, declare  # noqa: PLC0415

    pairs = _cyclic_pairs()
    model = torch.nn.Sequential(*(torch.nn.Linear(ri.dim, ro.dim, bias=False) for ri, ro in pairs[:2]))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randn(layer.weight.shape, dtype=F64, generator=gen))
    for layer, (ri, ro) in zip(model, pairs[:2]):
        declare(layer, ri, ro, bias=False)
    penalty = ProjectionPenalty(model, lambda_perp=0.5, lambda_G=0.1)
    value = penalty.backward()
    total = 0.0
    for layer, (ri, ro) in zip(model, pairs[:2]):
        wp, wg, wgrad = _want(layer.weight.detach(), ri, ro, 0.5, 0.1)
        total += 0.5 * float(wp) + 0.1 * float(wg)
        assert float((layer.weight.grad.double() - wgrad).abs().max()) <= 2e-6 * float(wgrad.abs().max())
    assert abs(float(value.detach()) / total - 1) < 1e-5
    before = [layer.weight.detach().double().clone() for layer in model]
    penalty.decay_(0.3, 0.05)
    for layer, W, (ri, ro) in zip(model, before, pairs[:2]):
        PW = reference.project(W, ri, ro)
        want = W - 0.3 * (W - PW) - 0.05 * PW
        assert float((layer.weight.detach().double() - want).abs().max()) <= 2e-6 * float(want.abs().max())


@pytest.mark.parametrize("group", [Cyclic(4), Cyclic(5), Cyclic(9), Dihedral(4), Dihedral(5), Dihedral(7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_closed_forms_four_rows_at_a_time(group, dtype, isa, gen):
    """pass 1 of the closed forms adds four tile rows per pass: tiles of 4 .. 14 rows (a remainder of 0 .. 3
    rows, a D_N tile's two halves), several copies on both sides, a batch, nearly equivariant too."""
    ri, ro = group.trivial() + 3 * group.regular(), 2 * group.regular() + group.trivial()
    P = plan_for(ri, ro, "cpu")
    W = torch.randn(2, ro.dim, ri.dim, dtype=F64, generator=gen).to(dtype)
    for W0 in (W, nearly_equivariant(W.double(), ri, ro, 1e-10, gen).to(dtype)):
        g, wgrad = _energies_against_the_reference(W0, P, ri, ro, 0.4, 0.3, near=W0 is not W)
        assert float((g.double() - wgrad).abs().max()) <= (1e-12 if dtype == F64 else 2e-6) * float(wgrad.abs().max())


@pytest.mark.parametrize("spec", [("Octahedral", "T1", "A2"), ("FullOctahedral", "Eu", "T2g"), ("FullOctahedral", "T1u", "A1g")])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_trace_form_of_finite_group_irreps(spec, dtype, isa, gen):
    """O / O_h irreps of dimension 2 and 3 next to another irrep in the same rows, around 8 d columns."""
    import equiproj  # noqa: PLC0415

    group_name, irrep, other = spec
    G = getattr(equiproj, group_name)()
    d = Rep.parse(G, irrep).dim
    for copies in (8, 9, 17, 41):  # one whole group of 8 d columns needs 9 copies (the last d - 1 columns)
        ri = Rep.parse(G, f"{copies}x{irrep} + {other}")
        ro = Rep.parse(G, f"2x{irrep} + {other}")
        P = plan_for(ri, ro, "cpu")
        W = torch.randn(ro.dim, ri.dim, dtype=F64, generator=gen).to(dtype)
        _check(W, P, ri, ro, 0.7, 0.2, 1e-10 if dtype == F64 else 1e-6, dtype)


@pytest.mark.parametrize("r", [3.3e-21, 1e-20])
def test_float32_energies_of_tiny_residuals(r, isa):
    """Normal float32 entries whose squares are subnormal (|r| < 1.1e-19), summing to an E_perp in float32's
    normal range (2.6e-37, 2.4e-36): one residual r on every off-diagonal entry of 40 tiles of 3 x 3 (their
    diagonal is 0, so P W = 0 and E_perp = 6 * 40 * r^2 exactly in float64), and the same entries in a pair
    of different irreps (r = 0: E_perp = ||W||^2). Squares summed in float32 lanes would round every
    addition to the subnormal spacing 1.4e-45 (4.7e-5 relative error at r = 3.3e-21): every kernel here
    sums them in float64."""
    tile = torch.full((3, 3), r, dtype=torch.float32)
    tile.fill_diagonal_(0.0)
    W = tile.repeat(1, 40)
    exact = 6 * 40 * float(W[0, 1]) ** 2
    for ri, ro in ((Rep.parse(SO3(), "40x1"), Rep.parse(SO3(), "1")), (Rep.parse(O3(), "40x1e"), Rep.parse(O3(), "1o"))):
        P = plan_for(ri, ro, "cpu")
        (ep,), (eg,), _ = fused_energies_and_grads([W], [P], [0.7], [0.2])
        assert float(eg) == 0.0
        assert abs(float(ep) / exact - 1) < 1e-6, float(ep) / exact - 1
