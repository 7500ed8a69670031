"""The penalty program: one op call per kind of term, against the float64 reference.

The reference is the same penalty on a float64 copy of the model with every term on the
``"reference"`` backend (``$EQUIPROJ_BACKEND``): the spatial-domain average over the group for
matrices (linear layers, grid convolutions, biases), the reference route of the steerable kernel
space, and the exact translation energies; its gradients come from autograd. Tolerances (relative
to the largest entry): float32 1e-5; bfloat16 weights 1e-5 for energies (computed from the same
rounded weights) and 1e-2 for what is written in bfloat16 (gradients, stepped weights).
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import equiproj as ep
from equiproj import ops
from equiproj import translation as tr
from equiproj.nn import ProjectionPenalty, declare, declare_translations
from equiproj.nn import _program as program
from equiproj.testing import nearly_equivariant
from penalty_reference import close, reference_model
from penalty_reference import reference_run as _reference_run

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="needs the C++ extension")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2), torch.float64: (1e-10, 1e-10)}


class CountOps(TorchDispatchMode):
    """Counts calls of ``equiproj::fused_energies``."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.equiproj.fused_energies.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def mixed_model(dtype, gen, steerable=True):
    """Linear layers on SO(3) irreps (one with its weight tied to another's), a C4 grid conv on
    regular fields, a steerable SO(2) conv, a periodic locally connected layer, biases."""
    S = ep.SO3()
    r1, r2 = ep.Rep.parse(S, "2x0 + 1"), ep.Rep.parse(S, "3x0 + 2x1 + 2")
    C4 = ep.Cyclic(4)
    reg = 2 * C4.regular()
    m = nn.ModuleDict({
        "lin1": declare(nn.Linear(r1.dim, r2.dim), r1, r2),
        "lin2": declare(nn.Linear(r2.dim, r2.dim), r2, r2),
        "lin3": declare(nn.Linear(r2.dim, r2.dim, bias=False), r2, r2),
        "grid": declare(nn.Conv2d(reg.dim, reg.dim, 3, padding=1), reg, reg),
        "lc": declare_translations(tr.LocallyConnected2d(2, 3, (5, 6), 3)),
    })
    if steerable:
        so2 = ep.SO2()
        m["steer"] = declare(nn.Conv2d(4, 5, 3, padding=1), ep.Rep.parse(so2, "2x0 + 1"), ep.Rep.parse(so2, "0 + 1 + 2"))
    m["lin3"].weight = m["lin2"].weight  # tied: one parameter, two terms
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        # one nearly equivariant weight (E_perp / ||W||^2 ~ 1e-10)
        W = m["lin1"].weight
        W.copy_(nearly_equivariant(W.double(), r1, r2, 1e-10, gen))
    return m.to(dtype)


LAMBDAS = dict(lambda_perp={"lin1": 0.7, "grid": 0.3, "default": 0.2}, lambda_G=0.05)


def reference_run(model, monkeypatch, what, *args):
    """``what`` of a float64 reference penalty of ``model``'s current values (with :data:`LAMBDAS`)."""
    return _reference_run(model, monkeypatch, LAMBDAS, what, *args)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_penalty_backward_decay_equal_the_reference(dtype, gen, monkeypatch):
    """Value, gradients (fresh and added to existing ones, frozen parameters left alone) and the
    decoupled step, twice: on the first call (the program is built) and after the weights moved in
    place (the program is reused and reads the new values)."""
    model = mixed_model(dtype, gen, steerable=dtype != torch.bfloat16)
    pen = ProjectionPenalty(model, **LAMBDAS)
    tol_e, tol_w = TOL[dtype]
    frozen = model["lc"].bias
    frozen.requires_grad_(False)
    for step in range(2):
        close(pen(), reference_run(model, monkeypatch, "value"), tol_e, "penalty()")
        value_ref, grads_ref = reference_run(model, monkeypatch, "grads")
        for p in model.parameters():
            p.grad = None
        close(pen.backward(), value_ref, tol_e, "backward() value")
        for (n, p), g in zip(model.named_parameters(), grads_ref):
            if p.requires_grad:
                close(p.grad, g, tol_w, f"fresh .grad of {n}")
            else:
                assert p.grad is None
        existing = {n: torch.randn(p.shape, generator=gen).to(dtype) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = existing[n].clone() if p.requires_grad else None
        objects = [p.grad for p in model.parameters()]
        pen.backward()
        for (n, p), g, obj in zip(model.named_parameters(), grads_ref, objects):
            if p.requires_grad:
                assert p.grad is obj  # added in place
                close(p.grad, existing[n].double() + g, tol_w, f"existing .grad of {n}")
        want = reference_run(model, monkeypatch, "decay", 0.3, 0.1)
        ptrs = [p.data_ptr() for p in model.parameters()]
        pen.decay_(0.3, rate_G=0.1)
        assert [p.data_ptr() for p in model.parameters()] == ptrs
        for (n, p), w in zip(model.named_parameters(), want):
            close(p.detach(), w, tol_w, f"decay_ of {n}")
        with torch.no_grad():  # an optimiser step: in place, the program stays
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(dtype))


@needs_cpp
def test_tied_weights_add_both_gradients_and_step_once_with_the_sum(gen):
    model = mixed_model(torch.float64, gen, steerable=False)
    pen = ProjectionPenalty(model, lambda_perp=0.5)
    W = model["lin2"].weight
    r2 = ep.Rep.parse(ep.SO3(), "3x0 + 2x1 + 2")
    PW = ep.reference.project(W.detach(), r2, r2)
    model.zero_grad(set_to_none=True)
    pen.backward()
    close(W.grad, 2 * (2 * 0.5 * (W.detach() - PW)), 1e-10, "two terms' gradients")
    W0 = W.detach().clone()
    pen.decay_(0.25)
    close(W.detach(), W0 - 2 * 0.25 * (W0 - PW), 1e-10, "one step per parameter, the sum of both uses")


def _declared_linears(n, gen):
    G = ep.O3()
    r = ep.Rep.parse(G, "4x0e + 2x1o + 2e")
    model = nn.Sequential(*[declare(nn.Linear(r.dim, r.dim), r, r) for _ in range(n)])
    return model, r


@needs_cpp
def test_one_op_call_per_kind_of_term(gen):
    """50 linear layers with biases: penalty() one call (it writes the gradient as well, so its
    backward makes none), backward() one call with fresh or existing gradients, decay_ one call; a
    grid conv adds nothing (matrices too)."""
    model, r = _declared_linears(50, gen)
    pen = ProjectionPenalty(model, lambda_perp=0.1)
    for _ in range(2):
        with CountOps() as count:
            value = pen()
        assert count.calls == 1
        with CountOps() as count:
            value.backward()
        assert count.calls == 0
        for fresh in (True, False):
            if fresh:
                model.zero_grad(set_to_none=True)
            with CountOps() as count:
                pen.backward()
            assert count.calls == 1
        with CountOps() as count:
            pen.decay_(0.1)
        assert count.calls == 1


@needs_cpp
def test_program_rebuilds_on_redeclare_swap_and_dtype(gen, monkeypatch):
    model = mixed_model(torch.float32, gen, steerable=False)
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen()
    prog = pen._program
    pen()
    assert pen._program is prog  # nothing changed: reused
    # re-declaration with other reps
    C4 = ep.Cyclic(4)
    declare(model["grid"], 2 * C4.regular(), C4.regular() + 4 * C4.trivial())
    close(pen(), reference_run(model, monkeypatch, "value"), 1e-5, "after re-declaration")
    assert pen._program is not prog
    prog = pen._program
    # a declared module swapped in at the same path
    S = ep.SO3()
    r1, r2 = ep.Rep.parse(S, "2x0 + 1"), ep.Rep.parse(S, "3x0 + 2x1 + 2")
    model["lin1"] = declare(nn.Linear(r1.dim, r2.dim), r1, r2)
    close(pen(), reference_run(model, monkeypatch, "value"), 1e-5, "after a module swap")
    assert pen._program is not prog
    prog = pen._program
    # a dtype change replaces every parameter's storage
    model.double()
    value = pen()
    assert value.dtype == torch.float64 and pen._program is not prog
    close(value, reference_run(model, monkeypatch, "value"), 1e-10, "after model.double()")
    value_ref, grads_ref = reference_run(model, monkeypatch, "grads")
    model.zero_grad(set_to_none=True)
    close(pen.backward(), value_ref, 1e-10, "backward after model.double()")
    for p, g in zip(model.parameters(), grads_ref):
        close(p.grad, g, 1e-10, "gradient after model.double()")
    # a parameter replaced by one of another dtype on one layer only
    model["lin2"].weight.data = model["lin2"].weight.data.float()
    model["lin3"].weight = model["lin2"].weight
    close(pen(), reference_run(model, monkeypatch, "value"), 1e-5, "after one layer's dtype changed")


@needs_cpp
def test_non_contiguous_weights_and_gradients(gen, monkeypatch):
    """A transposed weight (its matrix form is not a view) and a non-contiguous .grad."""
    model = mixed_model(torch.float32, gen, steerable=False)
    lin = model["lin2"]
    with torch.no_grad():
        lin.weight = nn.Parameter(lin.weight.detach().T.contiguous().T)  # same values, column-major
    model["lin3"].weight = lin.weight
    grid = model["grid"]
    with torch.no_grad():
        grid.weight = nn.Parameter(grid.weight.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
    pen = ProjectionPenalty(model, **LAMBDAS)
    close(pen(), reference_run(model, monkeypatch, "value"), 1e-5, "value")
    value_ref, grads_ref = reference_run(model, monkeypatch, "grads")
    for p in model.parameters():
        p.grad = torch.zeros(p.shape[::-1]).T if p.dim() == 2 else None
    pen.backward()
    for (n, p), g in zip(model.named_parameters(), grads_ref):
        close(p.grad, g, 1e-5, f"gradient of {n}")
    want = reference_run(model, monkeypatch, "decay", 0.2, 0.0)
    pen.decay_(0.2)
    for (n, p), w in zip(model.named_parameters(), want):
        close(p.detach(), w, 1e-5, f"decay_ of {n}")


@needs_cpp
def test_replaced_and_parametrized_parameters(gen, monkeypatch):
    """A parameter replaced by another after the program was built is read; a computed weight (a
    parametrization) is read at every call."""
    model = mixed_model(torch.float32, gen, steerable=False)
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen()
    lin = model["lin1"]
    lin.weight = nn.Parameter(torch.randn(lin.weight.shape, generator=gen))
    close(pen(), reference_run(model, monkeypatch, "value"), 1e-5, "after a parameter was replaced")
    torch.nn.utils.parametrizations.weight_norm(model["grid"])
    value = pen()
    with torch.no_grad():
        model["grid"].parametrizations.weight.original0.mul_(1.5)  # the computed weight changes
    ref = reference_model(model)
    with monkeypatch.context() as mp:
        mp.setenv(ops.ENV_VAR, "reference")
        want = ProjectionPenalty(ref, **LAMBDAS)().detach()
    assert float(pen()) != float(value)
    close(pen(), want, 1e-5, "a parametrized weight")


@needs_cpp
@pytest.mark.parametrize("buffers", ["separate", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_penalty_autograd_equals_the_reference(dtype, buffers, gen, monkeypatch):
    """``penalty().backward()`` (the fused matrices' gradient computed in the forward's pass and
    handed over, in one buffer per parameter or in views of one buffer) gives the gradients of the
    float64 reference: fresh, scaled by an incoming gradient other than 1, added to a task gradient,
    twice through a retained graph, and with a frozen parameter (which gets none)."""
    monkeypatch.setattr(program, "_SEPARATE_GRADS_NUMEL", 0 if buffers == "separate" else 10**9)
    if buffers == "shared":  # views of one buffer are the op route's (the prepared program allocates each)
        monkeypatch.setattr(program, "_PREPARED", False)
    model = mixed_model(dtype, gen, steerable=dtype != torch.bfloat16)
    pen = ProjectionPenalty(model, **LAMBDAS)
    tol_e, tol_w = TOL[dtype]
    params = dict(model.named_parameters())
    value_ref, grads_ref = reference_run(model, monkeypatch, "grads")
    want = dict(zip(params, grads_ref))

    def check(scale, what):
        for n, p in params.items():
            if p.requires_grad:
                close(p.grad, scale * want[n], tol_w, f"{what}: .grad of {n}")
            else:
                assert p.grad is None, what

    model.zero_grad(set_to_none=True)
    value = pen()
    close(value.detach(), value_ref, tol_e, "penalty()")
    value.backward()
    check(1.0, "fresh")
    w, b = model["lin1"].weight.grad, model["lin1"].bias.grad  # the buffers themselves became the .grad
    assert (w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()) == (buffers == "shared")
    model.zero_grad(set_to_none=True)
    (-2.5 * pen()).backward()
    check(-2.5, "scaled")
    task = {n: torch.randn(p.shape, generator=gen).to(dtype) for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    value = pen()
    (value + sum((p * task[n]).sum() for n, p in params.items())).backward()
    for n, p in params.items():
        close(p.grad, task[n].double() + want[n], tol_w, f"with a task gradient: .grad of {n}")
    model.zero_grad(set_to_none=True)
    value = pen()
    value.backward(retain_graph=True)
    value.backward()
    check(2.0, "retained graph")
    # a frozen parameter: the program's matrices take the differentiable route
    frozen = model["lin1"].weight
    frozen.requires_grad_(False)
    value_ref, grads_ref = reference_run(model, monkeypatch, "grads")
    want = dict(zip(params, grads_ref))
    model.zero_grad(set_to_none=True)
    pen().backward()
    check(1.0, "frozen lin1.weight")


@needs_cpp
def test_penalty_value_without_grad_and_its_backward_contract(gen):
    """Under no_grad the value is computed alone (no graph); a second-order backward is refused; a
    weight stepped in place after penalty() leaves the gradient of the forward's weights (it was
    computed there), while a second backward through the retained graph refuses to recompute from
    changed weights."""
    model, r = _declared_linears(3, gen)
    pen = ProjectionPenalty(model, lambda_perp=0.3)
    with_graph = pen()
    with torch.no_grad():
        plain = pen()
    assert not plain.requires_grad and with_graph.requires_grad
    assert float(plain) == float(with_graph.detach())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(pen(), list(model.parameters()), create_graph=True)
    W = model[0].weight
    W0 = W.detach().clone()
    want = 2 * 0.3 * (W0.double() - ep.reference.project(W0.double(), r, r))
    model.zero_grad(set_to_none=True)
    value = pen()
    with torch.no_grad():
        W.mul_(0.5)
    value.backward(retain_graph=True)
    close(W.grad, want, 1e-5, "gradient at the forward's weights")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def _linears_with_odd_fields(dtype, gen):
    """Linear layers on O(3) irreps, C4 regular fields (permutation pairs) and a quotient field,
    odd sizes, biases, a transposed (non-contiguous) weight; one nearly equivariant weight."""
    O3, C4 = ep.O3(), ep.Cyclic(4)
    r1, r2 = ep.Rep.parse(O3, "3x0e + 1o + 2e"), ep.Rep.parse(O3, "0e + 2x1o")
    reg = 3 * C4.regular() + C4.trivial()
    m = nn.Sequential(declare(nn.Linear(r1.dim, r2.dim), r1, r2), declare(nn.Linear(r2.dim, r1.dim), r2, r1),
                      declare(nn.Linear(reg.dim, reg.dim), reg, reg), declare(nn.Linear(r1.dim, r1.dim, bias=False), r1, r1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        m[0].weight.copy_(nearly_equivariant(m[0].weight.double(), r1, r2, 1e-10, gen))
    m[3].weight = nn.Parameter(m[3].weight.detach().T.contiguous().T)
    return m.to(dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_prepared_program_equals_the_op_bit_for_bit(dtype, gen, monkeypatch):
    """On the CPU the fused matrices run through the C++ kernel's prepared program; it runs the
    op's kernel on the same layers, so every result equals the op route's bit for bit: the value
    with and without grad, gradients into fresh, existing and mixed ``.grad`` (a frozen parameter
    gets none; a non-contiguous one makes the call take the general route), ``penalty()``'s
    handed-over gradients (separate buffers), and the decoupled step; the values (float64 sums
    in another order) equal up to rounding."""
    a = _linears_with_odd_fields(dtype, gen)
    b = copy.deepcopy(a)
    pa = ProjectionPenalty(a, lambda_perp=0.3, lambda_G=0.02)
    with monkeypatch.context() as mp:
        mp.setattr(program, "_PREPARED", False)
        pb = ProjectionPenalty(b, lambda_perp=0.3, lambda_G=0.02)
        pb()
    pa()
    assert pa._program.groups[0]._prepared is not None
    assert pb._program.groups[0]._prepared is None

    def same(what):
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p.detach(), q.detach()), f"{what}: {n}"
            assert (p.grad is None) == (q.grad is None), f"{what}: .grad of {n}"
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), f"{what}: .grad of {n}"

    with torch.no_grad():  # (the values are sums in float64, in another order: equal up to rounding)
        close(pa(), pb(), 1e-14, "penalty() without grad")
    for model in (a, b):
        model.zero_grad(set_to_none=True)
    close(pa.backward(), pb.backward(), 1e-14, "backward() into fresh .grad")
    same("fresh .grad")
    close(pa.backward(), pb.backward(), 1e-14, "backward() into existing .grad")
    same("into existing .grad")
    for model in (a, b):  # mixed: one without .grad, one frozen, one non-contiguous .grad
        model[0].bias.grad = None
        model[1].weight.requires_grad_(False)
        model[1].weight.grad = None
    close(pa.backward(), pb.backward(), 1e-14, "mixed .grad")
    same("mixed .grad")
    for model in (a, b):
        model[2].weight.grad = torch.zeros(model[2].weight.shape[::-1], dtype=dtype).T
    close(pa.backward(), pb.backward(), 1e-14, "a non-contiguous .grad")
    assert not a[2].weight.grad.is_contiguous()
    same("a non-contiguous .grad")
    for model in (a, b):
        model[1].weight.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    va, vb = pa(), pb()
    close(va.detach(), vb.detach(), 1e-14, "penalty()")
    (2.5 * va).backward()
    (2.5 * vb).backward()
    same("penalty().backward()")
    assert a[0].weight.grad.untyped_storage().data_ptr() != a[0].bias.grad.untyped_storage().data_ptr()
    pa.decay_(0.3, rate_G=0.1)
    pb.decay_(0.3, rate_G=0.1)
    same("decay_")


@needs_cpp
def test_prepared_program_refuses_what_it_cannot_write():
    W = torch.randn(6, 4)
    plan = ep._plan.plan_for(ep.Rep.parse(ep.SO3(), "4x0"), ep.Rep.parse(ep.SO3(), "2x1"), W.device)
    args = ([plan.meta], [plan.basis], [plan.perm_out], [plan.perm_in])
    with pytest.raises(ValueError, match="must hold the elements of weight 0"):
        ops.cpu_program([W], [torch.randn(6, 4)], args)
    Wt = torch.randn(4, 6).T
    prog = ops.cpu_program([Wt], [Wt], args)
    prog.set_lambdas([0.5], [0.0])
    with pytest.raises(ValueError, match="must be contiguous"):
        prog.step(-0.1, 0.0)
    e_perp, _ = prog.energies()
    want = ((Wt.double() - ep.reference.project(Wt.double(), *_so3_pair())) ** 2).sum()
    close(e_perp[0], want, 1e-5, "energies of a strided weight")


def _so3_pair():
    return ep.Rep.parse(ep.SO3(), "4x0"), ep.Rep.parse(ep.SO3(), "2x1")


@needs_cpp
def test_a_copied_penalty_prepares_its_own_program(gen):
    model, r = _declared_linears(2, gen)
    pen = ProjectionPenalty(model, lambda_perp=0.1)
    value = pen()
    twin = copy.deepcopy(pen)  # the model is copied with it
    assert twin._program is None and float(twin()) == float(value)
    with torch.no_grad():
        twin._model[0].weight.mul_(2)
    assert float(pen()) == float(value) and float(twin()) != float(value)


@needs_cpp
def test_backward_and_decay_inside_compiled_code_equal_eager(gen):
    """``penalty.backward()`` and ``decay_`` called inside ``torch.compile``d code run eagerly (one
    graph break each) and give what they give outside it."""
    models = [_linears_with_odd_fields(torch.float32, gen)]
    models.append(copy.deepcopy(models[0]))
    x = torch.randn(4, models[0][0].in_features, generator=gen)
    out = []
    for k, model in enumerate(models):
        pen = ProjectionPenalty(model, lambda_perp=0.3, lambda_G=0.02)

        def step(x):
            (model[0](x) ** 2).sum().backward()
            value = pen.backward()
            pen.decay_(0.1)
            return value

        out.append((torch.compile(step, backend="aot_eager") if k else step)(x))
    assert torch.equal(out[0], out[1])
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p.detach(), q.detach())
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))


@needs_cpp
def test_penalty_gradient_reaches_tensor_hooks(gen):
    """``penalty().backward()`` delivers its gradient through autograd: hooks on the parameters see
    it (``register_hook`` before, post-accumulate hooks after it was added to ``.grad``), added to
    a task gradient, as for any other term of a loss."""
    model, r = _declared_linears(2, gen)
    pen = ProjectionPenalty(model, lambda_perp=0.3)
    seen, after = {}, {}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: seen.__setitem__(n, g.clone()))
        p.register_post_accumulate_grad_hook(lambda p, n=n: after.__setitem__(n, p.grad.clone()))
    x = torch.randn(3, r.dim, generator=gen)
    model.zero_grad(set_to_none=True)
    (model(x).sum() + pen()).backward()
    for n, p in model.named_parameters():
        assert torch.equal(seen[n], p.grad) and torch.equal(after[n], p.grad)
    task = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        task[n] -= p.grad
    model.zero_grad(set_to_none=True)
    pen.backward()
    for n, p in model.named_parameters():
        close(task[n], p.grad, 1e-6, f"the penalty's share of the hooked gradient of {n}")
