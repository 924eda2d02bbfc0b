"""The builders of the grouped training process, composed from TFF's parts as per client."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import accounting, algorithms, audit, configs, models
from tffpipe.client_groups.batched import Batched, create_dense_forward, dense_activations
from tffpipe.client_groups.functional import create_functional_model, initial_weights_of
from tffpipe.client_groups.grouped_process import GroupedLearningProcess
from tffpipe.client_groups.members import build_group_client_work
from tffpipe.client_groups.packing import DatasetFn, GroupingError, ReplaceUpdate
from tffpipe.client_groups.queries import MembersFactory, build_factory
from tffpipe.client_groups.rules import shared_obstacle
from tffpipe.tasks import base


def build_training_process(
    model: tff.learning.models.FunctionalModel,
    config: configs.AlgorithmConfig,
    dataset_fn: DatasetFn,
    group_size: int,
    *,
    aggregator: tff.aggregators.UnweightedAggregationFactory | None = None,
    clip: float | None = None,
    batch_size: int | None = None,
    forward: Callable[[tuple, tf.Tensor], tf.Tensor] | None = None,
    activations: list | None = None,
    group_examples_fn: Callable[[tf.Tensor], tuple] | None = None,
    replace_update: ReplaceUpdate | None = None,
    hparams_state: bool = False,
    initial_weights: tff.Computation | None = None,
) -> GroupedLearningProcess:
    """The algorithm's process over groups, composed from TFF's parts as `fed_avg.py` does.

    TFF's broadcast, the group client work, the aggregator (TFF's weighted mean, or
    `aggregator` from `build_factory` made weighted as TFF's unweighted FedAvg does) and
    TFF's optimizer finalizer with the algorithm's server optimizer. The state has the
    per-client process's structure, so checkpoints move between the two.

    Args:
      model: a functional model (`create_functional_model` converts a Keras-wrapped one).
      config: the algorithm: FedAvg, its server-optimizer variants, FedProx, FedSGD
        (without DP: TFF 0.87's FedSGD is weighted only); each member computes that
        algorithm's per-client update (`build_member_update`).
      dataset_fn: a real client's id to its training dataset.
      group_size: K, real clients per group.
      aggregator: None, or the DP factory of `build_factory`: fixed clipping (then
        `clip` is its C) or a `MembersFactory` (each group sends its members' updates).
      clip: each member's clip with fixed-clip DP; given exactly when `aggregator` is
        the fixed one.
      batch_size: None trains a group's members one after the other (TFF's client
        update, any functional model); B, the member datasets' batch size, trains
        them together (`train_members_batched`).
      forward: with `batch_size`, the members' batched forward pass
        (`create_dense_forward`); None: `tf.vectorized_map` of the model's.
      activations: with `batch_size`, a Flatten/Dense stack's `dense_activations`:
        the members step on the shared weights (`train_members_shared`, no K weight
        copies; `forward` is then unused).
      group_examples_fn: with `batch_size`, the task's read of a group's examples
        (`base.Task.group_examples_fn`); None: each member's `dataset_fn` dataset.
      replace_update: each member's result replaced before it is clipped or weighted
        (`build_group_client_work`; the audit's canaries).
      hparams_state: the client work's state is the client optimizer's hyperparameters,
        as per client for a Keras-wrapped model under FedAvg and its variants
        (`build_group_client_work`).
      initial_weights: the process's initial model weights (`initial_weights_of`);
        None: `model.initial_weights`.

    Raises:
      GroupingError: a model or algorithm without a grouped path.
      ValueError: `clip` without the fixed-clip aggregator (or missing with it), a
        group size below 1, `forward`, `activations` or `group_examples_fn` without
        `batch_size`, or `forward` with `activations` (each would be ignored).
    """
    if not isinstance(model, tff.learning.models.FunctionalModel):
        raise GroupingError(
            f"the model is Keras-wrapped ({type(model).__name__}): convert it with create_functional_model"
        )
    if config.algorithm not in _GROUPED_ALGORITHMS:
        raise GroupingError(f"{config.algorithm.value} has no grouped client work yet")
    if batch_size is not None and config.algorithm in (configs.Algorithm.FEDPROX, configs.Algorithm.FEDSGD):
        raise GroupingError(f"members stepping together run plain SGD steps, not {config.algorithm.value}'s")
    members = group_size if isinstance(aggregator, MembersFactory) else None
    if (aggregator is None or members is not None) != (clip is None):
        raise ValueError(
            "clip goes with the fixed-clip aggregator only: it clips nothing, the client work clips to C "
            "(without DP nothing is clipped; a MembersFactory clips each member itself)"
        )
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    _check_batched(batch_size, forward=forward, activations=activations, group_examples_fn=group_examples_fn)

    initial_model_weights_fn = initial_weights or initial_weights_of(model)
    weights_type = initial_model_weights_fn.type_signature.result
    batched = None
    if batch_size is not None:
        batched = Batched(config.client_learning_rate, batch_size, forward, activations, group_examples_fn)
    client_work = build_group_client_work(
        model,
        tff.learning.optimizers.build_sgdm(config.client_learning_rate),
        dataset_fn,
        clip=clip,
        batched=batched,
        replace_update=replace_update,
        algorithm=config,
        hparams_state=hparams_state,
        members=members,
    )
    factory = (
        tff.aggregators.MeanFactory() if aggregator is None else tff.aggregators.as_weighted_aggregator(aggregator)
    )
    # With members the aggregator takes the stacked group and returns one update of the weights' type.
    value_type = client_work.next.type_signature.result.result.member.update if members else weights_type.trainable
    process = tff.learning.templates.compose_learning_process(
        initial_model_weights_fn,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work,
        factory.create(value_type, tff.TensorType(np.float32)),
        tff.learning.templates.build_apply_optimizer_finalizer(
            algorithms.create_server_optimizer(config), weights_type
        ),
    )
    return GroupedLearningProcess(process, group_size)


def _check_batched(batch_size: int | None, **together) -> None:
    """The arguments of members stepping together need `batch_size`, and `forward` is not for the shared path.

    Without `batch_size` the members run one after the other and would ignore them, so
    a caller who meant the faster path would silently get the member loop.

    Raises:
      ValueError: naming the argument given without `batch_size` (or `forward` given
        with `activations`, or `group_examples_fn` without them).
    """
    given = [name for name, value in together.items() if value is not None]
    if batch_size is None and given:
        raise ValueError(
            f"{given[0]} is for members stepping together and needs batch_size (their datasets' batch size); "
            "without it the members run one after the other and would ignore it"
        )
    if together["forward"] is not None and together["activations"] is not None:
        raise ValueError(
            "forward is unused when activations is given (members step on the shared weights): give one of them"
        )
    if together["group_examples_fn"] is not None and together["activations"] is None:
        raise ValueError(
            "group_examples_fn is read only on the shared weights and needs activations; without them the members "
            "step together with K weight copies and read their own datasets"
        )


_GROUPED_ALGORITHMS = frozenset(
    {
        configs.Algorithm.FEDAVG,
        configs.Algorithm.FEDAVGM,
        configs.Algorithm.FEDADAM,
        configs.Algorithm.FEDYOGI,
        configs.Algorithm.FEDADAGRAD,
        configs.Algorithm.FEDPROX,
        configs.Algorithm.FEDSGD,
    }
)


def build_learning_process(
    task: base.Task,
    config: configs.ExperimentConfig,
    plan: accounting.PrivacyPlan,
    group_size: int,
    *,
    model: tff.learning.models.FunctionalModel | None = None,
    batched: bool | None = None,
) -> GroupedLearningProcess:
    """The experiment's training process over groups of `group_size` real clients.

    What `algorithms.build_learning_process` builds per client, with the same
    aggregator parameters and noise seed; `next` takes the round's client ids.
    `model`: the task's learning model if already built (building one draws initial
    weights from the seeded global generator, so the caller's model keeps them equal
    to the per-client path's).

    How a group's members train (`batched`): None (the default) steps them together on
    the shared weights where `shared_obstacle` finds nothing against it (a Flatten/Dense
    stack under FedAvg or a server-optimizer variant, without canaries), reading the
    group's examples with the task's `group_examples_fn`, else one after the other;
    False, one after the other (TFF's client update per member); True, together with K
    weight copies (`train_members_batched`, measured no faster than the loop).
    """
    replace_update = None
    if config.privacy.canaries:  # each canary member's update replaced in the group's call, as per client
        replace_update = functools.partial(
            audit.replace_canary_update,
            seed=algorithms.audit_seed(config.seed),
            clip=config.dp.clip,
            zeroing_norm=config.dp.zeroing_norm,
        )
    aggregator = build_factory(config.dp, plan, noise_seed=config.seed, compression=config.compression)
    clip = None if aggregator is None or isinstance(aggregator, MembersFactory) else config.dp.clip
    model = task.learning_model() if model is None else model
    initial_weights = initial_weights_of(model)  # first, as per client: the same initial weights
    # Per client, TFF's FedAvg client work for a Keras-wrapped model keeps its optimizer's hyperparameters.
    hparams_state = not isinstance(model, tff.learning.models.FunctionalModel) and config.algorithm.algorithm not in (
        configs.Algorithm.FEDPROX,
        configs.Algorithm.FEDSGD,
    )
    activations = None
    if batched is None:
        with models.seeds_kept():
            keras_model = task.create_keras_model()
        if shared_obstacle(config, keras_model) is None:
            activations = dense_activations(keras_model)
    return build_training_process(
        create_functional_model(task, model),
        config.algorithm,
        task.train_data.serializable_dataset_fn,
        group_size,
        aggregator=aggregator,
        clip=clip,
        batch_size=_batch_size(task, config) if batched or activations else None,
        forward=_dense_forward(task) if batched else None,
        activations=activations,
        group_examples_fn=task.group_examples_fn if activations else None,
        replace_update=replace_update,
        hparams_state=hparams_state,
        initial_weights=initial_weights,
    )


def _batch_size(task: base.Task, config: configs.ExperimentConfig) -> int:
    """B of the task's member datasets: its group read's where it has one (a task built apart from `config`)."""
    return getattr(task.group_examples_fn, "batch_size", None) or config.preprocess.batch_size


def _dense_forward(task: base.Task):
    with models.seeds_kept():
        return create_dense_forward(task.create_keras_model())
