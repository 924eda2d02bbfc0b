import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from tests import conftest
from tffpipe import algorithms, configs

Algorithm = configs.Algorithm


@pytest.fixture(scope="module")
def task(tiny_data_dir):
    return conftest.emnist_task(tiny_data_dir, "linear", parsed=True, batch_size=8)


@pytest.mark.parametrize("algorithm", list(algorithms.Algorithm))
def test_every_algorithm_runs_a_round_that_changes_the_model_with_the_configured_server_optimizer(
    task, tff_context, algorithm
):
    config = algorithms.AlgorithmConfig(
        algorithm=algorithm, server_learning_rate=0.3, server_momentum=0.8, adaptive_epsilon=0.02
    )
    process = task.compose_train(algorithms.build_training_process(task.learning_model(), config))
    state = process.initialize()
    # The server optimizer's hyperparameters, read from the process state (its update rule:
    # test_each_server_optimizer_steps_by_its_formula).
    expected = {"learning_rate": 0.3}
    if algorithm is Algorithm.FEDAVGM:
        expected["momentum"] = 0.8
    elif algorithm in (Algorithm.FEDADAM, Algorithm.FEDYOGI):
        expected.update(beta_1=0.9, beta_2=0.99, epsilon=0.02)
    elif algorithm is Algorithm.FEDADAGRAD:
        expected["epsilon"] = 0.02
    assert dict(process.get_hparams(state)["finalizer"]) == pytest.approx(expected)
    before = process.get_model_weights(state).trainable
    output = process.next(state, task.train_data.client_ids[:3])
    after = process.get_model_weights(output.state).trainable
    assert np.isfinite(output.metrics["client_work"]["train"]["loss"])
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


# One weight w = 1, two server steps with gradients 0.5 then 0.1 (the second shows momentum and
# how Adam and Yogi differ), learning rate 0.1, momentum 0.9, tau (adaptive_epsilon) 0.01;
# Adam and Yogi with beta_1 = 0.9, beta_2 = 0.99 (Reddi et al. 2021) and TFF's bias-corrected
# step size 0.1 * sqrt(1 - 0.99^t) / (1 - 0.9^t): 0.1 at t = 1, 0.1 * sqrt(0.0199) / 0.19 at t = 2.
_STEP_2 = 0.1 * math.sqrt(0.0199) / 0.19
SERVER_STEPS = {
    Algorithm.FEDAVG: 1 - 0.1 * 0.5 - 0.1 * 0.1,  # 0.94
    Algorithm.FEDPROX: 1 - 0.1 * 0.5 - 0.1 * 0.1,
    Algorithm.FEDSGD: 1 - 0.1 * 0.5 - 0.1 * 0.1,
    # The accumulator is 0.5, then 0.9 * 0.5 + 0.1 = 0.55.
    Algorithm.FEDAVGM: 1 - 0.1 * 0.5 - 0.1 * 0.55,  # 0.895
    # m = 0.1 * 0.5 = 0.05, then 0.9 * 0.05 + 0.1 * 0.1 = 0.055; v = 0.01 * 0.25 = 0.0025, then
    # 0.99 * 0.0025 + 0.01 * 0.01 = 0.002575.
    Algorithm.FEDADAM: 1 - 0.1 * 0.05 / (math.sqrt(0.0025) + 0.01) - _STEP_2 * 0.055 / (math.sqrt(0.002575) + 0.01),
    # As Adam, but v starts at TFF's 1e-6 and moves by 0.01 * g^2 towards g^2: 1e-6 + 0.0025 = 0.002501,
    # then 0.002501 + 0.01 * 0.01 = 0.002601 (g^2 = 0.01 is above v, so v grows).
    Algorithm.FEDYOGI: 1 - 0.1 * 0.05 / (math.sqrt(0.002501) + 0.01) - _STEP_2 * 0.055 / (math.sqrt(0.002601) + 0.01),
    # v starts at TFF's 0.1 and sums g^2: 0.35, then 0.36; tau is added under the root.
    Algorithm.FEDADAGRAD: 1 - 0.1 * 0.5 / math.sqrt(0.35 + 0.01) - 0.1 * 0.1 / math.sqrt(0.36 + 0.01),
}


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_each_server_optimizer_steps_by_its_formula(algorithm):
    config = algorithms.AlgorithmConfig(
        algorithm=algorithm, server_learning_rate=0.1, server_momentum=0.9, adaptive_epsilon=0.01
    )
    optimizer = algorithms.create_server_optimizer(config)
    state = optimizer.initialize(tf.TensorSpec([], tf.float32))
    weight = tf.constant(1.0)
    for gradient in (0.5, 0.1):
        state, weight = optimizer.next(state, weight, tf.constant(gradient))
    assert float(weight) == pytest.approx(SERVER_STEPS[algorithm], abs=1e-6)


def test_dp_aggregation_selects_the_unweighted_process(task, tff_context):
    factory = conftest.dp_factory(configs.Mechanism.FIXED, 0.0, 3, clip=1.0)
    process = algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig(), aggregator=factory)
    # Unweighted: the aggregator's measurements are the DP factory's, not the weighted mean's.
    output = task.compose_train(process).next(process.initialize(), task.train_data.client_ids[:3])
    assert "dp_query_metrics" in output.metrics["aggregator"]


@pytest.mark.parametrize("keras_wrapped", [False, True], ids=["functional", "keras_wrapped"])
@pytest.mark.parametrize("mechanism", [configs.Mechanism.FIXED, configs.Mechanism.ADAPTIVE, configs.Mechanism.TREE])
def test_every_dp_mechanism_trains_a_round(task, tff_context, mechanism, keras_wrapped):
    # z = 0.2 keeps adaptive clipping's count noise valid with 3 clients. The two model
    # kinds hand updates to the aggregator in different containers (list / tuple).
    factory = conftest.dp_factory(mechanism, 0.2, 3, clip=1.0)
    model = task.model_fn if keras_wrapped else task.learning_model()
    process = task.compose_train(
        algorithms.build_training_process(model, algorithms.AlgorithmConfig(), aggregator=factory)
    )
    state = process.initialize()
    output = process.next(state, task.train_data.client_ids[:3])
    before, after = (process.get_model_weights(s).trainable for s in (state, output.state))
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


def test_one_builder_makes_the_experiments_process_with_its_aggregator(task, tff_context):
    # Compression changes the aggregator's state: a checkpoint of a compression run only
    # restores into the process built the same way (the evaluate binary uses this builder).
    config = configs.ExperimentConfig(compression=True, dp=configs.DpConfig(mechanism=configs.Mechanism.NONE))
    plan = conftest.plan(configs.Mechanism.NONE, 0.0, 3, population=12)
    compressed = algorithms.build_learning_process(task, config, plan)
    plain = algorithms.build_learning_process(task, dataclasses.replace(config, compression=False), plan)
    assert compressed.initialize.type_signature != plain.initialize.type_signature
    output = compressed.next(compressed.initialize(), task.train_data.client_ids[:3])
    assert np.isfinite(output.metrics["client_work"]["train"]["loss"])


def test_per_client_evaluation_gathers_each_clients_metrics_beside_the_pooled_ones(task, tff_context):
    process = task.compose_eval(algorithms.build_evaluation_process(task.learning_model(), per_client=True))
    ids = sorted(task.test_data.client_ids)[:5]
    metrics = process.next(process.initialize(), ids).metrics["client_work"]["eval"]["current_round_metrics"]
    each = metrics["per_client"]
    counts = [sum(int(b["y"].shape[0]) for b in task.test_data.create_tf_dataset_for_client(c)) for c in ids]
    assert sorted(each["num_examples"]) == sorted(counts)  # one entry per client: its own test examples
    # Pooled = sum then finalize, i.e. each client's mean weighted by its examples.
    n = each["num_examples"]
    assert metrics["loss"] == pytest.approx(float((each["loss"] * n).sum() / n.sum()), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((each["accuracy"] * n).sum() / n.sum()), abs=1e-6)
