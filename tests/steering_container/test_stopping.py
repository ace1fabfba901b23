"""Early-stopping decisions on hand-made learning curves."""

import math
from collections import Counter

import numpy as np
import pytest

from hepopt.errors import SpecError
from hepopt.space import SearchSpace
from hepopt.task import EarlyStopping
from steering_container.stopping import (
    AshaStopping,
    HyperbandStopping,
    MedianStopping,
    NoStopping,
    ParamEncoder,
    PredictiveStopping,
    Rungs,
    StoppingPolicy,
    TrialView,
    make_policy,
)

SPACE = SearchSpace.parse({"lr": {"method": "loguniform", "dimension": {"low": 1e-4, "high": 1e-1}},
                           "width": {"method": "categorical", "dimension": {"categories": [8, 16, 32]}},
                           "seed": {"method": "fixed", "dimension": {"value": 3}}})


def view(trial_id, curve, state="running", final=None, params=None):
    return TrialView(trial_id, params=params or {}, curve=dict(curve), state=state, final=final)


# Three other trials: values at steps 0..3.
OTHERS = [view(1, {0: 1.0, 1: 0.8, 2: 0.6, 3: 0.5}), view(2, {0: 1.2, 1: 0.9, 2: 0.7}), view(3, {0: 0.9, 1: 0.7})]


def reporting(step, value, earlier=None):
    """Trial 0, which has just reported ``value`` at ``step`` (after the ``earlier`` steps)."""
    return view(0, {**(earlier or {}), step: value})


# -- median ---------------------------------------------------------------------------------------
def test_median_prunes_a_point_worse_than_the_median_at_the_same_step():
    policy = MedianStopping(min_trials=3)
    assert policy.should_prune(reporting(1, 0.85), 1, OTHERS)      # median of 0.8, 0.9, 0.7 is 0.8
    assert not policy.should_prune(reporting(1, 0.8), 1, OTHERS)   # equal to the median is not worse
    assert not policy.should_prune(reporting(1, 0.75), 1, OTHERS)


def test_median_waits_for_enough_points_at_that_step_and_for_the_warmup():
    assert not MedianStopping(min_trials=3).should_prune(reporting(2, 5.0), 2, OTHERS)  # two reached step 2
    assert MedianStopping(min_trials=2).should_prune(reporting(2, 5.0), 2, OTHERS)
    assert not MedianStopping(min_trials=1, warmup_steps=3).should_prune(reporting(2, 5.0), 2, OTHERS)
    assert MedianStopping(min_trials=1, warmup_steps=3).should_prune(reporting(3, 5.0), 3, OTHERS)
    assert not MedianStopping(min_trials=1).should_prune(reporting(7, 5.0), 7, OTHERS)  # nobody reached step 7


def test_median_respects_maximisation():
    policy = MedianStopping(min_trials=3, direction="maximize")
    assert policy.should_prune(reporting(0, 0.95), 0, OTHERS)      # median 1.0; lower is worse when maximising
    assert not policy.should_prune(reporting(0, 1.1), 0, OTHERS)


# -- rungs and ASHA -------------------------------------------------------------------------------
def test_rungs_grow_geometrically_below_the_maximum_resource():
    assert list(Rungs(1, 3, 100).resources()) == [1, 3, 9, 27, 81]
    assert list(Rungs(1, 3, 81).resources()) == [1, 3, 9, 27]           # a rung at the end decides nothing
    assert list(Rungs(2, 2, None).resources(up_to=20)) == [2, 4, 8, 16]
    # Steps count from 0: the rung at resource r is judged at step r - 1.
    assert Rungs(1, 3, 100).crossed(reporting(2, 1.0, {0: 1, 1: 1}), 2) == [2]
    assert Rungs(1, 3, 100).crossed(reporting(1, 1.0, {0: 1}), 1) == []
    # A report that skips rung steps crosses all of them at once.
    assert Rungs(1, 3, 100).crossed(reporting(9, 1.0, {0: 1}), 9) == [2, 8]


@pytest.mark.parametrize("args, message", [((0, 3, 100), "grace_period"), ((1, 1, 100), "reduction_factor"),
                                           ((1, 2.5, 100), "reduction_factor"), ((1, 3, 0), "max_resource")])
def test_rungs_refuse_bad_parameters_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        Rungs(*args)


RUNG0 = [view(i, {0: v}) for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1)]


def test_asha_keeps_the_best_third_at_a_rung():
    policy = AshaStopping(grace_period=1, reduction_factor=3, max_resource=100)
    # With itself, six values at the rung: the best two continue.
    assert not policy.should_prune(reporting(0, 1.5), 0, RUNG0)
    assert policy.should_prune(reporting(0, 2.5), 0, RUNG0)
    nine = RUNG0 + [view(i, {0: float(i)}) for i in range(6, 9)]   # 1..8 and itself: the best three continue
    assert not policy.should_prune(reporting(0, 2.5), 0, nine)
    assert policy.should_prune(reporting(0, 3.5), 0, nine)
    assert not policy.should_prune(reporting(0, 1.0), 0, RUNG0)                 # tied with the best: kept


def test_asha_always_keeps_the_single_best_and_lets_a_lone_trial_run():
    policy = AshaStopping(1, 3, 100)
    assert not policy.should_prune(reporting(0, 9.0), 0, [])
    assert policy.should_prune(reporting(0, 2.0), 0, RUNG0[:1])   # two values, 2 // 3 = 0: only the best goes on
    assert not policy.should_prune(reporting(0, 0.5), 0, RUNG0[:1])


def test_asha_decides_only_at_rungs():
    policy = AshaStopping(1, 3, 100)
    terrible = reporting(1, 1e9, {0: 0.1})
    assert not policy.should_prune(terrible, 1, RUNG0)          # step 1 is no rung (rungs at steps 0, 2, 8, ...)
    others = [view(i, {0: 1, 1: 1, 2: v}) for i, v in enumerate([1.0, 2.0, 3.0], start=1)]
    assert policy.should_prune(reporting(2, 9.0, {0: 0.1, 1: 0.1}), 2, others)


def test_asha_judges_a_skipped_rung_with_the_first_value_beyond_it():
    policy = AshaStopping(1, 3, 100)
    others = [view(i, {0: 1.0, 2: v}) for i, v in enumerate([1.0, 2.0, 3.0, 4.0], start=1)]
    assert policy.should_prune(reporting(5, 9.0, {0: 0.1}), 5, others)      # crossed the rung at step 2
    assert not policy.should_prune(reporting(5, 0.5, {0: 0.1}), 5, others)


def test_asha_has_no_rung_at_or_beyond_the_maximum_resource():
    policy = AshaStopping(1, 3, 9)
    others = [view(i, {8: 1.0}) for i in range(1, 10)]
    assert not policy.should_prune(reporting(8, 1e9, {s: 1.0 for s in range(8)}), 8, others)


def test_asha_respects_maximisation():
    policy = AshaStopping(1, 3, 100, direction="maximize")
    assert policy.should_prune(reporting(0, 1.5), 0, RUNG0)      # 5.0 and 4.0 are better when maximising
    assert not policy.should_prune(reporting(0, 4.5), 0, RUNG0)


# -- Hyperband ------------------------------------------------------------------------------------
def test_hyperband_brackets_follow_hyperband_proportions():
    policy = HyperbandStopping(1, 3, max_resource=100)
    assert [list(b.resources()) for b in policy.brackets] == [[1, 3, 9, 27, 81], [3, 9, 27, 81], [9, 27, 81],
                                                              [27, 81], [81]]
    assert policy.bracket_weights() == [81, 34, 15, 8, 5]        # Hyperband's n_s for R = 100, eta = 3
    counts = Counter(policy.bracket_of(i) for i in range(20_000))
    for bracket, weight in enumerate(policy.bracket_weights()):
        assert counts[bracket] / 20_000 == pytest.approx(weight / 143, abs=0.015)


def test_hyperband_bracket_is_a_function_of_the_id_alone():
    first, second = HyperbandStopping(1, 3, max_resource=100), HyperbandStopping(1, 3, max_resource=100)
    assert [first.bracket_of(i) for i in range(200)] == [second.bracket_of(i) for i in range(200)]


def ids_in(policy, bracket, count):
    return [i for i in range(10_000) if policy.bracket_of(i) == bracket][:count]


def test_hyperband_trials_compete_only_within_their_bracket():
    policy = HyperbandStopping(1, 3, max_resource=100)
    me, rival = ids_in(policy, 0, 2)
    (stranger,) = ids_in(policy, 1, 1)
    strangers = [view(stranger, {0: 0.1})]
    assert not policy.should_prune(view(me, {0: 5.0}), 0, strangers)            # the stranger is no rival
    assert policy.should_prune(view(me, {0: 5.0}), 0, [view(rival, {0: 0.1})])
    # Bracket 1 starts at resource 3: a terrible first epoch is no reason to stop there.
    assert not policy.should_prune(view(stranger, {0: 1e9}), 0, [view(rival, {0: 0.1})])


def test_hyperband_refuses_bad_parameters():
    with pytest.raises(ValueError, match="brackets"):
        HyperbandStopping(1, 3, max_resource=100, brackets=6)
    with pytest.raises(ValueError, match="max_resource"):
        HyperbandStopping(1, 3, max_resource=None)


# -- predictive -----------------------------------------------------------------------------------
STEPS = 30


def linear_curve(level, steps=STEPS):
    """A curve falling by 1/(t+1) onto ``level``: its final value is ``level`` + 1/STEPS."""
    return {t: level + 1.0 / (t + 1) for t in range(steps)}


def completed_trials(levels, start_id=100):
    return [view(start_id + i, linear_curve(level), "done", level + 1.0 / STEPS,
                 {"lr": 10 ** -(1 + i % 3), "width": 16, "seed": 3}) for i, level in enumerate(levels)]


LEVELS = [float(v) for v in np.linspace(1.0, 3.0, 12)]


def predictive(**options):
    settings = {"grace_period": 1, "reduction_factor": 3, "max_resource": STEPS, "brackets": 1,
                "min_completed": 10, **options}
    return PredictiveStopping(SPACE, **settings)


def test_predictive_continues_only_trials_predicted_to_beat_the_quantile():
    policy, done = predictive(quantile=0.25), completed_trials(LEVELS)
    assert policy.wants_refit(done)
    policy.refit(done)
    assert sorted(policy.fitted.models) == [3, 9, 27]              # one model per rung with >= 3 epochs
    params = {"lr": 0.01, "width": 16, "seed": 3}
    good, bad = linear_curve(0.9, 9), linear_curve(2.5, 9)
    assert not policy.should_prune(view(1, good, params=params), 8, done)
    assert policy.should_prune(view(2, bad, params=params), 8, done)
    assert policy.predicted_final(view(1, good, params=params), 9) < np.quantile([t.final for t in done], 0.25)
    # Between rungs nothing is decided, however bad the value.
    assert not policy.should_prune(view(3, linear_curve(2.5, 6), params=params), 5, done)


def test_predictive_tolerates_more_with_a_higher_quantile():
    done = completed_trials(LEVELS)
    trial = view(1, linear_curve(1.8, 9), params={"lr": 0.01, "width": 16, "seed": 3})
    strict, lenient = predictive(quantile=0.25), predictive(quantile=0.75)
    strict.refit(done)
    lenient.refit(done)
    assert strict.should_prune(trial, 8, done) and not lenient.should_prune(trial, 8, done)


def test_predictive_falls_back_to_successive_halving_until_enough_trials_completed():
    policy, asha = predictive(min_completed=10), AshaStopping(1, 3, STEPS)
    few = completed_trials(LEVELS[:4])
    assert not policy.wants_refit(few)
    rivals = few + [view(i, {0: v, 1: v, 2: v}) for i, v in enumerate([0.5, 0.6, 0.7], start=10)]
    for value in (0.4, 0.55, 0.9, 5.0):
        trial = view(1, {0: 0.1, 1: 0.1, 2: value}, params={"lr": 0.01, "width": 8, "seed": 3})
        assert policy.should_prune(trial, 2, rivals) == asha.should_prune(trial, 2, rivals), value


def test_predictive_uses_successive_halving_at_rungs_too_early_for_the_predictor():
    policy, done = predictive(), completed_trials(LEVELS)
    policy.refit(done)
    trial = view(1, {0: 100.0}, params={"lr": 0.01, "width": 8, "seed": 3})
    assert policy.should_prune(trial, 0, done)             # rung 1: one epoch, ASHA against the completed trials
    assert not policy.should_prune(view(1, {0: 0.1}), 0, done)


def test_predictive_refits_after_enough_new_completed_trials():
    policy = predictive(min_completed=10, refit_every=3)
    done = completed_trials(LEVELS)
    policy.refit(done[:10])
    assert not policy.wants_refit(done[:12])
    more = done + completed_trials([1.5], start_id=200)
    assert policy.wants_refit(more)
    policy.refit(more)
    assert policy.fitted.n_completed == 13


def test_predictive_refuses_bad_parameters():
    with pytest.raises(ValueError, match="quantile"):
        predictive(quantile=1.0)
    with pytest.raises(ValueError, match="refit_every"):
        predictive(refit_every=0)
    with pytest.raises(SpecError, match="unknown predictor"):
        predictive(predictor="oracle")


def test_parameters_are_encoded_in_order_with_categories_by_index():
    encoded = ParamEncoder(SPACE).encode([{"lr": 0.001, "width": 32, "seed": 3}, {"lr": 0.1, "width": 8, "seed": 3}])
    assert encoded.shape == (2, 2)                               # the fixed dimension carries nothing
    assert encoded[0] == pytest.approx([math.log10(0.001), 2.0])
    assert encoded[1] == pytest.approx([-1.0, 0.0])


# -- the task block -------------------------------------------------------------------------------
def test_make_policy_follows_the_task_block():
    assert isinstance(make_policy(EarlyStopping()), NoStopping)
    policy = make_policy(EarlyStopping(policy="median", minTrials=2, warmupSteps=1), "maximize")
    assert isinstance(policy, MedianStopping) and isinstance(policy, StoppingPolicy)
    assert (policy.min_trials, policy.warmup_steps, policy.direction) == (2, 1, "maximize")
    assert not NoStopping().should_prune(reporting(10, 1e9), 10, OTHERS)
    with pytest.raises(ValueError):
        MedianStopping(min_trials=0)


def test_make_policy_builds_the_rung_policies_with_the_block_settings():
    asha = make_policy(EarlyStopping(policy="asha", gracePeriod=2, reductionFactor=2, maxResource=20))
    assert isinstance(asha, AshaStopping) and list(asha.rungs.resources()) == [2, 4, 8, 16]
    hyperband = make_policy(EarlyStopping(policy="hyperband", maxResource=27, brackets=2))
    assert isinstance(hyperband, HyperbandStopping) and len(hyperband.brackets) == 2
    block = EarlyStopping(policy="predictive", maxResource=100, quantile=0.1, minCompleted=6, refitEvery=2)
    predictive_policy = make_policy(block, space=SPACE)
    assert isinstance(predictive_policy, PredictiveStopping)
    assert (predictive_policy.quantile, predictive_policy.min_completed, predictive_policy.refit_every) == (0.1, 6, 2)
    assert len(predictive_policy.fallback.brackets) == 5          # Hyperband brackets until the predictor decides
    with pytest.raises(ValueError, match="search space"):
        make_policy(block)


# -- predictive: how far the predictor is trusted -------------------------------------------------
class NearestNeighbour:
    """Predicts the target of the training row with the nearest hyperparameters: its cross-validated
    errors are zero when trials with equal hyperparameters improve equally, and wide when they do not."""

    def fit(self, hparams, curves, final):
        self.hparams, self.final = np.asarray(hparams, dtype=float), np.asarray(final, dtype=float)
        return self

    def predict(self, hparams, curves):
        distances = np.abs(np.asarray(hparams, dtype=float)[:, None, :] - self.hparams[None, :, :]).sum(axis=2)
        return self.final[distances.argmin(axis=1)]


GOOD_LR, BAD_LR = 0.001, 0.1
RUNG_STEP = 8


def flat_trials(specs, start_id=100):
    """Completed trials (lr, value at the rung, final value): flat at their rung value until the rung."""
    return [view(start_id + i, {t: value for t in range(STEPS)} | {STEPS - 1: final}, "done", final,
                 {"lr": lr, "width": 16, "seed": 3}) for i, (lr, value, final) in enumerate(specs)]


#: Good-lr trials keep improving by 2 after the rung, bad-lr ones get worse by 2; rung values 1.0-1.7.
CONSISTENT = flat_trials([(GOOD_LR if i % 2 else BAD_LR, 1.0 + i / 10, 1.0 + i / 10 + (-2 if i % 2 else 2))
                          for i in range(8)])


def at_rung(trial_id, lr, value):
    return view(trial_id, {t: value for t in range(RUNG_STEP + 1)}, params={"lr": lr, "width": 16, "seed": 3})


def nearest_policy(**options):
    return predictive(min_completed=5, predictor_factory=NearestNeighbour, **options)


def test_a_cross_validated_predictor_overrules_the_rank_at_the_rung():
    policy, asha = nearest_policy(), AshaStopping(1, 3, STEPS)
    policy.refit(CONSISTENT)
    model = policy.fitted.models[RUNG_STEP + 1]
    assert (model.optimistic, model.pessimistic) == (0.0, 0.0)
    leader, laggard = at_rung(1, BAD_LR, 0.5), at_rung(2, GOOD_LR, 1.3)
    assert not asha.should_prune(leader, RUNG_STEP, CONSISTENT) and asha.should_prune(laggard, RUNG_STEP, CONSISTENT)
    assert policy.should_prune(leader, RUNG_STEP, CONSISTENT)        # predicted 2.5: above the quantile
    assert not policy.should_prune(laggard, RUNG_STEP, CONSISTENT)   # predicted -0.7: below it (-0.55)


class MeanImprovement:
    """Predicts the training rows' mean target whatever the input."""

    def fit(self, hparams, curves, final):
        self.mean = float(np.mean(final))
        return self

    def predict(self, hparams, curves):
        return np.full(len(curves), self.mean)


def test_successive_halving_decides_where_the_threshold_lies_within_the_predictors_errors():
    # Improvements of -2 and +2 by turns that no input foretells: cross-validated errors of about ±2.
    erratic = flat_trials([(GOOD_LR, 1.0 + i / 10, 1.0 + i / 10 + (-2 if i % 2 else 2)) for i in range(8)])
    policy, asha = predictive(min_completed=5, predictor_factory=MeanImprovement), AshaStopping(1, 3, STEPS)
    policy.refit(erratic)
    model = policy.fitted.models[RUNG_STEP + 1]
    assert model.optimistic < 0 < model.pessimistic
    for value in (0.5, 0.95, 1.65):
        trial = at_rung(1, GOOD_LR, value)
        assert policy.should_prune(trial, RUNG_STEP, erratic) == asha.should_prune(trial, RUNG_STEP, erratic), value


def test_a_predictor_too_short_of_curves_to_be_cross_validated_leaves_the_decision_to_successive_halving():
    five = CONSISTENT[:5]
    policy, asha = nearest_policy(), AshaStopping(1, 3, STEPS)
    policy.refit(five)
    model = policy.fitted.models[RUNG_STEP + 1]
    assert (model.optimistic, model.pessimistic) == (-math.inf, math.inf)
    leader = at_rung(1, BAD_LR, 0.5)
    assert not policy.should_prune(leader, RUNG_STEP, five) and not asha.should_prune(leader, RUNG_STEP, five)
    assert policy.should_prune(at_rung(2, GOOD_LR, 1.65), RUNG_STEP, five)
    policy.refit(CONSISTENT[:6])                                     # six curves: leave-one-out is possible
    assert policy.fitted.models[RUNG_STEP + 1].optimistic == 0.0


def test_predictive_refits_at_every_new_curve_until_its_models_can_be_cross_validated():
    policy = nearest_policy(refit_every=5)
    policy.refit(CONSISTENT[:5])
    assert policy.wants_refit(CONSISTENT[:6])                        # five curves cannot be cross-validated
    policy.refit(CONSISTENT[:6])
    assert not policy.wants_refit(CONSISTENT[:7])                    # six can: back to every refit_every
    assert policy.wants_refit(CONSISTENT[:6] + completed_trials(LEVELS[:5]))
