"""The client without an orchestrator: error mapping, retries, request ids, checksums, the payload reporter."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from hepopt import client as client_module
from hepopt.client import Client, HttpTransport, Transport
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
from hepopt.reporting import Reporter


class Answer:
    def __init__(self, status, body=None, headers=None, content=None):
        self.status_code = status
        self.headers = headers or {}
        self.content = content if content is not None else json.dumps(body).encode()

    def json(self):
        return json.loads(self.content)


class Scripted(Transport):
    """Answers from a list and records every request."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests = []

    def request(self, method, path, json=None, data=None, headers=None):
        self.requests.append((method, path, json, data, headers))
        return self.answers.pop(0)


@pytest.mark.parametrize(("status", "error"), [(401, Unauthorized), (403, Forbidden), (404, NotFound),
                                               (409, StaleLease), (413, PayloadTooLarge), (422, InvalidRequest),
                                               (500, ClientError)])
def test_statuses_map_to_errors_carrying_the_detail(status, error):
    client = Client(transport=Scripted(Answer(status, {"detail": "maxPoints: must be >= 1"})))
    with pytest.raises(error) as err:
        client.list_studies()
    assert err.value.status == status and "maxPoints" in str(err.value)


def test_tell_sends_a_request_id_and_keeps_a_given_one():
    transport = Scripted(Answer(200, {"state": "done"}), Answer(200, {"state": "done"}))
    client = Client(transport=transport)
    client.tell(1, 2, "lease", "done", loss=0.0)
    client.tell(1, 2, "lease", "done", loss=0.0, request_id="mine")
    generated, given = (req[2]["request_id"] for req in transport.requests)
    assert len(generated) >= 16 and given == "mine"
    assert transport.requests[0][1] == "/studies/1/points/2/tell" and transport.requests[0][2]["loss"] == 0.0


def test_ask_decodes_the_three_answers():
    lease = {"point_id": 5, "study_id": 1, "number": 0, "params": {"x": 1}, "attempt": 1, "lease_token": "t",
             "expires_at": 10.0, "lease_seconds": 300.0, "has_checkpoint": True}
    client = Client(transport=Scripted(Answer(200, {"status": "leased", "lease": lease}),
                                       Answer(200, {"status": "wait", "retry_after": 2.0}),
                                       Answer(200, {"status": "finished"})))
    leased = client.ask(1, "w")
    assert leased.status == "leased" and leased.lease.params == {"x": 1} and leased.lease.has_checkpoint
    assert (client.ask(1, "w").retry_after, client.ask(1, "w").status) == (2.0, "finished")


def test_checkpoints_are_sent_and_received_with_a_checksum():
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    transport = Scripted(Answer(200, {"sha256": digest, "size": 7}),
                         Answer(200, content=data, headers={"X-Checksum-Sha256": digest}),
                         Answer(200, content=b"tampered", headers={"X-Checksum-Sha256": digest}))
    client = Client(transport=transport)
    client.put_checkpoint(1, 2, "lease", data)
    assert transport.requests[0][4]["X-Checksum-Sha256"] == digest and transport.requests[0][3] == data
    assert client.get_checkpoint(1, 2) == data
    with pytest.raises(ChecksumMismatch):
        client.get_checkpoint(1, 2)


class Flaky(BaseHTTPRequestHandler):
    """503 twice, then 200; 500 always on /broken. Records the Authorization header."""

    calls: ClassVar[list] = []

    def do_GET(self):
        Flaky.calls.append((self.path, self.headers.get("Authorization")))
        status = 500 if self.path.endswith("/broken") else (503 if len(Flaky.calls) <= 2 else 200)
        body = json.dumps({"status": "ok"} if status == 200 else {"detail": "busy"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_transport_retries_only_transient_failures(monkeypatch):
    monkeypatch.setattr(client_module, "BACKOFF_BASE_S", 0.001)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = Client(url, "secret", retries=3)
        assert client.health() == {"status": "ok"}
        assert Flaky.calls == [("/api/v1/health", "Bearer secret")] * 3
        Flaky.calls.clear()
        transport = HttpTransport(url + "/api/v1", "secret", retries=3)
        assert transport.request("GET", "/broken").status_code == 500
        assert len(Flaky.calls) == 1  # a 500 is the server's answer, not a transient failure
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ClientError, match="cannot reach"):
        Client(url, "secret", retries=1, timeout=1).health()


def test_reporter_exists_only_when_the_worker_set_the_variables():
    assert Reporter.from_env({}) is None
    env = {"HEPOPT_URL": "http://127.0.0.1:1", "HEPOPT_TOKEN": "t", "HEPOPT_STUDY": "3", "HEPOPT_TRIAL": "9",
           "HEPOPT_LEASE": "lease"}
    assert Reporter.from_env({**env, "HEPOPT_LEASE": ""}) is None
    reporter = Reporter.from_env(env)
    assert (reporter.study_id, reporter.point_id, reporter.lease_token) == (3, 9, "lease")


def test_reporter_answers_and_survives_transport_failures():
    prune, lost, down = Answer(200, {"prune": True}), Answer(409, {"detail": "stale"}), Answer(500, {"detail": "x"})
    transport = Scripted(prune, lost, down)
    reporter = Reporter(Client(transport=transport), 1, 2, "lease")
    assert reporter.report(0, 0.5) is True
    assert transport.requests[0][2] == {"lease_token": "lease", "step": 0, "value": 0.5}
    assert reporter.report(1, 0.4) is True  # the lease is gone: stop
    assert reporter.report(2, 0.3) is False  # the service is down: keep training
