"""One reading of "a representation" for every entry point: an equiproj :class:`Rep`, an e3nn ``Irreps``
(or its string, where the group is known), an escnn ``FieldType``, ``GeometricTensor`` or
``Representation`` (docs/interop.md). Neither e3nn nor escnn is imported here: their objects are
recognised by type."""

from __future__ import annotations

from ._e3nn import is_e3nn_irreps
from ._escnn import is_escnn_object
from ._rep import Rep

__all__ = ["as_rep", "as_rep_pair"]


def as_rep(x, name: str = "rep", group=None) -> Rep:
    """``x`` as a :class:`Rep`.

    Accepted: a ``Rep``; an e3nn ``Irreps``/``Irrep`` (a rep of ``group`` when that is ``SO3()``/``O3()``,
    else of ``O3()``); a string such as ``"4x0 + 2x1"`` or ``"8x0e + 4x1o"`` when ``group`` is given
    (:meth:`Rep.parse`); an escnn ``FieldType``, ``GeometricTensor`` or ``Representation``
    (:meth:`Rep.from_escnn`). Anything else raises ``TypeError`` naming ``name`` and what to pass.

    Example::

        >>> import equiproj
        >>> from equiproj.groups import as_rep
        >>> as_rep("2x0 + 1", group=equiproj.SO3())
        Rep(SO3(), '2x0 + 1')
    """
    if isinstance(x, Rep):
        return x
    if is_e3nn_irreps(x):
        e3nn_group = group if type(group).__name__ in ("O3", "SO3") else None
        return Rep.from_e3nn(x, e3nn_group)
    if isinstance(x, str):
        if group is None:
            raise TypeError(f"{name} is the string {x!r} but no group is known to read it in: pass "
                            f"equiproj.Rep.parse(G, {x!r}) (or Rep.from_e3nn for e3nn irreps of O(3))")
        return Rep.parse(group, x)
    if is_escnn_object(x):
        return Rep.from_escnn(x)
    raise TypeError(f"{name} must be an equiproj Rep, an e3nn Irreps, or an escnn FieldType/Representation, got "
                    f"{type(x).__name__}")


def as_rep_pair(rep_in, rep_out) -> tuple[Rep, Rep]:
    """``(rep_in, rep_out)`` through :func:`as_rep`; a string takes the group of the other one."""
    if isinstance(rep_in, str) and not isinstance(rep_out, str):
        rep_out = as_rep(rep_out, "rep_out")
        return as_rep(rep_in, "rep_in", rep_out.group), rep_out
    rep_in = as_rep(rep_in, "rep_in")
    return rep_in, as_rep(rep_out, "rep_out", rep_in.group)
