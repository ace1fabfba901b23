"""One steering call for a study: in-process through :func:`steering_container.api.propose`, or the task's
own ``steeringExec`` run as iDDS runs it (DESIGN.md §3.3), so a steering container that works under
iDDS works here unchanged."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hepopt.errors import HepoptError, SpecError
from hepopt.task import Task
from steering_container.api import Observation, propose
from steering_container.idds import write_json_atomic

IDDS_INPUT = "idds_input.json"
IDDS_OUTPUT = "idds_output.json"
PLACEHOLDER = re.compile(r"%(?:IN|OUT|NUM_POINTS|MAX_POINTS)")
#: How often a running steering command is checked for the timeout and for the server stopping.
CANCEL_POLL_S = 0.2
#: Characters of the command's stderr kept in the failure message shown on the study.
STDERR_TAIL_CHARS = 300


class SteeringFailure(HepoptError):
    """One steering try failed; the message is what the study shows after the last try."""


class SteeringCancelled(SteeringFailure):
    """The server is stopping: the steering command was killed, which says nothing about the study."""


def steer(task: Task, history: Sequence[Observation], n: int, timeout: float,
          cancel: threading.Event | None = None) -> list[dict[str, Any]]:
    """Up to ``n`` new points for the study; [] means the search has nothing left to propose.

    ``timeout`` and ``cancel`` bound an external command; in-process proposals cannot be interrupted
    and are expected to be fast (DESIGN.md §3.3).
    """
    if task.steeringExec:
        return steer_exec(task, history, n, timeout, cancel)
    return steer_in_process(task, history, n)


def steer_in_process(task: Task, history: Sequence[Observation], n: int) -> list[dict[str, Any]]:
    """``propose`` with the task's method and seed (it mixes the history length into the seed)."""
    options = task.hepopt
    try:
        return propose(task.space, history, n, options.method, options.seed, options.direction)
    except SpecError as exc:
        raise SteeringFailure(str(exc)) from None


def steer_exec(task: Task, history: Sequence[Observation], n: int, timeout: float,
               cancel: threading.Event | None = None) -> list[dict[str, Any]]:
    """Run ``steeringExec`` in a fresh directory with the %IN/%OUT/%NUM_POINTS/%MAX_POINTS contract."""
    with tempfile.TemporaryDirectory(prefix="hepopt-steering-") as tmp:
        infile, outfile = Path(tmp) / IDDS_INPUT, Path(tmp) / IDDS_OUTPUT
        write_json_atomic(infile, idds_input(task, history))
        values = {"%IN": str(infile), "%OUT": str(outfile), "%NUM_POINTS": str(n), "%MAX_POINTS": str(task.maxPoints)}
        argv = [_substitute(arg, values) for arg in shlex.split(task.steeringExec or "")]
        _run(argv, tmp, timeout, cancel or threading.Event())
        return read_output(outfile, task, n)


def idds_input(task: Task, history: Sequence[Observation]) -> dict[str, Any]:
    """``%IN`` as iDDS writes it: ``[params, loss]`` pairs (null while unevaluated) and the raw space.

    Only the two-element form is written, so steering containers written for iDDS read it; a failed or
    pruned point without a loss is therefore null, which still keeps it from being proposed again.
    """
    return {"points": [[obs.params, obs.loss] for obs in history], "opt_space": task.searchSpace}


def read_output(outfile: Path, task: Task, n: int) -> list[dict[str, Any]]:
    """The ``%OUT`` list, every point checked against the space; at most ``n`` are kept."""
    if not outfile.exists():
        raise SteeringFailure(f"the steering command wrote no {IDDS_OUTPUT}")
    try:
        points = json.loads(outfile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SteeringFailure(f"unreadable {IDDS_OUTPUT}: {exc}") from None
    if not isinstance(points, list):
        raise SteeringFailure(f"{IDDS_OUTPUT} must hold a JSON list of points, got {type(points).__name__}")
    space = task.space
    try:
        for i, point in enumerate(points):
            space.check_point(point, f"{IDDS_OUTPUT}[{i}]")
    except SpecError as exc:
        raise SteeringFailure(str(exc)) from None
    return points[:n]


def _substitute(arg: str, values: dict[str, str]) -> str:
    """One pass, so a substituted path that happens to contain a placeholder is left alone."""
    return PLACEHOLDER.sub(lambda match: values[match.group(0)], arg)


def _run(argv: list[str], cwd: str, timeout: float, cancel: threading.Event) -> None:
    if not argv:
        raise SteeringFailure("steeringExec is empty")
    env = dict(os.environ)
    # `python -m ...` in a steeringExec then means the server's own interpreter and packages.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise SteeringFailure(f"command not found: {argv[0]}") from None
    except OSError as exc:
        raise SteeringFailure(f"cannot run {argv[0]}: {exc}") from None
    _, stderr = _wait(proc, timeout, cancel)
    if proc.returncode != 0:
        tail = stderr.strip()[-STDERR_TAIL_CHARS:]
        raise SteeringFailure(f"exit code {proc.returncode}" + (f": {tail}" if tail else ""))


def _wait(proc: subprocess.Popen[str], timeout: float, cancel: threading.Event) -> tuple[str, str]:
    """Wait for the command, killing it past ``timeout`` or as soon as ``cancel`` is set."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return proc.communicate(timeout=CANCEL_POLL_S)
        except subprocess.TimeoutExpired:
            if cancel.is_set() or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                if cancel.is_set():
                    raise SteeringCancelled("the server is stopping") from None
                raise SteeringFailure(f"timed out after {timeout:g} s") from None
