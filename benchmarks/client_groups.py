"""Rounds per second of client groups against the per-client path, in the same run (issue 21).

  python -m benchmarks.client_groups                                  # W3-like and W2-like
  python -m benchmarks.client_groups --cg_workloads=w2 --group_sizes=50,100 --rounds=3 --batched

For each workload (`benchmarks.run.WORKLOADS`: FedAvg, 1 epoch, batch 20, no DP, the
rounds' clients from one seeded sampler), one process builds the per-client process
`train` runs (`algorithms.build_learning_process`) and the grouped one
(`client_groups.build_learning_process`, members one after the other; with --batched
also all members stepping together) for each group size K, then times rounds in turn on the same clients
from the same state (per-client, then each grouped variant, every round) after one
warm-up round each, so a drift of the shared machine's speed hits every variant alike.
It prints the median, min and max seconds per round, the ratio of medians (per-client /
grouped) and the largest difference of the weights after the last round relative to
the largest weight (a check that both computed the same thing). Results also go to
benchmarks/results/client_groups-<time>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402, F401  (before app.run, see benchmarks/run.py)
from absl import app, flags, logging  # noqa: E402

from benchmarks import run as bench  # noqa: E402
from tffpipe import algorithms, client_groups, program, runtime, tasks  # noqa: E402
from tffpipe.data import sampling  # noqa: E402

flags.DEFINE_list("cg_workloads", ["w3_2k", "w2"], "Workloads of benchmarks.run to time.")
flags.DEFINE_list("group_sizes", ["100", "1000"], "Group sizes K to time (each capped at clients per round).")
flags.DEFINE_integer("rounds", 3, "Timed rounds per variant, after one warm-up round.")
flags.DEFINE_bool("batched", False, "Also time groups whose members take their steps together.")
FLAGS = flags.FLAGS


def _max_relative_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(x))) for x, y in zip(a, b, strict=True))


def time_workload(w: bench.Workload, group_sizes: list[int], rounds: int) -> dict:
    config = w.config(FLAGS.cache_dir)
    program.check(config)
    tasks.data_source(config).prepare()  # generated once per population, not timed
    prepared = program.prepare(config)
    task, plan = prepared.task, prepared.plan
    sizes = sorted({min(k, w.clients_per_round) for k in group_sizes})
    variants = {"per_client": algorithms.build_learning_process(task, config, plan)}
    for k in sizes:
        variants[f"loop K={k}"] = client_groups.build_learning_process(task, config, plan, k)
        if FLAGS.batched:
            variants[f"batched K={k}"] = client_groups.build_learning_process(task, config, plan, k, batched=True)
    sampler = sampling.ClientSampler(task.train_data.client_ids, w.clients_per_round, config.sampling, seed=0)
    state = variants["per_client"].initialize()
    seconds = {name: [] for name in variants}
    last = {}
    for r in range(1, rounds + 2):  # round 1: warm-up (tracing, worker start)
        ids = sampler.sample(r)
        for name, process in variants.items():
            t = time.perf_counter()
            out = process.next(state, ids)
            dt = time.perf_counter() - t
            if r > 1:
                seconds[name].append(dt)
            last[name] = process.get_model_weights(out.state).trainable
        state = out.state
    base = float(np.median(seconds["per_client"]))
    result = {"workload": w.name, "model": w.model, "clients_per_round": w.clients_per_round, "variants": {}}
    for name, values in seconds.items():
        med = float(np.median(values))
        result["variants"][name] = {
            "seconds_per_round": {"median": med, "min": min(values), "max": max(values)},
            "clients_per_second": w.clients_per_round / med,
            "speedup_vs_per_client": base / med,
            "max_relative_weight_difference": _max_relative_difference(last["per_client"], last[name]),
        }
    return result


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    worker = runtime.install_local_context()
    results = []
    try:
        for name in FLAGS.cg_workloads:
            r = time_workload(bench.WORKLOADS[name], [int(k) for k in FLAGS.group_sizes], FLAGS.rounds)
            results.append(r)
            print(f"{r['workload']} ({r['model']}, {r['clients_per_round']} clients per round), {FLAGS.rounds} rounds:")
            for variant, v in r["variants"].items():
                s = v["seconds_per_round"]
                print(
                    f"  {variant:>12}: {s['median'] * 1e3:8.1f} ms/round (min {s['min'] * 1e3:.1f}, "
                    f"max {s['max'] * 1e3:.1f}), {v['clients_per_second']:8.0f} clients/s, "
                    f"x{v['speedup_vs_per_client']:.2f}, weights differ by {v['max_relative_weight_difference']:.1e}",
                    flush=True,
                )
    finally:
        worker.stop()
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    path = os.path.join(FLAGS.out_dir, time.strftime("client_groups-%Y%m%d-%H%M%S") + ".json")
    with open(path, "w") as f:
        json.dump(
            {"results": results, "flags": {k: FLAGS[k].value for k in ("group_sizes", "rounds", "batched")}},
            f,
            indent=1,
        )
    print(f"results in {path}")


if __name__ == "__main__":
    app.run(main)
