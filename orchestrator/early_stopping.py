"""Prune decisions for ``report``, kept fast with a per-study cache of learning curves.

Reads the study's curves from storage once, then folds each new report into the cache; the cache is
re-read after ``max_age`` seconds so values reported to another server process are seen eventually.
"""

from __future__ import annotations

import threading
import time

from hepopt.task import Task
from orchestrator.storage.base import Storage
from steering_container.stopping import NoStopping, make_policy

Curves = dict[int, dict[int, float]]


class StoppingDecider:
    """Answers ``prune`` for one report with the study's configured policy."""

    def __init__(self, storage: Storage, max_age: float) -> None:
        self.storage = storage
        self.max_age = max_age
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[float, Curves]] = {}

    def decide(self, study_id: int, task: Task, point_id: int, step: int, value: float) -> bool:
        """Record the value (already stored) and ask the study's policy about it."""
        policy = make_policy(task.hepopt.earlyStopping, task.hepopt.direction)
        if isinstance(policy, NoStopping):
            return False
        with self._lock:
            curves = self._curves(study_id)
            curves.setdefault(point_id, {})[step] = value
            others = [curve for pid, curve in curves.items() if pid != point_id]
            return policy.should_prune(step, value, others)

    def _curves(self, study_id: int) -> Curves:
        now = time.monotonic()
        loaded = self._cache.get(study_id)
        if loaded is not None and now - loaded[0] < self.max_age:
            return loaded[1]
        self._cache = {sid: entry for sid, entry in self._cache.items() if now - entry[0] < self.max_age}
        curves = self.storage.intermediate_values(study_id)
        self._cache[study_id] = (now, curves)
        return curves
