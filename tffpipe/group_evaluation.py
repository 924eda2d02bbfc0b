"""Grouped federated evaluation: many held-out clients evaluated in one TensorFlow call (issue 21).

Per client, TFF's `build_fed_eval` runs one TensorFlow call per held-out client, and
since issue 24 every evaluation also reports each client's own finalized metrics
(`algorithms.build_per_client_metrics_process`, read by `evaluation.client_quantiles`).
Here one TFF client carries a group of held-out clients' ids (`client_groups.pack`), as
in grouped training; in the group's one call each member's dataset is built from its id
(the task's test pipeline, `ClientData.serializable_dataset_fn`) and evaluated exactly as
TFF's functional evaluation does per client (`predict_on_batch` at `training=False`, the
model's loss, `update_metrics_state`, batch by batch). The group returns:

* the sum of its members' unfinalized metrics, which TFF's `SumThenFinalizeFactory`
  sums over groups and finalizes: the pooled metrics, sum_g sum_{i in g} U_i =
  sum_i U_i, the per-client pooled value up to float rounding;
* each member's own finalized metrics, one float32 vector per metric of length |g|
  (members in packed order), concatenated over groups at the server into `per_client`,
  the structure the per-client path reports. A member without examples reports its
  metrics' values at zero counts (0, by Keras's `divide_no_nan`) and `num_examples` 0,
  as per client, so `evaluation.client_quantiles` leaves it out on both paths.

The process has the per-client evaluation's state and `set_model_weights`, and its
`next(state, client_ids)` takes the held-out client ids, as the per-client process
composed with the task's data (`Task.compose_eval`) does: the loop and the program do
not know which one they hold (`build_evaluation_process` decides).

Over several workers TFF's mergeable context splits the groups as it splits clients and
the per-member vectors are concatenated across them (checked by hand over 2 local workers,
8 held-out clients in 2 groups: pooled metrics and quantiles within 1.1e-7 of per client on
one worker; not in the suite). So was the keyboard pipeline (its vocabulary table read in
the members' loop through `client_groups.in_loop`, masked accuracy, top-3 and perplexity;
`tests/client_groups_test.py`'s five users and an empty one, groups of 2): pooled metrics
and every quantile equal to per client.

Keras-wrapped models are converted by `client_groups.create_functional_model`, which
reports the metrics TFF's `from_keras_model` does, in its order. Models it cannot convert
(non-trainable weights) evaluate per client.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning.templates import finalizers

from tffpipe import algorithms, client_groups, configs, models
from tffpipe.tasks import base

# A group's member ids are read into one tensor; no group comes near this.
_ALL = 2**31 - 1

# `client_batching=auto` evaluates every model kind in groups: each measured faster so
# (`python -m benchmarks.evaluation_cost --grouped`, alternated in one run, 2026-12-05, load
# 12-16; BENCHMARKS.md). One group against per client, wall (CPU): dense, mlp on 200 held-out
# clients 2.90x (2.56x), linear on 1,000 2.24x (2.18x); convolutional, small_cnn on the default
# run's 200 3.28x (2.54x): evaluation is one forward pass a batch, so the per-call cost grouping
# saves is most of it; recurrent, cifg_lstm on 200 users, CPU 1.13-1.23x, wall 0.83-1.49x (two
# groups 1.11-1.36x).


def build_group_evaluation(
    model: tff.learning.models.FunctionalModel,
    dataset_fn: client_groups.DatasetFn,
    weights_type: tff.Type,
) -> tff.learning.templates.ClientWorkProcess:
    """`(<S@SERVER, W@CLIENTS, {str*}@CLIENTS> -> <S@SERVER, {ClientResult}@CLIENTS, M@SERVER>)`.

    The evaluation client work over groups: S is TFF's sum-then-finalize metrics state
    (the metrics of every round so far), W the model weights (`weights_type`, a
    `ModelWeights` struct), M `eval`: `current_round_metrics` (the pooled metrics and
    `per_client`: {metric: float32[clients]}) and `total_rounds_metrics`, as
    `algorithms.build_evaluation_process(per_client=True)` reports them. The client
    result is empty: evaluation updates nothing.

    Args:
      model: the functional model to evaluate (`client_groups.create_functional_model`).
      dataset_fn: a held-out client's id (a scalar string tensor) to its evaluation
        dataset, traceable in a graph (`ClientData.serializable_dataset_fn`).
      weights_type: the type of the weights `set_model_weights` takes
        (`client_groups.initial_weights_of`'s result).
    """
    ids_type = tff.SequenceType(np.str_)
    member_dataset = client_groups.in_loop(dataset_fn)

    @tf.function
    def evaluate_member(weights, dataset):
        """TFF's functional local evaluation (`fed_eval._build_functional_local_evaluation`), batch by batch.

        An iterator loop, as there: a `dataset.reduce` in the members' loop measured ~7x slower
        than per client (W2, 200 held-out clients: 1.90 s against 0.27 s).
        """
        state = model.initialize_metrics_state()
        for batch in iter(dataset):
            x, y = (batch["x"], batch["y"]) if isinstance(batch, Mapping) else batch
            output = model.predict_on_batch(weights, x, training=False)
            loss = model.loss(output=output, label=y)
            examples = tf.shape(tf.nest.flatten(output)[0])[0]
            state = model.update_metrics_state(
                state,
                batch_output=tff.learning.models.BatchOutput(loss=loss, predictions=output, num_examples=examples),
                labels=y,
            )
        return state

    @tff.tensorflow.computation(weights_type, ids_type)
    def group_eval(model_weights, member_ids):
        weights = (tuple(model_weights.trainable), tuple(model_weights.non_trainable))
        ids = member_ids.batch(_ALL).concatenate(tf.data.Dataset.from_tensors(tf.constant([], tf.string)))
        ids = ids.take(1).get_single_element()
        count = tf.size(ids)
        state0 = model.initialize_metrics_state()
        names = list(model.finalize_metrics(state0).keys())
        rows0 = tuple(tf.TensorArray(tf.float32, size=count, element_shape=[]) for _ in names)

        def body(i, total, rows):
            state = evaluate_member(weights, member_dataset(ids[i]))
            finalized = model.finalize_metrics(state)
            rows = tuple(r.write(i, tf.cast(finalized[n], tf.float32)) for r, n in zip(rows, names, strict=True))
            return i + 1, tf.nest.map_structure(tf.add, total, state), rows

        _, total, rows = tf.while_loop(lambda i, *_: i < count, body, (tf.constant(0), state0, rows0))
        each = collections.OrderedDict((n, tf.reshape(r.stack(), [-1])) for n, r in zip(names, rows, strict=True))
        return total, each

    unfinalized_type, each_type = group_eval.type_signature.result
    names = [name for name, _ in tff.structure.iter_elements(each_type)]
    pooled = tff.learning.metrics.SumThenFinalizeFactory(model.finalize_metrics).create(unfinalized_type)
    empty, concatenate, report = algorithms.per_client_vectors(names)

    @tff.federated_computation
    def init_fn():
        return pooled.initialize()

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(ids_type, tff.CLIENTS),
    )
    def next_fn(state, model_weights, groups):
        outputs = tff.federated_map(group_eval, (model_weights, groups))
        metrics = pooled.next(state, outputs[0])
        gathered = tff.federated_aggregate(outputs[1], empty(), concatenate, concatenate, report)
        current, total = metrics.result
        current = tff.federated_zip(
            collections.OrderedDict([(n, current[n]) for n in names] + [("per_client", gathered)])
        )
        measurements = tff.federated_zip(
            collections.OrderedDict(
                eval=collections.OrderedDict(current_round_metrics=current, total_rounds_metrics=total)
            )
        )
        nothing = tff.federated_value(tff.learning.templates.ClientResult(update=(), update_weight=()), tff.CLIENTS)
        return tff.templates.MeasuredProcessOutput(metrics.state, nothing, measurements)

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def build_grouped_evaluation_process(
    task: base.Task, group_size: int, *, model=None
) -> client_groups.GroupedLearningProcess:
    """The task's federated evaluation over groups of `group_size` held-out clients.

    Composed from TFF's parts as `build_fed_eval` composes its own: broadcast of the
    model weights, the group evaluation (`build_group_evaluation`), TFF's mean of the
    empty updates and the identity finalizer, so the state and `set_model_weights` are
    the per-client process's. `model`: the task's learning model if already built.

    Raises:
      client_groups.GroupingError: the model cannot be converted to a functional one.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    model = task.learning_model() if model is None else model
    initial_weights = client_groups.initial_weights_of(model)  # the per-client process's weights type
    weights_type = initial_weights.type_signature.result
    client_work = build_group_evaluation(
        client_groups.create_functional_model(task, model), task.test_data.serializable_dataset_fn, weights_type
    )
    update_type = tff.learning.templates.ClientResult(update=(), update_weight=())
    update_type = tff.types.to_type(update_type)
    aggregator = tff.aggregators.MeanFactory().create(update_type.update, update_type.update_weight)
    finalizer = finalizers.build_identity_finalizer(  # not exported by TFF 0.87
        weights_type, aggregator.next.type_signature.result.result.member
    )
    process = tff.learning.templates.compose_learning_process(
        initial_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work,
        aggregator,
        finalizer,
    )
    return client_groups.GroupedLearningProcess(process, group_size)  # packs the ids as training does


def group_size(config: configs.ExperimentConfig, keras_model: tf.keras.Model, clients: int) -> int | None:
    """K held-out clients per group for evaluating `clients` of them under `config.client_batching`; None: per client.

    off: None. K: K (at most `clients`). auto: one group per worker,
    ceil(clients / workers), or per core for recurrent models (`client_groups.auto_groups`),
    where the model can be converted (`client_groups.functional_obstacle`); every kind
    measured faster evaluated in groups (above). Training's obstacles (DP mechanisms, compression, secure
    aggregation) do not apply: evaluation sums plain metrics on both paths.
    """
    if config.client_batching == "off" or clients < 1:
        return None
    if client_groups.functional_obstacle(keras_model) is not None:
        return None
    explicit = configs.client_group_size(config)
    if explicit is not None:
        return min(explicit, clients)
    groups = client_groups.auto_groups(
        config, client_groups.model_kind(keras_model) in client_groups.ONE_GROUP_PER_CORE
    )
    return max(1, math.ceil(clients / groups))


def build_evaluation_process(
    task: base.Task, config: configs.ExperimentConfig, clients: int
) -> tff.learning.templates.LearningProcess:
    """The experiment's federated evaluation of `clients` held-out clients, per client or in groups.

    Either way `next(state, client_ids)` takes the held-out ids and its metrics'
    `client_work/eval/current_round_metrics` hold the pooled metrics and `per_client`
    (`algorithms.build_evaluation_process(per_client=True)`); `group_size` decides.
    """
    model = task.learning_model()
    if config.client_batching != "off":
        with models.seeds_kept():  # deciding builds a Keras model; the run's seeded draws stay as per client
            keras_model = task.create_keras_model()
        k = group_size(config, keras_model, clients)
        if k is not None:
            return build_grouped_evaluation_process(task, k, model=model)
    return task.compose_eval(algorithms.build_evaluation_process(model, per_client=True))
