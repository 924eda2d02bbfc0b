import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import conftest
from tffpipe import algorithms, configs, fusion


def batch_norm_model(num_classes: int) -> tf.keras.Model:
    """Non-trainable variables: TFF takes it only Keras-wrapped. Deterministic, unlike dropout."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(28, 28, 1)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.Dense(num_classes),
        ]
    )


def _task(data_dir: str, model_name: str):
    return conftest.emnist_task(data_dir, model_name, batch_size=8)


@pytest.fixture(scope="module")
def task(tiny_data_dir):
    return _task(tiny_data_dir, "mlp")


def _composed(data, process):
    return tff.simulation.compose_dataset_computation_with_learning_process(data.dataset_computation, process)


def _sequences_between_calls(process) -> int:
    """How many values of `next` are client-placed datasets (each one crosses a call boundary)."""
    block = tff.framework.to_call_dominant(process.next.to_building_block()).result
    return sum(
        isinstance(v.type_signature, tff.FederatedType) and isinstance(v.type_signature.member, tff.SequenceType)
        for _, v in block.locals
    )


@pytest.mark.filterwarnings("ignore:Batch Normalization contains non-trainable variables")
@pytest.mark.parametrize(
    "model_name, mechanism",
    [
        ("mlp", configs.Mechanism.FIXED),  # functional, unweighted DP mean
        # Keras-wrapped (BatchNorm), weighted mean: the learning rate joins the zip.
        ("tests.fusion_test:batch_norm_model", configs.Mechanism.NONE),
    ],
)
def test_fused_training_round_equals_the_composed_one(tiny_data_dir, tff_context, model_name, mechanism):
    task = _task(tiny_data_dir, model_name)
    factory = conftest.dp_factory(mechanism, 0.5 if mechanism is configs.Mechanism.FIXED else 0.0, 3, clip=1.0)
    process = algorithms.build_training_process(task.learning_model(), algorithms.AlgorithmConfig(), aggregator=factory)
    composed = _composed(task.train_data, process)
    fused = fusion.fuse_client_datasets(composed)
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
