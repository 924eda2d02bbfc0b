"""experiments/cli.py: bad input is one `error:` line and exit 2; anything else is an internal error, exit 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from experiments import cli, flag_groups
from tffpipe import accounting, client_groups, devices, errors, evaluation, models, outputs, validation
from tffpipe.data import sql_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise(error: Exception):
    def main():
        raise error

    return main


@pytest.mark.parametrize(
    "error",
    [
        validation.ConfigError("dp.clip", "clip must be positive, got 0"),
        accounting.AccountingError("privacy.delta", "delta must be in (0, 1), got 2"),
        devices.ProfileError("profiles.csv line 2: tier is 'ultra'"),
        flag_groups.FlagError("--max_clients=0: must be positive or -1 (all)"),
        models.ModelBuilderError("unknown model 'resnet' for the emnist task"),
        sql_files.DataFileError("data file not found: /nonexistent/emnist_all.sqlite"),
        outputs.CheckpointError("checkpoint of round 3 in /x is unreadable"),
        outputs.OutputError("cannot create the experiment directory /x"),
        client_groups.GroupingError("compression quantizes each update: a group's mean is not its members' updates"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_each_boundary_error_is_one_error_line_and_exit_2(error, capsys, tmp_path):
    assert cli.run_guarded(_raise(error), log_dir=lambda: str(tmp_path)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {error}"]
    assert os.listdir(tmp_path) == []  # bad input writes nothing


def test_a_file_that_is_not_a_keras_model_is_bad_input(tmp_path, capsys):
    path = tmp_path / "model.keras"
    path.write_text("not a model")
    assert cli.run_guarded(lambda: evaluation.load_keras_model(str(path))) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "is not a loadable Keras model" in line


def test_a_plain_value_error_is_an_internal_error_with_its_traceback_in_the_experiment_dir(capsys, tmp_path):
    def fails_like_tf():  # as Keras does in the middle of a round
        raise ValueError("Shapes (1, 62) and (1, 63) are incompatible")

    assert cli.run_guarded(fails_like_tf, log_dir=lambda: str(tmp_path)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    log = tmp_path / "internal_error.log"
    assert line.startswith("internal error: ValueError: Shapes (1, 62) and (1, 63) are incompatible")
    assert "not a problem with your input" in line and line.endswith(f"the traceback is in {log}")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in fails_like_tf" in text


def test_an_internal_error_without_an_experiment_dir_goes_to_a_temporary_file(capsys):
    assert cli.run_guarded(_raise(KeyError("tier 'ultra'"))) == 1
    (line,) = capsys.readouterr().err.splitlines()
    path = line.rsplit("the traceback is in ", 1)[1]
    try:
        assert os.path.basename(path).startswith("tffpipe-internal-error-")
        with open(path) as f:
            assert "KeyError: \"tier 'ultra'\"" in f.read()
    finally:
        os.remove(path)


def test_faults_keep_their_own_exit_code(capsys):
    class Diverged(errors.Fault):
        exit_code = 3

    assert cli.run_guarded(_raise(Diverged("round 2 produced a non-finite loss"))) == 3
    assert capsys.readouterr().err.splitlines() == ["error: round 2 produced a non-finite loss"]


class _FailsWhenTraining(tf.keras.layers.Layer):
    """Passes the builder's check (called without `training`), fails as TF would once TFF traces training."""

    def call(self, inputs, training=None):
        if training:
            raise ValueError("Shapes (None, 62) and (None, 63) are incompatible")
        return inputs


def fails_when_training(num_classes):
    return tf.keras.Sequential(
        [tf.keras.layers.Flatten(input_shape=(28, 28, 1)), tf.keras.layers.Dense(num_classes), _FailsWhenTraining()]
    )


def test_a_value_error_raised_by_tf_mid_run_exits_1_and_names_the_log(tmp_path):
    root = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--root_dir={root}",
        "--num_writers=12",
        "--median_examples=24",
        "--clients_per_round=3",
        "--eval_clients=0",
        "--rounds=1",
        "--dp=none",
        "--noise_multiplier=0",
        "--model=tests.cli_test:fails_when_training",
        "--experiment=internal",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    log = root / "internal" / "internal_error.log"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines[-1].startswith("internal error: ValueError:") and lines[-1].endswith(f"traceback is in {log}")
    assert not any(line.startswith("error:") for line in lines)
    assert "Shapes (None, 62) and (None, 63) are incompatible" in log.read_text()


@pytest.mark.parametrize("level", ["0", "2"])
def test_tf_start_up_lines_stay_hidden_whatever_tf_log_level_the_user_exports(level, tmp_path):
    # At level 2 TF still prints "E ... Unable to register cuDNN factory" at import on a CPU machine.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": level}
    cmd = [sys.executable, "-m", "experiments.train", f"--cache_dir={tmp_path}", "--model=resnet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: --model=resnet: unknown model 'resnet' for the emnist task; choose one of "
        "['cnn', 'linear', 'mlp', 'small_cnn'] or give package.module:function"
    ]


@pytest.mark.parametrize(
    "argv, exported, expected",
    [
        ([], "2", "3"),  # quiet by default, whatever the shell says
        ([], None, "3"),
        (["--verbosity=0"], "2", "2"),  # verbose: the user's level holds
        (["--verbosity=1"], "0", "0"),
        (["-v=0"], None, None),  # verbose and nothing exported: TF's own default
        (["--verbosity=-1"], "1", "3"),  # absl's default verbosity is not verbose
    ],
)
def test_binaries_set_tf_log_level_3_unless_verbose(argv, exported, expected):
    code = (
        f"import os, sys; sys.argv = ['train', *{argv!r}]; from experiments import cli; cli.require_environment(); "
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if exported is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = exported
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(expected), out.stderr


def test_a_flagfile_with_non_utf8_bytes_is_named_with_its_line(tmp_path):
    path = tmp_path / "latin1.flags"
    path.write_bytes(b"--rounds=2\n--experiment=caf\xe9\n")  # absl raised UnicodeDecodeError
    assert cli.flagfile_problem(["train", f"--flagfile={path}"]) == (
        f"--flagfile={path}: line 2 is not UTF-8 text (invalid continuation byte); save the file as UTF-8"
    )


def test_a_flagfile_that_includes_itself_is_named_with_the_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.flags").write_text("--rounds=2\n--flagfile=b.flags\n")
    (tmp_path / "b.flags").write_text("# a comment\n--flagfile=./a.flags\n")  # another spelling of a.flags
    a, b = tmp_path / "a.flags", tmp_path / "b.flags"
    assert cli.flagfile_problem(["train", "--flagfile", "a.flags"]) == (
        f"--flagfile=./a.flags includes itself ({a} -> {b} -> {a}); remove the --flagfile line that closes the loop"
    )


def test_flagfiles_included_twice_without_a_loop_commented_or_missing_are_left_to_absl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "leaf.flags").write_text("--rounds=2\n")
    (tmp_path / "top.flags").write_text("--flagfile=leaf.flags\n--flagfile=leaf.flags\n# --flagfile=top.flags\n")
    assert cli.flagfile_problem(["train", "--flagfile=top.flags", "--", "--flagfile=top.flags"]) is None
    assert cli.flagfile_problem(["train", "--flagfile=/nonexistent.flags"]) is None  # absl's error names it
