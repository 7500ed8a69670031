"""The group classes by name: each public :class:`~equiproj.groups.Group` subclass registers itself here
when it is defined (``Group.__init_subclass__``), so that modules below the group classes (the rep
module, the escnn conversion) can make a group from its name without importing the classes."""

from __future__ import annotations

__all__ = ["GROUP_CLASSES"]

#: class name -> group class (``"O3"`` -> ``equiproj.O3``), filled as the classes are defined
GROUP_CLASSES: dict[str, type] = {}
