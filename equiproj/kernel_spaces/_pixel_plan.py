"""The projection onto a steerable kernel space as a packed plan of pixel tiles (docs/math.md §6).

``V = span{h Phi^T : h in Hom_G(rho_in ⊗ sigma, rho_out)}`` splits over (output field copy,
input field copy) tiles: a kernel's tile between copy ``u`` of an output field and copy ``v`` of
an input field is the ``[d_out, d_in, k^s]`` block ``W[u-th rows, v-th columns, :]``, and V's part in
it is spanned by ``h_s Phi^T`` with ``h_s`` a basis of the equivariant coefficient maps between
the two fields. Tiles of different copy pairs are disjoint entries of W, so per field-pair type
one orthonormal basis ``A [r, d_out, d_in k^s]`` of that span (QR in float64) is all the
projection needs, and the weight viewed as ``[c_out, c_in k^s]`` (input copy ``v`` is the
contiguous block of ``d_in k^s`` columns) is an ordinary field-structured matrix for the fused op
(:class:`~equiproj._plan.PackedPlan`): one pass over W, the part outside the band falls into the
residual by itself.

On the CPU a plan in the fields layout with reps in their own order also runs by its own kernel,
``equiproj_cpu::pixel_tile_pass`` (csrc/pixel_tiles.cpp, :func:`tile_pass`) on the plan's
:class:`TileTables`: the same tiles in float64, one read of W, the gradient written or added in place.

Two layouts of the same plan (chosen per layer by :func:`pixel_plan`, both exact):

* ``"fields"``: tiles between the reps' own fields, on the weight as it is (no extra pass); a
  field pair costs ``4 r`` flops per weight.
* ``"irreps"``: the fields are first rotated into their irreps (``W_hat = Q_out^T W Q_in`` field by
  field); tiles between irrep types then have far fewer basis matrices (C8-regular fields:
  ``r = 88`` per field pair at k = 5 against at most 11 per irrep pair), at the price of that
  change of basis (``2 (d_out + d_in)`` flops per weight, and a copy of W kept for backward).
"""

from __future__ import annotations


import functools
import math

import torch

from .. import ops as _ops
from .._caches import bytes_cached
from .._plan import PackedPlan, PlanColumn, block_plan
from ..groups import Rep
from ..kernels.inputs import autocast_off

__all__ = ["PixelPlan", "pixel_plan", "hom_basis", "pair_basis", "TileTables", "tile_tables", "tile_kernel_available",
           "tile_kernel_tables", "tile_pass"]

#: irreps layout only when its estimated cost is below this fraction of the field layout's
_IRREP_ROUTE_GAIN = 0.5
#: the change of basis, in flops-per-weight equivalents per pass (two passes: forward and gradient)
_CHANGE_OF_BASIS_PASS = 8.0


def _single(group, field) -> Rep:
    return Rep(group, [(1, field)])


@bytes_cached("equiproj.kernel_spaces._pixel_plan.hom_basis")
def hom_basis(space, field_in, field_out) -> torch.Tensor:
    """``H [r, d_out, d_in, D]`` float64: a Frobenius-orthonormal basis of the equivariant coefficient
    maps ``Hom_G(f_in ⊗ sigma, f_out)`` of one field pair, in Kronecker order (input coordinate
    ``i``, harmonic ``d``), from the block plan of the coefficient rep (Clebsch-Gordan blocks)."""
    G = space.group
    crep, colmap = space._layout(_single(G, field_in))
    plan = block_plan(crep, _single(G, field_out))
    d_out, n = field_out.dim, crep.dim
    mats = []
    for fp in plan.field_pairs:  # one output field (one copy); input fields f_in ⊗ sigma_h, n_h copies
        r = fp.basis.shape[0]
        for v in range(fp.in_copies if r else 0):
            M = torch.zeros(r, d_out, n, dtype=torch.float64)
            c0 = fp.in_offset + v * fp.d_in
            M[:, :, c0 : c0 + fp.d_in] = fp.basis
            mats.append(M)
    if not mats:
        return torch.zeros(0, d_out, field_in.dim, space.dim, dtype=torch.float64)
    H = torch.cat(mats)
    if colmap is not None:  # the coefficient layout's columns back to the Kronecker columns i * D + d
        H = torch.zeros_like(H).index_copy_(-1, colmap, H)
    return H.reshape(len(H), d_out, field_in.dim, space.dim)


def _orthonormal_rows(U: torch.Tensor, what: str) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``U`` ``[r, t]`` (QR, float64); an error if they are dependent."""
    if U.shape[0] == 0:
        return U
    Q, R = torch.linalg.qr(U.T)
    d = R.diagonal().abs()
    if not d.min() > 1e-10 * d.max():
        raise RuntimeError(f"{what}: the sampled equivariant kernels are linearly dependent on the grid "
                           f"(|R_ii| from {float(d.min()):.1e} to {float(d.max()):.1e})")
    return Q.T.contiguous()


@bytes_cached("equiproj.kernel_spaces._pixel_plan.pair_basis")
def pair_basis(space, field_in, field_out) -> torch.Tensor:
    """``A [r, d_out, d_in * k^s]`` float64, orthonormal: V's part in one tile of this field pair
    (the spanning kernels ``h_s Phi^T`` orthonormalised by QR). Cached per (space, fields)."""
    H = hom_basis(space, field_in, field_out)
    U = torch.einsum("rabd,pd->rabp", H, space.sampled)
    t = field_out.dim * field_in.dim * space.num_pixels
    A = _orthonormal_rows(U.reshape(len(U), t), f"{space.group}, {field_out.name} <- {field_in.name}")
    return A.reshape(len(A), field_out.dim, field_in.dim * space.num_pixels)


class PixelPlan:
    """The packed plan of one (space, rep_in, rep_out): what the fused op runs on the weight in
    :attr:`layout` (``"fields"``: the weight itself, ``[..., c_out, c_in k^s]``; ``"irreps"``: the
    weight with every field rotated into its irreps, :meth:`to_plan_coordinates`).

    Attributes: ``layout``, ``packed`` (:class:`PackedPlan`, CPU, float64 basis), ``rep_in``,
    ``rep_out`` (the reps whose fields the tiles are between), ``flops_per_weight`` and
    ``basis_bytes`` (float64) of the chosen layout, ``field_pairs`` (per field pair:
    ``(d_out, d_in, out copies, in copies, r)``).
    """

    def __init__(self, space, rep_in: Rep, rep_out: Rep, layout: str | None = None):
        self.space, self.user_in, self.user_out = space, rep_in, rep_out
        P = space.num_pixels
        fields_cost = _cost(space, rep_in, rep_out)
        spec_in, spec_out = _spectral_rep(rep_in), _spectral_rep(rep_out)
        irreps_cost = None
        if spec_in is not None or spec_out is not None:
            irreps_cost = _cost(space, spec_in or rep_in, spec_out or rep_out)
            irreps_cost = irreps_cost + 2 * _CHANGE_OF_BASIS_PASS
        if layout is None:
            use_irreps = irreps_cost is not None and irreps_cost < _IRREP_ROUTE_GAIN * fields_cost
            layout = "irreps" if use_irreps else "fields"
        if layout not in ("fields", "irreps"):
            raise ValueError(f"layout must be 'fields' or 'irreps', got {layout!r}")
        self.layout = layout
        if layout == "irreps":
            self.rep_in, self.rep_out = spec_in or _identity_spectral(rep_in), spec_out or _identity_spectral(rep_out)
            self.flops_per_weight = irreps_cost if irreps_cost is not None else fields_cost
        else:
            self.rep_in, self.rep_out = rep_in, rep_out
            self.flops_per_weight = fields_cost
        rows, chunks, bo, pairs = [], [], 0, []
        oo = 0
        for co, fo in self.rep_out.segments:
            oi = 0
            for ci, fi in self.rep_in.segments:
                A = pair_basis(space, fi, fo)
                r = A.shape[0]
                rows.append([oo, oi * P, co, ci, fo.dim, fi.dim * P, r, bo, 0, 0])  # basis pairs: no orbits
                chunks.append(A.reshape(-1))
                bo += A.numel()
                pairs.append((fo.dim, fi.dim, co, ci, r))
                oi += ci * fi.dim
            oo += co * fo.dim
        assert all(len(r) == len(PlanColumn) for r in rows)
        m, n = self.rep_out.dim, self.rep_in.dim
        perm_out = self.rep_out.perm if self.rep_out.perm is not None else torch.arange(m)
        perm_in = self.rep_in.perm if self.rep_in.perm is not None else torch.arange(n)
        perm_in = (perm_in[:, None] * P + torch.arange(P)).reshape(-1)  # a channel's k^s columns stay together
        self.packed = PackedPlan(m, n * P, torch.tensor(rows, dtype=torch.long).reshape(-1, len(PlanColumn)),
                                 torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64),
                                 perm_out, perm_in, self.rep_out.perm is None and self.rep_in.perm is None)
        self.field_pairs = pairs
        self.basis_bytes = 8 * len(self.packed.basis)
        self._out_blocks = _blocks(rep_out) if layout == "irreps" else None
        self._in_blocks = _blocks(rep_in) if layout == "irreps" else None

    def __repr__(self):
        return (f"PixelPlan({self.layout}, {len(self.field_pairs)} field pairs, "
                f"{self.flops_per_weight:.0f} flops/weight, basis {self.basis_bytes / 1024:.0f} KiB)")

    # ---- the weight in the plan's coordinates -------------------------------------------------
    def to_plan_coordinates(self, K: torch.Tensor) -> torch.Tensor:
        """``K [..., m, n, P]`` -> ``[..., m, n * P]`` in the plan's coordinates (differentiable): a view
        for the ``"fields"`` layout, the per-field change of basis to irreps for ``"irreps"`` (whose
        backward is the inverse change of basis: nothing is kept for it)."""
        if self.layout == "fields":
            return K.flatten(-2)
        return _ChangeOfBasis.apply(K, self, True)

    def from_plan_coordinates(self, X: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_plan_coordinates` (its transpose): ``[..., m, n * P] -> [..., m, n, P]``."""
        if self.layout == "fields":
            return X.unflatten(-1, (-1, self.space.num_pixels))
        return _ChangeOfBasis.apply(X, self, False)

    def _to_spectral(self, K: torch.Tensor) -> torch.Tensor:
        X = _apply_blocks(K, self._in_blocks, transpose=True)  # [..., m, n, P]: input channels at -2
        return _apply_blocks(X.flatten(-2), self._out_blocks, transpose=True)  # [..., m, n P]: output channels

    def _from_spectral(self, X: torch.Tensor) -> torch.Tensor:
        X = _apply_blocks(X, self._out_blocks, transpose=False).unflatten(-1, (-1, self.space.num_pixels))
        return _apply_blocks(X, self._in_blocks, transpose=False)


class _ChangeOfBasis(torch.autograd.Function):
    """The orthogonal per-field change of basis of the irreps layout (``forward=True``: to the plan's
    coordinates), whose adjoint is its inverse: backward keeps no tensor."""

    @staticmethod
    def forward(ctx, X, plan, forward):
        ctx.plan, ctx.forward = plan, forward
        return plan._to_spectral(X) if forward else plan._from_spectral(X)

    @staticmethod
    def backward(ctx, g):
        return (ctx.plan._from_spectral(g) if ctx.forward else ctx.plan._to_spectral(g)), None, None


def _cost(space, rep_in: Rep, rep_out: Rep) -> float:
    """Flops per weight of the tile computation (coefficients and residual: ``4 r`` per entry of a tile)."""
    total = 0.0
    for co, fo in rep_out.segments:
        for ci, fi in rep_in.segments:
            r = hom_basis(space, fi, fo).shape[0]
            total += co * ci * fo.dim * fi.dim * (4 * r + 2)
    return total / (rep_out.dim * rep_in.dim)


def _spectral_rep(rep: Rep) -> Rep | None:
    """The rep in its spectral coordinates with copies of one irrep grouped: segments ``(mult, psi)``
    and the permutation from grouped to spectral coordinates (segment, copy, slot order); ``None``
    when no field of ``rep`` has a change of basis (the field layout is already that)."""
    if all(f.Q is None for _, f in rep.segments):
        return None
    return _identity_spectral(rep)


def _identity_spectral(rep: Rep) -> Rep:
    coords: dict = {}
    o = 0
    for c, f in rep.segments:
        for _ in range(c):
            for s in f.slots:
                coords.setdefault(s, []).append(torch.arange(o, o + s.dim))
                o += s.dim
    segs = [(len(v), s.segments[0][1]) for s, v in coords.items()]
    perm = torch.cat([torch.cat(v) for v in coords.values()])
    return Rep(rep.group, segs, perm)


def _blocks(rep: Rep):
    """``(user perm or None, [(offset, copies, dim, Q or None)])``: the per-field change of basis of ``rep``."""
    out, o = [], 0
    for c, f in rep.segments:
        out.append((o, c, f.dim, f.Q))
        o += c * f.dim
    return rep.perm, out


def _apply_blocks(Y: torch.Tensor, blocks, transpose: bool) -> torch.Tensor:
    """The change of basis along axis -2 of ``Y [..., channels, L]``: ``transpose=True``: user ->
    spectral coordinates (structured order, then ``Q_f^T`` per copy); ``False``: back (``Q_f`` per
    copy, then the user order). A left matrix product per field (as fast as a copy of Y)."""
    perm, fields = blocks
    if transpose and perm is not None:
        Y = Y.index_select(-2, perm.to(Y.device))
    parts = []
    for o, c, d, Q in fields:
        blk = Y.narrow(-2, o, c * d)
        if Q is not None:
            M = Q.to(device=Y.device, dtype=Y.dtype)
            with autocast_off(Y.device):  # in Y's dtype inside an autocast region too (not bfloat16)
                blk = torch.matmul(M.T if transpose else M, blk.unflatten(-2, (c, d))).flatten(-3, -2)
        parts.append(blk)
    Y = parts[0] if len(parts) == 1 else torch.cat(parts, -2)
    if not transpose and perm is not None:
        Y = Y.index_select(-2, torch.argsort(perm).to(Y.device))
    return Y


@bytes_cached("equiproj.kernel_spaces._pixel_plan.pixel_plan")
def pixel_plan(space, rep_in: Rep, rep_out: Rep, layout: str | None = None) -> PixelPlan:
    """The (cached) :class:`PixelPlan` of a layer; ``layout=None`` picks the cheaper one."""
    return PixelPlan(space, rep_in, rep_out, layout)


class TileTables:
    """What the C++ kernel ``equiproj_cpu::pixel_tile_pass`` reads for a plan in the ``"fields"``
    layout with the reps in their own order: ``pairs [Q, 8]`` int64 (per field pair: output offset,
    input column offset, output copies, input copies, ``d_out``, tile columns ``d_in k^s``, ``r``,
    basis offset) and ``basis`` float64, each pair's ``A [r, d_out, d_in k^s]`` with its rows
    zero-padded to a multiple of 8 columns (the kernel's vectors). ``flops_per_weight``: the
    multiply-adds the kernel issues per weight (``4 r`` per tile entry, tails of the vectors included)."""

    def __init__(self, plan: "PixelPlan"):
        packed = plan.packed
        rows, chunks, off, flops = [], [], 0, 0.0
        for row in packed.meta.tolist():
            r, d_out, n = row[PlanColumn.RANK], row[PlanColumn.D_OUT], row[PlanColumn.D_IN]
            b0 = row[PlanColumn.BASIS_OFFSET]
            A = packed.basis[b0 : b0 + r * d_out * n].reshape(r, d_out, n)
            npad = -(-n // 8) * 8
            chunks.append(torch.nn.functional.pad(A, (0, npad - n)).reshape(-1))
            rows.append([row[PlanColumn.OUT_OFFSET], row[PlanColumn.IN_OFFSET], row[PlanColumn.OUT_COPIES],
                         row[PlanColumn.IN_COPIES], d_out, n, r, off])
            off += r * d_out * npad
            flops += row[PlanColumn.OUT_COPIES] * row[PlanColumn.IN_COPIES] * d_out * npad * (4 * r + 5)
        self.pairs = torch.tensor(rows, dtype=torch.long).reshape(-1, 8)
        self.basis = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64)
        self.m, self.n = packed.m, packed.n
        self.flops_per_weight = flops / max(1, self.m * self.n)

    def __repr__(self):
        return f"TileTables({len(self.pairs)} field pairs, {self.flops_per_weight:.0f} flops/weight)"


@bytes_cached("equiproj.kernel_spaces._pixel_plan.tile_tables")
def tile_tables(plan: PixelPlan) -> TileTables | None:
    """The :class:`TileTables` of ``plan`` (cached), or ``None`` where the kernel does not take the
    weight as it is (the ``"irreps"`` layout, or reps with a permutation)."""
    if plan.layout != "fields" or not plan.packed.identity_perm:
        return None
    return TileTables(plan)


def tile_kernel_available() -> bool:
    return _ops.cpp_available() and hasattr(torch.ops.equiproj_cpu, "pixel_tile_pass")


def tile_kernel_tables(w, plan: PixelPlan, out):
    """The plan's :class:`~equiproj.kernel_spaces._pixel_plan.TileTables` where the pixel-tile kernel
    takes ``w`` as it is and writes into ``out`` (a contiguous float32/float64 CPU weight in the
    fields layout, ``out`` ``None`` or contiguous of its dtype), else ``None``."""
    if (w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64) or not w.is_contiguous()
            or torch.compiler.is_compiling()  # traced code keeps the registered op (it has a fake kernel)
            or (out is not None and (out.dtype != w.dtype or not out.is_contiguous() or out.device != w.device))
            or not tile_kernel_available()):
        return None
    return tile_tables(plan)


@functools.lru_cache(maxsize=256)  # bounded by entries: each value is a one-element tensor
def _one_lambda(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def _per_item(c, batch, B: int) -> torch.Tensor:
    """A coefficient (number, or tensor broadcastable to the batch shape) as ``[B]`` float64 on the CPU."""
    if B == 1 and type(c) is float:
        return _one_lambda(c)
    if isinstance(c, bool) or not isinstance(c, (int, float, torch.Tensor)):
        raise TypeError(f"lambda must be a number or a tensor, got {type(c).__name__}")
    t = torch.as_tensor(c, dtype=torch.float64).detach().cpu()
    try:
        return t.expand(batch).reshape(B).contiguous()
    except RuntimeError:
        raise ValueError(f"lambda has shape {tuple(t.shape)}, not broadcastable to the batch shape "
                         f"{tuple(batch)} of its weight") from None


def tile_runner(w, tables, spatial_dims: int):
    """``equiproj_cpu::pixel_tile_pass`` on the weight ``w`` (``[..., m, n, k, ...]``) with its tables
    bound: ``run(lambda_perp, lambda_G, out, write) -> (E_perp [B], E_G [B])``, the lambdas float64
    ``[B]`` (``B`` the batch size), ``write`` 0 (energies only), 1 (the gradient written into ``out``) or
    2 (added into ``out``); ``out`` is contiguous with w's elements and dtype, and may be ``w`` itself."""
    batch = w.shape[: w.dim() - 2 - spatial_dims]
    pairs, basis = tables.pairs, tables.basis
    op = torch.ops.equiproj_cpu.pixel_tile_pass

    def run(lambda_perp, lambda_G, out, write):
        return op(w, pairs, basis, lambda_perp, lambda_G, out, write, False, batch)

    return run


def tile_pass(w, tables, spatial_dims: int, lambda_perp, lambda_G, out):
    """``(E_perp, E_G, grad)`` of one weight ``[..., m, n, k, ...]`` by ``equiproj_cpu::pixel_tile_pass``:
    one read of the weight and one write of the gradient (into a fresh tensor, or added into ``out``,
    which may be the weight itself). The kernel takes the weight and ``out`` as they are."""
    batch = w.shape[: w.dim() - 2 - spatial_dims]
    B = math.prod(batch)
    lp, lg = _per_item(lambda_perp, batch, B), _per_item(lambda_G, batch, B)
    if out is None:
        target, write = torch.empty_like(w), 1
    else:
        target, write = out, 2
    ep, eg = tile_runner(w, tables, spatial_dims)(lp, lg, target, write)
    return ep, eg, target


@bytes_cached("equiproj.kernel_spaces._pixel_plan.packed_on")
def packed_on(plan: PixelPlan, device: torch.device, dtype: torch.dtype) -> PackedPlan:
    """``plan.packed`` on ``device`` with its basis in ``dtype`` (cached)."""
    return plan.packed.to(device, dtype)

