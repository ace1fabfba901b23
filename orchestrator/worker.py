"""The pilot: lease points from an orchestrator and evaluate them with the task's payload (DESIGN.md §3.4).

One worker evaluates one point at a time::

    ask -> fresh working directory -> payload subprocess (heartbeats, checkpoint uploads) -> tell

Contract with the payload (PanDA runHPO): the working directory holds ``evaluationInput`` (the bare
point dict), ``evaluationTrainingData`` (a JSON list of training files: ``trainingDS`` when it names
local files or a glob, else ``[]``) and, on a retry, the point's last checkpoint: the tarball itself at
``checkPointToLoad`` when the task names one (the payload unpacks it, as under PanDA), otherwise its
contents unpacked in place. The payload writes ``evaluationOutput`` = ``{"status", "loss", "message"}``
(``"pruned": true`` for a point it stopped early); a missing or malformed file fails the point with a
message saying why. Its stdout and stderr go to ``payload.log`` in the working directory.

Payload command: ``evaluationExec`` is split like a shell would split it but run without a shell (use
``bash -c '...'`` for pipes or ``&&``). A first word ``python``/``python3`` runs this interpreter, and a
relative word naming a file in the task directory (``--task-dir``, default: the current directory) becomes
that file's absolute path, so ``python objective.py`` next to ``task.json`` works from any working
directory. The payload's environment carries HEPOPT_URL/TOKEN/STUDY/TRIAL/LEASE for per-epoch reports.

Walltime: a point is started only when the longest point this worker has evaluated so far, plus a
safety margin, fits into the walltime left (the first point always starts: nothing is known yet). A
point still running when the walltime is nearly spent is stopped like on SIGTERM.

Signals: SIGTERM or SIGINT stop the payload (SIGTERM to its process group, a grace period, then
SIGKILL), upload its checkpoint, release the lease so another worker resumes the point at once, and
exit 0. A lost connection is retried until ``offline_limit_s``; the lease may expire meanwhile, and
the server then hands the point to another worker with its checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import hashlib
import io
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

from hepopt.client import Lease
from hepopt.errors import ChecksumMismatch, ClientError, PayloadTooLarge, StaleLease

log = logging.getLogger("hepopt.worker")
T = TypeVar("T")

#: Heartbeats go out this many times per lease period, so a slow answer or two never loses the lease.
HEARTBEATS_PER_LEASE = 4
MIN_HEARTBEAT_S = 0.2
MAX_HEARTBEAT_S = 60.0
#: How often the supervising loop looks at the payload, the stop flag and the checkpoint timer.
POLL_S = 0.1
#: Upper bound on one ``wait`` answer's retry_after, so a worker notices new points soon enough.
MAX_WAIT_S = 30.0
#: Back-off after a failed request: doubles from the first value up to the cap.
RETRY_FIRST_S = 0.5
RETRY_CAP_S = 10.0
#: Give up after the orchestrator has been unreachable this long.
DEFAULT_OFFLINE_LIMIT_S = 600.0
#: Time the payload gets between SIGTERM and SIGKILL.
DEFAULT_GRACE_S = 10.0
#: A point starts only if ``longest point x margin`` fits into the walltime left.
WALLTIME_SAFETY = 1.2
#: Kept free at the end of the walltime to stop the payload, upload its checkpoint and release.
UPLOAD_RESERVE_S = 20.0
MAX_RESERVE_FRACTION = 0.1
#: Characters of payload.log quoted in a failure message.
LOG_TAIL_CHARS = 800
PAYLOAD_LOG = "payload.log"
#: prctl option: the signal a child gets when its parent thread dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
HTTP_SERVER_ERROR = 500
PYTHON_WORDS = frozenset({"python", "python3"})
FINISHED, WAIT, LEASED = "finished", "wait", "leased"


@dataclass
class WorkerOptions:
    """Everything ``hepopt worker`` takes on its command line."""

    url: str
    token: str
    study_id: int
    workdir: Path
    task_dir: Path = field(default_factory=Path.cwd)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_points: int | None = None
    walltime_s: float | None = None
    grace_s: float = DEFAULT_GRACE_S
    offline_limit_s: float = DEFAULT_OFFLINE_LIMIT_S


@dataclass
class Outcome:
    """How one leased point ended: told (done/pruned/failed), released, or lost with its lease."""

    kind: str
    detail: str = ""


class OfflineError(ClientError):
    """The orchestrator stayed unreachable longer than the offline limit."""


class Worker:
    """The pilot loop. ``run()`` returns when the study is finished, the budget of this worker is spent,
    its walltime is near, or ``request_stop()`` was called (from a signal handler or another thread)."""

    def __init__(self, options: WorkerOptions, client: Any | None = None) -> None:
        from hepopt.client import Client

        self.options = options
        self.client = client or Client(options.url, options.token)
        # Heartbeats run in their own thread: a session of their own, requests sessions are not thread-safe.
        self.heartbeat_client = client or Client(options.url, options.token)
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.started = time.monotonic()
        self.longest_point_s = 0.0
        self.points_started = 0
        self.task: dict[str, Any] = {}

    # -- control ---------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Stop soon: the running payload is stopped, checkpointed and its point released."""
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    def run(self) -> int:
        """Evaluate points until there is nothing left to do; the number of points started."""
        opts = self.options
        opts.workdir.mkdir(parents=True, exist_ok=True)
        study = self.call(lambda: self.client.get_study(opts.study_id))
        self.task = study["task"]
        log.info("worker %s starts on study %s (%s) at %s, workdir %s", opts.worker_id, opts.study_id,
                 study.get("name") or "unnamed", opts.url, opts.workdir)
        while not self.stop_event.is_set():
            if opts.max_points is not None and self.points_started >= opts.max_points:
                log.info("evaluated %d point(s), the --max-points limit: exiting", self.points_started)
                break
            if not self._walltime_allows_another():
                break
            lease = self._next_lease()
            if lease is None:
                break
            self.points_started += 1
            begun = time.monotonic()
            outcome = self._evaluate(lease)
            elapsed = time.monotonic() - begun
            if outcome.kind in ("done", "pruned", "failed"):
                self.longest_point_s = max(self.longest_point_s, elapsed)
            log.info("point %s (#%s) %s after %.1f s%s", lease.point_id, lease.number, outcome.kind,
                     elapsed, f": {outcome.detail}" if outcome.detail else "")
        if self.stop_event.is_set():
            log.info("stopped: %s", self.stop_reason)
        return self.points_started

    # -- asking ----------------------------------------------------------------------------------
    def _walltime_allows_another(self) -> bool:
        left = self.walltime_left()
        if left is None:
            return True
        needed = self.longest_point_s * WALLTIME_SAFETY
        if left <= 0 or needed > left:
            log.info("not starting another point: %.1f s of walltime left, the longest point took %.1f s",
                     max(left, 0.0), self.longest_point_s)
            return False
        return True

    def walltime_left(self) -> float | None:
        if self.options.walltime_s is None:
            return None
        return self.options.walltime_s - (time.monotonic() - self.started)

    def _next_lease(self) -> Lease | None:
        """A lease, or None when the study is finished or the worker must stop."""
        opts = self.options
        while not self.stop_event.is_set():
            answer = self.call(lambda: self.client.ask(opts.study_id, opts.worker_id))
            if answer.status == LEASED:
                lease = answer.lease
                log.info("leased point %s (#%s, attempt %s, checkpoint %s): %s", lease.point_id, lease.number,
                         lease.attempt, "yes" if lease.has_checkpoint else "no",
                         json.dumps(lease.params, sort_keys=True))
                return lease
            if answer.status == FINISHED:
                log.info("study %s is finished: exiting", opts.study_id)
                return None
            delay = min(float(answer.retry_after or RETRY_FIRST_S), MAX_WAIT_S)
            left = self.walltime_left()
            if left is not None and left <= delay:
                log.info("walltime spent while waiting for points: exiting")
                return None
            log.debug("no point available yet, asking again in %.1f s", delay)
            self.stop_event.wait(delay)
        return None

    # -- evaluating ------------------------------------------------------------------------------
    def _evaluate(self, lease: Lease) -> Outcome:
        rundir = self._prepare(lease)
        run = PayloadRun(self, lease, rundir)
        return run.execute()

    def _prepare(self, lease: Lease) -> Path:
        """A fresh working directory with the point, the training-file list and the restored checkpoint."""
        prefix = f"point{lease.number:05d}-id{lease.point_id}-attempt{lease.attempt}-"
        rundir = Path(tempfile.mkdtemp(prefix=prefix, dir=self.options.workdir))
        (rundir / self.task.get("evaluationInput", "input.json")).write_text(json.dumps(lease.params))
        files = training_files(self.task.get("trainingDS"), self.options.task_dir)
        (rundir / self.task.get("evaluationTrainingData", "input_ds.json")).write_text(json.dumps(files))
        if lease.has_checkpoint:
            self._restore_checkpoint(lease, rundir)
        return rundir

    def _restore_checkpoint(self, lease: Lease, rundir: Path) -> None:
        data = self.call(lambda: self.client.get_checkpoint(self.options.study_id, lease.point_id))
        if data is None:
            log.warning("point %s: the lease announced a checkpoint but the server has none", lease.point_id)
            return
        try:
            restore_checkpoint(data, rundir, self.task.get("checkPointToLoad"))
        except (OSError, tarfile.TarError) as exc:
            log.warning("point %s: checkpoint not restored (%s): the payload starts from scratch", lease.point_id, exc)
            return
        log.info("point %s: restored checkpoint (%d bytes)", lease.point_id, len(data))

    # -- talking to the orchestrator -----------------------------------------------------------
    def call(self, request: Callable[[], T]) -> T:
        """Run one client call, retrying while the orchestrator is unreachable (up to the offline limit)."""
        first_failure: float | None = None
        delay = RETRY_FIRST_S
        while True:
            try:
                return request()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if now - first_failure > self.options.offline_limit_s:
                    raise OfflineError(f"orchestrator unreachable for {now - first_failure:.0f} s: {exc}") from exc
                log.warning("orchestrator unreachable (%s), retrying in %.1f s", _short(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)


class PayloadRun:
    """One payload process for one lease, supervised until it exits or must be stopped."""

    def __init__(self, worker: Worker, lease: Lease, rundir: Path) -> None:
        self.worker = worker
        self.client = worker.client
        self.study_id = worker.options.study_id
        self.lease = lease
        self.point_id = lease.point_id
        self.token = lease.lease_token
        self.rundir = rundir
        self.task = worker.task
        self.lease_lost = threading.Event()
        self.study_stopped = threading.Event()
        self.done = threading.Event()
        self.last_checkpoint_sha: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def execute(self) -> Outcome:
        try:
            argv = payload_argv(self.task["evaluationExec"], self.worker.options.task_dir, self.rundir)
        except ValueError as exc:
            return self._tell("failed", None, f"cannot parse evaluationExec: {exc}")
        log.info("point %s: running %s in %s", self.point_id, shlex.join(argv), self.rundir)
        try:
            with open(self.rundir / PAYLOAD_LOG, "wb") as out:
                self.proc = subprocess.Popen(argv, cwd=self.rundir, env=self._environment(), stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=die_with_parent())
        except OSError as exc:
            return self._tell("failed", None, f"cannot start the payload {argv[0]!r}: {exc}")
        beats = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.point_id}", daemon=True)
        beats.start()
        try:
            return self._supervise()
        finally:
            self.done.set()
            beats.join()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HEPOPT_URL": self.worker.options.url, "HEPOPT_TOKEN": self.worker.options.token,
                    "HEPOPT_STUDY": str(self.study_id), "HEPOPT_TRIAL": str(self.point_id),
                    "HEPOPT_LEASE": self.token})
        if self.task.get("evaluationMetrics"):
            env["HEPOPT_EVALUATION_METRICS"] = str(self.task["evaluationMetrics"])
        return env

    def _supervise(self) -> Outcome:
        assert self.proc is not None
        interval_s = float(self.task.get("checkPointInterval", 5)) * 60
        next_checkpoint = time.monotonic() + interval_s
        deadline = self._stop_deadline()
        while self.proc.poll() is None:
            reason = self._stop_reason(deadline)
            if reason:
                return self._interrupt(reason)
            if time.monotonic() >= next_checkpoint:
                self._upload_checkpoint()
                next_checkpoint = time.monotonic() + interval_s
            self.worker.stop_event.wait(POLL_S)
        if self.lease_lost.is_set():
            return Outcome("lost", "the lease expired before the payload ended; its result is dropped")
        return self._report_output(self.proc.returncode)

    def _stop_deadline(self) -> float | None:
        left = self.worker.walltime_left()
        if left is None:
            return None
        reserve = min(self.worker.options.grace_s + UPLOAD_RESERVE_S, self.worker.options.walltime_s
                      * MAX_RESERVE_FRACTION)
        return time.monotonic() + left - reserve

    def _stop_reason(self, deadline: float | None) -> str:
        if self.lease_lost.is_set():
            return "lease lost"
        if self.worker.stop_event.is_set():
            return self.worker.stop_reason or "stop requested"
        if self.study_stopped.is_set():
            return "the study is no longer running"
        if deadline is not None and time.monotonic() >= deadline:
            return "walltime nearly spent"
        return ""

    def _interrupt(self, reason: str) -> Outcome:
        """Stop the payload; unless the lease is already lost, save its checkpoint and give the point back."""
        log.info("point %s: stopping the payload (%s)", self.point_id, reason)
        stop_process_group(self.proc, self.worker.options.grace_s)
        if self.lease_lost.is_set():
            return Outcome("lost", "the lease expired or was taken back; nothing is told")
        self._upload_checkpoint()
        try:
            self.worker.call(lambda: self.client.release(self.study_id, self.point_id, self.token))
        except StaleLease:
            return Outcome("lost", "the lease had expired before it could be released")
        if reason == "walltime nearly spent":
            self.worker.request_stop("walltime nearly spent")
        return Outcome("released", reason)

    def _heartbeat_loop(self) -> None:
        lease_s = float(self.lease.lease_seconds)
        interval = min(max(lease_s / HEARTBEATS_PER_LEASE, MIN_HEARTBEAT_S), MAX_HEARTBEAT_S)
        while not self.done.wait(interval):
            try:
                answer = self.worker.heartbeat_client.heartbeat(self.study_id, self.point_id, self.token)
            except StaleLease:
                log.warning("point %s: the server no longer knows this lease", self.point_id)
                self.lease_lost.set()
                return
            except Exception as exc:
                if not is_transient(exc):
                    log.error("point %s: heartbeat refused: %s", self.point_id, exc)
                    self.lease_lost.set()
                    return
                log.warning("point %s: heartbeat failed (%s), retrying", self.point_id, _short(exc))
                continue
            if answer.stop and not self.study_stopped.is_set():
                log.info("point %s: the server asks to stop (study no longer running)", self.point_id)
                self.study_stopped.set()

    def _upload_checkpoint(self) -> None:
        data = pack_checkpoint(self.rundir, self.task.get("checkPointToSave"))
        if data is None:
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.last_checkpoint_sha:
            return
        try:
            self.worker.call(lambda: self.client.put_checkpoint(self.study_id, self.point_id, self.token, data))
        except PayloadTooLarge as exc:
            log.warning("point %s: checkpoint of %d bytes refused: %s", self.point_id, len(data), exc)
            return
        except StaleLease:
            self.lease_lost.set()
            return
        self.last_checkpoint_sha = digest
        log.info("point %s: uploaded checkpoint (%d bytes)", self.point_id, len(data))

    def _report_output(self, returncode: int) -> Outcome:
        status, loss, message = read_output(self.rundir / self.task.get("evaluationOutput", "output.json"),
                                            returncode, self.rundir / PAYLOAD_LOG)
        return self._tell(status, loss, message)

    def _tell(self, status: str, loss: float | None, message: str) -> Outcome:
        request_id = uuid.uuid4().hex  # one per result: resending it after a lost answer changes nothing
        try:
            self.worker.call(lambda: self.client.tell(self.study_id, self.point_id, self.token, status,
                                                       loss=loss, message=message, request_id=request_id))
        except StaleLease:
            return Outcome("lost", f"the lease expired before the result ({status}) was told")
        detail = f"loss {loss:.6g}" if loss is not None else message
        return Outcome(status, detail)


# -- the payload contract, as plain functions ------------------------------------------------------
def payload_argv(command: str, task_dir: Path, rundir: Path) -> list[str]:
    """``evaluationExec`` as an argv: ``python`` is this interpreter, task-directory files are absolute."""
    words = shlex.split(command)
    if not words:
        raise ValueError("evaluationExec is empty")
    if words[0] in PYTHON_WORDS:
        words[0] = sys.executable
    return [_resolve_word(word, task_dir, rundir) for word in words]


def _resolve_word(word: str, task_dir: Path, rundir: Path) -> str:
    if word.startswith("-") or os.path.isabs(word) or (rundir / word).exists():
        return word
    candidate = task_dir / word
    return str(candidate.resolve()) if candidate.is_file() else word


def training_files(training_ds: str | None, task_dir: Path) -> list[str]:
    """The training files for ``evaluationTrainingData``: a local path or glob (comma-separated list allowed)
    expands to absolute paths; a Rucio dataset name (``scope:name``) or nothing gives ``[]``."""
    if not training_ds:
        return []
    files: list[str] = []
    for part in (p.strip() for p in training_ds.split(",")):
        if not part:
            continue
        pattern = part if os.path.isabs(part) else str(task_dir / part)
        matches = sorted(glob.glob(pattern))
        files.extend(str(Path(m).resolve()) for m in matches if Path(m).is_file())
        directories = [Path(m) for m in matches if Path(m).is_dir()]
        files.extend(str(f.resolve()) for d in directories for f in sorted(d.rglob("*")) if f.is_file())
    return files


def read_output(path: Path, returncode: int, payload_log: Path) -> tuple[str, float | None, str]:
    """``(status, loss, message)`` for tell, from the payload's output file and exit code."""
    if not path.exists():
        return "failed", None, (f"payload exited with code {returncode} and wrote no {path.name}"
                                f"{_log_tail(payload_log)}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return "failed", None, f"malformed {path.name}: {exc}"
    if not isinstance(result, dict) or "status" not in result:
        return "failed", None, f"malformed {path.name}: expected an object with 'status', got {result!r:.200}"
    message = str(result.get("message") or "")
    loss = result.get("loss")
    loss_ok = isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
    if result["status"] != 0:
        return "failed", None, message or f"payload reported status {result['status']!r}"
    if result.get("pruned"):
        return "pruned", float(loss) if loss_ok else None, message or "stopped early"
    if not loss_ok:
        return "failed", None, f"malformed {path.name}: status 0 needs a finite number 'loss', got {loss!r}"
    return "done", float(loss), message


def _log_tail(payload_log: Path) -> str:
    try:
        text = payload_log.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f"; end of {payload_log.name}: {text[-LOG_TAIL_CHARS:]}" if text else ""


def checkpoint_paths(spec: str | None) -> list[str]:
    """``checkPointToSave``: a comma-separated list of files/directories inside the working directory."""
    return [p.strip() for p in (spec or "").split(",") if p.strip()]


def pack_checkpoint(rundir: Path, spec: str | None) -> bytes | None:
    """A gzipped tar of the existing ``checkPointToSave`` paths, or None when there is nothing to save."""
    present = [p for p in checkpoint_paths(spec) if (rundir / p).exists()]
    if not present:
        return None
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in present:
                tar.add(rundir / path, arcname=path)
    except (OSError, tarfile.TarError) as exc:
        log.warning("checkpoint not packed (files changing under us?): %s", exc)
        return None
    return buffer.getvalue()


def restore_checkpoint(data: bytes, rundir: Path, to_load: str | None) -> None:
    """Put a checkpoint tarball where the payload expects it: at ``checkPointToLoad`` as is, or unpacked."""
    if to_load:
        target = rundir / to_load
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(rundir, filter="data")


def stop_process_group(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM to the payload's process group, SIGKILL after ``grace_s`` if it is still there."""
    if proc is None or proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("payload %d ignored SIGTERM for %.0f s: SIGKILL", proc.pid, grace_s)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    _signal_group(proc, signal.SIGKILL)  # leftovers of the group that outlived their leader


def die_with_parent() -> Callable[[], None] | None:
    """A preexec function that makes the kernel SIGKILL the payload when the worker dies (Linux), so a
    worker killed with -9 leaves no payload behind burning a GPU; None where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return arm


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer came (the client already retried a few times) or the server answered 5xx;
    a definite answer such as 401, 404 or 409 is not."""
    if isinstance(exc, (requests.RequestException, ConnectionError)):
        return True
    if type(exc) not in (ClientError, ChecksumMismatch):
        return False
    status = exc.status
    return status is None or status >= HTTP_SERVER_ERROR


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def run_worker(options: WorkerOptions) -> int:
    """Run a worker in this process with SIGTERM/SIGINT handled as a clean stop; the exit code (0)."""
    worker = Worker(options)

    def on_signal(signum: int, _frame: Any) -> None:
        worker.request_stop(f"received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run()
    finally:
        worker.client.close()
        worker.heartbeat_client.close()
    return 0
