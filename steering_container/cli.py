"""``python -m steering_container generate``: the steering command exactly as iDDS runs it.

iDDS substitutes ``%IN``, ``%OUT``, ``%NUM_POINTS`` and ``%MAX_POINTS``, e.g.::

    python -m steering_container generate --infile %IN --outfile %OUT \\
        --n_point %NUM_POINTS --max_point %MAX_POINTS --method tpe

Exit codes: 0 the output was written; 2 the input was refused (nothing written); 1 an internal error
(nothing written). iDDS retries a failed steering run, so failing loudly is always better than
writing a wrong list.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from hepopt.errors import HepoptError, SpecError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2

DESCRIPTION = "Propose new hyperparameter points from an iDDS steering input file."
EPILOG = """\
methods: random, grid, tpe, anneal (hyperopt), nevergrad:<Optimizer> (any nevergrad optimizer name,
e.g. nevergrad:NGOpt, nevergrad:CMA, nevergrad:TwoPointsDE, nevergrad:DiscreteOnePlusOne).

The output holds at most min(N, M - len(points)) new points ([] once the budget is used up); in a
segmented input (opt_space is a list of {model_id, search_space}) N and M apply to each segment.
Points are distinct from each other and from every point of the input whenever the space allows.
exit codes: 0 written, 2 bad input (nothing written), 1 internal error (nothing written)."""


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--infile", required=True, type=Path, help="iDDS input (%%IN): points and opt_space")
    parser.add_argument("--outfile", required=True, type=Path, help="where to write the new points (%%OUT)")
    parser.add_argument("--n_point", required=True, type=int, help="number of points wanted (%%NUM_POINTS)")
    parser.add_argument("--max_point", required=True, type=int, help="total budget of points (%%MAX_POINTS)")
    parser.add_argument("--method", default="tpe", help="point-generation method (default: tpe)")
    parser.add_argument("--seed", type=int, default=None, help="seed: same input and seed give the same output")
    parser.add_argument("--direction", choices=("minimize", "maximize"), default="minimize",
                        help="whether smaller or larger losses are better (default: minimize)")


def build_parser(prog: str = "python -m steering_container") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="hepopt steering container.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help=DESCRIPTION, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(generate)
    return parser


def generate(args: argparse.Namespace) -> int:
    """Run one steering call; returns the exit code."""
    from hepopt.task import read_json
    from steering_container.api import propose
    from steering_container.idds import budget, format_output, parse_input, write_json_atomic
    from steering_container.methods import get_method

    for flag in ("n_point", "max_point"):
        if getattr(args, flag) < 0:
            raise SpecError([(f"--{flag}", f"must be >= 0, got {getattr(args, flag)}")])
    get_method(args.method)  # refuse an unknown method before reading anything
    steering_input = parse_input(read_json(args.infile, what="steering input"))
    results = []
    for segment in steering_input.segments:
        n = budget(args.max_point, args.n_point, len(segment.history))
        points = propose(segment.space, segment.history, n, args.method, args.seed, args.direction)
        results.append((segment.model_id, points))
    write_json_atomic(args.outfile, format_output(results, steering_input.segmented))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Map errors to exit codes and one clear message on stderr."""
    try:
        return generate(args)
    except SpecError as exc:
        where = f"{args.infile}: " if exc.source is None and args.infile else ""
        print(f"steering: error: {where}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except HepoptError as exc:
        print(f"steering: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception:
        traceback.print_exc()
        print("steering: internal error (above); nothing was written", file=sys.stderr)
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
