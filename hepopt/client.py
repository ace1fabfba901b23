"""The orchestrator client: one API for workers, the CLI and payloads, whatever carries the bytes.

Each verb maps to one route of docs/REST_API.md. The bytes travel through a :class:`Transport`:
:class:`HttpTransport` talks HTTP; a mailbox transport for compute nodes without network (DESIGN.md
§3.6) plugs in behind the same interface, so callers never know which one they use.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import http.client
import json as jsonlib
import logging
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import certifi
import requests

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
HTTP_PORT = 80
HTTPS_PORT = 443
#: Requests that carry a body, so announce its length even when it is empty.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Bodies up to this size go out in one write with the request head.
SINGLE_WRITE_BYTES = 64 * 1024
#: Limits on an answer's head, as ``http.client`` sets them.
MAX_LINE_BYTES = 65536
MAX_HEADERS = 100
CONTINUE, SWITCHING_PROTOCOLS, OK = 100, 101, 200
NO_BODY_STATUSES = frozenset({204, 304})
CRLF = b"\r\n"


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

    Without a proxy each thread keeps one keep-alive HTTP/1.1 connection of its own
    (:class:`_DirectConnections`): a worker's requests are small and many, and ``requests`` costs
    several times the CPU of the exchange itself. Through a proxy (from the environment) the requests
    session carries the bytes.
    """

    def __init__(self, url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, verify: bool | str = True) -> None:
        base = url.rstrip("/")
        self.base_url = base if base.endswith(API_PREFIX) else base + API_PREFIX
        self.timeout = timeout
        self.retries = retries
        self.session = _session_with_environment(self.base_url, verify)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        direct = not any(key in self.session.proxies for key in (urlsplit(self.base_url).scheme, "all"))
        self._direct = (_DirectConnections(self.base_url, timeout, self.session.verify, self.session.headers)
                        if direct else None)

    def request(self, method: str, path: str, json: Any = None, data: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> ResponseLike:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._once(method, path, json, data, headers)
            except _Unreachable as exc:
                if last:
                    raise ClientError(f"cannot reach {self.base_url}: {exc}") from None
                log.warning("orchestrator unreachable (%s); retrying", exc)
            except (requests.RequestException, OSError, http.client.HTTPException) as exc:
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
            return self._direct.request(method, path, json, data, headers or {})
        try:
            return self.session.request(method, self.base_url + path, json=json, data=data,
                                        headers=dict(headers or {}), timeout=self.timeout)
        except requests.ConnectionError as exc:
            raise _Unreachable(str(exc)) from None

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self.session.close()


class _Unreachable(Exception):
    """No answer and nothing sent that the server could have acted on: safe to retry."""


@dataclass(frozen=True)
class HttpResponse:
    """An answer read in full from a direct connection."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    #: False when the server ends the connection after this answer (HTTP/1.0, ``Connection: close``, or
    #: a body that runs to the end of the connection).
    keep_alive: bool = True

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class _DirectConnections:
    """One keep-alive HTTP/1.1 connection per thread to the orchestrator, spoken on the socket itself.

    A worker's requests are small and many. ``http.client`` spent most of a request's client CPU
    formatting headers one call at a time and parsing the answer's with the ``email`` package (0.54 ms
    of CPU per report on the 2-core test machine); here the fixed part of every request head (host,
    bearer token, agent) is formatted once and the answer is read with a buffered reader. Answers may be
    sized (``Content-Length``), chunked, or run to the end of the connection.
    """

    def __init__(self, base_url: str, timeout: float, verify: bool | str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(base_url)
        self.prefix = parts.path
        self.host = parts.hostname or "localhost"
        https = parts.scheme == "https"
        self.port = parts.port or (HTTPS_PORT if https else HTTP_PORT)
        self.timeout = timeout
        self.context = _ssl_context(verify) if https else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {"Host": host if parts.port is None else f"{host}:{parts.port}", **headers,
                 "Accept-Encoding": "identity"}  # nothing here decodes gzip
        self._fixed_head = _header_lines(fixed)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[_Connection] = []

    def request(self, method: str, path: str, json: Any, data: bytes | None,
                headers: Mapping[str, str]) -> HttpResponse:
        extra = dict(headers)
        if json is not None:
            data = jsonlib.dumps(json).encode()
            extra["Content-Type"] = "application/json"
        if data is not None or method in BODY_METHODS:
            extra["Content-Length"] = str(len(data or b""))
        target = self.prefix + path
        if not target.isprintable() or " " in target:
            raise ValueError(f"invalid request path {target!r}")
        head = f"{method} {target} HTTP/1.1\r\n".encode("latin-1") + self._fixed_head + _header_lines(extra) + b"\r\n"
        conn = self._connection()
        try:
            conn.send(head, data or b"")
            response = conn.read_response(method)
        except BaseException as exc:
            self._discard(conn)
            if isinstance(exc, ConnectionError):
                raise _Unreachable(str(exc) or type(exc).__name__) from None
            raise
        if not response.keep_alive:
            self._discard(conn)
        return response

    def _connection(self) -> _Connection:
        """This thread's connection, opened now (failures are retryable) unless it is open and alive."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.dropped():
            self._discard(conn)
            conn = None
        if conn is None:
            try:
                conn = _Connection.open(self.host, self.port, self.timeout, self.context)
            except OSError as exc:
                raise _Unreachable(str(exc) or type(exc).__name__) from None
            with self._lock:
                self._all.append(conn)
            self._local.conn = conn
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock, contextlib.suppress(ValueError):
            self._all.remove(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class _Connection:
    """A connected socket (TLS-wrapped for https) with a buffered reader for the answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.poller = select.poll()  # not select.select: it refuses descriptors above 1023
        self.poller.register(sock, select.POLLIN)

    @classmethod
    def open(cls, host: str, port: int, timeout: float, context: ssl.SSLContext | None) -> _Connection:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def dropped(self) -> bool:
        """An idle keep-alive socket that is readable was closed by the server (or holds junk): reconnect
        rather than send a request into it."""
        return bool(self.poller.poll(0))

    def send(self, head: bytes, body: bytes) -> None:
        if len(body) <= SINGLE_WRITE_BYTES:
            self.sock.sendall(head + body)
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)

    def read_response(self, method: str) -> HttpResponse:
        status, version, headers = self._read_head()
        while CONTINUE <= status < OK and status != SWITCHING_PROTOCOLS:  # interim answers precede the real one
            status, version, headers = self._read_head()
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in NO_BODY_STATUSES or status < OK:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        elif "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]))
        else:
            body, keep_alive = self.reader.read(), False
        return HttpResponse(status, _Headers(headers), body, keep_alive)

    def _read_head(self) -> tuple[int, str, dict[str, str]]:
        line = self.reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise http.client.RemoteDisconnected("the orchestrator closed the connection without answering")
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/") or len(line) > MAX_LINE_BYTES or not code.isdigit():
            raise http.client.BadStatusLine(line.decode("latin-1", "replace"))
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            field = self.reader.readline(MAX_LINE_BYTES + 1)
            if field in (b"\r\n", b"\n", b""):
                return int(code), version, headers
            if len(field) > MAX_LINE_BYTES:
                raise http.client.LineTooLong("header line")
            name, _, value = field.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")

    def _read_exactly(self, size: int) -> bytes:
        data = self.reader.read(size)
        if len(data) < size:
            raise http.client.IncompleteRead(data, size - len(data))
        return data

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            line = self.reader.readline(MAX_LINE_BYTES + 1)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise http.client.HTTPException(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while self.reader.readline(MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields: nothing here uses them
                return b"".join(chunks)
            chunks.append(self._read_exactly(size))
            self._read_exactly(len(CRLF))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class _Headers(dict[str, str]):
    """An answer's header fields by lower-case name, looked up in any case."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


def _header_lines(headers: Mapping[str, str | bytes]) -> bytes:
    """``Name: value\\r\\n`` lines; a name or value that would end its line early is refused, so a value
    cannot smuggle in a header of its own."""
    lines = []
    for name, value in headers.items():
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if not name.isprintable() or ":" in name or not text.isprintable():
            raise ValueError(f"invalid header {name!r}: {text!r}")
        lines.append(f"{name}: {text}\r\n")
    return "".join(lines).encode("latin-1")


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
