"""Shared fixtures: a tiny generated population, TFF's local context, and a leak check."""

from __future__ import annotations

import os
import subprocess

# The environment the suite relies on, whatever the caller's shell exports; subprocesses inherit it.
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TF's C++ start-up lines off in this process (binaries set their own)
os.environ.pop("TFFPIPE_SKIP_ENV_CHECK", None)  # the binaries' environment check runs as for a user

import pytest  # noqa: E402

from tffpipe.tasks.emnist import generator  # noqa: E402

TINY = generator.PopulationConfig(num_writers=12, median_examples=24, seed=7)


def emnist_task(data_dir: str, model: str = "linear", *, parsed: bool = False, **preprocess):
    """An EMNIST `base.Task` over a generated file: rows (as training reads them) or parsed elements."""
    from tffpipe import configs
    from tffpipe.tasks.emnist import files, task

    load = files.load_client_data if parsed else files.load_client_rows
    train, test = load(data_dir)
    config = configs.PreprocessConfig(**{"epochs": 1, **preprocess})
    return task.create_task_from_client_data(train, test, num_classes=62, model_name=model, preprocess=config)


def plan(mechanism, noise_multiplier: float = 0.0, clients_per_round: int = 3, population: int = 100, **kwargs):
    """A privacy plan with the sampling its mechanism is accounted for."""
    from tffpipe import accounting, configs

    return accounting.PrivacyPlan(
        mechanism,
        noise_multiplier,
        clients_per_round,
        population,
        kwargs.pop("sampling", configs.default_sampling(mechanism)),
        kwargs.pop("delta", 1e-5),
        **kwargs,
    )


def dp_factory(mechanism, noise_multiplier: float = 0.0, clients_per_round: int = 3, *, noise_seed: int = 0, **dp):
    """The aggregation factory tffpipe builds for this mechanism (DP parameters as in `configs.DpConfig`)."""
    from tffpipe import aggregation, configs

    config = configs.DpConfig(mechanism=mechanism, **dp)
    return aggregation.build_factory(
        config, plan(mechanism, noise_multiplier, clients_per_round), noise_seed=noise_seed
    )


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
def forks():
    """Runs the binaries' bad-input cases in forks of one process that imported TF (tests/forkserver.py)."""
    from tests import forkserver

    with forkserver.Server(forkserver.BINARY_IMPORTS) as server:
        yield server


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
