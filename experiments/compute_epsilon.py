"""Plans privacy without building any TF graph: epsilon for a plan, or noise for a target.

python -m experiments.compute_epsilon --noise_multiplier=1.0 --clients_per_round=50 --rounds=1500
python -m experiments.compute_epsilon --target_epsilon=8 --clients_per_round=100 --rounds=50
python -m experiments.compute_epsilon --table      # the README's grid of plans
"""

import dataclasses
import itertools
import math

from absl import app, flags

from experiments import cli
from tffpipe import accounting

flags.DEFINE_enum("dp", "fixed", ["fixed", "adaptive", "tree"], "DP mechanism.")
flags.DEFINE_float("noise_multiplier", 1.0, "Noise multiplier z.")
flags.DEFINE_integer("clients_per_round", 50, "Clients per round (expected, under Poisson sampling).")
flags.DEFINE_integer("population", 3400, "Number of clients that can be sampled.")
flags.DEFINE_integer("rounds", 50, "Rounds.")
flags.DEFINE_enum("sampling", None, [s.value for s in accounting.Sampling], "Unset: poisson, or shuffle for tree.")
flags.DEFINE_float("delta", None, "delta; unset: 1 / population^1.1.")
flags.DEFINE_enum("accountant", "rdp", [a.value for a in accounting.Accountant], "Accountant.")
flags.DEFINE_float("target_epsilon", None, "If set, print the noise multiplier that reaches it instead.")
flags.DEFINE_bool("table", False, "Print epsilon for a grid of plans (clients 10/50/100, z 0.5-2, 50/1500 rounds).")
FLAGS = flags.FLAGS


def _plan(
    mechanism: accounting.Mechanism, z: float, m: int, sampling: accounting.Sampling, acc
) -> accounting.PrivacyPlan:
    delta = FLAGS.delta or accounting.default_delta(FLAGS.population)
    return accounting.PrivacyPlan(mechanism, z, m, FLAGS.population, sampling, delta, acc)


def _table() -> None:
    print(f"population {FLAGS.population}, delta {accounting.default_delta(FLAGS.population):.3g}, fixed clipping")
    print("| clients/round | z | rounds | eps Poisson RDP | eps Poisson PLD | eps uniform w/o replacement RDP |")
    print("|---|---|---|---|---|---|")
    for m, z, rounds in itertools.product((10, 50, 100), (0.5, 1.0, 2.0), (50, 1500)):
        row = []
        for sampling, acc in (
            (accounting.Sampling.POISSON, accounting.Accountant.RDP),
            (accounting.Sampling.POISSON, accounting.Accountant.PLD),
            (accounting.Sampling.UNIFORM, accounting.Accountant.RDP),
        ):
            eps = accounting.epsilon(_plan(accounting.Mechanism.FIXED, z, m, sampling, acc), rounds)
            row.append("inf" if math.isinf(eps) else f"{eps:.3g}")
        print(f"| {m} | {z} | {rounds} | " + " | ".join(row) + " |")


def main(argv) -> int:
    del argv

    def plan_privacy() -> None:
        if FLAGS.table:
            return _table()
        mechanism = accounting.Mechanism(FLAGS.dp)
        default = accounting.Sampling.SHUFFLE if mechanism is accounting.Mechanism.TREE else accounting.Sampling.POISSON
        sampling = accounting.Sampling(FLAGS.sampling) if FLAGS.sampling else default
        plan = _plan(
            mechanism,
            FLAGS.noise_multiplier,
            FLAGS.clients_per_round,
            sampling,
            accounting.Accountant(FLAGS.accountant),
        )
        if FLAGS.target_epsilon is not None:
            z = accounting.noise_for_target_epsilon(plan, FLAGS.rounds, FLAGS.target_epsilon)
            print(f"noise_multiplier {z:.4f} reaches epsilon {FLAGS.target_epsilon:g} after {FLAGS.rounds} rounds")
            plan = dataclasses.replace(plan, noise_multiplier=z)
        eps = accounting.epsilon(plan, FLAGS.rounds)
        print(f"epsilon {eps:.4g} at delta {plan.delta:.3g} after {FLAGS.rounds} rounds")
        print(f"assumes: {accounting.describe(plan)}")

    return cli.run_guarded(plan_privacy)


if __name__ == "__main__":
    app.run(main)
