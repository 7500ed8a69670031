"""Construction numerics on one thread."""

from __future__ import annotations

import functools

import torch


def one_thread(fn):
    """Run ``fn`` with one intra-op thread. Building reps and their decompositions is many small
    LAPACK and matrix calls that gain nothing from threads; with another process busy on one of two
    cores, two threads made them 7 to 27 times slower (SO(3) 6 ⊗ 6: 10.5 s against 0.6 s; the
    regular rep of C_512: 4.2 s against 0.16 s)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper
