"""The data of the voxel experiment: synthetic shapes (sticks, rings, tetrahedra, octahedra) in random
orientations, with the orientation-dependent part of their labels, rendered on a voxel grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...grid import grid_points
from ...groups import O3

__all__ = ["VOXEL_CLASSES", "VoxelParams", "voxel_shapes", "render_shapes"]

VOXEL_CLASSES = ("stick", "ring", "tetrahedron", "octahedron")


@dataclass
class VoxelParams:
    """Shape generator parameters (lengths in voxels)."""

    grid: int = 12
    size: tuple = (2.6, 3.6)  # stick half-length / ring, polyhedron circumradius (uniform range)
    width: tuple = (1.1, 1.5)  # bump standard deviation (uniform range, one per shape)
    jitter: float = 0.25  # std of the bump positions around the template
    shift: float = 0.5  # sub-voxel offset of the whole shape, uniform in [-shift, shift]^3
    noise: float = 0.05  # per-voxel Gaussian noise (peak bump height ~1)
    breaking: float = 1.0  # probability that a near-vertical stick / ring gets the other label
    cone_deg: float = 35.0  # "near-vertical": main axis within this angle of z


def _templates(cls: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Body-frame bump positions ``[B, 6, 3]`` (unit size, main axis e_z) and a mask ``[B, 6]``."""
    B = len(cls)
    pos = torch.zeros(B, 6, 3, dtype=torch.float64)
    mask = torch.zeros(B, 6, dtype=torch.bool)
    n_stick = torch.randint(3, 6, (B,), generator=gen)
    for i in range(B):
        c = int(cls[i])
        if c == 0:  # stick: n equally spaced bumps on [-1, 1] e_z
            n = int(n_stick[i])
            pos[i, :n, 2] = torch.linspace(-1, 1, n, dtype=torch.float64)
            mask[i, :n] = True
        elif c == 1:  # ring of 6 in the xy plane
            a = torch.arange(6, dtype=torch.float64) * (math.pi / 3)
            pos[i, :, 0], pos[i, :, 1] = torch.cos(a), torch.sin(a)
            mask[i] = True
        elif c == 2:  # tetrahedron, one vertex on +z
            v = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) / math.sqrt(3)
            R = _rotation_taking(v[0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
            pos[i, :4] = v @ R.T
            mask[i, :4] = True
        else:  # octahedron
            pos[i] = torch.cat([torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)])
            mask[i] = True
    return pos, mask


def _rotation_taking(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rotation about ``a x b`` that takes unit vector ``a`` to unit vector ``b``."""
    v, c = torch.linalg.cross(a, b), float(a @ b)
    K = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + K + K @ K / (1 + c)


def voxel_shapes(n: int, params: VoxelParams, generator: torch.Generator) -> dict:
    """``n`` random shapes (classes balanced and shuffled), their labels and voxel grids.

    Returns a dict with ``x [n, 1, N, N, N]`` float32 (rendered, with noise), ``y [n]`` long (the
    label, after the symmetry-breaking swap), ``cls [n]`` (the shape's class), ``centres
    [n, 6, 3]``, ``mask [n, 6]``, ``amplitude [n, 6]``, ``width [n]`` (float64, grid coordinates
    of :func:`equiproj.grid.grid_points`: x along the last tensor axis, z along the first spatial
    axis), ``axis [n, 3]`` (the main axis after rotation) and ``noise [n, 1, N, N, N]``.
    Deterministic given the generator's state.
    """
    p = params
    cls = torch.arange(n) % len(VOXEL_CLASSES)
    cls = cls[torch.randperm(n, generator=generator)]
    body, mask = _templates(cls, generator)
    u = torch.rand(4, n, dtype=torch.float64, generator=generator)
    size = p.size[0] + (p.size[1] - p.size[0]) * u[0]
    width = p.width[0] + (p.width[1] - p.width[0]) * u[1]
    R = O3().sample(n, generator=generator)  # [n, 3, 3], Haar O(3)
    jitter = p.jitter * torch.randn(n, 6, 3, dtype=torch.float64, generator=generator)
    shift = p.shift * (2 * torch.rand(n, 1, 3, dtype=torch.float64, generator=generator) - 1)
    centres = (size[:, None, None] * body + jitter) @ R.transpose(1, 2) + shift
    amplitude = 0.7 + 0.6 * torch.rand(n, 6, dtype=torch.float64, generator=generator)
    axis = R[:, :, 2]
    near_vertical = axis[:, 2].abs() >= math.cos(math.radians(p.cone_deg))
    swap = (cls <= 1) & near_vertical & (u[2] < p.breaking)
    y = torch.where(swap, 1 - cls, cls)
    noise = p.noise * torch.randn(n, 1, p.grid, p.grid, p.grid, dtype=torch.float64, generator=generator)
    data = dict(cls=cls, y=y, centres=centres, mask=mask, amplitude=amplitude, width=width, axis=axis, noise=noise)
    data["x"] = (render_shapes(data, p.grid) + noise).float()
    return data


def render_shapes(data: dict, grid: int, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-free voxel grids ``[n, 1, grid, grid, grid]`` float64 of the shapes in ``data``
    (``centres``, ``mask``, ``amplitude``, ``width``), each rotated by ``rotation`` ``[n, 3, 3]``
    (or ``[3, 3]``) about the grid centre first if given. For a cube symmetry ``g`` this equals
    ``equiproj.grid.act(render_shapes(data, grid), g)`` to rounding."""
    c = data["centres"]
    if rotation is not None:
        c = c @ rotation.transpose(-1, -2).to(c.dtype)
    pts = grid_points((grid,) * 3)  # [N^3, 3]
    out = []
    for i in range(0, len(c), 64):  # chunks: [64, N^3, 6] floats
        d2 = (pts[None, :, None, :] - c[i : i + 64, None]).square().sum(-1)
        w = data["width"][i : i + 64, None, None]
        a = (data["amplitude"] * data["mask"])[i : i + 64, None]
        out.append((a * torch.exp(-d2 / (2 * w**2))).sum(-1))
    return torch.cat(out).reshape(len(c), 1, grid, grid, grid)
