"""Empirical privacy from canary clients, one-shot, beside the accountant.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning" (ICLR 2024, arXiv 2302.03098). K canary clients
join the population and are sampled like everyone else; a canary holds no data, and
its update is a fixed random direction of its own (a unit vector over all trainable
weights, drawn from (seed, canary index)), scaled far past the clip so the mechanism
clips it to the clip norm. The update goes through the run's real aggregator:
clipping, noise, zeroing, everything. K more directions are drawn but never inserted
(the null). Afterwards:

* final model: the cosines between the model's total change (final minus initial
  weights) and each direction. Without the canaries' influence the cosine of a random
  direction with a fixed vector in d dimensions is about N(0, 1/d); the inserted
  canaries' mean cosine against that null gives epsilon at the run's delta
  (`epsilon_two_gaussians`, the exact epsilon of two Gaussians; see `estimate` for
  why the null's spread serves both sides);
* all iterates: per canary, the largest cosine with any round's model change, the
  inserted maxima against the null maxima (the max of T null cosines is no longer
  N(0, 1/d), so its mean and spread are measured).

Both are *estimates* under the paper's threat model (an adversary who sees only the
final model, or every iterate, and knows the canary directions), not bounds: the
accountant's epsilon is the claim, the estimate is evidence about it. An estimate
above the claim means the code does not do what the accounting assumes.

The update's sign: TFF's client update is initial minus trained weights and the
server moves the model against it, so a canary submits -c to push the model along c.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from scipy import optimize, stats

CANARY_PREFIX = "canary:"
_SCALE = 1e4  # times the clip: any clip the mechanism applies shortens the canary to exactly the clip


def canary_ids(count: int) -> list[str]:
    """Client ids of the inserted canaries, which join the sampled population."""
    return [f"{CANARY_PREFIX}{i:05d}" for i in range(count)]


def is_canary(client_id: str) -> bool:
    return client_id.startswith(CANARY_PREFIX)


def direction(index, shapes: Sequence, seed: int) -> list[tf.Tensor]:
    """Canary `index`'s unit direction, split like the trainable weights (TF, deterministic)."""
    parts = [
        tf.random.stateless_normal(
            shape,
            seed=tf.stack([tf.cast(index, tf.int64), tf.constant(seed, tf.int64)])
            + tf.constant([0, 1_000_003 * (i + 1)], tf.int64),
            dtype=tf.float32,
        )
        for i, shape in enumerate(shapes)
    ]
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(p)) for p in parts]))
    return [p / norm for p in parts]


def create_result_transform(*, seed: int, clip: float, zeroing_norm: float = 0.0):
    """(client id, client work result) -> result, with a canary's update replaced by its direction.

    For `fusion.fuse_client_datasets`: runs inside each client's TensorFlow call, after
    the client work, so the canary's update enters the aggregator like any other
    (`replace_canary_update` says what replaces it).
    """

    def transform(client_id, result):
        client_result, metrics = result  # (ClientResult as an OrderedDict, the client's metrics)
        update, weight = replace_canary_update(
            client_id,
            tf.nest.flatten(client_result["update"]),
            client_result["update_weight"],
            seed=seed,
            clip=clip,
            zeroing_norm=zeroing_norm,
        )
        replaced = type(client_result)(
            update=tf.nest.pack_sequence_as(client_result["update"], update), update_weight=weight
        )
        return type(result)((replaced, metrics))

    return transform


def replace_canary_update(
    client_id: tf.Tensor, update: Sequence[tf.Tensor], weight: tf.Tensor, *, seed: int, clip: float, zeroing_norm: float
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """(update, weight) of one client, or its canary's if `client_id` is a canary's (TF, in a graph).

    The canary's update is -c scaled to `_SCALE` times the clip: a clipping mechanism
    shortens it to the clip, and one that does not clip (no DP, or a broken mechanism)
    lets a single client dominate the model, which is what the audit is there to see. It
    stays under a zeroing norm, which would zero it otherwise. Weight 1, as every client
    of an unweighted DP mean. Both the per-client path (`create_result_transform`) and
    client groups (each member, before it is clipped) call this.
    """
    canary = tf.strings.regex_full_match(client_id, f"{CANARY_PREFIX}[0-9]+")
    real = list(update)

    def canary_update():
        index = tf.strings.to_number(tf.strings.substr(client_id, len(CANARY_PREFIX), 16), tf.int64)
        unit = direction(index, [u.shape for u in real], seed)
        scale = tf.constant(clip * _SCALE, tf.float32)
        if zeroing_norm > 0:
            largest = tf.reduce_max([tf.reduce_max(tf.abs(u)) for u in unit])
            scale = tf.minimum(scale, 0.5 * zeroing_norm / largest)
        return [-scale * u for u in unit]

    replaced = tf.cond(canary, canary_update, lambda: real)
    return list(replaced), tf.where(canary, tf.ones_like(weight), weight)


_ONE_SIDED_95 = 1.645  # standard normal quantile for a one-sided 95% bound


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Cosines, the epsilon estimates from them, and 95% lower confidence bounds on those.

    The estimate rests on the mean of K cosines, whose standard error alone reads as
    some epsilon: with K = 100 at delta = 1.3e-4 a mechanism that hides the canaries
    perfectly still gets estimates around 0.4. The lower bound uses the mean minus
    1.645 standard errors; the run warns only when that bound exceeds the claim.
    """

    epsilon_final: float
    epsilon_final_lower: float
    epsilon_all_iterates: float | None
    epsilon_all_iterates_lower: float | None
    final_inserted: np.ndarray
    final_null: np.ndarray
    max_inserted: np.ndarray | None
    max_null: np.ndarray | None
    dimension: int


class CanaryAudit:
    """Tracks the canaries' cosines over a run and estimates epsilon from them.

    `observe(weights)` after each round keeps, per direction, the largest cosine with
    a round's change (the all-iterates statistic; kept only when the 2K directions fit
    in `max_floats`, else recomputing them every round would cost more than the round).
    `estimate(weights, delta)` adds the final-model statistic against the initial
    weights. As a `training_loop.Carry` the running maxima are checkpointed with the
    process state, so a resumed run continues them.
    """

    def __init__(self, count: int, initial_weights: Sequence[np.ndarray], seed: int, *, max_floats: int = 50_000_000):
        self.count = count
        self._shapes = [tuple(np.shape(w)) for w in initial_weights]
        self._seed = seed
        self._initial = _flat(initial_weights)
        self._previous = self._initial
        self.dimension = len(self._initial)
        self._directions = None
        if 2 * count * self.dimension <= max_floats:
            self._directions = np.stack([self._flat_direction(i) for i in range(2 * count)])
        self._max = np.full(2 * count, -1.0) if self._directions is not None else None

    def _flat_direction(self, index: int) -> np.ndarray:
        return np.concatenate([p.numpy().ravel() for p in direction(index, self._shapes, self._seed)]).astype(
            np.float64
        )

    def cosines(self, change: np.ndarray) -> np.ndarray:
        """Cosine of `change` with every direction: inserted first, then the null."""
        norm = float(np.linalg.norm(change))
        if norm == 0:
            return np.zeros(2 * self.count)
        if self._directions is not None:
            return self._directions @ change / norm
        return np.array([self._flat_direction(i) @ change / norm for i in range(2 * self.count)])

    def observe(self, weights: Sequence[np.ndarray]) -> None:
        current = _flat(weights)
        if self._max is not None:
            np.maximum(self._max, self.cosines(current - self._previous), out=self._max)
        self._previous = current

    def state(self) -> np.ndarray:
        return np.zeros(0) if self._max is None else self._max.copy()

    def restore(self, saved: np.ndarray | None, process_state) -> None:
        """Continues from a checkpoint: its maxima, and its model as the last round's."""
        self._previous = _flat(trainable_weights(process_state))
        if saved is not None and self._max is not None and len(saved) == len(self._max):
            self._max = np.asarray(saved, np.float64).copy()

    def estimate(self, weights: Sequence[np.ndarray], delta: float) -> Estimate:
        """Epsilon of telling the inserted canaries' cosines from the null's, each side a Gaussian.

        The null's spread is the reference for both sides: exactly 1/sqrt(d) for the final
        model, the null maxima's sample spread for all iterates; the inserted side's mean
        is fitted. Canaries are sampled like clients, so the inserted cosines are a mixture
        over how often each canary took part (never, once, ...): fitting that mixture with
        a Gaussian of its own, wider spread, as the paper does for canaries inserted a
        fixed number of times, reads the mixture's spread as privacy loss in the tails
        (a correct mechanism measured 4.3 against an accountant's 3.2 that way, 20
        canaries, 6 rounds). Both spreads are in `audit.json`.
        """
        final_cos = self.cosines(_flat(weights) - self._initial)
        inserted, null = final_cos[: self.count], final_cos[self.count :]
        spread = self.dimension**-0.5
        shift, error = float(np.mean(inserted)), _std(inserted) / math.sqrt(self.count)
        eps_final = epsilon_two_gaussians(0.0, spread, shift, spread, delta)
        eps_final_lower = epsilon_two_gaussians(0.0, spread, max(0.0, shift - _ONE_SIDED_95 * error), spread, delta)
        eps_all = eps_all_lower = max_inserted = max_null = None
        if self._max is not None and np.all(self._max > -1.0):
            max_inserted, max_null = self._max[: self.count].copy(), self._max[self.count :].copy()
            spread = _std(max_null)
            shift = float(np.mean(max_inserted) - np.mean(max_null))
            error = math.sqrt((_std(max_inserted) ** 2 + spread**2) / self.count)
            eps_all = epsilon_two_gaussians(0.0, spread, shift, spread, delta)
            eps_all_lower = epsilon_two_gaussians(0.0, spread, max(0.0, shift - _ONE_SIDED_95 * error), spread, delta)
        return Estimate(
            eps_final, eps_final_lower, eps_all, eps_all_lower, inserted, null, max_inserted, max_null, self.dimension
        )

    def metrics(self, estimate: Estimate) -> dict[str, float]:
        metrics = {"privacy/empirical_epsilon": estimate.epsilon_final}
        if estimate.epsilon_all_iterates is not None:
            metrics["privacy/empirical_epsilon_all_iterates"] = estimate.epsilon_all_iterates
        return metrics


def to_json(estimate: Estimate, *, delta: float, accountant_epsilon: float, rounds: int) -> dict:
    """What `audit.json` holds: the cosines (so the estimate can be recomputed) and the estimates."""

    def values(array):
        return None if array is None else [float(v) for v in array]

    return {
        "method": "one-shot empirical privacy estimation (Andrew et al., ICLR 2024), Gaussian fits",
        "rounds": rounds,
        "delta": delta,
        "dimension": estimate.dimension,
        "accountant_epsilon": accountant_epsilon,
        "empirical_epsilon_final_model": estimate.epsilon_final,
        "empirical_epsilon_final_model_lower_95": estimate.epsilon_final_lower,
        "empirical_epsilon_all_iterates": estimate.epsilon_all_iterates,
        "empirical_epsilon_all_iterates_lower_95": estimate.epsilon_all_iterates_lower,
        "final_model_cosines": {"inserted": values(estimate.final_inserted), "null": values(estimate.final_null)},
        "max_round_cosines": {"inserted": values(estimate.max_inserted), "null": values(estimate.max_null)},
    }


def trainable_weights(process_state) -> list[np.ndarray]:
    """The model's trainable weights in a `tff.learning` process state (`LearningAlgorithmState`)."""
    return [np.asarray(w) for w in process_state.global_model_weights.trainable]


def _flat(weights: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in weights])


def _std(values: np.ndarray) -> float:
    """Sample standard deviation, floored so a degenerate sample cannot divide by zero."""
    return max(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 1e-12)


def epsilon_two_gaussians(mu1: float, std1: float, mu2: float, std2: float, delta: float) -> float:
    """The smallest epsilon with which N(mu1, std1^2) and N(mu2, std2^2) are (epsilon, delta)-indistinguishable.

    Exact for two Gaussians (both directions; as Steinke 2022, arXiv 2210.00597, and the
    paper's reference code): the privacy loss L(y) = log p1(y) / p2(y) is a quadratic in
    y, so delta(eps) = P1[L > eps] - e^eps P2[L > eps] is a difference of normal tail
    probabilities over the region where L > eps. Equal variances give the Gaussian
    mechanism with noise multiplier std / |mu1 - mu2|.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if max(_delta_at(0.0, mu1, std1, mu2, std2), _delta_at(0.0, mu2, std2, mu1, std1)) <= delta:
        return 0.0

    def excess(eps: float) -> float:
        return max(_delta_at(eps, mu1, std1, mu2, std2), _delta_at(eps, mu2, std2, mu1, std1)) - delta

    upper = 1.0
    while excess(upper) > 0:
        upper *= 2
        if upper > 512:  # beyond any meaningful epsilon (and e^eps overflows past 709)
            return math.inf
    return float(optimize.brentq(excess, 0.0, upper, xtol=1e-9))


@functools.cache
def _delta_at(eps: float, mu1: float, std1: float, mu2: float, std2: float) -> float:
    """P1[L > eps] - e^eps P2[L > eps] for L = log p1/p2 (the hockey-stick divergence)."""
    a = 0.5 * (std2**-2 - std1**-2)
    b = mu1 / std1**2 - mu2 / std2**2
    c = 0.5 * ((mu2 / std2) ** 2 - (mu1 / std1) ** 2) + math.log(std2) - math.log(std1)

    def mass(mu: float, std: float) -> float:
        """P[a y^2 + b y + c > eps] for y ~ N(mu, std^2)."""
        if abs(a) < 1e-300 * max(1.0, abs(b)):
            if b == 0:
                return 1.0 if c > eps else 0.0
            t = (eps - c) / b
            return stats.norm.sf(t, mu, std) if b > 0 else stats.norm.cdf(t, mu, std)
        disc = b * b - 4 * a * (c - eps)
        if disc <= 0:
            return 1.0 if a > 0 else 0.0
        r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
        inside = stats.norm.cdf(r2, mu, std) - stats.norm.cdf(r1, mu, std)
        return 1.0 - inside if a > 0 else inside

    second = mass(mu2, std2)
    scaled = math.exp(min(eps + math.log(second), 700.0)) if second > 0 else 0.0
    return max(0.0, mass(mu1, std1) - scaled)
