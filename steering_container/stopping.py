"""Early-stopping policies: decide from intermediate values whether a running point should stop.

A policy is stateless and sees only learning curves (``{step: value}`` per point), so the orchestrator
may cache curves however it likes and a replay benchmark can drive a policy without any service.
ASHA, Hyperband and the SVR-based predictors implement the same interface.
"""

from __future__ import annotations

import abc
import statistics
from collections.abc import Iterable, Mapping
from typing import Literal

from hepopt.task import EarlyStopping

Direction = Literal["minimize", "maximize"]
#: A learning curve: the value reported at each step.
Curve = Mapping[int, float]


class StoppingPolicy(abc.ABC):
    """Answers one question per report: stop this point now?"""

    @abc.abstractmethod
    def should_prune(self, step: int, value: float, history_of_other_points: Iterable[Curve]) -> bool:
        """True when the point that reported ``value`` at ``step`` should stop, given the others' curves."""


class NoStopping(StoppingPolicy):
    """Every point runs to its end."""

    def should_prune(self, step: int, value: float, history_of_other_points: Iterable[Curve]) -> bool:
        return False


class MedianStopping(StoppingPolicy):
    """Prune a point whose value is worse than the median of the other points at the same step.

    The rule waits until ``min_trials`` other points have reached the step, and never acts before
    ``warmup_steps``, since early epochs rank configurations poorly.
    """

    def __init__(self, min_trials: int = 5, warmup_steps: int = 0, direction: Direction = "minimize") -> None:
        if min_trials < 1 or warmup_steps < 0:
            raise ValueError("min_trials must be >= 1 and warmup_steps >= 0")
        self.min_trials = min_trials
        self.warmup_steps = warmup_steps
        self.direction = direction

    def should_prune(self, step: int, value: float, history_of_other_points: Iterable[Curve]) -> bool:
        if step < self.warmup_steps:
            return False
        peers = [curve[step] for curve in history_of_other_points if step in curve]
        if len(peers) < self.min_trials:
            return False
        median = statistics.median(peers)
        return value < median if self.direction == "maximize" else value > median


def make_policy(options: EarlyStopping, direction: Direction = "minimize") -> StoppingPolicy:
    """The policy a task's ``hepopt.earlyStopping`` block asks for."""
    if options.policy == "median":
        return MedianStopping(options.minTrials, options.warmupSteps, direction)
    if options.policy == "none":
        return NoStopping()
    raise ValueError(f"unknown early-stopping policy {options.policy!r}")
