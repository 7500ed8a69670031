"""The spectral energies and projection against the float64 spatial reference (docs/math.md §2-5).

Tolerances (relative, unless stated):
  float64 random W:                      1e-10
  float64 nearly equivariant (1e-12):    1e-3 on E_perp
  float32 nearly equivariant (1e-7):     1e-3 on E_perp (vs the reference on the same float32 W)
  float32 / float16 / bfloat16 random W: 1e-5 (accumulation is float32; the reference sees the rounded W)
"""

import pytest
import torch

import equiproj as ep
from equiproj import reference
from equiproj.testing import mixed_reps, nearly_equivariant, random_orthogonal
from equiproj.testing import relative_error as rel

GROUPS = [ep.Cyclic(5), ep.Cyclic(8), ep.Dihedral(4), ep.Dihedral(6), ep.SO2(), ep.O2(), ep.SO3(), ep.O3(),
          ep.Octahedral(), ep.FullOctahedral()]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND = "torch"  # the pure-torch spectral path; the fused backends have their own tests


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_spectral_equals_reference(G, gen):
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(3, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    e_perp, e_g = ep.energies(W, ri, ro, backend=BACKEND)
    assert e_perp.shape == (3,) and e_perp.dtype == torch.float64
    PW = reference.project(W, ri, ro)
    assert rel(e_perp, (W - PW).square().sum((-2, -1))) < 1e-10
    assert rel(e_g, PW.square().sum((-2, -1))) < 1e-10
    torch.testing.assert_close(ep.project(W, ri, ro), PW, atol=1e-12 * float(W.abs().max()), rtol=0)
    # Pythagoras
    assert rel(e_perp + e_g, W.square().sum((-2, -1))) < 1e-12
    # orbit identity: ∫ ||rho_out W - W rho_in||^2 = 2 E_perp
    assert rel(reference.orbit_defect(W, ri, ro), 2 * e_perp) < 1e-10


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_projection_properties(G, gen):
    ri, ro = mixed_reps(G, gen)
    X, Y = (torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen) for _ in range(2))
    PX, PY = ep.project(X, ri, ro), ep.project(Y, ri, ro)
    torch.testing.assert_close(ep.project(PX, ri, ro), PX, atol=1e-12, rtol=0)  # idempotent
    assert abs(float((PX * Y).sum() - (X * PY).sum())) < 1e-11 * float(X.norm() * Y.norm())  # self-adjoint
    g = G.sample(5, generator=gen)
    torch.testing.assert_close(ro.matrix(g) @ PX, PX @ ri.matrix(g), atol=1e-11, rtol=0)  # equivariant
    torch.testing.assert_close(ep.project(X, ri, ro, which="non_equivariant") + PX, X, atol=1e-12, rtol=0)


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_equivariant_maps_have_zero_energy(G, gen):
    """Maps made equivariant by averaging over the group (element sum / exact quadrature),
    independently of the spectral code, have E_perp = 0 to rounding."""
    ri, ro = mixed_reps(G, gen)
    X = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    if G.is_finite:
        g = G.elements()
        W = (ro.matrix(g) @ X @ ri.matrix(g).transpose(-1, -2)).mean(0)
    else:
        W = reference.project(X, ri, ro)
    e_perp, e_g = ep.energies(W, ri, ro, backend=BACKEND)
    assert float(e_perp) < 1e-25 * float(W.square().sum())
    assert rel(e_g, W.square().sum()) < 1e-12


@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_nearly_equivariant_weights(G, gen):
    ri, ro = mixed_reps(G, gen)
    X = torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    W64 = nearly_equivariant(X, ri, ro, 1e-12, gen)
    ratio = reference.energies(W64, ri, ro)[0] / W64.square().sum((-2, -1))
    assert float(ratio.max()) < 1e-11  # the test input is what it claims to be
    assert rel(ep.energies(W64, ri, ro, backend=BACKEND)[0], reference.energies(W64, ri, ro)[0]) < 1e-3
    W32 = nearly_equivariant(X, ri, ro, 1e-7, gen).float()
    ref32 = reference.energies(W32.double(), ri, ro)[0]
    assert float((ref32 / W32.double().square().sum((-2, -1))).max()) < 1e-6
    assert rel(ep.energies(W32, ri, ro, backend=BACKEND)[0].double(), ref32) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype, device, gen):
    G = ep.O3()
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(2, ro.dim, ri.dim, generator=gen).to(dtype)
    e_perp, e_g = ep.energies(W.to(device), ri, ro, backend=BACKEND)
    assert e_perp.dtype == torch.float32 and e_perp.device.type == device
    assert rel(e_perp.cpu().double(), reference.energies(W.double(), ri, ro)[0]) < 1e-5
    assert rel(e_g.cpu().double(), reference.energies(W.double(), ri, ro)[1]) < 1e-5
    assert ep.project(W.to(device), ri, ro).dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_odd_noncontiguous_and_batched(device, gen):
    G = ep.SO2()
    ri = ep.Rep.parse(G, "3x0 + 1 + 2x3") @ ep.Rep.parse(G, "0 + 2")  # permuted layout
    ro = ep.Rep.parse(G, "1 + 0 + 5")
    base = torch.randn(ri.dim + 3, 2, ro.dim + 1, 3, dtype=torch.float64, generator=gen)
    W = base[1:-2, 1, :-1, :].permute(2, 1, 0)  # [3, m, n], non-contiguous strides
    assert not W.is_contiguous() and W.shape == (3, ro.dim, ri.dim)
    got = ep.energies(W.to(device), ri, ro, backend=BACKEND)[0].cpu()
    assert rel(got, reference.energies(W, ri, ro)[0]) < 1e-10
    W4 = torch.randn(2, 3, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    got4 = ep.energies(W4.to(device), ri, ro, backend=BACKEND)[1].cpu()
    assert got4.shape == (2, 3)
    assert rel(got4, reference.energies(W4, ri, ro)[1]) < 1e-10


def test_gradients(gen):
    G = ep.Cyclic(6)
    ri, ro = ep.Rep.parse(G, "0 + 2x1 + 3"), G.regular().change_basis(random_orthogonal(6, gen))
    W = torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    for i in (0, 1):
        assert torch.autograd.gradcheck(lambda w: ep.energies(w, ri, ro, backend=BACKEND)[i], (W,))
    assert torch.autograd.gradcheck(lambda w: ep.project(w, ri, ro), (W,))
    (gp,) = torch.autograd.grad(ep.energies(W, ri, ro, backend=BACKEND)[0].sum(), W)
    PW = reference.project(W.detach(), ri, ro)
    torch.testing.assert_close(gp, 2 * (W.detach() - PW), atol=1e-12, rtol=0)
    (gg,) = torch.autograd.grad(ep.energies(W, ri, ro, backend=BACKEND)[1].sum(), W)
    torch.testing.assert_close(gg, 2 * PW, atol=1e-12, rtol=0)


def test_breakdown(gen):
    G = ep.O3()
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    bp = ep.energy_breakdown(W, ri, ro)
    bg = ep.energy_breakdown(W, ri, ro, which="equivariant")
    assert set(bp) == {(a, b) for a, _ in ro.irreps for b, _ in ri.irreps}
    assert all(a == b for a, b in bg)
    assert rel(sum(bp.values()), reference.energies(W, ri, ro)[0]) < 1e-10
    assert rel(sum(bg.values()), reference.energies(W, ri, ro)[1]) < 1e-10
    # a block between different irreps is entirely non-equivariant: its energy is that of W_hat's block
    Qo, Qi = ro.change_of_basis, ri.change_of_basis
    Wh = Qo.T @ W @ Qi
    (a, ma), (b, mb) = ro.irreps[0], ri.irreps[1]
    assert a != b
    oo = sum(i.dim * m for i, m in ro.irreps[:0])
    oi = sum(i.dim * m for i, m in ri.irreps[:1])
    blk = Wh[oo : oo + a.dim * ma, oi : oi + b.dim * mb]
    assert rel(bp[(a, b)], blk.square().sum()) < 1e-10


def test_worst_case_defect_bound(gen):
    """||W - PW|| <= max_g ||rho_out W - W rho_in|| <= 2 ||W - PW||  (docs/math.md §2; exact max for a finite group)."""
    G = ep.FullOctahedral()
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    g = G.elements()
    sup = (ro.matrix(g) @ W - W @ ri.matrix(g)).square().sum((-2, -1)).sqrt().max()
    res = ep.energies(W, ri, ro)[0].sqrt()
    assert res <= sup * (1 + 1e-12) and sup <= 2 * res * (1 + 1e-12)


def test_disjoint_reps():
    G = ep.SO3()
    ri, ro = ep.Rep.parse(G, "2x0 + 2"), ep.Rep.parse(G, "3x1")
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64)
    e_perp, e_g = ep.energies(W, ri, ro)
    assert float(e_g) == 0.0 and rel(e_perp, W.square().sum()) < 1e-14


def test_energies_many():
    G = ep.SO3()
    pairs = [(ep.Rep.parse(G, "2x0 + 1"), ep.Rep.parse(G, "0 + 2x1")), (ep.Rep.parse(G, "1 + 2"), ep.Rep.parse(G, "3x2"))]
    Ws = [torch.randn(ro.dim, ri.dim, dtype=torch.float64, requires_grad=True) for ri, ro in pairs]
    ep_, eg = ep.energies_many(Ws, pairs)
    assert ep_.shape == (2,)
    for i, (W, (ri, ro)) in enumerate(zip(Ws, pairs)):
        assert rel(ep_[i], reference.energies(W.detach(), ri, ro)[0]) < 1e-10
        assert rel(eg[i], reference.energies(W.detach(), ri, ro)[1]) < 1e-10
    with pytest.raises(ValueError, match="2 weights but 1"):
        ep.energies_many(Ws, pairs[:1])


def test_bad_input():
    G = ep.SO3()
    r = ep.Rep.parse(G, "0 + 1")
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 4\]"):
        ep.energies(torch.randn(4, 5), r, r)[0]
    with pytest.raises(ValueError, match="same group"):
        ep.energies(torch.randn(4, 4), r, ep.Rep.parse(ep.O3(), "0e + 1o"))[0]
    with pytest.raises(TypeError, match="floating"):
        ep.energies(torch.ones(4, 4, dtype=torch.long), r, r)[0]
    with pytest.raises(TypeError, match="torch.Tensor"):
        ep.energies([[0.0] * 4] * 4, r, r)[0]
    with pytest.raises(TypeError, match="Rep"):
        ep.energies(torch.randn(4, 4), [0, 1], r)
    with pytest.raises(TypeError, match="no group is known"):
        ep.energies(torch.randn(4, 4), "0 + 1", "0 + 1")
    W = torch.randn(4, 4)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ep.energies(W, r, r)[0]


def test_torch_compile_fullgraph_matches_eager(gen):
    """The plan is looked up at trace time, not traced: equal-but-distinct reps (two regular reps)
    and fields with a change of basis (a tensor product) give the eager energies and gradients."""
    torch._dynamo.reset()
    cases = [(ep.Cyclic(4).regular(), ep.Cyclic(4).regular()),
             (ep.SO3().irrep(1) @ ep.SO3().irrep(1), ep.Rep.parse(ep.SO3(), "0 + 1"))]
    for ri, ro in cases:
        W = torch.randn(ro.dim, ri.dim, generator=gen, requires_grad=True)

        def loss(w):
            e_perp, e_g = ep.energies(w, ri, ro, backend=BACKEND)
            return e_perp + 0.5 * e_g

        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        (g_eager,) = torch.autograd.grad(loss(W), W)
        value = compiled(W)
        (g_comp,) = torch.autograd.grad(value, W)
        assert rel(value, loss(W)) < 1e-6
        torch.testing.assert_close(g_comp, g_eager, atol=1e-6, rtol=1e-6)


def test_torch_compile_before_any_eager_call(gen):
    """A rep pair whose plan no eager call has used yet: the plan's rows are read when the plan is
    looked up, not traced (tracing ``meta.tolist()`` failed with unbacked sizes)."""
    torch._dynamo.reset()
    G = ep.SO3()
    ri, ro = ep.Rep.parse(G, "5x0 + 3x1 + 3"), ep.Rep.parse(G, "2x0 + 4x1 + 2x3")
    ri = ri.change_basis(random_orthogonal(ri.dim, gen))
    W = torch.randn(ro.dim, ri.dim, generator=gen, requires_grad=True)

    def loss(w):
        e_perp, e_g = ep.energies(w, ri, ro, backend=BACKEND)
        return e_perp + 0.5 * e_g

    value = torch.compile(loss, backend="aot_eager", fullgraph=True)(W)  # first: nothing cached eagerly
    (g_comp,) = torch.autograd.grad(value, W)
    (g_eager,) = torch.autograd.grad(loss(W), W)
    assert rel(value, loss(W)) < 1e-6
    torch.testing.assert_close(g_comp, g_eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_overflow_of_finite_weights_is_told_apart_from_nan(backend):
    """Finite float32 weights whose energy exceeds float32 (3e19^2 > 3.4e38) get a message that says
    so and suggests float64; weights that hold NaN/Inf are named as such."""
    if backend == "cpp" and not ep.ops.cpp_available():
        pytest.skip("the C++ extension equiproj._C is not built")
    G = ep.SO3()
    r = ep.Rep.parse(G, "2x0 + 1")
    W = torch.full((r.dim, r.dim), 3e19)
    assert bool(torch.isfinite(W).all())
    with pytest.raises(ValueError, match="overflowed float32") as e:
        ep.energies(W, r, r, backend=backend)
    assert "float64" in str(e.value) and "NaN" not in str(e.value)
    with pytest.raises(ValueError, match="overflowed float32"):
        ep.energies_and_grad(W, r, r, backend=backend)
    with pytest.raises(ValueError, match="overflowed float32"):
        ep.energies_many([torch.zeros_like(W), W], [(r, r)] * 2, backend=backend)
    e_perp, e_g = ep.energies(W.double(), r, r, backend=backend)  # what the message suggests
    assert rel(e_perp + e_g, W.double().square().sum()) < 1e-12
    W[1, 2] = float("inf")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        ep.energies(W, r, r, backend=backend)
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        ep.energies_many([torch.zeros_like(W), W], [(r, r)] * 2, backend=backend)


def test_many_layers_with_different_batch_shapes_are_refused_up_front(monkeypatch):
    """The energies of many layers are stacked per layer: different batch shapes are named before
    any backend runs."""
    G = ep.SO3()
    r = ep.Rep.parse(G, "2x0 + 1")
    Ws = [torch.randn(3, r.dim, r.dim), torch.randn(3, r.dim, r.dim), torch.randn(2, r.dim, r.dim)]

    def no_work(*args, **kwargs):
        raise AssertionError("a backend ran before the arguments were checked")

    monkeypatch.setattr(ep._energy, "_run_grouped", no_work)
    with pytest.raises(ValueError, match=r"weights\[0\] has batch shape \(3,\), weights\[2\] has \(2,\)"):
        ep.energies_many(Ws, [(r, r)] * 3)
    with pytest.raises(ValueError, match=r"weights\[2\] has \(2,\)"):
        ep.energies_and_grads_many(Ws, [(r, r)] * 3, lambda_perp=[1.0] * 3, lambda_G=[0.0] * 3)
    with pytest.raises(ValueError, match=r"weights\[1\] has \(\)"):
        ep.energies_many([Ws[0], Ws[0][0]], [(r, r)] * 2)


FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("backend", ["auto", "cpp", "torch", "reference"])
def test_unsupported_float_dtypes_are_refused_by_every_backend(dtype, backend):
    """float8 weights are refused up front, alike by every backend and function, naming the
    supported dtypes (the kernels do not compute in float8, and a float8 gradient would lose it)."""
    G = ep.SO3()
    r = ep.Rep.parse(G, "2x0 + 1")
    W = torch.randn(r.dim, r.dim).to(dtype)
    calls = [lambda: ep.energies(W, r, r, backend=backend), lambda: ep.energies(W, r, r, backend=backend)[0],
             lambda: ep.energies(W, r, r, backend=backend)[1], lambda: ep.energies_and_grad(W, r, r, backend=backend),
             lambda: ep.energies_many([W], [(r, r)], backend=backend),
             lambda: ep.energies_and_grads_many([W], [(r, r)], lambda_perp=[1.0], lambda_G=[0.0], backend=backend),
             lambda: ep.project(W, r, r), lambda: ep.energy_breakdown(W, r, r)]
    for call in calls:
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64") as e:
            call()
        assert str(dtype) in str(e.value) and "W.float()" in str(e.value)
