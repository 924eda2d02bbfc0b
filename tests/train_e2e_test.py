"""End-to-end runs of `python -m experiments.train` on a tiny generated population."""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--num_writers=12",
    "--median_examples=24",
    "--data_seed=7",
    "--clients_per_round=3",
    "--eval_clients=4",
    "--eval_every=2",
    "--noise_multiplier=0.3",
    "--clip=0.5",
]


def train_command(*flags: str, cache: str, root: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--cache_dir={cache}",
        f"--root_dir={root}",
        *TINY_FLAGS,
        *flags,
    ]


def train(*flags: str, cache: str, root: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = train_command(*flags, cache=cache, root=root)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_train(*flags: str, cache: str, root: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    cmd = train_command(*flags, cache=cache, root=root)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)


def rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for base, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(base, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def workers_before_this_module() -> set[int]:
    return conftest.orphaned_workers()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, workers_before_this_module):
    root = tmp_path_factory.mktemp("e2e")
    return str(root / "cache"), str(root / "runs")


@pytest.fixture(scope="module")
def finished_run(workspace):
    cache, runs = workspace
    proc = train("--rounds=3", "--experiment=base", cache=cache, root=runs)
    assert proc.returncode == 0, proc.stderr
    return proc, os.path.join(runs, "base")


def test_outputs_have_the_expected_layout_columns_and_rows(finished_run):
    proc, exp = finished_run
    assert "round 3/3" in proc.stdout and "epsilon" in proc.stdout and "Poisson sampling" in proc.stdout
    assert sorted(os.listdir(exp)) == [
        "checkpoints",
        "hparams.json",
        "metrics.csv",
        "model.keras",
        "summary.png",
        "tensorboard",
        "worker.log",
    ]
    table = rows(os.path.join(exp, "metrics.csv"))
    assert [r["round"] for r in table] == ["1", "2", "3"]
    for column in (
        "train/loss",
        "train/accuracy",
        "privacy/epsilon",
        "privacy/noise_stddev",
        "privacy/clip",
        "system/round_seconds",
        "system/client_examples_per_second",
        "system/clients",
    ):
        assert all(r[column] != "" for r in table), column
    assert [r["eval/accuracy"] != "" for r in table] == [False, True, True]  # eval_every=2, and the last round
    eps = [float(r["privacy/epsilon"]) for r in table]
    assert eps == sorted(eps) and eps[0] > 0
    assert "program_state_3" in os.listdir(os.path.join(exp, "checkpoints"))
    with open(os.path.join(exp, "summary.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model = tf.keras.models.load_model(os.path.join(exp, "model.keras"))
    assert model.output_shape == (None, 62)


def test_tensorboard_holds_scalars_hparams_and_sample_images(finished_run):
    _, exp = finished_run
    acc = event_accumulator.EventAccumulator(
        os.path.join(exp, "tensorboard"), size_guidance={"tensors": 0, "images": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Tensors("eval/accuracy")] == [2, 3]
    assert "privacy/epsilon" in tags["tensors"]
    assert any(t.startswith("clients/") for t in tags["tensors"])  # tf.summary.image writes tensors in TF2
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def test_resume_after_sigkill_matches_an_uninterrupted_run(workspace, finished_run):
    cache, runs = workspace
    victim = start_train("--rounds=3", "--experiment=killed", cache=cache, root=runs, stderr=subprocess.DEVNULL)
    for line in victim.stdout:
        if line.startswith("round 2/3"):
            victim.send_signal(signal.SIGKILL)  # mid-run: round 2 released, maybe not checkpointed
            break
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    resumed = train("--rounds=3", "--experiment=killed", cache=cache, root=runs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    reference = rows(os.path.join(finished_run[1], "metrics.csv"))
    result = rows(os.path.join(runs, "killed", "metrics.csv"))
    assert [r["round"] for r in result] == ["1", "2", "3"]
    for column in ("train/loss", "train/accuracy", "eval/accuracy", "privacy/epsilon", "privacy/clip"):
        assert [r[column] for r in result] == [r[column] for r in reference], column
    acc = event_accumulator.EventAccumulator(os.path.join(runs, "killed", "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3]  # no round missing or duplicated


def test_raising_rounds_extends_a_finished_run(workspace, finished_run):
    cache, runs = workspace
    shutil.copytree(finished_run[1], os.path.join(runs, "extended"))
    proc = train("--rounds=4", "--experiment=extended", cache=cache, root=runs)
    assert proc.returncode == 0, proc.stderr
    assert "round 3/4" not in proc.stdout and "round 4/4" in proc.stdout
    assert [r["round"] for r in rows(os.path.join(runs, "extended", "metrics.csv"))] == ["1", "2", "3", "4"]


def _corrupt_checkpoint(runs: str, source: str) -> str:
    exp = os.path.join(runs, "corrupt")
    shutil.copytree(source, exp)
    state_dir = os.path.join(exp, "checkpoints", "program_state_3")
    for base, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(base, name), "wb") as f:
                f.write(b"garbage")
    return exp


def _unreadable_sqlite(tmp: str) -> str:
    os.makedirs(os.path.join(tmp, "badsqlite"), exist_ok=True)
    with open(os.path.join(tmp, "badsqlite", "emnist_all.sqlite"), "wb") as f:
        f.write(b"this is not a database at all" * 10)
    return os.path.join(tmp, "badsqlite")


def test_bad_inputs_each_give_their_message_and_lose_nothing(workspace, finished_run, tmp_path):
    cache, runs = workspace
    exp = finished_run[1]
    corrupt = _corrupt_checkpoint(runs, exp)
    protected = {exp: tree_digest(exp), corrupt: tree_digest(corrupt)}
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--rounds=0"], "--rounds=0", "total_rounds must be positive, got 0"),
        (["--clients_per_round=0"], "--clients_per_round=0", "clients_per_round must be positive"),
        (["--clients_per_round=50"], "clients_per_round=50 exceeds the 12 training clients", ""),
        (["--model=resnet"], "unknown model 'resnet'", "choose one of"),
        (["--model=no_such_pkg:build"], "cannot import module 'no_such_pkg'", ""),
        (["--model=tests.models_test:wrong_output"], "outputs shape (63,) per example", ""),
        (["--data_dir=/nonexistent/emnist"], "EMNIST file not found: /nonexistent/emnist/emnist_all.sqlite", "lzma"),
        ([f"--data_dir={_unreadable_sqlite(str(tmp_path))}"], "is not an SQLite database (bad header)", ""),
        (["--batch_size=0"], "--batch_size=0", "batch_size must be positive"),
        (["--noise_multiplier=-1"], "noise_multiplier must be >= 0, got -1.0", ""),
        (["--dp=adaptive", "--noise_multiplier=1"], "--clients_per_round>=11", "or --dp=fixed"),
        (["--target_epsilon=-1"], "--target_epsilon=-1.0: must be positive", ""),
        (["--delta=2"], "--delta=2.0: must be in (0, 1)", ""),
        (["--accountant=pld", "--sampling=uniform"], "PLD accountant does not support sampling=uniform", ""),
        (["--dp=tree", "--rounds=10"], "at most 4 rounds of 3 clients from 12", "Lower --rounds"),
        (["--dp=none", "--target_epsilon=2"], "target_epsilon needs a DP mechanism", ""),
        (["--experiment=a/b"], "experiment must be a plain directory name", ""),
        ([f"--root_dir={blocker}"], "cannot create the experiment directory", "writable --root_dir"),
        (
            ["--experiment=base", "--model=linear"],
            "was run with another configuration (model: 'small_cnn' -> 'linear'",
            "",
        ),
        (["--experiment=corrupt", "--rounds=3"], "checkpoint of round 3", "is unreadable"),
        (["--roundz=3"], "Unknown command line flag 'roundz'", ""),
    ]

    def attempt(case):
        # A case's own --root_dir comes later on the command line, and absl keeps the last.
        return train("--rounds=3", *case[0], cache=cache, root=runs)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(attempt, cases))
    for (flags, first, second), proc in zip(cases, results, strict=True):
        assert proc.returncode != 0, flags
        assert first in proc.stderr and second in proc.stderr, (flags, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
    for path, digest in protected.items():
        assert tree_digest(path) == digest, f"{path} changed"
    assert len(cases) >= 15


def test_evaluate_gives_the_same_accuracy_from_the_exported_model_and_the_checkpoint(workspace, finished_run):
    cache, runs = workspace

    def evaluate(source: str) -> str:
        cmd = [sys.executable, "-m", "experiments.evaluate", f"--cache_dir={cache}", f"--root_dir={runs}"]
        cmd += [*TINY_FLAGS, "--experiment=base", f"--source={source}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    from_model, from_checkpoint = evaluate("model"), evaluate("checkpoint")
    assert "checkpoint of round 3" in from_checkpoint
    summary = [
        line for line in from_model.splitlines() if line.startswith(("clients", "pooled accuracy", "per-client"))
    ]
    assert len(summary) == 4 and all(line in from_checkpoint for line in summary)


def test_no_worker_process_of_any_binary_run_remains(workers_before_this_module):
    # Every binary run above has exited; a worker of theirs would now be an orphan.
    assert conftest.orphaned_workers() - workers_before_this_module == set()


def test_sigterm_stops_after_saving_and_tensorboard_really_shows_the_scalars(workspace):
    cache, runs = workspace
    proc = start_train("--rounds=40", "--experiment=signalled", "--tensorboard", cache=cache, root=runs)
    url = None
    for line in proc.stdout:
        if line.startswith("TensorBoard: "):
            url = line.split()[1]
        if line.startswith("round  3/40"):
            break
    assert url and url.startswith("http://127.0.0.1:")
    tags = ""
    deadline = time.monotonic() + 60
    while "train/loss" not in tags and time.monotonic() < deadline:
        time.sleep(1)
        with contextlib.suppress(OSError):
            tags = urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=5).read().decode()
    assert "train/loss" in tags and "privacy/epsilon" in tags
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: stopping after this round" in err
    table = rows(os.path.join(runs, "signalled", "metrics.csv"))
    last = int(table[-1]["round"])
    assert 3 <= last < 40
    assert f"program_state_{last}" in os.listdir(os.path.join(runs, "signalled", "checkpoints"))
    with pytest.raises(OSError):  # TensorBoard went with the run
        urllib.request.urlopen(url, timeout=5)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(workspace):
    cache, runs = workspace
    # A learning rate of 1e12 is not enough: TFF drops non-finite client results and the
    # loss stays huge but finite. A model with NaN logits makes every client diverge.
    proc = train("--rounds=5", "--experiment=diverged", "--model=tests.models_test:nan_logits", cache=cache, root=runs)
    assert proc.returncode == 3, proc.stderr
    assert "non-finite training loss" in proc.stderr and "Lower the client learning rate" in proc.stderr
    checkpoints = os.path.join(runs, "diverged", "checkpoints")
    saved = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
    rows_written = rows(os.path.join(runs, "diverged", "metrics.csv"))
    # Every CSV row is from a finite round, and the newest checkpoint is the last of them.
    assert all(float(r["train/loss"]) < float("inf") for r in rows_written)
    if rows_written:
        assert f"program_state_{rows_written[-1]['round']}" in saved
    else:
        assert saved == []


def test_device_model_run_reports_devices_and_counts_compressed_bytes(workspace):
    cache, runs = workspace
    proc = train(
        "--rounds=2",
        "--experiment=mobile",
        "--device_model",
        "--dp=none",
        "--compression",
        "--deadline_seconds=60",
        cache=cache,
        root=runs,
    )
    assert proc.returncode == 0, proc.stderr
    # Compression runs without DP, so there is no epsilon to label (devices_test checks the DP label).
    assert "epsilon inf" in proc.stdout and "no differential privacy" in proc.stdout
    assert "devices  low:" in proc.stdout
    table = rows(os.path.join(runs, "mobile", "metrics.csv"))
    assert [r["round"] for r in table] == ["1", "2"]
    for r in table:
        # small_cnn uploads 69,056 bytes compressed (tests/devices_test.py), downloads 217,848.
        assert float(r["system/bytes_up"]) == 69_056 * float(r["system/reported"])
        assert float(r["system/bytes_down"]) == 217_848 * float(r["system/selected"])
        assert float(r["system/clients"]) == float(r["system/reported"])
        assert 0 < float(r["system/simulated_round_seconds"]) <= 60
    with open(os.path.join(runs, "mobile", "device_participation.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"low", "mid", "high"}
    assert sum(t["reported"] for t in summary.values()) == sum(float(r["system/reported"]) for r in table)
