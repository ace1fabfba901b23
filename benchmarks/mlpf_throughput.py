"""MLPF training throughput: events/s, peak memory and the share of padded elements for a fixed setup.

The setup is the evaluation container's benchmark reference (``evaluation_container.benchmark``:
2+2 graph layers, output_dim 128, bin_size 64) on toy events of about 2,000 elements (real events hold
~5-6k; 2k keeps a CPU run to minutes). It runs the same code path as
``python -m evaluation_container benchmark`` and prints:

* training events/s and epoch time, means over the epochs after the first (graph tracing is left out);
* peak resident memory of the process (CPU) and, on a GPU, TensorFlow's peak device memory;
* padded elements as a share of all elements the model processed (events are padded to a multiple of
  ``bin_size`` and to the batch's largest event), i.e. how much compute the padding wastes.

    python benchmarks/mlpf_throughput.py                          # CPU, a few minutes on 2 cores
    python benchmarks/mlpf_throughput.py --events 64 --epochs 4   # steadier figures
    python benchmarks/mlpf_throughput.py --gpus 1 --mixed-precision --events 2000 --batch-size 16
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from evaluation_container.benchmark import (
    REFERENCE_MODEL,
    WARMUP_EPOCHS,
    BenchmarkOptions,
    BenchmarkResult,
    cpu_count,
    run_benchmark,
)

#: Element counts of the toy events: about 2,000 per event.
MIN_ELEMENTS = 1800
MAX_ELEMENTS = 2200
DEFAULT_EVENTS = 24
DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 4
KIB_PER_GIB = 1024 ** 2
BYTES_PER_GIB = 1024 ** 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                        help=f"events read (20%% validate; default {DEFAULT_EVENTS})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"events per step and device (default {DEFAULT_BATCH})")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs (default 0: CPU)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="mixed precision (float16 on GPUs, bfloat16 on CPUs)")
    parser.add_argument("--min-elements", type=int, default=MIN_ELEMENTS, help=f"default {MIN_ELEMENTS}")
    parser.add_argument("--max-elements", type=int, default=MAX_ELEMENTS, help=f"default {MAX_ELEMENTS}")
    parser.add_argument("--out", type=Path, default=Path("mlpf_throughput_result.json"),
                        help="where the HEPscore result.json goes (default mlpf_throughput_result.json)")
    return parser.parse_args(argv)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_GIB


def peak_gpu_gib(gpus: int) -> float | None:
    if gpus == 0:
        return None
    import tensorflow as tf

    return max(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"] for i in range(gpus)) / BYTES_PER_GIB


def report(args: argparse.Namespace, result: BenchmarkResult, wall_s: float, baseline_gib: float) -> None:
    scores, stats = result.report["wl-scores"], result.report["wl-stats"]
    padded = statistics.fmean(epoch.padded_fraction for epoch in result.history[WARMUP_EPOCHS:])
    device = f"{stats['GPU']} GPU(s)" if stats["GPU"] else f"CPU only, {stats['CPU']} core(s)"
    print(f"MLPF training throughput, {datetime.date.today()}, {platform.node()} ({device})")
    print(f"  model: {REFERENCE_MODEL}, mixed precision {'on' if args.mixed_precision else 'off'}")
    print(f"  data: {stats['train_set_size']} training events of {args.min_elements}-{args.max_elements} "
          f"elements, batch {stats['batch_size_total']}, {stats['steps_per_epoch']} steps per epoch")
    print(f"  epoch times (s): {', '.join(f'{t:.1f}' for t in stats['epoch_times'])}")
    print(f"  throughput: {scores['mean_throughput']:.3g} events/s (mean over epochs 2..{stats['num_epochs']}), "
          f"epoch time {scores['mean_epoch_time']:.1f} s")
    print(f"  peak RSS: {peak_rss_gib():.2f} GiB (after importing TensorFlow: {baseline_gib:.2f} GiB)")
    gpu_peak = peak_gpu_gib(stats["GPU"])
    if gpu_peak is not None:
        print(f"  peak GPU memory: {gpu_peak:.2f} GiB")
    print(f"  padded elements: {padded:.1%} of the elements processed")
    print(f"  final validation loss: {result.final_val_loss:.6g}; whole run {wall_s:.0f} s; report in {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow  # noqa: F401 - imported first so the baseline memory includes it

    baseline = peak_rss_gib()
    options = BenchmarkOptions(epochs=args.epochs, batch_size=args.batch_size, events=args.events, out=args.out,
                               gpus=args.gpus, mixed_precision=args.mixed_precision,
                               min_elements=args.min_elements, max_elements=args.max_elements)
    print(f"training {args.epochs} epochs on {args.events} toy events, {cpu_count()} CPU core(s) ...", flush=True)
    started = time.monotonic()
    result = run_benchmark(options)
    report(args, result, time.monotonic() - started, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
