"""Ask/tell throughput of the orchestrator against Optuna's RDB storage on the same database engine.

One *cycle* is what a worker does per point: ask, 10 intermediate reports, tell. C threads run cycles
for a fixed time against

* hepopt: a real ``hepopt serve`` subprocess on loopback (HTTP, JSON, bearer tokens, the background
  scheduler steering with the ``random`` method), one ``hepopt.client.Client`` per thread;
* Optuna: ``optuna.storages.RDBStorage`` in this process, one shared study, ``RandomSampler``,
  ``study.ask()``, 10 × ``trial.report``, ``study.tell`` (as ``study.optimize(n_jobs=C)`` would).

Each configuration runs on a fresh database, empty or already holding 10,000 finished points with 10
intermediate values each (bulk-loaded with SQL: both public APIs need about a tenth of a second per
point on this machine). Every client thread first runs one untimed cycle (its connections opened, its
token's grant cached: a worker's steady state), then the clock starts for all. Printed per
configuration: cycles/s of both, their ratio, ask latency p50/p99 (asks that leased a point), CPU
milliseconds per cycle (hepopt: server + client processes; Optuna: its one process), waits and
errors. The clients share the machine with the server, so on a small machine their CPU is part of the
price. Targets: ratio ≥ 10 at C = 32 on SQLite, p99 ask < 50 ms.

``--ceiling`` adds, per configuration, the rate of the same C clients calling ``GET /health`` on the
same server: what FastAPI + uvicorn + the client's transport manage here with no storage at all,
expressed as cycles/s (requests/s divided by the REQUESTS_PER_CYCLE requests of a cycle); the worker
routes (ask, report, tell) bypass FastAPI's routing, so cycles can beat this ceiling.

    python benchmarks/orchestrator_throughput.py                      # SQLite, C = 1, 8, 32
    python benchmarks/orchestrator_throughput.py --db postgres        # a private PostgreSQL cluster (initdb)
    python benchmarks/orchestrator_throughput.py --db postgresql://me@dbhost/postgres
    python benchmarks/orchestrator_throughput.py --concurrency 32 --preload 0 --seconds 5 --ceiling
    python benchmarks/orchestrator_throughput.py --workers 2                 # two server processes
    python benchmarks/orchestrator_throughput.py --client-processes 4        # hepopt's clients in 4 processes

By default the C hepopt clients are threads of this one process, as Optuna's are; real workers are
separate processes, and threads of one process also wait for each other's interpreter lock, which adds to
every latency they measure. ``--client-processes P`` spreads the C clients over P forked processes
(their CPU is counted all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import multiprocessing
import os
import platform
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests

REPORTS_PER_CYCLE = 10
#: Untimed cycles a client may try before the clock starts (its first cycle, which opens connections).
WARM_UP_TRIES = 20
REQUESTS_PER_CYCLE = REPORTS_PER_CYCLE + 2
PRELOAD_POINTS = 10_000
CONCURRENCY = (1, 8, 32)
DEFAULT_SECONDS = 10.0
#: Server processes. One: on a 2-core machine shared with the clients, a second process splits the
#: report batches and hands the SQLite write lock across processes, costing more CPU than it frees.
DEFAULT_SERVER_WORKERS = 1
TARGET_RATIO = 10.0
TARGET_P99_MS = 50.0
TARGET_CONCURRENCY = 32
SERVER_START_TIMEOUT_S = 120.0
SPACE_BOUNDS = (-5.0, 5.0)
PRELOAD_CHUNK = 1_000
#: Points kept ready by steering: workers should find one at every ask, so the queue is what is measured.
READY_POINTS_PER_WORKER = 16
STEERING_BATCH = 512
#: A scratch cluster needs no durability; these settings make it several times faster (as in the tests).
PG_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"


@dataclass
class Result:
    """One system on one configuration."""

    cycles: int = 0
    seconds: float = 0.0
    waits: int = 0
    errors: list[str] = field(default_factory=list)
    ask_seconds: list[float] = field(default_factory=list)
    #: CPU seconds spent during the run by this process (the clients, or Optuna) and by the server.
    cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0

    def cpu_ms_per_cycle(self) -> float:
        return 1000 * (self.cpu_seconds + self.server_cpu_seconds) / self.cycles if self.cycles else float("nan")

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds if self.seconds else 0.0

    def ask_ms(self, quantile: float) -> float:
        if not self.ask_seconds:
            return float("nan")
        ordered = sorted(self.ask_seconds)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


class Tally:
    """Per-thread counters merged into a Result under one lock."""

    def __init__(self) -> None:
        self.result = Result()
        self.lock = threading.Lock()

    def merge(self, cycles: int, waits: int, asks: list[float], errors: list[str]) -> None:
        with self.lock:
            self.result.cycles += cycles
            self.result.waits += waits
            self.result.ask_seconds.extend(asks)
            self.result.errors.extend(errors)


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default) and of its live children (the
    processes of ``hepopt serve --workers N``), from /proc on Linux."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if stat.parent.name == str(pid) or fields[1] == str(pid):
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


#: A cycle loop: ``loop(index, start, tally)`` warms up, calls ``start()`` (which waits for every
#: thread and returns the deadline), then runs cycles until the deadline, merging its counts into tally.
CycleLoop = Callable[[int, Callable[[], float], Tally], None]


def run_threads(concurrency: int, seconds: float, cycle_loop: CycleLoop, server_pid: int | None = None,
                synchronize: Callable[[], object] | None = None) -> Result:
    """Run ``concurrency`` threads of ``cycle_loop``; the clock starts once every thread has warmed up
    (its first cycle, untimed: connections opened, caches filled, as in a worker's steady state) and,
    if given, ``synchronize()`` returned. Each thread then runs cycles until the deadline and finishes
    its last one.

    The CPU time of this process and of the server (if any) from the start is recorded in the result."""
    tally = Tally()
    marks: dict[str, float] = {}

    def begin() -> None:  # run by the last thread to warm up, before any thread goes on
        if synchronize is not None:
            synchronize()
        marks["cpu"] = process_cpu_seconds()
        marks["server"] = process_cpu_seconds(server_pid) if server_pid else 0.0
        marks["start"] = time.perf_counter()

    barrier = threading.Barrier(concurrency, action=begin, timeout=SERVER_START_TIMEOUT_S)

    def start() -> float:
        barrier.wait()
        return marks["start"] + seconds

    threads = [threading.Thread(target=cycle_loop, args=(i, start, tally), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if "start" not in marks:
        raise RuntimeError(f"the clients never started: {tally.result.errors[:3]}")
    tally.result.seconds = time.perf_counter() - marks["start"]
    tally.result.cpu_seconds = process_cpu_seconds() - marks["cpu"]
    if server_pid:
        tally.result.server_cpu_seconds = process_cpu_seconds(server_pid) - marks["server"]
    return tally.result


# -- hepopt -------------------------------------------------------------------------------------
def hepopt_task(concurrency: int, preload: int) -> dict[str, Any]:
    low, high = SPACE_BOUNDS
    return {
        "evaluationExec": "unused",
        "searchSpace": {n: {"method": "uniform", "dimension": {"low": low, "high": high}} for n in ("x", "y")},
        "maxPoints": preload + 500_000,
        "nParallelEvaluation": concurrency,
        "minUnevaluatedPoints": READY_POINTS_PER_WORKER * concurrency,
        "nPointsPerIteration": STEERING_BATCH,
        "hepopt": {"method": "random", "seed": 1, "leaseSeconds": 300},
    }


def prepare_hepopt(url: str, concurrency: int, preload: int) -> tuple[int, str]:
    """Create the study (and its preloaded history) directly in the database; (study id, user token)."""
    from hepopt.task import parse_task
    from orchestrator.storage import open_storage

    storage = open_storage(url)
    try:
        token = storage.create_token("bench")
        study = storage.create_study("bench", parse_task(hepopt_task(concurrency, preload)), name="bench")
        if preload:
            preload_hepopt(storage, study.id, preload)
            settle_database(url)
        return study.id, token
    finally:
        storage.close()


def preload_hepopt(storage: Any, study_id: int, n: int) -> None:
    from sqlalchemy import text

    rng = random.Random(1)
    for start in range(0, n, PRELOAD_CHUNK):
        size = min(PRELOAD_CHUNK, n - start)
        storage.add_points(study_id, [{"x": rng.uniform(*SPACE_BOUNDS), "y": rng.uniform(*SPACE_BOUNDS)}
                                      for _ in range(size)], origin="preload")
    now = time.time()
    with storage.engine.begin() as conn:
        ids = [row[0] for row in conn.execute(text("SELECT id FROM points WHERE study_id = :s"), {"s": study_id})]
        conn.execute(text("UPDATE points SET state = 'done', loss = :loss, finished_at = :t WHERE id = :id"),
                     [{"loss": rng.random(), "t": now, "id": i} for i in ids])
        conn.execute(text("INSERT INTO intermediate_values (point_id, study_id, step, value, updated_at) "
                          "VALUES (:p, :s, :step, :v, :t)"),
                     [{"p": i, "s": study_id, "step": step, "v": rng.random(), "t": now}
                      for i in ids for step in range(REPORTS_PER_CYCLE)])


@contextlib.contextmanager
def hepopt_server(url: str, data_dir: Path, log_path: Path, workers: int = 1) -> Iterator[tuple[str, int]]:
    """``hepopt serve --workers N`` as a subprocess on a free loopback port; yields its URL and process id."""
    port = free_port()
    argv = [sys.executable, "-m", "hepopt", "serve", "--db", url, "--port", str(port), "--data-dir", str(data_dir),
            "--log-level", "warning", "--workers", str(workers)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hepopt serve did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=1).ok
    except requests.RequestException:
        return False


def run_client_processes(concurrency: int, seconds: float, cycle_loop: CycleLoop, server_pid: int,
                         processes: int) -> Result:
    """:func:`run_threads` with the ``concurrency`` threads split over ``processes`` forked processes,
    started together; their results merged (client CPU is each process's own)."""
    if processes <= 1:
        return run_threads(concurrency, seconds, cycle_loop, server_pid=server_pid)
    context = multiprocessing.get_context("fork")
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    parts = [(share, sum(shares[:i])) for i, share in enumerate(shares) if share]
    results = context.SimpleQueue()
    barrier = context.Barrier(len(parts) + 1)

    def client(share: int, offset: int) -> None:
        results.put(run_threads(share, seconds, lambda i, start, tally: cycle_loop(offset + i, start, tally),
                                synchronize=barrier.wait))

    children = [context.Process(target=client, args=part) for part in parts]
    for child in children:
        child.start()
    barrier.wait(SERVER_START_TIMEOUT_S)  # every client process has warmed up
    server_before = process_cpu_seconds(server_pid)
    started = time.perf_counter()
    merged = Result()
    for part in (results.get() for _ in children):
        merged.cycles += part.cycles
        merged.waits += part.waits
        merged.errors += part.errors
        merged.ask_seconds += part.ask_seconds
        merged.cpu_seconds += part.cpu_seconds
    for child in children:
        child.join()
    merged.seconds = time.perf_counter() - started
    merged.server_cpu_seconds = process_cpu_seconds(server_pid) - server_before
    return merged


def bench_hepopt(url: str, workdir: Path, concurrency: int, preload: int, seconds: float,
                 ceiling: bool = False, workers: int = 1, client_processes: int = 1) -> tuple[Result, Result | None]:
    """The cycles against a fresh server, and (with ``ceiling``) the /health rate on that same server."""
    from hepopt.client import Client

    study_id, token = prepare_hepopt(url, concurrency, preload)
    with (hepopt_server(url, workdir / "data", workdir / "serve.log", workers) as (base, pid),
          Client(base, token) as owner):
        worker_token = owner.create_worker_token(study_id)
        _wait_for_points(owner, study_id, preload + concurrency)

        def loop(index: int, start: Callable[[], float], tally: Tally) -> None:
            with Client(base, worker_token) as client:
                _hepopt_cycles(client, study_id, f"bench-{index}", start, tally)

        result = run_client_processes(concurrency, seconds, loop, pid, client_processes)
        return result, (bench_ceiling(base, pid, concurrency, seconds) if ceiling else None)


def bench_ceiling(base: str, pid: int, concurrency: int, seconds: float) -> Result:
    """C clients calling ``GET /health`` through the workers' HTTP transport (one session each). The
    result counts requests as ``cycles``: divide its rate by REQUESTS_PER_CYCLE to compare with a cycle's."""
    from hepopt.client import HttpTransport

    def loop(_index: int, start: Callable[[], float], tally: Tally) -> None:
        done = 0
        errors: list[str] = []
        transport = HttpTransport(base, None)
        try:
            transport.request("GET", "/health")
            deadline = start()
            while time.perf_counter() < deadline:
                status = transport.request("GET", "/health").status_code
                done += status == HTTPStatus.OK
                if status != HTTPStatus.OK:
                    errors.append(f"GET /health answered {status}")
        finally:
            transport.close()
        tally.merge(done, 0, [], errors)

    return run_threads(concurrency, seconds, loop, server_pid=pid)


def _wait_for_points(client: Any, study_id: int, n: int) -> None:
    """Let the first steering run finish so the measurement starts on a supplied queue."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        counts = client.get_study(study_id)["counts"]
        if sum(counts[s] for s in ("new", "running", "done", "pruned", "failed")) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError("steering never supplied points")


def _hepopt_cycles(client: Any, study_id: int, worker_id: str, start: Callable[[], float], tally: Tally) -> None:
    cycles = waits = 0
    asks: list[float] = []
    errors: list[str] = []
    try:
        for _ in range(WARM_UP_TRIES):
            if _hepopt_cycle(client, study_id, worker_id) is not None:
                break
    except Exception as exc:
        errors.append(f"warm-up: {type(exc).__name__}: {exc}"[:300])
    deadline = start()
    while time.perf_counter() < deadline:
        try:
            asked = _hepopt_cycle(client, study_id, worker_id)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        if asked is None:
            waits += 1
        else:
            asks.append(asked)
            cycles += 1
    tally.merge(cycles, waits, asks, errors)


def _hepopt_cycle(client: Any, study_id: int, worker_id: str) -> float | None:
    """One cycle; the seconds its ask took, or None when the answer was to wait (after waiting)."""
    began = time.perf_counter()
    answer = client.ask(study_id, worker_id)
    if answer.status != "leased":
        time.sleep(answer.retry_after or 0.1)
        return None
    asked = time.perf_counter() - began
    lease = answer.lease
    for step in range(REPORTS_PER_CYCLE):
        client.report(study_id, lease.point_id, lease.lease_token, step, 1.0 / (step + 1))
    client.tell(study_id, lease.point_id, lease.lease_token, "done", loss=lease.params["x"] ** 2)
    return asked


# -- Optuna -------------------------------------------------------------------------------------
def optuna_storage(url: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna's default 5 s SQLite busy wait turns into "database is locked" under load: give it hepopt's 60 s.
    kwargs: dict[str, Any] = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                              else {"pool_size": 10, "max_overflow": 54})
    return optuna.storages.RDBStorage(_optuna_url(url), engine_kwargs=kwargs)


def _optuna_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def preload_optuna(storage: Any, study_id: int, n: int) -> None:
    """n COMPLETE trials with params, a value and 10 intermediate values each, in Optuna's own schema."""
    from optuna.distributions import FloatDistribution, distribution_to_json
    from sqlalchemy import text

    rng = random.Random(1)
    dist = distribution_to_json(FloatDistribution(*SPACE_BOUNDS))
    now = datetime.datetime.now()
    with storage.engine.begin() as conn:
        conn.execute(text("INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) "
                          "VALUES (:n, :s, 'COMPLETE', :t, :t)"),
                     [{"n": i, "s": study_id, "t": now} for i in range(n)])
        ids = [row[0] for row in conn.execute(text("SELECT trial_id FROM trials WHERE study_id = :s "
                                                   "ORDER BY number"), {"s": study_id})]
        conn.execute(text("INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) "
                          "VALUES (:t, :name, :v, :d)"),
                     [{"t": i, "name": name, "v": rng.uniform(*SPACE_BOUNDS), "d": dist}
                      for i in ids for name in ("x", "y")])
        conn.execute(text("INSERT INTO trial_values (trial_id, objective, value, value_type) "
                          "VALUES (:t, 0, :v, 'FINITE')"), [{"t": i, "v": rng.random()} for i in ids])
        conn.execute(text("INSERT INTO trial_intermediate_values (trial_id, step, intermediate_value, "
                          "intermediate_value_type) VALUES (:t, :step, :v, 'FINITE')"),
                     [{"t": i, "step": step, "v": rng.random()} for i in ids for step in range(REPORTS_PER_CYCLE)])


def bench_optuna(url: str, concurrency: int, preload: int, seconds: float) -> Result:
    import optuna
    from optuna.distributions import FloatDistribution

    storage = optuna_storage(url)
    study = optuna.create_study(storage=storage, study_name="bench", sampler=optuna.samplers.RandomSampler(seed=1))
    if preload:
        preload_optuna(storage, study._study_id, preload)
        settle_database(url)
    space = {name: FloatDistribution(*SPACE_BOUNDS) for name in ("x", "y")}

    def cycle() -> float:
        began = time.perf_counter()
        trial = study.ask(space)
        asked = time.perf_counter() - began
        for step in range(REPORTS_PER_CYCLE):
            trial.report(1.0 / (step + 1), step)
        study.tell(trial, trial.params["x"] ** 2)
        return asked

    def loop(_index: int, start: Callable[[], float], tally: Tally) -> None:
        cycles = 0
        asks: list[float] = []
        errors: list[str] = []
        try:
            cycle()
        except Exception as exc:
            errors.append(f"warm-up: {type(exc).__name__}: {exc}"[:300])
        deadline = start()
        while time.perf_counter() < deadline:
            try:
                asks.append(cycle())
                cycles += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        tally.merge(cycles, 0, asks, errors)

    try:
        return run_threads(concurrency, seconds, loop)
    finally:
        storage.engine.dispose()


def settle_database(url: str) -> None:
    """After a bulk load, put a PostgreSQL database where autovacuum would have it in steady state: the
    load turned 10,000 points (trials) from new to done in one go, leaving as many dead index entries
    that every scan for new points walks through, and no planner statistics. SQLite needs neither."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")


# -- databases ----------------------------------------------------------------------------------
class Databases:
    """Fresh, empty databases on demand: SQLite files in a temporary folder, or scratch PostgreSQL databases."""

    def __init__(self, spec: str, workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.counter = 0
        self.created: list[str] = []
        self.cluster: Any = None
        self.admin_url = spec
        self.kind = "sqlite" if spec == "sqlite" else "postgresql"

    def __enter__(self) -> Databases:
        if self.spec == "postgres":
            self.cluster = PrivatePostgres()
            self.admin_url = self.cluster.start()
        return self

    def fresh(self, label: str) -> str:
        self.counter += 1
        name = f"bench_{os.getpid()}_{self.counter}_{label}"
        if self.kind == "sqlite":
            return f"sqlite:///{self.workdir / name}.db"
        self._admin(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    def __exit__(self, *exc: object) -> None:
        for name in self.created:
            with contextlib.suppress(Exception):
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self.cluster is not None:
            self.cluster.stop()


class PrivatePostgres:
    """A throw-away cluster (initdb + pg_ctl on a loopback port, no durability), as the storage tests start one.

    PostgreSQL refuses to run as root, so as root it runs as ``postgres`` (or ``nobody``) through runuser.
    """

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hepopt-bench-pg-"))  # its own: the server user must enter it
        self.data = self.base / "data"
        self.prefix: list[str] = []
        self.bindir: Path | None = None

    def start(self) -> str:
        self.bindir = find_pg_bindir()
        if self.bindir is None:
            raise SystemExit("initdb/pg_ctl not found: apt-get install postgresql, or give --db postgresql://...")
        user = self._drop_root()
        if user is not None:
            shutil.chown(self.base, user=user)
        superuser = user or getpass.getuser()
        self._run(["initdb", "-D", str(self.data), "-U", superuser, "--auth=trust", "-E", "UTF8", "--no-sync"])
        port = free_port()
        options = f"-h 127.0.0.1 -p {port} -k {self.base} {PG_OPTIONS}"
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", options, "-w", "start"])
        return f"postgresql://{superuser}@127.0.0.1:{port}/postgres"

    def _drop_root(self) -> str | None:
        if os.geteuid() != 0:
            return None
        for user in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(user)
                self.prefix = ["runuser", "-u", user, "--"]
                return "postgres" if user == "postgres" else user
        raise SystemExit("running as root without a postgres/nobody user to run PostgreSQL")

    def _run(self, argv: list[str]) -> None:
        assert self.bindir is not None
        result = subprocess.run([*self.prefix, str(self.bindir / argv[0]), *argv[1:]], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        if self.bindir is not None and (self.data / "postmaster.pid").exists():
            self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.base, ignore_errors=True)


def find_pg_bindir() -> Path | None:
    """initdb/pg_ctl on PATH, or Debian's versioned directory."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- report -------------------------------------------------------------------------------------
HEADER = (f"{'backend':<10} {'points':>7} {'C':>3} | {'hepopt/s':>9} {'optuna/s':>9} {'ratio':>6} | "
          f"{'hepopt ask p50/p99 ms':>22} {'optuna ask p50/p99 ms':>22} | {'CPU ms/cycle srv+cli/o':>23} | "
          f"{'waits':>5} {'errors h/o':>10}")


def row(backend: str, preload: int, concurrency: int, hep: Result, opt: Result) -> str:
    ratio = hep.rate / opt.rate if opt.rate else float("inf")
    return (f"{backend:<10} {preload:>7} {concurrency:>3} | {hep.rate:>9.1f} {opt.rate:>9.1f} {ratio:>6.1f} | "
            f"{hep.ask_ms(0.5):>10.1f} /{hep.ask_ms(0.99):>9.1f} {opt.ask_ms(0.5):>10.1f} /{opt.ask_ms(0.99):>9.1f} | "
            f"{_per_cycle(hep.server_cpu_seconds, hep):>5.1f}+{_per_cycle(hep.cpu_seconds, hep):<5.1f}"
            f"={hep.cpu_ms_per_cycle():>5.1f} /{opt.cpu_ms_per_cycle():>5.1f} | "
            f"{hep.waits:>5} {len(hep.errors):>4}/{len(opt.errors):<5}")


def _per_cycle(seconds: float, result: Result) -> float:
    return 1000 * seconds / result.cycles if result.cycles else float("nan")


def ceiling_row(ceiling: Result) -> str:
    return (f"  ceiling: GET /health {ceiling.rate:.0f} requests/s = {ceiling.rate / REQUESTS_PER_CYCLE:.1f} "
            f"cycles/s; CPU ms/request server {_per_cycle(ceiling.server_cpu_seconds, ceiling):.2f} + "
            f"clients {_per_cycle(ceiling.cpu_seconds, ceiling):.2f}; errors {len(ceiling.errors)}")


def verdict(backend: str, concurrency: int, hep: Result, opt: Result) -> str | None:
    if backend != "sqlite" or concurrency != TARGET_CONCURRENCY:
        return None
    ratio = hep.rate / opt.rate if opt.rate else float("inf")
    ok = ratio >= TARGET_RATIO and hep.ask_ms(0.99) < TARGET_P99_MS
    return (f"  target (ratio >= {TARGET_RATIO:g}, p99 ask < {TARGET_P99_MS:g} ms): "
            f"{'met' if ok else 'MISSED'} (ratio {ratio:.1f}, p99 {hep.ask_ms(0.99):.1f} ms)")


def describe_machine() -> str:
    import optuna

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}: {os.cpu_count()} CPUs, load {load:.1f}, Python {platform.python_version()}, "
            f"optuna {optuna.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite", help="sqlite (default), postgres (a private cluster), or a "
                        "postgresql:// URL of a server on which scratch databases may be created")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="thread counts C")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measurement time per run")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure GET /health with the same clients on the same server")
    parser.add_argument("--workers", type=int, default=DEFAULT_SERVER_WORKERS,
                        help=f"server processes of hepopt serve (default: {DEFAULT_SERVER_WORKERS})")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the C hepopt clients are spread over (default: 1, all threads of this one)")
    parser.add_argument("--preload", type=int, nargs="+", default=[0, PRELOAD_POINTS],
                        help="finished points already in the study (default: 0 and 10000)")
    args = parser.parse_args()
    print(describe_machine())
    print(f"cycle = ask + {REPORTS_PER_CYCLE} reports + tell; {args.seconds:g} s per run; "
          f"hepopt serve --workers {args.workers}; hepopt clients in {args.client_processes} process(es)\n")
    print(HEADER)
    print("-" * len(HEADER))
    workdir = Path(tempfile.mkdtemp(prefix="hepopt-bench-"))
    verdicts = []
    try:
        with Databases(args.db, workdir) as dbs:
            for preload in args.preload:
                for concurrency in args.concurrency:
                    run_dir = workdir / f"hepopt-{preload}-{concurrency}"
                    run_dir.mkdir()
                    hep, ceiling = bench_hepopt(dbs.fresh("hepopt"), run_dir, concurrency, preload, args.seconds,
                                                args.ceiling, args.workers, args.client_processes)
                    opt = bench_optuna(dbs.fresh("optuna"), concurrency, preload, args.seconds)
                    print(row(dbs.kind, preload, concurrency, hep, opt), flush=True)
                    if ceiling is not None:
                        print(ceiling_row(ceiling), flush=True)
                    for name, result in (("hepopt", hep), ("optuna", opt)):
                        for error in sorted(set(result.errors))[:3]:
                            print(f"  {name} error: {error}")
                    verdicts.append(verdict(dbs.kind, concurrency, hep, opt))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for line in filter(None, verdicts):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
