"""Dense reference for steerable kernel spaces: an orthonormal basis of V, ``Q Q^T w``.

The approach of the paper's 3-D code (escnn's basis of a layer, orthonormalised by QR) and the
benchmark's baseline; also the tests' independent reference (``method="nullspace"`` uses only
``rep.matrix``). Memory grows like ``(c_out c_in k^s)^2``: for small layers only.
"""

from __future__ import annotations

import math
import time

import torch

from .._plan import block_plan
from ..groups import Rep
from ._steerable import SteerableKernelSpace

__all__ = ["DenseKernelBasis"]


class DenseKernelBasis:
    """The dense approach: an orthonormal basis ``Q`` ``[N, D']`` of ``V = span{h Phi^T}``, the sampled
    equivariant kernels of a :class:`~equiproj.kernel_spaces.SteerableKernelSpace`.

    ``N = c_out * c_in * k^s`` (the flattened weight), ``D' = dim Hom_G(rho_in ⊗ sigma, rho_out)``.
    Energies are ``E_perp = ||w - Q Q^T w||^2`` (residual form) and ``E_G = ||Q^T w||^2``.

    Args:
        space, rep_in, rep_out: the layer.
        method: ``"nullspace"``: null space of ``A -> rho_out(h) A (rho_in(h) ⊗ sigma(h))^T - A``
            over the group's generators ``h``, in the coefficient space (uses only
            ``rep.matrix``; independent of the irrep decomposition; float64, coefficient
            dimension ``c_out * c_in * D`` at most 6000); ``"hom"``: the equivariant maps from
            the block plan (irreps, Clebsch-Gordan), fast to build for the benchmark.
            Either way the kernels ``h Phi^T`` (``Phi`` the sampled functions, ``space.sampled``) are
            stacked into ``[N, D']`` and orthonormalised by QR.
        dtype, device: of ``Q`` (float64 on the CPU by default).

    Attributes: ``Q``, ``build_seconds``, ``nbytes``.
    """

    MAX_NULLSPACE_DIM = 6000

    def __init__(self, space: SteerableKernelSpace, rep_in: Rep, rep_out: Rep, method: str = "nullspace",
                 dtype: torch.dtype = torch.float64, device=None):
        if method not in ("nullspace", "hom"):
            raise ValueError(f"method must be 'nullspace' or 'hom', got {method!r}")
        self.space, self.rep_in, self.rep_out = space, rep_in, rep_out
        t0 = time.perf_counter()
        H = self._nullspace() if method == "nullspace" else self._hom()  # [D', m, n*D] float64
        m, n, D = rep_out.dim, rep_in.dim, space.dim
        kernels = H.reshape(-1, m, n, D) @ space.sampled.T  # [D', m, n, P], float64
        Q, _ = torch.linalg.qr(kernels.reshape(len(H), m * n * space.num_pixels).T)  # [N, D']
        self.Q = Q.to(device=device, dtype=dtype)
        self.build_seconds = time.perf_counter() - t0
        self.nbytes = Q.numel() * Q.element_size()

    @staticmethod
    def size(space: SteerableKernelSpace, rep_in: Rep, rep_out: Rep) -> tuple[int, int]:
        """``(N, D')`` without building anything (D' from the block plan)."""
        plan = block_plan(space.coefficient_rep(rep_in), rep_out)
        dprime = sum(plan.out.rows[s].shape[0] * plan.inp.rows[s].shape[0] * plan.bases[s].shape[0] for s in plan.shared)
        return rep_out.dim * rep_in.dim * space.num_pixels, dprime

    def _nullspace(self) -> torch.Tensor:
        m, ni = self.rep_out.dim, self.rep_in.dim * self.space.dim
        M = m * ni
        if M > self.MAX_NULLSPACE_DIM:
            raise ValueError(f"coefficient space of dimension {M} is too large for method='nullspace' "
                             f"(max {self.MAX_NULLSPACE_DIM}); use method='hom'")
        gens = self.space.group.generators()
        Ro = self.rep_out.matrix(gens)
        Ri = torch.einsum("gab,gcd->gacbd", self.rep_in.matrix(gens), self.space.rep.matrix(gens)).reshape(len(gens), ni, ni)
        # row-major vec: vec(Ro A Ri^T) = (Ro ⊗ Ri) vec(A); minimise sum_h ||(T_h - I) a||^2
        # (T - I)^T (T - I) = 2 I - T - T^T for orthogonal T
        S = torch.zeros(M, M, dtype=torch.float64)
        for a, b in zip(Ro, Ri):
            T = torch.kron(a, b)
            S -= T + T.T
        S.diagonal().add_(2.0 * len(Ro))
        lam, V = torch.linalg.eigh(S)
        null = lam < 1e-9 * len(gens)
        gap = float(lam[~null][0]) if (~null).any() else math.inf
        if not gap > 1e-5:
            raise RuntimeError(f"null space is not separated from the rest of the spectrum (gap {gap:.1e})")
        return V[:, null].T.reshape(-1, m, ni)

    def _hom(self) -> torch.Tensor:
        crep, colmap = self.space._layout(self.rep_in)
        plan = block_plan(crep, self.rep_out)
        Qo, Qi = self.rep_out.change_of_basis, crep.change_of_basis

        def offsets(rep):  # column offset and multiplicity of each irrep in change_of_basis
            out, o = {}, 0
            for ir, mult in rep.irreps:
                out[ir] = (o, mult)
                o += mult * ir.dim
            return out

        oo, oi = offsets(self.rep_out), offsets(crep)
        mats = []
        for s in plan.shared:
            (ao, mo), (ai, mi) = oo[s], oi[s]
            d = s.dim
            Uo = Qo[:, ao : ao + mo * d].reshape(-1, mo, d)  # [m, mo, d]
            Ui = Qi[:, ai : ai + mi * d].reshape(-1, mi, d)
            for C in plan.bases[s]:
                mats.append(torch.einsum("pia,ab,qjb->ijpq", Uo, C, Ui).reshape(mo * mi, Qo.shape[0], Qi.shape[0]))
        if not mats:
            return torch.zeros(0, self.rep_out.dim, crep.dim, dtype=torch.float64)
        H = torch.cat(mats)
        if colmap is not None:  # back to the Kronecker columns i * D + d
            H = torch.zeros_like(H).index_copy_(-1, colmap, H)
        return H

    def _flat(self, weight):
        N = self.Q.shape[0]
        if weight.shape[-2 - self.space.spatial_dims:].numel() != N:
            raise ValueError(f"weight has {weight.shape[-2 - self.space.spatial_dims:].numel()} entries per kernel, basis has {N}")
        return weight.to(self.Q.dtype).reshape(weight.shape[: -2 - self.space.spatial_dims] + (N,))

    def energies(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_perp, E_G)``, each ``[...]``, in ``Q``'s dtype."""
        w = self._flat(weight)
        c = w @ self.Q
        return (w - c @ self.Q.T).square().sum(-1), c.square().sum(-1)

    def project(self, weight: torch.Tensor, which: str = "equivariant") -> torch.Tensor:
        w = self._flat(weight)
        p = (w @ self.Q) @ self.Q.T
        out = p if which == "equivariant" else w - p
        return out.reshape(weight.shape).to(weight.dtype)
