"""The iDDS steering file contract (DESIGN.md §3.3): read ``%IN``, write ``%OUT``.

``%IN`` is ``{"points": [[{hp}, loss_or_null], ...], "opt_space": {...}}``; segmented HPO uses
``[[model_id, {hp}], loss]`` points and an ``opt_space`` list of ``{"model_id", "search_space"}``.
hepopt accepts one optional third element per point, its state (``"failed"``, ``"pruned"``, …), so a
failed point can be marked without inventing a loss; without it a number means done and null pending.
``%OUT`` is a JSON list of new points, written atomically so iDDS never reads half a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hepopt.errors import SpecError
from hepopt.files import write_json_atomically
from hepopt.space import SearchSpace
from steering_container.api import STATES, Observation


@dataclass(frozen=True)
class Segment:
    """One independent search: the whole task, or one model of a segmented task."""

    model_id: Any
    space: SearchSpace
    history: list[Observation]


@dataclass(frozen=True)
class SteeringInput:
    segments: list[Segment]
    segmented: bool


def parse_input(doc: Any) -> SteeringInput:
    """Validate a decoded ``%IN`` document; SpecError names the offending key or point."""
    if not isinstance(doc, dict):
        raise SpecError([("", f"expected a JSON object with 'points' and 'opt_space', got {type(doc).__name__}")])
    missing = [k for k in ("points", "opt_space") if k not in doc]
    if missing:
        raise SpecError([("", f"missing key(s) {missing}")])
    points, space = doc["points"], doc["opt_space"]
    if not isinstance(points, list):
        raise SpecError([("points", f"expected a list, got {type(points).__name__}")])
    if isinstance(space, list):
        return SteeringInput(_segments(points, space), segmented=True)
    parsed = SearchSpace.parse(space, "opt_space")
    history = [_observation(entry, f"points[{i}]", parsed, segmented=False)[1] for i, entry in enumerate(points)]
    return SteeringInput([Segment(None, parsed, history)], segmented=False)


def _segments(points: list[Any], specs: list[Any]) -> list[Segment]:
    spaces: dict[Any, SearchSpace] = {}
    for i, spec in enumerate(specs):
        where = f"opt_space[{i}]"
        if not isinstance(spec, dict) or "model_id" not in spec or "search_space" not in spec:
            raise SpecError([(where, "expected {\"model_id\": ..., \"search_space\": {...}}")])
        model_id = spec["model_id"]
        if not isinstance(model_id, (int, str)) or isinstance(model_id, bool):
            raise SpecError([(f"{where}.model_id", f"expected an integer or string, got {model_id!r}")])
        if model_id in spaces:
            raise SpecError([(f"{where}.model_id", f"model_id {model_id!r} appears twice")])
        spaces[model_id] = SearchSpace.parse(spec["search_space"], f"{where}.search_space")
    histories: dict[Any, list[Observation]] = {m: [] for m in spaces}
    for i, entry in enumerate(points):
        model_id, obs = _observation(entry, f"points[{i}]", spaces, segmented=True)
        histories[model_id].append(obs)
    return [Segment(m, spaces[m], histories[m]) for m in spaces]


def _observation(entry: Any, where: str, spaces: Any, segmented: bool) -> tuple[Any, Observation]:
    if not isinstance(entry, list) or len(entry) not in (2, 3):
        shape = "[[model_id, {hp}], loss]" if segmented else "[{hp}, loss]"
        raise SpecError([(where, f"expected {shape} (optionally with a state third), got {entry!r:.80}")])
    params, loss = entry[0], entry[1]
    model_id, space = None, spaces
    if segmented:
        if not isinstance(params, list) or len(params) != 2:
            raise SpecError([(f"{where}[0]", "expected [model_id, {hp}] in a segmented task")])
        model_id, params = params
        if model_id not in spaces:
            raise SpecError([(f"{where}[0][0]", f"model_id {model_id!r} is not in opt_space")])
        space = spaces[model_id]
    space.check_point(params, f"{where}[0]")
    state = _state(entry, loss, where)
    return model_id, Observation(params, None if loss is None else float(loss), state)


def _state(entry: list[Any], loss: Any, where: str) -> str:
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise SpecError([(f"{where}[1]", f"loss must be a number or null, got {loss!r}")])
    if len(entry) == 3:
        state = entry[2]
        if state not in STATES:
            raise SpecError([(f"{where}[2]", f"state must be one of {list(STATES)}, got {state!r}")])
        return state
    if loss is None:
        return "pending"
    return "done" if math.isfinite(loss) else "failed"


def budget(max_points: int, n_points: int, n_existing: int) -> int:
    """How many points may be written: ``min(N, M - len(points))``, never negative."""
    return max(0, min(n_points, max_points - n_existing))


def format_output(results: list[tuple[Any, list[dict[str, Any]]]], segmented: bool) -> list[Any]:
    if segmented:
        return [[model_id, point] for model_id, points in results for point in points]
    return [point for _, points in results for point in points]


def write_json_atomic(path: Path, data: Any) -> None:
    """The %OUT / %IN file, written atomically (iDDS treats a half file as a failure)."""
    write_json_atomically(path, data)
