"""Adversarial probes of ``equiproj_cpu::factorised_pass`` (the CPU route of ``FactorisedPlan.run``).

Reference: the float64 dense projection ``DenseKernelBasis(space, rep_in, rep_out).project`` and the
torch route of the same plan (``FactorisedPlan._run``), on seeded weights.
Tolerances:
  float64 energies and gradient vs the dense projection:        1e-10 relative (gradient: of max |K|)
  float32 (AVX2 and plain loops) vs the dense projection:        1e-5 relative on E_perp and E_G,
                                                                  2e-5 of max |K| on the gradient
  exactly equivariant weights:                                    E_perp < 1e-24 ||K||^2 (float64),
                                                                  < 1e-10 ||K||^2 (float32)
  nearly equivariant weights (E_perp / ||K||^2 ~ 1e-10), float64: 1e-6 relative on E_perp
  float16 / bfloat16 through the public API:                      the float64 reference of the rounded
                                                                  weight, 1e-5 relative on E_perp (energies
                                                                  are computed in float32), one ulp of the
                                                                  half dtype (of max |grad|) on the gradient
                                                                  (two for the penalty's autograd and value)
  1 and 2 threads: 1e-13 (float64) / 1e-6 (float32) of the largest entry; AVX2 vs plain: 2e-6 relative
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import equiproj as ep
from equiproj.kernel_spaces import DenseKernelBasis, SteerableKernelSpace, default_kernel_space
from equiproj.kernel_spaces import kernel_energies_and_grads_many
from equiproj.kernel_spaces import _factorised
from equiproj.kernel_spaces._factorised import blocks_available, factorised_plan
from equiproj.testing import random_orthogonal
from equiproj.testing import relative_error as rel
# the pass on a layer (checking that it takes the block kernels) and the AVX2 / plain-loops fixture
from test_factorised_blocks import _run as _plan_run, blocks_kernel, check_nearly_equivariant  # noqa: F401 (a fixture)
from test_factorised_blocks import skip_float64_twice

pytestmark = pytest.mark.skipif(not blocks_available(), reason="the C++ extension equiproj._C is not built")


def _cb(rep, gen):
    return rep.change_basis(random_orthogonal(rep.dim, gen))


def _perm(rep, gen):
    return ep.Rep(rep.group, rep.segments, perm=torch.randperm(rep.dim, generator=gen))


def _parse(G, text):
    return ep.Rep.parse(G, text)


CASES = {  # name: (group, kernel size, rep_in, rep_out) from a generator; fields not all regular
    # a regular field next to irreps (not the regular closed form), odd copies, a dense change of basis
    "C5-mixed-k3": lambda g: (ep.Cyclic(5), 3, _parse(ep.Cyclic(5), "regular + 0 + 2"),
                              _cb(_parse(ep.Cyclic(5), "3x1 + 0"), g)),
    "D4-mixed-k5": lambda g: (ep.Dihedral(4), 5, _perm(_parse(ep.Dihedral(4), "regular + (0,0)"), g),
                              _parse(ep.Dihedral(4), "(1,1) + 3x(0,2)")),
    # a 19-dimensional field (frequencies 0..9: most beyond the band of k = 3, output slots without maps)
    "SO2-wide-field-k3": lambda g: (ep.SO2(), 3, _perm(_cb(_parse(ep.SO2(), "0 + 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9"),
                                                          g), g), _parse(ep.SO2(), "1 + 0 + 5")),
    # k = 9: 31 band coefficients (Dp = 32: four vectors of lanes), odd copies on both sides
    "SO2-k9": lambda g: (ep.SO2(), 9, _parse(ep.SO2(), "3x1"), _cb(_parse(ep.SO2(), "0 + 2 + 4"), g)),
    "O2-k7": lambda g: (ep.O2(), 7, _perm(_parse(ep.O2(), "(1,0) + (1,3) + (1,1)"), g),
                        _cb(_parse(ep.O2(), "(1,2) + (0,0)"), g)),
    # 3-D: fields of dim 5 and 7, several segments, both reps permuted
    "SO3-k3": lambda g: (ep.SO3(), 3, _perm(_parse(ep.SO3(), "2 + 0 + 3"), g), _perm(_parse(ep.SO3(), "1 + 3x0"), g)),
    "O3-k5": lambda g: (ep.O3(), 5, _cb(_parse(ep.O3(), "0e + 1o"), g), _parse(ep.O3(), "1e + 0o")),
    # a pair of segments joined by no map at all (frequency 6 and 7 beyond k = 3)
    "SO2-uncovered-k3": lambda g: (ep.SO2(), 3, _parse(ep.SO2(), "3x6 + 0"), _parse(ep.SO2(), "7 + 2x0")),
}


@functools.cache
def _case(name):
    G, k, ri, ro = CASES[name](torch.Generator().manual_seed(11))
    return default_kernel_space(G, k), ri, ro


@functools.cache
def _dense(name):
    return DenseKernelBasis(*_case(name))


def _weight(sp, ri, ro, gen, batch=()):
    shape = batch + (ro.dim, ri.dim) + (sp.kernel_size,) * sp.spatial_dims
    return torch.randn(shape, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cases_against_the_dense_projection(name, dtype, blocks_kernel):
    skip_float64_twice(dtype, blocks_kernel)
    sp, ri, ro = _case(name)
    gen = torch.Generator().manual_seed(1)
    K = _weight(sp, ri, ro, gen).to(dtype)
    K64 = K.double()
    PK = _dense(name).project(K64)
    scale = float(K64.abs().max())
    e_tol, g_tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 2e-5)
    e_perp, e_g, g = _plan_run(sp, ri, ro, K, 0.3, -0.7)
    assert rel(e_perp, (K64 - PK).square().sum()) < e_tol
    assert rel(e_g, PK.square().sum()) < e_tol
    torch.testing.assert_close(g.reshape(K.shape).double(), 0.6 * (K64 - PK) - 1.4 * PK, rtol=0, atol=g_tol * scale)
    # energies only; lambda_perp = 0 and lambda_G = 0 (a zero gradient, every block written)
    e2, g2, none = _plan_run(sp, ri, ro, K)
    assert none is None and rel(e2, e_perp) < 1e-12 and rel(g2, e_g) < 1e-12
    _, _, zero = _plan_run(sp, ri, ro, K, 0.0, 0.0)
    assert zero.abs().max() == 0
    # the step in place, with the energies of the weight before it
    W = K.clone()
    e3, _, out = _plan_run(sp, ri, ro, W, -0.5, 0.25, out=sp._pixels(W, ri, ro))
    assert rel(e3, (K64 - PK).square().sum()) < e_tol
    torch.testing.assert_close(W.double(), K64 - (K64 - PK) + 0.5 * PK, rtol=0, atol=g_tol * scale)


@pytest.mark.parametrize("name", ["C5-mixed-k3", "SO2-wide-field-k3", "SO3-k3", "SO2-k9"])
def test_exactly_and_nearly_equivariant_and_zero_weights(name):
    sp, ri, ro = _case(name)
    gen = torch.Generator().manual_seed(2)
    dense = _dense(name)
    K0 = dense.project(_weight(sp, ri, ro, gen))
    for dtype, tol in ((torch.float64, 1e-24), (torch.float32, 1e-10)):
        Kd = K0.to(dtype)
        e_perp, e_g, _ = _plan_run(sp, ri, ro, Kd)
        ref = dense.project(Kd.double())
        assert float(e_perp) <= tol * float(Kd.double().square().sum()) + float((Kd.double() - ref).square().sum()) * 2
        assert rel(e_g, ref.square().sum()) < 1e-5
    K = check_nearly_equivariant(sp, ri, ro, dense, K0, _weight(sp, ri, ro, gen))
    Z = torch.zeros_like(K)
    for dtype in (torch.float64, torch.float32):
        e_perp, e_g, g = _plan_run(sp, ri, ro, Z.to(dtype), 1.0, 1.0)
        assert float(e_perp) == 0 and float(e_g) == 0 and g.abs().max() == 0


SPACES = {32: (7, (0, 4, 5, 5)), 33: (9, (0, 2, 4, 4, 4))}  # band coefficients: (kernel size, per-ring frequencies)


def _spaced(D):
    k, mf = SPACES[D]
    sp = SteerableKernelSpace(ep.SO2(), k, max_frequency=mf)
    assert sp.dim == D
    return sp


@pytest.mark.parametrize("D", [32, 33])
def test_band_at_and_over_the_kernels_limit(D):
    sp = _spaced(D)
    gen = torch.Generator().manual_seed(3)
    ri, ro = _cb(_parse(ep.SO2(), "0 + 1 + 2"), gen), _parse(ep.SO2(), "1 + 0")
    K = _weight(sp, ri, ro, gen)
    plan = factorised_plan(sp, ri, ro)
    assert plan.runs_blocks(K) == (D <= 32)
    PK = DenseKernelBasis(sp, ri, ro).project(K)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        Kd = K.to(dtype)
        e_perp, e_g, g = plan.run(sp._pixels(Kd, ri, ro), 1.0, 0.5)
        assert rel(e_perp, (K - PK).square().sum()) < max(tol, 1e-5)
        assert rel(e_g, PK.square().sum()) < max(tol, 1e-5)
        torch.testing.assert_close(g.reshape(K.shape).double(), 2 * (K - PK) + PK, rtol=0,
                                   atol=tol * float(K.abs().max()))


def test_batched_non_contiguous_with_per_item_and_negative_lambdas():
    sp, ri, ro = _case("D4-mixed-k5")
    gen = torch.Generator().manual_seed(4)
    base = _weight(sp, ri, ro, gen, batch=(2, 3))
    K = base.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)  # [2, 3, m, n, k, k] not contiguous
    assert not K.is_contiguous()
    lp = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.25, -0.5]], dtype=torch.float64)
    lg = torch.tensor([[0.0, 0.3, -0.1], [1.0, 0.0, 0.5]], dtype=torch.float64)
    dense = _dense("D4-mixed-k5")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        Kd = K.to(dtype)
        e_perp, e_g, g = _plan_run(sp, ri, ro, Kd, lp, lg)
        assert e_perp.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                Kij = Kd[i, j].double()
                PK = dense.project(Kij)
                assert rel(e_perp[i, j], (Kij - PK).square().sum()) < max(tol, 1e-5)
                assert rel(e_g[i, j], PK.square().sum()) < max(tol, 1e-5)
                want = 2 * lp[i, j] * (Kij - PK) + 2 * lg[i, j] * PK
                torch.testing.assert_close(g[i, j].reshape(want.shape).double(), want, rtol=0,
                                           atol=tol * float(Kij.abs().max()))
        # one item added into a non-contiguous buffer through the public API
        Kij = Kd[1, 2].double()
        PK = dense.project(Kij)
        buf = torch.randn(Kij.shape, dtype=torch.float64, generator=gen).to(dtype).transpose(0, 1).contiguous()
        buf = buf.transpose(0, 1)
        assert not buf.is_contiguous()
        before = buf.double().clone()
        kernel_energies_and_grads_many([Kd[1, 2]], [sp], [(ri, ro)], lambda_perp=[-0.5], lambda_G=[0.5], outs=[buf])
        torch.testing.assert_close(buf.double(), before - (Kij - PK) + PK, rtol=0, atol=tol * float(Kij.abs().max()))


@pytest.mark.parametrize("scale", [1e16, 1e-17, 1e-21, 1e-150])  # 1e-21: squares subnormal in float32
def test_huge_and_tiny_magnitudes(scale, blocks_kernel):
    sp, ri, ro = _case("O2-k7")
    gen = torch.Generator().manual_seed(5)
    K = _weight(sp, ri, ro, gen) * scale
    PK = _dense("O2-k7").project(K)
    dtypes = [torch.float64] if scale < 1e-30 else [torch.float64, torch.float32]
    for dtype in dtypes:
        Kd = K.to(dtype)
        e_perp, e_g, g = _plan_run(sp, ri, ro, Kd, 0.5, 0.5)
        e_tol, g_tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 2e-5)
        ref = (Kd.double() - PK).square().sum()
        if dtype == torch.float32:
            ref = (Kd.double() - _dense("O2-k7").project(Kd.double())).square().sum()
        assert torch.isfinite(e_perp) and rel(e_perp, ref) < e_tol
        torch.testing.assert_close(g.reshape(K.shape).double(), Kd.double(), rtol=0,
                                   atol=g_tol * float(K.abs().max()))


def test_inf_and_nan_do_not_crash_and_stay_in_their_blocks():
    sp, ri, ro = _case("SO2-wide-field-k3")
    gen = torch.Generator().manual_seed(6)
    K = _weight(sp, ri, ro, gen)
    for bad in (float("nan"), float("inf")):
        for dtype in (torch.float64, torch.float32):
            Kd = K.to(dtype).clone()
            Kd[0, 0, 1, 1] = bad
            e_perp, e_g, g = _plan_run(sp, ri, ro, Kd, 1.0, 0.0)
            assert not torch.isfinite(e_perp)
            grad = g.reshape(K.shape)
            # the weight's other output rows are other blocks: finite
            assert torch.isfinite(grad[2:]).all()
            assert not torch.isfinite(grad[0]).all()


def test_public_api_refuses_non_finite_weights_without_crashing():
    sp, ri, ro = _case("C5-mixed-k3")
    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.float32, torch.float64, torch.float16):
        K = _weight(sp, ri, ro, gen).to(dtype)
        K[0, 0, 1, 1] = float("nan")
        with pytest.raises(ValueError, match="not finite"):
            sp.energies_and_grad(K, ri, ro, lambda_perp=1.0)
        with pytest.raises(ValueError, match="not finite"):
            kernel_energies_and_grads_many([K], [sp], [(ri, ro)], lambda_perp=[-0.5], lambda_G=[0.0], outs=[K])


def test_threads_and_lanes_agree():
    sp, ri, ro = _case("SO3-k3")
    gen = torch.Generator().manual_seed(7)
    K = _weight(sp, ri, ro, gen, batch=(3,))
    plan = factorised_plan(sp, ri, ro)
    previous = torch.get_num_threads()
    try:
        for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
            Kp = sp._pixels(K.to(dtype), ri, ro)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(plan.run(Kp, 0.5, 0.25))
            for a, b in zip(results[0], results[1]):
                torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))
    finally:
        torch.set_num_threads(previous)
    Kp = sp._pixels(K.float(), ri, ro)
    lanes = plan.run(Kp, 0.5, 0.25)
    old = _factorised._PLAIN_BLOCKS
    try:
        _factorised._PLAIN_BLOCKS = True
        loops = plan.run(Kp, 0.5, 0.25)
    finally:
        _factorised._PLAIN_BLOCKS = old
    for a, b in zip(lanes, loops):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(b.abs().max()))
    PK = _dense("SO3-k3").project(K[0].float().double())
    want = (K[0].float().double() - PK) + 0.5 * PK
    torch.testing.assert_close(lanes[2][0].reshape(want.shape).double(), want, rtol=0, atol=2e-5 * float(K.abs().max()))


@pytest.mark.parametrize("where", ["SO2-k11-batched", "SO3-k3"])
def test_the_torch_route_with_single_copies_of_several_segments(where):
    G, k, batch = (ep.SO2(), 11, (2,)) if where == "SO2-k11-batched" else (ep.SO3(), 3, ())
    sp = default_kernel_space(G, k)
    ri, ro = _parse(G, "0 + 1"), _parse(G, "1 + 0")
    gen = torch.Generator().manual_seed(12)
    K = _weight(sp, ri, ro, gen, batch=batch)
    plan = factorised_plan(sp, ri, ro)
    assert plan.runs_blocks(K) == (sp.dim <= 32)
    Kp = sp._pixels(K, ri, ro)
    e_perp, _, _ = plan.run(Kp, 1.0, 0.0) if sp.dim > 32 else plan._run(Kp, 1.0, 0.0, None, True)
    K0 = K[0] if batch else K
    PK = DenseKernelBasis(sp, ri, ro).project(K0)
    assert rel(e_perp.reshape(-1)[0], (K0 - PK).square().sum()) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_through_the_public_api(dtype):
    sp, ri, ro = _case("C5-mixed-k3")
    gen = torch.Generator().manual_seed(8)
    W = _weight(sp, ri, ro, gen).to(dtype)
    W64 = W.double()
    PK = _dense("C5-mixed-k3").project(W64)
    ulp = torch.finfo(dtype).eps
    e_perp, e_g, g = sp.energies_and_grad(W, ri, ro, lambda_perp=0.5, lambda_G=0.25)
    assert g.dtype == dtype and g.shape == W.shape
    assert rel(e_perp, (W64 - PK).square().sum()) < 1e-5
    assert rel(e_g, PK.square().sum()) < 1e-5
    want = (W64 - PK) + 0.5 * PK
    torch.testing.assert_close(g.double(), want, rtol=0, atol=ulp * float(want.abs().max()))
    # the step in place on the half weight itself
    V = W.clone()
    kernel_energies_and_grads_many([V], [sp], [(ri, ro)], lambda_perp=[-0.5], lambda_G=[0.0], outs=[V])
    torch.testing.assert_close(V.double(), PK, rtol=0, atol=ulp * float(W64.abs().max()))


@pytest.mark.parametrize("conv,dtype", [("2d", torch.float32), ("3d", torch.float32), ("2d", torch.float16),
                                        ("2d", torch.bfloat16)])
def test_penalty_on_declared_convolutions(conv, dtype):
    gen = torch.Generator().manual_seed(9)
    if conv == "2d":
        G, k = ep.Cyclic(5), 3
        ri, ro = _parse(G, "regular + 0 + 2"), _cb(_parse(G, "3x1 + 0"), gen)
        layer = torch.nn.Conv2d(ri.dim, ro.dim, k, bias=False)
    else:
        G, k = ep.SO3(), 3
        ri, ro = _parse(G, "0 + 1"), _perm(_parse(G, "1 + 2 + 0"), gen)
        layer = torch.nn.Conv3d(ri.dim, ro.dim, k, bias=False)
    sp = default_kernel_space(G, k)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    layer = layer.to(dtype)
    tol = 2e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    ep.nn.declare(layer, ri, ro, kernel_space=sp)
    assert factorised_plan(sp, ri, ro).runs_blocks(layer.weight.detach().float()) and not \
        factorised_plan(sp, ri, ro).runs_closed_form(layer.weight.detach().float())
    model = torch.nn.Sequential(layer)
    pen = ep.nn.ProjectionPenalty(model, lambda_perp=0.5, lambda_G=0.1)
    W64 = layer.weight.detach().double()
    PK = DenseKernelBasis(sp, ri, ro).project(W64)
    want_value = 0.5 * (W64 - PK).square().sum() + 0.1 * PK.square().sum()
    want_grad = (W64 - PK) + 0.2 * PK
    # autograd
    value = pen()
    # the energies-only route of half weights rounds the rotated weight (see the strict check below)
    assert rel(value, want_value) < (1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)
    value.backward()
    assert layer.weight.grad.dtype == dtype
    # autograd of half weights: the energies-only route's rounding, two ulps
    g_auto = layer.weight.grad.double().clone()
    ulps = 1 if dtype == torch.float32 else 2
    torch.testing.assert_close(g_auto, want_grad, rtol=0, atol=ulps * tol * float(W64.abs().max()))
    # backward() into the existing .grad: adds the one-pass gradient (one ulp)
    pen.backward()
    torch.testing.assert_close(layer.weight.grad.double() - g_auto, want_grad, rtol=0,
                               atol=2 * tol * float(W64.abs().max()))
    # decay_ in place
    ptr = layer.weight.data_ptr()
    pen.decay_(0.25)
    assert layer.weight.data_ptr() == ptr
    assert layer.weight.dtype == dtype
    torch.testing.assert_close(layer.weight.detach().double(), W64 - 0.25 * (W64 - PK), rtol=0,
                               atol=tol * float(W64.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_energies_of_half_weights_with_a_change_of_basis(dtype):
    sp, ri, ro = _case("C5-mixed-k3")
    gen = torch.Generator().manual_seed(14)
    W = _weight(sp, ri, ro, gen).to(dtype)
    PK = _dense("C5-mixed-k3").project(W.double())
    e_perp, e_g, _ = sp.energies_and_grad(W, ri, ro, lambda_perp=1.0)
    assert rel(e_perp, (W.double() - PK).square().sum()) < 1e-5 and rel(e_g, PK.square().sum()) < 1e-5
    e_perp, e_g = sp.energies(W, ri, ro)
    assert rel(e_perp, (W.double() - PK).square().sum()) < 1e-5 and rel(e_g, PK.square().sum()) < 1e-5


# ---- the op called directly ------------------------------------------------------------------------------
def _direct(dtype=torch.float32):
    sp, ri, ro = _case("C5-mixed-k3")
    plan = factorised_plan(sp, ri, ro)
    gen = torch.Generator().manual_seed(10)
    K = sp._pixels(_weight(sp, ri, ro, gen).to(dtype), ri, ro).unsqueeze(0).contiguous()
    phi, phiT, rows, cols = _factorised._block_tables_on(plan, K.device, K.dtype)
    parity, phi_parity = _factorised._parity_tables_on(sp, K.device, K.dtype)
    pairs = _factorised._pair_tables_on(plan, K.device, K.dtype)
    pair = next(p for p in pairs if p[2].shape[0] and p[0][2].Q is not None)  # mapped, with a dense Q
    (oo, co, fo, _), (oi, ci, fi, _), slots, maps, maps_t = pair
    q = _factorised._q_on(fo, K.device, K.dtype)
    one = torch.ones(1, dtype=torch.float64)
    args = dict(K=K, rows=rows, cols=cols, phi=phi, phiT=phiT, q=q, oo=oo, co=co, d_out=fo.dim, oi=oi, ci=ci,
                d_in=fi.dim, slots=slots, maps=maps, maps_t=maps_t, parity=parity, phi_parity=phi_parity,
                lambda_perp=one, lambda_G=one, out=None, write=0, plain=False)
    return args


def _call(args, **change):
    a = dict(args, **change)
    return torch.ops.equiproj_cpu.factorised_pass(*a.values())


def test_direct_in_place_write_matches_a_fresh_gradient():
    for dtype in (torch.float32, torch.float64):
        args = _direct(dtype)
        K = args["K"]
        fresh = torch.full_like(K, 7.0)
        e1 = _call(args, out=fresh, write=1)
        K2 = K.clone()
        e2 = _call(args, K=K2, out=K2, write=1)
        e3 = _call(args, out=torch.zeros_like(K), write=2)
        for a, b, c in zip(e1, e2, e3):
            assert torch.equal(a, b) and torch.equal(a, c)
        rows = args["rows"][args["oo"]: args["oo"] + args["co"] * args["d_out"]]
        cols = args["cols"][args["oi"]: args["oi"] + args["ci"] * args["d_in"]]
        block = (slice(None), rows[:, None], cols[None, :])
        assert torch.equal(fresh[block], K2[block])
        fresh[block] = 7.0
        assert (fresh == 7).all()  # the blocks of other pairs of segments untouched


BAD = {  # name: (changes to the arguments, the message)
    "K-3d": (lambda a: dict(K=a["K"][0]), "contiguous float32 or float64"),
    "K-non-contiguous": (lambda a: dict(K=a["K"].transpose(1, 2)), "contiguous float32 or float64"),
    "K-int": (lambda a: dict(K=a["K"].int()), "contiguous float32 or float64"),
    "rows-int32": (lambda a: dict(rows=a["rows"].int()), "index tables"),
    "rows-short": (lambda a: dict(rows=a["rows"][:-1]), "index tables"),
    "cols-negative": (lambda a: dict(cols=a["cols"] - a["cols"].numel()), "index out of range"),
    "phi-float64": (lambda a: dict(phi=a["phi"].double()), "phi"),
    "phi-not-padded": (lambda a: dict(phi=a["phi"][:, :-1].contiguous()), "phi"),
    "phi-too-wide": (lambda a: dict(phi=torch.zeros(a["phi"].shape[0], 40), phiT=torch.zeros(33, a["phiT"].shape[1])),
                     "at most 32"),
    "phi-and-phiT-disagree": (lambda a: dict(phiT=torch.zeros(a["phiT"].shape[0] + 8, a["phiT"].shape[1])), "phi"),
    "rows-repeated": (lambda a: dict(rows=torch.zeros_like(a["rows"])), "appears twice"),
    "cols-repeated": (lambda a: dict(cols=a["cols"].flip(0).contiguous().index_fill_(0, torch.tensor([0]), 1)),
                      "appears twice"),
    "phiT-short": (lambda a: dict(phiT=a["phiT"][:, :8].contiguous()), "phi"),
    "q-wrong-shape": (lambda a: dict(q=torch.eye(a["d_out"] + 1)), "q must be"),
    "q-wrong-dtype": (lambda a: dict(q=a["q"].double()), "q must be"),
    "negative-offset": (lambda a: dict(oo=-1), "outside the weight"),
    "zero-field": (lambda a: dict(d_in=0), "outside the weight"),
    "slots-shape": (lambda a: dict(slots=a["slots"][:, :2].contiguous()), "slots must be"),
    "slots-overlap": (lambda a: dict(slots=torch.cat([a["slots"], a["slots"]])), "without overlap"),
    "slot-outside": (lambda a: dict(slots=a["slots"] + torch.tensor([a["d_out"], 0, 0])), "without overlap"),
    "slot-r-zero": (lambda a: dict(slots=a["slots"] * torch.tensor([1, 1, 0])), "without overlap"),
    "maps-long": (lambda a: dict(maps=torch.cat([a["maps"], a["maps"][:8]])), "padded U and U"),
    "maps_t-short": (lambda a: dict(maps_t=a["maps_t"][:-1]), "padded U and U"),
    "maps-dtype": (lambda a: dict(maps=a["maps"].double()), "padded U and U"),
    "parity-reflections": (lambda a: dict(parity=_edited(a["parity"], 0, 4)), "1 to 3 reflections"),
    "parity-orbit-counts": (lambda a: dict(parity=_edited(a["parity"], 1, a["parity"][1] + 1)), "orbits hold"),
    "parity-order-repeated": (lambda a: dict(parity=_edited(a["parity"], 4, a["parity"][5])), "not a permutation"),
    "parity-truncated": (lambda a: dict(parity=a["parity"][:-1].contiguous()), "runs past|ends early|cover"),
    "parity-too-long": (lambda a: dict(parity=torch.cat([a["parity"], a["parity"][:1]])), "longer than"),
    "parity-column-twice": (lambda a: dict(parity=_edited(a["parity"], -1, a["parity"][-2])), "each band coefficient"),
    "parity-int32": (lambda a: dict(parity=a["parity"].int()), "contiguous int64"),
    "phi_parity-short": (lambda a: dict(phi_parity=a["phi_parity"][:-1]), "Phi's classes hold"),
    "phi_parity-dtype": (lambda a: dict(phi_parity=a["phi_parity"].double()), "K's dtype"),
    "lambda-count": (lambda a: dict(lambda_perp=torch.ones(2, dtype=torch.float64)), "one float64 lambda"),
    "write-3": (lambda a: dict(write=3, out=a["K"]), "write is 0, 1 or 2"),
    "write-without-out": (lambda a: dict(write=1), "out must be"),
    "out-dtype": (lambda a: dict(write=2, out=a["K"].double()), "out must be"),
    "out-shape": (lambda a: dict(write=1, out=a["K"][:, :-1].contiguous()), "out must be"),
}


def _edited(table, i, value):
    t = table.clone()
    t[i] = value
    return t


def test_the_direct_case_has_a_parity_split():
    args = _direct()
    assert args["parity"].numel() and args["parity"][0] == 2 and args["phi_parity"].numel()


@pytest.mark.parametrize("name", list(BAD))
def test_direct_malformed_arguments_raise(name):
    args = _direct()
    change, msg = BAD[name]
    with pytest.raises(RuntimeError, match=msg):
        _call(args, **change(args))


_NO_BAND_SCRIPT = textwrap.dedent("""
    import torch
    from equiproj.kernel_spaces import _factorised as F
    assert F.blocks_available()
    K = torch.randn(1, 2, 1, 25)
    ar = torch.arange(2)
    one = torch.ones(1, dtype=torch.float64)
    try:
        torch.ops.equiproj_cpu.factorised_pass(K, ar, ar[:1], torch.zeros(25, 0), torch.zeros(0, 32), K.new_empty(0),
                                               0, 1, 2, 0, 1, 1, torch.tensor([[0, 2, 3]]), torch.zeros(0),
                                               torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                               one, one, None, 0, False)
    except RuntimeError:
        pass
""")


def test_a_phi_without_band_columns_is_refused_without_crashing():
    res = subprocess.run([sys.executable, "-c", _NO_BAND_SCRIPT], capture_output=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])


_META_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {here!r})
    from test_factorised_pass_adversarial import _call, _direct
    args = _direct()
    try:
        _call(args, **{{{name!r}: args[{name!r}].to("meta")}})
    except RuntimeError:
        sys.exit(0)
    sys.exit(3)  # no error: a table without data taken as valid
""")


@pytest.mark.parametrize("name", ["maps", "maps_t", "phi", "phiT", "q", "phi_parity"])
def test_tables_without_cpu_data_are_refused(name):
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _META_SCRIPT.format(here=here, name=name)], capture_output=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])


@pytest.mark.parametrize("name", ["rows", "cols", "slots", "lambda_perp", "K", "parity"])
def test_index_tables_and_weights_without_cpu_data_are_refused(name):
    args = _direct()
    with pytest.raises(RuntimeError):
        _call(args, **{name: args[name].to("meta")})


def test_an_out_that_overlaps_part_of_the_weight_is_refused():
    args = _direct()
    K = args["K"]
    buf = torch.zeros(2 * K.numel(), dtype=K.dtype)
    buf[: K.numel()] = K.reshape(-1)
    shifted = buf[K.shape[-1]: K.shape[-1] + K.numel()].view(K.shape)  # K's storage, one pixel row on
    with pytest.raises(RuntimeError, match="not overlap"):
        _call(args, K=buf[: K.numel()].view(K.shape), out=shifted, write=2)
    # K itself is the in-place step, and a separate buffer is fine
    _call(args, K=buf[: K.numel()].view(K.shape), out=buf[: K.numel()].view(K.shape), write=2)
    _call(args, out=torch.zeros_like(K), write=1)
