"""In-process counters and the Prometheus text exposition of ``/metrics``.

Gauges of studies and points are read from storage at scrape time (they survive restarts and are
shared by every server process); counters and the ask latency live in this process only, as usual
for Prometheus counters. Written by hand: the format is small and the room needs no extra package.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable

from orchestrator.storage.base import PointState, Storage, StudyState

#: Ask latencies kept for the quantiles of the summary.
LATENCY_WINDOW = 2048
QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    """Thread-safe counters that the routes and the scheduler update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[tuple[str, str, str]] = Counter()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._latency_sum = 0.0
        self._latency_count = 0

    def count(self, name: str, label: str = "", value: str = "") -> None:
        with self._lock:
            self.counters[(name, label, value)] += 1

    def observe_ask(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)
            self._latency_sum += seconds
            self._latency_count += 1

    def render(self, storage: Storage) -> str:
        """The whole exposition, ending with a newline as the format requires."""
        lines = _study_gauges(storage)
        with self._lock:
            lines += _counters(self.counters)
            lines += _summary("hepopt_ask_seconds", "Time to answer an ask.", sorted(self._latencies),
                              self._latency_sum, self._latency_count)
        return "\n".join(lines) + "\n"


COUNTER_HELP = {
    "hepopt_asks_total": "Asks answered, by result.",
    "hepopt_tells_total": "Points finished by tell, by status (replays not counted).",
    "hepopt_reports_total": "Intermediate values reported.",
    "hepopt_prunes_total": "Reports answered with prune=true.",
    "hepopt_steering_runs_total": "Steering runs, by result.",
    "hepopt_reaped_total": "Expired leases reaped.",
}


def _study_gauges(storage: Storage) -> list[str]:
    studies = storage.list_studies()
    by_state = Counter(study.state.value for study in studies)
    points: Counter[str] = Counter()
    for study in studies:
        counts = storage.counts(study.id)
        for state in PointState:
            points[state.value] += getattr(counts, state.value)
    lines = ["# HELP hepopt_studies Studies by state.", "# TYPE hepopt_studies gauge"]
    lines += [f'hepopt_studies{{state="{state.value}"}} {by_state[state.value]}' for state in StudyState]
    lines += ["# HELP hepopt_points Points by state.", "# TYPE hepopt_points gauge"]
    lines += [f'hepopt_points{{state="{state.value}"}} {points[state.value]}' for state in PointState]
    return lines


def _counters(counters: Counter[tuple[str, str, str]]) -> list[str]:
    lines = []
    for name, help_text in COUNTER_HELP.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        samples = sorted((key, n) for key, n in counters.items() if key[0] == name)
        if not samples:
            lines.append(f"{name} 0")
        for (_, label, value), n in samples:
            lines.append(f'{name}{{{label}="{value}"}} {n}' if label else f"{name} {n}")
    return lines


def _summary(name: str, help_text: str, ordered: list[float], total: float, count: int) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} summary"]
    lines += [f'{name}{{quantile="{q}"}} {_number(_quantile(ordered, q))}' for q in QUANTILES]
    return [*lines, f"{name}_sum {_number(total)}", f"{name}_count {count}"]


def _quantile(ordered: Iterable[float], q: float) -> float:
    values = list(ordered)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _number(value: float) -> str:
    """Prometheus spells the special values NaN, +Inf and -Inf."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
