import dataclasses

import numpy as np
import pytest

from tests import conftest
from tffpipe import algorithms, configs


@pytest.fixture(scope="module")
def task(tiny_data_dir):
    return conftest.emnist_task(tiny_data_dir, "linear", parsed=True, batch_size=8)


@pytest.mark.parametrize("algorithm", list(algorithms.Algorithm))
def test_every_algorithm_runs_a_round_that_changes_the_model(task, tff_context, algorithm):
    process = task.compose_train(
        algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig(algorithm=algorithm))
    )
    state = process.initialize()
    before = process.get_model_weights(state).trainable
    output = process.next(state, task.train_data.client_ids[:3])
    after = process.get_model_weights(output.state).trainable
    assert np.isfinite(output.metrics["client_work"]["train"]["loss"])
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


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
