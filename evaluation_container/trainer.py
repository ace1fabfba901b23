"""MLPF training with checkpoint/resume and preemption (DESIGN.md §3.4, §4).

Grid jobs get killed: by the batch system at the walltime (SIGTERM, then SIGKILL), by pilots, by
nodes going away. So everything that decides the outcome of training is either in the checkpoint
or a pure function of what is in it:

* weights and optimizer state (including its step counter) are saved after every epoch, and also
  mid-epoch when SIGTERM arrives; the file is written to a temporary name, fsynced and renamed, so a
  SIGKILL at any moment leaves either the old or the new checkpoint, never half of one;
* the batch order of epoch e is drawn from RNG(seed, e) and dropout masks from (seed, step), so no
  RNG state needs saving and a resumed run replays the same batches and masks: it ends with the
  same weights as a run that was never interrupted (with op determinism on, bit for bit on CPU);
* the history of finished epochs travels with the checkpoint, so a resumed run reports all of it.

``python -m evaluation_container.trainer`` runs one training from the command line; it is the
internal entry used by the preemption tests and for drills, the user-facing CLI is
``python -m evaluation_container``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hepopt.errors import HepoptError
from hepopt.files import atomic_writer

from .config import HyperParams, load_hyperparams
from .data.reader import iter_events, resolve_files

if TYPE_CHECKING:
    import tensorflow as tf

    from .pipeline import EventTable

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which is what a preempted job should do
EXIT_TRAINING_FAILED = 1
EXIT_BAD_INPUT = 2
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "state.npz"
CHECKPOINT_FORMAT = 1
LR_DECAY_PER_EPOCH = 0.95  # exponential decay: the learning rate shrinks by this factor every epoch
RESUME_INSENSITIVE = ("epochs",)  # a checkpoint may be continued with more (or fewer) epochs


class TrainingError(Exception):
    """Training cannot go on: a non-finite loss, out of memory, too few events, a foreign checkpoint."""


class Preempted(Exception):
    """SIGTERM was honoured: the checkpoint is written, the process should exit with EXIT_PREEMPTED."""


@dataclass
class EpochResult:
    """What one epoch produced; losses and physics figures are on the validation set unless named train."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    head_losses: dict[str, float] = field(default_factory=dict)
    physics: dict[str, float] = field(default_factory=dict)
    epoch_time: float = 0.0  # seconds of training (data + steps), without validation and checkpointing
    train_events: int = 0
    steps: int = 0
    padded_fraction: float = 0.0


@dataclass
class TrainResult:
    history: list[EpochResult]
    final_val_loss: float
    stopped_early: bool
    resumed_from_epoch: int


@dataclass
class _Progress:
    """Where training stands: what a checkpoint records besides the tensors."""

    epochs_done: int = 0
    step_in_epoch: int = 0
    loss_sum: float = 0.0  # of the steps already done in the current epoch
    time_spent: float = 0.0  # training seconds already spent in the current epoch
    history: list[EpochResult] = field(default_factory=list)
    resumed_from_epoch: int = 0


def train(params: HyperParams, files: Sequence[Path], workdir: Path, *, seed: int = 0,
          on_epoch_end: Callable[[EpochResult], bool] | None = None, max_events: int | None = None,
          val_fraction: float = 0.2, strategy: tf.distribute.Strategy | None = None,
          mixed_precision: bool = False) -> TrainResult:
    """Train (or resume training) in ``workdir``; ``on_epoch_end`` returning True stops early (pruned).

    Raises TrainingError when training fails, Preempted after SIGTERM (checkpoint written), and
    DataError/SpecError for unreadable data.
    """
    store = CheckpointStore(Path(workdir) / CHECKPOINT_DIR)
    identity = _identity(params, seed)
    checkpoint = store.load()
    if checkpoint is not None:
        _check_identity(store.path, checkpoint[0], identity)
        finished = _finished_result(checkpoint[0], params.epochs)
        if finished is not None:
            return finished
    train_table, val_table = _load_tables(files, max_events, val_fraction)
    if checkpoint is not None:
        _check_data(store.path, checkpoint[0], _data_fingerprint(train_table, val_table))
    session = _Session(params, seed, train_table, val_table, strategy, mixed_precision)
    progress = _Progress() if checkpoint is None else session.restore(store.path, *checkpoint)
    with _sigterm_flag() as stop:
        return session.run(store, identity, progress, stop, on_epoch_end)


def _identity(params: HyperParams, seed: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every hyperparameter except the epoch budget, and the seed."""
    settings = {k: v for k, v in params.to_json().items() if k not in RESUME_INSENSITIVE}
    return {"params": settings, "seed": seed}


def _finished_result(meta: dict[str, Any], epochs: int) -> TrainResult | None:
    """The result of a training that a checkpoint shows complete, without loading data or TensorFlow."""
    if meta["epochs_done"] < epochs or meta["step_in_epoch"]:
        return None
    history = [EpochResult(**entry) for entry in meta["history"]]
    return TrainResult(history=history, final_val_loss=history[-1].val_loss, stopped_early=False,
                       resumed_from_epoch=meta["epochs_done"])


def _check_identity(path: Path, meta: dict[str, Any], identity: dict[str, Any]) -> None:
    for key, expected in identity.items():
        if meta.get(key) != expected:
            raise TrainingError(f"{path} was written with {key} {meta.get(key)!r}, this training uses "
                                f"{expected!r}; remove the checkpoint or use another working directory")


def _data_fingerprint(train_table: EventTable, val_table: EventTable) -> list[list[int]]:
    return [train_table.fingerprint(), val_table.fingerprint()]


def _check_data(path: Path, meta: dict[str, Any], fingerprint: list[list[int]]) -> None:
    if meta["data"] != fingerprint:
        raise TrainingError(f"{path} was written for other data ([events, elements] of training and validation: "
                            f"{meta['data']}, now {fingerprint}); remove it or use another working directory")


def _load_tables(files: Sequence[Path], max_events: int | None, val_fraction: float,
                 ) -> tuple[EventTable, EventTable]:
    from .pipeline import EventTable, split_train_val

    if max_events is not None and max_events < 2:
        raise TrainingError(f"max_events={max_events}: need at least 2 events (training and validation)")
    events = list(islice(iter_events(resolve_files(list(files))), max_events))
    try:
        return split_train_val(EventTable.from_events(events), val_fraction)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc


class _Session:
    """Model, optimizer, compiled steps and data of one training run."""

    def __init__(self, params: HyperParams, seed: int, train_table: EventTable, val_table: EventTable,
                 strategy: tf.distribute.Strategy | None, mixed_precision: bool):
        import tensorflow as tf

        from .pipeline import BatchSource, plan_batches

        self.tf = tf
        self.params = params
        self.seed = seed
        self.strategy = strategy or tf.distribute.get_strategy()
        self.train_source = BatchSource(train_table, params.bin_size)
        self.val_source = BatchSource(val_table, params.bin_size)
        self.val_batches = plan_batches(val_table.sizes, params.batch_size)
        self.steps_per_epoch = math.ceil(len(train_table) / params.batch_size)
        compiled = _compiled(params, seed, self.steps_per_epoch, mixed_precision, strategy)
        self.model, self.optimizer = compiled.model, compiled.optimizer
        self.train_step, self.eval_step = compiled.train_step, compiled.eval_step

    def restore(self, path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> _Progress:
        """Weights, optimizer state and progress from a checkpoint already checked against this training."""
        _assign(path, "model", self.model.weights, arrays)
        _assign(path, "optimizer", self.optimizer.variables, arrays)
        log.info("resuming from %s: %d epoch(s) done, step %d", path, meta["epochs_done"], meta["step_in_epoch"])
        return _Progress(epochs_done=meta["epochs_done"], step_in_epoch=meta["step_in_epoch"],
                         loss_sum=meta["loss_sum"], time_spent=meta["time_spent"],
                         history=[EpochResult(**entry) for entry in meta["history"]],
                         resumed_from_epoch=meta["epochs_done"])

    def save(self, store: CheckpointStore, identity: dict[str, Any], progress: _Progress) -> None:
        meta = {"format": CHECKPOINT_FORMAT, **identity,
                "data": _data_fingerprint(self.train_source.table, self.val_source.table),
                "rng": "stateless: batch order from (seed, epoch), dropout from (seed, optimizer step)",
                "epochs_done": progress.epochs_done, "step_in_epoch": progress.step_in_epoch,
                "loss_sum": progress.loss_sum, "time_spent": progress.time_spent,
                "history": [asdict(entry) for entry in progress.history]}
        store.save(meta, {"model": self.model.weights, "optimizer": self.optimizer.variables})

    def run(self, store: CheckpointStore, identity: dict[str, Any], progress: _Progress, stop: threading.Event,
            on_epoch_end: Callable[[EpochResult], bool] | None) -> TrainResult:
        stopped_early = False
        try:
            for epoch in range(progress.epochs_done + 1, self.params.epochs + 1):
                result = self._epoch(epoch, store, identity, progress, stop)
                progress.history.append(result)
                progress.epochs_done, progress.step_in_epoch = epoch, 0
                progress.loss_sum = progress.time_spent = 0.0
                self.save(store, identity, progress)
                if stop.is_set() and epoch < self.params.epochs:  # a finished training just returns
                    raise Preempted(f"SIGTERM after epoch {epoch}; checkpoint in {store.path}")
                if on_epoch_end is not None and on_epoch_end(result):
                    stopped_early = True
                    break
        except self.tf.errors.ResourceExhaustedError as exc:
            raise TrainingError(f"out of memory ({exc.message.splitlines()[0]}); lower batch_size, "
                                "bin_size or output_dim") from exc
        history = progress.history
        return TrainResult(history=history, final_val_loss=history[-1].val_loss, stopped_early=stopped_early,
                           resumed_from_epoch=progress.resumed_from_epoch)

    def _epoch(self, epoch: int, store: CheckpointStore, identity: dict[str, Any], progress: _Progress,
               stop: threading.Event) -> EpochResult:
        from .pipeline import epoch_rng, padded_fraction, plan_batches

        sizes = self.train_source.table.sizes
        plan = plan_batches(sizes, self.params.batch_size, epoch_rng(self.seed, epoch))
        started = time.perf_counter()
        for x, y, mask in self._distribute(self.train_source.dataset(plan[progress.step_in_epoch:])):
            loss = float(self.train_step(x, y, mask))
            if not math.isfinite(loss):
                raise TrainingError(f"training loss is {loss} at epoch {epoch}, step {progress.step_in_epoch + 1}; "
                                    f"lr={self.params.lr} is probably too high")
            progress.loss_sum += loss
            progress.step_in_epoch += 1
            if stop.is_set():
                progress.time_spent += time.perf_counter() - started
                self.save(store, identity, progress)
                raise Preempted(f"SIGTERM at epoch {epoch}, step {progress.step_in_epoch}; "
                                f"checkpoint in {store.path}")
        epoch_time = progress.time_spent + time.perf_counter() - started
        val_loss, head_losses, physics = self._validate()
        result = EpochResult(epoch=epoch, train_loss=progress.loss_sum / max(progress.step_in_epoch, 1),
                             val_loss=val_loss, head_losses=head_losses, physics=physics, epoch_time=epoch_time,
                             train_events=len(sizes), steps=len(plan),
                             padded_fraction=padded_fraction(sizes, plan, self.params.bin_size))
        log.info("epoch %d: train %.4f, val %.4f, %.1f s, padding %.1f %%", epoch, result.train_loss,
                 result.val_loss, epoch_time, 100 * result.padded_fraction)
        return result

    def _distribute(self, dataset: tf.data.Dataset) -> Iterator:
        if self.strategy.num_replicas_in_sync == 1:
            return iter(dataset)
        return iter(self.strategy.experimental_distribute_dataset(dataset))

    def _validate(self) -> tuple[float, dict[str, float], dict[str, float]]:
        from .losses import HEAD_NAMES, weighted_total
        from .physics import PhysicsAccumulator

        totals = {name: np.zeros(2) for name in HEAD_NAMES}
        physics = PhysicsAccumulator()
        for x, y, mask in self.val_source.dataset(self.val_batches):
            sums, predicted = self.eval_step(x, y, mask)
            for name in HEAD_NAMES:
                totals[name] += sums[name].numpy()
            physics.add(y.numpy(), mask.numpy(), **{k: v.numpy() for k, v in predicted.items()})
        head_losses = {name: float(s[0] / max(s[1], 1.0)) for name, s in totals.items()}
        val_loss = float(weighted_total(head_losses))
        if not math.isfinite(val_loss):
            raise TrainingError(f"validation loss is {val_loss}; lr={self.params.lr} is probably too high")
        return val_loss, head_losses, physics.result()


@dataclass
class _Compiled:
    """A model with its optimizer and traced steps, plus the freshly initialised values of both."""

    key: tuple | None
    model: Any
    optimizer: Any
    train_step: Callable
    eval_step: Callable
    initial: list[np.ndarray]

    @property
    def variables(self) -> list[Any]:
        return [*self.model.weights, *self.optimizer.variables]

    def reset(self) -> None:
        for variable, value in zip(self.variables, self.initial, strict=True):
            variable.assign(value)


_cache: list[_Compiled] = []  # the last compiled model: tracing costs far more than a small training


def _compiled(params: HyperParams, seed: int, steps_per_epoch: int, mixed_precision: bool,
              strategy: tf.distribute.Strategy | None) -> _Compiled:
    """A freshly initialised model and optimizer with traced steps; reuses the previous trace when possible.

    Tracing the training step takes seconds (more than a small training itself), and a worker process
    or a test suite trains the same architecture again and again. The reused model is reset to the
    values it had right after initialisation with this seed, which is what a new one would have.
    Models under an explicit distribution strategy are not cached.
    """
    import tensorflow as tf

    from .model import build_model

    tf.config.experimental.enable_op_determinism()
    key = None if strategy is not None else (tuple(sorted(_identity(params, seed)["params"].items())), seed,
                                            steps_per_epoch, mixed_precision)
    if key is not None and _cache and _cache[0].key == key:
        _cache[0].reset()
        return _cache[0]
    strategy = strategy or tf.distribute.get_strategy()
    policy = _precision_policy(tf) if mixed_precision else None
    with strategy.scope():
        model = build_model(params, seed, dtype=policy)
        optimizer = _optimizer(params, steps_per_epoch, policy == "mixed_float16")
        optimizer.build(model.trainable_variables)
    compiled = _Compiled(key, model, optimizer, _make_train_step(model, optimizer, strategy, seed),
                         _make_eval_step(model), [])
    compiled.initial = [variable.numpy() for variable in compiled.variables]
    if key is not None:
        _cache[:] = [compiled]
    return compiled


def _precision_policy(tf: Any) -> str:
    """float16 on GPUs (tensor cores), bfloat16 elsewhere (CPUs lack fast float16)."""
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def _optimizer(params: HyperParams, steps_per_epoch: int, loss_scaling: bool) -> Any:
    """Adam (AdamW when weight_decay > 0) with the learning rate decaying exponentially per epoch."""
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(params.lr, decay_steps=max(steps_per_epoch, 1),
                                                           decay_rate=LR_DECAY_PER_EPOCH)
    if params.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=params.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def _make_train_step(model: Any, optimizer: Any, strategy: Any, seed: int) -> Callable:
    """One compiled optimisation step, traced once for every batch shape (single replica).

    Several replicas receive per-replica values that a signature cannot describe; there
    reduce_retracing generalises to unknown sizes after the second shape.
    """
    import tensorflow as tf

    from .losses import head_sums, total_loss
    from .pipeline import batch_signature

    def replica_step(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        context = tf.distribute.get_replica_context()
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(optimizer.iterations, tf.int64)])
        key = tf.random.experimental.stateless_fold_in(key, context.replica_id_in_sync_group)
        with tf.GradientTape() as tape:
            loss = total_loss(head_sums(model(x, mask, key), y, mask))
            scaled = optimizer.scale_loss(loss / context.num_replicas_in_sync)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    signature = batch_signature() if strategy.num_replicas_in_sync == 1 else None

    @tf.function(input_signature=signature, reduce_retracing=True, autograph=False)
    def train_step(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        per_replica = strategy.run(replica_step, args=(x, y, mask))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    return train_step


def _make_eval_step(model: Any) -> Callable:
    import tensorflow as tf

    from .losses import head_sums
    from .pipeline import batch_signature

    @tf.function(input_signature=batch_signature(), autograph=False)
    def eval_step(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[dict, dict]:
        outputs = model(x, mask)
        predicted = {"predicted_class": tf.argmax(outputs["cls"], axis=-1, output_type=tf.int32),
                     **{name: outputs[name] for name in ("pt", "energy", "sin_phi", "cos_phi")}}
        return head_sums(outputs, y, mask), predicted

    return eval_step


def _assign(path: Path, group: str, variables: Sequence[Any], arrays: dict[str, np.ndarray]) -> None:
    stored = sorted(key for key in arrays if key.startswith(group + "/"))
    if len(stored) != len(variables):
        raise TrainingError(f"{path}: {len(stored)} {group} tensors, this model has {len(variables)}; "
                            "remove the checkpoint or use another working directory")
    for index, variable in enumerate(variables):
        value = arrays[_array_key(group, index)]
        if tuple(value.shape) != tuple(variable.shape):
            raise TrainingError(f"{path}: {group} tensor {index} ({variable.path}) has shape {value.shape}, "
                                f"expected {tuple(variable.shape)}")
        variable.assign(value)


def _array_key(group: str, index: int) -> str:
    return f"{group}/{index:05d}"


class CheckpointStore:
    """One file, replaced atomically: tensors by group and index, plus JSON metadata."""

    META_KEY = "meta"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_FILE

    def save(self, meta: dict[str, Any], groups: dict[str, Sequence[Any]]) -> None:
        arrays = {_array_key(group, i): np.asarray(v) for group, variables in groups.items()
                  for i, v in enumerate(variables)}
        arrays[self.META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_writer(self.path) as stream:
            np.savez(stream, **arrays)
        _fsync_directory(self.directory)

    def load(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as content:
                arrays = {key: content[key] for key in content.files}
            meta = json.loads(arrays.pop(self.META_KEY).tobytes())
        except (OSError, ValueError, KeyError) as exc:
            raise TrainingError(f"{self.path}: unreadable checkpoint ({exc}); remove it to start afresh") from exc
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{self.path}: checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        return meta, arrays


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash right after could otherwise lose it)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """A flag set by SIGTERM while training runs; the previous handler comes back afterwards."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals reach only the main thread; a caller in another thread handles them itself
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation_container.trainer",
                                     description="Train MLPF once (internal entry for tests and preemption "
                                                 "drills; the user-facing CLI is python -m evaluation_container).")
    parser.add_argument("--params", required=True, type=Path, help="hyperparameters (input.json)")
    parser.add_argument("--data", required=True, nargs="+", help="data files, directories or an input_ds.json")
    parser.add_argument("--workdir", required=True, type=Path, help="checkpoints go to WORKDIR/checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-events", type=int, default=None)
    parser.add_argument("--pause-after-epoch", type=int, default=None, metavar="N",
                        help="after epoch N is checkpointed, print 'paused' and wait until stdin closes "
                             "(lets a test kill the process at a known point)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    def report(result: EpochResult) -> bool:
        print(json.dumps(asdict(result)), flush=True)
        if result.epoch == args.pause_after_epoch:
            print("paused", flush=True)
            sys.stdin.read()
        return False

    try:
        params = load_hyperparams(args.params)
        files = resolve_files(args.data[0] if len(args.data) == 1 else args.data)
        result = train(params, files, args.workdir, seed=args.seed, on_epoch_end=report, max_events=args.max_events)
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingError as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except HepoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"final_val_loss": result.final_val_loss, "resumed_from_epoch": result.resumed_from_epoch,
                      "epochs": len(result.history)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
