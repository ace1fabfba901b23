"""Events → padded batches for the MLPF model, through tf.data.

Events vary in size (a few hundred elements in the toy set, ~5–6k in the real one), and the model
needs each event padded to a multiple of ``bin_size``. Padding every batch to the largest event of
the dataset would waste most of the work, so batches are *bucketed*: each epoch the events are
shuffled, sorted by size within pools of ``POOL_BATCHES`` batches and cut into batches, whose order
is then shuffled; a batch is padded only to its own longest event, rounded up to ``bin_size``.
The plan is pure numpy and depends only on (seed, epoch), so a resumed run sees exactly the batches
an uninterrupted one would have, and ``padded_fraction`` is known before any step runs. The padding
itself runs inside tf.data (ragged gather + ``to_tensor``) in parallel with training, with prefetch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from .data import format as fmt
from .data.reader import Event

SPLIT_SEED = 4559324  # the Zenodo record: a fixed train/validation split, the same for every trial seed
POOL_BATCHES = 32  # batches sorted together: larger pools pad less, smaller ones mix sizes more


@dataclass(frozen=True)
class EventTable:
    """Events stored flat: element rows of all events, and where each event starts."""

    X: np.ndarray  # (elements, 12) float32
    y: np.ndarray  # (elements, 7) float32
    row_splits: np.ndarray  # (events + 1,) int64

    @classmethod
    def from_events(cls, events: Sequence[Event], target: str = "ygen") -> EventTable:
        if not events:
            raise ValueError("no events")
        sizes = np.array([len(event) for event in events], dtype=np.int64)
        return cls(X=np.concatenate([event.X for event in events]).astype(np.float32),
                   y=np.concatenate([getattr(event, target) for event in events]).astype(np.float32),
                   row_splits=np.concatenate([[0], np.cumsum(sizes)]))

    def __len__(self) -> int:
        return len(self.row_splits) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.row_splits)

    @property
    def n_elements(self) -> int:
        return int(self.row_splits[-1])

    def subset(self, ids: np.ndarray) -> EventTable:
        """The events ``ids``, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        lengths = self.sizes[ids]
        new_splits = np.concatenate([[0], np.cumsum(lengths)])
        rows = np.repeat(self.row_splits[ids] - new_splits[:-1], lengths) + np.arange(new_splits[-1])
        return EventTable(X=self.X[rows], y=self.y[rows], row_splits=new_splits)

    def fingerprint(self) -> list[int]:
        """Events and elements: enough to notice that a checkpoint belongs to other data."""
        return [len(self), self.n_elements]


def split_train_val(table: EventTable, val_fraction: float) -> tuple[EventTable, EventTable]:
    """A fixed random split (independent of the trial seed, so trials are compared on the same events)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(len(table) * val_fraction))
    if len(table) - n_val < 1:
        raise ValueError(f"{len(table)} event(s) cannot be split into training and validation; need at least 2")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(table))
    return table.subset(np.sort(order[n_val:])), table.subset(np.sort(order[:n_val]))


def plan_batches(sizes: np.ndarray, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Event ids per batch, similar sizes together; ``rng=None`` gives the fixed order used for validation."""
    n = len(sizes)
    if rng is None:
        order = np.argsort(sizes, kind="stable")
    else:
        shuffled = rng.permutation(n)
        pool = batch_size * POOL_BATCHES
        order = np.concatenate([chunk[np.argsort(sizes[chunk], kind="stable")]
                                for chunk in np.split(shuffled, np.arange(pool, n, pool))])
    batches = np.split(order, np.arange(batch_size, n, batch_size))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padded_length(longest: int, bin_size: int) -> int:
    return -(-longest // bin_size) * bin_size


def padded_fraction(sizes: np.ndarray, batches: Iterable[np.ndarray], bin_size: int) -> float:
    """Share of the processed elements (B × padded N over all batches) that are padding."""
    processed = sum(len(batch) * padded_length(int(sizes[batch].max()), bin_size) for batch in batches)
    return 1.0 - float(sizes.sum()) / processed if processed else 0.0


def batch_signature() -> tuple[tf.TensorSpec, tf.TensorSpec, tf.TensorSpec]:
    """What a batch looks like to a compiled step: any batch size, any padded length."""
    return (tf.TensorSpec([None, None, fmt.N_X_COLUMNS], tf.float32, name="X"),
            tf.TensorSpec([None, None, fmt.N_Y_COLUMNS], tf.float32, name="y"),
            tf.TensorSpec([None, None], tf.bool, name="mask"))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The shuffling RNG of one epoch: a function of (seed, epoch) only, so resuming needs no RNG state."""
    return np.random.default_rng([seed, epoch])


class BatchSource:
    """Holds one set of events as tensors and turns batch plans into tf.data pipelines."""

    def __init__(self, table: EventTable, bin_size: int):
        self.table = table
        self.bin_size = bin_size
        splits = tf.constant(table.row_splits)
        self._x = tf.RaggedTensor.from_row_splits(tf.constant(table.X), splits, validate=False)
        self._y = tf.RaggedTensor.from_row_splits(tf.constant(table.y), splits, validate=False)

    def dataset(self, batches: Sequence[np.ndarray]) -> tf.data.Dataset:
        """Yields (X (B, N, 12), y (B, N, 7), mask (B, N)) with N a multiple of bin_size, in plan order."""
        lengths = np.array([len(batch) for batch in batches], dtype=np.int64)
        flat = np.concatenate(batches) if len(batches) else np.empty(0, np.int64)
        ids = tf.RaggedTensor.from_row_lengths(tf.constant(flat, tf.int64), tf.constant(lengths))
        return (tf.data.Dataset.from_tensor_slices(ids)
                .map(self._pad_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(tf.data.AUTOTUNE))

    def _pad_batch(self, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        x, y = tf.gather(self._x, ids), tf.gather(self._y, ids)
        row_lengths = x.row_lengths()
        length = (tf.reduce_max(row_lengths) + self.bin_size - 1) // self.bin_size * self.bin_size
        batch = tf.size(ids, out_type=tf.int64)
        dense_x = x.to_tensor(shape=tf.stack([batch, length, fmt.N_X_COLUMNS]))
        dense_y = y.to_tensor(shape=tf.stack([batch, length, fmt.N_Y_COLUMNS]))
        return dense_x, dense_y, tf.sequence_mask(row_lengths, length)
