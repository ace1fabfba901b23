"""The steering-quality verdict: which methods decide PASS/FAIL, and that the others are still named."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

#: benchmarks/ is not an installed package: import it from the repository, whatever pytest's cwd.
REPOSITORY = Path(__file__).resolve().parents[2]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))
sq = importlib.import_module("benchmarks.steering_quality")

SEEDS = 20
RANDOM_MEDIAN = 441.4


def row(method: str, median: float | None, win_rate: float | None = 0.5, seeds_ok: int = SEEDS,
        budget: int = sq.CHECK_BUDGET) -> sq.Row:
    return sq.Row("mlpf", method, budget, median, median, median, win_rate, seeds_ok, SEEDS)


def baseline(budget: int = sq.CHECK_BUDGET) -> sq.Row:
    return row(sq.BASELINE, RANDOM_MEDIAN, None, budget=budget)


def test_the_model_based_methods_are_the_documented_ones():
    assert {"tpe", "nevergrad:CMA", "nevergrad:NGOpt"} == sq.MODEL_BASED_METHODS
    assert set(sq.DEFAULT_METHODS) >= sq.MODEL_BASED_METHODS
    assert sq.BASELINE not in sq.MODEL_BASED_METHODS


def test_passes_when_every_model_based_method_beats_random_and_names_the_unchecked_ones():
    rows = [baseline(), row("tpe", 437.3), row("nevergrad:NGOpt", 439.0), row("nevergrad:TwoPointsDE", 442.0, 0.45),
            row("anneal", 437.7, 0.8)]
    passed, line = sq.verdict(rows, "mlpf")
    assert passed is True
    assert line.startswith("PASS mlpf")
    unchecked = line.split("not model-based, not checked:")[1]
    assert "nevergrad:TwoPointsDE 442 (+0.6 vs random, wins 45%)" in unchecked
    assert "anneal" in unchecked and "tpe" not in unchecked


def test_fails_when_a_model_based_method_is_behind_random():
    rows = [baseline(), row("tpe", 437.3), row("nevergrad:NGOpt", 444.97, 0.1)]
    passed, line = sq.verdict(rows, "mlpf")
    assert passed is False
    assert "behind or equal: nevergrad:NGOpt 444.97 (+3.57 vs random, wins 10%)" in line


def test_a_tie_or_failed_seeds_count_as_not_beating_random():
    assert sq.verdict([baseline(), row("tpe", RANDOM_MEDIAN)], "mlpf")[0] is False
    passed, line = sq.verdict([baseline(), row("nevergrad:CMA", 430.0, seeds_ok=SEEDS - 1)], "mlpf")
    assert passed is False
    assert "failed on 1 seeds" in line


def test_a_non_model_based_method_behind_random_does_not_fail_the_check():
    passed, line = sq.verdict([baseline(), row("tpe", 437.3), row("nevergrad:TwoPointsDE", 450.0, 0.0)], "mlpf")
    assert passed is True
    assert "nevergrad:TwoPointsDE 450 (+8.6 vs random, wins 0%)" in line


def test_not_checked_without_a_model_based_method_or_without_the_check_budget():
    passed, line = sq.verdict([baseline(), row("anneal", 437.7)], "mlpf")
    assert passed is None
    assert line.startswith("NOT CHECKED mlpf: no model-based method") and "anneal 437.7" in line
    passed, line = sq.verdict([baseline(budget=25), row("tpe", 437.3, budget=25)], "mlpf")
    assert passed is None
    assert f"{sq.CHECK_BUDGET} is not among --budgets" in line
