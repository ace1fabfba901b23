"""In-process steering made in the scheduler's proposal processes: the same points as in the calling
thread, a timeout and a stop that end the process, refusals carried back as messages."""

import threading
from pathlib import Path

import pytest

from hepopt.task import parse_task
from orchestrator.steering import ProposalProcesses, SteeringCancelled, SteeringFailure, StoredHistory, steer
from orchestrator.storage.base import PointState
from orchestrator.storage.sql import SQLStorage
from steering_container.api import Observation

#: Long enough for a proposal process to start and answer on a loaded machine.
ANSWER_TIMEOUT_S = 120.0
#: Shorter than any process start: the proposal cannot have answered yet.
TOO_SHORT_S = 0.001


@pytest.fixture
def processes():
    pool = ProposalProcesses(2)
    yield pool
    pool.close()


def history(n):
    return [Observation({"x": i / n, "n": 1 + i % 4}, float(i), "done") for i in range(n)]


def _process_ids(pool):
    return [worker.pid for process_pool in pool._all for worker in process_pool._pool]


def test_a_proposal_in_a_process_equals_one_in_the_calling_thread(processes, make_task):
    task = parse_task(make_task(hepopt={"method": "tpe", "seed": 3}))
    here = steer(task, history(30), 5, ANSWER_TIMEOUT_S)
    there = steer(task, history(30), 5, ANSWER_TIMEOUT_S, processes=processes)
    assert there == here and len(there) == 5


def test_a_proposal_process_reads_a_stored_history_itself(processes, make_task, tmp_path):
    task = parse_task(make_task(hepopt={"method": "tpe", "seed": 3}, maxPoints=100))
    with SQLStorage(f"sqlite:///{tmp_path / 'hepopt.db'}") as storage:
        study = storage.create_study("alice", task)
        storage.add_points(study.id, [observation.params for observation in history(30)])
        while (lease := storage.lease(study.id, "w")) is not None:
            storage.finish(lease.point_id, lease.lease_token, PointState.DONE, float(lease.number))
        assert storage.history(study.id) == history(30)
        stored = StoredHistory(storage.shared_url(), study.id)
        there = steer(task, stored, 5, ANSWER_TIMEOUT_S, processes=processes)
    assert there == steer(task, history(30), 5, ANSWER_TIMEOUT_S) and len(there) == 5


def test_runs_reuse_one_process_unless_they_overlap(processes, make_task):
    task = parse_task(make_task())
    for _ in range(3):
        steer(task, history(10), 2, ANSWER_TIMEOUT_S, processes=processes)
    assert len(_process_ids(processes)) == 1


def test_a_refusal_comes_back_as_the_steering_message(processes, make_task):
    task = parse_task(make_task(hepopt={"method": "nevergrad:NoSuchOptimizer"}))
    with pytest.raises(SteeringFailure, match="NoSuchOptimizer"):
        steer(task, history(3), 2, ANSWER_TIMEOUT_S, processes=processes)


def test_a_timeout_fails_the_run_and_ends_its_process(processes, make_task):
    task = parse_task(make_task())
    with pytest.raises(SteeringFailure, match="timed out"):
        steer(task, history(10), 2, TOO_SHORT_S, processes=processes)
    assert _process_ids(processes) == []
    assert steer(task, history(10), 2, ANSWER_TIMEOUT_S, processes=processes)  # a fresh process serves the next


def test_a_stopping_server_cancels_the_run_and_ends_every_process(processes, make_task):
    task = parse_task(make_task())
    steer(task, history(10), 2, ANSWER_TIMEOUT_S, processes=processes)
    started = _process_ids(processes)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SteeringCancelled):
        steer(task, history(10), 2, ANSWER_TIMEOUT_S, cancel=cancel, processes=processes)
    processes.close()
    assert started and not any(Path(f"/proc/{pid}").exists() for pid in started)


def test_a_run_asked_for_after_close_is_cancelled_not_broken(processes, make_task):
    task = parse_task(make_task())
    steer(task, history(10), 2, ANSWER_TIMEOUT_S, processes=processes)
    processes.close()
    with pytest.raises(SteeringCancelled):
        steer(task, history(10), 2, ANSWER_TIMEOUT_S, processes=processes)
