"""Early-stopping decisions on hand-made learning curves."""

import pytest

from hepopt.task import EarlyStopping
from steering_container.stopping import MedianStopping, NoStopping, StoppingPolicy, make_policy

# Three finished curves: values at steps 0..3.
OTHERS = [{0: 1.0, 1: 0.8, 2: 0.6, 3: 0.5}, {0: 1.2, 1: 0.9, 2: 0.7}, {0: 0.9, 1: 0.7}]


def test_median_prunes_a_point_worse_than_the_median_at_the_same_step():
    policy = MedianStopping(min_trials=3)
    assert policy.should_prune(1, 0.85, OTHERS)      # median of 0.8, 0.9, 0.7 is 0.8
    assert not policy.should_prune(1, 0.8, OTHERS)   # equal to the median is not worse
    assert not policy.should_prune(1, 0.75, OTHERS)


def test_median_waits_for_enough_points_at_that_step_and_for_the_warmup():
    assert not MedianStopping(min_trials=3).should_prune(2, 5.0, OTHERS)  # only two points reached step 2
    assert MedianStopping(min_trials=2).should_prune(2, 5.0, OTHERS)
    assert not MedianStopping(min_trials=1, warmup_steps=3).should_prune(2, 5.0, OTHERS)
    assert MedianStopping(min_trials=1, warmup_steps=3).should_prune(3, 5.0, OTHERS)
    assert not MedianStopping(min_trials=1).should_prune(7, 5.0, OTHERS)  # nobody reached step 7


def test_median_respects_maximisation():
    policy = MedianStopping(min_trials=3, direction="maximize")
    assert policy.should_prune(0, 0.95, OTHERS)      # median 1.0; lower is worse when maximising
    assert not policy.should_prune(0, 1.1, OTHERS)


def test_make_policy_follows_the_task_block():
    assert isinstance(make_policy(EarlyStopping()), NoStopping)
    policy = make_policy(EarlyStopping(policy="median", minTrials=2, warmupSteps=1), "maximize")
    assert isinstance(policy, MedianStopping) and isinstance(policy, StoppingPolicy)
    assert (policy.min_trials, policy.warmup_steps, policy.direction) == (2, 1, "maximize")
    assert not NoStopping().should_prune(10, 1e9, OTHERS)
    with pytest.raises(ValueError):
        MedianStopping(min_trials=0)
