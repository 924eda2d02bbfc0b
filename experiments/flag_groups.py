"""absl flag definitions, grouped, and their conversion into an `ExperimentConfig`.

Only binaries import this module; the library never reads flags. Every value is
validated by the config it lands in, and a failure is reported as
`--flag=value: reason` before anything heavy starts.
"""

from __future__ import annotations

from absl import flags

from tffpipe import accounting, aggregation, algorithms, configs, devices, models, training_loop
from tffpipe.data import generator, preprocessing

FLAGS = flags.FLAGS


def _enum_values(enum_cls) -> list[str]:
    return [e.value for e in enum_cls]


def define_data_flags() -> None:
    flags.DEFINE_string("data_dir", None, "Directory holding a real emnist_all.sqlite; unset: embedded generated data.")
    flags.DEFINE_string("cache_dir", "data_cache", "Where the embedded data is generated (once per configuration).")
    flags.DEFINE_bool("only_digits", False, "Use the 10 digit classes instead of all 62.")
    flags.DEFINE_integer("num_writers", 3400, "Embedded data: writers (clients) in the population.")
    flags.DEFINE_integer("median_examples", 60, "Embedded data: median examples per writer.")
    flags.DEFINE_float("label_concentration", 2.0, "Embedded data: Dirichlet label-skew concentration (small: skewed).")
    flags.DEFINE_float("quantity_sigma", 0.8, "Embedded data: log-normal sigma of examples per writer.")
    flags.DEFINE_integer("data_seed", 0, "Embedded data: generator seed.")


def define_model_flags() -> None:
    flags.DEFINE_string("model", "small_cnn", f"One of {sorted(models.REGISTRY)}, or package.module:function.")


def define_algorithm_flags() -> None:
    flags.DEFINE_enum("algorithm", "fedavg", _enum_values(algorithms.Algorithm), "Federated algorithm.")
    flags.DEFINE_float("client_learning_rate", 0.1, "Client SGD learning rate.")
    flags.DEFINE_float("server_learning_rate", 1.0, "Server optimizer learning rate (1.0 + SGD = FedAvg).")
    flags.DEFINE_float("server_momentum", 0.9, "FedAvgM server momentum.")
    flags.DEFINE_float("adaptive_epsilon", 1e-3, "FedAdam/FedYogi/FedAdagrad tau.")
    flags.DEFINE_float("proximal_strength", 0.01, "FedProx mu.")
    flags.DEFINE_integer("epochs", 5, "Local epochs per round.")
    flags.DEFINE_integer("batch_size", 20, "Local batch size.")
    flags.DEFINE_integer("shuffle_buffer", 100, "Client shuffle buffer (1: no shuffling).")
    flags.DEFINE_integer("max_examples_per_client", -1, "Cap on a client's examples per round (-1: all).")


def define_privacy_flags() -> None:
    flags.DEFINE_enum("dp", "fixed", _enum_values(accounting.Mechanism), "DP aggregation mechanism.")
    flags.DEFINE_float("noise_multiplier", 0.7, "z: noise std on the clipped sum is z * clip.")
    flags.DEFINE_float("clip", 1.0, "L2 clip (fixed/tree) or initial clip (adaptive).")
    flags.DEFINE_float("target_quantile", 0.5, "Adaptive clipping: target fraction of unclipped updates.")
    flags.DEFINE_float("clip_learning_rate", 0.2, "Adaptive clipping: clip learning rate.")
    flags.DEFINE_float("zeroing_norm", 0.0, "Zero updates with larger L-inf norm (0: off).")
    flags.DEFINE_float("target_epsilon", None, "Solve the noise multiplier for this epsilon over --rounds.")
    flags.DEFINE_float("delta", None, "delta; unset: 1 / population^1.1.")
    flags.DEFINE_enum("accountant", "rdp", _enum_values(accounting.Accountant), "Privacy accountant.")


def define_sampling_flags() -> None:
    flags.DEFINE_integer("clients_per_round", 50, "Clients per round (expected number under Poisson sampling).")
    flags.DEFINE_enum(
        "sampling",
        None,
        _enum_values(accounting.Sampling),
        "Client sampling; unset: uniform without DP, poisson for fixed/adaptive, shuffle for tree.",
    )


def define_device_flags() -> None:
    flags.DEFINE_bool(
        "device_model",
        False,
        "Simulate mobile devices: availability windows, speed tiers, dropouts, deadlines (see README).",
    )
    flags.DEFINE_float("overselect", 0.3, "Device model: ask clients_per_round * (1 + overselect) devices.")
    flags.DEFINE_float("deadline_seconds", 240.0, "Device model: reporting deadline in simulated seconds (0: none).")
    flags.DEFINE_float("start_hour_utc", 4.0, "Device model: simulated UTC hour at round 1.")
    flags.DEFINE_float("server_gap_seconds", 30.0, "Device model: simulated seconds between rounds.")
    flags.DEFINE_string("device_profiles", None, "Device model: profile CSV (schema in tffpipe/devices.py).")
    flags.DEFINE_bool("compression", False, "Upload 8-bit quantized updates (TFF's compression aggregator; no DP).")


def define_loop_flags() -> None:
    flags.DEFINE_integer("rounds", 50, "Total rounds; raise it to extend a finished run.")
    flags.DEFINE_integer("eval_every", 10, "Evaluate on held-out clients every N rounds (and at the end).")
    flags.DEFINE_integer("eval_clients", 200, "Held-out clients per evaluation (0: none).")
    flags.DEFINE_integer("checkpoint_every", 1, "Checkpoint every N rounds (and at the end).")
    flags.DEFINE_integer("seed", 0, "Seeds client sampling, shuffling, DP noise and model init.")


def define_output_flags() -> None:
    flags.DEFINE_string("root_dir", "runs", "Root of all experiments' outputs.")
    flags.DEFINE_string("experiment", "default", "Experiment name: outputs go to <root_dir>/<experiment>.")


def define_all() -> None:
    for define in (
        define_data_flags,
        define_model_flags,
        define_algorithm_flags,
        define_privacy_flags,
        define_sampling_flags,
        define_device_flags,
        define_loop_flags,
        define_output_flags,
    ):
        define()


class FlagError(ValueError):
    """A flag value the configuration rejects; the message names the flag."""


def _build(flag_names: tuple[str, ...], make):
    try:
        return make()
    except ValueError as e:
        values = ", ".join(f"--{n}={getattr(FLAGS, n)}" for n in flag_names)
        raise FlagError(f"{values}: {e}") from e


def experiment_config() -> configs.ExperimentConfig:
    """Builds the validated config from parsed flags; raises FlagError naming the flag."""
    population = _build(
        ("num_writers", "median_examples", "quantity_sigma", "label_concentration"),
        lambda: generator.PopulationConfig(
            num_writers=FLAGS.num_writers,
            seed=FLAGS.data_seed,
            median_examples=FLAGS.median_examples,
            quantity_sigma=FLAGS.quantity_sigma,
            label_concentration=FLAGS.label_concentration,
        ),
    )
    preprocess = _build(
        ("epochs", "batch_size", "shuffle_buffer", "max_examples_per_client"),
        lambda: preprocessing.PreprocessConfig(
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            shuffle_buffer=FLAGS.shuffle_buffer,
            max_examples=FLAGS.max_examples_per_client,
            seed=FLAGS.seed,
        ),
    )
    algorithm = _build(
        ("client_learning_rate", "server_learning_rate", "server_momentum", "adaptive_epsilon", "proximal_strength"),
        lambda: algorithms.AlgorithmConfig(
            algorithm=algorithms.Algorithm(FLAGS.algorithm),
            client_learning_rate=FLAGS.client_learning_rate,
            server_learning_rate=FLAGS.server_learning_rate,
            server_momentum=FLAGS.server_momentum,
            adaptive_epsilon=FLAGS.adaptive_epsilon,
            proximal_strength=FLAGS.proximal_strength,
        ),
    )
    mechanism = accounting.Mechanism(FLAGS.dp)
    dp = _build(
        ("dp", "noise_multiplier", "clip", "target_quantile", "clip_learning_rate", "zeroing_norm"),
        lambda: aggregation.DpConfig(
            mechanism=mechanism,
            noise_multiplier=FLAGS.noise_multiplier if mechanism is not accounting.Mechanism.NONE else 0.0,
            clip=FLAGS.clip,
            target_quantile=FLAGS.target_quantile,
            clip_learning_rate=FLAGS.clip_learning_rate,
            zeroing_norm=FLAGS.zeroing_norm,
            noise_seed=FLAGS.seed,
        ),
    )
    if FLAGS.target_epsilon is not None and FLAGS.target_epsilon <= 0:
        raise FlagError(f"--target_epsilon={FLAGS.target_epsilon}: must be positive")
    if FLAGS.delta is not None and not 0 < FLAGS.delta < 1:
        raise FlagError(f"--delta={FLAGS.delta}: must be in (0, 1)")
    privacy = configs.PrivacyConfig(
        sampling=accounting.Sampling(FLAGS.sampling) if FLAGS.sampling else None,
        delta=FLAGS.delta,
        accountant=accounting.Accountant(FLAGS.accountant),
        target_epsilon=FLAGS.target_epsilon,
    )
    device_config = None
    if FLAGS.device_model:
        device_config = _build(
            ("overselect", "deadline_seconds", "server_gap_seconds"),
            lambda: devices.DeviceConfig(
                overselect=FLAGS.overselect,
                deadline_seconds=FLAGS.deadline_seconds,
                start_hour_utc=FLAGS.start_hour_utc,
                server_gap_seconds=FLAGS.server_gap_seconds,
                profiles_path=FLAGS.device_profiles,
            ),
        )
    loop = _build(
        ("rounds", "eval_every", "checkpoint_every"),
        lambda: training_loop.LoopConfig(
            total_rounds=FLAGS.rounds, eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every
        ),
    )
    return _build(
        ("clients_per_round", "eval_clients", "experiment", "target_epsilon", "dp", "sampling", "device_model"),
        lambda: configs.ExperimentConfig(
            model=FLAGS.model,
            clients_per_round=FLAGS.clients_per_round,
            eval_clients=FLAGS.eval_clients,
            seed=FLAGS.seed,
            root_dir=FLAGS.root_dir,
            experiment=FLAGS.experiment,
            data=configs.DataConfig(
                data_dir=FLAGS.data_dir,
                cache_dir=FLAGS.cache_dir,
                only_digits=FLAGS.only_digits,
                population=population,
            ),
            preprocess=preprocess,
            algorithm=algorithm,
            dp=dp,
            privacy=privacy,
            loop=loop,
            devices=device_config,
            compression=FLAGS.compression,
        ),
    )
