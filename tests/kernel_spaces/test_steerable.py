"""Steerable kernel spaces (docs/math.md §6): the structured energy against the dense-basis reference
of V (the span of the sampled equivariant kernels), every backend and both plan layouts, the
exact action of the grid's symmetries, equivariance of projected convolutions, the comparison
with the exact grid energy, the orthonormal band coefficients, Clebsch-Gordan blocks, errors.

Tolerances:
  structured vs dense null-space reference (float64):      1e-9 relative (observed ~1e-14);
                                                             1e-12 in the backend/layout sweep
  B^T B = I, grid symmetries rho_pix(g) B = B sigma(g):     1e-12 absolute
  equivariant kernels: E_perp / ||K||^2                      < 1e-24
  nearly equivariant (E_perp / ||K||^2 = 1e-10), float64:    1e-6 relative on E_perp
  float32 vs float64 energies:                               1e-5 relative
  90° rotations / grid reflections of a projected conv:      1e-12 relative (exact up to rounding)
  other angles, smooth inputs (bump width 2 px), at the
  documented defaults:                                       5e-2 relative (observed <= 2.7e-2)
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import equiproj as ep
from equiproj import grid
from equiproj.groups import clebsch_gordan, irrep_product
from equiproj.kernel_spaces import (DenseKernelBasis, SteerableKernelSpace, default_kernel_space, kernel_energies_many,
                                smooth_equivariance_error)
from equiproj.kernel_spaces._pixel_plan import PixelPlan
from equiproj.testing import random_orthogonal
from equiproj.testing import relative_error as rel


def rot(axis, angle):
    """Rotation matrix: 2-D if axis is None, else about a 3-D axis."""
    c, s = math.cos(angle), math.sin(angle)
    if axis is None:
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + s * K + (1 - c) * K @ K


def layer(G, rin, rout, change_basis=True, seed=0):
    ri, ro = ep.Rep.parse(G, rin), ep.Rep.parse(G, rout)
    if change_basis:
        ri = ri.change_basis(random_orthogonal(ri.dim, torch.Generator().manual_seed(seed)))
    return ri, ro


# ---------------------------------------------------------------------------------------
# The kernel space itself
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("G,dims", [(ep.SO2(), (1, 6, 11, 18)), (ep.SO3(), (1, 10, 19, 35))], ids=str)
def test_basis_is_orthonormal_with_documented_defaults(G, dims):
    for k, D in zip((1, 3, 5, 7), dims):
        sp = default_kernel_space(G, k)
        assert sp.dim == D == sp.rep.dim and sp.num_pixels == k**sp.spatial_dims
        torch.testing.assert_close(sp.basis.T @ sp.basis, torch.eye(D, dtype=torch.float64), atol=1e-12, rtol=0)
        # the orthonormal basis spans the sampled functions
        torch.testing.assert_close(sp.basis @ (sp.basis.T @ sp.sampled), sp.sampled, atol=1e-12, rtol=0)
        assert sp.rings == tuple(float(r) for r in range((k - 1) // 2 + 1))
        assert not sp.exact_grid_action and "steerable" in sp.describe()
    sp = default_kernel_space(G, 5)
    assert sp.sigma == (0.005, 0.6, 0.4) and sp.max_frequency == (0, 2, 2) and sp.band_limit == 2
    assert default_kernel_space(G, 5) is sp  # cached
    assert default_kernel_space(G, 7).max_frequency == (0, 2, 3, 2)


def test_default_frequency_cutoffs_are_escnns():
    """escnn's R2Conv rule in 2-D (differs from the 3-D one from k = 9 on), R3Conv's in 3-D."""
    assert SteerableKernelSpace(ep.SO2(), 9).max_frequency == (0, 2, 3, 6, 2)
    assert SteerableKernelSpace(ep.SO2(), 11).max_frequency == (0, 2, 3, 6, 7, 2)
    assert SteerableKernelSpace(ep.SO3(), 9).max_frequency == (0, 2, 4, 3, 2)
    for k in (3, 5, 7):
        assert SteerableKernelSpace(ep.O2(), k).max_frequency == SteerableKernelSpace(ep.O3(), k).max_frequency


def test_custom_parameters():
    sp = SteerableKernelSpace(ep.SO2(), 7, rings=[0, 1.5, 3], sigma=0.8, max_frequency=3)
    assert sp.rings == (0.0, 1.5, 3.0) and sp.sigma == (0.8,) * 3 and sp.max_frequency == (0, 3, 3)
    assert sp.dim == 1 + 2 * 7
    torch.testing.assert_close(sp.basis.T @ sp.basis, torch.eye(sp.dim, dtype=torch.float64), atol=1e-12, rtol=0)


def _grid_elements():
    """(space group, kernel size, elements that map the grid onto itself)."""
    c4 = ep.Cyclic(4).elements()
    d4 = ep.Dihedral(4).elements()
    return [(ep.SO2(), k, c4) for k in (3, 5, 7)] + [(ep.O2(), k, d4) for k in (3, 5, 7)] + \
           [(ep.Cyclic(8), 5, c4), (ep.Dihedral(4), 5, d4), (ep.SO3(), 3, ep.Octahedral().elements()),
            (ep.SO3(), 5, ep.Octahedral().elements()[::3]), (ep.O3(), 3, ep.FullOctahedral().elements()),
            (ep.FullOctahedral(), 3, ep.FullOctahedral().elements()[::5])]


@pytest.mark.parametrize("G,k,els", _grid_elements(), ids=lambda v: str(v) if not isinstance(v, torch.Tensor) else "")
def test_grid_symmetries_act_as_the_kernel_space_action(G, k, els):
    sp = SteerableKernelSpace(G, k)
    shape = (k,) * sp.spatial_dims
    for g in els:
        sigma = grid.grid_permutation(g, shape)  # g x_i = x_sigma[i]
        # (rho_pix(g) B)[sigma[i]] = B[i] and rho_pix(g) B = B sigma(g)
        torch.testing.assert_close((sp.basis @ sp.rep.matrix(g))[sigma], sp.basis, atol=1e-12, rtol=0)
        torch.testing.assert_close((sp.sampled @ sp.rep.matrix(g))[sigma], sp.sampled, atol=1e-12, rtol=0)
    # on kernels with channels: act() equals moving the pixels (grid.act) of the in-band part
    ri, ro = layer(G, "standard + trivial", "standard")
    K = torch.randn(ro.dim, ri.dim, *shape, dtype=torch.float64)
    K_in = ((K.reshape(ro.dim, ri.dim, -1) @ sp.basis) @ sp.basis.T).reshape(K.shape)
    g = els[1]
    moved = grid.act(K_in.reshape(-1, *shape), g).reshape(K.shape)
    moved = torch.einsum("ab,bc...,dc->ad...", ro.matrix(g), moved, ri.matrix(g))
    torch.testing.assert_close(sp.act(g, K, ri, ro), moved, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# Structured energy vs the dense null-space reference
# ---------------------------------------------------------------------------------------
CASES = [
    (ep.SO2(), "0 + 1 + 2", "1 + 0", 3),
    (ep.SO2(), "0 + 1 + 2", "1 + 0", 5),
    (ep.SO2(), "0 + 1 + 2", "1 + 0 + 3", 7),
    (ep.O2(), "(0,0) + (1,1) + (1,2)", "(1,0) + (1,1)", 5),
    (ep.Cyclic(8), "regular", "regular", 3),
    (ep.Cyclic(8), "regular", "regular", 5),
    (ep.Cyclic(5), "regular", "0 + 1", 7),
    (ep.Dihedral(6), "standard + (1,0)", "regular", 5),
    (ep.SO3(), "0 + 1 + 2", "0 + 1 + 2", 3),
    (ep.SO3(), "0 + 1", "1 + 2", 5),
    (ep.SO3(), "2", "2", 7),
    (ep.O3(), "0e + 1o", "1o + 2e", 3),
    (ep.O3(), "1o + 1e", "0e + 2e", 5),
    (ep.Octahedral(), "regular", "T1 + A2", 3),
]


@pytest.fixture(scope="module")
def dense_cache():
    return {}


def _dense(cache, G, rin, rout, k):
    key = (G, rin, rout, k)
    if key not in cache:
        ri, ro = layer(G, rin, rout)
        sp = SteerableKernelSpace(G, k)
        cache[key] = (sp, ri, ro, DenseKernelBasis(sp, ri, ro, method="nullspace"))
    return cache[key]


@pytest.mark.parametrize("G,rin,rout,k", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_structured_energy_matches_dense_reference(G, rin, rout, k, dense_cache):
    sp, ri, ro, dense = _dense(dense_cache, G, rin, rout, k)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(2, ro.dim, ri.dim, *(k,) * sp.spatial_dims, dtype=torch.float64, generator=gen)
    ep_, eg = sp.energies(W, ri, ro)
    rp, rg = dense.energies(W)
    assert rel(ep_, rp) < 1e-9 and rel(eg, rg) < 1e-9
    for which in ("equivariant", "non_equivariant"):
        P, Pd = sp.project(W, ri, ro, which=which), dense.project(W, which=which)
        assert float((P - Pd).norm() / Pd.norm()) < 1e-9
    # the Hom-based dense basis (benchmark baseline) spans the same space
    hom = DenseKernelBasis(sp, ri, ro, method="hom")
    assert hom.Q.shape == dense.Q.shape == (W[0].numel(), DenseKernelBasis.size(sp, ri, ro)[1])
    assert rel(hom.energies(W)[0], rp) < 1e-9


@pytest.mark.parametrize("G,rin,rout,k", CASES[1::3], ids=lambda v: str(v).replace(" ", ""))
def test_equivariant_and_nearly_equivariant_kernels(G, rin, rout, k, dense_cache):
    sp, ri, ro, dense = _dense(dense_cache, G, rin, rout, k)
    gen = torch.Generator().manual_seed(2)
    c = torch.randn(dense.Q.shape[1], dtype=torch.float64, generator=gen)
    K = (dense.Q @ c).reshape(ro.dim, ri.dim, *(k,) * sp.spatial_dims)
    e_perp, e_g = sp.energies(K, ri, ro)
    norm2 = K.square().sum()
    assert float(e_perp / norm2) < 1e-24 and rel(e_g, norm2) < 1e-12
    # K + noise orthogonal to the equivariant kernels, E_perp / ||K||^2 = 1e-10: in-band and out-of-band noise
    N = torch.randn(K.shape, dtype=torch.float64, generator=gen)
    N_out = sp.project(N, ri, ro, which="non_equivariant")
    N_band = sp.kernel(sp.coefficients(N_out, ri, ro), ri, ro)  # in-band, non-equivariant part
    for noise in (N_out, N_band):
        eps = (1e-10 * norm2 / noise.square().sum()).sqrt()
        e_perp, _ = sp.energies(K + eps * noise, ri, ro)
        assert rel(e_perp, eps**2 * noise.square().sum()) < 1e-6
        assert rel(e_perp, dense.energies(K + eps * noise)[0]) < 1e-5


@pytest.mark.parametrize("G,rin,rout,k", CASES[::2], ids=lambda v: str(v).replace(" ", ""))
def test_energies_and_grad_matches_dense_reference(G, rin, rout, k, dense_cache):
    """One pass, no graph: energies and ``lambda_perp dE_perp + lambda_G dE_G`` against the dense
    basis (gradient 2 lambda_perp (K - QQ^T K) + 2 lambda_G QQ^T K); batched with per-kernel lambdas,
    non-contiguous, float32; nearly equivariant."""
    sp, ri, ro, dense = _dense(dense_cache, G, rin, rout, k)
    gen = torch.Generator().manual_seed(4)
    s = sp.spatial_dims
    W = torch.randn(ri.dim, ro.dim, 3, *(k,) * s, dtype=torch.float64, generator=gen).movedim(2, 0).transpose(1, 2)
    lp, lg = torch.rand(3, dtype=torch.float64, generator=gen), 0.3
    rp, rg = dense.energies(W)
    P = dense.project(W)
    want = 2 * lp.reshape((3,) + (1,) * (2 + s)) * (W - P) + 2 * lg * P
    for dt, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        e_perp, e_g, grad = sp.energies_and_grad(W.to(dt), ri, ro, lambda_perp=lp, lambda_G=lg)
        assert grad.shape == W.shape and grad.dtype == dt and not grad.requires_grad
        assert rel(e_perp.double(), rp) < tol and rel(e_g.double(), rg) < tol
        assert float((grad.double() - want).abs().max() / want.abs().max()) < tol
    # nearly equivariant (E_perp / ||K||^2 = 1e-10): relative accuracy of E_perp and of K - P K
    c = torch.randn(dense.Q.shape[1], dtype=torch.float64, generator=gen)
    K = (dense.Q @ c).reshape(ro.dim, ri.dim, *(k,) * s)
    N = sp.project(torch.randn(K.shape, dtype=torch.float64, generator=gen), ri, ro, which="non_equivariant")
    K = K + (1e-10 * K.square().sum() / N.square().sum()).sqrt() * N
    e_perp, _, grad = sp.energies_and_grad(K, ri, ro)
    R = K - dense.project(K)
    assert rel(e_perp, R.square().sum()) < 1e-6 and float((grad - 2 * R).abs().max() / R.abs().max()) < 1e-5


def test_kernel_energies_and_grads_many_matches_layer_by_layer():
    """Several conv layers (different groups, 2-D and 3-D) in one call: the same energies and
    gradients as autograd of each layer's differentiable energies."""
    from equiproj.kernel_spaces import kernel_energies_and_grads_many

    gen = torch.Generator().manual_seed(5)
    specs = [(ep.SO3(), "0 + 1", "1 + 2", 3), (ep.SO2(), "2x0 + 1", "1 + 2", 5), (ep.Cyclic(8), "regular", "0 + 1", 3)]
    weights, spaces, reps = [], [], []
    for G, rin, rout, k in specs:
        ri, ro = layer(G, rin, rout)
        sp = default_kernel_space(G, k)
        weights.append(torch.randn(ro.dim, ri.dim, *(k,) * sp.spatial_dims, dtype=torch.float64, generator=gen))
        spaces.append(sp)
        reps.append((ri, ro))
    lp, lg = [0.5, 1.0, 2.0], [0.1, 0.0, 0.3]
    e_perp, e_g, grads = kernel_energies_and_grads_many(weights, spaces, reps, lambda_perp=lp, lambda_G=lg)
    assert e_perp.shape == e_g.shape == (3,)
    for i, (w, sp, (ri, ro)) in enumerate(zip(weights, spaces, reps)):
        wr = w.clone().requires_grad_()
        a, b = sp.energies(wr, ri, ro)
        (lp[i] * a + lg[i] * b).backward()
        assert rel(e_perp[i], a.detach()) < 1e-12 and rel(e_g[i], b.detach()) < 1e-12
        torch.testing.assert_close(grads[i], wr.grad, rtol=1e-12, atol=1e-12 * float(wr.grad.abs().max()))
    with pytest.raises(ValueError, match="same non-zero number"):
        kernel_energies_and_grads_many(weights, spaces, reps, lambda_perp=lp[:2], lambda_G=lg)


# ---------------------------------------------------------------------------------------
# Every backend and both plan layouts against the dense reference of V
# ---------------------------------------------------------------------------------------
LAYOUT_CASES = [CASES[1], CASES[5], CASES[7], CASES[10], CASES[12], CASES[13]]


def _sweep_weights(dense, sp, ri, ro, gen):
    """``[4, m, n, k, ...]`` float64, non-contiguous: three random kernels and a nearly equivariant one
    (``E_perp / ||K||^2 = 1e-10``), with the exact ``E_perp`` of the last."""
    shape = (ro.dim, ri.dim) + (sp.kernel_size,) * sp.spatial_dims
    K = (dense.Q @ torch.randn(dense.Q.shape[1], dtype=torch.float64, generator=gen)).reshape(shape)
    N = dense.project(torch.randn(shape, dtype=torch.float64, generator=gen), which="non_equivariant")
    N = N * (1e-10 * K.square().sum() / N.square().sum()).sqrt()
    W = torch.cat([torch.randn((3,) + shape, dtype=torch.float64, generator=gen), (K + N)[None]])
    W = W.transpose(1, 2).contiguous().transpose(1, 2)
    assert not W.is_contiguous()
    return W, N.square().sum()


def _plan_backends():
    out = [("cpp", torch.float64), ("torch", torch.float64)]
    from equiproj.kernels import HAS_TRITON
    if HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append(("triton", torch.float32))
    return out


def _run_plan(backend, X, packed, lambda_perp=None, lambda_G=None):
    """(E_perp, E_G, grad or None) of ``X [..., m, n P]`` under ``packed`` by one backend."""
    if backend == "cpp":
        if lambda_perp is None:
            (e_perp,), (e_g,) = ep.ops.fused_energies([X], [packed])
            return e_perp, e_g, None
        (e_perp,), (e_g,), (g,) = ep.ops.fused_energies_and_grads([X], [packed], [lambda_perp], [lambda_G])
        return e_perp, e_g, g
    if backend == "torch":
        cp = [] if lambda_perp is None else [torch.full(X.shape[:-2], lambda_perp, dtype=X.dtype)]
        cg = [] if lambda_G is None else [torch.full(X.shape[:-2], lambda_G, dtype=X.dtype)]
        (e_perp,), (e_g,), g = ep.ops.run_twin([X], [packed], cp, cg)
        return e_perp, e_g, (g[0] if g else None)
    from equiproj.kernels import fused_energies as triton_fused  # the Triton kernel (interpreter on CPU)

    mats = X.reshape((-1,) + X.shape[-2:]).unbind(0)
    plans = [packed.to(X.device, torch.float32)] * len(mats)
    if lambda_perp is None:
        e_perp, e_g, _ = triton_fused(list(mats), plans, None, None)
        return torch.stack(e_perp).reshape(X.shape[:-2]), torch.stack(e_g).reshape(X.shape[:-2]), None
    cps, cgs = torch.full((len(mats),), lambda_perp), torch.full((len(mats),), lambda_G)
    e_perp, e_g, g = triton_fused(list(mats), plans, cps, cgs)
    return (torch.stack(e_perp).reshape(X.shape[:-2]), torch.stack(e_g).reshape(X.shape[:-2]),
            torch.stack(g).reshape(X.shape))


@pytest.mark.parametrize("layout", ["fields", "irreps"])
@pytest.mark.parametrize("G,rin,rout,k", LAYOUT_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_every_backend_and_layout_matches_dense_reference(G, rin, rout, k, layout, dense_cache, gen):
    """The pixel-tile plan (both layouts) run by the C++ kernel, the torch twin and the Triton kernel
    (interpreter on CPU; float32) against ``Q Q^T w``: energies of batched non-contiguous float64
    weights to 1e-12, a nearly equivariant kernel's E_perp to 1e-9 of itself, the penalty gradient."""
    sp, ri, ro, dense = _dense(dense_cache, G, rin, rout, k)
    plan = PixelPlan(sp, ri, ro, layout)
    W, near = _sweep_weights(dense, sp, ri, ro, gen)
    rp, rg = dense.energies(W)
    PW = dense.project(W)
    cp, cg = 0.7, 0.2
    want = 2 * cp * (W - PW) + 2 * cg * PW
    for backend, dt in _plan_backends():
        if backend == "triton" and (W[0].numel() > 30000 or not ep.kernels.supports(plan.packed)):
            continue  # the interpreter runs small shapes only
        Wd = W.to(dt)
        X = plan.to_plan_coordinates(Wd.reshape(W.shape[:3] + (-1,)))
        tol = 1e-12 if dt == torch.float64 else 1e-5
        e_perp, e_g, _ = _run_plan(backend, X, plan.packed)
        assert rel(e_perp[:3].double(), rp[:3]) < tol and rel(e_g.double(), rg) < tol, backend
        if dt == torch.float64:  # nearly equivariant: relative to E_perp itself (the dense one is no better)
            assert rel(e_perp[-1], near) < 1e-9 and rel(rp[-1], near) < 1e-9, backend
        e_perp, e_g, g = _run_plan(backend, X, plan.packed, cp, cg)
        grad = plan.from_plan_coordinates(g).reshape(W.shape)
        assert rel(e_perp[:3].double(), rp[:3]) < tol and float((grad.double() - want).abs().max() / want.abs().max()) < tol


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
@pytest.mark.parametrize("G,rin,rout,k", LAYOUT_CASES[:4], ids=lambda v: str(v).replace(" ", ""))
def test_public_energies_every_backend(G, rin, rout, k, backend, dense_cache, gen):
    """``energies`` / ``energies_and_grad`` / ``project`` with ``backend=`` against the dense reference
    (float64; the reference backend is the group quadrature on the orthonormal band coefficients)."""
    sp, ri, ro, dense = _dense(dense_cache, G, rin, rout, k)
    W, near = _sweep_weights(dense, sp, ri, ro, gen)
    rp, rg = dense.energies(W)
    e_perp, e_g = sp.energies(W, ri, ro, backend=backend)
    assert rel(e_perp[:3], rp[:3]) < 1e-12 and rel(e_g, rg) < 1e-12 and rel(e_perp[-1], near) < 1e-9
    lp = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    e_perp, e_g, grad = sp.energies_and_grad(W, ri, ro, lambda_perp=lp, lambda_G=0.25, backend=backend)
    PW = dense.project(W)
    want = 2 * lp.reshape((4,) + (1,) * (W.dim() - 1)) * (W - PW) + 0.5 * PW
    assert rel(e_perp[:3], rp[:3]) < 1e-12 and float((grad - want).abs().max() / want.abs().max()) < 1e-12
    R = sp.project(W, ri, ro, which="non_equivariant")
    assert float((R - (W - PW)).abs().max() / (W - PW).abs().max()) < 1e-12
    assert rel(R[-1].square().sum(), near) < 1e-9
    Wg = W.detach().clone().requires_grad_()  # autograd through every backend
    sp.energies(Wg, ri, ro, backend=backend)[0].sum().backward()
    assert float((Wg.grad - 2 * (W - PW)).abs().max() / (W - PW).abs().max()) < 1e-12


def test_permuted_reps(gen):
    """Reps with a permutation (tensor products): both layouts, the public backends and the band
    coefficients against the dense null-space reference."""
    G = ep.SO2()
    ri = ep.Rep.parse(G, "0 + 1") @ ep.Rep.parse(G, "1 + 2")
    ro = ep.Rep.parse(G, "1 + 0") @ ep.Rep.parse(G, "0 + 1")
    assert ri.perm is not None and ro.perm is not None
    sp = SteerableKernelSpace(G, 5)
    dense = DenseKernelBasis(sp, ri, ro)
    W = torch.randn(2, ro.dim, ri.dim, 5, 5, dtype=torch.float64, generator=gen)
    rp, rg = dense.energies(W)
    for layout in ("fields", "irreps"):
        plan = PixelPlan(sp, ri, ro, layout)
        e_perp, e_g, _ = _run_plan("cpp", plan.to_plan_coordinates(W.reshape(2, ro.dim, ri.dim, -1)), plan.packed)
        assert rel(e_perp, rp) < 1e-12 and rel(e_g, rg) < 1e-12, layout
    for backend in ("cpp", "torch", "reference"):
        e_perp, e_g = sp.energies(W, ri, ro, backend=backend)
        assert rel(e_perp, rp) < 1e-12 and rel(e_g, rg) < 1e-12, backend
    torch.testing.assert_close(sp.project(W, ri, ro), dense.project(W), atol=1e-12, rtol=0)


def test_layout_choice_and_memory_kept_for_backward():
    """Fields with a change of basis and many basis matrices per field pair run in the irreps layout,
    irreps fields in the field layout; backward keeps nothing but the weight (field layout) or one
    copy of it (irreps layout)."""
    C8, O3 = ep.Cyclic(8), ep.O3()
    reg = 4 * C8.regular()
    r3 = ep.Rep.parse(O3, "2x0e + 2x1o + 2x2e")
    sp2, sp3 = default_kernel_space(C8, 5), default_kernel_space(O3, 5)
    p2, p3 = sp2.plan(reg, reg), sp3.plan(r3, r3)
    assert p2.layout == "irreps" and p3.layout == "fields"
    assert p2.flops_per_weight < 0.5 * PixelPlan(sp2, reg, reg, "fields").flops_per_weight
    for sp, rep, k_extra in ((sp2, reg, 1.0), (sp3, r3, 0.0)):
        W = torch.randn(rep.dim, rep.dim, *(5,) * sp.spatial_dims, requires_grad=True)
        saved = {}

        def pack(t):
            if t.is_floating_point() and t.data_ptr() != W.data_ptr():
                saved[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            e_perp, e_g = sp.energies(W, rep, rep)
        (e_perp + e_g).backward()
        assert sum(saved.values()) <= k_extra * W.numel() * W.element_size()
        torch.testing.assert_close(W.grad, 2 * W.detach(), rtol=1e-5, atol=1e-5)  # d(E_perp + E_G) = 2 W


@pytest.mark.parametrize("G,rin,rout,k", [
    (ep.Cyclic(4), "regular", "0 + 1", 5), (ep.Dihedral(4), "regular + (1,0)", "regular", 3),
    (ep.Octahedral(), "T1 + A1", "E + T2", 3), (ep.FullOctahedral(), "T1u + A1g", "T1u + A2u", 3),
], ids=str)
def test_exact_grid_groups_keep_the_coefficient_definition(G, rin, rout, k, gen):
    """Where every element maps the grid onto itself, ``Phi^T Phi`` commutes with ``sigma``: V is the
    set of kernels with equivariant coefficients in the orthonormal basis ``B`` (the definition of the
    coefficient route), and the orthonormal band coefficients are ``K B`` themselves."""
    ri, ro = layer(G, rin, rout)
    sp = SteerableKernelSpace(G, k)
    W = torch.randn((2, ro.dim, ri.dim) + (k,) * sp.spatial_dims, dtype=torch.float64, generator=gen)
    K = W.reshape(2, ro.dim, ri.dim, -1)
    A = sp._to_layout(K @ sp.basis, ri)
    crep = sp.coefficient_rep(ri)
    coef_perp, coef_g = ep.energies(A, crep, ro)
    outside = (K - (K @ sp.basis) @ sp.basis.T).square().sum((1, 2, 3))
    e_perp, e_g = sp.energies(W, ri, ro)
    assert rel(e_perp, coef_perp + outside) < 1e-12 and rel(e_g, coef_g) < 1e-12
    torch.testing.assert_close(sp.coefficients(W, ri, ro), A, atol=1e-13, rtol=0)


@pytest.mark.parametrize("G,rin,rout,k", [CASES[1], CASES[5], CASES[9], CASES[12]], ids=lambda v: str(v).replace(" ", ""))
def test_orthonormal_band_coefficients(G, rin, rout, k, gen):
    """``coefficients`` is an isometry of the band (``kernel`` its inverse), G acts on it orthogonally,
    and its equivariant part is V: the quadrature energies of the coefficients plus the out-of-band
    energy are the kernel space's energies."""
    ri, ro = layer(G, rin, rout)
    sp = SteerableKernelSpace(G, k)
    W = torch.randn((2, ro.dim, ri.dim) + (k,) * sp.spatial_dims, dtype=torch.float64, generator=gen)
    K = W.reshape(2, ro.dim, ri.dim, -1)
    band = (K @ sp.basis) @ sp.basis.T
    A = sp.coefficients(W, ri, ro)
    assert rel(A.square().sum((1, 2)), band.square().sum((1, 2, 3))) < 1e-12
    torch.testing.assert_close(sp.kernel(A, ri, ro).reshape(K.shape), band, atol=1e-12, rtol=0)
    coef_perp, coef_g = ep.reference.energies(A, sp.coefficient_rep(ri), ro)
    e_perp, e_g = sp.energies(W, ri, ro)
    assert rel(coef_perp + (K - band).square().sum((1, 2, 3)), e_perp) < 1e-10 and rel(coef_g, e_g) < 1e-10
    # not the coefficients in B themselves (Phi^T Phi does not commute with sigma off the grid)
    assert float((A - sp._to_layout(K @ sp.basis, ri)).abs().max()) > 1e-3


def test_no_equivariant_kernels():
    """Reps whose coefficient maps share no irrep: everything is non-equivariant, in both implementations."""
    G = ep.SO3()
    ri, ro = ep.Rep.parse(G, "0"), ep.Rep.parse(G, "2")
    sp = default_kernel_space(G, 1)  # a 1x1 kernel: only degree 0 in the kernel space
    W = torch.randn(2, ro.dim, ri.dim, 1, 1, 1, dtype=torch.float64)
    e_perp, e_g = sp.energies(W, ri, ro)
    for dense in (DenseKernelBasis(sp, ri, ro), DenseKernelBasis(sp, ri, ro, method="hom")):
        assert dense.Q.shape == (5, 0)
        assert rel(e_perp, dense.energies(W)[0]) < 1e-12
    assert rel(e_perp, W.square().sum((1, 2, 3, 4, 5))) < 1e-12 and float(e_g.abs().max()) == 0


def test_gradients_float32_batched_noncontiguous():
    G = ep.SO3()
    ri, ro = layer(G, "0 + 1", "1 + 2")
    sp = default_kernel_space(G, 3)
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(ro.dim, ri.dim, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    e_perp, e_g = sp.energies(W, ri, ro)
    (g_perp,) = torch.autograd.grad(e_perp, W, retain_graph=True)
    (g_g,) = torch.autograd.grad(e_g, W)
    P = sp.project(W.detach(), ri, ro)
    torch.testing.assert_close(g_perp, 2 * (W.detach() - P), atol=1e-12, rtol=0)
    torch.testing.assert_close(g_g, 2 * P, atol=1e-12, rtol=0)
    small = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    r2 = ep.Rep.parse(ep.SO2(), "2x0")
    assert torch.autograd.gradcheck(lambda w: default_kernel_space(ep.SO2(), 3).energies(w, r2, r2), (small,))
    # batched, non-contiguous, float32 / float16
    Wb = torch.randn(ri.dim, ro.dim, 3, 3, 3, 3, dtype=torch.float64, generator=gen).permute(5, 1, 0, 2, 3, 4)
    assert not Wb.is_contiguous()
    e64 = sp.energies(Wb, ri, ro)
    e_loop = torch.stack([sp.energies(w, ri, ro)[0] for w in Wb])
    assert rel(e64[0], e_loop) < 1e-12
    e32 = sp.energies(Wb.float(), ri, ro)
    assert e32[0].dtype == torch.float32 and rel(e32[0].double(), e64[0]) < 1e-5 and rel(e32[1].double(), e64[1]) < 1e-5
    e16 = sp.energies(Wb.half(), ri, ro)
    assert e16[0].dtype == torch.float32 and rel(e16[0].double(), e64[0]) < 1e-2


def test_projection_properties_and_many_layers():
    G = ep.Cyclic(8)
    ri, ro = layer(G, "regular", "regular + 0")
    sp = default_kernel_space(G, 5)
    W = torch.randn(ro.dim, ri.dim, 5, 5, dtype=torch.float64)
    P = sp.project(W, ri, ro)
    torch.testing.assert_close(sp.project(P, ri, ro), P, atol=1e-12, rtol=0)
    torch.testing.assert_close(P + sp.project(W, ri, ro, which="non_equivariant"), W, atol=1e-12, rtol=0)
    e_perp, e_g = sp.energies(P, ri, ro)
    assert float(e_perp) < 1e-24 and rel(e_g, P.square().sum()) < 1e-12
    parts = sp.energy_parts(W, ri, ro)
    assert rel(parts["outside"], (W - sp.kernel(sp.coefficients(W, ri, ro), ri, ro)).square().sum()) < 1e-12
    assert rel(parts["outside"] + parts["in_band"], sp.energies(W, ri, ro)[0]) < 1e-12
    assert W.dtype == sp.project(W.float(), ri, ro).double().dtype
    # many layers in one call
    G3 = ep.O3()
    r3i, r3o = layer(G3, "0e + 1o", "1o")
    W3 = torch.randn(r3o.dim, r3i.dim, 3, 3, 3, dtype=torch.float64)
    sp3 = default_kernel_space(G3, 3)
    e_perp, e_g = kernel_energies_many([W, W3], [sp, sp3], [(ri, ro), (r3i, r3o)])
    one = [sp.energies(W, ri, ro), sp3.energies(W3, r3i, r3o)]
    assert rel(e_perp, torch.stack([o[0] for o in one])) < 1e-12 and rel(e_g, torch.stack([o[1] for o in one])) < 1e-12


# ---------------------------------------------------------------------------------------
# Equivariance of projected convolutions
# ---------------------------------------------------------------------------------------
def _conv(x, K):
    conv = F.conv2d if K.dim() == 4 else F.conv3d
    return conv(x, K, padding=K.shape[-1] // 2)


@pytest.mark.parametrize("G,rin,rout,k,gs", [
    (ep.SO2(), "0 + 1", "1 + 2", 5, [rot(None, math.pi / 2), rot(None, math.pi)]),
    (ep.O2(), "(0,0) + (1,1)", "(1,1) + (1,0)", 3, [rot(None, math.pi / 2) @ torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))]),
    (ep.Cyclic(8), "regular", "regular", 5, [rot(None, math.pi / 2)]),
    (ep.SO3(), "0 + 1", "1 + 2", 3, [rot((0, 0, 1), math.pi / 2), rot((1, 0, 0), math.pi / 2)]),
    (ep.O3(), "0e + 1o", "1o + 0o", 3, [-rot((0, 1, 0), math.pi / 2)]),
], ids=lambda v: str(v).replace(" ", "") if not isinstance(v, list) else "")
def test_projected_conv_is_exactly_equivariant_under_grid_rotations(G, rin, rout, k, gs):
    ri, ro = layer(G, rin, rout)
    s = G.ambient_dim
    gen = torch.Generator().manual_seed(4)
    K = torch.randn(ro.dim, ri.dim, *(k,) * s, dtype=torch.float64, generator=gen)
    x = torch.randn(1, ri.dim, *(9 if s == 2 else 7,) * s, dtype=torch.float64, generator=gen)
    Kp = default_kernel_space(G, k).project(K, ri, ro)
    for g in gs:
        for kernel, bound in ((Kp, 1e-12), (K, None)):
            y = _conv(grid.act(x, g, ri), kernel)
            y_ref = grid.act(_conv(x, kernel), g, ro)
            err = float((y - y_ref).norm() / y_ref.norm())
            if bound is not None:
                assert err < bound
            else:
                assert err > 1e-2  # the unprojected kernel is not equivariant: the test can fail


def _bump_field(x, centres, coefs, width):
    d2 = (x[:, None, :] - centres[None]).square().sum(-1)
    return torch.exp(-d2 / (2 * width**2)) @ coefs


def _smooth_equivariance_error(sp, ri, ro, K, gs, width=2.0, n_fields=8, seed=5):
    """RMS relative error of the centre output: sum_p K(x_p) (g.f)(x_p) vs rho_out(g) sum_p K(x_p) f(x_p),
    for fields f = random Gaussian bumps of the given width, evaluated exactly at the grid points."""
    gen = torch.Generator().manual_seed(seed)
    s, k = sp.spatial_dims, sp.kernel_size
    x = grid.grid_points((k,) * s)
    Kf = K.reshape(ro.dim, ri.dim, -1)
    num = den = 0.0
    for g in gs:
        Ri, Ro = ri.matrix(g), ro.matrix(g)
        for _ in range(n_fields):
            c = torch.randn(5, s, dtype=torch.float64, generator=gen) * k / 3
            a = torch.randn(5, ri.dim, dtype=torch.float64, generator=gen)
            f = _bump_field(x, c, a, width)
            fg = _bump_field(x @ g, c, a, width) @ Ri.T  # rho_in(g) f(g^-1 x)
            out, out_g = torch.einsum("oip,pi->o", Kf, f), torch.einsum("oip,pi->o", Kf, fg)
            num += float((out_g - Ro @ out).square().sum())
            den += float(out.square().sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("G,rin,rout,k", [
    (ep.SO2(), "0 + 1", "1 + 2", 3), (ep.SO2(), "0 + 1", "1 + 2", 7), (ep.O2(), "(0,0) + (1,1)", "(1,1) + (1,2)", 5),
    (ep.Cyclic(8), "regular", "regular", 5), (ep.SO3(), "0 + 1", "1 + 2", 3), (ep.O3(), "0e + 1o", "1o + 2e", 5),
], ids=lambda v: str(v).replace(" ", ""))
def test_projected_conv_equivariance_for_other_angles_is_bounded(G, rin, rout, k):
    ri, ro = layer(G, rin, rout, change_basis=False)
    sp = default_kernel_space(G, k)
    gen = torch.Generator().manual_seed(6)
    K = torch.randn(ro.dim, ri.dim, *(k,) * sp.spatial_dims, dtype=torch.float64, generator=gen)
    gs = G.sample(6, generator=gen)
    err = _smooth_equivariance_error(sp, ri, ro, sp.project(K, ri, ro), gs)
    assert err < 5e-2
    lib = smooth_equivariance_error(sp, sp.project(K, ri, ro), ri, ro, gs, generator=torch.Generator().manual_seed(0))
    assert lib < 5e-2 and abs(math.log(lib / err)) < math.log(3)  # the library's diagnostic agrees
    assert _smooth_equivariance_error(sp, ri, ro, K, gs) > 0.2  # a random kernel is far from equivariant


# ---------------------------------------------------------------------------------------
# Comparison with the exact grid action (C4, D4, O, O_h)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("G,rin,rout,k", [
    (ep.Cyclic(4), "regular", "0 + 1", 5), (ep.Dihedral(4), "regular", "regular", 3),
    (ep.Octahedral(), "T1 + A1", "E + T2", 3), (ep.FullOctahedral(), "T1u + A1g", "T1u + A2u", 3),
], ids=str)
def test_steerable_energy_vs_exact_grid_energy(G, rin, rout, k):
    ri, ro = layer(G, rin, rout)
    sp = SteerableKernelSpace(G, k)
    s = sp.spatial_dims
    pix = grid.kernel_rep(G, (k,) * s)
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(2, ro.dim, ri.dim, *(k,) * s, dtype=torch.float64, generator=gen)
    lin = lambda X: X.reshape(X.shape[0], ro.dim, -1)  # noqa: E731  Kronecker order (channel, pixel)
    e_perp, e_g = sp.energies(W, ri, ro)
    grid_perp, grid_g = ep.energies(lin(W), ri @ pix, ro)
    out_of_band = W - sp.kernel(sp.coefficients(W, ri, ro), ri, ro)
    _, grid_g_out = ep.energies(lin(out_of_band), ri @ pix, ro)
    assert rel(e_perp, grid_perp + grid_g_out) < 1e-10
    assert rel(e_g, grid_g - grid_g_out) < 1e-10
    assert bool((e_perp >= grid_perp).all()) and bool((grid_g_out > 0).all())


# ---------------------------------------------------------------------------------------
# Clebsch-Gordan blocks
# ---------------------------------------------------------------------------------------
def test_clebsch_gordan_equivariance_and_cache():
    G = ep.SO3()
    R = G.sample(3, generator=torch.Generator().manual_seed(8))
    for l1, l2, l3 in [(1, 1, 0), (1, 1, 2), (2, 1, 3), (2, 3, 1), (2, 2, 2), (1, 2, 4)]:
        C = clebsch_gordan(l1, l2, l3)
        if not abs(l1 - l2) <= l3 <= l1 + l2:
            assert float(C.abs().max()) == 0
            continue
        assert abs(float(C.square().sum()) - (2 * l3 + 1)) < 1e-10
        D1, D2, D3 = (G.irrep(l).matrix(R) for l in (l1, l2, l3))
        lhs = torch.einsum("nai,nbj,ijk->nabk", D1, D2, C)
        rhs = torch.einsum("abm,nmk->nabk", C, D3)
        torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)
    before = irrep_product.cache_info()
    irrep_product(G.irrep(2), G.irrep(1))
    after = irrep_product.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1
    # multiplicities for the other groups agree with the characters (the library's decomposition)
    for H, a, b in [(ep.O3(), (1, -1), (2, 1)), (ep.Cyclic(8), 3, 3), (ep.Dihedral(6), (1, 2), (1, 2)),
                    (ep.O2(), (1, 1), (1, 2)), (ep.FullOctahedral(), "T1u", "T2g")]:
        slots, Q = irrep_product(H.irrep(a), H.irrep(b))
        ref = dict((H.irrep(a) @ H.irrep(b)).irreps)
        got = {}
        for sl in slots:
            got[sl] = got.get(sl, 0) + 1
        assert got == ref
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_clebsch_gordan_matches_e3nn():
    o3 = pytest.importorskip("e3nn.o3")
    for l1, l2, l3 in [(1, 1, 1), (1, 2, 2), (2, 2, 3), (2, 3, 1)]:
        ours = clebsch_gordan(l1, l2, l3)
        theirs = o3.wigner_3j(l1, l2, l3).double()
        theirs = theirs / theirs.norm() * ours.norm()
        assert min(float((ours - theirs).abs().max()), float((ours + theirs).abs().max())) < 1e-6


def test_energy_does_not_recompute_clebsch_gordan():
    G = ep.SO3()
    r = ep.Rep.parse(G, "0 + 1 + 2")
    W = torch.randn(r.dim, r.dim, 3, 3, 3, dtype=torch.float64)
    default_kernel_space(G, 3).energies(W, r, r)
    misses = irrep_product.cache_info().misses
    SteerableKernelSpace(G, 3, sigma=0.7).energies(W, r, r)  # a new space object, same blocks
    assert irrep_product.cache_info().misses == misses


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="3-D space"):
        default_kernel_space(ep.Octahedral(), 3, 2)
    with pytest.raises(ValueError, match="2-D space"):
        default_kernel_space(ep.SO2(), 3, 3)
    with pytest.raises(ValueError, match="odd kernel_size"):
        default_kernel_space(ep.SO3(), 4)
    with pytest.raises(ValueError, match="kernel_size"):
        default_kernel_space(ep.SO2(), 0)
    with pytest.raises(ValueError, match="cubic"):
        default_kernel_space(ep.SO3(), (3, 3, 5), 3)
    assert default_kernel_space(ep.SO3(), (3, 3, 3), 3).kernel_size == 3
    with pytest.raises(TypeError, match="Group"):
        SteerableKernelSpace("SO2", 3)
    with pytest.raises(ValueError, match="linearly dependent|does not fit|vanishes"):
        SteerableKernelSpace(ep.SO2(), 3, max_frequency=4)
    with pytest.raises(ValueError, match="rings"):
        SteerableKernelSpace(ep.SO2(), 3, rings=[0, 5])
    with pytest.raises(ValueError, match="sigma"):
        SteerableKernelSpace(ep.SO2(), 3, sigma=[0.5])
    with pytest.raises(ValueError, match="radius 0"):
        SteerableKernelSpace(ep.SO2(), 3, max_frequency=[1, 1])
    sp = default_kernel_space(ep.SO2(), 3)
    r = ep.Rep.parse(ep.SO2(), "0 + 1")
    with pytest.raises(ValueError, match="shape"):
        sp.energies(torch.randn(3, 3, 5, 5), r, r)
    with pytest.raises(ValueError, match="acts by"):
        sp.energies(torch.randn(3, 3, 3, 3), r, ep.Rep.parse(ep.O2(), "(0,0) + (1,1)"))
    with pytest.raises(TypeError, match="floating"):
        sp.energies(torch.ones(3, 3, 3, 3, dtype=torch.long), r, r)
    with pytest.raises(ValueError, match="which"):
        sp.project(torch.randn(3, 3, 3, 3), r, r, which="both")


# ---------------------------------------------------------------------------------------
# Integration with equiproj.nn (declare -> ProjectionPenalty -> project_ -> report)
# ---------------------------------------------------------------------------------------
def test_nn_declare_penalty_project_report():
    enn = pytest.importorskip("equiproj.nn")
    P = ep.Rep.parse
    cases = [
        (torch.nn.Conv2d(3, 5, 5, padding=2), P(ep.SO2(), "0 + 1"), P(ep.SO2(), "1 + 2 + 0"), rot(None, math.pi / 2)),
        (torch.nn.Conv2d(8, 8, 3, padding=1), ep.Cyclic(8).regular(), ep.Cyclic(8).regular(), rot(None, -math.pi / 2)),
        (torch.nn.Conv3d(4, 8, 3, padding=1), P(ep.SO3(), "0 + 1"), P(ep.SO3(), "1 + 2"), rot((1, 0, 0), math.pi / 2)),
        (torch.nn.Conv3d(4, 4, 3, padding=1), P(ep.O3(), "0e + 1o"), P(ep.O3(), "1o + 0e"), -rot((0, 0, 1), math.pi / 2)),
    ]
    gen = torch.Generator().manual_seed(9)
    for conv, ri, ro, g in cases:
        conv = conv.double()
        enn.declare(conv, ri, ro)
        model = torch.nn.Sequential(conv)
        s = conv.weight.dim() - 2
        sp = default_kernel_space(ri.group, conv.kernel_size[0], s)
        # the penalty is the kernel-space energy (plus the bias's exact energy)
        e_perp, _ = sp.energies(conv.weight.detach(), ri, ro)
        e_bias = ep.energies(conv.bias.detach()[:, None], ri.group.trivial(), ro)[0]
        pen = enn.ProjectionPenalty(model, lambda_perp=1.0)()
        assert rel(pen.detach(), e_perp + e_bias) < 1e-10
        pen.backward()
        grad_ref = 2 * sp.project(conv.weight.detach(), ri, ro, which="non_equivariant")
        torch.testing.assert_close(conv.weight.grad, grad_ref, atol=1e-10, rtol=0)
        row = enn.report(model).rows[0]
        assert row["case"] == "kernel_space" and rel(torch.tensor(row["e_perp"], dtype=torch.float64), e_perp + e_bias) < 1e-10
        assert "steerable" in row["description"]
        enn.project_(model)
        row = enn.report(model).rows[0]
        assert row["rel_perp"] < 1e-24
        # the projected layer commutes with the 90° rotation (exact on the grid)
        x = torch.randn(1, ri.dim, *(7,) * s, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            y, y_ref = model(grid.act(x, g, ri)), grid.act(model(x), g, ro)
        assert float((y - y_ref).norm() / y_ref.norm()) < 1e-12


@pytest.mark.parametrize("G,rin,rout,k", [(ep.Cyclic(8), "regular", "regular", 5), (ep.Dihedral(8), "regular",
                                                                                  "regular", 3),
                                           (ep.SO2(), "2x0 + 1", "0 + 1 + 2", 5)], ids=str)
def test_kernel_space_under_autocast_computes_as_without(G, rin, rout, k, gen):
    """Regular fields take the layout with a per-field change of basis: inside a bfloat16 autocast region
    its matrix products must stay in the weight's dtype (they ran in bfloat16: errors of 5e-4)."""
    ri, ro = ep.Rep.parse(G, rin), ep.Rep.parse(G, rout)
    sp = default_kernel_space(G, k)
    W = torch.randn(ro.dim, ri.dim, k, k, generator=gen).requires_grad_()
    e = sp.energies(W, ri, ro)
    (g,) = torch.autograd.grad(e[0] + 0.5 * e[1], W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ea = sp.energies(W, ri, ro)
        _, _, g1 = sp.energies_and_grad(W, ri, ro, lambda_G=0.5)
        P = sp.project(W, ri, ro)
    (ga,) = torch.autograd.grad(ea[0] + 0.5 * ea[1], W)
    for a, b in zip(ea, e):
        assert rel(a, b) < 1e-6
    assert float((ga - g).abs().max()) <= 1e-6 * float(g.abs().max())
    assert float((g1 - g).abs().max()) <= 1e-6 * float(g.abs().max())
    assert float((P - sp.project(W, ri, ro)).abs().max()) <= 1e-6 * float(P.abs().max())
