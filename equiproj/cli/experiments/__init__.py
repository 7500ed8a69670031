"""The experiments of ``equiproj demo``, one module each, all of one shape.

Each module has a config (an :class:`ExperimentConfig`: ``demo()``, ``full()``, ``tiny()``), a
``run(cfg, seed=0, out=None, log=print, tag="")`` that trains and evaluates, returns a dict with the
result rows under ``"rows"`` and, given a folder ``out``, writes ``<name><tag>_*`` files (CSV,
markdown, PNG) there, and a ``format_table(result)`` that prints it.

* ``_so2`` — the paper's SO(2) invariance toy;
* ``_smoke`` — a C4 CNN on approximately rotation-symmetric smoke-plume dynamics;
* ``_voxels`` — an O(3)-declared 3-D CNN on voxel shapes whose label depends weakly on orientation;
* ``_digits`` — scikit-learn's handwritten digits under a non-uniform orientation prior;
* ``_phiflow`` — smoke plumes simulated by PhiFlow;
* ``_symmetry`` — which subgroup of D4 the data keep, read off a model's symmetry spectrum.

``_smoke_data``, ``_voxels_data`` and ``_phiflow_data`` generate the data of three of them;
``_training`` holds what they share (seeding, one step per regime, timing, validation sweeps,
output), ``_relaxed`` the residual-pathway baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import _digits, _phiflow, _smoke, _so2, _symmetry, _voxels
from ._config import ExperimentConfig

__all__ = ["Experiment", "ExperimentConfig", "EXPERIMENTS", "DEFAULT_EXPERIMENTS"]


@dataclass(frozen=True)
class Experiment:
    """One experiment: its title, its config class, ``run`` and ``format_table``."""

    title: str
    config: type[ExperimentConfig]
    run: Callable[..., dict]
    format_table: Callable[[dict], str]


def _experiment(title: str, module) -> Experiment:
    config = next(v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, ExperimentConfig) and v is not ExperimentConfig)
    return Experiment(title, config, module.run, module.format_table)


#: name -> experiment, in the order ``equiproj demo`` runs them
EXPERIMENTS = {"so2": _experiment("SO(2) toy", _so2), "smoke": _experiment("smoke plume, C4", _smoke),
               "voxels": _experiment("O(3) voxel shapes", _voxels),
               "digits": _experiment("handwritten digits (scikit-learn), C4", _digits),
               "phiflow": _experiment("PhiFlow smoke plumes, C4", _phiflow),
               "symmetry": _experiment("which subgroup of D4 the data keep (symmetry spectrum)", _symmetry)}

DEFAULT_EXPERIMENTS = ("so2", "smoke", "voxels")  # the others with --only
