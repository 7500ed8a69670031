"""Fused Triton kernel: E_perp, E_G and the penalty gradient of many layers in one pass over W.

Per tile ``T`` (``d_out x d_in``, one copy of an output field by one copy of an input field, in
structured coordinates) with the field pair's orthonormal basis ``A [r, d_out, d_in]``:

    coef_k = <A_k, T>,   R = T - sum_k coef_k A_k,   e_perp += ||R||^2,   e_g += sum_k coef_k^2
    grad   = 2 lambda_perp R + 2 lambda_G (T - R)            (written back in user coordinates)

One program handles ``BU x BV`` tiles of one field pair (a task of :mod:`.schedule`): it loads
the ``[BU, d_out, BV, d_in]`` block (rows through ``perm_out``, columns through ``perm_in``; for
the identity permutation a block row is ``BV * d_in`` contiguous weights), projects every tile
in registers, writes the gradient block and two float32 partial sums. Tile dims are padded to
powers of two with masks. A second small kernel sums each matrix's partials in a fixed order.

Orbit pairs (two permutation fields) run ``_orbit_tiles_kernel``: the mean over each orbit, no basis.

Weights of different layers are reached through a table of int64 addresses cast to pointers,
so one launch serves every layer whose field pairs share a tile class.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .inputs import check_inputs
from .schedule import LayerColumn, OrbitClass, Schedule, TaskColumn, TileKind, build_schedule

__all__ = ["fused_energies"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton assigns the lanes of a warp along the dimension of a load's pointer tensor with the
# largest known contiguity. With a permutation both dimensions have contiguity 1 (gathered
# indices), and the tie goes to the first dimension up to triton 3.7 (seen on 3.6) but to the
# last one in 3.8: the block is then loaded as [columns, rows] so the lanes still run along
# the columns (adjacent in memory in runs). Only speed depends on this, never results.
_COLS_FIRST_ON_TIE = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8)

# The columns of the schedule's tables (schedule.py), as compile-time constants of the kernel.
_T_LAYER = tl.constexpr(int(TaskColumn.LAYER))
_T_ROW0 = tl.constexpr(int(TaskColumn.ROW0))
_T_COL0 = tl.constexpr(int(TaskColumn.COL0))
_T_NU = tl.constexpr(int(TaskColumn.NU))
_T_NV = tl.constexpr(int(TaskColumn.NV))
_T_RANK = tl.constexpr(int(TaskColumn.RANK))
_T_BASIS_OFFSET = tl.constexpr(int(TaskColumn.BASIS_OFFSET))
_T_KIND = tl.constexpr(int(TaskColumn.KIND))
_T_W_OFFSET = tl.constexpr(int(TaskColumn.W_OFFSET))
_T_G_OFFSET = tl.constexpr(int(TaskColumn.G_OFFSET))
_T_SLOT = tl.constexpr(int(TaskColumn.SLOT))
_L_STRIDE_ROW = tl.constexpr(int(LayerColumn.STRIDE_ROW))
_L_STRIDE_COL = tl.constexpr(int(LayerColumn.STRIDE_COL))
_L_GRAD_ROW_STRIDE = tl.constexpr(int(LayerColumn.GRAD_ROW_STRIDE))
_L_PERM_OUT_OFFSET = tl.constexpr(int(LayerColumn.PERM_OUT_OFFSET))
_L_PERM_IN_OFFSET = tl.constexpr(int(LayerColumn.PERM_IN_OFFSET))
_SCALED_IDENTITY = tl.constexpr(int(TileKind.SCALED_IDENTITY))


@triton.jit
def _energy_tiles_kernel(
    task_ptr, task_start, addr_ptr, layer_ptr, basis_ptr, perm_ptr, c_perp_ptr, c_g_ptr,
    w_dtype_ptr, grad_addr_ptr, part_ptr, n_slots,
    DO: tl.constexpr, DI: tl.constexpr, DOP: tl.constexpr, DIP: tl.constexpr,
    BU: tl.constexpr, BV: tl.constexpr, IDENTITY_PERM: tl.constexpr, UNIT_COL_STRIDE: tl.constexpr,
    SMALL_OFFSETS: tl.constexpr, COLS_FIRST: tl.constexpr, WITH_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr,
    NT: tl.constexpr, NL: tl.constexpr,
):
    task = task_ptr + (task_start + tl.program_id(0)).to(tl.int64) * NT
    layer = tl.load(task + _T_LAYER)
    row0 = tl.load(task + _T_ROW0)
    col0 = tl.load(task + _T_COL0)
    nu = tl.load(task + _T_NU)
    nv = tl.load(task + _T_NV)
    r = tl.load(task + _T_RANK)
    basis_off = tl.load(task + _T_BASIS_OFFSET)
    kind = tl.load(task + _T_KIND)
    w_off = tl.load(task + _T_W_OFFSET)
    g_off = tl.load(task + _T_G_OFFSET)
    slot = tl.load(task + _T_SLOT)
    lay = layer_ptr + layer * NL
    stride_row = tl.load(lay + _L_STRIDE_ROW)
    stride_col = tl.load(lay + _L_STRIDE_COL)
    grad_row_stride = tl.load(lay + _L_GRAD_ROW_STRIDE)
    w_ptr = tl.load(addr_ptr + layer).to(w_dtype_ptr.dtype)  # int64 address -> pointer to W's dtype

    # the block as a 2D [rows, columns] tensor for the memory accesses (lanes along the columns,
    # which are contiguous in memory), reshaped to [BU, DOP, BV, DIP] tiles for the projection
    RP: tl.constexpr = BU * DOP
    CP: tl.constexpr = BV * DIP
    i = tl.arange(0, RP)
    j = tl.arange(0, CP)
    u = i // DOP
    a = i % DOP
    v = j // DIP
    b = j % DIP
    srow = row0 + u * DO + a  # structured row / column of each (copy, component)
    scol = col0 + v * DI + b
    rmask = (u < nu) & (a < DO)
    cmask = (v < nv) & (b < DI)
    if IDENTITY_PERM:
        urow = srow
        ucol = scol
    else:
        urow = tl.load(perm_ptr + tl.load(lay + _L_PERM_OUT_OFFSET) + srow, mask=rmask, other=0)
        ucol = tl.load(perm_ptr + tl.load(lay + _L_PERM_IN_OFFSET) + scol, mask=cmask, other=0)
    row_off = urow * stride_row
    if UNIT_COL_STRIDE:
        col_off = ucol
    else:
        col_off = ucol * stride_col
    if SMALL_OFFSETS:  # within-matrix offsets fit int32: half the registers per element
        row_off = row_off.to(tl.int32)
        col_off = col_off.to(tl.int32)
    mask = rmask[:, None] & cmask[None, :]
    if COLS_FIRST:  # see _COLS_FIRST_ON_TIE
        x2 = tl.trans(tl.load(w_ptr + w_off + col_off[:, None] + row_off[None, :], mask=tl.trans(mask), other=0.0))
    else:
        x2 = tl.load(w_ptr + w_off + row_off[:, None] + col_off[None, :], mask=mask, other=0.0)
    x = tl.reshape(x2.to(tl.float32), [BU, DOP, BV, DIP])

    # projection onto the field pair's equivariant maps, tile by tile; the [DOP, DIP] tensors
    # (basis, diagonal) are built 2D and broadcast, so that the block keeps its layout
    a2 = tl.arange(0, DOP)[:, None]
    b2 = tl.arange(0, DIP)[None, :]
    in_tile = (a2 < DO) & (b2 < DI)
    proj = tl.zeros([BU, DOP, BV, DIP], dtype=tl.float32)
    eg = tl.zeros([BU, BV], dtype=tl.float32)
    if kind == _SCALED_IDENTITY:
        # A = I / sqrt(d): coef = trace / sqrt(d), projection = (trace / d) I
        diag = ((a2 == b2) & in_tile)[None, :, None, :]
        tr = tl.sum(tl.sum(tl.where(diag, x, 0.0), axis=3), axis=1)  # [BU, BV]
        proj = tl.where(diag, (tr * (1.0 / DO))[:, None, :, None], 0.0)
        eg = tr * tr * (1.0 / DO)
    else:
        # r = 0 (no equivariant maps between the fields): no basis work, R = T
        for k in range(r):
            A = tl.load(basis_ptr + basis_off + k * (DO * DI) + a2 * DI + b2, mask=in_tile, other=0.0)
            A4 = A[None, :, None, :]
            coef = tl.sum(tl.sum(x * A4, axis=3), axis=1)  # [BU, BV]
            proj += coef[:, None, :, None] * A4
            eg += coef * coef
    res = x - proj
    tl.store(part_ptr + slot, tl.sum(res * res))
    tl.store(part_ptr + n_slots + slot, tl.sum(eg))

    if WITH_GRAD:
        cp2 = 2.0 * tl.load(c_perp_ptr + layer)
        cg2 = 2.0 * tl.load(c_g_ptr + layer)
        grad = tl.reshape(cp2 * res + cg2 * proj, [RP, CP])
        grow = urow * grad_row_stride
        gcol = ucol
        if SMALL_OFFSETS:
            grow = grow.to(tl.int32)
            gcol = gcol.to(tl.int32)
        grad_ptr = tl.load(grad_addr_ptr + layer).to(w_dtype_ptr.dtype)  # the layer's own gradient tensor
        if COLS_FIRST:
            g_ptrs = grad_ptr + g_off + gcol[:, None] + grow[None, :]
            if ACCUMULATE:  # out += grad; out may be W itself: this block was loaded above, before any store
                grad = grad + tl.trans(tl.load(g_ptrs, mask=tl.trans(mask), other=0.0).to(tl.float32))
            tl.store(g_ptrs, tl.trans(grad.to(w_dtype_ptr.dtype.element_ty)), mask=tl.trans(mask))
        else:
            g_ptrs = grad_ptr + g_off + grow[:, None] + gcol[None, :]
            if ACCUMULATE:
                grad = grad + tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_ptrs, grad.to(w_dtype_ptr.dtype.element_ty), mask=mask)


_ORBIT_TABLE = tl.constexpr(int(OrbitClass.TABLE))
_ORBIT_CYCLIC = tl.constexpr(int(OrbitClass.CYCLIC))
_ORBIT_DIHEDRAL = tl.constexpr(int(OrbitClass.DIHEDRAL))
_ORBIT_PRODUCT = tl.constexpr(int(OrbitClass.PRODUCT))
_ORBIT_POINTS = tl.constexpr(int(OrbitClass.POINTS))
_ORBIT_SIGNED = tl.constexpr(int(OrbitClass.SIGNED))


@triton.jit
def _orbit_tiles_kernel(
    task_ptr, task_start, addr_ptr, layer_ptr, basis_ptr, perm_ptr, c_perp_ptr, c_g_ptr,
    w_dtype_ptr, grad_addr_ptr, part_ptr, n_slots,
    DO: tl.constexpr, DI: tl.constexpr, DOP: tl.constexpr, DIP: tl.constexpr,
    BU: tl.constexpr, BV: tl.constexpr, IDENTITY_PERM: tl.constexpr, FORM: tl.constexpr,
    WITH_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr, NT: tl.constexpr, NL: tl.constexpr,
):
    """The tiles of an orbit pair (two permutation fields, docs/math.md §9): ``P(T)`` is the mean of T
    over each orbit of G on the tile's entries. Closed forms (C_N, D_N regular fields) and products
    (a regular output field, input ``f_1 ⊗ f_2``): entry ``(a, k)`` of the loaded block is the tile
    entry of row a in orbit k (a skewed load), so an orbit is a column and its mean a sum over the
    rows, O(1) work per weight; the orbits are taken ``DIP`` at a time (a product's tile may be larger
    than the registers: 48 x 1296 for O_h regular fields on 3x3x3 kernels). Orbit tables: one masked
    sum per orbit (K passes over the registers), the whole tile at once (``DIP >= DI``); a signed table
    (two monomial fields) stores ``c(e) (k + 1)`` and takes every entry with its sign. Pairs stored by
    the group's permutations (``sigma^out`` ``[|G|, DO]``, ``sigma^in`` ``[|G|, DI]`` after ``|G|``): the
    mean of the tile's |G| images ``T[sigma_g(a), sigma_g(b)]``, each a gathered load of the whole tile."""
    task = task_ptr + (task_start + tl.program_id(0)).to(tl.int64) * NT
    layer = tl.load(task + _T_LAYER)
    row0 = tl.load(task + _T_ROW0)
    col0 = tl.load(task + _T_COL0)
    nu = tl.load(task + _T_NU)
    nv = tl.load(task + _T_NV)
    n_orbits = tl.load(task + _T_RANK)
    basis_off = tl.load(task + _T_BASIS_OFFSET)
    w_off = tl.load(task + _T_W_OFFSET)
    g_off = tl.load(task + _T_G_OFFSET)
    slot = tl.load(task + _T_SLOT)
    lay = layer_ptr + layer * NL
    stride_row = tl.load(lay + _L_STRIDE_ROW)
    stride_col = tl.load(lay + _L_STRIDE_COL)
    grad_row_stride = tl.load(lay + _L_GRAD_ROW_STRIDE)
    w_ptr = tl.load(addr_ptr + layer).to(w_dtype_ptr.dtype)
    if WITH_GRAD:
        cp2 = 2.0 * tl.load(c_perp_ptr + layer)
        cg2 = 2.0 * tl.load(c_g_ptr + layer)
        grad_ptr = tl.load(grad_addr_ptr + layer).to(w_dtype_ptr.dtype)

    RP: tl.constexpr = BU * DOP
    CP: tl.constexpr = BV * DIP
    i = tl.arange(0, RP)
    j = tl.arange(0, CP)
    u = i // DOP
    a = i % DOP
    v = j // DIP
    kj = j % DIP
    a2 = a[:, None]
    srow = row0 + u * DO + a
    rmask = (u < nu) & (a < DO)
    if IDENTITY_PERM:
        urow = srow
    else:
        urow = tl.load(perm_ptr + tl.load(lay + _L_PERM_OUT_OFFSET) + srow, mask=rmask, other=0)
    if FORM == _ORBIT_PRODUCT:  # the factor tables: d_2, T_1 [DO, d_1], T_2 [DO, d_2]
        d2 = tl.load(basis_ptr + basis_off).to(tl.int32)
        d1 = DI // d2
    ta = tl.arange(0, DOP)[:, None]
    row_in = (ta < DO)[None, :, :, None]  # [1, DOP, 1, 1]
    ep_sum = tl.zeros([BU, BV], dtype=tl.float32)
    eg_sum = tl.zeros([BU, BV], dtype=tl.float32)
    for c0 in range(0, DI, DIP):
        k = c0 + kj
        k_in = k < DI
        k2 = k[None, :]
        if FORM == _ORBIT_CYCLIC:  # orbit k of row a: column (a + k) mod N
            b2 = (a2 + k2) % DI
        elif FORM == _ORBIT_DIHEDRAL:  # row a = k_a + N s, orbit k = k_k + N t
            NH: tl.constexpr = DI // 2
            ka = a2 % NH
            kk = k2 % NH
            b2 = tl.where(a2 // NH == 0, (ka + kk) % NH + NH * (k2 // NH), (ka - kk + NH) % NH + NH * (1 - k2 // NH))
        elif FORM == _ORBIT_PRODUCT:  # orbit k = c d_2 + q of row a: column T_1[a, c] d_2 + T_2[a, q]
            kc = tl.where(k_in, k, 0)[None, :]
            tmask = (a2 < DO) & k_in[None, :]
            t1 = tl.load(basis_ptr + basis_off + 1 + a2 * d1 + kc // d2, mask=tmask, other=0.0).to(tl.int32)
            t2 = tl.load(basis_ptr + basis_off + 1 + DO * d1 + a2 * d2 + kc % d2, mask=tmask, other=0.0).to(tl.int32)
            b2 = t1 * d2 + t2
        else:
            b2 = k2 + 0 * a2
        scol = col0 + (v * DI)[None, :] + b2  # [RP, CP]
        mask = rmask[:, None] & ((v < nv) & k_in)[None, :]
        if IDENTITY_PERM:
            ucol = scol
        else:
            ucol = tl.load(perm_ptr + tl.load(lay + _L_PERM_IN_OFFSET) + scol, mask=mask, other=0)
        x2 = tl.load(w_ptr + w_off + urow[:, None] * stride_row + ucol * stride_col, mask=mask, other=0.0)
        x = tl.reshape(x2.to(tl.float32), [BU, DOP, BV, DIP])

        if FORM == _ORBIT_POINTS:  # P(T)[a, b] = (1/|G|) sum_g T[sigma_g(a), sigma_g(b)]
            n_g = tl.load(basis_ptr + basis_off).to(tl.int32)
            images = tl.zeros([RP, CP], dtype=tl.float32)
            for e in range(n_g):
                so = tl.load(basis_ptr + basis_off + 1 + e * DO + a, mask=rmask, other=0.0).to(tl.int32)  # [RP]
                si = tl.load(basis_ptr + basis_off + 1 + n_g * DO + e * DI + kj, mask=k_in, other=0.0).to(tl.int32)
                grow = row0 + u * DO + so
                gcol = col0 + v * DI + si
                if not IDENTITY_PERM:
                    grow = tl.load(perm_ptr + tl.load(lay + _L_PERM_OUT_OFFSET) + grow, mask=rmask, other=0)
                    gcol = tl.load(perm_ptr + tl.load(lay + _L_PERM_IN_OFFSET) + gcol, mask=(v < nv) & k_in, other=0)
                images += tl.load(w_ptr + w_off + grow[:, None] * stride_row + gcol[None, :] * stride_col, mask=mask,
                                  other=0.0).to(tl.float32)
            proj = tl.reshape(images, [BU, DOP, BV, DIP]) / n_g.to(tl.float32)
            eg_sum += tl.sum(tl.sum(proj * proj, axis=3), axis=1)
        elif FORM == _ORBIT_TABLE:
            tb = k2
            in_tile = (ta < DO) & (tb < DI)
            # the table's entry of every column of the task ([DOP, BV * DIP]), as the tile's [1, DOP, BV, DIP]
            orbit = tl.reshape(tl.load(basis_ptr + basis_off + ta * DI + tb, mask=in_tile, other=-1.0).to(tl.int32),
                               [1, DOP, BV, DIP])
            proj = tl.zeros([BU, DOP, BV, DIP], dtype=tl.float32)
            for o in range(n_orbits):
                inv = tl.load(basis_ptr + basis_off + DO * DI + o)
                sel = orbit == o
                total = tl.sum(tl.sum(tl.where(sel, x, 0.0), axis=3), axis=1)  # [BU, BV]
                proj += tl.where(sel, (total * inv)[:, None, :, None], 0.0)
                eg_sum += total * total * inv
        elif FORM == _ORBIT_SIGNED:  # code c(e) (k + 1); 0: no equivariant part (never selected)
            tb = k2
            in_tile = (ta < DO) & (tb < DI)
            code = tl.reshape(tl.load(basis_ptr + basis_off + ta * DI + tb, mask=in_tile, other=0.0).to(tl.int32),
                              [1, DOP, BV, DIP])
            sign = tl.where(code < 0, -1.0, 1.0)
            signed_x = x * sign
            proj = tl.zeros([BU, DOP, BV, DIP], dtype=tl.float32)
            for o in range(n_orbits):
                inv = tl.load(basis_ptr + basis_off + DO * DI + o)
                sel = (code == o + 1) | (code == -o - 1)
                total = tl.sum(tl.sum(tl.where(sel, signed_x, 0.0), axis=3), axis=1)  # [BU, BV]
                proj += tl.where(sel, (total * inv)[:, None, :, None] * sign, 0.0)
                eg_sum += total * total * inv
        else:  # every orbit meets every row once: the orbit sums are the column sums
            total = tl.sum(x, axis=1)  # [BU, BV, DIP]
            proj = tl.where(row_in, (total * (1.0 / DO))[:, None, :, :], 0.0)
            eg_sum += tl.sum(total * total, axis=2) * (1.0 / DO)
        res = x - proj
        ep_sum += tl.sum(tl.sum(res * res, axis=3), axis=1)

        if WITH_GRAD:
            grad = tl.reshape(cp2 * res + cg2 * proj, [RP, CP])
            g_ptrs = grad_ptr + g_off + urow[:, None] * grad_row_stride + ucol
            if ACCUMULATE:  # out may be W itself: this block was loaded above, before any store
                grad = grad + tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_ptrs, grad.to(w_dtype_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + slot, tl.sum(ep_sum))
    tl.store(part_ptr + n_slots + slot, tl.sum(eg_sum))


@triton.jit
def _segment_sum_kernel(part_ptr, start_ptr, out_addr_ptr, n_slots, n_matrices, BLOCK: tl.constexpr):
    """E_perp / E_G of matrix k = the sum of its partials in a fixed order, stored at the float32
    addresses ``out_addr[k]`` / ``out_addr[n_matrices + k]`` (each layer's own output tensors)."""
    k = tl.program_id(0)
    s = tl.load(start_ptr + k)
    e = tl.load(start_ptr + k + 1)
    acc_perp = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(s, e, BLOCK):
        idx = j + tl.arange(0, BLOCK)
        m = idx < e
        acc_perp += tl.load(part_ptr + idx, mask=m, other=0.0)
        acc_g += tl.load(part_ptr + n_slots + idx, mask=m, other=0.0)
    tl.store(tl.load(out_addr_ptr + k).to(part_ptr.dtype), tl.sum(acc_perp))
    tl.store(tl.load(out_addr_ptr + n_matrices + k).to(part_ptr.dtype), tl.sum(acc_g))


_SCHEDULES: "OrderedDict[tuple, tuple[Schedule, dict]]" = OrderedDict()
_SCHEDULE_CACHE_SIZE = 32


def _schedule(weights, plans, device) -> tuple[Schedule, dict]:
    """Cached schedule for these layouts and plans, plus its cache of address tables."""
    key = (device,) + tuple((id(P), W.dtype, tuple(W.shape), W.stride()) for W, P in zip(weights, plans))
    hit = _SCHEDULES.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0].plans, plans)):
        _SCHEDULES.move_to_end(key)
        return hit
    entry = (build_schedule(weights, plans, device), OrderedDict())
    _SCHEDULES[key] = entry
    if len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
        _SCHEDULES.popitem(last=False)
    return entry


def _addresses(weights, cache: dict, device) -> torch.Tensor:
    """int64 device table of the weights' data pointers; cached, since parameters keep their storage."""
    return _address_table(tuple(W.data_ptr() for W in weights), cache, device)


def _address_table(ptrs: tuple, cache: dict, device) -> torch.Tensor:
    """int64 device tensor of ``ptrs`` (cached by value: the allocator often hands out the same blocks)."""
    t = cache.get(ptrs)
    if t is None:
        t = torch.tensor(ptrs, dtype=torch.int64).to(device)
        cache[ptrs] = t
        if len(cache) > 8:
            cache.popitem(last=False)
    return t


def _new_buffer(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocation of the outputs every element of which the kernel writes (tests poison it)."""
    return torch.empty(numel, dtype=dtype, device=device)


def fused_energies(weights, plans, lambda_perp=None, lambda_G=None, outs=None):
    """Energies and penalty gradients of many layers, with a number of launches independent of L.

    Args:
        weights: L CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``), the i-th
            ``[..., m_i, n_i]`` (any strides; leading dims are a batch), float16 / bfloat16 /
            float32; all on one device. float64 raises ``ValueError`` (route it elsewhere).
        plans: L :class:`~equiproj._plan.PackedPlan` from ``block_plan(rep_in, rep_out).packed(device,
            torch.float32)`` (a float64 basis is accepted too and used in float32).
        lambda_perp, lambda_G: ``[L]`` coefficients (any device; on the weights' device avoids a copy), or
            both ``None`` for energies only.
        outs: ``None``, or L contiguous tensors of the weights' shapes and dtypes to which the
            gradients are added in place (``outs[i]`` may be ``weights[i]`` itself: every block is
            loaded before it is stored); then ``grads`` is ``outs``.
    Returns:
        ``(e_perp, e_g, grads)``: lists of L float32 tensors ``[...]`` (one energy per matrix),
        and ``grads[i] = 2 c_perp_i (W_i - P W_i) + 2 c_g_i P W_i``, contiguous ``[..., m_i, n_i]``
        in W_i's dtype, or ``None``. Results are detached from autograd. Bitwise deterministic
        for the same inputs on the same device.

    Launches: one per tile class (distinct (dtype, d_out, d_in, permuted?, unit column stride?)
    among all field pairs) plus one reduction; the task tables are built once per layout and
    cached.
    """
    weights, plans, lambda_perp, lambda_G = check_inputs(weights, plans, lambda_perp, lambda_G, allow_float64=False)
    if not weights:
        return [], [], ([] if lambda_perp is not None else None)
    device = weights[0].device
    for i, W in enumerate(weights):
        if W.device != device:
            raise ValueError(f"all weights must be on one device: weights[0] is on {device}, weights[{i}] on {W.device}")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"fused_energies runs on CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
                         "importing equiproj.kernels to run it on the CPU, or use torch_fused_energies")
    want_grad = lambda_perp is not None
    sched, addr_cache = _schedule(weights, plans, device)
    addresses = _addresses(weights, addr_cache, device)

    partials = _new_buffer(2 * sched.n_slots, torch.float32, device)
    # every output is a tensor of its own: the outputs of a custom op may not share storage
    e_perp = [_new_buffer(_numel(s), torch.float32, device).view(s) for s in sched.batch_shapes]
    e_g = [_new_buffer(_numel(s), torch.float32, device).view(s) for s in sched.batch_shapes]
    if outs is not None:
        if not want_grad or len(outs) != len(weights):
            raise ValueError("outs needs coefficients and one tensor per weight")
        for i, (o, W) in enumerate(zip(outs, weights)):
            if o.shape != W.shape or o.dtype != W.dtype or o.device != W.device or not o.is_contiguous():
                raise ValueError(f"outs[{i}] must be a contiguous tensor of the shape, dtype and device of "
                                 f"weights[{i}] ({tuple(W.shape)}, {W.dtype})")
        grads = list(outs)
    else:
        grads = [_new_buffer(W.numel(), W.dtype, device).view(W.shape) for W in weights] if want_grad else []
    out_addresses = _address_table(tuple(
        e.data_ptr() + 4 * j for es in (e_perp, e_g) for e in es for j in range(e.numel())), addr_cache, device)
    grad_addresses = _address_table(tuple(g.data_ptr() for g in grads), addr_cache, device) if want_grad else addresses
    if want_grad:
        lambda_perp = lambda_perp.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
        lambda_G = lambda_G.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
    else:
        lambda_perp = lambda_G = partials  # never read

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        w_of_dtype = {W.dtype: W for W in weights}
        for tc in sched.classes:
            dop, dip = tc.padded
            w_ref = w_of_dtype[tc.dtype]
            if tc.orbit != OrbitClass.NONE:
                _orbit_tiles_kernel[(tc.count,)](
                    sched.tasks, tc.start, addresses, sched.layers, sched.basis, sched.perms, lambda_perp, lambda_G,
                    w_ref, grad_addresses, partials, sched.n_slots,
                    DO=tc.d_out, DI=tc.d_in, DOP=dop, DIP=dip, BU=tc.bu, BV=tc.bv,
                    IDENTITY_PERM=tc.identity_perm, FORM=int(tc.orbit), WITH_GRAD=want_grad,
                    ACCUMULATE=outs is not None, NT=len(TaskColumn), NL=len(LayerColumn), num_warps=tc.num_warps,
                )
                continue
            _energy_tiles_kernel[(tc.count,)](
                sched.tasks, tc.start, addresses, sched.layers, sched.basis, sched.perms, lambda_perp, lambda_G,
                w_ref, grad_addresses, partials, sched.n_slots,
                DO=tc.d_out, DI=tc.d_in, DOP=dop, DIP=dip, BU=tc.bu, BV=tc.bv,
                IDENTITY_PERM=tc.identity_perm, UNIT_COL_STRIDE=tc.unit_col_stride,
                SMALL_OFFSETS=tc.small_offsets, COLS_FIRST=not tc.identity_perm and _COLS_FIRST_ON_TIE,
                WITH_GRAD=want_grad, ACCUMULATE=outs is not None,
                NT=len(TaskColumn), NL=len(LayerColumn), num_warps=tc.num_warps,
            )
        if sched.n_matrices:
            _segment_sum_kernel[(sched.n_matrices,)](
                partials, sched.slot_start, out_addresses, sched.n_slots, sched.n_matrices,
                BLOCK=256 if not _INTERPRET else 1024,
            )
    return e_perp, e_g, (grads if want_grad else None)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
