"""Several workers on one machine: what a second worker buys, and what the remote path costs.

  python -m benchmarks.workers                        # part of make bench
  python -m benchmarks.workers --workloads=w1 --repeats=3

Times `experiments.train` from outside as `benchmarks.wall` does, per workload, in
these configurations, alternated within each pass so that the machine's drift hits all
of them alike:

  local       the default: one local worker, not pinned
  remote 1    one `experiments.worker` service on loopback (`--workers=`): the distributed path
  1 pinned    `--local_workers=1 --pin_workers`: one worker on one CPU
  2 pinned    `--local_workers=2 --pin_workers`: two workers on one CPU each

and reports each with the speedup of "2 pinned" over "1 pinned" and the overhead of
"remote 1" over "local" (ratios of the median wall time between rounds). The coordinator
is not pinned: with two pinned workers it shares their CPUs, as it would not on a cluster,
so its CPU per round is reported too.

  python -m benchmarks.workers --workloads=w1 --per_worker=1,2,4 --repos=/tmp/before,.

instead times only `--local_workers=N --pin_workers` at each N, for each checkout in
`--repos` (alternated within each pass), and reports the coordinator's CPU per round at
each N and per added worker: what the coordinator spends on one more worker (issue 22);
the workers' CPU per round likewise, the 1 -> 2 workers ratio of wall times, and the
round extrapolated to `--extrapolate` workers from those per-worker costs:

  round(N) = C(1) + c (N - 1) + (K(1) + k (N - 1)) / N

C, K the coordinator's and all workers' CPU per round, as lines fitted by least squares
over the counts measured, c, k their slopes (the round is the coordinator's CPU plus the workers' CPU over N,
within 3% in issue 15's measurements: the coordinator is on the critical path).
`--rounds` shortens the runs (the CPU is taken over rounds 3 .. R-1). `--train_flags` adds
flags to every run (e.g. `--train_flags=--client_batching=auto` for W3 in groups).

  python -m benchmarks.workers --watchdog --workloads=w1 --rounds=6

instead runs the first workload's rounds in this process over one worker on loopback TCP
(as `experiments.worker` serves), reached as a remote worker whose calls are watched
(`runtime._Watchdog`, the remote path's default) and as one whose calls are not, alternated
round by round from the same state: the watchdog's cost in wall time and in this process's
and the worker's CPU per round.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

# TensorFlow, TFF and tffpipe are imported here, not in `watchdog_cost`: imported there (after
# absl's app.run started), the cnn's model check failed in Keras's Sequential.add with an
# IndexError on its builder thread (`models.check_builder`), every time, in a clean clone
# too; not understood.
import numpy as np
from absl import app, flags
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from benchmarks import measurements, wall
from tffpipe import algorithms, program, runtime, tasks
from tffpipe.data import sampling

# benchmarks.wall's flags (--workloads, --repeats, --cache_dir, --out_dir, --repo), other defaults.
FLAGS = flags.FLAGS
FLAGS.set_default("workloads", ["w2", "w1", "w1e5"])
FLAGS.set_default("repeats", 2)
flags.DEFINE_list("per_worker", [], "Pinned worker counts (e.g. 1,2,4): the coordinator's CPU per added worker.")
flags.DEFINE_list("repos", ["."], "With --per_worker: checkouts to compare in the same passes (e.g. before a change).")
flags.DEFINE_integer("rounds", 0, "With --per_worker: rounds per run (>= 4), 0 for the workload's own.")
flags.DEFINE_integer("extrapolate", 64, "With --per_worker: the worker count to extrapolate the round to.")
flags.DEFINE_bool("watchdog", False, "Instead: a loopback remote worker's rounds watched and unwatched, alternated.")

# name: (training flags, remote workers)
CONFIGS = {
    "local": ([], 0),
    "remote 1": ([], 1),
    "1 pinned": (["--local_workers=1", "--pin_workers"], 0),
    "2 pinned": (["--local_workers=2", "--pin_workers"], 0),
}


def _median_wall(summary: dict) -> float:
    return summary["wall_between_rounds"]["median"]


def per_worker(counts: list[int], repos: list[str]) -> dict:
    """Coordinator CPU per round at each pinned worker count, per checkout, alternated within each pass."""
    results = {}
    for name in FLAGS.workloads:
        w = wall.WORKLOADS[name]
        if FLAGS.rounds:
            w = dataclasses.replace(w, wall_rounds=FLAGS.rounds)
        wall.generate(w, FLAGS.cache_dir, repos[0])
        runs = {(repo, n): [] for repo in repos for n in counts}
        for _ in range(FLAGS.repeats):
            for n in counts:  # the checkouts side by side at each count: drift between them stays small
                for repo in repos:
                    extra = [f"--local_workers={n}", "--pin_workers", *FLAGS.train_flags]
                    runs[repo, n].append(wall.run_once(w, FLAGS.cache_dir, repo, extra))
        far = FLAGS.extrapolate
        print(
            f"| {name}, checkout | "
            + " | ".join(f"{n} workers" for n in counts)
            + f" | per added worker | workers' CPU: 1 worker, per added | 1 -> 2 wall | round at {far} (extrapolated) |"
        )
        print("|---" * (len(counts) + 5) + "|")
        for repo in repos:
            summaries = {n: wall.summarize(w, runs[repo, n]) for n in counts}
            cpu = {n: s["cpu_seconds_coordinator_per_round"] for n, s in summaries.items()}
            work = {n: s["cpu_seconds_workers_per_round"] for n, s in summaries.items()}
            # Least squares over the counts: the coordinator's (and the workers') CPU for one more worker.
            slope, intercept = (float(v) for v in np.polyfit(counts, [cpu[n] for n in counts], 1))
            work_slope, work_intercept = (float(v) for v in np.polyfit(counts, [work[n] for n in counts], 1))
            coordinator_1, work_1 = intercept + slope, work_intercept + work_slope  # the fits at N = 1
            at_far = coordinator_1 + slope * (far - 1) + (work_1 + work_slope * (far - 1)) / far
            speedup = _median_wall(summaries[1]) / _median_wall(summaries[2]) if {1, 2} <= set(counts) else None
            cells = [f"{cpu[n] * 1000:.0f} ms ({_median_wall(summaries[n]) * 1000:.0f} ms wall)" for n in counts]
            print(
                f"| {name}, {repo} | {' | '.join(cells)} | {slope * 1000:.0f} ms | {work_1 * 1000:.0f} ms, "
                f"{work_slope * 1000:.0f} ms | {f'{speedup:.2f}x' if speedup else '-'} | {at_far:.2f} s |",
                flush=True,
            )
            results[f"{name} {repo}"] = {
                "summaries": summaries,
                "coordinator_cpu_per_added_worker": slope,
                "coordinator_cpu_at_1": coordinator_1,
                "workers_cpu_at_1": work_1,
                "workers_cpu_per_added_worker": work_slope,
                "wall_1_to_2_workers": speedup,
                f"round_seconds_at_{far}_extrapolated": at_far,
            }
    return results


def watchdog_cost(name: str, rounds: int) -> dict:
    """Rounds of workload `name` over one loopback TCP worker, watched and unwatched, alternated (module doc)."""
    config = wall.WORKLOADS[name].config(FLAGS.cache_dir)
    program.check(config)
    tasks.data_source(config).prepare()
    prepared = program.prepare(config)
    task = prepared.task
    process = algorithms.build_learning_process(task, config, prepared.plan)
    server = runtime.LocalWorker(bind_address="127.0.0.1")
    remotes = {}
    try:  # from the first process started: whatever fails later stops them all
        server.start()
        address = f"127.0.0.1:{server.port}"
        remotes = {"watched": runtime.RemoteWorker(address), "unwatched": runtime.RemoteWorker(address, watched=False)}
        contexts = {}
        for variant, worker in remotes.items():
            worker.start()
            contexts[variant] = runtime._sync_context(runtime._executors(worker))
        sampler = sampling.ClientSampler(task.train_data.client_ids, config.clients_per_round, config.sampling, seed=0)
        with context_stack_impl.context_stack.install(contexts["unwatched"]):
            state = process.initialize()
        measured = {variant: {"wall": [], "cpu": [], "worker_cpu": []} for variant in remotes}
        for r in range(1, rounds + 2):  # round 1: warm-up (tracing, the worker's first executor)
            ids = sampler.sample(r)
            order = list(remotes) if r % 2 else list(reversed(remotes))  # neither always goes first
            for variant in order:
                with context_stack_impl.context_stack.install(contexts[variant]):
                    t, c, wc = time.perf_counter(), time.process_time(), measurements.process_cpu_seconds(server.pid)
                    out = process.next(state, ids)
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                    dwc = measurements.process_cpu_seconds(server.pid) - wc
                if r > 1:
                    for key, value in (("wall", dt), ("cpu", dc), ("worker_cpu", dwc)):
                        measured[variant][key].append(value)
            state = out.state
    finally:
        for worker in remotes.values():
            worker.stop()
        server.stop()
    result = {variant: {k: float(np.median(v)) for k, v in m.items()} for variant, m in measured.items()}
    result["raw"] = measured
    watched, unwatched = result["watched"], result["unwatched"]
    # Paired by round (same clients, same state): the differences' and ratios' medians.
    pairs = list(zip(measured["watched"]["cpu"], measured["unwatched"]["cpu"], strict=True))
    result["cpu_difference"] = float(np.median([a - b for a, b in pairs]))
    walls = zip(measured["watched"]["wall"], measured["unwatched"]["wall"], strict=True)
    result["wall_ratio"] = float(np.median([a / b for a, b in walls]))
    print(
        f"{name}, one loopback remote worker, median of {rounds} rounds each: watched {watched['wall'] * 1000:.0f} ms "
        f"wall, {watched['cpu'] * 1000:.0f} ms coordinator CPU, {watched['worker_cpu'] * 1000:.0f} ms worker CPU; "
        f"unwatched {unwatched['wall'] * 1000:.0f} / {unwatched['cpu'] * 1000:.0f} / "
        f"{unwatched['worker_cpu'] * 1000:.0f} ms; per round (paired medians) watched / unwatched wall "
        f"{result['wall_ratio']:.3f}, coordinator CPU {result['cpu_difference'] * 1000:+.1f} ms",
        flush=True,
    )
    return result


def flag_problem() -> str | None:
    """What is wrong with the flags (one line naming the flag and the fix), or None; checked before anything runs."""
    unknown = [name for name in FLAGS.workloads if name not in wall.WORKLOADS]
    if unknown or not FLAGS.workloads:
        return f"--workloads={','.join(FLAGS.workloads)}: unknown {unknown}; choose from {','.join(wall.WORKLOADS)}"
    if FLAGS.repeats < 1:
        return f"--repeats={FLAGS.repeats}: needs at least 1 run per configuration"
    if FLAGS.watchdog:
        if FLAGS.per_worker:
            return "--watchdog and --per_worker measure different things: give one of them"
        if FLAGS.rounds < 0:
            return f"--rounds={FLAGS.rounds}: give the rounds to time (at least 1), or 0 for 6"
        return None
    if FLAGS.per_worker:
        if not all(n.isdigit() and int(n) >= 1 for n in FLAGS.per_worker):
            return f"--per_worker={','.join(FLAGS.per_worker)}: give worker counts, whole numbers >= 1 (e.g. 1,2,4,8)"
        if len(set(map(int, FLAGS.per_worker))) < 2:
            return f"--per_worker={','.join(FLAGS.per_worker)}: a cost per added worker needs at least two counts"
        if FLAGS.rounds and FLAGS.rounds < 4:
            return f"--rounds={FLAGS.rounds}: the CPU is taken over rounds 3 .. R-1, so give at least 4 (or 0)"
        if FLAGS.extrapolate < 1:
            return f"--extrapolate={FLAGS.extrapolate}: give a worker count >= 1"
        missing = [repo for repo in FLAGS.repos if not os.path.isfile(os.path.join(repo, "experiments", "train.py"))]
        if missing or not FLAGS.repos:
            found = missing or "none"
            return (
                f"--repos={','.join(FLAGS.repos)}: {found}: give checkouts of this project (with experiments/train.py)"
            )
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad flag is one `error:` line and exit 2 (absl prints a block and exits 1)."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    problem = flag_problem() if len(rest) == 1 else f"unexpected arguments {rest[1:]}; flags take the form --name=value"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    return rest


def main(argv) -> None:
    del argv
    if FLAGS.watchdog:
        name = FLAGS.workloads[0]
        wall.save_results("workers-watchdog", {name: watchdog_cost(name, FLAGS.rounds or 6)})
        return
    if FLAGS.per_worker:
        wall.save_results("workers-per-worker", per_worker([int(n) for n in FLAGS.per_worker], FLAGS.repos))
        return
    print(wall.HEADER.replace("| workload |", "| workload, workers |"), flush=True)
    results = {}
    for name in FLAGS.workloads:
        w = wall.WORKLOADS[name]
        wall.generate(w, FLAGS.cache_dir, FLAGS.repo)
        runs = {config: [] for config in CONFIGS}
        for _ in range(FLAGS.repeats):
            for config, (extra, remote) in CONFIGS.items():
                runs[config].append(wall.run_once(w, FLAGS.cache_dir, FLAGS.repo, extra, remote))
        summaries = {config: wall.summarize(w, r) for config, r in runs.items()}
        for config, summary in summaries.items():
            print(wall.row(f"{name}, {config}", summary), flush=True)
        speedup = _median_wall(summaries["1 pinned"]) / _median_wall(summaries["2 pinned"])
        overhead = _median_wall(summaries["remote 1"]) / _median_wall(summaries["local"]) - 1
        per_pass = [
            float(np.median(a["wall_seconds"]) / np.median(b["wall_seconds"]))
            for a, b in zip(runs["1 pinned"], runs["2 pinned"], strict=True)
        ]
        print(
            f"{name}: 1 -> 2 pinned workers {speedup:.2f}x (per pass {', '.join(f'{x:.2f}' for x in per_pass)}); "
            f"remote 1 worker vs local {overhead:+.1%}",
            flush=True,
        )
        results[name] = {"summaries": summaries, "speedup_1_to_2_pinned": speedup, "remote_overhead": overhead}
    wall.save_results("workers", results)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
