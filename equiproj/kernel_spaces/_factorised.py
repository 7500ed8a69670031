"""The projection onto a steerable kernel space by factorised transforms (docs/math.md §6).

``V = (I ⊗ Phi) Hom_G(rho_in ⊗ sigma, rho_out)``. In a tile between copy ``u`` of an output field
and copy ``v`` of an input field, an orthonormal basis of V's part is ``A_s = F_s Phi^T`` with
``F_s`` coefficient maps (``[d_out, d_in, D]``) that are orthonormal in the band's metric
``M = Phi^T Phi``. The projection is therefore

    a = K Phi                         pixels -> band (2 D flops per weight)
    a_hat = Q_out^T a Q_in            each field to its irreps (its own change of basis)
    c = <F, a_hat>, h_hat = c F       per tile between irrep copies: r small (a handful)
    h = Q_out h_hat Q_in^T            back to the fields
    P K = h Phi^T                     band -> pixels (2 D flops per weight)

and ``E_G = ||c||^2`` while ``E_perp = ||K - P K||^2`` is summed from the explicit residual (its
residual form keeps nearly equivariant weights exact). In the irreps coordinates ``F`` is the
equivariant coefficient maps between two irreps, whitened by ``M`` (``F = G^{-1/2} H`` with ``H`` a
Frobenius-orthonormal basis of ``Hom(psi_in ⊗ sigma, psi_out)`` and ``G = H (I ⊗ M) H^T``, ``r x
r``), so no dense per-field-pair basis (``[r, d_out, d_in k^s]``, ``r = 88`` for C8-regular fields at
k = 5) is formed. Everything between the two pixel passes works on the band coefficients, ``D /
k^s`` of the weight (0.44 at k = 5 in 2-D, 0.15 in 3-D).

In the band, only the output field's change of basis is applied to the coefficients: the input
field's is folded into the maps (per output irrep slot, the maps of all its tiles composed with the
input slot's columns of ``Q_in``, :func:`_slot_maps`), so that each output irrep slot is one product
over a contiguous slice of the moved block instead of a rotation, a copy per tile and a rotation back.

On the CPU (float32 or float64 weights, up to 32 band coefficients per pixel row) all of it runs in
one C++ pass per pair of field segments (``equiproj_cpu::factorised_pass``, :meth:`FactorisedPlan.run`):
each tile between a copy of the output field and a copy of the input field is read once, carried
through the five lines above in a few KB of scratch (the maps of every output irrep slot padded and
packed by :func:`_pair_tables_on`), and its residual, energies and gradient are written before the
next; ``out`` may be the weight itself (the decoupled step). Elsewhere the torch twin
(:meth:`FactorisedPlan.project_band` between two products over the whole weight) runs the same
computation: its last pass writes in place, ``out += 2 lambda_perp (K - P K) + 2 lambda_G P K``, which
for ``out`` the weight itself is one matrix product ``K <- beta K + alpha h Phi^T`` over the weight (no
residual, no energy, no other tensor of the weight's size); for a gradient buffer the residual is formed
and summed. Both run in chunks of rows that stay in cache (one product over the whole weight is about
three times slower on the CPU: the thin inner dimension ``D`` leaves the GEMM's blocking out of cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops as _ops
from .._caches import bytes_cached
from ..grid import grid_permutation
from ..groups import Rep
from ..kernels.inputs import accumulation_dtype, autocast_off
from ._pixel_plan import hom_basis
from ._regular_band import _pad, kernel_available, regular_band

__all__ = ["FactorisedPlan", "ParitySplit", "factorised_plan", "factorised_one", "parity_split"]

#: the block kernels' plain loops also for float32 (the tests compare them with the AVX2 kernels)
_PLAIN_BLOCKS = False

#: the float32 block kernels take Phi's split by the grid's reflections (:func:`parity_split`) where it has one
#: and the kernel size is at least ``_SPLIT_MIN_KERNEL_SIZE``. On 3 x 3 (x 3) grids the split's 8 x 8 transposes
#: of the pixel rows cost about what it saves in the band products: measured on one build, the split against
#: the band in the lanes, ``backward()`` for O(2) and SO(3) at k = 3 went from 11 % slower to 10 % faster from
#: run to run; it was 2-7 % faster at k = 5 in 2-D, 14-18 % at k = 7, 20-24 % at k = 9 and 20-30 % for SO(3)
#: and O(3) at k = 5, on one and on two threads.
_PARITY_BLOCKS = True
_SPLIT_MIN_KERNEL_SIZE = 5

#: elements of the ``[rows, k^s]`` weight per chunk of the residual pass and the step (1 MiB of float32:
#: on par with 256 KiB and 4 MiB, a fifth faster than 64 KiB on the 2-D band-limited rows)
_CHUNK_ELEMENTS = 1 << 18


class FactorisedPlan:
    """What the factorised projection of one (space, rep_in, rep_out) needs: the per-field changes of
    basis of both reps and, per pair of irrep types, the whitened equivariant coefficient maps ``F``
    (``[r, d_out * d_in * D]``, float64 on the CPU; :meth:`tiles_on` for a device and dtype).

    Attributes: ``space``, ``rep_in``, ``rep_out``, ``tiles`` (``(out offset, out copies, d_out, out slot
    offset, d_out slot, in offset, in copies, d_in, in slot offset, d_in slot, r)`` per pair of irrep
    slots of two field segments with ``r > 0``),
    ``flops_per_weight`` (estimate, per entry of the kernel), ``basis_bytes`` (float64).
    """

    def __init__(self, space, rep_in: Rep, rep_out: Rep):
        self.space, self.rep_in, self.rep_out = space, rep_in, rep_out
        P, D = space.num_pixels, space.dim
        M = space.sampled.T @ space.sampled
        self._in_fields, self._out_fields = _fields(rep_in), _fields(rep_out)
        self._in_perm, self._out_perm = _moved(rep_in.perm), _moved(rep_out.perm)
        self.tiles, self._maps, self._segment_pairs, self._block_pairs = [], [], [], []
        for seg_out in self._out_fields:
            oo, co, fo, so = seg_out
            for seg_in in self._in_fields:
                oi, ci, fi, si = seg_in
                slots, empty_slots = [], []
                for ob, psi_b in so:
                    for oa, psi_a in si:
                        H = hom_basis(space, psi_a, psi_b)  # [r, d_out, d_in, D], Frobenius-orthonormal
                        r = H.shape[0]
                        if not r:
                            empty_slots.append((ob, psi_b.dim, oa, psi_a.dim))
                            continue
                        self.tiles.append((oo, co, fo.dim, ob, psi_b.dim, oi, ci, fi.dim, oa, psi_a.dim, r))
                        self._maps.append(_whitened(H, M, f"{space.group}, {psi_b.name} <- {psi_a.name}"))
                        slots.append((ob, psi_b.dim, oa, psi_a.dim))
                if slots:
                    self._segment_pairs.append((seg_out, seg_in, slots, empty_slots))
                #: every pair of field segments, and whether any map joins them (the block kernels' order)
                self._block_pairs.append((seg_out, seg_in, bool(slots)))
        m, n = rep_out.dim, rep_in.dim
        band_flops = 0.0
        for (oo, co, fo, _), (oi, ci, fi, _), slots, _ in self._segment_pairs:
            if fo.Q is not None:
                band_flops += 2 * (2 * fo.dim) * co * fo.dim * ci * fi.dim * D
            r_rows = sum(t[-1] * t[4] for t in self.tiles if t[0] == oo and t[5] == oi)
            band_flops += 4 * r_rows * fi.dim * D * co * ci
        # pixels -> band and back, the residual, the band projection (out-field rotations, folded tiles)
        self.flops_per_weight = 4 * D + 2 + band_flops / (m * n * P)
        self.basis_bytes = 8 * sum(F.numel() for F in self._maps)
        #: the closed form between regular fields (``RegularBand``), which :meth:`run` takes on the CPU
        self.regular = regular_band(space, rep_in, rep_out)

    def split_for(self, K: torch.Tensor) -> ParitySplit | None:
        """The :func:`parity_split` that :meth:`run` takes for ``K``: the C++ pass on float32 weights, a kernel
        size of at least ``_SPLIT_MIN_KERNEL_SIZE`` and a grid whose ``Phi`` splits; ``None`` elsewhere."""
        if not (self.runs_blocks(K) and K.dtype == torch.float32 and _PARITY_BLOCKS
                and getattr(self.space, "kernel_size", 0) >= _SPLIT_MIN_KERNEL_SIZE):
            return None
        return parity_split(self.space)

    def split_flops_per_weight(self, K: torch.Tensor) -> float | None:
        """:attr:`flops_per_weight` with the band products split by the grid's reflections, where
        :meth:`run` takes the split for ``K`` (:meth:`split_for`); ``None`` elsewhere."""
        split = self.split_for(K)
        if split is None:
            return None
        return self.flops_per_weight - 4 * self.space.dim + 4 * split.flops_per_pixel_row() / self.space.num_pixels

    def runs_closed_form(self, K: torch.Tensor) -> bool:
        """Whether :meth:`run` takes the closed form of regular fields for ``K`` (the CPU extension, any dtype)."""
        return self.regular is not None and K.device.type == "cpu" and kernel_available()

    def __repr__(self):
        return (f"FactorisedPlan({len(self.tiles)} irrep tiles, {self.flops_per_weight:.0f} flops/weight, "
                f"maps {self.basis_bytes / 1024:.0f} KiB)")

    def tiles_on(self, device, dtype) -> list[torch.Tensor]:
        """The maps ``F`` of :attr:`tiles` on ``device`` in ``dtype``, each ``[r, d_out, d_in, D]`` (cached)."""
        return _maps_on(self, torch.device(device), dtype)

    # ---- the band coefficients, laid out [D, B, m, n] ------------------------------------------
    def project_band(self, a: torch.Tensor, energies: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(h, E_G)``: for band coefficients ``a = (K Phi)`` laid out ``[D, B, m, n]`` (``B`` the batch),
        the coefficients ``h`` of ``P K = h Phi^T`` (same layout) and ``E_G = ||P K||^2`` (``[B]``; ``None``
        with ``energies=False``).

        Per pair of field segments, the block is moved once to ``[B, d_out, d_in, D, copies_out *
        copies_in]`` (one column per copy pair) and rotated into the output field's irreps; then one
        product per output irrep slot with the maps of all its tiles, the input field's change of basis
        folded into them (:func:`_slot_maps`: rows ``[r, d_out slot * d_in * D]``, a contiguous slice of
        the block, so no copy per tile and no rotation of the input side), the same back, and the block
        moves back once."""
        if self._in_perm is not None:
            a = a.index_select(-1, self._in_perm.to(a.device))
        if self._out_perm is not None:
            a = a.index_select(-2, self._out_perm.to(a.device))
        D, B = a.shape[:2]
        covered = len(self._segment_pairs) == len(self._out_fields) * len(self._in_fields)
        h = torch.empty_like(a) if covered else torch.zeros_like(a)
        e_g = a.new_zeros(B) if energies else None
        pairs = _slot_maps_on(self, a.device, a.dtype)
        for ((oo, co, fo, _), (oi, ci, fi, _), _, _), (slot_maps, empty_rows) in zip(self._segment_pairs, pairs):
            do, di, X = fo.dim, fi.dim, co * ci
            Y = a[..., oo: oo + co * do, oi: oi + ci * di].unflatten(-1, (ci, di)).unflatten(-3, (co, do))
            Y = Y.permute(1, 3, 5, 0, 2, 4).reshape(B, do, di * D * X)  # [B, d_out, d_in D X]
            if fo.Q is not None:
                Y = _rotate(_q_on(fo, a.device, a.dtype).T, Y)
            # contiguous: without a rotation Y is the permuted view's reshape, which may keep its strides
            H = torch.empty_like(Y, memory_format=torch.contiguous_format)
            for ob, db in empty_rows:  # output irreps that no input irrep maps to
                H[:, ob: ob + db] = 0
            for ob, db, U in slot_maps:
                Yb = Y[:, ob: ob + db].reshape(B, db * di * D, X)  # a view: whole rows of the block
                Hb = H[:, ob: ob + db].view(B, db * di * D, X)
                if B == 1:
                    c = torch.mm(U, Yb[0])  # [r, X]
                    torch.mm(U.T, c, out=Hb[0])
                else:
                    c = torch.matmul(U, Yb)  # [B, r, X]
                    Hb.copy_(torch.matmul(U.T, c))
                if energies:
                    e_g += c.reshape(B, -1).square().sum(-1)
            if fo.Q is not None:
                H = _rotate(_q_on(fo, a.device, a.dtype), H)
            h[..., oo: oo + co * do, oi: oi + ci * di].unflatten(-1, (ci, di)).unflatten(-3, (co, do)).copy_(
                H.view(B, do, di, D, co, ci).permute(3, 0, 4, 1, 5, 2))
        if self._out_perm is not None:
            h = h.index_select(-2, torch.argsort(self._out_perm).to(h.device))
        if self._in_perm is not None:
            h = h.index_select(-1, torch.argsort(self._in_perm).to(h.device))
        return h, e_g

    # ---- one pass over the weight ----------------------------------------------------------------
    def run(self, K: torch.Tensor, lambda_perp=None, lambda_G=None, out: torch.Tensor | None = None, energies: bool = True):
        """The energies of ``K`` (``[..., m, n, P]``, compute dtype) and, with coefficients, the penalty's
        gradient ``2 lambda_perp (K - P K) + 2 lambda_G P K`` added to ``out`` (``[..., m, n, P]``, contiguous, K's
        dtype; it may be ``K`` itself: then this is the decoupled step in place) or returned in a fresh
        tensor (``out=None``). ``lambda_perp``, ``lambda_G``: numbers or tensors of the batch shape.

        Returns ``(E_perp, E_G, grad or out or None)``; the energies are ``None`` with ``energies=False``
        (the step needs no residual, and the weight is written by one matrix product)."""
        with autocast_off(K.device):  # in K's dtype inside an autocast region too
            if self.runs_closed_form(K):
                ep, eg, g = self.regular.run(K, lambda_perp, lambda_G, out)
                return (ep, eg, g) if energies else (None, None, g)
            if self.runs_blocks(K):
                return self._run_blocks(K, lambda_perp, lambda_G, out, energies)
            return self._run(K, lambda_perp, lambda_G, out, energies)

    def runs_blocks(self, K: torch.Tensor) -> bool:
        """Whether :meth:`run` takes the C++ pass over the blocks of the weight (the CPU extension, float32
        or float64 ``K``, at most 32 band coefficients per pixel row)."""
        return (K.device.type == "cpu" and K.dtype in (torch.float32, torch.float64) and self.space.dim <= 32
                and blocks_available())

    def runner(self, K: torch.Tensor):
        """The C++ pass of :meth:`run` on ``K`` (``[B, m, n, P]``, contiguous, on the CPU) with its tables
        bound, or ``None`` where :meth:`run` takes the torch transforms: ``run(lambda_perp, lambda_G, out,
        write) -> (E_perp [B], E_G [B])`` (float64), the lambdas float64 ``[B]``, ``write`` 0 (energies
        only, ``out`` ``None``), 1 (the gradient written into ``out``) or 2 (added into ``out``); ``out``
        has K's shape and dtype and may be ``K`` itself. Bound once, a call is the ops' alone."""
        if self.runs_closed_form(K):
            return self.regular.runner(K)
        if self.runs_blocks(K):
            return self._blocks_runner(K)
        return None

    def _blocks_runner(self, Kb: torch.Tensor):
        """:meth:`runner` through ``equiproj_cpu::factorised_pass``, one call per pair of field segments."""
        B = Kb.shape[0]
        phi, phiT, rows, cols = _block_tables_on(self, Kb.device, Kb.dtype)
        if self.split_for(Kb) is not None:
            parity, phi_parity = _parity_tables_on(self.space, Kb.device, Kb.dtype)
        else:
            parity, phi_parity = torch.zeros(0, dtype=torch.int64), Kb.new_empty(0)
        pairs = [(_q_on(fo, Kb.device, Kb.dtype) if fo.Q is not None else Kb.new_empty(0), oo, co, fo.dim, oi, ci,
                  fi.dim, slots, maps, maps_t)
                 for (oo, co, fo, _), (oi, ci, fi, _), slots, maps, maps_t in _pair_tables_on(self, Kb.device, Kb.dtype)]
        op = torch.ops.equiproj_cpu.factorised_pass

        def run(lambda_perp, lambda_G, out, write):
            if not pairs:
                return torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
            e_perp = e_g = None
            for q, oo, co, do, oi, ci, di, slots, maps, maps_t in pairs:
                ep, eg = op(Kb, rows, cols, phi, phiT, q, oo, co, do, oi, ci, di, slots, maps, maps_t, parity,
                            phi_parity, lambda_perp, lambda_G, out, write, _PLAIN_BLOCKS)
                e_perp, e_g = (ep, eg) if e_perp is None else (e_perp.add_(ep), e_g.add_(eg))
            return e_perp, e_g

        return run

    def _run_blocks(self, K, lambda_perp, lambda_G, out, energies):
        """:meth:`run` through ``equiproj_cpu::factorised_pass``: per pair of field segments, one pass over
        the blocks of the weight, each read once and carried through the band, the output field's irreps, the
        maps of every output irrep slot and back in a few KB of scratch, with the residual, both energies and
        the gradient written or added (``out`` may be ``K``: every block is read before it is written)."""
        batch, (m, n), P = K.shape[:-3], K.shape[-3:-1], K.shape[-1]
        Kb = K.reshape(-1, m, n, P)
        if not Kb.is_contiguous():
            Kb = Kb.contiguous()
        B = Kb.shape[0]
        write = 0 if lambda_perp is None else 1 if out is None else 2
        lp, lg = _per_item(lambda_perp, batch, B), _per_item(lambda_G, batch, B)
        target = None if write == 0 else torch.empty_like(Kb) if out is None else out.view(B, m, n, P)
        e_perp, e_g = self._blocks_runner(Kb)(lp, lg, target, write)
        if not (energies or lambda_perp is None):
            e_perp = e_g = None
        else:
            e_perp, e_g = e_perp.view(batch).to(K.dtype), e_g.view(batch).to(K.dtype)
        if write == 0:
            return e_perp, e_g, None
        return e_perp, e_g, (target.view(K.shape) if out is None else out)

    def _run(self, K, lambda_perp, lambda_G, out, energies):
        P, D = self.space.num_pixels, self.space.dim
        Phi = _sampled_on(self.space, K.device, K.dtype)
        batch, (m, n) = K.shape[:-3], K.shape[-3:-1]
        rows = K.reshape(-1, P)
        # [D, rows] = Phi^T K^T: the wide orientation is the faster product for a thin Phi
        a = torch.mm(Phi.T, rows.T).view(D, -1, m, n)
        h, e_g = self.project_band(a, energies or lambda_perp is None)
        h_rows = h.reshape(D, -1).T  # [rows, D], a transposed view
        PhiT = Phi.T
        if lambda_perp is None:
            e_perp = _residual_energies(rows, h_rows, PhiT, None, None, None, K.shape)
            return e_perp.view(batch).to(K.dtype), e_g.view(batch), None
        cp = _per_row(lambda_perp, batch, K)
        cg = _per_row(lambda_G, batch, K)
        if out is not None and out.data_ptr() == K.data_ptr() and not energies and cp is None:
            # out = K + 2 lambda_perp (K - P K) + 2 lambda_G P K: one product over the weight, in place, in
            # chunks of rows (one product over the whole weight runs at a third of the speed: the GEMM's
            # blocking of a tall [rows, k^s] output with a thin inner dimension D leaves the cache)
            beta, alpha = 1 + 2 * lambda_perp, 2 * (lambda_G - lambda_perp)
            step = max(1, _CHUNK_ELEMENTS // P)
            for s in range(0, rows.shape[0], step):
                rows[s: s + step].addmm_(h_rows[s: s + step], PhiT, beta=beta, alpha=alpha)
            return None, None, out
        if out is not None and out.data_ptr() == K.data_ptr():  # the residual reads K after the step would write it
            e_perp, e_g, grad = self._run(K, lambda_perp, lambda_G, None, energies)
            out.add_(grad)
            return e_perp, e_g, out
        grad = torch.empty_like(rows) if out is None else None
        target = grad if out is None else out.view(-1, P)
        e_perp = _residual_energies(rows, h_rows, PhiT, target, (lambda_perp, lambda_G, cp, cg), out is None, K.shape)
        e_perp = e_perp.view(batch).to(K.dtype) if energies else None
        return e_perp, (e_g.view(batch) if energies else None), (grad.view(K.shape) if out is None else out)


def _rotate(Q: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Q Y`` for ``Y`` ``[B, d, N]``: one matrix product for a batch of one (a batched product of a
    ``[d, d]`` matrix with a wide ``[1, d, N]`` block measured 1.6x slower on the CPU)."""
    return torch.mm(Q, Y[0]).unsqueeze(0) if Y.shape[0] == 1 else torch.matmul(Q, Y)


def blocks_available() -> bool:
    """Whether the C++ extension with ``factorised_pass`` is loaded."""
    return _ops.cpp_available() and hasattr(torch.ops.equiproj_cpu, "factorised_pass")


def _per_item(c, batch, B: int) -> torch.Tensor:
    """A coefficient (``None``, a number or a tensor of the batch shape) as float64 ``[B]``."""
    if c is None:
        return torch.zeros(B, dtype=torch.float64)
    if isinstance(c, torch.Tensor):
        return c.detach().to(device="cpu", dtype=torch.float64).expand(batch).reshape(B).contiguous()
    return torch.full((B,), float(c), dtype=torch.float64)


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._pair_tables_on")
def _pair_tables_on(plan: FactorisedPlan, device: torch.device, dtype: torch.dtype) -> list:
    """Per pair of field segments (:attr:`FactorisedPlan._block_pairs`): ``(segment out, segment in, slots,
    maps, maps_t)`` for ``factorised_pass``: ``slots [S, 3]`` (output slot offset, its dim, r) and the slots'
    maps ``U [r, L]`` (:func:`_slot_maps`, ``L = d_slot d_in D``) packed with rows zero-padded to a multiple
    of 8, and their transposes ``[L, r]`` packed likewise (empty for a pair that no map joins)."""
    out, maps = [], iter(_slot_maps(plan))
    for seg_out, seg_in, covered in plan._block_pairs:
        slot_maps = next(maps)[0] if covered else []
        table, packed, packed_t = [], [], []
        for ob, db, U in slot_maps:
            r, L = U.shape
            table.append((ob, db, r))
            packed.append(torch.nn.functional.pad(U, (0, -L % 8)).reshape(-1))
            packed_t.append(torch.nn.functional.pad(U.T, (0, -r % 8)).reshape(-1))
        out.append((seg_out, seg_in, torch.tensor(table, dtype=torch.int64, device=device).reshape(-1, 3),
                    _packed(packed, device, dtype), _packed(packed_t, device, dtype)))
    return out


def _narrowed(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 ``table`` for kernels in ``dtype``: below float64, its entries under 1e-14 of its largest
    are set to zero. Those are the rounding residue of entries that vanish exactly (the whitened maps
    hold them down to 1e-39 of their largest, Phi the cosines of right angles; their true entries stay
    above 1e-13): in float32 their products with a weight of typical size are subnormal, and every
    subnormal result costs the CPU a microcode assist (measured: the pass 1.5x slower on weights of
    size 1e-2, 2.2x on 1e-4)."""
    if dtype == torch.float64 or not table.numel():
        return table
    return torch.where(table.abs() <= 1e-14 * table.abs().max(), torch.zeros_like(table), table)


def _packed(parts: list[torch.Tensor], device, dtype) -> torch.Tensor:
    """The flat float64 ``parts`` one after the other (each :func:`_narrowed`), on ``device`` in ``dtype``
    (empty without parts)."""
    flat = torch.cat([_narrowed(p, dtype) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    return flat.to(device=device, dtype=dtype)


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._block_tables_on")
def _block_tables_on(plan: FactorisedPlan, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(Phi [P, Dp], Phi^T [D, Pp], rows [m], cols [n])`` of the block kernels: the sampled basis with its
    columns zero-padded to multiples of 8, and the weight's row and column of each structured index."""
    Phi = plan.space.sampled
    P, D = Phi.shape
    Dp, Pp = -(-D // 8) * 8, -(-P // 8) * 8
    Phi = _narrowed(Phi, dtype)
    phi = _pad(Phi, Dp).to(device=device, dtype=dtype).contiguous()
    phiT = _pad(Phi.T, Pp).to(device=device, dtype=dtype).contiguous()
    m, n = plan.rep_out.dim, plan.rep_in.dim
    rows = plan._out_perm if plan._out_perm is not None else torch.arange(m)
    cols = plan._in_perm if plan._in_perm is not None else torch.arange(n)
    return phi, phiT, rows.to(device=device, dtype=torch.int64).contiguous(), cols.to(device=device,
                                                                                       dtype=torch.int64).contiguous()


@bytes_cached("equiproj.kernel_spaces._factorised.parity_split")
def parity_split(space) -> ParitySplit | None:
    """The split of ``Phi`` by the grid's reflections (:class:`ParitySplit`), or ``None`` where ``space`` has
    no square or cubic grid, or a column of ``Phi`` is neither even nor odd along some axis.

    The reflections ``x_a -> -x_a`` of a centred grid commute; each of them maps a pixel orbit onto itself, so
    the pixels fall into orbits of ``2^L`` pixels (``L`` the number of nonzero coordinates). A column of ``Phi``
    that is even or odd along every axis has a parity class ``c`` (bit ``a`` set: odd along axis ``a``), and
    its values on an orbit are its value on the orbit's first pixel times signs. Hence, with ``z`` the
    unnormalised Walsh-Hadamard transform of the weight on each orbit (``z[o, i] = sum_i' (-1)^{i.i'}
    k[pixel(o, i')]``, bit ``l`` of ``i`` the orbit's ``l``-th reflection),

        a[d] = sum over the slots (o, i) of d's class of z[o, i] Phi[first pixel of o, d]

    and back ``PK`` on an orbit is the same transform of ``w[o, i] = sum over d of the class h[d] Phi[first
    pixel, d]``. Each class is a block of about ``k^s / 2^s`` slots by ``D / 2^s`` coefficients: the two band
    products shrink about ``2^s``-fold, for a butterfly of ``L`` adds per pixel.
    """
    k, s = getattr(space, "kernel_size", None), getattr(space, "spatial_dims", None)
    Phi = getattr(space, "sampled", None)
    if not isinstance(k, int) or s not in (1, 2, 3) or Phi is None or Phi.shape[0] != k**s:
        return None
    Phi = Phi.to(torch.float64)
    P, D = Phi.shape
    reflections = []
    for a in range(s):
        g = torch.eye(s, dtype=torch.float64)
        g[a, a] = -1
        reflections.append(grid_permutation(g, (k,) * s).tolist())
    tol = 1e-9 * float(Phi.abs().max())
    column_class = [0] * D
    for a, sigma in enumerate(reflections):
        moved = Phi[sigma]
        even = ((moved - Phi).abs() <= tol).all(0)
        odd = ((moved + Phi).abs() <= tol).all(0)
        if not bool((even | odd).all()):
            return None
        for d in range(D):
            column_class[d] |= int(bool(odd[d]) and not bool(even[d])) << a
    orbits, seen = [], set()
    for p in range(P):
        if p in seen:
            continue
        active = [a for a in range(s) if reflections[a][p] != p]
        pixels = [p]
        for a in active:
            pixels += [reflections[a][q] for q in pixels]
        seen.update(pixels)
        orbits.append((active, pixels))
    orbits.sort(key=lambda o: -len(o[1]))  # largest first: the pass runs each size with its own butterfly
    order, slot_class, slot_first = [], [], []
    for active, pixels in orbits:
        for i in range(len(pixels)):
            slot_class.append(sum(1 << a for l, a in enumerate(active) if i >> l & 1))
            slot_first.append(pixels[0])
        order += pixels
    classes = []
    for c in range(1 << s):
        slots = [t for t in range(P) if slot_class[t] == c]
        cols = [d for d in range(D) if column_class[d] == c]
        if slots or cols:
            classes.append((slots, cols, Phi[[slot_first[t] for t in slots]][:, cols]))
    counts = [sum(1 for _, px in orbits if len(px) == 1 << L) for L in range(s + 1)]
    split = ParitySplit(s, tuple(counts), tuple(order), tuple((tuple(a), tuple(b), F) for a, b, F in classes))
    if not torch.allclose(split.dense_phi(), Phi, rtol=0, atol=1e-12 * float(Phi.abs().max())):
        return None
    return split


@dataclass(frozen=True)
class ParitySplit:
    """``Phi`` split by the grid's reflections (:func:`parity_split`): ``reflections`` (``s``), ``orbit_counts``
    (orbits of ``2^L`` pixels for ``L = 0 .. s``), ``order`` (the pixels orbit by orbit, largest orbits first,
    pixel ``i`` of an orbit its first pixel moved by the reflections of ``i``'s bits), and ``classes``
    (``(slots, columns, Phi_c [slots, columns])`` per parity class: slots are positions in ``order``)."""

    reflections: int
    orbit_counts: tuple
    order: tuple
    classes: tuple

    def transform(self) -> torch.Tensor:
        """``T [P slots, P pixels]`` (float64): ``z = T k``, the Walsh-Hadamard transform on each orbit."""
        P = len(self.order)
        T = torch.zeros(P, P, dtype=torch.float64)
        t = 0
        for L in reversed(range(self.reflections + 1)):
            n = 1 << L
            H = torch.ones(1, 1, dtype=torch.float64)
            for _ in range(L):
                H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
            for _ in range(self.orbit_counts[L]):
                T[t: t + n, list(self.order[t: t + n])] = H
                t += n
        return T

    def dense_phi(self) -> torch.Tensor:
        """``Phi`` rebuilt from the classes, ``T^T Phi_blocks`` (the check that the split is exact)."""
        P = len(self.order)
        D = sum(len(cols) for _, cols, _ in self.classes)
        blocks = torch.zeros(P, D, dtype=torch.float64)
        for slots, cols, F in self.classes:
            blocks[torch.tensor(slots, dtype=torch.long).view(-1, 1), torch.tensor(cols, dtype=torch.long)] = F
        return self.transform().T @ blocks

    def flops_per_pixel_row(self) -> int:
        """Multiply-adds of one band product for one row of pixels (``k^s D`` without the split)."""
        return sum(len(slots) * len(cols) for slots, cols, _ in self.classes)


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._parity_tables_on")
def _parity_tables_on(space, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table int64, Phi's classes)`` of :func:`parity_split` for ``factorised_pass``, both empty without a
    split. ``table``: ``s``, the orbit counts (``s + 1``), the order (``P``), the number of classes, then per
    class its slot count, column count, slots and columns; the classes' ``Phi_c`` row-major one after another."""
    split = parity_split(space)
    if split is None:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=dtype, device=device)
    table = [split.reflections, *split.orbit_counts, *split.order, len(split.classes)]
    for slots, cols, _ in split.classes:
        table += [len(slots), len(cols), *slots, *cols]
    phis = _packed([F.reshape(-1) for _, _, F in split.classes], device, dtype)
    return torch.tensor(table, dtype=torch.int64, device=device), phis


def _fields(rep: Rep):
    """``[(offset, copies, field, [(slot offset, irrep field)])]`` of the segments of ``rep`` (structured order)."""
    out, o = [], 0
    for c, f in rep.segments:
        slots, so = [], 0
        for s in f.slots:
            slots.append((so, s.segments[0][1]))
            so += s.dim
        out.append((o, c, f, slots))
        o += c * f.dim
    return out


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._q_on")
def _q_on(field, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _narrowed(field.Q.to(torch.float64), dtype).to(device=device, dtype=dtype).contiguous()


def _moved(perm):
    """``perm``, or ``None`` where it is absent or the identity."""
    return None if perm is None or torch.equal(perm, torch.arange(len(perm))) else perm


def _per_row(c, batch, K):
    """``None`` for a number (used as is); a tensor of the batch shape as ``[rows_per_batch_item]``-broadcastable
    ``[B, 1, 1]`` in K's dtype."""
    if not isinstance(c, torch.Tensor):
        return None
    return c.to(device=K.device, dtype=K.dtype).expand(batch).reshape(-1, 1, 1)


def _residual_energies(rows, h_rows, PhiT, target, coeffs, fresh, shape):
    """``||K - h Phi^T||^2`` per batch item (float64 sums of float rows), and with ``target`` the
    gradient ``2 lambda_perp R + 2 lambda_G (K - R)`` written (``fresh``) or added into it, chunk by chunk."""
    n_rows, P = rows.shape
    per_item = shape[-3] * shape[-2]
    items = n_rows // per_item if per_item else 0
    e = torch.zeros(items, dtype=torch.float64, device=rows.device)
    step = max(1, _CHUNK_ELEMENTS // P)
    scratch = None
    for b in range(items):
        for s in range(b * per_item, (b + 1) * per_item, step):
            t = min(step, (b + 1) * per_item - s)
            K_c, h_c = rows[s: s + t], h_rows[s: s + t]
            if target is not None and fresh:
                R = torch.addmm(K_c, h_c, PhiT, alpha=-1, out=target[s: s + t])
            else:
                if scratch is None or scratch.shape[0] < t:
                    scratch = torch.empty(step, P, dtype=rows.dtype, device=rows.device)
                R = torch.addmm(K_c, h_c, PhiT, alpha=-1, out=scratch[:t])
            e[b] += torch.linalg.vecdot(R.reshape(-1), R.reshape(-1)).double()
            if target is None:
                continue
            lambda_perp, lambda_G, cp, cg = coeffs
            T = target[s: s + t]
            if fresh:  # T holds R: T = 2 lambda_perp R + 2 lambda_G (K - R)
                if cp is None and cg is None:
                    if lambda_G:
                        T.mul_(2 * (lambda_perp - lambda_G)).add_(K_c, alpha=2 * lambda_G)
                    else:
                        T.mul_(2 * lambda_perp)
                else:
                    cpb = cp[b] if cp is not None else lambda_perp
                    cgb = cg[b] if cg is not None else lambda_G
                    T.mul_(2 * (cpb - cgb)).add_(K_c * (2 * cgb))
            else:
                if cp is None and cg is None:
                    T.add_(R, alpha=2 * (lambda_perp - lambda_G))
                    if lambda_G:
                        T.add_(K_c, alpha=2 * lambda_G)
                else:
                    cpb = cp[b] if cp is not None else lambda_perp
                    cgb = cg[b] if cg is not None else lambda_G
                    T.add_(R * (2 * (cpb - cgb))).add_(K_c * (2 * cgb))
    return e


def _whitened(H: torch.Tensor, M: torch.Tensor, what: str) -> torch.Tensor:
    """``G^{-1/2} H`` (``[r, d_out, d_in, D]``), orthonormal in the metric ``I ⊗ M``: its kernels ``F_s Phi^T`` are
    an orthonormal basis of V's part in the tile."""
    G = torch.einsum("sbad,de,tbae->st", H, M, H)
    lam, U = torch.linalg.eigh(G)
    if not lam[0] > 1e-10 * lam[-1]:
        raise RuntimeError(f"{what}: the sampled equivariant kernels are linearly dependent on the grid "
                           f"(Gram eigenvalues from {float(lam[0]):.1e} to {float(lam[-1]):.1e})")
    W = (U * lam.rsqrt()) @ U.T
    return torch.einsum("st,tbad->sbad", W, H).contiguous()


def _slot_maps(plan: FactorisedPlan) -> list:
    """Per pair of field segments of ``plan``: ``([(out slot offset, d_out slot, U)], [(offset, d) of output
    slots without maps])`` with ``U [sum r, d_out slot * d_in * D]`` (float64) the maps ``F`` of every tile
    of that output irrep slot stacked, each composed with its input slot's columns of the input field's
    change of basis: ``U[s, (b, j, d)] = sum_a F[s, b, a, d] Q_in[j, a]``, so that the coefficients of
    the tile are ``U`` times the block rotated on its output side only."""
    out, maps = [], iter(plan._maps)
    for (_, _, _, so), (_, _, fi, _), slots, _ in plan._segment_pairs:
        Q_in = fi.Q.to(torch.float64) if fi.Q is not None else torch.eye(fi.dim, dtype=torch.float64)
        rows: dict[int, list] = {}
        for ob, db, oa, da in slots:
            F = next(maps)
            G = torch.einsum("rbad,ja->rbjd", F, Q_in[:, oa: oa + da])
            rows.setdefault(ob, (db, []))[1].append(G.reshape(G.shape[0], -1))
        slot_maps = [(ob, db, torch.cat(Us)) for ob, (db, Us) in sorted(rows.items())]
        empty = [(ob, psi.dim) for ob, psi in so if ob not in rows]
        out.append((slot_maps, empty))
    return out


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._slot_maps_on")
def _slot_maps_on(plan: FactorisedPlan, device: torch.device, dtype: torch.dtype) -> list:
    return [([(ob, db, _narrowed(U, dtype).to(device=device, dtype=dtype).contiguous()) for ob, db, U in slot_maps],
             empty) for slot_maps, empty in _slot_maps(plan)]


@bytes_cached("equiproj.kernel_spaces._factorised.factorised_plan")
def factorised_plan(space, rep_in: Rep, rep_out: Rep) -> FactorisedPlan:
    """The (cached) :class:`FactorisedPlan` of a layer."""
    return FactorisedPlan(space, rep_in, rep_out)


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._maps_on")
def _maps_on(plan: FactorisedPlan, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    return [F.to(device=device, dtype=dtype) for F in plan._maps]


@torch.compiler.disable
@bytes_cached("equiproj.kernel_spaces._factorised._sampled_on")
def _sampled_on(space, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _narrowed(space.sampled, dtype).to(device=device, dtype=dtype).contiguous()


def factorised_one(w, sp, ri, ro, lambda_perp, lambda_G, out, energies):
    """One layer through the factorised transforms: ``(E_perp, E_G, gradient)`` with the gradient in a
    fresh tensor, or added into ``out`` in place (written directly where ``out`` has the compute dtype
    and is contiguous; ``out`` may be ``w`` itself)."""
    plan = factorised_plan(sp, ri, ro)
    # an output that is not contiguous has no [..., m, n, P] view (reshape would copy): the gradient is
    # then computed apart and added
    apart = out is not None and not out.is_contiguous()
    if plan.runs_closed_form(w):  # regular fields: one pass in the weight's own dtype, written into out
        ep, eg, g = plan.run(sp._pixels(w, ri, ro), lambda_perp, lambda_G,
                             None if out is None or apart else sp._pixels(out, ri, ro), energies)
        if apart:
            out.add_(g.reshape(out.shape).to(out.dtype))
        return ep, eg, (out if out is not None else g.reshape(w.shape))
    K = sp._pixels(w, ri, ro, accumulation_dtype(w.dtype))
    target = None if out is None else sp._pixels(out, ri, ro)
    if target is not None and (apart or target.dtype != K.dtype
                               or (target.data_ptr() == K.data_ptr() and not K.is_contiguous())):
        ep, eg, g = plan.run(K, lambda_perp, lambda_G, None, energies)
        out.add_(g.reshape(out.shape).to(out.dtype))
        return ep, eg, out
    ep, eg, g = plan.run(K, lambda_perp, lambda_G, target, energies)
    return ep, eg, (out if out is not None else g.reshape(w.shape).to(w.dtype))
