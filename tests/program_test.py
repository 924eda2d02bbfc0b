"""The program's own output: the per-round progress line."""

import io
import math
import os

from tffpipe import program


def _line(private: bool, epsilon: float) -> str:
    stream = io.StringIO()
    printer = program.ProgressPrinter(10, stream, private=private)
    printer(1, {"system/round_seconds": 2.0, "train/loss": 1.5, "train/accuracy": 0.25, "privacy/epsilon": epsilon})
    return stream.getvalue().strip()


def test_a_round_line_shows_epsilon_only_with_dp():
    # ETA: median 2.0 s x 9 rounds left = 18 s.
    assert _line(True, 1.23456) == "round  1/10 |  2.00s | ETA 0m18s | loss 1.5000 | acc 0.2500 | eps 1.23"
    # Without DP epsilon is infinite: no number to print (the start and end lines say there is no DP).
    assert _line(False, math.inf) == "round  1/10 |  2.00s | ETA 0m18s | loss 1.5000 | acc 0.2500"


def test_a_resumed_run_accounts_past_rounds_with_the_clients_they_noised(tmp_path):
    from tffpipe import accounting, configs, outputs

    plan = accounting.PrivacyPlan(
        configs.Mechanism.DISTRIBUTED, 1.0, 50, 3400, configs.Sampling.POISSON, 1e-5, bits=18, dimension=48_670
    )
    dirs = outputs.ExperimentDirs(str(tmp_path), "resumed")
    os.makedirs(os.path.join(dirs.checkpoints, "program_state_2"))
    with open(dirs.metrics_csv, "w") as f:
        f.write("round,privacy/noised_clients\n1,50.0\n2,20.0\n")  # round 2 had 20 of the 50 expected
    resumed = program._epsilon_tracker(plan, dirs)  # noqa: SLF001
    direct = accounting.EpsilonTracker(plan)
    direct.observe(1, 50)
    direct.observe(2, 20)
    assert resumed(2) == direct(2) > accounting.epsilon(plan, 2)  # not the expected 50 in round 2
