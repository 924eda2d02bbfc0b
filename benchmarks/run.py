"""Simulation speed against the centralized limit and the TFF-tutorial loop.

  python -m benchmarks.run            # all workloads (make bench)
  python -m benchmarks.run --quick    # fewer rounds (make bench-quick)
  python -m benchmarks.run --workloads=w2 --max_concurrent_calls=1

For each workload, in one process: tffpipe's pipeline (client datasets built inside
the TFF computation from client ids), the plain TFF-tutorial pipeline
(`build_weighted_fed_avg` over `tf.data` datasets built in Python each round), and
`model.fit` on the same examples with the same model and batch (the single-machine
limit). Medians over rounds after a warm-up, with the interquartile range, peak RSS of
the whole process tree (TFF's worker included), the time from setting a workload up
(loading its data, building its process) to its first finished round, and once the
time from process start to main() (imports). Results print as a table and go to benchmarks/results/run-<time>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

# TF must be imported before absl's app.run starts main(): imported inside it, Keras
# builds Sequential models eagerly and Flatten fails on the unknown batch dimension
# (seen with TF/Keras 2.14 and absl 1.4).
import tensorflow as tf  # noqa: E402
import tensorflow_federated as tff  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import measurements, workloads  # noqa: E402
from tffpipe import algorithms, configs, program, runtime, tasks  # noqa: E402
from tffpipe.data import sampling  # noqa: E402
from tffpipe.tasks.emnist import files as emnist_files  # noqa: E402
from tffpipe.tasks.emnist import task as emnist_task  # noqa: E402

flags.DEFINE_bool("quick", False, "Fewer rounds per workload.")
flags.DEFINE_list("workloads", ["fixed", "w2", "w1", "w3", "keyboard"], "Workloads to run.")
flags.DEFINE_integer("max_concurrent_calls", -1, "TFF worker's max_concurrent_computation_calls (-1: no limit).")
flags.DEFINE_bool("baseline", True, "Also time the TFF-tutorial pipeline.")
flags.DEFINE_string("cache_dir", "data_cache", "Where benchmark populations are generated.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON results go.")
FLAGS = flags.FLAGS

_STARTED = psutil.Process().create_time()


# The workloads, here too as `benchmarks.run.WORKLOADS` (benchmarks.client_groups times the same ones).
Workload = workloads.Workload
WORKLOADS = workloads.WORKLOADS


def run_workload(w: Workload, rounds: int) -> dict:
    config = w.config(FLAGS.cache_dir)
    program.check(config)  # the same checks as train
    tasks.data_source(config).prepare()  # generated once per population, not timed
    rss = measurements.TreeRss([os.getpid()], interval=0.1)  # this process and TFF's worker
    began = time.perf_counter()
    prepared = program.prepare(config)
    task, plan = prepared.task, prepared.plan
    process = algorithms.build_learning_process(task, config, plan)  # the process train runs
    sampler = sampling.ClientSampler(task.train_data.client_ids, w.clients_per_round, config.sampling, seed=0)
    state = process.initialize()
    seconds, examples = [], []
    first_round_s = None
    for r in range(1, rounds + 2):  # round 1 is warm-up (tracing, worker start)
        ids = sampler.sample(r)
        t = time.perf_counter()
        out = process.next(state, ids)
        dt = time.perf_counter() - t
        state = out.state
        if first_round_s is None:
            first_round_s = time.perf_counter() - began
        if r > 1:
            seconds.append(dt)
            examples.append(float(out.metrics["client_work"]["train"]["num_examples"]))
    tffpipe_eps = [e / s for e, s in zip(examples, seconds, strict=True)]
    peak_after_tffpipe = rss.peak_total
    result = {
        "workload": w.to_json(),
        "rounds_timed": rounds,
        "tffpipe_seconds_per_round": measurements.stats(seconds),
        "tffpipe_examples_per_second": measurements.stats(tffpipe_eps),
        "examples_per_round": float(np.median(examples)),
        "setup_to_first_round_seconds": first_round_s,
        "peak_rss_tffpipe_phase_bytes": peak_after_tffpipe,
    }

    # The limit: model.fit on each round's examples (sequences, for text), same model, batch, SGD and loss.
    keras_model = task.create_keras_model()
    keras_model.compile(tf.keras.optimizers.SGD(0.05), task.loss_fn())
    fit_eps = []
    for r in range(1, rounds + 2):
        xs, ys = [], []
        for cid in sampler.sample(r):
            for batch in task.train_data.create_tf_dataset_for_client(cid):
                x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
                xs.append(x.numpy())
                ys.append(y.numpy())
        x, y = np.concatenate(xs), np.concatenate(ys)
        pooled = tf.data.Dataset.from_tensor_slices((x, y)).batch(w.batch_size).cache()
        list(pooled)  # materialize, so fit times the model only
        t = time.perf_counter()
        keras_model.fit(pooled, epochs=1, verbose=0)
        dt = time.perf_counter() - t
        if r > 1:
            fit_eps.append(len(x) / dt)
    result["fit_examples_per_second"] = measurements.stats(fit_eps)
    result["ratio_to_fit"] = (
        result["tffpipe_examples_per_second"]["median"] / result["fit_examples_per_second"]["median"]
    )

    if FLAGS.baseline and w.task is configs.Task.EMNIST:
        # TFF tutorial: build datasets in Python each round and pass them to next().
        parsed, _ = emnist_files.load_client_data(prepared.data_dir)
        ds = parsed.preprocess(_tutorial_preprocess)
        tut = tff.learning.algorithms.build_weighted_fed_avg(
            task.model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.05),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
        )
        tstate = tut.initialize()
        base_eps, base_s = [], []
        for r in range(1, rounds + 2):
            ids = sampler.sample(r)
            t = time.perf_counter()
            datasets = [ds.create_tf_dataset_for_client(c) for c in ids]
            out = tut.next(tstate, datasets)
            dt = time.perf_counter() - t
            tstate = out.state
            if r > 1:
                base_s.append(dt)
                base_eps.append(float(out.metrics["client_work"]["train"]["num_examples"]) / dt)
        result["tutorial_seconds_per_round"] = measurements.stats(base_s)
        result["tutorial_examples_per_second"] = measurements.stats(base_eps)
        result["speedup_over_tutorial"] = (
            result["tffpipe_examples_per_second"]["median"] / result["tutorial_examples_per_second"]["median"]
        )
    rss.stop()
    result["peak_rss_bytes"] = rss.peak_total
    return result


def _tutorial_preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The TFF image-classification tutorial's client pipeline on TFF-loader elements.

    repeat(epochs) -> batch -> map(batch_format_fn) -> prefetch, with tf.data's default
    options; no shuffle, as in tffpipe's benchmark config (shuffle_buffer=1).
    """
    return dataset.repeat(1).batch(20).map(emnist_task.to_model_batch).prefetch(10)


def _row(r: dict) -> str:
    w = r["workload"]
    tut = r.get("tutorial_examples_per_second", {}).get("median", float("nan"))
    per_client = r["examples_per_round"] / w["clients_per_round"]
    return (
        f"| {w['name']} | {w['model']} | {w['clients_per_round']} x ~{per_client:.0f} "
        f"| {r['tffpipe_seconds_per_round']['median'] * 1000:.0f} ms "
        f"({r['tffpipe_seconds_per_round']['q1'] * 1000:.0f}-{r['tffpipe_seconds_per_round']['q3'] * 1000:.0f}) "
        f"| {r['tffpipe_examples_per_second']['median']:.0f} | {r['fit_examples_per_second']['median']:.0f} "
        f"| {r['ratio_to_fit']:.2f} | {tut:.0f} | {r.get('speedup_over_tutorial', float('nan')):.2f} "
        f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['setup_to_first_round_seconds']:.1f} s |"
    )


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    startup = time.time() - _STARTED  # interpreter start and imports (TF, TFF) until main()
    print(f"process start to main(): {startup:.1f} s", flush=True)
    worker = runtime.install_local_context(max_concurrent_computation_calls=FLAGS.max_concurrent_calls)
    results = []
    header = (
        "| workload | model | clients x examples | s/round (IQR) | tffpipe ex/s | fit ex/s | ratio "
        "| tutorial ex/s | vs tutorial | peak RSS | setup to 1st round |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    try:
        for name in FLAGS.workloads:
            w = WORKLOADS[name]
            r = run_workload(w, w.quick_rounds if FLAGS.quick else w.rounds)
            r["max_concurrent_calls"] = FLAGS.max_concurrent_calls
            results.append(r)
            print(header if len(results) == 1 else "", end="\n" if len(results) == 1 else "")
            print(_row(r), flush=True)
    finally:
        worker.stop()
    measurements.save_results(
        "run",
        results,
        out_dir=FLAGS.out_dir,
        flag_values=FLAGS.flag_values_dict(),
        cpu_count=os.cpu_count(),
        startup_seconds=startup,
    )


if __name__ == "__main__":
    app.run(main)
