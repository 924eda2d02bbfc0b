"""absl flag groups, declared once with the config field each sets, and their conversion.

Every flag names the `ExperimentConfig` field it fills (`Flag.path`; the personalization
group's, a `PersonalizationConfig` field), and its default is that field's default, so
binaries that share a group (train, evaluate, compute_epsilon; train and personalize for
personalization) share names and defaults, and an error about a field names the one
flag that set it. Only binaries import this module; it imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from absl import flags

from tffpipe import configs, errors, validation

FLAGS = flags.FLAGS
_FROM_CONFIG = object()


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: its name, the config field it sets (None: not a field), kind and help."""

    name: str
    path: str | None
    kind: str  # float, integer, bool, string, list or enum
    help: str
    enum_class: type[enum.Enum] | None = None
    default: Any = _FROM_CONFIG

    @property
    def resolved_default(self) -> Any:
        if self.default is _FROM_CONFIG and self.path in configs.TASK_DEFAULTS:
            return None  # unset: the config takes the task's default
        value = _field_default(self.path) if self.default is _FROM_CONFIG else self.default
        if isinstance(value, tuple):
            return list(value) or None
        return value.value if isinstance(value, enum.Enum) else value

    @property
    def full_help(self) -> str:
        """The help, with the per-task defaults of a field that has them."""
        by_task = configs.TASK_DEFAULTS.get(self.path)
        if by_task is None:
            return self.help
        return f"{self.help} Unset: per task ({', '.join(f'{t.value} {_shown(v)}' for t, v in by_task.items())})."


_PERSONALIZATION = "personalization."  # the prefix of the paths into configs.PersonalizationConfig


def _field_default(path: str) -> Any:
    if path.startswith(_PERSONALIZATION):
        fields = {f.name: f.default for f in dataclasses.fields(configs.PersonalizationConfig)}
        return fields[path.removeprefix(_PERSONALIZATION)]
    return configs.default(path)


def _shown(value: Any) -> str:
    return value.value if isinstance(value, enum.Enum) else f"{value:.3g}" if isinstance(value, float) else str(value)


def _rates() -> str:
    per_algorithm = ", ".join(f"{a.value} {r:.3g}" for a, r in configs.DEFAULT_SERVER_LEARNING_RATE.items())
    per_task = "; ".join(
        f"{task.value} task: " + ", ".join(f"{a.value} {r:.3g}" for a, r in rates.items())
        for task, rates in configs.TASK_SERVER_LEARNING_RATE.items()
    )
    return f"{per_algorithm}; {per_task}" if per_task else per_algorithm


GROUPS: dict[str, tuple[Flag, ...]] = {
    "task and data": (
        Flag("task", "task", "enum", "What clients hold and the model predicts.", configs.Task),
        Flag("data_dir", "data.data_dir", "string", "Directory with the task's real files; unset: embedded data."),
        Flag("cache_dir", "data.cache_dir", "string", "Where the embedded data is generated (once per configuration)."),
        Flag("only_digits", "data.only_digits", "bool", "EMNIST: the 10 digit classes instead of all 62."),
        Flag("num_writers", "data.population.num_writers", "integer", "Embedded EMNIST: writers (clients)."),
        Flag("median_examples", "data.population.median_examples", "integer", "Embedded EMNIST: median per writer."),
        Flag("label_concentration", "data.population.label_concentration", "float", "Embedded EMNIST: label skew."),
        Flag("quantity_sigma", "data.population.quantity_sigma", "float", "Embedded EMNIST: log-normal size skew."),
        Flag("data_seed", "data.population.seed", "integer", "Embedded EMNIST: generator seed."),
        Flag("vocab_size", "data.text.vocab_size", "integer", "Keyboard: words with their own id (most users first)."),
        Flag("sequence_length", "data.text.sequence_length", "integer", "Keyboard: words per training sequence."),
        Flag("num_oov_buckets", "data.text.num_oov_buckets", "integer", "Keyboard: out-of-vocabulary ids."),
        Flag("num_users", "data.text.population.num_users", "integer", "Embedded keyboard data: users (clients)."),
        Flag("median_messages", "data.text.population.median_messages", "integer", "Embedded keyboard: per user."),
        Flag("text_seed", "data.text.population.seed", "integer", "Embedded keyboard data: generator seed."),
    ),
    "model": (
        Flag(
            "model",
            "model",
            "string",
            "A registered model of the task, or package.module:function; "
            f"unset: {', '.join(f'{t.value} {m}' for t, m in configs.DEFAULT_MODEL.items())}.",
        ),
    ),
    "algorithm": (
        Flag("algorithm", "algorithm.algorithm", "enum", "Federated algorithm.", configs.Algorithm),
        Flag("client_learning_rate", "algorithm.client_learning_rate", "float", "Client SGD learning rate."),
        Flag(
            "server_learning_rate",
            "algorithm.server_learning_rate",
            "float",
            f"Server learning rate; unset: per algorithm ({_rates()}; Reddi et al. 2021).",
        ),
        Flag("server_momentum", "algorithm.server_momentum", "float", "FedAvgM server momentum."),
        Flag("adaptive_epsilon", "algorithm.adaptive_epsilon", "float", "FedAdam/FedYogi/FedAdagrad tau."),
        Flag("proximal_strength", "algorithm.proximal_strength", "float", "FedProx mu."),
        Flag("epochs", "preprocess.epochs", "integer", "Local epochs per round."),
        Flag("batch_size", "preprocess.batch_size", "integer", "Local batch size."),
        Flag("shuffle_buffer", "preprocess.shuffle_buffer", "integer", "Client shuffle buffer (1: no shuffling)."),
        Flag(
            "max_examples_per_client",
            "preprocess.max_examples_per_client",
            "integer",
            "Cap on a client's examples per round (-1: all).",
        ),
    ),
    "privacy": (
        Flag("dp", "dp.mechanism", "enum", "DP aggregation mechanism.", configs.Mechanism),
        Flag(
            "noise_multiplier",
            "dp.noise_multiplier",
            "float",
            f"z: noise std on the clipped sum is z * clip; unset: {configs.DEFAULT_NOISE_MULTIPLIER} with DP.",
        ),
        Flag("clip", "dp.clip", "float", "L2 clip (fixed/tree) or initial clip (adaptive)."),
        Flag("target_quantile", "dp.target_quantile", "float", "Adaptive clipping: target unclipped fraction."),
        Flag("clip_learning_rate", "dp.clip_learning_rate", "float", "Adaptive clipping: clip learning rate."),
        Flag("zeroing_norm", "dp.zeroing_norm", "float", "Zero updates with larger L-inf norm (0: off)."),
        Flag(
            "bits",
            "dp.bits",
            "integer",
            f"--dp=distributed: the secure sum's field is 2^bits (1-{configs.MAX_DISTRIBUTED_BITS}); "
            f"unset: {configs.DEFAULT_DISTRIBUTED_BITS}.",
        ),
        Flag(
            "distributed_noise",
            "dp.distributed_noise",
            "enum",
            "--dp=distributed: each device's noise; unset: discrete_gaussian.",
            configs.DistributedNoise,
        ),
        Flag("target_epsilon", "privacy.target_epsilon", "float", "Solve the noise multiplier for this epsilon."),
        Flag("max_epsilon", "privacy.max_epsilon", "float", "Budget: stop before the round that would exceed it."),
        Flag("canaries", "privacy.canaries", "integer", "Canary clients for the empirical privacy audit (0: none)."),
        Flag("delta", "privacy.delta", "float", "delta; unset: 1 / population^1.1."),
        Flag("accountant", "privacy.accountant", "enum", "Privacy accountant.", configs.Accountant),
        Flag(
            "sampling",
            "privacy.sampling",
            "enum",
            "Client sampling; unset: uniform without DP, poisson for fixed/adaptive/distributed, shuffle for tree.",
            configs.Sampling,
        ),
        Flag("clients_per_round", "clients_per_round", "integer", "Clients per round (expected, under Poisson)."),
    ),
    "devices": (
        Flag(
            "device_model",
            None,
            "bool",
            "Simulate mobile devices: windows, speed tiers, dropouts, deadlines.",
            default=False,
        ),
        Flag("overselect", "devices.overselect", "float", "Device model: ask clients_per_round*(1+overselect)."),
        Flag("deadline_seconds", "devices.deadline_seconds", "float", "Device model: deadline, simulated s (0: none)."),
        Flag("start_hour_utc", "devices.start_hour_utc", "float", "Device model: simulated UTC hour at round 1."),
        Flag("server_gap_seconds", "devices.server_gap_seconds", "float", "Device model: simulated s between rounds."),
        Flag("device_profiles", "devices.device_profiles", "string", "Device model: profile CSV (devices.py)."),
        Flag("compression", "compression", "bool", "Upload 8-bit quantized updates (TFF's compression; no DP)."),
        Flag(
            "secure_aggregation",
            "secure_aggregation",
            "bool",
            "TFF's secure sum of the weighted mean, adaptive bounds (no DP; simulated as a plain modular sum).",
        ),
    ),
    "rounds": (
        Flag("rounds", "loop.rounds", "integer", "Total rounds; raise it to extend a finished run."),
        Flag("eval_every", "loop.eval_every", "integer", "Evaluate held-out clients every N rounds (and last)."),
        Flag("eval_clients", "eval_clients", "integer", "Held-out clients per evaluation (0: none)."),
        Flag("checkpoint_every", "loop.checkpoint_every", "integer", "Checkpoint every N rounds (and at the end)."),
        Flag("seed", "seed", "integer", "Seeds client sampling, shuffling, DP noise and model init."),
    ),
    "workers": (
        Flag("workers", "runtime.workers", "list", "host:port of worker services (experiments.worker); unset: local."),
        Flag("local_workers", "runtime.local_workers", "integer", "Worker processes started on this machine."),
        Flag("pin_workers", "runtime.pin_workers", "bool", "Pin each local worker to one CPU of its own."),
        Flag("worker_retries", "runtime.worker_retries", "integer", "Reruns of a round when a worker dies."),
        Flag(
            "client_batching",
            "client_batching",
            "string",
            "off: one TFF client per real client; K: groups of up to K real clients trained in one TensorFlow call "
            "(same results); auto: groups where the model and mechanism allow.",
        ),
    ),
    "outputs": (
        Flag("root_dir", "root_dir", "string", "Root of all experiments' outputs."),
        Flag("experiment", "experiment", "string", "Experiment name: outputs go to <root_dir>/<experiment>."),
    ),
    # Not the experiment's: these set configs.PersonalizationConfig (`personalization_config`), for the binaries
    # that fine-tune (train in its evaluations, personalize after it), each defining the ones it uses.
    "personalization": (
        Flag(
            "personalize_every",
            "personalization.every",
            "integer",
            "Fine-tune the global model on each evaluated held-out client and report the gain every N rounds "
            "(a multiple of --eval_every) and at the last; 0: never. See experiments.personalize.",
        ),
        Flag("personalize_epochs", "personalization.epochs", "integer", "Local epochs of fine-tuning per client."),
        Flag(
            "personalize_fraction",
            "personalization.fraction",
            "float",
            "Share of each held-out client's examples (first) used to fine-tune; the rest is evaluated.",
        ),
        Flag(
            "personalize_learning_rate",
            "personalization.learning_rate",
            "float",
            "Fine-tuning SGD rate; unset: --client_learning_rate.",
        ),
        Flag("max_clients", "personalization.max_clients", "integer", "At most this many held-out clients (-1: all)."),
    ),
}
EXPERIMENT_GROUPS = tuple(group for group in GROUPS if group != "personalization")  # ExperimentConfig's
_BY_NAME = {f.name: f for group in GROUPS.values() for f in group}
_BY_PATH = {f.path: f for f in _BY_NAME.values() if f.path}
_EXPERIMENT = {f.name: f for group in EXPERIMENT_GROUPS for f in GROUPS[group] if f.path}  # flags with a config field
_DEFINED: dict[str, list[Flag]] = {}  # group -> flags this binary defined, for --helpshort


def define(*groups: str, only: Sequence[str] = (), flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the flags of `groups` (all of them), or just the flags named in `only`."""
    for group in groups:
        for flag in GROUPS[group]:
            if only and flag.name not in only:
                continue
            _define(flag, flag.full_help, flag_values)
            if flag_values is FLAGS:
                _DEFINED.setdefault(group, []).append(flag)


def _define(flag: Flag, help_text: str, flag_values: flags.FlagValues) -> None:
    default = flag.resolved_default
    if flag.kind == "enum":
        choices = [e.value for e in flag.enum_class]
        flags.DEFINE_enum(flag.name, default, choices, help_text, flag_values=flag_values)
    else:
        getattr(flags, f"DEFINE_{flag.kind}")(flag.name, default, help_text, flag_values=flag_values)


def define_all(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines every flag of the experiment's config (the binaries that fine-tune add personalization's)."""
    define(*EXPERIMENT_GROUPS, flag_values=flag_values)


_IGNORED_TITLE = "ignored here (no bearing on the result), accepted so that any training preset (--flagfile) parses"


def define_ignored(flag_values: flags.FlagValues = FLAGS) -> tuple[str, ...]:
    """Defines every group flag the binary has not defined yet, as accepted and ignored; returns their names.

    A binary that uses a part of the training flags (compute_epsilon) then reads any
    training preset: absl still parses each value by its kind, and a flag that belongs to
    no group is still refused. Pass the names to `experiment_config(ignored=...)`, which
    then leaves their fields at their defaults.
    """
    ignored = tuple(f.name for group in GROUPS.values() for f in group if f.name not in flag_values)
    for name in ignored:
        _define(_BY_NAME[name], _BY_NAME[name].help, flag_values)  # the title of its --helpshort section says why
        if flag_values is FLAGS:
            _DEFINED.setdefault(_IGNORED_TITLE, []).append(_BY_NAME[name])
    return ignored


class FlagError(errors.InputError):
    """A flag value the configuration rejects; the message names the flag."""


def to_flag_error(error: ValueError, flag_values: flags.FlagValues = FLAGS) -> FlagError:
    """`--flag=value: reason` for an error about the field (`error.field`) a flag set; the reason alone otherwise."""
    if isinstance(error, FlagError):
        return error
    flag = _BY_PATH.get(getattr(error, "field", None))
    if flag is None or flag.name not in flag_values or flag_values[flag.name].value is None:
        return FlagError(str(error))
    value = flag_values[flag.name].value
    if flag.kind == "bool":
        return FlagError(f"--{'' if value else 'no'}{flag.name}: {error}")
    if flag.kind == "list":
        value = ",".join(value)
    return FlagError(f"--{flag.name}={value}: {error}")


def experiment_config(
    flag_values: flags.FlagValues = FLAGS, *, ignored: Sequence[str] = ()
) -> configs.ExperimentConfig:
    """The validated config from the parsed flags (defaults for flags this binary lacks or `ignored`).

    Raises:
      FlagError: naming the one flag at fault.
    """
    used = set(flag_values) - set(ignored)
    values = {}
    for name, flag in _EXPERIMENT.items():
        if name not in used:
            continue
        value = flag_values[name].value
        if flag.enum_class is not None and value is not None:
            value = flag.enum_class(value)
        if flag.kind == "list":
            value = tuple(value or ())
        values[flag.path] = value
    device_model = "device_model" in used and flag_values["device_model"].value
    if not device_model:
        stray = [
            f.name
            for f in GROUPS["devices"]
            if f.path and f.path.startswith("devices.") and f.name in used and flag_values[f.name].present
        ]
        if stray:
            raise FlagError(f"--{stray[0]} is a device-model flag: add --device_model, or drop --{stray[0]}")
        values = {k: v for k, v in values.items() if not k.startswith("devices.")}
    _refuse_other_tasks_flags(values.get("task") or configs.Task.EMNIST, flag_values, used)
    try:
        config = configs.build(values, devices=device_model)
    except validation.ConfigError as e:
        raise to_flag_error(e, flag_values) from None
    if config.unused_dp_parameters:
        given = [
            f"--{_BY_PATH[path].name}={flag_values[_BY_PATH[path].name].value}" for path in config.unused_dp_parameters
        ]
        print(
            f"note: no DP mechanism (dp none), so {' and '.join(given)} {'is' if len(given) == 1 else 'are'} unused: "
            "no clipping, no noise",
            flush=True,
        )
    if config.client_batching_fallback:
        print(f"note: {config.client_batching_fallback}", flush=True)
    return config


def personalization_config(
    flag_values: flags.FlagValues = FLAGS, *, training: configs.ExperimentConfig | None = None
) -> configs.PersonalizationConfig:
    """The validated personalization settings of the parsed flags (defaults for the group's flags this binary lacks).

    Args:
      flag_values: the parsed flags.
      training: the run's config when personalization runs inside training: `every` is then
        checked against its evaluation (`PersonalizationConfig.check_in_training`).

    Raises:
      FlagError: naming the one flag at fault.
    """
    values = {
        flag.path.removeprefix(_PERSONALIZATION): flag_values[flag.name].value
        for flag in GROUPS["personalization"]
        if flag.name in flag_values
    }
    try:
        settings = configs.PersonalizationConfig(**values)
        if training is not None:
            settings.check_in_training(training)
    except validation.ConfigError as e:
        raise to_flag_error(e.prefixed(_PERSONALIZATION), flag_values) from None
    return settings


def _refuse_other_tasks_flags(task: configs.Task, flag_values: flags.FlagValues, used: set[str]) -> None:
    """A flag of another task than the run's would be silently ignored: refused, naming it."""
    for flag in _EXPERIMENT.values():
        owner = configs.task_of(flag.path)
        if owner not in (None, task) and flag.name in used and flag_values[flag.name].present:
            raise FlagError(
                f"--{flag.name} is a flag of the {owner.value} task, which --task={task.value} does not use: "
                f"drop it, or use --task={owner.value}"
            )


def help_text(program: str, doc: str, own: Sequence[str] = (), *, full: bool = False) -> str:
    """The binary's flags by group, with their defaults (--helpshort); `full` adds absl's own (--helpfull)."""
    lines = [doc.strip(), "", f"Flags of {program}, by group (--helpfull adds absl's own):"]
    sections = [(group, [f.name for f in defined]) for group, defined in _DEFINED.items()]
    if own:
        sections.append((program, list(own)))
    if full:
        listed = {name for _, names in sections for name in names}
        sections.append(("absl's own", sorted({FLAGS[name].name for name in FLAGS} - listed)))
    for title, names in sections:
        lines.append(f"\n  {title}:")
        for name in names:
            default = FLAGS[name].default
            shown = "unset" if default is None else repr(default) if isinstance(default, str) else default
            lines.append(f"    --{name} (default {shown}): {FLAGS[name].help}")
    if full:
        lines.append("    --flagfile=<file>: read flags from a file, one --name=value a line (presets/*.flags)")
        lines.append("    --undefok=<name,...>: flags that may be given although this binary does not define them")
    return "\n".join(lines)
