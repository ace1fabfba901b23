"""How long one steering call takes on long histories (DESIGN.md §3.3: steering is stateless and
rebuilds its optimiser from the whole history every time).

Times ``propose(space, history, points, method, seed)`` on synthetic MLPF histories and prints a
method × history-size table of median wall-clock seconds, each marked against the targets. The first
call of each method is timed apart: it pays the library imports that a fresh steering process (one per
iDDS call) pays every time.

    python benchmarks/steering_latency.py --sizes 100 1000 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hepopt.space import SearchSpace
from steering_container.api import Observation, propose

try:
    from benchmarks.mlpf_space import MLPF_SPACE
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    from mlpf_space import MLPF_SPACE

#: Seconds one call may take, by history size (the targets of the steering design).
TARGETS_S = {1_000: 1.0, 10_000: 10.0}
#: Libraries whose versions explain the numbers.
LIBRARIES = ("hyperopt", "nevergrad", "numpy", "scipy", "scikit-learn")
#: History size of the warm-up call that pays each method's imports.
WARMUP_SIZE = 30
#: Fraction of a synthetic history still being evaluated (pending) when steering runs.
PENDING_FRACTION = 0.05


def synthetic_loss(point: dict[str, Any]) -> float:
    """A smooth bowl over the MLPF space, lowest near lr 3e-4, 3 and 2 layers, dropout 0.1."""
    return ((math.log10(point["lr"]) + 3.5) ** 2 / 4
            + 4 * (point["dropout"] - 0.1) ** 2
            + 0.1 * (point["num_graph_layers_id"] - 3) ** 2
            + 0.1 * (point["num_graph_layers_reg"] - 2) ** 2
            + 0.05 * (math.log2(point["bin_size"]) - 5) ** 2
            + 0.05 * (math.log2(point["output_dim"]) - 6) ** 2
            + 0.1 * (math.log10(point["weight_decay"]) + 4) ** 2)


def synthetic_history(space: SearchSpace, size: int, seed: int = 0) -> list[Observation]:
    """``size`` random points; the newest ``PENDING_FRACTION`` of them are still pending."""
    rng = random.Random(seed)
    n_done = size - int(size * PENDING_FRACTION)
    points = [space.sample(rng) for _ in range(size)]
    return [Observation(p, synthetic_loss(p)) if i < n_done else Observation(p, None, "pending")
            for i, p in enumerate(points)]


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


def timed(call: Callable[[], Any]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def measure(space: SearchSpace, history: list[Observation], method: str, points: int, repeat: int) -> Timing:
    """Median wall and CPU seconds of ``repeat`` calls (CPU time tells a loaded machine from a slow method)."""
    runs = [timed(lambda seed=seed: propose(space, history, points, method, seed)) for seed in range(repeat)]
    return Timing(statistics.median(r.wall_s for r in runs), statistics.median(r.cpu_s for r in runs))


def verdict(size: int, seconds: float) -> str:
    target = TARGETS_S.get(size)
    if target is None:
        return ""
    return f"ok (<= {target:g} s)" if seconds <= target else f"SLOW (> {target:g} s)"


def machine_info() -> list[str]:
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load}",
        f"python: {platform.python_implementation()} {platform.python_version()}",
        "libraries: " + ", ".join(versions),
    ]


def run(args: argparse.Namespace) -> int:
    """Print the table; the exit status is 1 when --check is given and a target is missed or a method fails."""
    space = SearchSpace.parse(MLPF_SPACE)
    histories = {size: synthetic_history(space, size) for size in args.sizes}
    print("\n".join(machine_info()))
    print(f"propose(): {args.points} points, median of {args.repeat} calls; "
          f"targets: {', '.join(f'<= {t:g} s at {n:,}' for n, t in TARGETS_S.items())}\n")
    header = ["method", "first call"] + [f"N={size:,}" for size in args.sizes]
    rows, errors, missed = [], [], False
    for method in args.methods:
        try:
            row, method_missed = measure_method(space, histories, method, args)
        except Exception as exc:  # a method not installed or not implemented yet gets an error row
            row, method_missed = [method, "ERROR"] + ["-"] * len(histories), True
            errors.append(f"{method}: {type(exc).__name__}: {exc}")
        rows.append(row)
        missed |= method_missed
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("\ncells: median wall seconds (median CPU seconds of this process); "
          "first call: imports not already paid by a method above, and a small history")
    for error in errors:
        print(f"ERROR {error}")
    return 1 if args.check and missed else 0


def measure_method(space: SearchSpace, histories: dict[int, list[Observation]], method: str,
                   args: argparse.Namespace) -> tuple[list[str], bool]:
    """One table row, and whether the method missed a target."""
    first = timed(lambda: propose(space, synthetic_history(space, WARMUP_SIZE), args.points, method, 0))
    row, missed = [method, f"{first.wall_s:.2f} s"], False
    for size, history in histories.items():
        timing = measure(space, history, method, args.points, args.repeat)
        mark = verdict(size, timing.wall_s)
        missed |= mark.startswith("SLOW")
        row.append(f"{timing.wall_s:.3f} s ({timing.cpu_s:.3f}) {mark}".rstrip())
    return row, missed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000], help="history lengths")
    parser.add_argument("--methods", nargs="+", default=["tpe", "anneal", "nevergrad:NGOpt", "random"],
                        help="steering methods, as propose() names them")
    parser.add_argument("--points", type=int, default=10, help="points asked for per call")
    parser.add_argument("--repeat", type=int, default=3, help="calls per cell; the median is shown")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed or a method fails")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
