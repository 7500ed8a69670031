"""Drop-in approximate equivariance for ordinary PyTorch models (math.md §2, §5).

Three steps turn an existing training loop into a regularised one::

    equiproj.nn.declare(model.conv1, rep_in, rep_out)               # how G acts (once, in code)
    penalty = equiproj.nn.ProjectionPenalty(model, lambda_perp=1e-2)  # finds every declared layer
    loss = task_loss + penalty()                                       # in the loop

``declare`` attaches a declaration to an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` without touching
its forward pass, parameters, state_dict or speed (a plain attribute, no hooks). Declarations are
rebuilt by the code that builds the model; they are not stored in the state_dict, and a pickled
module does not carry them (re-declare after unpickling: the penalty says so).

Every declared layer is in one of these cases (``declaration(layer).case``; ``report`` shows it):

=================  ===========================================================================
``"linear"``       ``nn.Linear``: W ``[out, in]`` maps ``rep_in`` to ``rep_out``. Exact.
``"grid"``         conv whose kernel grid G maps onto itself (subgroups of D4 on square 2-D
                   kernels, Octahedral/FullOctahedral on cubic 3-D kernels, any size): the
                   kernel ``K [c_out, c_in, *k]`` flattened to ``[c_out, c_in * prod(k)]`` maps
                   ``rep_in @ grid.kernel_rep(G, k)`` to ``rep_out``. Exact. Axis convention:
                   :mod:`equiproj.grid` (x along axis -1, y along -2, z along -3).
``"pointwise"``    1x1(x1) conv, any group: the kernel is a channel map. Exact.
``"channels"``     ``kernel_space="channels"``: G acts on the channels only, every kernel tap
                   separately (e.g. internal symmetries, 1-D convs). Exact.
``"kernel_space"`` rotations that do not map the grid onto itself (C_N with N not in
                   {1, 2, 4}, SO(2), O(2), SO(3), O(3)): a band-limited steerable kernel space
                   (``equiproj.steerable``); the part of K outside it counts as
                   non-equivariant. Exact within that definition, not a grid symmetry.
``"translation"``  ``declare_translations``: a periodic locally connected layer
                   (:mod:`equiproj.translation`); equivariant iff it is a convolution. Exact.
=================  ===========================================================================

A bias is a map from the trivial representation to ``rep_out`` and is included in every
energy (``declare(..., bias=False)`` leaves it out).

Energies, projection and gradients follow math.md §2: ``E_perp = ||W - P W||^2``,
``E_G = ||P W||^2``, ``dE_perp/dW = 2 (W - P W)``. The penalty calls
:func:`equiproj.energies_many` once for all matrix-form layers (the multi-layer fused op when
available), inside ``torch.autocast(enabled=False)`` so that AMP never lowers its precision,
and as one eager call (``torch.compiler.disable``) inside ``torch.compile``d code: a graph
break, so ``fullgraph=True`` cannot include the penalty.
FSDP2 (DTensor) parameters are gathered with ``full_tensor()`` (differentiable): every rank
computes the same penalty, and each shard receives its slice of the gradient. DDP needs
nothing special. ``ProjectionPenalty``, ``project_`` and ``report`` on FSDP2 models are
collectives: call them on every rank.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import grid as _grid
from . import translation as _translation
from .energy import energies as _energies
from .energy import energies_and_grads_many, energies_many, noneq_energy
from .energy import project as _project
from .rep import Rep

__all__ = [
    "declare",
    "declare_translations",
    "undeclare",
    "declaration",
    "declared_layers",
    "Declaration",
    "NoKernelSpaceError",
    "ProjectionPenalty",
    "project_",
    "report",
    "Report",
    "layer_energies",
    "ApproxEquivariantLinear",
    "ApproxEquivariantConv2d",
    "ApproxEquivariantConv3d",
]

_ATTR = "_equiproj_declaration"
_MATRIX_CASES = ("linear", "grid", "pointwise", "channels")
_CASES = _MATRIX_CASES + ("kernel_space", "translation")


class NoKernelSpaceError(ValueError, NotImplementedError):
    """A declared convolution whose group has no exact grid action and no kernel space (yet)."""


class Declaration:
    """How a group acts on one layer (immutable; made by :func:`declare` / :func:`declare_translations`).

    Attributes:
        case: one of ``"linear" "grid" "pointwise" "channels" "kernel_space" "translation"``.
        rep_in, rep_out: the channel representations (``None`` for translations).
        weight_rep_in: input representation of the weight as a matrix ``[c_out, -1]`` (``None``
            for kernel-space and translation layers).
        weight_shape: the weight's shape at declare time.
        include_bias: whether the bias (a map from the trivial rep) is part of the energies.
        kernel_space: the kernel-space object (case ``"kernel_space"``), else ``None``.
        spatial_dims: 0 for linear layers, else the conv / locally connected dimensionality.
        description: one line saying which case this is and what is exact.
    """

    __slots__ = ("case", "rep_in", "rep_out", "weight_rep_in", "weight_shape", "include_bias", "kernel_space",
                 "spatial_dims", "description", "bias_rep_in")

    def __init__(self, case, rep_in, rep_out, weight_rep_in, weight_shape, include_bias, kernel_space, spatial_dims,
                 description):
        assert case in _CASES
        self.case, self.rep_in, self.rep_out, self.weight_rep_in = case, rep_in, rep_out, weight_rep_in
        self.weight_shape, self.include_bias, self.kernel_space = tuple(weight_shape), bool(include_bias), kernel_space
        self.spatial_dims, self.description = spatial_dims, description
        self.bias_rep_in = rep_out.group.trivial() if rep_out is not None else None

    @property
    def group(self):
        return self.rep_out.group if self.rep_out is not None else None

    def __repr__(self):
        if self.case == "translation":
            return f"Declaration(translation, {self.description})"
        return f"Declaration({self.case}, {self.rep_in!r} -> {self.rep_out!r}: {self.description})"

    # declarations live in code: copies share it, pickles drop it (see _StaleDeclaration)
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_StaleDeclaration, (repr(self),))


class _StaleDeclaration:
    """What an unpickled module carries in place of its declaration: using it is an error."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"<stale {self.text}>"


# ---------------------------------------------------------------------------------------------
# declaring layers
# ---------------------------------------------------------------------------------------------
def _check_reps(rep_in, rep_out):
    for name, r in (("rep_in", rep_in), ("rep_out", rep_out)):
        if not isinstance(r, Rep):
            raise TypeError(f"{name} must be an equiproj Rep, got {type(r).__name__}")
    if rep_in.group != rep_out.group:
        raise ValueError(f"rep_in acts by {rep_in.group} but rep_out by {rep_out.group}: they must be the same group")


def _check_materialised(module):
    w = getattr(module, "weight", None)
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(module).__name__} has an uninitialised (lazy) weight: run one forward pass before declare")


def _fmt_shape(k) -> str:
    return "x".join(map(str, k))


def _default_kernel_space(group, kernel_size: tuple[int, ...]):
    """``equiproj.steerable.default_kernel_space`` (imported lazily), or a clear error."""
    s = len(kernel_size)
    what = f"no kernel space for {group} on {s}-D kernels of size {_fmt_shape(kernel_size)} yet"
    hint = ("(exact grid actions: subgroups of D4 on square 2-D kernels, Octahedral/FullOctahedral on cubic 3-D "
            "kernels, any group on 1x1 kernels; kernel_space='channels' if G acts on the channels only)")
    try:
        steerable = _steerable()
    except ImportError as e:
        raise NoKernelSpaceError(f"{what}: equiproj.steerable is not available ({e}) {hint}") from e
    fn = getattr(steerable, "default_kernel_space", None)
    if fn is None:
        raise NoKernelSpaceError(f"{what}: equiproj.steerable has no default_kernel_space {hint}")
    size = kernel_size[0] if len(set(kernel_size)) == 1 else kernel_size
    try:
        space = fn(group, size, s)
    except Exception as e:  # noqa: BLE001 - any failure means: no kernel space for this layer
        raise NoKernelSpaceError(f"{what}: {type(e).__name__}: {e} {hint}") from e
    if space is None:
        raise NoKernelSpaceError(f"{what}: default_kernel_space returned None {hint}")
    return space


def _check_kernel_space(space, module, rep_in, rep_out):
    for meth in ("energies", "project"):
        if not callable(getattr(space, meth, None)):
            raise TypeError(f"kernel_space must provide .energies(weight, rep_in, rep_out) and "
                            f".project(weight, rep_in, rep_out, which=...); {type(space).__name__} has no .{meth}")
    w = module.weight
    if w.device.type == "meta" or _is_dtensor(w):
        return
    try:  # mismatched shapes are an error at declare time
        with torch.no_grad():
            e_perp, e_g = space.energies(w.detach(), rep_in, rep_out)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"kernel space {_space_text(space)} rejects the weight {tuple(w.shape)} of this "
                         f"{type(module).__name__} with rep_in={rep_in!r}, rep_out={rep_out!r}: {e}") from e
    if not (isinstance(e_perp, torch.Tensor) and isinstance(e_g, torch.Tensor)):
        raise TypeError(f"kernel space {_space_text(space)}: .energies must return two tensors")


def _space_text(space) -> str:
    d = getattr(space, "describe", None)
    return d() if callable(d) else repr(space)


def declare(module: nn.Module, rep_in: Rep, rep_out: Rep, *, kernel_space=None, bias: bool = True) -> nn.Module:
    """Declare how a group acts on an existing ``nn.Linear`` or ``nn.Conv1d/2d/3d``; returns ``module``.

    Args:
        module: the layer. Its forward pass, parameters, state_dict and speed are unchanged.
        rep_in, rep_out: representations of the same group on the input / output features
            (``rep_in.dim == in_features`` or ``in_channels``, likewise for ``rep_out``).
        kernel_space: convolutions only. ``None`` (default): the exact grid action when the group
            maps the kernel grid onto itself (or the kernel is 1x1), else the group's default
            steerable kernel space (``equiproj.steerable.default_kernel_space``); ``"grid"``:
            require the exact grid action; ``"channels"``: G acts on the channels only; or a
            kernel-space object with ``.energies(weight, rep_in, rep_out)`` and
            ``.project(weight, rep_in, rep_out, which=...)``.
        bias: include the bias (a map from the trivial rep to ``rep_out``) in the energies.

    Raises:
        TypeError: not a Linear / (non-transposed) Conv layer, or not Reps.
        ValueError: shapes that do not match the reps, different groups, grouped convolutions.
        NoKernelSpaceError: a conv whose group has neither a grid action nor a kernel space yet.

    Declaring again replaces the previous declaration.
    """
    _check_reps(rep_in, rep_out)
    if not isinstance(module, nn.Module):
        raise TypeError(f"declare needs an nn.Module, got {type(module).__name__}")
    if _translation.is_locally_connected(module):
        raise TypeError(f"{type(module).__name__} is declared with equiproj.nn.declare_translations(module)")
    _check_materialised(module)
    G = rep_out.group
    if isinstance(module, nn.Linear):
        if kernel_space is not None:
            raise ValueError("kernel_space applies to convolutions only, not nn.Linear")
        shape = tuple(module.weight.shape)
        if shape != (rep_out.dim, rep_in.dim):
            raise ValueError(f"nn.Linear weight has shape {shape} = (out_features, in_features) but "
                             f"(rep_out.dim, rep_in.dim) = ({rep_out.dim}, {rep_in.dim})")
        decl = Declaration("linear", rep_in, rep_out, rep_in, shape, bias, None, 0, f"linear map, exact ({G})")
    elif isinstance(module, _ConvNd):
        if module.transposed:
            raise TypeError(f"{type(module).__name__}: transposed convolutions are not supported")
        if module.groups != 1:
            raise ValueError(f"{type(module).__name__} has groups={module.groups}: only groups=1 convolutions "
                             "can be declared (a grouped conv is not one dense map from rep_in to rep_out)")
        if module.in_channels != rep_in.dim or module.out_channels != rep_out.dim:
            raise ValueError(f"{type(module).__name__}({module.in_channels}, {module.out_channels}, ...) does not match "
                             f"rep_in.dim = {rep_in.dim}, rep_out.dim = {rep_out.dim}")
        decl = _conv_declaration(module, rep_in, rep_out, kernel_space, bias)
    else:
        raise TypeError(f"declare supports nn.Linear and nn.Conv1d/2d/3d, got {type(module).__name__}")
    module.__dict__[_ATTR] = decl
    return module


def _conv_declaration(module, rep_in, rep_out, kernel_space, bias):
    G = rep_out.group
    k = tuple(int(v) for v in module.kernel_size)
    s = len(k)
    shape = tuple(module.weight.shape)
    if shape != (rep_out.dim, rep_in.dim) + k:  # guards against a swapped weight
        raise ValueError(f"conv weight has shape {shape}, expected {(rep_out.dim, rep_in.dim) + k}")
    ks = _fmt_shape(k)
    if kernel_space == "channels":
        rep_pix = math.prod(k) * G.trivial()
        return Declaration("channels", rep_in, rep_out, rep_in @ rep_pix, shape, bias, None, s,
                           f"channels only: {G} acts on the channels, each tap of the {ks} kernel separately (exact)")
    if isinstance(kernel_space, str) and kernel_space != "grid":
        raise ValueError(f"kernel_space must be None, 'grid', 'channels' or a kernel-space object, got {kernel_space!r}")
    if kernel_space is None or kernel_space == "grid":
        if math.prod(k) == 1:
            return Declaration("pointwise", rep_in, rep_out, rep_in, shape, bias, None, s,
                               f"{ks} conv, exact ({G} acts on the channels of a single kernel point)")
        if _grid.has_grid_action(G, k):
            return Declaration("grid", rep_in, rep_out, rep_in @ _grid.kernel_rep(G, k), shape, bias, None, s,
                               f"exact grid action: {G} permutes the {ks} kernel grid")
        if kernel_space == "grid":
            raise ValueError(f"{G} does not map the {ks} kernel grid of this {s}-D conv onto itself: no exact grid "
                             "action (exact: subgroups of D4 on square 2-D kernels, Octahedral/FullOctahedral on cubic "
                             "3-D kernels, any group on 1x1 kernels)")
        kernel_space = _default_kernel_space(G, k)
    _check_kernel_space(kernel_space, module, rep_in, rep_out)
    return Declaration("kernel_space", rep_in, rep_out, None, shape, bias, kernel_space, s, _space_text(kernel_space))


def declare_translations(module: nn.Module, *, bias: bool = True) -> nn.Module:
    """Declare that a periodic locally connected layer (:class:`equiproj.translation.LocallyConnected1d`
    or ``2d``) should be translation equivariant, i.e. a convolution; returns ``module``.

    Its energies are those of :func:`equiproj.translation.energies` (exact); the bias counts too
    (a translation-equivariant bias is the same at every position)."""
    if not _translation.is_locally_connected(module):
        raise TypeError(f"declare_translations needs an equiproj.translation.LocallyConnected1d/2d, got "
                        f"{type(module).__name__}")
    s = module.spatial_dims
    desc = (f"translations of the periodic {_fmt_shape(module.size)} grid, exact (equivariant iff a convolution "
            f"with {_fmt_shape(module.kernel_size)} kernels)")
    module.__dict__[_ATTR] = Declaration("translation", None, None, None, tuple(module.weight.shape), bias, None, s, desc)
    return module


def undeclare(module: nn.Module) -> nn.Module:
    """Remove a declaration (no-op if there is none); returns ``module``."""
    module.__dict__.pop(_ATTR, None)
    return module


def declaration(module: nn.Module) -> Declaration | None:
    """The module's :class:`Declaration`, or ``None`` if it is not declared."""
    d = module.__dict__.get(_ATTR)
    if isinstance(d, _StaleDeclaration):
        raise ValueError(f"{type(module).__name__} was unpickled and its declaration ({d.text}) was not: declarations "
                         "are rebuilt from code, not pickled; call equiproj.nn.declare on it again")
    return d


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (for layer names)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def declared_layers(model: nn.Module) -> list[tuple[str, nn.Module, Declaration]]:
    """Every declared layer of ``model`` as ``(name, module, declaration)``, in ``named_modules`` order
    (names relative to the model inside DDP / ``torch.compile`` wrappers; the root is ``""``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = []
    for name, m in _unwrap(model).named_modules():
        if _ATTR in m.__dict__:
            d = declaration(m)
            out.append((name, m, d))
    return out


def _select(model, layers) -> list[tuple[str, nn.Module, Declaration]]:
    found = declared_layers(model)
    if layers is None:
        if not found:
            raise ValueError(f"{type(_unwrap(model)).__name__} has no declared layers: call equiproj.nn.declare(layer, "
                             "rep_in, rep_out) on its Linear/Conv layers first")
        return found
    by_name = {n: (n, m, d) for n, m, d in found}
    by_id = {id(m): (n, m, d) for n, m, d in found}
    named = dict(_unwrap(model).named_modules())
    out = []
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    for x in layers:
        if isinstance(x, str):
            if x not in named:
                raise ValueError(f"model has no layer named {x!r}")
            if x not in by_name:
                raise ValueError(f"layer {x!r} ({type(named[x]).__name__}) is not declared: call equiproj.nn.declare on it")
            out.append(by_name[x])
        elif isinstance(x, nn.Module):
            if id(x) not in by_id:
                what = "is not part of the model" if all(x is not m for m in named.values()) else "is not declared"
                raise ValueError(f"layer {type(x).__name__} {what}: call equiproj.nn.declare on it")
            out.append(by_id[id(x)])
        else:
            raise TypeError(f"layers must be module names or modules, got {type(x).__name__}")
    if not out:
        raise ValueError("layers is empty")
    return out


# ---------------------------------------------------------------------------------------------
# tensors: DTensor (FSDP2) parameters, shapes
# ---------------------------------------------------------------------------------------------
def _dtensor_cls():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_DTENSOR = _dtensor_cls()


def _is_dtensor(t) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2) is all-gathered (differentiable), anything else returned as is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _weight(name, module, decl) -> torch.Tensor:
    w = _full(module.weight)
    if tuple(w.shape) != decl.weight_shape:
        raise ValueError(f"layer {name or type(module).__name__!r}: weight has shape {tuple(w.shape)}, but "
                         f"{decl.weight_shape} when it was declared: declare it again")
    return w


def _bias(module, decl) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    if not decl.include_bias or b is None:
        return None
    return _full(b)


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)``; ``value`` is the full tensor (scattered back into a DTensor's shards)."""
    if _is_dtensor(param):
        try:
            from torch.distributed.tensor import distribute_tensor
        except ImportError:  # torch < 2.5
            from torch.distributed._tensor import distribute_tensor
        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value.reshape(param.shape).to(param.dtype))


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# energies and the penalty
# ---------------------------------------------------------------------------------------------
def _layer_terms(layers):
    """Matrix-form terms for ``energies_many`` and the other layers' energies (computed here).

    Returns (weights, reps, owner, extra): ``owner[j]`` is the layer index of ``weights[j]``;
    ``extra`` lists ``(layer index, E_perp, E_G)``."""
    weights, reps, owner, extra = [], [], [], []
    for i, (name, m, d) in enumerate(layers):
        w = _weight(name, m, d)
        b = _bias(m, d)
        if d.case in _MATRIX_CASES:
            weights.append(w.reshape(w.shape[0], -1))
            reps.append((d.weight_rep_in, d.rep_out))
            owner.append(i)
        elif d.case == "kernel_space":
            ep, eg = d.kernel_space.energies(w, d.rep_in, d.rep_out)
            extra.append((i, ep, eg))
        else:  # translation
            ep, eg = _translation.energies(w, d.spatial_dims, position_dim=2)
            extra.append((i, ep, eg))
        if b is not None:
            if d.case == "translation":
                ep, eg = _translation.energies(b, d.spatial_dims, position_dim=1)
                extra.append((i, ep, eg))
            else:
                weights.append(b[:, None])
                reps.append((d.bias_rep_in, d.rep_out))
                owner.append(i)
    return weights, reps, owner, extra


def _per_layer(layers, index_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    weights, reps, owner, extra = _layer_terms(layers)
    parts_p, parts_g = [], []
    if weights:
        ep, eg = energies_many(weights, reps)
        parts_p.append(ep)
        parts_g.append(eg)
    for _, ep, eg in extra:
        parts_p.append(ep.reshape(1))
        parts_g.append(eg.reshape(1))
    dt = torch.float64 if all(p.dtype == torch.float64 for p in parts_p) else torch.float32
    ep = torch.cat([p.to(dt) for p in parts_p])
    eg = torch.cat([p.to(dt) for p in parts_g])
    owners = owner + [i for i, _, _ in extra]
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
    is one graph node), but the other cases here (kernel spaces, translations, FSDP2 gathers,
    the index cache) are not verified under dynamo. As an eager call (one graph break) the
    penalty costs what it costs outside compile, and the rest of the step compiles."""
    with _no_autocast(layers[0][1].weight.device):
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


def _steerable():
    return importlib.import_module(".steerable", __package__)


def _is_steerable_space(space) -> bool:
    """Whether ``space`` is a :class:`equiproj.steerable.SteerableKernelSpace` (other kernel-space
    objects implement only the protocol: energies, project, coefficients)."""
    try:
        return isinstance(space, _steerable().SteerableKernelSpace)
    except ImportError:
        return False


def _weighted_sum(e_perp, e_g, lambda_perp, lambda_G, norm: str, use_g: bool) -> torch.Tensor:
    """``sum lambda_perp * E_perp + lambda_G * E_G`` (of ``sqrt(E)`` for ``norm="unsquared"``)."""
    if norm == "unsquared":
        e_perp, e_g = _safe_sqrt(e_perp), _safe_sqrt(e_g)
    total = (lambda_perp * e_perp).sum()
    return total + (lambda_G * e_g).sum() if use_g else total


def _accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` as autograd would (a fresh ``.grad`` when there is none)."""
    if not param.requires_grad:
        return
    grad = grad.reshape(param.shape).to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _safe_sqrt(e: torch.Tensor) -> torch.Tensor:
    # the subgradient 0 at E = 0 (an exactly equivariant layer) instead of inf * 0 = NaN
    return torch.sqrt(e.clamp_min(torch.finfo(e.dtype).tiny))


class ProjectionPenalty:
    """``sum_layers lambda_perp * E_perp + lambda_G * E_G`` over the declared layers of a model.

    Args:
        model: the model (may be wrapped in DDP or ``torch.compile``; may be FSDP2-sharded).
        lambda_perp, lambda_G: a number >= 0 for every layer, or a mapping from layer names (as
            in ``model.named_modules()``, e.g. ``"features.0"``) to numbers, with an optional
            ``"default"`` key for the layers it does not name.
        norm: ``"squared"`` (default, ``E``) or ``"unsquared"`` (``sqrt(E)``, the Frobenius norm;
            its gradient at an exactly equivariant layer is taken as 0).
        layers: optional subset (names or modules); each must be declared. Default: all.

    Calling it returns the penalty, a differentiable scalar (float32; float64 if every weight is
    float64). The declared layers are found when the penalty is built; weights are read at each
    call. Example::

        penalty = ProjectionPenalty(model, lambda_perp=1e-2)
        loss = criterion(model(x), y) + penalty()
    """

    def __init__(self, model: nn.Module, lambda_perp, lambda_G=0.0, norm: str = "squared",
                 layers: Iterable[str | nn.Module] | None = None):
        if norm not in ("squared", "unsquared"):
            raise ValueError(f"norm must be 'squared' or 'unsquared', got {norm!r}")
        self.layers = _select(model, layers)
        self.names = [n for n, _, _ in self.layers]
        self.norm = norm
        self._index_cache: dict = {}
        self.set_lambdas(lambda_perp, lambda_G)

    def set_lambdas(self, lambda_perp=None, lambda_G=None) -> None:
        """Change the weights (same forms as in the constructor); ``None`` keeps the current value."""
        if lambda_perp is not None:
            self.lambda_perp = _lambdas(lambda_perp, self.names, "lambda_perp")
        if lambda_G is not None:
            self.lambda_G = _lambdas(lambda_G, self.names, "lambda_G")
        self._lambda_cache: dict = {}

    def _lambda_tensors(self, device, dtype):
        key = (device, dtype)
        if key not in self._lambda_cache:
            self._lambda_cache[key] = (torch.tensor(self.lambda_perp, device=device, dtype=dtype),
                                       torch.tensor(self.lambda_G, device=device, dtype=dtype))
        return self._lambda_cache[key]

    def energies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)``, each ``[L]`` (one per layer of ``self.names``, bias included), differentiable."""
        return _per_layer_opaque(self.layers, self._index_cache)

    def __call__(self) -> torch.Tensor:
        e_perp, e_g = self.energies()
        lp, lg = self._lambda_tensors(e_perp.device, e_perp.dtype)
        return _weighted_sum(e_perp, e_g, lp, lg, self.norm, any(self.lambda_G))

    def backward(self) -> torch.Tensor:
        """Add the penalty's gradient to the ``.grad`` of the declared weights (and biases) and
        return the penalty's value (a detached scalar), without building an autograd graph.

        Matrix-form layers (``"linear"``, ``"grid"``, ``"pointwise"``, ``"channels"``) and biases
        take :func:`equiproj.energies_and_grads_many`: with the fused op, one kernel call reads each
        weight once and writes ``lambda_perp dE_perp + lambda_G dE_G`` once (the autograd route
        ``penalty().backward()`` reads each weight twice: its forward cannot know the incoming
        gradient). Layers on a :class:`~equiproj.steerable.SteerableKernelSpace` take
        :func:`~equiproj.steerable.kernel_energies_and_grads_many` (one more fused call for all of
        them). Translations, FSDP2-sharded parameters, other kernel-space objects and
        ``norm="unsquared"`` go through autograd. The gradients are the same either way (tested).
        Parameters with ``requires_grad=False`` get none.

        Call it before ``loss.backward()``: a parameter without a ``.grad`` takes the penalty's
        gradient as its ``.grad`` (no copy), and autograd adds the task gradient to it in place.
        Example::

            optimizer.zero_grad()
            penalty.backward()
            criterion(model(x), y).backward()
            optimizer.step()
        """
        slow, terms = [], []
        mats, mat_reps, mat_params, mat_lp, mat_lg = [], [], [], [], []  # matrix-form weights and biases
        convs, conv_spaces, conv_reps, conv_params, conv_lp, conv_lg = [], [], [], [], [], []  # kernel spaces
        with _no_autocast(self.layers[0][1].weight.device):
            for i, (name, m, d) in enumerate(self.layers):
                steerable = d.case == "kernel_space" and _is_steerable_space(d.kernel_space)
                if (self.norm != "squared" or _is_dtensor(m.weight) or _is_dtensor(getattr(m, "bias", None))
                        or not (d.case in _MATRIX_CASES or steerable)):
                    slow.append(i)
                    continue
                w = _weight(name, m, d).detach()
                if steerable:
                    convs.append(w)
                    conv_spaces.append(d.kernel_space)
                    conv_reps.append((d.rep_in, d.rep_out))
                    conv_params.append(m.weight)
                    conv_lp.append(self.lambda_perp[i])
                    conv_lg.append(self.lambda_G[i])
                else:
                    mats.append(w.reshape(w.shape[0], -1))
                    mat_reps.append((d.weight_rep_in, d.rep_out))
                    mat_params.append(m.weight)
                b = _bias(m, d)
                if b is not None:
                    mats.append(b.detach()[:, None])
                    mat_reps.append((d.bias_rep_in, d.rep_out))
                    mat_params.append(m.bias)
                mat_lp.extend([self.lambda_perp[i]] * (len(mat_params) - len(mat_lp)))
                mat_lg.extend([self.lambda_G[i]] * (len(mat_params) - len(mat_lg)))
            for ws, params, lp, lg, compute in (
                    (mats, mat_params, mat_lp, mat_lg,
                     lambda: energies_and_grads_many(mats, mat_reps, lambda_perp=mat_lp, lambda_G=mat_lg)),
                    (convs, conv_params, conv_lp, conv_lg,
                     lambda: _steerable().kernel_energies_and_grads_many(convs, conv_spaces, conv_reps,
                                                                         lambda_perp=conv_lp, lambda_G=conv_lg))):
                if not ws:
                    continue
                ep, eg, grads = compute()
                for p, g in zip(params, grads):
                    _accumulate_grad(p, g)
                as64 = lambda x: torch.tensor(x, dtype=torch.float64, device=ep.device)  # noqa: E731
                terms.append((ep.double() * as64(lp)).sum() + (eg.double() * as64(lg)).sum())
        if slow:
            e_perp, e_g = _per_layer_opaque([self.layers[i] for i in slow])
            lps, lgs = ([lam[i] for i in slow] for lam in (self.lambda_perp, self.lambda_G))
            value = _weighted_sum(e_perp, e_g, *(torch.tensor(x, dtype=e_perp.dtype, device=e_perp.device)
                                                 for x in (lps, lgs)), self.norm, any(lgs))
            if value.requires_grad:
                value.backward()
            terms.append(value.detach().double())
        dt = torch.float64 if all(m.weight.dtype == torch.float64 for _, m, _ in self.layers) else torch.float32
        return sum(t.to(terms[0].device) for t in terms).to(dt)

    def __repr__(self):
        layers = ", ".join(f"{n or '(model)'} [{d.case}]" for n, _, d in self.layers)
        return f"ProjectionPenalty({len(self.layers)} layers, norm={self.norm!r}: {layers})"


# ---------------------------------------------------------------------------------------------
# hard projection
# ---------------------------------------------------------------------------------------------
def project_(model: nn.Module, which: str = "equivariant", layers=None) -> nn.Module:
    """Replace each declared layer's weight (and bias) by its equivariant part ``P(W)``
    (``which="equivariant"``) or by ``W - P(W)`` (``"non_equivariant"``), in place under
    ``torch.no_grad()``; computed in float64, stored in the parameter's dtype. Returns ``model``."""
    if which not in ("equivariant", "non_equivariant"):
        raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")
    complement = which == "non_equivariant"
    selected = _select(model, layers)
    with torch.no_grad(), _no_autocast(selected[0][1].weight.device):
        for name, m, d in selected:
            w = _weight(name, m, d).double()
            if d.case in _MATRIX_CASES:
                new = _project(w.reshape(w.shape[0], -1), d.weight_rep_in, d.rep_out, complement=complement)
            elif d.case == "kernel_space":
                new = d.kernel_space.project(w, d.rep_in, d.rep_out, which=which)
            else:
                new = _translation.project(w, d.spatial_dims, which, position_dim=2)
            _assign(m.weight, new.reshape(w.shape))
            b = _bias(m, d)
            if b is not None:
                b = b.double()
                if d.case == "translation":
                    nb = _translation.project(b, d.spatial_dims, which, position_dim=1)
                else:
                    nb = _project(b[:, None], d.bias_rep_in, d.rep_out, complement=complement)[:, 0]
                _assign(m.bias, nb.reshape(b.shape))
    return model


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _shares_no_irrep(rep_in: Rep, rep_out: Rep) -> bool:
    return not ({ir for ir, _ in rep_in.irreps} & {ir for ir, _ in rep_out.irreps})


def _breakdown_rows(W, rep_in, rep_out, into: dict):
    for (io, ii), e in noneq_energy(W, rep_in, rep_out, breakdown=True).items():
        key = (str(io), str(ii))
        into[key] = into.get(key, 0.0) + float(e)


class Report:
    """Per-layer energies of a model's declared layers (made by :func:`report`).

    ``rows`` is a list of plain dicts (one per layer), with keys: ``name``, ``module``,
    ``case``, ``description``, ``group``, ``rep_in``, ``rep_out`` (strings), ``weight_shape``,
    ``norm_sq`` (||W||^2 + ||b||^2), ``e_perp``, ``e_g``, ``e_perp_bias`` (part of ``e_perp``),
    ``rel_perp`` (E_perp / norm_sq), ``defect_lower`` = sqrt(E_perp) and ``defect_upper`` =
    2 sqrt(E_perp) (math.md §2: sqrt(E_perp) <= sup_g ||rho_out(g) W - W rho_in(g)||_F <= 2 sqrt(E_perp),
    for the layer's full action, kernel grid included; ``None`` for kernel-space layers, where G
    does not act on the whole kernel), ``shares_no_irrep`` (rep_in and rep_out share no irrep, so the
    equivariant part is forced to 0; ``None`` where not applicable), ``breakdown`` (``None``, or a
    list of ``{"irrep_out", "irrep_in", "e_perp"}`` sorted by energy, when requested). ``str(report)``
    is a text table; :meth:`as_dict` a plain nested dict.
    """

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def as_dict(self) -> dict:
        tot_n = sum(r["norm_sq"] for r in self.rows)
        tot_p = sum(r["e_perp"] for r in self.rows)
        return {"layers": [dict(r) for r in self.rows],
                "total": {"norm_sq": tot_n, "e_perp": tot_p, "e_g": sum(r["e_g"] for r in self.rows),
                          "rel_perp": tot_p / tot_n if tot_n > 0 else 0.0}}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self):
        return f"<equiproj Report: {len(self.rows)} layers>"

    def __str__(self):
        head = ["layer", "module", "case", "||W||^2", "E_perp", "E_perp/||W||^2", "sup_g defect <=", "flag"]
        body = []
        for r in self.rows:
            flag = "shares no irrep: equivariant part is 0" if r["shares_no_irrep"] else ""
            body.append([r["name"] or "(model)", r["module"], r["case"], f"{r['norm_sq']:.3e}", f"{r['e_perp']:.3e}",
                         f"{r['rel_perp']:.2e}", "n/a" if r["defect_upper"] is None else f"{r['defect_upper']:.2e}", flag])
        t = self.as_dict()["total"]
        body.append(["total", "", "", f"{t['norm_sq']:.3e}", f"{t['e_perp']:.3e}", f"{t['rel_perp']:.2e}", "", ""])
        widths = [max(len(str(x[j])) for x in [head] + body) for j in range(len(head))]
        fmt = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
        lines.append("")
        for r in self.rows:
            lines.append(f"{r['name'] or '(model)'}: {r['description']}; {r['rep_in']} -> {r['rep_out']}")
            if r["breakdown"]:
                for e in r["breakdown"]:
                    if e["e_perp"] > 0:
                        share = e["e_perp"] / r["e_perp"] if r["e_perp"] > 0 else 0.0
                        lines.append(f"    {e['irrep_out']} <- {e['irrep_in']}: E_perp {e['e_perp']:.3e} ({share:.1%})")
        lines.append("defect bound: sup_g ||rho_out(g) W - W rho_in(g)||_F <= 2 sqrt(E_perp) (math.md §2)")
        return "\n".join(lines)


def report(model: nn.Module, breakdown: bool = False, layers=None) -> Report:
    """Energies of every declared layer (float64, no gradients): a :class:`Report`.

    ``breakdown=True`` adds, for matrix-form layers, E_perp per (irrep_out, irrep_in) block type
    in the irrep basis of the layer's full action (where the layer breaks the symmetry)."""
    rows = []
    with torch.no_grad():
        for name, m, d in _select(model, layers):
            w = _weight(name, m, d).detach().double()
            b = _bias(m, d)
            b = None if b is None else b.detach().double()
            bd: dict | None = {} if breakdown and d.case in _MATRIX_CASES else None
            ep_b = 0.0
            shares_none = None
            if d.case in _MATRIX_CASES:
                W = w.reshape(w.shape[0], -1)
                ep, eg = (float(x) for x in _energies(W, d.weight_rep_in, d.rep_out))
                shares_none = _shares_no_irrep(d.weight_rep_in, d.rep_out)
                if bd is not None:
                    _breakdown_rows(W, d.weight_rep_in, d.rep_out, bd)
                if b is not None:
                    ebp, ebg = (float(x) for x in _energies(b[:, None], d.bias_rep_in, d.rep_out))
                    ep, eg, ep_b = ep + ebp, eg + ebg, ebp
                    if bd is not None:
                        _breakdown_rows(b[:, None], d.bias_rep_in, d.rep_out, bd)
            elif d.case == "kernel_space":
                ep, eg = (float(x) for x in d.kernel_space.energies(w, d.rep_in, d.rep_out))
                if b is not None:
                    ebp, ebg = (float(x) for x in _energies(b[:, None], d.bias_rep_in, d.rep_out))
                    ep, eg, ep_b = ep + ebp, eg + ebg, ebp
            else:
                ep, eg = (float(x) for x in _translation.energies(w, d.spatial_dims, position_dim=2))
                shares_none = False
                if b is not None:
                    ebp, ebg = (float(x) for x in _translation.energies(b, d.spatial_dims, position_dim=1))
                    ep, eg, ep_b = ep + ebp, eg + ebg, ebp
            norm_sq = float(w.square().sum()) + (float(b.square().sum()) if b is not None else 0.0)
            exact = d.case != "kernel_space"
            rows.append({
                "name": name,
                "module": _module_type(m),
                "case": d.case,
                "description": d.description,
                "group": "translations" if d.case == "translation" else str(d.group),
                "rep_in": "-" if d.rep_in is None else repr(d.rep_in),
                "rep_out": "-" if d.rep_out is None else repr(d.rep_out),
                "weight_shape": tuple(d.weight_shape),
                "norm_sq": norm_sq,
                "e_perp": ep,
                "e_g": eg,
                "e_perp_bias": ep_b,
                "rel_perp": ep / norm_sq if norm_sq > 0 else 0.0,
                "defect_lower": math.sqrt(ep) if exact else None,
                "defect_upper": 2 * math.sqrt(ep) if exact else None,
                "shares_no_irrep": shares_none,
                "breakdown": None if bd is None else [
                    {"irrep_out": k[0], "irrep_in": k[1], "e_perp": v}
                    for k, v in sorted(bd.items(), key=lambda kv: -kv[1])],
            })
    return Report(rows)


def _module_type(m: nn.Module) -> str:
    # FSDP2 swaps in a subclass named FSDP<Name>: show the user's class
    for cls in type(m).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(m).__name__


# ---------------------------------------------------------------------------------------------
# convenience layers
# ---------------------------------------------------------------------------------------------
class ApproxEquivariantLinear(nn.Linear):
    """``nn.Linear(rep_in.dim, rep_out.dim)`` declared with ``(rep_in, rep_out)``: a plain
    ``nn.Linear`` otherwise (same forward, parameters and state_dict)."""

    def __init__(self, rep_in: Rep, rep_out: Rep, bias: bool = True, device=None, dtype=None):
        _check_reps(rep_in, rep_out)
        super().__init__(rep_in.dim, rep_out.dim, bias=bias, device=device, dtype=dtype)
        declare(self, rep_in, rep_out)


class ApproxEquivariantConv2d(nn.Conv2d):
    """``nn.Conv2d(rep_in.dim, rep_out.dim, kernel_size, ...)`` declared with ``(rep_in, rep_out)``
    (``kernel_space`` as in :func:`declare`): a plain ``nn.Conv2d`` otherwise."""

    def __init__(self, rep_in: Rep, rep_out: Rep, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, kernel_space=None):
        _check_reps(rep_in, rep_out)
        super().__init__(rep_in.dim, rep_out.dim, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        declare(self, rep_in, rep_out, kernel_space=kernel_space)


class ApproxEquivariantConv3d(nn.Conv3d):
    """``nn.Conv3d(rep_in.dim, rep_out.dim, kernel_size, ...)`` declared with ``(rep_in, rep_out)``
    (``kernel_space`` as in :func:`declare`): a plain ``nn.Conv3d`` otherwise."""

    def __init__(self, rep_in: Rep, rep_out: Rep, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, kernel_space=None):
        _check_reps(rep_in, rep_out)
        super().__init__(rep_in.dim, rep_out.dim, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        declare(self, rep_in, rep_out, kernel_space=kernel_space)
