"""The orchestrator subcommands of ``hepopt`` against a real ``hepopt serve``: output and the exit codes
scripts rely on (0 ok, 2 bad input, 3 auth, 4 not found). Commands run in-process through
``hepopt.cli.main`` (same parser, same handlers) to keep the suite fast; the server is a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hepopt.cli import build_parser, main

SUBCOMMANDS = ("serve", "worker", "run", "submit", "status", "points", "best", "cancel")


@pytest.fixture
def env(kit: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("HEPOPT_URL", server.url)
    monkeypatch.setenv("HEPOPT_TOKEN", kit.create_study(server, kit.make_task(3)).user_token)
    return {"url": server.url}


def _task_file(tmp_path: Path, kit: Any, **changes: Any) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps({**kit.make_task(3, parallel=3), **changes}))
    return path


def test_token_create_submit_status_points_best_cancel(kit: Any, server: Any, env: dict[str, str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["token", "create", "--user", "alice", "--expires", "1d", "--db", server.db_url]) == 0
    token = capsys.readouterr().out.strip()
    assert token and "\n" not in token
    monkeypatch.setenv("HEPOPT_TOKEN", token)

    assert main(["submit", str(_task_file(tmp_path, kit)), "--name", "mine", "-q"]) == 0
    study_id = int(capsys.readouterr().out)
    assert main(["status"]) == 0
    listing = capsys.readouterr().out
    assert "mine" in listing and "tester" not in listing, "alice sees only her own studies"
    assert main(["status", str(study_id)]) == 0
    assert "steering" in capsys.readouterr().out

    kit.wait_for(lambda: kit.query(server.db_path, "SELECT count(*) FROM points WHERE study_id = ?",
                                   study_id)[0][0] == 3, 30, "steering to add the points")
    assert main(["points", str(study_id), "--format", "json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["number"] for p in points] == [0, 1, 2]
    assert main(["points", str(study_id), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("number,id,state,attempt,loss") and len(rows) == 4
    assert main(["best", str(study_id)]) == 4, "nothing is done yet"
    capsys.readouterr()

    assert main(["cancel", str(study_id)]) == 0
    assert "cancelled" in capsys.readouterr().out
    [(state,)] = kit.query(server.db_path, "SELECT state FROM studies WHERE id = ?", study_id)
    assert state == "cancelled"


def test_exit_codes(kit: Any, server: Any, env: dict[str, str], tmp_path: Path,
                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["submit", str(_task_file(tmp_path, kit, maxPoints=0))]) == 2
    assert "maxPoints" in capsys.readouterr().err
    assert main(["status", "999"]) == 4
    assert main(["token", "create", "--user", "tester", "--study", "999", "--db", server.db_url]) == 4
    worker_token = kit.create_study(server, kit.make_task(1)).worker_token
    monkeypatch.setenv("HEPOPT_TOKEN", worker_token)
    assert main(["status"]) == 3, "a worker token cannot list studies (403)"
    monkeypatch.setenv("HEPOPT_TOKEN", "hpo_not-a-token")
    assert main(["status"]) == 3
    assert "401" in capsys.readouterr().err
    monkeypatch.delenv("HEPOPT_URL")
    assert main(["status"]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["points"])
    assert usage.value.code == 2


def test_help_is_useful_and_lazy() -> None:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # the registered subcommands
    for name in SUBCOMMANDS:
        text = choices[name].format_help()
        assert "example:" in text and "exit codes: 0 ok" in text, name
    probe = ("import sys; from hepopt.cli import build_parser; build_parser().format_help(); "
             "heavy = [m for m in ('fastapi', 'sqlalchemy', 'uvicorn', 'rich') if m in sys.modules]; "
             "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
