"""The host-side schedule of the fused Triton kernel (``kernels/schedule.py``): plain integer
bookkeeping, tested without Triton.

The tables are checked against expectations derived independently from the weights (shapes,
strides, dtypes) and the packed plans (``PlanRow``): slot ownership per matrix, tile classes and
their keys, coverage of every weight exactly once, the addresses the kernel would read (emulated
from the task, layer and permutation tables on the weight's storage), bases and tile kinds.
(``tests/ops/test_triton.py::test_schedule_slots_cover_each_matrix_once`` covers the basic slot
and coverage case of one plan.)
"""

from __future__ import annotations

import math

import pytest
import torch

import equiproj as ep
from equiproj._plan import block_plan
from equiproj.kernels.schedule import (MAX_TILE_ELEMENTS, LayerColumn, Schedule, TaskColumn, TileClass, TileKind,
                                       build_schedule, tile_shape)
from equiproj.testing import random_orthogonal

T, L = TaskColumn, LayerColumn
CPU = torch.device("cpu")


def _pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length() if x > 1 else 1


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


# ---- tile_shape --------------------------------------------------------------------------------
SHAPES = [(1, 1), (1, 3), (3, 1), (2, 2), (3, 5), (5, 3), (8, 8), (9, 7), (16, 1), (1, 16), (25, 25), (64, 64),
          (128, 128), (100, 3)]
COPIES = [(1, 1), (1, 7), (7, 1), (3, 5), (16, 16), (100, 1), (1, 100), (33, 65)]


def _check_tile(do, di, mo, mi, target, warps):
    bu, bv = tile_shape(do, di, mo, mi, target, warps)
    where = f"tile_shape({do}, {di}, {mo}, {mi}, {target}, {warps}) = {(bu, bv)}"
    assert isinstance(bu, int) and isinstance(bv, int), where
    assert _is_pow2(bu) and _is_pow2(bv), where + ": not powers of two"
    # never more copies than the (padded) largest count of the class
    assert bu <= _pow2(mo) and bv <= _pow2(mi), where
    dop, dip = _pow2(do), _pow2(di)
    elems = bu * dop * bv * dip
    # within the target, except that one task always spans at least one tile and a warp row of columns
    assert elems <= max(target, dop * max(dip, 32 * warps)), where + f": {elems} padded elements"
    # the target is used: no direction could double without exceeding it (or the copy counts)
    if elems * 2 <= target:
        assert bu == _pow2(mo) and bv == _pow2(mi), where + ": a task could hold twice as many tiles"
    return bu, bv


@pytest.mark.parametrize("warps", [1, 4, 8])
@pytest.mark.parametrize("target", [64, 4096, 16384])
def test_tile_shape_powers_of_two_within_limits(target, warps):
    for do, di in SHAPES:
        for mo, mi in COPIES:
            _check_tile(do, di, mo, mi, target, warps)


def test_tile_shape_prefers_warp_wide_rows():
    # a row of the task spans 32 * num_warps padded columns when the copies allow it
    assert tile_shape(1, 1, 64, 256, 4096, 4) == (32, 128)
    assert tile_shape(4, 4, 8, 64, 4096, 4) == (8, 32)
    assert tile_shape(4, 4, 8, 2, 4096, 4) == (8, 2)  # few input copies: rows take the rest
    assert tile_shape(128, 128, 5, 5, 4096, 4) == (1, 1)  # one tile exceeds the target: one tile per task


@pytest.mark.parametrize("target", [100, 3000, 5000, 12345])
def test_tile_shape_powers_of_two_for_any_target(target):
    """``target_elems`` (EQUIPROJ_TRITON_TILE) need not be a power of two; BU, BV must be (they are
    the compile-time shapes ``[BU, DOP, BV, DIP]`` of the kernel's tiles)."""
    for do, di in SHAPES:
        for mo, mi in COPIES:
            _check_tile(do, di, mo, mi, target, 4)


# ---- build_schedule: a model of several layers -------------------------------------------------
def _so2_permuted():
    G = ep.SO2()  # complex type: r = 2 between equal frequencies; a permuted tensor product
    return ep.Rep.parse(G, "0 + 1") @ ep.Rep.parse(G, "1 + 2"), ep.Rep.parse(G, "2x0 + 3x1 + 2")


def _octahedral_fields():
    G = ep.Octahedral()  # real type: A = I/sqrt(d) between equal irreps (the scaled-identity path)
    return ep.Rep.parse(G, "3xA1 + 5xE + 2xT1 + T2"), ep.Rep.parse(G, "2xA1 + 7xE + 3xT1")


def _dense(gen):
    G = ep.Dihedral(3)  # a changed basis: r = 1 pairs that are not the identity, and d_out != d_in
    a = G.regular() + G.standard()
    return a.change_basis(random_orthogonal(a.dim, gen)), ep.Rep.parse(G, "2x(0,0) + 4x(1,1) + (1,0)")


def _layers(gen):
    """(weights, plans, exact): batched, float16, transposed, permuted-stride batch, huge-stride (meta) layers."""
    ri1, ro1 = _so2_permuted()
    ri2, ro2 = _octahedral_fields()
    ri3, ro3 = _dense(gen)
    B1, B2, B3 = block_plan(ri1, ro1), block_plan(ri2, ro2), block_plan(ri3, ro3)
    P1, P2, P3 = (B.packed("cpu", torch.float32) for B in (B1, B2, B3))
    # the float64 bases of each plan's field pairs (the float32 plans hold them rounded)
    exact = {id(P): [fp.basis for fp in B.field_pairs] for P, B in ((P1, B1), (P2, B2), (P3, B3))}
    m1, n1, m2, n2, m3, n3 = ro1.dim, ri1.dim, ro2.dim, ri2.dim, ro3.dim, ri3.dim
    weights = [
        torch.arange(3 * m1 * n1, dtype=torch.float32).reshape(3, m1, n1),  # batched, contiguous
        torch.arange(m1 * n1, dtype=torch.float16).reshape(m1, n1),  # same plan, float16
        torch.arange(n2 * m2, dtype=torch.float32).reshape(n2, m2).T,  # transposed: column stride m2
        torch.arange(m2 * 2 * n2 * 3, dtype=torch.float32).reshape(m2, 2, n2, 3).permute(1, 3, 0, 2),  # [2, 3, m, n]
        torch.arange(2 * m3 * (n3 + 4), dtype=torch.float32).reshape(2, m3, n3 + 4)[:, :, 3 : 3 + n3],  # sliced columns
        torch.empty_strided((m2, n2), (2**31 // (m2 - 1) + 1, 1), device="meta"),  # offsets beyond int32
    ]
    plans = [P1, P1, P2, P2, P3, P2]
    return weights, plans, exact


def _pair_of(plan, row0, col0):
    """The plan row (field pair) whose region holds structured element (row0, col0)."""
    hits = [p for p in plan.rows() if p.out_offset <= row0 < p.out_offset + p.out_copies * p.d_out
            and p.in_offset <= col0 < p.in_offset + p.in_copies * p.d_in]
    assert len(hits) == 1
    return hits[0]


def _matrix_offsets(W):
    """Element offsets of the first element of each matrix of W, batch row-major, from its strides."""
    batch = W.shape[:-2]
    if not batch:
        return [0]
    idx = torch.cartesian_prod(*[torch.arange(s) for s in batch]).reshape(-1, len(batch))  # row-major
    return (idx * torch.tensor(W.stride()[:-2], dtype=torch.long)).sum(-1).tolist()


def _class_key(W, plan, row):
    within = (W.shape[-2] - 1) * W.stride(-2) + (W.shape[-1] - 1) * W.stride(-1)
    small = max(within, W.shape[-2] * W.shape[-1]) < 2**31
    return (W.dtype, row.d_out, row.d_in, plan.identity_perm, W.stride(-1) == 1, small)


TARGETS = [(64, 1), (256, 2), (16384, 4)]


@pytest.fixture(params=TARGETS, ids=lambda t: f"{t[0]}x{t[1]}")
def model(request, gen):
    weights, plans, exact = _layers(gen)
    s = build_schedule(weights, plans, CPU, target=request.param)
    return weights, plans, s, request.param, exact


def _task_matrix(s: Schedule, task) -> int:
    hits = [k for k in range(s.n_matrices) if s.slot_start[k] <= task[T.SLOT] < s.slot_start[k + 1]]
    assert len(hits) == 1
    return hits[0]


def test_matrices_and_slots(model):
    weights, plans, s, _, _ = model
    t = s.tasks
    assert t.dtype == torch.int64 and t.shape[1] == len(TaskColumn) and t.device == CPU
    nb = [math.prod(W.shape[:-2]) for W in weights]
    assert s.n_matrices == sum(nb)
    assert s.batch_shapes == [tuple(W.shape[:-2]) for W in weights]
    assert s.matrix_offset == [sum(nb[:i]) for i in range(len(weights))]
    # slots: a permutation of range(n_slots); matrix k owns [slot_start[k], slot_start[k+1])
    assert sorted(t[:, T.SLOT].tolist()) == list(range(s.n_slots))
    ss = s.slot_start.tolist()
    assert len(ss) == s.n_matrices + 1 and ss[0] == 0 and ss[-1] == s.n_slots
    assert all(a < b for a, b in zip(ss, ss[1:])), "every matrix owns at least one slot"
    # the matrix of a task, from its layer and weight offset, owns the task's slot
    for layer, W in enumerate(weights):
        offs = _matrix_offsets(W)
        mine = t[t[:, T.LAYER] == layer]
        for b, off in enumerate(offs):
            k = s.matrix_offset[layer] + b
            rows = mine[mine[:, T.W_OFFSET] == off]
            assert (rows[:, T.G_OFFSET] == b * W.shape[-2] * W.shape[-1]).all()
            assert sorted(rows[:, T.SLOT].tolist()) == list(range(ss[k], ss[k + 1])), f"layer {layer}, matrix {b}"
        assert len(mine) == len(offs) * (ss[s.matrix_offset[layer] + 1] - ss[s.matrix_offset[layer]])
    # slots within a matrix follow the plan's field pairs in order
    for k in range(s.n_matrices):
        rows = t[(t[:, T.SLOT] >= ss[k]) & (t[:, T.SLOT] < ss[k + 1])]
        rows = rows[rows[:, T.SLOT].argsort()]
        plan = plans[int(rows[0, T.LAYER])]
        order = [plan.rows().index(_pair_of(plan, int(r[T.ROW0]), int(r[T.COL0]))) for r in rows]
        assert order == sorted(order)


def test_tile_classes(model):
    weights, plans, s, target, _ = model
    t = s.tasks
    # classes: contiguous, in order, covering the whole table, each non-empty
    starts = [(c.start, c.count) for c in s.classes]
    assert all(isinstance(c, TileClass) and c.count > 0 for c in s.classes)
    assert starts[0][0] == 0 and sum(c for _, c in starts) == len(t)
    assert all(a + n == b for (a, n), (b, _) in zip(starts, starts[1:]))
    # every task of a class has the class's key; distinct classes have distinct keys
    keys = [(c.dtype, c.d_out, c.d_in, c.identity_perm, c.unit_col_stride, c.small_offsets) for c in s.classes]
    assert len(set(keys)) == len(keys)
    expected_keys = {}
    for i, (W, P) in enumerate(zip(weights, plans)):
        for row in P.rows():
            k = _class_key(W, P, row)
            mo, mi = expected_keys.get(k, (0, 0))
            expected_keys[k] = (max(mo, row.out_copies), max(mi, row.in_copies))
    assert set(keys) == set(expected_keys)
    for c, key in zip(s.classes, keys):
        rows = t[c.start : c.start + c.count]
        for r in rows.tolist():
            i = r[T.LAYER]
            pair = _pair_of(plans[i], r[T.ROW0], r[T.COL0])
            assert _class_key(weights[i], plans[i], pair) == key
            assert 1 <= r[T.NU] <= c.bu and 1 <= r[T.NV] <= c.bv
        # the tile shape from the largest copy counts of the class
        assert (c.bu, c.bv) == tile_shape(c.d_out, c.d_in, *expected_keys[key], *target)
        assert c.num_warps == target[1]
        assert c.padded == (_pow2(c.d_out), _pow2(c.d_in))
        assert c.elements == c.bu * c.bv * _pow2(c.d_out) * _pow2(c.d_in)
    # the model exercises each key component
    assert {k[0] for k in keys} == {torch.float32, torch.float16}
    assert {k[3] for k in keys} == {True, False} and {k[4] for k in keys} == {True, False}
    assert {k[5] for k in keys} == {True, False}


def test_each_weight_covered_once(model):
    weights, plans, s, _, _ = model
    covers = [torch.zeros(math.prod(W.shape[:-2]), W.shape[-2], W.shape[-1], dtype=torch.long) for W in weights]
    for r in s.tasks.tolist():
        i = r[T.LAYER]
        pair = _pair_of(plans[i], r[T.ROW0], r[T.COL0])
        # a task starts at a copy boundary of its field pair and stays inside it
        assert (r[T.ROW0] - pair.out_offset) % pair.d_out == 0 and (r[T.COL0] - pair.in_offset) % pair.d_in == 0
        assert r[T.ROW0] + r[T.NU] * pair.d_out <= pair.out_offset + pair.out_copies * pair.d_out
        assert r[T.COL0] + r[T.NV] * pair.d_in <= pair.in_offset + pair.in_copies * pair.d_in
        b = _task_matrix(s, r) - s.matrix_offset[i]
        covers[i][b, r[T.ROW0] : r[T.ROW0] + r[T.NU] * pair.d_out, r[T.COL0] : r[T.COL0] + r[T.NV] * pair.d_in] += 1
    for i, c in enumerate(covers):
        assert int(c.min()) == 1 and int(c.max()) == 1, f"layer {i}: coverage counts {c.unique().tolist()}"


def test_layer_table_and_emulated_reads(model):
    """Read every structured tile the way the kernel addresses it (task + layer + permutation tables,
    offsets from the weight's first element) and compare with ``W[..., perm_out, :][..., perm_in]``."""
    weights, plans, s, _, _ = model
    lay = s.layers
    assert lay.shape == (len(weights), len(LayerColumn)) and lay.dtype == torch.int64
    perms = s.perms
    for i, (W, P) in enumerate(zip(weights, plans)):
        row = lay[i].tolist()
        assert (row[L.STRIDE_ROW], row[L.STRIDE_COL]) == (W.stride(-2), W.stride(-1))
        assert row[L.GRAD_ROW_STRIDE] == P.n
        assert torch.equal(perms[row[L.PERM_OUT_OFFSET] : row[L.PERM_OUT_OFFSET] + P.m], P.perm_out)
        assert torch.equal(perms[row[L.PERM_IN_OFFSET] : row[L.PERM_IN_OFFSET] + P.n], P.perm_in)
    for i, (W, P) in enumerate(zip(weights, plans)):
        if W.device.type == "meta":
            continue
        flat = torch.as_strided(W, (W.untyped_storage().nbytes() // W.element_size() - W.storage_offset(),), (1,))
        sr, sc = lay[i, L.STRIDE_ROW].item(), lay[i, L.STRIDE_COL].item()
        po = perms[lay[i, L.PERM_OUT_OFFSET] : lay[i, L.PERM_OUT_OFFSET] + P.m]
        pi = perms[lay[i, L.PERM_IN_OFFSET] : lay[i, L.PERM_IN_OFFSET] + P.n]
        Wb = W.reshape(-1, P.m, P.n)
        got = torch.full(Wb.shape, float("nan"), dtype=W.dtype)
        for r in s.tasks[s.tasks[:, T.LAYER] == i].tolist():
            pair = _pair_of(P, r[T.ROW0], r[T.COL0])
            rows = torch.arange(r[T.ROW0], r[T.ROW0] + r[T.NU] * pair.d_out)
            cols = torch.arange(r[T.COL0], r[T.COL0] + r[T.NV] * pair.d_in)
            addr = r[T.W_OFFSET] + po[rows][:, None] * sr + pi[cols][None, :] * sc
            b = _task_matrix(s, r) - s.matrix_offset[i]
            got[b, rows[:, None], cols[None, :]] = flat[addr]
        expect = Wb[:, P.perm_out][:, :, P.perm_in]
        assert torch.equal(got, expect), f"layer {i}: the tables address other weights"


def test_bases_ranks_and_tile_kinds(model):
    weights, plans, s, _, exact = model
    assert s.basis.dtype == torch.float32
    kinds = set()
    for r in s.tasks.tolist():
        P = plans[r[T.LAYER]]
        pair = _pair_of(P, r[T.ROW0], r[T.COL0])
        A = exact[id(P)][P.rows().index(pair)]
        assert r[T.RANK] == pair.rank == A.shape[0]
        n = pair.rank * pair.d_out * pair.d_in
        got = s.basis[r[T.BASIS_OFFSET] : r[T.BASIS_OFFSET] + n]
        assert got.numel() == n
        torch.testing.assert_close(got.double(), A.reshape(-1), atol=1e-7, rtol=0)
        # SCALED_IDENTITY exactly for r = 1 with A = I / sqrt(d)
        scaled = (pair.rank == 1 and pair.d_out == pair.d_in
                  and bool(torch.allclose(A[0], torch.eye(pair.d_in, dtype=torch.float64) / math.sqrt(pair.d_in),
                                          atol=1e-12, rtol=0)))
        assert r[T.KIND] == (TileKind.SCALED_IDENTITY if scaled else TileKind.GENERAL)
        kinds.add((r[T.KIND], pair.rank, pair.d_out == pair.d_in))
    # non-vacuous: scaled identities, general r = 1 (changed basis), r = 2 (complex), r = 0 pairs
    assert (TileKind.SCALED_IDENTITY, 1, True) in kinds
    assert any(k == TileKind.GENERAL and rank == 1 for k, rank, _ in kinds)
    assert any(rank == 2 for _, rank, _ in kinds) and any(rank == 0 for _, rank, _ in kinds)
    assert any(rank > 0 and not square for _, rank, square in kinds)


def test_schedule_is_a_function_of_the_layouts(gen):
    """The same layouts give the same tables (values of the weights do not matter)."""
    weights, plans, _ = _layers(gen)
    a = build_schedule(weights, plans, CPU, target=(256, 2))
    b = build_schedule([torch.empty_strided(W.shape, W.stride(), dtype=W.dtype, device="meta") for W in weights],
                       plans, CPU, target=(256, 2))
    assert torch.equal(a.tasks, b.tasks) and torch.equal(a.layers, b.layers) and torch.equal(a.perms, b.perms)
    assert torch.equal(a.slot_start, b.slot_start) and torch.equal(a.basis, b.basis)
    assert [(c.start, c.count, c.bu, c.bv) for c in a.classes] == [(c.start, c.count, c.bu, c.bv) for c in b.classes]


def test_empty_schedule():
    s = build_schedule([], [], CPU, target=(64, 1))
    assert s.tasks.shape == (0, len(TaskColumn)) and s.classes == [] and s.n_slots == 0 and s.n_matrices == 0
    assert s.slot_start.tolist() == [0]


def _big_plan(d_in_copies: int, d_out_copies: int):
    G = ep.SO2()  # frequencies 1 and 2 share nothing: r = 0, one field pair of the changed-basis fields
    g = torch.Generator().manual_seed(5)
    a = d_in_copies * G.irrep(1)
    b = d_out_copies * G.irrep(2)
    a = a.change_basis(random_orthogonal(a.dim, g))
    b = b.change_basis(random_orthogonal(b.dim, g))
    return block_plan(a, b).packed("cpu", torch.float32)


def test_tile_element_limit():
    assert MAX_TILE_ELEMENTS == 128 * 128
    ok = _big_plan(64, 64)  # 128 x 128: exactly the limit
    assert len(ok.rows()) == 1 and (ok.rows()[0].d_out, ok.rows()[0].d_in) == (128, 128)
    s = build_schedule([torch.empty(128, 128, device="meta")], [ok], CPU, target=(64, 1))
    assert s.n_slots >= 1
    too_big = _big_plan(33, 65)  # 130 x 66 -> padded 256 x 128 = 2 x the limit
    row = too_big.rows()[0]
    assert _pow2(row.d_out) * _pow2(row.d_in) > MAX_TILE_ELEMENTS
    with pytest.raises(ValueError, match="tile limit"):
        build_schedule([torch.empty(row.d_out, row.d_in, device="meta")], [too_big], CPU, target=(64, 1))
    # one oversize layer among good ones still fails
    with pytest.raises(ValueError, match="130 x 66"):
        build_schedule([torch.empty(128, 128, device="meta"), torch.empty(130, 66, device="meta")], [ok, too_big], CPU)
