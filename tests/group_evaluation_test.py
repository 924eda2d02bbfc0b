"""Grouped federated evaluation against the per-client one: the same pooled metrics and per-client quantiles."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tests import conftest
from tffpipe import algorithms, configs, evaluation, group_evaluation


def _evaluate(process, weights, ids):
    state = process.set_model_weights(process.initialize(), weights)
    metrics = dict(process.next(state, ids).metrics["client_work"]["eval"]["current_round_metrics"])
    per_client = {k: np.asarray(v) for k, v in metrics.pop("per_client").items()}
    return {k: float(v) for k, v in metrics.items()}, per_client


@pytest.mark.parametrize("model", ["linear", "small_cnn"])  # functional as it is; Keras-wrapped, converted
def test_grouped_evaluation_gives_the_per_client_metrics_and_quantiles(tiny_data_dir, tff_context, model):
    task = conftest.emnist_task(tiny_data_dir, model, batch_size=8)
    per_client = task.compose_eval(algorithms.build_evaluation_process(task.learning_model(), per_client=True))
    grouped = group_evaluation.build_grouped_evaluation_process(task, 2)
    # Weights away from the initial ones (seeded), so accuracies and losses differ between clients.
    rng = np.random.default_rng(3)
    weights = per_client.get_model_weights(per_client.initialize())
    weights = tf.nest.map_structure(lambda w: w + rng.normal(0, 0.05, np.shape(w)).astype(np.float32), weights)
    # "nobody" has no examples; packed with its neighbours: groups [a, b], [c, nobody], [d, e].
    ids = sorted(task.test_data.client_ids)[:3] + ["nobody"] + sorted(task.test_data.client_ids)[3:5]
    _assert_grouped_equals_per_client(per_client, grouped, weights, ids)


def test_grouped_evaluation_of_the_keyboard_pipeline_gives_the_per_client_metrics(tff_context):
    # The recurrent path auto groups (one group per core): vocabulary table read in the members' loop, masked
    # accuracy, top-3 and perplexity over real tokens, each user's own values.
    from tests.client_groups_test import KEYBOARD_TEXTS, _keyboard_task

    task = _keyboard_task()
    per_client = task.compose_eval(algorithms.build_evaluation_process(task.learning_model(), per_client=True))
    grouped = group_evaluation.build_grouped_evaluation_process(task, 2)
    rng = np.random.default_rng(4)
    weights = per_client.get_model_weights(per_client.initialize())
    weights = tf.nest.map_structure(lambda w: w + rng.normal(0, 0.05, np.shape(w)).astype(np.float32), weights)
    ids = sorted(KEYBOARD_TEXTS)
    _assert_grouped_equals_per_client(per_client, grouped, weights, [*ids[:3], "nobody", *ids[3:]])


def _assert_grouped_equals_per_client(per_client, grouped, weights, ids):
    """Pooled metrics, each client's own values and quantiles within 1e-5; one of `ids`, "nobody", has no examples."""
    expected, expected_each = _evaluate(per_client, weights, ids)
    actual, actual_each = _evaluate(grouped, weights, ids)
    assert sorted(actual) == sorted(expected) and expected["num_examples"] > 0
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-5), name
    # Each client's own values (gathered in no particular order on the per-client path): the same multiset.
    assert sorted(actual_each) == sorted(expected_each)
    order = np.argsort(expected_each["num_examples"] * 1e3 + expected_each["loss"])
    order_actual = np.argsort(actual_each["num_examples"] * 1e3 + actual_each["loss"])
    for name in expected_each:
        np.testing.assert_allclose(actual_each[name][order_actual], expected_each[name][order], rtol=1e-5, err_msg=name)
    clients = len(ids) - 1
    assert (
        len(actual_each["num_examples"]) == len(ids) and sorted(actual_each["num_examples"])[0] == 0
    )  # nobody, reported
    quantiles, expected_quantiles = evaluation.client_quantiles(actual_each), evaluation.client_quantiles(expected_each)
    assert quantiles["eval/clients"] == expected_quantiles["eval/clients"] == clients  # nobody left out on both paths
    for name, value in expected_quantiles.items():
        np.testing.assert_allclose(quantiles[name], value, rtol=1e-5, err_msg=name)


def _config(batching, **kwargs):
    return configs.ExperimentConfig(clients_per_round=10, client_batching=batching, **kwargs)


def _dense():
    return tf.keras.Sequential([tf.keras.Input([4]), tf.keras.layers.Dense(3)])


def test_evaluation_groups_follow_client_batching(monkeypatch):
    # auto: one group per worker, ceil(200 / 1) = 200 and ceil(200 / 3) = 67; K: K, at most the clients.
    assert group_evaluation.group_size(_config("off"), _dense(), 200) is None
    assert group_evaluation.group_size(_config("auto"), _dense(), 200) == 200
    three = configs.RuntimeConfig(local_workers=3)
    assert group_evaluation.group_size(_config("auto", runtime=three), _dense(), 200) == 67
    assert group_evaluation.group_size(_config("4"), _dense(), 200) == 4
    assert group_evaluation.group_size(_config("4"), _dense(), 3) == 3
    # Distributed DP trains per client; its evaluation sums plain metrics and still groups.
    private = configs.DpConfig(mechanism=configs.Mechanism.DISTRIBUTED, noise_multiplier=0.5, clip=1.0, bits=16)
    assert group_evaluation.group_size(_config("auto", dp=private), _dense(), 20) == 20
    # Recurrent: one group per core (a group's members run in turn on one op thread): ceil(200 / 2) = 100.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    recurrent = tf.keras.Sequential([tf.keras.Input([5, 4]), tf.keras.layers.LSTM(3)])
    assert group_evaluation.group_size(_config("auto"), recurrent, 200) == 100
    # A model with non-trainable weights cannot be converted: per client, even with an explicit K.
    batch_norm = tf.keras.Sequential([tf.keras.Input([4]), tf.keras.layers.BatchNormalization()])
    assert group_evaluation.group_size(_config("auto"), batch_norm, 200) is None
