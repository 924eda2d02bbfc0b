"""Where a round's per-client time goes, outside the training arithmetic.

  python -m benchmarks.overhead                 # W2's setting: mlp, 100 clients x ~49 examples
  python -m benchmarks.overhead --clients=10

Times, in TFF's C++ worker and over the same clients, computations that each do one
part of a FedAvg round: a trivial per-client call, broadcasting the model and
averaging it back, building and reading every client's training dataset (in a call of
its own, as `tff.simulation`'s composition does, and inside the reading call, as
`tffpipe.fusion` does), and the whole round. Medians over repeats,
as ms per round and per client.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  (before app.run, see benchmarks/run.py)
import tensorflow_federated as tff  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from tffpipe import algorithms, configs, runtime  # noqa: E402
from tffpipe.tasks.emnist import files as emnist_files  # noqa: E402
from tffpipe.tasks.emnist import generator  # noqa: E402
from tffpipe.tasks.emnist import task as emnist_task  # noqa: E402

flags.DEFINE_string("model", "mlp", "Model whose size is broadcast and averaged.")
flags.DEFINE_integer("clients", 100, "Clients per call.")
flags.DEFINE_integer("repeats", 8, "Timed calls per part, after one warm-up call.")
flags.DEFINE_string("cache_dir", "data_cache", "Where the population is generated.")
FLAGS = flags.FLAGS


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: tracing, sessions
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    worker = runtime.install_local_context()
    population = configs.PopulationConfig(num_writers=1000, median_examples=56, quantity_sigma=0.0, seed=42)
    train, test = emnist_files.load_client_rows(generator.ensure_generated(FLAGS.cache_dir, population))
    prep = configs.PreprocessConfig(epochs=1, batch_size=20, shuffle_buffer=1)
    task = emnist_task.create_task_from_client_data(
        train, test, num_classes=62, model_name=FLAGS.model, preprocess=prep
    )
    ids = train.client_ids[: FLAGS.clients]
    client_ids = tff.FederatedType(np.str_, tff.CLIENTS)

    @tff.tensorflow.computation(np.str_)
    def one(_):
        return tf.constant(1)

    @tff.federated_computation(client_ids)
    def trivial(cids):
        return tff.federated_sum(tff.federated_map(one, cids))

    weights = tff.TensorType(np.float32, [task.model_info.num_parameters])

    @tff.tensorflow.computation(weights)
    def scale(w):
        return w * 1.0

    @tff.federated_computation(tff.FederatedType(weights, tff.SERVER), client_ids)
    def broadcast_mean(w, cids):
        del cids
        return tff.federated_mean(tff.federated_map(scale, tff.federated_broadcast(w)))

    make_dataset = task.train_data.dataset_computation

    @tff.tensorflow.computation(make_dataset.type_signature.result)
    def count(dataset):
        return dataset.reduce(np.int32(0), lambda n, batch: n + tf.shape(batch["y"])[0])

    @tff.federated_computation(client_ids)
    def datasets_across_calls(cids):
        return tff.federated_sum(tff.federated_map(count, tff.federated_map(make_dataset, cids)))

    @tff.tensorflow.computation(np.str_)
    def count_from_id(cid):
        return count(make_dataset(cid))  # one graph, as tffpipe.fusion builds a round's client work

    @tff.federated_computation(client_ids)
    def datasets_in_one_call(cids):
        return tff.federated_sum(tff.federated_map(count_from_id, cids))

    process = task.compose_train(algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig()))
    state = process.initialize()
    zeros = np.zeros(task.model_info.num_parameters, np.float32)
    parts = {
        "trivial per-client call + sum": lambda: trivial(ids),
        f"broadcast + per-client map + mean ({zeros.size:,} floats)": lambda: broadcast_mean(zeros, ids),
        "build + read each client's dataset, two calls": lambda: datasets_across_calls(ids),
        "build + read each client's dataset, one call (as in a round)": lambda: datasets_in_one_call(ids),
        "whole FedAvg round (1 epoch)": lambda: process.next(state, ids),
    }
    print(f"{FLAGS.model}, {len(ids)} clients, medians of {FLAGS.repeats} calls")
    print("| part | ms per call | ms per client |\n|---|---|---|")
    try:
        for name, fn in parts.items():
            ms = _median_ms(fn, FLAGS.repeats)
            print(f"| {name} | {ms:.0f} | {ms / len(ids):.2f} |", flush=True)
    finally:
        worker.stop()


if __name__ == "__main__":
    app.run(main)
