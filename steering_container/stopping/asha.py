"""Successive halving without synchronisation: ASHA (Li et al. 2018) and asynchronous Hyperband.

A rung is a resource level ``gracePeriod * reductionFactor**k`` below ``maxResource``. A trial that
reaches a rung continues only if its value there is among the best ``1/reductionFactor`` of every value
recorded at that rung so far (itself included; always at least the single best), otherwise it stops.
Nobody waits for a rung to fill, so workers never idle; the price is that early trials face few rivals.

Steps count from 0: after reporting step ``s`` a trial has used ``s + 1`` units of resource, so the rung
at resource ``r`` is judged at step ``r - 1``. A trial that skips a rung step is judged at its first
report beyond it (with that value); it is then no rival at that rung for others, who compare values at
the rung step itself — which keeps a decision at a few dictionary lookups per other trial.

Hyperband hedges against a too aggressive first rung by running several brackets at once: bracket ``b``
starts its rungs at ``gracePeriod * reductionFactor**b``, and trials compete only within their bracket.
A trial's bracket is a pure function of its id, drawn with the weights Hyperband gives its brackets
(most trials in the most aggressive one), so any process decides the same.
"""

from __future__ import annotations

import abc
import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence

from hepopt.task import hyperband_bracket_limit
from steering_container.api import derive_seed
from steering_container.stopping.base import Direction, StoppingPolicy, TrialView


class Rungs:
    """The rung levels of one successive-halving schedule."""

    def __init__(self, grace_period: int, reduction_factor: int, max_resource: int | None = None) -> None:
        problems = []
        if not isinstance(grace_period, int) or grace_period < 1:
            problems.append(f"grace_period must be an integer >= 1, got {grace_period!r}")
        if not isinstance(reduction_factor, int) or reduction_factor < 2:
            problems.append(f"reduction_factor must be an integer >= 2, got {reduction_factor!r}")
        if max_resource is not None and (not isinstance(max_resource, int) or max_resource < 1):
            problems.append(f"max_resource must be an integer >= 1 or None, got {max_resource!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.grace_period = grace_period
        self.reduction_factor = reduction_factor
        self.max_resource = max_resource

    def resources(self, up_to: int | None = None) -> Iterator[int]:
        """Rung resources in increasing order, below max_resource and at most ``up_to``."""
        if self.max_resource is None and up_to is None:
            raise ValueError("without max_resource the rungs never end: give up_to")
        resource = self.grace_period
        while (self.max_resource is None or resource < self.max_resource) and (up_to is None or resource <= up_to):
            yield resource
            resource *= self.reduction_factor

    def crossed(self, trial: TrialView, step: int) -> list[int]:
        """Rung steps this report passes: after the trial's previous reported step, up to ``step``."""
        previous = max((s for s in trial.curve if s < step), default=-1)
        return [resource - 1 for resource in self.resources(step + 1) if resource - 1 > previous]


def outranked(mine: float, rung_step: int, rivals: Iterable[TrialView], policy: StoppingPolicy,
              reduction_factor: int) -> bool:
    """True when ``mine`` is not among the best 1/reduction_factor of the values at the rung (itself
    included, at least the single best kept); ties count in the trial's favour."""
    mine = policy.oriented(mine)
    recorded, better = 1, 0
    for rival in rivals:
        value = rival.curve.get(rung_step)
        if value is None:
            continue
        recorded += 1
        if policy.oriented(value) < mine:
            better += 1
    return better >= max(1, recorded // reduction_factor)


class SuccessiveHalving(StoppingPolicy):
    """What ASHA and asynchronous Hyperband share: a trial's rungs, its rivals, and the verdict at a rung."""

    reduction_factor: int

    @abc.abstractmethod
    def schedule(self, trial: TrialView) -> Rungs:
        """The rungs that apply to ``trial``."""

    @abc.abstractmethod
    def rivals(self, trial: TrialView, others: Sequence[TrialView]) -> Sequence[TrialView]:
        """The trials ``trial`` competes with at its rungs."""

    @abc.abstractmethod
    def schedules(self) -> tuple[Rungs, ...]:
        """Every schedule a trial may follow."""

    def loses_rung(self, value: float, rung_step: int, rivals: Iterable[TrialView]) -> bool:
        """The successive-halving verdict at one rung, for a trial whose value there is ``value``."""
        return outranked(value, rung_step, rivals, self, self.reduction_factor)

    def should_prune(self, trial: TrialView, step: int, others: Sequence[TrialView]) -> bool:
        crossed = self.schedule(trial).crossed(trial, step)
        if not crossed:
            return False
        rivals = self.rivals(trial, others)
        return any(self.loses_rung(trial.curve[step], rung_step, rivals) for rung_step in crossed)


class AshaStopping(SuccessiveHalving):
    """Asynchronous successive halving over all trials of the study."""

    def __init__(self, grace_period: int = 1, reduction_factor: int = 3, max_resource: int | None = None,
                 direction: Direction = "minimize") -> None:
        super().__init__(direction)
        self.rungs = Rungs(grace_period, reduction_factor, max_resource)
        self.reduction_factor = reduction_factor

    def schedule(self, trial: TrialView) -> Rungs:
        return self.rungs

    def rivals(self, trial: TrialView, others: Sequence[TrialView]) -> Sequence[TrialView]:
        return others

    def schedules(self) -> tuple[Rungs, ...]:
        return (self.rungs,)


class HyperbandStopping(SuccessiveHalving):
    """Asynchronous Hyperband: ASHA brackets with growing grace periods, a trial's bracket from its id."""

    def __init__(self, grace_period: int = 1, reduction_factor: int = 3, *, max_resource: int,
                 brackets: int | None = None, direction: Direction = "minimize") -> None:
        super().__init__(direction)
        if not isinstance(max_resource, int):
            raise ValueError(f"hyperband needs max_resource, the resource of a full training, got {max_resource!r}")
        first = Rungs(grace_period, reduction_factor, max_resource)
        limit = hyperband_bracket_limit(grace_period, reduction_factor, max_resource)
        count = limit if brackets is None else brackets
        if not 1 <= count <= limit:
            raise ValueError(f"brackets must be in 1..{limit} for grace_period {grace_period}, reduction_factor "
                             f"{reduction_factor} and max_resource {max_resource}, got {brackets!r}")
        self.reduction_factor = first.reduction_factor
        self.brackets = tuple(Rungs(grace_period * reduction_factor**b, reduction_factor, max_resource)
                              for b in range(count))
        self._cumulative = list(itertools.accumulate(self.bracket_weights()))
        self._bracket_of: dict[int, int] = {}

    def bracket_weights(self) -> list[int]:
        """Hyperband's n_s = ceil(B / (s + 1) * eta**s) for bracket b, which halves s = B - 1 - b times."""
        count, eta = len(self.brackets), self.reduction_factor
        return [-(-count * eta ** (count - 1 - b) // (count - b)) for b in range(count)]

    def bracket_of(self, trial_id: int) -> int:
        """The trial's bracket, the same in every process (a hash of the id, not Python's salted hash)."""
        bracket = self._bracket_of.get(trial_id)
        if bracket is None:
            draw = derive_seed("hyperband", trial_id) % self._cumulative[-1]
            bracket = self._bracket_of[trial_id] = bisect.bisect_right(self._cumulative, draw)
        return bracket

    def schedule(self, trial: TrialView) -> Rungs:
        return self.brackets[self.bracket_of(trial.id)]

    def schedules(self) -> tuple[Rungs, ...]:
        return self.brackets

    def rivals(self, trial: TrialView, others: Sequence[TrialView]) -> Sequence[TrialView]:
        bracket = self.bracket_of(trial.id)
        return [other for other in others if self.bracket_of(other.id) == bracket]
