"""``hepopt run`` end to end: the quadratic example, a task with its own steeringExec (the iDDS path),
and Ctrl-C stopping the workers cleanly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "quadratic"
RUN_TIMEOUT_S = 240


def _run_db(runs: Path) -> Path:
    [db] = list(runs.glob("*/hepopt.db"))
    return db


def test_run_quadratic_example(kit: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = kit.hepopt("run", str(EXAMPLE / "task.json"), "--workers", "4", "--runs-dir", str(runs),
                        timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "best 5 of 30 points" in result.stdout and "completed" in result.stdout, result.stdout
    db = _run_db(runs)
    assert f"database:   {db}" in result.stdout, result.stdout
    points = kit.assert_budget_kept(db, 1, 30)
    states = [state for _, _, state, _ in points]
    assert states.count("done") >= 5 and "failed" not in states, states
    reports = kit.query(db, "SELECT count(*) FROM intermediate_values")[0][0]
    assert reports >= 30, "the example reports its fake epochs when run by hepopt"
    assert (db.parent / "results.csv").read_text().count("\n") == 31


def test_run_task_with_steering_exec_and_relative_payload(kit: Any, tmp_path: Path) -> None:
    """The iDDS-style task.json (steeringExec run as a subprocess) from a copied folder: `python objective.py`
    resolves next to the task file, wherever `hepopt run` is started."""
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(EXAMPLE / "objective.py", folder)
    task = json.loads((EXAMPLE / "task_idds.json").read_text())
    task.update(maxPoints=4, nPointsPerIteration=4)
    (folder / "task.json").write_text(json.dumps(task))
    runs = tmp_path / "runs"
    result = kit.hepopt("run", str(folder / "task.json"), "--workers", "2", "--runs-dir", str(runs),
                        timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    points = kit.assert_budget_kept(_run_db(runs), 1, 4)
    assert {state for _, _, state, _ in points} <= {"done", "pruned"}, points
    [(origin,)] = kit.query(_run_db(runs), "SELECT DISTINCT origin FROM points")
    assert origin == "steering"


def test_ctrl_c_stops_workers_and_releases_points(kit: Any, tmp_path: Path, payload_dir: Path) -> None:
    task = kit.make_task(4, sleep=0.5, steps=40, parallel=2)
    (payload_dir / "task.json").write_text(json.dumps(task))
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "hepopt", "run", str(payload_dir / "task.json"), "--runs-dir", str(runs)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        running = kit.wait_for(lambda: list(runs.glob("*/workers/*/point*/running")), 90, "payloads to run")
        payload_pid = int((running[0].parent / "pid").read_text())
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "continue later" in output, output
    assert not kit.process_alive(payload_pid), "a payload outlived Ctrl-C"
    db = _run_db(runs)
    assert kit.query(db, "SELECT count(*) FROM points WHERE state = 'running'") == [(0,)]
    outcomes = {row[0] for row in kit.query(db, "SELECT outcome FROM leases")}
    assert outcomes == {"released"}, outcomes
