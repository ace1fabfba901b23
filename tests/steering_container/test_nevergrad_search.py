"""The nevergrad steering methods: valid new points, determinism, history handling, evidence of search."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from hepopt.errors import SpecError
from hepopt.space import SearchSpace
from steering_container.api import Observation, make_problem, propose
from steering_container.methods import get_method, nevergrad_search
from steering_container.methods.nevergrad_search import (
    REPLAY_ELITES,
    REPLAY_LIMIT,
    Encoding,
    check_optimizer_name,
    propose_nevergrad,
    replay_plan,
)

OPTIMIZERS = ("NGOpt", "CMA", "TwoPointsDE", "DiscreteOnePlusOne", "OnePlusOne")
#: Standard-normal redraws of every coordinate, and how far each tenth of a range may be from 10 % of them
#: (five standard deviations of a binomial share at this count).
REDRAWS = 4000
#: How many times more often than a random point a (1+1)'s proposals must fall near the best point.
NEAR_BEST_FACTOR = 2.5
UNIFORM_TOLERANCE = 0.025

MIXED = SearchSpace.parse({
    "lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}},
    "layers": {"method": "uniformint", "dimension": {"low": 0, "high": 4}},
    "heads": {"type": "Scalar", "bounds": [1, 16], "integer": True},
    "dropout": {"method": "uniform", "dimension": {"low": 0.0, "high": 0.5}},
    "batch": {"method": "qloguniform", "dimension": {"low": 8, "high": 512, "q": 8}},
    "momentum": {"method": "quniform", "dimension": {"low": 0.5, "high": 0.99, "q": 0.01}},
    "act": {"method": "categorical", "dimension": {"categories": ["relu", "elu", True, None]}},
    "bins": {"type": "TransitionChoice", "params": {"choices": [8, 16, 32, 64]}},
    "shift": {"method": "normal", "dimension": {"mu": 0.0, "sigma": 2.0}},
    "scale": {"method": "lognormal", "dimension": {"mu": 0.0, "sigma": 1.0}},
    "w": {"type": "Array", "params": {"shape": [3]}, "bounds": [-1, 1]},
    "epochs": {"method": "fixed", "dimension": {"value": 10}},
    "only": {"method": "categorical", "dimension": {"categories": ["adam"]}},
})


def mixed_history(size: int = 24, seed: int = 0) -> list[Observation]:
    rng = random.Random(seed)
    states = ["done"] * (size - 4) + ["pending", "pending", "failed", "pruned"]
    out = []
    for state in states:
        point = MIXED.sample(rng)
        loss = abs(math.log10(point["lr"]) + 3) + point["dropout"] if state in ("done", "pruned") else None
        out.append(Observation(point, loss, state))
    return out


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_proposes_n_distinct_valid_new_points_on_a_mixed_space(optimizer):
    history = mixed_history()
    problem = make_problem(MIXED, history, seed=3)
    known = set(problem.seen)
    flats = propose_nevergrad(optimizer, problem, 8)  # the method itself, without propose()'s random top-up
    assert len(flats) == 8
    keys = {MIXED.key(f) for f in flats}
    assert len(keys) == 8 and not keys & known
    for flat in flats:
        point = MIXED.assemble(flat)
        assert MIXED.check_point(point, "proposal") == flat
        assert point["epochs"] == 10 and point["only"] == "adam" and len(point["w"]) == 3


def test_every_point_of_a_tiny_space_is_proposed_once():
    space = SearchSpace.parse({
        "act": {"method": "categorical", "dimension": {"categories": ["relu", "elu", "tanh"]}},
        "deep": {"method": "uniformint", "dimension": {"low": 0, "high": 1}},
    })
    grid = list(space.iter_grid())
    history = [Observation(grid[0], 0.5), Observation(grid[1], None, "pending"),
               Observation(grid[2], None, "failed"), Observation(grid[3], 0.0)]
    remaining = {space.key(p) for p in grid[4:]}
    for optimizer in OPTIMIZERS:
        # a (1+1) whose mutations keep landing on known points may find nothing new in one call: a few seeds
        own = [f for seed in range(4) for f in propose_nevergrad(optimizer, make_problem(space, history, seed), 5)]
        assert own and {space.key(f) for f in own} <= remaining
        points = propose(space, history, 5, f"nevergrad:{optimizer}", seed=1)
        assert {space.key(space.flatten(p)) for p in points} == remaining


@pytest.mark.parametrize("optimizer", ["Cobyla", "DiscreteDoerrOnePlusOne"])
def test_sequential_only_optimizers_still_give_a_full_batch(optimizer):
    problem = make_problem(MIXED, mixed_history(), seed=2)
    assert len(propose_nevergrad(optimizer, problem, 4)) == 4


def test_a_log_value_of_zero_in_the_history_is_accepted():
    space = SearchSpace.parse({"k": {"method": "qlognormal", "dimension": {"mu": 0, "sigma": 1, "q": 1}}})
    history = [Observation({"k": 0}, 1.0), Observation({"k": 2}, 0.5)]
    assert len(propose(space, history, 3, "nevergrad:NGOpt", seed=0)) == 3


def test_optimizers_that_cannot_run_statelessly_are_spec_errors(monkeypatch):
    monkeypatch.setattr(nevergrad_search, "ASK_TIMEOUT_S", 0.5)
    problem = make_problem(MIXED, mixed_history(), seed=2)
    for optimizer, why in (("EDA", "cannot learn from points it did not propose"), ("Carola1", "more than 0.5 s")):
        with pytest.raises(SpecError, match=why) as caught:
            propose_nevergrad(optimizer, problem, 3)
        assert caught.value.problems[0][0] == "method" and optimizer in str(caught.value)


def test_same_seed_same_points_and_other_seed_other_points():
    history = mixed_history()
    first = propose(MIXED, history, 5, "nevergrad:NGOpt", seed=7)
    assert propose(MIXED, history, 5, "nevergrad:NGOpt", seed=7) == first
    assert propose(MIXED, history, 5, "nevergrad:NGOpt", seed=8) != first


def test_unknown_optimizer_is_a_spec_error_naming_it_and_close_names():
    with pytest.raises(SpecError) as caught:
        get_method("nevergrad:NGOPt")
    message = str(caught.value)
    assert "'NGOPt'" in message and "NGOpt" in message.replace("'NGOPt'", "")
    assert caught.value.problems[0][0] == "method"
    check_optimizer_name("TwoPointsDE")  # a known name passes


def test_a_zero_loss_is_told_as_a_real_loss_and_failed_points_get_the_worst():
    space = SearchSpace.parse({"x": {"method": "uniform", "dimension": {"low": 0, "high": 1}}})
    history = [Observation({"x": 0.1}, 0.0), Observation({"x": 0.5}, 2.0), Observation({"x": 0.7}, None, "failed"),
               Observation({"x": 0.9}, None, "pending")]
    told = replay_plan(make_problem(space, history, seed=0))
    assert [(flat["x"], loss) for flat, loss in told] == [(0.1, 0.0), (0.5, 2.0), (0.7, 2.0), (0.9, 2.0)]


def test_nothing_but_completed_points_is_told_before_any_completes():
    space = SearchSpace.parse({"x": {"method": "uniform", "dimension": {"low": 0, "high": 1}}})
    history = [Observation({"x": 0.7}, None, "failed"), Observation({"x": 0.9}, None, "pending")]
    assert replay_plan(make_problem(space, history, seed=0)) == []
    assert len(propose(space, history, 3, "nevergrad:NGOpt", seed=0)) == 3


def test_long_histories_replay_the_best_and_the_most_recent_points_in_order():
    space = SearchSpace.parse({"x": {"method": "uniform", "dimension": {"low": 0, "high": 1}}})
    size = REPLAY_LIMIT * 3 + 1
    loss = [float(i * 37 % size) for i in range(size)]  # a shuffle of 0..size-1
    history = [Observation({"x": i / size}, loss[i]) for i in range(size)]
    told = [round(flat["x"] * size) for flat, _ in replay_plan(make_problem(space, history, seed=0))]
    best = sorted(range(size), key=loss.__getitem__)[:REPLAY_ELITES]
    recent = list(range(size - (REPLAY_LIMIT - REPLAY_ELITES), size))
    assert told == sorted(set(best) | set(recent))


def test_encoding_round_trips_points_through_standardized_data():
    encoding = Encoding(MIXED)
    parametrization = encoding.parametrization(seed=0)
    flats = [MIXED.flatten(MIXED.sample(random.Random(i))) for i in range(20)]
    for flat, row in zip(flats, encoding.standardize(flats), strict=True):
        back = encoding.decode(parametrization.spawn_child().set_standardized_data(row).value)
        assert back.keys() == flat.keys()
        for name, value in flat.items():
            assert back[name] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), name


def test_one_plus_one_searches_around_the_best_observed_point():
    space = SearchSpace.parse({name: {"method": "uniform", "dimension": {"low": 0, "high": 1}} for name in "xy"})
    target = {"x": 0.8, "y": 0.2}
    radius = 0.15  # a random point falls this close with probability pi * 0.15**2, about 7 %
    by_chance = math.pi * radius**2
    near, total = 0, 0
    for seed in range(4):
        rng = random.Random(seed)
        history = [Observation({"x": rng.random() * 0.5, "y": 0.5 + rng.random() * 0.5}, 1.0) for _ in range(30)]
        history.insert(rng.randrange(30), Observation(target, 0.0))
        for point in propose(space, history, 10, "nevergrad:OnePlusOne", seed=seed):
            near += math.dist((point["x"], point["y"]), (target["x"], target["y"])) < radius
            total += 1
    # measured 25 % (43 % before bounded sigma went from range / 6 to range / 2, see SIGMAS_PER_RANGE)
    assert near / total > NEAR_BEST_FACTOR * by_chance


def test_bounded_dimensions_are_sampled_over_their_whole_range():
    """Optimisers that start from samples (DE's first population) must reach the bounds as random search does."""
    space = SearchSpace.parse({
        "lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 1e-1}},
        "dropout": {"method": "uniform", "dimension": {"low": 0.0, "high": 0.5}},
        "layers": {"method": "uniformint", "dimension": {"low": 0, "high": 5}},
    })
    encoding = Encoding(space)
    parametrization = encoding.parametrization(seed=0)
    draws = [encoding.decode(parametrization.sample().value) for _ in range(600)]
    # uniform sampling puts a third of the draws in the outer sixths; sampling around the middle with the
    # mutation sigma (range / 6) would put about 5 % there
    assert sum(d["lr"] < 1e-5 or d["lr"] > 1e-2 for d in draws) / len(draws) > 0.25
    assert sum(not 1 / 12 <= d["dropout"] <= 5 / 12 for d in draws) / len(draws) > 0.25
    assert {d["layers"] for d in draws} == set(range(6))


def test_a_mutation_redrawing_a_coordinate_reaches_the_whole_range_uniformly():
    """The (1+1) family's discrete mutations (NGOpt's choice on spaces with a categorical) redraw a coordinate
    from N(0, 1) in standardized units: it must land anywhere in a bounded range, as often near a bound as in
    the middle, or the optimiser cannot reach optima at the edges."""
    space = SearchSpace.parse({
        "lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 1e-1}},
        "dropout": {"method": "uniform", "dimension": {"low": 0.0, "high": 0.5}},
        "layers": {"method": "uniformint", "dimension": {"low": 0, "high": 4}},
        "act": {"method": "categorical", "dimension": {"categories": ["relu", "elu", "tanh"]}},
    })
    encoding = Encoding(space)
    parametrization = encoding.parametrization(seed=0)
    rows = np.random.default_rng(0).normal(size=(REDRAWS, parametrization.dimension))
    draws = [encoding.decode(parametrization.spawn_child().set_standardized_data(row).value) for row in rows]
    deciles = {
        "lr": np.histogram(np.log10([d["lr"] for d in draws]), bins=10, range=(-6, -1))[0],
        "dropout": np.histogram([d["dropout"] for d in draws], bins=10, range=(0, 0.5))[0],
        "layers": np.bincount([d["layers"] for d in draws], minlength=5) / 2,  # five values: two tenths each
    }
    for name, counts in deciles.items():
        # uniform: 10 % per tenth of the range; sigma = range / 6 would put about 1 % in the outer tenths
        assert np.all(np.abs(counts / REDRAWS - 0.1) < UNIFORM_TOLERANCE), (name, counts)


def replayed_learner(optimizer, size):
    """The optimiser nevergrad_search tells (NGOpt's choice) after the replay of ``size`` done points, the
    losses told, and a function telling whether a candidate is one of the replayed points."""
    space = SearchSpace.parse({f"x{i}": {"method": "uniform", "dimension": {"low": 0, "high": 1}} for i in range(4)})
    rng = random.Random(0)
    history = [Observation(p, sum(p.values())) for p in (space.sample(rng) for _ in range(size))]
    encoding = Encoding(space)
    parametrization = encoding.parametrization(seed=0)
    _, learner, _ = nevergrad_search._make_optimizer(optimizer, parametrization, size + 2, 1)
    plan = replay_plan(make_problem(space, history, seed=0))
    for row, (_, loss) in zip(encoding.standardize([flat for flat, _ in plan]), plan, strict=True):
        learner.tell(nevergrad_search._replayed(learner, parametrization, row), loss)

    def in_history(candidate):
        point = encoding.decode(candidate.value)
        return any(all(math.isclose(point[k], flat[k], rel_tol=1e-9) for k in flat) for flat, _ in plan)

    return learner, [loss for _, loss in plan], in_history


def test_differential_evolution_keeps_the_best_replayed_points_as_its_population():
    learner, losses, in_history = replayed_learner("TwoPointsDE", 45)
    population = list(learner.population.values())
    assert len(population) == learner.llambda == 30 and all(in_history(c) for c in population)
    assert sorted(c.loss for c in population) == sorted(losses)[:30]


def test_one_plus_one_mutates_the_best_replayed_point():
    learner, losses, in_history = replayed_learner("DiscreteLenglerOnePlusOne", 20)
    best = learner.current_bests["pessimistic"].parameter
    assert in_history(best) and best.loss == min(losses)


def test_cma_updates_its_distribution_from_the_history():
    learner, _, _ = replayed_learner("CMA", 24)
    assert learner.es.countevals == 24 - 24 % learner.es.popsize
