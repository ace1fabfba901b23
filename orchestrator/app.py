"""The REST service of docs/REST_API.md: studies, the ask/tell queue, checkpoints, tokens, metrics.

Every rule that protects the budget lives in storage; this module authenticates, validates the wire
format, and translates storage errors into HTTP answers in one place (:func:`install_error_handlers`).
Handlers are plain functions (FastAPI runs them in its thread pool) because storage calls block;
dependencies that do no I/O are ``async`` so that a request costs one hop to the thread pool, not one
per dependency. The worker routes (``ask``, ``report``, ``tell``: nearly every request) return their
JSON as a response, which skips FastAPI's validation and re-encoding of an answer built right here.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from hepopt import __version__
from hepopt.errors import SpecError
from hepopt.task import Task, parse_task
from orchestrator.checkpoints import CheckpointInvalid, CheckpointStore, CheckpointTooLarge
from orchestrator.config import CHECKPOINT_DIR, Settings
from orchestrator.early_stopping import StoppingDecider
from orchestrator.metrics import Metrics
from orchestrator.scheduler import Scheduler
from orchestrator.storage.base import (
    ConflictError,
    InvalidValueError,
    Lease,
    NotFoundError,
    PointRecord,
    PointState,
    StaleLeaseError,
    Storage,
    StorageError,
    StudyRecord,
    StudyState,
    TokenInfo,
)

API_PREFIX = "/api/v1"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LEASE_HEADER = "X-Lease-Token"
CHECKSUM_HEADER = "X-Checksum-Sha256"
MAX_NAME_CHARS = 200
MAX_MESSAGE_CHARS = 10_000
MAX_ID_CHARS = 200
#: Studies whose owner and task (both immutable) the hot routes keep in memory.
STUDY_FACTS_CACHE_SIZE = 4096
#: How long a verified token's grant is reused without reading storage (expiry is checked on every
#: use): a token revoked in the database stops working within this time.
GRANT_CACHE_SECONDS = 5.0
GRANT_CACHE_SIZE = 4096
#: Storage/service errors and the HTTP status each one means (the single mapping).
ERROR_STATUS: dict[type[Exception], HTTPStatus] = {
    NotFoundError: HTTPStatus.NOT_FOUND,
    StaleLeaseError: HTTPStatus.CONFLICT,
    ConflictError: HTTPStatus.CONFLICT,
    InvalidValueError: HTTPStatus.UNPROCESSABLE_ENTITY,
    CheckpointInvalid: HTTPStatus.UNPROCESSABLE_ENTITY,
    CheckpointTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    StorageError: HTTPStatus.BAD_REQUEST,
}


# -- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateStudyBody(_Body):
    task: dict[str, Any]
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)


class AskBody(_Body):
    worker_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)


class LeaseBody(_Body):
    lease_token: str = Field(min_length=1, max_length=MAX_ID_CHARS)


class ReportBody(LeaseBody):
    step: int = Field(ge=0)
    value: float


class TellBody(LeaseBody):
    status: Literal["done", "pruned", "failed"]
    loss: float | None = None
    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    request_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)


class TokenBody(_Body):
    study_id: int
    expires_in: float | None = Field(None, gt=0)


# -- the service behind the routes ------------------------------------------------------------
class GrantCache:
    """Recently verified grants by the sha256 of their secret (never the secret itself): a bounded LRU."""

    def __init__(self, seconds: float = GRANT_CACHE_SECONDS, size: int = GRANT_CACHE_SIZE) -> None:
        self.seconds = seconds
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, TokenInfo]] = OrderedDict()

    def get(self, secret: str) -> TokenInfo | None:
        key = _digest(secret)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or time.monotonic() - entry[0] >= self.seconds:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, secret: str, info: TokenInfo) -> None:
        with self._lock:
            self._entries[_digest(secret)] = (time.monotonic(), info)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Service:
    """What every route needs; one per app, reachable as ``request.app.state.service``."""

    settings: Settings
    storage: Storage
    scheduler: Scheduler
    metrics: Metrics
    stopping: StoppingDecider
    checkpoints: CheckpointStore
    grants: GrantCache = field(default_factory=GrantCache)
    _facts: OrderedDict[int, tuple[str, Task]] = field(default_factory=OrderedDict)
    _facts_lock: threading.Lock = field(default_factory=threading.Lock)

    def study(self, who: TokenInfo, study_id: int) -> StudyRecord:
        """The study if this token may see it: 403 for a worker token of another study, 404 if foreign."""
        _check_scope(who, study_id)
        return self.storage.get_study(study_id, owner=who.user)

    def task(self, who: TokenInfo, study_id: int) -> Task:
        """The study's task, with the access rules of :meth:`study`. A study's owner and task never change,
        so they are cached: the worker routes then spend one storage transaction per request."""
        _check_scope(who, study_id)
        with self._facts_lock:
            facts = self._facts.get(study_id)
        if facts is None:
            study = self.storage.get_study(study_id)
            facts = (study.owner, study.task)
            with self._facts_lock:
                self._facts[study_id] = facts
                while len(self._facts) > STUDY_FACTS_CACHE_SIZE:
                    self._facts.popitem(last=False)
        owner, task = facts
        if owner != who.user:
            raise NotFoundError(f"study {study_id} not found")
        return task

    def point(self, who: TokenInfo, study_id: int, point_id: int) -> tuple[StudyRecord, PointRecord]:
        """The study and its point, with the access rules of :meth:`study`."""
        study = self.study(who, study_id)
        return study, self.storage.get_point(point_id, study_id=study_id)

    def study_json(self, study: StudyRecord) -> dict[str, Any]:
        counts = self.storage.counts(study.id)
        best = self.storage.best_point(study.id)
        return {
            "id": study.id, "name": study.name, "owner": study.owner, "state": study.state.value,
            "message": study.message,
            "counts": {"new": counts.new, "running": counts.running, "done": counts.done, "pruned": counts.pruned,
                       "failed": counts.failed, "evaluation_jobs": counts.evaluation_jobs},
            "best": None if best is None else point_json(best),
            "steering": {"status": study.steering_status.value, "error": study.steering_error},
            "task": study.task.to_json(), "created_at": study.created_at, "updated_at": study.updated_at,
        }

    def lease_json(self, lease: Lease, task: Task) -> dict[str, Any]:
        return {"point_id": lease.point_id, "study_id": lease.study_id, "number": lease.number,
                "params": lease.params, "attempt": lease.attempt, "lease_token": lease.lease_token,
                "expires_at": lease.expires_at, "lease_seconds": task.hepopt.leaseSeconds,
                "has_checkpoint": lease.has_checkpoint}

    def validate_task(self, doc: dict[str, Any]) -> Task:
        """Refuse what the server cannot or may not run, naming the key; nothing is stored on refusal."""
        if "searchSpaceFile" in doc:
            raise SpecError([("searchSpaceFile", "the server cannot read your files: inline the space as "
                              "'searchSpace' (hepopt submit does this)")])
        task = parse_task(doc)
        if task.steeringExec and not self.settings.allow_steering_exec:
            raise SpecError([("steeringExec", "running steering commands is disabled on this server; "
                              "remove it to use the built-in steering (hepopt.method)")])
        return task


def _check_scope(who: TokenInfo, study_id: int) -> None:
    if who.study_id is not None and who.study_id != study_id:
        raise HTTPException(HTTPStatus.FORBIDDEN, "this worker token serves another study")


def point_json(point: PointRecord) -> dict[str, Any]:
    return {"id": point.id, "number": point.number, "params": point.params, "state": point.state.value,
            "attempt": point.attempt, "loss": point.loss, "message": point.message, "worker_id": point.worker_id,
            "created_at": point.created_at, "finished_at": point.finished_at}


async def service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(service)]


_bearer = HTTPBearer(auto_error=False, description="a user token, or a worker token of one study")


async def principal(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                    svc: Svc) -> TokenInfo:
    """The caller's grant, from the Authorization header only (a token in a URL would end up in logs).

    Every request needs one, so a grant verified within GRANT_CACHE_SECONDS is reused without a storage
    read; only a miss goes to the thread pool."""
    if credentials is None:
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    secret = credentials.credentials
    info = svc.grants.get(secret)
    if info is None:
        info = await run_in_threadpool(svc.storage.verify_token, secret)
        if info is not None:
            svc.grants.put(secret, info)
    if info is None or (info.expires_at is not None and info.expires_at <= time.time()):
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "invalid or expired token",
                            headers={"WWW-Authenticate": "Bearer"})
    return info


Principal = Annotated[TokenInfo, Depends(principal)]


async def user(who: Principal) -> TokenInfo:
    """Calls only users make: worker tokens are refused with 403."""
    if who.study_id is not None:
        raise HTTPException(HTTPStatus.FORBIDDEN, "a worker token cannot make this call")
    return who


User = Annotated[TokenInfo, Depends(user)]


# -- routes -----------------------------------------------------------------------------------
router = APIRouter()
public = APIRouter()


@public.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@public.get("/metrics")
def metrics(svc: Svc) -> PlainTextResponse:
    return PlainTextResponse(svc.metrics.render(svc.storage), media_type=PROMETHEUS_CONTENT_TYPE)


@router.post("/studies", status_code=HTTPStatus.CREATED)
def create_study(body: CreateStudyBody, who: User, svc: Svc) -> dict:
    study = svc.storage.create_study(who.user, svc.validate_task(body.task), name=body.name)
    svc.scheduler.poke(study.id)
    return svc.study_json(study)


@router.get("/studies")
def list_studies(who: User, svc: Svc) -> list[dict]:
    return [svc.study_json(study) for study in svc.storage.list_studies(owner=who.user)]


@router.get("/studies/{study_id}")
def get_study(study_id: int, who: Principal, svc: Svc) -> dict:
    return svc.study_json(svc.study(who, study_id))


@router.post("/studies/{study_id}/cancel")
def cancel_study(study_id: int, who: User, svc: Svc) -> dict:
    return svc.study_json(svc.storage.cancel_study(study_id, owner=who.user))


@router.get("/studies/{study_id}/points")
def list_points(study_id: int, who: Principal, svc: Svc, state: PointState | None = None) -> list[dict]:
    svc.study(who, study_id)
    return [point_json(point) for point in svc.storage.list_points(study_id, state)]


@router.get("/studies/{study_id}/best")
def best_point(study_id: int, who: Principal, svc: Svc) -> dict:
    svc.study(who, study_id)
    best = svc.storage.best_point(study_id)
    if best is None:
        raise HTTPException(HTTPStatus.NOT_FOUND, f"study {study_id} has no done point yet")
    return point_json(best)


@router.post("/studies/{study_id}/ask")
def ask(study_id: int, body: AskBody, who: Principal, svc: Svc) -> JSONResponse:
    """Lease a point, or say when to come back; never waits for steering, which it only nudges."""
    started = time.perf_counter()
    task = svc.task(who, study_id)
    lease = svc.storage.lease(study_id, body.worker_id)
    if lease is not None:
        answer = {"status": "leased", "lease": svc.lease_json(lease, task)}
    elif svc.storage.get_study(study_id).state != StudyState.RUNNING:
        answer = {"status": "finished"}
    else:
        svc.scheduler.poke(study_id)
        answer = {"status": "wait", "retry_after": svc.settings.retry_after}
    svc.metrics.count("hepopt_asks_total", "result", answer["status"])
    svc.metrics.observe_ask(time.perf_counter() - started)
    return JSONResponse(answer)


@router.post("/studies/{study_id}/points/{point_id}/heartbeat")
def heartbeat(study_id: int, point_id: int, body: LeaseBody, who: Principal, svc: Svc) -> dict:
    svc.task(who, study_id)
    lease = svc.storage.heartbeat(point_id, body.lease_token, study_id=study_id)
    return {"expires_at": lease.expires_at, "stop": lease.stop}


@router.post("/studies/{study_id}/points/{point_id}/report")
def report(study_id: int, point_id: int, body: ReportBody, who: Principal, svc: Svc) -> JSONResponse:
    task = svc.task(who, study_id)
    svc.storage.report(point_id, body.lease_token, body.step, body.value, study_id=study_id)
    prune = svc.stopping.decide(study_id, task, point_id, body.step, body.value)
    svc.metrics.count("hepopt_reports_total")
    if prune:
        svc.metrics.count("hepopt_prunes_total")
    return JSONResponse({"prune": prune})


@router.post("/studies/{study_id}/points/{point_id}/tell")
def tell(study_id: int, point_id: int, body: TellBody, who: Principal, svc: Svc) -> JSONResponse:
    """Finish the point; the same request id again returns the same point without a second effect."""
    svc.task(who, study_id)
    result = svc.storage.finish(point_id, body.lease_token, PointState(body.status), body.loss,
                                request_id=body.request_id, message=body.message, study_id=study_id)
    if not result.replayed:
        svc.metrics.count("hepopt_tells_total", "status", body.status)
        svc.scheduler.poke(study_id)
    return JSONResponse(point_json(result.point))


@router.post("/studies/{study_id}/points/{point_id}/release")
def release(study_id: int, point_id: int, body: LeaseBody, who: Principal, svc: Svc) -> dict:
    svc.task(who, study_id)
    point = svc.storage.release(point_id, body.lease_token, study_id=study_id)
    svc.scheduler.poke(study_id)
    return point_json(point)


@router.put("/studies/{study_id}/points/{point_id}/checkpoint")
async def put_checkpoint(study_id: int, point_id: int, request: Request,
                         x_lease_token: Annotated[str, Header(min_length=1, max_length=MAX_ID_CHARS)],
                         x_checksum_sha256: Annotated[str, Header(max_length=MAX_ID_CHARS)],
                         who: Principal, svc: Svc) -> dict:
    """Store the point's checkpoint. Only the current lease may write; the upload counts as a heartbeat."""
    await run_in_threadpool(svc.point, who, study_id, point_id)
    await run_in_threadpool(svc.storage.heartbeat, point_id, x_lease_token)
    stored = await svc.checkpoints.save(study_id, point_id, request.stream(), x_checksum_sha256)
    await run_in_threadpool(svc.storage.put_checkpoint_meta, point_id, stored.path, stored.sha256, stored.size)
    return {"sha256": stored.sha256, "size": stored.size}


@router.get("/studies/{study_id}/points/{point_id}/checkpoint")
def get_checkpoint(study_id: int, point_id: int, who: Principal, svc: Svc) -> FileResponse:
    svc.point(who, study_id, point_id)
    meta = svc.storage.get_checkpoint_meta(point_id)
    if meta is None or not svc.checkpoints.absolute(meta.path).is_file():
        raise HTTPException(HTTPStatus.NOT_FOUND, f"point {point_id} has no checkpoint")
    return FileResponse(svc.checkpoints.absolute(meta.path), media_type="application/octet-stream",
                        headers={CHECKSUM_HEADER: meta.sha256})


@router.post("/tokens", status_code=HTTPStatus.CREATED)
def create_token(body: TokenBody, who: User, svc: Svc) -> dict:
    """A worker token for one own study, so pilots never carry the owner's own token."""
    seconds = body.expires_in or svc.settings.worker_token_seconds
    if seconds > svc.settings.max_worker_token_seconds:
        raise HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY,
                            f"expires_in: at most {svc.settings.max_worker_token_seconds:g} seconds")
    expires_at = time.time() + seconds
    token = svc.storage.create_token(who.user, study_id=body.study_id, expires_at=expires_at)
    return {"token": token, "study_id": body.study_id, "expires_at": expires_at}


# -- errors -----------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    """Every refusal becomes ``{"detail": "<message>"}`` with the status of REST_API.md."""

    async def known_error(_request: Request, exc: Exception) -> JSONResponse:
        code = next(code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls))
        return JSONResponse({"detail": str(exc)}, status_code=code)

    async def invalid_task(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SpecError)
        problems = [{"loc": loc, "msg": msg} for loc, msg in exc.problems]
        return JSONResponse({"detail": f"invalid task: {exc}", "problems": problems},
                            status_code=HTTPStatus.UNPROCESSABLE_ENTITY)

    async def malformed(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": "; ".join(_describe(err) for err in exc.errors())},
                            status_code=HTTPStatus.UNPROCESSABLE_ENTITY)

    for cls in ERROR_STATUS:
        app.add_exception_handler(cls, known_error)
    app.add_exception_handler(SpecError, invalid_task)
    app.add_exception_handler(RequestValidationError, malformed)


def _describe(err: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid"))


# -- the app ----------------------------------------------------------------------------------
def create_app(settings: Settings, storage: Storage | None = None) -> FastAPI:
    """The service on ``storage`` (opened from ``settings.db_url`` when None, and then closed with the
    app). The scheduler runs while the app runs: started and stopped by the lifespan."""
    owns_storage = storage is None
    if storage is None:
        from orchestrator.storage.sql import SQLStorage

        storage = SQLStorage(settings.db_url)
    metrics_ = Metrics()
    svc = Service(settings=settings, storage=storage, scheduler=Scheduler(storage, settings, metrics_),
                  metrics=metrics_, stopping=StoppingDecider(storage, settings.stopping_cache_seconds),
                  checkpoints=CheckpointStore(settings.data_dir, CHECKPOINT_DIR, settings.checkpoint_max_bytes))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc.scheduler.start()
        try:
            yield
        finally:
            svc.scheduler.stop()
            if owns_storage:
                svc.storage.close()

    app = FastAPI(title="hepopt orchestrator", version=__version__, lifespan=lifespan)
    app.state.service = svc
    install_error_handlers(app)
    app.include_router(router, prefix=API_PREFIX)  # first: routes are matched in order, workers' are hot
    app.include_router(public, prefix=API_PREFIX)
    app.include_router(public, include_in_schema=False)
    return app
