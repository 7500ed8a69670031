"""Export escnn R2Conv / R3Conv layers (their basis in float64, field types, test elements) as the
fixtures ``tests/kernel_spaces/data/escnn_*.npz`` of the escnn parity tests, which run without escnn.

Needs an environment with escnn (escnn 1.0.11 pins numpy < 2, and its dependency py3nj needs a
Fortran compiler to build), e.g.::

    python -m venv /tmp/escnn_venv && /tmp/escnn_venv/bin/pip install torch numpy scipy setuptools wheel
    /tmp/escnn_venv/bin/pip install escnn
    /tmp/escnn_venv/bin/python tests/kernel_spaces/data/export_escnn_fixtures.py

escnn samples its bases in float32 (points, radii, widths, Clebsch-Gordan coefficients, changes of
basis). For the fixtures its kernel-basis modules run with float64 instead (``torch.float32`` /
``torch.float`` inside those modules mean float64, and the default dtype is float64), so that the
parity tests can compare to 1e-9; the layers are escnn's defaults (``R2Conv/R3Conv(in, out, k)``).

Each file holds ``basis [nb, c_out, c_in, k, k(, k)]`` (one-hot weights through
``layer.expand_parameters()``: escnn's conv weight layout), ``elem_action [E, d, d]`` (escnn's
base-space action of E test elements), ``elem_rho_in``/``elem_rho_out`` (the field types at them),
``elem_irrep_<id>`` (every irrep of the fields) and ``meta`` (JSON: group, gspace, kernel size,
rings, sigma, fields with escnn's irrep ids and changes of basis, the base-space change of basis).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import types

import numpy as np
import torch

OUT = os.path.dirname(os.path.abspath(__file__))


def use_float64():
    """escnn's kernel-basis modules compute in float64 (module-level ``torch`` with float32 -> float64)."""

    class _TorchFloat64(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    torch.set_default_dtype(torch.float64)
    proxy = _TorchFloat64("torch")
    proxy.float32 = torch.float64
    proxy.float = torch.float64
    for name in ("escnn.kernels.basis", "escnn.kernels.polar_basis", "escnn.kernels.steerable_basis",
                 "escnn.kernels.wignereckart_solver", "escnn.kernels.harmonic_polynomial_r3",
                 "escnn.kernels.steerable_filters_basis", "escnn.kernels.sparse_basis",
                 "escnn.nn.modules.basismanager.basisexpansion_singleblock"):
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


def configs():
    """``(name, gspace factory, input fields, output fields, kernel sizes)``."""
    from escnn import gspaces

    def irreps(*ids):
        return lambda G: [G.irrep(*i) for i in ids]

    def regular_and(*ids):
        return lambda G: [G.regular_representation] + [G.irrep(*i) for i in ids]

    return [
        ("so2_L3", lambda: gspaces.rot2dOnR2(N=-1, maximum_frequency=3), irreps((0,), (1,), (2,)),
         irreps((1,), (0,), (2,), (1,)), (3, 5, 7)),
        ("o2_L3", lambda: gspaces.flipRot2dOnR2(N=-1, maximum_frequency=3), irreps((0, 0), (1, 0), (1, 1), (1, 2)),
         irreps((1, 1), (0, 0), (1, 2), (1, 0)), (3, 5, 7)),
        ("c8", lambda: gspaces.rot2dOnR2(N=8), regular_and((3,)), regular_and((0,), (4,)), (3, 5)),
        ("d6", lambda: gspaces.flipRot2dOnR2(N=6), irreps((0, 0), (1, 0), (1, 1), (1, 2), (0, 3), (1, 3)),
         regular_and(), (5,)),
        ("d4", lambda: gspaces.flipRot2dOnR2(N=4), regular_and((1, 1)), regular_and(), (3,)),
        ("so3_L3", lambda: gspaces.rot3dOnR3(maximum_frequency=3),
         lambda G: [G.irrep(0), G.irrep(1), G.irrep(2), G.bl_regular_representation(1)],
         irreps((1,), (0,), (2,)), (3, 5, 7)),
        ("o3_L2", lambda: gspaces.flipRot3dOnR3(maximum_frequency=2),
         lambda G: [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2), G.bl_regular_representation(1)],
         irreps((1, 0), (1, 1), (1, 2), (0, 0)), (3, 5, 7)),
    ]


def sample_elements(gspace):
    """Escnn's testing elements (all of a finite group, the first 12 otherwise) and 4 random ones."""
    import itertools

    G = gspace.fibergroup
    return list(itertools.islice(G.testing_elements(), 12)) + [G.sample() for _ in range(4)]


def export(name, make_gspace, fields_in, fields_out, k):
    from escnn import nn

    np.random.seed(0)  # escnn's random elements: the same file on every run
    gs = make_gspace()
    G = gs.fibergroup
    ft_in, ft_out = nn.FieldType(gs, fields_in(G)), nn.FieldType(gs, fields_out(G))
    conv = (nn.R2Conv if gs.dimensionality == 2 else nn.R3Conv)(ft_in, ft_out, kernel_size=k, bias=False)
    conv = conv.to(torch.float64)
    nb = conv.basisexpansion.dimension()
    conv.train()
    with torch.no_grad():
        basis = torch.empty((nb, ft_out.size, ft_in.size) + (k,) * gs.dimensionality, dtype=torch.float64)
        for i in range(nb):
            conv.weights.data.zero_()
            conv.weights.data[i] = 1.0
            basis[i] = conv.expand_parameters()[0]
    els = sample_elements(gs)
    ids = sorted({tuple(int(v) for v in i) for r in list(ft_in.representations) + list(ft_out.representations)
                  for i in r.irreps})

    def fields(ft):
        return [{"name": r.name, "irreps": [list(map(int, i)) for i in r.irreps],
                 "change_of_basis": np.asarray(r.change_of_basis, dtype=float).tolist()} for r in ft.representations]

    meta = {"config": name, "group_class": type(G).__name__, "group": G.name,
            "rotation_order": int(getattr(G, "rotation_order", -1) or -1), "gspace": gs.name,
            "dimensionality": gs.dimensionality, "kernel_size": k, "rings": [float(r) for r in conv._rings],
            "sigma": [float(s) for s in conv._sigma],
            "basespace_change_of_basis": np.asarray(gs.basespace_action.change_of_basis, dtype=float).tolist(),
            "fields_in": fields(ft_in), "fields_out": fields(ft_out), "irrep_ids": [list(i) for i in ids],
            "num_basis": nb, "basis_dtype": str(basis.dtype)}
    arrays = {"basis": basis.numpy(),
              "elem_action": np.stack([np.asarray(gs.basespace_action(g), dtype=float) for g in els]),
              "elem_rho_in": np.stack([np.asarray(ft_in.representation(g), dtype=float) for g in els]),
              "elem_rho_out": np.stack([np.asarray(ft_out.representation(g), dtype=float) for g in els])}
    for i in ids:
        arrays["elem_irrep_" + "_".join(map(str, i))] = np.stack([np.asarray(G.irrep(*i)(g), dtype=float) for g in els])
    path = os.path.join(OUT, f"escnn_{name}_k{k}.npz")
    np.savez_compressed(path, meta=json.dumps(meta), **arrays)
    return path, nb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="substring of the configuration names to export")
    args = ap.parse_args()
    use_float64()
    for name, make, fin, fout, ks in configs():
        if args.only and args.only not in name:
            continue
        for k in ks:
            path, nb = export(name, make, fin, fout, k)
            print(f"{os.path.basename(path)}: {nb} basis kernels, {os.path.getsize(path) / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
