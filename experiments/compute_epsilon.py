"""Plans privacy without TensorFlow: epsilon for a plan, or the noise for a target epsilon.

python -m experiments.compute_epsilon --noise_multiplier=1.0 --clients_per_round=50 --rounds=1500
python -m experiments.compute_epsilon --target_epsilon=8 --clients_per_round=100 --rounds=50
python -m experiments.compute_epsilon --max_epsilon=3 --rounds=1000   # rounds a budget allows
python -m experiments.compute_epsilon --table      # the README's grid of plans

Takes the training binary's privacy and data flags, with the same names and defaults;
the population is that of the data flags (--num_writers, or the file in --data_dir).
"""

from experiments import cli

cli.require_environment()

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402

from absl import flags  # noqa: E402

from experiments import flag_groups  # noqa: E402
from tffpipe import accounting, configs, tasks  # noqa: E402

flag_groups.define("task and data", "privacy", "devices")
flag_groups.define("rounds", only=("rounds",))
flags.DEFINE_bool("table", False, "Print epsilon for a grid of plans (clients 10/50/100, z 0.5-2, 50/1500 rounds).")
FLAGS = flags.FLAGS


def _table(population: int) -> None:
    delta = accounting.default_delta(population)
    print(f"population {population}, delta {delta:.3g}, fixed clipping")
    print("| clients/round | z | rounds | eps Poisson RDP | eps Poisson PLD | eps uniform w/o replacement RDP |")
    print("|---|---|---|---|---|---|")
    for m, z, rounds in itertools.product((10, 50, 100), (0.5, 1.0, 2.0), (50, 1500)):
        row = []
        for sampling, acc in (
            (configs.Sampling.POISSON, configs.Accountant.RDP),
            (configs.Sampling.POISSON, configs.Accountant.PLD),
            (configs.Sampling.UNIFORM, configs.Accountant.RDP),
        ):
            plan = accounting.PrivacyPlan(configs.Mechanism.FIXED, z, m, population, sampling, delta, acc)
            eps = accounting.epsilon(plan, rounds)
            row.append("inf" if math.isinf(eps) else f"{eps:.3g}")
        print(f"| {m} | {z} | {rounds} | " + " | ".join(row) + " |")


def main() -> None:
    config = flag_groups.experiment_config()
    population = tasks.data_source(config).population()
    if FLAGS.table:
        return _table(population)
    plan = accounting.create_plan(config, population + config.privacy.canaries)
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
