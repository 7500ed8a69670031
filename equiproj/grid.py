"""Groups acting exactly on square / cubic grids: kernel grids of convolutions, and images.

Axis convention (used everywhere in equiproj). A tensor's trailing ``s`` axes are its spatial
axes (``s = 2``: ``[..., H, W]``, ``s = 3``: ``[..., D, H, W]``, as in ``nn.Conv2d/3d``). A grid
point is given by centred coordinates ``(x, y)`` or ``(x, y, z)``:

    x = index along axis -1 - (n_{-1} - 1) / 2
    y = index along axis -2 - (n_{-2} - 1) / 2
    z = index along axis -3 - (n_{-3} - 1) / 2

so coordinate ``j`` runs along tensor axis ``-1 - j`` (x along the columns, y along the rows,
which point *down* when an image is displayed). A group element ``g`` (an orthogonal matrix
acting on these coordinates, see :mod:`equiproj.groups`) acts on a signal by
``(g·f)(p) = f(g^{-1} p)``; on a field with channels carrying the representation ``rho``,
``(g·f)(p) = rho(g) f(g^{-1} p)``. With this convention (checked in ``tests/test_grid.py``):

* ``Cyclic(4)``'s generator ``R(90°) = [[0, -1], [1, 0]]`` acts as
  ``torch.rot90(f, 1, dims=(-1, -2))``;
* the reflection ``F = diag(1, -1)`` (``Dihedral``'s) acts as ``torch.flip(f, dims=(-2,))``.

A convolution kernel ``K [c_out, c_in, *k]`` flattened to ``W [c_out, c_in * prod(k)]``
(``K.reshape(c_out, -1)``) is a linear map with input representation ``rep_in @ kernel_rep(G,
k)`` (docs/math.md §6; the Kronecker order matches the flatten order). The group acts exactly on a
grid when it maps the grid points onto themselves: subgroups of D4 on square grids (any size),
``Octahedral`` / ``FullOctahedral`` on cubic grids; a 1-point grid (a 1x1 kernel) for every group.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ._caches import bytes_cached
from .groups import Group, Rep

__all__ = ["grid_points", "has_grid_action", "grid_permutation", "kernel_rep", "act"]


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"grid shape must be a sequence of ints, got {shape!r}")
    shape = tuple(int(n) for n in shape)
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"grid shape must be a non-empty sequence of positive ints, got {shape}")
    return shape


def grid_points(shape: Sequence[int]) -> torch.Tensor:
    """Centred coordinates ``[prod(shape), s]`` float64 of the points of a grid with spatial shape
    ``shape`` (tensor axis order), in row-major flatten order; column ``j`` runs along axis ``-1 - j``."""
    shape = _shape(shape)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape], indexing="ij")
    return torch.stack([a.reshape(-1) for a in reversed(axes)], dim=-1)


def grid_permutation(g: torch.Tensor, shape: Sequence[int]) -> torch.Tensor | None:
    """``sigma [..., P]`` long with ``g x_i = x_{sigma[..., i]}`` for the points ``x`` of the grid, or
    ``None`` if some ``g`` does not map the grid onto itself. ``g``: ``[..., s, s]``."""
    shape = _shape(shape)
    s = len(shape)
    if g.shape[-2:] != (s, s):
        return None
    pts = grid_points(shape).to(g.device)
    moved = torch.einsum("...ij,nj->...ni", g.to(torch.float64), pts)  # [..., P, s]
    # back to indices: axis -1-j holds coordinate j
    idx = torch.zeros(moved.shape[:-1], dtype=torch.long, device=g.device)
    stride = 1
    for j in range(s):
        n = shape[s - 1 - j]
        u = moved[..., j] + (n - 1) / 2
        ur = torch.round(u)
        if moved.numel() and (not bool(((u - ur).abs() < 1e-6).all()) or bool((ur < 0).any()) or bool((ur > n - 1).any())):
            return None
        idx = idx + ur.long() * stride
        stride *= n
    return idx


def has_grid_action(group: Group, shape: Sequence[int]) -> bool:
    """Whether ``group`` (finite, acting on R^s with s = len(shape)) maps the grid onto itself.
    A 1-point grid is mapped onto itself by every group."""
    shape = _shape(shape)
    if math.prod(shape) == 1:
        return True
    if not group.is_finite or group.ambient_dim != len(shape):
        return False
    return grid_permutation(group.elements(), shape) is not None


@bytes_cached("equiproj.grid.kernel_rep")
def kernel_rep(group: Group, shape: tuple[int, ...], orbits: bool = True) -> Rep:
    """The permutation representation ``rho_pix`` of ``group`` on the points of a grid.

    ``rho_pix(g) e_i = e_j`` where ``g x_i = x_j`` (points in the flatten order of
    :func:`grid_points`). Built orbit by orbit: each orbit is a small permutation field (a free
    orbit is the regular representation), orbits with the same action share one field, so that
    ``rep_in @ kernel_rep(...)`` stays field-structured (docs/math.md §4) instead of one dense
    ``prod(shape)``-dimensional field. ``orbits=False`` gives that one field instead, in flatten order
    (no permutation): for input fields that are all permutation fields, ``rep_in @ kernel_rep(G, k,
    orbits=False)`` is one permutation field per input copy, a contiguous block of the conv weight's
    columns, so the orbit route reads the weight in place (docs/math.md §9). Raises ``ValueError`` if
    the group does not act on the grid.
    """
    shape = _shape(shape)
    if not isinstance(group, Group):
        raise TypeError(f"group must be an equiproj Group, got {type(group).__name__}")
    P = math.prod(shape)
    if P == 1:
        return group.trivial()
    if not has_grid_action(group, shape):
        raise ValueError(f"{group} does not map the {'x'.join(map(str, shape))} grid onto itself: no exact grid action "
                         f"(exact: subgroups of D4 on square 2-D grids, Octahedral/FullOctahedral on cubic 3-D grids)")
    els = group.elements()
    sigma = grid_permutation(els, shape)  # [|G|, P]
    if not orbits:
        return Rep.permutation(group, action=functools.partial(_table_action, group, sigma), size=P,
                               name=f"grid{'x'.join(map(str, shape))}")
    seen = torch.zeros(P, dtype=torch.bool)
    orbits = []  # (table [|G|, n] local action, point indices [n])
    for i in range(P):
        if seen[i]:
            continue
        pts = list(dict.fromkeys(sigma[:, i].tolist()))  # orbit, ordered by first appearance
        seen[pts] = True
        local = {p: j for j, p in enumerate(pts)}
        table = torch.tensor([[local[int(q)] for q in sigma[:, pts][e]] for e in range(len(els))], dtype=torch.long)
        orbits.append((table, pts))
    fields: dict[tuple, Rep] = {}
    order: dict[tuple, list] = {}
    for table, pts in orbits:
        key = (table.shape[1],) + tuple(table.reshape(-1).tolist())
        if key not in fields:
            fields[key] = Rep.permutation(group, action=functools.partial(_table_action, group, table),
                                          size=table.shape[1], name=f"orbit{table.shape[1]}")
            order[key] = []
        order[key].append(pts)
    segments, perm = [], []
    for key, rep in fields.items():
        (c, f), = rep.segments
        segments.append((len(order[key]), f))
        for pts in order[key]:
            perm += pts
    return Rep(group, segments, torch.tensor(perm, dtype=torch.long), name=f"grid{'x'.join(map(str, shape))}")


def _table_action(group: Group, table: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return table.to(g.device)[group.index(g)]


def act(x: torch.Tensor, g: torch.Tensor, rep: Rep | None = None, spatial_dims: int | None = None) -> torch.Tensor:
    """``g·x``: transform a signal or field on a grid by one group element.

    Args:
        x: ``[..., C, *spatial]`` (with ``rep``) or ``[..., *spatial]`` (without).
        g: ``[s, s]`` orthogonal matrix (one element), mapping the grid onto itself.
        rep: the representation carried by the channel axis (``C = rep.dim``); ``None``: scalar signal.
        spatial_dims: ``s`` (default ``g.shape[-1]``).
    Returns:
        ``(g·x)(p) = rho(g) x(g^{-1} p)``, same shape and dtype as ``x``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError("x and g must be torch.Tensors")
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be one [s, s] group element, got shape {tuple(g.shape)}")
    s = g.shape[-1] if spatial_dims is None else int(spatial_dims)
    if s != g.shape[-1]:
        raise ValueError(f"g acts on R^{g.shape[-1]} but spatial_dims = {s}")
    need = s + (1 if rep is not None else 0)
    if x.dim() < need:
        raise ValueError(f"x must have at least {need} dims ([..., {'C, ' if rep is not None else ''}*spatial]), got {tuple(x.shape)}")
    shape = tuple(x.shape[-s:])
    # output point i takes the input at g^{-1} x_i
    src = grid_permutation(g.T, shape)
    if src is None:
        raise ValueError(f"g does not map the {'x'.join(map(str, shape))} grid onto itself")
    out = x.flatten(-s).index_select(-1, src.to(x.device)).reshape(x.shape)
    if rep is not None:
        if x.shape[-s - 1] != rep.dim:
            raise ValueError(f"channel axis of x has size {x.shape[-s - 1]} but rep.dim = {rep.dim}")
        R = rep.matrix(g.to(torch.float64)).to(device=x.device, dtype=x.dtype)
        out = torch.einsum("ab,...b" + "xyz"[:s] + "->...a" + "xyz"[:s], R, out)
    return out
