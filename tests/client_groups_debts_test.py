"""Client groups: the debts the last review of issue 21 found, each pinned by a test that fails without its fix."""

import os
import re

import pytest

from tests import client_groups_test
from tffpipe import algorithms, client_groups, configs, models


@pytest.mark.parametrize(
    "given, message",
    [
        ("activations", "activations is for members stepping together and needs batch_size"),
        ("group_examples_fn", "group_examples_fn is for members stepping together and needs batch_size"),
        ("forward", "forward is for members stepping together and needs batch_size"),
        ("forward+activations", "forward is unused when activations is given"),
    ],
    ids=["activations", "group_examples_fn", "forward", "forward-with-activations"],
)
def test_arguments_of_members_stepping_together_are_refused_where_they_would_be_ignored(tiny_data_dir, given, message):
    # Without batch_size the members run one after the other (TFF's client update): these arguments
    # would be dropped without a word, and a caller who meant the shared path would get the loop.
    task = client_groups_test._task(tiny_data_dir, "linear")
    keras_model = task.create_keras_model()
    values = {
        "activations": client_groups.dense_activations(keras_model),
        "group_examples_fn": task.group_examples_fn,
        "forward": client_groups.create_dense_forward(keras_model),
    }
    arguments = {name: values[name] for name in given.split("+")}
    if "+" in given:
        arguments["batch_size"] = client_groups_test.BATCH
    with pytest.raises(ValueError, match=re.escape(message)):
        client_groups.build_training_process(
            client_groups.create_functional_model(task),
            algorithms.AlgorithmConfig(),
            task.train_data.serializable_dataset_fn,
            2,
            **arguments,
        )


def test_auto_counts_cores_only_where_the_workers_run_here(monkeypatch):
    # A coordinator of 8 cores, and linear (members on the shared weights: one group per core where cores are known).
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    linear = models.create_model("linear", configs.Task.EMNIST, 62)
    common = {"clients_per_round": 24, "client_batching": "auto", "dp.mechanism": configs.Mechanism.NONE}
    common.update(client_groups_test.SHORT)
    local = configs.build({**common, "runtime.local_workers": 2})
    remote = configs.build({**common, "runtime.workers": ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")})
    # Local workers run on this machine's 8 cores: 8 groups of ceil(24 / 8) = 3 (per worker: 2 groups of 12).
    assert client_groups.auto_groups(local, per_core=True) == 8
    assert client_groups.auto_groups(local, per_core=False) == 2
    assert client_groups.group_size(local, linear) == 3
    # Three remote workers: their cores are not this machine's, so one group each, ceil(24 / 3) = 8,
    # not 8 groups of 3 sized by the coordinator's cores.
    assert client_groups.auto_groups(remote, per_core=True) == 3
    assert client_groups.auto_groups(remote, per_core=False) == 3
    assert client_groups.group_size(remote, linear) == 8
