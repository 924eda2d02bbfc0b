"""Centralized training of the same Keras model on the pooled client examples.

The reference point for a federated run: the accuracy a model reaches when all
examples sit on one machine, and the throughput limit of `model.fit` on the same
model and batch size.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf

from tffpipe import configs, models
from tffpipe.tasks.emnist import files as emnist_files
from tffpipe.tasks.emnist import task as emnist_task


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
        return rows.batch(1024).map(emnist_task.to_model_batch).unbatch().map(lambda e: (e["x"], e["y"]))

    train_ds = pooled(True).cache()
    n = sum(1 for _ in train_ds)  # fills the cache, so epochs time the model, not SQLite
    model = models.create_model(model_name, configs.Task.EMNIST, emnist_files.NUM_CLASSES[only_digits])
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


def train_keyboard(
    *,
    model_name: str,
    epochs: int = 3,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    cache_dir: str,
    seed: int = 0,
) -> dict[str, float]:
    """Adam on every user's training messages pooled; the task's own metrics on the pooled test split.

    The messages go through the task's own preprocessing (TFF's token ids), applied once
    to all rows of a split rather than once per user.
    """
    from tffpipe import tasks
    from tffpipe.tasks.keyboard import files as keyboard_files
    from tffpipe.tasks.keyboard import task as keyboard_task

    config = configs.build(
        {
            "task": configs.Task.KEYBOARD,
            "model": model_name,
            "data.cache_dir": cache_dir,
            "preprocess.epochs": 1,
            "preprocess.batch_size": 1024,
            "dp.mechanism": configs.Mechanism.NONE,
        }
    )
    data = tasks.data_source(config)
    data_dir = data.prepare()
    text = config.data.text
    vocab = keyboard_files.read_vocabulary(data_dir, text.vocab_size)
    path = keyboard_files.database_path(data_dir)

    def pooled(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = tf.data.experimental.SqlDataset(
            "sqlite", path, f"SELECT serialized_example_proto FROM examples WHERE split_name = '{split}'", tf.string
        )
        batches = keyboard_task.create_eval_fn(text, vocab)(rows)
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in batches], strict=True)
        return np.concatenate(xs), np.concatenate(ys)

    (x, y), (tx, ty) = pooled("train"), pooled("test")
    tf.keras.utils.set_random_seed(seed)
    model = models.create_model(model_name, configs.Task.KEYBOARD, data.num_classes)
    metrics = keyboard_task.create_metrics(text)
    model.compile(
        tf.keras.optimizers.Adam(learning_rate),
        keyboard_task.MaskedCrossEntropy(keyboard_task.special_tokens(text).padding),
        metrics=[metrics["accuracy"], metrics["top3_accuracy"], metrics["perplexity"]],
    )
    began = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=2)
    seconds = time.perf_counter() - began
    results = model.evaluate(tx, ty, batch_size=256, verbose=0, return_dict=True)
    return {**results, "train_sequences": len(x), "sequences_per_second": len(x) * epochs / seconds}


def main(argv) -> None:
    del argv
    if FLAGS.task == "keyboard":
        result = train_keyboard(model_name=FLAGS.model, epochs=FLAGS.epochs, cache_dir=FLAGS.cache_dir)
        print(
            f"{FLAGS.model} (keyboard, {FLAGS.epochs} epochs): " + ", ".join(f"{k} {v:.4g}" for k, v in result.items())
        )
        return
    from tffpipe.tasks.emnist import generator

    data_dir = FLAGS.data_dir or generator.ensure_generated(FLAGS.cache_dir, configs.PopulationConfig())
    result = train(data_dir, model_name=FLAGS.model, epochs=FLAGS.epochs)
    print(
        f"{FLAGS.model}: test accuracy {result.test_accuracy:.4f} after {result.epochs} epochs on "
        f"{result.train_examples:,} examples ({result.examples_per_second:,.0f} examples/s)"
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("task", "emnist", ["emnist", "keyboard"], "Task (the embedded data of its defaults).")
    flags.DEFINE_string("model", "small_cnn", "A registered model of the task.")
    flags.DEFINE_integer("epochs", 3, "Epochs over the pooled training split.")
    flags.DEFINE_string("data_dir", None, "A real emnist_all.sqlite directory; unset: the embedded default data.")
    flags.DEFINE_string("cache_dir", "data_cache", "Where the embedded data is generated.")
    FLAGS = flags.FLAGS
    app.run(main)
