"""Shared fixtures: a tiny generated population, TFF's local context, and a leak check."""

from __future__ import annotations

import os
import subprocess
import time

# The environment the suite relies on, whatever the caller's shell exports; subprocesses inherit it.
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TF's C++ start-up lines off in this process (binaries set their own)
os.environ.pop("TFFPIPE_SKIP_ENV_CHECK", None)  # the binaries' environment check runs as for a user
# Every process this pytest process starts, and theirs, inherits this mark: the leak checks look
# only at processes carrying it, as `make test` runs two pytest processes (pytest-xdist) and other
# runs may share the machine. Each pytest process imports this file and sets its own.
SESSION_VARIABLE = "TFFPIPE_TEST_SESSION"
SESSION = os.environ[SESSION_VARIABLE] = f"{os.getpid()}-{time.time_ns()}"

import pytest  # noqa: E402

from tffpipe import context_guard  # noqa: E402
from tffpipe.tasks.emnist import generator  # noqa: E402

context_guard.refuse_once_imported()  # a computation run without the tff_context fixture fails loudly (no *:PORT)

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


def session_pids(pattern: str) -> set[int]:
    """PIDs of processes whose command line matches `pattern` (pgrep -f) and that this pytest process started."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    mark = f"{SESSION_VARIABLE}={SESSION}".encode()
    ours = set()
    for pid in map(int, out.stdout.split()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    ours.add(pid)
        except OSError:
            continue  # exited meanwhile
    return ours


def worker_pids() -> set[int]:
    """PIDs of the TFF worker_binary processes started by this pytest process (directly or not)."""
    return session_pids("tensorflow_federated/data/worker_binary")


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


def pytest_configure(config):
    # Registered here too, so the marks below raise no warning where pytest-xdist is not installed.
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one pytest-xdist process")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the marks into the test ids
def pytest_collection_modifyitems(items):
    """Tests that share a module-scoped fixture run in one pytest process, in their order.

    `make test` runs two pytest processes (pytest-xdist `--dist loadgroup`), which spread
    the tests one by one; a module's fixture (often a run of a binary, which tests after it
    extend or check) would then be made in each process, and a module's closing leak check
    could run before the runs it checks. Tests linked by a module-scoped fixture, directly
    or through another fixture, get one `xdist_group`; the others are spread one by one.
    """
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared: dict[pytest.Item, list[str]] = {}
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions is None:
            continue  # not a Python test function (a doctest)
        keys = [
            f"{item.module.__name__}::{name}"
            for name in item.fixturenames
            if any(d.scope == "module" for d in definitions.name2fixturedefs.get(name, ()))
        ]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        if keys:
            shared[item] = keys
    for item, keys in shared.items():
        item.add_marker(pytest.mark.xdist_group(find(keys[0])))


def same_value(got, expected, where="value") -> None:
    """`got` is what TFF's deserializer gives: the same containers, names, dtypes, shapes and bits."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_federated.python.common_libs import structure

    assert type(got) is type(expected), where
    if isinstance(expected, structure.Struct):
        got_elements, expected_elements = structure.to_elements(got), structure.to_elements(expected)
        assert [n for n, _ in got_elements] == [n for n, _ in expected_elements], where
        for (name, g), (_, e) in zip(got_elements, expected_elements, strict=True):
            same_value(g, e, f"{where}.{name}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            same_value(g, e, f"{where}[{i}]")
    elif isinstance(expected, np.ndarray | np.generic):
        assert (got.dtype, got.shape, got.tobytes()) == (expected.dtype, expected.shape, expected.tobytes()), where
    elif isinstance(expected, tf.data.Dataset):
        assert list(got.as_numpy_iterator()) == list(expected.as_numpy_iterator()), where
    else:
        assert got == expected, where
