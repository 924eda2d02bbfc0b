"""A group's members stepping together with K weight copies (`train_members_batched`), and
the Flatten/Dense stack's batched forward pass (`create_dense_forward`, `dense_activations`).
When each path runs and what it measured: `members`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import tensorflow as tf
import tensorflow_federated as tff

from tffpipe.client_groups.packing import DatasetFn, _per_member
from tffpipe.data import preprocessing


@dataclasses.dataclass(frozen=True)
class Batched:
    """How `train_members_batched` steps: plain SGD, and the pipeline's batch size.

    `batch_size` must be the one the member datasets are batched with (every batch
    full but a member's last), which is how `data.preprocessing` batches.
    """

    learning_rate: float
    batch_size: int
    forward: Callable[[tuple, tf.Tensor], tf.Tensor] | None = None  # see `create_dense_forward`
    # A Flatten/Dense stack's `dense_activations`: its members step on the shared weights (`train_members_shared`).
    activations: list | None = None
    # The task's read of a group's examples (`base.Task.group_examples_fn`); None: each member's dataset.
    group_examples_fn: Callable[[tf.Tensor], tuple] | None = None


def read_members(dataset_fn: DatasetFn, spec) -> Callable[[tf.Tensor], tuple]:
    """A group's examples read through each member's own dataset: `base.Task.group_examples_fn`'s contract.

    `spec`: the datasets' batch spec. For tasks without a read of their own
    (`preprocessing.read_each` reads the members).
    """
    element_spec = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape[1:], s.dtype), spec)

    def group_examples(ids: tf.Tensor):
        return preprocessing.read_each(ids, lambda member_id: dataset_fn(member_id).unbatch(), element_spec)

    return group_examples


def _to_steps(examples, counts: tf.Tensor, b: int):
    """A group's concatenated examples as `[K, steps, B, ...]` (member k's run in its row, zeros after), and counts."""
    k = tf.size(counts)
    steps = (tf.reduce_max(tf.concat([counts, [0]], 0)) + b - 1) // b

    def to_steps(t):
        t = tf.RaggedTensor.from_row_lengths(t, counts).to_tensor()
        t = tf.pad(t, [[0, 0], [0, steps * b - tf.shape(t)[1]]] + [[0, 0]] * (len(t.shape) - 2))
        return tf.reshape(t, tf.concat([[k, steps, b], tf.shape(t)[2:]], 0))

    return tf.nest.map_structure(to_steps, examples), counts


def train_members_batched(
    model: tff.learning.models.FunctionalModel,
    dataset_fn: DatasetFn,
    ids: tf.Tensor,
    initial: tuple,
    batched: Batched,
    clip: float | None,
    *,
    members: int | None = None,
):
    """Every member's local SGD at once: (total, weight, metrics state, clipped count).

    With `members`, `total` is each member's own update, `[k, ...]` per weight (a
    non-finite one zero), unclipped, and the weight is the member count.

    The members' examples, in the order their datasets yield them (the seeded shuffle
    and the epochs included), are stacked and padded to `[K, steps * B, ...]`; the
    weights are one `[K, ...]` tensor per layer. Step s feeds member k its batch s (rows
    s*B..s*B+B-1 of its examples) through `tf.vectorized_map` of the model's forward
    pass (batched matmuls for dense layers) and takes the gradient of the sum of the
    members' mean batch losses, which is each member's own gradient since member k's
    loss depends only on its weights. A member past its last example has no valid row:
    its loss term is 0, so its weights stay. The arithmetic per member is the
    per-client step's (w - lr * g), up to float rounding of the batched kernels.

    Returns what the member loop returns: without clip the example-weighted sum of the
    updates (initial - trained) and the examples; with clip the sum of the updates each
    clipped to `clip` and the member count. A member whose update is not finite gives
    a zero update and weight 0, as TFF's client update does; its metrics still count.
    """
    trainable, non_trainable = initial
    b = batched.batch_size
    examples_fn = batched.group_examples_fn or read_members(dataset_fn, model.input_spec)
    data, counts = _to_steps(*examples_fn(ids), b)
    k, steps = tf.size(counts), tf.shape(tf.nest.flatten(data)[0])[1]
    x_all, y_all = (data["x"], data["y"]) if isinstance(data, Mapping) else data
    stacked = tuple(tf.tile(w[None], [k] + [1] * len(w.shape)) for w in trainable)

    def predict(args):
        weights, x = args
        return model.predict_on_batch((weights, non_trainable), x, training=True)

    def mean_loss(args):
        output, y, sample_weight = args
        return model.loss(output, y, sample_weight=sample_weight)

    def step(s, weights, metrics):
        x, y = x_all[:, s], y_all[:, s]
        valid = tf.range(b)[None] + s * b < counts[:, None]  # [K, B]
        rows = tf.reduce_sum(tf.cast(valid, tf.float32), 1)
        # Keras' mean loss divides by B whatever the weights: B / rows makes it the mean over valid rows.
        sample_weight = tf.cast(valid, tf.float32) * (b / tf.maximum(rows, 1.0))[:, None]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            if batched.forward is not None:
                output = batched.forward(weights, x)
            else:
                output = tf.vectorized_map(predict, (weights, x))
            loss = tf.reduce_sum(tf.vectorized_map(mean_loss, (output, y, sample_weight)))
        gradients = tape.gradient(loss, weights)
        weights = tuple(
            w - batched.learning_rate * tf.convert_to_tensor(g) for w, g in zip(weights, gradients, strict=True)
        )
        flat = tf.reshape(valid, [-1])
        predictions = tf.boolean_mask(tf.reshape(output, tf.concat([[-1], tf.shape(output)[2:]], 0)), flat)
        labels = tf.boolean_mask(tf.reshape(y, tf.concat([[-1], tf.shape(y)[2:]], 0)), flat)
        metrics = model.update_metrics_state(
            metrics, batch_output=tff.learning.models.BatchOutput(predictions=predictions), labels=labels
        )
        return s + 1, weights, metrics

    _, trained, metrics = tf.while_loop(
        lambda s, *_: s < steps, step, (tf.constant(0), stacked, model.initialize_metrics_state())
    )
    deltas = tuple(w0 - w for w0, w in zip(stacked, trained, strict=True))
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(tf.reshape(d, [k, -1])), 1) for d in deltas]), 0)
    deltas = tuple(tf.where(_per_member(finite, d), d, tf.zeros_like(d)) for d in deltas)
    if members is not None:
        return deltas, tf.cast(k, tf.float32), metrics, tf.constant(0.0)
    if clip is None:
        weights = tf.cast(counts, tf.float32) * tf.cast(finite, tf.float32)
        total = tuple(tf.reduce_sum(d * _per_member(weights, d), 0) for d in deltas)
        return total, tf.reduce_sum(weights), metrics, tf.constant(0.0)
    norms = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.reshape(d, [k, -1])), 1) for d in deltas]))
    scale = clip * tf.minimum(1.0 / norms, 1.0 / clip)  # as tf.clip_by_global_norm scales
    total = tuple(tf.reduce_sum(d * _per_member(scale, d), 0) for d in deltas)
    return total, tf.cast(k, tf.float32), metrics, tf.reduce_sum(tf.cast(norms > clip, tf.float32))


_ACTIVATIONS = {"linear": tf.identity, "relu": tf.nn.relu}


def dense_activations(keras_model: tf.keras.Model) -> list | None:
    """A Flatten/Dense stack's layers as [None for Flatten, the activation for Dense], or None for other models.

    Dense layers with a bias, a linear or ReLU activation and no regularization losses,
    whose kernel and bias are the model's trainable weights in order.
    """
    if not isinstance(keras_model, tf.keras.Sequential):
        return None
    layers = []
    for layer in keras_model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        if isinstance(layer, tf.keras.layers.Flatten):
            layers.append(None)
        elif (
            isinstance(layer, tf.keras.layers.Dense)
            and layer.activation.__name__ in _ACTIVATIONS
            and layer.use_bias
            and not layer.losses
        ):
            layers.append(_ACTIVATIONS[layer.activation.__name__])
        else:
            return None
    if len(keras_model.trainable_weights) != 2 * sum(a is not None for a in layers):
        return None
    return layers


def create_dense_forward(keras_model: tf.keras.Model) -> Callable[[tuple, tf.Tensor], tf.Tensor] | None:
    """K members' forward pass for a stack of Flatten and Dense layers, or None for other models.

    `forward(weights, x)`: weights `[K, ...]` per trainable weight in the model's order
    (kernel, bias per Dense), x `[K, B, ...]`, gives the logits `[K, B, C]` with one
    batched matmul per layer: what `tf.vectorized_map` of the model computes, without
    its per-member gathers (whose gradients are scatters of the K weight copies).
    """
    layers = dense_activations(keras_model)
    if layers is None:
        return None

    def forward(weights: tuple, x: tf.Tensor) -> tf.Tensor:
        k, b = tf.shape(x)[0], tf.shape(x)[1]
        h, i = x, 0
        for activation in layers:
            if activation is None:
                h = tf.reshape(h, [k, b, -1])
            else:
                h = activation(tf.linalg.matmul(h, weights[i]) + weights[i + 1][:, None, :])
                i += 2
        return h

    return forward
