"""Which annealer samples the QSVR's QUBO: a name from configuration, or any dimod-style sampler object.

``"simulated"`` is dwave-samplers' SimulatedAnnealingSampler, installed with the steering room.
``"dwave"`` is a real quantum annealer through dwave-system, imported only when asked for so that the
package is no hard dependency; it finds its endpoint and token the way dwave-system always does (the
``DWAVE_API_TOKEN`` environment variable or a ``dwave config create`` file), never from hepopt's files.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from hepopt.errors import SpecError

SAMPLER_NAMES = ("simulated", "dwave")
#: Effort of the simulated annealer when the caller does not choose. On the MLPF tuning splits more
#: effort finds lower energies but not better predictions (R² 0.898 at 50 reads x 200 sweeps, 0.895 at
#: 50 x 1000, combining the 10 lowest): the QUBO's exact optimum over-fits 20 curves about as much.
DEFAULT_SIMULATED_READS = 50
DEFAULT_SIMULATED_SWEEPS = 200


class Sampler(Protocol):
    """The part of dimod's Sampler interface QSVR uses."""

    def sample(self, bqm: Any, **parameters: Any) -> Any: ...


def resolve_sampler(sampler: str | Sampler, options: dict[str, Any] | None = None) -> Sampler:
    """A sampler object for a configured name; an object with ``sample`` passes through unchanged."""
    if not isinstance(sampler, str):
        if not callable(getattr(sampler, "sample", None)):
            raise SpecError([("qsvr.sampler", f"must be one of {SAMPLER_NAMES} or have a sample() method, "
                                              f"got {type(sampler).__name__}")])
        return sampler
    if sampler == "simulated":
        from dwave.samplers import SimulatedAnnealingSampler

        return SimulatedAnnealingSampler()
    if sampler == "dwave":
        return _dwave_sampler(options or {})
    raise SpecError([("qsvr.sampler", f"unknown sampler {sampler!r}; choose one of {SAMPLER_NAMES}")])


def _dwave_sampler(options: dict[str, Any]) -> Sampler:
    """DWaveSampler wrapped in an embedding; its ``options`` (e.g. solver) go to DWaveSampler."""
    try:
        system = importlib.import_module("dwave.system")
    except ImportError as exc:
        raise SpecError([("qsvr.sampler", "sampler 'dwave' needs the dwave-system package "
                                          "(pip install dwave-system) and a Leap token in DWAVE_API_TOKEN or "
                                          "a 'dwave config create' file")]) from exc
    return system.EmbeddingComposite(system.DWaveSampler(**options))
