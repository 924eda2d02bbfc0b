"""Runs over several worker services: results, a worker killed mid-run, other data, leftovers (loopback),
and separate hosts in network namespaces, one of whose links goes down mid-run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import portpicker
import pytest

from tests import conftest
from tests.train_e2e_test import REPO, TINY_FLAGS, rows, train

DATA = [f for f in TINY_FLAGS if f.split("=")[0] in ("--num_writers", "--median_examples", "--data_seed")]
COMPARED = ("train/loss", "train/accuracy", "eval/accuracy", "privacy/epsilon")


def start_workers(cache: str, count: int) -> list[tuple[subprocess.Popen, int]]:
    """`count` experiments.worker services on loopback, started together; returns each with its port."""
    started = []
    for _ in range(count):
        port = portpicker.pick_unused_port()
        cmd = [sys.executable, "-m", "experiments.worker", f"--port={port}", f"--cache_dir={cache}", *DATA]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        started.append((proc, port))
    for proc, port in started:
        line = proc.stdout.readline()
        assert line.startswith(f"worker serving on 127.0.0.1:{port}"), line
        proc.stdout.readline()  # the data fingerprint
    return started


def service_of(worker: subprocess.Popen) -> int:
    (child,) = [p for p in conftest.worker_pids() if _parent(p) == worker.pid]
    return child


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    cache, runs = str(root / "cache"), str(root / "runs")
    reference = train("--rounds=6", "--experiment=one_worker", cache=cache, root=runs)  # also generates the data
    assert reference.returncode == 0, reference.stderr
    return cache, runs, rows(os.path.join(runs, "one_worker", "metrics.csv"))


def _same_metrics(table, reference) -> None:
    assert [r["round"] for r in table] == [r["round"] for r in reference]
    for got, want in zip(table, reference, strict=True):
        for column in COMPARED:
            if want[column]:
                assert float(got[column]) == pytest.approx(float(want[column]), rel=1e-5, abs=1e-6), column


def _kill_during(run: subprocess.Popen, round_prefix: str, pid: int) -> None:
    for line in run.stdout:
        if line.startswith(round_prefix):
            os.kill(pid, signal.SIGKILL)
            return


def test_a_worker_killed_during_a_run_is_dropped_and_its_round_run_again(space):
    cache, runs, reference = space
    (a, port_a), (b, port_b) = start_workers(cache, 2)
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "experiments.train", f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS]
            + ["--rounds=6", "--experiment=two_workers", f"--workers=127.0.0.1:{port_a},127.0.0.1:{port_b}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _kill_during(run, "round 3/6", service_of(b))
        _, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        assert f"worker 127.0.0.1:{port_b} stopped during a round; retrying on 1 worker(s)" in err
    finally:
        for worker in (a, b):
            worker.terminate()
            worker.wait(timeout=30)
    table = rows(os.path.join(runs, "two_workers", "metrics.csv"))
    # Two workers, then one: the same rounds as one worker, up to the order of float sums.
    _same_metrics(table, reference)
    assert float(table[0]["system/workers"]) == 2 and float(table[-1]["system/workers"]) == 1
    assert float(table[-1]["system/worker_retries"]) == 1


def test_without_retries_the_run_stops_at_its_checkpoint_and_the_rerun_resumes_exactly(space):
    cache, runs, reference = space
    run = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS]
        + ["--rounds=6", "--experiment=stopped", "--local_workers=2", "--worker_retries=0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in run.stdout:
        if line.startswith("round 3/6"):
            children = [p for p in conftest.worker_pids() if _parent(p) == run.pid]
            os.kill(children[1], signal.SIGKILL)
            break
    _, err = run.communicate(timeout=240)
    assert run.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(lines) == 1 and "stopped during a round" in lines[0] and "rerun the same command to resume" in lines[0]
    ), err
    again = train("--rounds=6", "--experiment=stopped", "--local_workers=2", cache=cache, root=runs)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    _same_metrics(rows(os.path.join(runs, "stopped", "metrics.csv")), reference)


def _no_mount_namespace() -> str | None:
    """Why this user cannot have a mount namespace of its own, or None if it can.

    In a user namespace of its own (`--map-root-user`) any user may bind-mount there, so
    the test needs no root; only a kernel or container that allows no user namespaces stops it.
    """
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "--map-root-user", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare --map-root-user --mount` fails ({probe.stderr.strip()}): no user namespaces allowed here"
    return None


_NO_MOUNT_NAMESPACE = _no_mount_namespace()


@pytest.mark.skipif(_NO_MOUNT_NAMESPACE is not None, reason=str(_NO_MOUNT_NAMESPACE))
def test_a_worker_serving_other_data_at_the_same_path_is_refused_and_nothing_is_written(space, tmp_path):
    cache, runs, _ = space
    # The worker runs in a mount namespace of its own, where the run's data file is another file.
    from tffpipe.tasks.emnist import generator

    path = os.path.join(generator.cached_data_dir(cache, conftest.TINY), "emnist_all.sqlite")
    other = str(tmp_path / "other.sqlite")  # the same population, one client's count changed
    shutil.copy(path, other)
    con = sqlite3.connect(other)
    con.execute("UPDATE client_metadata SET num_examples = num_examples + 1 WHERE rowid = 1")
    con.commit()
    con.close()
    port = portpicker.pick_unused_port()
    serve = f"{sys.executable} -m experiments.worker --port={port} --cache_dir={cache} {' '.join(DATA)}"
    script = f"mount --bind {other} {path} && exec {serve}"
    worker = subprocess.Popen(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = worker.stdout.readline()
        assert line.startswith("worker serving"), worker.stderr.read()[-300:]
        before = sorted(os.listdir(runs))
        proc = train("--rounds=2", "--experiment=other_data", f"--workers=127.0.0.1:{port}", cache=cache, root=runs)
        assert proc.returncode == 2  # the --workers given cannot serve this run: bad input (runtime.WorkerUnusable)
        assert f"worker 127.0.0.1:{port} serves other data than this run at {path}" in proc.stderr
        assert sorted(os.listdir(runs)) == before  # refused before the experiment directory exists
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def network_namespaces(names: list[str]):
    """Creates the namespaces; on leaving, kills what runs in them and deletes them, whatever happened."""
    made = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        yield
    finally:
        for name in made:
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "delete", name, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root")
@pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip(8) (iproute2)")
def test_a_run_over_workers_on_separate_hosts_equals_one_worker_and_outlives_a_link_going_down(space):
    # Three hosts: a coordinator and two workers, each in a network namespace of its own,
    # the coordinator joined to each worker by a veth pair. Their addresses (198.18.0.0/15,
    # RFC 2544's test range) exist only inside these namespaces, which have no other link.
    cache, runs, reference = space
    tag = f"tfp{os.getpid() % 100_000}"  # interface names: at most 15 characters
    coordinator, hosts = f"{tag}c", [f"{tag}w{i}" for i in range(2)]
    port = 8470  # the same on each host: three network stacks
    try:
        _ip("netns", "add", coordinator)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no network namespaces here: {e.stderr.strip()}")
    _ip("netns", "delete", coordinator)
    workers = []
    with network_namespaces([coordinator, *hosts]):
        try:
            for i, host in enumerate(hosts):
                near, far = f"{tag}c{i}", f"{tag}h{i}"
                _ip("-n", coordinator, "link", "add", near, "type", "veth", "peer", "name", far, "netns", host)
                _ip("-n", coordinator, "addr", "add", f"198.18.{i}.1/24", "dev", near)
                _ip("-n", host, "addr", "add", f"198.18.{i}.2/24", "dev", far)
                _ip("-n", coordinator, "link", "set", near, "up")
                _ip("-n", host, "link", "set", far, "up")
                serve = [sys.executable, "-m", "experiments.worker", f"--bind=198.18.{i}.2", f"--port={port}"]
                workers.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", host, *serve, f"--cache_dir={cache}", *DATA],
                        cwd=REPO,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                )
            for i, worker in enumerate(workers):
                line = worker.stdout.readline()
                assert line.startswith(f"worker serving on 198.18.{i}.2:{port}"), line
            addresses = ",".join(f"198.18.{i}.2:{port}" for i in range(len(hosts)))
            train_flags = [f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS, "--rounds=4"]
            run = subprocess.Popen(
                ["ip", "netns", "exec", coordinator, sys.executable, "-m", "experiments.train", *train_flags]
                + ["--experiment=hosts", f"--workers={addresses}"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for line in run.stdout:
                if line.startswith("round 1/4"):
                    # The second host's link goes down without a word (no reset reaches the
                    # coordinator): its calls would wait forever, unless they are watched.
                    _ip("-n", hosts[1], "link", "set", f"{tag}h1", "down")
                    break
            _, err = run.communicate(timeout=240)
            assert run.returncode == 0, err[-3000:]
            assert f"worker 198.18.1.2:{port} stopped during a round; retrying on 1 worker(s)" in err
        finally:
            for worker in workers:
                worker.terminate()
                worker.wait(timeout=30)
    assert all(not os.path.exists(f"/run/netns/{name}") for name in (coordinator, *hosts))
    table = rows(os.path.join(runs, "hosts", "metrics.csv"))
    # Two hosts' partial sums merged, then the first host alone: one worker's first four rounds.
    _same_metrics(table, reference[:4])
    assert float(table[0]["system/workers"]) == 2 and float(table[-1]["system/workers"]) == 1
    assert float(table[-1]["system/worker_retries"]) == 1


def test_no_worker_service_outlives_these_runs(space):  # `space` keeps it with (and after) the runs above
    deadline = time.monotonic() + 10
    while conftest.orphaned_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert conftest.orphaned_workers() == set()
    assert conftest.session_pids("experiments.worker") == set()  # this pytest process's own services
