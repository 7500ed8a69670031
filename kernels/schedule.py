"""Host-side schedule of the fused energy kernel: the task table over all layers.

A *task* is one program of the kernel: a block of ``BU x BV`` tiles of one field pair of one
weight matrix (one batch element of one layer). Tasks are grouped into *tile classes* that share
the compile-time shape of a tile: (weight dtype, d_out, d_in, identity permutation, unit column
stride). The kernel is launched once per class, whatever the number of layers, so a model costs
``#classes + 1`` launches (the +1 is the fixed-order reduction of the per-task partial sums).

Every task owns one *slot* of the partial-sum buffer; the slots of one matrix are contiguous, so
the reduction sums a contiguous range per matrix in a fixed order (deterministic, no atomics).

Nothing here needs Triton: it is plain integer bookkeeping, tested on its own.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from equiproj._plan import PackedPlan, PlanColumn

__all__ = ["TaskColumn", "LayerColumn", "TileKind", "OrbitClass", "TileClass", "Schedule", "build_schedule", "tile_shape",
           "MAX_TILE_ELEMENTS"]


class TaskColumn(enum.IntEnum):
    """int64 columns of a row of the task table (one row per program of the kernel)."""

    LAYER = 0  # index into the per-layer table
    ROW0 = 1  # first structured row of the task's block
    COL0 = 2  # first structured column
    NU = 3  # copies of the output field in the block (<= BU)
    NV = 4  # copies of the input field (<= BV)
    RANK = 5  # r: basis matrices of the field pair
    BASIS_OFFSET = 6  # into the schedule's concatenated bases
    KIND = 7  # a TileKind
    W_OFFSET = 8  # element offset of the task's matrix in the weight
    G_OFFSET = 9  # element offset of the matrix in the gradient
    SLOT = 10  # the task's slot in the partial-sum buffer


class LayerColumn(enum.IntEnum):
    """int64 columns of the per-layer table."""

    STRIDE_ROW = 0
    STRIDE_COL = 1
    GRAD_ROW_STRIDE = 2
    PERM_OUT_OFFSET = 3  # into the schedule's concatenated permutations
    PERM_IN_OFFSET = 4


class TileKind(enum.IntEnum):
    """How a task projects its tiles."""

    GENERAL = 0  # loop over the r basis matrices (r = 0: no basis work, the tile is all residual)
    SCALED_IDENTITY = 1  # r = 1 and A = I/sqrt(d) (real type): the trace is all it takes
    ORBIT = 2  # an orbit pair (two permutation fields): the mean over each orbit, no basis


class OrbitClass(enum.IntEnum):
    """Which kernel a tile class runs: the basis kernel, or the orbit kernel with one of the orbit forms."""

    NONE = 0  # a basis pair: the tile kernel
    TABLE = 1  # an orbit pair with an orbit table: one masked sum per orbit
    CYCLIC = 2  # regular fields of C_N: tile entries loaded skewed, so that a column is an orbit
    DIHEDRAL = 3  # regular fields of D_N: the same with the dihedral closed form
    PRODUCT = 4  # regular output field, input f_1 ⊗ f_2: loaded skewed through the factor tables, DIP orbits at a time
    POINTS = 5  # any two permutation fields by the group's permutations: the mean of the tile's |G| images
    SIGNED = 6  # two monomial fields: a signed orbit table, one masked signed sum per orbit

#: largest padded tile ``pow2(d_out) * pow2(d_in)`` the kernel takes (it holds a tile in registers)
MAX_TILE_ELEMENTS = 128 * 128


def orbit_chunk(d_out: int, d_in: int, orbit: "OrbitClass") -> int:
    """The padded columns a program holds at once: the whole tile, except for a product, whose orbits
    (columns of the skewed block) are independent and taken as many at a time as fit
    :data:`MAX_TILE_ELEMENTS` with the padded rows."""
    if orbit == OrbitClass.PRODUCT:
        return max(1, min(_pow2(d_in), MAX_TILE_ELEMENTS // _pow2(d_out)))
    return _pow2(d_in)


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _tuning() -> tuple[int, int]:
    """(padded elements per task, warps per program); env overrides for tuning runs."""
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # under the interpreter every program costs milliseconds: few, large tasks
    elems = int(os.environ.get("EQUIPROJ_TRITON_TILE", 16384 if interp else 4096))
    warps = int(os.environ.get("EQUIPROJ_TRITON_WARPS", 4))
    return elems, warps


def tile_shape(d_out: int, d_in: int, max_out_copies: int, max_in_copies: int,
               target_elems: int, num_warps: int) -> tuple[int, int]:
    """``(BU, BV)``: copies per task along rows / columns, powers of two.

    Columns first: a row of a task (``BV * d_in`` contiguous weights for the identity
    permutation) spans ``32 * num_warps`` padded columns where the field pair allows, so that
    the lanes of a warp read consecutive weights and a tile's reduction over its rows stays in
    registers; then rows up to ``target_elems`` padded elements, then columns again if the
    field pair has few output copies.
    """
    dop, dip = _pow2(d_out), _pow2(d_in)
    bv = min(_pow2(max_in_copies), _pow2_floor(32 * num_warps // dip))
    bu = min(_pow2(max_out_copies), _pow2_floor(target_elems // (dop * bv * dip)))
    bv = max(bv, min(_pow2(max_in_copies), _pow2_floor(target_elems // (bu * dop * dip))))
    return bu, bv


def _pow2_floor(x: int) -> int:
    """The largest power of two <= ``x`` (1 for ``x < 2``): ``tl.arange`` sizes must be powers of two
    whatever target the environment asks for."""
    return 1 << max(0, int(x).bit_length() - 1)


@dataclass
class TileClass:
    """One kernel launch: ``count`` tasks from row ``start`` of the task table, same tile shape."""

    dtype: torch.dtype
    d_out: int
    d_in: int
    identity_perm: bool
    unit_col_stride: bool
    small_offsets: bool  # every within-matrix offset fits int32
    bu: int
    bv: int
    num_warps: int
    start: int = 0
    count: int = 0
    orbit: OrbitClass = OrbitClass.NONE

    @property
    def padded(self) -> tuple[int, int]:
        """``(DOP, DIP)``: the padded tile, or for a product the padded rows and the orbits taken at once."""
        return _pow2(self.d_out), orbit_chunk(self.d_out, self.d_in, self.orbit)

    @property
    def elements(self) -> int:
        dop, dip = self.padded
        return self.bu * dop * self.bv * dip


@dataclass
class Schedule:
    """Device tables for one list of (weight layout, plan) pairs; reused while the layouts repeat."""

    tasks: torch.Tensor  # [T, len(TaskColumn)] int64, rows grouped by class
    classes: list[TileClass]
    layers: torch.Tensor  # [L, len(LayerColumn)] int64
    basis: torch.Tensor  # float32, all plans' bases concatenated
    perms: torch.Tensor  # int64, all plans' perm_out / perm_in concatenated
    slot_start: torch.Tensor  # [M + 1] int64: matrix k owns slots slot_start[k] : slot_start[k+1]
    n_slots: int
    n_matrices: int
    matrix_offset: list[int]  # first matrix of each layer (matrices are layer-major, batch row-major)
    batch_shapes: list[tuple[int, ...]]
    plans: list = field(default_factory=list)  # keeps the plans alive (cache keys use their ids)


def _batch_offsets(shape, strides) -> np.ndarray:
    """Element offsets of the matrices of a ``[..., m, n]`` tensor, in row-major batch order."""
    off = np.zeros(1, dtype=np.int64)
    for size, stride in zip(shape[:-2], strides[:-2]):
        off = (off[:, None] + np.arange(size, dtype=np.int64)[None, :] * stride).reshape(-1)
    return off


def _max_offset(shape, strides) -> int:
    """Largest element offset of one matrix ``[m, n]`` (the last two dims) from its first element."""
    return (shape[-2] - 1) * strides[-2] + (shape[-1] - 1) * strides[-1]


def _is_scaled_identity(A: torch.Tensor) -> bool:
    r, do, di = A.shape
    if r != 1 or do != di:
        return False
    eye = torch.eye(do, dtype=torch.float64) / math.sqrt(do)
    return bool((A[0].double() - eye).abs().max() < 1e-6)


def build_schedule(weights: list[torch.Tensor], plans: list[PackedPlan], device: torch.device,
                   target: tuple[int, int] | None = None) -> Schedule:
    """The task table for these weights' layouts (shapes, strides, dtypes) and plans.

    ``target``: (padded elements per task, warps per program); default from :func:`_tuning`.
    """
    target_elems, num_warps = target or _tuning()
    metas = [P.meta.cpu().numpy().astype(np.int64) for P in plans]
    bases_cpu = [P.basis.cpu() for P in plans]

    # pass 1: tile classes, and the largest copy counts within each
    # within one matrix: weight offsets (its strides) and gradient offsets (contiguous) fit int32
    small = [max(_max_offset(W.shape, W.stride()), W.shape[-2] * W.shape[-1]) < 2**31 for W in weights]

    def class_key(i, row):
        W = weights[i]
        orbit = OrbitClass.NONE if not row[PlanColumn.ORBITS] else OrbitClass(int(row[PlanColumn.ORBIT_FORM]) + 1)
        return (W.dtype, int(row[PlanColumn.D_OUT]), int(row[PlanColumn.D_IN]), bool(plans[i].identity_perm),
                W.stride(-1) == 1, small[i], orbit)

    maxima: dict = {}
    for i, meta in enumerate(metas):
        for row in meta:
            k = class_key(i, row)
            mo, mi = maxima.get(k, (0, 0))
            maxima[k] = (max(mo, int(row[PlanColumn.OUT_COPIES])), max(mi, int(row[PlanColumn.IN_COPIES])))
    classes = {}
    for k, (mo, mi) in maxima.items():
        dt, do, di, ident, unit, sm, orbit = k
        chunk = orbit_chunk(do, di, orbit)
        if _pow2(do) * chunk > MAX_TILE_ELEMENTS:
            raise ValueError(f"a field pair of dimensions {do} x {di} exceeds the kernel's tile limit "
                             f"(padded {MAX_TILE_ELEMENTS} elements); use the torch path for such layers")
        bu, bv = tile_shape(do, chunk, mo, mi, target_elems, num_warps)
        classes[k] = TileClass(dt, do, di, ident, unit, sm, bu, bv, num_warps, orbit=orbit)

    # shared tables: bases (float32), permutations, per-layer strides
    basis_chunks, perm_chunks, layer_rows = [], [], []
    basis_base, perm_base = [], 0
    bo = 0
    for i, P in enumerate(plans):
        basis_base.append(bo)
        basis_chunks.append(bases_cpu[i].to(torch.float32))
        bo += bases_cpu[i].numel()
        W = weights[i]
        po_off, pi_off = perm_base, perm_base + P.m
        perm_chunks += [P.perm_out.cpu(), P.perm_in.cpu()]
        perm_base += P.m + P.n
        lrow = [0] * len(LayerColumn)
        lrow[LayerColumn.STRIDE_ROW], lrow[LayerColumn.STRIDE_COL] = W.stride(-2), W.stride(-1)
        lrow[LayerColumn.GRAD_ROW_STRIDE] = P.n
        lrow[LayerColumn.PERM_OUT_OFFSET], lrow[LayerColumn.PERM_IN_OFFSET] = po_off, pi_off
        layer_rows.append(lrow)

    # pass 2: tasks. Slots: matrix-major, then field pair, then (u block, v block).
    per_class: dict = {k: [] for k in classes}
    slot_start, matrix_offset, batch_shapes = [0], [], []
    n_slots = n_mats = 0
    for i, (W, P, meta) in enumerate(zip(weights, plans, metas)):
        batch_shapes.append(tuple(W.shape[:-2]))
        matrix_offset.append(n_mats)
        w_off = _batch_offsets(W.shape, W.stride())
        nb = len(w_off)
        # each layer's gradient is its own contiguous tensor (outputs of a custom op may not share storage)
        g_off = np.arange(nb, dtype=np.int64) * (P.m * P.n)
        # tasks of one matrix, then replicated over the batch
        local = 0
        pieces = []
        for row in meta:
            C = PlanColumn
            oo, io, co, ci = int(row[C.OUT_OFFSET]), int(row[C.IN_OFFSET]), int(row[C.OUT_COPIES]), int(row[C.IN_COPIES])
            do, di, r, pbo = int(row[C.D_OUT]), int(row[C.D_IN]), int(row[C.RANK]), int(row[C.BASIS_OFFSET])
            k = class_key(i, row)
            tc = classes[k]
            nub, nvb = -(-co // tc.bu), -(-ci // tc.bv)
            ub = np.repeat(np.arange(nub, dtype=np.int64), nvb)
            vb = np.tile(np.arange(nvb, dtype=np.int64), nub)
            if row[C.ORBITS]:
                kind = TileKind.ORBIT
            else:
                A = bases_cpu[i][pbo : pbo + r * do * di].reshape(r, do, di)
                kind = TileKind.SCALED_IDENTITY if _is_scaled_identity(A) else TileKind.GENERAL
            cnt = nub * nvb
            T = TaskColumn
            t = np.empty((cnt, len(TaskColumn)), dtype=np.int64)
            t[:, T.LAYER] = i
            t[:, T.ROW0] = oo + ub * tc.bu * do
            t[:, T.COL0] = io + vb * tc.bv * di
            t[:, T.NU] = np.minimum(tc.bu, co - ub * tc.bu)
            t[:, T.NV] = np.minimum(tc.bv, ci - vb * tc.bv)
            t[:, T.RANK] = r
            t[:, T.BASIS_OFFSET] = basis_base[i] + pbo
            t[:, T.KIND] = kind
            t[:, T.SLOT] = local + np.arange(cnt, dtype=np.int64)
            local += cnt
            pieces.append((k, t))
        per_matrix = local
        for k, t in pieces:
            rep = np.repeat(t[None], nb, axis=0)  # [nb, cnt, C]
            rep[:, :, TaskColumn.W_OFFSET] = w_off[:, None]
            rep[:, :, TaskColumn.G_OFFSET] = g_off[:, None]
            rep[:, :, TaskColumn.SLOT] += (n_slots + np.arange(nb, dtype=np.int64) * per_matrix)[:, None]
            per_class[k].append(rep.reshape(-1, len(TaskColumn)))
        slot_start += list(n_slots + per_matrix * np.arange(1, nb + 1))
        n_slots += per_matrix * nb
        n_mats += nb

    rows, start = [], 0
    for k, tc in classes.items():
        t = np.concatenate(per_class[k]) if per_class[k] else np.zeros((0, len(TaskColumn)), np.int64)
        tc.start, tc.count = start, len(t)
        start += len(t)
        rows.append(t)
    tasks = np.concatenate(rows) if rows else np.zeros((0, len(TaskColumn)), np.int64)

    def dev(x, dtype=torch.int64):
        return torch.as_tensor(x, dtype=dtype).to(device)

    return Schedule(
        tasks=dev(tasks).contiguous(),
        classes=[tc for tc in classes.values() if tc.count],
        layers=dev(np.array(layer_rows, dtype=np.int64).reshape(-1, len(LayerColumn))),
        basis=dev(torch.cat(basis_chunks) if basis_chunks else torch.zeros(0), torch.float32),
        perms=dev(torch.cat(perm_chunks) if perm_chunks else torch.zeros(0, dtype=torch.long)),
        slot_start=dev(np.array(slot_start, dtype=np.int64)),
        n_slots=n_slots,
        n_matrices=n_mats,
        matrix_offset=matrix_offset,
        batch_shapes=batch_shapes,
        plans=list(plans),
    )
