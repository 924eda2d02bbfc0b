"""The flag layer: one declaration per flag, defaults from the config, errors named by flag."""

import dataclasses
import os

import pytest
from absl import flags

from experiments import flag_groups
from tffpipe import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parsed(*argv: str) -> configs.ExperimentConfig:
    """The config of `argv` through every group's flags, on a FlagValues of its own."""
    values = flags.FlagValues()
    flag_groups.define_all(values)
    values(["prog", *argv])
    return flag_groups.experiment_config(values)


def personalized(*argv: str, only: tuple[str, ...] = (), training: bool = False) -> configs.PersonalizationConfig:
    """The personalization settings of `argv`, as a binary that defines the group's flags in `only` (all: ())."""
    values = flags.FlagValues()
    flag_groups.define_all(values)
    flag_groups.define("personalization", only=only, flag_values=values)
    values(["prog", *argv])
    config = flag_groups.experiment_config(values) if training else None
    return flag_groups.personalization_config(values, training=config)


def test_every_flag_sets_a_real_field_and_every_field_has_at_most_one_flag():
    experiment = [f.path for g in flag_groups.EXPERIMENT_GROUPS for f in flag_groups.GROUPS[g] if f.path]
    assert set(experiment) <= set(configs.field_paths())
    personalization = [f.path for f in flag_groups.GROUPS["personalization"]]
    # Each of PersonalizationConfig's five fields has its one flag (train and personalize share the spelling).
    assert sorted(personalization) == sorted(
        f"personalization.{f.name}" for f in dataclasses.fields(configs.PersonalizationConfig)
    )
    paths = experiment + personalization
    assert len(paths) == len(set(paths))


def test_personalization_flags_default_to_the_configs_own_and_set_their_fields():
    assert personalized() == configs.PersonalizationConfig()
    argv = ("--personalize_every=4", "--personalize_fraction=0.25", "--personalize_learning_rate=0.01")
    assert personalized(*argv, "--max_clients=3") == configs.PersonalizationConfig(
        every=4, fraction=0.25, learning_rate=0.01, max_clients=3
    )
    # A binary without --max_clients (train) gets the field's default; define_all alone defines none of the group,
    # so evaluate keeps its own --max_clients.
    train = ("personalize_every", "personalize_epochs", "personalize_fraction", "personalize_learning_rate")
    assert personalized(*argv, only=train).max_clients == -1
    values = flags.FlagValues()
    flag_groups.define_all(values)
    assert not {f.name for f in flag_groups.GROUPS["personalization"]} & set(values)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--personalize_fraction=1"], "--personalize_fraction=1.0: fraction must be in (0, 1), got 1.0"),
        (["--max_clients=0"], "--max_clients=0: max_clients must be positive or -1 (all), got 0"),
        (["--eval_every=2", "--personalize_every=3"], "--personalize_every=3: every=3 must be a multiple of eval_"),
        (["--eval_clients=0", "--personalize_every=2"], "--personalize_every=2: every=2 personalizes the evaluati"),
    ],
)
def test_a_personalization_error_names_its_flag(argv, message):
    with pytest.raises(flag_groups.FlagError) as e:
        personalized(*argv, training=True)
    assert str(e.value).startswith(message)


def test_defaults_are_the_configs_own():
    assert parsed() == configs.ExperimentConfig()


def test_values_land_in_their_fields():
    config = parsed("--dp=adaptive", "--clients_per_round=20", "--clip=0.25", "--algorithm=fedadam", "--rounds=7")
    assert config.dp.mechanism is configs.Mechanism.ADAPTIVE and config.dp.clip == 0.25
    assert config.algorithm.server_learning_rate == pytest.approx(10**-2.5) and config.loop.rounds == 7
    mobile = parsed("--device_model", "--deadline_seconds=60")
    assert mobile.devices == configs.DeviceConfig(deadline_seconds=60.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clip=nan"], "--clip=nan: clip must be a finite number, got nan"),
        (["--num_writers=0"], "--num_writers=0: num_writers must be >= 1, got 0"),
        (["--task=keyboard", "--only_digits"], "--only_digits is a flag of the emnist task, which --task=keyboard"),
        (["--vocab_size=100"], "--vocab_size is a flag of the keyboard task, which --task=emnist does not use"),
        (["--compression"], "--compression: compression is not combined with DP aggregation"),
        (["--overselect=0.5"], "--overselect is a device-model flag: add --device_model, or drop --overselect"),
    ],
)
def test_an_error_names_the_one_flag_at_fault(argv, message):
    with pytest.raises(flag_groups.FlagError) as e:
        parsed(*argv)
    assert str(e.value).startswith(message)


def test_dp_none_overrides_a_preset_whose_dp_parameters_are_then_unused(capsys):
    preset = os.path.join(REPO, "experiments", "presets", "dp_fedavg_eps8.flags")  # sets --target_epsilon=8
    config = parsed(f"--flagfile={preset}", "--dp=none", "--noise_multiplier=0.3")
    assert config.dp.mechanism is configs.Mechanism.NONE and config.dp.given_noise_multiplier == 0.0
    assert config.privacy.target_epsilon is None
    assert capsys.readouterr().out == (
        "note: no DP mechanism (dp none), so --noise_multiplier=0.3 and --target_epsilon=8.0 are unused: "
        "no clipping, no noise\n"
    )


def test_task_defaults_are_what_an_unset_flag_resolves_to():
    keyboard = parsed("--task=keyboard")
    assert keyboard == configs.build({"task": configs.Task.KEYBOARD})  # configs_test checks those values
    assert keyboard.algorithm.algorithm is configs.Algorithm.FEDADAM and keyboard.preprocess.epochs == 1
    assert keyboard.algorithm.server_learning_rate == 0.01 and keyboard.dp.mechanism is configs.Mechanism.NONE
    assert parsed("--task=keyboard", "--epochs=3", "--dp=fixed").preprocess.epochs == 3  # a given flag wins
    emnist = parsed()
    assert (emnist.algorithm.algorithm, emnist.preprocess.epochs, emnist.dp.mechanism) == (
        configs.Algorithm.FEDAVG,
        5,
        configs.Mechanism.FIXED,
    )


def test_help_shows_each_tasks_defaults():
    values = flags.FlagValues()
    flag_groups.define_all(values)
    assert values["epochs"].default is None
    assert values["epochs"].help == "Local epochs per round. Unset: per task (emnist 5, keyboard 1)."
    assert values["dp"].help.endswith("Unset: per task (emnist fixed, keyboard none).")
    assert "fedadagrad 0.1; keyboard task: fedadam 0.01;" in values["server_learning_rate"].help


def test_distributed_dp_with_a_client_group_size_runs_per_client_with_a_note(capsys):
    config = parsed("--dp=distributed", "--client_batching=4", "--clients_per_round=10")
    assert config.client_batching == "off"  # what the run does, as recorded in hparams
    assert capsys.readouterr().out == (
        "note: client_batching=4 runs per client: distributed DP needs each real client's own clipping, rounding "
        "and noise share\n"
    )


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "experiments", "presets"))))
def test_every_preset_parses_to_a_valid_config_named_after_it(name, monkeypatch):
    monkeypatch.chdir(REPO)  # presets name the presets they extend relative to the repository
    assert parsed(f"--flagfile=experiments/presets/{name}").experiment == name.removesuffix(".flags")


def test_ignored_flags_are_parsed_and_leave_their_fields_at_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    values = flags.FlagValues()
    flag_groups.define("privacy", flag_values=values)  # a binary that uses the privacy flags only
    ignored = flag_groups.define_ignored(values)
    assert "task" in ignored and "personalize_every" in ignored and "dp" not in ignored
    values(["prog", "--flagfile=experiments/presets/keyboard_dp.flags"])
    config = flag_groups.experiment_config(values, ignored=ignored)
    # The preset's privacy flags land; its --task=keyboard and --rounds=60 are the defaults' emnist and 50.
    assert (config.dp.mechanism, config.dp.noise_multiplier, config.clients_per_round) == (
        configs.Mechanism.ADAPTIVE,
        1.0,
        50,
    )
    assert (config.task, config.loop.rounds) == (configs.Task.EMNIST, configs.LoopConfig().rounds)


def test_the_dp_keyboard_preset_on_10000_users_plans_epsilon_8_over_its_60_rounds(monkeypatch):
    from tffpipe import accounting

    monkeypatch.chdir(REPO)
    config = parsed("--flagfile=experiments/presets/keyboard_dp_10k.flags")
    assert (config.data.text.population.num_users, config.clients_per_round, config.loop.rounds) == (10_000, 200, 60)
    assert config.dp.mechanism is configs.Mechanism.FIXED and config.client_batching == "auto"
    plan = accounting.create_plan(config, 10_000)
    # q = 200 / 10,000 = 0.02, delta = 10,000^-1.1 = 3.98e-5; `python -m experiments.compute_epsilon
    # --task=keyboard --num_users=10000 --dp=fixed --target_epsilon=8 --clients_per_round=200 --rounds=60`
    # solves z = 0.5242 (epsilon 7.997).
    assert plan.delta == pytest.approx(10_000**-1.1)
    assert plan.noise_multiplier == pytest.approx(0.5242, abs=1e-4)
    assert accounting.epsilon(plan, 60) == pytest.approx(8.0, abs=0.01)
