"""Client dataset pipelines: EMNIST elements to model batches, seeded, without tf.data functions."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping

import tensorflow as tf

from tffpipe.data import emnist_files


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How one client's examples become training batches.

    Attributes:
      epochs: local passes over the client's data per round.
      batch_size: examples per local step.
      shuffle_buffer: shuffle window; 1 disables shuffling.
      max_examples: cap on a client's examples per round (-1: all), as devices cap work.
      seed: shuffle seed; the same seed gives the same order on every run, so a
        resumed run replays exactly what an uninterrupted one computes.
    """

    epochs: int = 1
    batch_size: int = 20
    shuffle_buffer: int = 100
    max_examples: int = -1
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_examples == 0 or self.max_examples < -1:
            raise ValueError(f"max_examples must be positive or -1 (all), got {self.max_examples}")


def to_model_batch(batch) -> collections.OrderedDict:
    """A batch of EMNIST elements, or of serialized rows, to the model's input.

    x = ink in [0, 1] as [B, 28, 28, 1] (EMNIST pixels have 1.0 = background), y = the
    label as [B, 1]. Takes parsed elements (TFF's loader, `emnist_files.load_client_data`)
    or serialized tf.train.Example rows (`emnist_files.load_client_rows`), which it
    parses as one batch.
    """
    if not isinstance(batch, Mapping):
        batch = emnist_files.parse(batch)
    return collections.OrderedDict(
        x=tf.expand_dims(1.0 - batch["pixels"], -1),
        y=tf.reshape(batch["label"], [-1, 1]),
    )


def create_train_fn(config: PreprocessConfig) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A serializable dataset transform for training clients: rows or elements to batches."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        if config.max_examples > 0:
            dataset = dataset.take(config.max_examples)
        examples = _examples(dataset)
        if config.shuffle_buffer > 1:
            examples = examples.shuffle(config.shuffle_buffer, seed=config.seed)
        return _lean(examples.repeat(config.epochs).batch(config.batch_size))

    return preprocess


def create_eval_fn(batch_size: int = 100) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A deterministic transform for evaluation: every example once, large batches."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return _lean(_examples(dataset).batch(batch_size))

    return preprocess


def _examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
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
