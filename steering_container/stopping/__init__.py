"""Early-stopping policies: decide from intermediate values whether a running trial should stop.

``none``, ``median``, ``asha``, ``hyperband`` and ``predictive`` (docs/EARLY_STOPPING.md); the task's
``hepopt.earlyStopping`` block picks one through :func:`make_policy`. The orchestrator's report route
and the replay benchmark drive the same classes.
"""

from __future__ import annotations

from hepopt.space import SearchSpace
from hepopt.task import EarlyStopping
from steering_container.stopping.asha import AshaStopping, HyperbandStopping, Rungs, SuccessiveHalving
from steering_container.stopping.base import Direction, NoStopping, StoppingPolicy, TrialState, TrialView
from steering_container.stopping.median import MedianStopping
from steering_container.stopping.predictive import ParamEncoder, PredictiveStopping


def make_policy(options: EarlyStopping, direction: Direction = "minimize",
                space: SearchSpace | None = None) -> StoppingPolicy:
    """The policy a task's ``hepopt.earlyStopping`` block asks for; ``predictive`` needs the search space
    (to turn hyperparameters into predictor inputs)."""
    rungs = {"grace_period": options.grace_period, "reduction_factor": options.reduction_factor}
    if options.policy == "none":
        return NoStopping(direction)
    if options.policy == "median":
        return MedianStopping(options.minTrials, options.warmupSteps, direction)
    if options.policy == "asha":
        return AshaStopping(**rungs, max_resource=options.maxResource, direction=direction)
    if options.policy == "hyperband":
        return HyperbandStopping(**rungs, max_resource=options.maxResource,  # type: ignore[arg-type]
                                 brackets=options.bracket_count, direction=direction)
    if options.policy == "predictive":
        if space is None:
            raise ValueError("the predictive policy needs the search space")
        return PredictiveStopping(space, **rungs, max_resource=options.maxResource, brackets=options.brackets,
                                  quantile=options.prune_quantile,
                                  predictor=options.predictor_name, min_completed=options.min_completed,
                                  refit_every=options.refit_every, direction=direction)
    raise ValueError(f"unknown early-stopping policy {options.policy!r}")


__all__ = ["AshaStopping", "Direction", "HyperbandStopping", "MedianStopping", "NoStopping", "ParamEncoder",
           "PredictiveStopping", "Rungs", "StoppingPolicy", "SuccessiveHalving", "TrialState", "TrialView",
           "make_policy"]
