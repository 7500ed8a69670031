"""``ProjectionPenalty(...)()`` on the CPU: its C++ autograd node as autograd's engine drives it.

The node (``PenaltyBackward``) is a plain ``torch::autograd::Node``: no ``autograd.Function``
machinery materialises missing gradients, wraps outputs or checks saved tensors for it. These probes
go through the engine's other entry points and features: ``inputs=`` and partial
``torch.autograd.grad``, one value in several losses, two values of one penalty alive at once,
undefined incoming gradients, node pre- and post-hooks, ``next_functions``, version counters bumped
without a change of values, anomaly mode, backward from several threads and with more intra-op
threads, what is kept alive after the value is gone, ``torch.func`` transforms and compiled
autograd. The expected gradients are those of ``test_penalty_node_adversarial`` (autograd of the
same penalty on a float64 copy on the ``"reference"`` backend), with its tolerances (1e-5 relative
to the largest entry for float32).
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import pytest
import torch
from torch import nn

from equiproj import Rep, ops
from equiproj.nn import ProjectionPenalty, declare
from test_penalty_node_adversarial import (G, LAMBDAS, R_IN, R_MID, TOL, PassThrough, close, close_all,
                                           is_cpp_node, make_model, reference_grads)

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension is not built")

F32 = TOL[torch.float32]
OTHER_LAMBDAS = dict(lambda_perp={"0": 2.0, "default": 0.1}, lambda_G=0.5)


def grads_of(model):
    return [p.grad for p in model.parameters()]


def test_backward_with_inputs_writes_only_those(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    params = list(model.parameters())
    before = torch.randn(params[2].shape, generator=gen)
    params[2].grad = before.clone()
    value = pen()
    assert is_cpp_node(value)
    torch.autograd.backward(value, inputs=[params[1]], retain_graph=True)
    assert params[0].grad is None and torch.equal(params[2].grad, before)
    close(params[1].grad, want[1], F32, "inputs=[bias]")
    value.backward(inputs=[params[0], params[2]])  # the second run: the kernel again
    close(params[0].grad, want[0], F32, "second backward, inputs=[weight, weight]")
    close(params[1].grad, want[1], F32, "second backward left the bias alone")
    close(params[2].grad, before.double() + want[2], F32, "second backward added to an existing .grad")


def test_grad_of_a_subset_in_any_order_with_unused(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    params = list(model.parameters())
    unrelated = torch.randn(3, requires_grad=True, generator=gen)
    value = pen()
    g2, none, g0 = torch.autograd.grad(value, [params[2], unrelated, params[0]], allow_unused=True,
                                       retain_graph=True)
    assert none is None and all(p.grad is None for p in params)
    close(g2, want[2], F32, "grad of the last parameter")
    close(g0, want[0], F32, "grad of the first parameter")
    # what was handed over is the caller's now: changing it must not reach the next backward
    g2.zero_()
    g0.fill_(float("nan"))
    (g1,) = torch.autograd.grad(value, [params[1]])
    close(g1, want[1], F32, "second grad, after the first's results were overwritten")
    assert all(p.grad is None for p in params)
    with pytest.raises(RuntimeError, match="does not require grad|not have a grad_fn|differentiated"):
        torch.autograd.grad(pen(), [unrelated])


def test_one_value_in_several_losses(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    want_v, want = reference_grads(model, monkeypatch)
    v = float(want_v)
    cases = [
        ("v * v", lambda: [pen()], lambda out: (out[0] * out[0]).backward(), 2 * v),
        ("backward(gradient=-3)", lambda: [pen()], lambda out: out[0].backward(gradient=torch.tensor(-3.0)), -3.0),
        ("two roots, -3 and 0.5", lambda: [pen()],
         lambda out: torch.autograd.backward([out[0], 2 * out[0]], [torch.tensor(-3.0), torch.tensor(0.5)]), -2.0),
        ("two losses summed, one scaled by 0", lambda: [pen()],
         lambda out: (out[0] * 0.0 + out[0].sqrt().square()).backward(), 1.0),
    ]
    for what, build, run, factor in cases:
        model.zero_grad(set_to_none=True)
        run(build())
        close_all(grads_of(model), [factor * w for w in want], F32, what)


def test_two_values_of_one_penalty_alive_at_once(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    want_v1, want1 = reference_grads(model, monkeypatch, LAMBDAS)
    want_v2, want2 = reference_grads(model, monkeypatch, OTHER_LAMBDAS)
    for retain in (False, True):
        model.zero_grad(set_to_none=True)
        pen.set_lambdas(**LAMBDAS)
        v1 = pen()
        pen.set_lambdas(**OTHER_LAMBDAS)
        v2 = pen()  # its run must not write into v1's buffers
        close(v1, want_v1, 1e-6, "first value")
        close(v2, want_v2, 1e-6, "second value")
        v1.backward(retain_graph=retain)  # the older one first
        close_all(grads_of(model), want1, F32, f"older value's backward (retain={retain})")
        v2.backward(retain_graph=retain)
        close_all(grads_of(model), [a + b for a, b in zip(want1, want2)], F32, f"both (retain={retain})")
        if retain:  # second runs: each with its own forward's lambdas, whatever the penalty has now
            pen.set_lambdas(lambda_perp=9.0, lambda_G=9.0)
            v1.backward()
            v2.backward()
            close_all(grads_of(model), [2 * (a + b) for a, b in zip(want1, want2)], F32, "both, twice")


class DropGradient(torch.autograd.Function):
    """The identity, whose backward gives its input no gradient (``None``: an undefined tensor)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("route", ["cpp node", "python node"])
def test_an_undefined_incoming_gradient_contributes_nothing(route, gen):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    x = torch.randn(4, R_IN.dim, generator=gen)
    task = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    with PassThrough() if route == "python node" else torch.autograd.grad_mode.enable_grad():
        value = pen()
    (model(x).square().mean() + DropGradient.apply(value)).backward()
    close_all(grads_of(model), task, F32, "task loss plus a value whose gradient was dropped")


def test_node_hooks_and_next_functions(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    params = list(model.parameters())
    value = pen()
    node = value.grad_fn
    assert node.name() == "PenaltyBackward"
    assert [f.variable for f, _ in node.next_functions] == params  # in the parameters' order
    assert all(type(f).__name__ == "AccumulateGrad" and k == 0 for f, k in node.next_functions)
    assert node.metadata == {} and node._sequence_nr() >= 0
    pre, post = [], []
    node.register_prehook(lambda go: pre.append(go[0].clone()) or (go[0] * 2,))
    node.register_hook(lambda gi, go: post.append(([g.clone() for g in gi], go[0].clone()))
                       or tuple(3 * g for g in gi))
    value.register_hook(lambda g: -g)  # a tensor hook runs before the node's pre-hooks
    value.backward(retain_graph=True)
    value.backward()  # the second run goes through the hooks too
    assert len(pre) == 2 and len(post) == 2
    for k in range(2):
        assert float(pre[k]) == -1.0 and float(post[k][1]) == -2.0
        close_all(post[k][0], [-2 * w for w in want], F32, f"post-hook's grad_inputs, run {k}")
    close_all(grads_of(model), [-12 * w for w in want], F32, "hooked gradients, twice")


def test_the_node_called_directly_then_by_the_engine(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    value = pen()
    with pytest.raises(RuntimeError, match="grad mode on"):  # a call could be differentiated again
        value.grad_fn(torch.tensor(2.0))
    with torch.no_grad():
        first = value.grad_fn(torch.tensor(2.0))  # hands over the forward's gradient
        second = value.grad_fn(torch.tensor(-1.0))  # runs the kernel
    close_all(first, [2 * w for w in want], F32, "direct call")
    close_all(second, [-w for w in want], F32, "second direct call")
    assert all(p.grad is None for p in model.parameters())
    value.backward()
    close_all(grads_of(model), want, F32, "the engine's backward after direct calls")


def test_in_place_ops_on_the_value(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    want_v, want = reference_grads(model, monkeypatch)
    value = pen()
    value.mul_(3.0).add_(1.0)
    assert value.grad_fn.name() != "PenaltyBackward" and value.grad_fn.next_functions[0][0].name() == "MulBackward0"
    close(value, 3 * want_v + 1, 1e-6, "value after mul_ and add_")
    value.backward()
    close_all(grads_of(model), [3 * w for w in want], F32, "gradient through in-place ops on the value")


def test_a_backward_that_skips_the_node_leaves_it_whole(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    x = torch.randn(3, requires_grad=True, generator=gen)
    value = pen()
    called = []
    value.grad_fn.register_prehook(lambda go: called.append(1))
    (gx,) = torch.autograd.grad(2 * x.sum() + value, [x])  # the graph is freed, the penalty's node never ran
    assert torch.equal(gx, torch.full_like(x, 2.0)) and not called
    assert all(p.grad is None for p in model.parameters())
    with torch.autograd.profiler.profile() as prof:
        value.backward()
    assert called and any(e.name == "PenaltyBackward" for e in prof.function_events)
    close_all(grads_of(model), want, F32, "backward of the value after a backward that skipped it")


def test_a_bumped_version_refuses_the_second_backward(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    for bump in ("increment_version", "copy_ of equal values"):
        model.zero_grad(set_to_none=True)
        value = pen()
        value.backward(retain_graph=True)
        pen.set_lambdas(lambda_perp=4.0, lambda_G=0.0)  # the forward's lambdas hold for the retained graph
        value.backward(retain_graph=True)
        close_all(grads_of(model), [2 * w for w in want], F32, f"{bump}: two backwards")
        W = model[2].weight
        if bump == "increment_version":
            torch.autograd.graph.increment_version(W)
        else:
            with torch.no_grad():
                W.copy_(W.detach().clone())  # the same values, a new version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            value.backward()
        close_all(grads_of(model), [2 * w for w in want], F32, f"{bump}: after the refused backward")
        pen.set_lambdas(**LAMBDAS)
        model.zero_grad(set_to_none=True)
        pen().backward()  # a new value at the new version
        close_all(grads_of(model), want, F32, f"{bump}: a new value")


def test_anomaly_mode_names_the_node_and_the_forward(gen):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly():
        warnings.simplefilter("always")
        value = pen()
        with pytest.raises(RuntimeError, match="PenaltyBackward.*nan"):
            value.backward(torch.tensor(float("nan")))
    traces = [str(w.message) for w in caught if "Traceback of forward call" in str(w.message)]
    assert traces and "PenaltyBackward" in traces[0] and "test_penalty_node_engine.py" in traces[0]
    assert all(p.grad is None for p in model.parameters())


def test_backward_from_two_threads(gen, monkeypatch):
    models = [make_model(gen), make_model(gen)]
    pens = [ProjectionPenalty(m, **LAMBDAS) for m in models]
    wants = [reference_grads(m, monkeypatch)[1] for m in models]
    rounds = 3
    barrier = threading.Barrier(2)
    errors, results = [], {}

    def work(key, pen):
        try:
            params = list(pen._model.parameters())
            out = []
            for _ in range(rounds):
                barrier.wait()
                value = pen()
                out.append(torch.autograd.grad(value, params, retain_graph=True))
                out.append(torch.autograd.grad(value, params))  # the kernel runs in the backward
                barrier.wait()
                pen().backward()
            results[key] = out
        except Exception as e:  # reported below, with the thread's name
            errors.append((key, e))
            barrier.abort()

    for case, jobs in [("two models", [("a", pens[0], 0), ("b", pens[1], 1)]),
                       ("one model", [("a", pens[0], 0), ("b", pens[0], 0)])]:
        for m in models:
            m.zero_grad(set_to_none=True)
        results.clear()
        barrier.reset()
        threads = [threading.Thread(target=work, args=(key, pen)) for key, pen, _ in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, f"{case}: {errors}"
        for key, _, i in jobs:
            assert len(results[key]) == 2 * rounds
            for k, grads in enumerate(results[key]):
                close_all(grads, wants[i], F32, f"{case}, thread {key}, grad {k}")
        per_model = {i: sum(1 for _, _, j in jobs if j == i) for _, _, i in jobs}
        for i, n in per_model.items():
            close_all(grads_of(models[i]), [n * rounds * w for w in wants[i]], F32, f"{case}: .grad of model {i}")


def test_more_intra_op_threads_in_the_backward(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    value = pen()
    before = torch.get_num_threads()
    try:
        value.backward(retain_graph=True)
        torch.set_num_threads(2)
        value.backward()  # the kernel runs here, with the new thread count
    finally:
        torch.set_num_threads(before)
    close_all(grads_of(model), [2 * w for w in want], F32, "second backward with 2 threads")


def test_nothing_is_kept_alive_after_the_value(gen):
    def parts():
        model = make_model(gen)
        pen = ProjectionPenalty(model, **LAMBDAS)
        value = pen()
        refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(model), weakref.ref(pen._program)]
        return value, refs

    # never differentiated
    value, refs = parts()
    gc.collect()
    assert all(r() is not None for r in refs[:3]), "the value's node keeps its parameters while it is alive"
    del value
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    # differentiated once with the graph retained, then once more (the kernel ran in the backward)
    value, refs = parts()
    value.backward(retain_graph=True)
    value.backward(retain_graph=True)
    del value
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    # the graph freed: the node may go before the value
    value, refs = parts()
    value.backward()
    gc.collect()
    del value
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


def test_a_freed_graph_after_the_model_was_redeclared(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    value = pen()
    value.backward()
    R2 = Rep.parse(G, "4x0e + 1o + 0o")
    model[2] = declare(nn.Linear(R_MID.dim, R2.dim, bias=False), R_MID, R2)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        value.backward()
    assert model[2].weight.grad is None
    model.zero_grad(set_to_none=True)
    pen().backward()
    _, want = reference_grads(model, monkeypatch)
    close_all(grads_of(model), want, F32, "the re-declared model")


def test_vmap_of_a_function_of_the_value(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    want_v, want = reference_grads(model, monkeypatch)
    scales = torch.tensor([0.5, -2.0, 3.0])
    out = torch.func.vmap(lambda s: pen() * s)(scales)
    close(out, want_v * scales.double(), 1e-6, "vmapped values")
    out.sum().backward()
    close_all(grads_of(model), [float(scales.sum()) * w for w in want], F32, "backward of the vmapped values")


CLEAR_FUNC_ERROR = r"torch\.func|functorch"


def test_func_grad_of_a_task_plus_the_penalty(gen):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen()  # the program exists before the transform
    x = torch.randn(3, R_IN.dim, generator=gen)
    want = torch.func.grad(lambda x: model(x).square().mean())(x)
    # the penalty reads the model's parameters, not x: a constant of the transformed function
    got = torch.func.grad(lambda x: model(x).square().mean() + pen())(x)
    close(got, want, F32, "d(task + penalty)/dx")


class TaskPlusPenalty(nn.Module):
    """A training step's loss as a module: ``functional_call`` swaps the model's parameters under
    both terms (the penalty follows the model it reads)."""

    def __init__(self, model, pen):
        super().__init__()
        self.model, self.pen = model, pen

    def forward(self, x):
        return self.model(x).square().mean() + self.pen()


def test_functional_call_differentiates_the_substitutes(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    step = TaskPlusPenalty(model, pen)
    pen()  # a program for the model's own parameters
    x = torch.randn(3, R_IN.dim, generator=gen)
    subs = {f"model.{k}": (1.5 * v.detach()).requires_grad_() for k, v in model.named_parameters()}
    shifted = make_model(gen)
    with torch.no_grad():
        for p, q in zip(shifted.parameters(), subs.values()):
            p.copy_(q)
    _, want = reference_grads(shifted, monkeypatch)
    task = torch.autograd.grad(shifted(x).square().mean(), list(shifted.parameters()))
    torch.func.functional_call(step, subs, (x,)).backward()
    assert all(p.grad is None for p in model.parameters())
    close_all([q.grad for q in subs.values()], [t.double() + w for t, w in zip(task, want)], F32,
              "functional_call: the substitutes' gradients")
    pen().backward()  # the model's own parameters again
    _, want = reference_grads(model, monkeypatch)
    close_all(grads_of(model), want, F32, "after functional_call")


def test_func_grad_through_functional_call(gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    step = TaskPlusPenalty(model, pen)
    pen()
    x = torch.randn(3, R_IN.dim, generator=gen)
    params = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
    # the parameters are the transform's inputs: refused, saying what to do instead
    with pytest.raises(RuntimeError, match=CLEAR_FUNC_ERROR):
        torch.func.grad(lambda p: torch.func.functional_call(step, p, (x,)))(params)


@pytest.mark.parametrize("route", ["cpp node", "python node"])
def test_compiled_autograd_works_or_says_to_go_without(route, gen, monkeypatch):
    """The Python node's backward compiles. The C++ node implements no ``compiled_args``: compiled
    autograd refuses it with torch's own error, which says how to run that backward without it."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    with PassThrough() if route == "python node" else torch.autograd.grad_mode.enable_grad():
        value = pen()
    try:
        with compiled_autograd._enable(torch.compile(backend="eager")):
            value.backward()
    except Exception as e:  # noqa: BLE001 (an error is acceptable only when it says what to do)
        assert route == "cpp node", f"the Python node under compiled autograd: {e}"
        assert "PenaltyBackward" in str(e) and "disable compiled autograd" in str(e), str(e)
        assert all(p.grad is None for p in model.parameters())
        value.backward()  # without compiled autograd, the same graph still runs
    finally:
        torch._dynamo.reset()
    close_all(grads_of(model), want, F32, f"compiled autograd, {route}")


@pytest.mark.parametrize("route", ["cpp node", "python node"])
def test_batched_incoming_gradients(route, gen, monkeypatch):
    model = make_model(gen)
    pen = ProjectionPenalty(model, **LAMBDAS)
    _, want = reference_grads(model, monkeypatch)
    scales = torch.tensor([1.0, -2.0, 0.5])
    with PassThrough() if route == "python node" else torch.autograd.grad_mode.enable_grad():
        value = pen()
    got = torch.autograd.grad(value, list(model.parameters()), grad_outputs=scales, is_grads_batched=True)
    for g, w in zip(got, want):
        assert g.shape == (len(scales), *w.shape)
        for k, s in enumerate(scales.tolist()):
            close(g[k], s * w, F32, f"batched gradient {k}")


class PenaltyOf(nn.Module):
    """The penalty as a module's forward, so that ``functional_call`` can put dual tensors in."""

    def __init__(self, model, pen):
        super().__init__()
        self.model, self.pen = model, pen

    def forward(self):
        return self.pen()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward AD
@pytest.mark.parametrize("route", ["cpp node", "no grad", "reference"])
def test_forward_mode_ad_gives_the_directional_derivative_or_refuses(route, gen, monkeypatch):
    fwAD = torch.autograd.forward_ad
    model = make_model(gen)
    _, want = reference_grads(model, monkeypatch)
    if route == "reference":
        monkeypatch.setenv(ops.ENV_VAR, "reference")
    pen = ProjectionPenalty(model, **LAMBDAS)
    pen()
    tangents = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    expected = sum(float((w * t.double()).sum()) for w, t in zip(want, tangents))
    with fwAD.dual_level():
        duals = {f"model.{k}": fwAD.make_dual(p.detach().clone().requires_grad_(route != "no grad"), t)
                 for (k, p), t in zip(model.named_parameters(), tangents)}
        if route != "reference":  # the fused kernels read values only: refused, not a value without tangent
            with pytest.raises(RuntimeError, match="forward-mode AD"):
                torch.func.functional_call(PenaltyOf(model, pen), duals, ())
            return
        tangent = fwAD.unpack_dual(torch.func.functional_call(PenaltyOf(model, pen), duals, ())).tangent
    assert tangent is not None, "the penalty's value lost the parameters' tangents"
    got = float(tangent.detach())
    assert abs(got - expected) <= F32 * max(1.0, abs(expected)), (got, expected)
