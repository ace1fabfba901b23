"""The MLPF loss (DESIGN.md §4): class cross-entropy + charge cross-entropy + Huber per regression target.

Each head returns a weighted sum and its total weight instead of a mean, so that validation can add
up batches of different sizes and get the exact per-element mean over the whole set. Weights: the
class term counts every real element (padding has weight 0); charge and regression count only
elements that carry a true particle, since "no particle" has no kinematics to learn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import tensorflow as tf

from .data import format as fmt
from .model import REGRESSION_HEADS

HEAD_NAMES = ("cls", "charge", *REGRESSION_HEADS)
TARGET_COLUMN = {"pt": fmt.Y_PT, "eta": fmt.Y_ETA, "sin_phi": fmt.Y_SIN_PHI, "cos_phi": fmt.Y_COS_PHI,
                 "energy": fmt.Y_E}
HUBER_DELTA = {"pt": 1.0, "eta": 0.1, "sin_phi": 0.1, "cos_phi": 0.1, "energy": 1.0}
HEAD_WEIGHT = dict.fromkeys(HEAD_NAMES, 1.0)
CHARGE_OFFSET = 1  # charge -1, 0, +1 → class 0, 1, 2
MIN_WEIGHT = 1.0  # a batch without true particles contributes 0, not 0/0

Number = TypeVar("Number", float, tf.Tensor)


def huber(error: tf.Tensor, delta: float) -> tf.Tensor:
    """Quadratic within ±delta, linear outside: bounded gradients for badly wrong predictions."""
    absolute = tf.abs(error)
    quadratic = tf.minimum(absolute, delta)
    return 0.5 * quadratic * quadratic + delta * (absolute - quadratic)


def element_weights(y: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(class weights, particle weights), each (B, N) float32."""
    real = tf.cast(mask, tf.float32)
    has_particle = tf.cast(y[..., fmt.Y_CLASS] > 0, tf.float32) * real
    return real, has_particle


def head_sums(outputs: dict[str, tf.Tensor], y: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per head, a (2,) tensor [Σ w·loss, Σ w] over the batch."""
    real, particle = element_weights(y, mask)
    true_class = tf.cast(y[..., fmt.Y_CLASS], tf.int32)
    true_charge = tf.cast(tf.round(y[..., fmt.Y_CHARGE]), tf.int32) + CHARGE_OFFSET
    per_element = {
        "cls": (tf.nn.sparse_softmax_cross_entropy_with_logits(true_class, outputs["cls"]), real),
        "charge": (tf.nn.sparse_softmax_cross_entropy_with_logits(true_charge, outputs["charge"]), particle),
    }
    for name in REGRESSION_HEADS:
        error = outputs[name] - y[..., TARGET_COLUMN[name]]
        per_element[name] = (huber(error, HUBER_DELTA[name]), particle)
    return {name: tf.stack([tf.reduce_sum(loss * weight), tf.reduce_sum(weight)])
            for name, (loss, weight) in per_element.items()}


def head_means(sums: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {name: value[0] / tf.maximum(value[1], MIN_WEIGHT) for name, value in sums.items()}


def weighted_total(means: Mapping[str, Number]) -> Number:
    """The optimised scalar from per-head means (tensors in a step, floats for a whole validation set)."""
    return sum(HEAD_WEIGHT[name] * means[name] for name in HEAD_NAMES)


def total_loss(sums: dict[str, tf.Tensor]) -> tf.Tensor:
    return weighted_total(head_means(sums))
