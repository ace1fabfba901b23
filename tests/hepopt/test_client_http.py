"""The HTTP transport's keep-alive connections against a real (stdlib) HTTP server: answer framings,
keep-alive reuse and recovery, refused header injection, and answers that break off or make no sense."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from hepopt.client import HttpTransport
from hepopt.errors import ClientError

BODY = {"answer": 42, "text": "ü"}
#: How long the server waits before closing an idle keep-alive connection, in the idle test.
IDLE_CLOSE_S = 0.2


class Framings(BaseHTTPRequestHandler):
    """Answers /sized, /chunked, /close, /eof (HTTP/1.0, no length), /empty (204), /continue (100 first),
    /truncated (closes before the announced length), /garbage (not HTTP), /hangup (closes without a
    word), /echo (the request's headers and body); counts the connections it accepted."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []
    hangups: ClassVar[int] = 0

    def setup(self) -> None:
        super().setup()
        Framings.connections.append(id(self.connection))

    def do_GET(self) -> None:
        payload = json.dumps(BODY).encode()
        route = self.path.rsplit("/", 1)[-1]
        if route == "chunked":
            self._start(200, {"Transfer-Encoding": "chunked"})
            for part in (payload[:5], payload[5:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: t\r\n\r\n")
        elif route == "close":
            self._start(200, {"Content-Length": str(len(payload)), "Connection": "close"})
            self.wfile.write(payload)
            self.close_connection = True
        elif route == "eof":
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + payload)
            self.close_connection = True
        elif route == "empty":
            self._start(204, {})
        elif route == "truncated":
            self._start(200, {"Content-Length": str(len(payload) + 10)})
            self.wfile.write(payload)
            self.close_connection = True
        elif route == "garbage":
            self.wfile.write(b"SMTP ready\r\n\r\n")
            self.close_connection = True
        elif route == "hangup":
            Framings.hangups += 1
            self.close_connection = True
        elif route == "continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._start(200, {"Content-Length": str(len(payload))})
            self.wfile.write(payload)
        else:
            self._start(200, {"Content-Length": str(len(payload)), "X-Checksum-Sha256": "abc"})
            self.wfile.write(payload)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = json.dumps({"headers": dict(self.headers.items()), "body": body.decode("latin-1")}).encode()
        self._start(200, {"Content-Length": str(len(answer))})
        self.wfile.write(answer)

    do_PUT = do_POST

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class IdleClosing(Framings):
    """Closes a keep-alive connection that stays idle for IDLE_CLOSE_S, without a word to the client."""

    timeout = IDLE_CLOSE_S


def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    Framings.connections.clear()
    Framings.hangups = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def url() -> Iterator[str]:
    yield from serving(Framings)


@pytest.fixture
def idle_closing_url() -> Iterator[str]:
    yield from serving(IdleClosing)


@pytest.mark.parametrize("route", ["sized", "chunked", "close", "eof", "continue"])
def test_every_answer_framing_is_read_whole(url: str, route: str) -> None:
    transport = HttpTransport(url, "secret", retries=0)
    try:
        for _ in range(2):  # the second request shows the connection was left in a clean state
            response = transport.request("GET", f"/{route}")
            assert response.status_code == 200 and response.json() == BODY
    finally:
        transport.close()


def test_no_body_answers_and_case_insensitive_headers(url: str) -> None:
    transport = HttpTransport(url, "secret", retries=0)
    try:
        assert transport.request("GET", "/empty").content == b""
        sized = transport.request("GET", "/sized")
        assert sized.headers.get("x-checksum-sha256") == sized.headers["X-Checksum-Sha256"] == "abc"
        assert "CONTENT-LENGTH" in sized.headers
    finally:
        transport.close()


def test_one_connection_serves_a_thread_and_a_closed_one_is_replaced(url: str) -> None:
    transport = HttpTransport(url, "secret", retries=0)
    try:
        for _ in range(3):
            transport.request("GET", "/sized")
        assert len(Framings.connections) == 1
        transport.request("GET", "/close")
        transport.request("GET", "/sized")
        assert len(Framings.connections) == 2
    finally:
        transport.close()


def test_requests_carry_token_body_and_extra_headers(url: str) -> None:
    transport = HttpTransport(url, "secret", retries=0)
    try:
        echoed = transport.request("POST", "/echo", json={"step": 1}, headers={"X-Lease-Token": "lt"}).json()
        headers = {name.lower(): value for name, value in echoed["headers"].items()}
        assert headers["authorization"] == "Bearer secret" and headers["x-lease-token"] == "lt"
        assert headers["content-type"] == "application/json" and json.loads(echoed["body"]) == {"step": 1}
        assert headers["host"] == url.removeprefix("http://")
        with pytest.raises(ValueError, match=r"(?i)invalid header"):
            transport.request("POST", "/echo", data=b"", headers={"X-Lease-Token": "lt\r\nX-Evil: 1"})
        with pytest.raises(ClientError, match="control characters"):
            transport.request("GET", "/sized HTTP/1.1\r\nX-Evil: 1")
    finally:
        transport.close()


def test_a_connection_the_server_closed_while_idle_is_reopened(idle_closing_url: str) -> None:
    transport = HttpTransport(idle_closing_url, "secret", retries=0)
    try:
        assert transport.request("GET", "/sized").json() == BODY
        time.sleep(3 * IDLE_CLOSE_S)  # the server has closed the connection meanwhile
        assert transport.request("GET", "/sized").json() == BODY
        assert len(Framings.connections) == 2
    finally:
        transport.close()


def test_chunked_trailers_are_not_taken_for_headers(url: str) -> None:
    transport = HttpTransport(url, "secret", retries=0)
    try:
        assert "X-Trailer" not in transport.request("GET", "/chunked").headers
    finally:
        transport.close()


def test_a_large_body_arrives_whole(url: str) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: written after the request head, not joined to it
    transport = HttpTransport(url, "secret", retries=0)
    try:
        echoed = transport.request("PUT", "/echo", data=data).json()
        assert echoed["body"].encode("latin-1") == data
    finally:
        transport.close()


def test_an_answer_cut_short_or_not_http_fails_at_once_and_the_connection_recovers(url: str) -> None:
    transport = HttpTransport(url, "secret", retries=3)
    try:
        with pytest.raises(ClientError, match="in the middle of its answer"):
            transport.request("GET", "/truncated")
        with pytest.raises(ClientError, match="malformed answer"):
            transport.request("GET", "/garbage")
        assert transport.request("GET", "/sized").json() == BODY
        assert len(Framings.connections) == 3  # each failure cost its connection, and nothing was retried
    finally:
        transport.close()


def test_no_answer_at_all_is_retried_then_reported_as_unreachable(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hepopt.client.BACKOFF_BASE_S", 0.01)
    transport = HttpTransport(url, "secret", retries=1)
    try:
        with pytest.raises(ClientError, match="cannot reach"):
            transport.request("GET", "/hangup")
        assert Framings.hangups == 2
    finally:
        transport.close()
