"""Band-limited steerable kernel spaces: rotations that do not map the kernel grid onto itself.

A rotation other than the grid's own symmetries has no exact action on an arbitrary ``k x k``
(``k x k x k``) kernel. A :class:`SteerableKernelSpace` fixes a subspace ``S`` of kernel space
on which the group acts exactly and orthogonally, and counts the part of a kernel outside ``S``
as non-equivariant (docs/math.md §6 has the definitions and the comparison
with the exact grid action).

* ``S`` is spanned by radial profile x angular harmonic functions sampled on the grid
  (2-D: Gaussian rings times ``(cos k theta, sin k theta)``; 3-D: Gaussian shells times the
  real spherical harmonics of :mod:`equiproj.groups`), orthonormalised symmetrically:
  ``B = Phi (Phi^T Phi)^(-1/2)`` ``[k^s, D]``. The group acts on the coefficients ``A = K B``
  by ``rho_out(g) A (rho_in(g) ⊗ sigma(g))^T``, with ``sigma`` the group's action on the
  harmonics (``group.harmonic_rep``).
* A kernel is equivariant iff it lies in ``S`` and its coefficients are equivariant:
  ``E_perp(K) = ||K - K B B^T||^2 + E_perp(A; rho_in ⊗ sigma, rho_out)``,
  ``E_G(K) = E_G(A; rho_in ⊗ sigma, rho_out)``. The coefficient energies go through
  :func:`equiproj.energies` (the fused op), field pair by field pair and harmonic by harmonic,
  with the Clebsch-Gordan blocks of the group; no ``N x D`` basis is ever formed.
* Defaults (those of escnn's ``R2Conv``/``R3Conv``): rings at radii ``0, 1, ..., (k-1)/2``; width
  0.6 (0.4 on the outermost ring, 0.005 at radius 0); maximum frequency/degree
  ``min(2 r, (k-1)/2 - r + 2)`` on the ring of radius ``r`` (0 at the centre).

For the grid's own symmetries the action on ``S`` equals moving the kernel's pixels, so a
projected conv is exactly equivariant under them; at other angles it is equivariant up to the
grid's anisotropy (measured by :func:`smooth_equivariance_error`; the committed numbers are in
``bench/results/steerable_equivariance.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from .. import ops as _ops
from .._energy import energies as _linear_energies
from .._energy import energies_and_grad as _linear_energies_and_grad
from .._energy import energies_and_grads_many as _linear_energies_and_grads_many
from .._energy import energies_many as _linear_energies_many
from .._energy import project as _linear_project
from ..grid import grid_points
from ..groups import Group, Rep, check_rep_pair, spherical_harmonics
from ..groups._rep import tensor_field

__all__ = ["SteerableKernelSpace", "default_kernel_space", "kernel_energies_many", "kernel_energies_and_grads_many"]


def _check_int(v, name, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------
# The kernel space
# ---------------------------------------------------------------------------------------
def _default_rings(kernel_size: int) -> tuple[float, ...]:
    return tuple(float(r) for r in range((kernel_size - 1) // 2 + 1))


def _default_sigma(rings) -> tuple[float, ...]:
    out = [0.6] * len(rings)
    out[-1] = 0.4
    return tuple(0.005 if r == 0 else s for r, s in zip(rings, out))


def _default_max_frequency(rings, kernel_size) -> tuple[int, ...]:
    R = (kernel_size - 1) // 2
    return tuple(0 if r == 0 else int(math.floor(min(2 * r, R - r + 2) + 1e-9)) for r in rings)


class SteerableKernelSpace:
    """An orthonormal, band-limited subspace ``S`` of ``k^s`` kernels on which ``group`` acts exactly.

    See the module docstring for the definition, the energies and what "equivariant" means.

    Args:
        group: a subgroup of O(2) (``SO2, O2, Cyclic, Dihedral``; 2-D kernels) or of O(3)
            (``SO3, O3, Octahedral, FullOctahedral``; 3-D kernels).
        kernel_size: odd ``k`` (the rotation centre must be a pixel); a tuple of equal sizes is accepted.
        spatial_dims: 2 or 3 (default: the group's ambient dimension; a mismatch is an error).
        rings: radii of the radial profiles (default ``0, 1, ..., (k-1)/2``).
        sigma: profile widths, a float or one per ring (default 0.6, 0.4 on the last ring,
            0.005 at radius 0).
        max_frequency: highest frequency (2-D) or degree (3-D) per ring, an int (the same on
            every ring of radius > 0) or one per ring (default ``min(2 r, (k-1)/2 - r + 2)``).

    Attributes:
        group, kernel_size, spatial_dims, rings, sigma, max_frequency (tuples, one per ring),
        band_limit (largest frequency/degree), harmonics (``[(h, ring_index)]`` in coefficient
        order), dim (``D``), num_pixels (``k^s``), basis (``B`` ``[k^s, D]`` float64,
        orthonormal columns), rep (``sigma``: the :class:`Rep` of ``group`` on the coefficients),
        exact_grid_action (``False``: the steerable case, not an exact grid action).

    Example::

        >>> G = equiproj.SO2()
        >>> space = SteerableKernelSpace(G, 5)
        >>> r_in, r_out = Rep.parse(G, "2x0 + 1"), Rep.parse(G, "1 + 2")
        >>> K = torch.randn(r_out.dim, r_in.dim, 5, 5)
        >>> e_perp, e_g = space.energies(K, r_in, r_out)
        >>> K_eq = space.project(K, r_in, r_out)          # equivariant part
    """

    exact_grid_action = False

    # many layers in one fused call (what the penalty looks for on a kernel-space type)
    @staticmethod
    def energies_many(weights, spaces, reps):
        """:func:`kernel_energies_many`."""
        return kernel_energies_many(weights, spaces, reps)

    @staticmethod
    def energies_and_grads_many(weights, spaces, reps, *, lambda_perp, lambda_G):
        """:func:`kernel_energies_and_grads_many`."""
        return kernel_energies_and_grads_many(weights, spaces, reps, lambda_perp=lambda_perp, lambda_G=lambda_G)

    def __init__(self, group: Group, kernel_size: int, spatial_dims: int | None = None, *,
                 rings: Sequence[float] | None = None, sigma: float | Sequence[float] | None = None,
                 max_frequency: int | Sequence[int] | None = None):
        if not isinstance(group, Group):
            raise TypeError(f"group must be an equiproj Group, got {type(group).__name__}")
        if spatial_dims is None:
            spatial_dims = group.ambient_dim
        if spatial_dims not in (2, 3) or spatial_dims != group.ambient_dim:
            raise ValueError(f"{group} acts on {group.ambient_dim}-D space: it has no kernel space for "
                             f"{spatial_dims!r}-D convolutions")
        if isinstance(kernel_size, (tuple, list)):
            if len(set(kernel_size)) != 1 or len(kernel_size) != spatial_dims:
                raise ValueError(f"steerable kernel spaces need a square (2-D) or cubic (3-D) kernel, got kernel_size "
                                 f"{tuple(kernel_size)} for {spatial_dims}-D")
            kernel_size = kernel_size[0]
        k = _check_int(kernel_size, "kernel_size", 1)
        if k % 2 == 0:
            raise ValueError(f"steerable kernel spaces need an odd kernel_size (the rotation centre must be a "
                             f"pixel), got {k}")
        self.group, self.kernel_size, self.spatial_dims = group, k, spatial_dims
        self.rings, self.sigma, self.max_frequency = self._parameters(rings, sigma, max_frequency)
        self.harmonics = [(h, j) for h in range(max(self.max_frequency) + 1)
                          for j in range(len(self.rings)) if self.max_frequency[j] >= h]
        self.band_limit = max(self.max_frequency)
        self.num_pixels = k**spatial_dims
        self.basis = self._build_basis()
        self.dim = self.basis.shape[1]
        self.rep = sum(n * group.harmonic_rep(h) for h, n in self._ring_counts())
        self._cache: dict = {}

    # ---- construction ---------------------------------------------------------------------
    def _parameters(self, rings, sigma, max_frequency):
        k = self.kernel_size
        if rings is None:
            rings = _default_rings(k)
        try:
            rings = tuple(float(r) for r in rings)
        except (TypeError, ValueError):
            raise TypeError(f"rings must be a sequence of radii, got {rings!r}") from None
        reach = (k - 1) / 2 * math.sqrt(self.spatial_dims)
        if not rings or any(not (0 <= r <= reach) for r in rings) or len(set(rings)) != len(rings):
            raise ValueError(f"rings must be distinct radii in [0, {reach:.3g}] (the grid's extent), got {rings}")
        if sigma is None:
            sigma = _default_sigma(rings)
        elif isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
            sigma = (float(sigma),) * len(rings)
        sigma = tuple(float(s) for s in sigma)
        if len(sigma) != len(rings) or any(not s > 0 for s in sigma):
            raise ValueError(f"sigma must be a positive float or one positive width per ring ({len(rings)}), got {sigma}")
        if max_frequency is None:
            mf = _default_max_frequency(rings, k)
        elif isinstance(max_frequency, int) and not isinstance(max_frequency, bool):
            mf = tuple(0 if r == 0 else max_frequency for r in rings)
        else:
            mf = tuple(max_frequency)
        if len(mf) != len(rings) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in mf):
            raise ValueError(f"max_frequency must be an int >= 0 or one per ring ({len(rings)}), got {max_frequency!r}")
        if any(r == 0 and v > 0 for r, v in zip(rings, mf)):
            raise ValueError("the ring at radius 0 can only carry frequency/degree 0 (harmonics vanish at the centre)")
        return rings, sigma, mf

    def _ring_counts(self):
        counts: dict[int, int] = {}
        for h, _ in self.harmonics:
            counts[h] = counts.get(h, 0) + 1
        return sorted(counts.items())

    def _harmonic_values(self, h: int, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``[P, d_h]``: the angular harmonic of frequency/degree h at the grid points (0 at the centre for h > 0)."""
        centre = r < 1e-12
        if h == 0:
            return torch.ones(len(x), 1, dtype=torch.float64)
        u = x / torch.where(centre, 1.0, r)[:, None]
        if self.spatial_dims == 2:
            theta = torch.atan2(u[:, 1], u[:, 0])
            vals = torch.stack([torch.cos(h * theta), torch.sin(h * theta)], -1)
        else:
            vals = spherical_harmonics(h, u)
        return torch.where(centre[:, None], 0.0, vals)

    def _build_basis(self):
        x = grid_points((self.kernel_size,) * self.spatial_dims)
        r = x.norm(dim=-1)
        cols = []
        for h, j in self.harmonics:
            prof = torch.exp(-((r - self.rings[j]) ** 2) / (2 * self.sigma[j] ** 2))
            blk = prof[:, None] * self._harmonic_values(h, x, r)
            norm = blk.square().sum(0).mean().sqrt()
            if not norm > 1e-12:
                raise ValueError(f"kernel space: the harmonic of frequency/degree {h} on the ring of radius "
                                 f"{self.rings[j]} (sigma {self.sigma[j]}) vanishes on the {self.kernel_size}-pixel grid")
            cols.append(blk / norm)
        Phi = torch.cat(cols, 1)
        if Phi.shape[1] > Phi.shape[0]:
            raise ValueError(f"kernel space of {Phi.shape[1]} functions does not fit a grid of {Phi.shape[0]} pixels: "
                             "lower max_frequency or use fewer rings")
        lam, V = torch.linalg.eigh(Phi.T @ Phi)
        if not lam[0] > 1e-8 * lam[-1]:
            raise ValueError(f"the sampled harmonics are (nearly) linearly dependent on the {self.kernel_size}-pixel grid "
                             f"(Gram condition number {float(lam[-1] / lam[0].clamp_min(1e-300)):.1e}): lower "
                             "max_frequency, widen sigma or use fewer rings")
        return Phi @ (V * lam.rsqrt()) @ V.T  # Löwdin: the isometry closest to Phi

    # ---- helpers ----------------------------------------------------------------------------
    def __repr__(self):
        return (f"SteerableKernelSpace({self.group}, kernel_size={self.kernel_size}, spatial_dims={self.spatial_dims}, "
                f"rings={self.rings}, sigma={self.sigma}, max_frequency={self.max_frequency}, dim={self.dim})")

    def describe(self) -> str:
        """One line for reports: which kind of kernel space this is, and its band limit."""
        what = "frequency" if self.spatial_dims == 2 else "degree"
        return (f"steerable kernel space (band-limited, G acts on the coefficients; out-of-band part counts as "
                f"non-equivariant): {self.group}, k={self.kernel_size}, rings {self.rings}, max {what} "
                f"{self.max_frequency}, sigma {self.sigma}, {self.dim} of {self.num_pixels} dims")

    @torch.compiler.disable  # cached host-side state: never traced (dynamo would rebuild it inside the graph)
    def basis_on(self, device, dtype) -> torch.Tensor:
        """``B`` ``[k^s, D]`` on ``device`` in ``dtype`` (cached)."""
        key = ("B", torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.basis.to(device=device, dtype=dtype)
        return self._cache[key]

    @torch.compiler.disable
    def _layout(self, rep_in: Rep, device=None, inverse: bool = False) -> tuple[Rep, torch.Tensor | None]:
        """(coefficient rep, column map) for ``rep_in``, cached: column ``j`` of the coefficient layout is
        Kronecker column ``map[j]`` (``inverse=True``: the other way); ``None`` when it is the identity."""
        key = ("layout", rep_in)
        if key not in self._cache:
            self._cache[key] = _coefficient_layout(self, rep_in)
        crep, colmap = self._cache[key]
        if colmap is None:
            return crep, None
        dkey = ("colmap", rep_in, torch.device(device or "cpu"), inverse)
        if dkey not in self._cache:
            self._cache[dkey] = (torch.argsort(colmap) if inverse else colmap).to(device or "cpu")
        return crep, self._cache[dkey]

    def coefficient_rep(self, rep_in: Rep) -> Rep:
        """The input rep ``rho_in ⊗ sigma`` of the coefficient matrix returned by :meth:`coefficients`
        (cached). Its fields are ``f ⊗ sigma_h`` for each input field ``f`` and harmonic ``h``; the
        rings are copies, so ``equiproj.energies`` works per field pair and harmonic, with the
        Clebsch-Gordan / frequency-addition blocks of :mod:`equiproj.clebsch_gordan`."""
        return self._layout(rep_in)[0]

    def _check(self, weight, rep_in, rep_out) -> tuple[int, int]:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        check_rep_pair(rep_in, rep_out)
        if rep_in.group != self.group:
            raise ValueError(f"the reps act by {rep_in.group} but this kernel space is for {self.group}")
        s, k = self.spatial_dims, self.kernel_size
        want = (rep_out.dim, rep_in.dim) + (k,) * s
        if weight.dim() < 2 + s or tuple(weight.shape[-2 - s:]) != want:
            raise ValueError(f"weight must have shape [..., rep_out.dim, rep_in.dim, {', '.join(['k'] * s)}] = "
                             f"[..., {', '.join(map(str, want))}], got {tuple(weight.shape)}")
        return rep_out.dim, rep_in.dim

    def _pixels(self, weight, rep_in, rep_out):
        """(K ``[..., m, n, P]`` in the compute dtype, B in that dtype)."""
        m, n = self._check(weight, rep_in, rep_out)
        dt = _ops.accumulation_dtype(weight.dtype)
        K = weight.to(dt).reshape(weight.shape[: -2 - self.spatial_dims] + (m, n, self.num_pixels))
        return K, self.basis_on(weight.device, dt)

    def _to_layout(self, A0: torch.Tensor, rep_in: Rep) -> torch.Tensor:
        """``[..., m, n, D]`` (Kronecker order) -> ``[..., m, n * D]`` in the coefficient rep's layout."""
        _, colmap = self._layout(rep_in, A0.device)
        A = A0.flatten(-2)
        return A if colmap is None else A.index_select(-1, colmap)

    def _from_layout(self, A: torch.Tensor, rep_in: Rep) -> torch.Tensor:
        """Inverse of :meth:`_to_layout`: ``[..., m, n * D] -> [..., m, n, D]``."""
        _, inv = self._layout(rep_in, A.device, inverse=True)
        return (A if inv is None else A.index_select(-1, inv)).unflatten(-1, (-1, self.dim))

    # ---- the public protocol ----------------------------------------------------------------
    def coefficients(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> torch.Tensor:
        """``[..., c_out, c_in * D]``: ``K B`` as a linear map from :meth:`coefficient_rep` to ``rep_out``."""
        K, B = self._pixels(weight, rep_in, rep_out)
        return self._to_layout(K @ B, rep_in)

    def kernel(self, coefficients: torch.Tensor, rep_in: Rep) -> torch.Tensor:
        """Inverse of :meth:`coefficients`: ``[..., c_out, c_in * D] -> [..., c_out, c_in, k, ..., k]`` (in S)."""
        if not isinstance(coefficients, torch.Tensor) or coefficients.shape[-1] != rep_in.dim * self.dim:
            raise ValueError(f"coefficients must be a tensor [..., c_out, {rep_in.dim * self.dim}] (c_in * D)")
        A0 = self._from_layout(coefficients, rep_in)
        K = A0 @ self.basis_on(A0.device, A0.dtype).T
        return K.unflatten(-1, (self.kernel_size,) * self.spatial_dims)

    def energy_parts(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> dict:
        """The terms of E_perp and E_G, each ``[...]``: ``"outside"`` = ||K - K B B^T||^2 (out of band),
        ``"coefficients"`` = E_perp of the coefficients, ``"equivariant"`` = E_G. Differentiable."""
        K, B = self._pixels(weight, rep_in, rep_out)
        outside, A0 = _OutOfBand.apply(K, B)
        e_perp, e_g = _linear_energies(self._to_layout(A0, rep_in), self.coefficient_rep(rep_in), rep_out)
        return {"outside": outside, "coefficients": e_perp, "equivariant": e_g}

    def energies(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)`` of conv weights ``[..., c_out, c_in, k, ..., k]``, each ``[...]`` (float32, or
        float64 for float64 weights); differentiable. ``rep_out`` acts on ``c_out``, ``rep_in`` on ``c_in``."""
        p = self.energy_parts(weight, rep_in, rep_out)
        return p["outside"] + p["coefficients"], p["equivariant"]

    def energies_and_grad(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep, *, lambda_perp=1.0, lambda_G=0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G, grad)`` of conv weights without an autograd graph (see
        :func:`equiproj.energies_and_grad`): ``grad`` (weight's shape and dtype) is the gradient of
        ``lambda_perp * E_perp + lambda_G * E_G``; the lambdas are numbers or tensors broadcastable
        to the batch shape ``weight.shape[:-2-s]``. Two thin GEMMs forward (coefficients, out-of-band
        residual), the coefficient energies and gradient in one fused pass, one GEMM back:
        ``grad = 2 lambda_perp (K - A0 B^T) + dA B^T``."""
        split = _InBandSplit(self, weight, rep_in, rep_out, lambda_perp)
        e_perp, e_g, dA = _linear_energies_and_grad(split.A, self.coefficient_rep(rep_in), rep_out,
                                                    lambda_perp=split.c_perp, lambda_G=lambda_G)
        return e_perp + split.outside.to(e_perp.dtype), e_g, split.grad(dA)

    def project(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep, which: str = "equivariant") -> torch.Tensor:
        """``P(K)`` (``which="equivariant"``) or ``K - P(K)`` (``"non_equivariant"``, in residual form),
        same shape and dtype as ``weight``."""
        if which not in ("equivariant", "non_equivariant"):
            raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")
        K, B = self._pixels(weight, rep_in, rep_out)
        A0 = K @ B
        coef = _linear_project(self._to_layout(A0, rep_in), self.coefficient_rep(rep_in), rep_out,
                               which=which)
        out = self._from_layout(coef, rep_in) @ B.T
        if which == "non_equivariant":
            out = out + (K - A0 @ B.T)
        return out.reshape(weight.shape).to(weight.dtype)

    def act(self, g: torch.Tensor, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> torch.Tensor:
        """The action of one element ``g`` on the in-band part of a kernel:
        ``rho_out(g) A (rho_in(g) ⊗ sigma(g))^T B^T`` (``[..., c_out, c_in, k, ..., k]``, compute dtype).
        For the grid's own symmetries this equals moving the kernel's pixels (tested)."""
        K, B = self._pixels(weight, rep_in, rep_out)
        g = self.group.check_elements(g)
        if g.shape != (self.spatial_dims,) * 2:
            raise ValueError(f"g must be one element [{self.spatial_dims}, {self.spatial_dims}], got {tuple(g.shape)}")
        Ro = rep_out.matrix(g).to(K)
        Ri = torch.kron(rep_in.matrix(g), self.rep.matrix(g)).to(K)
        A0 = K @ B
        out = (Ro @ A0.flatten(-2) @ Ri.T).unflatten(-1, A0.shape[-2:]) @ B.T
        return out.unflatten(-1, (self.kernel_size,) * self.spatial_dims)


class _InBandSplit:
    """A kernel ``K`` split for the one-pass route (no autograd graph): the in-band coefficients
    ``A`` (the coefficient rep's layout), the out-of-band energy ``||K - A0 B^T||^2`` (residual form)
    and, once the coefficient gradient ``dA`` is known, ``dK = 2 c_perp (K - A0 B^T) + dA B^T``."""

    def __init__(self, space: SteerableKernelSpace, weight: torch.Tensor, rep_in: Rep, rep_out: Rep, lambda_perp):
        self.space, self.rep_in, self.weight = space, rep_in, weight
        with torch.no_grad():
            K, self.B = space._pixels(weight.detach(), rep_in, rep_out)
            rows, P = K.shape[:-1], K.shape[-1]
            K2 = K.reshape(-1, P)
            A0 = K2 @ self.B
            self.R = torch.addmm(K2, A0, self.B.T, alpha=-1.0).reshape(rows + (P,))
            self.A = space._to_layout(A0.reshape(rows + (self.B.shape[1],)), rep_in)
            self.outside = self.R.square().sum((-3, -2, -1))
        self.c_perp = _ops.as_coefficient(lambda_perp, self.A, "lambda_perp")

    def grad(self, dA: torch.Tensor) -> torch.Tensor:
        """``dK`` (the weight's shape and dtype) from the coefficient gradient ``dA``; consumes the residual."""
        with torch.no_grad():
            B, R = self.B, self.R
            R.mul_((2 * self.c_perp).to(R.dtype)[..., None, None, None])
            dA0 = self.space._from_layout(dA, self.rep_in).reshape(-1, B.shape[1]).to(R.dtype)
            dK = torch.addmm(R.reshape(-1, R.shape[-1]), dA0, B.T)
        return dK.reshape(self.weight.shape).to(self.weight.dtype)


class _OutOfBand(torch.autograd.Function):
    """``(||K - K B B^T||^2 [...], A0 = K B)`` from ``K [..., m, n, P]``: two GEMMs forward (the
    residual ``K - A0 B^T`` is formed by one ``addmm``), one backward:
    ``dK = 2 g_E (K - A0 B^T) + g_A0 B^T = 2 g_E K + (g_A0 - 2 g_E A0) B^T``. No N-sized tensor
    is kept for backward (K is the caller's)."""

    @staticmethod
    def forward(ctx, K, B):
        batch, P = K.shape[:-3], K.shape[-1]
        K2 = K.reshape(-1, P)
        A0 = K2 @ B
        R = torch.addmm(K2, A0, B.T, alpha=-1.0).reshape(batch + (-1,))
        outside = torch.linalg.vecdot(R, R)
        ctx.save_for_backward(K, A0, B)
        return outside, A0.reshape(K.shape[:-1] + (B.shape[1],))

    @staticmethod
    def backward(ctx, g_out, g_A0):
        K, A0, B = ctx.saved_tensors
        P = K.shape[-1]
        g2 = 2 * g_out  # [...]: one factor per kernel, broadcast over its rows (no .item(): no device sync)
        rows = g2.reshape(g2.shape + (1, 1)).expand(g2.shape + (K.shape[-3] * K.shape[-2], 1)).reshape(-1, 1)
        inner = -rows * A0 if g_A0 is None else g_A0.reshape(A0.shape) - rows * A0
        dK = (inner @ B.T).addcmul_(K.reshape(-1, P), rows)
        return dK.reshape(K.shape), None


def _coefficient_layout(space: SteerableKernelSpace, rep_in: Rep) -> tuple[Rep, torch.Tensor | None]:
    """The coefficient rep (segments ``c * n_h`` copies of ``f ⊗ sigma_h``, harmonic-major, no
    permutation) and the map from its columns to the Kronecker columns ``i * D + d``."""
    group, D = space.group, space.dim
    user = rep_in.perm if rep_in.perm is not None else torch.arange(rep_in.dim)
    segments, cols = [], []
    off_h = 0
    for h, n_h in space._ring_counts():
        fh = group.harmonic_rep(h).segments
        if len(fh) != 1 or fh[0][0] != 1:
            raise RuntimeError(f"harmonic rep of {group} at {h} is not one field")
        field_h = fh[0][1]
        d_h = field_h.dim
        o = 0
        for c, f in rep_in.segments:
            segments.append((c * n_h, tensor_field(f, field_h)))
            u = torch.arange(c)[:, None, None, None]
            v = torch.arange(n_h)[None, :, None, None]
            a = torch.arange(f.dim)[None, None, :, None]
            b = torch.arange(d_h)[None, None, None, :]
            cols.append((user[o + u * f.dim + a] * D + off_h + v * d_h + b).reshape(-1))
            o += c * f.dim
        off_h += n_h * d_h
    colmap = torch.cat(cols)
    if torch.equal(colmap, torch.arange(len(colmap))):
        colmap = None
    return Rep(group, segments, name=None), colmap


@functools.lru_cache(maxsize=256)
def default_kernel_space(group: Group, kernel_size: int, spatial_dims: int | None = None) -> SteerableKernelSpace:
    """The steerable kernel space with the documented defaults (cached: one object per arguments).

    Raises ``ValueError`` for groups that are not subgroups of O(2)/O(3) covered here, a
    ``spatial_dims`` that does not match the group, or an even ``kernel_size``.
    """
    return SteerableKernelSpace(group, kernel_size, spatial_dims)


def kernel_energies_many(weights, spaces, reps) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of many steerable conv layers at once: ``(E_perp [L], E_G [L])``.

    ``weights[i]`` ``[c_out, c_in, k, ..., k]``, ``spaces[i]`` a :class:`SteerableKernelSpace`,
    ``reps[i] = (rep_in, rep_out)``. The coefficient energies go through one
    :func:`equiproj.energies_many` call (the multi-layer fused op where available).
    """
    weights, spaces, reps = list(weights), list(spaces), list(reps)
    if not (len(weights) == len(spaces) == len(reps)) or not weights:
        raise ValueError(f"need the same non-zero number of weights, spaces and rep pairs, got "
                         f"{len(weights)}, {len(spaces)}, {len(reps)}")
    outside, coefs, creps = [], [], []
    for w, sp, (ri, ro) in zip(weights, spaces, reps):
        if not isinstance(sp, SteerableKernelSpace):
            raise TypeError(f"spaces must be SteerableKernelSpace objects, got {type(sp).__name__}")
        K, B = sp._pixels(w, ri, ro)
        if K.dim() != 3:
            raise ValueError("kernel_energies_many takes unbatched weights [c_out, c_in, k, ..., k]")
        e_out, A0 = _OutOfBand.apply(K, B)
        outside.append(e_out)
        coefs.append(sp._to_layout(A0, ri))
        creps.append((sp.coefficient_rep(ri), ro))
    e_perp, e_g = _linear_energies_many(coefs, creps)
    return e_perp + torch.stack(outside).to(e_perp.dtype), e_g


def kernel_energies_and_grads_many(weights, spaces, reps, *, lambda_perp, lambda_G):
    """:meth:`SteerableKernelSpace.energies_and_grad` of many conv layers, the coefficient energies
    and gradients of all of them from one :func:`equiproj.energies_and_grads_many` call.

    Returns ``(E_perp [L], E_G [L], grads)``; ``grads[i]`` has ``weights[i]``'s shape and dtype.
    Arguments as in :func:`kernel_energies_many`, plus one ``lambda_perp`` and ``lambda_G`` per layer.
    """
    weights, spaces, reps = list(weights), list(spaces), list(reps)
    lambda_perp, lambda_G = list(lambda_perp), list(lambda_G)
    if not (len(weights) == len(spaces) == len(reps) == len(lambda_perp) == len(lambda_G)) or not weights:
        raise ValueError(f"need the same non-zero number of weights, spaces, rep pairs, lambda_perp and lambda_G, "
                         f"got {len(weights)}, {len(spaces)}, {len(reps)}, {len(lambda_perp)}, {len(lambda_G)}")
    splits = []
    for w, sp, (ri, ro), lp in zip(weights, spaces, reps, lambda_perp):
        if not isinstance(sp, SteerableKernelSpace):
            raise TypeError(f"spaces must be SteerableKernelSpace objects, got {type(sp).__name__}")
        splits.append(_InBandSplit(sp, w, ri, ro, lp))
    e_perp, e_g, dAs = _linear_energies_and_grads_many(
        [s.A for s in splits], [(sp.coefficient_rep(ri), ro) for sp, (ri, ro) in zip(spaces, reps)],
        lambda_perp=[s.c_perp for s in splits], lambda_G=lambda_G)
    outside = torch.stack([s.outside for s in splits])
    return e_perp + outside.to(e_perp.dtype), e_g, [s.grad(dA) for s, dA in zip(splits, dAs)]

