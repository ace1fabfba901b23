"""Reports written in batches (group commit): each caller still gets its own answer, durably.

The storage tests run on both backends through the ``storage`` fixture; the GroupCommit tests need none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from hepopt.task import Task
from orchestrator.storage import NotFoundError, StaleLeaseError
from orchestrator.storage.group_commit import GroupCommit, Pending
from orchestrator.storage.sql import SQLStorage

THREADS = 16
POINTS = 4
STEPS = 8
#: How long the first batch holds the writer, so that the other callers queue behind it.
RELEASE_AFTER_S = 0.1


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
