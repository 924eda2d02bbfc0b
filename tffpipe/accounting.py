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
import enum
import math

import dp_accounting
from dp_accounting import pld, rdp

RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])
_COUNT_STDDEV_PER_CLIENT = 0.05  # TFF's default clipped_count_stddev = 0.05 * clients_per_round


class Mechanism(enum.Enum):
    NONE = "none"
    FIXED = "fixed"
    ADAPTIVE = "adaptive"
    TREE = "tree"


class Sampling(enum.Enum):
    POISSON = "poisson"  # each client independently with q = m / N
    UNIFORM = "uniform"  # exactly m clients, uniformly without replacement
    SHUFFLE = "shuffle"  # a seeded permutation: each client at most once (tree aggregation)
    # Participation decided by device availability, deadlines and dropouts: not uniform,
    # so no amplification by sampling is claimed; every round counts in full.
    DEVICE = "device"


class Accountant(enum.Enum):
    RDP = "rdp"
    PLD = "pld"


class AccountingError(ValueError):
    """The combination asked for has no valid accounting."""


def default_delta(population: int) -> float:
    """delta = 1 / N^1.1: below 1/N, so no single client's data can leak outright."""
    return 1.0 / population**1.1


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """Everything epsilon depends on. Validated on construction."""

    mechanism: Mechanism
    noise_multiplier: float
    clients_per_round: int
    population: int
    sampling: Sampling
    delta: float
    accountant: Accountant = Accountant.RDP

    def __post_init__(self):
        if self.population <= 0:
            raise ValueError(f"population must be positive, got {self.population}")
        if not 0 < self.clients_per_round <= self.population:
            raise ValueError(
                f"clients_per_round must be in [1, population={self.population}], got {self.clients_per_round}"
            )
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.mechanism is Mechanism.TREE and self.sampling is not Sampling.SHUFFLE:
            raise AccountingError(
                "tree aggregation is accounted for clients that take part at most once (sampling=shuffle); "
                f"got sampling={self.sampling.value}"
            )
        if self.mechanism is not Mechanism.TREE and self.sampling is Sampling.SHUFFLE:
            raise AccountingError("sampling=shuffle is only accounted for the tree mechanism; use poisson or uniform")
        if self.accountant is Accountant.PLD and self.sampling not in (Sampling.POISSON, Sampling.DEVICE):
            raise AccountingError(
                f"the PLD accountant does not support sampling={self.sampling.value}; use --accountant=rdp"
            )

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.population

    def max_rounds(self) -> int | None:
        """Rounds before a client would have to take part twice (tree), else None."""
        if self.mechanism is Mechanism.TREE:
            return self.population // self.clients_per_round
        return None


def adaptive_noise_split(noise_multiplier: float, clients_per_round: float) -> tuple[float, float]:
    """(value noise multiplier, clipped-count stddev) exactly as TFF's adaptive factory splits z.

    Raises AccountingError when z >= 2*s = 0.1*m: the count query would need more
    than all of the privacy budget (TFF raises a bare ValueError deep in the build).
    """
    count_stddev = _COUNT_STDDEV_PER_CLIENT * clients_per_round
    if noise_multiplier == 0:
        return 0.0, 0.0
    if noise_multiplier >= 2 * count_stddev:
        needed = math.floor(noise_multiplier / (2 * _COUNT_STDDEV_PER_CLIENT)) + 1
        raise AccountingError(
            f"adaptive clipping with noise_multiplier={noise_multiplier} needs more than "
            f"{needed - 1} clients per round (TFF noises the clipped count with std 0.05*clients_per_round, "
            f"which must exceed noise_multiplier/2); got clients_per_round={clients_per_round:g}. "
            f"Use --clients_per_round>={needed}, a noise_multiplier below {2 * count_stddev:g}, "
            "or --dp=fixed."
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
    raise AccountingError("the tree mechanism has no per-round event; use event_after_rounds")


def event_after_rounds(plan: PrivacyPlan, rounds: int) -> dp_accounting.DpEvent:
    """The DpEvent of `rounds` rounds under the plan's sampling."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if plan.mechanism is Mechanism.TREE:
        limit = plan.max_rounds()
        if rounds > limit:
            raise AccountingError(
                f"tree aggregation over {rounds} rounds x {plan.clients_per_round} clients would reuse clients "
                f"(population {plan.population}); at most {limit} rounds are covered by the single-epoch bound"
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
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if plan.mechanism is Mechanism.NONE:
        raise AccountingError("a target epsilon needs a DP mechanism (--dp=fixed, adaptive or tree)")
    lower = 0.0
    if plan.mechanism is Mechanism.ADAPTIVE:
        # Above 0.1*m the adaptive split is undefined; calibrate below it.
        upper_limit = 2 * _COUNT_STDDEV_PER_CLIENT * plan.clients_per_round * (1 - 1e-9)
    else:
        upper_limit = None

    def make_event(z: float) -> dp_accounting.DpEvent:
        return event_after_rounds(dataclasses.replace(plan, noise_multiplier=z), rounds)

    bracket = dp_accounting.LowerEndpointAndGuess(lower, 1.0)
    if upper_limit is not None:
        bracket = dp_accounting.ExplicitBracketInterval(1e-3, upper_limit)
    try:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: create_accountant(plan), make_event, target_epsilon, plan.delta, bracket, tol=1e-4
            )
        )
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as e:
        raise AccountingError(
            f"no noise multiplier reaches epsilon={target_epsilon} in {rounds} rounds with {describe(plan)}: {e}"
        ) from e
