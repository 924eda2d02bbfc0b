"""Client groups: the debts the last review of issue 21 found, each pinned by a test that fails without its fix."""

import re

import pytest

from tests import client_groups_test
from tffpipe import algorithms, client_groups


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
