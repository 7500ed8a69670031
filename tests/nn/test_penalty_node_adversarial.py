"""``ProjectionPenalty(...)()`` on the CPU: the value's autograd node, as a training loop uses it.

On the CPU with the C++ extension, the penalty's value is a 0-dim tensor whose node holds the
gradient the kernel wrote in the forward and hands it over in the backward (scaled where the
incoming gradient is not 1); a second backward through a retained graph runs the kernel again with
the forward's lambdas, and refuses if a weight changed in place. These probes use it the ways autograd allows: scaled, summed with a task loss,
used twice, differentiated by ``torch.autograd.grad``, retained, after an in-place change of a weight,
after the model is gone, with parameter hooks, with an existing ``.grad``, frozen, mixed and float64
dtypes, tied weights, under ``no_grad`` / ``inference_mode`` / ``autocast`` / ``torch.compile`` /
anomaly mode / activation checkpointing / saved-tensor hooks,
copied and pickled, with incoming gradients of other dtypes and layouts, and with layers re-declared
between calls. The layers carry many scalar fields (the kernel's joined rows) beside vector fields.

The expected gradient is autograd's of the same penalty on a float64 copy of the model on the
``"reference"`` backend (the spatial-domain projection). Tolerances, relative to the largest entry:
1e-5 for float32 models, 1e-10 for float64, 1e-2 / 2e-3 for gradients written in bfloat16 / float16
(values 1e-6: they are float32, from the same rounded weights).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import pickle

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import equiproj
from equiproj import Rep, ops
from equiproj.nn import ProjectionPenalty, declare
from equiproj.testing import nearly_equivariant

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension is not built")

G = equiproj.O3()
#: scalar fields in runs split by vector fields: spanning 0e -> 0e pairs, r = 0 pairs joined, many 1-row blocks
R_IN = Rep.parse(G, "5x0e + 2x1o + 3x0e + 0o")
R_MID = Rep.parse(G, "40x0e + 1o + 9x0e")
R_OUT = Rep.parse(G, "3x0e + 2e")
LAMBDAS = dict(lambda_perp={"0": 0.7, "default": 0.3}, lambda_G=0.05)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_model(gen, dtype=torch.float32, near=False):
    m = nn.Sequential(declare(nn.Linear(R_IN.dim, R_MID.dim), R_IN, R_MID), nn.Tanh(),
                      declare(nn.Linear(R_MID.dim, R_OUT.dim, bias=False), R_MID, R_OUT))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        if near:
            m[0].weight.copy_(nearly_equivariant(m[0].weight.double(), R_IN, R_MID, 1e-10, gen))
    return m.to(dtype)


def reference_grads(model, monkeypatch, lambdas=LAMBDAS):
    """(value, [gradient per parameter]) of the penalty of a float64 copy of ``model`` on the reference backend."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q.double())
            p.grad = None
            p.requires_grad_(True)
    with monkeypatch.context() as mp:
        mp.setenv(ops.ENV_VAR, "reference")
        value = ProjectionPenalty(ref, **lambdas)()
        grads = torch.autograd.grad(value, list(ref.parameters()), allow_unused=True)
    return value.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ref.parameters())]


def close(got, want, tol, what):
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"


def close_all(gots, wants, tol, what):
    for k, (g, w) in enumerate(zip(gots, wants)):
        assert g is not None, f"{what}: parameter {k} has no gradient"
        close(g, w, tol, f"{what} parameter {k}")


def is_cpp_node(value):
    return value.grad_fn is not None and type(value.grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backward_matches_reference(dtype, gen, monkeypatch):
    for near in (False, True):
        model = make_model(gen, dtype=dtype, near=near)
        pen = ProjectionPenalty(model, **LAMBDAS)
        value = pen()
        assert is_cpp_node(value) and value.dtype == torch.float32 and value.dim() == 0
        value.backward()
        want_v, want_g = reference_grads(model, monkeypatch)  # of the same rounded weights
        close(value, want_v, 1e-6, "value")
        assert all(p.grad.dtype == dtype for p in model.parameters())
        close_all([p.grad for p in model.parameters()], want_g, TOL[dtype], f"{dtype} near={near}")


def test_scaled_summed_and_used_twice(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    x = torch.randn(4, R_IN.dim, generator=gen)
    for what, build, factor in [("-2.5 v", lambda v: -2.5 * v, -2.5), ("v + v", lambda v: v + v, 2.0),
                                ("v * v / v", lambda v: v * 3.0 / 3.0, 1.0)]:
        model.zero_grad(set_to_none=True)
        build(pen()).backward()
        close_all([p.grad for p in model.parameters()], [factor * w for w in want], TOL[torch.float32], what)
    # with a task loss: its gradient plus the penalty's
    model.zero_grad(set_to_none=True)
    task = model(x).square().mean()
    task_grads = torch.autograd.grad(task, list(model.parameters()))
    model.zero_grad(set_to_none=True)
    (model(x).square().mean() + pen()).backward()
    close_all([p.grad for p in model.parameters()], [t.double() + w for t, w in zip(task_grads, want)],
              TOL[torch.float32], "task + penalty")


@pytest.mark.parametrize("incoming", ["float64", "offset", "neg_view", "expanded", "nan"])
def test_incoming_gradient_forms(incoming, gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    value = pen()
    if incoming == "float64":
        g, factor = torch.tensor(-1.75, dtype=torch.float64), -1.75
    elif incoming == "offset":  # a 0-dim view with a storage offset
        g, factor = torch.tensor([5.0, 3.0, 7.0])[1], 3.0
    elif incoming == "neg_view":
        g, factor = torch.tensor(2.0)._neg_view(), -2.0
    elif incoming == "expanded":
        g, factor = torch.tensor([0.5]).expand(4)[2], 0.5
    else:
        g, factor = torch.tensor(float("nan")), float("nan")
    torch.autograd.backward([value], [g])
    if incoming == "nan":
        assert all(bool(p.grad.isnan().all()) for p in model.parameters())
        return
    close_all([p.grad for p in model.parameters()], [factor * w for w in want], TOL[torch.float32], incoming)


def test_autograd_grad_leaves_dot_grad_alone(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)
    grads = torch.autograd.grad(pen(), params)
    _, want = reference_grads(model, monkeypatch)
    close_all(grads, want, TOL[torch.float32], "autograd.grad")
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.25))
    assert all(p.grad is None for p in params[1:])
    # a subset of the parameters
    (g1,) = torch.autograd.grad(pen(), [params[1]])
    close(g1, want[1], TOL[torch.float32], "autograd.grad of one parameter")


def test_existing_grad_is_added_to(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    before = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    for p, b in zip(model.parameters(), before):
        p.grad = b.clone()
    pen().backward()
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], [b.double() + w for b, w in zip(before, want)],
              TOL[torch.float32], "existing .grad")


def test_retain_graph_twice_doubles(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    value = pen()
    value.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    value.backward(retain_graph=True)
    _, want = reference_grads(model, monkeypatch)
    close_all(first, want, TOL[torch.float32], "first backward")
    close_all([p.grad for p in model.parameters()], [2 * w for w in want], TOL[torch.float32], "second backward")
    (-value).backward()  # a third, scaled
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "third backward (-1)")


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: under it the penalty takes the op route and its Python
    ``autograd.Function`` (the CPU's prepared program and its C++ node otherwise)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


ROUTES = {"cpp node": contextlib.nullcontext, "python node": PassThrough}


@pytest.mark.parametrize("route", list(ROUTES))
def test_retained_graph_keeps_the_forward_lambdas(route, gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    with ROUTES[route]():
        value = pen()
    value.backward(retain_graph=True)
    pen.set_lambdas(lambda_perp=5.0, lambda_G=1.0)  # e.g. a schedule's next step, before the graph is freed
    value.backward()
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], [2 * w for w in want], TOL[torch.float32],
              "second backward of the same value")


def test_weight_changed_in_place_between_forward_and_backward(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)  # at the forward's weights
    value = pen()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    value.backward(retain_graph=True)  # the gradient the forward wrote
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "first backward")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


@pytest.mark.parametrize("route", list(ROUTES))
def test_weight_changed_in_place_under_saved_tensor_hooks(route, gen, monkeypatch):
    """Saved-tensor hooks that copy what is saved (offloading) hide an in-place change from the saved
    tensors; the second backward, which runs the kernel on the weights as they are, still refuses."""
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t), ROUTES[route]():
        value = pen()
    value.backward(retain_graph=True)
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "first backward")
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_anomaly_mode_and_checkpoint(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    with torch.autograd.set_detect_anomaly(True):
        pen().backward()
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "anomaly mode")
    model.zero_grad(set_to_none=True)
    x = torch.randn(3, R_IN.dim, generator=gen)
    task = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    torch.utils.checkpoint.checkpoint(lambda x: model(x).sum() + pen(), x, use_reentrant=False).backward()
    close_all([p.grad for p in model.parameters()], [t.double() + w for t, w in zip(task, want)],
              TOL[torch.float32], "checkpointed step")


def test_backward_after_the_model_and_penalty_are_gone(gen, monkeypatch):
    model = make_model(gen)
    _, want = reference_grads(model, monkeypatch)
    params = list(model.parameters())
    value = ProjectionPenalty(model, **LAMBDAS)()
    del model
    gc.collect()
    value.backward(retain_graph=True)
    close_all([p.grad for p in params], want, TOL[torch.float32], "after del")
    value.backward()  # the second run uses the program the node keeps
    close_all([p.grad for p in params], [2 * w for w in want], TOL[torch.float32], "after del, twice")


def test_parameter_hooks_see_the_penalty_gradient(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    W = model[0].weight
    seen, accumulated = [], []
    W.register_hook(lambda g: seen.append(g.clone()) or 2 * g)  # the hook's result is what accumulates
    W.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    pen().backward()
    assert len(seen) == 1 and len(accumulated) == 1
    close(seen[0], want[0], TOL[torch.float32], "register_hook")
    close(accumulated[0], 2 * want[0], TOL[torch.float32], "post-accumulate hook")
    close(W.grad, 2 * want[0], TOL[torch.float32], ".grad after the hook")


def test_mixed_and_float64_models(gen, monkeypatch):
    model = make_model(gen, dtype=torch.float64)
    pen = ProjectionPenalty(model, **LAMBDAS)
    value = pen()
    assert value.dtype == torch.float64 and is_cpp_node(value)
    value.backward()
    want_v, want = reference_grads(model, monkeypatch)
    close(value, want_v, 1e-12, "float64 value")
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float64], "float64")
    for p, w in zip(model.parameters(), want):
        assert p.grad.dtype == torch.float64
    # one float64 layer and one float32 layer
    mixed = make_model(gen)
    mixed[0].double()
    value = ProjectionPenalty(mixed, **LAMBDAS)()
    assert value.dtype == torch.float32  # float64 only where every weight is float64
    value.backward()
    _, want = reference_grads(mixed, monkeypatch)
    for p, w in zip(mixed.parameters(), want):
        assert p.grad.dtype == p.dtype
        close(p.grad, w, TOL[p.dtype] if p.dtype == torch.float64 else TOL[torch.float32], f"mixed {p.dtype}")


def test_frozen_parameters(gen, monkeypatch):
    model = make_model(gen)
    model[0].weight.requires_grad_(False)
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen().backward()
    _, want = reference_grads(model, monkeypatch)
    assert model[0].weight.grad is None
    close(model[0].bias.grad, want[1], TOL[torch.float32], "bias beside a frozen weight")
    close(model[2].weight.grad, want[2], TOL[torch.float32], "other layer")
    for p in model.parameters():
        p.requires_grad_(False)
    value = pen()
    assert not value.requires_grad


def test_tied_weights(gen, monkeypatch):
    R = Rep.parse(G, "30x0e + 1o + 4x0e")
    model = nn.Sequential(declare(nn.Linear(R.dim, R.dim), R, R), declare(nn.Linear(R.dim, R.dim), R, R))
    model[1].weight = model[0].weight
    pen = ProjectionPenalty(model, **LAMBDAS)
    value = pen()
    value.backward()
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "tied")


def test_grad_modes_and_autocast(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    plain = pen().detach()
    with torch.no_grad():
        a = pen()
    with torch.inference_mode():
        b = pen()
    assert not a.requires_grad and not b.requires_grad
    assert float(a) == float(plain) and float(b) == float(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = pen()
        c.backward()
    assert c.dtype == torch.float32 and float(c.detach()) == float(plain)
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "autocast")


def test_compiled_step(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    x = torch.randn(5, R_IN.dim, generator=gen)

    def step(x):
        return model(x).square().mean() + pen()

    compiled = torch.compile(step, backend="aot_eager")
    loss_c = compiled(x)
    loss_c.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_e = step(x)
    loss_e.backward()
    assert float(loss_c.detach()) == pytest.approx(float(loss_e.detach()), rel=1e-6)
    close_all(got, [p.grad for p in model.parameters()], 1e-6, "compiled vs eager")


def test_deepcopy_and_pickle(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen()  # a program prepared before the copy
    for what, copy_of in [("deepcopy", copy.deepcopy), ("pickle", lambda p: pickle.loads(pickle.dumps(p)))]:
        other = copy_of(pen)
        other_model = other._model
        assert other_model is not model
        with torch.no_grad():
            other_model[0].weight.mul_(0.5)  # the copy follows its own model
        value = other()
        value.backward()
        assert model[0].weight.grad is None
        _, want = reference_grads(other_model, monkeypatch)
        close_all([p.grad for p in other_model.parameters()], want, TOL[torch.float32], what)


def test_double_backward_is_refused(gen):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(pen(), list(model.parameters()), create_graph=True)


def test_a_freed_graph_refuses_a_second_backward(gen, monkeypatch):
    """The node's edges lead to the parameters' accumulators only; once the engine freed the graph
    (no retain_graph) a second backward raises autograd's own error instead of running again."""
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    value = pen()
    assert is_cpp_node(value) and value.grad_fn.name() == "PenaltyBackward"
    leaves = {id(f.variable) for f, _ in value.grad_fn.next_functions}
    assert leaves == {id(p) for p in model.parameters()}
    value.backward()
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "first backward")
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        value.backward()
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "after the refused backward")


def test_redeclared_layers_between_calls(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    old = pen()
    R2 = Rep.parse(G, "4x0e + 1o + 0o")
    new_in = Rep.parse(G, "4x0e + 2x1o + 0o + 3x0e + 0o")  # the same dimension as R_IN, other fields
    assert new_in.dim == R_IN.dim
    model[0] = declare(nn.Linear(R_IN.dim, R_MID.dim), new_in, R_MID)
    model[2] = declare(nn.Linear(R_MID.dim, R2.dim, bias=False), R_MID, R2)
    new = pen()
    new.backward()
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], "re-declared")
    old.backward()  # the old value's node still differentiates its own (now detached) parameters
    assert float(old.detach()) != float(new.detach())


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_non_contiguous_parameters(layout, gen, monkeypatch):
    if layout == "transposed":
        model = make_model(gen)
        model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
    else:
        R1, R2 = Rep.parse(G, "3x0e + 1o"), Rep.parse(G, "12x0e + 0o")
        model = nn.Sequential(declare(nn.Conv2d(R1.dim, R2.dim, 3), R1, R2, kernel_space="channels"), declare(nn.Linear(R1.dim, R1.dim), R1, R1))
        model[0].to(memory_format=torch.channels_last)
    assert not next(iter(model.parameters())).is_contiguous()
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen().backward()
    _, want = reference_grads(model, monkeypatch)
    close_all([p.grad for p in model.parameters()], want, TOL[torch.float32], layout)
