"""The orchestrator client: one API for workers, the CLI and payloads, whatever carries the bytes.

Each verb maps to one route of docs/REST_API.md. The bytes travel through a :class:`Transport`:
:class:`HttpTransport` talks HTTP; a mailbox transport for compute nodes without network (DESIGN.md
§3.6) plugs in behind the same interface, so callers never know which one they use.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import ssl
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import certifi
import requests

from hepopt.connections import DirectConnections, InvalidTarget, Unreachable
from hepopt.errors import (
    ChecksumMismatch,
    ClientError,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StaleLease,
    Unauthorized,
)
from hepopt.task import Task

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 5
#: First pause between retries; it doubles each time up to BACKOFF_MAX_S.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
#: Answers worth retrying: the server or a proxy in front of it is briefly unavailable.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
ERRORS_BY_STATUS: dict[int, type[ClientError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: StaleLease, 413: PayloadTooLarge, 422: InvalidRequest,
}
CHECKSUM_HEADER = "X-Checksum-Sha256"
LEASE_HEADER = "X-Lease-Token"


class ResponseLike(Protocol):
    """What a transport returns: the parts of ``requests.Response`` the client reads."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any: ...


class Transport(abc.ABC):
    """Carries one request to the orchestrator; ``path`` is relative to ``/api/v1``."""

    @abc.abstractmethod
    def request(self, method: str, path: str, json: Any = None, data: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> ResponseLike:
        """Send the request and return the answer; raise ClientError(status=None) when none came."""

    def close(self) -> None:  # noqa: B027 - an optional hook, most transports hold nothing
        """Release connections."""


class HttpTransport(Transport):
    """HTTP(S) with a bearer token in the header (never in the URL) and retries for transient failures.

    Only failures that cannot have half-applied a request are retried: a refused or dropped connection
    and 502/503/504 from a proxy. A read timeout is not retried, because the server may have acted.

    Without a proxy each thread keeps one keep-alive connection (:mod:`hepopt.connections`): a worker's
    requests are small and many, and ``requests`` costs several times the CPU of the exchange itself.
    Through a proxy (from the environment) the requests session carries the bytes.
    """

    def __init__(self, url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, verify: bool | str = True) -> None:
        base = url.rstrip("/")
        self.base_url = base if base.endswith(API_PREFIX) else base + API_PREFIX
        self.timeout = timeout
        self.retries = retries
        self.session = _session_with_environment(self.base_url, verify)
        #: What the direct connections send besides a request's own headers: only what the server reads.
        self._direct_headers: dict[str, str] = {}
        if token:
            self.session.headers["Authorization"] = self._direct_headers["Authorization"] = f"Bearer {token}"
        scheme = urlsplit(self.base_url).scheme
        direct = not any(key in self.session.proxies for key in (scheme, "all"))
        context = _ssl_context(self.session.verify) if scheme == "https" else None
        self._direct = DirectConnections(self.base_url, timeout, context) if direct else None

    def request(self, method: str, path: str, json: Any = None, data: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> ResponseLike:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._once(method, path, json, data, headers)
            except Unreachable as exc:
                if last:
                    raise ClientError(f"cannot reach {self.base_url}: {exc}") from None
                log.warning("orchestrator unreachable (%s); retrying", exc)
            except (requests.RequestException, OSError, InvalidTarget) as exc:
                raise ClientError(f"{method} {path} failed: {exc}") from None
            else:
                if response.status_code not in RETRYABLE_STATUSES or last:
                    return response
                log.warning("orchestrator answered %d; retrying", response.status_code)
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, json: Any, data: bytes | None,
              headers: Mapping[str, str] | None) -> ResponseLike:
        if self._direct is not None:
            return self._direct.request(method, path, json, data, {**self._direct_headers, **(headers or {})})
        try:
            return self.session.request(method, self.base_url + path, json=json, data=data,
                                        headers=dict(headers or {}), timeout=self.timeout)
        except requests.ConnectionError as exc:
            raise Unreachable(str(exc)) from None

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self.session.close()


def _session_with_environment(url: str, verify: bool | str) -> requests.Session:
    """A session that read proxy and CA-bundle variables once, for ``url``'s host.

    With ``trust_env`` requests re-reads the whole environment (and looks for ~/.netrc) on every request,
    a large share of a small request's client CPU; a worker's environment does not change, and netrc
    credentials would only replace the bearer token.
    """
    session = requests.Session()
    settings = session.merge_environment_settings(url, {}, None, verify, None)
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    session.trust_env = False
    return session


def _ssl_context(verify: bool | str) -> ssl.SSLContext:
    """Certificate checks as ``requests`` does them: its CA bundle, a given bundle file, or none."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle = verify if isinstance(verify, str) else certifi.where()
    if Path(bundle).is_dir():
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


@dataclass(frozen=True)
class Lease:
    """A point leased to this worker (the REST ``lease`` object)."""

    point_id: int
    study_id: int
    number: int
    params: dict[str, Any]
    attempt: int
    lease_token: str
    expires_at: float
    lease_seconds: float
    has_checkpoint: bool

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Lease:
        return cls(**{name: doc[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AskResult:
    """``leased`` carries a lease; ``wait`` says when to ask again; ``finished`` means stop asking."""

    status: Literal["leased", "wait", "finished"]
    lease: Lease | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class HeartbeatResult:
    """The new lease expiry, and whether the study stopped (cancelled or completed) meanwhile."""

    expires_at: float
    stop: bool


class Client:
    """The orchestrator API as Python calls; studies and points come back as the JSON objects of the API."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, transport: Transport | None = None) -> None:
        if transport is None:
            if url is None:
                raise ValueError("give the orchestrator url or a transport")
            transport = HttpTransport(url, token, timeout=timeout, retries=retries)
        self.transport = transport

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- service and studies --------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def create_study(self, task: Mapping[str, Any] | Task, name: str | None = None) -> dict[str, Any]:
        """Submit a task (a validated Task, or its JSON form with the search space inline)."""
        body = {"task": task.to_json() if isinstance(task, Task) else dict(task), "name": name}
        return self._call("POST", "/studies", json=body)

    def list_studies(self) -> list[dict[str, Any]]:
        return self._call("GET", "/studies")

    def get_study(self, study_id: int) -> dict[str, Any]:
        return self._call("GET", f"/studies/{study_id}")

    def cancel(self, study_id: int) -> dict[str, Any]:
        return self._call("POST", f"/studies/{study_id}/cancel")

    def points(self, study_id: int, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?state={state}" if state else ""
        return self._call("GET", f"/studies/{study_id}/points{query}")

    def best(self, study_id: int) -> dict[str, Any] | None:
        """The best DONE point, or None while nothing is done."""
        try:
            return self._call("GET", f"/studies/{study_id}/best")
        except NotFound:
            self.get_study(study_id)  # a missing study must still raise
            return None

    def create_worker_token(self, study_id: int, expires_in: float | None = None) -> str:
        """A token that only serves the workers of one own study."""
        body: dict[str, Any] = {"study_id": study_id}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return self._call("POST", "/tokens", json=body)["token"]

    # -- worker verbs ---------------------------------------------------------------------------
    def ask(self, study_id: int, worker_id: str) -> AskResult:
        doc = self._call("POST", f"/studies/{study_id}/ask", json={"worker_id": worker_id})
        lease = Lease.from_json(doc["lease"]) if doc.get("lease") else None
        return AskResult(status=doc["status"], lease=lease, retry_after=doc.get("retry_after"))

    def heartbeat(self, study_id: int, point_id: int, lease_token: str) -> HeartbeatResult:
        doc = self._call("POST", self._point(study_id, point_id, "heartbeat"), json={"lease_token": lease_token})
        return HeartbeatResult(expires_at=doc["expires_at"], stop=doc["stop"])

    def report(self, study_id: int, point_id: int, lease_token: str, step: int, value: float) -> bool:
        """Record an intermediate value; True means the stopping policy prunes the point."""
        body = {"lease_token": lease_token, "step": step, "value": value}
        return bool(self._call("POST", self._point(study_id, point_id, "report"), json=body)["prune"])

    def tell(self, study_id: int, point_id: int, lease_token: str, status: str, loss: float | None = None,
             message: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        """Finish the point. The request id makes transport retries and resends harmless."""
        body = {"lease_token": lease_token, "status": status, "loss": loss, "message": message,
                "request_id": request_id or uuid.uuid4().hex}
        return self._call("POST", self._point(study_id, point_id, "tell"), json=body)

    def release(self, study_id: int, point_id: int, lease_token: str) -> dict[str, Any]:
        """Give the point back unfinished (walltime, shutdown) without spending an attempt."""
        return self._call("POST", self._point(study_id, point_id, "release"), json={"lease_token": lease_token})

    def put_checkpoint(self, study_id: int, point_id: int, lease_token: str, data: bytes) -> dict[str, Any]:
        headers = {LEASE_HEADER: lease_token, CHECKSUM_HEADER: hashlib.sha256(data).hexdigest(),
                   "Content-Type": "application/octet-stream"}
        return self._call("PUT", self._point(study_id, point_id, "checkpoint"), data=data, headers=headers)

    def get_checkpoint(self, study_id: int, point_id: int) -> bytes | None:
        """The point's latest checkpoint, verified against its checksum; None when there is none."""
        try:
            response = self._send("GET", self._point(study_id, point_id, "checkpoint"))
        except NotFound:
            self.get_study(study_id)
            return None
        expected = response.headers.get(CHECKSUM_HEADER, "")
        actual = hashlib.sha256(response.content).hexdigest()
        if expected != actual:
            raise ChecksumMismatch(f"checkpoint of point {point_id}: sha256 {actual} != announced {expected!r}")
        return response.content

    # -- plumbing -------------------------------------------------------------------------------
    @staticmethod
    def _point(study_id: int, point_id: int, verb: str) -> str:
        return f"/studies/{study_id}/points/{point_id}/{verb}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, **kwargs: Any) -> ResponseLike:
        response = self.transport.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(method, path, response)
        return response


def _error(method: str, path: str, response: ResponseLike) -> ClientError:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.content[:200].decode(errors="replace")
    cls = ERRORS_BY_STATUS.get(response.status_code, ClientError)
    return cls(f"{method} {path}: {response.status_code} {detail}".rstrip(), status=response.status_code)
