"""ν-SVR on learning-curve features, on the real MLPF curves."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import r2_score

from hepopt.errors import SpecError
from steering_container.prediction import SVRPredictor, make_predictor
from steering_container.prediction.base import MIN_TRAINING_ROWS

Curves = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
MLPF = tuple[np.ndarray, np.ndarray, np.ndarray]
#: The published setting: 20 training curves, the rest of a half split held out.
TRAINING_CURVES = 20
#: Floor on the real-curve R²; the benchmark measures about 0.9 for this predictor.
R2_FLOOR = 0.7


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_svr_predicts_final_mlpf_losses_from_the_first_25_epochs(seed: int, mlpf_curves: MLPF) -> None:
    hparams, curves, final = mlpf_curves
    order = np.random.default_rng(seed).permutation(final.size)
    test, train = order[: final.size // 2], order[final.size // 2:][:TRAINING_CURVES]
    model = make_predictor("svr").fit(hparams[train], curves[train], final[train])
    assert r2_score(final[test], model.predict(hparams[test], curves[test])) > R2_FLOOR


def test_scaling_uses_training_rows_only(mlpf_curves: MLPF) -> None:
    """Predictions for a row must not depend on which other rows are predicted with it."""
    hparams, curves, final = mlpf_curves
    model = SVRPredictor().fit(hparams[:20], curves[:20], final[:20])
    together = model.predict(hparams[20:], curves[20:])
    alone = np.concatenate([model.predict(hparams[i:i + 1], curves[i:i + 1]) for i in range(20, 30)])
    np.testing.assert_allclose(together[:10], alone)


@pytest.mark.parametrize(("options", "key"), [({"nu": 0.0}, "svr.nu"), ({"nu": 1.5}, "svr.nu"), ({"C": 0}, "svr.C"),
                                              ({"gamma": -1.0}, "svr.gamma"), ({"gamma": "wide"}, "svr.gamma")])
def test_bad_parameters_are_named(options: dict, key: str) -> None:
    with pytest.raises(SpecError, match=key):
        SVRPredictor(**options)


def test_too_little_history_is_a_clear_error(synthetic_curves: Curves) -> None:
    with pytest.raises(SpecError, match=r"svr\.fit: too little history"):
        SVRPredictor().fit(*synthetic_curves(MIN_TRAINING_ROWS - 1))
