import numpy as np
import pytest
import tensorflow_federated as tff

from tffpipe import accounting, aggregation, algorithms, fusion, tasks
from tffpipe.data import emnist_files, preprocessing


@pytest.fixture(scope="module")
def task(tiny_data_dir):
    train, test = emnist_files.load_client_rows(tiny_data_dir)
    return tasks.create_task(
        train, test, num_classes=62, model_name="mlp", preprocess=preprocessing.PreprocessConfig(batch_size=8)
    )


def _composed(data, process):
    return tff.simulation.compose_dataset_computation_with_learning_process(data.dataset_computation, process)


def _sequences_between_calls(process) -> int:
    """How many values of `next` are client-placed datasets (each one crosses a call boundary)."""
    block = tff.framework.to_call_dominant(process.next.to_building_block()).result
    return sum(
        isinstance(v.type_signature, tff.FederatedType) and isinstance(v.type_signature.member, tff.SequenceType)
        for _, v in block.locals
    )


def test_fused_training_round_equals_the_composed_one(task, tff_context):
    factory = aggregation.build_factory(aggregation.DpConfig(accounting.Mechanism.FIXED, 0.5, 1.0), 3)
    process = algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig(), aggregator=factory)
    composed, fused = (
        _composed(task.train_data, process),
        fusion.fuse_client_datasets(_composed(task.train_data, process)),
    )
    assert _sequences_between_calls(composed) == 1 and _sequences_between_calls(fused) == 0
    assert fused.next.type_signature == composed.next.type_signature

    state = composed.initialize()
    ids = task.train_data.client_ids[:3]
    expected, actual = composed.next(state, ids), fused.next(state, ids)
    assert actual.metrics == expected.metrics
    for a, b in zip(
        fused.get_model_weights(actual.state).trainable,
        composed.get_model_weights(expected.state).trainable,
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_fused_evaluation_equals_the_composed_one(task, tff_context):
    process = algorithms.build_evaluation_process(task.learning_model())
    composed = _composed(task.test_data, process)
    fused = fusion.fuse_client_datasets(composed)
    state = composed.initialize()
    ids = task.test_data.client_ids[:4]
    assert fused.next(state, ids).metrics == composed.next(state, ids).metrics


def test_a_process_without_client_ids_is_refused(task):
    process = algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig())
    with pytest.raises(fusion.FusionError, match="expected one map over the client ids in `next`, found 0"):
        fusion.fuse_client_datasets(process)
