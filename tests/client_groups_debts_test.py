"""Client groups: the debts the last review of issue 21 found, each pinned by a test that fails without its fix."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tests import client_groups_test, conftest
from tffpipe import aggregation, algorithms, client_groups, configs, models


@pytest.mark.parametrize(
    "given, message",
    [
        ("activations", "activations is for members stepping together and needs batch_size"),
        ("group_examples_fn", "group_examples_fn is for members stepping together and needs batch_size"),
        ("forward", "forward is for members stepping together and needs batch_size"),
        ("batch_size+forward+activations", "forward is unused when activations is given"),
        ("batch_size+group_examples_fn", "group_examples_fn is read only on the shared weights and needs activations"),
    ],
    ids=["activations", "group_examples_fn", "forward", "forward-with-activations", "group-read-without-activations"],
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
        "batch_size": client_groups_test.BATCH,
    }
    arguments = {name: values[name] for name in given.split("+")}
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


def _task_with_a_non_finite_member(data_dir: str, member: int = 1):
    """The linear task whose `member`-th client has one pixel of +inf in its first row: its update is NaN.

    The row is replaced in the raw rows both paths read (the per-client datasets and the
    group read), so the file itself stays valid. Returns (task, that client's id, its examples).
    """
    from tffpipe.tasks.emnist import files, task

    train, test = files.load_client_rows(data_dir)
    client = train.client_ids[member]
    rows = [r.numpy() for r in train.create_tf_dataset_for_client(client)]
    example = tf.train.Example.FromString(rows[0])
    example.features.feature["pixels"].float_list.value[300] = float("inf")  # x = 1 - pixel = -inf
    row, poisoned = rows[0], example.SerializeToString()
    train = train.preprocess(lambda ds: ds.map(lambda r: tf.where(tf.equal(r, row), poisoned, r)))
    preprocess = configs.PreprocessConfig(epochs=1, batch_size=client_groups_test.BATCH)
    poisoned_task = task.create_task_from_client_data(
        train, test, num_classes=62, model_name="linear", preprocess=preprocess
    )
    return poisoned_task, client, len(rows)


@pytest.mark.parametrize(
    "mechanism, batched",
    [
        (client_groups_test.NONE, "shared"),
        (client_groups_test.FIXED, "shared"),
        (client_groups_test.ADAPTIVE, "shared"),  # each member's own update (MembersFactory)
        (client_groups_test.NONE, None),  # the member loop: TFF's own client update per member
    ],
    ids=["shared-none", "shared-fixed", "shared-adaptive", "loop-none"],
)
def test_a_member_with_a_non_finite_update_is_dropped_as_per_client(tiny_data_dir, tff_context, mechanism, batched):
    cgt = client_groups_test
    tf.keras.utils.set_random_seed(cgt.SEED)
    poisoned_task, client, examples = _task_with_a_non_finite_member(tiny_data_dir)
    per_client, grouped = cgt._processes(poisoned_task, cgt.FEDAVG, mechanism, group_size=2, batched=batched)
    ids = poisoned_task.train_data.client_ids[: cgt.IDS]  # groups [w0, w1], [w2, w3], [w4]: w1 is not finite
    assert client in ids[:2]
    state = per_client.initialize()
    (expected,), (actual,) = cgt._run(per_client, 1, ids, state), cgt._run(grouped, 1, ids, state)
    # Per client TFF zeroes a non-finite update and gives it weight 0 (without DP, the others' weighted
    # mean; with DP a zero record, under the clip); the group does the same to its member.
    initial = per_client.get_model_weights(state).trainable
    for e, a, w0 in zip(
        per_client.get_model_weights(expected.state).trainable,
        grouped.get_model_weights(actual.state).trainable,
        initial,
        strict=True,
    ):
        assert np.isfinite(e).all() and np.max(np.abs(e - w0)) > 1e-3  # the other four moved the weights
        assert np.max(np.abs(a - e)) <= 1e-5 * np.max(np.abs(e))
    if mechanism is not cgt.NONE:  # clip, noise, clipped count (the zeroed member is under the clip)
        plan = conftest.plan(mechanism, 0.0, cgt.IDS)
        round_e = aggregation.round_metrics(plan, expected.metrics["aggregator"], cgt.IDS)
        round_a = aggregation.round_metrics(plan, actual.metrics["aggregator"], cgt.IDS)
        assert round_a == pytest.approx(round_e, rel=1e-5)
    # Per client TFF also resets that client's metrics: the round's examples are the other four's.
    train_e, train_a = expected.metrics["client_work"]["train"], actual.metrics["client_work"]["train"]
    total = sum(len(list(poisoned_task.train_data.create_tf_dataset_for_client(i).unbatch())) for i in ids)
    assert train_e["num_examples"] == total - examples and np.isfinite(train_e["loss"])
    # (Members stepping together with K weight copies, `batched.py`, still count its rows: not tested here.)
    same = list(train_a) == list(train_e) and np.allclose(list(train_a.values()), list(train_e.values()), rtol=1e-5)
    assert same, (dict(train_a), dict(train_e))
