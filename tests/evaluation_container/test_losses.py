import numpy as np
import pytest
import tensorflow as tf

from evaluation_container.data import format as fmt
from evaluation_container.losses import HEAD_NAMES, head_means, head_sums, huber, total_loss, weighted_total
from evaluation_container.model import REGRESSION_HEADS

CONFIDENT = 20.0  # a logit margin that makes cross-entropy vanish


def _targets() -> tuple[tf.Tensor, tf.Tensor]:
    """One event of 3 slots: a charged hadron, an element without particle, and padding."""
    y = np.zeros((1, 3, fmt.N_Y_COLUMNS), np.float32)
    y[0, 0] = [fmt.CLASS_CHARGED_HADRON, -1, 5.0, 0.5, 0.6, 0.8, 6.0]
    return tf.constant(y), tf.constant([[True, True, False]])


def _perfect(y: tf.Tensor) -> dict[str, tf.Tensor]:
    classes = tf.cast(y[..., fmt.Y_CLASS], tf.int32)
    charges = tf.cast(y[..., fmt.Y_CHARGE], tf.int32) + 1
    columns = {"pt": fmt.Y_PT, "eta": fmt.Y_ETA, "sin_phi": fmt.Y_SIN_PHI, "cos_phi": fmt.Y_COS_PHI,
               "energy": fmt.Y_E}
    return {"cls": CONFIDENT * tf.one_hot(classes, fmt.N_CLASSES), "charge": CONFIDENT * tf.one_hot(charges, 3),
            **{name: y[..., column] for name, column in columns.items()}}


def test_huber_is_quadratic_inside_delta_and_linear_outside():
    errors = tf.constant([0.05, -0.05, 0.3, -2.0])
    np.testing.assert_allclose(huber(errors, 0.1), [0.00125, 0.00125, 0.1 * (0.3 - 0.05), 0.1 * (2.0 - 0.05)],
                               rtol=1e-6)


def test_perfect_prediction_has_no_loss():
    y, mask = _targets()
    means = head_means(head_sums(_perfect(y), y, mask))
    assert set(means) == set(HEAD_NAMES)
    assert float(total_loss(head_sums(_perfect(y), y, mask))) == pytest.approx(0.0, abs=1e-6)


def test_class_counts_real_elements_and_regression_only_true_particles():
    y, mask = _targets()
    outputs = _perfect(y)
    outputs["pt"] = outputs["pt"] + tf.constant([[0.0, 100.0, 100.0]])  # wrong only where no particle/padding
    outputs["cls"] = tf.zeros_like(outputs["cls"])  # uniform: ln 6 per element
    sums = head_sums(outputs, y, mask)
    np.testing.assert_allclose(sums["cls"].numpy(), [2 * np.log(6), 2], rtol=1e-6)
    np.testing.assert_allclose(sums["pt"].numpy(), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(sums["charge"].numpy()[1], 1.0)


def test_pt_and_energy_use_delta_1_angles_delta_0_1():
    y, mask = _targets()
    outputs = _perfect(y)
    for name in REGRESSION_HEADS:
        outputs[name] = outputs[name] + 0.5
    means = head_means(head_sums(outputs, y, mask))
    assert float(means["pt"]) == pytest.approx(0.125) and float(means["energy"]) == pytest.approx(0.125)
    for name in ("eta", "sin_phi", "cos_phi"):
        assert float(means[name]) == pytest.approx(0.1 * (0.5 - 0.05))


def test_batch_without_particles_has_zero_regression_loss_not_nan():
    y = tf.zeros((1, 2, fmt.N_Y_COLUMNS))
    outputs = _perfect(y)
    outputs["pt"] = outputs["pt"] + 3.0
    means = head_means(head_sums(outputs, y, tf.constant([[True, True]])))
    assert float(means["pt"]) == 0.0


def test_weighted_total_adds_floats_like_tensors():
    means = {name: float(i) for i, name in enumerate(HEAD_NAMES)}
    assert weighted_total(means) == sum(range(len(HEAD_NAMES)))
