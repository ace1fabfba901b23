"""The worker's side of the PanDA evaluation contract, function by function (no server needed)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from hepopt.errors import ClientError, NotFound, StaleLease
from orchestrator.cli import database_url, exit_code, parse_duration
from orchestrator.worker import (
    is_transient,
    pack_checkpoint,
    payload_argv,
    read_output,
    restore_checkpoint,
    stop_process_group,
    training_files,
)

#: A payload that ignores SIGTERM and leaves a grandchild (same process group) that ignores it too.
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(child.pid, flush=True); time.sleep(60)")


def _output(tmp_path: Path, doc: object | str, returncode: int = 0) -> tuple[str, float | None, str]:
    path = tmp_path / "output.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return read_output(path, returncode, tmp_path / "payload.log")


def test_read_output_outcomes(tmp_path: Path) -> None:
    assert _output(tmp_path, {"status": 0, "loss": 0.0, "message": "ok"}) == ("done", 0.0, "ok")
    assert _output(tmp_path, {"status": 0, "loss": 2.5, "pruned": True}) == ("pruned", 2.5, "stopped early")
    assert _output(tmp_path, {"status": 1, "message": "OOM"}) == ("failed", None, "OOM")
    status, loss, message = _output(tmp_path, {"status": 0, "loss": "nan"})
    assert (status, loss) == ("failed", None) and "finite number 'loss'" in message
    status, _, message = _output(tmp_path, "{not json")
    assert status == "failed" and message.startswith("malformed output.json")
    status, _, message = _output(tmp_path, [1, 2])
    assert status == "failed" and "expected an object with 'status'" in message


def test_missing_output_quotes_exit_code_and_log(tmp_path: Path) -> None:
    (tmp_path / "payload.log").write_text("Traceback ...\nImportError: no module named torch\n")
    status, loss, message = read_output(tmp_path / "output.json", 1, tmp_path / "payload.log")
    assert (status, loss) == ("failed", None)
    assert "exited with code 1 and wrote no output.json" in message and "no module named torch" in message


def test_payload_argv_resolves_python_and_task_files(tmp_path: Path) -> None:
    task_dir, rundir = tmp_path / "task", tmp_path / "run"
    task_dir.mkdir()
    rundir.mkdir()
    (task_dir / "train.py").write_text("")
    (task_dir / "input.json").write_text("{}")
    (rundir / "input.json").write_text("{}")
    argv = payload_argv("python train.py --config 'a b.yaml' input.json -v", task_dir, rundir)
    assert argv == [sys.executable, str(task_dir / "train.py"), "--config", "a b.yaml", "input.json", "-v"]
    assert payload_argv("/opt/run.sh x", task_dir, rundir) == ["/opt/run.sh", "x"]
    with pytest.raises(ValueError):
        payload_argv("  ", task_dir, rundir)


def test_training_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for name in ("b.pkl.bz2", "a.pkl.bz2", "notes.txt"):
        (tmp_path / "data" / name).write_text("x")
    expected = [str(tmp_path / "data" / n) for n in ("a.pkl.bz2", "b.pkl.bz2")]
    assert training_files("data/*.pkl.bz2", tmp_path) == expected
    assert training_files(f"{expected[1]}, {expected[0]}", tmp_path) == [expected[1], expected[0]]
    assert training_files("mc16_13TeV:mc16_13TeV.ttbar.DAOD", tmp_path) == []
    assert training_files(None, tmp_path) == []


def test_checkpoint_round_trip_and_to_load(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "ckpt").mkdir(parents=True)
    (source / "ckpt" / "weights.h5").write_bytes(b"\x00weights")
    (source / "history.json").write_text("[1, 2]")
    assert pack_checkpoint(source, "missing") is None
    data = pack_checkpoint(source, "ckpt, history.json, missing")
    assert data is not None

    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    restore_checkpoint(data, unpacked, None)
    assert (unpacked / "ckpt" / "weights.h5").read_bytes() == b"\x00weights"
    assert (unpacked / "history.json").read_text() == "[1, 2]"

    as_tarball = tmp_path / "as_tarball"
    as_tarball.mkdir()
    restore_checkpoint(data, as_tarball, "restore/checkpoint.tar.gz")
    assert (as_tarball / "restore" / "checkpoint.tar.gz").read_bytes() == data


def test_restore_refuses_paths_outside_the_working_directory(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    rundir = tmp_path / "run"
    rundir.mkdir()
    with pytest.raises(tarfile.TarError):
        restore_checkpoint(buffer.getvalue(), rundir, None)
    assert not (tmp_path / "escaped.txt").exists()


def test_transient_errors_are_retried_definite_answers_are_not() -> None:
    assert is_transient(ClientError("cannot reach", status=None))
    assert is_transient(ClientError("boom", status=500))
    assert not is_transient(StaleLease("gone", status=409))
    assert not is_transient(NotFound("no", status=404))
    assert not is_transient(ValueError("bug"))


def test_cli_helpers() -> None:
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration("1.5d") == 1.5 * 86400
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("2 hours")
    assert database_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert database_url("x.db").startswith("sqlite:////") and database_url("x.db").endswith("/x.db")
    assert exit_code(NotFound("x", 404)) == 4 and exit_code(StaleLease("x", 409)) == 1


def test_stop_process_group_kills_a_payload_that_ignores_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    grandchild = int(proc.stdout.readline())
    began = time.monotonic()
    stop_process_group(proc, grace_s=0.5)
    assert proc.returncode == -9 and time.monotonic() - began < 10
    deadline = time.monotonic() + 5
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild), "the payload's own children must die with it"


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
