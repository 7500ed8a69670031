"""The model-level penalty: ``sum_layers lambda_perp E_perp + lambda_G E_G`` over the declared layers.

The penalty asks each declaration for its terms and only groups them: all terms of one kind
(matrices, kernels of one kernel-space type, translations) are computed in one call, so a model
costs one fused call per kind, whatever its number of layers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn

from ._declaration import batches, inplace_view, one_pass_route
from ._declare import _epoch, declaration, select_layers, unwrap
from ._tensors import accumulate_grad, assign, is_dtensor, no_autocast

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
    float64). The penalty follows the model: weights are read at each call, and a layer declared,
    re-declared or undeclared after the penalty was built, or a declared module swapped in for
    another, is picked up at the next call (with ``layers`` given as module objects, a module that
    left the model is an error). Example::

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
        self._index_cache: dict = {}
        self._epoch = _epoch[0]
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

    @torch.compiler.disable  # host-side bookkeeping, never traced
    def _follow_model(self) -> None:
        """Pick up declarations made or changed since the last call, and declared modules swapped in."""
        if self._epoch == _epoch[0]:
            root = unwrap(self._model)
            try:
                if all((root.get_submodule(n) if n else root) is m for n, m, _ in self.layers):
                    return
            except AttributeError:
                pass
        self.layers = select_layers(self._model, self._layer_spec)
        self.names = [n for n, _, _ in self.layers]
        self._index_cache = {}
        self._epoch = _epoch[0]
        self.lambda_perp = _lambdas(self._lambda_spec[0], self.names, "lambda_perp")
        self.lambda_G = _lambdas(self._lambda_spec[1], self.names, "lambda_G")
        self._lambda_cache = {}

    def _lambda_tensors(self, device, dtype):
        key = (device, dtype)
        if key not in self._lambda_cache:
            self._lambda_cache[key] = (torch.tensor(self.lambda_perp, device=device, dtype=dtype),
                                       torch.tensor(self.lambda_G, device=device, dtype=dtype))
        return self._lambda_cache[key]

    def energies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)``, each ``[L]`` (one per layer of ``self.names``, bias included), differentiable."""
        self._follow_model()
        return _per_layer_opaque(self.layers, self._index_cache)

    def __call__(self) -> torch.Tensor:
        e_perp, e_g = self.energies()
        lp, lg = self._lambda_tensors(e_perp.device, e_perp.dtype)
        return _weighted_sum(e_perp, e_g, lp, lg, self.norm, any(self.lambda_G))

    def _fast_and_slow(self):
        """``(fast, terms, slow)``: the layers whose terms all have a one-pass route (their indices and
        terms) and the others (FSDP2 shards, ``norm="unsquared"``, kinds without a route)."""
        fast, terms, slow = [], [], []
        for i, (name, m, d) in enumerate(self.layers):
            if self.norm != "squared" or any(is_dtensor(p) for p in (m.weight, getattr(m, "bias", None))):
                slow.append(i)
                continue
            ts = d.terms(name, m)
            if any(one_pass_route([t]) is None for t in ts):
                slow.append(i)
            else:
                fast.append(i)
                terms.append(ts)
        return fast, terms, slow

    def backward(self) -> torch.Tensor:
        """Add the penalty's gradient to the ``.grad`` of the declared weights (and biases) and
        return the penalty's value (a detached scalar), without building an autograd graph.

        Matrix-form layers and biases take :func:`equiproj.energies_and_grads_many`: with the fused
        op, one kernel call reads each weight once and writes ``lambda_perp dE_perp + lambda_G dE_G``
        once: into a fresh ``.grad`` where a parameter has none, and added in place to an existing
        (contiguous) ``.grad`` otherwise, with no fresh buffer. The autograd route
        ``penalty().backward()`` reads each weight twice: its forward cannot know the incoming
        gradient. Kernel spaces that provide ``energies_and_grads_many``
        (:class:`~equiproj.kernel_spaces.SteerableKernelSpace`) take one more fused call for all of
        them. Translations, FSDP2-sharded parameters, other kernel spaces and ``norm="unsquared"``
        go through autograd. The gradients are the same either way (tested). Parameters with
        ``requires_grad=False`` get none.

        Called before ``loss.backward()`` (after ``optimizer.zero_grad()``, which sets ``.grad`` to
        ``None``), a parameter takes the penalty's gradient as its ``.grad`` (no copy) and autograd
        adds the task gradient to it in place; called after, the penalty's gradient is added to the
        task gradient in place. Example::

            optimizer.zero_grad()
            penalty.backward()
            criterion(model(x), y).backward()
            optimizer.step()
        """
        self._follow_model()
        with no_autocast(self.layers[0][1].weight.device):
            fast, terms, slow = self._fast_and_slow()
            values = []
            for ts, owners in batches(terms).values():
                route = one_pass_route(ts)
                lp = [self.lambda_perp[fast[j]] for j in owners]
                lg = [self.lambda_G[fast[j]] for j in owners]
                outs = [inplace_view(t, t.param.grad) if t.param.requires_grad else None for t in ts]
                into = [k for k, o in enumerate(outs) if o is not None]
                fresh = [k for k, o in enumerate(outs) if o is None]
                for ks, add_to in ((into, [outs[k] for k in into]), (fresh, None)):
                    if not ks:
                        continue
                    lps, lgs = [lp[k] for k in ks], [lg[k] for k in ks]
                    ep, eg, grads = route([ts[k] for k in ks], lps, lgs, add_to)
                    if add_to is None:
                        for k, g in zip(ks, grads):
                            accumulate_grad(ts[k].param, g)
                    as64 = lambda x: torch.tensor(x, dtype=torch.float64, device=ep.device)  # noqa: E731
                    values.append((ep.double() * as64(lps)).sum() + (eg.double() * as64(lgs)).sum())
        if slow:
            e_perp, e_g = _per_layer_opaque([self.layers[i] for i in slow])
            lps, lgs = ([lam[i] for i in slow] for lam in (self.lambda_perp, self.lambda_G))
            value = _weighted_sum(e_perp, e_g, *(torch.tensor(x, dtype=e_perp.dtype, device=e_perp.device)
                                                 for x in (lps, lgs)), self.norm, any(lgs))
            if value.requires_grad:
                value.backward()
            values.append(value.detach().double())
        dt = torch.float64 if all(m.weight.dtype == torch.float64 for _, m, _ in self.layers) else torch.float32
        return sum(v.to(values[0].device) for v in values).to(dt)

    @torch.no_grad()
    def decay_(self, rate: float, rate_G: float = 0.0) -> None:
        """The decoupled step ``W <- W - rate (W - P W) - rate_G P W`` on every layer of the penalty
        (biases included), in place: a plain gradient step of size ``rate / 2`` on ``E_perp`` (and
        ``rate_G / 2`` on ``E_G``), taken outside the optimiser like AdamW's decoupled weight decay.
        With Adam, an energy added to the loss is rescaled per coordinate together with the task
        gradient; decoupled, the non-equivariant part shrinks by the factor ``1 - rate`` per step
        whatever the task gradient's scale. Call it after ``optimizer.step()``.

        Matrix-form layers take one fused pass per weight that reads W and writes it back, with no
        copy of the parameters; steerable kernel spaces read W once for its band coefficients and
        write it back with one matrix product (no float64 copy); FSDP2 shards are gathered, stepped and scattered back; other kinds
        step through their projection.
        """
        for name, r in (("rate", rate), ("rate_G", rate_G)):
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= r <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {r!r}")
        self._follow_model()
        with no_autocast(self.layers[0][1].weight.device):
            stepped = set()
            _, terms, _ = self._fast_and_slow()
            for ts, _ in batches(terms).values():
                route = one_pass_route(ts, energies=False)
                views = [inplace_view(t, t.param) for t in ts]
                ks = [k for k, v in enumerate(views) if v is not None]
                if ks:
                    route([ts[k] for k in ks], [-rate / 2] * len(ks), [-rate_G / 2] * len(ks), [views[k] for k in ks])
                    stepped.update(id(ts[k].param) for k in ks)
            for name, m, d in self.layers:
                for param, part in ((m.weight, 0), (getattr(m, "bias", None) if d.include_bias else None, 1)):
                    if param is None or id(param) in stepped:
                        continue
                    residual = d.projected(name, m, "non_equivariant")[part]
                    step = rate * residual + (rate_G * d.projected(name, m, "equivariant")[part] if rate_G else 0)
                    current = d.weight(name, m) if part == 0 else d.bias(m)
                    assign(param, current.double() - step)

    def __repr__(self):
        layers = ", ".join(f"{n or '(model)'} [{d.case}]" for n, _, d in self.layers)
        return f"ProjectionPenalty({len(self.layers)} layers, norm={self.norm!r}: {layers})"
