"""Leases, reports and finishes written in batches (group commit): each caller still gets its own
answer, durably.

The storage tests run on both backends through the ``storage`` fixture; the GroupCommit tests need none.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from hepopt.task import Task
from orchestrator.storage import ConflictError, FinishResult, Lease, NotFoundError, PointState, StaleLeaseError
from orchestrator.storage.group_commit import GroupCommit, Pending
from orchestrator.storage.sql import SQLStorage

THREADS = 16
POINTS = 4
STEPS = 8
#: How long the first batch holds the writer, so that the other callers queue behind it.
RELEASE_AFTER_S = 0.1
QUEUE_POLL_S = 0.005
QUEUE_TIMEOUT_S = 30.0


def test_concurrent_reports_are_all_stored_and_each_stale_one_refused(storage: SQLStorage,
                                                                      make_task: Callable[..., Task]) -> None:
    study = storage.create_study("alice", make_task(maxPoints=POINTS + 1))
    storage.add_points(study.id, [{"x": float(i)} for i in range(POINTS + 1)])
    leases = [storage.lease(study.id, f"w{i}") for i in range(POINTS + 1)]
    finished = leases.pop()
    storage.finish(finished.point_id, finished.lease_token, "done", 1.0)
    calls = [(lease, step) for lease in leases for step in range(STEPS)]

    def report(call: tuple) -> None:
        lease, step = call
        storage.report(lease.point_id, lease.lease_token, step, step / 10, study_id=study.id)

    def stale(step: int) -> BaseException | None:
        try:
            storage.report(finished.point_id, finished.lease_token, step, 0.0)
        except StaleLeaseError as exc:
            return exc
        return None

    with ThreadPoolExecutor(THREADS) as pool:
        refused = [pool.submit(stale, step) for step in range(STEPS)]
        list(pool.map(report, calls))
    assert all(isinstance(future.result(), StaleLeaseError) for future in refused)
    curves = storage.intermediate_values(study.id)
    assert curves == {lease.point_id: {step: step / 10 for step in range(STEPS)} for lease in leases}
    with pytest.raises(NotFoundError):
        storage.report(leases[0].point_id, leases[0].lease_token, 0, 0.0, study_id=study.id + 1)


def test_group_commit_batches_waiters_and_keeps_errors_per_item() -> None:
    batches: list[list[int]] = []
    release = threading.Event()

    def write(batch: list[Pending[int]]) -> None:
        release.wait()  # the first batch holds the writer while the others queue
        batches.append([pending.item for pending in batch])
        for pending in batch:
            if pending.item < 0:
                pending.error = ValueError(pending.item)

    group = GroupCommit(write)
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(group.submit, item) for item in range(-1, THREADS - 1)]
        threading.Timer(RELEASE_AFTER_S, release.set).start()
        errors = [future.exception() for future in futures]
    assert isinstance(errors[0], ValueError) and not any(errors[1:])
    assert sorted(item for batch in batches for item in batch) == list(range(-1, THREADS - 1))
    assert len(batches) < THREADS


def test_group_commit_fails_the_whole_batch_when_the_transaction_fails() -> None:
    def write(_batch: list[Pending[int]]) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        GroupCommit(write).submit(1)


def test_coroutines_are_written_together_by_the_writer_thread() -> None:
    batches: list[list[int]] = []
    writers: set[str] = set()
    release = threading.Event()

    def write(batch: list[Pending[int]]) -> None:
        release.wait()
        writers.add(threading.current_thread().name)
        batches.append([pending.item for pending in batch])
        for pending in batch:
            if pending.item < 0:
                pending.error = ValueError(pending.item)
            else:
                pending.result = pending.item * 10

    group = GroupCommit(write)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        calls = asyncio.gather(*(group.submit_async(item) for item in range(-1, THREADS - 1)),
                               return_exceptions=True)
        loop.call_later(RELEASE_AFTER_S, release.set)
        return await asyncio.wait_for(calls, QUEUE_TIMEOUT_S)

    try:
        outcomes = asyncio.run(main())
    finally:
        group.close()
    assert isinstance(outcomes[0], ValueError)
    assert outcomes[1:] == [item * 10 for item in range(THREADS - 1)]
    assert sorted(item for batch in batches for item in batch) == list(range(-1, THREADS - 1))
    assert len(batches) <= 2, "the items queued behind the first batch were not written as one"
    assert writers == {"hepopt-group-commit"}
    assert group._writer is None, "close() did not stop the writer thread"


def test_threads_and_coroutines_share_one_queue_and_never_write_at_once() -> None:
    written: list[int] = []
    in_write = threading.Lock()

    def write(batch: list[Pending[int]]) -> None:
        assert in_write.acquire(blocking=False), "two batches were written at the same time"
        try:
            time.sleep(0.001)
            written.extend(pending.item for pending in batch)
            for pending in batch:
                pending.result = -pending.item
        finally:
            in_write.release()

    group = GroupCommit(write)
    per_kind = 200

    async def coroutines() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(group.submit_async(item) for item in range(per_kind))),
                                      QUEUE_TIMEOUT_S)

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            threaded = pool.map(group.submit, range(per_kind, 2 * per_kind))
            awaited = asyncio.run(coroutines())
            threaded = list(threaded)
    finally:
        group.close()
    assert awaited == [-item for item in range(per_kind)]
    assert threaded == [-item for item in range(per_kind, 2 * per_kind)]
    assert sorted(written) == list(range(2 * per_kind)), "an item was lost or written twice"


def test_a_failed_batch_fails_every_coroutine_in_it() -> None:
    def write(_batch: list[Pending[int]]) -> None:
        raise RuntimeError("disk full")

    group = GroupCommit(write)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            asyncio.run(asyncio.wait_for(group.submit_async(1), QUEUE_TIMEOUT_S))
    finally:
        group.close()


def in_one_batch(storage: SQLStorage, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` (storage writes) concurrently so that they reach the group commit as one batch.
    Each call's result, or the exception it raised."""
    writes = storage._writes
    sizes: list[int] = []
    write_batch = writes.write_batch

    def recording(batch: list[Pending[Any]]) -> None:
        sizes.append(len(batch))
        write_batch(batch)

    def outcome(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:
            return exc

    writes.write_batch = recording
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            with writes.held():
                futures = [pool.submit(outcome, call) for call in calls]
                deadline = time.monotonic() + QUEUE_TIMEOUT_S
                while writes.queued < len(calls):
                    assert time.monotonic() < deadline, "not every call reached the group commit"
                    time.sleep(QUEUE_POLL_S)
            results = [future.result() for future in futures]
    finally:
        writes.write_batch = write_batch
    assert sizes == [len(calls)], "the calls were not written as one batch"
    return results


def test_one_batch_answers_each_write_on_its_own(storage: SQLStorage, make_task: Callable[..., Task]) -> None:
    study = storage.create_study("alice", make_task(maxPoints=4))
    storage.add_points(study.id, [{"x": float(i)} for i in range(4)])
    done, running, other = (storage.lease(study.id, "w") for _ in range(3))
    storage.finish(done.point_id, done.lease_token, "done", 0.5, request_id="used")
    results = in_one_batch(storage, [
        lambda: storage.report(running.point_id, running.lease_token, 0, 0.25),
        lambda: storage.report(done.point_id, done.lease_token, 1, 0.25),
        lambda: storage.finish(other.point_id, other.lease_token, "done", 0.1, request_id="used"),
        lambda: storage.finish(running.point_id, running.lease_token, "done", 0.2, request_id="fresh"),
        lambda: storage.lease(study.id, "a"),
        lambda: storage.lease(study.id, "b"),
        lambda: storage.lease(study.id + 1000, "c"),
    ])
    report_ok, report_stale, reused, finished, *asks, foreign = results
    assert report_ok is None and isinstance(report_stale, StaleLeaseError)
    assert isinstance(reused, ConflictError)
    assert isinstance(finished, FinishResult) and finished.point.state == PointState.DONE
    granted = [ask for ask in asks if isinstance(ask, Lease)]
    assert len(granted) == 1 and asks.count(None) == 1, "one NEW point was left for the two asks"
    assert isinstance(foreign, NotFoundError)
    assert storage.intermediate_values(study.id) == {running.point_id: {0: 0.25}}
    counts = storage.counts(study.id)
    assert (counts.done, counts.running, counts.new, counts.evaluation_jobs) == (2, 2, 0, 4)


def test_steering_points_join_a_batch_and_its_asks_may_take_them(storage: SQLStorage,
                                                                  make_task: Callable[..., Task]) -> None:
    study = storage.create_study("alice", make_task(maxPoints=3))
    storage.add_points(study.id, [{"x": 0.0}])
    running = storage.lease(study.id, "w")
    assert running is not None
    added, foreign, reported, lease = in_one_batch(storage, [
        lambda: storage.add_points(study.id, [{"x": 0.5}, {"x": 0.7}]),
        lambda: storage.add_points(study.id + 1000, [{"x": 0.1}]),
        lambda: storage.report(running.point_id, running.lease_token, 0, 0.3),
        lambda: storage.lease(study.id, "a"),
    ])
    assert [point.params["x"] for point in added] == [0.5, 0.7]
    assert isinstance(foreign, NotFoundError)
    assert reported is None and storage.intermediate_values(study.id) == {running.point_id: {0: 0.3}}
    assert isinstance(lease, Lease) and lease.point_id == added[0].id


def test_a_batch_that_loses_a_race_is_written_item_by_item(postgres_clean_url: str,
                                                           make_task: Callable[..., Task]) -> None:
    """Another connection takes a request id while the batch waits on it: the batch transaction fails as
    a whole (PostgreSQL aborts it), so each write is redone alone and only the loser is refused."""
    with SQLStorage(postgres_clean_url) as storage:
        study = storage.create_study("alice", make_task(maxPoints=3))
        storage.add_points(study.id, [{"x": float(i)} for i in range(3)])
        rival, mine, reporting = (storage.lease(study.id, "w") for _ in range(3))
        alone: list[Any] = []
        write_alone = storage._write_alone
        storage._write_alone = lambda pending: (alone.append(pending.item), write_alone(pending))  # type: ignore
        with psycopg.connect(postgres_clean_url) as other:
            other.execute("UPDATE points SET finish_request_id = 'raced' WHERE id = %s", (rival.point_id,))
            committer = threading.Thread(target=commit_once_blocked, args=(other, postgres_clean_url))
            committer.start()
            results = in_one_batch(storage, [
                lambda: storage.report(reporting.point_id, reporting.lease_token, 0, 0.5),
                lambda: storage.finish(mine.point_id, mine.lease_token, "done", 0.1, request_id="raced"),
                lambda: storage.finish(reporting.point_id, reporting.lease_token, "done", 0.2, request_id="ok"),
            ])
            committer.join()
        reported, lost, won = results
        assert len(alone) == len(results), "the failed batch was not redone item by item"
        assert reported is None and isinstance(lost, ConflictError) and "raced" in str(lost)
        assert isinstance(won, FinishResult)
        assert storage.intermediate_values(study.id) == {reporting.point_id: {0: 0.5}}
        assert storage.get_point(mine.point_id).state == PointState.RUNNING


def commit_once_blocked(conn: psycopg.Connection, url: str) -> None:
    """Commit ``conn`` once another session waits for one of its locks."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    with psycopg.connect(url, autocommit=True) as watcher:
        while not watcher.execute("SELECT 1 FROM pg_locks WHERE NOT granted").fetchone():
            assert time.monotonic() < deadline, "the batch never waited on the rival's request id"
            time.sleep(QUEUE_POLL_S)
    conn.commit()
