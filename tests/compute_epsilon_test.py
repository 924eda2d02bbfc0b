import os
import subprocess
import sys

import dp_accounting
import pytest

from tffpipe import accounting, configs, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.compute_epsilon", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plans_epsilon_with_its_assumptions():
    proc = _run("--noise_multiplier=1.0", "--clients_per_round=50", "--rounds=100", "--num_writers=3400")
    assert proc.returncode == 0, proc.stderr
    plan = accounting.PrivacyPlan(
        configs.Mechanism.FIXED, 1.0, 50, 3400, configs.Sampling.POISSON, accounting.default_delta(3400)
    )
    assert f"epsilon {accounting.epsilon(plan, 100):.4g} at delta" in proc.stdout
    assert "Poisson sampling q=0.01471" in proc.stdout and "RDP accountant" in proc.stdout


def test_solves_the_noise_for_a_target():
    proc = _run("--target_epsilon=3", "--clients_per_round=100", "--rounds=50")
    assert proc.returncode == 0, proc.stderr
    assert "reaches epsilon 3 after 50 rounds" in proc.stdout
    z = float(proc.stdout.split()[1])  # "noise_multiplier <z> reaches ..."
    plan = accounting.PrivacyPlan(
        configs.Mechanism.FIXED, z, 100, 3400, configs.Sampling.POISSON, accounting.default_delta(3400)
    )
    assert accounting.epsilon(plan, 50) == pytest.approx(3.0, abs=0.01)
    reported = float(proc.stdout.splitlines()[1].split()[1])  # "epsilon <eps> at delta ..."
    assert reported == pytest.approx(3.0, abs=0.01)


def test_builds_no_tf_graph_and_does_not_import_tensorflow():
    code = (
        "import sys, experiments.compute_epsilon; "
        "print(sorted(m for m in ('tensorflow', 'tensorflow_federated') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--accountant=pld", "--sampling=uniform"), "PLD accountant does not support sampling=uniform"),
        (("--dp=adaptive", "--clients_per_round=5", "--noise_multiplier=1"), "needs at least 11 clients per round"),
        (("--dp=tree", "--rounds=1000"), "at most 68 rounds"),
    ],
)
def test_bad_plans_get_one_line_and_exit_2(flags, message):
    proc = _run(*flags)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_training_preset_gives_its_runs_epsilon_and_an_unknown_flag_is_still_refused():
    proc = _run("--flagfile=experiments/presets/keyboard_dp.flags")  # also sets --algorithm, --epochs, --eval_every...
    assert proc.returncode == 0, proc.stderr
    # The preset's plan: adaptive clipping, z = 1.0, 50 of the 1,000 embedded users by Poisson sampling (q = 0.05),
    # 60 rounds, delta = 1000^-1.1 = 5.01e-4: the README's 2.347.
    plan = accounting.PrivacyPlan(
        configs.Mechanism.ADAPTIVE, 1.0, 50, 1000, configs.Sampling.POISSON, accounting.default_delta(1000)
    )
    assert f"{accounting.epsilon(plan, 60):.4g}" == "2.347"
    assert proc.stdout.startswith("epsilon 2.347 at delta 0.000501 after 60 rounds\n")
    for flag, message in [
        ("--bogus=1", "error: Unknown command line flag 'bogus'"),  # belongs to no binary
        ("--epochs=x", "error: flag --epochs=x: invalid literal for int()"),  # ignored, but still parsed as train does
    ]:
        proc = _run("--flagfile=experiments/presets/keyboard_dp.flags", flag)
        assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


def test_shares_the_training_binarys_privacy_flags_and_defaults():
    from experiments import flag_groups

    privacy = {f.name for f in flag_groups.GROUPS["privacy"]}
    help_text = _run("--helpshort").stdout
    assert all(f"--{name} (default" in help_text for name in privacy | {"num_writers", "rounds", "device_model"})
    assert "--noise_multiplier (default unset)" in help_text and "0.7 with DP" in help_text


def test_the_population_comes_from_the_data_flags(tiny_data_dir):
    # The embedded population's writers, or the clients in a real file (12 in the tiny one).
    proc = _run("--clients_per_round=3", "--rounds=4", "--dp=tree", f"--data_dir={tiny_data_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "each of 12 clients at most once" in proc.stdout


def test_without_dp_it_says_there_is_no_epsilon_instead_of_inf():
    proc = _run("--dp=none")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "no epsilon: no differential privacy (no clipping, no noise); choose --dp=fixed, adaptive or tree to plan one\n"
    )


def test_says_how_many_rounds_a_budget_allows():
    proc = _run("--max_epsilon=2.5", "--rounds=1000")
    assert proc.returncode == 0, proc.stderr
    # The default plan (z = 0.7, 50 of 3,400 per round, Poisson, RDP): round 38 stays at 2.499, 39 reaches 2.511.
    plan = accounting.PrivacyPlan(
        configs.Mechanism.FIXED, 0.7, 50, 3400, configs.Sampling.POISSON, accounting.default_delta(3400)
    )
    assert accounting.epsilon(plan, 38) <= 2.5 < accounting.epsilon(plan, 39)
    assert "a budget of epsilon 2.5 allows 38 rounds" in proc.stdout


def test_output_piped_into_a_reader_that_quits_is_not_an_error():
    # `python -m experiments.compute_epsilon ... | head -1`: the pipe closes before the output ends.
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.compute_epsilon", "--rounds=100"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def _table_rows(stdout: str) -> dict[tuple[str, str, str], list[str]]:
    """{(clients/round, z, rounds): [epsilon per column]} from the printed Markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def _rdp_epsilon(event, relation, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS), relation)
    return accountant.compose(event).get_epsilon(delta)


def test_the_table_takes_the_delta_canaries_and_accountant_flags():
    proc = _run("--table", "--accountant=rdp", "--delta=1e-6", "--canaries=600")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "population 3400 + 600 canaries, delta 1e-06, mechanism fixed"
    assert lines[1] == "| clients/round | z | rounds | eps Poisson RDP | eps uniform w/o replacement RDP |"  # no PLD
    # 50 of 3,400 + 600 clients, z = 1, 50 rounds, straight from dp_accounting.
    poisson = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(50 / 4000, dp_accounting.GaussianDpEvent(1.0)), 50
    )
    uniform = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(4000, 50, dp_accounting.GaussianDpEvent(0.5)), 50
    )
    relation = dp_accounting.NeighboringRelation
    assert _table_rows(proc.stdout)[("50", "1.0", "50")] == [
        f"{_rdp_epsilon(poisson, relation.ADD_OR_REMOVE_ONE, 1e-6):.3g}",
        f"{_rdp_epsilon(uniform, relation.REPLACE_ONE, 1e-6):.3g}",
    ]


def test_the_table_takes_the_mechanism_flag():
    proc = _run("--table", "--dp=tree")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"population 3400, delta {accounting.default_delta(3400):.3g}, mechanism tree"
    rows = _table_rows(proc.stdout)
    tree = dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, 50)
    eps = _rdp_epsilon(tree, dp_accounting.NeighboringRelation.REPLACE_SPECIAL, accounting.default_delta(3400))
    assert rows[("10", "1.0", "50")] == [f"{eps:.3g}"]
    assert rows[("10", "1.0", "1500")] == ["n/a"]  # 1,500 rounds of 10 would reuse clients: 340 at most


def test_distributed_dp_is_planned_for_the_model_and_refuses_an_unusable_width(forks):
    # mlp on the 10 digits: 784*200 + 200 + 200*200 + 200 + 200*10 + 10 = 199,210 weights.
    flags = ["--dp=distributed", "--only_digits", "--model=mlp", "--clients_per_round=50", "--rounds=30"]
    # Both build the model with TF: forked from one process that imported it (tests/forkserver.py).
    proc, refused = forks.run(
        [("compute_epsilon", [*flags, f"--bits={bits}", "--noise_multiplier=0.7"]) for bits in (18, 10)]
    )
    assert proc.returncode == 0, proc.stderr
    population = tasks.data_source(configs.build({"data.only_digits": True})).population()  # writers with digits
    plan = accounting.PrivacyPlan(
        configs.Mechanism.DISTRIBUTED,
        0.7,
        50,
        population,
        configs.Sampling.POISSON,
        accounting.default_delta(population),
        bits=18,
        dimension=199_210,
    )
    assert f"epsilon {accounting.epsilon(plan, 30):.4g} at delta" in proc.stdout
    assert "18-bit modular sum of 199,210 coordinates" in proc.stdout
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: --bits=10: bits=10 is unusable for this model (199,210 parameters)")
