"""Per-round cost of each DP aggregator, and Keras-wrapped versus functional TFF models.

  python -m benchmarks.aggregators [--rounds=6] [--clients_per_round=50] [--model=small_cnn]

Same data, model and clients per round for every variant; medians of rounds 2.. (round 1
traces and starts the worker). Prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import collections  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  (before app.run: see benchmarks/run.py)
import tensorflow_federated as tff  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from tffpipe import accounting, aggregation, algorithms, configs, runtime  # noqa: E402
from tffpipe.data import sampling  # noqa: E402
from tffpipe.tasks.emnist import files as emnist_files  # noqa: E402
from tffpipe.tasks.emnist import generator  # noqa: E402
from tffpipe.tasks.emnist import task as emnist_task  # noqa: E402

flags.DEFINE_integer("rounds", 6, "Rounds per variant (the first is not timed).")
flags.DEFINE_integer("clients_per_round", 50, "Clients per round.")
flags.DEFINE_string("model", "small_cnn", "Model.")
flags.DEFINE_string("cache_dir", "data_cache", "Embedded data cache.")
flags.DEFINE_list("variants", ["none", "fixed", "adaptive", "tree", "zeroing", "functional"], "Variants to time.")
FLAGS = flags.FLAGS

M = configs.Mechanism


def _time_rounds(process, sampler) -> tuple[float, float]:
    state = process.initialize()
    seconds = []
    for r in range(1, FLAGS.rounds + 1):
        t = time.perf_counter()
        state = process.next(state, sampler.sample(r)).state
        if r > 1:
            seconds.append(time.perf_counter() - t)
    q1, median, q3 = np.percentile(seconds, [25, 50, 75])
    return median, q3 - q1


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    worker = runtime.install_local_context()
    data_dir = generator.ensure_generated(FLAGS.cache_dir, configs.PopulationConfig())
    train, test = emnist_files.load_client_rows(data_dir)
    prep = configs.PreprocessConfig(epochs=1)
    task = emnist_task.create_task_from_client_data(
        train, test, num_classes=62, model_name=FLAGS.model, preprocess=prep
    )
    sampler = sampling.ClientSampler(train.client_ids, FLAGS.clients_per_round, configs.Sampling.UNIFORM, 0)
    config = algorithms.AlgorithmConfig()
    m = FLAGS.clients_per_round
    print(f"model {FLAGS.model}, {m} clients per round, 1 epoch, batch 20; median s/round over {FLAGS.rounds - 1}")
    print("| variant | s/round | IQR |\n|---|---|---|")
    variants = {
        "none": ("none (weighted mean)", configs.DpConfig(M.NONE)),
        "fixed": ("fixed z=1", configs.DpConfig(M.FIXED, 1.0, 1.0)),
        "adaptive": ("adaptive z=1", configs.DpConfig(M.ADAPTIVE, 1.0, 1.0)),
        "tree": ("tree z=1", configs.DpConfig(M.TREE, 1.0, 1.0)),
        "zeroing": ("fixed z=1 + zeroing", configs.DpConfig(M.FIXED, 1.0, 1.0, zeroing_norm=10.0)),
    }
    try:
        for key in FLAGS.variants:
            if key not in variants:
                continue
            name, dp = variants[key]
            plan = accounting.PrivacyPlan(
                dp.mechanism,
                dp.given_noise_multiplier,
                m,
                len(train.client_ids),
                configs.default_sampling(dp.mechanism),
                1e-5,
            )
            factory = aggregation.build_factory(dp, plan, noise_seed=0)
            # The Keras-wrapped model, as before the switch to functional models.
            process = task.compose_train(algorithms.build_training_process(task.model_fn, config, aggregator=factory))
            median, iqr = _time_rounds(process, sampler)
            print(f"| {name} | {median:.3f} | {iqr:.3f} |", flush=True)
        if "functional" not in FLAGS.variants:
            return
        # The same FedAvg with TFF's functional model instead of the Keras-wrapped one.
        functional = tff.learning.models.functional_model_from_keras(
            task.create_keras_model(),
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            task.input_spec,
            metrics_constructor=lambda: collections.OrderedDict(accuracy=tf.keras.metrics.SparseCategoricalAccuracy()),
        )
        process = task.compose_train(algorithms.build_training_process(functional, config))
        median, iqr = _time_rounds(process, sampler)
        print(f"| none, functional model | {median:.3f} | {iqr:.3f} |", flush=True)
    finally:
        worker.stop()


if __name__ == "__main__":
    app.run(main)
