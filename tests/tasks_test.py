import pytest
import tensorflow_federated as tff

from tffpipe import tasks
from tffpipe.data import emnist_files, preprocessing


@pytest.mark.parametrize(
    "model_name, functional",
    [("linear", True), ("mlp", True), ("small_cnn", False), ("cnn", False)],  # convolutions / dropout: Keras-wrapped
)
def test_learning_model_is_functional_only_where_that_is_faster(tiny_data_dir, model_name, functional):
    train, test = emnist_files.load_client_rows(tiny_data_dir)
    task = tasks.create_task(
        train, test, num_classes=62, model_name=model_name, preprocess=preprocessing.PreprocessConfig()
    )
    model = task.learning_model()
    assert isinstance(model, tff.learning.models.FunctionalModel) == functional
    if not functional:
        assert model == task.model_fn
