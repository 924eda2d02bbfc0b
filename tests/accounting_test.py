"""epsilon against dp_accounting used directly (not through tffpipe's code path)."""

import dataclasses
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from tensorflow_federated.python.aggregators import differential_privacy as tff_dp

from tffpipe import accounting, configs

Plan = accounting.PrivacyPlan
M, S = configs.Mechanism, configs.Sampling
BASE = Plan(M.FIXED, 1.0, 50, 3400, S.POISSON, 1e-5)


def test_fixed_poisson_rdp_equals_a_direct_dp_accounting_computation():
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(50 / 3400, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert accounting.epsilon(BASE, 100) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)


def test_fixed_poisson_pld_equals_a_direct_dp_accounting_computation():
    direct = pld.PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(50 / 3400, dp_accounting.GaussianDpEvent(1.0)), 100)
    plan = dataclasses.replace(BASE, accountant=configs.Accountant.PLD)
    assert accounting.epsilon(plan, 100) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)


def test_uniform_sampling_uses_replace_one_with_doubled_sensitivity():
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # Replacing one client moves the clipped sum by up to 2C: the multiplier seen by the accountant is z/2.
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(3400, 50, dp_accounting.GaussianDpEvent(0.5)), 100)
    plan = dataclasses.replace(BASE, sampling=S.UNIFORM)
    assert accounting.epsilon(plan, 100) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)


def test_adaptive_split_matches_tff_and_composes_back_to_z():
    value, count_stddev = accounting.adaptive_noise_split(1.0, 50)
    assert (value, count_stddev) == pytest.approx(tff_dp.adaptive_clip_noise_params(1.0, 50.0))
    # 1/z^2 = 1/z_v^2 + 1/(2 s)^2, so the composed event is as private as one Gaussian(z).
    assert value**-2 + (2 * count_stddev) ** -2 == pytest.approx(1.0)
    adaptive = dataclasses.replace(BASE, mechanism=M.ADAPTIVE)
    assert accounting.epsilon(adaptive, 100) == pytest.approx(accounting.epsilon(BASE, 100), rel=1e-3)


def test_adaptive_is_accounted_by_pld_too():
    adaptive = dataclasses.replace(BASE, mechanism=M.ADAPTIVE, accountant=configs.Accountant.PLD)
    fixed = dataclasses.replace(BASE, accountant=configs.Accountant.PLD)
    assert accounting.epsilon(adaptive, 100) == pytest.approx(accounting.epsilon(fixed, 100), rel=1e-3)


def _poisson_rounds(rounds: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(50 / 3400, dp_accounting.GaussianDpEvent(1.0)), rounds
    )


TRACKED = {
    # plan: (a fresh dp_accounting accountant, the event of r rounds), built here, not through tffpipe.
    "pld fixed": (dataclasses.replace(BASE, accountant=configs.Accountant.PLD), pld.PLDAccountant, _poisson_rounds),
    # Adaptive clipping's two Gaussians compose back to one Gaussian(z) (the test above).
    "pld adaptive": (
        dataclasses.replace(BASE, mechanism=M.ADAPTIVE, accountant=configs.Accountant.PLD),
        pld.PLDAccountant,
        _poisson_rounds,
    ),
    "rdp fixed": (BASE, rdp.RdpAccountant, _poisson_rounds),
    # The device model: every round the full Gaussian mechanism (no amplification by sampling);
    # r Gaussians of std z on a sensitivity-1 sum are one Gaussian of std z / sqrt(r).
    "pld device": (
        dataclasses.replace(BASE, sampling=S.DEVICE, accountant=configs.Accountant.PLD),
        pld.PLDAccountant,
        lambda rounds: dp_accounting.GaussianDpEvent(1.0 / math.sqrt(rounds)),
    ),
}


@pytest.mark.parametrize("plan, make_accountant, after", TRACKED.values(), ids=TRACKED.keys())
def test_per_round_tracker_gives_dp_accountings_numbers(plan, make_accountant, after):
    tracker = accounting.EpsilonTracker(plan)
    for rounds in (0, 1, 7, 300):
        direct = make_accountant()
        if rounds:  # an accountant that has composed nothing gives 0, as the tracker must before round 1
            direct.compose(after(rounds))
        assert tracker(rounds) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3, abs=1e-12), rounds


def test_tree_equals_single_epoch_tree_event():
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    direct.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, 60))
    plan = dataclasses.replace(BASE, mechanism=M.TREE, sampling=S.SHUFFLE)
    assert accounting.epsilon(plan, 60) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)
    with pytest.raises(accounting.AccountingError, match="at most 68 rounds"):
        accounting.epsilon(plan, 69)  # 69 x 50 > 3,400: some client would take part twice


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [accounting.epsilon(BASE, r) for r in (1, 10, 100, 1000)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    noisier = [accounting.epsilon(dataclasses.replace(BASE, noise_multiplier=z), 100) for z in (0.5, 1.0, 2.0)]
    assert noisier[0] > noisier[1] > noisier[2]
    assert accounting.epsilon(BASE, 0) == 0.0
    assert math.isinf(accounting.epsilon(dataclasses.replace(BASE, mechanism=M.NONE, noise_multiplier=0.0), 5))


def test_target_epsilon_gives_the_noise_that_reaches_it():
    z = accounting.noise_for_target_epsilon(BASE, 200, 2.0)
    assert accounting.epsilon(dataclasses.replace(BASE, noise_multiplier=z), 200) == pytest.approx(2.0, abs=0.01)


def test_adaptive_needs_enough_clients_and_says_how_many():
    with pytest.raises(accounting.AccountingError, match=r"needs at least 11 clients per round") as e:
        accounting.adaptive_noise_split(1.0, 10)
    assert e.value.field == "clients_per_round"


def test_the_plan_resolves_the_noise_for_a_target_and_keeps_the_limits():
    config = configs.ExperimentConfig(privacy=configs.PrivacyConfig(target_epsilon=2.0), loop=configs.LoopConfig(200))
    plan = accounting.create_plan(config, 3400)
    assert plan.target_epsilon == 2.0 and plan.rounds == 200
    assert accounting.epsilon(plan, 200) == pytest.approx(2.0, abs=0.01)
    tree = dataclasses.replace(config, dp=configs.DpConfig(mechanism=M.TREE), privacy=configs.PrivacyConfig())
    with pytest.raises(accounting.AccountingError, match="at most 68 rounds of 50 clients from 3400") as e:
        accounting.create_plan(dataclasses.replace(tree, loop=configs.LoopConfig(69)), 3400)
    assert e.value.field == "loop.rounds"
    with pytest.raises(accounting.AccountingError, match="clients_per_round=50 exceeds the 12 clients"):
        accounting.create_plan(configs.ExperimentConfig(), 12)


def test_non_finite_plans_are_refused_instead_of_hanging_the_accountant():
    with pytest.raises(accounting.AccountingError, match="noise_multiplier must be finite"):
        dataclasses.replace(BASE, noise_multiplier=math.nan)
    with pytest.raises(accounting.AccountingError, match="target_epsilon must be a positive number"):
        accounting.noise_for_target_epsilon(BASE, 10, math.inf)


def test_description_names_every_assumption():
    text = accounting.describe(BASE)
    for part in ("fixed clipping", "z=1", "Poisson sampling q=0.01471", "delta=1e-05", "RDP accountant"):
        assert part in text


def test_a_budget_gives_the_last_round_within_it_and_refuses_one_that_allows_none():
    # One check for train and compute_epsilon: a budget between rounds 2 and 3 allows 2 rounds.
    between = (accounting.epsilon(BASE, 2) + accounting.epsilon(BASE, 3)) / 2
    assert accounting.budgeted_rounds(BASE, between, 100) == 2
    assert accounting.budgeted_rounds(BASE, 1e6, 100) == 100  # never more than asked for
    with pytest.raises(accounting.AccountingError, match="max_epsilon=1e-09 allows no round: round 1 alone") as e:
        accounting.budgeted_rounds(BASE, 1e-9, 100)
    assert e.value.field == "privacy.max_epsilon"
    assert f"takes epsilon to {accounting.epsilon(BASE, 1):.4g}" in str(e.value)
