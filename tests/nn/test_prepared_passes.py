"""The penalty's prepared passes for steerable kernel spaces, against the float64 reference.

On the CPU, ``penalty.backward()`` and ``penalty.decay_()`` run each steerable conv layer's C++ pass
(the pixel-tile kernel, the closed form of regular fields, the factorised blocks) through runners
bound when the program is prepared (``Term.pass_runners``). The reference is the same penalty on a
float64 copy of the model with every term on the ``"reference"`` backend (group quadrature on the
band coefficients, gradients by autograd). Tolerances, relative to the largest entry of what is
compared: 1e-5 for float32, 1e-10 for float64.
"""

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj import ops
from equiproj.kernel_spaces._factorised import factorised_plan
from equiproj.kernel_spaces._pixel_plan import tile_kernel_tables
from equiproj.nn import ProjectionPenalty, declare
from equiproj.nn._declaration import KernelTerm
from equiproj.nn._declare import declaration
from equiproj.testing import random_orthogonal
from penalty_reference import close, reference_run

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="needs the C++ extension")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
LAMBDAS = dict(lambda_perp={"regular": 0.7, "default": 0.3}, lambda_G=0.05)


def band_limited(G, band_limit, gen):
    """Every irrep up to ``band_limit`` as often as in the regular field, in one dense orthogonal basis."""
    parts = [(p.dim // p.endomorphism_basis.shape[0]) * p for p in G.irreps(band_limit=band_limit)]
    rep = parts[0]
    for p in parts[1:]:
        rep = rep + p
    return rep.change_basis(random_orthogonal(rep.dim, gen))


def steerable_model(gen, k=5):
    """Three steerable convs, one per C++ pass: SO(2) irreps fields (pixel tiles, with a bias), C8
    regular fields (closed form) and SO(2) band-limited regular fields beside irreps fields
    (factorised blocks, two pairs of field segments); odd channel counts. The "tiles" layer is nearly equivariant (E_perp / ||W||^2 ~ 1e-10)."""
    so2, c8 = ep.SO2(), ep.Cyclic(8)
    irr_in, irr_out = ep.Rep.parse(so2, "2x0 + 1 + 2"), ep.Rep.parse(so2, "0 + 2x1 + 3")
    reg_in, reg_out = 2 * c8.regular(), 3 * c8.regular()
    bl = band_limited(so2, 2, gen)
    m = nn.ModuleDict({
        "tiles": declare(nn.Conv2d(irr_in.dim, irr_out.dim, k, padding=k // 2), irr_in, irr_out),
        "regular": declare(nn.Conv2d(reg_in.dim, reg_out.dim, k, bias=False), reg_in, reg_out),
        "blocks": declare(nn.Conv2d(2 * bl.dim + 3, bl.dim, k, bias=False), 2 * bl + ep.Rep.parse(so2, "0 + 1"), bl),
    }).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        W, (space, r_in, r_out) = m["tiles"].weight, layer_space(m["tiles"])
        PW = space.project(W, r_in, r_out)
        N = W - PW
        W.copy_(PW + (1e-10 * PW.square().sum() / N.square().sum()).sqrt() * N)
    return m


def layer_space(layer):
    (term,) = [t for t in declaration(layer).terms("", layer) if isinstance(t, KernelTerm)]
    return term.space, term.rep_in, term.rep_out


def kernel_groups(pen):
    return [g for g in pen._program.groups if g.kind is KernelTerm]


def reference(model, monkeypatch, what, *args):
    return reference_run(model, monkeypatch, LAMBDAS, what, *args)


def no_generic_route(monkeypatch):
    """Fail if a kernel term goes through its kind's generic routes (one pass, differentiable energies)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the kernel terms took the generic route, not their prepared passes")
    monkeypatch.setattr(KernelTerm, "one_pass", classmethod(refuse))
    monkeypatch.setattr(KernelTerm, "energies", classmethod(refuse))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_prepared_passes_equal_the_reference(dtype, gen, monkeypatch):
    """The three passes are the ones prepared; penalty() (its value without grad mode, and with it its
    value and the gradient its backward hands over), backward() into fresh and into existing ``.grad``,
    and the decoupled step, against the reference, twice (the second time after the weights moved in
    place: the runners read the new values)."""
    model = steerable_model(gen).to(dtype)
    for name in ("tiles", "regular", "blocks"):  # the model covers every pass
        space, r_in, r_out = layer_space(model[name])
        w = model[name].weight.detach()
        tiles = tile_kernel_tables(w, space.plan(r_in, r_out), None) is not None
        closed = factorised_plan(space, r_in, r_out).runs_closed_form(w)
        assert (tiles, closed) == {"tiles": (True, False), "regular": (False, True), "blocks": (False, False)}[name]
    pen = ProjectionPenalty(model, **LAMBDAS)
    tol = TOL[dtype]
    for step in range(2):
        value_ref, grads_ref = reference(model, monkeypatch, "grads")
        want = reference(model, monkeypatch, "decay", 0.3, 0.1)
        with monkeypatch.context() as mp:
            no_generic_route(mp)
            with torch.no_grad():
                close(pen(), value_ref, tol, "penalty() under no_grad")
            model.zero_grad(set_to_none=True)
            value = pen()
            close(value, value_ref, tol, "penalty()")
            value.backward()
            for (n, p), g in zip(model.named_parameters(), grads_ref):
                close(p.grad, g, tol, f"penalty().backward(): .grad of {n}")
            model.zero_grad(set_to_none=True)
            close(pen.backward(), value_ref, tol, "backward() value")
            assert all(g._runners is not None and len(g._runners) == 3 for g in kernel_groups(pen))
            for (n, p), g in zip(model.named_parameters(), grads_ref):
                close(p.grad, g, tol, f"fresh .grad of {n}")
            existing = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                        for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.grad = existing[n].clone()
            objects = [p.grad for p in model.parameters()]
            close(pen.backward(), value_ref, tol, "backward() value, into .grad")
            for (n, p), g, obj in zip(model.named_parameters(), grads_ref, objects):
                assert p.grad is obj  # added in place
                close(p.grad, existing[n].double() + g, tol, f"existing .grad of {n}")
            ptrs = [p.data_ptr() for p in model.parameters()]
            pen.decay_(0.3, rate_G=0.1)
            assert [p.data_ptr() for p in model.parameters()] == ptrs
            for (n, p), w in zip(model.named_parameters(), want):
                close(p, w, tol, f"decay_ of {n}")
        with torch.no_grad():  # an optimiser step: in place, the program stays
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))


@needs_cpp
def test_nearly_equivariant_energy_through_the_prepared_pass(gen):
    """The nearly equivariant layer's E_perp (~1e-10 of ||W||^2) from its prepared pass, in float64,
    against the reference route of its space."""
    model = steerable_model(gen)
    space, r_in, r_out = layer_space(model["tiles"])
    W = model["tiles"].weight.detach()
    with torch.no_grad():
        model["tiles"].bias.zero_()  # equivariant: the layer's penalty is its weight's E_perp alone
    e_ref, _ = space.energies(W, r_in, r_out, backend="reference")
    assert 1e-12 < float(e_ref) / float(W.square().sum()) < 1e-8
    pen = ProjectionPenalty(model, lambda_perp={"tiles": 1.0, "default": 0.0}, lambda_G=0.0)
    model.zero_grad(set_to_none=True)
    value = pen.backward()
    assert all(g._runners is not None for g in kernel_groups(pen))
    assert isinstance(value, float) or value.dim() == 0
    assert abs(float(value) - float(e_ref)) <= 1e-6 * float(e_ref)


@needs_cpp
def test_what_the_prepared_passes_cannot_write_takes_the_generic_route(gen, monkeypatch):
    """A frozen parameter, a ``.grad`` that is not contiguous, and channels-last weights (not contiguous:
    no runners are prepared) go through the kind's generic routes, with the reference's results; a NaN
    weight raises from the prepared passes (backward() and penalty())."""
    model = steerable_model(gen).float()
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, grads_ref = reference(model, monkeypatch, "grads")
    model["regular"].weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    pen().backward()
    assert model["regular"].weight.grad is None
    for (n, p), g in zip(model.named_parameters(), grads_ref):
        if p.requires_grad:
            close(p.grad, g, 1e-5, f"{n} beside a frozen parameter, penalty().backward()")
    model.zero_grad(set_to_none=True)
    pen.backward()
    assert model["regular"].weight.grad is None
    for (n, p), g in zip(model.named_parameters(), grads_ref):
        if p.requires_grad:
            close(p.grad, g, 1e-5, f"{n} beside a frozen parameter")
    model["regular"].weight.requires_grad_(True)
    w = model["blocks"].weight
    base = torch.randn(w.shape[::-1], generator=gen).permute(*reversed(range(w.dim())))
    assert not base.is_contiguous()
    model.zero_grad(set_to_none=True)
    w.grad = base.clone(memory_format=torch.preserve_format)
    pen.backward()
    close(w.grad, base.double() + grads_ref[-1], 1e-5, "non-contiguous .grad")

    cl = steerable_model(torch.Generator().manual_seed(1)).float().to(memory_format=torch.channels_last)
    want = reference(cl, monkeypatch, "decay", 0.2, 0.0)
    pen_cl = ProjectionPenalty(cl, **LAMBDAS)
    pen_cl.decay_(0.2)
    assert all(g._runners is None for g in kernel_groups(pen_cl))
    for (n, p), w_ in zip(cl.named_parameters(), want):
        close(p, w_, 1e-5, f"channels-last decay_ of {n}")

    with torch.no_grad():
        model["regular"].weight[0, 0, 0, 0] = float("nan")
    model.zero_grad(set_to_none=True)
    no_generic_route(monkeypatch)
    for call in (pen.backward, pen):
        with pytest.raises(ValueError, match="not finite"):  # from the prepared passes
            call()


@needs_cpp
def test_energies_beyond_float32_raise_and_leave_no_gradient(gen):
    """float32 weights whose energy overflows float32 (the passes sum in float64) raise as the general
    route does, from backward() and penalty(), and a NaN weight sets no fresh ``.grad`` before raising;
    a value beyond float32 from finite energies raises too."""
    for poison in ("huge", "nan"):
        model = steerable_model(gen).float()
        pen = ProjectionPenalty(model, **LAMBDAS)
        with torch.no_grad():
            if poison == "huge":
                model["regular"].weight.mul_(1e19)
            else:
                model["blocks"].weight[0, 0, 0, 0] = float("nan")
        model.zero_grad(set_to_none=True)
        for call in (pen.backward, pen, lambda: pen().backward()):
            with pytest.raises(ValueError, match="not finite"):
                call()
            assert all(p.grad is None for p in model.parameters()), poison
        with torch.no_grad(), pytest.raises(ValueError, match="not finite"):
            pen()
    model = steerable_model(gen).float()  # finite energies, a value beyond float32
    pen = ProjectionPenalty(model, lambda_perp={"regular": 1e38, "default": 0.0})
    with pytest.raises(ValueError, match="beyond the range"):
        pen.backward()
    assert all(p.grad is None for p in model.parameters())


@needs_cpp
def test_parameters_relaid_on_their_storage_and_replaced_under_a_retained_graph(gen, monkeypatch):
    """A ``.data`` assignment that keeps the storage but changes the strides (the program's check looks
    at the storage) takes the general route, with the reference's results; a second backward through a
    retained graph after ``model.double()`` or such an assignment is refused (by the passes' node and by
    the fused matrices' alike), and a second backward with the parameters unchanged gives the first's
    gradients."""
    model = steerable_model(gen).float()
    pen = ProjectionPenalty(model, **LAMBDAS)
    model.zero_grad(set_to_none=True)
    pen.backward()  # the program is built and its passes bound
    w = model["regular"].weight
    ptr = w.data_ptr()
    w.data = w.data.transpose(2, 3)
    assert w.data_ptr() == ptr and not w.is_contiguous()
    value_ref, grads_ref = reference(model, monkeypatch, "grads")
    model.zero_grad(set_to_none=True)
    close(pen.backward(), value_ref, 1e-5, "backward() after a transposing .data assignment")
    for (n, p), g in zip(model.named_parameters(), grads_ref):
        close(p.grad, g, 1e-5, f".grad of {n} after a transposing .data assignment")

    for change, names in (("double", ("tiles", "regular", "blocks")), ("kernel", ("regular",)),
                          ("bias", ("tiles",))):
        model = steerable_model(gen).float()
        pen = ProjectionPenalty(model, **LAMBDAS)
        value = pen()
        model.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        first = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)  # unchanged: the passes again, the same gradients
        for (n, p), g in zip(model.named_parameters(), first):
            close(p.grad, g, 1e-6, f"second backward of {n}")
        if change == "double":
            model.double()
        else:
            p = model[names[0]].weight if change == "kernel" else model[names[0]].bias
            p.data = p.data.flip(0) if change == "bias" else p.data.transpose(2, 3)
        with pytest.raises(RuntimeError, match="replaced or laid out anew"):
            value.backward()


@needs_cpp
def test_a_space_with_its_own_many_layer_route_keeps_it(gen):
    """A subclass of the steerable space that overrides its many-layer entry point is called by the
    penalty (no passes are prepared for it)."""
    calls = []

    class Counted(ep.SteerableKernelSpace):
        @staticmethod
        def energies_and_grads_many(weights, spaces, reps, **kwargs):
            calls.append(len(weights))
            return ep.SteerableKernelSpace.energies_and_grads_many(weights, spaces, reps, **kwargs)

    so2 = ep.SO2()
    r_in, r_out = ep.Rep.parse(so2, "2x0 + 1"), ep.Rep.parse(so2, "0 + 1 + 2")
    model = nn.Sequential(declare(nn.Conv2d(r_in.dim, r_out.dim, 5, bias=False), r_in, r_out,
                                  kernel_space=Counted(so2, 5)))
    pen = ProjectionPenalty(model, lambda_perp=0.5)
    pen.backward()
    assert calls == [1] and all(g._runners is None for g in kernel_groups(pen))
