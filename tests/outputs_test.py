import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tffpipe import outputs


def _dirs(tmp_path, name: str = "exp") -> outputs.ExperimentDirs:
    return outputs.ExperimentDirs(str(tmp_path), name)


def _complete_a_round(dirs: outputs.ExperimentDirs) -> None:
    os.makedirs(os.path.join(dirs.checkpoints, "program_state_1"))


def test_new_experiment_writes_hparams_and_a_rerun_resumes(tmp_path):
    dirs = _dirs(tmp_path)
    assert outputs.prepare(dirs, {"model": "linear", "loop.rounds": 5}) is False
    _complete_a_round(dirs)
    # More rounds is an extension, not another configuration; recorded once the run succeeds.
    assert outputs.prepare(dirs, {"model": "linear", "loop.rounds": 9}) is True
    with open(dirs.hparams) as f:
        assert json.load(f)["loop.rounds"] == 5
    outputs.record_hparams(dirs, {"model": "linear", "loop.rounds": 9})
    with open(dirs.hparams) as f:
        assert json.load(f)["loop.rounds"] == 9


def test_a_run_that_completed_no_round_holds_no_configuration(tmp_path):
    dirs = _dirs(tmp_path)
    outputs.prepare(dirs, {"model": "linear"})
    outputs.MetricsReleaser(dirs).release(1, {"train/loss": 1.0})  # released, never checkpointed
    assert outputs.prepare(dirs, {"model": "cnn"}) is False  # a corrected rerun starts afresh
    with open(dirs.hparams) as f:
        assert json.load(f) == {"model": "cnn"}
    assert not os.path.exists(dirs.metrics_csv)


def test_version_changes_of_keys_are_not_configuration_changes():
    saved = {"model": "linear", "rounds": 5, "preprocess.seed": 0}  # keys an older version wrote
    current = {"model": "linear", "loop.rounds": 9, "task": "emnist"}  # a new key at its default
    assert outputs.changed_keys(saved, current) == []
    assert outputs.changed_keys(saved, {**current, "task": "other"}) == ["task"]


def test_a_second_process_cannot_use_a_running_experiment(tmp_path):
    dirs = _dirs(tmp_path)
    outputs.prepare(dirs, {"model": "linear"})
    code = (
        "import sys; from tffpipe import outputs; "
        f"outputs.prepare(outputs.ExperimentDirs({str(tmp_path)!r}, 'exp'), {{'model': 'linear'}})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is in use by another running tffpipe process" in proc.stderr


def test_half_written_checkpoints_of_a_killed_run_are_removed_on_resume(tmp_path):
    dirs = _dirs(tmp_path)
    outputs.prepare(dirs, {"model": "linear"})
    _complete_a_round(dirs)
    os.makedirs(os.path.join(dirs.checkpoints, "program_state_2_temp4711", "variables"))
    assert outputs.prepare(dirs, {"model": "linear"}) is True
    assert os.listdir(dirs.checkpoints) == ["program_state_1"]


def test_the_last_checkpointed_round_is_the_newest_complete_checkpoint(tmp_path):
    dirs = _dirs(tmp_path)
    assert outputs.last_checkpointed_round(dirs) == 0  # no directory at all
    for name in ("program_state_3", "program_state_10", "program_state_11_temp4711", "notes"):
        os.makedirs(os.path.join(dirs.checkpoints, name))
    assert outputs.last_checkpointed_round(dirs) == 10  # numerically, and a half-written 11 does not count


def test_other_configuration_is_refused_and_nothing_is_touched(tmp_path):
    dirs = _dirs(tmp_path)
    outputs.prepare(dirs, {"model": "linear", "loop.rounds": 5})
    _complete_a_round(dirs)
    with open(dirs.hparams) as f:
        before = f.read()
    with pytest.raises(outputs.OutputError, match=r"model: 'linear' -> 'cnn'.*new experiment name"):
        outputs.prepare(dirs, {"model": "cnn", "loop.rounds": 5})
    with open(dirs.hparams) as f:
        assert f.read() == before


def test_reading_a_run_needs_a_completed_round_and_its_configuration_and_writes_nothing(tmp_path):
    dirs = _dirs(tmp_path)
    with pytest.raises(outputs.OutputError, match="has not completed a round .no checkpoint.; train it first"):
        outputs.check_trained_with(dirs, {"model": "linear"})
    assert not os.path.exists(dirs.path)  # an experiment that does not exist stays so
    outputs.prepare(dirs, {"task": "emnist", "model": "linear", "loop.rounds": 5})
    _complete_a_round(dirs)
    outputs.check_trained_with(dirs, {"task": "emnist", "model": "linear", "loop.rounds": 50})  # rounds may differ
    with pytest.raises(outputs.OutputError, match=r"trained with another configuration \(model: 'linear' -> 'cnn'\)"):
        outputs.check_trained_with(dirs, {"task": "emnist", "model": "cnn"})
    # Another task changes the model and every task setting with it: the task is what to fix.
    keyboard = {"task": "keyboard", "model": "cifg_lstm", "data.text.vocab_size": 100}
    with pytest.raises(outputs.OutputError, match=r"configuration \(task: 'emnist' -> 'keyboard'\); give the flags"):
        outputs.check_trained_with(dirs, keyboard)


def test_directory_of_other_files_is_never_clobbered(tmp_path):
    os.makedirs(tmp_path / "exp")
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    with pytest.raises(outputs.OutputError, match="no hparams.json: not a tffpipe experiment"):
        outputs.prepare(_dirs(tmp_path), {"model": "linear"})
    assert (tmp_path / "exp" / "notes.txt").read_text() == "mine"


def test_resume_drops_uncommitted_rows_and_catches_up_tensorboard(tmp_path):
    dirs = _dirs(tmp_path)
    outputs.prepare(dirs, {})
    releaser = outputs.MetricsReleaser(dirs)
    releaser.resume(0)
    for r in (1, 2, 3):
        releaser.release(r, {"train/loss": 1.0 / r})
    releaser.commit(1)  # as if the process died after checkpoint 2 but before committing it
    again = outputs.MetricsReleaser(dirs)
    again.resume(2)
    rows = outputs.read_metrics(dirs.metrics_csv)
    assert [int(r["round"]) for r in rows] == [1, 2]
    with open(os.path.join(dirs.tensorboard, ".tensorboard_round")) as f:
        assert f.read() == "2"
    # Re-releasing round 3 replaces, never duplicates.
    again.release(3, {"train/loss": 0.3})
    again.release(3, {"train/loss": 0.33})
    assert [r["train/loss"] for r in outputs.read_metrics(dirs.metrics_csv)] == ["1.0", "0.5", "0.33"]


def test_checkpoint_of_another_process_structure_is_refused_in_one_line(tmp_path):
    # As a functional model's state (tuples, no client hyperparameters) against a
    # Keras-wrapped model's (lists, the client learning rate).
    checkpointer = outputs.Checkpointer(str(tmp_path))
    checkpointer.save(collections.OrderedDict(weights=(np.zeros(3, np.float32),), client_work=()), 1)
    other = collections.OrderedDict(
        weights=[np.zeros(3, np.float32)], client_work=collections.OrderedDict(learning_rate=np.float32(0.1))
    )
    with pytest.raises(outputs.CheckpointError) as error:
        checkpointer.load_latest(other)
    message = str(error.value)
    assert "holds a process state of another structure" in message and "start a new experiment" in message
    assert "\n" not in message and len(message) < 400
    assert os.listdir(tmp_path) == ["program_state_1"]


def test_damaged_checkpoint_names_the_error_in_one_line(tmp_path):
    checkpointer = outputs.Checkpointer(str(tmp_path))
    state = collections.OrderedDict(weights=[np.zeros(3, np.float32)])
    checkpointer.save(state, 1)
    for base, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(base, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(outputs.CheckpointError, match=r"is unreadable \(\w+Error: .*Delete program_state_1") as error:
        checkpointer.load_latest(state)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        tf.errors.ResourceExhaustedError(None, None, "write failed"),
    ],
    ids=["ENOSPC", "tf_resource_exhausted"],
)
def test_a_full_disk_while_checkpointing_is_one_line_that_keeps_the_earlier_checkpoints(tmp_path, error):
    checkpointer = outputs.Checkpointer(str(tmp_path))
    state = collections.OrderedDict(weights=[np.zeros(3, np.float32)])
    checkpointer.save(state, 1)

    async def fail(*args, **kwargs):
        raise error

    checkpointer._manager.save = fail
    with pytest.raises(outputs.WriteFault, match=r"checkpoint of round 2 .*: the disk is full\. Earlier") as e:
        checkpointer.save(state, 2)
    assert "\n" not in str(e.value) and e.value.exit_code == 1
    assert checkpointer.load_latest(state)[1] == 1


def test_arrays_released_with_a_round_become_histograms_and_no_csv_column(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    dirs = _dirs(tmp_path)
    outputs.prepare(dirs, {})
    releaser = outputs.MetricsReleaser(dirs)
    releaser.resume(0)
    each = np.array([0.2, np.nan, 0.8], np.float32)  # a client's NaN cannot be binned; the others are kept
    releaser.release(1, {"eval/accuracy_p50": 0.5, "eval/per_client/accuracy": each})
    releaser.commit(1)
    assert outputs.read_metrics(dirs.metrics_csv) == [{"round": "1", "eval/accuracy_p50": "0.5"}]
    acc = event_accumulator.EventAccumulator(dirs.tensorboard, size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("eval/per_client/accuracy")
    buckets = tf.make_ndarray(event.tensor_proto)  # [left edge, right edge, count] per bucket
    assert event.step == 1 and buckets[:, 2].sum() == 2 and buckets[0, 0] == pytest.approx(0.2)
    assert [e.step for e in acc.Tensors("eval/accuracy_p50")] == [1]
