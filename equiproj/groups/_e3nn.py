"""e3nn's ``Irreps`` as equiproj reps (``Rep.parse``, ``Rep.from_e3nn``); e3nn is an optional
dependency and is never imported here: its objects are recognised by their type and read as strings.

equiproj's SO(3)/O(3) irreps are in e3nn's basis (real spherical harmonics with the polar axis
along y, no Condon-Shortley phase; docs/math.md §8), and O(3) acts by ``p^[det g < 0] D_l(R)``
like e3nn's ``D_from_matrix``. So an ``Irreps`` string names the rep with the same coordinates:
``Rep.parse(O3(), str(irreps))`` has ``rep.matrix(g) == irreps.D_from_matrix(g)``.
"""

from __future__ import annotations

__all__ = ["is_e3nn_irreps", "e3nn_irreps_string"]


def is_e3nn_irreps(x) -> bool:
    """An e3nn ``Irreps`` / ``Irrep`` (recognised without importing e3nn)."""
    return type(x).__module__.split(".")[0] == "e3nn" and type(x).__name__ in ("Irreps", "Irrep")


def e3nn_irreps_string(irreps, group_name: str) -> str:
    """The irreps string of an e3nn ``Irreps`` / ``Irrep`` / string, checked for the group ``"O3"`` or
    ``"SO3"`` (which takes the even irreps only: an odd one differs from the even one of the same
    degree only under the inversion, which SO(3) does not contain)."""
    if group_name not in ("O3", "SO3"):
        raise ValueError(f"e3nn irreps are representations of O(3) (or SO(3)), not of {group_name}")
    if is_e3nn_irreps(irreps):
        irreps = str(irreps)
    if not isinstance(irreps, str):
        raise TypeError(f"expected an e3nn Irreps, Irrep or irreps string like '8x0e + 4x1o', got {type(irreps).__name__}")
    if group_name == "SO3":
        terms = [t.strip() for t in irreps.split("+")]
        odd = [t for t in terms if t.endswith("o")]
        if odd:
            raise ValueError(f"{odd[0]!r} is odd under the inversion, which SO(3) does not contain: use group=equiproj.O3() "
                             "for e3nn irreps of both parities (SO(3) takes the 'e' ones)")
        if any(t and not t.endswith("e") for t in terms):
            raise ValueError(f"malformed e3nn irreps {irreps!r}: every irrep needs a parity, 'e' or 'o' (like '2x1e')")
    return irreps
