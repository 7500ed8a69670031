"""The fused Triton kernel (``equiproj.kernels.fused_energies``) and its pure-torch twin against
the float64 spatial-domain reference (``equiproj.reference``).

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` (set by the root conftest) on small
shapes; with a GPU the same tests run natively, plus larger shapes (``cuda_only``).

Tolerances (the reference sees exactly the tensor the kernel sees, upcast to float64, so only
the kernel's float32 arithmetic and the final rounding of the gradient differ):

* energies, every weight dtype (float32 accumulation): with ``eps = 2^-23`` and ``||W||`` the
  Frobenius norm of the matrix, ``|E - E_ref| <= 1e-5 E_ref + 32 eps sqrt(E_ref) ||W||``. The
  second term is the rounding of the residual ``R`` (elements off by ~eps |W|) entering
  ``||R||^2``; it governs nearly equivariant weights (E_perp / ||W||^2 = 1e-10 gives a relative
  bound of ~0.1, the kernel's actual error is ~1e-2, the float32 limit).
* gradients ``2 lambda_perp R + 2 lambda_G P W``: elementwise
  ``|g - g_ref| <= ulp_dtype |g_ref| + 64 eps (|lambda_perp| + |lambda_G|) max|W|`` with ``ulp_dtype`` one
  unit in the last place of the weight dtype relative to the value (2^-23, 2^-10, 2^-7 for
  float32, float16, bfloat16): the final conversion to the weight dtype rounds to nearest on
  CUDA (half an ulp), but the Triton interpreter truncates float32 -> bfloat16 (up to one ulp).

Every output buffer the kernel fills is poisoned with NaN first (autouse fixture), so an
element the kernel fails to write fails the comparison.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import equiproj
import equiproj.testing as verify
from equiproj import reference
from equiproj._plan import block_plan
from equiproj.groups import Rep
from equiproj.kernels import HAS_TRITON, fused_energies, supports, torch_fused_energies

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
KERNEL_RUNS = HAS_TRITON and (ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_kernel = pytest.mark.skipif(not KERNEL_RUNS, reason="needs triton and a GPU, or TRITON_INTERPRET=1")
cuda_only = pytest.mark.skipif(not (ON_CUDA and HAS_TRITON), reason="larger shapes run natively on CUDA only")

EPS32 = 2.0**-23
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernel writes starts as NaN (float) / a huge value (int)."""
    if not HAS_TRITON:
        return
    from equiproj.kernels import triton_energies

    def poisoned(numel, dtype, device):
        return torch.full((numel,), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_energies, "_new_buffer", poisoned)


# ---- cases -------------------------------------------------------------------------------
def _so2_permuted():
    G = equiproj.SO2()  # 2-dim irreps of SO(2) are complex type (r = 2)
    ri = Rep.parse(G, "0 + 1") @ Rep.parse(G, "1 + 2")  # tensor product of sums: a permutation
    ro = Rep.parse(G, "2x0 + 3x1 + 2")
    return ri, ro


def _so3_fields():
    G = equiproj.SO3()  # real type: A = I/sqrt(d) (the kernel's cheap path), r = 0 between types
    return Rep.parse(G, "3x0 + 2x1 + 2"), Rep.parse(G, "2x0 + 1 + 3x2")


def _cyclic_dense(gen):
    G = equiproj.Cyclic(5)  # dense change of basis: one field pair with a general basis, r > 2
    a = G.regular() + G.standard()
    return a.change_basis(verify.random_orthogonal(a.dim, gen)), Rep.parse(G, "2x0 + 1 + 2")


def _dihedral_mixed(gen):
    return verify.mixed_reps(equiproj.Dihedral(4), gen)


CASES = {"so2_permuted": lambda g: _so2_permuted(), "so3_fields": lambda g: _so3_fields(),
         "cyclic_dense": _cyclic_dense, "dihedral_mixed": _dihedral_mixed}


def _plan(ri, ro):
    return block_plan(ri, ro).packed(DEVICE, torch.float32)


def _reference(W, ri, ro, cp=None, cg=None):
    """(E_perp, E_G, grad) in float64 for the exact tensor W (any dtype)."""
    W64 = W.detach().cpu().double()
    PW = reference.project(W64, ri, ro)
    R = W64 - PW
    grad = None if cp is None else 2 * cp * R + 2 * cg * PW
    return R.square().sum((-2, -1)), PW.square().sum((-2, -1)), grad


def _check_energy(E, E_ref, W, what):
    assert E.dtype == torch.float32, what
    E, W = E.detach().cpu().double(), W.detach().cpu().double()
    assert E.shape == E_ref.shape, what
    wnorm = W.square().sum((-2, -1)).sqrt()
    tol = 1e-5 * E_ref.abs() + 32 * EPS32 * E_ref.abs().sqrt() * wnorm
    err = (E - E_ref).abs()
    assert torch.isfinite(E).all() and (err <= tol).all(), f"{what}: max err {float(err.max()):.3e}, tol {float(tol.min()):.3e}"


def _check_grad(g, g_ref, W, cp, cg, what):
    assert g.dtype == W.dtype and g.shape == W.shape, what
    g = g.detach().cpu().double()
    wmax = W.detach().cpu().double().abs().amax((-2, -1), keepdim=True)
    tol = ULP[W.dtype] * g_ref.abs() + 64 * EPS32 * (abs(cp) + abs(cg)) * wmax
    err = (g - g_ref).abs()
    assert torch.isfinite(g).all() and (err <= tol).all(), f"{what}: max err {float(err.max()):.3e}"


# ---- the kernel against the reference ----------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_fp32(case):
    gen = _gen(1)
    ri, ro = CASES[case](gen)
    W = torch.randn(2, ro.dim, ri.dim, generator=gen).to(DEVICE)
    cp, cg = 1.7, -0.3
    (ep,), (eg,), (g,) = fused_energies([W], [_plan(ri, ro)], torch.tensor([cp]), torch.tensor([cg]))
    rp, rg, rgrad = _reference(W, ri, ro, cp, cg)
    _check_energy(ep, rp, W, f"{case} E_perp")
    _check_energy(eg, rg, W, f"{case} E_G")
    _check_grad(g, rgrad, W, cp, cg, f"{case} grad")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["so2_permuted", "so3_fields"])
def test_kernel_half_precision(case, dtype):
    gen = _gen(2)
    ri, ro = CASES[case](gen)
    W = torch.randn(ro.dim, ri.dim, generator=gen).to(DEVICE, dtype)
    cp, cg = 0.5, 2.0
    (ep,), (eg,), (g,) = fused_energies([W], [_plan(ri, ro)], torch.tensor([cp]), torch.tensor([cg]))
    rp, rg, rgrad = _reference(W, ri, ro, cp, cg)
    _check_energy(ep, rp, W, f"{case} {dtype} E_perp")
    _check_energy(eg, rg, W, f"{case} {dtype} E_G")
    _check_grad(g, rgrad, W, cp, cg, f"{case} {dtype} grad")


@needs_kernel
@pytest.mark.parametrize("cols_first", [False, True])
def test_kernel_permuted_block_orientation(monkeypatch, cols_first):
    """Permuted layers may be loaded as [columns, rows] (a speed choice per triton version):
    both orientations give the same results."""
    from equiproj.kernels import triton_energies

    monkeypatch.setattr(triton_energies, "_COLS_FIRST_ON_TIE", cols_first)
    gen = _gen(11)
    ri, ro = _so2_permuted()
    W = torch.randn(ro.dim, ri.dim, generator=gen).to(DEVICE)
    (ep,), (eg,), (g,) = fused_energies([W], [_plan(ri, ro)], torch.tensor([0.9]), torch.tensor([0.6]))
    rp, rg, rgrad = _reference(W, ri, ro, 0.9, 0.6)
    _check_energy(ep, rp, W, "E_perp")
    _check_energy(eg, rg, W, "E_G")
    _check_grad(g, rgrad, W, 0.9, 0.6, "grad")


@needs_kernel
def test_kernel_batched_noncontiguous():
    """Leading batch dims with odd strides, and a column stride != 1."""
    gen = _gen(3)
    ri, ro = _so3_fields()
    base = torch.randn(ri.dim, 3, ro.dim, 2, generator=gen).to(DEVICE)
    W1 = base.permute(3, 1, 2, 0)  # [2, 3, m, n], column stride 3*m*2
    W2 = torch.randn(ro.dim, 2 * ri.dim + 1, generator=gen).to(DEVICE)[:, 1::2]  # column stride 2
    assert not W1.is_contiguous() and W2.stride(-1) == 2
    P = _plan(ri, ro)
    cp, cg = torch.tensor([1.0, 0.25]), torch.tensor([0.5, 1.5])
    ep, eg, grads = fused_energies([W1, W2], [P, P], cp, cg)
    for i, W in enumerate([W1, W2]):
        rp, rg, rgrad = _reference(W, ri, ro, float(cp[i]), float(cg[i]))
        _check_energy(ep[i], rp, W, f"W{i} E_perp")
        _check_energy(eg[i], rg, W, f"W{i} E_G")
        _check_grad(grads[i], rgrad, W, float(cp[i]), float(cg[i]), f"W{i} grad")


@needs_kernel
def test_kernel_nearly_equivariant():
    gen = _gen(4)
    ri, ro = _so2_permuted()
    W64 = verify.nearly_equivariant(torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen), ri, ro, 1e-10, gen)
    W = W64.float().to(DEVICE)
    (ep,), (eg,), _ = fused_energies([W], [_plan(ri, ro)])
    rp, rg, _ = _reference(W, ri, ro)
    assert float(rp / W.double().square().sum()) < 1e-8  # still nearly equivariant after rounding
    _check_energy(ep, rp, W, "near-equivariant E_perp")
    _check_energy(eg, rg, W, "near-equivariant E_G")
    assert abs(float(ep) - float(rp)) < 0.05 * float(rp)  # the residual form keeps a few digits


@needs_kernel
def test_kernel_gradient_equals_autograd_of_reference():
    gen = _gen(5)
    ri, ro = _cyclic_dense(gen)
    W = torch.randn(ro.dim, ri.dim, generator=gen)
    cp, cg = 0.8, 0.3
    W64 = W.double().requires_grad_()
    PW = reference.project(W64, ri, ro)
    (cp * (W64 - PW).square().sum() + cg * PW.square().sum()).backward()
    _, _, (g,) = fused_energies([W.to(DEVICE)], [_plan(ri, ro)], torch.tensor([cp]), torch.tensor([cg]))
    _check_grad(g, W64.grad, W, cp, cg, "grad vs autograd")


@needs_kernel
def test_kernel_multi_layer_constant_launches(monkeypatch):
    """Many layers (mixed dtypes, batches, permutations) in one call; launches do not grow with L."""
    from equiproj.kernels import triton_energies

    launches = []
    kernel = triton_energies._energy_tiles_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_energies, "_energy_tiles_kernel", Counting())
    gen = _gen(6)
    pairs = [_so3_fields(), _so2_permuted(), _so3_fields(), _so2_permuted()]
    weights = [torch.randn(ro.dim, ri.dim, generator=gen) for ri, ro in pairs]
    weights[1] = torch.randn(2, pairs[1][1].dim, pairs[1][0].dim, generator=gen)
    weights[2] = weights[2].to(torch.bfloat16)
    weights = [w.to(DEVICE) for w in weights]
    plans = [_plan(ri, ro) for ri, ro in pairs]
    cp, cg = torch.tensor([1.0, 0.5, 2.0, 0.1]), torch.tensor([0.0, 1.0, 0.3, 0.7])
    ep, eg, grads = fused_energies(weights, plans, cp, cg)
    for i, ((ri, ro), W) in enumerate(zip(pairs, weights)):
        rp, rg, rgrad = _reference(W, ri, ro, float(cp[i]), float(cg[i]))
        _check_energy(ep[i], rp, W, f"layer {i} E_perp")
        _check_energy(eg[i], rg, W, f"layer {i} E_G")
        _check_grad(grads[i], rgrad, W, float(cp[i]), float(cg[i]), f"layer {i} grad")
    many = len(launches)
    launches.clear()
    fused_energies(weights[:2], plans[:2], cp[:2], cg[:2])
    # layers 3, 4 repeat the field shapes of 1, 2: only the bfloat16 copy adds classes
    classes_fp32 = len(launches)
    sched_many = triton_energies._schedule(weights, plans, DEVICE)[0]
    assert many == len(sched_many.classes)
    assert classes_fp32 < many
    G = equiproj.SO3()
    one_pair = block_plan(Rep.parse(G, "3x1"), Rep.parse(G, "2x1")).packed(DEVICE, torch.float32)
    small = [torch.randn(6, 9, generator=gen).to(DEVICE) for _ in range(12)]
    launches.clear()
    ep, _, _ = fused_energies(small, [one_pair] * 12)
    assert len(launches) == 1  # twelve layers, one tile class
    _check_energy(ep[11], _reference(small[11], Rep.parse(G, "3x1"), Rep.parse(G, "2x1"))[0], small[11], "layer 11")


@needs_kernel
def test_kernel_deterministic():
    gen = _gen(7)
    ri, ro = _so2_permuted()
    W = torch.randn(2, ro.dim, ri.dim, generator=gen).to(DEVICE)
    args = ([W], [_plan(ri, ro)], torch.tensor([1.0]), torch.tensor([0.5]))
    a, b = fused_energies(*args), fused_energies(*args)
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0])


@needs_kernel
def test_kernel_agrees_with_twin_and_empty_inputs():
    gen = _gen(8)
    ri, ro = _so3_fields()
    W = torch.randn(ro.dim, ri.dim, generator=gen).to(DEVICE)
    P = _plan(ri, ro)
    ep, eg, g = fused_energies([W], [P])
    tp, tg, tgrad = torch_fused_energies([W], [P])
    assert g is None and tgrad is None
    torch.testing.assert_close(ep[0], tp[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(eg[0], tg[0], rtol=1e-5, atol=0)
    assert fused_energies([], []) == ([], [], None)
    E = torch.zeros(0, ro.dim, ri.dim, device=DEVICE)
    (ep0,), (eg0,), (g0,) = fused_energies([E], [P], torch.ones(1), torch.ones(1))
    assert ep0.shape == (0,) and eg0.shape == (0,) and g0.shape == E.shape


@needs_kernel
def test_kernel_bad_input():
    ri, ro = _so3_fields()
    P = _plan(ri, ro)
    W = torch.randn(ro.dim, ri.dim, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        fused_energies([W.double()], [P])
    with pytest.raises(TypeError, match="dtype"):
        fused_energies([W.int()], [P])
    with pytest.raises(ValueError, match="shape"):
        fused_energies([W.T], [P])
    with pytest.raises(ValueError, match="2 weights but 1 plans"):
        fused_energies([W, W], [P])
    with pytest.raises(TypeError, match="list of tensors"):
        fused_energies(W, [P])
    with pytest.raises(TypeError, match="PackedPlan"):
        fused_energies([W], [block_plan(ri, ro)])
    with pytest.raises(ValueError, match="both lambda_perp and lambda_G"):
        fused_energies([W], [P], torch.ones(1), None)
    with pytest.raises(ValueError, match="shape"):
        fused_energies([W], [P], torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="half-precision basis"):
        fused_energies([W], [block_plan(ri, ro).packed(DEVICE, torch.float16)])
    if not ON_CUDA:
        with pytest.raises(ValueError, match="one device"):
            fused_energies([W, torch.randn(ro.dim, ri.dim, device="meta")], [P, P])


def test_field_size_limit():
    """Fields above 128 dims exceed the register tile: supports() says so, the kernel refuses."""
    G = equiproj.SO2()
    big_in = (65 * G.irrep(1)).change_basis(verify.random_orthogonal(130, _gen(9)))
    big_out = (65 * G.irrep(2)).change_basis(verify.random_orthogonal(130, _gen(9)))
    P = block_plan(big_in, big_out).packed("cpu", torch.float32)  # one 130 x 130 field pair, r = 0
    assert not supports(P)
    small_ri, small_ro = _so3_fields()
    assert supports(_plan(small_ri, small_ro))
    if KERNEL_RUNS and not ON_CUDA:
        with pytest.raises(ValueError, match="tile limit"):
            fused_energies([torch.randn(130, 130)], [P])


def test_schedule_slots_cover_each_matrix_once():
    """Task table bookkeeping: each matrix's slots are contiguous and every tile is covered once."""
    from equiproj._plan import PlanColumn as C
    from equiproj.kernels.schedule import TaskColumn as T
    from equiproj.kernels.schedule import build_schedule

    ri, ro = _so2_permuted()
    P = block_plan(ri, ro).packed("cpu", torch.float32)
    weights = [torch.empty(3, ro.dim, ri.dim), torch.empty(ro.dim, ri.dim, dtype=torch.float16)]
    s = build_schedule(weights, [P, P], torch.device("cpu"), target=(64, 1))
    t = s.tasks
    assert sorted(t[:, T.SLOT].tolist()) == list(range(s.n_slots))
    assert s.n_matrices == 4 and s.slot_start.tolist()[-1] == s.n_slots
    # covered weights per matrix: each (row, col) of each matrix exactly once
    cover = torch.zeros(4, ro.dim, ri.dim, dtype=torch.long)
    meta = P.meta.tolist()
    for row in t.tolist():
        r0, c0, nu, nv = row[T.ROW0], row[T.COL0], row[T.NU], row[T.NV]
        k = next(k for k in range(4) if s.slot_start[k] <= row[T.SLOT] < s.slot_start[k + 1])
        pair = next(p for p in meta if p[C.OUT_OFFSET] <= r0 < p[C.OUT_OFFSET] + p[C.OUT_COPIES] * p[C.D_OUT]
                    and p[C.IN_OFFSET] <= c0 < p[C.IN_OFFSET] + p[C.IN_COPIES] * p[C.D_IN])
        cover[k, r0 : r0 + nu * pair[C.D_OUT], c0 : c0 + nv * pair[C.D_IN]] += 1
    assert (cover == 1).all()


# ---- the pure-torch twin (runs without triton) ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_twin_matches_reference(dtype):
    gen = _gen(10)
    ri, ro = _dihedral_mixed(gen)
    W = torch.randn(2, ro.dim, ri.dim, generator=gen).to(dtype)
    P = block_plan(ri, ro).packed("cpu", torch.float64 if dtype == torch.float64 else torch.float32)
    cp, cg = 1.5, 0.5
    (ep,), (eg,), (g,) = torch_fused_energies([W], [P], torch.tensor([cp]), torch.tensor([cg]))
    rp, rg, rgrad = _reference(W, ri, ro, cp, cg)
    if dtype == torch.float64:
        assert ep.dtype == torch.float64
        torch.testing.assert_close(ep, rp, rtol=1e-12, atol=0)
        torch.testing.assert_close(eg, rg, rtol=1e-12, atol=0)
        torch.testing.assert_close(g, rgrad, rtol=1e-12, atol=1e-12)
    else:
        _check_energy(ep, rp, W, "twin E_perp")
        _check_energy(eg, rg, W, "twin E_G")
        _check_grad(g, rgrad, W, cp, cg, "twin grad")


def test_twin_bad_input():
    ri, ro = _so3_fields()
    P = block_plan(ri, ro).packed("cpu", torch.float32)
    with pytest.raises(ValueError, match="shape"):
        torch_fused_energies([torch.randn(3, 3)], [P])
    with pytest.raises(TypeError, match="dtype"):
        torch_fused_energies([torch.zeros(ro.dim, ri.dim, dtype=torch.int64)], [P])


# ---- larger shapes, natively on CUDA ------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_large_against_float64_twin(dtype):
    G = equiproj.SO3()
    ri = Rep.parse(G, "64x0 + 48x1 + 24x2 + 8x3")
    ro = Rep.parse(G, "32x0 + 32x1 + 16x2 + 16x4") + Rep.parse(G, "1 + 2") @ Rep.parse(G, "1")
    W = torch.randn(3, ro.dim, ri.dim, device="cuda").to(dtype)
    cp, cg = torch.tensor([1.3]), torch.tensor([0.4])
    (ep,), (eg,), (g,) = fused_energies([W], [_plan(ri, ro)], cp, cg)
    P64 = block_plan(ri, ro).packed("cuda", torch.float64)
    (rp,), (rg,), (rgrad,) = torch_fused_energies([W.double()], [P64], cp.double(), cg.double())
    _check_energy(ep, rp.cpu(), W, "large E_perp")
    _check_energy(eg, rg.cpu(), W, "large E_G")
    _check_grad(g, rgrad.cpu(), W, 1.3, 0.4, "large grad")


@cuda_only
def test_cuda_many_tasks_deterministic():
    G = equiproj.Cyclic(8)
    r = 64 * G.regular() + 32 * G.standard()
    W = torch.randn(4, r.dim, r.dim, device="cuda")
    P = _plan(r, r)
    args = ([W, W[1:]], [P, P], torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0]))
    a, b = fused_energies(*args), fused_energies(*args)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    P64 = block_plan(r, r).packed("cuda", torch.float64)
    (rp,), (rg,), _ = torch_fused_energies([W.double()], [P64])
    _check_energy(a[0][0], rp.cpu(), W, "C8 regular E_perp")
    _check_energy(a[1][0], rg.cpu(), W, "C8 regular E_G")
