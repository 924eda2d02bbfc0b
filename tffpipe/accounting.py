"""(epsilon, delta) of the mechanism actually built, from `dp_accounting` events (no TF).

The DpEvent of one round mirrors what `aggregation` builds with TFF's factories:

* fixed clipping: one Gaussian with noise multiplier z (noise std z*C on the clipped sum);
* adaptive clipping (Andrew et al. 2021): TFF splits z between the update, with
  z_v = (z^-2 - (2*s)^-2)^-1/2, and the clipped-count query, noise std s = 0.05*m on
  a bit of sensitivity 1/2, i.e. multiplier 2*s. Two Gaussians on the same record
  compose into one with 1/z^2 = 1/z_v^2 + 1/(2s)^2, so the event is that one Gaussian
  (PLD cannot take a composition inside Poisson sampling; RDP reduces it the same way);
* tree aggregation (DP-FTRL, Kairouz et al. 2021): one tree over all rounds, each
  client in at most one leaf (`SingleEpochTreeAggregationDpEvent`);
* distributed discrete Gaussian (Kairouz, Liu, Steinke 2021): n clients each add a
  discrete Gaussian share to their scaled, rounded update, and the sum of n shares is
  close to, but not, a discrete Gaussian. dp_accounting 0.4.3 has no bound for it, so
  `DistributedDiscreteGaussianDpEvent` carries the round's parameters and
  `DistributedRdpAccountant` (an `RdpAccountant`) adds the paper's RDP bound (Theorem 1
  and Proposition 14), under Poisson sampling with Zhu & Wang 2019's bound (Theorem 5).
  The shares are sized for the *expected* cohort, so a round with fewer clients has less
  noise: each round is accounted with the count it actually had (`EpsilonTracker.observe`).

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
import statistics
from collections.abc import Callable

import attr
import dp_accounting
import numpy as np
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
    clip: float = 1.0
    bits: int | None = None
    dimension: int | None = None
    distributed_noise: configs.DistributedNoise = configs.DistributedNoise.DISCRETE_GAUSSIAN

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
        if self.mechanism is Mechanism.DISTRIBUTED:
            self.distributed()  # TFF's limits on bits for the cohort, named
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

    def distributed(self) -> DistributedParameters:
        """The distributed mechanism's parameters, as TFF derives them from z, C, bits, m and d."""
        if self.bits is None or self.dimension is None:
            raise AccountingError(
                "model", "the distributed mechanism is accounted from its bits and the model's parameter count"
            )
        return distributed_parameters(
            self.noise_multiplier,
            self.clip,
            self.bits,
            self.clients_per_round,
            self.dimension,
            skellam=self.distributed_noise is configs.DistributedNoise.SKELLAM,
        )

    @property
    def value_noise_multiplier(self) -> float:
        """The multiplier of the noise on the clipped sum: z, or z_v of the adaptive split."""
        if self.mechanism is Mechanism.ADAPTIVE:
            return adaptive_noise_split(self.noise_multiplier, self.clients_per_round)[0]
        return self.noise_multiplier if self.is_private else 0.0


def create_plan(
    config: configs.ExperimentConfig, population: int, *, model_size: Callable[[], int] | None = None
) -> PrivacyPlan:
    """The run's privacy plan: z as given, or solved for `config.privacy.target_epsilon`.

    Args:
      config: the experiment.
      population: N, the clients that can be sampled.
      model_size: returns the model's trainable parameters, called only by mechanisms
        whose epsilon depends on them (distributed: rounding error grows with sqrt(d)).

    Raises:
      AccountingError: the population is too small for the cohort, tree aggregation
        would reuse clients, no noise reaches the target, or the distributed
        mechanism's bit width is unusable for the model and cohort.
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
        clip=config.dp.clip,
        bits=config.dp.bits,
        distributed_noise=config.dp.distributed_noise or configs.DistributedNoise.DISCRETE_GAUSSIAN,
        dimension=model_size() if config.dp.mechanism is Mechanism.DISTRIBUTED and model_size else None,
    )
    if plan.target_epsilon is not None:
        z = noise_for_target_epsilon(plan, plan.rounds, plan.target_epsilon)
        plan = dataclasses.replace(plan, noise_multiplier=z)
    if plan.mechanism is Mechanism.DISTRIBUTED:
        check_usable_bits(plan)
    return plan


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


def round_event(plan: PrivacyPlan, clients: int | None = None) -> dp_accounting.DpEvent:
    """The DpEvent of one round's aggregation, before sampling.

    `clients`: the distributed mechanism's noised clients that round (default: the
    expected m); the central mechanisms' noise does not depend on it.
    """
    if plan.mechanism is Mechanism.DISTRIBUTED:
        return plan.distributed().event(plan.clients_per_round if clients is None else clients)
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
    return dp_accounting.SelfComposedDpEvent(_sampled(plan, round_event(plan)), rounds)


def _sampled(plan: PrivacyPlan, inner: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """One round's event under the plan's sampling (the device model: no amplification)."""
    if plan.sampling is Sampling.DEVICE:
        return inner
    if plan.sampling is Sampling.POISSON:
        return dp_accounting.PoissonSampledDpEvent(plan.sampling_rate, inner)
    return dp_accounting.SampledWithoutReplacementDpEvent(plan.population, plan.clients_per_round, inner)


def create_accountant(plan: PrivacyPlan) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant whose neighbouring relation matches the plan's sampling."""
    if plan.mechanism is Mechanism.DISTRIBUTED:
        return DistributedRdpAccountant()
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


# --- The distributed discrete Gaussian (TFF's DistributedDpSumFactory, its defaults) ---

# The probability that a coordinate of the noisy sum wraps around the modulus 2^bits
# (TFF's `modclip_prob`), and its cap on the scale before rounding.
DISTRIBUTED_MODCLIP_PROB = 1e-4
_MAX_SCALE_FACTOR = 1e6
# Integer orders: Zhu & Wang's bound for Poisson subsampling sums over 3..alpha.
DISTRIBUTED_RDP_ORDERS = tuple(range(2, 129)) + (256,)
# A width whose epsilon exceeds the widest width's (same z, sampling, rounds) by more than
# this is refused: rounding and coarse shares then cost more than the noise itself.
MAX_DISTRIBUTED_EPSILON_RATIO = 2.0


@dataclasses.dataclass(frozen=True)
class DistributedParameters:
    """The distributed mechanism in the scaled integer domain, as TFF's factory derives it.

    Attributes:
      padded_dimension: d, the model's parameters padded to even for the DFT rotation.
      scale: the factor applied before rounding (1 / gamma in the paper).
      l2_sensitivity: the scaled L2 bound after stochastic rounding, C*scale + sqrt(d)
        (Theorem 1's inflation with beta = 0, and TFF's 1e-5 leeway).
      local_stddev: each client's share of noise, z*C*scale / sqrt(m).
      expected_clients: m, what the shares are sized for.
      skellam: Skellam shares (Agarwal, Kairouz, Liu 2021) instead of discrete Gaussian ones.
    """

    padded_dimension: int
    scale: float
    l2_sensitivity: float
    local_stddev: float
    expected_clients: int
    skellam: bool = False

    @property
    def l1_sensitivity(self) -> float:
        """L1 <= sqrt(d) * L2 in general, and <= L2^2 for integer vectors (TFF's bound)."""
        return math.ceil(self.l2_sensitivity * min(math.sqrt(self.padded_dimension), self.l2_sensitivity))

    def event(self, clients: int) -> DistributedDiscreteGaussianDpEvent | DistributedSkellamDpEvent:
        """One round with `clients` noise shares (at least one: an empty round still protects a joining client)."""
        kind = DistributedSkellamDpEvent if self.skellam else DistributedDiscreteGaussianDpEvent
        return kind(
            l2_sensitivity=self.l2_sensitivity,
            l1_sensitivity=self.l1_sensitivity,
            local_stddev=self.local_stddev,
            shares=max(int(clients), 1),
            dimension=self.padded_dimension,
        )


def distributed_parameters(
    noise_multiplier: float, clip: float, bits: int, clients_per_round: int, dimension: int, *, skellam: bool = False
) -> DistributedParameters:
    """TFF's derivation (`distributed_dp._heuristic_scale_factor`, `discretization.inflated_l2_norm_bound`).

    The scale puts k standard deviations of the noisy sum inside 2^bits, k for the
    modular-wrap probability: 2^b = 2k sqrt(C^2 m^2 / d + m sigma_local^2 + m gamma^2/4) / gamma.

    Raises:
      AccountingError: naming `dp.bits` where TFF refuses the width for the cohort.
    """
    m = clients_per_round
    k = statistics.NormalDist().inv_cdf(1 - DISTRIBUTED_MODCLIP_PROB / 2)  # sqrt(2) * erfcinv(p)
    if bits < math.log2(m) or 4.0**bits < m * k**2:
        need = max(math.ceil(math.log2(m)), math.ceil(math.log2(m * k**2) / 2))
        raise AccountingError(
            "dp.bits",
            f"bits={bits} cannot hold the sum of {m} clients' values (TFF needs 2^bits >= clients_per_round and "
            f"4^bits >= clients_per_round * {k:.2f}^2 for a {DISTRIBUTED_MODCLIP_PROB:g} wrap probability); "
            f"use bits >= {need}",
        )
    d = 2 * math.ceil(max(dimension, 1) / 2)
    local = noise_multiplier * clip / math.sqrt(m)
    scale = math.sqrt(4.0**bits - m * k**2) / (2 * k * math.sqrt(clip**2 * m**2 / d + m * local**2))
    scale = min(scale, _MAX_SCALE_FACTOR)
    inflated = clip + math.sqrt(d) / scale
    return DistributedParameters(
        padded_dimension=d,
        scale=scale,
        l2_sensitivity=(inflated + 1e-5) * scale,
        local_stddev=local * scale,
        expected_clients=m,
        skellam=skellam,
    )


@attr.s(frozen=True)
class DistributedDiscreteGaussianDpEvent(dp_accounting.DpEvent):
    """The sum of `shares` discrete Gaussians N_Z(0, local_stddev^2) on an integer vector of `dimension`.

    The vector (scaled, rounded updates) has L2 sensitivity `l2_sensitivity` and L1
    sensitivity `l1_sensitivity`, all in the scaled integer domain.
    """

    l2_sensitivity = attr.ib()
    l1_sensitivity = attr.ib()
    local_stddev = attr.ib()
    shares = attr.ib()
    dimension = attr.ib()


@attr.s(frozen=True)
class DistributedSkellamDpEvent(dp_accounting.DpEvent):
    """The sum of `shares` Skellam shares of std `local_stddev` on an integer vector of `dimension`.

    A sum of Skellam variables is Skellam: the sum has variance shares * local_stddev^2
    exactly, with no closeness term. Sensitivities as for the discrete Gaussian event.
    """

    l2_sensitivity = attr.ib()
    l1_sensitivity = attr.ib()
    local_stddev = attr.ib()
    shares = attr.ib()
    dimension = attr.ib()


def skellam_rdp(event: DistributedSkellamDpEvent, order: int) -> float:
    """RDP at `order` of one unsampled round: Agarwal, Kairouz, Liu 2021 (the Skellam mechanism).

    With mu the variance of the summed noise, eps(a) = a D2^2 / (2 mu)
    + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)).
    """
    mu = event.shares * event.local_stddev**2
    if mu <= 0:
        return math.inf
    l2, l1 = event.l2_sensitivity, event.l1_sensitivity
    return order * l2**2 / (2 * mu) + min(((2 * order - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def distributed_rdp(event: DistributedDiscreteGaussianDpEvent, order: int) -> float:
    """RDP at `order` of one unsampled round: Kairouz, Liu, Steinke 2021, Theorem 1 and Proposition 14.

    With sigma the local stddev and n shares, the sum is tau-close to N_Z(0, n sigma^2),
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)), and
    eps(a) = min(a/2 D2^2 + tau d, a/2 (D2^2 + 2 D1 tau + tau^2 d), a/2 (D2 + tau sqrt(d))^2)
    with D2, D1 the sensitivities over the sum's stddev sqrt(n) sigma.
    """
    n, sigma, d = event.shares, event.local_stddev, event.dimension
    if sigma <= 0:
        return math.inf
    tau = 10 * sum(math.exp(-2 * (math.pi * sigma) ** 2 * k / (k + 1)) for k in range(1, n))
    l2 = event.l2_sensitivity / (math.sqrt(n) * sigma)
    l1 = event.l1_sensitivity / (math.sqrt(n) * sigma)
    return min(
        order / 2 * l2**2 + tau * d,
        order / 2 * (l2**2 + 2 * l1 * tau + tau**2 * d),
        order / 2 * (l2 + tau * math.sqrt(d)) ** 2,
    )


def _log_add(terms: list[tuple[float, float]]) -> float:
    """log(sum c * exp(x)) over (c, x) pairs with c > 0."""
    top = max(x for _, x in terms)
    if math.isinf(top):
        return top
    return top + math.log(sum(c * math.exp(x - top) for c, x in terms))


def poisson_subsampled_rdp(rdp_of, q: float, order: int) -> float:
    """Zhu & Wang 2019 ("Poisson Subsampled Renyi Differential Privacy"), Theorem 5, at integer `order`.

    eps_q(a) <= 1/(a-1) log((1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
                + 3 sum_{l=3}^{a} C(a,l) (1-q)^(a-l) q^l e^((l-1) eps(l))), and never above eps(a).
    """
    a = int(order)
    if q >= 1:
        return rdp_of(a)
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [
        (a * q - q + 1, (a - 1) * log_1q),
        (math.comb(a, 2), 2 * log_q + (a - 2) * log_1q + rdp_of(2)),
    ]
    for ell in range(3, a + 1):
        terms.append((3.0, math.log(math.comb(a, ell)) + (a - ell) * log_1q + ell * log_q + (ell - 1) * rdp_of(ell)))
    return min(_log_add(terms) / (a - 1), rdp_of(a))


_DISTRIBUTED_EVENTS = (DistributedDiscreteGaussianDpEvent, DistributedSkellamDpEvent)


def _round_rdp(event, order: int) -> float:
    if isinstance(event, DistributedSkellamDpEvent):
        return skellam_rdp(event, order)
    return distributed_rdp(event, order)


class DistributedRdpAccountant(rdp.RdpAccountant):
    """dp_accounting's RDP accountant that also composes the distributed mechanism's rounds.

    Takes `DistributedDiscreteGaussianDpEvent` and `DistributedSkellamDpEvent`, alone or in a `PoissonSampledDpEvent`
    (add/remove-one neighbours), inside any self-composition; other events as the
    parent does. Its orders are integers (Zhu & Wang's bound needs them).
    """

    def __init__(self, orders=DISTRIBUTED_RDP_ORDERS):
        super().__init__(list(orders), dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)

    def event_rdp(self, event: dp_accounting.DpEvent) -> np.ndarray | None:
        """The RDP vector of one distributed round (sampled or not), None for other events."""
        if isinstance(event, _DISTRIBUTED_EVENTS):
            return np.array([_round_rdp(event, int(a)) for a in self._orders])
        if isinstance(event, dp_accounting.PoissonSampledDpEvent) and isinstance(event.event, _DISTRIBUTED_EVENTS):
            cache: dict[int, float] = {}

            def rdp_of(a: int) -> float:
                if a not in cache:
                    cache[a] = _round_rdp(event.event, a)
                return cache[a]

            return np.array([poisson_subsampled_rdp(rdp_of, event.sampling_probability, int(a)) for a in self._orders])
        return None

    def add_rdp(self, values: np.ndarray, count: int = 1) -> None:
        """Composes an RDP vector computed by `event_rdp` (so a tracker need not recompute it)."""
        self._rdp = self._rdp + count * np.asarray(values)

    def _maybe_compose(self, event, count, do_compose):
        values = self.event_rdp(event)
        if values is None:
            return super()._maybe_compose(event, count, do_compose)
        if do_compose:
            self.add_rdp(values, count)
        return None


def check_usable_bits(plan: PrivacyPlan) -> None:
    """Refuses a bit width whose epsilon is more than twice what the widest width gives.

    Coarse rounding inflates the L2 sensitivity by sqrt(d)/scale: at 12 bits a
    1.3M-parameter model's by 3.2x, which takes epsilon over 1,500 rounds from ~3 into the
    thousands (the effective noise multiplier falls to z/3.2, where sampling no longer
    amplifies). Shares of very small scaled std add Theorem 1's tau on top. The reference
    is the same mechanism and accounting at the widest width TFF allows (22 bits), so that
    what is refused is the width, not the accounting's own gap to the central Gaussian
    (shown beside it). Compared over the planned rounds (1 if none).

    Raises:
      AccountingError: naming `dp.bits`, with the smallest width that would do.
    """
    if plan.noise_multiplier == 0 or plan.bits >= configs.MAX_DISTRIBUTED_BITS:
        return
    rounds = plan.rounds or 1
    eps = epsilon(plan, rounds)
    widest = epsilon(dataclasses.replace(plan, bits=configs.MAX_DISTRIBUTED_BITS), rounds)
    if eps <= MAX_DISTRIBUTED_EPSILON_RATIO * widest:
        return
    usable = next(
        bits
        for bits in range(plan.bits + 1, configs.MAX_DISTRIBUTED_BITS + 1)
        if epsilon(dataclasses.replace(plan, bits=bits), rounds) <= MAX_DISTRIBUTED_EPSILON_RATIO * widest
    )
    central = epsilon(dataclasses.replace(plan, mechanism=Mechanism.FIXED), rounds)
    params = plan.distributed()
    inflation = (params.l2_sensitivity / params.scale) / plan.clip
    raise AccountingError(
        "dp.bits",
        f"bits={plan.bits} is unusable for this model ({plan.dimension:,} parameters) and cohort "
        f"({plan.clients_per_round} clients per round): rounding inflates the L2 sensitivity {inflation:.3g}x and "
        f"epsilon after {rounds} rounds would be {eps:.4g}, {eps / widest:.3g}x the {widest:.4g} of "
        f"{configs.MAX_DISTRIBUTED_BITS} bits (more than {MAX_DISTRIBUTED_EPSILON_RATIO:g}x; central DP at "
        f"noise_multiplier={plan.noise_multiplier:g}: {central:.4g}); use bits >= {usable}",
    )


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
        self._noised: dict[int, int] = {}  # round -> clients whose noise shares were summed
        self._rdp_by_clients: dict[int, np.ndarray] = {}

    def observe(self, round_num: int, noised_clients: int) -> None:
        """Records how many clients' noise shares round `round_num` summed (the distributed mechanism)."""
        self._noised[round_num] = int(noised_clients)

    def __call__(self, rounds: int) -> float:
        plan = self._plan
        if plan.mechanism is Mechanism.DISTRIBUTED and plan.noise_multiplier > 0 and rounds > 0:
            return self._distributed(rounds)
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

    def _distributed(self, rounds: int) -> float:
        """Each round with the clients it noised (observed), or the expected m where none was observed."""
        plan = self._plan
        accountant = create_accountant(plan)
        counts: dict[int, int] = {}
        for r in range(1, rounds + 1):
            n = self._noised.get(r, plan.clients_per_round)
            counts[n] = counts.get(n, 0) + 1
        for n, times in counts.items():
            if n not in self._rdp_by_clients:
                self._rdp_by_clients[n] = accountant.event_rdp(_sampled(plan, round_event(plan, n)))
            accountant.add_rdp(self._rdp_by_clients[n], times)
        return float(accountant.get_epsilon(plan.delta))


_NOISE_NAMES = {
    configs.DistributedNoise.DISCRETE_GAUSSIAN: "discrete Gaussian",
    configs.DistributedNoise.SKELLAM: "Skellam",
}


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
    if plan.mechanism is Mechanism.DISTRIBUTED:
        params = plan.distributed()
        return (
            f"client-level DP, distributed {_NOISE_NAMES[plan.distributed_noise]} ({plan.bits}-bit "
            "modular sum of "
            f"{params.padded_dimension:,} coordinates, noise shares for {plan.clients_per_round} clients; a run "
            f"accounts each round with the clients it had; secure sum simulated as a plain modular sum), "
            f"z={plan.noise_multiplier:g}, {sampling}, "
            f"delta={plan.delta:.3g}, RDP accountant"
        )
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
        raise AccountingError(
            "dp.mechanism", "a target epsilon needs a DP mechanism (fixed, adaptive, tree or distributed)"
        )
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
