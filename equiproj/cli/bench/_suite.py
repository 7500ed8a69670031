"""The suite of ``equiproj bench``: its settings (``quick`` / ``default`` / ``full``) and its layers
(a linear layer or a steerable conv, each with its reference, its energies and a smaller twin for
verification)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import baselines, reference
from ..._energy import energies, energies_and_grad, project
from ...groups import O3, Cyclic, Rep
from ...kernel_spaces import DenseKernelBasis, default_kernel_space
from ...testing import nearly_equivariant


FUSED_BACKENDS = ("cpp", "triton")


@dataclass
class Settings:
    """Knobs of one run; :meth:`for_mode` gives the ``quick`` / ``default`` / ``full`` presets."""

    mode: str = "default"
    device: str = "cpu"
    seed: int = 0
    budget_s: float = 1.0  # timing budget per (layer, method) after warm-up
    min_repeats: int = 5
    max_repeats: int = 50
    warmup: int = 2
    draws: int = 1024  # draws of the orbit defect for the variance (fewer if a draw is slow)
    draws_budget_s: float = 5.0  # cap on the time spent drawing (per layer, and again for the field blocks)
    min_draws: int = 16
    confirm_repeats: int = 20  # repeated K-sample estimates confirming K (0: never)
    confirm_budget_s: float = 4.0
    sampled_budget_s: float = 4.0  # time at K is measured directly if one estimate fits this
    dense_max_bytes: int = 2 * 2**30
    compile_layers: tuple = ("mlp",)
    o3_conv_copies: tuple = (4,)
    overhead_batch: int = 256
    verify_groups: bool = True
    rel_err: float = 0.01
    layers: tuple | None = None  # restrict to these layer keys
    noise_retries: int = 2  # a timing whose interquartile range exceeds its median is measured again, this often

    @classmethod
    def for_mode(cls, mode: str, **kw) -> "Settings":
        if mode == "quick":
            base = dict(budget_s=0.3, min_repeats=3, max_repeats=20, warmup=1, draws=256, draws_budget_s=2.0, min_draws=8,
                        confirm_repeats=0, sampled_budget_s=1.0, dense_max_bytes=512 * 2**20, compile_layers=(),
                        o3_conv_copies=(2,), overhead_batch=128, verify_groups=False)
        elif mode == "full":
            base = dict(budget_s=3.0, min_repeats=7, max_repeats=100, warmup=3, draws=4096, draws_budget_s=60.0,
                        confirm_repeats=100, confirm_budget_s=60.0, sampled_budget_s=30.0,
                        dense_max_bytes=3 * 2**30, compile_layers=("mlp", "c8conv", "o3conv"),
                        o3_conv_copies=(2, 4, 8))
        elif mode == "default":
            base = {}
        else:
            raise ValueError(f"mode must be 'quick', 'default' or 'full', got {mode!r}")
        base.update(kw)
        return cls(mode=mode, **base)


# ---- layers ---------------------------------------------------------------------------------
def rel_error(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


class LinearLayer:
    """A linear layer ``W [rep_out.dim, rep_in.dim]`` of the suite."""

    kind = "linear"

    def __init__(self, key: str, title: str, rep_in: Rep, rep_out: Rep, reduced: "LinearLayer | None" = None,
                 dense_check: "LinearLayer | None" = None):
        self.key, self.title, self.rep_in, self.rep_out = key, title, rep_in, rep_out
        self.group = rep_in.group
        self._reduced = reduced
        self._dense_check = dense_check

    def dense_check_layer(self) -> "LinearLayer":
        """The layer on which the float64 dense projector is checked against the reference."""
        return self._dense_check or self.verification_layer()

    def in_band(self, W):
        return W

    def compiled(self):
        """``torch.compile`` of the pure-torch path: ``W -> (E_perp, E_G)``."""
        return baselines.compiled_energies(self.rep_in, self.rep_out)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rep_out.dim, self.rep_in.dim)

    def verification_layer(self) -> "LinearLayer":
        """The layer checked against the reference (``self``, or a smaller one with the same fields)."""
        return self._reduced or self

    def energies(self, W: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        return energies(W, self.rep_in, self.rep_out, backend=backend)

    def energies_and_grad(self, W: torch.Tensor, backend: str):
        """``(E_perp, E_G, dE_perp/dW)`` in one pass, no autograd graph."""
        return energies_and_grad(W, self.rep_in, self.rep_out, backend=backend)

    def reference(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = W.detach().cpu().double()
        P = reference.project(W, self.rep_in, self.rep_out)
        return (W - P).square().sum((-2, -1)), P.square().sum((-2, -1))

    def nearly_equivariant(self, W: torch.Tensor, ratio: float, gen) -> torch.Tensor:
        return nearly_equivariant(W.detach().cpu().double(), self.rep_in, self.rep_out, ratio, gen)

    def defects(self, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return baselines.orbit_defects(W, self.rep_in, self.rep_out, g)

    def dense_size(self) -> tuple[int, int]:
        return baselines.DenseProjector.size(self.rep_in, self.rep_out)

    def dense(self, dtype, device, max_bytes=None, method="auto"):
        return baselines.DenseProjector(self.rep_in, self.rep_out, dtype=dtype, device=device, max_bytes=max_bytes,
                                        method=method)

    def dense_energies(self, dense, W):
        return dense.energies(W)

    def block_weights(self, W: torch.Tensor):
        """``(label, W_b)``: the non-equivariant part of ``W`` restricted to one block of fields, for
        each (output segment, input segment) pair (float64, CPU)."""
        yield from _field_blocks(W.detach().cpu().double(), self.rep_in, self.rep_out)


def _field_blocks(M: torch.Tensor, rep_in: Rep, rep_out: Rep):
    """``(label, N)`` per (output segment, input segment) of ``M [m, n]``: ``M`` restricted to that block
    minus its projection (nothing if a rep is permuted)."""
    if rep_out.perm is not None or rep_in.perm is not None:
        return
    oo = 0
    for co, fo in rep_out.segments:
        oi = 0
        for ci, fi in rep_in.segments:
            N = torch.zeros_like(M)
            N[..., oo : oo + co * fo.dim, oi : oi + ci * fi.dim] = M[..., oo : oo + co * fo.dim, oi : oi + ci * fi.dim]
            yield f"{fo.name}<-{fi.name}", N - project(N, rep_in, rep_out)
            oi += ci * fi.dim
        oo += co * fo.dim


class SteerableConvLayer:
    """A conv kernel ``[c_out, c_in, k, ..., k]`` in a band-limited steerable kernel space (its
    reference: the group quadrature on the space's orthonormal band coefficients, plus the
    out-of-band energy, a route independent of the pixel-tile plan the fused backends run)."""

    kind = "conv"

    def __init__(self, key: str, title: str, rep_in: Rep, rep_out: Rep, kernel_size: int, spatial_dims: int,
                 reduced: "SteerableConvLayer | None" = None):
        self.key, self.title, self.rep_in, self.rep_out = key, title, rep_in, rep_out
        self.group = rep_in.group
        self.kernel_size, self.spatial_dims = kernel_size, spatial_dims
        self.space = default_kernel_space(self.group, kernel_size, spatial_dims)
        self.crep = self.space.coefficient_rep(rep_in)
        self._reduced = reduced

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rep_out.dim, self.rep_in.dim) + (self.kernel_size,) * self.spatial_dims

    def verification_layer(self):
        return self._reduced or self

    def dense_check_layer(self):
        return self.verification_layer()

    def _parts(self, W):
        """(K ``[..., m, n, P]``, A ``[..., m, n D]`` in the coefficient rep's layout, out-of-band energy)."""
        A = self.space.coefficients(W, self.rep_in, self.rep_out)
        K = W.to(A.dtype)
        outside = (K - self.space.kernel(A, self.rep_in, self.rep_out)).square().flatten(-2 - self.spatial_dims).sum(-1)
        return K, A, outside

    def energies(self, W: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``SteerableKernelSpace.energies`` (what a user calls), run by ``backend``."""
        return self.space.energies(W, self.rep_in, self.rep_out, backend=backend)

    def energies_and_grad(self, W: torch.Tensor, backend: str):
        """``SteerableKernelSpace.energies_and_grad``: one pass, no autograd graph."""
        return self.space.energies_and_grad(W, self.rep_in, self.rep_out, backend=backend)

    def reference(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, A, outside = self._parts(W.detach().cpu().double())
        P = reference.project(A, self.crep, self.rep_out)
        return (A - P).square().sum((-2, -1)) + outside, P.square().sum((-2, -1))

    def nearly_equivariant(self, W: torch.Tensor, ratio: float, gen) -> torch.Tensor:
        ri, ro, sp = self.rep_in, self.rep_out, self.space
        K, A, _ = self._parts(W.detach().cpu().double())
        Keq = sp.kernel(reference.project(A, self.crep, ro), ri, ro)
        N = torch.randn(K.shape, dtype=torch.float64, generator=gen)
        NA = sp.coefficients(N, ri, ro)
        Nperp = N - sp.kernel(reference.project(NA, self.crep, ro), ri, ro)
        scale = (ratio * Keq.square().sum() / Nperp.square().sum()).sqrt()
        return Keq + scale * Nperp

    def block_weights(self, W: torch.Tensor):
        """``(label, W_b)``: in-band kernels whose non-equivariance sits in one block of coefficient
        fields (output field x (input field ⊗ harmonic)), float64, CPU."""
        A = self.space.coefficients(W.detach().cpu().double(), self.rep_in, self.rep_out)
        for label, N in _field_blocks(A, self.crep, self.rep_out):
            yield label, self.space.kernel(N, self.rep_in, self.rep_out)

    def compiled(self):
        """The kernel-space split (eager) plus ``torch.compile`` of the coefficient energies."""
        inner = baselines.compiled_energies(self.crep, self.rep_out)

        def fn(W):
            K, A, outside = self._parts(W)
            e_perp, e_g = inner(A)
            return e_perp + outside.to(e_perp.dtype), e_g

        return fn

    def in_band(self, W: torch.Tensor) -> torch.Tensor:
        """The part of ``W`` inside the kernel space (``K B B^T``), same dtype."""
        with torch.no_grad():
            A = self.space.coefficients(W, self.rep_in, self.rep_out)
            return self.space.kernel(A, self.rep_in, self.rep_out).to(W.dtype)

    def defects(self, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return baselines.conv_orbit_defects(W, self.rep_in, self.rep_out, g, kernel_space=self.space)

    def dense_size(self) -> tuple[int, int]:
        return DenseKernelBasis.size(self.space, self.rep_in, self.rep_out)

    def dense(self, dtype, device, max_bytes=None, method="hom"):
        N, D = self.dense_size()
        nbytes = N * D * torch.empty(0, dtype=dtype).element_size()
        if max_bytes is not None and nbytes > max_bytes:
            raise MemoryError(f"the dense basis would be [{N}, {D}] = {nbytes / 2**30:.2f} GiB")
        return DenseKernelBasis(self.space, self.rep_in, self.rep_out, method=method, dtype=dtype, device=device)

    def dense_energies(self, dense, W):
        return dense.energies(W)


# ---- the suite ------------------------------------------------------------------------------
def suite(settings: Settings) -> list:
    """The suite's layers, in order (``settings.layers``: only those keys, each one of :data:`LAYER_KEYS`)."""
    if settings.layers is not None:
        unknown = [k for k in settings.layers if k not in LAYER_KEYS]
        if unknown or not settings.layers:
            raise ValueError(f"unknown layer keys {unknown}: choose from {list(LAYER_KEYS)}" if unknown else
                             f"no layer keys given: choose from {list(LAYER_KEYS)}")
    G3 = O3()
    p = Rep.parse
    rows: list = []

    def add(key, make):
        if settings.layers is not None and key.split(":")[0] not in settings.layers:
            return
        rows.append(make())

    mlp = p(G3, "64x0e+32x1o+16x2e")
    mlp_small = p(G3, "8x0e+4x1o+2x2e")
    add("mlp", lambda: LinearLayer("mlp", TITLES["mlp"], mlp, mlp,
                                   dense_check=LinearLayer("mlp", "", mlp_small, mlp_small)))

    def c8conv():
        C8 = Cyclic(8)
        r = 32 * C8.regular()
        small = 2 * C8.regular()
        red = SteerableConvLayer("c8conv", "", small, small, 5, 2)
        return SteerableConvLayer("c8conv", TITLES["c8conv"], r, r, 5, 2, reduced=red)

    add("c8conv", c8conv)

    for c in settings.o3_conv_copies:
        def o3conv(c=c):
            r = p(G3, f"{c}x0e+{c}x1o+{c}x2e")
            red = None
            if c > 2:
                rr = p(G3, "2x0e+2x1o+2x2e")
                red = SteerableConvLayer("o3conv", "", rr, rr, 5, 3)
            return SteerableConvLayer(f"o3conv" + (f":c{c}" if len(settings.o3_conv_copies) > 1 else ""),
                                      TITLES["o3conv"] + f" ({c}x0e+{c}x1o+{c}x2e)", r, r, 5, 3, reduced=red)

        add("o3conv", o3conv)

    big = p(G3, "1024x0e+1024x1o")
    small = p(G3, "16x0e+16x1o")
    add("large", lambda: LinearLayer("large", TITLES["large"], big, big,
                                     reduced=LinearLayer("large", "", small, small)))
    return rows


TITLES = {
    "mlp": "MLP layer 64x0e+32x1o+16x2e -> same",
    "c8conv": "2-D conv 32 C8-regular fields -> 32, k=5",
    "o3conv": "3-D conv l<=2 fields, k=5",
    "large": "linear 4096x4096, 1024x0e+1024x1o",
}
#: the keys of ``--layers``
LAYER_KEYS = tuple(TITLES)
