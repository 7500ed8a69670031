"""The fused penalty op ``equiproj::fused_energies`` (equiproj/ops.py) and the backends of the public
functions, against the float64 spatial-domain reference (``equiproj.reference``).

Tolerances:
* energies of the fused CPU op (C++, float64 tiles): relative 1e-10 (float64 W), 1e-6 (float32:
  the output is rounded to float32); the pure-torch twin (float32 arithmetic): 1e-4 relative on
  random float32 weights.
* fused gradients vs autograd of the reference, float32 W: elementwise
  ``2^-23 |g_ref| + 1e-12 max|W|`` (float64 arithmetic, one final rounding).
* gradcheck (float64): torch's defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
The C++ kernel itself (all dtypes, layouts, kernel paths) is tested in test_cpp.py.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import equiproj
import equiproj.testing as verify
from equiproj import ops, reference
from equiproj._plan import block_plan, plan_for
from equiproj.groups import Rep
from equiproj.testing import relative_error as rel

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension equiproj._C is not built")


def _so2_permuted(gen):
    G = equiproj.SO2()  # complex-type irreps; a tensor product of sums (a permutation)
    return Rep.parse(G, "0 + 1") @ Rep.parse(G, "1 + 2"), Rep.parse(G, "2x0 + 3x1 + 2")


def _so3_fields(gen):
    G = equiproj.SO3()
    return Rep.parse(G, "3x0 + 2x1 + 2"), Rep.parse(G, "2x0 + 1 + 3x2")


def _dense(gen):
    G = equiproj.Cyclic(5)  # a dense change of basis
    a = G.regular() + G.standard()
    return a.change_basis(verify.random_orthogonal(a.dim, gen)), Rep.parse(G, "2x0 + 1 + 2")


CASES = {"so2_permuted": _so2_permuted, "so3_fields": _so3_fields, "dense": _dense}


def _ref_energies(W, ri, ro):
    W64 = W.detach().double()
    PW = reference.project(W64, ri, ro)
    return (W64 - PW).square().sum((-2, -1)), PW.square().sum((-2, -1))


class CountOps(TorchDispatchMode):
    """Counts calls of the fused op ``equiproj::fused_energies`` (forward and backward), eager or
    under torch.compile."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.equiproj.fused_energies.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


# ---- backend selection ---------------------------------------------------------------------
@needs_cpp
def test_auto_takes_cpp_on_cpu_and_env_overrides(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpp"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float64) == "cpp"
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert ops.resolve_backend("cpp", torch.device("cpu"), torch.float32) == "cpp"  # explicit wins
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    ri, ro = _so3_fields(None)
    W = torch.randn(ro.dim, ri.dim)
    calls = []
    monkeypatch.setattr(equiproj.reference, "energies", lambda *a, _f=equiproj.reference.energies: calls.append(1) or _f(*a))
    equiproj.energies(W, ri, ro)
    assert calls  # the reference ran
    monkeypatch.setenv(ops.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="EQUIPROJ_BACKEND"):
        equiproj.energies(W, ri, ro)
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        equiproj.energies(W, ri, ro)


def test_bad_backend_and_device():
    ri, ro = _so3_fields(None)
    W = torch.randn(ro.dim, ri.dim)
    with pytest.raises(ValueError, match="unknown backend"):
        equiproj.energies(W, ri, ro, backend="gpu")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        equiproj.energies(W, ri, ro, backend="triton")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="runs on CPU tensors"):
            equiproj.energies(W.cuda(), ri, ro, backend="cpp")


def test_missing_extension_falls_back_with_one_warning(monkeypatch, gen):
    """Without the extension, "auto" runs the pure-torch path and warns once how to build it;
    "cpp" raises; the op's CPU kernel runs the pure-torch twin."""
    monkeypatch.setattr(ops._availability, "_cpp_state", {"ok": False, "reason": "ImportError: simulated"})
    monkeypatch.setattr(ops._availability, "_warned", set())
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    ri, ro = _so2_permuted(gen)
    W = torch.randn(ro.dim, ri.dim, generator=gen)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e"):
        e1 = equiproj.energies(W, ri, ro)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e2 = equiproj.energies(W, ri, ro)  # no second warning
    t = equiproj.energies(W, ri, ro, backend="torch")
    assert torch.equal(e1[0], t[0]) and torch.equal(e2[1], t[1])
    with pytest.raises(RuntimeError, match="not available"):
        equiproj.energies(W, ri, ro, backend="cpp")
    rp, rg = _ref_energies(W, ri, ro)
    P = plan_for(ri, ro, "cpu")
    (ep,), (eg,) = ops.fused_energies([W], [P])  # the op's CPU kernel: the twin
    assert rel(ep, rp) < 1e-4 and rel(eg, rg) < 1e-4


# ---- public functions through the op ---------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("case", list(CASES))
def test_public_functions_all_backends(case, gen):
    ri, ro = CASES[case](gen)
    W = torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    rp, rg = _ref_energies(W, ri, ro)
    for backend in ("auto", "cpp", "torch", "reference"):
        ep, eg = equiproj.energies(W, ri, ro, backend=backend)
        assert ep.shape == (2,) and rel(ep, rp) < 1e-10 and rel(eg, rg) < 1e-10, backend
        assert rel(equiproj.energies(W, ri, ro, backend=backend)[0], rp) < 1e-10
        assert rel(equiproj.energies(W, ri, ro, backend=backend)[1], rg) < 1e-10
    W32 = W.float().transpose(-1, -2).contiguous().transpose(-1, -2)
    rp32, rg32 = _ref_energies(W32, ri, ro)
    ep, eg = equiproj.energies(W32, ri, ro, backend="cpp")
    assert ep.dtype == torch.float32 and rel(ep, rp32) < 1e-6 and rel(eg, rg32) < 1e-6


@needs_cpp
def test_nearly_equivariant_float32(gen):
    ri, ro = _so2_permuted(gen)
    W = verify.nearly_equivariant(torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen), ri, ro, 1e-10,
                                  gen).float()
    rp, _ = _ref_energies(W, ri, ro)
    assert float(rp / W.double().square().sum()) < 1e-8
    assert rel(equiproj.energies(W, ri, ro, backend="cpp")[0], rp) < 1e-6


@needs_cpp
def test_energies_many_is_one_op_call_and_matches_reference(gen):
    layers = []
    for k in range(6):
        ri, ro = CASES[list(CASES)[k % 3]](gen)
        dt = (torch.float32, torch.float64, torch.bfloat16)[k % 3]
        layers.append((torch.randn(ro.dim, ri.dim, generator=gen).to(dt).requires_grad_(), (ri, ro)))
    weights, reps = [w for w, _ in layers], [r for _, r in layers]
    with CountOps() as count:
        ep, eg = equiproj.energies_many(weights, reps)
        assert count.calls == 1  # all layers: one op call
        (2.0 * ep.sum() + 0.5 * eg.sum()).backward()
        assert count.calls == 2  # the backward: one more
    assert ep.shape == eg.shape == (6,) and ep.dtype == torch.float64  # float64 layers are among them
    for i, (W, (ri, ro)) in enumerate(layers):
        rp, rg = _ref_energies(W, ri, ro)
        assert rel(ep[i], rp) < 1e-6 and rel(eg[i], rg) < 1e-6
        W64 = W.detach().double().requires_grad_()
        (2.0 * reference.energies(W64, ri, ro)[0] + 0.5 * reference.energies(W64, ri, ro)[1]).backward()
        tol = {torch.float32: 2.0**-22, torch.float64: 1e-12, torch.bfloat16: 2.0**-6}[W.dtype]  # f64: the reference's rounding
        assert float((W.grad.double() - W64.grad).abs().max() / W64.grad.abs().max()) < tol


@needs_cpp
def test_fused_gradients_equal_reference_autograd_float32(gen):
    ri, ro = _so3_fields(gen)
    W = torch.randn(3, ro.dim, ri.dim, generator=gen).requires_grad_()
    ep, eg = equiproj.energies(W, ri, ro, backend="cpp")
    gp, gg = torch.randn(3, generator=gen), torch.randn(3, generator=gen)  # per-matrix incoming gradients
    ((gp * ep).sum() + (gg * eg).sum()).backward()
    W64 = W.detach().double().requires_grad_()
    ((gp.double() * reference.energies(W64, ri, ro)[0]).sum() + (gg.double() * reference.energies(W64, ri, ro)[1]).sum()).backward()
    bound = 2.0**-23 * W64.grad.abs() + 1e-12 * W64.detach().abs().max()
    assert bool(((W.grad.double() - W64.grad).abs() <= bound).all())
    # only E_perp used: the unused output's gradient counts as zero
    W.grad = None
    equiproj.energies(W, ri, ro, backend="cpp")[0].sum().backward()
    PW = reference.project(W64.detach(), ri, ro)
    assert float((W.grad.double() - 2 * (W64.detach() - PW)).abs().max()) < 1e-5


def _ref_penalty_grad(W, ri, ro, lp, lg):
    """Energies and autograd gradient of ``sum lp E_perp + lg E_G`` through the float64 reference."""
    W64 = W.detach().double().requires_grad_()
    ep, eg = reference.energies(W64, ri, ro)[0], reference.energies(W64, ri, ro)[1]
    (torch.as_tensor(lp, dtype=torch.float64) * ep + torch.as_tensor(lg, dtype=torch.float64) * eg).sum().backward()
    return ep.detach(), eg.detach(), W64.grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
def test_energies_and_grad_matches_reference_autograd(backend, case, gen):
    """One pass, no graph: energies and the penalty's gradient; batched W with per-matrix lambdas,
    non-contiguous, float64 / float32 / bfloat16, nearly equivariant."""
    if backend == "cpp" and not ops.cpp_available():
        pytest.skip("the C++ extension equiproj._C is not built")
    ri, ro = CASES[case](gen)
    base = torch.randn(3, ri.dim, ro.dim, dtype=torch.float64, generator=gen)
    lp, lg = torch.rand(3, generator=gen, dtype=torch.float64), 0.25
    for dt, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        W = base.to(dt).transpose(-1, -2)  # non-contiguous
        ep, eg, g = equiproj.energies_and_grad(W, ri, ro, lambda_perp=lp, lambda_G=lg, backend=backend)
        rp, rg, rgrad = _ref_penalty_grad(W, ri, ro, lp, lg)
        assert ep.shape == eg.shape == (3,) and g.shape == W.shape and g.dtype == dt and not g.requires_grad
        assert rel(ep, rp) < tol and rel(eg, rg) < tol, (backend, dt)
        assert float((g.double() - rgrad).abs().max() / rgrad.abs().max()) < tol, (backend, dt)
    # nearly equivariant (E_perp / ||W||^2 ~ 1e-10): relative accuracy of E_perp and of W - P W
    W = verify.nearly_equivariant(base[0].T.contiguous(), ri, ro, 1e-10, gen)
    ep, _, g = equiproj.energies_and_grad(W, ri, ro, backend=backend)  # lambda_perp=1, lambda_G=0
    rp, _, rgrad = _ref_penalty_grad(W, ri, ro, 1.0, 0.0)
    assert float(rp / W.square().sum()) < 1e-8
    assert rel(ep, rp) < 1e-6 and float((g - rgrad).abs().max() / rgrad.abs().max()) < 1e-6


@needs_cpp
def test_energies_and_grads_many_is_one_op_call(gen):
    layers = [(torch.randn(ro.dim, ri.dim, generator=gen), (ri, ro)) for ri, ro in (f(gen) for f in CASES.values())]
    weights, reps = [w for w, _ in layers], [r for _, r in layers]
    lp, lg = [0.5, 1.0, 2.0], [0.0, 0.1, 0.0]
    with CountOps() as count:
        ep, eg, grads = equiproj.energies_and_grads_many(weights, reps, lambda_perp=lp, lambda_G=lg)
    assert count.calls == 1 and ep.shape == eg.shape == (3,)
    for i, (W, (ri, ro)) in enumerate(layers):
        rp, rg, rgrad = _ref_penalty_grad(W, ri, ro, lp[i], lg[i])
        assert rel(ep[i], rp) < 1e-6 and rel(eg[i], rg) < 1e-6
        assert float((grads[i].double() - rgrad).abs().max() / rgrad.abs().max()) < 1e-6


def test_energies_and_grad_bad_inputs():
    ri, ro = _so3_fields(None)
    W = torch.randn(2, ro.dim, ri.dim)
    with pytest.raises(ValueError, match="lambda_perp.*finite"):
        equiproj.energies_and_grad(W, ri, ro, lambda_perp=float("nan"))
    with pytest.raises(ValueError, match="broadcastable"):
        equiproj.energies_and_grad(W, ri, ro, lambda_perp=torch.ones(3))
    with pytest.raises(TypeError, match="lambda_G.*number or a tensor"):
        equiproj.energies_and_grad(W, ri, ro, lambda_G="0.1")
    with pytest.raises(ValueError, match="one of each per layer"):
        equiproj.energies_and_grads_many([W], [(ri, ro)], lambda_perp=[1.0, 2.0], lambda_G=[0.0])
    with pytest.raises(ValueError, match="shape"):
        equiproj.energies_and_grad(W.transpose(-1, -2), ri, ro)
    with pytest.raises(ValueError, match="not finite"):
        equiproj.energies_and_grad(torch.full((ro.dim, ri.dim), float("nan")), ri, ro)


@needs_cpp
def test_gradcheck_through_the_op(gen):
    for case in ("so2_permuted", "dense"):
        ri, ro = CASES[case](gen)
        W = torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(lambda w: equiproj.energies(w, ri, ro, backend="cpp"), (W,))
    ri, ro = _so3_fields(gen)
    A = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    B = torch.randn(ri.dim, ro.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: equiproj.energies_many([a, b], [(ri, ro), (ro, ri)]), (A, B))


@needs_cpp
def test_double_backward_is_refused():
    ri, ro = _so3_fields(None)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, requires_grad=True)
    e = equiproj.energies(W, ri, ro, backend="cpp")[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(e, W, create_graph=True)


def test_opcheck(gen):
    """Schema, fake (meta) implementation, autograd registration, and dispatch of the op; also
    with the extension missing (the twin) where it is built."""
    ri, ro = _so2_permuted(gen)
    P = plan_for(ri, ro, "cpu")
    ri2, ro2 = _so3_fields(gen)
    P2 = plan_for(ri2, ro2, "cpu")
    W1 = torch.randn(2, ro.dim, ri.dim, generator=gen, requires_grad=True)
    W2 = torch.randn(ro2.dim, ri2.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    args = lambda c: ([W1, W2], [P.meta, P2.meta], [P.basis, P2.basis], [P.perm_out, P2.perm_out],  # noqa: E731
                      [P.perm_in, P2.perm_in], *c)
    torch.library.opcheck(torch.ops.equiproj.fused_energies, args(([], [], [], False)))
    c = ([torch.rand(2), torch.rand(())], [torch.rand(2), torch.rand((), dtype=torch.float64)])
    # with coefficients (the backward's form): gradients written into, or added to, given tensors
    with torch.no_grad():
        for accumulate in (False, True):
            grads = [torch.randn(W1.shape), torch.randn(W2.shape, dtype=torch.float64)]
            torch.library.opcheck(torch.ops.equiproj.fused_energies, args((*c, grads, accumulate)),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_twin_with_per_matrix_coefficients_matches_reference(gen):
    """The op's default implementation (the pure-torch twin of equiproj.kernels, also the CUDA
    fallback) with batched weights and per-matrix coefficients: each matrix becomes its own entry."""
    ri, ro = _so2_permuted(gen)
    P = plan_for(ri, ro, "cpu")
    W = torch.randn(3, 2, ro.dim, ri.dim, generator=gen)
    cp, cg = torch.rand(3, 2, generator=gen), torch.rand(3, 2, generator=gen)
    g = torch.empty_like(W)
    ep, eg = ops._op._twin_kernel([W], [P.meta], [P.basis], [P.perm_out], [P.perm_in], [cp], [cg], [g], False)
    ep, eg = ep.reshape(3, 2), eg.reshape(3, 2)
    W64 = W.double()
    PW = reference.project(W64, ri, ro)
    assert rel(ep, (W64 - PW).square().sum((-2, -1))) < 1e-4 and rel(eg, PW.square().sum((-2, -1))) < 1e-4
    g_ref = 2 * cp.double()[..., None, None] * (W64 - PW) + 2 * cg.double()[..., None, None] * PW
    assert g.shape == W.shape and float((g.double() - g_ref).abs().max()) < 1e-4 * float(g_ref.abs().max())


@needs_cpp
def test_deterministic(gen):
    ri, ro = _so3_fields(gen)
    W = torch.randn(4, ro.dim, ri.dim, generator=gen, requires_grad=True)
    a = equiproj.energies(W, ri, ro)
    a[0].sum().backward()
    ga = W.grad.clone()
    W.grad = None
    b = equiproj.energies(W, ri, ro)
    b[0].sum().backward()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(ga, W.grad)


def test_bad_inputs():
    ri, ro = _so3_fields(None)
    W = torch.randn(ro.dim, ri.dim)
    with pytest.raises(TypeError, match="torch.Tensor"):
        equiproj.energies(W.numpy(), ri, ro)
    with pytest.raises(TypeError, match="floating-point"):
        equiproj.energies(W.long(), ri, ro)
    with pytest.raises(ValueError, match="shape"):
        equiproj.energies(W.T, ri, ro)
    with pytest.raises(ValueError, match="NaN"):
        equiproj.energies(torch.full_like(W, float("nan")), ri, ro)
    with pytest.raises(ValueError, match="rep pairs"):
        equiproj.energies_many([W, W], [(ri, ro)])
    with pytest.raises(TypeError, match="pair"):
        equiproj.energies_many([W], [ri])
    P = plan_for(ri, ro, "cpu")
    with pytest.raises(TypeError, match="PackedPlan"):
        ops.fused_energies([W], [block_plan(ri, ro)])
    with pytest.raises(ValueError, match="shape"):
        ops.fused_energies([W[:, :-1]], [P])
    with pytest.raises(TypeError, match="dtype"):
        ops.fused_energies([W.to(torch.complex64)], [P])


# ---- the CUDA kernel registration (Triton) --------------------------------------------------------
def _triton_runs():
    k = ops._availability.triton_kernels()
    return k is not None and k.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@needs_cpp
@pytest.mark.skipif(not _triton_runs(), reason="needs triton and a GPU, or TRITON_INTERPRET=1")
def test_cuda_registration_matches_cpp(gen):
    """The op's CUDA kernel (equiproj.kernels.fused_energies behind the op: plan objects passed
    back, batched weights split per matrix for per-matrix coefficients) equals the C++ kernel.
    With a GPU through the public functions; without one, the registered function itself runs the
    Triton kernel in the interpreter on CPU tensors (small shapes)."""
    ri, ro = _so2_permuted(gen)
    W = torch.randn(2, ro.dim, ri.dim, generator=gen)
    W2 = torch.randn(ro.dim, ri.dim, generator=gen)
    cp, cg = [torch.rand(2, generator=gen), torch.rand((), generator=gen)], [torch.rand(2, generator=gen), torch.rand(())]
    P = plan_for(ri, ro, "cpu")
    grads = [torch.empty_like(W), torch.empty_like(W2)]
    ep_w, eg_w = torch.ops.equiproj.fused_energies([W, W2], [P.meta] * 2, [P.basis] * 2, [P.perm_out] * 2,
                                                   [P.perm_in] * 2, cp, cg, grads, False)
    want = (ops.split_energies([W, W2], ep_w), ops.split_energies([W, W2], eg_w), grads)
    if torch.cuda.is_available():
        Wc = W.cuda().requires_grad_()
        ep, eg = equiproj.energies(Wc, ri, ro, backend="triton")
        ((cp[0].cuda() * ep).sum() + (cg[0].cuda() * eg).sum()).backward()
        got = ([ep.cpu()], [eg.cpu()], [Wc.grad.cpu()])
        one_pass = equiproj.energies_and_grad(W.cuda(), ri, ro, lambda_perp=cp[0].cuda(), lambda_G=cg[0].cuda(),
                                              backend="triton")
        torch.testing.assert_close(one_pass[2].cpu(), got[2][0], rtol=1e-5, atol=1e-6)
        want = ([want[0][0]], [want[1][0]], [want[2][0]])
    else:
        Pt = block_plan(ri, ro).packed("cpu", torch.float32)  # what the Triton kernel reads
        ops._op._remember([Pt])
        got_grads = [torch.empty_like(W), torch.empty_like(W2)]
        ep_g, eg_g = ops._op._cuda_kernel([W, W2], [Pt.meta] * 2, [Pt.basis] * 2, [Pt.perm_out] * 2, [Pt.perm_in] * 2,
                                          cp, cg, got_grads, False)
        got = (ops.split_energies([W, W2], ep_g), ops.split_energies([W, W2], eg_g), got_grads)
        # what the dispatcher enforces for a registered kernel: no output shares storage with an
        # input (seen failing on an H200 before the kernels allocated outputs apart)
        inputs = [W, W2, Pt.meta, Pt.basis, Pt.perm_out, Pt.perm_in, *cp, *cg, *got_grads]
        torch._library.utils.check_aliasing_constraint("equiproj::fused_energies", inputs, (ep_g, eg_g))
    for a, b in zip(sum(got, []), sum(want, [])):  # float32 kernel arithmetic
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


# ---- torch.compile -----------------------------------------------------------------------------
@needs_cpp
def test_torch_compile_fullgraph_training_step(gen):
    """Model loss + the penalty of all layers (energies_many) in one fullgraph compiled function;
    the plans are looked up at trace time, the op stays one node. Equal to eager, two SGD steps."""
    torch._dynamo.reset()
    G = equiproj.SO3()
    ri, rh, r0 = Rep.parse(G, "3x0 + 2x1"), Rep.parse(G, "2x0 + 2x1 + 2"), Rep.parse(G, "0")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = torch.nn.Sequential(torch.nn.Linear(ri.dim, rh.dim), torch.nn.Tanh(), torch.nn.Linear(rh.dim, ri.dim))
    eager = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, ri.dim, generator=gen)

    def loss_fn(x):
        out = model(x).square().mean()
        ep, eg = equiproj.energies_many([model[0].weight, model[2].weight], [(ri, rh), (rh, ri)])
        bias = equiproj.energies(model[0].bias[:, None], r0, rh)[0]  # the single-layer entry point
        return out + 0.5 * ep.sum() + 0.01 * eg.sum() + 0.1 * bias

    def train(fn, steps=2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = fn(x)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses, [p.detach().clone() for p in model.parameters()]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    c_losses, c_params = train(compiled)
    with torch.no_grad():
        for p, e in zip(model.parameters(), eager):
            p.copy_(e)
    e_losses, e_params = train(loss_fn)
    for a, b in zip(c_losses + c_params, e_losses + e_params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
