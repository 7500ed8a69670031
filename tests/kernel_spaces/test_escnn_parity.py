"""Parity with the paper's computation (escnn's basis of a layer, QR, ``P(w) = Q Q^T w``) and the
escnn adapters (docs/interop.md).

Without escnn, the committed fixtures ``data/escnn_*.npz`` (escnn R2Conv/R3Conv layers exported in
float64 by ``data/export_escnn_fixtures.py``) stand in for escnn: their field types go through the
same conversion as ``Rep.from_escnn`` (verified against escnn's matrices stored with them), and
the default kernel space's energies are compared with the paper's penalty terms from the QR of
escnn's basis. With escnn installed, live layers are converted and exported too.

Tolerances:
  E_perp, E_G vs ||w||^2 - ||Q^T w||^2, ||Q^T w||^2 (random w, float64):   1e-9 relative
  escnn's own kernels, float64 basis: E_perp / ||K||^2                      1e-20
  escnn's own kernels, stock float32 escnn, copied into a plain conv:
    report(conv) E_perp / ||W||^2 under the default kernel space          1e-10
  converted reps vs escnn's field-type matrices                             1e-12 (1e-6 live, float32 in escnn)
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import equiproj as ep
from equiproj.groups._escnn import escnn_field_segments, escnn_irrep_map, group_from_escnn_name
from equiproj.kernel_spaces import DenseKernelBasis, default_kernel_space, kernel_energies_and_grads_many
from equiproj.testing import relative_error as rel

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = sorted(glob.glob(os.path.join(DATA, "escnn_*.npz")))

try:
    import escnn  # noqa: F401

    HAS_ESCNN = True
except ImportError:
    HAS_ESCNN = False
needs_escnn = pytest.mark.skipif(not HAS_ESCNN, reason="escnn is not installed")


def load_fixture(path):
    """(meta, basis [nb, N] float64, group, rep_in, rep_out, elements [E, d, d], rho_in, rho_out) of one fixture."""
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    G = group_from_escnn_name(meta["group_class"], meta["rotation_order"] if meta["rotation_order"] > 0 else None)
    d = meta["dimensionality"]
    S = torch.diag(torch.tensor([1.0] + [-1.0] * (d - 1), dtype=torch.float64))
    gq = S @ torch.as_tensor(z["elem_action"]) @ S
    P = S @ torch.tensor(meta["basespace_change_of_basis"], dtype=torch.float64)
    maps = {tuple(i): escnn_irrep_map(G, i, P, gq, torch.as_tensor(z["elem_irrep_" + "_".join(map(str, i))]))
            for i in meta["irrep_ids"]}

    def rep(fields):
        return ep.Rep(G, escnn_field_segments(G, [(f["name"], f["irreps"], f["change_of_basis"]) for f in fields],
                                              maps, key=meta["gspace"]))

    basis = torch.as_tensor(z["basis"]).reshape(meta["num_basis"], -1)
    return (meta, basis, G, rep(meta["fields_in"]), rep(meta["fields_out"]), gq,
            torch.as_tensor(z["elem_rho_in"]), torch.as_tensor(z["elem_rho_out"]))


def _ids(path):
    return os.path.basename(path)[len("escnn_"):-len(".npz")]


@pytest.mark.parametrize("path", FIXTURES, ids=_ids)
def test_fixture_reps_match_escnn(path):
    """The documented conventions reproduce escnn's field types on its test elements (g = S A_e S)."""
    meta, _, G, ri, ro, gq, rho_in, rho_out = load_fixture(path)
    assert float((ri.matrix(gq) - rho_in).abs().max()) < 1e-12
    assert float((ro.matrix(gq) - rho_out).abs().max()) < 1e-12
    sp = default_kernel_space(G, meta["kernel_size"])
    assert sp.rings == tuple(meta["rings"]) and max(abs(a - b) for a, b in zip(sp.sigma, meta["sigma"])) < 1e-12


@pytest.mark.parametrize("path", FIXTURES, ids=_ids)
def test_energies_match_the_papers_computation(path, gen):
    """E_perp and E_G of the default kernel space against the paper's ``||w||^2 - ||Q^T w||^2`` and
    ``||Q^T w||^2`` (Q from the QR of escnn's basis), float64; escnn's basis spans exactly V."""
    meta, basis, G, ri, ro, *_ = load_fixture(path)
    k = meta["kernel_size"]
    sp = default_kernel_space(G, k)
    assert DenseKernelBasis.size(sp, ri, ro)[1] == meta["num_basis"]  # dim V = escnn's basis size
    Q, _ = torch.linalg.qr(basis.T)  # [N, nb]
    shape = (ro.dim, ri.dim) + (k,) * sp.spatial_dims
    w = torch.randn((3,) + shape, dtype=torch.float64, generator=gen)
    q = w.reshape(3, -1) @ Q
    paper_g = q.square().sum(-1)
    paper_perp = w.reshape(3, -1).square().sum(-1) - paper_g
    e_perp, e_g = sp.energies(w, ri, ro)
    assert rel(e_perp, paper_perp) < 1e-9 and rel(e_g, paper_g) < 1e-9
    # escnn's own kernels: random combinations of its basis
    K = (torch.randn(4, meta["num_basis"], dtype=torch.float64, generator=gen) @ basis).reshape((4,) + shape)
    e_perp, e_g = sp.energies(K, ri, ro)
    norm = K.square().flatten(1).sum(1)
    assert float((e_perp / norm).max()) < 1e-20 and rel(e_g, norm) < 1e-12
    # the one-pass route (factorised transforms for fields with a change of basis) agrees, and its
    # in-place decoupled step leaves escnn's kernels where they are
    e_perp, e_g, grad = sp.energies_and_grad(K, ri, ro, lambda_perp=1.0)
    assert float((e_perp / norm).max()) < 1e-20 and rel(e_g, norm) < 1e-12
    assert float(grad.abs().max()) < 1e-9 * float(K.abs().max())
    W = K[0].clone()
    kernel_energies_and_grads_many([W], [sp], [(ri, ro)], lambda_perp=[-0.5], lambda_G=[0.0], outs=[W],
                                   energies=False)
    assert float((W - K[0]).abs().max()) < 1e-12 * float(K.abs().max())


@pytest.mark.parametrize("path", FIXTURES, ids=_ids)
def test_escnn_kernels_in_declared_plain_convs(path, gen):
    """An escnn kernel copied into a plain conv and declared with the matching reps: ``report`` finds
    it equivariant under the default kernel space (the exact grid action for D4, which declare picks)."""
    meta, basis, G, ri, ro, *_ = load_fixture(path)
    k, s = meta["kernel_size"], meta["dimensionality"]
    conv = (torch.nn.Conv2d if s == 2 else torch.nn.Conv3d)(ri.dim, ro.dim, k, padding=k // 2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_((torch.randn(meta["num_basis"], dtype=torch.float64, generator=gen) @ basis).reshape(conv.weight.shape))
    ep.nn.declare(conv, ri, ro)
    row = ep.nn.report(conv).rows[0]
    assert row["case"] == ("grid" if ep.grid.has_grid_action(G, (k,) * s) else "kernel_space")
    assert row["rel_perp"] < 1e-10


def test_escnn_adapters_refuse_other_objects_and_stay_optional():
    """Clear errors for non-escnn inputs; ``import equiproj`` never imports escnn (checked in a fresh
    interpreter, meaningful where escnn is installed)."""
    with pytest.raises(TypeError, match="FieldType"):
        ep.Rep.from_escnn(ep.SO2().standard())
    with pytest.raises(TypeError, match="R2Conv or R3Conv"):
        ep.kernel_spaces.escnn_conv_declaration(torch.nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match="escnn"):
        ep.nn.from_escnn(torch.nn.Linear(2, 2))
    probe = "import sys, equiproj, equiproj.nn, equiproj.kernel_spaces; print('escnn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------
# live escnn layers
# ---------------------------------------------------------------------------------------
def _escnn_layers():
    """``(label, make)`` of escnn's default R2Conv/R3Conv layers of the table in docs/interop.md."""
    from escnn import gspaces, nn

    def conv(gs, fin, fout, k):
        G = gs.fibergroup
        t_in, t_out = nn.FieldType(gs, fin(G)), nn.FieldType(gs, fout(G))
        return (nn.R2Conv if gs.dimensionality == 2 else nn.R3Conv)(t_in, t_out, k, padding=k // 2)

    out = []
    for k in (3, 5, 7):
        for L in (2, 3, 4):
            out.append((f"SO2-L{L}-k{k}", lambda L=L, k=k: conv(
                gspaces.rot2dOnR2(-1, L), lambda G: [G.irrep(0), G.irrep(1), G.irrep(2)],
                lambda G: [G.irrep(1), G.irrep(0), G.irrep(2), G.irrep(1)], k)))
            out.append((f"O2-L{L}-k{k}", lambda L=L, k=k: conv(
                gspaces.flipRot2dOnR2(-1, L), lambda G: [G.irrep(0, 0), G.irrep(1, 0), G.irrep(1, 1)],
                lambda G: [G.irrep(1, 1), G.irrep(0, 0), G.irrep(1, 2)], k)))
        out.append((f"SO3-L3-k{k}", lambda k=k: conv(
            gspaces.rot3dOnR3(3), lambda G: [G.irrep(0), G.irrep(1), G.bl_regular_representation(1)],
            lambda G: [G.irrep(1), G.irrep(0), G.irrep(2)], k)))
        out.append((f"O3-L2-k{k}", lambda k=k: conv(
            gspaces.flipRot3dOnR3(2), lambda G: [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2)],
            lambda G: [G.irrep(1, 0), G.irrep(1, 1), G.irrep(0, 0)], k)))
    return out


ESCNN_LAYERS = _escnn_layers() if HAS_ESCNN else []


@needs_escnn
@pytest.mark.parametrize("label,make", ESCNN_LAYERS, ids=[label for label, _ in ESCNN_LAYERS])
def test_escnn_conv_exported_and_declared(label, make, seed):
    """Stock escnn (float32 sampling): the exported plain conv computes what escnn computes, and
    declared with the reps of its field types its kernel is equivariant under the default kernel
    space (report) and under the space :func:`from_escnn` returns."""
    from escnn import nn as enn

    conv = make()
    with torch.no_grad():
        conv.weights.normal_()
        conv.bias.normal_()
    space, ri, ro = ep.kernel_spaces.escnn_conv_declaration(conv)
    plain = ep.kernel_spaces.escnn_conv_to_torch(conv)
    s = plain.weight.dim() - 2
    x = torch.randn((2, conv.in_type.size) + (8,) * s)
    conv.eval()
    y = conv(enn.GeometricTensor(x, conv.in_type)).tensor
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)
    ep.nn.declare(plain, ri, ro)  # the default kernel space
    row = ep.nn.report(plain).rows[0]
    assert row["case"] == "kernel_space" and row["rel_perp"] < 1e-10
    W = plain.weight.detach().double()
    assert float(space.energies(W, ri, ro)[0] / W.square().sum()) < 1e-10
    assert rel(space.energies(W, ri, ro)[0], default_kernel_space(ri.group, W.shape[-1]).energies(W, ri, ro)[0]) < 1e-6


@needs_escnn
def test_rep_from_escnn_and_errors():
    from escnn import gspaces, nn

    for gs, fields in [(gspaces.rot2dOnR2(8), lambda G: [G.regular_representation, G.irrep(3), G.irrep(4)]),
                       (gspaces.flipRot2dOnR2(6), lambda G: [G.regular_representation] + list(G.irreps())),
                       (gspaces.flipRot2dOnR2(5, axis=0.0), lambda G: [G.regular_representation] + list(G.irreps())),
                       (gspaces.rot3dOnR3(3), lambda G: [G.irrep(3), G.bl_regular_representation(2)]),
                       (gspaces.flipRot3dOnR3(2), lambda G: [G.irrep(1, 2), G.bl_regular_representation(1)])]:
        ft = nn.FieldType(gs, fields(gs.fibergroup))
        rep = ep.Rep.from_escnn(ft)
        els = [gs.fibergroup.sample() for _ in range(5)]
        S = torch.diag(torch.tensor([1.0] + [-1.0] * (gs.dimensionality - 1), dtype=torch.float64))
        g = torch.stack([S @ torch.as_tensor(gs.basespace_action(e), dtype=torch.float64) @ S for e in els])
        want = torch.stack([torch.as_tensor(ft.representation(e), dtype=torch.float64) for e in els])
        assert rep.dim == ft.size and float((rep.matrix(g) - want).abs().max()) < 1e-6
        assert ep.Rep.from_escnn(ft) == rep  # equal fields: plans are shared
    with pytest.raises(NotImplementedError, match="axis"):
        gs = gspaces.flipRot2dOnR2(5)  # default reflection axis pi/2, odd N
        ep.Rep.from_escnn(nn.FieldType(gs, [gs.regular_repr]))
    with pytest.raises(TypeError, match="FieldType"):
        ep.Rep.from_escnn(gspaces.rot2dOnR2(4))
    gs = gspaces.rot2dOnR2(8)
    ft = nn.FieldType(gs, [gs.regular_repr] * 2)
    with pytest.raises(ValueError, match="groups=2"):
        ep.kernel_spaces.escnn_conv_declaration(nn.R2Conv(ft, ft, 3, groups=2))
    with pytest.raises(ValueError, match="basis_filter"):  # a basis that is not all of V
        ep.kernel_spaces.escnn_conv_declaration(nn.R2Conv(ft, ft, 5, basis_filter=lambda attr: attr["irrep:frequency"] != 1))


@needs_escnn
def test_escnn_model_exported_declared_and_regularised(seed):
    """``equiproj.nn.from_escnn`` of an escnn model: escnn's export with every conv declared; the
    penalty is zero at escnn's weights and trains like any penalty."""
    from escnn import gspaces, nn

    gs = gspaces.rot2dOnR2(8)
    t_in, t_hid = nn.FieldType(gs, 2 * [gs.trivial_repr]), nn.FieldType(gs, 3 * [gs.regular_repr])
    model = nn.SequentialModule(nn.R2Conv(t_in, t_hid, 5, padding=2), nn.ReLU(t_hid),
                                nn.R2Conv(t_hid, t_hid, 3, padding=1), nn.GroupPooling(t_hid))
    plain = ep.nn.from_escnn(model)
    x = torch.randn(2, 2, 11, 11)
    torch.testing.assert_close(plain(x), model(nn.GeometricTensor(x, t_in)).tensor, rtol=1e-5, atol=1e-5)
    rows = ep.nn.report(plain).rows
    assert [r["case"] for r in rows] == ["kernel_space", "kernel_space"] and max(r["rel_perp"] for r in rows) < 1e-10
    penalty = ep.nn.ProjectionPenalty(plain, lambda_perp=1.0)
    with torch.no_grad():
        plain[2].weight.add_(1e-3 * torch.randn_like(plain[2].weight))
    value = penalty()
    value.backward()
    assert float(value.detach()) > 0 and plain[2].weight.grad is not None
    conv = ep.nn.from_escnn(model[0])  # one conv
    assert ep.nn.declaration(conv).case == "kernel_space"


@needs_escnn
def test_interop_doc_example_runs():
    """The escnn example of docs/interop.md, as written."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "interop.md")
    text = open(path, encoding="utf-8").read()
    start = text.index("<!-- escnn example -->")
    code = text[text.index("```python", start) + len("```python"): text.index("```", text.index("```python", start) + 9)]
    exec(compile(code, "docs/interop.md", "exec"), {"__name__": "interop_example", "math": math})
