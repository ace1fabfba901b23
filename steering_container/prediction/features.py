"""Learning-curve features and the scaling every predictor fits on its training rows.

Baker et al. (2017) predict the final value of a training from its hyperparameters, the part of the
learning curve seen so far and the curve's first and second differences: the differences tell a
flattening curve from one still falling, which the raw values alone do not.
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import MinMaxScaler, QuantileTransformer

from hepopt.errors import SpecError

#: Second differences need three observed epochs.
MIN_CURVE_POINTS = 3
#: Quantiles sklearn would use at most; fewer when there are fewer training rows.
MAX_QUANTILES = 1000


def check_rows(hparams: np.ndarray, curves: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 2-D float arrays with one row per training; SpecError naming ``where`` if not."""
    hp = np.asarray(hparams, dtype=float)
    cv = np.asarray(curves, dtype=float)
    problems = []
    if hp.ndim != 2:
        problems.append((f"{where}.hparams", f"must be 2-D (rows, hyperparameters), got shape {hp.shape}"))
    if cv.ndim != 2:
        problems.append((f"{where}.curves", f"must be 2-D (rows, epochs), got shape {cv.shape}"))
    elif cv.shape[1] < MIN_CURVE_POINTS:
        problems.append((f"{where}.curves", f"too little history: {cv.shape[1]} epoch(s) observed, the "
                                            f"second difference needs at least {MIN_CURVE_POINTS}"))
    if not problems and hp.shape[0] != cv.shape[0]:
        problems.append((where, f"{hp.shape[0]} hyperparameter rows but {cv.shape[0]} curves"))
    if not problems and not (np.isfinite(hp).all() and np.isfinite(cv).all()):
        problems.append((where, "hyperparameters and curves must be finite numbers (no NaN or inf)"))
    if problems:
        raise SpecError(problems)
    return hp, cv


def curve_features(hparams: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Hyperparameters (n, d) and partial curves (n, t) -> (n, d + t + (t - 1) + (t - 2)) features."""
    hp, cv = check_rows(hparams, curves, "curve_features")
    return np.hstack([hp, cv, np.diff(cv, n=1, axis=1), np.diff(cv, n=2, axis=1)])


def check_target(final: np.ndarray, n_rows: int, min_rows: int, where: str) -> np.ndarray:
    """The final values as a finite 1-D array of ``n_rows``, at least ``min_rows`` of them."""
    y = np.asarray(final, dtype=float)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise SpecError([(f"{where}.final", f"must be 1-D with one value per row ({n_rows}), got shape {y.shape}")])
    if not np.isfinite(y).all():
        raise SpecError([(f"{where}.final", "must be finite numbers (no NaN or inf)")])
    if n_rows < min_rows:
        raise SpecError([(where, f"too little history: {n_rows} training row(s), at least {min_rows} needed")])
    return y


FEATURE_SCALINGS = ("mixed", "quantile", "minmax")


def _quantile(n_rows: int) -> QuantileTransformer:
    return QuantileTransformer(n_quantiles=min(MAX_QUANTILES, n_rows), output_distribution="uniform")


class Scaling:
    """Feature and target scaling, fitted on training rows only.

    ``"mixed"`` (the default) quantile-scales the hyperparameters, so a predictor is blind to how they
    are encoded (lr or log lr is the same to it), and min-max scales the curve features, clipped to the
    training range: the final loss is close to linear in the late losses, and a rank transform learnt
    from 20 curves would bend that line. ``"quantile"`` scales everything by quantiles (DESIGN.md §5),
    ``"minmax"`` everything by range. The target is min-max scaled (a log of the MLPF losses, which
    span less than a factor 1.3, changed nothing in tuning). Tuning that chose the default:
    benchmarks/replay_mlpf_curves.py.
    """

    def __init__(self, features: str = "mixed") -> None:
        if features not in FEATURE_SCALINGS:
            raise SpecError([("feature_scaling", f"unknown scaling {features!r}; choose one of {FEATURE_SCALINGS}")])
        self.kind = features

    def fit(self, features: np.ndarray, n_hparams: int, final: np.ndarray) -> Scaling:
        """``features`` as curve_features builds them, the first ``n_hparams`` columns hyperparameters."""
        n_rows = features.shape[0]
        self.n_hparams_ = n_hparams
        hp_scaler = MinMaxScaler(clip=True) if self.kind == "minmax" else _quantile(n_rows)
        curve_scaler = _quantile(n_rows) if self.kind == "quantile" else MinMaxScaler(clip=True)
        self.hparams_ = hp_scaler.fit(features[:, :n_hparams]) if n_hparams else None
        self.curve_ = curve_scaler.fit(features[:, n_hparams:])
        self.target_ = MinMaxScaler().fit(final.reshape(-1, 1))
        return self

    def features(self, features: np.ndarray) -> np.ndarray:
        curve = self.curve_.transform(features[:, self.n_hparams_:])
        if self.hparams_ is None:
            return curve
        return np.hstack([self.hparams_.transform(features[:, :self.n_hparams_]), curve])

    def target(self, final: np.ndarray) -> np.ndarray:
        return self.target_.transform(final.reshape(-1, 1)).ravel()

    def inverse_target(self, scaled: np.ndarray) -> np.ndarray:
        return self.target_.inverse_transform(np.asarray(scaled, dtype=float).reshape(-1, 1)).ravel()
