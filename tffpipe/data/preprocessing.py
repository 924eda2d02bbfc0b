"""Client dataset pipelines: EMNIST elements to model batches, seeded."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import tensorflow as tf


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


def to_model_input(element: collections.OrderedDict) -> collections.OrderedDict:
    """EMNIST pixels (1.0 = background) to x = ink in [0, 1] as [28, 28, 1], y = [1] label."""
    return collections.OrderedDict(
        x=tf.expand_dims(1.0 - element["pixels"], -1),
        y=tf.reshape(element["label"], [1]),
    )


def create_train_fn(config: PreprocessConfig) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A serializable dataset transform for training clients."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        if config.max_examples > 0:
            dataset = dataset.take(config.max_examples)
        if config.shuffle_buffer > 1:
            dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed)
        return dataset.repeat(config.epochs).map(to_model_input).batch(config.batch_size)

    return preprocess


def create_eval_fn(batch_size: int = 100) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A deterministic transform for evaluation: every example once, large batches."""

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(to_model_input).batch(batch_size)

    return preprocess
