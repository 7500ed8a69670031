"""The package's architecture: the import graph is acyclic and layered, ``import equiproj`` stays lean,
the public namespaces are what ``__all__`` says, and the plan columns agree with the C++ extension.

Layers (each module imports only from its own layer or lower ones; ``equiproj/__init__`` says the same):

    1  equiproj.groups.*
    2  equiproj._plan, equiproj.reference
    3  equiproj.ops.*, equiproj.kernels.* (the top-level ``kernels/`` folder)
    4  equiproj._energy
    5  equiproj.kernel_spaces.*, equiproj.grid, equiproj.translation, equiproj.baselines, equiproj.testing
    6  equiproj.nn.*
    7  equiproj.cli.*, equiproj.__main__ (applications)

``equiproj`` itself (its ``__init__``) may import layers 1-6 but never 7, and only layer 7 may import it.

The import scan is static (``ast``), so it sees every import, including those inside functions
(deferred imports break no cycle at the level of the design), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "equiproj"
#: source folder -> module prefix (setup.py: package_dir={"equiproj.kernels": "kernels"})
SOURCES = {ROOT / "equiproj": "equiproj", ROOT / "kernels": "equiproj.kernels"}
#: compiled modules of the package (no .py file)
COMPILED = {"equiproj._C"}

ROOT_MODULE = "equiproj"
APPLICATION_LAYER = 7

#: module prefix -> layer; a prefix ending in "." covers a subpackage (its __init__ included)
LAYERS = {
    "equiproj._caches": 1,
    "equiproj.groups.": 1,
    "equiproj._plan": 2,
    "equiproj.reference": 2,
    "equiproj.ops.": 3,
    "equiproj.kernels.": 3,
    "equiproj._energy": 4,
    "equiproj.kernel_spaces.": 5,
    "equiproj.grid": 5,
    "equiproj.translation": 5,
    "equiproj.baselines": 5,
    "equiproj.testing": 5,
    "equiproj.nn.": 6,
    "equiproj.integrations.": 6,
    "equiproj.cli.": 7,
    "equiproj.__main__": 7,
}

PUBLIC_MODULES = ["equiproj.groups", "equiproj.ops", "equiproj.kernel_spaces", "equiproj.nn", "equiproj.grid",
                  "equiproj.translation", "equiproj.reference", "equiproj.baselines", "equiproj.testing"]


# ---- the static scan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: Path
    line: int
    text: str

    def __str__(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer} imports {self.target} ({self.text})"


def _module_files() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is_package)."""
    out = {}
    for folder, prefix in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            is_pkg = rel[-1] == "__init__"
            parts = rel[:-1] if is_pkg else rel
            out[".".join((prefix,) + parts)] = (path, is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_relative(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports_of(module: str, path: Path, is_pkg: bool, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def add(target, node):
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            found.append(Import(module, target, path, node.lineno, ast.unparse(node).splitlines()[0]))

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the `else:` branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_pkg, node.level, node.module)
            else:
                base = node.module
            if base == "__future__":
                return
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import name` imports the submodule pkg.name when there is one
                add(sub if alias.name != "*" and sub in known else base, node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def scan() -> tuple[dict[str, tuple[Path, bool]], list[Import]]:
    files = _module_files()
    known = set(files) | COMPILED
    imports = []
    for module, (path, is_pkg) in files.items():
        imports += _imports_of(module, path, is_pkg, known)
    return files, imports


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS.items():
        if prefix.endswith("."):
            if module == prefix[:-1] or module.startswith(prefix):
                return layer
        elif module == prefix:
            return layer
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle ``[a, b, ..., a]`` of the directed graph (iterative DFS, colours), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = GREY
        path = [start]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt, BLACK) == WHITE:
                colour[nxt] = GREY
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


@pytest.fixture(scope="module")
def package_imports():
    return scan()


def test_scanner_sees_the_whole_package(package_imports):
    """Guards the scan itself: it finds the modules and imports known to exist."""
    files, imports = package_imports
    for m in ["equiproj", "equiproj._plan", "equiproj.groups._rep", "equiproj.kernels.schedule", "equiproj.cli",
              "equiproj.ops._availability", "equiproj.__main__"]:
        assert m in files, f"scan missed module {m}"
    edges = {(i.importer, i.target) for i in imports}
    # absolute import from the kernels/ folder, relative from a package __init__, `from . import submodule`,
    # `from .. import submodule` inside a function
    for e in [("equiproj.kernels.schedule", "equiproj._plan"), ("equiproj.groups", "equiproj.groups._rep"),
              ("equiproj", "equiproj.grid"), ("equiproj.ops._availability", "equiproj.kernels"),
              ("equiproj.ops._backends", "equiproj.reference")]:
        assert e in edges, f"scan missed the import {e[0]} -> {e[1]}"


def test_scanner_rules():
    """Relative resolution, submodule imports, function-level imports, TYPE_CHECKING, on a synthetic file."""
    import tempfile

    src = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import os, equiproj.grid\n"
        "from . import _energy, not_a_module\n"
        "from ..groups import Rep\n"
        "if TYPE_CHECKING:\n"
        "    from equiproj.nn import Anything\n"
        "else:\n"
        "    from .. import reference\n"
        "def f():\n"
        "    import equiproj.testing as t\n"
        "    class C:\n"
        "        from ...ops import _op\n"
    )
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mod.py"
        p.write_text(src)
        known = {"equiproj", "equiproj.grid", "equiproj.ops.x", "equiproj.ops.reference", "equiproj.ops.x._energy",
                 "equiproj.groups", "equiproj.reference", "equiproj.testing", "equiproj.ops", "equiproj.ops._op", "equiproj.nn"}
        got = sorted(i.target for i in _imports_of("equiproj.ops.x.mod", p, False, known))
    assert got == sorted(["equiproj.grid", "equiproj.ops.x._energy", "equiproj.ops.x", "equiproj.ops.groups",
                          "equiproj.ops.reference", "equiproj.testing", "equiproj.ops._op"]), got


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    cyc = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cyc is not None and cyc[0] == cyc[-1] and set(cyc) == {"a", "b", "c"}
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_every_import_names_an_existing_module(package_imports):
    files, imports = package_imports
    missing = [str(i) for i in imports if i.target not in files and i.target not in COMPILED]
    assert not missing, "imports of equiproj modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycle(package_imports):
    files, imports = package_imports
    graph = {m: set() for m in files}
    where = {}
    for i in imports:
        if i.target in graph and i.target != i.importer:
            graph[i.importer].add(i.target)
            where.setdefault((i.importer, i.target), i)
    self_imports = [str(i) for i in imports if i.target == i.importer]
    assert not self_imports, "modules importing themselves:\n" + "\n".join(self_imports)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(
        str(where[(a, b)]) for a, b in zip(cycle, cycle[1:]))


def test_every_module_has_a_layer(package_imports):
    files, _ = package_imports
    unassigned = [m for m in files if m != ROOT_MODULE and layer_of(m) is None]
    assert not unassigned, f"modules outside the layer table of tests/test_architecture.py: {unassigned}"


def layering_violations(files, imports) -> list[str]:
    violations = []
    for i in imports:
        src, dst = i.importer, i.target
        if dst not in files:
            continue  # the compiled extension, or reported by test_every_import_names_an_existing_module
        if src == ROOT_MODULE:
            if layer_of(dst) == APPLICATION_LAYER:
                violations.append(f"{i}  [the package root must not import the applications (layer 7)]")
        elif dst == ROOT_MODULE:
            if layer_of(src) != APPLICATION_LAYER:
                violations.append(f"{i}  [only layer 7 may import the package root; {src} is layer {layer_of(src)}]")
        else:
            ls, ld = layer_of(src), layer_of(dst)
            if ls is not None and ld is not None and ld > ls:
                violations.append(f"{i}  [layer {ls} imports layer {ld}]")
    return violations


def test_layering(package_imports):
    files, imports = package_imports
    violations = layering_violations(files, imports)
    assert not violations, f"{len(violations)} layering violation(s):\n" + "\n".join(violations)


def test_layering_rules_flag_violations():
    """The rules themselves, on synthetic imports (each of these must be reported, the others not)."""
    files = {m: (ROOT / "equiproj" / "x.py", False) for m in
             ["equiproj", "equiproj.groups._rep", "equiproj._plan", "equiproj.reference",
              "equiproj.ops._op", "equiproj.kernels.schedule", "equiproj._energy", "equiproj.grid", "equiproj.nn",
              "equiproj.nn._penalty", "equiproj.cli", "equiproj.cli.bench._run", "equiproj.__main__"]}

    def imp(a, b):
        return Import(a, b, ROOT / "equiproj" / "x.py", 1, "import")

    bad = [imp("equiproj.groups._rep", "equiproj._plan"), imp("equiproj.reference", "equiproj.ops._op"),
           imp("equiproj.kernels.schedule", "equiproj._energy"), imp("equiproj.grid", "equiproj.nn._penalty"),
           imp("equiproj.nn", "equiproj.cli.bench._run"), imp("equiproj", "equiproj.cli"),
           imp("equiproj.nn._penalty", "equiproj")]
    good = [imp("equiproj._plan", "equiproj.reference"), imp("equiproj.ops._op", "equiproj.kernels.schedule"),
            imp("equiproj.kernels.schedule", "equiproj._plan"), imp("equiproj.nn", "equiproj.nn._penalty"),
            imp("equiproj.cli.bench._run", "equiproj"), imp("equiproj.__main__", "equiproj.cli"),
            imp("equiproj", "equiproj.nn"),
            imp("equiproj.cli", "equiproj._C")]
    for i in bad:
        assert len(layering_violations(files, [i])) == 1, f"not reported: {i}"
    assert layering_violations(files, good) == []


# ---- import equiproj stays lean -----------------------------------------------------------------
_PROBE = r"""
import importlib.abc, sys, traceback
first = {}
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" and "triton" not in first:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
            mine = [f for f in frames if "site-packages" not in f.filename]
            first["triton"] = "".join(traceback.format_list(mine + frames[-2:]))
        return None
sys.meta_path.insert(0, Spy())
import equiproj
mods = sorted(m for m in sys.modules if m.startswith("equiproj"))
print(repr(mods))
print(repr("triton" in sys.modules))
print(repr(first.get("triton", "")))
"""


@pytest.fixture(scope="module")
def fresh_import():
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    return ast.literal_eval(lines[-3]), ast.literal_eval(lines[-2]), ast.literal_eval(lines[-1])


def test_plain_import_loads_no_application(fresh_import):
    mods, _, _ = fresh_import
    assert "equiproj" in mods and "equiproj._energy" in mods  # the probe did import the package
    bad = [m for m in mods if m.startswith("equiproj.cli") or m == "equiproj.__main__"
           or any(w in m.rsplit(".", 1)[-1] for w in ("bench", "demo", "smoke", "voxels", "training_demo"))
           or m == "equiproj.kernels.triton_energies"]
    assert not bad, f"`import equiproj` loads applications or the Triton kernels: {bad}"


# ---- public namespaces ----------------------------------------------------------------------------
def test_top_level_namespace():
    import equiproj

    assert len(set(equiproj.__all__)) == len(equiproj.__all__), "duplicates in equiproj.__all__"
    assert dir(equiproj) == sorted(equiproj.__all__)
    missing = [n for n in equiproj.__all__ if not hasattr(equiproj, n)]
    assert not missing, f"equiproj.__all__ names missing attributes: {missing}"
    assert "cli" not in equiproj.__all__


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_all_resolves(name):
    mod = importlib.import_module(name)
    assert isinstance(getattr(mod, "__all__", None), (list, tuple)), f"{name} has no __all__"
    assert len(set(mod.__all__)) == len(mod.__all__), f"duplicates in {name}.__all__"
    assert all(isinstance(n, str) for n in mod.__all__)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


# ---- plan columns: Python enum, NamedTuple and C++ header ----------------------------------------
def test_plan_row_mirrors_plan_column():
    from equiproj._plan import PlanColumn, PlanRow

    assert PlanRow._fields == tuple(c.name.lower() for c in PlanColumn)
    assert [int(c) for c in PlanColumn] == list(range(len(PlanColumn)))


def test_plan_columns_match_the_cpp_extension():
    from equiproj import ops
    from equiproj._plan import PlanColumn

    if not ops.cpp_available():
        pytest.skip("the C++ extension equiproj._C is not built")
    assert list(torch.ops.equiproj_cpu.plan_columns()) == [c.name for c in PlanColumn]


def test_plan_columns_match_the_cpp_header():
    """The header's names, and its enum values, are PlanColumn's (checked without a build)."""
    import re

    from equiproj._plan import PlanColumn

    header = (ROOT / "csrc" / "plan_columns.h").read_text()
    names = re.search(r"kPlanColumnNames\[\]\s*=\s*\{([^}]*)\}", header).group(1)
    assert re.findall(r'"(\w+)"', names) == [c.name for c in PlanColumn]
    values = [int(v) for v in re.findall(r"k\w+\s*=\s*(\d+)\s*,", header.split("enum PlanColumn", 1)[1].split("};")[0])]
    assert values == list(range(len(PlanColumn) + 1))  # the columns, then kPlanColumns


# ---- module sizes ----------------------------------------------------------------------------
#: the most lines of a module of the library, and of one of the applications (equiproj/cli)
MAX_LINES, MAX_CLI_LINES = 700, 400


def test_modules_stay_readable():
    """No module of ``equiproj/`` over 700 lines, none of ``equiproj/cli/`` over 400: a longer one is
    split along its parts (as ``cli/bench/`` and ``cli/experiments/`` are)."""
    long = []
    for path in sorted((ROOT / "equiproj").rglob("*.py")):
        limit = MAX_CLI_LINES if "cli" in path.relative_to(ROOT / "equiproj").parts else MAX_LINES
        n = len(path.read_text().splitlines())
        if n > limit:
            long.append(f"{path.relative_to(ROOT)}: {n} lines (limit {limit})")
    assert not long, "modules too long:\n" + "\n".join(long)
