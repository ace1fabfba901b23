"""The orchestrator's prune decisions: StoppingDecider on a real SQLite storage, and the report route."""

import importlib
import threading
import time

import pytest

from hepopt.errors import InvalidRequest
from hepopt.task import parse_task
from orchestrator.early_stopping import StoppingDecider
from orchestrator.storage.base import PointState
from orchestrator.storage.sql import SQLStorage
from steering_container.stopping import PredictiveStopping

SPACE = {"x": {"method": "uniform", "dimension": {"low": 0, "high": 1}}}
ASHA = {"policy": "asha", "gracePeriod": 1, "reductionFactor": 2, "maxResource": 10}
#: Long enough for a decision on a loaded machine, far shorter than a blocked fit.
DECISION_TIMEOUT_S = 5.0
BLOCKED_FIT_LIMIT_S = 30.0


@pytest.fixture
def storage(tmp_path):
    with SQLStorage(f"sqlite:///{tmp_path / 'stopping.db'}") as store:
        yield store


def study_with(storage, early_stopping, points):
    task = parse_task({"evaluationExec": "train", "searchSpace": SPACE, "maxPoints": points,
                       "nParallelEvaluation": points, "hepopt": {"method": "random", "earlyStopping": early_stopping}})
    study = storage.create_study("alice", task)
    storage.add_points(study.id, [{"x": i / points} for i in range(points)], origin="test")
    leases = [storage.lease(study.id, f"w{i}") for i in range(points)]
    return study.id, task, leases


def report(storage, decider, study_id, task, lease, step, value):
    """What the report route does: store the value, then decide."""
    storage.report(lease.point_id, lease.lease_token, step, value, study_id=study_id)
    return decider.decide(study_id, task, lease.point_id, step, value)


def train(storage, sid, lease, steps=10, final=0.1):
    """A whole training: every epoch reported to storage, then finished DONE; the finished point."""
    for step in range(steps):
        storage.report(lease.point_id, lease.lease_token, step, 1.0 / (step + 1), study_id=sid)
    return storage.finish(lease.point_id, lease.lease_token, PointState.DONE, final, study_id=sid).point


def test_asha_prunes_a_point_outranked_at_a_rung(storage):
    sid, task, (first, second, third) = study_with(storage, ASHA, 3)
    decider = StoppingDecider(storage, max_age=60.0)
    assert report(storage, decider, sid, task, first, 0, 1.0) is False
    assert report(storage, decider, sid, task, second, 0, 2.0) is True     # 2 at the rung, 2 // 2 = 1 kept
    assert report(storage, decider, sid, task, third, 0, 0.5) is False
    assert report(storage, decider, sid, task, first, 1, 0.5) is False     # alone at the rung at step 1
    assert report(storage, decider, sid, task, third, 1, 0.9) is True
    assert report(storage, decider, sid, task, third, 2, 9.0) is False     # step 2 is no rung (steps 0, 1, 3, 7)


def test_values_reported_elsewhere_are_seen_after_max_age(storage):
    sid, task, (first, second, third) = study_with(storage, ASHA, 3)
    decider = StoppingDecider(storage, max_age=0.0)
    assert report(storage, decider, sid, task, first, 0, 5.0) is False
    # Another server process stores a better value: this process learns it from the background re-read.
    storage.report(second.point_id, second.lease_token, 0, 1.0, study_id=sid)
    assert report(storage, decider, sid, task, first, 1, 5.0) is False
    assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
    assert decider.cached(sid).trials[second.point_id].curve == {0: 1.0}
    assert report(storage, decider, sid, task, third, 0, 3.0) is True


class StaleSnapshot(SQLStorage):
    """Reads the curves and the points (the points last), then holds them back until released: a
    re-read overtaken by new reports and tells."""

    def __init__(self, url):
        super().__init__(url)
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()

    def list_points(self, study_id, *args, **kwargs):
        points = super().list_points(study_id, *args, **kwargs)
        if self.hold.is_set():
            self.holding.set()
            self.release.wait(BLOCKED_FIT_LIMIT_S)
        return points


def reload_held(store):
    """A study of two running points whose first has reported twice, the second report starting a
    re-read that ``store`` holds after its last read: (decider, study id, task, leases)."""
    sid, task, leases = study_with(store, ASHA, 2)
    decider = StoppingDecider(store, max_age=0.0)
    report(store, decider, sid, task, leases[0], 0, 1.0)
    store.hold.set()
    report(store, decider, sid, task, leases[0], 1, 1.0)           # stale: a re-read starts and is held
    assert store.holding.wait(DECISION_TIMEOUT_S)
    store.hold.clear()
    return decider, sid, task, leases


def test_reports_arriving_during_a_reload_are_not_lost(tmp_path):
    with StaleSnapshot(f"sqlite:///{tmp_path / 'stale.db'}") as store:
        decider, sid, task, (first, second) = reload_held(store)
        report(store, decider, sid, task, second, 0, 3.0)          # arrives after the snapshot was read
        store.release.set()
        assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
        assert decider.cached(sid).trials[second.point_id].curve == {0: 3.0}
        assert decider.cached(sid).trials[first.point_id].curve == {0: 1.0, 1: 1.0}


class BlockingPredictor:
    """A predictor whose fit takes as long as the test wants; it predicts the training curves' improvement
    exactly (so its cross-validated errors are nil) and a hopeless one for any other curve."""

    fitting = threading.Event()
    release = threading.Event()

    def fit(self, hparams, curves, final):
        self.fitting.set()
        self.release.wait(BLOCKED_FIT_LIMIT_S)
        self.known = {tuple(curve): value for curve, value in zip(curves, final, strict=True)}
        return self

    def predict(self, hparams, curves):
        return [self.known.get(tuple(curve), 1e9) for curve in curves]


def test_background_retraining_does_not_block_a_decision(storage):
    importlib.import_module("steering_container.prediction")  # a one-off import of seconds is not the point here
    block = {"policy": "predictive", "gracePeriod": 1, "reductionFactor": 3, "maxResource": 10, "brackets": 1,
             "minCompleted": 5}
    sid, task, leases = study_with(storage, block, 9)
    for lease in leases[:7]:  # seven: enough for the fitted models to be cross-validated
        train(storage, sid, lease)

    def blocking_policy(task_):
        return PredictiveStopping(task_.space, grace_period=1, reduction_factor=3, max_resource=10, brackets=1,
                                  min_completed=5, predictor_factory=BlockingPredictor)

    decider = StoppingDecider(storage, max_age=60.0, policy_factory=blocking_policy)
    runner = leases[7]
    answers = []

    def decide(step, value):
        worker = threading.Thread(target=lambda: answers.append(report(storage, decider, sid, task, runner,
                                                                       step, value)))
        started = time.monotonic()
        worker.start()
        worker.join(DECISION_TIMEOUT_S)
        assert not worker.is_alive(), "a decision waited for the predictor's fit"
        return answers[-1], time.monotonic() - started

    try:
        assert decide(0, 0.5)[0] is False                  # loads the study; the refit starts in the background
        assert BlockingPredictor.fitting.wait(DECISION_TIMEOUT_S)
        assert decide(1, 0.3)[0] is False
        answer, seconds = decide(2, 0.2)                   # rung 3 while the fit is blocked: ASHA decides
        assert answer is False and seconds < DECISION_TIMEOUT_S
        assert decider.cached(sid).policy.fitted is None
    finally:
        BlockingPredictor.release.set()
    assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
    assert sorted(decider.cached(sid).policy.fitted.models) == [3, 9]
    for step in range(3, 8):
        assert decide(step, 0.1)[0] is False
    assert decide(8, 0.1)[0] is True                       # rung 9: now the fitted model predicts 1e9


class RecordingPredictor:
    """Counts fits; predicts no further improvement."""

    fits = 0

    def fit(self, hparams, curves, final):
        type(self).fits += 1
        return self

    def predict(self, hparams, curves):
        return [0.0 for _ in range(len(curves))]


PREDICTIVE = {"policy": "predictive", "gracePeriod": 1, "reductionFactor": 3, "maxResource": 10, "brackets": 1,
              "minCompleted": 5}


def recording_policy(task_):
    return PredictiveStopping(task_.space, grace_period=1, reduction_factor=3, max_resource=10, brackets=1,
                              min_completed=5, predictor_factory=RecordingPredictor)


def four_trained(storage):
    """A predictive study of 7 points, 4 of them trained and done, loaded by a decider that has not
    fitted yet (4 < minCompleted): (decider, study id, task, leases)."""
    importlib.import_module("steering_container.prediction")
    sid, task, leases = study_with(storage, PREDICTIVE, 7)
    for lease in leases[:4]:
        train(storage, sid, lease)
    decider = StoppingDecider(storage, max_age=3600.0, policy_factory=recording_policy)
    assert report(storage, decider, sid, task, leases[6], 0, 0.5) is False     # loads 4 completed: no fit
    return decider, sid, task, leases


def test_a_point_told_done_is_learned_from_at_once(storage):
    decider, sid, task, leases = four_trained(storage)
    for step in range(10):                                                     # the fifth, seen by this process
        report(storage, decider, sid, task, leases[4], step, 1.0 / (step + 1))
    point = storage.finish(leases[4].point_id, leases[4].lease_token, PointState.DONE, 0.1, study_id=sid).point
    assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
    assert decider.cached(sid).policy.fitted is None                           # done, but unknown to the cache
    decider.tell(point)
    trial = decider.cached(sid).trials[point.id]
    assert (trial.state, trial.final) == ("done", 0.1)
    assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
    assert decider.cached(sid).policy.fitted.n_completed == 5


def test_a_told_point_whose_curve_went_to_another_process_is_read_from_storage(storage):
    decider, sid, _, leases = four_trained(storage)
    decider.tell(train(storage, sid, leases[4]))                               # reported to another process
    assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
    assert len(decider.cached(sid).trials[leases[4].point_id].curve) == 10
    assert decider.cached(sid).policy.fitted.n_completed == 5


def test_a_tell_arriving_during_a_reload_is_not_lost(tmp_path):
    with StaleSnapshot(f"sqlite:///{tmp_path / 'stale.db'}") as store:
        decider, sid, _, (first, _) = reload_held(store)
        done = store.finish(first.point_id, first.lease_token, PointState.DONE, 0.5, study_id=sid).point
        decider.tell(done)                                         # told after the snapshot was read
        store.release.set()
        assert decider.cached(sid).background.wait_idle(DECISION_TIMEOUT_S)
        trial = decider.cached(sid).trials[first.point_id]
        assert (trial.state, trial.final) == ("done", 0.5)


def test_a_tell_for_a_study_not_loaded_here_does_nothing(storage):
    sid, _, (lease,) = study_with(storage, ASHA, 1)
    decider = StoppingDecider(storage, max_age=3600.0)
    decider.tell(storage.finish(lease.point_id, lease.lease_token, PointState.DONE, 1.0, study_id=sid).point)
    assert decider.cached(sid) is None


# -- over HTTP ----------------------------------------------------------------------------------
def lease_of(client, study_id, wait_for, worker="w1"):
    return wait_for(lambda: client.ask(study_id, worker).lease, what="a lease")


def test_asha_prunes_through_the_report_route(alice, make_task, wait_for):
    sid = alice.create_study(make_task(nParallelEvaluation=3, hepopt={"earlyStopping": ASHA}))["id"]
    first, second, third = (lease_of(alice, sid, wait_for, f"w{i}") for i in range(3))
    assert alice.report(sid, first.point_id, first.lease_token, 0, 1.0) is False
    assert alice.report(sid, second.point_id, second.lease_token, 0, 2.0) is True
    assert alice.report(sid, third.point_id, third.lease_token, 0, 0.5) is False
    assert alice.report(sid, first.point_id, first.lease_token, 1, 0.9) is False   # first at the rung at step 1
    assert alice.report(sid, third.point_id, third.lease_token, 1, 0.95) is True   # 0.9 is better, 2 // 2 = 1 kept


@pytest.mark.parametrize("block, location", [
    ({"policy": "asha", "reductionFactor": 1}, "hepopt.earlyStopping.reductionFactor"),
    ({"policy": "asha", "quantile": 0.2}, "hepopt.earlyStopping.quantile"),
    ({"policy": "hyperband"}, "maxResource"),
    ({"policy": "predictive", "predictor": "oracle"}, "hepopt.earlyStopping.predictor"),
])
def test_bad_stopping_settings_are_refused_naming_the_key(alice, make_task, block, location):
    with pytest.raises(InvalidRequest, match=location.replace(".", r"\.")):
        alice.create_study(make_task(hepopt={"earlyStopping": block}))
