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
