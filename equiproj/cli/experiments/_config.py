"""What every experiment's configuration provides: three presets of its sizes."""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace

__all__ = ["ExperimentConfig"]


@dataclass
class ExperimentConfig(abc.ABC):
    """The sizes of one experiment (a dataclass deriving from this one).

    ``demo()`` is what ``equiproj demo`` runs, ``full()`` the full sizes (``--full``), ``tiny()`` a run
    of seconds for the test suite. An experiment whose data has parameters keeps them in a ``params``
    dataclass field, which :meth:`with_params` overrides (the ``--<param>`` options of the scripts in
    ``experiments/``).
    """

    @classmethod
    @abc.abstractmethod
    def demo(cls) -> "ExperimentConfig":
        """The laptop-scale sizes of ``equiproj demo``."""

    @classmethod
    @abc.abstractmethod
    def full(cls) -> "ExperimentConfig":
        """The full sizes (``--full``)."""

    @classmethod
    @abc.abstractmethod
    def tiny(cls) -> "ExperimentConfig":
        """A run of seconds, for the test suite."""

    def with_params(self, **values) -> "ExperimentConfig":
        """A copy whose ``params`` has ``values`` (an experiment without ``params`` refuses)."""
        if not hasattr(self, "params"):
            raise TypeError(f"{type(self).__name__} has no data parameters to override")
        return replace(self, params=replace(self.params, **values))
