import json

import pytest

from hepopt.errors import SpecError
from hepopt.task import DEFAULT_QUANTILE, MAX_POINTS_LIMIT, STOPPING_POLICIES, load_task, parse_task

SPACE = {"lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}}}
MINIMAL = {"evaluationExec": "python train.py", "searchSpace": SPACE}


def test_defaults_follow_phpo():
    task = parse_task(MINIMAL)
    assert task.evaluationInput == "input.json"
    assert task.evaluationOutput == "output.json"
    assert task.evaluationTrainingData == "input_ds.json"
    assert task.checkPointInterval == 5
    assert task.maxPoints == 10 and task.evaluation_jobs_limit == 20
    assert task.nParallelEvaluation == 1 and task.nPointsPerIteration == 2 and task.minUnevaluatedPoints == 0
    assert task.hepopt.maxAttempts == 3 and task.hepopt.direction == "minimize"
    assert task.hepopt.failedLoss is None


@pytest.mark.parametrize("change, location", [
    ({"maxPoints": 0}, "maxPoints"),
    ({"maxPoints": "10"}, "maxPoints"),
    ({"maxPoints": 10.5}, "maxPoints"),
    ({"maxPoints": MAX_POINTS_LIMIT + 1}, "maxPoints"),
    ({"nParallelEvaluation": True}, "nParallelEvaluation"),
    ({"evaluationExec": ""}, "evaluationExec"),
    ({"evaluationExc": "typo"}, "evaluationExc"),
    ({"hepopt": {"method": "bayes"}}, "hepopt"),
    ({"hepopt": {"direction": "up"}}, "hepopt.direction"),
    ({"hepopt": {"seed": "1"}}, "hepopt.seed"),
    ({"hepopt": {"earlyStopping": {"policy": "magic"}}}, "hepopt.earlyStopping.policy"),
    ({"searchSpace": {}}, "searchSpace"),
    ({"searchSpace": {"lr": {"method": "uniform", "dimension": {"low": 1, "high": 0}}}}, "searchSpace.lr.dimension"),
])
def test_bad_tasks_are_refused_naming_the_key(change, location):
    with pytest.raises(SpecError) as exc:
        parse_task({**MINIMAL, **change})
    assert location in [loc for loc, _ in exc.value.problems], exc.value.problems


def test_search_space_must_be_given_exactly_once():
    with pytest.raises(SpecError, match="exactly one"):
        parse_task({"evaluationExec": "x"})
    with pytest.raises(SpecError, match="exactly one"):
        parse_task({**MINIMAL, "searchSpaceFile": "space.json"})


def test_search_space_file_is_read_relative_to_the_task(tmp_path):
    (tmp_path / "space.json").write_text(json.dumps(SPACE))
    (tmp_path / "task.json").write_text(json.dumps({"evaluationExec": "x", "searchSpaceFile": "space.json"}))
    task = load_task(tmp_path / "task.json")
    assert task.space.names == ("lr",)


@pytest.mark.parametrize("text, expected", [
    ("", "empty"),
    ('{"evaluationExec": "x", ', "invalid JSON at line 1"),
    ("[1, 2]", "a task is a JSON object"),
])
def test_bad_files_name_the_file_and_line(tmp_path, text, expected):
    path = tmp_path / "task.json"
    path.write_text(text)
    with pytest.raises(SpecError, match=expected) as exc:
        load_task(path)
    assert str(path) in str(exc.value)


def test_missing_file_and_missing_space_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_task(tmp_path / "nope.json")
    (tmp_path / "task.json").write_text(json.dumps({"evaluationExec": "x", "searchSpaceFile": "gone.json"}))
    with pytest.raises(SpecError, match=r"gone\.json.*not found"):
        load_task(tmp_path / "task.json")


def test_phpo_export_drops_only_the_hepopt_block():
    task = parse_task({**MINIMAL, "maxPoints": 4, "hepopt": {"method": "random", "seed": 3}})
    phpo = task.to_phpo()
    assert "hepopt" not in phpo
    assert phpo["maxPoints"] == 4 and phpo["searchSpace"] == SPACE
    assert parse_task(task.to_json()) == task


def stopping(**block):
    return {**MINIMAL, "hepopt": {"earlyStopping": block}}


@pytest.mark.parametrize("block, location, message", [
    ({"policy": "asha", "gracePeriod": 0}, "hepopt.earlyStopping.gracePeriod", "greater than or equal to 1"),
    ({"policy": "asha", "gracePeriod": "1"}, "hepopt.earlyStopping.gracePeriod", "integer"),
    ({"policy": "asha", "reductionFactor": 1}, "hepopt.earlyStopping.reductionFactor", "greater than or equal to 2"),
    ({"policy": "asha", "reductionFactor": 2.5}, "hepopt.earlyStopping.reductionFactor", "integer"),
    ({"policy": "asha", "maxResource": 1}, "hepopt.earlyStopping.maxResource", "greater than or equal to 2"),
    ({"policy": "asha", "gracePeriod": 10, "maxResource": 10}, "hepopt.earlyStopping", "must be below maxResource"),
    ({"policy": "hyperband"}, "hepopt.earlyStopping", "maxResource: the hyperband policy needs it"),
    ({"policy": "hyperband", "maxResource": 100, "brackets": 6}, "hepopt.earlyStopping", "brackets: at most 5"),
    ({"policy": "hyperband", "maxResource": 100, "brackets": 0}, "hepopt.earlyStopping.brackets", "greater than"),
    ({"policy": "predictive", "quantile": 0}, "hepopt.earlyStopping.quantile", "greater than 0"),
    ({"policy": "predictive", "quantile": 25}, "hepopt.earlyStopping.quantile", "less than 1"),
    ({"policy": "predictive", "predictor": "gp"}, "hepopt.earlyStopping.predictor", "'svr'"),
    ({"policy": "predictive", "minCompleted": 2}, "hepopt.earlyStopping.minCompleted", "greater than or equal to 5"),
    ({"policy": "predictive", "refitEvery": 0}, "hepopt.earlyStopping.refitEvery", "greater than or equal to 1"),
    ({"policy": "predictive", "gracePeriodd": 1}, "hepopt.earlyStopping.gracePeriodd", "unknown key"),
    # A key the chosen policy would ignore is a mistake, not a default.
    ({"policy": "asha", "quantile": 0.2}, "hepopt.earlyStopping.quantile", "read by predictive"),
    ({"policy": "median", "gracePeriod": 2}, "hepopt.earlyStopping.gracePeriod", "read by asha, hyperband, predictive"),
    ({"policy": "asha", "brackets": 2}, "hepopt.earlyStopping.brackets", "does not use this key"),
    ({"policy": "hyperband", "maxResource": 9, "minTrials": 3}, "hepopt.earlyStopping.minTrials", "read by median"),
])
def test_bad_stopping_settings_are_refused_naming_the_key(block, location, message):
    with pytest.raises(SpecError) as exc:
        parse_task(stopping(**block))
    assert any(loc == location and message in msg for loc, msg in exc.value.problems), exc.value.problems


def test_stopping_settings_take_documented_defaults_and_survive_a_round_trip():
    block = parse_task(stopping(policy="predictive", maxResource=100)).hepopt.earlyStopping
    assert (block.grace_period, block.reduction_factor, block.bracket_count) == (1, 3, 5)
    assert block.prune_quantile == DEFAULT_QUANTILE == 0.25 and block.predictor_name == "svr"
    for policy in STOPPING_POLICIES:
        extra = {"maxResource": 27} if policy in ("hyperband", "predictive") else {}
        task = parse_task(stopping(policy=policy, **extra))
        assert parse_task(task.to_json()) == task
    full = stopping(policy="predictive", gracePeriod=2, reductionFactor=2, maxResource=64, brackets=3,
                    quantile=0.1, predictor="qsvr-ensemble", minCompleted=20, refitEvery=4)
    task = parse_task(full)
    assert task.to_json()["hepopt"]["earlyStopping"].items() >= full["hepopt"]["earlyStopping"].items()
    # Tasks stored before the new policies carried the median keys at their defaults whatever the policy.
    assert parse_task(stopping(policy="none", minTrials=5, warmupSteps=0)).hepopt.earlyStopping.policy == "none"
