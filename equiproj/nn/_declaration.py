"""Declarations: how a group acts on one layer, one class per case, and the terms the penalty reads.

A declaration knows, for its layer, the *terms* of the penalty (each weight or bias in the form
its energy function takes), how to project the layer, and what its row of a report says. The
penalty, ``project_`` and ``report`` ask these methods; they never branch on the case.

=====================  ==========================  =============================================
class                  ``case``                    energies of the weight
=====================  ==========================  =============================================
MatrixDeclaration      ``"linear"``, ``"grid"``,   a matrix ``[c_out, -1]`` from
                       ``"pointwise"``,            ``weight_rep_in`` to ``rep_out``
                       ``"channels"``              (:func:`equiproj.energies`)
KernelSpaceDeclaration ``"kernel_space"``          the kernel space's ``energies``
TranslationDeclaration ``"translation"``           :func:`equiproj.translation.energies`
=====================  ==========================  =============================================
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import torch
from torch import nn

from .. import grid as _grid
from .. import ops
from .. import translation as _translation
from .._energy import energies as _energies
from .._energy import energies_and_grads_many, energies_many, energy_breakdown
from .._energy import project as _project
from ..groups import Rep
from ..kernel_spaces import default_kernel_space
from ._tensors import full, is_dtensor

__all__ = ["Declaration", "MatrixDeclaration", "KernelSpaceDeclaration", "TranslationDeclaration", "Term"]


# ---------------------------------------------------------------------------------------------
# terms: what the penalty reads, grouped for one call per kind
# ---------------------------------------------------------------------------------------------
class Term:
    """One tensor of the penalty: ``weight`` (the parameter in the form its energy function takes) and
    ``param`` (where its gradient goes). Terms with the same :meth:`batch_key` are computed together.

    Every kind implements the same two class methods over a list of terms of one batch key:
    :meth:`energies` (differentiable) and :meth:`one_pass` (energies and the gradient of
    ``sum lambda_perp E_perp + lambda_G E_G`` without an autograd graph, into fresh tensors or
    added in place to given ones: an existing ``.grad``, or the weight itself for the decoupled
    step). The default :meth:`one_pass` differentiates :meth:`energies`; kinds with a fused
    route override it."""

    def __init__(self, param: torch.Tensor, weight: torch.Tensor):
        self.param, self.weight = param, weight

    def batch_key(self):
        return type(self)

    def with_weight(self, weight: torch.Tensor) -> "Term":
        """This term with another tensor (same form) as its weight."""
        t = copy.copy(self)
        t.weight = weight
        return t

    @classmethod
    def energies(cls, terms) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp [T], E_G [T])`` of these terms (one batch key), differentiable."""
        raise NotImplementedError

    @classmethod
    def one_pass(cls, terms, lambda_perp, lambda_G, outs=None, energies: bool = True):
        """``(E_perp [T], E_G [T], grads)`` without an autograd graph: ``grads[k]`` is the gradient of
        ``lambda_perp[k] E_perp[k] + lambda_G[k] E_G[k]`` in the form of ``terms[k].weight``, in a fresh
        tensor, or added in place to ``outs[k]`` (then ``grads[k] is outs[k]``) where ``outs`` is given
        and ``outs[k]`` is not ``None``. The weights are read before any output is written, so an
        output may be the weight itself. ``energies=False`` lets a kind that writes into every output
        skip the energies (the decoupled step needs none); it may then return ``None`` for them."""
        leaves = [t.weight.detach().requires_grad_() for t in terms]
        with torch.enable_grad():
            ep, eg = cls.energies([t.with_weight(w) for t, w in zip(terms, leaves)])
            lp = torch.tensor(list(lambda_perp), dtype=ep.dtype, device=ep.device)
            lg = torch.tensor(list(lambda_G), dtype=eg.dtype, device=eg.device)
            grads = torch.autograd.grad((lp * ep).sum() + (lg * eg).sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, leaves)]
        return ep.detach(), eg.detach(), added(grads, outs)

    @classmethod
    def pass_runners(cls, terms, backend: str) -> list | None:
        """One prepared pass per term, or ``None`` (the default: the kind runs :meth:`one_pass`). A
        runner ``run(lambda_perp, lambda_G, out, write) -> (E_perp [1], E_G [1])`` (float64) takes
        float64 ``[1]`` lambdas and computes the energies alone (``write=0``, ``out=None``) or also
        writes (``write=1``) or adds (``write=2``) the term's gradient into ``out``, a contiguous
        tensor of the weight's shape and dtype that may be the weight itself."""
        return None


def added(grads, outs):
    """``grads``, with those whose ``outs`` entry is a tensor added to it in place (and replaced by it)."""
    if outs is None:
        return list(grads)
    result = []
    with torch.no_grad():
        for g, o in zip(grads, outs):
            if o is None:
                result.append(g)
            else:
                o.add_(g.reshape(o.shape).to(o.dtype))
                result.append(o)
    return result


class MatrixTerm(Term):
    """A matrix ``[m, n]`` from ``rep_in`` to ``rep_out``: all of them go through one fused call."""

    def __init__(self, param, weight, rep_in: Rep, rep_out: Rep):
        super().__init__(param, weight)
        self.rep_in, self.rep_out = rep_in, rep_out

    @classmethod
    def energies(cls, terms):
        return energies_many([t.weight for t in terms], [(t.rep_in, t.rep_out) for t in terms])

    @classmethod
    def one_pass(cls, terms, lambda_perp, lambda_G, outs=None, energies: bool = True):
        outs = [None] * len(terms) if outs is None else list(outs)
        into = [k for k, o in enumerate(outs) if o is not None]
        fresh = [k for k, o in enumerate(outs) if o is None]
        T = len(terms)
        ep, eg, grads = [None] * T, [None] * T, [None] * T
        for ks, add_to in ((into, [outs[k] for k in into]), (fresh, None)):
            if not ks:
                continue
            p, g, gr = energies_and_grads_many([terms[k].weight.detach() for k in ks],
                                               [(terms[k].rep_in, terms[k].rep_out) for k in ks],
                                               lambda_perp=[lambda_perp[k] for k in ks],
                                               lambda_G=[lambda_G[k] for k in ks], outs=add_to)
            for j, k in enumerate(ks):
                ep[k], eg[k], grads[k] = p[j], g[j], gr[j]
        return torch.stack(ep), torch.stack(eg), grads


class KernelTerm(Term):
    """A conv kernel in a kernel space. Spaces of one type that provide ``energies_many`` (and
    ``energies_and_grads_many``) are computed in one call; others one by one."""

    def __init__(self, param, weight, space, rep_in: Rep, rep_out: Rep):
        super().__init__(param, weight)
        self.space, self.rep_in, self.rep_out = space, rep_in, rep_out

    def batch_key(self):
        return (KernelTerm, type(self.space))

    @classmethod
    def energies(cls, terms):
        many = getattr(type(terms[0].space), "energies_many", None)
        if many is not None:
            return many([t.weight for t in terms], [t.space for t in terms], [(t.rep_in, t.rep_out) for t in terms])
        parts = [t.space.energies(t.weight, t.rep_in, t.rep_out) for t in terms]
        return _stack(parts)

    @classmethod
    def one_pass(cls, terms, lambda_perp, lambda_G, outs=None, energies: bool = True):
        many = getattr(type(terms[0].space), "energies_and_grads_many", None)
        if many is None:  # a space without a fused route: through its differentiable energies
            return super().one_pass(terms, lambda_perp, lambda_G, outs)
        weights = [t.weight.detach() for t in terms]
        spaces, reps = [t.space for t in terms], [(t.rep_in, t.rep_out) for t in terms]
        if outs is not None and all(o is not None for o in outs):
            # the space adds into the outputs itself (one pass; an output may be the weight)
            ep, eg, grads = many(weights, spaces, reps, lambda_perp=list(lambda_perp), lambda_G=list(lambda_G),
                                 outs=list(outs), energies=energies)
            return ep, eg, grads
        ep, eg, grads = many(weights, spaces, reps, lambda_perp=list(lambda_perp), lambda_G=list(lambda_G))
        return ep, eg, added(grads, outs)

    @classmethod
    def pass_runners(cls, terms, backend):
        bind = getattr(type(terms[0].space), "pass_runners", None)  # spaces with C++ passes provide it
        if bind is None or any(ops.backend_for(backend, t.weight).name != "cpp" for t in terms):
            return None
        return bind([t.weight.detach() for t in terms], [t.space for t in terms], [(t.rep_in, t.rep_out) for t in terms])


class TranslationTerm(Term):
    """A locally connected weight (or bias) under translations of its periodic grid."""

    def __init__(self, param, weight, spatial_dims: int, position_dim: int):
        super().__init__(param, weight)
        self.spatial_dims, self.position_dim = spatial_dims, position_dim

    @classmethod
    def energies(cls, terms):
        return _stack([_translation.energies(t.weight, t.spatial_dims, position_dim=t.position_dim) for t in terms])


def _stack(parts):
    dt = torch.float64 if all(p[0].dtype == torch.float64 for p in parts) else torch.float32
    return (torch.stack([p[0].reshape(()).to(dt) for p in parts]), torch.stack([p[1].reshape(()).to(dt) for p in parts]))


def inplace_view(term: Term, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` (the term's parameter, or its ``.grad``) viewed in the term's weight form, or ``None``
    where that needs a copy (a write to the copy would be lost) or the dtype differs."""
    if tensor is None or is_dtensor(tensor) or tensor.dtype != term.weight.dtype or not tensor.is_contiguous():
        return None
    return tensor.detach().view(term.weight.shape)


def batches(terms_per_layer: list[list[Term]]) -> dict:
    """``{batch key: (terms, owning layer index of each)}``, in first-seen order."""
    out: dict = defaultdict(lambda: ([], []))
    for i, terms in enumerate(terms_per_layer):
        for t in terms:
            ts, owners = out[t.batch_key()]
            ts.append(t)
            owners.append(i)
    return dict(out)


# ---------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------
class Declaration:
    """How a group acts on one layer (immutable; made by :func:`~equiproj.nn.declare` or
    :func:`~equiproj.nn.declare_translations`).

    Attributes:
        case: ``"linear" "grid" "pointwise" "channels" "kernel_space" "translation"``.
        rep_in, rep_out: the channel representations (``None`` for translations).
        weight_rep_in: input representation of the weight as a matrix ``[c_out, -1]`` (``None``
            for kernel-space and translation layers).
        weight_shape: the weight's shape at declare time.
        include_bias: whether the bias (a map from the trivial rep) is part of the energies.
        kernel_space: the kernel-space object (case ``"kernel_space"``), else ``None``.
        spatial_dims: 0 for linear layers, else the conv / locally connected dimensionality.
        description: one line saying which case this is and what is exact.
        exact: whether "equivariant" means the layer's full action (``False`` for kernel spaces,
            which define it through the space).
    """

    case: str
    weight_rep_in: Rep | None = None
    kernel_space = None
    exact = True

    def __init__(self, rep_in, rep_out, weight_shape, include_bias, spatial_dims, description):
        self.rep_in, self.rep_out = rep_in, rep_out
        self.weight_shape, self.include_bias = tuple(weight_shape), bool(include_bias)
        self.spatial_dims, self.description = spatial_dims, description
        self.bias_rep_in = rep_out.group.trivial() if rep_out is not None else None

    @property
    def group(self):
        return self.rep_out.group if self.rep_out is not None else None

    def __repr__(self):
        return f"Declaration({self.case}, {self.rep_in!r} -> {self.rep_out!r}: {self.description})"

    # a declaration is immutable: copies share it; a pickle carries it (reps and kernel spaces pickle
    # by structure), and a pickle written without it unpickles to a StaleDeclaration
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # ---- the layer's tensors ------------------------------------------------------------------
    def weight(self, name: str, module: nn.Module) -> torch.Tensor:
        """The whole weight (gathered if sharded), checked against the declared shape."""
        w = full(module.weight)
        if w.device.type == "meta":
            raise ValueError(f"layer {name or type(module).__name__!r} has its parameters on the meta device (shapes "
                             "without values): materialise the model first (e.g. model.to_empty(device=...) and load "
                             "or initialise its weights)")
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"layer {name or type(module).__name__!r}: weight has shape {tuple(w.shape)}, but "
                             f"{self.weight_shape} when it was declared: declare it again")
        return w

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        b = getattr(module, "bias", None)
        return full(b) if self.include_bias and b is not None else None

    # ---- what the penalty, project_ and report ask --------------------------------------------
    def terms(self, name: str, module: nn.Module) -> list[Term]:
        """The layer's terms: its weight and (if included) its bias."""
        b = self.bias(module)
        return [self._weight_term(module.weight, self.weight(name, module))] + \
            ([] if b is None else [self._bias_term(module.bias, b)])

    def _weight_term(self, param, w) -> Term:
        raise NotImplementedError

    def _bias_term(self, param, b) -> Term:
        return MatrixTerm(param, b[:, None], self.bias_rep_in, self.rep_out)

    def projected(self, name: str, module: nn.Module, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias replaced by their equivariant part (``which="equivariant"``) or by
        the rest, computed in float64 (full tensors)."""
        w = self.weight(name, module).double()
        b = self.bias(module)
        return self._project_weight(w, which), None if b is None else self._project_bias(b.double(), which)

    def _project_weight(self, w, which) -> torch.Tensor:
        raise NotImplementedError

    def _project_bias(self, b, which) -> torch.Tensor:
        return _project(b[:, None], self.bias_rep_in, self.rep_out, which=which)[:, 0]

    def report_row(self, name: str, module: nn.Module, breakdown: bool) -> dict:
        """One row of :class:`~equiproj.nn.Report` (float64, no gradients)."""
        with torch.no_grad():
            w = self.weight(name, module).detach().double()
            b = self.bias(module)
            b = None if b is None else b.detach().double()
            parts: dict = {} if breakdown and self.weight_rep_in is not None else None
            ep, eg = self._report_energies(w, parts)
            ep_b = 0.0
            if b is not None:
                ep_b, eg_b = self._report_bias_energies(b, parts)
                ep, eg = ep + ep_b, eg + eg_b
            norm_sq = float(w.square().sum()) + (float(b.square().sum()) if b is not None else 0.0)
        return {
            "name": name,
            "module": _module_type(module),
            "case": self.case,
            "description": self.description,
            "group": "translations" if self.rep_out is None else str(self.group),
            "rep_in": "-" if self.rep_in is None else repr(self.rep_in),
            "rep_out": "-" if self.rep_out is None else repr(self.rep_out),
            "weight_shape": tuple(self.weight_shape),
            "norm_sq": norm_sq,
            "e_perp": ep,
            "e_g": eg,
            "e_perp_bias": ep_b,
            "rel_perp": ep / norm_sq if norm_sq > 0 else 0.0,
            "defect_lower": math.sqrt(ep) if self.exact else None,
            "defect_upper": 2 * math.sqrt(ep) if self.exact else None,
            "shares_no_irrep": self._shares_no_irrep(),
            "breakdown": None if parts is None else [
                {"irrep_out": k[0], "irrep_in": k[1], "e_perp": v} for k, v in sorted(parts.items(), key=lambda kv: -kv[1])],
        }

    def _report_energies(self, w, parts) -> tuple[float, float]:
        raise NotImplementedError

    def _report_bias_energies(self, b, parts) -> tuple[float, float]:
        return _matrix_report(b[:, None], self.bias_rep_in, self.rep_out, parts)

    def _shares_no_irrep(self):
        return None

    def restricted(self, H) -> "Declaration":
        """The same layer declared under the subgroup ``H`` (a :class:`~equiproj.groups.Subgroup` of
        this declaration's group, or a group of its matrices): its reps restricted to ``H``."""
        raise NotImplementedError


def _subgroup_parts(H) -> tuple:
    """``(group, name)`` of a :class:`~equiproj.groups.Subgroup` or of a plain group."""
    group = getattr(H, "group", H)
    return group, getattr(H, "name", repr(group))


def _matrix_report(W, rep_in, rep_out, parts) -> tuple[float, float]:
    ep, eg = (float(x) for x in _energies(W, rep_in, rep_out))
    if parts is not None:
        for (io, ii), e in energy_breakdown(W, rep_in, rep_out).items():
            key = (str(io), str(ii))
            parts[key] = parts.get(key, 0.0) + float(e)
    return ep, eg


class MatrixDeclaration(Declaration):
    """Linear layers, exact grid actions, 1x1 convs and channel-only actions: the weight flattened to
    ``[c_out, -1]`` is a linear map from ``weight_rep_in`` to ``rep_out``. Exact."""

    def __init__(self, case, rep_in, rep_out, weight_rep_in, weight_shape, include_bias, spatial_dims, description):
        super().__init__(rep_in, rep_out, weight_shape, include_bias, spatial_dims, description)
        self.case, self.weight_rep_in = case, weight_rep_in

    def _weight_term(self, param, w):
        return MatrixTerm(param, w.reshape(w.shape[0], -1), self.weight_rep_in, self.rep_out)

    def _project_weight(self, w, which):
        return _project(w.reshape(w.shape[0], -1), self.weight_rep_in, self.rep_out, which=which).reshape(w.shape)

    def _report_energies(self, w, parts):
        return _matrix_report(w.reshape(w.shape[0], -1), self.weight_rep_in, self.rep_out, parts)

    def _shares_no_irrep(self):
        return not ({ir for ir, _ in self.weight_rep_in.irreps} & {ir for ir, _ in self.rep_out.irreps})

    def restricted(self, H):
        # the weight's input rep keeps its matrices too: a grid conv stays the same grid conv under H
        _, name = _subgroup_parts(H)
        return MatrixDeclaration(self.case, self.rep_in.restrict(H), self.rep_out.restrict(H),
                                 self.weight_rep_in.restrict(H), self.weight_shape, self.include_bias,
                                 self.spatial_dims, f"{self.description}; restricted to {name}")


class KernelSpaceDeclaration(Declaration):
    """A conv under rotations the grid does not have: equivariant means equivariant in the kernel space
    (exact within that definition, not a grid symmetry)."""

    case = "kernel_space"
    exact = False

    def __init__(self, rep_in, rep_out, kernel_space, weight_shape, include_bias, spatial_dims, description):
        super().__init__(rep_in, rep_out, weight_shape, include_bias, spatial_dims, description)
        self.kernel_space = kernel_space

    def _weight_term(self, param, w):
        return KernelTerm(param, w, self.kernel_space, self.rep_in, self.rep_out)

    def _project_weight(self, w, which):
        return self.kernel_space.project(w, self.rep_in, self.rep_out, which=which)

    def _report_energies(self, w, parts):
        ep, eg = self.kernel_space.energies(w, self.rep_in, self.rep_out)
        return float(ep), float(eg)

    def restricted(self, H):
        # a subgroup that maps the kernel grid onto itself (C4 in SO(2), O in SO(3)) acts exactly by
        # permuting the grid; any other subgroup gets its own default steerable kernel space
        group, name = _subgroup_parts(H)
        rep_in, rep_out = self.rep_in.restrict(H), self.rep_out.restrict(H)
        k = tuple(self.weight_shape[2:])
        if _grid.has_grid_action(group, k):
            return MatrixDeclaration("grid", rep_in, rep_out, rep_in @ _grid.kernel_rep(group, k), self.weight_shape,
                                     self.include_bias, self.spatial_dims,
                                     f"exact grid action: {name} permutes the {'x'.join(map(str, k))} kernel grid")
        space = default_kernel_space(group, k[0] if len(set(k)) == 1 else k, len(k))
        if space is None:
            raise ValueError(f"no kernel space for {name} ({group!r}) on {'x'.join(map(str, k))} kernels: this "
                             "layer cannot be declared under it")
        describe = getattr(space, "describe", None)
        return KernelSpaceDeclaration(rep_in, rep_out, space, self.weight_shape, self.include_bias, self.spatial_dims,
                                      describe() if callable(describe) else repr(space))


class TranslationDeclaration(Declaration):
    """A periodic locally connected layer under translations: equivariant iff it is a convolution. Exact."""

    case = "translation"

    def __init__(self, weight_shape, include_bias, spatial_dims, description):
        super().__init__(None, None, weight_shape, include_bias, spatial_dims, description)

    def __repr__(self):
        return f"Declaration(translation, {self.description})"

    def _weight_term(self, param, w):
        return TranslationTerm(param, w, self.spatial_dims, 2)

    def _bias_term(self, param, b):
        return TranslationTerm(param, b, self.spatial_dims, 1)

    def _project_weight(self, w, which):
        return _translation.project(w, self.spatial_dims, which, position_dim=2)

    def _project_bias(self, b, which):
        return _translation.project(b, self.spatial_dims, which, position_dim=1)

    def _report_energies(self, w, parts):
        ep, eg = _translation.energies(w, self.spatial_dims, position_dim=2)
        return float(ep), float(eg)

    def _report_bias_energies(self, b, parts):
        ep, eg = _translation.energies(b, self.spatial_dims, position_dim=1)
        return float(ep), float(eg)

    def _shares_no_irrep(self):
        return False

    def restricted(self, H):
        return self  # translations involve no point group


class StaleDeclaration:
    """What an unpickled module carries in place of its declaration: using it is an error."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"<stale {self.text}>"


def _module_type(m: nn.Module) -> str:
    # FSDP2 swaps in a subclass named FSDP<Name>: show the user's class
    for cls in type(m).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(m).__name__
