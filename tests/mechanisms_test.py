"""The distributed discrete Gaussian spec: TFF's factory, run on the C++ worker, against the plan."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from tffpipe import accounting, aggregation, configs, mechanisms, runtime

M = configs.Mechanism


def _plan(noise_multiplier: float, clients_per_round: int, dim: int, bits: int = 16, clip: float = 1.0, **kwargs):
    return accounting.PrivacyPlan(
        M.DISTRIBUTED,
        noise_multiplier,
        clients_per_round,
        100,
        configs.Sampling.POISSON,
        1e-5,
        clip=clip,
        bits=bits,
        dimension=dim,
        **kwargs,
    )


def _process(plan: accounting.PrivacyPlan):
    dp = configs.DpConfig(mechanism=M.DISTRIBUTED, clip=plan.clip, bits=plan.bits)
    factory = aggregation.build_factory(dp, plan, noise_seed=0)
    return factory.create(tff.TensorType(np.float32, [plan.dimension]))


def test_without_noise_the_mean_is_within_the_rounding_bound_of_the_exact_mean(tff_context):
    plan = _plan(0.0, clients_per_round=3, dim=50, bits=12)
    rng = np.random.default_rng(0)
    updates = [(0.9 * v / np.linalg.norm(v)).astype(np.float32) for v in rng.normal(size=(3, 50))]  # norms 0.9 < C
    process = _process(plan)
    output = process.next(process.initialize(), updates)
    params = plan.distributed()
    measured = output.measurements["mean_value"]
    # The plan derives TFF's scale (float32 there): the accountant and the factory agree.
    assert float(measured["scale_factor"]) == pytest.approx(params.scale, rel=1e-5)
    assert int(measured["padded_dim"]) == params.padded_dimension == 50
    # Stochastic rounding moves each rotated, scaled coordinate by less than 1, so each client's
    # error has L2 norm < sqrt(d) in scaled units; rotation keeps norms; the mean of 3 errors
    # is then below sqrt(d) / scale = sqrt(50) / scale in the update's units.
    error = np.linalg.norm(output.result - np.mean(updates, axis=0))
    bound = math.sqrt(params.padded_dimension) / params.scale
    assert 0 < error <= bound
    assert int(measured["actual_num_clients"]) == 3


@pytest.mark.parametrize(
    "clients, noise",
    [(4, configs.DistributedNoise.DISCRETE_GAUSSIAN), (2, configs.DistributedNoise.DISCRETE_GAUSSIAN)]
    + [(2, configs.DistributedNoise.SKELLAM)],
)
def test_noise_rms_is_z_c_scaled_by_the_clients_that_took_part(tff_context, clients, noise):
    z, clip, m, dim = 1.0, 0.5, 4, 20_000
    plan = _plan(z, clients_per_round=m, dim=dim, bits=20, clip=clip, distributed_noise=noise)
    process = _process(plan)
    # TF Privacy's Skellam query keeps an L1 bound in its state, the discrete Gaussian's does not.
    skellam = "l1_norm_bound" in str(process.initialize.type_signature.result)
    assert skellam == (noise is configs.DistributedNoise.SKELLAM)
    output = process.next(process.initialize(), [np.zeros(dim, np.float32)] * clients)
    # Zeros round to zeros: the sum is the noise alone, n shares of std z*C/sqrt(m) each,
    # i.e. z*C*sqrt(n/m) on each coordinate (0.5 with 4 of 4 clients, 0.354 with 2 of 4).
    expected_on_sum = z * clip * math.sqrt(clients / m)
    rms = float(np.sqrt(np.mean(np.square(output.result * clients))))  # the mean divides the sum by n
    assert rms == pytest.approx(expected_on_sum, rel=0.10)
    metrics = aggregation.round_metrics(plan, output.measurements, clients)
    assert metrics["privacy/noised_clients"] == clients
    assert metrics["privacy/noise_stddev"] == pytest.approx(expected_on_sum / clients, rel=1e-4)


def test_bytes_up_are_bits_per_padded_coordinate():
    plan = _plan(1.0, clients_per_round=10, dim=48_671, bits=16)
    # 48,671 coordinates pad to 48,672 (the DFT pairs them): 48,672 * 16 bits = 97,344 bytes, + 3 one-bit counts.
    assert aggregation.upload_bytes([], False, plan=plan) == 97_347
    assert mechanisms.SPECS[M.DISTRIBUTED].upload_bytes([], plan) == 97_347


def test_two_workers_give_the_one_worker_mean_within_the_rounding_bound(tff_context):
    # TFF's mergeable context: each worker sums its clients' rounded shares, the sums are
    # merged here and the modulus applied once. Without noise both means are within
    # sqrt(d)/scale of the exact mean (see above), so within twice that of each other.
    plan = _plan(0.0, clients_per_round=4, dim=50, bits=12)
    process = _process(plan)
    rng = np.random.default_rng(1)
    updates = [(0.9 * v / np.linalg.norm(v)).astype(np.float32) for v in rng.normal(size=(4, 50))]
    context = context_stack_impl.context_stack.current
    results = []
    for count in (1, 2):
        workers = runtime.create(local_workers=count).start()
        try:
            results.append(process.next(process.initialize(), updates))
        finally:
            workers.stop()
            context_stack_impl.context_stack.set_default_context(context)
    one, two = results
    bound = math.sqrt(plan.distributed().padded_dimension) / plan.distributed().scale
    assert np.linalg.norm(one.result - two.result) <= 2 * bound
    assert np.linalg.norm(two.result - np.mean(updates, axis=0)) <= bound
    assert int(one.measurements["mean_value"]["actual_num_clients"]) == 4
    assert int(two.measurements["mean_value"]["actual_num_clients"]) == 4


def test_secure_aggregation_is_the_weighted_mean_of_clipped_updates(tff_context):
    plan = accounting.PrivacyPlan(M.NONE, 0.0, 2, 100, configs.Sampling.UNIFORM, 1e-5)
    factory = aggregation.build_factory(configs.DpConfig(M.NONE), plan, noise_seed=0, secure_aggregation=True)
    process = factory.create(tff.TensorType(np.float32, [2]), tff.TensorType(np.float32))
    updates = [np.array([0.3, 0.4], np.float32), np.array([3.0, 4.0], np.float32)]
    output = process.next(process.initialize(), updates, [1.0, 3.0])
    # TFF's adaptive clip starts at 1: [3, 4] (norm 5) becomes [0.6, 0.8], [0.3, 0.4] (norm 0.5) stays.
    # Weighted by 1 and 3: ([0.3, 0.4] + 3 * [0.6, 0.8]) / 4 = [0.525, 0.7], up to 32-bit quantization
    # of the secure sum's range [-100, 100] (a step of 200 / 2^32 = 5e-8).
    np.testing.assert_allclose(output.result, [0.525, 0.7], atol=1e-6)
    metrics = aggregation.round_metrics(plan, output.measurements, 2, secure_aggregation=True)
    assert metrics["secure/clipped_clients"] == 1 and metrics["secure/zeroed_clients"] == 0
    assert metrics["secure/sum_bound"] == 100.0 and metrics["secure/sum_bound_clipped_clients"] == 0
    # 4 bytes per coordinate (32-bit integers) and 3 for the 20-bit weight.
    specs = [tf.TensorSpec([784, 10]), tf.TensorSpec([10])]
    assert aggregation.upload_bytes(specs, False, plan=plan, secure_aggregation=True) == 4 * 7850 + 3
