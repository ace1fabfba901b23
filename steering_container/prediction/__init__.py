"""Learning-curve performance predictors: the final value of a training from its first epochs.

``make_predictor("svr" | "qsvr" | "qsvr-ensemble", **options)`` builds one; every predictor has
``fit(hparams, curves, final)`` and ``predict(hparams, curves)`` with hyperparameters (n, d) and observed
partial curves (n, t), and fits its scaling on the training rows only. DESIGN.md §5 describes the method.
"""

from __future__ import annotations

from typing import Any

from hepopt.errors import SpecError
from steering_container.prediction.base import CurvePredictor, reject_unknown_options
from steering_container.prediction.ensemble import QSVREnsemble
from steering_container.prediction.features import curve_features
from steering_container.prediction.qsvr import QSVRPredictor
from steering_container.prediction.svr import SVRPredictor

PREDICTORS: dict[str, type] = {"svr": SVRPredictor, "qsvr": QSVRPredictor, "qsvr-ensemble": QSVREnsemble}


def make_predictor(name: str, **options: Any) -> CurvePredictor:
    """The predictor called ``name``; SpecError (a ValueError) naming an unknown predictor or option."""
    if name not in PREDICTORS:
        raise SpecError([("predictor", f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}")])
    cls = PREDICTORS[name]
    if cls is not QSVREnsemble:  # the ensemble checks its members' options itself
        reject_unknown_options(cls, options, name)
    return cls(**options)


__all__ = ["PREDICTORS", "CurvePredictor", "QSVREnsemble", "QSVRPredictor", "SVRPredictor", "curve_features",
           "make_predictor"]
