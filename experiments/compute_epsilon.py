"""Plans privacy without TensorFlow: epsilon for a plan, or the noise for a target epsilon.

python -m experiments.compute_epsilon --noise_multiplier=1.0 --clients_per_round=50 --rounds=1500
python -m experiments.compute_epsilon --target_epsilon=8 --clients_per_round=100 --rounds=50
python -m experiments.compute_epsilon --max_epsilon=3 --rounds=1000   # rounds a budget allows
python -m experiments.compute_epsilon --table      # the README's grid of plans
python -m experiments.compute_epsilon --dp=distributed --bits=16 --model=mlp   # refuses a width unusable here

Takes the training binary's privacy and data flags, with the same names and defaults;
the population is that of the data flags (--num_writers, or the file in --data_dir). The
other training flags are accepted and ignored, so a training preset gives its run's epsilon:
python -m experiments.compute_epsilon --flagfile=experiments/presets/keyboard_dp.flags
Only the distributed mechanism loads TensorFlow: its epsilon depends on the model's size.
"""

from experiments import cli

cli.require_environment()

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import accounting, configs, tasks, validation  # noqa: E402

flag_groups.define("task and data", "model", "privacy", "devices")  # the model: distributed DP depends on its size
flag_groups.define("rounds", only=("rounds",))
_IGNORED = flag_groups.define_ignored()  # the other training flags: any training preset parses here
flags.DEFINE_bool(
    "table",
    False,
    "Print epsilon for a grid of plans (clients 10/50/100, z 0.5-2, 50/1500 rounds) with the mechanism, delta, "
    "canaries, and sampling and accountant (both compared unless given) of the other flags.",
)
FLAGS = flags.FLAGS


_SAMPLING_NAMES = {
    configs.Sampling.POISSON: "Poisson",
    configs.Sampling.UNIFORM: "uniform w/o replacement",
    configs.Sampling.SHUFFLE: "each client once",
    configs.Sampling.DEVICE: "device model",
}


def _table_columns(config: configs.ExperimentConfig) -> list[tuple[configs.Sampling, configs.Accountant]]:
    """(sampling, accountant) per column: the ones given (or implied by the mechanism or device model), else both.

    A pair the configuration refuses (the PLD accountant with uniform sampling) is left out.
    """
    given = config.devices is not None or config.dp.mechanism is configs.Mechanism.TREE or FLAGS["sampling"].present
    samplings = [config.sampling] if given else [configs.Sampling.POISSON, configs.Sampling.UNIFORM]
    accountants = (
        [config.privacy.accountant] if FLAGS["accountant"].present else [configs.Accountant.RDP, configs.Accountant.PLD]
    )
    columns = []
    for sampling, accountant in itertools.product(samplings, accountants):
        privacy = dataclasses.replace(config.privacy, sampling=sampling, accountant=accountant)
        try:
            dataclasses.replace(config, privacy=privacy)
        except validation.ConfigError:
            continue
        columns.append((sampling, accountant))
    return columns


def _table(config: configs.ExperimentConfig, population: int) -> None:
    """Epsilon over a grid of (clients/round, z, rounds), for the mechanism, delta and population of the flags."""
    if not config.dp.is_private:
        raise flag_groups.FlagError("--table needs a DP mechanism (--dp=fixed, adaptive or tree): without one, inf")
    if config.dp.mechanism is configs.Mechanism.DISTRIBUTED:
        raise flag_groups.FlagError(
            "--table covers the central mechanisms; for --dp=distributed ask for one plan (its epsilon depends on "
            "--bits and the --model's size): drop --table"
        )
    canaries = config.privacy.canaries
    total = population + canaries
    delta = config.privacy.delta or accounting.default_delta(total)
    with_canaries = f" + {canaries} canaries" if canaries else ""
    print(f"population {population}{with_canaries}, delta {delta:.3g}, mechanism {config.dp.mechanism.value}")
    columns = _table_columns(config)
    names = [f"eps {_SAMPLING_NAMES[s]} {a.value.upper()}" for s, a in columns]
    print("| clients/round | z | rounds | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for m, z, rounds in itertools.product((10, 50, 100), (0.5, 1.0, 2.0), (50, 1500)):
        row = []
        for sampling, acc in columns:
            try:
                plan = accounting.PrivacyPlan(config.dp.mechanism, z, m, total, sampling, delta, acc)
                eps = accounting.epsilon(plan, rounds)
            except accounting.AccountingError:  # too few clients, adaptive clipping's split, tree's reuse limit
                row.append("n/a")
                continue
            row.append("inf" if math.isinf(eps) else f"{eps:.3g}")
        print(f"| {m} | {z} | {rounds} | " + " | ".join(row) + " |")


def _model_size(config: configs.ExperimentConfig, num_classes: int) -> int:
    """The model's trainable parameters (the distributed mechanism's epsilon depends on them): loads TensorFlow."""
    from tffpipe import models

    model = models.create_model(config.model, config.task, num_classes)
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def main() -> None:
    config = flag_groups.experiment_config(ignored=_IGNORED)
    source = tasks.data_source(config)
    population = source.population()
    if FLAGS.table:
        return _table(config, population)
    plan = accounting.create_plan(
        config, population + config.privacy.canaries, model_size=lambda: _model_size(config, source.num_classes)
    )
    if not plan.is_private:
        print(f"no epsilon: {accounting.describe(plan)}; choose --dp=fixed, adaptive or tree to plan one")
        return None
    budget = config.privacy.max_epsilon
    if budget is not None:
        allowed = accounting.budgeted_rounds(plan, budget, plan.rounds)  # refuses what train refuses
        more = " (or more: raise --rounds to look further)" if allowed == plan.rounds else ""
        print(f"a budget of epsilon {budget:g} allows {allowed} rounds{more}")
        plan = dataclasses.replace(plan, rounds=allowed)
    if plan.target_epsilon is not None:
        print(
            f"noise_multiplier {plan.noise_multiplier:.4f} reaches epsilon {plan.target_epsilon:g} "
            f"after {plan.rounds} rounds"
        )
    eps = accounting.epsilon(plan, plan.rounds) if plan.rounds else 0.0
    print(f"epsilon {eps:.4g} at delta {plan.delta:.3g} after {plan.rounds} rounds")
    print(f"assumes: {accounting.describe(plan)}")


if __name__ == "__main__":
    cli.start(main, doc=__doc__, own_flags=["table"])
