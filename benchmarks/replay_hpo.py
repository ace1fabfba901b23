"""HPO replay on real MLPF learning curves: epochs spent and best final loss found, per stopping policy.

The 296 MLPF trainings of ``../shared/data/learning_curves/mlpf_delphes_296.csv`` (7 hyperparameters and
the validation loss after each of 100 epochs; see the README.md beside it — source erwulff/performance-pred,
data/mlpf/delphes_trainings_processed.csv, Apache License 2.0, © its authors) serve as a tabular
benchmark: running a configuration for k epochs costs k epochs and reveals its first k losses. The one
outlier curve (final loss 597.3) is dropped, as in the published studies, leaving 295.

Per seed, ``--configs`` configurations are drawn without replacement and run by ``--workers`` parallel
workers in lock step (one epoch per tick; a freed worker takes the next configuration). After every
epoch the trial reports its loss to the policy — the same classes, built by the same ``make_policy`` from
the same task-JSON block, that the orchestrator's report route uses — and stops when told to. A trial
that reaches epoch 100 is completed and its final loss is told; the predictive policy refits as soon as
it asks to (synchronously here; the orchestrator's ``StoppingDecider.tell`` starts the same refit in a
background thread, so there it lands a fit's duration later).
Every policy sees the same configurations in the same order for a given seed, so the comparison is paired.

Reported per policy: epochs spent, best final loss among completed trials (a pruned trial's final loss is
unknown to the search), and against Hyperband: the epoch ratio, the paired best-loss difference with a
bootstrap 95% interval and a Wilcoxon signed-rank test. The target of the predictive policy is Hyperband's
best-loss distribution for at most 75% of its epochs; "same distribution" is read as an equivalence test:
the bootstrap interval of the mean paired difference lies within ±``--margin`` loss units.

    python benchmarks/replay_hpo.py --seeds 20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

from hepopt.space import SearchSpace
from hepopt.task import parse_task
from steering_container.stopping import StoppingPolicy, TrialView, make_policy

try:
    from benchmarks.mlpf_space import MLPF_SPACE
    from benchmarks.objectives import CSV_COLUMNS, CURVES_PATH, read_curve_rows
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    from mlpf_space import MLPF_SPACE  # type: ignore[no-redef]
    from objectives import CSV_COLUMNS, CURVES_PATH, read_curve_rows  # type: ignore[no-redef]

#: Epochs of every training in the data: a trial that reaches it is completed.
MAX_RESOURCE = 100
DEFAULT_SEEDS = 20
#: One synchronous Hyperband iteration with R = 100, eta = 3 draws 81 + 34 + 15 + 8 + 5 configurations.
DEFAULT_CONFIGS = 143
DEFAULT_WORKERS = 8
#: The predictive policy's epoch budget relative to Hyperband's (the issue's target).
TARGET_EPOCH_RATIO = 0.75
#: Equivalence margin on the mean paired best-loss difference, in loss units. The 295 final losses
#: span 442.3 to 537.8; the ten best lie within 0.92 of each other.
DEFAULT_MARGIN = 1.0
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
#: Policy settings of the replay: rungs at 1, 3, 9, 27 and 81 epochs.
RUNG_SETTINGS: dict[str, Any] = {"gracePeriod": 1, "reductionFactor": 3, "maxResource": MAX_RESOURCE}
POLICY_BLOCKS: dict[str, dict[str, Any]] = {
    "none": {"policy": "none"},
    "median": {"policy": "median"},
    "asha": {"policy": "asha", **RUNG_SETTINGS},
    "hyperband": {"policy": "hyperband", **RUNG_SETTINGS},
    # The task defaults (quantile 0.25, minCompleted 5, all brackets). minCompleted's default was chosen
    # on seeds 100-109 (10 spent 0.85-0.94 of Hyperband's epochs there, 5 spent 0.66-0.82).
    "predictive": {"policy": "predictive", **RUNG_SETTINGS},
}
DEFAULT_POLICIES = ("hyperband", "asha", "predictive")
BASELINE = "hyperband"
#: Trial ids of different seeds never overlap, so Hyperband's id-derived brackets differ per seed.
IDS_PER_SEED = 1_000_000


@dataclass(frozen=True)
class LearningCurves:
    """The kept trainings: hyperparameters (MLPF_SPACE names), curves (n, 100) and final losses."""

    params: list[dict[str, float]]
    curves: np.ndarray
    final: np.ndarray


@dataclass(frozen=True)
class RunResult:
    policy: str
    seed: int
    epochs: int
    best_final: float
    completed: int
    pruned: int
    seconds: float


@dataclass(frozen=True)
class Comparison:
    """One policy against the baseline over the same seeds."""

    policy: str
    epoch_ratio: float
    mean_difference: float
    interval: tuple[float, float]
    wilcoxon_p: float | None
    ties: int
    worse: int
    worst_difference: float

    def equivalent(self, margin: float) -> bool:
        return -margin <= self.interval[0] and self.interval[1] <= margin


def load_learning_curves(path: Path = CURVES_PATH) -> LearningCurves:
    """The CSV without its outlier; FileNotFoundError saying where the file should be."""
    loss_columns = [f"loss_{epoch}" for epoch in range(MAX_RESOURCE)]
    kept, _ = read_curve_rows(path, [*CSV_COLUMNS.values(), *loss_columns], "the replay")
    params = [{name: _space_value(name, float(r[column])) for name, column in CSV_COLUMNS.items()} for r in kept]
    curves = np.array([[float(r[c]) for c in loss_columns] for r in kept])
    return LearningCurves(params, curves, curves[:, -1].copy())


def _space_value(name: str, value: float) -> float | int:
    """CSV floats as the space hands values out: integers for integer and categorical dimensions."""
    return int(value) if MLPF_SPACE[name]["method"] in ("uniformint", "categorical") else value


class _Others(Sequence[TrialView]):
    """The study's trials but one, without copying the list at every report."""

    def __init__(self, trials: list[TrialView], skip: TrialView) -> None:
        self._trials, self._skip = trials, skip

    def __len__(self) -> int:
        return len(self._trials) - 1

    def __getitem__(self, index: int) -> TrialView:  # type: ignore[override]
        return [t for t in self._trials if t is not self._skip][index]

    def __iter__(self) -> Iterator[TrialView]:
        return (t for t in self._trials if t is not self._skip)


def replay(policy: StoppingPolicy, data: LearningCurves, order: Sequence[int], workers: int,
           id_base: int = 0) -> tuple[int, float, int, int]:
    """Run the configurations ``order`` under ``policy``: (epochs, best final loss, completed, pruned)."""
    trials: list[TrialView] = []
    completed: list[TrialView] = []
    running: list[tuple[TrialView, int]] = []
    pending = iter(order)
    epochs = pruned = 0
    while True:
        while len(running) < workers and (row := next(pending, None)) is not None:
            trial = TrialView(id_base + len(trials), params=data.params[row])
            trials.append(trial)
            running.append((trial, row))
        if not running:
            break
        still: list[tuple[TrialView, int]] = []
        for trial, row in running:
            step = len(trial.curve)
            trial.curve[step] = float(data.curves[row, step])
            epochs += 1
            if step + 1 == MAX_RESOURCE:
                trial.state, trial.final = "done", float(data.final[row])
                completed.append(trial)
                if policy.wants_refit(completed):
                    policy.refit(list(completed))
            elif policy.should_prune(trial, step, _Others(trials, trial)):
                trial.state = "pruned"
                pruned += 1
            else:
                still.append((trial, row))
        running = still
    best = min((t.final for t in completed if t.final is not None), default=math.inf)
    return epochs, best, len(completed), pruned


def policy_factory(name: str, space: SearchSpace, overrides: dict[str, Any]) -> Callable[[], StoppingPolicy]:
    """A fresh policy per run, from the task-JSON block the orchestrator would read."""
    block = {**POLICY_BLOCKS[name], **overrides.get(name, {})}
    task = parse_task({"evaluationExec": "replay", "searchSpace": MLPF_SPACE, "hepopt": {"earlyStopping": block}})
    return lambda: make_policy(task.hepopt.earlyStopping, "minimize", space)


def run_all(data: LearningCurves, names: Sequence[str], seeds: Sequence[int], configs: int, workers: int,
            overrides: dict[str, Any]) -> list[RunResult]:
    space = SearchSpace.parse(MLPF_SPACE)
    factories = {name: policy_factory(name, space, overrides) for name in names}
    results = []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(data.final))[:configs].tolist()
        for name in names:
            started = time.perf_counter()
            epochs, best, done, pruned = replay(factories[name](), data, order, workers, seed * IDS_PER_SEED)
            results.append(RunResult(name, seed, epochs, best, done, pruned, time.perf_counter() - started))
    return results


def compare(results: Sequence[RunResult], policy: str, baseline: str, seed: int = 0) -> Comparison:
    """Paired comparison over seeds: epoch ratio of the sums, best-loss difference (policy - baseline)."""
    mine = {r.seed: r for r in results if r.policy == policy}
    base = {r.seed: r for r in results if r.policy == baseline}
    seeds = sorted(set(mine) & set(base))
    diff = np.array([mine[s].best_final - base[s].best_final for s in seeds])
    ratio = sum(mine[s].epochs for s in seeds) / sum(base[s].epochs for s in seeds)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP_RESAMPLES, len(diff)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    interval = (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))
    ties = int(np.sum(diff == 0))
    p = None if ties == len(diff) else float(wilcoxon(diff, zero_method="zsplit").pvalue)
    return Comparison(policy, ratio, float(diff.mean()), interval, p, ties, int(np.sum(diff > 0)), float(diff.max()))


def report(results: Sequence[RunResult], names: Sequence[str], margin: float) -> tuple[list[str], dict[str, bool]]:
    """The table, the comparisons with the baseline and the verdicts on the predictive policies' target."""
    lines = [f"{'policy':<12} {'epochs mean':>11} {'(min-max)':>13} {'best mean':>9} {'median':>8} "
             f"{'worst':>8} {'completed':>9} {'s/run':>6}"]
    for name in names:
        rows = [r for r in results if r.policy == name]
        epochs = np.array([r.epochs for r in rows])
        best = np.array([r.best_final for r in rows])
        lines.append(f"{name:<12} {epochs.mean():>11.0f} {f'({epochs.min()}-{epochs.max()})':>13} "
                     f"{best.mean():>9.2f} {np.median(best):>8.2f} {best.max():>8.2f} "
                     f"{np.mean([r.completed for r in rows]):>9.1f} {np.mean([r.seconds for r in rows]):>6.2f}")
    verdicts: dict[str, bool] = {}
    if BASELINE in names:
        lines.append("")
        lines.append(f"against {BASELINE} (paired over seeds; difference = policy - {BASELINE}, lower is better):")
        for name in names:
            if name == BASELINE:
                continue
            c = compare(results, name, BASELINE)
            p = "n/a (all tied)" if c.wilcoxon_p is None else f"{c.wilcoxon_p:.3f}"
            lines.append(f"  {name:<12} epochs x{c.epoch_ratio:.3f}; best-loss difference mean "
                         f"{c.mean_difference:+.3f}, 95% bootstrap [{c.interval[0]:+.3f}, {c.interval[1]:+.3f}], "
                         f"Wilcoxon p {p}; identical best on {c.ties} seeds, worse on {c.worse} "
                         f"(by at most {c.worst_difference:.2f})")
            if name.startswith("predictive"):
                verdicts[name] = c.epoch_ratio <= TARGET_EPOCH_RATIO and c.equivalent(margin)
                lines.append(f"  {'':<12} target (epochs <= {TARGET_EPOCH_RATIO:.0%} of {BASELINE}, mean difference "
                             f"within ±{margin:g}): {'MET' if verdicts[name] else 'NOT MET'}")
    return lines, verdicts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of seeds (default %(default)s)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run from here (default %(default)s; the defaults were chosen on seeds 100-119)")
    parser.add_argument("--configs", type=int, default=DEFAULT_CONFIGS,
                        help="configurations drawn per seed, at most 295 (default %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel trials (default %(default)s)")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=sorted(POLICY_BLOCKS))
    parser.add_argument("--set", action="append", default=[], metavar="POLICY.KEY=JSON",
                        help="override a policy's earlyStopping key, e.g. predictive.quantile=0.3")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="equivalence margin on the mean best-loss difference (default %(default)s)")
    parser.add_argument("--curves", type=Path, default=CURVES_PATH, help="the learning-curve CSV")
    parser.add_argument("--json", type=Path, help="also write every run and the comparisons here")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1 or args.configs < 1:
        parser.error("--seeds, --configs and --workers must be >= 1")
    args.overrides = _overrides(parser, args.set)
    return args


def _overrides(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, _, raw = item.partition("=")
        policy, _, key = target.partition(".")
        if policy not in POLICY_BLOCKS or not key or not raw:
            parser.error(f"--set {item!r}: expected POLICY.KEY=JSON with POLICY one of {sorted(POLICY_BLOCKS)}")
        try:
            overrides.setdefault(policy, {})[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            parser.error(f"--set {item!r}: the value is not JSON ({exc.msg})")
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the replay and print the table; 0 when it ran (whether or not the target was met)."""
    args = parse_args(argv)
    try:
        data = load_learning_curves(args.curves)
        names = list(dict.fromkeys(args.policies))
        for name in names:  # a bad --set fails before any run, naming the key
            policy_factory(name, SearchSpace.parse(MLPF_SPACE), args.overrides)
    except (OSError, ValueError) as exc:
        print(f"replay_hpo: {exc}", file=sys.stderr)
        return 2
    if args.configs > len(data.final):
        print(f"replay_hpo: --configs {args.configs} exceeds the {len(data.final)} curves", file=sys.stderr)
        return 2
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = run_all(data, names, seeds, args.configs, args.workers, args.overrides)
    lines, verdicts = report(results, names, args.margin)
    print(f"HPO replay: {len(data.final)} MLPF curves, {args.configs} configurations per seed, {args.seeds} seeds "
          f"from {args.first_seed}, "
          f"{args.workers} workers, rungs {RUNG_SETTINGS}")
    print("\n".join(lines))
    if args.json:
        comparisons = [asdict(compare(results, n, BASELINE)) for n in names if n != BASELINE and BASELINE in names]
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "runs": [asdict(r) for r in results], "comparisons": comparisons,
                                         "target_met": verdicts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
