"""The predictor interface and the plumbing (input checks, features, scaling) its models share."""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from hepopt.errors import SpecError
from steering_container.prediction.features import Scaling, check_rows, check_target, curve_features

#: Fewer training curves than this say too little about how final values spread.
MIN_TRAINING_ROWS = 5


def reject_unknown_options(cls: type, options: Iterable[str], where: str) -> None:
    """SpecError naming every option that ``cls.__init__`` does not take by name."""
    known = {name for name, p in inspect.signature(cls).parameters.items() if p.kind != p.VAR_KEYWORD}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SpecError([(f"{where}.{key}", f"unknown option; known: {sorted(known)}") for key in unknown])


@runtime_checkable
class CurvePredictor(Protocol):
    """Predicts the final value of trainings from their hyperparameters and partial learning curves."""

    def fit(self, hparams: np.ndarray, curves: np.ndarray, final: np.ndarray) -> CurvePredictor: ...

    def predict(self, hparams: np.ndarray, curves: np.ndarray) -> np.ndarray: ...


class ScaledCurveModel(abc.ABC):
    """A regressor on scaled curve features and a scaled target (see Scaling; scalers fitted in fit).

    Subclasses see only scaled arrays; predictions are mapped back to the target's units here.
    """

    name = "predictor"
    feature_scaling = "mixed"

    def fit(self, hparams: np.ndarray, curves: np.ndarray, final: np.ndarray) -> ScaledCurveModel:
        hp, cv = check_rows(hparams, curves, f"{self.name}.fit")
        y = check_target(final, hp.shape[0], MIN_TRAINING_ROWS, f"{self.name}.fit")
        features = curve_features(hp, cv)
        self.scaling_ = Scaling(self.feature_scaling).fit(features, hp.shape[1], y)
        self.n_epochs_ = cv.shape[1]
        self._fit_scaled(self.scaling_.features(features), self.scaling_.target(y))
        return self

    def predict(self, hparams: np.ndarray, curves: np.ndarray) -> np.ndarray:
        if not hasattr(self, "scaling_"):
            raise SpecError([(f"{self.name}.predict", "call fit() before predict()")])
        hp, cv = check_rows(hparams, curves, f"{self.name}.predict")
        if cv.shape[1] != self.n_epochs_:
            raise SpecError([(f"{self.name}.predict.curves",
                              f"{cv.shape[1]} epochs given, the model was fitted on {self.n_epochs_}")])
        return self.scaling_.inverse_target(self._predict_scaled(self.scaling_.features(curve_features(hp, cv))))

    @abc.abstractmethod
    def _fit_scaled(self, x: np.ndarray, y: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _predict_scaled(self, x: np.ndarray) -> np.ndarray: ...
