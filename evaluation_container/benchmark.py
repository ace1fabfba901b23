"""Benchmark mode: train a fixed MLPF configuration and write a HEPscore-style ``result.json`` (DESIGN.md §4).

The layout is exactly the one HEPscore reads::

    {"wl-scores": {"mean_throughput": <training events/s>, "mean_epoch_time": <s>},
     "wl-stats": {"num_epochs", "epoch_times", "train_start", "train_stop", "train_time", "GPU", "CPU",
                  "train_set_size", "batch_size_per_device", "batch_size_total", "steps_per_epoch",
                  "events_per_epoch", "throughput_per_epoch"}}

Throughput is training events divided by the epoch's training time; the first epoch (graph tracing,
allocator warm-up) is left out of both means, so at least two epochs are needed. ``train_start`` and
``train_stop`` are Unix times in seconds, ``train_time`` the wall time of the whole training call
(validation included); ``GPU`` is the number of GPUs used and ``CPU`` the number of CPU cores available
to the process. ``--batch-size`` is per device, as in HEPscore: G GPUs train with G times that batch.

Data: toy events from the generator (cached like the default dataset, so a second run reads the same
bytes), or real Delphes files with ``--data``. The seed is fixed and the trainer runs TensorFlow's
deterministic ops, so two runs on one platform reach the same loss.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation_container.data.format import EVENTS_PER_FILE
from evaluation_container.data.generator import DEFAULT_MAX_ELEMENTS, DEFAULT_MIN_ELEMENTS
from hepopt.errors import SpecError
from hepopt.files import write_json_atomically

#: The reference configuration every benchmark trains (the published scan's middle: 2+2 graph layers).
REFERENCE_MODEL: dict[str, Any] = {"lr": 1e-3, "num_graph_layers_id": 2, "num_graph_layers_reg": 2, "dropout": 0.0,
                                   "bin_size": 64, "output_dim": 128, "weight_decay": 0.0}
#: Epochs the means need: the first one is left out.
MIN_EPOCHS = 2
WARMUP_EPOCHS = 1
#: One event to train on and one to validate.
MIN_EVENTS = 2


@dataclass
class BenchmarkOptions:
    """What ``python -m evaluation_container benchmark`` takes on its command line."""

    epochs: int
    batch_size: int
    events: int
    out: Path
    gpus: int | None = None
    mixed_precision: bool = False
    seed: int = 0
    min_elements: int = DEFAULT_MIN_ELEMENTS
    max_elements: int = DEFAULT_MAX_ELEMENTS
    data: str | None = None
    workdir: Path | None = None
    model: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE_MODEL))


@dataclass
class BenchmarkResult:
    """The report written to ``result.json`` and the training history behind it (for callers who want
    the loss or the padding share, which HEPscore's layout has no place for)."""

    report: dict[str, Any]
    history: list[Any]
    final_val_loss: float


def check_options(options: BenchmarkOptions) -> None:
    """Refuse impossible settings before anything is imported or generated, naming the option."""
    problems = [(name, f"expected an integer ≥ {low}, got {value}") for name, value, low in (
        ("--epochs", options.epochs, MIN_EPOCHS), ("--batch-size", options.batch_size, 1),
        ("--events", options.events, MIN_EVENTS), ("--gpus", 0 if options.gpus is None else options.gpus, 0),
        ("--min-elements", options.min_elements, 1), ("--max-elements", options.max_elements, 1)) if value < low]
    if options.max_elements < options.min_elements:
        problems.append(("--max-elements", f"expected ≥ --min-elements ({options.min_elements})"))
    if problems:
        raise SpecError(problems)


def run_benchmark(options: BenchmarkOptions) -> BenchmarkResult:
    """Train, write ``options.out`` and return the result."""
    check_options(options)
    strategy, gpus = configure_devices(options.gpus)
    from evaluation_container.config import HyperParams
    from evaluation_container.trainer import train

    params = HyperParams(**options.model, epochs=options.epochs, batch_size=options.batch_size * max(gpus, 1))
    files = benchmark_files(options)
    with _workdir(options.workdir) as workdir:
        started = time.time()
        result = train(params, files, workdir, seed=options.seed, max_events=options.events, strategy=strategy,
                       mixed_precision=options.mixed_precision)
        stopped = time.time()
    report = hepscore_report(result.history, started, stopped, gpus, options.batch_size)
    write_report(options.out, report)
    return BenchmarkResult(report, result.history, result.final_val_loss)


def hepscore_report(history: list[Any], started: float, stopped: float, gpus: int,
                    batch_size_per_device: int) -> dict[str, Any]:
    """The HEPscore document for a finished training (first epoch out of the means)."""
    if len(history) < MIN_EPOCHS:
        raise ValueError(f"a benchmark needs at least {MIN_EPOCHS} epochs, got {len(history)}")
    epoch_times = [float(epoch.epoch_time) for epoch in history]
    throughput = [epoch.train_events / epoch.epoch_time for epoch in history]
    last = history[-1]
    return {
        "wl-scores": {"mean_throughput": statistics.fmean(throughput[WARMUP_EPOCHS:]),
                      "mean_epoch_time": statistics.fmean(epoch_times[WARMUP_EPOCHS:])},
        "wl-stats": {"num_epochs": len(history), "epoch_times": epoch_times, "train_start": started,
                     "train_stop": stopped, "train_time": stopped - started, "GPU": gpus, "CPU": cpu_count(),
                     "train_set_size": last.train_events, "batch_size_per_device": batch_size_per_device,
                     "batch_size_total": batch_size_per_device * max(gpus, 1), "steps_per_epoch": last.steps,
                     "events_per_epoch": last.train_events, "throughput_per_epoch": throughput},
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, report, indent=2)


def cpu_count() -> int:
    """Cores this process may use (a batch slot may hold fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_devices(gpus: int | None) -> tuple[Any, int]:
    """Make exactly ``gpus`` GPUs visible (None: all there are) and the strategy that spreads over them:
    MirroredStrategy for two or more, TensorFlow's default placement for one or none (CPU)."""
    import tensorflow as tf

    available = tf.config.list_physical_devices("GPU")
    wanted = len(available) if gpus is None else gpus
    if wanted > len(available):
        raise SpecError([("--gpus", f"asked for {wanted} GPU(s) but {len(available)} are visible")])
    if tf.config.get_visible_devices("GPU") != available[:wanted]:  # fixed once TensorFlow has started
        tf.config.set_visible_devices(available[:wanted], "GPU")
    strategy = tf.distribute.MirroredStrategy() if wanted > 1 else None
    return strategy, wanted


def benchmark_files(options: BenchmarkOptions) -> list[Path]:
    """``--data`` when given, else enough generated toy events (cached by their settings)."""
    from evaluation_container.data import default_dataset, resolve_files

    if options.data:
        return resolve_files(options.data)
    per_file = min(options.events, EVENTS_PER_FILE)
    directory = default_dataset(files=math.ceil(options.events / per_file), events_per_file=per_file,
                                seed=options.seed, min_elements=options.min_elements,
                                max_elements=options.max_elements)
    return resolve_files(directory)


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    """Where the trainer keeps checkpoints: the given directory, else a fresh one removed afterwards (a
    benchmark must never resume an old run)."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="hepopt-benchmark-") as scratch:
        yield Path(scratch)
