"""``python -m evaluation_container``: the evaluation container's entry point.

``run`` is the runHPO payload (PanDA/iDDS and ``hepopt worker`` start it in a working directory);
``benchmark`` is the HEPscore mode. TensorFlow is imported only once the inputs have been checked, so a
bad ``input.json`` fails in about a second instead of after TensorFlow's start-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hepopt.errors import SpecError

EXIT_BAD_INPUT = 2

RUN_HELP = """\
Train MLPF on the point in INPUT (default input.json) with the training files listed in INPUT_DS
(default input_ds.json; absent or [] means the default toy dataset) and write OUTPUT (default
output.json): {"status", "loss", "message"}, plus "pruned": true when hepopt stopped the point early.
Status and exit code: 0 success, 1 training failed, 2 bad input, 75 preempted by SIGTERM (checkpoint
written under checkpoints/, a rerun resumes). MLflow logs go to ./mlruns."""

BENCHMARK_HELP = """\
Train the reference MLPF configuration (2+2 graph layers, output_dim 128, bin_size 64) and write a
HEPscore result.json: mean training throughput (events/s) and epoch time, first epoch left out."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation_container", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run(commands.add_parser("run", help="evaluate one point (the runHPO payload)", description=RUN_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    _add_benchmark(commands.add_parser("benchmark", help="HEPscore benchmark: write result.json",
                                       description=BENCHMARK_HELP))
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("--workdir", type=Path, default=Path.cwd(), help="working directory (default: current)")
    run.add_argument("--input", default="input.json", help="the task's evaluationInput (default input.json)")
    run.add_argument("--input-ds", default="input_ds.json",
                     help="the task's evaluationTrainingData (default input_ds.json)")
    run.add_argument("--output", default="output.json", help="the task's evaluationOutput (default output.json)")
    run.add_argument("--metrics", default=None,
                     help="tar ./mlruns into this file (the task's evaluationMetrics; default: "
                          "$HEPOPT_EVALUATION_METRICS, else no tarball)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument("--max-events", type=int, default=None, help="read at most this many events (default: all)")


def _add_benchmark(bench: argparse.ArgumentParser) -> None:
    from evaluation_container.benchmark import DEFAULT_MAX_ELEMENTS, DEFAULT_MIN_ELEMENTS, MIN_EPOCHS

    bench.add_argument("--epochs", type=int, required=True, help=f"epochs (≥ {MIN_EPOCHS}: the first is warm-up)")
    bench.add_argument("--batch-size", type=int, required=True, help="events per step and device")
    bench.add_argument("--events", type=int, required=True, help="events to read (20%% of them validate)")
    bench.add_argument("--gpus", type=int, default=None,
                       help="GPUs to use (MirroredStrategy for ≥ 2; 0: CPU only; default: all visible)")
    bench.add_argument("--mixed-precision", action="store_true",
                       help="mixed precision (float16 on GPUs, bfloat16 on CPUs)")
    bench.add_argument("--out", type=Path, default=Path("result.json"), help="report file (default result.json)")
    bench.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    bench.add_argument("--data", default=None,
                       help="real Delphes files (a directory, an input_ds.json or a file) instead of toy events")
    bench.add_argument("--min-elements", type=int, default=DEFAULT_MIN_ELEMENTS,
                       help=f"fewest elements per toy event (default {DEFAULT_MIN_ELEMENTS})")
    bench.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
                       help=f"most elements per toy event (default {DEFAULT_MAX_ELEMENTS}; real events ~5-6k)")
    bench.add_argument("--workdir", type=Path, default=None,
                       help="keep the checkpoints here (default: a temporary directory; one holding a "
                            "checkpoint would be resumed)")


def _run(args: argparse.Namespace) -> int:
    from evaluation_container.runner import RunOptions, run_hpo

    return run_hpo(RunOptions(workdir=args.workdir, input_name=args.input, input_ds_name=args.input_ds,
                              output_name=args.output, metrics_tarball=args.metrics, seed=args.seed,
                              max_events=args.max_events))


def _benchmark(args: argparse.Namespace) -> int:
    from evaluation_container.benchmark import BenchmarkOptions, run_benchmark

    options = BenchmarkOptions(epochs=args.epochs, batch_size=args.batch_size, events=args.events, out=args.out,
                               gpus=args.gpus, mixed_precision=args.mixed_precision, seed=args.seed,
                               min_elements=args.min_elements, max_elements=args.max_elements, data=args.data,
                               workdir=args.workdir)
    result = run_benchmark(options)
    scores = result.report["wl-scores"]
    print(f"{args.out}: mean throughput {scores['mean_throughput']:.3g} events/s, mean epoch time "
          f"{scores['mean_epoch_time']:.3g} s, final validation loss {result.final_val_loss:.6g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args) if args.command == "run" else _benchmark(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
