"""``check_equivariance``: does a whole model commute with the group on real inputs, and where does it not?"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import grid as _grid
from ..groups import Group, Rep, as_rep_pair, check_rep_pair
from ._declare import declaration, unwrap

__all__ = ["check_equivariance", "EquivarianceCheck"]

#: modules that act channel by channel (and position by position, or on positions only): the channel
#: representation of their output is that of their input
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Mish,
                nn.Hardtanh, nn.ReLU6, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
                nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)


@dataclass
class EquivarianceCheck:
    """What :func:`check_equivariance` found.

    Attributes:
        max_rel_error: the largest relative error ``|f(g x) - g f(x)| / |g f(x)|`` over the elements
            and the samples of the batch (per sample, Frobenius norms).
        per_element: that error for each element of ``elements``.
        elements: the group elements checked, ``[n, s, s]``.
        elements_kind: ``"all elements"``, ``"grid subgroup"`` (the elements that map the input grid
            onto itself) or ``"sampled"`` (random elements of a continuous group, vector inputs).
        modules: per module whose output representation is known (declared layers, the equivariant
            blocks of :mod:`equiproj.nn`, and channel-wise modules after them), in execution order, the
            largest relative error of its output.
        first_failure: ``(name, error)`` of the first of those modules whose error exceeds
            ``tolerance``, or ``None``.
        tolerance: the threshold used for ``first_failure`` and ``ok``.
    """

    max_rel_error: float
    per_element: list[float]
    elements: torch.Tensor
    elements_kind: str
    modules: dict[str, float] = field(default_factory=dict)
    first_failure: tuple[str, float] | None = None
    tolerance: float = 1e-5

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def __str__(self):
        lines = [f"equivariance: max relative error {self.max_rel_error:.2e} over {len(self.per_element)} elements "
                 f"({self.elements_kind}); tolerance {self.tolerance:.0e}: {'ok' if self.ok else 'NOT equivariant'}"]
        if self.first_failure is not None:
            lines.append(f"first module that breaks it: {self.first_failure[0]!r} (error {self.first_failure[1]:.2e})")
        for name, err in self.modules.items():
            lines.append(f"  {name}: {err:.2e}")
        return "\n".join(lines)


def _grid_subgroup(group: Group, shape: tuple[int, ...]) -> torch.Tensor:
    """The elements of ``group`` that map a grid of this shape onto itself (signed permutation matrices)."""
    s = len(shape)
    mats = []
    for perm in itertools.permutations(range(s)):
        for signs in itertools.product((1.0, -1.0), repeat=s):
            m = torch.zeros(s, s, dtype=torch.float64)
            for i, j in enumerate(perm):
                m[i, j] = signs[i]
            mats.append(m)
    out = []
    for g in mats:
        try:
            group.check_elements(g)
        except ValueError:
            continue
        if _grid.grid_permutation(g, shape) is not None:
            out.append(g)
    return torch.stack(out)


def _choose_elements(group: Group, x: torch.Tensor, elements, generator) -> tuple[torch.Tensor, str]:
    s = x.dim() - 2
    if elements is not None:
        els = group.check_elements(torch.as_tensor(elements, dtype=torch.float64))
        return els.reshape(-1, group.ambient_dim, group.ambient_dim), "given"
    if s == 0:
        if group.is_finite:
            return group.elements(), "all elements"
        return group.sample(8, generator=generator), "sampled"
    if s != group.ambient_dim:
        raise ValueError(f"x has {s} spatial dims but {group} acts on R^{group.ambient_dim}: pass inputs "
                         f"[B, C, *{group.ambient_dim} spatial] (or [B, C] for vector features)")
    els = _grid_subgroup(group, tuple(x.shape[2:]))
    full = group.is_finite and len(els) == group.order
    return els, "all elements" if full else "grid subgroup"


def _act(t: torch.Tensor, g: torch.Tensor, rep: Rep, spatial: int) -> torch.Tensor | None:
    """``g . t`` for a tensor carrying ``rep`` on dim 1 (and ``spatial`` grid dims), or ``None`` when the
    grid of ``t`` is not mapped onto itself by ``g``."""
    if spatial:
        if t.dim() != 2 + spatial or _grid.grid_permutation(g, tuple(t.shape[2:])) is None:
            return None
        return _grid.act(t, g, rep)
    R = rep.matrix(g).to(device=t.device, dtype=t.dtype)
    return torch.movedim(torch.movedim(t, 1, -1) @ R.T, -1, 1)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max over samples of ``|a - b| / |b|`` (Frobenius norm per sample), float64."""
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    num = (a - b).norm(dim=1)
    den = b.norm(dim=1)
    scale = den.max().clamp_min(1e-300)
    return float((num / torch.maximum(den, 1e-12 * scale)).max())


def _known_rep(module: nn.Module, input_rep):
    """The representation of ``module``'s output channels, where it can be known."""
    rep = getattr(module, "rep_out", None)
    if isinstance(rep, Rep):
        return rep
    d = declaration(module) if hasattr(module, "__dict__") else None
    if d is not None and d.rep_out is not None:
        return d.rep_out
    if isinstance(module, _CHANNELWISE):
        return input_rep
    return None


def _record(model: nn.Module, x: torch.Tensor, rep_in: Rep):
    """Run ``model(x)``; return ``(output, [(name, output, rep)])`` for the modules whose output rep is known,
    in execution order (the input rep of a module is that of the recorded tensor it received)."""
    reps = {id(x): rep_in}
    records = []
    hooks = []
    named = [(n, m) for n, m in unwrap(model).named_modules() if n]

    def hook(name):
        def fn(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            input_rep = reps.get(id(inputs[0])) if inputs and isinstance(inputs[0], torch.Tensor) else None
            rep = _known_rep(module, input_rep)
            if rep is not None and output.dim() >= 2 and output.shape[1] == rep.dim:
                reps[id(output)] = rep
                records.append((name, output, rep))
        return fn

    for name, m in named:
        hooks.append(m.register_forward_hook(hook(name)))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, records


@torch.no_grad()
def check_equivariance(model: nn.Module, rep_in, rep_out, x: torch.Tensor, *, elements=None,
                       tolerance: float | None = None, generator: torch.Generator | None = None) -> EquivarianceCheck:
    """Apply group elements to a real input batch and compare ``model(g x)`` with ``g model(x)``.

    Args:
        model: any module (it is put in eval mode for the check and restored after).
        rep_in, rep_out: the representations of the input and output channels (dim 1), ``Rep`` or
            e3nn ``Irreps``. For inputs ``[B, C, *spatial]`` the group also moves the positions
            (:func:`equiproj.grid.act`); for ``[B, C]`` it acts on the channels only. An output with as
            many spatial dims as the input is moved too; a ``[B, C]`` output is acted on by ``rep_out``.
        x: a real input batch.
        elements: group elements to check (``[n, s, s]``); default: every element for a finite group
            (for spatial inputs, every element that maps the grid onto itself, e.g. the 90-degree
            rotations for C8: the "grid subgroup"), the grid subgroup of a continuous group for
            spatial inputs (4 rotations for SO(2), 24 for SO(3), 48 for O(3)), and 8 random elements
            of a continuous group for vector inputs.
        tolerance: the relative error above which a module is named as breaking equivariance
            (default: 1e-4 for float32 and lower precisions, 1e-9 for float64).
        generator: for the random elements.

    Returns:
        an :class:`EquivarianceCheck` with the largest relative error per element and overall, and the
        first module (declared layers, the blocks of :mod:`equiproj.nn` and channel-wise modules such
        as activations and poolings after them, in execution order) whose output breaks equivariance.

    Example::

        >>> result = check_equivariance(model, 3 * G.trivial(), G.trivial(), images)
        >>> result.max_rel_error, result.first_failure
    """
    rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    check_rep_pair(rep_in, rep_out)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != rep_in.dim:
        raise ValueError(f"x must be a batch [B, {rep_in.dim}] or [B, {rep_in.dim}, *spatial] (channels carry rep_in), "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    group = rep_in.group
    spatial = x.dim() - 2
    els, kind = _choose_elements(group, x, elements, generator)
    if tolerance is None:
        tolerance = 1e-9 if x.dtype == torch.float64 else 1e-4
    was_training = model.training
    model.eval()
    try:
        y, records = _record(model, x, rep_in)
        out_spatial = y.dim() - 2 if y.dim() - 2 == spatial else 0
        per_element, module_errors = [], {}
        for g in els:
            gx = _act(x, g, rep_in, spatial)
            if gx is None:
                raise ValueError(f"an element does not map the input grid {tuple(x.shape[2:])} onto itself")
            gy, g_records = _record(model, gx, rep_in)
            target = _act(y, g, rep_out, out_spatial)
            if target is None:
                raise ValueError(f"an element does not map the output grid {tuple(y.shape[2:])} onto itself: give "
                                 "elements= that do, or check an output without the unmatched grid")
            per_element.append(_rel_error(gy, target))
            by_name = {name: out for name, out, _ in g_records}
            for name, out, rep in records:
                sp = out.dim() - 2 if spatial and out.dim() - 2 == spatial else 0
                moved = _act(out, g, rep, sp)
                if moved is None or name not in by_name or by_name[name].shape != moved.shape:
                    continue
                module_errors[name] = max(module_errors.get(name, 0.0), _rel_error(by_name[name], moved))
    finally:
        model.train(was_training)
    first = next(((n, e) for n, e in module_errors.items() if e > tolerance), None)
    worst = max(per_element) if per_element else 0.0
    if math.isnan(worst):
        worst = math.inf
    return EquivarianceCheck(worst, per_element, els, kind, module_errors, first, tolerance)
