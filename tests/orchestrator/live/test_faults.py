"""Fault tests with real processes: a worker killed with -9 mid-point, the orchestrator killed with -9
mid-study and restarted on the same database, and 64 concurrent workers on SQLite. Every assertion
reads the database: exactly maxPoints final points, none lost, none duplicated, never a double lease."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

STUDY_TIMEOUT_S = 120
CONCURRENT_WORKERS = 64
CONCURRENT_POINTS = 320
#: Lease of the concurrency test: it checks locking and double leases, not expiry, so no lease may
#: expire even on a machine slowed by other jobs (a reaped lease would rightly be re-leased).
CONCURRENT_LEASE_S = 600
#: How long the children of a stopped server (pre-forked servers, steering processes) may take to exit.
CHILD_EXIT_TIMEOUT_S = 10.0


def _wait_all(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float = STUDY_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc, log in zip(procs, logs, strict=True):
        try:
            codes.append(proc.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"worker did not finish in {timeout} s:\n{log.read_text()}")
    return codes


def test_killed_worker_point_is_rerun_after_lease_expiry(kit: Any, server: Any, payload_dir: Path,
                                                         tmp_path: Path) -> None:
    task = kit.make_task(6, sleep=0.4, steps=3, parallel=2)
    study = kit.create_study(server, task)
    victim_dir, survivor_dir = tmp_path / "victim", tmp_path / "survivor"
    victim = kit.start_worker(server, study, victim_dir, payload_dir, name="victim")
    survivor = kit.start_worker(server, study, survivor_dir, payload_dir, name="survivor")
    running = kit.wait_for(lambda: list(victim_dir.glob("point*/running")), 60, "the victim to run a payload")[0]
    [(point_id,)] = kit.query(server.db_path, "SELECT id FROM points WHERE worker_id = 'victim' AND state = 'running'")
    payload_pid = int((running.parent / "pid").read_text())

    victim.send_signal(signal.SIGKILL)
    victim.wait()
    kit.wait_for(lambda: not kit.process_alive(payload_pid), 10, "the orphaned payload to die with its worker")
    assert _wait_all([survivor], [Path(f"{survivor_dir}.log")]) == [0]

    points = kit.assert_budget_kept(server.db_path, study.id, 6)
    assert {state for _, _, state, _ in points} == {"done"}
    leases = kit.query(server.db_path, "SELECT worker_id, outcome, attempt FROM leases WHERE point_id = ? "
                       "ORDER BY started_at", point_id)
    assert leases[0] == ("victim", "expired", 0), leases
    assert leases[-1] == ("survivor", "done", 1), leases
    [(attempt,)] = kit.query(server.db_path, "SELECT attempt FROM points WHERE id = ?", point_id)
    assert attempt == 1
    assert kit.study_state(server.db_path, study.id) == "completed"


def test_orchestrator_killed_and_restarted_loses_nothing(kit: Any, server: Any, payload_dir: Path,
                                                        tmp_path: Path) -> None:
    task = kit.make_task(10, sleep=0.3, steps=2, parallel=3)
    study = kit.create_study(server, task)
    dirs = [tmp_path / f"w{i}" for i in range(3)]
    workers = [kit.start_worker(server, study, d, payload_dir, name=f"w{i}") for i, d in enumerate(dirs)]
    finished = "SELECT count(*) FROM points WHERE state IN ('done', 'pruned', 'failed')"
    kit.wait_for(lambda: kit.query(server.db_path, finished)[0][0] >= 3, 60, "three finished points")

    server.kill()
    time.sleep(1.0)
    server.start()

    assert _wait_all(workers, [Path(f"{d}.log") for d in dirs]) == [0, 0, 0]
    points = kit.assert_budget_kept(server.db_path, study.id, 10)
    assert {state for _, _, state, _ in points} == {"done"}, points
    assert kit.study_state(server.db_path, study.id) == "completed"
    logs = "".join(Path(f"{d}.log").read_text() for d in dirs)
    assert "orchestrator unreachable" in logs, "the workers never saw the outage: the test proved nothing"


@pytest.mark.parametrize("server", [1, 2], indirect=True, ids=["one-process", "two-processes"])
def test_64_concurrent_workers_on_sqlite(kit: Any, server: Any) -> None:
    """Also with ``hepopt serve --workers 2``: two processes on one SQLite file keep every rule."""
    from hepopt.client import Client

    task = kit.make_task(CONCURRENT_POINTS, parallel=CONCURRENT_WORKERS, evaluationExec="unused",
                         hepopt={"leaseSeconds": CONCURRENT_LEASE_S})
    study = kit.create_study(server, task)
    leased: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()
    start = threading.Barrier(CONCURRENT_WORKERS)

    def work(index: int) -> None:
        try:
            with Client(server.url, study.worker_token) as client:
                start.wait()
                _cycle_until_finished(client, study.id, f"thread-{index}", leased, guard)
        except BaseException as exc:
            with guard:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(CONCURRENT_WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STUDY_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "workers still running"
    assert errors == [], errors[:3]
    assert len(leased) == len(set(leased)) == CONCURRENT_POINTS, "a point was leased twice"
    kit.assert_budget_kept(server.db_path, study.id, CONCURRENT_POINTS)
    outcomes = kit.query(server.db_path, "SELECT outcome, count(*) FROM leases GROUP BY outcome")
    assert outcomes == [("done", CONCURRENT_POINTS)], outcomes
    log = server.log()
    assert "database is locked" not in log and "Traceback" not in log, log[-3000:]
    children = _children(server.proc.pid)
    servers = [pid for pid in children if b"multiprocessing" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == (server.workers if server.workers > 1 else 0), children
    server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it stopped on
    deadline = time.monotonic() + CHILD_EXIT_TIMEOUT_S
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, children)), "a server process outlived serve"


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: neither gone nor a zombie (an orphan that exited is reaped by init,
    which in a container may never happen)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` from /proc: the pre-forked servers, and of a one-process server
    its steering proposal processes (started by ``multiprocessing``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


def _cycle_until_finished(client: Any, study_id: int, worker_id: str, leased: list[int],
                          guard: threading.Lock) -> None:
    """ask, one report, tell, as a worker does, until the study is finished."""
    while True:
        answer = client.ask(study_id, worker_id)
        if answer.status == "finished":
            return
        if answer.status == "wait":
            time.sleep(answer.retry_after or 0.1)
            continue
        lease = answer.lease
        with guard:
            leased.append(lease.point_id)
        client.report(study_id, lease.point_id, lease.lease_token, 0, 1.0)
        client.tell(study_id, lease.point_id, lease.lease_token, "done", loss=lease.params["x"] ** 2)

