import numpy as np
import pytest
import tensorflow as tf

from evaluation_container.config import HyperParams
from evaluation_container.data import format as fmt
from evaluation_container.data import generate_events
from evaluation_container.losses import head_sums
from evaluation_container.model import (
    REGRESSION_HEADS,
    build_model,
    encode_inputs,
    from_bins,
    gaussian_adjacency,
    lsh_permutation,
    to_bins,
)

SMALL = HyperParams(num_graph_layers_id=2, num_graph_layers_reg=1, bin_size=16, output_dim=8, dropout=0.3)
KEY = tf.constant([3, 4], tf.int64)


@pytest.fixture(scope="module")
def model():
    return build_model(SMALL, seed=1)


@pytest.fixture(scope="module")
def event():
    """One generated event of 40 elements."""
    return generate_events(np.random.default_rng(0), 1, 40, 40)[0]


def _batch(*events, length):
    x = np.zeros((len(events), length, fmt.N_X_COLUMNS), np.float32)
    y = np.zeros((len(events), length, fmt.N_Y_COLUMNS), np.float32)
    for row, e in enumerate(events):
        x[row, :len(e)], y[row, :len(e)] = e.X, e.ygen
    mask = np.arange(length)[None, :] < np.array([len(e) for e in events])[:, None]
    return tf.constant(x), tf.constant(y), tf.constant(mask)


def test_outputs_have_one_value_per_element(model, event):
    x, _, mask = _batch(event, length=48)
    outputs = model(x, mask)
    assert outputs["cls"].shape == (1, 48, fmt.N_CLASSES)
    assert outputs["charge"].shape == (1, 48, 3)
    for name in REGRESSION_HEADS:
        assert outputs[name].shape == (1, 48) and outputs[name].dtype == tf.float32
    assert (outputs["energy"].numpy() >= 0).all()


@pytest.mark.parametrize(("id_layers", "reg_layers"), [(0, 0), (4, 4)])
def test_every_stack_depth_of_the_scan_builds_and_runs(event, id_layers, reg_layers):
    params = HyperParams(num_graph_layers_id=id_layers, num_graph_layers_reg=reg_layers, bin_size=8, output_dim=4)
    model = build_model(params)
    x, _, mask = _batch(event, length=40)
    assert np.isfinite(model(x, mask)["pt"].numpy()).all()
    graph_layers = [layer for layer in model._flatten_layers() if layer.name.startswith("graph_")]
    assert len(graph_layers) == id_layers + reg_layers


def test_padding_does_not_change_real_elements(model, event):
    """Padding sorts behind real elements and has no edges (2 and 3 bins both hash with 1 projection)."""
    small = generate_events(np.random.default_rng(4), 1, 24, 24)[0]
    short = model(*_batch(small, length=32)[::2])
    long = model(*_batch(small, length=48)[::2])
    for name in ("cls", "charge", *REGRESSION_HEADS):
        np.testing.assert_allclose(short[name][0, :24], long[name][0, :24], rtol=1e-5, atol=1e-5)


def test_events_in_one_batch_do_not_see_each_other(model, event):
    other = generate_events(np.random.default_rng(9), 1, 30, 30)[0]
    alone = model(*_batch(event, length=48)[::2])
    together = model(*_batch(event, other, length=48)[::2])
    np.testing.assert_allclose(alone["cls"][0, :40], together["cls"][0, :40], rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights_other_seed_other_weights(model):
    same, other = build_model(SMALL, seed=1), build_model(SMALL, seed=2)
    weights = model.get_weights()
    assert all(np.array_equal(u, v) for u, v in zip(weights, same.get_weights(), strict=True))
    assert not any(np.array_equal(u, v) for u, v in zip(weights, other.get_weights(), strict=True) if u.any())


def test_dropout_masks_follow_the_key(model, event):
    x, _, mask = _batch(event, length=48)
    plain, again = model(x, mask)["pt"], model(x, mask)["pt"]
    first, replay = model(x, mask, KEY)["pt"], model(x, mask, KEY)["pt"]
    other = model(x, mask, KEY + 1)["pt"]
    np.testing.assert_array_equal(plain, again)
    np.testing.assert_array_equal(first, replay)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, plain)


def test_regression_loss_does_not_train_the_classifier(model, event):
    """The regression heads see the class logits through a stop-gradient."""
    x, y, mask = _batch(event, length=48)
    with tf.GradientTape() as tape:
        sums = head_sums(model(x, mask), y, mask)
        regression = tf.add_n([sums[name][0] for name in REGRESSION_HEADS])
    classifier = model.get_layer("classifier").trainable_variables
    gradients = tape.gradient(regression, classifier)
    assert all(g is None or not np.any(g.numpy()) for g in gradients)


def test_inputs_one_hot_type_and_log_compress_energies():
    x = np.zeros((1, 2, fmt.N_X_COLUMNS), np.float32)
    x[0, 0, [fmt.X_TYPE, fmt.X_PT, fmt.X_E_EM, fmt.X_ETA]] = [fmt.TYPE_TOWER, np.e - 1, np.e**2 - 1, 0.5]
    x[0, 1, [fmt.X_TYPE, fmt.X_PT, fmt.X_ETA_OUTER]] = [fmt.TYPE_TRACK, np.e - 1, 1.5]
    encoded = encode_inputs(tf.constant(x)).numpy()[0]
    assert encoded.shape == (2, 3 + 11)
    np.testing.assert_array_equal(encoded[:, :3], [[0, 1, 0], [0, 0, 1]])
    feature = {column: 3 + column - 1 for column in range(1, fmt.N_X_COLUMNS)}
    np.testing.assert_allclose(encoded[0, [feature[fmt.X_PT], feature[fmt.X_E_EM], feature[fmt.X_ETA]]],
                               [1.0, 2.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(encoded[1, [feature[fmt.X_PT], feature[fmt.X_ETA_OUTER]]], [1.0, 1.5], rtol=1e-6)


def test_binning_puts_padding_last_and_unbinning_restores_order():
    embedding = tf.random.stateless_normal((2, 32, 128), seed=[1, 2])
    mask = tf.sequence_mask([20, 32], 32)
    codebook = tf.random.stateless_normal((128, 512), seed=[3, 4])
    permutation = lsh_permutation(embedding, mask, codebook, bin_size=8)
    assert not tf.gather(mask, permutation, batch_dims=1)[0, 20:].numpy().any()
    values = tf.reshape(tf.range(64, dtype=tf.float32), (2, 32, 1))
    binned = to_bins(values, permutation, 8)
    assert binned.shape == (2, 4, 8, 1)
    np.testing.assert_array_equal(from_bins(binned, permutation), values)


def test_adjacency_is_gaussian_in_distance_and_zero_for_padding():
    points = tf.constant([[[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]]])
    adjacency = gaussian_adjacency(points, tf.constant([[[True, True, False]]])).numpy()[0, 0]
    np.testing.assert_allclose(adjacency[0, 1], np.exp(-0.1 * 5.0), rtol=1e-5)
    np.testing.assert_allclose(adjacency[0, 0], 1.0, atol=1e-3)
    assert not adjacency[2].any() and not adjacency[:, 2].any()


def test_mixed_precision_computes_in_bfloat16_and_returns_float32(event):
    model = build_model(SMALL, dtype="mixed_bfloat16")
    assert model.get_layer("classifier").compute_dtype == "bfloat16"
    outputs = model(*_batch(event, length=48)[::2])
    assert outputs["cls"].dtype == tf.float32
    assert np.isfinite(outputs["pt"].numpy()).all()
