"""The data of the smoke experiment: a smoke-plume solver written here (Boussinesq advection-diffusion
of a density driven by buoyancy along a per-trajectory direction g, periodic grid, semi-Lagrangian
advection, spectral diffusion and pressure projection, float64) and the C4 action on its fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SmokeParams", "SmokeSolver", "simulate_smoke", "SMOKE_IN_VECTORS", "SMOKE_OUT_VECTORS", "c4_matrix",
           "rotate_fields"]


@dataclass
class SmokeParams:
    """Solver parameters (grid units: cell size 1, one solver step ``dt``)."""

    grid: int = 64
    dt: float = 1.0
    substeps: int = 2  # solver steps per saved frame
    buoyancy: float = 0.02
    viscosity: float = 0.05
    diffusivity: float = 0.02
    drag: float = 0.02
    decay: float = 0.02
    source_rate: float = 0.1
    wind: float = 0.02  # strength of the fixed wind: the only symmetry-breaking term
    wind_angle_deg: float = 30.0


def _bilinear_periodic(f: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``f [B, C, N, N]`` sampled at real positions ``X`` (column), ``Y`` (row) ``[B, N, N]``, periodic."""
    B, C, N, _ = f.shape
    x0, y0 = torch.floor(X), torch.floor(Y)
    fx, fy = (X - x0)[:, None], (Y - y0)[:, None]
    x0, y0 = x0.long() % N, y0.long() % N
    x1, y1 = (x0 + 1) % N, (y0 + 1) % N
    flat = f.reshape(B, C, N * N)

    def at(yy, xx):
        return flat.gather(2, (yy * N + xx).reshape(B, 1, N * N).expand(B, C, N * N)).reshape(B, C, N, N)

    return (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1))


class SmokeSolver:
    """Boussinesq smoke on a periodic ``grid x grid`` torus, float64.

    One step: add the source; buoyancy ``u += dt * buoyancy * (rho - mean rho) * g_dir``;
    semi-Lagrangian advection (bilinear) of rho and u by ``u + wind``; spectral diffusion;
    pressure projection (FFT, Nyquist derivative zeroed so the discretisation keeps the grid's
    symmetry); linear drag and decay. With ``wind = 0`` the step commutes with every 90-degree
    rotation of the grid (rotating rho, source, u and g_dir together) up to rounding.
    """

    def __init__(self, params: SmokeParams):
        self.p = p = params
        n = p.grid
        k = torch.fft.fftfreq(n, d=1.0 / n).to(torch.float64) * (2 * math.pi / n)
        kd = k.clone()
        kd[n // 2] = 0.0
        self.kx, self.ky = kd[None, :].expand(n, n), kd[:, None].expand(n, n)
        kd2 = self.kx ** 2 + self.ky ** 2
        self.kd2 = torch.where(kd2 > 0, kd2, torch.ones_like(kd2))
        k2 = k[None, :] ** 2 + k[:, None] ** 2
        self.viscous = torch.exp(-p.viscosity * k2 * p.dt)
        self.diffusive = torch.exp(-p.diffusivity * k2 * p.dt)
        a = math.radians(p.wind_angle_deg)
        self.wind = torch.tensor([p.wind * math.cos(a), p.wind * math.sin(a)], dtype=torch.float64)
        r = torch.arange(n, dtype=torch.float64)
        self.Y, self.X = torch.meshgrid(r, r, indexing="ij")

    def _project(self, u: torch.Tensor) -> torch.Tensor:
        U = torch.fft.fft2(u)
        div = self.kx * U[:, 0] + self.ky * U[:, 1]
        U = U - torch.stack([self.kx, self.ky])[None] * (div / self.kd2)[:, None]
        return torch.fft.ifft2(U).real

    def step(self, rho, u, source, g_dir):
        """``rho [B,1,N,N]``, ``u [B,2,N,N]`` (x = column, y = row components), ``source [B,1,N,N]``,
        ``g_dir [B,2]`` -> ``(rho, u)`` one step later."""
        p = self.p
        rho = rho + p.dt * source
        u = u + p.dt * p.buoyancy * (rho - rho.mean((-2, -1), keepdim=True)) * g_dir[:, :, None, None]
        v = u + self.wind[None, :, None, None]
        both = _bilinear_periodic(torch.cat([rho, u], 1), self.X - p.dt * v[:, 0], self.Y - p.dt * v[:, 1])
        rho = torch.fft.ifft2(torch.fft.fft2(both[:, :1]) * self.diffusive).real
        u = self._project(torch.fft.ifft2(torch.fft.fft2(both[:, 1:]) * self.viscous).real)
        return rho * (1 - p.decay * p.dt), u * (1 - p.drag * p.dt)

    def frame(self, rho, u, source, g_dir):
        """One saved frame: ``substeps`` solver steps."""
        for _ in range(self.p.substeps):
            rho, u = self.step(rho, u, source, g_dir)
        return rho, u


def simulate_smoke(params: SmokeParams, trajectories: int, frames: int, generator: torch.Generator,
                   warmup: int = 10) -> dict:
    """Random plumes: source a Gaussian blob (random centre, width 2.5-4 cells), buoyancy direction
    uniform on the circle, fluid at rest initially; ``warmup`` frames are discarded.

    Returns ``states [B, frames, 3, N, N]`` (rho, u_x, u_y), ``source [B, 1, N, N]``,
    ``g_dir [B, 2]``, all float64.
    """
    n, B = params.grid, trajectories
    u4 = torch.rand(4, B, dtype=torch.float64, generator=generator)
    cx, cy, width = u4[0] * n, u4[1] * n, 2.5 + 1.5 * u4[2]
    r = torch.arange(n, dtype=torch.float64)
    dx = (r[None, None, :] - cx[:, None, None] + n / 2) % n - n / 2
    dy = (r[None, :, None] - cy[:, None, None] + n / 2) % n - n / 2
    source = (params.source_rate * torch.exp(-(dx ** 2 + dy ** 2) / (2 * width[:, None, None] ** 2)))[:, None]
    angle = 2 * math.pi * u4[3]
    g_dir = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    solver = SmokeSolver(params)
    rho, u = torch.zeros(B, 1, n, n, dtype=torch.float64), torch.zeros(B, 2, n, n, dtype=torch.float64)
    states = []
    for t in range(warmup + frames):
        if t >= warmup:
            states.append(torch.cat([rho, u], 1))
        rho, u = solver.frame(rho, u, source, g_dir)
    return dict(states=torch.stack(states, 1), source=source, g_dir=g_dir)


SMOKE_IN_VECTORS = ((2, 3), (4, 5))


SMOKE_OUT_VECTORS = ((1, 2),)


def c4_matrix(k: int) -> torch.Tensor:
    """The element of C4 that :func:`rotate_fields` applies for ``k``: ``[[0, 1], [-1, 0]]^k``
    acting on (x = column, y = row) coordinates (``torch.rot90(., k, (-2, -1))``)."""
    g = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_power(g, k % 4)


def rotate_fields(x: torch.Tensor, k: int, vectors=()) -> torch.Tensor:
    """The C4 element ``c4_matrix(k)`` acting on fields ``[..., C, N, N]``: every channel is moved
    on the grid (``torch.rot90``), and each channel pair in ``vectors`` (x, y components) is
    also rotated as a vector. Scalars elsewhere."""
    out = torch.rot90(x, k % 4, (-2, -1))
    if not vectors:
        return out
    g = c4_matrix(k).to(x.dtype)
    chans = list(out.unbind(-3))
    for a, b in vectors:
        va, vb = chans[a], chans[b]
        chans[a], chans[b] = g[0, 0] * va + g[0, 1] * vb, g[1, 0] * va + g[1, 1] * vb
    return torch.stack(chans, -3)
