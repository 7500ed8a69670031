"""The "x floor" table of every kind of layer: the list covers every kind of the performance targets,
the fields it builds are the representations they claim to be (checked against their matrices and
the float64 reference), a measurement times the penalty's backward and decoupled step on every
thread count, a kind that fails gives an error row, and the table names every row (the values
themselves are tested in tests/nn/test_program.py)."""

import math
import re

import pytest
import torch

import equiproj as ep
from equiproj import ops, reference
from equiproj.cli.bench._layer_kinds import (LayerKind, band_limited_field, cyclic_quotient, format_layer_kinds,
                                             irreps_fields, layer_kind_rows, layer_kinds)
from equiproj.groups import FullTetrahedral, Tetrahedral
from equiproj.nn import ProjectionPenalty

needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="needs the C++ extension")


def _names(kinds, route=None):
    return [k.name for k in kinds if route is None or k.route == route]


def _has(names, *parts):
    return any(all(p in n for p in parts) for n in names)


def test_full_list_covers_every_kind_of_the_targets():
    """Linear layers on the irreps fields of all ten groups, C_N and D_N regular for N in {4, ..., 4096},
    O/O_h regular, quotients and point sets; grid convolutions on k = 3, 5 (2-D) and k = 3 (3-D) with
    regular and irreps fields; steerable convolutions of C8, C16, SO(2), O(2) on k = 5, 7 and of SO(3),
    O(3) on k = 5 with regular or band-limited and with irreps fields."""
    kinds = layer_kinds(quick=False)
    assert len({k.name for k in kinds}) == len(kinds)
    linear, grid, steer = _names(kinds, "linear"), _names(kinds, "grid"), _names(kinds, "steerable")
    for g in ("C8", "D8", "SO(2)", "O(2)", "SO(3)", "O(3)", "O", "O_h", "T", "T_d"):
        assert _has(linear, f", {g} irreps"), g
    for N in (4, 8, 16, 64, 256, 1024, 4096):
        assert _has(linear, f"x C{N} regular") and _has(linear, f"x D{N} regular"), N
    assert _has(linear, "x O regular") and _has(linear, "x O_h regular")
    assert sum("/" in n for n in linear) >= 3 and sum("grid points" in n for n in linear) >= 2
    for g in ("C4", "D4"):
        for k in (3, 5):
            assert _has(grid, "Conv2d", f"k={k}", f"{g} regular") and _has(grid, "Conv2d", f"k={k}", f"{g} irreps")
    for g in ("O", "O_h"):
        assert _has(grid, "Conv3d", "k=3", f"{g} regular") and _has(grid, "Conv3d", "k=3", f"{g} irreps")
    for g in ("C8", "C16", "SO(2)", "O(2)"):
        for k in (5, 7):
            assert _has(steer, "Conv2d", f"k={k}", f"{g} irreps"), (g, k)
            assert _has(steer, "Conv2d", f"k={k}", f"{g} regular") or _has(steer, "Conv2d", f"k={k}", f"{g} band"), (g, k)
    for g in ("SO(3)", "O(3)"):
        assert _has(steer, "Conv3d", "k=5", f"{g} band-limited") and _has(steer, "Conv3d", "k=5", f"{g} 16x0")
    # target sizes: linear layers of about 4096² weights (D4096's regular field is 8192-dimensional)
    for n in linear:
        side = int(re.match(r"Linear (\d+)²", n).group(1))
        assert 4000 <= side <= 4096 or (side == 8192 and "D4096" in n), n


def test_quick_and_smoke_lists():
    quick, smoke = layer_kinds(quick=True), layer_kinds(quick=True, every=False)
    assert len(smoke) < len(quick) <= len(layer_kinds(quick=False))
    assert {k.route for k in smoke} == {"linear", "grid", "steerable"}
    assert set(_names(smoke)) < set(_names(quick)) and len(smoke) <= 16
    for n in _names(quick, "linear"):
        assert int(re.match(r"Linear (\d+)²", n).group(1)) <= 1024, n


def test_irreps_fields_are_every_irrep_alike():
    for G, L in ((ep.Cyclic(8), None), (ep.O2(), 3), (FullTetrahedral(), None), (Tetrahedral(), None)):
        rep = irreps_fields(G, 200, L)
        irreps = G.irreps(band_limit=L)
        copies = 200 // sum(p.dim for p in irreps)
        assert [(c, tuple(f.slots)) for c, f in rep.segments] == [(copies, (p,)) for p in irreps]


@pytest.mark.parametrize("G, L, dim", [(ep.SO2(), 3, 7), (ep.O2(), 3, 14), (ep.SO3(), 1, 10), (ep.O3(), 1, 20)])
def test_band_limited_field_is_one_field_of_the_regular_multiplicities(G, L, dim, gen):
    field = band_limited_field(G, L)
    assert field.dim == dim and len(field.segments) == 1 and field.segments[0][0] == 1
    want = {p: p.dim // p.endomorphism_basis.shape[0] for p in G.irreps(band_limit=L)}
    assert dict(field.irreps) == want
    g = G.sample(3, generator=gen)
    M = field.matrix(g)
    torch.testing.assert_close(M @ M.transpose(-1, -2), torch.eye(dim, dtype=M.dtype).expand_as(M), atol=1e-10, rtol=0)
    torch.testing.assert_close(field.matrix(g[:1] @ g[1:2]), M[:1] @ M[1:2], atol=1e-10, rtol=0)
    # a dense basis: the field is no sum of its irreps in their own coordinates
    assert (M[0].abs() > 1e-6).sum() > sum(p.dim**2 * m for p, m in want.items())


def test_cyclic_quotient_shifts_the_cosets():
    rep = cyclic_quotient(16, 4)
    G = ep.Cyclic(16)
    for k, g in enumerate(G.elements()):
        expected = torch.zeros(4, 4, dtype=torch.float64)
        expected[(torch.arange(4) + k) % 4, torch.arange(4)] = 1  # e_i -> e_{i + k mod 4}
        torch.testing.assert_close(rep.matrix(g[None])[0], expected)


@needs_cpp
@pytest.mark.parametrize("make", [lambda: 3 * cyclic_quotient(16, 4) + cyclic_quotient(16, 8),
                                  lambda: 2 * band_limited_field(ep.O2(), 2),
                                  lambda: 2 * ep.Rep.permutation(ep.Dihedral(4), points=ep.grid.grid_points((5, 5)))],
                         ids=["quotient", "band-limited", "point-set"])
def test_penalty_on_the_new_fields_matches_the_reference(make, gen):
    """The penalty's gradient on a linear layer of these fields is ``2 lambda (W - P W)`` of the float64
    reference projection, for a random and for a nearly equivariant weight, into an existing ``.grad``."""
    rep = make()
    for ratio in (None, 1e-10):
        W = torch.randn(rep.dim, rep.dim, dtype=torch.float64, generator=gen)
        if ratio is not None:
            W = ep.testing.nearly_equivariant(W, rep, rep, ratio, generator=gen)
        layer = ep.nn.declare(torch.nn.Linear(rep.dim, rep.dim, bias=False).double(), rep, rep)
        with torch.no_grad():
            layer.weight.copy_(W)
        layer.weight.grad = torch.ones_like(W)
        ProjectionPenalty(layer, lambda_perp=0.5).backward()
        R = W - reference.project(W, rep, rep)
        scale = max(float(R.abs().max()), 1e-300)
        torch.testing.assert_close((layer.weight.grad - 1) / scale, R / scale, rtol=0, atol=1e-8)


@pytest.mark.skipif(not ops.cpp_available(), reason="needs the C++ extension")
def test_rows_and_table(gen):
    rep = ep.Rep.parse(ep.SO3(), "3x0 + 2x1")
    tiny = [LayerKind("Linear 9², SO(3)", "linear",
                      lambda: ep.nn.declare(torch.nn.Linear(rep.dim, rep.dim, bias=False), rep, rep))]
    seen = []
    rows = layer_kind_rows((1, 2), quick=True, rounds=2, progress=seen.append, kinds=tiny)
    assert len(rows) == 2 and [r["threads"] for r in rows] == [1, 2] and len(seen) == 2
    for r in rows:
        assert r["weights"] == rep.dim**2 and min(r["floor"], r["backward"], r["decay"]) > 0
    table = format_layer_kinds(rows)
    assert table.count("Linear 9², SO(3)") == 2 and "<= 2x" in table


@needs_cpp
def test_a_failing_kind_gives_an_error_row_and_the_table_goes_on():
    rep = ep.Rep.parse(ep.SO3(), "2x0 + 1x1")

    def broken():
        raise ValueError("no such layer | here")

    kinds = [LayerKind("Broken", "steerable", broken),
             LayerKind("Linear 5², SO(3)", "linear", lambda: ep.nn.declare(torch.nn.Linear(5, 5, bias=False), rep, rep))]
    rows = layer_kind_rows((1,), rounds=1, kinds=kinds)
    assert rows[0]["error"] == "ValueError: no such layer | here" and "backward" in rows[1]
    table = format_layer_kinds(rows)
    line = next(x for x in table.splitlines() if x.startswith("| Broken"))
    assert "error: ValueError: no such layer / here" in line and line.endswith("| error | - | - |") and line.count("|") == 12


@needs_cpp
def test_the_smoke_kinds_run():
    """Every kind of the short list builds, declares and runs both calls (one round, one thread)."""
    rows = layer_kind_rows((1,), rounds=1, kinds=layer_kinds(quick=True, every=False))
    assert [r for r in rows if "error" in r] == []
    assert all(r["backward"] > 0 and r["decay"] > 0 and math.isfinite(r["floor"]) for r in rows)
    # every row names its computation, with the flops per weight its plan states
    assert all(r["path"] != "-" and 2 < r["flops_per_weight"] < 1000 for r in rows), [(r["kind"], r["path"]) for r in rows]
    linear = [r["path"] for r in rows if r["route"] != "steerable"]
    assert all(any(w in p for w in ("orbit", "tiles")) for p in linear), linear
