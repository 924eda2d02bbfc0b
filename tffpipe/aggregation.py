"""Differentially private aggregators: the only module that knows the DP mechanism.

TFF's DP factories are *unweighted*: every client's clipped update counts the same,
whatever its number of examples. That is what bounds one client's influence (the
sensitivity) by the clip C; weighting by example count would let a client with many
examples move the average by more than C/m. So DP runs build the unweighted process.
"""

from __future__ import annotations

import collections
import dataclasses

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from tffpipe import accounting

Mechanism = accounting.Mechanism


@dataclasses.dataclass(frozen=True)
class DpConfig:
    """The aggregation mechanism and its parameters.

    Attributes:
      mechanism: none, fixed (Gaussian, fixed clip), adaptive (Andrew et al. 2021), or
        tree (DP-FTRL tree aggregation, Kairouz et al. 2021).
      noise_multiplier: z; the noise std on the clipped sum is z * C.
      clip: C, the L2 clip (fixed, tree) or the initial clip (adaptive).
      target_quantile: adaptive: the fraction of updates that should fall under the clip.
      clip_learning_rate: adaptive: geometric step of the clip towards the quantile.
      zeroing_norm: if > 0, updates with a larger L-inf norm are zeroed before
        clipping (robustness to corrupt devices; privacy unchanged).
      noise_seed: seeds the noise of the fixed and tree mechanisms (kept in their
        state, so a resumed run adds the same noise). Adaptive clipping uses TF
        Privacy's unseeded noise: its resumed runs match in distribution only.
    """

    mechanism: Mechanism = Mechanism.NONE
    noise_multiplier: float = 0.0
    clip: float = 1.0
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    zeroing_norm: float = 0.0
    noise_seed: int = 0

    def __post_init__(self):
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.clip <= 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if self.clip_learning_rate <= 0:
            raise ValueError(f"clip_learning_rate must be positive, got {self.clip_learning_rate}")
        if self.zeroing_norm < 0:
            raise ValueError(f"zeroing_norm must be >= 0 (0: off), got {self.zeroing_norm}")
        if self.mechanism is Mechanism.NONE and self.noise_multiplier > 0:
            raise ValueError("noise_multiplier > 0 needs a DP mechanism (fixed, adaptive or tree), got none")

    @property
    def is_private(self) -> bool:
        return self.mechanism is not Mechanism.NONE


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


def validate(config: DpConfig, clients_per_round: int) -> None:
    """Fails early, with the fix, where TFF would fail deep inside the build."""
    if config.mechanism is Mechanism.ADAPTIVE:
        accounting.adaptive_noise_split(config.noise_multiplier, clients_per_round)


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


def build_factory(config: DpConfig, clients_per_round: int, *, compression: bool = False):
    """Returns the TFF aggregation factory for `config`, or None for TFF's default weighted mean.

    Args:
      config: the mechanism.
      clients_per_round: m, the expected number of clients; the mean divides by it.
      compression: TFF's compression aggregator (weighted mean of 8-bit quantized
        updates). Not combined with DP: quantizing a clipped update can raise its norm
        above the clip, which the accounting would not cover.
    """
    validate(config, clients_per_round)
    z, m = config.noise_multiplier, float(clients_per_round)
    if compression:
        if config.is_private:
            raise ValueError(
                "compression is not combined with DP aggregation (quantization after clipping can exceed the clip); "
                "use --dp=none with --compression"
            )
        return tff.learning.compression_aggregator(zeroing=False, clipping=False, weighted=True)
    if config.mechanism is Mechanism.NONE:
        return None
    if config.mechanism is Mechanism.FIXED:
        # As TFF's gaussian_fixed (a normalized Gaussian sum query), with seeded noise.
        query = tfp.NormalizedQuery(SeededGaussianSumQuery(config.clip, z * config.clip, config.noise_seed), m)
        factory = tff.aggregators.DifferentiallyPrivateFactory(query)
    elif config.mechanism is Mechanism.ADAPTIVE:
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            z,
            m,
            initial_l2_norm_clip=config.clip,
            target_unclipped_quantile=config.target_quantile,
            learning_rate=config.clip_learning_rate,
        )
    else:
        factory = TreeFactory(z, m, config.clip, config.noise_seed)
    if config.zeroing_norm > 0:
        factory = tff.aggregators.zeroing_factory(config.zeroing_norm, factory)
    return factory


def noise_stddev_of_mean(config: DpConfig, clients_per_round: int, clip: float) -> float:
    """Std of the Gaussian noise on each coordinate of the averaged update: z_v * C / m."""
    if not config.is_private or config.noise_multiplier == 0:
        return 0.0
    z = config.noise_multiplier
    if config.mechanism is Mechanism.ADAPTIVE:
        z, _ = accounting.adaptive_noise_split(z, clients_per_round)
    return z * clip / clients_per_round
