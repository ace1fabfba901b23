"""Random search: independent draws from the prior of each dimension."""

from __future__ import annotations

from typing import Any

from steering_container.api import Problem, fill_at_random


def propose_random(problem: Problem, n: int) -> list[dict[str, Any]]:
    return fill_at_random(problem, n, salt="random")
