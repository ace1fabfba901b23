"""Replay benchmark on the 296 real MLPF learning curves: how well do the predictors forecast final losses?

Data: ``../shared/data/learning_curves/mlpf_delphes_296.csv`` — 296 trainings of MLPF on Delphes ttbar,
7 hyperparameters and the validation loss after each of 100 epochs (see the README.md beside it; source
erwulff/performance-pred, data/mlpf/delphes_trainings_processed.csv, Apache License 2.0, © its authors).

``--part accuracy`` (the seed paper's R² table, DESIGN.md §5). Protocol, exactly:

* The one outlier (final loss 597.3 > ``objectives.OUTLIER_FINAL_LOSS``) is dropped, as in the published studies:
  295 curves remain, in file order.
* Inputs: the 7 hyperparameters as in the file and the losses after epochs 0, 2, …, 24 (every second of
  the first 25 epochs, 13 values); the predictors add first and second differences. Target: the loss
  after the last epoch (``loss_99``).
* Split ``s``: ``perm = numpy.random.default_rng(s).permutation(295)``; the test set is ``perm[:148]``
  (half, rounded up), the training pool ``perm[148:]``. SVR and QSVR train on ``pool[:20]``; the
  ensembles on ``pool[:80]``, which the ensemble cuts into 4 disjoint subsets of 20 with its own seed
  ``s``. A predictor seeded by the split (QSVR annealer, ensemble subsets) gets seed ``s``.
* Score: ``sklearn.metrics.r2_score(y_test, y_pred)`` per split; the table gives best, worst, mean and
  standard deviation (population, ddof 0) over splits ``--first-seed`` … ``--first-seed + N − 1``.

Honesty: every default of the predictors (scaling, ν, C, γ, ε, combination, annealer effort) was chosen
on the tuning splits ``TUNING_SEEDS`` (1000–1099) only; ``--part tune`` reruns those grids. Reported
figures use splits from 0, which tuning never saw. The scan also repeated and resumed trainings (183
distinct hyperparameter rows among 296): as in the published study, repeats may fall on both sides of a
split, which flatters every predictor alike.

Tuning record (mean R² on the tuning splits, 2026-11-22): SVR with quantile scaling of every feature
(DESIGN.md §5) reached at best 0.83; min-max scaling of the curve features clipped to the training range
lifted it to 0.895, and quantile-scaling only the hyperparameters ("mixed") to 0.900 (ν 0.8, C 10,
γ 0.01; the plateau of ν ∈ [0.3, 0.8] lies within 0.003). For QSVR (on 1000–1029) every setting tried
lay between 0.89 and 0.899 except γ = 0.3 (0.83) and B ≥ 1 at γ = 0.1 (0.86–0.88): γ ∈ {0.03, 0.1} ×
ε ∈ {0, 0.02, 0.05}, (K, B) ∈ {(2, 0.5), (3, 0.5), (4, 0.5), (2, 1), (3, 1), (3, 2), (4, 1)},
ξ ∈ {0, 0.01, 0.1, 1}, top-k 3/10/30,
so the published K=3, B=0.5, ε=0.02, ξ=0.01 stay; combining the 10 lowest samples (0.897–0.898)
beat the lowest alone (0.889–0.894), and more annealing effort lowered energies without raising R².
γ was then re-scanned on the extended tuning splits 1000–1099 (mean of the 10 lowest; the published
γ = 0.1 scores 0.892 there): γ 0.03 / 0.04 / 0.05 / 0.07 gave 0.896 / 0.898 / 0.898 / 0.897 at ε = 0.01, and
at γ = 0.05 ε 0.005 / 0.01 / 0.02 gave 0.898 / 0.898 / 0.898, K = 4 0.898 and 100 / 200 / 1000 sweeps
0.897 / 0.898 / 0.898, so γ = 0.05 is the default; the 4×20 ensembles moved by less than their noise
(mean 0.924 → 0.923, weighted 0.925 → 0.924 on 1000–1029).
Tried and dropped for both: log target, best-so-far curves, smoothed curves, fewer or more epochs, and
predicting the remaining drop (final − last observed loss): that fell to 0.69, because a loss spike at
the last observed epoch moves the prediction by the spike's height.

Published (20 training curves, test on ~150): SVR mean 0.889 (std 0.050, worst 0.318); simulated-
annealing QSVR mean 0.901; QSVR ensemble mean 0.899 (std 0.019, worst 0.857). Target here: mean ≥ 0.90
for every predictor and ensemble std ≤ 0.02.

``--part hpo`` runs the HPO replay of ``benchmarks/replay_hpo.py`` (early-stopping policies); arguments this
script does not know are passed on to it. ``--part all`` runs both.

    python benchmarks/replay_mlpf_curves.py                       # accuracy: 100 splits, 10 ensemble splits
    python benchmarks/replay_mlpf_curves.py --part all --seeds 5  # --seeds goes to replay_hpo
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import r2_score

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPOSITORY))

from benchmarks.objectives import CURVES_PATH, read_curve_rows  # noqa: E402
from steering_container.prediction import CurvePredictor, make_predictor  # noqa: E402

HPARAM_COLUMNS = ("bin_size", "dropout", "lr", "n_glayers_id", "n_glayers_reg", "output_dim", "weight_decay")
#: Every second of the first 25 of 100 epochs (DESIGN.md §5).
OBSERVED_EPOCHS = tuple(range(0, 25, 2))
TARGET_COLUMN = "loss_99"
#: Share of the kept curves held out for testing (rounded up: 148 of 295).
TEST_FRACTION = 0.5
TRAINING_CURVES = 20
ENSEMBLE_MEMBERS = 4
DEFAULT_SPLITS = 100
DEFAULT_ENSEMBLE_SPLITS = 10
#: Splits the defaults were tuned on; reports start at 0 and must not overlap them.
TUNING_SEEDS = range(1000, 1100)
TARGET_MEAN = 0.90
TARGET_ENSEMBLE_STD = 0.02


@dataclass(frozen=True)
class Curves:
    hparams: np.ndarray
    observed: np.ndarray
    final: np.ndarray
    dropped: int


@dataclass(frozen=True)
class Entry:
    """One row of the table: a predictor, how many training curves it gets, and its published figures."""

    key: str
    label: str
    training: int
    ensemble: bool
    build: Callable[[int], CurvePredictor]
    published: str


@dataclass(frozen=True)
class Summary:
    key: str
    label: str
    training: int
    splits: int
    best: float
    worst: float
    mean: float
    std: float
    seconds_per_split: float
    published: str
    target_met: bool


def _builder(name: str, options: dict[str, Any]) -> Callable[[int], CurvePredictor]:
    """Predictor ``name`` with ``options``, seeded by the split where it takes a seed."""
    seeded = name != "svr"
    return lambda seed: make_predictor(name, **options, **({"seed": seed} if seeded else {}))


ENSEMBLE = {"n_models": ENSEMBLE_MEMBERS}
ENTRIES = (
    Entry("svr", "ν-SVR", TRAINING_CURVES, False, _builder("svr", {}), "0.889 ± 0.050, worst 0.318"),
    Entry("qsvr", "QSVR, simulated annealing", TRAINING_CURVES, False, _builder("qsvr", {}), "0.901"),
    Entry("qsvr-ensemble", f"QSVR ensemble {ENSEMBLE_MEMBERS}×{TRAINING_CURVES}, mean",
          ENSEMBLE_MEMBERS * TRAINING_CURVES, True, _builder("qsvr-ensemble", ENSEMBLE), "0.899 ± 0.019, worst 0.857"),
    Entry("qsvr-ensemble-weighted", f"QSVR ensemble {ENSEMBLE_MEMBERS}×{TRAINING_CURVES}, weighted",
          ENSEMBLE_MEMBERS * TRAINING_CURVES, True, _builder("qsvr-ensemble", {**ENSEMBLE, "weighting": "weighted"}),
          "—"),
)


# --- data and splits --------------------------------------------------------------------------------
def load_curves(path: Path = CURVES_PATH) -> Curves:
    """The CSV without its outlier; FileNotFoundError / ValueError naming the file and what is wrong."""
    needed = [*HPARAM_COLUMNS, *(f"loss_{e}" for e in OBSERVED_EPOCHS)]
    kept, dropped = read_curve_rows(path, needed, "the benchmark")
    return Curves(np.array([[float(r[c]) for c in HPARAM_COLUMNS] for r in kept]),
                  np.array([[float(r[f"loss_{e}"]) for e in OBSERVED_EPOCHS] for r in kept]),
                  np.array([float(r[TARGET_COLUMN]) for r in kept]), dropped)


def split(n_curves: int, seed: int, training: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, test rows) of split ``seed``, as the module docstring defines them."""
    order = np.random.default_rng(seed).permutation(n_curves)
    n_test = int(np.ceil(TEST_FRACTION * n_curves))
    pool = order[n_test:]
    if training > pool.size:
        raise ValueError(f"{training} training curves asked for, the pool holds {pool.size}")
    return pool[:training], order[:n_test]


def split_r2(entry: Entry, data: Curves, seed: int) -> float:
    train, test = split(data.final.size, seed, entry.training)
    model = entry.build(seed).fit(data.hparams[train], data.observed[train], data.final[train])
    return float(r2_score(data.final[test], model.predict(data.hparams[test], data.observed[test])))


def evaluate(entry: Entry, data: Curves, seeds: Sequence[int]) -> Summary:
    start = time.perf_counter()
    scores = np.array([split_r2(entry, data, seed) for seed in seeds])
    mean, std = float(scores.mean()), float(scores.std())
    met = mean >= TARGET_MEAN and (not entry.ensemble or std <= TARGET_ENSEMBLE_STD)
    return Summary(entry.key, entry.label, entry.training, len(seeds), float(scores.max()), float(scores.min()),
                   mean, std, (time.perf_counter() - start) / len(seeds), entry.published, met)


# --- output -----------------------------------------------------------------------------------------
def table(summaries: Iterable[Summary]) -> list[str]:
    lines = ["| predictor | training curves | splits | best | worst | mean | std | s/split | published | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        verdict = "met" if s.target_met else "NOT MET"
        lines.append(f"| {s.label} | {s.training} | {s.splits} | {s.best:.3f} | {s.worst:.3f} | {s.mean:.3f} | "
                     f"{s.std:.3f} | {s.seconds_per_split:.2f} | {s.published} | {verdict} |")
    return lines


def run_accuracy(args: argparse.Namespace) -> int:
    data = load_curves(args.curves)
    splits = range(args.first_seed, args.first_seed + args.splits)
    ensemble_splits = range(args.first_seed, args.first_seed + args.ensemble_splits)
    if set(itertools.chain(splits, ensemble_splits)) & set(TUNING_SEEDS) and not args.allow_tuning_seeds:
        print(f"replay_mlpf_curves: splits overlap the tuning splits {TUNING_SEEDS.start}-{TUNING_SEEDS.stop - 1}; "
              "pass --allow-tuning-seeds to report them anyway", file=sys.stderr)
        return 2
    entries = [e for e in ENTRIES if e.key in args.predictors]
    summaries = [evaluate(e, data, ensemble_splits if e.ensemble else splits) for e in entries]
    print(f"Performance prediction on {data.final.size} MLPF curves ({data.dropped} outlier dropped): inputs epochs "
          f"0,2,…,24 of 100, target {TARGET_COLUMN}, test {int(np.ceil(TEST_FRACTION * data.final.size))} curves, "
          f"splits from seed {args.first_seed}; R² = sklearn r2_score")
    print("\n".join(table(summaries)))
    print(f"target: mean >= {TARGET_MEAN} for every predictor, ensemble std <= {TARGET_ENSEMBLE_STD}: "
          f"{'MET' if all(s.target_met for s in summaries) else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "summaries": [asdict(s) for s in summaries]}, indent=1))
    return 0


# --- tuning -----------------------------------------------------------------------------------------
#: The grids the defaults were picked from (best mean R² on TUNING_SEEDS); one axis at a time for QSVR.
TUNING_GRIDS: dict[str, list[dict[str, Any]]] = {
    "svr": [{"feature_scaling": s, "nu": nu, "C": c, "gamma": g}
            for s in ("mixed", "quantile", "minmax") for nu in (0.3, 0.5, 0.8) for c in (1.0, 3.0, 10.0)
            for g in (0.01, 0.03, 0.1)],
    "qsvr": [*({"gamma": g, "epsilon": e} for g in (0.03, 0.04, 0.05, 0.07, 0.1) for e in (0.005, 0.01, 0.02)),
             *({"combine": c} for c in ("lowest", "mean", "weighted")),
             *({"feature_scaling": s} for s in ("mixed", "quantile", "minmax"))],
}


def run_tuning(args: argparse.Namespace) -> int:
    data = load_curves(args.curves)
    seeds = list(TUNING_SEEDS)[: args.tuning_splits]
    for name, grid in TUNING_GRIDS.items():
        if name not in args.predictors:
            continue
        print(f"tuning {name} on splits {seeds[0]}-{seeds[-1]}: mean / std / worst R²")
        for options in grid:
            entry = Entry(name, name, TRAINING_CURVES, False, _builder(name, options), "")
            s = evaluate(entry, data, seeds)
            print(f"  {json.dumps(options):<70} {s.mean:.3f} {s.std:.3f} {s.worst:.3f}", flush=True)
    return 0


# --- HPO replay (the other half of the benchmark) ---------------------------------------------------
def run_hpo(argv: Sequence[str]) -> int:
    try:
        replay_hpo = importlib.import_module("benchmarks.replay_hpo")
    except ModuleNotFoundError as exc:
        print(f"replay_mlpf_curves: --part hpo needs benchmarks/replay_hpo.py ({exc}); it is the early-stopping "
              "replay of the stopping policies", file=sys.stderr)
        return 2
    return int(replay_hpo.main(list(argv)))


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("accuracy", "hpo", "all", "tune"), default="accuracy")
    parser.add_argument("--splits", type=int, default=DEFAULT_SPLITS,
                        help="random splits for SVR and QSVR (default %(default)s)")
    parser.add_argument("--ensemble-splits", type=int, default=DEFAULT_ENSEMBLE_SPLITS,
                        help="random splits for the ensembles (default %(default)s)")
    parser.add_argument("--first-seed", type=int, default=0, help="first split seed (default %(default)s)")
    parser.add_argument("--predictors", nargs="+", default=[e.key for e in ENTRIES], choices=[e.key for e in ENTRIES])
    parser.add_argument("--tuning-splits", type=int, default=len(TUNING_SEEDS),
                        help="--part tune: how many of the tuning splits to use (default %(default)s)")
    parser.add_argument("--allow-tuning-seeds", action="store_true", help="report on splits the defaults were tuned on")
    parser.add_argument("--curves", type=Path, default=CURVES_PATH, help="the learning-curve CSV")
    parser.add_argument("--json", type=Path, help="also write the accuracy summaries here")
    args, rest = parser.parse_known_args(argv)
    if args.part in ("accuracy", "tune") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (only --part hpo/all passes arguments on)")
    if min(args.splits, args.ensemble_splits, args.tuning_splits) < 1:
        parser.error("--splits, --ensemble-splits and --tuning-splits must be >= 1")
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    try:
        if args.part == "tune":
            return run_tuning(args)
        status = run_accuracy(args) if args.part in ("accuracy", "all") else 0
    except (OSError, ValueError) as exc:
        print(f"replay_mlpf_curves: {exc}", file=sys.stderr)
        return 2
    if args.part in ("hpo", "all") and status == 0:
        status = run_hpo(rest)
    return status


if __name__ == "__main__":
    sys.exit(main())
