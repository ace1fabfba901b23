"""Grid search: the points of a finite space in a fixed order, skipping every known point.

Continuous dimensions have no grid; the space is refused with the name of the offending dimension
(``Dimension.grid_values`` says which kinds to use instead).
"""

from __future__ import annotations

from typing import Any

from steering_container.api import Problem


def propose_grid(problem: Problem, n: int) -> list[dict[str, Any]]:
    for dim in problem.space.dimensions:
        dim.grid_values()  # raises SpecError naming a continuous dimension
    out: list[dict[str, Any]] = []
    for flat in problem.space.iter_grid():
        if len(out) == n:
            break
        if problem.claim(flat):
            out.append(flat)
    return out
