"""Backends under test, and a real, private PostgreSQL server for them (DESIGN.md §6).

Every conformance test runs once per backend through the ``storage`` fixture. The session starts its
own PostgreSQL cluster with ``initdb`` + ``pg_ctl`` in a temporary directory on a free loopback port
(as the ``postgres`` or ``nobody`` user when the tests run as root, since PostgreSQL refuses to run as
root) and removes it afterwards. Missing server binaries make the PostgreSQL tests fail, never skip:
a silently skipped backend is an untested one. ``HEPOPT_TEST_POSTGRES_URL`` points the tests at an
existing server instead (e.g. a CI service container).
"""

from __future__ import annotations

import getpass
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hepopt.task import Task, parse_task
from orchestrator.storage.sql import SQLStorage

BACKENDS = ("sqlite", "postgresql")
SPACE = {"x": {"method": "uniform", "dimension": {"low": 0.0, "high": 1.0}}}
EXTERNAL_URL_ENV = "HEPOPT_TEST_POSTGRES_URL"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found, so the PostgreSQL backend cannot be "
    "tested. Install them with `apt-get install postgresql` (Debian/Ubuntu; they land in "
    "/usr/lib/postgresql/<version>/bin), or set HEPOPT_TEST_POSTGRES_URL to a superuser URL of a server "
    "on which the tests may create databases."
)
#: Users PostgreSQL may run as when the tests themselves run as root, in order of preference.
UNPRIVILEGED_USERS = ("postgres", "nobody")
START_TIMEOUT_S = 30
START_ATTEMPTS = 3
#: Durability is pointless for a throw-away test cluster; these settings make it several times faster.
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"


# -- the private PostgreSQL server -------------------------------------------------------------
@dataclass
class PostgresServer:
    """A server the tests may create and drop databases on; ``admin_url`` reaches database postgres."""

    admin_url: str
    #: A private cluster is deleted whole at the end, so its databases need no dropping (which forces
    #: a checkpoint, seconds on a busy machine).
    private: bool = False
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def url_for(self, database: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + database

    def create_database(self) -> str:
        name = f"hepopt_test_{os.getpid()}_{next(self._counter)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def empty_tables(self, name: str) -> None:
        """Delete every row and reset ids, keeping the schema (and Alembic's version row)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for(name), autocommit=True) as conn:
            tables = [row[0] for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
            if tables:
                names = sql.SQL(", ").join(map(sql.Identifier, tables))
                conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(names))

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)


def find_pg_bindir() -> Path | None:
    """Where initdb and pg_ctl live: on PATH, or Debian's versioned directory (newest first)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
                        reverse=True)
    return candidates[0].parent if candidates else None


def _run_as() -> tuple[list[str], str | None]:
    """Command prefix that drops root, and the user it switches to (none when not root)."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    for user in UNPRIVILEGED_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        if runuser:
            return [runuser, "-u", user, "--"], user
    pytest.fail("running as root, but neither `runuser` nor a postgres/nobody user exists to run PostgreSQL",
                pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(prefix: list[str], bindir: Path, data: Path, base: Path, log: Path) -> int:
    """Start the server on a free port (retrying if another process grabbed it first)."""
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        options = f"-h 127.0.0.1 -p {port} -k {base} {SERVER_OPTIONS}"
        result = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                 "-w", "-t", str(START_TIMEOUT_S), "start"], capture_output=True, text=True,
                                check=False)
        if result.returncode == 0:
            return port
    server_log = log.read_text(errors="replace") if log.exists() else ""
    pytest.fail(f"pg_ctl start failed: {result.stdout}{result.stderr}\n{server_log}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster for the whole test session."""
    external = os.environ.get(EXTERNAL_URL_ENV)
    if external:
        yield PostgresServer(external)
        return
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    prefix, user = _run_as()
    base = Path(tempfile.mkdtemp(prefix="hepopt-pg-"))
    if user is not None:
        shutil.chown(base, user=user)
    data, log = base / "data", base / "server.log"
    superuser = "postgres" if user is not None else getpass.getuser()
    try:
        initdb = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", superuser, "--auth=trust",
                                 "-E", "UTF8", "--no-sync"], capture_output=True, text=True, check=False)
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed: {initdb.stdout}{initdb.stderr}", pytrace=False)
        port = _start(prefix, bindir, data, base, log)
        yield PostgresServer(f"postgresql://{superuser}@127.0.0.1:{port}/postgres", private=True)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database without any table, dropped after the test (creating one takes ~0.5 s)."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url_for(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def postgres_shared_database(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    try:
        yield name
    finally:
        if not postgres_server.private:
            postgres_server.drop_database(name)


@pytest.fixture
def postgres_clean_url(postgres_server: PostgresServer, postgres_shared_database: str) -> str:
    """A database shared by the session whose tables (if any) are emptied for each test: the fast way."""
    postgres_server.empty_tables(postgres_shared_database)
    return postgres_server.url_for(postgres_shared_database)


# -- backends ------------------------------------------------------------------------------------
@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hepopt.db'}"
    return request.getfixturevalue("postgres_clean_url")


@pytest.fixture
def storage(storage_url: str) -> Iterator[SQLStorage]:
    store = SQLStorage(storage_url)
    yield store
    store.close()


@pytest.fixture
def make_task() -> Callable[..., Task]:
    """``make_task(maxPoints=3, hepopt={"maxAttempts": 2})``: a valid task with the given keys."""

    def build(**keys: Any) -> Task:
        return parse_task({"evaluationExec": "python train.py", "searchSpace": SPACE, **keys})

    return build


@pytest.fixture
def points() -> Callable[[int], list[dict[str, float]]]:
    """``points(n)``: n distinct points of the test space."""
    return lambda n: [{"x": i / (n + 1)} for i in range(n)]
