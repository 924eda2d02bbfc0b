"""Starts TensorBoard on 127.0.0.1 as a child process that cannot outlive its parent."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import portpicker

from tffpipe import processes


def start(logdir: str, port: int | None = None, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Launches `tensorboard --logdir=logdir` bound to loopback; returns (process, URL)."""
    port = port or portpicker.pick_unused_port()
    process = processes.spawn(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1", f"--port={port}"]
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited at start with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"TensorBoard did not answer at {url} within {timeout_s:.0f} s")
