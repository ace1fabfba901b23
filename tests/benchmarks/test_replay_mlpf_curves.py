"""The accuracy replay on the real MLPF curves: its split protocol, its guards and a short real run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

#: benchmarks/ is not an installed package: import it from the repository, whatever pytest's cwd.
REPOSITORY = Path(__file__).resolve().parents[2]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))
replay = importlib.import_module("benchmarks.replay_mlpf_curves")
objectives = importlib.import_module("benchmarks.objectives")

KEPT_CURVES = 295


@pytest.fixture(scope="module")
def curves() -> object:
    if not replay.CURVES_PATH.is_file():
        pytest.fail(f"MLPF learning curves not found at {replay.CURVES_PATH}: put mlpf_delphes_296.csv (from "
                    "erwulff/performance-pred, data/mlpf/delphes_trainings_processed.csv) there")
    return replay.load_curves()


def test_the_outlier_is_dropped_and_inputs_are_every_second_of_the_first_25_epochs(curves: object) -> None:
    assert curves.final.size == KEPT_CURVES and curves.dropped == 1
    assert curves.final.max() < objectives.OUTLIER_FINAL_LOSS
    assert curves.observed.shape == (KEPT_CURVES, 13) and curves.hparams.shape == (KEPT_CURVES, 7)


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_a_split_holds_out_half_and_trains_on_the_pool_only(seed: int) -> None:
    train, test = replay.split(KEPT_CURVES, seed, 80)
    assert test.size == 148 and train.size == 80
    assert not set(train.tolist()) & set(test.tolist())
    again_train, again_test = replay.split(KEPT_CURVES, seed, 20)
    assert again_test.tolist() == test.tolist() and again_train.tolist() == train[:20].tolist()


def test_a_short_real_run_prints_the_table(capsys: pytest.CaptureFixture[str], curves: object) -> None:
    assert replay.main(["--splits", "3", "--predictors", "svr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("| ν-SVR"))
    mean = float(row.split("|")[6])
    assert 0.7 < mean <= 1.0


def test_reporting_on_the_tuning_splits_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert replay.main(["--first-seed", str(replay.TUNING_SEEDS.start), "--splits", "1"]) == 2
    assert "overlap the tuning splits" in capsys.readouterr().err


def test_the_hpo_part_without_its_module_says_what_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "benchmarks.replay_hpo", None)  # import fails as if the file were absent
    assert replay.main(["--part", "hpo"]) == 2
    assert "needs benchmarks/replay_hpo.py" in capsys.readouterr().err


def test_the_hpo_part_passes_unknown_arguments_on(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = type(sys)("benchmarks.replay_hpo")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.replay_hpo", fake)
    assert replay.main(["--part", "hpo", "--seeds", "2"]) == 0
    assert seen == [["--seeds", "2"]]


def test_unknown_arguments_of_the_accuracy_part_are_an_error() -> None:
    with pytest.raises(SystemExit):
        replay.main(["--part", "accuracy", "--seeds", "2"])


def test_r2_is_scored_as_sklearn_does(curves: object) -> None:
    entry = replay.ENTRIES[0]
    score = replay.split_r2(entry, curves, 5)
    train, test = replay.split(KEPT_CURVES, 5, entry.training)
    model = entry.build(5).fit(curves.hparams[train], curves.observed[train], curves.final[train])
    residual = curves.final[test] - model.predict(curves.hparams[test], curves.observed[test])
    expected = 1 - np.sum(residual**2) / np.sum((curves.final[test] - curves.final[test].mean()) ** 2)
    assert score == pytest.approx(expected)
