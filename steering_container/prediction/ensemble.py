"""An ensemble of QSVRs on disjoint subsets of the training curves.

An annealer holds a QUBO of a few dozen coefficients (20 curves × 2 × K bits is already 120 qubits), so
more training curves are used by training one QSVR per disjoint subset and averaging their predictions;
disjoint subsets also make the members' errors less correlated than resampling would.
``weighting="weighted"`` weights each member by 1 / its MSE on the training rows outside its own subset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hepopt.errors import SpecError
from steering_container.prediction.base import reject_unknown_options
from steering_container.prediction.features import check_rows, check_target
from steering_container.prediction.qsvr import QSVRPredictor

WEIGHTINGS = ("mean", "weighted")
#: Training curves per member, the qubit limit of the published study.
DEFAULT_SUBSET_SIZE = 20
#: Keeps 1 / MSE finite for a member that fits the other rows exactly.
MSE_FLOOR = 1e-12


class QSVREnsemble:
    """Mean (or error-weighted mean) of QSVRs, each fitted on its own ``subset_size`` training curves."""

    def __init__(self, subset_size: int = DEFAULT_SUBSET_SIZE, n_models: int | None = None,
                 weighting: str = "mean", seed: int | None = None, **qsvr_options: Any) -> None:
        problems = []
        if not isinstance(subset_size, (int, np.integer)) or subset_size < 1:
            problems.append(("qsvr-ensemble.subset_size", f"must be an integer >= 1, got {subset_size!r}"))
        if n_models is not None and (not isinstance(n_models, (int, np.integer)) or n_models < 1):
            problems.append(("qsvr-ensemble.n_models", f"must be an integer >= 1 or None, got {n_models!r}"))
        if weighting not in WEIGHTINGS:
            problems.append(("qsvr-ensemble.weighting", f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}"))
        if problems:
            raise SpecError(problems)
        reject_unknown_options(QSVRPredictor, qsvr_options, "qsvr-ensemble")
        self.subset_size = subset_size
        self.n_models = n_models
        self.weighting = weighting
        self.seed = seed
        self.qsvr_options = qsvr_options
        self._member(0)  # bad member options fail here, at construction, not at the first fit

    def _member(self, index: int) -> QSVRPredictor:
        return QSVRPredictor(seed=None if self.seed is None else self.seed + index, **self.qsvr_options)

    def subsets(self, n_rows: int) -> list[np.ndarray]:
        """Disjoint random index sets, one per member; SpecError when the rows do not fill them."""
        n_models = self.n_models or n_rows // self.subset_size
        if n_models < 1 or n_models * self.subset_size > n_rows:
            raise SpecError([("qsvr-ensemble.fit", f"too little history: {n_rows} training row(s), "
                                                   f"{max(n_models, 1)} × {self.subset_size} needed")])
        order = np.random.default_rng(self.seed).permutation(n_rows)
        return [order[i * self.subset_size:(i + 1) * self.subset_size] for i in range(n_models)]

    def fit(self, hparams: np.ndarray, curves: np.ndarray, final: np.ndarray) -> QSVREnsemble:
        hp, cv = check_rows(hparams, curves, "qsvr-ensemble.fit")
        y = check_target(final, hp.shape[0], 1, "qsvr-ensemble.fit")
        self.subsets_ = self.subsets(hp.shape[0])
        self.members_ = [self._member(i).fit(hp[rows], cv[rows], y[rows]) for i, rows in enumerate(self.subsets_)]
        self.weights_ = self._weights(hp, cv, y)
        return self

    def _weights(self, hp: np.ndarray, cv: np.ndarray, y: np.ndarray) -> np.ndarray:
        weights = np.ones(len(self.members_))
        if self.weighting == "weighted":
            for i, (member, rows) in enumerate(zip(self.members_, self.subsets_, strict=True)):
                others = np.setdiff1d(np.arange(y.size), rows)
                if others.size:
                    error = np.mean((member.predict(hp[others], cv[others]) - y[others]) ** 2)
                    weights[i] = 1.0 / max(float(error), MSE_FLOOR)
        return weights / weights.sum()

    def predict(self, hparams: np.ndarray, curves: np.ndarray) -> np.ndarray:
        if not hasattr(self, "members_"):
            raise SpecError([("qsvr-ensemble.predict", "call fit() before predict()")])
        return self.weights_ @ np.array([member.predict(hparams, curves) for member in self.members_])
