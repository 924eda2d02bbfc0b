"""Learning and evaluation processes: FedAvg and its server-optimizer variants.

TFF 0.87 takes only `tff.learning.optimizers` optimizers (Keras ones fail), so each
algorithm here is a (client optimizer, server optimizer, builder) triple from TFF.
Server optimizers follow Reddi et al. 2021, "Adaptive Federated Optimization".
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tffpipe import accounting, aggregation, audit, configs, models
from tffpipe.tasks import base

Algorithm = configs.Algorithm
AlgorithmConfig = configs.AlgorithmConfig


# How clients iterate over their data. TFF's default, DATASET_REDUCE, runs the local
# loop as `dataset.reduce`; DATASET_ITERATOR, a Python-style loop over an iterator,
# halved the round time where clients are many and small (benchmarks/run.py --quick,
# W2: 1,182 -> 596 ms per round; fixed cost: 98 -> 68 ms).
LOOP = tff.learning.LoopImplementation.DATASET_ITERATOR

_SERVER_OPTIMIZERS: dict[Algorithm, Callable[[AlgorithmConfig], tff.learning.optimizers.Optimizer]] = {
    Algorithm.FEDAVG: lambda c: tff.learning.optimizers.build_sgdm(c.server_learning_rate),
    Algorithm.FEDPROX: lambda c: tff.learning.optimizers.build_sgdm(c.server_learning_rate),
    Algorithm.FEDSGD: lambda c: tff.learning.optimizers.build_sgdm(c.server_learning_rate),
    Algorithm.FEDAVGM: lambda c: tff.learning.optimizers.build_sgdm(c.server_learning_rate, c.server_momentum),
    Algorithm.FEDADAM: lambda c: tff.learning.optimizers.build_adam(
        c.server_learning_rate, beta_1=0.9, beta_2=0.99, epsilon=c.adaptive_epsilon
    ),
    Algorithm.FEDYOGI: lambda c: tff.learning.optimizers.build_yogi(
        c.server_learning_rate, beta_1=0.9, beta_2=0.99, epsilon=c.adaptive_epsilon
    ),
    Algorithm.FEDADAGRAD: lambda c: tff.learning.optimizers.build_adagrad(
        c.server_learning_rate, epsilon=c.adaptive_epsilon
    ),
}


def create_server_optimizer(config: AlgorithmConfig) -> tff.learning.optimizers.Optimizer:
    return _SERVER_OPTIMIZERS[config.algorithm](config)


def build_training_process(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    config: AlgorithmConfig,
    *,
    aggregator=None,
) -> tff.learning.templates.LearningProcess:
    """Builds `(<S@SERVER, {B*}@CLIENTS> -> <S@SERVER, M@SERVER>)` for the algorithm.

    With `aggregator=None` clients are weighted by example count (TFF's default); a
    weighted factory (e.g. compression) keeps that; an unweighted one (every DP
    aggregator, see `aggregation`) selects the unweighted builder.
    """
    client_opt = tff.learning.optimizers.build_sgdm(config.client_learning_rate)
    server_opt = create_server_optimizer(config)
    weighted = not isinstance(aggregator, tff.aggregators.UnweightedAggregationFactory)
    if config.algorithm is Algorithm.FEDSGD:  # weighted only in TFF 0.87 (`configs` refuses it with DP)
        return tff.learning.algorithms.build_fed_sgd(
            model_fn, server_optimizer_fn=server_opt, model_aggregator=aggregator, loop_implementation=LOOP
        )
    common = dict(
        client_optimizer_fn=client_opt,
        server_optimizer_fn=server_opt,
        model_aggregator=aggregator,
        loop_implementation=LOOP,
    )
    if config.algorithm is Algorithm.FEDPROX:
        build = (
            tff.learning.algorithms.build_weighted_fed_prox
            if weighted
            else tff.learning.algorithms.build_unweighted_fed_prox
        )
        return build(model_fn, proximal_strength=config.proximal_strength, **common)
    # FedAvg and the server-optimizer variants differ only in `server_opt`.
    build = (
        tff.learning.algorithms.build_weighted_fed_avg if weighted else tff.learning.algorithms.build_unweighted_fed_avg
    )
    return build(model_fn, **common)


def build_learning_process(
    task: base.Task, config: configs.ExperimentConfig, plan: accounting.PrivacyPlan
) -> tff.learning.templates.LearningProcess:
    """The one training process of an experiment: what `train`, `evaluate` and the benchmarks run.

    The algorithm's process over the task's model, with the plan's aggregator, composed
    with the task's client data so that `next` takes client ids, and fused so each
    client's dataset is built in its own TensorFlow call
    (`(<S@SERVER, {str}@CLIENTS> -> <S@SERVER, M@SERVER>)`). With canaries, their
    clients' updates are replaced in that call, before the aggregator (`audit`). A
    checkpoint holds this process's state, so anything that restores one must build
    it here. With `config.client_batching` the round's clients train in groups
    (`client_groups`): the same state, `next` still takes the round's client ids.
    """
    aggregator = aggregation.build_factory(
        config.dp,
        plan,
        noise_seed=config.seed,
        compression=config.compression,
        secure_aggregation=config.secure_aggregation,
    )
    transform = None
    if config.privacy.canaries:
        transform = audit.create_result_transform(
            seed=audit_seed(config.seed),
            clip=config.dp.clip,
            zeroing_norm=config.dp.zeroing_norm,
        )
    model = task.learning_model()
    if config.client_batching != "off":
        # Client groups build on this module's optimizers and loop, hence imported here.
        from tffpipe import client_groups

        # The model's kind decides `auto`; a functional model's layers are those of its Keras model.
        # Built with its seeds kept, so a run that goes per client starts where `off` does.
        with models.seeds_kept():
            keras_model = task.create_keras_model()
        group_size = client_groups.group_size(config, keras_model)
        if group_size is not None:
            return client_groups.build_learning_process(task, config, plan, group_size, model=model)
    process = build_training_process(model, config.algorithm, aggregator=aggregator)
    return task.compose_train(process, result_transform=transform)


def audit_seed(seed: int) -> int:
    """The canary directions' seed, derived from the run's."""
    return seed * 1_000_003 + 0xCA7A


def build_evaluation_process(
    model_fn: Callable[[], tff.learning.models.VariableModel] | tff.learning.models.FunctionalModel,
    *,
    per_client: bool = False,
) -> tff.learning.templates.LearningProcess:
    """TFF's federated evaluation: each client's examples through the server model.

    With `per_client`, `current_round_metrics` also holds `per_client`: {metric: [value
    of each evaluated client]} (float32, in no particular order), each client's own
    finalized metrics, beside the pooled ones (`build_per_client_metrics_process`).
    """
    metrics = build_per_client_metrics_process(model_fn) if per_client else None
    return tff.learning.algorithms.build_fed_eval(
        model_fn, metrics_aggregation_process=metrics, loop_implementation=LOOP
    )


def per_client_vectors(names: list[str]) -> tuple[tff.Computation, tff.Computation, tff.Computation]:
    """`(empty, concatenate, report)` for a `federated_aggregate` that gathers `{<n=float32[None]>}@CLIENTS`.

    One float32 vector per metric name in `names`; each client's (or each group's)
    vectors are concatenated at the server in no particular order (TFF 0.87 has no
    `federated_collect`). Used as `federated_aggregate(v, empty(), concatenate, concatenate, report)`.
    """
    vectors = tff.StructWithPythonType(
        [(n, tff.TensorType(np.float32, [None])) for n in names], collections.OrderedDict
    )

    @tff.tensorflow.computation
    def empty():
        # [None], not [0]: the accumulator grows by each client's entries.
        return collections.OrderedDict((n, tf.compat.v1.placeholder_with_default(tf.zeros([0]), [None])) for n in names)

    @tff.tensorflow.computation(vectors, vectors)
    def concatenate(a, b):
        return collections.OrderedDict((n, tf.concat([a[n], b[n]], 0)) for n in names)

    @tff.tensorflow.computation(vectors)
    def report(a):
        return a

    return empty, concatenate, report


def build_per_client_metrics_process(
    model_fn: Callable[[], tff.learning.models.VariableModel] | tff.learning.models.FunctionalModel,
) -> tff.templates.AggregationProcess:
    """TFF's sum-then-finalize metrics aggregation, plus each client's finalized metrics gathered at the server.

    `(<S@SERVER, {U}@CLIENTS> -> <S@SERVER, <<M, per_client={M'}>, M>@SERVER>)`, where
    `U` is a client's unfinalized metrics, `M` the pooled finalized ones (current round,
    all rounds) and `M'` one float32 vector per metric. Each client finalizes its own
    metrics (`federated_map`); the vectors are concatenated by a `federated_aggregate`
    (TFF 0.87 has no `federated_collect`). That is one more small map and a few floats
    per client on the clients' existing unfinalized metrics, no second pass over their
    data: the per-client distribution costs what federated evaluation already computes.
    """
    if callable(model_fn):
        with tf.Graph().as_default():  # as build_fed_eval derives its default aggregation
            model = model_fn()
            unfinalized = model.report_local_unfinalized_metrics()
            specs = tf.nest.map_structure(
                lambda x: tff.TensorType(tf.convert_to_tensor(x).dtype.as_numpy_dtype, tf.convert_to_tensor(x).shape),
                unfinalized,
            )
        finalizers = model.metric_finalizers()
        unfinalized_type = tff.StructWithPythonType(specs, collections.OrderedDict)

        def finalize(values):
            return collections.OrderedDict((name, f(values[name])) for name, f in finalizers.items())

    else:
        unfinalized_type = tff.tensorflow.computation(model_fn.initialize_metrics_state).type_signature.result
        finalizers = finalize = model_fn.finalize_metrics
    pooled = tff.learning.metrics.SumThenFinalizeFactory(finalizers).create(unfinalized_type)

    @tff.tensorflow.computation(unfinalized_type)
    def finalize_client(values):
        return collections.OrderedDict(
            (name, tf.reshape(tf.cast(v, tf.float32), [1])) for name, v in finalize(values).items()
        )

    names = [name for name, _ in tff.structure.iter_elements(finalize_client.type_signature.result)]
    empty, concatenate, report = per_client_vectors(names)

    @tff.federated_computation(
        pooled.initialize.type_signature.result, tff.FederatedType(unfinalized_type, tff.CLIENTS)
    )
    def next_fn(state, unfinalized_metrics):
        output = pooled.next(state, unfinalized_metrics)
        each = tff.federated_map(finalize_client, unfinalized_metrics)
        gathered = tff.federated_aggregate(each, empty(), concatenate, concatenate, report)
        current = output.result[0]
        current = tff.federated_zip(
            collections.OrderedDict([(n, current[n]) for n in names] + [("per_client", gathered)])
        )
        return tff.templates.MeasuredProcessOutput(
            output.state, tff.federated_zip((current, output.result[1])), output.measurements
        )

    return tff.templates.AggregationProcess(pooled.initialize, next_fn)
