"""The "x floor" table of every kind of layer: the kinds build and declare, a measurement times the
penalty's backward and decoupled step on every thread count, and the table names every row (the
values themselves are tested in tests/nn/test_program.py)."""

import pytest
import torch

import equiproj as ep
from equiproj import ops
from equiproj.cli.bench._layer_kinds import LayerKind, format_layer_kinds, layer_kind_rows, layer_kinds
from equiproj.nn import ProjectionPenalty


def test_every_kind_builds_and_declares():
    kinds = layer_kinds(quick=True)
    assert {k.route for k in kinds} == {"linear", "grid", "steerable"}
    full = {k.name for k in layer_kinds(quick=False)}
    assert any("O_h" in n for n in full) and any("C1024" in n for n in full)
    for k in kinds:
        if k.route != "linear":
            continue
        m = k.build()
        assert ProjectionPenalty(m, lambda_perp=1.0).layers, k.name


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
