"""The model-level penalty: ``sum_layers lambda_perp E_perp + lambda_G E_G`` over the declared layers.

The penalty asks each declaration for its terms and only groups them: all terms of one kind
(matrices, kernels of one kernel-space type, translations) are computed in one call, so a model
costs one fused call per kind, whatever its number of layers. The grouping, the plans and the
views it writes into are prepared once, in a :class:`~equiproj.nn._program.PenaltyProgram`, and
prepared again when the model changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn

from ._declaration import batches
from ._declare import _epoch, declaration, select_layers, unwrap
from ._program import PenaltyProgram, as_value
from ._tensors import assign, no_autocast, opaque_to_compile

__all__ = ["ProjectionPenalty", "layer_energies"]


def _terms(layers):
    return [d.terms(name, m) for name, m, d in layers]


def _per_layer(layers, index_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp [L], E_G [L])`` of ``layers`` (weight and bias of each summed), differentiable."""
    parts_p, parts_g, owners = [], [], []
    for terms, own in batches(_terms(layers)).values():
        ep, eg = type(terms[0]).energies(terms)
        parts_p.append(ep)
        parts_g.append(eg)
        owners += own
    dt = torch.float64 if all(p.dtype == torch.float64 for p in parts_p) else torch.float32
    ep = torch.cat([p.to(dt) for p in parts_p])
    eg = torch.cat([p.to(dt) for p in parts_g])
    L = len(layers)
    if owners == list(range(L)):  # one term per layer, in order: nothing to sum
        return ep, eg
    key = (ep.device, tuple(owners))
    idx = None if index_cache is None else index_cache.get(key)
    if idx is None:
        idx = torch.tensor(owners, dtype=torch.long, device=ep.device)
        if index_cache is not None:
            index_cache[key] = idx
    zeros = torch.zeros(L, dtype=dt, device=ep.device)
    return zeros.index_add(0, idx, ep), zeros.index_add(0, idx, eg)


@torch.compiler.disable
def _per_layer_opaque(layers, index_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_per_layer` with AMP off, run eagerly even inside ``torch.compile``.

    Why opaque: ``energies_many`` itself traces (plans are looked up at trace time, the fused op
    is one graph node), but the other kinds (kernel spaces, translations, FSDP2 gathers, the
    index cache) are not verified under dynamo. As an eager call (one graph break) the penalty
    costs what it costs outside compile, and the rest of the step compiles."""
    with no_autocast(layers[0][1].weight.device):
        return _per_layer(layers, index_cache)


def layer_energies(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G)`` (scalars, differentiable) of one declared layer, bias included."""
    d = declaration(module)
    if d is None:
        raise ValueError(f"{type(module).__name__} is not declared: call equiproj.nn.declare on it")
    ep, eg = _per_layer_opaque([("", module, d)])
    return ep[0], eg[0]


def _lambdas(value, names: list[str], what: str) -> list[float]:
    def num(v, where):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            v = float(v)  # a 0-dim tensor, e.g. from a schedule
        if v is None:
            raise TypeError(f"{what}{where} must be a number >= 0 (or a mapping from layer names to numbers), got None")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}{where} must be a finite number >= 0, got {v!r}")
        return float(v)

    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{what} keys must be layer names (str), got {bad[0]!r}")
        unknown = sorted(k for k in value if k not in names and k != "default")
        if unknown:
            raise ValueError(f"{what} names {unknown} are not declared layers of the model; declared: {names}")
        out = []
        for n in names:
            if n in value:
                out.append(num(value[n], f"[{n!r}]"))
            elif "default" in value:
                out.append(num(value["default"], "['default']"))
            else:
                raise ValueError(f"{what} gives no value for the declared layer {n!r} (add it, or a 'default' key)")
        return out
    return [num(value, "")] * len(names)


def _weighted_sum(e_perp, e_g, lambda_perp, lambda_G, norm: str, use_g: bool) -> torch.Tensor:
    """``sum lambda_perp * E_perp + lambda_G * E_G`` (of ``sqrt(E)`` for ``norm="unsquared"``)."""
    if norm == "unsquared":
        e_perp, e_g = _safe_sqrt(e_perp), _safe_sqrt(e_g)
    total = (lambda_perp * e_perp).sum()
    return total + (lambda_G * e_g).sum() if use_g else total


def _safe_sqrt(e: torch.Tensor) -> torch.Tensor:
    # the subgradient 0 at E = 0 (an exactly equivariant layer) instead of inf * 0 = NaN
    return torch.sqrt(e.clamp_min(torch.finfo(e.dtype).tiny))


class ProjectionPenalty:
    """``sum_layers lambda_perp * E_perp + lambda_G * E_G`` over the declared layers of a model.

    Args:
        model: the model (may be wrapped in DDP or ``torch.compile``; may be FSDP2-sharded).
        lambda_perp, lambda_G: a number >= 0 (or a 0-dim tensor) for every layer, or a mapping from
            layer names (as in ``model.named_modules()``, e.g. ``"features.0"``) to numbers, with an
            optional ``"default"`` key for the layers it does not name. :meth:`set_lambdas` changes
            them (e.g. every step, from a schedule of :mod:`equiproj.nn`).
        norm: ``"squared"`` (default, ``E``) or ``"unsquared"`` (``sqrt(E)``, the Frobenius norm;
            its gradient at an exactly equivariant layer is taken as 0).
        layers: optional subset (names or modules); each must be declared. Default: all.

    Calling it returns the penalty, a differentiable scalar (float32; float64 if every weight is
    float64). For matrix-form layers on a fused kernel the call computes the gradient in the same
    pass as the value (one read of each weight), and its backward only hands it over. The penalty follows the model: weights are read at each call, and a layer declared,
    re-declared or undeclared after the penalty was built, or a declared module swapped in for
    another, is picked up at the next call (with ``layers`` given as module objects, a module that
    left the model is an error). The value is differentiated by reverse-mode autograd in any of
    its forms (``backward`` with ``inputs=`` or ``retain_graph``, ``torch.autograd.grad``, hooks,
    batched incoming gradients); inside a ``torch.func`` transform over the model's inputs it is a
    constant. Refused, each with what to do instead: higher derivatives (``create_graph=True``)
    and forward-mode AD on the fused kernels, and ``torch.func`` transforms of the parameters
    themselves. Example::

        penalty = ProjectionPenalty(model, lambda_perp=1e-2)
        loss = criterion(model(x), y) + penalty()
    """

    def __init__(self, model: nn.Module, lambda_perp, lambda_G=0.0, norm: str = "squared",
                 layers: Iterable[str | nn.Module] | None = None):
        if norm not in ("squared", "unsquared"):
            raise ValueError(f"norm must be 'squared' or 'unsquared', got {norm!r}")
        self._model, self._layer_spec = model, layers
        self.layers = select_layers(model, layers)
        self.names = [n for n, _, _ in self.layers]
        self.norm = norm
        self._epoch = _epoch[0]
        self._program: PenaltyProgram | None = None
        self._lambda_spec = [None, None]
        if lambda_perp is None:
            raise TypeError("lambda_perp must be a number >= 0 (or a mapping from layer names to numbers), got None")
        self.set_lambdas(lambda_perp, lambda_G)

    def set_lambdas(self, lambda_perp=None, lambda_G=None) -> None:
        """Change the weights (same forms as in the constructor, numbers or 0-dim tensors); ``None``
        keeps the current value. Cheap enough to call every step, e.g. from a schedule::

            schedule = equiproj.nn.linear_warmup(1e-2, steps=1000)
            for step in range(num_steps):
                penalty.set_lambdas(lambda_perp=schedule(step))
                ...
        """
        if lambda_perp is not None:
            self.lambda_perp = _lambdas(lambda_perp, self.names, "lambda_perp")
            self._lambda_spec[0] = lambda_perp
        if lambda_G is not None:
            self.lambda_G = _lambdas(lambda_G, self.names, "lambda_G")
            self._lambda_spec[1] = lambda_G
        self._lambda_cache: dict = {}
        self._set_program_lambdas()

    def _set_program_lambdas(self) -> None:
        if self._program is not None:
            self._program.set_lambdas(self.lambda_perp, self.lambda_G)

    def _follow_model(self) -> PenaltyProgram:
        """The program for the model as it is now: prepared again when a layer was declared,
        re-declared or undeclared, a declared module swapped in, or a parameter's storage replaced
        (a dtype or device change)."""
        prog = self._program
        if (prog is not None and self._epoch == _epoch[0] and (prog.root is self._model or prog.root is unwrap(self._model))
                and prog.current()):
            return prog
        self.layers = select_layers(self._model, self._layer_spec)
        self.names = [n for n, _, _ in self.layers]
        self._epoch = _epoch[0]
        self.lambda_perp = _lambdas(self._lambda_spec[0], self.names, "lambda_perp")
        self.lambda_G = _lambdas(self._lambda_spec[1], self.names, "lambda_G")
        self._lambda_cache = {}
        self._program = PenaltyProgram(unwrap(self._model), self.layers)
        self._set_program_lambdas()
        return self._program

    def _lambda_tensors(self, device, dtype):
        key = (device, dtype)
        if key not in self._lambda_cache:
            self._lambda_cache[key] = (torch.tensor(self.lambda_perp, device=device, dtype=dtype),
                                       torch.tensor(self.lambda_G, device=device, dtype=dtype))
        return self._lambda_cache[key]

    @opaque_to_compile  # host-side bookkeeping and the eager kernels; the rest of a step compiles
    def energies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)``, each ``[L]`` (one per layer of ``self.names``, bias included), differentiable."""
        prog = self._follow_model()
        with no_autocast(prog.device):
            parts = [g.energies() for g in prog.groups]
            if prog.slow:
                parts.append(_per_layer([self.layers[i] for i in prog.slow]))
            return prog.per_layer(parts)

    def __call__(self) -> torch.Tensor:
        if self.norm != "squared":
            e_perp, e_g = self.energies()
            lp, lg = self._lambda_tensors(e_perp.device, e_perp.dtype)
            return _weighted_sum(e_perp, e_g, lp, lg, self.norm, any(self.lambda_G))
        return self._value()

    @opaque_to_compile  # as energies(): one eager call inside compiled code
    def _value(self) -> torch.Tensor:
        """The squared penalty, each kind of term summed by its group: the fused matrices from one op
        call that also writes their gradient for the backward (:meth:`FusedMatrices.value`)."""
        prog = self._follow_model()
        if prog.single_fused:  # direct kernel calls (autocast does not reach them)
            return prog.groups[0].value(prog.value_dtype)
        with no_autocast(prog.device):
            if len(prog.groups) == 1 and not prog.slow:
                return prog.groups[0].value(prog.value_dtype)
            parts = [g.value(torch.float64) for g in prog.groups]
            if prog.slow:
                slow = [self.layers[i] for i in prog.slow]
                e_perp, e_g = _per_layer(slow)
                lps, lgs = ([lam[i] for i in prog.slow] for lam in (self.lambda_perp, self.lambda_G))
                parts.append(_weighted_sum(e_perp, e_g, *(torch.tensor(x, dtype=e_perp.dtype, device=e_perp.device)
                                                          for x in (lps, lgs)), self.norm, any(lgs)).double())
            return sum(parts[1:], parts[0]).to(prog.value_dtype)

    @opaque_to_compile  # as energies(): one eager call inside compiled code
    def backward(self) -> torch.Tensor:
        """Add the penalty's gradient to the ``.grad`` of the declared weights (and biases) and
        return the penalty's value (a detached scalar), without building an autograd graph.

        The terms of each kind take their kind's one-pass route (:meth:`Term.one_pass`): matrix-form
        layers and biases one call of the fused op for all of them, which reads each weight once
        and writes ``lambda_perp dE_perp + lambda_G dE_G`` once: into fresh ``.grad`` buffers where
        the parameters have none, and added in place to existing (contiguous) ``.grad`` tensors
        otherwise. ``penalty().backward()`` computes the fused matrices' gradient in the forward's
        pass as well (the lambdas are known) and hands it to autograd, which then adds it to the
        task gradient; the other kinds differentiate their energies. Kernel spaces that provide ``energies_and_grads_many``
        (:class:`~equiproj.kernel_spaces.SteerableKernelSpace`) take one more fused call for all of
        them; other kinds differentiate their energies once per kind. FSDP2-sharded parameters and
        ``norm="unsquared"`` go through autograd. The gradients are the same either way (tested).
        Parameters with ``requires_grad=False`` get none.

        Called before ``loss.backward()`` (after ``optimizer.zero_grad()``, which sets ``.grad`` to
        ``None``), a parameter takes the penalty's gradient as its ``.grad`` (no copy) and autograd
        adds the task gradient to it in place; called after, the penalty's gradient is added to the
        task gradient in place. Example::

            optimizer.zero_grad()
            penalty.backward()
            criterion(model(x), y).backward()
            optimizer.step()
        """
        prog = self._follow_model()
        if prog.single_fused and self.norm == "squared":  # direct kernel calls (autocast does not reach them)
            return as_value(prog.groups[0].backward(), prog.value_dtype)
        values = []
        with no_autocast(prog.device):
            if self.norm == "squared":
                values = [g.backward() for g in prog.groups]
                slow = prog.slow
            else:
                slow = range(len(self.layers))
            if slow:
                e_perp, e_g = _per_layer_opaque([self.layers[i] for i in slow])
                lps, lgs = ([lam[i] for i in slow] for lam in (self.lambda_perp, self.lambda_G))
                value = _weighted_sum(e_perp, e_g, *(torch.tensor(x, dtype=e_perp.dtype, device=e_perp.device)
                                                     for x in (lps, lgs)), self.norm, any(lgs))
                if value.requires_grad:
                    value.backward()
                values.append(value.detach().double())
        return as_value(sum(values[1:], values[0]), prog.value_dtype)

    @opaque_to_compile  # as energies(): one eager call inside compiled code
    def decay_(self, rate: float, rate_G: float = 0.0) -> None:
        """The decoupled step ``W <- W - rate (W - P W) - rate_G P W`` on every layer of the penalty
        (biases included), in place: a plain gradient step of size ``rate / 2`` on ``E_perp`` (and
        ``rate_G / 2`` on ``E_G``), taken outside the optimiser like AdamW's decoupled weight decay.
        With Adam, an energy added to the loss is rescaled per coordinate together with the task
        gradient; decoupled, the non-equivariant part shrinks by the factor ``1 - rate`` per step
        whatever the task gradient's scale. Call it after ``optimizer.step()``.

        Every kind takes its one-pass route with the weights themselves as outputs: matrix-form
        layers one fused call that reads each weight and writes it back, with no copy of the
        parameters; kernel spaces and translations their kind's one pass. A parameter shared by
        several layers (tied weights) is stepped once with the sum of their steps, each computed on
        the weight before the step, as autograd of the summed penalty would give. FSDP2 shards are gathered, stepped and scattered back, and
        parameters that cannot be written through a view (non-contiguous) step through their
        projection.
        """
        if not (type(rate) is float and type(rate_G) is float and 0.0 <= rate <= 1.0 and 0.0 <= rate_G <= 1.0):
            for name, r in (("rate", rate), ("rate_G", rate_G)):
                if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= r <= 1.0:
                    raise ValueError(f"{name} must be a number in [0, 1], got {r!r}")
        prog = self._follow_model()
        if prog.one_fused_group:  # the whole step is one op call on the weights (no autograd, no autocast)
            prog.groups[0].decay_(rate, rate_G)
            return
        with torch.no_grad():
            self._decay_groups(prog, rate, rate_G)

    def _decay_groups(self, prog: PenaltyProgram, rate: float, rate_G: float) -> None:
        with no_autocast(prog.device):
            stepped: set = set()
            # the later uses of tied parameters: their steps from the weights before any write
            later = [(g, g.decay_steps(rate, rate_G)) for g in prog.groups if not g.decays]
            for g in prog.groups:
                if g.decays:
                    stepped |= g.decay_(rate, rate_G)
            for g, steps in later:
                g.add_to_params_(steps)
            if len(stepped) == prog.num_params and not prog.slow:
                return
            for name, m, d in self.layers:
                for param, part in ((m.weight, 0), (getattr(m, "bias", None) if d.include_bias else None, 1)):
                    if param is None or id(param) in stepped:
                        continue
                    stepped.add(id(param))
                    residual = d.projected(name, m, "non_equivariant")[part]
                    step = rate * residual + (rate_G * d.projected(name, m, "equivariant")[part] if rate_G else 0)
                    current = d.weight(name, m) if part == 0 else d.bias(m)
                    assign(param, current.double() - step)

    def __getstate__(self):
        # the program holds views of the parameters and the C++ kernel's prepared form: a copy or a
        # pickle prepares its own on its first call
        state = self.__dict__.copy()
        state["_program"] = None
        return state

    def __repr__(self):
        layers = ", ".join(f"{n or '(model)'} [{d.case}]" for n, _, d in self.layers)
        return f"ProjectionPenalty({len(self.layers)} layers, norm={self.norm!r}: {layers})"
