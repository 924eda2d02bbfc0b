"""A group's members stepping together on the shared weights (`train_members_shared`): when it
runs and how it works, `members`.

Measured on the shared path (`python -m benchmarks.client_groups --cg_workloads=w3_2k,w2
--group_sizes=50,500,1000 --rounds=3 --member_loop`, twice, 2026-12-05 22:28-22:40, load
7-20; BENCHMARKS.md): W3 (linear, 1,000 x 19) K=1000 3.45x and 2.68x the per-client
clients/s, CPU 0.46-0.48 s a round against 2.37-2.46 per client (5.1-5.2x) and 1.02-1.05
for the member loop in the same runs. In plain graph-mode TF on one thread the group's
computation took 268-305 ms of CPU against the member loop's 945: rows read 122-134 ms
(a query per member; one query for the group measured no faster), parsed once 40-50 ms,
training ~100 ms. What stays: reading the rows (the per-client path pays it too) and
one op thread per group; see BENCHMARKS.md for the bound.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf
import tensorflow_federated as tff

from tffpipe.client_groups.packing import _per_member


def train_members_shared(
    model: tff.learning.models.FunctionalModel,
    activations: list,
    examples,
    counts: tf.Tensor,
    initial: tuple,
    learning_rate: float,
    batch_size: int,
    clip: float | None,
    *,
    members: int | None = None,
):
    """Every member's local SGD on a Flatten/Dense stack without K copies of the weights.

    Returns what `train_members_batched` returns: (total, weight, metrics state, clipped
    count); with `members`, each member's own update `[k, ...]` per weight.

    `examples`, `counts`: the members' examples concatenated, member k's `counts[k]` in
    the order its dataset yields them (`base.Task.group_examples_fn`); step s gathers
    rows s*B..s*B+B-1 of each member's run, so the group's data is never laid out as
    `[K, steps, B, ...]` (a copy of it per pass: W3's are 60 MB). All members start from the same weights W, and a Dense
    layer's kernel gradient on a batch is A^T G (A the layer's inputs `[B, in]`, G the
    loss gradient at its pre-activations `[B, out]`; the bias's is 1^T G). So after t
    plain SGD steps member k's kernel is W - lr sum_{s<t} A_s^T G_s, and its
    pre-activations on the next batch X are

        X W_k + b_k = X W + b - lr sum_{s<t} ((X A_s^T) G_s + 1 (1^T G_s)):

    one GEMM of every member's rows with the shared W, plus small per-member
    corrections `[B, tB]` from the member's own earlier A and G (the low-rank
    formulation of issue 21). G comes from the tape at the pre-activations, through the
    same corrections, so each member's steps are its per-client steps in exact
    arithmetic. The results are GEMMs too: the update (W - trained) is
    lr A_k^T G_k over the member's rows, the example-weighted sum lr A^T (w G) over all
    rows, and with a clip each member's norm comes from its Gram matrices
    ||A^T G||_F^2 = sum((A A^T) * (G G^T)).

    Rounding: the sums run in another order than per client (W is not updated in place),
    so weights agree to float rounding (~1e-7 relative), and, as with every batched
    path, a ReLU whose pre-activation is within rounding of 0 can take the other side.
    """
    trainable, non_trainable = initial
    del non_trainable  # a Dense stack has none (`dense_activations`)
    b, lr = batch_size, learning_rate
    x_all, y_all = (examples["x"], examples["y"]) if isinstance(examples, Mapping) else examples
    k = tf.size(counts)
    steps = (tf.reduce_max(tf.concat([counts, [0]], 0)) + b - 1) // b
    starts = tf.cumsum(counts, exclusive=True)
    kernels, biases = trainable[0::2], trainable[1::2]
    n_dense = len(kernels)

    def mean_loss(args):
        output, y, sample_weight = args
        return model.loss(output, y, sample_weight=sample_weight)

    def train(live: tf.Tensor):
        """The members' steps on their first `live[k]` rows: (steps, A and G histories, metrics state, finite `[K]`)."""

        def step(s, a_hist, g_hist, metrics, finite):
            position = tf.range(b)[None] + s * b
            valid = position < live[:, None]  # [K, B]
            # A row past a member's run reads its group's first row: masked out of the loss, so its G is 0.
            index = tf.where(valid, starts[:, None] + position, 0)
            x, y = tf.gather(x_all, index), tf.gather(y_all, index)
            rows = tf.reduce_sum(tf.cast(valid, tf.float32), 1)
            # Keras' mean loss divides by B whatever the weights: B / rows makes it the mean over valid rows.
            sample_weight = tf.cast(valid, tf.float32) * (b / tf.maximum(rows, 1.0))[:, None]
            inputs, pre = [], []
            with tf.GradientTape() as tape:
                h, layer = x, 0
                for activation in activations:
                    if activation is None:
                        h = tf.reshape(h, [k, b, -1])
                        continue
                    a = h
                    z = tf.reshape(tf.linalg.matmul(tf.reshape(a, [k * b, -1]), kernels[layer]), [k, b, -1])
                    z = z + biases[layer]
                    correction = tf.linalg.matmul(tf.linalg.matmul(a, a_hist[layer], transpose_b=True), g_hist[layer])
                    z = z - lr * (correction + tf.reduce_sum(g_hist[layer], 1)[:, None, :])
                    tape.watch(z)
                    inputs.append(a)
                    pre.append(z)
                    h = activation(z)
                    layer += 1
                loss = tf.reduce_sum(tf.vectorized_map(mean_loss, (h, y, sample_weight)))
            gradients = tape.gradient(loss, pre)
            a_hist = tuple(tf.concat([old, new], 1) for old, new in zip(a_hist, inputs, strict=True))
            g_hist = tuple(tf.concat([old, new], 1) for old, new in zip(g_hist, gradients, strict=True))
            finite = tf.logical_and(
                finite,
                tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g), [1, 2]) for g in gradients]), 0),
            )
            flat = tf.reshape(valid, [-1])
            predictions = tf.boolean_mask(tf.reshape(h, tf.concat([[-1], tf.shape(h)[2:]], 0)), flat)
            labels = tf.boolean_mask(tf.reshape(y, tf.concat([[-1], tf.shape(y)[2:]], 0)), flat)
            metrics = model.update_metrics_state(
                metrics, batch_output=tff.learning.models.BatchOutput(predictions=predictions), labels=labels
            )
            return s + 1, a_hist, g_hist, metrics, finite

        a0 = tuple(tf.zeros([k, 0, w.shape[0]], w.dtype) for w in kernels)
        g0 = tuple(tf.zeros([k, 0, w.shape[1]], w.dtype) for w in kernels)
        invariants = (
            tf.TensorShape([]),
            tuple(tf.TensorShape([None, None, w.shape[0]]) for w in kernels),
            tuple(tf.TensorShape([None, None, w.shape[1]]) for w in kernels),
            tf.nest.map_structure(lambda t: t.shape, model.initialize_metrics_state()),
            tf.TensorShape([None]),
        )
        return tf.while_loop(
            lambda s, *_: s < steps,
            step,
            (tf.constant(0), a0, g0, model.initialize_metrics_state(), tf.ones([k], tf.bool)),
            shape_invariants=invariants,
        )

    _, a_hist, g_hist, metrics, finite = train(counts)
    # A non-finite member gives a zero update and weight 0, and no metrics, as TFF's client update
    # does. Its rows were counted in the metrics step by step; in a round that has one, the
    # metrics are a second pass's without its rows (a member's steps depend on its rows alone).
    metrics = tf.cond(tf.reduce_all(finite), lambda: metrics, lambda: train(tf.where(finite, counts, 0))[3])
    keep = tf.cast(finite, tf.float32)

    def zero_non_finite(hist):
        return tf.cond(
            tf.reduce_all(finite),
            lambda: hist,
            lambda: tuple(tf.where(_per_member(finite, h), h, tf.zeros_like(h)) for h in hist),
        )

    a_hist, g_hist = zero_non_finite(a_hist), zero_non_finite(g_hist)
    if members is not None:
        deltas = []
        for layer in range(n_dense):
            deltas.append(lr * tf.linalg.matmul(a_hist[layer], g_hist[layer], transpose_a=True))
            deltas.append(lr * tf.reduce_sum(g_hist[layer], 1))
        return tuple(deltas), tf.cast(k, tf.float32), metrics, tf.constant(0.0)
    if clip is None:
        member_weights = tf.cast(counts, tf.float32) * keep
    else:
        squares = []
        for layer in range(n_dense):
            a, g = a_hist[layer], g_hist[layer]
            gram_a = tf.linalg.matmul(a, a, transpose_b=True)
            gram_g = tf.linalg.matmul(g, g, transpose_b=True)
            squares.append(tf.reduce_sum(gram_a * gram_g, [1, 2]))
            squares.append(tf.reduce_sum(tf.square(tf.reduce_sum(g, 1)), 1))
        norms = lr * tf.sqrt(tf.maximum(tf.add_n(squares), 0.0))
        member_weights = clip * tf.minimum(1.0 / norms, 1.0 / clip)  # as tf.clip_by_global_norm scales
    total = []
    for layer in range(n_dense):
        a, g = a_hist[layer], g_hist[layer] * _per_member(member_weights, g_hist[layer])
        a_rows, g_rows = tf.reshape(a, [-1, tf.shape(a)[2]]), tf.reshape(g, [-1, tf.shape(g)[2]])
        total.append(lr * tf.linalg.matmul(a_rows, g_rows, transpose_a=True))
        total.append(lr * tf.reduce_sum(g_rows, 0))
    if clip is None:
        return tuple(total), tf.reduce_sum(member_weights), metrics, tf.constant(0.0)
    clipped = tf.reduce_sum(tf.cast(norms > clip, tf.float32) * keep)
    return tuple(total), tf.reduce_sum(keep), metrics, clipped
