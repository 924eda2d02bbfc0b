"""End-to-end runs of `python -m experiments.train` on a tiny generated population."""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import numpy as np
import portpicker
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tests import conftest
from tffpipe import accounting, configs
from tffpipe.tasks.emnist import generator

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


EMNIST_ONLY_FLAGS = ("--num_writers=", "--median_examples=", "--data_seed=")  # refused with --task=keyboard


def train_args(*flags: str, cache: str, root: str) -> list[str]:
    tiny = TINY_FLAGS
    if "--task=keyboard" in flags:
        tiny = [flag for flag in TINY_FLAGS if not flag.startswith(EMNIST_ONLY_FLAGS)]
    return [f"--cache_dir={cache}", f"--root_dir={root}", *tiny, *flags]


def train_command(*flags: str, cache: str, root: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *train_args(*flags, cache=cache, root=root)]


def train(*flags: str, cache: str, root: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = train_command(*flags, cache=cache, root=root)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train_forked(forks, *flags: str, cache: str, root: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`train`, run in a process forked from the fork server that imported TF once (tests/forkserver.py).

    For runs whose test needs no process of its own (no signal sent, no process watched):
    the same run, output and exit code, without the ~5 s (30-60 s under load) of imports.
    """
    (proc,) = forks.run([("train", train_args(*flags, cache=cache, root=root))], timeout=timeout)
    return proc


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
def finished_run(forks, workspace):
    cache, runs = workspace
    proc = train_forked(forks, "--rounds=3", "--experiment=base", cache=cache, root=runs)
    assert proc.returncode == 0, proc.stderr
    return proc, os.path.join(runs, "base")


def test_outputs_have_the_expected_layout_columns_and_rows(finished_run):
    proc, exp = finished_run
    assert "round 3/3" in proc.stdout and "epsilon" in proc.stdout and "Poisson sampling" in proc.stdout
    assert sorted(os.listdir(exp)) == [
        ".lock",  # held by the running process (flock), so two runs never share an experiment
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
    for r in table[1:]:  # every evaluation's per-client distribution over its 4 held-out clients (--eval_clients)
        assert r["eval/clients"] == "4.0"
        for name in ("accuracy", "loss"):
            p10, p50, p90 = (float(r[f"eval/{name}_p{q}"]) for q in (10, 50, 90))
            assert p10 <= p50 <= p90
    eps = [float(r["privacy/epsilon"]) for r in table]
    assert eps == sorted(eps) and eps[0] > 0
    assert "program_state_3" in os.listdir(os.path.join(exp, "checkpoints"))
    with open(os.path.join(exp, "summary.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model = tf.keras.models.load_model(os.path.join(exp, "model.keras"))
    assert model.output_shape == (None, 62)


def test_the_last_evaluations_quantiles_are_those_of_its_clients_evaluated_one_by_one(workspace, finished_run):
    from tffpipe import evaluation, program

    _, exp = finished_run
    last = rows(os.path.join(exp, "metrics.csv"))[-1]
    data_dir = generator.ensure_generated(workspace[0], conftest.TINY, workers=1)  # the run's data, generated
    task = conftest.emnist_task(data_dir)
    ids = program.eval_client_ids(task.test_data.client_ids, configs.ExperimentConfig(eval_clients=4))  # as the run
    model = tf.keras.models.load_model(os.path.join(exp, "model.keras"))  # round 3's weights, as evaluated last
    each = evaluation.per_client_metrics(model, task, ids, names=("accuracy", "loss"))  # Keras, one client at a time
    assert float(last["eval/clients"]) == len(each["loss"][0]) == 4
    for name in ("accuracy", "loss"):  # after 3 rounds the accuracies may all be 0; the losses differ per client
        expected = [np.percentile(each[name][0], q) for q in (10, 50, 90)]
        found = [float(last[f"eval/{name}_p{q}"]) for q in (10, 50, 90)]
        assert found == pytest.approx(expected, rel=1e-4, abs=1e-6), name


def test_tensorboard_holds_scalars_hparams_and_sample_images(finished_run):
    _, exp = finished_run
    acc = event_accumulator.EventAccumulator(
        os.path.join(exp, "tensorboard"), size_guidance={"tensors": 0, "images": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Tensors("eval/accuracy")] == [2, 3]
    for name in ("accuracy", "loss"):  # each evaluated client's value, as a histogram (4 clients)
        histograms = acc.Tensors(f"eval/per_client/{name}")
        assert [e.step for e in histograms] == [2, 3]
        assert [tf.make_ndarray(e.tensor_proto)[:, 2].sum() for e in histograms] == [4, 4]
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
    assert list(result[0]) == list(reference[0])  # the same columns, per-client quantiles included
    for column in ("train/loss", "train/accuracy", "eval/accuracy", "privacy/epsilon", "privacy/clip"):
        assert [r[column] for r in result] == [r[column] for r in reference], column
    for column in ("eval/clients", "eval/accuracy_p10", "eval/accuracy_p50", "eval/accuracy_p90", "eval/loss_p50"):
        assert [r[column] for r in result] == [r[column] for r in reference], column
    acc = event_accumulator.EventAccumulator(os.path.join(runs, "killed", "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3]  # no round missing or duplicated


def test_raising_rounds_extends_a_finished_run(forks, workspace, finished_run):
    cache, runs = workspace
    shutil.copytree(finished_run[1], os.path.join(runs, "extended"))
    proc = train_forked(forks, "--rounds=4", "--experiment=extended", cache=cache, root=runs)
    assert proc.returncode == 0, proc.stderr
    assert "round 3/4" not in proc.stdout and "round 4/4" in proc.stdout
    assert [r["round"] for r in rows(os.path.join(runs, "extended", "metrics.csv"))] == ["1", "2", "3", "4"]


def test_train_with_export_and_personalize_every_writes_the_tflite_files_and_the_gains(forks, workspace, finished_run):
    # One extension of the finished run (round 4) serves both flags: no new run from round 1.
    cache, runs = workspace
    exp = os.path.join(runs, "exported")
    shutil.copytree(finished_run[1], exp)
    flags = ("--rounds=4", "--experiment=exported", "--export", "--personalize_every=2")
    proc = train_forked(forks, *flags, cache=cache, root=runs)
    assert proc.returncode == 0, proc.stderr
    variants = [v.value for v in configs.ExportVariant]
    assert sorted(os.listdir(os.path.join(exp, "export"))) == sorted(
        ["manifest.json", "tensorboard", *(f"model_{v}.tflite" for v in variants)]
    )
    with open(os.path.join(exp, "export", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["source"] == os.path.join(exp, "model.keras")  # the model the run just saved
    assert list(manifest["variants"]) == variants and not any("error" in v for v in manifest["variants"].values())
    for v in variants:  # each file's size is the manifest's
        assert manifest["variants"][v]["bytes"] == os.path.getsize(os.path.join(exp, "export", f"model_{v}.tflite"))
    assert manifest["variants"]["float32"]["argmax_agreement"] >= 0.999  # the float model predicts what Keras does
    assert f"TFLite files in {os.path.join(exp, 'export')}" in proc.stdout
    table = rows(os.path.join(exp, "metrics.csv"))
    assert [r.get("personalization/clients", "") != "" for r in table] == [False, False, False, True]  # round 4
    last = table[-1]
    clients = float(last["personalization/clients"])
    assert 0 < clients <= 4  # the evaluation's 4 clients, less those too small to split in two
    for when in ("before", "after"):
        p10, p50, p90 = (float(last[f"personalization/accuracy_{when}_p{q}"]) for q in (10, 50, 90))
        assert 0 <= p10 <= p50 <= p90 <= 1
    improved, hurt = (float(last[f"personalization/accuracy_fraction_{k}"]) for k in ("improved", "hurt"))
    assert improved + hurt <= 1 and (improved * clients) % 1 == 0  # a share of whole clients
    acc = event_accumulator.EventAccumulator(os.path.join(exp, "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (gain,) = acc.Tensors("personalization/accuracy_gain")  # each client's gain, as a histogram at round 4
    assert gain.step == 4 and tf.make_ndarray(gain.tensor_proto)[:, 2].sum() == clients


def _corrupt_checkpoint(runs: str, source: str) -> str:
    exp = os.path.join(runs, "corrupt")
    shutil.copytree(source, exp)
    state_dir = os.path.join(exp, "checkpoints", "program_state_3")
    for base, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(base, name), "wb") as f:
                f.write(b"garbage")
    return exp


def _data_dir_with(tmp: str, name: str, cache: str, content: bytes | None = None, example: dict | None = None) -> str:
    """A data directory whose emnist_all.sqlite is `content`, or the tiny file with every train example replaced."""
    directory = os.path.join(tmp, name)
    os.makedirs(directory)
    path = os.path.join(directory, "emnist_all.sqlite")
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
        return directory
    shutil.copy(os.path.join(generator.cached_data_dir(cache, conftest.TINY), "emnist_all.sqlite"), path)
    con = sqlite3.connect(path)
    con.execute("UPDATE examples SET serialized_example_proto = ? WHERE split_name = 'all_train'", (encode(example),))
    con.commit()
    con.close()
    return directory


def encode(example: dict) -> bytes:
    from tffpipe.data import example_proto

    return example_proto.encode_example(example)


def test_bad_inputs_each_give_one_error_line_and_change_nothing(forks, workspace, finished_run, tmp_path):
    """Every binary, every bad input: one `error:` line naming it, exit 2, no traceback, nothing written."""
    cache, runs = workspace
    exp = finished_run[1]
    corrupt = _corrupt_checkpoint(runs, exp)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    latin1, loop = tmp_path / "latin1.flags", tmp_path / "loop.flags"
    latin1.write_bytes(b"--rounds=2\n--experiment=caf\xe9\n")  # a UnicodeDecodeError traceback
    loop.write_text(f"--rounds=2\n--flagfile={loop}\n")  # absl warned, then a default 3,400-client run began
    bad = str(tmp_path)
    not_a_model = tmp_path / "model.keras"
    not_a_model.write_text("not a model")
    busy = socket.socket()  # a port in use: held by this test while the cases run
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    closed_port = portpicker.pick_unused_port()  # nothing listens there
    short_pixels = _data_dir_with(bad, "short", cache, example={"label": [1], "pixels": np.zeros(700, "f4")})
    bad_label = _data_dir_with(bad, "label", cache, example={"label": [99], "pixels": np.zeros(784, "f4")})
    train_cases = [
        # Flags absl rejects while parsing, and the grouped help.
        (["--rounds=1e9"], "--rounds=1e9: invalid literal for int()"),
        (["--dp=bogus"], "--dp=bogus: value should be one of <none|fixed|adaptive|tree|distributed>"),
        (["--flagfile=/nonexistent.flags"], "/nonexistent.flags"),
        ([f"--flagfile={latin1}"], f"--flagfile={latin1}: line 2 is not UTF-8 text"),
        ([f"--flagfile={loop}"], f"--flagfile={loop} includes itself"),
        # A cache directory that cannot be written: an OSError traceback.
        ([f"--cache_dir={blocker}"], f"--cache_dir={blocker}: cannot create {blocker}/embedded-"),
        (["--roundz=3"], "Unknown command line flag 'roundz'"),
        (["extra"], "unexpected arguments ['extra']"),
        # Ranges, with the flag named once.
        (["--rounds=0"], "--rounds=0: rounds must be >= 1, got 0"),
        (["--personalize_every=3"], "--personalize_every=3: every=3 must be a multiple of eval_every=2"),
        (["--personalize_every=2", "--eval_clients=0"], "--personalize_every=2: every=2 personalizes the evaluat"),
        (["--personalize_fraction=1"], "--personalize_fraction=1.0: fraction must be in (0, 1)"),
        (["--clients_per_round=0"], "--clients_per_round=0: clients_per_round must be >= 1"),
        (["--batch_size=0"], "--batch_size=0: batch_size must be >= 1"),
        (["--seed=-1"], "--seed=-1: seed must be >= 0"),
        (["--noise_multiplier=-1"], "--noise_multiplier=-1.0: noise_multiplier must be >= 0, got -1.0"),
        (["--target_epsilon=-1", "--dp=tree"], "--target_epsilon=-1.0: target_epsilon must be positive"),
        (["--delta=2"], "--delta=2.0: delta must be in (0, 1)"),
        (["--experiment=a/b"], "--experiment=a/b: experiment must be a plain directory name"),
        (["--experiment=.hidden"], "--experiment=.hidden: experiment must be a plain directory name"),
        (["--experiment=a\nb"], "--experiment=a b: experiment must be a plain directory name (printable"),
        # NaN and infinity, everywhere a float goes.
        (["--noise_multiplier=nan"], "--noise_multiplier=nan: noise_multiplier must be a finite number"),
        (["--noise_multiplier=inf"], "--noise_multiplier=inf: noise_multiplier must be a finite number"),
        (["--clip=nan"], "--clip=nan: clip must be a finite number"),
        (["--clip=inf"], "--clip=inf: clip must be a finite number"),
        (["--dp=adaptive", "--clip_learning_rate=nan"], "--clip_learning_rate=nan: clip_learning_rate must be"),
        (["--zeroing_norm=nan"], "--zeroing_norm=nan: zeroing_norm must be a finite number"),
        (["--client_learning_rate=nan"], "--client_learning_rate=nan: client_learning_rate must be a finite"),
        (["--client_learning_rate=inf"], "--client_learning_rate=inf: client_learning_rate must be a finite"),
        (["--server_learning_rate=nan"], "--server_learning_rate=nan: server_learning_rate must be a finite"),
        (["--adaptive_epsilon=nan"], "--adaptive_epsilon=nan: adaptive_epsilon must be a finite"),
        (["--label_concentration=nan"], "--label_concentration=nan: label_concentration must be a finite"),
        (["--quantity_sigma=nan"], "--quantity_sigma=nan: quantity_sigma must be a finite"),
        (["--device_model", "--deadline_seconds=nan"], "--deadline_seconds=nan: deadline_seconds must be a finite"),
        (["--device_model", "--start_hour_utc=99"], "--start_hour_utc=99.0: start_hour_utc must be in [0, 24)"),
        # Combinations, named by the flag to change.
        (["--deadline_seconds=60"], "--deadline_seconds is a device-model flag: add --device_model"),
        (["--sampling=device"], "--sampling=device: sampling=device describes the device model"),
        (["--device_model", "--device_profiles=/nonexistent.csv"], "--device_profiles=/nonexistent.csv: device_pro"),
        # A flag of another task would be silently ignored.
        (["--task=keyboard", "--only_digits"], "--only_digits is a flag of the emnist task, which --task=keyboard"),
        (["--target_epsilon=2"], "--noise_multiplier=0.3: give noise_multiplier or target_epsilon, not both"),
        (["--compression"], "--compression: compression is not combined with DP aggregation"),
        (["--dp=adaptive", "--noise_multiplier=1"], "--clients_per_round=3: adaptive clipping with"),
        (["--accountant=pld", "--sampling=uniform"], "--accountant=pld: the PLD accountant does not support"),
        (["--dp=tree", "--device_model"], "--dp=tree: tree aggregation is accounted for clients that take part"),
        (["--algorithm=fedsgd"], "--algorithm=fedsgd: fedsgd takes only weighted aggregators"),
        (["--canaries=1"], "--canaries=1: canaries must be 0 (no audit) or at least 2"),
        # Sizes beyond memory (1 TB and more), refused before anything is built: MemoryError or a dead worker.
        (["--canaries=1000000000"], "--canaries=1000000000: canaries=1000000000 needs at least 1,024.0 GB of memory"),
        (
            ["--shuffle_buffer=100000000000"],
            "--shuffle_buffer=100000000000: shuffle_buffer=100000000000 needs at least",
        ),
        (["--workers=localhost"], "--workers=localhost: workers: 'localhost' is not host:port"),
        (["--local_workers=0"], "--local_workers=0: local_workers must be >= 1"),
        (["--local_workers=1000"], "--local_workers=1000: local_workers must be <= "),
        (
            ["--workers=http://127.0.0.1:18731"],
            "--workers=http://127.0.0.1:18731: workers: 'http://127.0.0.1:18731' is",
        ),
        (["--workers=::1"], "--workers=::1: workers: '::1': write an IPv6 address in brackets"),
        # Worker services that cannot serve: found before anything is written, so bad input too.
        ([f"--workers=127.0.0.1:{closed_port}"], f"worker 127.0.0.1:{closed_port} is unreachable (Connection refused)"),
        (["--workers=127.0.0.1:1", "--local_workers=2"], "--local_workers=2: give remote workers or local_workers"),
        (["--canaries=5", "--device_model"], "--canaries=5: canaries are sampled like every client"),
        (["--max_epsilon=nan"], "--max_epsilon=nan: max_epsilon must be a finite number"),
        (["--max_epsilon=0.5"], "--max_epsilon=0.5: max_epsilon=0.5 allows no round: round 1 alone takes epsilon"),
        (["--clients_per_round=50"], "--clients_per_round=50: clients_per_round=50 exceeds the 12 clients"),
        (["--dp=tree", "--rounds=10"], "--rounds=10: tree aggregation is accounted for clients that take part at"),
        # Model builders.
        (["--model=resnet"], "--model=resnet: unknown model 'resnet' for the emnist task; choose one of"),
        (["--model=no_such_pkg:build"], "cannot import module 'no_such_pkg'"),
        (
            ["--model=tests.models_test:wrong_output"],
            "outputs shape (1, 63) for an input of shape (1, 28, 28, 1); the emnist task needs (1, 62)",
        ),
        (["--model=tests.models_test:raises"], "failed when called with 62: RuntimeError: out of ideas"),
        (["--model=tests.models_test:takes_nothing"], "failed when called with 62: TypeError"),
        (["--model=tests.broken_builder_module:build"], "failed: ZeroDivisionError: division by zero"),
        (["--model=tests.models_test:exits"], "model builder 'tests.models_test:exits' called sys.exit(0) when"),
        (["--model=tests.models_test:interrupts"], "builder 'tests.models_test:interrupts' raised KeyboardInterrupt"),
        (["--model=tests.models_test:no_weights"], "model 'tests.models_test:no_weights' has no trainable weights"),
        # Data files.
        (["--data_dir=/nonexistent/emnist"], "data file not found: /nonexistent/emnist/emnist_all.sqlite"),
        ([f"--data_dir={_data_dir_with(bad, 'text', cache, b'not a database' * 10)}"], "not an SQLite database"),
        ([f"--data_dir={short_pixels}"], "has 700 pixel values instead of 784 floats"),
        ([f"--data_dir={bad_label}"], "has label [99] outside [0, 62)"),
        # Output directories and checkpoints.
        ([f"--root_dir={blocker}"], "cannot create the experiment directory"),
        (["--experiment=base", "--model=linear"], "was run with another configuration (model: 'small_cnn' -> 'linear'"),
        (["--experiment=corrupt", "--rounds=3"], "checkpoint of round 3"),
        (["--experiment=base", "--rounds=2"], f"--rounds=2: experiment {exp} is already at round 3, past rounds=2"),
    ]
    other_cases = [
        ("compute_epsilon", ["--noise_multiplier=nan"], "--noise_multiplier=nan: noise_multiplier must be a finite"),
        ("compute_epsilon", ["--target_epsilon=nan"], "--target_epsilon=nan: target_epsilon must be a finite"),
        ("compute_epsilon", ["--num_writers=0"], "--num_writers=0: num_writers must be >= 1, got 0"),
        ("compute_epsilon", ["--data_dir=/nonexistent"], "data file not found"),
        ("compute_epsilon", [f"--flagfile={latin1}"], f"--flagfile={latin1}: line 2 is not UTF-8 text"),
        ("compute_epsilon", [f"--flagfile={loop}"], f"--flagfile={loop} includes itself"),
        ("compute_epsilon", ["--rounds=x"], "--rounds=x: invalid literal for int()"),
        ("compute_epsilon", ["--dp=none", "--max_epsilon=3"], "--max_epsilon=3.0: max_epsilon needs a DP mechanism"),
        # The budget check train makes (--max_epsilon=0.5 above), not "allows 0 rounds".
        ("compute_epsilon", ["--max_epsilon=1e-9"], "--max_epsilon=1e-09: max_epsilon=1e-09 allows no round: round 1"),
        ("evaluate", [*_eval_flags(cache, runs), f"--model_path={not_a_model}"], "is not a loadable Keras model"),
        ("evaluate", [*_eval_flags(cache, runs), "--model_path=/nonexistent.keras"], "no Keras model file at"),
        ("evaluate", [*_eval_flags(cache, runs), "--max_clients=0"], "--max_clients=0: must be positive or -1"),
        # Checked against the run's hparams.json before any data is generated or a directory created.
        ("evaluate", [*_eval_flags(cache, runs), "--model=linear"], "trained with another configuration (model: 'smal"),
        (
            "evaluate",
            [f"--cache_dir={cache}", f"--root_dir={runs}", "--experiment=base", "--task=keyboard"],
            "trained with another configuration (task: 'emnist' -> 'keyboard')",
        ),
        (
            "evaluate",
            [f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS, "--experiment=missing", "--source=checkpoint"],
            f"--experiment=missing: experiment {os.path.join(runs, 'missing')} has not completed a round",
        ),
        ("data_card", [f"--cache_dir={cache}", f"--png={blocker}/samples.png"], f"--png={blocker}/samples.png"),
        ("data_card", ["--num_writers=nan"], "--num_writers=nan: invalid literal for int()"),
        ("tensorboard", ["--root=/nonexistent"], "--root=/nonexistent: no such directory yet"),
        ("tensorboard", [f"--root={runs}", f"--port={busy_port}"], f"--port={busy_port}: port {busy_port} is already"),
        ("worker", ["--bind=0.0.0.0"], "--bind=0.0.0.0: a wildcard address exposes an unauthenticated service"),
        ("worker", ["--bind=8.8.8.8"], "--bind=8.8.8.8: a public address exposes an unauthenticated service"),
        ("worker", ["--bind=myhost"], "--bind=myhost: not an IP address"),
        ("worker", ["--port=0"], "--port=0: must be in 1-65535"),
        ("worker", ["--bind=::ffff:0.0.0.0"], "--bind=::ffff:0.0.0.0: a wildcard address (0.0.0.0 once normalized)"),
        ("worker", ["--bind=[::]"], "--bind=[::]: a wildcard address (:: once normalized) exposes"),
        ("worker", ["--bind=::ffff:8.8.8.8"], "--bind=::ffff:8.8.8.8: a public address (8.8.8.8 once normalized)"),
        ("worker", ["--max_concurrent_calls=0"], "--max_concurrent_calls=0: must be -1 (no limit) or a positive"),
        ("worker", [f"--port={busy_port}"], f"--port={busy_port}: port {busy_port} is already in use on 127.0.0.1"),
        ("worker", ["--bind=10.99.99.99"], "--bind=10.99.99.99: this host has no such address"),
    ]
    before = {path: tree_digest(path) for path in (runs, cache)}
    cases = [("train", flags, message) for flags, message in train_cases] + other_cases
    # A few cases run as a user runs them, each in a fresh interpreter (imports and TF's start-up
    # included; tests/cli_test.py runs train's --model=resnet so too); the others in processes forked
    # from one that imported TF once (tests/forkserver.py), which spares each case that gets as far
    # as TF ~5 s of imports (30-60 s under load).
    fresh = {
        ("train", "--rounds=0"),
        ("evaluate", f"--model_path={not_a_model}"),
        ("compute_epsilon", "--max_epsilon=1e-9"),
        ("worker", "--bind=0.0.0.0"),
    }
    fresh_cases = [case for case in cases if (case[0], case[1][-1]) in fresh]
    forked_cases = [case for case in cases if (case[0], case[1][-1]) not in fresh]
    assert len(fresh_cases) == len(fresh)

    def args(binary, flags):
        return train_args("--rounds=3", *flags, cache=cache, root=runs) if binary == "train" else list(flags)

    def run_fresh(case):
        binary, flags, _ = case
        cmd = [sys.executable, "-m", f"experiments.{binary}", *args(binary, flags)]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        forked_args = [(binary, args(binary, flags)) for binary, flags, _ in forked_cases]
        forked = pool.submit(forks.run, forked_args, parallel=2)
        results = list(pool.map(run_fresh, fresh_cases)) + forked.result()
    busy.close()
    failures = []
    for case, proc in zip(fresh_cases + forked_cases, results, strict=True):
        binary, flags, message = case
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if proc.returncode != 2 or message not in proc.stderr or len(lines) != 1 or not lines[0].startswith("error: "):
            how = "fresh" if case in fresh_cases else "forked"
            failures.append((binary, flags, how, proc.returncode, proc.stderr[-800:]))
    assert not failures, "\n".join(map(str, failures))
    after = {path: tree_digest(path) for path in (runs, cache)}
    assert after == before, "a failed run created or changed files"
    assert os.path.isdir(corrupt)


def _eval_flags(cache: str, runs: str) -> list[str]:
    return [f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS, "--experiment=base"]


def test_help_lists_the_flags_by_group_with_their_defaults():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--helpshort"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("task and data:", "model:", "algorithm:", "privacy:", "devices:", "rounds:", "outputs:"):
        assert f"\n  {group}" in out, group
    assert "--server_learning_rate (default unset): Server learning rate; unset: per algorithm (fedavg 1," in out
    assert "fedadam 0.00316" in out and "--tensorboard (default False)" in out


@pytest.mark.parametrize("binary", ["train", "compute_epsilon", "tensorboard"])
def test_helpfull_as_the_help_advertises_adds_absls_own_flags(binary):
    command = [sys.executable, "-m", f"experiments.{binary}", "--helpfull"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "(--helpfull adds absl's own)" in proc.stdout
    own = proc.stdout.split("\n  absl's own:\n")[1]
    assert "--verbosity (default -1)" in own and "--flagfile=<file>" in own and "--root_dir" not in own


def test_evaluate_gives_the_same_accuracy_from_the_exported_model_and_the_checkpoint(forks, workspace, finished_run):
    cache, runs = workspace

    def evaluate(source: str) -> str:
        args = [f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS, "--experiment=base", f"--source={source}"]
        (proc,) = forks.run([("evaluate", args)], timeout=600)  # forked from one process that imported TF
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    from_model, from_checkpoint = evaluate("model"), evaluate("checkpoint")
    assert "checkpoint of round 3" in from_checkpoint
    summary = [
        line for line in from_model.splitlines() if line.startswith(("accuracy:", "pooled accuracy", "per-client"))
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
    assert "SIGTERM received: stopping after this step" in err
    table = rows(os.path.join(runs, "signalled", "metrics.csv"))
    last = int(table[-1]["round"])
    assert 3 <= last < 40
    assert f"program_state_{last}" in os.listdir(os.path.join(runs, "signalled", "checkpoints"))
    with pytest.raises(OSError):  # TensorBoard went with the run
        urllib.request.urlopen(url, timeout=5)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(forks, workspace):
    cache, runs = workspace
    # A learning rate of 1e12 is not enough: TFF drops non-finite client results and the
    # loss stays huge but finite. This model's logits turn NaN from round 4 on (see its docstring).
    model = "--model=tests.models_test:nan_after_three_rounds"
    proc = train_forked(forks, "--rounds=5", "--experiment=diverged", model, cache=cache, root=runs)
    assert proc.returncode == 3, proc.stderr
    assert "round 4 produced a non-finite training loss" in proc.stderr
    assert "the last good checkpoint (round 3) is kept" in proc.stderr
    assert "Lower the client learning rate" in proc.stderr
    # Rounds 1-3 were written, each with a finite loss; round 4 left no row and no checkpoint.
    rows_written = rows(os.path.join(runs, "diverged", "metrics.csv"))
    assert [r["round"] for r in rows_written] == ["1", "2", "3"]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows_written)
    saved = os.listdir(os.path.join(runs, "diverged", "checkpoints"))
    assert "program_state_3" in saved and "program_state_4" not in saved


# Over two local workers: the device model and compression work there too (tests/runtime_test.py
# compares each algorithm and aggregator over one and two workers).
MOBILE_FLAGS = (
    "--device_model",
    "--dp=none",
    "--noise_multiplier=0",
    "--compression",
    "--deadline_seconds=60",
    "--local_workers=2",
)


@pytest.fixture(scope="module")
def mobile_run(forks, workspace) -> subprocess.CompletedProcess:
    """Two rounds of the device model with compression, experiment `mobile`."""
    cache, runs = workspace
    proc = train_forked(forks, "--rounds=2", "--experiment=mobile", *MOBILE_FLAGS, cache=cache, root=runs)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_device_model_run_reports_devices_and_counts_compressed_bytes(forks, workspace, mobile_run):
    cache, runs = workspace
    proc = mobile_run
    # Compression runs without DP, so there is no epsilon to label (devices_test checks the DP label).
    assert "finished at round 2: no differential privacy (no clipping, no noise), so no epsilon." in proc.stdout
    round_lines = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(round_lines) == 2 and not any("eps" in line for line in round_lines)
    assert "devices  low:" in proc.stdout
    table = rows(os.path.join(runs, "mobile", "metrics.csv"))
    assert [r["round"] for r in table] == ["1", "2"]
    for r in table:
        # small_cnn uploads 76,144 bytes compressed (tests/devices_test.py), downloads 217,848.
        assert float(r["system/bytes_up"]) == 76_144 * float(r["system/reported"])
        assert float(r["system/bytes_down"]) == 217_848 * float(r["system/selected"])
        assert float(r["system/clients"]) == float(r["system/reported"])
        assert 0 < float(r["system/simulated_round_seconds"]) <= 60
        assert float(r["system/workers"]) == 2
    with open(os.path.join(runs, "mobile", "device_participation.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"low", "mid", "high"}
    assert sum(t["reported"] for t in summary.values()) == sum(float(r["system/reported"]) for r in table)
    # The checkpoint holds the compression aggregator's state: evaluate restores it into the same process.
    (evaluated,) = forks.run(  # forked from one process that imported TF (tests/forkserver.py)
        [
            (
                "evaluate",
                [f"--cache_dir={cache}", f"--root_dir={runs}", *TINY_FLAGS]
                + ["--experiment=mobile", "--device_model", "--dp=none", "--noise_multiplier=0", "--compression"]
                + ["--deadline_seconds=60", "--source=checkpoint"],
            )
        ],
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "checkpoint of round 2" in evaluated.stdout and "pooled accuracy" in evaluated.stdout


def test_a_resumed_device_model_run_replays_the_device_clock(forks, workspace, mobile_run):
    # The two-round run, as if killed after round 2's row but before its checkpoint: the rerun
    # resumes from round 1's and must give round 2 the devices the uninterrupted run had (who was
    # available, asked, reported, dropped or late, and the simulated clock). Without replaying
    # round 1, a restart would start the clock, and the windows it opens, again.
    cache, runs = workspace
    resumed_dir = os.path.join(runs, "mobile_resumed")
    shutil.copytree(os.path.join(runs, "mobile"), resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "program_state_2"))
    resumed = train_forked(forks, "--rounds=2", "--experiment=mobile_resumed", *MOBILE_FLAGS, cache=cache, root=runs)
    assert resumed.returncode == 0, resumed.stderr
    assert "round 1/2" not in resumed.stdout and "round 2/2" in resumed.stdout  # only round 2 ran again
    expected, found = (rows(os.path.join(runs, e, "metrics.csv")) for e in ("mobile", "mobile_resumed"))
    assert [r["round"] for r in found] == ["1", "2"]
    columns = ("available", "selected", "reported", "dropped", "late", "simulated_round_seconds")
    for column in (*columns, "simulated_clock_hours", "bytes_up", "bytes_down"):
        assert found[1][f"system/{column}"] == expected[1][f"system/{column}"], column


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_ctrl_c_during_data_generation_stops_at_once_and_keeps_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    # 2,000 writers: generating them all takes far longer than the bound below (600 took 19 s here; a run that let
    # generation finish would fail it), while the bound leaves room for an interpreter with
    # TensorFlow loaded to exit on two loaded cores (10 s was exceeded once at load 20).
    flags = ["--num_writers=2000", "--median_examples=40", "--data_seed=11", "--rounds=1", "--clients_per_round=3"]
    run = start_train(*flags, cache=cache, root=str(tmp_path / "runs"))
    for line in run.stdout:
        if line.startswith("data: ["):
            break
    run.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = run.communicate(timeout=120)
    assert time.monotonic() - sent < 20 and run.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted:")
    assert "Traceback" not in err
    (data_dir,) = os.listdir(cache)
    assert os.listdir(os.path.join(cache, data_dir)) == []
    assert not os.path.exists(tmp_path / "runs")


def test_sigkill_during_data_generation_leaves_no_process_and_the_next_start_cleans_up(tmp_path):
    cache = str(tmp_path / "cache")
    flags = ["--num_writers=150", "--median_examples=40", "--data_seed=11", "--rounds=1", "--clients_per_round=3"]
    run = start_train(*flags, cache=cache, root=str(tmp_path / "runs"), stderr=subprocess.DEVNULL)
    helpers: set[int] = set()
    for line in run.stdout:
        helpers |= _descendants(run.pid)
        if line.startswith("data: ["):  # a chunk of writers is done; the others are being rendered
            break
    helpers |= _descendants(run.pid)
    assert helpers, "generation should run in worker processes"
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in helpers):
        time.sleep(0.2)
    assert not [p for p in helpers if os.path.exists(f"/proc/{p}")], "generation processes outlived the run"
    (data_dir,) = os.listdir(cache)
    assert [n for n in os.listdir(os.path.join(cache, data_dir)) if ".tmp-" in n], "the killed run's file is there"
    from tffpipe import configs

    population = configs.PopulationConfig(num_writers=150, median_examples=40, seed=11)
    generator.ensure_generated(cache, population, workers=1)
    assert os.listdir(os.path.join(cache, data_dir)) == ["emnist_all.sqlite"]


def test_a_budget_stops_at_the_last_round_within_it_and_a_larger_one_continues(forks, workspace):
    cache, runs = workspace
    from tffpipe import accounting, configs

    # The tiny plan: 12 writers, 3 per round (Poisson q = 0.25), z = 0.3, delta = 1/12^1.1.
    plan = accounting.PrivacyPlan(
        configs.Mechanism.FIXED, 0.3, 3, 12, configs.Sampling.POISSON, accounting.default_delta(12)
    )
    budget = (accounting.epsilon(plan, 2) + accounting.epsilon(plan, 3)) / 2  # between rounds 2 and 3
    first = train_forked(forks, "--rounds=5", f"--max_epsilon={budget}", "--experiment=budget", cache=cache, root=runs)
    assert first.returncode == 0, first.stderr
    assert "round 2/2" in first.stdout and "round 3/" not in first.stdout
    assert f"stopped at round 2 of 5: round 3 would take epsilon to {accounting.epsilon(plan, 3):.4g}" in first.stdout
    more = accounting.epsilon(plan, 4) + 0.01
    second = train_forked(forks, "--rounds=5", f"--max_epsilon={more}", "--experiment=budget", cache=cache, root=runs)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "round 3/4" in second.stdout and "round 4/4" in second.stdout
    assert [r["round"] for r in rows(os.path.join(runs, "budget", "metrics.csv"))] == ["1", "2", "3", "4"]


KEYBOARD_FLAGS = [
    "--task=keyboard",
    "--num_users=12",
    "--median_messages=8",
    "--vocab_size=100",
    "--sequence_length=10",
    "--clients_per_round=4",
    "--eval_clients=4",
    "--batch_size=8",
    "--epochs=1",
]


def test_a_small_keyboard_run_with_dp_trains_evaluates_and_reports_its_metrics(forks, tmp_path):
    # train_command leaves TINY_FLAGS' EMNIST-only flags out (refused with --task=keyboard); the keyboard flags win.
    root, cache = str(tmp_path / "runs"), str(tmp_path / "cache")
    proc = train_forked(
        forks,
        "--rounds=2",
        "--eval_every=2",
        "--dp=adaptive",
        "--noise_multiplier=0.2",
        *KEYBOARD_FLAGS,
        "--experiment=keyboard",
        "--median_messages=20",  # a tenth of each user's messages is held out: 2, enough to split for personalization
        "--personalize_every=2",
        "--personalize_learning_rate=0.03",
        cache=cache,
        root=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model cifg_lstm" in proc.stdout and "adaptive clipping" in proc.stdout
    table = rows(os.path.join(root, "keyboard", "metrics.csv"))
    for column in ("train/accuracy", "train/top3_accuracy", "train/perplexity", "train/num_tokens", "privacy/epsilon"):
        assert table[-1][column] != "", column
    assert 0 <= float(table[-1]["eval/accuracy"]) <= float(table[-1]["eval/top3_accuracy"]) <= 1
    # Evaluation reports perplexity too. That it is exp(the loss) is checked on a hand-computed example in
    # tests/tasks/keyboard/task_test.py: here both come from the same sums, so comparing them checks nothing.
    assert math.isfinite(float(table[-1]["eval/perplexity"]))
    # Every metric's per-client distribution but the counts; personalization of top-1 and top-3 alike.
    assert float(table[-1]["eval/clients"]) == 4 and "eval/num_tokens_p50" not in table[-1]
    for name in ("accuracy", "top3_accuracy", "perplexity", "loss"):
        assert float(table[-1][f"eval/{name}_p10"]) <= float(table[-1][f"eval/{name}_p90"]), name
    # 3 of the 4 evaluated users hold 2 held-out messages (one to fine-tune, one to evaluate); one holds 1: skipped.
    assert float(table[-1]["personalization/clients"]) == 3
    for name in ("accuracy", "top3_accuracy"):
        assert 0 <= float(table[-1][f"personalization/{name}_after_p50"]) <= 1, name
    acc = event_accumulator.EventAccumulator(
        os.path.join(root, "keyboard", "tensorboard"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    assert any(t.startswith("clients/") for t in acc.Tags()["tensors"])  # users' messages as text summaries


def test_keyboard_bad_inputs_each_give_one_error_line(forks, tmp_path):
    from tffpipe import configs
    from tffpipe.tasks.keyboard import generator as keyboard_generator

    cache = str(tmp_path / "cache")
    not_sqlite, no_counts = tmp_path / "text", tmp_path / "so"
    not_sqlite.mkdir()
    (not_sqlite / "stackoverflow.sqlite").write_bytes(b"")
    generated = keyboard_generator.ensure_generated(cache, configs.TextPopulationConfig(12, 0, 8), workers=1)
    no_counts.mkdir()
    shutil.copy(os.path.join(generated, "stackoverflow.sqlite"), no_counts)  # a good file, but no word counts

    def with_word_counts(name, edit):
        """The generated files, with the word counts' lines changed by `edit`."""
        directory = tmp_path / name
        directory.mkdir()
        shutil.copy(os.path.join(generated, "stackoverflow.sqlite"), directory)
        with open(os.path.join(generated, "stackoverflow.word_count"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        edit(lines)
        (directory / "stackoverflow.word_count").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return directory

    twice = with_word_counts("twice", lambda lines: lines.__setitem__(6, lines[5]))
    superscript = with_word_counts("sup", lambda lines: lines.__setitem__(2, lines[2].split()[0] + "\t\u00b2"))
    rare = tmp_path / "rare"  # bad rows the 64-row sample misses (a gRPC traceback mid-round with 40 clients)
    shutil.copytree(
        keyboard_generator.ensure_generated(str(tmp_path / "big"), configs.TextPopulationConfig(40, 0, 20), workers=1),
        rare,
    )
    con = sqlite3.connect(rare / "stackoverflow.sqlite")
    step = con.execute("SELECT MAX(rowid) FROM examples").fetchone()[0] // 64  # the sample's stride
    con.execute(
        "UPDATE examples SET serialized_example_proto = x'0a05' WHERE split_name = 'train' AND rowid % ? = 2", (step,)
    )
    con.commit()
    con.close()
    cases = [
        (["--vocab_size=0"], "--vocab_size=0: vocab_size must be >= 1"),
        (["--model=small_cnn"], "--model=small_cnn: unknown model 'small_cnn' for the keyboard task"),
        (["--vocab_size=100000"], "--vocab_size=100000: vocab_size=100000 exceeds the"),
        # Sizes beyond memory, refused before the model is built (it was, and the error named no flag).
        (["--vocab_size=1000000000"], "--vocab_size=1000000000: vocab_size=1000000000 needs at least"),
        (["--num_oov_buckets=2000000000"], "--num_oov_buckets=2000000000: num_oov_buckets=2000000000 needs at least"),
        (["--sequence_length=2000000000"], "--sequence_length=2000000000: sequence_length=2000000000 needs at least"),
        ([f"--data_dir={not_sqlite}"], "stackoverflow.sqlite is not an SQLite database"),
        ([f"--data_dir={no_counts}"], "stackoverflow.word_count"),
        ([f"--data_dir={twice}"], "stackoverflow.word_count line 7: the word"),  # TF's table refused it mid-run
        ([f"--data_dir={superscript}"], "stackoverflow.word_count line 3 is"),  # int('²') named no file
        ([f"--data_dir={rare}"], f"{rare}/stackoverflow.sqlite: row 2 (client 'u00000', split 'train') is not a"),
    ]

    root = str(tmp_path / "r")
    args = [
        train_args("--rounds=1", *KEYBOARD_FLAGS, *flags, "--experiment=bad", cache=cache, root=root)
        for flags, _ in cases
    ]
    results = forks.run([("train", a) for a in args])  # forked from one process that imported TF (tests/forkserver.py)
    for (flags, message), proc in zip(cases, results, strict=True):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (flags, proc.stderr[-1500:])
    assert not os.path.exists(tmp_path / "r")


def test_distributed_dp_bad_input_is_one_error_line_before_any_data(forks, tmp_path):
    cache, root = str(tmp_path / "cache"), str(tmp_path / "runs")
    cases = [
        (["--bits=0"], "--bits=0: bits must be >= 1, got 0"),
        (["--bits=63"], "--bits=63: bits must be an integer from 1 to 22, got 63"),
        (["--bits=16.5"], "--bits=16.5: invalid literal for int()"),
        # 3 clients need 4^bits >= 3 * 3.89^2 (TFF's 1e-4 wrap probability): 3 bits at least.
        (["--bits=2"], "--bits=2: bits=2 cannot hold the sum of 3 clients' values"),
        # The linear model's 48,670 weights rounded on 10 bits: epsilon 68 after 3 rounds, central 14.5.
        (["--bits=10"], "--bits=10: bits=10 is unusable for this model (48,670 parameters) and cohort (3 clients"),
        (["--compression"], "--compression: compression is not combined with the distributed mechanism"),
        (["--sampling=uniform"], "--sampling=uniform: the distributed mechanism is accounted under Poisson sampling"),
    ]

    args = [
        train_args("--rounds=3", "--model=linear", "--dp=distributed", *flags, cache=cache, root=root)
        for flags, _ in cases
    ]
    args.append(train_args("--rounds=3", "--bits=16", cache=cache, root=root))  # --dp=fixed (the default)
    cases.append((["--bits=16"], "--bits=16: bits=16 is the distributed mechanism's field width and has no effect"))
    results = forks.run([("train", a) for a in args])  # forked from one process that imported TF (tests/forkserver.py)
    for (flags, message), proc in zip(cases, results, strict=True):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (flags, proc.stderr[-1500:])
    assert not os.path.exists(cache) and not os.path.exists(root)  # no data generated, nothing written


def test_distributed_budget_stops_before_a_round_the_realized_noise_cannot_pay_for(forks, tmp_path):
    # Seed 5 samples 2 clients in round 1 where the shares are sized for 3, so round 1 costs
    # epsilon 15.3 instead of the planned 9.7. The plan allowed 2 rounds within 20 (9.7, then
    # 18.05); after round 1 as it was, round 2 with the expected 3 clients would reach 23.6.
    # --client_batching=auto: distributed DP never groups (each device noises its own update), said in one note.
    flags = (
        "--model=linear",
        "--dp=distributed",
        "--seed=5",
        "--max_epsilon=20",
        "--rounds=3",
        "--client_batching=auto",
    )
    proc = train_forked(
        forks, *flags, "--experiment=budget", cache=str(tmp_path / "cache"), root=str(tmp_path / "runs")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("note:")] == [
        "note: client_batching=auto runs per client: distributed DP needs each real client's own clipping, "
        "rounding and noise share"
    ]
    plan = accounting.PrivacyPlan(
        configs.Mechanism.DISTRIBUTED,
        0.3,
        3,
        12,
        configs.Sampling.POISSON,
        12**-1.1,
        clip=0.5,
        bits=20,
        dimension=48_670,
    )
    tracker = accounting.EpsilonTracker(plan)
    tracker.observe(1, 2)
    assert accounting.epsilon(plan, 2) <= 20 < tracker(2)
    assert f"stopped at round 1 of 3: round 2 would take epsilon to {tracker(2):.4g}, past the budget" in proc.stdout
    with open(tmp_path / "runs" / "budget" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1"] and float(rows[0]["privacy/noised_clients"]) == 2
    assert float(rows[0]["privacy/epsilon"]) == pytest.approx(tracker(1), rel=1e-9)
    # Run again: the rounds as they were (read back from metrics.csv) already spend the budget,
    # so the resumed run trains no round, not one more before it checks.
    again = train_forked(
        forks, *flags, "--experiment=budget", cache=str(tmp_path / "cache"), root=str(tmp_path / "runs")
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"stopped at round 1 of 3: round 2 would take epsilon to {tracker(2):.4g}" in again.stdout
    assert not any(line.startswith("round 2/") for line in again.stdout.splitlines())
    with open(tmp_path / "runs" / "budget" / "metrics.csv") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1"]
