"""Client dataset pipelines for tasks that parse their own rows (EMNIST): seeded, without tf.data functions.

The keyboard task uses TFF's Stack Overflow pipeline instead (`tasks.keyboard.task`).

A task supplies `to_model_batch`, which turns a batch of a client's raw rows (or of
parsed elements) into the model's input {x, y}; the pipelines here read a client's
rows at once, convert them with ops of the computation's own graph, then shuffle,
repeat and batch.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tffpipe import configs

ToModelBatch = Callable[[object], dict]


def create_train_fn(
    config: configs.PreprocessConfig, to_model_batch: ToModelBatch, *, seed: int
) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A serializable dataset transform for training clients: rows or elements to batches.

    `seed` fixes the shuffle order, so a resumed run replays exactly what an
    uninterrupted one computes.
    """

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        if config.max_examples_per_client > 0:
            dataset = dataset.take(config.max_examples_per_client)
        examples = _examples(dataset, to_model_batch)
        if config.shuffle_buffer > 1:
            examples = examples.shuffle(config.shuffle_buffer, seed=seed)
        return _lean(examples.repeat(config.epochs).batch(config.batch_size))

    return preprocess


class GroupExamplesFn:
    """A group's members' ids -> (their examples, concatenated in the members' order, and each member's count).

    `batch_size`: B, the size of the batches the members' datasets cut their runs into.
    """

    def __init__(self, fn: Callable[[tf.Tensor], tuple[object, tf.Tensor]], batch_size: int):
        self._fn = fn
        self.batch_size = batch_size

    def __call__(self, ids: tf.Tensor) -> tuple[object, tf.Tensor]:
        return self._fn(ids)


def create_group_train_fn(
    config: configs.PreprocessConfig,
    to_model_batch: ToModelBatch,
    *,
    seed: int,
    rows_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> GroupExamplesFn:
    """A group's training examples in one pass: what each member's `create_train_fn` dataset yields.

    `rows_fn` maps a client id to its raw rows (the unpreprocessed `ClientData`'s
    `serializable_dataset_fn`). For the members' ids `[K]` it gives every member's
    examples in the order its own training dataset yields them (taken, shuffled, repeated
    for the epochs; not batched), the members' runs concatenated in id order, and each
    run's length `[K]`. Batch s of member k is then rows s*B..s*B+B-1 of its run, as
    `batch(B)` cuts it.

    Why: a tf.data pipeline per member costs ~0.3 ms of CPU to build and iterate (W3: 294
    ms for 1,000 members against 132 ms for reading their rows alone, plain graph-mode TF,
    one thread). Here each member's rows are read with its own query in a while loop (one
    query over the whole group measured slower: 186-188 ms, SQLite sorts the rows), parsed
    and converted once for the group, and each member's order is computed from its count
    alone: tf.data's shuffle draws its order from the seed and the number of elements, never
    from their values, so shuffling `range(n)` with the same seed, buffer and epochs (and
    the same `_lean` options) gives member k's permutation; one such small pipeline runs
    per distinct count, not per member.
    """
    take, epochs, buffer = config.max_examples_per_client, config.epochs, config.shuffle_buffer

    def permutation(n: tf.Tensor) -> tf.Tensor:
        """The order `create_train_fn` yields n examples in, epochs included, as indices into them."""
        if buffer <= 1:
            return tf.tile(tf.range(n, dtype=tf.int64), [epochs])
        order = tf.data.Dataset.range(tf.cast(n, tf.int64)).shuffle(buffer, seed=seed).repeat(epochs)
        empty = tf.data.Dataset.from_tensors(tf.zeros([0], tf.int64))
        return _lean(order).batch(_ALL).concatenate(empty).take(1).get_single_element()

    def group_examples(ids: tf.Tensor):
        spec = rows_fn(tf.constant("")).element_spec  # traced for its spec only, never run
        # Each member's first `take` rows, as its own pipeline takes them: only those are read and parsed.
        rows, counts = read_each(ids, (lambda i: rows_fn(i).take(take)) if take > 0 else rows_fn, spec)
        examples = to_model_batch(rows)  # one parse and conversion for the whole group
        if buffer <= 1 and epochs == 1:  # each member's rows as read: no reordering
            return examples, counts
        starts = tf.cumsum(counts, exclusive=True)
        distinct, which = tf.unique(counts)
        orders = tf.map_fn(
            permutation,
            distinct,
            fn_output_signature=tf.RaggedTensorSpec([None], tf.int64, ragged_rank=0),
        )
        member_orders = tf.gather(orders, which)  # [K, epochs * count_k], ragged
        lengths = tf.cast(member_orders.row_lengths(), tf.int32)
        index = member_orders.values + tf.cast(tf.repeat(starts, lengths), tf.int64)
        return tf.nest.map_structure(lambda t: tf.gather(t, index), examples), lengths

    return GroupExamplesFn(group_examples, config.batch_size)


def read_each(ids: tf.Tensor, dataset_of: Callable[[tf.Tensor], tf.data.Dataset], element_spec) -> tuple:
    """Each id's dataset read whole: (its elements concatenated in the ids' order, each id's count `[K]`).

    `dataset_of` maps an id to a dataset of elements of `element_spec`; the result has
    that structure with a leading dimension over every id's elements. The datasets are
    read one after the other in a `tf.while_loop` (a tf.data map over the ids
    instantiates each id's nested datasets at several times the cost: W3 ~6 ms against
    ~1.5 ms a member), each into a TensorArray row, concatenated once at the end.
    """
    k = tf.size(ids)
    flat_spec = tf.nest.flatten(element_spec)
    empty = tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape], s.dtype), element_spec)

    def read(i, rows, counts):
        dataset = dataset_of(ids[i])
        whole = dataset.batch(_ALL).concatenate(tf.data.Dataset.from_tensors(empty)).take(1).get_single_element()
        flat = tf.nest.flatten(whole)
        rows = tuple(ta.write(i, t) for ta, t in zip(rows, flat, strict=True))
        return i + 1, rows, counts.write(i, tf.shape(flat[0])[0])

    rows0 = tuple(
        tf.TensorArray(s.dtype, size=k, infer_shape=False, element_shape=tf.TensorShape([None, *s.shape]))
        for s in flat_spec
    )
    _, rows, counts = tf.while_loop(
        lambda i, *_: i < k, read, (tf.constant(0), rows0, tf.TensorArray(tf.int32, size=k))
    )
    # A TensorArray of no element concatenates to nothing: a group of no member.
    flat = [
        tf.cond(ta.size() > 0, ta.concat, lambda s=s: tf.zeros([0, *s.shape], s.dtype))
        for ta, s in zip(rows, flat_spec, strict=True)
    ]
    return tf.nest.pack_sequence_as(element_spec, flat), tf.reshape(counts.stack(), [k])


def create_eval_fn(to_model_batch: ToModelBatch, batch_size: int = 100) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A deterministic transform for evaluation: every example once, large batches."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return _lean(_examples(dataset, to_model_batch).batch(batch_size))

    return preprocess


def _examples(dataset: tf.data.Dataset, to_model_batch: ToModelBatch) -> tf.data.Dataset:
    """One client's examples, read and parsed at once, then sliced into single examples.

    A client holds at most a few hundred examples, so they are read in one batch and
    converted by ops in the computation's own graph, not by a `map` function: tf.data
    instantiates and optimizes a map's function for every iterator, that is for every
    client in every round (12% of the worker's time in W2 rounds, `perf`). Shuffling the
    slices with the same seed gives the same order as shuffling the rows did.
    """
    empty = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(lambda spec: tf.zeros([0, *spec.shape], spec.dtype), dataset.element_spec)
    )  # so that a client without examples gives an empty dataset, not an error
    everything = dataset.batch(_ALL).concatenate(empty).take(1).get_single_element()
    return tf.data.Dataset.from_tensor_slices(to_model_batch(everything))


# A batch size no client reaches (tf.data reserves memory for at most 2^16 elements).
_ALL = 2**31 - 1


def _lean(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Turns off tf.data's graph rewrites and autotuning for one client's small dataset.

    TFF creates an iterator per client per round; with the defaults each creation runs
    tf.data's optimization passes (a Grappler rewrite of the dataset graph) and starts
    autotuning threads. On ~50-example clients that cost more than the training
    (benchmarks, with the earlier map-based pipeline: W2 rounds 630 -> 375 ms).
    """
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    return dataset.with_options(options)
