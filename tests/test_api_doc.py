"""``docs/api.md`` lists exactly the public names: for every public module of the library (no
underscore in its path; the applications in ``equiproj.cli`` are not library API) and for
``equiproj.kernels`` (the top-level ``kernels/`` folder, whose own modules are its implementation),
one section whose names are that module's ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import equiproj

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def documented_names() -> dict[str, set[str]]:
    """``{module: names}`` from the page: the backticked names before `` — `` on each bullet line, and
    every backticked name of a ``re-exported from ...:`` line."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in API_DOC.read_text().splitlines():
        m = re.match(r"^## `([\w.]+)`\s*$", line)
        if m:
            current = sections.setdefault(m.group(1), set())
            continue
        if current is None or not line.startswith("- "):
            continue
        if line.startswith("- re-exported from "):
            current.update(re.findall(r"`([\w.]+)`", line.split(":", 1)[1]))
        else:
            current.update(re.findall(r"`(\w+)`", line[2:].split(" — ", 1)[0]))
    return sections


def public_modules() -> list[str]:
    names = ["equiproj", "equiproj.kernels"]  # kernels/ is mapped to equiproj.kernels by setup.py
    for info in pkgutil.walk_packages(equiproj.__path__, "equiproj."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts) or parts[1] in ("cli", "kernels"):
            continue
        names.append(info.name)
    return [n for n in names if hasattr(importlib.import_module(n), "__all__")]


def test_the_api_page_lists_exactly_each_modules_all():
    doc = documented_names()
    modules = public_modules()
    assert sorted(doc) == sorted(modules), "docs/api.md sections differ from the public modules with __all__"
    for name in modules:
        public = set(importlib.import_module(name).__all__)
        missing, extra = sorted(public - doc[name]), sorted(doc[name] - public)
        assert not missing and not extra, f"docs/api.md, {name}: missing {missing}, not in __all__ {extra}"


def test_the_check_reads_the_page():
    """The parser finds names (a page it could not read would pass the check above vacuously)."""
    doc = documented_names()
    assert {"energies", "Rep", "Cyclic", "__version__"} <= doc["equiproj"]
    assert "ProjectionPenalty" in doc["equiproj.nn"]
