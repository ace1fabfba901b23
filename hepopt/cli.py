"""The ``hepopt`` command: one entry that dispatches to the components.

Each subcommand lives in the room that owns it and is imported only when used, so ``hepopt --help``
stays fast and a steering image without TensorFlow or FastAPI still runs ``hepopt steer``.
Exit codes: 0 success, 1 internal error, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hepopt import __version__
from hepopt.errors import SpecError

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _validate(args: argparse.Namespace) -> int:
    from hepopt.task import load_task

    task = load_task(args.task)
    space = task.space
    print(f"{args.task}: valid task, {len(space)} hyperparameter(s) "
          f"({', '.join(space.names)}), method {task.hepopt.method}, maxPoints {task.maxPoints}")
    return EXIT_OK


def _export_phpo(args: argparse.Namespace) -> int:
    from hepopt.task import load_task

    text = json.dumps(load_task(args.task).to_phpo(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _steer(args: argparse.Namespace) -> int:
    from steering_container.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hepopt", description="Hyperparameter optimisation for HEP deep learning.",
        epilog="exit codes: 0 success, 1 internal error, 2 bad input, 3 authentication, 4 not found. "
               "Run 'hepopt COMMAND --help' for details.")
    parser.add_argument("--version", action="version", version=f"hepopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", help="check a task JSON without storing anything",
                              description="Validate a task JSON (and its search space); prints a summary "
                              "or every problem with its key path.")
    validate.add_argument("task", help="task JSON file")
    validate.set_defaults(func=_validate)

    export = sub.add_parser("export-phpo", help="write the phpo-only form of a task",
                            description="Drop hepopt's own block so the file can be given to phpo --loadJson.")
    export.add_argument("task", help="task JSON file")
    export.add_argument("-o", "--output", help="output file (default: standard output)")
    export.set_defaults(func=_export_phpo)

    from steering_container.cli import DESCRIPTION, EPILOG, add_generate_arguments

    steer = sub.add_parser("steer", help="propose points from an iDDS steering input (as the steering container)",
                           description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(steer)
    steer.set_defaults(func=_steer)

    from orchestrator.cli import register

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"hepopt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
