import numpy as np
import pytest

from tffpipe import accounting, aggregation, algorithms, tasks
from tffpipe.data import emnist_files, preprocessing


@pytest.fixture(scope="module")
def task(tiny_data_dir):
    train, test = emnist_files.load_client_data(tiny_data_dir)
    return tasks.create_task(
        train, test, num_classes=62, model_name="linear", preprocess=preprocessing.PreprocessConfig(batch_size=8)
    )


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
    factory = aggregation.build_factory(aggregation.DpConfig(accounting.Mechanism.FIXED, 0.0, 1.0), 3)
    process = algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig(), aggregator=factory)
    # Unweighted: the aggregator's measurements are the DP factory's, not the weighted mean's.
    output = task.compose_train(process).next(process.initialize(), task.train_data.client_ids[:3])
    assert "dp_query_metrics" in output.metrics["aggregator"]
    with pytest.raises(ValueError, match="fedsgd takes only weighted aggregators"):
        algorithms.build_training_process(
            task.learning_model(), algorithms.AlgorithmConfig(algorithm=algorithms.Algorithm.FEDSGD), aggregator=factory
        )


@pytest.mark.parametrize("keras_wrapped", [False, True], ids=["functional", "keras_wrapped"])
@pytest.mark.parametrize(
    "mechanism", [accounting.Mechanism.FIXED, accounting.Mechanism.ADAPTIVE, accounting.Mechanism.TREE]
)
def test_every_dp_mechanism_trains_a_round(task, tff_context, mechanism, keras_wrapped):
    # z = 0.2 keeps adaptive clipping's count noise valid with 3 clients. The two model
    # kinds hand updates to the aggregator in different containers (list / tuple).
    factory = aggregation.build_factory(aggregation.DpConfig(mechanism, 0.2, 1.0), 3)
    model = task.model_fn if keras_wrapped else task.learning_model()
    process = task.compose_train(
        algorithms.build_training_process(model, algorithms.AlgorithmConfig(), aggregator=factory)
    )
    state = process.initialize()
    output = process.next(state, task.train_data.client_ids[:3])
    before, after = (process.get_model_weights(s).trainable for s in (state, output.state))
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


def test_bad_rates_name_the_field():
    with pytest.raises(ValueError, match="client_learning_rate must be positive, got 0"):
        algorithms.AlgorithmConfig(client_learning_rate=0.0)
    with pytest.raises(ValueError, match=r"server_momentum must be in \[0, 1\)"):
        algorithms.AlgorithmConfig(server_momentum=1.0)
