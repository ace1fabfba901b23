"""Keep-alive HTTP/1.1 connections from the client to the orchestrator, one per thread.

A worker's requests are small and many, and on a small machine the client's CPU per request competes
with the server's. The standard library's ``http.client`` spends most of a small exchange parsing the
answer's headers through the ``email`` package (about 0.4 ms of CPU per request on the test machine);
here the answer is parsed by httptools (the llhttp parser that uvicorn uses, maintained with it), and
a request is written as one buffer (about 0.15 ms together).
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import re
import select
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
from requests.structures import CaseInsensitiveDict

#: Bytes read from the socket at a time.
RECV_BYTES = 256 * 1024
#: Bodies up to this size go out in the same write as the request head (one packet, no Nagle delay);
#: larger ones (checkpoints) are written after it, so that they are not copied.
JOINED_BODY_MAX_BYTES = 64 * 1024
#: Methods whose requests carry a Content-Length even when empty (as http.client and requests do).
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Control characters a header value must not contain (CR and LF would start a new header).
HEADER_VALUE_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: What a request target must not contain: controls and spaces would end the request line early.
TARGET_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


class Unreachable(ConnectionError):
    """No answer came and nothing the server could have acted on was sent: safe to retry."""


class InvalidTarget(ValueError):
    """A request path with characters that would break the request line."""


@dataclass(frozen=True)
class HttpResponse:
    """An answer read in full; ``headers`` are looked up case-insensitively."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class DirectConnections:
    """One keep-alive connection per thread to one server, reopened when the server closed it."""

    def __init__(self, base_url: str, timeout: float, context: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self.prefix = parts.path
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.timeout = timeout
        self.context = context
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Connection] = []

    def request(self, method: str, path: str, json: Any, data: bytes | None,
                headers: Mapping[str, str]) -> HttpResponse:
        """The answer; :class:`Unreachable` when none came and the request may be sent again."""
        extra = dict(headers)
        if json is not None:
            data = jsonlib.dumps(json).encode()
            extra["Content-Type"] = "application/json"
        if data is None and method in METHODS_WITH_BODY:
            data = b""
        head = self._head(method, path, extra, data)
        conn = self._connection()
        try:
            response, keep_alive = conn.exchange(head, data or b"")
        except BaseException:
            self._discard(conn)
            raise
        if not keep_alive:
            self._discard(conn)
        return response

    def _head(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        target = self.prefix + path
        if TARGET_FORBIDDEN.search(target):
            raise InvalidTarget(f"URL can't contain control characters: {target!r}")
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n".encode()]
        for name, value in headers.items():
            lines.append(_header_line(name, value))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    def _connection(self) -> Connection:
        """This thread's connection, opened now (failures are retryable) unless it is open and alive."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.dropped():
            self._discard(conn)
            conn = None
        if conn is None:
            try:
                conn = Connection.open(self.host, self.port, self.timeout, self.context)
            except OSError as exc:
                raise Unreachable(str(exc) or type(exc).__name__) from None
            with self._lock:
                self._all.append(conn)
            self._local.conn = conn
        return conn

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock, contextlib.suppress(ValueError):
            self._all.remove(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _header_line(name: str, value: str | bytes) -> bytes:
    raw_name = name.encode("ascii")
    raw_value = value if isinstance(value, bytes) else value.encode("latin-1")
    if not HEADER_NAME.fullmatch(raw_name):
        raise ValueError(f"Invalid header name {name!r}")
    if HEADER_VALUE_FORBIDDEN.search(raw_value):
        raise ValueError(f"Invalid header value {value!r} for {name!r}")
    return b"%s: %s\r\n" % (raw_name, raw_value)


class Connection:
    """A socket that carries one request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def open(cls, host: str, port: int, timeout: float, context: ssl.SSLContext | None) -> Connection:
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
        poller = select.poll()  # not select.select: it refuses descriptors above 1023
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def exchange(self, head: bytes, body: bytes) -> tuple[HttpResponse, bool]:
        """Send a request, read its answer whole; also whether the connection may serve another."""
        if len(body) <= JOINED_BODY_MAX_BYTES:
            self.sock.sendall(head + body)
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)
        answer = _Answer()
        while not answer.complete:
            data = self.sock.recv(RECV_BYTES)
            if not data:
                answer.end_of_stream()
                break
            answer.feed(data)
        return HttpResponse(answer.status, answer.headers, b"".join(answer.body)), answer.keep_alive

    def close(self) -> None:
        self.sock.close()


class _Answer:
    """httptools' callbacks, collecting one response. Interim answers (``100 Continue``) are skipped;
    trailers of a chunked body are not headers of the answer."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        self.body: list[bytes] = []
        self.started = self.headers_done = self.complete = self.keep_alive = False

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise OSError(f"malformed answer from the server: {exc}") from None

    def end_of_stream(self) -> None:
        """The server closed the connection: the end of a body without length, else a failure."""
        if not self.started:
            raise Unreachable("the server closed the connection without answering")
        if not self.headers_done or "content-length" in self.headers or "transfer-encoding" in self.headers:
            raise OSError("the server closed the connection in the middle of its answer")
        self.complete, self.keep_alive = True, False

    def on_message_begin(self) -> None:
        self.started = True
        self.headers = CaseInsensitiveDict()
        self.body = []
        self.headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:
            self.headers[name.decode("latin-1")] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        if not 100 <= self.status < 200:
            self.complete = True
