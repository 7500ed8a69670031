"""Which fused kernels can run here: the C++ extension ``equiproj._C`` and the Triton kernels.

Both are loaded on first use (the triton import is slow) and the reason for a missing one is
kept, so that errors and the one-time fallback warning say what to install.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

import torch

from .._plan import PlanColumn

__all__ = ["cpp_available", "cpp_missing", "cpp_num_threads", "triton_kernels", "triton_available",
           "triton_missing", "warn_once"]

_lock = threading.Lock()
_cpp_state: dict = {}
_triton_state: dict = {}
_warned: set = set()


def cpp_available() -> bool:
    """Whether the C++ extension ``equiproj._C`` is built and loaded (loads it on first call)."""
    if "ok" not in _cpp_state:
        with _lock:
            if "ok" not in _cpp_state:
                try:
                    spec = importlib.util.find_spec("equiproj._C")
                    if spec is None or not spec.origin:
                        raise ImportError("equiproj._C is not built")
                    if not hasattr(torch.ops.equiproj_cpu, "plan_columns"):
                        torch.ops.load_library(spec.origin)
                    _check_plan_columns()
                    _cpp_state["reason"] = None
                    _cpp_state["ok"] = True
                except Exception as e:  # noqa: BLE001 - any load failure means: no extension
                    _cpp_state["reason"] = f"{type(e).__name__}: {e}"
                    _cpp_state["ok"] = False
    return _cpp_state["ok"]


def _check_plan_columns() -> None:
    """The extension reads plan rows by the column names of csrc/plan_columns.h: they must be PlanColumn's."""
    cpp = list(torch.ops.equiproj_cpu.plan_columns())
    py = [c.name for c in PlanColumn]
    if cpp != py:
        raise ImportError(f"equiproj._C was built with plan columns {cpp}, but equiproj has {py}: rebuild the extension")


def cpp_missing() -> str:
    return (f"the C++ extension equiproj._C is not available ({_cpp_state.get('reason')}); build it with "
            "`pip install --no-build-isolation -e .` in the equiproj checkout (needs a C++20 compiler and torch "
            "installed first)")


def cpp_num_threads() -> int:
    """The thread count the C++ kernels run with (``at::get_num_threads()`` seen from inside the extension)."""
    if not cpp_available():
        raise RuntimeError(cpp_missing())
    return int(torch.ops.equiproj_cpu.num_threads())


def triton_kernels():
    """:mod:`equiproj.kernels` with the Triton kernel imported, or ``None`` when that import fails."""
    if "mod" not in _triton_state:
        with _lock:
            if "mod" not in _triton_state:
                try:
                    from .. import kernels  # noqa: PLC0415 - the triton import is slow: only when needed

                    has = kernels.HAS_TRITON
                except Exception as e:  # noqa: BLE001
                    _triton_state["reason"] = f"{type(e).__name__}: {e}"
                    _triton_state["mod"] = None
                else:
                    _triton_state["mod"] = kernels
                    _triton_state["reason"] = None if has else "triton is not installed"
    return _triton_state["mod"]


def triton_available() -> bool:
    """Whether the Triton kernels can run here (triton importable and a CUDA device present)."""
    k = triton_kernels()
    return k is not None and k.HAS_TRITON and torch.cuda.is_available()


def triton_missing() -> str:
    triton_kernels()
    why = _triton_state.get("reason") or ("no CUDA device" if not torch.cuda.is_available() else "unknown")
    return f"the Triton kernels are not available ({why}); install them with `pip install triton` on a CUDA machine"


def warn_once(key: str, message: str) -> None:
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
