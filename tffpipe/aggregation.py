"""Differentially private aggregators: the only module that knows the DP mechanism.

TFF's DP factories are *unweighted*: every client's clipped update counts the same,
whatever its number of examples. That is what bounds one client's influence (the
sensitivity) by the clip C; weighting by example count would let a client with many
examples move the average by more than C/m. So DP runs build the unweighted process.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from tffpipe import accounting, configs

Mechanism = configs.Mechanism


class SeededGaussianSumQuery(tfp.GaussianSumQuery):
    """TF Privacy's Gaussian sum query with seeded noise and a count of clipped updates.

    TF Privacy draws the noise from an unseeded op, so a run resumed from a
    checkpoint cannot replay the noise an uninterrupted run would have added. Here the
    noise is `stateless_normal` under a seed kept in the query state (checkpointed
    with the rest), advanced once per round. The mechanism is unchanged: clip each
    update to L2 norm C, sum, add N(0, (z*C)^2) per coordinate.

    The state also carries how many updates were clipped in the last round. That
    count is *not* privatized: it is released as a labelled diagnostic only.
    """

    _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", "seed", "clipped_count"])

    def __init__(self, l2_norm_clip: float, stddev: float, seed: int):
        super().__init__(l2_norm_clip, stddev)
        self._seed = seed

    def make_global_state(self, l2_norm_clip, stddev, seed=None, clipped_count=0.0):
        seed = tf.constant([self._seed, 0], tf.int64) if seed is None else seed
        return self._GlobalState(
            tf.cast(l2_norm_clip, tf.float32), tf.cast(stddev, tf.float32), seed, tf.cast(clipped_count, tf.float32)
        )

    def initial_sample_state(self, template=None):
        return super().initial_sample_state(template), tf.constant(0.0)

    def preprocess_record(self, params, record):
        clipped, norm = self.preprocess_record_impl(params, record)
        return clipped, tf.cast(norm > params, tf.float32)

    def get_noised_result(self, sample_state, global_state):
        total, clipped_count = sample_state
        flat = tf.nest.flatten(total)
        noised = [
            v
            + tf.random.stateless_normal(
                tf.shape(v),
                seed=tf.random.experimental.stateless_fold_in(global_state.seed, i),
                stddev=global_state.stddev,
                dtype=v.dtype,
            )
            for i, v in enumerate(flat)
        ]
        new_state = global_state._replace(
            seed=global_state.seed + tf.constant([0, 1], tf.int64), clipped_count=clipped_count
        )
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return tf.nest.pack_sequence_as(total, noised), new_state, event

    def derive_metrics(self, global_state):
        return collections.OrderedDict(clip=global_state.l2_norm_clip, clipped_count=global_state.clipped_count)


class TreeFactory(tff.aggregators.UnweightedAggregationFactory):
    """TFF's DP-FTRL tree aggregation, with its noise shaped like the updates it gets.

    `DifferentiallyPrivateFactory.tree_aggregation` takes the update's TensorSpecs up
    front and `tf.nest` then demands the same containers as the updates: lists from
    Keras-wrapped models, tuples from functional ones. Building it at `create`, from the
    value type TFF passes in, fits both.
    """

    def __init__(self, noise_multiplier: float, clients_per_round: float, clip: float, noise_seed: int | None):
        self._args = (noise_multiplier, clients_per_round, clip)
        self._noise_seed = noise_seed

    def create(self, value_type) -> tff.templates.AggregationProcess:
        specs = tff.types.type_to_tf_tensor_specs(value_type)
        factory = tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
            *self._args, specs, noise_seed=self._noise_seed
        )
        return factory.create(value_type)


# TFF's compression aggregator: 8-bit uniform quantization of tensors above 20,000 elements.
COMPRESSION_BITS = 8
COMPRESSION_THRESHOLD = 20_000


def upload_bytes(record_specs, compression: bool) -> int:
    """Bytes one client uploads: float32 per weight, or 8 bits (+ min and max) for big tensors."""
    total = 0
    for spec in tf.nest.flatten(record_specs):
        size = int(np.prod(spec.shape))
        if compression and size > COMPRESSION_THRESHOLD:
            total += -(-size * COMPRESSION_BITS // 8) + 8
        else:
            total += 4 * size
    return total


def build_factory(
    dp: configs.DpConfig, plan: accounting.PrivacyPlan, *, noise_seed: int, compression: bool = False
) -> tff.aggregators.UnweightedAggregationFactory | tff.aggregators.WeightedAggregationFactory | None:
    """The TFF aggregation factory of the plan, or None for TFF's default weighted mean.

    Args:
      dp: clip, adaptive-clipping and zeroing parameters.
      plan: the mechanism, z (as given or solved for a target epsilon) and m, the
        expected clients per round, which the mean divides by.
      noise_seed: seeds the noise of the fixed and tree mechanisms; it is kept in their
        state, so a resumed run adds the same noise. Adaptive clipping uses TF Privacy's
        unseeded noise: its resumed runs match in distribution only.
      compression: TFF's compression aggregator (weighted mean of 8-bit quantized
        updates). `configs` refuses it with DP: quantizing a clipped update can raise
        its norm above the clip, which the accounting would not cover.
    """
    z, m = plan.noise_multiplier, float(plan.clients_per_round)
    if compression:
        return tff.learning.compression_aggregator(zeroing=False, clipping=False, weighted=True)
    if plan.mechanism is Mechanism.NONE:
        return None
    if plan.mechanism is Mechanism.FIXED:
        # As TFF's gaussian_fixed (a normalized Gaussian sum query), with seeded noise.
        query = tfp.NormalizedQuery(SeededGaussianSumQuery(dp.clip, z * dp.clip, noise_seed), m)
        factory = tff.aggregators.DifferentiallyPrivateFactory(query)
    elif plan.mechanism is Mechanism.ADAPTIVE:
        accounting.adaptive_noise_split(z, m)  # TFF fails deep inside the build where this says why
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            z,
            m,
            initial_l2_norm_clip=dp.clip,
            target_unclipped_quantile=dp.target_quantile,
            learning_rate=dp.clip_learning_rate,
        )
    else:
        factory = TreeFactory(z, m, dp.clip, noise_seed)
    if dp.zeroing_norm > 0:
        factory = tff.aggregators.zeroing_factory(dp.zeroing_norm, factory)
    return factory


def round_metrics(
    plan: accounting.PrivacyPlan, dp: configs.DpConfig, measurements: Mapping[str, Any], clients: int
) -> dict[str, float]:
    """The mechanism's per-round metrics from the aggregator's measurements.

    `privacy/noise_multiplier`, `privacy/clip` (after the round: adaptive clipping
    moves it), `privacy/noise_stddev` (std of the noise on each coordinate of the
    averaged update, z_v * C / m) and, with fixed clipping, `diagnostic/clipped_fraction`:
    a count that is *not* privatized, for the operator only, never part of the release.
    """
    if not plan.is_private:
        return {}
    if "zeroing" in measurements:  # zeroing_factory nests the inner aggregator's measurements
        measurements = measurements["zeroing"]
    query = measurements.get("dp_query_metrics", {})
    clip = float(query.get("clip", query.get("tree_agg_dpftrl_clip", dp.clip)))
    metrics = {
        "privacy/noise_multiplier": plan.noise_multiplier,
        "privacy/clip": clip,
        "privacy/noise_stddev": plan.value_noise_multiplier * clip / plan.clients_per_round,
    }
    if "clipped_count" in query and clients:
        metrics["diagnostic/clipped_fraction"] = float(query["clipped_count"]) / clients
    return metrics
