"""The differentiable energies of steerable conv layers through their C++ passes (``pass_energies``:
the energies alone in the forward, one gradient pass in the backward), against the float64 reference
route of the space (group quadrature on the band coefficients, gradients by autograd). Tolerances
relative to the largest entry: 1e-5 for float32, 1e-10 for float64."""

import pytest
import torch

import equiproj as ep
from equiproj import ops
from equiproj.kernel_spaces import SteerableKernelSpace, kernel_energies_many
from equiproj.kernel_spaces._factorised import factorised_plan
from equiproj.kernel_spaces._passes import pass_energies
from equiproj.testing import random_orthogonal

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="needs the C++ extension")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def layers(gen):
    """(space, rep_in, rep_out) of the three passes: SO(2) irreps fields (pixel tiles), C8 regular
    fields (closed form), SO(2) band-limited fields beside irreps fields (factorised blocks)."""
    so2, c8 = ep.SO2(), ep.Cyclic(8)
    parts = [(p.dim // p.endomorphism_basis.shape[0]) * p for p in so2.irreps(band_limit=2)]
    bl = parts[0]
    for p in parts[1:]:
        bl = bl + p
    bl = bl.change_basis(random_orthogonal(bl.dim, gen))
    return [(SteerableKernelSpace(so2, 5), ep.Rep.parse(so2, "2x0 + 1 + 2"), ep.Rep.parse(so2, "0 + 2x1 + 3")),
            (SteerableKernelSpace(c8, 5), 2 * c8.regular(), 3 * c8.regular()),
            (SteerableKernelSpace(so2, 5), 2 * bl + ep.Rep.parse(so2, "0 + 1"), bl)]


def close(got, want, tol, what):
    got, want = got.detach().double(), want.detach().double()
    assert float((got - want).abs().max()) <= tol * (float(want.abs().max()) or 1.0), what


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pass_energies_and_their_gradients_equal_the_reference(dtype, gen):
    """Energies, and the gradient of ``a E_perp + b E_G`` (incoming gradients other than 1, and an
    unused E_G), for one layer per pass, against the reference; the passes are the route taken."""
    specs = layers(gen)
    weights = [torch.randn(ro.dim, ri.dim, 5, 5, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
               for _, ri, ro in specs]
    spaces, reps = [s for s, _, _ in specs], [(ri, ro) for _, ri, ro in specs]
    assert factorised_plan(spaces[1], *reps[1]).runs_closed_form(weights[1])
    assert pass_energies(weights, spaces, reps) is not None
    e_perp, e_g = kernel_energies_many(weights, spaces, reps)
    refs = [w.detach().double().requires_grad_() for w in weights]
    r_perp, r_g = kernel_energies_many(refs, spaces, reps, backend="reference")
    close(e_perp, r_perp, TOL[dtype], "E_perp")
    close(e_g, r_g, TOL[dtype], "E_G")
    a = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    b = torch.tensor([0.4, 0.0, -0.6], dtype=torch.float64)
    (a.to(e_perp.dtype) * e_perp).sum().add((b.to(e_g.dtype) * e_g).sum()).backward()
    ((a * r_perp).sum() + (b * r_g).sum()).backward()
    for k, (w, r) in enumerate(zip(weights, refs)):
        close(w.grad, r.grad, TOL[dtype], f"gradient of layer {k}")
    (e_perp_one,), _ = pass_energies(weights[:1], spaces[:1], reps[:1])
    (grad,) = torch.autograd.grad(e_perp_one, weights[:1])  # E_G unused: no gradient flows into it
    (ref,) = torch.autograd.grad(kernel_energies_many(refs[:1], spaces[:1], reps[:1], backend="reference")[0].sum(),
                                 refs[:1])
    close(grad, ref, TOL[dtype], "gradient of E_perp alone")


@needs_cpp
def test_pass_energies_refuse_an_in_place_change_and_a_second_derivative(gen):
    space, ri, ro = layers(gen)[1]
    W = torch.randn(ro.dim, ri.dim, 5, 5, generator=gen, requires_grad=True)
    e_perp, _ = space.energies(W, ri, ro)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(e_perp, W, create_graph=True)[0].sum().backward()
    e_perp, _ = space.energies(W, ri, ro)
    with torch.no_grad():
        W.mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        e_perp.backward()
