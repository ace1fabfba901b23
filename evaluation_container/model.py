"""The MLPF ``gnn_dense`` model (DESIGN.md §4) in Keras 3 on TensorFlow.

Shape of the computation for a batch of B events padded to N elements (N a multiple of ``bin_size``):

* inputs: one-hot element type (padding, tower, track) + the 11 other columns; energy-like columns
  (pT, E, and a tower's E_em/E_had) are log-compressed so that a 1 TeV element does not saturate the
  first layer; the regression residuals below still use the raw values;
* two independent stacks of graph layers (``num_graph_layers_id`` feeding class and charge,
  ``num_graph_layers_reg`` feeding the regression); each layer embeds the elements (128-d), hashes the
  embedding with fixed random projections (argmax over [+p, -p]), sorts elements by hash and cuts
  them into equal bins of ``bin_size``, builds a dense Gaussian adjacency exp(-0.1·L2) inside each
  bin, applies a gated graph convolution of width ``output_dim`` and scatters the result back;
* heads: a classification FFN (256→128→64→32→6), a charge head (-1, 0, +1) and one regression FFN per
  target that also sees the stop-gradient class logits: pT, eta, sin φ, cos φ are residuals on the
  input values, E is |E_in + Δ|.

Dropout draws from stateless RNG keyed by (seed, optimizer step, site), so resuming from a
checkpoint replays exactly the masks an uninterrupted run would have drawn. Padded elements are
sorted behind every real one and masked out of the adjacency, so padding never changes a real
element's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from .config import HyperParams
from .data import format as fmt

EMBEDDING_DIM = 128  # width of the LSH/distance embedding
MAX_LSH_PROJECTIONS = 512  # enough for 1024 bins (e.g. 8192 elements with bin_size 8)
ADJACENCY_SCALE = 0.1  # exp(-0.1·L2)
DISTANCE_EPS = 1e-6  # keeps sqrt differentiable at zero distance
DEGREE_EPS = 1e-6
N_TYPES = 3  # one-hot over 0 (padding), 1 (tower), 2 (track)
N_CHARGES = 3  # -1, 0, +1 as classes
CLASS_WIDTHS = (256, 128, 64, 32)
CHARGE_WIDTHS = (64, 32)
REGRESSION_WIDTHS = (128, 64, 32)
REGRESSION_HEADS = ("pt", "eta", "sin_phi", "cos_phi", "energy")
# Regression head → input column its residual starts from.
RESIDUAL_COLUMN = {"pt": fmt.X_PT, "eta": fmt.X_ETA, "sin_phi": fmt.X_SIN_PHI, "cos_phi": fmt.X_COS_PHI,
                   "energy": fmt.X_E}
LOG_COLUMNS = (fmt.X_PT, fmt.X_E)
TOWER_LOG_COLUMNS = (fmt.X_E_EM, fmt.X_E_HAD)
PADDING_CODE = 2 * MAX_LSH_PROJECTIONS  # larger than any hash code: padding sorts last
SEED_STRIDE = 1000  # codebook seeds of two trial seeds never meet while a model has fewer layers


def encode_inputs(x: tf.Tensor) -> tf.Tensor:
    """(B, N, 12) raw elements → (B, N, 3 + 11) network inputs."""
    element_type = tf.cast(x[..., fmt.X_TYPE], tf.int32)
    one_hot = tf.one_hot(element_type, N_TYPES, dtype=x.dtype)
    is_tower = (element_type == fmt.TYPE_TOWER)[..., None]
    columns = tf.range(fmt.N_X_COLUMNS)
    always = tf.reduce_any(columns[:, None] == tf.constant(LOG_COLUMNS)[None, :], axis=-1)
    towers_only = tf.reduce_any(columns[:, None] == tf.constant(TOWER_LOG_COLUMNS)[None, :], axis=-1)
    compress = always | (towers_only & is_tower)
    compressed = tf.sign(x) * tf.math.log1p(tf.abs(x))
    features = tf.where(compress, compressed, x)
    return tf.concat([one_hot, features[..., 1:]], axis=-1)


def stateless_dropout(x: tf.Tensor, rate: float, key: tf.Tensor, site: int) -> tf.Tensor:
    """Inverted dropout whose mask depends only on ``key`` (seed, step) and the call site."""
    if rate <= 0:
        return x
    seed = tf.random.experimental.stateless_fold_in(key, site)
    keep = tf.random.stateless_uniform(tf.shape(x), seed=seed) >= rate
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))


class FeedForward(keras.layers.Layer):
    """Dense ELU layers with dropout in between, then a linear output layer."""

    def __init__(self, widths: Sequence[int], out_dim: int, dropout: float, site: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden = [keras.layers.Dense(w, activation="elu", dtype=self.dtype_policy, name=f"dense_{i}")
                       for i, w in enumerate(widths)]
        self.out = keras.layers.Dense(out_dim, dtype=self.dtype_policy, name="out")
        self.dropout = dropout
        self.site = site

    def call(self, x: tf.Tensor, key: tf.Tensor | None = None) -> tf.Tensor:
        for i, layer in enumerate(self.hidden):
            x = layer(x)
            if key is not None:
                x = stateless_dropout(x, self.dropout, key, self.site + i)
        return self.out(x)


def lsh_permutation(embedding: tf.Tensor, mask: tf.Tensor, codebook: tf.Tensor, bin_size: int) -> tf.Tensor:
    """Per event, the element order that puts equal hash codes next to each other (padding last)."""
    n_bins = tf.shape(embedding)[1] // bin_size
    n_projections = tf.clip_by_value(n_bins // 2, 1, MAX_LSH_PROJECTIONS)
    projected = tf.matmul(embedding, tf.cast(codebook[:, :n_projections], embedding.dtype))
    codes = tf.argmax(tf.concat([projected, -projected], axis=-1), axis=-1, output_type=tf.int32)
    codes = tf.where(mask, codes, PADDING_CODE)
    return tf.argsort(codes, axis=-1, stable=True)


def to_bins(t: tf.Tensor, permutation: tf.Tensor, bin_size: int) -> tf.Tensor:
    """(B, N, ...) → (B, N / bin_size, bin_size, ...) in permutation order."""
    gathered = tf.gather(t, permutation, batch_dims=1)
    shape = tf.shape(gathered)
    new_shape = tf.concat([[shape[0], shape[1] // bin_size, bin_size], shape[2:]], axis=0)
    return tf.reshape(gathered, new_shape)


def from_bins(t: tf.Tensor, permutation: tf.Tensor) -> tf.Tensor:
    """Inverse of ``to_bins``: back to (B, N, F) in the original element order."""
    shape = tf.shape(t)
    flat = tf.reshape(t, [shape[0], shape[1] * shape[2], shape[3]])
    return tf.gather(flat, tf.argsort(permutation, axis=-1, stable=True), batch_dims=1)


def gaussian_adjacency(embedding: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """(B, bins, S, D), (B, bins, S) → (B, bins, S, S): exp(-0.1·|a-b|) between real elements, in float32."""
    e = tf.cast(embedding, tf.float32)
    squared = tf.reduce_sum(e * e, axis=-1)
    distance2 = squared[..., :, None] + squared[..., None, :] - 2.0 * tf.matmul(e, e, transpose_b=True)
    distance = tf.sqrt(tf.maximum(distance2, DISTANCE_EPS))
    real = tf.cast(mask, tf.float32)
    return tf.exp(-ADJACENCY_SCALE * distance) * real[..., :, None] * real[..., None, :]


class GraphLayer(keras.layers.Layer):
    """Embed, LSH-bin, Gaussian adjacency, gated graph convolution, unbin (one layer of a stack)."""

    def __init__(self, bin_size: int, output_dim: int, dropout: float, site: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.bin_size = bin_size
        self.output_dim = output_dim
        self.dropout = dropout
        self.site = site
        self.seed = seed
        policy = self.dtype_policy
        self.embed = FeedForward((EMBEDDING_DIM,), EMBEDDING_DIM, 0.0, site, dtype=policy, name="embed")
        # neighbour, self and gate projections in one kernel: fewer variables, faster tracing and updates
        self.projections = keras.layers.Dense(3 * output_dim, dtype=policy, name="projections")

    def build(self, input_shape: tuple) -> None:
        self.codebook = self.add_weight(
            shape=(EMBEDDING_DIM, MAX_LSH_PROJECTIONS), name="lsh_codebook", trainable=False,
            initializer=keras.initializers.RandomNormal(seed=self.seed * SEED_STRIDE + self.site))

    def call(self, x: tf.Tensor, mask: tf.Tensor, key: tf.Tensor | None = None) -> tf.Tensor:
        embedding = self.embed(x)
        permutation = lsh_permutation(embedding, mask, self.codebook, self.bin_size)
        binned_mask = to_bins(mask, permutation, self.bin_size)
        adjacency = gaussian_adjacency(to_bins(embedding, permutation, self.bin_size), binned_mask)
        binned = to_bins(self.projections(x), permutation, self.bin_size)
        out = from_bins(self._convolve(binned, tf.cast(adjacency, binned.dtype)), permutation)
        out = out * tf.cast(mask, out.dtype)[..., None]
        if key is not None:
            out = stateless_dropout(out, self.dropout, key, self.site)
        return out

    def _convolve(self, projected: tf.Tensor, adjacency: tf.Tensor) -> tf.Tensor:
        """Sigmoid gate between the degree-normalised neighbour sum and a self term."""
        neighbour, self_term, gate = tf.split(projected, 3, axis=-1)
        norm = tf.math.rsqrt(tf.maximum(tf.reduce_sum(adjacency, axis=-1, keepdims=True), DEGREE_EPS))
        neighbours = norm * tf.matmul(adjacency, norm * neighbour)
        gate = tf.sigmoid(gate)
        return tf.nn.elu(gate * neighbours + (1.0 - gate) * self_term)


class StackedFeedForward(keras.layers.Layer):
    """``n_heads`` independent FeedForwards on the same input, computed as one batched einsum per depth.

    Same function as separate FFNs, but 2 variables per depth instead of 2 per head and depth, which
    keeps graph tracing and optimizer updates cheap.
    """

    def __init__(self, n_heads: int, widths: Sequence[int], out_dim: int, dropout: float, site: int, **kwargs):
        super().__init__(**kwargs)
        self.n_heads = n_heads
        self.widths = (*widths, out_dim)
        self.dropout = dropout
        self.site = site

    def build(self, input_shape: tuple) -> None:
        fan_in = int(input_shape[-1])
        self.kernels, self.biases = [], []
        for depth, fan_out in enumerate(self.widths):
            limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform per head
            self.kernels.append(self.add_weight(shape=(self.n_heads, fan_in, fan_out), name=f"kernel_{depth}",
                                                initializer=keras.initializers.RandomUniform(-limit, limit)))
            self.biases.append(self.add_weight(shape=(self.n_heads, 1, 1, fan_out), name=f"bias_{depth}",
                                               initializer="zeros"))
            fan_in = fan_out

    def call(self, x: tf.Tensor, key: tf.Tensor | None = None) -> tf.Tensor:
        """(B, N, F) → (heads, B, N, out_dim)."""
        h = tf.einsum("bnf,hfo->hbno", x, self.kernels[0]) + self.biases[0]
        for depth in range(1, len(self.widths)):
            h = tf.nn.elu(h)
            if key is not None:
                h = stateless_dropout(h, self.dropout, key, self.site + depth - 1)
            h = tf.einsum("hbnf,hfo->hbno", h, self.kernels[depth]) + self.biases[depth]
        return h


class _SiteCounter:
    """Hands out distinct dropout site numbers, so no two dropout calls share a mask."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> int:
        first, self.next = self.next, self.next + n
        return first


class MLPF(keras.Model):
    """``gnn_dense``; call with (X (B, N, 12), mask (B, N)) and an RNG key when training."""

    def __init__(self, params: HyperParams, seed: int = 0, dtype: str | None = None, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        policy = self.dtype_policy
        sites = _SiteCounter()
        self.id_stack = [GraphLayer(params.bin_size, params.output_dim, params.dropout, sites.take(1), seed,
                                    dtype=policy, name=f"graph_id_{i}") for i in range(params.num_graph_layers_id)]
        self.reg_stack = [GraphLayer(params.bin_size, params.output_dim, params.dropout, sites.take(1), seed,
                                     dtype=policy, name=f"graph_reg_{i}") for i in range(params.num_graph_layers_reg)]
        self.classifier = FeedForward(CLASS_WIDTHS, fmt.N_CLASSES, params.dropout, sites.take(len(CLASS_WIDTHS)),
                                      dtype=policy, name="classifier")
        self.charge = FeedForward(CHARGE_WIDTHS, N_CHARGES, params.dropout, sites.take(len(CHARGE_WIDTHS)),
                                  dtype=policy, name="charge")
        self.regressors = StackedFeedForward(len(REGRESSION_HEADS), REGRESSION_WIDTHS, 1, params.dropout,
                                             sites.take(len(REGRESSION_WIDTHS)), dtype=policy, name="regressors")

    def call(self, x: tf.Tensor, mask: tf.Tensor, key: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """Outputs in float32: class and charge logits (B, N, C) and one (B, N) tensor per regression head."""
        x = tf.cast(x, tf.float32)
        encoded = tf.cast(encode_inputs(x), self.compute_dtype)
        id_features = self._run_stack(self.id_stack, encoded, mask, key)
        reg_features = self._run_stack(self.reg_stack, encoded, mask, key)
        logits = self.classifier(id_features, key)
        outputs = {"cls": tf.cast(logits, tf.float32),
                   "charge": tf.cast(self.charge(id_features, key), tf.float32)}
        reg_inputs = tf.concat([reg_features, tf.stop_gradient(logits)], axis=-1)
        deltas = tf.cast(self.regressors(reg_inputs, key)[..., 0], tf.float32)
        for index, name in enumerate(REGRESSION_HEADS):
            value = x[..., RESIDUAL_COLUMN[name]] + deltas[index]
            outputs[name] = tf.abs(value) if name == "energy" else value
        return outputs

    @staticmethod
    def _run_stack(stack: list[GraphLayer], encoded: tf.Tensor, mask: tf.Tensor,
                   key: tf.Tensor | None) -> tf.Tensor:
        """The input encoding concatenated with every layer's output (skip connections to the heads)."""
        features = [encoded]
        x = encoded
        for layer in stack:
            x = layer(x, mask, key)
            features.append(x)
        return tf.concat(features, axis=-1)


def build_model(params: HyperParams, seed: int = 0, dtype: str | None = None) -> MLPF:
    """A model with its weights created (deterministic for a given seed)."""
    keras.utils.set_random_seed(seed)
    model = MLPF(params, seed=seed, dtype=dtype)
    x = tf.zeros((1, params.bin_size, fmt.N_X_COLUMNS), tf.float32)
    model(x, tf.zeros((1, params.bin_size), tf.bool))
    return model
