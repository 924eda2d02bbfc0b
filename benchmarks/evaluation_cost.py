"""What the per-client distribution and in-training personalization cost on the default run (issue 24).

  python -m benchmarks.evaluation_cost --cache_dir=/tmp/x/data_cache --reps=12

On the default run's data and its 200 evaluation clients (`program.eval_client_ids`),
with `small_cnn` at its initial weights: (1) building the federated evaluation, pooled
only and per-client (`algorithms.build_evaluation_process(per_client=...)`), alternated;
(2) one evaluation of the 200 clients, pooled only and per-client, alternated after one
warm-up call each; (3) one `personalization.evaluate_task` of the same clients (1 epoch
at 0.01, what `train --personalize_every` runs) against one evaluation. Ratios come from
the same pass, so a drift of the shared machine's speed hits both sides alike.

With --grouped (issue 21), instead: per-client and grouped evaluation
(`group_evaluation.build_evaluation_process` with `client_batching` off and K) of the
same held-out clients at the same weights, alternated after one warm-up call each, on
--eval_workloads (benchmarks.workloads): the default run's 200 evaluation clients
(small_cnn), and W2/W3-like populations whose evaluation takes as many held-out clients
as their rounds train (mlp 100, linear 1,000 of ~2 test examples each). Wall seconds
and CPU seconds (this process and TFF's worker, from /proc) per evaluation, their
per-client / grouped ratios, and the largest relative difference of the pooled metrics:

  python -m benchmarks.evaluation_cost --grouped --cache_dir=/tmp/x/data_cache --reps=5
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import app, flags

from benchmarks import measurements, workloads
from tffpipe import algorithms, configs, group_evaluation, personalization, program, runtime, tasks

_CACHE = flags.DEFINE_string("cache_dir", "data_cache", "Where the default run's data is (generated if absent).")
_REPS = flags.DEFINE_integer("reps", 12, "Alternated evaluations of each kind (builds: a third of them).")
_GROUPED = flags.DEFINE_bool("grouped", False, "Time per-client against grouped evaluation instead (module doc).")
_EVAL_WORKLOADS = flags.DEFINE_list("eval_workloads", ["default", "w2", "w3_2k"], "With --grouped: workloads to time.")
_GROUP_SIZES = flags.DEFINE_list(
    "group_sizes", ["auto"], "With --grouped: K held-out clients per group; auto: what --client_batching=auto picks."
)


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main(argv) -> None:
    del argv
    if _GROUPED.value:
        for name in _EVAL_WORKLOADS.value:
            _time_grouped(workloads.WORKLOADS[name])
        return
    config = configs.ExperimentConfig(data=configs.DataConfig(cache_dir=_CACHE.value))
    task = program.prepare(config).task
    ids = program.eval_client_ids(task.test_data.client_ids, config)
    worker = runtime.install_local_context()
    try:

        def build(per_client: bool):
            process = task.compose_eval(
                algorithms.build_evaluation_process(task.learning_model(), per_client=per_client)
            )
            return process, process.initialize()

        build(False)  # TF and TFF warm
        builds = {False: [], True: []}
        for _ in range(max(1, _REPS.value // 3)):
            for per_client in (False, True):
                builds[per_client].append(_timed(lambda p=per_client: build(p)))
        _report("build", builds)
        processes = {per_client: build(per_client) for per_client in (False, True)}
        for process, state in processes.values():
            process.next(state, ids)  # warm-up call
        evals = {False: [], True: []}
        for _ in range(_REPS.value):
            for per_client, (process, state) in processes.items():
                evals[per_client].append(_timed(lambda p=process, s=state: p.next(s, ids)))
        _report(f"one evaluation of {len(ids)} clients", evals)
        model = task.create_keras_model()
        settings = configs.PersonalizationConfig(every=10, learning_rate=0.01)
        process, state = processes[True]
        for _ in range(2):
            evaluation = _timed(lambda: process.next(state, ids))
            fine_tuning = _timed(
                lambda: personalization.evaluate_task(
                    model, task, ids, settings, client_learning_rate=0.1, batch_size=config.preprocess.batch_size
                )
            )
            print(
                f"personalization {fine_tuning:.2f} s, evaluation {evaluation:.2f} s: "
                f"ratio {fine_tuning / evaluation:.1f}"
            )
    finally:
        worker.stop()


def _time_grouped(w: workloads.Workload) -> None:
    """Per-client and grouped evaluations of one workload's held-out clients, alternated (module doc)."""
    config = w.config(_CACHE.value)
    if not w.default_run:  # as many held-out clients as a round trains, at least the default 200
        config = dataclasses.replace(config, eval_clients=max(config.eval_clients, w.clients_per_round))
    program.check(config)
    tasks.data_source(config).prepare()  # generated once, not timed
    task = program.prepare(config).task
    ids = program.eval_client_ids(task.test_data.client_ids, config)
    # Every variant's executor stays on the worker, as in a run of that variant alone (`runtime`).
    worker = runtime.install_local_context(cohort_sizes_kept=1 + len(_GROUP_SIZES.value))
    try:
        auto = group_evaluation.group_size(
            dataclasses.replace(config, client_batching="auto"), task.create_keras_model(), len(ids)
        )
        sizes = sorted({(auto or len(ids)) if k == "auto" else min(int(k), len(ids)) for k in _GROUP_SIZES.value})
        per_client = dataclasses.replace(config, client_batching="off")  # whatever the workload sets
        variants = {"per_client": group_evaluation.build_evaluation_process(task, per_client, len(ids))}
        for k in sizes:
            variants[f"K={k}"] = group_evaluation.build_grouped_evaluation_process(task, k)
        weights = variants["per_client"].get_model_weights(variants["per_client"].initialize())
        states = {n: p.set_model_weights(p.initialize(), weights) for n, p in variants.items()}
        pooled = {}
        for n, p in variants.items():  # warm-up call, and the metrics compared
            metrics = dict(p.next(states[n], ids).metrics["client_work"]["eval"]["current_round_metrics"])
            metrics.pop("per_client")
            pooled[n] = metrics
        wall, cpu = {n: [] for n in variants}, {n: [] for n in variants}
        for _ in range(_REPS.value):
            for n, p in variants.items():
                began, began_cpu = time.perf_counter(), measurements.cpu_seconds(worker.pid)
                p.next(states[n], ids)
                wall[n].append(time.perf_counter() - began)
                cpu[n].append(measurements.cpu_seconds(worker.pid) - began_cpu)
        print(f"{w.name} ({config.model}, {len(ids)} held-out clients, auto K={auto}, load {os.getloadavg()[0]:.1f}):")
        base_wall, base_cpu = np.array(wall["per_client"]), np.array(cpu["per_client"])
        for n in variants:
            ratio, cpu_ratio = base_wall / np.array(wall[n]), base_cpu / np.array(cpu[n])
            difference = max(
                abs(float(v) - float(pooled["per_client"][k])) / max(abs(float(pooled["per_client"][k])), 1e-12)
                for k, v in pooled[n].items()
            )
            print(
                f"  {n}: wall median {np.median(wall[n]):.3f} s, CPU median {np.median(cpu[n]):.3f} s; "
                f"per-client/this wall {np.round(ratio, 2).tolist()} (median {np.median(ratio):.2f}), "
                f"CPU median {np.median(cpu_ratio):.2f}; pooled metrics max rel. difference {difference:.1e}",
                flush=True,
            )
    finally:
        worker.stop()


def _report(what: str, times: dict[bool, list[float]]) -> None:
    pooled, per_client = np.array(times[False]), np.array(times[True])
    print(
        f"{what}: pooled only median {np.median(pooled):.2f} s, per-client median {np.median(per_client):.2f} s; "
        f"per-client/pooled ratios {np.round(per_client / pooled, 2).tolist()}, "
        f"median {np.median(per_client / pooled):.2f}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
