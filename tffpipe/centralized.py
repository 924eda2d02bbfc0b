"""Centralized training of the same Keras model on the pooled client examples.

The reference point for a federated run: the accuracy a model reaches when all
examples sit on one machine, and the throughput limit of `model.fit` on the same
model and batch size.
"""

from __future__ import annotations

import dataclasses
import time

import tensorflow as tf

from tffpipe import models
from tffpipe.data import emnist_files, preprocessing


@dataclasses.dataclass(frozen=True)
class CentralizedResult:
    test_accuracy: float
    train_examples: int
    epochs: int
    examples_per_second: float


def train(
    data_dir: str,
    *,
    model_name: str,
    only_digits: bool = False,
    epochs: int = 3,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> CentralizedResult:
    """Adam on the pooled training split; accuracy on the pooled test split."""
    tf.keras.utils.set_random_seed(seed)

    def pooled(train: bool) -> tf.data.Dataset:
        rows = emnist_files.load_pooled_rows(data_dir, only_digits, train)
        return rows.batch(1024).map(preprocessing.to_model_batch).unbatch().map(lambda e: (e["x"], e["y"]))

    train_ds = pooled(True).cache()
    n = sum(1 for _ in train_ds)  # fills the cache, so epochs time the model, not SQLite
    model = models.create_model(model_name, emnist_files.NUM_CLASSES[only_digits])
    model.compile(
        tf.keras.optimizers.Adam(learning_rate),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    began = time.perf_counter()
    model.fit(train_ds.shuffle(20_000, seed=seed).batch(batch_size).prefetch(2), epochs=epochs, verbose=2)
    seconds = time.perf_counter() - began
    _, accuracy = model.evaluate(pooled(False).batch(512), verbose=0)
    return CentralizedResult(float(accuracy), n, epochs, n * epochs / seconds)
