"""How good are the points steering proposes? Best loss after 25, 50 and 100 evaluations, every method
against random search, over many seeds, on Branin, Hartmann-6 and a surrogate of real MLPF trainings.

Each run is the loop the orchestrator drives: ask ``propose(space, history, B, method, seed)`` (stateless,
DESIGN.md §3.3), evaluate the points, append ``Observation(point, loss)``, repeat until the largest
budget. One run per (problem, method, seed) yields the best-so-far trace, read at every budget. Per
problem the tables give, for each method and budget, the median and interquartile range of the best
loss over seeds and the win rate against random (share of seed indices where the method's best is <=
random's), then a PASS/FAIL line: does every model-based method beat random's median at 50 evaluations?
A method that raises is reported as failed on those seeds, never dropped. Runs are spread over
``--jobs`` processes, one BLAS thread each.

Which methods the bar applies to (``MODEL_BASED_METHODS``). The issue asks that model-based methods beat
random: methods that fit something to the losses and propose where it predicts good points. They are

* ``tpe``: fits two densities to the history, one of the best points and one of the rest, and proposes
  where their ratio is highest;
* ``nevergrad:CMA``: adapts a Gaussian search distribution (mean, covariance, step size) to the ranked
  history;
* ``nevergrad:NGOpt``, held to the bar although it is a wizard rather than an algorithm: on continuous
  spaces it picks model-based optimisers (Cobyla's linear models in a trust region, MetaModel's quadratic
  surrogate over CMA), on spaces with a categorical a discrete (1+1) evolution strategy. It is nevergrad's
  recommended default, the optimiser users pick, so exempting it for what it picks on mixed spaces would hide
  exactly the weakness the check is there to catch.

Not model-based, so printed with their medians and win rates and named in the verdict line, but not part
of PASS/FAIL: ``anneal`` (hyperopt's annealing, by its own description "a simple variation on random
search": it samples near one of the best past points with a width that shrinks on a fixed schedule,
fitting nothing to the losses), ``nevergrad:TwoPointsDE`` and the rest of differential evolution (a
population of good points; new points from their differences), the (1+1) family (one parent and a step
size) and any other method not listed. ``random`` is the baseline.

    python benchmarks/steering_quality.py --seeds 20 --budgets 25 50 100 --json quality.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from hepopt.space import SearchSpace
from steering_container.api import Observation, propose

try:
    from benchmarks import objectives as obj
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    import objectives as obj  # type: ignore[no-redef]

#: The baseline every method is compared with; always run.
BASELINE = "random"
#: Methods the PASS/FAIL check applies to (see the module docstring for why these and not the others).
MODEL_BASED_METHODS = frozenset({"tpe", "nevergrad:CMA", "nevergrad:NGOpt"})
DEFAULT_METHODS = ("random", "tpe", "anneal", "nevergrad:NGOpt", "nevergrad:CMA", "nevergrad:TwoPointsDE")
PROBLEMS = ("branin", "hartmann6", "mlpf")
DEFAULT_BUDGETS = (25, 50, 100)
DEFAULT_SEEDS = 20
#: The machine these runs were sized for has 2 cores.
DEFAULT_JOBS = 2
#: Budget of the PASS/FAIL check.
CHECK_BUDGET = 50
#: Random points whose best surrogate prediction serves as the MLPF yardstick (its minimum is unknown).
REFERENCE_SAMPLES = 100_000
#: Libraries whose versions explain the numbers.
LIBRARIES = ("hyperopt", "nevergrad", "numpy", "scipy", "scikit-learn")
#: Folders whose code these results measure.
CODE_UNDER_TEST = ("steering_container", "hepopt/space.py", "benchmarks/mlpf_space.py", "benchmarks/objectives.py",
                   "benchmarks/steering_quality.py")
#: Characters of a warning message that are printed.
WARNING_CHARS = 110
#: Quartiles of the interquartile range.
QUARTILES = (25, 75)


@dataclass(frozen=True)
class Task:
    problem: str
    method: str
    seed: int
    budget: int
    batch: int


@dataclass
class Run:
    """One optimisation: best loss after each evaluation, and the seconds spent inside propose()."""

    problem: str
    method: str
    seed: int
    trace: list[float]
    propose_seconds: float
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def best_after(self, budget: int) -> float | None:
        """Best loss of the first ``budget`` evaluations; None when the run failed before reaching them."""
        return self.trace[budget - 1] if len(self.trace) >= budget else None


@dataclass(frozen=True)
class Row:
    """Summary of one method at one budget on one problem."""

    problem: str
    method: str
    budget: int
    median: float | None
    q25: float | None
    q75: float | None
    win_rate: float | None
    seeds_ok: int
    seeds: int


# --- running ----------------------------------------------------------------------------------------
_WORKER_OBJECTIVES: dict[str, obj.Objective] = {}


def _init_worker(objectives: dict[str, obj.Objective]) -> None:
    """Give each worker the objectives, and one BLAS thread so that processes do not oversubscribe."""
    _WORKER_OBJECTIVES.update(objectives)
    threadpool_limits(1)


def run_task(task: Task) -> Run:
    """:func:`optimise`, with the distinct warnings it raised kept in the run rather than flooding stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = optimise(task)
    run.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return run


def optimise(task: Task) -> Run:
    """One ask/evaluate/tell loop up to ``task.budget`` evaluations; an exception ends it as an error."""
    objective = _WORKER_OBJECTIVES[task.problem]
    space = SearchSpace.parse(objective.space)
    history: list[Observation] = []
    trace: list[float] = []
    seconds = 0.0
    try:
        while len(history) < task.budget:
            start = time.perf_counter()
            points = propose(space, history, min(task.batch, task.budget - len(history)), task.method, task.seed)
            seconds += time.perf_counter() - start
            if not points:
                raise RuntimeError("propose() returned no point before the budget was spent")
            for point in points:
                loss = objective.evaluate(point)
                trace.append(min(loss, trace[-1]) if trace else loss)
                history.append(Observation(point, loss))
    except Exception as exc:  # a broken method is a result to report, not a reason to stop the benchmark
        return Run(task.problem, task.method, task.seed, trace, seconds, f"{type(exc).__name__}: {exc}")
    return Run(task.problem, task.method, task.seed, trace, seconds)


def run_all(tasks: list[Task], objectives: dict[str, obj.Objective], jobs: int) -> list[Run]:
    """Every task, over ``jobs`` processes; progress on stderr as each (problem, method) completes."""
    left = {(t.problem, t.method): 0 for t in tasks}
    for t in tasks:
        left[(t.problem, t.method)] += 1
    start = time.monotonic()
    runs = []
    for run in _map(tasks, objectives, jobs):
        runs.append(run)
        left[(run.problem, run.method)] -= 1
        if not left[(run.problem, run.method)]:
            print(f"[{time.monotonic() - start:6.0f} s] {run.problem} {run.method} done", file=sys.stderr, flush=True)
    return runs


def _map(tasks: list[Task], objectives: dict[str, obj.Objective], jobs: int) -> Iterable[Run]:
    if jobs == 1:
        _init_worker(objectives)
        yield from map(run_task, tasks)
        return
    with multiprocessing.Pool(jobs, _init_worker, (objectives,)) as pool:
        yield from pool.imap_unordered(run_task, tasks)


# --- summarising ------------------------------------------------------------------------------------
def summarise(runs: list[Run], problem: str, methods: Sequence[str], budgets: Sequence[int]) -> list[Row]:
    by_method = {m: sorted((r for r in runs if r.problem == problem and r.method == m), key=lambda r: r.seed)
                 for m in methods}
    rows = []
    for budget in budgets:
        baseline = {r.seed: r.best_after(budget) for r in by_method[BASELINE]}
        for method in methods:
            bests = {r.seed: r.best_after(budget) for r in by_method[method]}
            rows.append(_row(problem, method, budget, bests, baseline))
    return rows


def _row(problem: str, method: str, budget: int, bests: dict[int, float | None],
         baseline: dict[int, float | None]) -> Row:
    values = [v for v in bests.values() if v is not None]
    paired = [(v, baseline.get(s)) for s, v in bests.items() if v is not None and baseline.get(s) is not None]
    win = None if method == BASELINE or not paired else sum(v <= b for v, b in paired) / len(paired)
    if not values:
        return Row(problem, method, budget, None, None, None, win, 0, len(bests))
    q25, median, q75 = (float(q) for q in np.percentile(values, [QUARTILES[0], 50, QUARTILES[1]]))
    return Row(problem, method, budget, median, q25, q75, win, len(values), len(bests))


def verdict(rows: list[Row], problem: str) -> tuple[bool | None, str]:
    """PASS when every model-based method's median at CHECK_BUDGET is below random's, on every seed.

    The other methods are named with their gap and win rate, so the line never hides that they were run.
    """
    at = {r.method: r for r in rows if r.budget == CHECK_BUDGET}
    if not at:
        return None, f"NOT CHECKED {problem}: {CHECK_BUDGET} is not among --budgets"
    reference = at[BASELINE].median
    others = [m for m in at if m != BASELINE and m not in MODEL_BASED_METHODS]
    unchecked = (f"; not model-based, not checked: {', '.join(_standing(at[m], reference) for m in others)}"
                 if others else "")
    checked = [m for m in at if m in MODEL_BASED_METHODS]
    if not checked:
        return None, f"NOT CHECKED {problem}: no model-based method among --methods{unchecked}"
    losers = [_standing(at[m], reference) for m in checked if not _beats(at[m], reference)]
    claim = f"every model-based method ({', '.join(checked)}) beats random on the median at {CHECK_BUDGET} evaluations"
    if not losers:
        return True, f"PASS {problem}: {claim}{unchecked}"
    return False, (f"FAIL {problem}: not {claim}; random {_fmt(reference)}, behind or equal: {', '.join(losers)}"
                   f"{unchecked}")


def _beats(row: Row, reference: float | None) -> bool:
    return row.median is not None and reference is not None and row.median < reference and row.seeds_ok == row.seeds


def _standing(row: Row, reference: float | None) -> str:
    win = "" if row.win_rate is None else f", wins {row.win_rate:.0%}"
    return f"{row.method} {_fmt(row.median)} ({_gap(row, reference)}{win})"


def _gap(row: Row, reference: float | None) -> str:
    failed = f", failed on {row.seeds - row.seeds_ok} seeds" if row.seeds_ok < row.seeds else ""
    if row.median is None or reference is None:
        return "no result" + failed
    return f"{row.median - reference:+.4g} vs random{failed}"


# --- printing ---------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.5g}"


def format_table(rows: list[Row], runs: list[Run], methods: Sequence[str], budget: int) -> str:
    width = max(len(m) for m in methods) + 2
    lines = [f"{'evals':>5}  {'method':<{width}}{'median':>10}  {'IQR':<23}{'win vs random':>13}  seeds ok"]
    for row in rows:
        iqr = "—" if row.q25 is None else f"[{_fmt(row.q25)}, {_fmt(row.q75)}]"
        win = "—" if row.win_rate is None else f"{row.win_rate:.0%}"
        lines.append(f"{row.budget:>5}  {row.method:<{width}}{_fmt(row.median):>10}  {iqr:<23}{win:>13}"
                     f"  {row.seeds_ok}/{row.seeds}")
    checked = [m for m in methods if m in MODEL_BASED_METHODS]
    lines.append(f"model-based, checked at {CHECK_BUDGET}: {', '.join(checked) or 'none'}; others reported only")
    lines.append(f"seconds in propose() per run of {budget} evaluations (mean over seeds):")
    lines.append("  " + ", ".join(f"{m} {_mean_seconds(runs, m):.2f}" for m in methods))
    lines.extend(_failure_lines(runs, methods))
    lines.extend(_warning_lines(runs, methods))
    return "\n".join(lines)


def _failure_lines(runs: list[Run], methods: Sequence[str]) -> list[str]:
    """Per method and error, the seeds that failed and after how many evaluations."""
    lines = []
    for method in methods:
        by_error: dict[str, list[Run]] = {}
        for run in runs:
            if run.method == method and run.error:
                by_error.setdefault(run.error, []).append(run)
        for error, failed in sorted(by_error.items()):
            done = sorted({len(r.trace) for r in failed})
            lines.append(f"  FAILED ({method}, {len(failed)} seeds, after {'/'.join(map(str, done))} evaluations): "
                         f"{error}")
    return lines


def _warning_lines(runs: list[Run], methods: Sequence[str]) -> list[str]:
    """Per method, the distinct warnings its runs raised and on how many seeds."""
    lines = []
    for method in methods:
        counts: dict[str, int] = {}
        for run in runs:
            if run.method == method:
                for message in run.warnings:
                    counts[message] = counts.get(message, 0) + 1
        lines.extend(f"  warning ({method}, {n} seeds): {m[:WARNING_CHARS]}" for m, n in sorted(counts.items()))
    return lines


def _mean_seconds(runs: list[Run], method: str) -> float:
    seconds = [r.propose_seconds for r in runs if r.method == method]
    return sum(seconds) / len(seconds) if seconds else math.nan


def machine_info() -> dict[str, Any]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "libraries": versions,
        "code": code_version(),
    }


def code_version() -> str:
    """The commit, and the files of the code under test that differ from it: results follow the code."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = _git(root, "rev-parse", "--short", "HEAD")
        changed = _git(root, "status", "--porcelain", "--", *CODE_UNDER_TEST).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"commit {commit}" + (f", locally changed: {' '.join(c[3:] for c in changed)}" if changed else ", clean")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.rstrip("\n")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --- problems ---------------------------------------------------------------------------------------
def build_problems(names: Sequence[str], curves_path: Path) -> tuple[dict[str, obj.Objective], dict[str, str]]:
    """The objectives asked for, and per problem the lines that describe it."""
    objectives: dict[str, obj.Objective] = {}
    notes: dict[str, str] = {}
    for name in names:
        if name == "branin":
            objectives[name] = obj.branin_objective()
        elif name == "hartmann6":
            objectives[name] = obj.hartmann6_objective()
        else:
            objectives[name], notes[name] = _mlpf(curves_path)
    for name, objective in objectives.items():
        known = f"known minimum {objective.minimum}" if objective.minimum is not None else "minimum unknown"
        notes[name] = f"{objective.description}; {known}" + (f"\n{notes[name]}" if name in notes else "")
    return objectives, notes


def _mlpf(curves_path: Path) -> tuple[obj.Objective, str]:
    curves = obj.load_curves(curves_path)
    objective, surrogate = obj.mlpf_objective(curves)
    space = SearchSpace.parse(objective.space)
    mismatches = obj.range_mismatches(curves, space)
    r2 = obj.cross_validated_r2(curves, space)
    reference = obj.surrogate_reference_minimum(surrogate, space, REFERENCE_SAMPLES)
    note = (f"surrogate: Gaussian process (Matérn-5/2, per-dimension length scales, frozen maximum-likelihood "
            f"kernel) on {len(curves.final_loss)} trainings from {curves_path.name} ({curves.dropped} outlier "
            f"dropped)\n  grouped {obj.CV_FOLDS}-fold cross-validated R² {r2:.3f} (mean of {len(obj.CV_SHUFFLES)} "
            f"shuffles); best trained final loss {curves.final_loss.min():.5g}; best surrogate prediction over "
            f"{REFERENCE_SAMPLES} random points {reference:.5g}\n  hyperparameter ranges of the data vs "
            f"MLPF_SPACE: {'; '.join(mismatches) if mismatches else 'no mismatch'}")
    return objective, note


# --- command line -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"steering methods; {BASELINE} is always added (default: %(default)s)")
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per method (default: %(default)s)")
    parser.add_argument("--budgets", nargs="+", type=int, default=list(DEFAULT_BUDGETS),
                        help="evaluation counts at which the best loss is read (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="points per propose() call (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="processes (default: %(default)s)")
    parser.add_argument("--curves", type=Path, default=obj.CURVES_PATH, help="MLPF learning curves CSV")
    parser.add_argument("--json", type=Path, help="write configuration, summaries and every run's trace here")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.batch < 1 or args.jobs < 1 or min(args.budgets) < 1:
        parser.error("--seeds, --batch, --jobs and --budgets must be positive")
    if "mlpf" in args.problems and not args.curves.is_file():
        parser.error(f"MLPF learning curves not found at {args.curves} (expected ../shared/data/learning_curves/"
                     "mlpf_delphes_296.csv beside the repository); pass --curves PATH or leave out mlpf")
    args.methods = list(dict.fromkeys([BASELINE, *args.methods]))
    args.budgets = sorted(set(args.budgets))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    machine = machine_info()
    print(f"steering quality — {machine['date']}")
    print(f"machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), {machine['cpu_model']}, "
          f"{machine['platform']}, load average at start {_load(machine['load_average_at_start'])}")
    print(f"python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()))
    print(f"code: {machine['code']}")
    print(f"methods {' '.join(args.methods)}; {args.seeds} seeds; budgets {args.budgets}; batch {args.batch}; "
          f"{args.jobs} processes")
    objectives, notes = build_problems(args.problems, args.curves)
    tasks = [Task(p, m, s, args.budgets[-1], args.batch)
             for p in args.problems for m in args.methods for s in range(args.seeds)]
    runs = run_all(tasks, objectives, args.jobs)
    summaries, verdicts = {}, {}
    for problem in args.problems:
        rows = summarise(runs, problem, args.methods, args.budgets)
        problem_runs = [r for r in runs if r.problem == problem]
        print(f"\n== {problem}: {notes[problem]}")
        print(format_table(rows, problem_runs, args.methods, args.budgets[-1]))
        summaries[problem] = rows
        verdicts[problem] = verdict(rows, problem)
    print()
    for _, line in verdicts.values():
        print(line)
    wall = time.monotonic() - started
    print(f"\ntotal wall time {wall:.0f} s ({wall / 60:.1f} min); load average at end {_load(os.getloadavg())}")
    if args.json:
        _write_json(args, machine, notes, summaries, verdicts, runs, wall)
    return 0


def _load(load: Sequence[float] | None) -> str:
    return "unknown" if load is None else " ".join(f"{x:.2f}" for x in load)


def _write_json(args: argparse.Namespace, machine: dict[str, Any], notes: dict[str, str],
                summaries: dict[str, list[Row]], verdicts: dict[str, tuple[bool | None, str]], runs: list[Run],
                wall: float) -> None:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    document = {
        "config": config, "machine": machine, "problems": notes, "wall_seconds": wall,
        "summary": {p: [asdict(r) for r in rows] for p, rows in summaries.items()},
        "verdicts": {p: {"passed": ok, "line": line} for p, (ok, line) in verdicts.items()},
        "runs": [asdict(r) for r in sorted(runs, key=lambda r: (r.problem, r.method, r.seed))],
    }
    args.json.write_text(json.dumps(document, indent=1))
    print(f"raw results written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
