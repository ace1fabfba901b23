"""Point generation: ``propose(space, history, n, method, seed)``.

Steering is stateless (DESIGN.md §3.3): every call rebuilds its optimiser from the history. This module
owns what is common to every method: validating the history, orienting losses for minimisation,
deriving a per-call seed, and the guarantee that proposals are new — distinct from each other and from
every point already in the history (done, pending, failed or pruned) — whenever the space allows.
The methods themselves live in :mod:`steering_container.methods`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hepopt.errors import SpecError
from hepopt.space import SearchSpace

State = Literal["done", "pending", "failed", "pruned"]
STATES: tuple[str, ...] = ("done", "pending", "failed", "pruned")
#: How many random draws per requested point before deciding a space has no new point left.
RANDOM_TRIES_PER_POINT = 200
#: Finite spaces up to this size are enumerated when random draws keep hitting known points.
ENUMERABLE_GRID_SIZE = 200_000


@dataclass(frozen=True)
class Observation:
    """One point of the history. ``loss`` is set for done (and optionally pruned) points."""

    params: dict[str, Any]
    loss: float | None = None
    state: State = "done"


@dataclass
class Problem:
    """What a method sees: the space, the history split by state (flat points), and a seed.

    ``completed`` holds ``(flat point, loss)`` with losses oriented for minimisation (done points and
    pruned points that carry a loss). ``seen`` holds the keys of every point in the history plus those
    proposed so far in this call; a method calls :meth:`claim` for each point it returns.
    """

    space: SearchSpace
    completed: list[tuple[dict[str, Any], float]]
    pending: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    seed: int
    seen: set[tuple[Any, ...]] = field(default_factory=set)

    def is_new(self, flat: dict[str, Any]) -> bool:
        return self.space.key(flat) not in self.seen

    def claim(self, flat: dict[str, Any]) -> bool:
        """Record ``flat`` as proposed; False when it duplicates a known point."""
        key = self.space.key(flat)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def rng(self, salt: str = "") -> random.Random:
        return random.Random(derive_seed(self.seed, salt))


def derive_seed(*parts: Any) -> int:
    """A stable 32-bit seed from any printable parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def propose(space: SearchSpace, history: Sequence[Observation], n: int, method: str = "tpe",
            seed: int | None = None, direction: Literal["minimize", "maximize"] = "minimize") -> list[dict[str, Any]]:
    """Up to ``n`` new points; fewer only when the space has no new point left.

    The same ``(space, history, n, method, seed)`` always gives the same points. ``seed=None`` draws a
    fresh seed. Raises SpecError for an unknown method or a history that does not fit the space.
    """
    from steering_container.methods import get_method

    if n < 0:
        raise SpecError([("n", f"the number of points must be >= 0, got {n}")])
    proposer = get_method(method)
    problem = make_problem(space, history, seed, direction)
    if n == 0:
        return []
    points = _claimed(proposer(problem, n), problem)
    if len(points) < n:
        points += fill_at_random(problem, n - len(points))
    return [space.assemble(p) for p in points[:n]]


def _claimed(points: list[dict[str, Any]], problem: Problem) -> list[dict[str, Any]]:
    """Keep the points a method returned that it claimed, checking they are valid and new."""
    kept, keys = [], set()
    for flat in points:
        problem.space.check_point(problem.space.assemble(flat), "proposal")
        key = problem.space.key(flat)
        if key in keys or key not in problem.seen:
            continue  # the method returned a point it did not claim, or twice
        keys.add(key)
        kept.append(flat)
    return kept


def make_problem(space: SearchSpace, history: Sequence[Observation], seed: int | None,
                 direction: str = "minimize") -> Problem:
    """Validate the history and split it by state; the seed is derived from seed and history size."""
    sign = -1.0 if direction == "maximize" else 1.0
    completed, pending, failed, seen = [], [], [], set()
    for i, obs in enumerate(history):
        where = f"points[{i}]"
        if obs.state not in STATES:
            raise SpecError([(where, f"unknown state {obs.state!r}; expected one of {list(STATES)}")])
        flat = space.check_point(obs.params, where)
        seen.add(space.key(flat))
        loss = obs.loss
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
            raise SpecError([(where, f"loss must be a number or null, got {loss!r}")])
        if obs.state == "done" and (loss is None or not math.isfinite(loss)):
            failed.append(flat)  # a non-finite loss is a failed evaluation
        elif obs.state in ("done", "pruned") and loss is not None and math.isfinite(loss):
            completed.append((flat, sign * float(loss)))
        elif obs.state == "pending":
            pending.append(flat)
        else:
            failed.append(flat)
    base = random.SystemRandom().getrandbits(32) if seed is None else seed
    return Problem(space, completed, pending, failed, derive_seed(base, len(history)), seen)


def fill_at_random(problem: Problem, n: int, salt: str = "fill") -> list[dict[str, Any]]:
    """Up to ``n`` new random points, claimed; enumerates small finite spaces once draws stall."""
    rng = problem.rng(salt)
    out: list[dict[str, Any]] = []
    tries = 0
    while len(out) < n and tries < RANDOM_TRIES_PER_POINT * n:
        tries += 1
        flat = problem.space.flatten(problem.space.sample(rng))
        if problem.claim(flat):
            out.append(flat)
    if len(out) < n and problem.space.is_finite and problem.space.grid_size() <= ENUMERABLE_GRID_SIZE:
        rest = [p for p in problem.space.iter_grid() if problem.is_new(p)]
        rng.shuffle(rest)
        for flat in rest[: n - len(out)]:
            problem.claim(flat)
            out.append(flat)
    return out
