"""The orchestrator's storage interface: one abstract :class:`Storage`, several backends.

Everything the service, the workers' queue and the steering scheduler persist goes through this
interface, so a backend (SQLite for a laptop, PostgreSQL for a shared service) is a drop-in choice and
one conformance suite proves them equivalent. Each method is one atomic transaction: the service never
holds a transaction open across a request, and every rule the budget depends on (maxPoints,
maxEvaluationJobs, maxAttempts, one lease per point) is enforced here, not by callers.

Time is float seconds since the epoch (UTC by definition). Methods that depend on the clock take
``now`` so tests control time; ``None`` means ``time.time()``.

Point lifecycle: ``NEW -> RUNNING (leased) -> DONE | PRUNED | FAILED``. A lease that is released goes
back to ``NEW``; a lease that expires goes back to ``NEW`` with ``attempt + 1`` until ``maxAttempts``
expiries, then the point is ``FAILED``.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hepopt.errors import HepoptError
from hepopt.task import Task
from steering_container.api import Observation


class PointState(str, Enum):
    """Where a point is in its lifecycle; the values are what the database and the API carry."""

    NEW = "new"
    RUNNING = "running"
    DONE = "done"
    PRUNED = "pruned"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({PointState.DONE, PointState.PRUNED, PointState.FAILED})


class StudyState(str, Enum):
    """A study runs until its budget is spent, it is cancelled, or the service marks it done/failed."""

    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class SteeringStatus(str, Enum):
    """Derived from the steering claim and its last error (see :meth:`Storage.begin_steering`)."""

    IDLE = "idle"
    RUNNING = "running"
    FAILED = "failed"


class StorageError(HepoptError):
    """Base of the errors a backend raises on purpose; the service maps them to HTTP answers."""


class NotFoundError(StorageError, LookupError):
    """No such study, point or token, or it belongs to someone else (indistinguishable on purpose)."""


class StaleLeaseError(StorageError):
    """The lease token is not the point's current lease: it expired and was reaped, or was released,
    or the point was already finished under another request. The worker must drop the point."""


class InvalidValueError(StorageError, ValueError):
    """A value the storage cannot keep: a non-finite loss, a negative step, a non-JSON point."""


class ConflictError(StorageError):
    """A request contradicts stored state, e.g. a request id reused for a different point."""


@dataclass(frozen=True)
class TokenInfo:
    """What a verified bearer token grants: a user, or only the workers of one study."""

    token_id: int
    user: str
    study_id: int | None
    created_at: float
    expires_at: float | None


@dataclass(frozen=True)
class StudyRecord:
    """One study as stored. ``task`` is the validated task it was created from."""

    id: int
    owner: str
    name: str | None
    task: Task
    state: StudyState
    message: str | None
    n_points: int
    evaluation_jobs: int
    created_at: float
    updated_at: float
    steering_started_at: float | None
    steering_error: str | None

    @property
    def steering_status(self) -> SteeringStatus:
        if self.steering_started_at is not None:
            return SteeringStatus.RUNNING
        return SteeringStatus.FAILED if self.steering_error else SteeringStatus.IDLE

    @property
    def direction(self) -> str:
        return self.task.hepopt.direction


@dataclass(frozen=True)
class PointRecord:
    """One point. ``number`` is its 0-based position in the study, the order steering proposed it."""

    id: int
    study_id: int
    number: int
    params: dict[str, Any]
    state: PointState
    origin: str
    attempt: int
    loss: float | None
    message: str | None
    worker_id: str | None
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True)
class Lease:
    """A point handed to one worker. ``lease_token`` proves ownership in heartbeat/report/finish.

    ``attempt`` counts earlier leases of this point that expired: above 0, look for a checkpoint.
    ``stop`` is True when the study is no longer running (cancelled, completed): the worker should
    finish or release the point soon. ``has_checkpoint`` (set by ``lease``) says a checkpoint of the
    point is stored, so the worker resumes from it.
    """

    point_id: int
    study_id: int
    number: int
    params: dict[str, Any]
    attempt: int
    worker_id: str
    lease_token: str
    expires_at: float
    stop: bool = False
    has_checkpoint: bool = False


@dataclass(frozen=True)
class FinishResult:
    """The point after ``finish``; ``replayed`` is True when the request id had been seen before."""

    point: PointRecord
    replayed: bool


@dataclass(frozen=True)
class PointCounts:
    """Points of a study by state, plus the evaluation jobs (leases) used so far."""

    new: int = 0
    running: int = 0
    done: int = 0
    pruned: int = 0
    failed: int = 0
    evaluation_jobs: int = 0

    @property
    def total(self) -> int:
        return self.new + self.running + self.done + self.pruned + self.failed

    @property
    def finished(self) -> int:
        return self.done + self.pruned + self.failed

    @property
    def unevaluated(self) -> int:
        """Points not final yet: what steering compares with minUnevaluatedPoints."""
        return self.new + self.running


@dataclass(frozen=True)
class Progress:
    """What the scheduler decides on: the points not final yet by state, all points, and the evaluation
    jobs used. Unlike :class:`PointCounts` it leaves the final points unsplit, so a backend reads it
    without visiting them (a long study holds tens of thousands, and the scheduler looks several times
    a second)."""

    new: int
    running: int
    total: int
    evaluation_jobs: int

    @property
    def finished(self) -> int:
        return self.total - self.unevaluated

    @property
    def unevaluated(self) -> int:
        return self.new + self.running


@dataclass(frozen=True)
class CheckpointMeta:
    """Where a point's latest checkpoint lies under the data directory, and how to verify it."""

    point_id: int
    path: str
    sha256: str
    size: int
    updated_at: float


def clock(now: float | None) -> float:
    """``now`` or the current time: every backend reads the clock through this one function."""
    return time.time() if now is None else float(now)


class Storage(abc.ABC):
    """The abstract storage. Every method is atomic; none keeps a transaction open after returning."""

    # -- tokens -------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_token(self, user: str, study_id: int | None = None, expires_at: float | None = None,
                     now: float | None = None) -> str:
        """A new bearer secret, returned once; only its sha256 is stored, so a leaked DB grants nothing.

        With ``study_id`` the token only serves that study's workers (study must belong to ``user``).
        """

    @abc.abstractmethod
    def verify_token(self, secret: str, now: float | None = None) -> TokenInfo | None:
        """The token's grant, or None when unknown, revoked or expired (no reason given to callers)."""

    @abc.abstractmethod
    def revoke_token(self, secret: str) -> bool:
        """Forget a token; False when it was not known."""

    # -- studies ------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_study(self, owner: str, task: Task, name: str | None = None,
                     now: float | None = None) -> StudyRecord:
        """Store a validated task as a new RUNNING study with no points."""

    @abc.abstractmethod
    def get_study(self, study_id: int, owner: str | None = None) -> StudyRecord:
        """The study; with ``owner`` a foreign study raises the same NotFoundError as a missing id."""

    @abc.abstractmethod
    def list_studies(self, owner: str | None = None, state: StudyState | None = None) -> list[StudyRecord]:
        """Studies by id; ``owner=None`` lists everyone's (for the scheduler, not for users)."""

    @abc.abstractmethod
    def cancel_study(self, study_id: int, owner: str | None = None, now: float | None = None) -> StudyRecord:
        """Stop leasing new points; running leases may still finish. Cancelling twice is harmless."""

    @abc.abstractmethod
    def set_study_state(self, study_id: int, state: StudyState, message: str | None = None,
                        now: float | None = None) -> StudyRecord:
        """Set the state and its human-readable reason: the service uses it when steering ends the
        search early (COMPLETED) or gives up (FAILED, e.g. "steering failed: <msg>")."""

    @abc.abstractmethod
    def begin_steering(self, study_id: int, stale_after: float, now: float | None = None) -> bool:
        """Claim the study's single steering run; False while another claim younger than
        ``stale_after`` seconds holds it (an older one is presumed crashed and taken over)."""

    @abc.abstractmethod
    def renew_steering(self, study_id: int, now: float | None = None) -> None:
        """Keep a held steering claim fresh, so that a short ``stale_after`` tells a crashed server's
        claim from a long steering run still in progress."""

    @abc.abstractmethod
    def end_steering(self, study_id: int, error: str | None = None, now: float | None = None) -> StudyRecord:
        """Release the steering claim; ``error`` (e.g. "steering failed: ...") is kept until the next
        successful run so users see why no points arrive."""

    # -- points -------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_points(self, study_id: int, params_list: Sequence[dict[str, Any]], origin: str = "steering",
                   now: float | None = None) -> list[PointRecord]:
        """Append NEW points, never beyond maxPoints in total: returns those actually added (possibly
        none, also when the study is no longer running)."""

    @abc.abstractmethod
    def get_point(self, point_id: int, study_id: int | None = None) -> PointRecord:
        """The point; with ``study_id`` a point of another study raises NotFoundError."""

    @abc.abstractmethod
    def list_points(self, study_id: int, state: PointState | None = None) -> list[PointRecord]:
        """The study's points by number."""

    @abc.abstractmethod
    def lease(self, study_id: int, worker_id: str, now: float | None = None) -> Lease | None:
        """Atomically hand the oldest NEW point to ``worker_id`` for leaseSeconds and count one
        evaluation job; None when the study is not running, nothing is NEW, or maxEvaluationJobs is
        used up. Concurrent callers never receive the same point."""

    # The lease operations below take an optional ``study_id``: a point of another study then raises
    # NotFoundError (as get_point does), so a request's ownership check costs no transaction of its own.
    @abc.abstractmethod
    def heartbeat(self, point_id: int, lease_token: str, now: float | None = None, *,
                  study_id: int | None = None) -> Lease:
        """Extend the lease to ``now + leaseSeconds``; StaleLeaseError when the token is not current.

        A lease past its expiry that the reaper has not taken yet is still honoured."""

    @abc.abstractmethod
    def report(self, point_id: int, lease_token: str, step: int, value: float, now: float | None = None, *,
               study_id: int | None = None) -> None:
        """Record an intermediate value; one value per (point, step), a resend replaces it so a resumed
        attempt's curve wins. StaleLeaseError when the token is not current."""

    @abc.abstractmethod
    def finish(self, point_id: int, lease_token: str, status: PointState, loss: float | None = None, *,
               request_id: str | None = None, message: str | None = None, now: float | None = None,
               study_id: int | None = None) -> FinishResult:
        """End the lease with DONE (finite loss required), PRUNED (loss optional) or FAILED (any loss
        given is replaced by the task's failedLoss, or None, so failures look alike whoever detected
        them). The same ``request_id`` again returns the same answer without change, even with other
        arguments; a stale token raises StaleLeaseError, a request id used for another point
        ConflictError. A study whose points are all final (or whose jobs are used up with nothing
        running) becomes COMPLETED."""

    # The three calls of nearly every worker request, for a server's coroutines. These defaults run the
    # call in a thread; a backend may instead queue it without one (SQLStorage's group commit does).
    async def lease_async(self, study_id: int, worker_id: str, now: float | None = None) -> Lease | None:
        """:meth:`lease`, awaitable."""
        return await asyncio.to_thread(self.lease, study_id, worker_id, now)

    async def report_async(self, point_id: int, lease_token: str, step: int, value: float,
                           now: float | None = None, *, study_id: int | None = None) -> None:
        """:meth:`report`, awaitable."""
        await asyncio.to_thread(self.report, point_id, lease_token, step, value, now, study_id=study_id)

    async def finish_async(self, point_id: int, lease_token: str, status: PointState, loss: float | None = None,
                           *, request_id: str | None = None, message: str | None = None, now: float | None = None,
                           study_id: int | None = None) -> FinishResult:
        """:meth:`finish`, awaitable."""
        return await asyncio.to_thread(self.finish, point_id, lease_token, status, loss, request_id=request_id,
                                       message=message, now=now, study_id=study_id)

    @abc.abstractmethod
    def release(self, point_id: int, lease_token: str, now: float | None = None, *,
                study_id: int | None = None) -> PointRecord:
        """The worker gives the point back unfinished (walltime, SIGTERM): NEW again, same attempt."""

    @abc.abstractmethod
    def reap_expired(self, now: float | None = None) -> int:
        """Return expired RUNNING points of every study to NEW with attempt+1, or make them FAILED
        once attempt reaches maxAttempts; the number of points reaped."""

    # -- reading for steering and stopping rules ---------------------------------------------
    @abc.abstractmethod
    def history(self, study_id: int) -> list[Observation]:
        """Every point in number order as steering sees it: NEW and RUNNING are ``pending``."""

    @abc.abstractmethod
    def intermediate_values(self, study_id: int) -> dict[int, dict[int, float]]:
        """``{point_id: {step: value}}`` with steps ascending, for early-stopping rules."""

    @abc.abstractmethod
    def counts(self, study_id: int) -> PointCounts:
        """Points by state and evaluation jobs used."""

    @abc.abstractmethod
    def progress(self, study_id: int) -> Progress:
        """The study's :class:`Progress`: what :meth:`counts` tells of it, without counting final points."""

    @abc.abstractmethod
    def best_point(self, study_id: int) -> PointRecord | None:
        """The DONE point with the best loss for the task's direction (earliest on ties)."""

    # -- checkpoints --------------------------------------------------------------------------
    @abc.abstractmethod
    def put_checkpoint_meta(self, point_id: int, path: str, sha256: str, size: int,
                            now: float | None = None) -> CheckpointMeta:
        """Record (replace) the point's checkpoint; the service writes the bytes before calling this."""

    @abc.abstractmethod
    def get_checkpoint_meta(self, point_id: int) -> CheckpointMeta | None:
        """The point's latest checkpoint, or None."""

    # -- lifecycle ----------------------------------------------------------------------------
    def shared_url(self) -> str | None:
        """A URL that another process can open (without migrating) to read the same data; None when the
        data lives in this process only."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the object is unusable afterwards."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
