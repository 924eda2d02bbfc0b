"""A group's client work (`build_group_client_work`): one TFF client call trains all its members.

Three ways to train a group's members, each tested against the per-client path:

* on the shared weights (`shared.train_members_shared`, the default for Flatten/Dense stacks,
  `linear` and `mlp`, with short local work under FedAvg and its server-optimizer variants
  without canaries, `shared_obstacle`; any Flatten/Dense stack through `build_training_process`):
  the group's examples are read once (`base.Task.group_examples_fn`: each member's rows
  by its own query, parsed once for the group, each member's shuffle and epochs
  reproduced from its count), and all members step together without K weight copies:
  member k's Dense kernel after t steps is W - lr sum_s A_s^T G_s, so each step is one
  GEMM of all members' rows with the shared W plus per-member low-rank corrections, and
  the group's (clipped) sum is one GEMM over all rows. Equal to per client up to float
  rounding (~1e-7 relative), with the ReLU caveat below.
* the member loop (default for every other model): a `tf.while_loop` over members, each
  through TFF's client update on its own dataset; a member's arithmetic is the
  per-client one exactly.
* batched (`batched.train_members_batched`): the members' examples stacked to
  `[K, steps, B, ...]`, one `[K, ...]` weight tensor per layer, all members stepping
  together (`create_dense_forward` for Flatten/Dense stacks, `tf.vectorized_map`
  otherwise). Equal up to the rounding of batched kernels, except that a ReLU unit whose
  pre-activation is within rounding of 0 can flip (seen once on W2: one unit of one
  member, 2e-3 of that round's update). No faster than the loop under TFF's worker today
  (W3 K=1000 1.58-1.98x, W2 K=100 1.07-1.79x the per-client rounds, against
  the loop's 1.60-2.42x and 2.09-2.61x): the worker runs each call on one op thread (`runtime`,
  TF_NUM_INTRAOP_THREADS=1) and the K weight copies cost memory passes; in a plain
  session with 2 threads the W2 group of 100 trains in 0.42-0.50 s.

Measured for the member loop (benchmarks/client_groups.py, 2026-12-05, shared 2-core
machine, ratios within one run): the data stage costs ~0.5 ms per member read in a while loop (a tf.data map
over members cost ~6 ms), and each group costs something of its own (W3, member loop: 20
groups of 50 took 3.07 s a round, 2 of 500 1.73 s, while every round rebuilt each variant's
executor; with the executors kept, 2026-12-06, 1.21 s of CPU against 1.07 s, ~8 ms a group),
so few large groups are fastest:
`auto` makes one group per worker for the member loop (one per core where members step on
the shared weights, or are recurrent: `rules.group_size`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning.algorithms import fed_sgd
from tensorflow_federated.python.learning.templates import proximal_client_work

from tffpipe import algorithms, configs
from tffpipe.client_groups.batched import Batched, read_members, train_members_batched
from tffpipe.client_groups.packing import _ALL, DatasetFn, GroupingError, ReplaceUpdate
from tffpipe.client_groups.shared import train_members_shared


def build_group_client_work(
    model: tff.learning.models.FunctionalModel,
    optimizer: tff.learning.optimizers.Optimizer,
    dataset_fn: DatasetFn,
    *,
    clip: float | None = None,
    batched: Batched | None = None,
    loop_implementation: tff.learning.LoopImplementation = algorithms.LOOP,
    replace_update: ReplaceUpdate | None = None,
    algorithm: configs.AlgorithmConfig | None = None,
    hparams_state: bool = False,
    members: int | None = None,
) -> tff.learning.templates.ClientWorkProcess:
    """`(<S@SERVER, W@CLIENTS, {str*}@CLIENTS> -> <S@SERVER, {ClientResult}@CLIENTS, M@SERVER>)`.

    Args:
      model: the functional model every member trains.
      optimizer: the client optimizer (each member starts from its initial state).
      dataset_fn: a member's id (a scalar string tensor) to its training dataset,
        traceable in a graph (`ClientData.serializable_dataset_fn`).
      clip: None for the example-weighted mean of the members' updates; C for the
        sum of the members' updates each clipped to C (the DP path).
      batched: None trains the members one after the other with TFF's client update
        (`optimizer` is used); otherwise all members step together
        (`train_members_batched`, plain SGD at `batched.learning_rate`, which must be
        `optimizer`'s).
      loop_implementation: TFF's local loop, as the per-client path uses.
      replace_update: `(member id, update, weight) -> (update, weight)` applied to each
        member's own result before it is clipped or weighted, as the per-client path's
        result transform is (the audit's canaries: `audit.replace_canary_update`);
        only with the member loop.
      algorithm: whose per-client update each member computes (`build_member_update`);
        None: FedAvg's.
      hparams_state: S is the client optimizer's hyperparameters, as in TFF's client work
        for Keras-wrapped models under FedAvg (which a model converted by
        `create_functional_model` runs per client), so checkpoints of either path restore
        in the other; otherwise S is `()`, as in TFF's functional client work. The
        hyperparameters are carried, not changed: members train with `optimizer`.
      members: K, the group size, to send every member's own update, unclipped:
        `<updates=<float32[K, ...], ...>, mask=float32[K]>`, real members first (mask 1),
        zeros after (mask 0), for the aggregator to clip and check each one
        (`MembersFactory`); `clip` must then be None.

    The measurements are TFF's (`train`: the model's metrics summed over every real
    member, then finalized) plus `groups`: `clients` (real members trained) and
    `clipped_count` (members whose update was clipped by `clip`, not privatized; absent
    with `members`, whose aggregator counts them).
    """
    if members is not None and clip is not None:
        raise ValueError("members and clip exclude each other: with members the aggregator clips each member")
    if batched is not None and replace_update is not None:
        raise GroupingError("members that step together have no per-member result to replace (canaries): use the loop")
    weighted = clip is None and members is None  # with DP every member counts the same (`aggregation`)
    weighting = tff.learning.ClientWeighting.NUM_EXAMPLES if weighted else tff.learning.ClientWeighting.UNIFORM
    weights_type = tff.types.tensorflow_to_type(
        tff.learning.models.ModelWeights(
            tuple(tf.TensorSpec(w.shape, tf.dtypes.as_dtype(w.dtype)) for w in model.initial_weights[0]),
            tuple(tf.TensorSpec(w.shape, tf.dtypes.as_dtype(w.dtype)) for w in model.initial_weights[1]),
        )
    )
    ids_type = tff.SequenceType(np.str_)

    @tff.tensorflow.computation(weights_type, ids_type)
    def group_update(initial_weights, member_ids):
        initial = (initial_weights.trainable, initial_weights.non_trainable)
        client_update = build_member_update(model, optimizer, algorithm, weighting, loop_implementation)
        ids = member_ids.batch(_ALL).concatenate(tf.data.Dataset.from_tensors(tf.constant([], tf.string)))
        ids = ids.take(1).get_single_element()
        count = tf.size(ids)
        if batched is not None and batched.activations is not None:
            examples_fn = batched.group_examples_fn or read_members(in_loop(dataset_fn), model.input_spec)
            examples, counts = examples_fn(ids)
            total, weight, metrics, clipped = train_members_shared(
                model,
                batched.activations,
                examples,
                counts,
                initial,
                batched.learning_rate,
                batched.batch_size,
                clip,
                members=members,
            )
        elif batched is not None:
            total, weight, metrics, clipped = train_members_batched(
                model, in_loop(dataset_fn), ids, initial, batched, clip, members=members
            )
        if batched is not None:
            if members is not None:
                return _member_result(total, count, members, initial[0], weight), metrics, _groups(count)
            update = total if clip is not None else tuple(tf.math.divide_no_nan(t, weight) for t in total)
            update = tf.nest.pack_sequence_as(initial[0], list(update))
            groups = collections.OrderedDict(clients=tf.cast(count, tf.float32), clipped_count=clipped)
            return tff.learning.templates.ClientResult(update=update, update_weight=weight), metrics, groups
        zeros = tuple(tf.zeros_like(w) for w in initial[0])
        if members is not None:  # each member's update in its row
            zeros = tuple(tf.TensorArray(w.dtype, size=count, element_shape=w.shape) for w in initial[0])
        metrics0 = model.initialize_metrics_state()

        def body(i, total, weight, metrics, clipped):
            result, member_metrics = client_update(initial, in_loop(dataset_fn)(ids[i]))
            update, member_weight = tuple(tf.nest.flatten(result.update)), result.update_weight
            if replace_update is not None:
                replaced, member_weight = replace_update(ids[i], update, member_weight)
                update = tuple(replaced)
            if members is not None:  # sent as it is: the aggregator clips it (`GroupedQuery`)
                was_clipped = tf.constant(0.0)
            elif clip is None:
                update = tuple(u * member_weight for u in update)
                was_clipped = tf.constant(0.0)
            else:
                norm = tf.linalg.global_norm(update)
                update = tuple(tf.clip_by_global_norm(list(update), clip)[0])
                was_clipped = tf.cast(norm > clip, tf.float32)
            if members is not None:
                total = tuple(rows.write(i, u) for rows, u in zip(total, update, strict=True))
            else:
                total = tuple(t + u for t, u in zip(total, update, strict=True))
            metrics = tf.nest.map_structure(tf.add, metrics, member_metrics)
            return i + 1, total, weight + member_weight, metrics, clipped + was_clipped

        _, total, weight, metrics, clipped = tf.while_loop(
            lambda i, *_: i < count,
            body,
            (tf.constant(0), zeros, tf.constant(0.0), metrics0, tf.constant(0.0)),
        )
        if members is not None:
            stacked = tuple(rows.stack() for rows in total)
            return _member_result(stacked, count, members, initial[0], weight), metrics, _groups(count)
        # Weighted: the group's mean, which TFF's weighted mean weights back by `weight`.
        update = total if clip is not None else tuple(tf.math.divide_no_nan(t, weight) for t in total)
        update = tf.nest.pack_sequence_as(initial[0], list(update))
        groups = collections.OrderedDict(clients=tf.cast(count, tf.float32), clipped_count=clipped)
        return tff.learning.templates.ClientResult(update=update, update_weight=weight), metrics, groups

    metrics_aggregation = tff.learning.metrics.sum_then_finalize(model.finalize_metrics)

    initial_state = ()
    if hparams_state:
        initial_state = optimizer.get_hparams(optimizer.initialize(tf.TensorSpec((), tf.float32)))

    @tff.federated_computation
    def init_fn():
        return tff.federated_value(initial_state, tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(ids_type, tff.CLIENTS),
    )
    def next_fn(state, weights, groups):
        result, metrics, counts = tff.federated_map(group_update, (weights, groups))
        measurements = tff.federated_zip(
            collections.OrderedDict(train=metrics_aggregation(metrics), groups=tff.federated_sum(counts))
        )
        return tff.templates.MeasuredProcessOutput(state, result, measurements)

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def in_loop(dataset_fn: DatasetFn) -> DatasetFn:
    """`dataset_fn` callable inside a `tf.while_loop` body, where a group reads its members.

    A pipeline that builds a lookup table (the keyboard's vocabulary) puts the table's
    initializer in the graph's TABLE_INITIALIZERS collection. Built in a loop body, that
    op lives in the body's graph, yet lands in the outer graph's collection, which TFF's
    serializer groups into the computation's init op: the call then fails
    ("PruneForTargets: Some target nodes not found: grouped_initializers"). Here those
    initializers leave the collection and run before the member's dataset is read, in
    every iteration (importing the same keys again leaves the table as it was).
    """

    def member_dataset(member_id: tf.Tensor) -> tf.data.Dataset:
        key = tf.compat.v1.GraphKeys.TABLE_INITIALIZERS
        before = set(tf.compat.v1.get_collection(key))
        dataset = dataset_fn(member_id)
        body = tf.compat.v1.get_default_graph()
        added = [op for op in tf.compat.v1.get_collection(key) if op not in before and op.graph is body]
        if not added:
            return dataset
        for graph in {body, getattr(body, "outer_graph", body)}:
            collection = graph.get_collection_ref(key)
            collection[:] = [op for op in collection if op not in added]
        with tf.control_dependencies(added):
            variant = tf.identity(tf.data.experimental.to_variant(dataset))
        return tf.data.experimental.from_variant(variant, dataset.element_spec)

    return member_dataset


MemberUpdate = Callable[[tuple, tf.data.Dataset], tuple]


def build_member_update(
    model: tff.learning.models.FunctionalModel,
    optimizer: tff.learning.optimizers.Optimizer,
    algorithm: configs.AlgorithmConfig | None,
    weighting: tff.learning.ClientWeighting,
    loop_implementation: tff.learning.LoopImplementation = algorithms.LOOP,
) -> MemberUpdate:
    """`((trainable, non_trainable), dataset) -> (ClientResult, metrics state)`: one member's own update.

    TFF's functional client update of the algorithm, the one its per-client process runs
    on a functional model (TFF 0.87 keeps the FedProx and FedSGD ones module-private;
    the pinned version makes that safe):

    * FedAvg and the server-optimizer variants: local steps with `optimizer`; the update
      is initial - trained weights.
    * FedProx (Li et al. 2020): the same steps on the loss plus (mu/2)||w - w0||^2, whose
      gradient mu (w - w0) TFF adds to each step's (mu: `proximal_strength`).
    * FedSGD (McMahan et al. 2017): no local step; the update is the example-weighted
      mean gradient at the initial weights, weighted by the example count (the server
      optimizer takes that step).
    """
    kind = configs.Algorithm.FEDAVG if algorithm is None else algorithm.algorithm
    if kind is configs.Algorithm.FEDSGD:
        if weighting is not tff.learning.ClientWeighting.NUM_EXAMPLES:
            raise GroupingError("fedsgd weights clients by examples only in TFF 0.87 (no DP)")
        gradient = fed_sgd._build_functional_client_update(model, loop_implementation)
        return lambda initial, data: gradient(tff.learning.models.ModelWeights(*initial), data)
    if kind is configs.Algorithm.FEDPROX:
        # TFF's FedProx loop is always the iterator one, as its per-client process's.
        proximal = proximal_client_work._build_functional_model_delta_update(
            model=model, weighting=weighting, delta_l2_regularizer=algorithm.proximal_strength
        )
        return lambda initial, data: proximal(optimizer, initial, data)
    delta = tff.learning.templates.model_delta_client_work.build_functional_model_delta_update(
        model=model, weighting=weighting, loop_implementation=loop_implementation
    )
    return lambda initial, data: delta(optimizer, initial, data)


def _member_result(stacked, count, members: int, like, weight) -> tff.learning.templates.ClientResult:
    """The group's `members` result: its `count` members' updates padded with zero rows to K, and the mask."""
    padded = tuple(
        tf.ensure_shape(tf.pad(u, [[0, members - count]] + [[0, 0]] * len(w.shape)), [members, *w.shape])
        for u, w in zip(stacked, tf.nest.flatten(like), strict=True)
    )
    mask = tf.cast(tf.range(members) < count, tf.float32)
    update = collections.OrderedDict(updates=tf.nest.pack_sequence_as(like, list(padded)), mask=mask)
    return tff.learning.templates.ClientResult(update=update, update_weight=weight)


def _groups(count):
    """`groups` measurements of a `members` group: its real members (the aggregator counts what it clips)."""
    return collections.OrderedDict(clients=tf.cast(count, tf.float32))
