"""The REST service of docs/REST_API.md: studies, the ask/tell queue, checkpoints, tokens, metrics.

Every rule that protects the budget lives in storage; this module authenticates, validates the wire
format, and translates storage errors into HTTP answers in one place (:func:`install_error_handlers`).
Handlers are plain functions (FastAPI runs them in its thread pool) because storage calls block;
dependencies that do no I/O are ``async`` so that a request costs one hop to the thread pool, not one
per dependency. The worker routes (``ask``, ``report``, ``tell``, ``heartbeat``: nearly every
request) are coroutines instead: their writes go to the storage's group commit without a thread of
their own (``*_async``), and what may block (a storage read on a cache miss, a heartbeat, a prune
decision) runs in :attr:`Service.threads`. They return their JSON as a response, which skips FastAPI's
validation and re-encoding of an answer built right here, and in their common shape they are
dispatched to those same functions by :class:`WorkerRoutes`, ahead of FastAPI's routing and dependency
resolution.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hepopt import __version__
from hepopt.errors import SpecError
from hepopt.task import Task, parse_task
from orchestrator.checkpoints import CheckpointInvalid, CheckpointStore, CheckpointTooLarge
from orchestrator.config import CHECKPOINT_DIR, Settings
from orchestrator.early_stopping import StoppingDecider
from orchestrator.loop_threads import LoopThreads
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

T = TypeVar("T")

API_PREFIX = "/api/v1"
JSON_MEDIA_TYPE = "application/json"
JSON_CONTENT_TYPE = JSON_MEDIA_TYPE.encode()
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
#: Fraction of GRANT_CACHE_SECONDS after which a grant in use is verified again in the background.
REFRESH_AFTER = 0.5
#: Threads for what the worker routes may block on (storage reads, heartbeats, prune decisions): no
#: more than the storage's connection pool keeps open.
WORKER_ROUTE_THREADS = 32
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


# -- answers --------------------------------------------------------------------------------------
_encode_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class WorkerJSONResponse(JSONResponse):
    """A JSONResponse (the same bytes and headers) made with less work: the worker routes answer every
    request with one, and building Starlette's (a new JSON encoder, generic header assembly) took a
    sixth of their thread's CPU."""

    def render(self, content: Any) -> bytes:
        return _encode_json(content).encode()

    def init_headers(self, headers: Any = None) -> None:
        if headers:
            super().init_headers(headers)
            return
        self.raw_headers = [(b"content-length", str(len(self.body)).encode()), (b"content-type", JSON_CONTENT_TYPE)]


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
    """Recently verified grants by the sha256 of their secret (never the secret itself): a bounded LRU.

    A grant older than REFRESH_AFTER of its time is handed to ``refresh`` (once, until it is put or
    forgotten again), which verifies the token anew in the background: a busy token then never expires
    from the cache, where every request of its workers would find it missing at the same moment and
    verify it again (a stall of ~0.1 s under load every GRANT_CACHE_SECONDS). A revoked token still
    stops working within GRANT_CACHE_SECONDS. Should a refresh fail, the grant simply expires.
    """

    def __init__(self, seconds: float = GRANT_CACHE_SECONDS, size: int = GRANT_CACHE_SIZE,
                 refresh: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.size = size
        self.refresh = refresh
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, TokenInfo]] = OrderedDict()
        self._refreshing: set[str] = set()

    def get(self, secret: str) -> TokenInfo | None:
        key = _digest(secret)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            age = self.clock() - entry[0]
            if age >= self.seconds:
                return None
            self._entries.move_to_end(key)
            stale = (self.refresh is not None and age >= REFRESH_AFTER * self.seconds
                     and key not in self._refreshing)
            if stale:
                self._refreshing.add(key)
        if stale:
            self.refresh(secret)  # type: ignore[misc]
        return entry[1]

    def put(self, secret: str, info: TokenInfo) -> None:
        key = _digest(secret)
        with self._lock:
            self._entries[key] = (self.clock(), info)
            self._refreshing.discard(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, secret: str) -> None:
        key = _digest(secret)
        with self._lock:
            self._entries.pop(key, None)
            self._refreshing.discard(key)


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
    #: Threads of the worker routes' fast path: handing them a call costs the event loop a fraction of
    #: what anyio's thread pool (which FastAPI's own routes use) costs.
    threads: LoopThreads = field(default_factory=lambda: LoopThreads(WORKER_ROUTE_THREADS, "hepopt-worker-route"))
    _facts: OrderedDict[int, tuple[str, Task]] = field(default_factory=OrderedDict)
    _facts_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.grants.refresh = lambda secret: self.threads.submit(functools.partial(self.verify, secret))

    def verify(self, secret: str) -> TokenInfo | None:
        """The token's grant from storage (blocking), which the cache then holds, or forgets if none."""
        info = self.storage.verify_token(secret)
        if info is None:
            self.grants.forget(secret)
        else:
            self.grants.put(secret, info)
        return info

    def study(self, who: TokenInfo, study_id: int) -> StudyRecord:
        """The study if this token may see it: 403 for a worker token of another study, 404 if foreign."""
        _check_scope(who, study_id)
        return self.storage.get_study(study_id, owner=who.user)

    def task(self, who: TokenInfo, study_id: int) -> Task:
        """The study's task, with the access rules of :meth:`study`. A study's owner and task never change,
        so they are cached: the worker routes then spend one storage transaction per request."""
        _check_scope(who, study_id)
        return _owned_task(who, study_id, self._cached_facts(study_id) or self._load_facts(study_id))

    async def task_async(self, who: TokenInfo, study_id: int) -> Task:
        """:meth:`task` for a coroutine: storage is read in a thread, on a cache miss only."""
        _check_scope(who, study_id)
        facts = self._cached_facts(study_id) or await self.in_thread(self._load_facts, study_id)
        return _owned_task(who, study_id, facts)

    def _cached_facts(self, study_id: int) -> tuple[str, Task] | None:
        with self._facts_lock:
            return self._facts.get(study_id)

    def _load_facts(self, study_id: int) -> tuple[str, Task]:
        study = self.storage.get_study(study_id)
        facts = (study.owner, study.task)
        with self._facts_lock:
            self._facts[study_id] = facts
            while len(self._facts) > STUDY_FACTS_CACHE_SIZE:
                self._facts.popitem(last=False)
        return facts

    async def in_thread(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)`` in one of the worker routes' threads: for what may block."""
        return await self.threads.run(functools.partial(call, *args, **kwargs))

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


def _owned_task(who: TokenInfo, study_id: int, facts: tuple[str, Task]) -> Task:
    owner, task = facts
    if owner != who.user:
        raise NotFoundError(f"study {study_id} not found")
    return task


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
        info = await run_in_threadpool(svc.verify, secret)
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
async def ask(study_id: int, body: AskBody, who: Principal, svc: Svc) -> JSONResponse:
    """Lease a point, or say when to come back; never waits for steering, which it only nudges."""
    started = time.perf_counter()
    task = await svc.task_async(who, study_id)
    lease = await svc.storage.lease_async(study_id, body.worker_id)
    if lease is not None:
        answer = {"status": "leased", "lease": svc.lease_json(lease, task)}
    elif (await svc.in_thread(svc.storage.get_study, study_id)).state != StudyState.RUNNING:
        answer = {"status": "finished"}
    else:
        svc.scheduler.poke(study_id)
        answer = {"status": "wait", "retry_after": svc.settings.retry_after}
    svc.metrics.count("hepopt_asks_total", "result", answer["status"])
    svc.metrics.observe_ask(time.perf_counter() - started)
    return WorkerJSONResponse(answer)


@router.post("/studies/{study_id}/points/{point_id}/heartbeat")
async def heartbeat(study_id: int, point_id: int, body: LeaseBody, who: Principal, svc: Svc) -> JSONResponse:
    await svc.task_async(who, study_id)
    lease = await svc.in_thread(svc.storage.heartbeat, point_id, body.lease_token, study_id=study_id)
    return WorkerJSONResponse({"expires_at": lease.expires_at, "stop": lease.stop})


@router.post("/studies/{study_id}/points/{point_id}/report")
async def report(study_id: int, point_id: int, body: ReportBody, who: Principal, svc: Svc) -> JSONResponse:
    task = await svc.task_async(who, study_id)
    await svc.storage.report_async(point_id, body.lease_token, body.step, body.value, study_id=study_id)
    prune = svc.stopping.active(task) and await svc.in_thread(svc.stopping.decide, study_id, task, point_id,
                                                              body.step, body.value)
    svc.metrics.count("hepopt_reports_total")
    if prune:
        svc.metrics.count("hepopt_prunes_total")
    return WorkerJSONResponse({"prune": prune})


@router.post("/studies/{study_id}/points/{point_id}/tell")
async def tell(study_id: int, point_id: int, body: TellBody, who: Principal, svc: Svc) -> JSONResponse:
    """Finish the point; the same request id again returns the same point without a second effect."""
    task = await svc.task_async(who, study_id)
    result = await svc.storage.finish_async(point_id, body.lease_token, PointState(body.status), body.loss,
                                            request_id=body.request_id, message=body.message, study_id=study_id)
    if not result.replayed:
        svc.metrics.count("hepopt_tells_total", "status", body.status)
        if svc.stopping.active(task):
            await svc.in_thread(svc.stopping.tell, result.point)
        svc.scheduler.poke(study_id)
    return WorkerJSONResponse(point_json(result.point))


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
def known_error_response(exc: Exception) -> JSONResponse:
    """The answer to an error of ERROR_STATUS: ``{"detail": "<message>"}`` with its status."""
    code = next(code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls))
    return WorkerJSONResponse({"detail": str(exc)}, status_code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal becomes ``{"detail": "<message>"}`` with the status of REST_API.md."""

    async def known_error(_request: Request, exc: Exception) -> JSONResponse:
        return known_error_response(exc)

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


# -- the worker routes' fast path -----------------------------------------------------------------
#: The routes every worker calls for every point (ask, then report many times, tell; heartbeat).
WORKER_ROUTE = re.compile(API_PREFIX + r"/studies/([0-9]{1,18})/(?:(ask)|points/([0-9]{1,18})/(report|tell|heartbeat))")


@dataclass(frozen=True)
class WorkerCall:
    """One worker request, ready to run: its endpoint and the arguments FastAPI would have resolved."""

    endpoint: Callable[..., Awaitable[Response]]
    arguments: dict[str, Any]


class WorkerRoutes:
    """The worker routes served without FastAPI's routing and dependency resolution (ASGI, in front of
    the FastAPI app: see :class:`OrchestratorApp`).

    Those requests are nearly all the traffic (a cycle is ask, one report per epoch, tell), and
    resolving their path, header and body dependencies cost the server more CPU than the storage
    transaction behind them. A request in the common shape (a bearer token whose grant is cached and
    unexpired, a JSON body that validates) runs the route's own endpoint function with the arguments
    FastAPI would pass, its errors answered as by :func:`install_error_handlers`. Any other request
    (first use of a token, a malformed body, a wrong content type) goes to FastAPI unchanged, with its
    body, so every refusal is FastAPI's own.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.routes: dict[str, tuple[Callable[..., Awaitable[Response]], type[_Body]]] = {
            "ask": (ask, AskBody), "report": (report, ReportBody), "tell": (tell, TellBody),
            "heartbeat": (heartbeat, LeaseBody),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = WORKER_ROUTE.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        who = None if match is None else self._grant(scope["headers"])
        if who is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        call = self._prepare(match, who, body)
        if call is None:
            await self.app(scope, _replaying(body, receive), send)
            return
        try:
            response = await call.endpoint(**call.arguments)
        except HTTPException as exc:
            response = WorkerJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        except tuple(ERROR_STATUS) as exc:
            response = known_error_response(exc)
        await response(scope, receive, send)

    def _prepare(self, match: re.Match[str], who: TokenInfo, body: bytes) -> WorkerCall | None:
        """The call, or None when the body is not one the route accepts."""
        study_id, asking, point_id, verb = match.groups()
        endpoint, model = self.routes["ask" if asking else verb]
        try:
            parsed = model.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError, malformed JSON included
            return None
        arguments: dict[str, Any] = {"study_id": int(study_id), "body": parsed, "who": who, "svc": self.service}
        if point_id is not None:
            arguments["point_id"] = int(point_id)
        return WorkerCall(endpoint, arguments)

    def _grant(self, headers: list[tuple[bytes, bytes]]) -> TokenInfo | None:
        """The cached, unexpired grant of a JSON request's bearer token, else None."""
        authorization = content_type = b""
        for name, value in headers:
            if name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
        if content_type.split(b";", 1)[0].strip().lower().decode("latin-1") != JSON_MEDIA_TYPE:
            return None
        scheme, _, secret = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        info = self.service.grants.get(secret.strip())
        if info is None or (info.expires_at is not None and info.expires_at <= time.time()):
            return None
        return info


class OrchestratorApp(FastAPI):
    """The FastAPI app with :class:`WorkerRoutes` in front: the worker routes' requests reach neither
    FastAPI's middleware stack nor its router (which serve everything else, and declare the worker
    routes for the OpenAPI schema and for the requests the fast path hands over)."""

    def __init__(self, service: Service, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.service = service
        self.worker_routes = WorkerRoutes(functools.partial(FastAPI.__call__, self), service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.worker_routes(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app that must read a body already read: the body first, then the connection's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


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
            svc.threads.close()
            if owns_storage:
                svc.storage.close()

    app = OrchestratorApp(svc, title="hepopt orchestrator", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router, prefix=API_PREFIX)  # first: routes are matched in order, workers' are hot
    app.include_router(public, prefix=API_PREFIX)
    app.include_router(public, include_in_schema=False)
    return app
