"""What every early-stopping policy shares: the view of a trial it decides on, and the interface.

A policy answers one question per report — stop this trial now? — from the trial and the other trials
of its study. It keeps no record of earlier answers, so the orchestrator may cache trials however it
likes and a replay benchmark drives the very same classes without any service. A policy that learns
from completed trials (the predictive one) does its learning in :meth:`StoppingPolicy.refit`, which
the caller runs away from the decision path (a background thread in the orchestrator).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["minimize", "maximize"]
TrialState = Literal["running", "done", "pruned", "failed"]
DIRECTIONS: tuple[str, ...] = ("minimize", "maximize")


@dataclass
class TrialView:
    """One trial as a policy sees it: ``curve`` maps each reported step to its value, ``final`` is the
    loss told for a completed (``done``) trial. Callers own the object; policies only read it."""

    id: int
    params: Mapping[str, Any] = field(default_factory=dict)
    curve: dict[int, float] = field(default_factory=dict)
    state: TrialState = "running"
    final: float | None = None

    @property
    def completed(self) -> bool:
        """Trained to its end with a final value: what the predictive policy learns from."""
        return self.state == "done" and self.final is not None

    def values_at(self, steps: Sequence[int]) -> list[float] | None:
        """The values at these steps, or None when one of them was never reported."""
        values = [self.curve.get(step) for step in steps]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]


class StoppingPolicy(abc.ABC):
    """Answers one question per report: stop this trial now?"""

    def __init__(self, direction: Direction = "minimize") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.direction = direction
        self._sign = -1.0 if direction == "maximize" else 1.0

    def oriented(self, value: float) -> float:
        """``value`` turned so that lower is better, whatever the direction."""
        return self._sign * value

    @abc.abstractmethod
    def should_prune(self, trial: TrialView, step: int, others: Sequence[TrialView]) -> bool:
        """True when ``trial``, which has just reported ``trial.curve[step]``, should stop; ``others``
        are the study's other trials in any state."""

    def wants_refit(self, completed: Sequence[TrialView]) -> bool:
        """Whether :meth:`refit` would learn something new from these completed trials; cheap."""
        return False

    def refit(self, completed: Sequence[TrialView]) -> None:
        """Learn from completed trials (slow; never on the decision path). Stateless policies learn nothing."""
        return None


class NoStopping(StoppingPolicy):
    """Every trial runs to its end."""

    def should_prune(self, trial: TrialView, step: int, others: Sequence[TrialView]) -> bool:
        return False
