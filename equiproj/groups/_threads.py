"""Construction numerics on one thread."""

from __future__ import annotations

import functools
import threading

import torch

# the intra-op thread count is global to the process: calls in several Python threads (or nested
# calls) share one switch to 1, and the last to finish restores the count found by the first
_lock = threading.Lock()
_active = 0
_saved = 1


def one_thread(fn):
    """Run ``fn`` with one intra-op thread. Building reps and their decompositions is many small
    LAPACK and matrix calls that gain nothing from threads; with another process busy on one of two
    cores, two threads made them 7 to 27 times slower (SO(3) 6 ⊗ 6: 10.5 s against 0.6 s; the
    regular rep of C_512: 4.2 s against 0.16 s)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _active, _saved
        with _lock:
            if _active == 0:
                _saved = torch.get_num_threads()
                torch.set_num_threads(1)
            _active += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _active -= 1
                if _active == 0:
                    torch.set_num_threads(_saved)

    return wrapper
