"""What a user waits for: `experiments.train` timed from outside, per round and to round 1.

  python -m benchmarks.wall                          # fixed, w2, w1, w3 (part of make bench)
  python -m benchmarks.wall --workloads=fixed --repeats=3
  python -m benchmarks.wall --workloads=w1 --train_flags=--local_workers=2,--pin_workers  # 2 workers, 1 CPU each
  python -m benchmarks.wall --workloads=w1 --remote_workers=1   # through an experiments.worker service

Runs the training binary as a user does, once per workload (after generating its data,
which is not timed), and reads the clock when each progress line arrives on its stdout
(one per round, printed after the round's metrics row is written). Reports, per
workload: the median (and IQR) of the wall time between successive rounds, the median
`system/round_seconds` (the time inside `process.next` and the round's metrics) of the
same rounds from metrics.csv, their ratio, and the time from starting the process to
the end of round 1, the peak RSS of the coordinator and of each worker, and the CPU
seconds per round of the coordinator and of all workers together (over the same
rounds: where the cores go when workers are added). Default flags of a run (checkpoint every round included), except
`--dp=none`, evaluation only at the last round, and the workload's data and model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import portpicker
import psutil
from absl import app, flags

from benchmarks import measurements, workloads

flags.DEFINE_list("workloads", ["fixed", "w2", "w1", "w3"], "Workloads to time.")
flags.DEFINE_integer("repeats", 1, "Runs per workload (fresh experiment each).")
flags.DEFINE_string("cache_dir", "data_cache", "Where the workloads' populations are generated.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON results go.")
flags.DEFINE_string("repo", ".", "Checkout whose binary to run (another commit, to compare in one session).")
flags.DEFINE_list("train_flags", [], "More flags for the training binary, e.g. --local_workers=2,--pin_workers.")
flags.DEFINE_integer("remote_workers", 0, "Serve the run from this many experiments.worker processes on loopback.")
flags.DEFINE_bool("pin_remote_workers", False, "Pin remote worker i to CPU i (taskset).")
FLAGS = flags.FLAGS


# The workloads (`benchmarks.workloads`), here too as `benchmarks.wall.WORKLOADS` (benchmarks.workers runs them).
Workload = workloads.Workload
WORKLOADS = workloads.WORKLOADS


def _data_flags(w: Workload, cache_dir: str) -> list[str]:
    return [
        f
        for f in w.train_flags(cache_dir)
        if f.split("=")[0]
        in ("--task", "--num_writers", "--median_examples", "--quantity_sigma", "--data_seed", "--cache_dir")
    ]


def start_remote_workers(w: Workload, cache_dir: str, repo: str, count: int, pin: bool) -> tuple[list, list[str]]:
    """`count` experiments.worker processes on loopback serving the workload's data."""
    procs, addresses = [], []
    for i in range(count):
        port = portpicker.pick_unused_port()
        cmd = [
            sys.executable,
            "-m",
            "experiments.worker",
            f"--port={port}",
            *_data_flags(w, os.path.abspath(cache_dir)),
        ]
        if pin:
            cmd = ["taskset", "-c", str(i % os.cpu_count()), *cmd]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=repo)
        line = proc.stdout.readline()
        if not line.startswith("worker serving"):
            raise RuntimeError(f"worker did not start: {line}")
        procs.append(proc)
        addresses.append(f"127.0.0.1:{port}")
    return procs, addresses


def time_run(w: Workload, cache_dir: str, root: str, repo: str = ".", extra: list[str] = (), pids=()) -> dict:
    cache_dir = os.path.abspath(cache_dir)
    cmd = [sys.executable, "-m", "experiments.train", *w.train_flags(cache_dir), f"--root_dir={root}", "--experiment=w"]
    started = time.monotonic()
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    rss = measurements.TreeRss([proc.pid, *pids])
    arrivals: dict[int, float] = {}
    cpu_at: dict[int, dict[str, float]] = {}  # CPU seconds when rounds 2 and R-1 are reported
    for line in proc.stdout:
        if line.startswith("round "):
            r = int(line.split()[1].split("/")[0])
            arrivals[r] = time.monotonic()
            if r in (2, w.wall_rounds - 1):
                cpu_at[r] = cpu_seconds([proc.pid, *pids])
    _, err = proc.communicate()
    peaks, cpu = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{w.name} failed: {err[-2000:]}")
    with open(os.path.join(root, "w", "metrics.csv"), newline="") as f:
        inside = {int(r["round"]): float(r["system/round_seconds"]) for r in csv.DictReader(f)}
    # Round 1 is the first call (tracing); the last evaluates. Between them: plain rounds.
    rounds = range(3, w.wall_rounds)
    wall = [arrivals[r] - arrivals[r - 1] for r in rounds]
    inner = [inside[r] for r in rounds]
    return {
        "wall_seconds": wall,
        "round_seconds": inner,
        "start_to_round_1_seconds": arrivals[1] - started,
        "process_seconds": time.monotonic() - started,
        "peak_rss_bytes": peaks,
        "cpu_seconds": cpu,  # per process, over the whole run (the last sample before it exited)
        # Per plain round (rounds 3 .. R-1, as `wall_seconds`): coordinator and all workers.
        "cpu_seconds_per_round": {
            kind: (cpu_at[w.wall_rounds - 1][kind] - cpu_at[2][kind]) / max(len(rounds), 1)
            for kind in ("python", "worker")
        },
    }


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """User + system CPU seconds so far of the coordinator ("python") and of the workers, summed."""
    total = {"python": 0.0, "worker": 0.0}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    kind = "worker" if "worker_binary" in " ".join(p.cmdline()) else "python"
                    times = p.cpu_times()
                    total[kind] += times.user + times.system
    return total


def generate(w: Workload, cache_dir: str, repo: str = ".") -> None:
    """Generates the workload's population, untimed (a short run does it)."""
    with tempfile.TemporaryDirectory() as root:
        time_run(dataclasses.replace(w, wall_rounds=3), cache_dir, root, repo)


def run_once(
    w: Workload, cache_dir: str, repo: str = ".", extra: list[str] = (), remote_workers: int = 0, pin: bool = False
) -> dict:
    """One timed run in a fresh experiment, served by `remote_workers` experiments.worker processes if any."""
    root = tempfile.mkdtemp(prefix="tffpipe-wall-")
    workers, addresses = [], []
    try:
        if remote_workers:
            workers, addresses = start_remote_workers(w, cache_dir, repo, remote_workers, pin)
        run_flags = [*extra, *([f"--workers={','.join(addresses)}"] if addresses else [])]
        return time_run(w, cache_dir, root, repo, run_flags, [p.pid for p in workers])
    finally:
        for p in workers:
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def summarize(w: Workload, runs: list[dict]) -> dict:
    wall = [s for r in runs for s in r["wall_seconds"]]
    inner = [s for r in runs for s in r["round_seconds"]]
    start = [r["start_to_round_1_seconds"] for r in runs]
    python = [max((v for k, v in r["peak_rss_bytes"].items() if k.startswith("python")), default=0) for r in runs]
    worker = [max((v for k, v in r["peak_rss_bytes"].items() if k.startswith("worker")), default=0) for r in runs]
    return {
        "workload": w.to_json(),
        "wall_between_rounds": measurements.stats(wall),
        "round_seconds": measurements.stats(inner),
        "ratio": float(np.median(wall) / np.median(inner)),
        "start_to_round_1": {"median": float(np.median(start)), "min": min(start), "max": max(start)},
        "peak_rss_coordinator_bytes": max(python),
        "peak_rss_per_worker_bytes": max(worker),
        "cpu_seconds_coordinator_per_round": float(np.median([r["cpu_seconds_per_round"]["python"] for r in runs])),
        "cpu_seconds_workers_per_round": float(np.median([r["cpu_seconds_per_round"]["worker"] for r in runs])),
        "runs": runs,
    }


def row(name: str, r: dict) -> str:
    """A table row (see HEADER) of a `summarize` result."""
    return (
        f"| {name} | {r['round_seconds']['median'] * 1000:.0f} ms "
        f"({r['round_seconds']['q1'] * 1000:.0f}-{r['round_seconds']['q3'] * 1000:.0f}) "
        f"| {r['wall_between_rounds']['median'] * 1000:.0f} ms "
        f"({r['wall_between_rounds']['q1'] * 1000:.0f}-{r['wall_between_rounds']['q3'] * 1000:.0f}) "
        f"| {r['ratio']:.2f} | {r['start_to_round_1']['median']:.1f} s "
        f"({r['start_to_round_1']['min']:.1f}-{r['start_to_round_1']['max']:.1f}) "
        f"| {r['peak_rss_coordinator_bytes'] / 2**30:.2f} / {r['peak_rss_per_worker_bytes'] / 2**30:.2f} GiB "
        f"| {r['cpu_seconds_coordinator_per_round'] * 1000:.0f} "
        f"/ {r['cpu_seconds_workers_per_round'] * 1000:.0f} ms |"
    )


def measure(names: list[str], repeats: int, cache_dir: str, repo: str = ".", extra: list[str] = ()) -> list[dict]:
    results = []
    for name in names:
        w = WORKLOADS[name]
        generate(w, cache_dir, repo)
        runs = [
            run_once(w, cache_dir, repo, extra, FLAGS.remote_workers, FLAGS.pin_remote_workers) for _ in range(repeats)
        ]
        results.append(summarize(w, runs))
        print(row(name, results[-1]), flush=True)
    return results


HEADER = (
    "| workload | round_seconds (IQR) | wall between rounds (IQR) | wall / round_seconds | start to round 1 "
    "| peak RSS coordinator / each worker | CPU per round: coordinator / workers |\n|---|---|---|---|---|---|---|"
)


def main(argv) -> None:
    del argv
    print(HEADER, flush=True)
    print(f"train flags: {' '.join(FLAGS.train_flags) or '(defaults)'}; remote workers: {FLAGS.remote_workers}")
    results = measure(FLAGS.workloads, FLAGS.repeats, FLAGS.cache_dir, FLAGS.repo, FLAGS.train_flags)
    save_results("wall", results)


def save_results(kind: str, results) -> None:
    """Writes the flags and `results` to `--out_dir/<kind>-<time>.json` and says where."""
    measurements.save_results(kind, results, out_dir=FLAGS.out_dir, flag_values=FLAGS.flag_values_dict())


if __name__ == "__main__":
    app.run(main)
