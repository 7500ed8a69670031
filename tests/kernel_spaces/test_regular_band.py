"""The closed form of the steerable projection between regular fields (one pass per tile in the C++
extension: ``equiproj.kernel_spaces._regular_band``), the route of ``energies_and_grad``,
``ProjectionPenalty.backward()`` and ``decay_`` on the CPU for layers whose fields are all the
group's regular field.

Checked against the dense basis of V (``DenseKernelBasis``, QR of the spanning kernels), the float64
group quadrature (``backend="reference"``) and escnn's exported kernels, on fresh seeded weights.
Tolerances:
  float64 energies and gradient vs the dense projection:   1e-10 relative (observed ~1e-15)
  nearly equivariant (E_perp / ||K||^2 = 1e-10), float64:  1e-6 relative on E_perp
  float32 (fp32 arithmetic, AVX2 and plain loop):         2e-5 of max |K| on the gradient and step,
                                                           1e-5 relative on E_perp of random weights
  nearly equivariant, float32 weights (E_perp / ||K||^2 = 1e-10): 5e-3 relative on E_perp
    (P K is formed in float32; observed 2e-4 to 4e-4, docs/math.md §6)
  fp16 / bf16: the rounding of the result (2e-3 / 1e-2 of max |K|)
  escnn's kernels: E_perp / ||K||^2 < 1e-20 (float64)
"""

from __future__ import annotations

import functools
import glob
import os

import pytest
import torch

import equiproj as ep
from equiproj.kernel_spaces import DenseKernelBasis, default_kernel_space, kernel_energies_and_grads_many
from equiproj.kernel_spaces._factorised import FactorisedPlan, factorised_plan
from equiproj.kernel_spaces._regular_band import kernel_available, regular_band
from equiproj.testing import random_orthogonal
from equiproj.testing import relative_error as rel

pytestmark = pytest.mark.skipif(not kernel_available(), reason="the C++ extension equiproj._C is not built")

CASES = [  # group, kernel size, input copies, output copies (odd shapes: c_in != c_out)
    (lambda: ep.Cyclic(8), 5, 2, 3),
    (lambda: ep.Cyclic(16), 3, 1, 2),
    (lambda: ep.Cyclic(8), 7, 1, 1),
    (lambda: ep.Cyclic(3), 5, 3, 2),
    (lambda: ep.Dihedral(6), 5, 2, 1),
    (lambda: ep.Dihedral(3), 7, 1, 2),
]
IDS = ["C8-k5", "C16-k3", "C8-k7", "C3-k5", "D6-k5", "D3-k7"]


def _layer(case):
    make, k, ci, co = case
    G = make()
    return default_kernel_space(G, k), ci * G.regular(), co * G.regular()


def _weight(sp, ri, ro, gen, batch=()):
    shape = batch + (ro.dim, ri.dim) + (sp.kernel_size,) * sp.spatial_dims
    return torch.randn(shape, dtype=torch.float64, generator=gen)


def _pixels(K, sp):
    return K.reshape(K.shape[: -sp.spatial_dims] + (sp.num_pixels,))


def test_closed_form_is_taken_only_for_regular_fields_in_their_own_order(gen):
    G = ep.Cyclic(8)
    sp = default_kernel_space(G, 5)
    R = G.regular()
    assert factorised_plan(sp, 2 * R, 3 * R).regular is not None
    assert factorised_plan(sp, R + R, R).regular is not None  # two segments of the same field
    assert regular_band(sp, R + ep.Rep.parse(G, "0"), R) is None  # a field that is not regular
    assert regular_band(sp, R, R.change_basis(random_orthogonal(8, gen))) is None  # another basis
    assert regular_band(default_kernel_space(ep.SO2(), 5), ep.Rep.parse(ep.SO2(), "0 + 1"),
                        ep.Rep.parse(ep.SO2(), "1")) is None  # continuous group
    assert regular_band(sp, ep.Cyclic(4).regular(), R) is None  # another group's regular field


@pytest.mark.parametrize("plain", [False, True], ids=["avx2", "plain"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_energies_and_gradient_equal_the_dense_projection(case, plain, gen):
    sp, ri, ro = _layer(case)
    K = _weight(sp, ri, ro, gen)
    PK = DenseKernelBasis(sp, ri, ro).project(K)
    rb = regular_band(sp, ri, ro)
    want = 1.4 * (K - PK) + 0.4 * PK
    # float64: the plain loop in float64 whatever `plain` says
    e_perp, e_g, grad = rb.run(_pixels(K, sp), 0.7, 0.2, plain=plain)
    assert rel(e_perp, (K - PK).square().sum()) < 1e-10 and rel(e_g, PK.square().sum()) < 1e-10
    torch.testing.assert_close(grad.reshape(K.shape), want, rtol=0, atol=1e-10 * float(want.abs().max()))
    # float32: fp32 arithmetic (the AVX2 kernel where the CPU has it, else the plain loop)
    e_perp, e_g, grad = rb.run(_pixels(K.float(), sp), 0.7, 0.2, plain=plain)
    assert e_perp.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel(e_perp.double(), (K - PK).square().sum()) < 1e-5 and rel(e_g.double(), PK.square().sum()) < 1e-5
    torch.testing.assert_close(grad.double().reshape(K.shape), want, rtol=0, atol=2e-5 * float(K.abs().max()))


@pytest.mark.parametrize("case", CASES[:1] + CASES[4:5], ids=["C8-k5", "D6-k5"])
def test_public_route_agrees_with_the_group_quadrature(case, gen):
    sp, ri, ro = _layer(case)
    K = _weight(sp, ri, ro, gen)
    e_perp, e_g, _ = sp.energies_and_grad(K, ri, ro, lambda_perp=1.0)
    ref_p, ref_g = sp.energies(K, ri, ro, backend="reference")
    assert rel(e_perp, ref_p) < 1e-9 and rel(e_g, ref_g) < 1e-9


def test_nearly_equivariant_weights_keep_their_small_energy(gen):
    sp, ri, ro = _layer(CASES[0])
    dense = DenseKernelBasis(sp, ri, ro)
    K0 = dense.project(_weight(sp, ri, ro, gen))
    noise = _weight(sp, ri, ro, gen)
    noise = noise - dense.project(noise)
    K = K0 + noise * (1e-5 * float(K0.norm() / noise.norm()))  # E_perp / ||K||^2 ~ 1e-10
    want = (K - dense.project(K)).square().sum()
    assert 1e-11 < float(want / K.square().sum()) < 1e-9
    e_perp, _, grad = sp.energies_and_grad(K, ri, ro)
    assert rel(e_perp, want) < 1e-6
    torch.testing.assert_close(grad, 2 * (K - dense.project(K)), rtol=0, atol=1e-12 * float(K.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_non_contiguous_weights_with_per_item_lambdas(dtype, gen):
    sp, ri, ro = _layer(CASES[3])
    base = _weight(sp, ri, ro, gen, batch=(3,)).to(dtype)
    K = base.transpose(0, 1).contiguous().transpose(0, 1)  # [3, m, n, k, k], not contiguous
    assert not K.is_contiguous()
    lp, lg = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
    e_perp, e_g, g = sp.energies_and_grad(K, ri, ro, lambda_perp=lp, lambda_G=lg)
    assert e_perp.shape == e_g.shape == (3,) and g.dtype == dtype
    dense = DenseKernelBasis(sp, ri, ro)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for i in range(3):
        Ki = K[i].double()
        PK = dense.project(Ki)
        assert rel(e_perp[i].double(), (Ki - PK).square().sum()) < tol
        want = 2 * lp[i] * (Ki - PK) + 2 * lg[i] * PK
        torch.testing.assert_close(g[i].double(), want, rtol=0, atol=tol * 4 * float(Ki.abs().max()))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_step_and_gradient(dtype, tol, gen):
    sp, ri, ro = _layer(CASES[0])
    K = _weight(sp, ri, ro, gen).to(dtype)
    K64 = K.double()
    PK = DenseKernelBasis(sp, ri, ro).project(K64)
    scale = float(K64.abs().max())
    e_perp, _, g = sp.energies_and_grad(K, ri, ro, lambda_perp=1.0)
    assert g.dtype == dtype
    assert rel(e_perp.double(), (K64 - PK).square().sum()) < 1e-5
    torch.testing.assert_close(g.double(), 2 * (K64 - PK), rtol=0, atol=2 * tol * scale)
    W = K.clone()
    kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[-0.05], lambda_G=[0.0], outs=[W],
                                   energies=False)
    torch.testing.assert_close(W.double(), K64 - 0.1 * (K64 - PK), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_step_and_accumulation_into_outputs(dtype, gen):
    sp, ri, ro = _layer(CASES[4])
    K = _weight(sp, ri, ro, gen)
    PK = DenseKernelBasis(sp, ri, ro).project(K)
    atol = (1e-12 if dtype == torch.float64 else 2e-6) * float(K.abs().max())
    # the decoupled step, written into the weight itself
    W = K.clone().to(dtype)
    ptr = W.data_ptr()
    kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[-0.1], lambda_G=[-0.05], outs=[W],
                                   energies=False)
    assert W.data_ptr() == ptr
    torch.testing.assert_close(W.double(), K - 0.2 * (K - PK) - 0.1 * PK, rtol=0, atol=atol)
    # the gradient added into an existing buffer, with the energies
    buf = torch.randn(K.shape, dtype=torch.float64, generator=gen).to(dtype)
    before = buf.double().clone()
    e_perp, _, (out,) = kernel_energies_and_grads_many([K.to(dtype)], [sp], [(ri, ro)], lambda_perp=[0.5],
                                                       lambda_G=[0.25], outs=[buf])
    assert out is buf
    assert rel(e_perp[0].double(), (K - PK).square().sum()) < (1e-10 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(buf.double(), before + (K - PK) + 0.5 * PK, rtol=0, atol=atol * 10)
    # a non-contiguous output of another dtype: the gradient is computed apart and added
    buf2 = torch.zeros(K.shape[::-1], dtype=torch.float64).permute(3, 2, 1, 0)
    kernel_energies_and_grads_many([K.to(dtype)], [sp], [(ri, ro)], lambda_perp=[0.5], lambda_G=[0.0], outs=[buf2])
    torch.testing.assert_close(buf2, K - PK, rtol=0, atol=atol * 10)


def test_energies_do_not_depend_on_the_thread_count(gen):
    sp, ri, ro = _layer((lambda: ep.Cyclic(8), 5, 6, 5))
    K = _weight(sp, ri, ro, gen).float()
    rb = regular_band(sp, ri, ro)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rb.run(_pixels(K, sp), 1.0, 0.0)
        torch.set_num_threads(2)
        two = rb.run(_pixels(K, sp), 1.0, 0.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])


def test_penalty_takes_the_closed_form(monkeypatch, seed):
    """``backward()`` into ``.grad`` and ``decay_`` of a declared C8 regular conv run the closed form
    (the factorised transforms are switched off) and equal the float64 projection."""
    def fail(*a, **k):
        raise AssertionError("the factorised transforms ran")

    monkeypatch.setattr(FactorisedPlan, "_run", fail)
    torch.manual_seed(seed)
    G = ep.Cyclic(8)
    rep = 3 * G.regular()
    conv = torch.nn.Conv2d(rep.dim, 2 * rep.dim // 3, 5, bias=False)
    ro = 2 * G.regular()
    sp = default_kernel_space(G, 5)
    ep.nn.declare(conv, rep, ro, kernel_space=sp)
    penalty = ep.nn.ProjectionPenalty(conv, lambda_perp=1.0)
    W0 = conv.weight.detach().double().clone()
    PW0 = DenseKernelBasis(sp, rep, ro).project(W0)
    conv.weight.grad = torch.ones_like(conv.weight)
    value = penalty.backward()
    assert rel(torch.as_tensor(float(value), dtype=torch.float64), (W0 - PW0).square().sum()) < 1e-5
    torch.testing.assert_close(conv.weight.grad.double(), 1 + 2 * (W0 - PW0), rtol=0, atol=1e-5)
    penalty.decay_(0.3)
    torch.testing.assert_close(conv.weight.detach().double(), W0 - 0.3 * (W0 - PW0), rtol=0,
                               atol=2e-6 * float(W0.abs().max()))


LANE_CASES = [  # group, kernel size, input copies, output copies: eight tiles per vector, the rest one by one
    (lambda: ep.Cyclic(8), 5, 9, 2),  # rows in classes of 4 (the rotations by 90 degrees); one tile left over
    (lambda: ep.Cyclic(16), 5, 8, 1),
    (lambda: ep.Cyclic(8), 7, 11, 1),  # D = 18: the band in blocks of 12 + 6
    (lambda: ep.Dihedral(8), 3, 8, 1),  # classes of 8 rows (D4 in D8)
    (lambda: ep.Dihedral(4), 3, 8, 1),  # one class: the whole group acts on the grid
]
LANE_IDS = ["C8-k5", "C16-k5", "C8-k7", "D8-k3", "D4-k3"]


@functools.lru_cache(maxsize=None)
def _tile_basis(sp):
    return DenseKernelBasis(sp, sp.group.regular(), sp.group.regular())


def _tile_projection(K, sp, N):
    """P K of a 2-D kernel ``[..., m, n, k, k]`` tile by tile, from the dense basis of one pair of regular
    fields (float64): tiles of different copy pairs are independent."""
    k = sp.kernel_size
    co, ci = K.shape[-4] // N, K.shape[-3] // N
    dense = _tile_basis(sp)
    tiles = K.double().reshape(K.shape[:-4] + (co, N, ci, N, k, k)).transpose(-5, -4)
    return dense.project(tiles).transpose(-5, -4).reshape(K.shape)


@pytest.mark.parametrize("case", LANE_CASES, ids=LANE_IDS)
def test_eight_tiles_at_once_equal_the_tile_projection(case, gen):
    make, k, ci, co = case
    G = make()
    N = G.order
    sp = default_kernel_space(G, k)
    ri, ro = ci * G.regular(), co * G.regular()
    rb = regular_band(sp, ri, ro)
    assert rb.idx is not None and rb.class_size == (8 if isinstance(G, ep.Dihedral) else 4)
    Kf = _weight(sp, ri, ro, gen).float()
    K = Kf.double()
    PK = _tile_projection(K, sp, N)
    want = 1.4 * (K - PK) + 0.4 * PK
    got = {}
    for lanes in (True, False):
        e_perp, e_g, grad = rb.run(_pixels(Kf, sp), 0.7, 0.2, lanes=lanes)
        assert rel(e_perp.double(), (K - PK).square().sum()) < 1e-5
        assert rel(e_g.double(), PK.square().sum()) < 1e-5
        torch.testing.assert_close(grad.double().reshape(K.shape), want, rtol=0, atol=2e-6 * float(K.abs().max()))
        got[lanes] = grad
    assert not torch.equal(got[True], got[False])  # two different loops, not the same code twice
    # energies only, and the gradient added into an existing buffer
    e_perp, _, none = rb.run(_pixels(Kf, sp))
    assert none is None and rel(e_perp.double(), (K - PK).square().sum()) < 1e-5
    buf = torch.randn(_pixels(Kf, sp).shape, generator=gen)
    before = buf.double().clone()
    rb.run(_pixels(Kf, sp), 0.7, 0.2, out=buf)
    torch.testing.assert_close(buf.double(), before + want.reshape(before.shape), rtol=0,
                               atol=4e-6 * float(K.abs().max()))


def test_eight_tiles_at_once_batched_and_in_place(gen):
    """A batch with one coefficient per item, and the decoupled step written into the weight itself."""
    G = ep.Cyclic(8)
    sp = default_kernel_space(G, 5)
    ri, ro = 10 * G.regular(), 2 * G.regular()
    rb = regular_band(sp, ri, ro)
    K = _weight(sp, ri, ro, gen, batch=(3,)).float()
    PK = _tile_projection(K, sp, 8)
    lp, lg = torch.tensor([0.5, 1.0, -0.05]), torch.tensor([0.0, 0.3, 0.1])
    e_perp, e_g, g = rb.run(_pixels(K, sp), lp, lg)
    K64 = K.double()
    assert rel(e_perp.double(), (K64 - PK).square().flatten(1).sum(1)) < 1e-5
    want = 2 * lp.double().view(3, 1, 1, 1, 1) * (K64 - PK) + 2 * lg.double().view(3, 1, 1, 1, 1) * PK
    torch.testing.assert_close(g.double().reshape(K.shape), want, rtol=0, atol=2e-6 * float(K.abs().max()))
    W = _pixels(K.clone(), sp)
    rb.run(W, -0.05, 0.0, out=W)
    torch.testing.assert_close(W.double().reshape(K.shape), K64 - 0.1 * (K64 - PK), rtol=0,
                               atol=1e-6 * float(K.abs().max()))


def test_eight_tiles_at_once_do_not_depend_on_the_thread_count(gen):
    G = ep.Cyclic(8)
    sp = default_kernel_space(G, 5)
    ri, ro = 17 * G.regular(), 5 * G.regular()
    rb = regular_band(sp, ri, ro)
    K = _pixels(_weight(sp, ri, ro, gen).float(), sp)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rb.run(K, 1.0, 0.25)
        torch.set_num_threads(2)
        two = rb.run(K, 1.0, 0.25)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lanes", [True, False], ids=["eight-tiles", "one-tile"])
def test_nearly_equivariant_float32_weights_keep_their_small_energy(lanes, gen):
    G = ep.Cyclic(8)
    sp = default_kernel_space(G, 5)
    dense = _tile_basis(sp)
    K0 = dense.project(torch.randn(2, 8, 8, 8, 5, 5, dtype=torch.float64, generator=gen))  # [co, ci, N, N, k, k]
    noise = torch.randn(K0.shape, dtype=torch.float64, generator=gen)
    noise = noise - dense.project(noise)
    K = (K0 + noise * (1e-5 * float(K0.norm() / noise.norm()))).float().double()  # float32 values
    want = (K - dense.project(K)).square().sum()
    assert 1e-11 < float(want / K.square().sum()) < 1e-9
    W = K.transpose(1, 2).reshape(1, 16, 64, 25).float().contiguous()
    e_perp = regular_band(sp, 8 * G.regular(), 2 * G.regular()).run(W, lanes=lanes)[0]
    assert rel(e_perp.double(), want) < 5e-3


def test_rows_in_classes_are_pixel_permutations_of_their_representative():
    """Each row of a class samples the band as its representative does, with the pixels permuted by
    the class's index table; groups without grid symmetry keep one row per class."""
    for G, k, size in [(ep.Cyclic(8), 5, 4), (ep.Cyclic(16), 7, 4), (ep.Dihedral(8), 5, 8), (ep.Cyclic(3), 5, 1),
                       (ep.Cyclic(6), 3, 2)]:
        sp = default_kernel_space(G, k)
        rb = regular_band(sp, G.regular(), G.regular())
        assert rb.class_size == size
        N, P = G.order, sp.num_pixels
        rows, cls, reps = rb.rows.tolist(), rb.classes.tolist(), rb.reps.tolist()
        assert sorted(rows) == list(range(N))
        from equiproj.kernel_spaces._regular_band import _grid_classes
        idx = _grid_classes(rb.phi, rb.mult, force_index=True)[3].long()
        for c, x0 in enumerate(reps):
            for x in rows[cls[c]: cls[c + 1]]:
                z, pi = idx[x].view(N, P).div(P, rounding_mode="floor"), idx[x].view(N, P) % P
                assert torch.equal(rb.mult[x][z[:, 0]], torch.arange(N))  # entry y holds z with x z = y
                for y in range(N):
                    torch.testing.assert_close(rb.phi[x], rb.phi[x0][pi[y]], rtol=0, atol=1e-12)


DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("name", ["escnn_c8_k5", "escnn_c8_k3", "escnn_d4_k3"])
def test_escnn_kernels_between_regular_fields_stay_equivariant(name, gen):
    """escnn's exported kernels, restricted to their regular-to-regular block and moved to the group's
    own regular field (a permutation that intertwines the two), have no energy outside V."""
    from test_escnn_parity import load_fixture  # the directory of this file is on sys.path (no package)

    meta, basis, G, ri, ro, *_ = load_fixture(os.path.join(DATA, name + ".npz"))
    assert ri.segments[0][1].name == ro.segments[0][1].name == "regular"
    k = meta["kernel_size"]
    sp = default_kernel_space(G, k)
    N = G.order
    els = G.elements()
    R = G.regular().matrix(els)

    def intertwiner(field):  # A with field(g) = A R(g) A^T, a permutation: sum_g field(g) e0 e0^T R(g)^T
        F = field.matrix(els)
        A = torch.einsum("gi,gj->ij", F[:, :, 0], R[:, :, 0])
        torch.testing.assert_close(A, A.round(), rtol=0, atol=1e-12)  # a permutation, up to rounding
        A = A.round()
        torch.testing.assert_close(F, A @ R @ A.T, rtol=0, atol=1e-12)
        return A

    A_out, A_in = intertwiner(ro.segments[0][1]), intertwiner(ri.segments[0][1])
    shape = (ro.dim, ri.dim) + (k,) * sp.spatial_dims
    K = (torch.randn(3, meta["num_basis"], dtype=torch.float64, generator=gen) @ basis).reshape((3,) + shape)
    block = torch.einsum("io,bij...,jn->bon...", A_out, K[:, :N, :N], A_in)  # in the regular field's own order
    R1 = G.regular()
    e_perp, e_g, grad = sp.energies_and_grad(block, R1, R1, lambda_perp=1.0)
    norm = block.square().flatten(1).sum(1)
    assert float(norm.min()) > 0
    assert float((e_perp / norm).max()) < 1e-20 and rel(e_g, norm) < 1e-12
    assert float(grad.abs().max()) < 1e-9 * float(block.abs().max())
    # a random weight through the same route: E_perp is not ~0 (the check can fail)
    W = torch.randn(block.shape[1:], dtype=torch.float64, generator=gen)
    assert float(sp.energies_and_grad(W, R1, R1)[0] / W.square().sum()) > 0.1
    # eight of escnn's kernels as eight input copies in float32: the kernel's eight tiles per lane
    K8 = (torch.randn(8, meta["num_basis"], dtype=torch.float64, generator=gen) @ basis).reshape((8,) + shape)
    tiles = torch.einsum("io,bij...,jn->bon...", A_out, K8[:, :N, :N], A_in)  # [8, N, N, k...]
    layer = tiles.transpose(0, 1).reshape((1, N, 8 * N, sp.num_pixels)).float()
    rb = regular_band(sp, 8 * R1, R1)
    assert rb.idx is not None
    e_perp, e_g, _ = rb.run(layer, lanes=True)
    norm = layer.double().square().sum()
    assert float(e_perp / norm) < 1e-12 and rel(e_g.double(), norm) < 1e-6
    noise = torch.randn(layer.shape, generator=gen)
    assert float(rb.run(noise, lanes=True)[0] / noise.double().square().sum()) > 0.1


def test_fixtures_exist():
    assert glob.glob(os.path.join(DATA, "escnn_c8_k5.npz"))
