"""``hepopt worker`` against a real ``hepopt serve``: the evaluation contract, failures, SIGTERM with
checkpoint upload and release, checkpoint restore on the next attempt, and the walltime rule."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

WORKER_TIMEOUT_S = 90
STEERING_TIMEOUT_S = 60


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = WORKER_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"worker did not exit in {timeout} s:\n{log.read_text()}")



def test_worker_evaluates_points_and_fails_bad_ones(kit: Any, server: Any, payload_dir: Path,
                                                     tmp_path: Path) -> None:
    data = payload_dir / "data"
    data.mkdir()
    for name in ("b.txt", "a.txt"):
        (data / name).write_text("events")
    task = kit.make_task(6, parallel=3, fail_below=0.0, trainingDS="data/*.txt")
    study = kit.create_study(server, task)
    workdir = tmp_path / "w1"
    code = _finish(kit.start_worker(server, study, workdir, payload_dir), Path(f"{workdir}.log"))

    assert code == 0, Path(f"{workdir}.log").read_text()
    points = kit.assert_budget_kept(server.db_path, study.id, 6)
    rows = kit.query(server.db_path, "SELECT params_json, state, loss, message FROM points WHERE study_id = ?",
                     study.id)
    for params_json, state, loss, message in rows:
        x = json.loads(params_json)["x"]
        if x < 0:
            assert state == "failed" and loss is None, (x, state)
            assert "exited with code 3" in message and "refusing this point" in message, message
        else:
            assert state == "done" and loss == pytest.approx(x * x), (x, state, loss)
            assert message == "fresh"
    assert len(points) == 6
    seen = [kit.read_json(p) for p in workdir.glob("point*/seen.json")]
    assert len(seen) == 6
    point_ids = {str(row[0]) for row in points}
    for doc in seen:
        env = doc["env"]
        assert env["HEPOPT_URL"] == server.url and env["HEPOPT_STUDY"] == str(study.id)
        assert env["HEPOPT_TOKEN"] == study.worker_token and env["HEPOPT_LEASE"]
        assert env["HEPOPT_TRIAL"] in point_ids
        assert doc["input_ds"] == [str(data / "a.txt"), str(data / "b.txt")]


def test_sigterm_uploads_checkpoint_releases_and_next_attempt_resumes(kit: Any, server: Any, payload_dir: Path,
                                                                       tmp_path: Path) -> None:
    task = kit.make_task(1, sleep=0.2, steps=20, checkPointToSave="ckpt", checkPointInterval=0.01)
    study = kit.create_study(server, task)
    first = tmp_path / "first"
    proc = kit.start_worker(server, study, first, payload_dir, name="first")
    running = kit.wait_for(lambda: [p for p in first.glob("point*/running") if int(p.read_text()) >= 3], 60,
                           "the payload to pass step 3")[0]
    payload_pid = int((running.parent / "pid").read_text())

    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, Path(f"{first}.log")) == 0
    log = Path(f"{first}.log").read_text()
    assert "stopping the payload (received SIGTERM)" in log and "uploaded checkpoint" in log, log
    assert not kit.process_alive(payload_pid), "the payload outlived its worker"
    [(state, attempt)] = kit.query(server.db_path, "SELECT state, attempt FROM points WHERE study_id = ?", study.id)
    assert (state, attempt) == ("new", 0), "a released point goes back to NEW without spending an attempt"
    [(outcome,)] = kit.query(server.db_path, "SELECT outcome FROM leases WHERE study_id = ?", study.id)
    assert outcome == "released"
    [(path, size)] = kit.query(server.db_path, "SELECT path, size FROM checkpoints")
    assert size > 0 and (server.data_dir / path).stat().st_size == size

    second = tmp_path / "second"
    assert _finish(kit.start_worker(server, study, second, payload_dir, name="second"),
                   Path(f"{second}.log")) == 0
    assert "restored checkpoint" in Path(f"{second}.log").read_text()
    [(state, message)] = kit.query(server.db_path, "SELECT state, message FROM points WHERE study_id = ?", study.id)
    assert state == "done"
    resumed_from = int(message.removeprefix("resumed from step "))
    assert resumed_from >= 3, message
    kit.assert_no_double_lease(server.db_path, study.id)


def test_walltime_stops_before_a_point_that_cannot_finish(kit: Any, server: Any, payload_dir: Path,
                                                          tmp_path: Path) -> None:
    task = kit.make_task(4, sleep=2.0, parallel=2)
    study = kit.create_study(server, task)
    # The walltime is tight on purpose; the first steering run (a fresh proposal process) must not eat it.
    kit.wait_for(lambda: kit.query(server.db_path, "SELECT count(*) FROM points WHERE study_id = ?",
                                   study.id)[0][0], STEERING_TIMEOUT_S, "the first points of the study")
    workdir = tmp_path / "wall"
    proc = kit.start_worker(server, study, workdir, payload_dir, "--walltime", "3.6s")
    assert _finish(proc, Path(f"{workdir}.log")) == 0
    log = Path(f"{workdir}.log").read_text()
    assert "not starting another point" in log, log
    states = kit.query(server.db_path, "SELECT state FROM points WHERE study_id = ? AND state != 'new'", study.id)
    assert states == [("done",)], states
