"""One spec per mechanism: what a DP mechanism brings to a run, in one place.

A spec holds the TFF factory the mechanism aggregates with, the compilation step its
intrinsics need (part of the factory it builds, so every execution context runs it
untouched), its per-round metrics and the bytes a client uploads. `aggregation` looks
a mechanism up here before its own central-DP queries. The layers below TensorFlow
hold the rest of a mechanism: its rules in `configs` (checked before any data is
generated) and its DpEvent and accountant in `accounting`.

The distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation") is the
first: each client clips, rotates, scales and rounds its update, adds its own share of
discrete Gaussian noise, and only the modular sum is revealed. Here the secure sum is
simulated as a plain modular sum: a run shows the mechanism's utility and epsilon,
not its security.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import distributed_dp
from tensorflow_federated.python.core.backends.test import compiler as test_compiler
from tensorflow_federated.python.core.impl.compiler import transformations
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from tffpipe import accounting, configs

Mechanism = configs.Mechanism


@dataclasses.dataclass(frozen=True)
class MechanismSpec:
    """What one mechanism brings to a run.

    Attributes:
      build_factory: (dp, plan, noise_seed) -> the TFF aggregation factory.
      round_metrics: (plan, measurements, clients) -> the round's `privacy/...` metrics;
        `privacy/noised_clients`, when present, is the count of clients whose noise
        the round summed, which the accountant composes the round with.
      upload_bytes: (record specs, plan) -> bytes one client uploads.
    """

    build_factory: Callable[[configs.DpConfig, accounting.PrivacyPlan, int], Any]
    round_metrics: Callable[[accounting.PrivacyPlan, Mapping[str, Any], int], dict[str, float]]
    upload_bytes: Callable[[Any, accounting.PrivacyPlan], int]


def simulated_secure(comp: tff.Computation) -> tff.Computation:
    """`comp` with its secure sums as plain (modular) sums, in call-dominant form.

    TFF's C++ worker has no secure intrinsics ("Cannot embed a federated value"). TFF's
    test backend rewrites them (`replace_secure_intrinsics_with_bodies`,
    core/backends/test/compiler.py) into `federated_aggregate`s with the same arithmetic:
    each client's bound asserted, the modulus applied to the sum. Call-dominant form
    (TFF's `to_call_dominant`) then flattens the nested aggregators: FedAvg with the
    distributed aggregator serializes 107 levels deep, past upb's limit of 100
    ("DecodeError: Error parsing message"). The type signature is kept as it was, so
    the rewritten process composes like the original.
    """
    insecure = test_compiler.replace_secure_intrinsics_with_bodies(comp)
    block = transformations.to_call_dominant(insecure.to_building_block())
    return computation_impl.ConcreteComputation(
        computation_proto=block.proto,
        context_stack=context_stack_impl.context_stack,
        annotated_type=comp.type_signature,
    )


def _simulated_process(process: tff.templates.AggregationProcess) -> tff.templates.AggregationProcess:
    return tff.templates.AggregationProcess(simulated_secure(process.initialize), simulated_secure(process.next))


class SimulatedSecureFactory(tff.aggregators.UnweightedAggregationFactory):
    """An unweighted factory whose processes run on TFF's C++ worker (`simulated_secure`)."""

    def __init__(self, inner: tff.aggregators.UnweightedAggregationFactory):
        self._inner = inner

    def create(self, value_type) -> tff.templates.AggregationProcess:
        return _simulated_process(self._inner.create(value_type))


class SimulatedSecureWeightedFactory(tff.aggregators.WeightedAggregationFactory):
    """A weighted factory whose processes run on TFF's C++ worker (`simulated_secure`)."""

    def __init__(self, inner: tff.aggregators.WeightedAggregationFactory):
        self._inner = inner

    def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
        return _simulated_process(self._inner.create(value_type, weight_type))


def build_distributed_factory(
    dp: configs.DpConfig, plan: accounting.PrivacyPlan, noise_seed: int
) -> tff.aggregators.UnweightedAggregationFactory:
    """The distributed discrete Gaussian mean, from TFF's `DistributedDpSumFactory`.

    `(<S@SERVER, {float32[d]}@CLIENTS> -> <S@SERVER, float32[d]@SERVER, M@SERVER>)`: each
    client clips its update to C, rotates it (randomized DFT), scales and rounds it to
    integers, adds a discrete Gaussian share of std z*C*scale/sqrt(m), and the sum modulo
    2^bits is mapped back and divided by the count of clients, itself a secure sum of
    ones (TFF's `UnweightedMeanFactory`). TFF's defaults otherwise (rotation,
    unconditional rounding), with the wrap probability `accounting` plans with; Skellam
    shares instead (Agarwal, Kairouz, Liu 2021) with `distributed_noise`. The
    noise comes from TFF's unseeded ops: `noise_seed` cannot replay it, so a resumed run
    matches an uninterrupted one in distribution only.
    """
    del noise_seed
    ddp = distributed_dp.DistributedDpSumFactory(
        noise_multiplier=plan.noise_multiplier,
        expected_clients_per_round=plan.clients_per_round,
        bits=plan.bits,
        l2_clip=dp.clip,
        modclip_prob=accounting.DISTRIBUTED_MODCLIP_PROB,
        mechanism="distributed_skellam" if plan.distributed().skellam else "distributed_dgauss",
    )
    mean = tff.aggregators.UnweightedMeanFactory(
        value_sum_factory=ddp, count_sum_factory=tff.aggregators.SecureSumFactory(1, 0)
    )
    return SimulatedSecureFactory(mean)


def distributed_round_metrics(
    plan: accounting.PrivacyPlan, measurements: Mapping[str, Any], clients: int
) -> dict[str, float]:
    """The distributed mechanism's metrics, read from TFF's measurements.

    `privacy/noised_clients`: n, the secure count of clients whose shares were summed;
    `privacy/clip`; `privacy/noise_stddev`: the std of the noise on each coordinate of
    the averaged update, z*C*sqrt(n/m)/n (the shares are sized for m; the mean divides by
    n), in distribution, as the noise is never seen apart from the updates;
    `privacy/scale_factor`: the scale before rounding.
    """
    del clients  # the secure count is what was noised
    values = measurements["mean_value"]
    n = int(values["actual_num_clients"])
    scale = float(values["scale_factor"])
    noise_on_sum = float(values["scaled_local_stddev"]) * math.sqrt(n) / scale
    return {
        "privacy/noise_multiplier": plan.noise_multiplier,
        "privacy/clip": float(values["l2_clip"]),
        "privacy/noise_stddev": noise_on_sum / n if n else 0.0,
        "privacy/noised_clients": float(n),
        "privacy/scale_factor": scale,
    }


def distributed_upload_bytes(record_specs, plan: accounting.PrivacyPlan) -> int:
    """`bits` per coordinate of the padded update, and a byte for each of its three 1-bit secure counts.

    The counts: clients (the mean's denominator), clipped clients and noised clients.
    """
    del record_specs  # the plan's dimension is the model's trainable parameters
    return -(-plan.distributed().padded_dimension * plan.bits // 8) + 3


def _drop_unused_assert_reports(record: logging.LogRecord) -> bool:
    """Drops TF's "Object was never used" reports (12 lines each) about TFF's own unused asserts.

    TFF's secure quantized sum builds `assert_less_equal` ops it never runs; when they are
    garbage collected TF logs one report for each at ERROR level, about 200 lines that
    are no error of the run.
    """
    return "Object was never used" not in record.getMessage()


def build_secure_aggregation_factory(
    dp: configs.DpConfig, plan: accounting.PrivacyPlan, noise_seed: int
) -> tff.aggregators.WeightedAggregationFactory:
    """TFF's `secure_aggregator`: the weighted mean summed securely (Bonawitz et al. 2017), no DP.

    Each client's update is zeroed past an adaptive L-inf bound, clipped to an adaptive
    L2 norm (the 0.95 quantile of norms, estimated with secure sums), clipped to the
    secure sum's adaptive range and quantized to 32-bit integers, then securely summed
    with its weight (examples, 20 bits).
    """
    del dp, plan, noise_seed
    logging.getLogger("tensorflow").addFilter(_drop_unused_assert_reports)
    return SimulatedSecureWeightedFactory(tff.learning.secure_aggregator(zeroing=True, clipping=True, weighted=True))


def secure_aggregation_metrics(
    plan: accounting.PrivacyPlan, measurements: Mapping[str, Any], clients: int
) -> dict[str, float]:
    """`secure/...`: the adaptive zeroing and clipping norms with the clients they caught, and
    the secure sum's range with the clients clipped to it (counts summed securely, not private)."""
    del plan, clients
    clipping = measurements["zeroing"]  # each wrapper nests the measurements of the one inside
    value = clipping["clipping"]["mean_value"]
    return {
        "secure/zeroing_norm": float(measurements["zeroing_norm"]),
        "secure/zeroed_clients": float(measurements["zeroed_count"]),
        "secure/clip": float(clipping["clipping_norm"]),
        "secure/clipped_clients": float(clipping["clipped_count"]),
        "secure/sum_bound": float(value["secure_upper_threshold"]),
        "secure/sum_bound_clipped_clients": float(value["secure_upper_clipped_count"])
        + float(value["secure_lower_clipped_count"]),
    }


def secure_aggregation_upload_bytes(record_specs, plan: accounting.PrivacyPlan) -> int:
    """32 bits per coordinate and 20 for the weight; the 1-bit secure counts (a few bytes) are left out."""
    del plan
    return sum(4 * math.prod(spec.shape) for spec in tf.nest.flatten(record_specs)) + 3


SECURE_AGGREGATION = MechanismSpec(
    build_factory=build_secure_aggregation_factory,
    round_metrics=secure_aggregation_metrics,
    upload_bytes=secure_aggregation_upload_bytes,
)


def spec_for(plan: accounting.PrivacyPlan, *, secure_aggregation: bool = False) -> MechanismSpec | None:
    """The spec of the plan's mechanism, or of secure aggregation without DP; None: `aggregation`'s own."""
    if secure_aggregation:
        return SECURE_AGGREGATION
    return SPECS.get(plan.mechanism)


SPECS: Mapping[Mechanism, MechanismSpec] = {
    Mechanism.DISTRIBUTED: MechanismSpec(
        build_factory=build_distributed_factory,
        round_metrics=distributed_round_metrics,
        upload_bytes=distributed_upload_bytes,
    ),
}
