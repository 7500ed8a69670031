"""Gradients added in place (``outs``): to an existing gradient, or to the weight itself (the decoupled
step ``W <- W - rate (W - P W)``), through every backend, against the float64 reference."""

import pytest
import torch

import equiproj as ep
from equiproj import ops, reference
from equiproj._plan import plan_for
from equiproj.kernels import HAS_TRITON
from equiproj.testing import mixed_reps, nearly_equivariant

BACKENDS = ["cpp", "torch", "reference"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def expected(W0, out0, ri, ro, cp, cg):
    """``out0 + 2 cp (W0 - P W0) + 2 cg P W0`` in float64 (coefficients per matrix of the batch)."""
    W64 = W0.double()
    PW = reference.project(W64, ri, ro)
    cp, cg = (torch.as_tensor(c, dtype=torch.float64).reshape(W0.shape[:-2] + (1, 1)) for c in (cp, cg))
    return out0.double() + 2 * cp * (W64 - PW) + 2 * cg * PW


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [ep.SO3(), ep.Dihedral(6), ep.O2()], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_add_to_an_existing_gradient(backend, group, dtype, gen):
    ri, ro = mixed_reps(group, gen)  # a change of basis on rep_in, permuted tensor products
    W = torch.randn(2, 3, ro.dim, ri.dim, dtype=torch.float64, generator=gen).to(dtype)
    G = torch.randn(W.shape, dtype=torch.float64, generator=gen).to(dtype)
    W0, G0 = W.clone(), G.clone()
    cp = torch.rand(2, 3, dtype=torch.float64, generator=gen)
    cg = torch.rand(2, 3, dtype=torch.float64, generator=gen)
    e_perp, e_g, grad = ep.energies_and_grad(W, ri, ro, lambda_perp=cp, lambda_G=cg, backend=backend, out=G)
    assert grad is G and torch.equal(W, W0)
    want = expected(W0, G0, ri, ro, cp, cg)
    assert float((G.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())
    torch.testing.assert_close(e_perp.double(), reference.energies(W0.double(), ri, ro)[0], rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_decoupled_step_in_place(backend, dtype, gen):
    """``out = W``: every tile is read before it is written, so the weight is stepped in place."""
    G = ep.O3()
    ri, ro = mixed_reps(G, gen)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen).to(dtype)
    W0, ptr = W.clone(), W.data_ptr()
    rate = 0.3
    ep.energies_and_grad(W, ri, ro, lambda_perp=-rate / 2, lambda_G=0.0, backend=backend, out=W)
    assert W.data_ptr() == ptr
    want = expected(W0, W0, ri, ro, -rate / 2, 0.0)
    assert float((W.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())
    # rate 1: exactly the projection, also for a nearly equivariant start
    Wn = nearly_equivariant(W0.double(), ri, ro, 1e-10, gen).to(dtype)
    Wn0 = Wn.clone()
    ep.energies_and_grad(Wn, ri, ro, lambda_perp=-0.5, backend=backend, out=Wn)
    P = reference.project(Wn0.double(), ri, ro)
    assert float((Wn.double() - P).abs().max()) <= TOL[dtype] * float(P.abs().max())


def test_many_layers_one_call_with_outs(gen, monkeypatch):
    """``energies_and_grads_many`` with ``outs``: one fused call, gradients added per layer."""
    layers = [mixed_reps(G, gen) for G in (ep.SO3(), ep.Cyclic(5), ep.Octahedral())]
    weights = [torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen) for ri, ro in layers]
    outs = [torch.randn_like(w) for w in weights]
    outs0 = [o.clone() for o in outs]
    calls = []
    real = ops._backends.fused_energies_and_grads
    monkeypatch.setattr(ops._backends, "fused_energies_and_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    lp, lg = [0.5, 1.0, 2.0], [0.0, 0.25, 1.0]
    ep.energies_and_grads_many(weights, layers, lambda_perp=lp, lambda_G=lg, outs=outs)
    assert len(calls) == (1 if ops.cpp_available() else 0)
    for w, (ri, ro), o, o0, cp, cg in zip(weights, layers, outs, outs0, lp, lg):
        torch.testing.assert_close(o, expected(w, o0, ri, ro, cp, cg), rtol=1e-12, atol=1e-12)


def test_non_contiguous_outputs_and_errors(gen):
    ri, ro = mixed_reps(ep.SO2(), gen)
    W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen)
    out = torch.randn(ri.dim, ro.dim, dtype=torch.float64, generator=gen).T  # a transposed view
    out0 = out.clone()
    ep.energies_and_grad(W, ri, ro, lambda_perp=1.0, out=out)
    torch.testing.assert_close(out, expected(W, out0, ri, ro, 1.0, 0.0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        ep.energies_and_grad(W, ri, ro, out=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        ep.energies_and_grad(W, ri, ro, out=torch.zeros_like(W, dtype=torch.float32))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_accumulates_in_place(gen):
    """The Triton kernel's accumulate mode (interpreted on the CPU when there is no GPU)."""
    from equiproj.kernels import fused_energies

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    G = ep.O3()
    for ri, ro in [(ep.Rep.parse(G, "2x0e+1o+2e"), ep.Rep.parse(G, "0e+2x1o")),
                   (ep.Rep.parse(G, "0e+1o") @ ep.Rep.parse(G, "1o"), ep.Rep.parse(G, "1o+0e"))]:
        W = torch.randn(2, ro.dim, ri.dim, generator=gen).to(dev)
        W0 = W.clone()
        P = plan_for(ri, ro, dev, torch.float32)
        fused_energies([W[0], W[1]], [P, P], torch.tensor([-0.15, -0.5]), torch.tensor([0.0, -0.1]),
                       outs=[W[0], W[1]])
        want = expected(W0.cpu(), W0.cpu(), ri, ro, [-0.15, -0.5], [0.0, -0.1])
        assert float((W.cpu().double() - want).abs().max()) <= 2e-6 * float(want.abs().max())
