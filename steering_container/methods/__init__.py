"""The point-generation methods, by name.

A method is a callable ``(problem, n) -> list[flat point]`` returning at most ``n`` points, each
claimed with ``problem.claim`` (so new and distinct). It may return fewer; ``propose`` tops up with
random points. Heavy libraries are imported only when their method is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hepopt.errors import SpecError
from steering_container.api import Problem

Method = Callable[[Problem, int], list[dict[str, Any]]]
METHODS = ("random", "grid", "tpe", "anneal", "nevergrad:<Optimizer>")


def get_method(name: str) -> Method:
    """The method called ``name``; SpecError naming the choices when it does not exist."""
    if name == "random":
        from steering_container.methods.random_search import propose_random
        return propose_random
    if name == "grid":
        from steering_container.methods.grid_search import propose_grid
        return propose_grid
    if name in ("tpe", "anneal"):
        from steering_container.methods.hyperopt_search import hyperopt_method
        return hyperopt_method(name)
    if name.startswith("nevergrad:"):
        from steering_container.methods.nevergrad_search import nevergrad_method
        return nevergrad_method(name.split(":", 1)[1])
    raise SpecError([("method", f"unknown method {name!r}; known: {', '.join(METHODS)}")])
