import pytest

from hepopt.errors import SpecError
from hepopt.space import SearchSpace
from steering_container.api import Observation, propose

FINITE = SearchSpace.parse({
    "a": {"method": "categorical", "dimension": {"categories": ["x", "y", "z"]}},
    "b": {"method": "uniformint", "dimension": {"low": 0, "high": 1}},
})
MIXED = SearchSpace.parse({
    "lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}},
    "bin_size": {"method": "categorical", "dimension": {"categories": [8, 16, 32, 64, 128]}},
    "v": {"type": "Array", "params": {"shape": [2]}, "bounds": [0, 1]},
})


def keys(points):
    return {tuple(sorted((k, str(v)) for k, v in p.items())) for p in points}


@pytest.mark.parametrize("method", ["random", "grid"])
def test_finite_space_yields_exactly_the_points_not_yet_known(method):
    history = [Observation({"a": "x", "b": 0}, 1.0), Observation({"a": "x", "b": 1}, None, "pending"),
               Observation({"a": "y", "b": 0}, None, "failed"), Observation({"a": "y", "b": 1}, 0.0)]
    points = propose(FINITE, history, 10, method, seed=1)
    assert keys(points) == keys([{"a": "z", "b": 0}, {"a": "z", "b": 1}])
    assert len(points) == 2


def test_grid_walks_the_grid_in_order():
    assert propose(FINITE, [], 3, "grid") == [{"a": "x", "b": 0}, {"a": "x", "b": 1}, {"a": "y", "b": 0}]


def test_grid_refuses_continuous_dimensions_by_name():
    with pytest.raises(SpecError, match=r"lr.*continuous"):
        propose(MIXED, [], 2, "grid")


def test_same_input_and_seed_give_the_same_points_and_a_longer_history_new_ones():
    first = propose(MIXED, [], 5, "random", seed=7)
    assert first == propose(MIXED, [], 5, "random", seed=7)
    history = [Observation(p, 1.0) for p in first]
    second = propose(MIXED, history, 5, "random", seed=7)
    assert not keys(first) & keys(second)


def test_unknown_method_and_bad_history_are_refused():
    with pytest.raises(SpecError, match="unknown method 'bayes'"):
        propose(MIXED, [], 1, "bayes")
    with pytest.raises(SpecError, match=r"points\[0\]"):
        propose(FINITE, [Observation({"a": "w", "b": 0}, 1.0)], 1, "random")
    with pytest.raises(SpecError, match=r"points\[0\]: unknown state"):
        propose(FINITE, [Observation({"a": "x", "b": 0}, 1.0, "lost")], 1, "random")
    with pytest.raises(SpecError, match=r"points\[0\]: loss must be a number"):
        propose(FINITE, [Observation({"a": "x", "b": 0}, "low")], 1, "random")


def test_zero_points_asked_gives_none():
    assert propose(MIXED, [], 0, "random", seed=1) == []
