"""The fuzz suite's oracle, its tolerances and its record of the errors seen.

The oracle never uses the library's block plan (no irrep decomposition, no Clebsch-Gordan
blocks, no Haar quadrature of the groups): it evaluates the representations directly with
``rep.matrix(g)`` and projects in float64 by

* finite groups: the element average ``P(W) = mean_g rho_out(g)^T W rho_in(g)`` over ``elements()``;
* SO(2) / O(2): the same average over a trapezoid rule in the angle with ``M = b_out + b_in + 2``
  points (``b`` the largest frequency of each rep, known from how the rep was built). Every
  entry of ``rho_out(g)^T W rho_in(g)`` is a trigonometric polynomial of frequency at most
  ``b_out + b_in < M``, which the M-point rule integrates exactly;
* SO(3) / O(3): the orthogonal projection onto the null space of the intertwining constraints
  ``rho_out(g) X = X rho_in(g)`` at two Haar-random rotations (plus ``-I`` for O(3)), i.e. of
  ``[rho_out(g) ⊗ I - I ⊗ rho_in(g)^T] vec(X) = 0`` (row-major vec), found by an SVD in float64.
  Two generic rotations generate a dense subgroup, so their intertwiners are exactly the
  SO(3)-equivariant maps; the SVD must show a clear gap between the null singular values
  (< 1e-9) and the rest (> 1e-4), otherwise other rotations are drawn.

Tolerances (``|x - x_ref| <= tol``; ``eps`` is the unit roundoff of the arithmetic the backend
computes in, ``||W||`` the Frobenius norm of one matrix):

* energies: ``rtol E_ref + 2 d sqrt(E_ref) + d^2`` with ``d = C_ENERGY eps ||W||``. The library
  forms ``R = W - P W`` (and ``P W``) with elementwise errors of order ``eps ||W||``, so an
  energy ``||R||^2`` is off by ``2 ||R|| ||dR|| + ||dR||^2``: the second and third terms. That is
  what keeps nearly equivariant weights (E_perp / ||W||^2 = 1e-8: relative error of E_perp
  about ``eps * 1e4``) and exactly equivariant ones (E_perp = 0 up to ``d^2``) in range. ``rtol``
  is the precision the result is stored in: 1e-9 for float64 weights, 1e-5 for float32, float16
  and bfloat16 weights (energies are float32 for those).
* half-precision weights are compared with the oracle on the rounded weights (the exact tensor
  the library sees, upcast to float64): the weight rounding of ~2^-8 relative is then not an
  error of the library, and the energies must agree to float32 accuracy, not to the ~1e-2 of
  ||W||^2 that a comparison with unrounded weights would need.
* gradients and projections (elementwise): ``rtol_out |g_ref| + 2 (|lambda_perp| + |lambda_G|) C_GRAD eps ||W||
  + subnormal spacing``, with ``rtol_out`` 1e-9 / 1e-5 for float64 / float32 results and one
  unit in the last place for float16 (2^-10) / bfloat16 (2^-7) results (the gradient is rounded
  once to the weight dtype; bfloat16 via float32 may truncate). The expected gradients use the
  lambdas as the library takes them (``ops.as_coefficient``: float32 unless W is float64), since
  the two terms of ``2 lambda_perp R + 2 lambda_G P W`` can cancel at an element.

``eps`` per backend: ``"cpp"`` computes every tile in float64 whatever the weight dtype
(2^-52); ``"torch"`` and ``project`` in the accumulation dtype (float64 for float64 weights,
else float32: 2^-23); ``"reference"`` in float64; the Triton kernel in float32.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import zlib

import scipy.linalg
import torch

#: multiples of eps * ||W|| bounding the elementwise error of R = W - P W (energies) and of the gradient
C_ENERGY = 32.0
C_GRAD = 32.0

EPS64 = 2.0**-52
EPS32 = 2.0**-23
#: relative precision of a result stored in each dtype (the spec's 1e-9 / 1e-5; one ulp for half types)
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# ---- the oracle ---------------------------------------------------------------------------
_F = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)


def _rotations_2d(M: int) -> torch.Tensor:
    t = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _haar_rotations_3d(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` Haar-random rotations: QR of Gaussian matrices, signs fixed, det made +1."""
    A = torch.randn(n, 3, 3, dtype=torch.float64, generator=gen)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    return Q * torch.linalg.det(Q)[:, None, None]


class Projector:
    """``P`` on ``[..., m, n]`` float64 tensors, built once per rep pair."""

    def __init__(self, average=None, null_basis=None, shape=None):
        self._avg = average  # (Ro [P, m, m], W-weights [P], Ri [P, n, n])
        self._null = null_basis  # [k, m * n] orthonormal rows
        self.shape = shape

    @property
    def equivariant_dim(self) -> int | None:
        return None if self._null is None else self._null.shape[0]

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        W = W.to(torch.float64)
        if self._avg is not None:
            Ro, w, Ri = self._avg
            return torch.einsum("p,pai,...ab,pbj->...ij", w, Ro, W, Ri)
        m, n = self.shape
        v = W.reshape(W.shape[:-2] + (m * n,))
        return ((v @ self._null.T) @ self._null).reshape(W.shape)


def projector(group, rep_in, rep_out, band_in: int, band_out: int) -> Projector:
    """The oracle projection onto maps ``rep_in -> rep_out`` that commute with ``group``
    (``band_*``: the largest frequency of each rep, for SO(2) / O(2))."""
    m, n = rep_out.dim, rep_in.dim
    name = type(group).__name__
    if group.is_finite:
        g = group.elements()
        w = torch.full((len(g),), 1.0 / len(g), dtype=torch.float64)
        return Projector(average=(rep_out.matrix(g), w, rep_in.matrix(g)), shape=(m, n))
    if name in ("SO2", "O2"):
        M = band_in + band_out + 2
        g = _rotations_2d(M)
        if name == "O2":
            g = torch.cat([g, g @ _F])
        w = torch.full((len(g),), 1.0 / len(g), dtype=torch.float64)
        return Projector(average=(rep_out.matrix(g), w, rep_in.matrix(g)), shape=(m, n))
    if name in ("SO3", "O3"):
        return Projector(null_basis=_null_space_basis(group, rep_in, rep_out), shape=(m, n))
    raise TypeError(f"no oracle for {group}")


def _null_space_basis(group, rep_in, rep_out) -> torch.Tensor:
    m, n = rep_out.dim, rep_in.dim
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rep_in!r}|{rep_out!r}|{m}|{n}".encode()))
    Im, In = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    for count in (2, 3, 4):
        g = _haar_rotations_3d(count, gen)
        if type(group).__name__ == "O3":
            g = torch.cat([g, -torch.eye(3, dtype=torch.float64)[None]])
        Ro, Ri = rep_out.matrix(g), rep_in.matrix(g)
        # rows (p, a, b) and columns (c, d) of rho_out(g_p)[a, c] delta_bd - delta_ac rho_in(g_p)[d, b]
        A = (torch.einsum("pac,bd->pabcd", Ro, In) - torch.einsum("ac,pdb->pabcd", Im, Ri)).reshape(-1, m * n)
        try:
            _, S, Vh = torch.linalg.svd(A, full_matrices=False)
        except torch.linalg.LinAlgError:  # gesdd may not converge on many repeated singular values (-I of O(3))
            _, S, Vh = (torch.from_numpy(x) for x in scipy.linalg.svd(A.numpy(), full_matrices=False,
                                                                     lapack_driver="gesvd"))
        k = int((S > 1e-9).sum())
        if k == 0 or float(S[k - 1]) > 1e-4:  # a clear gap below the smallest nonzero singular value
            return Vh[k:]
    raise AssertionError(f"oracle: no clear null space for {rep_in!r} -> {rep_out!r} (singular values {S.tolist()})")


@functools.lru_cache(maxsize=64)
def cached_projector(group, rep_in, rep_out, band_in: int, band_out: int) -> Projector:
    return projector(group, rep_in, rep_out, band_in, band_out)


# ---- tolerances ---------------------------------------------------------------------------
def compute_eps(backend: str, dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic ``backend`` computes in for weights of ``dtype``."""
    if backend in ("cpp", "auto", "reference"):
        return EPS64
    if backend in ("torch", "project"):
        return EPS64 if dtype == torch.float64 else EPS32
    if backend == "triton":
        return EPS32
    raise ValueError(backend)


def energy_rtol(dtype: torch.dtype) -> float:
    return RTOL[torch.float64] if dtype == torch.float64 else RTOL[torch.float32]


def _f64(x) -> torch.Tensor:
    return x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def check_energy(E, E_ref, W, *, backend, what, regime):
    """Assert ``E`` (any shape, matching ``E_ref``) is within the energy tolerance; record the errors."""
    rtol = max(energy_rtol(W.dtype), energy_rtol(E.dtype))  # the weight's precision, or the result's if coarser
    E, E_ref = _f64(E), _f64(E_ref)
    assert E.shape == E_ref.shape, f"{what}: shape {tuple(E.shape)} != {tuple(E_ref.shape)}"
    assert torch.isfinite(E).all(), f"{what}: not finite: {E}"
    wnorm = _f64(W).square().sum((-2, -1)).sqrt().expand(E_ref.shape)
    d = C_ENERGY * compute_eps(backend, W.dtype) * wnorm
    tol = rtol * E_ref + 2 * d * E_ref.sqrt() + d * d
    err = (E - E_ref).abs()
    ratio = float((err / tol.clamp_min(1e-300)).max()) if err.numel() else 0.0
    # relative errors of energies that are not ~0; energies below 1e-12 ||W||^2 (exactly equivariant weights,
    # reps without equivariant maps) are recorded as |E - E_ref| / ||W||^2
    w2 = wnorm.square()
    small = E_ref <= 1e-12 * w2
    rel = float((err / E_ref.clamp_min(1e-300))[~small].max()) if (~small).any() else None
    label = _name(W.dtype) + (" (float32 result)" if W.dtype == torch.float64 and rtol > RTOL[torch.float64] else "")
    _record(what, backend, label, regime, rel, ratio, (err / w2.clamp_min(1e-300))[small], "/||W||^2")
    assert (err <= tol).all(), (f"{what} ({backend}, {W.dtype}, {regime}): max error {float(err.max()):.3e} "
                                f"> tolerance (worst error/tolerance {ratio:.3g}); E={E.flatten()[:4].tolist()} "
                                f"E_ref={E_ref.flatten()[:4].tolist()}")
    return rel


def _record(what, backend, dtype, regime, rel, ratio, small_errors, suffix):
    """Record the relative error ``rel`` (``None``: none) and the errors of the quantities too small to be
    relative to (under ``what + suffix``)."""
    key = (backend, dtype if isinstance(dtype, str) else _name(dtype), regime)
    if small_errors.numel():
        RECORD.error((what + suffix,) + key, float(small_errors.max()), ratio)
    if rel is not None:
        RECORD.error((what,) + key, rel, ratio)


def check_matrix(X, X_ref, W, coef_scale, *, backend, what, regime, out_dtype=None):
    """Elementwise check of a gradient / projection ``X`` against ``X_ref`` (float64), ``W`` the weight
    it was computed from, ``coef_scale`` ``|lambda_perp| + |lambda_G|`` per matrix (broadcastable to the batch)."""
    out_dtype = out_dtype or W.dtype
    assert X.dtype == out_dtype, f"{what}: dtype {X.dtype}, expected {out_dtype}"
    assert X.shape == X_ref.shape, f"{what}: shape {tuple(X.shape)} != {tuple(X_ref.shape)}"
    X, X_ref = _f64(X), _f64(X_ref)
    assert torch.isfinite(X).all(), f"{what}: not finite"
    wnorm = _f64(W).square().sum((-2, -1), keepdim=True).sqrt()
    cs = _f64(coef_scale)
    cs = cs.reshape(cs.shape + (1, 1)) if cs.dim() else cs
    info = torch.finfo(out_dtype)
    tol = (RTOL[out_dtype] * X_ref.abs() + 2 * cs * C_GRAD * compute_eps(backend, W.dtype) * wnorm
           + info.smallest_normal * info.eps)
    err = (X - X_ref).abs()
    ratio = float((err / tol.clamp_min(1e-300)).max()) if err.numel() else 0.0
    # normwise relative error where X_ref is neither cancelled (||X_ref|| < 1e-3 |c| ||W||: R of nearly equivariant
    # W times a small lambda, say) nor in the dtype's subnormal range; else ||X - X_ref|| / (|c| ||W||)
    scale = float((cs.expand(wnorm.shape) * wnorm).square().sum().sqrt())
    ref_norm, diff = float(X_ref.square().sum().sqrt()), float((X - X_ref).square().sum().sqrt())
    if ref_norm > 1e-3 * scale and float(X_ref.abs().max()) > 16 * info.smallest_normal:
        rel = diff / ref_norm
        _record(what, backend, W.dtype, regime, rel, ratio, torch.zeros(0), "")
    else:
        rel = diff / scale if scale > 0 else diff
        _record(what, backend, W.dtype, regime, None, ratio, torch.tensor([rel]), "/(|c| ||W||)")
    assert (err <= tol).all(), (f"{what} ({backend}, {W.dtype}, {regime}): max elementwise error "
                                f"{float(err.max()):.3e} beyond tolerance (worst error/tolerance {ratio:.3g}); "
                                f"normwise relative error {rel:.3e}")
    return rel


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- what was seen (EQUIPROJ_FUZZ_REPORT) ---------------------------------------------------
class Record:
    """The largest relative error and error/tolerance per (quantity, backend, dtype, regime), and
    the number of examples and seconds per test."""

    def __init__(self):
        self._lock = threading.Lock()
        self.errors: dict = {}
        self.examples: dict = {}
        self.started = time.time()

    def error(self, key, rel, ratio):
        with self._lock:
            old = self.errors.get(key, (0.0, 0.0, 0))
            self.errors[key] = (max(old[0], rel), max(old[1], ratio), old[2] + 1)

    def example(self, test: str, seconds: float):
        with self._lock:
            n, s = self.examples.get(test, (0, 0.0))
            self.examples[test] = (n + 1, s + seconds)

    def as_json(self) -> dict:
        return {
            "wall_seconds": time.time() - self.started,
            "examples": {k: {"count": n, "seconds": s} for k, (n, s) in sorted(self.examples.items())},
            "errors": [{"quantity": k[0], "backend": k[1], "dtype": k[2], "regime": k[3], "max_relative_error": v[0],
                        "max_error_over_tolerance": v[1], "checks": v[2]} for k, v in sorted(self.errors.items())],
        }


RECORD = Record()
