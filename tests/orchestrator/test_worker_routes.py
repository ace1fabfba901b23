"""The worker routes' fast path (orchestrator.app.WorkerRoutes) answers exactly as FastAPI's routes do.

Each request is sent twice over real HTTP: once with the token's grant evicted from the cache, which
hands the request to FastAPI, and once with it cached, which the fast path serves; the statuses and
bodies must match, and the fast path must really have served the second (FastAPI is not called)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from fastapi.responses import JSONResponse

from orchestrator.app import API_PREFIX, WorkerJSONResponse
from orchestrator.server import EmbeddedServer

TIMEOUT_S = 10


class Twice:
    """Sends a request through FastAPI, then through the fast path, counting what reached FastAPI."""

    def __init__(self, server: EmbeddedServer, token: str) -> None:
        self.server = server
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.token = token
        routes = server.app.worker_routes
        self.fastapi_calls = 0
        self.fastapi = fastapi = routes.app

        async def counting(scope: Any, receive: Any, send: Any) -> None:
            self.fastapi_calls += 1
            await fastapi(scope, receive, send)

        routes.app = counting

    def post(self, path: str, body: Any, *, slow: bool) -> tuple[int, Any]:
        if slow:
            self.server.app.state.service.grants._entries.clear()
        before = self.fastapi_calls
        response = self.session.post(self.server.url + API_PREFIX + path, json=body, timeout=TIMEOUT_S)
        assert (self.fastapi_calls > before) == slow, "the request did not take the expected path"
        return response.status_code, response.json()

    def both(self, path: str, body: Any) -> tuple[int, Any]:
        """The answer, after checking that both paths give it (for requests without side effects)."""
        slow = self.post(path, body, slow=True)
        assert self.post(path, body, slow=False) == slow
        return slow


@pytest.fixture
def study(server: EmbeddedServer, alice: Any, make_task: Callable[..., dict], wait_for: Callable[..., Any]) -> dict:
    created = alice.create_study(make_task(maxPoints=4, minUnevaluatedPoints=4, nPointsPerIteration=4))
    wait_for(lambda: alice.get_study(created["id"])["counts"]["new"] == 4, what="steering")
    return created


@pytest.fixture
def worker(server: EmbeddedServer, alice: Any, study: dict) -> Iterator[Twice]:
    twice = Twice(server, alice.create_worker_token(study["id"]))
    yield twice
    server.app.worker_routes.app = twice.fastapi


def test_both_paths_lease_report_heartbeat_and_tell_alike(worker: Twice, study: dict) -> None:
    sid = study["id"]
    first = worker.post(f"/studies/{sid}/ask", {"worker_id": "w"}, slow=True)
    second = worker.post(f"/studies/{sid}/ask", {"worker_id": "w"}, slow=False)
    assert first[0] == second[0] == 200
    leases = [answer[1]["lease"] for answer in (first, second)]
    assert [answer[1]["status"] for answer in (first, second)] == ["leased", "leased"]
    assert sorted(leases[0]) == sorted(leases[1]) and leases[0]["point_id"] != leases[1]["point_id"]
    lease = leases[0]
    point = f"/studies/{sid}/points/{lease['point_id']}"
    token = {"lease_token": lease["lease_token"]}
    assert worker.both(f"{point}/report", {**token, "step": 0, "value": 0.5}) == (200, {"prune": False})
    beats = [worker.post(f"{point}/heartbeat", token, slow=slow) for slow in (True, False)]
    expected = (200, ["expires_at", "stop"], False)
    assert [(status, sorted(beat), beat["stop"]) for status, beat in beats] == [expected, expected]
    assert beats[1][1]["expires_at"] >= beats[0][1]["expires_at"], "each heartbeat extends the lease"
    tell = {**token, "status": "done", "loss": 0.25, "request_id": "r-1", "message": None}
    told = worker.post(f"{point}/tell", tell, slow=True)
    assert told[0] == 200 and told[1]["state"] == "done"
    assert worker.post(f"{point}/tell", tell, slow=False) == told, "a replayed tell answers the same point"


def test_both_paths_refuse_alike(worker: Twice, study: dict, server: EmbeddedServer, alice: Any,
                                 make_task: Callable[..., dict]) -> None:
    sid = study["id"]
    lease = worker.post(f"/studies/{sid}/ask", {"worker_id": "w"}, slow=True)[1]["lease"]
    point = f"/studies/{sid}/points/{lease['point_id']}"
    stale = {"lease_token": "not-the-lease", "step": 1, "value": 0.1}
    status, answer = worker.both(f"{point}/report", stale)
    assert status == 409 and "no longer valid" in answer["detail"]
    assert worker.both(f"/studies/{sid}/points/999999/heartbeat", {"lease_token": "x"})[0] == 404
    other = alice.create_study(make_task())
    status, answer = worker.both(f"/studies/{other['id']}/ask", {"worker_id": "w"})
    assert status == 403 and "another study" in answer["detail"]
    bad_loss = {"lease_token": lease["lease_token"], "status": "done", "loss": None}
    status, answer = worker.both(f"{point}/tell", bad_loss)
    assert status == 422 and "loss" in answer["detail"]


def test_malformed_bodies_always_reach_fastapi(worker: Twice, study: dict) -> None:
    """A body that does not validate is FastAPI's to refuse, even with a cached grant."""
    worker.post(f"/studies/{study['id']}/ask", {"worker_id": "w"}, slow=True)  # caches the grant
    before = worker.fastapi_calls
    response = worker.session.post(f"{worker.server.url}{API_PREFIX}/studies/{study['id']}/ask",
                                   json={"worker_id": 3}, timeout=TIMEOUT_S)
    assert response.status_code == 422 and "worker_id" in response.json()["detail"]
    assert worker.fastapi_calls == before + 1


@pytest.mark.parametrize(("content", "status", "headers"), [
    ({"prune": False}, 200, None),
    ({"id": 3, "params": {"x": 0.5, "name": "ü"}, "loss": None}, 200, None),
    ({"detail": "invalid or expired token"}, 401, {"WWW-Authenticate": "Bearer"}),
])
def test_worker_answers_are_the_bytes_and_headers_of_a_json_response(content: Any, status: int,
                                                                     headers: dict | None) -> None:
    fast = WorkerJSONResponse(content, status_code=status, headers=headers)
    plain = JSONResponse(content, status_code=status, headers=headers)
    assert (fast.status_code, fast.body, fast.raw_headers) == (plain.status_code, plain.body, plain.raw_headers)
