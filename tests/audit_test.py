"""The privacy audit: the estimator against known answers, canaries through the real aggregator, whole runs."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy import integrate, stats
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

from tests import conftest
from tffpipe import aggregation, algorithms, audit, configs, program


def _gaussian_mechanism_epsilon(noise_multiplier: float, delta: float) -> float:
    """dp_accounting's epsilon of one Gaussian mechanism (sensitivity 1, std = noise_multiplier)."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sensitivity=1.0, value_discretization_interval=1e-4
    )
    return pld.get_epsilon_for_delta(delta)


@pytest.mark.parametrize("mu, delta", [(0.5, 1e-5), (1.0, 1e-5), (1.0, 1e-2), (2.0, 1e-2)])
def test_equal_spreads_are_the_gaussian_mechanism(mu, delta):
    # N(0, 1) against N(mu, 1) is the Gaussian mechanism with noise multiplier 1/mu.
    assert audit.epsilon_two_gaussians(0.0, 1.0, mu, 1.0, delta) == pytest.approx(
        _gaussian_mechanism_epsilon(1 / mu, delta), abs=2e-4
    )
    # Location and scale do not matter.
    assert audit.epsilon_two_gaussians(3.0, 0.01, 3.0 + 0.01 * mu, 0.01, delta) == pytest.approx(
        audit.epsilon_two_gaussians(0.0, 1.0, mu, 1.0, delta), rel=1e-6
    )


@pytest.mark.parametrize("std2", [0.9, 1.2])
def test_unequal_spreads_match_the_hockey_stick_divergence_integrated_numerically(std2):
    delta = 1e-5
    eps = audit.epsilon_two_gaussians(0.0, 1.0, 1.0, std2, delta)
    p, q = stats.norm(0.0, 1.0), stats.norm(1.0, std2)

    def hockey_stick(a, b):  # integral of max(0, a(y) - e^eps b(y)) dy
        return integrate.quad(lambda y: max(0.0, a.pdf(y) - math.exp(eps) * b.pdf(y)), -40, 40, limit=400)[0]

    assert max(hockey_stick(p, q), hockey_stick(q, p)) == pytest.approx(delta, rel=1e-3)


def test_indistinguishable_cosines_give_zero():
    assert audit.epsilon_two_gaussians(0.0, 1.0, 0.0, 1.0, 1e-5) == 0.0


def test_the_estimate_from_drawn_cosines_recovers_the_mechanism():
    # Canary cosines N(mu, 1/d) against the null N(0, 1/d): the Gaussian mechanism with
    # noise multiplier 1/(mu sqrt(d)). 20,000 draws pin the mean to 1/sqrt(20,000) = 0.7% of a spread.
    d, z, delta = 10_000, 1.0, 1e-3
    rng = np.random.default_rng(0)
    inserted = rng.normal(1 / (z * math.sqrt(d)), 1 / math.sqrt(d), 20_000)
    estimate = audit.epsilon_two_gaussians(0.0, d**-0.5, float(np.mean(inserted)), d**-0.5, delta)
    assert estimate == pytest.approx(_gaussian_mechanism_epsilon(z, delta), rel=0.02)


def test_canary_directions_are_unit_and_the_null_cosines_spread_as_one_over_sqrt_d():
    shapes = [(50, 40), (40,)]
    tracker = audit.CanaryAudit(200, [np.zeros(s, np.float32) for s in shapes], seed=3)
    d = tracker.dimension
    assert d == 2040
    change = np.random.default_rng(1).normal(size=d)
    cosines = tracker.cosines(change)
    # 400 cosines of a fixed vector with random unit directions: mean 0, std 1/sqrt(d) within sampling error.
    assert abs(np.mean(cosines)) < 4 / math.sqrt(400 * d)
    assert np.std(cosines) * math.sqrt(d) == pytest.approx(1.0, abs=0.1)
    one = np.concatenate([p.numpy().ravel() for p in audit.direction(7, shapes, 3)])
    assert np.linalg.norm(one) == pytest.approx(1.0, abs=1e-5)


def _process_state(weights: list[np.ndarray]):
    """The part of a `tff.learning` process state that `CanaryAudit.restore` reads."""
    state = type("State", (), {})()
    state.global_model_weights = type("Weights", (), {"trainable": weights})()
    return state


def test_a_restored_audit_continues_as_if_never_interrupted():
    # Three rounds without a stop, against round 1, a checkpoint, and rounds 2-3 after a restart.
    rng = np.random.default_rng(2)
    initial = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    rounds = [[w + rng.normal(size=w.shape).astype(np.float32) * (r + 1) for w in initial] for r in range(3)]
    whole = audit.CanaryAudit(4, initial, seed=1)
    for weights in rounds:
        whole.observe(weights)
    first = audit.CanaryAudit(4, initial, seed=1)
    first.observe(rounds[0])
    saved = first.state()
    assert saved.shape == (8,)  # one running maximum per inserted and per null direction
    resumed = audit.CanaryAudit(4, initial, seed=1)
    resumed.restore(saved, _process_state(rounds[0]))  # round 1's model is the checkpoint's
    for weights in rounds[1:]:
        resumed.observe(weights)
    np.testing.assert_array_equal(resumed.state(), whole.state())
    expected, found = whole.estimate(rounds[-1], 1e-3), resumed.estimate(rounds[-1], 1e-3)
    assert found.epsilon_all_iterates is not None
    assert found.epsilon_all_iterates == expected.epsilon_all_iterates
    assert found.epsilon_all_iterates_lower == expected.epsilon_all_iterates_lower


def test_a_canarys_update_goes_through_the_real_clipping(tiny_data_dir, tff_context):
    # Two copies of canary 3 in a round, fixed clipping at C = 1 without noise: each update is
    # clipped to norm 1, the mean over m = 2 is one unit along the canary's direction.
    task = conftest.emnist_task(tiny_data_dir, "linear")
    factory = conftest.dp_factory(configs.Mechanism.FIXED, 0.0, 2, clip=1.0)
    transform = audit.create_result_transform(seed=5, clip=1.0)
    process = task.compose_train(
        algorithms.build_training_process(task.learning_model(), configs.AlgorithmConfig(), aggregator=factory),
        result_transform=transform,
    )
    state = process.initialize()
    output = process.next(state, ["canary:00003", "canary:00003"])
    change = np.concatenate(
        [
            (b - a).ravel()
            for a, b in zip(audit.trainable_weights(state), audit.trainable_weights(output.state), strict=True)
        ]
    )
    shapes = [np.shape(w) for w in audit.trainable_weights(state)]
    unit = np.concatenate([p.numpy().ravel() for p in audit.direction(3, shapes, 5)])
    assert np.linalg.norm(change) == pytest.approx(1.0, rel=1e-5)
    assert change @ unit == pytest.approx(1.0, rel=1e-5)
    assert output.metrics["aggregator"]["dp_query_metrics"]["clipped_count"] == 2.0  # both were clipped
    assert output.metrics["client_work"]["train"]["num_examples"] == 0  # canaries hold no data


def _audited_run(tmp_path, name: str, **values) -> tuple[dict, str]:
    """A small audited run in this process: 60 writers, 10 per round, 6 rounds, 20 canaries."""
    config = configs.build(
        {
            "data.population.num_writers": 60,
            "data.population.median_examples": 24,
            "data.population.seed": 7,
            "data.cache_dir": str(tmp_path / "cache"),
            "root_dir": str(tmp_path / "runs"),
            "experiment": name,
            "model": "linear",
            "clients_per_round": 10,
            "loop.rounds": 6,
            "loop.eval_every": 3,
            "eval_clients": 10,
            "privacy.canaries": 20,
            **values,
        }
    )
    context = context_stack_impl.context_stack.current
    out = io.StringIO()
    try:
        program.run(config, stream=out)
    finally:
        context_stack_impl.context_stack.set_default_context(context)
    with open(tmp_path / "runs" / name / "audit.json") as f:
        return json.load(f), out.getvalue()


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


def test_with_dp_the_estimate_stays_below_the_accountant_and_without_it_is_large(audit_dir):
    private, text = _audited_run(audit_dir, "dp")
    assert 0 < private["empirical_epsilon_final_model"] < private["accountant_epsilon"]
    # audit.json holds what the estimates are computed from: the final-model cosines give them again,
    # the mean's shift against the null spread 1/sqrt(d), and for the bound that mean less 1.645 standard errors.
    inserted, spread = np.array(private["final_model_cosines"]["inserted"]), private["dimension"] ** -0.5
    shift, error = inserted.mean(), inserted.std(ddof=1) / math.sqrt(len(inserted))
    for key, mean in (("", shift), ("_lower_95", max(0.0, shift - 1.645 * error))):
        again = audit.epsilon_two_gaussians(0.0, spread, mean, spread, private["delta"])
        assert private["empirical_epsilon_final_model" + key] == pytest.approx(again, rel=1e-9, abs=1e-12)
    assert private["empirical_epsilon_all_iterates"] < private["accountant_epsilon"]
    assert "warning" not in text and "privacy audit: empirical epsilon" in text
    assert len(private["final_model_cosines"]["inserted"]) == len(private["final_model_cosines"]["null"]) == 20
    exposed, _ = _audited_run(audit_dir, "none", **{"dp.mechanism": configs.Mechanism.NONE})
    assert exposed["empirical_epsilon_final_model"] > 50  # one canary moves the unclipped model at will


def test_a_mechanism_that_reports_noise_it_does_not_add_is_caught(audit_dir, monkeypatch):
    original = aggregation.SeededGaussianSumQuery.__init__

    def without_noise(self, l2_norm_clip, stddev, seed):
        original(self, l2_norm_clip, 0.0, seed)  # the plan (and every report) still says z = 0.7

    monkeypatch.setattr(aggregation.SeededGaussianSumQuery, "__init__", without_noise)
    broken, text = _audited_run(audit_dir, "broken")
    assert broken["empirical_epsilon_final_model_lower_95"] > broken["accountant_epsilon"]
    assert "warning: the measured privacy is worse than the reported one" in text


def test_distributed_dp_estimate_stays_at_or_below_its_accountant(audit_dir):
    # The canaries' updates go through each device's clipping, rounding and noise share like
    # any client's, and the 20-bit sum's epsilon is accounted with the clients each round had.
    private, text = _audited_run(audit_dir, "distributed", **{"dp.mechanism": configs.Mechanism.DISTRIBUTED})
    assert 0 <= private["empirical_epsilon_final_model"] <= private["accountant_epsilon"]
    assert private["empirical_epsilon_all_iterates"] <= private["accountant_epsilon"]
    assert "warning" not in text and "distributed discrete Gaussian (20-bit" in text
