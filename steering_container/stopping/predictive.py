"""Stopping by predicted final value (Swift-Hyperband's rule, DESIGN.md §5).

Rank at a rung need not hold at the end, so at each rung this policy asks a learning-curve predictor
(steering_container.prediction: SVR, QSVR or a QSVR ensemble) for the trial's final value and lets the
trial continue only if that prediction beats the ``quantile`` of the final values of completed trials.
One predictor per rung, fitted on the completed trials' first ``rung`` epochs (a few of them, see
``PREDICTOR_CURVE_POINTS``).

The predictors learn what is still to come — final value minus the last observed value — and the
prediction adds it back. Why: the training curves are few and biased (only trials that survived to the
end), and away from its training data a regressor drifts to the mean of its targets. Drifting to the
mean final value predicts every new trial to be average, so a good newcomer is pruned; drifting to the
mean remaining improvement still ranks newcomers by their own curves. On the MLPF curves (12 training
curves from the better half, 30 draws, SVR) the three best test configurations were kept 34–84% of the
time with the final value as target and 97–100% with the remaining improvement.

How far a prediction is trusted: a predictor fitted on 5-10 biased curves can be badly wrong — in the
MLPF replay it predicted the best configurations' losses to *rise* (by up to 13) after epoch 3 or 9, and pruned
them while they led their rung. So every refit also cross-validates each rung's model, and the model
decides only where the threshold lies outside the range of its errors (``ERROR_TAIL``); otherwise, and
while too few curves exist to cross-validate (six are needed; the policy refits at every new one until
then), successive halving decides at the trial's own rungs.

Until ``min_completed``
trials have completed (and at rungs too early for the predictor's curve features), successive halving
decides: asynchronous Hyperband when ``max_resource`` is known (plain ASHA with ``brackets=1``), ASHA
otherwise. The rungs are those of the trial's Hyperband bracket. Why brackets rather than one ASHA
schedule: with ASHA's single aggressive schedule almost nothing trains to the end (about 5 of 143 trials
in the MLPF replay), so the predictor would never get the completed curves it learns from.

Fitting is slow, so it happens only in :meth:`PredictiveStopping.refit`, which builds new models and
swaps them in with one assignment: a decision reads the models once and never waits for a fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from hepopt.space import Dimension, SearchSpace
from steering_container.stopping.asha import AshaStopping, HyperbandStopping, Rungs, SuccessiveHalving
from steering_container.stopping.base import Direction, StoppingPolicy, TrialView

if TYPE_CHECKING:
    from steering_container.prediction import CurvePredictor

#: Stand-in for a category the space does not list (a point stored under an older space).
UNKNOWN_CATEGORY = -1.0
#: Epochs of the observed curve a predictor sees, evenly spaced and ending with the last one (the
#: published setting saw 13: every second of the first 25). Bounded so that the cost of a prediction —
#: the predictors scale every feature column on its own — does not grow with the rung: with every epoch
#: of the rung at 81 a single prediction took 140 ms, above the 20 ms a decision may take.
PREDICTOR_CURVE_POINTS = 6
#: Folds of the cross-validation that measures a rung model's error at each refit (fewer with fewer curves).
CV_FOLDS = 5
#: The share of cross-validated errors left out on either side: a trial is pruned only if its prediction
#: corrected by the lower quartile of the model's errors still misses the threshold, kept outright only if
#: corrected by the upper quartile it still beats it; in between successive halving decides. Chosen on
#: the replay's tuning seeds 100-109 (0.1: 0.90 of Hyperband's epochs; 0.25: 0.74; 0.3-0.35: 0.74 with a
#: worse best on one seed).
ERROR_TAIL = 0.25


class ParamEncoder:
    """Hyperparameters as numbers for a predictor: numbers as they are (log10 on log scales), categories
    by their index, fixed dimensions left out. Order-preserving is all the predictors need, since they
    quantile-scale every feature on their training rows."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.dimensions = tuple(d for d in space.dimensions if d.kind != "fixed")

    def encode(self, params_list: Sequence[Mapping[str, Any]]) -> np.ndarray:
        rows = []
        for params in params_list:
            flat = self.space.flatten(params)
            rows.append([_number(dim, flat[dim.name]) for dim in self.dimensions])
        return np.array(rows, dtype=float).reshape(len(rows), len(self.dimensions))


def observed_steps(resource: int) -> list[int]:
    """The steps a predictor sees at the rung of ``resource`` epochs (see PREDICTOR_CURVE_POINTS)."""
    if resource <= PREDICTOR_CURVE_POINTS:
        return list(range(resource))
    return sorted({round(i * (resource - 1) / (PREDICTOR_CURVE_POINTS - 1)) for i in range(PREDICTOR_CURVE_POINTS)})


def _number(dim: Dimension, value: Any) -> float:
    if dim.kind == "categorical":
        kind, index = dim.canonical(value)
        return float(index) if kind == "c" else UNKNOWN_CATEGORY
    return math.log10(value) if dim.is_log and value > 0 else float(value)


@dataclass(frozen=True)
class RungModel:
    """One rung's predictor and the range of its cross-validated errors (true - predicted final value,
    oriented so that lower is better): ``optimistic`` is the low end, ``pessimistic`` the high end."""

    predictor: CurvePredictor
    optimistic: float
    pessimistic: float


@dataclass(frozen=True)
class FittedModels:
    """Rung models by rung resource (epochs observed), and how many completed trials they came from."""

    n_completed: int
    models: Mapping[int, RungModel]


class PredictiveStopping(StoppingPolicy):
    """At each rung, continue only if the predicted final value beats the completed trials' quantile."""

    def __init__(self, space: SearchSpace, grace_period: int = 1, reduction_factor: int = 3,
                 max_resource: int | None = None, brackets: int | None = None, quantile: float = 0.25,
                 predictor: str = "svr", min_completed: int = 5, refit_every: int = 5,
                 direction: Direction = "minimize",
                 predictor_factory: Callable[[], CurvePredictor] | None = None) -> None:
        super().__init__(direction)
        problems = []
        if not 0 < quantile < 1:
            problems.append(f"quantile must be in (0, 1), got {quantile!r}")
        if not isinstance(min_completed, int) or min_completed < 1:
            problems.append(f"min_completed must be an integer >= 1, got {min_completed!r}")
        if not isinstance(refit_every, int) or refit_every < 1:
            problems.append(f"refit_every must be an integer >= 1, got {refit_every!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.fallback: SuccessiveHalving
        if max_resource is None:
            self.fallback = AshaStopping(grace_period, reduction_factor, None, direction)
        else:
            self.fallback = HyperbandStopping(grace_period, reduction_factor, max_resource=max_resource,
                                              brackets=brackets, direction=direction)
        self.encoder = ParamEncoder(space)
        self.quantile = quantile
        self.min_completed = min_completed
        self.refit_every = refit_every
        # Imported here: scikit-learn and the annealers take seconds to import, which a server whose
        # studies use other policies should not pay at start-up.
        from steering_container.prediction import make_predictor
        from steering_container.prediction.base import MIN_TRAINING_ROWS
        from steering_container.prediction.features import MIN_CURVE_POINTS

        self.min_curve_points = MIN_CURVE_POINTS
        self.min_training_rows = MIN_TRAINING_ROWS
        if predictor_factory is None:
            make_predictor(predictor)  # an unknown name fails here, not in a background fit
            predictor_factory = partial(make_predictor, predictor)
        self._new_predictor = predictor_factory
        self.rungs = Rungs(grace_period, reduction_factor, max_resource)
        self.fitted: FittedModels | None = None

    # -- deciding ---------------------------------------------------------------------------------
    def should_prune(self, trial: TrialView, step: int, others: Sequence[TrialView]) -> bool:
        fitted, value = self.fitted, trial.curve[step]
        own = self.fallback.schedule(trial).crossed(trial, step)
        crossed = sorted(set(own) | set(self.rungs.crossed(trial, step))) if fitted is not None else own
        if not crossed:
            return False
        threshold = self._threshold(others) if fitted is not None else None
        rivals: Sequence[TrialView] | None = None
        for rung_step in crossed:
            verdict = None if threshold is None else self._verdict(fitted, trial, rung_step + 1, threshold)
            if verdict is None and rung_step in own:
                rivals = self.fallback.rivals(trial, others) if rivals is None else rivals
                verdict = self.fallback.loses_rung(value, rung_step, rivals)
            if verdict:
                return True
        return False

    def predicted_final(self, trial: TrialView, resource: int) -> float | None:
        """The current models' prediction at the rung of ``resource`` epochs (None: no model, or the
        trial lacks a step the model needs)."""
        fitted = self.fitted
        return None if fitted is None else self._predict(fitted.models.get(resource), trial, resource)

    def _threshold(self, others: Sequence[TrialView]) -> float | None:
        finals = [self.oriented(t.final) for t in others if t.completed]  # type: ignore[arg-type]
        if len(finals) < self.min_completed:
            return None
        return float(np.quantile(finals, self.quantile))

    def _verdict(self, fitted: FittedModels | None, trial: TrialView, resource: int, threshold: float) -> bool | None:
        """The model's verdict at a rung: True to prune, False to continue, None when it cannot tell —
        no model there, or the threshold lies within the range of its cross-validated errors."""
        model = None if fitted is None else fitted.models.get(resource)
        predicted = self._predict(model, trial, resource)
        if model is None or predicted is None:
            return None
        if self.oriented(predicted) + model.optimistic >= threshold:
            return True
        if self.oriented(predicted) + model.pessimistic < threshold:
            return False
        return None

    def _predict(self, model: RungModel | None, trial: TrialView, resource: int) -> float | None:
        observed = None if model is None else trial.values_at(observed_steps(resource))
        if model is None or observed is None:
            return None
        remaining = model.predictor.predict(self.encoder.encode([trial.params]), np.array([observed]))[0]
        return float(observed[-1] + remaining)

    # -- learning ---------------------------------------------------------------------------------
    def rung_resources(self, up_to: int) -> list[int]:
        """The rung resources of the first (finest) bracket, which hold every bracket's: one predictor each."""
        return list(self.rungs.resources(up_to))

    def wants_refit(self, completed: Sequence[TrialView]) -> bool:
        """After ``refit_every`` new completed trials; and after every one while the models cannot be
        cross-validated yet, since until then successive halving decides in their place."""
        fitted = self.fitted
        if len(completed) < self.min_completed:
            return False
        if fitted is None:
            return True
        new = len(completed) - fitted.n_completed
        return new >= self.refit_every or (new > 0 and self._folds(fitted.n_completed) is None)

    def refit(self, completed: Sequence[TrialView]) -> None:
        """Fit one predictor per rung on the completed trials that reported the steps it sees there."""
        rows = [t for t in completed if t.completed]
        longest = max((max(t.curve, default=-1) + 1 for t in rows), default=0)
        models: dict[int, RungModel] = {}
        for resource in self.rung_resources(longest):
            if resource < self.min_curve_points:
                continue
            steps = observed_steps(resource)
            usable = [(t, observed) for t in rows if (observed := t.values_at(steps)) is not None]
            if len(usable) < self.min_completed:
                continue
            hparams = self.encoder.encode([t.params for t, _ in usable])
            curves = np.array([observed for _, observed in usable], dtype=float)
            remaining = np.array([t.final for t, _ in usable], dtype=float) - curves[:, -1]
            models[resource] = self._fit_rung(hparams, curves, remaining)
        self.fitted = FittedModels(len(completed), models)

    def _fit_rung(self, hparams: np.ndarray, curves: np.ndarray, remaining: np.ndarray) -> RungModel:
        """A rung's predictor with its error range; a model too short of curves to be cross-validated gets
        an unbounded range, so that successive halving decides for it."""
        errors = self._cv_errors(hparams, curves, remaining)
        predictor = self._new_predictor().fit(hparams, curves, remaining)
        if errors is None:
            return RungModel(predictor, -math.inf, math.inf)
        optimistic, pessimistic = np.quantile(self._sign * errors, [ERROR_TAIL, 1 - ERROR_TAIL])
        return RungModel(predictor, float(optimistic), float(pessimistic))

    def _folds(self, n: int) -> int | None:
        """``CV_FOLDS``, or one per curve (leave-one-out) when a fold's training part would be smaller than
        a predictor accepts; None when even leave-one-out leaves too few."""
        if n - math.ceil(n / CV_FOLDS) >= self.min_training_rows:
            return CV_FOLDS
        return n if n - 1 >= self.min_training_rows else None

    def _cv_errors(self, hparams: np.ndarray, curves: np.ndarray, remaining: np.ndarray) -> np.ndarray | None:
        """Out-of-fold errors (true - predicted) of a cross-validation (see _folds); None when too few curves."""
        n = len(remaining)
        folds = self._folds(n)
        if folds is None:
            return None
        fold_of = np.arange(n) % folds
        errors = np.empty(n)
        for fold in range(folds):
            test, train = fold_of == fold, fold_of != fold
            model = self._new_predictor().fit(hparams[train], curves[train], remaining[train])
            errors[test] = remaining[test] - np.asarray(model.predict(hparams[test], curves[test]), dtype=float)
        return errors
