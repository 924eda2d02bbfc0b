"""Shared fixtures: a tiny generated population, TFF's local context, and a leak check."""

from __future__ import annotations

import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tffpipe.data import generator  # noqa: E402

TINY = generator.PopulationConfig(num_writers=12, median_examples=24, seed=7)


def worker_pids() -> set[int]:
    """PIDs of TFF worker_binary processes on this machine."""
    out = subprocess.run(["pgrep", "-f", "tensorflow_federated/data/worker_binary"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def orphaned_workers() -> set[int]:
    """Workers whose Python parent is gone (reparented to init or a subreaper): leaks."""
    orphans = set()
    for pid in worker_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                parent_cmd = f.read()
        except OSError:
            continue  # exited meanwhile
        if b"python" not in parent_cmd:
            orphans.add(pid)
    return orphans


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    return generator.ensure_generated(str(tmp_path_factory.mktemp("cache")), TINY, workers=1)


@pytest.fixture(scope="session")
def tff_context():
    from tffpipe import runtime

    worker = runtime.install_local_context()
    yield worker
    worker.stop()


@pytest.fixture(scope="session", autouse=True)
def no_worker_survives():
    """After the whole suite no TFF worker may be left without its Python parent."""
    before = orphaned_workers()
    yield
    assert orphaned_workers() - before == set()
