import random

import pytest

from hepopt.errors import SpecError
from hepopt.space import SearchSpace

HPOGRID = {
    "lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}},
    "layers": {"method": "uniformint", "dimension": {"low": 0, "high": 4}},
    "dropout": {"method": "uniform", "dimension": {"low": 0.0, "high": 0.5}},
    "bin_size": {"method": "categorical", "dimension": {"categories": [8, 16, 32, 64, 128]}},
    "step": {"method": "quniform", "dimension": {"low": 0, "high": 10, "q": 2.5}},
    "width": {"method": "qloguniform", "dimension": {"low": 1, "high": 100, "q": 1}},
    "mom": {"method": "normal", "dimension": {"mu": 0.9, "sigma": 0.01}},
    "scale": {"method": "qnormal", "dimension": {"mu": 5, "sigma": 2, "q": 1}},
    "eps": {"method": "lognormal", "dimension": {"mu": -3, "sigma": 1}},
    "epsq": {"method": "qlognormal", "dimension": {"mu": 2, "sigma": 0.5, "q": 0.5}},
    "opt": {"method": "fixed", "dimension": {"value": "adam"}},
}
NEVERGRAD = {
    "A": {"type": "Choice", "params": {"choices": [1, 4]}},
    "B": {"type": "Scalar", "bounds": [0, 5]},
    "C": {"type": "TransitionChoice", "params": {"choices": ["a", "b", "c"]}},
    "D": {"type": "Log", "params": {"lower": 1e-4, "upper": 1.0}},
    "E": {"type": "Array", "params": {"shape": [3]}, "bounds": [-1, 1]},
    "F": {"type": "Scalar", "bounds": [1, 8], "integer": True},
}


@pytest.mark.parametrize("spec", [HPOGRID, NEVERGRAD], ids=["hpogrid", "nevergrad"])
def test_samples_are_valid_points_of_their_space(spec):
    space = SearchSpace.parse(spec)
    rng = random.Random(0)
    for _ in range(200):
        point = space.sample(rng)
        space.check_point(point, "p")  # raises on any invalid value
    assert set(point) == set(spec)


def test_both_dialects_normalise_to_the_same_internal_form():
    hpogrid = SearchSpace.parse({"A": {"method": "categorical", "dimension": {"categories": [1, 4]}},
                                 "B": {"method": "uniform", "dimension": {"low": 0, "high": 5}}})
    nevergrad = SearchSpace.parse({"A": {"type": "Choice", "params": {"choices": [1, 4]}},
                                   "B": {"type": "Scalar", "bounds": [0, 5]}})
    assert hpogrid.dimensions == nevergrad.dimensions


def test_to_dict_round_trips():
    for spec in (HPOGRID, NEVERGRAD):
        space = SearchSpace.parse(spec)
        assert SearchSpace.parse(space.to_dict()).dimensions == space.dimensions


def test_integer_kinds_give_ints_and_quantised_kinds_stay_on_their_grid():
    space = SearchSpace.parse(HPOGRID)
    rng = random.Random(1)
    for _ in range(200):
        p = space.sample(rng)
        assert isinstance(p["layers"], int) and 0 <= p["layers"] <= 4
        assert p["step"] in (0, 2.5, 5.0, 7.5, 10.0)
        assert isinstance(p["width"], int) and 1 <= p["width"] <= 100
        assert p["opt"] == "adam"


def test_array_is_assembled_into_a_list_and_flattened_back():
    space = SearchSpace.parse(NEVERGRAD)
    point = space.sample(random.Random(2))
    assert isinstance(point["E"], list) and len(point["E"]) == 3
    flat = space.flatten(point)
    assert flat["E[1]"] == point["E"][1]
    assert space.assemble(flat) == point


def test_grid_enumerates_finite_spaces_and_refuses_continuous_ones():
    space = SearchSpace.parse({"a": {"method": "categorical", "dimension": {"categories": ["x", "y"]}},
                               "b": {"method": "uniformint", "dimension": {"low": 1, "high": 3}}})
    assert space.grid_size() == 6
    assert next(space.iter_grid()) == {"a": "x", "b": 1}
    continuous = SearchSpace.parse({"lr": HPOGRID["lr"]})
    with pytest.raises(SpecError, match=r"lr.*continuous"):
        continuous.dimensions[0].grid_values()


@pytest.mark.parametrize("spec, expected", [
    ({}, "empty"),
    ([1, 2], "JSON object"),
    ({"x": {"method": "gaussian", "dimension": {}}}, r"x\.method: unknown method 'gaussian'"),
    ({"x": {"method": "uniform", "dimension": {"low": 5, "high": 1}}}, "low must be < high"),
    ({"x": {"method": "uniform", "dimension": {"low": 1, "high": 1}}}, "low must be < high"),
    ({"x": {"method": "loguniform", "dimension": {"low": 0, "high": 1}}}, "positive"),
    ({"x": {"method": "loguniform", "dimension": {"low": -1, "high": 1}}}, "positive"),
    ({"x": {"method": "categorical", "dimension": {"categories": []}}}, "non-empty"),
    ({"x": {"method": "categorical", "dimension": {"categories": [1, 1]}}}, "twice"),
    ({"x": {"method": "uniform", "dimension": {"low": "0", "high": 1}}}, r"x\.dimension\.low: expected a finite"),
    ({"x": {"method": "uniform", "dimension": {"low": 0}}}, "needs"),
    ({"x": {"method": "quniform", "dimension": {"low": 0, "high": 1, "q": 0}}}, "q must be positive"),
    ({"x": {"method": "normal", "dimension": {"mu": 0, "sigma": -1}}}, "sigma must be positive"),
    ({"x": {"type": "Choice", "params": {"choices": []}}}, "non-empty"),
    ({"x": {"type": "Gaussian"}}, r"x\.type: unknown type"),
    ({"x": {"type": "Log", "bounds": [0, 1]}}, "positive"),
    ({"x": {"type": "Array", "params": {"shape": [0]}, "bounds": [0, 1]}}, "shape"),
    ({"x": 3}, "expected an object"),
])
def test_bad_spaces_are_refused_with_the_key_named(spec, expected):
    with pytest.raises(SpecError, match=expected):
        SearchSpace.parse(spec)


def test_every_bad_dimension_is_reported_at_once():
    with pytest.raises(SpecError) as exc:
        SearchSpace.parse({"a": {"method": "nope"}, "b": {"method": "uniform", "dimension": {"low": 2, "high": 1}}})
    assert [loc for loc, _ in exc.value.problems] == ["searchSpace.a.method", "searchSpace.b.dimension"]


def test_check_point_names_the_bad_value():
    space = SearchSpace.parse(HPOGRID)
    point = space.sample(random.Random(3))
    with pytest.raises(SpecError, match=r"points\[2\]\.bin_size: 7 is not one of"):
        space.check_point({**point, "bin_size": 7}, "points[2]")
    with pytest.raises(SpecError, match="missing"):
        space.check_point({k: v for k, v in point.items() if k != "lr"}, "p")
    with pytest.raises(SpecError, match="unknown"):
        space.check_point({**point, "typo": 1}, "p")
    with pytest.raises(SpecError, match="outside"):
        space.check_point({**point, "dropout": 0.9}, "p")
    with pytest.raises(SpecError, match="not an integer"):
        space.check_point({**point, "layers": 1.5}, "p")


def test_bool_and_int_categories_are_not_confused():
    space = SearchSpace.parse({"flag": {"method": "categorical", "dimension": {"categories": [True, False]}}})
    with pytest.raises(SpecError):
        space.check_point({"flag": 1}, "p")
    space.check_point({"flag": True}, "p")


def test_bool_and_int_categories_have_distinct_keys():
    space = SearchSpace.parse({"c": {"method": "categorical", "dimension": {"categories": [1, True]}}})
    assert space.key({"c": 1}) != space.key({"c": True})
