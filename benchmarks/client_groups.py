"""Client groups against the per-client path, in the same run (issue 21): `make bench`'s client-group rows.

  python -m benchmarks.client_groups                       # W3, W2, the default run, keyboard (make bench)
  python -m benchmarks.client_groups --rounds=2            # make bench-quick
  python -m benchmarks.client_groups --cg_workloads=w2 --group_sizes=50,100 --rounds=3 --batched
  python -m benchmarks.client_groups --preset=experiments/presets/keyboard_dp_10k.flags --cohorts=50,200,500

With --preset, the experiment `train --flagfile=<preset>` runs is timed the same way at
each cohort size of --cohorts (its --clients_per_round replaced), with the accountant's
epsilon after the preset's rounds at that cohort (the preset's noise, or the noise its
--target_epsilon solves for), and, as a projection, the rounds that fit in
--budget_seconds at the measured seconds per round and their epsilon (`time_preset`).

Each workload (`benchmarks.workloads`) runs in a child process of its own, so its peak
RSS is its own. The child builds the per-client process `train` runs
(`algorithms.build_learning_process`) and the grouped one
(`client_groups.build_learning_process` as `train` builds it: dense models' members stepping
together on the shared weights, other models' one after the other; with --member_loop also
members one after the other, with --batched also stepping together with K weight copies)
for each group size K (`auto`: what
`--client_batching=auto` picks, `client_groups.group_size`, e.g. one group a round for
dense models and one per core for recurrent ones; one group where auto would run per
client, so that the basis of its rule is timed), then times
rounds in turn on the same clients from the same state (per-client, then each grouped
variant, every round) after one warm-up round each, so a drift of the shared machine's
speed hits every variant alike. The worker keeps every variant's executor (one per
number of TFF clients a round: per client, and each group size), as a run of one variant does: until
2026-12-06 it kept two, so with three or more variants every round rebuilt each
variant's executor and instantiated its functions again, ~0.15 s of the worker's CPU a
round on W3 (`runtime.install_local_context`), which weighed on the short grouped
rounds, not on the per-client ones. A workload whose model or configuration has no grouped
path (`client_groups.GroupingError`) times the per-client path only and says why.

Measured with the standard library and procfs only: `time.perf_counter` around each
round's `next`; CPU seconds per round, this process's (`time.process_time`) plus TFF's
worker's (`/proc/<pid>/stat`), which move far less than wall time when other work
shares the cores; and peak RSS from `resource.getrusage` (`ru_maxrss`): the
coordinator's own (RUSAGE_SELF) and TFF's worker's (RUSAGE_CHILDREN once the worker has
been stopped and waited for; it is the child's only child process).

For a stack of Dense layers (linear, mlp) the parent then measures, in the same run,
the FLOP rate TF reaches on the workload's training matmuls batched across the round's
clients (`benchmarks.matmul_limit`, R = clients x batch rows) with the worker's op
threads (`TF_NUM_INTRAOP_THREADS=1`, as `runtime` starts it) and with TF's default
threads, and divides the grouped path's useful FLOP rate by it: the round's examples
times `matmul_limit.step_flops` per example, over the grouped seconds per round.

Prints a table (ratio = per-client seconds per round / grouped, the largest weight
difference after the last round relative to the largest weight as a check that both
computed the same thing) and writes benchmarks/results/client_groups-<time>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dataclasses  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  (before app.run, see benchmarks/run.py)
from absl import app, flags, logging  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

from benchmarks import matmul_limit, measurements, workloads  # noqa: E402
from tffpipe import accounting, algorithms, client_groups, configs, program, runtime, tasks  # noqa: E402
from tffpipe.data import sampling  # noqa: E402

flags.DEFINE_list("cg_workloads", ["w3", "w2", "default", "keyboard"], "Workloads (benchmarks.workloads) to time.")
flags.DEFINE_list(
    "group_sizes",
    ["auto"],
    "Group sizes K to time (each capped at clients per round; auto: --client_batching=auto's K, one group a round "
    "where auto runs per client).",
)
flags.DEFINE_integer("rounds", 3, "Timed rounds per variant, after one warm-up round.")
flags.DEFINE_bool("batched", False, "Also time groups whose members step together with K weight copies.")
flags.DEFINE_bool(
    "member_loop",
    False,
    "Also time groups whose members train one after the other (where the default steps them together).",
)
flags.DEFINE_float("matmul_seconds", 1.0, "How long each batched-matmul limit is timed.")
flags.DEFINE_string("preset", None, "Time this presets/*.flags file at each of --cohorts instead of the workloads.")
flags.DEFINE_list("cohorts", ["50", "200", "500"], "With --preset: clients per round to time it at.")
flags.DEFINE_float("budget_seconds", 1800.0, "With --preset: the wall-time budget rounds are projected into.")
flags.DEFINE_string("result_file", None, "Internal: run the one workload in this process and write its result here.")
if "cache_dir" not in flags.FLAGS:
    flags.DEFINE_string("cache_dir", "data_cache", "Where benchmark populations are generated.")
if "out_dir" not in flags.FLAGS:
    flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON results go.")
FLAGS = flags.FLAGS

# The worker's op threads (`runtime.LocalWorker`), and TF's default for the machine.
_THREAD_SETTINGS = {"worker": "1", "tf_default": ""}


def _max_relative_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(x))) for x, y in zip(a, b, strict=True))


def _scalars(metrics, prefix: str = "") -> dict[str, float]:
    """A round's nested metrics as {'a/b': value} for their numeric scalars."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "items"):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
            out[f"{prefix}{key}"] = float(value)
    return out


def dense_layers(keras_model: tf.keras.Model) -> list[tuple[int, int]] | None:
    """(in, out) of each Dense layer if the model is Flatten and Dense layers only, else None."""
    layers = []
    for layer in keras_model.layers:
        if isinstance(layer, tf.keras.layers.Dense):
            layers.append((int(layer.kernel.shape[0]), int(layer.kernel.shape[1])))
        elif not isinstance(layer, tf.keras.layers.Flatten | tf.keras.layers.InputLayer):
            return None
    return layers or None


_worker_pid: int | None = None  # TFF's worker, whose CPU time counts with ours


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of TFF's worker so far (`measurements.cpu_seconds`)."""
    return measurements.cpu_seconds(_worker_pid)


def time_workload(w: workloads.Workload, group_sizes: list[str], rounds: int) -> dict:
    """One workload's rounds, per client and grouped, alternated; see the module doc."""
    return time_config(w.config(FLAGS.cache_dir), w.to_json(), group_sizes, rounds)


def preset_config(preset: str, clients_per_round: int) -> configs.ExperimentConfig:
    """The experiment `train --flagfile=<preset> --clients_per_round=<m>` runs (flags parsed as train parses them)."""
    from experiments import flag_groups  # only here: the binaries' flags, in a FlagValues of their own

    values = absl_flags.FlagValues()
    flag_groups.define_all(values)
    values(
        ["train", f"--flagfile={preset}", f"--clients_per_round={clients_per_round}", f"--cache_dir={FLAGS.cache_dir}"]
    )
    return flag_groups.experiment_config(values)


def time_preset(preset: str, clients_per_round: int, group_sizes: list[str], rounds: int) -> dict:
    """A preset at one cohort size: its rounds per client and grouped, and the accountant's epsilon.

    Besides `time_config`'s figures: epsilon after the preset's rounds (its noise
    multiplier, solved for --target_epsilon if the preset sets one), and the rounds that
    fit in --budget_seconds at each variant's median seconds per round (a projection:
    floor(budget / seconds per round), setup and evaluation left out) with epsilon after
    those rounds at the same noise.
    """
    config = preset_config(preset, clients_per_round)
    info = {
        "name": f"{os.path.basename(preset).removesuffix('.flags')} m={clients_per_round}",
        "model": config.model,
        "clients_per_round": clients_per_round,
        "batch_size": config.preprocess.batch_size,
        "epochs": config.preprocess.epochs,
    }
    r = time_config(config, info, group_sizes, rounds)
    plan = program.prepare(config).plan
    r["privacy"] = {
        "population": plan.population,
        "noise_multiplier": plan.noise_multiplier,
        "delta": plan.delta,
        "rounds": config.loop.rounds,
        "epsilon": accounting.epsilon(plan, config.loop.rounds) if plan.is_private else None,
    }
    for v in r["variants"].values():
        fit = int(FLAGS.budget_seconds // v["seconds_per_round"]["median"])
        v["projected_rounds_in_budget"] = fit
        v["projected_epsilon"] = accounting.epsilon(plan, fit) if plan.is_private and fit else None
    return r


def time_config(config: configs.ExperimentConfig, info: dict, group_sizes: list[str], rounds: int) -> dict:
    """An experiment's rounds, per client and grouped, alternated; `info` names it in the result."""
    m = info["clients_per_round"]
    program.check(config)
    tasks.data_source(config).prepare()  # generated once per population, not timed
    prepared = program.prepare(config)
    task, plan = prepared.task, prepared.plan
    auto = client_groups.group_size(dataclasses.replace(config, client_batching="auto"), task.create_keras_model())
    # auto: what `--client_batching=auto` picks, or one group where auto runs per client (to time the rule's basis).
    sizes = sorted({(auto or m) if k == "auto" else min(int(k), m) for k in group_sizes})
    variants = {"per_client": algorithms.build_learning_process(task, config, plan)}
    per_client_only = None
    for k in sizes:
        try:
            variants[f"grouped K={k}"] = client_groups.build_learning_process(task, config, plan, k)
            if FLAGS.member_loop:
                variants[f"loop K={k}"] = client_groups.build_learning_process(task, config, plan, k, batched=False)
            if FLAGS.batched:
                variants[f"batched K={k}"] = client_groups.build_learning_process(task, config, plan, k, batched=True)
        except client_groups.GroupingError as e:
            per_client_only = str(e)
            break
    sampler = sampling.ClientSampler(task.train_data.client_ids, m, config.sampling, seed=0)
    state = variants["per_client"].initialize()
    seconds = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    clients, examples = [], []
    last, round_metrics = {}, []
    for r in range(1, rounds + 2):  # round 1: warm-up (tracing, worker start)
        ids = sampler.sample(r)
        for name, process in variants.items():
            t, c = time.perf_counter(), _cpu_seconds()
            out = process.next(state, ids)
            dt, dc = time.perf_counter() - t, _cpu_seconds() - c
            if r > 1:
                seconds[name].append(dt)
                cpu[name].append(dc)
                if name == "per_client":
                    clients.append(len(ids))
                    examples.append(float(out.metrics["client_work"]["train"]["num_examples"]))
                    round_metrics.append(_scalars(out.metrics))
            last[name] = process.get_model_weights(out.state).trainable
        state = out.state
    base = float(np.median(seconds["per_client"]))
    result = {
        "workload": info,
        "clients_per_round": float(np.median(clients)),
        "examples_per_round": float(np.median(examples)),
        "per_client_only": per_client_only,
        "dense_layers": dense_layers(task.create_keras_model()),
        "per_client_metrics": round_metrics,  # e.g. the loss, and with DP the clipped fraction
        "variants": {},
    }
    for name, values in seconds.items():
        med = float(np.median(values))
        result["variants"][name] = {
            "seconds_per_round": {"median": med, "min": min(values), "max": max(values)},
            "cpu_seconds_per_round": float(np.median(cpu[name])),
            "clients_per_second": result["clients_per_round"] / med,
            "examples_per_second": result["examples_per_round"] / med,
            "speedup_vs_per_client": base / med,
            "max_relative_weight_difference": _max_relative_difference(last["per_client"], last[name]),
        }
    return result


def _child(name: str) -> None:
    """Runs one workload (or the preset at one cohort) here and writes its result, with peak RSS, to --result_file."""
    global _worker_pid
    # Every variant's executor stays on the worker, as in a run of that variant alone (`runtime`): one
    # per group size (the variants of one K share theirs) and the per-client one.
    worker = runtime.install_local_context(cohort_sizes_kept=1 + len(FLAGS.group_sizes))
    worker.start()
    _worker_pid = worker.pid
    try:
        if FLAGS.preset:
            r = time_preset(FLAGS.preset, int(name), FLAGS.group_sizes, FLAGS.rounds)
        else:
            r = time_workload(workloads.WORKLOADS[name], FLAGS.group_sizes, FLAGS.rounds)
    finally:
        worker.stop()  # waits for it, so RUSAGE_CHILDREN has its peak
    kib = 1024  # ru_maxrss is in KiB on Linux
    r["peak_rss_bytes"] = {
        "coordinator": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
    }
    with open(FLAGS.result_file, "w") as f:
        json.dump(r, f)


def _matmul_limit(layers: list[tuple[int, int]], rows: int, threads: str) -> dict:
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=threads)
    if not threads:
        env.pop("TF_NUM_INTRAOP_THREADS")
    args = [sys.executable, "-m", "benchmarks.matmul_limit", f"--rows={rows}", f"--seconds={FLAGS.matmul_seconds}"]
    args.append("--layers=" + ",".join(f"{i}x{o}" for i, o in layers))
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def add_flop_fraction(r: dict) -> None:
    """The grouped path's useful GFLOP/s and its fraction of the batched-matmul limit, in place.

    The limit is timed three times (worker threads, TF default, worker threads again)
    right after the workload's rounds; the worker-thread figure is the median of its two.
    """
    layers = r["dense_layers"]
    grouped = [v for n, v in r["variants"].items() if n != "per_client"]
    if not layers or not grouped:
        return
    w = r["workload"]
    rows = int(r["clients_per_round"]) * w["batch_size"]
    runs = [_matmul_limit(layers, rows, _THREAD_SETTINGS[s]) for s in ("worker", "tf_default", "worker")]
    limit = {
        "worker": float(np.median([runs[0]["gflops_per_second"], runs[2]["gflops_per_second"]])),
        "tf_default": runs[1]["gflops_per_second"],
        "worker_per_cpu_second": float(np.median([runs[0]["gflops_per_cpu_second"], runs[2]["gflops_per_cpu_second"]])),
        "runs": runs,
    }
    flops_per_example = matmul_limit.step_flops([tuple(layer) for layer in layers], 1) * w["epochs"]
    r["matmul_limit"] = limit
    r["flops_per_example"] = flops_per_example
    for v in r["variants"].values():
        useful = v["examples_per_second"] * flops_per_example / 1e9
        v["useful_gflops_per_second"] = useful
        v["fraction_of_limit"] = {k: useful / limit[k] for k in ("worker", "tf_default")}
        # The same per CPU second (the round's CPU, this process and the worker): robust to other load.
        per_cpu = r["examples_per_round"] * flops_per_example / v["cpu_seconds_per_round"] / 1e9
        v["useful_gflops_per_cpu_second"] = per_cpu
        v["fraction_of_limit"]["worker_per_cpu_second"] = per_cpu / limit["worker_per_cpu_second"]


_TARGETS = {"w3": 5.0, "w3_2k": 5.0, "w2": 2.0, "keyboard": 1.5, "default": 1.0}  # issue 21's, per-client / grouped

HEADER = (
    "| workload | model | clients x examples | K | per-client clients/s | grouped clients/s | ratio (target) "
    "| CPU s/round per-client / grouped "
    "| useful GFLOP/s grouped | matmul limit GFLOP/s, worker / TF default threads "
    "| fraction of limit: worker / TF default threads / per CPU second "
    "| peak RSS coordinator / worker | weights differ |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def rows(r: dict) -> list[str]:
    """The workload's table rows: one per grouped variant, or one saying per-client only."""
    w, v0 = r["workload"], r["variants"]["per_client"]
    target = _TARGETS.get(w["name"])
    rss = r["peak_rss_bytes"]
    common = (
        f"| {w['name']} | {w['model']} | {r['clients_per_round']:.0f} x "
        f"~{r['examples_per_round'] / r['clients_per_round']:.0f} "
    )
    memory = f"| {rss['coordinator'] / 2**30:.2f} / {rss['worker'] / 2**30:.2f} GiB "
    if r["per_client_only"]:
        return [
            common + f"| per-client only | {v0['clients_per_second']:.3g} | - | - "
            f"| {v0['cpu_seconds_per_round']:.2f} / - | - | - | - "
            f"{memory}| {r['per_client_only']} |"
        ]
    out = []
    for name, v in r["variants"].items():
        if name == "per_client":
            continue
        limit = r.get("matmul_limit")
        flops = (
            (
                f"| {v['useful_gflops_per_second']:.1f} | {limit['worker']:.1f} / {limit['tf_default']:.1f} "
                f"| {v['fraction_of_limit']['worker']:.2f} / {v['fraction_of_limit']['tf_default']:.2f} "
                f"/ {v['fraction_of_limit']['worker_per_cpu_second']:.2f} "
            )
            if limit
            else "| - | - | - "
        )
        out.append(
            common + f"| {name.split('K=')[1]}{'' if name.startswith('grouped') else ' ' + name.split()[0]} "
            f"| {v0['clients_per_second']:.3g} | {v['clients_per_second']:.3g} "
            f"| **{v['speedup_vs_per_client']:.2f}x** ({'>= ' + str(target) + 'x' if target else '-'}) "
            f"| {v0['cpu_seconds_per_round']:.2f} / {v['cpu_seconds_per_round']:.2f} "
            f"{flops}{memory}| {v['max_relative_weight_difference']:.1e} |"
        )
    return out


PRESET_HEADER = (
    "| clients per round | s/round per client (CPU s) | s/round grouped (K) | ratio | noise z | epsilon after the "
    "preset's rounds | projected rounds in budget, per client / grouped | epsilon after those | peak RSS "
    "coordinator / worker |\n|---|---|---|---|---|---|---|---|---|"
)


def preset_rows(r: dict) -> list[str]:
    """One row of the preset's frontier at one cohort size."""
    v0, p, rss = r["variants"]["per_client"], r["privacy"], r["peak_rss_bytes"]
    grouped = [(n, v) for n, v in r["variants"].items() if n != "per_client"]
    eps = f"{p['epsilon']:.2f} ({p['rounds']} rounds, delta {p['delta']:.1e})" if p["epsilon"] else "-"

    def eps_of(v):
        return f"{v['projected_epsilon']:.2f}" if v.get("projected_epsilon") else "-"

    if grouped:
        name, v = grouped[0]
        group = f"{v['seconds_per_round']['median']:.1f} ({v['cpu_seconds_per_round']:.1f}) (K={name.split('K=')[1]})"
        ratio = f"{v['speedup_vs_per_client']:.2f}x"
        fit = f"{v0['projected_rounds_in_budget']} / {v['projected_rounds_in_budget']}"
        eps_fit = f"{eps_of(v0)} / {eps_of(v)}"
    else:
        group, ratio = f"per-client only: {r['per_client_only']}", "-"
        fit, eps_fit = f"{v0['projected_rounds_in_budget']} / -", f"{eps_of(v0)} / -"
    return [
        f"| {r['clients_per_round']:.0f} of {p['population']} | {v0['seconds_per_round']['median']:.1f} "
        f"({v0['cpu_seconds_per_round']:.1f}) | {group} "
        f"| {ratio} | {p['noise_multiplier']:.3f} | {eps} | {fit} | {eps_fit} "
        f"| {rss['coordinator'] / 2**30:.2f} / {rss['worker'] / 2**30:.2f} GiB |"
    ]


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    names = FLAGS.cohorts if FLAGS.preset else FLAGS.cg_workloads
    if FLAGS.result_file:
        (name,) = names
        _child(name)
        return
    unknown = [n for n in FLAGS.cg_workloads if n not in workloads.WORKLOADS]
    if unknown and not FLAGS.preset:
        raise app.UsageError(f"--cg_workloads: unknown {unknown}; known: {sorted(workloads.WORKLOADS)}")
    results = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.json")
            passed = [
                FLAGS[k].serialize() for k in ("group_sizes", "rounds", "batched", "member_loop", "matmul_seconds")
            ]
            passed += [f"--cache_dir={FLAGS.cache_dir}", f"--result_file={path}"]
            if FLAGS.preset:
                passed += [f"--preset={FLAGS.preset}", f"--cohorts={name}", f"--budget_seconds={FLAGS.budget_seconds}"]
            else:
                passed += [f"--cg_workloads={name}"]
            subprocess.run([sys.executable, "-m", "benchmarks.client_groups", *passed], check=True)
            with open(path) as f:
                r = json.load(f)
            if not FLAGS.preset:
                add_flop_fraction(r)
            results.append(r)
            header, lines = (PRESET_HEADER, preset_rows(r)) if FLAGS.preset else (HEADER, rows(r))
            print(header if len(results) == 1 else "", end="\n" if len(results) == 1 else "")
            print("\n".join(lines), flush=True)
    print(f"{time.perf_counter() - began:.0f} s")
    measurements.save_results(
        "client_groups",
        results,
        out_dir=FLAGS.out_dir,
        flag_values={
            k: FLAGS[k].value
            for k in (
                "cg_workloads",
                "group_sizes",
                "rounds",
                "batched",
                "member_loop",
                "cache_dir",
                "preset",
                "cohorts",
            )
        },
        cpu_count=os.cpu_count(),
    )


if __name__ == "__main__":
    app.run(main)
