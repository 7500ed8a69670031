"""The projection onto a steerable kernel space between regular fields, in closed form (docs/math.md §6).

For the regular field of a finite group (``N = |G|`` points, ``rho(g) e_z = e_{g z}``) an
equivariant coefficient map is fixed by one row, ``h[x, y] = S(x) h[e, x^-1 y]`` (``S`` the action
on the band), so with ``Phi_x = Phi S(x)`` one per element:

    t[z]  = sum_x K[x, x z] Phi_x        the band coefficients folded along the orbits
    h0[z] = Mbar^-1 t[z],  Mbar = sum_x Phi_x^T Phi_x
    P K[x, x z] = Phi_x h0[z],  E_G = sum_z <t[z], h0[z]>

No change of basis into irreps and no intermediate leaves a tile (one copy pair, ``N x N x k^s``):
the C++ kernel ``equiproj_cpu::regular_band_pass`` reads the tile, folds it into ``t`` (``N x D``
numbers), and reads it again while it writes ``P K``'s residual, its energy and the gradient
(into a fresh tensor, added into ``.grad``, or into the weight itself for the decoupled step).
Rows whose ``Phi_x`` are pixel permutations of one another (``x = h x0`` with ``h`` mapping the grid
onto itself: the rotations by 90 degrees in C8 and C16) form classes: the fold adds a class's rows
with their pixels permuted before one band product, and the expansion reads one product through the
permutations (:func:`_grid_classes`, the index table ``idx``). Flops per weight: ``4 D / |class|``
(the two band products; ``D`` = 11 of 25 pixels at k = 5 in 2-D) plus ``2 D^2 / (N k^s)`` for the
solve and ~7 for the class adds, the residual, the energies and the update: 19 for C8 and C16 at
k = 5. The float32 kernel runs eight tiles per vector lane (docs/math.md §6).
"""

from __future__ import annotations

import torch

from .. import ops as _ops
from .._caches import bytes_cached
from ..groups import Rep

__all__ = ["RegularBand", "regular_band"]

#: the largest group order of the closed form (its table of products is ``N^2`` int64)
MAX_ORDER = 1024
#: the kernel keeps the band coefficients of a tile in at most four 8-wide vectors
MAX_BAND = 32


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    out = x.new_zeros(x.shape[:-1] + (width,))
    out[..., : x.shape[-1]] = x
    return out


class RegularBand:
    """The tables of the closed form for one (space, rep_in, rep_out) whose fields are all the group's
    regular field, in their own order: ``mult [N, N]`` (column of ``x z``), ``phi [N, P, D]``
    (``Phi_x``), ``minv [D, D]`` (``Mbar^-1``), float64; :meth:`run` on the CPU extension."""

    def __init__(self, space, N: int):
        G = space.group
        els = G.elements()
        self.space, self.N = space, N
        self.mult = G.regular_table().contiguous()  # row x: the column of x z for each z
        S = space.rep.matrix(els)  # [N, D, D]
        Phi = space.sampled
        self.phi = torch.einsum("pd,xde->xpe", Phi, S).contiguous()
        Mbar = torch.einsum("xpd,xpe->de", self.phi, self.phi)
        lam = torch.linalg.eigvalsh(Mbar)
        if not lam[0] > 1e-10 * lam[-1]:  # Mbar is N times the group average of Phi^T Phi: never singular
            raise RuntimeError(f"{space}: the averaged Gram matrix of the band is singular")
        self.minv = torch.linalg.inv(Mbar)
        self.minv = 0.5 * (self.minv + self.minv.T)
        D, P = space.dim, space.num_pixels
        self.rows, self.classes, self.reps, self.idx = _grid_classes(self.phi, self.mult)
        #: the largest number of rows whose band products are done once (the grid's symmetries in G)
        self.class_size = int((self.classes[1:] - self.classes[:-1]).max())
        fold = 4 * D / (N / len(self.reps))  # the two band products, on one row of each class
        self.flops_per_weight = fold + 2 * D * D / (N * P) + 7

    def __repr__(self):
        return (f"RegularBand(N={self.N}, {len(self.reps)} classes of rows, "
                f"{self.flops_per_weight:.0f} flops/weight)")

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(mult, phi [N, P, Dp], phiT [N, D, Pp], minv [D, Dp])`` in vectors of 8, in ``dtype`` (cached): the
        columns of ``phi`` and ``minv`` zero-padded, the pixels of ``phiT`` in vectors from ``min(8 v, P - 8)``."""
        return _tables(self, dtype)

    def _classes(self, lanes: bool) -> tuple[torch.Tensor, ...]:
        if lanes and self.idx is not None:
            return self.rows, self.classes, self.reps, self.idx
        return self.rows, self.classes, self.reps, _NO_INDEX

    def runner(self, K: torch.Tensor, plain: bool = False, lanes: bool = True):
        """The kernel on ``K`` (``[B, m, n, P]``, contiguous, on the CPU) with its tables bound:
        ``run(lambda_perp, lambda_G, out, write) -> (E_perp [B], E_G [B])`` (float64), the lambdas float64
        ``[B]``, ``write`` 0 (energies only, ``out`` ``None``), 1 (the gradient written into ``out``) or 2
        (added into ``out``); ``out`` has K's shape and dtype and may be ``K`` itself. Bound once, a call
        is the op's alone (the penalty's prepared program calls it every step)."""
        compute = torch.float64 if K.dtype == torch.float64 else torch.float32
        mult, phi, phiT, minv = self.tables(compute)
        classes = self._classes(lanes)
        op = torch.ops.equiproj_cpu.regular_band_pass

        def run(lambda_perp, lambda_G, out, write):
            return op(K, mult, phi, phiT, minv, lambda_perp, lambda_G, out, write, plain, *classes)

        return run

    def run(self, K: torch.Tensor, lambda_perp=None, lambda_G=None, out: torch.Tensor | None = None,
            plain: bool = False, lanes: bool = True):
        """``(E_perp [batch], E_G [batch], grad or out or None)`` of ``K`` ``[..., m, n, P]`` (CPU, any float
        dtype): the gradient ``2 lambda_perp (K - P K) + 2 lambda_G P K`` written into a fresh tensor
        (``out=None``) or added into ``out`` (K's shape; it may be ``K`` itself: the decoupled step in
        place). ``plain=True`` runs the kernel's plain loop instead of its AVX2 one, ``lanes=False`` its
        AVX2 loop over one tile at a time instead of eight (tests)."""
        if K.device.type != "cpu" or not kernel_available():
            raise RuntimeError("the closed form of regular fields runs in the C++ extension on CPU tensors: "
                               "use FactorisedPlan.run, which takes the factorised transforms elsewhere")
        batch, (m, n, P) = K.shape[:-3], K.shape[-3:]
        B = 1
        for s in batch:
            B *= s
        Kc = K.reshape(B, m, n, P)
        if not Kc.is_contiguous():
            Kc = Kc.contiguous()
        run = self.runner(Kc, plain, lanes)
        energy_dtype = _ops.accumulation_dtype(K.dtype)
        if lambda_perp is None:
            z = torch.zeros(B, dtype=torch.float64)
            ep, eg = run(z, z, None, 0)
            return ep.view(batch).to(energy_dtype), eg.view(batch).to(energy_dtype), None
        lp, lg = _per_item(lambda_perp, batch, B), _per_item(lambda_G, batch, B)
        target, mode = None, 1
        if out is not None:
            o = out.reshape(B, m, n, P) if out.is_contiguous() else None
            aliased = out.data_ptr() == K.data_ptr()
            if (o is not None and out.dtype == K.dtype and out.shape == K.shape
                    and (not aliased or Kc.data_ptr() == K.data_ptr())):
                target, mode = o, 2
        fresh = target is None
        if fresh:
            target = torch.empty_like(Kc)
        ep, eg = run(lp, lg, target, mode)
        ep, eg = ep.view(batch).to(energy_dtype), eg.view(batch).to(energy_dtype)
        if out is None:
            return ep, eg, target.view(K.shape)
        if fresh:
            out.add_(target.view(out.shape).to(out.dtype))
        return ep, eg, out


_NO_INDEX = torch.empty(0, dtype=torch.int32)


def _grid_classes(phi: torch.Tensor, mult: torch.Tensor, force_index: bool = False):
    """The rows of a tile in classes whose ``Phi_x`` are pixel permutations of the class representative's
    ``Phi_x0`` (``Phi_x[p] = Phi_x0[pi_x(p)]``: ``x = h x0`` with ``h`` an element that maps the grid onto
    itself, such as the rotations by 90 degrees in C8). Returns ``rows [N]`` (grouped by class),
    ``classes [C + 1]`` (class ``c`` is ``rows[classes[c]: classes[c + 1]]``), ``reps [C]`` and ``idx [N, N P]``
    int32 with ``idx[x, y P + p] = z P + pi_x(p)``, ``x z = y``; ``idx`` is ``None`` where ``N P`` is not a
    multiple of 8 (the kernel then takes the tiles one at a time) unless ``force_index``."""
    N, P, _ = phi.shape
    tol = 1e-9 * float(phi.abs().max())

    def permutation(a: torch.Tensor, b: torch.Tensor):  # pi with a[p] = b[pi(p)], or None
        dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
        best, pi = dist.min(1)
        return pi if float(best.max()) <= tol else None

    grid = [h for h in range(N) if permutation(phi[h], phi[0]) is not None]  # elements acting on the grid
    pis, rows, classes, reps = [None] * N, [], [0], []
    for x0 in range(N):
        if pis[x0] is not None:
            continue
        reps.append(x0)
        for h in grid:
            x = int(mult[h, x0])
            if pis[x] is None:
                pi = permutation(phi[x], phi[x0])
                if pi is not None:  # checked, not assumed from the group's product convention
                    pis[x] = pi
                    rows.append(x)
        if pis[x0] is None:  # x0 is in its own class whatever the table says
            pis[x0] = torch.arange(P)
            rows.append(x0)
        classes.append(len(rows))
    zinv = torch.empty(N, N, dtype=torch.long)  # zinv[x, y] = z with x z = y
    zinv.scatter_(1, mult, torch.arange(N).expand(N, N))
    pi = torch.stack(pis)  # [N, P]
    idx = (zinv[:, :, None] * P + pi[:, None, :]).reshape(N, N * P)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    index = idx.to(torch.int32).contiguous() if (N * P) % 8 == 0 or force_index else None
    return as_long(rows), as_long(classes), as_long(reps), index


def _per_item(c, batch, B) -> torch.Tensor:
    """A coefficient (number, or tensor of the batch shape) as ``[B]`` float64."""
    t = torch.as_tensor(c, dtype=torch.float64).detach().cpu()
    return t.expand(batch).reshape(B).contiguous()


def _regular_order(rep: Rep) -> int | None:
    """``|G|`` when every field of ``rep`` is the group's regular field and ``rep`` is in its own order."""
    if rep.perm is not None and not torch.equal(rep.perm, torch.arange(rep.dim)):
        return None
    for _, f in rep.segments:
        act = f.permutation
        if act is None or not act.regular or act.group != rep.group:
            return None
    return rep.group.order


def regular_band(space, rep_in: Rep, rep_out: Rep) -> RegularBand | None:
    """The closed form of a layer, or ``None`` where it does not apply (a field that is not the regular
    field, a permuted rep, a group above :data:`MAX_ORDER`, a band above :data:`MAX_BAND`)."""
    if not space.group.is_finite or space.dim > MAX_BAND:
        return None
    n_in, n_out = _regular_order(rep_in), _regular_order(rep_out)
    if n_in is None or n_in != n_out or n_in > MAX_ORDER:
        return None
    return _regular_band(space, n_in)


@bytes_cached("equiproj.kernel_spaces._regular_band._regular_band")
def _regular_band(space, N: int) -> RegularBand:
    return RegularBand(space, N)


def kernel_available() -> bool:
    """Whether the C++ extension with ``regular_band_pass`` is loaded."""
    return _ops.cpp_available() and hasattr(torch.ops.equiproj_cpu, "regular_band_pass")


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._regular_band._tables")
def _tables(plan: RegularBand, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    N, P, D = plan.phi.shape
    Dp, Pp = -(-D // 8) * 8, -(-P // 8) * 8
    phi = _pad(plan.phi, Dp).to(dtype).contiguous()
    phiT = plan.phi.transpose(1, 2)  # [N, D, P]
    if P >= 8:  # vector v holds the pixels from min(8 v, P - 8): the last one overlaps, none is partial
        cols = torch.cat([torch.arange(min(8 * v, P - 8), min(8 * v, P - 8) + 8) for v in range(Pp // 8)])
        phiT = phiT[..., cols].to(dtype).contiguous()
    else:
        phiT = _pad(phiT, Pp).to(dtype).contiguous()
    minv = _pad(plan.minv, Dp).to(dtype).contiguous()
    return plan.mult, phi, phiT, minv
