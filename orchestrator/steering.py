"""One steering call for a study: in-process through :func:`steering_container.api.propose`, or the task's
own ``steeringExec`` run as iDDS runs it (DESIGN.md §3.3), so a steering container that works under
iDDS works here unchanged."""

from __future__ import annotations

import functools
import json
import multiprocessing
import multiprocessing.pool
import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hepopt.errors import HepoptError, SpecError
from hepopt.space import SearchSpace
from hepopt.task import Task
from orchestrator.storage.base import Storage
from steering_container.api import Observation, propose
from steering_container.idds import write_json_atomic

IDDS_INPUT = "idds_input.json"
IDDS_OUTPUT = "idds_output.json"
PLACEHOLDER = re.compile(r"%(?:IN|OUT|NUM_POINTS|MAX_POINTS)")
#: How often a running steering command is checked for the timeout and for the server stopping.
CANCEL_POLL_S = 0.2
#: Characters of the command's stderr kept in the failure message shown on the study.
STDERR_TAIL_CHARS = 300
#: How a proposal process starts: a fresh interpreter, since forking a server that runs threads can
#: copy a lock some thread holds.
PROCESS_START_METHOD = "spawn"
#: Outcomes of a proposal made in another process.
PROPOSED, REFUSED = "proposed", "refused"


class SteeringFailure(HepoptError):
    """One steering try failed; the message is what the study shows after the last try."""


class SteeringCancelled(SteeringFailure):
    """The server is stopping: the steering command was killed, which says nothing about the study."""


@dataclass(frozen=True)
class StoredHistory:
    """A study's history for a proposal process to read from the database itself.

    Read in the server and sent to the process, a 10,000-point history cost the server about 0.15 s
    of CPU (reading, decoding, pickling), much of it in single calls that hold the interpreter lock,
    and every request in flight stalled meanwhile."""

    db_url: str
    study_id: int

    def read(self) -> list[Observation]:
        return _reader(self.db_url).history(self.study_id)


History = Sequence[Observation] | StoredHistory


def steer(task: Task, history: History, n: int, timeout: float,
          cancel: threading.Event | None = None, processes: ProposalProcesses | None = None) -> list[dict[str, Any]]:
    """Up to ``n`` new points for the study; [] means the search has nothing left to propose.

    ``timeout`` and ``cancel`` bound an external command, and a proposal made in one of ``processes``;
    without them a proposal runs in the calling thread and cannot be interrupted.
    """
    if task.steeringExec:
        return steer_exec(task, _observations(history), n, timeout, cancel)
    if processes is not None:
        return processes.propose(task, history, n, timeout, cancel or threading.Event())
    return steer_in_process(task, history, n)


def steer_in_process(task: Task, history: History, n: int) -> list[dict[str, Any]]:
    """``propose`` with the task's method and seed (it mixes the history length into the seed)."""
    options = task.hepopt
    outcome, value = _propose_outcome(task.space, history, n, options.method, options.seed, options.direction)
    if outcome == REFUSED:
        raise SteeringFailure(value)
    return value


class ProposalProcesses:
    """Processes that run the steering API (``propose``) for the scheduler's threads, one run at a time each.

    A proposal from a long history is pure Python for a fraction of a second to seconds (a 512-point
    random batch on a 10,000-point study: about 0.5 s of CPU). In the server's own process it would hold
    the interpreter lock that every request thread needs, and every worker's ask would wait longer for as
    long as it lasts; in a process of its own it only shares the CPUs. A run in a process can also be
    stopped at the steering timeout or when the server stops. Each process lives as long as the
    scheduler, so an optimisation library is imported once per process, not once per run; a process
    is started when a run first needs it.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        # Last in, first out: a run takes the process that ran last, whose imports are warm, and a
        # second process starts only when two runs overlap.
        self._idle: queue.LifoQueue[multiprocessing.pool.Pool | None] = queue.LifoQueue()
        for _ in range(processes):
            self._idle.put(None)
        self._lock = threading.Lock()
        self._all: set[multiprocessing.pool.Pool] = set()
        self._closed = False

    def propose(self, task: Task, history: History, n: int, timeout: float,
                cancel: threading.Event) -> list[dict[str, Any]]:
        if cancel.is_set():
            raise SteeringCancelled("the server is stopping")
        options = task.hepopt
        pool = self._take()
        try:
            shipped = history if isinstance(history, StoredHistory) else list(history)
            pending = pool.apply_async(_propose_outcome, (task.space, shipped, n, options.method,
                                                          options.seed, options.direction))
            outcome, value = self._wait(pending, timeout, cancel)
        except BaseException:
            self._discard(pool)
            pool = None
            raise
        finally:
            self._idle.put(pool)
        if outcome == REFUSED:
            raise SteeringFailure(value)
        return value

    def close(self) -> None:
        """Stop every process, runs in progress included (their callers get SteeringCancelled)."""
        with self._lock:
            self._closed = True
            pools, self._all = list(self._all), set()
        for pool in pools:
            pool.terminate()

    def _wait(self, pending: multiprocessing.pool.AsyncResult, timeout: float,
              cancel: threading.Event) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return pending.get(CANCEL_POLL_S)
            except multiprocessing.TimeoutError:
                if cancel.is_set() or self._closed:
                    raise SteeringCancelled("the server is stopping") from None
                if time.monotonic() > deadline:
                    raise SteeringFailure(f"timed out after {timeout:g} s") from None

    def _take(self) -> multiprocessing.pool.Pool:
        pool = self._idle.get()
        with self._lock:
            if self._closed:  # its process, if any, was stopped by close()
                self._idle.put(None)
                raise SteeringCancelled("the server is stopping")
            if pool is None:
                pool = multiprocessing.get_context(PROCESS_START_METHOD).Pool(1)
                self._all.add(pool)
        return pool

    def _discard(self, pool: multiprocessing.pool.Pool) -> None:
        """Stop a process whose run was abandoned: it may be computing still."""
        with self._lock:
            self._all.discard(pool)
        pool.terminate()


def _propose_outcome(space: SearchSpace, history: History, n: int, method: str, seed: int | None,
                     direction: str) -> tuple[str, Any]:
    """``(PROPOSED, points)``, or ``(REFUSED, message)`` when steering refuses the input (a SpecError,
    which is not sent between processes as an exception)."""
    try:
        return PROPOSED, propose(space, _observations(history), n, method, seed, direction)  # type: ignore[arg-type]
    except SpecError as exc:
        return REFUSED, str(exc)


def _observations(history: History) -> list[Observation]:
    return history.read() if isinstance(history, StoredHistory) else list(history)


@functools.cache
def _reader(db_url: str) -> Storage:
    """This process's storage on ``db_url``, opened once: a proposal process serves many runs."""
    from orchestrator.storage.sql import SQLStorage

    return SQLStorage(db_url, migrate=False)


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
