"""The DP aggregation of groups: the fixed-clip query over preclipped group sums
(`PreclippedGaussianSumQuery`), the per-member query (`GroupedQuery`) and its factory
(`MembersFactory`), and `build_factory`, which picks one. Why the sensitivity is the
per-client one: the package docstring (`tffpipe/client_groups/__init__.py`).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.aggregators import robust

from tffpipe import accounting, aggregation, configs
from tffpipe.client_groups.packing import GroupingError, _per_member


class PreclippedGaussianSumQuery(aggregation.SeededGaussianSumQuery):
    """The seeded Gaussian sum query over records already clipped per real client.

    Each record is a group's sum of member updates, each member clipped to
    `l2_norm_clip` in the client work; the record is summed as it is (see the package
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
