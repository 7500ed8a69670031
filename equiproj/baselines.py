"""Baselines the exact projection penalty is compared against (usable in training too).

Everything here is differentiable with respect to the weight / the model's parameters.

* **Operator-level sample-based penalty** (docs/math.md §2): the mean over ``K`` Haar-random ``g`` of
  ``||rho_out(g) W - W rho_in(g)||^2``, an unbiased estimator of ``2 E_perp`` whose relative
  error shrinks only like ``1/sqrt(K)``: :func:`orbit_defects` (one value per ``g``) and
  :func:`sampled_operator_penalty` (their mean). For conv kernels
  ``[c_out, c_in, *k]``, :func:`conv_orbit_defects` / :func:`sampled_conv_penalty` use the exact
  grid action (C4/D4 on square kernels, O/O_h on cubic kernels: a pixel permutation,
  :func:`equiproj.grid.kernel_rep`) or, with ``kernel_space=``, the orthogonal action of a
  steerable kernel space on the kernel's orthonormal band coefficients, whose fixed points are the
  space's equivariant kernels (:mod:`equiproj.kernel_spaces`).
  :func:`samples_for_relative_error` turns a set of draws into the ``K`` needed for a given
  relative error.
* **Data-level sample-based penalty** (the usual augmentation loss):
  :func:`sampled_data_penalty`, ``E_x E_g ||f(g·x) - g·f(x)||^2`` with ``K`` sampled ``g``
  (one extra forward pass of the model per sample).
* **Dense projector**: :class:`DenseProjector`, an orthonormal basis ``Q [m n, D]`` of the
  equivariant subspace of ``vec(W)`` and ``E_perp = ||w - Q Q^T w||^2`` (the approach of
  EMLP-style libraries), with its build time and memory. (For steerable conv kernels the
  dense basis is :class:`equiproj.kernel_spaces.DenseKernelBasis`.)
* **Pure-torch spectral path and ``torch.compile`` of it**: :func:`torch_energies`,
  :func:`compiled_energies` (what a user could write without the fused op).

Example::

    >>> import torch, equiproj
    >>> from equiproj.baselines import sampled_operator_penalty
    >>> G = equiproj.O3()
    >>> r = equiproj.Rep.parse(G, "8x0e + 4x1o + 2x2e")
    >>> W = torch.randn(r.dim, r.dim, requires_grad=True)
    >>> pen = sampled_operator_penalty(W, r, r, num_samples=64)  # ~ 2 * E_perp = 2 * energies(W, r, r)[0]
    >>> pen.backward()
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ._caches import bytes_cached
from ._energy import check_arguments
from ._energy import energies as _energies
from ._plan import plan_for
from .grid import kernel_rep
from .groups import Group, Rep, check_rep_pair
from .kernels import torch_fused_energies
from .kernels.inputs import accumulation_dtype

__all__ = [
    "orbit_defects",
    "sampled_operator_penalty",
    "conv_orbit_defects",
    "sampled_conv_penalty",
    "samples_for_relative_error",
    "sampled_data_penalty",
    "rep_action",
    "DenseProjector",
    "torch_energies",
    "compiled_energies",
]

# Memory budget for the per-sample temporaries (the samples are processed in chunks).
_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _field_matrices(rep: Rep, g: torch.Tensor, dtype, device) -> list[torch.Tensor]:
    """``[K, d_f, d_f]`` per segment of ``rep`` (the small field matrices), in ``dtype`` on ``device``."""
    return [f.matrix(g).to(device=device, dtype=dtype) for _, f in rep.segments]


def _elements(group: Group, num_samples, elements, generator) -> torch.Tensor:
    if elements is not None:
        g = group.check_elements(elements, "elements")
        if g.dim() != 3:
            raise ValueError(f"elements must have shape [K, d, d], got {tuple(g.shape)}")
        return g
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    return group.sample(num_samples, generator=generator)


def _chunks(K: int, bytes_per_sample: int):
    step = max(1, min(K, _CHUNK_BYTES // max(1, bytes_per_sample)))
    return [slice(k, min(K, k + step)) for k in range(0, K, step)]


def _float(W, name):
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {W.dtype}")


# ---------------------------------------------------------------------------------------
# Operator-level sample-based penalty: linear layers
# ---------------------------------------------------------------------------------------
def orbit_defects(W: torch.Tensor, rep_in: Rep, rep_out: Rep, elements: torch.Tensor) -> torch.Tensor:
    """``||rho_out(g_k) W - W rho_in(g_k)||^2`` for each given group element.

    Args:
        W: ``[..., rep_out.dim, rep_in.dim]`` (leading dims are a batch).
        elements: ``[K, d, d]`` group elements.
    Returns:
        ``[K, ...]`` in W's dtype (float32 for half precision), differentiable. Its Haar
        average is ``2 E_perp(W)`` (docs/math.md §2).
    """
    _float(W, "W")
    check_rep_pair(rep_in, rep_out)
    if W.dim() < 2 or tuple(W.shape[-2:]) != (rep_out.dim, rep_in.dim):
        raise ValueError(f"W must have shape [..., rep_out.dim, rep_in.dim] = [..., {rep_out.dim}, {rep_in.dim}], "
                         f"got {tuple(W.shape)}")
    g = _elements(rep_in.group, None, elements, None)
    dt = accumulation_dtype(W.dtype)
    X = W.to(dt)
    if rep_out.perm is not None:  # to the structured layout: segments of field copies on both sides
        X = X.index_select(-2, rep_out.perm.to(X.device))
    if rep_in.perm is not None:
        X = X.index_select(-1, rep_in.perm.to(X.device))
    batch = X.shape[:-2]
    X = X.reshape((math.prod(batch),) + X.shape[-2:])
    out = [_tile_defects(X, rep_in, rep_out, g[s]) for s in _chunks(len(g), 4 * X.numel() * X.element_size())]
    return torch.cat(out).reshape((len(g),) + batch)


def _tile_defects(X: torch.Tensor, rep_in: Rep, rep_out: Rep, g: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` defects of ``X [B, m, n]`` (structured layout), tile by tile (output segment x input
    segment): ``D[k] = F_out(g_k) T - T F_in(g_k)`` on the ``d_out x d_in`` field tiles ``T``, two GEMMs
    per tile for all K samples, no dense ``dim x dim`` matrix, no concatenation."""
    B, K = X.shape[0], len(g)
    Fo = _field_matrices(rep_out, g, X.dtype, X.device)
    Fi = _field_matrices(rep_in, g, X.dtype, X.device)
    total = X.new_zeros(K, B)
    oo = 0
    for (co, fo), A in zip(rep_out.segments, Fo):
        do, oi = fo.dim, 0
        for (ci, fi), C in zip(rep_in.segments, Fi):
            di = fi.dim
            T = X[:, oo : oo + co * do, oi : oi + ci * di].reshape(B, co, do, ci, di)
            # L[k, a, (b, u, v, c)] = sum_z A[k, a, z] T[b, u, z, v, c]
            L = (A.reshape(K * do, do) @ T.permute(2, 0, 1, 3, 4).reshape(do, -1)).reshape(K, do, B, co, ci, di)
            # R[(b, u, a, v), (k, c)] = sum_z T[b, u, a, v, z] C[k, z, c]
            R = (T.reshape(-1, di) @ C.permute(1, 0, 2).reshape(di, K * di)).reshape(B, co, do, ci, K, di)
            total = total + (L - R.permute(4, 2, 0, 1, 3, 5)).square().sum((1, 3, 4, 5))
            oi += ci * di
        oo += co * do
    return total


def sampled_operator_penalty(W: torch.Tensor, rep_in: Rep, rep_out: Rep, num_samples: int = 16, *,
                             generator: torch.Generator | None = None,
                             elements: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``K = num_samples`` Haar-random ``g`` of ``||rho_out(g) W - W rho_in(g)||^2``.

    An unbiased estimator of ``2 E_perp(W)`` (``[..., m, n] -> [...]``); pass ``elements``
    ``[K, d, d]`` to fix the group elements (e.g. ``G.elements()`` of a finite group gives the
    exact value ``2 E_perp``).
    """
    check_rep_pair(rep_in, rep_out)
    g = _elements(rep_in.group, num_samples, elements, generator)
    return orbit_defects(W, rep_in, rep_out, g).mean(0)


# ---------------------------------------------------------------------------------------
# Operator-level sample-based penalty: conv kernels
# ---------------------------------------------------------------------------------------
def conv_orbit_defects(weight: torch.Tensor, rep_in: Rep, rep_out: Rep, elements: torch.Tensor, *,
                       kernel_space=None) -> torch.Tensor:
    """Per-element orbit defects of a conv kernel ``weight [..., c_out, c_in, k, ..., k]``: ``[K, ...]``.

    * ``kernel_space=None``: the exact grid action (docs/math.md §6), ``(g·K)(x) = rho_out(g) K(g^-1 x)
      rho_in(g)^T``, with the grid convention of :mod:`equiproj.grid`; the group must map the
      kernel grid onto itself (C4/D4 on square kernels, O/O_h on cubic kernels). The defect is
      ``||g·K - K||^2``, whose Haar average is ``2 E_perp`` of the grid case. (Computed as the
      linear case: the kernel flattened to ``[c_out, c_in * k^s]`` with input rep
      ``rep_in @ grid.kernel_rep(G, k)``.)
    * ``kernel_space=space`` (a :class:`equiproj.kernel_spaces.SteerableKernelSpace`): G acts
      orthogonally on the kernel's band coefficients ``A = space.coefficients(K, rep_in, rep_out)``,
      with exactly the space's equivariant kernels as fixed points; the part of K outside the band
      is non-equivariant and enters exactly: the defect is
      ``||rho_out(g) A - A rho_coef(g)||^2 + 2 ||K - space.kernel(A, rep_in, rep_out)||^2``
      (``rho_coef = space.coefficient_rep(rep_in)``), whose Haar average is ``2 E_perp`` as the
      kernel space defines it.
    """
    _float(weight, "weight")
    check_rep_pair(rep_in, rep_out)
    G = rep_in.group
    g = _elements(G, None, elements, None)
    if kernel_space is None:
        s = G.ambient_dim
        if weight.dim() < 2 + s:
            raise ValueError(f"weight must have shape [..., c_out, c_in, {', '.join(['k'] * s)}], got {tuple(weight.shape)}")
        _check_channels(weight, s, rep_in, rep_out)
        shape = tuple(weight.shape[-s:])
        rin = _grid_input_rep(rep_in, kernel_rep(G, shape))  # ValueError when G does not act on this grid
        return orbit_defects(weight.flatten(-s - 1), rin, rep_out, g)
    for attr in ("coefficients", "coefficient_rep", "kernel", "spatial_dims", "group"):
        if not hasattr(kernel_space, attr):
            raise TypeError(f"kernel_space must be a steerable kernel space (with .{attr}), got {type(kernel_space).__name__}")
    if kernel_space.group != G:
        raise ValueError(f"kernel_space is for {kernel_space.group} but the reps act by {G}")
    s = kernel_space.spatial_dims
    if weight.dim() < 2 + s:
        raise ValueError(f"weight must have shape [..., c_out, c_in, {', '.join(['k'] * s)}], got {tuple(weight.shape)}")
    _check_channels(weight, s, rep_in, rep_out)
    A = kernel_space.coefficients(weight, rep_in, rep_out)  # [..., c_out, c_in * D], compute dtype
    outside = (weight.to(A.dtype) - kernel_space.kernel(A, rep_in, rep_out)).square().flatten(-2 - s).sum(-1)
    return orbit_defects(A, kernel_space.coefficient_rep(rep_in), rep_out, g) + 2 * outside


def _check_channels(weight, s, rep_in, rep_out):
    if tuple(weight.shape[-2 - s : -s]) != (rep_out.dim, rep_in.dim):
        raise ValueError(f"weight must have c_out = rep_out.dim = {rep_out.dim} and c_in = rep_in.dim = {rep_in.dim}, "
                         f"got {tuple(weight.shape)}")


@bytes_cached("equiproj.baselines._grid_input_rep")
def _grid_input_rep(rep_in: Rep, pixel_rep: Rep) -> Rep:
    return rep_in @ pixel_rep


def sampled_conv_penalty(weight: torch.Tensor, rep_in: Rep, rep_out: Rep, num_samples: int = 16, *,
                         kernel_space=None, generator: torch.Generator | None = None,
                         elements: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of :func:`conv_orbit_defects` over ``K = num_samples`` Haar-random elements: an unbiased
    estimator of ``2 E_perp`` of a conv kernel ``[..., c_out, c_in, k, ..., k] -> [...]``."""
    check_rep_pair(rep_in, rep_out)
    g = _elements(rep_in.group, num_samples, elements, generator)
    return conv_orbit_defects(weight, rep_in, rep_out, g, kernel_space=kernel_space).mean(0)


def samples_for_relative_error(defects: torch.Tensor, exact: float, rel_err: float = 0.01) -> dict:
    """The number of samples ``K`` for which the K-sample mean of ``defects`` has relative RMS error
    ``rel_err`` with respect to ``exact`` (= ``2 E_perp``).

    The defects are i.i.d. draws (``[N]``, from :func:`orbit_defects` with Haar-random
    elements); the K-sample mean has variance ``var / K``, so ``K = ceil(var / (rel_err * exact)^2)``.
    Returns ``{"K", "mean", "std", "draws", "rel_bias"}`` (``rel_bias``: ``(mean - exact) / exact``,
    which should be ``O(std / (sqrt(N) exact))``). ``K`` does not depend on the size of the
    energy, only on how it is spread over the irrep blocks.
    """
    d = torch.as_tensor(defects, dtype=torch.float64).reshape(-1)
    if d.numel() < 2:
        raise ValueError("need at least 2 draws to estimate the variance")
    if not exact > 0:
        raise ValueError(f"exact (2 E_perp) must be > 0, got {exact}")
    if not rel_err > 0:
        raise ValueError(f"rel_err must be > 0, got {rel_err}")
    std = float(d.std())
    return {"K": max(1, math.ceil((std / (rel_err * exact)) ** 2)), "mean": float(d.mean()), "std": std,
            "draws": int(d.numel()), "rel_bias": (float(d.mean()) - exact) / exact}


# ---------------------------------------------------------------------------------------
# Data-level sample-based penalty
# ---------------------------------------------------------------------------------------
def rep_action(rep: Rep) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``act(g, x) = rho(g) x`` on the last axis of ``x`` ``[..., rep.dim]`` (features last), for one
    element ``g`` ``[d, d]``. For fields on a grid use ``lambda g, x: equiproj.grid.act(x, g, rep)``."""
    if not isinstance(rep, Rep):
        raise TypeError(f"rep must be an equiproj Rep, got {type(rep).__name__}")

    def act(g, x):
        if x.shape[-1] != rep.dim:
            raise ValueError(f"last axis of x has size {x.shape[-1]} but rep.dim = {rep.dim}")
        return x @ rep.matrix(g).to(device=x.device, dtype=x.dtype).T

    return act


def sampled_data_penalty(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, group: Group, *,
                         act_in, act_out, num_samples: int = 1, generator: torch.Generator | None = None,
                         fx: torch.Tensor | None = None, elements: torch.Tensor | None = None) -> torch.Tensor:
    """The data-level (augmentation) penalty ``E_x E_g ||f(g·x) - g·f(x)||^2`` with ``K`` sampled ``g``.

    Args:
        model: ``f``, any differentiable callable on a batch ``x [B, ...]``.
        x: the input batch.
        group: the group that the elements are drawn from (Haar).
        act_in, act_out: how an element acts on inputs and outputs: a :class:`Rep` (features on
            the last axis, see :func:`rep_action`) or a callable ``(g [d, d], tensor) -> tensor``.
        num_samples: ``K``; each sample costs one extra forward pass of ``f`` (and its backward).
        fx: ``f(x)`` if already computed by the task loss (saves one forward pass).
        elements: ``[K, d, d]`` fixed elements instead of sampling.
    Returns:
        A scalar: the mean over samples and batch of the squared norm per example.
    """
    if not isinstance(group, Group):
        raise TypeError(f"group must be an equiproj Group, got {type(group).__name__}")
    act_in = rep_action(act_in) if isinstance(act_in, Rep) else act_in
    act_out = rep_action(act_out) if isinstance(act_out, Rep) else act_out
    if not callable(act_in) or not callable(act_out):
        raise TypeError("act_in and act_out must be Reps or callables (g, x) -> g·x")
    g = _elements(group, num_samples, elements, generator)
    fx = model(x) if fx is None else fx
    total = 0.0
    for k in range(len(g)):
        diff = model(act_in(g[k], x)) - act_out(g[k], fx)
        total = total + diff.square().flatten(1).sum(1).mean()
    return total / len(g)


# ---------------------------------------------------------------------------------------
# Dense projector
# ---------------------------------------------------------------------------------------
class DenseProjector:
    """The dense approach: an orthonormal basis ``Q`` ``[m n, D]`` of the equivariant subspace of
    ``vec(W)`` (row-major), ``P(W) = Q Q^T vec(W)``.

    Args:
        rep_in, rep_out: the layer (``W`` is ``[rep_out.dim, rep_in.dim]``); for a conv kernel on
            an exact grid pass ``rep_in @ equiproj.grid.kernel_rep(G, k)`` and the kernel
            flattened to ``[c_out, c_in * k^s]``.
        method: ``"nullspace"``: the common null space of ``vec(W) -> vec(rho_out(h) W rho_in(h)^T
            - W)`` over the group's generators ``h`` (eigen-decomposition of the ``mn x mn``
            normal matrix, float64; uses only ``rep.matrix``, independent of the irrep
            decomposition; ``m n <= MAX_NULLSPACE_DIM``). ``"irreps"``: the basis assembled from
            each rep's change of basis and the irreps' commutants
            (``vec(Q_out[:, i] C_s Q_in[:, j]^T)``), orthonormal by construction, so no QR: the
            cheapest possible build (a lower bound on the dense approach's build time).
            ``"auto"``: ``"nullspace"`` when ``m n <= 2048``, else ``"irreps"``.
        dtype, device: of ``Q``.
        max_bytes: refuse (``MemoryError``) to build a ``Q`` larger than this.

    Attributes: ``Q``, ``method``, ``build_seconds``, ``nbytes`` (of ``Q``).
    """

    MAX_NULLSPACE_DIM = 4096

    def __init__(self, rep_in: Rep, rep_out: Rep, *, method: str = "auto", dtype: torch.dtype = torch.float32,
                 device=None, max_bytes: int | None = None):
        check_rep_pair(rep_in, rep_out)
        if method not in ("auto", "nullspace", "irreps"):
            raise ValueError(f"method must be 'auto', 'nullspace' or 'irreps', got {method!r}")
        self.rep_in, self.rep_out = rep_in, rep_out
        N, D = self.size(rep_in, rep_out)
        nbytes = N * D * torch.empty(0, dtype=dtype).element_size()
        if max_bytes is not None and nbytes > max_bytes:
            raise MemoryError(f"the dense basis would be [{N}, {D}] = {nbytes / 2**30:.2f} GiB (limit "
                              f"{max_bytes / 2**30:.2f} GiB)")
        if method == "auto":
            method = "nullspace" if N <= 2048 else "irreps"
        t0 = time.perf_counter()
        if method == "nullspace":
            Q = self._nullspace().to(device=device, dtype=dtype)
        else:
            Q = self._irreps(dtype, device)
        self.Q = Q
        self.method = method
        self.build_seconds = time.perf_counter() - t0
        self.nbytes = Q.numel() * Q.element_size()

    @staticmethod
    def size(rep_in: Rep, rep_out: Rep) -> tuple[int, int]:
        """``(m n, D)`` with ``D = dim Hom_G(rep_in, rep_out)``, without building anything."""
        mi, mo = dict(rep_in.irreps), dict(rep_out.irreps)
        D = sum(mo[s] * mi[s] * ({"real": 1, "complex": 2, "quaternionic": 4}[s.type]) for s in mo if s in mi)
        return rep_out.dim * rep_in.dim, D

    def _nullspace(self) -> torch.Tensor:
        m, n = self.rep_out.dim, self.rep_in.dim
        N = m * n
        if N > self.MAX_NULLSPACE_DIM:
            raise ValueError(f"m n = {N} is too large for method='nullspace' (max {self.MAX_NULLSPACE_DIM}); "
                             "use method='irreps'")
        gens = self.rep_in.group.generators()
        S = torch.zeros(N, N, dtype=torch.float64)
        eye = torch.eye(N, dtype=torch.float64)
        for a, b in zip(self.rep_out.matrix(gens), self.rep_in.matrix(gens)):
            T = torch.kron(a, b) - eye  # row-major vec(a W b^T) = (a ⊗ b) vec(W)
            S += T.T @ T
        lam, V = torch.linalg.eigh(S)
        null = lam < 1e-9 * len(gens)
        if (~null).any() and not float(lam[~null][0]) > 1e-5:
            raise RuntimeError(f"the null space is not separated from the rest of the spectrum "
                               f"(smallest non-null eigenvalue {float(lam[~null][0]):.1e})")
        return V[:, null]

    def _irreps(self, dtype, device) -> torch.Tensor:
        ro, ri = self.rep_out, self.rep_in
        Qo = ro.change_of_basis.to(device=device, dtype=dtype)
        Qi = ri.change_of_basis.to(device=device, dtype=dtype)

        def offsets(rep):  # columns of each irrep's copies in change_of_basis order
            out, o = {}, 0
            for ir, mult in rep.irreps:
                out[ir] = (o, mult)
                o += mult * ir.dim
            return out

        oo, oi = offsets(ro), offsets(ri)
        m, n = ro.dim, ri.dim
        N, D = self.size(ri, ro)
        Q = torch.empty(m, n, D, dtype=dtype, device=device)
        col = 0
        for s, (ao, mo) in oo.items():
            if s not in oi:
                continue
            ai, mi = oi[s]
            d = s.dim
            C = s.endomorphism_basis.to(device=device, dtype=dtype)  # [r, d, d]
            Ui = Qi[:, ai : ai + mi * d].reshape(n, mi, d)
            for i in range(mo):  # one output copy at a time bounds the temporaries
                Uo = Qo[:, ao + i * d : ao + (i + 1) * d]  # [m, d]
                blk = torch.einsum("pa,sab,qjb->pqjs", Uo, C, Ui)  # [m, n, mi, r]
                Q[:, :, col : col + blk.shape[2] * blk.shape[3]] = blk.flatten(2)
                col += blk.shape[2] * blk.shape[3]
        return Q.reshape(N, D)

    def _flat(self, W: torch.Tensor) -> torch.Tensor:
        _float(W, "W")
        m, n = self.rep_out.dim, self.rep_in.dim
        if W.dim() < 2 or tuple(W.shape[-2:]) != (m, n):
            raise ValueError(f"W must have shape [..., {m}, {n}], got {tuple(W.shape)}")
        return W.to(self.Q.dtype).reshape(W.shape[:-2] + (m * n,))

    def energies(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)`` of ``W [..., m, n]``, each ``[...]`` in ``Q``'s dtype (residual form)."""
        w = self._flat(W)
        c = w @ self.Q
        return (w - c @ self.Q.T).square().sum(-1), c.square().sum(-1)

    def project(self, W: torch.Tensor, which: str = "equivariant") -> torch.Tensor:
        """``P(W)`` (or ``W - P(W)``), same shape as ``W``, in ``Q``'s dtype."""
        w = self._flat(W)
        p = (w @ self.Q) @ self.Q.T
        if which not in ("equivariant", "non_equivariant"):
            raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")
        return (w - p if which == "non_equivariant" else p).reshape(W.shape)


# ---------------------------------------------------------------------------------------
# The pure-torch spectral path and torch.compile of it
# ---------------------------------------------------------------------------------------
def torch_energies(W: torch.Tensor, rep_in: Rep, rep_out: Rep) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G)`` by the pure-torch spectral path (``equiproj.energies(..., backend="torch")``)."""
    return _energies(W, rep_in, rep_out, backend="torch")


def compiled_energies(rep_in: Rep, rep_out: Rep, **compile_kwargs) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``torch.compile`` of :func:`torch_energies` for one (rep_in, rep_out) pair: ``W -> (E_perp, E_G)``.

    The arguments are checked and the plan is looked up eagerly; only the tensor code (the
    pure-torch twin's tile projections and reductions) is compiled. The first call for a new
    shape, dtype or device compiles (seconds to minutes on a CPU); ``compile_kwargs`` go to
    ``torch.compile``.
    """
    check_rep_pair(rep_in, rep_out)
    compiled: dict = {}

    def fn(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_arguments(W, rep_in, rep_out)
        P = plan_for(rep_in, rep_out, W.device, torch.float64)
        if W.device not in compiled:
            def inner(X):
                (e_perp,), (e_g,), _ = torch_fused_energies([X], [P])
                return e_perp, e_g

            compiled[W.device] = torch.compile(inner, **compile_kwargs)
        return compiled[W.device](W)

    return fn
