"""How long does a prune decision take at the orchestrator, with 1,000 completed learning curves?

A real SQLite storage holds one study per policy: 1,000 DONE points whose hyperparameters and 100-epoch
curves are drawn (with replacement) from the 295 kept MLPF curves of
``../shared/data/learning_curves/mlpf_delphes_296.csv`` (see the README.md beside it; source
erwulff/performance-pred, Apache License 2.0), plus ``--running`` points that then report every epoch
of their own resampled curves. Each report is answered by the orchestrator's ``StoppingDecider.decide``
— what the report route calls after storing the value — and timed. The first decision of a study loads
it from storage and is reported apart (cold); for the predictive policy the steady figures are taken
after its background fit, and one more row times decisions made while that fit on 1,000 curves runs
in the background thread (a fresh decider, as after a server restart).

    python benchmarks/prune_latency.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import text

from hepopt.task import parse_task
from orchestrator.early_stopping import StoppingDecider
from orchestrator.storage.sql import SQLStorage

try:
    from benchmarks.mlpf_space import MLPF_SPACE
    from benchmarks.objectives import CURVES_PATH
    from benchmarks.replay_hpo import MAX_RESOURCE, POLICY_BLOCKS, LearningCurves, load_learning_curves
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    from mlpf_space import MLPF_SPACE  # type: ignore[no-redef]
    from objectives import CURVES_PATH  # type: ignore[no-redef]
    from replay_hpo import MAX_RESOURCE, POLICY_BLOCKS, LearningCurves, load_learning_curves  # type: ignore[no-redef]

DEFAULT_COMPLETED = 1000
DEFAULT_RUNNING = 40
DEFAULT_POLICIES = ("median", "asha", "hyperband", "predictive")
#: The issue's limit for one decision.
TARGET_MS = 20.0
#: A decision cache that never goes stale during the run: re-reads would only add background noise.
CACHE_SECONDS = 3600.0
BACKGROUND_TIMEOUT_S = 600.0
POINT_CHUNK = 500
MS = 1000.0


@dataclass(frozen=True)
class Timing:
    """Wall-clock percentiles, and the same for the CPU time of the deciding thread: on a shared machine
    the wall clock includes waiting for a core, the thread's CPU time does not."""

    label: str
    decisions: int
    p50: float
    p99: float
    worst: float
    rung_p99: float | None
    cpu_p50: float
    cpu_p99: float
    pruned: int

    def row(self) -> str:
        rung = "-" if self.rung_p99 is None else f"{self.rung_p99:.2f}"
        return (f"{self.label:<28} {self.decisions:>9} {self.p50:>8.3f} {self.p99:>8.3f} {rung:>10} "
                f"{self.worst:>8.2f} {self.cpu_p50:>8.3f} {self.cpu_p99:>8.3f} {self.pruned:>7}")


def seed_study(storage: SQLStorage, block: dict[str, Any], data: LearningCurves, completed: int, running: int,
               rng: np.random.Generator) -> tuple[int, list[tuple[int, np.ndarray]]]:
    """A study with ``completed`` DONE points and ``running`` NEW ones; returns the runners and their curves."""
    task = parse_task({"evaluationExec": "train", "searchSpace": MLPF_SPACE, "maxPoints": completed + running,
                       "hepopt": {"method": "random", "earlyStopping": block}})
    study = storage.create_study("bench", task)
    rows = rng.integers(0, len(data.final), completed + running)
    params = [data.params[r] for r in rows]
    points = []
    for start in range(0, len(params), POINT_CHUNK):
        points += storage.add_points(study.id, params[start:start + POINT_CHUNK], origin="bench")
    now = time.time()
    done = list(zip(points[:completed], rows[:completed], strict=True))
    with storage.engine.begin() as conn:
        conn.execute(text("UPDATE points SET state = 'done', loss = :loss, finished_at = :t WHERE id = :id"),
                     [{"loss": float(data.final[r]), "t": now, "id": p.id} for p, r in done])
        conn.execute(text("INSERT INTO intermediate_values (point_id, study_id, step, value, updated_at) "
                          "VALUES (:p, :s, :step, :v, :t)"),
                     [{"p": p.id, "s": study.id, "step": step, "v": float(data.curves[r, step]), "t": now}
                      for p, r in done for step in range(MAX_RESOURCE)])
    runners = [(p.id, data.curves[r]) for p, r in zip(points[completed:], rows[completed:], strict=True)]
    return study.id, runners


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rung: list[float] = field(default_factory=list)
    pruned: int = 0


def time_reports(decider: StoppingDecider, study_id: int, task: Any, runners: list[tuple[int, np.ndarray]],
                 rung_steps: set[int]) -> Samples:
    """Every runner reports every epoch (round-robin, as parallel workers would) until pruned or done."""
    samples = Samples()
    alive = list(runners)
    for step in range(MAX_RESOURCE):
        still = []
        for point_id, curve in alive:
            started, cpu_started = time.perf_counter(), time.thread_time()
            prune = decider.decide(study_id, task, point_id, step, float(curve[step]))
            elapsed = (time.perf_counter() - started) * MS
            samples.cpu.append((time.thread_time() - cpu_started) * MS)
            samples.wall.append(elapsed)
            if step in rung_steps:
                samples.rung.append(elapsed)
            if prune:
                samples.pruned += 1
            else:
                still.append((point_id, curve))
        alive = still
    return samples


def summarise(label: str, samples: Samples) -> Timing:
    wall, cpu = np.array(samples.wall), np.array(samples.cpu)
    rung = float(np.percentile(samples.rung, 99)) if samples.rung else None
    return Timing(label, len(wall), float(np.percentile(wall, 50)), float(np.percentile(wall, 99)),
                  float(wall.max()), rung, float(np.percentile(cpu, 50)), float(np.percentile(cpu, 99)),
                  samples.pruned)


def rung_steps_of(block: dict[str, Any]) -> set[int]:
    """Steps where some bracket may decide: resources gracePeriod * reductionFactor**k below maxResource."""
    if "gracePeriod" not in block:
        return set()
    steps, resource = set(), block["gracePeriod"]
    while resource < block["maxResource"]:
        steps.add(resource - 1)
        resource *= block["reductionFactor"]
    return steps


def bench_policy(storage: SQLStorage, name: str, data: LearningCurves,
                 args: argparse.Namespace) -> tuple[list[Timing], list[str]]:
    """The steady timing of the policy (after its background fit, if any), plus for the predictive policy
    the timing of decisions made while a fresh decider fits on the completed curves; and notes."""
    block = POLICY_BLOCKS[name]
    study_id, runners = seed_study(storage, block, data, args.completed, args.running,
                                   np.random.default_rng(args.seed))
    task = storage.get_study(study_id).task
    first_id, first_curve = runners[0]
    timings, notes = [], []
    if name == "predictive":
        busy = StoppingDecider(storage, max_age=CACHE_SECONDS)
        busy.decide(study_id, task, first_id, 0, float(first_curve[0]))  # loads; the fit starts in the background
        background = busy.cached(study_id).background  # type: ignore[union-attr]
        samples = time_reports(busy, study_id, task, runners[1:], rung_steps_of(block))
        overlapped = not background.wait_idle(0)
        waited = time.perf_counter()
        background.wait_idle(BACKGROUND_TIMEOUT_S)
        label = "predictive, during its fit" if overlapped else "predictive (fit ended first)"
        timings.append(summarise(label, samples))
        notes.append(f"the background fit on {args.completed} curves went on for "
                     f"{time.perf_counter() - waited:.1f} s after the last of those decisions")
    decider = StoppingDecider(storage, max_age=CACHE_SECONDS)
    started = time.perf_counter()
    decider.decide(study_id, task, first_id, 0, float(first_curve[0]))
    notes.insert(0, f"cold: the study's first decision, loading it from storage, took "
                    f"{(time.perf_counter() - started) * MS:.0f} ms")
    cache = decider.cached(study_id)
    assert cache is not None
    cache.background.wait_idle(BACKGROUND_TIMEOUT_S)
    fitted = getattr(cache.policy, "fitted", None)
    if fitted is not None:
        notes.append(f"predictor models at rungs {sorted(fitted.models)}")
    timings.insert(0, summarise(name, time_reports(decider, study_id, task, runners[1:], rung_steps_of(block))))
    return timings, notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completed", type=int, default=DEFAULT_COMPLETED, help="DONE points (default %(default)s)")
    parser.add_argument("--running", type=int, default=DEFAULT_RUNNING,
                        help="points that report every epoch while timed (default %(default)s)")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=sorted(POLICY_BLOCKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curves", type=Path, default=CURVES_PATH, help="the learning-curve CSV")
    args = parser.parse_args(argv)
    if args.completed < 1 or args.running < 2:
        parser.error("--completed must be >= 1 and --running >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print p50/p99 decision times per policy; 1 when a p99 exceeds the target."""
    args = parse_args(argv)
    try:
        data = load_learning_curves(args.curves)
    except (OSError, ValueError) as exc:
        print(f"prune_latency: {exc}", file=sys.stderr)
        return 2
    print(f"prune decisions: {args.completed} completed curves of {MAX_RESOURCE} steps, {args.running - 1} points "
          f"reporting every epoch, SQLite storage; times in ms")
    print(f"{'policy':<28} {'decisions':>9} {'p50':>8} {'p99':>8} {'rung p99':>10} {'max':>8} {'cpu p50':>8} "
          f"{'cpu p99':>8} {'pruned':>7}")
    worst_p99 = worst_cpu_p99 = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        storage = SQLStorage(f"sqlite:///{Path(tmp) / 'latency.db'}")
        try:
            for name in args.policies:
                timings, notes = bench_policy(storage, name, data, args)
                print("\n".join([t.row() for t in timings] + [f"{'':<30}{note}" for note in notes]), flush=True)
                worst_p99 = max([worst_p99] + [t.p99 for t in timings])
                worst_cpu_p99 = max([worst_cpu_p99] + [t.cpu_p99 for t in timings])
        finally:
            storage.close()
    met = worst_p99 <= TARGET_MS
    print(f"target p99 <= {TARGET_MS:g} ms: {'MET' if met else 'NOT MET'} (worst wall-clock p99 {worst_p99:.2f} ms; "
          f"worst CPU p99 {worst_cpu_p99:.2f} ms)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
