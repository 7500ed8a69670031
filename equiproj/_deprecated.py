"""Old module paths, kept importable for one release with a ``DeprecationWarning``.

``import equiproj.rep`` (and ``from equiproj.rep import Rep``) still work: a finder on
``sys.meta_path`` serves each old name as a module holding the names of the modules that now
contain its contents.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

#: old module -> the modules that hold its contents now
MOVED = {
    "rep": ("groups", "groups._rep"),
    "so3": ("groups._so3",),
    "decompose": ("groups._decompose",),
    "clebsch_gordan": ("groups._clebsch_gordan", "groups._spatial"),
    "plan": ("_plan",),
    "energy": ("_energy",),
    "steerable": ("kernel_spaces", "kernel_spaces._steerable"),
    "verify": ("testing", "cli._verify"),
    "bench": ("cli._bench",),
    "demo": ("cli._demo", "cli._training", "cli._so2", "cli._smoke"),
    "demo_voxels": ("cli._voxels",),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.rpartition(".")
        if head != self.package or tail not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a plain module, filled by exec_module

    def exec_module(self, module):
        new = [f"{self.package}.{m}" for m in MOVED[module.__name__.rpartition(".")[2]]]
        warnings.warn(f"{module.__name__} is deprecated: use {new[0]}", DeprecationWarning, stacklevel=3)
        for name in reversed(new):  # the first module's names win
            module.__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items()
                                    if not k.startswith("__")})


def install(package: str) -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules(package))
