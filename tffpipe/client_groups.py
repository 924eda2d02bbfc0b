"""Client groups: many real clients trained in one TensorFlow call (issue 21).

A round's sampled real-client ids are packed into groups (`pack`); one TFF client then
carries one group, `{str*}@CLIENTS`, a sequence of its members' ids. Sampling, the
privacy accounting and everything upstream stay per real client: a group is only how
the round's members are handed to TensorFlow, so the C++ executor pays its per-call
cost (dataset serialization, graph instantiation, dispatch) once per group instead of
once per client.

In the group's one call, `build_group_client_work` builds each member's dataset from
its id (the task's `serializable_dataset_fn`, the same pipeline and seeded shuffle as
the per-client path) and trains it with TFF's own functional client update
(`build_functional_model_delta_update`): the same steps and optimizer arithmetic, so a
member's update is bit-for-bit the one it would compute alone. The group returns:

* without DP (weighted by examples): the example-weighted mean of its members'
  updates and their total weight, which TFF's weighted `MeanFactory` then weights back:
  sum_g W_g (sum_{i in g} w_i u_i / W_g) / sum_g W_g = sum_i w_i u_i / sum_i w_i, the
  per-client mean up to float rounding;
* with fixed-clip DP: the sum of its members' updates, each clipped to L2 norm C
  **by itself** (`tf.clip_by_global_norm`, as TF Privacy clips), and the member count;
* with adaptive clipping, tree aggregation or zeroing: each member's own update,
  stacked `[K, ...]` with a mask of real members (`members`), since the clip lives in
  the aggregator's state and zeroing and the quantile count look at each update. The
  aggregator (`MembersFactory`) applies the per-client query's record preprocessing to
  each real member on its own with the round's clip and adds the results up
  (`GroupedQuery`); zeroing zeroes each member on its own first. Memory: K copies of
  the update per group, a few times over (`configs.member_group_limit` bounds K).

**Sensitivity, with DP.** Each mechanism is the per-client one, and the server adds its
noise to the same sum. Per client, TF Privacy preprocesses each real client's update u_i
into a record r(u_i) (params: this round's clip, fixed before the round's data is
read), the records are summed over the round's real clients, and noise is added to
sum_i r(u_i) once at the server; every sum query accumulates records by addition. A
group g hands the server S_g = sum_{i in g} r(u_i) (padding members add 0: masked, not
preprocessed), and sum_g S_g = sum_i r(u_i) whatever the packing: the noised value is
the same function of the real clients' data as per client, so the output distribution,
the DpEvent the query reports and the accountant's q = m/N over real clients (sampling
is per real client) are unchanged. Adding or removing one real client changes the sum
by one record r(u_i), per mechanism:

* fixed: r(u) = clip_C(u), norm <= C; noise N(0, (zC)^2) per coordinate: the Gaussian
  mechanism of multiplier z. Here the group clips its members in the client work and
  sends S_g itself, whose norm can reach |g|*C, so TFF's DP factory must not clip it
  again (that would shrink honest sums and change the result, though not the
  privacy): `build_factory` gives it `PreclippedGaussianSumQuery`, TF Privacy's
  Gaussian sum query with the identity as preprocessing, clip C and noise std zC.
* adaptive (Andrew et al. 2021): r(u) = (clip_C(u), 1[|u| <= C] - 1/2) with C the
  state's clip; the value part has norm <= C and noise z_v*C, the centred count
  |1/2| and noise sigma_b, the split of z TFF makes (`accounting.adaptive_noise_split`),
  as per client. A padding member would add -1/2 to the count: the mask keeps it out.
* tree (DP-FTRL, Kairouz et al. 2021): r(u) = clip_C(u), norm <= C, summed into the
  tree's leaf of the round, whose seeded noise does not depend on the records.
* zeroing: a member whose largest |coordinate| exceeds the bound is replaced by zeros
  before r, as TFF's `zeroing_factory` does per client; zeroing is data-dependent
  preprocessing of one client's update, so r(u) still has norm <= C.

Packing itself reads no data.

What runs grouped today: every registered model and every algorithm, without DP or
with fixed, adaptive or tree DP, with or without zeroing.

* Models: functional ones (`linear`, `mlp`) as they are; Keras-wrapped ones (`small_cnn`,
  `cnn`, `cifg_lstm`; `so_lstm` not tried) converted by `create_functional_model` with TFF's
  `functional_model_from_keras` (the same layers and loss on weight tensors, and the
  metrics `from_keras_model` reports, in its order). The keyboard pipeline's vocabulary
  table is initialized inside the members' loop (`in_loop`). Refused: models with
  non-trainable weights (BatchNormalization; `functional_obstacle`). `cnn`'s dropout
  draws unseeded masks on both paths, so its members are as random as its per-client
  runs (two of which differ by 1.2 relative), not copies of them.
* Algorithms: each member runs its algorithm's own TFF functional client update
  (`build_member_update`): FedAvg and the server optimizers (FedAvgM, FedAdam, FedYogi,
  FedAdagrad: only the finalizer differs), FedProx (the proximal gradient mu (w - w0)
  added to every step), FedSGD (the example-weighted mean gradient at the initial
  weights, without DP as per client).

Measured equal to the per-client rounds within 1e-5 relative (weights and metrics,
tests/client_groups_test.py): linear, mlp, small_cnn (FedAvg with fixed DP, FedSGD; one
round, since a second once differed by 2.6e-5 from weights ~1e-7 apart),
FedProx with fixed DP, cifg_lstm on the keyboard pipeline (with a group of one and a
member without examples); observed ~1e-7 (float rounding of the group's mean).

Everything else raises `GroupingError` naming why (distributed DP,
compression, secure aggregation); `configs` refuses those combinations with an explicit
`client_batching=K` and `auto` runs them per client, saying why in one note
(`auto_note`). With fixed-clip DP the per-member clipped count is in
`client_work/groups/clipped_count`, and `next` copies it where the per-client query
reports its own (`with_member_clipped_count`), so `diagnostic/clipped_fraction` counts
real clients on both paths; with `MembersFactory` the query counts them itself, as per
client. Distributed DP and secure aggregation run per client by design
(`configs.per_client_reason`: each device's own rounding, noise share, secure input).

Around a group, per real client as per client: the audit's canaries are members whose
update is replaced in the group's call before it is clipped (`replace_update`); the
device model chooses who reports before `next` (dropped and late devices are never
packed) and counts bytes per reporting device; over several workers TFF's mergeable
context splits the groups as it splits clients (a worker may get none) and merges the
partial sums. All three are tested against the per-client path.

Three ways to train a group's members, each tested against the per-client path:

* on the shared weights (`train_members_shared`, the default for Flatten/Dense stacks
  without ReLU, i.e. `linear`, under FedAvg and its server-optimizer variants without
  canaries, `shared_obstacle`; any Flatten/Dense stack through `build_training_process`):
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
* batched (`train_members_batched`): the members' examples stacked to
  `[K, steps, B, ...]`, one `[K, ...]` weight tensor per layer, all members stepping
  together (`create_dense_forward` for Flatten/Dense stacks, `tf.vectorized_map`
  otherwise). Equal up to the rounding of batched kernels, except that a ReLU unit whose
  pre-activation is within rounding of 0 can flip (seen once on W2: one unit of one
  member, 2e-3 of that round's update). No faster than the loop under TFF's worker today
  (W3 K=1000 1.58-1.98x, W2 K=100 1.07-1.79x the per-client rounds, against
  the loop's 1.60-2.42x and 2.09-2.61x): the worker runs each call on one op thread (`runtime`,
  TF_NUM_INTRAOP_THREADS=1) and the K weight copies cost memory passes; in a plain
  session with 2 threads the W2 group of 100 trains in 0.42-0.50 s.

Measured on the shared path (`python -m benchmarks.client_groups --cg_workloads=w3_2k,w2
--group_sizes=50,500,1000 --rounds=3 --member_loop`, twice, 2026-12-05 22:28-22:40, load
7-20; BENCHMARKS.md): W3 (linear, 1,000 x 19) K=1000 3.45x and 2.68x the per-client
clients/s, CPU 0.46-0.48 s a round against 2.37-2.46 per client (5.1-5.2x) and 1.02-1.05
for the member loop in the same runs. In plain graph-mode TF on one thread the group's
computation took 268-305 ms of CPU against the member loop's 945: rows read 122-134 ms
(a query per member; one query for the group measured no faster), parsed once 40-50 ms,
training ~100 ms. What stays: reading the rows (the per-client path pays it too) and
one op thread per group; see BENCHMARKS.md for the bound.

Measured for the member loop (benchmarks/client_groups.py, 2026-12-05, shared 2-core
machine, ratios within one run): the data stage costs ~0.5 ms per member read in a while loop (a tf.data map
over members cost ~6 ms), and each group costs ~75 ms of its own (W3, member loop: 20
groups of 50 took 3.07 s a round, 2 of 500 1.73 s), so few large groups are fastest:
`auto` makes one group per worker.

Keras-wrapped models (member loop, same clients and state, per-client and grouped rounds
alternated; `python -m benchmarks.client_groups --cg_workloads=default,keyboard
--group_sizes=5,25,auto --rounds=2`, then twice `--group_sizes=auto --rounds=3`; load average
13-35 on the 2 cores, so CPU seconds per round, this process and TFF's worker, are given
beside the wall ratio):

* default run (small_cnn, ~52 clients x 5 epochs, fixed DP), K=50: wall ratio
  (per-client / grouped) 0.79x, 1.49x, 0.91x, 1.03x in four runs; CPU 3.35 / 3.15 s,
  3.40 / 3.43 s, 3.16 / 3.43 s (0.92-1.06x). K=25 1.09x, K=5 1.04x (CPU 0.93x, 0.91x).
  Another session's run: 0.87x wall, 1.07x CPU. No gain, and why is open: the
  converted model's step is not dearer in itself (in plain graph-mode TF on one thread,
  400 steps of batch 20 took 0.60-0.68 s CPU converted against 0.59-0.66 s
  Keras-wrapped), yet the grouped round spends what grouping saves per call (~30 ms of
  CPU per client beyond the steps' ~1.6 s) somewhere else. `auto` runs convolutional
  models per client.
* keyboard (cifg_lstm, 10 users x ~80 sequences, FedAvg): K=10 1.26x and 1.56x wall,
  CPU 8.91 / 8.53 s and 7.44 / 6.92 s (1.04-1.08x); K=5 1.36x and 1.27x (CPU 0.99x,
  1.01x). Another session's runs in the same hour (BENCHMARKS.md) measured 0.86x (K=5),
  0.93x and 0.95x (K=10) wall, CPU 0.99-1.07x: the wall ratio is the load's, the CPU
  ratio (0.99-1.08x over seven runs) what grouping buys. What bounds it: every member
  runs the same steps on the same [16, 20] batches as alone, so the arithmetic (~8.5
  MFLOP a token forward and back, 20 tokens a sequence: 123-149 GFLOP a round, ~17
  GFLOP per CPU second on both paths) is untouched; grouping saves only the per-call
  cost, ~40-50 ms of CPU per user. Beyond that needs members stepping together
  (`train_members_batched`, not tried on the LSTM). `auto` groups
  recurrent models (CPU at most 1% above per client, up to 8% below), one group per core: a
  group's members run in turn on the worker's one op thread, so on an idle machine one
  group would leave a core the per-client calls use; K=5 costs 3-5% more CPU than K=10
  here, where the cores are busy anyway.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators import robust
from tensorflow_federated.python.learning.algorithms import fed_sgd
from tensorflow_federated.python.learning.templates import proximal_client_work

from tffpipe import accounting, aggregation, algorithms, audit, configs, errors, models
from tffpipe.tasks import base

DatasetFn = Callable[[tf.Tensor], tf.data.Dataset]
# (member id, update tensors, weight) -> (update tensors, weight), in the group's graph.
ReplaceUpdate = Callable[[tf.Tensor, Sequence[tf.Tensor], tf.Tensor], tuple[Sequence[tf.Tensor], tf.Tensor]]

# A group's member ids are read into one tensor; no group comes near this.
_ALL = 2**31 - 1


class GroupingError(errors.InputError):
    """The configuration has no grouped path (yet); the message says which part."""

    field = "client_batching"


def check_model(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> None:
    """An explicit group size needs a model `create_functional_model` can convert.

    Raises:
      GroupingError: naming the model and why.
    """
    explicit = configs.client_group_size(config)
    reason = None if explicit is None else functional_obstacle(keras_model)
    if reason is not None:
        raise GroupingError(f"client_batching={explicit} cannot run: model {config.model}: {reason}; use off or auto")
    if explicit is not None:
        check_member_memory(config, explicit, models.weight_bytes(keras_model.trainable_weights))


def check_member_memory(config: configs.ExperimentConfig, k: int, update_bytes: int) -> None:
    """K groups' stacked member updates must fit a group's memory budget (`configs.member_group_limit`).

    Raises:
      GroupingError: naming client_batching, the memory it needs and the largest K that fits.
    """
    limit = configs.member_group_limit(config, update_bytes)
    if limit is not None and k > limit:
        need = configs.GROUP_UPDATE_COPIES * k * update_bytes
        raise GroupingError(
            f"client_batching={k} cannot run: with {config.dp.mechanism.value} DP"
            f"{' and zeroing' if config.dp.zeroing_norm > 0 else ''} a group sends each member's update, "
            f"{need / 1e9:,.1f} GB for {k} members of {update_bytes:,} bytes ({configs.GROUP_UPDATE_COPIES} copies), "
            f"over a group's share of this machine's memory; use at most {limit}, or auto"
        )


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


_CONVOLUTIONAL = (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)
_RECURRENT = (tf.keras.layers.RNN,)  # LSTM and GRU are RNN layers too


def model_kind(keras_model: tf.keras.Model) -> str:
    """ "recurrent", "convolutional" or "dense": what decides whether `auto` groups (`AUTO_GROUPS`)."""
    layers = list(keras_model.submodules)
    if any(isinstance(m, _RECURRENT) for m in layers):
        return "recurrent"
    if any(isinstance(m, _CONVOLUTIONAL) for m in layers):
        return "convolutional"
    return "dense"


# Whether `client_batching=auto` groups a model of this kind: where grouped rounds measured
# faster than per-client ones (benchmarks/client_groups.py, figures in the module doc and
# BENCHMARKS.md). Convolutional: small_cnn's grouped rounds took as much CPU or more
# (per-client / grouped 0.92-1.07x) and wall time straddled 1 (0.79x-1.49x). Recurrent:
# cifg_lstm's took as much CPU or less (0.99-1.08x over seven runs), wall 0.86x-1.56x.
AUTO_GROUPS = {"dense": True, "convolutional": False, "recurrent": True}
# Kinds whose rounds are compute-bound: `auto` makes one group per core, not per worker,
# since a worker runs each call on one op thread and a group's members run in turn.
_ONE_GROUP_PER_CORE = frozenset({"recurrent"})


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


def pack(client_ids: Sequence[str], group_size: int) -> list[list[str]]:
    """The round's real clients in groups of at most `group_size`, in sampled order.

    The groups are as even as can be (sizes differ by at most one), so several
    workers get similar work: ceil(n / K) groups. No clients, no groups.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    ids = list(client_ids)
    if not ids:
        return []
    groups = -(-len(ids) // group_size)
    return [chunk.tolist() for chunk in np.array_split(np.asarray(ids, dtype=object), groups)]


class PreclippedGaussianSumQuery(aggregation.SeededGaussianSumQuery):
    """The seeded Gaussian sum query over records already clipped per real client.

    Each record is a group's sum of member updates, each member clipped to
    `l2_norm_clip` in the client work; the record is summed as it is (see the module
    docstring for why the sensitivity stays C). Noise, its seed and the DP event are the
    per-client query's: N(0, stddev^2) per coordinate, `GaussianDpEvent(stddev / clip)`.
    Members clipped are counted by the client work, not here, so the state's
    `clipped_count` stays 0 and `derive_metrics` reports only the clip.
    """

    def preprocess_record(self, params, record):
        return record, tf.constant(0.0)

    def derive_metrics(self, global_state):
        return collections.OrderedDict(clip=global_state.l2_norm_clip)


def build_factory(
    dp: configs.DpConfig, plan: accounting.PrivacyPlan, *, noise_seed: int, compression: bool = False
) -> tff.aggregators.UnweightedAggregationFactory | None:
    """The aggregator for group results: None (TFF's weighted mean), fixed-clip DP or `MembersFactory`.

    Fixed clipping without zeroing is the per-client mechanism of
    `aggregation.build_factory` (same clip, noise, seed, noise measurement and
    normalization by m, and the same state structure) with the clipping moved into the
    client work, which then sends one clipped sum per group. Adaptive clipping, tree
    aggregation and zeroing need each member's own update at the aggregator (the clip
    is in the aggregator's state; zeroing and the quantile count look at each update):
    a `MembersFactory`, whose groups send their members' updates stacked.
    """
    if compression:
        raise GroupingError("compression quantizes each update: a group's mean is not its members' updates")
    if plan.mechanism is configs.Mechanism.NONE:
        return None
    if plan.mechanism.value not in configs.GROUPED_MECHANISMS:
        raise GroupingError(f"the {plan.mechanism.value} DP mechanism has no grouped path")
    if configs.group_sends_members(dp):
        return MembersFactory(dp, plan, noise_seed=noise_seed)
    z, m = plan.noise_multiplier, float(plan.clients_per_round)
    preclipped = PreclippedGaussianSumQuery(dp.clip, z * dp.clip, noise_seed)
    query = tfp.NormalizedQuery(aggregation.MeasuredNoiseQuery(preclipped, lambda s: s[0]), m)
    return tff.aggregators.DifferentiallyPrivateFactory(query)


def _member_specs(stacked_specs):
    """A member's TensorSpecs from the group's stacked ones (`[K, ...]` -> `[...]`)."""
    return tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape[1:], s.dtype), stacked_specs["updates"])


class GroupedQuery(tfp.SumAggregationDPQuery):
    """A DP sum query whose record is a group: its members' updates stacked `[K, ...]` and a mask.

    `preprocess_record` applies the inner query's `preprocess_record`, with the round's
    sample params (the clip in the aggregator's state), to each real member (mask 1) on
    its own and adds them up with the inner query's `accumulate_preprocessed_record`;
    padding members (mask 0) add nothing. TF Privacy's sum queries accumulate
    preprocessed records by addition (the Gaussian sum, the quantile-adaptive query's
    clipped sum and its centred below-clip count, the tree queries' clipped sums), so a
    group's preprocessed record is exactly the sum of its members' per-client ones, and
    the server's sum over groups is the per-client sum over real clients. Everything
    else (state, sample params, noise, DP event, metrics) is the inner query's own, so
    the aggregator's state has the per-client structure.
    """

    def __init__(self, inner: tfp.SumAggregationDPQuery):
        self._inner = inner

    def initial_global_state(self):
        return self._inner.initial_global_state()

    def derive_sample_params(self, global_state):
        return self._inner.derive_sample_params(global_state)

    def initial_sample_state(self, template=None):
        return self._inner.initial_sample_state(_member_specs(template))

    def preprocess_record(self, params, record):
        updates, mask = record["updates"], record["mask"]
        k = mask.shape[0]
        template = tf.nest.map_structure(lambda u: tf.TensorSpec(u.shape[1:], u.dtype), updates)
        initial = self._inner.initial_sample_state(template)

        def add_member(i, total):
            member = tf.nest.map_structure(lambda u: u[i], updates)
            return tf.cond(
                mask[i] > 0,
                lambda: self._inner.accumulate_preprocessed_record(
                    total, self._inner.preprocess_record(params, member)
                ),
                lambda: total,
            )

        _, total = tf.while_loop(lambda i, _: i < k, lambda i, t: (i + 1, add_member(i, t)), (0, initial))
        return total

    def accumulate_preprocessed_record(self, sample_state, preprocessed_record):
        return self._inner.accumulate_preprocessed_record(sample_state, preprocessed_record)

    def merge_sample_states(self, sample_state_1, sample_state_2):
        return self._inner.merge_sample_states(sample_state_1, sample_state_2)

    def get_noised_result(self, sample_state, global_state):
        return self._inner.get_noised_result(sample_state, global_state)

    def derive_metrics(self, global_state):
        return self._inner.derive_metrics(global_state)


class MembersFactory(tff.aggregators.UnweightedAggregationFactory):
    """The per-client central DP aggregator over groups that send their members' updates stacked.

    `create` takes the group's value type, `<updates=<float32[K, ...], ...>, mask=float32[K]>`
    (`build_group_client_work` with `members=K`), and builds the query of
    `aggregation.build_query` for one member's update (the tree's noise shaped like it)
    inside `GroupedQuery`, under TFF's `DifferentiallyPrivateFactory`; with zeroing,
    each real member is zeroed on its own first (`_grouped_zeroing`). The result is the
    noised mean of the member updates' type, the state and measurements are the
    per-client aggregator's (`aggregation.build_factory`), the same structure and values.
    """

    def __init__(self, dp: configs.DpConfig, plan: accounting.PrivacyPlan, *, noise_seed: int):
        self._dp = dp
        self._plan = plan
        self._noise_seed = noise_seed

    def create(self, value_type) -> tff.templates.AggregationProcess:
        member_specs = _member_specs(tff.types.type_to_tf_tensor_specs(value_type))
        query = aggregation.build_query(self._dp, self._plan, noise_seed=self._noise_seed, record_specs=member_specs)
        factory = tff.aggregators.DifferentiallyPrivateFactory(GroupedQuery(query))
        if self._dp.zeroing_norm > 0:
            factory = _grouped_zeroing(float(self._dp.zeroing_norm), factory)
        return factory.create(value_type)


def _grouped_zeroing(zeroing_norm: float, inner: tff.aggregators.UnweightedAggregationFactory):
    """TFF's `zeroing_factory` (L-inf norm) applied to each member of a stacked group on its own.

    A member whose largest absolute coordinate exceeds `zeroing_norm` is replaced by
    zeros, as TFF zeroes a per-client update, and counted in `zeroed_count` (real members
    only). Built with the wrapper TFF's `zeroing_factory` uses (`robust._make_wrapper`,
    private in TFF 0.87), so the state and measurements are the per-client ones.
    """

    def make_zero_fn(value_type):
        @tff.tensorflow.computation(value_type, np.float32)
        def zero_fn(value, norm):
            updates, mask = value["updates"], value["mask"]
            flat = tf.nest.flatten(updates)
            # Per member: the largest |coordinate| over all its tensors (tf.norm(ord=inf) of each, then max).
            member_norms = tf.reduce_max(
                tf.stack([tf.reduce_max(tf.abs(tf.reshape(u, [tf.shape(u)[0], -1])), 1) for u in flat]), 0
            )
            zero = member_norms > norm
            kept = tf.nest.map_structure(lambda u: tf.where(_per_member(zero, u), tf.zeros_like(u), u), updates)
            count = tf.reduce_sum(tf.cast(zero, tf.int32) * tf.cast(mask > 0, tf.int32))
            return collections.OrderedDict(updates=kept, mask=mask), tf.reduce_max(member_norms * mask), count

        return zero_fn

    return robust._make_wrapper(zeroing_norm, inner, tff.aggregators.SumFactory(), make_zero_fn, "zero")


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


@dataclasses.dataclass(frozen=True)
class Batched:
    """How `train_members_batched` steps: plain SGD, and the pipeline's batch size.

    `batch_size` must be the one the member datasets are batched with (every batch
    full but a member's last), which is how `data.preprocessing` batches.
    """

    learning_rate: float
    batch_size: int
    forward: Callable[[tuple, tf.Tensor], tf.Tensor] | None = None  # see `create_dense_forward`
    # A Flatten/Dense stack's `dense_activations`: its members step on the shared weights (`train_members_shared`).
    activations: list | None = None
    # The task's read of a group's examples (`base.Task.group_examples_fn`); None: each member's dataset.
    group_examples_fn: Callable[[tf.Tensor], tuple] | None = None


def read_members(dataset_fn: DatasetFn, spec) -> Callable[[tf.Tensor], tuple]:
    """A group's examples read through each member's own dataset: `base.Task.group_examples_fn`'s contract.

    `spec`: the datasets' batch spec. For tasks without a read of their own; a while
    loop, not a tf.data map: a map instantiates the member's nested datasets at several
    times the cost (W3: ~6 ms against ~1.5 ms per member).
    """
    flat_spec = tf.nest.flatten(spec)

    def group_examples(ids: tf.Tensor):
        k = tf.size(ids)

        def read_member(i, rows, counts):
            empty = tf.data.Dataset.from_tensors(
                tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape[1:]], s.dtype), spec)
            )
            examples = dataset_fn(ids[i]).unbatch().batch(_ALL).concatenate(empty).take(1).get_single_element()
            flat = tf.nest.flatten(examples)
            rows = tuple(ta.write(i, t) for ta, t in zip(rows, flat, strict=True))
            return i + 1, rows, counts.write(i, tf.shape(flat[0])[0])

        rows0 = tuple(
            tf.TensorArray(s.dtype, size=k, infer_shape=False, element_shape=tf.TensorShape([None, *s.shape[1:]]))
            for s in flat_spec
        )
        _, rows, counts = tf.while_loop(
            lambda i, *_: i < k, read_member, (tf.constant(0), rows0, tf.TensorArray(tf.int32, size=k))
        )
        flat = [
            tf.cond(ta.size() > 0, ta.concat, lambda s=s: tf.zeros([0, *s.shape[1:]], s.dtype))
            for ta, s in zip(rows, flat_spec, strict=True)
        ]
        return tf.nest.pack_sequence_as(spec, flat), tf.reshape(counts.stack(), [k])

    return group_examples


def _to_steps(examples, counts: tf.Tensor, b: int):
    """A group's concatenated examples as `[K, steps, B, ...]` (member k's run in its row, zeros after), and counts."""
    k = tf.size(counts)
    steps = (tf.reduce_max(tf.concat([counts, [0]], 0)) + b - 1) // b

    def to_steps(t):
        t = tf.RaggedTensor.from_row_lengths(t, counts).to_tensor()
        t = tf.pad(t, [[0, 0], [0, steps * b - tf.shape(t)[1]]] + [[0, 0]] * (len(t.shape) - 2))
        return tf.reshape(t, tf.concat([[k, steps, b], tf.shape(t)[2:]], 0))

    return tf.nest.map_structure(to_steps, examples), counts


def train_members_batched(
    model: tff.learning.models.FunctionalModel,
    dataset_fn: DatasetFn,
    ids: tf.Tensor,
    initial: tuple,
    batched: Batched,
    clip: float | None,
    *,
    members: int | None = None,
):
    """Every member's local SGD at once: (total, weight, metrics state, clipped count).

    With `members`, `total` is each member's own update, `[k, ...]` per weight (a
    non-finite one zero), unclipped, and the weight is the member count.

    The members' examples, in the order their datasets yield them (the seeded shuffle
    and the epochs included), are stacked and padded to `[K, steps * B, ...]`; the
    weights are one `[K, ...]` tensor per layer. Step s feeds member k its batch s (rows
    s*B..s*B+B-1 of its examples) through `tf.vectorized_map` of the model's forward
    pass (batched matmuls for dense layers) and takes the gradient of the sum of the
    members' mean batch losses, which is each member's own gradient since member k's
    loss depends only on its weights. A member past its last example has no valid row:
    its loss term is 0, so its weights stay. The arithmetic per member is the
    per-client step's (w - lr * g), up to float rounding of the batched kernels.

    Returns what the member loop returns: without clip the example-weighted sum of the
    updates (initial - trained) and the examples; with clip the sum of the updates each
    clipped to `clip` and the member count. A member whose update is not finite gives
    a zero update and weight 0, as TFF's client update does; its metrics still count.
    """
    trainable, non_trainable = initial
    b = batched.batch_size
    examples_fn = batched.group_examples_fn or read_members(dataset_fn, model.input_spec)
    data, counts = _to_steps(*examples_fn(ids), b)
    k, steps = tf.size(counts), tf.shape(tf.nest.flatten(data)[0])[1]
    x_all, y_all = (data["x"], data["y"]) if isinstance(data, Mapping) else data
    stacked = tuple(tf.tile(w[None], [k] + [1] * len(w.shape)) for w in trainable)

    def predict(args):
        weights, x = args
        return model.predict_on_batch((weights, non_trainable), x, training=True)

    def mean_loss(args):
        output, y, sample_weight = args
        return model.loss(output, y, sample_weight=sample_weight)

    def step(s, weights, metrics):
        x, y = x_all[:, s], y_all[:, s]
        valid = tf.range(b)[None] + s * b < counts[:, None]  # [K, B]
        rows = tf.reduce_sum(tf.cast(valid, tf.float32), 1)
        # Keras' mean loss divides by B whatever the weights: B / rows makes it the mean over valid rows.
        sample_weight = tf.cast(valid, tf.float32) * (b / tf.maximum(rows, 1.0))[:, None]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            if batched.forward is not None:
                output = batched.forward(weights, x)
            else:
                output = tf.vectorized_map(predict, (weights, x))
            loss = tf.reduce_sum(tf.vectorized_map(mean_loss, (output, y, sample_weight)))
        gradients = tape.gradient(loss, weights)
        weights = tuple(
            w - batched.learning_rate * tf.convert_to_tensor(g) for w, g in zip(weights, gradients, strict=True)
        )
        flat = tf.reshape(valid, [-1])
        predictions = tf.boolean_mask(tf.reshape(output, tf.concat([[-1], tf.shape(output)[2:]], 0)), flat)
        labels = tf.boolean_mask(tf.reshape(y, tf.concat([[-1], tf.shape(y)[2:]], 0)), flat)
        metrics = model.update_metrics_state(
            metrics, batch_output=tff.learning.models.BatchOutput(predictions=predictions), labels=labels
        )
        return s + 1, weights, metrics

    _, trained, metrics = tf.while_loop(
        lambda s, *_: s < steps, step, (tf.constant(0), stacked, model.initialize_metrics_state())
    )
    deltas = tuple(w0 - w for w0, w in zip(stacked, trained, strict=True))
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(tf.reshape(d, [k, -1])), 1) for d in deltas]), 0)
    deltas = tuple(tf.where(_per_member(finite, d), d, tf.zeros_like(d)) for d in deltas)
    if members is not None:
        return deltas, tf.cast(k, tf.float32), metrics, tf.constant(0.0)
    if clip is None:
        weights = tf.cast(counts, tf.float32) * tf.cast(finite, tf.float32)
        total = tuple(tf.reduce_sum(d * _per_member(weights, d), 0) for d in deltas)
        return total, tf.reduce_sum(weights), metrics, tf.constant(0.0)
    norms = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.reshape(d, [k, -1])), 1) for d in deltas]))
    scale = clip * tf.minimum(1.0 / norms, 1.0 / clip)  # as tf.clip_by_global_norm scales
    total = tuple(tf.reduce_sum(d * _per_member(scale, d), 0) for d in deltas)
    return total, tf.cast(k, tf.float32), metrics, tf.reduce_sum(tf.cast(norms > clip, tf.float32))


_ACTIVATIONS = {"linear": tf.identity, "relu": tf.nn.relu}


def dense_activations(keras_model: tf.keras.Model) -> list | None:
    """A Flatten/Dense stack's layers as [None for Flatten, the activation for Dense], or None for other models.

    Dense layers with a bias, a linear or ReLU activation and no regularization losses,
    whose kernel and bias are the model's trainable weights in order.
    """
    if not isinstance(keras_model, tf.keras.Sequential):
        return None
    layers = []
    for layer in keras_model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        if isinstance(layer, tf.keras.layers.Flatten):
            layers.append(None)
        elif (
            isinstance(layer, tf.keras.layers.Dense)
            and layer.activation.__name__ in _ACTIVATIONS
            and layer.use_bias
            and not layer.losses
        ):
            layers.append(_ACTIVATIONS[layer.activation.__name__])
        else:
            return None
    if len(keras_model.trainable_weights) != 2 * sum(a is not None for a in layers):
        return None
    return layers


def create_dense_forward(keras_model: tf.keras.Model) -> Callable[[tuple, tf.Tensor], tf.Tensor] | None:
    """K members' forward pass for a stack of Flatten and Dense layers, or None for other models.

    `forward(weights, x)`: weights `[K, ...]` per trainable weight in the model's order
    (kernel, bias per Dense), x `[K, B, ...]`, gives the logits `[K, B, C]` with one
    batched matmul per layer: what `tf.vectorized_map` of the model computes, without
    its per-member gathers (whose gradients are scatters of the K weight copies).
    """
    layers = dense_activations(keras_model)
    if layers is None:
        return None

    def forward(weights: tuple, x: tf.Tensor) -> tf.Tensor:
        k, b = tf.shape(x)[0], tf.shape(x)[1]
        h, i = x, 0
        for activation in layers:
            if activation is None:
                h = tf.reshape(h, [k, b, -1])
            else:
                h = activation(tf.linalg.matmul(h, weights[i]) + weights[i + 1][:, None, :])
                i += 2
        return h

    return forward


def train_members_shared(
    model: tff.learning.models.FunctionalModel,
    activations: list,
    examples,
    counts: tf.Tensor,
    initial: tuple,
    learning_rate: float,
    batch_size: int,
    clip: float | None,
    *,
    members: int | None = None,
):
    """Every member's local SGD on a Flatten/Dense stack without K copies of the weights.

    Returns what `train_members_batched` returns: (total, weight, metrics state, clipped
    count); with `members`, each member's own update `[k, ...]` per weight.

    `examples`, `counts`: the members' examples concatenated, member k's `counts[k]` in
    the order its dataset yields them (`base.Task.group_examples_fn`); step s gathers
    rows s*B..s*B+B-1 of each member's run, so the group's data is never laid out as
    `[K, steps, B, ...]` (a copy of it per pass: W3's are 60 MB). All members start from the same weights W, and a Dense
    layer's kernel gradient on a batch is A^T G (A the layer's inputs `[B, in]`, G the
    loss gradient at its pre-activations `[B, out]`; the bias's is 1^T G). So after t
    plain SGD steps member k's kernel is W - lr sum_{s<t} A_s^T G_s, and its
    pre-activations on the next batch X are

        X W_k + b_k = X W + b - lr sum_{s<t} ((X A_s^T) G_s + 1 (1^T G_s)):

    one GEMM of every member's rows with the shared W, plus small per-member
    corrections `[B, tB]` from the member's own earlier A and G (the low-rank
    formulation of issue 21). G comes from the tape at the pre-activations, through the
    same corrections, so each member's steps are its per-client steps in exact
    arithmetic. The results are GEMMs too: the update (W - trained) is
    lr A_k^T G_k over the member's rows, the example-weighted sum lr A^T (w G) over all
    rows, and with a clip each member's norm comes from its Gram matrices
    ||A^T G||_F^2 = sum((A A^T) * (G G^T)).

    Rounding: the sums run in another order than per client (W is not updated in place),
    so weights agree to float rounding (~1e-7 relative), and, as with every batched
    path, a ReLU whose pre-activation is within rounding of 0 can take the other side.
    """
    trainable, non_trainable = initial
    del non_trainable  # a Dense stack has none (`dense_activations`)
    b, lr = batch_size, learning_rate
    x_all, y_all = (examples["x"], examples["y"]) if isinstance(examples, Mapping) else examples
    k = tf.size(counts)
    steps = (tf.reduce_max(tf.concat([counts, [0]], 0)) + b - 1) // b
    starts = tf.cumsum(counts, exclusive=True)
    kernels, biases = trainable[0::2], trainable[1::2]
    n_dense = len(kernels)

    def mean_loss(args):
        output, y, sample_weight = args
        return model.loss(output, y, sample_weight=sample_weight)

    def step(s, a_hist, g_hist, metrics, finite):
        position = tf.range(b)[None] + s * b
        valid = position < counts[:, None]  # [K, B]
        # A row past a member's run reads its group's first row: masked out of the loss, so its G is 0.
        index = tf.where(valid, starts[:, None] + position, 0)
        x, y = tf.gather(x_all, index), tf.gather(y_all, index)
        rows = tf.reduce_sum(tf.cast(valid, tf.float32), 1)
        # Keras' mean loss divides by B whatever the weights: B / rows makes it the mean over valid rows.
        sample_weight = tf.cast(valid, tf.float32) * (b / tf.maximum(rows, 1.0))[:, None]
        inputs, pre = [], []
        with tf.GradientTape() as tape:
            h, layer = x, 0
            for activation in activations:
                if activation is None:
                    h = tf.reshape(h, [k, b, -1])
                    continue
                a = h
                z = tf.reshape(tf.linalg.matmul(tf.reshape(a, [k * b, -1]), kernels[layer]), [k, b, -1])
                z = z + biases[layer]
                correction = tf.linalg.matmul(tf.linalg.matmul(a, a_hist[layer], transpose_b=True), g_hist[layer])
                z = z - lr * (correction + tf.reduce_sum(g_hist[layer], 1)[:, None, :])
                tape.watch(z)
                inputs.append(a)
                pre.append(z)
                h = activation(z)
                layer += 1
            loss = tf.reduce_sum(tf.vectorized_map(mean_loss, (h, y, sample_weight)))
        gradients = tape.gradient(loss, pre)
        a_hist = tuple(tf.concat([old, new], 1) for old, new in zip(a_hist, inputs, strict=True))
        g_hist = tuple(tf.concat([old, new], 1) for old, new in zip(g_hist, gradients, strict=True))
        finite = tf.logical_and(
            finite,
            tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g), [1, 2]) for g in gradients]), 0),
        )
        flat = tf.reshape(valid, [-1])
        predictions = tf.boolean_mask(tf.reshape(h, tf.concat([[-1], tf.shape(h)[2:]], 0)), flat)
        labels = tf.boolean_mask(tf.reshape(y, tf.concat([[-1], tf.shape(y)[2:]], 0)), flat)
        metrics = model.update_metrics_state(
            metrics, batch_output=tff.learning.models.BatchOutput(predictions=predictions), labels=labels
        )
        return s + 1, a_hist, g_hist, metrics, finite

    a0 = tuple(tf.zeros([k, 0, w.shape[0]], w.dtype) for w in kernels)
    g0 = tuple(tf.zeros([k, 0, w.shape[1]], w.dtype) for w in kernels)
    invariants = (
        tf.TensorShape([]),
        tuple(tf.TensorShape([None, None, w.shape[0]]) for w in kernels),
        tuple(tf.TensorShape([None, None, w.shape[1]]) for w in kernels),
        tf.nest.map_structure(lambda t: t.shape, model.initialize_metrics_state()),
        tf.TensorShape([None]),
    )
    _, a_hist, g_hist, metrics, finite = tf.while_loop(
        lambda s, *_: s < steps,
        step,
        (tf.constant(0), a0, g0, model.initialize_metrics_state(), tf.ones([k], tf.bool)),
        shape_invariants=invariants,
    )
    # A non-finite member gives a zero update and weight 0, as TFF's client update does.
    keep = tf.cast(finite, tf.float32)

    def zero_non_finite(hist):
        return tf.cond(
            tf.reduce_all(finite),
            lambda: hist,
            lambda: tuple(tf.where(_per_member(finite, h), h, tf.zeros_like(h)) for h in hist),
        )

    a_hist, g_hist = zero_non_finite(a_hist), zero_non_finite(g_hist)
    if members is not None:
        deltas = []
        for layer in range(n_dense):
            deltas.append(lr * tf.linalg.matmul(a_hist[layer], g_hist[layer], transpose_a=True))
            deltas.append(lr * tf.reduce_sum(g_hist[layer], 1))
        return tuple(deltas), tf.cast(k, tf.float32), metrics, tf.constant(0.0)
    if clip is None:
        member_weights = tf.cast(counts, tf.float32) * keep
    else:
        squares = []
        for layer in range(n_dense):
            a, g = a_hist[layer], g_hist[layer]
            gram_a = tf.linalg.matmul(a, a, transpose_b=True)
            gram_g = tf.linalg.matmul(g, g, transpose_b=True)
            squares.append(tf.reduce_sum(gram_a * gram_g, [1, 2]))
            squares.append(tf.reduce_sum(tf.square(tf.reduce_sum(g, 1)), 1))
        norms = lr * tf.sqrt(tf.maximum(tf.add_n(squares), 0.0))
        member_weights = clip * tf.minimum(1.0 / norms, 1.0 / clip)  # as tf.clip_by_global_norm scales
    total = []
    for layer in range(n_dense):
        a, g = a_hist[layer], g_hist[layer] * _per_member(member_weights, g_hist[layer])
        a_rows, g_rows = tf.reshape(a, [-1, tf.shape(a)[2]]), tf.reshape(g, [-1, tf.shape(g)[2]])
        total.append(lr * tf.linalg.matmul(a_rows, g_rows, transpose_a=True))
        total.append(lr * tf.reduce_sum(g_rows, 0))
    if clip is None:
        return tuple(total), tf.reduce_sum(member_weights), metrics, tf.constant(0.0)
    clipped = tf.reduce_sum(tf.cast(norms > clip, tf.float32) * keep)
    return tuple(total), tf.reduce_sum(keep), metrics, clipped


def _per_member(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """[K] values shaped to broadcast against a [K, ...] tensor."""
    return tf.reshape(values, [-1] + [1] * (len(like.shape) - 1))


class GroupedLearningProcess(tff.learning.templates.LearningProcess):
    """A learning process over groups whose `next` takes the round's real client ids.

    `next(state, client_ids)` packs the ids into groups of at most `group_size` and runs
    the composed process once; `next.type_signature` is the composed one
    (`(<S@SERVER, {str*}@CLIENTS> -> <S@SERVER, M@SERVER>)`). Everything else is the
    composed process's.
    """

    def __init__(self, process: tff.learning.templates.LearningProcess, group_size: int):
        super().__init__(
            process.initialize,
            process.next,
            process.get_model_weights,
            process.set_model_weights,
            get_hparams_fn=process.get_hparams,
            set_hparams_fn=process.set_hparams,
        )
        self._process = process
        self._group_size = group_size
        self._packing_next = _PackingNext(process.next, group_size)

    @property
    def group_size(self) -> int:
        return self._group_size

    def with_group_size(self, group_size: int) -> GroupedLearningProcess:
        """The same computations packing `group_size` real clients a group: nothing is traced again."""
        return GroupedLearningProcess(self._process, group_size)

    @property
    def next(self):
        return self._packing_next


class _PackingNext:
    def __init__(self, computation, group_size: int):
        self._computation = computation
        self._group_size = group_size
        self.type_signature = computation.type_signature

    def __call__(self, state, client_ids: Sequence[str]):
        return with_member_clipped_count(self._computation(state, pack(client_ids, self._group_size)))


def with_member_clipped_count(output):
    """The output with the members' clipped count where the per-client query reports its clipped count.

    Per client, TF Privacy's query counts the updates it clipped
    (`aggregator/dp_query_metrics/clipped_count`, read as `diagnostic/clipped_fraction`);
    a group's members are clipped in the client work, which counts them in
    `client_work/groups/clipped_count`: the same count of real clients, copied there so
    the round's metrics read alike on both paths. A query that reports a count of its
    own keeps it; without DP there is no query, and nothing changes.
    """
    metrics = output.metrics
    query = metrics.get("aggregator", {}).get("dp_query_metrics") if isinstance(metrics, Mapping) else None
    if not isinstance(query, Mapping) or "clipped_count" in query:
        return output
    if "clipped_count" not in metrics["client_work"]["groups"]:  # `MembersFactory`: its query clips, and counts
        return output
    query = collections.OrderedDict(query, clipped_count=metrics["client_work"]["groups"]["clipped_count"])
    aggregator = collections.OrderedDict(metrics["aggregator"], dp_query_metrics=query)
    return output._replace(metrics=collections.OrderedDict(metrics, aggregator=aggregator))


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


def group_size(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> int | None:
    """K for `config.client_batching` with this model (the task's Keras model); None: per client.

    off: None. K: K, if `create_functional_model` can convert the model (`configs` has
    checked the rest). auto: one group per worker, ceil(m / workers), where the model,
    its kind (`AUTO_GROUPS`) and the configuration allow, else None; recurrent models one
    group per core, ceil(m / max(workers, cores)), since a group runs on one op thread
    (module doc). Few large groups
    measured fastest (benchmarks/client_groups.py, 2026-12-05, same runs: W3, 1,000
    linear clients, K=1000 2.42x the per-client rounds against K=100 1.30x; W2, 100 mlp
    clients, K=100 2.24x against K=50 1.83x): each group costs ~75 ms of its own here,
    and a worker runs one op thread per call. Groups
    that send their members' updates (`configs.group_sends_members`) are capped at
    `configs.member_group_limit` (an explicit K over it is refused by `check_model`).

    Raises:
      GroupingError: an explicit K for a model that cannot be converted.
    """
    if config.client_batching == "off":
        return None
    reason = functional_obstacle(keras_model)
    explicit = configs.client_group_size(config)
    if explicit is not None:
        if reason is not None:  # `program.check` says so before any data is generated
            raise GroupingError(f"client_batching={explicit} cannot run: model {config.model}: {reason}")
        return explicit
    if auto_obstacle(config, keras_model) is not None:
        return None
    workers = len(config.runtime.workers) or config.runtime.local_workers
    groups = max(workers, os.cpu_count() or 1) if model_kind(keras_model) in _ONE_GROUP_PER_CORE else workers
    k = max(1, -(-config.clients_per_round // groups))
    if not configs.group_sends_members(config.dp):
        return k
    return min(k, configs.member_group_limit(config, models.weight_bytes(keras_model.trainable_weights)) or k)


def auto_obstacle(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> str | None:
    """Why `client_batching=auto` trains this configuration and model per client, or None: it groups.

    In this order: the aggregation needs each real client's own update
    (`configs.per_client_reason`), the configuration has no grouped path
    (`configs.client_batching_obstacle`), the model cannot be converted
    (`functional_obstacle`), or its kind measured slower in groups (`AUTO_GROUPS`).
    `group_size` groups exactly when this is None, and `auto_note` says it.
    """
    reason = configs.per_client_reason(config) or configs.client_batching_obstacle(config)
    if reason is not None:
        return reason
    reason = functional_obstacle(keras_model)
    if reason is not None:
        return f"model {config.model}: {reason}"
    kind = model_kind(keras_model)
    if not AUTO_GROUPS[kind]:
        return f"model {config.model} is {kind}, and {kind} models measured no faster in groups than per client"
    return None


def auto_note(config: configs.ExperimentConfig, process, keras_model_fn: Callable[[], tf.keras.Model]) -> str | None:
    """Under `client_batching=auto`, why `process` trains per client, in one line; None if it groups.

    `process` is what `algorithms.build_learning_process` built for `config`; the reason
    is `auto_obstacle`'s, the one `group_size` decided by. `keras_model_fn` builds the
    task's Keras model, called only when the configuration alone does not say why.
    """
    if config.client_batching != "auto" or isinstance(process, GroupedLearningProcess):
        return None
    reason = configs.per_client_reason(config) or configs.client_batching_obstacle(config)
    reason = reason or auto_obstacle(config, keras_model_fn())
    return f"client_batching=auto runs per client: {reason}"


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


def shared_obstacle(config: configs.ExperimentConfig, keras_model: tf.keras.Model) -> str | None:
    """Why `build_learning_process` does not step a group's members together on the shared weights, or None.

    That path (`train_members_shared`) runs plain SGD steps of a Flatten/Dense stack
    (`dense_activations`): FedAvg's client work, which the server-optimizer variants
    share; FedProx adds a proximal term and FedSGD takes no step, and the audit's
    canaries replace a member's own result, so those run their members one after the
    other. So do ReLU stacks (`mlp`), by measurement: their pre-activations are summed in
    another order than per client, and one within rounding of 0 now and then takes the
    other side (W2, mlp, 100 clients: 2.2e-05 relative after a benchmark's last round,
    ~1e-7 in three rounds compared one by one; the member loop gives the per-client
    weights bit for bit), and under
    TFF's worker the shared path measured no faster there (W2 CPU 0.30 against 0.34 s
    a round, wall 1.99x against 2.75x the per-client rounds in the same run, module doc).
    """
    activations = dense_activations(keras_model)
    if activations is None:
        return "not a stack of Flatten and Dense layers"
    if any(a is tf.nn.relu for a in activations):
        return "ReLU units can flip within float rounding (measured; see shared_obstacle)"
    if config.algorithm.algorithm in (configs.Algorithm.FEDPROX, configs.Algorithm.FEDSGD):
        return f"{config.algorithm.algorithm.value} is not plain SGD steps"
    if config.privacy.canaries:
        return "canaries replace a member's own update"
    return None


def _dense_forward(task: base.Task):
    with models.seeds_kept():
        return create_dense_forward(task.create_keras_model())
