"""ν-SVR on learning-curve features (Baker et al. 2017), the classical baseline of the QSVR."""

from __future__ import annotations

import numpy as np
from sklearn.svm import NuSVR

from hepopt.errors import SpecError
from steering_container.prediction.base import ScaledCurveModel
from steering_container.prediction.features import Scaling


class SVRPredictor(ScaledCurveModel):
    """ν-SVR with an RBF kernel; ν bounds the fraction of support vectors, so the tube width adapts itself.

    Defaults (ν, C, γ, scaling) are the best of a grid on the MLPF tuning splits
    (``benchmarks/replay_mlpf_curves.py --part tune``).
    """

    name = "svr"

    def __init__(self, nu: float = 0.8, C: float = 10.0, gamma: float | str = 0.01,
                 feature_scaling: str = "mixed") -> None:
        self.nu = nu
        self.C = C
        self.gamma = gamma
        self.feature_scaling = feature_scaling
        Scaling(feature_scaling)  # an unknown scaling fails here rather than at the first fit
        problems = []
        if not (isinstance(nu, (int, float)) and 0 < nu <= 1):
            problems.append(("svr.nu", f"ν must be in (0, 1], got {nu!r}"))
        if not (isinstance(C, (int, float)) and C > 0):
            problems.append(("svr.C", f"must be > 0, got {C!r}"))
        if not (gamma in ("scale", "auto") or (isinstance(gamma, (int, float)) and gamma > 0)):
            problems.append(("svr.gamma", f"RBF γ must be > 0, 'scale' or 'auto', got {gamma!r}"))
        if problems:
            raise SpecError(problems)

    def _fit_scaled(self, x: np.ndarray, y: np.ndarray) -> None:
        self.model_ = NuSVR(nu=self.nu, C=self.C, gamma=self.gamma, kernel="rbf").fit(x, y)

    def _predict_scaled(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict(x)
