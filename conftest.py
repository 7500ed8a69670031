"""Shared pytest setup for tests/ and bench/.

* Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set before
  any module defining ``@triton.jit`` kernels is imported.
* ``seed`` / ``gen``: every random test is seeded from its own test id, so a failure replays
  exactly (``EQUIPROJ_TEST_SEED=n`` shifts all seeds, to explore other draws). ``seed`` also
  seeds torch's global generator (layer initialisation uses it).
"""

import os
import zlib

import pytest
import torch

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
