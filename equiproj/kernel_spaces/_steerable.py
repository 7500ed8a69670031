"""Steerable kernel spaces: rotations that do not map the kernel grid onto itself (docs/math.md §6).

A rotation other than the grid's own symmetries has no exact action on an arbitrary ``k x k``
(``k x k x k``) kernel. A :class:`SteerableKernelSpace` calls a kernel equivariant when it is the
pixel sampling of a continuous equivariant kernel of a band-limited family, the kernels escnn's
``R2Conv``/``R3Conv`` parametrise:

* ``Phi [k^s, D]``: radial profile x angular harmonic functions sampled on the grid (2-D: Gaussian
  rings times ``(cos h theta, sin h theta)``; 3-D: Gaussian shells times the real spherical
  harmonics of :mod:`equiproj.groups`). Their span is the band ``S``; ``sigma``
  (``group.harmonic_rep``) is the group's action on their coefficients.
* ``V = span{h Phi^T : h in Hom_G(rho_in ⊗ sigma, rho_out)}``, the sampled equivariant kernels, and
  ``P`` the orthogonal projection onto ``V`` in the pixel (Frobenius) inner product:
  ``E_perp(K) = ||K - P K||^2``, ``E_G(K) = ||P K||^2``. Everything outside the band counts as
  non-equivariant.
* Computation (:mod:`equiproj.kernel_spaces._pixel_plan`): per field-pair type an orthonormal basis
  of V's part in one tile, and the library's fused op on the weight viewed as ``[c_out, c_in k^s]``:
  one pass over W for the energies, one for energies and gradient; nothing but the weight is kept
  for backward (fields with a change of basis may first be rotated into their irreps, when cheaper).
  Gradients written into given tensors and the in-place decoupled step of fields with a change of
  basis take the factorised transforms instead (:mod:`equiproj.kernel_spaces._factorised`: pixels
  to the band, each field to its irreps, a few whitened maps per irrep pair, back), with no copy
  of W.
* Defaults (those of escnn's ``R2Conv``/``R3Conv``): rings at radii ``0, 1, ..., (k-1)/2``; width
  0.6 (0.4 on the outermost ring, 0.005 at radius 0); maximum frequency on the ring of radius ``r``
  (``R = (k-1)/2``): 2-D ``min(2 r, 2 if r = R else 2 r - ((r + 1) mod 2))``, 3-D
  ``min(2 r, R - r + 2)``; 0 at the centre.

For the grid's own symmetries ``Phi^T Phi`` commutes with ``sigma``, V is invariant under moving
the kernel's pixels and a kernel of V gives a conv that commutes exactly with those symmetries; at
other angles sampled kernels are equivariant up to the grid's anisotropy (measured by
:func:`smooth_equivariance_error`; committed numbers in ``bench/results/steerable_equivariance.md``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._caches import bytes_cached
from .. import ops as _ops
from .. import reference as _reference
from ..grid import grid_points
from ..groups import Group, Rep, check_rep_pair, spherical_harmonics
from ..groups._field import tensor_field
from ..kernels import torch_project
from ._aligned import rotate_tiles
from ._factorised import factorised_one as _factorised_one
from ._passes import kernel_pass_runners, pass_energies
from ._pixel_plan import PixelPlan, packed_on, pixel_plan, tile_kernel_tables, tile_pass

__all__ = ["SteerableKernelSpace", "default_kernel_space", "kernel_energies_many", "kernel_energies_and_grads_many"]


def _check_int(v, name, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------
# Defaults (escnn's R2Conv / R3Conv)
# ---------------------------------------------------------------------------------------
def _default_rings(kernel_size: int) -> tuple[float, ...]:
    return tuple(float(r) for r in range((kernel_size - 1) // 2 + 1))


def _default_sigma(rings) -> tuple[float, ...]:
    out = [0.6] * len(rings)
    out[-1] = 0.4
    return tuple(0.005 if r == 0 else s for r, s in zip(rings, out))


def _default_max_frequency(rings, kernel_size, spatial_dims) -> tuple[int, ...]:
    R = (kernel_size - 1) // 2
    out = []
    for r in rings:
        if r == 0:
            out.append(0)
        elif spatial_dims == 2:  # escnn's 2-D rule (_manual_fco1 of R2Conv)
            out.append(int(math.floor(min(2 * r, 2 if r == R else 2 * r - (r + 1) % 2) + 1e-9)))
        else:  # escnn's 3-D rule ('default1' of R3Conv)
            out.append(int(math.floor(min(2 * r, R - r + 2) + 1e-9)))
    return tuple(out)


class SteerableKernelSpace:
    """The sampled equivariant kernels of a band-limited family: ``V = span{h Phi^T}`` (see the module
    docstring), projected onto in the pixel inner product.

    Args:
        group: a subgroup of O(2) (``SO2, O2, Cyclic, Dihedral``; 2-D kernels) or of O(3)
            (``SO3, O3, Octahedral, FullOctahedral``; 3-D kernels).
        kernel_size: odd ``k`` (the rotation centre must be a pixel); a tuple of equal sizes is accepted.
        spatial_dims: 2 or 3 (default: the group's ambient dimension; a mismatch is an error).
        rings: radii of the radial profiles (default ``0, 1, ..., (k-1)/2``).
        sigma: profile widths, a float or one per ring (default 0.6, 0.4 on the last ring,
            0.005 at radius 0).
        max_frequency: highest frequency (2-D) or degree (3-D) per ring, an int (the same on
            every ring of radius > 0) or one per ring (default: escnn's rule, module docstring).

    Attributes:
        group, kernel_size, spatial_dims, rings, sigma, max_frequency (tuples, one per ring),
        band_limit (largest frequency/degree), harmonics (``[(h, ring_index)]`` in coefficient
        order), dim (``D``), num_pixels (``k^s``), sampled (``Phi`` ``[k^s, D]`` float64, each
        (ring, harmonic) block normalised, not orthonormal), basis (``B`` ``[k^s, D]`` float64: the
        orthonormal basis of the band closest to ``Phi``, ``Phi (Phi^T Phi)^(-1/2)``), rep (``sigma``:
        the :class:`Rep` of ``group`` on the coefficients), exact_grid_action (``False``).

    Example::

        >>> import torch, equiproj
        >>> from equiproj import Rep, SteerableKernelSpace
        >>> G = equiproj.SO2()
        >>> space = SteerableKernelSpace(G, 5)
        >>> r_in, r_out = Rep.parse(G, "2x0 + 1"), Rep.parse(G, "1 + 2")
        >>> K = torch.randn(r_out.dim, r_in.dim, 5, 5)
        >>> e_perp, e_g = space.energies(K, r_in, r_out)
        >>> K_eq = space.project(K, r_in, r_out)          # nearest sampled equivariant kernel
    """

    exact_grid_action = False

    # many layers in one fused call (what the penalty looks for on a kernel-space type)
    @staticmethod
    def energies_many(weights, spaces, reps):
        """:func:`kernel_energies_many`."""
        return kernel_energies_many(weights, spaces, reps)

    @staticmethod
    def energies_and_grads_many(weights, spaces, reps, *, lambda_perp, lambda_G, outs=None, energies=True):
        """:func:`kernel_energies_and_grads_many`."""
        return kernel_energies_and_grads_many(weights, spaces, reps, lambda_perp=lambda_perp, lambda_G=lambda_G,
                                              outs=outs, energies=energies)

    @classmethod
    def pass_runners(cls, weights, spaces, reps):
        """:func:`kernel_pass_runners` (``None`` for a subclass with its own many-layer routes)."""
        return kernel_pass_runners(weights, spaces, reps, space_type=cls)

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
        self.sampled, self.basis = self._build_sampled()
        self.dim = self.basis.shape[1]
        self.rep = sum(n * group.harmonic_rep(h) for h, n in self._ring_counts())

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
            mf = _default_max_frequency(rings, k, self.spatial_dims)
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

    def _build_sampled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``Phi``, ``B = Phi (Phi^T Phi)^(-1/2)``), both ``[k^s, D]`` float64."""
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
        lam, U = torch.linalg.eigh(Phi.T @ Phi)
        if not lam[0] > 1e-8 * lam[-1]:
            raise ValueError(f"the sampled harmonics are (nearly) linearly dependent on the {self.kernel_size}-pixel grid "
                             f"(Gram condition number {float(lam[-1] / lam[0].clamp_min(1e-300)):.1e}): lower "
                             "max_frequency, widen sigma or use fewer rings")
        return Phi, Phi @ (U * lam.rsqrt()) @ U.T

    # ---- helpers ----------------------------------------------------------------------------
    def __repr__(self):
        return (f"SteerableKernelSpace({self.group}, kernel_size={self.kernel_size}, spatial_dims={self.spatial_dims}, "
                f"rings={self.rings}, sigma={self.sigma}, max_frequency={self.max_frequency}, dim={self.dim})")

    def describe(self) -> str:
        """One line for reports: which kind of kernel space this is, and its band limit."""
        what = "frequency" if self.spatial_dims == 2 else "degree"
        return (f"steerable kernel space (span of the sampled band-limited equivariant kernels, pixel inner product; "
                f"the out-of-band part counts as non-equivariant): {self.group}, k={self.kernel_size}, rings "
                f"{self.rings}, max {what} {self.max_frequency}, sigma {self.sigma}, band {self.dim} of "
                f"{self.num_pixels} dims")

    def basis_on(self, device, dtype) -> torch.Tensor:
        """``B`` ``[k^s, D]`` on ``device`` in ``dtype`` (cached)."""
        return _tensor_on(self, "basis", torch.device(device), dtype)

    def _layout(self, rep_in: Rep, device=None, inverse: bool = False) -> tuple[Rep, torch.Tensor | None]:
        """(coefficient rep, column map) for ``rep_in``, cached: column ``j`` of the coefficient layout is
        Kronecker column ``map[j]`` (``inverse=True``: the other way); ``None`` when it is the identity."""
        crep, colmap = _coefficient_layout(self, rep_in)
        if colmap is None:
            return crep, None
        return crep, _colmap_on(self, rep_in, torch.device(device or "cpu"), inverse)

    def coefficient_rep(self, rep_in: Rep) -> Rep:
        """The input rep ``rho_in ⊗ sigma`` of the coefficient matrices (:meth:`coefficients`), cached.
        Its fields are ``f ⊗ sigma_h`` for each input field ``f`` and harmonic ``h`` (the rings are
        copies), with the Clebsch-Gordan / frequency-addition blocks of :mod:`equiproj.groups`."""
        return self._layout(rep_in)[0]

    def plan(self, rep_in: Rep, rep_out: Rep) -> PixelPlan:
        """The packed plan of pixel tiles the energies run on (cached; ``plan.layout``,
        ``plan.flops_per_weight``, ``plan.basis_bytes`` describe it)."""
        check_rep_pair(rep_in, rep_out)
        return _plan(self, rep_in, rep_out)

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

    def _pixels(self, weight, rep_in, rep_out, dtype=None) -> torch.Tensor:
        """``K [..., m, n, P]`` (a view where possible) in ``dtype`` (default: the weight's)."""
        m, n = self._check(weight, rep_in, rep_out)
        K = weight if dtype is None else weight.to(dtype)
        return K.reshape(weight.shape[: -2 - self.spatial_dims] + (m, n, self.num_pixels))

    # ---- the public protocol ----------------------------------------------------------------
    def energies(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep, *, backend: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)`` of conv weights ``[..., c_out, c_in, k, ..., k]``, each ``[...]`` (float32, or
        float64 for float64 weights); differentiable (the fused op's backward is one more pass).
        ``rep_out`` acts on ``c_out``, ``rep_in`` on ``c_in``; ``backend`` as in :func:`equiproj.energies`."""
        self._check(weight, rep_in, rep_out)
        (e_perp,), (e_g,) = _energies_grouped([weight], [self], [(rep_in, rep_out)], backend)
        return e_perp, e_g

    def energies_and_grad(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep, *, lambda_perp=1.0, lambda_G=0.0,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G, grad)`` of conv weights without an autograd graph (see
        :func:`equiproj.energies_and_grad`): ``grad`` (weight's shape and dtype) is the gradient of
        ``lambda_perp * E_perp + lambda_G * E_G``; the lambdas are numbers or tensors broadcastable
        to the batch shape ``weight.shape[:-2-s]``. With the fused op: one pass that reads W once and
        writes the gradient once."""
        self._check(weight, rep_in, rep_out)
        (e_perp,), (e_g,), (grad,) = _energies_and_grads_grouped([weight], [self], [(rep_in, rep_out)],
                                                                 [lambda_perp], [lambda_G], backend)
        return e_perp, e_g, grad

    def project(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep, which: str = "equivariant") -> torch.Tensor:
        """``P(K)`` (``which="equivariant"``) or ``K - P(K)`` (``"non_equivariant"``, in residual form),
        same shape and dtype as ``weight``; differentiable."""
        if which not in ("equivariant", "non_equivariant"):
            raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")
        K = self._pixels(weight, rep_in, rep_out, _ops.accumulation_dtype(weight.dtype))
        plan = self.plan(rep_in, rep_out)
        X = torch_project(plan.to_plan_coordinates(K), packed_on(plan, K.device, torch.float64), which)
        return plan.from_plan_coordinates(X).reshape(weight.shape).to(weight.dtype)

    def energy_parts(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> dict:
        """The terms of E_perp and E_G, each ``[...]``, differentiable: ``"outside"`` = ``||K - K B B^T||^2``
        (out of band), ``"in_band"`` = ``||K B B^T - P K||^2`` (the band's non-equivariant part; V lies in
        the band), ``"equivariant"`` = E_G."""
        K = self._pixels(weight, rep_in, rep_out, _ops.accumulation_dtype(weight.dtype))
        B = self.basis_on(K.device, K.dtype)
        K_band = (K @ B) @ B.T
        outside = (K - K_band).square().sum((-3, -2, -1))
        in_band, e_g = self.energies(K_band.reshape(weight.shape), rep_in, rep_out)
        return {"outside": outside, "in_band": in_band, "equivariant": e_g}

    # ---- coordinates of the band with an orthogonal action (for orbit estimators) -----------
    def coefficients(self, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> torch.Tensor:
        """``[..., c_out, c_in * D]``: orthonormal coordinates of the in-band part ``K B B^T`` in which
        ``G`` acts orthogonally as a linear map from :meth:`coefficient_rep` to ``rep_out``, with fixed
        points exactly V: ``K`` is equivariant iff it lies in the band and these coefficients are
        equivariant, and ``||coefficients||^2 = ||K B B^T||^2``. They are ``R^T (K B)`` with ``R`` the
        direct rotation (per field pair) from the coefficient maps equivariant in ``B``'s coordinates to
        V (:mod:`equiproj.kernel_spaces._aligned`; ``R = I`` where ``Phi^T Phi`` commutes with ``sigma``).
        This action is what makes an orbit estimator unbiased for ``2 E_perp``
        (:func:`equiproj.baselines.conv_orbit_defects`); off the grid it is not :meth:`act`. Differentiable;
        compute dtype (float32, float64 for float64 weights)."""
        K = self._pixels(weight, rep_in, rep_out, _ops.accumulation_dtype(weight.dtype))
        a = K @ self.basis_on(K.device, K.dtype)
        return self._to_layout(rotate_tiles(self, a, rep_in, rep_out, inverse=False), rep_in)

    def kernel(self, coefficients: torch.Tensor, rep_in: Rep, rep_out: Rep) -> torch.Tensor:
        """Inverse of :meth:`coefficients`: ``[..., c_out, c_in * D] -> [..., c_out, c_in, k, ..., k]`` (in the band)."""
        if (not isinstance(coefficients, torch.Tensor) or coefficients.shape[-1] != rep_in.dim * self.dim
                or coefficients.dim() < 2 or coefficients.shape[-2] != rep_out.dim):
            raise ValueError(f"coefficients must be a tensor [..., {rep_out.dim}, {rep_in.dim * self.dim}] "
                             "(c_out, c_in * D)")
        a = rotate_tiles(self, self._from_layout(coefficients, rep_in), rep_in, rep_out, inverse=True)
        K = a @ self.basis_on(a.device, a.dtype).T
        return K.unflatten(-1, (self.kernel_size,) * self.spatial_dims)

    def _to_layout(self, A0: torch.Tensor, rep_in: Rep) -> torch.Tensor:
        """``[..., m, n, D]`` (Kronecker order) -> ``[..., m, n * D]`` in the coefficient rep's layout."""
        _, colmap = self._layout(rep_in, A0.device)
        A = A0.flatten(-2)
        return A if colmap is None else A.index_select(-1, colmap)

    def _from_layout(self, A: torch.Tensor, rep_in: Rep) -> torch.Tensor:
        """Inverse of :meth:`_to_layout`: ``[..., m, n * D] -> [..., m, n, D]``."""
        _, inv = self._layout(rep_in, A.device, inverse=True)
        return (A if inv is None else A.index_select(-1, inv)).unflatten(-1, (-1, self.dim))

    def act(self, g: torch.Tensor, weight: torch.Tensor, rep_in: Rep, rep_out: Rep) -> torch.Tensor:
        """The action of one element ``g`` on the in-band part of a kernel by moving the band-limited
        interpolant: ``K_S = c Phi^T`` (``c`` the least-squares coefficients) goes to
        ``rho_out(g) c (rho_in(g) ⊗ sigma(g))^T Phi^T`` (``[..., c_out, c_in, k, ..., k]``, compute dtype).
        For the grid's own symmetries this is moving the kernel's pixels (tested), and V is its set of
        fixed points; at other angles it is not orthogonal in the pixel inner product."""
        K = self._pixels(weight, rep_in, rep_out, _ops.accumulation_dtype(weight.dtype))
        g = self.group.check_elements(g)
        if g.shape != (self.spatial_dims,) * 2:
            raise ValueError(f"g must be one element [{self.spatial_dims}, {self.spatial_dims}], got {tuple(g.shape)}")
        Phi = self.sampled.to(K)
        c = torch.linalg.lstsq(Phi, K.reshape(-1, K.shape[-1]).T).solution.T.reshape(K.shape[:-1] + (self.dim,))
        Ro = rep_out.matrix(g).to(K)
        Ri = torch.kron(rep_in.matrix(g), self.rep.matrix(g)).to(K)
        out = (Ro @ c.flatten(-2) @ Ri.T).unflatten(-1, c.shape[-2:]) @ Phi.T
        return out.unflatten(-1, (self.kernel_size,) * self.spatial_dims)


# ---------------------------------------------------------------------------------------
# Cached per-space state (bounded caches, looked up eagerly even inside torch.compile)
# ---------------------------------------------------------------------------------------
@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._steerable._tensor_on")
def _tensor_on(space: SteerableKernelSpace, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return getattr(space, name).to(device=device, dtype=dtype)


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._steerable._plan")
def _plan(space: SteerableKernelSpace, rep_in: Rep, rep_out: Rep) -> PixelPlan:
    return pixel_plan(space, rep_in, rep_out)


@bytes_cached("equiproj.kernel_spaces._steerable._coefficient_layout")
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


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._steerable._colmap_on")
def _colmap_on(space: SteerableKernelSpace, rep_in: Rep, device: torch.device, inverse: bool) -> torch.Tensor:
    _, colmap = _coefficient_layout(space, rep_in)
    return (torch.argsort(colmap) if inverse else colmap).to(device)


@bytes_cached("equiproj.kernel_spaces._steerable.default_kernel_space")
def default_kernel_space(group: Group, kernel_size: int, spatial_dims: int | None = None) -> SteerableKernelSpace:
    """The steerable kernel space with the documented defaults (cached: one object per arguments).

    Raises ``ValueError`` for groups that are not subgroups of O(2)/O(3) covered here, a
    ``spatial_dims`` that does not match the group, or an even ``kernel_size``.
    """
    return SteerableKernelSpace(group, kernel_size, spatial_dims)


# ---------------------------------------------------------------------------------------
# Many layers: one fused call per backend and device
# ---------------------------------------------------------------------------------------
def _check_finite(*xs):
    """Raise for NaN/Inf energies on the CPU (on CUDA this would cost a synchronisation)."""
    if torch.compiler.is_compiling() or xs[0].device.type != "cpu":
        return
    if not all(math.isfinite(float(x.detach() if x.dim() == 0 else x.detach().sum())) for x in xs):
        raise ValueError("the energy is not finite: the weight contains NaN or Inf")


def _plan_inputs(weights, spaces, reps, idx):
    """(plans, weights in the plan coordinates ``[..., m, n P]``, compute dtype) of the layers ``idx``."""
    plans, Xs = [], []
    for i in idx:
        sp, (ri, ro), w = spaces[i], reps[i], weights[i]
        plan = sp.plan(ri, ro)
        plans.append(plan)
        K = sp._pixels(w, ri, ro)
        if plan.layout != "fields":  # the change of basis in the compute dtype, not in a half weight's own
            K = K.to(_ops.accumulation_dtype(w.dtype))
        Xs.append(plan.to_plan_coordinates(K))
    return plans, Xs


def _reference_parts(w, sp, ri, ro):
    """(K, P K, E_perp, E_G) in float64 by the group quadrature of :mod:`equiproj.reference` on the
    orthonormal coefficients (plus the out-of-band part): an independent route for ``backend="reference"``
    (differentiable)."""
    K = w.to(torch.float64)
    A = sp.coefficients(K, ri, ro)
    PA = _reference.project(A, sp.coefficient_rep(ri), ro)
    PK = sp.kernel(PA, ri, ro).reshape(K.shape)
    return K, PK, (K - PK).square().flatten(-2 - sp.spatial_dims).sum(-1), PA.square().sum((-2, -1))


class _FusedRoute:
    """The device's fused backend (``"cpp"``, ``"triton"``): differentiable energies through the fused op
    on the pixel plan (nothing but the weights kept for backward). Energies with gradients, and the
    gradient added in place (the decoupled step when the outputs are the weights): where the pixel
    plan works on the weight itself (fields without a change of basis, in their own order: a few
    basis kernels per field pair), one pass writing into the outputs (on the CPU for contiguous
    float32/float64 weights the pixel-tile kernel, :func:`~equiproj.kernel_spaces._pixel_plan.tile_pass`;
    else the fused op); otherwise
    (regular fields, reps with a permutation) the factorised transforms
    (:mod:`equiproj.kernel_spaces._factorised`), two passes over the weight and no copy of it."""

    @staticmethod
    def energies(weights, spaces, reps, dev):
        if dev.type == "cpu" and not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()):
            parts = pass_energies(weights, spaces, reps)  # the C++ passes: one read, one pass back
            if parts is not None:
                return parts
        plans, Xs = _plan_inputs(weights, spaces, reps, range(len(weights)))
        dt = torch.float64 if dev.type == "cpu" else torch.float32
        return _ops.fused_energies(Xs, [packed_on(p, dev, dt) for p in plans])

    @staticmethod
    def energies_and_grads(weights, spaces, reps, lambda_perp, lambda_G, outs=None, energies=True):
        L = len(weights)
        eps, egs, grads = [None] * L, [None] * L, [None] * L
        tiles = []  # layers whose pixel plan runs on the weight itself: the fused op, in place into outs
        for i, (w, sp, (ri, ro)) in enumerate(zip(weights, spaces, reps)):
            plan = sp.plan(ri, ro)
            out = None if outs is None else outs[i]
            tables = tile_kernel_tables(w, plan, out)
            if tables is not None:  # the pixel-tile kernel on the weight as it is, in place into out
                eps[i], egs[i], grads[i] = tile_pass(w.detach(), tables, sp.spatial_dims, lambda_perp[i],
                                                             lambda_G[i], out)
                continue
            if (plan.layout == "fields" and plan.packed.identity_perm
                    and _fused_writes_into(w, None if outs is None else outs[i])):
                tiles.append(i)
                continue
            eps[i], egs[i], grads[i] = _factorised_one(w.detach(), sp, ri, ro, lambda_perp[i], lambda_G[i],
                                                       None if outs is None else outs[i], energies)
        if tiles:
            with torch.no_grad():
                plans, Xs = _plan_inputs([w.detach() for w in weights], spaces, reps, tiles)
                dev = Xs[0].device
                cps = [_ops.as_coefficient(lambda_perp[i], X, f"lambda_perp[{i}]") for i, X in zip(tiles, Xs)]
                cgs = [_ops.as_coefficient(lambda_G[i], X, f"lambda_G[{i}]") for i, X in zip(tiles, Xs)]
                dt = torch.float64 if dev.type == "cpu" else torch.float32
                into = None if outs is None else [spaces[i]._pixels(outs[i], *reps[i]).flatten(-2) for i in tiles]
                ep, eg, gr = _ops.fused_energies_and_grads(Xs, [packed_on(p, dev, dt) for p in plans], cps, cgs, into)
            for j, i in enumerate(tiles):
                eps[i], egs[i] = ep[j], eg[j]
                grads[i] = outs[i] if outs is not None else gr[j].reshape(weights[i].shape)
        return eps, egs, grads


class _TwinRoute:
    """``"torch"``: the kernels' pure-torch twin on the pixel plan (float64 basis)."""

    @staticmethod
    def energies(weights, spaces, reps, dev):
        plans, Xs = _plan_inputs(weights, spaces, reps, range(len(weights)))
        ep, eg, _ = _ops.run_twin(Xs, [packed_on(p, dev, torch.float64) for p in plans], [], [])
        return ep, eg

    @staticmethod
    def energies_and_grads(weights, spaces, reps, lambda_perp, lambda_G, outs=None, energies=True):
        with torch.no_grad():
            plans, Xs = _plan_inputs([w.detach() for w in weights], spaces, reps, range(len(weights)))
            cps = [_ops.as_coefficient(c, X, f"lambda_perp[{i}]") for i, (c, X) in enumerate(zip(lambda_perp, Xs))]
            cgs = [_ops.as_coefficient(c, X, f"lambda_G[{i}]") for i, (c, X) in enumerate(zip(lambda_G, Xs))]
            ep, eg, gr = _ops.run_twin(Xs, [packed_on(p, Xs[0].device, torch.float64) for p in plans], cps, cgs)
            grads = [p.from_plan_coordinates(g).reshape(w.shape).to(w.dtype) for p, g, w in zip(plans, gr, weights)]
        return ep, eg, _added(grads, outs)


class _ReferenceRoute:
    """``"reference"``: the group quadrature of :mod:`equiproj.reference` on the orthonormal band
    coefficients (plus the out-of-band part), float64: an independent route (differentiable)."""

    @staticmethod
    def energies(weights, spaces, reps, dev):
        parts = [_reference_parts(w, sp, *pair)[2:] for w, sp, pair in zip(weights, spaces, reps)]
        return [p[0] for p in parts], [p[1] for p in parts]

    @staticmethod
    def energies_and_grads(weights, spaces, reps, lambda_perp, lambda_G, outs=None, energies=True):
        eps, egs, grads = [], [], []
        for w, sp, pair, lp, lg in zip(weights, spaces, reps, lambda_perp, lambda_G):
            with torch.no_grad():
                K, PK, ep, eg = _reference_parts(w.detach(), sp, *pair)
            b = (..., None, None) + (None,) * sp.spatial_dims
            cp = torch.as_tensor(lp, dtype=torch.float64, device=K.device)[b]
            cg = torch.as_tensor(lg, dtype=torch.float64, device=K.device)[b]
            eps.append(ep)
            egs.append(eg)
            grads.append((2 * cp * (K - PK) + 2 * cg * PK).to(w.dtype).expand(w.shape).contiguous())
        return eps, egs, _added(grads, outs)


_ops.register_route("steerable_kernel_space", {"cpp": _FusedRoute, "triton": _FusedRoute, "torch": _TwinRoute,
                                               "reference": _ReferenceRoute})


def _added(grads, outs):
    """``grads``, or ``outs`` after adding ``grads`` to them in place (computed first: an out may be its weight)."""
    if outs is None:
        return grads
    for o, g in zip(outs, grads):
        o.add_(g.reshape(o.shape).to(o.dtype))
    return list(outs)


def _fused_writes_into(w, out) -> bool:
    """Whether the fused op can take ``w`` as it is and write its gradient into ``out`` (or a fresh tensor)."""
    return w.is_contiguous() and (out is None or (out.dtype == w.dtype and out.is_contiguous()))


def _energies_grouped(weights, spaces, reps, backend):
    out_p, out_g = [None] * len(weights), [None] * len(weights)
    for (name, dev), idx in _ops.group_by_backend(weights, backend).items():
        route = _ops.route_for("steerable_kernel_space", name)
        ep, eg = route.energies([weights[i] for i in idx], [spaces[i] for i in idx], [reps[i] for i in idx], dev)
        for j, i in enumerate(idx):
            out_p[i], out_g[i] = ep[j], eg[j]
    _check_finite(*out_p, *out_g)
    return out_p, out_g


def _energies_and_grads_grouped(weights, spaces, reps, lambda_perp, lambda_G, backend, outs=None, energies=True):
    L = len(weights)
    out_p, out_g, grads = [None] * L, [None] * L, [None] * L
    for (name, dev), idx in _ops.group_by_backend(weights, backend).items():
        route = _ops.route_for("steerable_kernel_space", name)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        ep, eg, gr = route.energies_and_grads(pick(weights), pick(spaces), pick(reps), pick(lambda_perp),
                                              pick(lambda_G), pick(outs), energies)
        for j, i in enumerate(idx):
            out_p[i], out_g[i], grads[i] = ep[j], eg[j], gr[j]
    if energies:
        _check_finite(*out_p, *out_g)
    return out_p, out_g, grads


def _check_many(weights, spaces, reps, *more):
    weights, spaces, reps = list(weights), list(spaces), list(reps)
    more = [list(m) for m in more]
    if len({len(weights), len(spaces), len(reps), *(len(m) for m in more)}) != 1 or not weights:
        what = "weights, spaces, rep pairs" + (", lambda_perp and lambda_G" if more else "")
        raise ValueError(f"need the same non-zero number of {what}, got "
                         f"{', '.join(str(len(x)) for x in (weights, spaces, reps, *more))}")
    for w, sp, pair in zip(weights, spaces, reps):
        if not isinstance(sp, SteerableKernelSpace):
            raise TypeError(f"spaces must be SteerableKernelSpace objects, got {type(sp).__name__}")
        sp._check(w, *pair)
        if w.dim() != 2 + sp.spatial_dims:
            raise ValueError("kernel_energies_many takes unbatched weights [c_out, c_in, k, ..., k]")
    return (weights, spaces, reps, *more)


def _stack(parts, weights):
    dt = torch.float64 if all(w.dtype == torch.float64 for w in weights) else torch.float32
    return torch.stack([p.to(dt) for p in parts])


def kernel_energies_many(weights, spaces, reps, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of many steerable conv layers at once: ``(E_perp [L], E_G [L])``, differentiable.

    ``weights[i]`` ``[c_out, c_in, k, ..., k]``, ``spaces[i]`` a :class:`SteerableKernelSpace`,
    ``reps[i] = (rep_in, rep_out)``. The layers of one backend and device go through one call of
    the fused op (and its backward through one more).
    """
    weights, spaces, reps = _check_many(weights, spaces, reps)
    e_perp, e_g = _energies_grouped(weights, spaces, reps, backend)
    return _stack(e_perp, weights), _stack(e_g, weights)


def kernel_energies_and_grads_many(weights, spaces, reps, *, lambda_perp, lambda_G, backend: str = "auto", outs=None,
                                   energies: bool = True):
    """:meth:`SteerableKernelSpace.energies_and_grad` of many conv layers, no autograd graph: with the
    device's fused backend, each layer through the factorised transforms (pixels to the band, each
    field to its irreps, the small projection there and back): one read of the weight for the band
    coefficients and one pass that writes the gradient.

    Returns ``(E_perp [L], E_G [L], grads)``; ``grads[i]`` has ``weights[i]``'s shape and dtype.
    Arguments as in :func:`kernel_energies_many`, plus one ``lambda_perp`` and ``lambda_G`` per layer.
    With ``outs`` (one tensor per layer, each of its weight's shape), the gradients are added to
    them in place and ``grads`` is ``outs``; an out may be its weight itself: ``lambda = -rate / 2``
    then takes the decoupled step ``W <- W - rate (W - P W)`` in place (for a contiguous float32 or
    float64 weight one matrix product over W, no copy). ``energies=False`` skips the energies
    (returned as ``None``), and with them the residual pass of that step.
    """
    weights, spaces, reps, lambda_perp, lambda_G = _check_many(weights, spaces, reps, lambda_perp, lambda_G)
    if outs is not None:
        outs = list(outs)
        if len(outs) != len(weights) or any(not isinstance(o, torch.Tensor) or o.shape != w.shape
                                            for o, w in zip(outs, weights)):
            raise ValueError("outs must hold one tensor of its weight's shape per layer")
    e_perp, e_g, grads = _energies_and_grads_grouped(weights, spaces, reps, lambda_perp, lambda_G, backend, outs,
                                                     energies)
    if not energies:
        return None, None, grads
    return _stack(e_perp, weights), _stack(e_g, weights), grads
