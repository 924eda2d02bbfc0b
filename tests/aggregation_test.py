import numpy as np
import pytest
import tensorflow_federated as tff

from tests import conftest
from tffpipe import accounting, aggregation, configs

M = configs.Mechanism


def _process(mechanism, z: float, m: int, dim: int, *, noise_seed: int = 0, **dp):
    factory = conftest.dp_factory(mechanism, z, m, noise_seed=noise_seed, **dp)
    return factory.create(tff.TensorType(np.float32, [dim]))


def test_clipped_mean_without_noise_on_hand_made_updates(tff_context):
    process = _process(M.FIXED, 0.0, m=2, dim=2, clip=1.0)
    # a = [3, 4] has norm 5 -> clipped to [0.6, 0.8]; b = [0.3, 0.4] has norm 0.5 -> unchanged.
    # Unweighted mean over m = 2: ([0.6, 0.8] + [0.3, 0.4]) / 2 = [0.45, 0.6].
    output = process.next(process.initialize(), [np.array([3.0, 4.0], np.float32), np.array([0.3, 0.4], np.float32)])
    np.testing.assert_allclose(output.result, [0.45, 0.6], rtol=1e-6)
    metrics = output.measurements["dp_query_metrics"]
    assert metrics["clip"] == 1.0
    assert metrics["clipped_count"] == 1.0  # only a was clipped


def test_noise_std_on_the_mean_is_z_c_over_m(tff_context):
    z, clip, m, dim = 1.0, 2.0, 10, 20_000
    process = _process(M.FIXED, z, m=m, dim=dim, noise_seed=3, clip=clip)
    output = process.next(process.initialize(), [np.zeros(dim, np.float32)] * m)
    expected = z * clip / m  # 0.2
    reported = aggregation.round_metrics(conftest.plan(M.FIXED, z, m), output.measurements, clients=m)
    assert reported["privacy/clip"] == clip
    # The sample std of 20,000 Gaussians is within 3% of the true one with overwhelming probability.
    assert reported["privacy/noise_stddev"] == pytest.approx(expected, rel=0.03)
    assert np.std(output.result) == pytest.approx(expected, rel=0.03)
    assert abs(np.mean(output.result)) < 4 * expected / np.sqrt(dim)


@pytest.mark.parametrize("mechanism", [M.FIXED, M.ADAPTIVE, M.TREE], ids=lambda m: m.value)
def test_the_reported_noise_is_the_noise_added_in_each_round(mechanism, tff_context):
    # No client moves anything, so the round's output is the added noise over m, and its
    # root mean square is the std that round really had.
    z, clip, m, dim = 1.0, 2.0, 20, 20_000
    dp = {"clip_learning_rate": 1.0} if mechanism is M.ADAPTIVE else {}
    process = _process(mechanism, z, m=m, dim=dim, noise_seed=5, clip=clip, **dp)
    plan = conftest.plan(mechanism, z, m, population=1000)
    state, clip_before, added, reported = process.initialize(), clip, [], []
    for _ in range(4):
        output = process.next(state, [np.zeros(dim, np.float32)] * m)
        state = output.state
        metrics = aggregation.round_metrics(plan, output.measurements, clients=m)
        added.append(float(np.sqrt(np.mean(np.square(output.result)))))
        reported.append(metrics["privacy/noise_stddev"])
        # In distribution: z_v * (the clip the round used) / m; adaptive clipping shrinks
        # the clip after each round (every norm, 0, is below it), the next round's noise with it.
        if mechanism is not M.TREE:
            assert added[-1] == pytest.approx(plan.value_noise_multiplier * clip_before / m, rel=0.03)
        clip_before = metrics["privacy/clip"]
    np.testing.assert_allclose(reported, added, rtol=1e-4)
    if mechanism is M.ADAPTIVE:
        assert added[3] < 0.5 * added[0]  # the clip moved: a constant z*C/m could not match
    if mechanism is M.TREE:
        # Round 1 is one tree leaf, std z*C on the sum; the efficient tree's later residuals
        # (differences of two noised prefix sums) have other stds: about 1.17 z*C/m at round 4.
        assert added[0] == pytest.approx(z * clip / m, rel=0.03)
        assert added[3] > 1.1 * added[0]


@pytest.mark.parametrize(
    "mechanism, query",
    [
        (M.FIXED, {"clip": 1.0}),  # no noise measured
        (M.FIXED, {"noise_stddev": 0.5}),  # no clip
        (M.TREE, {"clip": 1.0, "noise_stddev": 0.5}),  # not the tree's clip key
    ],
)
def test_metrics_missing_from_the_aggregator_fail_instead_of_falling_back_to_the_plan(mechanism, query):
    plan = conftest.plan(mechanism, 1.0, 3)
    with pytest.raises(RuntimeError, match="dp_query_metrics lack"):
        aggregation.round_metrics(plan, {"dp_query_metrics": query}, clients=3)


def test_fixed_noise_is_replayed_from_the_state_and_differs_between_rounds(tff_context):
    process = _process(M.FIXED, 1.0, m=2, dim=50, noise_seed=9, clip=1.0)
    state = process.initialize()
    zeros = [np.zeros(50, np.float32)] * 2
    first = process.next(state, zeros)
    again = process.next(state, zeros)  # same state (as after a resume): same noise
    second = process.next(first.state, zeros)
    np.testing.assert_array_equal(first.result, again.result)
    assert not np.allclose(first.result, second.result)


def test_adaptive_clip_moves_to_the_target_quantile(tff_context):
    process = _process(M.ADAPTIVE, 0.0, m=10, dim=2, clip=0.1, target_quantile=0.5, clip_learning_rate=0.2)
    updates = [np.array([float(n), 0.0], np.float32) for n in range(1, 11)]  # norms 1..10, median 5.5
    state = process.initialize()
    for _ in range(60):
        output = process.next(state, updates)
        state = output.state
    clip = float(output.measurements["dp_query_metrics"]["clip"])
    # Geometric updates oscillate around the median, between the 5th and 6th norm.
    assert 4.0 < clip < 7.0


def test_adaptive_validation_replaces_tffs_error():
    with pytest.raises(accounting.AccountingError, match="needs at least 11 clients per round"):
        conftest.dp_factory(M.ADAPTIVE, 1.0, 5)


def test_no_dp_means_tffs_default_weighted_mean():
    assert conftest.dp_factory(M.NONE) is None


def test_zeroing_keeps_the_mechanisms_metrics(tff_context):
    process = _process(M.FIXED, 0.0, m=2, dim=2, clip=1.0, zeroing_norm=100.0)
    output = process.next(process.initialize(), [np.array([3.0, 4.0], np.float32), np.zeros(2, np.float32)])
    metrics = aggregation.round_metrics(conftest.plan(M.FIXED, 0.0, 2), output.measurements, 2)
    assert metrics["diagnostic/clipped_fraction"] == 0.5  # [3, 4] was clipped, [0, 0] was not


def test_tree_factory_builds_and_adds_seeded_noise(tff_context):
    process = _process(M.TREE, 1.0, m=4, dim=1000, noise_seed=4, clip=1.0)
    output = process.next(process.initialize(), [np.zeros(1000, np.float32)] * 4)
    # First tree leaf: noise std z*C on the sum, divided by m = 4.
    assert np.std(output.result) == pytest.approx(0.25, rel=0.1)
