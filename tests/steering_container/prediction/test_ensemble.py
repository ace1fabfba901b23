"""QSVR ensembles: one member per disjoint subset of the training curves."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hepopt.errors import SpecError
from steering_container.prediction import QSVREnsemble

Curves = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
FAST = {"num_reads": 20, "sample_options": {"num_sweeps": 200}}


@pytest.mark.parametrize(("rows", "n_models", "expected_members"), [(80, 4, 4), (47, None, 4), (30, 1, 1)])
def test_members_are_fitted_on_disjoint_subsets_of_the_training_rows(
        rows: int, n_models: int | None, expected_members: int, synthetic_curves: Curves) -> None:
    model = QSVREnsemble(subset_size=10, n_models=n_models, seed=3, **FAST).fit(*synthetic_curves(rows))
    assert len(model.subsets_) == len(model.members_) == expected_members
    indices = np.concatenate(model.subsets_)
    assert all(len(s) == 10 for s in model.subsets_)
    assert len(set(indices.tolist())) == indices.size  # no row in two subsets
    assert indices.min() >= 0 and indices.max() < rows


def test_the_mean_ensemble_averages_its_members(synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(40)
    model = QSVREnsemble(subset_size=10, seed=0, **FAST).fit(hparams, curves, final)
    members = np.array([m.predict(hparams, curves) for m in model.members_])
    np.testing.assert_allclose(model.predict(hparams, curves), members.mean(axis=0))


def test_the_weighted_ensemble_trusts_members_that_predict_the_other_rows_well(synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(40)
    final = final.copy()
    final[:10] += 5.0  # the first member learns targets offset from all other rows
    model = QSVREnsemble(subset_size=10, weighting="weighted", seed=0, gamma=1.0, **FAST)
    model.subsets = lambda n: [np.arange(i, i + 10) for i in range(0, 40, 10)]  # type: ignore[method-assign]
    model.fit(hparams, curves, final)
    assert model.weights_.sum() == pytest.approx(1.0)
    assert model.weights_[0] < 0.5 * model.weights_[1:].min()


def test_too_few_rows_for_the_subsets_is_a_clear_error(synthetic_curves: Curves) -> None:
    with pytest.raises(SpecError, match=r"too little history: 70 training row\(s\), 4 × 20 needed"):
        QSVREnsemble(subset_size=20, n_models=4).fit(*synthetic_curves(70))
    with pytest.raises(SpecError, match="too little history: 15 training"):
        QSVREnsemble(subset_size=20).fit(*synthetic_curves(15))


@pytest.mark.parametrize(("options", "key"), [
    ({"subset_size": 0}, "qsvr-ensemble.subset_size"), ({"n_models": 0}, "qsvr-ensemble.n_models"),
    ({"weighting": "median"}, "qsvr-ensemble.weighting"), ({"base": -1.0}, "qsvr.base"),
    ({"gamma": 0}, "qsvr.gamma"), ({"colour": "red"}, "qsvr-ensemble.colour: unknown option"),
])
def test_bad_options_are_named_at_construction(options: dict, key: str) -> None:
    with pytest.raises(SpecError, match=key):
        QSVREnsemble(**options)
