"""A model's declared layers under a subgroup: ``restrict_`` re-declares them, ``project_(subgroup=H)`` projects."""

from __future__ import annotations

from torch import nn

from ..groups import Subgroup
from ._declare import _ATTR, _epoch, declared_layers

__all__ = ["restrict_", "as_subgroup", "under"]


def as_subgroup(group, H) -> Subgroup:
    """``H`` (a :class:`~equiproj.groups.Subgroup`, a name from ``group.subgroups()`` or, for the finite
    groups that list them, from ``group.subgroups(conjugates=True)`` (``"Csy"``), or a group whose elements
    are elements of ``group``) as a :class:`~equiproj.groups.Subgroup` of ``group``."""
    if isinstance(H, str):
        lattice = group.subgroups()
        if H not in lattice and group.is_finite and group._lists_every_subgroup_class:
            lattice = group.subgroups(conjugates=True)
        return lattice[H]
    if isinstance(H, Subgroup):
        if H.parent != group and not _inside(H.group, group):
            raise ValueError(f"{H.name} is a subgroup of {H.parent!r}, not of {group!r}")
        return H if H.parent == group else Subgroup(H.name, H.group, group)
    if hasattr(H, "ambient_dim") and hasattr(H, "irrep_ids"):
        if not _inside(H, group):
            raise ValueError(f"{H!r} is not a subgroup of {group!r}: pick one of {list(group.subgroups().names)}")
        return Subgroup(repr(H), H, group)
    raise TypeError(f"subgroup must be a Subgroup, a subgroup name or an equiproj group, got {type(H).__name__}")


def _inside(H, G) -> bool:
    return H.ambient_dim == G.ambient_dim and G._contains(H.elements() if H.is_finite else H.generators())


def under(declaration, subgroup):
    """``declaration`` restricted to ``subgroup`` (``None``: unchanged)."""
    if subgroup is None or declaration.group is None:
        return declaration
    return declaration.restricted(as_subgroup(declaration.group, subgroup))


def restrict_(model: nn.Module, subgroup) -> nn.Module:
    """Declare every declared layer of ``model`` again under ``subgroup`` (its reps restricted; a grid conv
    stays a grid conv, a steerable conv becomes a grid conv when the subgroup maps the kernel grid onto
    itself and otherwise takes the subgroup's kernel space). A penalty built on the model afterwards
    (or an existing one, which follows its model) then pulls towards ``subgroup``-equivariance only.
    Returns ``model``.

    ``subgroup``: a :class:`~equiproj.groups.Subgroup`, a name from ``G.subgroups()`` (``"C4"``,
    ``"D1[0]"``) or a group whose elements are elements of the declared group.

    Example::

        >>> import torch, equiproj
        >>> from equiproj.nn import declaration, declare, restrict_
        >>> D4 = equiproj.Dihedral(4)
        >>> model = torch.nn.Sequential(declare(torch.nn.Linear(8, 8), D4.regular(), D4.regular()))
        >>> _ = restrict_(model, "C4")            # keep the rotations, drop the reflections of D4
        >>> declaration(model[0]).group
        Cyclic(4)
    """
    layers = declared_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no declared layers: nothing to restrict")
    for _, module, d in layers:
        module.__dict__[_ATTR] = under(d, subgroup)
    _epoch[0] += 1
    return model
