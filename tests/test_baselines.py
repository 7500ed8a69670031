"""The baselines (equiproj.baselines) against the float64 reference and against independent formulas."""

import math

import pytest
import torch

import equiproj
from equiproj import O3, SO2, SO3, Cyclic, Dihedral, FullOctahedral, Octahedral, Rep, reference
from equiproj.baselines import (
    DenseProjector,
    compiled_energies,
    conv_orbit_defects,
    orbit_defects,
    rep_action,
    sampled_conv_penalty,
    sampled_data_penalty,
    sampled_operator_penalty,
    samples_for_relative_error,
    torch_energies,
)
from equiproj.grid import act as grid_act
from equiproj.grid import kernel_rep
from equiproj.testing import all_groups, mixed_reps, nearly_equivariant


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _dense_defects(W, ri, ro, g):
    """||rho_out(g) W - W rho_in(g)||^2 with the dense matrices (independent of the structured action)."""
    return torch.stack([(ro.matrix(x) @ W - W @ ri.matrix(x)).square().sum((-2, -1)) for x in g])


# ---------------------------------------------------------------------------------------
# operator-level penalty, linear layers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", all_groups(), ids=str)
def test_orbit_defects_match_dense_matrices(G):
    gen = _gen(1)
    ri, ro = mixed_reps(G, gen)  # includes tensor products (permuted reps) and a change of basis
    W = torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    g = G.sample(5, gen)
    d = orbit_defects(W, ri, ro, g)
    assert d.shape == (5, 2)
    torch.testing.assert_close(d, _dense_defects(W, ri, ro, g), rtol=1e-12, atol=1e-12)


def test_orbit_defects_noncontiguous_and_float32():
    G = SO3()
    ri, ro = Rep.parse(G, "3x0 + 2x1 + 2"), Rep.parse(G, "2x0 + 3x1 + 2")
    gen = _gen(2)
    Wt = torch.randn(ri.dim, ro.dim, dtype=torch.float64, generator=gen)
    W = Wt.T  # non-contiguous view
    g = G.sample(4, gen)
    ref = _dense_defects(W, ri, ro, g)
    torch.testing.assert_close(orbit_defects(W, ri, ro, g), ref, rtol=1e-12, atol=1e-12)
    d32 = orbit_defects(W.float(), ri, ro, g)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("G", [Cyclic(5), Dihedral(4), Octahedral(), FullOctahedral()], ids=str)
def test_all_elements_give_exactly_twice_e_perp(G):
    """For a finite group the mean over all elements is the Haar average: exactly 2 E_perp."""
    gen = _gen(3)
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(3, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    pen = sampled_operator_penalty(W, ri, ro, elements=G.elements())
    torch.testing.assert_close(pen, 2 * reference.energies(W, ri, ro)[0], rtol=1e-10, atol=0)
    # nearly equivariant: the defect is formed as a difference of nearly equal products but stays accurate
    Wn = nearly_equivariant(W[0], ri, ro, 1e-12, gen)
    pn = sampled_operator_penalty(Wn, ri, ro, elements=G.elements())
    rn = 2 * reference.energies(Wn, ri, ro)[0]
    assert abs(float(pn / rn) - 1) < 1e-3


@pytest.mark.parametrize("G, s_in, s_out", [
    (SO3(), "4x0 + 3x1 + 2x2", "2x0 + 2x1 + 3x2"),
    (O3(), "4x0e + 2x1o + 2x2e + 1e", "3x0e + 2x1o + 2x2e + 0o"),
    (SO2(), "3x0 + 2x1 + 2x2", "2x0 + 3x1 + 3"),
], ids=["SO3", "O3", "SO2"])
def test_sampled_penalty_is_unbiased(G, s_in, s_out):
    """Fixed seed; the sample mean of N draws is within 5 standard errors (estimated from the same
    draws) of 2 E_perp; a wrong estimator (e.g. E_perp, or a missing term) is off by many."""
    gen = _gen(4)
    ri, ro = Rep.parse(G, s_in), Rep.parse(G, s_out)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    N = 4000
    d = orbit_defects(W, ri, ro, G.sample(N, gen))
    exact = 2 * float(reference.energies(W, ri, ro)[0])
    se = float(d.std()) / math.sqrt(N)
    assert abs(float(d.mean()) - exact) < 5 * se
    assert se < 0.05 * exact  # the test has power: 5 se is a few percent of the value


def test_samples_for_relative_error_predicts_the_measured_error():
    """K derived from the variance of draws gives the requested relative RMS error when measured by
    repeated K-sample estimates (fixed seed; band from the sampling error of 400 repeats)."""
    G = O3()
    r = Rep.parse(G, "8x0e + 4x1o + 2x2e")
    gen = _gen(5)
    W = torch.randn(r.dim, r.dim, dtype=torch.float64, generator=gen)
    exact = 2 * float(reference.energies(W, r, r)[0])
    est = samples_for_relative_error(orbit_defects(W, r, r, G.sample(4000, gen)), exact, rel_err=0.05)
    K = est["K"]
    assert K >= 2 and est["draws"] == 4000 and abs(est["rel_bias"]) < 0.05
    R = 400
    means = orbit_defects(W, r, r, G.sample(R * K, gen)).reshape(R, K).mean(1)
    rms = float(((means - exact) / exact).square().mean().sqrt())
    assert 0.05 * 0.8 < rms < 0.05 * 1.25


def test_samples_for_relative_error_scale_invariant_and_errors():
    d = torch.tensor([1.0, 3.0, 2.0, 2.0])
    a = samples_for_relative_error(d, 2.0, 0.01)
    b = samples_for_relative_error(1e-9 * d, 2e-9, 0.01)
    assert a["K"] == b["K"] == math.ceil((float(d.std()) / 0.02) ** 2)
    with pytest.raises(ValueError, match="2 draws"):
        samples_for_relative_error(torch.tensor([1.0]), 1.0)
    with pytest.raises(ValueError, match="exact"):
        samples_for_relative_error(d, 0.0)
    with pytest.raises(ValueError, match="rel_err"):
        samples_for_relative_error(d, 1.0, rel_err=0)


def test_sampled_penalty_gradient():
    G = SO3()
    ri, ro = Rep.parse(G, "2x0 + 1"), Rep.parse(G, "0 + 1 + 2")
    gen = _gen(6)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    g = G.sample(3, gen)
    assert torch.autograd.gradcheck(lambda X: sampled_operator_penalty(X, ri, ro, elements=g), (W,))
    # closed form: d/dW mean ||A W - W B||^2 = mean 2 (A^T D - D B^T), D = A W - W B
    pen = sampled_operator_penalty(W, ri, ro, elements=g)
    (grad,) = torch.autograd.grad(pen, W)
    A, B = ro.matrix(g), ri.matrix(g)
    D = A @ W.detach() - W.detach() @ B
    torch.testing.assert_close(grad, (2 * (A.transpose(-1, -2) @ D - D @ B.transpose(-1, -2))).mean(0))


def test_operator_penalty_errors():
    G = SO3()
    r = Rep.parse(G, "0 + 1")
    with pytest.raises(ValueError, match="shape"):
        orbit_defects(torch.randn(3, 4), r, r, G.sample(1))
    with pytest.raises(TypeError, match="floating"):
        orbit_defects(torch.ones(4, 4, dtype=torch.long), r, r, G.sample(1))
    with pytest.raises(TypeError, match="Rep"):
        orbit_defects(torch.randn(4, 4), "0 + 1", r, G.sample(1))
    with pytest.raises(ValueError, match="same group"):
        orbit_defects(torch.randn(4, 4), r, Rep.parse(O3(), "0e + 1o"), G.sample(1))
    with pytest.raises(ValueError, match="num_samples"):
        sampled_operator_penalty(torch.randn(4, 4), r, r, num_samples=0)
    with pytest.raises(ValueError, match="elements"):
        orbit_defects(torch.randn(4, 4), r, r, G.identity())
    with pytest.raises(ValueError, match="not elements|orthogonal"):
        orbit_defects(torch.randn(4, 4), r, r, -torch.eye(3, dtype=torch.float64)[None])


# ---------------------------------------------------------------------------------------
# operator-level penalty, conv kernels
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("G, k, s_in, s_out", [
    (Cyclic(4), (3, 3), "regular + 0", "2x1 + 0"),
    (Dihedral(4), (4, 4), "regular", "standard + trivial"),
    (Octahedral(), (3, 3, 3), "T1 + A1", "A1 + T2"),
], ids=["C4", "D4-even", "O"])
def test_conv_defects_exact_grid(G, k, s_in, s_out):
    gen = _gen(7)
    ri, ro = Rep.parse(G, s_in), Rep.parse(G, s_out)
    K = torch.randn((2, ro.dim, ri.dim) + k, dtype=torch.float64, generator=gen)
    s = len(k)
    # one element against the explicit grid action: (g.K)(x) = rho_out(g) K(g^-1 x) rho_in(g)^T
    g = G.elements()[1:4]
    d = conv_orbit_defects(K, ri, ro, g)
    spatial = "xyz"[:s]
    ref = []
    for x in g:
        gK = torch.einsum(f"ab,...bc{spatial},dc->...ad{spatial}", ro.matrix(x), grid_act(K, x), ri.matrix(x))
        ref.append((gK - K).square().flatten(-2 - s).sum(-1))
    torch.testing.assert_close(d, torch.stack(ref), rtol=1e-12, atol=1e-12)
    # the average over all elements is 2 E_perp of the flattened kernel (docs/math.md §2, §6)
    full = sampled_conv_penalty(K, ri, ro, elements=G.elements())
    e = reference.energies(K.flatten(-s - 1), ri @ kernel_rep(G, k), ro)[0]
    torch.testing.assert_close(full, 2 * e, rtol=1e-10, atol=0)


@pytest.mark.parametrize("G, s, s_in, s_out", [
    (SO2(), 2, "2x0 + 1", "1 + 2"),
    (Cyclic(8), 2, "regular", "regular"),
    (O3(), 3, "0e + 1o + 2e", "0e + 1o"),
], ids=["SO2", "C8", "O3"])
def test_conv_defects_kernel_space(G, s, s_in, s_out):
    from equiproj.kernel_spaces import default_kernel_space

    gen = _gen(8)
    ri, ro = Rep.parse(G, s_in), Rep.parse(G, s_out)
    sp = default_kernel_space(G, 5, s)
    K = torch.randn((2, ro.dim, ri.dim) + (5,) * s, dtype=torch.float64, generator=gen)
    g = G.sample(3, gen)
    d = conv_orbit_defects(K, ri, ro, g, kernel_space=sp)
    # against the space's orthogonal action on the band coefficients (moved back to kernels: an
    # isometry), plus twice the out-of-band energy
    A, crep = sp.coefficients(K, ri, ro), sp.coefficient_rep(ri)
    inband = sp.kernel(A, ri, ro)
    outside = (K - inband).square().flatten(1).sum(1)
    ref = torch.stack([(sp.kernel(ro.matrix(x) @ A @ crep.matrix(x).T, ri, ro) - inband).square().flatten(1).sum(1)
                       for x in g]) + 2 * outside
    torch.testing.assert_close(d, ref, rtol=1e-11, atol=1e-11)
    # unbiased for 2 E_perp (statistical, fixed seed, 5 standard errors)
    N = 2000
    dd = conv_orbit_defects(inband[0], ri, ro, G.sample(N, gen), kernel_space=sp)
    exact = 2 * float(sp.energies(inband[0], ri, ro)[0])
    assert abs(float(dd.mean()) - exact) < 5 * float(dd.std()) / math.sqrt(N)


def test_conv_penalty_errors():
    from equiproj.kernel_spaces import default_kernel_space

    C8 = Cyclic(8)
    r = C8.regular()
    with pytest.raises(ValueError, match="grid"):  # C8 does not map a square grid onto itself
        sampled_conv_penalty(torch.randn(8, 8, 3, 3), r, r, num_samples=2)
    with pytest.raises(ValueError, match="c_out"):
        sampled_conv_penalty(torch.randn(8, 7, 5, 5), r, r, num_samples=2, kernel_space=default_kernel_space(C8, 5))
    with pytest.raises(ValueError, match="is for"):
        sp = default_kernel_space(SO2(), 5)
        sampled_conv_penalty(torch.randn(8, 8, 5, 5), r, r, num_samples=2, kernel_space=sp)
    with pytest.raises(TypeError, match="kernel space"):
        sampled_conv_penalty(torch.randn(8, 8, 5, 5), r, r, num_samples=2, kernel_space=object())


# ---------------------------------------------------------------------------------------
# data-level penalty
# ---------------------------------------------------------------------------------------
def test_data_penalty_of_a_linear_model_is_twice_e_perp():
    """f(x) = W x with inputs whose second moment is exactly the identity (X^T X = B I): the
    data-level penalty over all elements of a finite group equals ||.||-average = 2 E_perp."""
    G = Octahedral()
    ri, ro = mixed_reps(G, _gen(9))
    gen = _gen(10)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    B = 2 * ri.dim
    Q, _ = torch.linalg.qr(torch.randn(B, ri.dim, dtype=torch.float64, generator=gen))
    X = math.sqrt(B) * Q  # X^T X = B I
    model = torch.nn.Linear(ri.dim, ro.dim, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    pen = sampled_data_penalty(model, X, G, act_in=ri, act_out=ro, elements=G.elements())
    torch.testing.assert_close(pen, 2 * reference.energies(W, ri, ro)[0], rtol=1e-10, atol=0)
    # differentiable w.r.t. the model's parameters; fx= reuses a forward pass
    pen2 = sampled_data_penalty(model, X, G, act_in=ri, act_out=ro, elements=G.elements(), fx=model(X))
    pen2.backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
    # an equivariant model has penalty 0
    with torch.no_grad():
        model.weight.copy_(reference.project(W, ri, ro))
    assert float(sampled_data_penalty(model, X, G, act_in=ri, act_out=ro, num_samples=3, generator=gen).detach()) < 1e-20


def test_data_penalty_grid_action_and_errors():
    """Callables for fields on a grid (a C4-equivariant conv built by averaging is penalty-free)."""
    G = Cyclic(4)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():  # average the kernel over the rotations: an equivariant (scalar -> scalar) conv
        w = conv.weight
        conv.weight.copy_(sum(torch.rot90(w, k, dims=(-1, -2)) for k in range(4)) / 4)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=_gen(11))
    act = lambda g, t: grid_act(t, g)  # noqa: E731
    assert float(sampled_data_penalty(conv, x, G, act_in=act, act_out=act, elements=G.elements()).detach()) < 1e-20
    with pytest.raises(TypeError, match="callables"):
        sampled_data_penalty(conv, x, G, act_in=3, act_out=act)
    with pytest.raises(TypeError, match="Group"):
        sampled_data_penalty(conv, x, "C4", act_in=act, act_out=act)
    with pytest.raises(ValueError, match="rep.dim"):
        rep_action(Rep.parse(SO3(), "1"))(SO3().identity(), torch.randn(2, 4))


# ---------------------------------------------------------------------------------------
# dense projector
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", all_groups(), ids=str)
@pytest.mark.parametrize("method", ["nullspace", "irreps"])
def test_dense_projector_matches_reference(G, method):
    gen = _gen(12)
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    if method == "nullspace" and ro.dim * ri.dim > DenseProjector.MAX_NULLSPACE_DIM:
        pytest.skip("too large for the null-space build")
    d = DenseProjector(ri, ro, method=method, dtype=torch.float64)
    N, D = DenseProjector.size(ri, ro)
    assert d.Q.shape == (N, D) and d.nbytes == N * D * 8 and d.build_seconds >= 0 and d.method == method
    torch.testing.assert_close(d.Q.T @ d.Q, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-10)
    ep, eg = d.energies(W)
    torch.testing.assert_close(ep, reference.energies(W, ri, ro)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eg, reference.energies(W, ri, ro)[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.project(W), reference.project(W, ri, ro), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.project(W, which="non_equivariant"), W - reference.project(W, ri, ro), rtol=1e-10, atol=1e-12)
    # nearly equivariant weights keep relative accuracy (residual form)
    Wn = nearly_equivariant(W[0], ri, ro, 1e-12, gen)
    assert abs(float(d.energies(Wn)[0] / reference.energies(Wn, ri, ro)[0]) - 1) < 1e-3


def test_dense_projector_float32_gradient_and_errors():
    G = O3()
    r = Rep.parse(G, "4x0e + 2x1o + 2e")
    d = DenseProjector(r, r)  # auto: nullspace for this size, float32
    assert d.Q.dtype == torch.float32 and d.method == "nullspace"
    W = torch.randn(r.dim, r.dim, requires_grad=True)
    (g,) = torch.autograd.grad(d.energies(W)[0], W)
    torch.testing.assert_close(g, 2 * equiproj.project(W.detach(), r, r, which="non_equivariant"), rtol=1e-4, atol=1e-5)
    with pytest.raises(MemoryError, match="GiB"):
        DenseProjector(r, r, max_bytes=16)
    with pytest.raises(ValueError, match="method"):
        DenseProjector(r, r, method="qr")
    with pytest.raises(ValueError, match="shape"):
        d.energies(torch.randn(3, 3))
    big = Rep.parse(G, "40x0e + 20x1o")
    with pytest.raises(ValueError, match="too large"):
        DenseProjector(big, big, method="nullspace")


# ---------------------------------------------------------------------------------------
# pure-torch path and torch.compile
# ---------------------------------------------------------------------------------------
def test_torch_energies_and_compiled():
    G = SO2()
    ri, ro = Rep.parse(G, "2x0 + 1"), Rep.parse(G, "0 + 1 + 2")
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=_gen(13))
    ep, eg = torch_energies(W, ri, ro)
    torch.testing.assert_close(ep, reference.energies(W, ri, ro)[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eg, reference.energies(W, ri, ro)[1], rtol=1e-10, atol=1e-12)
    fn = compiled_energies(ri, ro, backend="eager")  # the dynamo graph capture, without inductor's compile time
    cp, cg = fn(W)
    torch.testing.assert_close(cp, ep)
    torch.testing.assert_close(cg, eg)
