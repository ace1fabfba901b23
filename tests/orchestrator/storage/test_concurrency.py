"""Many workers on one database: no "database is locked", no point held by two workers at once, and
the study ends with exactly maxPoints finished points.

Workers lease, heartbeat, report, and then finish or (sometimes) release their point, as real ones do
at walltime. Every claim is checked afterwards from the database's own lease log, not from what the
workers believe.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select

from hepopt.task import Task
from orchestrator.storage import PointState, StudyState
from orchestrator.storage.models import LeaseRow, PointRow
from orchestrator.storage.sql import SQLStorage

SQLITE_THREADS = 64
SQLITE_THREAD_POINTS = 96
PROCESSES = 4
THREADS_PER_PROCESS = 3
PROCESS_POINTS = 64
POSTGRES_THREADS = 16
POSTGRES_POINTS = 64
#: A fraction of leases is given back (walltime); the budget leaves room for those extra jobs.
RELEASE_FRACTION = 0.1
JOBS_PER_POINT = 3
IDLE_S = 0.01
#: Long enough that nothing expires during the test: every lease ends by finish or release.
LEASE_S = 3600.0

Tally = tuple[int, int]


def work_until_done(storage: SQLStorage, study_id: int, worker_id: str) -> Tally:
    """Lease and evaluate points until the study is over; (finished, released) by this worker."""
    rng = random.Random(worker_id)
    finished = released = 0
    while True:
        lease = storage.lease(study_id, worker_id)
        if lease is None:
            if storage.get_study(study_id).state != StudyState.RUNNING:
                return finished, released
            time.sleep(IDLE_S)
            continue
        storage.heartbeat(lease.point_id, lease.lease_token)
        storage.report(lease.point_id, lease.lease_token, 0, rng.random())
        if rng.random() < RELEASE_FRACTION:
            storage.release(lease.point_id, lease.lease_token)
            released += 1
            continue
        result = storage.finish(lease.point_id, lease.lease_token, PointState.DONE, rng.random(),
                                request_id=f"{worker_id}/{lease.point_id}")
        assert not result.replayed
        finished += 1


def start_study(storage: SQLStorage, make_task: Callable[..., Task], n_points: int) -> int:
    task = make_task(maxPoints=n_points, maxEvaluationJobs=JOBS_PER_POINT * n_points,
                     hepopt={"leaseSeconds": LEASE_S})
    study = storage.create_study("alice", task)
    storage.add_points(study.id, [{"x": i / (n_points + 1)} for i in range(n_points)])
    return study.id


def assert_consistent(storage: SQLStorage, study_id: int, n_points: int, tallies: list[Tally]) -> None:
    """Check the outcome from the database: leases never overlap and every point finished once."""
    finished = sum(t[0] for t in tallies)
    released = sum(t[1] for t in tallies)
    assert finished == n_points
    study = storage.get_study(study_id)
    assert study.state == StudyState.COMPLETED
    with storage.engine.connect() as conn:
        states = conn.execute(select(PointRow.state).where(PointRow.study_id == study_id)).scalars().all()
        leases = conn.execute(select(LeaseRow.point_id, LeaseRow.started_at, LeaseRow.ended_at, LeaseRow.outcome)
                              .where(LeaseRow.study_id == study_id).order_by(LeaseRow.id)).all()
    assert states == [PointState.DONE.value] * n_points
    assert len(leases) == study.evaluation_jobs == finished + released
    by_point: dict[int, list[tuple[float, float | None, str | None]]] = {}
    for point_id, started, ended, outcome in leases:
        by_point.setdefault(point_id, []).append((started, ended, outcome))
    assert len(by_point) == n_points
    for history in by_point.values():
        outcomes = [outcome for _, _, outcome in history]
        assert outcomes == ["released"] * (len(history) - 1) + ["done"]
        for (_, ended, _), (next_started, _, _) in itertools.pairwise(history):
            assert ended is not None and ended <= next_started, "a point was leased before its last lease ended"
    assert sum(len(h) - 1 for h in by_point.values()) == released


def test_sqlite_many_threads(tmp_path: Path, make_task: Callable[..., Task]) -> None:
    with SQLStorage(f"sqlite:///{tmp_path / 'hepopt.db'}") as storage:
        study_id = start_study(storage, make_task, SQLITE_THREAD_POINTS)
        with ThreadPoolExecutor(SQLITE_THREADS) as pool:
            futures = [pool.submit(work_until_done, storage, study_id, f"t{i}") for i in range(SQLITE_THREADS)]
            tallies = [future.result() for future in futures]
        assert_consistent(storage, study_id, SQLITE_THREAD_POINTS, tallies)


def _process_worker(url: str, study_id: int, index: int) -> list[Tally]:
    """One worker process: its own storage (its own migration check), several threads in it."""
    with SQLStorage(url) as storage, ThreadPoolExecutor(THREADS_PER_PROCESS) as pool:
        futures = [pool.submit(work_until_done, storage, study_id, f"p{index}t{i}") for i in range(THREADS_PER_PROCESS)]
        return [future.result() for future in futures]


def test_sqlite_many_processes(tmp_path: Path, make_task: Callable[..., Task]) -> None:
    url = f"sqlite:///{tmp_path / 'hepopt.db'}"
    with SQLStorage(url) as storage:
        study_id = start_study(storage, make_task, PROCESS_POINTS)
    with multiprocessing.get_context("fork").Pool(PROCESSES) as pool:
        per_process = pool.starmap(_process_worker, [(url, study_id, i) for i in range(PROCESSES)])
    with SQLStorage(url) as storage:
        assert_consistent(storage, study_id, PROCESS_POINTS, [t for tallies in per_process for t in tallies])


def test_postgres_many_threads(postgres_clean_url: str, make_task: Callable[..., Task]) -> None:
    with SQLStorage(postgres_clean_url) as storage:
        study_id = start_study(storage, make_task, POSTGRES_POINTS)
        with ThreadPoolExecutor(POSTGRES_THREADS) as pool:
            futures = [pool.submit(work_until_done, storage, study_id, f"t{i}") for i in range(POSTGRES_THREADS)]
            tallies = [future.result() for future in futures]
        assert_consistent(storage, study_id, POSTGRES_POINTS, tallies)


# -- the job budget and cancellation against concurrent leases ---------------------------------
BUDGET_THREADS = 16
BUDGET_POINTS = 24
BUDGET_JOBS = 40
#: A cancelled study must refuse every lease whose transaction starts after cancel_study returned.
AFTER_CANCEL_S = 0.3


def lease_and_give_back(storage: SQLStorage, study_id: int, worker_id: str, stop: threading.Event) -> int:
    """Lease and release at once, until leasing is refused (or ``stop``): every lease spends one job."""
    granted = 0
    while not stop.is_set():
        lease = storage.lease(study_id, worker_id)
        if lease is None:
            if storage.get_study(study_id).state != StudyState.RUNNING:
                return granted
            continue
        granted += 1
        storage.release(lease.point_id, lease.lease_token)
    return granted


def lease_log_size(storage: SQLStorage, study_id: int) -> int:
    with storage.engine.connect() as conn:
        return len(conn.execute(select(LeaseRow.id).where(LeaseRow.study_id == study_id)).all())


def test_job_budget_holds_under_concurrent_leases(storage: SQLStorage, make_task: Callable[..., Task]) -> None:
    """Many leasers race for the last jobs of maxEvaluationJobs: exactly that many leases exist."""
    task = make_task(maxPoints=BUDGET_POINTS, maxEvaluationJobs=BUDGET_JOBS, hepopt={"leaseSeconds": LEASE_S})
    study_id = storage.create_study("alice", task).id
    storage.add_points(study_id, [{"x": i / (BUDGET_POINTS + 1)} for i in range(BUDGET_POINTS)])
    stop = threading.Event()
    with ThreadPoolExecutor(BUDGET_THREADS) as pool:
        futures = [pool.submit(lease_and_give_back, storage, study_id, f"t{i}", stop) for i in range(BUDGET_THREADS)]
        granted = sum(future.result() for future in futures)
    study = storage.get_study(study_id)
    assert granted == study.evaluation_jobs == lease_log_size(storage, study_id) == BUDGET_JOBS
    assert study.state == StudyState.COMPLETED and "maxEvaluationJobs" in (study.message or "")


def test_no_lease_starts_after_cancel(storage: SQLStorage, make_task: Callable[..., Task]) -> None:
    """Leases racing with cancel_study: none is granted once the cancellation has returned."""
    task = make_task(maxPoints=BUDGET_POINTS, maxEvaluationJobs=100 * BUDGET_POINTS, hepopt={"leaseSeconds": LEASE_S})
    study_id = storage.create_study("alice", task).id
    storage.add_points(study_id, [{"x": i / (BUDGET_POINTS + 1)} for i in range(BUDGET_POINTS)])
    stop = threading.Event()
    with ThreadPoolExecutor(BUDGET_THREADS) as pool:
        futures = [pool.submit(lease_and_give_back, storage, study_id, f"t{i}", stop) for i in range(BUDGET_THREADS)]
        while lease_log_size(storage, study_id) < BUDGET_THREADS:
            time.sleep(IDLE_S)
        storage.cancel_study(study_id)
        after_cancel = lease_log_size(storage, study_id)
        time.sleep(AFTER_CANCEL_S)
        stop.set()
        granted = sum(future.result() for future in futures)
    assert lease_log_size(storage, study_id) == after_cancel == granted == storage.get_study(study_id).evaluation_jobs
