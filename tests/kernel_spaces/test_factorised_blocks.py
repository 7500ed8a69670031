"""The C++ pass of the factorised projection (``equiproj_cpu::factorised_pass``: block by block, pixels
to the band, the output field to its irreps, the maps of every irrep slot, back, with the residual, both
energies and the gradient), the CPU route of :meth:`FactorisedPlan.run` for float32 and float64 weights.

Checked against the dense basis of V (``DenseKernelBasis``, QR of the spanning kernels) in float64 and
against the torch route of the same plan (``FactorisedPlan._run``), on fresh seeded weights, with the
AVX2 kernels (with and without the pixels split by the grid's reflections) and the plain loops, on 1 and 2
threads.
Tolerances:
  float64 energies and gradient vs the dense projection:          1e-10 relative (observed ~1e-14)
  float32 (AVX2 and plain loops) vs the dense projection:          2e-5 of max |K| on the gradient and
                                                                    the step, 1e-5 relative on E_perp
  nearly equivariant (E_perp / ||K||^2 ~ 1e-10), float64:         1e-6 relative on E_perp
  1 and 2 threads: 1e-13 (float64) / 1e-6 (float32, a few ulps) of the largest entry (the blocks' sums are added in
    block order; the maps' matrix products between the two kernels may round differently)
"""

from __future__ import annotations

import functools

import pytest
import torch

import equiproj as ep
from equiproj.kernel_spaces import DenseKernelBasis, default_kernel_space
from equiproj.kernel_spaces import _factorised
from equiproj.kernel_spaces._factorised import blocks_available, factorised_plan
from equiproj.testing import random_orthogonal
from equiproj.testing import relative_error as rel

pytestmark = pytest.mark.skipif(not blocks_available(), reason="the C++ extension equiproj._C is not built")


def _band_limited(G, text, copies, gen):
    field = ep.Rep.parse(G, text)
    return copies * field.change_basis(random_orthogonal(field.dim, gen))


def _permuted(rep, gen):
    return ep.Rep(rep.group, rep.segments, perm=torch.randperm(rep.dim, generator=gen))


CASES = {  # name: (group, kernel size, rep_in, rep_out) built from a generator
    # one dense field mixing frequencies 0..3 (the band-limited regular field), odd copies on each side
    "SO2-bl-k5": lambda g: (ep.SO2(), 5, _band_limited(ep.SO2(), "0 + 1 + 2 + 3", 3, g),
                            _band_limited(ep.SO2(), "0 + 1 + 2 + 3", 2, g)),
    # rows of 1 and 3 entries (d_in d_out not a multiple of the kernels' row groups), k = 7
    "SO2-mixed-k7": lambda g: (ep.SO2(), 7, ep.Rep.parse(ep.SO2(), "2x0 + 1 + 3").change_basis(
        random_orthogonal(6, g)), ep.Rep.parse(ep.SO2(), "1 + 0")),
    # O(2) two-dimensional irreps twice in one field, and a field in user order on the output
    "O2-bl-k5": lambda g: (ep.O2(), 5, _band_limited(ep.O2(), "(0,0) + (1,0) + 2x(1,1) + 2x(1,2)", 1, g),
                           ep.Rep.parse(ep.O2(), "(1,1) + (0,0) + (1,2)")),
    # 3-D: 125 pixels (16 vectors of Phi^T per row), one field of degrees 0 and 1
    "SO3-bl-k5": lambda g: (ep.SO3(), 5, _band_limited(ep.SO3(), "0 + 3x1", 1, g),
                            _band_limited(ep.SO3(), "0 + 3x1", 2, g)),
    # both reps in a user order that is not the structured one (the kernels' row and column tables)
    "SO2-permuted-k5": lambda g: (ep.SO2(), 5, _permuted(ep.Rep.parse(ep.SO2(), "2x0 + 1 + 2"), g),
                                  _permuted(_band_limited(ep.SO2(), "0 + 1 + 2 + 3", 2, g), g)),
    # several segments on both sides, some pairs joined by no map (frequencies beyond the band of k = 3)
    "SO2-uncovered-k3": lambda g: (ep.SO2(), 3, ep.Rep.parse(ep.SO2(), "2x0 + 2x6"), ep.Rep.parse(ep.SO2(), "7 + 1")),
}


@functools.cache
def _space_and_reps(name):
    G, k, ri, ro = CASES[name](torch.Generator().manual_seed(0))
    return default_kernel_space(G, k), ri, ro


@functools.cache
def _dense(name):
    """The float64 reference projection of a case (built once: a QR of all the spanning kernels)."""
    return DenseKernelBasis(*_space_and_reps(name))


def _layer(name, seed):
    """The case's space and reps, and a fresh float64 weight drawn from ``seed``."""
    sp, ri, ro = _space_and_reps(name)
    gen = torch.Generator().manual_seed(seed)
    K = torch.randn((ro.dim, ri.dim) + (sp.kernel_size,) * sp.spatial_dims, dtype=torch.float64, generator=gen)
    return sp, ri, ro, K, gen


def _run(sp, ri, ro, K, *args, **kwargs):
    plan = factorised_plan(sp, ri, ro)
    assert plan.runs_blocks(K) and not plan.runs_closed_form(K)
    return plan.run(sp._pixels(K, ri, ro), *args, **kwargs)


@pytest.fixture(params=["split", "rows", "plain"])
def blocks_kernel(request, monkeypatch):
    """The float32 kernels of the pass: AVX2 with the pixels split by the grid's reflections (8 rows in the
    lanes; here on every grid, which the pass takes only from ``_SPLIT_MIN_KERNEL_SIZE``), AVX2 without the split
    (the band in the lanes), or the plain loops. float64 runs the plain loops whatever is chosen: a test skips
    it but for "split"."""
    monkeypatch.setattr(_factorised, "_PLAIN_BLOCKS", request.param == "plain")
    monkeypatch.setattr(_factorised, "_PARITY_BLOCKS", request.param == "split")
    monkeypatch.setattr(_factorised, "_SPLIT_MIN_KERNEL_SIZE", 0)  # the split on every grid, the smallest included
    return request.param


def skip_float64_twice(dtype, blocks_kernel):
    if dtype == torch.float64 and blocks_kernel != "split":
        pytest.skip("float64 always runs the plain loops")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_energies_gradient_and_step_equal_the_dense_projection(name, dtype, blocks_kernel):
    skip_float64_twice(dtype, blocks_kernel)
    sp, ri, ro, K64, gen = _layer(name, 1)
    K = K64.to(dtype)
    K64 = K.double()
    PK = _dense(name).project(K64)
    scale = float(K64.abs().max())
    e_tol, g_tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 2e-5)
    # energies only
    e_perp, e_g, none = _run(sp, ri, ro, K)
    assert none is None
    assert rel(e_perp, (K64 - PK).square().sum()) < e_tol
    assert rel(e_g, PK.square().sum()) < e_tol
    # a fresh gradient
    e_perp, e_g, g = _run(sp, ri, ro, K, 0.7, 0.2)
    want = 1.4 * (K64 - PK) + 0.4 * PK
    torch.testing.assert_close(g.reshape(K.shape).double(), want, rtol=0, atol=g_tol * scale)
    assert rel(e_perp, (K64 - PK).square().sum()) < e_tol
    # added into a non-zero buffer
    buf = torch.randn(K.shape, dtype=torch.float64, generator=gen).to(dtype)
    before = buf.double().clone()  # .double() of a float64 tensor is the tensor itself
    out = sp._pixels(buf, ri, ro)
    _run(sp, ri, ro, K, 0.5, -0.25, out=out)
    torch.testing.assert_close(buf.double(), before + (K64 - PK) - 0.5 * PK, rtol=0, atol=g_tol * scale)
    # the decoupled step in place, with and without the energies of the weight before it
    for energies in (False, True):
        W = K.clone()
        ptr = W.data_ptr()
        e_perp, _, _ = _run(sp, ri, ro, W, -0.1, -0.05, out=sp._pixels(W, ri, ro), energies=energies)
        assert W.data_ptr() == ptr
        torch.testing.assert_close(W.double(), K64 - 0.2 * (K64 - PK) - 0.1 * PK, rtol=0, atol=g_tol * scale)
        assert (e_perp is None) != energies
        if energies:
            assert rel(e_perp, (K64 - PK).square().sum()) < e_tol


@pytest.mark.parametrize("name", ["SO2-bl-k5", "SO3-bl-k5", "SO2-permuted-k5", "SO2-uncovered-k3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_same_numbers_as_the_torch_route_and_on_any_number_of_threads(name, dtype, blocks_kernel):
    skip_float64_twice(dtype, blocks_kernel)
    sp, ri, ro, K, _ = _layer(name, 2)
    Kp = sp._pixels(K.to(dtype), ri, ro)
    plan = factorised_plan(sp, ri, ro)
    ref = plan._run(Kp, 0.5, 0.25, None, True)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(plan.run(Kp, 0.5, 0.25))
    finally:
        torch.set_num_threads(previous)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(results[0], results[1]):  # the maps' matrix products may round differently on 2 threads
        torch.testing.assert_close(a, b, rtol=0, atol=(1e-13 if dtype == torch.float64 else 1e-6) * float(b.abs().max()))
    ep_, eg_, g = results[0]
    assert rel(ep_, ref[0]) < tol and rel(eg_, ref[1]) < tol
    torch.testing.assert_close(g, ref[2], rtol=0, atol=tol * float(Kp.abs().max()))


def check_nearly_equivariant(sp, ri, ro, dense, K0, noise):
    """``K0`` (equivariant) plus the non-equivariant part of ``noise`` scaled to E_perp / ||K||^2 ~ 1e-10:
    the pass keeps that energy to 1e-6 and its gradient 2 (K - P K) to 1e-12 of max |K|."""
    noise = noise - dense.project(noise)
    K = K0 + noise * (1e-5 * float(K0.norm() / noise.norm()))
    want = (K - dense.project(K)).square().sum()
    assert 1e-11 < float(want / K.square().sum()) < 1e-9
    e_perp, _, g = _run(sp, ri, ro, K, 1.0, 0.0)
    assert rel(e_perp, want) < 1e-6
    torch.testing.assert_close(g.reshape(K.shape), 2 * (K - dense.project(K)), rtol=0,
                               atol=1e-12 * float(K.abs().max()))
    return K


@pytest.mark.parametrize("name", ["SO2-bl-k5", "O2-bl-k5"])
def test_nearly_equivariant_weights_keep_their_small_energy(name):
    sp, ri, ro, K, gen = _layer(name, 3)
    dense = _dense(name)
    check_nearly_equivariant(sp, ri, ro, dense, dense.project(K),
                             torch.randn(K.shape, dtype=torch.float64, generator=gen))


@pytest.mark.parametrize("name", ["SO2-bl-k5", "SO2-mixed-k7", "SO3-bl-k5"])
def test_nearly_equivariant_float32_weights_with_each_kernel(name, blocks_kernel):
    """float32 weights with E_perp / ||K||^2 ~ 1e-10: the residual is ~1e-5 of K, so the float32 rounding of
    K - PK (a few ulps of K, in any of the kernels) leaves E_perp within 2e-3 (observed 1e-5 to 5e-4) of the
    float64 energy of the same rounded weight, and the gradient within 2e-6 of max |K| (observed 2e-7 to 5e-7)."""
    sp, ri, ro, K, gen = _layer(name, 3)
    dense = _dense(name)
    noise = torch.randn(K.shape, dtype=torch.float64, generator=gen)
    noise = noise - dense.project(noise)
    K0 = dense.project(K)
    K = (K0 + noise * (1e-5 * float(K0.norm() / noise.norm()))).float()
    K64 = K.double()
    want = (K64 - dense.project(K64)).square().sum()
    assert 1e-11 < float(want / K64.square().sum()) < 1e-9
    e_perp, _, g = _run(sp, ri, ro, K, 1.0, 0.0)
    assert rel(e_perp, want) < 2e-3
    torch.testing.assert_close(g.reshape(K.shape).double(), 2 * (K64 - dense.project(K64)), rtol=0,
                               atol=2e-6 * float(K64.abs().max()))


def test_the_grid_reflections_split_phi_exactly():
    """The split of Phi by the grid's reflections rebuilds Phi (T^T Phi_blocks, T the transform on the orbits)
    to 1e-12 of its largest entry, its classes cover every pixel slot and band coefficient once, and the band
    products shrink by about 2^s (the counts: the classes' slots times coefficients against k^s D)."""
    for G, k, s, shrink in [(ep.SO2(), 3, 2, 3.0), (ep.SO2(), 5, 2, 3.5), (ep.O2(), 7, 2, 3.5),
                            (ep.SO3(), 3, 3, 5.0), (ep.O3(), 5, 3, 6.0)]:
        sp = default_kernel_space(G, k)
        split = _factorised.parity_split(sp)
        assert split is not None and split.reflections == s
        Phi = sp.sampled
        torch.testing.assert_close(split.dense_phi(), Phi, rtol=0, atol=1e-12 * float(Phi.abs().max()))
        T = split.transform()
        torch.testing.assert_close(T @ T.T, torch.diag((T != 0).sum(1).double()), rtol=0, atol=0)
        slots = sorted(t for sl, _, _ in split.classes for t in sl)
        cols = sorted(d for _, c, _ in split.classes for d in c)
        assert slots == list(range(sp.num_pixels)) and cols == list(range(sp.dim))
        assert sp.num_pixels * sp.dim >= shrink * split.flops_per_pixel_row()


def test_the_pass_takes_the_split_from_kernel_size_five_up_in_float32(monkeypatch):
    calls = []
    tables = _factorised._parity_tables_on
    monkeypatch.setattr(_factorised, "_parity_tables_on", lambda *a: calls.append(a[0].num_pixels) or tables(*a))
    for name, pixels, split in [("SO2-mixed-k7", 49, True), ("SO3-bl-k5", 125, True), ("SO2-bl-k5", 25, True),
                                ("SO2-uncovered-k3", 9, False)]:
        sp, ri, ro, K, _ = _layer(name, 7)
        plan = factorised_plan(sp, ri, ro)
        Kp = sp._pixels(K.float(), ri, ro)
        flops = plan.split_flops_per_weight(Kp)
        assert (flops is not None) == split and plan.split_flops_per_weight(Kp.double()) is None
        if split:
            assert flops < plan.flops_per_weight
        calls.clear()
        plan.run(Kp, 1.0, 0.0)
        plan.run(Kp.double(), 1.0, 0.0)
        assert calls == ([pixels] if split else [])


@pytest.mark.parametrize("name", ["SO2-bl-k5", "SO3-bl-k5", "O2-bl-k5"])
def test_float32_tables_hold_no_rounding_residue(name):
    """The maps and Phi in float32 keep no entry under 1e-14 of their largest (the float64 residue of exact
    zeros, whose products with small weights are subnormal); in float64 they are the plan's own values."""
    sp, ri, ro, _, _ = _layer(name, 8)
    plan = factorised_plan(sp, ri, ro)
    cpu = torch.device("cpu")
    pairs32 = _factorised._pair_tables_on(plan, cpu, torch.float32)
    pairs64 = _factorised._pair_tables_on(plan, cpu, torch.float64)
    residue = 0
    for (*_, maps32, maps_t32), (*_, maps64, maps_t64) in zip(pairs32, pairs64):
        for t32, t64 in ((maps32, maps64), (maps_t32, maps_t64)):
            if not t64.numel():
                continue
            tiny = (t64 != 0) & (t64.abs() <= 1e-14 * t64.abs().max())
            residue += int(tiny.sum())
            assert not (t32[tiny] != 0).any()
            torch.testing.assert_close(t32.double(), t64.masked_fill(tiny, 0), rtol=2**-23, atol=0)
    assert residue > 0  # the whitened maps do hold such residue: the test checks what it claims
    phi32 = _factorised._block_tables_on(plan, cpu, torch.float32)[0]
    phi64 = _factorised._block_tables_on(plan, cpu, torch.float64)[0]
    assert torch.equal(phi64[:, : sp.dim], sp.sampled)
    small = phi32[phi32 != 0].abs()
    assert bool((small > 1e-14 * phi32.abs().max()).all())


def test_no_split_where_phi_has_no_parity_or_no_grid():
    class Space:  # a square grid whose basis mixes the parities of its columns
        kernel_size, spatial_dims = 3, 2
        sampled = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    assert _factorised.parity_split(Space()) is None

    class Flat:  # no grid
        sampled = torch.eye(4, dtype=torch.float64)

    assert _factorised.parity_split(Flat()) is None
    # a 3 x 3 grid: the centre, two orbits of 2 pixels on the axes, one of 4 on the diagonals
    sp = default_kernel_space(ep.SO2(), 3)
    split = _factorised.parity_split(sp)
    assert len(split.classes) == 4 and split.orbit_counts == (1, 2, 1)


def test_batched_and_non_contiguous_weights_with_per_item_lambdas():
    sp, ri, ro, _, gen = _layer("SO2-bl-k5", 4)
    base = torch.randn((3, ro.dim, ri.dim, 5, 5), dtype=torch.float64, generator=gen)
    K = base.transpose(0, 1).contiguous().transpose(0, 1)  # [3, m, n, k, k], not contiguous
    assert not K.is_contiguous()
    lp, lg = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
    e_perp, e_g, g = _run(sp, ri, ro, K, lp, lg)
    dense = _dense("SO2-bl-k5")
    for i in range(3):
        PK = dense.project(K[i])
        assert rel(e_perp[i], (K[i] - PK).square().sum()) < 1e-10
        assert rel(e_g[i], PK.square().sum()) < 1e-10
        want = 2 * lp[i] * (K[i] - PK) + 2 * lg[i] * PK
        torch.testing.assert_close(g[i].reshape(want.shape), want, rtol=0, atol=1e-10 * float(want.abs().max()))


def test_a_band_wider_than_the_kernels_takes_the_torch_route():
    """More than 32 band coefficients per pixel row (2-D, k = 11): the torch route, the same numbers."""
    G = ep.SO2()
    sp = default_kernel_space(G, 11)
    assert sp.dim > 32
    gen = torch.Generator().manual_seed(5)
    rep = _band_limited(G, "0 + 1 + 2", 1, gen)
    K = torch.randn((rep.dim, rep.dim, 11, 11), dtype=torch.float64, generator=gen)
    plan = factorised_plan(sp, rep, rep)
    assert not plan.runs_blocks(K)
    PK = DenseKernelBasis(sp, rep, rep).project(K)
    e_perp, _, g = plan.run(sp._pixels(K, rep, rep), 1.0, 0.0)
    assert rel(e_perp, (K - PK).square().sum()) < 1e-10
    torch.testing.assert_close(g.reshape(K.shape), 2 * (K - PK), rtol=0, atol=1e-10 * float(K.abs().max()))


def test_the_kernel_refuses_what_it_cannot_address():
    sp, ri, ro, K, _ = _layer("SO2-bl-k5", 6)
    plan = factorised_plan(sp, ri, ro)
    Kp = sp._pixels(K, ri, ro).unsqueeze(0).contiguous()
    phi, phiT, rows, cols = _factorised._block_tables_on(plan, Kp.device, Kp.dtype)
    (oo, co, fo, _), (oi, ci, fi, _), slots, maps, maps_t = _factorised._pair_tables_on(plan, Kp.device, Kp.dtype)[0]
    q = _factorised._q_on(fo, Kp.device, Kp.dtype)
    one = torch.ones(1, dtype=torch.float64)
    no_split = torch.zeros(0, dtype=torch.int64)

    def run(K=Kp, rows=rows, co=co, slots=slots, maps=maps, lp=one, out=None, write=0):
        return torch.ops.equiproj_cpu.factorised_pass(K, rows, cols, phi, phiT, q, oo, co, fo.dim, oi, ci, fi.dim,
                                                      slots, maps, maps_t, no_split, K.new_empty(0), lp, one, out,
                                                      write, False)

    ep_, eg_ = run()
    assert ep_.shape == eg_.shape == (1,)
    with pytest.raises(RuntimeError, match="outside the weight"):
        run(co=co + 1)
    with pytest.raises(RuntimeError, match="index out of range"):
        run(rows=rows + ro.dim)
    with pytest.raises(RuntimeError, match="contiguous float32 or float64"):
        run(K=Kp.half())
    with pytest.raises(RuntimeError, match="in increasing order"):
        run(slots=slots.flip(0).contiguous())
    with pytest.raises(RuntimeError, match="padded U and U"):
        run(maps=maps[:-1])
    with pytest.raises(RuntimeError, match="one float64 lambda per batch item"):
        run(lp=one.float())
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
        run(out=Kp.transpose(1, 2), write=2)
