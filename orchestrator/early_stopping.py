"""Prune decisions for ``report``: a per-study cache of trials, refreshed and learned from in the background.

The first report of a study loads its points and learning curves from storage (on the request path,
once); after that a decision reads only memory: the reported value is folded into the cache and the
study's policy (steering_container.stopping) is asked. Slow work never runs on the request path: every
``max_age`` seconds one background thread per study re-reads storage — so values reported to other
server processes, and points finished since, are seen — and the same thread refits a policy that wants
to learn from newly completed trials (the predictive one). Until a re-read or refit is done, decisions
use the cache and models as they are. Reports and tells that arrive during a re-read are replayed onto
the fresh snapshot, so none is lost. A point told finished (:meth:`StoppingDecider.tell`) counts at once:
its final value goes into the cache and, if the policy wants to learn from it, the refit starts then
rather than at the next re-read — what the replay benchmark does at a tell, only in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from hepopt.task import Task
from orchestrator.storage.base import PointRecord, PointState, Storage
from steering_container.stopping import StoppingPolicy, TrialState, TrialView, make_policy

log = logging.getLogger(__name__)

#: A study without reports for this long leaves the cache (its next report loads it again, about a
#: second with 1,000 curves). Epochs of real trainings can take an hour, so this is much longer.
IDLE_EVICTION_S = 24 * 3600.0
#: How a point's state reads to a policy: a NEW point may hold a curve from an attempt that expired.
TRIAL_STATES: dict[PointState, TrialState] = {
    PointState.NEW: "running", PointState.RUNNING: "running", PointState.DONE: "done",
    PointState.PRUNED: "pruned", PointState.FAILED: "failed",
}

PolicyFactory = Callable[[Task], StoppingPolicy]
#: A change to the cache that a re-read must not lose: applied to the fresh snapshot's trials.
JournalEntry = Callable[[dict[int, TrialView]], None]


def policy_for(task: Task) -> StoppingPolicy:
    """The policy of the task's ``hepopt.earlyStopping`` block (with the search space it may need)."""
    options = task.hepopt.earlyStopping
    space = task.space if options.policy == "predictive" else None
    return make_policy(options, task.hepopt.direction, space)


class Background:
    """Runs one study's slow jobs one after another on a single thread, started on demand and ended
    when no job is left: one thread per study at most, none for a study at rest."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._jobs: dict[str, Callable[[], None]] = {}
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        """Queue ``job`` unless a job with the same key is already waiting."""
        with self._lock:
            self._jobs.setdefault(key, job)
            if self._thread is not None:
                return
            self._idle.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no job is waiting or running (for tests and orderly shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    self._idle.set()
                    return
                key = next(iter(self._jobs))
                job = self._jobs.pop(key)
            try:
                job()
            except Exception:  # a failed job must not end the thread that later jobs rely on
                log.exception("%s: background job %r failed", self.name, key)


@dataclass
class StudyCache:
    """One study's policy and trials. ``journal`` collects reports and tells while a re-read is under way."""

    policy: StoppingPolicy
    trials: dict[int, TrialView]
    loaded_at: float
    used_at: float
    background: Background
    lock: threading.Lock = field(default_factory=threading.Lock)
    journal: list[JournalEntry] | None = None


class StoppingDecider:
    """Answers ``prune`` for one report with the study's configured policy."""

    def __init__(self, storage: Storage, max_age: float, policy_factory: PolicyFactory = policy_for,
                 idle_eviction: float = IDLE_EVICTION_S) -> None:
        self.storage = storage
        self.max_age = max_age
        self.policy_factory = policy_factory
        self.idle_eviction = idle_eviction
        self._lock = threading.Lock()
        self._studies: dict[int, StudyCache] = {}

    @staticmethod
    def active(task: Task) -> bool:
        """Whether the task's policy may prune: reports and tells of a study without one need no decider."""
        return task.hepopt.earlyStopping.policy != "none"

    def decide(self, study_id: int, task: Task, point_id: int, step: int, value: float) -> bool:
        """Fold the (already stored) value into the study's cache and ask the policy about it."""
        if not self.active(task):
            return False
        study = self._study(study_id, task)
        trial = study.trials.get(point_id) or self._trial_of(self.storage.get_point(point_id))
        with study.lock:
            trial = study.trials.setdefault(point_id, trial)
            trial.curve[step] = value
            if study.journal is not None:
                study.journal.append(partial(_record_value, point_id, step, value))
            others = [other for pid, other in study.trials.items() if pid != point_id]
            prune = study.policy.should_prune(trial, step, others)
            stale = time.monotonic() - study.loaded_at >= self.max_age
            if stale:
                study.loaded_at = time.monotonic()  # claimed: one re-read at a time
        if stale:
            study.background.submit("reload", lambda: self._reload(study_id, study))
        return prune

    def tell(self, point: PointRecord) -> None:
        """Record a point just told finished, so a DONE point is learned from now rather than after the next
        re-read (up to ``max_age`` later). Cheap: the refit, or a re-read first when this process lacks
        part of the point's curve (values reported to another process), runs in the background."""
        with self._lock:
            study = self._studies.get(point.study_id)
        if study is None:  # not loaded here: its first report reads the point from storage
            return
        with study.lock:
            trial = _record_finish(point, study.trials)
            if study.journal is not None:
                study.journal.append(partial(_record_finish, point))
            gaps = len(trial.curve) < max(trial.curve, default=-1) + 1
            completed = [t for t in study.trials.values() if t.completed] if trial.completed else []
        if trial.completed and (not trial.curve or gaps):
            study.background.submit("reload", lambda: self._reload(point.study_id, study))
        elif completed and study.policy.wants_refit(completed):
            study.background.submit("refit", lambda: self._refit(study))

    def cached(self, study_id: int) -> StudyCache | None:
        """The study's cache entry, if loaded (for tests and diagnostics)."""
        with self._lock:
            return self._studies.get(study_id)

    # -- the cache --------------------------------------------------------------------------------
    def _study(self, study_id: int, task: Task) -> StudyCache:
        now = time.monotonic()
        with self._lock:
            self._studies = {sid: s for sid, s in self._studies.items() if now - s.used_at < self.idle_eviction}
            study = self._studies.get(study_id)
        if study is None:
            loaded = StudyCache(self.policy_factory(task), self._load(study_id), now, now,
                                Background(f"stopping-study-{study_id}"))
            with self._lock:
                study = self._studies.setdefault(study_id, loaded)
            if study is loaded:
                study.background.submit("refit", lambda: self._refit(study))
        study.used_at = now
        return study

    def _load(self, study_id: int) -> dict[int, TrialView]:
        curves = self.storage.intermediate_values(study_id)
        trials = {point.id: self._trial_of(point) for point in self.storage.list_points(study_id)}
        for point_id, curve in curves.items():
            if point_id in trials:
                trials[point_id].curve = curve
        return trials

    @staticmethod
    def _trial_of(point: PointRecord) -> TrialView:
        final = point.loss if point.state == PointState.DONE else None
        return TrialView(point.id, params=point.params, state=TRIAL_STATES[point.state], final=final)

    def _reload(self, study_id: int, study: StudyCache) -> None:
        """Swap in a fresh snapshot, keep trials it does not know yet and replay the reports it missed."""
        with study.lock:
            study.journal = []
        try:
            fresh = self._load(study_id)
        except BaseException:
            with study.lock:
                study.journal = None
            raise
        with study.lock:  # closing the journal and swapping in one step: no report falls in between
            for point_id, trial in study.trials.items():
                fresh.setdefault(point_id, trial)
            for entry in study.journal or ():
                entry(fresh)
            study.trials, study.journal = fresh, None
        self._refit(study)

    @staticmethod
    def _refit(study: StudyCache) -> None:
        with study.lock:
            completed = [trial for trial in study.trials.values() if trial.completed]
        if study.policy.wants_refit(completed):
            started = time.perf_counter()
            study.policy.refit(completed)
            log.info("%s: stopping policy refitted on %d completed trials in %.2f s", study.background.name,
                     len(completed), time.perf_counter() - started)


def _record_value(point_id: int, step: int, value: float, trials: dict[int, TrialView]) -> None:
    trials[point_id].curve[step] = value


def _record_finish(point: PointRecord, trials: dict[int, TrialView]) -> TrialView:
    """The point's final state and value on its cached trial (created if this process never saw it)."""
    fresh = StoppingDecider._trial_of(point)
    trial = trials.setdefault(point.id, fresh)
    trial.state, trial.final = fresh.state, fresh.final
    return trial
