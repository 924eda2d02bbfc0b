"""Keras-wrapped models converted to TFF functional models, the form every member of a
group trains, and what keeps a model from being converted.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import models
from tffpipe.client_groups.packing import GroupingError
from tffpipe.tasks import base


def create_functional_model(task: base.Task, model=None) -> tff.learning.models.FunctionalModel:
    """The task's model as a functional model, with the metrics of the path it runs per client.

    Functional models (`Task.learning_model`'s) are returned as they are. A Keras-wrapped
    one is converted with TFF's `functional_model_from_keras`, which rebuilds the Keras
    model on weight tensors instead of variables: the same layers and loss, so the same
    arithmetic as `from_keras_model`'s forward pass. Its metrics are those TFF's
    `from_keras_model` reports (the task's metrics but `loss`, then `loss` as the mean of
    the batch losses weighted by batch size, `num_examples`, `num_batches`, in that order),
    so grouped rounds report what per-client rounds do.

    `model`: `task.learning_model()` if already built (building a functional one draws
    its initial weights).

    Layers that draw random numbers in training (the `cnn`'s dropout) draw them from TF's
    unseeded generators on both paths, so such a member's update is one draw of what it
    computes alone, not a copy: two per-client rounds of `cnn` from the same state differ
    by 1.2 relative in their weights (2026-12-05, tiny population, batch 8).

    Raises:
      GroupingError: the model has non-trainable weights (`functional_obstacle`).
    """
    model = task.learning_model() if model is None else model
    if isinstance(model, tff.learning.models.FunctionalModel):
        return model
    with models.seeds_kept():  # the initial weights are the per-client path's (`build_training_process`)
        return _convert(task)


def _convert(task: base.Task) -> tff.learning.models.FunctionalModel:
    keras_model = task.create_keras_model()
    reason = functional_obstacle(keras_model)
    if reason is not None:
        raise GroupingError(f"model {task.model_name} cannot train in groups: {reason}")
    loss_fn = task.loss_fn
    # TFF's functional metrics map their variables by creation order: the constructor may
    # create only the metrics it returns, so the task's own `loss` metric is never built there.
    with tf.Graph().as_default():
        kept = [(type(m), m.get_config()) for n, m in task.metrics_fn().items() if n != "loss"]

    def metrics_constructor() -> collections.OrderedDict:
        metrics = collections.OrderedDict((c["name"], cls.from_config(c)) for cls, c in kept)
        metrics["loss"] = _BatchMeanLoss(loss_fn())
        metrics["num_examples"] = tff.learning.metrics.NumExamplesCounter()
        metrics["num_batches"] = tff.learning.metrics.NumBatchesCounter()
        return metrics

    return tff.learning.models.functional_model_from_keras(
        keras_model, loss_fn(), task.input_spec, metrics_constructor=metrics_constructor
    )


def functional_obstacle(keras_model: tf.keras.Model) -> str | None:
    """Why `create_functional_model` cannot convert this Keras model, or None.

    TFF's `functional_model_from_keras` passes weights in as tensors, so a layer that
    updates its own weights in training (BatchNormalization's moving statistics) has
    nowhere to write them; TFF refuses BatchNormalization itself, and any other
    non-trainable weight would silently stay at its initial value.
    """
    if keras_model.non_trainable_weights:
        return "it has non-trainable weights (BatchNormalization's statistics?), which a functional model cannot update"
    return None


class _BatchMeanLoss(tf.keras.metrics.Mean):
    """The loss as `from_keras_model` reports it: the mean of batch losses weighted by batch size."""

    def __init__(self, loss: tf.keras.losses.Loss, name: str = "loss", dtype=tf.float32):
        super().__init__(name, dtype)
        self._loss = loss

    def update_state(self, y_true, y_pred, sample_weight=None):
        del sample_weight  # as TFF's loss metric, which weights by batch size only
        # Not super(): its closure cell makes AutoGraph warn that it cannot convert the method.
        batch_size = tf.shape(tf.nest.flatten(y_pred)[0])[0]
        return tf.keras.metrics.Mean.update_state(self, self._loss(y_true, y_pred), batch_size)


def initial_weights_of(model) -> tff.Computation:
    """The initial model weights TFF's process builders give a process of `model`.

    A functional model's own `initial_weights`; a Keras-wrapped one's (a no-argument
    callable) from the model built inside the computation, traced here, as TFF's
    `fed_avg.py` does first. Keras seeds each initializer from the run's seed in the
    order models are built and TF draws differently in a graph than eagerly, so this
    trace, made where the per-client builder makes its own, gives a Keras-wrapped model
    the per-client path's initial weights (`create_functional_model` keeps the seeds of
    the model it converts).
    """
    if isinstance(model, tff.learning.models.FunctionalModel):

        @tff.tensorflow.computation
        def initial_model_weights_fn():
            trainable, non_trainable = model.initial_weights
            return tff.learning.models.ModelWeights(
                tuple(tf.convert_to_tensor(w) for w in trainable),
                tuple(tf.convert_to_tensor(w) for w in non_trainable),
            )

        return initial_model_weights_fn

    @tff.tensorflow.computation
    def keras_initial_weights_fn():
        return tff.learning.models.ModelWeights.from_model(model())

    return keras_initial_weights_fn
