"""Curve features (Baker et al.) and the scaling fitted on training rows only."""

from __future__ import annotations

import numpy as np
import pytest

from hepopt.errors import SpecError
from steering_container.prediction import curve_features
from steering_container.prediction.features import MIN_CURVE_POINTS, Scaling


def test_features_are_hyperparameters_curve_and_its_first_and_second_differences() -> None:
    hparams = np.array([[0.1, 7.0]])
    curve = np.array([[10.0, 6.0, 4.0, 3.5]])
    features = curve_features(hparams, curve)
    expected = [0.1, 7.0, 10.0, 6.0, 4.0, 3.5, -4.0, -2.0, -0.5, 2.0, 1.5]
    assert features.tolist() == [expected]


@pytest.mark.parametrize(("hparams", "curves", "message"), [
    (np.zeros((2, 3)), np.zeros((2, MIN_CURVE_POINTS - 1)), "too little history"),
    (np.zeros((2, 3)), np.zeros((3, 4)), "2 hyperparameter rows but 3 curves"),
    (np.zeros(3), np.zeros((3, 4)), "curve_features.hparams: must be 2-D"),
    (np.zeros((1, 3)), np.array([[1.0, np.nan, 2.0]]), "finite"),
])
def test_bad_inputs_are_named(hparams: np.ndarray, curves: np.ndarray, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        curve_features(hparams, curves)


def test_scaling_is_fitted_on_training_rows_and_clips_curve_features_to_their_range() -> None:
    train = np.array([[1e-4, 10.0], [1e-3, 20.0], [1e-2, 30.0]])
    scaling = Scaling("mixed").fit(train, 1, np.array([1.0, 2.0, 3.0]))
    scaled = scaling.features(np.array([[1e-3, 25.0], [1.0, 99.0]]))
    assert scaled[0, 1] == pytest.approx(0.75)          # min-max on the curve column
    assert scaled[1].tolist() == [1.0, 1.0]              # outside the training range: clipped
    assert scaling.inverse_target(scaling.target(np.array([2.5]))) == pytest.approx([2.5])


def test_an_unknown_scaling_is_named() -> None:
    with pytest.raises(SpecError, match="feature_scaling: unknown scaling 'zscore'"):
        Scaling("zscore")


def test_curves_without_hyperparameters_are_scaled_too() -> None:
    features = curve_features(np.zeros((3, 0)), np.array([[3.0, 2.0, 1.5], [4.0, 3.0, 2.0], [5.0, 3.0, 2.5]]))
    scaled = Scaling("mixed").fit(features, 0, np.array([1.0, 2.0, 3.0])).features(features)
    assert scaled.shape == (3, 6) and scaled.min() == 0.0 and scaled.max() == 1.0
