"""The storage contract, run against every backend (SQLite file, private PostgreSQL).

A new backend passes this file or it is not a backend. Time is passed explicitly (``now``) so lease
expiry is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from hepopt.task import Task
from orchestrator.storage import (
    ConflictError,
    InvalidValueError,
    NotFoundError,
    PointState,
    StaleLeaseError,
    SteeringStatus,
    StudyRecord,
    StudyState,
)
from orchestrator.storage.models import LeaseRow
from orchestrator.storage.sql import APPEND_CHUNK_POINTS, SQLStorage, hash_secret
from steering_container.api import Observation

T0 = 1_700_000_000.0
LEASE_S = 10.0
HOUR_S = 3600.0
FAILED_LOSS = 1e5
#: Bound on awaited storage calls, so that a coroutine never woken fails rather than hangs.
ASYNC_TIMEOUT_S = 60.0

MakeTask = Callable[..., Task]
Points = Callable[[int], list[dict[str, float]]]


def new_study(storage: SQLStorage, make_task: MakeTask, n_points: int, owner: str = "alice",
              **keys: Any) -> StudyRecord:
    """A study of ``n_points`` maxPoints (unless given), all added; lease time LEASE_S unless given."""
    keys.setdefault("maxPoints", n_points)
    keys["hepopt"] = {"leaseSeconds": LEASE_S, **keys.get("hepopt", {})}
    study = storage.create_study(owner, make_task(**keys), name="test", now=T0)
    storage.add_points(study.id, [{"x": i / (n_points + 1)} for i in range(n_points)], now=T0)
    return storage.get_study(study.id)


# -- lifecycle ---------------------------------------------------------------------------------
def test_full_lifecycle(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 2)
    assert study.state == StudyState.RUNNING and study.n_points == 2 and study.owner == "alice"
    assert storage.get_study(study.id).task == make_task(maxPoints=2, hepopt={"leaseSeconds": LEASE_S})

    first = storage.lease(study.id, "w1", now=T0)
    assert first is not None and first.number == 0 and first.attempt == 0 and first.worker_id == "w1"
    assert first.expires_at == pytest.approx(T0 + LEASE_S)
    assert storage.heartbeat(first.point_id, first.lease_token, now=T0 + 5).expires_at == pytest.approx(T0 + 15)
    storage.report(first.point_id, first.lease_token, 1, 0.9, now=T0 + 6)
    result = storage.finish(first.point_id, first.lease_token, PointState.DONE, 0.5, request_id="r1", now=T0 + 7)
    assert not result.replayed
    assert result.point.state == PointState.DONE and result.point.loss == 0.5 and result.point.finished_at == T0 + 7
    assert result.point.worker_id is None and result.point.lease_expires_at is None

    second = storage.lease(study.id, "w2", now=T0 + 8)
    assert second is not None and second.number == 1 and second.point_id != first.point_id
    assert storage.lease(study.id, "w3", now=T0 + 8) is None
    assert storage.get_study(study.id).state == StudyState.RUNNING
    storage.finish(second.point_id, second.lease_token, "pruned", 0.7, request_id="r2", now=T0 + 9)

    done = storage.get_study(study.id)
    assert done.state == StudyState.COMPLETED and "2 points" in (done.message or "")
    counts = storage.counts(study.id)
    assert (counts.done, counts.pruned, counts.total, counts.evaluation_jobs) == (1, 1, 2, 2)


def test_point_records_keep_params_and_origin(storage: SQLStorage, make_task: MakeTask) -> None:
    study = storage.create_study("alice", make_task(maxPoints=3), now=T0)
    params = {"x": 0.25, "nested": {"layers": [1, 2]}, "name": "é"}
    (added,) = storage.add_points(study.id, [params], origin="user", now=T0)
    assert added.params == params and added.origin == "user" and added.state == PointState.NEW
    assert storage.get_point(added.id) == added
    assert storage.get_point(added.id, study_id=study.id) == added
    with pytest.raises(NotFoundError):
        storage.get_point(added.id, study_id=study.id + 1)
    assert [p.id for p in storage.list_points(study.id, PointState.NEW)] == [added.id]
    assert storage.list_points(study.id, PointState.DONE) == []


def test_lease_calls_with_study_id_refuse_points_of_other_studies(storage: SQLStorage, make_task: MakeTask,
                                                                  points: Points) -> None:
    study = storage.create_study("alice", make_task(maxPoints=2), now=T0)
    other = storage.create_study("alice", make_task(maxPoints=1), now=T0)
    storage.add_points(study.id, points(2), now=T0)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None and not lease.has_checkpoint
    calls: list[Callable[[int], Any]] = [
        lambda sid: storage.heartbeat(lease.point_id, lease.lease_token, now=T0 + 1, study_id=sid),
        lambda sid: storage.report(lease.point_id, lease.lease_token, 0, 0.5, now=T0 + 1, study_id=sid),
        lambda sid: storage.release(lease.point_id, lease.lease_token, now=T0 + 1, study_id=sid),
        lambda sid: storage.finish(lease.point_id, lease.lease_token, "done", 0.5, now=T0 + 1, study_id=sid),
    ]
    for call in calls:
        with pytest.raises(NotFoundError):
            call(other.id)
    assert storage.intermediate_values(study.id) == {}
    assert storage.heartbeat(lease.point_id, lease.lease_token, now=T0 + 2, study_id=study.id).expires_at > T0 + 2
    storage.report(lease.point_id, lease.lease_token, 0, 0.5, now=T0 + 2, study_id=study.id)
    storage.report(lease.point_id, lease.lease_token, 0, 0.25, now=T0 + 3, study_id=study.id)
    assert storage.intermediate_values(study.id) == {lease.point_id: {0: 0.25}}
    storage.put_checkpoint_meta(lease.point_id, "ckpt/a.tar", "a" * 64, 1, now=T0 + 3)
    assert storage.release(lease.point_id, lease.lease_token, now=T0 + 4, study_id=study.id).state == PointState.NEW
    again = storage.lease(study.id, "w", now=T0 + 5)
    assert again is not None and again.point_id == lease.point_id and again.has_checkpoint
    with pytest.raises(StaleLeaseError):
        storage.report(lease.point_id, lease.lease_token, 1, 0.1, now=T0 + 5, study_id=study.id)
    result = storage.finish(again.point_id, again.lease_token, "done", 0.1, now=T0 + 6, study_id=study.id)
    assert result.point.state == PointState.DONE


# -- budget ------------------------------------------------------------------------------------
def test_add_points_never_exceeds_max_points(storage: SQLStorage, make_task: MakeTask, points: Points) -> None:
    study = storage.create_study("alice", make_task(maxPoints=3), now=T0)
    assert len(storage.add_points(study.id, points(2), now=T0)) == 2
    extra = storage.add_points(study.id, points(5)[2:], now=T0)
    assert [p.number for p in extra] == [2] and extra[0].params == points(5)[2]
    assert storage.add_points(study.id, points(1), now=T0) == []
    assert storage.get_study(study.id).n_points == 3 and storage.counts(study.id).total == 3


def test_a_batch_larger_than_one_transaction_is_added_in_order_up_to_max_points(
        storage: SQLStorage, make_task: MakeTask, points: Points) -> None:
    limit = 2 * APPEND_CHUNK_POINTS + 3  # the cap falls inside the third transaction
    study = storage.create_study("alice", make_task(maxPoints=limit), now=T0)
    added = storage.add_points(study.id, points(limit + 40), now=T0)
    assert [p.number for p in added] == list(range(limit)) and [p.params for p in added] == points(limit + 40)[:limit]
    assert added == storage.list_points(study.id) and storage.get_study(study.id).n_points == limit


def test_add_points_refused_when_study_not_running(storage: SQLStorage, make_task: MakeTask,
                                                   points: Points) -> None:
    study = storage.create_study("alice", make_task(maxPoints=3), now=T0)
    storage.cancel_study(study.id, now=T0)
    assert storage.add_points(study.id, points(2), now=T0) == []


def test_add_points_rejects_non_json_points(storage: SQLStorage, make_task: MakeTask) -> None:
    study = storage.create_study("alice", make_task(maxPoints=3), now=T0)
    with pytest.raises(InvalidValueError, match=r"params_list\[1\]"):
        storage.add_points(study.id, [{"x": 0.1}, {"x": math.nan}], now=T0)
    with pytest.raises(InvalidValueError):
        storage.add_points(study.id, [["not", "a", "dict"]], now=T0)  # type: ignore[list-item]
    assert storage.counts(study.id).total == 0


def test_max_evaluation_jobs_stops_leasing(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 2, maxEvaluationJobs=3)
    for _ in range(3):
        lease = storage.lease(study.id, "w", now=T0)
        assert lease is not None
        storage.release(lease.point_id, lease.lease_token, now=T0)
    assert storage.lease(study.id, "w", now=T0) is None
    counts = storage.counts(study.id)
    assert counts.evaluation_jobs == 3 and counts.new == 2
    after = storage.get_study(study.id)
    assert after.state == StudyState.COMPLETED and "maxEvaluationJobs" in (after.message or "")


def test_default_evaluation_jobs_limit_is_twice_max_points(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    for _ in range(2):
        lease = storage.lease(study.id, "w", now=T0)
        assert lease is not None
        storage.release(lease.point_id, lease.lease_token, now=T0)
    assert storage.lease(study.id, "w", now=T0) is None


def test_lease_when_nothing_is_new(storage: SQLStorage, make_task: MakeTask) -> None:
    study = storage.create_study("alice", make_task(maxPoints=2), now=T0)
    assert storage.lease(study.id, "w", now=T0) is None
    assert storage.counts(study.id).evaluation_jobs == 0


# -- leases, expiry, reaper -------------------------------------------------------------------
def test_expired_lease_is_reaped_until_max_attempts(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1, hepopt={"maxAttempts": 2})
    first = storage.lease(study.id, "w1", now=T0)
    assert first is not None
    assert storage.reap_expired(now=T0 + LEASE_S - 1) == 0
    assert storage.reap_expired(now=T0 + LEASE_S + 1) == 1
    point = storage.get_point(first.point_id)
    assert point.state == PointState.NEW and point.attempt == 1 and point.worker_id is None

    second = storage.lease(study.id, "w2", now=T0 + 20)
    assert second is not None and second.point_id == first.point_id and second.attempt == 1
    assert second.lease_token != first.lease_token
    assert storage.reap_expired(now=T0 + 20 + LEASE_S + 1) == 1
    failed = storage.get_point(first.point_id)
    assert failed.state == PointState.FAILED and failed.loss is None and failed.attempt == 2
    assert "maxAttempts=2" in (failed.message or "")
    assert storage.get_study(study.id).state == StudyState.COMPLETED
    assert storage.reap_expired(now=T0 + HOUR_S) == 0


def test_point_failed_for_good_gets_failed_loss_when_task_sets_it(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 2, hepopt={"maxAttempts": 1, "failedLoss": FAILED_LOSS})
    reaped = storage.lease(study.id, "w1", now=T0)
    told = storage.lease(study.id, "w2", now=T0)
    assert reaped is not None and told is not None
    result = storage.finish(told.point_id, told.lease_token, PointState.FAILED, request_id="f", message="exit 1",
                            now=T0)
    assert result.point.loss == FAILED_LOSS and result.point.message == "exit 1"
    assert storage.reap_expired(now=T0 + LEASE_S + 1) == 1
    assert storage.get_point(reaped.point_id).loss == FAILED_LOSS
    assert [o.loss for o in storage.history(study.id)] == [FAILED_LOSS, FAILED_LOSS]


def test_heartbeat_keeps_a_lease_alive(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    for beat in range(1, 4):
        storage.heartbeat(lease.point_id, lease.lease_token, now=T0 + beat * (LEASE_S - 1))
        assert storage.reap_expired(now=T0 + beat * (LEASE_S - 1) + LEASE_S - 1) == 0
    assert storage.get_point(lease.point_id).state == PointState.RUNNING


def test_expired_but_not_yet_reaped_lease_is_honoured(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    storage.heartbeat(lease.point_id, lease.lease_token, now=T0 + 2 * LEASE_S)
    result = storage.finish(lease.point_id, lease.lease_token, "done", 1.0, now=T0 + 3 * LEASE_S)
    assert result.point.state == PointState.DONE


def test_stale_lease_token_is_refused(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    old = storage.lease(study.id, "w1", now=T0)
    assert old is not None
    storage.reap_expired(now=T0 + LEASE_S + 1)
    new = storage.lease(study.id, "w2", now=T0 + LEASE_S + 2)
    assert new is not None and new.point_id == old.point_id
    with pytest.raises(StaleLeaseError, match="no longer valid"):
        storage.heartbeat(old.point_id, old.lease_token, now=T0 + LEASE_S + 3)
    with pytest.raises(StaleLeaseError):
        storage.report(old.point_id, old.lease_token, 1, 0.1)
    with pytest.raises(StaleLeaseError):
        storage.finish(old.point_id, old.lease_token, "done", 0.1, request_id="old")
    with pytest.raises(StaleLeaseError):
        storage.release(old.point_id, old.lease_token)
    with pytest.raises(StaleLeaseError):
        storage.heartbeat(new.point_id, "0" * len(new.lease_token))
    point = storage.get_point(new.point_id)
    assert point.state == PointState.RUNNING and point.worker_id == "w2"
    assert storage.finish(new.point_id, new.lease_token, "done", 0.2).point.loss == 0.2


def test_release_gives_the_point_back_without_costing_an_attempt(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    lease = storage.lease(study.id, "w1", now=T0)
    assert lease is not None
    released = storage.release(lease.point_id, lease.lease_token, now=T0 + 1)
    assert released.state == PointState.NEW and released.attempt == 0 and released.worker_id is None
    with pytest.raises(StaleLeaseError):
        storage.finish(lease.point_id, lease.lease_token, "done", 1.0)
    again = storage.lease(study.id, "w2", now=T0 + 2)
    assert again is not None and again.point_id == lease.point_id and again.attempt == 0


def test_lease_log_records_every_lease(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1, maxEvaluationJobs=3, hepopt={"maxAttempts": 3})
    first = storage.lease(study.id, "w1", now=T0)
    assert first is not None
    storage.release(first.point_id, first.lease_token, now=T0 + 1)
    second = storage.lease(study.id, "w2", now=T0 + 2)
    assert second is not None
    storage.reap_expired(now=T0 + 2 + LEASE_S + 1)
    third = storage.lease(study.id, "w3", now=T0 + 20)
    assert third is not None
    storage.finish(third.point_id, third.lease_token, "done", 1.0, now=T0 + 21)
    with storage.engine.connect() as conn:
        rows = conn.execute(select(LeaseRow.worker_id, LeaseRow.outcome, LeaseRow.attempt, LeaseRow.ended_at)
                            .where(LeaseRow.point_id == first.point_id).order_by(LeaseRow.id)).all()
    assert [tuple(r) for r in rows] == [("w1", "released", 0, T0 + 1), ("w2", "expired", 0, T0 + 2 + LEASE_S + 1),
                                        ("w3", "done", 1, T0 + 21)]


# -- finish and report -------------------------------------------------------------------------
def test_finish_is_idempotent_by_request_id(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 2)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    first = storage.finish(lease.point_id, lease.lease_token, "done", 0.3, request_id="req-1", now=T0 + 1)
    again = storage.finish(lease.point_id, lease.lease_token, "done", 0.3, request_id="req-1", now=T0 + 2)
    assert again.replayed and again.point == first.point
    different_loss = storage.finish(lease.point_id, lease.lease_token, "failed", None, request_id="req-1")
    assert different_loss.point.loss == 0.3 and different_loss.point.state == PointState.DONE
    with pytest.raises(StaleLeaseError):
        storage.finish(lease.point_id, lease.lease_token, "done", 0.4, request_id="req-2")
    other = storage.lease(study.id, "w", now=T0)
    assert other is not None
    with pytest.raises(ConflictError, match="req-1"):
        storage.finish(other.point_id, other.lease_token, "done", 0.1, request_id="req-1")
    counts = storage.counts(study.id)
    assert (counts.done, counts.running) == (1, 1)


def test_awaitable_lease_report_and_finish_answer_as_the_blocking_ones(storage: SQLStorage,
                                                                       make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 4)
    steps = 3

    async def worker_calls() -> None:
        leases = await asyncio.gather(*(storage.lease_async(study.id, f"w{i}", now=T0) for i in range(5)))
        granted = [lease for lease in leases if lease is not None]
        assert len({lease.point_id for lease in granted}) == 4 and leases.count(None) == 1
        await asyncio.gather(*(storage.report_async(lease.point_id, lease.lease_token, step, step / 10,
                                                    study_id=study.id)
                               for lease in granted for step in range(steps)))
        first = granted[0]
        with pytest.raises(StaleLeaseError):
            await storage.report_async(first.point_id, "not-the-token", 0, 0.0)
        with pytest.raises(InvalidValueError):
            await storage.report_async(first.point_id, first.lease_token, -1, 0.0)
        with pytest.raises(NotFoundError):
            await storage.finish_async(first.point_id, first.lease_token, "done", 0.5, study_id=study.id + 1)
        finished = await asyncio.gather(*(storage.finish_async(lease.point_id, lease.lease_token, "done", 0.5,
                                                               request_id=f"r{lease.point_id}")
                                          for lease in granted))
        assert [result.point.state for result in finished] == [PointState.DONE] * 4
        again = await storage.finish_async(first.point_id, first.lease_token, "failed", request_id=f"r{first.point_id}")
        assert again.replayed and again.point == finished[0].point
        assert await storage.lease_async(study.id, "late") is None

    asyncio.run(asyncio.wait_for(worker_calls(), ASYNC_TIMEOUT_S))
    assert storage.intermediate_values(study.id) == {
        point.id: {step: step / 10 for step in range(steps)} for point in storage.list_points(study.id)}
    assert storage.get_study(study.id).state == StudyState.COMPLETED


@pytest.mark.parametrize(("status", "loss"), [("done", None), ("done", math.nan), ("done", math.inf),
                                              ("done", "0.5"), ("pruned", math.nan), ("running", 1.0),
                                              ("new", 1.0), ("bogus", 1.0)])
def test_finish_rejects_invalid_results(storage: SQLStorage, make_task: MakeTask, status: str, loss: Any) -> None:
    study = new_study(storage, make_task, 1)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    with pytest.raises(InvalidValueError):
        storage.finish(lease.point_id, lease.lease_token, status, loss, request_id="r")
    assert storage.get_point(lease.point_id).state == PointState.RUNNING


def test_over_long_names_are_refused_alike_by_every_backend(storage: SQLStorage, make_task: MakeTask) -> None:
    too_long = "x" * 1000
    study = new_study(storage, make_task, 1)
    with pytest.raises(InvalidValueError, match="worker id"):
        storage.lease(study.id, too_long)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    with pytest.raises(InvalidValueError, match="request id"):
        storage.finish(lease.point_id, lease.lease_token, "done", 1.0, request_id=too_long)
    with pytest.raises(InvalidValueError, match="owner"):
        storage.create_study(too_long, make_task())
    with pytest.raises(InvalidValueError, match="user"):
        storage.create_token(too_long)


def test_zero_loss_is_a_real_loss(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    storage.finish(lease.point_id, lease.lease_token, "done", 0.0)
    assert storage.history(study.id) == [Observation({"x": 0.0}, 0.0, "done")]
    assert storage.best_point(study.id) is not None


def test_intermediate_values_one_per_step_last_write_wins(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 2)
    a = storage.lease(study.id, "w1", now=T0)
    b = storage.lease(study.id, "w2", now=T0)
    assert a is not None and b is not None
    for step, value in [(2, 0.8), (0, 1.0), (1, 0.9), (1, 0.9), (2, 0.7)]:
        storage.report(a.point_id, a.lease_token, step, value)
    storage.report(b.point_id, b.lease_token, 0, 2.0)
    curves = storage.intermediate_values(study.id)
    assert curves == {a.point_id: {0: 1.0, 1: 0.9, 2: 0.7}, b.point_id: {0: 2.0}}
    assert list(curves[a.point_id]) == [0, 1, 2]
    with pytest.raises(InvalidValueError):
        storage.report(a.point_id, a.lease_token, -1, 0.1)
    with pytest.raises(InvalidValueError):
        storage.report(a.point_id, a.lease_token, 3, math.nan)


# -- reading ------------------------------------------------------------------------------------
def test_the_shared_url_opens_the_same_data_without_migrating(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 3)
    reader = SQLStorage(storage.shared_url(), migrate=False)
    try:
        assert reader.history(study.id) == storage.history(study.id) and len(reader.history(study.id)) == 3
    finally:
        reader.close()


def test_an_in_memory_database_has_no_shared_url() -> None:
    with SQLStorage("sqlite://") as memory:
        assert memory.shared_url() is None


def test_history_maps_states_for_steering(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 5)
    leases = [storage.lease(study.id, f"w{i}", now=T0) for i in range(4)]
    assert all(lease is not None for lease in leases)
    done, pruned, failed, _running = leases  # the fifth point stays NEW
    storage.finish(done.point_id, done.lease_token, "done", 0.5)  # type: ignore[union-attr]
    storage.finish(pruned.point_id, pruned.lease_token, "pruned", 0.9)  # type: ignore[union-attr]
    storage.finish(failed.point_id, failed.lease_token, "failed", 0.1)  # type: ignore[union-attr]
    history = storage.history(study.id)
    assert [(o.state, o.loss) for o in history] == [("done", 0.5), ("pruned", 0.9), ("failed", None),
                                                    ("pending", None), ("pending", None)]
    assert [o.params["x"] for o in history] == sorted(o.params["x"] for o in history)


@pytest.mark.parametrize(("direction", "expected"), [("minimize", 0.1), ("maximize", 0.9)])
def test_best_point_respects_direction(storage: SQLStorage, make_task: MakeTask, direction: str,
                                       expected: float) -> None:
    study = new_study(storage, make_task, 6, hepopt={"direction": direction})
    assert storage.best_point(study.id) is None
    results = [("done", 0.5), ("done", expected), ("done", expected), ("pruned", 0.0), ("pruned", 2.0),
               ("failed", None)]
    numbers = []
    for status, loss in results:
        lease = storage.lease(study.id, "w", now=T0)
        assert lease is not None
        numbers.append(lease.number)
        storage.finish(lease.point_id, lease.lease_token, status, loss)
    best = storage.best_point(study.id)
    assert best is not None and best.loss == expected and best.number == numbers[1]


def test_counts_by_state(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 4, maxPoints=10)
    running = storage.lease(study.id, "w", now=T0)
    done = storage.lease(study.id, "w", now=T0)
    assert running is not None and done is not None
    storage.finish(done.point_id, done.lease_token, "done", 1.0)
    counts = storage.counts(study.id)
    assert (counts.new, counts.running, counts.done, counts.pruned, counts.failed) == (2, 1, 1, 0, 0)
    assert (counts.total, counts.unevaluated, counts.finished, counts.evaluation_jobs) == (4, 3, 1, 2)


def test_progress_tells_what_counts_tells_without_splitting_final_points(storage: SQLStorage,
                                                                         make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 6, maxPoints=10)
    leases = [storage.lease(study.id, f"w{i}", now=T0) for i in range(5)]
    for lease, status in zip(leases, ("done", "pruned", "failed"), strict=False):
        storage.finish(lease.point_id, lease.lease_token, status, 1.0)  # type: ignore[union-attr]
    storage.release(leases[3].point_id, leases[3].lease_token)  # type: ignore[union-attr]
    counts, progress = storage.counts(study.id), storage.progress(study.id)
    assert (progress.new, progress.running, progress.total, progress.evaluation_jobs) == (2, 1, 6, 5)
    assert (progress.new, progress.running, progress.total, progress.finished, progress.unevaluated) == (
        counts.new, counts.running, counts.total, counts.finished, counts.unevaluated)
    with pytest.raises(NotFoundError):
        storage.progress(study.id + 1000)


# -- studies, owners, steering ------------------------------------------------------------------
def test_owner_isolation(storage: SQLStorage, make_task: MakeTask) -> None:
    alice = new_study(storage, make_task, 1, owner="alice")
    bob = new_study(storage, make_task, 1, owner="bob")
    assert storage.get_study(alice.id, owner="alice").id == alice.id
    with pytest.raises(NotFoundError) as foreign:
        storage.get_study(alice.id, owner="bob")
    with pytest.raises(NotFoundError) as missing:
        storage.get_study(alice.id + bob.id + 100, owner="bob")
    assert str(foreign.value).replace(str(alice.id), "N") == str(missing.value).replace(
        str(alice.id + bob.id + 100), "N")
    assert [s.id for s in storage.list_studies("alice")] == [alice.id]
    assert [s.id for s in storage.list_studies("carol")] == []
    assert {s.id for s in storage.list_studies()} == {alice.id, bob.id}
    with pytest.raises(NotFoundError):
        storage.cancel_study(alice.id, owner="bob")
    with pytest.raises(NotFoundError):
        storage.create_token("bob", study_id=alice.id)
    assert storage.get_study(alice.id).state == StudyState.RUNNING


def test_missing_ids_raise_not_found(storage: SQLStorage) -> None:
    calls: list[Callable[[], object]] = [
        lambda: storage.get_study(404), lambda: storage.counts(404), lambda: storage.history(404),
        lambda: storage.lease(404, "w"), lambda: storage.add_points(404, [{"x": 0.1}]),
        lambda: storage.get_point(404), lambda: storage.heartbeat(404, "t"),
        lambda: storage.finish(404, "t", "done", 1.0), lambda: storage.put_checkpoint_meta(404, "p", "0" * 64, 1),
        lambda: storage.set_study_state(404, StudyState.FAILED),
    ]
    for call in calls:
        with pytest.raises(NotFoundError):
            call()


def test_cancel_stops_leasing_but_running_points_may_finish(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 3)
    lease = storage.lease(study.id, "w", now=T0)
    assert lease is not None
    cancelled = storage.cancel_study(study.id, owner="alice", now=T0 + 1)
    assert cancelled.state == StudyState.CANCELLED
    assert storage.cancel_study(study.id, now=T0 + 2).state == StudyState.CANCELLED
    assert storage.lease(study.id, "w", now=T0 + 2) is None
    assert storage.heartbeat(lease.point_id, lease.lease_token, now=T0 + 3).stop
    storage.finish(lease.point_id, lease.lease_token, "done", 0.4, now=T0 + 4)
    assert storage.get_study(study.id).state == StudyState.CANCELLED
    assert [s.id for s in storage.list_studies(state=StudyState.CANCELLED)] == [study.id]
    assert storage.list_studies(state=StudyState.RUNNING) == []


def test_set_study_state_with_message(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    failed = storage.set_study_state(study.id, StudyState.FAILED, "steering failed: boom", now=T0 + 1)
    assert failed.state == StudyState.FAILED and failed.message == "steering failed: boom"
    assert failed.updated_at == T0 + 1
    assert storage.lease(study.id, "w") is None


def test_one_steering_run_at_a_time(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1, maxPoints=5)
    stale_s = 60.0
    assert storage.get_study(study.id).steering_status == SteeringStatus.IDLE
    assert storage.begin_steering(study.id, stale_s, now=T0)
    assert storage.get_study(study.id).steering_status == SteeringStatus.RUNNING
    assert not storage.begin_steering(study.id, stale_s, now=T0 + 1)
    assert storage.begin_steering(study.id, stale_s, now=T0 + stale_s + 1), "a crashed run is taken over"
    failed = storage.end_steering(study.id, error="steering failed: no space left", now=T0 + 70)
    assert failed.steering_status == SteeringStatus.FAILED and failed.steering_error == "steering failed: no space left"
    assert storage.begin_steering(study.id, stale_s, now=T0 + 80)
    assert storage.end_steering(study.id, now=T0 + 81).steering_status == SteeringStatus.IDLE
    storage.cancel_study(study.id)
    assert not storage.begin_steering(study.id, stale_s, now=T0 + 90)


def test_a_renewed_steering_claim_is_not_taken_over(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1, maxPoints=5)
    stale_s = 30.0
    assert storage.begin_steering(study.id, stale_s, now=T0)
    storage.renew_steering(study.id, now=T0 + 25)
    assert not storage.begin_steering(study.id, stale_s, now=T0 + 50), "a long but live run keeps its claim"
    assert storage.begin_steering(study.id, stale_s, now=T0 + 56), "an unrenewed claim is taken over"
    storage.end_steering(study.id, now=T0 + 57)
    storage.renew_steering(study.id, now=T0 + 58)
    assert storage.get_study(study.id).steering_status == SteeringStatus.IDLE, "renewing never creates a claim"


# -- tokens -----------------------------------------------------------------------------------
def _database_text(storage: SQLStorage) -> str:
    """Every value of every table, as text: what someone with a copy of the database would see."""
    dump = []
    with storage.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            dump += [repr(tuple(row)) for row in conn.execute(text(f'SELECT * FROM "{table}"'))]
    return "\n".join(dump)


def test_tokens_are_stored_hashed(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    user_secret = storage.create_token("alice", now=T0)
    worker_secret = storage.create_token("alice", study_id=study.id, expires_at=T0 + HOUR_S, now=T0)
    assert user_secret != worker_secret and len(user_secret) > 40
    dump = _database_text(storage)
    for secret in (user_secret, worker_secret):
        assert secret not in dump and hash_secret(secret) in dump
    user = storage.verify_token(user_secret, now=T0 + 1)
    assert user is not None and (user.user, user.study_id, user.expires_at) == ("alice", None, None)
    worker = storage.verify_token(worker_secret, now=T0 + 1)
    assert worker is not None and (worker.user, worker.study_id) == ("alice", study.id)


def test_token_expiry_revocation_and_unknown_tokens(storage: SQLStorage) -> None:
    secret = storage.create_token("alice", expires_at=T0 + HOUR_S, now=T0)
    assert storage.verify_token(secret, now=T0 + HOUR_S - 1) is not None
    assert storage.verify_token(secret, now=T0 + HOUR_S) is None
    assert storage.verify_token("hpo_not-a-token", now=T0) is None
    assert storage.verify_token(secret[:-1], now=T0) is None
    assert storage.revoke_token(secret)
    assert not storage.revoke_token(secret)
    assert storage.verify_token(secret, now=T0) is None


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_metadata(storage: SQLStorage, make_task: MakeTask) -> None:
    study = new_study(storage, make_task, 1)
    (point,) = storage.list_points(study.id)
    assert storage.get_checkpoint_meta(point.id) is None
    big = 5 * 2**31
    first = storage.put_checkpoint_meta(point.id, "ckpt/1/a.tar", "a" * 64, big, now=T0)
    assert storage.get_checkpoint_meta(point.id) == first and first.size == big
    second = storage.put_checkpoint_meta(point.id, "ckpt/1/b.tar", "b" * 64, 7, now=T0 + 1)
    assert storage.get_checkpoint_meta(point.id) == second
    assert (second.path, second.sha256, second.size, second.updated_at) == ("ckpt/1/b.tar", "b" * 64, 7, T0 + 1)
    for bad_sha, bad_size in [("xyz", 1), ("A" * 64, 1), ("a" * 64, -1)]:
        with pytest.raises(InvalidValueError):
            storage.put_checkpoint_meta(point.id, "p", bad_sha, bad_size)
    assert storage.get_checkpoint_meta(point.id) == second
