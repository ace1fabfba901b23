"""``python -m evaluation_container.data``: generate toy files, check real or toy files, find the default set."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from hepopt.errors import HepoptError

from . import format as fmt
from .cache import default_dataset
from .generator import DEFAULT_MAX_ELEMENTS, DEFAULT_MIN_ELEMENTS, generate_dataset
from .reader import load_dataset

EXIT_BAD_INPUT = 2

GENERATE_HELP = """\
Write toy events in the Zenodo Delphes MLPF format (bz2 pickles of {"X", "ygen", "ycand"}), named
tev14_pythia8_ttbar_<i>_<j>.pkl.bz2 like the real files. Events contain particles of the five classes
with falling pT spectra; charged ones within |eta| < 2.5 become smeared tracks, all but muons deposit
energy in an eta-phi tower grid. ygen holds the true particles, ycand a rule-based reconstruction.
The same seed gives the same bytes."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation_container.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write toy files", description=GENERATE_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--out", required=True, help="output directory (created if needed)")
    gen.add_argument("--files", type=int, default=1, help="number of files (default 1)")
    gen.add_argument("--events-per-file", type=int, default=fmt.EVENTS_PER_FILE,
                     help=f"events per file (default {fmt.EVENTS_PER_FILE}, as in the real files)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--min-elements", type=int, default=DEFAULT_MIN_ELEMENTS,
                     help=f"fewest elements (towers + tracks) per event (default {DEFAULT_MIN_ELEMENTS})")
    gen.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
                     help=f"most elements per event (default {DEFAULT_MAX_ELEMENTS}; real events hold ~5-6k)")
    check = commands.add_parser("check", help="validate files and summarise them",
                                description="Read files (a directory, an input_ds.json, or file paths) and "
                                            "print events, elements and target classes; exit 2 on a bad file.")
    check.add_argument("paths", nargs="+", help="data files, directories or an input_ds.json")
    commands.add_parser("default", help="print the default toy dataset's directory, generating it if absent")
    return parser


def _generate(args: argparse.Namespace) -> None:
    files = generate_dataset(args.out, args.files, args.events_per_file, args.seed, args.min_elements,
                             args.max_elements)
    for path in files:
        print(path)
    print(f"wrote {len(files)} file(s) × {args.events_per_file} events (seed {args.seed}) to {args.out}")


def _check(args: argparse.Namespace) -> None:
    source = args.paths[0] if len(args.paths) == 1 else args.paths
    dataset = load_dataset(source)
    sizes = np.array([len(event) for event in dataset])
    print(f"{len(dataset.files)} file(s), {len(dataset)} events, {sizes.sum()} elements "
          f"(per event {sizes.min()}–{sizes.max()}, mean {sizes.mean():.0f})")
    for target in fmt.TARGET_KEYS:
        counts = dataset.class_counts(target)
        print(f"{target}: " + ", ".join(f"{name} {n}" for name, n in zip(fmt.CLASS_NAMES, counts, strict=True)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "check":
            _check(args)
        else:
            print(default_dataset())
    except HepoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
