"""The operations layer: the fused op ``equiproj::fused_energies`` and the registry of backends.

* :func:`fused_energies` / :func:`fused_energies_and_grads`: many weights through the custom op
  (C++ kernel on CPU, Triton on CUDA, the pure-torch twin elsewhere), differentiable or with the
  gradient from the same pass;
* :data:`BACKENDS`, :func:`resolve_backend`, :func:`group_by_backend`: which backend computes
  what (``backend=`` of the energy functions); :func:`register_route`, :func:`route_for`: how each
  backend computes the kinds of terms of higher layers (kernel spaces);
* :func:`cpp_available`, :func:`triton_available`, :func:`cpp_num_threads`: what is built here.
"""

from ._availability import cpp_available, cpp_num_threads, triton_available
from ._backends import (BACKEND_NAMES, BACKENDS, ENV_VAR, Backend, backend_for, group_by_backend, register_route,
                        resolve_backend, route_for)
from ._op import (accumulation_dtype, as_coefficient, cpu_program, device_kernel, fused_energies,
                  fused_energies_and_grad, fused_energies_and_grads, kernel_coefficient, prepared_energies,
                  prepared_penalty, remember_plans, run_twin, split_energies)

__all__ = ["fused_energies", "fused_energies_and_grads", "fused_energies_and_grad", "as_coefficient",
           "accumulation_dtype", "run_twin", "device_kernel", "split_energies", "prepared_energies", "prepared_penalty",
           "kernel_coefficient", "remember_plans", "cpu_program",
           "Backend", "BACKENDS", "BACKEND_NAMES", "ENV_VAR", "resolve_backend", "backend_for", "group_by_backend", "register_route", "route_for",
           "cpp_available", "cpp_num_threads", "triton_available"]
