"""The background half of the orchestrator: return expired leases to the queue, keep every running
study supplied with points, and close studies whose budget is spent.

Workers never wait on steering: ``ask`` answers "wait" and pokes the scheduler, which starts steering at
once in its own thread pool. One steering run per study at a time is guaranteed by the storage claim
(``begin_steering``), so several server processes on one database cooperate; unlike iDDS, steering
starts as soon as unevaluated points fall below ``max(minUnevaluatedPoints, nParallelEvaluation)`` and
asks for ``nPointsPerIteration`` at a time. A started scheduler makes in-process proposals (the steering
API, ``propose``) in processes of its own (:class:`orchestrator.steering.ProposalProcesses`), so that
they never hold the interpreter lock the request threads need.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from orchestrator.config import Settings
from orchestrator.metrics import Metrics
from orchestrator.steering import History, ProposalProcesses, SteeringCancelled, SteeringFailure, StoredHistory, steer
from orchestrator.storage.base import NotFoundError, Progress, Storage, StudyRecord, StudyState

log = logging.getLogger(__name__)

#: How long ``stop`` waits for the loop and for steering runs in progress.
STOP_TIMEOUT_S = 10.0
#: Least time between two passes: pokes (every tell) arriving meanwhile are served by one pass, so a
#: busy study costs a few reads of its progress per second rather than one per tell.
POKE_COALESCE_S = 0.25


class Scheduler:
    """A thread that reaps, steers and completes studies; ``tick`` does one pass (tests call it)."""

    def __init__(self, storage: Storage, settings: Settings, metrics: Metrics | None = None) -> None:
        self.storage = storage
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._poked: set[int] = set()
        self._active: set[int] = set()
        self._backoff_until: dict[int, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._processes: ProposalProcesses | None = None
        self._thread: threading.Thread | None = None
        self._next_reap = 0.0
        self._next_sweep = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._pool = ThreadPoolExecutor(self.settings.steering_workers, thread_name_prefix="hepopt-steering")
        self._processes = ProposalProcesses(self.settings.steering_workers)
        self._thread = threading.Thread(target=self._loop, name="hepopt-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for steering runs: external commands are killed and their claims
        released at once, so a restarted server steers again without waiting for a stale claim."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(STOP_TIMEOUT_S)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.close()
        self._thread = self._pool = self._processes = None

    def poke(self, study_id: int | None = None) -> None:
        """Look at ``study_id`` (or every study) now instead of at the next interval."""
        with self._lock:
            if study_id is None:
                self._next_sweep = 0.0
            else:
                self._poked.add(study_id)
        self._wake.set()

    # -- one pass -------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Reap when due, then check the poked studies, or every running study when a sweep is due."""
        now = time.time() if now is None else now
        if now >= self._next_reap:
            self._next_reap = now + self.settings.reaper_interval
            self._reap()
        with self._lock:
            poked, self._poked = self._poked, set()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.steering_interval
            studies = self.storage.list_studies(state=StudyState.RUNNING)
        else:
            studies = [study for study in map(self._find, sorted(poked)) if study is not None]
        for study in studies:
            self._check(study, now)

    def _find(self, study_id: int) -> StudyRecord | None:
        try:
            return self.storage.get_study(study_id)
        except NotFoundError:
            return None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler pass failed; retrying at the next interval")
            self._stopping.wait(POKE_COALESCE_S)
            self._wake.wait(min(self.settings.reaper_interval, self.settings.steering_interval))
            self._wake.clear()

    def _reap(self) -> None:
        reaped = self.storage.reap_expired()
        if reaped:
            log.info("returned %d expired lease(s) to the queue", reaped)
            for _ in range(reaped):
                self.metrics.count("hepopt_reaped_total")

    # -- per study ------------------------------------------------------------------------------
    def _check(self, study: StudyRecord, now: float) -> None:
        if study.state != StudyState.RUNNING:
            return
        progress = self.storage.progress(study.id)
        if self._complete_if_spent(study, progress):
            return
        if steering_need(study, progress) > 0 and now >= self._backoff_until.get(study.id, 0.0):
            self._launch(study.id)

    def _complete_if_spent(self, study: StudyRecord, progress: Progress) -> bool:
        """Close a study the storage has not closed yet (the budget rules live in storage too)."""
        task = study.task
        if progress.finished >= task.maxPoints:
            message = f"all {task.maxPoints} points evaluated"
        elif progress.evaluation_jobs >= task.evaluation_jobs_limit and progress.running == 0:
            message = f"maxEvaluationJobs ({task.evaluation_jobs_limit}) used up"
        else:
            return False
        self.storage.set_study_state(study.id, StudyState.COMPLETED, message)
        return True

    def _launch(self, study_id: int) -> None:
        with self._lock:
            pool = self._pool
            if study_id in self._active:
                return
            self._active.add(study_id)
        if not self.storage.begin_steering(study_id, self.settings.steering_claim_seconds):
            with self._lock:
                self._active.discard(study_id)
        elif pool is None:
            self._steer(study_id)  # not started: tick() is being driven by hand, steer inline
        else:
            pool.submit(self._steer, study_id)

    def _steer(self, study_id: int) -> None:
        try:
            with self._renewing_claim(study_id):
                self.run_steering(study_id)
        except Exception:
            log.exception("steering of study %d crashed", study_id)
            self.storage.end_steering(study_id, error="steering failed: internal error (see server log)")
        finally:
            with self._lock:
                self._active.discard(study_id)
            self.poke(study_id)

    @contextlib.contextmanager
    def _renewing_claim(self, study_id: int) -> Iterator[None]:
        """Renew the study's steering claim in the background while the run lasts."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.settings.steering_renew_interval):
                try:
                    self.storage.renew_steering(study_id)
                except Exception:
                    log.exception("study %d: could not renew the steering claim", study_id)

        thread = threading.Thread(target=renew, name=f"steering-claim-{study_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def run_steering(self, study_id: int) -> None:
        """One claimed steering run: try up to ``steering_retries`` times, store the points, release the
        claim. A failure keeps every point and shows ``steering failed: ...`` on the study.

        The need is recomputed under the claim, since another run may have filled the study meanwhile.
        """
        study = self.storage.get_study(study_id)
        n = steering_need(study, self.storage.progress(study_id))
        if n == 0:
            self.storage.end_steering(study_id, error=study.steering_error)
            return
        error = None
        for attempt in range(1, self.settings.steering_retries + 1):
            try:
                points = steer(study.task, self._history(study), n, self.settings.steering_timeout,
                               cancel=self._stopping, processes=self._processes)
                break
            except SteeringCancelled:
                self.storage.end_steering(study_id, error=study.steering_error)
                return
            except SteeringFailure as exc:
                error = str(exc)
                log.warning("study %d: steering try %d failed: %s", study_id, attempt, error)
        else:
            self._backoff_until[study_id] = time.time() + self.settings.steering_backoff
            self.metrics.count("hepopt_steering_runs_total", "result", "failed")
            self.storage.end_steering(study_id, error=f"steering failed: {error}")
            return
        self._backoff_until.pop(study_id, None)
        added = self.storage.add_points(study_id, points)
        self.metrics.count("hepopt_steering_runs_total", "result", "ok")
        self.storage.end_steering(study_id)
        if not added:
            self._complete_if_exhausted(study_id)

    def _history(self, study: StudyRecord) -> History:
        """What steering reads: a reference for a proposal process to read itself where it can."""
        url = self.storage.shared_url()
        if url is not None and self._processes is not None and not study.task.steeringExec:
            return StoredHistory(url, study.id)
        return self.storage.history(study.id)

    def _complete_if_exhausted(self, study_id: int) -> None:
        """Steering proposing nothing ends the search (iDDS: ``[]``) once no point is left to evaluate."""
        progress = self.storage.progress(study_id)
        if progress.unevaluated == 0 and self.storage.get_study(study_id).state == StudyState.RUNNING:
            self.storage.set_study_state(study_id, StudyState.COMPLETED,
                                         f"the search space is exhausted after {progress.total} points")


def steering_need(study: StudyRecord, progress: Progress) -> int:
    """How many points to ask steering for now: 0 while enough are waiting or the budget is spent."""
    task = study.task
    wanted = max(task.minUnevaluatedPoints, task.nParallelEvaluation)
    room = task.maxPoints - progress.total
    if progress.unevaluated >= wanted or room <= 0 or progress.evaluation_jobs >= task.evaluation_jobs_limit:
        return 0
    return min(task.nPointsPerIteration, room)
