"""(epsilon, delta) of the mechanism actually built, from `dp_accounting` events (no TF).

The DpEvent of one round mirrors what `aggregation` builds with TFF's factories:

* fixed clipping: one Gaussian with noise multiplier z (noise std z*C on the clipped sum);
* adaptive clipping (Andrew et al. 2021): TFF splits z between the update, with
  z_v = (z^-2 - (2*s)^-2)^-1/2, and the clipped-count query, noise std s = 0.05*m on
  a bit of sensitivity 1/2, i.e. multiplier 2*s. Two Gaussians on the same record
  compose into one with 1/z^2 = 1/z_v^2 + 1/(2s)^2, so the event is that one Gaussian
  (PLD cannot take a composition inside Poisson sampling; RDP reduces it the same way);
* tree aggregation (DP-FTRL, Kairouz et al. 2021): one tree over all rounds, each
  client in at most one leaf (`SingleEpochTreeAggregationDpEvent`).

Rounds compose with the client sampling actually used: Poisson with q = m/N
(`PoissonSampledDpEvent`, add/remove-one neighbours), or fixed-size uniform without
replacement (`SampledWithoutReplacementDpEvent`, replace-one neighbours: replacing a
client moves the clipped sum by up to 2C, so each Gaussian's multiplier is halved).
PLD supports Poisson (and unsampled rounds) only; RDP supports all.

Under the device model (`devices`) who takes part depends on availability windows,
speed and dropouts, so neither sampling assumption holds. Then each round is accounted
as the full Gaussian mechanism, without amplification (`Sampling.DEVICE`): a bound that
holds whatever the participation pattern, and much larger than the sampled one.
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
from dp_accounting import pld, rdp

from tffpipe import configs, validation

Mechanism, Sampling, Accountant = configs.Mechanism, configs.Sampling, configs.Accountant
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


class AccountingError(validation.ConfigError):
    """The plan asked for has no valid accounting; `field` names the parameter to change."""


def default_delta(population: int) -> float:
    """delta = 1 / N^1.1: below 1/N, so no single client's data can leak outright."""
    return 1.0 / population**1.1


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """Everything epsilon depends on, with the noise multiplier resolved: the one privacy plan of a run.

    Built by `create_plan` from the configuration and the population; the aggregators
    (`aggregation`) and the reported epsilon both read z from here.

    Attributes:
      mechanism, sampling, accountant: as configured (`configs`).
      noise_multiplier: z, as given or solved for `target_epsilon`.
      clients_per_round: m, the expected clients per round.
      population: N, the clients that can be sampled.
      delta: as given, or 1 / N^1.1.
      rounds: the planned rounds (what `target_epsilon` was solved for).
      target_epsilon: the target the noise was solved for, if any.
    """

    mechanism: Mechanism
    noise_multiplier: float
    clients_per_round: int
    population: int
    sampling: Sampling
    delta: float
    accountant: Accountant = Accountant.RDP
    rounds: int | None = None
    target_epsilon: float | None = None

    def __post_init__(self):
        if not isinstance(self.population, int) or self.population <= 0:
            raise AccountingError(
                "population", f"population must be a positive number of clients, got {self.population}"
            )
        if not 0 < self.clients_per_round <= self.population:
            raise AccountingError(
                "clients_per_round",
                f"clients_per_round={self.clients_per_round} exceeds the {self.population} clients that can be "
                "sampled; lower it",
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise AccountingError(
                "dp.noise_multiplier", f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise AccountingError("privacy.delta", f"delta must be in (0, 1), got {self.delta}")
        limit = self.max_rounds()
        if limit is not None and self.rounds is not None and self.rounds > limit:
            raise AccountingError(
                "loop.rounds",
                f"tree aggregation is accounted for clients that take part at most once, which allows at most "
                f"{limit} rounds of {self.clients_per_round} clients from {self.population}; got rounds={self.rounds}. "
                "Lower rounds or clients_per_round, or use the fixed or adaptive mechanism",
            )

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.population

    @property
    def is_private(self) -> bool:
        return self.mechanism is not Mechanism.NONE

    def max_rounds(self) -> int | None:
        """Rounds before a client would have to take part twice (tree), else None."""
        if self.mechanism is Mechanism.TREE:
            return self.population // self.clients_per_round
        return None

    @property
    def value_noise_multiplier(self) -> float:
        """The multiplier of the noise on the clipped sum: z, or z_v of the adaptive split."""
        if self.mechanism is Mechanism.ADAPTIVE:
            return adaptive_noise_split(self.noise_multiplier, self.clients_per_round)[0]
        return self.noise_multiplier if self.is_private else 0.0


def create_plan(config: configs.ExperimentConfig, population: int) -> PrivacyPlan:
    """The run's privacy plan: z as given, or solved for `config.privacy.target_epsilon`.

    Raises:
      AccountingError: the population is too small for the cohort, tree aggregation
        would reuse clients, or no noise reaches the target.
    """
    plan = PrivacyPlan(
        mechanism=config.dp.mechanism,
        noise_multiplier=config.dp.given_noise_multiplier,
        clients_per_round=config.clients_per_round,
        population=population,
        sampling=config.sampling,
        delta=config.privacy.delta or default_delta(population),
        accountant=config.privacy.accountant,
        rounds=config.loop.rounds,
        target_epsilon=config.privacy.target_epsilon,
    )
    if plan.target_epsilon is None:
        return plan
    z = noise_for_target_epsilon(plan, plan.rounds, plan.target_epsilon)
    return dataclasses.replace(plan, noise_multiplier=z)


def adaptive_noise_split(noise_multiplier: float, clients_per_round: float) -> tuple[float, float]:
    """(value noise multiplier, clipped-count stddev) exactly as TFF's adaptive factory splits z.

    Raises AccountingError when z >= 2*s = 0.1*m: the count query would need more
    than all of the privacy budget (TFF raises a bare ValueError deep in the build).
    """
    count_stddev = configs.ADAPTIVE_COUNT_STDDEV_PER_CLIENT * clients_per_round
    if noise_multiplier == 0:
        return 0.0, 0.0
    if noise_multiplier >= 2 * count_stddev:
        needed = configs.min_adaptive_clients(noise_multiplier)
        raise AccountingError(
            "clients_per_round",
            f"adaptive clipping with noise_multiplier={noise_multiplier:g} needs at least {needed} clients per round "
            f"(TFF noises the clipped count with std 0.05*clients_per_round, which must exceed noise_multiplier/2); "
            f"got clients_per_round={clients_per_round:g}",
        )
    value = (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5
    return value, count_stddev


def round_event(plan: PrivacyPlan) -> dp_accounting.DpEvent:
    """The DpEvent of one round's aggregation, before sampling."""
    # Replace-one neighbours double the sensitivity of the clipped sum (see module doc).
    scale = 0.5 if plan.sampling is Sampling.UNIFORM else 1.0
    z = plan.noise_multiplier
    if plan.mechanism is Mechanism.NONE:
        return dp_accounting.NonPrivateDpEvent()
    if plan.mechanism is Mechanism.FIXED:
        return dp_accounting.GaussianDpEvent(scale * z)
    if plan.mechanism is Mechanism.ADAPTIVE:
        value, count_stddev = adaptive_noise_split(z, plan.clients_per_round)
        joint = (value**-2 + (2 * count_stddev) ** -2) ** -0.5  # equals z up to rounding
        return dp_accounting.GaussianDpEvent(scale * joint)
    raise ValueError("the tree mechanism has no per-round event; use event_after_rounds")


def event_after_rounds(plan: PrivacyPlan, rounds: int) -> dp_accounting.DpEvent:
    """The DpEvent of `rounds` rounds under the plan's sampling."""
    if rounds < 0:
        raise AccountingError("loop.rounds", f"rounds must be >= 0, got {rounds}")
    if plan.mechanism is Mechanism.TREE:
        limit = plan.max_rounds()
        if rounds > limit:
            raise AccountingError(
                "loop.rounds",
                f"tree aggregation over {rounds} rounds x {plan.clients_per_round} clients would reuse clients "
                f"(population {plan.population}); at most {limit} rounds are covered by the single-epoch bound",
            )
        return dp_accounting.SingleEpochTreeAggregationDpEvent(plan.noise_multiplier, max(rounds, 1))
    inner = round_event(plan)
    if plan.sampling is Sampling.DEVICE:
        return dp_accounting.SelfComposedDpEvent(inner, rounds)
    if plan.sampling is Sampling.POISSON:
        sampled = dp_accounting.PoissonSampledDpEvent(plan.sampling_rate, inner)
    else:
        sampled = dp_accounting.SampledWithoutReplacementDpEvent(plan.population, plan.clients_per_round, inner)
    return dp_accounting.SelfComposedDpEvent(sampled, rounds)


def create_accountant(plan: PrivacyPlan) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant whose neighbouring relation matches the plan's sampling."""
    relation = {
        Sampling.POISSON: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        Sampling.DEVICE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        Sampling.UNIFORM: dp_accounting.NeighboringRelation.REPLACE_ONE,
        Sampling.SHUFFLE: dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
    }[plan.sampling]
    if plan.accountant is Accountant.PLD:
        return pld.PLDAccountant(relation)
    return rdp.RdpAccountant(list(RDP_ORDERS), relation)


def epsilon(plan: PrivacyPlan, rounds: int) -> float:
    """epsilon at plan.delta after `rounds` rounds; inf without noise; 0 before any round."""
    if rounds == 0:
        return 0.0
    if plan.mechanism is Mechanism.NONE or plan.noise_multiplier == 0:
        return math.inf
    accountant = create_accountant(plan)
    accountant.compose(event_after_rounds(plan, rounds))
    return float(accountant.get_epsilon(plan.delta))


class EpsilonTracker:
    """`epsilon(plan, r)` for a run that asks after every round, without the PLD rebuild.

    The PLD accountant rebuilds the Poisson-subsampled Gaussian's loss distribution on
    every call (0.35-0.45 s here); this builds it once and self-composes it r times
    (0.04-0.11 s for r up to 1,500), giving the same number. Other plans are cheap and
    go through `epsilon`.
    """

    _PLD_INTERVAL = 1e-4  # PLDAccountant's default value_discretization_interval

    def __init__(self, plan: PrivacyPlan):
        self._plan = plan
        self._one_round = None

    def __call__(self, rounds: int) -> float:
        plan = self._plan
        cacheable = (
            plan.accountant is Accountant.PLD
            and plan.sampling is Sampling.POISSON
            and plan.mechanism in (Mechanism.FIXED, Mechanism.ADAPTIVE)
            and plan.noise_multiplier > 0
            and rounds > 0
        )
        if not cacheable:
            return epsilon(plan, rounds)
        if self._one_round is None:
            self._one_round = pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=round_event(plan).noise_multiplier,
                value_discretization_interval=self._PLD_INTERVAL,
                sampling_prob=plan.sampling_rate,
            )
        return float(self._one_round.self_compose(rounds).get_epsilon_for_delta(plan.delta))


def describe(plan: PrivacyPlan) -> str:
    """The assumptions behind an epsilon, to print wherever the number is shown."""
    if plan.mechanism is Mechanism.NONE:
        return "no differential privacy (no clipping, no noise)"
    sampling = {
        Sampling.POISSON: f"Poisson sampling q={plan.sampling_rate:.4g}",
        Sampling.UNIFORM: f"uniform sampling of {plan.clients_per_round} of {plan.population} without replacement",
        Sampling.SHUFFLE: f"each of {plan.population} clients at most once",
        Sampling.DEVICE: "participation by device availability (no amplification by sampling)",
    }[plan.sampling]
    return (
        f"client-level DP, {plan.mechanism.value} clipping, z={plan.noise_multiplier:g}, {sampling}, "
        f"delta={plan.delta:.3g}, {plan.accountant.value.upper()} accountant"
    )


def noise_for_target_epsilon(plan: PrivacyPlan, rounds: int, target_epsilon: float) -> float:
    """The smallest noise multiplier that keeps epsilon <= target after `rounds` rounds."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise AccountingError(
            "privacy.target_epsilon", f"target_epsilon must be a positive number, got {target_epsilon}"
        )
    if not plan.is_private:
        raise AccountingError("dp.mechanism", "a target epsilon needs a DP mechanism (fixed, adaptive or tree)")
    bracket = dp_accounting.LowerEndpointAndGuess(0.0, 1.0)
    if plan.mechanism is Mechanism.ADAPTIVE:
        # At z >= 0.1*m the adaptive split is undefined; calibrate below it.
        upper = 2 * configs.ADAPTIVE_COUNT_STDDEV_PER_CLIENT * plan.clients_per_round * (1 - 1e-9)
        bracket = dp_accounting.ExplicitBracketInterval(1e-3, upper)

    def make_event(z: float) -> dp_accounting.DpEvent:
        return event_after_rounds(dataclasses.replace(plan, noise_multiplier=z), rounds)

    try:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: create_accountant(plan), make_event, target_epsilon, plan.delta, bracket, tol=1e-4
            )
        )
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as e:
        raise AccountingError(
            "privacy.target_epsilon",
            f"no noise multiplier reaches epsilon={target_epsilon:g} in {rounds} rounds with {describe(plan)} "
            f"({e}); raise target_epsilon or clients_per_round",
        ) from e


def rounds_within_budget(plan: PrivacyPlan, max_epsilon: float, limit: int) -> int:
    """The most rounds, up to `limit`, whose epsilon stays at or below `max_epsilon`.

    Epsilon grows with the rounds, so a binary search over the accountant's answers
    (about log2(limit) of them) finds the last round within the budget.
    """
    if not plan.is_private or plan.noise_multiplier == 0:
        return 0
    tracker = EpsilonTracker(plan)
    if tracker(limit) <= max_epsilon:
        return limit
    low, high = 0, limit  # epsilon(low) <= budget < epsilon(high)
    while high - low > 1:
        middle = (low + high) // 2
        if tracker(middle) <= max_epsilon:
            low = middle
        else:
            high = middle
    return low


def budgeted_rounds(plan: PrivacyPlan, max_epsilon: float, limit: int) -> int:
    """The rounds a run may take within `max_epsilon` (up to `limit`): the one check train and compute_epsilon share.

    Raises:
      AccountingError: naming `privacy.max_epsilon` when not even round 1 fits the budget.
    """
    rounds = rounds_within_budget(plan, max_epsilon, limit)
    if rounds == 0:
        raise AccountingError(
            "privacy.max_epsilon",
            f"max_epsilon={max_epsilon:g} allows no round: round 1 alone takes epsilon to "
            f"{epsilon(plan, 1):.4g} ({describe(plan)}); raise max_epsilon",
        )
    return rounds
