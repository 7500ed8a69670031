"""Property-based fuzzing of the energies, their gradients and the projection against an oracle
that does not use the library's block plan (tests/fuzz/fuzz_oracle.py: element averages for
finite groups, a trapezoid rule for SO(2) / O(2), the null space of the intertwining constraints
for SO(3) / O(3)).

Drawn: the group (all eight kinds), the reps on both sides (irreps with multiplicities, regular,
standard, tensor products, direct sums, copies, change_basis, from_matrices, permutation reps),
the batch shape, the memory layout of W (transposed, sliced out of a NaN-filled buffer, batch
innermost, stride-0 batch / rows / columns), the dtype, the scale, and the regime (random W,
nearly equivariant with E_perp / ||W||^2 = 1e-4 or 1e-8, exactly equivariant before rounding).
The tolerances and why they hold are in fuzz_oracle.py. Profiles: tests/fuzz/conftest.py
(``EQUIPROJ_FUZZ=long`` for the long run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import pytest
import torch
from fuzz_draws import FLOAT_DTYPES, LayerCase, examples, layer_cases, materialize
from fuzz_oracle import RECORD, cached_projector, check_energy, check_matrix
from hypothesis import example, given, settings
from hypothesis import strategies as st

import equiproj
from equiproj import ops
from equiproj._plan import plan_for

pytestmark = pytest.mark.fuzz

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension equiproj._C is not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "torch", "reference"]

#: near-equivariant float64 weights (E_perp / ||W||^2 = 1e-8) keep this relative accuracy of E_perp (residual form)
NEAR_RTOL_FLOAT64 = 1e-5


def _coefficient(c, W) -> torch.Tensor:
    """A lambda (number or tensor) as the library takes it (``ops.as_coefficient``: in the accumulation dtype,
    float32 unless W is float64), as a float64 tensor of W's batch shape."""
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    return torch.as_tensor(c, dtype=torch.float64).to(acc).double().expand(W.shape[:-2])


def _energy_dtype(W: torch.Tensor, backend: str) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32  # every backend alike


@contextlib.contextmanager
def _timed(test: str):
    t = time.perf_counter()
    yield
    RECORD.example(test, time.perf_counter() - t)


def _check_energies(e_perp, e_g, layer, backend, what):
    W = layer.W
    _, PW, R = layer.reference()
    batch = W.shape[:-2]
    for e in (e_perp, e_g):
        assert e.shape == batch, f"{what}: energy shape {tuple(e.shape)}, expected {tuple(batch)}"
        assert e.dtype == _energy_dtype(W, backend), f"{what}: energy dtype {e.dtype}"
    rel = check_energy(e_perp, R.square().sum((-2, -1)), W, backend=backend, what=f"{what} E_perp", regime=layer.regime)
    check_energy(e_g, PW.square().sum((-2, -1)), W, backend=backend, what=f"{what} E_G", regime=layer.regime)
    if layer.regime == "near" and W.dtype == torch.float64:
        assert (rel or 0.0) < NEAR_RTOL_FLOAT64, f"{what}: nearly equivariant E_perp relative error {rel:.3e}"


# ---- one layer, every entry point of a backend ------------------------------------------------
# the two terms of the gradient 2 lambda_perp R + 2 lambda_G P W cancel at some elements: exact only with the
# lambdas the library uses (float32 for float32 weights)
_CANCELLING_GRADIENT = LayerCase(group=("cyclic", 14), rep_in=("irreps", ((0, 1), (0, 1), (0, 3)), "parse"),
                                 rep_out=("regular",), batch=(2, 2), layout="contiguous", dtype=torch.float32,
                                 scale_exp=0, regime="near", ratio=1e-4, seed=0, lambda_perp=1.0, lambda_G=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(1.0))
@given(case=layer_cases())
@example(case=_CANCELLING_GRADIENT)
def test_single_layer(backend, case):
    """energies, energies_and_grad and the autograd of energies of one weight against the oracle."""
    with _timed(f"test_single_layer[{backend}]"):
        layer = materialize(case, cached_projector)
        W, ri, ro = layer.W, layer.rep_in, layer.rep_out
        _, PW, R = layer.reference()
        batch = W.shape[:-2]

        e_perp, e_g = equiproj.energies(W, ri, ro, backend=backend)
        _check_energies(e_perp, e_g, layer, backend, "energies")

        cp, cg = _coefficient(case.lambda_perp, W), _coefficient(case.lambda_G, W)
        e_perp, e_g, grad = equiproj.energies_and_grad(W, ri, ro, lambda_perp=case.lambda_perp,
                                                       lambda_G=case.lambda_G, backend=backend)
        _check_energies(e_perp, e_g, layer, backend, "energies_and_grad")
        expected = 2 * cp[..., None, None] * R + 2 * cg[..., None, None] * PW
        check_matrix(grad, expected, W, cp.abs() + cg.abs(), backend=backend, what="energies_and_grad grad",
                     regime=layer.regime)

        # autograd of energies with incoming gradients u, v per matrix (representable in the energies' dtype,
        # which they pass through)
        gen = torch.Generator().manual_seed(case.seed + 1)
        u, v = (torch.randn(batch, dtype=torch.float64, generator=gen).to(_energy_dtype(W, backend)).double()
                for _ in range(2))
        Wl = W.detach().requires_grad_()
        e_perp, e_g = equiproj.energies(Wl, ri, ro, backend=backend)
        (u * e_perp + v * e_g).sum().backward()  # (test_autograd_graph: both energies carry the graph)
        expected = 2 * u[..., None, None] * R + 2 * v[..., None, None] * PW
        check_matrix(Wl.grad, expected, W, u.abs() + v.abs(), backend=backend, what="autograd of energies",
                     regime=layer.regime)


# ---- the projection -----------------------------------------------------------------------------
@settings(max_examples=examples(0.6))
@given(case=layer_cases(), which=st.sampled_from(("equivariant", "non_equivariant")))
def test_project(case, which):
    """project(W, which=) and its gradient (P is self-adjoint: d<C, P W>/dW = P C) against the oracle."""
    with _timed("test_project"):
        layer = materialize(case, cached_projector)
        W, ri, ro = layer.W, layer.rep_in, layer.rep_out
        _, PW, R = layer.reference()
        X = equiproj.project(W, ri, ro, which=which)
        # |lambda_perp| + |lambda_G| = 1/2: the tolerance's absolute term is C_GRAD eps ||W||
        check_matrix(X, PW if which == "equivariant" else R, W, 0.5, backend="project", what=f"project {which}",
                     regime=layer.regime)

        gen = torch.Generator().manual_seed(case.seed + 2)
        C = torch.randn(W.shape, dtype=torch.float64, generator=gen).to(W.dtype)
        Wl = W.detach().requires_grad_()
        Y = equiproj.project(Wl, ri, ro, which=which)
        if Y.requires_grad:  # (test_autograd_graph: it always should)
            (Y.to(torch.float64) * C.to(torch.float64)).sum().backward()
        else:
            Wl.grad = torch.zeros_like(Wl)
        PC = layer.P(C.to(torch.float64))
        check_matrix(Wl.grad, PC if which == "equivariant" else C.to(torch.float64) - PC, C, 0.5, backend="project",
                     what=f"project {which} grad", regime="random")


# ---- many layers in one call ----------------------------------------------------------------------
@st.composite
def many_layer_cases(draw, dtypes=FLOAT_DTYPES, max_dim=40):
    batch = draw(st.sampled_from(((), (2,), (1, 2))))
    n = draw(st.integers(1, 4))
    cases = [draw(layer_cases(dtypes=dtypes, max_dim=max_dim, batch=batch)) for _ in range(n)]
    if n > 1 and draw(st.booleans()):  # the same rep pair twice (one plan, two weights)
        cases[-1] = dataclasses.replace(cases[-1], group=cases[0].group, rep_in=cases[0].rep_in,
                                        rep_out=cases[0].rep_out)
    return cases


@settings(max_examples=examples(0.5))
@given(cases=many_layer_cases(), backend=st.sampled_from(("auto", "cpp", "torch", "reference")))
def test_many_layers(cases, backend):
    """energies_many (values and autograd) and energies_and_grads_many over layers of mixed groups, reps,
    dtypes and layouts."""
    if backend == "cpp" and not ops.cpp_available():
        backend = "torch"
    ran = "cpp" if backend == "auto" and ops.cpp_available() else ("torch" if backend == "auto" else backend)
    with _timed(f"test_many_layers[{ran}]"):
        layers = [materialize(c, cached_projector) for c in cases]
        Ws = [la.W for la in layers]
        pairs = [(la.rep_in, la.rep_out) for la in layers]
        refs = [la.reference() for la in layers]
        batch = Ws[0].shape[:-2]
        out_dtype = torch.float64 if any(W.dtype == torch.float64 for W in Ws) else torch.float32

        def check_stacked(e_perp, e_g, what):
            assert e_perp.shape == (len(Ws),) + batch and e_perp.dtype == out_dtype, \
                f"{what}: {tuple(e_perp.shape)} {e_perp.dtype}, expected {(len(Ws),) + batch} {out_dtype}"
            for i, (la, (_, PW, R)) in enumerate(zip(layers, refs)):
                check_energy(e_perp[i], R.square().sum((-2, -1)), la.W, backend=ran, what=f"{what} E_perp",
                             regime=la.regime)
                check_energy(e_g[i], PW.square().sum((-2, -1)), la.W, backend=ran, what=f"{what} E_G",
                             regime=la.regime)

        leaves = [W.detach().requires_grad_() for W in Ws]
        e_perp, e_g = equiproj.energies_many(leaves, pairs, backend=backend)
        check_stacked(e_perp, e_g, "energies_many")
        gen = torch.Generator().manual_seed(cases[0].seed + 3)
        u, v = (torch.randn((len(Ws),) + batch, dtype=torch.float64, generator=gen).to(out_dtype).double()
                for _ in range(2))
        (u * e_perp + v * e_g).sum().backward()
        for i, (la, (_, PW, R)) in enumerate(zip(layers, refs)):
            ui, vi = u[i][..., None, None], v[i][..., None, None]
            check_matrix(leaves[i].grad, 2 * ui * R + 2 * vi * PW, la.W, u[i].abs() + v[i].abs(), backend=ran,
                         what="autograd of energies_many", regime=la.regime)

        e_perp, e_g, grads = equiproj.energies_and_grads_many(Ws, pairs, lambda_perp=[c.lambda_perp for c in cases],
                                                              lambda_G=[c.lambda_G for c in cases], backend=backend)
        check_stacked(e_perp, e_g, "energies_and_grads_many")
        for c, la, g, (_, PW, R) in zip(cases, layers, grads, refs):
            cp, cg = _coefficient(c.lambda_perp, la.W), _coefficient(c.lambda_G, la.W)
            check_matrix(g, 2 * cp[..., None, None] * R + 2 * cg[..., None, None] * PW, la.W, cp.abs() + cg.abs(),
                         backend=ran, what="energies_and_grads_many grad", regime=la.regime)


# ---- the Triton kernel, called directly (interpreted on CPU: small shapes) --------------------------
def _triton_runs() -> bool:
    from equiproj import kernels

    return kernels.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_runs(), reason="needs triton and a GPU, or TRITON_INTERPRET=1")
@settings(max_examples=examples(0.25))
@given(cases=many_layer_cases(dtypes=(torch.float32, torch.float16, torch.bfloat16), max_dim=16),
       with_grad=st.booleans())
def test_triton_kernel(cases, with_grad):
    """equiproj.kernels.fused_energies (the CUDA kernel; under TRITON_INTERPRET=1 on CPU tensors) against the
    oracle, with per-layer coefficients."""
    from equiproj import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _timed("test_triton_kernel"):
        layers = [materialize(c, cached_projector) for c in cases]
        Ws = [la.W.to(device) for la in layers]
        plans = [plan_for(la.rep_in, la.rep_out, device, torch.float32) for la in layers]
        gen = torch.Generator().manual_seed(cases[0].seed + 4)
        cp = torch.randn(len(Ws), dtype=torch.float32, generator=gen) if with_grad else None
        cg = torch.randn(len(Ws), dtype=torch.float32, generator=gen) if with_grad else None
        e_perp, e_g, grads = kernels.fused_energies(Ws, plans, None if cp is None else cp.to(device),
                                                    None if cg is None else cg.to(device))
        assert (grads is None) == (not with_grad)
        for i, la in enumerate(layers):
            _, PW, R = la.reference()
            assert e_perp[i].dtype == torch.float32 and e_perp[i].shape == la.W.shape[:-2]
            check_energy(e_perp[i].cpu(), R.square().sum((-2, -1)), la.W, backend="triton", what="kernel E_perp",
                         regime=la.regime)
            check_energy(e_g[i].cpu(), PW.square().sum((-2, -1)), la.W, backend="triton", what="kernel E_G",
                         regime=la.regime)
            if with_grad:
                a, b = float(cp[i]), float(cg[i])
                check_matrix(grads[i].cpu(), 2 * a * R + 2 * b * PW, la.W, abs(a) + abs(b), backend="triton",
                             what="kernel grad", regime=la.regime)


# ---- the autograd contract ------------------------------------------------------------------------
_NO_EQUIVARIANT_MAPS = LayerCase(group=("so2",), rep_in=("irreps", ((0, 1),), "parse"),
                                 rep_out=("irreps", ((1, 1),), "parse"), batch=(), layout="contiguous",
                                 dtype=torch.float64, scale_exp=0, regime="random", ratio=0.0, seed=0, lambda_perp=1.0,
                                 lambda_G=0.0)


@settings(max_examples=examples(0.25))
@given(case=layer_cases(dtypes=(torch.float64, torch.float32)),
       backend=st.sampled_from(("cpp", "torch", "reference")),
       which=st.sampled_from(("equivariant", "non_equivariant")))
@example(case=_NO_EQUIVARIANT_MAPS, backend="torch", which="equivariant")  # E_G = 0 and P(W) = 0 identically
@example(case=_NO_EQUIVARIANT_MAPS, backend="cpp", which="equivariant")
def test_autograd_graph(case, backend, which):
    """For a W that requires grad, the energies of every backend and the projection are part of the autograd
    graph (also when one of them is identically zero, e.g. reps without equivariant maps between them), and
    energies_and_grad returns tensors without a graph."""
    if backend == "cpp" and not ops.cpp_available():
        backend = "torch"
    with _timed("test_autograd_graph"):
        layer = materialize(case, cached_projector)
        W = layer.W.detach().requires_grad_()
        e_perp, e_g = equiproj.energies(W, layer.rep_in, layer.rep_out, backend=backend)
        assert e_perp.requires_grad and e_g.requires_grad, \
            f"energies(backend={backend!r}): requires_grad of E_perp, E_G = {e_perp.requires_grad}, {e_g.requires_grad}"
        Y = equiproj.project(W, layer.rep_in, layer.rep_out, which=which)
        assert Y.requires_grad, f"project(W, which={which!r}) has no autograd graph"
        out = equiproj.energies_and_grad(W, layer.rep_in, layer.rep_out, lambda_perp=case.lambda_perp,
                                         lambda_G=case.lambda_G, backend=backend)
        assert not any(t.requires_grad for t in out), f"energies_and_grad(backend={backend!r}) built a graph"
