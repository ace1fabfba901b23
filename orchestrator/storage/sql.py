"""SQL backend of :class:`~orchestrator.storage.base.Storage` for SQLite and PostgreSQL.

Concurrency rules, the reason this module exists:

* SQLite runs in WAL mode (readers never block the writer) and every write transaction starts with
  ``BEGIN IMMEDIATE``, so a transaction never has to upgrade a read lock to a write lock — the case in
  which SQLite answers "database is locked" at once instead of waiting. Threads of one process
  additionally queue on one lock per database file, and other processes wait on ``busy_timeout``; a
  busy error that still escapes is retried with the whole transaction.
* PostgreSQL locks rows: a write locks point rows first (in id order), then the study row, always in
  that order (no deadlocks). The study row is every writer's meeting point, so the hot paths lock it
  last, just before they commit: ``lease`` picks its point with ``SKIP LOCKED`` and then claims the
  evaluation job with one conditional ``UPDATE`` of the study (running, budget left) that commits at
  once or refuses, so concurrent leases queue on the study row for one statement, not a transaction;
  ``finish`` locks the study after its point to see every other finish before deciding completion;
  ``heartbeat`` never locks it. The locks are ``FOR NO KEY UPDATE`` (no key ever changes), so the
  foreign-key checks of inserts (``KEY SHARE``) never wait on them; ``report`` only share-locks its
  point, so reports of different points never queue on the study row.
* A partial unique index allows one open lease per point, so the database itself refuses a double lease.
* With ``now=None`` the clock is read inside the transaction, after its locks, so stored times follow
  commit order (a lease never starts before the release that freed its point).
* The hot paths of the worker protocol (``lease``, ``report``, ``finish``, and ``add_points`` for
  steering) are Core statements compiled once and run on the driver's cursor
  (:mod:`orchestrator.storage.direct`): an ORM unit of work costs several times the SQL it runs, and
  SQLAlchemy's execution machinery still several times more than SQLite. Concurrent leases, reports,
  finishes and steering's new points are written together, one transaction per batch
  (:mod:`orchestrator.storage.group_commit`), each caller still getting its own answer or error.

Opening a storage runs the Alembic migrations up to head under a lock, so several processes may open
the same database at once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    Integer,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from hepopt.errors import SpecError
from hepopt.task import Task
from orchestrator.storage.base import (
    FINAL_STATES,
    CheckpointMeta,
    ConflictError,
    FinishResult,
    InvalidValueError,
    Lease,
    NotFoundError,
    PointCounts,
    PointRecord,
    PointState,
    Progress,
    StaleLeaseError,
    Storage,
    StorageError,
    StudyRecord,
    StudyState,
    TokenInfo,
    clock,
)
from orchestrator.storage.direct import Compiled, DirectCursor, KeptConnection, compile_for
from orchestrator.storage.group_commit import GroupCommit, Pending
from orchestrator.storage.models import (
    NAME_LENGTH,
    REQUEST_ID_LENGTH,
    CheckpointRow,
    IntermediateRow,
    LeaseRow,
    PointRow,
    StudyRow,
    TokenRow,
)
from steering_container.api import Observation

T = TypeVar("T")

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: How long a SQLite writer waits for another process's write transaction before giving up.
SQLITE_BUSY_TIMEOUT_S = 60.0
#: Whole-transaction retries for busy (SQLite) or deadlock/serialization (PostgreSQL) errors.
MAX_TRANSACTION_ATTEMPTS = 8
RETRY_BASE_DELAY_S = 0.02
#: Connections kept per engine: at least the server's request threads (anyio's default limiter is 40),
#: so a busy server never closes and reopens connections (and reruns their setup) per request.
POOL_SIZE = 48
POOL_MAX_OVERFLOW = 16
#: How long the hot paths' kept connection may sit idle before it is checked (pinged) again.
KEPT_CONNECTION_IDLE_S = 10.0
#: Parsed tasks kept in memory (by their stored JSON text).
TASK_CACHE_SIZE = 1024
#: Points that add_points hands to the group commit at a time: each chunk joins the leases, reports and
#: finishes queued with it, so a steering batch takes turns with the requests. Inserted in one
#: transaction, a 512-point batch held every lease, report and finish for 50-100 ms under load; in
#: chunks of their own, the chunks followed one another on the write lock for ~50 ms all the same.
APPEND_CHUNK_POINTS = 64
#: Key of the PostgreSQL advisory lock that serialises migrations ("hepo" in ASCII).
MIGRATION_LOCK_KEY = 0x6865706F
#: Secret lengths in random bytes; bearer tokens carry a prefix so secret scanners can spot them.
TOKEN_BYTES = 32
LEASE_TOKEN_BYTES = 24
TOKEN_PREFIX = "hpo_"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
#: Execution option that makes the SQLite ``begin`` hook emit BEGIN IMMEDIATE.
WRITE_OPTION = "hepopt_write"
#: SQLSTATEs worth retrying the whole transaction for: deadlock detected, serialization failure.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})

_SQLITE_WRITE_LOCKS: dict[str, threading.RLock] = {}
_SQLITE_WRITE_LOCKS_GUARD = threading.Lock()

STUDIES: Table = StudyRow.__table__  # type: ignore[assignment]
POINTS: Table = PointRow.__table__  # type: ignore[assignment]
LEASES: Table = LeaseRow.__table__  # type: ignore[assignment]
INTERMEDIATE: Table = IntermediateRow.__table__  # type: ignore[assignment]
CHECKPOINTS: Table = CheckpointRow.__table__  # type: ignore[assignment]
TOKENS: Table = TokenRow.__table__  # type: ignore[assignment]
#: Row locks of writers: exclusive among writers, but compatible with foreign-key checks (KEY SHARE).
NO_KEY_UPDATE: dict[str, Any] = {"key_share": True}


@functools.cache
def head_revision() -> str:
    """The newest migration shipped with this code (read once per process)."""
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found under {MIGRATIONS_DIR}")
    return head


def hash_secret(secret: str) -> str:
    """The stored form of a bearer token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def normalize_url(url: str | URL) -> URL:
    """A SQLAlchemy URL; bare ``postgresql://`` means psycopg 3, the driver hepopt installs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


class SQLStorage(Storage):
    """Storage on a SQLAlchemy URL: ``sqlite:///path/to/hepopt.db`` or ``postgresql://user@host/db``."""

    def __init__(self, url: str | URL, *, migrate: bool = True) -> None:
        self.url = normalize_url(url)
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite or postgresql")
        self.engine = _make_engine(self.url) if self.dialect == "sqlite" else _make_pg_engine(self.url)
        self._write_lock = _sqlite_write_lock(self.url, self.engine) if self.dialect == "sqlite" else None
        self._writes: GroupCommit[_Write] = GroupCommit(self._write_batch)
        self._hot = _HotPath(self.engine.dialect)
        self._kept = KeptConnection(self.engine, KEPT_CONNECTION_IDLE_S)
        dbapi = self.engine.dialect.loaded_dbapi
        self._integrity_error: type[Exception] = dbapi.IntegrityError
        self._transient: tuple[type[Exception], ...] = (OperationalError, dbapi.OperationalError)
        if migrate:
            self.upgrade()

    # -- plumbing ------------------------------------------------------------------------------
    def upgrade(self) -> None:
        """Bring the schema to the newest migration; concurrent callers wait for each other."""
        if self.schema_revision() == head_revision():
            return
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._writer(True), self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                config.attributes["connection"] = conn
                command.upgrade(config, "head")

    def schema_revision(self) -> str | None:
        """The migration the database is at; None for an empty database."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def shared_url(self) -> str | None:
        if self.dialect == "sqlite" and self.url.database in (None, "", ":memory:"):
            return None
        return self.url.render_as_string(hide_password=False)

    def close(self) -> None:
        self._writes.close()
        self._kept.close()
        self.engine.dispose()

    def _writer(self, write: bool) -> threading.RLock | nullcontext[None]:
        return self._write_lock if write and self._write_lock is not None else nullcontext()

    def _run(self, work: Callable[[Session], T], write: bool = True) -> T:
        """Run ``work`` in one ORM session transaction, retrying it whole on transient lock errors."""
        def once() -> T:
            with self._writer(write), self._session(write) as session:
                return work(session)

        return _retrying(once, self._transient)

    def _run_core(self, work: Callable[[Connection], T], write: bool = True) -> T:
        """As :meth:`_run`, for Core statements on a bare connection."""
        def once() -> T:
            with self._writer(write), self._connection(write) as conn:
                return work(conn)

        return _retrying(once, self._transient)

    def _run_direct(self, work: Callable[[DirectCursor], T]) -> T:
        """As :meth:`_run`, for the hot paths' compiled statements on the driver's cursor (a write)."""
        def once() -> T:
            with self._writer(True), self._direct_transaction() as cursor:
                return work(cursor)

        return _retrying(once, self._transient)

    @contextmanager
    def _direct_transaction(self) -> Iterator[DirectCursor]:
        """A pooled driver connection in a write transaction, committed when the block ends.

        SQLite's connections are in autocommit mode (see :func:`_make_engine`), so the transaction is
        begun here, IMMEDIATE; psycopg begins one with the first statement."""
        with self._kept.borrow() as pooled:
            cursor = pooled.cursor()
            try:
                if self.dialect == "sqlite":
                    cursor.execute("BEGIN IMMEDIATE")
                yield DirectCursor(cursor)
                pooled.commit()
            except BaseException as exc:
                _abandon(pooled, cursor, exc, self.engine.dialect)
                raise

    @contextmanager
    def _connection(self, write: bool) -> Iterator[Connection]:
        """A connection inside a transaction that has begun (SQLite holds its write lock, if ``write``)."""
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: write})
            with conn.begin():
                yield conn

    @contextmanager
    def _session(self, write: bool) -> Iterator[Session]:
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: write})
            with Session(bind=conn, expire_on_commit=False, autoflush=True) as session, session.begin():
                session.connection()  # BEGIN now: SQLite takes its write lock before work reads the clock
                yield session

    # -- tokens --------------------------------------------------------------------------------
    def create_token(self, user: str, study_id: int | None = None, expires_at: float | None = None,
                     now: float | None = None) -> str:
        _bounded(user, NAME_LENGTH, "user")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        created = clock(now)

        def work(s: Session) -> None:
            if study_id is not None:
                _study(s, study_id, owner=user)
            s.add(TokenRow(token_hash=hash_secret(secret), user=user, study_id=study_id,
                           created_at=created, expires_at=expires_at))

        self._run(work)
        return secret

    def verify_token(self, secret: str, now: float | None = None) -> TokenInfo | None:
        def work(conn: Connection) -> TokenInfo | None:
            info = _token_info(conn, hash_secret(secret))
            if info is None or (info.expires_at is not None and info.expires_at <= clock(now)):
                return None
            return info

        return self._run_core(work, write=False)

    def revoke_token(self, secret: str) -> bool:
        def work(s: Session) -> bool:
            row = s.scalars(select(TokenRow).where(TokenRow.token_hash == hash_secret(secret))).first()
            if row is None:
                return False
            s.delete(row)
            return True

        return self._run(work)

    # -- studies -------------------------------------------------------------------------------
    def create_study(self, owner: str, task: Task, name: str | None = None,
                     now: float | None = None) -> StudyRecord:
        if task.searchSpace is None:
            raise SpecError([("searchSpaceFile", "inline the search space (parse_task does) before storing")])
        _bounded(owner, NAME_LENGTH, "owner")
        _bounded(name, NAME_LENGTH, "study name")
        options = task.hepopt

        def work(s: Session) -> StudyRecord:
            at = clock(now)
            row = StudyRow(owner=owner, name=name, task_json=json.dumps(task.to_json()), state=StudyState.RUNNING,
                           message=None, max_points=task.maxPoints, max_evaluation_jobs=task.evaluation_jobs_limit,
                           max_attempts=options.maxAttempts, lease_seconds=options.leaseSeconds,
                           direction=options.direction, failed_loss=options.failedLoss, n_points=0,
                           evaluation_jobs=0, created_at=at, updated_at=at)
            s.add(row)
            s.flush()
            return _study_record(row)

        return self._run(work)

    def get_study(self, study_id: int, owner: str | None = None) -> StudyRecord:
        return self._run(lambda s: _study_record(_study(s, study_id, owner, lock=False)), write=False)

    def list_studies(self, owner: str | None = None, state: StudyState | None = None) -> list[StudyRecord]:
        query = select(StudyRow).order_by(StudyRow.id)
        if owner is not None:
            query = query.where(StudyRow.owner == owner)
        if state is not None:
            query = query.where(StudyRow.state == StudyState(state))
        return self._run(lambda s: [_study_record(row) for row in s.scalars(query)], write=False)

    def cancel_study(self, study_id: int, owner: str | None = None, now: float | None = None) -> StudyRecord:
        def work(s: Session) -> StudyRecord:
            study = _study(s, study_id, owner)
            at = clock(now)
            if study.state == StudyState.RUNNING:
                _set_state(study, StudyState.CANCELLED, "cancelled by the owner", at)
            return _study_record(study)

        return self._run(work)

    def set_study_state(self, study_id: int, state: StudyState, message: str | None = None,
                        now: float | None = None) -> StudyRecord:
        def work(s: Session) -> StudyRecord:
            study = _study(s, study_id)
            at = clock(now)
            _set_state(study, StudyState(state), message, at)
            return _study_record(study)

        return self._run(work)

    def begin_steering(self, study_id: int, stale_after: float, now: float | None = None) -> bool:
        def work(s: Session) -> bool:
            study = _study(s, study_id)
            at = clock(now)
            started = study.steering_started_at
            if study.state != StudyState.RUNNING or (started is not None and at - started < stale_after):
                return False
            study.steering_started_at = at
            study.updated_at = at
            return True

        return self._run(work)

    def renew_steering(self, study_id: int, now: float | None = None) -> None:
        def work(s: Session) -> None:
            study = _study(s, study_id)
            if study.steering_started_at is not None:
                study.steering_started_at = clock(now)

        self._run(work)

    def end_steering(self, study_id: int, error: str | None = None, now: float | None = None) -> StudyRecord:
        def work(s: Session) -> StudyRecord:
            study = _study(s, study_id)
            at = clock(now)
            study.steering_started_at = None
            study.steering_error = error
            study.updated_at = at
            return _study_record(study)

        return self._run(work)

    # -- points --------------------------------------------------------------------------------
    def add_points(self, study_id: int, params_list: Sequence[dict[str, Any]], origin: str = "steering",
                   now: float | None = None) -> list[PointRecord]:
        _bounded(origin, NAME_LENGTH, "origin")
        encoded = [_encode_params(params, i) for i, params in enumerate(params_list)]
        at = clock(now)
        added: list[PointRecord] = []
        for start in range(0, max(len(encoded), 1), APPEND_CHUNK_POINTS):  # once for none: a missing study raises
            chunk = encoded[start:start + APPEND_CHUNK_POINTS]
            ids, first = self._writes.submit(_Append(study_id, tuple(chunk), origin, at))
            added += [PointRecord(id=point_id, study_id=study_id, number=first + i, params=json.loads(params),
                                  state=PointState.NEW, origin=origin, attempt=0, loss=None, message=None,
                                  worker_id=None, lease_expires_at=None, created_at=at, updated_at=at,
                                  finished_at=None)
                      for i, (point_id, params) in enumerate(zip(ids, chunk[:len(ids)], strict=True))]
            if len(ids) < len(chunk):
                break
        return added

    def get_point(self, point_id: int, study_id: int | None = None) -> PointRecord:
        def work(s: Session) -> PointRecord:
            row = s.get(PointRow, point_id)
            if row is None or (study_id is not None and row.study_id != study_id):
                raise NotFoundError(f"point {point_id} not found")
            return _point_record(row)

        return self._run(work, write=False)

    def list_points(self, study_id: int, state: PointState | None = None) -> list[PointRecord]:
        def work(s: Session) -> list[PointRecord]:
            _study(s, study_id, lock=False)
            query = select(PointRow).where(PointRow.study_id == study_id).order_by(PointRow.number)
            if state is not None:
                query = query.where(PointRow.state == PointState(state))
            return [_point_record(row) for row in s.scalars(query)]

        return self._run(work, write=False)

    def lease(self, study_id: int, worker_id: str, now: float | None = None) -> Lease | None:
        return self._writes.submit(_ask(study_id, worker_id, now))

    async def lease_async(self, study_id: int, worker_id: str, now: float | None = None) -> Lease | None:
        return await self._writes.submit_async(_ask(study_id, worker_id, now))

    def heartbeat(self, point_id: int, lease_token: str, now: float | None = None, *,
                  study_id: int | None = None) -> Lease:
        def work(s: Session) -> Lease:
            study, point = _leased_point(s, point_id, lease_token, study_id, lock_study=False)
            at = clock(now)
            point.lease_expires_at = at + study.lease_seconds
            point.updated_at = at
            _lease_row(s, lease_token).expires_at = point.lease_expires_at
            return _lease(point, study)

        return self._run(work)

    def report(self, point_id: int, lease_token: str, step: int, value: float, now: float | None = None, *,
               study_id: int | None = None) -> None:
        self._writes.submit(_report(point_id, lease_token, step, value, now, study_id))

    async def report_async(self, point_id: int, lease_token: str, step: int, value: float,
                           now: float | None = None, *, study_id: int | None = None) -> None:
        await self._writes.submit_async(_report(point_id, lease_token, step, value, now, study_id))

    def _write_batch(self, batch: list[Pending[_Write]]) -> None:
        """One transaction for the leases, reports, finishes and steering's points queued meanwhile (see
        :class:`GroupCommit`).

        An item refused on its own merits (a stale lease, no point to lease) gets its error or result
        within the batch. Should the batch transaction fail as a whole (a concurrent process won a race
        the batch lost, which rolls back everything), each item is written again in a transaction of its
        own, so one item's failure is never another's."""
        if len(batch) > 1:
            try:
                self._run_direct(lambda cur: _apply_writes(cur, self._hot, batch))
                return
            except Exception:
                log.debug("a batch of %d writes failed; writing them one by one", len(batch), exc_info=True)
        for pending in batch:
            self._write_alone(pending)

    def _write_alone(self, pending: Pending[_Write]) -> None:
        try:
            self._run_direct(lambda cur: _apply_writes(cur, self._hot, [pending]))
        except _NoJobLeft:
            pending.result, pending.error = None, None
        except self._integrity_error as exc:
            # A concurrent process finished another point under the same request id first.
            pending.error = (_request_id_conflict(pending.item.request_id) if isinstance(pending.item, _Finish)
                             else exc)
        except Exception as exc:
            pending.error = exc

    def finish(self, point_id: int, lease_token: str, status: PointState, loss: float | None = None, *,
               request_id: str | None = None, message: str | None = None, now: float | None = None,
               study_id: int | None = None) -> FinishResult:
        return self._writes.submit(_finish(point_id, lease_token, status, loss, request_id, message, study_id, now))

    async def finish_async(self, point_id: int, lease_token: str, status: PointState, loss: float | None = None,
                           *, request_id: str | None = None, message: str | None = None, now: float | None = None,
                           study_id: int | None = None) -> FinishResult:
        return await self._writes.submit_async(_finish(point_id, lease_token, status, loss, request_id, message,
                                                       study_id, now))

    def release(self, point_id: int, lease_token: str, now: float | None = None, *,
                study_id: int | None = None) -> PointRecord:
        def work(s: Session) -> PointRecord:
            study, point = _leased_point(s, point_id, lease_token, study_id)
            at = clock(now)
            _end_lease(s, point, "released", at)
            point.state = PointState.NEW
            _settle(s, study, at)
            return _point_record(point)

        return self._run(work)

    def reap_expired(self, now: float | None = None) -> int:
        def work(s: Session) -> int:
            at = clock(now)
            query = (select(PointRow).where(PointRow.state == PointState.RUNNING, PointRow.lease_expires_at < at)
                     .order_by(PointRow.id).with_for_update(**NO_KEY_UPDATE))
            by_study: dict[int, list[PointRow]] = {}
            for point in s.scalars(query).all():
                by_study.setdefault(point.study_id, []).append(point)
            for study_id in sorted(by_study):
                study = _study(s, study_id)
                for point in by_study[study_id]:
                    _expire(s, study, point, at)
                _settle(s, study, at)
            return sum(map(len, by_study.values()))

        return self._run(work)

    # -- reading -------------------------------------------------------------------------------
    def history(self, study_id: int) -> list[Observation]:
        def work(s: Session) -> list[Observation]:
            _study(s, study_id, lock=False)
            rows = s.execute(select(PointRow.params_json, PointRow.loss, PointRow.state)
                             .where(PointRow.study_id == study_id).order_by(PointRow.number)).all()
            return _observations(rows)

        return self._run(work, write=False)

    def intermediate_values(self, study_id: int) -> dict[int, dict[int, float]]:
        def work(s: Session) -> dict[int, dict[int, float]]:
            _study(s, study_id, lock=False)
            rows = s.execute(select(IntermediateRow.point_id, IntermediateRow.step, IntermediateRow.value)
                             .where(IntermediateRow.study_id == study_id)
                             .order_by(IntermediateRow.point_id, IntermediateRow.step))
            curves: dict[int, dict[int, float]] = {}
            for point_id, step, value in rows:
                curves.setdefault(point_id, {})[step] = value
            return curves

        return self._run(work, write=False)

    def counts(self, study_id: int) -> PointCounts:
        def work(s: Session) -> PointCounts:
            study = _study(s, study_id, lock=False)
            return PointCounts(**_state_counts(s, study_id), evaluation_jobs=study.evaluation_jobs)

        return self._run(work, write=False)

    def progress(self, study_id: int) -> Progress:
        def work(conn: Connection) -> Progress:
            study = conn.execute(select(STUDIES.c.n_points, STUDIES.c.evaluation_jobs)
                                 .where(STUDIES.c.id == study_id)).first()
            if study is None:
                raise NotFoundError(f"study {study_id} not found")
            open_counts = _state_counts(conn, study_id, (PointState.NEW, PointState.RUNNING))
            return Progress(**open_counts, total=study.n_points, evaluation_jobs=study.evaluation_jobs)

        return self._run_core(work, write=False)

    def best_point(self, study_id: int) -> PointRecord | None:
        def work(s: Session) -> PointRecord | None:
            study = _study(s, study_id, lock=False)
            order = PointRow.loss.desc() if study.direction == "maximize" else PointRow.loss.asc()
            row = s.scalars(select(PointRow)
                            .where(PointRow.study_id == study_id, PointRow.state == PointState.DONE)
                            .order_by(order, PointRow.number).limit(1)).first()
            return None if row is None else _point_record(row)

        return self._run(work, write=False)

    # -- checkpoints ---------------------------------------------------------------------------
    def put_checkpoint_meta(self, point_id: int, path: str, sha256: str, size: int,
                            now: float | None = None) -> CheckpointMeta:
        if not SHA256_HEX.match(sha256):
            raise InvalidValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidValueError(f"size must be an integer >= 0, got {size!r}")

        def work(s: Session) -> CheckpointMeta:
            _locked_point(s, point_id)
            at = clock(now)
            row = s.get(CheckpointRow, point_id)
            if row is None:
                row = CheckpointRow(point_id=point_id)
                s.add(row)
            row.path, row.sha256, row.size, row.updated_at = path, sha256, size, at
            return _checkpoint(row)

        return self._run(work)

    def get_checkpoint_meta(self, point_id: int) -> CheckpointMeta | None:
        def work(s: Session) -> CheckpointMeta | None:
            row = s.get(CheckpointRow, point_id)
            return None if row is None else _checkpoint(row)

        return self._run(work, write=False)


# -- engines ----------------------------------------------------------------------------------
def _make_engine(url: URL) -> Engine:
    """A SQLite engine whose transactions we begin ourselves (see the module docstring)."""
    memory = url.database in (None, "", ":memory:")
    if memory:
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW,
                               connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN from the driver
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            # Switching a fresh file to WAL takes an exclusive lock, and where waiting for it could
            # deadlock with another connection's write SQLite answers "locked" at once, busy timeout or not.
            _retrying(lambda: cursor.execute("PRAGMA journal_mode = WAL"), (sqlite3.OperationalError,))
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

    return engine


def _make_pg_engine(url: URL) -> Engine:
    return create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW, pool_pre_ping=True)


def _sqlite_write_lock(url: URL, engine: Engine) -> threading.RLock:
    """One lock per database file for the whole process, shared by every storage opened on it."""
    database = url.database
    key = f"memory:{id(engine)}" if database in (None, "", ":memory:") else str(Path(database).resolve())
    with _SQLITE_WRITE_LOCKS_GUARD:
        return _SQLITE_WRITE_LOCKS.setdefault(key, threading.RLock())


def _retryable(exc: Exception) -> bool:
    """Whether a driver error (or SQLAlchemy's wrapper of one) is a lock conflict worth a retry."""
    error = getattr(exc, "orig", exc)
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in RETRYABLE_SQLSTATES
    message = str(error).lower()
    return "database is locked" in message or "database is busy" in message


def _retrying(once: Callable[[], T], transient: tuple[type[Exception], ...]) -> T:
    """Run one whole transaction, again (with jittered backoff) on transient lock errors, which are
    instances of ``transient`` (SQLAlchemy's and the driver's OperationalError) that :func:`_retryable`
    recognises."""
    for attempt in range(MAX_TRANSACTION_ATTEMPTS):
        try:
            return once()
        except transient as exc:
            if attempt + 1 == MAX_TRANSACTION_ATTEMPTS or not _retryable(exc):
                raise
        time.sleep(RETRY_BASE_DELAY_S * (2 ** attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def _abandon(pooled: Any, cursor: Any, exc: BaseException, dialect: Dialect) -> None:
    """Roll back a failed direct transaction; a connection that is broken or cannot roll back is
    dropped from the pool instead of being handed to the next caller."""
    broken = isinstance(exc, dialect.loaded_dbapi.Error) and dialect.is_disconnect(exc, pooled.dbapi_connection,
                                                                                   cursor)
    if not broken:
        try:
            pooled.rollback()
            return
        except Exception:
            pass
    pooled.invalidate()


# -- row helpers (inside a transaction) --------------------------------------------------------
def _study(s: Session, study_id: int, owner: str | None = None, lock: bool = True) -> StudyRow:
    """The study row, locked for update unless ``lock`` is False; a foreign owner looks like no study."""
    row = s.get(StudyRow, study_id, with_for_update=NO_KEY_UPDATE if lock else None)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"study {study_id} not found")
    return row


def _locked_point(s: Session, point_id: int) -> PointRow:
    row = s.get(PointRow, point_id, with_for_update=NO_KEY_UPDATE, populate_existing=True)
    if row is None:
        raise NotFoundError(f"point {point_id} not found")
    return row


def _leased_point(s: Session, point_id: int, lease_token: str, study_id: int | None = None,
                  lock_study: bool = True) -> tuple[StudyRow, PointRow]:
    """Study and point, the point locked first (then the study, if ``lock_study``), after checking that
    the lease token is current; with ``study_id``, a point of another study looks like no point."""
    point = _locked_point(s, point_id)
    if study_id is not None and point.study_id != study_id:
        raise NotFoundError(f"point {point_id} not found")
    study = _study(s, point.study_id, lock=lock_study)
    _check_lease(point, lease_token)
    return study, point


def _check_lease(point: PointRow, lease_token: str) -> None:
    _check_token(point.id, point.state, point.lease_token, lease_token)


def _check_token(point_id: int, state: str, current: str | None, lease_token: str) -> None:
    """StaleLeaseError unless the point is RUNNING under ``lease_token`` (compared in constant time)."""
    if state != PointState.RUNNING or current is None or not hmac.compare_digest(current, lease_token):
        raise StaleLeaseError(f"lease of point {point_id} is no longer valid (the point is {state}); "
                              "drop the point")


def _lease_row(s: Session, lease_token: str) -> LeaseRow:
    return s.scalars(select(LeaseRow).where(LeaseRow.lease_token == lease_token)).one()


def _end_lease(s: Session, point: PointRow, outcome: PointState | str, at: float) -> None:
    """Close the point's open lease (audit row) and clear the lease from the point."""
    row = _lease_row(s, point.lease_token or "")
    row.ended_at, row.outcome = at, outcome
    point.lease_token = point.worker_id = point.lease_expires_at = None
    point.updated_at = at


def _expire(s: Session, study: StudyRow, point: PointRow, at: float) -> None:
    """An expired lease costs one attempt; the last allowed attempt makes the point FAILED."""
    _end_lease(s, point, "expired", at)
    point.attempt += 1
    if point.attempt >= study.max_attempts:
        point.state, point.loss, point.finished_at = PointState.FAILED, study.failed_loss, at
        point.message = f"lease expired {point.attempt} times (maxAttempts={study.max_attempts})"
    else:
        point.state = PointState.NEW


def _settle(s: Session, study: StudyRow, at: float) -> None:
    """Mark a running study COMPLETED once nothing can change any more."""
    if not _may_complete(study):
        return  # neither rule of _completion can hold: skip counting the study's points
    s.flush()
    message = _completion(study, _state_counts(s, study.id))
    if message is not None:
        _set_state(study, StudyState.COMPLETED, message, at)


def _may_complete(study: Any) -> bool:
    """Whether a study row (ORM or Core) is running with its point or job budget spent."""
    exhausted = study.n_points >= study.max_points or study.evaluation_jobs >= study.max_evaluation_jobs
    return study.state == StudyState.RUNNING and exhausted


def _completion(study: Any, counts: dict[str, int]) -> str | None:
    """Why a study whose budget is spent is now COMPLETED, or None while points may still change."""
    open_points = counts["new"] + counts["running"]
    if study.n_points >= study.max_points and open_points == 0:
        return f"all {study.max_points} points evaluated"
    if study.evaluation_jobs >= study.max_evaluation_jobs and counts["running"] == 0:
        return (f"maxEvaluationJobs ({study.max_evaluation_jobs}) used up; "
                f"{counts['new']} points left unevaluated")
    return None


def _set_state(study: StudyRow, state: StudyState, message: str | None, at: float) -> None:
    study.state, study.message, study.updated_at = state, message, at


def _state_counts(s: Session | Connection, study_id: int,
                  states: Sequence[PointState] = tuple(PointState)) -> dict[str, int]:
    """The study's points counted by state, for ``states`` only (every state by default)."""
    counts = {state.value: 0 for state in states}
    query = select(PointRow.state, func.count()).where(PointRow.study_id == study_id).group_by(PointRow.state)
    if len(counts) < len(PointState):
        query = query.where(PointRow.state.in_(list(counts)))
    rows = s.execute(query)
    for state, n in rows:
        counts[state] = n
    return counts


# -- Core hot paths (inside a transaction) -----------------------------------------------------
def _token_info(conn: Connection, token_hash: str) -> TokenInfo | None:
    t = TOKENS.c
    row = conn.execute(select(t.id, t.user, t.study_id, t.created_at, t.expires_at)
                       .where(t.token_hash == token_hash)).first()
    return None if row is None else TokenInfo(*row)


def _hot_statements() -> dict[str, Any]:
    """The statements of the worker protocol's transactions, written once in Core with named
    parameters; each storage compiles them for its dialect and runs them on the driver's cursor
    (:mod:`orchestrator.storage.direct`)."""
    st, pt, ck, lt = STUDIES.c, POINTS.c, CHECKPOINTS.c, LEASES.c
    used = POINTS.alias("used").c  # the point, if any, that a request id already finished
    study = st.id == bindparam("b_study")
    return {
        # lease
        "lease_study": select(st.state, st.evaluation_jobs, st.max_evaluation_jobs, st.lease_seconds).where(study),
        "next_points": select(pt.id, pt.number, pt.params_json, pt.attempt, ck.point_id.label("checkpoint"),
                              st.state.label("study_state"), st.evaluation_jobs, st.max_evaluation_jobs,
                              st.lease_seconds)
        .select_from(POINTS.join(STUDIES, st.id == pt.study_id).outerjoin(CHECKPOINTS, ck.point_id == pt.id))
        .where(pt.study_id == bindparam("b_study"), pt.state == PointState.NEW.value)
        .order_by(pt.number).limit(bindparam("b_limit", type_=Integer))
        .with_for_update(skip_locked=True, of=POINTS, **NO_KEY_UPDATE),
        "take": update(POINTS).where(pt.id == bindparam("b_point"))
        .values(state=PointState.RUNNING.value, worker_id=bindparam("b_worker"), lease_token=bindparam("b_token"),
                lease_expires_at=bindparam("b_expires"), updated_at=bindparam("b_at")),
        "log_lease": insert(LEASES).values({column: bindparam(column) for column in (
            "point_id", "study_id", "worker_id", "lease_token", "attempt", "started_at", "expires_at")}),
        "claim_jobs": update(STUDIES)
        .where(study, st.state == StudyState.RUNNING.value,
               st.evaluation_jobs + bindparam("b_jobs", type_=Integer) <= st.max_evaluation_jobs)
        .values(evaluation_jobs=st.evaluation_jobs + bindparam("b_jobs", type_=Integer),
                updated_at=bindparam("b_at")),
        # add_points
        "append_study": select(st.state, st.n_points, st.max_points).where(study).with_for_update(**NO_KEY_UPDATE),
        "insert_point": insert(POINTS).values({column: bindparam(column) for column in (
            "study_id", "number", "params_json", "origin", "state", "attempt", "created_at", "updated_at")}),
        "appended_ids": select(pt.id).where(pt.study_id == bindparam("b_study"), pt.number >= bindparam("b_first"))
        .order_by(pt.number),
        "count_points": update(STUDIES).where(study)
        .values(n_points=st.n_points + bindparam("b_added"), updated_at=bindparam("b_at")),
        # finish
        "locked_point": select(POINTS, select(used.id).where(used.finish_request_id == bindparam("b_request"))
                               .scalar_subquery().label("request_used_by"))
        .where(pt.id == bindparam("b_point")).with_for_update(of=POINTS, **NO_KEY_UPDATE),
        "failed_loss": select(st.failed_loss).where(study),
        "end_lease": update(LEASES).where(lt.lease_token == bindparam("b_token"))
        .values(ended_at=bindparam("b_at"), outcome=bindparam("b_state")),
        "finish_point": update(POINTS).where(pt.id == bindparam("b_point"))
        .values(state=bindparam("b_state"), loss=bindparam("b_loss"), message=bindparam("b_message"),
                finish_request_id=bindparam("b_request"), finished_at=bindparam("b_at"), lease_token=None,
                worker_id=None, lease_expires_at=None, updated_at=bindparam("b_at")),
        "locked_study": select(st.state, st.n_points, st.max_points, st.evaluation_jobs, st.max_evaluation_jobs)
        .where(study).with_for_update(**NO_KEY_UPDATE),
        "state_counts": select(pt.state, func.count()).where(pt.study_id == bindparam("b_study")).group_by(pt.state),
        "complete": update(STUDIES).where(study)
        .values(state=StudyState.COMPLETED.value, message=bindparam("b_message"), updated_at=bindparam("b_at")),
    }


HOT_SQL = _hot_statements()


def _upsert_intermediate(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (point_id, step) DO UPDATE: a resent step replaces its value in one statement."""
    statement = (sqlite.insert(INTERMEDIATE) if dialect == "sqlite" else postgresql.insert(INTERMEDIATE)).values(
        {column: bindparam(column) for column in ("point_id", "study_id", "step", "value", "updated_at")})
    excluded = statement.excluded
    return statement.on_conflict_do_update(index_elements=[INTERMEDIATE.c.point_id, INTERMEDIATE.c.step],
                                           set_={"value": excluded.value, "updated_at": excluded.updated_at})


def _reported_points(n: int) -> Any:
    """The points of a batch of ``n`` reports, share-locked in id order."""
    pt = POINTS.c
    return (select(pt.id, pt.study_id, pt.state, pt.lease_token)
            .where(pt.id.in_([bindparam(f"b_point{i}") for i in range(n)])).order_by(pt.id)
            .with_for_update(read=True))


class _HotPath:
    """:data:`HOT_SQL` compiled for one engine's dialect; the report batch's lock is compiled per size."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.sql = {name: compile_for(statement, dialect) for name, statement in HOT_SQL.items()}
        self.sql["upsert_value"] = compile_for(_upsert_intermediate(dialect.name), dialect)
        self._reported: dict[int, Compiled] = {}

    def reported_points(self, n: int) -> Compiled:
        compiled = self._reported.get(n)
        if compiled is None:
            compiled = self._reported[n] = compile_for(_reported_points(n), self.dialect)
        return compiled


class _NoJobLeft(Exception):
    """Raised inside a lease transaction to roll it back: the study stopped or its job budget ran out
    after the points were picked (another process leased meanwhile)."""


@dataclass(frozen=True)
class _Ask:
    """One ``lease`` call waiting for its batch."""

    study_id: int
    worker_id: str
    now: float | None


def _ask(study_id: int, worker_id: str, now: float | None) -> _Ask:
    _bounded(worker_id, NAME_LENGTH, "worker id")
    return _Ask(study_id, worker_id, now)


def _lease_points(cur: DirectCursor, sql: dict[str, Compiled], study_id: int, asks: list[Pending[_Ask]]) -> None:
    """Lease the oldest NEW points that no concurrent leaser holds, one per ask, then claim their jobs.

    The points come with their study's state and budget, read without a lock (a quick refusal when
    nothing can be leased); the claim at the end is the check that counts: a conditional increment
    that succeeds only while the study runs and has the jobs left, taking the study row's lock for the
    last statement before commit. Asks beyond the points or the jobs available get None."""
    points = cur.all(sql["next_points"], b_study=study_id, b_limit=len(asks))
    if not points:
        if cur.first(sql["lease_study"], b_study=study_id) is None:
            for pending in asks:
                pending.error = NotFoundError(f"study {study_id} not found")
        return
    study = points[0]
    if study.study_state != StudyState.RUNNING:
        return
    points = points[:max(0, study.max_evaluation_jobs - study.evaluation_jobs)]
    if not points:
        return
    leases = [_take(cur, sql, pending.item, point, study.lease_seconds)
              for pending, point in zip(asks, points, strict=False)]
    if cur.execute(sql["claim_jobs"], b_study=study_id, b_jobs=len(leases), b_at=clock(asks[0].item.now)) != 1:
        raise _NoJobLeft
    for pending, lease in zip(asks, leases, strict=False):
        pending.result = lease


def _take(cur: DirectCursor, sql: dict[str, Compiled], ask: _Ask, point: Any, lease_seconds: float) -> Lease:
    """Lease ``point`` (locked by the caller) to the asking worker and log the lease."""
    at = clock(ask.now)
    token = secrets.token_hex(LEASE_TOKEN_BYTES)
    expires = at + lease_seconds
    cur.execute(sql["take"], b_point=point.id, b_worker=ask.worker_id, b_token=token, b_expires=expires, b_at=at)
    cur.execute(sql["log_lease"], point_id=point.id, study_id=ask.study_id, worker_id=ask.worker_id,
                lease_token=token, attempt=point.attempt, started_at=at, expires_at=expires)
    return Lease(point_id=point.id, study_id=ask.study_id, number=point.number, params=json.loads(point.params_json),
                 attempt=point.attempt, worker_id=ask.worker_id, lease_token=token, expires_at=expires,
                 has_checkpoint=point.checkpoint is not None)


def _apply_writes(cur: DirectCursor, hot: _HotPath, batch: list[Pending[_Write]]) -> None:
    """Write a batch in one transaction: reports, then finishes and steering's points, then leases
    (grouped by study, so they may take points added in the same batch). May run again on the same
    batch after a failed attempt, so it first clears what an attempt left."""
    for pending in batch:
        pending.result, pending.error = None, None
    reports = [pending for pending in batch if isinstance(pending.item, _Report)]
    if reports:
        rows = _checked_reports(cur, hot, reports)  # type: ignore[arg-type]
        if rows:
            cur.execute_many(hot.sql["upsert_value"], rows)
    for pending in batch:
        item = pending.item
        if isinstance(item, _Finish | _Append):
            try:
                pending.result = (_finish_point(cur, hot.sql, item) if isinstance(item, _Finish)
                                  else _append_points(cur, hot.sql, item))
            except StorageError as exc:
                pending.error = exc
    asks: dict[int, list[Pending[_Ask]]] = {}
    for pending in batch:
        if isinstance(pending.item, _Ask):
            asks.setdefault(pending.item.study_id, []).append(pending)  # type: ignore[arg-type]
    for study_id in sorted(asks):
        _lease_points(cur, hot.sql, study_id, asks[study_id])


@dataclass(frozen=True)
class _Append:
    """One chunk of an ``add_points`` call waiting for its batch: the points' params, JSON-encoded."""

    study_id: int
    encoded: tuple[str, ...]
    origin: str
    at: float


def _append_points(cur: DirectCursor, sql: dict[str, Compiled], append: _Append) -> tuple[list[int], int]:
    """Insert NEW points up to maxPoints: the ids of those inserted (in order) and the first one's number."""
    study_id, encoded, origin, at = append.study_id, append.encoded, append.origin, append.at
    study = cur.first(sql["append_study"], b_study=study_id)
    if study is None:
        raise NotFoundError(f"study {study_id} not found")
    if study.state != StudyState.RUNNING:
        return [], study.n_points
    added = encoded[:max(0, study.max_points - study.n_points)]
    first = study.n_points
    if not added:
        return [], first
    cur.execute_many(sql["insert_point"], [
        {"study_id": study_id, "number": first + i, "params_json": params, "origin": origin,
         "state": PointState.NEW.value, "attempt": 0, "created_at": at, "updated_at": at}
        for i, params in enumerate(added)])
    ids = [row.id for row in cur.all(sql["appended_ids"], b_study=study_id, b_first=first)]
    cur.execute(sql["count_points"], b_study=study_id, b_added=len(added), b_at=at)
    return ids, first


@dataclass(frozen=True)
class _Report:
    """One ``report`` call waiting for its batch."""

    point_id: int
    lease_token: str
    step: int
    value: float
    now: float | None
    study_id: int | None


def _report(point_id: int, lease_token: str, step: int, value: float, now: float | None,
            study_id: int | None) -> _Report:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidValueError(f"step must be an integer >= 0, got {step!r}")
    return _Report(point_id, lease_token, step, _finite(value, "intermediate value"), now, study_id)


def _checked_reports(cur: DirectCursor, hot: _HotPath, batch: list[Pending[_Report]]) -> list[dict[str, Any]]:
    """The rows to upsert for the reports whose lease is current; the others get their error. Points are
    share-locked in id order (PostgreSQL), so a concurrent finish/release waits or is seen, never half."""
    ids = sorted({pending.item.point_id for pending in batch})
    locked = cur.all(hot.reported_points(len(ids)), **{f"b_point{i}": point_id for i, point_id in enumerate(ids)})
    found = {row.id: row for row in locked}
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for pending in batch:
        report = pending.item
        try:
            row = found.get(report.point_id)
            if row is None or (report.study_id is not None and row.study_id != report.study_id):
                raise NotFoundError(f"point {report.point_id} not found")
            _check_token(report.point_id, row.state, row.lease_token, report.lease_token)
        except StorageError as exc:
            pending.error = exc
            continue
        rows[report.point_id, report.step] = {"point_id": report.point_id, "study_id": row.study_id,
                                              "step": report.step, "value": report.value,
                                              "updated_at": clock(report.now)}
    return list(rows.values())


@dataclass(frozen=True)
class _Finish:
    """The arguments of one ``finish`` call, checked."""

    point_id: int
    lease_token: str
    status: PointState
    loss: float | None
    request_id: str | None
    message: str | None
    study_id: int | None
    now: float | None


def _finish(point_id: int, lease_token: str, status: PointState | str, loss: float | None, request_id: str | None,
            message: str | None, study_id: int | None, now: float | None) -> _Finish:
    status = _final_status(status)
    _bounded(request_id, REQUEST_ID_LENGTH, "request id")
    if status == PointState.DONE:
        loss = _finite(loss, "loss of a done point")
    elif loss is not None and status == PointState.PRUNED:
        loss = _finite(loss, "loss of a pruned point")
    return _Finish(point_id, lease_token, status, loss, request_id, message, study_id, now)


#: What the group commit writes.
_Write = _Ask | _Report | _Finish | _Append


def _finish_point(cur: DirectCursor, sql: dict[str, Compiled], call: _Finish) -> FinishResult:
    """Lock the point, replay a known request id (or refuse one that finished another point), end the
    lease, then lock the study (after every earlier finish of it has committed) and complete it if
    nothing can change any more. Every refusal comes before the first write, so a refused finish leaves
    the rest of its batch intact."""
    point = cur.first(sql["locked_point"], b_point=call.point_id, b_request=call.request_id)
    if point is None or (call.study_id is not None and point.study_id != call.study_id):
        raise NotFoundError(f"point {call.point_id} not found")
    if call.request_id is not None and point.finish_request_id == call.request_id:
        return FinishResult(_point_record(point), replayed=True)
    at = clock(call.now)
    if point.request_used_by is not None:
        raise _request_id_conflict(call.request_id)
    _check_token(call.point_id, point.state, point.lease_token, call.lease_token)
    loss = cur.scalar(sql["failed_loss"], b_study=point.study_id) if call.status == PointState.FAILED else call.loss
    cur.execute(sql["end_lease"], b_token=point.lease_token, b_at=at, b_state=call.status.value)
    cur.execute(sql["finish_point"], b_point=call.point_id, b_state=call.status.value, b_loss=loss,
                b_message=call.message, b_request=call.request_id, b_at=at)
    study = cur.first(sql["locked_study"], b_study=point.study_id)
    if _may_complete(study):
        counts = {state.value: 0 for state in PointState}
        counts.update(cur.all(sql["state_counts"], b_study=point.study_id))
        completion = _completion(study, counts)
        if completion is not None:
            cur.execute(sql["complete"], b_study=point.study_id, b_message=completion, b_at=at)
    finished = point._replace(state=call.status.value, loss=loss, message=call.message,
                              finish_request_id=call.request_id, finished_at=at, lease_token=None, worker_id=None,
                              lease_expires_at=None, updated_at=at)
    return FinishResult(_point_record(finished), replayed=False)


def _request_id_conflict(request_id: str | None) -> ConflictError:
    return ConflictError(f"request id {request_id!r} already finished another point")


# -- conversions ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=TASK_CACHE_SIZE)
def _task(task_json: str) -> Task:
    """Tasks are immutable and read on every request, so each stored text is validated once."""
    return Task.model_validate(json.loads(task_json))


def _study_record(row: StudyRow) -> StudyRecord:
    return StudyRecord(id=row.id, owner=row.owner, name=row.name, task=_task(row.task_json),
                       state=StudyState(row.state), message=row.message, n_points=row.n_points,
                       evaluation_jobs=row.evaluation_jobs, created_at=row.created_at, updated_at=row.updated_at,
                       steering_started_at=row.steering_started_at, steering_error=row.steering_error)


def _point_record(row: Any) -> PointRecord:
    """A point from an ORM row, a Core row, or a namespace with the same attributes."""
    return PointRecord(id=row.id, study_id=row.study_id, number=row.number, params=json.loads(row.params_json),
                       state=PointState(row.state), origin=row.origin, attempt=row.attempt, loss=row.loss,
                       message=row.message, worker_id=row.worker_id, lease_expires_at=row.lease_expires_at,
                       created_at=row.created_at, updated_at=row.updated_at, finished_at=row.finished_at)


def _lease(point: PointRow, study: StudyRow) -> Lease:
    return Lease(point_id=point.id, study_id=point.study_id, number=point.number,
                 params=json.loads(point.params_json), attempt=point.attempt, worker_id=point.worker_id or "",
                 lease_token=point.lease_token or "", expires_at=point.lease_expires_at or 0.0,
                 stop=study.state != StudyState.RUNNING)


def _checkpoint(row: CheckpointRow) -> CheckpointMeta:
    return CheckpointMeta(point_id=row.point_id, path=row.path, sha256=row.sha256, size=row.size,
                          updated_at=row.updated_at)


FINAL_STATE_VALUES = frozenset(state.value for state in FINAL_STATES)


def _observations(rows: Sequence[Any]) -> list[Observation]:
    """Observations from (params_json, loss, state) rows. Steering reads the whole history at every
    run, and parsing every point's JSON on its own took most of that (and of the interpreter lock the
    request threads wait for): the stored objects are decoded as one JSON array instead."""
    params = json.loads("[" + ",".join(row[0] for row in rows) + "]")
    return [Observation(point, loss if state in FINAL_STATE_VALUES else None,
                        state if state in FINAL_STATE_VALUES else "pending")
            for point, (_, loss, state) in zip(params, rows, strict=True)]


def _encode_params(params: Any, index: int) -> str:
    if not isinstance(params, dict):
        raise InvalidValueError(f"params_list[{index}]: a point is a JSON object, got {type(params).__name__}")
    try:
        return json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"params_list[{index}]: not JSON-serialisable: {exc}") from None


def _bounded(value: str | None, limit: int, what: str) -> None:
    """Refuse what one backend would truncate or reject and another keep: both must agree."""
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise InvalidValueError(f"{what} must be a string of at most {limit} characters")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _final_status(status: PointState | str) -> PointState:
    try:
        state = PointState(status)
    except ValueError:
        state = None
    if state not in FINAL_STATES:
        raise InvalidValueError(f"a point finishes as done, pruned or failed, not {status!r}")
    return state
