"""The steering scheduler driven by hand (``tick`` without the thread) on a real SQLite storage."""

import json
import sys
import time

import pytest

from hepopt.task import parse_task
from orchestrator.config import Settings
from orchestrator.scheduler import Scheduler, steering_need
from orchestrator.steering import idds_input
from orchestrator.storage.base import PointState, StudyState
from orchestrator.storage.sql import SQLStorage

SPACE = {"x": {"method": "uniform", "dimension": {"low": 0, "high": 1}}}
GRID = {"n": {"method": "categorical", "dimension": {"categories": [1, 2, 3]}}}


@pytest.fixture
def storage(tmp_path):
    with SQLStorage(f"sqlite:///{tmp_path / 'scheduler.db'}") as store:
        yield store


def make(storage, tmp_path, **task):
    doc = {"evaluationExec": "train", "searchSpace": SPACE, "hepopt": {"method": "random", "seed": 3}, **task}
    study = storage.create_study("alice", parse_task(doc))
    settings = Settings(data_dir=tmp_path, steering_backoff=3600.0)
    return study.id, Scheduler(storage, settings)


def finish_all(storage, study_id, loss=1.0):
    while (lease := storage.lease(study_id, "w")) is not None:
        storage.finish(lease.point_id, lease.lease_token, PointState.DONE, loss)


def tell(storage, scheduler, study_id, loss=0.5):
    """What the tell route does: finish one point and poke the scheduler."""
    lease = storage.lease(study_id, "w")
    storage.finish(lease.point_id, lease.lease_token, PointState.DONE, loss)
    scheduler.poke(study_id)


def test_steering_respects_points_per_iteration_min_unevaluated_and_max_points(storage, tmp_path):
    sid, scheduler = make(storage, tmp_path, maxPoints=5, nPointsPerIteration=2, minUnevaluatedPoints=3)
    scheduler.tick()
    assert storage.counts(sid).total == 2  # one iteration: nPointsPerIteration points
    scheduler.tick()
    assert storage.counts(sid).total == 4  # still below minUnevaluatedPoints, so once more
    scheduler.tick()
    assert storage.counts(sid).total == 4  # 4 unevaluated >= 3: nothing to do
    tell(storage, scheduler, sid)
    tell(storage, scheduler, sid)
    scheduler.tick()
    assert storage.counts(sid).total == 5  # maxPoints caps the iteration at one point
    finish_all(storage, sid)
    scheduler.poke(sid)
    scheduler.tick()
    assert storage.counts(sid).total == 5
    assert storage.get_study(sid).state == StudyState.COMPLETED


def test_parallel_evaluation_sets_the_floor_when_min_unevaluated_is_zero(storage, tmp_path):
    sid, _ = make(storage, tmp_path, maxPoints=10, nParallelEvaluation=3, nPointsPerIteration=2)
    study = storage.get_study(sid)
    assert steering_need(study, storage.progress(sid)) == 2
    storage.add_points(sid, [{"x": 0.1}, {"x": 0.2}, {"x": 0.3}], origin="user")
    assert steering_need(study, storage.progress(sid)) == 0


def test_an_exhausted_space_completes_the_study(storage, tmp_path):
    sid, scheduler = make(storage, tmp_path, searchSpace=GRID, maxPoints=10, nPointsPerIteration=5)
    scheduler.tick()
    assert storage.counts(sid).total == 3
    finish_all(storage, sid)
    scheduler.poke(sid)
    scheduler.tick()
    study = storage.get_study(sid)
    assert study.state == StudyState.COMPLETED and "exhausted" in study.message


def test_steering_exec_gets_the_idds_files(storage, tmp_path):
    command = ("python -m steering_container generate --infile %IN --outfile %OUT --n_point %NUM_POINTS "
               "--max_point %MAX_POINTS --method random")
    sid, scheduler = make(storage, tmp_path, steeringExec=command, maxPoints=3, nPointsPerIteration=5)
    storage.add_points(sid, [{"x": 0.5}], origin="user")
    lease = storage.lease(sid, "w")
    storage.finish(lease.point_id, lease.lease_token, PointState.DONE, 0.0)
    doc = idds_input(storage.get_study(sid).task, storage.history(sid))
    assert doc == {"points": [[{"x": 0.5}, 0.0]], "opt_space": SPACE}
    scheduler.tick()
    points = storage.list_points(sid)
    assert len(points) == 3 and [p.origin for p in points] == ["user", "steering", "steering"]
    assert storage.get_study(sid).steering_error is None


def test_failing_steering_exec_is_tried_three_times_and_loses_nothing(storage, tmp_path):
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "fail.py"
    script.write_text("import json, sys\nopen(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')\n"
                      "print('no optimiser here', file=sys.stderr)\nsys.exit(2)\n")
    command = f"{sys.executable} {script} {log} %IN %OUT %NUM_POINTS %MAX_POINTS"
    sid, scheduler = make(storage, tmp_path, steeringExec=command, maxPoints=4, nParallelEvaluation=2)
    kept = storage.add_points(sid, [{"x": 0.25}], origin="user")
    scheduler.tick()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 3 and calls[0][2:] == ["2", "4"] and calls[0][0].endswith("idds_input.json")
    study = storage.get_study(sid)
    assert study.steering_error == "steering failed: exit code 2: no optimiser here"
    assert study.steering_status.value == "failed" and study.state == StudyState.RUNNING
    assert storage.list_points(sid) == kept
    scheduler.poke(sid)
    scheduler.tick()
    assert len(log.read_text().splitlines()) == 3  # backing off: a broken command is not hammered
    lease = storage.lease(sid, "w")
    assert storage.finish(lease.point_id, lease.lease_token, PointState.DONE, 0.1).point.loss == 0.1


def test_a_study_whose_evaluation_jobs_are_used_up_is_completed(storage, tmp_path):
    sid, scheduler = make(storage, tmp_path, maxPoints=3, maxEvaluationJobs=1)
    scheduler.tick()
    lease = storage.lease(sid, "w")
    storage.release(lease.point_id, lease.lease_token)
    scheduler.poke(sid)
    scheduler.tick()
    study = storage.get_study(sid)
    assert study.state == StudyState.COMPLETED and "maxEvaluationJobs" in study.message


def test_the_thread_steers_at_once_when_poked(storage, tmp_path):
    settings = Settings(data_dir=tmp_path, steering_interval=3600.0, reaper_interval=3600.0)
    scheduler = Scheduler(storage, settings)
    scheduler.start()
    try:
        time.sleep(0.2)  # the first sweep is over; the next one is an hour away
        sid, _ = make(storage, tmp_path, maxPoints=2)
        scheduler.poke(sid)
        deadline = time.monotonic() + 10
        while storage.counts(sid).total < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert storage.counts(sid).total == 2
    finally:
        scheduler.stop()


def test_stopping_kills_a_hanging_steering_command_and_releases_the_claim(storage, tmp_path):
    started = tmp_path / "started"
    script = tmp_path / "hang.py"
    script.write_text("import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n")
    sid, _ = make(storage, tmp_path, steeringExec=f"{sys.executable} {script} {started} %IN %OUT")
    scheduler = Scheduler(storage, Settings(data_dir=tmp_path, steering_interval=3600.0))
    scheduler.start()
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert storage.get_study(sid).steering_status.value == "running"
    began = time.monotonic()
    scheduler.stop()
    assert time.monotonic() - began < 5
    study = storage.get_study(sid)
    assert study.steering_status.value == "idle" and study.steering_error is None
