"""Shared pytest setup for tests/ and bench/.

* Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set before
  any module defining ``@triton.jit`` kernels is imported.
* ``seed`` / ``gen``: every random test is seeded from its own test id, so a failure replays
  exactly (``EQUIPROJ_TEST_SEED=n`` shifts all seeds, to explore other draws). ``seed`` also
  seeds torch's global generator (layer initialisation uses it).
* Doctests (``pytest --doctest-modules equiproj``): each starts from ``torch.manual_seed(0)``; one
  whose example imports an optional package that is not installed (escnn, e3nn) is skipped.
"""

import importlib.util
import os
import re
import zlib

import pytest
import torch
from _pytest.doctest import DoctestItem

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    s = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("EQUIPROJ_TEST_SEED", "0"))) % 2**31
    torch.manual_seed(s)
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    return f"equiproj tests: seeds from test ids (EQUIPROJ_TEST_SEED={os.environ.get('EQUIPROJ_TEST_SEED', '0')})"


#: optional packages a doctest may import; its example is skipped where the package is missing
OPTIONAL_IN_DOCTESTS = ("escnn", "e3nn", "matplotlib", "sklearn", "phi")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, DoctestItem):
            continue
        source = "".join(e.source for e in item.dtest.examples)
        for name in OPTIONAL_IN_DOCTESTS:
            if re.search(rf"^\s*(from|import)\s+{name}\b", source, re.M) and importlib.util.find_spec(name) is None:
                item.add_marker(pytest.mark.skip(reason=f"the example needs {name}, which is not installed"))


@pytest.fixture(autouse=True)
def _seeded_doctest(request):
    if isinstance(request.node, DoctestItem):
        torch.manual_seed(0)


# scripts that make the committed fixtures need the peer libraries (escnn): run by hand, never collected
collect_ignore = ["tests/nn/data/export_escnn_models.py"]
