"""escnn field types as equiproj reps (optional: escnn is imported by these functions only).

The conventions (docs/interop.md; checked against escnn 1.0.11 element by element):

* points: escnn's sampling point of filter entry ``[..., i_y, i_x]`` (``[..., i_z, i_y, i_x]``) is
  ``S x`` with ``x`` equiproj's centred coordinates of that entry (:func:`equiproj.grid.grid_points`)
  and ``S = diag(1, -1)`` (``diag(1, -1, -1)``): the same tensor, no reordering.
* elements: the escnn element with base-space action ``A_e`` (``gspace.basespace_action(g)``) is the
  equiproj element ``g = S A_e S``.
* irreps: ``psi(g) = M psi_escnn(g_e) M^T`` with ``M = psi^{O(d)}(S C_e)``, the ambient O(2) irrep
  ``(1, k)`` or Wigner D matrix of the rotation ``+-S C_e`` (``C_e = gspace.basespace_action.change_of_basis``);
  escnn's ``(k,)`` of SO(2)/C_N is equiproj's ``k``, ``(j, k)`` of O(2)/D_N is ``(j, k)`` (for D_N's
  1-dim ``(j, N/2)``: ``(j + N/2 mod 2, N/2)`` with escnn's default reflection axis), ``(l,)`` of SO(3)
  is ``l``, ``(j, l)`` of O(3) is ``(l, (-1)^j)``. Every map is verified on test elements (escnn's
  own matrices) when escnn objects are converted.
* fields: an escnn representation with irreps ``psi_i`` and change of basis ``Q_e`` is one equiproj
  :class:`Field` with slots ``psi_i`` (escnn's order) and ``Q = Q_e blockdiag(M_i^T)``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from .._caches import bytes_cached
from ._field import Field, spectral_field_matrix
from ._registry import GROUP_CLASSES
from ._so3 import wigner_D

if TYPE_CHECKING:
    from ._group import Group
    from ._rep import Irrep

__all__ = ["escnn_rep_parts", "escnn_field_segments", "group_from_escnn", "group_from_escnn_name", "element_from_escnn",
           "escnn_irrep_map", "is_escnn_object", "default_escnn_gspace"]

#: escnn group classes equiproj has (by class name), and the equiproj group (from the rotation order N)
#: (made through the registry of group classes: this module sits below them, as Rep.from_escnn imports it)
_GROUPS = {
    "SO2": lambda N: GROUP_CLASSES["SO2"](),
    "O2": lambda N: GROUP_CLASSES["O2"](),
    "CyclicGroup": lambda N: GROUP_CLASSES["Cyclic"](N),
    "DihedralGroup": lambda N: GROUP_CLASSES["Dihedral"](N),
    "SO3": lambda N: GROUP_CLASSES["SO3"](),
    "O3": lambda N: GROUP_CLASSES["O3"](),
    "Octahedral": lambda N: GROUP_CLASSES["Octahedral"](),
    "FullOctahedral": lambda N: GROUP_CLASSES["FullOctahedral"](),
}
#: the gspace an escnn Representation (which has no base space) is read in: escnn's default one of its group
_DEFAULT_GSPACES = {
    "SO2": ("rot2dOnR2", (-1,)), "O2": ("flipRot2dOnR2", (-1,)), "CyclicGroup": ("rot2dOnR2", ("N",)),
    "DihedralGroup": ("flipRot2dOnR2", ("N",)), "SO3": ("rot3dOnR3", ()), "O3": ("flipRot3dOnR3", ()),
    "Octahedral": ("octaOnR3", ()), "FullOctahedral": ("fullOctaOnR3", ()),
}
_TOL = 1e-8


def _S(d: int) -> torch.Tensor:
    return torch.diag(torch.tensor([1.0] + [-1.0] * (d - 1), dtype=torch.float64))


def group_from_escnn_name(class_name: str, rotation_order: int | None = None) -> Group:
    """The equiproj group of an escnn group class (``"SO2"``, ``"O2"``, ``"CyclicGroup"``,
    ``"DihedralGroup"``, ``"SO3"``, ``"O3"``) with rotation order ``N`` for C_N / D_N."""
    if class_name not in _GROUPS:
        raise NotImplementedError(f"escnn's {class_name} has no equiproj counterpart here: supported are "
                                  f"{', '.join(_GROUPS)}")
    return _GROUPS[class_name](None if rotation_order is None else int(rotation_order))


def _escnn_group_name(escnn_group) -> str:
    # escnn's full octahedral group is a DirectProductGroup named "FullOctahedral"
    name = type(escnn_group).__name__
    return escnn_group.name if name == "DirectProductGroup" else name


def group_from_escnn(escnn_group) -> Group:
    """The equiproj group of an escnn group (SO(2), O(2), C_N, D_N, SO(3), O(3), the octahedral groups)."""
    return group_from_escnn_name(_escnn_group_name(escnn_group), getattr(escnn_group, "rotation_order", None))


def _is_escnn_representation(x) -> bool:
    # Representation and its subclasses (IrreducibleRepresentation, ...): irreps and a change of basis, no gspace
    return (type(x).__module__.split(".")[0] == "escnn" and hasattr(x, "irreps") and hasattr(x, "change_of_basis")
            and hasattr(x, "group") and not hasattr(x, "gspace"))


def is_escnn_object(x) -> bool:
    """An escnn ``FieldType``, ``GeometricTensor`` or ``Representation`` (recognised without importing escnn)."""
    return type(x).__module__.split(".")[0] == "escnn" and (type(x).__name__ in ("FieldType", "GeometricTensor")
                                                             or _is_escnn_representation(x))


def default_escnn_gspace(escnn_group):
    """escnn's default gspace of an escnn group (``rot2dOnR2(N)`` for C_N, ``octaOnR3()`` for the octahedral
    group, ...): the base space in which an escnn ``Representation`` is read."""
    from escnn import gspaces  # noqa: PLC0415 - the optional dependency, present since an escnn object was passed

    name = _escnn_group_name(escnn_group)
    if name not in _DEFAULT_GSPACES:
        group_from_escnn_name(name)  # raises, naming the supported groups
    factory, args = _DEFAULT_GSPACES[name]
    args = tuple(int(escnn_group.rotation_order) if a == "N" else a for a in args)
    if name == "DihedralGroup" and args[0] % 2:
        return gspaces.flipRot2dOnR2(args[0], axis=0.0)  # the default axis pi/2 is no reflection of equiproj's D_N
    return getattr(gspaces, factory)(*args)


def element_from_escnn(gspace, g) -> torch.Tensor:
    """The equiproj element ``S A_e S`` ``[d, d]`` float64 of an escnn element ``g`` of ``gspace.fibergroup``."""
    A = torch.as_tensor(gspace.basespace_action(g), dtype=torch.float64)
    S = _S(A.shape[0])
    return S @ A @ S


def _eid(escnn_id):
    """An escnn irrep id as nested tuples of ints (the full octahedral group's ids are nested)."""
    return tuple(_eid(v) for v in escnn_id) if isinstance(escnn_id, (tuple, list)) else int(escnn_id)


def _candidate_ids(G: Group, escnn_id: tuple) -> list:
    eid = _eid(escnn_id)
    kinds = {c.__name__ for c in type(G).__mro__}  # isinstance by name: the group classes sit above this module
    if kinds & {"SO2", "Cyclic", "SO3"}:
        return [eid[0]]
    if kinds & {"O2", "Dihedral"}:
        j, k = eid
        if "Dihedral" in kinds and 2 * k == G.N:
            return [((j + k) % 2, k), (1 - (j + k) % 2, k)]
        return [(j, k)]
    if "O3" in kinds:
        j, l = eid
        return [(l, (-1) ** j)]
    if G.is_finite:  # the octahedral groups: matched numerically among the irreps of the same dimension
        return list(G.irrep_ids(None))
    raise NotImplementedError(f"no escnn irrep map for {G}")


def _rule_matrix(irrep: Irrep, P: torch.Tensor) -> torch.Tensor:
    """``M = psi^{O(d)}(P)`` for ``P = S C_e`` (1 for 1-dim irreps)."""
    if irrep.dim == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if P.shape[0] == 2:
        return GROUP_CLASSES["O2"]().irrep((1, irrep.band)).matrix(P)
    R = P if torch.linalg.det(P) > 0 else -P
    return wigner_D(irrep.band, R)


def _intertwiner(psi_q: torch.Tensor, psi_e: torch.Tensor) -> torch.Tensor | None:
    """An orthogonal ``M`` with ``psi_q M = M psi_e`` on every given element, or ``None``."""
    d = psi_q.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    A = torch.cat([torch.kron(a, eye) - torch.kron(eye, b.T.contiguous()) for a, b in zip(psi_q, psi_e)])
    _, s, Vh = torch.linalg.svd(A)
    null = Vh[int((s > 1e-9 * max(1.0, float(s[0]))).sum()):]
    for v in null:
        M = v.reshape(d, d)
        scale = (M @ M.T).diagonal().mean()
        if scale > 0:
            M = M / scale.sqrt()
            if float((M @ M.T - eye).abs().max()) < 1e-8:
                return M
    return None


def escnn_irrep_map(G: Group, escnn_id, P: torch.Tensor, elements: torch.Tensor,
                    escnn_matrices: torch.Tensor) -> tuple[Irrep, torch.Tensor]:
    """``(psi, M)``: the equiproj irrep of an escnn irrep and the orthogonal ``M`` with
    ``psi(g) = M psi_escnn(g_e) M^T``, chosen by the documented rule and verified on ``elements``
    ``[E, d, d]`` (equiproj matrices of test elements) against escnn's matrices ``[E, n, n]``; a
    numerical intertwiner where the rule does not hold (other axis conventions)."""
    psi_e = torch.as_tensor(escnn_matrices, dtype=torch.float64)
    for cid in _candidate_ids(G, escnn_id):
        ir = G.irrep(cid)
        if ir.dim != psi_e.shape[-1]:
            continue
        psi_q = ir.matrix(elements)
        M = _rule_matrix(ir, P)
        if M.shape == psi_e.shape[-2:] and float((psi_q @ M - M @ psi_e).abs().max()) < _TOL:
            return ir, M
        M = _intertwiner(psi_q, psi_e)
        if M is not None:
            return ir, M
    raise ValueError(f"escnn's irrep {tuple(escnn_id)} of {G} matches no equiproj irrep on the test elements")


def _native_field(G: Group, slots: list, Q: torch.Tensor, elements: torch.Tensor | None):
    """equiproj's own field when the converted one is it: an irrep with ``Q = I``, or (finite groups) the
    regular field with the same matrices at ``elements``; else ``None``."""
    eye = torch.eye(Q.shape[0], dtype=torch.float64)
    if len(slots) == 1 and float((Q - eye).abs().max()) < 1e-12:
        return G.irrep(slots[0].id).segments[0][1]
    if elements is not None and G.is_finite and Q.shape[0] == G.order:
        regular = G.regular()
        if float((regular.matrix(elements) - spectral_field_matrix(Q, tuple(slots), elements)).abs().max()) < 1e-9:
            return regular.segments[0][1]
    return None


def _field_name(name: str, slots: list, Q: torch.Tensor) -> str:
    """A converted field's name in equiproj's style: a lone irrep by its id, with ``~`` where escnn's basis of
    it differs from equiproj's (the field is then not equal to equiproj's irrep)."""
    if len(slots) == 1:
        return f"{slots[0]}~"
    return name.replace("irrep_", "")


def escnn_field_segments(G: Group, fields, irrep_maps: dict, key=None, elements: torch.Tensor | None = None) -> list:
    """The segments ``[(1, field)]`` of the equiproj rep (``Rep(G, segments)``) of escnn fields given as
    data: ``fields`` = ``[(name, irrep ids,
    change of basis [n, n])]`` in the field type's order, ``irrep_maps`` = ``{escnn id: (psi, M)}``
    (from :func:`escnn_irrep_map`); ``key`` tells conventions apart in the fields' identity. A field that
    is one of equiproj's own (an irrep in its basis, the regular field, checked at ``elements``) becomes
    that field, so that the rep equals and prints like the native one."""
    segs = []
    for name, ids, cob in fields:
        Qe = torch.as_tensor(cob, dtype=torch.float64)
        n = Qe.shape[0]
        if Qe.shape != (n, n) or not float((Qe @ Qe.T - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-8:
            raise ValueError(f"escnn field {name!r}: its change of basis is not orthogonal (equiproj needs "
                             "orthogonal representations)")
        slots, blocks = [], []
        for eid in ids:
            ir, M = irrep_maps[_eid(eid)]
            slots.append(ir)
            blocks.append(M.T)
        if sum(s.dim for s in slots) != n:
            raise ValueError(f"escnn field {name!r}: irreps of total dimension {sum(s.dim for s in slots)}, size {n}")
        Q = Qe @ torch.block_diag(*blocks)
        native = _native_field(G, slots, Q, elements)
        if native is not None:
            segs.append((1, native))
            continue
        fkey = ("escnn", G, key, name, tuple(_eid(e) for e in ids),
                tuple(round(float(v), 12) for v in Q.reshape(-1)))
        segs.append((1, Field(G, slots, Q, functools.partial(spectral_field_matrix, Q, tuple(slots)),
                              name=_field_name(name, slots, Q), key=fkey)))
    return segs


def _test_elements(gspace, count: int = 24):
    """escnn elements: escnn's testing elements (all of a finite group, up to ``count``) and random ones."""
    import itertools

    G = gspace.fibergroup
    els = list(itertools.islice(G.testing_elements(), count))
    return els + [G.sample() for _ in range(6)]


def _gspace_key(gspace) -> tuple:
    """A gspace as a cache key: its name and the change of basis of its action on the base space."""
    C = torch.as_tensor(gspace.basespace_action.change_of_basis, dtype=torch.float64)
    return (gspace.name, tuple(round(float(v), 12) for v in C.reshape(-1)))


@bytes_cached("equiproj.groups._escnn._irrep_maps_cached")
def _irrep_maps_cached(gspace_key, gspace, ids: tuple) -> dict:
    G = group_from_escnn(gspace.fibergroup)
    d = gspace.dimensionality
    P = _S(d) @ torch.as_tensor(gspace.basespace_action.change_of_basis, dtype=torch.float64)
    els = _test_elements(gspace)
    gq = torch.stack([element_from_escnn(gspace, g) for g in els])
    try:
        G.check_elements(gq)
    except ValueError:
        raise NotImplementedError(
            f"escnn's {gspace.name} maps to elements outside equiproj's {G} (for D_N: reflection axes at multiples "
            f"of pi/N from the x axis only, e.g. gspaces.flipRot2dOnR2(N, axis=0.0); escnn's default axis pi/2 "
            f"needs an even N)") from None
    out = {}
    for eid in ids:
        psi = gspace.fibergroup.irrep(*eid)
        out[eid] = escnn_irrep_map(G, eid, P, gq, torch.stack([torch.as_tensor(psi(g), dtype=torch.float64) for g in els]))
    return out


def escnn_rep_parts(field_type) -> tuple:
    """What :meth:`Rep.from_escnn` builds its rep from: ``(G, segments, elements, matrices)``, the equiproj
    group and segments of an escnn ``FieldType``, of a ``GeometricTensor``'s type,
    or of an escnn ``Representation`` read in escnn's default gspace of its group
    (:func:`default_escnn_gspace`: ``rot2dOnR2(N)`` for C_N, ``rot3dOnR3()`` for SO(3), ...)."""
    if type(field_type).__name__ == "GeometricTensor":
        field_type = field_type.type
    elif _is_escnn_representation(field_type):
        from escnn import nn as escnn_nn  # noqa: PLC0415 - the optional dependency, present since its object was passed

        field_type = escnn_nn.FieldType(default_escnn_gspace(field_type.group), [field_type])
    if getattr(getattr(field_type, "gspace", None), "dimensionality", None) == 0:
        # no base space (escnn's Linear): the group's elements read as in its default gspace
        from escnn import nn as escnn_nn  # noqa: PLC0415

        field_type = escnn_nn.FieldType(default_escnn_gspace(field_type.gspace.fibergroup), field_type.representations)
    gspace = getattr(field_type, "gspace", None)
    reps = getattr(field_type, "representations", None)
    if gspace is None or reps is None:
        raise TypeError(f"Rep.from_escnn takes an escnn FieldType, GeometricTensor or Representation, got "
                        f"{type(field_type).__name__}")
    G = group_from_escnn(gspace.fibergroup)
    ids = tuple(sorted({_eid(i) for r in reps for i in r.irreps}))
    key = _gspace_key(gspace)
    maps = _irrep_maps_cached(key, gspace, ids)
    fields = [(r.name, r.irreps, r.change_of_basis) for r in reps]
    els = _test_elements(gspace, 8)
    gq = torch.stack([element_from_escnn(gspace, g) for g in els])
    segments = escnn_field_segments(G, fields, maps, key, gq)
    # the field type's own matrices at the test elements: Rep.from_escnn checks the rep against them
    want = torch.stack([torch.as_tensor(field_type.representation(g), dtype=torch.float64) for g in els])
    return G, segments, gq, want
