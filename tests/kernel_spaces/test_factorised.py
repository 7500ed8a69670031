"""The factorised projection onto steerable kernel spaces (pixels to the band, fields to their irreps,
whitened equivariant maps per irrep tile, back), the route of the device's fused backend for
energies with gradients and for the in-place decoupled step.

Checked against the dense basis of V (``DenseKernelBasis``, QR of the spanning kernels) and the
float64 group quadrature (``backend="reference"``), on fresh seeded weights.
Tolerances:
  float64 energies and gradients vs the dense projection:        1e-10 relative (observed ~1e-14)
  nearly equivariant (E_perp / ||K||^2 = 1e-10), float64:        1e-6 relative on E_perp
  float64 vs the group quadrature (``"reference"``):             1e-9 relative
  float32 gradient / decoupled step:                             2e-5 of max |W|; bf16/fp16: the
                                                                  rounding of the result (1e-2 / 2e-3)
"""

from __future__ import annotations

import pytest
import torch

import equiproj as ep
from equiproj import ops
from equiproj.kernel_spaces import DenseKernelBasis, default_kernel_space, kernel_energies_and_grads_many
from equiproj.kernel_spaces import _factorised
from equiproj.kernel_spaces._factorised import blocks_available, factorised_plan
from equiproj.testing import random_orthogonal
from equiproj.testing import relative_error as rel

CASES = [  # group, kernel size, rep_in, rep_out (odd and mixed shapes; regular fields have a change of basis)
    (lambda: ep.Cyclic(8), 5, "regular", "regular + 0"),
    (lambda: ep.Cyclic(16), 3, "regular", "1 + 3"),
    (lambda: ep.Dihedral(6), 5, "regular", "(1,1) + (0,0)"),
    (lambda: ep.SO2(), 5, "2x0 + 1 + 3", "1 + 2x2"),
    (lambda: ep.SO2(), 7, "0 + 1 + 2 + 3", "3 + 0"),
    (lambda: ep.O2(), 5, "(0,0) + (1,1) + (1,0)", "(1,2) + (1,1)"),
    (lambda: ep.SO3(), 3, "0 + 1", "1 + 2"),
    (lambda: ep.O3(), 5, "0e + 1o", "1o + 2e + 0o"),
]
IDS = ["C8-reg-k5", "C16-reg-k3", "D6-reg-k5", "SO2-k5", "SO2-k7", "O2-k5", "SO3-k3", "O3-k5"]


def _layer(case, gen, permute=True):
    make, k, rin, rout = case
    G = make()
    ri, ro = ep.Rep.parse(G, rin), ep.Rep.parse(G, rout)
    if permute:  # user order and change of basis on the input: the route must undo both
        ri = ri.change_basis(random_orthogonal(ri.dim, gen))
        ro = ro.change_basis(random_orthogonal(ro.dim, gen)) if ro.dim < 12 else ro
    return default_kernel_space(G, k), ri, ro


def _weight(sp, ri, ro, gen, dtype=torch.float64, batch=()):
    shape = batch + (ro.dim, ri.dim) + (sp.kernel_size,) * sp.spatial_dims
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_energies_and_gradient_equal_the_dense_projection(case, gen):
    sp, ri, ro = _layer(case, gen)
    K = _weight(sp, ri, ro, gen)
    dense = DenseKernelBasis(sp, ri, ro)
    PK = dense.project(K)
    e_perp, e_g, (grad,) = kernel_energies_and_grads_many([K], [sp], [(ri, ro)], lambda_perp=[0.7], lambda_G=[0.2])
    assert rel(e_perp[0], (K - PK).square().sum()) < 1e-10
    assert rel(e_g[0], PK.square().sum()) < 1e-10
    want = 1.4 * (K - PK) + 0.4 * PK
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    # the same numbers as the float64 group quadrature on the band coefficients
    ref_p, ref_g = sp.energies(K, ri, ro, backend="reference")
    assert rel(e_perp[0], ref_p) < 1e-9 and rel(e_g[0], ref_g) < 1e-9


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_equals_autograd_of_the_float64_energy(case, gen):
    sp, ri, ro = _layer(case, gen)
    K = _weight(sp, ri, ro, gen)
    Kr = K.clone().requires_grad_()
    a, b = sp.energies(Kr, ri, ro, backend="reference")
    (0.5 * a + 1.5 * b).backward()
    _, _, g = sp.energies_and_grad(K, ri, ro, lambda_perp=0.5, lambda_G=1.5)
    torch.testing.assert_close(g, Kr.grad, rtol=0, atol=1e-9 * float(Kr.grad.abs().max()))


@pytest.mark.parametrize("case", CASES[:1] + CASES[3:4] + CASES[7:], ids=["C8-reg-k5", "SO2-k5", "O3-k5"])
def test_nearly_equivariant_weights_keep_their_small_energy(case, gen):
    sp, ri, ro = _layer(case, gen)
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


def test_batched_non_contiguous_weights_with_per_item_lambdas(gen):
    sp, ri, ro = _layer(CASES[0], gen)
    base = _weight(sp, ri, ro, gen, batch=(3,))
    K = base.transpose(0, 1).contiguous().transpose(0, 1)  # [3, m, n, k, k], not contiguous
    assert not K.is_contiguous()
    lp, lg = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
    e_perp, e_g, g = sp.energies_and_grad(K, ri, ro, lambda_perp=lp, lambda_G=lg)
    assert e_perp.shape == e_g.shape == (3,)
    dense = DenseKernelBasis(sp, ri, ro)
    for i in range(3):
        PK = dense.project(K[i])
        assert rel(e_perp[i], (K[i] - PK).square().sum()) < 1e-10
        want = 2 * lp[i] * (K[i] - PK) + 2 * lg[i] * PK
        torch.testing.assert_close(g[i], want, rtol=0, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES[:1] + CASES[5:6] + CASES[7:], ids=["C8-reg-k5", "O2-k5", "O3-k5"])
def test_low_precision_step_and_gradient(case, dtype, tol, gen):
    sp, ri, ro = _layer(case, gen)
    K = _weight(sp, ri, ro, gen, dtype)
    K64 = K.double()
    PK = DenseKernelBasis(sp, ri, ro).project(K64)
    scale = float(K64.abs().max())
    e_perp, _, g = sp.energies_and_grad(K, ri, ro, lambda_perp=1.0)
    assert g.dtype == dtype
    assert rel(e_perp, (K64 - PK).square().sum()) < (1e-5 if dtype == torch.float32 else 1e-6)
    torch.testing.assert_close(g.double(), 2 * (K64 - PK), rtol=0, atol=2 * tol * scale)
    W = K.clone()
    kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[-0.05], lambda_G=[0.0], outs=[W],
                                   energies=False)
    torch.testing.assert_close(W.double(), K64 - 0.1 * (K64 - PK), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_in_place_step_and_accumulation_into_outputs(case, gen):
    sp, ri, ro = _layer(case, gen)
    K = _weight(sp, ri, ro, gen)
    PK = DenseKernelBasis(sp, ri, ro).project(K)
    atol = 1e-12 * float(K.abs().max())
    # the decoupled step in place, with and without the energies (one product / the residual pass)
    for energies in (False, True):
        W = K.clone()
        ptr = W.data_ptr()
        ep_, eg_, outs = kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[-0.1], lambda_G=[-0.05],
                                                        outs=[W], energies=energies)
        assert outs[0] is W and W.data_ptr() == ptr
        torch.testing.assert_close(W, K - 0.2 * (K - PK) - 0.1 * PK, rtol=0, atol=atol)
        if energies:  # the energies of the weight before the step
            assert rel(ep_[0], (K - PK).square().sum()) < 1e-10
        else:
            assert ep_ is None and eg_ is None
    # added to an existing gradient buffer
    buf = torch.randn(K.shape, dtype=torch.float64, generator=gen)
    before = buf.clone()
    kernel_energies_and_grads_many([K], [sp], [(ri, ro)], lambda_perp=[0.5], lambda_G=[0.25], outs=[buf])
    torch.testing.assert_close(buf, before + (K - PK) + 0.5 * PK, rtol=0, atol=atol * 10)


def test_plan_has_no_dense_field_pair_basis():
    """C8-regular fields at k = 5: the maps are per irrep pair (r <= 11), not the r = 88 pixel basis."""
    G = ep.Cyclic(8)
    sp, reg = default_kernel_space(G, 5), G.regular()
    plan = factorised_plan(sp, 4 * reg, 4 * reg)
    assert max(t[-1] for t in plan.tiles) <= 11
    assert plan.basis_bytes < 64 * 1024
    assert plan.flops_per_weight < 100


def test_route_comes_from_the_backend_registry():
    for name in ops.BACKENDS:
        assert ops.route_for("steerable_kernel_space", name) is not None
    with pytest.raises(LookupError, match="no route"):
        ops.route_for("no_such_kind", "torch")
    with pytest.raises(ValueError, match="one implementation per backend"):
        ops.register_route("partial", {"torch": object()})


def test_penalty_decay_steps_in_place_without_the_projection(monkeypatch, seed):
    """``decay_`` on a declared steerable conv: one in-place pass (the declaration's float64 projection
    is never called), equal to ``W - rate (W - P W)`` computed in float64; ``backward`` equals autograd."""
    from equiproj.nn import ProjectionPenalty, declare
    from equiproj.nn._declaration import KernelSpaceDeclaration

    G = ep.Cyclic(8)
    reg = G.regular()
    conv = declare(torch.nn.Conv2d(2 * reg.dim, reg.dim + 1, 5, bias=False), 2 * reg, reg + G.trivial(),
                   kernel_space=default_kernel_space(G, 5))
    sp = default_kernel_space(G, 5)
    W0 = conv.weight.detach().double().clone()
    PW = DenseKernelBasis(sp, 2 * reg, reg + G.trivial()).project(W0)
    penalty = ProjectionPenalty(conv, lambda_perp=1.0)

    def refuse(*a, **k):
        raise AssertionError("decay_ went through the projection")

    monkeypatch.setattr(KernelSpaceDeclaration, "projected", refuse)
    ptr = conv.weight.data_ptr()
    penalty.decay_(0.3)
    assert conv.weight.data_ptr() == ptr
    torch.testing.assert_close(conv.weight.detach().double(), W0 - 0.3 * (W0 - PW), rtol=0,
                               atol=2e-6 * float(W0.abs().max()))
    # backward into an existing .grad equals the gradient of the float64 energy
    W1 = conv.weight.detach().double()
    conv.weight.grad = torch.ones_like(conv.weight)
    value = penalty.backward()
    PW1 = DenseKernelBasis(sp, 2 * reg, reg + G.trivial()).project(W1)
    torch.testing.assert_close(conv.weight.grad.double(), 1 + 2 * (W1 - PW1), rtol=0, atol=1e-5)
    assert rel(value, (W1 - PW1).square().sum()) < 1e-4


@pytest.mark.parametrize("case", CASES[3:4] + CASES[5:6] + CASES[7:], ids=["SO2-k5", "O2-k5", "O3-k5"])
def test_passes_in_many_chunks_on_batched_weights(case, monkeypatch, gen):
    """Chunks of a few rows (the residual pass, the in-place step) and a batch of weights (the band
    projection's batched products) give the dense projection's numbers."""
    from equiproj.kernel_spaces import _factorised

    monkeypatch.setattr(_factorised, "_CHUNK_ELEMENTS", 3 * 5**3)  # a few rows per chunk, not a divisor of them
    sp, ri, ro = _layer(case, gen)
    dense = DenseKernelBasis(sp, ri, ro)
    K = _weight(sp, ri, ro, gen, batch=(2,)).transpose(0, 1).contiguous().transpose(0, 1)
    lp, lg = torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([0.25, 0.0], dtype=torch.float64)
    e_perp, e_g, g = sp.energies_and_grad(K, ri, ro, lambda_perp=lp, lambda_G=lg)
    for i in range(2):
        PK = dense.project(K[i])
        assert rel(e_perp[i], (K[i] - PK).square().sum()) < 1e-10
        assert rel(e_g[i], PK.square().sum()) < 1e-10
        want = 2 * lp[i] * (K[i] - PK) + 2 * lg[i] * PK
        torch.testing.assert_close(g[i], want, rtol=0, atol=1e-10 * float(want.abs().max()))
    # the in-place step and the accumulation, chunk by chunk, on an unbatched weight
    K = _weight(sp, ri, ro, gen)
    PK = dense.project(K)
    W = K.clone()
    kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[-0.15], lambda_G=[-0.05], outs=[W],
                                   energies=False)
    torch.testing.assert_close(W, K - 0.3 * (K - PK) - 0.1 * PK, rtol=0, atol=1e-12 * float(K.abs().max()))
    buf = torch.randn(K.shape, dtype=torch.float64, generator=gen)
    before = buf.clone()
    e_perp, _, _ = kernel_energies_and_grads_many([K], [sp], [(ri, ro)], lambda_perp=[0.5], lambda_G=[0.0], outs=[buf])
    torch.testing.assert_close(buf, before + (K - PK), rtol=0, atol=1e-11 * float(K.abs().max()))
    assert rel(e_perp[0], (K - PK).square().sum()) < 1e-10


def test_penalty_decay_on_a_band_limited_field_is_one_float32_pass(gen, monkeypatch):
    """``decay_`` on a steerable conv between band-limited fields (one field mixing all its irreps, the
    factorised route): equal to ``W - rate (W - P W)`` in float64, written into the weight's own
    storage, and no float64 tensor and no tensor of the weight's size other than the weight itself is
    made on the way; ``backward`` into ``.grad`` equals ``2 (W - P W)`` added to it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from equiproj.nn import ProjectionPenalty, declare

    G = ep.SO2()
    field = ep.Rep.parse(G, "0 + 1 + 2 + 3")
    field = field.change_basis(random_orthogonal(field.dim, gen))
    rep = 3 * field
    sp = default_kernel_space(G, 5)
    conv = declare(torch.nn.Conv2d(rep.dim, rep.dim, 5, bias=False), rep, rep, kernel_space=sp)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    penalty = ProjectionPenalty(conv, lambda_perp=1.0)
    dense = DenseKernelBasis(sp, rep, rep)
    W0 = conv.weight.detach().double().clone()
    PW = dense.project(W0)
    penalty.decay_(0.01)  # plans and caches are built here
    W0 = conv.weight.detach().double().clone()
    PW = dense.project(W0)

    made = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    made.append((str(func), t.dtype, t.numel(), t.untyped_storage().data_ptr()))
            return out

    ptr = conv.weight.data_ptr()
    passes = []  # the C++ pass over the blocks (an op the dispatch mode does not see)
    run_blocks = _factorised.FactorisedPlan._run_blocks
    monkeypatch.setattr(_factorised.FactorisedPlan, "_run_blocks",
                        lambda self, *a: passes.append(a) or run_blocks(self, *a))
    with Record():
        penalty.decay_(0.3)
    assert conv.weight.data_ptr() == ptr
    torch.testing.assert_close(conv.weight.detach().double(), W0 - 0.3 * (W0 - PW), rtol=0,
                               atol=2e-6 * float(W0.abs().max()))
    # the step ran: as the C++ pass over the blocks, or as the torch route's products (which the recording saw)
    assert len(passes) == 1 if blocks_available() else any("addmm_" in m[0] for m in made)
    assert not [m for m in made if m[1] == torch.float64 and m[2] >= 100], made
    n = conv.weight.numel()
    assert not [m for m in made if m[2] >= n and m[3] != ptr], "a tensor of the weight's size was made"
    W1 = conv.weight.detach().double()
    conv.weight.grad = torch.ones_like(conv.weight)
    penalty.backward()
    torch.testing.assert_close(conv.weight.grad.double(), 1 + 2 * (W1 - dense.project(W1)), rtol=0, atol=1e-5)
