"""The REST API over real HTTP (uvicorn on loopback, SQLite), driven through hepopt.client.Client."""

import hashlib
import re
import time

import pytest
import requests

from hepopt.client import Client
from hepopt.errors import Forbidden, InvalidRequest, NotFound, PayloadTooLarge, StaleLease, Unauthorized
from orchestrator.config import Settings
from orchestrator.server import EmbeddedServer

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? (\S+)$')


@pytest.fixture
def lease_of(wait_for):
    """Ask until a point is leased (steering runs in the background, so the first ask may be told to wait)."""
    def lease(client, study_id, worker="w1"):
        return wait_for(lambda: client.ask(study_id, worker).lease, what="a lease")

    return lease


def test_health_and_metrics_parse(server, alice, make_task, lease_of):
    assert alice.health()["status"] == "ok"
    study = alice.create_study(make_task())
    lease_of(alice, study["id"])
    text = requests.get(server.url + "/api/v1/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line), line
            continue
        match = SAMPLE.match(line)
        assert match, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(4))
    assert samples['hepopt_studies{state="running"}'] >= 1
    assert samples['hepopt_points{state="running"}'] >= 1
    assert samples['hepopt_asks_total{result="leased"}'] >= 1
    assert samples["hepopt_ask_seconds_count"] >= 1
    assert requests.get(server.url + "/metrics", timeout=5).text.startswith("# HELP")


def test_studies_belong_to_their_owner(alice, bob, make_task):
    study = alice.create_study(make_task(), name="mlpf-scan")
    assert (study["name"], study["owner"], study["state"]) == ("mlpf-scan", "alice", "running")
    assert study["task"]["maxPoints"] == 4 and study["steering"]["status"] in ("idle", "running")
    assert study["id"] in [s["id"] for s in alice.list_studies()]
    assert study["id"] not in [s["id"] for s in bob.list_studies()]
    assert alice.get_study(study["id"])["id"] == study["id"]
    for call in (bob.get_study, bob.cancel, bob.points):
        with pytest.raises(NotFound):
            call(study["id"])
    with pytest.raises(NotFound):
        bob.create_worker_token(study["id"])
    with pytest.raises(NotFound):
        alice.get_study(10**9)


def test_missing_wrong_and_expired_tokens_are_401(server):
    expired = server.storage.create_token("alice", expires_at=time.time() - 1)
    for token in (None, "hpo_not-a-token", expired):
        with Client(server.url, token, retries=0) as client, pytest.raises(Unauthorized):
            client.list_studies()
    good = server.storage.create_token("alice")
    for param in ("token", "access_token"):
        response = requests.get(f"{server.url}/api/v1/studies?{param}={good}", timeout=5)
        assert response.status_code == 401  # a token in the URL is never accepted


def test_worker_token_is_scoped_to_its_study(server, alice, make_task, lease_of):
    mine, other = alice.create_study(make_task()), alice.create_study(make_task())
    with Client(server.url, alice.create_worker_token(mine["id"], expires_in=600), retries=0) as worker:
        assert worker.get_study(mine["id"])["id"] == mine["id"]
        lease = lease_of(worker, mine["id"])
        assert worker.report(mine["id"], lease.point_id, lease.lease_token, 0, 1.0) is False
        for call in (lambda: worker.get_study(other["id"]), lambda: worker.ask(other["id"], "w"),
                     worker.list_studies, lambda: worker.create_study(make_task()),
                     lambda: worker.cancel(mine["id"]), lambda: worker.create_worker_token(mine["id"])):
            with pytest.raises(Forbidden):
                call()


def test_invalid_task_is_refused_naming_the_key_and_nothing_is_stored(alice, make_task):
    before = len(alice.list_studies())
    cases = {"maxPoints": make_task(maxPoints=0), "maxPoint": {**make_task(), "maxPoint": 3},
             "searchSpace.x": make_task(searchSpace={"x": {"method": "uniform", "dimension": {"low": 1}}}),
             "searchSpaceFile": {**{k: v for k, v in make_task().items() if k != "searchSpace"},
                                 "searchSpaceFile": "/etc/passwd"},
             "hepopt": make_task(hepopt={"method": "magic"})}
    for key, task in cases.items():
        with pytest.raises(InvalidRequest) as err:
            alice.create_study(task)
        assert key in str(err.value) and err.value.status == 422
    assert len(alice.list_studies()) == before


def test_steering_exec_is_refused_where_the_server_disallows_it(tmp_path, make_task):
    with EmbeddedServer(Settings(data_dir=tmp_path)) as srv, \
            Client(srv.url, srv.storage.create_token("alice"), retries=0) as client:
        with pytest.raises(InvalidRequest, match="steeringExec"):
            client.create_study(make_task(steeringExec="python -m steering_container generate"))
        assert client.list_studies() == []


def test_malformed_bodies_are_422(server, alice, make_task):
    study = alice.create_study(make_task())
    headers = {"Authorization": f"Bearer {server.storage.create_token('alice')}"}
    base = f"{server.url}/api/v1/studies/{study['id']}"
    bad = [("ask", {}, "worker_id"), ("ask", {"worker_id": 3}, "worker_id"),
           ("ask", {"worker_id": "w", "extra": 1}, "extra"),
           ("points/1/tell", {"lease_token": "t", "status": "bogus"}, "status"),
           ("points/1/report", {"lease_token": "t", "step": -1, "value": 1.0}, "step")]
    for path, body, key in bad:
        response = requests.post(f"{base}/{path}", json=body, headers=headers, timeout=5)
        assert response.status_code == 422 and key in response.json()["detail"], (path, response.text)
    response = requests.post(f"{base}/ask", data=b"{not json", headers=headers, timeout=5)
    assert response.status_code == 422
    response = requests.post(f"{server.url}/api/v1/studies", json={"name": "no task"}, headers=headers, timeout=5)
    assert response.status_code == 422 and "task" in response.json()["detail"]


def test_ask_report_tell_cycle_until_finished(alice, make_task, wait_for):
    study = alice.create_study(make_task(maxPoints=3))
    sid, told = study["id"], 0
    while True:
        answer = alice.ask(sid, "w1")
        if answer.status == "finished":
            break
        if answer.status == "wait":
            assert answer.retry_after > 0
            time.sleep(answer.retry_after)
            continue
        lease = answer.lease
        assert lease.attempt == 0 and not lease.has_checkpoint and lease.lease_seconds == 300
        assert alice.heartbeat(sid, lease.point_id, lease.lease_token).stop is False
        for step in range(3):
            assert alice.report(sid, lease.point_id, lease.lease_token, step, 1.0 / (step + 1)) is False
        point = alice.tell(sid, lease.point_id, lease.lease_token, "done", loss=lease.params["x"])
        assert point["state"] == "done" and point["loss"] == lease.params["x"]
        told += 1
    final = alice.get_study(sid)
    assert told == 3 and final["state"] == "completed"
    assert final["counts"] == {"new": 0, "running": 0, "done": 3, "pruned": 0, "failed": 0, "evaluation_jobs": 3}
    done = alice.points(sid, state="done")
    assert final["best"]["loss"] == min(p["loss"] for p in done) == alice.best(sid)["loss"]
    assert len({tuple(sorted(p["params"].items())) for p in done}) == 3


def test_tell_is_idempotent_by_request_id_and_a_stale_lease_is_409(alice, make_task, lease_of):
    sid = alice.create_study(make_task())["id"]
    lease = lease_of(alice, sid)
    first = alice.tell(sid, lease.point_id, lease.lease_token, "done", loss=0.0, request_id="req-1")
    again = alice.tell(sid, lease.point_id, lease.lease_token, "done", loss=0.0, request_id="req-1")
    assert first == again and first["loss"] == 0.0
    assert alice.get_study(sid)["counts"]["done"] == 1
    with pytest.raises(StaleLease):
        alice.tell(sid, lease.point_id, lease.lease_token, "done", loss=0.5, request_id="req-2")
    for call in (lambda: alice.heartbeat(sid, lease.point_id, lease.lease_token),
                 lambda: alice.report(sid, lease.point_id, lease.lease_token, 1, 0.2),
                 lambda: alice.release(sid, lease.point_id, lease.lease_token)):
        with pytest.raises(StaleLease):
            call()


def test_release_returns_the_point_and_expired_leases_are_reaped(alice, make_task, lease_of, wait_for):
    sid = alice.create_study(make_task(hepopt={"leaseSeconds": 0.3}))["id"]
    lease = lease_of(alice, sid)
    assert alice.release(sid, lease.point_id, lease.lease_token)["state"] == "new"
    again = lease_of(alice, sid)
    assert (again.point_id, again.attempt) == (lease.point_id, 0)
    time.sleep(0.4)  # the lease expires; the reaper returns the point with attempt + 1
    third = wait_for(lambda: (lambda a: a.lease if a.lease and a.lease.point_id == lease.point_id else None)(
        alice.ask(sid, "w2")), what="the reaped point")
    assert third.attempt == 1


def test_checkpoint_round_trip_and_size_limit(server, alice, make_task, lease_of):
    limit = server.settings.checkpoint_max_bytes
    sid = alice.create_study(make_task())["id"]
    lease = lease_of(alice, sid)
    assert alice.get_checkpoint(sid, lease.point_id) is None
    with pytest.raises(PayloadTooLarge):
        alice.put_checkpoint(sid, lease.point_id, lease.lease_token, b"x" * (limit + 1))
    assert alice.get_checkpoint(sid, lease.point_id) is None
    assert list(server.settings.checkpoint_dir.glob(f"{sid}/*")) == []
    data = bytes(range(256)) * 3
    answer = alice.put_checkpoint(sid, lease.point_id, lease.lease_token, data)
    assert answer == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert alice.get_checkpoint(sid, lease.point_id) == data
    headers = {"Authorization": alice.transport.session.headers["Authorization"], "X-Lease-Token": lease.lease_token,
               "X-Checksum-Sha256": hashlib.sha256(b"other").hexdigest()}
    url = f"{server.url}/api/v1/studies/{sid}/points/{lease.point_id}/checkpoint"
    assert requests.put(url, data=b"mine", headers=headers, timeout=5).status_code == 422
    assert alice.get_checkpoint(sid, lease.point_id) == data  # the failed upload changed nothing
    with pytest.raises(StaleLease):
        alice.put_checkpoint(sid, lease.point_id, "not-the-lease", b"abc")
    alice.release(sid, lease.point_id, lease.lease_token)
    assert lease_of(alice, sid).has_checkpoint


def test_cancel_stops_leasing_and_tells_running_workers(alice, make_task, lease_of):
    sid = alice.create_study(make_task())["id"]
    lease = lease_of(alice, sid)
    assert alice.cancel(sid)["state"] == "cancelled"
    assert alice.cancel(sid)["state"] == "cancelled"
    assert alice.ask(sid, "w2").status == "finished"
    assert alice.heartbeat(sid, lease.point_id, lease.lease_token).stop is True
    assert alice.tell(sid, lease.point_id, lease.lease_token, "done", loss=1.0)["state"] == "done"


def test_median_stopping_prunes_through_report(alice, make_task, lease_of):
    task = make_task(nParallelEvaluation=2, hepopt={"earlyStopping": {"policy": "median", "minTrials": 1}})
    sid = alice.create_study(task)["id"]
    first, second = lease_of(alice, sid), lease_of(alice, sid)
    assert first.point_id != second.point_id
    assert alice.report(sid, first.point_id, first.lease_token, 0, 1.0) is False  # nobody to compare with
    assert alice.report(sid, second.point_id, second.lease_token, 0, 2.0) is True  # worse than the median
    assert alice.report(sid, second.point_id, second.lease_token, 1, 0.5) is False  # step 1: no peer yet
    assert alice.report(sid, second.point_id, second.lease_token, 0, 0.5) is False  # a resend replaces
    pruned = alice.tell(sid, second.point_id, second.lease_token, "pruned", loss=2.0)
    assert pruned["state"] == "pruned"


def test_steering_fills_points_respecting_the_task_budget(alice, make_task, wait_for):
    task = make_task(maxPoints=5, nPointsPerIteration=2, minUnevaluatedPoints=3)
    sid = alice.create_study(task)["id"]
    counts = wait_for(lambda: (c := alice.get_study(sid)["counts"])["new"] >= 3 and c, what="steering")
    time.sleep(0.3)  # several scheduler passes: 4 unevaluated >= 3, so no further steering
    assert alice.get_study(sid)["counts"]["new"] == counts["new"] == 4
    for _ in range(2):
        lease = alice.ask(sid, "w").lease
        alice.tell(sid, lease.point_id, lease.lease_token, "done", loss=1.0)
    wait_for(lambda: len(alice.points(sid)) == 5, what="the fifth point")
    time.sleep(0.3)
    assert len(alice.points(sid)) == 5  # maxPoints caps the last iteration at one point


def test_steering_exec_runs_the_idds_contract(alice, make_task, wait_for):
    command = ("python -m steering_container generate --infile %IN --outfile %OUT --n_point %NUM_POINTS "
               "--max_point %MAX_POINTS --method random")
    sid = alice.create_study(make_task(steeringExec=command, maxPoints=3))["id"]
    points = wait_for(lambda: len(p := alice.points(sid)) == 2 and p, timeout=30, what="steeringExec points")
    study = alice.get_study(sid)
    assert study["steering"]["error"] is None and study["counts"]["new"] == 2
    assert all(0 <= p["params"]["x"] <= 1 and p["params"]["n"] in (1, 2, 3, 4) for p in points)


def test_failing_steering_exec_shows_on_the_study_after_three_tries(tmp_path, alice, make_task, wait_for):
    tries = tmp_path / "tries.txt"
    script = tmp_path / "broken_steering.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('try\\n')\nsys.exit('steering exploded')\n")
    sid = alice.create_study(make_task(steeringExec=f"python {script} {tries} %IN %OUT"))["id"]
    study = wait_for(lambda: (s := alice.get_study(sid))["steering"]["status"] == "failed" and s, timeout=30,
                     what="the steering failure")
    assert study["steering"]["error"].startswith("steering failed:")
    assert "steering exploded" in study["steering"]["error"]
    assert tries.read_text().count("try") == 3
    assert study["state"] == "running" and alice.ask(sid, "w").status == "wait"
