"""What the benchmarks measure beside time: medians and spread, memory and CPU of process trees, result files."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import numpy as np
import psutil


def stats(values: list[float]) -> dict[str, float]:
    """Median and interquartile range."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


class TreeRss:
    """Peak RSS of processes and their descendants, sampled every `interval` seconds.

    `peaks` and `cpu` are per process (`python:<pid>` or `worker:<pid>` for TFF's
    worker binary; CPU as user + system seconds, last seen); `peak_total` is the
    largest sum over all of them in one sample.
    """

    def __init__(self, pids: list[int], interval: float = 0.2):
        self.peaks: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.peak_total = 0
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for pid in self._pids:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
                            name = "worker" if "worker_binary" in " ".join(p.cmdline()) else "python"
                            key = f"{name}:{p.pid}"
                            rss = p.memory_info().rss
                            total += rss
                            self.peaks[key] = max(self.peaks.get(key, 0), rss)
                            times = p.cpu_times()
                            self.cpu[key] = times.user + times.system
            self.peak_total = max(self.peak_total, total)
            time.sleep(self._interval)

    def stop(self) -> tuple[dict[str, int], dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return self.peaks, self.cpu


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process `pid` (/proc/<pid>/stat fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(worker_pid: int | None) -> float:
    """CPU seconds so far of this process and of TFF's worker `worker_pid` (None: this process's only).

    On a shared machine CPU time per round moves far less with the load than wall time
    does, and divided by the cores it bounds the round an idle machine could give.
    """
    return time.process_time() + (process_cpu_seconds(worker_pid) if worker_pid is not None else 0.0)


def save_results(kind: str, results, *, out_dir: str, flag_values: dict, **extra) -> str:
    """Writes the flags, `extra` and `results` to `out_dir/<kind>-<time>.json`, says where and returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, time.strftime(f"{kind}-%Y%m%d-%H%M%S") + ".json")
    with open(path, "w") as f:
        json.dump({"flags": flag_values, **extra, "results": results}, f, indent=2)
    print(f"results: {path}")
    return path
