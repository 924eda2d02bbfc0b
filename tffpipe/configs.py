"""The configuration of one experiment: frozen dataclasses and the enums they use.

Standard library only, so TF-free binaries (`experiments.compute_epsilon`) share the
training binary's flags and checks. Each config validates its own fields on
construction with the named validators of `validation`; `ExperimentConfig` adds the
rules that span sections, all in `_check_combinations`, so they hold before any data
is generated or loaded. Fields are named like the flags that set them.

Defaults that depend on another choice (the server learning rate on the algorithm,
the noise multiplier on the mechanism, the model on the task) are given as None and
resolved on construction, so the config always holds the values a run uses.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from tffpipe import network, validation

_RESUMABLE = {"resumable": True}  # may change between runs of one experiment (see `resumable_keys`)


class Task(enum.Enum):
    EMNIST = "emnist"  # handwritten characters per writer (TFF's EMNIST layout)
    KEYBOARD = "keyboard"  # next-word prediction on each user's own text (TFF's Stack Overflow layout)


class Mechanism(enum.Enum):
    NONE = "none"
    FIXED = "fixed"  # Gaussian noise on updates clipped to a fixed L2 norm
    ADAPTIVE = "adaptive"  # the clip follows a quantile of update norms (Andrew et al. 2021)
    TREE = "tree"  # DP-FTRL tree aggregation (Kairouz et al. 2021)
    # Each client clips, rotates, rounds to integers and adds its share of discrete Gaussian
    # noise; only the modular sum is revealed (Kairouz, Liu, Steinke 2021). Simulated:
    # the secure sum runs as a plain modular sum.
    DISTRIBUTED = "distributed"


class Sampling(enum.Enum):
    POISSON = "poisson"  # each client independently with q = m / N
    UNIFORM = "uniform"  # exactly m clients, uniformly without replacement
    SHUFFLE = "shuffle"  # a seeded permutation: each client at most once (tree aggregation)
    # Participation decided by device availability, deadlines and dropouts: not uniform,
    # so no amplification by sampling is claimed; every round counts in full.
    DEVICE = "device"


class DistributedNoise(enum.Enum):
    """The noise each device adds under the distributed mechanism."""

    DISCRETE_GAUSSIAN = "discrete_gaussian"  # Kairouz, Liu, Steinke 2021
    SKELLAM = "skellam"  # Agarwal, Kairouz, Liu 2021: shares sum to a Skellam exactly


class Accountant(enum.Enum):
    RDP = "rdp"
    PLD = "pld"


class Algorithm(enum.Enum):
    FEDAVG = "fedavg"  # McMahan et al. 2017: client SGD, server SGD at lr 1 (plain averaging)
    FEDAVGM = "fedavgm"  # server SGD with momentum (Hsu et al. 2019)
    FEDADAM = "fedadam"  # Reddi et al. 2021
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    FEDPROX = "fedprox"  # Li et al. 2020: client loss + mu/2 ||w - w_server||^2
    FEDSGD = "fedsgd"  # one gradient per client per round


# Server learning rates when none is given. Averaging algorithms apply the mean update
# as is (1.0). The adaptive ones follow Reddi et al. 2021 ("Adaptive Federated
# Optimization", best rates on EMNIST character recognition): FedAdam and FedYogi
# 10^-2.5, FedAdagrad 10^-1; FedAdam at 1.0 barely learns (2.4% after 5 rounds).
DEFAULT_SERVER_LEARNING_RATE: Mapping[Algorithm, float] = {
    Algorithm.FEDAVG: 1.0,
    Algorithm.FEDAVGM: 1.0,
    Algorithm.FEDPROX: 1.0,
    Algorithm.FEDSGD: 1.0,
    Algorithm.FEDADAM: 10**-2.5,
    Algorithm.FEDYOGI: 10**-2.5,
    Algorithm.FEDADAGRAD: 10**-1,
}
DEFAULT_NOISE_MULTIPLIER = 0.7  # with a DP mechanism; none without
# Settings whose default depends on the task, used by `build` where the values leave them
# unset. EMNIST's are the dataclass defaults. The keyboard LSTM hardly learns with those
# (FedAvg, client SGD 0.1, 5 epochs, batch 20: loss 3.98 -> 3.81 in 20 rounds, top-1 0.0 on
# a 50-word corpus), so it gets the keyboard preset's settings, Reddi et al. 2021's Stack
# Overflow rates (client SGD 10^-0.5, server Adam 10^-2, tau 10^-5; 15.8% top-1 in 90
# rounds), and no DP: with 1,000 users DP noise swamps the updates (README, "The keyboard task").
TASK_DEFAULTS: Mapping[str, Mapping[Task, Any]] = {
    "algorithm.algorithm": {Task.EMNIST: Algorithm.FEDAVG, Task.KEYBOARD: Algorithm.FEDADAM},
    "algorithm.client_learning_rate": {Task.EMNIST: 0.1, Task.KEYBOARD: 10**-0.5},
    "algorithm.adaptive_epsilon": {Task.EMNIST: 1e-3, Task.KEYBOARD: 1e-5},
    "preprocess.epochs": {Task.EMNIST: 5, Task.KEYBOARD: 1},
    "preprocess.batch_size": {Task.EMNIST: 20, Task.KEYBOARD: 16},
    "clients_per_round": {Task.EMNIST: 50, Task.KEYBOARD: 20},
    "dp.mechanism": {Task.EMNIST: Mechanism.FIXED, Task.KEYBOARD: Mechanism.NONE},
}
# Server learning rates of a task that differ from the algorithm's (`DEFAULT_SERVER_LEARNING_RATE`).
TASK_SERVER_LEARNING_RATE: Mapping[Task, Mapping[Algorithm, float]] = {Task.KEYBOARD: {Algorithm.FEDADAM: 1e-2}}
DEFAULT_MODEL: Mapping[Task, str] = {Task.EMNIST: "small_cnn", Task.KEYBOARD: "cifg_lstm"}
# TFF's adaptive clipping noises the clipped count with std 0.05 * clients_per_round.
ADAPTIVE_COUNT_STDDEV_PER_CLIENT = 0.05
# Distributed DP: bits of the secure sum's field (2^bits) when none is given, and TFF's
# range (its discretization computes in float32, exact for integers up to 2^24).
DEFAULT_DISTRIBUTED_BITS = 20
MAX_DISTRIBUTED_BITS = 22


class _GeneratedPopulation:
    """The configuration of an embedded population, which a generator turns into files."""

    def fingerprint(self, generator_version: int) -> str:
        """Short stable hash of generator version and configuration; names the cache directory."""
        blob = json.dumps({"version": generator_version, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class PopulationConfig(_GeneratedPopulation):
    """Size and skew of the embedded EMNIST-style population (see `tasks.emnist.generator`).

    Attributes:
      num_writers: clients (writers) in the population.
      seed: the only source of randomness; the same config gives identical bytes.
      median_examples: median examples per writer (log-normal quantity skew).
      quantity_sigma: log-normal sigma of examples per writer; 0 gives equal sizes.
      label_concentration: Dirichlet concentration per class around the base class
        frequency; small values give writers few classes, large values near-IID.
      test_fraction: share of each writer's examples held out into the test split.
      min_examples: floor of examples per writer (at least one train, one test).
      style_spread: scales every style and per-example variation; 1.0 is tuned so a
        CNN lands near real EMNIST-62's accuracy, larger is harder.
      label_noise: fraction of examples whose stored label is a random class.
    """

    num_writers: int = 3400
    seed: int = 0
    median_examples: int = 60
    quantity_sigma: float = 0.8
    label_concentration: float = 2.0
    test_fraction: float = 0.1
    min_examples: int = 4
    style_spread: float = 1.0
    label_noise: float = 0.0

    def __post_init__(self):
        validation.integer(1, num_writers=self.num_writers)
        validation.integer(0, seed=self.seed)
        validation.integer(1, median_examples=self.median_examples)
        validation.integer(2, min_examples=self.min_examples)  # one train, one test
        validation.in_range(0, 5, quantity_sigma=self.quantity_sigma)
        validation.positive(label_concentration=self.label_concentration)
        validation.in_range(0, 1, closed="()", test_fraction=self.test_fraction)
        validation.non_negative(style_spread=self.style_spread)
        validation.in_range(0, 1, closed="[)", label_noise=self.label_noise)


@dataclasses.dataclass(frozen=True)
class TextPopulationConfig(_GeneratedPopulation):
    """Size and skew of the embedded keyboard population (see `tasks.keyboard.generator`).

    Attributes:
      num_users: clients (users) in the population.
      seed: the only source of randomness; the same config gives identical bytes.
      median_messages: median messages per user (log-normal quantity skew).
      quantity_sigma: log-normal sigma of messages per user; 0 gives equal amounts.
    """

    num_users: int = 1000
    seed: int = 0
    median_messages: int = 60
    quantity_sigma: float = 1.0

    def __post_init__(self):
        validation.integer(1, num_users=self.num_users)
        validation.integer(0, seed=self.seed)
        validation.integer(1, median_messages=self.median_messages)
        validation.in_range(0, 5, quantity_sigma=self.quantity_sigma)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """How the keyboard task turns messages into training sequences (TFF's Stack Overflow baseline).

    Attributes:
      vocab_size: the most frequent words (by users using them) that get their own id.
      sequence_length: words per training sequence (longer messages are truncated).
      num_oov_buckets: ids shared by all out-of-vocabulary words.
      population: the embedded population (ignored with data_dir).
    """

    vocab_size: int = 10_000
    sequence_length: int = 20
    num_oov_buckets: int = 1
    population: TextPopulationConfig = TextPopulationConfig()

    def __post_init__(self):
        validation.integer(1, vocab_size=self.vocab_size)
        validation.integer(1, sequence_length=self.sequence_length)
        validation.integer(1, num_oov_buckets=self.num_oov_buckets)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where client data comes from.

    Attributes:
      data_dir: directory with the task's real files; None uses the embedded data.
      cache_dir: where the embedded data is generated once.
      only_digits: EMNIST: the 10 digit classes instead of all 62.
      population: the embedded EMNIST generator's population (ignored with data_dir).
      text: the keyboard task's vocabulary, sequences and embedded population.
    """

    data_dir: str | None = None
    cache_dir: str = dataclasses.field(default="data_cache", metadata=_RESUMABLE)
    only_digits: bool = dataclasses.field(default=False, metadata={"task": Task.EMNIST})
    population: PopulationConfig = dataclasses.field(default=PopulationConfig(), metadata={"task": Task.EMNIST})
    text: TextConfig = dataclasses.field(default=TextConfig(), metadata={"task": Task.KEYBOARD})

    def __post_init__(self):
        if self.data_dir is not None and not self.data_dir:
            raise validation.ConfigError("data_dir", "data_dir must name a directory (omit it for the embedded data)")
        if not self.cache_dir:
            raise validation.ConfigError("cache_dir", "cache_dir must name a directory")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How one client's examples become training batches.

    Attributes:
      epochs: local passes over the client's data per round.
      batch_size: examples per local step.
      shuffle_buffer: shuffle window; 1 disables shuffling.
      max_examples_per_client: cap on a client's examples per round (-1: all).
    """

    epochs: int = 5
    batch_size: int = 20
    shuffle_buffer: int = 100
    max_examples_per_client: int = -1

    def __post_init__(self):
        validation.integer(1, epochs=self.epochs)
        validation.integer(1, batch_size=self.batch_size)
        validation.integer(1, shuffle_buffer=self.shuffle_buffer)
        validation.integer(-1, max_examples_per_client=self.max_examples_per_client)
        if self.max_examples_per_client == 0:
            raise validation.ConfigError(
                "max_examples_per_client", "max_examples_per_client must be positive or -1 (all), got 0"
            )


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """The federated algorithm, its optimizers and their rates.

    Attributes:
      algorithm: which federated algorithm.
      client_learning_rate: local SGD step size.
      server_learning_rate: server step size; None: the algorithm's default
        (`DEFAULT_SERVER_LEARNING_RATE`).
      server_momentum: FedAvgM's momentum.
      adaptive_epsilon: FedAdam/FedYogi/FedAdagrad's tau (Reddi et al. use 1e-3).
      proximal_strength: FedProx's mu.
    """

    algorithm: Algorithm = Algorithm.FEDAVG
    client_learning_rate: float = 0.1
    server_learning_rate: float | None = None
    server_momentum: float = 0.9
    adaptive_epsilon: float = 1e-3
    proximal_strength: float = 0.01

    def __post_init__(self):
        if self.server_learning_rate is None:
            object.__setattr__(self, "server_learning_rate", DEFAULT_SERVER_LEARNING_RATE[self.algorithm])
        validation.positive(client_learning_rate=self.client_learning_rate)
        validation.positive(server_learning_rate=self.server_learning_rate)
        validation.in_range(0, 1, closed="[)", server_momentum=self.server_momentum)
        validation.positive(adaptive_epsilon=self.adaptive_epsilon)
        validation.non_negative(proximal_strength=self.proximal_strength)


@dataclasses.dataclass(frozen=True)
class DpConfig:
    """The aggregation mechanism and its parameters (`aggregation` builds it).

    Attributes:
      mechanism: none, fixed, adaptive or tree (see `Mechanism`).
      noise_multiplier: z, the noise std on the clipped sum is z * C; None: 0.7 with
        a mechanism, 0 without. With a target epsilon it is solved for instead
        (`accounting.create_plan`) and must stay None.
      clip: C, the L2 clip (fixed, tree) or the initial clip (adaptive).
      target_quantile: adaptive: the fraction of updates that should fall under the clip.
      clip_learning_rate: adaptive: geometric step of the clip towards the quantile.
      zeroing_norm: if > 0, updates with a larger L-inf norm are zeroed before
        clipping (robustness to corrupt devices; privacy unchanged).
      distributed_noise: distributed: each device's noise, discrete Gaussian (None: the
        default with the distributed mechanism) or Skellam.
      bits: distributed: the secure sum works modulo 2^bits; None: 20 with the
        distributed mechanism. Fewer bits mean coarser rounding, which inflates the
        sensitivity (`accounting` refuses a width that is unusable for the model and cohort).
    """

    mechanism: Mechanism = Mechanism.FIXED
    noise_multiplier: float | None = None
    clip: float = 1.0
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    zeroing_norm: float = 0.0
    bits: int | None = None
    distributed_noise: DistributedNoise | None = None

    def __post_init__(self):
        if self.bits is None:
            if self.mechanism is Mechanism.DISTRIBUTED:
                object.__setattr__(self, "bits", DEFAULT_DISTRIBUTED_BITS)
        else:
            validation.integer(1, bits=self.bits)
            if self.bits > MAX_DISTRIBUTED_BITS:
                raise validation.ConfigError(
                    "bits",
                    f"bits must be an integer from 1 to {MAX_DISTRIBUTED_BITS}, got {self.bits}: TFF's distributed "
                    "DP rounds in float32, exact for integers up to 2^24 only",
                )
            if self.mechanism not in (Mechanism.DISTRIBUTED, Mechanism.NONE):  # none: unused, as noise_multiplier
                raise validation.ConfigError(
                    "bits",
                    f"bits={self.bits} is the distributed mechanism's field width and has no effect with mechanism "
                    f"{self.mechanism.value}; choose mechanism distributed, or leave bits unset",
                )
        if self.distributed_noise is None:
            if self.mechanism is Mechanism.DISTRIBUTED:
                object.__setattr__(self, "distributed_noise", DistributedNoise.DISCRETE_GAUSSIAN)
        elif self.mechanism not in (Mechanism.DISTRIBUTED, Mechanism.NONE):  # none: unused, as noise_multiplier
            raise validation.ConfigError(
                "distributed_noise",
                f"distributed_noise={self.distributed_noise.value} is the distributed mechanism's noise and has no "
                f"effect with mechanism {self.mechanism.value}; choose mechanism distributed, or leave it unset",
            )
        if self.noise_multiplier is not None:
            # With mechanism none it is unused (`ExperimentConfig.unused_dp_parameters`), not refused:
            # `--dp=none` must be able to override a preset that sets it.
            validation.non_negative(noise_multiplier=self.noise_multiplier)
        validation.positive(clip=self.clip)
        validation.in_range(0, 1, closed="()", target_quantile=self.target_quantile)
        validation.positive(clip_learning_rate=self.clip_learning_rate)
        validation.non_negative(zeroing_norm=self.zeroing_norm)

    @property
    def is_private(self) -> bool:
        return self.mechanism is not Mechanism.NONE

    @property
    def given_noise_multiplier(self) -> float:
        """z as configured (before any target epsilon is solved for)."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return DEFAULT_NOISE_MULTIPLIER if self.is_private else 0.0


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Accounting choices (the mechanism itself is `DpConfig`).

    Attributes:
      sampling: how clients are picked; None picks what the mechanism is accounted
        for (`default_sampling`).
      delta: None gives 1 / population^1.1.
      accountant: RDP or PLD.
      target_epsilon: if set, the noise multiplier is solved to reach it over the rounds.
      max_epsilon: a budget: the run stops before the round that would take the
        accountant's epsilon past it (raise it to continue a stopped run).
      canaries: canary clients for the empirical privacy audit (`audit`); they join
        the sampled population.
    """

    sampling: Sampling | None = None
    delta: float | None = None
    accountant: Accountant = Accountant.RDP
    target_epsilon: float | None = None
    max_epsilon: float | None = dataclasses.field(default=None, metadata=_RESUMABLE)
    canaries: int = 0

    def __post_init__(self):
        if self.delta is not None:
            validation.in_range(0, 1, closed="()", delta=self.delta)
        if self.target_epsilon is not None:
            validation.positive(target_epsilon=self.target_epsilon)
        if self.max_epsilon is not None:
            validation.positive(max_epsilon=self.max_epsilon)
        validation.integer(0, canaries=self.canaries)
        if self.canaries == 1:
            raise validation.ConfigError("canaries", "canaries must be 0 (no audit) or at least 2, to fit their spread")


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """How rounds run on simulated mobile devices (`devices`).

    Attributes:
      overselect: ask k * (1 + overselect) devices, to absorb dropouts and stragglers.
      deadline_seconds: the round closes at this simulated time (0: wait for k reports).
      start_hour_utc: simulated clock at round 1, in [0, 24).
      server_gap_seconds: simulated time between rounds (server work, scheduling).
      device_profiles: a profile CSV; None derives profiles from the seed.
    """

    overselect: float = 0.3
    deadline_seconds: float = 240.0
    start_hour_utc: float = 4.0
    server_gap_seconds: float = 30.0
    device_profiles: str | None = None

    def __post_init__(self):
        validation.in_range(0, 100, overselect=self.overselect)
        validation.non_negative(deadline_seconds=self.deadline_seconds)
        validation.in_range(0, 24, closed="[)", start_hour_utc=self.start_hour_utc)
        validation.non_negative(server_gap_seconds=self.server_gap_seconds)
        if self.device_profiles is not None:
            validation.readable_file(device_profiles=self.device_profiles)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Rounds and cadences: all may change when a run is resumed or extended."""

    rounds: int = dataclasses.field(default=50, metadata=_RESUMABLE)
    eval_every: int = dataclasses.field(default=10, metadata=_RESUMABLE)
    checkpoint_every: int = dataclasses.field(default=1, metadata=_RESUMABLE)

    def __post_init__(self):
        validation.integer(1, rounds=self.rounds)
        validation.integer(1, eval_every=self.eval_every)
        validation.integer(1, checkpoint_every=self.checkpoint_every)


# A TFF worker holding a small model's executor stacks; the keyboard LSTM's takes ~2.4 GB.
_WORKER_MEMORY_BYTES = 512 << 20
_MAX_LOCAL_WORKERS = 64


def max_local_workers() -> int:
    """Local workers this machine can hold: one per 512 MiB of memory (`memory_bytes`), at most 64."""
    memory = memory_bytes()
    return max(1, min(_MAX_LOCAL_WORKERS, memory // _WORKER_MEMORY_BYTES)) if memory else _MAX_LOCAL_WORKERS


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where the client work runs (`runtime`); it may change between runs of one experiment.

    Attributes:
      workers: addresses (host:port) of worker services started elsewhere
        (`experiments.worker`); empty: workers started here.
      local_workers: worker processes started on this machine (with no `workers`).
      pin_workers: pin each local worker to one CPU of its own.
      worker_retries: times a round is run again on the workers left when one dies.
    """

    workers: tuple[str, ...] = dataclasses.field(default=(), metadata=_RESUMABLE)
    local_workers: int = dataclasses.field(default=1, metadata=_RESUMABLE)
    pin_workers: bool = dataclasses.field(default=False, metadata=_RESUMABLE)
    worker_retries: int = dataclasses.field(default=2, metadata=_RESUMABLE)

    def __post_init__(self):
        object.__setattr__(self, "workers", tuple(self.workers))
        for address in self.workers:
            try:
                network.parse_endpoint(address)
            except ValueError as e:
                raise validation.ConfigError("workers", f"workers: {e}") from None
        validation.integer(1, local_workers=self.local_workers)
        limit = max_local_workers() if self.local_workers > 1 else 1  # (memory_bytes is defined below)
        if self.local_workers > limit:
            raise validation.ConfigError(
                "local_workers",
                f"local_workers must be <= {limit} here: each local worker needs about "
                f"{_WORKER_MEMORY_BYTES >> 20} MiB of this machine's {memory_bytes() / 2**30:.1f} GiB "
                "(and more workers than cores add no speed); for more, start workers on other machines (--workers)",
            )
        validation.integer(0, worker_retries=self.worker_retries)
        if self.workers and self.local_workers > 1:
            raise validation.ConfigError(
                "local_workers", "give remote workers or local_workers, not both (remote workers replace local ones)"
            )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment; every section validated, then the rules that span them.

    Attributes:
      task: what clients hold and the model predicts.
      model: a registered model name of the task, or `package.module:function`;
        None: the task's default.
      clients_per_round: m, expected clients per round.
      eval_clients: held-out clients per evaluation (0: none).
      seed: seeds client sampling, shuffling, DP noise and model init.
      root_dir, experiment: outputs go to <root_dir>/<experiment>.
      devices: the mobile device model; None: every sampled client reports.
      compression: TFF's 8-bit compression aggregator (not with DP).
      secure_aggregation: TFF's secure sum of the weighted mean, with adaptive zeroing,
        clipping and secure bounds (not with DP: the distributed mechanism sums securely
        itself). Simulated: the secure sum runs as a plain modular sum.
      runtime: the worker services the client work runs on.
      client_batching: how a round's real clients reach TensorFlow: "off", one TFF
        client each (per-client computations); K (a positive integer, at most
        clients_per_round), groups of up to K trained in one call each
        (`client_groups`); "auto", groups where they run and measured no slower (model
        kinds in `client_groups.AUTO_GROUPS`; every algorithm; no DP, or central DP with
        or without zeroing; not compression), per client otherwise.
    """

    task: Task = Task.EMNIST
    model: str | None = None
    clients_per_round: int = 50
    eval_clients: int = 200
    seed: int = 0
    root_dir: str = dataclasses.field(default="runs", metadata=_RESUMABLE)
    experiment: str = dataclasses.field(default="default", metadata=_RESUMABLE)
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    dp: DpConfig = DpConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    loop: LoopConfig = LoopConfig()
    devices: DeviceConfig | None = None
    compression: bool = False
    secure_aggregation: bool = False
    runtime: RuntimeConfig = RuntimeConfig()
    client_batching: str = "off"

    def __post_init__(self):
        if self.model is None:
            object.__setattr__(self, "model", DEFAULT_MODEL[self.task])
        if not self.model:
            raise validation.ConfigError("model", "model must name a registered model or package.module:function")
        validation.integer(1, clients_per_round=self.clients_per_round)
        validation.integer(0, eval_clients=self.eval_clients)
        validation.integer(0, seed=self.seed)
        if not self.root_dir:
            raise validation.ConfigError("root_dir", "root_dir must name a directory")
        validation.plain_name(experiment=self.experiment)
        _drop_unused_dp_parameters(self)
        _check_sizes(self, memory_bytes())
        _check_combinations(self)
        _check_client_batching(self)

    @property
    def client_batching_fallback(self) -> str | None:
        """Why a client group size given was set to off (`per_client_reason`), for a one-line note."""
        return getattr(self, "_client_batching_fallback", None)

    @property
    def unused_dp_parameters(self) -> tuple[str, ...]:
        """Paths of the DP parameters given with mechanism none, which the run does not use (dropped)."""
        return getattr(self, "_unused_dp_parameters", ())

    @property
    def sampling(self) -> Sampling:
        """The sampling actually used: the device model's, the configured one, or the mechanism's default."""
        if self.devices is not None:
            return Sampling.DEVICE
        return self.privacy.sampling or default_sampling(self.dp.mechanism)

    def hparams(self) -> dict[str, Any]:
        """Flat, JSON-friendly view: `section.field` keys, enums as their values.

        Fields of another task than the run's are left out: they cannot change its result.
        """
        flat = _flatten(self, task=self.task)
        flat["privacy.sampling"] = self.sampling.value
        return flat


def _drop_unused_dp_parameters(config: ExperimentConfig) -> None:
    """With mechanism none, the DP parameters given (by a preset, say) are unused: dropped, and remembered.

    So the config holds what the run uses (no noise, no target, no field width), and the
    binaries can say in one line what was dropped; `--dp=none` overrides a preset's mechanism.
    """
    if config.dp.is_private:
        return
    given = {
        "dp.noise_multiplier": config.dp.noise_multiplier or None,  # 0: no noise either way
        "dp.bits": config.dp.bits,
        "dp.distributed_noise": config.dp.distributed_noise,
        "privacy.target_epsilon": config.privacy.target_epsilon,
    }
    object.__setattr__(config, "_unused_dp_parameters", tuple(path for path, value in given.items() if value))
    object.__setattr__(
        config, "dp", dataclasses.replace(config.dp, noise_multiplier=None, bits=None, distributed_noise=None)
    )
    object.__setattr__(config, "privacy", dataclasses.replace(config.privacy, target_epsilon=None))


def task_of(path: str) -> Task | None:
    """The task a field belongs to (its or an enclosing section's `task` metadata); None: every task."""
    cls: type = ExperimentConfig
    prefix = ""
    for name in path.split("."):
        field = {f.name: f for f in dataclasses.fields(cls)}[name]
        if "task" in field.metadata:
            return field.metadata["task"]
        prefix = f"{prefix}{name}"
        cls = _SECTIONS.get(prefix)
        if cls is None:
            return None
        prefix += "."
    return None


def default_sampling(mechanism: Mechanism) -> Sampling:
    """The sampling each mechanism is accounted for when none is asked for."""
    return {
        Mechanism.NONE: Sampling.UNIFORM,
        Mechanism.FIXED: Sampling.POISSON,
        Mechanism.ADAPTIVE: Sampling.POISSON,
        Mechanism.TREE: Sampling.SHUFFLE,
        Mechanism.DISTRIBUTED: Sampling.POISSON,
    }[mechanism]


def min_adaptive_clients(noise_multiplier: float) -> int:
    """Fewest clients per round for adaptive clipping at this z (z < 2 * 0.05 * m)."""
    return int(noise_multiplier / (2 * ADAPTIVE_COUNT_STDDEV_PER_CLIENT)) + 1


# Upper bounds on sizes, from this machine's memory (`_check_sizes`). Each size is bounded
# by what one unit of it costs at the least, so a size over its bound cannot fit: it is
# refused here, naming it, before any model is built or file written, instead of as a
# MemoryError or a dead worker once the experiment directory exists. The bounds are
# necessary, not sufficient: a run within them may still not fit.
_FLOAT32 = 4
BYTES_PER_CLIENT = 1024  # a population client: its id, example count and sampling state, in several lists
BYTES_PER_EMNIST_EXAMPLE = _FLOAT32 * 28 * 28 + 64  # generated in memory, one writer at a time
BYTES_PER_MESSAGE = 512  # a generated message with its title and tags, one user at a time
# An output id of the keyboard models: a 96-float embedding row (tied to the output) and a
# bias, held about 8 times while training (weights, gradient, client and server copies, slots).
BYTES_PER_OUTPUT_ID = 8 * _FLOAT32 * (96 + 1)
LOGIT_SEQUENCES = 100  # the keyboard's evaluation batch: sequence_length x output ids float32 logits each
BYTES_PER_SHUFFLE_SLOT = 64  # tf.data reserves the whole shuffle buffer up front (1e11 slots killed the worker)


def memory_bytes() -> int:
    """This machine's memory, or its cgroup's limit when lower; 0 when unknown (then nothing is bounded)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 0
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        limit = ""
    if limit.isdigit() and int(limit) > 0:
        total = min(total, int(limit)) if total > 0 else int(limit)
    return max(total, 0)


def _check_sizes(config: ExperimentConfig, memory: int) -> None:
    """Refuses a size whose least memory exceeds `memory` bytes, naming its field."""
    if memory <= 0:
        return

    def fits(field: str, value: int, units: int, unit_bytes: int, what: str) -> None:
        if units * unit_bytes <= memory:
            return
        name = field.rpartition(".")[2]
        raise validation.ConfigError(
            field,
            f"{name}={value} needs at least {units * unit_bytes / 1e9:,.1f} GB of memory ({units:,} x {unit_bytes:,} "
            f"bytes: {what}), more than this machine's {memory / 1e9:,.1f} GB; lower {name}",
        )

    fits("clients_per_round", config.clients_per_round, config.clients_per_round, BYTES_PER_CLIENT, "a client each")
    canaries = config.privacy.canaries
    fits("privacy.canaries", canaries, canaries, BYTES_PER_CLIENT, "each canary is a client of the population")
    fits(
        "preprocess.shuffle_buffer",
        config.preprocess.shuffle_buffer,
        config.preprocess.shuffle_buffer,
        BYTES_PER_SHUFFLE_SLOT,
        "a slot each, which tf.data reserves up front",
    )
    embedded = config.data.data_dir is None
    if config.task is Task.EMNIST:
        population = config.data.population
        if embedded:
            writers, examples = population.num_writers, population.median_examples
            fits("data.population.num_writers", writers, writers, BYTES_PER_CLIENT, "a client each")
            fits("data.population.median_examples", examples, examples, BYTES_PER_EMNIST_EXAMPLE, "an example each")
        return
    text = config.data.text
    if embedded:
        users, messages = text.population.num_users, text.population.median_messages
        fits("data.text.population.num_users", users, users, BYTES_PER_CLIENT, "a client each")
        fits("data.text.population.median_messages", messages, messages, BYTES_PER_MESSAGE, "a message each")
    ids = text.vocab_size + text.num_oov_buckets + 3  # with padding, beginning and end of sentence
    field = "data.text.vocab_size" if text.vocab_size >= text.num_oov_buckets else "data.text.num_oov_buckets"
    value = text.vocab_size if field.endswith("vocab_size") else text.num_oov_buckets
    fits(field, value, ids, BYTES_PER_OUTPUT_ID, "an output id each: a 96-float row and a bias, 8 copies in training")
    fits(
        "data.text.sequence_length",
        text.sequence_length,
        text.sequence_length * ids * LOGIT_SEQUENCES,
        _FLOAT32,
        f"a float32 logit per word position and output id, for a batch of {LOGIT_SEQUENCES} sequences",
    )


# What `client_groups` trains in groups (the model kind is checked once the model is built).
GROUPED_ALGORITHMS = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedsgd"})
GROUPED_MECHANISMS = frozenset({"none", "fixed", "adaptive", "tree"})  # zeroing with any of them


# A group that sends each member's update for the aggregator to clip or check
# (`client_groups.MembersFactory`) holds K copies of the update about this many times at
# once: the rows its members write, their stacked and padded result, the aggregator's record.
GROUP_UPDATE_COPIES = 4


def group_sends_members(dp: DpConfig) -> bool:
    """Whether a client group sends its members' updates stacked, K copies of the update.

    Adaptive clipping (the clip is in the aggregator's state, and it counts each update
    under it), tree aggregation (its clip is the query's) and zeroing (each update's norm
    checked) need each real member's own update at the aggregator; without DP a group
    sends its mean, with fixed clipping its members' clipped sum.
    """
    if dp.mechanism in (Mechanism.ADAPTIVE, Mechanism.TREE):
        return True
    return dp.mechanism is Mechanism.FIXED and dp.zeroing_norm > 0


def member_group_limit(config: ExperimentConfig, update_bytes: int, memory: int | None = None) -> int | None:
    """The largest group size whose stacked member updates fit a group's memory budget; None: unbounded.

    Only groups that send their members' updates (`group_sends_members`) are bounded. The
    budget of a group: half of this machine's memory (`memory_bytes`, or `memory`) shared
    by the workers, for `GROUP_UPDATE_COPIES` copies of K updates of `update_bytes` each.
    """
    if not group_sends_members(config.dp):
        return None
    memory = memory_bytes() if memory is None else memory
    if memory <= 0:
        return None
    workers = max(1, len(config.runtime.workers) or config.runtime.local_workers)
    return max(1, memory // (2 * workers) // (GROUP_UPDATE_COPIES * update_bytes))


def client_group_size(config: ExperimentConfig) -> int | None:
    """K of `client_batching` given as a number; None for "off" and "auto"."""
    value = str(config.client_batching).strip().lower()
    return None if value in ("off", "auto") else int(value)


def client_batching_obstacle(config: ExperimentConfig) -> str | None:
    """Why the configuration cannot train in client groups, or None if it can (the model aside)."""
    if config.algorithm.algorithm.value not in GROUPED_ALGORITHMS:
        return f"algorithm {config.algorithm.algorithm.value} has no grouped client work yet"
    if config.dp.mechanism.value not in GROUPED_MECHANISMS:
        return f"the {config.dp.mechanism.value} DP mechanism has no grouped path"
    if config.compression or config.secure_aggregation:
        return "compression and secure aggregation act on each update and have no grouped path yet"
    return None


def _check_client_batching(config: ExperimentConfig) -> None:
    """`client_batching` is off, auto or a group size K in [1, clients_per_round] the configuration can use."""
    value = str(config.client_batching).strip().lower()
    if value in ("off", "auto"):
        object.__setattr__(config, "client_batching", value)
        return
    try:
        k = int(value)
    except ValueError:
        raise validation.ConfigError(
            "client_batching",
            f"client_batching must be off, auto or a group size (a positive integer), got {config.client_batching!r}",
        ) from None
    if k < 1:
        raise validation.ConfigError("client_batching", f"client_batching must be a positive group size, got {k}")
    if k > config.clients_per_round:
        raise validation.ConfigError(
            "client_batching",
            f"client_batching={k} is more than clients_per_round={config.clients_per_round}: a group holds at most "
            "a round's clients; use at most clients_per_round, or auto",
        )
    reason = per_client_reason(config)
    if reason is not None:  # by design, not for want of a grouped path: the run goes per client, with a note
        object.__setattr__(config, "_client_batching_fallback", f"client_batching={k} runs per client: {reason}")
        object.__setattr__(config, "client_batching", "off")
        return
    obstacle = client_batching_obstacle(config)
    if obstacle is not None:
        raise validation.ConfigError("client_batching", f"client_batching={k} cannot run: {obstacle}; use off or auto")
    object.__setattr__(config, "client_batching", str(k))


def per_client_reason(config: ExperimentConfig) -> str | None:
    """Why the aggregation must see each real client on its own, or None (then groups can carry several).

    Distributed DP and secure aggregation act on each device's own update: its noise
    share, its rounding, its secure-sum input. A group of clients trained in one call
    would hand the aggregator one summed update, so these always run per client.
    """
    if config.dp.mechanism is Mechanism.DISTRIBUTED:
        return "distributed DP needs each real client's own clipping, rounding and noise share"
    if config.secure_aggregation:
        return "secure aggregation sums each real client's own update"
    return None


def _check_combinations(config: ExperimentConfig) -> None:
    """Rules that span sections; each error names the parameter to change."""
    dp, privacy = config.dp, config.privacy
    error = validation.ConfigError
    if config.compression and dp.mechanism is Mechanism.DISTRIBUTED:
        raise error(
            "compression",
            f"compression is not combined with the distributed mechanism: it already quantizes each update to "
            f"bits={dp.bits} for the secure sum, and compressing on top would change what its accounting covers; "
            "drop compression (choose the width with bits)",
        )
    if config.compression and dp.is_private:
        raise error(
            "compression",
            f"compression is not combined with DP aggregation (mechanism {dp.mechanism.value}): quantizing a "
            "clipped update can push it past the clip, which the accounting does not cover; "
            "use mechanism none with compression",
        )
    if privacy.sampling is Sampling.DEVICE and config.devices is None:
        raise error(
            "privacy.sampling",
            "sampling=device describes the device model; enable the device model or leave sampling unset",
        )
    if config.devices is not None and privacy.sampling not in (None, Sampling.DEVICE):
        raise error(
            "privacy.sampling",
            f"sampling={privacy.sampling.value} cannot hold under the device model, which decides participation "
            "itself; leave sampling unset",
        )
    if dp.mechanism is Mechanism.TREE and config.devices is not None:
        raise error(
            "dp.mechanism",
            "tree aggregation is accounted for clients that take part at most once, which the device model cannot "
            "promise; use the fixed or adaptive mechanism with the device model",
        )
    sampling = config.sampling
    if dp.mechanism is Mechanism.TREE and sampling is not Sampling.SHUFFLE:
        raise error(
            "privacy.sampling",
            "tree aggregation is accounted for clients that take part at most once (sampling=shuffle); "
            f"got sampling={sampling.value}",
        )
    if dp.mechanism is not Mechanism.TREE and sampling is Sampling.SHUFFLE:
        raise error(
            "privacy.sampling", "sampling=shuffle is only accounted for the tree mechanism; use poisson or uniform"
        )
    if privacy.accountant is Accountant.PLD and sampling not in (Sampling.POISSON, Sampling.DEVICE):
        raise error(
            "privacy.accountant",
            f"the PLD accountant does not support sampling={sampling.value}; use the RDP accountant",
        )
    _check_distributed(config, sampling)
    if config.secure_aggregation and (dp.is_private or config.compression):
        other = "compression" if config.compression else f"mechanism {dp.mechanism.value}"
        raise error(
            "secure_aggregation",
            f"secure_aggregation is TFF's secure sum without DP and is not combined with {other}; use it with "
            "mechanism none and no compression, or choose mechanism distributed for DP with secure aggregation",
        )
    if privacy.target_epsilon is not None and dp.noise_multiplier is not None:  # without DP both were dropped
        raise error(
            "dp.noise_multiplier",
            "give noise_multiplier or target_epsilon, not both (the noise is solved for the target)",
        )
    if privacy.max_epsilon is not None and not dp.is_private:
        raise error("privacy.max_epsilon", "max_epsilon needs a DP mechanism: without one epsilon is infinite")
    if privacy.canaries and config.devices is not None:
        raise error(
            "privacy.canaries",
            "canaries are sampled like every client, which the device model does not do (it picks devices by "
            "availability); audit without the device model",
        )
    if dp.mechanism is Mechanism.ADAPTIVE and privacy.target_epsilon is None:
        z, m = dp.given_noise_multiplier, config.clients_per_round
        if z > 0 and m < min_adaptive_clients(z):
            raise error(
                "clients_per_round",
                f"adaptive clipping with noise_multiplier={z:g} needs at least {min_adaptive_clients(z)} clients per "
                f"round (TFF noises the clipped count with std 0.05*clients_per_round, which must exceed "
                f"noise_multiplier/2); got clients_per_round={m}. Raise clients_per_round, lower noise_multiplier "
                f"below {2 * ADAPTIVE_COUNT_STDDEV_PER_CLIENT * m:g}, or use the fixed mechanism",
            )
    if config.algorithm.algorithm is Algorithm.FEDSGD and dp.is_private:
        raise error(
            "algorithm.algorithm",
            "fedsgd takes only weighted aggregators in TFF 0.87, and DP aggregation is unweighted; "
            "use algorithm=fedavg with epochs=1 for DP",
        )


def _check_distributed(config: ExperimentConfig, sampling: Sampling) -> None:
    """The distributed mechanism's rules: what its accounting covers (`accounting`, Poisson or devices, RDP)."""
    if config.dp.mechanism is not Mechanism.DISTRIBUTED:
        return
    error = validation.ConfigError
    if sampling not in (Sampling.POISSON, Sampling.DEVICE):
        raise error(
            "privacy.sampling",
            f"the distributed mechanism is accounted under Poisson sampling (or the device model, without "
            f"amplification); got sampling={sampling.value}. Use sampling=poisson or leave it unset",
        )
    if config.privacy.accountant is not Accountant.RDP:
        raise error(
            "privacy.accountant",
            "the distributed discrete Gaussian is accounted with its RDP bound (Kairouz, Liu, Steinke 2021); "
            "use the RDP accountant",
        )
    if config.dp.zeroing_norm > 0:
        raise error(
            "dp.zeroing_norm",
            "zeroing is not wired into the distributed mechanism (its clipping runs on each device inside "
            "TFF's factory); set zeroing_norm to 0",
        )


def _flatten(config: Any, prefix: str = "", task: Task | None = None) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if task is not None and field.metadata.get("task", task) is not task:
            continue
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, f"{prefix}{field.name}.", task))
        else:
            flat[f"{prefix}{field.name}"] = value.value if isinstance(value, enum.Enum) else _jsonable(value)
    return flat


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resumable_keys() -> frozenset[str]:
    """hparams keys that may change between runs of one experiment (rounds, cadences, paths)."""
    keys = set()

    def visit(cls: type, prefix: str) -> None:
        for field in dataclasses.fields(cls):
            if field.metadata.get("resumable"):
                keys.add(f"{prefix}{field.name}")
            default = field.default if field.default is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                visit(type(default), f"{prefix}{field.name}.")

    visit(ExperimentConfig, "")
    return frozenset(keys)


# Sections of ExperimentConfig that `build` assembles from dotted paths.
_SECTIONS: Mapping[str, type] = {
    "data.text.population": TextPopulationConfig,
    "data.text": TextConfig,
    "data.population": PopulationConfig,
    "data": DataConfig,
    "preprocess": PreprocessConfig,
    "algorithm": AlgorithmConfig,
    "dp": DpConfig,
    "privacy": PrivacyConfig,
    "loop": LoopConfig,
    "devices": DeviceConfig,
    "runtime": RuntimeConfig,
}


def build(values: Mapping[str, Any], *, devices: bool = False) -> ExperimentConfig:
    """An `ExperimentConfig` from `{dotted path: value}`; unnamed fields keep their defaults.

    Fields in `TASK_DEFAULTS` that are absent or None take the task's default (and with
    them the task's server learning rate, `TASK_SERVER_LEARNING_RATE`).

    Raises:
      validation.ConfigError: whose `field` is the dotted path of the value at fault.
    """
    unknown = sorted(set(values) - set(field_paths()))
    if unknown:
        raise KeyError(f"not configuration fields: {unknown}")
    values = with_task_defaults(values)
    built: dict[str, Any] = {}
    # Innermost sections first, so a section finds its sub-sections built.
    for path in sorted(_SECTIONS, key=lambda p: -p.count(".")):
        if path == "devices" and not devices:
            continue
        prefix = f"{path}."
        kwargs = {
            k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix) and "." not in k[len(prefix) :]
        }
        kwargs.update(
            {k[len(prefix) :]: v for k, v in built.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}
        )
        try:
            built[path] = _SECTIONS[path](**kwargs)
        except validation.ConfigError as e:
            raise e.prefixed(prefix) from None
    top = {k: v for k, v in values.items() if "." not in k}
    top.update({k: v for k, v in built.items() if "." not in k})
    if not devices:
        top["devices"] = None
    return ExperimentConfig(**top)


def with_task_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with the task's default for each `TASK_DEFAULTS` field that is absent or None."""
    task = Task(values.get("task") or Task.EMNIST)
    resolved = dict(values)
    for path, by_task in TASK_DEFAULTS.items():
        if resolved.get(path) is None:
            resolved[path] = by_task[task]
    if resolved.get("algorithm.server_learning_rate") is None:
        algorithm = Algorithm(resolved["algorithm.algorithm"])
        resolved["algorithm.server_learning_rate"] = TASK_SERVER_LEARNING_RATE.get(task, {}).get(algorithm)
    return resolved


def field_paths() -> list[str]:
    """Every settable leaf field of ExperimentConfig, as a dotted path."""
    paths = []

    def visit(cls: type, prefix: str) -> None:
        for field in dataclasses.fields(cls):
            path = f"{prefix}{field.name}"
            if path in _SECTIONS:
                visit(_SECTIONS[path], f"{path}.")
            else:
                paths.append(path)

    visit(ExperimentConfig, "")
    return paths


def default(path: str) -> Any:
    """The default of a leaf field, as `build` would use it (None where resolved later)."""
    section, _, name = path.rpartition(".")
    cls = _SECTIONS[section] if section else ExperimentConfig
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


class ExportVariant(enum.Enum):
    """A TFLite file of the trained model (`export`)."""

    FLOAT32 = "float32"  # the model as trained
    DYNAMIC_INT8 = "dynamic_int8"  # int8 weights, float activations (dynamic-range quantization)
    FULL_INT8 = "full_int8"  # int8 weights and activations, calibrated on training clients' examples


def export_variants(names: Any) -> tuple[ExportVariant, ...]:
    """Variants by name, in the order given, each once.

    Raises:
      validation.ConfigError: naming `variants`, for an unknown name or none at all.
    """
    valid = [v.value for v in ExportVariant]
    chosen: list[ExportVariant] = []
    for name in names:
        if name not in valid:
            raise validation.ConfigError("variants", f"unknown variant {name!r}; choose among {valid}")
        if ExportVariant(name) not in chosen:
            chosen.append(ExportVariant(name))
    if not chosen:
        raise validation.ConfigError("variants", f"no variant to export; choose among {valid}")
    return tuple(chosen)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What `export` writes and how much it measures (not part of an experiment's configuration).

    Attributes:
      variants: the TFLite files to write.
      parity_examples: held-out examples (from the first held-out clients in id order) for parity and latency.
      representative_examples: training clients' examples that calibrate full-integer quantization.
      latency_runs: timed single-example calls; the manifest gives their median.
    """

    variants: tuple[ExportVariant, ...] = tuple(ExportVariant)
    parity_examples: int = 1000
    representative_examples: int = 200
    latency_runs: int = 100

    def __post_init__(self):
        export_variants([v.value if isinstance(v, ExportVariant) else v for v in self.variants])
        validation.integer(1, parity_examples=self.parity_examples)
        validation.integer(1, representative_examples=self.representative_examples)
        validation.integer(1, latency_runs=self.latency_runs)


@dataclasses.dataclass(frozen=True)
class PersonalizationConfig:
    """On-device personalization evaluation (`personalization`): fine-tune on each client's first examples.

    Attributes:
      epochs: local passes over a client's fine-tuning examples (client SGD at the run's rate and batch size).
      fraction: share of each held-out client's examples, taken first, used for fine-tuning; the rest is evaluated.
      max_clients: evaluate at most this many held-out clients, in id order (-1: all).
      learning_rate: the fine-tuning SGD rate; None: the run's client learning rate. A
        training step is clipped and averaged over a cohort, a fine-tuning step is
        neither, so the training rate can be too large for it (README, "What reaches the phone").
      every: in training only, personalize the evaluation's held-out clients every this
        many rounds and at the last (0: never); see `check_in_training`.
    """

    epochs: int = 1
    fraction: float = 0.5
    max_clients: int = -1
    learning_rate: float | None = None
    every: int = 0

    def __post_init__(self):
        if self.learning_rate is not None:
            validation.positive(learning_rate=self.learning_rate)
        validation.integer(1, epochs=self.epochs)
        validation.in_range(0, 1, closed="()", fraction=self.fraction)
        validation.integer(-1, max_clients=self.max_clients)
        if self.max_clients == 0:
            raise validation.ConfigError("max_clients", "max_clients must be positive or -1 (all), got 0")
        validation.integer(0, every=self.every)

    def check_in_training(self, config: ExperimentConfig) -> None:
        """Personalization runs with the federated evaluation, on its clients: `every` must fit its cadence.

        Raises:
          validation.ConfigError: naming `every`.
        """
        if self.every == 0:
            return
        if config.eval_clients == 0:
            raise validation.ConfigError(
                "every", f"every={self.every} personalizes the evaluation's clients, but eval_clients=0 evaluates none"
            )
        if self.every % config.loop.eval_every:
            raise validation.ConfigError(
                "every",
                f"every={self.every} must be a multiple of eval_every={config.loop.eval_every} "
                "(personalization runs with the federated evaluation)",
            )
