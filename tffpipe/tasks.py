"""Data meets model: the one place that checks the model fits the client data.

A `Task` holds the preprocessed train/test `ClientData`, the Keras builder and the
`model_fn` TFF needs, and composes learning processes with
`ClientData.dataset_computation`, so client datasets are built inside the TFF
computation from client ids: a round touches only its own clients' rows, and
nothing is serialized from Python per round. `fusion` then moves each client's
dataset into the same TensorFlow call as its training.
"""

from __future__ import annotations

import collections
import dataclasses

import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import fusion, models
from tffpipe.data import preprocessing


@dataclasses.dataclass(frozen=True)
class Task:
    train_data: tff.simulation.datasets.ClientData
    test_data: tff.simulation.datasets.ClientData
    num_classes: int
    model_name: str
    model_info: models.ModelInfo

    @property
    def input_spec(self):
        return self.train_data.element_type_structure

    def create_keras_model(self) -> tf.keras.Model:
        return models.create_model(self.model_name, self.num_classes)

    def model_fn(self) -> tff.learning.models.VariableModel:
        """A fresh Keras-wrapped TFF model (TFF calls this inside its own graphs)."""
        return tff.learning.models.from_keras_model(
            self.create_keras_model(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=self.input_spec,
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    def learning_model(self):
        """What TFF's process builders take: a functional model where it is faster.

        `functional_model_from_keras` cuts per-client overhead: W2 (mlp, 100 small
        clients) rounds 163-169 ms against 198-224 ms Keras-wrapped, and mlp with 5
        local epochs is no slower (20.1 s against 20.1-22.6 s for 30 rounds). On
        convolutional models it costs more per step (default run, small_cnn: 56.5 s
        against 46-48 s), so those stay Keras-wrapped; see BENCHMARKS.md. Both give
        identical updates from identical weights. TFF's functional path also rejects
        models with non-trainable variables (BatchNorm), and in TFF 0.87 fails at run
        time on models with dropout-style layers (an unfed placeholder inside
        `predict_on_batch`); those use the Keras-wrapped `model_fn` too.
        """
        keras_model = self.create_keras_model()
        keras_wrapped = (
            tf.keras.layers.Dropout,
            tf.keras.layers.GaussianNoise,
            tf.keras.layers.GaussianDropout,
            tf.keras.layers.Conv1D,
            tf.keras.layers.Conv2D,
            tf.keras.layers.Conv3D,
        )
        if keras_model.non_trainable_weights or any(isinstance(m, keras_wrapped) for m in keras_model.submodules):
            return self.model_fn
        return tff.learning.models.functional_model_from_keras(
            keras_model,
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            self.input_spec,
            metrics_constructor=_functional_metrics,
        )

    def record_specs(self) -> list[tf.TensorSpec]:
        """Specs of the trainable weights: the structure of one client update."""
        model = self.create_keras_model()
        return [tf.TensorSpec(w.shape, w.dtype) for w in model.trainable_weights]

    def compose_train(self, process: tff.learning.templates.LearningProcess):
        """`next` then takes client ids (`{str}@CLIENTS`) instead of datasets."""
        return _compose(self.train_data, process)

    def compose_eval(self, process: tff.learning.templates.LearningProcess):
        return _compose(self.test_data, process)


def _compose(data: tff.simulation.datasets.ClientData, process: tff.learning.templates.LearningProcess):
    """Each client's dataset is built in the same TensorFlow call as its client work."""
    composed = tff.simulation.compose_dataset_computation_with_learning_process(data.dataset_computation, process)
    return fusion.fuse_client_datasets(composed)


class ExampleCount(tf.keras.metrics.Sum):
    """Counts examples, as the Keras-wrapped model's `num_examples` metric does."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(tf.cast(tf.shape(y_true)[0], tf.float32))


def _functional_metrics() -> collections.OrderedDict:
    """The Keras-wrapped model's metrics (loss, accuracy, num_examples) for functional models."""
    return collections.OrderedDict(
        loss=tf.keras.metrics.SparseCategoricalCrossentropy(from_logits=True),
        accuracy=tf.keras.metrics.SparseCategoricalAccuracy(),
        num_examples=ExampleCount(),
    )


def create_task(
    train: tff.simulation.datasets.ClientData,
    test: tff.simulation.datasets.ClientData,
    *,
    num_classes: int,
    model_name: str,
    preprocess: preprocessing.PreprocessConfig,
    eval_batch_size: int = 100,
) -> Task:
    """Builds the task from raw EMNIST `ClientData`; checks model and data agree."""
    train_data = train.preprocess(preprocessing.create_train_fn(preprocess))
    test_data = test.preprocess(preprocessing.create_eval_fn(eval_batch_size))
    model = models.create_model(model_name, num_classes)  # raises ModelBuilderError with the reason
    spec = train_data.element_type_structure
    if tuple(spec["x"].shape[1:]) != models.INPUT_SHAPE:
        raise ValueError(f"client data gives x of shape {spec['x'].shape}, the models take {models.INPUT_SHAPE}")
    return Task(
        train_data=train_data,
        test_data=test_data,
        num_classes=num_classes,
        model_name=model_name,
        model_info=models.describe(model_name, model),
    )
