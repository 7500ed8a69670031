"""The penalty program: a model's terms prepared once, then one call per kind of term per step.

:class:`PenaltyProgram` is built from the declared layers of a model (their terms, grouped by
kind). Matrix terms that run on a fused kernel (``"cpp"``, ``"triton"``) are prepared as a
:class:`FusedMatrices` group: the weights' matrix views, the packed plans, the device's kernel and
the coefficient tensors are made once, and ``penalty()``, ``penalty.backward()`` and
``penalty.decay_()`` each issue one call of ``equiproj::fused_energies`` for all of them, writing
into the parameters' ``.grad`` or the parameters themselves, with no Python per layer. On the CPU
that call is the C++ kernel's prepared program (:func:`equiproj.ops.cpu_program`), which holds the
views, parameters, plans and lambdas, reads and writes the ``.grad`` attributes itself and returns
the weighted value: no tensor list crosses the boundary per call. ``penalty()`` writes the
gradient in its one call as well, into fresh buffers its autograd node hands over in the backward
(on the CPU the prepared program's own C++ node, elsewhere :func:`equiproj.ops.prepared_penalty`).
The coefficients are made once, in the dtype the device's kernel reads without a conversion, and
what :meth:`PenaltyProgram.current` compares is kept as flat lists compared by C-level loops.
Steerable kernel terms on the CPU are prepared as well: each layer's C++ pass bound once to its
weight and tables (:meth:`Term.pass_runners`), which ``backward()``, ``decay_()`` and ``penalty()``
call directly (``penalty()`` writing the gradient its autograd node hands over). The other kinds
(translations, other kernel spaces, matrices on the ``"torch"`` or ``"reference"`` backend) take one
:meth:`Term.one_pass` or :meth:`Term.energies` call per kind.

The program holds views of the parameters. :meth:`PenaltyProgram.current` tells whether it still
describes the model: the modules at the declared paths (each link of each path), the parameters
registered in them, and the storage of every parameter (a dtype or device change,
``model.to(...)``, replaces it). Layers whose weight is computed (a parametrization) or whose
matrix form is a copy are read again at each call. The penalty
rebuilds it when either changed or a layer was declared, re-declared or undeclared.

A parameter used by several terms (tied weights) is written by one term per call: its first use
goes with the others, each later use in a group of its own (the gradients add up; for the
decoupled step the later uses' steps are computed before the first use writes, then added, so a
tied parameter takes one step with the sum).
"""

from __future__ import annotations

import math
import operator

import torch

from .. import ops
from .._plan import plan_for
from ._declaration import MatrixTerm, Term, batches, inplace_view
from ._tensors import accumulate_grad, is_dtensor, no_autocast

__all__ = ["PenaltyProgram", "FusedMatrices", "TermGroup", "module_chain", "as_value"]

_FUSED = ("cpp", "triton")
_grad = operator.attrgetter("grad")
_requires_grad = operator.attrgetter("requires_grad")
_data_ptr = torch.Tensor.data_ptr
_SEPARATE_GRADS_NUMEL = 4096  # mean elements per parameter above which penalty()'s gradients get their own buffers
_PREPARED = True  # CPU groups run through the C++ kernel's prepared program (False: the op call, as on other devices)


def module_chain(root: torch.nn.Module, names) -> list[tuple[dict, str, torch.nn.Module]]:
    """``(parent._modules, key, child)`` for every link of every path in ``names`` (once each): the
    modules at those paths are unchanged while every ``parent._modules[key] is child``."""
    links, seen = [], set()
    for name in names:
        m = root
        for key in name.split(".") if name else ():
            child = m._modules[key]
            if (id(m), key) not in seen:
                seen.add((id(m), key))
                links.append((m._modules, key, child))
            m = child
    return links


def as_value(value, dtype: torch.dtype) -> torch.Tensor:
    """A penalty's value (a Python float, or a tensor) as a 0-dim tensor of ``dtype``."""
    return torch.scalar_tensor(value, dtype=dtype) if isinstance(value, float) else value.to(dtype)


def _layout(p: torch.Tensor) -> tuple:
    return p.data_ptr(), p.dtype, p.shape, p.stride()


def _one_item(value: float) -> torch.Tensor:
    """``[value]`` as the float64 one-element tensor a prepared pass takes for a coefficient."""
    return torch.tensor([float(value)], dtype=torch.float64)


def _shares_storage(weight: torch.Tensor, param: torch.Tensor) -> bool:
    return weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


class TermGroup:
    """Terms of one kind, computed through their kind's :meth:`Term.energies` and :meth:`Term.one_pass`,
    or through the passes the kind prepares for them (:meth:`Term.pass_runners`) where those apply."""

    def __init__(self, terms: list[Term], owners: list[int], backend: str = "auto"):
        self.terms, self.owners = terms, owners
        self.kind = type(terms[0])
        self.params = [t.param for t in terms]
        # the kind's passes prepared once (Term.pass_runners): a call runs them with no per-call
        # checks, plan lookups or tensor lists (on small layers those cost more than the pass)
        self._runners = self.kind.pass_runners(terms, backend)
        if self._runners is not None:
            self._run_weights = [t.weight.detach() for t in terms]
            # what the passes were bound to: a `.data` assignment can keep the storage and change the
            # strides, which PenaltyProgram.current() does not look at
            self._run_layout = list(map(_layout, self.params))
            # an energy or a value beyond the weights' dtype is not finite there (as on the general route)
            self._run_limits = [torch.finfo(w.dtype).max for w in self._run_weights]
            self._value_limit = min(self._run_limits)
            # the decoupled step writes each parameter through its weight form
            self._run_inplace = all(v is not None for v in (inplace_view(t, t.param) for t in terms))
            self._param_ids = frozenset(id(p) for p in self.params)
            self._decay_lambdas: dict = {}
        self.set_lambdas([0.0] * len(terms), [0.0] * len(terms))

    def set_lambdas(self, lambda_perp: list[float], lambda_G: list[float]) -> None:
        self.lambda_perp, self.lambda_G = list(lambda_perp), list(lambda_G)
        self._weights = None
        if self._runners is not None:
            self._run_lambdas = [(_one_item(lp), _one_item(lg)) for lp, lg in zip(self.lambda_perp, self.lambda_G)]

    def lambda_tensors(self, dtype, device):
        if self._weights is None or self._weights[0].dtype != dtype or self._weights[0].device != device:
            self._weights = (torch.tensor(self.lambda_perp, dtype=dtype, device=device),
                             torch.tensor(self.lambda_G, dtype=dtype, device=device))
        return self._weights

    def energies(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kind.energies(self.terms)

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        """``sum lambda_perp E_perp + lambda_G E_G`` of these terms, a differentiable scalar of ``dtype``.
        Through the prepared passes: without grad mode the energies alone; with it (every parameter
        trainable) the passes also write the gradient, which the backward hands over (as for the
        fused matrices: no second pass over the weights)."""
        if self._runners is not None and self._passes_apply():
            lambdas = (self._run_lambdas, self.lambda_perp, self.lambda_G)  # the forward's, for every backward
            if not torch.is_grad_enabled():
                return as_value(self._checked(*self._run_passes([None] * len(self.params), [0] * len(self.params),
                                                                lambdas)), dtype)
            if all(map(_requires_grad, self.params)):
                return ops.prepared_penalty(lambda: self._run_fresh(lambdas), dtype, self.params)
        ep, eg = self.energies()
        lp, lg = self.lambda_tensors(ep.dtype, ep.device)
        total = (ep * lp).sum()
        if any(self.lambda_G):
            total = total + (eg * lg).sum()
        return total.to(dtype)

    def backward(self) -> torch.Tensor | float:
        """Add ``lambda_perp dE_perp + lambda_G dE_G`` to the parameters' gradients; the penalty's value."""
        if self._runners is not None and self._passes_apply():
            value = self._run_backward()
            if value is not None:
                return value
        trainable = [k for k, t in enumerate(self.terms) if t.param.requires_grad]
        outs = [None] * len(self.terms)
        for k in trainable:
            outs[k] = inplace_view(self.terms[k], self.terms[k].param.grad)
        ep, eg, grads = self.kind.one_pass(self.terms, self.lambda_perp, self.lambda_G, outs)
        for k in trainable:
            if outs[k] is None:
                accumulate_grad(self.terms[k].param, grads[k])
        lp, lg = self.lambda_tensors(torch.float64, ep.device)
        return (ep.double() * lp).sum() + (eg.double() * lg).sum()

    def _run_backward(self) -> float | None:
        """:meth:`backward` through the prepared passes: the value (a float), or ``None`` with nothing
        run where a parameter is frozen or its ``.grad`` is not a plain tensor that
        :func:`inplace_view` can write through (the kind's :meth:`Term.one_pass` then handles it)."""
        outs, writes = [], []
        for t, p in zip(self.terms, self.params):
            if not p.requires_grad:
                return None
            g = p.grad
            if g is None:
                outs.append(torch.empty(p.shape, dtype=p.dtype, device=p.device))
                writes.append(1)
            elif type(g) is torch.Tensor and (view := inplace_view(t, g)) is not None:
                outs.append(view)
                writes.append(2)
            else:
                return None
        value = self._checked(*self._run_passes(outs, writes, (self._run_lambdas, self.lambda_perp, self.lambda_G)))
        for p, g, write in zip(self.params, outs, writes):
            if write == 1:
                p.grad = g
        return value

    def _run_fresh(self, lambdas) -> tuple[float, list]:
        """The value and the gradients in new tensors shaped like the parameters, by the prepared passes
        (also for a second backward through a retained graph, which refuses parameters replaced since,
        as the fused matrices' node does)."""
        if list(map(_layout, self.params)) != self._run_layout:
            raise RuntimeError("a parameter of the penalty was replaced or laid out anew (model.to(...), a .data "
                               "assignment) since penalty() was called: call penalty() again")
        grads = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        return self._checked(*self._run_passes(grads, [1] * len(grads), lambdas)), grads

    def _passes_apply(self) -> bool:
        """Whether the prepared passes run now: no dispatch mode active (it sees the general route's ops),
        and every parameter laid out as when they were bound."""
        return not torch._C._len_torch_dispatch_stack() and list(map(_layout, self.params)) == self._run_layout

    def _run_passes(self, outs, writes, lambdas) -> tuple[float, bool]:
        """Each prepared pass into its ``outs[k]`` (``writes[k]``: 0 energies only, 1 written, 2 added),
        ``lambdas = (float64 [1] coefficient pairs, lambda_perp, lambda_G)``: the value ``sum lambda_perp
        E_perp + lambda_G E_G`` (a float) and whether every energy is finite."""
        total, finite = 0.0, True
        for run, out, write, (lp, lg), cp, cg, limit in zip(self._runners, outs, writes, *lambdas, self._run_limits):
            ep, eg = run(lp, lg, out, write)
            e_perp, e_g = ep.item(), eg.item()
            finite = finite and abs(e_perp) <= limit and abs(e_g) <= limit  # False for NaN
            total += cp * e_perp + cg * e_g
        return total, finite

    def _checked(self, total: float, finite: bool) -> float:
        if not finite:
            raise ValueError("the energy is not finite: the weight contains NaN or Inf")
        if not abs(total) <= self._value_limit:
            raise ValueError(f"the penalty's value ({total:.3g}) is beyond the range of the weights' dtype: make "
                             "the lambdas or the weights smaller")
        return total

    def decay_(self, rate: float, rate_G: float) -> set:
        """The decoupled step on the terms whose parameter can be written in place; their parameter ids."""
        if self._runners is not None and self._run_inplace and self._passes_apply():
            key = (rate, rate_G)
            if key not in self._decay_lambdas:  # one entry: a schedule changes the rate every step at most
                self._decay_lambdas = {key: (_one_item(-rate / 2), _one_item(-rate_G / 2))}
            lp, lg = self._decay_lambdas[key]
            for run, w in zip(self._runners, self._run_weights):
                run(lp, lg, w, 2)
            return self._param_ids
        views = [inplace_view(t, t.param) for t in self.terms]
        ks = [k for k, v in enumerate(views) if v is not None]
        if ks:
            self.kind.one_pass([self.terms[k] for k in ks], [-rate / 2] * len(ks), [-rate_G / 2] * len(ks),
                               [views[k] for k in ks], energies=False)
        return {id(self.terms[k].param) for k in ks}


    def decay_steps(self, rate: float, rate_G: float) -> list:
        """The decoupled steps ``-rate (W - P W) - rate_G P W`` of these terms in fresh tensors, written nowhere."""
        n = len(self.terms)
        return self.kind.one_pass(self.terms, [-rate / 2] * n, [-rate_G / 2] * n, None)[2]

    def add_to_params_(self, steps: list) -> None:
        """Add ``steps`` (from :meth:`decay_steps`) to the parameters in place."""
        with torch.no_grad():
            for t, step in zip(self.terms, steps):
                # the weight form is the parameter's elements in order (a view where it is contiguous)
                t.param.detach().add_(step.reshape(t.param.shape).to(t.param.dtype))


class FusedMatrices(TermGroup):
    """Matrix terms on one device whose backend is a fused kernel, prepared for one op call each:
    the weights' matrix views (differentiable and detached), the packed plans, the kernel."""

    def __init__(self, terms: list[MatrixTerm], owners: list[int], device: torch.device):
        self.views = [t.weight for t in terms]  # differentiable views of the parameters
        self.weights = [v.detach() for v in self.views]
        plans = [plan_for(t.rep_in, t.rep_out, device) for t in terms]
        ops.remember_plans(plans)
        self.plan_args = ([P.meta for P in plans], [P.basis for P in plans], [P.perm_out for P in plans],
                          [P.perm_in for P in plans])
        self.kernel = ops.device_kernel(device)
        self.device = device
        # a parameter's .grad may be written directly when its dtype is the weight's and it is contiguous
        self._dtypes = [w.dtype for w in self.weights]
        self._numels = [w.numel() for w in self.weights]
        self._flat_size = sum(self._numels) if len(set(self._dtypes)) == 1 else None
        # penalty()'s gradient buffers: for large parameters one allocation each, so that autograd
        # adds the task gradient in place (measured: -30 µs on a 365 KB model); for many small ones
        # views of one buffer (an allocation costs more than the sum it saves)
        self._penalty_grads = (self._separate_grads if self._flat_size is None
                               or self._flat_size >= _SEPARATE_GRADS_NUMEL * len(self._numels) else self._new_grads)
        self._states: list = []  # (grads, requires_grad, calls) of the last two kinds of backward
        self._decay_coefs: dict = {}
        # on the CPU, the C++ kernel prepared once on these weights, parameters and plans: a call
        # converts no tensor lists and looks up no plans (measured: half the op call on 50 layers)
        self._prepared = ops.cpu_program(self.weights, [t.param for t in terms], self.plan_args) if _PREPARED else None
        super().__init__(terms, owners)
        # whether each parameter can be stepped in place through its matrix view
        self._inplace = all(not is_dtensor(p) and p.is_contiguous() and p.dtype == w.dtype
                            for p, w in zip(self.params, self.weights))
        self._param_ids = frozenset(id(p) for p in self.params)
        self.num_params = len(self._param_ids)

    def set_lambdas(self, lambda_perp, lambda_G) -> None:
        super().set_lambdas(lambda_perp, lambda_G)
        self._any_G = any(lambda_G)
        if self._prepared is not None:
            self._prepared.set_lambdas(list(map(float, lambda_perp)), list(map(float, lambda_G)))
        self._coefs = ([ops.kernel_coefficient(c, w, "lambda_perp") for c, w in zip(lambda_perp, self.weights)],
                       [ops.kernel_coefficient(c, w, "lambda_G") for c, w in zip(lambda_G, self.weights)])
        self._states = []

    def energies(self):
        return ops.prepared_energies(self.kernel, self.plan_args, self.views)

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        """The penalty of these terms from one op call. Where it will be differentiated (grad mode on,
        every parameter trainable), the call also writes the gradient, which the backward hands
        over: no second pass over the weights. Without grad mode, the energies alone."""
        prepared = self._prepared if not torch._C._len_torch_dispatch_stack() else None  # a mode sees the op
        if torch.is_grad_enabled():
            if all(map(_requires_grad, self.params)):
                if prepared is not None:  # the C++ program's own autograd node
                    return prepared.penalty(dtype == torch.float64)
                coefs = self._coefs  # the forward's, also for a second backward after set_lambdas
                return ops.prepared_penalty(lambda: self._fresh_run(coefs), dtype, self.params)
            if any(map(_requires_grad, self.params)):  # frozen parameters get no gradient written
                with no_autocast(self.device):
                    return super().value(dtype)
        if prepared is not None:
            return as_value(prepared.value(), dtype)
        ep, eg = self.kernel(self.weights, *self.plan_args, [], [], [], False)
        return as_value(self.weighted_sum(ep, eg), dtype)

    def _fresh_run(self, coefs):
        """The op with the lambdas' coefficients ``coefs`` (``self._coefs`` when they were made), the
        gradients written into new buffers: ``(value, grads)`` (the value as :meth:`weighted_sum`
        gives it, with the current lambdas)."""
        grads = self._penalty_grads()
        ep, eg = self.kernel(self.weights, *self.plan_args, *coefs, grads, False)
        return self.weighted_sum(ep, eg), grads

    def weighted_sum(self, ep: torch.Tensor, eg: torch.Tensor, idx=None):
        """``sum lambda_perp E_perp + lambda_G E_G`` of the op's flat energies (of the terms ``idx``;
        all when ``None``) in float64: a Python float on the CPU, where reading the few energies and
        summing them costs less than the tensor operations, each of which meets cold caches in a
        training step (the prepared program returns this sum itself); a 0-dim tensor elsewhere (no
        device synchronisation)."""
        if self.device.type != "cpu":
            lp, lg = self.lambda_tensors(torch.float64, self.device)
            if idx is not None:
                sel = torch.tensor(idx, device=self.device)
                lp, lg = lp[sel], lg[sel]
            return torch.dot(torch.cat((ep, eg)).double(), torch.cat((lp, lg)))
        lp, lg = (self.lambda_perp, self.lambda_G) if idx is None else (
            [self.lambda_perp[k] for k in idx], [self.lambda_G[k] for k in idx])
        value = math.fsum(map(operator.mul, lp, ep.tolist()))
        return value + math.fsum(map(operator.mul, lg, eg.tolist())) if self._any_G else value

    def _separate_grads(self) -> list:
        """One uninitialised tensor per parameter, each its own storage: autograd adds the task
        gradient into such a buffer in place (it does not into views of a shared buffer, whose
        storage has other users, and allocates the sum)."""
        return [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in self.params]

    def _new_grads(self, idx=None) -> list:
        """Uninitialised tensors shaped like the parameters (of the terms ``idx``; all when ``None``):
        views of one buffer where they share a dtype (one allocation)."""
        ks = range(len(self.params)) if idx is None else idx
        params = self.params if idx is None else [self.params[k] for k in ks]
        size = self._flat_size if idx is None else (
            sum(self._numels[k] for k in ks) if len({self._dtypes[k] for k in ks}) == 1 else None)
        if size is not None:
            flat = torch.empty(size, dtype=self._dtypes[ks[0]], device=self.device)
            return list(torch._utils._unflatten_dense_tensors(flat, params))
        return [torch.empty(p.shape, dtype=self._dtypes[k], device=self.device) for k, p in zip(ks, params)]

    def _call(self, idx, grads, accumulate):
        """The op on the terms ``idx`` (all when ``None``); the value ``sum lambda E`` in float64
        (:meth:`weighted_sum`)."""
        if idx is None:
            w, (m, b, po, pi), (cp, cg) = self.weights, self.plan_args, self._coefs
        else:
            pick = lambda xs: [xs[k] for k in idx]  # noqa: E731
            w, m, b, po, pi = pick(self.weights), *(pick(x) for x in self.plan_args)
            cp, cg = pick(self._coefs[0]), pick(self._coefs[1])
        if grads is None:  # energies only (frozen parameters)
            ep, eg = self.kernel(w, m, b, po, pi, [], [], [], False)
        else:
            ep, eg = self.kernel(w, m, b, po, pi, cp, cg, grads, accumulate)
        return self.weighted_sum(ep, eg, idx)

    def _plan_backward(self, grads, trainable):
        """The calls of a backward for this state of the ``.grad`` attributes: ``[(idx, kind)]`` with
        kind ``"into"`` (add to the existing .grad), ``"fresh"`` (write new buffers) or ``"frozen"``."""
        into, fresh, frozen = [], [], []
        for k, (g, t) in enumerate(zip(grads, trainable)):
            if not t:
                frozen.append(k)
            elif (g is not None and not is_dtensor(g) and g.dtype == self._dtypes[k] and g.is_contiguous()
                  and g.numel() == self._numels[k]):
                into.append(k)
            else:  # no gradient yet, or one the kernel cannot write into (a fresh one is added to it)
                fresh.append(k)
        T = len(grads)
        return [(None if len(ks) == T else ks, kind) for ks, kind in ((into, "into"), (fresh, "fresh"),
                                                                       (frozen, "frozen")) if ks]

    def _calls(self, grads, trainable):
        """The calls for these ``.grad`` attributes and flags, from the last two states seen (a
        training loop alternates between at most two: no gradients after ``zero_grad``, and the
        ones a backward made)."""
        for st in self._states:
            if st[1] == trainable and all(map(operator.is_, st[0], grads)):
                return st[2]
        calls = self._plan_backward(grads, trainable)
        self._states = [(grads, trainable, calls)] + self._states[:1]
        return calls

    def backward(self):
        """As :meth:`TermGroup.backward`; the value as :meth:`weighted_sum` gives it (a float on the CPU)."""
        if self._prepared is not None and not torch._C._len_torch_dispatch_stack():
            ok, value = self._prepared.backward()  # every .grad writable (or none): one call, nothing read here
            if ok:
                return value
        grads = list(map(_grad, self.params))
        value = None
        for idx, kind in self._calls(grads, list(map(_requires_grad, self.params))):
            ks = range(len(grads)) if idx is None else idx
            if kind == "into":
                v = self._call(idx, [grads[k] for k in ks] if idx is not None else grads, True)
            elif kind == "fresh":
                v = self._fresh(idx, ks, grads)
            else:
                v = self._call(idx, None, False)
            value = v if value is None else value + v
        return value

    def _fresh(self, idx, ks, grads):
        """The gradients into new buffers: one flat buffer per call when the terms share a dtype
        (views shaped like the parameters become their ``.grad``), else one buffer each."""
        params = self.params if idx is None else [self.params[k] for k in ks]
        bufs = self._penalty_grads() if idx is None else self._new_grads(idx)
        v = self._call(idx, bufs, False)
        for k, p, buf in zip(ks, params, bufs):
            if grads[k] is None:
                p.grad = buf
            else:  # a gradient the kernel could not write into
                accumulate_grad(p, buf)
        return v

    def decay_(self, rate: float, rate_G: float) -> set:
        if not self._inplace:
            return super().decay_(rate, rate_G)
        key = (rate, rate_G)
        if key not in self._decay_coefs:
            self._decay_coefs = {key: ([ops.kernel_coefficient(-rate / 2, w, "rate") for w in self.weights],
                                       [ops.kernel_coefficient(-rate_G / 2, w, "rate_G") for w in self.weights])}
        if self._prepared is not None and not torch._C._len_torch_dispatch_stack():
            self._prepared.step(-rate / 2, -rate_G / 2)
            return self._param_ids
        cp, cg = self._decay_coefs[key]
        self.kernel(self.weights, *self.plan_args, cp, cg, self.weights, True)
        return self._param_ids


class PenaltyProgram:
    """The groups of terms of ``layers`` (``[(name, module, declaration)]``), ready to run.

    ``fast``: the indices of the layers in the groups; the others (FSDP2-sharded parameters, and
    weights whose matrix form is a copy) are computed by the penalty per call."""

    def __init__(self, root: torch.nn.Module, layers, backend: str = "auto"):
        self.root = root
        self.links = module_chain(root, [n for n, _, _ in layers])
        # views made in inference mode cannot be differentiated later: such a program serves one call
        self.reusable = not torch.is_inference_mode_enabled()
        self.device = layers[0][1].weight.device if layers else torch.device("cpu")
        self.value_dtype = (torch.float64 if all(m.weight.dtype == torch.float64 for _, m, _ in layers)
                            else torch.float32)
        self.fast, terms_per_layer = [], []
        for i, (name, m, d) in enumerate(layers):
            if any(p is not None and torch._C._functorch.is_functorch_wrapped_tensor(p)
                   for p in (m.weight, getattr(m, "bias", None))):
                raise RuntimeError(
                    f"layer {name!r}: its parameters are torch.func transform inputs (functional_call inside "
                    "torch.func.grad, vjp, jacrev, ...); ProjectionPenalty reads the model's own parameters and "
                    "does not run under such a transform: differentiate the penalty with autograd "
                    "(penalty().backward() or torch.autograd.grad) outside it")
            if any(is_dtensor(p) for p in (m.weight, getattr(m, "bias", None))):
                continue
            with torch.enable_grad():  # the weights' views keep their graph even if built under no_grad
                ts = d.terms(name, m)
            registered = [(m._parameters, k, m._parameters.get(k)) for k in ("weight", "bias")
                          if k in m._parameters and m._parameters[k] is not None]
            if (not all(any(t.param is p for _, _, p in registered) for t in ts)
                    or not all(_shares_storage(t.weight, t.param) for t in ts)):
                # a computed weight (a parametrization) or a copy (strides that do not reshape): read
                # again at each call
                continue
            self.links.extend(registered)  # a parameter replaced by another is a change of the model
            self.fast.append(i)
            terms_per_layer.append(ts)
        fast = set(self.fast)
        self.slow = [i for i in range(len(layers)) if i not in fast]
        self.params = [p for ts in terms_per_layer for p in (t.param for t in ts)]
        # what current() compares, as parallel lists (checked by C-level loops, not per layer in Python)
        self._link_dicts, self._link_keys, self._link_objects = (list(x) for x in zip(*self.links)) if self.links \
            else ([], [], [])
        self._unique_params = list({id(p): p for p in self.params}.values())
        self.storage = list(map(_data_ptr, self._unique_params))
        self.num_params = len({id(p) for p in self.params})
        self.num_layers = len(layers)
        self._index = None
        self.groups: list[TermGroup] = []
        # the r-th use of a parameter goes into round r: no call writes one parameter twice
        uses: dict = {}
        rounds: list[list[list]] = []
        for j, ts in enumerate(terms_per_layer):
            per_round: dict = {}
            for t in ts:
                r = uses.get(id(t.param), 0)
                uses[id(t.param)] = r + 1
                per_round.setdefault(r, []).append(t)
            for r, rts in per_round.items():
                while len(rounds) <= r:
                    rounds.append([[] for _ in terms_per_layer])
                rounds[r][j].extend(rts)
        self.first_round = 0
        for r, per_layer in enumerate(rounds):
            for ts, owners in batches(per_layer).values():
                owners = [self.fast[j] for j in owners]
                self.groups.extend(self._groups(ts, owners, backend, decays=(r == 0)))
        # every layer in one group of fused matrices: a penalty call is that group's calls alone
        self.single_fused = not self.slow and len(self.groups) == 1 and isinstance(self.groups[0], FusedMatrices)
        # every layer in one group of fused matrices stepped in place: decay_ is that group's one call
        self.one_fused_group = (not self.slow and len(self.groups) == 1 and isinstance(self.groups[0], FusedMatrices)
                                and self.groups[0]._inplace
                                and self.groups[0].num_params == self.num_params)

    @staticmethod
    def _groups(ts, owners, backend, decays):
        out = []
        if type(ts[0]) is MatrixTerm:
            split: dict = {}
            for t, o in zip(ts, owners):
                b = ops.backend_for(backend, t.weight)
                key = (b.name in _FUSED, t.weight.device)
                split.setdefault(key, ([], []))
                split[key][0].append(t)
                split[key][1].append(o)
            for (fused, dev), (gts, gos) in split.items():
                g = FusedMatrices(gts, gos, dev) if fused else TermGroup(gts, gos)
                g.decays = decays
                out.append(g)
            return out
        g = TermGroup(ts, owners, backend)
        g.decays = decays
        return [g]

    def current(self) -> bool:
        """Whether the modules at the declared paths, their parameters and the parameters' storage
        are unchanged."""
        return (self.reusable
                and all(map(operator.is_, map(dict.get, self._link_dicts, self._link_keys), self._link_objects))
                and list(map(_data_ptr, self._unique_params)) == self.storage)

    def per_layer(self, parts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp [L], E_G [L])`` from the groups' energies (in order) and then the slow layers'."""
        if len(parts) == 1:
            ep, eg = parts[0]
            dt = ep.dtype
        else:
            dt = torch.float64 if all(p[0].dtype == torch.float64 for p in parts) else torch.float32
            ep = torch.cat([p[0].reshape(-1).to(dt) for p in parts])
            eg = torch.cat([p[1].reshape(-1).to(dt) for p in parts])
        if self._index is None or self._index.device != ep.device:
            owners = [o for g in self.groups for o in g.owners] + self.slow
            self._identity = owners == list(range(self.num_layers))
            self._index = torch.tensor(owners, dtype=torch.long, device=ep.device)
        if self._identity:  # one term per layer, in order: nothing to sum
            return ep, eg
        zeros = torch.zeros(self.num_layers, dtype=dt, device=ep.device)
        return zeros.index_add(0, self._index, ep), zeros.index_add(0, self._index, eg)

    def set_lambdas(self, lambda_perp: list[float], lambda_G: list[float]) -> None:
        """Per-layer lambdas (indexed like the penalty's layers)."""
        for g in self.groups:
            g.set_lambdas([lambda_perp[o] for o in g.owners], [lambda_G[o] for o in g.owners])
