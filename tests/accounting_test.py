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
    for rounds in (0, 1, 7, 60):
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


# --- The distributed discrete Gaussian, against the paper's formulas written out here ---


def _paper_epsilon(z, clip, bits, m, population, dim, rounds, delta, sampled=True):
    """epsilon from Kairouz, Liu, Steinke 2021 and the papers it builds on, independently of tffpipe.

    Parameters as TFF chooses them: gamma solves 2^b = 2k sqrt(C^2 n^2 / d + (gamma^2/4 + sigma^2) n) / gamma
    (the docstring of TFF's `_heuristic_scale_factor`), here by bisection; k = sqrt(2) erfcinv(1e-4).
    """
    from scipy import special

    d = 2 * math.ceil(dim / 2)
    k = math.sqrt(2) * special.erfcinv(1e-4)
    sigma = z * clip / math.sqrt(m)  # each client's share, unscaled

    def excess(gamma):
        return 2 * k * math.sqrt(clip**2 * m**2 / d + (gamma**2 / 4 + sigma**2) * m) / gamma - 2**bits

    low, high = 1e-12, 10.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if excess(middle) > 0 else (low, middle)
    scale = 1 / high
    l2 = (clip + math.sqrt(d) / scale + 1e-5) * scale  # Theorem 1's inflation by rounding (beta = 0)
    l1 = math.ceil(l2 * min(math.sqrt(d), l2))
    s = sigma * scale
    tau = 10 * sum(math.exp(-2 * math.pi**2 * s**2 * j / (j + 1)) for j in range(1, m))
    d2, d1 = l2 / (math.sqrt(m) * s), l1 / (math.sqrt(m) * s)

    def eps(a):  # Proposition 14
        return min(
            a * d2**2 / 2 + tau * d, a / 2 * (d2**2 + 2 * d1 * tau + tau**2 * d), a / 2 * (d2 + tau * d**0.5) ** 2
        )

    q = m / population
    best = math.inf
    for a in list(range(2, 129)) + [256]:
        if sampled:  # Zhu & Wang 2019, Theorem 5
            logs = [(a - 1) * math.log1p(-q) + math.log(a * q - q + 1)]
            logs.append(special.gammaln(a + 1) - special.gammaln(3) - special.gammaln(a - 1) + 2 * math.log(q))
            logs[-1] += (a - 2) * math.log1p(-q) + eps(2)
            for ell in range(3, a + 1):
                binom = special.gammaln(a + 1) - special.gammaln(ell + 1) - special.gammaln(a - ell + 1)
                logs.append(math.log(3) + binom + (a - ell) * math.log1p(-q) + ell * math.log(q) + (ell - 1) * eps(ell))
            per_round = min(special.logsumexp(logs) / (a - 1), eps(a))
        else:
            per_round = eps(a)
        rdp_a = rounds * per_round
        # RDP to (epsilon, delta): Canonne, Kamath, Steinke 2020, Proposition 12.
        best = min(best, rdp_a + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


DISTRIBUTED_PLANS = {
    # A keyboard-size model at 16 bits, 1,500 rounds of 100 from 10,000.
    "lstm_16bit": dict(z=1.0, clip=1.0, bits=16, m=100, population=10_000, dim=1_300_000, rounds=1500),
    # The linear EMNIST model (48,670 weights) at 20 bits.
    "linear_20bit": dict(z=0.8, clip=0.5, bits=20, m=50, population=3400, dim=48_670, rounds=200),
    # The device model: every round counts in full (no amplification).
    "devices_18bit": dict(z=2.0, clip=1.0, bits=18, m=20, population=500, dim=10_001, rounds=10, sampled=False),
}


@pytest.mark.parametrize("params", DISTRIBUTED_PLANS.values(), ids=DISTRIBUTED_PLANS.keys())
def test_distributed_epsilon_matches_the_papers_formulas(params):
    p = dict(params)
    sampling = S.POISSON if p.pop("sampled", True) else S.DEVICE
    plan = Plan(
        M.DISTRIBUTED,
        p["z"],
        p["m"],
        p["population"],
        sampling,
        1e-5,
        clip=p["clip"],
        bits=p["bits"],
        dimension=p["dim"],
    )
    expected = _paper_epsilon(**p, delta=1e-5, sampled=sampling is S.POISSON)
    assert accounting.epsilon(plan, p["rounds"]) == pytest.approx(expected, rel=0.01)
    tracker = accounting.EpsilonTracker(plan)  # every round at the expected count: the same number
    assert tracker(p["rounds"]) == pytest.approx(expected, rel=0.01)


def test_a_round_with_fewer_clients_than_expected_costs_more_epsilon():
    plan = Plan(M.DISTRIBUTED, 1.0, 50, 3400, S.POISSON, 1e-5, bits=18, dimension=48_670)
    full, short, crowded = (accounting.EpsilonTracker(plan) for _ in range(3))
    for round_num in range(1, 11):
        full.observe(round_num, 50)
        short.observe(round_num, 50 if round_num != 5 else 20)  # round 5: noise z*C*sqrt(20/50)
        crowded.observe(round_num, 50 if round_num != 5 else 80)
    assert full(10) == pytest.approx(accounting.epsilon(plan, 10), rel=1e-9)
    assert short(10) > full(10) > crowded(10)
    assert short(4) == full(4)  # rounds before the short one are unchanged


def test_a_bit_width_unusable_for_the_model_and_cohort_is_refused_with_the_one_that_works():
    def plan_with(bits, dim=1_300_000):
        config = configs.ExperimentConfig(
            dp=configs.DpConfig(mechanism=M.DISTRIBUTED, bits=bits, noise_multiplier=1.0),
            clients_per_round=100,
            loop=configs.LoopConfig(rounds=1500),
        )
        return accounting.create_plan(config, 10_000, model_size=lambda: dim)

    # At 12 bits rounding inflates the sensitivity 3.2x (z is effectively 1/3.2): epsilon ~1,800
    # against ~2.7 at 22 bits; 14 bits give ~3.4x the widest width's epsilon, 15 bits ~1.8x.
    with pytest.raises(accounting.AccountingError, match=r"bits=12 is unusable .* use bits >= 15") as e:
        plan_with(12)
    assert e.value.field == "dp.bits"
    widest = plan_with(22)
    central = dataclasses.replace(widest, mechanism=M.FIXED)
    assert f"the {accounting.epsilon(widest, 1500):.4g} of 22 bits" in str(e.value)
    assert f"central DP at noise_multiplier=1: {accounting.epsilon(central, 1500):.4g})" in str(e.value)
    assert plan_with(15).bits == 15
    assert plan_with(12, dim=1000).bits == 12  # a small model rounds little: 12 bits do
    # 2^7 = 128 >= 100 clients and 4^7 >= 100 * 3.89^2 (a 1e-4 wrap probability): TFF's limits.
    with pytest.raises(accounting.AccountingError, match=r"bits=6 cannot hold the sum of 100 .* use bits >= 7"):
        plan_with(6, dim=1000)


def test_target_epsilon_is_solved_for_the_distributed_mechanism():
    config = configs.ExperimentConfig(
        dp=configs.DpConfig(mechanism=M.DISTRIBUTED, bits=18),
        clients_per_round=100,
        loop=configs.LoopConfig(rounds=200),
        privacy=configs.PrivacyConfig(target_epsilon=3.0),
    )
    plan = accounting.create_plan(config, 10_000, model_size=lambda: 1_300_000)
    assert accounting.epsilon(plan, 200) == pytest.approx(3.0, abs=0.01)


def test_skellam_epsilon_matches_its_papers_bound():
    # Agarwal, Kairouz, Liu 2021: the Skellam shares sum to a Skellam of variance mu = n sigma^2,
    # eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)), here without
    # sampling (the device model). At 6 bits and 10 clients the second term shows: the discrete
    # Gaussian's bound is 3.4% lower on this plan, so a swapped formula fails the 1% check.
    plan = Plan(
        M.DISTRIBUTED,
        1.0,
        10,
        1000,
        S.DEVICE,
        1e-5,
        bits=6,
        dimension=10_000,
        distributed_noise=configs.DistributedNoise.SKELLAM,
    )
    p = plan.distributed()  # scale and sensitivities as TFF derives them (checked in mechanisms_test)
    mu = 10 * p.local_stddev**2
    l2, l1 = p.l2_sensitivity, math.ceil(p.l2_sensitivity * min(math.sqrt(10_000), p.l2_sensitivity))
    best = math.inf
    for a in list(range(2, 129)) + [256]:
        rdp_a = 100 * (a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu)))
        best = min(best, rdp_a + math.log1p(-1 / a) - (math.log(1e-5) + math.log(a)) / (a - 1))
    assert accounting.epsilon(plan, 100) == pytest.approx(best, rel=0.01)
    gaussian = dataclasses.replace(plan, distributed_noise=configs.DistributedNoise.DISCRETE_GAUSSIAN)
    assert accounting.epsilon(gaussian, 100) < 0.98 * best
