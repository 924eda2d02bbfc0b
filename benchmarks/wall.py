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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import portpicker
import psutil
from absl import app, flags

flags.DEFINE_list("workloads", ["fixed", "w2", "w1", "w3"], "Workloads to time.")
flags.DEFINE_integer("repeats", 1, "Runs per workload (fresh experiment each).")
flags.DEFINE_string("cache_dir", "data_cache", "Where the workloads' populations are generated.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON results go.")
flags.DEFINE_string("repo", ".", "Checkout whose binary to run (another commit, to compare in one session).")
flags.DEFINE_list("train_flags", [], "More flags for the training binary, e.g. --local_workers=2,--pin_workers.")
flags.DEFINE_integer("remote_workers", 0, "Serve the run from this many experiments.worker processes on loopback.")
flags.DEFINE_bool("pin_remote_workers", False, "Pin remote worker i to CPU i (taskset).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    clients_per_round: int
    num_writers: int
    median_examples: int
    rounds: int
    epochs: int = 1


# The same populations and models as benchmarks/run.py (10% of each writer's examples are held out).
WORKLOADS = {
    "fixed": Workload("fixed", "linear", 10, 200, 22, 30),
    "w2": Workload("w2", "mlp", 100, 1000, 56, 15),
    "w1": Workload("w1", "cnn", 10, 200, 334, 8),
    "w3": Workload("w3", "linear", 1000, 10_000, 22, 6),
    "w1e5": Workload("w1e5", "cnn", 10, 200, 334, 6, epochs=5),  # W1 with 5 local epochs: 5x the work per round
}


def flags_of(w: Workload, cache_dir: str) -> list[str]:
    return [
        f"--model={w.model}",
        f"--clients_per_round={w.clients_per_round}",
        f"--num_writers={w.num_writers}",
        f"--median_examples={w.median_examples}",
        "--quantity_sigma=0",
        "--data_seed=42",
        f"--epochs={w.epochs}",
        "--batch_size=20",
        "--shuffle_buffer=1",
        "--client_learning_rate=0.05",
        "--dp=none",
        f"--eval_every={w.rounds}",
        "--eval_clients=20",
        f"--rounds={w.rounds}",
        f"--cache_dir={cache_dir}",
    ]


def _data_flags(w: Workload, cache_dir: str) -> list[str]:
    return [
        f
        for f in flags_of(w, cache_dir)
        if f.split("=")[0] in ("--num_writers", "--median_examples", "--quantity_sigma", "--data_seed", "--cache_dir")
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


class TreeRss:
    """Peak RSS of a process and of each of its descendants, sampled every 200 ms."""

    def __init__(self, pids: list[int]):
        self.peaks: dict[str, int] = {}
        self.cpu: dict[str, float] = {}  # user + system seconds, last seen
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for pid in self._pids:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        name = "worker" if "worker_binary" in " ".join(p.cmdline()) else "python"
                        key = f"{name}:{p.pid}"
                        self.peaks[key] = max(self.peaks.get(key, 0), p.memory_info().rss)
                        times = p.cpu_times()
                        self.cpu[key] = times.user + times.system
            time.sleep(0.2)

    def stop(self) -> tuple[dict[str, int], dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return self.peaks, self.cpu


def time_run(w: Workload, cache_dir: str, root: str, repo: str = ".", extra: list[str] = (), pids=()) -> dict:
    cache_dir = os.path.abspath(cache_dir)
    cmd = [sys.executable, "-m", "experiments.train", *flags_of(w, cache_dir), f"--root_dir={root}", "--experiment=w"]
    started = time.monotonic()
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    rss = TreeRss([proc.pid, *pids])
    arrivals: dict[int, float] = {}
    cpu_at: dict[int, dict[str, float]] = {}  # CPU seconds when rounds 2 and R-1 are reported
    for line in proc.stdout:
        if line.startswith("round "):
            r = int(line.split()[1].split("/")[0])
            arrivals[r] = time.monotonic()
            if r in (2, w.rounds - 1):
                cpu_at[r] = cpu_seconds([proc.pid, *pids])
    _, err = proc.communicate()
    peaks, cpu = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{w.name} failed: {err[-2000:]}")
    with open(os.path.join(root, "w", "metrics.csv"), newline="") as f:
        inside = {int(r["round"]): float(r["system/round_seconds"]) for r in csv.DictReader(f)}
    # Round 1 is the first call (tracing); the last evaluates. Between them: plain rounds.
    rounds = range(3, w.rounds)
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
            kind: (cpu_at[w.rounds - 1][kind] - cpu_at[2][kind]) / max(len(rounds), 1) for kind in ("python", "worker")
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


def _stats(values: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


def generate(w: Workload, cache_dir: str, repo: str = ".") -> None:
    """Generates the workload's population, untimed (a short run does it)."""
    with tempfile.TemporaryDirectory() as root:
        time_run(dataclasses.replace(w, rounds=3), cache_dir, root, repo)


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
        "workload": dataclasses.asdict(w),
        "wall_between_rounds": _stats(wall),
        "round_seconds": _stats(inner),
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


def save_results(kind: str, results: dict) -> None:
    """Writes the flags and `results` to `--out_dir/<kind>-<time>.json` and says where."""
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    path = os.path.join(FLAGS.out_dir, time.strftime(f"{kind}-%Y%m%d-%H%M%S") + ".json")
    with open(path, "w") as f:
        json.dump({"flags": FLAGS.flag_values_dict(), "results": results}, f, indent=2)
    print(f"results: {path}")


if __name__ == "__main__":
    app.run(main)
