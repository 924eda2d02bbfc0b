"""What the per-client distribution and in-training personalization cost on the default run (issue 24).

  python -m benchmarks.evaluation_cost --cache_dir=/tmp/x/data_cache --reps=12

On the default run's data and its 200 evaluation clients (`program.eval_client_ids`),
with `small_cnn` at its initial weights: (1) building the federated evaluation, pooled
only and per-client (`algorithms.build_evaluation_process(per_client=...)`), alternated;
(2) one evaluation of the 200 clients, pooled only and per-client, alternated after one
warm-up call each; (3) one `personalization.evaluate_task` of the same clients (1 epoch
at 0.01, what `train --personalize_every` runs) against one evaluation. Ratios come from
the same pass, so a drift of the shared machine's speed hits both sides alike.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from tffpipe import algorithms, configs, personalization, program, runtime

_CACHE = flags.DEFINE_string("cache_dir", "data_cache", "Where the default run's data is (generated if absent).")
_REPS = flags.DEFINE_integer("reps", 12, "Alternated evaluations of each kind (builds: a third of them).")


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main(argv) -> None:
    del argv
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
