"""The way from equiproj to escnn: an escnn gspace for an equiproj group and an escnn ``FieldType`` for
an equiproj rep (what :func:`equiproj.nn.to_escnn` builds layers from; escnn is imported where used).

The way in (escnn's groups, elements and field types read as equiproj's) is ``_escnn.py``, which sits
below the group classes; this module sits above them.
"""

from __future__ import annotations

import math

import torch

from ._escnn import (_eid, _gspace_key, _irrep_maps_cached, _test_elements, default_escnn_gspace, element_from_escnn,
                     group_from_escnn)
from ._group import Group
from ._planar import O2, SO2
from ._rep import Rep
from ._spatial import O3, SO3

__all__ = ["escnn_gspace", "escnn_field_type"]


#: equiproj group class -> (escnn gspace factory on R^d, its escnn group's class name, d)
_GSPACES = {
    "SO2": ("rot2dOnR2", 2), "O2": ("flipRot2dOnR2", 2), "Cyclic": ("rot2dOnR2", 2), "Dihedral": ("flipRot2dOnR2", 2),
    "SO3": ("rot3dOnR3", 3), "O3": ("flipRot3dOnR3", 3), "Octahedral": ("octaOnR3", 3), "FullOctahedral": ("fullOctaOnR3", 3),
}


def escnn_gspace(G: Group, dims: int, max_band: int = 0):
    """escnn's gspace of an equiproj group acting on ``R^dims`` (``dims = 0``: escnn's ``no_base_space``, for
    ``Linear``): ``rot2dOnR2(N)`` for C_N, ``flipRot2dOnR2(N)`` for D_N (reflection axis 0 for odd N),
    ``rot3dOnR3`` / ``flipRot3dOnR3`` / ``octaOnR3`` / ``fullOctaOnR3``; the continuous groups with a
    maximum frequency of at least ``max_band`` (escnn's default otherwise)."""
    from escnn import gspaces  # noqa: PLC0415 - the optional dependency

    name = type(G).__name__
    if name not in _GSPACES:
        raise NotImplementedError(f"{G} has no escnn gspace: escnn converts {', '.join(_GSPACES)}")
    factory, d = _GSPACES[name]
    if dims not in (0, d):
        raise ValueError(f"{G} acts on R^{d} in escnn; a layer over {dims} spatial dimensions has no escnn gspace of it")
    if name == "Dihedral" and float(getattr(G, "axis", 0.0)) != 0.0:
        raise NotImplementedError(f"{G}: only dihedral groups with axis 0 are converted to escnn gspaces")
    if name in ("Cyclic", "Dihedral"):
        args = {"N": int(G.N)}
        if name == "Dihedral" and G.N % 2:
            args["axis"] = 0.0  # escnn's default axis pi/2 is a reflection of equiproj's D_N for even N only
    elif name in ("SO2", "O2"):
        args = {"N": -1, "maximum_frequency": max(6, int(max_band))}
    elif name in ("SO3", "O3"):
        args = {"maximum_frequency": max(2, int(max_band))}
    else:
        args = {}
    gspace = getattr(gspaces, factory)(**args)
    return gspaces.no_base_space(gspace.fibergroup) if dims == 0 else gspace


def _escnn_ids_of(G: Group, escnn_group, irreps) -> list:
    """escnn irrep ids that may map to the equiproj ``irreps`` (inverse of :func:`_candidate_ids`)."""
    if G.is_finite:
        return sorted({_eid(i.id) for i in escnn_group.irreps()})
    out = set()
    for ir in irreps:
        i = ir.id
        if isinstance(G, (SO2, SO3)):
            out.add((int(i),))
        elif isinstance(G, O2):
            out.add((int(i[0]), int(i[1])))
        elif isinstance(G, O3):
            out.add((0 if int(i[1]) == 1 else 1, int(i[0])))
    return sorted(out)


def _same_matrices(field, escnn_rep, read_in) -> bool:
    els = _test_elements(read_in, 8)
    gq = torch.stack([element_from_escnn(read_in, g) for g in els])
    want = torch.stack([torch.as_tensor(escnn_rep(g), dtype=torch.float64) for g in els])
    return bool(float((Rep(field.group, [(1, field)]).matrix(gq) - want).abs().max()) < 1e-9)


def escnn_field_type(rep: Rep, gspace):
    """The escnn ``FieldType`` of an equiproj rep on ``gspace`` (its group's, e.g. from :func:`escnn_gspace`):
    each field an escnn representation with the escnn irreps of its slots and the change of basis
    ``Q_e = Q blockdiag(M_i)`` (the inverse of :func:`~equiproj.groups._escnn.escnn_field_segments`); escnn's own irrep or
    regular representation where the field is one of them. Checked: the field type's matrices equal the
    rep's on test elements."""
    import numpy as np  # noqa: PLC0415
    from escnn import group as escnn_group_mod  # noqa: PLC0415
    from escnn import nn as escnn_nn  # noqa: PLC0415

    eg = gspace.fibergroup
    read_in = default_escnn_gspace(eg) if gspace.dimensionality == 0 else gspace  # elements read as from_escnn reads them
    G = group_from_escnn(eg)
    if G != rep.group:
        raise ValueError(f"the rep's group {rep.group} is not the gspace's {G} (escnn's {gspace.name})")
    fields = [f for m, f in rep.segments for _ in range(m)]
    irreps = {ir for f in fields for ir in f.slots}
    maps = _irrep_maps_cached(_gspace_key(read_in), read_in, tuple(_escnn_ids_of(G, eg, irreps)))
    inverse = {}
    for eid, (ir, M) in maps.items():
        inverse.setdefault(ir, (eid, M))
    reps, cache = [], {}
    for f in fields:
        if f in cache:
            reps.append(cache[f])
            continue
        missing = [ir for ir in f.slots if ir not in inverse]
        if missing:
            raise NotImplementedError(f"escnn's {eg.name} has no irrep matching equiproj's {missing[0]}")
        ids = [inverse[ir][0] for ir in f.slots]
        Qe = torch.block_diag(*[inverse[ir][1] for ir in f.slots])
        if f.Q is not None:
            Qe = f.Q.to(torch.float64) @ Qe
        eye = torch.eye(Qe.shape[0], dtype=torch.float64)
        if len(ids) == 1 and float((Qe - eye).abs().max()) < 1e-12:
            r = eg.irrep(*ids[0])
        elif f.permutation is not None and G.is_finite and f.dim == G.order and _same_matrices(
                f, eg.regular_representation, read_in):
            r = eg.regular_representation
        else:
            name = "equiproj_" + format(abs(hash((tuple(ids), tuple(round(float(v), 10) for v in Qe.reshape(-1))))), "x")
            r = eg.representations.get(name)
            if r is None:
                r = escnn_group_mod.Representation(eg, name, list(ids),
                                                   Qe.numpy(), supported_nonlinearities=["norm", "gated", "pointwise"]
                                                   if f.permutation is not None else ["norm", "gated"])
        cache[f] = r
        reps.append(r)
    field_type = escnn_nn.FieldType(gspace, reps)
    els = _test_elements(read_in, 8)
    gq = torch.stack([element_from_escnn(read_in, g) for g in els])
    want = torch.stack([torch.as_tensor(np.asarray(field_type.representation(g)), dtype=torch.float64) for g in els])
    err = float((rep.matrix(gq) - want).abs().max())
    if not err < 1e-6 * max(1.0, math.sqrt(rep.dim)):
        raise RuntimeError(f"escnn_field_type: the escnn field type differs from the rep by {err:.1e}")
    return field_type

