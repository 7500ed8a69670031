"""``check_equivariance``: does a whole model commute with the group on real inputs, and where does it not?

The check must never mislead: errors are computed with per-sample scales (no underflow for tiny
outputs), the absolute error is reported next to the relative one, outputs too small or too
constant to judge are said to be so (``cannot_judge``, and ``ok`` is then false), a module the
check cannot type is named instead of blaming the next one, and the model comes back exactly as
it was (each module's own training flag, its parameters and buffers bit for bit).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import grid as _grid
from ..groups import Group, Rep, as_rep, as_rep_pair, check_rep_pair
from ._declare import declaration, declared_layers, unwrap

__all__ = ["check_equivariance", "EquivarianceCheck", "equivariance_sweep", "default_tolerance"]

#: modules that act channel by channel (and position by position, or on positions only): the channel
#: representation of their output is that of their input
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Mish,
                nn.Hardtanh, nn.ReLU6, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
                nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative error above which :func:`check_equivariance` calls a model (or module) not
    equivariant: 1e-9 for float64 outputs, 1e-4 for float32 and lower precisions."""
    return 1e-9 if dtype == torch.float64 else 1e-4


@dataclass
class EquivarianceCheck:
    """What :func:`check_equivariance` found.

    Attributes:
        max_rel_error: the headline: the largest relative error of the model's output,
            ``|f(g x) - g f(x)| / max(|g f(x)|, |f(g x)|)`` over the elements and the samples of
            the batch (per sample, Frobenius norms computed with a per-sample scale, so that tiny
            outputs do not underflow).
        max_abs_error: the largest ``|f(g x) - g f(x)|`` (per sample), next to the relative one.
        output_norm: the largest ``|f(x)|`` over the samples: the scale of the absolute error.
        per_element: the relative error for each element of ``elements``.
        per_element_abs: the absolute error for each element.
        elements: the group elements checked, ``[n, s, s]``.
        elements_kind: ``"all elements"``, ``"grid subgroup"`` (the elements that map the input grid
            onto itself), ``"sampled"`` (random elements of a continuous group, vector inputs) or
            ``"given"``.
        resampled: whether some given element does not map the grid onto itself and was applied
            by interpolation (see :func:`check_equivariance`): its error includes interpolation error.
        modules: per module whose output representation is known (declared layers, the equivariant
            blocks of :mod:`equiproj.nn`, and channel-wise modules after them), in execution order, the
            largest relative error of its output.
        worst_module: ``(name, error)`` of the module with the largest error, or ``None``.
        first_failure: ``(name, error)`` of the first of those modules whose error exceeds
            ``tolerance``, or ``None``.
        entered_after: when the error enters in modules the check cannot type, the last typed
            module that passed before them (``None``: from the input on).
        untyped_between: the modules without a known output representation (undeclared layers,
            plain ``nn.BatchNorm2d``, custom modules) that ran between ``entered_after`` and
            ``first_failure`` (or the output): the error entered in one of them or in
            ``first_failure``.
        untyped: every leaf module the check could not type, in execution order.
        cannot_judge: why the output cannot be judged (too small or too constant), or ``None``.
        restored: the parameters and buffers that the model's forward changed during the check;
            they were put back.
        tolerance: the threshold used for ``first_failure`` and ``ok``.
    """

    max_rel_error: float
    per_element: list[float]
    elements: torch.Tensor
    elements_kind: str
    modules: dict[str, float] = field(default_factory=dict)
    first_failure: tuple[str, float] | None = None
    tolerance: float = 1e-4
    max_abs_error: float = 0.0
    output_norm: float = 0.0
    per_element_abs: list[float] = field(default_factory=list)
    worst_module: tuple[str, float] | None = None
    entered_after: str | None = None
    untyped_between: list[str] = field(default_factory=list)
    untyped: list[str] = field(default_factory=list)
    cannot_judge: str | None = None
    resampled: bool = False
    restored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The output is judged and its error is within ``tolerance``."""
        return self.cannot_judge is None and self.max_rel_error <= self.tolerance

    def __str__(self):
        verdict = "cannot judge" if self.cannot_judge else ("ok" if self.ok else "NOT equivariant")
        lines = [f"equivariance: max relative error {self.max_rel_error:.2e} (absolute {self.max_abs_error:.2e}, output "
                 f"norm {self.output_norm:.2e}) over {len(self.per_element)} elements ({self.elements_kind}"
                 f"{'; some resampled: includes interpolation error' if self.resampled else ''}); tolerance "
                 f"{self.tolerance:.0e}: {verdict}"]
        if self.cannot_judge:
            lines.append(f"cannot judge: {self.cannot_judge}")
        if self.worst_module is not None:
            lines.append(f"worst module: {self.worst_module[0]!r} (error {self.worst_module[1]:.2e})")
        if self.untyped_between:
            where = f"after {self.entered_after!r} (which passed)" if self.entered_after else "from the input on"
            until = (f"by {self.first_failure[0]!r} (error {self.first_failure[1]:.2e})" if self.first_failure
                     else "by the output")
            lines.append(f"the error entered {where} and is seen {until}; in between ran modules the check cannot "
                         f"type (unknown output representation): {self.untyped_between}")
        elif self.first_failure is not None:
            lines.append(f"first module that breaks it: {self.first_failure[0]!r} (error {self.first_failure[1]:.2e})")
        if self.restored:
            lines.append(f"the forward changed {self.restored}; restored")
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
    if s and s != group.ambient_dim:
        raise ValueError(f"x has {s} spatial dims but {group} acts on R^{group.ambient_dim}: pass inputs "
                         f"[B, C, *{group.ambient_dim} spatial] (or [B, C] for vector features)")
    if elements is not None:
        els = group.check_elements(torch.as_tensor(elements, dtype=torch.float64), "elements")
        els = els.reshape(-1, group.ambient_dim, group.ambient_dim)
        if not len(els):
            raise ValueError("elements is empty: pass at least one group element")
        return els, "given"
    if s == 0:
        if group.is_finite:
            return group.elements(), "all elements"
        return group.sample(8, generator=generator), "sampled"
    els = _grid_subgroup(group, tuple(x.shape[2:]))
    full = group.is_finite and len(els) == group.order
    return els, "all elements" if full else "grid subgroup"


def _disc(shape: tuple[int, ...], device) -> torch.Tensor:
    """``[*shape]`` bool: the grid points within the largest centred disc (ball) inside the grid."""
    p = _grid.grid_points(shape)
    r = (min(shape) - 1) / 2
    return (p.norm(dim=1) <= r + 1e-9).reshape(shape).to(device)


def _taper(shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """``[*shape]``: 1 inside 3/4 of the largest centred disc (ball) in the grid, falling to 0 at its edge as a
    half cosine, 0 outside: the input mask for resampled elements (a hard edge would add interpolation
    error all along it)."""
    p = _grid.grid_points(shape).norm(dim=1)
    R = max((min(shape) - 1) / 2, 1e-9)
    t = ((p / R - 0.75) / 0.25).clamp(0, 1)
    return (0.5 * (1 + torch.cos(torch.pi * t))).reshape(shape).to(device=device, dtype=dtype)


def _resample(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t(g^{-1} p)`` on the grid of ``t`` ``[B, C, *spatial]`` (2 or 3 spatial dims) by bilinear /
    trilinear interpolation about the grid's centre, zero outside the grid."""
    shape = tuple(t.shape[2:])
    s = len(shape)
    p = _grid.grid_points(shape)  # column j runs along axis -1 - j, as grid_sample's coordinate j
    q = p @ g.to(torch.float64)  # rows (g^T p)^T: the source points g^{-1} p
    half = torch.tensor([(n - 1) / 2 for n in reversed(shape)], dtype=torch.float64)
    u = torch.where(half > 0, q / half.clamp_min(0.5), torch.where(q.abs() < 1e-9, 0.0, 2.0))
    work = t if t.dtype in (torch.float32, torch.float64) else t.float()
    coords = u.reshape((1,) + shape + (s,)).expand((t.shape[0],) + shape + (s,)).to(device=t.device, dtype=work.dtype)
    out = F.grid_sample(work, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(t.dtype)


def _act(t: torch.Tensor, g: torch.Tensor, rep: Rep, spatial: int, resample: bool):
    """``(g . t, mask)`` for a tensor carrying ``rep`` on dim 1 (and ``spatial`` grid dims): exact when ``g``
    maps the grid onto itself (``mask`` None), by interpolation when ``resample`` (``mask``: the centred
    disc where both sides are compared), else ``(None, None)``."""
    if spatial:
        if t.dim() != 2 + spatial:
            return None, None
        shape = tuple(t.shape[2:])
        if _grid.grid_permutation(g, shape) is not None:
            return _grid.act(t, g, rep), None
        if not resample or spatial == 1:
            return None, None
        moved = _resample(t, g)
        R = rep.matrix(g).to(device=t.device, dtype=moved.dtype)
        moved = torch.movedim(torch.movedim(moved, 1, -1) @ R.T, -1, 1)
        return moved, _disc(shape, t.device)
    R = rep.matrix(g).to(device=t.device, dtype=t.dtype)
    return torch.movedim(torch.movedim(t, 1, -1) @ R.T, -1, 1), None


def _sample_norms(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norms of ``t`` ``[B, N]`` float64, computed as ``scale |t / scale|``."""
    return (t / scale[:, None]).norm(dim=1) * scale


def _errors(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None):
    """Per sample: ``(|a - b|, max(|a|, |b|))`` float64 (``a``, ``b`` ``[B, ...]``), with a per-sample scale so that
    tiny or huge values neither underflow nor overflow; only where ``mask`` (the trailing dims) holds."""
    if mask is not None:
        a, b = a * mask, b * mask
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    if not a.shape[1]:
        zero = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
        return zero, zero
    s = torch.maximum(a.abs().amax(1), b.abs().amax(1))
    s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    ref = torch.maximum(_sample_norms(a, s), _sample_norms(b, s))
    return _sample_norms(a - b, s), ref


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """Max over samples of ``diff / ref`` (0 where both are 0; ``inf`` for NaN)."""
    rel = torch.where(ref > 0, diff / torch.where(ref > 0, ref, torch.ones_like(ref)), diff)
    worst = float(rel.max()) if rel.numel() else 0.0
    return math.inf if math.isnan(worst) else worst


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
    """Run ``model(x)`` on a fresh copy of ``x``; return ``(output, records, untyped)``: ``records`` the
    ``(name, output, rep)`` of the modules whose output rep is known, ``untyped`` the names of the leaf
    modules that returned a tensor of unknown rep, both in execution order."""
    x = x.clone()
    reps = {id(x): rep_in}
    records, untyped, order = [], [], []
    hooks = []
    named = [(n, m) for n, m in unwrap(model).named_modules() if n]

    def hook(name, leaf):
        def fn(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            input_rep = reps.get(id(inputs[0])) if inputs and isinstance(inputs[0], torch.Tensor) else None
            rep = _known_rep(module, input_rep)
            if rep is not None and output.dim() >= 2 and output.shape[1] == rep.dim:
                reps[id(output)] = rep
                records.append((name, output, rep))
                order.append(name)
            elif leaf:
                untyped.append(name)
                order.append(name)
        return fn

    for name, m in named:
        hooks.append(m.register_forward_hook(hook(name, next(m.children(), None) is None)))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, records, untyped, order


def _outputs(y, rep_out) -> list[tuple[torch.Tensor, Rep]]:
    """The model's output as ``[(tensor, rep)]``: one tensor, or a tuple/list with one rep each."""
    if isinstance(y, torch.Tensor):
        if isinstance(rep_out, (tuple, list)):
            raise ValueError(f"the model returns one tensor but rep_out is a {type(rep_out).__name__} of "
                             f"{len(rep_out)} reps: pass the rep of its channels")
        pairs = [(y, rep_out)]
    elif isinstance(y, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in y):
        if not isinstance(rep_out, (tuple, list)) or len(rep_out) != len(y):
            raise ValueError(f"the model returns a {type(y).__name__} of {len(y)} tensors: pass rep_out as a tuple "
                             f"with one rep per output (got {rep_out!r})")
        pairs = list(zip(y, rep_out))
    else:
        raise TypeError(f"the model returns a {type(y).__name__}; check_equivariance compares tensors: wrap it so that "
                        "it returns a tensor [B, C] / [B, C, *spatial] or a tuple of them (rep_out then a tuple with "
                        "one rep each)")
    for k, (t, rep) in enumerate(pairs):
        what = "the output" if len(pairs) == 1 else f"output {k}"
        if t.dim() < 2 or t.shape[1] != rep.dim:
            raise ValueError(f"{what} has shape {tuple(t.shape)}, but rep_out {rep!r} has dimension {rep.dim}: "
                             f"check_equivariance expects [B, {rep.dim}] or [B, {rep.dim}, *spatial] outputs; pass "
                             "the rep of the output channels (dim 1)")
    return pairs


def _judge(outputs: list[list[torch.Tensor]], dtype: torch.dtype) -> str | None:
    """Why the outputs (per run, per output tensor) cannot be judged, or ``None``."""
    flat = torch.cat([torch.cat([t.detach().double().flatten(1) for t in run], 1) for run in outputs], 0)
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
    if not flat.numel():
        return "the output is empty"
    big = float(flat.abs().max())
    if not math.isfinite(big):
        return None  # NaN / inf: reported as an infinite error
    if big <= info.tiny / info.eps:
        return (f"the outputs are too small to judge (largest |output| {big:.1e}, at the bottom of {dtype}'s range, "
                "where rounding is not relative): scale the input or the model up, or check an intermediate output")
    base = outputs[0][0].shape[0]
    rows = flat[:base] if base >= 2 else flat  # one sample: its outputs over the elements
    spread = float((rows - rows.mean(0, keepdim=True)).abs().max())
    if spread <= 16 * info.eps * big:
        more = "" if base >= 2 else "; pass a batch of at least 2 different inputs"
        return (f"the output barely varies with the input (spread {spread:.1e} for values up to {big:.1e}, within "
                f"{dtype}'s rounding): a non-equivariant part below rounding cannot be seen; subtract the constant "
                f"part or check a model whose output varies{more}")
    return None


def _snapshot(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    tensors = [(f"parameter {n}", t, t.detach().clone()) for n, t in model.named_parameters()]
    tensors += [(f"buffer {n}", t, t.detach().clone()) for n, t in model.named_buffers()]
    return modes, tensors


def _restore(snapshot) -> list[str]:
    modes, tensors = snapshot
    for m, flag in modes:  # each module's own flag: model.train(flag) would set every submodule alike
        m.training = flag
    changed = []
    with torch.no_grad():
        for name, t, saved in tensors:
            same = t.shape == saved.shape and t.dtype == saved.dtype and bool(torch.equal(t, saved))
            if not same and t.shape == saved.shape and t.is_floating_point():  # NaN != NaN: compare the bits
                same = bool(torch.equal(t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8),
                                        saved.view(torch.uint8) if saved.dim() else saved.reshape(1).view(torch.uint8)))
            if not same:
                changed.append(name)
                if t.shape != saved.shape:
                    t.data = saved
                else:
                    t.copy_(saved)
    return changed


@torch.no_grad()
def _checked_reps(rep_in, rep_out):
    """``(rep_in, rep_out)`` as reps of one group (``rep_out`` a tuple of reps for a tuple output); a string
    reads in the other side's group."""
    if isinstance(rep_out, (tuple, list)):
        pairs = [as_rep_pair(rep_in, r) for r in rep_out]
        rep_in, rep_out = (pairs[0][0] if pairs else as_rep(rep_in, "rep_in")), tuple(p[1] for p in pairs)
    else:
        rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    for r in rep_out if isinstance(rep_out, tuple) else (rep_out,):
        check_rep_pair(rep_in, r)
    return rep_in, rep_out


def check_equivariance(model: nn.Module, rep_in, rep_out, x: torch.Tensor, *, elements=None,
                       tolerance: float | None = None, generator: torch.Generator | None = None) -> EquivarianceCheck:
    """Apply group elements to a real input batch and compare ``model(g x)`` with ``g model(x)``.

    Args:
        model: any module. It runs in eval mode during the check and comes back exactly as it was:
            each module's own training flag (a model whose batch norms are in eval mode under a
            module in training mode stays so), and its parameters and buffers bit for bit (a
            forward that changes them is undone, and named in ``restored``; a copy of them is
            held during the check).
        rep_in, rep_out: the representations of the input and output channels (dim 1), ``Rep`` or
            e3nn ``Irreps``; for a model returning a tuple of tensors, ``rep_out`` is a tuple with one
            rep per output. For inputs ``[B, C, *spatial]`` the group also moves the positions
            (:func:`equiproj.grid.act`); for ``[B, C]`` it acts on the channels only. An output with as
            many spatial dims as the input is moved too; a ``[B, C]`` output is acted on by ``rep_out``.
        x: a real input batch (at least one sample). Each run gets its own copy, so a model that
            changes its input in place does not disturb the check.
        elements: group elements to check (``[n, s, s]``); default: every element for a finite group
            (for spatial inputs, every element that maps the grid onto itself, e.g. the 90-degree
            rotations for C8: the "grid subgroup"), the grid subgroup of a continuous group for
            spatial inputs (4 rotations for SO(2), 24 for SO(3), 48 for O(3)), and 8 random elements
            of a continuous group for vector inputs. For 2-D and 3-D grid inputs any element of the
            group may be given: one that does not map the grid onto itself (45 degrees, say) is applied
            by bilinear / trilinear resampling about the grid's centre (zero outside the grid), to
            the input masked to the largest centred disc (ball) in its grid with a cosine taper over
            its outer quarter, and the outputs are compared in their grid's disc. Its error includes interpolation error, like escnn's own test: compare it with the
            same model's error at the exact elements, or across angles (:func:`equivariance_sweep`).
            A model whose layers are declared under a subgroup H of the reps' group (after
            :func:`~equiproj.nn.restrict_`) promises H-equivariance only: elements outside H are
            refused with a ``ValueError`` that says to pass H's elements or the restricted reps.
        tolerance: the relative error above which the model, or a module, is called not equivariant
            (default :func:`default_tolerance` of the output dtype: 1e-9 for float64, 1e-4 for float32
            and lower precisions).
        generator: for the random elements.

    Returns:
        an :class:`EquivarianceCheck`: the output's largest relative and absolute errors (per element
        and overall), the errors of the modules whose output representation is known (declared
        layers, the blocks of :mod:`equiproj.nn`, channel-wise modules such as activations and
        poolings after them), the worst of them and the first that breaks equivariance; where the
        error enters in modules the check cannot type, the last typed module that passed and the
        untyped ones after it; and ``cannot_judge`` when the output is too small (at the bottom of
        its dtype's range) or too constant (its variation below rounding) for the error to mean
        anything (``ok`` is then false).

    Example::

        >>> import torch, equiproj
        >>> from equiproj.nn import GroupPooling, check_equivariance, declare
        >>> G = equiproj.Cyclic(4)
        >>> model = torch.nn.Sequential(declare(torch.nn.Conv2d(3, 8, 3, padding=1), 3 * G.trivial(), 2 * G.regular()),
        ...                             GroupPooling(2 * G.regular()))
        >>> images = torch.randn(2, 3, 9, 9)
        >>> result = check_equivariance(model, 3 * G.trivial(), 2 * G.trivial(), images)
        >>> result.max_rel_error > 1e-3, result.first_failure[0]   # a random conv is not equivariant
        (True, '0')
        >>> model = equiproj.nn.project_(model)
        >>> check_equivariance(model, 3 * G.trivial(), 2 * G.trivial(), images).max_rel_error < 1e-4
        True
    """
    rep_in, rep_out = _checked_reps(rep_in, rep_out)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != rep_in.dim:
        raise ValueError(f"x must be a batch [B, {rep_in.dim}] or [B, {rep_in.dim}, *spatial] (channels carry rep_in), "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): pass a batch of at least one real input, better several")
    group = rep_in.group
    spatial = x.dim() - 2
    els, kind = _choose_elements(group, x, elements, generator)
    _check_declared_groups(model, group, els, elements is None)
    grid_shape = tuple(x.shape[2:])
    exact = [not spatial or _grid.grid_permutation(g, grid_shape) is not None for g in els]
    if not all(exact) and spatial not in (2, 3):
        raise ValueError(f"an element does not map the input grid {grid_shape} onto itself")
    resampled = not all(exact)
    snapshot = _snapshot(model)
    try:
        for m in model.modules():
            m.training = False
        y, records, untyped, order = _record(model, x, rep_in)
        outs = _outputs(y, rep_out)
        if tolerance is None:
            tolerance = default_tolerance(outs[0][0].dtype)
        x_disc = x * _taper(grid_shape, x.device, x.dtype) if resampled else None
        if resampled:
            y_disc, records_disc, _, _ = _record(model, x_disc, rep_in)
            outs_disc = _outputs(y_disc, rep_out)
        runs = [[t for t, _ in outs]]
        per_element, per_element_abs, module_errors = [], [], {}
        worst_abs, out_norm = 0.0, 0.0
        for t, _ in outs:
            _, ref = _errors(t, t)
            out_norm = max(out_norm, float(ref.max()))
        for g, is_exact in zip(els, exact):
            base_x, base_outs, base_records = (x, outs, records) if is_exact else (x_disc, outs_disc, records_disc)
            gx, _ = _act(base_x, g, rep_in, spatial, resample=True)
            gy, g_records, _, _ = _record(model, gx, rep_in)
            g_outs = _outputs(gy, rep_out)
            runs.append([t for t, _ in g_outs])
            diff_ps, ref_ps = None, None
            for (t, rep), (gt, _) in zip(base_outs, g_outs):
                sp = spatial if spatial and t.dim() - 2 == spatial else 0
                target, mask = _act(t, g, rep, sp, resample=True)
                if target is None:
                    raise ValueError(f"an element does not map the output grid {tuple(t.shape[2:])} onto itself: give "
                                     "elements= that do, or check an output without the unmatched grid")
                if gt.shape != target.shape:
                    raise ValueError(f"the output of the moved input has shape {tuple(gt.shape)}, the moved output "
                                     f"{tuple(target.shape)}: the model's output grid depends on the input")
                d, r = _errors(gt, target, mask)
                diff_ps = d if diff_ps is None else torch.hypot(diff_ps, d)
                ref_ps = r if ref_ps is None else torch.hypot(ref_ps, r)
            per_element.append(_relative(diff_ps, ref_ps))
            abs_err = float(diff_ps.max())
            per_element_abs.append(math.inf if math.isnan(abs_err) else abs_err)
            by_name = {name: out for name, out, _ in g_records}
            for name, out, rep in base_records:
                sp = out.dim() - 2 if spatial and out.dim() - 2 == spatial else 0
                moved, mask = _act(out, g, rep, sp, resample=True)
                if moved is None or name not in by_name or by_name[name].shape != moved.shape:
                    continue
                module_errors[name] = max(module_errors.get(name, 0.0), _relative(*_errors(by_name[name], moved, mask)))
        cannot_judge = _judge(runs, outs[0][0].dtype)
    finally:
        restored = _restore(snapshot)
    worst = max(per_element)
    worst_abs = max(per_element_abs)
    modules = {n: module_errors[n] for n in dict.fromkeys(order) if n in module_errors}
    first = next(((n, e) for n, e in modules.items() if e > tolerance), None)
    worst_module = max(modules.items(), key=lambda kv: kv[1]) if modules else None
    unchecked = [n for n in dict.fromkeys(order) if n not in modules]
    entered_after, between = _blame(list(dict.fromkeys(order)), modules, set(unchecked), first, tolerance,
                                     output_fails=worst > tolerance)
    return EquivarianceCheck(worst, per_element, els, kind, modules, first, tolerance, worst_abs, out_norm,
                             per_element_abs, worst_module, entered_after, between,
                             unchecked, cannot_judge, resampled, restored)


def _check_declared_groups(model: nn.Module, group: Group, els: torch.Tensor, default: bool) -> None:
    """Refuse elements that a declared layer's group does not contain: a layer declared under a subgroup
    ``H`` of ``group`` (``restrict_`` re-declares a model so) has ``H``'s output rep, and promises
    equivariance under ``H`` only."""
    for name, _, d in declared_layers(model):
        H = d.group
        if H is None or H == group or H.ambient_dim != group.ambient_dim or H._contains(els):
            continue
        if not group._contains(H.elements() if H.is_finite else H.generators()):
            continue  # not a subgroup: the reps' own checks say what does not match
        which = (f"the default elements of {group!r}" if default else "elements=") + " include elements outside it"
        how = ("elements=H.elements()" if H.is_finite else f"elements of {H!r} (H.sample(n))")
        raise ValueError(
            f"layer {name or '(the model)'!r} is declared under {H!r}, not {group!r} (restrict_ re-declared it under the "
            f"subgroup), so the check can only use elements of {H!r}, and {which}: pass {how} with these reps, or "
            f"rep_in.restrict(H) and rep_out.restrict(H), with H = {H!r}")


def _blame(order: list[str], modules: dict[str, float], unchecked: set[str], first, tolerance: float,
           output_fails: bool) -> tuple[str | None, list[str]]:
    """``(last typed module that passed, untyped modules run after it)`` up to the first failing typed module
    (or the output, when it fails and no typed module does); ``(None, [])`` when nothing untyped is in between."""
    if first is not None:
        stop = order.index(first[0])
    elif output_fails:
        stop = len(order)
    else:
        return None, []
    start = -1
    for i in range(stop):
        if order[i] in modules and modules[order[i]] <= tolerance:
            start = i
    between = [n for n in order[start + 1 : stop] if n in unchecked]
    if not between:
        return None, []
    return (order[start] if start >= 0 else None), between


def _rotation(angle: float, ambient: int, axis) -> torch.Tensor:
    """The rotation by ``angle`` degrees (about ``axis`` in 3-D, default z), float64."""
    a = math.radians(angle)
    if ambient == 2:
        c, s = math.cos(a), math.sin(a)
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    k = torch.as_tensor((0.0, 0.0, 1.0) if axis is None else axis, dtype=torch.float64)
    k = k / k.norm()
    K = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * K + (1 - math.cos(a)) * (K @ K)


def equivariance_sweep(model: nn.Module, rep_in, rep_out, x: torch.Tensor, angles=None, *, axis=None,
                       tolerance: float | None = None, file=None) -> list[tuple[float, float, float]]:
    """The equivariance error of ``model`` over a sweep of rotation angles, printed as a table.

    Each angle's rotation (about ``axis`` in 3-D, default z) is checked with :func:`check_equivariance`;
    angles whose rotation maps the grid onto itself are exact, the others resampled (their error
    includes interpolation error: read them against each other and against the exact ones).
    Rotations that are not elements of the group are skipped (and listed).

    Args:
        angles: degrees; default every 15 degrees for a continuous group, the group's own rotation
            angles (multiples of ``360 / n``) for a finite one, up to 360 (excluded).
        file: where to print (default ``sys.stdout``); ``False`` prints nothing.

    Returns:
        ``[(angle, max_rel_error, max_abs_error)]`` for the angles checked.

    Example::

        >>> import torch, equiproj
        >>> from equiproj.nn import declare, equivariance_sweep, project_
        >>> G = equiproj.Cyclic(8)
        >>> conv = declare(torch.nn.Conv2d(1, 1, 5, padding=2), G.trivial(), G.trivial())   # steerable space
        >>> model = project_(torch.nn.Sequential(conv))
        >>> rows = equivariance_sweep(model, G.trivial(), G.trivial(), torch.randn(2, 1, 15, 15), file=False)
        >>> [a for a, _, _ in rows]                  # C8: every 45 degrees
        [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]
        >>> rows[2][1] < 1e-5 < rows[1][1]           # exact at 90 degrees; 45 degrees includes resampling
        True
    """
    rep_in, rep_out = _checked_reps(rep_in, rep_out)
    group = rep_in.group
    if angles is None:
        if group.is_finite:
            angles = [a for a in range(0, 360) if _in_group(group, _rotation(a, group.ambient_dim, axis))]
        else:
            angles = list(range(0, 360, 15))
    kept, skipped = [], []
    for a in angles:
        (kept if _in_group(group, _rotation(float(a), group.ambient_dim, axis)) else skipped).append(float(a))
    if not kept:
        raise ValueError(f"none of the angles {list(angles)} is a rotation in {group}")
    els = torch.stack([_rotation(a, group.ambient_dim, axis) for a in kept])
    result = check_equivariance(model, rep_in, rep_out, x, elements=els, tolerance=tolerance)
    rows = list(zip(kept, result.per_element, result.per_element_abs))
    if file is not False:
        out = sys.stdout if file is None else file
        print(f"{'angle':>8}  {'rel. error':>10}  {'abs. error':>10}  how", file=out)
        for (a, rel, ab), g in zip(rows, els):
            how = "exact" if x.dim() == 2 or _grid.grid_permutation(g, tuple(x.shape[2:])) is not None else "resampled"
            print(f"{a:8.2f}  {rel:10.2e}  {ab:10.2e}  {how}", file=out)
        if skipped:
            print(f"skipped (not rotations in {group}): {skipped}", file=out)
        if result.cannot_judge:
            print(f"cannot judge: {result.cannot_judge}", file=out)
    return rows


def _in_group(group: Group, g: torch.Tensor) -> bool:
    try:
        group.check_elements(g)
    except ValueError:
        return False
    return True
