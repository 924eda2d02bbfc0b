"""The learning side of every task: client data meets a Keras model, as TFF needs it.

A `Task` holds the preprocessed train/test `ClientData`, the Keras builder, the loss
and metrics, and composes learning processes with `ClientData.dataset_computation`,
so client datasets are built inside the TFF computation from client ids: a round
touches only its own clients' rows, and nothing is serialized from Python per round.
`fusion` then moves each client's dataset into the same TensorFlow call as its
training. What differs between tasks (data, preprocessing, models, metrics, samples)
comes in as arguments from the task's own module.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import configs, fusion, models

MetricsFn = Callable[[], "collections.OrderedDict[str, tf.keras.metrics.Metric]"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's data and model, ready for TFF.

    Attributes:
      kind: which task.
      train_data, test_data: preprocessed `ClientData` yielding batches {x, y}.
      model_name: the builder's registered name or import path.
      model_info: parameters and upload bytes of the model.
      num_classes: outputs per prediction (classes, or vocabulary entries).
      loss_fn: a fresh Keras loss on (y, logits).
      metrics_fn: fresh Keras metrics by name, `loss` first (the loss as a metric, which
        functional models need and Keras-wrapped ones get from TFF); `num_examples`
        is added for functional models as TFF adds it for Keras-wrapped ones.
      sample_fn: (seed) -> {client id: samples} for TensorBoard (images or texts).
      group_examples_fn: a group's member ids `[K]` -> (their training examples, as
        each member's `train_data` dataset yields them unbatched, concatenated in
        the members' order; each member's count `[K]`), read without a pipeline per
        member (`data.preprocessing.create_group_train_fn`); None where the task has
        no such read (client groups then read each member's dataset).
    """

    kind: configs.Task
    train_data: tff.simulation.datasets.ClientData
    test_data: tff.simulation.datasets.ClientData
    model_name: str
    model_info: models.ModelInfo
    num_classes: int
    loss_fn: Callable[[], tf.keras.losses.Loss]
    metrics_fn: MetricsFn
    sample_fn: Callable[[int], Mapping[str, np.ndarray]]
    group_examples_fn: Callable[[tf.Tensor], tuple] | None = None

    @property
    def input_spec(self):
        return self.train_data.element_type_structure

    def create_keras_model(self) -> tf.keras.Model:
        return models.create_model(self.model_name, self.kind, self.num_classes)

    def model_fn(self) -> tff.learning.models.VariableModel:
        """A fresh Keras-wrapped TFF model (TFF calls this inside its own graphs)."""
        return tff.learning.models.from_keras_model(
            self.create_keras_model(),
            loss=self.loss_fn(),
            input_spec=self.input_spec,
            metrics=[m for name, m in self.metrics_fn().items() if name != "loss"],
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
        if not runs_functional(keras_model):
            return self.model_fn
        metrics_fn = self.metrics_fn

        def metrics_constructor() -> collections.OrderedDict:
            metrics = metrics_fn()
            metrics["num_examples"] = ExampleCount()
            return metrics

        return tff.learning.models.functional_model_from_keras(
            keras_model, self.loss_fn(), self.input_spec, metrics_constructor=metrics_constructor
        )

    def record_specs(self) -> list[tf.TensorSpec]:
        """Specs of the trainable weights: the structure of one client update."""
        model = self.create_keras_model()
        return [tf.TensorSpec(w.shape, w.dtype) for w in model.trainable_weights]

    def compose_train(self, process: tff.learning.templates.LearningProcess, *, result_transform=None):
        """`next` then takes client ids (`{str}@CLIENTS`) instead of datasets (see `fusion` for the transform)."""
        return _compose(self.train_data, process, result_transform)

    def compose_eval(self, process: tff.learning.templates.LearningProcess):
        return _compose(self.test_data, process)


_KERAS_WRAPPED = (
    tf.keras.layers.Dropout,
    tf.keras.layers.GaussianNoise,
    tf.keras.layers.GaussianDropout,
    tf.keras.layers.Conv1D,
    tf.keras.layers.Conv2D,
    tf.keras.layers.Conv3D,
    tf.keras.layers.RNN,
    tf.keras.layers.LSTM,
    tf.keras.layers.GRU,
)


def runs_functional(keras_model: tf.keras.Model) -> bool:
    """Whether `Task.learning_model` trains this model as a functional model (see there for why)."""
    return not keras_model.non_trainable_weights and not any(
        isinstance(m, _KERAS_WRAPPED) for m in keras_model.submodules
    )


def _compose(
    data: tff.simulation.datasets.ClientData, process: tff.learning.templates.LearningProcess, result_transform=None
):
    """Each client's dataset is built in the same TensorFlow call as its client work."""
    composed = tff.simulation.compose_dataset_computation_with_learning_process(data.dataset_computation, process)
    return fusion.fuse_client_datasets(composed, result_transform=result_transform)


class ExampleCount(tf.keras.metrics.Sum):
    """Counts examples, as the Keras-wrapped model's `num_examples` metric does."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(tf.cast(tf.shape(y_true)[0], tf.float32))
