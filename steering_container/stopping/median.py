"""The median rule: stop a trial doing worse than the median of the others at the same step."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from steering_container.stopping.base import Direction, StoppingPolicy, TrialView


class MedianStopping(StoppingPolicy):
    """Prune a trial whose value is worse than the median of the other trials' values at the same step.

    The rule waits until ``min_trials`` other trials have reached the step, and never acts before
    ``warmup_steps``, since early epochs rank configurations poorly.
    """

    def __init__(self, min_trials: int = 5, warmup_steps: int = 0, direction: Direction = "minimize") -> None:
        super().__init__(direction)
        if min_trials < 1 or warmup_steps < 0:
            raise ValueError("min_trials must be >= 1 and warmup_steps >= 0")
        self.min_trials = min_trials
        self.warmup_steps = warmup_steps

    def should_prune(self, trial: TrialView, step: int, others: Sequence[TrialView]) -> bool:
        if step < self.warmup_steps:
            return False
        peers = [other.curve[step] for other in others if step in other.curve]
        if len(peers) < self.min_trials:
            return False
        return self.oriented(trial.curve[step]) > self.oriented(statistics.median(peers))
