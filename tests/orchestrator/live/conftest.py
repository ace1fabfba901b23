"""Real processes for the fault tests: ``hepopt serve`` and ``hepopt worker`` subprocesses on loopback,
SQLite, and a tiny payload script. Assertions read the database file directly (``sqlite3``), never the
service's own answers, so a bug in the service cannot hide a lost or duplicated point.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

PYTHON = sys.executable
SERVER_START_TIMEOUT_S = 60.0
PROCESS_EXIT_TIMEOUT_S = 30.0
POLL_S = 0.1
#: Short enough that an expired lease comes back quickly, long enough for a loaded CI machine.
TEST_LEASE_SECONDS = 5.0
REAPER_INTERVAL = "0.3s"
RETRY_AFTER = "0.2s"
USER = "tester"

#: The test payload: a few "steps" of ``sleep`` seconds each, a checkpoint after every step in
#: ckpt/step.txt, resume from it when present; loss = x**2. ``x < fail_below`` exits 3 with no output.
PAYLOAD = r'''
import json, os, sys, time
from pathlib import Path

point = json.loads(Path("input.json").read_text())
Path("pid").write_text(str(os.getpid()))
env = {k: v for k, v in os.environ.items() if k.startswith("HEPOPT_")}
Path("seen.json").write_text(json.dumps({"env": env, "input_ds": json.loads(Path("input_ds.json").read_text())}))
if point["x"] < point.get("fail_below", -10):
    print("refusing this point", file=sys.stderr)
    sys.exit(3)
ckpt = Path("ckpt") / "step.txt"
start = int(ckpt.read_text()) if ckpt.exists() else 0
for step in range(start, int(point["steps"])):
    Path("running").write_text(str(step))
    time.sleep(point["sleep"])
    ckpt.parent.mkdir(exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    tmp.write_text(str(step + 1))
    tmp.replace(ckpt)
message = f"resumed from step {start}" if start else "fresh"
Path("output.json").write_text(json.dumps({"status": 0, "loss": point["x"] ** 2, "message": message}))
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def hepopt(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``hepopt`` command as a user would (``python -m hepopt``), capturing its output."""
    return subprocess.run([PYTHON, "-m", "hepopt", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd, check=False)


@dataclass
class ServerProcess:
    """``hepopt serve`` on a fixed loopback port, so it can be killed and restarted on the same address."""

    db_path: Path
    data_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workers: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    def start(self) -> ServerProcess:
        argv = [PYTHON, "-m", "hepopt", "serve", "--db", self.db_url, "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--reaper-interval", REAPER_INTERVAL,
                "--retry-after", RETRY_AFTER, "--log-level", "warning", "--workers", str(self.workers)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, SERVER_START_TIMEOUT_S, f"hepopt serve on {self.url} (log {self.log_path})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"hepopt serve exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            return requests.get(f"{self.url}/api/v1/health", timeout=1).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(PROCESS_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """``hepopt serve`` with one process, or as many as an indirect parameter says (``--workers``)."""
    srv = ServerProcess(db_path=tmp_path / "hepopt.db", data_dir=tmp_path / "data", log_path=tmp_path / "serve.log",
                        workers=getattr(request, "param", 1))
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture
def payload_dir(tmp_path: Path) -> Path:
    """A task directory holding the test payload as ``payload.py`` (run as ``python payload.py``)."""
    directory = tmp_path / "task"
    directory.mkdir()
    (directory / "payload.py").write_text(PAYLOAD)
    return directory


def make_task(max_points: int, *, sleep: float = 0.05, steps: int = 1, parallel: int = 1,
              fail_below: float = -10.0, **extra: Any) -> dict[str, Any]:
    """A task for the test payload; ``extra`` keys override or add task keys (``hepopt`` is merged)."""
    task: dict[str, Any] = {
        "evaluationExec": "python payload.py",
        "searchSpace": {
            "x": {"method": "uniform", "dimension": {"low": -1, "high": 1}},
            "sleep": {"method": "fixed", "dimension": {"value": sleep}},
            "steps": {"method": "fixed", "dimension": {"value": steps}},
            "fail_below": {"method": "fixed", "dimension": {"value": fail_below}},
        },
        "maxPoints": max_points,
        "nParallelEvaluation": parallel,
        "nPointsPerIteration": max(parallel, 1),
        "hepopt": {"method": "random", "seed": 7, "leaseSeconds": TEST_LEASE_SECONDS, "maxAttempts": 5},
    }
    options = extra.pop("hepopt", {})
    task.update(extra)
    task["hepopt"].update(options)
    return task


@dataclass
class Study:
    id: int
    user_token: str
    worker_token: str


def create_study(server: ServerProcess, task: dict[str, Any], name: str = "test") -> Study:
    """A study owned by USER, created through the REST API, plus a worker token for it."""
    from hepopt.client import Client
    from orchestrator.storage import open_storage

    storage = open_storage(server.db_url)
    try:
        token = storage.create_token(USER)
    finally:
        storage.close()
    with Client(server.url, token) as client:
        study = client.create_study(task, name=name)
        return Study(study["id"], token, client.create_worker_token(study["id"]))


def start_worker(server: ServerProcess, study: Study, workdir: Path, task_dir: Path, *extra: str,
                 name: str = "w") -> subprocess.Popen[bytes]:
    """``hepopt worker`` as a subprocess; its log is ``<workdir>.log``. The token travels in the environment."""
    argv = [PYTHON, "-m", "hepopt", "worker", "--url", server.url, "--study", str(study.id), "--workdir",
            str(workdir), "--task-dir", str(task_dir), "--worker-id", name, "--log-level", "debug", *extra]
    env = {**os.environ, "HEPOPT_TOKEN": study.worker_token}
    with open(f"{workdir}.log", "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def query(db_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the database directly (read-only), as the source of truth for every assertion."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def study_state(db_path: Path, study_id: int) -> str:
    return query(db_path, "SELECT state FROM studies WHERE id = ?", study_id)[0][0]


def assert_budget_kept(db_path: Path, study_id: int, max_points: int) -> list[tuple[Any, ...]]:
    """Exactly ``max_points`` points, all final, numbered 0..N-1 once each, never two open leases at once."""
    points = query(db_path, "SELECT id, number, state, attempt FROM points WHERE study_id = ? ORDER BY number",
                   study_id)
    assert [p[1] for p in points] == list(range(max_points)), "points lost or duplicated"
    assert {p[2] for p in points} <= {"done", "pruned", "failed"}, points
    assert_no_double_lease(db_path, study_id)
    return points


def assert_no_double_lease(db_path: Path, study_id: int) -> None:
    """No point ever had two leases whose lifetimes overlap, and every lease is closed."""
    leases = query(db_path, "SELECT point_id, started_at, ended_at FROM leases WHERE study_id = ? "
                   "ORDER BY point_id, started_at", study_id)
    assert all(end is not None for _, _, end in leases), "a lease was left open"
    for (point_a, _, end_a), (point_b, start_b, _) in itertools.pairwise(leases):
        if point_a == point_b:
            assert start_b >= end_a, f"point {point_a} was leased twice at once"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture
def kit() -> Any:
    """This module's helpers, for the test files (test modules cannot import a conftest by name)."""
    return sys.modules[__name__]


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
