import pytest
import tensorflow_federated as tff

from tests import conftest


@pytest.mark.parametrize(
    "model_name, functional",
    [("linear", True), ("mlp", True), ("small_cnn", False), ("cnn", False)],  # convolutions / dropout: Keras-wrapped
)
def test_learning_model_is_functional_only_where_that_is_faster(tiny_data_dir, model_name, functional):
    task = conftest.emnist_task(tiny_data_dir, model_name)
    model = task.learning_model()
    assert isinstance(model, tff.learning.models.FunctionalModel) == functional
    if not functional:
        assert model == task.model_fn


def test_functional_and_keras_wrapped_models_report_the_same_metric_names(tiny_data_dir, tff_context):
    task = conftest.emnist_task(tiny_data_dir, "linear")
    functional = task.learning_model()
    keras_wrapped = task.model_fn()
    # TFF adds num_batches to Keras-wrapped models only.
    names = set(keras_wrapped.report_local_unfinalized_metrics())
    assert set(functional.initialize_metrics_state()) == names - {"num_batches"} == {"loss", "accuracy", "num_examples"}
